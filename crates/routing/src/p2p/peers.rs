//! The one table of connected peers: their connections, the addresses they
//! announced, and which address this node uses to reach their registry.

use std::collections::{HashMap, HashSet};
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
    /// Remote addresses of the open connections, and whether this node
    /// dialled them.
    connections: HashMap<ConnectionId, (Multiaddr, bool)>,
    /// Addresses the peer announced through identify.
    announced: Vec<Multiaddr>,
    since: SystemTime,
}

#[derive(Default)]
pub(super) struct PeerTable {
    peers: HashMap<PeerId, PeerState>,
}

/// The IP address of a multiaddr, if it has one, in canonical form (an
/// IPv4-mapped IPv6 address is the IPv4 address it maps).
pub(super) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip).to_canonical()),
        _ => None,
    })
}

/// Addresses that can name another node: unicast, and not loopback,
/// link-local or unspecified (IPv4-mapped addresses are judged as the IPv4
/// address they map, so `::ffff:127.0.0.1` is loopback).
pub fn routable(ip: &IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            !v4.is_loopback()
                && !v4.is_link_local()
                && !v4.is_unspecified()
                && !v4.is_multicast()
                && !v4.is_broadcast()
                && v4.octets()[0] != 0
        }
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// Whether an address a peer announced is worth dialling: routable and not
/// one of this node's own (a bridge such as docker0's `172.17.0.1` is the
/// same on every host: dialling it reaches this host, not the peer), or
/// loopback when the peer is reached over loopback (nodes sharing a host).
pub(super) fn dialable(ip: &IpAddr, own: &HashSet<IpAddr>, over_loopback: bool) -> bool {
    let ip = ip.to_canonical();
    if own.contains(&ip) {
        return over_loopback && ip.is_loopback();
    }
    routable(&ip) || (over_loopback && ip.is_loopback())
}

impl PeerTable {
    /// Records a new connection (`outbound`: this node dialled it); `true`
    /// when it is the peer's first.
    pub(super) fn connected(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        remote: Multiaddr,
        outbound: bool,
    ) -> bool {
        let state = self.peers.entry(peer).or_insert_with(|| PeerState {
            connections: HashMap::new(),
            announced: Vec::new(),
            since: SystemTime::now(),
        });
        state.connections.insert(id, (remote, outbound));
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

    /// Records what a connected peer announced (shown on the debug page;
    /// never used as an endpoint or for admission).
    pub(super) fn announced(&mut self, peer: &PeerId, addrs: Vec<Multiaddr>) {
        if let Some(state) = self.peers.get_mut(peer) {
            state.announced = addrs;
        }
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
                .filter_map(|(a, _)| ip_of(a))
                .any(|ip| ip.is_loopback())
        })
    }

    /// The registry IP of a connected peer: the address of one of this
    /// node's connections to it — never one the peer merely announced
    /// (identities are free, and an announced address could be anyone's,
    /// or this host's own bridge). A connection this node dialled is
    /// preferred: over it the peer sees, and admits, the very source this
    /// node's request will come from, even on a multi-homed node; the
    /// source address of a connection the peer opened comes next. Addresses
    /// of this node's own are skipped (nodes sharing a host reach each
    /// other from 127.0.0.1). `None` when no connection offers one: the
    /// caller dials the peer.
    pub(super) fn endpoint_ip(&self, peer: &PeerId, own: &HashSet<IpAddr>) -> Option<IpAddr> {
        let state = self.peers.get(peer)?;
        let mut candidates: Vec<(bool, IpAddr)> = state
            .connections
            .values()
            .filter_map(|(a, outbound)| ip_of(a).map(|ip| (*outbound, ip)))
            .filter(|(_, ip)| !own.contains(ip))
            .collect();
        // Routable before loopback; among those, dialled before accepted.
        candidates.sort_by_key(|(outbound, ip)| (!routable(ip), !outbound, *ip));
        candidates
            .iter()
            .find(|(_, ip)| routable(ip) || ip.is_loopback())
            .map(|(_, ip)| *ip)
    }

    pub(super) fn infos(&self, own: &HashSet<IpAddr>) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .peers
            .iter()
            .map(|(id, state)| {
                let mut connection_ips: Vec<IpAddr> = state
                    .connections
                    .values()
                    .filter_map(|(a, _)| ip_of(a))
                    .collect();
                connection_ips.sort();
                connection_ips.dedup();
                PeerInfo {
                    id: *id,
                    connection_ips,
                    endpoint: self.endpoint_ip(id, own),
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
            ("0.1.2.3", false),
            ("224.0.0.1", false),
            ("255.255.255.255", false),
            ("fd00::1", true),
            ("::1", false),
            ("fe80::1", false),
            ("::", false),
            ("ff02::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:169.254.169.254", false),
            ("::ffff:10.0.0.1", true),
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(routable(&ip), want, "{ip}");
        }
        assert_eq!(
            ip_of(&addr("/ip6/::ffff:10.0.0.1/tcp/1")),
            Some("10.0.0.1".parse().expect("ip"))
        );
    }

    #[test]
    fn own_addresses_are_never_dialled() {
        let own: HashSet<IpAddr> = ["172.17.0.1", "10.0.0.5", "127.0.0.1"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(
            !dialable(&ip("172.17.0.1"), &own, false),
            "docker0 is everywhere"
        );
        assert!(!dialable(&ip("::ffff:172.17.0.1"), &own, false));
        assert!(dialable(&ip("10.0.0.6"), &own, false));
        assert!(!dialable(&ip("127.0.0.2"), &own, false));
        assert!(dialable(&ip("127.0.0.2"), &own, true));
        assert!(
            dialable(&ip("127.0.0.1"), &own, true),
            "nodes sharing a host"
        );
    }

    #[test]
    fn the_endpoint_is_a_connection_address_never_an_announced_one() {
        let mut t = PeerTable::default();
        let own: HashSet<IpAddr> = ["127.0.0.1".parse().expect("ip")].into();
        let p = PeerId::random();
        let c = |n| ConnectionId::new_unchecked(n);
        // From a host sharing ours: its connection comes from 127.0.0.1,
        // our own address, which is no endpoint.
        assert!(t.connected(p, c(1), addr("/ip4/127.0.0.1/tcp/5"), false));
        assert_eq!(t.endpoint_ip(&p, &own), None);
        assert!(t.over_loopback(&p));
        // An address we dialled it at is.
        assert!(!t.connected(p, c(2), addr("/ip4/127.0.0.7/tcp/6"), true));
        assert_eq!(
            t.endpoint_ip(&p, &own),
            Some("127.0.0.7".parse().expect("ip"))
        );
        // The source of a connection it opened, when routable, beats loopback;
        // one we dialled beats that.
        assert!(!t.connected(p, c(3), addr("/ip4/10.0.0.3/tcp/50123"), false));
        assert_eq!(
            t.endpoint_ip(&p, &own),
            Some("10.0.0.3".parse().expect("ip"))
        );
        assert!(!t.connected(p, c(4), addr("/ip4/10.0.0.2/tcp/6"), true));
        assert_eq!(
            t.endpoint_ip(&p, &own),
            Some("10.0.0.2".parse().expect("ip"))
        );
        // What the peer announces (a bridge address, a metadata service)
        // changes nothing.
        t.announced(
            &p,
            vec![
                addr("/ip4/172.17.0.1/tcp/1"),
                addr("/ip4/169.254.169.254/tcp/1"),
                addr("/ip4/10.0.0.9/tcp/1"),
            ],
        );
        assert_eq!(
            t.endpoint_ip(&p, &own),
            Some("10.0.0.2".parse().expect("ip"))
        );
        assert_eq!(t.infos(&own)[0].connection_ips.len(), 4);
        for n in [4, 3, 2] {
            assert!(!t.closed(&p, c(n)));
        }
        assert!(t.closed(&p, c(1)));
        assert!(!t.is_connected(&p));
        assert_eq!(t.endpoint_ip(&p, &own), None);
        assert!(!t.closed(&p, c(2)), "a second close report is harmless");
        assert_eq!(t.len(), 0);
    }
}
