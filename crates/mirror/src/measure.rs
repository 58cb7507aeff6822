//! The debug page's "measure": pull one image through the mirror path
//! (from peers only, into nothing) and report, per blob, which peer served
//! it, how long it took and how fast it came.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::journal::PeerRef;
use super::{Mirror, MirrorMiss};
use peermirror_oci::manifest::{self, Kind};
use peermirror_oci::{Digest, ManifestReference, Name, Reference};

/// One blob of the measured image.
#[derive(Debug, Clone, Serialize)]
pub struct MeasuredBlob {
    /// `index`, `manifest`, `config` or `layer`.
    pub kind: &'static str,
    pub digest: String,
    pub size: u64,
    /// The peer that answered (`None` when none did).
    pub peer: Option<PeerRef>,
    pub duration_ms: f64,
    pub mib_per_s: Option<f64>,
    /// Why this blob could not be fetched, when it could not.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeasureReport {
    pub image: String,
    /// The platform chosen from an index (`os/architecture`).
    pub platform: Option<String>,
    pub blobs: Vec<MeasuredBlob>,
    pub bytes: u64,
    pub duration_ms: f64,
    pub mib_per_s: Option<f64>,
    /// `true` when every blob came from a peer and matched its digest.
    pub complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("not an image reference: {0}")]
    Reference(#[from] peermirror_oci::ReferenceError),
    #[error("{0} names neither a tag nor a digest")]
    Unqualified(String),
    #[error("no peer serves the manifest of {image} ({miss:?})")]
    NoManifest { image: String, miss: MirrorMiss },
    #[error("the manifest of {image} does not parse: {reason}")]
    BadManifest { image: String, reason: String },
}

fn rate(bytes: u64, elapsed: Duration) -> Option<f64> {
    let s = elapsed.as_secs_f64();
    (bytes > 0 && s > 0.0).then(|| ((bytes as f64 / s / f64::from(1 << 20)) * 10.0).round() / 10.0)
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The `platform` of an index entry, which the descriptor type leaves out.
#[derive(Deserialize)]
struct IndexDoc {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: Digest,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

/// This machine's platform as OCI names it.
fn own_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// The manifest of an index to measure: this machine's platform, else the
/// first entry.
fn choose_platform(index: &[u8]) -> Option<(Digest, Option<String>)> {
    let doc: IndexDoc = serde_json::from_slice(index).ok()?;
    let arch = own_architecture();
    let pick = doc
        .manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .or_else(|| doc.manifests.first())?;
    let platform = pick
        .platform
        .as_ref()
        .map(|p| format!("{}/{}", p.os, p.architecture));
    Some((pick.digest, platform))
}

/// Pulls `image` from peers through `mirror`, blob after blob, and reports.
pub async fn measure(mirror: &Arc<Mirror>, image: &str) -> Result<MeasureReport, MeasureError> {
    let reference = Reference::parse(image.trim())?;
    let name = Name {
        registry: Some(reference.registry.clone()),
        repository: reference.repository.clone(),
    };
    let started = Instant::now();
    let mut blobs = Vec::new();
    let root_ref = match (&reference.digest, &reference.tag) {
        (Some(d), _) => ManifestReference::Digest(*d),
        (None, Some(t)) => ManifestReference::Tag(t.clone()),
        (None, None) => return Err(MeasureError::Unqualified(image.to_string())),
    };
    let no_manifest = |miss| MeasureError::NoManifest {
        image: image.to_string(),
        miss,
    };
    let t = Instant::now();
    let mut root = mirror
        .manifest(&name, Some(&reference), &root_ref)
        .await
        .map_err(no_manifest)?;
    let mut platform = None;
    if manifest::kind_of(&root.descriptor.media_type) == Kind::Index {
        blobs.push(measured("index", &root, t.elapsed()));
        let Some((digest, chosen)) = choose_platform(&root.bytes) else {
            return Err(MeasureError::BadManifest {
                image: image.to_string(),
                reason: "an index without manifests".into(),
            });
        };
        platform = chosen;
        let t = Instant::now();
        root = mirror
            .manifest(&name, None, &ManifestReference::Digest(digest))
            .await
            .map_err(no_manifest)?;
        blobs.push(measured("manifest", &root, t.elapsed()));
    } else {
        blobs.push(measured("manifest", &root, t.elapsed()));
    }
    let doc = manifest::parse_document(&root.bytes).map_err(|e| MeasureError::BadManifest {
        image: image.to_string(),
        reason: e.to_string(),
    })?;
    for (i, child) in doc.children.iter().enumerate() {
        let kind = if i == 0 { "config" } else { "layer" };
        blobs.push(fetch_blob(mirror, &name, kind, &child.digest, child.size).await);
    }
    let bytes = blobs.iter().map(|b| b.size).sum();
    let elapsed = started.elapsed();
    Ok(MeasureReport {
        image: reference.to_string(),
        platform,
        complete: blobs.iter().all(|b| b.error.is_none()),
        blobs,
        bytes,
        duration_ms: millis(elapsed),
        mib_per_s: rate(bytes, elapsed),
    })
}

fn measured(kind: &'static str, m: &super::MirroredManifest, elapsed: Duration) -> MeasuredBlob {
    MeasuredBlob {
        kind,
        digest: m.descriptor.digest.to_string(),
        size: m.descriptor.size,
        peer: Some(PeerRef::from(&m.peer)),
        duration_ms: millis(elapsed),
        mib_per_s: rate(m.descriptor.size, elapsed),
        error: None,
    }
}

async fn fetch_blob(
    mirror: &Arc<Mirror>,
    name: &Name,
    kind: &'static str,
    digest: &Digest,
    size: u64,
) -> MeasuredBlob {
    let t = Instant::now();
    let mut blob = MeasuredBlob {
        kind,
        digest: digest.to_string(),
        size,
        peer: None,
        duration_ms: 0.0,
        mib_per_s: None,
        error: None,
    };
    // A measurement is nobody's pull: it never leads a fan-out.
    match mirror
        .blob_for(name, digest, None, false, peermirror_routing::Asker::Other)
        .await
    {
        Err(miss) => blob.error = Some(format!("{miss:?}")),
        Ok(m) => {
            blob.peer = Some(PeerRef::from(&m.peer));
            let mut received = 0u64;
            if let Some(mut body) = m.body {
                while let Some(chunk) = body.next().await {
                    match chunk {
                        Ok(c) => received += c.len() as u64,
                        Err(e) => {
                            blob.error = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
            if blob.error.is_none() && received != m.size {
                blob.error = Some(format!("{received} of {} bytes", m.size));
            }
        }
    }
    let elapsed = t.elapsed();
    blob.duration_ms = millis(elapsed);
    if blob.error.is_none() {
        blob.mib_per_s = rate(size, elapsed);
    }
    blob
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_yields_this_machines_platform_or_the_first() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let arch = own_architecture();
        let index = serde_json::json!({"manifests": [
            {"digest": d('a'), "platform": {"os": "linux", "architecture": "s390x"}},
            {"digest": d('b'), "platform": {"os": "linux", "architecture": arch}},
        ]});
        let (digest, platform) =
            choose_platform(&serde_json::to_vec(&index).expect("json")).expect("chosen");
        assert_eq!(digest.to_string(), d('b'));
        assert_eq!(platform.as_deref(), Some(&*format!("linux/{arch}")));
        let other = serde_json::json!({"manifests": [{"digest": d('c')}]});
        let (digest, platform) =
            choose_platform(&serde_json::to_vec(&other).expect("json")).expect("chosen");
        assert_eq!((digest.to_string(), platform), (d('c'), None));
        assert!(choose_platform(b"{\"manifests\": []}").is_none());
        assert!(choose_platform(b"not json").is_none());
    }
}
