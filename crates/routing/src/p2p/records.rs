//! The record store behind Kademlia: provider records only, bounded.
//!
//! - This node's own provider records (the keys it announces) are kept
//!   apart and never limited by other nodes' records, so a flood from a
//!   peer can never stop this node from announcing.
//! - Other nodes' records: at most [`K_VALUE`] providers per key, at most
//!   [`MAX_ADDRESSES`] addresses per record, a quota per provider, and a
//!   total bound; when the total is reached, a record of the provider that
//!   holds the most is evicted for a provider that holds fewer, so one
//!   identity (or a few) cannot crowd the others out.
//! - Value records (`PUT_VALUE`) are never stored: this DHT carries
//!   provider records only.
//! - Records are stored for a key as Kademlia's own in-memory store does,
//!   but in a plain vector per key: most keys have one or two providers,
//!   and an inline array for 20 of them costs kilobytes per key.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use libp2p::PeerId;
use libp2p::kad::store::{Error, RecordStore, Result};
use libp2p::kad::{K_VALUE, ProviderRecord, Record, RecordKey};

/// Addresses kept per provider record of another node.
pub(super) const MAX_ADDRESSES: usize = 4;

#[derive(Debug, Clone, Copy)]
pub(super) struct StoreLimits {
    /// Other nodes' records, in total.
    pub total: usize,
    /// Records of one provider.
    pub per_provider: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            total: 150_000,
            per_provider: 50_000,
        }
    }
}

pub(super) struct ProviderStore {
    local: PeerId,
    limits: StoreLimits,
    provided: HashMap<RecordKey, ProviderRecord>,
    others: HashMap<RecordKey, Vec<ProviderRecord>>,
    by_provider: HashMap<PeerId, HashSet<RecordKey>>,
    total: usize,
}

impl ProviderStore {
    pub(super) fn new(local: PeerId, limits: StoreLimits) -> ProviderStore {
        ProviderStore {
            local,
            limits,
            provided: HashMap::new(),
            others: HashMap::new(),
            by_provider: HashMap::new(),
            total: 0,
        }
    }

    /// Other nodes' records held now.
    #[cfg(test)]
    pub(super) fn others_len(&self) -> usize {
        self.total
    }

    /// Removes other nodes' records whose TTL has run out.
    pub(super) fn expire(&mut self, now: Instant) {
        let mut gone: Vec<(RecordKey, PeerId)> = Vec::new();
        for (key, records) in &self.others {
            for r in records {
                if r.is_expired(now) {
                    gone.push((key.clone(), r.provider));
                }
            }
        }
        for (key, provider) in gone {
            self.remove_other(&key, &provider);
        }
    }

    fn remove_other(&mut self, key: &RecordKey, provider: &PeerId) -> bool {
        let Some(records) = self.others.get_mut(key) else {
            return false;
        };
        let Some(i) = records.iter().position(|r| &r.provider == provider) else {
            return false;
        };
        records.swap_remove(i);
        if records.is_empty() {
            self.others.remove(key);
        }
        if let Some(keys) = self.by_provider.get_mut(provider) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_provider.remove(provider);
            }
        }
        self.total -= 1;
        true
    }

    /// Makes room for one record of `provider`, which holds `mine` records:
    /// evicts a record of the provider holding the most, if it holds more.
    fn evict_for(&mut self, mine: usize) -> bool {
        let Some((victim, key)) = self
            .by_provider
            .iter()
            .max_by_key(|(_, keys)| keys.len())
            .filter(|(_, keys)| keys.len() > mine + 1)
            .and_then(|(p, keys)| keys.iter().next().map(|k| (*p, k.clone())))
        else {
            return false;
        };
        self.remove_other(&key, &victim)
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = std::iter::Empty<Cow<'a, Record>>;
    type ProvidedIter<'a> = std::iter::Map<
        std::collections::hash_map::Values<'a, RecordKey, ProviderRecord>,
        fn(&'a ProviderRecord) -> Cow<'a, ProviderRecord>,
    >;

    fn get(&self, _: &RecordKey) -> Option<Cow<'_, Record>> {
        None
    }

    fn put(&mut self, _: Record) -> Result<()> {
        Err(Error::MaxRecords)
    }

    fn remove(&mut self, _: &RecordKey) {}

    fn records(&self) -> Self::RecordsIter<'_> {
        std::iter::empty()
    }

    fn add_provider(&mut self, mut record: ProviderRecord) -> Result<()> {
        if record.provider == self.local {
            self.provided.insert(record.key.clone(), record);
            return Ok(());
        }
        // Capacity too: a record that arrived with fifty addresses would
        // otherwise keep room for fifty.
        record.addresses.truncate(MAX_ADDRESSES);
        record.addresses.shrink_to_fit();
        if let Some(existing) = self
            .others
            .get_mut(&record.key)
            .and_then(|rs| rs.iter_mut().find(|r| r.provider == record.provider))
        {
            *existing = record;
            return Ok(());
        }
        if self
            .others
            .get(&record.key)
            .is_some_and(|rs| rs.len() >= K_VALUE.get())
        {
            // Full for this key: the first providers stay (as in
            // Kademlia's own store; it resists a Sybil flood on one key).
            return Ok(());
        }
        let mine = self
            .by_provider
            .get(&record.provider)
            .map_or(0, HashSet::len);
        if mine >= self.limits.per_provider {
            return Err(Error::MaxRecords);
        }
        if self.total >= self.limits.total && !self.evict_for(mine) {
            return Err(Error::MaxRecords);
        }
        self.by_provider
            .entry(record.provider)
            .or_default()
            .insert(record.key.clone());
        // Most keys have one provider: start with room for exactly one
        // (a plain push reserves four).
        self.others
            .entry(record.key.clone())
            .or_insert_with(|| Vec::with_capacity(1))
            .push(record);
        self.total += 1;
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut out: Vec<ProviderRecord> = self.provided.get(key).cloned().into_iter().collect();
        if let Some(rs) = self.others.get(key) {
            out.extend(rs.iter().cloned());
        }
        out
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.provided.values().map(Cow::Borrowed)
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        if provider == &self.local {
            self.provided.remove(key);
        } else {
            self.remove_other(key, provider);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> RecordKey {
        RecordKey::new(&n.to_be_bytes())
    }

    fn record(n: u32, provider: PeerId) -> ProviderRecord {
        let addrs = (0..10)
            .map(|i| format!("/ip4/10.0.0.{i}/tcp/5001").parse().expect("addr"))
            .collect();
        ProviderRecord::new(key(n), provider, addrs)
    }

    fn limits(total: usize, per_provider: usize) -> StoreLimits {
        StoreLimits {
            total,
            per_provider,
        }
    }

    #[test]
    fn own_records_are_never_crowded_out() {
        let me = PeerId::random();
        let mut s = ProviderStore::new(me, limits(2, 2));
        let other = PeerId::random();
        s.add_provider(record(1, other)).expect("room");
        s.add_provider(record(2, other)).expect("room");
        assert!(s.add_provider(record(3, other)).is_err(), "quota");
        for n in 0..100 {
            s.add_provider(record(n, me))
                .expect("own records always fit");
        }
        assert_eq!(s.provided().count(), 100);
        assert_eq!(s.providers(&key(1)).len(), 2, "own and the other's");
    }

    #[test]
    fn addresses_are_capped_and_values_refused() {
        let mut s = ProviderStore::new(PeerId::random(), StoreLimits::default());
        s.add_provider(record(1, PeerId::random())).expect("room");
        assert_eq!(s.providers(&key(1))[0].addresses.len(), MAX_ADDRESSES);
        assert!(s.put(Record::new(key(1), vec![0; 100])).is_err());
        assert!(s.get(&key(1)).is_none());
        assert_eq!(s.records().count(), 0);
    }

    #[test]
    fn at_most_k_providers_per_key() {
        let mut s = ProviderStore::new(PeerId::random(), StoreLimits::default());
        for _ in 0..30 {
            s.add_provider(record(7, PeerId::random())).expect("ok");
        }
        assert_eq!(s.providers(&key(7)).len(), K_VALUE.get());
        assert_eq!(s.others_len(), K_VALUE.get());
    }

    #[test]
    fn a_full_store_evicts_the_biggest_provider() {
        let mut s = ProviderStore::new(PeerId::random(), limits(10, 100));
        let flooder = PeerId::random();
        for n in 0..10 {
            s.add_provider(record(n, flooder)).expect("room");
        }
        let honest = PeerId::random();
        s.add_provider(record(100, honest))
            .expect("evicts a flooder's record");
        assert_eq!(s.others_len(), 10);
        assert_eq!(s.providers(&key(100)).len(), 1);
        // The flooder cannot evict the honest record back.
        assert!(s.add_provider(record(50, flooder)).is_err());
        // Updating an existing record needs no room.
        s.add_provider(record(100, honest)).expect("update");
    }

    #[test]
    fn expired_records_go() {
        let mut s = ProviderStore::new(PeerId::random(), StoreLimits::default());
        let p = PeerId::random();
        let mut r = record(1, p);
        r.expires = Some(Instant::now());
        s.add_provider(r).expect("room");
        s.add_provider(record(2, p)).expect("room");
        s.expire(Instant::now() + std::time::Duration::from_secs(1));
        assert_eq!(s.others_len(), 1);
        assert!(s.providers(&key(1)).is_empty());
        s.remove_provider(&key(2), &p);
        assert_eq!(s.others_len(), 0);
    }
}
