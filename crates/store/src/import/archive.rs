//! Reading an image archive: one pass over the tar stream (plain, gzip or
//! zstd) on a thread of its own, and the plan of image records it holds.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{DOCKER_CONFIG, ImportError};
use peermirror_oci::manifest::{self, DOCKER_MANIFEST};
use peermirror_oci::{Digest, Reference};

/// Files kept in memory while the archive streams by (manifests, configs,
/// `index.json`): each at most this large …
const SMALL_FILE: u64 = manifest::MAX_MANIFEST_SIZE;
/// … and all of them together at most this much.
const SMALL_FILES_TOTAL: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

/// A file of the archive as it was written to containerd.
#[derive(Debug, Clone)]
pub(super) struct Written {
    pub(super) digest: Digest,
    pub(super) size: u64,
    /// Its first bytes, to tell a layer's compression.
    pub(super) head: Vec<u8>,
}

/// What the reading thread tells the writer.
pub(super) enum Msg {
    Start {
        path: String,
        size: u64,
        expected: Option<Digest>,
    },
    Chunk(Bytes),
    End {
        digest: Digest,
        head: Vec<u8>,
        small: Option<Bytes>,
    },
    Link {
        path: String,
        target: String,
    },
    Failed(String),
}

pub(super) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// `blobs/sha256/<hex>` → its digest.
pub(super) fn blob_path_digest(path: &str) -> Option<Digest> {
    let hex = path.strip_prefix("blobs/sha256/")?;
    format!("sha256:{hex}").parse().ok()
}

/// Reads the archive (any compression) and sends its files, in order.
pub(super) fn read_archive(file: std::fs::File, tx: &mpsc::Sender<Msg>) -> Result<(), String> {
    let mut reader = std::io::BufReader::with_capacity(CHUNK, file);
    let magic = {
        use std::io::BufRead;
        reader.fill_buf().map_err(|e| e.to_string())?.to_vec()
    };
    let stream: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(reader).map_err(|e| e.to_string())?)
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(stream);
    let mut small_total = 0u64;
    let mut any = false;
    // Raw entries: long names and PAX headers are read here, bounded,
    // instead of whole into memory by the tar reader.
    let mut ext = Extensions::default();
    for entry in archive.entries().map_err(|e| e.to_string())?.raw(true) {
        let mut entry = entry.map_err(|e| format!("reading the tar stream: {e}"))?;
        any = true;
        if ext.take_from(&mut entry)? {
            continue;
        }
        let (long_path, long_link) = ext.for_entry();
        let path = normalize(&String::from_utf8_lossy(
            &long_path.unwrap_or_else(|| entry.path_bytes().into_owned()),
        ));
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) =
                long_link.or_else(|| entry.link_name_bytes().map(|l| l.into_owned()))
            else {
                continue;
            };
            let target = String::from_utf8_lossy(&target).to_string();
            // Symlinks are relative to their own directory, hard links to
            // the archive's root.
            let target = if kind.is_symlink() && !target.starts_with('/') {
                let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
                normalize(&format!("{dir}/{target}"))
            } else {
                normalize(&target)
            };
            if tx.blocking_send(Msg::Link { path, target }).is_err() {
                return Ok(());
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        let expected = blob_path_digest(&path);
        let keep = size <= SMALL_FILE && small_total + size <= SMALL_FILES_TOTAL;
        if keep {
            small_total += size;
        }
        if tx
            .blocking_send(Msg::Start {
                path: path.clone(),
                size,
                expected,
            })
            .is_err()
        {
            return Ok(());
        }
        let mut hasher = peermirror_oci::Hasher::new();
        let mut head = Vec::new();
        let mut small = keep.then(|| Vec::with_capacity(size as usize));
        let mut read = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = entry
                .read(&mut buf)
                .map_err(|e| format!("reading {path}: {e}"))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            read += n as u64;
            hasher.update(&buf);
            if head.len() < 8 {
                head.extend(buf.iter().take(8 - head.len()));
            }
            if let Some(s) = small.as_mut() {
                s.extend_from_slice(&buf);
            }
            if tx.blocking_send(Msg::Chunk(Bytes::from(buf))).is_err() {
                return Ok(());
            }
        }
        if read != size {
            return Err(format!("{path} ends after {read} of {size} bytes"));
        }
        let digest = hasher.finish();
        if let Some(e) = &expected
            && *e != digest
        {
            return Err(format!("{path} holds content whose digest is {digest}"));
        }
        let end = Msg::End {
            digest,
            head,
            small: small.map(Bytes::from),
        };
        if tx.blocking_send(end).is_err() {
            return Ok(());
        }
    }
    if !any {
        return Err("no files in it (empty, or not a tar archive)".to_string());
    }
    Ok(())
}

/// The most bytes a header extension (GNU long name or link, PAX header)
/// may hold: paths are at most 4 KiB on Linux.
pub(super) const MAX_HEADER_EXTENSION: u64 = 64 << 10;

/// Header extensions read so far, for the entry that follows them.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_link: Option<Vec<u8>>,
}

impl Extensions {
    /// Reads `entry` when it is a header extension (`true`: it is no file);
    /// an extension over [`MAX_HEADER_EXTENSION`] refuses the archive.
    fn take_from<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<bool, String> {
        let kind = entry.header().entry_type();
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        if !extension {
            return Ok(false);
        }
        let size = entry.size();
        if size > MAX_HEADER_EXTENSION {
            return Err(format!(
                "a tar header extension of {size} bytes (at most {MAX_HEADER_EXTENSION})"
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| format!("reading a tar header extension: {e}"))?;
        let trimmed = || {
            let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
            data[..end].to_vec()
        };
        if kind.is_gnu_longname() {
            self.long_name = Some(trimmed());
        } else if kind.is_gnu_longlink() {
            self.long_link = Some(trimmed());
        } else if kind.is_pax_local_extensions() {
            for record in tar::PaxExtensions::new(&data) {
                let record = record.map_err(|e| format!("a PAX header: {e}"))?;
                match record.key_bytes() {
                    b"path" => self.pax_path = Some(record.value_bytes().to_vec()),
                    b"linkpath" => self.pax_link = Some(record.value_bytes().to_vec()),
                    _ => {}
                }
            }
        }
        Ok(true)
    }

    /// The path and link target the extensions give the next entry (PAX
    /// over GNU), and forgets them.
    fn for_entry(&mut self) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let taken = std::mem::take(self);
        (
            taken.pax_path.or(taken.long_name),
            taken.pax_link.or(taken.long_link),
        )
    }
}

#[derive(Deserialize)]
pub(super) struct OciIndex {
    #[serde(default)]
    pub(super) manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IndexEntry {
    pub(super) media_type: Option<String>,
    pub(super) digest: Digest,
    pub(super) size: u64,
    #[serde(default)]
    pub(super) annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct DockerEntry {
    pub(super) config: String,
    #[serde(default)]
    pub(super) repo_tags: Option<Vec<String>>,
    #[serde(default)]
    pub(super) layers: Vec<String>,
}

/// A record to create: name and target.
pub(super) struct Target {
    pub(super) name: String,
    pub(super) media_type: String,
    pub(super) digest: Digest,
    pub(super) size: u64,
}

/// Everything the archive held, once read.
#[derive(Default)]
pub(super) struct Archive {
    pub(super) files: HashMap<String, Written>,
    pub(super) small: HashMap<String, Bytes>,
    pub(super) links: HashMap<String, String>,
}

impl Archive {
    pub(super) fn resolve<'a>(&'a self, path: &'a str) -> &'a str {
        let mut p = path;
        for _ in 0..8 {
            match self.links.get(p) {
                Some(t) => p = t,
                None => break,
            }
        }
        p
    }

    pub(super) fn file(&self, path: &str) -> Option<&Written> {
        self.files.get(self.resolve(&normalize(path)))
    }

    pub(super) fn small(&self, path: &str) -> Option<&Bytes> {
        self.small.get(self.resolve(&normalize(path)))
    }

    pub(super) fn blob(&self, digest: &Digest) -> Option<&Bytes> {
        self.small(&format!("blobs/sha256/{}", digest.hex()))
    }

    pub(super) fn has(&self, digest: &Digest) -> bool {
        self.files.values().any(|w| w.digest == *digest)
    }
}

/// The image records an archive asks for, and the manifests made for a
/// classic `docker save` archive (to be written to the store).
pub(super) fn plan(
    path: &Path,
    archive: &mut Archive,
) -> Result<(Vec<Target>, Vec<Bytes>), ImportError> {
    let corrupt = |reason: String| ImportError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut targets = Vec::new();
    let mut made = Vec::new();
    if let Some(index) = archive.small("index.json") {
        let index: OciIndex =
            serde_json::from_slice(index).map_err(|e| corrupt(format!("index.json: {e}")))?;
        for entry in index.manifests {
            let name = entry
                .annotations
                .get("io.containerd.image.name")
                .or_else(|| entry.annotations.get("org.opencontainers.image.ref.name"))
                .and_then(|n| full_name(n));
            let Some(name) = name else { continue };
            let media_type = entry
                .media_type
                .clone()
                .or_else(|| {
                    archive
                        .blob(&entry.digest)
                        .and_then(|b| manifest::sniff_media_type(b))
                })
                .ok_or_else(|| corrupt(format!("{} has no media type", entry.digest)))?;
            targets.push(Target {
                name,
                media_type,
                digest: entry.digest,
                size: entry.size,
            });
        }
    }
    if targets.is_empty()
        && let Some(list) = archive.small("manifest.json").cloned()
    {
        let entries: Vec<DockerEntry> =
            serde_json::from_slice(&list).map_err(|e| corrupt(format!("manifest.json: {e}")))?;
        for entry in entries {
            let tags = entry.repo_tags.unwrap_or_default();
            let names: Vec<String> = tags.iter().filter_map(|t| full_name(t)).collect();
            if names.is_empty() {
                continue;
            }
            let (digest, bytes) = docker_manifest(path, archive, &entry.config, &entry.layers)?;
            for name in names {
                targets.push(Target {
                    name,
                    media_type: DOCKER_MANIFEST.to_string(),
                    digest,
                    size: bytes.len() as u64,
                });
            }
            made.push(bytes);
        }
    }
    if targets.is_empty() {
        if archive.small("index.json").is_none() && archive.small("manifest.json").is_none() {
            return Err(ImportError::NotAnImage {
                path: path.to_path_buf(),
            });
        }
        return Err(ImportError::Unnamed {
            path: path.to_path_buf(),
        });
    }
    Ok((targets, made))
}

/// The manifest containerd would make for a classic `docker save` entry
/// (which has none): config and layers as the archive holds them, layers
/// typed by their first bytes. Kept with the archive's small files so that
/// the checks read it like any other manifest.
pub(super) fn docker_manifest(
    path: &Path,
    archive: &mut Archive,
    config: &str,
    layers: &[String],
) -> Result<(Digest, Bytes), ImportError> {
    let missing = |what: &str| ImportError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("manifest.json names {what}, which is not in it"),
    };
    let config = archive.file(config).ok_or_else(|| missing(config))?.clone();
    let mut layer_descriptors = Vec::new();
    for layer in layers {
        let w = archive.file(layer).ok_or_else(|| missing(layer))?;
        let media_type = if w.head.starts_with(&[0x1f, 0x8b]) {
            DOCKER_LAYER_GZIP
        } else if w.head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            DOCKER_LAYER_ZSTD
        } else {
            DOCKER_LAYER
        };
        layer_descriptors.push(serde_json::json!({
            "mediaType": media_type,
            "digest": w.digest.to_string(),
            "size": w.size,
        }));
    }
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG,
            "digest": config.digest.to_string(),
            "size": config.size,
        },
        "layers": layer_descriptors,
    });
    let bytes = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
    let digest = Digest::of(&bytes);
    archive
        .small
        .insert(format!("blobs/sha256/{}", digest.hex()), bytes.clone());
    Ok((digest, bytes))
}

/// An image name as containerd stores it, or `None` for a bare tag.
pub(super) fn full_name(name: &str) -> Option<String> {
    if !name.contains(['/', ':']) {
        return None;
    }
    let reference = Reference::parse(name).ok()?;
    reference.tagged_name().or_else(|| {
        reference
            .digest
            .as_ref()
            .map(|d| format!("{}@{d}", reference.name()))
    })
}
