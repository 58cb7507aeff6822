//! The command line refuses bad input before it writes anything, and says
//! each error once, in the words the README quotes.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use anyhow::{Result, ensure};
use peermirror_tests::services::peermirror_bin;

fn peermirror(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    Ok(Command::new(peermirror_bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()?)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_missing_key_file_is_said_once_and_nothing_is_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("state");
    let missing = dir.path().join("no-such.key");
    let out = peermirror(
        &[
            "run",
            "--psk-file",
            &missing.to_string_lossy(),
            "--data-dir",
            &data.to_string_lossy(),
        ],
        &[],
    )?;
    ensure!(!out.status.success());
    let err = stderr(&out);
    ensure!(
        err == format!(
            "peermirror: reading {}: No such file or directory (os error 2)\n",
            missing.display()
        ),
        "{err:?}"
    );
    ensure!(!data.exists(), "the data directory was created");
    Ok(())
}

#[test]
fn invalid_values_are_refused_at_start() -> Result<()> {
    let out = peermirror(&["run", "--log-level", "verbose"], &[])?;
    ensure!(!out.status.success());
    ensure!(
        stderr(&out).starts_with(
            "error: invalid value 'verbose' for '--log-level <LOG_LEVEL>': \"verbose\" is not a log level"
        ),
        "{}",
        stderr(&out)
    );
    let out = peermirror(&["run"], &[("PEERMIRROR_LOG_LEVEL", "loud")])?;
    ensure!(!out.status.success() && stderr(&out).contains("\"loud\" is not a log level"));
    let out = peermirror(&["run", "--registry-addr", "localhost"], &[])?;
    ensure!(!out.status.success() && stderr(&out).contains("is not an address"));
    Ok(())
}

#[test]
fn generate_psk_makes_its_directory_private() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("etc/peermirror/swarm.key");
    let out = peermirror(&["generate-psk", "--psk-file", &key.to_string_lossy()], &[])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let mode = |p: &std::path::Path| -> Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    ensure!(mode(key.parent().expect("parent"))? == 0o700);
    ensure!(mode(&key)? == 0o600);
    ensure!(std::fs::read_to_string(&key)?.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"));
    // Never over an existing key.
    let out = peermirror(&["generate-psk", "--psk-file", &key.to_string_lossy()], &[])?;
    ensure!(!out.status.success());
    ensure!(stderr(&out).lines().count() == 1, "{}", stderr(&out));
    Ok(())
}

#[test]
fn spegel_s_names_and_space_separated_lists_are_accepted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs.d");
    let none = dir.path().join("none.toml");
    // Spegel's users write the variable space-separated, with URLs.
    let out = peermirror(
        &[
            "configure-containerd",
            "--containerd-registry-config-path",
            &certs.to_string_lossy(),
            "--containerd-config",
            &none.to_string_lossy(),
        ],
        &[(
            "PEERMIRROR_MIRRORED_REGISTRIES",
            "https://docker.io ghcr.io  quay.io",
        )],
    )?;
    ensure!(out.status.success(), "{}", stderr(&out));
    for registry in ["docker.io", "ghcr.io", "quay.io"] {
        ensure!(
            certs.join(registry).join("hosts.toml").exists(),
            "{registry}"
        );
    }
    // And flags space-separated.
    let out = peermirror(
        &[
            "configure-containerd",
            "--containerd-registry-config-path",
            &certs.to_string_lossy(),
            "--containerd-config",
            &none.to_string_lossy(),
            "--mirrored-registries",
            "docker.io",
            "registry.k8s.io",
        ],
        &[],
    )?;
    ensure!(out.status.success(), "{}", stderr(&out));
    ensure!(certs.join("registry.k8s.io/hosts.toml").exists());
    ensure!(
        !certs.join("ghcr.io/hosts.toml").exists(),
        "ghcr.io is not restored"
    );
    Ok(())
}

#[test]
fn the_version_names_the_release_and_the_commit() -> Result<()> {
    let manifest = std::fs::read_to_string(peermirror_tests::manifests::repo_file(
        "userspace/Cargo.toml",
    ))?;
    let release = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        .unwrap_or_default();
    let out = peermirror(&["--version"], &[])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (version, commit) = text
        .trim()
        .strip_prefix("peermirror ")
        .and_then(|r| r.strip_suffix(')'))
        .and_then(|r| r.split_once(" (commit "))
        .unwrap_or_default();
    ensure!(version == release, "{text}");
    let hex = commit.trim_end_matches("-dirty");
    ensure!(
        commit == "unknown" || (hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit())),
        "{text}"
    );
    Ok(())
}
