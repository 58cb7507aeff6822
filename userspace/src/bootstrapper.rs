//! `peermirror bootstrapper`: the seed side of HTTPS bootstrap.
//!
//! Nodes register themselves over mTLS (`PUT /bootstrap-nodes/<peer id>`
//! with their `{"ID", "Addrs"}` entry) and renew the entry while they run;
//! an entry that is not renewed within the TTL expires. `GET
//! /bootstrap-nodes` answers the live entries in Spegel's format (a JSON
//! array of `{"ID", "Addrs"}`), which `--bootstrap-kind http` reads. The
//! port speaks only TLS and requires a client certificate from the
//! configured CA; the certificate files are reloaded when they change, so
//! a CA rotation needs no restart. `/healthz`, `/readyz` and `/metrics` are
//! on a separate plain status port (kubelet's probes carry no certificate).
//!
//! A holder of a client certificate is trusted to register, not to fill
//! the table: each certificate holds at most `--max-entries-per-certificate`
//! entries (a newer registration replaces its least recently renewed one),
//! and the document served is trimmed to what nodes read
//! ([`peermirror_routing::bootstrap::MAX_DOCUMENT`]), most recently renewed
//! entries first.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use libp2p::{Multiaddr, PeerId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::server::{Readiness, Status};
use peermirror_net::MaybeTls;
use peermirror_net::acceptor::{Acceptor, AcceptorConfig, HttpDeadlines, Stream, serve_http1};
use peermirror_net::tls::{TlsFiles, TlsState};

/// The path nodes list and register under.
pub const PATH: &str = "/bootstrap-nodes";
/// Nodes kept at most; a registration beyond is refused (507).
const MAX_NODES: usize = 10_000;
/// Addresses kept per node.
const MAX_ADDRS: usize = 16;
/// Largest registration body.
const MAX_BODY: usize = 64 << 10;
/// Connections served at once from other hosts; beyond, a connection is
/// closed at once.
const MAX_CONNECTIONS: usize = 256;
/// Of those, from one host (one IPv4 address or IPv6 /64) at most: every
/// node opens one at a time.
const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// Connections only the bootstrapper's own host may use.
const RESERVED_FOR_LOCAL: usize = 8;
/// A connection that sends nothing, or reads nothing of its answer, for
/// this long is closed (the TLS handshake included).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct BootstrapperConfig {
    pub listen_addr: SocketAddr,
    pub status_addr: SocketAddr,
    pub tls: TlsFiles,
    /// How long an entry lives without renewal.
    pub entry_ttl: Duration,
    /// Entries one client certificate may hold at once.
    pub max_entries_per_certificate: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapperError {
    #[error(transparent)]
    Tls(#[from] peermirror_net::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Who registered an entry: the SHA-256 of the client certificate the
/// registration came with.
type Identity = String;

struct Entry {
    addrs: Vec<String>,
    expires: Instant,
    /// When it was last registered or renewed.
    renewed: Instant,
    identity: Identity,
}

#[derive(Default)]
struct Counters {
    nodes: Gauge,
    registrations: Counter,
    refused_registrations: Counter,
    replaced_entries: Counter,
    listed: Gauge,
    lists: Counter,
    handshake_failures: Counter,
}

impl Counters {
    fn register(registry: &mut Registry) -> Arc<Counters> {
        let c = Arc::new(Counters::default());
        let r = registry.sub_registry_with_prefix("peermirror_bootstrapper");
        r.register("nodes", "Live registered nodes", c.nodes.clone());
        r.register(
            "registrations",
            "Registrations and renewals accepted",
            c.registrations.clone(),
        );
        r.register(
            "refused_registrations",
            "Registrations refused (malformed, or the table is full)",
            c.refused_registrations.clone(),
        );
        r.register(
            "replaced_entries",
            "Entries replaced by a registration of another peer with the same client certificate (over --max-entries-per-certificate)",
            c.replaced_entries.clone(),
        );
        r.register(
            "listed",
            "Nodes in the last bootstrap document served (the most recently renewed that fit in what nodes read)",
            c.listed.clone(),
        );
        r.register("lists", "Bootstrap documents served", c.lists.clone());
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (no client certificate, another CA, not TLS)",
            c.handshake_failures.clone(),
        );
        c
    }
}

/// The registered nodes.
pub struct Table {
    ttl: Duration,
    per_identity: usize,
    entries: Mutex<HashMap<PeerId, Entry>>,
    counters: Arc<Counters>,
}

/// What a node sends when it registers: Spegel's `AddrInfo`.
#[derive(serde::Deserialize)]
struct Registration {
    #[serde(rename = "ID", default)]
    id: Option<String>,
    #[serde(rename = "Addrs")]
    addrs: Vec<String>,
}

impl Table {
    fn new(ttl: Duration, per_identity: usize, counters: Arc<Counters>) -> Table {
        Table {
            ttl,
            per_identity: per_identity.max(1),
            entries: Mutex::new(HashMap::new()),
            counters,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops expired entries.
    fn expire(&self, now: Instant) {
        let mut entries = self.entries();
        entries.retain(|_, e| e.expires > now);
        self.counters.nodes.set(entries.len() as i64);
    }

    /// Registers or renews `peer` from a request body that came with the
    /// client certificate `identity`.
    fn register(
        &self,
        peer: &str,
        body: &[u8],
        identity: &str,
        now: Instant,
    ) -> Result<(), (StatusCode, String)> {
        let bad = |why: String| (StatusCode::BAD_REQUEST, why);
        let peer: PeerId = peer.parse().map_err(|_| {
            bad(format!(
                "{:?} is not a peer id",
                peermirror_oci::excerpt(peer)
            ))
        })?;
        let reg: Registration = serde_json::from_slice(body)
            .map_err(|_| bad("the body is not {\"ID\": ..., \"Addrs\": [...]}".into()))?;
        if reg.id.as_deref().is_some_and(|id| id != peer.to_string()) {
            return Err(bad("the body's ID is not the peer id of the path".into()));
        }
        if reg.addrs.is_empty() || reg.addrs.len() > MAX_ADDRS {
            return Err(bad(format!(
                "1 to {MAX_ADDRS} addresses, not {}",
                reg.addrs.len()
            )));
        }
        for a in &reg.addrs {
            let addr: Multiaddr = a.parse().map_err(|_| {
                bad(format!(
                    "{:?} is not a multiaddr",
                    peermirror_oci::excerpt(a)
                ))
            })?;
            let dialable = addr.iter().any(|p| {
                matches!(
                    p,
                    libp2p::multiaddr::Protocol::Ip4(_) | libp2p::multiaddr::Protocol::Ip6(_)
                )
            }) && addr
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::Tcp(_)));
            if !dialable {
                return Err(bad(format!("{a:?} is not an IP and TCP address")));
            }
            let other = addr.iter().any(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => id != peer,
                _ => false,
            });
            if other {
                return Err(bad(format!("{a:?} names another peer")));
            }
        }
        let mut entries = self.entries();
        // The certificate's other entries: at its cap, the least recently
        // renewed one makes room.
        let (mut held, mut oldest) = (0, None::<(PeerId, Instant)>);
        for (id, e) in entries
            .iter()
            .filter(|(id, e)| **id != peer && e.identity == identity)
        {
            held += 1;
            if oldest.is_none_or(|(_, renewed)| e.renewed < renewed) {
                oldest = Some((*id, e.renewed));
            }
        }
        if held >= self.per_identity
            && let Some((oldest, _)) = oldest
        {
            entries.remove(&oldest);
            self.counters.replaced_entries.inc();
            tracing::debug!(replaced = %oldest, by = %peer, "entry replaced by another of the same certificate");
        }
        if !entries.contains_key(&peer) && entries.len() >= MAX_NODES {
            return Err((
                StatusCode::INSUFFICIENT_STORAGE,
                format!("{MAX_NODES} nodes are registered already"),
            ));
        }
        entries.insert(
            peer,
            Entry {
                addrs: reg.addrs,
                expires: now + self.ttl,
                renewed: now,
                identity: identity.to_string(),
            },
        );
        self.counters.nodes.set(entries.len() as i64);
        Ok(())
    }

    /// The live entries, as Spegel's bootstrap document: the most recently
    /// renewed first, as many as fit in what nodes read.
    fn document(&self, now: Instant) -> Vec<u8> {
        self.expire(now);
        let entries = self.entries();
        let mut live: Vec<(&PeerId, &Entry)> = entries.iter().collect();
        live.sort_by(|a, b| b.1.renewed.cmp(&a.1.renewed).then(a.0.cmp(b.0)));
        let mut doc = b"[".to_vec();
        let mut listed = 0;
        for (id, e) in live {
            let entry = serde_json::json!({ "ID": id.to_string(), "Addrs": e.addrs }).to_string();
            // The comma (or the closing bracket) and the closing bracket.
            if doc.len() + entry.len() + 2 > peermirror_routing::bootstrap::MAX_DOCUMENT {
                break;
            }
            if listed > 0 {
                doc.push(b',');
            }
            doc.extend_from_slice(entry.as_bytes());
            listed += 1;
        }
        doc.push(b']');
        self.counters.listed.set(listed);
        doc
    }
}

fn reply(code: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn error(code: StatusCode, message: String) -> Response<Full<Bytes>> {
    reply(
        code,
        "text/plain; charset=utf-8",
        format!("{message}\n").into_bytes(),
    )
}

/// Serves one request on a connection whose client presented the
/// certificate `identity` (`None`: no certificate, which the TLS
/// configuration does not let through; refused all the same).
async fn handle(
    table: &Table,
    identity: Option<&str>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let now = Instant::now();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, PATH) => {
            table.counters.lists.inc();
            reply(StatusCode::OK, "application/json", table.document(now))
        }
        (Method::PUT, p) if p.starts_with(PATH) && p[PATH.len()..].starts_with('/') => {
            let peer = p[PATH.len() + 1..].to_string();
            let Some(identity) = identity else {
                table.counters.refused_registrations.inc();
                return error(
                    StatusCode::FORBIDDEN,
                    "a registration needs a client certificate".into(),
                );
            };
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    table.counters.refused_registrations.inc();
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("a registration is at most {MAX_BODY} bytes"),
                    );
                }
            };
            match table.register(&peer, &body, identity, now) {
                Ok(()) => {
                    table.counters.registrations.inc();
                    let ttl = table.ttl.as_secs();
                    reply(
                        StatusCode::OK,
                        "application/json",
                        serde_json::json!({ "ttl_seconds": ttl })
                            .to_string()
                            .into_bytes(),
                    )
                }
                Err((code, message)) => {
                    table.counters.refused_registrations.inc();
                    error(code, message)
                }
            }
        }
        (_, PATH) => error(StatusCode::METHOD_NOT_ALLOWED, "GET only".into()),
        (_, p) if p.starts_with(PATH) => error(StatusCode::METHOD_NOT_ALLOWED, "PUT only".into()),
        _ => error(StatusCode::NOT_FOUND, format!("not found; try {PATH}")),
    }
}

/// Serves the mTLS port until `shutdown`. Handshakes are bounded per
/// source and in time: a host that never proves a certificate holds at
/// most [`MAX_CONNECTIONS_PER_SOURCE`] slots, each for [`IO_TIMEOUT`].
async fn serve(
    listener: TcpListener,
    tls: Arc<TlsState>,
    table: Arc<Table>,
    shutdown: CancellationToken,
) {
    let mut config = AcceptorConfig::new(
        "bootstrapper",
        MAX_CONNECTIONS,
        MAX_CONNECTIONS_PER_SOURCE,
        RESERVED_FOR_LOCAL,
    );
    config.tls = Some(tls);
    config.handshake_timeout = IO_TIMEOUT;
    config.counters.handshake_failures = table.counters.handshake_failures.clone();
    let stop = shutdown.clone();
    let handle = move |stream: Stream, _peer| {
        let (table, shutdown) = (table.clone(), stop.clone());
        let identity: Option<Arc<str>> = match &stream {
            MaybeTls::Tls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| peermirror_oci::Digest::of(leaf.as_ref()).to_string().into()),
            MaybeTls::Plain(_) => None,
        };
        async move {
            let service = hyper::service::service_fn(move |req| {
                let (table, identity) = (table.clone(), identity.clone());
                async move { Ok::<_, Infallible>(handle(&table, identity.as_deref(), req).await) }
            });
            let deadlines = HttpDeadlines {
                idle: IO_TIMEOUT,
                request: IO_TIMEOUT,
            };
            serve_http1(stream, service, deadlines, &shutdown).await;
        }
    };
    Acceptor::new(config).run(listener, shutdown, handle).await;
}

/// The status port's view: always ready once serving; the debug page
/// lists the live nodes (loopback only).
struct BootstrapperStatus {
    table: Arc<Table>,
}

#[async_trait::async_trait]
impl Status for BootstrapperStatus {
    fn readiness(&self) -> Readiness {
        Readiness {
            waiting_for: Vec::new(),
        }
    }

    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    async fn debug(
        &self,
        path: &str,
        _query: Option<&str>,
    ) -> Option<crate::status::server::DebugResponse> {
        matches!(path, "/" | "/debug").then(|| {
            crate::status::server::DebugResponse::ok(
                "text/plain; charset=utf-8",
                String::from_utf8_lossy(&self.table.document(Instant::now())).into_owned() + "\n",
            )
        })
    }

    async fn debug_allowed(&self, client: IpAddr) -> bool {
        client.to_canonical().is_loopback()
    }
}

/// Runs the bootstrapper until `shutdown`.
pub async fn run(
    config: BootstrapperConfig,
    shutdown: CancellationToken,
) -> Result<(), BootstrapperError> {
    let tls = TlsState::load(config.tls.clone())?;
    let listen = |addr: SocketAddr| async move {
        peermirror_net::listen(addr)
            .await
            .map_err(|(addr, source)| BootstrapperError::Listen { addr, source })
    };
    let listener = listen(config.listen_addr).await?;
    let status_listener = listen(config.status_addr).await?;
    let mut registry = Registry::default();
    let counters = Counters::register(&mut registry);
    let table = Arc::new(Table::new(
        config.entry_ttl,
        config.max_entries_per_certificate,
        counters,
    ));
    tracing::info!(
        addr = %listener.local_addr().map_or(config.listen_addr, |a| a),
        status = %status_listener.local_addr().map_or(config.status_addr, |a| a),
        ttl = ?config.entry_ttl,
        per_certificate = config.max_entries_per_certificate,
        "bootstrapper started"
    );
    let status = Arc::new(BootstrapperStatus {
        table: table.clone(),
    });
    let expiry = {
        let (table, stop) = (table.clone(), shutdown.clone());
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => table.expire(Instant::now()),
                }
            }
        }
    };
    tokio::join!(
        serve(listener, tls.clone(), table, shutdown.clone()),
        crate::status::server::serve(
            status_listener,
            Arc::new(registry),
            status,
            shutdown.clone()
        ),
        tls.watch(Duration::from_secs(10), shutdown.clone()),
        expiry,
    );
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ttl: Duration) -> Table {
        Table::new(ttl, 1, Arc::new(Counters::default()))
    }

    fn body(addrs: &[String]) -> Vec<u8> {
        serde_json::json!({ "Addrs": addrs })
            .to_string()
            .into_bytes()
    }

    fn listed(t: &Table, now: Instant) -> Vec<String> {
        let doc: Vec<serde_json::Value> = serde_json::from_slice(&t.document(now)).expect("json");
        doc.iter()
            .map(|e| e["ID"].as_str().expect("ID").to_string())
            .collect()
    }

    fn id() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn entries_register_renew_and_expire() {
        let t = table(Duration::from_secs(60));
        let start = Instant::now();
        let (a, b) = (id(), id());
        let body = |id: &PeerId| format!(r#"{{"ID":"{id}","Addrs":["/ip4/10.0.0.1/tcp/5001"]}}"#);
        t.register(&a.to_string(), body(&a).as_bytes(), "cert-a", start)
            .expect("a");
        t.register(
            &b.to_string(),
            br#"{"Addrs":["/ip6/fd00::2/tcp/5001"]}"#,
            "cert-b",
            start,
        )
        .expect("b, without an ID");
        let doc: Vec<serde_json::Value> = serde_json::from_slice(&t.document(start)).expect("json");
        assert_eq!(doc.len(), 2);
        // What a node reads back is a bootstrap document it understands.
        let addrs =
            peermirror_routing::bootstrap::parse_entries(&t.document(start)).expect("parses");
        assert_eq!(addrs.len(), 2);
        assert!(addrs.iter().all(|a| a.to_string().contains("/p2p/")));
        // a renews, b does not: after the TTL only a is left.
        t.register(
            &a.to_string(),
            body(&a).as_bytes(),
            "cert-a",
            start + Duration::from_secs(50),
        )
        .expect("renew");
        let later: Vec<serde_json::Value> =
            serde_json::from_slice(&t.document(start + Duration::from_secs(61))).expect("json");
        assert_eq!(later.len(), 1);
        assert_eq!(later[0]["ID"], a.to_string());
    }

    #[test]
    fn malformed_registrations_are_refused() {
        let t = table(Duration::from_secs(60));
        let now = Instant::now();
        let a = id();
        let other = id();
        let cases: Vec<(String, String)> = vec![
            (
                "not-a-peer".into(),
                r#"{"Addrs":["/ip4/10.0.0.1/tcp/1"]}"#.into(),
            ),
            (a.to_string(), "{".into()),
            (a.to_string(), r#"{"Addrs":[]}"#.into()),
            (a.to_string(), r#"{"Addrs":["nonsense"]}"#.into()),
            (a.to_string(), r#"{"Addrs":["/dns4/x/tcp/1"]}"#.into()),
            (a.to_string(), r#"{"Addrs":["/ip4/10.0.0.1/udp/1"]}"#.into()),
            (
                a.to_string(),
                format!(r#"{{"ID":"{other}","Addrs":["/ip4/10.0.0.1/tcp/1"]}}"#),
            ),
            (
                a.to_string(),
                format!(r#"{{"Addrs":["/ip4/10.0.0.1/tcp/1/p2p/{other}"]}}"#),
            ),
            (
                a.to_string(),
                serde_json::json!({ "Addrs": vec!["/ip4/10.0.0.1/tcp/1"; 17] }).to_string(),
            ),
        ];
        for (peer, body) in cases {
            let e = t
                .register(&peer, body.as_bytes(), "cert", now)
                .expect_err(&body);
            assert_eq!(e.0, StatusCode::BAD_REQUEST, "{body}: {}", e.1);
            assert!(e.1.len() < 200 && e.1.is_ascii(), "{}", e.1);
        }
        assert_eq!(t.document(now), b"[]");
    }

    /// One certificate holds at most its cap of entries: a registration of
    /// another peer replaces its least recently renewed one, and leaves
    /// other certificates' entries alone.
    #[test]
    fn a_certificate_holds_at_most_its_cap_of_entries() {
        let t = Table::new(Duration::from_secs(60), 2, Arc::new(Counters::default()));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let addr = vec!["/ip4/10.0.0.1/tcp/5001".to_string()];
        let [p1, p2, p3, p4, q] = [id(), id(), id(), id(), id()];
        t.register(&q.to_string(), &body(&addr), "y", at(0))
            .expect("q");
        for (i, p) in [p1, p2, p3].iter().enumerate() {
            t.register(&p.to_string(), &body(&addr), "x", at(1 + i as u64))
                .expect("x");
        }
        let mut now = listed(&t, at(4));
        now.sort();
        let mut want = vec![q.to_string(), p2.to_string(), p3.to_string()];
        want.sort();
        assert_eq!(now, want, "p1 made room for p3");
        // p2 renews: p3 is now the least recently renewed of x's.
        t.register(&p2.to_string(), &body(&addr), "x", at(5))
            .expect("renew");
        t.register(&p4.to_string(), &body(&addr), "x", at(6))
            .expect("p4");
        let now = listed(&t, at(7));
        assert_eq!(now, [p4.to_string(), p2.to_string(), q.to_string()]);
        assert_eq!(t.counters.replaced_entries.get(), 2);
        // A peer that registers with another certificate moves to it.
        t.register(&p2.to_string(), &body(&addr), "y", at(8))
            .expect("moved");
        t.register(&p1.to_string(), &body(&addr), "x", at(9))
            .expect("p1 again");
        assert_eq!(t.counters.replaced_entries.get(), 2, "x held only p4");
        assert_eq!(listed(&t, at(10)).len(), 4);
    }

    /// A table larger than nodes read is served trimmed, most recently
    /// renewed first, and every node can read what it is served.
    #[test]
    fn the_document_always_fits_what_nodes_read() {
        let t = Table::new(
            Duration::from_secs(600),
            10_000,
            Arc::new(Counters::default()),
        );
        let start = Instant::now();
        let addrs: Vec<String> = (0..MAX_ADDRS)
            .map(|j| format!("/ip6/fd00:6666:6666:6666:6666:6666:6666:{j:x}/tcp/65535"))
            .collect();
        let peers: Vec<PeerId> = (0..2_300).map(|_| id()).collect();
        for (i, p) in peers.iter().enumerate() {
            let now = start + Duration::from_millis(i as u64);
            t.register(&p.to_string(), &body(&addrs), "shared", now)
                .expect("register");
        }
        let now = start + Duration::from_secs(10);
        let doc = t.document(now);
        assert!(
            doc.len() <= peermirror_routing::bootstrap::MAX_DOCUMENT,
            "{} bytes",
            doc.len()
        );
        let ids = listed(&t, now);
        assert!(ids.len() < peers.len(), "nothing was trimmed");
        assert_eq!(t.counters.listed.get(), ids.len() as i64);
        assert_eq!(ids[0], peers[peers.len() - 1].to_string());
        assert!(!ids.contains(&peers[0].to_string()), "the oldest stayed");
        let addrs = peermirror_routing::bootstrap::parse_entries(&doc).expect("parses");
        assert!(!addrs.is_empty());
    }
}
