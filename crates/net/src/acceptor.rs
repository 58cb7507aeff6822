//! The one accept loop every server of the daemon runs: the registry port,
//! the status port, the bootstrap entry and the bootstrapper's mTLS port.
//!
//! It owns what those servers share:
//! - stopping on shutdown, then waiting (up to a drain timeout) for the
//!   connections in flight;
//! - backing off when `accept` fails (out of descriptors), instead of
//!   spinning;
//! - a cap on connections at once, a cap per source (an IPv4 address or an
//!   IPv6 /64), and room reserved for the node itself (loopback clients and
//!   its own addresses: the kubelet's probes, the local containerd), which
//!   remote clients cannot take;
//! - the answer a refused connection gets (or none), written with a deadline;
//! - the TLS handshake, bounded in time, when the port speaks TLS.
//!
//! What each server does with a connection is the `handle` function it
//! passes to [`Acceptor::run`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Backoff;
use crate::tls::TlsState;

/// How long a refused connection's answer may take to write.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What differs between the servers.
#[derive(Clone)]
pub struct AcceptorConfig {
    /// The port's name in logs ("registry port").
    pub name: &'static str,
    /// Connections from other hosts at once.
    pub max_connections: usize,
    /// Connections from one source (IPv4 address, IPv6 /64) at once.
    pub max_per_source: usize,
    /// Further connections only the node itself may use.
    pub reserved_for_local: usize,
    /// Written to a connection refused for lack of room, before closing it;
    /// `None` closes it at once.
    pub refusal: Option<Arc<[u8]>>,
    /// The port speaks only TLS, with this configuration.
    pub tls: Option<Arc<TlsState>>,
    /// A TLS handshake that takes longer fails.
    pub handshake_timeout: Duration,
    /// After shutdown, how long connections in flight may still run.
    pub drain_timeout: Duration,
    pub counters: AcceptorCounters,
}

impl AcceptorConfig {
    /// A plain port: no TLS, no refusal answer, a tenth of a second's drain.
    pub fn new(
        name: &'static str,
        max_connections: usize,
        max_per_source: usize,
        reserved_for_local: usize,
    ) -> AcceptorConfig {
        AcceptorConfig {
            name,
            max_connections: max_connections.max(1),
            max_per_source: max_per_source.max(1),
            reserved_for_local,
            refusal: None,
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_millis(100),
            counters: AcceptorCounters::default(),
        }
    }
}

/// The metric handles the acceptor keeps current (unregistered ones by
/// default).
#[derive(Clone, Default)]
pub struct AcceptorCounters {
    /// Connections refused: the port or the source was full.
    pub refused: Counter,
    /// TLS handshakes that failed or timed out.
    pub handshake_failures: Counter,
    /// Connections open now.
    pub open: Gauge,
}

/// An accepted connection, after the TLS handshake when the port speaks TLS.
pub type Stream = crate::MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// Where a connection comes from: a host counts once per IPv4 address and
/// once per IPv6 /64 (a host usually holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                SourceKey::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        }
    }
}

/// Whether a connection comes from the node itself: a loopback address, or
/// one of the node's addresses (the peer's address is the one it reached).
pub fn is_local(local: Option<SocketAddr>, peer: SocketAddr) -> bool {
    let peer = peer.ip().to_canonical();
    peer.is_loopback() || local.is_some_and(|l| l.ip().to_canonical() == peer)
}

/// The room of one port, shared by its connections.
#[derive(Default)]
struct Room {
    remote: usize,
    local: usize,
    per_source: HashMap<SourceKey, usize>,
}

/// A connection's place in its port's [`Room`], given back when dropped.
pub struct Slot {
    room: Arc<Mutex<Room>>,
    local: bool,
    source: SourceKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut room = self.room.lock().unwrap_or_else(|e| e.into_inner());
        if self.local {
            room.local -= 1;
        } else {
            room.remote -= 1;
            if let Some(n) = room.per_source.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    room.per_source.remove(&self.source);
                }
            }
        }
    }
}

/// Admission of connections by the caps of [`AcceptorConfig`].
#[derive(Clone)]
pub struct Admission {
    room: Arc<Mutex<Room>>,
    max_connections: usize,
    max_per_source: usize,
    reserved_for_local: usize,
}

impl Admission {
    pub fn new(config: &AcceptorConfig) -> Admission {
        Admission {
            room: Arc::default(),
            max_connections: config.max_connections,
            max_per_source: config.max_per_source,
            reserved_for_local: config.reserved_for_local,
        }
    }

    /// A slot for a connection from `source` (local: from the node
    /// itself), or `None` when there is no room for it. The node takes its
    /// reserved room first, then the shared room, without a per-source cap.
    pub fn try_admit(&self, source: IpAddr, local: bool) -> Option<Slot> {
        let key = SourceKey::of(source);
        let mut room = self.room.lock().unwrap_or_else(|e| e.into_inner());
        let local_slot = local && room.local < self.reserved_for_local;
        if local_slot {
            room.local += 1;
        } else {
            let from_source = room.per_source.get(&key).copied().unwrap_or(0);
            if room.remote >= self.max_connections || (!local && from_source >= self.max_per_source)
            {
                return None;
            }
            room.remote += 1;
            *room.per_source.entry(key).or_insert(0) += 1;
        }
        Some(Slot {
            room: self.room.clone(),
            local: local_slot,
            source: key,
        })
    }
}

/// Runs an accept loop with one [`AcceptorConfig`].
pub struct Acceptor {
    config: AcceptorConfig,
    admission: Admission,
}

impl Acceptor {
    pub fn new(config: AcceptorConfig) -> Acceptor {
        let admission = Admission::new(&config);
        Acceptor { config, admission }
    }

    /// Accepts connections on `listener` until `shutdown`, and runs
    /// `handle` for each one admitted (holding its slot); then waits up to
    /// the drain timeout for the connections in flight.
    pub async fn run<F, Fut>(self, listener: TcpListener, shutdown: CancellationToken, handle: F)
    where
        F: Fn(Stream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = Arc::new(handle);
        let config = Arc::new(self.config);
        let tracker = TaskTracker::new();
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => {
                        backoff.reset();
                        a
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(port = config.name, error = %e, "accept failed");
                        tokio::time::sleep(backoff.failed()).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let local = is_local(stream.local_addr().ok(), peer);
            let Some(slot) = self.admission.try_admit(peer.ip(), local) else {
                config.counters.refused.inc();
                tracing::debug!(port = config.name, %peer, "no room; refusing a connection");
                if let Some(answer) = config.refusal.clone() {
                    // One small write, bounded in time.
                    tracker.spawn(async move {
                        let mut stream = stream;
                        let write = stream.write_all(&answer);
                        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write).await;
                    });
                }
                continue;
            };
            let (config, handle) = (config.clone(), handle.clone());
            tracker.spawn(async move {
                let _slot = slot;
                let stream = match &config.tls {
                    None => Stream::Plain(stream),
                    Some(tls) => match handshake(tls, stream, config.handshake_timeout).await {
                        Ok(s) => Stream::Tls(Box::new(s)),
                        Err(e) => {
                            config.counters.handshake_failures.inc();
                            tracing::debug!(port = config.name, %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    },
                };
                config.counters.open.inc();
                handle(stream, peer).await;
                config.counters.open.dec();
            });
        }
        drop(listener);
        tracker.close();
        if tokio::time::timeout(config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                port = config.name,
                open = tracker.len(),
                "drain timeout: closing connections in flight"
            );
        }
    }
}

/// How long an HTTP/1.1 client may take.
#[derive(Debug, Clone, Copy)]
pub struct HttpDeadlines {
    /// Silent between requests.
    pub idle: Duration,
    /// To send a request head, and to read on while its answer is written.
    pub request: Duration,
}

/// Serves HTTP/1.1 with hyper on an accepted connection (the status port,
/// the bootstrap entry, the bootstrapper), within `deadlines`; on
/// `shutdown` the connection finishes its request and closes.
pub async fn serve_http1<S>(
    stream: Stream,
    service: S,
    deadlines: HttpDeadlines,
    shutdown: &CancellationToken,
) where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = crate::Deadlined::new(stream, deadlines.idle, deadlines.request);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(deadlines.request)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(deadlines.request, conn).await;
        }
    }
}

async fn handshake(
    tls: &TlsState,
    stream: TcpStream,
    timeout: Duration,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_host_counts_once_per_ipv4_address_and_ipv6_64() {
        assert_eq!(
            SourceKey::of(ip("10.0.0.1")),
            SourceKey::of(ip("::ffff:10.0.0.1"))
        );
        assert_ne!(SourceKey::of(ip("10.0.0.1")), SourceKey::of(ip("10.0.0.2")));
        assert_eq!(
            SourceKey::of(ip("2001:db8:1:2::1")),
            SourceKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            SourceKey::of(ip("2001:db8:1:2::1")),
            SourceKey::of(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn local_means_loopback_or_the_address_the_client_reached() {
        let at = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        assert!(is_local(None, at("127.0.0.5:4000")));
        assert!(is_local(None, at("[::1]:4000")));
        assert!(is_local(Some(at("10.0.0.7:5000")), at("10.0.0.7:4000")));
        assert!(!is_local(Some(at("10.0.0.7:5000")), at("10.0.0.8:4000")));
        assert!(!is_local(None, at("10.0.0.8:4000")));
    }

    #[test]
    fn one_source_cannot_take_the_room_of_others_nor_the_node_s() {
        let admission = Admission::new(&AcceptorConfig::new("test", 4, 2, 1));
        let a = ip("10.0.0.1");
        let (a1, a2) = (admission.try_admit(a, false), admission.try_admit(a, false));
        assert!(a1.is_some() && a2.is_some());
        assert!(
            admission.try_admit(a, false).is_none(),
            "a third from one source"
        );
        let b = ip("10.0.0.2");
        let (b1, b2) = (admission.try_admit(b, false), admission.try_admit(b, false));
        assert!(b1.is_some() && b2.is_some());
        assert!(
            admission.try_admit(ip("10.0.0.3"), false).is_none(),
            "the port is full"
        );
        // The node itself finds its reserved room, and takes no per-source cap.
        let local = admission.try_admit(ip("127.0.0.1"), true);
        assert!(local.is_some());
        assert!(
            admission.try_admit(ip("127.0.0.1"), true).is_none(),
            "both rooms full"
        );
        drop(a1);
        assert!(
            admission.try_admit(ip("127.0.0.1"), true).is_some(),
            "the shared room again"
        );
        drop(local);
        drop(b1);
        let c = admission.try_admit(ip("10.0.0.3"), false);
        assert!(c.is_some(), "a freed slot is free for anyone");
    }

    /// A real listener on loopback: a full port answers with its refusal and
    /// closes; shutdown stops the loop.
    #[tokio::test]
    async fn a_full_port_answers_its_refusal_and_shutdown_stops_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = AcceptorConfig::new("test", 1, 1, 0);
        config.refusal = Some(Arc::from(&b"full\n"[..]));
        let refused = config.counters.refused.clone();
        let shutdown = CancellationToken::new();
        let release = Arc::new(tokio::sync::Notify::new());
        let served = {
            let release = release.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(
                Acceptor::new(config).run(listener, shutdown, move |mut s, _| {
                    let release = release.clone();
                    async move {
                        let _ = s.write_all(b"hello\n").await;
                        release.notified().await;
                    }
                }),
            )
        };
        let mut first = TcpStream::connect(addr).await.expect("connect");
        let mut text = [0u8; 6];
        first.read_exact(&mut text).await.expect("read");
        assert_eq!(&text, b"hello\n");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let mut answer = Vec::new();
        second.read_to_end(&mut answer).await.expect("read");
        assert_eq!(answer, b"full\n");
        assert_eq!(refused.get(), 1);
        release.notify_waiters();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("stops")
            .expect("no panic");
    }
}
