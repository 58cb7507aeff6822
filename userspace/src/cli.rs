//! Command-line flags. Each flag is defined once, with its environment
//! variable, default and help; [`Run::into_config`] turns them into the typed
//! configuration each module takes.
//!
//! Flag names follow Spegel's where Spegel has the same option, so that a
//! deployment can switch by changing the image.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::daemon::DaemonConfig;
use peermirror_mirror::MirrorConfig;
pub use peermirror_net::flags::{parse_duration, parse_listen_addr, parse_size};
use peermirror_oci::{ReferenceFilter, Registry};
use peermirror_registry::RegistrySettings;
use peermirror_routing::bootstrap::BootstrapArgs;
use peermirror_routing::p2p::P2pSettings;
use peermirror_store::ContainerdConfig;

#[derive(Debug, Parser)]
#[command(
    name = "peermirror",
    version = crate::VERSION,
    about = "Peer-to-peer container image mirror for containerd nodes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon: serve this node's containerd images to its peers.
    Run(Box<Run>),
    /// Make containerd ask peermirror first: write `<config path>/<registry>/hosts.toml`
    /// (the originals are backed up), and check containerd's own configuration.
    ConfigureContainerd(ConfigureContainerd),
    /// Restore the `hosts.toml` files `configure-containerd` replaced, exactly.
    CleanupContainerd(CleanupContainerd),
    /// Leave the node as it was before the install: `cleanup-containerd`,
    /// then remove the daemon's data directory and its bpffs pins. Run it
    /// after the daemon stopped.
    Uninstall(Uninstall),
    /// Import image archives into containerd (pinned, so that kubelet's
    /// image garbage collection keeps them); the running daemon shares them.
    Import(Import),
    /// Write a new random preshared key in libp2p's swarm key format.
    GeneratePsk(GeneratePsk),
    /// Serve HTTPS bootstrap for the nodes (mTLS only): nodes register and
    /// renew their entry; `GET /bootstrap-nodes` lists the live ones.
    Bootstrapper(Bootstrapper),
}

#[derive(Debug, Args)]
pub struct Bootstrapper {
    /// Address of the mTLS port (`/bootstrap-nodes`).
    #[arg(long, env = "PEERMIRROR_BOOTSTRAPPER_ADDR", default_value = ":8443", value_parser = parse_listen_addr)]
    pub addr: SocketAddr,

    /// Address of the plain status port (`/metrics`, `/healthz`, `/readyz`).
    #[arg(
        long = "metrics-addr",
        value_name = "METRICS_ADDR",
        env = "PEERMIRROR_BOOTSTRAPPER_METRICS_ADDR",
        default_value = ":9091",
        value_parser = parse_listen_addr
    )]
    pub status_addr: SocketAddr,

    /// A directory with `tls.crt` and `tls.key` (the server certificate)
    /// and `ca.crt` (the CA, or CAs, whose client certificates are
    /// accepted), as a Kubernetes TLS secret mounts them; reloaded when
    /// they change.
    #[arg(long, env = "PEERMIRROR_BOOTSTRAPPER_CERT_DIR")]
    pub cert_dir: PathBuf,

    /// How long a node's entry lives without renewal (nodes renew at a
    /// third of it).
    #[arg(long, env = "PEERMIRROR_BOOTSTRAPPER_ENTRY_TTL", default_value = "3m", value_parser = parse_duration)]
    pub entry_ttl: Duration,

    /// Entries one client certificate may hold at once; a registration of
    /// another peer beyond replaces that certificate's least recently
    /// renewed entry. Raise it to the node count where nodes share one
    /// certificate (say, from one Secret).
    #[arg(
        long,
        env = "PEERMIRROR_BOOTSTRAPPER_MAX_ENTRIES_PER_CERTIFICATE",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub max_entries_per_certificate: u32,

    #[command(flatten)]
    pub log: LogArgs,
}

impl Bootstrapper {
    pub fn into_config(self) -> crate::bootstrapper::BootstrapperConfig {
        crate::bootstrapper::BootstrapperConfig {
            listen_addr: self.addr,
            status_addr: self.status_addr,
            tls: peermirror_net::tls::TlsFiles::from_secret_dir(&self.cert_dir),
            entry_ttl: self.entry_ttl.max(Duration::from_secs(3)),
            max_entries_per_certificate: self.max_entries_per_certificate as usize,
        }
    }
}

/// Where containerd's registry host configuration lives (shared by the
/// subcommands that read or write it).
#[derive(Debug, Args)]
pub struct HostsDir {
    /// containerd's registry host configuration directory (the CRI plugin's
    /// `config_path`).
    #[arg(
        long,
        env = "PEERMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH",
        default_value = "/etc/containerd/certs.d"
    )]
    pub containerd_registry_config_path: PathBuf,
}

/// Which registries peermirror mirrors (shared by `run` and
/// `configure-containerd`, which must agree).
#[derive(Debug, Args)]
pub struct MirroredRegistries {
    /// Registries mirrored, comma-separated (`docker.io,ghcr.io`); empty means
    /// every registry (`configure-containerd` then writes the `_default`
    /// folder, which applies to every registry without a folder of its own).
    #[arg(long, env = "PEERMIRROR_MIRRORED_REGISTRIES", value_delimiter = ',', num_args = 1.., value_parser = parse_registry)]
    pub mirrored_registries: Vec<Registry>,
}

/// Which images this node serves, mirrors and advertises.
#[derive(Debug, Args)]
pub struct ServedReferences {
    #[command(flatten)]
    pub registries: MirroredRegistries,

    /// Share `latest` tags. With `false`, tags named `latest` are neither
    /// advertised nor resolved through peers (as K3s's embedded mirror does
    /// by default); digests are shared either way.
    #[arg(long, env = "PEERMIRROR_RESOLVE_LATEST_TAG", default_value_t = true, action = clap::ArgAction::Set)]
    pub resolve_latest_tag: bool,

    /// Regular expressions on `<registry>/<repository>[:<tag>]`,
    /// comma-separated; a reference that matches one is neither advertised
    /// nor served (write a comma inside an expression as `\x2c`).
    #[arg(long, env = "PEERMIRROR_REGISTRY_FILTERS", value_delimiter = ',', num_args = 1..)]
    pub registry_filters: Vec<String>,
}

impl ServedReferences {
    /// The filter that the store and the registry port apply.
    pub fn filter(self) -> Result<ReferenceFilter, peermirror_oci::FilterError> {
        let mut filters = self.registry_filters;
        if !self.resolve_latest_tag {
            filters.push(LATEST_TAG_FILTER.to_string());
        }
        ReferenceFilter::new(self.registries.mirrored_registries, &filters)
    }
}

#[derive(Debug, Args)]
pub struct ConfigureContainerd {
    #[command(flatten)]
    pub hosts: HostsDir,

    #[command(flatten)]
    pub registries: MirroredRegistries,

    /// Mirror URLs containerd tries first, in order, comma-separated.
    #[arg(
        long,
        env = "PEERMIRROR_MIRROR_TARGETS",
        value_delimiter = ',', num_args = 1..,
        default_value = "http://127.0.0.1:5000"
    )]
    pub mirror_targets: Vec<String>,

    /// Let the mirrors answer tag lookups. With `false` containerd resolves
    /// tags at the registry itself and asks peermirror for digests only.
    #[arg(long, env = "PEERMIRROR_RESOLVE_TAGS", default_value_t = true, action = clap::ArgAction::Set)]
    pub resolve_tags: bool,

    /// Keep the mirrors the existing files list, after peermirror.
    #[arg(long, env = "PEERMIRROR_PREPEND_EXISTING")]
    pub prepend_existing: bool,

    /// Never pull from the registry itself (air-gapped nodes).
    #[arg(long, env = "PEERMIRROR_DISABLE_DEFAULT_ENDPOINT")]
    pub disable_default_endpoint: bool,

    /// containerd's configuration file, checked for settings that would make
    /// the CRI plugin ignore these files.
    #[arg(
        long,
        env = "PEERMIRROR_CONTAINERD_CONFIG",
        default_value = "/etc/containerd/config.toml"
    )]
    pub containerd_config: PathBuf,

    /// CA certificate of the mirror's TLS certificate (for https targets).
    #[arg(long, env = "PEERMIRROR_MIRROR_TLS_CA", requires_all = ["mirror_tls_cert", "mirror_tls_key"])]
    pub mirror_tls_ca: Option<PathBuf>,

    /// Client certificate containerd presents to the mirror.
    #[arg(long, env = "PEERMIRROR_MIRROR_TLS_CERT", requires = "mirror_tls_ca")]
    pub mirror_tls_cert: Option<PathBuf>,

    /// Key of the client certificate.
    #[arg(long, env = "PEERMIRROR_MIRROR_TLS_KEY", requires = "mirror_tls_ca")]
    pub mirror_tls_key: Option<PathBuf>,

    /// A K3s `registries.yaml`: every registry under `mirrors:` is
    /// configured (`"*"` means every registry), its listed endpoints stay
    /// after peermirror in their order, `configs.<host>.tls` is written for
    /// those hosts. Replaces `--mirrored-registries`.
    #[arg(
        long,
        env = "PEERMIRROR_REGISTRIES_YAML",
        conflicts_with = "mirrored_registries"
    )]
    pub registries_yaml: Option<PathBuf>,

    /// K3s mode: K3s owns `certs.d` and rewrites it from its
    /// `registries.yaml` (`/etc/rancher/k3s/registries.yaml`) at every start.
    /// The mirror targets are put first in that file's endpoint lists for
    /// `--mirrored-registries` (the original is kept beside it), and
    /// `certs.d` is written as K3s will write it, so that it works at once
    /// and after every K3s restart.
    #[arg(
        long,
        env = "PEERMIRROR_K3S_REGISTRIES_YAML",
        conflicts_with = "registries_yaml"
    )]
    pub k3s_registries_yaml: Option<PathBuf>,

    /// How long containerd waits for a mirror target to accept a
    /// connection before trying the next (`dial_timeout` in `hosts.toml`;
    /// containerd 2.0.7+/2.1+ honour it, older releases ignore it and wait
    /// 30 s on a target that drops SYNs). `0s` leaves the key out.
    #[arg(long, env = "PEERMIRROR_MIRROR_DIAL_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub mirror_dial_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct CleanupContainerd {
    #[command(flatten)]
    pub hosts: HostsDir,

    /// K3s mode (as given to `configure-containerd`): put the original
    /// `registries.yaml` back and write `certs.d` as K3s will from it.
    #[arg(long, env = "PEERMIRROR_K3S_REGISTRIES_YAML")]
    pub k3s_registries_yaml: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct Uninstall {
    #[command(flatten)]
    pub cleanup: CleanupContainerd,

    /// The daemon's data directory, removed.
    #[arg(
        long,
        env = "PEERMIRROR_DATA_DIR",
        default_value = "/var/lib/peermirror"
    )]
    pub data_dir: PathBuf,

    /// The daemon's bpffs pin directory, removed (its programs detach).
    #[arg(
        long,
        env = "PEERMIRROR_BPFFS_PATH",
        default_value = "/sys/fs/bpf/peermirror"
    )]
    pub bpffs_path: PathBuf,

    /// Then wait until SIGTERM (as the main container of the uninstall
    /// DaemonSet, which must stay running to count as rolled out).
    #[arg(long, env = "PEERMIRROR_UNINSTALL_WAIT")]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct GeneratePsk {
    /// Where to write the key (mode 0600); refuses to overwrite a file.
    #[arg(long, env = "PEERMIRROR_PSK_FILE")]
    pub psk_file: PathBuf,
}

impl ConfigureContainerd {
    /// The options, with `--registries-yaml` read.
    pub fn options(
        &self,
    ) -> Result<
        peermirror_containerd_config::ConfigureOptions,
        peermirror_containerd_config::registries_yaml::RegistriesYamlError,
    > {
        let tls = match (
            &self.mirror_tls_ca,
            &self.mirror_tls_cert,
            &self.mirror_tls_key,
        ) {
            (Some(ca), Some(cert), Some(key)) => Some(peermirror_containerd_config::TargetTls {
                ca: ca.clone(),
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            _ => None,
        };
        let options = peermirror_containerd_config::ConfigureOptions {
            config_path: self.hosts.containerd_registry_config_path.clone(),
            registries: self
                .registries
                .mirrored_registries
                .iter()
                .map(Registry::to_string)
                .collect(),
            mirror_targets: self.mirror_targets.clone(),
            resolve_tags: self.resolve_tags,
            prepend_existing: self.prepend_existing,
            disable_default_endpoint: self.disable_default_endpoint,
            tls,
            endpoints: Default::default(),
            server_tls: Default::default(),
            dial_timeout: (!self.mirror_dial_timeout.is_zero()).then_some(self.mirror_dial_timeout),
            credentials_left: Vec::new(),
        };
        match &self.registries_yaml {
            Some(path) => Ok(options
                .with_registries_yaml(peermirror_containerd_config::registries_yaml::load(path)?)),
            None => Ok(options),
        }
    }
}

/// The `--registry-filters` expression `--resolve-latest-tag false` adds.
pub const LATEST_TAG_FILTER: &str = ":latest$";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level (error, warn, info, debug, trace) or a tracing filter such as
    /// `info,peermirror::registry=debug`.
    #[arg(long, env = "PEERMIRROR_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "PEERMIRROR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct Import {
    #[command(flatten)]
    pub containerd: peermirror_store::ContainerdEndpoint,

    /// Image archives: `docker save` tarballs or OCI archives, plain, gzip
    /// or zstd (`*.tar`, `*.tar.gz`, `*.tar.zst`).
    #[arg(required = true)]
    pub archives: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct Run {
    #[command(flatten)]
    pub log: LogArgs,

    /// Import the image archives in this directory (as `peermirror import`
    /// does, pinned) at start and whenever a new one appears.
    #[arg(long, env = "PEERMIRROR_IMPORT_DIR")]
    pub import_dir: Option<PathBuf>,

    /// Directory for the daemon's state.
    #[arg(
        long,
        env = "PEERMIRROR_DATA_DIR",
        default_value = "/var/lib/peermirror"
    )]
    pub data_dir: PathBuf,

    #[command(flatten)]
    pub references: ServedReferences,

    #[command(flatten, next_help_heading = "containerd")]
    pub containerd: ContainerdConfig,

    #[command(flatten, next_help_heading = "Registry port")]
    pub registry: RegistrySettings,

    #[command(flatten, next_help_heading = "Mirror (fetching from peers)")]
    pub mirror: MirrorConfig,

    #[command(flatten, next_help_heading = "P2P (finding holders)")]
    pub p2p: P2pSettings,

    #[command(flatten, next_help_heading = "Bootstrap (the first peers)")]
    pub bootstrap: BootstrapArgs,

    #[command(flatten, next_help_heading = "TLS (the registry port)")]
    pub tls: peermirror_net::tls::TlsArgs,

    #[command(flatten, next_help_heading = "Status and observability")]
    pub status: crate::status::StatusArgs,

    #[command(flatten, next_help_heading = "Dataplane (eBPF)")]
    pub dataplane: peermirror_dataplane::DataplaneConfig,
}

/// The log levels `--log-level` takes alone.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log level, or a filter of `target=level` directives: every level must
/// be one of [`LOG_LEVELS`] (a bare word that is not a level would be taken
/// for a target, and the daemon would log nothing).
pub fn parse_log_level(s: &str) -> Result<String, String> {
    let bad = |what: &str| {
        format!(
            "{what:?} is not a log level: use one of {} or a filter such as info,peermirror::registry=debug",
            LOG_LEVELS.join(", ")
        )
    };
    if s.trim().is_empty() {
        return Err(bad(s));
    }
    for directive in s.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            _ => directive,
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(directive));
        }
    }
    Ok(s.to_string())
}

/// The library crates whose log targets `--log-level` also accepts in the
/// older `peermirror::<part>` spelling (from when they were modules of one
/// crate): `peermirror::registry=debug` means `peermirror_registry=debug`.
const PART_CRATES: [&str; 9] = [
    "oci",
    "net",
    "metrics",
    "store",
    "containerd_config",
    "routing",
    "mirror",
    "registry",
    "dataplane",
];

/// The tracing filter for a `--log-level` that [`parse_log_level`]
/// accepted: each `peermirror::<part>` target is the part's crate.
pub fn log_filter(level: &str) -> String {
    level
        .split(',')
        .map(|directive| {
            let trimmed = directive.trim();
            let Some(rest) = trimmed.strip_prefix("peermirror::") else {
                return trimmed.to_string();
            };
            let part_len = rest.find([':', '=', '[', '{']).unwrap_or(rest.len());
            let part = &rest[..part_len];
            if PART_CRATES.contains(&part) {
                format!("peermirror_{rest}")
            } else {
                trimmed.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A registry host, also written as Spegel writes it (`https://docker.io`).
pub fn parse_registry(s: &str) -> Result<Registry, String> {
    let host = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s)
        .trim_end_matches('/');
    host.parse()
        .map_err(|e: peermirror_oci::ReferenceError| e.to_string())
}

/// The environment variables that hold lists. They are split on commas by
/// clap; Spegel's users also write them space-separated.
pub const LIST_VARIABLES: [&str; 7] = [
    "PEERMIRROR_MIRRORED_REGISTRIES",
    "PEERMIRROR_MIRROR_TARGETS",
    "PEERMIRROR_DEBUG_ALLOWED_CIDRS",
    "PEERMIRROR_ALLOWED_CIDRS",
    "PEERMIRROR_REGISTRY_CLIENT_CIDRS",
    "PEERMIRROR_STATIC_BOOTSTRAP_PEERS",
    "PEERMIRROR_REGISTRY_FILTERS",
];

/// A list written with spaces, commas or both, written with commas.
pub fn comma_separated(list: &str) -> String {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|item| !item.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "the P2P network needs a preshared key: pass --psk-file <file> (make one with `peermirror generate-psk`), or --insecure-open-network to run without one"
    )]
    NoPsk,
    #[error(transparent)]
    Bootstrap(#[from] peermirror_routing::bootstrap::MissingBootstrap),
    #[error(transparent)]
    Filter(#[from] peermirror_oci::FilterError),
}

impl Run {
    pub fn into_config(self) -> Result<DaemonConfig, SettingsError> {
        if self.p2p.psk_file.is_none() && !self.p2p.insecure_open_network {
            return Err(SettingsError::NoPsk);
        }
        let bootstrap = self.bootstrap.config(self.p2p.router_addr.port())?;
        Ok(DaemonConfig {
            containerd: self.containerd,
            filter: self.references.filter()?,
            registry: RegistrySettings {
                in_flight: peermirror_registry::InFlightConfig {
                    stall: self.mirror.stall_timeout,
                    ..self.registry.in_flight
                },
                ..self.registry
            },
            data_dir: self.data_dir,
            dataplane: peermirror_dataplane::DataplaneConfig {
                registry_port: self.registry.registry_addr.port(),
                p2p_port: self.p2p.router_addr.port(),
                ..self.dataplane
            },
            tls: self.tls.files(),
            import_dir: self.import_dir,
            status: self.status,
            p2p: self.p2p,
            bootstrap,
            http_bootstrap_addr: self.bootstrap.http_bootstrap_addr,
            mirror: MirrorConfig {
                // The source answers once its ingest is there.
                follow_header_timeout: self.mirror.header_timeout + self.registry.in_flight.wait,
                ..self.mirror
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use peermirror_routing::bootstrap::BootstrapConfig;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The error clap prints for `args`, without its usage lines.
    fn refused(args: &[&str]) -> String {
        let e = Cli::try_parse_from(args).expect_err("refused");
        e.to_string().lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn log_levels_are_checked_at_start() {
        assert_eq!(
            refused(&["peermirror", "run", "--log-level", "verbose"]),
            "error: invalid value 'verbose' for '--log-level <LOG_LEVEL>': \"verbose\" is not a log level: use one of off, error, warn, info, debug, trace or a filter such as info,peermirror::registry=debug"
        );
        assert!(
            refused(&["peermirror", "run", "--log-level", "info,peermirror=loud"])
                .contains("\"peermirror=loud\" is not a log level")
        );
        for ok in ["info", "DEBUG", "warn,peermirror::registry=trace", "off"] {
            assert_eq!(parse_log_level(ok), Ok(ok.to_string()));
        }
        assert!(parse_log_level("").is_err());
    }

    #[test]
    fn log_filters_name_each_part_by_its_crate() {
        assert_eq!(
            log_filter("info,peermirror::registry=debug"),
            "info,peermirror_registry=debug"
        );
        assert_eq!(
            log_filter("warn, peermirror::routing::p2p=trace,peermirror=info"),
            "warn,peermirror_routing::p2p=trace,peermirror=info"
        );
        // The binary's own modules keep their path.
        assert_eq!(
            log_filter("peermirror::daemon=debug"),
            "peermirror::daemon=debug"
        );
        assert_eq!(log_filter("debug"), "debug");
    }

    #[test]
    fn lists_take_commas_spaces_and_spegel_names() {
        let registries = |args: &[&str]| -> Vec<String> {
            let mut argv = vec!["peermirror", "configure-containerd"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).expect("parses").command {
                Command::ConfigureContainerd(c) => c
                    .registries
                    .mirrored_registries
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                _ => unreachable!(),
            }
        };
        let want = ["docker.io", "ghcr.io"];
        assert_eq!(
            registries(&["--mirrored-registries", "docker.io,ghcr.io"]),
            want
        );
        assert_eq!(
            registries(&["--mirrored-registries", "docker.io", "ghcr.io"]),
            want
        );
        assert_eq!(
            registries(&[
                "--mirrored-registries",
                "https://docker.io",
                "https://ghcr.io/"
            ]),
            want
        );
        assert_eq!(
            comma_separated(" docker.io  ghcr.io,quay.io "),
            "docker.io,ghcr.io,quay.io"
        );
        let run = |args: &[&str]| {
            let mut argv = vec!["peermirror", "run"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).expect("parses").command {
                Command::Run(r) => r,
                _ => unreachable!(),
            }
        };
        assert_eq!(
            run(&["--mirror-resolve-retries", "3"]).mirror.max_attempts,
            3
        );
        assert!(
            !run(&["--debug-web-enabled", "false"])
                .status
                .debug_endpoints
        );
        assert_eq!(
            run(&["--http-bootstrap-peer", "http://seed:8080/"])
                .bootstrap
                .http_bootstrap_url
                .as_deref(),
            Some("http://seed:8080/")
        );
    }

    #[test]
    fn every_flag_has_an_env_var_and_help() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").expect("run subcommand");
        for arg in run.get_arguments() {
            if arg.get_id() == "help" || arg.get_id() == "version" {
                continue;
            }
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            assert!(
                env.starts_with("PEERMIRROR_"),
                "--{} has no PEERMIRROR_ env var",
                arg.get_id()
            );
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
        }
    }

    #[test]
    fn flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "peermirror",
            "run",
            "--registry-addr",
            "127.0.0.1:6000",
            "--insecure-open-network",
        ])
        .expect("parse");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            run.registry.registry_addr,
            "127.0.0.1:6000".parse().expect("addr")
        );
        assert_eq!(run.containerd.endpoint.namespace, "k8s.io");
        assert!(Cli::try_parse_from(["peermirror", "run", "--resync-interval", "soon"]).is_err());
        assert!(run.into_config().is_ok());
    }

    /// Tests and library users build the parts from `Default`: it must say
    /// what the flags say when none is given.
    #[test]
    fn hand_written_defaults_are_the_flag_defaults() {
        let cli = Cli::try_parse_from(["peermirror", "run"]).expect("parse");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            format!("{:?}", run.mirror),
            format!("{:?}", MirrorConfig::default())
        );
        assert_eq!(
            format!("{:?}", run.registry.server),
            format!("{:?}", peermirror_registry::ServerConfig::default())
        );
        assert_eq!(
            format!("{:?}", run.registry.uploads),
            format!("{:?}", peermirror_registry::UploadLimits::default())
        );
        assert_eq!(
            format!("{:?}", run.registry.in_flight),
            format!("{:?}", peermirror_registry::InFlightConfig::default())
        );
    }

    fn config(args: &[&str]) -> Result<DaemonConfig, String> {
        let mut all = vec!["peermirror", "run"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else {
            return Err("not run".into());
        };
        run.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn latest_tags_are_shared_unless_turned_off() {
        let reg: peermirror_oci::Registry = "docker.io".parse().expect("registry");
        let shared = config(&["--psk-file", "/k"]).expect("valid");
        assert!(shared.filter.allows(&reg, "docker.io/library/nginx:latest"));
        let k3s = config(&["--psk-file", "/k", "--resolve-latest-tag", "false"]).expect("valid");
        assert!(!k3s.filter.allows(&reg, "docker.io/library/nginx:latest"));
        assert!(k3s.filter.allows(&reg, "docker.io/library/nginx:1.27"));
        assert!(k3s.filter.allows(&reg, "docker.io/library/latest-tools:1"));
        let import =
            config(&["--psk-file", "/k", "--import-dir", "/var/lib/images"]).expect("valid");
        assert_eq!(
            import.import_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/images"))
        );
    }

    #[test]
    fn the_p2p_network_needs_a_key_or_an_explicit_choice() {
        let err = config(&[]).expect_err("no key");
        assert!(
            err.contains("--psk-file") && err.contains("--insecure-open-network"),
            "{err}"
        );
        assert!(config(&["--psk-file", "/k", "--insecure-open-network"]).is_err());
        let c = config(&["--psk-file", "/k"]).expect("valid");
        assert_eq!(c.p2p.listen().len(), 2, "dual-stack by default");
    }

    #[test]
    fn bootstrap_and_filters_are_validated() {
        assert!(config(&["--insecure-open-network", "--bootstrap-kind", "static"]).is_err());
        assert!(config(&["--insecure-open-network", "--bootstrap-kind", "dns"]).is_err());
        assert!(config(&["--insecure-open-network", "--bootstrap-kind", "http"]).is_err());
        let c = config(&[
            "--insecure-open-network",
            "--bootstrap-kind",
            "static",
            "--static-bootstrap-peers",
            "/ip4/10.0.0.1/tcp/5001,/ip4/10.0.0.2/tcp/5001",
        ])
        .expect("valid");
        assert!(matches!(c.bootstrap, BootstrapConfig::Static(ref v) if v.len() == 2));
        let err =
            config(&["--insecure-open-network", "--registry-filters", "("]).expect_err("bad regex");
        assert!(err.contains("--registry-filters"), "{err}");
        assert!(
            config(&[
                "--insecure-open-network",
                "--mirrored-registries",
                "docker.io,not a host"
            ])
            .is_err()
        );
        assert!(
            config(&[
                "--insecure-open-network",
                "--static-bootstrap-peers",
                "nonsense"
            ])
            .is_err()
        );
    }
}

#[cfg(test)]
mod readme {
    use super::*;
    use clap::CommandFactory;

    /// The `peermirror …` commands of the README's shell blocks (a line
    /// ending in `\` continues on the next; `#` starts a comment).
    fn readme_commands(readme: &str) -> Vec<Vec<String>> {
        let mut commands = Vec::new();
        let mut in_shell = false;
        let mut current = String::new();
        for line in readme.lines() {
            let trimmed = line.trim();
            if let Some(lang) = trimmed.strip_prefix("```") {
                in_shell = !in_shell && (lang == "sh" || lang == "bash");
                continue;
            }
            if !in_shell {
                continue;
            }
            let code = trimmed.split(" #").next().unwrap_or_default().trim();
            current.push_str(code.trim_end_matches('\\'));
            current.push(' ');
            if code.ends_with('\\') {
                continue;
            }
            let words: Vec<String> = current.split_whitespace().map(str::to_string).collect();
            current.clear();
            if words.first().is_some_and(|w| w == "peermirror") {
                commands.push(words);
            }
        }
        commands
    }

    /// Every `peermirror` command the README tells an operator to type is
    /// one the binary accepts (its flags, values and files are checked by
    /// clap as at start).
    #[test]
    fn every_command_in_the_readme_parses() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let commands = readme_commands(&readme);
        assert!(commands.len() >= 4, "{commands:?}");
        for argv in commands {
            if let Err(e) = Cli::try_parse_from(&argv) {
                panic!("README: {}: {e}", argv.join(" "));
            }
        }
    }

    /// The configuration reference in the README lists every flag of every
    /// subcommand with its environment variable and default.
    #[test]
    fn readme_documents_every_flag() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            // A subcommand's own section first (flags of the same name
            // differ between subcommands), else the whole README.
            let heading = format!("`peermirror {}`", sub.get_name());
            let section = readme
                .split("\n### ")
                .find(|s| s.lines().next().is_some_and(|h| h.contains(&heading)))
                .unwrap_or(&readme);
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if long == "help" || long == "version" {
                    continue;
                }
                let flag = format!("`--{long}`");
                let row = section
                    .lines()
                    .chain(readme.lines())
                    .find(|l| {
                        l.starts_with("| `--")
                            && l.split(" | ").next().is_some_and(|c| c.contains(&flag))
                    })
                    .unwrap_or_else(|| panic!("README has no row for --{long}"));
                if let Some(env) = arg.get_env().and_then(|e| e.to_str()) {
                    // Rows that group flags abbreviate the shared prefix.
                    let short = format!("`…_{}`", env.rsplit('_').next().unwrap_or(env));
                    assert!(
                        row.contains(&format!("`{env}`")) || row.contains(&short),
                        "README row of --{long} lacks {env}"
                    );
                }
                for default in arg.get_default_values() {
                    let default = default.to_string_lossy();
                    assert!(
                        row.contains(&format!("`{default}`")),
                        "README row of --{long} lacks default {default}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod deploy_files {
    use super::*;

    /// `command: ["peermirror", "<sub>"]` blocks of a manifest and their args.
    fn manifest_invocations(text: &str) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(rest) = line.trim().strip_prefix("command: [\"peermirror\", \"") else {
                continue;
            };
            let sub = rest.trim_end_matches("\"]").to_string();
            let mut argv = vec!["peermirror".to_string(), sub];
            let mut j = i + 1;
            while j < lines.len() && !lines[j].trim().starts_with("args:") {
                j += 1;
            }
            for arg in lines.iter().skip(j + 1) {
                let Some(a) = arg.trim().strip_prefix("- ") else {
                    break;
                };
                if !a.starts_with("--") {
                    break;
                }
                argv.push(a.replace("$(NODE_IP)", "10.0.0.5"));
            }
            out.push(argv);
        }
        out
    }

    #[test]
    fn the_kubernetes_manifest_uses_real_flags() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/kubernetes/base/daemonset.yaml"
        ))
        .expect("manifest");
        let invocations = manifest_invocations(&text);
        assert_eq!(invocations.len(), 2, "{invocations:?}");
        for argv in invocations {
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            if let Command::Run(run) = cli.command {
                let config = run
                    .into_config()
                    .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
                assert!(matches!(
                    config.bootstrap,
                    peermirror_routing::bootstrap::BootstrapConfig::Dns { port: 5001, .. }
                ));
                assert_eq!(
                    config.p2p.advertise_addr,
                    Some("10.0.0.5".parse().expect("ip"))
                );
            }
        }
    }
}
