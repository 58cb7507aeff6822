//! A deliberately raw HTTP/1.1 client: the tests must be able to send what a
//! well-behaved client library never would (hostile paths, broken heads).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The OCI error code of an error body.
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_string)
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }
}

/// Where connections are made from: this process's network namespace, or
/// another one (a test node's), entered by a short-lived thread so that the
/// socket belongs to that namespace.
#[derive(Debug, Clone, Default)]
pub struct Via {
    netns: Option<std::path::PathBuf>,
}

impl Via {
    pub fn root() -> Via {
        Via { netns: None }
    }

    /// Connections from the network namespace at `path` (`/run/netns/<name>`).
    pub fn netns(path: &std::path::Path) -> Via {
        Via {
            netns: Some(path.to_path_buf()),
        }
    }

    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let Some(path) = self.netns.clone() else {
            return TcpStream::connect_timeout(&addr, timeout);
        };
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on a valid namespace fd; it only affects this
            // thread, which ends right after connecting.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .map_err(|_| std::io::Error::other("connect thread panicked"))?
    }

    /// Sends `raw` bytes as a request and reads one response.
    pub fn raw(&self, addr: SocketAddr, raw: &[u8], head_only: bool) -> Result<Response> {
        let mut stream = self.connect(addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(raw)?;
        read_response(&mut stream, head_only, &mut Vec::new())
    }

    pub fn get(&self, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
        self.request(addr, "GET", path, headers)
    }

    pub fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.raw(addr, req.as_bytes(), method == "HEAD")
    }
}

/// Sends `raw` bytes as a request and reads one response.
pub fn raw(addr: SocketAddr, raw: &[u8], head_only: bool) -> Result<Response> {
    Via::root().raw(addr, raw, head_only)
}

/// `GET path` with extra headers.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    Via::root().get(addr, path, headers)
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response> {
    Via::root().request(addr, method, path, headers)
}

/// Reads one response from a stream; bytes read past it stay in `buffer`
/// (for keep-alive and pipelining tests).
pub fn read_response(
    stream: &mut impl Read,
    head_only: bool,
    buffer: &mut Vec<u8>,
) -> Result<Response> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(n) =
            resp.parse(buffer).context("parsing response head")?
        {
            let status = resp.code.unwrap_or(0);
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            buffer.drain(..n);
            let mut r = Response {
                status,
                headers,
                body: Vec::new(),
            };
            let chunked = r
                .header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
            if chunked && !head_only {
                r.body = read_chunked(stream, buffer)?;
                return Ok(r);
            }
            let len = if head_only {
                0
            } else {
                r.content_length().unwrap_or(0) as usize
            };
            while buffer.len() < len {
                let got = stream.read(&mut chunk)?;
                if got == 0 {
                    bail!(
                        "connection closed after {} of {len} body bytes",
                        buffer.len()
                    );
                }
                buffer.extend_from_slice(&chunk[..got]);
            }
            r.body = buffer.drain(..len).collect();
            return Ok(r);
        }
        let got = stream.read(&mut chunk)?;
        if got == 0 {
            bail!("connection closed before a complete response head");
        }
        buffer.extend_from_slice(&chunk[..got]);
    }
}

/// Reads a `Transfer-Encoding: chunked` body (as Go servers send large
/// answers) from `buffer` and then `stream`.
fn read_chunked(stream: &mut impl Read, buffer: &mut Vec<u8>) -> Result<Vec<u8>> {
    let mut chunk = [0u8; 64 * 1024];
    let mut body = Vec::new();
    let mut fill = |buffer: &mut Vec<u8>| -> Result<()> {
        let got = stream.read(&mut chunk)?;
        if got == 0 {
            bail!("connection closed inside a chunked body");
        }
        buffer.extend_from_slice(&chunk[..got]);
        Ok(())
    };
    loop {
        let Some(eol) = buffer.windows(2).position(|w| w == b"\r\n") else {
            fill(buffer)?;
            continue;
        };
        let line = String::from_utf8_lossy(&buffer[..eol]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size line {line:?}"))?;
        while buffer.len() < eol + 2 + size + 2 {
            fill(buffer)?;
        }
        body.extend_from_slice(&buffer[eol + 2..eol + 2 + size]);
        buffer.drain(..eol + 2 + size + 2);
        if size == 0 {
            return Ok(body);
        }
    }
}
