//! The OCI distribution vocabulary: digests, references, media types, `/v2/`
//! routes, byte ranges and error codes. Pure: no I/O, no async.
//!
//! Uses no other peermirror crate.

mod digest;
mod error;
mod filter;
pub mod manifest;
mod range;
mod reference;
mod route;

pub use digest::{Digest, DigestError, Hasher};
pub use error::{ErrorCode, OciError};
pub use filter::{FilterError, ReferenceFilter};
pub use manifest::{Descriptor, Document, Kind};
pub use range::{ByteRange, ContentRange, RangeError, RangeRequest, parse_range_header};
pub use reference::{DOCKER_HUB, Reference, ReferenceError, Registry, Repository, Tag};
pub use route::{ManifestReference, Name, Route, parse_target};

/// The header that marks a request sent by one peermirror to another: such a
/// request is answered from the local store only, never forwarded again.
pub const MIRRORED_HEADER: &str = "x-peermirror-mirrored";

/// The header with which a peer asks for a blob that may still be being
/// written (it was told to follow this node by the fan-out rendezvous).
/// Honoured only for peers that proved the preshared key (or a verified
/// mTLS client): anyone else gets in-flight content as a miss.
pub const FOLLOW_HEADER: &str = "x-peermirror-follow";

/// The header in which a node answering a mirrored blob request says how
/// many bytes per second its registry port is sending to other hosts (from
/// the dataplane's per-peer counters): a node fetching ranges from several
/// holders uses the busy ones less.
pub const UPLOAD_RATE_HEADER: &str = "x-peermirror-upload-rate";

/// Longest excerpt of an input that an error message quotes.
const EXCERPT_CHARS: usize = 100;

/// `input` as error messages quote it: at most a line of it, printable
/// ASCII only (anything else shows as `?`), so that a hostile input can
/// make a log line or an error body neither large nor unreadable.
pub fn excerpt(input: &str) -> String {
    input
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}
