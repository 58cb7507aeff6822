//! peermirror: a peer-to-peer container image mirror for containerd nodes.
//!
//! # Module map
//!
//! One module per concern. Each uses only modules listed before it (and
//! [`daemon`], the composition root, uses them all):
//!
//! | module | owns |
//! | --- | --- |
//! | [`oci`] | the OCI distribution vocabulary: digests, references, `/v2/` routes, `Range`/`Content-Range`, error codes. Pure: no I/O |
//! | [`net`] | socket helpers every server uses: connections that must make progress, connection caps |
//! | [`tls`] | certificate files → rustls configurations, reloaded when they change |
//! | [`metrics`] | every metric, registered once; the status port (`/metrics`, `/healthz`, `/readyz`, `/debug`). Knows nothing of the domain |
//! | [`store`] | the node's content: the `ContentStore` trait, the containerd store, the in-memory twin, the catalog |
//! | [`routing`] | finding holders: the `Router` trait, the libp2p Kademlia router and its in-memory twin, bootstrap, the sync task from the catalog to the DHT |
//! | [`mirror`] | fetching from peers: peer choice, hedging, retries, resume, digest checks |
//! | [`registry`] | the registry port: request handling (local or mirrored), the HTTP/1.1 server, zero-copy bodies, upload limits |
//! | [`containerd_config`] | writing, backing up and restoring containerd's `hosts.toml` |
//! | [`dataplane`] | the eBPF programs (aya) and the admission policy that drives them |
//! | [`status`] | readiness, liveness and the debug page, from the parts that own each state |
//! | [`daemon`] | the composition root: builds every part, runs them as supervised tasks, stops them in order |
//! | [`cli`] | flags → each module's own configuration |

pub mod cli;
pub mod containerd_config;
pub mod daemon;
pub mod dataplane;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod oci;
pub mod registry;
pub mod routing;
pub mod status;
pub mod store;
pub mod tls;
