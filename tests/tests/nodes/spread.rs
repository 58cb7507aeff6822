//! Twelve real daemons, each with its own containerd in its own network
//! namespace: an image whose twelve platforms were each pulled by a
//! different node is pulled whole (every platform) by every node with the
//! upstream registry stopped. Twelve nodes is below the DHT's replication
//! factor, so this checks the real daemons end to end, not routing; routing
//! at scale is `scale.rs`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, NodeSpec};
use peermirror_tests::image::layer;

const KEY: [u8; 32] = [0x33; 32];

/// One platform per node.
const PLATFORMS: [&str; 12] = [
    "linux/amd64",
    "linux/arm64",
    "linux/arm/v7",
    "linux/arm/v6",
    "linux/ppc64le",
    "linux/s390x",
    "linux/386",
    "linux/riscv64",
    "linux/mips64le",
    "windows/amd64",
    "freebsd/amd64",
    "linux/mips64",
];

#[test]
fn twelve_nodes_pull_an_image_spread_over_all_of_them() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let specs: Vec<NodeSpec> = (0..PLATFORMS.len())
        .map(|i| NodeSpec {
            name: format!("n{i}"),
            psk: KEY,
            // Twelve daemons, twelve containerds and twelve pulls of every
            // platform at once (49 lookups per node within a second)
            // saturate this machine's two cores: a daemon goes unscheduled
            // for tens of milliseconds at a time (measured here: 30–100 ms
            // between a lookup's request and its handling, and once in CI a
            // lookup past 500 ms), so the 20 ms default resolve timeout
            // would turn hits into misses, and with the upstream stopped a
            // miss fails the pull.
            extra: [
                "--reannounce-interval",
                "30s",
                "--lookup-cache-ttl",
                "1s",
                "--mirror-resolve-timeout",
                "2s",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        })
        .collect();
    let mut cluster = Cluster::start(&specs)?;
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    cluster.wait_ready(&name_refs, Duration::from_secs(120))?;
    let image = cluster.layout.add_index_for(
        "spread/app",
        "v1",
        &PLATFORMS,
        &[layer(1 << 20, true), layer(200_000, false)],
    )?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = format!("{}/{}:{}", cluster.upstream.host(), image.repo, image.tag);
    // Node i pulls platform i only, from upstream (through its peermirror,
    // which has nothing and answers 404).
    for (i, node) in cluster.nodes.iter().enumerate() {
        node.containerd
            .ctr_command()
            .args([
                "--namespace",
                "k8s.io",
                "images",
                "pull",
                "--platform",
                PLATFORMS[i],
            ])
            .arg("--hosts-dir")
            .arg(&node.certs_d)
            .arg(&reference)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .with_context(|| format!("{} pulling {}", node.name, PLATFORMS[i]))?;
    }
    cluster.upstream.stop()?;
    // Every node announced what it holds (the index, its platform's
    // manifest, config and two layers, and the tag), and the announcements
    // are stored in the DHT.
    for node in &cluster.nodes {
        node.pm().wait_metric(
            "the platform's content to be handed to the router",
            "peermirror_advertised_keys",
            &[],
            Duration::from_secs(30),
            |keys| keys >= 6.0,
        )?;
    }
    for node in &cluster.nodes {
        node.pm().wait_metric(
            "the announcements to be stored",
            "peermirror_advertise_pending_keys",
            &[],
            Duration::from_secs(60),
            |pending| pending == 0.0,
        )?;
    }
    let started = Instant::now();
    let pulls: Vec<_> = cluster
        .nodes
        .iter()
        .map(|node| {
            let (mut ctr, certs, reference, name) = (
                node.containerd.ctr_command(),
                node.certs_d.clone(),
                reference.clone(),
                node.name.clone(),
            );
            std::thread::spawn(move || -> Result<()> {
                peermirror_tests::process::run(
                    ctr.args(["--namespace", "k8s.io", "images", "pull", "--all-platforms"])
                        .arg("--hosts-dir")
                        .arg(&certs)
                        .arg(&reference),
                )
                .with_context(|| format!("{name}: all platforms with upstream stopped"))
                .map(drop)
            })
        })
        .collect();
    for pull in pulls {
        pull.join()
            .map_err(|_| anyhow::anyhow!("pull thread panicked"))??;
    }
    let took = started.elapsed();
    for node in &cluster.nodes {
        node.assert_has_all_platforms(&cluster.layout, &image)?;
        let hits = node
            .pm()
            .metric("peermirror_mirror_requests_total", &["result=\"hit\""])?;
        ensure!(
            hits >= 11.0,
            "{} found only {hits} blobs on peers",
            node.name
        );
    }
    println!(
        "spread: {} nodes each pulled {} platforms ({} blobs) from each other in {took:.1?}",
        cluster.nodes.len(),
        PLATFORMS.len(),
        image.blobs.len()
    );
    Ok(())
}
