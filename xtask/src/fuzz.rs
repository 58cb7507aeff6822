//! `cargo xtask fuzz`: the fuzz targets in `fuzz/`, with cargo fuzz on this
//! stable toolchain (`-s none`: libFuzzer's coverage guidance without a
//! sanitizer, which needs nightly). Each target starts from the seed corpus
//! in `fuzz/corpus/<target>/` (kept in the repository, crash inputs that
//! were fixed included) and writes what it finds under `target/fuzz/`, so
//! the repository's corpus only changes by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Installs cargo-fuzz when it is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new(crate::cargo_path())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("xtask: installing cargo-fuzz");
        crate::run(Command::new(crate::cargo_path()).args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// Every target named in `fuzz/Cargo.toml`.
fn targets() -> Result<Vec<String>> {
    let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml"))?;
    Ok(manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .map(|n| n.trim_end_matches('"').to_string())
        .filter(|n| n != "peermirror-fuzz")
        .collect())
}

pub fn run(only: Option<&str>, seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let all = targets()?;
    let chosen: Vec<&String> = match only {
        Some(t) => {
            let Some(t) = all.iter().find(|n| n.as_str() == t) else {
                bail!("no fuzz target {t:?}; there are {all:?}");
            };
            vec![t]
        }
        None => all.iter().collect(),
    };
    let fuzz_dir = root().join("fuzz");
    let target_dir = root().join("target");
    for target in chosen {
        let found = target_dir.join("fuzz/corpus").join(target);
        let seeds = fuzz_dir.join("corpus").join(target);
        let artifacts = target_dir.join("fuzz/artifacts").join(target);
        for d in [&found, &seeds, &artifacts] {
            std::fs::create_dir_all(d)?;
        }
        println!("fuzzing {target} for {seconds} s");
        let status = Command::new(crate::cargo_path())
            .current_dir(&fuzz_dir)
            .env("CARGO_TARGET_DIR", target_dir.join("fuzz/build"))
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&found)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .status()
            .with_context(|| format!("running cargo fuzz for {target}"))?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed; the input is in {} (fix the bug, then add the input to {})",
                artifacts.display(),
                seeds.display()
            );
        }
    }
    Ok(())
}
