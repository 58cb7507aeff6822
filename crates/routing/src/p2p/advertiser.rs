//! Announcing this node's keys: a bounded number of `StartProviding`
//! queries at once, each judged by what it reached, retried with backoff
//! when it timed out or reached too few peers, and renewed at a time drawn
//! from the second half of the re-announce interval (so that the renewals of
//! keys announced together spread out instead of repeating a burst).
//!
//! `ADD_PROVIDER` has no reply, so "stored" means what the query's
//! statistics can tell: it finished (not timed out) and reached at least as
//! many peers as the routing table can offer, up to the replication factor.
//! A node whose routing table is empty is alone: its keys wait for the
//! first peer and are announced then.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use libp2p::kad::{self, K_VALUE, QueryId, RecordKey};
use peermirror_net::Backoff;
use prometheus_client::metrics::counter::Counter;
use rand::{Rng, SeedableRng};

use super::records::ProviderStore;
use crate::{FirstRound, Round, record_key};

/// `StartProviding` queries of this node that run at once.
pub(super) const ADVERTISE_CONCURRENCY: usize = 16;
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

struct KeyState {
    /// Stable id of the key in the schedule (entries of removed or
    /// rescheduled keys are skipped when they come up).
    id: u64,
    /// When the next announcement is due; `None` while queued or running.
    due: Option<Instant>,
    /// Failed announcements in a row.
    failures: u32,
    /// Announced while the routing table was empty.
    alone: bool,
    /// Stored at least once.
    stored: bool,
}

enum First {
    Waiting,
    Running {
        pending: HashSet<RecordKey>,
        total: usize,
    },
    Done,
}

/// What one finished announcement reached.
pub(super) struct Outcome {
    /// The query finished (rather than timing out).
    pub finished: bool,
    /// Peers the query reached (its statistics' successes).
    pub successes: u32,
    /// Peers in the routing table now.
    pub table: usize,
}

pub(super) struct Advertiser {
    keys: HashMap<RecordKey, KeyState>,
    ids: HashMap<u64, RecordKey>,
    next_id: u64,
    ready: VecDeque<RecordKey>,
    schedule: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<QueryId, RecordKey>,
    first: First,
    interval: Duration,
    /// Bootstrap peers are configured: a node alone has not finished its
    /// first round, it waits for them.
    needs_peers: bool,
    failures: Counter,
    rng: rand::rngs::SmallRng,
    /// Keys never stored yet.
    pending: usize,
}

impl Advertiser {
    pub(super) fn new(interval: Duration, needs_peers: bool, failures: Counter) -> Advertiser {
        Advertiser {
            keys: HashMap::new(),
            ids: HashMap::new(),
            next_id: 0,
            ready: VecDeque::new(),
            schedule: BinaryHeap::new(),
            in_flight: HashMap::new(),
            first: First::Waiting,
            interval,
            needs_peers,
            failures,
            rng: rand::rngs::SmallRng::from_entropy(),
            pending: 0,
        }
    }

    /// Keys announced now.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Keys not stored in the DHT yet (queued, running or retrying).
    pub(super) fn pending(&self) -> usize {
        self.pending
    }

    pub(super) fn first_round(&self) -> FirstRound {
        match &self.first {
            First::Waiting => FirstRound::Waiting,
            First::Running { pending, total } => FirstRound::Announcing {
                stored: total - pending.len(),
                total: *total,
            },
            First::Done => FirstRound::Stored,
        }
    }

    /// Starts announcing `keys` (those not announced already).
    pub(super) fn add(&mut self, keys: Vec<String>, round: Round) {
        let mut added = HashSet::new();
        for name in keys {
            let key = RecordKey::new(&record_key(&name));
            if self.keys.contains_key(&key) {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.keys.insert(
                key.clone(),
                KeyState {
                    id,
                    due: None,
                    failures: 0,
                    alone: false,
                    stored: false,
                },
            );
            self.ids.insert(id, key.clone());
            self.ready.push_back(key.clone());
            self.pending += 1;
            added.insert(key);
        }
        if round == Round::Initial && matches!(self.first, First::Waiting) {
            self.first = if added.is_empty() {
                First::Done
            } else {
                First::Running {
                    total: added.len(),
                    pending: added,
                }
            };
        }
    }

    /// Stops announcing `keys`.
    pub(super) fn remove(&mut self, keys: Vec<String>, kad: &mut kad::Behaviour<ProviderStore>) {
        for name in keys {
            let key = RecordKey::new(&record_key(&name));
            if let Some(state) = self.keys.remove(&key) {
                self.ids.remove(&state.id);
                if !state.stored {
                    self.pending -= 1;
                }
                kad.stop_providing(&key);
            }
            self.stored(&key);
        }
        self.ready.retain(|k| self.keys.contains_key(k));
    }

    /// The key no longer holds up the first round.
    fn stored(&mut self, key: &RecordKey) {
        if let First::Running { pending, .. } = &mut self.first {
            pending.remove(key);
            if pending.is_empty() {
                self.first = First::Done;
            }
        }
    }

    /// Starts the announcements that are due, while fewer than the allowed
    /// number run.
    pub(super) fn pump(&mut self, kad: &mut kad::Behaviour<ProviderStore>, now: Instant) {
        while let Some(Reverse((at, id))) = self.schedule.peek().copied() {
            if at > now {
                break;
            }
            self.schedule.pop();
            let Some(key) = self.ids.get(&id) else {
                continue;
            };
            if let Some(state) = self.keys.get_mut(key)
                && state.due == Some(at)
            {
                state.due = None;
                self.ready.push_back(key.clone());
            }
        }
        while self.in_flight.len() < ADVERTISE_CONCURRENCY {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            if !self.keys.contains_key(&key) {
                continue;
            }
            match kad.start_providing(key.clone()) {
                Ok(query) => {
                    self.in_flight.insert(query, key);
                }
                // The store refuses nothing of ours; should it, try later.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot announce a key");
                    self.reschedule_failed(&key, now);
                }
            }
        }
    }

    /// When the next announcement is due (for the event loop's timer).
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.schedule.peek().map(|Reverse((at, _))| *at)
    }

    /// Whether `query` is one of ours.
    pub(super) fn owns(&self, query: &QueryId) -> bool {
        self.in_flight.contains_key(query)
    }

    /// Judges a finished announcement.
    pub(super) fn finished(&mut self, query: QueryId, outcome: Outcome, now: Instant) {
        let Some(key) = self.in_flight.remove(&query) else {
            return;
        };
        if !self.keys.contains_key(&key) {
            return; // withdrawn meanwhile
        }
        let needed = outcome.table.min(K_VALUE.get());
        tracing::debug!(
            finished = outcome.finished,
            successes = outcome.successes,
            table = outcome.table,
            "announcement finished"
        );
        if outcome.finished && outcome.table == 0 {
            // Nobody to tell. Announced again when a first peer appears
            // (and at the interval in any case).
            if let Some(state) = self.keys.get_mut(&key) {
                state.alone = true;
                state.failures = 0;
            }
            if !self.needs_peers {
                self.stored(&key);
            }
            let at = now + self.interval;
            self.schedule_at(&key, at);
        } else if outcome.finished && outcome.successes as usize >= needed {
            if let Some(state) = self.keys.get_mut(&key) {
                state.failures = 0;
                state.alone = false;
                if !std::mem::replace(&mut state.stored, true) {
                    self.pending -= 1;
                }
            }
            self.stored(&key);
            let half = self.interval / 2;
            let at = now + half + half.mul_f64(self.rng.r#gen::<f64>());
            self.schedule_at(&key, at);
        } else {
            tracing::debug!(
                finished = outcome.finished,
                successes = outcome.successes,
                needed,
                "announcement reached too few peers; retrying"
            );
            self.reschedule_failed(&key, now);
        }
    }

    fn reschedule_failed(&mut self, key: &RecordKey, now: Instant) {
        self.failures.inc();
        let failures = match self.keys.get_mut(key) {
            Some(state) => {
                state.failures = state.failures.saturating_add(1);
                state.failures
            }
            None => return,
        };
        let wait = Backoff::delay(RETRY_MIN, RETRY_MAX, failures, self.rng.r#gen::<f64>());
        self.schedule_at(key, now + wait);
    }

    fn schedule_at(&mut self, key: &RecordKey, at: Instant) {
        if let Some(state) = self.keys.get_mut(key) {
            state.due = Some(at);
            self.schedule.push(Reverse((at, state.id)));
        }
    }

    /// Whether a node alone waits for peers before its first round is
    /// done. When it no longer does (its bootstrap source names no other
    /// node), keys announced alone count as stored.
    pub(super) fn expect_peers(&mut self, expect: bool) {
        self.needs_peers = expect;
        if !expect {
            let alone: Vec<RecordKey> = self
                .keys
                .iter()
                .filter(|(_, s)| s.alone)
                .map(|(k, _)| k.clone())
                .collect();
            for key in alone {
                self.stored(&key);
            }
        }
    }

    /// The routing table gained its first peer: keys announced while this
    /// node was alone go out now.
    pub(super) fn peers_appeared(&mut self) {
        let alone: Vec<RecordKey> = self
            .keys
            .iter_mut()
            .filter(|(_, s)| s.alone && s.due.is_some())
            .map(|(k, s)| {
                s.alone = false;
                s.due = None;
                k.clone()
            })
            .collect();
        self.ready.extend(alone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("sha256:{i:064x}")).collect()
    }

    fn key(name: &str) -> RecordKey {
        RecordKey::new(&record_key(name))
    }

    /// Takes the keys `pump` would start, as if each started a query.
    fn start_all(a: &mut Advertiser, now: Instant) -> Vec<(QueryId, RecordKey)> {
        // Due keys move to the ready queue exactly as `pump` does it.
        while let Some(Reverse((at, id))) = a.schedule.peek().copied() {
            if at > now {
                break;
            }
            a.schedule.pop();
            if let Some(k) = a.ids.get(&id).cloned()
                && let Some(s) = a.keys.get_mut(&k)
                && s.due == Some(at)
            {
                s.due = None;
                a.ready.push_back(k);
            }
        }
        let mut out = Vec::new();
        while let Some(k) = a.ready.pop_front() {
            let q = fake_query();
            a.in_flight.insert(q, k.clone());
            out.push((q, k));
        }
        out
    }

    fn fake_query() -> QueryId {
        // QueryIds are opaque; a throwaway behaviour hands out real ones.
        thread_local! {
            static KAD: std::cell::RefCell<kad::Behaviour<ProviderStore>> = {
                let id = libp2p::PeerId::random();
                std::cell::RefCell::new(kad::Behaviour::new(
                    id,
                    ProviderStore::new(id, Default::default()),
                ))
            };
        }
        KAD.with(|k| {
            k.borrow_mut()
                .get_providers(RecordKey::new(&rand::random::<[u8; 8]>()))
        })
    }

    fn ok(successes: u32, table: usize) -> Outcome {
        Outcome {
            finished: true,
            successes,
            table,
        }
    }

    #[test]
    fn the_first_round_ends_when_every_key_is_stored() {
        let mut a = Advertiser::new(Duration::from_secs(600), true, Counter::default());
        assert_eq!(a.first_round(), FirstRound::Waiting);
        a.add(names(3), Round::Initial);
        let now = Instant::now();
        let started = start_all(&mut a, now);
        assert_eq!(started.len(), 3);
        a.finished(started[0].0, ok(40, 31), now);
        // A timeout, and one that reached too few peers, are not stored.
        a.finished(
            started[1].0,
            Outcome {
                finished: false,
                successes: 30,
                table: 31,
            },
            now,
        );
        a.finished(started[2].0, ok(5, 31), now);
        assert_eq!(
            a.first_round(),
            FirstRound::Announcing {
                stored: 1,
                total: 3
            }
        );
        assert_eq!(a.failures.get(), 2);
        assert_eq!(a.pending(), 2);
        // Retried after their backoff, not before.
        assert!(start_all(&mut a, now).is_empty());
        let retried = start_all(&mut a, now + Duration::from_millis(1300));
        assert_eq!(retried.len(), 2);
        for (q, _) in retried {
            a.finished(q, ok(40, 31), now);
        }
        assert_eq!(a.first_round(), FirstRound::Stored);
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn renewals_spread_over_the_second_half_of_the_interval() {
        let interval = Duration::from_secs(600);
        let mut a = Advertiser::new(interval, false, Counter::default());
        a.add(names(200), Round::Initial);
        let now = Instant::now();
        for (q, _) in start_all(&mut a, now) {
            a.finished(q, ok(40, 31), now);
        }
        let dues: Vec<Duration> = a
            .keys
            .values()
            .map(|s| s.due.expect("scheduled") - now)
            .collect();
        assert!(dues.iter().all(|d| *d >= interval / 2 && *d <= interval));
        let (min, max) = (
            dues.iter().min().expect("some"),
            dues.iter().max().expect("some"),
        );
        assert!(
            *max - *min > interval / 4,
            "renewals bunched: {min:?}..{max:?}"
        );
    }

    #[test]
    fn a_node_alone_waits_for_peers_only_when_it_expects_them() {
        for needs_peers in [false, true] {
            let mut a = Advertiser::new(Duration::from_secs(600), needs_peers, Counter::default());
            a.add(names(2), Round::Initial);
            let now = Instant::now();
            for (q, _) in start_all(&mut a, now) {
                a.finished(q, ok(0, 0), now);
            }
            let done = a.first_round() == FirstRound::Stored;
            assert_eq!(done, !needs_peers);
            a.peers_appeared();
            let again = start_all(&mut a, now);
            assert_eq!(again.len(), 2, "announced again for the first peer");
            for (q, _) in again {
                a.finished(q, ok(4, 2), now);
            }
            assert_eq!(a.first_round(), FirstRound::Stored);
            assert_eq!(a.failures.get(), 0);
        }
    }

    #[test]
    fn a_source_that_names_no_other_node_ends_the_wait_for_peers() {
        let mut a = Advertiser::new(Duration::from_secs(600), true, Counter::default());
        a.add(names(3), Round::Initial);
        let now = Instant::now();
        let started = start_all(&mut a, now);
        // Two announcements finish alone, one is still running.
        for (q, _) in &started[..2] {
            a.finished(*q, ok(0, 0), now);
        }
        assert!(matches!(a.first_round(), FirstRound::Announcing { .. }));
        a.expect_peers(false);
        assert!(matches!(
            a.first_round(),
            FirstRound::Announcing {
                stored: 2,
                total: 3
            }
        ));
        a.finished(started[2].0, ok(0, 0), now);
        assert_eq!(a.first_round(), FirstRound::Stored);
    }

    #[test]
    fn withdrawn_keys_stop_and_release_the_first_round() {
        let id = libp2p::PeerId::random();
        let mut kad = kad::Behaviour::new(id, ProviderStore::new(id, Default::default()));
        let mut a = Advertiser::new(Duration::from_secs(600), false, Counter::default());
        let all = names(2);
        a.add(all.clone(), Round::Initial);
        a.remove(vec![all[0].clone()], &mut kad);
        assert_eq!(a.len(), 1);
        let now = Instant::now();
        let started = start_all(&mut a, now);
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].1, key(&all[1]));
        a.finished(started[0].0, ok(40, 31), now);
        assert_eq!(a.first_round(), FirstRound::Stored);
        // Adding known keys again changes nothing; an empty first round is done.
        a.add(all[1..].to_vec(), Round::Update);
        assert_eq!(a.len(), 1);
        let mut b = Advertiser::new(Duration::from_secs(600), true, Counter::default());
        b.add(Vec::new(), Round::Initial);
        assert_eq!(b.first_round(), FirstRound::Stored);
    }
}
