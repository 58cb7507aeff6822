//! In-process DHT clusters on 127.0.0.0/8, for the scale tests and the
//! `dht` benchmark: real libp2p routers (TCP, pnet, noise, yamux,
//! Kademlia), one event loop each, in one process.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use peermirror_routing::p2p::{self, P2pConfig, P2pCounters, P2pRouter, P2pSettings};
use peermirror_routing::{FirstRound, Peer, Round, Router};
use tokio_util::sync::CancellationToken;

/// Timing settings of every node.
#[derive(Debug, Clone)]
pub struct DhtOptions {
    pub provider_ttl: Duration,
    pub reannounce_interval: Duration,
    pub lookup_cache_ttl: Duration,
}

impl Default for DhtOptions {
    fn default() -> Self {
        DhtOptions {
            provider_ttl: Duration::from_secs(1200),
            reannounce_interval: Duration::from_secs(600),
            // Every sampled lookup goes to the DHT.
            lookup_cache_ttl: Duration::from_millis(1),
        }
    }
}

pub struct DhtNode {
    pub ip: IpAddr,
    pub router: P2pRouter,
    pub counters: P2pCounters,
    stop: CancellationToken,
}

impl Drop for DhtNode {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub struct DhtCluster {
    /// `None` for nodes that were killed.
    pub nodes: Vec<Option<DhtNode>>,
    psk: PreSharedKey,
    options: DhtOptions,
    bootstrap: Option<Multiaddr>,
}

/// The address of node `i`: 127.1.x.y.
pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// The process's resident set size.
pub fn rss_bytes() -> u64 {
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

/// The `p` quantile (0..=1) of sorted `values`.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

impl DhtCluster {
    /// Starts `n` nodes; each dials the first one (its bootstrap peer) and
    /// refreshes its table, as the daemon's static bootstrap does.
    pub async fn start(n: usize, options: DhtOptions) -> Result<DhtCluster> {
        let mut cluster = DhtCluster {
            nodes: Vec::new(),
            psk: PreSharedKey::new([0x5c; 32]),
            options,
            bootstrap: None,
        };
        for _ in 0..n {
            cluster.add().await?;
        }
        Ok(cluster)
    }

    /// Starts one more node and joins it to the cluster; returns its index.
    pub async fn add(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let ip = node_ip(i);
        let counters = P2pCounters::default();
        let stop = CancellationToken::new();
        let (router, event_loop) = p2p::start(
            P2pConfig {
                keypair: Keypair::generate_ed25519(),
                psk: Some(self.psk),
                registry_port: 5000,
                has_bootstrap: self.bootstrap.is_some(),
                settings: P2pSettings {
                    router_addr: std::net::SocketAddr::new(ip, 0),
                    psk_file: None,
                    insecure_open_network: false,
                    advertise_addr: Some(ip),
                    provider_ttl: self.options.provider_ttl,
                    reannounce_interval: self.options.reannounce_interval,
                    lookup_cache_ttl: self.options.lookup_cache_ttl,
                    idle_connection_timeout: Duration::from_secs(600),
                    fanout_followers: 4,
                    fanout_lease: Duration::from_secs(600),
                },
                counters: counters.clone(),
                events: None,
            },
            stop.clone(),
        )?;
        tokio::spawn(event_loop);
        let listen = listen_addr(&router).await?;
        match &self.bootstrap {
            Some(first) => {
                router.dial(first.clone()).await?;
                router.bootstrap().await?;
            }
            None => self.bootstrap = Some(listen),
        }
        self.nodes.push(Some(DhtNode {
            ip,
            router,
            counters,
            stop,
        }));
        Ok(i)
    }

    pub fn live(&self) -> impl Iterator<Item = (usize, &DhtNode)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    pub fn node(&self, i: usize) -> &DhtNode {
        self.nodes[i].as_ref().expect("node is alive")
    }

    /// Stops node `i` without a goodbye: its event loop and sockets go at
    /// once, as with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    /// Hands each live node its keys as its first round.
    pub async fn advertise(&self, keys: impl Fn(usize) -> Vec<String>) -> Result<()> {
        for (i, n) in self.live() {
            n.router.advertise(keys(i), Round::Initial).await?;
        }
        Ok(())
    }

    /// Waits until every live node is ready as the daemon defines it: the
    /// first round stored and, for nodes with a bootstrap peer, a non-empty
    /// routing table. Returns how long it took.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut said = Instant::now();
        loop {
            if said.elapsed() > Duration::from_secs(10) {
                said = Instant::now();
                let (mut stored, mut total) = (0, 0);
                for (_, n) in self.live() {
                    match n.router.status().first_round {
                        FirstRound::Announcing {
                            stored: s,
                            total: t,
                        } => {
                            stored += s;
                            total += t;
                        }
                        FirstRound::Stored => {}
                        FirstRound::Waiting => {}
                    }
                }
                eprintln!(
                    "  … {:.0?}: {stored} of {total} keys still announcing stored, {} failed announcements retried",
                    started.elapsed(),
                    self.advertise_failures()
                );
            }
            let waiting: Vec<(usize, Vec<String>)> = self
                .live()
                .map(|(i, n)| (i, n.router.status().waiting_for()))
                .filter(|(_, w)| !w.is_empty())
                .collect();
            if waiting.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "{} nodes not ready after {timeout:?}, e.g. node {}: {:?}",
                    waiting.len(),
                    waiting[0].0,
                    waiting[0].1
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first provider node `asker` finds for `key`, and how long it
    /// took; `None` when the lookup ended empty.
    pub async fn lookup_first(
        &self,
        asker: usize,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<(Peer, Duration)>> {
        let started = Instant::now();
        let mut stream = self.node(asker).router.lookup(key);
        match tokio::time::timeout(timeout, stream.next()).await {
            Ok(Some(p)) => Ok(Some((p, started.elapsed()))),
            Ok(None) => Ok(None),
            Err(_) => bail!("node {asker}: lookup of {key} found nobody in {timeout:?}"),
        }
    }

    /// Failed announcements (each retried), summed over the live nodes.
    pub fn advertise_failures(&self) -> u64 {
        self.live()
            .map(|(_, n)| n.counters.advertise_failures.get())
            .sum()
    }

    /// Whether every live node's first round is stored.
    pub fn all_stored(&self) -> bool {
        self.live()
            .all(|(_, n)| n.router.status().first_round == FirstRound::Stored)
    }
}

async fn listen_addr(router: &P2pRouter) -> Result<Multiaddr> {
    for _ in 0..500 {
        if let Some(a) = router.status().listen_addrs.first() {
            return Ok(a.clone().with(Protocol::P2p(router.peer_id())));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("node never listened")
}

/// A key shaped like the digests nodes announce: node `owner`'s `i`th.
pub fn key(owner: usize, i: usize) -> String {
    format!("sha256:{owner:04x}{i:060x}")
}

/// Measures how late a task that asks to wake every millisecond is woken:
/// the scheduling delay every other task of the process sees too.
pub struct SchedulingProbe {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Vec<Duration>>,
}

impl SchedulingProbe {
    pub fn start() -> SchedulingProbe {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut late = Vec::new();
            while !token.is_cancelled() {
                let asked = Instant::now() + Duration::from_millis(1);
                tokio::time::sleep_until(asked.into()).await;
                late.push(Instant::now().saturating_duration_since(asked));
            }
            late
        });
        SchedulingProbe { stop, task }
    }

    /// The lateness of every wake-up, sorted.
    pub async fn finish(self) -> Vec<Duration> {
        self.stop.cancel();
        let mut late = self.task.await.unwrap_or_default();
        late.sort();
        late
    }
}

/// The transport of a peermirror node, for test clients that speak P2P
/// themselves: TCP, the preshared key, noise, yamux.
pub fn keyed_transport(
    key: &Keypair,
    psk: [u8; 32],
) -> Result<libp2p::core::transport::Boxed<(libp2p::PeerId, libp2p::core::muxing::StreamMuxerBox)>>
{
    use libp2p::core::transport::Transport;
    let psk = PreSharedKey::new(psk);
    Ok(
        libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default())
            .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
            .upgrade(libp2p::core::upgrade::Version::V1Lazy)
            .authenticate(libp2p::noise::Config::new(key)?)
            .multiplex(libp2p::yamux::Config::default())
            .boxed(),
    )
}
