//! What a tag means is not for one keyed peer to decide. Four nodes with
//! the default `--tag-resolution agreement`:
//!
//! - node b, a keyed peer, tags its own image with the name of another (it
//!   is the only holder of that tag): node a resolves the tag at the
//!   registry, not at b;
//! - nodes a and b then hold the tag with different digests: node c's
//!   lookup sees the disagreement and resolves at the registry too;
//! - a tag two nodes agree on is answered through them with the registry
//!   stopped.
//!
//! The air-gapped case (one holder, `--tag-resolution single-holder`) is
//! `airgap`'s.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, ClusterNode, NodeSpec};
use peermirror_tests::image::layer;
use peermirror_tests::process::wait_for;

const KEY: [u8; 32] = [0x66; 32];
const ANNOUNCED: Duration = Duration::from_secs(60);

fn spec(name: &str) -> NodeSpec {
    NodeSpec::new(
        name,
        KEY,
        &[
            "--lookup-cache-ttl",
            "1s",
            // Two cores and four daemons: a holder is found, if at all,
            // well within this (a tag no node holds would wait for it).
            "--mirror-resolve-timeout",
            "2s",
            "--mirror-tag-timeout",
            "3s",
        ],
    )
}

fn not_agreed(node: &ClusterNode, reason: &str) -> f64 {
    node.pm()
        .metric(
            "peermirror_mirror_tags_not_agreed_total",
            &[&format!("reason=\"{reason}\"")],
        )
        .unwrap_or(0.0)
}

#[test]
fn a_keyed_peer_cannot_decide_what_a_tag_means() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut cluster = Cluster::start(&[spec("a"), spec("b"), spec("c"), spec("d")])?;
    cluster.wait_ready(&["a", "b", "c", "d"], Duration::from_secs(60))?;
    let app = cluster
        .layout
        .add_image("tags/app", "1", &[layer(300_000, true)])?;
    let forged = cluster
        .layout
        .add_image("tags/forged", "2", &[layer(200_000, true)])?;
    let shared = cluster
        .layout
        .add_image("tags/shared", "3", &[layer(100_000, true)])?;
    cluster.layout.finish()?;
    for image in [&app, &forged, &shared] {
        cluster.upstream.push(&cluster.layout, image)?;
    }
    let app_ref = cluster.upstream.reference(&app);
    let forged_ref = cluster.upstream.reference(&forged);
    let shared_ref = cluster.upstream.reference(&shared);
    let host = cluster.upstream.host();

    // 1. b tags its own image with app's name, and announces the tag.
    let b = cluster.node("b");
    b.cri_pull(&forged_ref).context("b: pulling its image")?;
    b.containerd
        .ctr(&["images", "tag", "--force", &forged_ref, &app_ref])?;
    let forged_digest = forged.root.digest.to_string();
    let path = format!("/v2/{}/manifests/{}?ns={host}", app.repo, app.tag);
    wait_for("b to serve its tag", Duration::from_secs(30), || {
        let r = b.pm().via.get(b.registry_addr(), &path, &[]).ok()?;
        (r.header("docker-content-digest") == Some(forged_digest.as_str())).then_some(())
    })?;
    // Its image's three digests, its tag and app's.
    b.wait_announced(5, ANNOUNCED)?;

    // A pull of app's tag on `node` resolves at the registry, and `node`
    // counts why its peers' answer was not taken.
    let resolves_at_the_registry = |node: &ClusterNode, reason: &str| -> Result<()> {
        node.cri_pull(&app_ref)
            .with_context(|| format!("{}: pulling app", node.name))?;
        let got = node.image_digest(&app_ref)?;
        ensure!(
            got == app.root.digest,
            "{} resolved {app_ref} to {got} (b's image is {forged_digest}), not the registry's {}",
            node.name,
            app.root.digest
        );
        ensure!(
            not_agreed(node, reason) >= 1.0,
            "{} did not count a tag not agreed on ({reason}); single host: {}, disagreement: {}",
            node.name,
            not_agreed(node, "single_host"),
            not_agreed(node, "disagreement")
        );
        Ok(())
    };

    // 2. b is the only holder: a does not take its word for the tag.
    let a = cluster.node("a");
    resolves_at_the_registry(a, "single_host")?;
    a.wait_announced(4, ANNOUNCED)?;

    // 3. a and b disagree: c resolves at the registry.
    resolves_at_the_registry(cluster.node("c"), "disagreement")?;

    // 4. A tag that two hosts agree on comes from them: a and c pull it
    // from the registry, which then stops; d pulls it by tag.
    cluster
        .node("a")
        .cri_pull(&shared_ref)
        .context("a: shared")?;
    cluster
        .node("c")
        .cri_pull(&shared_ref)
        .context("c: shared")?;
    cluster.node("a").wait_announced(8, ANNOUNCED)?;
    cluster.node("c").wait_announced(8, ANNOUNCED)?;
    cluster.upstream.stop()?;
    let d = cluster.node("d");
    d.cri_pull(&shared_ref)
        .context("d: pulling a tag a and c agree on, with the registry stopped")?;
    d.assert_has(&cluster.layout, &shared)?;
    ensure!(
        d.image_digest(&shared_ref)? == shared.root.digest,
        "d holds another image under {shared_ref}"
    );
    Ok(())
}
