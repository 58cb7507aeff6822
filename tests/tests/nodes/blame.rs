//! One keyed peer that sends wrong segments does not cost a node its honest
//! holders. Nodes a and b hold an image; b is a liar (its real daemon behind
//! a front that flips a byte of every segment it sends); the upstream is
//! stopped, so node c can only get the image from peers. c fetches the
//! layer from both at once, the digest does not match, and c's audit keeps
//! avoiding b only: c's next pull gets the layer from a alone.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, NodeSpec, REGISTRY_PORT};
use peermirror_tests::image::layer;
use peermirror_tests::liar::{Front, Lie};

const KEY: [u8; 32] = [0x77; 32];

fn spec(name: &str, extra: &[&str]) -> NodeSpec {
    let mut flags = vec![
        // Two cores and three daemons: a holder is found well within this.
        "--mirror-resolve-timeout",
        "2s",
        "--lookup-cache-ttl",
        "1s",
    ];
    flags.extend_from_slice(extra);
    NodeSpec::new(name, KEY, &flags)
}

/// The verdicts c's audits counted.
fn verdicts(cluster: &Cluster, verdict: &str) -> f64 {
    cluster
        .node("c")
        .pm()
        .metric(
            "peermirror_mirror_corrupt_holders_total",
            &[&format!("verdict=\"{verdict}\"")],
        )
        .unwrap_or(0.0)
}

#[test]
fn only_the_peer_that_sent_wrong_bytes_stays_avoided() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut cluster = Cluster::start(&[
        spec("a", &[]),
        spec("b", &[]),
        // Fetched from several holders from 8 MiB on.
        spec("c", &["--mirror-parallel-min-size", "8M"]),
    ])?;
    cluster.wait_ready(&["a", "b", "c"], Duration::from_secs(60))?;
    let image = cluster
        .layout
        .add_image("blame/app", "1", &[layer(24 << 20, false)])?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = cluster.upstream.reference(&image);
    for name in ["a", "b"] {
        cluster.node(name).ctr_pull(&reference)?;
    }

    // b turns liar: its daemon moves to loopback, the front takes its port.
    let b_daemon = SocketAddr::from(([127, 0, 0, 1], REGISTRY_PORT + 7));
    {
        let b = cluster.node_mut("b");
        b.set_registry_bind(Some(b_daemon));
        b.restart_peermirror(&[])?;
    }
    cluster.wait_ready(&["b"], Duration::from_secs(60))?;
    let b = cluster.node("b");
    let b_addr = b.registry_addr();
    let front = Front::start(&b.host.ns.path(), b_addr, b_daemon, Lie::CorruptRanges)?;
    for name in ["a", "b"] {
        cluster
            .node(name)
            .wait_announced(image.blobs.len(), Duration::from_secs(60))?;
    }
    cluster.upstream.stop()?;

    // c pulls: the first try may fail (the layer's body is cut short when
    // its digest does not match); once c's audit has cleared a, a pull
    // succeeds with the upstream gone.
    let c = cluster.node("c");
    let mut errors = Vec::new();
    let mut pulled = false;
    for _ in 0..4 {
        match c.ctr_pull(&reference) {
            Ok(()) => {
                pulled = true;
                break;
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let corrupted = front.tally.corrupted.load(Ordering::Relaxed);
    ensure!(
        corrupted >= 1,
        "b sent c no segment (nothing was tested): {} requests",
        front.tally.requests.load(Ordering::Relaxed)
    );
    ensure!(
        pulled,
        "c could not pull from its honest holder after b's wrong segments: {errors:#?}"
    );
    c.assert_has(&cluster.layout, &image)?;
    println!(
        "blame: b flipped {corrupted} segments; c's failed pulls before the audit: {}",
        errors.len()
    );
    ensure!(
        verdicts(&cluster, "liar") == 1.0 && verdicts(&cluster, "cleared") == 1.0,
        "c's audit verdicts: liar {}, cleared {}",
        verdicts(&cluster, "liar"),
        verdicts(&cluster, "cleared")
    );

    // What c's journal says: b was in the corrupt transfer; every transfer
    // of the layer that succeeded came from a alone.
    let pm = c.pm();
    let recent = pm.recent_requests()?;
    let layer = image.biggest_layer();
    let of_layer: Vec<&serde_json::Value> = recent
        .iter()
        .filter(|r| r["key"] == layer.digest.as_str())
        .collect();
    let names = |r: &serde_json::Value| pm.request_peers(r);
    let (a_addr, b_addr) = (
        cluster.node("a").registry_addr().to_string(),
        b_addr.to_string(),
    );
    let corrupt = of_layer
        .iter()
        .find(|r| r["outcome"] == "corrupt")
        .with_context(|| format!("no corrupt transfer of the layer: {of_layer:#?}"))?;
    ensure!(
        names(corrupt).contains(&b_addr),
        "b had no part in the corrupt transfer: {corrupt}"
    );
    let hits: Vec<_> = of_layer.iter().filter(|r| r["outcome"] == "hit").collect();
    ensure!(
        !hits.is_empty(),
        "no transfer of the layer succeeded: {of_layer:#?}"
    );
    for hit in hits {
        ensure!(
            names(hit) == [a_addr.clone()] && hit["verified"] != false,
            "a transfer after the audit did not come from a alone: {hit}"
        );
    }
    drop(front);
    Ok(())
}
