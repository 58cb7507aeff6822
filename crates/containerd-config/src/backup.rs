//! The originals kept under `.peermirror-backup/`, the state that lists
//! them, and writing files without following planted symlinks.

use crate::{BACKUP_DIR, ConfigError, Report, STATE_FILE, io_err};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Which registries are managed, and which of them had a file before.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    /// Registry folder name → whether a `hosts.toml` existed before.
    pub(crate) managed: std::collections::BTreeMap<String, Original>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Original {
    pub(crate) had_file: bool,
    pub(crate) had_dir: bool,
    /// The original `hosts.toml` was a symlink to this target.
    #[serde(default)]
    pub(crate) symlink: Option<PathBuf>,
    /// sha256 of the `hosts.toml` peermirror last wrote (absent in state
    /// files of older versions: then edits cannot be told apart).
    #[serde(default)]
    pub(crate) written: Option<String>,
    /// sha256 of a `hosts.toml` peermirror was about to write when it last
    /// stopped: recorded before the file is written, so that a kill or a
    /// full disk between the two writes cannot make peermirror's own file
    /// look edited by the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pending: Option<String>,
}

pub(crate) fn fingerprint(bytes: &[u8]) -> String {
    peermirror_oci::Digest::of(bytes).to_string()
}

/// Whether the file at `path` is not peermirror's: neither what it last
/// wrote there, nor what it was about to write, nor the original it keeps
/// at `saved` (put back by a `cleanup` that was interrupted).
pub(crate) fn edited(path: &Path, original: &Original, saved: &Path) -> bool {
    let Some(written) = &original.written else {
        // Written by an older version: edits cannot be told apart.
        return false;
    };
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        // Deleted: nothing to lose.
        return false;
    };
    if meta.is_symlink() {
        // Only the user's own link, put back, is not a change.
        return original.symlink.is_none() || std::fs::read_link(path).ok() != original.symlink;
    }
    if !meta.is_file() {
        return true;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return true;
    };
    let print = fingerprint(&bytes);
    let restored = || {
        original.had_file
            && original.symlink.is_none()
            && std::fs::read(saved).is_ok_and(|b| b == bytes)
    };
    &print != written && original.pending.as_ref() != Some(&print) && !restored()
}

pub(crate) fn read_state(config_path: &Path) -> Result<State, ConfigError> {
    let path = config_path.join(BACKUP_DIR).join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ConfigError::State {
            path,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(source) => Err(ConfigError::Io { path, source }),
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename). The
/// temporary is created new (`O_EXCL`) without following a symlink
/// (`O_NOFOLLOW`); a leftover of an interrupted run is removed first. A
/// symlink at `path` itself is replaced, not followed.
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
) -> Result<(), ConfigError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("peermirror-tmp");
    let write = || -> std::io::Result<()> {
        #[cfg(test)]
        fault::before_write()?;
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode.unwrap_or(0o644))
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(mode) = mode {
            // Exactly this mode, whatever the umask.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        std::fs::rename(&tmp, path)
    };
    write().map_err(io_err(path))
}

pub(crate) fn write_state(config_path: &Path, state: &State) -> Result<(), ConfigError> {
    let dir = config_path.join(BACKUP_DIR);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| ConfigError::State {
        path: dir.join(STATE_FILE),
        reason: e.to_string(),
    })?;
    write_atomic(&dir.join(STATE_FILE), &bytes, None)
}

/// Puts `registry`'s original back; `false` when the file was edited since
/// peermirror wrote it, and is left as it is (its original stays in the
/// backup). The saved original stays too, until the caller has recorded
/// the registry as no longer managed and calls [`forget_original`]: a run
/// interrupted in between finds the file equal to it, so not edited.
/// Removes the saved original of a registry that is no longer managed.
pub(crate) fn forget_original(config_path: &Path, registry: &str) {
    let saved = config_path.join(BACKUP_DIR).join(registry);
    let _ = std::fs::remove_file(saved.join("hosts.toml"));
    let _ = std::fs::remove_dir(&saved);
}

pub(crate) fn restore_one(
    config_path: &Path,
    registry: &str,
    original: &Original,
    report: &mut Report,
) -> Result<bool, ConfigError> {
    let dir = config_path.join(registry);
    let file = dir.join("hosts.toml");
    let saved = config_path
        .join(BACKUP_DIR)
        .join(registry)
        .join("hosts.toml");
    if edited(&file, original, &saved) {
        report.kept.push(file);
        return Ok(false);
    }
    if let Some(target) = &original.symlink {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Io { path: file, source }),
        }
        std::os::unix::fs::symlink(target, &file).map_err(io_err(&file))?;
        report.restored.push(file);
    } else if original.had_file {
        let bytes = std::fs::read(&saved).map_err(io_err(&saved))?;
        let mode = std::fs::metadata(&saved).map_err(io_err(&saved))?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        write_atomic(
            &file,
            &bytes,
            Some(std::os::unix::fs::PermissionsExt::mode(&mode.permissions())),
        )?;
        report.restored.push(file);
    } else {
        match std::fs::remove_file(&file) {
            Ok(()) => report.removed.push(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Io { path: file, source }),
        }
        if !original.had_dir {
            // Only if empty: anything the user put there since stays.
            let _ = std::fs::remove_dir(&dir);
        }
    }
    Ok(true)
}

/// A fault-injection hook for the tests: stops every write after the next
/// `n`, as a kill or a full disk would between two steps.
#[cfg(test)]
pub(crate) mod fault {
    use std::cell::Cell;

    thread_local! {
        static WRITES_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// Lets `n` more writes happen on this thread (`None`: no limit).
    pub(crate) fn allow(n: Option<usize>) {
        WRITES_LEFT.with(|w| w.set(n));
    }

    pub(super) fn before_write() -> std::io::Result<()> {
        WRITES_LEFT.with(|w| match w.get() {
            Some(0) => Err(std::io::Error::other("injected fault before a write")),
            Some(n) => {
                w.set(Some(n - 1));
                Ok(())
            }
            None => Ok(()),
        })
    }
}
