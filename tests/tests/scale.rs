//! Scale: eight nodes in one process on 127.0.0.0/8 share more than 5,000
//! keys; every node finds the holder of a sample of every other node's keys.
//! Prints advertise time, lookup latency percentiles and memory.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use peermirror::routing::Router;
use peermirror::routing::p2p::{self, NoObserver, P2pConfig, P2pRouter};
use tokio_util::sync::CancellationToken;

const NODES: u8 = 8;
const KEYS_PER_NODE: usize = 700;
const SAMPLE_PER_PEER: usize = 15;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn key(node: u8, i: usize) -> String {
    // Shaped like the digests nodes really announce.
    format!("sha256:{:02x}{:062x}", node, i)
}

async fn listen_addr(router: &P2pRouter) -> Multiaddr {
    for _ in 0..200 {
        if let Some(a) = router.status().listen_addrs.first() {
            return a
                .parse::<Multiaddr>()
                .expect("multiaddr")
                .with(Protocol::P2p(router.peer_id()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("node never listened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_share_thousands_of_keys() {
    let rss_before = rss_bytes();
    let psk = PreSharedKey::new([3; 32]);
    let shutdown = CancellationToken::new();
    let mut nodes = Vec::new();
    for n in 1..=NODES {
        let ip: IpAddr = format!("127.0.0.{}", 40 + n).parse().expect("ip");
        let (router, _task) = p2p::start(
            P2pConfig {
                keypair: Keypair::generate_ed25519(),
                psk: Some(psk),
                listen: vec![Multiaddr::from(ip).with(Protocol::Tcp(0))],
                registry_port: 5000,
                advertise_addr: Some(ip),
                provider_ttl: Duration::from_secs(600),
                reannounce_interval: Duration::from_secs(300),
                lookup_cache_ttl: Duration::from_millis(1),
                idle_connection_timeout: Duration::from_secs(60),
                has_bootstrap: n > 1,
            },
            Arc::new(NoObserver),
            shutdown.clone(),
        )
        .expect("start");
        nodes.push((ip, router));
    }
    let first = listen_addr(&nodes[0].1).await;
    for (_, r) in &nodes[1..] {
        r.dial(first.clone()).await.expect("dial");
    }
    let joined = Instant::now();
    loop {
        if nodes
            .iter()
            .all(|(_, r)| r.status().routing_table_peers >= usize::from(NODES) - 1)
        {
            break;
        }
        for (_, r) in &nodes {
            let _ = r.bootstrap().await;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(30),
            "the routing tables never filled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let started = Instant::now();
    for (n, (_, r)) in nodes.iter().enumerate() {
        let keys = (0..KEYS_PER_NODE).map(|i| key(n as u8, i)).collect();
        r.advertise(keys).await.expect("advertise");
    }
    loop {
        if nodes.iter().all(|(_, r)| r.status().initial_advertise_done) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "advertising did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let advertise_time = started.elapsed();
    let total_keys: usize = nodes.iter().map(|(_, r)| r.status().advertised_keys).sum();
    assert_eq!(total_keys, usize::from(NODES) * KEYS_PER_NODE);

    let mut latencies = Vec::new();
    for (asker, (_, router)) in nodes.iter().enumerate() {
        for (owner, (owner_ip, _)) in nodes.iter().enumerate() {
            if owner == asker {
                continue;
            }
            for i in (0..KEYS_PER_NODE)
                .step_by(KEYS_PER_NODE / SAMPLE_PER_PEER)
                .take(SAMPLE_PER_PEER)
            {
                let k = key(owner as u8, i);
                let t = Instant::now();
                let mut stream = router.lookup(&k);
                let found = tokio::time::timeout(Duration::from_secs(10), stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("node {asker} found no holder of {k} in 10 s"))
                    .unwrap_or_else(|| panic!("node {asker}: lookup of {k} ended empty"));
                latencies.push(t.elapsed());
                assert_eq!(
                    found.addr.ip(),
                    *owner_ip,
                    "node {asker}: wrong holder for {k}"
                );
            }
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    let rss = rss_bytes().saturating_sub(rss_before);
    println!(
        "scale: {NODES} nodes, {total_keys} keys advertised in {advertise_time:.2?}; \
         {} lookups: p50 {:.2?}, p99 {:.2?}, max {:.2?}; memory growth for all nodes {} MiB",
        latencies.len(),
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1],
        rss >> 20
    );
    shutdown.cancel();
}
