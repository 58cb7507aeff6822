//! containerd's own `config.toml`, read for settings that would make the
//! CRI plugin ignore the `hosts.toml` files, or leave nothing to share.

use std::path::Path;

use toml_edit::{DocumentMut, Item};

/// A problem with containerd's configuration, in plain words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding(pub String);

/// Reads containerd's `config.toml` and says what would keep kubelet's pulls
/// (the CRI plugin) from using peermirror, or leave this node nothing to
/// share. Supports config versions 2 (containerd 1.x) and 3 (2.x).
pub fn check_containerd_config(config_file: &Path, certs_d: &Path) -> Vec<Finding> {
    match std::fs::read_to_string(config_file) {
        Ok(text) => check_config_text(&text, config_file, certs_d),
        Err(e) => vec![Finding(format!(
            "cannot read {} ({e}); with its built-in defaults containerd 1.x's CRI plugin does not read {} at all: \
             kubelet's pulls will not use peermirror until `config_path` is set",
            config_file.display(),
            certs_d.display()
        ))],
    }
}

/// [`check_containerd_config`] on the text of `config_file`.
pub fn check_config_text(text: &str, config_file: &Path, certs_d: &Path) -> Vec<Finding> {
    let doc: DocumentMut = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            return vec![Finding(format!(
                "{} is not valid TOML: {e}",
                config_file.display()
            ))];
        }
    };
    let plugin = |name: &str| doc.get("plugins").and_then(|p| p.get(name));
    let (registry, discard) = if let Some(images) = plugin("io.containerd.cri.v1.images") {
        (
            images.get("registry"),
            images.get("discard_unpacked_layers"),
        )
    } else {
        let cri = plugin("io.containerd.grpc.v1.cri");
        (
            cri.and_then(|c| c.get("registry")),
            cri.and_then(|c| c.get("containerd"))
                .and_then(|c| c.get("discard_unpacked_layers")),
        )
    };
    let mut findings = Vec::new();
    let config_path = registry
        .and_then(|r| r.get("config_path"))
        .and_then(Item::as_str)
        .unwrap_or("");
    let wanted = certs_d.to_string_lossy();
    if config_path.is_empty() {
        findings.push(Finding(format!(
            "{}: the CRI plugin's registry `config_path` is not set, so kubelet's pulls ignore {wanted}. \
             Set `config_path = \"{wanted}\"` in the [plugins.\"io.containerd.grpc.v1.cri\".registry] table \
             (containerd 2.x: [plugins.\"io.containerd.cri.v1.images\".registry]) and restart containerd.",
            config_file.display()
        )));
    } else if !config_path.split(':').any(|p| Path::new(p) == certs_d) {
        findings.push(Finding(format!(
            "{}: the CRI plugin reads registry hosts from {config_path}, not {wanted}: write there \
             (--containerd-registry-config-path {config_path}) or change `config_path`.",
            config_file.display()
        )));
    }
    if registry.and_then(|r| r.get("mirrors")).is_some() {
        findings.push(Finding(format!(
            "{}: the legacy `mirrors` table is set in the CRI registry configuration; containerd does not accept it \
             together with `config_path`. Move those mirrors into hosts.toml files and remove the table.",
            config_file.display()
        )));
    }
    if discard.and_then(Item::as_bool) == Some(true) {
        findings.push(Finding(format!(
            "{}: `discard_unpacked_layers = true` deletes layers once they are unpacked, so this node has nothing \
             to share with its peers. Set it to false.",
            config_file.display()
        )));
    }
    findings
}
