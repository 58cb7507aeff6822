//! The serving paths (io_uring, sendfile, buffered) under many concurrent
//! clients, keep-alive, HEAD, `Connection: close`, clients that stop reading
//! and clients that leave mid-body: every byte right, and nothing leaks
//! (descriptors, pipes, io_uring transfers, connections).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use peermirror_tests::World;
use peermirror_tests::http::read_response;
use peermirror_tests::services::Peermirror;
use sha2::{Digest as _, Sha256};

/// Open descriptors of a process, and how many of them are pipes.
fn fds(pid: u32) -> Result<(usize, usize)> {
    let mut total = 0;
    let mut pipes = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let target = std::fs::read_link(entry?.path()).unwrap_or_default();
        total += 1;
        if target.to_string_lossy().starts_with("pipe:") {
            pipes += 1;
        }
    }
    Ok((total, pipes))
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Downloads `path` twice over one keep-alive connection, with a HEAD in
/// between, and checks the bytes.
fn keep_alive_client(addr: SocketAddr, path: &str, digest: &str) -> Result<()> {
    let mut conn = connect(addr)?;
    let mut buffer = Vec::new();
    for round in 0..2 {
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
        let r = read_response(&mut conn, false, &mut buffer)?;
        ensure!(r.status == 200, "round {round}: {}", r.status);
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&r.body)));
        ensure!(got == digest, "round {round}: wrong bytes");
        if round == 0 {
            conn.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
            let h = read_response(&mut conn, true, &mut buffer)?;
            ensure!(h.status == 200 && h.body.is_empty());
        }
    }
    Ok(())
}

/// Sends a request and never reads the answer; returns the connection so
/// that it stays open.
fn stalled_client(addr: SocketAddr, path: &str) -> Result<TcpStream> {
    let mut conn = connect(addr)?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    Ok(conn)
}

/// Reads about a megabyte, then hangs up.
fn leaving_client(addr: SocketAddr, path: &str) -> Result<()> {
    let mut conn = connect(addr)?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut got = 0;
    let mut buf = vec![0u8; 64 << 10];
    while got < (1 << 20) {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            bail!("closed before a megabyte");
        }
        got += n;
    }
    Ok(())
}

/// A blob and where it is served.
struct Blob {
    path: String,
    digest: String,
}

fn wave(pm: &Peermirror, big: &Blob, small: &Blob) -> Result<()> {
    let addr = pm.registry;
    let path = big.path.as_str();
    // Clients that stop reading (a 64 MiB body does not fit in the socket
    // buffers): held open while everything else runs.
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| stalled_client(addr, path))
        .collect::<Result<_>>()?;
    let mut handles = Vec::new();
    for i in 0..24 {
        // Most clients fetch a 2 MiB blob twice on a keep-alive connection;
        // some the 64 MiB one; some leave after a megabyte of it.
        let (blob_path, digest) = match i % 6 {
            0 | 1 => (big.path.clone(), big.digest.clone()),
            _ => (small.path.clone(), small.digest.clone()),
        };
        handles.push(std::thread::spawn(move || -> Result<()> {
            if i % 6 == 0 {
                leaving_client(addr, &blob_path)
            } else {
                keep_alive_client(addr, &blob_path, &digest)
            }
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    // `Connection: close` is honoured.
    let mut conn = connect(addr)?;
    conn.write_all(format!("HEAD {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)?;
    ensure!(String::from_utf8_lossy(&rest).contains("connection: close"));
    // The stalled clients are cut off by the write timeout (1 s here).
    let started = Instant::now();
    pm.wait_metric(
        "the stalled connections to be closed",
        "peermirror_registry_connections",
        &[],
        Duration::from_secs(15),
        |connections| connections == 0.0,
    )?;
    ensure!(started.elapsed() < Duration::from_secs(10));
    drop(stalled);
    ensure!(
        pm.metric("peermirror_uring_transfers_in_flight", &[])? == 0.0,
        "io_uring transfers left behind"
    );
    Ok(())
}

#[test]
fn every_serving_path_survives_hostile_clients_without_leaking() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    let image = world
        .images
        .iter()
        .find(|i| i.tag == "v4")
        .context("big image")?;
    let layer = image.biggest_layer();
    let big = Blob {
        path: format!("/v2/{}/blobs/{}", image.repo, layer.digest),
        digest: layer.digest.clone(),
    };
    let multi = world
        .images
        .iter()
        .find(|i| i.tag == "v2")
        .context("multi-layer image")?;
    let small_layer = multi.biggest_layer();
    let small = Blob {
        path: format!("/v2/{}/blobs/{}", multi.repo, small_layer.digest),
        digest: small_layer.digest.clone(),
    };
    for serving_path in ["io-uring", "sendfile", "buffered"] {
        let pm = Peermirror::start(
            &world.path(&format!("pm-{serving_path}")),
            &world.containerd,
            &[
                "--serving-path",
                serving_path,
                "--write-timeout",
                "1s",
                "--log-level",
                "info",
            ],
        )?;
        let label = serving_path.replace('-', "_");
        ensure!(
            pm.metric("peermirror_serving_path", &[&format!("path=\"{label}\"")])? == 1.0,
            "{serving_path} is not the path in use"
        );
        // Pipes the io_uring path keeps for reuse are not a leak: the pool
        // may grow while a later wave reaches more concurrency, up to its
        // bound. Everything else must come back to where it started. A
        // connection just answered (a metrics scrape) may take a moment to
        // close, so each count is the lowest seen over a short wait.
        let settled = |pm: &Peermirror| -> Result<(usize, usize)> {
            let (total, pipes) = fds(pm.proc.pid())?;
            let pooled = 2 * pm.metric("peermirror_uring_idle_pipes", &[])? as usize;
            ensure!(pooled <= 64, "{serving_path}: pipe pool over its bound");
            Ok((total - pooled, pipes - pooled))
        };
        let lowest = |pm: &Peermirror, bound: Option<(usize, usize)>| -> Result<(usize, usize)> {
            let mut low = settled(pm)?;
            let until = Instant::now() + Duration::from_secs(if bound.is_some() { 5 } else { 1 });
            while Instant::now() < until && bound.is_none_or(|b| low.0 > b.0 || low.1 > b.1) {
                std::thread::sleep(Duration::from_millis(100));
                let now = settled(pm)?;
                low = (low.0.min(now.0), low.1.min(now.1));
            }
            Ok(low)
        };
        let before = lowest(&pm, None)?;
        for round in ["first", "second"] {
            wave(&pm, &big, &small).with_context(|| format!("{round} wave, {serving_path}"))?;
            let after = lowest(&pm, Some(before))?;
            ensure!(
                after.0 <= before.0 && after.1 <= before.1,
                "{serving_path}: after the {round} wave, descriptors (less pooled pipes) went from {before:?} to {after:?} (total, pipes)"
            );
        }
        println!(
            "{serving_path}: descriptors less pooled pipes {before:?} before and after both waves; pooled pipes {}",
            pm.metric("peermirror_uring_idle_pipes", &[])?
        );
    }
    Ok(())
}
