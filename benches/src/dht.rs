//! `cargo xtask bench dht`: the DHT at 16, 32 and 64 nodes in one process
//! on 127.0.0.0/8 (each scenario in a fresh child process, so that memory
//! is measured from a clean start): time until every node is ready (first
//! round stored), lookup latency from a local miss to the first provider,
//! the scheduling delay of the same process meanwhile, and memory per node.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::dht::{DhtCluster, DhtOptions, SchedulingProbe, key, quantile, rss_bytes};

/// nodes, keys per node, keys of node 0 (0: the same as the others), runs.
/// The two sizes the correctness target names run three times in a row.
const SCENARIOS: &[(usize, usize, usize, usize)] = &[
    (16, 300, 0, 1),
    (32, 300, 0, 3),
    (64, 100, 0, 3),
    (32, 10, 10_000, 1),
];

/// With `PM_DHT_LARGE=1`: 64,000 keys (1.28 million provider records in
/// one process), which takes far longer than the rest together.
const LARGE: (usize, usize, usize, usize) = (64, 1000, 0, 1);

/// Lookups sampled per (asker, owner) pair.
const SAMPLE: usize = 5;

/// One scenario, run in this process; prints one result line.
pub fn run_one(nodes: usize, keys: usize, big: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let before = rss_bytes();
        let cluster = DhtCluster::start(nodes, DhtOptions::default()).await?;
        cluster
            .advertise(|i| {
                let n = if i == 0 && big > 0 { big } else { keys };
                (0..n).map(|k| key(i, k)).collect()
            })
            .await?;
        let ready = cluster.wait_ready(Duration::from_secs(1800)).await?;
        let rss = rss_bytes().saturating_sub(before);
        eprintln!("  ready in {ready:.1?}; sampling lookups");
        let probe = SchedulingProbe::start();
        let mut latencies = Vec::new();
        let mut empty = 0usize;
        let owners: Vec<(usize, std::net::IpAddr)> =
            cluster.live().map(|(i, n)| (i, n.ip)).collect();
        for &(asker, _) in &owners {
            for &(owner, ip) in &owners {
                if owner == asker {
                    continue;
                }
                let n = if owner == 0 && big > 0 { big } else { keys };
                for i in (0..n).step_by((n / SAMPLE).max(1)).take(SAMPLE) {
                    match cluster
                        .lookup_first(asker, &key(owner, i), Duration::from_secs(10))
                        .await?
                    {
                        Some((p, took)) if p.addr.ip() == ip => latencies.push(took),
                        other => {
                            if empty < 5 {
                                eprintln!(
                                    "  node {asker}: key {i} of node {owner} ({ip}): {other:?}"
                                );
                            }
                            empty += 1
                        }
                    }
                }
            }
        }
        let late = probe.finish().await;
        latencies.sort();
        println!(
            "RESULT {nodes} {keys} {big} {} {} {} {} {} {} {} {} {} {} {}",
            ready.as_secs_f64(),
            cluster.advertise_failures(),
            latencies.len(),
            empty,
            quantile(&latencies, 0.5).as_secs_f64(),
            quantile(&latencies, 0.99).as_secs_f64(),
            quantile(&latencies, 0.999).as_secs_f64(),
            latencies.last().copied().unwrap_or_default().as_secs_f64(),
            quantile(&late, 0.99).as_secs_f64(),
            late.last().copied().unwrap_or_default().as_secs_f64(),
            rss as f64 / nodes as f64,
        );
        Ok(())
    })
}

fn ms(s: &str) -> String {
    let v: f64 = s.parse().unwrap_or(f64::NAN);
    if v < 0.001 {
        format!("{:.2} ms", v * 1e3)
    } else {
        format!("{:.1} ms", v * 1e3)
    }
}

/// Every scenario, each in a child process; returns the results table.
pub fn bench() -> Result<String> {
    let exe = std::env::current_exe()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| nodes | keys per node | ready (first round stored) | announcements retried | lookups | empty | p50 | p99 | p99.9 | max | 1 ms timer late p99 / max | RSS per node |"
    );
    let _ = writeln!(
        out,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let large = std::env::var_os("PM_DHT_LARGE").is_some_and(|v| v == "1");
    let runs = SCENARIOS
        .iter()
        .chain(large.then_some(&LARGE))
        .flat_map(|&(nodes, keys, big, runs)| std::iter::repeat_n((nodes, keys, big), runs));
    for (nodes, keys, big) in runs {
        println!(
            "  dht: {nodes} nodes × {keys} keys{}",
            if big > 0 {
                format!(", node 0 with {big}")
            } else {
                String::new()
            }
        );
        let output = Command::new(&exe)
            .args([
                "dht-run",
                &nodes.to_string(),
                &keys.to_string(),
                &big.to_string(),
            ])
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running a DHT scenario")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .with_context(|| {
                format!(
                    "scenario {nodes}×{keys} printed no result: {}",
                    output.status
                )
            })?;
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() == 14, "malformed result {line:?}");
        let keys_text = if big > 0 {
            format!("{keys} (node 0: {big})")
        } else {
            keys.to_string()
        };
        let ready: f64 = f[3].parse().unwrap_or(f64::NAN);
        let rss: f64 = f[13].parse().unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "| {nodes} | {keys_text} | {ready:.1} s | {} | {} | {} | {} | {} | {} | {} | {} / {} | {:.1} MiB |",
            f[4],
            f[5],
            f[6],
            ms(f[7]),
            ms(f[8]),
            ms(f[9]),
            ms(f[10]),
            ms(f[11]),
            ms(f[12]),
            rss / f64::from(1 << 20),
        );
        println!("{}", out.lines().last().unwrap_or_default());
    }
    Ok(out)
}
