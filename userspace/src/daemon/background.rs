//! The daemon's background tasks: following containerd, announcing its
//! content, finding peers, importing archives and reloading certificates.

use std::sync::Arc;
use std::time::Duration;

use peermirror_net::tls::TlsState;
use peermirror_routing::Router;
use peermirror_routing::bootstrap::{self, Bootstrap};
use peermirror_routing::p2p::P2pRouter;
use peermirror_routing::sync;
use peermirror_store::{ContainerdStore, ContentStore};

use super::config::{DaemonConfig, DaemonError};
use super::listen;
use super::supervisor::{Policy, StageId, Supervisor};

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
pub(super) async fn spawn_background(
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
            bootstrap::serve_entry(listener, entry, stop.clone()),
        );
    }
    if let Some(dir) = &config.import_dir {
        let importer = peermirror_store::import::Importer::new(
            &config.containerd.endpoint.socket,
            &config.containerd.endpoint.namespace,
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
