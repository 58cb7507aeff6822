//! Protocol decisions that must also run outside the daemon (in unit tests
//! with scripted events, and in a simulator): state machines that take
//! events, with the time passed in, and return what to do. No sockets, no
//! clocks, no async runtime: this crate depends on neither tokio nor
//! libp2p, so that it cannot do I/O.
//!
//! - [`fanout`]: the rendezvous of a digest that many nodes miss at once;
//! - [`segments`]: the segments of one blob among several holders;
//! - [`source`]: when to leave the one source a blob is relayed from.
//!
//! Uses [`peermirror_oci`] (digests) only.

pub mod fanout;
pub mod segments;
pub mod source;
