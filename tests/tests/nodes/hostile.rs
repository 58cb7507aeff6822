//! A node under attack by hosts with the key or without it: a PSK peer
//! flooding the DHT record store, a flood of connections to every port,
//! status clients that never read. Each must cost a bounded amount and
//! leave the node doing its job.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use libp2p::kad::{self, Quorum, Record, RecordKey};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, identity};
use peermirror_tests::World;
use peermirror_tests::image::layer;
use peermirror_tests::process::wait_for;
use peermirror_tests::services::Peermirror;

/// The key `Peermirror::start` gives a daemon when the test names none.
const DEFAULT_KEY: [u8; 32] = [0x5a; 32];

#[derive(NetworkBehaviour)]
struct Flooder {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: libp2p::identify::Behaviour,
}

/// A libp2p node with the network's key that does nothing but store
/// records on others.
fn flooder(psk: [u8; 32]) -> Result<libp2p::Swarm<Flooder>> {
    let key = identity::Keypair::generate_ed25519();
    let id = key.public().to_peer_id();
    let transport = peermirror_tests::dht::keyed_transport(&key, psk)?;
    let store = kad::store::MemoryStore::with_config(
        id,
        kad::store::MemoryStoreConfig {
            max_records: 1 << 20,
            max_provided_keys: 1 << 20,
            max_value_bytes: 1 << 20,
            ..Default::default()
        },
    );
    let mut config = kad::Config::new(StreamProtocol::new("/spegel/kad/1.0.0"));
    config.set_query_timeout(Duration::from_secs(5));
    let mut kad = kad::Behaviour::with_config(id, store, config);
    kad.set_mode(Some(kad::Mode::Server));
    let identify = libp2p::identify::Behaviour::new(libp2p::identify::Config::new(
        "/ipfs/id/1.0.0".into(),
        key.public(),
    ));
    let mut swarm = libp2p::Swarm::new(
        transport,
        Flooder { kad, identify },
        id,
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(60)),
    );
    // It listens like a node, so the daemon puts it in its routing table
    // (and announces to it) ...
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"))?;
    // ... and fifty made-up addresses ride along in every ADD_PROVIDER.
    for i in 0..50u8 {
        swarm.add_external_address(
            format!("/ip4/10.{i}.{i}.{i}/tcp/5001")
                .parse()
                .expect("multiaddr"),
        );
    }
    Ok(swarm)
}

/// ADD_PROVIDER messages of the flood: with fifty addresses each, stored
/// unbounded they would cost the node well over the 64 MiB allowed.
const FLOOD_PROVIDERS: u64 = 15_000;
/// The most the flood may take.
const FLOOD_LIMIT: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_key_cannot_exhaust_the_record_store() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut world = tokio::task::block_in_place(World::new)?;
    let pm = Peermirror::start(
        &world.path("pm"),
        &world.containerd,
        &["--reannounce-interval", "30s"],
    )?;
    let daemon: PeerId = pm.peer_id()?.parse()?;
    let addr: Multiaddr = pm.p2p_addr()?.parse()?;
    let mut swarm = flooder(DEFAULT_KEY)?;
    swarm.behaviour_mut().kad.add_address(&daemon, addr.clone());
    swarm.dial(addr.clone().with(libp2p::multiaddr::Protocol::P2p(daemon)))?;
    let rss_before = pm.proc.rss();

    // Flood with a fixed count: ADD_PROVIDER for random keys (with fifty
    // addresses each), and beside them, eight at a time, PUT_VALUE records
    // of 15 KiB (which the node never stores), however long the
    // machine takes (bounded: a node that cannot take them in two minutes
    // is starved, which fails the test too).
    let started = Instant::now();
    let (mut providing, mut putting, mut sent_providers, mut sent_values) = (0, 0, 0u64, 0u64);
    while sent_providers < FLOOD_PROVIDERS || providing > 0 {
        ensure!(
            started.elapsed() < FLOOD_LIMIT,
            "the node took only {sent_providers} of {FLOOD_PROVIDERS} ADD_PROVIDER in {FLOOD_LIMIT:?}"
        );
        while providing < 128 && sent_providers < FLOOD_PROVIDERS {
            let key = RecordKey::new(&rand::random::<[u8; 32]>());
            if swarm.behaviour_mut().kad.start_providing(key).is_ok() {
                providing += 1;
                sent_providers += 1;
            }
        }
        while putting < 8 && sent_providers < FLOOD_PROVIDERS {
            let record = Record::new(
                RecordKey::new(&rand::random::<[u8; 32]>()),
                vec![0x77; 15 << 10],
            );
            if swarm
                .behaviour_mut()
                .kad
                .put_record(record, Quorum::One)
                .is_ok()
            {
                putting += 1;
                sent_values += 1;
            }
        }
        let event = tokio::time::timeout(Duration::from_secs(1), swarm.select_next_some()).await;
        if let Ok(SwarmEvent::Behaviour(FlooderEvent::Kad(kad::Event::OutboundQueryProgressed {
            result,
            ..
        }))) = event
        {
            match result {
                kad::QueryResult::StartProviding(_) => providing -= 1,
                kad::QueryResult::PutRecord(_) => putting -= 1,
                _ => {}
            }
        }
    }
    let grown = pm.proc.rss().saturating_sub(rss_before);
    println!(
        "flood: {sent_providers} ADD_PROVIDER and {sent_values} PUT_VALUE (15 KiB) in {:?}; the node's RSS grew by {} MiB",
        started.elapsed(),
        grown >> 20
    );
    ensure!(
        grown <= 64 << 20,
        "the node's RSS grew by {} MiB",
        grown >> 20
    );

    // The node keeps announcing: a new image is announced, stored (on the
    // flooder, its only peer, which keeps being polled so that it answers),
    // and found — by the flooder itself.
    let keys_before = pm.metric("peermirror_advertised_keys", &[])?;
    let l = &mut world.layout;
    let fresh = l.add_image("hostile/fresh", "after-flood", &[layer(100_000, true)])?;
    l.finish()?;
    world.upstream.push(&world.layout, &fresh)?;
    world.containerd.pull(&world.upstream.reference(&fresh))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let advertised = pm.metric("peermirror_advertised_keys", &[])?;
        let pending = pm.metric("peermirror_advertise_pending_keys", &[])?;
        // The tag, the manifest, the config and the layer.
        if advertised >= keys_before + 4.0 && pending == 0.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the new image's keys were not stored within 60 s ({advertised} advertised, {pending} pending)\n{}",
            pm.proc.log_tail(40)
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                swarm.select_next_some().await;
            }
        })
        .await;
    }
    let key = RecordKey::new(&peermirror_routing::record_key(&fresh.root.digest));
    swarm.behaviour_mut().kad.get_providers(key);
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let ev = swarm.select_next_some().await;
            if let SwarmEvent::Behaviour(FlooderEvent::Kad(kad::Event::OutboundQueryProgressed {
                result:
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })),
                ..
            })) = ev
                && providers.contains(&daemon)
            {
                return;
            }
        }
    })
    .await;
    ensure!(
        found.is_ok(),
        "the node's new content was not found after the flood"
    );
    Ok(())
}

/// Connections that are opened and never used, and clients that ask for a
/// large response and never read it: beyond the caps they are refused, and
/// the ones admitted are cut off in time; the node answers throughout and
/// gets its descriptors back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_floods_and_silent_clients_are_bounded() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = tokio::task::block_in_place(World::new)?;
    let pm = Peermirror::start(
        &world.path("pm"),
        &world.containerd,
        &["--max-connections", "16"],
    )?;
    let fds_before = pm.proc.fds();
    let (registry, metrics) = (pm.registry, pm.metrics);
    let p2p: SocketAddr = {
        let a: Multiaddr = pm.p2p_addr()?.parse()?;
        let port = a
            .iter()
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .context("port")?;
        SocketAddr::from(([127, 0, 0, 1], port))
    };
    tokio::task::spawn_blocking(move || -> Result<()> {
        // The registry port: these clients come from loopback, so the
        // node's reserved room and then the 16 shared connections take them
        // (a loopback client has no per-source cap); the next is told 503
        // at once.
        let idle: Vec<TcpStream> = (0..16 + peermirror_registry::RESERVED_FOR_LOCAL)
            .map(|_| TcpStream::connect(registry))
            .collect::<std::io::Result<_>>()?;
        std::thread::sleep(Duration::from_millis(300));
        let mut extra = TcpStream::connect(registry)?;
        extra.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut answer = String::new();
        let _ = extra.read_to_string(&mut answer);
        ensure!(
            answer.starts_with("HTTP/1.1 503"),
            "beyond the cap: {answer:?}"
        );
        ensure!(answer.contains("TOOMANYREQUESTS"));
        drop(idle);
        // The P2P port: 200 TCP connections that never say a word; at most
        // 64 handshakes wait at once, the rest are refused and counted.
        let silent: Vec<TcpStream> = (0..200)
            .filter_map(|_| TcpStream::connect(p2p).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        // The status port: 100 connections, 64 at most are served; one that
        // asks for /metrics and never reads is cut off.
        let mut hog = TcpStream::connect(metrics)?;
        hog.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let crowd: Vec<TcpStream> = (0..100)
            .filter_map(|_| TcpStream::connect(metrics).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        drop(crowd);
        drop(silent);
        Ok(())
    })
    .await??;
    let refused = pm.wait_metric(
        "the P2P port to refuse handshakes beyond its cap",
        "peermirror_p2p_connections_refused_total",
        &[],
        Duration::from_secs(10),
        |n| n > 0.0,
    )?;
    ensure!(pm.metric("peermirror_registry_connections_refused_total", &[])? >= 1.0);
    // Still answering, and the descriptors come back once the silent
    // connections time out (status port: 30 s; pending P2P handshakes: 10 s).
    let healthz = pm.via.get(metrics, "/healthz", &[])?;
    ensure!(healthz.status == 200);
    wait_for(
        "descriptors back to their baseline",
        Duration::from_secs(60),
        || (pm.proc.fds() <= fds_before + 8).then_some(()),
    )
    .with_context(|| format!("{} descriptors open, {fds_before} before", pm.proc.fds()))?;
    println!(
        "floods: {refused} P2P handshakes refused; descriptors back to {}",
        pm.proc.fds()
    );
    Ok(())
}
