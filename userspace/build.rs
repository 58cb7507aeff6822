//! The commit the binary is built from, for `--version`.

/// The commit the binary is built from (`git rev-parse`), for `--version`;
/// `PEERMIRROR_COMMIT` overrides it, and outside a git checkout it is
/// `unknown`.
fn commit() -> String {
    println!("cargo:rerun-if-env-changed=PEERMIRROR_COMMIT");
    if let Ok(commit) = std::env::var("PEERMIRROR_COMMIT") {
        return commit;
    }
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        println!("cargo:rerun-if-changed={git_dir}/refs/heads");
    }
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_string();
    };
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

fn main() {
    println!("cargo:rustc-env=PEERMIRROR_COMMIT={}", commit());
}
