//! Finding which nodes hold a key: the [`Router`] trait, its libp2p Kademlia
//! implementation ([`p2p`]), an in-memory twin ([`MemoryRouter`]), the
//! bootstrappers, and the sync task that is the only bridge from the content
//! store's catalog to the DHT.
//!
//! Keys are strings, the same as Spegel's: `sha256:<hex>` for content and
//! `<registry>/<repository>:<tag>` for tags. In the DHT a key is stored under
//! the multihash of its bytes (see [`record_key`]).

pub mod bootstrap;
pub mod identity;
pub mod p2p;
pub mod sync;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::stream::BoxStream;
use sha2::{Digest as _, Sha256};

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
    /// The node's libp2p peer id (its stable identity), as text.
    pub id: String,
    /// Where its registry port answers.
    pub addr: SocketAddr,
}

/// Readiness of the routing layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterStatus {
    /// Peers in the routing table.
    pub routing_table_peers: usize,
    /// Whether bootstrap peers are configured (then the routing table must
    /// be non-empty for the node to be ready).
    pub needs_peers: bool,
    /// The first set of keys handed to the router has been announced.
    pub initial_advertise_done: bool,
    /// Keys this node currently announces.
    pub advertised_keys: usize,
    /// The addresses this node's P2P port listens on.
    pub listen_addrs: Vec<String>,
}

impl RouterStatus {
    /// What the router still waits for before the node is ready.
    pub fn waiting_for(&self) -> Vec<String> {
        let mut waiting = Vec::new();
        if !self.initial_advertise_done {
            waiting.push("the first advertisement of this node's keys".to_string());
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
    /// Starts (or keeps) announcing that this node holds `keys`.
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError>;

    /// Stops announcing `keys`. Other nodes drop their records of them when
    /// the provider TTL runs out (Kademlia has no remote withdraw).
    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError>;

    /// The holders of `key` other than this node, as they are found. The
    /// stream ends when the lookup is over.
    fn lookup(&self, key: &str) -> BoxStream<'static, Peer>;

    fn status(&self) -> RouterStatus;
}

/// An in-memory router for tests: keys map to fixed peers.
#[derive(Default)]
pub struct MemoryRouter {
    providers: Mutex<HashMap<String, Vec<Peer>>>,
    advertised: Mutex<std::collections::BTreeSet<String>>,
}

impl MemoryRouter {
    pub fn new() -> Arc<MemoryRouter> {
        Arc::new(MemoryRouter::default())
    }

    /// Makes `peer` a holder of `key`.
    pub fn add(&self, key: &str, peer: Peer) {
        let mut providers = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        providers.entry(key.to_string()).or_default().push(peer);
    }

    /// What this node currently advertises.
    pub fn advertised(&self) -> std::collections::BTreeSet<String> {
        self.advertised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait::async_trait]
impl Router for MemoryRouter {
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.advertised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(keys);
        Ok(())
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        let mut advertised = self.advertised.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            advertised.remove(&k);
        }
        Ok(())
    }

    fn lookup(&self, key: &str) -> BoxStream<'static, Peer> {
        let peers = self
            .providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default();
        Box::pin(futures::stream::iter(peers))
    }

    fn status(&self) -> RouterStatus {
        RouterStatus {
            initial_advertise_done: true,
            advertised_keys: self.advertised().len(),
            ..RouterStatus::default()
        }
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
}
