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
pub use http::{Conn, RESERVED_FOR_LOCAL, Server, ServerConfig};
pub use limits::{UploadLimits, UploadPermit, UploadRate, Uploads};

/// The registry port's settings, as the operator gives them.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistrySettings {
    /// Address of the registry port that containerd and the peers pull from
    /// (`:5000` listens on every address).
    #[arg(long, env = "PEERMIRROR_REGISTRY_ADDR", default_value = ":5000", value_parser = peermirror_net::flags::parse_listen_addr)]
    pub registry_addr: std::net::SocketAddr,

    /// How blob bodies leave the process on plain HTTP.
    #[arg(long, env = "PEERMIRROR_SERVING_PATH", value_enum, default_value_t = ServingPathChoice::Auto)]
    pub serving_path: ServingPathChoice,

    #[command(flatten)]
    pub server: ServerConfig,

    #[command(flatten)]
    pub uploads: UploadLimits,

    #[command(flatten)]
    pub in_flight: InFlightConfig,
}

impl RegistrySettings {
    /// What the request handler needs of these settings, with the filter
    /// of the references served.
    pub fn handler_config(&self, filter: peermirror_oci::ReferenceFilter) -> HandlerConfig {
        HandlerConfig {
            filter,
            uploads: self.uploads,
            in_flight: self.in_flight.clone(),
        }
    }
}

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
