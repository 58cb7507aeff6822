//! The Debian packages the tests and the demo use, installed when missing,
//! and the one tool from PyPI (`kubernetes-validate`, which ships the
//! Kubernetes schemas the manifests are validated against).

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// A program (or, when it starts with `/`, a file) and the Debian package
/// that provides it.
#[derive(Clone, Copy)]
pub struct Need {
    pub program: &'static str,
    pub package: &'static str,
}

const fn need(program: &'static str, package: &'static str) -> Need {
    Need { program, package }
}

/// The eBPF programs are built with clang against libbpf's headers.
const EBPF: [Need; 2] = [
    need("clang", "clang"),
    need("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
];

/// What `cargo xtask test` needs.
pub const TEST: &[Need] = &[
    need("protoc", "protobuf-compiler"),
    need("containerd", "containerd"),
    need("ctr", "containerd"),
    need("runc", "runc"),
    need("skopeo", "skopeo"),
    need("docker-registry", "docker-registry"),
    need("ip", "iproute2"),
    need("tc", "iproute2"),
    need("nsenter", "util-linux"),
    need("systemd-analyze", "systemd"),
    need("bpftool", "bpftool"),
    need("setpriv", "util-linux"),
    // The operator's tools: the debug page in a browser, a real scrape.
    need("chromium", "chromium"),
    need("chromedriver", "chromium-driver"),
    need("prometheus", "prometheus"),
    need("promtool", "prometheus"),
    EBPF[0],
    EBPF[1],
];

/// What `cargo xtask image` needs: the eBPF build, the arm64 cross
/// toolchain (the libc headers are only a recommendation of the compiler,
/// so they are named), and qemu to run the arm64 binary here.
pub const IMAGE: &[Need] = &[
    need("protoc", "protobuf-compiler"),
    need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    need("aarch64-linux-gnu-strip", "binutils-aarch64-linux-gnu"),
    need(
        "/usr/aarch64-linux-gnu/include/stdio.h",
        "libc6-dev-arm64-cross",
    ),
    need("qemu-aarch64-static", "qemu-user-static"),
    need("dpkg", "dpkg"),
    EBPF[0],
    EBPF[1],
];

/// What `cargo xtask demo` needs: what the tests need but the browser and
/// Prometheus.
pub const DEMO: &[Need] = &[
    need("protoc", "protobuf-compiler"),
    need("containerd", "containerd"),
    need("ctr", "containerd"),
    need("runc", "runc"),
    need("skopeo", "skopeo"),
    need("docker-registry", "docker-registry"),
    need("ip", "iproute2"),
    need("tc", "iproute2"),
    need("nsenter", "util-linux"),
    need("systemd-analyze", "systemd"),
    need("bpftool", "bpftool"),
    need("setpriv", "util-linux"),
    EBPF[0],
    EBPF[1],
];

/// What `cargo xtask bench` needs.
pub const BENCH: &[Need] = &[
    need("protoc", "protobuf-compiler"),
    need("containerd", "containerd"),
    need("ctr", "containerd"),
    need("runc", "runc"),
    need("skopeo", "skopeo"),
    need("docker-registry", "docker-registry"),
    need("ip", "iproute2"),
    need("nsenter", "util-linux"),
    need("nginx", "nginx"),
    need("curl", "curl"),
    EBPF[0],
    EBPF[1],
];

/// What `cargo xtask build-ebpf` needs.
pub const BUILD_EBPF: &[Need] = &EBPF;

fn on_path(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths).any(|dir| Path::new(&dir).join(program).is_file())
        })
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs `kubernetes-validate` (and PyYAML with it) from PyPI with the
/// machine's pip when it is missing.
pub fn ensure_kubernetes_validate() -> Result<()> {
    if on_path("kubernetes-validate") {
        return Ok(());
    }
    eprintln!("xtask: installing kubernetes-validate (PyPI)");
    let pip = if on_path("pip3") { "pip3" } else { "pip" };
    crate::run(Command::new(pip).args(["install", "-q", "kubernetes-validate==1.37.0"]))?;
    if !on_path("kubernetes-validate") {
        bail!("kubernetes-validate is still missing after `{pip} install kubernetes-validate`");
    }
    Ok(())
}

/// Installs the packages of every missing program with apt-get (as root), or
/// explains what to install.
pub fn ensure(needs: &[Need]) -> Result<()> {
    let mut missing: Vec<&str> = needs
        .iter()
        .filter(|n| !on_path(n.program))
        .map(|n| n.package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {} (install them with `apt-get install {}` as root; the tests also need root)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    crate::run(Command::new("apt-get").args(["update", "-q"]))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if let Some(n) = needs.iter().find(|n| !on_path(n.program)) {
        bail!(
            "{} is still missing after installing {}",
            n.program,
            n.package
        );
    }
    Ok(())
}
