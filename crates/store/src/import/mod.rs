//! `peermirror import`: image archives into containerd's content store and
//! image records, pinned so that kubelet's image garbage collection keeps
//! them, and from there shared with every peer like any pulled image.
//!
//! - Archives are OCI image layouts (`index.json` + `blobs/`, which is also
//!   what `docker save` writes from Docker 25 on) or classic `docker save`
//!   tarballs (`manifest.json` + `<id>/layer.tar`), plain, gzip or zstd
//!   (K3s's `agent/images/*.tar.zst`), told apart by their first bytes.
//! - The archive is read once, as a stream: every file is written to
//!   containerd through `Content.Write` (digest checked by containerd on
//!   commit; `blobs/sha256/<hex>` must hash to `<hex>`) under a lease, so
//!   that nothing is collected half-way and nothing stays when the import
//!   fails: the lease is deleted with a synchronous garbage collection, and
//!   an unfinished write is aborted. Image records are created only once
//!   every manifest, config and layer they reference is in the store.
//! - Each image gets the label `io.cri-containerd.pinned=pinned`, which
//!   containerd's CRI plugin reports as `pinned` (1.6.22+/1.7.3+/2.x).
//!   Manifests and indexes get containerd's `gc.ref` labels for their
//!   children, as a pull writes them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use containerd_client::services::v1::{
    AbortRequest, CreateImageRequest, CreateRequest as LeaseCreate, DeleteRequest as LeaseDelete,
    Image, Info, InfoRequest, UpdateImageRequest, UpdateRequest as UpdateContentRequest,
    WriteContentRequest, content_client::ContentClient, images_client::ImagesClient,
    leases_client::LeasesClient,
};
use containerd_client::types::Descriptor as GrpcDescriptor;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use peermirror_oci::Digest;
use peermirror_oci::manifest::{self, Kind};

/// The label containerd's CRI plugin reads as "never garbage-collect".
pub const PINNED_LABEL: &str = "io.cri-containerd.pinned";
pub const PINNED_VALUE: &str = "pinned";
/// How long an import's lease lives if this process dies mid-import.
const LEASE_TTL: Duration = Duration::from_secs(3600);
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} cannot be read as an image archive: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "{path} is not an image archive: it has neither index.json (an OCI archive) nor manifest.json (docker save)"
    )]
    NotAnImage { path: PathBuf },
    #[error("{path} is incomplete or corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} names no image (an OCI archive needs the annotation io.containerd.image.name or a full \
         org.opencontainers.image.ref.name; docker save needs RepoTags)"
    )]
    Unnamed { path: PathBuf },
    #[error("containerd {call} failed: {status}")]
    Grpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
}

/// One image record created or updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub name: String,
    pub digest: Digest,
    pub media_type: String,
}

/// Imports image archives into one containerd namespace.
pub struct Importer {
    channel: Channel,
    namespace: String,
}

mod archive;
mod watch;

use archive::{Archive, Msg, Target, Written, plan, read_archive};
pub use watch::watch_dir;

fn grpc(call: &'static str) -> impl FnOnce(tonic::Status) -> ImportError {
    move |status| ImportError::Grpc {
        call,
        status: Box::new(status),
    }
}

impl Importer {
    pub fn new(socket: &Path, namespace: &str) -> Importer {
        Importer {
            // No per-call deadline: one write can carry gigabytes.
            channel: super::containerd::unix_channel(socket.to_path_buf(), None),
            namespace: namespace.to_string(),
        }
    }

    fn request<T>(&self, message: T, lease: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(v) = self.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(lease) = lease
            && let Ok(v) = lease.parse()
        {
            request.metadata_mut().insert("containerd-lease", v);
        }
        request
    }

    /// Imports one archive; returns the image records it created or
    /// updated. On any error nothing of it remains referenced.
    pub async fn import(&self, path: &Path) -> Result<Vec<Imported>, ImportError> {
        let file = std::fs::File::open(path).map_err(|source| ImportError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let lease = self.create_lease().await?;
        let result = self.import_under(path, file, &lease).await;
        // Success or not, the lease goes: what the images reference stays,
        // anything else is collected now.
        let deleted = LeasesClient::new(self.channel.clone())
            .delete(self.request(
                LeaseDelete {
                    id: lease.clone(),
                    sync: true,
                },
                None,
            ))
            .await;
        let images = result?;
        deleted.map_err(grpc("Leases.Delete"))?;
        Ok(images)
    }

    async fn create_lease(&self) -> Result<String, ImportError> {
        let mut nonce = [0u8; 8];
        rand::Rng::fill(&mut rand::thread_rng(), &mut nonce);
        let id = format!("peermirror-import-{}", hex::encode(nonce));
        let expire = humantime::format_rfc3339_seconds(SystemTime::now() + LEASE_TTL).to_string();
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire)]);
        LeasesClient::new(self.channel.clone())
            .create(self.request(
                LeaseCreate {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(grpc("Leases.Create"))?;
        Ok(id)
    }

    async fn import_under(
        &self,
        path: &Path,
        file: std::fs::File,
        lease: &str,
    ) -> Result<Vec<Imported>, ImportError> {
        let mut archive = self.write_files(path, file, lease).await?;
        let (targets, made) = plan(path, &mut archive)?;
        for (i, bytes) in made.into_iter().enumerate() {
            let digest = Digest::of(&bytes);
            let size = bytes.len() as u64;
            let mut upload = self.start_upload(
                format!("{lease}-made-{i}"),
                String::new(),
                size,
                None,
                lease,
            );
            upload.send(bytes).await;
            upload.commit(&digest).await?;
        }
        let corrupt = |reason: String| ImportError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        // Every record's content must be complete before any record exists.
        let mut walk = TreeWalk::default();
        for t in &targets {
            self.check_tree(&archive, &t.media_type, &t.digest, lease, &mut walk, 0)
                .await
                .map_err(|e| match e {
                    TreeError::Missing(what) => corrupt(what),
                    TreeError::TooLarge => corrupt(format!(
                        "its manifests reference more than {MAX_TREE_REFERENCES} descriptors"
                    )),
                    TreeError::Grpc(e) => e,
                })?;
        }
        for (digest, labels) in &walk.labels {
            self.set_labels(digest, labels, lease).await?;
        }
        let mut imported = Vec::new();
        for t in targets {
            self.put_image(&t, lease).await?;
            imported.push(Imported {
                name: t.name,
                digest: t.digest,
                media_type: t.media_type,
            });
        }
        Ok(imported)
    }

    /// Streams every file of the archive into containerd.
    async fn write_files(
        &self,
        path: &Path,
        file: std::fs::File,
        lease: &str,
    ) -> Result<Archive, ImportError> {
        let (tx, mut rx) = mpsc::channel::<Msg>(8);
        let reader = tokio::task::spawn_blocking(move || {
            if let Err(reason) = read_archive(file, &tx) {
                let _ = tx.blocking_send(Msg::Failed(reason));
            }
        });
        let mut archive = Archive::default();
        let mut current: Option<Upload> = None;
        let mut seq = 0u64;
        let unreadable = |reason: String| ImportError::Unreadable {
            path: path.to_path_buf(),
            reason,
        };
        let outcome: Result<(), ImportError> = async {
            while let Some(msg) = rx.recv().await {
                match msg {
                    Msg::Start {
                        path: file_path,
                        size,
                        expected,
                    } => {
                        seq += 1;
                        let reference = format!("{lease}-{seq}");
                        current =
                            Some(self.start_upload(reference, file_path, size, expected, lease));
                    }
                    Msg::Chunk(data) => {
                        if let Some(u) = current.as_mut() {
                            u.send(data).await;
                        }
                    }
                    Msg::End {
                        digest,
                        head,
                        small,
                    } => {
                        let Some(u) = current.take() else { continue };
                        let (file_path, size) = (u.path.clone(), u.size);
                        u.commit(&digest).await?;
                        if let Some(s) = small {
                            archive.small.insert(file_path.clone(), s);
                        }
                        archive
                            .files
                            .insert(file_path, Written { digest, size, head });
                    }
                    Msg::Link { path, target } => {
                        archive.links.insert(path, target);
                    }
                    Msg::Failed(reason) => return Err(unreadable(reason)),
                }
            }
            Ok(())
        }
        .await;
        drop(rx);
        let _ = reader.await;
        if let Err(e) = outcome {
            if let Some(u) = current.take() {
                u.abort(self).await;
            }
            return Err(e);
        }
        Ok(archive)
    }

    fn start_upload(
        &self,
        reference: String,
        path: String,
        size: u64,
        expected: Option<Digest>,
        lease: &str,
    ) -> Upload {
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
        let first = WriteContentRequest {
            action: 1, // WRITE
            r#ref: reference.clone(),
            total: size as i64,
            expected: expected.map(|d| d.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        let _ = tx.try_send(first);
        let request = self.request(tokio_stream::wrappers::ReceiverStream::new(rx), Some(lease));
        let mut client = ContentClient::new(self.channel.clone());
        let task = tokio::spawn(async move {
            let mut responses = client.write(request).await?.into_inner();
            while responses.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        });
        Upload {
            reference,
            path,
            size,
            offset: 0,
            tx: Some(tx),
            task,
        }
    }

    /// Walks a manifest or index (or a blob) and checks that everything it
    /// references is in the store; collects the `gc.ref` labels to set.
    fn check_tree<'a>(
        &'a self,
        archive: &'a Archive,
        media_type: &'a str,
        digest: &'a Digest,
        lease: &'a str,
        walk: &'a mut TreeWalk,
        depth: u32,
    ) -> futures::future::BoxFuture<'a, Result<(), TreeError>> {
        Box::pin(async move {
            walk.references += 1;
            if walk.references > MAX_TREE_REFERENCES {
                return Err(TreeError::TooLarge);
            }
            if let Some(verdict) = walk.checked.get(digest) {
                return verdict.clone().map_err(TreeError::Missing);
            }
            let verdict = self
                .check_node(archive, media_type, digest, lease, walk, depth)
                .await;
            match &verdict {
                Ok(()) => {
                    walk.checked.insert(*digest, Ok(()));
                }
                Err(TreeError::Missing(what)) => {
                    walk.checked.insert(*digest, Err(what.clone()));
                }
                Err(_) => {}
            }
            verdict
        })
    }

    /// [`Importer::check_tree`] of a digest not checked before.
    async fn check_node(
        &self,
        archive: &Archive,
        media_type: &str,
        digest: &Digest,
        lease: &str,
        walk: &mut TreeWalk,
        depth: u32,
    ) -> Result<(), TreeError> {
        {
            if depth > 4 {
                return Err(TreeError::Missing(format!("{digest} nests too deep")));
            }
            let kind = manifest::kind_of(media_type);
            if kind == Kind::Blob {
                if archive.has(digest) || self.in_store(digest, lease).await? {
                    return Ok(());
                }
                return Err(TreeError::Missing(format!(
                    "{digest} ({media_type}) is not in it"
                )));
            }
            let bytes = archive
                .blob(digest)
                .ok_or_else(|| TreeError::Missing(format!("{media_type} {digest} is not in it")))?;
            let doc = manifest::parse_document(bytes)
                .map_err(|e| TreeError::Missing(format!("{digest}: {e}")))?;
            let mut own = Vec::new();
            let mut present = 0usize;
            let mut m = 0usize;
            let mut l = 0usize;
            for child in &doc.children {
                let child_kind = manifest::kind_of(&child.media_type);
                let key = match (kind, child_kind) {
                    (Kind::Index, _) => {
                        m += 1;
                        format!("containerd.io/gc.ref.content.m.{}", m - 1)
                    }
                    (_, _) if is_config(&child.media_type) => {
                        "containerd.io/gc.ref.content.config".to_string()
                    }
                    _ => {
                        l += 1;
                        format!("containerd.io/gc.ref.content.l.{}", l - 1)
                    }
                };
                let found = self
                    .check_tree(
                        archive,
                        &child.media_type,
                        &child.digest,
                        lease,
                        walk,
                        depth + 1,
                    )
                    .await;
                match found {
                    Ok(()) => {
                        present += 1;
                        own.push((key, child.digest.to_string()));
                    }
                    // An index may carry only some platforms (as a pull of
                    // one platform leaves it); a manifest must be whole.
                    Err(TreeError::Missing(_)) if kind == Kind::Index => {}
                    Err(e) => return Err(e),
                }
            }
            if kind == Kind::Index && present == 0 {
                return Err(TreeError::Missing(format!(
                    "index {digest} has none of its manifests in it"
                )));
            }
            walk.labels.insert(*digest, own);
            Ok(())
        }
    }

    async fn in_store(&self, digest: &Digest, lease: &str) -> Result<bool, ImportError> {
        let info = ContentClient::new(self.channel.clone())
            .info(self.request(
                InfoRequest {
                    digest: digest.to_string(),
                },
                Some(lease),
            ))
            .await;
        match info {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(grpc("Content.Info")(s)),
        }
    }

    async fn set_labels(
        &self,
        digest: &Digest,
        labels: &[(String, String)],
        lease: &str,
    ) -> Result<(), ImportError> {
        if labels.is_empty() {
            return Ok(());
        }
        let info = Info {
            digest: digest.to_string(),
            labels: labels.iter().cloned().collect(),
            ..Default::default()
        };
        let paths = labels.iter().map(|(k, _)| format!("labels.{k}")).collect();
        ContentClient::new(self.channel.clone())
            .update(self.request(
                UpdateContentRequest {
                    info: Some(info),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                Some(lease),
            ))
            .await
            .map_err(grpc("Content.Update"))?;
        Ok(())
    }

    async fn put_image(&self, t: &Target, lease: &str) -> Result<(), ImportError> {
        let image = Image {
            name: t.name.clone(),
            labels: HashMap::from([(PINNED_LABEL.to_string(), PINNED_VALUE.to_string())]),
            target: Some(GrpcDescriptor {
                media_type: t.media_type.clone(),
                digest: t.digest.to_string(),
                size: t.size as i64,
                annotations: HashMap::new(),
            }),
            ..Default::default()
        };
        let mut client = ImagesClient::new(self.channel.clone());
        let created = client
            .create(self.request(
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                Some(lease),
            ))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let paths = vec!["target".to_string(), format!("labels.{PINNED_LABEL}")];
                client
                    .update(self.request(
                        UpdateImageRequest {
                            image: Some(image),
                            update_mask: Some(prost_types::FieldMask { paths }),
                            source_date_epoch: None,
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(grpc("Images.Update"))?;
                Ok(())
            }
            Err(s) => Err(grpc("Images.Create")(s)),
        }
    }
}

enum TreeError {
    Missing(String),
    /// The trees reference more than [`MAX_TREE_REFERENCES`] descriptors.
    TooLarge,
    Grpc(ImportError),
}

/// Most descriptors the manifest trees of one archive may reference, each
/// counted every time it is referenced (a real image index references a
/// few dozen). Every manifest is parsed once, however often referenced.
const MAX_TREE_REFERENCES: usize = 65_536;

/// What a walk of an archive's manifest trees has found so far.
#[derive(Default)]
struct TreeWalk {
    /// The `containerd.io/gc.ref.content.*` labels of each manifest.
    labels: BTreeMap<Digest, Vec<(String, String)>>,
    /// The verdict on every digest checked: complete, or what is missing.
    checked: HashMap<Digest, Result<(), String>>,
    references: usize,
}

impl From<ImportError> for TreeError {
    fn from(e: ImportError) -> TreeError {
        TreeError::Grpc(e)
    }
}

/// A manifest's config, as opposed to its layers (Docker's and OCI's config
/// types, and artifacts' own `…config…` types).
fn is_config(media_type: &str) -> bool {
    // DOCKER_CONFIG and OCI's `…image.config.v1+json` both say so.
    media_type.contains("config")
}
/// One file being written through `Content.Write`.
struct Upload {
    reference: String,
    path: String,
    size: u64,
    offset: u64,
    /// `None` once containerd ended the stream (it already has the content).
    tx: Option<mpsc::Sender<WriteContentRequest>>,
    task: tokio::task::JoinHandle<Result<(), tonic::Status>>,
}

impl Upload {
    async fn send(&mut self, data: Bytes) {
        let len = data.len() as u64;
        if let Some(tx) = &self.tx {
            let msg = WriteContentRequest {
                action: 1, // WRITE
                r#ref: self.reference.clone(),
                offset: self.offset as i64,
                data: data.to_vec(),
                ..Default::default()
            };
            if tx.send(msg).await.is_err() {
                self.tx = None;
            }
        }
        self.offset += len;
    }

    async fn commit(mut self, digest: &Digest) -> Result<(), ImportError> {
        if let Some(tx) = self.tx.take() {
            let msg = WriteContentRequest {
                action: 2, // COMMIT
                r#ref: self.reference.clone(),
                offset: self.offset as i64,
                total: self.size as i64,
                expected: digest.to_string(),
                ..Default::default()
            };
            let _ = tx.send(msg).await;
        }
        let outcome = (&mut self.task)
            .await
            .unwrap_or_else(|e| Err(tonic::Status::internal(e.to_string())));
        match outcome {
            Ok(()) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(s) => Err(grpc("Content.Write")(s)),
        }
    }

    async fn abort(self, importer: &Importer) {
        drop(self.tx);
        self.task.abort();
        let _ = ContentClient::new(importer.channel.clone())
            .abort(importer.request(
                AbortRequest {
                    r#ref: self.reference,
                },
                None,
            ))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::archive::{blob_path_digest, full_name, normalize};
    use super::watch::is_archive_name;
    use super::*;

    #[test]
    fn paths_and_names() {
        assert_eq!(normalize("./blobs//sha256/../sha256/ab"), "blobs/sha256/ab");
        assert_eq!(normalize("../../etc/passwd"), "etc/passwd");
        let hex = "a".repeat(64);
        assert!(blob_path_digest(&format!("blobs/sha256/{hex}")).is_some());
        assert!(blob_path_digest("blobs/sha256/xyz").is_none());
        assert!(blob_path_digest(&format!("blobs/sha512/{hex}")).is_none());
        assert_eq!(
            full_name("busybox:latest").as_deref(),
            Some("docker.io/library/busybox:latest")
        );
        assert_eq!(
            full_name("10.0.0.1:5000/app/x:v1").as_deref(),
            Some("10.0.0.1:5000/app/x:v1")
        );
        assert_eq!(full_name("v1"), None);
        assert_eq!(full_name("latest"), None);
        assert_eq!(full_name("bad name:x"), None);
        for ok in [
            "a.tar",
            "k3s-airgap-images-amd64.tar.zst",
            "x.tar.gz",
            "x.tgz",
        ] {
            assert!(is_archive_name(ok), "{ok}");
        }
        for no in ["a.txt", "a.tar.part", "a.zip"] {
            assert!(!is_archive_name(no), "{no}");
        }
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).expect("test input");
        }
        b.into_inner().expect("test input")
    }

    fn read_all(bytes: Vec<u8>) -> (Vec<String>, Option<String>) {
        let dir = tempfile::tempdir().expect("test input");
        let path = dir.path().join("a");
        std::fs::write(&path, bytes).expect("test input");
        let (tx, mut rx) = mpsc::channel(1 << 16);
        let result = read_archive(std::fs::File::open(&path).expect("test input"), &tx);
        drop(tx);
        let mut names = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Msg::Start { path, .. } = m {
                names.push(path);
            }
        }
        (names, result.err())
    }

    /// A GNU long name of 1 GiB, compressed to a few KiB: refused at its
    /// header, never read into memory.
    #[test]
    fn a_long_name_bomb_is_refused_at_its_header() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_path("././@LongLink").expect("test input");
        h.set_size(1 << 30);
        h.set_mode(0o644);
        h.set_cksum();
        let mut zst = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("test input");
        std::io::Write::write_all(&mut zst, h.as_bytes()).expect("test input");
        let zeros = vec![b'a'; 1 << 20];
        for _ in 0..1024 {
            std::io::Write::write_all(&mut zst, &zeros).expect("test input");
        }
        let bomb = zst.finish().expect("test input");
        assert!(bomb.len() < 1 << 20, "{} bytes on disk", bomb.len());
        let (names, err) = read_all(bomb);
        assert!(names.is_empty());
        let err = err.expect("refused");
        assert!(
            err.contains("header extension of 1073741824 bytes"),
            "{err}"
        );
    }

    #[test]
    fn archives_in_every_compression() {
        let data = b"hello";
        let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(data));
        let plain = tar_of(&[
            ("index.json", b"{}"),
            (&format!("blobs/sha256/{hex}"), data),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).expect("test input");
        let gz = gz.finish().expect("test input");
        let zst = zstd::encode_all(plain.as_slice(), 3).expect("test input");
        for bytes in [plain.clone(), gz, zst.clone()] {
            let (names, err) = read_all(bytes);
            assert_eq!(err, None);
            assert_eq!(
                names,
                ["index.json".to_string(), format!("blobs/sha256/{hex}")]
            );
        }
        // Truncated (mid-file), a blob whose name lies, nothing at all.
        let (_, err) = read_all(zst[..zst.len() / 2].to_vec());
        assert!(err.is_some());
        for cut in [700, 1024 + 512 + 2] {
            let (_, err) = read_all(plain[..cut].to_vec());
            assert!(err.is_some(), "plain tar cut at {cut}");
        }
        // A name longer than the header holds (a GNU long-name entry), and
        // one given by a PAX header.
        let long = format!("{}/index.json", "d".repeat(300));
        let (names, err) = read_all(tar_of(&[(&long, b"{}")]));
        assert_eq!((names, err), (vec![long.clone()], None));
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("path", long.as_bytes())])
            .expect("test input");
        let mut h = tar::Header::new_ustar();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_path("short").expect("test input");
        h.set_cksum();
        b.append(&h, &b"{}"[..]).expect("test input");
        let (names, err) = read_all(b.into_inner().expect("test input"));
        assert_eq!((names, err), (vec![long], None));
        let liar = tar_of(&[(&format!("blobs/sha256/{}", "b".repeat(64)), data)]);
        assert!(read_all(liar).1.expect("test input").contains("digest"));
        assert!(read_all(Vec::new()).1.is_some());
        assert!(read_all(vec![0x42; 4096]).1.is_some());
    }
}
