//! What the benchmark reads off the system: CPU time of a server's
//! processes, peak resident memory, and an efficient HTTP client.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use peermirror_tests::http::Via;

/// Clock ticks per second of `/proc/<pid>/stat`.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User + system CPU seconds of one process (all its threads, io_uring's
/// kernel workers included: they belong to its thread group).
fn cpu_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based); `rest` starts at 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and every process descending from it (nginx's workers).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all: Vec<u32> = vec![pid];
    let procs: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut grew = true;
    while grew {
        grew = false;
        for p in &procs {
            if !all.contains(p) && parent_of(*p).is_some_and(|pp| all.contains(&pp)) {
                all.push(*p);
                grew = true;
            }
        }
    }
    all
}

/// CPU seconds used so far by a server (its whole process tree): exact,
/// from the cgroup v2 `cpu.stat` of a cgroup that holds only the server
/// (`usage_usec` is the scheduler's runtime of every task that ran in it,
/// threads that exited included), see [`meter_cgroup`]. When no cgroup can
/// be had, the 10 ms clock ticks of `/proc/<pid>/stat`.
pub fn server_cpu(pid: u32) -> f64 {
    match meter_cgroup(pid).and_then(|cg| cgroup_usage(&cg)) {
        Ok(seconds) => seconds,
        Err(e) => {
            eprintln!("bench: CPU of {pid} in clock ticks ({e:#})");
            process_tree(pid).into_iter().filter_map(cpu_of).sum()
        }
    }
}

fn cgroup_usage(cgroup: &Path) -> Result<f64> {
    let stat = std::fs::read_to_string(cgroup.join("cpu.stat"))
        .with_context(|| format!("reading {}/cpu.stat", cgroup.display()))?;
    let usec: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .context("cpu.stat without usage_usec")?;
    Ok(usec as f64 / 1e6)
}

/// The unified cgroup `pid` is in.
fn cgroup_of(pid: u32) -> Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 membership")?;
    Ok(peermirror_tests::services::cgroup2_root()?.join(rel.trim_start_matches('/')))
}

/// The cgroups that measure servers.
struct Meters {
    /// Made by this bench (removed by [`release_cgroups`]).
    made: Vec<PathBuf>,
    /// The cgroup of each server measured, by PID.
    by_pid: Vec<(u32, PathBuf)>,
}

static METERS: Mutex<Meters> = Mutex::new(Meters {
    made: Vec::new(),
    by_pid: Vec::new(),
});

/// The cgroup whose CPU is `pid`'s process tree's alone. A server that is
/// already alone in its cgroup keeps it (a daemon with the dataplane joins
/// its own, to which the eBPF programs are attached: it is never moved).
/// Any other server is moved, with its children, into a new cgroup of its
/// own the first time it is measured.
fn meter_cgroup(pid: u32) -> Result<PathBuf> {
    let mut meters = METERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, cg)) = meters.by_pid.iter().find(|(p, _)| *p == pid) {
        return Ok(cg.clone());
    }
    let tree = process_tree(pid);
    let current = cgroup_of(pid)?;
    let root = peermirror_tests::services::cgroup2_root()?;
    let members: Vec<u32> = std::fs::read_to_string(current.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let cgroup = if current != root && members.iter().all(|m| tree.contains(m)) {
        current
    } else {
        let new = root.join(format!("pm-bench-{}-{pid}", std::process::id()));
        std::fs::create_dir_all(&new).with_context(|| format!("creating {}", new.display()))?;
        meters.made.push(new.clone());
        for p in &tree {
            // A process may have exited meanwhile.
            let _ = std::fs::write(new.join("cgroup.procs"), p.to_string());
        }
        ensure!(
            cgroup_of(pid)? == new,
            "could not move {pid} into {}",
            new.display()
        );
        new
    };
    meters.by_pid.push((pid, cgroup.clone()));
    Ok(cgroup)
}

/// Removes the measuring cgroups, moving what still runs in them back to
/// the root cgroup first.
pub fn release_cgroups() {
    let mut meters = METERS.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(root) = peermirror_tests::services::cgroup2_root() else {
        return;
    };
    for cg in meters.made.drain(..) {
        if let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) {
            for p in procs.lines() {
                let _ = std::fs::write(root.join("cgroup.procs"), p.trim());
            }
        }
        if let Err(e) = std::fs::remove_dir(&cg) {
            eprintln!("bench: cannot remove {}: {e}", cg.display());
        }
    }
    meters.by_pid.clear();
}

/// Peak resident set size (VmHWM) of a process, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// How a client reaches the server.
#[derive(Clone)]
pub enum Transport {
    /// Plain TCP; the body is spliced to /dev/null without being copied to
    /// userspace, so the client costs as little as possible.
    Plain,
    /// TLS: the client must decrypt in userspace (large reads).
    Tls(Arc<rustls::ClientConfig>),
}

fn content_length(head: &str) -> Option<u64> {
    head.lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        })
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// Reads a response head from `stream`; returns the head and the body
/// bytes read past it.
fn read_head(stream: &mut impl Read) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), body));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Downloads `path` once and throws the body away; returns its length.
pub fn download(via: &Via, addr: SocketAddr, path: &str, transport: &Transport) -> Result<u64> {
    let tcp = via.connect(addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    match transport {
        Transport::Plain => {
            let mut tcp = tcp;
            tcp.write_all(request.as_bytes())?;
            let (head, early) = read_head(&mut tcp)?;
            if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.1 206") {
                bail!("{addr}{path}: {}", head.lines().next().unwrap_or(""));
            }
            let total = content_length(&head).context("no content-length")?;
            let mut remaining = total - early.len() as u64;
            let null = File::options().write(true).open("/dev/null")?;
            let (pipe_r, pipe_w) = rustix::pipe::pipe()?;
            let _ = rustix::pipe::fcntl_setpipe_size(&pipe_w, 1 << 20);
            while remaining > 0 {
                let want = remaining.min(1 << 20) as usize;
                let n = rustix::pipe::splice(
                    tcp.as_fd(),
                    None,
                    &pipe_w,
                    None,
                    want,
                    rustix::pipe::SpliceFlags::MOVE,
                )?;
                if n == 0 {
                    bail!("body ended {remaining} bytes early");
                }
                let mut left = n;
                while left > 0 {
                    left -= rustix::pipe::splice(
                        &pipe_r,
                        None,
                        &null,
                        None,
                        left,
                        rustix::pipe::SpliceFlags::MOVE,
                    )?;
                }
                remaining -= n as u64;
            }
            Ok(total)
        }
        Transport::Tls(config) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let conn = rustls::ClientConnection::new(config.clone(), name)?;
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            stream.write_all(request.as_bytes())?;
            let (head, early) = read_head(&mut stream)?;
            if !head.starts_with("HTTP/1.1 200") {
                bail!("{addr}{path}: {}", head.lines().next().unwrap_or(""));
            }
            let total = content_length(&head).context("no content-length")?;
            let mut remaining = total - early.len() as u64;
            let mut buf = vec![0u8; 1 << 20];
            while remaining > 0 {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    bail!("body ended {remaining} bytes early");
                }
                remaining = remaining.saturating_sub(n as u64);
            }
            Ok(total)
        }
    }
}

/// One measured run: `clients` downloads at once.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub bytes: u64,
    pub seconds: f64,
    pub cpu_seconds: f64,
    /// Context switches of the server's threads meanwhile (voluntary and
    /// not; threads that exited in between are not counted).
    pub switches: u64,
}

impl Run {
    pub fn gib_per_s(&self) -> f64 {
        self.bytes as f64 / (1u64 << 30) as f64 / self.seconds
    }

    pub fn cpu_per_gib(&self) -> f64 {
        self.cpu_seconds / (self.bytes as f64 / (1u64 << 30) as f64)
    }

    pub fn switches_per_gib(&self) -> f64 {
        self.switches as f64 / (self.bytes as f64 / (1u64 << 30) as f64)
    }
}

/// Context switches so far of every thread of `pid`'s process tree
/// (`voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches`).
pub fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for p in process_tree(pid) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            total += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    total
}

/// Runs `clients` concurrent downloads and measures the server's CPU.
pub fn measure(
    server_pid: u32,
    clients: usize,
    download_one: Arc<dyn Fn() -> Result<u64> + Send + Sync>,
) -> Result<Run> {
    measure_each(server_pid, clients, Arc::new(move |_| download_one()))
}

/// Like [`measure`], but each client's download is told its index
/// (`0..clients`), for clients that each need their own state.
pub fn measure_each(
    server_pid: u32,
    clients: usize,
    download_one: Arc<dyn Fn(usize) -> Result<u64> + Send + Sync>,
) -> Result<Run> {
    let cpu_before = server_cpu(server_pid);
    let switches_before = context_switches(server_pid);
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let d = download_one.clone();
            std::thread::spawn(move || d(i))
        })
        .collect();
    let mut bytes = 0;
    for h in handles {
        bytes += h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = server_cpu(server_pid) - cpu_before;
    let switches = context_switches(server_pid).saturating_sub(switches_before);
    Ok(Run {
        bytes,
        seconds,
        cpu_seconds,
        switches,
    })
}

/// With `PM_BENCH_PERF=<dir>`: records where `pid` spends its CPU while
/// `f` runs (`perf record -e cpu-clock -g`, the software clock, which works
/// without hardware counters), and writes `<dir>/<name>.txt`, the report
/// of the busiest call chains. Without it, just runs `f`.
pub fn profiled<T>(name: &str, pid: u32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(dir) = std::env::var_os("PM_BENCH_PERF").map(PathBuf::from) else {
        return f();
    };
    std::fs::create_dir_all(&dir)?;
    let file = name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let data = dir.join(format!("{file}.data"));
    // Every process of the server (nginx's workers); `perf -p` follows the
    // threads that exist when it attaches, so measured code should have
    // run once before (tokio's blocking threads live on for 10 s).
    let pids: Vec<String> = process_tree(pid).iter().map(u32::to_string).collect();
    let mut cmd = std::process::Command::new("perf");
    cmd.args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-o"])
        .arg(&data)
        .args(["-p", &pids.join(",")]);
    let mut perf = peermirror_tests::process::Proc::spawn("perf", cmd, &dir.join("perf.log"))?;
    std::thread::sleep(Duration::from_millis(300));
    let result = f();
    perf.signal(libc::SIGINT);
    peermirror_tests::process::wait_for("perf to write its data", Duration::from_secs(30), || {
        (!perf.alive()).then_some(())
    })?;
    let report = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "1",
            "-i",
        ])
        .arg(&data)
        .output()?;
    std::fs::write(dir.join(format!("{file}.txt")), &report.stdout)?;
    println!(
        "    perf profile of {name}: {}",
        dir.join(format!("{file}.txt")).display()
    );
    result
}

/// Runs `curl` (a `Command` for it: here, or in a network namespace) to
/// download `url` into `/dev/null`; the bytes it received.
pub fn curl_with(mut curl: std::process::Command, url: &str) -> Result<u64> {
    let out = peermirror_tests::process::run(curl.args([
        "-sS",
        "--fail",
        "-o",
        "/dev/null",
        "--max-time",
        "300",
        "-w",
        "%{size_download}",
        url,
    ]))?;
    out.trim()
        .parse()
        .with_context(|| format!("curl said {out:?}"))
}

/// Median and range of a metric over runs.
pub fn summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    let median = values[values.len() / 2];
    (median, values[0], values[values.len() - 1])
}
