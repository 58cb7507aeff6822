//! Registry hosts, repository names, tags and full image references.
//!
//! The grammar is the one of the OCI distribution spec and of containerd's
//! reference parser. Validation is by construction: a [`Repository`] or a
//! [`Tag`] only exists if its characters are in the allowed set, so neither can
//! ever carry `..`, `%` or a control character into a lookup.

use std::fmt;
use std::str::FromStr;

use super::Digest;

/// Longest repository name the distribution reference grammar accepts.
const MAX_REPOSITORY_LEN: usize = 255;
/// Longest tag (the spec's `[\w][\w.-]{0,127}`).
const MAX_TAG_LEN: usize = 128;
/// A DNS name is at most 253 characters, plus room for `:port`.
const MAX_REGISTRY_LEN: usize = 260;

/// The name under which containerd stores Docker Hub images.
pub const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid registry host {input:?}")]
    InvalidRegistry { input: String },
    #[error("invalid repository name {input:?}")]
    InvalidRepository { input: String },
    #[error("invalid tag {input:?}")]
    InvalidTag { input: String },
    #[error("invalid digest in reference: {source}")]
    InvalidDigest {
        #[from]
        source: super::DigestError,
    },
    #[error("reference {input:?} has neither a tag nor a digest")]
    Unqualified { input: String },
}

/// A registry host, optionally with a port: `docker.io`, `127.0.0.1:5000`, `[::1]:5000`.
/// Docker Hub's aliases are folded into `docker.io`, the name containerd uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry(String);

impl Registry {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_docker_hub(&self) -> bool {
        self.0 == DOCKER_HUB
    }

    /// Whether a path component could be a registry host rather than the
    /// first part of a repository name (the rule of Docker's reference parser:
    /// it contains a `.` or a `:`, or is `localhost`).
    pub fn looks_like_host(component: &str) -> bool {
        component.contains('.') || component.contains(':') || component == "localhost"
    }
}

impl FromStr for Registry {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || ReferenceError::InvalidRegistry {
            input: super::excerpt(input),
        };
        if input.is_empty() || input.len() > MAX_REGISTRY_LEN {
            return Err(err());
        }
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            // [v6]:port or [v6]
            let (v6, after) = rest.split_once(']').ok_or_else(err)?;
            if v6.is_empty()
                || !v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return Err(err());
            }
            match after {
                "" => (None, None),
                p => (None, Some(p.strip_prefix(':').ok_or_else(err)?)),
            }
        } else {
            match input.split_once(':') {
                Some((h, p)) => (Some(h), Some(p)),
                None => (Some(input), None),
            }
        };
        if let Some(host) = host {
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            };
            if !host.split('.').all(label_ok) {
                return Err(err());
            }
        }
        if let Some(port) = port {
            let valid = !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u32>().is_ok_and(|p| p <= 65535);
            if !valid {
                return Err(err());
            }
        }
        let folded = match input {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            other => other.to_string(),
        };
        Ok(Registry(folded))
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A repository name: `library/nginx`, `team/app/api`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

impl Repository {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name containerd uses for this repository on `registry`: Docker Hub
    /// names without a namespace live under `library/`.
    pub fn normalized_for(self, registry: &Registry) -> Repository {
        if registry.is_docker_hub() && !self.0.contains('/') {
            Repository(format!("library/{}", self.0))
        } else {
            self
        }
    }
}

/// One `/`-separated component: lower-case alphanumeric runs joined by `.`,
/// `_`, `__` or any number of `-`.
fn valid_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-"+, always followed by alnum
        // (the last byte is alnum, so the run always ends inside the string).
        let start = i;
        match b {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || !alnum(bytes[i]) {
            return false;
        }
    }
    true
}

impl FromStr for Repository {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty()
            || input.len() > MAX_REPOSITORY_LEN
            || !input.split('/').all(valid_component)
        {
            return Err(ReferenceError::InvalidRepository {
                input: super::excerpt(input),
            });
        }
        Ok(Repository(input.to_string()))
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let bytes = input.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= MAX_TAG_LEN
            && word(bytes[0])
            && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
        if !valid {
            return Err(ReferenceError::InvalidTag {
                input: super::excerpt(input),
            });
        }
        Ok(Tag(input.to_string()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fully qualified image reference, as containerd names images:
/// `docker.io/library/nginx:1.27`, `ghcr.io/org/app@sha256:…`,
/// `127.0.0.1:5000/team/app:v1@sha256:…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    pub registry: Registry,
    pub repository: Repository,
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// A tagged reference, normalised the way containerd names it.
    pub fn tagged(registry: Registry, repository: Repository, tag: Tag) -> Reference {
        let repository = repository.normalized_for(&registry);
        Reference {
            registry,
            repository,
            tag: Some(tag),
            digest: None,
        }
    }

    /// `<registry>/<repository>` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `<registry>/<repository>:<tag>` when tagged: the image name containerd
    /// stores and the DHT key of the tag.
    pub fn tagged_name(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| format!("{}/{}:{}", self.registry, self.repository, t))
    }

    /// The text `--registry-filters` expressions are matched against:
    /// `<registry>/<repository>:<tag>` when tagged, else `<registry>/<repository>`.
    pub fn filter_key(&self) -> String {
        self.tagged_name().unwrap_or_else(|| self.name())
    }

    /// Parses a reference that names its registry, as containerd image names
    /// always do. Short Docker names (`nginx`, `library/nginx:1`) are expanded
    /// the way `docker pull` does.
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>()?)),
            None => (input, None),
        };
        // The tag is after the last ':' that follows the last '/', so that a
        // registry port is not mistaken for a tag.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].parse::<Tag>()?))
            }
            None => (rest, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if Registry::looks_like_host(first) => {
                (first.parse::<Registry>()?, path)
            }
            _ => (Registry(DOCKER_HUB.to_string()), name),
        };
        let repository = repository.parse::<Repository>()?.normalized_for(&registry);
        // Docker Hub's `library/` counts too: what is printed must parse.
        if repository.0.len() > MAX_REPOSITORY_LEN {
            return Err(ReferenceError::InvalidRepository {
                input: super::excerpt(input),
            });
        }
        if tag.is_none() && digest.is_none() {
            return Err(ReferenceError::Unqualified {
                input: super::excerpt(input),
            });
        }
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Reference::parse(input)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_grammar() {
        for ok in [
            "a",
            "library/nginx",
            "team/app/api",
            "my-app",
            "my--app",
            "my.app",
            "my_app",
            "my__app",
            "a0/b1/c2",
        ] {
            assert!(ok.parse::<Repository>().is_ok(), "{ok}");
        }
        for bad in [
            "", "/", "a/", "/a", "a//b", "..", "a/../b", "a/./b", "Nginx", "my___app", "-app",
            "app-", "a%2fb", "a b", "a\0b", "app_", "a.-b",
        ] {
            assert!(bad.parse::<Repository>().is_err(), "{bad:?}");
        }
        assert!("a".repeat(256).parse::<Repository>().is_err());
    }

    #[test]
    fn tag_grammar() {
        for ok in ["latest", "1.27", "v1.0.0-rc.1", "_x", "A_b"] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", ".."] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }

    #[test]
    fn registry_grammar_and_docker_aliases() {
        for ok in [
            "docker.io",
            "127.0.0.1:5000",
            "localhost",
            "[::1]:5000",
            "[fd00::1]",
            "ghcr.io",
        ] {
            assert!(ok.parse::<Registry>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            "-a.io",
            "a.io:",
            "a.io:99999",
            "a.io:x",
            "[::1",
            "[]:1",
            "a/b",
            "a_b.io",
        ] {
            assert!(bad.parse::<Registry>().is_err(), "{bad:?}");
        }
        let r: Registry = "registry-1.docker.io".parse().expect("valid");
        assert!(r.is_docker_hub());
        let r: Registry = "index.docker.io".parse().expect("valid");
        assert_eq!(r.as_str(), "docker.io");
    }

    #[test]
    fn parses_containerd_image_names() {
        let r = Reference::parse("docker.io/library/nginx:1.27").expect("valid");
        assert_eq!(r.registry.as_str(), "docker.io");
        assert_eq!(r.repository.as_str(), "library/nginx");
        assert_eq!(r.tag.as_ref().map(Tag::as_str), Some("1.27"));
        assert_eq!(
            r.tagged_name().as_deref(),
            Some("docker.io/library/nginx:1.27")
        );

        let r = Reference::parse("127.0.0.1:5000/team/app:v1").expect("valid");
        assert_eq!(r.registry.as_str(), "127.0.0.1:5000");
        assert_eq!(r.repository.as_str(), "team/app");

        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("ghcr.io/org/app@{d}")).expect("valid");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest, Some(d));
        assert_eq!(r.to_string(), format!("ghcr.io/org/app@{d}"));

        let r = Reference::parse(&format!("localhost:5000/app:v2@{d}")).expect("valid");
        assert_eq!(r.tag.as_ref().map(Tag::as_str), Some("v2"));
        assert_eq!(r.digest, Some(d));
    }

    #[test]
    fn short_docker_names_expand() {
        let r = Reference::parse("nginx:1.27").expect("valid");
        assert_eq!(r.to_string(), "docker.io/library/nginx:1.27");
        let r = Reference::parse("bitnami/redis:7").expect("valid");
        assert_eq!(r.to_string(), "docker.io/bitnami/redis:7");
        let r = Reference::parse("index.docker.io/nginx:1").expect("valid");
        assert_eq!(r.to_string(), "docker.io/library/nginx:1");
    }

    #[test]
    fn rejects_unqualified_and_malformed() {
        for bad in [
            "docker.io/library/nginx",
            "docker.io/library/nginx:",
            "docker.io/library/nginx@sha256:bad",
            "docker.io/../etc:1",
            "Docker.io/x:1/y",
            "",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn found_by_fuzzing() {
        // A short Docker Hub name at the length limit grows by `library/`:
        // refused, or it would print as a reference that does not parse.
        let name = format!("{}:1", "a".repeat(250));
        assert!(Reference::parse(&name).is_err());
        let name = format!("{}:1", "a".repeat(247));
        let r = Reference::parse(&name).expect("fits with library/");
        assert_eq!(Reference::parse(&r.to_string()), Ok(r));
        // Error messages quote at most a line of printable text.
        let e = Reference::parse(&"\u{10ffff}".repeat(500)).expect_err("garbage");
        assert!(e.to_string().len() < 300 && e.to_string().is_ascii(), "{e}");
    }

    #[test]
    fn tagged_normalises_docker_hub() {
        let r = Reference::tagged(
            "docker.io".parse().expect("registry"),
            "nginx".parse().expect("repo"),
            "1.27".parse().expect("tag"),
        );
        assert_eq!(
            r.tagged_name().as_deref(),
            Some("docker.io/library/nginx:1.27")
        );
        let r = Reference::tagged(
            "ghcr.io".parse().expect("registry"),
            "nginx".parse().expect("repo"),
            "1".parse().expect("tag"),
        );
        assert_eq!(r.tagged_name().as_deref(), Some("ghcr.io/nginx:1"));
    }
}
