//! `cargo xtask demo`: an air-gapped pull served by peermirror, on this
//! machine, with real containerd, skopeo and the CNCF registry.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use peermirror_tests::image::{Layout, layer};
use peermirror_tests::services::{
    Containerd, ContainerdOptions, Peermirror, Upstream, require_root,
};

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

    let dir = tempfile::Builder::new()
        .prefix("peermirror-demo-")
        .tempdir()?;
    println!(
        "peermirror demo (working directory {})",
        dir.path().display()
    );

    step(
        1,
        "starting an upstream registry (docker-registry, CNCF distribution)",
    );
    let mut upstream = Upstream::start(&dir.path().join("upstream"))?;
    println!("      upstream at http://{}", upstream.addr);

    step(
        2,
        "generating an image with random layers and pushing it with skopeo",
    );
    let mut layout = Layout::create(&dir.path().join("layout"))?;
    let image = layout.add_image(
        "demo/app",
        "1.0",
        &[
            layer(20 << 20, false),
            layer(5 << 20, true),
            layer(64 << 10, true),
        ],
    )?;
    layout.finish()?;
    upstream.push(&layout, &image)?;
    let reference = upstream.reference(&image);
    println!("      pushed {reference} ({})", image.root.digest);

    step(3, "node A: its containerd pulls the image from upstream");
    let node_a = Containerd::start(
        &dir.path().join("node-a"),
        "k8s.io",
        ContainerdOptions::default(),
    )?;
    node_a.pull(&reference)?;
    println!(
        "      node A holds {} blobs",
        node_a.content_digests()?.len()
    );

    step(4, "node A: peermirror serves node A's containerd content");
    let pm = Peermirror::start(&dir.path().join("pm-a"), &node_a, &["--log-level", "info"])?;
    println!(
        "      registry http://{}   metrics http://{}/metrics",
        pm.registry, pm.metrics
    );

    step(
        5,
        "upstream stopped; node B pulls through peermirror (hosts.toml lists it as mirror)",
    );
    upstream.stop()?;
    let hosts = dir.path().join("certs.d");
    let host_dir = hosts.join(upstream.host());
    std::fs::create_dir_all(&host_dir)?;
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.host(),
            pm.registry
        ),
    )?;
    println!("      {}:", host_dir.join("hosts.toml").display());
    for line in std::fs::read_to_string(host_dir.join("hosts.toml"))?.lines() {
        println!("        {line}");
    }
    let node_b = Containerd::start(
        &dir.path().join("node-b"),
        "k8s.io",
        ContainerdOptions::default(),
    )?;
    let started = Instant::now();
    node_b
        .ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts.to_string_lossy(),
            &reference,
        ])
        .context("node B's pull through peermirror")?;
    println!(
        "      node B pulled {reference} in {:.2?} with the upstream registry down",
        started.elapsed()
    );

    step(6, "what peermirror reports");
    let on_b = node_b.content_digests()?;
    ensure!(
        image.blobs.iter().all(|b| on_b.contains(&b.digest)),
        "node B is missing blobs"
    );
    let served = pm.metric("peermirror_served_bytes_total", &[])?;
    println!(
        "      served {:.1} MiB; node B has all {} blobs of the image",
        served / 1048576.0,
        image.blobs.len()
    );
    let metrics = peermirror_tests::http::get(pm.metrics, "/metrics", &[])?;
    for line in String::from_utf8_lossy(&metrics.body)
        .lines()
        .filter(|l| l.starts_with("peermirror_served_bytes") || l.starts_with("peermirror_catalog"))
    {
        println!("        {line}");
    }
    println!(
        "\ncleaning up (processes stopped, {} removed)",
        dir.path().display()
    );
    Ok(())
}
