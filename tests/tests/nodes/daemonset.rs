//! The container image, run as the DaemonSet runs it: the image built by
//! `cargo xtask image` is imported into a test node's containerd and started
//! with `ctr run`, with the command, arguments, environment, mounts,
//! privileges and host network read from the rendered kustomize DaemonSet
//! (`kubectl kustomize deploy/kubernetes/overlays/plain`), `$(VAR)`
//! expanded as the kubelet does. The init container's
//! `configure-containerd` runs first the same way; then an image imported
//! on that node only is pulled by another node, served by the container.
//!
//! What the test does where a kubelet and a cluster would, listed:
//! - each `hostPath` volume is the test node's own path (its certs.d,
//!   containerd directory, socket and content store, a state directory,
//!   an empty directory for bpffs), the Secret a directory holding the key;
//! - the headless Service's name is served to the node through the
//!   container's `/etc/hosts` (what the cluster DNS would answer: both
//!   nodes' addresses);
//! - `status.hostIP` is the node's address, and the host network the
//!   node's network namespace;
//! - the probes are polled on the node's address.
//!
//! No argument of the DaemonSet is changed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use peermirror_tests::cluster::{Cluster, ClusterNode, NodeSpec};
use peermirror_tests::image::layer;
use peermirror_tests::manifests::{render, repo_file, strings};
use peermirror_tests::process::wait_for;
use serde_json::Value;

const KEY: [u8; 32] = [0x4b; 32];
const SERVICE: &str = "peermirror-bootstrap.peermirror.svc.cluster.local";

/// The archive `cargo xtask image` wrote (or `PEERMIRROR_IMAGE`).
fn image_archive() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PEERMIRROR_IMAGE") {
        return Ok(PathBuf::from(p));
    }
    let manifest = std::fs::read_to_string(repo_file("userspace/Cargo.toml"))?;
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        .context("the daemon's version")?;
    let path = repo_file(&format!("target/image/peermirror-{version}.oci.tar"));
    ensure!(
        path.exists(),
        "no image at {}: build it with `cargo xtask image` (`cargo xtask test` does)",
        path.display()
    );
    Ok(path)
}

/// `$(NAME)` replaced by the value of `NAME` in `env`, as the kubelet
/// expands command and args (`$$` stays a literal `$`).
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
            && let Some((_, value)) = env.iter().find(|(k, _)| k == &body[..end])
        {
            out.push_str(value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// One container of the pod, as `ctr run` starts it.
struct Container {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    /// `type=bind,src=…,dst=…,options=rbind:ro|rw`.
    mounts: Vec<String>,
    privileged: bool,
    read_only: bool,
}

/// The pod's containers (init first) from the rendered DaemonSet, with each
/// volume mapped by `host_path` and the node's IP as `status.hostIP`.
fn containers(
    daemonset: &Value,
    node_ip: &str,
    host_path: &dyn Fn(&str, &Value) -> Result<PathBuf>,
) -> Result<(bool, Vec<Container>)> {
    let spec = &daemonset["spec"]["template"]["spec"];
    let host_network = spec["hostNetwork"] == true;
    let volumes = spec["volumes"].as_array().context("volumes")?;
    let source = |name: &str| -> Result<PathBuf> {
        let v = volumes
            .iter()
            .find(|v| v["name"] == name)
            .with_context(|| format!("no volume {name}"))?;
        let path = host_path(name, v)?;
        check_host_path_type(&path, v["hostPath"]["type"].as_str())
            .with_context(|| format!("volume {name}"))?;
        Ok(path)
    };
    let mut out = Vec::new();
    let pods = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten());
    for c in pods {
        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().context("env name")?.to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP" {
                node_ip.to_string()
            } else {
                bail!("an env value the test cannot fill: {e}");
            };
            env.push((name, value));
        }
        let mut argv = strings(&c["command"]);
        argv.extend(strings(&c["args"]));
        let argv = argv.iter().map(|a| expand(a, &env)).collect();
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().context("mount name")?;
            let dst = m["mountPath"].as_str().context("mountPath")?;
            let mode = if m["readOnly"] == true { "ro" } else { "rw" };
            mounts.push(format!(
                "type=bind,src={},dst={dst},options=rbind:{mode}",
                source(name)?.display()
            ));
        }
        let security = &c["securityContext"];
        out.push(Container {
            argv,
            env,
            mounts,
            privileged: security["privileged"] == true,
            read_only: security["readOnlyRootFilesystem"] == true,
        });
    }
    Ok((host_network, out))
}

/// What the kubelet checks (or creates) for a `hostPath` volume's type
/// before it starts the pod.
fn check_host_path_type(path: &Path, kind: Option<&str>) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path);
    match kind {
        None | Some("") => Ok(()),
        Some("DirectoryOrCreate") => Ok(std::fs::create_dir_all(path)?),
        Some("Directory") => {
            ensure!(
                meta.is_ok_and(|m| m.is_dir()),
                "{} is not a directory",
                path.display()
            );
            Ok(())
        }
        Some("Socket") => {
            ensure!(
                meta.is_ok_and(|m| m.file_type().is_socket()),
                "{} is not a socket",
                path.display()
            );
            Ok(())
        }
        Some("File") => {
            ensure!(
                meta.is_ok_and(|m| m.is_file()),
                "{} is not a file",
                path.display()
            );
            Ok(())
        }
        Some(other) => bail!("a hostPath type the test does not check: {other}"),
    }
}

/// A container started with `ctr run -d`; killed and deleted when dropped.
struct Running<'a> {
    node: &'a ClusterNode,
    id: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self
            .node
            .containerd
            .ctr(&["tasks", "kill", "--signal", "SIGKILL", &self.id]);
        let _ = wait_for("the container to stop", Duration::from_secs(10), || {
            self.node
                .containerd
                .ctr(&["tasks", "delete", &self.id])
                .ok()
        });
        let _ = self
            .node
            .containerd
            .ctr(&["containers", "delete", &self.id]);
    }
}

/// `ctr run` arguments for `c` on `node`. The pod's host network is the
/// node's network namespace, joined with `--with-ns` (ctr's `--net-host`
/// would also mount the machine's own `/etc/hosts` and `resolv.conf` over
/// the pod's).
fn run_args(
    c: &Container,
    node: &ClusterNode,
    host_network: bool,
    extra_mounts: &[String],
) -> Vec<String> {
    let mut args = Vec::new();
    if c.privileged {
        args.push("--privileged".to_string());
    }
    if host_network {
        args.extend([
            "--with-ns".to_string(),
            format!("network:{}", node.host.ns.path().display()),
        ]);
    }
    if c.read_only {
        args.push("--read-only".to_string());
    }
    for (k, v) in &c.env {
        args.extend(["--env".to_string(), format!("{k}={v}")]);
    }
    for m in c.mounts.iter().chain(extra_mounts) {
        args.extend(["--mount".to_string(), m.clone()]);
    }
    args
}

#[test]
fn the_image_runs_as_the_daemonset_says_and_serves_an_air_gapped_pull() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let archive = image_archive()?;
    let (_, docs, _render_dir) = render("overlays/plain")?;
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")?;
    let image = daemonset["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .context("image")?
        .to_string();

    // Node b pulls by tag an image that only node a holds: an air-gapped
    // node, answering a tag from one holder (`--tag-resolution
    // single-holder`; the container on a serves whoever asks).
    let mut cluster = Cluster::start(&[
        NodeSpec::new("a", KEY, &[]),
        NodeSpec::new("b", KEY, &["--tag-resolution", "single-holder"]),
    ])?;
    cluster.wait_ready(&["a", "b"], Duration::from_secs(60))?;
    // An image for node a only, never in any registry, named under one of
    // the DaemonSet's registries.
    let only_a =
        cluster
            .layout
            .add_image("peermirror-test/only-on-a", "v1", &[layer(3 << 20, true)])?;
    cluster.layout.finish()?;
    let reference = format!("docker.io/{}:{}", only_a.repo, only_a.tag);
    let oci_tar = cluster.dir.path().join("only-a.tar");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--preserve-digests"])
        .arg(format!(
            "oci:{}:{}",
            cluster.layout.dir.display(),
            only_a.tag
        ))
        .arg(format!("oci-archive:{}:{reference}", oci_tar.display()))
        .output()?;
    ensure!(out.status.success(), "skopeo: {out:?}");
    // Node a runs peermirror as a container instead: its process goes, and
    // containerd's files are put back as they were before any install.
    {
        let a = cluster.node_mut("a");
        if let Some(mut pm) = a.peermirror.take() {
            pm.proc.terminate(Duration::from_secs(15))?;
        }
        let out = std::process::Command::new(peermirror_tests::services::peermirror_bin())
            .arg("cleanup-containerd")
            .arg("--containerd-registry-config-path")
            .arg(&a.certs_d)
            .output()?;
        ensure!(out.status.success(), "{out:?}");
    }
    // One way onto a cluster, as the README shows: the archive pushed to a
    // registry with skopeo (both platforms), and pulled from there.
    let pushed = format!("{}/peermirror:0.1.0", cluster.upstream.host());
    let mut push = cluster.upstream.command("skopeo");
    push.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{pushed}"));
    peermirror_tests::process::run(&mut push)?;
    let mut inspect = cluster.upstream.command("skopeo");
    inspect
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{pushed}"));
    let index: Value = serde_json::from_str(&peermirror_tests::process::run(&mut inspect)?)?;
    let mut platforms: Vec<String> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or("?"),
                m["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    platforms.sort();
    ensure!(platforms == ["linux/amd64", "linux/arm64"], "{platforms:?}");
    cluster.node("b").ctr_pull(&pushed)?;

    let a = cluster.node("a");
    let b = cluster.node("b");
    // Node b sends docker.io to its peermirror too.
    let out = std::process::Command::new(peermirror_tests::services::peermirror_bin())
        .arg("configure-containerd")
        .arg("--containerd-registry-config-path")
        .arg(&b.certs_d)
        .args([
            "--mirrored-registries",
            &format!("{},docker.io", cluster.upstream.host()),
            "--prepend-existing",
            "--containerd-config",
        ])
        .arg(b.containerd.dir.join("config.toml"))
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    a.containerd
        .ctr(&["images", "import", &archive.to_string_lossy()])?;
    let names = a.containerd.ctr(&["images", "ls", "--quiet"])?;
    ensure!(
        names.lines().any(|l| l == image),
        "the archive does not name {image}: {names}"
    );

    // The volumes, on the test node.
    let var_lib = a.dir.join("var-lib");
    let state = var_lib.join("peermirror");
    let bpffs = a.dir.join("bpffs");
    let secret = a.dir.join("secret");
    for d in [&state, &bpffs, &secret] {
        std::fs::create_dir_all(d)?;
    }
    peermirror_tests::services::write_psk(&secret.join("swarm.key"), &KEY)?;
    let host_path = |name: &str, volume: &Value| -> Result<PathBuf> {
        let path: &Path = match name {
            "certs-d" => &a.certs_d,
            "containerd-etc" => &a.containerd.dir,
            "containerd-sock" => &a.containerd.socket,
            "containerd-content" => return Ok(a.containerd.content_root()),
            "state" => &state,
            // The uninstall DaemonSet's: the parent of the data directory.
            "var-lib" => &var_lib,
            "bpffs" => &bpffs,
            "psk" => {
                ensure!(volume["secret"]["secretName"] == "peermirror-psk");
                &secret
            }
            other => bail!("a volume the test does not map: {other} ({volume})"),
        };
        Ok(path.to_path_buf())
    };
    let (host_network, pod) = containers(daemonset, &a.ip().to_string(), &host_path)?;
    ensure!(host_network, "the DaemonSet is not on the host network");
    ensure!(pod.len() == 2, "init container and daemon: {}", pod.len());
    // What the cluster DNS would answer for the headless Service.
    let hosts = a.dir.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1 localhost\n{} {SERVICE}\n{} {SERVICE}\n",
            a.ip(),
            b.ip()
        ),
    )?;
    let dns = vec![format!(
        "type=bind,src={},dst=/etc/hosts,options=rbind:ro",
        hosts.display()
    )];

    let before_install = peermirror_tests::k3s::snapshot(&a.certs_d)?;

    // The init container: configure-containerd, to completion.
    let init = &pod[0];
    let mut args = vec!["run".to_string(), "--rm".to_string()];
    args.extend(run_args(init, a, host_network, &dns));
    args.extend([image.clone(), "pm-init".to_string()]);
    args.extend(init.argv.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let said = a.containerd.ctr(&refs)?;
    ensure!(said.contains("wrote"), "configure-containerd: {said}");
    let default = std::fs::read_to_string(a.certs_d.join("docker.io/hosts.toml"))?;
    ensure!(
        default.contains("[host.\"http://127.0.0.1:5000\"]"),
        "{default}"
    );

    // The daemon, detached, as the kubelet leaves it running.
    let daemon = &pod[1];
    let daemon_log = a.dir.join("pm-daemon.log");
    let mut args = vec![
        "run".to_string(),
        "--detach".to_string(),
        "--log-uri".to_string(),
        format!("file://{}", daemon_log.display()),
    ];
    args.extend(run_args(daemon, a, host_network, &dns));
    args.extend([image.clone(), "pm-daemon".to_string()]);
    args.extend(daemon.argv.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    a.containerd.ctr(&refs)?;
    let running = Running {
        node: a,
        id: "pm-daemon".into(),
    };
    // The probes, on the node's address.
    let metrics = SocketAddr::from((a.ip(), 9090));
    let via = a.host.ns.via();
    wait_for("the readiness probe", Duration::from_secs(60), || {
        via.get(metrics, "/readyz", &[])
            .ok()
            .filter(|r| r.status == 200)
    })
    .with_context(|| {
        format!(
            "the container's readiness: {:?}",
            via.get(metrics, "/readyz", &[])
                .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        )
    })?;
    ensure!(via.get(metrics, "/healthz", &[])?.status == 200);
    // No bpffs in the container's /sys/fs/bpf (an empty host directory):
    // the daemon mounted one, and said so.
    let log = std::fs::read_to_string(&daemon_log)?;
    ensure!(
        log.contains("no bpf filesystem was mounted: mounted one"),
        "{log}"
    );

    // The image only a holds (imported there, as an air-gapped node's
    // images are): node b pulls it, and a's container serves it.
    let out = std::process::Command::new(peermirror_tests::services::peermirror_bin())
        .arg("import")
        .arg("--containerd-sock")
        .arg(&a.containerd.socket)
        .arg(&oci_tar)
        .output()?;
    ensure!(out.status.success(), "import: {out:?}");
    let served = |what| {
        via.get(metrics, "/metrics", &[]).map(|r| {
            String::from_utf8_lossy(&r.body)
                .lines()
                .filter(|l| l.starts_with(what))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>()
        })
    };
    let before = served("peermirror_served_bytes_total")?;
    let tail = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    wait_for(
        "b to pull what only a's container holds",
        Duration::from_secs(60),
        || b.ctr_pull(&reference).ok(),
    )
    .with_context(|| {
        let debug = |addr| {
            via.get(addr, "/debug", &[])
                .map(|r| String::from_utf8_lossy(&r.body).into_owned())
                .unwrap_or_default()
        };
        format!(
            "a's container:\n{}\n{}\nb's peermirror:\n{}\n{}",
            tail(&daemon_log),
            debug(metrics),
            b.pm().proc.log_tail(40),
            debug(b.pm().metrics)
        )
    })?;
    b.assert_has(&cluster.layout, &only_a)?;
    let after = served("peermirror_served_bytes_total")?;
    ensure!(
        after - before >= (3 << 20) as f64,
        "a's container served {} bytes",
        after - before
    );
    ensure!(
        state.join("identity.key").exists(),
        "no state in {}",
        state.display()
    );

    // Uninstall as the README says: the pod goes, then the uninstall
    // DaemonSet's container runs on the node and leaves it as it was.
    drop(running);
    let (_, docs, _uninstall_dir) = render("uninstall")?;
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no uninstall DaemonSet")?;
    let (host_network, pod) = containers(daemonset, &a.ip().to_string(), &host_path)?;
    ensure!(pod.len() == 1, "{}", pod.len());
    let mut args = vec!["run".to_string(), "--detach".to_string()];
    args.extend(run_args(&pod[0], a, host_network, &[]));
    args.extend([image.clone(), "pm-uninstall".to_string()]);
    args.extend(pod[0].argv.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    a.containerd.ctr(&refs)?;
    let _uninstall = Running {
        node: a,
        id: "pm-uninstall".into(),
    };
    wait_for("the uninstall container", Duration::from_secs(30), || {
        (peermirror_tests::k3s::snapshot(&a.certs_d).ok()? == before_install && !state.exists())
            .then_some(())
    })
    .with_context(|| {
        format!(
            "certs.d: {:?}, state there: {}",
            peermirror_tests::k3s::snapshot(&a.certs_d).map(|m| m.into_keys().collect::<Vec<_>>()),
            state.exists()
        )
    })?;
    // It stays running, as a DaemonSet's pod must to count as rolled out.
    let tasks = a.containerd.ctr(&["tasks", "ls"])?;
    ensure!(
        tasks
            .lines()
            .any(|l| l.starts_with("pm-uninstall") && l.contains("RUNNING")),
        "{tasks}"
    );
    Ok(())
}
