//! First deploy: many nodes pull an image no node has, at the same moment.
//! Eight nodes in network namespaces, each with containerd and peermirror
//! (dataplane required), and the upstream registry behind a link capped
//! with `tc tbf` (400 Mbit/s), whose byte counter says what the upstream
//! sent. The fan-out's rendezvous makes one node fetch each blob and the
//! others follow its in-flight ingest, so the upstream sends each blob
//! about once.
//!
//! Once the image is everywhere, a node that lost it pulls it from several
//! holders at once (step 6).
//!
//! The steps share one cluster and run in order; each says what it checks.
//! `cargo xtask bench fanout` measures the same scenario at 1, 4, 8 and 16
//! nodes and with a 512 MiB layer.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, ClusterNode, NodeSpec};
use peermirror_tests::fanout::{UpstreamLink, fanout_story, ingest_bytes, pull_all};
use peermirror_tests::image::{TestImage, layer};
use peermirror_tests::process::wait_for;

const KEY: [u8; 32] = [0x33; 32];
const NODES: usize = 8;
const MIB: usize = 1 << 20;

fn names() -> Vec<String> {
    (1..=NODES).map(|i| format!("n{i}")).collect()
}

struct Images {
    upstream: String,
    solo: TestImage,
    fan: TestImage,
    cri: TestImage,
    killed: TestImage,
    aborted: TestImage,
    corrupt: TestImage,
    phantom: TestImage,
}

impl Images {
    fn up(&self, image: &TestImage) -> String {
        format!("{}/{}:{}", self.upstream, image.repo, image.tag)
    }
}

#[test]
fn a_first_deploy_fetches_each_blob_from_upstream_about_once() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let specs: Vec<NodeSpec> = names()
        .iter()
        .map(|n| peermirror_tests::fanout::node_spec(n, KEY))
        .collect();
    let mut cluster = Cluster::start(&specs)?;
    let names = names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    cluster.wait_ready(&refs, Duration::from_secs(90))?;
    peermirror_tests::fanout::wait_full_mesh(&cluster, Duration::from_secs(60))?;
    let images = images(&mut cluster)?;
    let link = UpstreamLink::cap(&cluster, "400mbit")?;
    let steps: [(&str, Step); 7] = [
        ("1", step_1_eight_nodes_pull_at_once),
        ("2", step_2_cri_pulls_at_once),
        ("3", step_3_the_leaders_containerd_dies_mid_blob),
        ("3b", step_3b_the_leaders_ingest_is_aborted_mid_blob),
        ("4 and 5", step_4_a_corrupt_ingest_is_never_completed),
        ("6", step_6_a_late_puller_fetches_from_several_holders),
        ("7", step_7_only_a_nodes_own_miss_leads),
    ];
    for (n, step) in steps {
        step(&mut cluster, &images, &link).with_context(|| format!("step {n}"))?;
    }
    Ok(())
}

type Step = fn(&mut Cluster, &Images, &UpstreamLink) -> Result<()>;

fn images(cluster: &mut Cluster) -> Result<Images> {
    let l = &mut cluster.layout;
    let two = [layer(64 * MIB, false), layer(64 * MIB, false)];
    let solo = l.add_image("fan/solo", "v1", &two)?;
    let fan = l.add_image("fan/all", "v2", &two)?;
    let cri = l.add_image("fan/cri", "v3", &[layer(48 * MIB, false)])?;
    let killed = l.add_image("fan/killed", "v4", &[layer(96 * MIB, false)])?;
    let aborted = l.add_image("fan/aborted", "v6", &[layer(96 * MIB, false)])?;
    let corrupt = l.add_image("fan/corrupt", "v5", &[layer(8 * MIB, false)])?;
    let phantom = l.add_image("fan/phantom", "v7", &[layer(8 * MIB, false)])?;
    l.finish()?;
    for image in [&solo, &fan, &cri, &killed, &aborted, &corrupt, &phantom] {
        cluster.upstream.push(&cluster.layout, image)?;
    }
    Ok(Images {
        upstream: cluster.upstream.host(),
        solo,
        fan,
        cri,
        killed,
        aborted,
        corrupt,
        phantom,
    })
}

fn image_bytes(image: &TestImage) -> u64 {
    image.default_platform_blobs.iter().map(|b| b.size).sum()
}

/// 1. One node alone, then all eight at once (`ctr image pull`): the
///    upstream sends at most 1.5× what it sent for one node's pull, and
///    every node holds the image byte for byte.
fn step_1_eight_nodes_pull_at_once(
    c: &mut Cluster,
    im: &Images,
    link: &UpstreamLink,
) -> Result<()> {
    let before = link.sent()?;
    let started = Instant::now();
    c.nodes[0].ctr_pull(&im.up(&im.solo))?;
    let alone = started.elapsed();
    let one = link.sent()? - before;
    ensure!(
        one >= image_bytes(&im.solo),
        "the upstream counter saw {one} bytes for a {} byte image",
        image_bytes(&im.solo)
    );

    let before = link.sent()?;
    let started = Instant::now();
    let all: Vec<&ClusterNode> = c.nodes.iter().collect();
    pull_all(&all, &im.up(&im.fan), |n, r| n.ctr_pull(r))?;
    let together = started.elapsed();
    let eight = link.sent()? - before;
    for node in &c.nodes {
        node.assert_has(&c.layout, &im.fan)?;
    }
    let ratio = eight as f64 / one as f64;
    // Rendezvous answers that came too late (each a download from the
    // upstream).
    let mut late = 0.0;
    for node in &c.nodes {
        late += node
            .pm()
            .metric("peermirror_fanout_answers_total", &["answer=\"late\""])?;
    }
    println!(
        "fan-out: one node {:.2} s, {} MiB from upstream; {NODES} nodes at once {:.2} s ({:.2}×), {} MiB ({ratio:.2}×); late rendezvous answers: {late}",
        alone.as_secs_f64(),
        one >> 20,
        together.as_secs_f64(),
        together.as_secs_f64() / alone.as_secs_f64(),
        eight >> 20,
    );
    if ratio > 1.5 {
        let digests: Vec<&str> = im
            .fan
            .default_platform_blobs
            .iter()
            .map(|b| b.digest.as_str())
            .collect();
        println!("{}", fanout_story(c, &digests));
    }
    ensure!(
        ratio <= 1.5,
        "the upstream sent {ratio:.2}× one node's bytes for {NODES} nodes"
    );
    Ok(())
}

/// 2. CRI `PullImage` (as kubelet pulls) on four nodes at once: the upstream
///    sends the layer about once.
fn step_2_cri_pulls_at_once(c: &mut Cluster, im: &Images, link: &UpstreamLink) -> Result<()> {
    let before = link.sent()?;
    let some: Vec<&ClusterNode> = c.nodes[2..6].iter().collect();
    pull_all(&some, &im.up(&im.cri), |n, r| n.cri_pull(r).map(drop))?;
    let sent = link.sent()? - before;
    for node in &some {
        node.assert_has(&c.layout, &im.cri)?;
    }
    let ratio = sent as f64 / image_bytes(&im.cri) as f64;
    println!("fan-out, CRI × 4: the upstream sent {ratio:.2}× the image");
    ensure!(
        ratio <= 1.5,
        "the upstream sent {ratio:.2}× the image for 4 CRI pulls"
    );
    Ok(())
}

/// 3. The leader's containerd is SIGKILLed mid-blob while three nodes
///    follow it: every follower's pull still succeeds, byte for byte (they
///    notice within the stall timeout, one of them is told to fetch the rest
///    itself, and the others follow it).
fn step_3_the_leaders_containerd_dies_mid_blob(
    c: &mut Cluster,
    im: &Images,
    _link: &UpstreamLink,
) -> Result<()> {
    let reference = im.up(&im.killed);
    // n7 asks first, so it leads; the others join once its ingest grows.
    let leader = &c.nodes[6];
    let leader_root = leader.containerd.content_root();
    let pid = leader.containerd.pid().context("n7's containerd runs")?;
    let followers: Vec<&ClusterNode> = vec![&c.nodes[0], &c.nodes[1], &c.nodes[7]];
    let followed = thread::scope(|s| -> Result<()> {
        // The leader's own pull fails when its containerd dies.
        let lead = s.spawn(|| leader.ctr_pull(&reference));
        wait_for(
            "the leader's ingest to grow",
            Duration::from_secs(30),
            || (ingest_bytes(&leader_root) > 16 * MIB as u64).then_some(()),
        )?;
        let pulls = s.spawn(|| pull_all(&followers, &reference, |n, r| n.ctr_pull(r)));
        // Let them join the leader's ingest, then kill its containerd (by
        // the PID this test started).
        thread::sleep(Duration::from_millis(300));
        let written = ingest_bytes(&leader_root);
        // SAFETY: kill(2) on the PID of a containerd this test started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        println!(
            "fan-out: killed the leader's containerd at {} MiB of {} MiB",
            written >> 20,
            im.killed.biggest_layer().size >> 20
        );
        let _ = lead.join();
        pulls
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("pull thread panicked")))
    });
    let leader = &mut c.nodes[6];
    leader.containerd.kill();
    leader.containerd.restart()?;
    followed?;
    for node in [&c.nodes[0], &c.nodes[1], &c.nodes[7]] {
        node.assert_has(&c.layout, &im.killed)?;
    }
    Ok(())
}

/// 3b. The leader's ingest is aborted through the gRPC `Content.Abort`
///     mid-blob (what a client that gives up does) while three nodes follow
///     it: every follower's pull still succeeds, byte for byte.
fn step_3b_the_leaders_ingest_is_aborted_mid_blob(
    c: &mut Cluster,
    im: &Images,
    _link: &UpstreamLink,
) -> Result<()> {
    let reference = im.up(&im.aborted);
    let layer = im.aborted.biggest_layer().digest.clone();
    // n2 asks first, so it leads.
    let leader = &c.nodes[1];
    let root = leader.containerd.content_root();
    let followers: Vec<&ClusterNode> = vec![&c.nodes[2], &c.nodes[3], &c.nodes[4]];
    thread::scope(|s| -> Result<()> {
        // The leader's own pull fails when its ingest goes.
        let lead = s.spawn(|| leader.ctr_pull(&reference));
        wait_for(
            "the leader's ingest to grow",
            Duration::from_secs(30),
            || (ingest_bytes(&root) > 16 * MIB as u64).then_some(()),
        )?;
        let pulls = s.spawn(|| pull_all(&followers, &reference, |n, r| n.ctr_pull(r)));
        thread::sleep(Duration::from_millis(300));
        let ingest = leader
            .containerd
            .active_ingests()?
            .into_iter()
            .find(|r| r.ends_with(&layer))
            .with_context(|| format!("no active ingest of {layer} on n2"))?;
        let written = ingest_bytes(&root);
        leader.containerd.abort_ingest(&ingest)?;
        println!(
            "fan-out: aborted the leader's ingest {ingest} at {} MiB of {} MiB",
            written >> 20,
            im.aborted.biggest_layer().size >> 20
        );
        let _ = lead.join();
        pulls
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("pull thread panicked")))
    })?;
    for node in &followers {
        node.assert_has(&c.layout, &im.aborted)?;
    }
    Ok(())
}

/// A fake ingest of `layer` in `node`'s content store, written for
/// containerd `namespace`: its ref and total are right, its bytes are not
/// the blob's, and nobody will commit it.
fn plant_corrupt_ingest(
    node: &ClusterNode,
    namespace: &str,
    digest: &str,
    size: u64,
) -> Result<std::path::PathBuf> {
    let dir = node
        .containerd
        .content_root()
        .join(format!("ingest/planted-by-test-{namespace}"));
    std::fs::create_dir_all(&dir)?;
    // containerd's own key: `<namespace>/<sequence>/<the client's ref>`.
    std::fs::write(dir.join("ref"), format!("{namespace}/1/layer-{digest}"))?;
    std::fs::write(dir.join("total"), size.to_string())?;
    std::fs::write(dir.join("data"), vec![0x5a; size as usize])?;
    Ok(dir)
}

/// 4. An ingest whose bytes are not the blob's (containerd would never
///    commit it) is followed but never completed: the follower's client gets
///    a short body; a real pull on that node afterwards succeeds.
/// 5. A plain client (no peer, no certificate) asking for a blob that is
///    only in `ingest/` gets 404, with the follow header or without; a peer
///    with the header gets the in-flight bytes, but only from an ingest of
///    the served containerd namespace.
fn step_4_a_corrupt_ingest_is_never_completed(
    c: &mut Cluster,
    im: &Images,
    _link: &UpstreamLink,
) -> Result<()> {
    let layer = im.corrupt.biggest_layer().clone();
    let (n5, n6) = (&c.nodes[4], &c.nodes[5]);
    // First only another namespace's ingest of the layer.
    let elsewhere = plant_corrupt_ingest(n5, "default", &layer.digest, layer.size)?;
    let path = format!(
        "/v2/{}/blobs/{}?ns={}",
        im.corrupt.repo, layer.digest, im.upstream
    );
    let local =
        std::net::SocketAddr::from(([127, 0, 0, 1], peermirror_tests::cluster::REGISTRY_PORT));

    // n5 asks first: told to fetch it itself, so it answers 404 at once.
    let r = n5.host.ns.via().get(local, &path, &[])?;
    ensure!(r.status == 404, "n5's own miss answered {}", r.status);
    // Step 5: in-flight bytes are for peers only.
    for headers in [
        &[][..],
        &[("x-peermirror-follow", "1"), ("x-peermirror-mirrored", "1")][..],
    ] {
        let r = n5.host.ns.via().get(local, &path, headers)?;
        ensure!(
            r.status == 404,
            "a plain client on n5 ({headers:?}) got {} for an in-flight blob",
            r.status
        );
    }
    let follow = || {
        n6.host.ns.via().request(
            n5.registry_addr(),
            "HEAD",
            &path,
            &[("x-peermirror-follow", "1"), ("x-peermirror-mirrored", "1")],
        )
    };
    let as_peer = follow()?;
    ensure!(
        as_peer.status == 404,
        "a peer was served another namespace's ingest: {}",
        as_peer.status
    );
    std::fs::remove_dir_all(elsewhere)?;
    let planted = plant_corrupt_ingest(n5, "k8s.io", &layer.digest, layer.size)?;
    let as_peer = follow()?;
    ensure!(
        as_peer.status == 200,
        "a peer following n5's ingest got {}",
        as_peer.status
    );

    // n6 is told to follow n5: its client never gets the whole blob.
    let started = Instant::now();
    let followed = n6.host.ns.via().get(local, &path, &[]);
    match &followed {
        Ok(r) if r.status == 200 => ensure!(
            (r.body.len() as u64) < layer.size,
            "a corrupt ingest was relayed whole"
        ),
        Ok(r) => ensure!(r.status == 404, "n6 answered {}", r.status),
        Err(_) => {} // cut short
    }
    println!(
        "fan-out: the corrupt ingest's follower ended after {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        match &followed {
            Ok(r) => format!(
                "status {}, {} of {} bytes",
                r.status,
                r.body.len(),
                layer.size
            ),
            Err(e) => format!("{e:#}"),
        }
    );
    // n6's containerd then pulls the image: it is placed anew (the source
    // failed) and fetches it from upstream.
    n6.ctr_pull(&im.up(&im.corrupt))?;
    n6.assert_has(&c.layout, &im.corrupt)?;
    std::fs::remove_dir_all(planted)?;
    Ok(())
}

/// 6. Once all eight hold an image, a node that lost it pulls it again:
///    each 64 MiB layer comes from several holders at once and is verified
///    as one blob (the node's mirror journal names the holders), and the
///    upstream sends nothing of it. Holders tell peers their upload rate,
///    measured by their dataplane.
fn step_6_a_late_puller_fetches_from_several_holders(
    c: &mut Cluster,
    im: &Images,
    link: &UpstreamLink,
) -> Result<()> {
    let reference = im.up(&im.fan);
    let node = &c.nodes[7];
    node.containerd
        .ctr(&["images", "rm", "--sync", &reference])?;
    let layers: Vec<_> = im
        .fan
        .default_platform_blobs
        .iter()
        .filter(|b| b.media_type.contains("layer"))
        .collect();
    // The image record alone does not hold the layers: remove the content,
    // then collect garbage at once (deleting a lease with --sync runs it).
    let mut rm = vec!["content", "rm"];
    rm.extend(
        im.fan
            .default_platform_blobs
            .iter()
            .map(|b| b.digest.as_str()),
    );
    node.containerd.ctr(&rm)?;
    let lease = node.containerd.ctr(&["leases", "create"])?;
    let lease = lease.split_whitespace().next().context("a lease id")?;
    node.containerd
        .ctr(&["leases", "delete", "--sync", lease])?;
    let content = node.content()?;
    ensure!(
        layers.iter().all(|l| !content.contains(&l.digest)),
        "{}'s layers are still in its store",
        node.name
    );
    let before = link.sent()?;
    node.ctr_pull(&reference)?;
    let sent = link.sent()? - before;
    node.assert_has(&c.layout, &im.fan)?;
    ensure!(
        sent < image_bytes(&im.fan) / 10,
        "the upstream sent {sent} bytes of an image every peer holds"
    );
    let pm = node.pm();
    let recent = pm.recent_requests()?;
    for l in &layers {
        let record = recent
            .iter()
            .find(|r| r["key"] == l.digest.as_str() && r["outcome"] == "hit")
            .with_context(|| format!("no hit for {} in {recent:?}", l.digest))?;
        let holders = record["peers"].as_array().map_or(0, Vec::len);
        println!(
            "fan-out: {} MiB layer from {holders} holders at {:.0} MiB/s, verified {}",
            l.size >> 20,
            record["mib_per_s"].as_f64().unwrap_or(0.0),
            record["verified"]
        );
        ensure!(record["verified"] == true, "not verified: {record}");
        ensure!(holders >= 2, "one holder only: {record}");
    }
    // A holder answers a peer with its upload rate.
    let path = format!(
        "/v2/{}/blobs/{}?ns={}",
        im.fan.repo, layers[0].digest, im.upstream
    );
    let r = c.nodes[6].host.ns.via().request(
        c.nodes[0].registry_addr(),
        "HEAD",
        &path,
        &[("x-peermirror-mirrored", "1")],
    )?;
    ensure!(r.status == 200, "n1 answered {} to a peer", r.status);
    let rate = r.header("x-peermirror-upload-rate");
    ensure!(
        rate.and_then(|v| v.parse::<u64>().ok()).is_some(),
        "n1 told no upload rate: {:?}",
        r.headers
    );
    Ok(())
}

/// 7. Only a node's own containerd may lead a fan-out: another host asking
///    n7's registry port for a layer nobody holds does not make n7 its
///    leader (n7's containerd fetches nothing), so n2's containerd, missing
///    it next, leads it itself instead of being sent to follow n7.
fn step_7_only_a_nodes_own_miss_leads(
    c: &mut Cluster,
    im: &Images,
    _link: &UpstreamLink,
) -> Result<()> {
    let layer = im.phantom.biggest_layer().clone();
    let (n2, n7, n8) = (&c.nodes[1], &c.nodes[6], &c.nodes[7]);
    let path = format!(
        "/v2/{}/blobs/{}?ns={}",
        im.phantom.repo, layer.digest, im.upstream
    );
    // From n8's namespace to n7's address: a host other than n7.
    let r = n8.host.ns.via().get(n7.registry_addr(), &path, &[])?;
    ensure!(
        r.status == 404,
        "n7 answered {} for a layer nobody holds",
        r.status
    );
    n2.ctr_pull(&im.up(&im.phantom))?;
    n2.assert_has(&c.layout, &im.phantom)?;
    let log = std::fs::read_to_string(&n2.pm().proc.log)?;
    let sent: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&layer.digest) && l.contains("fan-out source cannot serve"))
        .collect();
    ensure!(
        sent.is_empty(),
        "n2 was sent to follow a node that fetched nothing:\n{}",
        sent.join("\n")
    );
    Ok(())
}
