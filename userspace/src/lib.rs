//! peermirror: a peer-to-peer container image mirror for containerd nodes.
//!
//! Modules, each using only those listed before it: [`oci`] (pure protocol
//! vocabulary), [`store`] (the node's content), [`metrics`], [`registry`]
//! (the HTTP port), [`daemon`] (composition) and [`cli`] (flags).

pub mod cli;
pub mod containerd_config;
pub mod daemon;
pub mod dataplane;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod registry;
pub mod routing;
pub mod store;
pub mod tls;
