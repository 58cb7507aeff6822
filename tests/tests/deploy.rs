//! The deployment files do what they say: the systemd unit passes
//! `systemd-analyze verify`, and the environment file, read as systemd would,
//! configures containerd and starts the daemon.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::http;
use peermirror_tests::process::{Proc, wait_for};
use peermirror_tests::services::{free_port, peermirror_bin, require_root, write_psk};

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn the_systemd_unit_verifies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let unit = std::fs::read_to_string(repo_file("deploy/systemd/peermirror.service"))?;
    // Verified against the binary we built, wherever it lives.
    let unit = unit.replace(
        "/usr/local/bin/peermirror",
        &peermirror_bin().to_string_lossy(),
    );
    let path = dir.path().join("peermirror.service");
    std::fs::write(&path, unit)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .context("systemd-analyze (Debian package systemd)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Only lines about our unit matter (the host's own units may be noisy).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("peermirror"))
        .collect();
    ensure!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    Ok(())
}

/// The `KEY=value` lines of an environment file.
fn env_file(path: &Path) -> Result<Vec<(String, String)>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

#[test]
fn the_environment_file_configures_containerd_and_starts_the_daemon() -> Result<()> {
    require_root();
    let dir = tempfile::tempdir()?;
    let mut env = env_file(&repo_file("deploy/systemd/peermirror.env"))?;
    ensure!(
        env.iter().all(|(k, _)| k.starts_with("PEERMIRROR_")),
        "{env:?}"
    );
    // Point the file-system and network settings somewhere harmless.
    let key = dir.path().join("swarm.key");
    write_psk(&key, &[9; 32])?;
    let (registry, metrics, router) = (free_port(), free_port(), free_port());
    let overrides = [
        ("PEERMIRROR_PSK_FILE", key.to_string_lossy().into_owned()),
        ("PEERMIRROR_REGISTRY_ADDR", format!("127.0.0.1:{registry}")),
        ("PEERMIRROR_METRICS_ADDR", format!("127.0.0.1:{metrics}")),
        ("PEERMIRROR_ROUTER_ADDR", format!("127.0.0.1:{router}")),
        (
            "PEERMIRROR_STATIC_BOOTSTRAP_PEERS",
            format!("/ip4/127.0.0.1/tcp/{}", free_port()),
        ),
        (
            "PEERMIRROR_DATA_DIR",
            dir.path().join("state").to_string_lossy().into_owned(),
        ),
        (
            "PEERMIRROR_CONTAINERD_SOCK",
            dir.path()
                .join("no-containerd.sock")
                .to_string_lossy()
                .into_owned(),
        ),
        (
            "PEERMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH",
            dir.path().join("certs.d").to_string_lossy().into_owned(),
        ),
        (
            "PEERMIRROR_CONTAINERD_CONFIG",
            dir.path()
                .join("config.toml")
                .to_string_lossy()
                .into_owned(),
        ),
        // The machine's shared default pins and cgroup are not this test's.
        ("PEERMIRROR_DATAPLANE", "off".to_string()),
    ];
    for (k, v) in overrides {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v));
    }

    // ExecStartPre.
    let out = Command::new(peermirror_bin())
        .arg("configure-containerd")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    ensure!(
        out.status.success(),
        "configure-containerd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for registry in ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"] {
        let text =
            std::fs::read_to_string(dir.path().join("certs.d").join(registry).join("hosts.toml"))?;
        ensure!(
            text.contains("[host.\"http://127.0.0.1:5000\"]"),
            "{registry}: {text}"
        );
    }
    // No containerd config here: the user is told, in words.
    ensure!(String::from_utf8_lossy(&out.stderr).contains("config_path"));

    // ExecStart: starts, serves its status port, says what it waits for,
    // and stops cleanly on SIGTERM.
    let mut cmd = Command::new(peermirror_bin());
    cmd.arg("run")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    let mut proc = Proc::spawn("peermirror", cmd, &dir.path().join("pm.log"))?;
    let metrics_addr = format!("127.0.0.1:{metrics}").parse()?;
    let ready = wait_for("the status port", Duration::from_secs(10), || {
        http::get(metrics_addr, "/readyz", &[]).ok()
    })?;
    ensure!(ready.status == 503, "ready without containerd or peers");
    let body = String::from_utf8_lossy(&ready.body);
    ensure!(
        body.contains("containerd") && body.contains("bootstrap"),
        "{body}"
    );
    let (status, _) = proc.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "{status}");
    Ok(())
}
