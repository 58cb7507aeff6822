//! The DHT at cluster scale, in one process on 127.0.0.0/8: nodes announce
//! their keys as the daemon does (the first round), and once every node is
//! ready — its first round stored, its routing table non-empty — every
//! sampled lookup must find its holder. Below about 20 nodes every node
//! holds every record (Kademlia replicates on the k = 20 closest), so only
//! a larger cluster exercises routing.
//!
//! Sizes are the CI defaults; `PM_DHT_NODES`, `PM_DHT_KEYS` and
//! `PM_DHT_SAMPLE` change them (`cargo xtask bench dht` runs the big ones).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_routing::Router;
use peermirror_tests::dht::{DhtCluster, DhtOptions, SchedulingProbe, key, quantile, rss_bytes};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every node asks for `sample` keys of every other node; all must be
/// found, at the node that holds them.
async fn sampled_lookups(
    cluster: &DhtCluster,
    keys: usize,
    sample: usize,
) -> Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    let mut empty: BTreeMap<String, usize> = BTreeMap::new();
    let owners: Vec<(usize, std::net::IpAddr)> = cluster.live().map(|(i, n)| (i, n.ip)).collect();
    for (asker, _) in cluster.live() {
        for &(owner, owner_ip) in &owners {
            if owner == asker {
                continue;
            }
            for i in (0..keys).step_by((keys / sample).max(1)).take(sample) {
                let k = key(owner, i);
                match cluster
                    .lookup_first(asker, &k, Duration::from_secs(10))
                    .await?
                {
                    Some((peer, took)) => {
                        ensure!(
                            peer.addr.ip() == owner_ip,
                            "node {asker}: {k} is held by node {owner}, lookup said {peer:?}"
                        );
                        latencies.push(took);
                    }
                    None => *empty.entry(k).or_default() += 1,
                }
            }
        }
    }
    ensure!(
        empty.is_empty(),
        "{} lookups ended empty ({} keys), e.g. {:?}",
        empty.values().sum::<usize>(),
        empty.len(),
        empty.iter().next()
    );
    latencies.sort();
    Ok(latencies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    debug_assertions,
    ignore = "many nodes in one process: run in release (cargo xtask test does)"
)]
async fn every_lookup_finds_its_holder_at_cluster_scale() -> Result<()> {
    let nodes = env("PM_DHT_NODES", 32);
    let keys = env("PM_DHT_KEYS", 300);
    let sample = env("PM_DHT_SAMPLE", 15);
    let rss_before = rss_bytes();
    let cluster = DhtCluster::start(nodes, DhtOptions::default()).await?;
    // With PM_DHT_BIG, node 0 holds that many keys (hundreds of images).
    let big = env("PM_DHT_BIG", 0);
    cluster
        .advertise(|i| {
            let n = if i == 0 && big > 0 { big } else { keys };
            (0..n).map(|k| key(i, k)).collect()
        })
        .await?;
    let ready = cluster.wait_ready(Duration::from_secs(300)).await?;
    let probe = SchedulingProbe::start();
    let latencies = sampled_lookups(&cluster, keys, sample).await?;
    let late = probe.finish().await;
    if big > 0 {
        // The big node's keys, sampled over their whole range.
        let holder = cluster.node(0).ip;
        for (n, i) in (0..big).step_by((big / 500).max(1)).enumerate() {
            let asker = 1 + n % (nodes - 1);
            let found = cluster
                .lookup_first(asker, &key(0, i), Duration::from_secs(10))
                .await?;
            ensure!(
                found.is_some_and(|(p, _)| p.addr.ip() == holder),
                "node {asker} did not find key {i} of the big node"
            );
        }
    }
    let rss = rss_bytes().saturating_sub(rss_before);
    println!(
        "dht: {nodes} nodes × {keys} keys ready in {ready:.2?} ({} failed announcements retried); \
         {} lookups: p50 {:.2?}, p99 {:.2?}, p99.9 {:.2?}, max {:.2?}; {:.1} MiB RSS per node; \
         a 1 ms timer was late by p50 {:.2?}, p99 {:.2?}, max {:.2?} meanwhile",
        cluster.advertise_failures(),
        latencies.len(),
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        quantile(&latencies, 0.999),
        latencies.last().copied().unwrap_or_default(),
        rss as f64 / nodes as f64 / (1 << 20) as f64,
        quantile(&late, 0.5),
        quantile(&late, 0.99),
        late.last().copied().unwrap_or_default(),
    );
    Ok(())
}

/// A quarter of the nodes die without a goodbye while lookups run: keys
/// that survivors hold are still found, dead holders are never reported,
/// and nodes that join afterwards find what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    debug_assertions,
    ignore = "many nodes in one process: run in release (cargo xtask test does)"
)]
async fn lookups_survive_churn_and_newcomers_find_existing_content() -> Result<()> {
    let nodes = env("PM_DHT_CHURN_NODES", 32);
    let keys = 40;
    let mut cluster = DhtCluster::start(nodes, DhtOptions::default()).await?;
    cluster
        .advertise(|i| (0..keys).map(|k| key(i, k)).collect())
        .await?;
    cluster.wait_ready(Duration::from_secs(300)).await?;
    // Lookups of survivors' keys run while a quarter of the nodes die.
    let dead: Vec<usize> = (1..nodes).step_by(4).collect();
    let dead_ips: Vec<_> = dead
        .iter()
        .map(|&i| peermirror_tests::dht::node_ip(i))
        .collect();
    let survivors: Vec<usize> = (0..nodes).filter(|i| !dead.contains(i)).collect();
    let during = {
        let mut latencies = Vec::new();
        for (n, &i) in dead.iter().enumerate() {
            cluster.kill(i);
            let (asker, owner) = (survivors[n], survivors[(n + 5) % survivors.len()]);
            let k = key(owner, n);
            let found = cluster
                .lookup_first(asker, &k, Duration::from_secs(10))
                .await?;
            let (peer, took) =
                found.with_context(|| format!("node {asker} lost {k} while node {i} died"))?;
            ensure!(peer.addr.ip() == cluster.node(owner).ip, "{k}: {peer:?}");
            latencies.push(took);
        }
        latencies
    };
    // A dead node is not reported once its peers can know it is gone: its
    // sockets closed with the process; give them the mirror's connect
    // timeout (1 s) to notice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for &asker in survivors.iter().take(8) {
        for &owner in &dead {
            if let Some((peer, _)) = cluster
                .lookup_first(asker, &key(owner, 0), Duration::from_secs(15))
                .await?
            {
                ensure!(
                    !dead_ips.contains(&peer.addr.ip()),
                    "node {asker} was sent to dead node {owner}: {peer:?}"
                );
            }
        }
    }
    let latencies = sampled_lookups(&cluster, keys, 4).await?;
    println!(
        "churn: {} of {nodes} nodes killed; {} lookups while they died (max {:.2?}); \
         {} lookups of survivors' keys after: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        dead.len(),
        during.len(),
        during.iter().max().copied().unwrap_or_default(),
        latencies.len(),
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    // Newcomers.
    for _ in 0..2 {
        let n = cluster.add().await?;
        cluster
            .node(n)
            .router
            .advertise(Vec::new(), peermirror_routing::Round::Initial)
            .await?;
    }
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let newcomers: Vec<usize> = (nodes..nodes + 2).collect();
    for &asker in &newcomers {
        for (owner, n) in cluster.live().filter(|(i, _)| !newcomers.contains(i)) {
            let k = key(owner, keys - 1);
            let found = cluster
                .lookup_first(asker, &k, Duration::from_secs(10))
                .await?;
            ensure!(
                found.as_ref().is_some_and(|(p, _)| p.addr.ip() == n.ip),
                "newcomer {asker} did not find {k} at node {owner}: {found:?}"
            );
        }
    }
    Ok(())
}
