//! `cargo xtask bench tags`: what tag agreement adds to a pull by tag.
//!
//! Four nodes in network namespaces. Nodes a and b hold one image under
//! [`TAGS`] tags each ("held by two"); a alone holds [`TAGS`] more ("held by
//! one"); nobody holds a third set. Node c runs the default
//! `--tag-resolution agreement`, node d `single-holder`. Each tag is asked
//! once of c and once of d, interleaved, as containerd asks: `GET
//! /v2/<name>/manifests/<tag>` on the node's registry port. Every tag is a
//! key of its own, so every lookup is a cold one. Reported: the answers and
//! the time to the whole answer, median and p90, per set and node.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, ClusterNode, NodeSpec};
use peermirror_tests::fanout::{node_spec, wait_full_mesh};
use peermirror_tests::image::layer;

const KEY: [u8; 32] = [0x47; 32];
/// Tags per set (each asked once of each node).
const TAGS: usize = 40;

/// One node's answers to one set of tags.
struct Row {
    set: &'static str,
    node: &'static str,
    found: usize,
    millis: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn median_of(row: &Row) -> f64 {
    let mut v = row.millis.clone();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Tags `reference`'s image as `<repo>:<tag>` for each tag on `node`.
fn tag_all(node: &ClusterNode, reference: &str, repo: &str, tags: &[String]) -> Result<()> {
    for tag in tags {
        node.containerd.ctr(&[
            "images",
            "tag",
            "--force",
            reference,
            &format!("{repo}:{tag}"),
        ])?;
    }
    Ok(())
}

pub fn bench() -> Result<String> {
    let mut specs: Vec<NodeSpec> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| node_spec(n, KEY))
        .collect();
    specs[3]
        .extra
        .extend(["--tag-resolution".into(), "single-holder".into()]);
    let mut cluster = Cluster::start(&specs)?;
    cluster.wait_ready(&["a", "b", "c", "d"], Duration::from_secs(60))?;
    wait_full_mesh(&cluster, Duration::from_secs(60))?;
    let image = cluster
        .layout
        .add_image("bench/tags", "0", &[layer(64 << 10, true)])?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = cluster.upstream.reference(&image);
    let host = cluster.upstream.host();
    let repo = format!("{host}/{}", image.repo);
    let set = |prefix: &str| -> Vec<String> { (0..TAGS).map(|i| format!("{prefix}{i}")).collect() };
    let (two, one, none) = (set("two"), set("one"), set("none"));
    for name in ["a", "b"] {
        let node = cluster.node(name);
        node.cri_pull(&reference)
            .with_context(|| format!("{name}: pulling the image"))?;
        tag_all(node, &reference, &repo, &two)?;
    }
    tag_all(cluster.node("a"), &reference, &repo, &one)?;
    // Three digests and the first tag, then the tags of each node's sets.
    cluster
        .node("a")
        .wait_announced(4 + 2 * TAGS, Duration::from_secs(120))?;
    cluster
        .node("b")
        .wait_announced(4 + TAGS, Duration::from_secs(120))?;
    let mut rows = Vec::new();
    for (label, tags) in [
        ("held by two nodes", &two),
        ("held by one node", &one),
        ("held by none", &none),
    ] {
        let mut c = Row {
            set: label,
            node: "c: agreement",
            found: 0,
            millis: Vec::new(),
        };
        let mut d = Row {
            node: "d: single-holder",
            millis: Vec::new(),
            ..c
        };
        for tag in tags {
            for (name, row) in [("c", &mut c), ("d", &mut d)] {
                let node = cluster.node(name);
                let path = format!("/v2/{}/manifests/{tag}?ns={host}", image.repo);
                let started = Instant::now();
                let r = node.pm().via.get(node.registry_addr(), &path, &[])?;
                row.millis.push(started.elapsed().as_secs_f64() * 1e3);
                if r.status == 200 {
                    ensure!(
                        r.header("docker-content-digest")
                            == Some(image.root.digest.to_string().as_str()),
                        "{name} answered {tag} with another digest"
                    );
                    row.found += 1;
                }
            }
        }
        eprintln!(
            "tags bench: {label}: c {} of {TAGS} answered, d {} of {TAGS}",
            c.found, d.found
        );
        rows.push(c);
        rows.push(d);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| tags | node | answered from peers | median ms | p90 ms |\n| --- | --- | ---: | ---: | ---: |"
    );
    for row in &rows {
        let mut v = row.millis.clone();
        v.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "| {} | {} | {} of {} | {:.1} | {:.1} |",
            row.set,
            row.node,
            row.found,
            row.millis.len(),
            percentile(&v, 0.5),
            percentile(&v, 0.9)
        );
    }
    for pair in rows.chunks(2) {
        let (c, d) = (median_of(&pair[0]), median_of(&pair[1]));
        let _ = writeln!(
            out,
            "\n{}: agreement {:+.1} ms against single-holder (median {c:.1} against {d:.1} ms, {:.2}×)",
            pair[0].set,
            c - d,
            c / d
        );
    }
    Ok(out)
}
