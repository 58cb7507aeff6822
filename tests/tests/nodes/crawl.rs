//! A first-deploy leader whose registry link crawls does not hold its
//! followers back. n1's link from the upstream is capped at 4 Mbit/s (half
//! of `--mirror-min-speed`); n1 misses a new layer first and leads
//! its fetch; n2 then misses it and follows n1's in-flight ingest. n2 leaves
//! the crawling source within the speed window, its containerd takes the
//! layer from the upstream (at once on containerd 1.6/1.7; on 2.1 the pull
//! that was cut short fails and the next one goes upstream), and n2 holds
//! the image long before n1 does.

use std::time::Duration;

use anyhow::{Result, ensure};
use peermirror_tests::cluster::{Cluster, NodeSpec};
use peermirror_tests::fanout::{ingest_bytes, wait_full_mesh};
use peermirror_tests::image::layer;
use peermirror_tests::process::wait_for;

const KEY: [u8; 32] = [0x6c; 32];
const MIB: u64 = 1 << 20;

/// Caps what the upstream sends to `ip` at `rate` (an HTB class picked by a
/// u32 filter); the rest of its link is left alone.
fn crawl_to(cluster: &Cluster, ip: std::net::Ipv4Addr, rate: &str) -> Result<()> {
    let ns = &cluster.upstream_host.ns;
    let dst = format!("{ip}/32");
    let steps: [&[&str]; 4] = [
        &[
            "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10",
        ],
        &[
            "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate",
            "10gbit",
        ],
        &[
            "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:30", "htb", "rate", rate,
            "ceil", rate,
        ],
        &[
            "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "dst", &dst, "flowid", "1:30",
        ],
    ];
    for step in steps {
        ns.tc(step)?;
    }
    Ok(())
}

fn lift(cluster: &Cluster) -> Result<()> {
    cluster
        .upstream_host
        .ns
        .tc(&["qdisc", "del", "dev", "eth0", "root"])
}

#[test]
fn followers_leave_a_leader_whose_registry_link_crawls() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    // A stall timeout that n1's ingest, written 1 MiB at a time, never
    // reaches: n2 must leave it for its speed.
    let spec = |name| {
        NodeSpec::new(
            name,
            KEY,
            &["--lookup-cache-ttl", "1s", "--mirror-stall-timeout", "4s"],
        )
    };
    let specs = [spec("n1"), spec("n2")];
    let mut cluster = Cluster::start(&specs)?;
    cluster.wait_ready(&["n1", "n2"], Duration::from_secs(60))?;
    wait_full_mesh(&cluster, Duration::from_secs(60))?;
    let image = cluster
        .layout
        .add_image("crawl/app", "1", &[layer(24 << 20, false)])?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = cluster.upstream.reference(&image);
    let layer_size = image.biggest_layer().size;
    crawl_to(&cluster, cluster.node("n1").ip(), "4mbit")?;

    let (n1, n2) = (cluster.node("n1"), cluster.node("n2"));
    let n1_root = n1.containerd.content_root();
    let outcome = std::thread::scope(|s| -> Result<(usize, u64, bool)> {
        let lead = s.spawn(|| n1.ctr_pull(&reference));
        let followed = (|| -> Result<(usize, u64, bool)> {
            wait_for("n1's ingest to appear", Duration::from_secs(30), || {
                (ingest_bytes(&n1_root) > MIB).then_some(())
            })?;
            // containerd 2.1 fails a pull cut short; the next one goes to
            // the upstream.
            let mut errors = Vec::new();
            for attempt in 1..=3 {
                match n2.ctr_pull(&reference) {
                    Ok(()) => {
                        return Ok((attempt, ingest_bytes(&n1_root), lead.is_finished()));
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            anyhow::bail!("n2 could not pull beside a crawling leader: {errors:#?}")
        })();
        // n1 finishes at full speed, whatever happened.
        let lifted = lift(&cluster);
        let led = lead
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("pull thread panicked")));
        let outcome = followed?;
        lifted?;
        led?;
        Ok(outcome)
    })?;
    let (attempts, n1_had, n1_done) = outcome;
    n2.assert_has(&cluster.layout, &image)?;
    println!(
        "crawl: n2 held the image after {attempts} pull(s), when n1 had {} of {} MiB",
        n1_had / MIB,
        layer_size / MIB
    );
    ensure!(
        attempts <= 2,
        "n2 needed {attempts} pulls beside a crawling leader"
    );
    ensure!(
        !n1_done && n1_had < layer_size / 2,
        "n2 finished only when n1 had {n1_had} of {layer_size} bytes in its ingest \
         (n1's pull over: {n1_done}): it waited for the crawl"
    );
    // n2 followed n1 and left it: a transfer of the layer from n1 alone
    // ended early (n1's ingest was too slow, or grew by nothing for the
    // stall timeout: containerd writes it 1 MiB at a time).
    let n1_addr = n1.registry_addr().to_string();
    let pm = n2.pm();
    let left: Vec<serde_json::Value> = pm
        .recent_requests()?
        .into_iter()
        .filter(|r| r["key"] == image.biggest_layer().digest.as_str())
        .filter(|r| r["outcome"] == "failed" && pm.request_peers(r) == [n1_addr.clone()])
        .collect();
    ensure!(
        left.len() == 1,
        "n2 did not leave the crawling source once: {left:#?}"
    );
    let log = std::fs::read_to_string(&pm.proc.log)?;
    ensure!(
        log.contains("leaving a slow in-flight source"),
        "n2 left n1 for another reason than its speed"
    );
    Ok(())
}
