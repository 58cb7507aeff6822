//! A real Prometheus server (Debian's `prometheus`) started by a test in a
//! network namespace, scraping the given targets every second, and a client
//! of its HTTP API.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::http::Via;
use crate::netns::Netns;
use crate::process::{Proc, wait_for};

pub const BIN: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

pub struct Prometheus {
    pub addr: SocketAddr,
    via: Via,
    pub proc: Proc,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, listening on `addr`, scraping `targets`
    /// (job `peermirror`) every second.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        dir: &Path,
        targets: &[SocketAddr],
    ) -> Result<Prometheus> {
        std::fs::create_dir_all(dir)?;
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: peermirror\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )?;
        let mut cmd = ns.command(BIN);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut proc = Proc::spawn("prometheus", cmd, &dir.join("prometheus.log"))?;
        let via = ns.via();
        wait_for("prometheus to be ready", Duration::from_secs(30), || {
            if !proc.alive() {
                return Some(Err(anyhow::anyhow!("prometheus exited")));
            }
            via.get(addr, "/-/ready", &[])
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| Ok(()))
        })
        .and_then(|r| r)
        .with_context(|| format!("prometheus log:\n{}", proc.log_tail(20)))?;
        Ok(Prometheus { addr, via, proc })
    }

    /// `GET /api/v1/<path>`: its `data`.
    pub fn api(&self, path_and_query: &str) -> Result<Value> {
        let r = self
            .via
            .get(self.addr, &format!("/api/v1/{path_and_query}"), &[])?;
        let v: Value = serde_json::from_slice(&r.body)
            .with_context(|| format!("{path_and_query}: answer is not JSON"))?;
        if r.status != 200 || v["status"] != "success" {
            bail!("{path_and_query} answered {}: {v}", r.status);
        }
        Ok(v["data"].clone())
    }

    /// An instant query: the result's series.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let data = self.api(&format!("query?query={q}"))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a one-series query, summed when there are several.
    pub fn value(&self, expr: &str) -> Result<f64> {
        let series = self.query(expr)?;
        let mut sum = 0.0;
        for s in &series {
            let v = s["value"][1].as_str().context("no value")?;
            sum += v.parse::<f64>().context("value is not a number")?;
        }
        Ok(sum)
    }
}
