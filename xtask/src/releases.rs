//! The containerd releases the end-to-end tests run against besides the
//! system's (Debian bookworm's 1.6): Debian's newer packages, fetched with
//! `apt-get download` against a private sources list and unpacked with
//! `dpkg -x` under `target/containerd/`, never installed over the system's.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A containerd release from one of Debian's suites.
pub struct Release {
    /// `major.minor`, as the tests and the README name it.
    pub series: &'static str,
    /// The Debian suite that carries it.
    pub suite: &'static str,
}

/// containerd 1.7 from trixie, 2.1 from sid.
pub const NEWER: &[Release] = &[
    Release {
        series: "1.7",
        suite: "trixie",
    },
    Release {
        series: "2.1",
        suite: "sid",
    },
];

/// The Debian archive the machine's own sources use (a deb822 `URIs:` line
/// or a one-line `deb` entry whose URI ends in `/debian`, so that neither
/// the security archive nor third-party repositories are taken), else
/// Debian's main mirror.
fn archive_uri() -> String {
    let mut texts = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            texts.extend(std::fs::read_to_string(path));
        }
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list"));
    for text in &texts {
        for line in text.lines().map(str::trim) {
            let uris: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().collect()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace()
                    .filter(|w| w.contains("://"))
                    .collect()
            } else {
                Vec::new()
            };
            if let Some(uri) = uris
                .into_iter()
                .map(|u| u.trim_end_matches('/'))
                .find(|u| u.ends_with("/debian"))
            {
                return uri.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// The directory with `containerd`, `ctr` and the shims of `release`,
/// downloaded and unpacked the first time.
pub fn ensure(target: &Path, release: &Release) -> Result<PathBuf> {
    let root = target.join("containerd").join(release.series);
    let bin = root.join("usr/bin");
    if bin.join("containerd").is_file() && bin.join("ctr").is_file() {
        return Ok(bin);
    }
    let apt = target.join("containerd/apt").join(release.suite);
    std::fs::create_dir_all(apt.join("lists/partial"))?;
    std::fs::create_dir_all(apt.join("cache/archives/partial"))?;
    let sources = apt.join("sources.list");
    std::fs::write(
        &sources,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} {} main\n",
            archive_uri(),
            release.suite
        ),
    )?;
    let options = [
        format!("Dir::Etc::SourceList={}", sources.display()),
        "Dir::Etc::SourceParts=/dev/null".to_string(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        // The system's dpkg status stays the system's; only this suite's
        // lists are read.
        "APT::Sandbox::User=root".to_string(),
    ];
    let apt_cmd = |program: &str| {
        let mut cmd = Command::new(program);
        for o in &options {
            cmd.arg("-o").arg(o);
        }
        cmd
    };
    eprintln!(
        "xtask: fetching containerd {} from Debian {}",
        release.series, release.suite
    );
    crate::run(apt_cmd("apt-get").args(["update", "-q"]))?;
    let policy = apt_cmd("apt-cache")
        .args(["madison", "containerd"])
        .output()
        .context("running apt-cache madison containerd")?;
    let text = String::from_utf8_lossy(&policy.stdout);
    let version = text
        .lines()
        .filter(|l| l.contains(release.suite))
        .filter_map(|l| l.split('|').nth(1).map(str::trim))
        .find(|v| v.starts_with(&format!("{}.", release.series)))
        .with_context(|| {
            format!(
                "Debian {} has no containerd {}.x (apt-cache madison printed {text:?})",
                release.suite, release.series
            )
        })?
        .to_string();
    let download = apt.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    crate::run(
        apt_cmd("apt-get")
            .current_dir(&download)
            .args(["download", "-q"])
            .arg(format!("containerd={version}")),
    )?;
    let deb = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let unpacking = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&unpacking);
    crate::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacking))?;
    if !unpacking.join("usr/bin/containerd").is_file() {
        bail!("{} holds no usr/bin/containerd", deb.display());
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&unpacking, &root)?;
    let _ = std::fs::remove_dir_all(&download);
    eprintln!("xtask: containerd {version} in {}", bin.display());
    Ok(bin)
}
