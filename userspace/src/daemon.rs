//! The composition root: builds every part from its configuration, runs the
//! tasks, and shuts them down in order (stop accepting, drain responses in
//! flight, stop following containerd, then the status server).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Metrics, Readiness, ServingPathLabels};
use crate::registry::{Handler, HandlerConfig, Server, ServerConfig};
use crate::store::{ContainerdConfig, ContainerdStore, ContentStore};

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub containerd: ContainerdConfig,
    pub registry_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub server: ServerConfig,
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
pub async fn run(config: DaemonConfig, shutdown: CancellationToken) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DaemonError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let registry_listener = listen("registry", config.registry_addr).await?;
    let metrics_listener = listen("metrics", config.metrics_addr).await?;

    let mut prometheus = Registry::default();
    let metrics = Metrics::new(&mut prometheus);
    metrics
        .serving_path
        .get_or_create(&ServingPathLabels {
            path: config.server.serving_path.as_str().to_string(),
        })
        .set(1);

    let store = ContainerdStore::new(config.containerd.clone());
    let store_shutdown = CancellationToken::new();
    let store_task = tokio::spawn(store.clone().run(store_shutdown.clone()));
    let gauges_task = tokio::spawn(update_store_gauges(
        store.clone(),
        metrics.clone(),
        store_shutdown.clone(),
    ));

    let handler = Arc::new(Handler::new(store.clone(), HandlerConfig::default()));
    let server = Server::new(handler, config.server.clone(), metrics.clone());
    tracing::info!(
        registry = %local(&registry_listener),
        metrics = %local(&metrics_listener),
        serving_path = %config.server.serving_path,
        containerd = %config.containerd.socket.display(),
        namespace = %config.containerd.namespace,
        "peermirror started"
    );
    let registry_task = tokio::spawn(server.serve(registry_listener, shutdown.clone()));

    let status_shutdown = CancellationToken::new();
    let status = Arc::new(DaemonStatus {
        store: store.clone(),
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
    store_shutdown.cancel();
    let _ = store_task.await;
    let _ = gauges_task.await;
    status_shutdown.cancel();
    let _ = status_task.await;
    tracing::info!("stopped");
    Ok(())
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

async fn update_store_gauges(
    store: Arc<ContainerdStore>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut catalog = store.catalog();
    let mut health = store.watch_health();
    loop {
        {
            let c = catalog.borrow_and_update();
            metrics.catalog_tags.set(c.tag_count() as i64);
            metrics.catalog_blobs.set(c.content_count() as i64);
        }
        metrics
            .containerd_connected
            .set(i64::from(health.borrow_and_update().connected));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Ok(()) = catalog.changed() => {}
            Ok(()) = health.changed() => {}
        }
    }
}

struct DaemonStatus {
    store: Arc<ContainerdStore>,
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
        Readiness { waiting_for }
    }

    fn debug_page(&self) -> String {
        let mut out = String::new();
        let health = self.store.health();
        let catalog = self.store.catalog().borrow().clone();
        let _ = writeln!(out, "peermirror {}", env!("CARGO_PKG_VERSION"));
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
