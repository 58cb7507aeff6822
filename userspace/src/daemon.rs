//! The composition root: builds every part from its configuration, runs the
//! tasks, and shuts them down in order (stop accepting, drain responses in
//! flight, stop announcing and following containerd, then the status server).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::dataplane::{Dataplane, DataplaneConfig, DataplaneMode};
use crate::metrics::{
    self, DataplaneLabels, HandshakeLabels, Metrics, Readiness, ServingPathLabels,
};
use crate::mirror::{Mirror, MirrorConfig};
use crate::oci::ReferenceFilter;
use crate::registry::uring::Uring;
use crate::registry::{Handler, HandlerConfig, Server, ServerConfig, ServingPath};
use crate::routing::bootstrap::{self, BootstrapConfig};
use crate::routing::identity::{self, IdentityError};
use crate::routing::p2p::{self, P2pConfig, P2pError, P2pObserver, P2pRouter};
use crate::routing::{Router, sync};
use crate::store::{ContainerdConfig, ContainerdStore, ContentStore};
use crate::tls::{TlsFiles, TlsState};

/// P2P settings, before the key files are read.
#[derive(Debug, Clone)]
pub struct P2pSettings {
    pub listen: Vec<Multiaddr>,
    /// `None` means the operator chose an open network.
    pub psk_file: Option<PathBuf>,
    pub advertise_addr: Option<IpAddr>,
    pub provider_ttl: Duration,
    pub reannounce_interval: Duration,
    pub lookup_cache_ttl: Duration,
    pub idle_connection_timeout: Duration,
    pub bootstrap: BootstrapConfig,
    pub http_bootstrap_addr: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub containerd: ContainerdConfig,
    /// `server.serving_path` is a preference: fall back when it is not
    /// available here.
    pub serving_path_auto: bool,
    pub uploads: crate::registry::UploadLimits,
    pub dataplane: DataplaneConfig,
    /// How long a peer stays admitted to the registry port after its last
    /// P2P connection closed.
    pub admission_ttl: Duration,
    /// mTLS on the registry port and towards peers.
    pub tls: Option<TlsFiles>,
    pub registry_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub filter: ReferenceFilter,
    pub p2p: P2pSettings,
    pub mirror: MirrorConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    P2p(#[from] P2pError),
    #[error(
        "--serving-path io-uring: io_uring is not usable here ({0}); use --serving-path sendfile or auto"
    )]
    IoUring(std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("--dataplane required: {0}")]
    Dataplane(#[from] crate::dataplane::DataplaneError),
}

/// Binds `addr`; an unspecified IPv6 address that cannot be bound (IPv6
/// disabled) falls back to the IPv4 one.
async fn listen(what: &'static str, addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e)
            if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED
                && e.kind() == std::io::ErrorKind::AddrNotAvailable =>
        {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            TcpListener::bind(v4)
                .await
                .map_err(|source| DaemonError::Listen {
                    what,
                    addr: v4,
                    source,
                })
        }
        Err(source) => Err(DaemonError::Listen { what, addr, source }),
    }
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(mut config: DaemonConfig, shutdown: CancellationToken) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DaemonError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let keypair = identity::load_or_create(&config.data_dir)?;
    let tls = config.tls.clone().map(TlsState::load).transpose()?;
    let psk = config
        .p2p
        .psk_file
        .as_deref()
        .map(identity::load_psk)
        .transpose()?;
    // The dataplane first: a socket's cgroup is fixed when it is created, so
    // the daemon joins its cgroup before opening any.
    let dataplane = start_dataplane(&config.dataplane)?;
    // From here on every return detaches it, a failed start included.
    let _detach = DetachOnReturn(dataplane.clone());
    let registry_listener = listen("registry", config.registry_addr).await?;
    let metrics_listener = listen("metrics", config.metrics_addr).await?;
    let bootstrap_listener = match config.p2p.http_bootstrap_addr {
        Some(addr) => Some(listen("HTTP bootstrap entry", addr).await?),
        None => None,
    };

    let mut prometheus = Registry::default();
    let metrics = Metrics::new(&mut prometheus);
    let uring = choose_serving_path(&mut config, &metrics).await?;
    metrics
        .serving_path
        .get_or_create(&ServingPathLabels {
            path: config.server.serving_path.as_str().to_string(),
        })
        .set(1);
    metrics.p2p_open_network.set(i64::from(psk.is_none()));
    metrics
        .dataplane_active
        .get_or_create(&DataplaneLabels {
            mode: config.dataplane.mode.as_str().to_string(),
        })
        .set(i64::from(dataplane.is_some()));
    if psk.is_none() {
        tracing::warn!(
            "RUNNING AN OPEN P2P NETWORK (--insecure-open-network): any host that reaches the P2P port can join, \
             learn what this node holds and have its announcements trusted. Use --psk-file in production."
        );
    }

    // Routing first: the P2P port must be up before we announce anything.
    let background = CancellationToken::new();
    let observer = Arc::new(Observer {
        metrics: metrics.clone(),
        peers: Mutex::new(BTreeMap::new()),
        dataplane: dataplane.clone(),
        disconnected: Mutex::new(HashMap::new()),
    });
    if let Some(dp) = &dataplane {
        prometheus
            .sub_registry_with_prefix("peermirror")
            .register_collector(Box::new(PeerCollector {
                dataplane: dp.clone(),
                observer: observer.clone(),
            }));
    }
    let (router, router_task) = p2p::start(
        P2pConfig {
            keypair,
            psk,
            listen: config.p2p.listen.clone(),
            registry_port: local_port(&registry_listener, config.registry_addr.port()),
            advertise_addr: config.p2p.advertise_addr,
            provider_ttl: config.p2p.provider_ttl,
            reannounce_interval: config.p2p.reannounce_interval,
            lookup_cache_ttl: config.p2p.lookup_cache_ttl,
            idle_connection_timeout: config.p2p.idle_connection_timeout,
            has_bootstrap: config.p2p.bootstrap.is_configured(),
        },
        observer.clone(),
        background.clone(),
    )?;

    let store = ContainerdStore::new(config.containerd.clone());
    let mut tasks = vec![tokio::spawn(store.clone().run(background.clone()))];
    tasks.push(tokio::spawn(update_gauges(
        store.clone(),
        router.clone(),
        metrics.clone(),
        background.clone(),
    )));
    tasks.push(tokio::spawn(sync::run(
        store.catalog(),
        store.watch_health(),
        Arc::new(router.clone()),
        background.clone(),
    )));
    tasks.push(tokio::spawn(bootstrap::run(
        config.p2p.bootstrap.clone(),
        router.clone(),
        background.clone(),
    )));
    if let Some(listener) = bootstrap_listener {
        let status = router.watch_status();
        let peer_id = router.peer_id();
        let advertise = config.p2p.advertise_addr;
        let entry = Arc::new(move || own_entry(&status.borrow().listen_addrs, advertise, peer_id));
        tasks.push(tokio::spawn(bootstrap::serve_http(
            listener,
            entry,
            background.clone(),
        )));
    }

    if dataplane.is_some() {
        tasks.push(tokio::spawn(dataplane_upkeep(
            observer.clone(),
            config.admission_ttl,
            background.clone(),
        )));
    }
    if let Some(tls) = &tls {
        tasks.push(tokio::spawn(
            tls.clone()
                .watch(Duration::from_secs(10), background.clone()),
        ));
    }
    if tls.is_none() && dataplane.is_none() {
        tracing::warn!(
            registry = %config.registry_addr,
            namespace = %config.containerd.namespace,
            "the registry port is open: any host that can reach it can read every image of this containerd namespace. \
             Protect it with mTLS (--tls-cert, --tls-key, --tls-client-ca) or the kernel boundary (--dataplane)."
        );
    }
    let mirror = Mirror::with_tls(Arc::new(router.clone()), config.mirror.clone(), tls.clone());
    let handler = Arc::new(Handler::new(
        store.clone(),
        Some(mirror),
        HandlerConfig {
            filter: config.filter.clone(),
            uploads: config.uploads,
        },
        metrics.clone(),
    ));
    let server = Server::build(handler, config.server.clone(), metrics.clone(), uring, tls);
    tracing::info!(
        registry = %local(&registry_listener),
        metrics = %local(&metrics_listener),
        peer_id = %router.peer_id(),
        serving_path = %config.server.serving_path,
        containerd = %config.containerd.socket.display(),
        namespace = %config.containerd.namespace,
        "peermirror started"
    );
    let registry_task = tokio::spawn(server.serve(registry_listener, shutdown.clone()));

    let status_shutdown = CancellationToken::new();
    let status = Arc::new(DaemonStatus {
        store: store.clone(),
        router: router.clone(),
        observer,
        config: config.clone(),
    });
    let status_task = tokio::spawn(metrics::serve(
        metrics_listener,
        Arc::new(prometheus),
        status,
        status_shutdown.clone(),
    ));

    shutdown.cancelled().await;
    tracing::info!("shutting down: draining registry connections");
    let _ = registry_task.await;
    background.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let _ = router_task.await;
    status_shutdown.cancel();
    let _ = status_task.await;
    drop(_detach);
    tracing::info!("stopped");
    Ok(())
}

/// Detaches the dataplane and removes its pins when `run` returns, whether
/// the daemon stopped cleanly or failed part-way through starting. (Only a
/// SIGKILL leaves the boundary in place, for the next start to take over.)
struct DetachOnReturn(Option<Arc<Dataplane>>);

impl Drop for DetachOnReturn {
    fn drop(&mut self) {
        if let Some(dp) = &self.0 {
            dp.shutdown();
        }
    }
}

/// Loads the dataplane as its mode says: `required` fails the start,
/// `optional` says once why it is missing.
fn start_dataplane(config: &DataplaneConfig) -> Result<Option<Arc<Dataplane>>, DaemonError> {
    match config.mode {
        DataplaneMode::Off => Ok(None),
        DataplaneMode::Required => Ok(Some(Arc::new(Dataplane::start(config)?))),
        DataplaneMode::Optional => match Dataplane::start(config) {
            Ok(dp) => Ok(Some(Arc::new(dp))),
            Err(e) => {
                tracing::warn!(
                    "eBPF dataplane not loaded, running without per-peer counters and the kernel boundary: {e}"
                );
                Ok(None)
            }
        },
    }
}

/// Admits this node's addresses as they change, revokes peers whose
/// admission ran out, and forgets counters of long-gone addresses.
async fn dataplane_upkeep(
    observer: Arc<Observer>,
    admission_ttl: Duration,
    shutdown: CancellationToken,
) {
    let Some(dp) = observer.dataplane.clone() else {
        return;
    };
    let mut own = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::dataplane::interface_addresses();
        if now != own {
            match dp.set_own_addresses(&own, &now) {
                Ok(()) => own = now,
                Err(e) => tracing::warn!(error = %e, "cannot admit this node's addresses"),
            }
        }
        let expired: Vec<IpAddr> = {
            let mut gone = observer
                .disconnected
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let expired: Vec<IpAddr> = gone
                .iter()
                .filter(|(_, since)| since.elapsed() >= admission_ttl)
                .map(|(ip, _)| *ip)
                .collect();
            for ip in &expired {
                gone.remove(ip);
            }
            expired
        };
        for ip in expired {
            match dp.revoke(ip) {
                Ok(()) => tracing::debug!(%ip, "admission expired"),
                Err(e) => tracing::warn!(%ip, error = %e, "cannot revoke an admission"),
            }
        }
        if let Err(e) = dp.forget_stale(PEER_COUNTERS_STALE) {
            tracing::debug!(error = %e, "cannot age out peer counters");
        }
    }
}

/// Counters of addresses not seen for this long are removed (and their
/// metric series with them).
const PEER_COUNTERS_STALE: Duration = Duration::from_secs(3600);

/// Encodes the per-peer counters and drops from the kernel's maps at each
/// scrape (so that series of forgotten peers disappear).
#[derive(Debug)]
struct PeerCollector {
    dataplane: Arc<Dataplane>,
    observer: Arc<Observer>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl prometheus_client::collector::Collector for PeerCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let ids: BTreeMap<IpAddr, String> = self
            .observer
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|(id, ips)| ips.iter().map(move |ip| (*ip, id.clone())))
            .collect();
        let counters = self.dataplane.counters().unwrap_or_default();
        let label = |c: &crate::dataplane::PeerCounter| PeerLabels {
            peer: c.addr.to_string(),
            peer_id: ids.get(&c.addr).cloned().unwrap_or_default(),
            direction: if c.inbound { "in" } else { "out" }.to_string(),
            port: if c.registry { "registry" } else { "p2p" }.to_string(),
        };
        let mut bytes = encoder.encode_descriptor(
            "peer_bytes",
            "Bytes exchanged with each remote address on the registry and P2P ports, counted in the kernel (eBPF), by direction",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for c in &counters {
            ConstCounter::new(c.bytes).encode(bytes.encode_family(&label(c))?)?;
        }
        let mut packets = encoder.encode_descriptor(
            "peer_packets",
            "Packets exchanged with each remote address, as the kernel's skbs: a segmentation-offload batch counts once",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for c in &counters {
            ConstCounter::new(c.packets).encode(packets.encode_family(&label(c))?)?;
        }
        let drops = self.dataplane.drops().unwrap_or_default();
        let mut dropped = encoder.encode_descriptor(
            "dataplane_dropped_packets",
            "Packets (skbs) dropped in the kernel at the boundary, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, n) in [
            ("registry_not_admitted", drops.registry_not_admitted),
            ("p2p_not_allowed", drops.p2p_not_allowed),
            ("unparseable", drops.unparseable),
        ] {
            ConstCounter::new(n).encode(dropped.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    peer_id: String,
    direction: String,
    port: String,
}

/// Sets up io_uring when it is the serving path; with `auto`, falls back to
/// sendfile when the kernel does not allow it. Says once which path is used.
async fn choose_serving_path(
    config: &mut DaemonConfig,
    metrics: &Metrics,
) -> Result<Option<Uring>, DaemonError> {
    let mut uring = None;
    if config.server.serving_path == ServingPath::IoUring {
        let gauges = metrics.uring.clone();
        // Enough kernel workers for every upload the limits allow.
        let workers = u32::try_from(config.uploads.total)
            .unwrap_or(u32::MAX)
            .clamp(16, 1024);
        let setup = tokio::task::spawn_blocking(move || Uring::new(gauges, workers))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match setup {
            Ok(u) => uring = Some(u),
            Err(e) if config.serving_path_auto => {
                tracing::info!(error = %e, "io_uring is not usable here; blob bodies go through sendfile");
                config.server.serving_path = ServingPath::Sendfile;
            }
            Err(e) => return Err(DaemonError::IoUring(e)),
        }
    }
    tracing::info!(serving_path = %config.server.serving_path, "blob bodies on plain HTTP are sent with {}", config.server.serving_path);
    Ok(uring)
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

fn local_port(listener: &TcpListener, fallback: u16) -> u16 {
    listener.local_addr().map(|a| a.port()).unwrap_or(fallback)
}

/// This node's bootstrap entry: its reachable P2P addresses with its peer id.
fn own_entry(listen_addrs: &[String], advertise: Option<IpAddr>, peer_id: PeerId) -> Vec<String> {
    let addrs: Vec<Multiaddr> = listen_addrs.iter().filter_map(|a| a.parse().ok()).collect();
    let port = addrs.iter().flat_map(|a| a.iter()).find_map(|p| match p {
        libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
        _ => None,
    });
    let chosen: Vec<Multiaddr> = match (advertise, port) {
        (Some(ip), Some(port)) => {
            vec![Multiaddr::from(ip).with(libp2p::multiaddr::Protocol::Tcp(port))]
        }
        _ => addrs
            .into_iter()
            .filter(|a| {
                a.iter().all(|p| match p {
                    libp2p::multiaddr::Protocol::Ip4(ip) => {
                        !ip.is_loopback() && !ip.is_unspecified()
                    }
                    libp2p::multiaddr::Protocol::Ip6(ip) => {
                        !ip.is_loopback() && !ip.is_unspecified()
                    }
                    _ => true,
                })
            })
            .collect(),
    };
    chosen
        .into_iter()
        .map(|a| {
            a.with(libp2p::multiaddr::Protocol::P2p(peer_id))
                .to_string()
        })
        .collect()
}

async fn update_gauges(
    store: Arc<ContainerdStore>,
    router: P2pRouter,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut catalog = store.catalog();
    let mut health = store.watch_health();
    let mut routing = router.watch_status();
    loop {
        {
            let c = catalog.borrow_and_update();
            metrics.catalog_tags.set(c.tag_count() as i64);
            metrics.catalog_blobs.set(c.content_count() as i64);
        }
        metrics
            .containerd_connected
            .set(i64::from(health.borrow_and_update().connected));
        {
            let r = routing.borrow_and_update();
            metrics
                .routing_table_peers
                .set(r.routing_table_peers as i64);
            metrics.advertised_keys.set(r.advertised_keys as i64);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Ok(()) = catalog.changed() => {}
            Ok(()) = health.changed() => {}
            Ok(()) = routing.changed() => {}
        }
    }
}

/// At most this many announced addresses are admitted for one peer (the
/// addresses of its connections always are).
const MAX_ANNOUNCED_PER_PEER: usize = 16;

/// Receives the router's peer events: metrics, the connected-peer list,
/// and the dataplane's admissions of peers that proved the preshared key.
struct Observer {
    metrics: Metrics,
    /// Connected peers and the addresses admitted for each: those of its
    /// connections and those it announced.
    peers: Mutex<BTreeMap<String, BTreeSet<IpAddr>>>,
    dataplane: Option<Arc<Dataplane>>,
    /// Addresses whose last peer disconnected, and since when.
    disconnected: Mutex<HashMap<IpAddr, std::time::Instant>>,
}

impl Observer {
    fn lock_peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<IpAddr>>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `ips` to the registry port (again: that refreshes nothing but
    /// costs nothing) and takes them off the revocation list.
    fn admit(&self, ips: &[IpAddr]) {
        {
            let mut gone = self.disconnected.lock().unwrap_or_else(|e| e.into_inner());
            for ip in ips {
                gone.remove(ip);
            }
        }
        let Some(dp) = &self.dataplane else {
            return;
        };
        for ip in ips {
            if let Err(e) = dp.admit(*ip) {
                tracing::warn!(%ip, error = %e, "cannot admit a peer to the registry port");
            }
        }
    }
}

impl P2pObserver for Observer {
    fn peer_connected(&self, peer: &PeerId, ip: IpAddr) {
        let mut peers = self.lock_peers();
        peers.entry(peer.to_string()).or_default().insert(ip);
        self.metrics.connected_peers.set(peers.len() as i64);
        drop(peers);
        self.admit(&[ip]);
    }

    fn peer_addresses(&self, peer: &PeerId, ips: &[IpAddr]) {
        let mut peers = self.lock_peers();
        // Only for a peer that is connected now (it proved the key).
        let Some(admitted) = peers.get_mut(&peer.to_string()) else {
            return;
        };
        let fresh: Vec<IpAddr> = ips
            .iter()
            .filter(|ip| !admitted.contains(ip))
            .take(MAX_ANNOUNCED_PER_PEER.saturating_sub(admitted.len()))
            .copied()
            .collect();
        admitted.extend(&fresh);
        drop(peers);
        if !fresh.is_empty() {
            tracing::debug!(%peer, addresses = ?fresh, "admitting the addresses a peer announced");
        }
        self.admit(&fresh);
    }

    fn peer_disconnected(&self, peer: &PeerId) {
        let mut peers = self.lock_peers();
        let Some(admitted) = peers.remove(&peer.to_string()) else {
            return;
        };
        self.metrics.connected_peers.set(peers.len() as i64);
        let still_used: BTreeSet<IpAddr> = peers.values().flatten().copied().collect();
        drop(peers);
        // Revoked once the admission TTL has passed without a new
        // connection (the dataplane upkeep task).
        let now = std::time::Instant::now();
        let mut gone = self.disconnected.lock().unwrap_or_else(|e| e.into_inner());
        for ip in admitted.difference(&still_used) {
            gone.insert(*ip, now);
        }
    }

    fn handshake_failed(&self, inbound: bool) {
        self.metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: if inbound { "inbound" } else { "outbound" }.to_string(),
            })
            .inc();
    }
}

struct DaemonStatus {
    store: Arc<ContainerdStore>,
    router: P2pRouter,
    observer: Arc<Observer>,
    config: DaemonConfig,
}

impl metrics::Status for DaemonStatus {
    fn readiness(&self) -> Readiness {
        let health = self.store.health();
        let mut waiting_for = Vec::new();
        if !health.connected {
            waiting_for.push(format!(
                "containerd at {}",
                self.config.containerd.socket.display()
            ));
        }
        if !health.synced {
            waiting_for.push("the first image list from containerd".to_string());
        }
        waiting_for.extend(self.router.status().waiting_for());
        Readiness { waiting_for }
    }

    fn debug_page(&self) -> String {
        let mut out = String::new();
        let health = self.store.health();
        let catalog = self.store.catalog().borrow().clone();
        let routing = self.router.status();
        let _ = writeln!(out, "peermirror {}", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(out, "peer id:       {}", self.router.peer_id());
        let _ = writeln!(out, "registry:      {}", self.config.registry_addr);
        let _ = writeln!(out, "serving path:  {}", self.config.server.serving_path);
        let _ = writeln!(
            out,
            "containerd:    {} namespace {} ({})",
            self.config.containerd.socket.display(),
            self.config.containerd.namespace,
            if health.connected {
                "connected"
            } else {
                "not connected"
            }
        );
        let _ = writeln!(out, "readiness:     {:?}", self.readiness().waiting_for);
        let _ = writeln!(out, "p2p listening: {:?}", routing.listen_addrs);
        let _ = writeln!(
            out,
            "routing:       {} peers in the table, {} keys advertised",
            routing.routing_table_peers, routing.advertised_keys
        );
        let peers = self
            .observer
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let _ = writeln!(out, "connected peers: {}", peers.len());
        for (id, ips) in &peers {
            let ips: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
            let _ = writeln!(out, "  {id} {}", ips.join(" "));
        }
        let _ = writeln!(
            out,
            "catalog:       {} tags, {} blobs",
            catalog.tag_count(),
            catalog.content_count()
        );
        let mut tags: Vec<_> = catalog
            .tags()
            .map(|(n, d)| format!("{n} -> {}", d.digest))
            .collect();
        tags.sort();
        for line in tags.iter().take(200) {
            let _ = writeln!(out, "  {line}");
        }
        if tags.len() > 200 {
            let _ = writeln!(out, "  … and {} more", tags.len() - 200);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observer() -> Observer {
        Observer {
            metrics: Metrics::new(&mut Registry::default()),
            peers: Mutex::new(BTreeMap::new()),
            dataplane: None,
            disconnected: Mutex::new(HashMap::new()),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn pending_revocation(o: &Observer) -> BTreeSet<IpAddr> {
        o.disconnected
            .lock()
            .expect("lock")
            .keys()
            .copied()
            .collect()
    }

    #[test]
    fn a_peer_is_admitted_on_every_address_and_revoked_on_all_of_them() {
        let o = observer();
        let a = PeerId::random();
        let b = PeerId::random();
        // Announced before any connection: ignored (not proved yet).
        o.peer_addresses(&a, &[ip("10.0.0.9")]);
        assert!(o.lock_peers().is_empty());
        o.peer_connected(&a, ip("10.0.0.1"));
        o.peer_connected(&a, ip("10.0.1.1"));
        o.peer_addresses(&a, &[ip("10.0.0.1"), ip("fd00::1")]);
        o.peer_connected(&b, ip("10.0.0.2"));
        o.peer_addresses(&b, &[ip("10.0.0.2"), ip("fd00::1")]);
        assert_eq!(
            o.lock_peers()[&a.to_string()],
            [ip("10.0.0.1"), ip("10.0.1.1"), ip("fd00::1")].into()
        );
        assert_eq!(o.metrics.connected_peers.get(), 2);
        // A leaves: all its addresses but the one B still holds go.
        o.peer_disconnected(&a);
        assert_eq!(
            pending_revocation(&o),
            [ip("10.0.0.1"), ip("10.0.1.1")].into()
        );
        assert_eq!(o.metrics.connected_peers.get(), 1);
        // A comes back on one of them: that one is kept.
        o.peer_connected(&a, ip("10.0.1.1"));
        assert_eq!(pending_revocation(&o), [ip("10.0.0.1")].into());
        o.peer_disconnected(&b);
        assert_eq!(
            pending_revocation(&o),
            [ip("10.0.0.1"), ip("10.0.0.2"), ip("fd00::1")].into()
        );
        // A second disconnect report for a peer already gone is harmless.
        o.peer_disconnected(&b);
        assert_eq!(o.metrics.connected_peers.get(), 1);
    }

    #[test]
    fn announced_addresses_are_bounded_per_peer() {
        let o = observer();
        let a = PeerId::random();
        o.peer_connected(&a, ip("10.0.0.1"));
        let many: Vec<IpAddr> = (1..=100u8).map(|i| IpAddr::from([10, 9, 0, i])).collect();
        o.peer_addresses(&a, &many);
        assert_eq!(o.lock_peers()[&a.to_string()].len(), MAX_ANNOUNCED_PER_PEER);
        // The address of a connection is admitted beyond the bound.
        o.peer_connected(&a, ip("10.0.0.3"));
        assert_eq!(
            o.lock_peers()[&a.to_string()].len(),
            MAX_ANNOUNCED_PER_PEER + 1
        );
    }

    #[test]
    fn bootstrap_entry_lists_reachable_addresses_with_the_peer_id() {
        let id = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let listening = vec![
            "/ip4/127.0.0.1/tcp/5001".to_string(),
            "/ip4/10.0.0.7/tcp/5001".to_string(),
            "/ip6/::1/tcp/5001".to_string(),
        ];
        assert_eq!(
            own_entry(&listening, None, id),
            vec![format!("/ip4/10.0.0.7/tcp/5001/p2p/{id}")]
        );
        let advertised = own_entry(&listening, Some("192.0.2.9".parse().expect("ip")), id);
        assert_eq!(
            advertised,
            vec![format!("/ip4/192.0.2.9/tcp/5001/p2p/{id}")]
        );
        assert!(own_entry(&[], None, id).is_empty());
    }
}
