//! K3s owns its `certs.d`: peermirror's K3s mode keeps pulls going through
//! peermirror across K3s restarts, survives its own restart, and its
//! uninstall leaves K3s's files as they were. K3s's start-up is reproduced
//! with `peermirror_tests::k3s` (written from K3s's own rules), on a live
//! node: real containerd, the daemon left running, as a K3s restart leaves
//! pods running.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use peermirror_tests::World;
use peermirror_tests::k3s;
use peermirror_tests::services::{Peermirror, PeermirrorOptions, free_port, peermirror_bin};

/// Runs `peermirror <args>`; its stdout.
fn peermirror(args: &[&str]) -> Result<String> {
    let out = Command::new(peermirror_bin()).args(args).output()?;
    ensure!(
        out.status.success(),
        "peermirror {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Manifest requests the daemon answered.
fn manifest_requests(pm: &Peermirror) -> Result<f64> {
    pm.metric(
        "peermirror_http_request_duration_seconds_count",
        &["route=\"manifest\""],
    )
}

/// Pulls image `i` with `certs` as containerd's hosts directory and checks
/// that containerd asked peermirror first.
fn pull_asks_peermirror(world: &World, pm: &Peermirror, certs: &Path, i: usize) -> Result<()> {
    let before = manifest_requests(pm)?;
    let image = &world.images[i % world.images.len()];
    world
        .containerd
        .pull_via(certs, &world.upstream.reference(image))?;
    let after = manifest_requests(pm)?;
    ensure!(
        after > before,
        "containerd did not ask peermirror for {}:{} ({before} -> {after} manifest requests)",
        image.repo,
        image.tag
    );
    Ok(())
}

fn start_daemon(world: &World, name: &str, registry: SocketAddr) -> Result<Peermirror> {
    let mut pm = Peermirror::spawn_with(
        &world.path(name),
        &world.containerd,
        PeermirrorOptions {
            registry,
            ..PeermirrorOptions::loopback(&[])
        },
    )?;
    pm.wait_ready(Duration::from_secs(30))?;
    Ok(pm)
}

#[test]
fn k3s_restarts_keep_peermirror_first_and_uninstall_restores_k3s_files() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    let host = world.upstream.host();
    let etc = world.path("etc-rancher-k3s");
    let certs = world.path("certs.d");
    std::fs::create_dir_all(&etc)?;
    std::fs::create_dir_all(&certs)?;
    let yaml = etc.join("registries.yaml");
    // The operator's file: a mirror of the upstream (the upstream itself
    // over plain HTTP), credentials and a comment, none of which may be
    // lost.
    let original = format!(
        "# managed by the operator\nmirrors:\n  \"{host}\":\n    endpoint:\n      - \"http://{host}\"\nconfigs:\n  \"{host}\":\n    auth:\n      username: operator\n      password: secret\n"
    );
    std::fs::write(&yaml, &original)?;
    // A directory K3s does not manage (no header): left alone by everyone.
    std::fs::create_dir_all(certs.join("other.example"))?;
    std::fs::write(
        certs.join("other.example/hosts.toml"),
        "server = \"https://other.example\"\n",
    )?;
    k3s::start(&yaml, &certs)?;
    let k3s_files = k3s::snapshot(&certs)?;

    let registry = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut pm = start_daemon(&world, "pm", registry)?;
    let target = format!("http://{registry}");
    let configure = [
        "configure-containerd",
        "--k3s-registries-yaml",
        &yaml.to_string_lossy(),
        "--containerd-registry-config-path",
        &certs.to_string_lossy(),
        "--mirrored-registries",
        &host,
        "--mirror-targets",
        &target,
    ];
    let said = peermirror(&configure)?;
    ensure!(said.contains("next start"), "{said}");
    // At once, before any K3s restart.
    pull_asks_peermirror(&world, &pm, &certs, 0)?;

    // K3s restarts: it rewrites certs.d from registries.yaml, with the
    // daemon left running. The next pull goes through peermirror.
    k3s::start(&yaml, &certs)?;
    let rewritten = Instant::now();
    pull_asks_peermirror(&world, &pm, &certs, 1)?;
    println!(
        "first pull after K3s's rewrite went through peermirror, {:?} after it",
        rewritten.elapsed()
    );
    let hosts = std::fs::read_to_string(certs.join(&host).join("hosts.toml"))?;
    ensure!(hosts.starts_with(k3s::HEADER), "{hosts}");
    let ours = hosts.find(&format!("[host.\"{target}/v2\"]"));
    let upstream = hosts.find(&format!("[host.\"http://{host}/v2\"]"));
    ensure!(
        ours.is_some() && upstream.is_some() && ours < upstream,
        "peermirror is not first in K3s's file:\n{hosts}"
    );

    // The pod (or unit) restarts: configure-containerd runs again, as the
    // init container or ExecStartPre does, and the daemon comes back.
    let said = peermirror(&configure)?;
    ensure!(said.contains("unchanged"), "{said}");
    let (status, _) = pm.proc.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "{status}");
    let pm = start_daemon(&world, "pm-again", registry)?;
    pull_asks_peermirror(&world, &pm, &certs, 2)?;

    // Uninstall: the operator's registries.yaml comes back byte for byte,
    // certs.d is what K3s wrote from it, and nothing of peermirror's stays.
    peermirror(&[
        "cleanup-containerd",
        "--k3s-registries-yaml",
        &yaml.to_string_lossy(),
        "--containerd-registry-config-path",
        &certs.to_string_lossy(),
    ])?;
    ensure!(std::fs::read_to_string(&yaml)? == original);
    ensure!(!etc.join(".peermirror-backup").exists());
    ensure!(
        k3s::snapshot(&certs)? == k3s_files,
        "certs.d after cleanup differs from what K3s wrote"
    );
    k3s::start(&yaml, &certs)?;
    ensure!(k3s::snapshot(&certs)? == k3s_files);
    Ok(())
}

/// A `registries.yaml` someone changed after peermirror wrote it is never
/// overwritten or lost.
#[test]
fn an_edited_registries_yaml_is_kept() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let dir = tempfile::tempdir()?;
    let yaml = dir.path().join("registries.yaml");
    let certs = dir.path().join("certs.d");
    let args = |sub: &str| -> Vec<String> {
        let mut v = vec![
            sub.to_string(),
            "--k3s-registries-yaml".into(),
            yaml.to_string_lossy().into_owned(),
            "--containerd-registry-config-path".into(),
            certs.to_string_lossy().into_owned(),
        ];
        if sub == "configure-containerd" {
            v.extend(["--mirrored-registries".into(), "docker.io".into()]);
        }
        v
    };
    let run = |sub: &str| {
        Command::new(peermirror_bin())
            .args(args(sub))
            .output()
            .map_err(anyhow::Error::from)
    };
    // No file before: one is made, and cleanup removes it again.
    let out = run("configure-containerd")?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(std::fs::read_to_string(&yaml)?.contains("http://127.0.0.1:5000"));
    ensure!(certs.join("docker.io/hosts.toml").exists());
    let edited = "mirrors:\n  quay.io:\n    endpoint: [\"https://mirror.example.com\"]\n";
    std::fs::write(&yaml, edited)?;
    let out = run("configure-containerd")?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("was changed after peermirror wrote it") && err.lines().count() == 1,
        "{err}"
    );
    ensure!(std::fs::read_to_string(&yaml)? == edited);
    let out = run("cleanup-containerd")?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(
        std::fs::read_to_string(&yaml)? == edited,
        "the edit was lost"
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("kept"));
    Ok(())
}
