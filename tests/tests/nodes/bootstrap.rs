//! HTTPS bootstrap through `peermirror bootstrapper`, with client
//! certificates rotated as a cluster CA is: nodes register and find each
//! other through it; the CA is rotated in two phases (both CAs trusted and
//! certificates re-issued, then only the new CA) while nothing restarts; a
//! node whose certificate comes from another CA is refused and says why.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::World;
use peermirror_tests::http;
use peermirror_tests::pki::{self, Ca, NodeCert};
use peermirror_tests::process::{Proc, wait_for};
use peermirror_tests::services::{Peermirror, free_port, peermirror_bin};

const LOCALHOST: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];

/// A certificate directory as a Kubernetes TLS secret is mounted.
struct SecretDir {
    dir: PathBuf,
}

impl SecretDir {
    fn new(root: &Path, name: &str) -> Result<SecretDir> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(SecretDir { dir })
    }

    /// Trusts these CAs (one `ca.crt` holding each), written by rename.
    fn trust(&self, cas: &[&Ca]) -> Result<()> {
        let pem: String = cas.iter().map(|c| c.pem.as_str()).collect();
        let tmp = self.dir.join("ca.crt.tmp");
        std::fs::write(&tmp, pem)?;
        std::fs::rename(&tmp, self.dir.join("ca.crt"))?;
        Ok(())
    }

    /// `tls.crt`/`tls.key` issued by `ca`.
    fn issue(&self, ca: &Ca) -> Result<NodeCert> {
        ca.issue(&self.dir, "tls", &LOCALHOST)
    }
}

struct Bootstrapper {
    proc: Proc,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Bootstrapper {
    fn start(dir: &Path, certs: &SecretDir) -> Result<Bootstrapper> {
        Self::start_with(dir, certs, "6s", &[])
    }

    fn start_with(
        dir: &Path,
        certs: &SecretDir,
        ttl: &str,
        extra: &[&str],
    ) -> Result<Bootstrapper> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(peermirror_bin());
        cmd.arg("bootstrapper")
            .args(["--addr", &addr.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .arg("--cert-dir")
            .arg(&certs.dir)
            .args(["--entry-ttl", ttl, "--log-level", "debug"])
            .args(extra);
        std::fs::create_dir_all(dir)?;
        let proc = Proc::spawn("bootstrapper", cmd, &dir.join("bootstrapper.log"))?;
        let b = Bootstrapper {
            proc,
            addr,
            metrics,
        };
        wait_for(
            "the bootstrapper to answer",
            Duration::from_secs(10),
            || {
                http::get(metrics, "/readyz", &[])
                    .ok()
                    .filter(|r| r.status == 200)
            },
        )?;
        Ok(b)
    }

    fn metric(&self, name: &str) -> Result<f64> {
        let r = http::get(self.metrics, "/metrics", &[])?;
        let text = String::from_utf8_lossy(&r.body);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .with_context(|| format!("no {name} in the bootstrapper's metrics"))
    }

    /// Waits until `count` more registrations than `since` were accepted.
    fn wait_registrations(&self, since: f64, count: f64, what: &str) -> Result<f64> {
        wait_for(what, Duration::from_secs(20), || {
            self.metric("peermirror_bootstrapper_registrations_total")
                .ok()
                .filter(|n| *n >= since + count)
        })
        .with_context(|| self.proc.log_tail(20))
    }

    /// The peer ids listed, fetched with a client trusting `ca` and
    /// presenting `client`.
    fn listed(&self, ca: &Ca, client: &NodeCert) -> Result<Vec<String>> {
        let r = pki::get(
            self.addr,
            pki::client_config(&ca.pem, Some(client))?,
            "/bootstrap-nodes",
        )?;
        ensure!(r.status == 200, "GET /bootstrap-nodes: {}", r.status);
        let doc: Vec<serde_json::Value> = serde_json::from_slice(&r.body)?;
        Ok(doc
            .iter()
            .filter_map(|e| e["ID"].as_str().map(str::to_string))
            .collect())
    }
}

fn node(
    world: &World,
    name: &str,
    bootstrapper: &Bootstrapper,
    certs: &SecretDir,
) -> Result<Peermirror> {
    let url = format!(
        "https://127.0.0.1:{}/bootstrap-nodes",
        bootstrapper.addr.port()
    );
    let dir = certs.dir.to_string_lossy().into_owned();
    Peermirror::spawn(
        &world.path(name),
        &world.containerd,
        &[
            "--bootstrap-kind",
            "http",
            "--http-bootstrap-url",
            &url,
            "--http-bootstrap-cert-dir",
            &dir,
            "--http-bootstrap-register",
            "--advertise-addr",
            "127.0.0.1",
            "--log-level",
            "info,peermirror::routing::bootstrap=debug",
        ],
    )
}

#[test]
fn nodes_bootstrap_over_mtls_through_a_ca_rotation() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    let root = world.path("pki");
    let (ca1, ca2, ca3) = (
        Ca::new("cluster CA 1")?,
        Ca::new("cluster CA 2")?,
        Ca::new("another CA")?,
    );
    let seed = SecretDir::new(&root, "bootstrapper")?;
    let n1 = SecretDir::new(&root, "node-1")?;
    let n2 = SecretDir::new(&root, "node-2")?;
    for d in [&seed, &n1, &n2] {
        d.trust(&[&ca1])?;
        d.issue(&ca1)?;
    }
    std::fs::create_dir_all(world.path("seed"))?;
    let bootstrapper = Bootstrapper::start(&world.path("seed"), &seed)?;
    let (pid_b, since) = (bootstrapper.proc.pid(), 0.0);

    // Two nodes find each other through it.
    let mut a = node(&world, "a", &bootstrapper, &n1)?;
    let mut b = node(&world, "b", &bootstrapper, &n2)?;
    a.wait_ready(Duration::from_secs(30))?;
    b.wait_ready(Duration::from_secs(30))?;
    let (id_a, id_b) = (a.peer_id()?, b.peer_id()?);
    let probe_ca1 = SecretDir::new(&root, "probe-1")?.issue(&ca1)?;
    let mut expected = vec![id_a.clone(), id_b.clone()];
    expected.sort();
    // A node may be ready (it found the other) a moment before its own
    // first registration.
    wait_for("both nodes to be listed", Duration::from_secs(10), || {
        let mut listed = bootstrapper.listed(&ca1, &probe_ca1).ok()?;
        listed.sort();
        (listed == expected).then_some(())
    })?;
    let n = bootstrapper.wait_registrations(since, 4.0, "renewals")?;
    println!("bootstrap: both nodes registered and found each other ({n} registrations)");

    // Phase 1: every party trusts both CAs, then gets a certificate from
    // the new one. Nothing restarts.
    for d in [&seed, &n1, &n2] {
        d.trust(&[&ca1, &ca2])?;
    }
    std::thread::sleep(Duration::from_millis(500));
    for d in [&seed, &n1, &n2] {
        d.issue(&ca2)?;
    }
    let probe_ca2 = SecretDir::new(&root, "probe-2")?.issue(&ca2)?;
    // The bootstrapper serves its new certificate: a client that trusts
    // only the new CA is answered.
    wait_for(
        "the bootstrapper to present its new certificate",
        Duration::from_secs(20),
        || bootstrapper.listed(&ca2, &probe_ca2).ok(),
    )?;
    let n = bootstrapper.wait_registrations(n, 4.0, "renewals during phase 1")?;

    // Phase 2: only the new CA. The nodes' renewals go on, with the new
    // certificates; a client with an old one is refused.
    for d in [&seed, &n1, &n2] {
        d.trust(&[&ca2])?;
    }
    let refused_before =
        bootstrapper.metric("peermirror_bootstrapper_tls_handshake_failures_total")?;
    wait_for(
        "the bootstrapper to refuse the old CA",
        Duration::from_secs(20),
        || bootstrapper.listed(&ca2, &probe_ca1).is_err().then_some(()),
    )?;
    let n = bootstrapper.wait_registrations(n, 4.0, "renewals after the old CA is gone")?;
    let refused_after =
        bootstrapper.metric("peermirror_bootstrapper_tls_handshake_failures_total")?;
    ensure!(
        refused_after > refused_before,
        "the old-CA client was not counted as refused"
    );
    let mut listed = bootstrapper.listed(&ca2, &probe_ca2)?;
    listed.sort();
    ensure!(listed == expected, "after the rotation: listed {listed:?}");
    ensure!(a.proc.alive() && b.proc.alive() && bootstrapper.proc.pid() == pid_b);
    ensure!(
        !a.proc.log_tail(400).contains("do not load"),
        "node a could not load its certificates"
    );
    println!("bootstrap: CA rotated in two phases without a restart ({n} registrations)");

    // A node joining now, with a new-CA certificate, finds the others.
    let n4 = SecretDir::new(&root, "node-4")?;
    n4.trust(&[&ca2])?;
    n4.issue(&ca2)?;
    let mut d = node(&world, "d", &bootstrapper, &n4)?;
    d.wait_ready(Duration::from_secs(30))?;

    // A node with a certificate from another CA: refused, and it says why.
    let n3 = SecretDir::new(&root, "node-3")?;
    n3.trust(&[&ca2])?;
    n3.issue(&ca3)?;
    let stranger = node(&world, "stranger", &bootstrapper, &n3)?;
    let ready = wait_for(
        "the stranger to say why it has no peer",
        Duration::from_secs(30),
        || {
            stranger
                .via
                .get(stranger.metrics, "/readyz", &[])
                .ok()
                .filter(|r| String::from_utf8_lossy(&r.body).contains("bootstrap source"))
        },
    )?;
    let why = String::from_utf8_lossy(&ready.body).into_owned();
    ensure!(ready.status == 503, "the stranger is ready: {why}");
    ensure!(
        why.contains("TLS") || why.contains("certificate") || why.contains("alert"),
        "the reason does not name the TLS refusal: {why}"
    );
    let log = stranger.proc.log_tail(200);
    ensure!(
        log.contains("bootstrap failed"),
        "the stranger's log says nothing:\n{log}"
    );
    let stranger_id = stranger.peer_id()?;
    ensure!(
        !bootstrapper
            .listed(&ca2, &probe_ca2)?
            .contains(&stranger_id)
    );
    let reason = why
        .lines()
        .find(|l| l.contains("bootstrap source"))
        .unwrap_or_default();
    println!(
        "bootstrap: a node from another CA is refused: {}",
        reason.trim()
    );
    drop(d.proc.terminate(Duration::from_secs(10)));
    Ok(())
}

/// Registers `count` made-up peers with one certificate, each with 16
/// addresses of about 100 bytes (together more than the 1 MiB nodes read);
/// every registration is accepted.
fn register_junk(
    bootstrapper: &Bootstrapper,
    ca: &Ca,
    cert: &NodeCert,
    count: usize,
) -> Result<()> {
    let requests = (0..count).map(|i| {
        let id = libp2p_peer_id();
        let addrs: Vec<String> = (0..16)
            .map(|j| {
                format!(
                    "/ip4/127.66.{}.{}/tcp/{}/p2p/{id}",
                    i / 250,
                    i % 250,
                    40000 + j
                )
            })
            .collect();
        (
            format!("/bootstrap-nodes/{id}"),
            serde_json::json!({ "ID": id, "Addrs": addrs })
                .to_string()
                .into_bytes(),
        )
    });
    let started = std::time::Instant::now();
    let statuses = pki::put_all(
        bootstrapper.addr,
        pki::client_config(&ca.pem, Some(cert))?,
        requests,
    )?;
    println!(
        "bootstrap: {count} junk registrations took {:.1?}",
        started.elapsed()
    );
    ensure!(
        statuses.iter().all(|s| *s == 200),
        "junk registrations refused: {:?}",
        statuses
            .iter()
            .filter(|s| **s != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// A made-up peer id (of a fresh ed25519 key).
fn libp2p_peer_id() -> String {
    libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string()
}

/// A holder of one client certificate cannot crowd the real nodes out of
/// the bootstrap document: by default its registrations replace each other,
/// and where nodes share a certificate (so its cap is raised) the document
/// is trimmed to what nodes read, newest first, and nodes dial the entries
/// in a random order.
#[test]
fn junk_registrations_cannot_crowd_out_the_real_nodes() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    const JUNK: usize = 800;
    let world = World::new()?;
    let root = world.path("pki");
    let ca = Ca::new("cluster CA")?;
    let seed = SecretDir::new(&root, "bootstrapper")?;
    let junk = SecretDir::new(&root, "junk")?;
    let n1 = SecretDir::new(&root, "node-1")?;
    let n2 = SecretDir::new(&root, "node-2")?;
    for d in [&seed, &junk, &n1, &n2] {
        d.trust(&[&ca])?;
    }
    seed.issue(&ca)?;
    let junk_cert = junk.issue(&ca)?;
    n1.issue(&ca)?;
    n2.issue(&ca)?;
    let probe = SecretDir::new(&root, "probe")?.issue(&ca)?;

    // One certificate, one entry (the default): each registration replaced
    // the one before. Entries live 10 minutes: the junk is not renewed.
    let one = Bootstrapper::start_with(&world.path("seed-1"), &seed, "10m", &[])?;
    register_junk(&one, &ca, &junk_cert, JUNK)?;
    let listed = one.listed(&ca, &probe)?;
    ensure!(
        listed.len() == 1,
        "one certificate holds {} entries",
        listed.len()
    );
    let replaced = one.metric("peermirror_bootstrapper_replaced_entries_total")?;
    ensure!(replaced == (JUNK - 1) as f64, "{replaced} entries replaced");
    println!("bootstrap: {JUNK} registrations with one certificate left 1 entry");
    drop(one);

    // A certificate shared by the nodes (its cap raised): the junk would
    // make a document of more than 1 MiB.
    let shared = Bootstrapper::start_with(
        &world.path("seed-2"),
        &seed,
        "10m",
        &["--max-entries-per-certificate", "10000"],
    )?;
    register_junk(&shared, &ca, &junk_cert, JUNK)?;
    let r = pki::get(
        shared.addr,
        pki::client_config(&ca.pem, Some(&probe))?,
        "/bootstrap-nodes",
    )?;
    ensure!(r.status == 200, "GET /bootstrap-nodes: {}", r.status);
    ensure!(
        r.body.len() <= 1 << 20,
        "a document of {} bytes, more than nodes read",
        r.body.len()
    );
    let served: Vec<serde_json::Value> = serde_json::from_slice(&r.body)?;
    ensure!(
        served.len() < JUNK,
        "nothing trimmed: {} entries",
        served.len()
    );
    // Two real nodes register after the junk and find each other.
    let mut a = node(&world, "a", &shared, &n1)?;
    let mut b = node(&world, "b", &shared, &n2)?;
    a.wait_ready(Duration::from_secs(60))
        .with_context(|| a.proc.log_tail(30))?;
    b.wait_ready(Duration::from_secs(60))
        .with_context(|| b.proc.log_tail(30))?;
    // A node can be ready (its peer dialled it) before its own
    // registration went through: wait until both are listed.
    let (id_a, id_b) = (a.peer_id()?, b.peer_id()?);
    let listed = wait_for("a and b to be registered", Duration::from_secs(30), || {
        let listed = shared.listed(&ca, &probe).ok()?;
        (listed.contains(&id_a) && listed.contains(&id_b)).then_some(listed)
    })?;
    let first: Vec<&String> = listed.iter().take(2).collect();
    ensure!(
        first.contains(&&id_a) && first.contains(&&id_b),
        "the real nodes are not listed first: {first:?}"
    );
    println!(
        "bootstrap: {JUNK} junk entries under a shared certificate: {} of {} bytes served, the real nodes found each other",
        served.len(),
        r.body.len()
    );
    Ok(())
}
