//! The composition root: builds every part from its configuration, runs
//! them as supervised tasks, and shuts them down in order (stop accepting
//! and drain the registry port, then the background tasks — routing,
//! containerd, sync, admission —, then the status port).

mod background;
mod config;
pub mod supervisor;

pub use config::{DaemonConfig, DaemonError};

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::{NodeFacts, NodeStatus};
use peermirror_dataplane::{Admission, Dataplane, DetachOnDrop, measure_upload_rate};
use peermirror_metrics::{DataplaneLabels, Metrics};
use peermirror_mirror::Mirror;
use peermirror_net::tls::TlsState;
use peermirror_registry::{FileBodies, Handler, Server, UploadRate};
use peermirror_routing::bootstrap::{self, Bootstrap};
use peermirror_routing::identity;
use peermirror_routing::p2p::{self, P2pConfig, P2pCounters, P2pRouter};
use peermirror_store::{ContainerdStore, ContentStore, StoreGauges};
use supervisor::{Policy, Supervisor};

/// Runs the daemon until `shutdown` is cancelled, or until a task it
/// cannot do without stops (then it returns that task's error).
pub async fn run(config: DaemonConfig, shutdown: CancellationToken) -> Result<(), DaemonError> {
    // Every input file is read before anything is written.
    let psk = config.p2p.load_psk()?;
    let tls = config.tls.clone().map(TlsState::load).transpose()?;
    let mut prometheus = Registry::default();
    let metrics = Metrics::with_compat(&mut prometheus, config.status.metrics_compat);
    let source_gauges = bootstrap::SourceGauges::register(&mut prometheus);
    let bootstrap = config
        .bootstrap
        .is_configured()
        .then(|| Bootstrap::new(config.bootstrap.clone(), source_gauges))
        .transpose()?;
    // Each registry connection may hold a socket, a file and a pipe pair;
    // the status and P2P ports and containerd need a few hundred more.
    let needed = config.registry.server.max_connections.max(1) as u64 * 4 + 512;
    peermirror_net::raise_open_file_limit(needed);
    let keypair = node_identity(&config.data_dir)?;
    // The dataplane before any socket: a socket's cgroup is fixed when it
    // is created. From here on every return detaches it, a failed start too.
    let dataplane = Dataplane::start_as_configured(&config.dataplane)?;
    let _detach = DetachOnDrop(dataplane.clone());
    let registry_listener = listen("registry port", config.registry.registry_addr).await?;
    let status_listener = listen("status port", config.status.status_addr).await?;
    let files = FileBodies::choose_for(&config.registry, &metrics)
        .await
        .map_err(DaemonError::IoUring)?;
    announce_mode(
        &config,
        &metrics,
        psk.is_none(),
        dataplane.is_some(),
        tls.is_some(),
    );

    let mut tasks = Supervisor::new();
    let serving = tasks.stage("serving");
    let background = tasks.stage("background");
    let status_stage = tasks.stage("status");

    let admission = dataplane.as_ref().map(|dp| {
        let admission = Admission::new(dp.clone(), config.dataplane.admission_ttl);
        peermirror_metrics::register_traffic(&mut prometheus, admission.clone());
        admission
    });
    let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let (router, router_loop) = p2p::start(
        P2pConfig {
            keypair,
            psk,
            registry_port: local_port(&registry_listener, config.registry.registry_addr.port()),
            has_bootstrap: config.bootstrap.is_configured(),
            settings: config.p2p.clone(),
            counters: P2pCounters::register(&mut prometheus),
            events: admission.is_some().then_some(events),
        },
        tasks.stop_token(background),
    )?;
    tasks.spawn_infallible(background, "p2p router", Policy::Essential, router_loop);
    if let Some(admission) = &admission {
        let admit = admission
            .clone()
            .run(events_rx, tasks.stop_token(background));
        tasks.spawn(background, "admission", Policy::Essential, admit);
    }

    let store = ContainerdStore::new(
        config.containerd.clone(),
        config.filter.clone(),
        StoreGauges::register(&mut prometheus),
    );
    background::spawn_background(
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
        peermirror_store::register_spegel_catalog_gauges(&mut prometheus, &store.catalog());
    }
    let mirror = Mirror::with_tls(Arc::new(router.clone()), config.mirror.clone(), tls.clone());
    mirror.count_corrupt_holders(metrics.corrupt_holders.clone());
    mirror.count_fanout_answers(metrics.fanout_answers.clone());
    let upload_rate = UploadRate::default();
    if let (Some(dp), Some(admission)) = (&dataplane, &admission) {
        let (dp, admission, rate) = (dp.clone(), admission.clone(), upload_rate.clone());
        let stop = tasks.stop_token(background);
        let sample = measure_upload_rate(dp, admission, move |b| rate.set(b), stop);
        tasks.spawn_infallible(background, "upload rate", Policy::Auxiliary, sample);
    }
    let handler = Handler::new(
        store.clone(),
        Some(mirror.clone()),
        config.registry.handler_config(config.filter.clone()),
        metrics.clone(),
    )
    .with_peers(Arc::new(FollowingPeers(router.clone())))
    .with_upload_rate(upload_rate);
    let server = Server::build(
        Arc::new(handler),
        config.registry.server.clone(),
        metrics.clone(),
        files.clone(),
        tls,
    );
    tracing::info!(
        registry = %local(&registry_listener),
        status = %local(&status_listener),
        peer_id = %router.peer_id(),
        serving_path = %files.path(),
        containerd = %config.containerd.endpoint.socket.display(),
        namespace = %config.containerd.endpoint.namespace,
        "peermirror started"
    );
    let stop = tasks.stop_token(serving);
    let serve = server.serve(registry_listener, stop);
    tasks.spawn_infallible(serving, "registry server", Policy::Essential, serve);

    let facts = NodeFacts {
        registry_addr: config.registry.registry_addr,
        serving_path: files.path(),
        containerd_socket: config.containerd.endpoint.socket.clone(),
        namespace: config.containerd.endpoint.namespace.clone(),
        dataplane_mode: config.dataplane.mode,
        dataplane_attached: dataplane.is_some(),
    };
    let status = Arc::new(NodeStatus {
        store,
        router,
        admission,
        bootstrap,
        health: tasks.health(),
        facts,
        debug: config.status.debug_access(),
        mirror,
        measuring: tokio::sync::Semaphore::new(1),
    });
    let stop = tasks.stop_token(status_stage);
    let serve = crate::status::server::serve(status_listener, Arc::new(prometheus), status, stop);
    tasks.spawn_infallible(status_stage, "status server", Policy::Essential, serve);

    let result = tasks.run(shutdown).await;
    drop(_detach);
    tracing::info!("stopped");
    Ok(result?)
}

/// Sets the gauges that describe how the node runs, and says what is unsafe.
fn announce_mode(config: &DaemonConfig, metrics: &Metrics, open: bool, dataplane: bool, tls: bool) {
    metrics.p2p_open_network.set(i64::from(open));
    metrics
        .dataplane_active
        .get_or_create(&DataplaneLabels {
            mode: config.dataplane.mode.as_str().to_string(),
        })
        .set(i64::from(dataplane));
    if open {
        tracing::warn!(
            "RUNNING AN OPEN P2P NETWORK (--insecure-open-network): any host that reaches the P2P port can join, \
             learn what this node holds and have its announcements trusted. Use --psk-file in production."
        );
    }
    if !tls && !dataplane {
        tracing::warn!(
            registry = %config.registry.registry_addr,
            namespace = %config.containerd.endpoint.namespace,
            "the registry port is open: any host that can reach it can read every image of this containerd namespace. \
             Protect it with mTLS (--tls-cert, --tls-key, --tls-client-ca) or the kernel boundary (--dataplane)."
        );
    }
}

/// The node's P2P identity, kept in the data directory (created here).
fn node_identity(data_dir: &std::path::Path) -> Result<libp2p::identity::Keypair, DaemonError> {
    std::fs::create_dir_all(data_dir).map_err(|source| DaemonError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    Ok(identity::load_or_create(data_dir)?)
}

/// Binds `addr` for the port `what`.
async fn listen(what: &'static str, addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    peermirror_net::listen(addr)
        .await
        .map_err(|(addr, source)| DaemonError::Listen { what, addr, source })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family the daemon's parts register (each registers its own)
    /// has help text.
    #[test]
    fn every_family_has_help_text() {
        let mut registry = Registry::default();
        let _ = Metrics::new(&mut registry);
        let _ = P2pCounters::register(&mut registry);
        let _ = StoreGauges::register(&mut registry);
        let _ = bootstrap::SourceGauges::register(&mut registry);
        let text = peermirror_metrics::encode(&registry).expect("encode");
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert!(types > 10);
        assert_eq!(types, helps, "{text}");
    }
}
