//! `peermirror`: sets up logging, reads the configuration, runs the daemon
//! until SIGTERM/SIGINT, and exits 0 after draining.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use peermirror::cli::{Cli, Command, LogArgs, LogFormat};
use tokio_util::sync::CancellationToken;

fn init_logging(args: &LogArgs) -> anyhow::Result<()> {
    // The level was checked when the flags were read (`parse_log_level`).
    let filter =
        tracing_subscriber::EnvFilter::try_new(peermirror::cli::log_filter(&args.log_level))
            .with_context(|| format!("invalid --log-level {:?}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "received signal");
        shutdown.cancel();
    });
    Ok(())
}

fn print_report(report: &peermirror_containerd_config::Report) {
    for (what, paths) in [
        ("wrote", &report.written),
        ("unchanged", &report.unchanged),
        ("restored", &report.restored),
        ("removed", &report.removed),
        (
            "kept (edited since configure-containerd wrote it)",
            &report.kept,
        ),
    ] {
        for p in paths {
            println!("{what} {}", p.display());
        }
    }
}

fn configure_containerd(args: &peermirror::cli::ConfigureContainerd) -> anyhow::Result<()> {
    if let Some(registries_yaml) = &args.k3s_registries_yaml {
        let report = peermirror_containerd_config::k3s::configure(
            &peermirror_containerd_config::k3s::K3sOptions {
                registries_yaml: registries_yaml.clone(),
                config_path: args.hosts.containerd_registry_config_path.clone(),
                registries: args
                    .registries
                    .mirrored_registries
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                mirror_targets: args.mirror_targets.clone(),
            },
        )?;
        print_report(&report);
        println!(
            "K3s applies {} at its next start; certs.d already routes through peermirror",
            registries_yaml.display()
        );
        return Ok(());
    }
    let options = args.options()?;
    let report = peermirror_containerd_config::configure(&options)?;
    for host in &options.credentials_left {
        eprintln!(
            "note: the credentials for {host} are not written (hosts.toml has no place for them); \
             they stay in the CRI plugin's configuration"
        );
    }
    print_report(&report);
    for finding in peermirror_containerd_config::check_containerd_config(
        &args.containerd_config,
        &args.hosts.containerd_registry_config_path,
    ) {
        eprintln!("warning: {}", finding.0);
    }
    Ok(())
}

fn cleanup_containerd(args: &peermirror::cli::CleanupContainerd) -> anyhow::Result<()> {
    let certs_d = &args.hosts.containerd_registry_config_path;
    let report = match &args.k3s_registries_yaml {
        Some(yaml) => peermirror_containerd_config::k3s::cleanup(yaml, certs_d)?,
        None => peermirror_containerd_config::cleanup(certs_d)?,
    };
    print_report(&report);
    Ok(())
}

/// `peermirror uninstall`: containerd's files back, then the state gone.
fn uninstall(args: &peermirror::cli::Uninstall) -> anyhow::Result<()> {
    cleanup_containerd(&args.cleanup)?;
    match std::fs::remove_dir_all(&args.data_dir) {
        Ok(()) => println!("removed {}", args.data_dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing {}", args.data_dir.display()));
        }
    }
    if args.bpffs_path.exists() {
        peermirror_dataplane::remove_pins(&args.bpffs_path);
        anyhow::ensure!(
            !args.bpffs_path.exists(),
            "{} still holds files that are not peermirror's pins; remove them by hand",
            args.bpffs_path.display()
        );
        println!("removed {}", args.bpffs_path.display());
    }
    if args.wait {
        println!("uninstalled; waiting for SIGTERM");
        let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
        runtime.block_on(async {
            let shutdown = CancellationToken::new();
            wait_for_signal(shutdown.clone()).await?;
            shutdown.cancelled().await;
            anyhow::Ok(())
        })?;
    }
    Ok(())
}

/// `peermirror import`: every archive in turn; one that fails leaves
/// nothing behind and does not stop the others.
fn import(args: &peermirror::cli::Import) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let importer = runtime.block_on(async {
        peermirror_store::import::Importer::new(&args.containerd.socket, &args.containerd.namespace)
    });
    let mut failed = 0;
    for path in &args.archives {
        match runtime.block_on(importer.import(path)) {
            Ok(images) => {
                for image in images {
                    println!("imported {} {} (pinned)", image.name, image.digest);
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} archives not imported", args.archives.len());
    }
    Ok(())
}

fn generate_psk(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        println!("created {} (mode 0700)", parent.display());
    }
    let mut key = [0u8; 32];
    getrandom(&mut key)?;
    let text = libp2p::pnet::PreSharedKey::new(key).to_key_file();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    println!(
        "wrote a new preshared key to {}; copy it to every node",
        path.display()
    );
    Ok(())
}

/// 32 bytes from the kernel's random source.
fn getrandom(buf: &mut [u8]) -> anyhow::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("reading /dev/urandom")
}

/// Fixes glibc's mmap threshold at 1 MiB. By default glibc raises it each
/// time a large block is freed (up to 32 MiB), after which large buffers
/// come from the heap and fragment it: a node relaying blobs to 8 clients
/// while its peers restarted grew from 19 to 46 MiB in 10 minutes, and to
/// 18 MiB with the threshold fixed (`benches/README.md`, soak). Setting it
/// also stops the dynamic adjustment, which would have raised the trim
/// threshold with it: that is set too. At the default 128 KiB, the relay's
/// 512 KiB read buffers went back to the kernel whenever the hash and the
/// client caught up, and were faulted in again by the next reads (4 % of
/// the relay's CPU in a profile).
fn fix_malloc_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

/// An error and its causes, each said once: a message that already quotes
/// its cause (`psk: no such file`) is not followed by it again.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// List variables written with spaces (as Spegel's users write them) are
/// rewritten with commas, which is what the flags split on.
fn normalise_list_variables() {
    for name in peermirror::cli::LIST_VARIABLES {
        if let Ok(value) = std::env::var(name) {
            let commas = peermirror::cli::comma_separated(&value);
            if commas != value {
                // SAFETY: called before any other thread exists.
                unsafe { std::env::set_var(name, commas) };
            }
        }
    }
}

fn main() -> ExitCode {
    fix_malloc_threshold();
    normalise_list_variables();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::ConfigureContainerd(args) => configure_containerd(&args),
        Command::CleanupContainerd(args) => cleanup_containerd(&args),
        Command::Uninstall(args) => uninstall(&args),
        Command::GeneratePsk(args) => generate_psk(&args.psk_file),
        Command::Import(args) => import(&args),
        Command::Bootstrapper(args) => init_logging(&args.log).and_then(|()| {
            let config = args.into_config();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                wait_for_signal(shutdown.clone()).await?;
                peermirror::bootstrapper::run(config, shutdown).await?;
                Ok(())
            })
        }),
        Command::Run(run) => init_logging(&run.log).and_then(|()| {
            let config = run.into_config()?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                wait_for_signal(shutdown.clone()).await?;
                peermirror::daemon::run(config, shutdown).await?;
                Ok(())
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peermirror: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}
