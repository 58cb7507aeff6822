//! The registry port: OCI distribution's read API over HTTP/1.1.
//!
//! [`handler`] decides what to answer from the content store; [`http`] owns
//! the sockets and sends bodies, zero-copy where the transport allows
//! ([`body`]).
//!
//! Uses `oci`, `net`, `metrics`, `store` (local content), `mirror` (content
//! from peers) and `routing` (peer types).

pub mod body;
pub mod handler;
pub mod http;
pub mod limits;
pub mod uring;

pub use body::{FileBodies, ServingPath, ServingPathChoice};
pub use handler::{
    Body, Handler, HandlerConfig, InFlightConfig, Method, PeerDirectory, RequestHead, Response,
};
pub use http::{Conn, Server, ServerConfig};
pub use limits::{UploadLimits, UploadPermit, UploadRate, Uploads};

/// Entry points for the fuzz targets in `fuzz/` (built with `--cfg
/// fuzzing` by cargo fuzz only): the parsers of input from the network,
/// which must answer every input with a value or an error.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// The registry port's request-head parser.
    pub fn request_head(bytes: &[u8]) {
        let mut buf = bytes::BytesMut::from(bytes);
        let _ = crate::http::parse_head(&mut buf);
    }
}

#[cfg(test)]
mod mirror_tests;
