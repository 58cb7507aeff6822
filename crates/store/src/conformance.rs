//! The behaviour every [`ContentStore`] must have, as cases that run against
//! each implementation: the in-memory twin in this crate's unit tests, the
//! containerd store against a real containerd in `tests/` (as root). A twin
//! that passes them can stand in for the real store in the registry's and
//! the mirror's tests.
//!
//! Each case is given a store and what it is known to hold; how content got
//! there (added in memory, pulled by containerd) is the caller's business.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::{BlobBody, ContentStore, read_file_range};
use peermirror_oci::{Descriptor, Digest, Reference};

/// An image the store holds: its tag, its root, and every blob of it with
/// its bytes.
#[derive(Debug, Clone)]
pub struct KnownImage {
    pub reference: Reference,
    pub root: Descriptor,
    pub blobs: Vec<(Descriptor, Bytes)>,
}

/// How long a store may take to reflect a change in its catalog (the
/// containerd store rebuilds on events, after a short debounce).
const SETTLE: Duration = Duration::from_secs(15);

/// Reads `len` bytes from `offset` of a present blob, whatever form the
/// store hands them out in.
pub async fn read(
    store: &dyn ContentStore,
    digest: &Digest,
    offset: u64,
    len: u64,
) -> Option<Bytes> {
    match store.open(digest, offset, len).await {
        Ok(Some(BlobBody::File { file, path })) => {
            let digest = *digest;
            tokio::task::spawn_blocking(move || read_file_range(file, &path, &digest, offset, len))
                .await
                .ok()
                .and_then(Result::ok)
        }
        Ok(Some(BlobBody::Stream(mut stream))) => {
            let mut out = Vec::new();
            while let Some(chunk) = stream.next().await {
                out.extend_from_slice(&chunk.ok()?);
            }
            Some(Bytes::from(out))
        }
        Ok(None) | Err(_) => None,
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The store serves everything of `image`: its tag, sizes, whole blobs and
/// ranges of them, and lists it in its catalog and keys.
pub async fn serves(store: &dyn ContentStore, image: &KnownImage) {
    let health = store.health();
    assert!(
        health.connected && health.synced,
        "store not ready: {health:?}"
    );
    let tag = image.reference.tagged_name().expect("a tagged image");
    let mut catalog = store.catalog();
    eventually("the catalog lists the tag", || {
        catalog.borrow_and_update().tag(&tag).is_some()
    })
    .await;
    let resolved = store.resolve_tag(&image.reference).await.expect("resolve");
    assert_eq!(resolved.as_ref(), Some(&image.root), "{tag}");
    let keys = catalog.borrow().keys();
    assert!(keys.contains(&tag), "keys lack {tag}");
    for (desc, bytes) in &image.blobs {
        let info = store
            .stat(&desc.digest)
            .await
            .expect("stat")
            .unwrap_or_else(|| panic!("{} missing", desc.digest));
        assert_eq!(info.size, desc.size);
        assert_eq!(info.size, bytes.len() as u64);
        assert!(
            keys.contains(&desc.digest.to_string()),
            "keys lack {}",
            desc.digest
        );
        let whole = read(store, &desc.digest, 0, desc.size).await;
        assert_eq!(whole.as_ref(), Some(bytes), "{} whole", desc.digest);
        if desc.size > 2 {
            let inner = read(store, &desc.digest, 1, desc.size - 2).await;
            assert_eq!(
                inner.as_deref(),
                Some(&bytes[1..bytes.len() - 1]),
                "{} range",
                desc.digest
            );
        }
    }
    // A range that ends past the blob is an error, never a short body.
    let (desc, _) = &image.blobs[0];
    assert!(store.open(&desc.digest, desc.size, 1).await.is_err());
}

/// What the store does not hold is a plain miss.
pub async fn misses(store: &dyn ContentStore, absent_tag: &Reference) {
    let unknown = Digest::of(b"content no store holds");
    assert_eq!(store.stat(&unknown).await.expect("stat"), None);
    assert!(matches!(store.open(&unknown, 0, 1).await, Ok(None)));
    assert_eq!(store.resolve_tag(absent_tag).await.expect("resolve"), None);
    let tag = absent_tag.tagged_name().expect("tagged");
    assert!(store.catalog().borrow().tag(&tag).is_none());
}

/// After `image` was removed (tag and content), the store forgets it: a
/// miss at once for its blobs, and gone from the catalog soon.
pub async fn forgets(store: &dyn ContentStore, image: &KnownImage) {
    for (desc, _) in &image.blobs {
        assert_eq!(
            store.stat(&desc.digest).await.expect("stat"),
            None,
            "{} still present",
            desc.digest
        );
    }
    let tag = image.reference.tagged_name().expect("tagged");
    let mut catalog = store.catalog();
    eventually("the catalog forgets the tag", || {
        catalog.borrow_and_update().tag(&tag).is_none()
    })
    .await;
    assert_eq!(
        store.resolve_tag(&image.reference).await.expect("resolve"),
        None
    );
}
