//! Which references this node serves and mirrors: `--mirrored-registries`
//! (empty = every registry) and `--registry-filters` (regular expressions
//! on `<registry>/<repository>[:<tag>]`; a match excludes the reference).

use super::Registry;

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid --registry-filters expression {pattern:?}: {source}")]
    Regex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

#[derive(Debug, Clone, Default)]
pub struct ReferenceFilter {
    registries: Vec<Registry>,
    excludes: Vec<regex::Regex>,
}

impl ReferenceFilter {
    pub fn new(
        registries: Vec<Registry>,
        excludes: &[String],
    ) -> Result<ReferenceFilter, FilterError> {
        let excludes = excludes
            .iter()
            .map(|pattern| {
                regex::Regex::new(pattern).map_err(|source| FilterError::Regex {
                    pattern: pattern.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ReferenceFilter {
            registries,
            excludes,
        })
    }

    /// Whether every registry is served.
    pub fn all_registries(&self) -> bool {
        self.registries.is_empty()
    }

    /// The registries named by `--mirrored-registries` (empty: all).
    pub fn registries(&self) -> &[Registry] {
        &self.registries
    }

    /// Whether nothing is filtered at all.
    pub fn is_open(&self) -> bool {
        self.registries.is_empty() && self.excludes.is_empty()
    }

    pub fn allows_registry(&self, registry: &Registry) -> bool {
        self.registries.is_empty() || self.registries.contains(registry)
    }

    /// Whether `<registry>/<repository>[:<tag>]` may be served.
    pub fn allows(&self, registry: &Registry, reference: &str) -> bool {
        self.allows_registry(registry) && !self.excludes.iter().any(|re| re.is_match(reference))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> Registry {
        s.parse().expect("registry")
    }

    #[test]
    fn registries_and_excludes() {
        let all = ReferenceFilter::default();
        assert!(all.allows(&reg("ghcr.io"), "ghcr.io/a/b:1"));
        let f = ReferenceFilter::new(
            vec![reg("docker.io"), reg("ghcr.io")],
            &[":latest$".into(), "^ghcr.io/private/".into()],
        )
        .expect("valid");
        assert!(f.allows(&reg("docker.io"), "docker.io/library/nginx:1.27"));
        assert!(!f.allows(&reg("docker.io"), "docker.io/library/nginx:latest"));
        assert!(!f.allows(&reg("ghcr.io"), "ghcr.io/private/app:1"));
        assert!(!f.allows(&reg("quay.io"), "quay.io/a:1"));
        assert!(f.allows_registry(&reg("registry-1.docker.io")));
        assert!(ReferenceFilter::new(vec![], &["(".into()]).is_err());
    }
}
