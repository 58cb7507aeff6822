//! Media types and the small part of manifests and indexes a mirror needs:
//! what a document is, and which descriptors it points to.
//!
//! Parsing is deliberately lenient (unknown fields ignored, Docker schema 2 and
//! OCI accepted alike): we walk what containerd already accepted, and only need
//! the children's digests, sizes and media types.

use serde::Deserialize;

use super::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Fallback for blobs whose media type is not known.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Largest manifest or index we read into memory (the CNCF registry's limit).
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// What kind of document a media type names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Index,
    Manifest,
    /// Config, layer or anything else that is only ever fetched as a blob.
    Blob,
}

pub fn kind_of(media_type: &str) -> Kind {
    match media_type {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Kind::Index,
        OCI_MANIFEST | DOCKER_MANIFEST => Kind::Manifest,
        _ => Kind::Blob,
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// The children a manifest or index points to, and its own media type as
/// written in the document (optional in both formats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Document {
    pub media_type: Option<String>,
    pub children: Vec<Descriptor>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {source}")]
    Json {
        #[from]
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Parses a manifest or an index into the descriptors it references
/// (index → manifests; manifest → config then layers).
pub fn parse_document(bytes: &[u8]) -> Result<Document, ManifestError> {
    let raw: Raw = serde_json::from_slice(bytes)?;
    let mut children = raw.manifests;
    children.extend(raw.config);
    children.extend(raw.layers);
    Ok(Document {
        media_type: raw.media_type,
        children,
    })
}

/// The media type of a manifest document: its `mediaType` field, or, when it
/// has none (allowed by OCI), guessed from its shape.
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    let raw: Raw = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = raw.media_type {
        return (kind_of(&mt) != Kind::Blob).then_some(mt);
    }
    if !raw.manifests.is_empty() {
        Some(OCI_INDEX.to_string())
    } else if raw.config.is_some() {
        Some(OCI_MANIFEST.to_string())
    } else {
        None
    }
}

/// The media type of a manifest or index document, judged from its bytes:
/// its own `mediaType` field when it has one (a manifest kind, or nothing);
/// otherwise its shape, with `claimed` (a server's `Content-Type`) choosing
/// between the OCI and Docker names of that shape.
pub fn media_type_of(bytes: &[u8], claimed: Option<&str>) -> Option<String> {
    let raw: Raw = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = raw.media_type {
        return (kind_of(&mt) != Kind::Blob).then_some(mt);
    }
    let shape = if !raw.manifests.is_empty() {
        Kind::Index
    } else if raw.config.is_some() {
        Kind::Manifest
    } else {
        return None;
    };
    match claimed {
        Some(c) if kind_of(c) == shape => Some(c.to_string()),
        _ if shape == Kind::Index => Some(OCI_INDEX.to_string()),
        _ => Some(OCI_MANIFEST.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Digest::of(&[n]).to_string()
    }

    #[test]
    fn manifest_children_are_config_then_layers() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
               "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":3,"annotations":{{"a":"b"}}}}]}}"#,
            d(1),
            d(2)
        );
        let doc = parse_document(json.as_bytes()).expect("valid");
        assert_eq!(doc.media_type.as_deref(), Some(OCI_MANIFEST));
        assert_eq!(doc.children.len(), 2);
        assert_eq!(doc.children[0].size, 2);
        assert_eq!(doc.children[1].digest, Digest::of(&[2]));
    }

    #[test]
    fn index_children_are_manifests() {
        let json = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":9,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#,
            d(3)
        );
        let doc = parse_document(json.as_bytes()).expect("valid");
        assert_eq!(doc.media_type, None);
        assert_eq!(doc.children.len(), 1);
        assert_eq!(
            sniff_media_type(json.as_bytes()).as_deref(),
            Some(OCI_INDEX)
        );
    }

    #[test]
    fn the_body_decides_the_media_type() {
        let index = format!(r#"{{"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert_eq!(
            media_type_of(index.as_bytes(), Some(OCI_MANIFEST)).as_deref(),
            Some(OCI_INDEX)
        );
        let bare = format!(
            r#"{{"config":{{"mediaType":"x","digest":"{}","size":1}}}}"#,
            d(1)
        );
        assert_eq!(
            media_type_of(bare.as_bytes(), Some(DOCKER_MANIFEST)).as_deref(),
            Some(DOCKER_MANIFEST)
        );
        assert_eq!(
            media_type_of(bare.as_bytes(), Some(OCI_INDEX)).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(
            media_type_of(bare.as_bytes(), None).as_deref(),
            Some(OCI_MANIFEST)
        );
        let layer = r#"{"mediaType":"application/vnd.oci.image.layer.v1.tar"}"#;
        assert_eq!(media_type_of(layer.as_bytes(), Some(OCI_MANIFEST)), None);
        assert_eq!(media_type_of(b"{}", Some(OCI_MANIFEST)), None);
        assert_eq!(media_type_of(b"not json", Some(OCI_MANIFEST)), None);
    }

    #[test]
    fn sniffing() {
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[]}}"#,
            d(1)
        );
        assert_eq!(
            sniff_media_type(docker.as_bytes()).as_deref(),
            Some(DOCKER_MANIFEST)
        );
        assert_eq!(sniff_media_type(b"{\"architecture\":\"amd64\"}"), None);
        assert_eq!(sniff_media_type(b"\x1f\x8b\x08garbage"), None);
        assert_eq!(sniff_media_type(b"{\"mediaType\":\"text/plain\"}"), None);
    }

    #[test]
    fn bad_documents_are_errors() {
        assert!(parse_document(b"not json").is_err());
        assert!(
            parse_document(br#"{"layers":[{"digest":"sha256:nope","size":1,"mediaType":"x"}]}"#)
                .is_err()
        );
        assert!(
            parse_document(br#"{"layers":[{"digest":"sha256:00","size":-1,"mediaType":"x"}]}"#)
                .is_err()
        );
    }

    #[test]
    fn kinds() {
        assert_eq!(kind_of(OCI_INDEX), Kind::Index);
        assert_eq!(kind_of(DOCKER_MANIFEST_LIST), Kind::Index);
        assert_eq!(kind_of(OCI_MANIFEST), Kind::Manifest);
        assert_eq!(kind_of(DOCKER_MANIFEST), Kind::Manifest);
        assert_eq!(
            kind_of("application/vnd.oci.image.layer.v1.tar"),
            Kind::Blob
        );
    }
}
