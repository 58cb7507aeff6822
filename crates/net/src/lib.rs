//! Sockets, TLS and retries that every server and client of the daemon
//! shares: the one accept loop of every server port ([`acceptor`]), the one
//! way to dial a server ([`client`]), one backoff with jitter
//! ([`backoff`]), a connection that must keep making progress, the
//! addresses of this node's interfaces, the parsers of flag values
//! ([`flags`]), and certificate files turned into rustls configurations
//! ([`tls`]).
//!
//! Uses no other peermirror crate.

pub mod acceptor;
pub mod backoff;
pub mod client;
pub mod flags;
pub mod tls;

pub use backoff::Backoff;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// A connection whose reads and writes fail with `TimedOut` when they make
/// no progress for their timeout: a client that stops reading a large
/// response, or keeps a connection open and silent, gives its slot back.
pub struct Deadlined<IO> {
    io: IO,
    read_timeout: Duration,
    write_timeout: Duration,
    read_sleep: Option<Pin<Box<Sleep>>>,
    write_sleep: Option<Pin<Box<Sleep>>>,
}

impl<IO> Deadlined<IO> {
    pub fn new(io: IO, read_timeout: Duration, write_timeout: Duration) -> Deadlined<IO> {
        Deadlined {
            io,
            read_timeout,
            write_timeout,
            read_sleep: None,
            write_sleep: None,
        }
    }
}

/// Polls `sleep` (armed on the first pending poll): `Ready` once it ran out.
fn expired(sleep: &mut Option<Pin<Box<Sleep>>>, timeout: Duration, cx: &mut Context<'_>) -> bool {
    sleep
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
        .as_mut()
        .poll(cx)
        .is_ready()
}

fn timed_out(what: &str, after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no {what} progress for {after:?}"),
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadlined<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read_sleep = None;
                Poll::Ready(r)
            }
            Poll::Pending if expired(&mut this.read_sleep, this.read_timeout, cx) => {
                Poll::Ready(Err(timed_out("read", this.read_timeout)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadlined<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.write_sleep = None;
                Poll::Ready(r)
            }
            Poll::Pending if expired(&mut this.write_sleep, this.write_timeout, cx) => {
                Poll::Ready(Err(timed_out("write", this.write_timeout)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(r) => {
                this.write_sleep = None;
                Poll::Ready(r)
            }
            Poll::Pending if expired(&mut this.write_sleep, this.write_timeout, cx) => {
                Poll::Ready(Err(timed_out("write", this.write_timeout)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A TCP connection, or the TLS session on one: what the acceptor hands a
/// server ([`acceptor::Stream`]) and what [`client::dial`] returns
/// ([`client::Dialled`]).
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit
/// (systemd and container runtimes often start services at a soft 1,024,
/// below what the connection caps allow) and returns the limit in force.
/// Logs a warning when even that is below `needed`.
pub fn raise_open_file_limit(needed: u64) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let current = getrlimit(Resource::Nofile);
    let target = current.maximum;
    let limit = if current.current == target {
        current.current
    } else {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: target,
                maximum: current.maximum,
            },
        ) {
            Ok(()) => target,
            Err(e) => {
                tracing::debug!(error = %e, "cannot raise the open-file limit");
                current.current
            }
        }
    };
    if let Some(n) = limit.filter(|&n| n < needed) {
        tracing::warn!(
            limit = n,
            needed,
            "the open-file limit is below what the connection caps allow; raise LimitNOFILE or lower --max-connections"
        );
    }
    limit
}

/// Binds a TCP listener on `addr`; an unspecified IPv6 address that cannot
/// be bound (IPv6 disabled) falls back to the IPv4 one. The error says
/// which address failed.
pub async fn listen(
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, (std::net::SocketAddr, io::Error)> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e)
            if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED
                && e.kind() == io::ErrorKind::AddrNotAvailable =>
        {
            let v4 = std::net::SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tokio::net::TcpListener::bind(v4).await.map_err(|e| (v4, e))
        }
        Err(e) => Err((addr, e)),
    }
}

/// Addresses of this network namespace's interfaces.
pub fn interface_addresses() -> std::collections::HashSet<std::net::IpAddr> {
    let mut out = std::collections::HashSet::new();
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free with freeifaddrs; every node
    // and address pointer is checked before use.
    unsafe {
        if libc::getifaddrs(&mut addrs) != 0 {
            return out;
        }
        let mut cur = addrs;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = sa as *const libc::sockaddr_in;
                        out.insert(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                            u32::from_be((*sin).sin_addr.s_addr),
                        )));
                    }
                    libc::AF_INET6 => {
                        let sin6 = sa as *const libc::sockaddr_in6;
                        out.insert(std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                            (*sin6).sin6_addr.s6_addr,
                        )));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(addrs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_or_talking_is_cut_off() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut conn = Deadlined::new(ours, Duration::from_secs(30), Duration::from_secs(10));
        // Writes progress while the other side reads...
        conn.write_all(&[1; 512]).await.expect("room");
        let mut buf = [0; 512];
        theirs.read_exact(&mut buf).await.expect("read");
        // ... and fail once it stops: the buffer fills, then 10 s pass.
        let err = conn.write_all(&[2; 4096]).await.expect_err("stalled");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // A silent peer: the read fails after 30 s.
        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut conn = Deadlined::new(ours, Duration::from_secs(30), Duration::from_secs(10));
        let started = tokio::time::Instant::now();
        let err = conn.read(&mut buf).await.expect_err("silent");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        let Some(hard) = before.maximum else {
            return; // unlimited: nothing to raise to
        };
        // One below the hard limit (never low enough to starve other tests).
        let lowered = Rlimit {
            current: Some(hard.saturating_sub(1)),
            maximum: Some(hard),
        };
        setrlimit(Resource::Nofile, lowered).expect("lowering the soft limit");
        assert_eq!(super::raise_open_file_limit(0), Some(hard));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
    }
}
