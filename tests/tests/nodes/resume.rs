//! A holder killed mid-blob does not fail the pull when another holder
//! exists, even one the puller's cached lookup does not know. Nodes a and b
//! hold a layer; c's lookup of it was answered (and cached) while only a
//! held it; the upstream is stopped, so a pull cut short cannot be finished
//! from the registry (and containerd 2.1 would not try). c pulls, a's
//! daemon is SIGKILLed mid-blob, and c resumes from b.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, NodeSpec};
use peermirror_tests::fanout::ingest_bytes;
use peermirror_tests::image::layer;
use peermirror_tests::process::wait_for;

const KEY: [u8; 32] = [0x5e; 32];
const MIB: u64 = 1 << 20;

fn spec(name: &str, extra: &[&str]) -> NodeSpec {
    let mut flags = vec![
        // Two cores and three daemons: a holder is found well within this.
        "--mirror-resolve-timeout",
        "2s",
        // No first-deploy coordination: the layer is held before c asks.
        "--fanout-followers",
        "0",
    ];
    flags.extend_from_slice(extra);
    NodeSpec::new(name, KEY, &flags)
}

#[test]
fn a_holder_killed_mid_blob_does_not_fail_the_pull() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut cluster = Cluster::start(&[
        spec("a", &[]),
        spec("b", &[]),
        // c keeps a lookup's answer for the whole test, and fetches from one
        // holder at a time.
        spec(
            "c",
            &[
                "--lookup-cache-ttl",
                "10m",
                "--mirror-parallel-min-size",
                "1G",
            ],
        ),
    ])?;
    cluster.wait_ready(&["a", "b", "c"], Duration::from_secs(60))?;
    let image = cluster
        .layout
        .add_image("resume/app", "1", &[layer(64 << 20, false)])?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = cluster.upstream.reference(&image);
    let layer = image.biggest_layer().clone();

    // a holds it; c looks it up (a HEAD through c's port) and caches "a".
    cluster.node("a").ctr_pull(&reference)?;
    cluster
        .node("a")
        .wait_announced(image.blobs.len(), Duration::from_secs(60))?;
    let c = cluster.node("c");
    let path = format!(
        "/v2/{}/blobs/{}?ns={}",
        image.repo,
        layer.digest,
        cluster.upstream.host()
    );
    let head = c
        .host
        .ns
        .via()
        .request(c.registry_addr(), "HEAD", &path, &[])?;
    ensure!(
        head.status == 200,
        "c's HEAD of the layer answered {} (a holds it)",
        head.status
    );
    // Then b pulls it too, and the upstream goes away.
    cluster.node("b").ctr_pull(&reference)?;
    cluster
        .node("b")
        .wait_announced(image.blobs.len(), Duration::from_secs(60))?;
    cluster.upstream.stop()?;
    let c = cluster.node("c");
    // a sends slowly enough (100 Mbit/s: 5 s for the layer) to be killed
    // mid-blob.
    cluster.node("a").host.ns.tc(&[
        "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "100mbit", "burst", "256kb",
        "latency", "200ms",
    ])?;

    let c_root = c.containerd.content_root();
    let a_pid = cluster.node("a").pm().proc.pid();
    let pulled = std::thread::scope(|s| {
        let pull = s.spawn(|| c.ctr_pull(&reference));
        let grew = wait_for("c's ingest to grow", Duration::from_secs(30), || {
            (ingest_bytes(&c_root) > 8 * MIB).then_some(())
        });
        let at = ingest_bytes(&c_root);
        // SAFETY: kill(2) on the PID of a daemon this test started.
        unsafe {
            libc::kill(a_pid as i32, libc::SIGKILL);
        }
        println!(
            "resume: killed a's daemon at {} MiB of {} MiB",
            at / MIB,
            layer.size / MIB
        );
        let pulled = pull
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("pull thread panicked")));
        grew.and(pulled)
    });
    pulled.context("c's pull with a killed mid-blob and b holding the layer")?;
    c.assert_has(&cluster.layout, &image)?;

    // c's journal: the layer came from a, then b, in one transfer.
    let pm = c.pm();
    let recent = pm.recent_requests()?;
    let of_layer: Vec<&serde_json::Value> = recent
        .iter()
        .filter(|r| r["key"] == layer.digest.as_str() && r["outcome"] == "hit")
        .collect();
    let (a_addr, b_addr) = (
        cluster.node("a").registry_addr().to_string(),
        cluster.node("b").registry_addr().to_string(),
    );
    ensure!(
        of_layer
            .iter()
            .any(|r| pm.request_peers(r) == [a_addr.clone(), b_addr.clone()]),
        "no transfer of the layer went from a to b: {of_layer:#?}"
    );
    Ok(())
}
