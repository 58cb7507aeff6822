//! A small cluster on this machine: one network namespace per node, each
//! with its own containerd (CRI plugin on, `config_path` set) and peermirror,
//! plus the upstream registry in a namespace of its own, all joined by a
//! bridge. containerd's `certs.d` is written by `peermirror
//! configure-containerd`, as an operator would.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::image::{Layout, TestImage};
use crate::netns::{Host, Network};
use crate::services::{
    Containerd, ContainerdOptions, DataplaneSlot, Peermirror, PeermirrorOptions, Upstream,
    peermirror_bin, write_psk,
};

pub const REGISTRY_PORT: u16 = 5000;
pub const ROUTER_PORT: u16 = 5001;
pub const METRICS_PORT: u16 = 9090;
/// The upstream registry's address on the test network.
pub const UPSTREAM_INDEX: u8 = 100;

/// One node to start.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    /// The network's preshared key as this node knows it.
    pub psk: [u8; 32],
    /// Extra `peermirror run` flags.
    pub extra: Vec<String>,
}

impl NodeSpec {
    /// A node named `name` that knows `psk`, started with `extra` flags.
    pub fn new(name: &str, psk: [u8; 32], extra: &[&str]) -> NodeSpec {
        NodeSpec {
            name: name.to_string(),
            psk,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }
}

pub struct ClusterNode {
    pub name: String,
    pub host: Host,
    pub dir: PathBuf,
    pub certs_d: PathBuf,
    pub containerd: Containerd,
    pub peermirror: Option<Peermirror>,
    /// The eBPF dataplane's cgroup and pins, kept across restarts.
    pub dataplane: DataplaneSlot,
    spec: NodeSpec,
    bootstrap: Option<String>,
    /// Where the next start's registry port listens, when not on every
    /// address at [`REGISTRY_PORT`].
    registry_bind: Option<SocketAddr>,
}

impl ClusterNode {
    pub fn ip(&self) -> Ipv4Addr {
        self.host.ip
    }

    pub fn pm(&self) -> &Peermirror {
        self.peermirror.as_ref().expect("peermirror is running")
    }

    pub fn registry_addr(&self) -> SocketAddr {
        SocketAddr::from((self.host.ip, REGISTRY_PORT))
    }

    /// `ctr images pull --hosts-dir <certs.d>` inside the node's namespace,
    /// with the node's hosts.toml.
    pub fn ctr_pull(&self, reference: &str) -> Result<()> {
        self.containerd.pull_via(&self.certs_d, reference)
    }

    /// The CRI `PullImage` call, as kubelet makes it.
    pub fn cri_pull(&self, reference: &str) -> Result<String> {
        crate::cri::pull_image(&self.containerd.socket, reference)
    }

    /// Starts (or restarts) this node's peermirror.
    pub fn start_peermirror(&mut self) -> Result<()> {
        let psk = self.dir.join("swarm.key");
        write_psk(&psk, &self.spec.psk)?;
        let mut extra: Vec<String> = vec!["--psk-file".into(), psk.to_string_lossy().into_owned()];
        if let Some(b) = &self.bootstrap {
            extra.extend([
                "--bootstrap-kind".into(),
                "static".into(),
                "--static-bootstrap-peers".into(),
                b.clone(),
            ]);
        }
        extra.extend(self.dataplane.flags());
        extra.extend(self.spec.extra.iter().cloned());
        let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        let mut pm = Peermirror::spawn_with(
            &self.dir.join("pm"),
            &self.containerd,
            PeermirrorOptions {
                netns: Some(&self.host.ns),
                // Both families, as the default `:5000` does.
                registry: self
                    .registry_bind
                    .unwrap_or(SocketAddr::from(([0u16; 8], REGISTRY_PORT))),
                metrics: any(METRICS_PORT),
                router: any(ROUTER_PORT),
                extra: &extra_refs,
            },
        )?;
        // Reached from outside the node through its own address.
        pm.registry = SocketAddr::from((self.host.ip, REGISTRY_PORT));
        pm.metrics = SocketAddr::from((self.host.ip, METRICS_PORT));
        self.peermirror = Some(pm);
        Ok(())
    }

    /// Where the next start's registry port listens (`None`: every
    /// address, [`REGISTRY_PORT`]).
    pub fn set_registry_bind(&mut self, addr: Option<SocketAddr>) {
        self.registry_bind = addr;
    }

    /// The bootstrap peer the next start dials (`None`: none).
    pub fn set_bootstrap(&mut self, bootstrap: Option<String>) {
        self.bootstrap = bootstrap;
    }

    /// Replaces the extra `peermirror run` flags of the next start.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.spec.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Stops this node's peermirror (SIGTERM) and starts it again with
    /// `extra` flags added.
    pub fn restart_peermirror(&mut self, extra: &[&str]) -> Result<()> {
        if let Some(mut pm) = self.peermirror.take() {
            pm.proc.terminate(Duration::from_secs(15))?;
        }
        self.spec.extra.extend(extra.iter().map(|s| s.to_string()));
        self.start_peermirror()
    }

    /// The digest this node's containerd records for the image `reference`.
    pub fn image_digest(&self, reference: &str) -> Result<String> {
        let out = self
            .containerd
            .ctr(&["images", "ls", &format!("name=={reference}")])?;
        out.lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
            .with_context(|| format!("{}: no image {reference}: {out}", self.name))
    }

    /// Waits until this node announces at least `keys` keys (digests and
    /// tags) and every announcement is stored in the DHT.
    pub fn wait_announced(&self, keys: usize, timeout: Duration) -> Result<()> {
        self.pm().wait_metric(
            &format!("{} to announce {keys} keys", self.name),
            "peermirror_advertised_keys",
            &[],
            timeout,
            |n| n >= keys as f64,
        )?;
        self.pm()
            .wait_metric(
                &format!("{}'s announcements to be stored", self.name),
                "peermirror_advertise_pending_keys",
                &[],
                timeout,
                |pending| pending == 0.0,
            )
            .map(drop)
    }

    /// The content digests this node's containerd holds.
    pub fn content(&self) -> Result<Vec<String>> {
        self.containerd.content_digests()
    }

    /// Checks that every blob of the default platform of `image` is in this
    /// node's content store with the source bytes.
    pub fn assert_has(&self, layout: &Layout, image: &TestImage) -> Result<()> {
        self.assert_has_blobs(layout, &image.default_platform_blobs)
    }

    /// Every blob of `image`, of every platform, is in this node's store,
    /// byte for byte.
    pub fn assert_has_all_platforms(&self, layout: &Layout, image: &TestImage) -> Result<()> {
        self.assert_has_blobs(layout, &image.blobs)
    }

    fn assert_has_blobs(&self, layout: &Layout, blobs: &[crate::image::Descriptor]) -> Result<()> {
        for blob in blobs {
            let path = self
                .containerd
                .content_root()
                .join("blobs/sha256")
                .join(blob.hex());
            let bytes = std::fs::read(&path)
                .with_context(|| format!("{} lacks {}", self.name, blob.digest))?;
            ensure!(
                bytes == layout.read_blob(&blob.digest)?,
                "{}: {} differs",
                self.name,
                blob.digest
            );
        }
        Ok(())
    }
}

pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    pub upstream: Upstream,
    pub upstream_host: Host,
    pub layout: Layout,
    // Dropped after every process above: the namespaces, then the files.
    pub network: Network,
    pub dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("PM_TEST_KEEP").is_some() {
            // The nodes' logs stay for a person to read.
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::Builder::new()
                    .prefix("pm-cluster-gone-")
                    .tempdir()
                    .expect("tempdir"),
            );
            eprintln!("keeping {}", dir.keep().display());
        }
    }
}

impl Cluster {
    /// Starts the upstream registry and the nodes; the first node is the
    /// bootstrap peer of the others.
    pub fn start(specs: &[NodeSpec]) -> Result<Cluster> {
        crate::services::require_root();
        let dir = tempfile::Builder::new().prefix("pm-cluster-").tempdir()?;
        let mut network = Network::new()?;
        let upstream_host = network.add_host(UPSTREAM_INDEX)?;
        let upstream = Upstream::start_in(
            &dir.path().join("upstream"),
            SocketAddr::from((upstream_host.ip, REGISTRY_PORT)),
            Some(upstream_host.ns.clone()),
        )?;
        let layout = Layout::create(&dir.path().join("layout"))?;
        let mut nodes = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let index = u8::try_from(i + 1)?;
            let host = network.add_host(index)?;
            let node_dir = dir.path().join(&spec.name);
            let certs_d = node_dir.join("certs.d");
            std::fs::create_dir_all(&certs_d)?;
            // What an operator of an insecure in-house registry would have:
            // a hosts.toml that says it speaks plain HTTP.
            let original = certs_d.join(upstream.host());
            std::fs::create_dir_all(&original)?;
            std::fs::write(
                original.join("hosts.toml"),
                format!("server = \"http://{}\"\n", upstream.host()),
            )?;
            let containerd = Containerd::start(
                &node_dir.join("containerd"),
                "k8s.io",
                ContainerdOptions {
                    cri_config_path: Some(certs_d.clone()),
                    netns: Some(host.ns.clone()),
                },
            )?;
            // The operator's step: point containerd at peermirror. Its
            // checks of config.toml (version 2 on 1.x, 3 on 2.x) find
            // nothing to warn about in a config the CRI plugin reads
            // certs.d from.
            let out = Command::new(peermirror_bin())
                .arg("configure-containerd")
                .arg("--containerd-registry-config-path")
                .arg(&certs_d)
                .args(["--mirrored-registries", &upstream.host()])
                .args([
                    "--mirror-targets",
                    &format!("http://127.0.0.1:{REGISTRY_PORT}"),
                ])
                .arg("--prepend-existing")
                .arg("--containerd-config")
                .arg(containerd.dir.join("config.toml"))
                .output()?;
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            ensure!(
                out.status.success() && stdout.contains("wrote"),
                "configure-containerd wrote nothing: {stdout}{stderr}"
            );
            ensure!(
                !stderr.contains("warning"),
                "configure-containerd warned about containerd {}'s config: {stderr}",
                crate::release::release().version_text
            );
            let bootstrap =
                (i > 0).then(|| format!("/ip4/{}/tcp/{ROUTER_PORT}", Ipv4Addr::new(10, 88, 0, 1)));
            let mut node = ClusterNode {
                name: spec.name.clone(),
                host,
                dir: node_dir,
                certs_d,
                containerd,
                peermirror: None,
                dataplane: DataplaneSlot::new()?,
                spec: spec.clone(),
                bootstrap,
                registry_bind: None,
            };
            node.start_peermirror()?;
            nodes.push(node);
        }
        Ok(Cluster {
            nodes,
            upstream,
            upstream_host,
            layout,
            network,
            dir,
        })
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("node exists")
    }

    pub fn node_mut(&mut self, name: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node exists")
    }

    /// Waits until the named nodes are ready (containerd, first
    /// advertisement, a peer in the routing table).
    pub fn wait_ready(&mut self, names: &[&str], timeout: Duration) -> Result<()> {
        for name in names {
            let node = self.node_mut(name);
            node.peermirror
                .as_mut()
                .context("no peermirror")?
                .wait_ready(timeout)
                .with_context(|| format!("node {name}"))?;
        }
        Ok(())
    }
}
