//! Serving with the clients users have: curl (reads the body into
//! userspace) and containerd's own fetch (`ctr content fetch`, which writes
//! an ingest file as a pull does), beside the splice client that reads
//! nothing (the lower bound). peermirror's default path, its io_uring path,
//! nginx and the CNCF registry serve the same 1 GiB blob; every round
//! measures every server once, in turn, so that drift of the machine
//! touches them all alike. Server CPU per GiB is compared per round.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use peermirror_tests::http::Via;
use peermirror_tests::image::TestImage;
use peermirror_tests::process::{Proc, wait_for};
use peermirror_tests::services::{
    Containerd, ContainerdOptions, DataplaneSlot, Peermirror, Upstream, free_port,
};

use crate::measure::{
    Run, Transport, context_switches, download, measure_each, peak_rss, server_cpu, summary,
};

/// Rounds per cell; each round measures every server once
/// (`PM_BENCH_ROUNDS` for more).
const ROUNDS: usize = 3;
const CLIENTS: [usize; 2] = [1, 8];

fn rounds() -> usize {
    std::env::var("PM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= ROUNDS)
        .unwrap_or(ROUNDS)
}

/// Those of `all` that the comma-separated list in `var` names (each
/// named by `name`), or all of them when `var` is unset.
fn chosen<T: Copy>(var: &str, all: &[T], name: impl Fn(T) -> String) -> Vec<T> {
    match std::env::var(var) {
        Ok(list) => all
            .iter()
            .copied()
            .filter(|&x| list.split(',').any(|n| n.trim() == name(x)))
            .collect(),
        Err(_) => all.to_vec(),
    }
}

/// The numbers of concurrent clients to run: 1 and 8, or those
/// `PM_BENCH_COUNTS` names (`1`, `8` or `1,8`).
fn client_counts() -> Vec<usize> {
    chosen("PM_BENCH_COUNTS", &CLIENTS, |n| n.to_string())
}

/// The client kinds to run: all, or those `PM_BENCH_CLIENTS` names
/// (`curl,ctr,splice`), for a quicker look at one.
fn client_kinds() -> Vec<Client> {
    chosen(
        "PM_BENCH_CLIENTS",
        &[Client::Curl, Client::Ctr, Client::Splice],
        |c| c.short().to_string(),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Splices the body to /dev/null: no copy to userspace (lower bound).
    Splice,
    /// `curl -o /dev/null`: the body is read into userspace.
    Curl,
    /// `ctr content fetch`: containerd writes the blob to an ingest file
    /// and commits it, as a pull does (one containerd per client: one
    /// containerd merges concurrent fetches of the same ref).
    Ctr,
}

impl Client {
    fn short(self) -> &'static str {
        match self {
            Client::Splice => "splice",
            Client::Curl => "curl",
            Client::Ctr => "ctr",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Client::Splice => "splice client",
            Client::Curl => "curl",
            Client::Ctr => "ctr content fetch",
        }
    }
}

/// One server under test.
struct Target {
    name: &'static str,
    pid: u32,
    addr: SocketAddr,
    /// Path of the blob for the splice client and curl.
    blob_path: String,
    /// Whether its peak RSS is reported (peermirror's).
    rss: bool,
}

/// The measured runs of one server with one client kind and count.
pub struct Cell {
    pub server: &'static str,
    pub client: Client,
    pub clients: usize,
    pub runs: Vec<Run>,
    pub peak_rss: Option<u64>,
}

impl Cell {
    pub fn cpu(&self) -> (f64, f64, f64) {
        summary(&mut self.runs.iter().map(Run::cpu_per_gib).collect::<Vec<_>>())
    }

    pub fn gibs(&self) -> (f64, f64, f64) {
        summary(&mut self.runs.iter().map(Run::gib_per_s).collect::<Vec<_>>())
    }
}

/// A running nginx. Dropping it stops the master with SIGTERM, which stops
/// its workers first (SIGKILL would leave them running, orphaned).
pub struct Nginx(pub Proc);

impl Nginx {
    pub fn pid(&self) -> u32 {
        self.0.pid()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Err(e) = self.0.terminate(Duration::from_secs(10)) {
            eprintln!("nginx: {e}");
        }
    }
}

/// nginx serving the content store as a minimal read-only registry (for
/// containerd) and plainly under `/blobs/` (for curl).
fn nginx_registry(dir: &Path, blobs_dir: &Path, repo: &str, port: u16) -> Result<Nginx> {
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = format!(
        "user root;\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           server {{\n    listen 127.0.0.1:{port};\n\
             location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}\n\
             location ~ \"^/v2/{repo}/manifests/sha256:(?<hex>[0-9a-f]{{64}})$\" {{\n\
               types {{ }} default_type application/vnd.oci.image.manifest.v1+json;\n\
               add_header Docker-Content-Digest sha256:$hex;\n      alias {b}/$hex;\n    }}\n\
             location ~ \"^/v2/{repo}/blobs/sha256:(?<hex>[0-9a-f]{{64}})$\" {{\n\
               types {{ }} default_type application/octet-stream;\n      alias {b}/$hex;\n    }}\n\
             location /blobs/ {{ alias {b}/; }}\n  }}\n}}\n",
        d = dir.display(),
        b = blobs_dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(dir);
    let proc = Proc::spawn("nginx", cmd, &dir.join("nginx.out"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for("nginx", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).ok()
    })
    .with_context(|| format!("nginx said:\n{}", proc.log_tail(10)))?;
    Ok(Nginx(proc))
}

fn curl(url: &str) -> Result<u64> {
    crate::measure::curl_with(Command::new("curl"), url)
}

/// The syscalls a server makes for one curl download of the blob
/// (`strace -c -f` attached to every thread of `pid`), as strace sums them.
fn syscall_profile(dir: &Path, name: &str, pid: u32, url: &str) -> Result<String> {
    let out = dir.join(format!(
        "strace-{}.txt",
        name.replace([' ', '(', ')', ','], "_")
    ));
    let mut cmd = Command::new("strace");
    cmd.args(["-c", "-f", "-o"]).arg(&out);
    // nginx serves from its workers, children of the master.
    for p in crate::measure::process_tree(pid) {
        cmd.args(["-p", &p.to_string()]);
    }
    let mut strace = Proc::spawn("strace", cmd, &dir.join("strace.log"))?;
    // strace needs a moment to attach to every thread.
    std::thread::sleep(Duration::from_millis(500));
    curl(url)?;
    strace.signal(libc::SIGINT);
    wait_for(
        "strace to write its summary",
        Duration::from_secs(10),
        || (!strace.alive()).then_some(()),
    )?;
    let text = std::fs::read_to_string(&out)?;
    // The header and the busiest calls.
    Ok(text.lines().take(12).collect::<Vec<_>>().join("\n"))
}

/// Reads `paths` once, so that every server serves from the page cache
/// (the ctr rounds write gigabytes, which can evict the blob).
fn warm(paths: &[std::path::PathBuf]) -> Result<()> {
    use std::io::Read as _;
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let mut f = std::fs::File::open(p).with_context(|| format!("warming {}", p.display()))?;
        while f.read(&mut buf)? > 0 {}
    }
    Ok(())
}

/// The registry's copy of the blob `hex` (`…/blobs/sha256/xx/<hex>/data`).
fn registry_copy(dir: &Path, hex: &str) -> Option<std::path::PathBuf> {
    let p = dir
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    p.exists().then_some(p)
}

/// Removes the image's content from a containerd and collects garbage, so
/// that the next fetch downloads everything again.
fn forget(containerd: &Containerd, digests: &[String]) -> Result<()> {
    let mut args = vec!["content", "rm"];
    args.extend(digests.iter().map(String::as_str));
    let _ = containerd.ctr(&args);
    let lease = containerd.ctr(&["leases", "create"])?;
    let id = lease.split_whitespace().next().context("lease id")?;
    containerd.ctr(&["leases", "delete", "--sync", id])?;
    let left = containerd.content_digests()?;
    ensure!(
        !digests.iter().any(|d| left.contains(d)),
        "content still there after removal"
    );
    Ok(())
}

/// Runs every client kind against every server, alternating servers within
/// each round. `source` holds the blob in its content store.
pub fn bench(
    root: &Path,
    source: &Containerd,
    upstream: &Upstream,
    image: &TestImage,
) -> Result<Vec<Cell>> {
    println!("serving with real clients: curl, ctr content fetch, splice (alternating rounds)");
    let blob = image.biggest_layer().clone();
    let v2_path = format!("/v2/{}/blobs/{}", image.repo, blob.digest);
    let slot = DataplaneSlot::new()?;
    let mut dataplane_flags = slot.flags();
    dataplane_flags.extend(["--log-level".into(), "warn".into()]);
    let dataplane_flags: Vec<&str> = dataplane_flags.iter().map(String::as_str).collect();
    let pm_default = Peermirror::start(&root.join("pm-default"), source, &dataplane_flags)?;
    let pm_off = Peermirror::start(
        &root.join("pm-sendfile-off"),
        source,
        &["--serving-path", "sendfile", "--log-level", "warn"],
    )?;
    let pm_uring = Peermirror::start(
        &root.join("pm-uring-off"),
        source,
        &["--serving-path", "io-uring", "--log-level", "warn"],
    )?;
    // Another build of the daemon beside the default one, to compare a
    // change in the same run (`PM_BENCH_ALT_BIN=<peermirror binary>`).
    let alt = match std::env::var_os("PM_BENCH_ALT_BIN") {
        Some(bin) => {
            let slot = DataplaneSlot::new()?;
            let mut flags = slot.flags();
            flags.extend(["--log-level".into(), "warn".into()]);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let pm = peermirror_tests::services::with_binary(&bin, || {
                Peermirror::start(&root.join("pm-alt"), source, &flags)
            })?;
            Some((pm, slot))
        }
        None => None,
    };
    let port = free_port();
    let blobs_dir = source.content_root().join("blobs/sha256");
    let ngx = nginx_registry(&root.join("nginx-registry"), &blobs_dir, &image.repo, port)?;
    let nginx_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut targets = vec![
        Target {
            name: "peermirror default (sendfile, dataplane attached)",
            pid: pm_default.proc.pid(),
            addr: pm_default.registry,
            blob_path: v2_path.clone(),
            rss: true,
        },
        Target {
            name: "peermirror sendfile, --dataplane off",
            pid: pm_off.proc.pid(),
            addr: pm_off.registry,
            blob_path: v2_path.clone(),
            rss: true,
        },
        Target {
            name: "peermirror io-uring, --dataplane off",
            pid: pm_uring.proc.pid(),
            addr: pm_uring.registry,
            blob_path: v2_path.clone(),
            rss: true,
        },
        Target {
            name: "nginx",
            pid: ngx.pid(),
            addr: nginx_addr,
            blob_path: format!("/blobs/{}", blob.hex()),
            rss: false,
        },
        Target {
            name: "CNCF registry",
            pid: upstream.pid().context("registry pid")?,
            addr: upstream.addr,
            blob_path: v2_path.clone(),
            rss: false,
        },
    ];
    if let Some((pm, _)) = &alt {
        targets.insert(
            1,
            Target {
                name: "peermirror alt (PM_BENCH_ALT_BIN, default flags)",
                pid: pm.proc.pid(),
                addr: pm.registry,
                blob_path: v2_path.clone(),
                rss: true,
            },
        );
    }
    // One containerd per concurrent ctr client.
    let counts = client_counts();
    let most = counts.iter().copied().max().unwrap_or(0);
    let fetchers: Vec<Containerd> = (0..most)
        .map(|i| {
            Containerd::start(
                &root.join(format!("fetcher-{i}")),
                "bench",
                ContainerdOptions::default(),
            )
        })
        .collect::<Result<_>>()?;
    let fetchers = Arc::new(fetchers);
    let digests: Vec<String> = image.blobs.iter().map(|d| d.digest.clone()).collect();
    let manifest = image.root.digest.clone();
    let mut copies = vec![blobs_dir.join(blob.hex())];
    copies.extend(registry_copy(&upstream.dir, blob.hex()));

    // What each server spends doing nothing: at containerd's pace a GiB
    // takes seconds, and an idle cost is charged to it too.
    let idle = Duration::from_secs(5);
    let before: Vec<(f64, u64)> = targets
        .iter()
        .map(|t| (server_cpu(t.pid), context_switches(t.pid)))
        .collect();
    std::thread::sleep(idle);
    for (t, (cpu, switches)) in targets.iter().zip(before) {
        println!(
            "  idle {}: {:.2} ms CPU/s, {:.0} context switches/s",
            t.name,
            (server_cpu(t.pid) - cpu) * 1000.0 / idle.as_secs_f64(),
            context_switches(t.pid).saturating_sub(switches) as f64 / idle.as_secs_f64()
        );
    }

    let mut cells: Vec<Cell> = Vec::new();
    for client in client_kinds() {
        for &clients in &counts {
            println!("  {} × {clients}", client.name());
            let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
            for round in 0..rounds() {
                for (i, t) in targets.iter().enumerate() {
                    if client == Client::Ctr {
                        for f in fetchers.iter().take(clients) {
                            forget(f, &digests)?;
                        }
                    }
                    warm(&copies)?;
                    let (addr, path) = (t.addr, t.blob_path.clone());
                    let reference = format!("{addr}/{}@{manifest}", image.repo);
                    let f = fetchers.clone();
                    let one: Arc<dyn Fn(usize) -> Result<u64> + Send + Sync> = match client {
                        Client::Splice => Arc::new(move |_| {
                            download(&Via::root(), addr, &path, &Transport::Plain)
                        }),
                        Client::Curl => {
                            let url = format!("http://{addr}{path}");
                            Arc::new(move |_| curl(&url))
                        }
                        Client::Ctr => {
                            let size = blob.size;
                            Arc::new(move |k| {
                                f[k].ctr(&["content", "fetch", "--plain-http", &reference])?;
                                Ok(size)
                            })
                        }
                    };
                    // The first round of each cell is profiled when asked.
                    let r = if round == 0 {
                        crate::measure::profiled(
                            &format!("{} {} x{clients} {}", client.short(), t.name, round + 1),
                            t.pid,
                            || measure_each(t.pid, clients, one),
                        )?
                    } else {
                        measure_each(t.pid, clients, one)?
                    };
                    if r.bytes < (blob.size * clients as u64) {
                        bail!("{}: {} bytes in a round", t.name, r.bytes);
                    }
                    println!(
                        "    round {} {}: {:.2} GiB/s, {:.3} CPU-s/GiB, {:.0} context switches/GiB",
                        round + 1,
                        t.name,
                        r.gib_per_s(),
                        r.cpu_per_gib(),
                        r.switches_per_gib()
                    );
                    runs[i].push(r);
                }
            }
            for (t, r) in targets.iter().zip(runs) {
                cells.push(Cell {
                    server: t.name,
                    client,
                    clients,
                    runs: r,
                    peak_rss: t.rss.then(|| peak_rss(t.pid)),
                });
            }
        }
    }
    if std::env::var_os("PM_BENCH_STRACE").is_some() {
        for t in &targets {
            let url = format!("http://{}{}", t.addr, t.blob_path);
            warm(&copies)?;
            let profile = syscall_profile(root, t.name, t.pid, &url)?;
            println!(
                "\n  syscalls of {} for one curl download of 1 GiB:\n{profile}",
                t.name
            );
        }
    }
    drop(ngx);
    drop((pm_default, pm_off, pm_uring, alt));
    drop(slot);
    Ok(cells)
}

/// The table of [`bench`]'s cells and, per round, peermirror's CPU per GiB
/// divided by nginx's and by the registry's.
pub fn report(cells: &[Cell]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| client | clients | server | GiB/s median (min–max) | server CPU-s/GiB median (min–max) | peak RSS |"
    );
    let _ = writeln!(out, "| --- | ---: | --- | --- | --- | ---: |");
    for c in cells {
        let (g, gl, gh) = c.gibs();
        let (u, ul, uh) = c.cpu();
        let rss = c
            .peak_rss
            .map_or("–".to_string(), |b| format!("{} MiB", b >> 20));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {g:.2} ({gl:.2}–{gh:.2}) | {u:.3} ({ul:.3}–{uh:.3}) | {rss} |",
            c.client.name(),
            c.clients,
            c.server
        );
    }
    let _ = writeln!(
        out,
        "\n| peermirror CPU-s/GiB ÷ nginx (per round) | client | clients | rounds | median | target | |"
    );
    let _ = writeln!(out, "| --- | --- | ---: | --- | ---: | --- | --- |");
    let find = |server: &str, client: Client, clients: usize| {
        cells
            .iter()
            .find(|c| c.server.starts_with(server) && c.client == client && c.clients == clients)
    };
    for client in [Client::Curl, Client::Ctr, Client::Splice] {
        for clients in CLIENTS {
            let Some(nginx) = find("nginx", client, clients) else {
                continue;
            };
            for pm in cells.iter().filter(|c| {
                c.server.starts_with("peermirror") && c.client == client && c.clients == clients
            }) {
                let mut ratios: Vec<f64> = pm
                    .runs
                    .iter()
                    .zip(&nginx.runs)
                    .map(|(p, n)| p.cpu_per_gib() / n.cpu_per_gib())
                    .collect();
                let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
                let (median, _, _) = summary(&mut ratios);
                let default = pm.server.contains("default");
                let _ = writeln!(
                    out,
                    "| {} | {} | {clients} | {} | {median:.2} | {} | {} |",
                    pm.server,
                    client.name(),
                    listed.join(", "),
                    if default { "≤ 1.0" } else { "" },
                    match (default, median <= 1.0) {
                        (false, _) => "",
                        (true, true) => "met",
                        (true, false) => "**missed**",
                    }
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\n| peermirror default CPU-s/GiB ÷ CNCF registry (per round) | client | clients | median |"
    );
    let _ = writeln!(out, "| --- | --- | ---: | ---: |");
    for client in [Client::Curl, Client::Ctr, Client::Splice] {
        for clients in CLIENTS {
            let (Some(pm), Some(reg)) = (
                find("peermirror default", client, clients),
                find("CNCF", client, clients),
            ) else {
                continue;
            };
            let mut ratios: Vec<f64> = pm
                .runs
                .iter()
                .zip(&reg.runs)
                .map(|(p, r)| p.cpu_per_gib() / r.cpu_per_gib())
                .collect();
            let (median, _, _) = summary(&mut ratios);
            let _ = writeln!(
                out,
                "| {} | {} | {clients} | {median:.2} |",
                pm.server,
                client.name()
            );
        }
    }
    out
}
