//! Readiness follows what the bootstrap source says: a node whose source
//! answers and names no other node is a single-node cluster and ready; a
//! node whose source names nodes it cannot reach, or whose source fails, is
//! not, and says why; a node that joins later finds the first. The gauges
//! the no-peers alert reads tell these apart.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use peermirror_tests::World;
use peermirror_tests::process::wait_for;
use peermirror_tests::services::{Peermirror, PeermirrorOptions, free_port};

/// A daemon on loopback whose P2P port is `router`, with `extra` flags.
fn spawn(world: &World, name: &str, router: u16, extra: &[&str]) -> Result<Peermirror> {
    Peermirror::spawn_with(
        &world.path(name),
        &world.containerd,
        PeermirrorOptions {
            router: SocketAddr::from(([127, 0, 0, 1], router)),
            ..PeermirrorOptions::loopback(extra)
        },
    )
}

/// `/readyz`'s status and body.
fn readyz(pm: &Peermirror) -> Result<(u16, String)> {
    let r = pm.via.get(pm.metrics, "/readyz", &[])?;
    Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

/// The node stays not ready for `hold`, and its `/readyz` then says `why`.
fn stays_not_ready(pm: &Peermirror, hold: Duration, why: &str) -> Result<String> {
    wait_for("the status port", Duration::from_secs(10), || {
        readyz(pm).ok()
    })?;
    let until = std::time::Instant::now() + hold;
    while std::time::Instant::now() < until {
        let (status, body) = readyz(pm)?;
        ensure!(status == 503, "ready although: {why}\n{body}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, body) = readyz(pm)?;
    ensure!(body.contains(why), "/readyz does not say {why:?}:\n{body}");
    Ok(body)
}

#[test]
fn a_single_node_is_ready_a_partitioned_one_is_not_and_a_later_node_joins() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;

    // A static source that names only this node (as a headless Service
    // names every node, this one too): a single-node cluster.
    let a_port = free_port();
    let a_self = format!("/ip4/127.0.0.1/tcp/{a_port}");
    let mut a = spawn(
        &world,
        "a",
        a_port,
        &[
            "--bootstrap-kind",
            "static",
            "--static-bootstrap-peers",
            &a_self,
        ],
    )?;
    a.wait_ready(Duration::from_secs(30))?;
    ensure!(a.metric("peermirror_bootstrap_source_nodes", &[])? == 0.0);
    ensure!(a.metric("peermirror_bootstrap_source_up", &[])? == 1.0);
    ensure!(a.metric("peermirror_p2p_connected_peers", &[])? == 0.0);

    // A source that names another node nobody answers at: partitioned.
    let dead = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let p_port = free_port();
    let p_self = format!("/ip4/127.0.0.1/tcp/{p_port}");
    let p_peers = format!("{p_self},{dead}");
    let p = spawn(
        &world,
        "partitioned",
        p_port,
        &[
            "--bootstrap-kind",
            "static",
            "--static-bootstrap-peers",
            &p_peers,
        ],
    )?;
    stays_not_ready(
        &p,
        Duration::from_secs(8),
        "it named 1 other node, none reachable yet",
    )?;
    ensure!(p.metric("peermirror_bootstrap_source_nodes", &[])? == 1.0);
    ensure!(p.metric("peermirror_bootstrap_source_up", &[])? == 1.0);

    // A source that fails (a name that does not resolve).
    let f = spawn(
        &world,
        "failing",
        free_port(),
        &[
            "--bootstrap-kind",
            "dns",
            "--dns-bootstrap-domain",
            "no-such-node.invalid",
        ],
    )?;
    stays_not_ready(&f, Duration::from_secs(8), "no-such-node.invalid")?;
    ensure!(f.metric("peermirror_bootstrap_source_up", &[])? == 0.0);

    // A second node joins later, its source naming both: it finds the first,
    // and the first (still ready) has it in its routing table.
    let b_port = free_port();
    let b_peers = format!("/ip4/127.0.0.1/tcp/{b_port},{a_self}");
    let mut b = spawn(
        &world,
        "b",
        b_port,
        &[
            "--bootstrap-kind",
            "static",
            "--static-bootstrap-peers",
            &b_peers,
        ],
    )?;
    b.wait_ready(Duration::from_secs(30))?;
    ensure!(b.metric("peermirror_bootstrap_source_nodes", &[])? == 1.0);
    a.wait_metric(
        "the first node to see the second",
        "peermirror_p2p_routing_table_peers",
        &[],
        Duration::from_secs(30),
        |v| v >= 1.0,
    )?;
    ensure!(readyz(&a)?.0 == 200, "the first node lost its readiness");
    let _ = wait_for("b's peer", Duration::from_secs(10), || {
        b.metric("peermirror_p2p_connected_peers", &[])
            .ok()
            .filter(|v| *v >= 1.0)
    })?;
    Ok(())
}
