//! Relays for the node's own clients share a bounded memory. Nodes a and b
//! hold a 64 MiB layer; nine clients on node c (loopback: they take no
//! upload permit) read its first 9 MiB through c and then stop reading.
//! Each relay from both holders would hold up to `(peers + 1) × 4 MiB` of
//! segments ahead of its client; together they stay within
//! `--mirror-relay-memory`, and the others stay on one holder.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use peermirror_tests::cluster::{Cluster, NodeSpec, REGISTRY_PORT};
use peermirror_tests::image::layer;
use peermirror_tests::process::wait_for;

const KEY: [u8; 32] = [0x78; 32];
const READERS: usize = 9;
const READ_FIRST: usize = 9 << 20;

/// Sends `GET path` and reads the head and the first `READ_FIRST` bytes
/// of the body; the connection stays open, unread.
fn read_start(
    via: &peermirror_tests::http::Via,
    addr: SocketAddr,
    path: &str,
) -> Result<TcpStream> {
    let mut s = via.connect(addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let body_start = loop {
        let n = s.read(&mut buf)?;
        ensure!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            ensure!(
                seen.starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&seen[..end])
            );
            break end + 4;
        }
    };
    let mut body = seen.len() - body_start;
    while body < READ_FIRST {
        let n = s.read(&mut buf)?;
        ensure!(n > 0, "the body ended at {body} bytes");
        body += n;
    }
    Ok(s)
}

#[test]
fn slow_local_readers_of_large_blobs_hold_a_bounded_memory() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let spec = |name| NodeSpec::new(name, KEY, &["--mirror-resolve-timeout", "2s"]);
    let mut cluster = Cluster::start(&[spec("a"), spec("b"), spec("c")])?;
    cluster.wait_ready(&["a", "b", "c"], Duration::from_secs(60))?;
    let image = cluster
        .layout
        .add_image("relays/big", "1", &[layer(64 << 20, false)])?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = cluster.upstream.reference(&image);
    for name in ["a", "b"] {
        let node = cluster.node(name);
        node.ctr_pull(&reference)?;
        node.wait_announced(image.blobs.len(), Duration::from_secs(60))?;
    }
    let c = cluster.node("c");
    let path = format!(
        "/v2/{}/blobs/{}?ns={}",
        image.repo,
        image.biggest_layer().digest,
        cluster.upstream.host()
    );
    let via = c.host.ns.via();
    let local = SocketAddr::from(([127, 0, 0, 1], REGISTRY_PORT));
    let before = c.pm().proc.rss();
    let readers = (0..READERS)
        .map(|_| read_start(&via, local, &path))
        .collect::<Result<Vec<_>>>()?;
    // The relays fill what they may hold ahead of their stopped clients.
    std::thread::sleep(Duration::from_secs(3));
    let grown = c.pm().proc.rss().saturating_sub(before);
    drop(readers);
    // Each relay is recorded when its client has gone: a relay that went
    // to both holders names both.
    let layer = image.biggest_layer().digest.clone();
    let pm = c.pm();
    let records = wait_for(
        "c to record the nine relays",
        Duration::from_secs(20),
        || {
            let of_layer: Vec<serde_json::Value> = pm
                .recent_requests()
                .ok()?
                .into_iter()
                .filter(|r| r["key"] == layer.as_str())
                .collect();
            (of_layer.len() >= READERS).then_some(of_layer)
        },
    )?;
    let parallel = records
        .iter()
        .filter(|r| r["peers"].as_array().map_or(0, Vec::len) >= 2)
        .count();
    println!(
        "relays: of {READERS} stopped readers' relays, {parallel} from both holders; c's RSS grew {} MiB",
        grown >> 20
    );
    // 64 MiB holds three relays' windows of (4 + 1) × 4 MiB; without the
    // bound every relay goes to both holders.
    ensure!(
        (1..=3).contains(&parallel),
        "{parallel} of {READERS} relays went to both holders: {records:#?}"
    );
    ensure!(
        grown < 160 << 20,
        "{READERS} stopped readers grew c's RSS by {} MiB",
        grown >> 20
    );
    Ok(())
}
