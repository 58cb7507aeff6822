//! Protocol decisions that must also run outside the daemon (in unit tests
//! with scripted events, and in a simulator): state machines that take
//! events, with the time passed in, and return what to do. No sockets, no
//! clocks, no async runtime: this crate depends on neither tokio nor
//! libp2p, so that it cannot do I/O.
//!
//! Uses [`peermirror_oci`] (digests) only.

pub mod fanout;
pub mod segments;
pub mod source;
