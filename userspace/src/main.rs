//! `peermirror`: sets up logging, reads the configuration, runs the daemon
//! until SIGTERM/SIGINT, and exits 0 after draining.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use peermirror::cli::{Cli, Command, LogArgs, LogFormat};
use tokio_util::sync::CancellationToken;

fn init_logging(args: &LogArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(run) => init_logging(&run.log).and_then(|()| {
            let config = run.into_config();
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
            eprintln!("peermirror: {e:#}");
            ExitCode::FAILURE
        }
    }
}
