//! The multi-node end-to-end test, as a user would run a cluster: nodes in
//! network namespaces, each with containerd (CRI on) and peermirror, pulls
//! through CRI `PullImage` and `ctr image pull --hosts-dir`, the upstream
//! registry stopped, and peers that die, go silent, slow down or lie.
//!
//! The steps share one cluster (setting it up is the expensive part) and run
//! in order; each says what it checks.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use peermirror_tests::cluster::{Cluster, ClusterNode, NodeSpec, ROUTER_PORT};
use peermirror_tests::http::read_response;
use peermirror_tests::image::{Descriptor, TestImage, layer};
use peermirror_tests::process::wait_for;

const KEY: [u8; 32] = [0x11; 32];
const OTHER_KEY: [u8; 32] = [0x22; 32];
const PROVIDER_TTL: Duration = Duration::from_secs(15);
const MIB: u64 = 1 << 20;

/// A node of this air-gapped cluster: the upstream goes away in step 2,
/// and tags are then answered by the one node that holds them
/// (`--tag-resolution single-holder`; the default is `tags`' test).
fn spec(name: &str, psk: [u8; 32]) -> NodeSpec {
    NodeSpec::new(
        name,
        psk,
        &[
            "--tag-resolution",
            "single-holder",
            "--provider-ttl",
            "15s",
            "--reannounce-interval",
            "5s",
            "--lookup-cache-ttl",
            "1s",
            "--mirror-stall-timeout",
            "2s",
            "--resync-interval",
            "5s",
        ],
    )
}

/// The peer id a node prints on its debug page.
fn peer_id(node: &ClusterNode) -> Result<String> {
    node.pm().peer_id()
}

fn debug_page(node: &ClusterNode) -> Result<String> {
    node.pm().debug_page()
}

fn file_bytes(node: &ClusterNode) -> f64 {
    node.pm()
        .metric("peermirror_served_bytes_total", &["source=\"file\""])
        .unwrap_or(0.0)
}

fn mirror_bytes(node: &ClusterNode) -> f64 {
    node.pm()
        .metric("peermirror_served_bytes_total", &["source=\"mirror\""])
        .unwrap_or(0.0)
}

/// Peak resident set size of a process while `f` runs, sampled every 20 ms.
fn peak_rss_during<T>(pid: u32, f: impl FnOnce() -> T) -> (T, u64) {
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    let kib = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    peak.fetch_max(kib * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = f();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    (out, peak.load(Ordering::Relaxed))
}

/// Lines of a node's peermirror log that mention `needle`.
fn log_lines(node: &ClusterNode, needle: &str) -> Vec<String> {
    std::fs::read_to_string(&node.pm().proc.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        // A node that is the fan-out rendezvous of a digest logs the
        // answers it gives others about it: it is not asked for its bytes.
        .filter(|l| {
            !l.contains("peermirror_routing::p2p::rendezvous:")
                && !l.contains("peermirror_protocol::fanout:")
        })
        .map(str::to_string)
        .collect()
}

/// Limits a node's outgoing bandwidth (`None` removes the limit).
fn rate_limit(node: &ClusterNode, rate: Option<&str>) -> Result<()> {
    let _ = node.host.ns.tc(&["qdisc", "del", "dev", "eth0", "root"]);
    if let Some(rate) = rate {
        node.host.ns.tc(&[
            "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "128kb",
            "latency", "200ms",
        ])?;
    }
    Ok(())
}

/// Runs a pull on another thread; the main thread watches.
fn pull_in_background(
    node: &ClusterNode,
    reference: &str,
    cri: bool,
) -> std::thread::JoinHandle<Result<()>> {
    let socket = node.containerd.socket.clone();
    let certs = node.certs_d.clone();
    let mut ctr = node.containerd.ctr_command();
    let reference = reference.to_string();
    std::thread::spawn(move || {
        if cri {
            peermirror_tests::cri::pull_image(&socket, &reference).map(drop)
        } else {
            peermirror_tests::process::run(
                ctr.args(["--namespace", "k8s.io", "images", "pull", "--hosts-dir"])
                    .arg(&certs)
                    .args(
                        // As in `Containerd::pull_via`.
                        peermirror_tests::release::release()
                            .is_v2()
                            .then_some("--skip-metadata"),
                    )
                    .arg(&reference),
            )
            .map(drop)
        }
    })
}

fn layer_of(image: &TestImage) -> &Descriptor {
    image.biggest_layer()
}

/// The images of the scenario, pushed to the upstream registry.
struct Images {
    upstream: String,
    multi: TestImage,
    index: TestImage,
    big: TestImage,
    big2: TestImage,
    medium: TestImage,
    victim: TestImage,
    gone: TestImage,
    patterns: TestImage,
    fresh: TestImage,
    fresh2: TestImage,
    dial: TestImage,
}

impl Images {
    /// The upstream reference of `image`.
    fn up(&self, image: &TestImage) -> String {
        format!("{}/{}:{}", self.upstream, image.repo, image.tag)
    }
}

/// Answers with `206 Partial Content` a node's registry port sent: the
/// resumes of other nodes' transfers (containerd 1.6 itself asks for whole
/// blobs).
fn partial_answers(node: &ClusterNode) -> f64 {
    node.pm()
        .metric(
            "peermirror_http_request_duration_seconds_count",
            &["code=\"206\""],
        )
        .unwrap_or(0.0)
}

#[test]
fn a_cluster_shares_images_with_the_upstream_registry_gone() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut cluster = Cluster::start(&[
        spec("a", KEY),
        spec("b", KEY),
        spec("c", KEY),
        spec("d", OTHER_KEY),
    ])?;
    cluster.wait_ready(&["a", "b", "c"], Duration::from_secs(60))?;
    let images = images(&mut cluster)?;
    let steps: [(&str, Step); 13] = [
        ("1", step_01_a_pulls_from_upstream),
        ("2", step_02_the_upstream_goes_away),
        ("3", step_03_b_and_c_pull_through_their_peers),
        ("4", step_04_a_stranger_stays_out),
        ("5", step_05_a_holder_dies_mid_layer),
        ("6", step_06_a_holder_goes_silent),
        ("7", step_07_a_slow_holder_is_replaced),
        ("8", step_08_a_corrupt_copy_is_cut_short),
        ("9", step_09_deleted_content_is_forgotten),
        ("10", step_10_unknown_images_fall_through_fast),
        ("11", step_11_containerd_2_request_patterns),
        ("12", step_12_upload_limits_send_containerd_on),
        (
            "13",
            step_13_a_target_that_drops_syns_costs_the_dial_timeout,
        ),
    ];
    for (n, step) in steps {
        step(&mut cluster, &images).with_context(|| format!("step {n}"))?;
    }
    Ok(())
}

type Step = fn(&mut Cluster, &Images) -> Result<()>;

/// Generates the scenario's images and pushes them to the upstream registry.
fn images(cluster: &mut Cluster) -> Result<Images> {
    let l = &mut cluster.layout;
    let multi = l.add_image(
        "app/multi",
        "v1",
        &[
            layer(3 << 20, true),
            layer(5 << 20, false),
            layer(10_000, true),
        ],
    )?;
    let index = l.add_index(
        "app/index",
        "v2",
        &[layer(2 << 20, true), layer(300_000, false)],
    )?;
    let big = l.add_image(
        "app/big",
        "v3",
        &[layer(256 << 20, false), layer(1000, true)],
    )?;
    let big2 = l.add_image("app/big2", "v4", &[layer(64 << 20, false)])?;
    let medium = l.add_image("app/medium", "v5", &[layer(16 << 20, false)])?;
    let victim = l.add_image("app/victim", "v6", &[layer(8 << 20, false)])?;
    let gone = l.add_image("app/gone", "v7", &[layer(4 << 20, false)])?;
    let patterns = l.add_image("app/patterns", "v8", &[layer(32 << 20, false)])?;
    let fresh = l.add_image("app/fresh", "v9", &[layer(4 << 20, false)])?;
    let fresh2 = l.add_image("app/fresh2", "v10", &[layer(4 << 20, false)])?;
    let dial = l.add_image(
        "app/dial",
        "v11",
        &[layer(1 << 20, false), layer(1000, true)],
    )?;
    l.finish()?;
    for image in [
        &multi, &index, &big, &big2, &medium, &victim, &gone, &patterns, &fresh, &fresh2, &dial,
    ] {
        cluster.upstream.push(&cluster.layout, image)?;
    }
    Ok(Images {
        upstream: cluster.upstream.host(),
        multi,
        index,
        big,
        big2,
        medium,
        victim,
        gone,
        patterns,
        fresh,
        fresh2,
        dial,
    })
}

/// Node A pulls from upstream (its peermirror has nothing yet and
///    answers 404 at once, so containerd goes on to the registry).
fn step_01_a_pulls_from_upstream(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images {
        multi,
        index,
        big,
        big2,
        medium,
        victim,
        gone,
        patterns,
        ..
    } = im;
    let up = |image: &TestImage| im.up(image);
    for image in [&multi, &index, &big, &big2, &medium, &gone, &patterns] {
        cluster.node("a").cri_pull(&up(image))?;
        cluster.node("a").assert_has(&cluster.layout, image)?;
    }
    cluster.node("c").ctr_pull(&up(victim))?;
    Ok(())
}

/// The upstream registry goes away.
fn step_02_the_upstream_goes_away(cluster: &mut Cluster, _: &Images) -> Result<()> {
    cluster.upstream.stop()?;
    Ok(())
}

/// B (CRI PullImage, what kubelet calls) and C (ctr --hosts-dir) pull
///    by tag and by digest through their local peermirror.
fn step_03_b_and_c_pull_through_their_peers(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images {
        multi,
        index,
        big,
        big2,
        ..
    } = im;
    let up = |image: &TestImage| im.up(image);
    cluster.node("a").pm().wait_metric(
        "A to advertise its images",
        "peermirror_advertised_keys",
        &[],
        Duration::from_secs(30),
        |keys| keys >= 30.0,
    )?;
    let index_by_digest = format!(
        "{}/{}@{}",
        cluster.upstream.host(),
        index.repo,
        index.root.digest
    );
    {
        let b = cluster.node("b");
        b.cri_pull(&up(multi)).context("B: CRI pull by tag")?;
        b.cri_pull(&index_by_digest)
            .context("B: CRI pull by digest")?;
        b.assert_has(&cluster.layout, multi)?;
        b.assert_has(&cluster.layout, index)?;
        ensure!(
            mirror_bytes(b) >= (8 * MIB) as f64,
            "B's pulls did not come through peermirror"
        );
        let c = cluster.node("c");
        c.ctr_pull(&up(multi)).context("C: ctr pull by tag")?;
        c.ctr_pull(&index_by_digest)
            .context("C: ctr pull by digest")?;
        for image in [&big, &big2] {
            c.ctr_pull(&up(image))
                .with_context(|| format!("C: ctr pull {}", image.repo))?;
        }
        for image in [&multi, &index, &big, &big2] {
            c.assert_has(&cluster.layout, image)?;
        }
    }
    println!("step 3: B and C pulled through their peers with upstream stopped");
    Ok(())
}

/// D's key differs: it dials A, but never gets in.
fn step_04_a_stranger_stays_out(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { multi, .. } = im;
    let up = |image: &TestImage| im.up(image);
    {
        let (a, d) = (cluster.node("a"), cluster.node("d"));
        a.pm().wait_metric(
            "A to count D's failed handshakes",
            "peermirror_p2p_handshake_failures_total",
            &[],
            Duration::from_secs(30),
            |failures| failures > 0.0,
        )?;
        // Only strangers count: B and C never met one (closed ports, their
        // own addresses and unusable ones are not handshake failures).
        for name in ["b", "c"] {
            let failures = cluster
                .node(name)
                .pm()
                .metric("peermirror_p2p_handshake_failures_total", &[])?;
            ensure!(
                failures == 0.0,
                "{name} counted {failures} handshake failures"
            );
        }
        ensure!(d.ctr_pull(&up(multi)).is_err(), "D pulled without the key");
        ensure!(d.pm().metric("peermirror_p2p_routing_table_peers", &[])? == 0.0);
        let ready = d.pm().via.get(d.pm().metrics, "/readyz", &[])?;
        ensure!(ready.status == 503, "D says it is ready");
        let d_id = peer_id(d)?;
        for name in ["a", "b", "c"] {
            let page = debug_page(cluster.node(name))?;
            ensure!(!page.contains(&d_id), "{name} lists D as a peer:\n{page}");
        }
        // The debug pages answer peers, not strangers.
        let b = cluster.node("b");
        let from_d = d.pm().via.get(a.pm().metrics, "/debug", &[])?;
        ensure!(
            from_d.status == 403,
            "A's /debug answered D {}",
            from_d.status
        );
        let from_b = b.pm().via.get(a.pm().metrics, "/debug", &[])?;
        ensure!(
            from_b.status == 200,
            "A's /debug answered B {}",
            from_b.status
        );
    }
    println!("step 4: D with another key stayed out (and out of the debug pages)");
    Ok(())
}

/// A holder dies while B streams a 256 MiB layer from it: B's pull
///    completes from the other holder, which was asked for the rest with
///    `Range: bytes=N-`; B's peermirror streams, it does not buffer.
fn step_05_a_holder_dies_mid_layer(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { big, .. } = im;
    let up = |image: &TestImage| im.up(image);
    rate_limit(cluster.node("a"), Some("400mbit"))?;
    rate_limit(cluster.node("c"), Some("400mbit"))?;
    let (a_before, c_before) = (file_bytes(cluster.node("a")), file_bytes(cluster.node("c")));
    let partial_before = [
        ("a", partial_answers(cluster.node("a"))),
        ("c", partial_answers(cluster.node("c"))),
    ];
    let b_pid = cluster.node("b").pm().proc.pid();
    let b_mirror_before = mirror_bytes(cluster.node("b"));
    let (outcome, peak) = peak_rss_during(b_pid, || -> Result<(String, Result<()>)> {
        let handle = pull_in_background(cluster.node("b"), &up(big), true);
        wait_for(
            "B to be part-way through the big layer",
            Duration::from_secs(60),
            || {
                (mirror_bytes(cluster.node("b")) - b_mirror_before > (40 * MIB) as f64)
                    .then_some(())
            },
        )?;
        let a_sent = file_bytes(cluster.node("a")) - a_before;
        let c_sent = file_bytes(cluster.node("c")) - c_before;
        let serving = if a_sent > c_sent { "a" } else { "c" };
        cluster
            .node_mut(serving)
            .peermirror
            .as_mut()
            .context("pm")?
            .proc
            .kill();
        let pull = handle
            .join()
            .map_err(|_| anyhow::anyhow!("pull thread panicked"))?;
        Ok((serving.to_string(), pull))
    });
    let (victim_name, pull) = outcome?;
    pull.context("B's pull after the holder died")?;
    cluster.node("b").assert_has(&cluster.layout, big)?;
    ensure!(
        peak < 64 * MIB,
        "B's peermirror peaked at {} MiB",
        peak / MIB
    );
    let other = if victim_name == "a" { "c" } else { "a" };
    let before = partial_before
        .iter()
        .find(|(n, _)| *n == other)
        .map_or(0.0, |(_, v)| *v);
    let resumed = partial_answers(cluster.node(other)) - before;
    ensure!(
        resumed >= 1.0,
        "{other} never answered a Range: bytes=N- request (no 206)"
    );
    println!(
        "step 5: holder {victim_name} killed mid-layer, {other} resumed it; B peaked at {} MiB",
        peak / MIB
    );
    cluster.node_mut(&victim_name).start_peermirror()?;
    cluster.wait_ready(&[&victim_name], Duration::from_secs(60))?;
    Ok(())
}

/// A holder's link goes silent (no RST) mid-transfer: B finishes from
///    the other within a few seconds.
fn step_06_a_holder_goes_silent(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { big2, .. } = im;
    let up = |image: &TestImage| im.up(image);
    let (a_before, c_before) = (file_bytes(cluster.node("a")), file_bytes(cluster.node("c")));
    let b_mirror_before = mirror_bytes(cluster.node("b"));
    let handle = pull_in_background(cluster.node("b"), &up(big2), false);
    wait_for(
        "B to be part-way through big2",
        Duration::from_secs(60),
        || (mirror_bytes(cluster.node("b")) - b_mirror_before > (10 * MIB) as f64).then_some(()),
    )?;
    let a_sent = file_bytes(cluster.node("a")) - a_before;
    let c_sent = file_bytes(cluster.node("c")) - c_before;
    let silent = if a_sent > c_sent { "a" } else { "c" };
    let silenced_at = Instant::now();
    cluster.network.blackhole(&cluster.node(silent).host)?;
    let pull = handle
        .join()
        .map_err(|_| anyhow::anyhow!("pull thread panicked"))?;
    let took = silenced_at.elapsed();
    cluster.network.restore(&cluster.node(silent).host)?;
    pull.context("B's pull with a blackholed holder")?;
    cluster.node("b").assert_has(&cluster.layout, big2)?;
    ensure!(
        took < Duration::from_secs(15),
        "took {took:?} after the holder went silent"
    );
    println!("step 6: holder {silent} blackholed, pull finished {took:?} later");
    rate_limit(cluster.node("a"), None)?;
    rate_limit(cluster.node("c"), None)?;
    Ok(())
}

/// A slow holder: while B streams `medium` from A, whose link is
///    throttled to 2 Mbit/s, C gets the image too (straight from the
///    restarted upstream). B's transfer notices it is too slow, looks
///    again, and finishes from C.
fn step_07_a_slow_holder_is_replaced(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { medium, .. } = im;
    let up = |image: &TestImage| im.up(image);
    cluster.upstream.restart()?;
    rate_limit(cluster.node("a"), Some("2mbit"))?;
    let c_partial_before = partial_answers(cluster.node("c"));
    let b_mirror_before = mirror_bytes(cluster.node("b"));
    let started = Instant::now();
    let handle = pull_in_background(cluster.node("b"), &up(medium), true);
    wait_for(
        "B to start streaming medium from A",
        Duration::from_secs(30),
        || (mirror_bytes(cluster.node("b")) - b_mirror_before > (64 << 10) as f64).then_some(()),
    )?;
    cluster
        .node("c")
        .containerd
        .ctr(&["images", "pull", "--plain-http", &up(medium)])?;
    let pull = handle
        .join()
        .map_err(|_| anyhow::anyhow!("pull thread panicked"))?;
    let took = started.elapsed();
    rate_limit(cluster.node("a"), None)?;
    pull.context("B's pull with a slow holder")?;
    cluster.node("b").assert_has(&cluster.layout, medium)?;
    // 16 MiB at 2 Mbit/s alone would take over a minute.
    ensure!(
        took < Duration::from_secs(25),
        "pull with a slow holder took {took:?}"
    );
    let took_over = partial_answers(cluster.node("c")) - c_partial_before;
    ensure!(took_over >= 1.0, "C never resumed medium's layer for B");
    println!("step 7: a slow holder was replaced mid-layer; the pull took {took:?}");
    Ok(())
}

/// A holder's copy is corrupt: a client asking for it gets fewer bytes
///    than Content-Length; the corrupt peer is not asked again, and
///    containerd's pull succeeds through upstream (running again since 7).
fn step_08_a_corrupt_copy_is_cut_short(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { victim, .. } = im;
    let up = |image: &TestImage| im.up(image);
    let victim_layer = layer_of(victim).clone();
    {
        let c = cluster.node("c");
        let path = c
            .containerd
            .content_root()
            .join("blobs/sha256")
            .join(victim_layer.hex());
        let mut bytes = std::fs::read(&path)?;
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        std::fs::write(&path, &bytes)?;
        let b = cluster.node("b");
        let mut conn = b
            .host
            .ns
            .via()
            .connect(b.registry_addr(), Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let path = format!(
            "/v2/{}/blobs/{}?ns={}",
            victim.repo,
            victim_layer.digest,
            cluster.upstream.host()
        );
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())?;
        let mut received = Vec::new();
        let _ = conn.read_to_end(&mut received);
        let head_end = received
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no response head")?
            + 4;
        let head = String::from_utf8_lossy(&received[..head_end]).to_lowercase();
        ensure!(
            head.contains(&format!("content-length: {}", victim_layer.size)),
            "{head}"
        );
        let body = received.len() - head_end;
        ensure!(
            (body as u64) < victim_layer.size,
            "the corrupt blob arrived whole ({body} bytes)"
        );
    }
    let asked_before = log_lines(cluster.node("c"), &victim_layer.digest).len();
    cluster.node("b").cri_pull(&up(victim))?;
    cluster.node("b").assert_has(&cluster.layout, victim)?;
    let asked_after = log_lines(cluster.node("c"), &victim_layer.digest).len();
    ensure!(
        asked_after == asked_before,
        "the corrupt holder was asked again ({asked_before} -> {asked_after})"
    );
    println!("step 8: corrupt copy cut short and avoided; pull succeeded through upstream");
    Ok(())
}

/// An image deleted on its only holder: misses stay fast while the
///    stale record lives, and lookups forget it once the TTL passed.
fn step_09_deleted_content_is_forgotten(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { gone, .. } = im;
    let up = |image: &TestImage| im.up(image);
    let gone_layer = layer_of(gone).clone();
    {
        let a = cluster.node("a");
        a.containerd.ctr(&["images", "rm", &up(gone)])?;
        let blobs: Vec<&str> = gone.blobs.iter().map(|b| b.digest.as_str()).collect();
        let mut args = vec!["content", "rm"];
        args.extend(blobs);
        a.containerd.ctr(&args)?;
    }
    let deleted_at = Instant::now();
    let b = cluster.node("b");
    let via = b.host.ns.via();
    let target = format!(
        "/v2/{}/blobs/{}?ns={}",
        gone.repo,
        gone_layer.digest,
        cluster.upstream.host()
    );
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let r = via.get(b.registry_addr(), &target, &[])?;
        latencies.push(started.elapsed());
        ensure!(r.status == 404, "deleted blob answered {}", r.status);
    }
    latencies.sort();
    let p50 = latencies[100];
    let p99 = latencies[197];
    ensure!(
        p99 < Duration::from_millis(50),
        "miss p99 {p99:?} (p50 {p50:?})"
    );
    let stale_hits = log_lines(cluster.node("a"), &gone_layer.digest).len();
    ensure!(
        stale_hits > 0,
        "the stale provider was never asked: the test did not test staleness"
    );
    let wait = (PROVIDER_TTL + Duration::from_secs(3)).saturating_sub(deleted_at.elapsed());
    std::thread::sleep(wait);
    for _ in 0..20 {
        ensure!(via.get(b.registry_addr(), &target, &[])?.status == 404);
    }
    let after_ttl = log_lines(cluster.node("a"), &gone_layer.digest).len();
    ensure!(
        after_ttl == stale_hits,
        "A is still asked after the TTL ({stale_hits} -> {after_ttl})"
    );
    println!("step 9: misses p50 {p50:?} p99 {p99:?}; record gone after the TTL");
    Ok(())
}

/// An image no node has falls through to upstream with little delay.
fn step_10_unknown_images_fall_through_fast(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { fresh, fresh2, .. } = im;
    let up = |image: &TestImage| im.up(image);
    let c = cluster.node("c");
    let started = Instant::now();
    // Straight to the registry: no hosts directory, so no peermirror.
    c.containerd
        .ctr(&["images", "pull", "--plain-http", &up(fresh2)])?;
    let direct_time = started.elapsed();
    let started = Instant::now();
    cluster.node("b").ctr_pull(&up(fresh))?;
    let via_peermirror = started.elapsed();
    ensure!(
        via_peermirror < direct_time + Duration::from_secs(1),
        "through peermirror {via_peermirror:?}, direct {direct_time:?}"
    );
    println!("step 10: upstream fallback {via_peermirror:?} vs direct {direct_time:?}");
    Ok(())
}

/// containerd 2.x request patterns: `bytes=0-` on a whole blob (and
///     verified), and parallel `bytes=N-` chunk requests abandoned after a
///     chunk; the fetches behind abandoned requests stop.
fn step_11_containerd_2_request_patterns(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { patterns, .. } = im;
    let p_layer = layer_of(patterns).clone();
    let expected = cluster.layout.read_blob(&p_layer.digest)?;
    let b = cluster.node("b");
    let a = cluster.node("a");
    let via = b.host.ns.via();
    let target = format!(
        "/v2/{}/blobs/{}?ns={}",
        patterns.repo,
        p_layer.digest,
        cluster.upstream.host()
    );
    let r = via.get(b.registry_addr(), &target, &[("Range", "bytes=0-")])?;
    ensure!(
        r.status == 206 && r.body == expected,
        "bytes=0- answered {} with {} bytes",
        r.status,
        r.body.len()
    );
    let baseline = a.pm().metric("peermirror_registry_connections", &[])?;
    let mut handles = Vec::new();
    for n in 0..4u64 {
        let offset = n * 8 * MIB;
        let (via, addr, target) = (via.clone(), b.registry_addr(), target.clone());
        let want = expected[offset as usize..(offset + MIB) as usize].to_vec();
        handles.push(std::thread::spawn(move || -> Result<()> {
            let mut conn = via.connect(addr, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            conn.write_all(
                format!("GET {target} HTTP/1.1\r\nHost: b\r\nRange: bytes={offset}-\r\n\r\n")
                    .as_bytes(),
            )?;
            let mut buffer = Vec::new();
            let head = read_response(&mut conn, true, &mut buffer)?;
            ensure!(
                head.status == 206,
                "bytes={offset}- answered {}",
                head.status
            );
            while buffer.len() < MIB as usize {
                let mut chunk = vec![0u8; 256 << 10];
                let n = conn.read(&mut chunk)?;
                if n == 0 {
                    bail!("closed early");
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            ensure!(
                buffer[..MIB as usize] == want[..],
                "wrong bytes at {offset}"
            );
            // Abandon the rest, as containerd does after one chunk.
            drop(conn);
            Ok(())
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("chunk thread panicked"))??;
    }
    a.pm().wait_metric(
        "the abandoned fetches from A to stop",
        "peermirror_registry_connections",
        &[],
        Duration::from_secs(5),
        |connections| connections <= baseline,
    )?;
    println!("step 11: bytes=0- verified; abandoned chunk fetches stopped");
    Ok(())
}

/// Upload limits: A sends one blob body at a time; a client that
///     holds the slot makes A answer 503, and containerd, asking A
///     directly as its mirror, moves on to upstream.
///    The restarted A lost its connections (and with them the
///    admissions of its peers to its registry port); bootstrapping it
///    from C makes C admitted again before A counts as ready, instead of
///    whenever C's next re-announcement happens to dial A.
fn step_12_upload_limits_send_containerd_on(cluster: &mut Cluster, im: &Images) -> Result<()> {
    let Images { big2, patterns, .. } = im;
    let up = |image: &TestImage| im.up(image);
    let c_router = format!("/ip4/{}/tcp/{ROUTER_PORT}", cluster.node("c").ip());
    cluster.node_mut("a").restart_peermirror(&[
        "--max-uploads",
        "1",
        "--write-timeout",
        "20s",
        "--bootstrap-kind",
        "static",
        "--static-bootstrap-peers",
        &c_router,
    ])?;
    cluster.wait_ready(&["a"], Duration::from_secs(60))?;
    let (a, c) = (cluster.node("a"), cluster.node("c"));
    let big2_layer = layer_of(big2).clone();
    let held = format!("/v2/{}/blobs/{}", big2.repo, big2_layer.digest);
    let via = c.host.ns.via();
    let mut hog = via.connect(a.registry_addr(), Duration::from_secs(5))?;
    hog.write_all(format!("GET {held} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())?;
    a.pm().wait_metric(
        "A to be sending to the slow client",
        "peermirror_registry_connections",
        &[],
        Duration::from_secs(10),
        |connections| connections >= 1.0,
    )?;
    let busy = via.get(a.registry_addr(), &held, &[])?;
    ensure!(
        busy.status == 503,
        "a second upload answered {}",
        busy.status
    );
    ensure!(busy.error_code().as_deref() == Some("TOOMANYREQUESTS"));
    ensure!(busy.header("retry-after").is_some());
    let direct = c.dir.join("via-a.d");
    let host_dir = direct.join(cluster.upstream.host());
    std::fs::create_dir_all(&host_dir)?;
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            cluster.upstream.host(),
            a.registry_addr()
        ),
    )?;
    let rejected_before = a.pm().metric("peermirror_upload_rejections_total", &[])?;
    c.containerd
        .pull_via(&direct, &up(patterns))
        .context("C's pull while A is at its upload limit")?;
    c.assert_has(&cluster.layout, patterns)?;
    let rejected = a.pm().metric("peermirror_upload_rejections_total", &[])? - rejected_before;
    ensure!(rejected >= 1.0, "containerd's request never met the limit");
    drop(hog);
    println!(
        "step 12: A at its upload limit answered 503 ({rejected} times to containerd); the pull went on to upstream"
    );
    Ok(())
}

/// A mirror target that drops SYNs instead of refusing (A's dataplane, for
///     D, which lacks the key) costs containerd 2.1 the `dial_timeout` that
///     `configure-containerd` writes, not its 30 s default, per request.
///     containerd 1.x ignores the key (and would wait 30 s per request), so
///     there the step only checks that the key is written.
fn step_13_a_target_that_drops_syns_costs_the_dial_timeout(
    cluster: &mut Cluster,
    im: &Images,
) -> Result<()> {
    let Images { dial, .. } = im;
    let (a, d) = (cluster.node("a"), cluster.node("d"));
    let certs = d.dir.join("certs-via-a");
    let upstream_dir = certs.join(cluster.upstream.host());
    std::fs::create_dir_all(&upstream_dir)?;
    std::fs::write(
        upstream_dir.join("hosts.toml"),
        format!("server = \"http://{}\"\n", cluster.upstream.host()),
    )?;
    peermirror_tests::process::run(
        std::process::Command::new(peermirror_tests::services::peermirror_bin())
            .arg("configure-containerd")
            .arg("--containerd-registry-config-path")
            .arg(&certs)
            .args(["--mirrored-registries", &cluster.upstream.host()])
            .args(["--mirror-targets", &format!("http://{}:5000", a.ip())])
            .args(["--mirror-dial-timeout", "1s"])
            .arg("--prepend-existing")
            .arg("--containerd-config")
            .arg(d.containerd.dir.join("config.toml")),
    )?;
    let hosts = std::fs::read_to_string(upstream_dir.join("hosts.toml"))?;
    ensure!(hosts.contains("dial_timeout = \"1s\""), "{hosts}");
    let release = peermirror_tests::release::release();
    if !release.at_least(2, 1, 0) {
        println!(
            "step 13: containerd {} ignores dial_timeout; not timed",
            release.version_text
        );
        return Ok(());
    }
    let started = Instant::now();
    d.containerd.pull_via(&certs, &im.up(dial))?;
    let took = started.elapsed();
    // Resolve, manifest, config and two layers: five dials of 1 s at most,
    // where one dial alone would wait 30 s without the key.
    ensure!(
        took < Duration::from_secs(15),
        "D's pull past a SYN-dropping target took {took:?}"
    );
    d.assert_has(&cluster.layout, dial)?;
    println!("step 13: pull past a SYN-dropping mirror target in {took:?}");
    Ok(())
}
