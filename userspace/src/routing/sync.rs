//! The sync task: the only bridge from the content store to the DHT. It
//! watches the catalog and tells the router which keys to start and stop
//! announcing.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Router;
use crate::store::{Catalog, StoreHealth};

/// Runs until `shutdown`. `synced` says when the store's catalog reflects the
/// store (before the first image list, an empty catalog means "not known
/// yet", not "nothing here").
pub async fn run(
    mut catalog: watch::Receiver<Arc<Catalog>>,
    mut health: watch::Receiver<StoreHealth>,
    router: Arc<dyn Router>,
    shutdown: CancellationToken,
) {
    let mut advertised: BTreeSet<String> = BTreeSet::new();
    loop {
        if health.borrow_and_update().synced {
            let keys = catalog.borrow_and_update().keys();
            let removed: Vec<String> = advertised.difference(&keys).cloned().collect();
            let added: Vec<String> = keys.difference(&advertised).cloned().collect();
            tracing::debug!(
                added = added.len(),
                removed = removed.len(),
                total = keys.len(),
                "advertisement changed"
            );
            if !removed.is_empty() && router.withdraw(removed).await.is_err() {
                return;
            }
            // Always sent, even empty: the first call marks the initial
            // advertisement done.
            if router.advertise(added).await.is_err() {
                return;
            }
            advertised = keys;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = catalog.changed() => if r.is_err() { return },
            r = health.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::MemoryRouter;
    use crate::store::{ContentStore, MemoryStore};

    #[tokio::test]
    async fn advertises_additions_and_withdraws_removals() {
        let store = Arc::new(MemoryStore::new());
        let router = MemoryRouter::new();
        let (health_tx, health) = watch::channel(StoreHealth::default());
        let shutdown = CancellationToken::new();
        let layer = store
            .add_blob("application/vnd.oci.image.layer.v1.tar", &b"layer"[..])
            .await;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": layer, "layers": [layer],
        }))
        .expect("json");
        let m = store
            .add_blob("application/vnd.oci.image.manifest.v1+json", manifest)
            .await;
        store.set_image("docker.io/library/x:1", m.clone()).await;
        let task = tokio::spawn(run(
            store.catalog(),
            health,
            router.clone(),
            shutdown.clone(),
        ));

        // Nothing before the store says it is synced.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(router.advertised().is_empty());
        health_tx.send_replace(StoreHealth {
            connected: true,
            synced: true,
        });
        let expect: BTreeSet<String> = [
            m.digest.to_string(),
            layer.digest.to_string(),
            "docker.io/library/x:1".to_string(),
        ]
        .into();
        wait_until(|| router.advertised() == expect).await;

        store.remove_image("docker.io/library/x:1").await;
        wait_until(|| router.advertised().is_empty()).await;
        shutdown.cancel();
        task.await.expect("task");
    }

    async fn wait_until(mut f: impl FnMut() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }
}
