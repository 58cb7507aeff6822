//! The one table of connected peers: their connections, the addresses they
//! announced, and which address this node uses to reach their registry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::SystemTime;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

/// One connected peer, as the debug page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: PeerId,
    /// Remote addresses of its open connections.
    pub connection_ips: Vec<IpAddr>,
    /// Where this node would fetch from it.
    pub endpoint: Option<IpAddr>,
    /// When its first open connection was established.
    pub connected_since: SystemTime,
}

struct PeerState {
    /// Remote addresses of the open connections.
    connections: HashMap<ConnectionId, Multiaddr>,
    /// Addresses the peer announced through identify.
    announced: Vec<Multiaddr>,
    since: SystemTime,
}

#[derive(Default)]
pub(super) struct PeerTable {
    peers: HashMap<PeerId, PeerState>,
}

/// The IP address of a multiaddr, if it has one.
pub(super) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Addresses that name a node to others: not loopback, link-local or
/// unspecified.
pub fn routable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

impl PeerTable {
    /// Records a new connection; `true` when it is the peer's first.
    pub(super) fn connected(&mut self, peer: PeerId, id: ConnectionId, remote: Multiaddr) -> bool {
        let state = self.peers.entry(peer).or_insert_with(|| PeerState {
            connections: HashMap::new(),
            announced: Vec::new(),
            since: SystemTime::now(),
        });
        state.connections.insert(id, remote);
        state.connections.len() == 1
    }

    /// Forgets a closed connection; `true` when it was the peer's last.
    pub(super) fn closed(&mut self, peer: &PeerId, id: ConnectionId) -> bool {
        let Some(state) = self.peers.get_mut(peer) else {
            return false;
        };
        state.connections.remove(&id);
        if state.connections.is_empty() {
            self.peers.remove(peer);
            return true;
        }
        false
    }

    /// Records what a connected peer announced; returns its routable
    /// addresses (sorted, deduplicated), or `None` when it is not connected.
    pub(super) fn announced(
        &mut self,
        peer: &PeerId,
        addrs: Vec<Multiaddr>,
    ) -> Option<Vec<IpAddr>> {
        let state = self.peers.get_mut(peer)?;
        let mut ips: Vec<IpAddr> = addrs.iter().filter_map(ip_of).filter(routable).collect();
        ips.sort();
        ips.dedup();
        state.announced = addrs;
        Some(ips)
    }

    pub(super) fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    pub(super) fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether one of the peer's connections runs over loopback (nodes that
    /// share one host).
    pub(super) fn over_loopback(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| {
            p.connections
                .values()
                .filter_map(ip_of)
                .any(|ip| ip.is_loopback())
        })
    }

    /// The registry IP of a connected peer: an address it announced that
    /// others can reach, else the address of our connection to it.
    pub(super) fn endpoint_ip(&self, peer: &PeerId) -> Option<IpAddr> {
        let state = self.peers.get(peer)?;
        let announced: Vec<IpAddr> = state.announced.iter().filter_map(ip_of).collect();
        let connected: Vec<IpAddr> = state.connections.values().filter_map(ip_of).collect();
        announced
            .iter()
            .find(|ip| routable(ip))
            .or_else(|| connected.iter().find(|ip| routable(ip)))
            .or_else(|| announced.first())
            .or_else(|| connected.first())
            .copied()
    }

    pub(super) fn infos(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .peers
            .iter()
            .map(|(id, state)| {
                let mut connection_ips: Vec<IpAddr> =
                    state.connections.values().filter_map(ip_of).collect();
                connection_ips.sort();
                connection_ips.dedup();
                PeerInfo {
                    id: *id,
                    connection_ips,
                    endpoint: self.endpoint_ip(id),
                    connected_since: state.since,
                }
            })
            .collect();
        out.sort_by_key(|p| p.id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn routable_addresses() {
        for (ip, want) in [
            ("10.0.0.1", true),
            ("192.168.1.2", true),
            ("127.0.0.1", false),
            ("127.0.0.5", false),
            ("169.254.1.1", false),
            ("0.0.0.0", false),
            ("fd00::1", true),
            ("::1", false),
            ("fe80::1", false),
            ("::", false),
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(routable(&ip), want, "{ip}");
        }
    }

    #[test]
    fn connections_announcements_and_endpoints() {
        let mut t = PeerTable::default();
        let p = PeerId::random();
        let (c1, c2) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        // Announcements of a peer that is not connected are not kept.
        assert_eq!(t.announced(&p, vec![addr("/ip4/10.0.0.9/tcp/1")]), None);
        assert!(t.connected(p, c1, addr("/ip4/127.0.0.1/tcp/5")));
        assert!(!t.connected(p, c2, addr("/ip4/10.0.0.2/tcp/6")));
        assert!(t.over_loopback(&p));
        // Without announcements: the routable connection address.
        assert_eq!(t.endpoint_ip(&p), Some("10.0.0.2".parse().expect("ip")));
        let ips = t
            .announced(
                &p,
                vec![
                    addr("/ip4/10.0.0.7/tcp/1"),
                    addr("/ip4/127.0.0.1/tcp/1"),
                    addr("/ip4/10.0.0.7/tcp/2"),
                ],
            )
            .expect("connected");
        assert_eq!(ips, ["10.0.0.7".parse::<IpAddr>().expect("ip")]);
        assert_eq!(t.endpoint_ip(&p), Some("10.0.0.7".parse().expect("ip")));
        let info = &t.infos()[0];
        assert_eq!(info.connection_ips.len(), 2);
        assert!(!t.closed(&p, c1));
        assert!(t.closed(&p, c2));
        assert!(!t.is_connected(&p));
        assert!(!t.closed(&p, c2), "a second close report is harmless");
        assert_eq!(t.len(), 0);
    }
}
