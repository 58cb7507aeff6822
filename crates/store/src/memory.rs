//! An in-memory [`ContentStore`], the twin of the containerd store for tests
//! of the registry and mirror logic. Like the real store, it reports its
//! health on a live channel, and (with [`MemoryStore::with_files`]) hands out
//! blob bodies as files, so that the zero-copy paths are exercised too.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use super::catalog::{self, Catalog, DocumentCache, ImageRecord};
use super::{BlobBody, BlobInfo, ContentStore, StoreError, StoreHealth};
use peermirror_oci::{Descriptor, Digest, Reference};

#[derive(Default)]
struct Inner {
    blobs: HashMap<Digest, Bytes>,
    images: Vec<ImageRecord>,
}

/// Blobs and images held in memory. Every change rebuilds the catalog.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    catalog: watch::Sender<Arc<Catalog>>,
    health: watch::Sender<StoreHealth>,
    /// When set, each blob is also written to `<dir>/<hex>` and served from
    /// that file.
    files: Option<PathBuf>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            catalog: watch::Sender::new(Arc::new(Catalog::default())),
            health: watch::Sender::new(StoreHealth {
                connected: true,
                synced: true,
            }),
            files: None,
        }
    }

    /// A store whose blob bodies are files in `dir` (which must exist), as
    /// the containerd store's are.
    pub fn with_files(dir: impl Into<PathBuf>) -> MemoryStore {
        MemoryStore {
            files: Some(dir.into()),
            ..MemoryStore::new()
        }
    }

    /// Changes the reported health (a store that loses its backend, or has
    /// not listed its content yet).
    pub fn set_health(&self, health: StoreHealth) {
        self.health.send_replace(health);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated
        // (every mutation is a single insert/remove), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a blob and returns its descriptor.
    pub async fn add_blob(&self, media_type: &str, bytes: impl Into<Bytes>) -> Descriptor {
        let bytes = bytes.into();
        let desc = Descriptor {
            media_type: media_type.to_string(),
            digest: Digest::of(&bytes),
            size: bytes.len() as u64,
        };
        if let Some(dir) = &self.files {
            // A test fixture: a failed write is a broken test machine.
            #[allow(clippy::unwrap_used)]
            std::fs::write(dir.join(desc.digest.hex()), &bytes).unwrap();
        }
        self.lock().blobs.insert(desc.digest, bytes);
        self.rebuild().await;
        desc
    }

    pub async fn remove_blob(&self, digest: &Digest) {
        if let Some(dir) = &self.files {
            let _ = std::fs::remove_file(dir.join(digest.hex()));
        }
        self.lock().blobs.remove(digest);
        self.rebuild().await;
    }

    /// Creates or moves an image (`name` as containerd names images).
    pub async fn set_image(&self, name: &str, target: Descriptor) {
        {
            let mut inner = self.lock();
            inner.images.retain(|i| i.name != name);
            inner.images.push(ImageRecord {
                name: name.to_string(),
                target,
            });
        }
        self.rebuild().await;
    }

    pub async fn remove_image(&self, name: &str) {
        self.lock().images.retain(|i| i.name != name);
        self.rebuild().await;
    }

    async fn rebuild(&self) {
        let (images, blobs) = {
            let inner = self.lock();
            (inner.images.clone(), inner.blobs.clone())
        };
        let present = blobs.iter().map(|(d, b)| (*d, b.len() as u64)).collect();
        let read = |d: Digest| std::future::ready(Ok::<_, Infallible>(blobs.get(&d).cloned()));
        let mut cache = DocumentCache::new();
        match catalog::build(
            &images,
            &present,
            &peermirror_oci::ReferenceFilter::default(),
            &mut cache,
            &read,
        )
        .await
        {
            Ok(catalog) => {
                self.catalog.send_replace(Arc::new(catalog));
            }
            Err(e) => match e {},
        }
    }
}

#[async_trait::async_trait]
impl ContentStore for MemoryStore {
    async fn resolve_tag(&self, reference: &Reference) -> Result<Option<Descriptor>, StoreError> {
        let Some(name) = reference.tagged_name() else {
            return Ok(None);
        };
        Ok(self.catalog.borrow().tag(&name).cloned())
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>, StoreError> {
        let size = self.lock().blobs.get(digest).map(|b| b.len() as u64);
        Ok(size.map(|size| BlobInfo {
            size,
            media_type: self
                .catalog
                .borrow()
                .content(digest)
                .map(|e| e.media_type.clone()),
        }))
    }

    async fn open(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobBody>, StoreError> {
        let Some(bytes) = self.lock().blobs.get(digest).cloned() else {
            return Ok(None);
        };
        let end = offset.saturating_add(len);
        if end > bytes.len() as u64 {
            return Err(StoreError::Truncated {
                digest: *digest,
                got: bytes.len() as u64,
                expected: end,
            });
        }
        if let Some(dir) = &self.files {
            let path = dir.join(digest.hex());
            return match std::fs::File::open(&path) {
                Ok(file) => Ok(Some(BlobBody::File { file, path })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(StoreError::Io { path, source }),
            };
        }
        let slice = bytes.slice(offset as usize..end as usize);
        Ok(Some(BlobBody::Stream(Box::pin(futures::stream::once(
            async move { Ok(slice) },
        )))))
    }

    fn catalog(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog.subscribe()
    }

    fn watch_health(&self) -> watch::Receiver<StoreHealth> {
        self.health.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, KnownImage};

    async fn image(store: &MemoryStore) -> KnownImage {
        let mut blobs = Vec::new();
        for (mt, bytes) in [
            (
                "application/vnd.oci.image.layer.v1.tar",
                Bytes::from(vec![7u8; 70_000]),
            ),
            (
                "application/vnd.oci.image.config.v1+json",
                Bytes::from_static(b"{}"),
            ),
        ] {
            blobs.push((store.add_blob(mt, bytes.clone()).await, bytes));
        }
        let manifest = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": peermirror_oci::manifest::OCI_MANIFEST,
                "config": blobs[1].0, "layers": [blobs[0].0],
            }))
            .expect("json"),
        );
        let root = store
            .add_blob(peermirror_oci::manifest::OCI_MANIFEST, manifest.clone())
            .await;
        blobs.push((root.clone(), manifest));
        store
            .set_image("docker.io/library/conformance:1", root.clone())
            .await;
        KnownImage {
            reference: "docker.io/library/conformance:1"
                .parse()
                .expect("reference"),
            root,
            blobs,
        }
    }

    async fn conformance(store: MemoryStore) {
        let known = image(&store).await;
        conformance::serves(&store, &known).await;
        conformance::misses(&store, &"docker.io/library/absent:1".parse().expect("ref")).await;
        store.remove_image("docker.io/library/conformance:1").await;
        for (d, _) in &known.blobs {
            store.remove_blob(&d.digest).await;
        }
        conformance::forgets(&store, &known).await;
    }

    #[tokio::test]
    async fn the_memory_twin_behaves_like_a_content_store() {
        conformance(MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn the_file_backed_twin_behaves_like_a_content_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        conformance(MemoryStore::with_files(dir.path())).await;
    }
}
