//! Finding which nodes hold a key: the [`Router`] trait, its libp2p Kademlia
//! implementation ([`p2p`]), an in-memory twin ([`MemoryRouter`]), the
//! bootstrappers, and the sync task that is the only bridge from the content
//! store's catalog to the DHT.
//!
//! Uses `oci`, `net`, `store` (catalog events) and `protocol` (the fan-out
//! rendezvous it drives over libp2p).
//!
//! Keys are strings, the same as Spegel's: `sha256:<hex>` for content and
//! `<registry>/<repository>:<tag>` for tags. In the DHT a key is stored under
//! the multihash of its bytes (see [`record_key`]).

pub mod bootstrap;
pub mod conformance;
pub mod identity;
pub mod p2p;
pub mod sync;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use libp2p::{Multiaddr, PeerId};
use sha2::{Digest as _, Sha256};

use peermirror_oci::Digest;
use tokio::sync::watch;

/// The Kademlia protocol name shared with Spegel.
pub const KAD_PROTOCOL: &str = "/spegel/kad/1.0.0";

/// The bytes of the Kademlia record key of `key`: the sha2-256 multihash of
/// the key string (`0x12 0x20` followed by the digest), the multihash inside
/// a CIDv1 with codec raw, as Spegel computes it.
pub fn record_key(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(34);
    out.extend_from_slice(&[0x12, 0x20]);
    out.extend_from_slice(&Sha256::digest(key.as_bytes()));
    out
}

/// A node that holds a key, as a registry endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The node's libp2p identity.
    pub id: PeerId,
    /// Where its registry port answers.
    pub addr: SocketAddr,
}

/// Who misses a blob that the fan-out is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// This node's containerd: it fetches the blob when told to lead.
    Node,
    /// Anyone else (another host, a measurement): nobody here will fetch
    /// it, so it may follow a fetch under way but never lead one.
    Other,
}

/// What the fan-out rendezvous says about a digest no node holds yet (see
/// [`p2p::rendezvous`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fanout {
    /// This node's containerd fetches it (from its next endpoint).
    Lead,
    /// Stream it from this peer's in-flight ingest.
    Follow(Peer),
}

/// Which announcement a set of keys belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Every key the node held when its store was first read: readiness
    /// waits until these are stored in the DHT.
    Initial,
    /// Keys that appeared since.
    Update,
}

/// Where the first announcement of this node's keys stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FirstRound {
    /// The keys have not been handed to the router yet.
    #[default]
    Waiting,
    /// Being announced; `stored` of `total` have reached their closest peers.
    Announcing { stored: usize, total: usize },
    /// Every key of the first round is stored (or the node is alone and no
    /// peers are expected).
    Stored,
}

/// Readiness of the routing layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterStatus {
    /// Peers in the routing table.
    pub routing_table_peers: usize,
    /// Peers with an open connection (they proved the preshared key).
    pub connected_peers: usize,
    /// Whether bootstrap peers are configured (then the routing table must
    /// be non-empty for the node to be ready).
    pub needs_peers: bool,
    pub first_round: FirstRound,
    /// Keys this node currently announces.
    pub advertised_keys: usize,
    /// Of those, keys not stored in the DHT yet (being announced, or
    /// retried after a failure): others cannot find them until they are.
    pub pending_keys: usize,
    /// The addresses this node's P2P port listens on.
    pub listen_addrs: Vec<Multiaddr>,
}

impl RouterStatus {
    /// What the router still waits for before the node is ready.
    pub fn waiting_for(&self) -> Vec<String> {
        let mut waiting = Vec::new();
        match self.first_round {
            FirstRound::Waiting => {
                waiting.push("the first announcement of this node's keys".to_string());
            }
            FirstRound::Announcing { stored, total } => waiting.push(format!(
                "the first announcement of this node's keys ({stored} of {total} stored)"
            )),
            FirstRound::Stored => {}
        }
        if self.needs_peers && self.routing_table_peers == 0 {
            waiting.push("a first peer in the routing table (bootstrap)".to_string());
        }
        waiting
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("the routing event loop has stopped")]
    Stopped,
}

/// Announces this node's keys and finds the holders of others'.
#[async_trait::async_trait]
pub trait Router: Send + Sync + 'static {
    /// Starts (or keeps) announcing that this node holds `keys`. Returns once
    /// the router has taken them (announcing goes on in the background).
    async fn advertise(&self, keys: Vec<String>, round: Round) -> Result<(), RouterError>;

    /// Stops announcing `keys`. Other nodes drop their records of them when
    /// the provider TTL runs out (Kademlia has no remote withdraw).
    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError>;

    /// The holders of `key` other than this node, as they are found. The
    /// stream ends when the lookup is over; dropping it ends the lookup.
    fn lookup(&self, key: &str) -> BoxStream<'static, Peer>;

    /// Like [`Router::lookup`], but asks the network again instead of
    /// reusing a recent answer: for a transfer whose holders failed, to find
    /// holders that appeared since.
    fn lookup_fresh(&self, key: &str) -> BoxStream<'static, Peer> {
        self.lookup(key)
    }

    /// Asks the rendezvous of `digest` what to do about a digest no node
    /// holds; `failed` is a source this node was told to follow that did not
    /// deliver. `None`: no answer (fan-out off, or no rendezvous reachable):
    /// behave as without fan-out.
    async fn fanout(
        &self,
        _digest: &Digest,
        _failed: Option<PeerId>,
        _asker: Asker,
    ) -> Option<Fanout> {
        None
    }

    /// The latest status, and its changes.
    fn watch_status(&self) -> watch::Receiver<RouterStatus>;

    fn status(&self) -> RouterStatus {
        self.watch_status().borrow().clone()
    }
}

/// The `failed` and asker of one fan-out ask (as [`MemoryRouter`] records).
pub type FanoutAsk = (Option<PeerId>, Asker);

/// The holders of `key` in one of [`MemoryRouter`]'s maps.
fn holders(map: &Mutex<HashMap<String, Vec<Peer>>>, key: &str) -> Vec<Peer> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .cloned()
        .unwrap_or_default()
}

/// An in-memory router for tests: keys map to fixed peers; the status
/// follows what it is told as the real one does (the first round is stored
/// once the initial keys are handed over).
pub struct MemoryRouter {
    providers: Mutex<HashMap<String, Vec<Peer>>>,
    /// Holders that only a fresh lookup finds (plain lookups answer from a
    /// cache made before they appeared).
    uncached: Mutex<HashMap<String, Vec<Peer>>>,
    advertised: Mutex<BTreeSet<String>>,
    status: watch::Sender<RouterStatus>,
    /// The fan-out answers to give, in order (then `None`), and the
    /// `failed` and asker of every ask.
    fanout: Mutex<(VecDeque<Fanout>, Vec<FanoutAsk>)>,
}

impl MemoryRouter {
    pub fn new() -> Arc<MemoryRouter> {
        Arc::new(MemoryRouter {
            providers: Mutex::default(),
            uncached: Mutex::default(),
            advertised: Mutex::default(),
            status: watch::Sender::new(RouterStatus::default()),
            fanout: Mutex::default(),
        })
    }

    /// Queues the answer to the next fan-out ask.
    pub fn answer_fanout(&self, answer: Fanout) {
        self.fanout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push_back(answer);
    }

    /// The `failed` of every fan-out ask so far.
    pub fn fanout_asks(&self) -> Vec<Option<PeerId>> {
        self.fanout_askers().into_iter().map(|(f, _)| f).collect()
    }

    /// The `failed` and asker of every fan-out ask so far.
    pub fn fanout_askers(&self) -> Vec<FanoutAsk> {
        self.fanout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Makes `peer` a holder of `key`.
    pub fn add(&self, key: &str, peer: Peer) {
        let mut providers = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        providers.entry(key.to_string()).or_default().push(peer);
    }

    /// Makes `peer` a holder of `key` that only [`Router::lookup_fresh`]
    /// finds, as if plain lookups were answered from a cache made before it
    /// appeared.
    pub fn add_uncached(&self, key: &str, peer: Peer) {
        let mut uncached = self.uncached.lock().unwrap_or_else(|e| e.into_inner());
        uncached.entry(key.to_string()).or_default().push(peer);
    }

    /// What this node currently advertises.
    pub fn advertised(&self) -> BTreeSet<String> {
        self.advertised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, first: Option<FirstRound>) {
        let count = self.advertised().len();
        self.status.send_modify(|s| {
            s.advertised_keys = count;
            if let Some(f) = first {
                s.first_round = f;
            }
        });
    }
}

#[async_trait::async_trait]
impl Router for MemoryRouter {
    async fn advertise(&self, keys: Vec<String>, round: Round) -> Result<(), RouterError> {
        self.advertised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(keys);
        self.publish((round == Round::Initial).then_some(FirstRound::Stored));
        Ok(())
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        {
            let mut advertised = self.advertised.lock().unwrap_or_else(|e| e.into_inner());
            for k in keys {
                advertised.remove(&k);
            }
        }
        self.publish(None);
        Ok(())
    }

    fn lookup(&self, key: &str) -> BoxStream<'static, Peer> {
        Box::pin(futures::stream::iter(holders(&self.providers, key)))
    }

    fn lookup_fresh(&self, key: &str) -> BoxStream<'static, Peer> {
        let uncached = holders(&self.uncached, key);
        Box::pin(self.lookup(key).chain(futures::stream::iter(uncached)))
    }

    async fn fanout(
        &self,
        _digest: &Digest,
        failed: Option<PeerId>,
        asker: Asker,
    ) -> Option<Fanout> {
        let mut fanout = self.fanout.lock().unwrap_or_else(|e| e.into_inner());
        fanout.1.push((failed, asker));
        fanout.0.pop_front()
    }

    fn watch_status(&self) -> watch::Receiver<RouterStatus> {
        self.status.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_key_matches_spegel_test_vector() {
        assert_eq!(
            hex::encode(record_key("docker.io/library/nginx:1.27")),
            "12206965a10c15290ad0b29ca7fd1866de1850408b3cb15fb11a3bbbbc2fddb158bd"
        );
    }

    #[tokio::test]
    async fn the_memory_twin_behaves_like_a_router() {
        let router = MemoryRouter::new();
        conformance::announces(router.as_ref()).await;
        conformance::misses_end(router.as_ref()).await;
    }

    #[test]
    fn readiness_names_the_first_round() {
        let mut s = RouterStatus::default();
        assert_eq!(
            s.waiting_for(),
            ["the first announcement of this node's keys"]
        );
        s.first_round = FirstRound::Announcing {
            stored: 3,
            total: 10,
        };
        assert_eq!(
            s.waiting_for(),
            ["the first announcement of this node's keys (3 of 10 stored)"]
        );
        s.first_round = FirstRound::Stored;
        s.needs_peers = true;
        assert_eq!(
            s.waiting_for(),
            ["a first peer in the routing table (bootstrap)"]
        );
        s.routing_table_peers = 1;
        assert!(s.waiting_for().is_empty());
    }
}
