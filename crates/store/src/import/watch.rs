//! `--import-dir`: the archives of a directory, imported at start and
//! whenever a new one appears.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{ImportError, Importer};

/// File names `--import-dir` picks up.
pub(super) fn is_archive_name(name: &str) -> bool {
    [".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// How often `--import-dir` is looked at.
const IMPORT_DIR_POLL: Duration = Duration::from_secs(2);

/// `run --import-dir`: imports the archives in `dir` at start and each new
/// or changed one later, once its size and mtime held still for one poll
/// (so that a file being copied in is not read half-written). Each archive
/// is tried once per version; failures are logged, not retried.
pub async fn watch_dir(
    importer: Importer,
    dir: PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
) {
    type Version = (u64, Option<SystemTime>);
    let mut done: HashMap<PathBuf, Version> = HashMap::new();
    let mut seen: HashMap<PathBuf, Version> = HashMap::new();
    let mut reported_missing = false;
    loop {
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                reported_missing = false;
                let mut now_seen = HashMap::new();
                for entry in entries.flatten() {
                    let path = entry.path();
                    let name = entry.file_name().to_string_lossy().to_string();
                    let Ok(meta) = std::fs::metadata(&path) else {
                        continue;
                    };
                    if !meta.is_file() || name.starts_with('.') || !is_archive_name(&name) {
                        continue;
                    }
                    let version = (meta.len(), meta.modified().ok());
                    now_seen.insert(path.clone(), version);
                    let stable = seen.get(&path) == Some(&version);
                    if !stable || done.get(&path) == Some(&version) {
                        continue;
                    }
                    done.insert(path.clone(), version);
                    match importer.import(&path).await {
                        Ok(images) => {
                            for image in images {
                                tracing::info!(archive = %path.display(), image = %image.name, digest = %image.digest, "imported and pinned");
                            }
                        }
                        Err(ImportError::Grpc { call, status })
                            if status.code() == tonic::Code::Unavailable =>
                        {
                            // containerd is not there (yet): try again.
                            tracing::debug!(call, error = %status, archive = %path.display(), "import waits for containerd");
                            done.remove(&path);
                        }
                        Err(e) => tracing::warn!(error = %e, "import failed"),
                    }
                }
                seen = now_seen;
            }
            Err(e) => {
                if !reported_missing {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the import directory; looking again every 2 s");
                    reported_missing = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(IMPORT_DIR_POLL) => {}
        }
    }
}
