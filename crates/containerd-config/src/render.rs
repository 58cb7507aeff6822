//! The `hosts.toml` peermirror writes for one registry, from its options
//! and the original file.

use std::path::Path;

use toml_edit::{Array, DocumentMut, Item, Table, value};

use crate::{ConfigureOptions, DEFAULT_HOST, HEADER, registries_yaml};
use peermirror_oci::DOCKER_HUB;

/// Writes a CA and a client certificate pair into a `hosts.toml` table.
pub(crate) fn write_ca_and_client(
    table: &mut Table,
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) {
    if let Some(ca) = ca {
        table["ca"] = value(ca.to_string_lossy().as_ref());
    }
    if let Some((cert, key)) = client {
        let mut pair = Array::new();
        pair.push(cert.to_string_lossy().as_ref());
        pair.push(key.to_string_lossy().as_ref());
        let mut pairs = Array::new();
        pairs.push(pair);
        table["client"] = value(pairs);
    }
}

/// Writes a K3s TLS block into a `hosts.toml` table (the top level for the
/// registry's server, a host table for a mirror).
pub(crate) fn write_tls(table: &mut Table, tls: &registries_yaml::Tls) {
    let client = tls.cert_file.as_deref().zip(tls.key_file.as_deref());
    write_ca_and_client(table, tls.ca_file.as_deref(), client);
    if tls.insecure_skip_verify {
        table["skip_verify"] = value(true);
    }
}

/// containerd's duration syntax (`1500ms`, `3s`).
pub(crate) fn go_duration(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The server containerd uses for a registry when `hosts.toml` names none.
pub(crate) fn default_server(registry: &str) -> Option<String> {
    match registry {
        DEFAULT_HOST => None,
        DOCKER_HUB => Some("https://registry-1.docker.io".to_string()),
        other => Some(format!("https://{other}")),
    }
}

pub(crate) fn string_array<'a>(items: impl IntoIterator<Item = &'a str>) -> Array {
    items.into_iter().collect()
}

/// The `hosts.toml` peermirror wants for `registry`, given the original file.
pub(crate) fn render(
    registry: &str,
    opts: &ConfigureOptions,
    original: Option<&str>,
) -> Result<String, String> {
    let original: Option<DocumentMut> = original
        .map(str::parse)
        .transpose()
        .map_err(|e: toml_edit::TomlError| e.to_string())?;
    let mut doc = DocumentMut::new();
    let server = original
        .as_ref()
        .and_then(|o| o.get("server"))
        .and_then(Item::as_str)
        .map(str::to_string)
        .or_else(|| default_server(registry));
    if let Some(server) = server {
        doc["server"] = value(server);
    }
    if let Some(tls) = opts.server_tls.get(registry) {
        write_tls(doc.as_table_mut(), tls);
    }
    if opts.disable_default_endpoint {
        // The server entry is always tried last by containerd; without the
        // pull and resolve capabilities it is never asked for an image.
        doc["capabilities"] = value(string_array(["push"]));
    }
    let mut hosts = Table::new();
    hosts.set_implicit(true);
    let capabilities = if opts.resolve_tags {
        vec!["pull", "resolve"]
    } else {
        vec!["pull"]
    };
    for target in &opts.mirror_targets {
        let mut t = Table::new();
        t["capabilities"] = value(string_array(capabilities.iter().copied()));
        if let Some(tls) = &opts.tls {
            write_ca_and_client(
                &mut t,
                Some(&tls.ca),
                Some((&tls.client_cert, &tls.client_key)),
            );
        }
        if let Some(timeout) = opts.dial_timeout {
            t["dial_timeout"] = value(go_duration(timeout));
        }
        hosts.insert(target, Item::Table(t));
    }
    for endpoint in opts.endpoints.get(registry).into_iter().flatten() {
        if hosts.contains_key(&endpoint.url) {
            continue;
        }
        let mut t = Table::new();
        t["capabilities"] = value(string_array(capabilities.iter().copied()));
        if endpoint.override_path {
            t["override_path"] = value(true);
        }
        if let Some(tls) = &endpoint.tls {
            write_tls(&mut t, tls);
        }
        hosts.insert(&endpoint.url, Item::Table(t));
    }
    if opts.prepend_existing
        && let Some(existing) = original
            .as_ref()
            .and_then(|o| o.get("host"))
            .and_then(Item::as_table)
    {
        for (name, item) in existing.iter() {
            if !hosts.contains_key(name) {
                hosts.insert(name, item.clone());
            }
        }
    }
    doc.insert("host", Item::Table(hosts));
    Ok(format!("{HEADER}{doc}"))
}
