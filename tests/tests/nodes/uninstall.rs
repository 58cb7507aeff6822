//! Uninstall leaves the node as it was: after `peermirror uninstall` (which
//! runs `cleanup-containerd`, then removes the data directory and the bpffs
//! pins of a daemon that was killed), containerd's `certs.d` is byte for byte what it was
//! before the install (a symlinked `hosts.toml` comes back as the link,
//! files peermirror created are gone, and so is `.peermirror-backup/`),
//! and the eBPF programs are detached.
//!
//! And what a `hosts.toml` left behind costs: a pull through a mirror
//! target whose port is closed (the daemon exited), and through one whose
//! daemon is stopped (SIGSTOP: the kernel still accepts connections, and
//! nobody answers). The times are printed; the test asserts what a client
//! sees.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use peermirror_tests::World;
use peermirror_tests::services::{
    DataplaneSlot, Peermirror, PeermirrorOptions, free_port, peermirror_bin,
};

/// Every entry under `dir`: a file's mode and bytes, or a link's target.
fn tree(dir: &Path) -> Result<BTreeMap<String, String>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&path)?;
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path)?.display())
            } else if meta.is_dir() {
                stack.push(path);
                format!("dir {:o}", meta.permissions().mode() & 0o7777)
            } else {
                format!(
                    "file {:o} {}",
                    meta.permissions().mode() & 0o7777,
                    String::from_utf8_lossy(&std::fs::read(&path)?)
                )
            };
            out.insert(rel, what);
        }
    }
    Ok(out)
}

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

#[test]
fn uninstall_leaves_containerd_s_files_as_they_were() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    let root = world.path("etc-containerd");
    let certs = root.join("certs.d");
    // The operator's files before the install.
    std::fs::create_dir_all(certs.join("registry.example.com"))?;
    std::fs::write(
        certs.join("registry.example.com/hosts.toml"),
        "server = \"https://registry.example.com\"\n",
    )?;
    std::fs::write(
        root.join("ghcr.toml"),
        "server = \"https://ghcr.io\"\n[host.\"https://cache.example.com\"]\n",
    )?;
    std::fs::create_dir_all(certs.join("ghcr.io"))?;
    std::os::unix::fs::symlink("../../ghcr.toml", certs.join("ghcr.io/hosts.toml"))?;
    std::fs::create_dir_all(certs.join("quay.io"))?;
    std::fs::write(
        certs.join("quay.io/ca.crt"),
        "a CA the operator keeps here\n",
    )?;
    let before = tree(&root).context("the tree before")?;

    // Install, as the systemd unit does: configure-containerd, then run.
    let certs_arg = certs.to_string_lossy().into_owned();
    peermirror(&[
        "configure-containerd",
        "--containerd-registry-config-path",
        &certs_arg,
        "--mirrored-registries",
        "docker.io,ghcr.io,quay.io,registry.example.com",
        "--containerd-config",
        &root.join("config.toml").to_string_lossy(),
    ])?;
    ensure!(
        tree(&root)? != before,
        "configure-containerd changed nothing"
    );
    let slot = DataplaneSlot::new()?;
    let flags = slot.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let dir = world.path("pm");
    let mut pm = Peermirror::start(&dir, &world.containerd, &flags)?;
    let data = dir.join("data");
    ensure!(data.join("identity.key").exists());
    ensure!(
        std::fs::read_dir(&slot.bpffs)
            .with_context(|| format!("the pins at {}", slot.bpffs.display()))?
            .count()
            > 0,
        "no pins"
    );
    // The worst case: the daemon was killed (a clean stop removes its pins
    // itself), so its pins, and the programs they hold, are still there.
    pm.proc.kill();
    ensure!(slot.bpffs.exists(), "a killed daemon left no pins");
    let attached = attached_programs(&slot.cgroup)?;
    ensure!(attached.len() >= 2, "nothing attached: {attached:?}");

    // The README's uninstall step (systemd), with this node's paths.
    let said = peermirror(&[
        "uninstall",
        "--containerd-registry-config-path",
        &certs_arg,
        "--data-dir",
        &data.to_string_lossy(),
        "--bpffs-path",
        &slot.bpffs.to_string_lossy(),
    ])?;
    ensure!(said.contains("restored"), "{said}");
    ensure!(!data.exists(), "the data directory is still there");
    ensure!(!slot.bpffs.exists(), "the pins are still there");

    let after = tree(&root)?;
    ensure!(
        after == before,
        "certs.d differs after uninstall:\nbefore {before:#?}\nafter {after:#?}"
    );
    // Nothing stays attached: the links were pinned only.
    let attached = attached_programs(&slot.cgroup)?;
    ensure!(attached.is_empty(), "programs still attached: {attached:?}");
    Ok(())
}

/// The programs attached to a cgroup (`bpftool cgroup show`, one per line
/// after the header).
fn attached_programs(cgroup: &Path) -> Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()?;
    ensure!(out.status.success(), "bpftool: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string)
        .collect())
}

/// Pulls `reference` through `certs`, giving up after `limit`; how long it
/// took and whether it succeeded.
fn timed_pull(world: &World, certs: &Path, reference: &str, limit: Duration) -> (Duration, bool) {
    let mut cmd = world.containerd.ctr_command();
    cmd.args([
        "-n",
        &world.containerd.namespace,
        "images",
        "pull",
        "--hosts-dir",
    ])
    .arg(certs);
    if peermirror_tests::release::release().is_v2() {
        cmd.arg("--skip-metadata");
    }
    let started = Instant::now();
    let Ok(mut child) = cmd
        .arg(reference)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return (started.elapsed(), false);
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return (started.elapsed(), status.success());
        }
        if started.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            return (started.elapsed(), false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_left_over_hosts_toml_costs_this_much() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    let certs = world.path("certs.d");
    let upstream = world.upstream.host();
    // The upstream speaks plain HTTP: the operator's own file says so, and
    // peermirror's keeps it after the mirror target.
    std::fs::create_dir_all(certs.join(&upstream))?;
    std::fs::write(
        certs.join(&upstream).join("hosts.toml"),
        format!("server = \"http://{upstream}\"\n"),
    )?;
    let reference = world.upstream.reference(&world.images[0]);
    // The same pull without any mirror target, for reference.
    let (direct, ok) = timed_pull(&world, &certs, &reference, Duration::from_secs(60));
    ensure!(ok, "a pull from the upstream itself failed");
    let registry = SocketAddr::from(([127, 0, 0, 1], free_port()));
    peermirror(&[
        "configure-containerd",
        "--containerd-registry-config-path",
        &certs.to_string_lossy(),
        "--mirrored-registries",
        &upstream,
        "--mirror-targets",
        &format!("http://{registry}"),
        "--prepend-existing",
        "--containerd-config",
        &world.path("none.toml").to_string_lossy(),
    ])?;
    let release = peermirror_tests::release::release().version_text.clone();

    // The daemon gone: its port is closed.
    let (closed, ok) = timed_pull(&world, &certs, &reference, Duration::from_secs(60));
    ensure!(ok, "a pull past a closed mirror port failed");

    // The daemon stopped: connections are accepted and never answered.
    let mut pm = Peermirror::spawn_with(
        &world.path("pm"),
        &world.containerd,
        PeermirrorOptions {
            registry,
            ..PeermirrorOptions::loopback(&[])
        },
    )?;
    pm.wait_ready(Duration::from_secs(30))?;
    pm.proc.signal(libc::SIGSTOP);
    let limit = Duration::from_secs(20);
    let (stopped, stopped_ok) = timed_pull(&world, &certs, &reference, limit);
    pm.proc.signal(libc::SIGCONT);
    let (status, _) = pm.proc.terminate(Duration::from_secs(15))?;
    ensure!(status.success(), "{status}");
    println!(
        "containerd {release}: a pull took {direct:?} without a mirror target and {closed:?} past a \
         left-over one whose port is closed; with the daemon stopped the pull {}",
        if stopped_ok {
            format!("took {stopped:?}")
        } else {
            format!("was still waiting after {limit:?} (given up)")
        }
    );
    Ok(())
}
