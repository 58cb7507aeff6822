//! The admission policy: who may reach the registry port, decided from the
//! P2P events and enforced by the dataplane.
//!
//! - A peer that completed a libp2p handshake proved the preshared key: the
//!   remote address of each of its connections is admitted — only those.
//!   What a peer announces is never admitted (identities are free, and an
//!   announced address could be anyone's); a node fetches from a peer at
//!   the address of its connection to it, and its request comes from the
//!   address the peer sees on that connection.
//! - When a peer's last connection closes, its addresses that no other
//!   connected peer uses are revoked once the admission TTL has passed
//!   without a new connection (libp2p closes idle connections; a peer
//!   fetching from us keeps its admission through that).
//! - This node's own interface addresses are admitted as they change.
//!
//! - Admissions are bounded: at most [`MAX_ADDRESSES_PER_PEER`] per peer (a
//!   peer cycling source addresses, as a host with an IPv6 /64 can, replaces
//!   its oldest), and at most [`MAX_ADMITTED`] in all, below what the
//!   kernel's map holds. When full, the oldest address of a disconnected
//!   peer goes first, then the oldest of the peer with the most addresses:
//!   a flood of addresses never keeps a new peer out.
//!
//! Events and the periodic upkeep are handled by one task, in order, so a
//! revocation can never undo an admission made after it was decided.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Dataplane, DataplaneError};
use peermirror_metrics::{BoundaryDrops, PeerTraffic, TrafficSource};
use peermirror_routing::p2p::PeerEvent;

/// Most addresses admitted for one peer at once.
pub const MAX_ADDRESSES_PER_PEER: usize = 8;
/// Most peer addresses admitted at once: the kernel's map (`pm_admitted`)
/// holds 16,384, and this node's own addresses are kept there too.
pub const MAX_ADMITTED: usize = 16_384 - 1_024;

/// How often own addresses and expired admissions are looked at.
const UPKEEP: Duration = Duration::from_secs(5);
/// Counters of addresses not seen for this long are removed (and their
/// metric series with them).
const PEER_COUNTERS_STALE: Duration = Duration::from_secs(3600);

/// What the policy drives: the dataplane, or a recording twin in tests.
pub trait Boundary: Send + Sync + 'static {
    fn admit(&self, ip: IpAddr) -> Result<(), DataplaneError>;
    fn revoke(&self, ip: IpAddr) -> Result<(), DataplaneError>;
    /// Replaces the admitted own addresses `previous` with `now`.
    fn set_own_addresses(
        &self,
        previous: &HashSet<IpAddr>,
        now: &HashSet<IpAddr>,
    ) -> Result<(), DataplaneError>;
    /// Every admitted address with when it was admitted (monotonic ns).
    fn admissions(&self) -> Vec<(IpAddr, u64)>;
    /// Per-peer counters and drops, for metrics.
    fn traffic(&self) -> (Vec<super::PeerCounter>, super::Drops);
    /// Ages out counters of addresses long gone.
    fn forget_stale(&self, stale: Duration);
}

impl Boundary for Dataplane {
    fn admit(&self, ip: IpAddr) -> Result<(), DataplaneError> {
        Dataplane::admit(self, ip)
    }
    fn revoke(&self, ip: IpAddr) -> Result<(), DataplaneError> {
        Dataplane::revoke(self, ip)
    }
    fn set_own_addresses(
        &self,
        previous: &HashSet<IpAddr>,
        now: &HashSet<IpAddr>,
    ) -> Result<(), DataplaneError> {
        Dataplane::set_own_addresses(self, previous, now)
    }
    fn admissions(&self) -> Vec<(IpAddr, u64)> {
        Dataplane::admissions(self).unwrap_or_default()
    }
    fn traffic(&self) -> (Vec<super::PeerCounter>, super::Drops) {
        (
            self.counters().unwrap_or_default(),
            self.drops().unwrap_or_default(),
        )
    }
    fn forget_stale(&self, stale: Duration) {
        if let Err(e) = Dataplane::forget_stale(self, stale) {
            tracing::debug!(error = %e, "cannot age out peer counters");
        }
    }
}

#[derive(Default)]
struct State {
    /// Connected peers and the addresses admitted for each.
    peers: HashMap<PeerId, BTreeSet<IpAddr>>,
    /// Addresses whose last peer disconnected, and since when.
    disconnected: HashMap<IpAddr, Instant>,
    /// Every admitted peer address (of both maps above), and when it was
    /// last admitted: what is evicted first.
    since: HashMap<IpAddr, Instant>,
    own: HashSet<IpAddr>,
}

impl State {
    fn used_by_another(&self, ip: &IpAddr, peer: &PeerId) -> bool {
        self.peers
            .iter()
            .any(|(other, ips)| other != peer && ips.contains(ip))
    }

    fn oldest<'a>(&self, ips: impl Iterator<Item = &'a IpAddr>) -> Option<IpAddr> {
        ips.min_by_key(|ip| self.since.get(ip).copied()).copied()
    }

    /// Takes `ip` from `peer`; `Some(ip)` when no peer holds it any more
    /// (then it is to be revoked).
    fn take_from(&mut self, peer: &PeerId, ip: IpAddr) -> Option<IpAddr> {
        if let Some(ips) = self.peers.get_mut(peer) {
            ips.remove(&ip);
        }
        if self.used_by_another(&ip, peer) {
            return None;
        }
        self.since.remove(&ip);
        Some(ip)
    }

    /// Makes room for one more address when all are taken: the oldest
    /// address of a disconnected peer, else the oldest of the peer with
    /// the most addresses, never `keep` (the one just admitted). The
    /// address to revoke (`None` when it is still another peer's); `Err`
    /// when nothing can go.
    fn evict_one(&mut self, keep: IpAddr) -> Result<Option<IpAddr>, ()> {
        if let Some(ip) = self.oldest(self.disconnected.keys()) {
            self.disconnected.remove(&ip);
            self.since.remove(&ip);
            return Ok(Some(ip));
        }
        let (peer, ips) = self
            .peers
            .iter()
            .filter(|(_, ips)| ips.iter().any(|ip| *ip != keep))
            .max_by_key(|(_, ips)| ips.len())
            .ok_or(())?;
        let peer = *peer;
        let ip = self
            .oldest(ips.iter().filter(|ip| **ip != keep))
            .ok_or(())?;
        Ok(self.take_from(&peer, ip))
    }
}

/// How many addresses the policy admits (see [`MAX_ADMITTED`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_peer: usize,
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_peer: MAX_ADDRESSES_PER_PEER,
            total: MAX_ADMITTED,
        }
    }
}

pub struct Admission {
    boundary: Arc<dyn Boundary>,
    ttl: Duration,
    limits: Limits,
    state: Mutex<State>,
}

impl Admission {
    pub fn new(boundary: Arc<dyn Boundary>, ttl: Duration) -> Arc<Admission> {
        Self::with_limits(boundary, ttl, Limits::default())
    }

    pub fn with_limits(
        boundary: Arc<dyn Boundary>,
        ttl: Duration,
        limits: Limits,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            boundary,
            ttl,
            limits: Limits {
                per_peer: limits.per_peer.max(1),
                total: limits.total.max(1),
            },
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The addresses admitted for each connected peer.
    pub fn admitted(&self) -> HashMap<PeerId, BTreeSet<IpAddr>> {
        self.lock().peers.clone()
    }

    /// This node's own addresses, as the upkeep last listed them.
    pub fn own_addresses(&self) -> HashSet<IpAddr> {
        self.lock().own.clone()
    }

    fn admit(&self, ips: &[IpAddr]) {
        for ip in ips {
            if let Err(e) = self.boundary.admit(*ip) {
                tracing::warn!(%ip, error = %e, "cannot admit a peer to the registry port");
            }
        }
    }

    /// Applies one P2P event.
    pub fn handle(&self, event: PeerEvent) {
        let mut state = self.lock();
        match event {
            PeerEvent::Connected { peer, ip } => {
                let fresh = state.peers.entry(peer).or_default().insert(ip);
                state.disconnected.remove(&ip);
                state.since.insert(ip, Instant::now());
                let mut revoke = Vec::new();
                let held = state.peers.get(&peer).map_or(0, BTreeSet::len);
                if fresh && held > self.limits.per_peer {
                    let others = state.peers[&peer].iter().filter(|i| **i != ip);
                    if let Some(oldest) = state.oldest(others) {
                        revoke.extend(state.take_from(&peer, oldest));
                    }
                }
                while state.since.len() > self.limits.total {
                    match state.evict_one(ip) {
                        Ok(evicted) => revoke.extend(evicted),
                        Err(()) => break,
                    }
                }
                drop(state);
                if !revoke.is_empty() {
                    tracing::debug!(%peer, ?revoke, "admissions full: revoking the oldest addresses");
                }
                self.admit(&[ip]);
                for ip in revoke {
                    if let Err(e) = self.boundary.revoke(ip) {
                        tracing::warn!(%ip, error = %e, "cannot revoke an admission");
                    }
                }
            }
            PeerEvent::Disconnected { peer } => {
                let Some(admitted) = state.peers.remove(&peer) else {
                    return;
                };
                let still_used: BTreeSet<IpAddr> =
                    state.peers.values().flatten().copied().collect();
                let now = Instant::now();
                for ip in admitted.difference(&still_used) {
                    state.disconnected.insert(*ip, now);
                }
            }
        }
    }

    /// Admits this node's addresses as they change, revokes addresses whose
    /// admission ran out, and ages out counters of long-gone addresses.
    pub fn upkeep(&self, own_now: HashSet<IpAddr>) {
        let now = Instant::now();
        let expired: Vec<IpAddr> = {
            let mut state = self.lock();
            if own_now != state.own {
                match self.boundary.set_own_addresses(&state.own, &own_now) {
                    Ok(()) => state.own = own_now,
                    Err(e) => tracing::warn!(error = %e, "cannot admit this node's addresses"),
                }
            }
            let ttl = self.ttl;
            let expired: Vec<IpAddr> = state
                .disconnected
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= ttl)
                .map(|(ip, _)| *ip)
                .collect();
            for ip in &expired {
                state.disconnected.remove(ip);
                state.since.remove(ip);
            }
            // Admissions the policy does not know of (left by an earlier
            // run, or by anyone else writing the map) expire by their
            // stored time.
            let known: HashSet<IpAddr> = state
                .peers
                .values()
                .flatten()
                .chain(state.disconnected.keys())
                .copied()
                .collect();
            let now_ns = super::monotonic_ns();
            let ttl_ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
            let mut expired = expired;
            expired.extend(
                self.boundary
                    .admissions()
                    .into_iter()
                    .filter(|(ip, at)| !known.contains(ip) && now_ns.saturating_sub(*at) >= ttl_ns)
                    .map(|(ip, _)| ip),
            );
            expired
        };
        for ip in expired {
            match self.boundary.revoke(ip) {
                Ok(()) => tracing::debug!(%ip, "admission expired"),
                Err(e) => tracing::warn!(%ip, error = %e, "cannot revoke an admission"),
            }
        }
        self.boundary.forget_stale(PEER_COUNTERS_STALE);
    }

    /// Handles P2P events and the upkeep until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), AdmissionError> {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                event = events.recv() => match event {
                    Some(e) => self.handle(e),
                    None => return Err(AdmissionError::RouterStopped),
                },
                _ = tick.tick() => self.upkeep(super::interface_addresses()),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("the P2P router stopped sending peer events")]
    RouterStopped,
}

impl TrafficSource for Admission {
    fn traffic(&self) -> (Vec<PeerTraffic>, BoundaryDrops) {
        let ids: HashMap<IpAddr, String> = self
            .lock()
            .peers
            .iter()
            .flat_map(|(id, ips)| ips.iter().map(move |ip| (*ip, id.to_string())))
            .collect();
        let (counters, drops) = self.boundary.traffic();
        let traffic = counters
            .into_iter()
            .map(|c| PeerTraffic {
                addr: c.addr,
                peer_id: ids.get(&c.addr).cloned(),
                inbound: c.inbound,
                registry: c.registry,
                bytes: c.bytes,
                packets: c.packets,
            })
            .collect();
        (
            traffic,
            BoundaryDrops {
                registry_not_admitted: drops.registry_not_admitted,
                p2p_not_allowed: drops.p2p_not_allowed,
                unparseable: drops.unparseable,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the policy asked of the kernel.
    #[derive(Default)]
    struct Recorded {
        admitted: Mutex<BTreeSet<IpAddr>>,
        own: Mutex<HashSet<IpAddr>>,
        /// Admitted long ago, by someone the policy does not know.
        stale: Mutex<HashSet<IpAddr>>,
    }

    impl Boundary for Recorded {
        fn admit(&self, ip: IpAddr) -> Result<(), DataplaneError> {
            self.admitted.lock().expect("lock").insert(ip);
            Ok(())
        }
        fn revoke(&self, ip: IpAddr) -> Result<(), DataplaneError> {
            self.admitted.lock().expect("lock").remove(&ip);
            Ok(())
        }
        fn set_own_addresses(
            &self,
            _: &HashSet<IpAddr>,
            now: &HashSet<IpAddr>,
        ) -> Result<(), DataplaneError> {
            *self.own.lock().expect("lock") = now.clone();
            Ok(())
        }
        fn admissions(&self) -> Vec<(IpAddr, u64)> {
            let stale = self.stale.lock().expect("lock").clone();
            self.admitted
                .lock()
                .expect("lock")
                .iter()
                .map(|ip| {
                    (
                        *ip,
                        if stale.contains(ip) {
                            0
                        } else {
                            super::super::monotonic_ns()
                        },
                    )
                })
                .collect()
        }
        fn traffic(&self) -> (Vec<super::super::PeerCounter>, super::super::Drops) {
            (Vec::new(), Default::default())
        }
        fn forget_stale(&self, _: Duration) {}
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn setup() -> (Arc<Recorded>, Arc<Admission>) {
        let recorded = Arc::new(Recorded::default());
        let admission = Admission::new(recorded.clone(), Duration::from_secs(600));
        (recorded, admission)
    }

    fn admitted(r: &Recorded) -> BTreeSet<IpAddr> {
        r.admitted.lock().expect("lock").clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_is_admitted_on_every_connection_address_and_revoked_on_all_of_them() {
        let (r, adm) = setup();
        let a = PeerId::random();
        let b = PeerId::random();
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("10.0.0.1"),
        });
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("10.0.1.1"),
        });
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("fd00::1"),
        });
        adm.handle(PeerEvent::Connected {
            peer: b,
            ip: ip("10.0.0.2"),
        });
        adm.handle(PeerEvent::Connected {
            peer: b,
            ip: ip("fd00::1"),
        });
        assert_eq!(
            adm.admitted()[&a],
            [ip("10.0.0.1"), ip("10.0.1.1"), ip("fd00::1")].into()
        );
        // A leaves: its addresses stay admitted for the TTL...
        adm.handle(PeerEvent::Disconnected { peer: a });
        tokio::time::advance(Duration::from_secs(599)).await;
        adm.upkeep(HashSet::new());
        assert_eq!(admitted(&r).len(), 4);
        // ... then all but the one B still holds go.
        tokio::time::advance(Duration::from_secs(2)).await;
        adm.upkeep(HashSet::new());
        assert_eq!(admitted(&r), [ip("10.0.0.2"), ip("fd00::1")].into());
        // A comes back on one of them and leaves again; B leaves.
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("10.0.1.1"),
        });
        adm.handle(PeerEvent::Disconnected { peer: b });
        // A second disconnect report for a peer already gone is harmless.
        adm.handle(PeerEvent::Disconnected { peer: b });
        tokio::time::advance(Duration::from_secs(601)).await;
        adm.upkeep(HashSet::new());
        assert_eq!(admitted(&r), [ip("10.0.1.1")].into());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_before_the_ttl_keeps_the_admission() {
        let (r, adm) = setup();
        let a = PeerId::random();
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("10.0.0.1"),
        });
        adm.handle(PeerEvent::Disconnected { peer: a });
        tokio::time::advance(Duration::from_secs(500)).await;
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("10.0.0.1"),
        });
        tokio::time::advance(Duration::from_secs(500)).await;
        adm.upkeep(HashSet::new());
        assert_eq!(admitted(&r), [ip("10.0.0.1")].into());
    }

    /// The race the old upkeep had: the TTL has run out, a fresh connection
    /// comes in, and only then is the upkeep's turn. Events and upkeep are
    /// handled in order, so the fresh admission stands.
    #[tokio::test(start_paused = true)]
    async fn a_revocation_never_undoes_a_fresh_admission() {
        let (r, adm) = setup();
        let a = PeerId::random();
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("10.0.0.1"),
        });
        adm.handle(PeerEvent::Disconnected { peer: a });
        tokio::time::advance(Duration::from_secs(700)).await;
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("10.0.0.1"),
        });
        adm.upkeep(HashSet::new());
        assert_eq!(admitted(&r), [ip("10.0.0.1")].into());
    }

    #[test]
    fn admissions_nobody_knows_expire_by_their_time() {
        let (r, adm) = setup();
        let a = PeerId::random();
        adm.handle(PeerEvent::Connected {
            peer: a,
            ip: ip("10.0.0.1"),
        });
        // Left in the map by an earlier run: one old, one just made.
        r.admitted
            .lock()
            .expect("lock")
            .extend([ip("10.9.9.9"), ip("10.8.8.8")]);
        r.stale.lock().expect("lock").insert(ip("10.9.9.9"));
        adm.upkeep(HashSet::new());
        assert_eq!(admitted(&r), [ip("10.0.0.1"), ip("10.8.8.8")].into());
    }

    fn v6(i: u32) -> IpAddr {
        IpAddr::V6(std::net::Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            (i >> 16) as u16,
            i as u16,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_cycling_source_addresses_keeps_only_its_newest() {
        let (r, adm) = setup();
        let (honest, keyed) = (PeerId::random(), PeerId::random());
        adm.handle(PeerEvent::Connected {
            peer: honest,
            ip: ip("10.0.0.1"),
        });
        for i in 0..10_000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            adm.handle(PeerEvent::Connected {
                peer: keyed,
                ip: v6(i),
            });
        }
        let newest: BTreeSet<IpAddr> = (10_000 - MAX_ADDRESSES_PER_PEER as u32..10_000)
            .map(v6)
            .chain([ip("10.0.0.1")])
            .collect();
        assert_eq!(admitted(&r), newest);
        assert_eq!(adm.admitted()[&keyed].len(), MAX_ADDRESSES_PER_PEER);
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_the_disconnected_go_first_then_the_peer_with_the_most() {
        let recorded = Arc::new(Recorded::default());
        let limits = Limits {
            per_peer: 4,
            total: 6,
        };
        let adm = Admission::with_limits(recorded.clone(), Duration::from_secs(600), limits);
        let r = &recorded;
        let (gone, many, one, new) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let connect = |peer, i| {
            adm.handle(PeerEvent::Connected { peer, ip: v6(i) });
        };
        connect(gone, 1);
        adm.handle(PeerEvent::Disconnected { peer: gone });
        tokio::time::advance(Duration::from_secs(1)).await;
        connect(one, 2);
        for i in 10..14 {
            tokio::time::advance(Duration::from_secs(1)).await;
            connect(many, i);
        }
        assert_eq!(admitted(r).len(), 6);
        // Full: a new peer's address replaces the disconnected one...
        connect(new, 20);
        assert!(!admitted(r).contains(&v6(1)));
        assert!(admitted(r).contains(&v6(20)));
        // ... then the oldest of the peer with the most addresses.
        tokio::time::advance(Duration::from_secs(1)).await;
        connect(new, 21);
        assert_eq!(
            admitted(r),
            [v6(2), v6(11), v6(12), v6(13), v6(20), v6(21)].into()
        );
    }

    #[test]
    fn own_addresses_follow_the_interfaces() {
        let (r, adm) = setup();
        adm.upkeep([ip("10.0.0.5")].into());
        assert_eq!(*r.own.lock().expect("lock"), [ip("10.0.0.5")].into());
        adm.upkeep([ip("10.0.0.6")].into());
        assert_eq!(*r.own.lock().expect("lock"), [ip("10.0.0.6")].into());
    }
}
