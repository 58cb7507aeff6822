//! Following a blob while containerd writes it (the first-deploy fan-out).
//!
//! While containerd fetches a blob, its bytes grow in
//! `<content root>/ingest/<dir>/data`, with `ref` (for remote fetches
//! `layer-sha256:<hex>`, `config-…`, `manifest-…`: the expected digest is
//! the ref's tail) and `total` beside it. On commit containerd renames
//! `data` to `blobs/sha256/<hex>`: the same inode, so an open file keeps
//! reading.
//!
//! [`InFlight::stream`] sends what is written and never past it, and holds
//! the last byte back until the ingest is committed under the expected
//! digest (the blob's file is then the very inode being read: containerd
//! checked the digest). It fails when the ingest is aborted or makes no
//! progress for the stall time. Paths come only from listing the ingest
//! directory; nothing of a request is ever part of one.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use super::StoreError;
use peermirror_oci::Digest;

/// How often a followed file is looked at when it has not grown.
const POLL: Duration = Duration::from_millis(5);
/// Largest chunk read at once.
const CHUNK: usize = 1 << 20;
/// Largest `ref` or `total` file read.
const SMALL_FILE: u64 = 4096;

/// An ingest (or the committed blob) of one digest, open.
#[derive(Debug)]
pub struct InFlight {
    pub digest: Digest,
    /// The blob's size, from `total`.
    pub total: u64,
    file: File,
    /// `ingest/<dir>/data`, gone once committed or aborted.
    data: PathBuf,
    /// `blobs/sha256/<hex>`: where the commit puts it.
    blob: PathBuf,
}

/// The ingest's `ref` file holds containerd's own key for it,
/// `<namespace>/<sequence>/<client ref>` (its metadata store writes one per
/// namespace), and the client's ref names the digest: `<kind>-sha256:<hex>`
/// (containerd's `remotes.MakeRefKey`), or the digest itself. Only an ingest
/// of the served namespace counts: what another namespace fetches is not
/// this node's to serve.
fn ref_names(reference: &str, namespace: &str, digest: &str) -> bool {
    let Some((ns, rest)) = reference.trim().split_once('/') else {
        return false;
    };
    let Some((sequence, client_ref)) = rest.split_once('/') else {
        return false;
    };
    ns == namespace
        && !sequence.is_empty()
        && sequence.bytes().all(|b| b.is_ascii_digit())
        && (client_ref == digest
            || client_ref
                .strip_suffix(digest)
                .is_some_and(|head| head.ends_with('-')))
}

fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let file = File::open(path).ok()?;
    let mut text = String::new();
    file.take(SMALL_FILE).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Looks for an ingest of `digest` in `namespace` under `content_root`: the
/// one written furthest when there are several. `None` when there is none
/// with a known total yet.
pub fn find(content_root: &Path, namespace: &str, digest: &Digest) -> Option<InFlight> {
    let wanted = digest.to_string();
    let blob = content_root.join("blobs").join("sha256").join(digest.hex());
    let entries = std::fs::read_dir(content_root.join("ingest")).ok()?;
    let mut best: Option<(u64, InFlight)> = None;
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(reference) = read_small(&dir.join("ref")) else {
            continue;
        };
        if !ref_names(&reference, namespace, &wanted) {
            continue;
        }
        let Some(total) = read_small(&dir.join("total")).and_then(|t| t.trim().parse().ok()) else {
            continue;
        };
        let data = dir.join("data");
        let Ok(file) = File::open(&data) else {
            continue;
        };
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        if best.as_ref().is_none_or(|(w, _)| written > *w) {
            best = Some((
                written,
                InFlight {
                    digest: *digest,
                    total,
                    file,
                    data,
                    blob: blob.clone(),
                },
            ));
        }
    }
    best.map(|(_, f)| f)
}

/// Waits up to `wait` for an ingest of `digest` to appear (a node told to
/// fetch it opens its ingest within milliseconds of its peermirror's 404).
pub async fn wait_for(
    content_root: PathBuf,
    namespace: String,
    digest: Digest,
    wait: Duration,
) -> Option<InFlight> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let root = content_root.clone();
        let ns = namespace.clone();
        let found = tokio::task::spawn_blocking(move || find(&root, &ns, &digest))
            .await
            .ok()
            .flatten();
        if found.is_some() || tokio::time::Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(POLL * 4).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Writing,
    /// Committed: the blob's file is the inode being read.
    Committed,
    /// Committed by another writer (another namespace's ingest): read the
    /// blob's own file instead.
    CommittedElsewhere,
    /// The ingest is gone and no blob took its place.
    Aborted,
}

impl InFlight {
    fn state(&self) -> State {
        let ours = self.file.metadata().ok().map(|m| (m.dev(), m.ino()));
        match std::fs::metadata(&self.blob) {
            Ok(m) if Some((m.dev(), m.ino())) == ours => State::Committed,
            Ok(_) => State::CommittedElsewhere,
            Err(_) => match std::fs::metadata(&self.data) {
                Ok(_) => State::Writing,
                Err(e) if e.kind() == ErrorKind::NotFound => State::Aborted,
                Err(_) => State::Writing,
            },
        }
    }

    /// Streams `[offset, end)` as it is written. Fails (the stream yields an
    /// error and ends) when nothing is written for `stall`, or the ingest is
    /// aborted.
    pub fn stream(
        self,
        offset: u64,
        end: u64,
        stall: Duration,
    ) -> BoxStream<'static, Result<Bytes, StoreError>> {
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || self.pump(offset, end, stall, &tx));
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    fn pump(
        mut self,
        mut pos: u64,
        end: u64,
        stall: Duration,
        tx: &mpsc::Sender<Result<Bytes, StoreError>>,
    ) {
        let end = end.min(self.total);
        let mut progress = Instant::now();
        let mut state = State::Writing;
        let digest = self.digest;
        let truncated = |got| StoreError::Truncated {
            digest,
            got,
            expected: end,
        };
        while pos < end {
            if tx.is_closed() {
                return;
            }
            let written = self.file.metadata().map(|m| m.len()).unwrap_or(0);
            // The last byte of the blob leaves only once it is committed.
            let allowed = if state == State::Writing && written >= self.total {
                state = self.state();
                if state == State::Writing {
                    self.total.saturating_sub(1)
                } else {
                    written
                }
            } else {
                written
            };
            let readable = allowed.min(end);
            if readable > pos {
                let len = ((readable - pos) as usize).min(CHUNK);
                let mut buf = BytesMut::zeroed(len);
                match self.file.read_at(&mut buf, pos) {
                    Ok(0) => {}
                    Ok(n) => {
                        buf.truncate(n);
                        pos += n as u64;
                        progress = Instant::now();
                        if tx.blocking_send(Ok(buf.freeze())).is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(source) => {
                        let _ = tx.blocking_send(Err(StoreError::Io {
                            path: self.data.clone(),
                            source,
                        }));
                        return;
                    }
                }
            }
            state = self.state();
            match state {
                State::Aborted => {
                    tracing::info!(digest = %self.digest, pos, "followed ingest was aborted");
                    let _ = tx.blocking_send(Err(truncated(pos)));
                    return;
                }
                State::CommittedElsewhere => match File::open(&self.blob) {
                    Ok(f) => {
                        self.file = f;
                        continue;
                    }
                    Err(_) => {
                        let _ = tx.blocking_send(Err(truncated(pos)));
                        return;
                    }
                },
                State::Committed if written >= self.total => continue,
                // Committed short of its total: never complete.
                State::Committed => {
                    let _ = tx.blocking_send(Err(truncated(pos)));
                    return;
                }
                State::Writing => {}
            }
            if progress.elapsed() >= stall {
                tracing::info!(digest = %self.digest, pos, ?stall, "followed ingest made no progress");
                let _ = tx.blocking_send(Err(truncated(pos)));
                return;
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::io::Write;

    const NS: &str = "k8s.io";

    struct Root {
        dir: tempfile::TempDir,
    }

    impl Root {
        fn new() -> Root {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir_all(dir.path().join("ingest")).expect("ingest");
            std::fs::create_dir_all(dir.path().join("blobs/sha256")).expect("blobs");
            Root { dir }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        /// An ingest as containerd lays it out.
        fn ingest(&self, name: &str, reference: &str, total: Option<u64>) -> PathBuf {
            let dir = self.path().join("ingest").join(name);
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("ref"), reference).expect("ref");
            if let Some(t) = total {
                std::fs::write(dir.join("total"), t.to_string()).expect("total");
            }
            std::fs::write(dir.join("data"), b"").expect("data");
            dir
        }

        fn commit(&self, ingest: &Path, digest: &Digest) {
            std::fs::rename(
                ingest.join("data"),
                self.path().join("blobs/sha256").join(digest.hex()),
            )
            .expect("commit");
            std::fs::remove_dir_all(ingest).expect("clean");
        }
    }

    fn blob(len: usize) -> (Vec<u8>, Digest) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let digest = Digest::of(&bytes);
        (bytes, digest)
    }

    async fn collect(
        mut s: BoxStream<'static, Result<Bytes, StoreError>>,
    ) -> (Vec<u8>, Option<StoreError>) {
        let mut out = Vec::new();
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    #[test]
    fn refs_name_their_digest_in_the_served_namespace() {
        let d = "sha256:ab";
        assert!(ref_names("k8s.io/1/layer-sha256:ab", NS, d));
        assert!(ref_names("k8s.io/12/config-sha256:ab\n", NS, d));
        assert!(ref_names("k8s.io/3/sha256:ab", NS, d));
        assert!(!ref_names("k8s.io/1/layer-sha256:abc", NS, d));
        assert!(!ref_names("k8s.io/1/layersha256:ab", NS, d));
        assert!(!ref_names("", NS, d));
        // Another namespace's ingest, or no namespace at all.
        assert!(!ref_names("default/1/layer-sha256:ab", NS, d));
        assert!(!ref_names("k8s.io.x/1/layer-sha256:ab", NS, d));
        assert!(!ref_names("layer-sha256:ab", NS, d));
        assert!(!ref_names("k8s.io/layer-sha256:ab", NS, d));
        assert!(!ref_names("k8s.io//layer-sha256:ab", NS, d));
        assert!(!ref_names("k8s.io/x1/layer-sha256:ab", NS, d));
    }

    #[tokio::test]
    async fn a_growing_ingest_is_followed_to_its_commit() {
        let root = Root::new();
        let (bytes, digest) = blob(3 << 20);
        root.ingest("other", "k8s.io/1/layer-sha256:00", Some(5));
        // The same digest, written by another namespace: further along,
        // but not followed.
        let elsewhere = root.ingest(
            "z",
            &format!("default/1/layer-{digest}"),
            Some(bytes.len() as u64),
        );
        std::fs::write(elsewhere.join("data"), &bytes[..1 << 20]).expect("write");
        let dir = root.ingest(
            "x",
            &format!("{NS}/1/layer-{digest}"),
            Some(bytes.len() as u64),
        );
        let found = find(root.path(), NS, &digest).expect("found");
        assert_eq!(found.data, dir.join("data"), "another namespace's ingest");
        assert_eq!(found.total, bytes.len() as u64);
        let stream = found.stream(0, bytes.len() as u64, Duration::from_secs(5));
        let writer = {
            let bytes = bytes.clone();
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(dir.join("data"))
                    .expect("open");
                for chunk in bytes.chunks(300_000) {
                    f.write_all(chunk).expect("write");
                    f.flush().expect("flush");
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        // Everything but the last byte arrives; the commit releases it.
        let collector = tokio::spawn(collect(stream));
        writer.join().expect("writer");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!collector.is_finished(), "finished before the commit");
        root.commit(&dir, &digest);
        let (got, err) = collector.await.expect("join");
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, bytes);
    }

    #[tokio::test]
    async fn a_range_waits_for_its_bytes() {
        let root = Root::new();
        let (bytes, digest) = blob(100_000);
        let dir = root.ingest("x", &format!("{NS}/1/layer-{digest}"), Some(100_000));
        std::fs::write(dir.join("data"), &bytes[..60_000]).expect("write");
        let stream = find(root.path(), NS, &digest).expect("found").stream(
            50_000,
            70_000,
            Duration::from_secs(5),
        );
        let collector = tokio::spawn(collect(stream));
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(dir.join("data"), &bytes).expect("write");
        let (got, err) = collector.await.expect("join");
        assert!(err.is_none());
        // A range that ends before the tail needs no commit.
        assert_eq!(got, &bytes[50_000..70_000]);
    }

    #[tokio::test]
    async fn a_stalled_or_aborted_ingest_fails_and_never_sends_its_last_byte() {
        let root = Root::new();
        let (bytes, digest) = blob(10_000);
        // Everything written, never committed (a corrupt ingest whose commit
        // containerd refused looks the same).
        let dir = root.ingest("x", &format!("{NS}/1/layer-{digest}"), Some(10_000));
        std::fs::write(dir.join("data"), &bytes).expect("write");
        let stream = find(root.path(), NS, &digest).expect("found").stream(
            0,
            10_000,
            Duration::from_millis(200),
        );
        let (got, err) = collect(stream).await;
        assert_eq!(got.len(), 9_999);
        assert!(matches!(
            err,
            Some(StoreError::Truncated { got: 9_999, .. })
        ));

        // Aborted mid-way (`Content.Abort` removes the ingest).
        let dir = root.ingest("y", &format!("{NS}/1/layer-{digest}"), Some(10_000));
        std::fs::write(dir.join("data"), &bytes[..4_000]).expect("write");
        let _ = std::fs::remove_dir_all(root.path().join("ingest/x"));
        let stream = find(root.path(), NS, &digest).expect("found").stream(
            0,
            10_000,
            Duration::from_secs(30),
        );
        let collector = tokio::spawn(collect(stream));
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::remove_dir_all(&dir).expect("abort");
        let started = Instant::now();
        let (got, err) = collector.await.expect("join");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(got, &bytes[..4_000]);
        assert!(err.is_some());
    }

    #[tokio::test]
    async fn no_ingest_no_total_or_another_digest_is_not_found() {
        let root = Root::new();
        let (_, digest) = blob(10);
        assert!(find(root.path(), NS, &digest).is_none());
        root.ingest("x", &format!("{NS}/1/layer-{digest}"), None);
        assert!(find(root.path(), NS, &digest).is_none());
        let (_, other) = blob(11);
        root.ingest("y", &format!("{NS}/2/layer-{other}"), Some(11));
        assert!(find(root.path(), NS, &digest).is_none());
        let started = Instant::now();
        assert!(
            wait_for(
                root.path().to_path_buf(),
                NS.to_string(),
                digest,
                Duration::from_millis(100)
            )
            .await
            .is_none()
        );
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
