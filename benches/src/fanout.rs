//! `cargo xtask bench fanout`: the first deploy. 1, 4, 8 and 16 nodes in
//! network namespaces (containerd and peermirror each, dataplane required)
//! pull an image no node holds at the same moment, through an upstream
//! registry whose link is capped at 400 Mbit/s (`tc tbf`). Two images: 128
//! MiB in two layers, and 512 MiB in one layer. Each case runs with the
//! fan-out on and off (`--fanout-followers 0`: every node goes upstream),
//! in the same run. Reported: the time until every node is done, against
//! one node alone; the bytes the upstream sent (its qdisc's counter),
//! against one node's pull; CPU per node (peermirror and containerd).
//!
//! Then the late puller: once four nodes hold a 512 MiB layer, their links
//! capped at 400 Mbit/s each, a fifth node pulls it through peermirror
//! fetching from all four at once (`--mirror-parallel-peers 4`, the
//! default), and again from one at a time (`1`), in the same run.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use peermirror_tests::cluster::{Cluster, ClusterNode, NodeSpec};
use peermirror_tests::fanout::{UpstreamLink, node_spec, pull_all, wait_full_mesh};
use peermirror_tests::image::{TestImage, layer};

use crate::measure::server_cpu;

const KEY: [u8; 32] = [0x44; 32];
const MIB: usize = 1 << 20;
const DEFAULT_NODES: &[usize] = &[1, 4, 8, 16];

/// How the nodes of a case get the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No node holds it; the fan-out coordinates.
    FanOut,
    /// No node holds it; every node goes upstream (`--fanout-followers 0`).
    UpstreamOnly,
    /// One node already holds it and the others pull it from peers: no
    /// upstream, nothing to coordinate. What so many simultaneous pulls
    /// cost this machine anyway.
    FromAPeer,
}

/// One measured case.
struct Case {
    mode: Mode,
    image: &'static str,
    nodes: usize,
    seconds: f64,
    upstream: u64,
    /// Mean CPU seconds per node: peermirror, containerd.
    cpu: (f64, f64),
}

/// The node counts to run (`PM_BENCH_FANOUT_NODES=1,4`), largest last.
fn node_counts() -> Vec<usize> {
    let mut counts: Vec<usize> = std::env::var("PM_BENCH_FANOUT_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| DEFAULT_NODES.to_vec());
    counts.retain(|n| *n >= 1);
    counts.sort_unstable();
    counts.dedup();
    if !counts.contains(&1) {
        counts.insert(0, 1);
    }
    counts
}

/// Free bytes on the filesystem of the temporary directory.
fn free_bytes() -> u64 {
    rustix::fs::statvfs(std::env::temp_dir())
        .map(|s| s.f_bavail * s.f_frsize)
        .unwrap_or(0)
}

pub fn bench() -> Result<String> {
    let counts = node_counts();
    let max = *counts.last().unwrap_or(&1);
    let images: [(&'static str, Vec<peermirror_tests::image::LayerSpec>); 2] = [
        (
            "128 MiB, 2 layers",
            vec![layer(64 * MIB, false), layer(64 * MIB, false)],
        ),
        ("512 MiB, 1 layer", vec![layer(512 * MIB, false)]),
    ];
    let mut cases = Vec::new();
    let mut notes = Vec::new();
    let mut late = None;
    for fanout in [true, false] {
        let specs: Vec<NodeSpec> = (1..=max)
            .map(|i| {
                let mut spec = node_spec(&format!("n{i}"), KEY);
                if !fanout {
                    spec.extra.extend(["--fanout-followers".into(), "0".into()]);
                }
                spec
            })
            .collect();
        let mut cluster = start(&specs)?;
        let link = UpstreamLink::cap(&cluster, "400mbit")?;
        for (which, (label, layers)) in images.iter().enumerate() {
            for &n in &counts {
                let size: u64 = layers.iter().map(|l| l.size as u64).sum();
                // Content plus its unpacked snapshot on every node, and the
                // upstream's copy.
                let needed = size * (2 * n as u64 + 2) + (1 << 30);
                if free_bytes() < needed {
                    notes.push(format!(
                        "skipped {label} × {n} nodes (fan-out {}): needs about {} GiB free, {} GiB are",
                        if fanout { "on" } else { "off" },
                        needed >> 30,
                        free_bytes() >> 30
                    ));
                    continue;
                }
                let tag = format!("{}{which}n{n}", if fanout { "on" } else { "off" });
                let image = cluster.layout.add_image(
                    &format!("bench/{}", label.split(' ').next().unwrap_or("img")),
                    &tag,
                    layers,
                )?;
                cluster.layout.finish()?;
                cluster.upstream.push(&cluster.layout, &image)?;
                let mode = if fanout {
                    Mode::FanOut
                } else {
                    Mode::UpstreamOnly
                };
                let reference = cluster.upstream.reference(&image);
                let nodes: Vec<&ClusterNode> = cluster.nodes[..n].iter().collect();
                let case = measure(&cluster, &link, &image, &nodes, mode, label)?;
                eprintln!(
                    "fanout bench: {label}, {n} nodes, {mode:?}: {:.2} s, {} MiB upstream",
                    case.seconds,
                    case.upstream >> 20
                );
                cases.push(case);
                for node in &cluster.nodes[..n] {
                    forget(node, &image, &reference)?;
                }
                if mode == Mode::FanOut && n >= 2 {
                    // The floor: a fresh image that n1 pulls alone first (a
                    // re-pull of this one would meet the records of nodes
                    // that just removed it), then the others at once.
                    let floor = cluster.layout.add_image(
                        &format!("bench/{}", label.split(' ').next().unwrap_or("img")),
                        &format!("floor{which}n{n}"),
                        layers,
                    )?;
                    cluster.layout.finish()?;
                    cluster.upstream.push(&cluster.layout, &floor)?;
                    let floor_ref = cluster.upstream.reference(&floor);
                    cluster.nodes[0].ctr_pull(&floor_ref)?;
                    let others: Vec<&ClusterNode> = cluster.nodes[1..n].iter().collect();
                    let case = measure(&cluster, &link, &floor, &others, Mode::FromAPeer, label)?;
                    eprintln!(
                        "fanout bench: {label}, {} nodes from a peer: {:.2} s, {} MiB upstream",
                        n - 1,
                        case.seconds,
                        case.upstream >> 20
                    );
                    cases.push(case);
                    for node in &cluster.nodes[..n] {
                        forget(node, &floor, &floor_ref)?;
                    }
                }
            }
        }
        if fanout && max > LATE_HOLDERS {
            let needed = (LATE_LAYER as u64) * (2 * LATE_HOLDERS as u64 + 4) + (1 << 30);
            if free_bytes() < needed {
                notes.push(format!(
                    "skipped the late puller: needs about {} GiB free",
                    needed >> 30
                ));
            } else {
                match late_puller(&mut cluster) {
                    Ok(table) => late = Some(table),
                    Err(e) => notes.push(format!("the late puller failed: {e:#}")),
                }
            }
        }
    }
    let mut text = report(&cases, &notes);
    if let Some(l) = late {
        text.push_str(&l);
    }
    Ok(text)
}

/// `cargo xtask bench late`: only the late puller, on five nodes.
pub fn late_bench() -> Result<String> {
    let specs: Vec<NodeSpec> = (1..=LATE_HOLDERS + 1)
        .map(|i| node_spec(&format!("n{i}"), KEY))
        .collect();
    late_puller(&mut start(&specs)?)
}

/// Starts the nodes and waits until each is ready and knows every other.
fn start(specs: &[NodeSpec]) -> Result<Cluster> {
    let mut cluster = Cluster::start(specs)?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    cluster.wait_ready(&refs, Duration::from_secs(120))?;
    wait_full_mesh(&cluster, Duration::from_secs(120))?;
    Ok(cluster)
}

/// Holders of the late puller's layer, and the layer's size.
const LATE_HOLDERS: usize = 4;
const LATE_LAYER: usize = 512 * MIB;

/// One node pulls a 512 MiB layer that four others hold, their links capped
/// at 400 Mbit/s: from all four at once, then from one at a time.
fn late_puller(cluster: &mut Cluster) -> Result<String> {
    let image = cluster
        .layout
        .add_image("bench/late", "v1", &[layer(LATE_LAYER, false)])?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = cluster.upstream.reference(&image);
    // The puller bootstraps from n1 when it restarts: it is the last of
    // the five.
    let p = LATE_HOLDERS;
    let holders: Vec<&ClusterNode> = cluster.nodes[..p].iter().collect();
    pull_all(&holders, &reference, |n, r| n.ctr_pull(r))?;
    let cap = |node: &ClusterNode, rate: Option<&str>| match rate {
        Some(rate) => node.host.ns.tc(&[
            "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "512kb",
            "latency", "200ms",
        ]),
        None => node.host.ns.tc(&["qdisc", "del", "dev", "eth0", "root"]),
    };
    for h in &holders {
        cap(h, Some("400mbit"))?;
    }
    let mut rows = Vec::new();
    let mut result = Ok(());
    let name = cluster.nodes[p].name.clone();
    let layer_digest = image.biggest_layer().digest.clone();
    let layer_size = image.biggest_layer().size;
    let blob_url = format!(
        "http://{}/v2/{}/blobs/{layer_digest}?ns={}",
        cluster.nodes[p].registry_addr(),
        image.repo,
        cluster.upstream.host()
    );
    // The puller's flags as the cluster started it (fan-out on).
    let original = node_spec(&name, KEY).extra;
    let original: Vec<&str> = original.iter().map(String::as_str).collect();
    for peers in ["4", "1"] {
        let outcome = (|| -> Result<(f64, f64)> {
            cluster.nodes[p].restart_peermirror(&["--mirror-parallel-peers", peers])?;
            cluster.wait_ready(&[&name], Duration::from_secs(60))?;
            let puller = &cluster.nodes[p];
            puller.pm().wait_metric(
                "the puller's routing table to hold the holders",
                "peermirror_p2p_routing_table_peers",
                &[],
                Duration::from_secs(60),
                |v| v >= LATE_HOLDERS as f64,
            )?;
            // The relay alone: curl on the puller asks its peermirror.
            let started = Instant::now();
            let got = curl_in(&puller.host.ns, &blob_url)?;
            let relay = started.elapsed().as_secs_f64();
            anyhow::ensure!(got == layer_size, "curl got {got} of {layer_size} bytes");
            // What a user waits for: the pull, unpacking included.
            let started = Instant::now();
            puller.ctr_pull(&reference)?;
            let pull = started.elapsed().as_secs_f64();
            puller.assert_has(&cluster.layout, &image)?;
            forget(puller, &image, &reference)?;
            Ok((relay, pull))
        })();
        cluster.nodes[p].set_extra(&original);
        match outcome {
            Ok(times) => rows.push((peers, times)),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let restarted = cluster.nodes[p]
        .restart_peermirror(&[])
        .and_then(|()| cluster.wait_ready(&[&name], Duration::from_secs(60)));
    for h in &cluster.nodes[..p] {
        cap(h, None)?;
    }
    for node in &cluster.nodes[..p] {
        forget(node, &image, &reference)?;
    }
    result?;
    restarted?;
    let mut out = format!(
        "\nLate puller: {} MiB layer held by {LATE_HOLDERS} nodes, each link capped at 400 Mbit/s (50 MB/s):\n\n\
         | holders asked at once | curl through the puller's peermirror, s | MiB/s | ÷ one at a time | `ctr image pull`, s | ÷ one at a time |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        LATE_LAYER >> 20
    );
    let one = rows.iter().find(|(p, _)| *p == "1").map(|r| r.1);
    for (peers, (relay, pull)) in &rows {
        let _ = writeln!(
            out,
            "| {peers} | {relay:.2} | {:.0} | {:.2} | {pull:.2} | {:.2} |",
            (layer_size >> 20) as f64 / relay,
            one.map_or(f64::NAN, |o| relay / o.0),
            one.map_or(f64::NAN, |o| pull / o.1),
        );
    }
    Ok(out)
}

/// `curl -o /dev/null` of `url` inside `ns`; the bytes it received.
pub fn curl_in(ns: &peermirror_tests::netns::Netns, url: &str) -> Result<u64> {
    crate::measure::curl_with(ns.command("curl"), url)
}

/// Removes `image` and its content from `node` and collects garbage at
/// once (the image record alone does not hold the layers).
fn forget(node: &ClusterNode, image: &TestImage, reference: &str) -> Result<()> {
    node.containerd
        .ctr(&["images", "rm", "--sync", reference])?;
    let mut rm = vec!["content", "rm"];
    rm.extend(image.blobs.iter().map(|b| b.digest.as_str()));
    node.containerd.ctr(&rm)?;
    let lease = node.containerd.ctr(&["leases", "create"])?;
    let id = lease.split_whitespace().next().context("a lease id")?;
    node.containerd.ctr(&["leases", "delete", "--sync", id])?;
    Ok(())
}

fn measure(
    cluster: &Cluster,
    link: &UpstreamLink,
    image: &TestImage,
    nodes: &[&ClusterNode],
    mode: Mode,
    label: &'static str,
) -> Result<Case> {
    let n = nodes.len();
    let cpu = |node: &ClusterNode| {
        (
            server_cpu(node.pm().proc.pid()),
            node.containerd.pid().map_or(0.0, server_cpu),
        )
    };
    let before: Vec<(f64, f64)> = nodes.iter().map(|n| cpu(n)).collect();
    let sent = link.sent()?;
    let started = Instant::now();
    pull_all(nodes, &cluster.upstream.reference(image), |node, r| {
        node.ctr_pull(r)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let upstream = link.sent()? - sent;
    for node in nodes {
        node.assert_has(&cluster.layout, image)?;
    }
    let after: Vec<(f64, f64)> = nodes.iter().map(|n| cpu(n)).collect();
    let per_node = |f: fn(&(f64, f64)) -> f64| {
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| f(a) - f(b))
            .sum::<f64>()
            / n as f64
    };
    Ok(Case {
        mode,
        image: label,
        nodes: n,
        seconds,
        upstream,
        cpu: (per_node(|c| c.0), per_node(|c| c.1)),
    })
}

fn report(cases: &[Case], notes: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| image | nodes | fan-out | all done, s | ÷ one node | upstream sent, MiB | ÷ one node's | CPU-s per node (peermirror / containerd) | target |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |"
    );
    for c in cases {
        // One node alone, fetching from upstream, in the same cluster.
        let alone_mode = if c.mode == Mode::UpstreamOnly {
            Mode::UpstreamOnly
        } else {
            Mode::FanOut
        };
        let alone = cases
            .iter()
            .find(|o| o.mode == alone_mode && o.image == c.image && o.nodes == 1);
        let (t, b) = alone.map_or((f64::NAN, f64::NAN), |a| {
            (c.seconds / a.seconds, c.upstream as f64 / a.upstream as f64)
        });
        let limit = if c.nodes >= 16 { 2.0 } else { 1.5 };
        let target = if c.mode != Mode::FanOut || c.nodes == 1 {
            String::new()
        } else {
            let met = t <= limit && b <= limit;
            format!(
                "≤ {limit}× both: {}",
                if met { "met" } else { "**missed**" }
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {t:.2} | {} | {b:.2} | {:.2} / {:.2} | {target} |",
            c.image,
            c.nodes,
            match c.mode {
                Mode::FanOut => "on",
                Mode::UpstreamOnly => "off (upstream only)",
                Mode::FromAPeer => "a peer already holds it (the floor)",
            },
            c.seconds,
            c.upstream >> 20,
            c.cpu.0,
            c.cpu.1,
        );
    }
    for n in notes {
        let _ = writeln!(out, "\n{n}");
    }
    out
}
