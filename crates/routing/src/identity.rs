//! The node's stable libp2p identity and the network's preshared key.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

/// File name of the key pair inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a libp2p key pair (delete it to make a new identity): {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} is not a swarm key: expected the lines `/key/swarm/psk/1.0.0/`, `/base16/` and 64 hex characters ({reason})"
    )]
    BadPsk { path: PathBuf, reason: String },
}

/// Loads the key pair from `<data_dir>/identity.key`, or creates and saves a
/// new ed25519 one (mode 0600) so that the peer id survives restarts.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let write = |p: &Path| -> std::io::Result<()> {
                // Written under a temporary name and renamed, so a crash never
                // leaves half a key behind.
                let tmp = p.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, p)
            };
            write(&path).map_err(|source| IdentityError::Write {
                path: path.clone(),
                source,
            })?;
            Ok(keypair)
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// Reads a preshared key in libp2p's swarm key format.
pub fn load_psk(path: &Path) -> Result<PreSharedKey, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim()
        .parse::<PreSharedKey>()
        .map_err(|e| IdentityError::BadPsk {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(dir.path()).expect("create");
        let b = load_or_create(dir.path()).expect("load");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE)).expect("meta");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        std::fs::write(dir.path().join(IDENTITY_FILE), b"garbage").expect("write");
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    #[test]
    fn psk_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("swarm.key");
        std::fs::write(
            &path,
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "ab".repeat(32)),
        )
        .expect("write");
        let psk = load_psk(&path).expect("valid");
        assert_eq!(psk.fingerprint().to_string().len(), 32);
        for bad in ["", "/key/swarm/psk/1.0.0/\n/base16/\nzz", &"ab".repeat(32)] {
            std::fs::write(&path, bad).expect("write");
            assert!(
                matches!(load_psk(&path), Err(IdentityError::BadPsk { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            load_psk(&dir.path().join("missing")),
            Err(IdentityError::Read { .. })
        ));
    }
}
