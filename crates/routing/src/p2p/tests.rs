//! The router over real sockets on 127.0.0.0/8.

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::FirstRound;

struct Node {
    router: P2pRouter,
    counters: P2pCounters,
    shutdown: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn node(n: u8, psk: Option<PreSharedKey>, bootstrap: bool) -> Node {
    let ip: IpAddr = format!("127.0.0.{n}").parse().expect("ip");
    let counters = P2pCounters::default();
    let config = P2pConfig {
        keypair: Keypair::generate_ed25519(),
        psk,
        registry_port: 5000,
        has_bootstrap: bootstrap,
        settings: P2pSettings {
            router_addr: std::net::SocketAddr::new(ip, 0),
            psk_file: None,
            insecure_open_network: false,
            advertise_addr: Some(ip),
            provider_ttl: Duration::from_secs(60),
            reannounce_interval: Duration::from_secs(30),
            lookup_cache_ttl: Duration::from_millis(10),
            idle_connection_timeout: Duration::from_secs(30),
            fanout_followers: 4,
            fanout_lease: Duration::from_secs(600),
        },
        counters: counters.clone(),
        events: None,
    };
    let shutdown = CancellationToken::new();
    let (router, run) = start(config, shutdown.clone()).expect("start");
    tokio::spawn(run);
    Node {
        router,
        counters,
        shutdown,
    }
}

async fn listen_addr(router: &P2pRouter) -> Multiaddr {
    for _ in 0..100 {
        if let Some(a) = router.status().listen_addrs.first() {
            return a.clone().with(Protocol::P2p(router.peer_id()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no listen address");
}

fn plain(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

fn failures(n: &Node) -> (u64, u64) {
    (
        n.counters.handshake_failures_inbound.get(),
        n.counters.handshake_failures_outbound.get(),
    )
}

/// Handshake failures count hosts that answered and could not prove the
/// key; not closed ports, and not a node dialling itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_failures_count_strangers_only() {
    let a = node(31, Some(PreSharedKey::new([7; 32])), false);
    let a_plain = plain(&listen_addr(&a.router).await);
    // A closed port, and A's own address.
    let closed = std::net::TcpListener::bind("127.0.0.31:0").expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let closed_addr =
        Multiaddr::from(IpAddr::from([127, 0, 0, 31])).with(Protocol::Tcp(closed_port));
    a.router.dial(closed_addr).await.expect("dial");
    a.router.dial(a_plain.clone()).await.expect("dial");
    // A node with another key: both ends count it.
    let d = node(32, Some(PreSharedKey::new([9; 32])), true);
    d.router.dial(a_plain).await.expect("dial");
    // Garbage from the wrong key can read as a long frame that is then
    // waited for: the handshake's 10 s timeout ends such an attempt.
    for _ in 0..750 {
        if failures(&a).0 > 0 && failures(&d).1 > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failures(&a).0 > 0, "A did not count D: {:?}", failures(&a));
    assert!(failures(&d).1 > 0, "D did not count A: {:?}", failures(&d));
    // A's own dials (a closed port, itself) were over long before D's
    // handshake failed, and neither counted.
    assert_eq!(failures(&a).1, 0, "closed port or self counted");
}

async fn lookup_all(router: &P2pRouter, key: &str) -> Vec<Peer> {
    let mut peers: Vec<Peer> =
        tokio::time::timeout(Duration::from_secs(10), router.lookup(key).collect())
            .await
            .expect("lookup ends");
    peers.sort_by_key(|p| p.addr);
    peers
}

async fn wait(mut f: impl FnMut() -> bool, what: &str) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_key_find_each_other_and_others_cannot_join() {
    let psk = PreSharedKey::new([7; 32]);
    let a = node(21, Some(psk), false);
    let b = node(22, Some(psk), true);
    let c = node(23, Some(psk), true);
    let a_addr = listen_addr(&a.router).await;
    for n in [&b, &c] {
        n.router.dial(a_addr.clone()).await.expect("dial");
    }
    wait(
        || b.router.status().routing_table_peers > 0 && c.router.status().routing_table_peers > 0,
        "routing tables",
    )
    .await;
    b.router.bootstrap().await.expect("bootstrap");
    c.router.bootstrap().await.expect("bootstrap");
    a.router
        .advertise(
            vec!["sha256:aaa".into(), "docker.io/library/x:1".into()],
            Round::Initial,
        )
        .await
        .expect("advertise");
    b.router
        .advertise(vec!["sha256:aaa".into()], Round::Initial)
        .await
        .expect("advertise");
    wait(
        || {
            a.router.status().first_round == FirstRound::Stored
                && b.router.status().first_round == FirstRound::Stored
        },
        "the first rounds",
    )
    .await;
    let peers = lookup_all(&c.router, "sha256:aaa").await;
    let addrs: Vec<String> = peers.iter().map(|p| p.addr.to_string()).collect();
    assert_eq!(addrs, ["127.0.0.21:5000", "127.0.0.22:5000"]);
    assert_eq!(peers[0].id, a.router.peer_id());
    // Self is never a provider of its own lookups.
    let peers = lookup_all(&a.router, "sha256:aaa").await;
    assert_eq!(
        peers.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>(),
        ["127.0.0.22:5000"]
    );
    assert_eq!(
        lookup_all(&b.router, "docker.io/library/x:1").await.len(),
        1
    );
    assert!(lookup_all(&b.router, "sha256:nobody").await.is_empty());

    // Withdrawn keys are no longer announced by that node.
    a.router
        .withdraw(vec!["docker.io/library/x:1".into()])
        .await
        .expect("withdraw");
    assert_eq!(a.router.status().advertised_keys, 1);

    // A node with another key cannot join.
    let d = node(24, Some(PreSharedKey::new([9; 32])), true);
    d.router.dial(a_addr.clone()).await.expect("dial");
    // Once D's attempt has failed, it has no peer and A does not list it.
    for _ in 0..750 {
        if failures(&d).1 > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failures(&d).1 > 0, "D's handshake never failed");
    assert_eq!(d.router.status().routing_table_peers, 0);
    assert!(lookup_all(&d.router, "sha256:aaa").await.is_empty());
    let a_peers = a.router.peers().await.expect("peers");
    assert!(
        a_peers.iter().all(|p| p.id != d.router.peer_id()),
        "{a_peers:?}"
    );
    assert_eq!(a_peers.len(), 2);
    assert_eq!(a.counters.connected_peers.get(), 2);
}

/// A node that expects peers is not done with its first round while it has
/// none; once one appears its keys are announced and can be found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_announced_alone_reach_the_first_peer() {
    let psk = PreSharedKey::new([5; 32]);
    let a = node(41, Some(psk), true);
    a.router
        .advertise(vec!["sha256:early".into()], Round::Initial)
        .await
        .expect("advertise");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ne!(a.router.status().first_round, FirstRound::Stored);
    let b = node(42, Some(psk), false);
    b.router
        .dial(listen_addr(&a.router).await)
        .await
        .expect("dial");
    wait(
        || a.router.status().first_round == FirstRound::Stored,
        "A's first round after B joined",
    )
    .await;
    let found = lookup_all(&b.router, "sha256:early").await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, a.router.peer_id());
    assert_eq!(a.counters.advertise_failures.get(), 0);
}

/// A flood of lookups for random digests, abandoned by its askers (as the
/// mirror abandons a lookup after its resolve timeout), does not hold up a
/// real lookup that follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_flood_does_not_hold_up_real_lookups() {
    let psk = PreSharedKey::new([6; 32]);
    let a = node(51, Some(psk), false);
    let b = node(52, Some(psk), true);
    b.router
        .dial(listen_addr(&a.router).await)
        .await
        .expect("dial");
    wait(|| b.router.status().routing_table_peers > 0, "B's table").await;
    a.router
        .advertise(vec!["sha256:real".into()], Round::Initial)
        .await
        .expect("advertise");
    wait(
        || a.router.status().first_round == FirstRound::Stored,
        "A's first round",
    )
    .await;
    for round in 0..3 {
        let flood: Vec<_> = (0..2_000)
            .map(|i| b.router.lookup(&format!("sha256:flood{round}-{i}")))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(flood);
        let t = std::time::Instant::now();
        let found = lookup_all(&b.router, "sha256:real").await;
        assert_eq!(found.len(), 1, "round {round}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "round {round}: the real lookup took {:?}",
            t.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_p2p_router_behaves_like_a_router() {
    let a = node(61, Some(PreSharedKey::new([8; 32])), false);
    crate::conformance::announces(&a.router).await;
    crate::conformance::misses_end(&a.router).await;
}

#[test]
fn the_router_registers_its_own_metrics() {
    let mut registry = prometheus_client::registry::Registry::default();
    let counters = P2pCounters::register(&mut registry);
    counters.handshake_failures_inbound.inc();
    counters.connected_peers.set(3);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    for line in [
        r#"peermirror_p2p_handshake_failures_total{direction="inbound"} 1"#,
        r#"peermirror_p2p_handshake_failures_total{direction="outbound"} 0"#,
        "peermirror_p2p_connected_peers 3",
        "# HELP peermirror_lookups_dropped ",
        "# HELP peermirror_advertise_pending_keys ",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}
