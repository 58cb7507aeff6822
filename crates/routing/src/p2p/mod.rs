//! The libp2p router: TCP + (pnet) + noise + yamux, Kademlia in server mode,
//! identify and ping.
//!
//! One event loop ([`event_loop`]) owns the `Swarm`; the rest of the daemon
//! holds a cloneable [`P2pRouter`] whose methods send it commands, each with
//! a `oneshot` or a channel for the answer. The loop is made of parts, each
//! with its own state and handlers:
//! - [`peers`]: the one table of connected peers (by [`PeerId`]) and which
//!   of their addresses this node uses;
//! - [`lookups`]: provider lookups — single-flight per key, a bounded number
//!   of Kademlia queries with a bounded queue behind them, positive and
//!   negative caches, providers dialled before they are reported;
//! - [`advertiser`]: announcements — a bounded number at once, each checked
//!   for having reached its closest peers, retried with backoff, renewed at
//!   times spread over the re-announce interval, and the explicit state of
//!   the first round;
//! - [`records`]: the bounded record store Kademlia keeps for other nodes.
//!
//! The loop never calls out of itself: what other parts of the daemon act on
//! (peers that proved the key, to be admitted by the dataplane) leaves it as
//! [`PeerEvent`]s on a channel.

mod advertiser;
mod behaviour;
mod event_loop;
mod lookups;
mod peers;
mod records;
pub use peermirror_protocol::fanout as rendezvous;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::stream::BoxStream;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use peers::{PeerInfo, routable};

use super::{Peer, Round, Router, RouterError, RouterStatus};

/// Settings of the P2P network, as the operator gives them.
#[derive(Debug, Clone, clap::Args)]
pub struct P2pSettings {
    /// Address of the P2P (libp2p) port (`:5001` listens on every IPv4 and
    /// IPv6 address).
    #[arg(long, env = "PEERMIRROR_ROUTER_ADDR", default_value = ":5001", value_parser = peermirror_net::flags::parse_listen_addr)]
    pub router_addr: SocketAddr,

    /// File holding the network's 32-byte preshared key in libp2p's swarm key
    /// format (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex characters). Nodes
    /// with another key cannot connect.
    #[arg(long, env = "PEERMIRROR_PSK_FILE")]
    pub psk_file: Option<std::path::PathBuf>,

    /// Run the P2P network without a preshared key: any host that reaches
    /// the P2P port can join and learn what this node holds.
    #[arg(
        long,
        env = "PEERMIRROR_INSECURE_OPEN_NETWORK",
        conflicts_with = "psk_file"
    )]
    pub insecure_open_network: bool,

    /// The address other nodes use to reach this node, instead of the
    /// addresses it listens on.
    #[arg(long, env = "PEERMIRROR_ADVERTISE_ADDR")]
    pub advertise_addr: Option<IpAddr>,

    /// How long other nodes keep this node's announcements.
    #[arg(long, env = "PEERMIRROR_PROVIDER_TTL", default_value = "20m", value_parser = peermirror_net::flags::parse_duration)]
    pub provider_ttl: Duration,

    /// How often this node re-announces what it holds (before the TTL runs
    /// out).
    #[arg(long, env = "PEERMIRROR_REANNOUNCE_INTERVAL", default_value = "10m", value_parser = peermirror_net::flags::parse_duration)]
    pub reannounce_interval: Duration,

    /// How long the answer of a DHT lookup is reused.
    #[arg(long, env = "PEERMIRROR_LOOKUP_CACHE_TTL", default_value = "5s", value_parser = peermirror_net::flags::parse_duration)]
    pub lookup_cache_ttl: Duration,

    /// How long an unused P2P connection to a peer is kept open.
    #[arg(long = "router-idle-timeout", value_name = "ROUTER_IDLE_TIMEOUT", env = "PEERMIRROR_ROUTER_IDLE_TIMEOUT", default_value = "5m", value_parser = peermirror_net::flags::parse_duration)]
    pub idle_connection_timeout: Duration,

    /// First-deploy fan-out: when no node holds a blob, the digest's
    /// rendezvous node tells one node to fetch it and the others to follow
    /// its in-flight ingest; this many followers per source (the rest
    /// follow followers). 0 turns the fan-out off.
    #[arg(
        help_heading = "Fan-out (first deploy)",
        long,
        env = "PEERMIRROR_FANOUT_FOLLOWERS",
        default_value_t = 4
    )]
    pub fanout_followers: usize,

    /// How long a fan-out decision is kept after its digest was last asked
    /// about.
    #[arg(help_heading = "Fan-out (first deploy)", long, env = "PEERMIRROR_FANOUT_LEASE", default_value = "10m", value_parser = peermirror_net::flags::parse_duration)]
    pub fanout_lease: Duration,
}

impl P2pSettings {
    /// The preshared key read from `--psk-file`; `None` for an open network.
    pub fn load_psk(&self) -> Result<Option<PreSharedKey>, crate::identity::IdentityError> {
        self.psk_file
            .as_deref()
            .map(crate::identity::load_psk)
            .transpose()
    }

    /// The multiaddrs the P2P port listens on: `[::]` or `0.0.0.0` listen
    /// on every address of both families.
    pub fn listen(&self) -> Vec<Multiaddr> {
        let tcp = Protocol::Tcp(self.router_addr.port());
        if self.router_addr.ip().is_unspecified() {
            vec![
                Multiaddr::from(std::net::Ipv4Addr::UNSPECIFIED).with(tcp.clone()),
                Multiaddr::from(std::net::Ipv6Addr::UNSPECIFIED).with(tcp),
            ]
        } else {
            vec![Multiaddr::from(self.router_addr.ip()).with(tcp)]
        }
    }
}

/// The metric handles the router updates itself.
#[derive(Clone, Default)]
pub struct P2pCounters {
    pub handshake_failures_inbound: Counter,
    pub handshake_failures_outbound: Counter,
    /// Announcements that timed out or reached too few peers (each is retried).
    pub advertise_failures: Counter,
    /// Lookups answered as a miss at once because the lookup queue was full.
    pub lookups_dropped: Counter,
    /// Inbound connections refused at the connection limits.
    pub connections_refused: Counter,
    pub connected_peers: Gauge,
    pub routing_table_peers: Gauge,
    pub advertised_keys: Gauge,
    /// Keys not stored in the DHT yet.
    pub pending_keys: Gauge,
}

/// The label of `peermirror_p2p_handshake_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct HandshakeLabels {
    /// `inbound` or `outbound`.
    direction: &'static str,
}

impl P2pCounters {
    /// Creates the router's metrics and registers them in `registry`, under
    /// the daemon's `peermirror_` prefix.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> P2pCounters {
        let handshake =
            prometheus_client::metrics::family::Family::<HandshakeLabels, Counter>::default();
        // One statement each: the family's guard must be gone before the
        // next label is created.
        let inbound = handshake
            .get_or_create(&HandshakeLabels {
                direction: "inbound",
            })
            .clone();
        let outbound = handshake
            .get_or_create(&HandshakeLabels {
                direction: "outbound",
            })
            .clone();
        let counters = P2pCounters {
            handshake_failures_inbound: inbound,
            handshake_failures_outbound: outbound,
            ..P2pCounters::default()
        };
        let r = registry.sub_registry_with_prefix("peermirror");
        r.register(
            "p2p_connections_refused",
            "P2P connections refused at the connection limits (pending handshakes, connections in all, per peer)",
            counters.connections_refused.clone(),
        );
        r.register(
            "p2p_handshake_failures",
            "P2P connections that failed before the peer was authenticated (wrong preshared key, not a peer)",
            handshake.clone(),
        );
        r.register(
            "p2p_connected_peers",
            "Peers with an open P2P connection (they proved the preshared key)",
            counters.connected_peers.clone(),
        );
        r.register(
            "p2p_routing_table_peers",
            "Peers in the Kademlia routing table",
            counters.routing_table_peers.clone(),
        );
        r.register(
            "advertised_keys",
            "Keys (digests and tags) this node announces in the DHT",
            counters.advertised_keys.clone(),
        );
        r.register(
            "advertise_pending_keys",
            "Keys announced but not stored in the DHT yet (being announced, or retried): peers cannot find them until they are",
            counters.pending_keys.clone(),
        );
        r.register(
            "advertise_failures",
            "Announcements that timed out or reached too few peers (each is retried with backoff)",
            counters.advertise_failures.clone(),
        );
        r.register(
            "lookups_dropped",
            "DHT lookups answered as a miss at once because the lookup queue was full",
            counters.lookups_dropped.clone(),
        );
        counters
    }
}

/// Everything the router is built from.
pub struct P2pConfig {
    pub keypair: Keypair,
    /// `None` only when the operator chose an open network explicitly.
    pub psk: Option<PreSharedKey>,
    /// The registry port, the same on every node.
    pub registry_port: u16,
    /// Whether bootstrap peers are configured (readiness then needs peers,
    /// and the first round waits for them).
    pub has_bootstrap: bool,
    pub settings: P2pSettings,
    pub counters: P2pCounters,
    /// Where [`PeerEvent`]s go; `None` drops them.
    pub events: Option<mpsc::UnboundedSender<PeerEvent>>,
}

/// What the event loop reports about peers that proved the preshared key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// A connection with `peer` is up, from or to `ip` (said for each of its
    /// connections).
    Connected { peer: PeerId, ip: IpAddr },
    /// The peer's last connection closed.
    Disconnected { peer: PeerId },
}

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("cannot set up the noise handshake: {0}")]
    Noise(#[from] noise::Error),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
}

enum Command {
    Advertise {
        keys: Vec<String>,
        round: Round,
        done: oneshot::Sender<()>,
    },
    Withdraw {
        keys: Vec<String>,
        done: oneshot::Sender<()>,
    },
    Lookup {
        key: String,
        /// Skip the answer caches (a transfer looks for new holders).
        fresh: bool,
        reply: mpsc::Sender<Peer>,
        /// Resolves when the asker drops the stream.
        gone: oneshot::Receiver<()>,
    },
    Dial(Multiaddr),
    Bootstrap,
    ExpectPeers(bool),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Fanout {
        digest: String,
        failed: Option<PeerId>,
        asker: super::Asker,
        reply: oneshot::Sender<Option<super::Fanout>>,
    },
}

/// The handle the daemon uses. Cheap to clone.
#[derive(Clone)]
pub struct P2pRouter {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<RouterStatus>,
    peer_id: PeerId,
    lookups_dropped: Counter,
}

impl P2pRouter {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn send(&self, command: Command) -> Result<(), RouterError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| RouterError::Stopped)
    }

    /// Dials an address (a bootstrap peer).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), RouterError> {
        self.send(Command::Dial(addr)).await
    }

    /// Refreshes the routing table from the peers known so far.
    pub async fn bootstrap(&self) -> Result<(), RouterError> {
        self.send(Command::Bootstrap).await
    }

    /// Whether readiness waits for a first peer: the bootstrap source says
    /// `false` when it names no other node (a single-node cluster).
    pub async fn expect_peers(&self, expect: bool) -> Result<(), RouterError> {
        self.send(Command::ExpectPeers(expect)).await
    }

    /// The connected peers, for the debug page.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, RouterError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Peers(tx)).await?;
        rx.await.map_err(|_| RouterError::Stopped)
    }

    /// Whether a live P2P connection (a peer that proved the preshared
    /// key) comes from or goes to `ip`.
    pub async fn is_peer_address(&self, ip: IpAddr) -> bool {
        self.peers()
            .await
            .unwrap_or_default()
            .iter()
            .any(|p| p.connection_ips.contains(&ip))
    }

    /// A provider lookup of `key`; `fresh` skips the answer caches.
    fn start_lookup(&self, key: &str, fresh: bool) -> BoxStream<'static, Peer> {
        let (tx, rx) = mpsc::channel(32);
        let (guard, gone) = oneshot::channel();
        let command = Command::Lookup {
            key: key.to_string(),
            fresh,
            reply: tx,
            gone,
        };
        let stream = LookupStream {
            inner: tokio_stream::wrappers::ReceiverStream::new(rx),
            _guard: guard,
        };
        match self.commands.try_send(command) {
            Ok(()) => Box::pin(stream),
            Err(mpsc::error::TrySendError::Closed(_)) => Box::pin(futures::stream::empty()),
            // The loop is busy: wait a moment for room, then give up (a
            // miss, counted) rather than queue without bound.
            Err(mpsc::error::TrySendError::Full(command)) => {
                use futures::StreamExt;
                let (commands, dropped) = (self.commands.clone(), self.lookups_dropped.clone());
                let sent = async move {
                    let queued = commands
                        .send_timeout(command, LOOKUP_QUEUE_WAIT)
                        .await
                        .is_ok();
                    if !queued {
                        dropped.inc();
                    }
                    futures::stream::iter(queued.then_some(stream)).flatten()
                };
                Box::pin(futures::stream::once(sent).flatten())
            }
        }
    }
}

#[async_trait::async_trait]
impl Router for P2pRouter {
    async fn advertise(&self, keys: Vec<String>, round: Round) -> Result<(), RouterError> {
        let (done, taken) = oneshot::channel();
        self.send(Command::Advertise { keys, round, done }).await?;
        taken.await.map_err(|_| RouterError::Stopped)
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        let (done, taken) = oneshot::channel();
        self.send(Command::Withdraw { keys, done }).await?;
        taken.await.map_err(|_| RouterError::Stopped)
    }

    fn lookup(&self, key: &str) -> BoxStream<'static, Peer> {
        self.start_lookup(key, false)
    }

    fn lookup_fresh(&self, key: &str) -> BoxStream<'static, Peer> {
        self.start_lookup(key, true)
    }

    async fn fanout(
        &self,
        digest: &peermirror_oci::Digest,
        failed: Option<PeerId>,
        asker: super::Asker,
    ) -> Option<super::Fanout> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Fanout {
            digest: digest.to_string(),
            failed,
            asker,
            reply,
        })
        .await
        .ok()?;
        answer.await.ok().flatten()
    }

    fn watch_status(&self) -> watch::Receiver<RouterStatus> {
        self.status.clone()
    }
}

/// How long a lookup waits for room in a full command queue.
const LOOKUP_QUEUE_WAIT: Duration = Duration::from_millis(100);

/// The providers of one lookup; dropping it tells the event loop, which
/// stops the lookup if nobody else waits for it.
struct LookupStream {
    inner: tokio_stream::wrappers::ReceiverStream<Peer>,
    _guard: oneshot::Sender<()>,
}

impl futures::Stream for LookupStream {
    type Item = Peer;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Peer>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

fn build_transport(
    keypair: &Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, P2pError> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)).map_err(TcpError);
    match psk {
        Some(psk) => authenticate(
            tcp.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket)),
            keypair,
        ),
        None => authenticate(tcp, keypair),
    }
}

/// An error of the TCP layer (the connection never opened). libp2p's error
/// layers above it forward `source()` past the error they wrap; this one
/// keeps the OS error reachable, so a failed dial can tell "nobody answered"
/// from "a host answered and failed the handshake".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TcpError(#[source] std::io::Error);

/// How long a connection may take from TCP connect to a usable muxer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// noise + yamux on top of a (possibly pnet-wrapped) TCP transport.
fn authenticate<T>(base: T, keypair: &Keypair) -> Result<Boxed<(PeerId, StreamMuxerBox)>, P2pError>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    Ok(base
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair)?)
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .boxed())
}

/// Builds the router. The returned future is the event loop: it runs until
/// `shutdown` (the daemon runs it as one of its supervised tasks).
pub fn start(
    config: P2pConfig,
    shutdown: CancellationToken,
) -> Result<(P2pRouter, impl Future<Output = ()> + Send + 'static), P2pError> {
    let peer_id = config.keypair.public().to_peer_id();
    let transport = build_transport(&config.keypair, config.psk)?;
    let lookups_dropped = config.counters.lookups_dropped.clone();
    let (commands_tx, commands_rx) = mpsc::channel(1024);
    let (event_loop, status) = event_loop::EventLoop::new(config, transport, commands_rx)?;
    Ok((
        P2pRouter {
            commands: commands_tx,
            status,
            peer_id,
            lookups_dropped,
        },
        event_loop.run(shutdown),
    ))
}

#[cfg(test)]
mod tests;
