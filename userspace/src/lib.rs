//! peermirror: a peer-to-peer container image mirror for containerd nodes.

pub mod oci;
