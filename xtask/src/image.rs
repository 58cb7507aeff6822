//! `cargo xtask image`: the peermirror container image, without a Docker
//! engine.
//!
//! An OCI image index for linux/amd64 and linux/arm64, each image built from
//! scratch with one layer: the stripped `peermirror` binary, Debian's name
//! resolution defaults (`/etc/nsswitch.conf`, `/etc/host.conf`), and the C
//! runtime it links (glibc's loader, libc, libm, libgcc_s), taken from
//! Debian's packages of that architecture (`apt-get download libc6:<arch>
//! libgcc-s1:<arch>` + `dpkg -x`; a foreign architecture is added with
//! `dpkg --add-architecture` first), so that each image carries Debian's
//! security updates. The arm64 binary is cross-built with Debian's
//! `gcc-aarch64-linux-gnu`.
//!
//! Output, under `target/image/`:
//! - `oci/`: the OCI layout (`skopeo copy oci:target/image/oci docker://…`);
//! - `peermirror-<version>.oci.tar`: the same as an archive, which
//!   `ctr image import` and `skopeo copy oci-archive:…` accept. It names the
//!   image [`IMAGE_NAME`]`:<version>`, the name the Kubernetes manifests use.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The name the image carries in its archive, and that
/// `deploy/kubernetes/base` runs (an operator who pushes it elsewhere sets
/// kustomize `images:`).
pub const IMAGE_NAME: &str = "localhost/peermirror";

/// The stripped binary may be at most this large.
const BINARY_BUDGET: u64 = 20 << 20;
/// Each platform's compressed image (config, manifest, layer) at most.
const IMAGE_BUDGET: u64 = 12 << 20;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One platform of the image.
pub struct Platform {
    /// OCI architecture (`amd64`, `arm64`).
    pub arch: &'static str,
    /// Rust target triple.
    pub triple: &'static str,
    /// Debian's multiarch tuple (library directory).
    tuple: &'static str,
    /// The dynamic loader, as the binary's `PT_INTERP` names it.
    interpreter: &'static str,
    /// Debian's name of the architecture.
    debian_arch: &'static str,
    /// Where those packages put the libraries, relative to their root.
    lib_dirs: &'static [&'static str],
    /// `strip` for this architecture.
    strip: &'static str,
}

pub const AMD64: Platform = Platform {
    arch: "amd64",
    triple: "x86_64-unknown-linux-gnu",
    tuple: "x86_64-linux-gnu",
    interpreter: "/lib64/ld-linux-x86-64.so.2",
    debian_arch: "amd64",
    lib_dirs: &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"],
    strip: "strip",
};

pub const ARM64: Platform = Platform {
    arch: "arm64",
    triple: "aarch64-unknown-linux-gnu",
    tuple: "aarch64-linux-gnu",
    interpreter: "/lib/ld-linux-aarch64.so.1",
    debian_arch: "arm64",
    lib_dirs: &["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"],
    strip: "aarch64-linux-gnu-strip",
};

/// The platforms of the image.
pub const PLATFORMS: [&Platform; 2] = [&AMD64, &ARM64];

/// The workspace's version (of the `peermirror` package).
pub fn version() -> &'static str {
    // The daemon's package and xtask share the workspace; the daemon's
    // version is what the image is tagged with.
    const MANIFEST: &str = include_str!("../../userspace/Cargo.toml");
    MANIFEST
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or("0.0.0")
}

/// Builds both platforms' binaries, the layout and the archive; returns
/// the archive's path.
pub fn build() -> Result<PathBuf> {
    crate::deps::ensure(crate::deps::IMAGE)?;
    let target = crate::target_dir();
    let out = target.join("image");
    let work = out.join("work");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let version = version();
    let reference = format!("{IMAGE_NAME}:{version}");
    let mut layout = Layout::create(&out.join("oci"))?;
    let mut manifests = Vec::new();
    for platform in PLATFORMS {
        let binary = build_binary(platform, &target)?;
        let stripped = work.join(format!("peermirror-{}", platform.arch));
        std::fs::copy(&binary, &stripped)?;
        crate::run(Command::new(platform.strip).arg(&stripped))?;
        let size = std::fs::metadata(&stripped)?.len();
        println!(
            "linux/{}: stripped binary {:.1} MiB (budget {} MiB)",
            platform.arch,
            size as f64 / (1 << 20) as f64,
            BINARY_BUDGET >> 20
        );
        ensure!(
            size <= BINARY_BUDGET,
            "the linux/{} binary is {size} bytes, over its budget of {BINARY_BUDGET}",
            platform.arch
        );
        let libs = runtime_libraries(platform, &work)?;
        let (manifest, compressed) = layout.add_image(platform, &stripped, &libs, version)?;
        println!(
            "linux/{}: compressed image {:.1} MiB (budget {} MiB)",
            platform.arch,
            compressed as f64 / (1 << 20) as f64,
            IMAGE_BUDGET >> 20
        );
        ensure!(
            compressed <= IMAGE_BUDGET,
            "the linux/{} image is {compressed} bytes compressed, over its budget of {IMAGE_BUDGET}",
            platform.arch
        );
        manifests.push(manifest);
    }
    layout.finish(&manifests, &reference, version)?;
    let archive = out.join(format!("peermirror-{version}.oci.tar"));
    write_archive(&layout.dir, &archive)?;
    // The stripped binaries stay (`work/peermirror-<arch>`), for
    // [`check_foreign_binaries`]; the unpacked packages go.
    for platform in PLATFORMS {
        for dir in ["debs", "root"] {
            std::fs::remove_dir_all(work.join(format!("{dir}-{}", platform.arch)))?;
        }
    }
    println!("OCI layout:  {}", layout.dir.display());
    println!("OCI archive: {} ({reference})", archive.display());
    Ok(archive)
}

/// The release binary for `platform`: the build host's own is the one
/// `cargo build --release` makes (shared with the tests); another is
/// cross-built with Debian's cross toolchain.
pub fn build_binary(platform: &Platform, target: &Path) -> Result<PathBuf> {
    let mut cargo = crate::cargo();
    cargo.args([
        "build",
        "--release",
        "--package",
        "peermirror",
        "--bin",
        "peermirror",
    ]);
    if platform.triple == host_triple() {
        crate::run(&mut cargo)?;
        return Ok(target.join("release/peermirror"));
    }
    crate::run(Command::new("rustup").args(["target", "add", platform.triple]))?;
    cargo.args(["--target", platform.triple]);
    cross_env(&mut cargo, platform);
    crate::run(&mut cargo)?;
    Ok(target.join(platform.triple).join("release/peermirror"))
}

/// Runs each stripped binary of another architecture than this machine's
/// under qemu-user (`qemu-<arch>-static -L <its sysroot>`, not binfmt):
/// `--version` and `run --help`.
pub fn check_foreign_binaries() -> Result<()> {
    let work = crate::target_dir().join("image/work");
    for platform in PLATFORMS {
        if platform.triple == host_triple() {
            continue;
        }
        let binary = work.join(format!("peermirror-{}", platform.arch));
        let qemu = format!(
            "qemu-{}-static",
            platform.triple.split('-').next().unwrap_or_default()
        );
        let sysroot = format!("/usr/{}", platform.tuple);
        for args in [&["--version"][..], &["run", "--help"][..]] {
            let out = Command::new(&qemu)
                .args(["-L", &sysroot])
                .arg(&binary)
                .args(args)
                .output()
                .with_context(|| format!("running {qemu}"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "linux/{} `peermirror {}` under {qemu}: {}{}",
                platform.arch,
                args.join(" "),
                text,
                String::from_utf8_lossy(&out.stderr)
            );
            if args == ["--version"] {
                ensure!(text.starts_with("peermirror "), "{text}");
                println!("linux/{} under {qemu}: {}", platform.arch, text.trim());
            } else {
                ensure!(text.contains("--psk-file"), "{text}");
            }
        }
    }
    Ok(())
}

/// Unit tests that cannot run under qemu-user, and why.
pub const NOT_UNDER_QEMU: &[(&str, &str)] = &[
    (
        "uring::tests::the_next_round_has_a_deadline_again",
        "io_uring: qemu-user does not emulate io_uring_setup",
    ),
    (
        "uring::tests::sends_a_file_and_gives_up_on_a_client_that_stops_reading",
        "io_uring: qemu-user does not emulate io_uring_setup",
    ),
    (
        "mirror_tests::busy_holders_are_used_less",
        "it compares transfer rates, which emulation distorts",
    ),
];

/// The unit tests of the daemon's crates (the binary's library and every
/// crate under `crates/`) for each other architecture, cross-built
/// (release, sharing the image build's dependencies) and run under
/// qemu-user, but those of [`NOT_UNDER_QEMU`].
pub fn test_foreign() -> Result<()> {
    for platform in PLATFORMS {
        if platform.triple == host_triple() {
            continue;
        }
        let qemu = format!(
            "qemu-{}-static -L /usr/{}",
            platform.triple.split('-').next().unwrap_or_default(),
            platform.tuple
        );
        let upper = platform.triple.to_uppercase().replace('-', "_");
        let mut cargo = crate::cargo();
        cross_env(&mut cargo, platform);
        cargo
            .env(format!("CARGO_TARGET_{upper}_RUNNER"), &qemu)
            .args(["test", "--release", "--target", platform.triple])
            .args(["--package", "peermirror"])
            .args(crate::part_crates().iter().flat_map(|c| ["--package", c]))
            .args(["--lib", "--"]);
        for (test, why) in NOT_UNDER_QEMU {
            eprintln!(
                "xtask: linux/{}: not under qemu: {test} ({why})",
                platform.arch
            );
            cargo.args(["--skip", test]);
        }
        cargo.arg("--exact");
        crate::run(&mut cargo)?;
    }
    Ok(())
}

/// The cross compiler, linker and archiver for `platform` (Debian's).
fn cross_env(cargo: &mut Command, platform: &Platform) {
    let upper = platform.triple.to_uppercase().replace('-', "_");
    let lower = platform.triple.replace('-', "_");
    let gcc = format!("{}-gcc", platform.tuple);
    cargo
        .env(format!("CARGO_TARGET_{upper}_LINKER"), &gcc)
        .env(format!("CC_{lower}"), &gcc)
        .env(format!("AR_{lower}"), format!("{}-ar", platform.tuple));
}

/// The Rust triple of the machine this runs on.
pub fn host_triple() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => ARM64.triple,
        _ => AMD64.triple,
    }
}

/// A file of the image: its path in the image and its bytes.
struct File {
    path: String,
    bytes: Vec<u8>,
    mode: u32,
}

/// Makes `apt-get download` find packages of Debian architecture `arch`:
/// a foreign one is added (`dpkg --add-architecture`) and the package lists
/// read again, once.
fn enable_architecture(arch: &str) -> Result<()> {
    let native = crate::run_output(Command::new("dpkg").arg("--print-architecture"))?;
    let foreign = crate::run_output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if native.trim() == arch || foreign.split_whitespace().any(|a| a == arch) {
        return Ok(());
    }
    eprintln!("xtask: adding the {arch} architecture to dpkg, for its runtime libraries");
    crate::run(Command::new("dpkg").args(["--add-architecture", arch]))?;
    crate::run(Command::new("apt-get").args(["update", "-q"]))
}

/// The loader, libc, libm and libgcc_s of `platform`, from its Debian
/// packages (downloaded into `work` and unpacked with `dpkg -x`).
fn runtime_libraries(platform: &Platform, work: &Path) -> Result<Vec<File>> {
    let debs = work.join(format!("debs-{}", platform.arch));
    let root = work.join(format!("root-{}", platform.arch));
    std::fs::create_dir_all(&debs)?;
    std::fs::create_dir_all(&root)?;
    enable_architecture(platform.debian_arch)?;
    let packages = ["libc6", "libgcc-s1"].map(|p| format!("{p}:{}", platform.debian_arch));
    crate::run(
        Command::new("apt-get")
            // Into a directory of ours, which apt's sandbox user cannot write.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .args(&packages)
            .current_dir(&debs),
    )
    .context("apt-get download (run `apt-get update` first if the package lists are missing)")?;
    for deb in std::fs::read_dir(&debs)? {
        crate::run(Command::new("dpkg").arg("-x").arg(deb?.path()).arg(&root))?;
    }
    let interpreter = Path::new(platform.interpreter)
        .file_name()
        .context("interpreter name")?
        .to_string_lossy()
        .into_owned();
    let mut files = Vec::new();
    for name in [
        interpreter.as_str(),
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
    ] {
        let found = platform
            .lib_dirs
            .iter()
            .map(|d| root.join(d).join(name))
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "{name} is in none of {:?} of {packages:?}",
                    platform.lib_dirs
                )
            })?;
        // dpkg -x keeps symlinks; read what they point to (within `root`).
        let bytes = std::fs::read(resolve_in(&root, &found)?)?;
        let path = if name == interpreter {
            platform.interpreter.trim_start_matches('/').to_string()
        } else {
            format!("lib/{}/{name}", platform.tuple)
        };
        files.push(File {
            path,
            bytes,
            mode: 0o755,
        });
    }
    Ok(files)
}

/// `path` with its symlinks followed inside `root` (an absolute link target
/// is taken relative to `root`).
fn resolve_in(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut path = path.to_path_buf();
    for _ in 0..16 {
        match std::fs::read_link(&path) {
            Ok(target) if target.is_absolute() => {
                path = root.join(target.strip_prefix("/")?);
            }
            Ok(target) => {
                path = path.parent().context("link without parent")?.join(target);
            }
            Err(_) => return Ok(path),
        }
    }
    bail!("too many symlinks at {}", path.display())
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OCI layout being written.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn create(dir: &Path) -> Result<Layout> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    fn add_blob(&mut self, media_type: &str, bytes: &[u8]) -> Result<serde_json::Value> {
        let digest = sha256(bytes);
        std::fs::write(
            self.dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
            bytes,
        )?;
        Ok(json!({"mediaType": media_type, "digest": digest, "size": bytes.len()}))
    }

    /// One platform's image: a layer with the binary and the libraries, its
    /// config and manifest. Returns the manifest's descriptor (with its
    /// platform) and the image's compressed size.
    fn add_image(
        &mut self,
        platform: &Platform,
        binary: &Path,
        libs: &[File],
        version: &str,
    ) -> Result<(serde_json::Value, u64)> {
        let mut files = vec![File {
            path: "usr/local/bin/peermirror".into(),
            bytes: std::fs::read(binary)?,
            mode: 0o755,
        }];
        files.extend(libs.iter().map(|f| File {
            path: f.path.clone(),
            bytes: f.bytes.clone(),
            mode: f.mode,
        }));
        // Names resolve as on any Debian system: /etc/hosts (which the
        // kubelet or runtime mounts), then DNS (`--bootstrap-kind dns`),
        // every address of a name in /etc/hosts (glibc's default is the
        // first only).
        for (path, text) in [
            ("etc/nsswitch.conf", "hosts: files dns\n"),
            ("etc/host.conf", "multi on\n"),
        ] {
            files.push(File {
                path: path.into(),
                bytes: text.as_bytes().to_vec(),
                mode: 0o644,
            });
        }
        let tar = layer_tar(&files)?;
        let diff_id = sha256(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar)?;
        let layer = self.add_blob(OCI_LAYER_GZIP, &gz.finish()?)?;
        let config = json!({
            "architecture": platform.arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "Entrypoint": ["/usr/local/bin/peermirror"],
                "Cmd": ["run"],
                "Labels": {
                    "org.opencontainers.image.title": "peermirror",
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.licenses": "Apache-2.0",
                },
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "cargo xtask image"}],
        });
        let config = self.add_blob(OCI_CONFIG, &serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": [layer],
        });
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let mut descriptor = self.add_blob(OCI_MANIFEST, &manifest_bytes)?;
        let size = |d: &serde_json::Value| d["size"].as_u64().unwrap_or(0);
        let compressed = size(&config) + size(&layer) + manifest_bytes.len() as u64;
        descriptor["platform"] = json!({"architecture": platform.arch, "os": "linux"});
        Ok((descriptor, compressed))
    }

    /// The image index of every platform, and `index.json` naming it.
    fn finish(
        &mut self,
        manifests: &[serde_json::Value],
        reference: &str,
        version: &str,
    ) -> Result<()> {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        }))?;
        let mut descriptor = self.add_blob(OCI_INDEX, &index)?;
        descriptor["annotations"] = json!({
            "io.containerd.image.name": reference,
            "org.opencontainers.image.ref.name": version,
        });
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec_pretty(&json!({"schemaVersion": 2, "manifests": [descriptor]}))?,
        )?;
        Ok(())
    }
}

/// A layer: the files with their parent directories, owned by root, dated
/// at the epoch (the same inputs make the same layer).
fn layer_tar(files: &[File]) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let mut p = Path::new(&f.path);
        while let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    dirs.insert("tmp".into());
    for dir in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
        h.set_mtime(0);
        h.set_size(0);
        h.set_cksum();
        tar.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
    }
    let mut sorted: Vec<&File> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for f in sorted {
        let mut h = tar::Header::new_gnu();
        h.set_mode(f.mode);
        h.set_mtime(0);
        h.set_size(f.bytes.len() as u64);
        h.set_cksum();
        tar.append_data(&mut h, &f.path, f.bytes.as_slice())?;
    }
    Ok(tar.into_inner()?)
}

/// The layout as one tar (an `oci-archive`).
fn write_archive(layout: &Path, archive: &Path) -> Result<()> {
    let mut tar = tar::Builder::new(std::fs::File::create(archive)?);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let mut entries: Vec<PathBuf> = Vec::new();
    for name in ["oci-layout", "index.json"] {
        entries.push(PathBuf::from(name));
    }
    let mut blobs: Vec<PathBuf> = std::fs::read_dir(layout.join("blobs/sha256"))?
        .map(|e| e.map(|e| PathBuf::from("blobs/sha256").join(e.file_name())))
        .collect::<std::io::Result<_>>()?;
    blobs.sort();
    tar.append_dir("blobs", layout.join("blobs"))?;
    tar.append_dir("blobs/sha256", layout.join("blobs/sha256"))?;
    entries.extend(blobs);
    for e in entries {
        tar.append_path_with_name(layout.join(&e), &e)?;
    }
    tar.into_inner()?.sync_all()?;
    Ok(())
}
