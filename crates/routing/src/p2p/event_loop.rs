//! The event loop: the only code that touches the `Swarm`. It dispatches
//! swarm events and commands to the parts ([`PeerTable`], [`Lookups`],
//! [`Advertiser`]) and publishes the router's status.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, GetProvidersOk, InboundRequest, QueryResult};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{Swarm, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, connection_limits, identify, ping};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::advertiser::{Advertiser, Outcome};
use super::behaviour::{Behaviour, BehaviourEvent, fanout_behaviour, limits};
use super::lookups::{Lookups, Net};
use super::peers::{PeerTable, dialable, ip_of};
use super::records::{ProviderStore, StoreLimits};
use super::rendezvous::{self, Ask, Board, Reply};
use super::{Command, P2pConfig, P2pCounters, P2pError, PeerEvent};
use crate::{Fanout, KAD_PROTOCOL, Peer, RouterStatus, record_key};
use peermirror_net::interface_addresses;

/// The borrow of the loop's parts that [`Lookups`] works with.
macro_rules! net {
    ($s:ident) => {
        Net {
            swarm: &mut $s.swarm,
            peers: &$s.peers,
            own_ips: &$s.own_ips,
            registry_port: $s.registry_port,
        }
    };
}
/// How long one Kademlia query may run.
const QUERY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often caches and expired records are pruned.
const HOUSEKEEPING: Duration = Duration::from_secs(5);

pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    peers: PeerTable,
    lookups: Lookups,
    advertiser: Advertiser,
    status: watch::Sender<RouterStatus>,
    counters: P2pCounters,
    events: Option<mpsc::UnboundedSender<PeerEvent>>,
    registry_port: u16,
    advertise_addr: Option<IpAddr>,
    own_ips: HashSet<IpAddr>,
    /// The routing table's size, and when it was counted (counting walks
    /// every bucket: not on every event).
    table: (usize, Option<Instant>),
    /// The fan-out decisions this node makes as a rendezvous.
    board: Board<PeerId>,
    /// Whether the fan-out is on.
    fanout: bool,
    /// Asks sent to other rendezvous nodes, waiting for their answer: the
    /// digest, the rendezvous, who waits.
    fanout_asks: HashMap<OutboundRequestId, (String, PeerId, oneshot::Sender<Option<Fanout>>)>,
    /// Digests this node was told to fetch itself, with their rendezvous
    /// and when: once it announces one, it tells the rendezvous.
    leading: HashMap<String, (PeerId, Instant)>,
    fanout_lease: Duration,
    /// Answers that name a source this node is not connected to yet,
    /// waiting for the dial.
    fanout_dials: HashMap<PeerId, Vec<oneshot::Sender<Option<Fanout>>>>,
}

/// How long a count of the routing table is reused.
const TABLE_COUNT_TTL: Duration = Duration::from_millis(200);

impl EventLoop {
    pub(super) fn new(
        config: P2pConfig,
        transport: Boxed<(PeerId, StreamMuxerBox)>,
        commands: mpsc::Receiver<Command>,
    ) -> Result<(EventLoop, watch::Receiver<RouterStatus>), P2pError> {
        let P2pConfig {
            keypair,
            registry_port,
            has_bootstrap,
            settings,
            counters,
            events,
            ..
        } = config;
        let peer_id = keypair.public().to_peer_id();
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config
            .set_provider_record_ttl(Some(settings.provider_ttl))
            // Renewals are the advertiser's, spread over the interval.
            .set_provider_publication_interval(None)
            .set_publication_interval(None)
            .set_replication_interval(None)
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_query_timeout(QUERY_TIMEOUT)
            .set_record_ttl(Some(settings.provider_ttl));
        let store = ProviderStore::new(peer_id, StoreLimits::default());
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        kad.set_mode(Some(kad::Mode::Server));
        let mut identify_config =
            identify::Config::new("/peermirror/1.0.0".to_string(), keypair.public())
                .with_agent_version(format!("peermirror/{}", env!("CARGO_PKG_VERSION")))
                // Peers learn of an address that comes up later.
                .with_push_listen_addr_updates(true)
                // No cache of what peers announce: the swarm would dial
                // those addresses unfiltered (a peer's `::1` or
                // `127.0.0.1` is this very host, and such a dial, the
                // fastest to answer, fails the whole dial with a wrong peer
                // id). Dials use the routing table's addresses, which only
                // ever hold dialable ones (`on_identify`).
                .with_cache_size(0);
        if settings.advertise_addr.is_some() {
            // Only the advertised address is announced to peers.
            identify_config = identify_config.with_hide_listen_addrs(true);
        }
        let behaviour = Behaviour {
            limits: connection_limits::Behaviour::new(limits()),
            kad,
            identify: identify::Behaviour::new(identify_config),
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(5)),
            ),
            fanout: fanout_behaviour(),
        };
        let mut swarm = Swarm::new(
            transport,
            behaviour,
            peer_id,
            libp2p::swarm::Config::with_tokio_executor()
                .with_idle_connection_timeout(settings.idle_connection_timeout),
        );
        for addr in &settings.listen() {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| P2pError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        let (status, status_rx) = watch::channel(RouterStatus {
            needs_peers: has_bootstrap,
            ..RouterStatus::default()
        });
        let event_loop = EventLoop {
            swarm,
            commands,
            peers: PeerTable::default(),
            lookups: Lookups::new(settings.lookup_cache_ttl, counters.lookups_dropped.clone()),
            advertiser: Advertiser::new(
                settings.reannounce_interval,
                has_bootstrap,
                counters.advertise_failures.clone(),
            ),
            status,
            counters,
            events,
            registry_port,
            advertise_addr: settings.advertise_addr,
            own_ips: settings
                .advertise_addr
                .into_iter()
                .chain(interface_addresses())
                .collect(),
            table: (0, None),
            board: Board::new(settings.fanout_followers, settings.fanout_lease),
            fanout: settings.fanout_followers > 0,
            fanout_asks: HashMap::new(),
            fanout_dials: HashMap::new(),
            leading: HashMap::new(),
            fanout_lease: settings.fanout_lease,
        };
        Ok((event_loop, status_rx))
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        loop {
            let due = self
                .advertiser
                .next_due()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some(key) = self.lookups.next_gone() => {
                    let net = net!(self);
                    self.lookups.asker_gone(net, key);
                }
                _ = sleep_until(due) => {}
                _ = housekeeping.tick() => {
                    let now = Instant::now();
                    self.own_ips.extend(interface_addresses());
                    self.lookups.housekeeping(now);
                    self.swarm.behaviour_mut().kad.store_mut().expire(now);
                    self.fanout_dials.retain(|_, waiters| {
                        waiters.retain(|w| !w.is_closed());
                        !waiters.is_empty()
                    });
                    let lease = self.fanout_lease;
                    self.leading.retain(|_, (_, at)| now.duration_since(*at) < lease);
                }
            }
            self.advertiser
                .pump(&mut self.swarm.behaviour_mut().kad, Instant::now());
            self.publish_status();
        }
        tracing::debug!("routing event loop stopped");
    }

    fn emit(&self, event: PeerEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }

    /// Peers in the routing table, counted at most every
    /// [`TABLE_COUNT_TTL`] unless `fresh` is asked for.
    fn routing_table_peers(&mut self, fresh: bool) -> usize {
        let now = Instant::now();
        if fresh
            || self
                .table
                .1
                .is_none_or(|at| now.duration_since(at) > TABLE_COUNT_TTL)
        {
            let count = self
                .swarm
                .behaviour_mut()
                .kad
                .kbuckets()
                .map(|b| b.num_entries())
                .sum();
            self.table = (count, Some(now));
        }
        self.table.0
    }

    fn publish_status(&mut self) {
        let table = self.routing_table_peers(false);
        let connected = self.peers.len();
        let first_round = self.advertiser.first_round();
        let advertised = self.advertiser.len();
        let pending = self.advertiser.pending();
        self.counters.routing_table_peers.set(table as i64);
        self.counters.connected_peers.set(connected as i64);
        self.counters.advertised_keys.set(advertised as i64);
        self.counters.pending_keys.set(pending as i64);
        self.status.send_if_modified(|s| {
            let before = (
                s.routing_table_peers,
                s.connected_peers,
                s.first_round,
                s.advertised_keys,
                s.pending_keys,
            );
            s.routing_table_peers = table;
            s.connected_peers = connected;
            s.first_round = first_round;
            s.advertised_keys = advertised;
            s.pending_keys = pending;
            before != (table, connected, first_round, advertised, pending)
        });
    }

    fn on_command(&mut self, command: Command) {
        match command {
            // The status is current before the caller hears back.
            Command::Advertise { keys, round, done } => {
                self.fanout_done(&keys);
                self.advertiser.add(keys, round);
                self.publish_status();
                let _ = done.send(());
            }
            Command::Withdraw { keys, done } => {
                self.advertiser
                    .remove(keys, &mut self.swarm.behaviour_mut().kad);
                self.publish_status();
                let _ = done.send(());
            }
            Command::Lookup {
                key,
                fresh,
                reply,
                gone,
            } => {
                let net = net!(self);
                self.lookups.submit(net, &key, fresh, reply, gone);
            }
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, error = %e, "cannot dial");
                }
            }
            Command::Bootstrap => {
                if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                    tracing::debug!(error = %e, "kademlia bootstrap not possible yet");
                }
            }
            Command::ExpectPeers(expect) => {
                self.advertiser.expect_peers(expect);
                self.status
                    .send_if_modified(|s| std::mem::replace(&mut s.needs_peers, expect) != expect);
                self.publish_status();
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peers.infos(&self.own_ips));
            }
            Command::Fanout {
                digest,
                failed,
                asker,
                reply,
            } => self.ask_rendezvous(digest, failed, asker, reply),
        }
    }

    /// The rendezvous of `digest`: of this node and the peers in its
    /// routing table, the one closest to the digest's record key. Nodes
    /// with the same routing table agree on it.
    fn rendezvous_for(&mut self, digest: &str) -> PeerId {
        let target = kad::KBucketKey::new(kad::RecordKey::new(&record_key(digest)));
        let local = *self.swarm.local_peer_id();
        let mut best = (kad::KBucketKey::from(local).distance(&target), local);
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                let distance = entry.node.key.distance(&target);
                if distance < best.0 {
                    best = (distance, *entry.node.key.preimage());
                }
            }
        }
        best.1
    }

    fn ask_rendezvous(
        &mut self,
        digest: String,
        failed: Option<PeerId>,
        asker: crate::Asker,
        reply: oneshot::Sender<Option<Fanout>>,
    ) {
        // Alone, there is nobody to follow and nobody to lead: no entry is
        // made (a client asking for random digests would fill the board).
        if !self.fanout || self.routing_table_peers(false) == 0 {
            let _ = reply.send(None);
            return;
        }
        let rendezvous = self.rendezvous_for(&digest);
        let ask = Ask {
            digest,
            failed: failed.map(|p| p.to_string()),
            done: false,
            follow_only: asker == crate::Asker::Other,
        };
        let local = *self.swarm.local_peer_id();
        if rendezvous == local {
            let answer = self.board.assign(local, &ask, Instant::now());
            self.fanout_answer(ask.digest, rendezvous, answer, reply);
        } else {
            tracing::debug!(digest = %ask.digest, %rendezvous, "asking the fan-out rendezvous");
            let digest = ask.digest.clone();
            let id = self
                .swarm
                .behaviour_mut()
                .fanout
                .send_request(&rendezvous, ask);
            self.fanout_asks.insert(id, (digest, rendezvous, reply));
        }
    }

    /// Of `keys` (this node now holds them), the digests whose fetch it led:
    /// tells their rendezvous that the fetch is done.
    fn fanout_done(&mut self, keys: &[String]) {
        if self.leading.is_empty() {
            return;
        }
        let local = *self.swarm.local_peer_id();
        for key in keys {
            let Some((rendezvous, _)) = self.leading.remove(key) else {
                continue;
            };
            let ask = Ask {
                digest: key.clone(),
                failed: None,
                done: true,
                follow_only: false,
            };
            if rendezvous == local {
                self.board.assign(local, &ask, Instant::now());
            } else {
                // The answer says nothing; it finds no asker waiting.
                self.swarm
                    .behaviour_mut()
                    .fanout
                    .send_request(&rendezvous, ask);
            }
        }
    }

    /// Turns a rendezvous answer into what the mirror acts on: a source is
    /// reported once this node holds a connection to it (so the source's
    /// dataplane admits this node's registry requests).
    fn fanout_answer(
        &mut self,
        digest: String,
        rendezvous: PeerId,
        answer: Reply,
        reply: oneshot::Sender<Option<Fanout>>,
    ) {
        let source = match answer {
            Reply::Lead => {
                if self.leading.len() < rendezvous::MAX_ENTRIES {
                    self.leading.insert(digest, (rendezvous, Instant::now()));
                }
                let _ = reply.send(Some(Fanout::Lead));
                return;
            }
            Reply::Refused => {
                let _ = reply.send(None);
                return;
            }
            Reply::Follow { peer } => peer.parse::<PeerId>(),
        };
        let source = match source {
            Ok(p) if p != *self.swarm.local_peer_id() => p,
            _ => {
                let _ = reply.send(None);
                return;
            }
        };
        if let Some(ip) = self.peers.endpoint_ip(&source, &self.own_ips) {
            let _ = reply.send(Some(Fanout::Follow(Peer {
                id: source,
                addr: SocketAddr::new(ip, self.registry_port),
            })));
            return;
        }
        let condition = if self.peers.is_connected(&source) {
            PeerCondition::Always
        } else {
            PeerCondition::DisconnectedAndNotDialing
        };
        match self
            .swarm
            .dial(DialOpts::peer_id(source).condition(condition).build())
        {
            Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                self.fanout_dials.entry(source).or_default().push(reply);
            }
            Err(e) => {
                tracing::debug!(%source, error = %e, "cannot dial the fan-out source");
                let _ = reply.send(None);
            }
        }
    }

    /// A connection to `peer` is up, or its dial failed: answer the asks
    /// that wait for it.
    fn fanout_dialled(&mut self, peer: &PeerId) {
        let Some(waiters) = self.fanout_dials.remove(peer) else {
            return;
        };
        let source = self.peers.endpoint_ip(peer, &self.own_ips).map(|ip| Peer {
            id: *peer,
            addr: SocketAddr::new(ip, self.registry_port),
        });
        for w in waiters {
            let _ = w.send(source.clone().map(Fanout::Follow));
        }
    }

    fn on_fanout_event(&mut self, event: request_response::Event<Ask, Reply>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let answer = self.board.assign(peer, &request, Instant::now());
                // Logged as the rendezvous's own bookkeeping.
                tracing::debug!(target: "peermirror_routing::p2p::rendezvous", digest = %request.digest, asker = %peer, ?answer, "fan-out rendezvous answered");
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .fanout
                    .send_response(channel, answer);
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((digest, rendezvous, reply)) = self.fanout_asks.remove(&request_id) {
                    self.fanout_answer(digest, rendezvous, response, reply);
                }
            }
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                tracing::debug!(%peer, %error, "fan-out rendezvous did not answer");
                if let Some((_, _, reply)) = self.fanout_asks.remove(&request_id) {
                    let _ = reply.send(None);
                }
            }
            request_response::Event::InboundFailure { .. }
            | request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identify(peer_id, info.listen_addrs),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(_)) => {}
            // A peer that does not speak ping (another implementation of the
            // DHT) keeps its connection; one that stops answering loses it.
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                result: Err(ping::Failure::Unsupported),
                ..
            })) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            })) => {
                tracing::debug!(%peer, error = %e, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Limits(never)) => match never {},
            SwarmEvent::Behaviour(BehaviourEvent::Fanout(event)) => self.on_fanout_event(event),
            SwarmEvent::NewListenAddr { address, .. } => self.on_listening(address),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    // A dialled address is a known-good one for the table.
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address.clone());
                }
                let ip = ip_of(&remote);
                let outbound = endpoint.is_dialer();
                if self
                    .peers
                    .connected(peer_id, connection_id, remote, outbound)
                {
                    tracing::debug!(peer = %peer_id, ?ip, "peer connected");
                }
                if let Some(ip) = ip {
                    self.emit(PeerEvent::Connected { peer: peer_id, ip });
                }
                let net = net!(self);
                self.lookups.connected(net, peer_id);
                self.fanout_dialled(&peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } if self.peers.closed(&peer_id, connection_id) => {
                tracing::debug!(peer = %peer_id, "peer disconnected");
                self.emit(PeerEvent::Disconnected { peer: peer_id });
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(from = %send_back_addr, %error, "inbound P2P connection failed");
                // Not counted: our own dials of our own addresses
                // (LocalPeerId) and connections we dropped ourselves.
                match error {
                    libp2p::swarm::ListenError::Transport(_) => {
                        self.counters.handshake_failures_inbound.inc();
                    }
                    libp2p::swarm::ListenError::Denied { .. } => {
                        self.counters.connections_refused.inc();
                    }
                    _ => {}
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "outbound P2P connection failed");
                if dial_met_a_stranger(&error) {
                    self.counters.handshake_failures_outbound.inc();
                }
                if let Some(peer) = peer_id {
                    let net = net!(self);
                    self.lookups.dial_failed(net, peer);
                    self.fanout_dialled(&peer);
                }
            }
            _ => {}
        }
    }

    fn on_identify(&mut self, peer: PeerId, listen_addrs: Vec<Multiaddr>) {
        // Addresses worth dialling later (see `dialable`): never one of our
        // own, never loopback unless the peer is reached over loopback.
        let over_loopback = self.peers.over_loopback(&peer);
        for addr in &listen_addrs {
            if ip_of(addr).is_some_and(|ip| dialable(&ip, &self.own_ips, over_loopback)) {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
            }
        }
        self.peers.announced(&peer, listen_addrs);
    }

    fn on_listening(&mut self, address: Multiaddr) {
        tracing::info!(%address, "P2P listening");
        if let Some(ip) = ip_of(&address) {
            self.own_ips.insert(ip);
        }
        let listening = address.clone();
        self.status.send_modify(|s| s.listen_addrs.push(listening));
        // The advertised address, on the port actually bound.
        if let Some(ip) = self.advertise_addr
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

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => match result {
                QueryResult::GetProviders(result) if self.lookups.owns(&id) => {
                    if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                        let net = net!(self);
                        self.lookups
                            .providers(net, id, providers.into_iter().collect());
                    }
                    if step.last {
                        let net = net!(self);
                        self.lookups.query_done(net, id);
                    }
                }
                QueryResult::StartProviding(result) if self.advertiser.owns(&id) => {
                    let table = self.routing_table_peers(true);
                    self.advertiser.finished(
                        id,
                        Outcome {
                            finished: result.is_ok(),
                            successes: stats.num_successes(),
                            table,
                        },
                        Instant::now(),
                    );
                }
                _ => {}
            },
            kad::Event::InboundRequest {
                request:
                    InboundRequest::AddProvider {
                        record: Some(mut record),
                    },
            } => {
                // Only addresses another node can dial it at (the rule of
                // identify's addresses); the store caps how many.
                let over_loopback = self.peers.over_loopback(&record.provider);
                let own = &self.own_ips;
                record
                    .addresses
                    .retain(|a| ip_of(a).is_some_and(|ip| dialable(&ip, own, over_loopback)));
                let key = record.key.clone();
                match self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .add_provider(record)
                {
                    Ok(()) => self.lookups.invalidate(&key),
                    Err(e) => tracing::debug!(error = %e, "provider record not stored"),
                }
            }
            // The first peer after being alone: announce to it.
            kad::Event::RoutingUpdated { .. } if self.routing_table_peers(true) == 1 => {
                self.advertiser.peers_appeared();
            }
            _ => {}
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
