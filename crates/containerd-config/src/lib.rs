//! Writing containerd's registry host configuration
//! (`<config path>/<registry>/hosts.toml`) so that containerd asks
//! peermirror first, and restoring exactly what was there before.
//!
//! Uses `oci` only (registry names).
//!
//! - Before a registry's file is first replaced, the original (or the fact
//!   that there was none) is saved under `<config path>/.peermirror-backup/`.
//!   Running `configure` again changes nothing when nothing changed, and
//!   `cleanup` puts every original back, byte for byte.
//! - Each written file lists the mirror targets first, then (with
//!   `prepend_existing`) the mirrors the original file had, then the
//!   registry's own server, which containerd always tries last.
//! - A file the user edited after peermirror wrote it is never overwritten
//!   or thrown away: `configure` refuses to touch it and says why, and
//!   `cleanup` leaves it in place (with the original kept in the backup).
//! - A `hosts.toml` that is a symlink is backed up and restored as that
//!   symlink; files are written through a temporary created with
//!   `O_EXCL | O_NOFOLLOW`, so no symlink planted in the directory is
//!   followed.
//! - containerd's own `config.toml` is read to tell the user, in plain words,
//!   when the CRI plugin (kubelet's pulls) would ignore these files, or would
//!   leave nothing to share.

mod backup;
mod check;
pub mod k3s;
pub mod registries_yaml;
mod render;

use backup::*;
pub use check::{Finding, check_config_text, check_containerd_config};
use render::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The directory (inside the config path) holding the originals.
pub const BACKUP_DIR: &str = ".peermirror-backup";
/// containerd's name for "every registry without its own folder".
pub const DEFAULT_HOST: &str = "_default";
const STATE_FILE: &str = "state.json";
const HEADER: &str = "# Written by `peermirror configure-containerd`; `peermirror cleanup-containerd` restores the original.\n";

/// TLS material containerd uses to talk to a mirror target over mTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTls {
    /// CA certificate that signed the mirror's server certificate.
    pub ca: PathBuf,
    /// Client certificate and key containerd presents.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ConfigureOptions {
    /// containerd's `config_path` (`/etc/containerd/certs.d`).
    pub config_path: PathBuf,
    /// Registries to configure; empty means every registry (`_default`).
    pub registries: Vec<String>,
    /// Mirror URLs, tried in this order (`http://127.0.0.1:5000`).
    pub mirror_targets: Vec<String>,
    /// Whether mirrors may answer tag lookups (`resolve` capability).
    pub resolve_tags: bool,
    /// Keep the mirrors of the original file, after ours.
    pub prepend_existing: bool,
    /// Never fall back to the registry itself for pulls.
    pub disable_default_endpoint: bool,
    pub tls: Option<TargetTls>,
    /// Per registry, the endpoints tried after the mirror targets (from a
    /// K3s `registries.yaml`), in order.
    pub endpoints: BTreeMap<String, Vec<registries_yaml::Endpoint>>,
    /// Per registry, TLS settings for its own server.
    pub server_tls: BTreeMap<String, registries_yaml::Tls>,
    /// containerd's `dial_timeout` for the mirror targets (containerd
    /// 2.0.7+/2.1+; older releases ignore the key).
    pub dial_timeout: Option<std::time::Duration>,
    /// Hosts of a `registries.yaml` whose credentials are not written
    /// (`hosts.toml` has no place for them), to tell the user.
    pub credentials_left: Vec<String>,
}

impl ConfigureOptions {
    /// The options for the registries a K3s `registries.yaml` lists.
    pub fn with_registries_yaml(mut self, yaml: registries_yaml::RegistriesYaml) -> Self {
        self.registries = yaml.registries.keys().cloned().collect();
        self.endpoints = yaml.registries;
        self.server_tls = yaml.server_tls;
        self.credentials_left = yaml.credentials_left;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML: {reason}")]
    Toml { path: PathBuf, reason: String },
    #[error("{path} is corrupt ({reason}); restore it by hand or remove it")]
    State { path: PathBuf, reason: String },
    #[error("no mirror targets given (e.g. --mirror-targets http://127.0.0.1:5000)")]
    NoTargets,
    #[error("invalid mirror target {target:?}: it must start with http:// or https://")]
    BadTarget { target: String },
    #[error("invalid registry {registry:?}")]
    BadRegistry { registry: String },
    #[error(
        "{path} was changed after peermirror wrote it; it is left as it is. Move your change into the original \
         ({original}, which cleanup-containerd restores) or delete {path}, then run configure-containerd again"
    )]
    Edited { path: PathBuf, original: String },
    #[error(transparent)]
    RegistriesYaml(Box<registries_yaml::RegistriesYamlError>),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What happened to each file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub written: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
    pub restored: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
    /// Files the user edited after peermirror wrote them: left in place.
    pub kept: Vec<PathBuf>,
}

fn validate(opts: &ConfigureOptions) -> Result<Vec<String>, ConfigError> {
    if opts.mirror_targets.is_empty() {
        return Err(ConfigError::NoTargets);
    }
    for target in &opts.mirror_targets {
        if !(target.starts_with("http://") || target.starts_with("https://")) {
            return Err(ConfigError::BadTarget {
                target: target.clone(),
            });
        }
    }
    let registries: Vec<String> = if opts.registries.is_empty() {
        vec![DEFAULT_HOST.to_string()]
    } else {
        opts.registries.clone()
    };
    for r in &registries {
        let ok = r == DEFAULT_HOST || r.parse::<peermirror_oci::Registry>().is_ok();
        if !ok || r.contains('/') || r.starts_with('.') {
            return Err(ConfigError::BadRegistry {
                registry: r.clone(),
            });
        }
    }
    Ok(registries)
}

/// Writes `hosts.toml` for each registry, backing up originals first.
pub fn configure(opts: &ConfigureOptions) -> Result<Report, ConfigError> {
    let registries = validate(opts)?;
    std::fs::create_dir_all(&opts.config_path).map_err(io_err(&opts.config_path))?;
    let mut state = read_state(&opts.config_path)?;
    let mut report = Report::default();
    let backup_root = opts.config_path.join(BACKUP_DIR);

    // Registries configured before but not any more get their original back.
    let wanted: BTreeSet<&str> = registries.iter().map(String::as_str).collect();
    let dropped: Vec<String> = state
        .managed
        .keys()
        .filter(|r| !wanted.contains(r.as_str()))
        .cloned()
        .collect();
    for registry in dropped {
        if let Some(original) = state.managed.get(&registry).cloned()
            && restore_one(&opts.config_path, &registry, &original, &mut report)?
        {
            state.managed.remove(&registry);
            write_state(&opts.config_path, &state)?;
            forget_original(&opts.config_path, &registry);
        }
    }

    for registry in &registries {
        let dir = opts.config_path.join(registry);
        let file = dir.join("hosts.toml");
        let original_path = backup_root.join(registry).join("hosts.toml");
        match state.managed.get(registry) {
            Some(original) if edited(&file, original, &original_path) => {
                return Err(ConfigError::Edited {
                    path: file,
                    original: if original.had_file {
                        original_path.display().to_string()
                    } else {
                        "there was none".to_string()
                    },
                });
            }
            Some(_) => {}
            None => {
                // First time: save the original before touching anything.
                let had_dir = dir.is_dir();
                let link = std::fs::symlink_metadata(&file)
                    .ok()
                    .filter(|m| m.file_type().is_symlink())
                    .and_then(|_| std::fs::read_link(&file).ok());
                let had_file = file.is_file() || link.is_some();
                if had_file {
                    let saved = backup_root.join(registry);
                    std::fs::create_dir_all(&saved).map_err(io_err(&saved))?;
                    // The content, as containerd reads it (through a link);
                    // a dangling link has none.
                    let bytes = std::fs::read(&file).unwrap_or_default();
                    let mode = std::fs::metadata(&file)
                        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
                        .unwrap_or(0o644);
                    write_atomic(&original_path, &bytes, Some(mode))?;
                }
                state.managed.insert(
                    registry.clone(),
                    Original {
                        had_file,
                        had_dir,
                        symlink: link,
                        written: None,
                        pending: None,
                    },
                );
                write_state(&opts.config_path, &state)?;
            }
        }
        let original = match std::fs::read_to_string(&original_path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(ConfigError::Io {
                    path: original_path,
                    source,
                });
            }
        };
        let rendered =
            render(registry, opts, original.as_deref()).map_err(|reason| ConfigError::Toml {
                path: original_path.clone(),
                reason,
            })?;
        let print = fingerprint(rendered.as_bytes());
        let regular = std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file());
        let on_disk = regular.then(|| std::fs::read(&file).ok()).flatten();
        let unchanged = on_disk.as_deref() == Some(rendered.as_bytes());
        // What is about to be written is recorded first, beside what is on
        // disk now, and only then the file: whatever step a kill or a full
        // disk interrupts, the file on disk is one the state knows.
        if let Some(original) = state.managed.get_mut(registry)
            && !unchanged
            && original.pending.as_ref() != Some(&print)
        {
            if let Some(bytes) = &on_disk {
                original.written = Some(fingerprint(bytes));
            }
            original.pending = Some(print.clone());
            write_state(&opts.config_path, &state)?;
        }
        if unchanged {
            report.unchanged.push(file);
        } else {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            write_atomic(&file, rendered.as_bytes(), Some(0o644))?;
            report.written.push(file);
        }
        if let Some(original) = state.managed.get_mut(registry)
            && (original.written.as_ref() != Some(&print) || original.pending.is_some())
        {
            original.written = Some(print);
            original.pending = None;
            write_state(&opts.config_path, &state)?;
        }
    }
    Ok(report)
}

/// Puts back every original file and removes the backup.
pub fn cleanup(config_path: &Path) -> Result<Report, ConfigError> {
    let mut state = read_state(config_path)?;
    let mut report = Report::default();
    let registries: Vec<String> = state.managed.keys().cloned().collect();
    for registry in registries {
        if let Some(original) = state.managed.get(&registry).cloned()
            && restore_one(config_path, &registry, &original, &mut report)?
        {
            state.managed.remove(&registry);
            write_state(config_path, &state)?;
            forget_original(config_path, &registry);
        }
    }
    if !state.managed.is_empty() {
        // Edited files were kept: their originals stay in the backup.
        return Ok(report);
    }
    let backup = config_path.join(BACKUP_DIR);
    match std::fs::remove_dir_all(&backup) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ConfigError::Io {
                path: backup,
                source,
            });
        }
    }
    Ok(report)
}

/// Entry points for the fuzz targets in `fuzz/` (built with `--cfg
/// fuzzing` by cargo fuzz only): the parsers of files peermirror reads,
/// which must answer every input with a value or an error.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// The `hosts.toml` peermirror writes, from an arbitrary original.
    pub fn hosts_toml(original: &str) {
        let opts = crate::ConfigureOptions {
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
        if let Ok(text) = crate::render("docker.io", &opts, Some(original)) {
            // What we write is TOML containerd can read.
            assert!(text.parse::<toml_edit::DocumentMut>().is_ok(), "{text}");
        }
    }

    /// A K3s `registries.yaml`: parsed or refused, and what it asks for
    /// renders into TOML containerd can read.
    pub fn registries_yaml(text: &str) {
        use crate::{ConfigureOptions, registries_yaml};
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
            let text = crate::render(registry, &opts, None)
                .unwrap_or_else(|e| panic!("rendering {registry}: {e}"));
            assert!(text.parse::<toml_edit::DocumentMut>().is_ok(), "{text}");
        }
    }

    /// The checks of containerd's `config.toml`.
    pub fn config_toml(text: &str) {
        let _ = crate::check_config_text(
            text,
            std::path::Path::new("config.toml"),
            std::path::Path::new("/etc/containerd/certs.d"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use toml_edit::DocumentMut;

    fn opts(dir: &Path, registries: &[&str]) -> ConfigureOptions {
        ConfigureOptions {
            config_path: dir.to_path_buf(),
            registries: registries.iter().map(|s| s.to_string()).collect(),
            mirror_targets: vec!["http://127.0.0.1:5000".into()],
            resolve_tags: true,
            prepend_existing: false,
            disable_default_endpoint: false,
            tls: None,
            endpoints: BTreeMap::new(),
            server_tls: BTreeMap::new(),
            dial_timeout: None,
            credentials_left: Vec::new(),
        }
    }

    /// Every file under `dir` with its bytes.
    fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
        let mut out = std::collections::BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    out.insert(p.clone(), Vec::new());
                    stack.push(p);
                } else {
                    out.insert(p.clone(), std::fs::read(&p).expect("read"));
                }
            }
        }
        out
    }

    /// A kill or a full disk between any two writes of `configure` (the
    /// first render, or a later one with other options) or of `cleanup`
    /// leaves files that peermirror still knows as its own. Afterwards
    /// `configure` goes on, and `cleanup` (right away, or after that
    /// `configure`) puts the user's original back.
    #[test]
    fn an_interrupted_run_never_looks_edited() {
        const REGISTRY: &str = "registry.example.com";
        let original = "server = \"https://registry.example.com\"\n# the user's\n";
        let first = opts(Path::new("/"), &[REGISTRY]);
        let mut second = first.clone();
        second.resolve_tags = false;
        // The runs before the interrupted one, which is last.
        let sequences: [&[Option<&ConfigureOptions>]; 3] = [
            &[Some(&first)],
            &[Some(&first), Some(&second)],
            &[Some(&first), Some(&second), None],
        ];
        for runs in sequences {
            let last = runs.len() - 1;
            let latest = runs.iter().rev().flatten().next().expect("a configure");
            for stop_after in 0.. {
                let mut finished = false;
                for configure_again in [true, false] {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let here = |o: &ConfigureOptions| ConfigureOptions {
                        config_path: dir.path().to_path_buf(),
                        ..o.clone()
                    };
                    let file = dir.path().join(REGISTRY).join("hosts.toml");
                    std::fs::create_dir_all(file.parent().expect("dir")).expect("mkdir");
                    std::fs::write(&file, original).expect("write");
                    for (i, run) in runs.iter().enumerate() {
                        if i == last {
                            backup::fault::allow(Some(stop_after));
                        }
                        let result = match run {
                            Some(o) => configure(&here(o)).map(drop),
                            None => cleanup(dir.path()).map(drop),
                        };
                        backup::fault::allow(None);
                        if i == last {
                            finished = result.is_ok();
                        } else {
                            result.expect("an uninterrupted run");
                        }
                    }
                    let step = format!("run {last} stopped after {stop_after} writes");
                    if configure_again {
                        let o = here(latest);
                        configure(&o).unwrap_or_else(|e| panic!("{step}: configure: {e}"));
                        let text = std::fs::read_to_string(&file).expect("read");
                        assert!(text.contains("127.0.0.1:5000"), "{step}: {text}");
                        assert_eq!(text.contains("resolve"), o.resolve_tags, "{step}: {text}");
                    }
                    let report = cleanup(dir.path()).unwrap_or_else(|e| panic!("{step}: {e}"));
                    assert!(report.kept.is_empty(), "{step}: kept {:?}", report.kept);
                    assert_eq!(
                        std::fs::read_to_string(&file).expect("read"),
                        original,
                        "{step}"
                    );
                    assert!(!dir.path().join(BACKUP_DIR).exists(), "{step}");
                }
                if finished {
                    // Every write of this run was interrupted once.
                    assert!(stop_after >= 2, "run {last}: {stop_after} writes");
                    break;
                }
            }
        }
    }

    #[test]
    fn a_registries_yaml_keeps_its_endpoints_after_peermirror() {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = registries_yaml::parse(
            "mirrors:\n  docker.io:\n  ghcr.io:\n    endpoint:\n      - https://m1.example.com:5000\n      - https://m2.example.com/v2/ghcr\n  \"*\":\nconfigs:\n  m1.example.com:5000:\n    tls:\n      ca_file: /etc/ssl/m1.pem\n  ghcr.io:\n    tls:\n      insecure_skip_verify: true\n",
            Path::new("registries.yaml"),
        )
        .expect("parse");
        let mut o = opts(dir.path(), &[]).with_registries_yaml(yaml);
        o.dial_timeout = Some(std::time::Duration::from_millis(1500));
        let report = configure(&o).expect("configure");
        assert_eq!(report.written.len(), 3);
        let ghcr = std::fs::read_to_string(dir.path().join("ghcr.io/hosts.toml")).expect("read");
        let doc: DocumentMut = ghcr.parse().expect("toml");
        let hosts: Vec<&str> = doc["host"]
            .as_table()
            .expect("hosts")
            .iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            hosts,
            [
                "http://127.0.0.1:5000",
                "https://m1.example.com:5000",
                "https://m2.example.com/v2/ghcr"
            ]
        );
        assert_eq!(doc["server"].as_str(), Some("https://ghcr.io"));
        assert_eq!(doc["skip_verify"].as_bool(), Some(true));
        let own = &doc["host"]["http://127.0.0.1:5000"];
        assert_eq!(own["dial_timeout"].as_str(), Some("1500ms"));
        let m1 = &doc["host"]["https://m1.example.com:5000"];
        assert_eq!(m1["ca"].as_str(), Some("/etc/ssl/m1.pem"));
        assert!(
            m1.get("dial_timeout").is_none(),
            "only our own targets get ours"
        );
        assert_eq!(
            doc["host"]["https://m2.example.com/v2/ghcr"]["override_path"].as_bool(),
            Some(true)
        );
        // "*" is containerd's _default; docker.io has only peermirror.
        let default =
            std::fs::read_to_string(dir.path().join("_default/hosts.toml")).expect("read");
        assert!(default.contains("http://127.0.0.1:5000") && !default.contains("server"));
        let docker =
            std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).expect("read");
        assert!(docker.contains("https://registry-1.docker.io"), "{docker}");
    }

    #[test]
    fn writes_peermirror_first_and_the_server_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = configure(&opts(dir.path(), &["docker.io", "ghcr.io"])).expect("configure");
        assert_eq!(report.written.len(), 2);
        let docker =
            std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).expect("read");
        let parsed: DocumentMut = docker.parse().expect("toml");
        assert_eq!(
            parsed["server"].as_str(),
            Some("https://registry-1.docker.io")
        );
        let hosts = parsed["host"].as_table().expect("hosts");
        assert_eq!(
            hosts.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["http://127.0.0.1:5000"]
        );
        assert!(
            docker.contains(r#"capabilities = ["pull", "resolve"]"#),
            "{docker}"
        );
        assert!(
            docker.contains("[host.\"http://127.0.0.1:5000\"]"),
            "{docker}"
        );
        let ghcr = std::fs::read_to_string(dir.path().join("ghcr.io/hosts.toml")).expect("read");
        assert!(ghcr.contains(r#"server = "https://ghcr.io""#));
    }

    #[test]
    fn default_covers_every_registry_and_resolve_tags_can_be_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = opts(dir.path(), &[]);
        o.resolve_tags = false;
        o.disable_default_endpoint = true;
        configure(&o).expect("configure");
        let text = std::fs::read_to_string(dir.path().join("_default/hosts.toml")).expect("read");
        let parsed: DocumentMut = text.parse().expect("toml");
        assert!(parsed.get("server").is_none());
        assert!(text.contains(r#"capabilities = ["pull"]"#), "{text}");
        assert!(text.contains(r#"capabilities = ["push"]"#), "{text}");
    }

    #[test]
    fn idempotent_and_cleanup_restores_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let user = "# my mirror\nserver = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.corp:443\"]\n  capabilities = [\"pull\"]   # keep me\n";
        std::fs::create_dir_all(dir.path().join("docker.io")).expect("mkdir");
        std::fs::write(dir.path().join("docker.io/hosts.toml"), user).expect("write");
        std::fs::set_permissions(
            dir.path().join("docker.io/hosts.toml"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        std::fs::create_dir_all(dir.path().join("quay.io")).expect("mkdir");
        std::fs::write(dir.path().join("quay.io/ca.crt"), b"cert").expect("write");
        let before = snapshot(dir.path());

        let mut o = opts(dir.path(), &["docker.io", "quay.io", "ghcr.io"]);
        o.prepend_existing = true;
        let first = configure(&o).expect("configure");
        assert_eq!(first.written.len(), 3);
        let text = std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).expect("read");
        let mine = text.find("127.0.0.1:5000").expect("ours");
        let theirs = text.find("mirror.corp").expect("theirs kept");
        assert!(mine < theirs, "peermirror must come first:\n{text}");
        assert!(text.contains("# keep me"), "user formatting kept:\n{text}");

        let after_first = snapshot(dir.path());
        let second = configure(&o).expect("configure again");
        assert!(second.written.is_empty(), "{second:?}");
        assert_eq!(second.unchanged.len(), 3);
        assert_eq!(
            snapshot(dir.path()),
            after_first,
            "a second run changed something"
        );

        let report = cleanup(dir.path()).expect("cleanup");
        assert_eq!(report.restored.len(), 1);
        assert_eq!(
            snapshot(dir.path()),
            before,
            "cleanup did not restore exactly"
        );
        let mode = std::fs::metadata(dir.path().join("docker.io/hosts.toml")).expect("meta");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        // Cleanup twice is harmless.
        cleanup(dir.path()).expect("cleanup again");
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn an_edit_made_after_configure_is_never_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("docker.io/hosts.toml");
        configure(&opts(dir.path(), &["docker.io"])).expect("configure");
        let edit = "server = \"https://registry-1.docker.io\"\n# the user's own change\n";
        std::fs::write(&file, edit).expect("edit");
        let err = configure(&opts(dir.path(), &["docker.io"])).expect_err("refuses");
        assert!(matches!(err, ConfigError::Edited { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("changed after peermirror wrote it"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&file).expect("read"), edit);
        let report = cleanup(dir.path()).expect("cleanup");
        assert_eq!(report.kept, std::slice::from_ref(&file));
        assert_eq!(std::fs::read_to_string(&file).expect("read"), edit);
        // Once the user resolves it (here: deletes the file), all goes on.
        std::fs::remove_file(&file).expect("rm");
        let report = cleanup(dir.path()).expect("cleanup");
        assert!(report.kept.is_empty());
        assert!(!dir.path().join(BACKUP_DIR).exists());
    }

    #[test]
    fn a_symlinked_hosts_toml_comes_back_as_that_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = dir.path().join("managed-elsewhere.toml");
        let theirs = "server = \"https://mirror.corp\"\n";
        std::fs::write(&elsewhere, theirs).expect("write");
        std::fs::create_dir_all(dir.path().join("docker.io")).expect("mkdir");
        let file = dir.path().join("docker.io/hosts.toml");
        std::os::unix::fs::symlink(&elsewhere, &file).expect("symlink");
        let mut o = opts(dir.path(), &["docker.io"]);
        o.prepend_existing = true;
        configure(&o).expect("configure");
        // Ours now, and the link's target untouched.
        let ours = std::fs::read_to_string(&file).expect("read");
        assert!(
            ours.contains("127.0.0.1:5000") && ours.contains("mirror.corp"),
            "{ours}"
        );
        assert!(std::fs::symlink_metadata(&file).expect("meta").is_file());
        assert_eq!(std::fs::read_to_string(&elsewhere).expect("read"), theirs);
        configure(&o).expect("idempotent");
        cleanup(dir.path()).expect("cleanup");
        assert_eq!(
            std::fs::read_link(&file).expect("a symlink again"),
            elsewhere
        );
        assert_eq!(std::fs::read_to_string(&elsewhere).expect("read"), theirs);
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").expect("write");
        std::fs::create_dir_all(dir.path().join("docker.io")).expect("mkdir");
        let tmp = dir.path().join("docker.io/hosts.peermirror-tmp");
        std::os::unix::fs::symlink(&victim, &tmp).expect("symlink");
        configure(&opts(dir.path(), &["docker.io"])).expect("configure");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
        assert!(
            std::fs::read_to_string(dir.path().join("docker.io/hosts.toml"))
                .expect("read")
                .contains("127.0.0.1:5000")
        );
    }

    #[test]
    fn dropping_a_registry_restores_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        configure(&opts(dir.path(), &["docker.io", "ghcr.io"])).expect("configure");
        configure(&opts(dir.path(), &["docker.io"])).expect("configure");
        assert!(!dir.path().join("ghcr.io").exists());
        assert!(dir.path().join("docker.io/hosts.toml").exists());
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = opts(dir.path(), &["docker.io"]);
        o.mirror_targets = vec!["127.0.0.1:5000".into()];
        assert!(matches!(configure(&o), Err(ConfigError::BadTarget { .. })));
        o.mirror_targets.clear();
        assert!(matches!(configure(&o), Err(ConfigError::NoTargets)));
        for bad in ["../etc", ".peermirror-backup", "a/b"] {
            assert!(
                matches!(
                    configure(&opts(dir.path(), &[bad])),
                    Err(ConfigError::BadRegistry { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).expect("read").count(), 0);
        // An original that is not TOML is an error, not silently replaced.
        std::fs::create_dir_all(dir.path().join("docker.io")).expect("mkdir");
        std::fs::write(dir.path().join("docker.io/hosts.toml"), "[[[").expect("write");
        assert!(matches!(
            configure(&opts(dir.path(), &["docker.io"])),
            Err(ConfigError::Toml { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).expect("read"),
            "[[["
        );
    }

    #[test]
    fn tls_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = opts(dir.path(), &["docker.io"]);
        o.mirror_targets = vec!["https://127.0.0.1:5000".into()];
        o.tls = Some(TargetTls {
            ca: "/etc/peermirror/ca.crt".into(),
            client_cert: "/etc/peermirror/node.crt".into(),
            client_key: "/etc/peermirror/node.key".into(),
        });
        configure(&o).expect("configure");
        let text = std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).expect("read");
        assert!(text.contains(r#"ca = "/etc/peermirror/ca.crt""#), "{text}");
        assert!(
            text.contains(r#"client = [["/etc/peermirror/node.crt", "/etc/peermirror/node.key"]]"#),
            "{text}"
        );
    }

    #[test]
    fn containerd_config_findings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = Path::new("/etc/containerd/certs.d");
        let file = dir.path().join("config.toml");
        let check = |text: &str| {
            std::fs::write(&file, text).expect("write");
            check_containerd_config(&file, certs)
        };
        let good = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
        assert!(check(good).is_empty());
        let v3 = "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n  discard_unpacked_layers = false\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
        assert!(check(v3).is_empty(), "{:?}", check(v3));
        let unset = check("version = 2\n");
        assert_eq!(unset.len(), 1);
        assert!(unset[0].0.contains("config_path"));
        let other = check(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/other\"\n",
        );
        assert!(other[0].0.contains("/other"));
        let legacy = check(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://x\"]\n",
        );
        assert!(legacy.iter().any(|f| f.0.contains("mirrors")), "{legacy:?}");
        let discard = check(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  discard_unpacked_layers = true\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
        );
        assert!(
            discard
                .iter()
                .any(|f| f.0.contains("discard_unpacked_layers")),
            "{discard:?}"
        );
        assert_eq!(check("[[[").len(), 1);
        assert_eq!(
            check_containerd_config(&dir.path().join("missing"), certs).len(),
            1
        );
    }
}
