//! What the status port says about the node: readiness (`/readyz`),
//! liveness (`/healthz`) and the debug endpoints (`/debug`, `/debug/web`,
//! `/debug/api/*`), computed from the parts that own each piece of state.

mod api;
mod debug;
pub mod server;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use self::server::{DebugResponse, Readiness};
use peermirror_dataplane::{Admission, DataplaneMode};
use peermirror_mirror::Mirror;
use peermirror_registry::ServingPath;
use peermirror_routing::Router;
use peermirror_routing::p2p::P2pRouter;
use peermirror_store::ContentStore;

/// Facts about the node that do not change while it runs.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub registry_addr: SocketAddr,
    pub serving_path: ServingPath,
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub dataplane_mode: DataplaneMode,
    pub dataplane_attached: bool,
}

pub struct NodeStatus {
    pub store: Arc<dyn ContentStore>,
    pub router: P2pRouter,
    pub admission: Option<Arc<Admission>>,
    /// The bootstrap source, when one is configured.
    pub bootstrap: Option<Arc<peermirror_routing::bootstrap::Bootstrap>>,
    pub health: Arc<Health>,
    pub facts: NodeFacts,
    pub debug: DebugAccess,
    /// The mirror's journal (recent requests) and the measure's pulls.
    pub mirror: Arc<Mirror>,
    /// Held while a measure runs (one at a time).
    pub measuring: tokio::sync::Semaphore,
}

/// The debug web page: one file, no external assets (works air-gapped).
const WEB_PAGE: &str = include_str!("debug.html");

/// The status port's settings, as the operator gives them.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Address of the /metrics, /healthz, /readyz and /debug endpoints.
    // The flag keeps its older name.
    #[arg(
        long = "metrics-addr",
        value_name = "METRICS_ADDR",
        env = "PEERMIRROR_METRICS_ADDR",
        default_value = ":9090",
        value_parser = peermirror_net::flags::parse_listen_addr
    )]
    pub status_addr: std::net::SocketAddr,

    /// Serve the debug endpoints (/debug, which shows image names, digests
    /// and peer addresses). They answer loopback, connected peers and
    /// `--debug-allowed-cidrs`; anyone else gets 403.
    #[arg(long, env = "PEERMIRROR_DEBUG_ENDPOINTS", default_value_t = true, action = clap::ArgAction::Set, alias = "debug-web-enabled")]
    pub debug_endpoints: bool,

    /// Networks allowed to see the debug endpoints besides loopback and the
    /// connected peers, comma-separated CIDRs.
    #[arg(long, env = "PEERMIRROR_DEBUG_ALLOWED_CIDRS", value_delimiter = ',', num_args = 1..)]
    pub debug_allowed_cidrs: Vec<ipnet::IpNet>,

    /// Other daemons' metric names exported besides `peermirror_*`:
    /// `spegel` (Spegel's names and labels, so that its queries and
    /// dashboards work) or `none`.
    #[arg(long, env = "PEERMIRROR_METRICS_COMPAT", value_enum, default_value_t = peermirror_metrics::MetricsCompat::Spegel)]
    pub metrics_compat: peermirror_metrics::MetricsCompat,
}

impl StatusArgs {
    /// Who may see the debug endpoints.
    pub fn debug_access(&self) -> DebugAccess {
        DebugAccess {
            enabled: self.debug_endpoints,
            allowed: self.debug_allowed_cidrs.clone(),
        }
    }
}

/// Who may see the debug endpoints: loopback and this node's own
/// addresses, the addresses of connected peers (they proved the preshared
/// key), and the configured networks; nobody when they are switched off.
#[derive(Debug, Clone)]
pub struct DebugAccess {
    pub enabled: bool,
    pub allowed: Vec<ipnet::IpNet>,
}

impl Default for DebugAccess {
    fn default() -> Self {
        DebugAccess {
            enabled: true,
            allowed: Vec::new(),
        }
    }
}

impl NodeStatus {
    fn readiness(&self) -> Readiness {
        let health = self.store.health();
        let mut waiting_for = Vec::new();
        if !health.connected {
            waiting_for.push(format!(
                "containerd at {}",
                self.facts.containerd_socket.display()
            ));
        }
        if !health.synced {
            waiting_for.push("the first image list from containerd".to_string());
        }
        let routing = self.router.status().waiting_for();
        // While the node has no peer, why the bootstrap source gave none.
        if !routing.is_empty()
            && let Some(e) = self.bootstrap.as_ref().and_then(|b| b.last_error())
        {
            waiting_for.push(format!(
                "a peer from the bootstrap source (last attempt: {e})"
            ));
        }
        waiting_for.extend(routing);
        if self.facts.dataplane_mode == DataplaneMode::Required && !self.facts.dataplane_attached {
            waiting_for.push("the eBPF dataplane (--dataplane required)".to_string());
        }
        waiting_for.extend(self.health.degraded());
        Readiness { waiting_for }
    }
}

#[async_trait::async_trait]
impl server::Status for NodeStatus {
    fn readiness(&self) -> Readiness {
        NodeStatus::readiness(self)
    }

    fn health(&self) -> Result<(), String> {
        self.health.check()
    }

    async fn debug(&self, path: &str, query: Option<&str>) -> Option<DebugResponse> {
        match path {
            "/" | "/debug" => Some(DebugResponse::ok(
                "text/plain; charset=utf-8",
                debug::render(self).await,
            )),
            "/debug/web" | "/debug/web/" => Some(DebugResponse::ok(
                "text/html; charset=utf-8",
                WEB_PAGE.to_string(),
            )),
            _ => match path.strip_prefix("/debug/api/") {
                Some(what) => api::answer(self, what, query).await,
                None => None,
            },
        }
    }

    async fn debug_allowed(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        if !self.debug.enabled {
            return false;
        }
        if client.is_loopback()
            || self.debug.allowed.iter().any(|n| n.contains(&client))
            || peermirror_net::interface_addresses().contains(&client)
        {
            return true;
        }
        self.router.is_peer_address(client).await
    }
}

/// The daemon's health: the supervisor records into it, `/healthz` and
/// `/readyz` read it.
#[derive(Debug, Default)]
pub struct Health {
    failed: Mutex<Option<String>>,
    degraded: Mutex<Vec<String>>,
}

impl Health {
    /// `Err` once an essential task has died.
    pub fn check(&self) -> Result<(), String> {
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    /// Auxiliary tasks that have stopped, for readiness.
    pub fn degraded(&self) -> Vec<String> {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that an essential task has died: `/healthz` fails from now on.
    pub fn fail(&self, reason: String) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    /// Records an auxiliary task that stopped: the node is not ready.
    pub fn degrade(&self, reason: String) {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(reason);
    }
}
