//! The deployment files do what they say: the systemd unit passes
//! `systemd-analyze verify`, and the environment file, read as systemd would,
//! configures containerd and starts the daemon.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::http;
use peermirror_tests::manifests::{render, repo_file, strings};
use peermirror_tests::process::{Proc, wait_for};
use peermirror_tests::services::{free_port, peermirror_bin, require_root, write_psk};

/// `systemd-analyze verify` of `unit` (with `dropin`, when given, in
/// `<unit>.d/`), the binary paths pointed at the one we built.
fn verify_unit(unit: &str, dropin: Option<&str>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ours = peermirror_bin().to_string_lossy().into_owned();
    let point = |text: String| {
        text.replace("/usr/local/bin/peermirror", &ours)
            .replace("/opt/bin/peermirror", &ours)
    };
    let name = Path::new(unit).file_name().context("unit name")?.to_owned();
    let unit = point(std::fs::read_to_string(repo_file(unit))?);
    let path = dir.path().join(&name);
    std::fs::write(&path, unit)?;
    if let Some(file) = dropin {
        let d = dir.path().join(format!("{}.d", name.to_string_lossy()));
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("opt-bin.conf"),
            point(std::fs::read_to_string(repo_file(file))?),
        )?;
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .context("systemd-analyze (Debian package systemd)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Only lines about our unit matter (the host's own units may be noisy).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("peermirror"))
        .collect();
    ensure!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    Ok(())
}

#[test]
fn the_systemd_unit_verifies_and_starts_before_the_kubelet() -> Result<()> {
    verify_unit("deploy/systemd/peermirror.service", None)?;
    verify_unit(
        "deploy/systemd/peermirror.service",
        Some("deploy/systemd/opt-bin.conf"),
    )?;
    verify_unit("deploy/systemd/peermirror-bootstrapper.service", None)?;
    let unit = std::fs::read_to_string(repo_file("deploy/systemd/peermirror.service"))?;
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    ensure!(
        value("Before").contains(&"kubelet.service".to_string()),
        "not before the kubelet"
    );
    ensure!(
        value("After").contains(&"containerd.service".to_string()),
        "not after containerd"
    );
    let dropin = std::fs::read_to_string(repo_file("deploy/systemd/opt-bin.conf"))?;
    ensure!(dropin.contains("ExecStart=\nExecStart=/opt/bin/peermirror run"));
    // A path the unit may write that is missing on a host does not fail it.
    for unit in [
        "deploy/systemd/peermirror.service",
        "deploy/systemd/k3s/peermirror.service",
    ] {
        let text = std::fs::read_to_string(repo_file(unit))?;
        let paths = unit_values(&text, "ReadWritePaths");
        ensure!(!paths.is_empty(), "{unit}: no ReadWritePaths");
        ensure!(
            paths.iter().all(|p| p.starts_with('-')),
            "{unit}: ReadWritePaths not optional: {paths:?}"
        );
    }
    Ok(())
}

/// The values of `key=` lines of a unit, split on whitespace.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

#[test]
fn the_k3s_unit_verifies_and_orders_after_k3s() -> Result<()> {
    verify_unit("deploy/systemd/k3s/peermirror.service", None)?;
    let unit = std::fs::read_to_string(repo_file("deploy/systemd/k3s/peermirror.service"))?;
    let after = unit_values(&unit, "After");
    for k3s in ["k3s.service", "k3s-agent.service"] {
        ensure!(after.iter().any(|u| u == k3s), "not after {k3s}: {after:?}");
    }
    // K3s has no containerd.service or kubelet.service of its own, and owns
    // certs.d: configure-containerd runs in K3s mode.
    ensure!(!unit.contains("containerd.service") && !unit.contains("kubelet.service"));
    let env = env_file(&repo_file("deploy/systemd/k3s/peermirror.env"))?;
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    ensure!(get("PEERMIRROR_CONTAINERD_SOCK") == Some("/run/k3s/containerd/containerd.sock"));
    ensure!(get("PEERMIRROR_K3S_REGISTRIES_YAML") == Some("/etc/rancher/k3s/registries.yaml"));
    ensure!(
        get("PEERMIRROR_CONTAINERD_CONTENT_PATH")
            == Some("/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content")
    );
    Ok(())
}

/// The `KEY=value` lines of an environment file.
fn env_file(path: &Path) -> Result<Vec<(String, String)>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

#[test]
fn the_environment_file_configures_containerd_and_starts_the_daemon() -> Result<()> {
    require_root();
    let dir = tempfile::tempdir()?;
    let mut env = env_file(&repo_file("deploy/systemd/peermirror.env"))?;
    ensure!(
        env.iter().all(|(k, _)| k.starts_with("PEERMIRROR_")),
        "{env:?}"
    );
    // Point the file-system and network settings somewhere harmless.
    let key = dir.path().join("swarm.key");
    write_psk(&key, &[9; 32])?;
    let (registry, metrics, router) = (free_port(), free_port(), free_port());
    let overrides = [
        ("PEERMIRROR_PSK_FILE", key.to_string_lossy().into_owned()),
        ("PEERMIRROR_REGISTRY_ADDR", format!("127.0.0.1:{registry}")),
        ("PEERMIRROR_METRICS_ADDR", format!("127.0.0.1:{metrics}")),
        ("PEERMIRROR_ROUTER_ADDR", format!("127.0.0.1:{router}")),
        (
            "PEERMIRROR_STATIC_BOOTSTRAP_PEERS",
            format!("/ip4/127.0.0.1/tcp/{}", free_port()),
        ),
        (
            "PEERMIRROR_DATA_DIR",
            dir.path().join("state").to_string_lossy().into_owned(),
        ),
        (
            "PEERMIRROR_CONTAINERD_SOCK",
            dir.path()
                .join("no-containerd.sock")
                .to_string_lossy()
                .into_owned(),
        ),
        (
            "PEERMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH",
            dir.path().join("certs.d").to_string_lossy().into_owned(),
        ),
        (
            "PEERMIRROR_CONTAINERD_CONFIG",
            dir.path()
                .join("config.toml")
                .to_string_lossy()
                .into_owned(),
        ),
        // The machine's shared default pins and cgroup are not this test's.
        ("PEERMIRROR_DATAPLANE", "off".to_string()),
    ];
    for (k, v) in overrides {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v));
    }

    // ExecStartPre.
    let out = Command::new(peermirror_bin())
        .arg("configure-containerd")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    ensure!(
        out.status.success(),
        "configure-containerd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for registry in ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"] {
        let text =
            std::fs::read_to_string(dir.path().join("certs.d").join(registry).join("hosts.toml"))?;
        ensure!(
            text.contains("[host.\"http://127.0.0.1:5000\"]"),
            "{registry}: {text}"
        );
    }
    // No containerd config here: the user is told, in words.
    ensure!(String::from_utf8_lossy(&out.stderr).contains("config_path"));

    // ExecStart: starts, serves its status port, says what it waits for,
    // and stops cleanly on SIGTERM.
    let mut cmd = Command::new(peermirror_bin());
    cmd.arg("run")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    let mut proc = Proc::spawn("peermirror", cmd, &dir.path().join("pm.log"))?;
    let metrics_addr = format!("127.0.0.1:{metrics}").parse()?;
    let ready = wait_for("the status port", Duration::from_secs(10), || {
        http::get(metrics_addr, "/readyz", &[]).ok()
    })?;
    ensure!(ready.status == 503, "ready without containerd or peers");
    let body = String::from_utf8_lossy(&ready.body);
    ensure!(
        body.contains("containerd") && body.contains("bootstrap"),
        "{body}"
    );
    let (status, _) = proc.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "{status}");
    Ok(())
}

/// The peermirror invocations of a rendered DaemonSet: command plus args,
/// the node IP filled in as the downward API would.
fn invocations(docs: &[serde_json::Value]) -> Vec<Vec<String>> {
    docs.iter()
        .filter(|d| d["kind"] == "DaemonSet")
        .flat_map(|d| {
            let spec = &d["spec"]["template"]["spec"];
            let mut all = strings_of(&spec["initContainers"]);
            all.extend(strings_of(&spec["containers"]));
            all
        })
        .map(|c| {
            let mut argv = strings(&c["command"]);
            argv.extend(strings(&c["args"]));
            argv.iter()
                .map(|a| a.replace("$(NODE_IP)", "10.0.0.5"))
                .collect()
        })
        .filter(|argv: &Vec<String>| argv.first().is_some_and(|p| p == "peermirror"))
        .collect()
}

fn strings_of(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// `kubernetes-validate --strict` of a rendered file.
fn validate(path: &Path, what: &str) -> Result<()> {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(path)
        .output()
        .context("kubernetes-validate (PyPI; cargo xtask test installs it)")?;
    ensure!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The uninstall DaemonSets (containerd's and K3s's paths) render, pass
/// `kubernetes-validate --strict`, and run `peermirror uninstall` with
/// flags it accepts, on the paths the install used.
#[test]
fn the_uninstall_manifests_render_validate_and_use_real_flags() -> Result<()> {
    use peermirror::cli::{Cli, Command as Sub};
    for (kustomization, k3s) in [("uninstall", false), ("uninstall-k3s", true)] {
        let (path, docs, _dir) = render(kustomization)?;
        validate(&path, kustomization)?;
        let argvs = invocations(&docs);
        ensure!(argvs.len() == 1, "{kustomization}: {argvs:?}");
        let cli = <Cli as clap::Parser>::try_parse_from(&argvs[0])
            .map_err(|e| anyhow::anyhow!("{kustomization}: {e}"))?;
        let Sub::Uninstall(u) = cli.command else {
            anyhow::bail!("{kustomization}: not `peermirror uninstall`");
        };
        ensure!(
            u.wait,
            "{kustomization}: exits, and the DaemonSet restarts it"
        );
        ensure!(
            u.cleanup.k3s_registries_yaml.is_some() == k3s,
            "{kustomization}"
        );
        let volumes = &docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet")
            .context("no DaemonSet")?["spec"]["template"]["spec"]["volumes"];
        let certs = strings_of(volumes)
            .into_iter()
            .find(|v| v["name"] == "certs-d")
            .context("no certs.d volume")?;
        let want = if k3s {
            "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
        } else {
            "/etc/containerd/certs.d"
        };
        ensure!(
            certs["hostPath"]["path"] == want,
            "{kustomization}: {certs}"
        );
    }
    Ok(())
}

/// Each overlay (plain, mtls, dataplane-off, k3s) renders, passes
/// `kubernetes-validate --strict`, and runs peermirror with flags it
/// accepts, in the mode the overlay names.
#[test]
fn the_kubernetes_overlays_render_validate_and_use_real_flags() -> Result<()> {
    use peermirror::cli::{Cli, Command as Sub};
    use peermirror_dataplane::DataplaneMode;
    for overlay in ["plain", "mtls", "dataplane-off", "k3s"] {
        let (path, docs, _dir) = render(&format!("overlays/{overlay}"))?;
        validate(&path, overlay)?;
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        ensure!(
            kinds == ["Namespace", "Service", "DaemonSet"],
            "{overlay}: {kinds:?}"
        );
        // No file is created on a host that lacks it (an empty config.toml
        // on K3s hosts), and K3s's paths replace containerd's.
        for ds in docs.iter().filter(|d| d["kind"] == "DaemonSet") {
            for v in strings_of(&ds["spec"]["template"]["spec"]["volumes"]) {
                let host = &v["hostPath"];
                ensure!(host["type"] != "FileOrCreate", "{overlay}: {v}");
                if overlay == "k3s" {
                    let path = host["path"].as_str().unwrap_or("");
                    ensure!(
                        !path.starts_with("/etc/containerd")
                            && !path.starts_with("/run/containerd")
                            && !path.starts_with("/var/lib/containerd"),
                        "{overlay}: {v}"
                    );
                }
            }
        }
        let argvs = invocations(&docs);
        ensure!(argvs.len() == 2, "{overlay}: {argvs:?}");
        for argv in argvs {
            let cli = <Cli as clap::Parser>::try_parse_from(&argv)
                .map_err(|e| anyhow::anyhow!("{overlay}: {argv:?}: {e}"))?;
            match cli.command {
                Sub::Run(run) => {
                    let config = run
                        .into_config()
                        .map_err(|e| anyhow::anyhow!("{overlay}: {e}"))?;
                    let want = match overlay {
                        "dataplane-off" => DataplaneMode::Off,
                        _ => DataplaneMode::Optional,
                    };
                    ensure!(
                        config.dataplane.mode == want,
                        "{overlay}: dataplane {:?}",
                        config.dataplane.mode
                    );
                    ensure!(
                        config.tls.is_some() == (overlay == "mtls"),
                        "{overlay}: mTLS"
                    );
                }
                Sub::ConfigureContainerd(c) => {
                    let https = c.mirror_targets.iter().all(|t| t.starts_with("https://"));
                    ensure!(
                        https == (overlay == "mtls"),
                        "{overlay}: {:?}",
                        c.mirror_targets
                    );
                    ensure!(c.mirror_tls_ca.is_some() == (overlay == "mtls"));
                    ensure!(
                        c.k3s_registries_yaml.is_some() == (overlay == "k3s"),
                        "{overlay}: K3s mode"
                    );
                }
                other => anyhow::bail!("{overlay}: unexpected {other:?}"),
            }
        }
    }
    Ok(())
}

/// The Grafana dashboard imports as is: a Prometheus datasource variable
/// that every panel and query uses, and a query in every panel. (Grafana is
/// not packaged here; `observe.rs` runs every query against Prometheus.)
#[test]
fn the_dashboard_is_importable_and_every_panel_queries() -> Result<()> {
    let text = std::fs::read_to_string(repo_file("deploy/grafana/peermirror.json"))?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    ensure!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let vars = dashboard["templating"]["list"]
        .as_array()
        .context("no templating variables")?;
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .context("no Prometheus datasource variable")?;
    let uid = format!("${{{}}}", ds["name"].as_str().context("unnamed variable")?);
    let panels = dashboard["panels"].as_array().context("no panels")?;
    ensure!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = std::collections::HashSet::new();
    for p in panels {
        let title = p["title"].as_str().context("a panel without a title")?;
        ensure!(ids.insert(p["id"].as_u64()), "{title}: duplicate panel id");
        ensure!(
            p["datasource"]["uid"] == uid.as_str(),
            "{title}: not on {uid}"
        );
        let targets = p["targets"].as_array().context("no targets")?;
        ensure!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = t["expr"].as_str().context("a target without expr")?;
            ensure!(!expr.trim().is_empty(), "{title}: empty expr");
            ensure!(
                t["datasource"]["uid"] == uid.as_str(),
                "{title}: a target not on {uid}"
            );
            ensure!(t["refId"].is_string(), "{title}: a target without refId");
        }
    }
    // What the issue's operators asked to see.
    for needed in [
        "peermirror_mirror_requests_total",
        "peermirror_served_bytes_total",
        "peermirror_peer_bytes_total",
        "peermirror_mirror_resolve_duration_seconds_bucket",
        "peermirror_p2p_connected_peers",
        "peermirror_p2p_routing_table_peers",
        "peermirror_advertised_keys",
        "peermirror_upload_rejections_total",
        "peermirror_dataplane_dropped_packets_total",
        "peermirror_tls_handshake_failures_total",
        "peermirror_p2p_handshake_failures_total",
    ] {
        ensure!(
            text.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    Ok(())
}

/// The alert rules load, and their unit tests (series that fire and series
/// that stay quiet) pass.
#[test]
fn the_alert_rules_check_and_pass_their_tests() -> Result<()> {
    let dir = repo_file("deploy/prometheus");
    for args in [
        vec!["check", "rules", "peermirror-rules.yaml"],
        vec!["test", "rules", "peermirror-rules.test.yaml"],
    ] {
        let out = Command::new(peermirror_tests::prometheus::PROMTOOL)
            .args(&args)
            .current_dir(&dir)
            .output()
            .context("promtool (Debian's prometheus) is not installed")?;
        ensure!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// K3s's `registries.yaml` as `configure-containerd` reads it: a good file
/// writes one `hosts.toml` per registry with its endpoints after peermirror;
/// a malformed or unsupported one is a clear error and nothing is written.
#[test]
fn configure_containerd_reads_a_k3s_registries_yaml() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs.d");
    let configure = |yaml: &Path| {
        Command::new(peermirror_bin())
            .arg("configure-containerd")
            .arg("--containerd-registry-config-path")
            .arg(&certs)
            .arg("--containerd-config")
            .arg(dir.path().join("no-config.toml"))
            .arg("--registries-yaml")
            .arg(yaml)
            .output()
    };
    for (name, text, wanted) in [
        (
            "list.yaml",
            "mirrors: [docker.io]\n",
            "not a registries.yaml",
        ),
        (
            "typo.yaml",
            "mirrors:\n  docker.io:\n    endpoints: [https://x]\n",
            "endpoints",
        ),
        (
            "rewrite.yaml",
            "mirrors:\n  docker.io:\n    rewrite:\n      \"^a/(.*)\": \"b/$1\"\n",
            "rewrite",
        ),
        ("empty.yaml", "", "no registries"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        let out = configure(&path)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{name} was accepted");
        ensure!(
            stderr.contains(wanted) && !stderr.contains("panicked"),
            "{name}: {stderr}"
        );
        ensure!(!certs.exists(), "{name}: something was written");
    }
    let missing = configure(&dir.path().join("absent.yaml"))?;
    ensure!(!missing.status.success() && !certs.exists());

    let good = dir.path().join("registries.yaml");
    std::fs::write(
        &good,
        "mirrors:\n  docker.io:\n  registry.example.com:\n    endpoint:\n      - https://mirror.example.com:5000\nconfigs:\n  mirror.example.com:5000:\n    auth: {username: u, password: p}\n",
    )?;
    let out = configure(&good)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr)
            .contains("credentials for mirror.example.com:5000 are not written")
    );
    let example = std::fs::read_to_string(certs.join("registry.example.com/hosts.toml"))?;
    let ours = example
        .find("[host.\"http://127.0.0.1:5000\"]")
        .context("peermirror's entry")?;
    let theirs = example
        .find("[host.\"https://mirror.example.com:5000\"]")
        .context("the listed endpoint")?;
    ensure!(ours < theirs, "{example}");
    ensure!(example.contains("server = \"https://registry.example.com\""));
    ensure!(example.contains("dial_timeout = \"2s\""), "{example}");
    ensure!(!example.contains("password"));
    ensure!(certs.join("docker.io/hosts.toml").exists());
    Ok(())
}

/// The commands of other tools the README shows are checked statically
/// (they need a cluster or a host to run): every `deploy/…` path it names
/// exists, every `kubectl … -k <dir>` names a kustomization that renders
/// and passes `kubernetes-validate --strict`, every
/// `rollout status daemonset/<name>` in `-n <namespace>` names a DaemonSet
/// of a kustomization it applies, and every systemd unit it installs passes
/// `systemd-analyze verify` (above). The `peermirror` commands it shows are
/// run or parsed by the other tests.
#[test]
fn the_readme_s_commands_of_other_tools_name_real_things() -> Result<()> {
    let readme = std::fs::read_to_string(repo_file("README.md"))?;
    let mut shell = Vec::new();
    let mut inside = false;
    for line in readme.lines() {
        let t = line.trim();
        if let Some(lang) = t.strip_prefix("```") {
            inside = !inside && (lang == "sh" || lang == "bash");
            continue;
        }
        if inside {
            shell.push(t.split(" #").next().unwrap_or_default().trim().to_string());
        }
    }
    let mut applied = Vec::new();
    let mut checked = 0;
    for line in &shell {
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in &words {
            if let Some(path) = w.strip_prefix("deploy/") {
                ensure!(repo_file(&format!("deploy/{path}")).exists(), "{line}");
                checked += 1;
            }
        }
        if words.first() == Some(&"kubectl")
            && let Some(i) = words.iter().position(|w| *w == "-k")
        {
            let dir = words.get(i + 1).context("-k without a directory")?;
            let kustomization = dir
                .strip_prefix("deploy/kubernetes/")
                .with_context(|| format!("{line}: not one of ours"))?;
            let (path, docs, _dir) = render(kustomization)?;
            validate(&path, kustomization)?;
            applied.extend(docs);
            checked += 1;
        }
        if let Some(i) = words.iter().position(|w| *w == "rollout") {
            let ns = words
                .iter()
                .position(|w| *w == "-n")
                .and_then(|n| words.get(n + 1))
                .context("rollout without -n")?;
            let name = words
                .get(i + 2)
                .and_then(|w| w.strip_prefix("daemonset/"))
                .context("rollout status of something else")?;
            ensure!(
                applied.iter().any(|d| d["kind"] == "DaemonSet"
                    && d["metadata"]["name"] == *name
                    && d["metadata"]["namespace"] == *ns),
                "{line}: no such DaemonSet in what the README applies"
            );
            checked += 1;
        }
    }
    ensure!(checked >= 8, "only {checked} commands checked");
    Ok(())
}
