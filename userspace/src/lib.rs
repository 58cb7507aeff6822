//! peermirror: a peer-to-peer container image mirror for containerd nodes.
//!
//! # Crate map
//!
//! The layers are crates, each using only those listed before it, so an
//! upward import does not compile:
//!
//! | crate | owns |
//! | --- | --- |
//! | [`peermirror_oci`] | the OCI distribution vocabulary: digests, references, `/v2/` routes, `Range`/`Content-Range`, error codes. Pure: no I/O |
//! | [`peermirror_net`] | sockets, TLS and retries every server and client shares: connections that must make progress, connection caps, backoff, interface addresses, certificate files → rustls configurations |
//! | [`peermirror_metrics`] | the metric families the parts record into. Knows nothing of the domain |
//! | [`peermirror_protocol`] | protocol decisions as state machines without I/O (the fan-out rendezvous), for the daemon, unit tests and a simulator |
//! | [`peermirror_store`] | the node's content: the `ContentStore` trait, the containerd store, the in-memory twin, the catalog, imports |
//! | [`peermirror_containerd_config`] | writing, backing up and restoring containerd's `hosts.toml` (and K3s's) |
//! | [`peermirror_routing`] | finding holders: the `Router` trait, the libp2p Kademlia router and its in-memory twin, bootstrap sources, the sync task from the catalog to the DHT |
//! | [`peermirror_mirror`] | fetching from peers: peer choice, hedging, retries, resume, digest checks |
//! | [`peermirror_registry`] | the registry port: request handling (local or mirrored), the HTTP/1.1 server, zero-copy bodies, upload limits |
//! | [`peermirror_dataplane`] | the eBPF programs (aya) and the admission policy that drives them |
//!
//! This crate, the binary, holds what uses them all:
//!
//! | module | owns |
//! | --- | --- |
//! | [`status`] | the status port: readiness, liveness, `/metrics` and the debug page |
//! | [`bootstrapper`] | `peermirror bootstrapper`: the mTLS server nodes register with and bootstrap from |
//! | [`daemon`] | the composition root: builds every part, runs them as supervised tasks, stops them in order |
//! | [`cli`] | flags → each part's own configuration |

/// `0.1.0 (commit 0123456789ab)`: the release and the commit it was built
/// from, as `--version`, the status API and the debug page say it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PEERMIRROR_COMMIT"),
    ")"
);

pub mod bootstrapper;
pub mod cli;
pub mod daemon;
pub mod status;
