//! The real services the tests run: a private containerd, the CNCF
//! distribution registry as upstream, and peermirror itself. Each lives in a
//! directory of its own and listens only on loopback or a unix socket.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::http::Via;
use crate::image::{Layout, TestImage};
use crate::process::{Proc, run, wait_for};

/// Fails the test with a clear message when not running as root: these tests
/// start containerd and create namespaces.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests need root (they run containerd); run them with `cargo xtask test` as root"
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    l.local_addr().expect("local addr").port()
}

thread_local! {
    static BINARY_OVERRIDE: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with daemons started from `binary` instead of
/// [`peermirror_bin`] (on this thread), to compare two builds in one run.
pub fn with_binary<T>(binary: &std::ffi::OsStr, f: impl FnOnce() -> T) -> T {
    BINARY_OVERRIDE.with(|b| *b.borrow_mut() = Some(PathBuf::from(binary)));
    let out = f();
    BINARY_OVERRIDE.with(|b| *b.borrow_mut() = None);
    out
}

/// The `peermirror` binary built next to this test binary.
pub fn peermirror_bin() -> PathBuf {
    if let Some(p) = BINARY_OVERRIDE.with(|b| b.borrow().clone()) {
        return p;
    }
    if let Some(p) = std::env::var_os("PEERMIRROR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/peermirror
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("peermirror"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p peermirror`, which `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Mounts the bpf filesystem at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mounted = rustix::fs::statfs("/sys/fs/bpf")
        .map(|s| s.f_type == BPF_FS_MAGIC)
        .unwrap_or(false);
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            after
                .starts_with("cgroup2 ")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 hierarchy is mounted")
}

/// A cgroup and a bpffs directory of one daemon's dataplane, removed when
/// dropped (after the daemon is gone).
#[derive(Debug)]
pub struct DataplaneSlot {
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
}

impl DataplaneSlot {
    pub fn new() -> Result<DataplaneSlot> {
        ensure_bpffs()?;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pm-test-{}-{n}", std::process::id());
        Ok(DataplaneSlot {
            cgroup: cgroup2_root()?.join(&name),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
        })
    }

    /// The daemon flags that use this slot.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--dataplane".into(),
            "required".into(),
            "--dataplane-cgroup".into(),
            self.cgroup.to_string_lossy().into_owned(),
            "--bpffs-path".into(),
            self.bpffs.to_string_lossy().into_owned(),
        ]
    }
}

impl Drop for DataplaneSlot {
    fn drop(&mut self) {
        // Pins first (links keep programs attached), then the empty cgroup.
        if let Ok(entries) = std::fs::read_dir(&self.bpffs) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Writes a preshared key file in libp2p's swarm key format.
pub fn write_psk(path: &Path, key: &[u8; 32]) -> Result<()> {
    std::fs::write(
        path,
        format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", hex::encode(key)),
    )?;
    Ok(())
}

/// Options for a containerd instance.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// Enable the CRI plugin with `config_path` pointing at this certs.d.
    pub cri_config_path: Option<PathBuf>,
    /// Run containerd (and `ctr`) inside this network namespace.
    pub netns: Option<crate::netns::Netns>,
}

/// A private containerd with its own root, state and socket.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub namespace: String,
    options: ContainerdOptions,
    proc: Option<Proc>,
}

impl Containerd {
    pub fn start(dir: &Path, namespace: &str, options: ContainerdOptions) -> Result<Containerd> {
        std::fs::create_dir_all(dir)?;
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            socket: dir.join("containerd.sock"),
            namespace: namespace.to_string(),
            options,
            proc: None,
        };
        c.write_config()?;
        c.launch()?;
        Ok(c)
    }

    pub fn content_root(&self) -> PathBuf {
        self.dir.join("root/io.containerd.content.v1.content")
    }

    fn write_config(&self) -> Result<()> {
        let config = if crate::release::release().is_v2() {
            self.config_v3()
        } else {
            self.config_v2()
        };
        std::fs::write(self.dir.join("config.toml"), config)?;
        Ok(())
    }

    /// The settings every version shares, in either config version.
    fn config_common(&self, version: u32) -> String {
        let d = self.dir.display();
        format!(
            r#"version = {version}
root = "{d}/root"
state = "{d}/state"
{disabled}
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
            disabled = if self.options.cri_config_path.is_some() {
                "disabled_plugins = []"
            } else {
                r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#
            }
        )
    }

    /// containerd 1.x: config version 2, the CRI plugin in one table.
    fn config_v2(&self) -> String {
        let d = self.dir.display();
        let mut config = self.config_common(2);
        if let Some(certs) = &self.options.cri_config_path {
            config.push_str(&format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.invalid/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    discard_unpacked_layers = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{}"
"#,
                certs.display()
            ));
        }
        config
    }

    /// containerd 2.x: config version 3, the CRI plugin split into its
    /// images and runtime plugins.
    fn config_v3(&self) -> String {
        let release = crate::release::release();
        let d = self.dir.display();
        let mut config = self.config_common(3);
        if let Some(certs) = &self.options.cri_config_path {
            config.push_str(&format!(
                r#"[plugins."io.containerd.cri.v1.images"]
  discard_unpacked_layers = false
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "registry.invalid/pause:3.6"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{}"
[plugins."io.containerd.cri.v1.runtime".cni]
  {bin_dir} = {bin}
  conf_dir = "{d}/cni/conf"
"#,
                certs.display(),
                // 2.1 renamed `bin_dir` to a list.
                bin_dir = if release.at_least(2, 1, 0) {
                    "bin_dirs"
                } else {
                    "bin_dir"
                },
                bin = if release.at_least(2, 1, 0) {
                    format!(r#"["{d}/cni/bin"]"#)
                } else {
                    format!(r#""{d}/cni/bin""#)
                },
            ));
        }
        config
    }

    fn command(&self, program: &str) -> Command {
        let release = crate::release::release();
        let program = release.program(program);
        let program = program.to_string_lossy();
        let mut cmd = match &self.options.netns {
            Some(ns) => ns.command(&program),
            None => Command::new(&*program),
        };
        if let Some(path) = release.path_env() {
            cmd.env("PATH", path);
        }
        cmd
    }

    /// A `ctr` command for this containerd (its socket; add `--namespace`
    /// and the rest), in its network namespace.
    pub fn ctr_command(&self) -> Command {
        let mut cmd = self.command("ctr");
        cmd.arg("--address").arg(&self.socket);
        cmd
    }

    fn launch(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = self.command("containerd");
        cmd.arg("--config").arg(self.dir.join("config.toml"));
        let proc = Proc::spawn("containerd", cmd, &self.dir.join("containerd.log"))?;
        self.proc = Some(proc);
        wait_for("containerd to answer", Duration::from_secs(20), || {
            self.ctr(&["version"]).ok()
        })?;
        Ok(())
    }

    /// Stops containerd (SIGTERM) and starts it again on the same state.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// containerd's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// SIGKILLs containerd (a node that dies mid-pull); [`Self::restart`]
    /// starts it again.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// The refs of the ingests in progress (`ctr content active`).
    pub fn active_ingests(&self) -> Result<Vec<String>> {
        let out = self.ctr(&["content", "active"])?;
        Ok(out
            .lines()
            .skip(1) // REF SIZE AGE
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    /// Aborts the ingest `reference` through the gRPC `Content.Abort`, as a
    /// client that gives up on a fetch does (`ctr` has no command for it).
    pub fn abort_ingest(&self, reference: &str) -> Result<()> {
        use containerd_client::services::v1::AbortRequest;
        use containerd_client::services::v1::content_client::ContentClient;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let channel = containerd_client::connect(&self.socket)
                .await
                .context("connecting to containerd")?;
            let mut request = tonic::Request::new(AbortRequest {
                r#ref: reference.to_string(),
            });
            request
                .metadata_mut()
                .insert("containerd-namespace", self.namespace.parse()?);
            ContentClient::new(channel)
                .abort(request)
                .await
                .with_context(|| format!("Content.Abort of {reference}"))?;
            Ok(())
        })
    }

    /// Runs `ctr` against this containerd, in its namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        run(self
            .ctr_command()
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args))
    }

    /// Pulls an image over plain HTTP.
    pub fn pull(&self, reference: &str) -> Result<()> {
        self.ctr(&["images", "pull", "--plain-http", reference])
            .map(drop)
    }

    /// Pulls an image with the registry hosts configured in `hosts_dir`
    /// (`ctr images pull --hosts-dir`). containerd 1.x resolves in the ctr
    /// process; 2.x hands the pull to the daemon's Transfer service, which
    /// reads `hosts_dir` itself and by default also fetches every other
    /// platform's manifest and config: `--skip-metadata` keeps it to this
    /// platform, as 1.x and the CRI plugin do, so that a node can pull what
    /// its peers hold.
    pub fn pull_via(&self, hosts_dir: &Path, reference: &str) -> Result<()> {
        let hosts = hosts_dir.to_string_lossy();
        let mut args = vec!["images", "pull", "--hosts-dir", &hosts];
        if crate::release::release().is_v2() {
            args.push("--skip-metadata");
        }
        args.push(reference);
        self.ctr(&args).map(drop)
    }

    /// The digests of all content in the namespace.
    pub fn content_digests(&self) -> Result<Vec<String>> {
        let out = self.ctr(&["content", "ls", "--quiet"])?;
        Ok(out
            .lines()
            .map(str::to_string)
            .filter(|l| l.starts_with("sha256:"))
            .collect())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        // Unpacking may leave overlay mounts under the root; unmount them
        // before the directory goes.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let root = self.dir.to_string_lossy().to_string();
            let mut targets: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|t| t.starts_with(root.as_str()))
                .collect();
            targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
            for t in targets {
                let _ = Command::new("umount").arg("-l").arg(t).status();
            }
        }
    }
}

/// The CNCF distribution registry (`docker-registry`) on 127.0.0.1.
pub struct Upstream {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    proc: Option<Proc>,
    netns: Option<crate::netns::Netns>,
}

impl Upstream {
    pub fn start(dir: &Path) -> Result<Upstream> {
        Self::start_on(dir, SocketAddr::from(([127, 0, 0, 1], free_port())))
    }

    pub fn start_on(dir: &Path, addr: SocketAddr) -> Result<Upstream> {
        Self::start_in(dir, addr, None)
    }

    /// Starts the registry inside a network namespace, listening on `addr`.
    pub fn start_in(
        dir: &Path,
        addr: SocketAddr,
        netns: Option<crate::netns::Netns>,
    ) -> Result<Upstream> {
        std::fs::create_dir_all(dir.join("data"))?;
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        );
        std::fs::write(dir.join("config.yml"), config)?;
        let mut u = Upstream {
            dir: dir.to_path_buf(),
            addr,
            proc: None,
            netns,
        };
        u.launch()?;
        Ok(u)
    }

    /// `program`, run where the registry's clients are (its namespace).
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => ns.command(program),
            None => Command::new(program),
        }
    }

    fn launch(&mut self) -> Result<()> {
        let mut cmd = self.command("docker-registry");
        cmd.arg("serve").arg(self.dir.join("config.yml"));
        self.proc = Some(Proc::spawn(
            "docker-registry",
            cmd,
            &self.dir.join("registry.log"),
        )?);
        let addr = self.addr;
        let via = self.netns.as_ref().map(|n| n.via()).unwrap_or_default();
        wait_for(
            "the upstream registry to answer",
            Duration::from_secs(20),
            || via.get(addr, "/v2/", &[]).ok().filter(|r| r.status == 200),
        )?;
        Ok(())
    }

    /// `127.0.0.1:<port>`, the registry host part of image names.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn reference(&self, image: &TestImage) -> String {
        format!("{}/{}:{}", self.host(), image.repo, image.tag)
    }

    /// Pushes an image from a layout with skopeo.
    pub fn push(&self, layout: &Layout, image: &TestImage) -> Result<()> {
        let mut cmd = self.command("skopeo");
        // --preserve-digests: push the manifests as generated (skopeo would
        // otherwise compress uncompressed layers, changing every digest).
        cmd.args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ]);
        if image.is_index() {
            cmd.arg("--all");
        }
        cmd.arg(format!("oci:{}:{}", layout.dir.display(), image.tag))
            .arg(format!("docker://{}", self.reference(image)));
        run(&mut cmd).map(drop)
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10))?;
        }
        Ok(())
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn running(&self) -> bool {
        self.proc.is_some()
    }
}

/// A running peermirror daemon.
pub struct Peermirror {
    pub registry: SocketAddr,
    pub metrics: SocketAddr,
    pub proc: Proc,
    /// Where its ports are reached from.
    pub via: Via,
}

/// Where a peermirror runs and listens.
pub struct PeermirrorOptions<'a> {
    pub netns: Option<&'a crate::netns::Netns>,
    pub registry: SocketAddr,
    pub metrics: SocketAddr,
    pub router: SocketAddr,
    pub extra: &'a [&'a str],
}

impl<'a> PeermirrorOptions<'a> {
    /// In this namespace, on free loopback ports, with `extra` flags.
    pub fn loopback(extra: &'a [&'a str]) -> PeermirrorOptions<'a> {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        PeermirrorOptions {
            netns: None,
            registry: loopback(free_port()),
            metrics: loopback(free_port()),
            router: loopback(free_port()),
            extra,
        }
    }
}

impl Peermirror {
    /// Starts `peermirror run` for `containerd` on free loopback ports, with
    /// extra flags, and waits until it is ready.
    pub fn start(dir: &Path, containerd: &Containerd, extra: &[&str]) -> Result<Peermirror> {
        let mut p = Self::spawn(dir, containerd, extra)?;
        p.wait_ready(Duration::from_secs(30))?;
        Ok(p)
    }

    /// Starts it on loopback without waiting for readiness.
    pub fn spawn(dir: &Path, containerd: &Containerd, extra: &[&str]) -> Result<Peermirror> {
        Self::spawn_with(dir, containerd, PeermirrorOptions::loopback(extra))
    }

    pub fn spawn_with(
        dir: &Path,
        containerd: &Containerd,
        options: PeermirrorOptions<'_>,
    ) -> Result<Peermirror> {
        std::fs::create_dir_all(dir)?;
        let extra = options.extra;
        let mut cmd = match options.netns {
            Some(ns) => ns.command(&peermirror_bin().to_string_lossy()),
            None => Command::new(peermirror_bin()),
        };
        cmd.arg("run")
            .arg("--containerd-sock")
            .arg(&containerd.socket)
            .arg("--containerd-namespace")
            .arg(&containerd.namespace)
            .arg("--registry-addr")
            .arg(options.registry.to_string())
            .arg("--metrics-addr")
            .arg(options.metrics.to_string())
            .arg("--router-addr")
            .arg(options.router.to_string())
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(extra);
        if !extra.contains(&"--log-level") {
            cmd.args(["--log-level", "debug"]);
        }
        // Tests that do not ask for the dataplane run without it: its default
        // cgroup and pin directory are shared by every daemon on the machine.
        if !extra.contains(&"--dataplane") {
            cmd.args(["--dataplane", "off"]);
        }
        if !extra.contains(&"--psk-file") && !extra.contains(&"--insecure-open-network") {
            let key = dir.join("swarm.key");
            write_psk(&key, &[0x5a; 32])?;
            cmd.arg("--psk-file").arg(key);
        }
        let proc = Proc::spawn("peermirror", cmd, &dir.join("peermirror.log"))?;
        Ok(Peermirror {
            registry: options.registry,
            metrics: options.metrics,
            proc,
            via: options.netns.map(|n| n.via()).unwrap_or_default(),
        })
    }

    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let metrics = self.metrics;
        let proc = &mut self.proc;
        let via = self.via.clone();
        wait_for("peermirror to be ready", timeout, || {
            if !proc.alive() {
                return Some(Err(anyhow::anyhow!("peermirror exited")));
            }
            via.get(metrics, "/readyz", &[])
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| Ok(()))
        })
        .and_then(|r| r)
        .with_context(|| format!("peermirror log:\n{}", self.proc.log_tail(30)))
    }

    /// Waits until [`Self::metric`] of `name`/`parts` satisfies `ok`, and
    /// returns that value; `what` names the wait in the timeout error.
    pub fn wait_metric(
        &self,
        what: &str,
        name: &str,
        parts: &[&str],
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        wait_for(what, timeout, || {
            self.metric(name, parts).ok().filter(|v| ok(*v))
        })
    }

    /// The debug page.
    pub fn debug_page(&self) -> Result<String> {
        let r = self.via.get(self.metrics, "/debug", &[])?;
        if r.status != 200 {
            bail!("/debug answered {}", r.status);
        }
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// The value of a `name: value` line of the debug page.
    pub fn debug_field(&self, name: &str) -> Result<String> {
        let page = self.debug_page()?;
        page.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            })
            .with_context(|| format!("no {name:?} on the debug page:\n{page}"))
    }

    /// This node's libp2p peer id, from its debug page.
    pub fn peer_id(&self) -> Result<String> {
        self.debug_field("peer id")
    }

    /// The first address its P2P port listens on, from its debug page.
    pub fn p2p_addr(&self) -> Result<String> {
        let list = self.debug_field("p2p listening")?;
        list.trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|a| a.trim().trim_matches('"').to_string())
            .find(|a| !a.is_empty())
            .with_context(|| format!("no P2P address in {list:?}"))
    }

    /// The value of a metric line (`name{labels}`), summed over every series
    /// whose name and labels contain all of `parts`.
    pub fn metric(&self, name: &str, parts: &[&str]) -> Result<f64> {
        let r = self.via.get(self.metrics, "/metrics", &[])?;
        if r.status != 200 {
            bail!("/metrics answered {}", r.status);
        }
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let mut sum = 0.0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let base = series.split('{').next().unwrap_or(series);
            if base == name && parts.iter().all(|p| series.contains(p)) {
                sum += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        Ok(sum)
    }

    /// The recent mirrored requests of `/debug/api/requests` (newest last),
    /// as JSON objects (`key`, `outcome`, `peers`, `verified`, …).
    pub fn recent_requests(&self) -> Result<Vec<serde_json::Value>> {
        let r = self.via.get(self.metrics, "/debug/api/requests", &[])?;
        if r.status != 200 {
            bail!("/debug/api/requests answered {}", r.status);
        }
        let api: serde_json::Value = serde_json::from_slice(&r.body)?;
        Ok(api["recent"].as_array().cloned().unwrap_or_default())
    }

    /// The registry addresses of the peers that sent one recent request's
    /// bytes, in order.
    pub fn request_peers(&self, request: &serde_json::Value) -> Vec<String> {
        request["peers"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|p| p["addr"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}
