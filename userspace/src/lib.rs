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
//! | [`bootstrapper`] | `peermirror bootstrapper`: the mTLS server nodes register with and bootstrap from |
//! | [`daemon`] | the composition root: builds every part, runs them as supervised tasks, stops them in order |
//! | [`cli`] | flags → each module's own configuration |

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

/// Entry points for the fuzz targets in `fuzz/` (built with `--cfg
/// fuzzing` by cargo fuzz only): the parsers of input from the network and
/// from files, which must answer every input with a value or an error.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// The registry port's request-head parser.
    pub fn request_head(bytes: &[u8]) {
        let mut buf = bytes::BytesMut::from(bytes);
        let _ = crate::registry::http::parse_head(&mut buf);
    }

    /// The `hosts.toml` peermirror writes, from an arbitrary original.
    pub fn hosts_toml(original: &str) {
        let opts = crate::containerd_config::ConfigureOptions {
            config_path: std::path::PathBuf::from("/nonexistent"),
            registries: vec!["docker.io".into()],
            mirror_targets: vec!["http://127.0.0.1:5000".into()],
            resolve_tags: true,
            prepend_existing: true,
            disable_default_endpoint: false,
            tls: None,
            endpoints: Default::default(),
            server_tls: Default::default(),
            dial_timeout: Some(std::time::Duration::from_secs(2)),
            credentials_left: Vec::new(),
        };
        if let Ok(text) = crate::containerd_config::render("docker.io", &opts, Some(original)) {
            // What we write is TOML containerd can read.
            assert!(text.parse::<toml_edit::DocumentMut>().is_ok(), "{text}");
        }
    }

    /// A K3s `registries.yaml`: parsed or refused, and what it asks for
    /// renders into TOML containerd can read.
    pub fn registries_yaml(text: &str) {
        use crate::containerd_config::{ConfigureOptions, registries_yaml};
        let Ok(yaml) = registries_yaml::parse(text, std::path::Path::new("registries.yaml")) else {
            return;
        };
        let opts = ConfigureOptions {
            config_path: std::path::PathBuf::from("/nonexistent"),
            registries: Vec::new(),
            mirror_targets: vec!["http://127.0.0.1:5000".into()],
            resolve_tags: true,
            prepend_existing: false,
            disable_default_endpoint: false,
            tls: None,
            endpoints: Default::default(),
            server_tls: Default::default(),
            dial_timeout: None,
            credentials_left: Vec::new(),
        }
        .with_registries_yaml(yaml);
        for registry in &opts.registries {
            let text = crate::containerd_config::render(registry, &opts, None)
                .unwrap_or_else(|e| panic!("rendering {registry}: {e}"));
            assert!(text.parse::<toml_edit::DocumentMut>().is_ok(), "{text}");
        }
    }

    /// The checks of containerd's `config.toml`.
    pub fn config_toml(text: &str) {
        let _ = crate::containerd_config::check_config_text(
            text,
            std::path::Path::new("config.toml"),
            std::path::Path::new("/etc/containerd/certs.d"),
        );
    }
}
