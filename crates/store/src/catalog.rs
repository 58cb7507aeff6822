//! The catalog: what a content store holds for its images, as one immutable
//! snapshot. It is rebuilt from the store's image list and content list, and
//! every consumer (the registry for lookups, the sync task for DHT keys) reads
//! the latest snapshot from a `watch` channel.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use peermirror_oci::{Descriptor, Digest, Kind, Reference, ReferenceFilter, manifest};

/// One image as the store names it, with the descriptor of its root
/// (a manifest or an index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub target: Descriptor,
}

/// A blob that is present in the store and reachable from an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentEntry {
    pub size: u64,
    pub media_type: String,
}

/// Everything the store holds for its images.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// `<registry>/<repository>:<tag>` → the image's root descriptor, only for
    /// images whose root is present.
    tags: HashMap<String, Descriptor>,
    /// Every digest reachable from an image and present in the store.
    content: HashMap<Digest, ContentEntry>,
    /// The registries of the images held (bounded by what the store holds).
    registries: BTreeSet<String>,
    /// Per image root: the bytes of everything reachable from it and present.
    image_sizes: HashMap<Digest, u64>,
    /// Per registry: tags, image roots and content digests held for it.
    by_registry: std::collections::BTreeMap<String, RegistryCounts>,
}

/// What the catalog holds for one registry (each digest counted under the
/// first registry whose image reaches it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryCounts {
    pub tags: usize,
    pub image_digests: usize,
    pub content_digests: usize,
}

impl Catalog {
    pub fn tag(&self, tagged_name: &str) -> Option<&Descriptor> {
        self.tags.get(tagged_name)
    }

    pub fn content(&self, digest: &Digest) -> Option<&ContentEntry> {
        self.content.get(digest)
    }

    pub fn tag_count(&self) -> usize {
        self.tags.len()
    }

    pub fn content_count(&self) -> usize {
        self.content.len()
    }

    /// The keys this node can serve, as advertised in the DHT: every digest
    /// (`sha256:…`) and every tag (`<registry>/<repository>:<tag>`).
    pub fn keys(&self) -> BTreeSet<String> {
        self.content
            .keys()
            .map(Digest::to_string)
            .chain(self.tags.keys().cloned())
            .collect()
    }

    pub fn tags(&self) -> impl Iterator<Item = (&String, &Descriptor)> {
        self.tags.iter()
    }

    /// The bytes of an image (everything reachable from its root that is
    /// present), by the root's digest.
    pub fn image_size(&self, root: &Digest) -> Option<u64> {
        self.image_sizes.get(root).copied()
    }

    /// The bytes of all content listed.
    pub fn content_bytes(&self) -> u64 {
        self.content.values().map(|c| c.size).sum()
    }

    /// Tags, image digests and content digests per registry.
    pub fn registry_counts(&self) -> &std::collections::BTreeMap<String, RegistryCounts> {
        &self.by_registry
    }

    /// Whether an image of `registry` is held here.
    pub fn has_registry(&self, registry: &str) -> bool {
        self.registries.contains(registry)
    }
}

/// Parsed manifests and indexes, kept between rebuilds: content is immutable,
/// so a digest parsed once never needs reading again.
pub type DocumentCache = HashMap<Digest, Arc<peermirror_oci::Document>>;

/// Builds the catalog from the images, the set of digests present in the
/// store (with their sizes) and a way to read a manifest's bytes (`Ok(None)`
/// when it has gone since the listing; an `Err` aborts the build, so that an
/// unreachable store never yields a catalog that looks empty).
///
/// Walks each image from its root; a descriptor whose content is missing is
/// skipped along with everything below it (a multi-arch index pulled for one
/// platform lacks the other platforms' manifests; layers may be gone after
/// garbage collection). Manifests that fail to parse are skipped with a
/// warning, not fatal.
pub async fn build<E, F, Fut>(
    images: &[ImageRecord],
    present: &HashMap<Digest, u64>,
    filter: &ReferenceFilter,
    cache: &mut DocumentCache,
    read: F,
) -> Result<Catalog, E>
where
    F: Fn(Digest) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Bytes>, E>>,
{
    let mut catalog = Catalog::default();
    let mut image_roots: HashSet<Digest> = HashSet::new();
    for image in images {
        if !present.contains_key(&image.target.digest) {
            continue;
        }
        let mut registry = None;
        // The CRI plugin also names each image by its config digest
        // (`sha256:<hex>`, the image id): that is no reference and has no
        // tag to announce.
        let parsed = if image.name.parse::<Digest>().is_ok() {
            Err(())
        } else {
            Reference::parse(&image.name).map_err(drop)
        };
        match parsed {
            Ok(reference) => {
                if !filter.allows(&reference.registry, &reference.filter_key()) {
                    continue;
                }
                let counts = catalog
                    .by_registry
                    .entry(reference.registry.to_string())
                    .or_default();
                if let Some(name) = reference.tagged_name() {
                    catalog.tags.insert(name, image.target.clone());
                    counts.tags += 1;
                }
                if image_roots.insert(image.target.digest) {
                    counts.image_digests += 1;
                }
                catalog.registries.insert(reference.registry.to_string());
                registry = Some(reference.registry.to_string());
            }
            // A name that is no reference cannot be matched by a filter.
            Err(_) if !filter.is_open() => continue,
            Err(_) => {}
        }
        // Each image is walked whole (documents come from the cache after
        // the first walk), so that its size counts shared layers too.
        let mut visited: HashSet<Digest> = HashSet::new();
        let mut image_bytes = 0u64;
        let mut stack = vec![image.target.clone()];
        while let Some(desc) = stack.pop() {
            let Some(&size) = present.get(&desc.digest) else {
                continue;
            };
            if !visited.insert(desc.digest) {
                continue;
            }
            image_bytes += size;
            let new = catalog
                .content
                .insert(
                    desc.digest,
                    ContentEntry {
                        size,
                        media_type: desc.media_type.clone(),
                    },
                )
                .is_none();
            if new && let Some(r) = &registry {
                catalog
                    .by_registry
                    .entry(r.clone())
                    .or_default()
                    .content_digests += 1;
            }
            if manifest::kind_of(&desc.media_type) == Kind::Blob {
                continue;
            }
            let doc = match cache.get(&desc.digest) {
                Some(doc) => doc.clone(),
                None => {
                    if size > manifest::MAX_MANIFEST_SIZE {
                        tracing::warn!(digest = %desc.digest, size, "manifest too large, not walked");
                        continue;
                    }
                    let Some(bytes) = read(desc.digest).await? else {
                        continue;
                    };
                    match manifest::parse_document(&bytes) {
                        Ok(doc) => {
                            let doc = Arc::new(doc);
                            cache.insert(desc.digest, doc.clone());
                            doc
                        }
                        Err(e) => {
                            tracing::warn!(digest = %desc.digest, error = %e, "unparsable manifest, not walked");
                            continue;
                        }
                    }
                }
            };
            stack.extend(doc.children.iter().cloned());
        }
        catalog.image_sizes.insert(image.target.digest, image_bytes);
    }
    // Forget documents that left the store, so the cache stays bounded by it.
    cache.retain(|digest, _| present.contains_key(digest));
    Ok(catalog)
}

/// Spegel's per-registry counts of what this node advertises, read from the
/// catalog at each scrape.
pub fn register_spegel_catalog_gauges(
    prometheus: &mut prometheus_client::registry::Registry,
    catalog: &tokio::sync::watch::Receiver<std::sync::Arc<crate::Catalog>>,
) {
    type Pick = fn(&crate::RegistryCounts) -> usize;
    let families: [(&'static str, &'static str, Pick); 3] = [
        (
            "spegel_advertised_image_tags",
            "Number of image tags advertised to be available (Spegel's name)",
            |c| c.tags,
        ),
        (
            "spegel_advertised_image_digests",
            "Number of image digests advertised to be available (Spegel's name)",
            |c| c.image_digests,
        ),
        (
            "spegel_advertised_content_digests",
            "Number of content digests advertised to be available (Spegel's name)",
            |c| c.content_digests,
        ),
    ];
    for (name, help, pick) in families {
        let catalog = catalog.clone();
        peermirror_metrics::register_computed_gauges(
            prometheus,
            name,
            help,
            Box::new(move || {
                catalog
                    .borrow()
                    .registry_counts()
                    .iter()
                    .map(|(registry, counts)| {
                        (
                            vec![("registry".to_string(), registry.clone())],
                            pick(counts) as i64,
                        )
                    })
                    .collect()
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermirror_oci::manifest::{OCI_INDEX, OCI_MANIFEST};

    fn desc(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
        }
    }

    fn manifest_json(config: &Descriptor, layers: &[Descriptor]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config, "layers": layers,
        }))
        .expect("json")
    }

    #[tokio::test]
    async fn walks_present_content_and_skips_missing_children() {
        let layer_a = b"layer a".to_vec();
        let layer_b = b"layer b (missing)".to_vec();
        let config = b"{}".to_vec();
        let cfg = desc("application/vnd.oci.image.config.v1+json", &config);
        let la = desc("application/vnd.oci.image.layer.v1.tar", &layer_a);
        let lb = desc("application/vnd.oci.image.layer.v1.tar", &layer_b);
        let m1 = manifest_json(&cfg, std::slice::from_ref(&la));
        let m2 = manifest_json(&cfg, std::slice::from_ref(&lb));
        let d1 = desc(OCI_MANIFEST, &m1);
        let d2 = desc(OCI_MANIFEST, &m2); // the other platform: not pulled
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d1, d2],
        }))
        .expect("json");
        let di = desc(OCI_INDEX, &index);

        let blobs: HashMap<Digest, Vec<u8>> = [&index, &m1, &config, &layer_a]
            .into_iter()
            .map(|b| (Digest::of(b), b.clone()))
            .collect();
        let present: HashMap<Digest, u64> =
            blobs.iter().map(|(d, b)| (*d, b.len() as u64)).collect();
        let images = vec![
            ImageRecord {
                name: "docker.io/library/app:1".into(),
                target: di.clone(),
            },
            ImageRecord {
                name: format!("docker.io/library/app@{}", di.digest),
                target: di.clone(),
            },
            ImageRecord {
                // root missing entirely: contributes nothing
                name: "docker.io/library/gone:1".into(),
                target: desc(OCI_MANIFEST, b"gone"),
            },
            ImageRecord {
                // the CRI plugin's image-id record: no tag of its own
                name: cfg.digest.to_string(),
                target: di.clone(),
            },
        ];
        let reads = std::cell::Cell::new(0);
        let read = |d: Digest| {
            reads.set(reads.get() + 1);
            let found = blobs.get(&d).map(|b| Bytes::from(b.clone()));
            async move { Ok::<_, std::convert::Infallible>(found) }
        };
        let mut cache = DocumentCache::new();
        let open = ReferenceFilter::default();
        let catalog = build(&images, &present, &open, &mut cache, &read)
            .await
            .expect("build");

        assert_eq!(catalog.tag("docker.io/library/app:1"), Some(&di));
        assert_eq!(catalog.tag_count(), 1);
        assert_eq!(catalog.content_count(), 4);
        assert!(catalog.content(&lb.digest).is_none());
        assert!(catalog.content(&d2.digest).is_none());
        assert_eq!(
            catalog.content(&d1.digest).map(|e| e.media_type.as_str()),
            Some(OCI_MANIFEST)
        );
        let keys = catalog.keys();
        assert!(keys.contains("docker.io/library/app:1"));
        assert!(keys.contains(&la.digest.to_string()));
        assert_eq!(keys.len(), 5);
        assert_eq!(reads.get(), 2);
        // What the image weighs, and what is counted per registry.
        let size = (index.len() + m1.len() + config.len() + layer_a.len()) as u64;
        assert_eq!(catalog.image_size(&di.digest), Some(size));
        assert_eq!(catalog.content_bytes(), size);
        assert_eq!(
            catalog.registry_counts().get("docker.io"),
            Some(&RegistryCounts {
                tags: 1,
                image_digests: 1,
                content_digests: 4,
            })
        );
        assert_eq!(catalog.registry_counts().len(), 1);

        // A second build reads nothing: documents are cached.
        build(&images, &present, &open, &mut cache, &read)
            .await
            .expect("build");
        assert_eq!(reads.get(), 2);

        // Filtered images contribute nothing.
        let only_ghcr =
            ReferenceFilter::new(vec!["ghcr.io".parse().expect("registry")], &[]).expect("filter");
        let filtered = build(&images, &present, &only_ghcr, &mut cache, &read)
            .await
            .expect("build");
        assert_eq!(filtered.content_count(), 0);
        let no_app_tag = ReferenceFilter::new(vec![], &["/app:1$".to_string()]).expect("filter");
        let filtered = build(&images, &present, &no_app_tag, &mut cache, &read)
            .await
            .expect("build");
        assert_eq!(filtered.tag_count(), 0);
        // Still reachable through the digest-named image of the same index.
        assert_eq!(filtered.content_count(), 4);
    }
}
