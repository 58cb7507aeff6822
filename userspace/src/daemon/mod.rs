//! The composition root: builds every part from its configuration, runs
//! them as supervised tasks, and shuts them down in order (stop accepting
//! and drain the registry port, then the background tasks — routing,
//! containerd, sync, admission —, then the status port).

mod config;
pub mod supervisor;

pub use config::{DaemonConfig, DaemonError};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::pnet::PreSharedKey;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::{NodeFacts, NodeStatus};
use peermirror_dataplane::{Admission, Dataplane, DataplaneConfig, DataplaneMode};
use peermirror_metrics::{DataplaneLabels, HandshakeLabels, Metrics, ServingPathLabels};
use peermirror_mirror::Mirror;
use peermirror_net::tls::TlsState;
use peermirror_registry::uring::UringGauges;
use peermirror_registry::{FileBodies, Handler, HandlerConfig, Server, UploadRate};
use peermirror_routing::bootstrap::{self, Bootstrap};
use peermirror_routing::identity;
use peermirror_routing::p2p::{self, P2pConfig, P2pCounters, P2pRouter};
use peermirror_routing::{Router, sync};
use peermirror_store::{ContainerdStore, ContentStore, StoreGauges};
use supervisor::{Policy, StageId, Supervisor};

/// Runs the daemon until `shutdown` is cancelled, or until a task it
/// cannot do without stops (then it returns that task's error).
pub async fn run(config: DaemonConfig, shutdown: CancellationToken) -> Result<(), DaemonError> {
    // Every input file is read before anything is written.
    let psk = config
        .psk_file
        .as_deref()
        .map(identity::load_psk)
        .transpose()?;
    let tls = config.tls.clone().map(TlsState::load).transpose()?;
    let mut prometheus = Registry::default();
    let metrics = Metrics::with_compat(&mut prometheus, config.metrics_compat);
    let source_gauges = bootstrap::SourceGauges::register(&mut prometheus);
    let bootstrap = config
        .bootstrap
        .is_configured()
        .then(|| Bootstrap::new(config.bootstrap.clone(), source_gauges))
        .transpose()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DaemonError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    // Each registry connection may hold a socket, a file and a pipe pair;
    // the status and P2P ports and containerd need a few hundred more.
    let needed = config.server.max_connections as u64 * 4 + 512;
    peermirror_net::raise_open_file_limit(needed);
    let keypair = identity::load_or_create(&config.data_dir)?;
    // The dataplane before any socket: a socket's cgroup is fixed when it
    // is created. From here on every return detaches it, a failed start too.
    let dataplane = start_dataplane(&config.dataplane)?;
    let _detach = DetachOnReturn(dataplane.clone());
    let registry_listener = listen("registry", config.registry_addr).await?;
    let metrics_listener = listen("metrics", config.metrics_addr).await?;
    let files = choose_serving_path(&config, &metrics).await?;
    announce_mode(
        &config,
        &metrics,
        psk.as_ref(),
        dataplane.is_some(),
        tls.is_some(),
    );

    let mut tasks = Supervisor::new();
    let serving = tasks.stage("serving");
    let background = tasks.stage("background");
    let status_stage = tasks.stage("status");

    let admission = dataplane.as_ref().map(|dp| {
        let admission = Admission::new(dp.clone(), config.admission_ttl);
        peermirror_metrics::register_traffic(&mut prometheus, admission.clone());
        admission
    });
    let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let (router, router_loop) = p2p::start(
        P2pConfig {
            keypair,
            psk,
            registry_port: local_port(&registry_listener, config.registry_addr.port()),
            has_bootstrap: config.bootstrap.is_configured(),
            settings: config.p2p.clone(),
            counters: p2p_counters(&metrics),
            events: admission.is_some().then_some(events),
        },
        tasks.stop_token(background),
    )?;
    tasks.spawn_infallible(background, "p2p router", Policy::Essential, router_loop);
    if let Some(admission) = &admission {
        let stop = tasks.stop_token(background);
        tasks.spawn(
            background,
            "admission",
            Policy::Essential,
            admission.clone().run(events_rx, stop),
        );
    }

    let store = ContainerdStore::new(
        config.containerd.clone(),
        config.filter.clone(),
        store_gauges(&metrics),
    );
    spawn_background(
        &mut tasks,
        background,
        &config,
        &store,
        &router,
        tls.as_ref(),
        bootstrap.as_ref(),
    )
    .await?;

    if metrics.spegel_compat() {
        register_spegel_catalog_gauges(&mut prometheus, &store.catalog());
    }
    let mirror = Mirror::with_tls(Arc::new(router.clone()), config.mirror.clone(), tls.clone());
    let upload_rate = UploadRate::default();
    if let (Some(dp), Some(admission)) = (&dataplane, &admission) {
        tasks.spawn_infallible(
            background,
            "upload rate",
            Policy::Auxiliary,
            measure_upload_rate(
                dp.clone(),
                admission.clone(),
                upload_rate.clone(),
                tasks.stop_token(background),
            ),
        );
    }
    let handler = Arc::new(
        Handler::new(
            store.clone(),
            Some(mirror.clone()),
            HandlerConfig {
                filter: config.filter.clone(),
                uploads: config.uploads,
                in_flight: config.in_flight.clone(),
            },
            metrics.clone(),
        )
        .with_peers(Arc::new(FollowingPeers(router.clone())))
        .with_upload_rate(upload_rate),
    );
    let server = Server::build(
        handler,
        config.server.clone(),
        metrics.clone(),
        files.clone(),
        tls,
    );
    tracing::info!(
        registry = %local(&registry_listener),
        metrics = %local(&metrics_listener),
        peer_id = %router.peer_id(),
        serving_path = %files.path(),
        containerd = %config.containerd.socket.display(),
        namespace = %config.containerd.namespace,
        "peermirror started"
    );
    let stop = tasks.stop_token(serving);
    tasks.spawn_infallible(
        serving,
        "registry server",
        Policy::Essential,
        server.serve(registry_listener, stop),
    );

    let status = Arc::new(NodeStatus {
        store,
        router,
        admission,
        bootstrap,
        health: tasks.health(),
        facts: NodeFacts {
            registry_addr: config.registry_addr,
            serving_path: files.path(),
            containerd_socket: config.containerd.socket.clone(),
            namespace: config.containerd.namespace.clone(),
            dataplane_mode: config.dataplane.mode,
            dataplane_attached: dataplane.is_some(),
        },
        debug: config.debug.clone(),
        mirror,
        measuring: tokio::sync::Semaphore::new(1),
    });
    let stop = tasks.stop_token(status_stage);
    tasks.spawn_infallible(
        status_stage,
        "status server",
        Policy::Essential,
        crate::status::server::serve(metrics_listener, Arc::new(prometheus), status, stop),
    );

    let result = tasks.run(shutdown).await;
    drop(_detach);
    tracing::info!("stopped");
    Ok(result?)
}

/// How often the upload rate told to peers is measured.
const UPLOAD_RATE_INTERVAL: Duration = Duration::from_secs(1);

/// Measures what this node's registry port sends to other hosts, from the
/// dataplane's per-peer counters, once a second until `stop`. Traffic to
/// this node's own addresses is not an upload: those come from the
/// admission's upkeep, which lists them anyway (a netlink dump of every
/// link each second here was most of an idle daemon's CPU).
async fn measure_upload_rate(
    dataplane: Arc<Dataplane>,
    admission: Arc<Admission>,
    rate: UploadRate,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(UPLOAD_RATE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(tokio::time::Instant, u64)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (dp, own) = (dataplane.clone(), admission.own_addresses());
        let total = tokio::task::spawn_blocking(move || {
            dp.counters()
                .map(|counters| peermirror_dataplane::uploaded_bytes(&counters, &own))
        })
        .await;
        let total = match total {
            Ok(Ok(total)) => total,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the peer counters");
                continue;
            }
            Err(_) => continue,
        };
        let now = tokio::time::Instant::now();
        if let Some((at, before)) = last {
            // Counters of long-gone addresses are aged out: a total may shrink.
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            rate.set((total.saturating_sub(before) as f64 / secs) as u64);
        }
        last = Some((now, total));
    }
}

/// This node's bootstrap entry as it is now (its listening addresses change).
fn own_entry(
    router: &P2pRouter,
    config: &DaemonConfig,
) -> Arc<dyn Fn() -> Vec<String> + Send + Sync> {
    let status = router.watch_status();
    let (peer_id, advertise) = (router.peer_id(), config.p2p.advertise_addr);
    Arc::new(move || bootstrap::own_entry(&status.borrow().listen_addrs, advertise, peer_id))
}

/// The tasks that follow containerd, announce its content, find peers and
/// reload certificates.
async fn spawn_background(
    tasks: &mut Supervisor,
    stage: StageId,
    config: &DaemonConfig,
    store: &Arc<ContainerdStore>,
    router: &P2pRouter,
    tls: Option<&Arc<TlsState>>,
    bootstrap: Option<&Arc<Bootstrap>>,
) -> Result<(), DaemonError> {
    let stop = tasks.stop_token(stage);
    tasks.spawn_infallible(
        stage,
        "containerd follower",
        Policy::Essential,
        store.clone().run(stop.clone()),
    );
    tasks.spawn(
        stage,
        "sync",
        Policy::Essential,
        sync::run(
            store.catalog(),
            store.watch_health(),
            Arc::new(router.clone()),
            stop.clone(),
        ),
    );
    if let Some(bootstrap) = bootstrap {
        tasks.spawn(
            stage,
            "bootstrap",
            Policy::Essential,
            bootstrap.clone().run(router.clone(), stop.clone()),
        );
        if bootstrap.registers() {
            let entry = own_entry(router, config);
            tasks.spawn_infallible(
                stage,
                "bootstrap registration",
                Policy::Auxiliary,
                bootstrap
                    .clone()
                    .register_loop(entry, router.peer_id(), stop.clone()),
            );
        }
    }
    if let Some(addr) = config.http_bootstrap_addr {
        let listener = listen("HTTP bootstrap entry", addr).await?;
        let entry = own_entry(router, config);
        tasks.spawn_infallible(
            stage,
            "bootstrap entry server",
            Policy::Auxiliary,
            bootstrap::serve_http(listener, entry, stop.clone()),
        );
    }
    if let Some(dir) = &config.import_dir {
        let importer = peermirror_store::import::Importer::new(
            &config.containerd.socket,
            &config.containerd.namespace,
        );
        tasks.spawn_infallible(
            stage,
            "archive import",
            Policy::Auxiliary,
            peermirror_store::import::watch_dir(importer, dir.clone(), stop.clone()),
        );
    }
    if let Some(tls) = tls {
        tasks.spawn_infallible(
            stage,
            "certificate reload",
            Policy::Auxiliary,
            tls.clone().watch(Duration::from_secs(10), stop),
        );
    }
    Ok(())
}

fn p2p_counters(metrics: &Metrics) -> P2pCounters {
    let handshake = |direction: &str| {
        metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: direction.to_string(),
            })
            .clone()
    };
    P2pCounters {
        handshake_failures_inbound: handshake("inbound"),
        handshake_failures_outbound: handshake("outbound"),
        advertise_failures: metrics.advertise_failures.clone(),
        lookups_dropped: metrics.lookups_dropped.clone(),
        connections_refused: metrics.p2p_connections_refused.clone(),
        connected_peers: metrics.connected_peers.clone(),
        routing_table_peers: metrics.routing_table_peers.clone(),
        advertised_keys: metrics.advertised_keys.clone(),
        pending_keys: metrics.advertise_pending_keys.clone(),
    }
}

/// Spegel's per-registry counts of what this node advertises, read from the
/// catalog at each scrape.
fn register_spegel_catalog_gauges(
    prometheus: &mut Registry,
    catalog: &tokio::sync::watch::Receiver<Arc<peermirror_store::Catalog>>,
) {
    type Pick = fn(&peermirror_store::RegistryCounts) -> usize;
    let families: [(&'static str, &'static str, Pick); 3] = [
        (
            "spegel_advertised_image_tags",
            "Number of image tags advertised to be available (Spegel's name)",
            |c| c.tags,
        ),
        (
            "spegel_advertised_image_digests",
            "Number of image digests advertised to be available (Spegel's name)",
            |c| c.image_digests,
        ),
        (
            "spegel_advertised_content_digests",
            "Number of content digests advertised to be available (Spegel's name)",
            |c| c.content_digests,
        ),
    ];
    for (name, help, pick) in families {
        let catalog = catalog.clone();
        peermirror_metrics::register_computed_gauges(
            prometheus,
            name,
            help,
            Box::new(move || {
                catalog
                    .borrow()
                    .registry_counts()
                    .iter()
                    .map(|(registry, counts)| {
                        (
                            vec![("registry".to_string(), registry.clone())],
                            pick(counts) as i64,
                        )
                    })
                    .collect()
            }),
        );
    }
}

fn store_gauges(metrics: &Metrics) -> StoreGauges {
    StoreGauges {
        connected: metrics.containerd_connected.clone(),
        tags: metrics.catalog_tags.clone(),
        blobs: metrics.catalog_blobs.clone(),
    }
}

/// Sets the gauges that describe how the node runs, and says what is unsafe.
fn announce_mode(
    config: &DaemonConfig,
    metrics: &Metrics,
    psk: Option<&PreSharedKey>,
    dataplane: bool,
    tls: bool,
) {
    metrics.p2p_open_network.set(i64::from(psk.is_none()));
    metrics
        .dataplane_active
        .get_or_create(&DataplaneLabels {
            mode: config.dataplane.mode.as_str().to_string(),
        })
        .set(i64::from(dataplane));
    if psk.is_none() {
        tracing::warn!(
            "RUNNING AN OPEN P2P NETWORK (--insecure-open-network): any host that reaches the P2P port can join, \
             learn what this node holds and have its announcements trusted. Use --psk-file in production."
        );
    }
    if !tls && !dataplane {
        tracing::warn!(
            registry = %config.registry_addr,
            namespace = %config.containerd.namespace,
            "the registry port is open: any host that can reach it can read every image of this containerd namespace. \
             Protect it with mTLS (--tls-cert, --tls-key, --tls-client-ca) or the kernel boundary (--dataplane)."
        );
    }
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

/// Sets up the serving path, says once which one is used and exports it.
async fn choose_serving_path(
    config: &DaemonConfig,
    metrics: &Metrics,
) -> Result<FileBodies, DaemonError> {
    // Enough kernel workers for every upload the limits allow.
    let workers = u32::try_from(config.uploads.total)
        .unwrap_or(u32::MAX)
        .clamp(16, 1024);
    let gauges = UringGauges {
        in_flight: metrics.uring_in_flight.clone(),
        idle_pipes: metrics.uring_idle_pipes.clone(),
    };
    let files = FileBodies::choose(config.serving_path, workers, gauges)
        .await
        .map_err(DaemonError::IoUring)?;
    let path = files.path();
    tracing::info!(serving_path = %path, "blob bodies on plain HTTP are sent with {path}");
    metrics
        .serving_path
        .get_or_create(&ServingPathLabels {
            path: path.as_str().to_string(),
        })
        .set(1);
    Ok(files)
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

/// Who may follow in-flight blobs: the hosts of live P2P connections (they
/// proved the preshared key; the dataplane admits the same set).
struct FollowingPeers(P2pRouter);

#[async_trait::async_trait]
impl peermirror_registry::PeerDirectory for FollowingPeers {
    async fn is_peer(&self, ip: std::net::IpAddr) -> bool {
        self.0.is_peer_address(ip).await
    }
}
