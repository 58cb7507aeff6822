//! mTLS for the registry port (rustls with the ring provider).
//!
//! One node certificate serves as the server certificate (the registry port
//! speaks only TLS and requires a client certificate signed by the
//! configured CA) and as the client certificate when this node fetches from
//! its peers, which it dials by IP address. The certificate must therefore
//! carry:
//! - IP subject alternative names for every address it is reached at: the
//!   node's own address (how peers dial it) and `127.0.0.1` (how the local
//!   containerd reaches it, `https://127.0.0.1:5000` in `hosts.toml`);
//! - both extended key usages, `serverAuth` and `clientAuth`;
//! - a chain to the CA given with `--tls-client-ca`, which signs every
//!   node's certificate.
//!
//! The files are watched: when they change (a rotation, or a Kubernetes
//! secret update), the configuration is rebuilt and used for new handshakes,
//! while connections in flight carry on with the one they started with. A
//! change that does not load (a half-written file) is logged and the
//! previous configuration kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;

/// The node certificate, its key and the CA of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// The registry port's mTLS, as the operator gives it: all three files or
/// none.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The node certificate (PEM). With `--tls-key` and `--tls-client-ca`,
    /// the registry port speaks only TLS and requires client certificates;
    /// the same certificate authenticates this node to its peers. It must
    /// carry IP SANs (the node's address and 127.0.0.1) and both the
    /// serverAuth and clientAuth usages.
    #[arg(long, env = "PEERMIRROR_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// The node certificate's private key (PEM).
    #[arg(long, env = "PEERMIRROR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The CA that signs every node's certificate (PEM); clients must
    /// present a certificate it signed.
    #[arg(long, env = "PEERMIRROR_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, when mTLS is on (clap asks for the three together).
    pub fn files(&self) -> Option<TlsFiles> {
        match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (Some(cert), Some(key), Some(client_ca)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            }),
            _ => None,
        }
    }
}

impl TlsFiles {
    /// The files of a directory laid out as a Kubernetes TLS secret is
    /// mounted: `tls.crt`, `tls.key` and `ca.crt`.
    pub fn from_secret_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: dir.join("ca.crt"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Builds the server and client configurations from the files.
fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&files.cert)?;
    let key = key(&files.key)?;
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.client_ca)? {
        roots.add(ca)?;
    }
    let roots = Arc::new(roots);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}

/// The current TLS configurations, replaced when the files change.
pub struct TlsState {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, Arc<ClientConfig>)>,
    stamps: RwLock<Vec<Option<SystemTime>>>,
}

impl TlsState {
    pub fn load(files: TlsFiles) -> Result<Arc<TlsState>, TlsError> {
        let configs = build(&files)?;
        let stamps = stamps(&files);
        Ok(Arc::new(TlsState {
            files,
            current: RwLock::new(configs),
            stamps: RwLock::new(stamps),
        }))
    }

    /// For new server handshakes.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// For connections to peers.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Rebuilds the configurations if the files changed since the last load.
    /// Returns whether a new configuration is in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.files);
        if *self.stamps.read().unwrap_or_else(|e| e.into_inner()) == now {
            return Ok(false);
        }
        let configs = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = configs;
        *self.stamps.write().unwrap_or_else(|e| e.into_inner()) = now;
        Ok(true)
    }

    /// Watches the files (their directories, since secrets are often
    /// replaced by renaming) and reloads on change; also checks every
    /// `interval` in case an event is missed.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
        let watcher = {
            use notify::Watcher;
            let mut watcher =
                notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
                    let _ = tx.try_send(());
                });
            if let Ok(w) = watcher.as_mut() {
                let mut dirs: Vec<&Path> =
                    [&self.files.cert, &self.files.key, &self.files.client_ca]
                        .iter()
                        .filter_map(|p| p.parent())
                        .collect();
                dirs.sort();
                dirs.dedup();
                for dir in dirs {
                    if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch certificate directory; checking every {interval:?}");
                    }
                }
            }
            watcher
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = rx.recv() => {
                    // Let a writer finish the set of files.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(interval) => {}
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate")
                }
            }
        }
        drop(watcher);
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    [&files.cert, &files.key, &files.client_ca]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        dir: tempfile::TempDir,
        files: TlsFiles,
    }

    fn pki(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let node_key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let node = params.signed_by(&node_key, &issuer).expect("node");
        let files = TlsFiles {
            cert: dir.path().join("node.crt"),
            key: dir.path().join("node.key"),
            client_ca: dir.path().join("ca.crt"),
        };
        std::fs::write(&files.cert, node.pem()).expect("write");
        std::fs::write(&files.key, node_key.serialize_pem()).expect("write");
        std::fs::write(&files.client_ca, ca.pem()).expect("write");
        Pki { dir, files }
    }

    #[test]
    fn loads_and_reloads_only_on_change() {
        let p = pki("a");
        let state = TlsState::load(p.files.clone()).expect("load");
        let first = state.server_config();
        assert!(!state.reload_if_changed().expect("unchanged"));
        assert!(Arc::ptr_eq(&first, &state.server_config()));
        // A rotation: new files, same paths.
        std::thread::sleep(Duration::from_millis(20));
        let q = pki("b");
        for (from, to) in [
            (&q.files.cert, &p.files.cert),
            (&q.files.key, &p.files.key),
            (&q.files.client_ca, &p.files.client_ca),
        ] {
            std::fs::copy(from, to).expect("copy");
        }
        assert!(state.reload_if_changed().expect("reload"));
        assert!(!Arc::ptr_eq(&first, &state.server_config()));
        // A broken file is refused and the last good configuration stays.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p.files.key, "not a key").expect("write");
        let kept = state.server_config();
        assert!(state.reload_if_changed().is_err());
        assert!(Arc::ptr_eq(&kept, &state.server_config()));
        drop(p.dir);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let p = pki("c");
        let mut files = p.files.clone();
        files.cert = p.dir.path().join("missing.crt");
        let err = TlsState::load(files).err().expect("missing");
        assert!(err.to_string().contains("missing.crt"), "{err}");
        let mut files = p.files.clone();
        std::fs::write(p.dir.path().join("empty.crt"), "").expect("write");
        files.client_ca = p.dir.path().join("empty.crt");
        assert!(matches!(
            TlsState::load(files),
            Err(TlsError::NoCertificate { .. })
        ));
        let mut files = p.files.clone();
        files.key = p.files.client_ca.clone();
        assert!(TlsState::load(files).is_err(), "a certificate is not a key");
    }
}
