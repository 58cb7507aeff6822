//! The sync task: the only bridge from the content store to the DHT. It
//! watches the catalog and tells the router which keys to start and stop
//! announcing. The first catalog the store reports after it is synced is
//! handed over as the [`Round::Initial`] announcement; readiness waits for
//! it to be stored.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Round, Router, RouterError};
use peermirror_store::{Catalog, StoreHealth};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error("the content store stopped reporting its catalog")]
    StoreStopped,
}

/// Runs until `shutdown`. `health.synced` says when the store's catalog
/// reflects the store (before the first image list, an empty catalog means
/// "not known yet", not "nothing here").
pub async fn run(
    mut catalog: watch::Receiver<Arc<Catalog>>,
    mut health: watch::Receiver<StoreHealth>,
    router: Arc<dyn Router>,
    shutdown: CancellationToken,
) -> Result<(), SyncError> {
    let mut advertised: Option<BTreeSet<String>> = None;
    loop {
        if health.borrow_and_update().synced {
            let keys = catalog.borrow_and_update().keys();
            match &advertised {
                None => {
                    tracing::debug!(total = keys.len(), "first announcement handed over");
                    router
                        .advertise(keys.iter().cloned().collect(), Round::Initial)
                        .await?;
                }
                Some(before) => {
                    let removed: Vec<String> = before.difference(&keys).cloned().collect();
                    let added: Vec<String> = keys.difference(before).cloned().collect();
                    if !removed.is_empty() || !added.is_empty() {
                        tracing::debug!(
                            added = added.len(),
                            removed = removed.len(),
                            total = keys.len(),
                            "advertisement changed"
                        );
                    }
                    if !removed.is_empty() {
                        router.withdraw(removed).await?;
                    }
                    if !added.is_empty() {
                        router.advertise(added, Round::Update).await?;
                    }
                }
            }
            advertised = Some(keys);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = catalog.changed() => r.map_err(|_| SyncError::StoreStopped)?,
            r = health.changed() => r.map_err(|_| SyncError::StoreStopped)?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FirstRound, MemoryRouter};
    use peermirror_store::{ContentStore, MemoryStore};

    #[tokio::test(start_paused = true)]
    async fn advertises_additions_and_withdraws_removals() {
        let store = Arc::new(MemoryStore::new());
        let router = MemoryRouter::new();
        let shutdown = CancellationToken::new();
        store.set_health(StoreHealth::default());
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
            store.watch_health(),
            router.clone(),
            shutdown.clone(),
        ));

        // Nothing before the store says it is synced (the paused clock runs
        // every timer to completion, so "nothing" is checked, not hoped for).
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(router.advertised().is_empty());
        assert_eq!(router.status().first_round, FirstRound::Waiting);
        store.set_health(StoreHealth {
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
        assert_eq!(router.status().first_round, FirstRound::Stored);

        store.remove_image("docker.io/library/x:1").await;
        wait_until(|| router.advertised().is_empty()).await;
        shutdown.cancel();
        task.await.expect("task").expect("clean stop");
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_store_is_an_empty_first_round() {
        let store = Arc::new(MemoryStore::new());
        let router = MemoryRouter::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            store.catalog(),
            store.watch_health(),
            router.clone(),
            shutdown.clone(),
        ));
        wait_until(|| router.status().first_round == FirstRound::Stored).await;
        shutdown.cancel();
        task.await.expect("task").expect("clean stop");
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
