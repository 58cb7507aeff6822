//! What the daemon is started with, and how starting it can fail.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::supervisor::TaskFailed;
use peermirror_dataplane::DataplaneConfig;
use peermirror_mirror::MirrorConfig;
use peermirror_net::tls::TlsFiles;
use peermirror_oci::ReferenceFilter;
use peermirror_registry::RegistrySettings;
use peermirror_routing::bootstrap::BootstrapConfig;
use peermirror_routing::identity::IdentityError;
use peermirror_routing::p2p::{P2pError, P2pSettings};
use peermirror_store::ContainerdConfig;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub containerd: ContainerdConfig,
    /// Which registries and references are served, mirrored and advertised.
    pub filter: ReferenceFilter,
    /// The registry port.
    pub registry: RegistrySettings,
    pub dataplane: DataplaneConfig,
    /// mTLS on the registry port and towards peers.
    pub tls: Option<TlsFiles>,
    pub data_dir: PathBuf,
    pub p2p: P2pSettings,
    pub bootstrap: BootstrapConfig,
    /// Where this node serves its own bootstrap entry, if anywhere.
    pub http_bootstrap_addr: Option<SocketAddr>,
    pub mirror: MirrorConfig,
    /// The status port: its address, the debug pages' access, metric names.
    pub status: crate::status::StatusArgs,
    /// Image archives imported (pinned) at start and as they appear.
    pub import_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    P2p(#[from] P2pError),
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] peermirror_routing::bootstrap::BootstrapError),
    #[error(
        "--serving-path io-uring: io_uring is not usable here ({0}); use --serving-path sendfile or auto"
    )]
    IoUring(std::io::Error),
    #[error(transparent)]
    Tls(#[from] peermirror_net::tls::TlsError),
    #[error("--dataplane required: {0}")]
    Dataplane(#[from] peermirror_dataplane::DataplaneError),
    #[error(transparent)]
    Task(#[from] TaskFailed),
}
