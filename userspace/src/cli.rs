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
use crate::registry::{ServerConfig, ServingPath};
use crate::store::ContainerdConfig;

#[derive(Debug, Parser)]
#[command(
    name = "peermirror",
    version,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How blob bodies are sent on plain HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServingPathArg {
    /// The fastest path this kernel supports.
    Auto,
    /// sendfile(2): the kernel copies from the page cache to the socket.
    Sendfile,
    /// Read into a buffer and write it (no zero-copy).
    Buffered,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level (error, warn, info, debug, trace) or a tracing filter such as
    /// `info,peermirror::registry=debug`.
    #[arg(long, env = "PEERMIRROR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "PEERMIRROR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct Run {
    #[command(flatten)]
    pub log: LogArgs,

    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "PEERMIRROR_CONTAINERD_SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_sock: PathBuf,

    /// containerd namespace whose images are served (kubelet uses k8s.io).
    #[arg(
        long,
        env = "PEERMIRROR_CONTAINERD_NAMESPACE",
        default_value = "k8s.io"
    )]
    pub containerd_namespace: String,

    /// containerd's content store root (the directory holding `blobs/sha256`).
    /// Asked from containerd when not set. When its files cannot be read,
    /// blobs are streamed through containerd's gRPC API instead.
    #[arg(long, env = "PEERMIRROR_CONTAINERD_CONTENT_PATH")]
    pub containerd_content_path: Option<PathBuf>,

    /// How often the image list is re-read even without containerd events
    /// (containerd 1.6 sends none when its garbage collector removes content).
    #[arg(long, env = "PEERMIRROR_RESYNC_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Address of the registry port that containerd and the peers pull from
    /// (`:5000` listens on every address).
    #[arg(long, env = "PEERMIRROR_REGISTRY_ADDR", default_value = ":5000", value_parser = parse_listen_addr)]
    pub registry_addr: SocketAddr,

    /// Address of the /metrics, /healthz, /readyz and /debug endpoints.
    #[arg(long, env = "PEERMIRROR_METRICS_ADDR", default_value = ":9090", value_parser = parse_listen_addr)]
    pub metrics_addr: SocketAddr,

    /// Directory for the daemon's state.
    #[arg(
        long,
        env = "PEERMIRROR_DATA_DIR",
        default_value = "/var/lib/peermirror"
    )]
    pub data_dir: PathBuf,

    /// How blob bodies leave the process on plain HTTP.
    #[arg(long, env = "PEERMIRROR_SERVING_PATH", value_enum, default_value_t = ServingPathArg::Auto)]
    pub serving_path: ServingPathArg,

    /// How long a registry client may make no progress reading a response
    /// before its connection is closed.
    #[arg(long, env = "PEERMIRROR_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// How long an idle keep-alive connection on the registry port is kept.
    #[arg(long, env = "PEERMIRROR_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
}

/// `90s`, `2m`, `500ms`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}

/// `host:port`, `[v6]:port`, or `:port` for every address.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("invalid port in {s:?}"))?;
        return Ok(SocketAddr::from(([0u16; 8], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not an address (examples: :5000, 0.0.0.0:5000, [::1]:5000)"))
}

impl Run {
    pub fn into_config(self) -> DaemonConfig {
        let serving_path = match self.serving_path {
            ServingPathArg::Auto | ServingPathArg::Sendfile => ServingPath::Sendfile,
            ServingPathArg::Buffered => ServingPath::Buffered,
        };
        DaemonConfig {
            containerd: ContainerdConfig {
                socket: self.containerd_sock,
                namespace: self.containerd_namespace,
                content_path: self.containerd_content_path,
                resync_interval: self.resync_interval,
            },
            registry_addr: self.registry_addr,
            metrics_addr: self.metrics_addr,
            data_dir: self.data_dir,
            server: ServerConfig {
                serving_path,
                write_timeout: self.write_timeout,
                idle_timeout: self.idle_timeout,
                ..ServerConfig::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen_addr(":5000"),
            Ok("[::]:5000".parse().expect("addr"))
        );
        assert_eq!(
            parse_listen_addr("127.0.0.1:1"),
            Ok("127.0.0.1:1".parse().expect("addr"))
        );
        assert!(parse_listen_addr(":99999").is_err());
        assert!(parse_listen_addr("localhost").is_err());
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
        let cli = Cli::try_parse_from(["peermirror", "run", "--registry-addr", "127.0.0.1:6000"])
            .expect("parse");
        let Command::Run(run) = cli.command;
        assert_eq!(run.registry_addr, "127.0.0.1:6000".parse().expect("addr"));
        assert_eq!(run.containerd_namespace, "k8s.io");
        assert!(Cli::try_parse_from(["peermirror", "run", "--resync-interval", "soon"]).is_err());
    }
}

#[cfg(test)]
mod readme {
    use super::*;
    use clap::CommandFactory;

    /// The configuration reference in the README lists every flag of every
    /// subcommand with its environment variable and default.
    #[test]
    fn readme_documents_every_flag() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if long == "help" || long == "version" {
                    continue;
                }
                let flag = format!("| `--{long}` |");
                let row = readme
                    .lines()
                    .find(|l| l.starts_with(&flag))
                    .unwrap_or_else(|| panic!("README has no row for --{long}"));
                if let Some(env) = arg.get_env().and_then(|e| e.to_str()) {
                    assert!(
                        row.contains(&format!("`{env}`")),
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
