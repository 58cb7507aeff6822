//! `cargo xtask demo`: a three-node cluster on this machine (network
//! namespaces joined by a bridge, each node with its own containerd and
//! peermirror, the CNCF registry as upstream), and an air-gapped pull served
//! by a peer.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, NodeSpec};
use peermirror_tests::image::layer;
use peermirror_tests::services::require_root;

fn step(n: u32, text: &str) {
    println!("\n[{n}/6] {text}");
}

pub fn run() -> Result<()> {
    require_root();
    crate::deps::ensure(crate::deps::DEMO)?;
    crate::run(crate::cargo().args(["build", "--quiet", "--package", "peermirror", "--bins"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    );
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("PEERMIRROR_BIN", target.join("debug/peermirror")) };

    step(
        1,
        "starting a 3-node cluster: network namespaces, containerd with CRI, peermirror, an upstream registry",
    );
    let key = [0x42; 32];
    // The cluster becomes air-gapped in step 4, and node-b then pulls by
    // tag from the only node that holds the image: that takes
    // `--tag-resolution single-holder` (by default two hosts must agree).
    let spec = |name: &str| NodeSpec {
        name: name.to_string(),
        psk: key,
        extra: ["--log-level", "info", "--tag-resolution", "single-holder"]
            .map(String::from)
            .to_vec(),
    };
    let mut cluster = Cluster::start(&[spec("node-a"), spec("node-b"), spec("node-c")])?;
    cluster.wait_ready(&["node-a", "node-b", "node-c"], Duration::from_secs(60))?;
    for node in &cluster.nodes {
        println!(
            "      {} at {}: registry :5000, P2P :5001, metrics :9090",
            node.name,
            node.ip()
        );
    }
    println!("      upstream registry at {}", cluster.upstream.addr);
    let hosts = std::fs::read_to_string(
        cluster
            .node("node-b")
            .certs_d
            .join(cluster.upstream.host())
            .join("hosts.toml"),
    )?;
    println!("      node-b's hosts.toml, written by `peermirror configure-containerd`:");
    for line in hosts.lines() {
        println!("        {line}");
    }

    step(
        2,
        "generating an image with random layers and pushing it with skopeo",
    );
    let image = cluster.layout.add_image(
        "demo/app",
        "1.0",
        &[
            layer(48 << 20, false),
            layer(8 << 20, true),
            layer(64 << 10, true),
        ],
    )?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = cluster.upstream.reference(&image);
    println!("      pushed {reference}");

    step(
        3,
        "node-a pulls it from the upstream registry (CRI PullImage, as kubelet does)",
    );
    cluster.node("node-a").cri_pull(&reference)?;
    let a = cluster.node("node-a");
    let advertised = || {
        a.pm()
            .metric("peermirror_advertised_keys", &[])
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while advertised() < (image.blobs.len() + 1) as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "      node-a advertises {} keys (digests and the tag) in the DHT",
        advertised()
    );

    step(
        4,
        "the upstream registry is stopped: the cluster is air-gapped",
    );
    cluster.upstream.stop()?;

    step(
        5,
        "node-b (CRI PullImage) and node-c (ctr image pull) pull the image through their peermirror",
    );
    let started = Instant::now();
    cluster
        .node("node-b")
        .cri_pull(&reference)
        .context("node-b's pull")?;
    println!(
        "      node-b pulled {reference} in {:.2?}",
        started.elapsed()
    );
    let started = Instant::now();
    cluster
        .node("node-c")
        .ctr_pull(&reference)
        .context("node-c's pull")?;
    println!(
        "      node-c pulled {reference} in {:.2?}",
        started.elapsed()
    );
    for name in ["node-b", "node-c"] {
        cluster.node(name).assert_has(&cluster.layout, &image)?;
    }

    step(6, "what the nodes report");
    for node in &cluster.nodes {
        let pm = node.pm();
        let served = pm.metric("peermirror_served_bytes_total", &["source=\"file\""])?;
        let mirrored = pm.metric("peermirror_served_bytes_total", &["source=\"mirror\""])?;
        let hits = pm.metric("peermirror_mirror_requests_total", &["result=\"hit\""])?;
        let peers = pm.metric("peermirror_p2p_connected_peers", &[])?;
        println!(
            "      {}: served to peers {:>6.1} MiB from its content store; relayed from peers {:>6.1} MiB; {hits} mirror hits; {peers} peers",
            node.name,
            served / 1048576.0,
            mirrored / 1048576.0
        );
    }
    let b = cluster.node("node-b");
    let metrics = b.pm().via.get(b.pm().metrics, "/metrics", &[])?;
    println!("      node-b /metrics (mirror lines):");
    for line in String::from_utf8_lossy(&metrics.body).lines().filter(|l| {
        l.starts_with("peermirror_mirror_requests_total")
            || l.starts_with("peermirror_served_bytes_total")
    }) {
        println!("        {line}");
    }
    ensure!(
        b.pm()
            .metric("peermirror_served_bytes_total", &["source=\"mirror\""])?
            > 0.0,
        "node-b's bytes did not come from a peer"
    );
    let a = cluster.node("node-a");
    let metrics = a.pm().via.get(a.pm().metrics, "/metrics", &[])?;
    println!(
        "      node-a, bytes sent per peer on the registry port, counted in the kernel (eBPF):"
    );
    for line in String::from_utf8_lossy(&metrics.body).lines().filter(|l| {
        l.starts_with("peermirror_peer_bytes_total")
            && l.contains("port=\"registry\"")
            && l.contains("direction=\"out\"")
    }) {
        println!("        {line}");
    }
    println!(
        "\ncleaning up: processes stopped, namespaces and {} removed",
        cluster.dir.path().display()
    );
    Ok(())
}
