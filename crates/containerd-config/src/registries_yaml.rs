//! K3s's `registries.yaml`, read as the list of registries to mirror:
//!
//! ```yaml
//! mirrors:
//!   docker.io:                 # mirrored; no endpoints needed
//!   registry.example.com:
//!     endpoint:                # tried after peermirror, in this order
//!       - https://mirror.example.com:5000
//!   "*":                       # every registry (containerd's `_default`)
//! configs:
//!   mirror.example.com:5000:
//!     tls: { ca_file: /etc/ssl/mirror-ca.pem }
//! ```
//!
//! What `hosts.toml` cannot express is refused with a clear error rather
//! than dropped: `rewrite` (containerd's `hosts.toml` has no rewrites), and
//! any key this parser does not know. Credentials (`configs.*.auth`) are
//! accepted but not written: `hosts.toml` carries no credentials, they stay
//! in the CRI plugin's configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::DEFAULT_HOST;

#[derive(Debug, thiserror::Error)]
pub enum RegistriesYamlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a registries.yaml peermirror understands: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(
        "{path}: mirrors.{registry:?} is not a registry name (`docker.io`, `host:port`, or \"*\")"
    )]
    BadRegistry { path: PathBuf, registry: String },
    #[error("{path}: mirrors.{registry:?} endpoint {endpoint:?} is not an http:// or https:// URL")]
    BadEndpoint {
        path: PathBuf,
        registry: String,
        endpoint: String,
    },
    #[error(
        "{path}: mirrors.{registry:?} has `rewrite`, which containerd's hosts.toml cannot express; \
         remove it (or mirror that registry another way) and run again"
    )]
    Rewrite { path: PathBuf, registry: String },
    #[error("{path} lists no registries under `mirrors:`")]
    Empty { path: PathBuf },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    mirrors: BTreeMap<String, Option<Mirror>>,
    #[serde(default)]
    configs: BTreeMap<String, Option<HostConfig>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mirror {
    #[serde(default)]
    endpoint: Vec<String>,
    #[serde(default)]
    rewrite: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostConfig {
    #[serde(default)]
    auth: Option<Auth>,
    #[serde(default)]
    tls: Option<Tls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // accepted so that a K3s file parses; never written
struct Auth {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
    identitytoken: Option<String>,
    token: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A mirror endpoint that stays in `hosts.toml`, after peermirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The host URL as `hosts.toml` names it.
    pub url: String,
    /// The URL has its own path: containerd must not append `/v2`.
    pub override_path: bool,
    pub tls: Option<Tls>,
}

/// What a `registries.yaml` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistriesYaml {
    /// Registry → its own endpoints, in file order; `_default` for `"*"`.
    pub registries: BTreeMap<String, Vec<Endpoint>>,
    /// TLS settings for a registry's own server (`configs.<registry>.tls`).
    pub server_tls: BTreeMap<String, Tls>,
    /// Hosts whose credentials were given and are not written.
    pub credentials_left: Vec<String>,
}

/// The authority (`host[:port]`) of an http(s) URL, and its path.
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    (!authority.is_empty() && !authority.contains(['@', '?', '#', ' ']))
        .then_some((authority, path))
}

/// Reads `path`.
pub fn load(path: &Path) -> Result<RegistriesYaml, RegistriesYamlError> {
    let text = std::fs::read_to_string(path).map_err(|source| RegistriesYamlError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses the text of a `registries.yaml` (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<RegistriesYaml, RegistriesYamlError> {
    let path_buf = || path.to_path_buf();
    let file: File = if text.trim().is_empty() {
        File {
            mirrors: BTreeMap::new(),
            configs: BTreeMap::new(),
        }
    } else {
        serde_saphyr::from_str(text).map_err(|e| RegistriesYamlError::Parse {
            path: path_buf(),
            reason: e.to_string(),
        })?
    };
    let mut out = RegistriesYaml::default();
    let mut tls_by_host: BTreeMap<String, Tls> = BTreeMap::new();
    for (host, config) in &file.configs {
        let config = config.as_ref();
        if config.and_then(|c| c.auth.as_ref()).is_some() {
            out.credentials_left.push(host.clone());
        }
        if let Some(tls) = config.and_then(|c| c.tls.clone()) {
            tls_by_host.insert(host.clone(), tls);
        }
    }
    for (name, mirror) in &file.mirrors {
        let registry = if name == "*" {
            DEFAULT_HOST.to_string()
        } else {
            let ok = name.parse::<peermirror_oci::Registry>().is_ok()
                && !name.contains('/')
                && !name.starts_with('.');
            if !ok {
                return Err(RegistriesYamlError::BadRegistry {
                    path: path_buf(),
                    registry: name.clone(),
                });
            }
            name.clone()
        };
        let mirror = mirror.as_ref();
        if mirror
            .and_then(|m| m.rewrite.as_ref())
            .is_some_and(|r| !r.is_empty())
        {
            return Err(RegistriesYamlError::Rewrite {
                path: path_buf(),
                registry: name.clone(),
            });
        }
        let mut endpoints = Vec::new();
        for url in mirror.map(|m| m.endpoint.as_slice()).unwrap_or_default() {
            let (authority, url_path) =
                split_url(url).ok_or_else(|| RegistriesYamlError::BadEndpoint {
                    path: path_buf(),
                    registry: name.clone(),
                    endpoint: url.clone(),
                })?;
            // K3s's rule: an endpoint without a path (or `/v2`) is a
            // registry root; any other path is used as given.
            let trimmed = url_path.trim_end_matches('/');
            let (url, override_path) = if trimmed.is_empty() || trimmed == "/v2" {
                (url[..url.len() - url_path.len()].to_string(), false)
            } else {
                (url.trim_end_matches('/').to_string(), true)
            };
            if endpoints.iter().any(|e: &Endpoint| e.url == url) {
                continue;
            }
            endpoints.push(Endpoint {
                url,
                override_path,
                tls: tls_by_host.get(authority).cloned(),
            });
        }
        if let Some(tls) = tls_by_host.get(name) {
            out.server_tls.insert(registry.clone(), tls.clone());
        }
        out.registries.insert(registry, endpoints);
    }
    if out.registries.is_empty() {
        return Err(RegistriesYamlError::Empty { path: path_buf() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<RegistriesYaml, RegistriesYamlError> {
        parse(text, Path::new("/etc/rancher/k3s/registries.yaml"))
    }

    #[test]
    fn k3s_files() {
        let r = p(r#"
mirrors:
  docker.io:
  registry.k8s.io: {}
  ghcr.io:
    endpoint:
      - "https://mirror.example.com:5000"
      - http://10.0.0.5:5000/
      - https://cache.example.com/v2/ghcr
  "*":
configs:
  "mirror.example.com:5000":
    auth:
      username: u
      password: p
    tls:
      ca_file: /etc/ssl/ca.pem
      insecure_skip_verify: false
  ghcr.io:
    tls:
      cert_file: /c.pem
      key_file: /k.pem
"#)
        .expect("test input");
        assert_eq!(
            r.registries.keys().collect::<Vec<_>>(),
            ["_default", "docker.io", "ghcr.io", "registry.k8s.io"]
        );
        assert!(r.registries["docker.io"].is_empty());
        let ghcr = &r.registries["ghcr.io"];
        assert_eq!(ghcr.len(), 3);
        assert_eq!(ghcr[0].url, "https://mirror.example.com:5000");
        assert!(!ghcr[0].override_path);
        assert_eq!(
            ghcr[0].tls.as_ref().expect("test input").ca_file.as_deref(),
            Some(Path::new("/etc/ssl/ca.pem"))
        );
        assert_eq!(ghcr[1].url, "http://10.0.0.5:5000");
        assert!(ghcr[1].tls.is_none());
        assert_eq!(ghcr[2].url, "https://cache.example.com/v2/ghcr");
        assert!(ghcr[2].override_path);
        assert_eq!(
            r.server_tls["ghcr.io"].cert_file.as_deref(),
            Some(Path::new("/c.pem"))
        );
        assert_eq!(r.credentials_left, ["mirror.example.com:5000"]);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let cases: &[(&str, &str)] = &[
            ("mirrors: [docker.io]", "not a registries.yaml"),
            (
                "mirrors:\n  docker.io:\n    endpoints: [https://x]\n",
                "not a registries.yaml",
            ),
            ("mirror:\n  docker.io:\n", "not a registries.yaml"),
            (
                "mirrors:\n  docker.io:\n    endpoint: [ftp://x]\n",
                "endpoint \"ftp://x\"",
            ),
            (
                "mirrors:\n  docker.io:\n    endpoint: [\"https://\"]\n",
                "endpoint",
            ),
            ("mirrors:\n  \"../etc\":\n", "not a registry name"),
            ("mirrors:\n  \"a/b\":\n", "not a registry name"),
            (
                "mirrors:\n  docker.io:\n    rewrite:\n      \"^a/(.*)\": \"b/$1\"\n",
                "rewrite",
            ),
            ("configs:\n  x:\n    tls: {}\n", "no registries"),
            ("", "no registries"),
            ("mirrors: {{{", "not a registries.yaml"),
            ("\u{0}\u{1}", "not a registries.yaml"),
        ];
        for (text, wanted) in cases {
            let err = p(text).expect_err(text).to_string();
            assert!(err.contains(wanted), "{text:?}: {err}");
            assert!(err.contains("registries.yaml"), "{err}");
        }
    }
}
