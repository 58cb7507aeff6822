//! The node's content: the [`ContentStore`] trait, its containerd
//! implementation and an in-memory twin for tests.
//!
//! Also the catalog of what the store holds, ingests in flight and archive
//! imports. Uses `oci` (vocabulary), `net` (backoff) and `metrics` (the
//! Spegel-named catalog gauges).

pub mod catalog;
pub mod conformance;
pub mod containerd;
pub mod import;
pub mod ingest;
pub mod memory;

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;

use peermirror_oci::{Descriptor, Digest, Reference};

pub use catalog::{
    Catalog, ContentEntry, ImageRecord, RegistryCounts, register_spegel_catalog_gauges,
};
pub use containerd::{ContainerdConfig, ContainerdEndpoint, ContainerdStore, StoreGauges};
pub use memory::MemoryStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("containerd call {call} failed: {status}")]
    Grpc {
        call: &'static str,
        #[source]
        status: Box<tonic::Status>,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{digest} is {size} bytes, more than the {limit} bytes allowed here")]
    TooLarge {
        digest: Digest,
        size: u64,
        limit: u64,
    },
    #[error("{digest} ended after {got} of {expected} bytes")]
    Truncated {
        digest: Digest,
        got: u64,
        expected: u64,
    },
}

/// What the store knows about one piece of content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: u64,
    /// Known when the content is part of an image (the referencing descriptor
    /// says it); `None` for content found only by asking the store.
    pub media_type: Option<String>,
}

/// The bytes of a blob range.
pub enum BlobBody {
    /// The content-store file itself. The caller reads the requested range
    /// from it (zero-copy where the transport allows).
    File { file: std::fs::File, path: PathBuf },
    /// Exactly the requested range, as a stream (containerd's gRPC
    /// `Content.Read`, or memory).
    Stream(BoxStream<'static, Result<Bytes, StoreError>>),
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobBody::File { path, .. } => f.debug_struct("File").field("path", path).finish(),
            BlobBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// How the store is doing, for `/readyz` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreHealth {
    /// The last call to the backing store succeeded.
    pub connected: bool,
    /// A catalog has been built at least once.
    pub synced: bool,
}

/// A node's content, read-only.
#[async_trait::async_trait]
pub trait ContentStore: Send + Sync + 'static {
    /// The root descriptor (manifest or index) a tagged reference points to.
    async fn resolve_tag(&self, reference: &Reference) -> Result<Option<Descriptor>, StoreError>;

    /// Whether a digest is present, and its size.
    async fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>, StoreError>;

    /// Opens `len` bytes from `offset` of present content; `None` when it is
    /// not (or no longer) present.
    async fn open(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobBody>, StoreError>;

    /// Content being written into the store now (a blob containerd is
    /// fetching), waiting up to `wait` for its ingest to appear. `None` when
    /// there is none, or this store cannot follow its ingests.
    async fn in_flight(
        &self,
        _digest: &Digest,
        _wait: std::time::Duration,
    ) -> Option<ingest::InFlight> {
        None
    }

    /// The latest catalog; changes whenever the store's images do.
    fn catalog(&self) -> watch::Receiver<Arc<Catalog>>;

    /// Connection and sync state, and its changes.
    fn watch_health(&self) -> watch::Receiver<StoreHealth>;

    fn health(&self) -> StoreHealth {
        *self.watch_health().borrow()
    }
}

/// Reads a whole small blob (a manifest) into memory, refusing anything
/// larger than `limit`.
pub async fn read_small<S: ContentStore + ?Sized>(
    store: &S,
    digest: &Digest,
    size: u64,
    limit: u64,
) -> Result<Option<Bytes>, StoreError> {
    if size > limit {
        return Err(StoreError::TooLarge {
            digest: *digest,
            size,
            limit,
        });
    }
    let Some(body) = store.open(digest, 0, size).await? else {
        return Ok(None);
    };
    let bytes = match body {
        BlobBody::File { file, path } => {
            let digest = *digest;
            tokio::task::spawn_blocking(move || read_file_range(file, &path, &digest, 0, size))
                .await
                .map_err(|e| StoreError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e),
                })??
        }
        BlobBody::Stream(mut stream) => {
            let mut buf = BytesMut::with_capacity(size as usize);
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk?);
                if buf.len() as u64 > size {
                    break;
                }
            }
            if buf.len() as u64 != size {
                return Err(StoreError::Truncated {
                    digest: *digest,
                    got: buf.len() as u64,
                    expected: size,
                });
            }
            buf.freeze()
        }
    };
    Ok(Some(bytes))
}

/// Reads `[offset, offset + len)` of an open file, with blocking I/O.
pub fn read_file_range(
    mut file: std::fs::File,
    path: &std::path::Path,
    digest: &Digest,
    offset: u64,
    len: u64,
) -> Result<Bytes, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut buf = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 != len {
        return Err(StoreError::Truncated {
            digest: *digest,
            got: buf.len() as u64,
            expected: len,
        });
    }
    Ok(Bytes::from(buf))
}
