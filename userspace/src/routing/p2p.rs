//! The libp2p router: TCP + (pnet) + noise + yamux, Kademlia in server mode
//! and identify.
//!
//! One event loop owns the `Swarm`; the rest of the daemon holds a cloneable
//! [`P2pRouter`] whose methods send commands to it. Lookups stream providers
//! back as they are found: a provider is reported once this node holds a
//! connection to it (dialled if needed), so that its registry endpoint is
//! known and, with the dataplane, the provider has admitted this node before
//! the HTTP request arrives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use libp2p::core::ConnectedPoint;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, Swarm, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, identify, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{KAD_PROTOCOL, Peer, Router, RouterError, RouterStatus, record_key};

/// Settings of the libp2p router.
#[derive(Clone)]
pub struct P2pConfig {
    pub keypair: Keypair,
    /// `None` only when the operator chose an open network explicitly.
    pub psk: Option<PreSharedKey>,
    /// Where the P2P port listens.
    pub listen: Vec<Multiaddr>,
    /// The registry port, the same on every node.
    pub registry_port: u16,
    /// The address other nodes should use for this node, instead of its
    /// listen addresses.
    pub advertise_addr: Option<IpAddr>,
    /// How long other nodes keep a provider record of ours.
    pub provider_ttl: Duration,
    /// How often our provider records are re-announced (before they expire).
    pub reannounce_interval: Duration,
    /// How long a lookup's answer is reused.
    pub lookup_cache_ttl: Duration,
    /// How long an unused connection to a peer is kept open.
    pub idle_connection_timeout: Duration,
    /// Whether bootstrap peers are configured (readiness then needs peers).
    pub has_bootstrap: bool,
}

/// Things the event loop reports that other parts of the daemon act on
/// (metrics, and the dataplane's admission of peers that proved the PSK).
pub trait P2pObserver: Send + Sync + 'static {
    /// A peer completed the handshake (so it holds the PSK); a connection
    /// from or to `ip` is up (said for each of its connections).
    fn peer_connected(&self, _peer: &PeerId, _ip: IpAddr) {}
    /// The routable addresses a connected peer announced (identify): on a
    /// dual-stack or multi-homed node its registry requests may come from
    /// one of these rather than from its P2P connection's address.
    fn peer_addresses(&self, _peer: &PeerId, _ips: &[IpAddr]) {}
    /// The peer's last connection closed.
    fn peer_disconnected(&self, _peer: &PeerId) {}
    /// A connection failed before the peer was authenticated (wrong PSK,
    /// not a libp2p node, …).
    fn handshake_failed(&self, _inbound: bool) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl P2pObserver for NoObserver {}

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("cannot set up the noise handshake: {0}")]
    Noise(#[from] noise::Error),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    /// Finds dead connections (a peer whose link went silent) in seconds
    /// rather than at the end of TCP's retransmission timeout.
    ping: ping::Behaviour,
}

/// A summary of one connected peer, for the debug page.
#[derive(Debug, Clone)]
pub struct PeerSummary {
    pub id: String,
    pub endpoint: Option<IpAddr>,
    pub connections: usize,
}

enum Command {
    Advertise(Vec<String>),
    Withdraw(Vec<String>),
    Lookup {
        key: String,
        reply: mpsc::Sender<Peer>,
    },
    Dial(Multiaddr),
    Bootstrap,
    Peers(oneshot::Sender<Vec<PeerSummary>>),
}

/// Largest number of keys whose first announcement runs at once; the rest
/// wait in a queue (a node with thousands of keys would otherwise start
/// thousands of queries at start-up).
const ADVERTISE_CONCURRENCY: usize = 32;
/// Most keys with provider records this node keeps (its own and others'),
/// far above rust-libp2p's default of 1,024.
const MAX_PROVIDER_KEYS: usize = 200_000;

/// The handle the daemon uses. Cheap to clone.
#[derive(Clone)]
pub struct P2pRouter {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<RouterStatus>,
    peer_id: PeerId,
}

impl P2pRouter {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Dials an address (a bootstrap peer).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), RouterError> {
        self.commands
            .send(Command::Dial(addr))
            .await
            .map_err(|_| RouterError::Stopped)
    }

    /// Refreshes the routing table from the peers known so far.
    pub async fn bootstrap(&self) -> Result<(), RouterError> {
        self.commands
            .send(Command::Bootstrap)
            .await
            .map_err(|_| RouterError::Stopped)
    }

    pub async fn peers(&self) -> Result<Vec<PeerSummary>, RouterError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Peers(tx))
            .await
            .map_err(|_| RouterError::Stopped)?;
        rx.await.map_err(|_| RouterError::Stopped)
    }

    pub fn watch_status(&self) -> watch::Receiver<RouterStatus> {
        self.status.clone()
    }
}

#[async_trait::async_trait]
impl Router for P2pRouter {
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.commands
            .send(Command::Advertise(keys))
            .await
            .map_err(|_| RouterError::Stopped)
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.commands
            .send(Command::Withdraw(keys))
            .await
            .map_err(|_| RouterError::Stopped)
    }

    fn lookup(&self, key: &str) -> BoxStream<'static, Peer> {
        let (tx, rx) = mpsc::channel(32);
        // A full command queue means the loop is overloaded: that lookup
        // finds nothing rather than waiting.
        let _ = self.commands.try_send(Command::Lookup {
            key: key.to_string(),
            reply: tx,
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    fn status(&self) -> RouterStatus {
        self.status.borrow().clone()
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
        .timeout(Duration::from_secs(10))
        .boxed())
}

/// Starts the event loop; it runs until `shutdown`.
pub fn start(
    config: P2pConfig,
    observer: Arc<dyn P2pObserver>,
    shutdown: CancellationToken,
) -> Result<(P2pRouter, tokio::task::JoinHandle<()>), P2pError> {
    let peer_id = config.keypair.public().to_peer_id();
    let transport = build_transport(&config.keypair, config.psk)?;

    let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_config
        .set_provider_record_ttl(Some(config.provider_ttl))
        .set_provider_publication_interval(Some(config.reannounce_interval))
        .set_query_timeout(Duration::from_secs(10))
        .set_record_ttl(Some(config.provider_ttl));
    let store = kad::store::MemoryStore::with_config(
        peer_id,
        kad::store::MemoryStoreConfig {
            max_records: MAX_PROVIDER_KEYS,
            max_provided_keys: MAX_PROVIDER_KEYS,
            ..Default::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
    kad.set_mode(Some(kad::Mode::Server));
    let mut identify_config =
        identify::Config::new("/peermirror/1.0.0".to_string(), config.keypair.public())
            .with_agent_version(format!("peermirror/{}", env!("CARGO_PKG_VERSION")))
            // Peers learn of an address that comes up later (they admit it).
            .with_push_listen_addr_updates(true);
    if config.advertise_addr.is_some() {
        // Only the advertised address is announced to peers.
        identify_config = identify_config.with_hide_listen_addrs(true);
    }
    let behaviour = Behaviour {
        kad,
        identify: identify::Behaviour::new(identify_config),
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(5)),
        ),
    };
    let mut swarm = Swarm::new(
        transport,
        behaviour,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(config.idle_connection_timeout),
    );
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| P2pError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    let own_ips: HashSet<IpAddr> = config.advertise_addr.into_iter().collect();

    let (commands_tx, commands_rx) = mpsc::channel(1024);
    let (status_tx, status_rx) = watch::channel(RouterStatus {
        needs_peers: config.has_bootstrap,
        ..RouterStatus::default()
    });
    let event_loop = EventLoop {
        swarm,
        commands: commands_rx,
        config,
        observer,
        status: status_tx,
        own_ips,
        peers: HashMap::new(),
        lookups: HashMap::new(),
        dial_waiters: HashMap::new(),
        cache: HashMap::new(),
        pending_advertise: VecDeque::new(),
        advertising: HashSet::new(),
        provided: HashSet::new(),
        ever_advertised: false,
    };
    let task = tokio::spawn(event_loop.run(shutdown));
    Ok((
        P2pRouter {
            commands: commands_tx,
            status: status_rx,
            peer_id,
        },
        task,
    ))
}

/// What we know about a connected peer.
#[derive(Default)]
struct PeerState {
    /// Remote addresses of the open connections.
    connections: HashMap<ConnectionId, Multiaddr>,
    /// Addresses the peer announced through identify.
    announced: Vec<Multiaddr>,
}

struct Lookup {
    key: String,
    reply: mpsc::Sender<Peer>,
    reported: HashSet<PeerId>,
    found: Vec<Peer>,
    /// Providers being dialled before they can be reported.
    dialing: HashSet<PeerId>,
    query_done: bool,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    config: P2pConfig,
    observer: Arc<dyn P2pObserver>,
    status: watch::Sender<RouterStatus>,
    own_ips: HashSet<IpAddr>,
    peers: HashMap<PeerId, PeerState>,
    lookups: HashMap<QueryId, Lookup>,
    dial_waiters: HashMap<PeerId, Vec<QueryId>>,
    cache: HashMap<String, (Instant, Vec<Peer>)>,
    pending_advertise: VecDeque<String>,
    advertising: HashSet<QueryId>,
    /// Every key this node announces (queued or announced).
    provided: HashSet<String>,
    ever_advertised: bool,
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Addresses that name a node to others: not loopback, link-local or
/// unspecified.
fn routable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// Whether a failed dial reached a listener that could not authenticate
/// (another key, or not a libp2p node), rather than finding nobody there
/// (refused, unreachable, timed out) or reaching ourselves.
fn dial_met_a_stranger(error: &libp2p::swarm::DialError) -> bool {
    use libp2p::core::transport::TransportError;
    let libp2p::swarm::DialError::Transport(attempts) = error else {
        return false;
    };
    attempts.iter().any(|(_, e)| match e {
        TransportError::MultiaddrNotSupported(_) => false,
        TransportError::Other(e) => !never_connected(e),
    })
}

/// Whether an I/O error, or one it wraps, says that the connection never
/// opened (nobody answered, or the address cannot be used from here).
fn never_connected(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        current = e.source();
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ConnectionRefused
                    | TimedOut
                    | HostUnreachable
                    | NetworkUnreachable
                    | AddrNotAvailable
                    | InvalidInput
            ) {
                return true;
            }
            // `source()` of a wrapping io::Error skips the wrapped error.
            if let Some(inner) = io.get_ref() {
                current = Some(inner);
            }
        }
    }
    false
}

impl EventLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut housekeeping = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = housekeeping.tick() => {
                    let now = Instant::now();
                    let ttl = self.config.lookup_cache_ttl;
                    self.cache.retain(|_, (at, _)| now.duration_since(*at) < ttl);
                    self.publish_status();
                }
            }
        }
        tracing::debug!("routing event loop stopped");
    }

    fn kad(&mut self) -> &mut kad::Behaviour<kad::store::MemoryStore> {
        &mut self.swarm.behaviour_mut().kad
    }

    fn publish_status(&mut self) {
        let peers: usize = self.kad().kbuckets().map(|b| b.num_entries()).sum();
        self.status.send_if_modified(|s| {
            let changed = s.routing_table_peers != peers;
            s.routing_table_peers = peers;
            changed
        });
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Advertise(keys) => {
                self.ever_advertised = true;
                for key in keys {
                    if self.provided.insert(key.clone()) {
                        self.pending_advertise.push_back(key);
                    }
                }
                self.advertise_more();
            }
            Command::Withdraw(keys) => {
                let removed: HashSet<String> = keys
                    .into_iter()
                    .filter(|k| self.provided.remove(k))
                    .collect();
                self.pending_advertise.retain(|k| !removed.contains(k));
                for key in removed {
                    self.kad()
                        .stop_providing(&RecordKey::new(&record_key(&key)));
                }
                self.advertise_more();
            }
            Command::Lookup { key, reply } => self.start_lookup(key, reply),
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, error = %e, "cannot dial");
                }
            }
            Command::Bootstrap => {
                if let Err(e) = self.kad().bootstrap() {
                    tracing::debug!(error = %e, "kademlia bootstrap not possible yet");
                }
            }
            Command::Peers(reply) => {
                let ids: Vec<PeerId> = self.peers.keys().copied().collect();
                let summary = ids
                    .into_iter()
                    .map(|id| PeerSummary {
                        id: id.to_string(),
                        endpoint: self.endpoint_ip(&id),
                        connections: self.peers.get(&id).map_or(0, |p| p.connections.len()),
                    })
                    .collect();
                let _ = reply.send(summary);
            }
        }
    }

    /// Starts first announcements while fewer than the allowed number run.
    fn advertise_more(&mut self) {
        while self.advertising.len() < ADVERTISE_CONCURRENCY {
            let Some(key) = self.pending_advertise.pop_front() else {
                break;
            };
            match self
                .kad()
                .start_providing(RecordKey::new(&record_key(&key)))
            {
                Ok(id) => {
                    self.advertising.insert(id);
                }
                Err(e) => tracing::warn!(%key, error = %e, "cannot advertise key"),
            }
        }
        let done = self.ever_advertised
            && self.advertising.is_empty()
            && self.pending_advertise.is_empty();
        let provided = self.provided.len();
        self.status.send_if_modified(|s| {
            let before = (s.initial_advertise_done, s.advertised_keys);
            s.initial_advertise_done |= done;
            s.advertised_keys = provided;
            before != (s.initial_advertise_done, s.advertised_keys)
        });
    }

    fn start_lookup(&mut self, key: String, reply: mpsc::Sender<Peer>) {
        if let Some((at, peers)) = self.cache.get(&key)
            && at.elapsed() < self.config.lookup_cache_ttl
        {
            for p in peers {
                let _ = reply.try_send(p.clone());
            }
            return;
        }
        let id = self.kad().get_providers(RecordKey::new(&record_key(&key)));
        self.lookups.insert(
            id,
            Lookup {
                key,
                reply,
                reported: HashSet::new(),
                found: Vec::new(),
                dialing: HashSet::new(),
                query_done: false,
            },
        );
    }

    /// The registry IP of a connected peer: an address it announced that
    /// others can reach, else the address of our connection to it.
    fn endpoint_ip(&self, peer: &PeerId) -> Option<IpAddr> {
        let state = self.peers.get(peer)?;
        let announced: Vec<IpAddr> = state.announced.iter().filter_map(ip_of).collect();
        let connected: Vec<IpAddr> = state.connections.values().filter_map(ip_of).collect();
        announced
            .iter()
            .find(|ip| routable(ip))
            .or_else(|| connected.iter().find(|ip| routable(ip)))
            .or_else(|| announced.first())
            .or_else(|| connected.first())
            .copied()
    }

    /// Reports `provider` to a lookup if it can be reached; dials it first
    /// when it is not connected.
    fn offer_provider(&mut self, query: QueryId, provider: PeerId) {
        if &provider == self.swarm.local_peer_id() {
            return;
        }
        let connected = self
            .peers
            .get(&provider)
            .is_some_and(|p| !p.connections.is_empty());
        if !connected {
            let Some(lookup) = self.lookups.get_mut(&query) else {
                return;
            };
            if lookup.reported.contains(&provider) || !lookup.dialing.insert(provider) {
                return;
            }
            self.dial_waiters.entry(provider).or_default().push(query);
            let opts = DialOpts::peer_id(provider)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            match self.swarm.dial(opts) {
                // Already being dialled: its outcome will answer us too.
                Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                Err(e) => {
                    tracing::debug!(%provider, error = %e, "cannot dial provider");
                    self.dial_failed(provider);
                }
            }
            return;
        }
        let Some(ip) = self.endpoint_ip(&provider) else {
            return;
        };
        if self.own_ips.contains(&ip) {
            return;
        }
        let peer = Peer {
            id: provider.to_string(),
            addr: SocketAddr::new(ip, self.config.registry_port),
        };
        let Some(lookup) = self.lookups.get_mut(&query) else {
            return;
        };
        lookup.dialing.remove(&provider);
        if !lookup.reported.insert(provider) {
            return;
        }
        lookup.found.push(peer.clone());
        if lookup.reply.try_send(peer).is_err() {
            // The asker has gone: stop searching.
            self.finish_lookup(query);
        }
    }

    fn dial_failed(&mut self, peer: PeerId) {
        for q in self.dial_waiters.remove(&peer).unwrap_or_default() {
            if let Some(l) = self.lookups.get_mut(&q) {
                l.dialing.remove(&peer);
            }
            self.maybe_end_lookup(q);
        }
    }

    fn finish_lookup(&mut self, query: QueryId) {
        if let Some(mut q) = self.kad().query_mut(&query) {
            q.finish();
        }
        if let Some(lookup) = self.lookups.remove(&query)
            && !lookup.found.is_empty()
        {
            self.cache
                .insert(lookup.key, (Instant::now(), lookup.found));
        }
    }

    fn maybe_end_lookup(&mut self, query: QueryId) {
        if let Some(lookup) = self.lookups.get(&query)
            && lookup.query_done
            && lookup.dialing.is_empty()
        {
            self.finish_lookup(query);
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Addresses worth dialling later: routable ones, and loopback
                // ones only when the peer is reached over loopback (nodes
                // sharing one host). A peer's loopback address elsewhere is
                // ourselves, and a link-local one lacks its interface.
                let over_loopback = self.peers.get(&peer_id).is_some_and(|p| {
                    p.connections
                        .values()
                        .filter_map(ip_of)
                        .any(|ip| ip.is_loopback())
                });
                for addr in &info.listen_addrs {
                    if ip_of(addr)
                        .is_some_and(|ip| routable(&ip) || (over_loopback && ip.is_loopback()))
                    {
                        self.kad().add_address(&peer_id, addr.clone());
                    }
                }
                if self.peers.contains_key(&peer_id) {
                    let mut ips: Vec<IpAddr> = info
                        .listen_addrs
                        .iter()
                        .filter_map(ip_of)
                        .filter(routable)
                        .collect();
                    ips.sort();
                    ips.dedup();
                    self.observer.peer_addresses(&peer_id, &ips);
                }
                self.peers.entry(peer_id).or_default().announced = info.listen_addrs;
                self.publish_status();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            })) => {
                tracing::debug!(%peer, error = %e, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(_)) => {}
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "P2P listening");
                if let Some(ip) = ip_of(&address) {
                    self.own_ips.insert(ip);
                }
                let text = address.to_string();
                self.status.send_modify(|s| s.listen_addrs.push(text));
                // The advertised address, on the port actually bound.
                if let Some(ip) = self.config.advertise_addr
                    && self.swarm.external_addresses().next().is_none()
                    && let Some(port) = address.iter().find_map(|p| match p {
                        Protocol::Tcp(port) => Some(port),
                        _ => None,
                    })
                {
                    self.swarm
                        .add_external_address(Multiaddr::from(ip).with(Protocol::Tcp(port)));
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    // A dialled address is a known-good one for the table.
                    self.kad().add_address(&peer_id, address.clone());
                }
                let ip = ip_of(&remote);
                self.peers
                    .entry(peer_id)
                    .or_default()
                    .connections
                    .insert(connection_id, remote);
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, ?ip, "peer connected");
                }
                if let Some(ip) = ip {
                    self.observer.peer_connected(&peer_id, ip);
                }
                if let Some(queries) = self.dial_waiters.remove(&peer_id) {
                    for q in queries {
                        self.offer_provider(q, peer_id);
                        self.maybe_end_lookup(q);
                    }
                }
                self.publish_status();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(state) = self.peers.get_mut(&peer_id) {
                    state.connections.remove(&connection_id);
                    if state.connections.is_empty() {
                        self.peers.remove(&peer_id);
                    }
                }
                if num_established == 0 {
                    tracing::debug!(peer = %peer_id, "peer disconnected");
                    self.observer.peer_disconnected(&peer_id);
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(from = %send_back_addr, %error, "inbound P2P connection failed");
                // Not counted: our own dials of our own addresses
                // (LocalPeerId) and connections we dropped ourselves.
                if matches!(error, libp2p::swarm::ListenError::Transport(_)) {
                    self.observer.handshake_failed(true);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "outbound P2P connection failed");
                if dial_met_a_stranger(&error) {
                    self.observer.handshake_failed(false);
                }
                if let Some(peer) = peer_id {
                    self.dial_failed(peer);
                }
            }
            _ => {}
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                    providers, ..
                })) => {
                    for p in providers {
                        self.offer_provider(id, p);
                    }
                    if step.last {
                        self.query_finished(id);
                    }
                }
                QueryResult::GetProviders(_) if step.last => self.query_finished(id),
                QueryResult::StartProviding(result) => {
                    if let Err(e) = result {
                        tracing::debug!(error = ?e, "announcement reached no peer");
                    }
                    if self.advertising.remove(&id) {
                        self.advertise_more();
                    }
                }
                QueryResult::Bootstrap(_) => self.publish_status(),
                _ => {}
            },
            kad::Event::RoutingUpdated { .. } => self.publish_status(),
            _ => {}
        }
    }

    fn query_finished(&mut self, id: QueryId) {
        if let Some(l) = self.lookups.get_mut(&id) {
            l.query_done = true;
        }
        self.maybe_end_lookup(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8, psk: Option<PreSharedKey>, bootstrap: bool) -> (P2pRouter, CancellationToken) {
        node_observed(n, psk, bootstrap, Arc::new(NoObserver))
    }

    fn node_observed(
        n: u8,
        psk: Option<PreSharedKey>,
        bootstrap: bool,
        observer: Arc<dyn P2pObserver>,
    ) -> (P2pRouter, CancellationToken) {
        let ip: IpAddr = format!("127.0.0.{n}").parse().expect("ip");
        let config = P2pConfig {
            keypair: Keypair::generate_ed25519(),
            psk,
            listen: vec![Multiaddr::from(ip).with(Protocol::Tcp(0))],
            registry_port: 5000,
            advertise_addr: Some(ip),
            provider_ttl: Duration::from_secs(60),
            reannounce_interval: Duration::from_secs(30),
            lookup_cache_ttl: Duration::from_millis(10),
            idle_connection_timeout: Duration::from_secs(30),
            has_bootstrap: bootstrap,
        };
        let shutdown = CancellationToken::new();
        let (router, _task) = start(config, observer, shutdown.clone()).expect("start");
        (router, shutdown)
    }

    #[derive(Default)]
    struct Failures {
        inbound: std::sync::atomic::AtomicUsize,
        outbound: std::sync::atomic::AtomicUsize,
    }

    impl P2pObserver for Failures {
        fn handshake_failed(&self, inbound: bool) {
            let counter = if inbound {
                &self.inbound
            } else {
                &self.outbound
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl Failures {
        fn counts(&self) -> (usize, usize) {
            use std::sync::atomic::Ordering::Relaxed;
            (self.inbound.load(Relaxed), self.outbound.load(Relaxed))
        }
    }

    /// Handshake failures count hosts that answered and could not prove
    /// the key; not closed ports, and not a node dialling itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_failures_count_strangers_only() {
        let a_failures = Arc::new(Failures::default());
        let d_failures = Arc::new(Failures::default());
        let (a, sa) = node_observed(
            31,
            Some(PreSharedKey::new([7; 32])),
            false,
            a_failures.clone(),
        );
        let a_addr = listen_addr(&a).await;
        let a_plain: Multiaddr = a_addr
            .iter()
            .filter(|p| !matches!(p, Protocol::P2p(_)))
            .collect();
        // A closed port, and A's own address.
        let closed = std::net::TcpListener::bind("127.0.0.31:0").expect("bind");
        let closed_port = closed.local_addr().expect("addr").port();
        drop(closed);
        let closed_addr =
            Multiaddr::from(IpAddr::from([127, 0, 0, 31])).with(Protocol::Tcp(closed_port));
        a.dial(closed_addr).await.expect("dial");
        a.dial(a_plain.clone()).await.expect("dial");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(a_failures.counts(), (0, 0), "closed port or self counted");
        // A node with another key: both ends count it.
        let (d, sd) = node_observed(
            32,
            Some(PreSharedKey::new([9; 32])),
            true,
            d_failures.clone(),
        );
        d.dial(a_plain).await.expect("dial");
        // Garbage from the wrong key can read as a long frame that is then
        // waited for: the handshake's 10 s timeout ends such an attempt.
        for _ in 0..750 {
            if a_failures.counts().0 > 0 && d_failures.counts().1 > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            a_failures.counts().0 > 0,
            "A did not count D: {:?}",
            a_failures.counts()
        );
        assert!(
            d_failures.counts().1 > 0,
            "D did not count A: {:?}",
            d_failures.counts()
        );
        for s in [sa, sd] {
            s.cancel();
        }
    }

    async fn listen_addr(router: &P2pRouter) -> Multiaddr {
        for _ in 0..100 {
            let status = router.status();
            if let Some(a) = status.listen_addrs.first() {
                return a
                    .parse::<Multiaddr>()
                    .expect("multiaddr")
                    .with(Protocol::P2p(router.peer_id()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no listen address");
    }

    async fn lookup_all(router: &P2pRouter, key: &str) -> Vec<Peer> {
        let mut peers: Vec<Peer> =
            tokio::time::timeout(Duration::from_secs(10), router.lookup(key).collect())
                .await
                .expect("lookup ends");
        peers.sort_by_key(|p| p.addr);
        peers
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_with_the_key_find_each_other_and_others_cannot_join() {
        let psk = PreSharedKey::new([7; 32]);
        let (a, sa) = node(21, Some(psk), false);
        let (b, sb) = node(22, Some(psk), true);
        let (c, sc) = node(23, Some(psk), true);
        let a_addr = listen_addr(&a).await;
        for n in [&b, &c] {
            n.dial(a_addr.clone()).await.expect("dial");
        }
        for _ in 0..100 {
            if b.status().routing_table_peers > 0 && c.status().routing_table_peers > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b.bootstrap().await.expect("bootstrap");
        c.bootstrap().await.expect("bootstrap");
        a.advertise(vec!["sha256:aaa".into(), "docker.io/library/x:1".into()])
            .await
            .expect("advertise");
        b.advertise(vec!["sha256:aaa".into()])
            .await
            .expect("advertise");
        for _ in 0..100 {
            if a.status().initial_advertise_done && b.status().initial_advertise_done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let peers = lookup_all(&c, "sha256:aaa").await;
        let addrs: Vec<String> = peers.iter().map(|p| p.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.21:5000", "127.0.0.22:5000"]);
        // Self is never a provider of its own lookups.
        let peers = lookup_all(&a, "sha256:aaa").await;
        assert_eq!(
            peers.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>(),
            ["127.0.0.22:5000"]
        );
        assert_eq!(lookup_all(&b, "docker.io/library/x:1").await.len(), 1);
        assert!(lookup_all(&b, "sha256:nobody").await.is_empty());

        // Withdrawn keys are no longer announced by that node; lookups served
        // from its own store stop listing it at once.
        a.withdraw(vec!["docker.io/library/x:1".into()])
            .await
            .expect("withdraw");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(a.status().advertised_keys, 1);

        // A node with another key cannot join.
        let (d, sd) = node(24, Some(PreSharedKey::new([9; 32])), true);
        d.dial(a_addr.clone()).await.expect("dial");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(d.status().routing_table_peers, 0);
        assert!(lookup_all(&d, "sha256:aaa").await.is_empty());
        let a_peers = a.peers().await.expect("peers");
        assert!(
            a_peers.iter().all(|p| p.id != d.peer_id().to_string()),
            "{a_peers:?}"
        );
        for s in [sa, sb, sc, sd] {
            s.cancel();
        }
    }

    #[test]
    fn routable_addresses() {
        for (ip, want) in [
            ("10.0.0.1", true),
            ("192.168.1.2", true),
            ("127.0.0.1", false),
            ("127.0.0.5", false),
            ("169.254.1.1", false),
            ("0.0.0.0", false),
            ("fd00::1", true),
            ("::1", false),
            ("fe80::1", false),
            ("::", false),
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(routable(&ip), want, "{ip}");
        }
    }
}
