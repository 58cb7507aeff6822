//! Headless Chromium driven through ChromeDriver's WebDriver protocol (plain
//! HTTP and JSON), inside a test network namespace: the browser reaches the
//! node's status port on its loopback, as an operator on the node would.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::http::Via;
use crate::netns::Netns;
use crate::process::{Proc, wait_for};

/// The key WebDriver names element references with.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    via: Via,
    driver_addr: SocketAddr,
    session: Option<String>,
    driver: Proc,
}

/// Whether Debian's chromium and chromium-driver are installed.
pub fn available() -> bool {
    Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists()
}

impl Browser {
    /// Starts ChromeDriver in `ns` on `port` and opens a headless Chromium
    /// session with a fresh profile under `dir`.
    pub fn start(ns: &Netns, port: u16, dir: &Path) -> Result<Browser> {
        std::fs::create_dir_all(dir)?;
        let mut cmd = ns.command("/usr/bin/chromedriver");
        cmd.arg(format!("--port={port}")).arg(format!(
            "--log-path={}",
            dir.join("chromedriver.log").display()
        ));
        let driver = Proc::spawn("chromedriver", cmd, &dir.join("chromedriver.out"))?;
        let driver_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut browser = Browser {
            via: ns.via(),
            driver_addr,
            session: None,
            driver,
        };
        wait_for("chromedriver to listen", Duration::from_secs(20), || {
            browser
                .call("GET", "/status", None)
                .ok()
                .filter(|v| v["ready"] == true)
        })?;
        let profile = dir.join("profile");
        let created = browser.call(
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--no-first-run",
                        "--disable-dev-shm-usage", "--window-size=1400,2200",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                },
            }}})),
        )?;
        let id = created["sessionId"]
            .as_str()
            .with_context(|| format!("no session id in {created}"))?;
        browser.session = Some(id.to_string());
        Ok(browser)
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.driver_addr,
            body.len()
        );
        let r = self.via.raw(self.driver_addr, raw.as_bytes(), false)?;
        let v: Value = serde_json::from_slice(&r.body)
            .with_context(|| format!("{method} {path}: answer is not JSON"))?;
        if r.status != 200 {
            bail!("{method} {path} answered {}: {}", r.status, v["value"]);
        }
        Ok(v["value"].clone())
    }

    fn session_path(&self, rest: &str) -> Result<String> {
        let id = self.session.as_ref().context("no browser session")?;
        Ok(format!("/session/{id}{rest}"))
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        self.call(
            "POST",
            &self.session_path("/url")?,
            Some(json!({"url": url})),
        )
        .map(drop)
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page
    /// and returns what it returns.
    pub fn execute(&self, script: &str, args: Value) -> Result<Value> {
        self.call(
            "POST",
            &self.session_path("/execute/sync")?,
            Some(json!({"script": script, "args": args})),
        )
    }

    fn element(&self, css: &str) -> Result<String> {
        let v = self.call(
            "POST",
            &self.session_path("/element")?,
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no element {css}"))
    }

    /// Types `text` into the element `css`, as a user would.
    pub fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let id = self.element(css)?;
        self.call(
            "POST",
            &self.session_path(&format!("/element/{id}/value"))?,
            Some(json!({"text": text})),
        )
        .map(drop)
    }

    /// Clicks the element `css`.
    pub fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css)?;
        self.call(
            "POST",
            &self.session_path(&format!("/element/{id}/click"))?,
            Some(json!({})),
        )
        .map(drop)
    }

    /// Writes a PNG of the window to `path`.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let v = self.call("GET", &self.session_path("/screenshot")?, None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("screenshot is not a string")?)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

/// PIDs of every descendant of `pid` (children first found, then theirs).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may hold spaces, so split after ')'.
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                && let Some(after) = stat.rsplit_once(')').map(|(_, a)| a)
                && let Some(ppid) = after.split_whitespace().nth(1).and_then(|v| v.parse().ok())
            {
                parents.push((p, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Quitting the session ends Chromium; what is left of the process
        // tree is killed by PID, then ChromeDriver itself.
        if let Ok(path) = self.session_path("") {
            let _ = self.call("DELETE", &path, None);
        }
        for pid in descendants(self.driver.pid()) {
            // SAFETY: kill(2) on a PID this test's process tree started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        self.driver.kill();
    }
}
