//! What the first-deploy fan-out test and benchmark share: node settings,
//! the capped upstream link and its byte counter, simultaneous pulls.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::cluster::{Cluster, ClusterNode, NodeSpec};

/// A node of the fan-out scenario: short stall timeout (a dead leader is
/// noticed quickly), short lookup cache (holders that commit are found).
pub fn node_spec(name: &str, psk: [u8; 32]) -> NodeSpec {
    NodeSpec::new(
        name,
        psk,
        &[
            "--lookup-cache-ttl",
            "1s",
            "--mirror-stall-timeout",
            "2s",
            "--resync-interval",
            "5s",
        ],
    )
}

/// Waits until every node has every other in its routing table: then they
/// all agree on each digest's rendezvous.
pub fn wait_full_mesh(cluster: &Cluster, timeout: Duration) -> Result<()> {
    let others = (cluster.nodes.len() - 1) as f64;
    for node in &cluster.nodes {
        node.pm()
            .wait_metric(
                &format!("{}'s routing table to hold every other node", node.name),
                "peermirror_p2p_routing_table_peers",
                &[],
                timeout,
                |v| v >= others,
            )
            .with_context(|| node.name.clone())?;
    }
    Ok(())
}

/// The upstream registry's link, capped with `tc tbf`; its qdisc counts
/// every byte the upstream sends.
pub struct UpstreamLink {
    ns: crate::netns::Netns,
}

impl UpstreamLink {
    /// Caps what the upstream sends at `rate` (a `tc` rate: `400mbit`).
    pub fn cap(cluster: &Cluster, rate: &str) -> Result<UpstreamLink> {
        let ns = cluster.upstream_host.ns.clone();
        ns.tc(&[
            "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "512kb",
            "latency", "200ms",
        ])?;
        Ok(UpstreamLink { ns })
    }

    /// Bytes the upstream has sent since the cap was set.
    pub fn sent(&self) -> Result<u64> {
        let out = crate::process::run(
            self.ns
                .command("tc")
                .args(["-s", "qdisc", "show", "dev", "eth0"]),
        )?;
        parse_sent(&out).with_context(|| format!("no byte count in {out:?}"))
    }
}

/// The `Sent <n> bytes` of `tc -s qdisc show` (the first qdisc: the root).
fn parse_sent(out: &str) -> Option<u64> {
    out.split_whitespace()
        .skip_while(|w| *w != "Sent")
        .nth(1)?
        .parse()
        .ok()
}

/// What each node's log says about the fan-out of `digests` (asks,
/// answers, leads, sources that could not serve, misses): printed when a
/// first deploy took more from the upstream than it should have.
pub fn fanout_story(cluster: &Cluster, digests: &[&str]) -> String {
    const KEYWORDS: &[&str] = &[
        "fan-out",
        "following",
        "not found",
        "no holder",
        "cut short",
        "resuming",
    ];
    let mut story = String::new();
    for node in &cluster.nodes {
        let Some(pm) = node.peermirror.as_ref() else {
            continue;
        };
        let log = std::fs::read_to_string(&pm.proc.log).unwrap_or_default();
        for digest in digests {
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(digest) && KEYWORDS.iter().any(|k| l.contains(k)))
                .collect();
            story.push_str(&format!(
                "-- {} on {digest} ({} lines)\n",
                node.name,
                lines.len()
            ));
            for line in lines.iter().take(12) {
                story.push_str(line);
                story.push('\n');
            }
        }
    }
    story
}

/// Bytes in a containerd's ingests now.
pub fn ingest_bytes(content_root: &Path) -> u64 {
    std::fs::read_dir(content_root.join("ingest"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::metadata(e.path().join("data")).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Runs `pull` for every node at the same moment; fails with every node's
/// error when any fails.
pub fn pull_all(
    nodes: &[&ClusterNode],
    reference: &str,
    pull: impl Fn(&ClusterNode, &str) -> Result<()> + Sync,
) -> Result<()> {
    let barrier = std::sync::Barrier::new(nodes.len());
    let results: Vec<(String, Result<()>)> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|n| {
                let (barrier, pull) = (&barrier, &pull);
                s.spawn(move || {
                    barrier.wait();
                    (n.name.clone(), pull(n, reference))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (String::new(), Err(anyhow::anyhow!("pull thread panicked")))
                })
            })
            .collect()
    });
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!("pulls failed:\n{}", failed.join("\n"));
    }
    ensure!(results.len() == nodes.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_root_qdisc_byte_count() {
        let out = "qdisc tbf 8001: root refcnt 2 rate 400Mbit burst 64Kb lat 200ms \n Sent 1234567 bytes 890 pkt (dropped 0, overlimits 12 requeues 0) \n backlog 0b 0p requeues 0\n";
        assert_eq!(parse_sent(out), Some(1_234_567));
        assert_eq!(parse_sent("nothing"), None);
    }
}
