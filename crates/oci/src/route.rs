//! Parsing of `/v2/...` request targets into typed routes.
//!
//! Every part of the path is validated against the OCI grammar before it is
//! used, so percent-encodings, `..`, empty components and control characters
//! are rejected here, never passed on.

use std::fmt::Write as _;

use super::{Digest, OciError, Reference, Registry, Repository, Tag};

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    Manifest {
        name: Name,
        reference: ManifestReference,
    },
    Blob {
        name: Name,
        digest: Digest,
    },
}

/// The repository a request names and the registry it belongs to, when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    /// From `?ns=<registry>` (containerd adds it when it talks to a mirror), or
    /// from the first path component when that is a registry host and no `ns`
    /// was given (`/v2/docker.io/library/nginx/manifests/1.27`).
    pub registry: Option<Registry>,
    pub repository: Repository,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestReference {
    Tag(Tag),
    Digest(Digest),
}

impl Name {
    /// The image reference this name denotes with `tag` (Docker Hub names
    /// normalised as containerd stores them); `None` when the registry is
    /// not known.
    pub fn reference(&self, tag: Option<&Tag>) -> Option<Reference> {
        let registry = self.registry.clone()?;
        Some(Reference {
            repository: self.repository.clone().normalized_for(&registry),
            registry,
            tag: tag.cloned(),
            digest: None,
        })
    }
}

impl std::fmt::Display for ManifestReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestReference::Tag(t) => t.fmt(f),
            ManifestReference::Digest(d) => d.fmt(f),
        }
    }
}

impl Route {
    /// The origin-form request target of this route, the inverse of
    /// [`parse_target`]: `/v2/<repository>/<manifests|blobs>/<reference>`,
    /// with `?ns=<registry>` (percent-encoded) when the registry is known.
    pub fn to_path(&self) -> String {
        let (name, kind, reference) = match self {
            Route::Base => return "/v2/".to_string(),
            Route::Manifest { name, reference } => (name, "manifests", reference.to_string()),
            Route::Blob { name, digest } => (name, "blobs", digest.to_string()),
        };
        let mut path = format!("/v2/{}/{kind}/{reference}", name.repository);
        if let Some(registry) = &name.registry {
            path.push_str("?ns=");
            for b in registry.as_str().bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    path.push(char::from(b));
                } else {
                    let _ = write!(path, "%{b:02X}");
                }
            }
        }
        path
    }
}

/// Longest request target we look at; real ones are a few hundred bytes.
const MAX_TARGET_LEN: usize = 4096;

/// Parses an HTTP request target (origin-form `/v2/...?query`, or
/// absolute-form `http://host/v2/...`).
pub fn parse_target(target: &str) -> Result<Route, OciError> {
    if target.len() > MAX_TARGET_LEN {
        return Err(OciError::name_invalid("request target too long"));
    }
    let origin = strip_authority(target);
    let (path, query) = match origin.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (origin, None),
    };
    let not_found =
        || OciError::unsupported(404, "no such endpoint (this is an OCI registry: /v2/...)");
    let rest = match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        p => p.strip_prefix("/v2/").ok_or_else(not_found)?,
    };
    let ns = match query {
        Some(q) => query_param(q, "ns")?
            .map(|v| {
                v.parse::<Registry>()
                    .map_err(|e| OciError::name_invalid(format!("invalid ns parameter: {e}")))
            })
            .transpose()?,
        None => None,
    };
    // <name>/manifests/<reference> or <name>/blobs/<digest>; the name may
    // itself contain "manifests" or "blobs" components, so split from the end.
    let mut parts = rest.rsplitn(3, '/');
    let (Some(last), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(not_found());
    };
    match kind {
        "manifests" => {
            let name = parse_name(name, ns)?;
            let reference = if last.contains(':') {
                ManifestReference::Digest(
                    last.parse()
                        .map_err(|e| OciError::digest_invalid(format!("{e}")))?,
                )
            } else {
                ManifestReference::Tag(last.parse().map_err(|e| {
                    OciError::new(400, super::ErrorCode::ManifestInvalid, format!("{e}"))
                })?)
            };
            Ok(Route::Manifest { name, reference })
        }
        "blobs" => {
            let name = parse_name(name, ns)?;
            let digest = last
                .parse()
                .map_err(|e| OciError::digest_invalid(format!("{e}")))?;
            Ok(Route::Blob { name, digest })
        }
        _ => Err(not_found()),
    }
}

fn strip_authority(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    target
}

fn parse_name(name: &str, ns: Option<Registry>) -> Result<Name, OciError> {
    let invalid = |e: super::ReferenceError| OciError::name_invalid(e.to_string());
    if ns.is_some() {
        return Ok(Name {
            registry: ns,
            repository: name.parse().map_err(invalid)?,
        });
    }
    if let Some((first, rest)) = name.split_once('/')
        && Registry::looks_like_host(first)
        && let Ok(registry) = first.parse::<Registry>()
    {
        return Ok(Name {
            repository: rest.parse::<Repository>().map_err(invalid)?,
            registry: Some(registry),
        });
    }
    Ok(Name {
        registry: None,
        repository: name.parse().map_err(invalid)?,
    })
}

/// Finds `key` in an `a=b&c=d` query string and percent-decodes its value.
fn query_param(query: &str, key: &str) -> Result<Option<String>, OciError> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == key {
            return percent_decode(v)
                .map(Some)
                .ok_or_else(|| OciError::name_invalid(format!("malformed {key} parameter")));
        }
    }
    Ok(None)
}

fn percent_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::super::ErrorCode;
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn base() {
        assert_eq!(parse_target("/v2/"), Ok(Route::Base));
        assert_eq!(parse_target("/v2"), Ok(Route::Base));
        assert_eq!(parse_target("http://localhost:5000/v2/"), Ok(Route::Base));
    }

    #[test]
    fn manifest_by_tag_with_ns() {
        let route = parse_target("/v2/library/nginx/manifests/1.27?ns=docker.io").expect("valid");
        let Route::Manifest { name, reference } = route else {
            panic!("not a manifest route")
        };
        assert_eq!(
            name.registry.as_ref().map(Registry::as_str),
            Some("docker.io")
        );
        assert_eq!(name.repository.as_str(), "library/nginx");
        assert_eq!(
            reference,
            ManifestReference::Tag("1.27".parse().expect("tag"))
        );
    }

    #[test]
    fn ns_is_percent_decoded() {
        let route = parse_target("/v2/app/manifests/v1?ns=127.0.0.1%3A5000").expect("valid");
        let Route::Manifest { name, .. } = route else {
            panic!("not a manifest route")
        };
        assert_eq!(
            name.registry.as_ref().map(Registry::as_str),
            Some("127.0.0.1:5000")
        );
    }

    #[test]
    fn registry_from_first_component_without_ns() {
        let route = parse_target("/v2/docker.io/library/nginx/manifests/1").expect("valid");
        let Route::Manifest { name, .. } = route else {
            panic!("not a manifest route")
        };
        assert_eq!(
            name.registry.as_ref().map(Registry::as_str),
            Some("docker.io")
        );
        assert_eq!(name.repository.as_str(), "library/nginx");

        let route = parse_target("/v2/127.0.0.1:5000/app/manifests/1").expect("valid");
        let Route::Manifest { name, .. } = route else {
            panic!("not a manifest route")
        };
        assert_eq!(
            name.registry.as_ref().map(Registry::as_str),
            Some("127.0.0.1:5000")
        );
    }

    #[test]
    fn blob_and_manifest_by_digest() {
        let route = parse_target(&format!("/v2/a/b/c/blobs/{D}")).expect("valid");
        assert!(
            matches!(route, Route::Blob { ref name, .. } if name.repository.as_str() == "a/b/c")
        );
        let route = parse_target(&format!("/v2/a/manifests/{D}?ns=ghcr.io&x=y")).expect("valid");
        assert!(matches!(
            route,
            Route::Manifest {
                reference: ManifestReference::Digest(_),
                ..
            }
        ));
    }

    #[test]
    fn names_may_contain_route_words() {
        let route = parse_target(&format!("/v2/blobs/manifests/blobs/{D}")).expect("valid");
        assert!(
            matches!(route, Route::Blob { ref name, .. } if name.repository.as_str() == "blobs/manifests")
        );
    }

    #[test]
    fn routes_print_as_they_parse() {
        for target in [
            "/v2/".to_string(),
            format!("/v2/a/b/blobs/{D}"),
            format!("/v2/library/nginx/blobs/{D}?ns=docker.io"),
            "/v2/team/app/manifests/v1?ns=127.0.0.1%3A5000".to_string(),
            "/v2/app/manifests/v1?ns=%5B%3A%3A1%5D%3A5000".to_string(),
            format!("/v2/app/manifests/{D}?ns=ghcr.io"),
        ] {
            let route = parse_target(&target).expect(&target);
            assert_eq!(route.to_path(), target);
            assert_eq!(parse_target(&route.to_path()), Ok(route));
        }
        // A registry taken from the path moves to `ns`.
        let route = parse_target("/v2/docker.io/library/x/manifests/1").expect("valid");
        assert_eq!(route.to_path(), "/v2/library/x/manifests/1?ns=docker.io");
    }

    #[test]
    fn names_become_references() {
        let Route::Manifest { name, reference } =
            parse_target("/v2/nginx/manifests/1.27?ns=docker.io").expect("valid")
        else {
            panic!("not a manifest route")
        };
        let ManifestReference::Tag(tag) = reference else {
            panic!("not a tag")
        };
        let r = name.reference(Some(&tag)).expect("registry known");
        assert_eq!(r.filter_key(), "docker.io/library/nginx:1.27");
        assert_eq!(
            name.reference(None).expect("registry known").filter_key(),
            "docker.io/library/nginx"
        );
        let Route::Blob { name, .. } = parse_target(&format!("/v2/x/blobs/{D}")).expect("valid")
        else {
            panic!("not a blob route")
        };
        assert_eq!(name.reference(None), None);
    }

    #[test]
    fn hostile_targets_are_rejected_with_oci_codes() {
        let cases = [
            (format!("/v2/../../etc/blobs/{D}"), ErrorCode::NameInvalid),
            (format!("/v2/a/%2e%2e/blobs/{D}"), ErrorCode::NameInvalid),
            (format!("/v2//blobs/{D}"), ErrorCode::NameInvalid),
            (
                "/v2/a/blobs/sha256:../../../etc/passwd".to_string(),
                ErrorCode::Unsupported,
            ),
            (
                "/v2/a/blobs/sha256:..%2f..%2fetc%2fpasswd".to_string(),
                ErrorCode::DigestInvalid,
            ),
            (
                "/v2/a/blobs/../../passwd".to_string(),
                ErrorCode::Unsupported,
            ),
            (
                "/v2/a/blobs/sha256%3a00".to_string(),
                ErrorCode::DigestInvalid,
            ),
            ("/v2/a/manifests/..".to_string(), ErrorCode::ManifestInvalid),
            (
                "/v2/a/manifests/sha256:zz".to_string(),
                ErrorCode::DigestInvalid,
            ),
            ("/v2/a/tags/list".to_string(), ErrorCode::Unsupported),
            ("/etc/passwd".to_string(), ErrorCode::Unsupported),
            ("/v2/blobs".to_string(), ErrorCode::Unsupported),
            (
                "/v2/a/manifests/1?ns=../../x".to_string(),
                ErrorCode::NameInvalid,
            ),
            (
                "/v2/a/manifests/1?ns=%zz".to_string(),
                ErrorCode::NameInvalid,
            ),
            (
                "/v2/a/manifests/1?ns=%ff".to_string(),
                ErrorCode::NameInvalid,
            ),
            (
                format!("/v2/{}/blobs/{D}", "a".repeat(5000)),
                ErrorCode::NameInvalid,
            ),
            (format!("/v2/a\u{0}b/blobs/{D}"), ErrorCode::NameInvalid),
        ];
        for (target, code) in cases {
            let err = parse_target(&target).expect_err(&target);
            assert_eq!(err.code, code, "{target}: {err:?}");
            assert!((400..500).contains(&err.status), "{target}");
        }
    }
}
