//! mTLS on the registry port: only clients with a certificate from the
//! cluster CA get in; containerd pulls through it with the entries
//! `configure-containerd` writes; certificates rotate without dropping
//! transfers in flight; and two nodes mirror over it.
//!
//! containerd reads the client certificate from `hosts.toml` (`ca`,
//! `client`), never from ctr's `--tlscacert/--tlscert/--tlskey` flags: on
//! 1.x the resolver runs in ctr, on 2.x in the daemon's Transfer service
//! (where those flags would need `--local`), and `hosts.toml` is what both
//! read, as the CRI plugin does.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::World;
use peermirror_tests::pki::{self, Ca};
use peermirror_tests::process::{run, wait_for};
use peermirror_tests::services::{
    Containerd, ContainerdOptions, Peermirror, PeermirrorOptions, free_port, peermirror_bin,
    write_psk,
};
use sha2::{Digest as _, Sha256};

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn mtls_admits_only_the_cluster_and_rotates_without_dropping_transfers() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut world = World::new()?;
    let certs = world.path("certs");
    std::fs::create_dir_all(&certs)?;
    let ca = Ca::new("cluster CA")?;
    ca.write(&certs.join("ca.crt"))?;
    let node = ca.issue(&certs, "node", &[ip("127.0.0.1")])?;
    let (cert, key, ca_file) = (node.cert.clone(), node.key.clone(), certs.join("ca.crt"));
    let pm = Peermirror::start(
        &world.path("pm"),
        &world.containerd,
        &[
            "--tls-cert",
            &cert.to_string_lossy(),
            "--tls-key",
            &key.to_string_lossy(),
            "--tls-client-ca",
            &ca_file.to_string_lossy(),
        ],
    )?;
    let addr = pm.registry;
    let big = world
        .images
        .iter()
        .find(|i| i.tag == "v4")
        .context("big image")?
        .clone();
    let layer = big.biggest_layer().clone();
    let path = format!("/v2/{}/blobs/{}", big.repo, layer.digest);

    // A client with a certificate from the cluster CA.
    let good = pki::client_config(&ca.pem, Some(&node))?;
    let r = pki::get(addr, good.clone(), "/v2/")?;
    ensure!(r.status == 200);
    let r = pki::get(addr, good.clone(), &path)?;
    ensure!(
        r.status == 200 && sha256(&r.body) == layer.digest,
        "blob over TLS"
    );

    // Without a certificate, with one from another CA, or in plain HTTP:
    // refused.
    let anonymous = pki::client_config(&ca.pem, None)?;
    ensure!(
        pki::get(addr, anonymous, "/v2/").is_err(),
        "a client without certificate got in"
    );
    let other_ca = Ca::new("other CA")?;
    let stranger = other_ca.issue(&certs, "stranger", &[ip("127.0.0.1")])?;
    let intruder = pki::client_config(&ca.pem, Some(&stranger))?;
    ensure!(
        pki::get(addr, intruder, "/v2/").is_err(),
        "a certificate from another CA got in"
    );
    let plain = peermirror_tests::http::get(addr, "/v2/", &[]);
    ensure!(
        !matches!(plain, Ok(ref r) if r.status == 200),
        "plain HTTP got an answer"
    );
    ensure!(pm.metric("peermirror_tls_handshake_failures_total", &[])? >= 2.0);

    // Rotation: a transfer started with the old certificate finishes;
    // new connections get the new one.
    let mut slow = pki::connect(addr, good.clone())?;
    let old_cert = pki::server_cert(&slow).context("server certificate")?;
    ensure!(old_cert == node.der);
    slow.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut received = vec![0u8; 1 << 20];
    slow.read_exact(&mut received)?;
    let rotated = ca.issue(&certs, "node", &[ip("127.0.0.1")])?;
    ensure!(rotated.der != node.der);
    wait_for(
        "new connections to get the new certificate",
        Duration::from_secs(20),
        || {
            let s = pki::connect(addr, good.clone()).ok()?;
            (pki::server_cert(&s)? == rotated.der).then_some(())
        },
    )?;
    let mut rest = Vec::new();
    slow.read_to_end(&mut rest)?;
    received.extend_from_slice(&rest);
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no head")?
        + 4;
    ensure!(
        sha256(&received[head_end..]) == layer.digest,
        "the transfer in flight was damaged by the rotation"
    );

    // containerd pulls through it over mTLS, with the upstream registry
    // gone, using the entries configure-containerd writes.
    world.upstream.stop()?;
    let hosts = world.path("certs.d");
    std::fs::create_dir_all(hosts.join(world.upstream.host()))?;
    std::fs::write(
        hosts.join(world.upstream.host()).join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"push\"]\n",
            world.upstream.host(),
            world.upstream.host()
        ),
    )?;
    run(Command::new(peermirror_bin())
        .arg("configure-containerd")
        .arg("--containerd-registry-config-path")
        .arg(&hosts)
        .args(["--mirrored-registries", &world.upstream.host()])
        .args(["--mirror-targets", &format!("https://{addr}")])
        .arg("--mirror-tls-ca")
        .arg(&ca_file)
        .arg("--mirror-tls-cert")
        .arg(&cert)
        .arg("--mirror-tls-key")
        .arg(&key)
        .arg("--containerd-config")
        .arg(world.path("no-config.toml")))?;
    let node_b = Containerd::start(
        &world.path("node-b"),
        "default",
        ContainerdOptions::default(),
    )?;
    for image in &world.images {
        node_b
            .pull_via(&hosts, &world.upstream.reference(image))
            .with_context(|| format!("pulling {} over mTLS", image.tag))?;
    }
    ensure!(pm.metric("peermirror_served_bytes_total", &[])? > (64 << 20) as f64);
    // With mTLS on, the port is not called open.
    let log = std::fs::read_to_string(&pm.proc.log)?;
    ensure!(
        !log.contains("can read every image"),
        "open-port warning with mTLS on"
    );
    Ok(())
}

#[test]
fn two_nodes_mirror_over_mtls() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    let certs = world.path("certs");
    std::fs::create_dir_all(&certs)?;
    let ca = Ca::new("cluster CA")?;
    let ca_file = certs.join("ca.crt");
    ca.write(&ca_file)?;
    let port = free_port();
    let key_file = world.path("swarm.key");
    write_psk(&key_file, &[7; 32])?;
    let start = |name: &str,
                 ip_text: &str,
                 containerd: &Containerd,
                 bootstrap: Option<String>|
     -> Result<Peermirror> {
        let node_ip = ip(ip_text);
        let cert = ca.issue(&certs, name, &[node_ip, ip("127.0.0.1")])?;
        let mut extra: Vec<String> = [
            "--tls-cert",
            &cert.cert.to_string_lossy(),
            "--tls-key",
            &cert.key.to_string_lossy(),
            "--tls-client-ca",
            &ca_file.to_string_lossy(),
            "--psk-file",
            &key_file.to_string_lossy(),
            "--advertise-addr",
            ip_text,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(b) = bootstrap {
            extra.extend([
                "--bootstrap-kind".into(),
                "static".into(),
                "--static-bootstrap-peers".into(),
                b,
            ]);
        }
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut pm = Peermirror::spawn_with(
            &world.path(name),
            containerd,
            PeermirrorOptions {
                netns: None,
                registry: SocketAddr::new(node_ip, port),
                metrics: SocketAddr::new(node_ip, free_port()),
                router: SocketAddr::new(node_ip, free_port()),
                extra: &refs,
            },
        )?;
        pm.wait_ready(Duration::from_secs(30))?;
        Ok(pm)
    };
    let a = start("node-a", "127.0.0.2", &world.containerd, None)?;
    let empty = Containerd::start(
        &world.path("containerd-b"),
        "k8s.io",
        ContainerdOptions::default(),
    )?;
    let a_router = a.p2p_addr()?;
    let a_id = a.peer_id()?;
    let b = start(
        "node-b",
        "127.0.0.3",
        &empty,
        Some(format!("{}/p2p/{a_id}", a_router.trim())),
    )?;

    let image = world
        .images
        .iter()
        .find(|i| i.tag == "v2")
        .context("image")?;
    let layer = image.biggest_layer();
    a.wait_metric(
        "A to advertise",
        "peermirror_advertised_keys",
        &[],
        Duration::from_secs(30),
        |keys| keys > 5.0,
    )?;
    let client_cert = ca.issue(&certs, "client", &[ip("127.0.0.1")])?;
    let config = pki::client_config(&ca.pem, Some(&client_cert))?;
    let path = format!(
        "/v2/{}/blobs/{}?ns={}",
        image.repo,
        layer.digest,
        world.upstream.host()
    );
    // B may be ready a moment before its first DHT query can reach A (the
    // connection is up, the Kademlia stream not yet): a miss then is a
    // correct answer, so ask until the hit, within a few seconds.
    let r = wait_for(
        "B to relay the blob from A",
        Duration::from_secs(10),
        || {
            pki::get(b.registry, config.clone(), &path)
                .ok()
                .filter(|r| r.status == 200)
        },
    )?;
    ensure!(
        sha256(&r.body) == layer.digest,
        "B relayed {} bytes that are not the blob",
        r.body.len()
    );
    ensure!(b.metric("peermirror_mirror_requests_total", &["result=\"hit\""])? >= 1.0);
    ensure!(a.metric("peermirror_served_bytes_total", &["source=\"file\""])? >= layer.size as f64);
    ensure!(a.metric("peermirror_tls_handshake_failures_total", &[])? == 0.0);
    Ok(())
}
