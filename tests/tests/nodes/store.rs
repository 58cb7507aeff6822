//! The containerd content store passes the same conformance cases as the
//! in-memory twin (`peermirror_store::conformance`), against a real
//! containerd holding the standard test images.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use peermirror_oci::{Descriptor, ReferenceFilter};
use peermirror_store::conformance::{self, KnownImage};
use peermirror_store::{ContainerdConfig, ContainerdStore, ContentStore, StoreGauges};
use peermirror_tests::World;
use peermirror_tests::image::TestImage;
use tokio_util::sync::CancellationToken;

fn known(world: &World, image: &TestImage) -> Result<KnownImage> {
    let desc = |d: &peermirror_tests::image::Descriptor| -> Result<Descriptor> {
        Ok(Descriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.parse()?,
            size: d.size,
        })
    };
    let blobs = image
        .default_platform_blobs
        .iter()
        .map(|d| Ok((desc(d)?, Bytes::from(world.layout.read_blob(&d.digest)?))))
        .collect::<Result<Vec<_>>>()?;
    Ok(KnownImage {
        reference: world.upstream.reference(image).parse()?,
        root: desc(&image.root)?,
        blobs,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_containerd_store_behaves_like_a_content_store() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = tokio::task::block_in_place(World::new)?;
    let store = ContainerdStore::new(
        ContainerdConfig {
            endpoint: peermirror_store::ContainerdEndpoint {
                socket: world.containerd.socket.clone(),
                namespace: world.containerd.namespace.clone(),
            },
            content_path: None,
            resync_interval: Duration::from_secs(2),
        },
        ReferenceFilter::default(),
        StoreGauges::default(),
    );
    let stop = CancellationToken::new();
    let follower = tokio::spawn(store.clone().run(stop.clone()));
    let mut health = store.watch_health();
    tokio::time::timeout(
        Duration::from_secs(30),
        health.wait_for(|h| h.synced && h.connected),
    )
    .await
    .context("the store never synced")??;
    let store: Arc<dyn ContentStore> = store;
    for image in &world.images {
        let k = known(&world, image)?;
        conformance::serves(store.as_ref(), &k).await;
    }
    let absent = format!("{}/nobody/here:1", world.upstream.host()).parse()?;
    conformance::misses(store.as_ref(), &absent).await;
    // Remove one image and its content: the store forgets it.
    let victim = &world.images[0];
    let k = known(&world, victim)?;
    let reference = world.upstream.reference(victim);
    let mut args = vec!["content".to_string(), "rm".to_string()];
    args.extend(
        victim
            .default_platform_blobs
            .iter()
            .map(|d| d.digest.clone()),
    );
    let containerd = &world.containerd;
    containerd.ctr(&["images", "rm", &reference])?;
    containerd.ctr(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    conformance::forgets(store.as_ref(), &k).await;
    stop.cancel();
    follower.await?;
    Ok(())
}
