//! `cargo xtask <command>`: the project's multi-step commands.
//!
//! - `test`: installs what the tests need, builds, runs the whole suite.
//! - `build-ebpf`: compiles the eBPF programs (the daemon's build does too).
//! - `image`: the multi-arch container image, as an OCI layout and archive.
//! - `soak`: the load test for longer and the restarting-peers soak.
//! - `demo`: a three-node cluster in network namespaces on this machine and
//!   an air-gapped pull served by a peer.

mod demo;
mod deps;
mod fuzz;
mod image;
mod releases;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the test dependencies (Debian packages), build, and run every test.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Run a local demo: a 3-node cluster in network namespaces, real containerd, an air-gapped pull.
    Demo,
    /// Compile the eBPF programs (C, clang) into target/bpf/peermirror.bpf.o.
    BuildEbpf,
    /// Build the container image (linux/amd64 and linux/arm64) into
    /// target/image/: an OCI layout and an archive for `ctr image import` or
    /// `skopeo copy oci-archive:…`.
    Image,
    /// Fuzz the parsers (cargo fuzz, libFuzzer): every target, or one, for a while each.
    Fuzz {
        /// One target (see fuzz/fuzz_targets/); all when omitted.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Load and soak: 1,000 connections plus 64 mixed clients against a node, then a cluster whose peers restart while clients pull through a third node.
    Soak {
        /// Seconds of mixed load on one node.
        #[arg(long, default_value_t = 60)]
        load_seconds: u64,
        /// Seconds of the restarting-peers soak.
        #[arg(long, default_value_t = 600)]
        soak_seconds: u64,
    },
    /// Benchmarks: peermirror side by side with nginx and the CNCF registry, the DHT at scale (release build).
    Bench {
        /// `serving`, `clients` (only the real-client rounds of `serving`),
        /// `memory` (only its peak RSS with 8 and 64 clients), `cluster`,
        /// `dht`, `fanout`, `late` (only the fan-out's late puller) or
        /// `tags` (what tag agreement adds to a lookup) to run only that part.
        part: Option<String>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Test { cargo_args } => test(&cargo_args),
        Cmd::Demo => demo::run(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Image => image::build().and_then(|_| image::check_foreign_binaries()),
        Cmd::Bench { part } => bench(part.as_deref()),
        Cmd::Fuzz { target, seconds } => fuzz(target.as_deref(), seconds),
        Cmd::Soak {
            load_seconds,
            soak_seconds,
        } => soak(load_seconds, soak_seconds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cargo_path() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn cargo() -> Command {
    Command::new(cargo_path())
}

/// The package names of the daemon's part crates (`crates/*`), sorted.
fn part_crates() -> Vec<String> {
    let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    let mut names: Vec<String> = std::fs::read_dir(&crates)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|dir| std::fs::read_to_string(dir.path().join("Cargo.toml")).ok())
        .filter_map(|manifest| {
            manifest.lines().find_map(|l| {
                l.strip_prefix("name = \"")
                    .and_then(|n| n.strip_suffix('"'))
                    .map(str::to_string)
            })
        })
        .collect();
    names.sort();
    names
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cmd`; its standard output.
pub fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    )
}

fn build_ebpf() -> Result<()> {
    deps::ensure(deps::BUILD_EBPF)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    );
    let out = target.join("bpf");
    std::fs::create_dir_all(&out)?;
    let object = peermirror_ebpf::build(&out)?;
    println!("{}", object.display());
    Ok(())
}

fn fuzz(target: Option<&str>, seconds: u64) -> Result<()> {
    fuzz::run(target, seconds)
}

fn bench(part: Option<&str>) -> Result<()> {
    deps::ensure(deps::BENCH)?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "peermirror",
        "--package",
        "peermirror-bench",
        "--bins",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    );
    let mut cmd = Command::new(target.join("release/peermirror-bench"));
    cmd.env("PEERMIRROR_BIN", target.join("release/peermirror"));
    // `PM_BENCH_CONTAINERD=1.7|2.1`: Debian's newer containerd instead of
    // the system's (fetched as for the tests).
    if let Ok(series) = std::env::var("PM_BENCH_CONTAINERD") {
        let Some(release) = releases::NEWER.iter().find(|r| r.series == series) else {
            bail!(
                "PM_BENCH_CONTAINERD={series}: one of {:?}",
                releases::NEWER.iter().map(|r| r.series).collect::<Vec<_>>()
            );
        };
        cmd.env("PM_CONTAINERD_DIR", releases::ensure(&target, release)?);
    }
    if let Some(p) = part {
        cmd.arg(p);
    }
    run(&mut cmd)
}

fn test(cargo_args: &[String]) -> Result<()> {
    deps::ensure(deps::TEST)?;
    deps::ensure_kubernetes_validate()?;
    // The integration tests start the daemon binary, as it ships: in
    // release mode (a dozen daemons in namespaces share two cores; the
    // unit tests still run in debug, with overflow checks).
    run(cargo().args(["build", "--release", "--package", "peermirror", "--bins"]))?;
    let daemon = target_dir().join("release/peermirror");
    // The container image (amd64 and the cross-built arm64), which the
    // DaemonSet test runs; the arm64 binary is run under qemu-user.
    let image = image::build()?;
    image::check_foreign_binaries()?;
    image::test_foreign()?;
    // Every test binary runs even when one fails, so that one failure
    // does not hide the next.
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("PEERMIRROR_BIN", &daemon)
        .env("PEERMIRROR_IMAGE", &image)
        .arg("--")
        .args(cargo_args))?;
    // Many nodes in one process only fit in CI time when optimised; in
    // debug builds these tests are ignored.
    run(cargo()
        .args(["test", "--release", "--package", "peermirror-tests"])
        .env("PEERMIRROR_BIN", &daemon)
        .args(RELEASE_TESTS.iter().flat_map(|t| ["--test", t]))
        .args(["--", "--test-threads", "1"])
        .args(cargo_args))?;
    // The end-to-end tests again on Debian's newer containerd releases
    // (the run above used the system's 1.6).
    for (release, tests) in PER_RELEASE_TESTS {
        let dir = releases::ensure(&target_dir(), release)?;
        eprintln!("xtask: end-to-end tests on containerd {}", release.series);
        run(cargo()
            // `--workspace` as above, so that the test binaries built there
            // are reused (a package-only build unifies features differently).
            .args(["test", "--workspace", "--no-fail-fast"])
            .env("PEERMIRROR_BIN", &daemon)
            .env("PM_CONTAINERD_DIR", &dir)
            .args(["--test", "nodes", "--"])
            .args(tests.iter().map(|module| format!("{module}::")))
            .args(cargo_args))?;
    }
    // A short run of every fuzz target (with a filter, only when asked).
    if cargo_args.is_empty() {
        fuzz::run(None, FUZZ_SECONDS_IN_TEST)?;
    }
    Ok(())
}

fn soak(load_seconds: u64, soak_seconds: u64) -> Result<()> {
    deps::ensure(deps::TEST)?;
    run(cargo().args(["build", "--release", "--package", "peermirror", "--bins"]))?;
    run(cargo()
        .args([
            "test",
            "--release",
            "--package",
            "peermirror-tests",
            "--test",
            "nodes",
        ])
        .env("PEERMIRROR_BIN", target_dir().join("release/peermirror"))
        .env("PM_LOAD_SECONDS", load_seconds.to_string())
        .env("PM_SOAK_SECONDS", soak_seconds.to_string())
        .args([
            "--",
            "load::",
            "--include-ignored",
            "--test-threads",
            "1",
            "--nocapture",
        ]))
}

/// Seconds each fuzz target runs as part of `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 12;

/// The end-to-end tests (modules of the `nodes` test binary) that run on
/// each newer containerd release: the single-node ones (and airgap imports)
/// on 1.7, the cluster and mTLS too on 2.1, whose Transfer service reads
/// `hosts.toml` inside the daemon and does not retry a body cut short
/// (`resume`, `crawl`).
const PER_RELEASE_TESTS: &[(&releases::Release, &[&str])] = &[
    (&releases::NEWER[0], &["single_node", "airgap"]),
    (
        &releases::NEWER[1],
        &[
            "single_node",
            "cluster",
            "tls",
            "airgap",
            "fanout",
            "k3s",
            "uninstall",
            "resume",
            "crawl",
        ],
    ),
];

/// Integration tests that run in release mode (see `test`).
const RELEASE_TESTS: &[&str] = &["scale"];
