//! `cargo xtask bench`: peermirror side by side with nginx and the CNCF
//! registry, in one run, on this machine. Prints a table with ratios and
//! writes it to `target/bench-results.md`.
//!
//! Every server serves the same 1 GiB blob (the containerd content-store
//! file; for the registry, the same blob pushed with skopeo) from a warm
//! page cache to clients that splice the body to /dev/null (TLS clients must
//! decrypt). Server CPU is read from /proc/<pid>/stat, summed over the
//! server's processes and threads (nginx's workers and io_uring's kernel
//! workers included). Each figure is the median of three runs, with the
//! range.

mod clients;
mod dht;
mod fanout;
mod measure;
mod tags;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use measure::{Run, Transport, download, measure, peak_rss, summary};
use peermirror_tests::cluster::{Cluster, NodeSpec};
use peermirror_tests::http::Via;
use peermirror_tests::image::{Layout, TestImage, layer};
use peermirror_tests::pki::{self, Ca};
use peermirror_tests::process::{Proc, run, wait_for};
use peermirror_tests::services::{Containerd, ContainerdOptions, Peermirror, Upstream, free_port};

const GIB: usize = 1 << 30;
const RUNS: usize = 3;
const CLIENTS: [usize; 2] = [1, 8];

/// One line of the results table.
struct Row {
    scenario: String,
    clients: usize,
    runs: Vec<Run>,
    peak_rss: Option<u64>,
}

impl Row {
    fn gibs(&self) -> (f64, f64, f64) {
        summary(&mut self.runs.iter().map(Run::gib_per_s).collect::<Vec<_>>())
    }

    fn cpu(&self) -> (f64, f64, f64) {
        summary(&mut self.runs.iter().map(Run::cpu_per_gib).collect::<Vec<_>>())
    }
}

fn runs(
    pid: u32,
    clients: usize,
    download_one: Arc<dyn Fn() -> Result<u64> + Send + Sync>,
) -> Result<Vec<Run>> {
    (0..RUNS)
        .map(|_| measure(pid, clients, download_one.clone()))
        .collect()
}

/// Measures a server for 1 and 8 clients (after one warm-up download).
fn bench_server(
    rows: &mut Vec<Row>,
    name: &str,
    pid: u32,
    download_one: Arc<dyn Fn() -> Result<u64> + Send + Sync>,
    rss_pid: Option<u32>,
) -> Result<()> {
    println!("  {name}");
    let warm = download_one()?;
    ensure!(
        warm == GIB as u64 || warm > (GIB as u64) - 4096,
        "{name}: warm-up got {warm} bytes"
    );
    for clients in CLIENTS {
        let measured = runs(pid, clients, download_one.clone())?;
        let row = Row {
            scenario: name.to_string(),
            clients,
            runs: measured,
            peak_rss: rss_pid.map(peak_rss),
        };
        let (g, _, _) = row.gibs();
        let (c, _, _) = row.cpu();
        println!("    {clients} client(s): {g:.2} GiB/s, {c:.3} CPU-s/GiB");
        rows.push(row);
    }
    Ok(())
}

fn nginx(dir: &Path, blobs_dir: &Path, port: u16) -> Result<clients::Nginx> {
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = format!(
        "user root;\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           server {{\n    listen 127.0.0.1:{port};\n    location /blobs/ {{ alias {b}/; }}\n  }}\n}}\n",
        d = dir.display(),
        b = blobs_dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(dir);
    let nginx = clients::Nginx(Proc::spawn("nginx", cmd, &dir.join("nginx.out"))?);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for("nginx", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).ok()
    })?;
    Ok(nginx)
}

/// What of the serving part runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ServingPart {
    /// Everything: every path, nginx, the registry, memory, real clients.
    All,
    /// Only the rounds with real clients (`clients`).
    Clients,
    /// Only the peak memory with 8 and 64 clients (`memory`).
    Memory,
}

/// The 1 GiB blob served by every server: with the splice client for
/// every serving path, peermirror's peak memory, then with real clients.
fn serving(
    rows: &mut Vec<Row>,
    cells: &mut Vec<clients::Cell>,
    root: &Path,
    part: ServingPart,
) -> Result<()> {
    println!(
        "serving a 1 GiB blob (setting up: generating, pushing with skopeo, fetching into containerd)"
    );
    let mut layout = Layout::create(&root.join("layout"))?;
    let image = layout.add_image("bench/blob", "1g", &[layer(GIB, false)])?;
    layout.finish()?;
    let upstream = Upstream::start(&root.join("registry"))?;
    upstream.push(&layout, &image)?;
    drop(layout);
    let containerd = Containerd::start(
        &root.join("containerd"),
        "k8s.io",
        ContainerdOptions::default(),
    )?;
    containerd.ctr(&[
        "content",
        "fetch",
        "--plain-http",
        &upstream.reference(&image),
    ])?;
    let blob = image.biggest_layer().clone();
    let v2_path = format!("/v2/{}/blobs/{}", image.repo, blob.digest);
    match part {
        ServingPart::Clients => {
            cells.extend(clients::bench(root, &containerd, &upstream, &image)?);
            return Ok(());
        }
        ServingPart::Memory => return peak_memory(rows, root, &containerd, &v2_path),
        ServingPart::All => {}
    }

    // peermirror, each serving path.
    for path in ["io-uring", "sendfile", "buffered"] {
        let pm = Peermirror::start(
            &root.join(format!("pm-{path}")),
            &containerd,
            &["--serving-path", path, "--log-level", "warn"],
        )?;
        let (addr, p) = (pm.registry, v2_path.clone());
        let d: Arc<dyn Fn() -> Result<u64> + Send + Sync> =
            Arc::new(move || download(&Via::root(), addr, &p, &Transport::Plain));
        bench_server(
            rows,
            &format!("peermirror {path}"),
            pm.proc.pid(),
            d,
            Some(pm.proc.pid()),
        )?;
    }

    peak_memory(rows, root, &containerd, &v2_path)?;

    // peermirror over mTLS.
    let certs = root.join("certs");
    std::fs::create_dir_all(&certs)?;
    let ca = Ca::new("bench CA")?;
    ca.write(&certs.join("ca.crt"))?;
    let localhost: IpAddr = [127, 0, 0, 1].into();
    let node = ca.issue(&certs, "node", &[localhost])?;
    let pm = Peermirror::start(
        &root.join("pm-tls"),
        &containerd,
        &[
            "--tls-cert",
            &node.cert.to_string_lossy(),
            "--tls-key",
            &node.key.to_string_lossy(),
            "--tls-client-ca",
            &certs.join("ca.crt").to_string_lossy(),
            "--log-level",
            "warn",
        ],
    )?;
    let tls = Transport::Tls(pki::client_config(&ca.pem, Some(&node))?);
    let (addr, p) = (pm.registry, v2_path.clone());
    let d: Arc<dyn Fn() -> Result<u64> + Send + Sync> =
        Arc::new(move || download(&Via::root(), addr, &p, &tls));
    bench_server(
        rows,
        "peermirror mTLS",
        pm.proc.pid(),
        d,
        Some(pm.proc.pid()),
    )?;
    drop(pm);

    // nginx on the same content-store file.
    let port = free_port();
    let ngx = nginx(
        &root.join("nginx"),
        &containerd.content_root().join("blobs/sha256"),
        port,
    )?;
    let (addr, p) = (
        SocketAddr::from(([127, 0, 0, 1], port)),
        format!("/blobs/{}", blob.hex()),
    );
    let d: Arc<dyn Fn() -> Result<u64> + Send + Sync> =
        Arc::new(move || download(&Via::root(), addr, &p, &Transport::Plain));
    bench_server(rows, "nginx (sendfile on, 2 workers)", ngx.pid(), d, None)?;
    drop(ngx);

    // The CNCF registry, serving the pushed copy.
    let (addr, p) = (upstream.addr, v2_path);
    let d: Arc<dyn Fn() -> Result<u64> + Send + Sync> =
        Arc::new(move || download(&Via::root(), addr, &p, &Transport::Plain));
    bench_server(
        rows,
        "CNCF registry (docker-registry)",
        upstream.pid().context("registry pid")?,
        d,
        None,
    )?;
    cells.extend(clients::bench(root, &containerd, &upstream, &image)?);
    Ok(())
}

/// Times a command; runs `reset` before each run.
fn timed(
    runs: usize,
    mut reset: impl FnMut() -> Result<()>,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        reset()?;
        let started = Instant::now();
        f()?;
        out.push(started.elapsed().as_secs_f64());
    }
    Ok(out)
}

struct PullRow {
    what: String,
    via_peer: Vec<f64>,
    direct: Vec<f64>,
}

fn cluster_benches(rows: &mut Vec<Row>, pulls: &mut Vec<PullRow>) -> Result<()> {
    println!("mirror path and pulls: two nodes in network namespaces");
    let spec = |name: &str| NodeSpec {
        name: name.to_string(),
        psk: [0x33; 32],
        extra: vec!["--log-level".into(), "warn".into()],
    };
    let mut cluster = Cluster::start(&[spec("a"), spec("b")])?;
    cluster.wait_ready(&["a", "b"], Duration::from_secs(60))?;
    let blob_image = cluster
        .layout
        .add_image("bench/blob", "1g", &[layer(GIB, false)])?;
    let pull_image = cluster.layout.add_image(
        "bench/pull",
        "4x256m",
        &(0..4).map(|_| layer(GIB / 4, false)).collect::<Vec<_>>(),
    )?;
    cluster.layout.finish()?;
    for image in [&blob_image, &pull_image] {
        cluster.upstream.push(&cluster.layout, image)?;
    }
    let reference = |image: &TestImage| cluster.upstream.reference(image);
    let a = cluster.node("a");
    a.containerd
        .ctr(&["content", "fetch", "--plain-http", &reference(&blob_image)])?;
    a.ctr_pull(&reference(&pull_image))?;
    let advertised = pull_image.blobs.len() + blob_image.blobs.len();
    wait_for("A to advertise", Duration::from_secs(60), || {
        (a.pm().metric("peermirror_advertised_keys", &[]).ok()? >= advertised as f64).then_some(())
    })?;

    // Mirror path: a client on B asks B, which streams from A (verifying).
    let b = cluster.node("b");
    let blob = blob_image.biggest_layer().clone();
    let path = format!(
        "/v2/{}/blobs/{}?ns={}",
        blob_image.repo,
        blob.digest,
        cluster.upstream.host()
    );
    let (via, addr, p) = (b.host.ns.via(), b.registry_addr(), path.clone());
    let splice: Arc<dyn Fn() -> Result<u64> + Send + Sync> =
        Arc::new(move || download(&via, addr, &p, &Transport::Plain));
    // The relay with curl as the client too (it reads the body into
    // userspace, as real clients do), and what serving the same blob costs
    // A when curl asks A itself: the relay's floor is that plus SHA-256.
    let a = cluster.node("a");
    let local_path = format!("/v2/{}/blobs/{}", blob_image.repo, blob.digest);
    let curl = |node: &peermirror_tests::cluster::ClusterNode, url: String| {
        let ns = node.host.ns.clone();
        let d: Arc<dyn Fn() -> Result<u64> + Send + Sync> =
            Arc::new(move || fanout::curl_in(&ns, &url));
        d
    };
    let measured = [
        (b, "mirror path: B relays from A (digest verified)", splice),
        (
            a,
            "serving, curl on A asks A (the relay's other floor)",
            curl(a, format!("http://{}{local_path}", a.registry_addr())),
        ),
        (
            b,
            "mirror path, curl on B: B relays from A (digest verified)",
            curl(b, format!("http://{}{path}", b.registry_addr())),
        ),
    ];
    for (node, scenario, d) in measured {
        println!("  {scenario}");
        let pid = node.pm().proc.pid();
        // Once before: connections, threads and the page cache warm.
        d()?;
        let row = Row {
            scenario: scenario.into(),
            clients: 1,
            runs: measure::profiled(scenario, pid, || runs(pid, 1, d))?,
            peak_rss: Some(peak_rss(pid)),
        };
        println!(
            "    {:.2} GiB/s, {:.3} CPU-s/GiB",
            row.gibs().0,
            row.cpu().0
        );
        rows.push(row);
    }
    // The floor of the relay's CPU: SHA-256 alone, with the same crate.
    rows.push(hash_floor());

    // ctr content fetch and ctr image pull: through peermirror from A, or
    // straight from the registry.
    let r = reference(&pull_image);
    let certs = b.certs_d.to_string_lossy().into_owned();
    let digests: Vec<String> = pull_image.blobs.iter().map(|d| d.digest.clone()).collect();
    // Removed content keeps its file until the garbage collector runs, and
    // a fetch finds the file and skips the download: collect synchronously
    // (deleting a lease with --sync runs the collector).
    let collect_garbage = || -> Result<()> {
        let lease = b.containerd.ctr(&["leases", "create"])?;
        let id = lease
            .split_whitespace()
            .next()
            .context("lease id")?
            .to_string();
        b.containerd.ctr(&["leases", "delete", "--sync", &id])?;
        Ok(())
    };
    let forget_content = || -> Result<()> {
        let mut args = vec!["content", "rm"];
        args.extend(digests.iter().map(String::as_str));
        let _ = b.containerd.ctr(&args);
        collect_garbage()?;
        let left = b.containerd.content_digests()?;
        ensure!(
            !digests.iter().any(|d| left.contains(d)),
            "content still on B after removal"
        );
        let blob_dir = b.containerd.content_root().join("blobs/sha256");
        ensure!(
            pull_image
                .blobs
                .iter()
                .all(|d| !blob_dir.join(d.hex()).exists()),
            "content files still on B after garbage collection"
        );
        Ok(())
    };
    let forget_image = || -> Result<()> {
        let _ = b.containerd.ctr(&["images", "rm", "--sync", &r]);
        forget_content()
    };
    println!("  ctr content fetch");
    let mut via_peer = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..RUNS {
        via_peer.extend(timed(1, forget_content, || {
            b.containerd
                .ctr(&["content", "fetch", "--hosts-dir", &certs, &r])
                .map(drop)
        })?);
        direct.extend(timed(1, forget_content, || {
            b.containerd
                .ctr(&["content", "fetch", "--plain-http", &r])
                .map(drop)
        })?);
    }
    pulls.push(PullRow {
        what: "ctr content fetch, 1 GiB in 4 layers".into(),
        via_peer,
        direct,
    });
    println!("  ctr image pull");
    let mut via_peer = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..RUNS {
        via_peer.extend(timed(1, forget_image, || b.ctr_pull(&r))?);
        direct.extend(timed(1, forget_image, || {
            b.containerd
                .ctr(&["images", "pull", "--plain-http", &r])
                .map(drop)
        })?);
    }
    pulls.push(PullRow {
        what: "ctr image pull, 1 GiB in 4 layers".into(),
        via_peer,
        direct,
    });
    let served = a
        .pm()
        .metric("peermirror_served_bytes_total", &["source=\"file\""])?;
    ensure!(
        served > (4 * GIB) as f64,
        "A served only {served} bytes: the pulls did not go through the peer"
    );
    Ok(())
}

/// SHA-256 of 1 GiB in memory (the `sha2` crate the daemon uses, SHA-NI
/// when the CPU has it), three times: the CPU floor of a verified relay.
/// Peak RSS of the default daemon (sendfile, dataplane attached) while 8,
/// then 64 clients download the blob at once; its high-water mark is reset
/// (`/proc/<pid>/clear_refs`) before each.
fn peak_memory(
    rows: &mut Vec<Row>,
    root: &Path,
    containerd: &Containerd,
    v2_path: &str,
) -> Result<()> {
    let slot = peermirror_tests::services::DataplaneSlot::new()?;
    let mut flags = slot.flags();
    flags.extend(["--log-level".into(), "warn".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let pm = Peermirror::start(&root.join("pm-memory"), containerd, &flags)?;
    let pid = pm.proc.pid();
    let (addr, p) = (pm.registry, v2_path.to_string());
    let d: Arc<dyn Fn() -> Result<u64> + Send + Sync> =
        Arc::new(move || download(&Via::root(), addr, &p, &Transport::Plain));
    for clients in MEMORY_CLIENTS {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("resetting the peak RSS")?;
        let run = measure(pid, clients, d.clone())?;
        let rss = peak_rss(pid);
        println!(
            "  peak RSS with {clients} clients: {} MiB ({:.2} GiB/s)",
            rss >> 20,
            run.gib_per_s()
        );
        rows.push(Row {
            scenario: MEMORY_ROW.into(),
            clients,
            runs: vec![run],
            peak_rss: Some(rss),
        });
    }
    drop(pm);
    drop(slot);
    Ok(())
}

const MEMORY_CLIENTS: [usize; 2] = [8, 64];
const MEMORY_ROW: &str = "peermirror default (sendfile, dataplane), memory";

fn hash_floor() -> Row {
    use sha2::Digest as _;
    let buf = vec![0x5au8; 64 << 20];
    let runs = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            let mut h = sha2::Sha256::new();
            for _ in 0..(GIB / buf.len()) {
                h.update(&buf);
            }
            std::hint::black_box(h.finalize());
            let seconds = started.elapsed().as_secs_f64();
            // One thread, never waiting: its wall time is its CPU time.
            Run {
                bytes: GIB as u64,
                seconds,
                cpu_seconds: seconds,
                switches: 0,
            }
        })
        .collect();
    let row = Row {
        scenario: "SHA-256 alone, in memory (the relay's floor)".into(),
        clients: 1,
        runs,
        peak_rss: None,
    };
    println!("  sha256 floor: {:.3} CPU-s/GiB", row.cpu().0);
    row
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    >> 20
            })
        })
        .unwrap_or(0);
    let kernel = run(Command::new("uname").arg("-r")).unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {mem} GiB RAM, Linux {}",
        kernel.trim()
    )
}

fn report(rows: &[Row], pulls: &[PullRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Machine: {}\n", machine());
    let _ = writeln!(
        out,
        "| server | clients | GiB/s median (min–max) | server CPU-s per GiB median (min–max) | peak RSS |"
    );
    let _ = writeln!(out, "| --- | ---: | --- | --- | ---: |");
    for r in rows {
        let (g, gl, gh) = r.gibs();
        let (c, cl, ch) = r.cpu();
        let rss = r
            .peak_rss
            .map_or("–".to_string(), |b| format!("{} MiB", b >> 20));
        let _ = writeln!(
            out,
            "| {} | {} | {g:.2} ({gl:.2}–{gh:.2}) | {c:.3} ({cl:.3}–{ch:.3}) | {rss} |",
            r.scenario, r.clients
        );
    }
    let find = |name: &str, clients: usize| {
        rows.iter()
            .find(|r| r.scenario.starts_with(name) && r.clients == clients)
    };
    let _ = writeln!(out, "\nRatios (same clients, same run):\n");
    let _ = writeln!(out, "| comparison | clients | value | target | |");
    let _ = writeln!(out, "| --- | ---: | ---: | --- | --- |");
    let mut verdict = |what: &str, clients: usize, value: f64, target: &str, ok: bool| {
        let _ = writeln!(
            out,
            "| {what} | {clients} | {value:.2} | {target} | {} |",
            if ok { "met" } else { "**missed**" }
        );
    };
    let best = ["peermirror io-uring", "peermirror sendfile"];
    for clients in CLIENTS {
        let (Some(nginx), Some(registry)) = (find("nginx", clients), find("CNCF", clients)) else {
            continue;
        };
        for name in best {
            let Some(pm) = find(name, clients) else {
                continue;
            };
            let cpu = pm.cpu().0 / nginx.cpu().0;
            verdict(
                &format!("{name} CPU-s/GiB ÷ nginx"),
                clients,
                cpu,
                "≤ 1",
                cpu <= 1.0,
            );
            let vs_registry = pm.cpu().0 / registry.cpu().0;
            verdict(
                &format!("{name} CPU-s/GiB ÷ CNCF registry"),
                clients,
                vs_registry,
                "≤ 0.20",
                vs_registry <= 0.2,
            );
            let thr = pm.gibs().0 / nginx.gibs().0;
            verdict(
                &format!("{name} GiB/s ÷ nginx"),
                clients,
                thr,
                "≥ 1",
                thr >= 1.0,
            );
        }
    }
    for (clients, limit) in MEMORY_CLIENTS.into_iter().zip([32.0, 64.0]) {
        if let Some(pm) = find(MEMORY_ROW, clients) {
            let rss = pm.peak_rss.unwrap_or(0) as f64 / (1 << 20) as f64;
            verdict(
                "peermirror default peak RSS, MiB",
                clients,
                rss,
                &format!("≤ {limit}"),
                rss <= limit,
            );
        }
    }
    if let (Some(relay), Some(serving), Some(hash)) = (
        find("mirror path, curl on B", 1),
        find("serving, curl on A", 1),
        find("SHA-256 alone", 1),
    ) {
        let floor = serving.cpu().0 + hash.cpu().0;
        let cpu = relay.cpu().0 / floor;
        verdict(
            "relay CPU-s/GiB (curl on B) ÷ (SHA-256 + serving)",
            1,
            cpu,
            "≤ 1.4",
            cpu <= 1.4,
        );
        let thr = relay.gibs().0;
        verdict("relay GiB/s (curl on B)", 1, thr, "≥ 1.0", thr >= 1.0);
    }
    if !pulls.is_empty() {
        let _ = writeln!(
            out,
            "\n| pull of a 1 GiB, 4-layer image on node B | through peermirror from node A, s median (min–max) | straight from the registry, s median (min–max) | ratio | target | |"
        );
        let _ = writeln!(out, "| --- | --- | --- | ---: | --- | --- |");
        for p in pulls {
            let (v, vl, vh) = summary(&mut p.via_peer.clone());
            let (d, dl, dh) = summary(&mut p.direct.clone());
            let ratio = v / d;
            let target = if p.what.contains("image pull") {
                "≤ 1.1"
            } else {
                "(the fair comparison)"
            };
            let ok = !p.what.contains("image pull") || ratio <= 1.1;
            let _ = writeln!(
                out,
                "| {} | {v:.2} ({vl:.2}–{vh:.2}) | {d:.2} ({dl:.2}–{dh:.2}) | {ratio:.2} | {target} | {} |",
                p.what,
                if ok { "met" } else { "**missed**" }
            );
        }
    }
    out
}

/// The parts `cargo xtask bench [part]` can run; no part runs them all.
const PARTS: &[&str] = &[
    "serving", "clients", "memory", "cluster", "dht", "fanout", "late", "tags",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("dht-run") {
        // One DHT scenario, in a child process of `dht`.
        let n = |i: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        return dht::run_one(n(1), n(2), n(3));
    }
    let only = args.first().cloned();
    if let Some(part) = &only {
        anyhow::ensure!(
            PARTS.contains(&part.as_str()),
            "unknown part {part:?}: one of {PARTS:?}"
        );
    }
    peermirror_tests::services::require_root();
    let result = run_parts(only.as_deref());
    measure::release_cgroups();
    result
}

fn run_parts(only: Option<&str>) -> Result<()> {
    let wanted = |part: &str| only.is_none_or(|o| o == part);
    let dir = tempfile::Builder::new().prefix("pm-bench-").tempdir()?;
    let mut rows = Vec::new();
    let mut pulls = Vec::new();
    let mut cells = Vec::new();
    if wanted("serving") {
        serving(&mut rows, &mut cells, dir.path(), ServingPart::All)?;
    } else if only == Some("clients") {
        serving(&mut rows, &mut cells, dir.path(), ServingPart::Clients)?;
    } else if only == Some("memory") {
        serving(&mut rows, &mut cells, dir.path(), ServingPart::Memory)?;
    }
    if wanted("cluster") {
        cluster_benches(&mut rows, &mut pulls)?;
    }
    let mut text = if rows.is_empty() && pulls.is_empty() {
        format!("Machine: {}\n", machine())
    } else {
        report(&rows, &pulls)
    };
    if !cells.is_empty() {
        let _ = writeln!(
            text,
            "\nServing with real clients, alternating rounds (each server once per round):"
        );
        text.push_str(&clients::report(&cells));
    }
    if wanted("dht") {
        let _ = writeln!(text, "\nDHT, one process on 127.0.0.0/8, release build:\n");
        text.push_str(&dht::bench()?);
    }
    if wanted("fanout") {
        let _ = writeln!(
            text,
            "\nFirst deploy: nodes pulling a new image at once, upstream capped at 400 Mbit/s:\n"
        );
        text.push_str(&fanout::bench()?);
    }
    if only == Some("late") {
        text.push_str(&fanout::late_bench()?);
    }
    if wanted("tags") {
        let _ = writeln!(
            text,
            "\nTags: a manifest asked by tag, each tag once (cold lookups), 4 nodes:\n"
        );
        text.push_str(&tags::bench()?);
    }
    println!("\n{text}");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    );
    std::fs::write(target.join("bench-results.md"), &text)?;
    println!("(written to {})", target.join("bench-results.md").display());
    Ok(())
}
