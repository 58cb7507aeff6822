//! What an operator sees of a real three-node cluster after an air-gapped
//! pull: the debug web page in headless Chromium (peers with their kernel
//! byte counts, the recent mirror hits, the measure form), a real Prometheus
//! scraping every node (every family with its HELP, every dashboard query
//! answering, Spegel's queries giving our numbers), promtool on the metrics
//! text, and the per-blob log lines.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use peermirror_tests::browser::{self, Browser};
use peermirror_tests::cluster::{Cluster, ClusterNode, METRICS_PORT, NodeSpec};
use peermirror_tests::image::layer;
use peermirror_tests::process::wait_for;
use peermirror_tests::prometheus::{self, Prometheus};
use serde_json::{Value, json};

const KEY: [u8; 32] = [0x33; 32];
const MIB: usize = 1 << 20;

fn spec(name: &str, extra: &[&str]) -> NodeSpec {
    // The upstream is gone for the pulls: a first lookup on a cold routing
    // table may take longer than the 20 ms default before containerd would
    // go to an upstream that is not there; and the tag is held by one node
    // (the air-gapped setting answers it).
    let wait = [
        "--mirror-resolve-timeout",
        "2s",
        "--tag-resolution",
        "single-holder",
    ];
    NodeSpec {
        name: name.to_string(),
        psk: KEY,
        extra: wait.iter().chain(extra).map(|s| s.to_string()).collect(),
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn node_api(node: &ClusterNode, what: &str) -> Result<Value> {
    let pm = node.pm();
    let r = pm.via.get(pm.metrics, &format!("/debug/api/{what}"), &[])?;
    ensure!(r.status == 200, "/debug/api/{what} answered {}", r.status);
    Ok(serde_json::from_slice(&r.body)?)
}

/// The layers of an image's default platform.
fn layers(image: &peermirror_tests::image::TestImage) -> Vec<peermirror_tests::image::Descriptor> {
    image
        .default_platform_blobs
        .iter()
        .filter(|b| b.media_type.contains("layer"))
        .cloned()
        .collect()
}

fn log_of(node: &ClusterNode) -> String {
    std::fs::read_to_string(&node.pm().proc.log).unwrap_or_default()
}

#[test]
fn an_operator_sees_the_swarm() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    ensure!(
        browser::available() && Path::new(prometheus::BIN).exists(),
        "this test needs Debian's chromium, chromium-driver and prometheus (cargo xtask test installs them)"
    );
    let mut cluster = Cluster::start(&[
        // Two uploads at once: a pull's layers fit, two clients that do not
        // read fill it.
        spec("a", &["--max-uploads", "2", "--write-timeout", "20s"]),
        spec("b", &[]),
        spec("c", &[]),
    ])?;
    cluster.wait_ready(&["a", "b", "c"], Duration::from_secs(60))?;
    let monitor = cluster.network.add_host(60)?;
    let stranger = cluster.network.add_host(50)?;
    let targets: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.pm().metrics).collect();
    let prom = Prometheus::start(
        &monitor.ns,
        SocketAddr::from((monitor.ip, 9099)),
        &cluster.dir.path().join("prometheus"),
        &targets,
    )?;

    // The image is preloaded on A (from the upstream, which then goes away).
    let image = cluster.layout.add_image(
        "ops/observed",
        "v1",
        &[layer(24 * MIB, false), layer(MIB, true)],
    )?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    let reference = cluster.upstream.reference(&image);
    cluster.node("a").cri_pull(&reference)?;
    cluster.upstream.stop()?;
    // The tag, the manifest, the config and two layers.
    const KEYS: usize = 5;
    cluster
        .node("a")
        .wait_announced(KEYS, Duration::from_secs(30))?;
    cluster
        .node("b")
        .cri_pull(&reference)
        .context("B's CRI pull")?;
    cluster.node("b").assert_has(&cluster.layout, &image)?;
    // C asks for the config and both layers at once; A takes two uploads
    // at a time, so C needs B as a holder too.
    cluster
        .node("b")
        .wait_announced(KEYS, Duration::from_secs(30))?;
    cluster
        .node("c")
        .ctr_pull(&reference)
        .context("C's ctr pull")?;
    cluster.node("c").assert_has(&cluster.layout, &image)?;
    let ids: BTreeMap<String, String> = cluster
        .nodes
        .iter()
        .map(|n| Ok((n.name.clone(), n.pm().peer_id()?)))
        .collect::<Result<_>>()?;

    // A miss that falls through: a blob nobody holds, asked on B.
    let b = cluster.node("b");
    let unknown = format!(
        "/v2/ops/none/blobs/sha256:{}?ns={}",
        "0".repeat(64),
        cluster.upstream.host()
    );
    let miss = b.host.ns.via().get(b.registry_addr(), &unknown, &[])?;
    ensure!(
        miss.status == 404,
        "an unknown blob answered {}",
        miss.status
    );

    // A stranger (no key, not admitted): its packets to the registry port
    // are dropped in the kernel, its debug requests refused.
    let a = cluster.node("a");
    let via = stranger.ns.via();
    ensure!(
        via.connect(a.registry_addr(), Duration::from_secs(1))
            .is_err(),
        "a stranger reached A's registry port"
    );
    if let Ok(mut p2p) = via.connect(
        SocketAddr::from((a.ip(), peermirror_tests::cluster::ROUTER_PORT)),
        Duration::from_secs(2),
    ) {
        let _ = p2p.write_all(&[0x42; 64]);
    }
    for path in [
        "/debug/web",
        "/debug/api/peers",
        "/debug/api/measure?image=x:1",
    ] {
        let r = via.get(SocketAddr::from((b.ip(), METRICS_PORT)), path, &[])?;
        ensure!(r.status == 403, "{path} answered a stranger {}", r.status);
    }

    // A at its upload limit: two clients that do not read hold both
    // uploads; the next blob request gets 503.
    let c = cluster.node("c");
    let big = image.biggest_layer().clone();
    let held = format!("/v2/{}/blobs/{}", image.repo, big.digest);
    let c_via = c.host.ns.via();
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut hog = c_via.connect(a.registry_addr(), Duration::from_secs(5))?;
        hog.write_all(format!("GET {held} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())?;
        hogs.push(hog);
    }
    a.pm().wait_metric(
        "A to be sending to the slow clients",
        "peermirror_registry_connections",
        &[],
        Duration::from_secs(10),
        |n| n >= 2.0,
    )?;
    let busy = c_via.get(a.registry_addr(), &held, &[])?;
    ensure!(
        busy.status == 503,
        "a second upload answered {}",
        busy.status
    );
    drop(hogs);

    // One log line per blob: relayed on the pullers, served on the holder.
    let b_log = log_of(cluster.node("b"));
    ensure!(
        b_log.lines().any(|l| l.contains("relayed from a peer")
            && l.contains(&big.digest)
            && l.contains("verified=Some(true)")),
        "B logged no verified relay of {}",
        big.digest
    );
    ensure!(
        b_log.contains("miss: no peer holds it"),
        "B logged no miss line"
    );
    ensure!(
        log_of(cluster.node("a")).contains("blob served to a peer"),
        "A logged no blob served to a peer"
    );

    check_web_page(&cluster, &ids, &image, &reference)?;
    check_prometheus(&cluster, &prom)?;
    check_promtool(cluster.node("a"))?;
    Ok(())
}

/// The page on B, in Chromium inside B's namespace (loopback: allowed).
fn check_web_page(
    cluster: &Cluster,
    ids: &BTreeMap<String, String>,
    image: &peermirror_tests::image::TestImage,
    reference: &str,
) -> Result<()> {
    let b = cluster.node("b");
    let browser = Browser::start(&b.host.ns, 9515, &cluster.dir.path().join("browser"))?;
    browser.goto(&format!("http://127.0.0.1:{METRICS_PORT}/debug/web"))?;
    let others: BTreeSet<&str> = [ids["a"].as_str(), ids["c"].as_str()].into();

    // The other two peers, with bytes counted by the kernel both ways.
    let peers = wait_for(
        "the page to list A and C with bytes",
        Duration::from_secs(20),
        || {
            let rows = browser
                .execute(
                    "return [...document.querySelectorAll('#peers tbody tr')].map(r => ({
                    id: r.dataset.peerId, bytesIn: Number(r.dataset.bytesIn || 0),
                    bytesOut: Number(r.dataset.bytesOut || 0), admitted: r.dataset.admitted }));",
                    json!([]),
                )
                .ok()?;
            let rows = rows.as_array()?.clone();
            let listed: BTreeSet<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
            let counted = rows
                .iter()
                .all(|r| r["bytesIn"].as_f64() > Some(0.0) && r["bytesOut"].as_f64() > Some(0.0));
            (listed == others && counted).then_some(rows)
        },
    )?;
    ensure!(
        peers.iter().all(|r| r["admitted"] == "true"),
        "a peer is not admitted: {peers:?}"
    );
    let api = node_api(b, "peers")?;
    ensure!(api["counted_by_kernel"] == true, "{api}");

    // The recent requests show B's hits for the image's layers.
    let recent = browser.execute(
        "return [...document.querySelectorAll('#recent tbody tr')].map(r => ({
            key: r.dataset.key, outcome: r.dataset.outcome, peer: r.dataset.peerId }));",
        json!([]),
    )?;
    let recent = recent.as_array().cloned().unwrap_or_default();
    for l in &layers(image) {
        ensure!(
            recent.iter().any(|r| r["key"] == l.digest.as_str()
                && r["outcome"] == "hit"
                && r["peer"].as_str().is_some_and(|p| others.contains(p))),
            "no hit for layer {} among the recent requests: {recent:?}",
            l.digest
        );
    }
    ensure!(
        recent.iter().any(|r| r["outcome"] == "miss"),
        "the miss is not among the recent requests"
    );

    // The measure form pulls the image from the peers and names the peer of
    // every blob.
    browser.type_into("#measure-image", reference)?;
    browser.click("#measure-run")?;
    let state = wait_for("the measure to finish", Duration::from_secs(60), || {
        let s = browser
            .execute(
                "return document.getElementById('measure-state').textContent;",
                json!([]),
            )
            .ok()?;
        let s = s.as_str()?.to_string();
        (s == "done" || s.starts_with("failed")).then_some(s)
    })?;
    ensure!(state == "done", "the measure ended with {state:?}");
    let measured = browser.execute(
        "return [...document.querySelectorAll('#measure-result tbody tr')].map(r => ({
            kind: r.dataset.kind, digest: r.dataset.digest, peer: r.dataset.peerId, error: r.dataset.error }));",
        json!([]),
    )?;
    let measured = measured.as_array().cloned().unwrap_or_default();
    for l in &layers(image) {
        let row = measured
            .iter()
            .find(|r| r["digest"] == l.digest.as_str())
            .with_context(|| format!("layer {} not measured: {measured:?}", l.digest))?;
        ensure!(row["kind"] == "layer" && row["error"] == "", "{row}");
        ensure!(
            row["peer"].as_str().is_some_and(|p| others.contains(p)),
            "layer {} came from no other peer: {row}",
            l.digest
        );
    }
    let shot = repo_root().join("target/observe/debug-web.png");
    browser.screenshot(&shot)?;
    println!("the debug page after the measure: {}", shot.display());
    Ok(())
}

/// Prometheus scraped every node: all up, every family described, every
/// dashboard query answering, Spegel's names giving our numbers.
fn check_prometheus(cluster: &Cluster, prom: &Prometheus) -> Result<()> {
    // A few more scrapes after the scenario.
    std::thread::sleep(Duration::from_secs(3));
    let targets = prom.api("targets")?;
    let active = targets["activeTargets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(active.len() == cluster.nodes.len(), "targets: {targets}");
    for t in &active {
        ensure!(
            t["health"] == "up" && t["lastError"] == "",
            "a scrape failed: {t}"
        );
    }
    ensure!(prom.value("sum(up{job=\"peermirror\"})")? == cluster.nodes.len() as f64);

    // Every family a node exports is known to Prometheus with its HELP.
    let a = cluster.node("a");
    let pm = a.pm();
    let om = pm.via.get(
        pm.metrics,
        "/metrics",
        &[("accept", "application/openmetrics-text;version=1.0.0")],
    )?;
    let om = String::from_utf8_lossy(&om.body).into_owned();
    let families: Vec<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    ensure!(families.len() > 30, "only {} families", families.len());
    let metadata = prom.api("metadata")?;
    let mut undescribed = Vec::new();
    for family in &families {
        let entry = metadata
            .get(*family)
            .or_else(|| metadata.get(format!("{family}_total")));
        let help = entry.and_then(|e| e[0]["help"].as_str()).unwrap_or("");
        if help.is_empty() {
            undescribed.push(*family);
        }
    }
    ensure!(
        undescribed.is_empty(),
        "families without HELP in Prometheus: {undescribed:?}"
    );

    // Every query of the dashboard returns data.
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("deploy/grafana/peermirror.json"),
    )?)?;
    let mut empty = Vec::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().context("no panels")? {
        for target in panel["targets"]
            .as_array()
            .context("a panel without targets")?
        {
            let expr = target["expr"].as_str().context("a target without expr")?;
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            queries += 1;
            if prom.query(&expr)?.is_empty() {
                empty.push(format!("{}: {expr}", panel["title"]));
            }
        }
    }
    ensure!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );

    // GEP-0043's hit/miss per registry, in Spegel's names, equals ours.
    let series = |expr: &str, label: &str| -> Result<BTreeMap<(String, String), f64>> {
        prom.query(expr)?
            .iter()
            .map(|s| {
                let registry = s["metric"]["registry"].as_str().unwrap_or("").to_string();
                let result = s["metric"][label].as_str().unwrap_or("").to_string();
                let v: f64 = s["value"][1].as_str().context("no value")?.parse()?;
                Ok(((registry, result), v))
            })
            .collect()
    };
    let spegel = series(
        "sum by (registry, cache) (spegel_mirror_requests_total)",
        "cache",
    )?;
    let ours = series(
        "sum by (registry, result) (peermirror_mirror_requests_total)",
        "result",
    )?;
    ensure!(
        spegel == ours,
        "Spegel's names say {spegel:?}, ours {ours:?}"
    );
    ensure!(
        ours.keys().any(|(_, r)| r == "hit") && ours.keys().any(|(_, r)| r == "miss"),
        "{ours:?}"
    );
    let ratio = prom.value(
        "sum(spegel_mirror_requests_total{cache=\"hit\"}) / sum(spegel_mirror_requests_total)",
    )?;
    ensure!(ratio > 0.0 && ratio < 1.0, "hit ratio {ratio}");
    println!(
        "prometheus: {} targets up, {} families with HELP, {queries} dashboard queries answered, mirror requests {ours:?}",
        active.len(),
        families.len()
    );
    Ok(())
}

/// `promtool check metrics` accepts what curl gets from `/metrics`.
fn check_promtool(node: &ClusterNode) -> Result<()> {
    let pm = node.pm();
    let text = pm.via.get(pm.metrics, "/metrics", &[])?;
    ensure!(text.status == 200);
    let mut child = std::process::Command::new(prometheus::PROMTOOL)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(&text.body)?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!("promtool check metrics objects:\n{said}");
    }
    Ok(())
}
