//! A keyed peer that lies, built from the real daemon: the node's
//! peermirror runs as usual but listens on loopback inside its namespace,
//! and this front takes the node's registry port on its address, passes
//! every request on and changes the answers as told. What the node announces
//! and how it proves the key are the daemon's own; only what it serves to
//! other hosts is a lie.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

/// How the front lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// Flips the first body byte of every `206` answer (a segment of a
    /// blob fetched from several holders); whole blobs are right.
    CorruptRanges,
}

/// What the front did, as seen by the test.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests passed on.
    pub requests: AtomicUsize,
    /// `206` answers sent with a flipped byte.
    pub corrupted: AtomicUsize,
}

/// The front; stops (and closes its port) when dropped.
pub struct Front {
    pub tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Longest request or response head read.
const MAX_HEAD: usize = 64 << 10;

impl Front {
    /// Listens on `listen` inside the network namespace at `netns` and passes
    /// requests on to `daemon` (an address in the same namespace).
    pub fn start(netns: &Path, listen: SocketAddr, daemon: SocketAddr, lie: Lie) -> Result<Front> {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = std::fs::File::open(netns).with_context(|| netns.display().to_string())?;
        let (t, s) = (tally.clone(), stop.clone());
        // The thread enters the namespace; the threads it starts for each
        // connection are in it too, so their connections to the daemon are.
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd, for this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(std::io::Error::last_os_error()));
                return;
            }
            let listener = match TcpListener::bind(listen).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let t = t.clone();
                        std::thread::spawn(move || {
                            let _ = serve(client, daemon, lie, &t);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx
            .recv()
            .context("the front's thread ended")?
            .with_context(|| format!("listening on {listen}"))?;
        Ok(Front {
            tally,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads up to the end of a head (`\r\n\r\n`); the head, and any bytes read
/// past it.
fn read_head(stream: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too long"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn content_length(head: &str) -> Option<u64> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

/// One request per connection: passed on, and the answer changed as `lie`
/// says. Requests carry no body (GET and HEAD).
fn serve(
    mut client: TcpStream,
    daemon: SocketAddr,
    lie: Lie,
    tally: &Tally,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (request, _) = read_head(&mut client)?;
    tally.requests.fetch_add(1, Ordering::Relaxed);
    let is_head = request.starts_with(b"HEAD ");
    let mut upstream = TcpStream::connect_timeout(&daemon, Duration::from_secs(5))?;
    upstream.set_read_timeout(Some(Duration::from_secs(30)))?;
    upstream.write_all(&request)?;
    let (head, mut body) = read_head(&mut upstream)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let length = if is_head {
        0
    } else {
        content_length(&text).unwrap_or(0)
    };
    // Read the whole body from the daemon (segments are 4 MiB), then lie.
    while (body.len() as u64) < length {
        let mut chunk = vec![0u8; 256 << 10];
        let n = upstream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length as usize);
    match lie {
        Lie::CorruptRanges if text.starts_with("HTTP/1.1 206") && !body.is_empty() => {
            body[0] ^= 0xff;
            tally.corrupted.fetch_add(1, Ordering::Relaxed);
        }
        Lie::CorruptRanges => {}
    }
    client.write_all(&head)?;
    client.write_all(&body)?;
    client.flush()
}
