//! Test images: OCI layouts with random layers, generated on the fly.
//!
//! Layers are real tar archives (plain or gzip) holding one file of random
//! bytes, so that containerd can unpack them; configs carry the right
//! `diff_ids`; a multi-arch index points to one manifest per platform.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::{RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn json(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }

    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

/// One layer to generate: `size` random bytes in a tar, gzip-compressed or not.
#[derive(Debug, Clone, Copy)]
pub struct LayerSpec {
    pub size: usize,
    pub gzip: bool,
}

pub const fn layer(size: usize, gzip: bool) -> LayerSpec {
    LayerSpec { size, gzip }
}

/// An image written into a layout.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub repo: String,
    pub tag: String,
    /// The manifest, or the index for a multi-arch image.
    pub root: Descriptor,
    /// Every blob of the image (root, manifests, configs, layers).
    pub blobs: Vec<Descriptor>,
    /// Blobs of the platform containerd pulls by default (linux/amd64); for a
    /// single-platform image, all of them.
    pub default_platform_blobs: Vec<Descriptor>,
}

impl TestImage {
    pub fn is_index(&self) -> bool {
        self.root.media_type == OCI_INDEX
    }

    /// The largest layer of the default platform.
    pub fn biggest_layer(&self) -> &Descriptor {
        self.default_platform_blobs
            .iter()
            .filter(|b| b.media_type == LAYER_TAR || b.media_type == LAYER_GZIP)
            .max_by_key(|b| b.size)
            .expect("every test image has a layer")
    }
}

/// An OCI image layout directory.
pub struct Layout {
    pub dir: PathBuf,
    rng: rand::rngs::SmallRng,
    refs: Vec<(String, Descriptor)>,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Layout {
    pub fn create(dir: &Path) -> Result<Layout> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Layout {
            dir: dir.to_path_buf(),
            rng: rand::rngs::SmallRng::from_entropy(),
            refs: Vec::new(),
        })
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        std::fs::read(self.blob_path(digest)).with_context(|| format!("reading blob {digest}"))
    }

    pub fn add_blob(&mut self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let digest = sha256(bytes);
        std::fs::write(self.blob_path(&digest), bytes)?;
        Ok(Descriptor {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len() as u64,
        })
    }

    /// Tags name images in the layout (skopeo copies `oci:<dir>:<tag>`), so
    /// one tag cannot name two.
    fn claim_tag(&self, tag: &str) -> Result<()> {
        anyhow::ensure!(
            !self.refs.iter().any(|(t, _)| t == tag),
            "tag {tag:?} already names an image of this layout; pick another"
        );
        Ok(())
    }

    /// A layer and its diff id (digest of the uncompressed tar).
    fn add_layer(&mut self, spec: LayerSpec, name: &str) -> Result<(Descriptor, String)> {
        let mut data = vec![0u8; spec.size];
        self.rng.fill_bytes(&mut data);
        let mut tar = tar::Builder::new(Vec::with_capacity(spec.size + 4096));
        let mut header = tar::Header::new_gnu();
        header.set_size(spec.size as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, name, data.as_slice())?;
        let tar = tar.into_inner()?;
        let diff_id = sha256(&tar);
        if spec.gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar)?;
            let gz = gz.finish()?;
            Ok((self.add_blob(LAYER_GZIP, &gz)?, diff_id))
        } else {
            Ok((self.add_blob(LAYER_TAR, &tar)?, diff_id))
        }
    }

    /// A manifest for `platform` (`os/arch[/variant]`) with fresh layers.
    fn add_manifest(
        &mut self,
        platform: &str,
        layers: &[LayerSpec],
        blobs: &mut Vec<Descriptor>,
    ) -> Result<Descriptor> {
        let (os, arch, variant) = split_platform(platform);
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, spec) in layers.iter().enumerate() {
            let name = format!("layer-{}-{i}.bin", platform.replace('/', "-"));
            let (d, diff_id) = self.add_layer(*spec, &name)?;
            layer_descs.push(d);
            diff_ids.push(diff_id);
        }
        let mut config = json!({
            "architecture": arch, "os": os,
            "config": {"Entrypoint": ["/layer-0.bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(v) = variant {
            config["variant"] = json!(v);
        }
        let config = self.add_blob(OCI_CONFIG, &serde_json::to_vec(&config)?)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.json(),
            "layers": layer_descs.iter().map(Descriptor::json).collect::<Vec<_>>(),
        }))?;
        let manifest = self.add_blob(OCI_MANIFEST, &manifest)?;
        blobs.push(manifest.clone());
        blobs.push(config);
        blobs.extend(layer_descs);
        Ok(manifest)
    }

    /// A single-platform (linux/amd64) image.
    pub fn add_image(&mut self, repo: &str, tag: &str, layers: &[LayerSpec]) -> Result<TestImage> {
        self.claim_tag(tag)?;
        let mut blobs = Vec::new();
        let root = self.add_manifest("linux/amd64", layers, &mut blobs)?;
        self.refs.push((tag.to_string(), root.clone()));
        Ok(TestImage {
            repo: repo.to_string(),
            tag: tag.to_string(),
            root,
            default_platform_blobs: blobs.clone(),
            blobs,
        })
    }

    /// A multi-arch index over linux/amd64 and linux/arm64.
    pub fn add_index(&mut self, repo: &str, tag: &str, layers: &[LayerSpec]) -> Result<TestImage> {
        self.add_index_for(repo, tag, &["linux/amd64", "linux/arm64"], layers)
    }

    /// An index with one manifest per platform (`os/arch[/variant]`), each
    /// with its own layers; the first platform is the default one.
    pub fn add_index_for(
        &mut self,
        repo: &str,
        tag: &str,
        platforms: &[&str],
        layers: &[LayerSpec],
    ) -> Result<TestImage> {
        self.claim_tag(tag)?;
        let mut entries = Vec::new();
        let mut per_platform = Vec::new();
        for platform in platforms {
            let mut blobs = Vec::new();
            let manifest = self.add_manifest(platform, layers, &mut blobs)?;
            let (os, arch, variant) = split_platform(platform);
            let mut v = manifest.json();
            v["platform"] = json!({"architecture": arch, "os": os});
            if let Some(variant) = variant {
                v["platform"]["variant"] = json!(variant);
            }
            entries.push(v);
            per_platform.push(blobs);
        }
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        }))?;
        let root = self.add_blob(OCI_INDEX, &index)?;
        self.refs.push((tag.to_string(), root.clone()));
        let mut blobs = vec![root.clone()];
        blobs.extend(per_platform.iter().flatten().cloned());
        let mut default_platform_blobs = vec![root.clone()];
        default_platform_blobs.extend(per_platform.first().into_iter().flatten().cloned());
        Ok(TestImage {
            repo: repo.to_string(),
            tag: tag.to_string(),
            root,
            blobs,
            default_platform_blobs,
        })
    }

    /// Writes `index.json` naming every image added so far by its tag.
    pub fn finish(&self) -> Result<()> {
        let manifests: Vec<_> = self
            .refs
            .iter()
            .map(|(tag, d)| {
                let mut v = d.json();
                v["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
                v
            })
            .collect();
        let index =
            serde_json::to_vec_pretty(&json!({"schemaVersion": 2, "manifests": manifests}))?;
        std::fs::write(self.dir.join("index.json"), index)?;
        Ok(())
    }
}

/// The standard set of test images: several sizes, multi-layer, a
/// multi-arch index, and one with a 64 MiB layer.
pub fn standard_set(layout: &mut Layout) -> Result<Vec<TestImage>> {
    let images = vec![
        layout.add_image("small/app", "v1", &[layer(1_000, true)])?,
        layout.add_image(
            "team/multi/layer",
            "v2",
            &[
                layer(300_000, true),
                layer(2 << 20, false),
                layer(0, false),
                layer(5_000, true),
            ],
        )?,
        layout.add_index(
            "multiarch",
            "v3",
            &[layer(100_000, true), layer(700_000, false)],
        )?,
        layout.add_image("big", "v4", &[layer(64 << 20, false), layer(10_000, true)])?,
    ];
    layout.finish()?;
    Ok(images)
}

/// `os/arch[/variant]` as its parts.
fn split_platform(platform: &str) -> (&str, &str, Option<&str>) {
    let mut parts = platform.splitn(3, '/');
    let os = parts.next().unwrap_or("linux");
    let arch = parts.next().unwrap_or("amd64");
    (os, arch, parts.next())
}
