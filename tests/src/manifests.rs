//! The Kubernetes manifests as the cluster receives them: a kustomize
//! overlay rendered by `kubectl kustomize` (offline), as JSON documents.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// A file of this repository.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// `deploy/kubernetes/<kustomization>` (`overlays/plain`, `uninstall`)
/// rendered: the YAML file (in the returned temporary directory) and its
/// documents as JSON (PyYAML, which `kubernetes-validate` brings, reads the
/// YAML).
pub fn render(kustomization: &str) -> Result<(PathBuf, Vec<serde_json::Value>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_file(&format!("deploy/kubernetes/{kustomization}")))
        .output()
        .context("kubectl (it renders kustomize offline)")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {kustomization}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir
        .path()
        .join(format!("{}.yaml", kustomization.replace('/', "-")));
    std::fs::write(&path, &out.stdout)?;
    let json = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(&path)
        .output()
        .context("python3 with PyYAML")?;
    ensure!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    Ok((path, serde_json::from_slice(&json.stdout)?, dir))
}

/// The strings of a JSON array (a container's `command` or `args`); none
/// for anything else.
pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
