//! Provider lookups.
//!
//! - Single flight: lookups of a key while one runs (or waits) join it.
//! - At most [`MAX_RUNNING`] Kademlia queries run at once; up to
//!   [`MAX_QUEUED`] keys wait behind them; a lookup beyond that is counted
//!   and answered as a miss at once, so that a flood of lookups for random
//!   digests costs a bounded amount of work and never a growing queue.
//! - A lookup stops as soon as nobody waits for it any more (the mirror
//!   gives up after its resolve timeout): a flood's queries do not outlive
//!   the requests that caused them.
//! - Answers are reused for the lookup cache TTL; a lookup that found
//!   nobody is remembered for [`NEGATIVE_TTL`], and forgotten at once when
//!   a provider record for the key arrives here.
//! - A provider is reported only once this node holds a connection to it
//!   (dialled if needed): its registry endpoint is then known and, with the
//!   dataplane, the provider has admitted this node before the HTTP request
//!   arrives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use libp2p::kad::{QueryId, RecordKey};
use libp2p::swarm::Swarm;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

use super::behaviour::Behaviour;
use super::peers::PeerTable;
use crate::{Peer, record_key};

/// Kademlia provider queries running at once.
pub(super) const MAX_RUNNING: usize = 64;
/// Keys waiting for a query slot.
pub(super) const MAX_QUEUED: usize = 512;
/// How long "nobody has it" is reused.
pub(super) const NEGATIVE_TTL: Duration = Duration::from_millis(500);

/// What the lookups need from the rest of the event loop.
pub(super) struct Net<'a> {
    pub swarm: &'a mut Swarm<Behaviour>,
    pub peers: &'a PeerTable,
    pub own_ips: &'a HashSet<IpAddr>,
    pub registry_port: u16,
}

struct Query {
    key: RecordKey,
    subscribers: Vec<mpsc::Sender<Peer>>,
    found: Vec<Peer>,
    reported: HashSet<PeerId>,
    /// Providers being dialled before they can be reported.
    dialing: HashSet<PeerId>,
    kad_done: bool,
}

pub(super) struct Lookups {
    cache_ttl: Duration,
    running: HashMap<QueryId, Query>,
    running_by_key: HashMap<RecordKey, QueryId>,
    queued: VecDeque<RecordKey>,
    queued_subscribers: HashMap<RecordKey, Vec<mpsc::Sender<Peer>>>,
    dial_waiters: HashMap<PeerId, Vec<QueryId>>,
    cache: HashMap<RecordKey, (Instant, Vec<Peer>)>,
    negative: HashMap<RecordKey, Instant>,
    /// One future per subscriber: resolves with the key when it goes away.
    gone: FuturesUnordered<BoxFuture<'static, RecordKey>>,
    dropped: Counter,
}

impl Lookups {
    pub(super) fn new(cache_ttl: Duration, dropped: Counter) -> Lookups {
        Lookups {
            cache_ttl,
            running: HashMap::new(),
            running_by_key: HashMap::new(),
            queued: VecDeque::new(),
            queued_subscribers: HashMap::new(),
            dial_waiters: HashMap::new(),
            cache: HashMap::new(),
            negative: HashMap::new(),
            gone: FuturesUnordered::new(),
            dropped,
        }
    }

    /// Whether `query` is one of ours.
    pub(super) fn owns(&self, query: &QueryId) -> bool {
        self.running.contains_key(query)
    }

    /// A new lookup of `name`; providers go to `reply`, and `gone` resolves
    /// when the asker stops listening. A `fresh` lookup skips both caches
    /// (it may still join a query under way: that one is fresh too).
    pub(super) fn submit(
        &mut self,
        net: Net<'_>,
        name: &str,
        fresh: bool,
        reply: mpsc::Sender<Peer>,
        gone: oneshot::Receiver<()>,
    ) {
        if reply.is_closed() {
            return; // the asker left while the command waited
        }
        let key = RecordKey::new(&record_key(name));
        let now = Instant::now();
        if !fresh
            && let Some((at, peers)) = self.cache.get(&key)
            && now.duration_since(*at) < self.cache_ttl
        {
            for p in peers {
                let _ = reply.try_send(p.clone());
            }
            return;
        }
        if !fresh
            && self
                .negative
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < NEGATIVE_TTL)
        {
            return;
        }
        if let Some(query) = self.running_by_key.get(&key) {
            if let Some(q) = self.running.get_mut(query) {
                for p in &q.found {
                    let _ = reply.try_send(p.clone());
                }
                q.subscribers.push(reply);
                self.watch(key, gone);
            }
            return;
        }
        if let Some(subscribers) = self.queued_subscribers.get_mut(&key) {
            subscribers.push(reply);
            self.watch(key, gone);
            return;
        }
        let mut net = net;
        if self.running.len() >= MAX_RUNNING && self.queued.len() >= MAX_QUEUED {
            // Askers that left may not have been noticed yet (their `gone`
            // waits its turn in the loop): their room goes first.
            self.drop_abandoned(&mut net);
        }
        if self.running.len() < MAX_RUNNING {
            self.watch(key.clone(), gone);
            self.start(net, key, vec![reply]);
        } else if self.queued.len() < MAX_QUEUED {
            self.watch(key.clone(), gone);
            self.queued.push_back(key.clone());
            self.queued_subscribers.insert(key, vec![reply]);
        } else {
            // Dropping `reply` ends the asker's stream: a miss, at once.
            self.dropped.inc();
        }
    }

    /// Ends the lookups and forgets the waiting keys that nobody listens
    /// to any more.
    fn drop_abandoned(&mut self, net: &mut Net<'_>) {
        self.queued_subscribers.retain(|_, subscribers| {
            subscribers.retain(|s| !s.is_closed());
            !subscribers.is_empty()
        });
        let waiting = &self.queued_subscribers;
        self.queued.retain(|k| waiting.contains_key(k));
        let abandoned: Vec<QueryId> = self
            .running
            .iter_mut()
            .filter_map(|(id, q)| {
                q.subscribers.retain(|s| !s.is_closed());
                q.subscribers.is_empty().then_some(*id)
            })
            .collect();
        for query in abandoned {
            self.end(net, query, false);
        }
    }

    fn watch(&mut self, key: RecordKey, gone: oneshot::Receiver<()>) {
        self.gone.push(Box::pin(async move {
            let _ = gone.await;
            key
        }));
    }

    /// The next key one of whose askers went away.
    pub(super) async fn next_gone(&mut self) -> Option<RecordKey> {
        use futures::StreamExt;
        if self.gone.is_empty() {
            return std::future::pending().await;
        }
        self.gone.next().await
    }

    fn start(&mut self, net: Net<'_>, key: RecordKey, subscribers: Vec<mpsc::Sender<Peer>>) {
        let id = net.swarm.behaviour_mut().kad.get_providers(key.clone());
        self.running_by_key.insert(key.clone(), id);
        self.running.insert(
            id,
            Query {
                key,
                subscribers,
                found: Vec::new(),
                reported: HashSet::new(),
                dialing: HashSet::new(),
                kad_done: false,
            },
        );
    }

    /// Kademlia found `providers` for `query`.
    pub(super) fn providers(&mut self, mut net: Net<'_>, query: QueryId, providers: Vec<PeerId>) {
        for p in providers {
            self.offer(&mut net, query, p);
        }
    }

    /// Kademlia's part of `query` is over.
    pub(super) fn query_done(&mut self, mut net: Net<'_>, query: QueryId) {
        if let Some(q) = self.running.get_mut(&query) {
            q.kad_done = true;
        }
        self.maybe_end(&mut net, query);
    }

    /// A connection to `peer` is up: lookups waiting for it can report it.
    pub(super) fn connected(&mut self, mut net: Net<'_>, peer: PeerId) {
        for q in self.dial_waiters.remove(&peer).unwrap_or_default() {
            self.offer(&mut net, q, peer);
            self.maybe_end(&mut net, q);
        }
    }

    /// Dialling `peer` failed: it is not reported.
    pub(super) fn dial_failed(&mut self, mut net: Net<'_>, peer: PeerId) {
        self.dial_failed_inner(&mut net, peer);
    }

    fn dial_failed_inner(&mut self, net: &mut Net<'_>, peer: PeerId) {
        for q in self.dial_waiters.remove(&peer).unwrap_or_default() {
            if let Some(l) = self.running.get_mut(&q) {
                l.dialing.remove(&peer);
            }
            self.maybe_end(net, q);
        }
    }

    /// An asker of `key` went away: the lookup stops when none is left.
    pub(super) fn asker_gone(&mut self, mut net: Net<'_>, key: RecordKey) {
        if let Some(query) = self.running_by_key.get(&key).copied()
            && let Some(q) = self.running.get_mut(&query)
        {
            q.subscribers.retain(|s| !s.is_closed());
            if q.subscribers.is_empty() {
                self.end(&mut net, query, false);
            }
            return;
        }
        if let Some(subscribers) = self.queued_subscribers.get_mut(&key) {
            subscribers.retain(|s| !s.is_closed());
            if subscribers.is_empty() {
                self.queued_subscribers.remove(&key);
                self.queued.retain(|k| k != &key);
            }
        }
    }

    /// A provider record for `key` was stored here: "nobody has it" no
    /// longer holds.
    pub(super) fn invalidate(&mut self, key: &RecordKey) {
        self.negative.remove(key);
    }

    pub(super) fn housekeeping(&mut self, now: Instant) {
        let ttl = self.cache_ttl;
        self.cache
            .retain(|_, (at, _)| now.duration_since(*at) < ttl);
        self.negative
            .retain(|_, at| now.duration_since(*at) < NEGATIVE_TTL);
    }

    /// Reports `provider` to a lookup if it can be reached; dials it first
    /// when it is not connected.
    fn offer(&mut self, net: &mut Net<'_>, query: QueryId, provider: PeerId) {
        if &provider == net.swarm.local_peer_id() {
            return;
        }
        let Some(q) = self.running.get_mut(&query) else {
            return;
        };
        if q.reported.contains(&provider) {
            return;
        }
        let Some(ip) = net.peers.endpoint_ip(&provider, net.own_ips) else {
            // Not connected, or no connection offers an endpoint (see
            // `PeerTable::endpoint_ip`): dial it; the connection answers.
            if !q.dialing.insert(provider) {
                return;
            }
            self.dial_waiters.entry(provider).or_default().push(query);
            let condition = if net.peers.is_connected(&provider) {
                PeerCondition::Always
            } else {
                PeerCondition::DisconnectedAndNotDialing
            };
            let opts = DialOpts::peer_id(provider).condition(condition).build();
            match net.swarm.dial(opts) {
                // Already being dialled: its outcome answers us.
                Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                Err(e) => {
                    tracing::debug!(%provider, error = %e, "cannot dial provider");
                    self.dial_failed_inner(net, provider);
                }
            }
            return;
        };
        q.dialing.remove(&provider);
        let peer = Peer {
            id: provider,
            addr: SocketAddr::new(ip, net.registry_port),
        };
        q.reported.insert(provider);
        q.found.push(peer.clone());
        q.subscribers.retain(|s| {
            !matches!(
                s.try_send(peer.clone()),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
        if q.subscribers.is_empty() {
            self.end(net, query, false);
        }
    }

    fn maybe_end(&mut self, net: &mut Net<'_>, query: QueryId) {
        if self
            .running
            .get(&query)
            .is_some_and(|q| q.kad_done && q.dialing.is_empty())
        {
            self.end(net, query, true);
        }
    }

    /// Ends a lookup: its askers' streams end, its answer is cached (a
    /// "nobody" only when the lookup ran to its end), and a waiting key takes
    /// its slot.
    fn end(&mut self, net: &mut Net<'_>, query: QueryId, complete: bool) {
        let Some(q) = self.running.remove(&query) else {
            return;
        };
        tracing::debug!(found = q.found.len(), complete, "lookup ended");
        self.running_by_key.remove(&q.key);
        if let Some(mut running) = net.swarm.behaviour_mut().kad.query_mut(&query) {
            running.finish();
        }
        let now = Instant::now();
        if !q.found.is_empty() {
            self.cache.insert(q.key, (now, q.found));
        } else if complete {
            self.negative.insert(q.key, now);
        }
        while self.running.len() < MAX_RUNNING {
            let Some(key) = self.queued.pop_front() else {
                break;
            };
            let mut subscribers = self.queued_subscribers.remove(&key).unwrap_or_default();
            subscribers.retain(|s| !s.is_closed());
            if !subscribers.is_empty() {
                self.start(
                    Net {
                        swarm: net.swarm,
                        peers: net.peers,
                        own_ips: net.own_ips,
                        registry_port: net.registry_port,
                    },
                    key,
                    subscribers,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net<'a>(
        swarm: &'a mut Swarm<Behaviour>,
        peers: &'a PeerTable,
        own: &'a HashSet<IpAddr>,
    ) -> Net<'a> {
        Net {
            swarm,
            peers,
            own_ips: own,
            registry_port: 5000,
        }
    }

    #[tokio::test]
    async fn lookups_beyond_the_queue_are_dropped_and_askers_leaving_stop_them() {
        let mut swarm = super::super::behaviour::test_swarm();
        let (peers, own) = (PeerTable::default(), HashSet::new());
        let dropped = Counter::default();
        let mut l = Lookups::new(Duration::from_secs(5), dropped.clone());
        let mut askers = Vec::new();
        let total = MAX_RUNNING + MAX_QUEUED + 50;
        for i in 0..total {
            let (tx, rx) = mpsc::channel(4);
            let (guard, gone) = oneshot::channel();
            l.submit(
                net(&mut swarm, &peers, &own),
                &format!("k{i}"),
                false,
                tx,
                gone,
            );
            askers.push((rx, guard));
        }
        assert_eq!((l.running.len(), l.queued.len()), (MAX_RUNNING, MAX_QUEUED));
        assert_eq!(dropped.get(), 50);
        // The dropped ones are answered at once: their streams are over.
        for (rx, _) in askers.iter_mut().rev().take(50) {
            assert!(rx.try_recv().is_err() && rx.is_closed());
        }
        // A second lookup of a running key joins it instead of queueing.
        let (tx, _rx) = mpsc::channel(4);
        let (_guard, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "k0", false, tx, gone);
        assert_eq!(l.running.len(), MAX_RUNNING);
        assert_eq!(
            l.running[&l.running_by_key[&RecordKey::new(&record_key("k0"))]]
                .subscribers
                .len(),
            2
        );
        // Every asker but the joined one leaves: running lookups stop, and
        // queued keys take their slots only while someone waits for them.
        askers.clear();
        for _ in 0..(total - 50 + 1) {
            let Some(key) = l.next_gone().await else {
                break;
            };
            l.asker_gone(net(&mut swarm, &peers, &own), key);
            if l.running.len() == 1 && l.queued.is_empty() {
                break;
            }
        }
        assert_eq!(
            l.running.len(),
            1,
            "only the lookup somebody waits for runs"
        );
        assert!(l.queued.is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_of_askers_that_left_makes_room_before_gone_is_seen() {
        let mut swarm = super::super::behaviour::test_swarm();
        let (peers, own) = (PeerTable::default(), HashSet::new());
        let dropped = Counter::default();
        let mut l = Lookups::new(Duration::from_secs(5), dropped.clone());
        let (mut guards, mut streams) = (Vec::new(), Vec::new());
        for i in 0..MAX_RUNNING + MAX_QUEUED {
            let (tx, rx) = mpsc::channel(4);
            let (guard, gone) = oneshot::channel();
            l.submit(
                net(&mut swarm, &peers, &own),
                &format!("k{i}"),
                false,
                tx,
                gone,
            );
            guards.push(guard);
            streams.push(rx);
        }
        assert_eq!((l.running.len(), l.queued.len()), (MAX_RUNNING, MAX_QUEUED));
        // Every asker's stream is dropped; their `gone` is not handled yet
        // (the loop has not got to it).
        drop(streams);
        let (tx, _rx) = mpsc::channel(4);
        let (_guard, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "real", false, tx, gone);
        assert_eq!(dropped.get(), 0, "the real lookup was dropped");
        assert_eq!((l.running.len(), l.queued.len()), (1, 0));
        assert!(
            l.running_by_key
                .contains_key(&RecordKey::new(&record_key("real")))
        );
    }

    #[tokio::test]
    async fn answers_are_cached_and_misses_briefly_remembered() {
        let mut swarm = super::super::behaviour::test_swarm();
        let (peers, own) = (PeerTable::default(), HashSet::new());
        let mut l = Lookups::new(Duration::from_secs(5), Counter::default());
        let (tx, mut rx) = mpsc::channel(4);
        let (_g, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "missing", false, tx, gone);
        let query = *l.running.keys().next().expect("running");
        l.query_done(net(&mut swarm, &peers, &own), query);
        assert!(rx.recv().await.is_none(), "a miss ends the stream");
        // Asked again at once: answered from the negative cache, no query.
        let (tx, mut rx) = mpsc::channel(4);
        let (_g, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "missing", false, tx, gone);
        assert!(l.running.is_empty());
        assert!(rx.recv().await.is_none());
        // A provider record arriving here makes it worth asking again.
        l.invalidate(&RecordKey::new(&record_key("missing")));
        let (tx, _rx) = mpsc::channel(4);
        let (_g, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "missing", false, tx, gone);
        assert_eq!(l.running.len(), 1);
        // The negative entry expires by itself.
        l.invalidate(&RecordKey::new(&record_key("x")));
        l.negative
            .insert(RecordKey::new(&record_key("old")), Instant::now());
        l.housekeeping(Instant::now() + NEGATIVE_TTL);
        assert!(l.negative.is_empty());
    }

    #[tokio::test]
    async fn a_fresh_lookup_asks_the_network_despite_the_caches() {
        let mut swarm = super::super::behaviour::test_swarm();
        let (peers, own) = (PeerTable::default(), HashSet::new());
        let mut l = Lookups::new(Duration::from_secs(5), Counter::default());
        // A miss, remembered.
        let (tx, _rx) = mpsc::channel(4);
        let (_g, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "k", false, tx, gone);
        let query = *l.running.keys().next().expect("running");
        l.query_done(net(&mut swarm, &peers, &own), query);
        assert!(l.running.is_empty());
        // A cached answer, too.
        let holder = Peer {
            id: PeerId::random(),
            addr: "127.0.0.1:5000".parse().expect("addr"),
        };
        let key = RecordKey::new(&record_key("k"));
        l.cache.insert(key.clone(), (Instant::now(), vec![holder]));
        // A plain lookup is answered from the cache, with no query.
        let (tx, mut rx) = mpsc::channel(4);
        let (_g, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "k", false, tx, gone);
        assert!(l.running.is_empty());
        assert!(rx.recv().await.is_some(), "the cached holder");
        // A fresh one starts a query, and a second fresh one joins it.
        let (tx, _rx1) = mpsc::channel(4);
        let (_g1, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "k", true, tx, gone);
        let (tx, _rx2) = mpsc::channel(4);
        let (_g2, gone) = oneshot::channel();
        l.submit(net(&mut swarm, &peers, &own), "k", true, tx, gone);
        assert_eq!(l.running.len(), 1);
        let q = l.running.values().next().expect("running");
        assert_eq!(q.key, key);
        assert_eq!(q.subscribers.len(), 2);
    }
}
