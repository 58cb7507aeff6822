//! Test harness: real containerd, the CNCF registry, skopeo and ctr, started
//! and torn down by the tests themselves.

pub mod browser;
pub mod cluster;
pub mod cri;
pub mod dht;
pub mod fanout;
pub mod http;
pub mod image;
pub mod k3s;
pub mod liar;
pub mod manifests;
pub mod netns;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod release;
pub mod services;
pub mod turn;

use std::path::Path;

use anyhow::Result;

use image::{Layout, TestImage};
use services::{Containerd, ContainerdOptions, Upstream};

/// One node with images: an upstream registry holding the standard test
/// images, and a containerd that pulled them all.
pub struct World {
    pub layout: Layout,
    pub images: Vec<TestImage>,
    pub upstream: Upstream,
    pub containerd: Containerd,
    // Dropped last: everything above lives in it.
    pub dir: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::env::var_os("PM_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.dir.path().display());
            let _ =
                std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("tempdir")).keep();
        }
    }
}

impl World {
    pub fn new() -> Result<World> {
        services::require_root();
        let dir = tempfile::Builder::new().prefix("pm-test-").tempdir()?;
        let mut layout = Layout::create(&dir.path().join("layout"))?;
        let images = image::standard_set(&mut layout)?;
        let upstream = Upstream::start(&dir.path().join("upstream"))?;
        for image in &images {
            upstream.push(&layout, image)?;
        }
        let containerd = Containerd::start(
            &dir.path().join("node-a"),
            "k8s.io",
            ContainerdOptions::default(),
        )?;
        for image in &images {
            containerd.pull(&upstream.reference(image))?;
        }
        Ok(World {
            layout,
            images,
            upstream,
            containerd,
            dir,
        })
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}
