//! Finding the first peers: a static list, the A/AAAA records of a DNS name
//! (a Kubernetes headless service), or a JSON list fetched over HTTP or
//! HTTPS with a client certificate (from a bootstrapper). The bootstrap
//! loop retries with backoff until the routing table has a peer, and again
//! whenever it becomes empty; its last failure is kept for `/readyz`.
//!
//! Four things are called bootstrap, each by one name in code and docs:
//! - the **bootstrap source** (this module, `--bootstrap-kind`): where a
//!   node finds its first peers;
//! - the **bootstrap entry** ([`serve_entry`], `--http-bootstrap-addr`):
//!   the list of its own addresses a node serves for other nodes' HTTP
//!   sources;
//! - the **bootstrapper** (`peermirror bootstrapper`): the mTLS server that
//!   nodes register with and read the others from;
//! - Kademlia's **bootstrap** ([`P2pRouter::bootstrap`]): a lookup of the
//!   node's own id that fills its routing table once it has a peer.

use peermirror_net::Backoff;
use peermirror_net::acceptor::{Acceptor, AcceptorConfig, HttpDeadlines, serve_http1};
use peermirror_net::client::{ClientTls, Dialled, dial, http1};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::p2p::P2pRouter;
use super::{Router, RouterError};
use peermirror_net::tls::{TlsFiles, TlsState};

/// Where the first peers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapConfig {
    /// No bootstrap: this node waits to be dialled.
    None,
    /// Fixed multiaddrs (`/ip4/10.0.0.1/tcp/5001[/p2p/<id>]`).
    Static(Vec<Multiaddr>),
    /// Every A/AAAA record of a name, on the P2P port.
    Dns { domain: String, port: u16 },
    /// A bootstrap document (see [`parse_entries`]) served at an `http://`
    /// or `https://` URL; with `tls`, the server is verified against its CA
    /// and this node presents a client certificate (files reloaded when
    /// they change). With `register`, this node also puts its own entry
    /// there (`PUT <url>/<peer id>`) and renews it.
    Http {
        url: String,
        tls: Option<TlsFiles>,
        register: bool,
    },
}

/// Where the first peers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BootstrapKind {
    /// None: this node waits to be dialled.
    None,
    /// `--static-bootstrap-peers`.
    Static,
    /// `--dns-bootstrap-domain`.
    Dns,
    /// `--http-bootstrap-url`.
    Http,
}

/// How this node finds its first peers, as the operator gives it; checked
/// into a [`BootstrapConfig`] by [`BootstrapArgs::config`].
#[derive(Debug, Clone, clap::Args)]
pub struct BootstrapArgs {
    /// How this node finds its first peers.
    #[arg(long, env = "PEERMIRROR_BOOTSTRAP_KIND", value_enum, default_value_t = BootstrapKind::None)]
    pub bootstrap_kind: BootstrapKind,

    /// Peers to dial with `--bootstrap-kind static`, comma-separated
    /// multiaddrs (`/ip4/10.0.0.1/tcp/5001[/p2p/<peer id>]`).
    #[arg(long, env = "PEERMIRROR_STATIC_BOOTSTRAP_PEERS", value_delimiter = ',', num_args = 1..)]
    pub static_bootstrap_peers: Vec<Multiaddr>,

    /// With `--bootstrap-kind dns`: a name whose A/AAAA records are the peers
    /// (a Kubernetes headless service); they are dialled on the P2P port.
    #[arg(long, env = "PEERMIRROR_DNS_BOOTSTRAP_DOMAIN")]
    pub dns_bootstrap_domain: Option<String>,

    /// With `--bootstrap-kind http`: an `http://` or `https://` URL answering
    /// a bootstrap document: a JSON array of peer multiaddrs (see
    /// `--http-bootstrap-addr`), or Spegel's `{"ID", "Addrs"}` entries (see
    /// `peermirror bootstrapper`).
    #[arg(
        long,
        env = "PEERMIRROR_HTTP_BOOTSTRAP_URL",
        alias = "http-bootstrap-peer"
    )]
    pub http_bootstrap_url: Option<String>,

    /// For an `https://` bootstrap URL: a directory with `ca.crt` (verifies
    /// the server), `tls.crt` and `tls.key` (this node's client
    /// certificate), as a Kubernetes TLS secret mounts them; reloaded when
    /// they change.
    #[arg(long, env = "PEERMIRROR_HTTP_BOOTSTRAP_CERT_DIR")]
    pub http_bootstrap_cert_dir: Option<std::path::PathBuf>,

    /// Register this node's entry at the bootstrap URL (`PUT <url>/<peer
    /// id>`, renewed while it runs), as `peermirror bootstrapper` expects.
    #[arg(long, env = "PEERMIRROR_HTTP_BOOTSTRAP_REGISTER")]
    pub http_bootstrap_register: bool,

    /// Serve this node's own entry (a JSON array of its multiaddrs) on this
    /// address, for other nodes' `--http-bootstrap-url`.
    #[arg(long, env = "PEERMIRROR_HTTP_BOOTSTRAP_ADDR", value_parser = peermirror_net::flags::parse_listen_addr)]
    pub http_bootstrap_addr: Option<std::net::SocketAddr>,
}

/// A bootstrap kind given without what it needs.
#[derive(Debug, thiserror::Error)]
#[error("--bootstrap-kind {kind} needs {flag}")]
pub struct MissingBootstrap {
    pub kind: &'static str,
    pub flag: &'static str,
}

impl BootstrapArgs {
    /// The bootstrap source these flags describe; DNS names are dialled on
    /// `p2p_port`.
    pub fn config(&self, p2p_port: u16) -> Result<BootstrapConfig, MissingBootstrap> {
        Ok(match self.bootstrap_kind {
            BootstrapKind::None => BootstrapConfig::None,
            BootstrapKind::Static if self.static_bootstrap_peers.is_empty() => {
                return Err(MissingBootstrap {
                    kind: "static",
                    flag: "--static-bootstrap-peers",
                });
            }
            BootstrapKind::Static => BootstrapConfig::Static(self.static_bootstrap_peers.clone()),
            BootstrapKind::Dns => BootstrapConfig::Dns {
                domain: self.dns_bootstrap_domain.clone().ok_or(MissingBootstrap {
                    kind: "dns",
                    flag: "--dns-bootstrap-domain",
                })?,
                port: p2p_port,
            },
            BootstrapKind::Http => BootstrapConfig::Http {
                url: self.http_bootstrap_url.clone().ok_or(MissingBootstrap {
                    kind: "http",
                    flag: "--http-bootstrap-url",
                })?,
                tls: self
                    .http_bootstrap_cert_dir
                    .as_deref()
                    .map(peermirror_net::tls::TlsFiles::from_secret_dir),
                register: self.http_bootstrap_register,
            },
        })
    }
}

impl BootstrapConfig {
    pub fn is_configured(&self) -> bool {
        !matches!(self, BootstrapConfig::None)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("resolving {domain}: {source}")]
    Dns {
        domain: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid bootstrap URL {url:?}: only http(s)://host[:port]/path is supported")]
    Url { url: String },
    #[error("{url} is https: it needs --http-bootstrap-cert-dir (ca.crt, tls.crt, tls.key)")]
    NoTls { url: String },
    #[error("bootstrap certificates: {0}")]
    Tls(#[from] peermirror_net::tls::TlsError),
    #[error("fetching {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url} did not answer a JSON array of multiaddrs: {reason}")]
    Body { url: String, reason: String },
}

/// Largest bootstrap document a node reads; `peermirror bootstrapper`
/// serves no more than this.
pub const MAX_DOCUMENT: usize = 1 << 20;
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// The peers to dial, according to `config` (an HTTP source is checked
/// and connected afresh; a running node keeps its client in [`Bootstrap`]).
pub async fn discover(config: &BootstrapConfig) -> Result<Vec<Multiaddr>, BootstrapError> {
    discover_with(config, None).await
}

async fn discover_with(
    config: &BootstrapConfig,
    client: Option<&HttpClient>,
) -> Result<Vec<Multiaddr>, BootstrapError> {
    match config {
        BootstrapConfig::None => Ok(Vec::new()),
        BootstrapConfig::Static(addrs) => Ok(addrs.clone()),
        BootstrapConfig::Dns { domain, port } => {
            // The system resolver (getaddrinfo): /etc/hosts, search domains
            // and the cluster DNS behave as for every other program.
            let addrs = tokio::net::lookup_host((domain.as_str(), *port))
                .await
                .map_err(|source| BootstrapError::Dns {
                    domain: domain.clone(),
                    source,
                })?;
            let mut out: Vec<Multiaddr> = addrs
                .map(|a| Multiaddr::from(a.ip()).with(Protocol::Tcp(a.port())))
                .collect();
            out.dedup();
            Ok(out)
        }
        BootstrapConfig::Http { url, tls, .. } => match client {
            Some(c) => c.fetch().await,
            None => HttpClient::new(url, tls.clone())?.fetch().await,
        },
    }
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Url {
    https: bool,
    /// `host:port`, for connecting and the `Host` header.
    authority: String,
    /// The host alone (no brackets), the name the server's certificate
    /// must carry.
    host: String,
    path: String,
}

fn split_url(url: &str) -> Option<Url> {
    let uri: hyper::Uri = url.parse().ok()?;
    let https = match uri.scheme_str()? {
        "https" => true,
        "http" => false,
        _ => return None,
    };
    let authority = uri.authority()?;
    if authority.as_str().contains('@') {
        return None;
    }
    // `[::1]` keeps its brackets in the authority, not in the name.
    let host = authority.host();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() {
        return None;
    }
    // `http::Uri` takes a port beyond 65535 for none at all.
    let port = match authority.port_u16() {
        Some(port) => port,
        None if authority.as_str() != host => return None,
        None if https => 443,
        None => 80,
    };
    Some(Url {
        https,
        authority: format!("{host}:{port}"),
        host: bare.to_string(),
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
    })
}

/// An error with its causes (`a: b: c`), each said once: hyper's own
/// message alone hides why a TLS connection was closed.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Fetches the bootstrap document (and registers this node) over HTTP or
/// HTTPS with a client certificate.
pub struct HttpClient {
    url: String,
    parsed: Url,
    tls: Option<Arc<TlsState>>,
}

impl HttpClient {
    pub fn new(url: &str, tls: Option<TlsFiles>) -> Result<HttpClient, BootstrapError> {
        let parsed = split_url(url).ok_or_else(|| BootstrapError::Url {
            url: url.to_string(),
        })?;
        if parsed.https && tls.is_none() {
            return Err(BootstrapError::NoTls {
                url: url.to_string(),
            });
        }
        let tls = match tls {
            Some(files) if parsed.https => Some(TlsState::load(files)?),
            _ => None,
        };
        Ok(HttpClient {
            url: url.to_string(),
            parsed,
            tls,
        })
    }

    fn http_err(&self, reason: String) -> BootstrapError {
        BootstrapError::Http {
            url: self.url.clone(),
            reason,
        }
    }

    /// One request; the status and the body (at most [`MAX_DOCUMENT`]).
    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(hyper::StatusCode, Bytes), BootstrapError> {
        if let Some(tls) = &self.tls
            && let Err(e) = tls.reload_if_changed()
        {
            tracing::warn!(error = %e, "bootstrap certificates changed but do not load; keeping the previous ones");
        }
        let url = &self.parsed;
        let exchange = async {
            let tls = match &self.tls {
                Some(tls) => Some(ClientTls {
                    config: tls.client_config(),
                    name: rustls::pki_types::ServerName::try_from(url.host.clone())
                        .map_err(|e| self.http_err(chain(&e)))?,
                }),
                None => None,
            };
            let stream = dial(url.authority.as_str(), tls, HTTP_TIMEOUT)
                .await
                .map_err(|e| self.http_err(chain(&e)))?;
            let mut request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", &url.authority);
            if body.is_some() {
                request = request.header("content-type", "application/json");
            }
            let request = request
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| self.http_err(chain(&e)))?;
            self.exchange(stream, request).await
        };
        tokio::time::timeout(HTTP_TIMEOUT, exchange)
            .await
            .map_err(|_| self.http_err(format!("no answer within {HTTP_TIMEOUT:?}")))?
    }

    async fn exchange(
        &self,
        stream: Dialled,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(hyper::StatusCode, Bytes), BootstrapError> {
        let mut sender = http1(stream, None)
            .await
            .map_err(|e| self.http_err(chain(&e)))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.http_err(chain(&e)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| self.http_err(chain(&*e)))?;
        Ok((status, body))
    }

    /// The peers the document lists.
    pub async fn fetch(&self) -> Result<Vec<Multiaddr>, BootstrapError> {
        let (status, body) = self
            .send(hyper::Method::GET, &self.parsed.path, None)
            .await?;
        if !status.is_success() {
            return Err(self.http_err(format!("status {status}")));
        }
        parse_entries(&body).map_err(|reason| BootstrapError::Body {
            url: self.url.clone(),
            reason,
        })
    }

    /// Puts this node's entry at `<url>/<peer id>`; returns how long the
    /// server keeps it (when it says).
    pub async fn register(
        &self,
        peer_id: PeerId,
        addrs: Vec<String>,
    ) -> Result<Option<Duration>, BootstrapError> {
        let path = format!("{}/{peer_id}", self.parsed.path.trim_end_matches('/'));
        let entry = serde_json::json!({ "ID": peer_id.to_string(), "Addrs": addrs });
        let (status, body) = self
            .send(
                hyper::Method::PUT,
                &path,
                Some(entry.to_string().into_bytes()),
            )
            .await?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(self.http_err(format!(
                "registration answered {status}: {}",
                peermirror_oci::excerpt(text.trim())
            )));
        }
        let ttl = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("ttl_seconds")?.as_u64())
            .map(Duration::from_secs);
        Ok(ttl)
    }
}

/// One entry of Spegel's bootstrap document: a peer id (optional) and its
/// addresses.
#[derive(serde::Deserialize)]
struct AddrInfo {
    #[serde(rename = "ID", default)]
    id: Option<String>,
    #[serde(rename = "Addrs", default)]
    addrs: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Document {
    /// Ours: `["/ip4/…/tcp/…/p2p/…", …]`.
    Multiaddrs(Vec<String>),
    /// Spegel's current one: `[{"ID": …, "Addrs": […]}, …]`.
    Infos(Vec<AddrInfo>),
    /// Spegel v0.7's: one `{"ID": …, "Addrs": […]}`.
    Info(AddrInfo),
}

/// Most addresses taken from one bootstrap document.
const MAX_ENTRIES: usize = 1024;
/// Most addresses taken for one peer.
const MAX_ADDRS_PER_PEER: usize = 4;

/// The peers of a bootstrap document in any of the accepted formats (see
/// [`Document`]); an `ID` is added to addresses that lack a `/p2p/` part.
///
/// The document may come from a source that anyone with a certificate can
/// write to, so neither its order nor its size decides who is dialled: the
/// peers are taken in a random order, one address of each in turn, at most
/// [`MAX_ADDRS_PER_PEER`] each and [`MAX_ENTRIES`] in all. Entries that list
/// many addresses, or whose ids sort first, cannot fill the list.
pub fn parse_entries(body: &[u8]) -> Result<Vec<Multiaddr>, String> {
    let doc: Document = serde_json::from_slice(body).map_err(|_| {
        "not a JSON array of multiaddrs, nor Spegel's {\"ID\", \"Addrs\"} entries".to_string()
    })?;
    let infos = match doc {
        Document::Multiaddrs(addrs) => vec![AddrInfo { id: None, addrs }],
        Document::Infos(infos) => infos,
        Document::Info(info) => vec![info],
    };
    // Addresses grouped by peer (an address without a peer id is a group
    // of its own), in the document's order within each group.
    let mut groups: Vec<Vec<Multiaddr>> = Vec::new();
    let mut by_peer: std::collections::HashMap<PeerId, usize> = std::collections::HashMap::new();
    for info in infos {
        let id = info
            .id
            .map(|id| {
                id.parse::<PeerId>().map_err(|e| {
                    format!("{:?} is not a peer id: {e}", peermirror_oci::excerpt(&id))
                })
            })
            .transpose()?;
        for text in info.addrs {
            let mut addr: Multiaddr = text
                .parse()
                .map_err(|e| format!("{:?}: {e}", peermirror_oci::excerpt(&text)))?;
            let peer = addr.iter().find_map(|p| match p {
                Protocol::P2p(peer) => Some(peer),
                _ => None,
            });
            let peer = match (peer, id) {
                // An entry's address for another peer: not taken (it would
                // let one entry stand for many peers).
                (Some(peer), Some(id)) if peer != id => continue,
                (None, Some(id)) => {
                    addr.push(Protocol::P2p(id));
                    Some(id)
                }
                (peer, _) => peer,
            };
            match peer {
                Some(peer) => {
                    let group = *by_peer.entry(peer).or_insert_with(|| {
                        groups.push(Vec::new());
                        groups.len() - 1
                    });
                    if groups[group].len() < MAX_ADDRS_PER_PEER {
                        groups[group].push(addr);
                    }
                }
                None => groups.push(vec![addr]),
            }
        }
    }
    rand::seq::SliceRandom::shuffle(groups.as_mut_slice(), &mut rand::thread_rng());
    let mut out = Vec::new();
    for round in 0..MAX_ADDRS_PER_PEER {
        for group in &groups {
            if out.len() >= MAX_ENTRIES {
                return Ok(out);
            }
            if let Some(addr) = group.get(round) {
                out.push(addr.clone());
            }
        }
    }
    Ok(out)
}

/// What the bootstrap source said last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SourceState {
    /// Not asked yet.
    #[default]
    Unasked,
    /// It answered, naming this many nodes other than this one. Zero makes
    /// a single-node cluster: ready on its own.
    Named { others: usize },
    /// The last query failed, for this reason.
    Failed(String),
}

/// Gauges of the bootstrap source.
#[derive(Clone, Default)]
pub struct SourceGauges {
    /// Nodes other than this one that the last successful answer named.
    pub nodes: prometheus_client::metrics::gauge::Gauge,
    /// 1 while the last query succeeded, 0 after a failure.
    pub up: prometheus_client::metrics::gauge::Gauge,
}

impl SourceGauges {
    /// Creates the gauges and registers them in `registry`, under the
    /// daemon's `peermirror_` prefix.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> SourceGauges {
        let gauges = SourceGauges::default();
        let r = registry.sub_registry_with_prefix("peermirror");
        r.register(
            "bootstrap_source_nodes",
            "Nodes other than this one that the bootstrap source named in its last answer (0: a single-node cluster)",
            gauges.nodes.clone(),
        );
        r.register(
            "bootstrap_source_up",
            "1 while the last query of the bootstrap source succeeded, 0 after a failure",
            gauges.up.clone(),
        );
        gauges
    }
}

/// The bootstrap source of a running node, and how its last attempt went.
pub struct Bootstrap {
    config: BootstrapConfig,
    client: Option<HttpClient>,
    state: std::sync::Mutex<SourceState>,
    gauges: SourceGauges,
}

impl Bootstrap {
    /// Checks the configuration (URL, certificate files) once, at start.
    pub fn new(
        config: BootstrapConfig,
        gauges: SourceGauges,
    ) -> Result<Arc<Bootstrap>, BootstrapError> {
        let client = match &config {
            BootstrapConfig::Http { url, tls, .. } => Some(HttpClient::new(url, tls.clone())?),
            _ => None,
        };
        Ok(Arc::new(Bootstrap {
            config,
            client,
            state: std::sync::Mutex::new(SourceState::Unasked),
            gauges,
        }))
    }

    /// What the source said last.
    pub fn state(&self) -> SourceState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why the node has no peer from its source yet, while it has none: the
    /// last failure, or the nodes it named that did not answer.
    pub fn last_error(&self) -> Option<String> {
        match self.state() {
            SourceState::Failed(e) => Some(e),
            SourceState::Named { others } if others > 0 => Some(format!(
                "it named {others} other node{}, none reachable yet",
                if others == 1 { "" } else { "s" }
            )),
            _ => None,
        }
    }

    fn record(&self, state: SourceState) {
        match &state {
            SourceState::Named { others } => {
                self.gauges.nodes.set(*others as i64);
                self.gauges.up.set(1);
            }
            SourceState::Failed(_) => {
                self.gauges.up.set(0);
            }
            SourceState::Unasked => {}
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// Dials the bootstrap peers until the routing table has one, retrying
    /// with backoff; afterwards checks every 30 s and starts over when it
    /// is empty. A source that answers and names no other node makes this
    /// a single-node cluster: the router stops waiting for peers (it keeps
    /// asking, so a node that joins later is found). Returns at `shutdown`,
    /// or with an error when the router has stopped.
    pub async fn run(
        self: Arc<Self>,
        router: P2pRouter,
        shutdown: CancellationToken,
    ) -> Result<(), RouterError> {
        let mut status = router.watch_status();
        // Each round waits longer, whether it found peers or not: dials
        // take a moment, and a source that names nobody is asked less often.
        let mut rounds = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        // Telling this node's own entry from the others needs its P2P port:
        // the first round waits (briefly) until the router listens.
        let listening = async {
            while router.status().listen_addrs.is_empty() {
                if status.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::timeout(Duration::from_secs(5), listening) => {}
        }
        loop {
            if router.status().routing_table_peers == 0 {
                match discover_with(&self.config, self.client.as_ref()).await {
                    Ok(addrs) => {
                        let own = OwnNode {
                            id: router.peer_id(),
                            ips: peermirror_net::interface_addresses(),
                            ports: tcp_ports(&router.status().listen_addrs),
                        };
                        let others = own.others(addrs);
                        if others.is_empty() {
                            tracing::debug!(config = ?self.config, "the bootstrap source names no other node: a single-node cluster so far");
                        } else {
                            tracing::debug!(addrs = ?others, "dialling bootstrap peers");
                        }
                        router.expect_peers(!others.is_empty()).await?;
                        self.record(SourceState::Named {
                            others: others.len(),
                        });
                        for addr in others {
                            router.dial(addr).await?;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bootstrap failed; retrying");
                        router.expect_peers(true).await?;
                        self.record(SourceState::Failed(e.to_string()));
                    }
                }
                // Give the dials a moment, then ask the new peers for theirs.
                let delay = rounds.failed();
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                router.bootstrap().await?;
            } else {
                rounds.reset();
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = status.changed() => r.map_err(|_| RouterError::Stopped)?,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
    }

    /// Whether this node puts its own entry at the bootstrap URL.
    pub fn registers(&self) -> bool {
        matches!(self.config, BootstrapConfig::Http { register: true, .. })
    }

    /// Registers this node's entry and renews it at a third of the time the
    /// server keeps it (every minute when it does not say), retrying with
    /// backoff; failures are logged.
    pub async fn register_loop(
        self: Arc<Self>,
        entry: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
        peer_id: PeerId,
        shutdown: CancellationToken,
    ) {
        let Some(client) = self.client.as_ref().filter(|_| self.registers()) else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let addrs = entry();
            let wait = if addrs.is_empty() {
                // Not listening on a reachable address yet.
                Duration::from_millis(500)
            } else {
                match client.register(peer_id, addrs).await {
                    Ok(ttl) => {
                        if backoff.failures() > 0 {
                            tracing::info!("registered with the bootstrapper again");
                        }
                        backoff.reset();
                        (ttl.unwrap_or(Duration::from_secs(180)) / 3).max(Duration::from_secs(1))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register with the bootstrapper; retrying");
                        backoff.failed()
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// What identifies this node among the addresses a source names.
struct OwnNode {
    id: PeerId,
    ips: std::collections::HashSet<IpAddr>,
    /// The TCP ports the P2P port listens on.
    ports: Vec<u16>,
}

impl OwnNode {
    /// The addresses that name another node: not this node's peer id, nor
    /// one of its own addresses on its own P2P port (a headless Service or
    /// a static list names every node, this one too).
    fn others(&self, addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
        addrs
            .into_iter()
            .filter(|addr| {
                let mut ip = None;
                let mut port = None;
                for p in addr.iter() {
                    match p {
                        Protocol::P2p(id) if id == self.id => return false,
                        Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
                        Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
                        Protocol::Tcp(p) => port = Some(p),
                        _ => {}
                    }
                }
                let own_ip = ip.is_some_and(|ip| self.ips.contains(&ip.to_canonical()));
                let own_port = port.is_some_and(|p| self.ports.contains(&p));
                !(own_ip && own_port)
            })
            .collect()
    }
}

/// The TCP ports of `addrs`.
fn tcp_ports(addrs: &[Multiaddr]) -> Vec<u16> {
    addrs
        .iter()
        .flat_map(|a| a.iter())
        .filter_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .collect()
}

/// This node's bootstrap entry: its reachable P2P addresses with its peer
/// id. With an advertised address, that address on the port listened on.
pub fn own_entry(
    listen_addrs: &[Multiaddr],
    advertise: Option<IpAddr>,
    peer_id: PeerId,
) -> Vec<String> {
    let port = listen_addrs
        .iter()
        .flat_map(|a| a.iter())
        .find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        });
    let chosen: Vec<Multiaddr> = match (advertise, port) {
        (Some(ip), Some(port)) => vec![Multiaddr::from(ip).with(Protocol::Tcp(port))],
        _ => listen_addrs
            .iter()
            .filter(|a| {
                a.iter().all(|p| match p {
                    Protocol::Ip4(ip) => !ip.is_loopback() && !ip.is_unspecified(),
                    Protocol::Ip6(ip) => !ip.is_loopback() && !ip.is_unspecified(),
                    _ => true,
                })
            })
            .cloned()
            .collect(),
    };
    chosen
        .into_iter()
        .map(|a| a.with(Protocol::P2p(peer_id)).to_string())
        .collect()
}

/// Connections the bootstrap entry serves at once from other hosts.
const MAX_ENTRY_CONNECTIONS: usize = 32;
/// Of those, from one host at most.
const MAX_ENTRY_CONNECTIONS_PER_SOURCE: usize = 4;
/// A connection that sends nothing, or reads nothing of its answer, for
/// this long is closed.
const ENTRY_DEADLINES: HttpDeadlines = HttpDeadlines {
    idle: Duration::from_secs(10),
    request: Duration::from_secs(10),
};

/// Serves this node's own entry (a JSON array of its multiaddrs with peer
/// id) for `--http-bootstrap-url` of other nodes.
pub async fn serve_entry(
    listener: TcpListener,
    entry: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    shutdown: CancellationToken,
) {
    let acceptor = Acceptor::new(AcceptorConfig::new(
        "bootstrap entry",
        MAX_ENTRY_CONNECTIONS,
        MAX_ENTRY_CONNECTIONS_PER_SOURCE,
        4,
    ));
    let stop = shutdown.clone();
    let handle = move |stream, _peer| {
        let (entry, shutdown) = (entry.clone(), stop.clone());
        async move {
            let service = hyper::service::service_fn(move |_req| {
                let body = serde_json::to_vec(&entry()).unwrap_or_default();
                async move {
                    hyper::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                }
            });
            serve_http1(stream, service, ENTRY_DEADLINES, &shutdown).await;
        }
    };
    acceptor.run(listener, shutdown, handle).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_lists_reachable_addresses_with_the_peer_id() {
        let id = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let listening: Vec<Multiaddr> = [
            "/ip4/127.0.0.1/tcp/5001",
            "/ip4/10.0.0.7/tcp/5001",
            "/ip6/::1/tcp/5001",
        ]
        .iter()
        .map(|a| a.parse().expect("multiaddr"))
        .collect();
        assert_eq!(
            own_entry(&listening, None, id),
            vec![format!("/ip4/10.0.0.7/tcp/5001/p2p/{id}")]
        );
        let advertised = own_entry(&listening, Some("192.0.2.9".parse().expect("ip")), id);
        assert_eq!(
            advertised,
            vec![format!("/ip4/192.0.2.9/tcp/5001/p2p/{id}")]
        );
        assert!(own_entry(&[], None, id).is_empty());
    }

    #[test]
    fn every_bootstrap_format_is_read() {
        let id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
        let ours = format!(r#"["/ip4/10.0.0.1/tcp/5001/p2p/{id}"]"#);
        let spegel = format!(
            r#"[{{"ID":"{id}","Addrs":["/ip4/10.0.0.1/tcp/5001","/ip4/10.0.0.2/tcp/5001/p2p/{id}"]}},{{"Addrs":["/ip4/10.0.0.3/tcp/5001"]}}]"#
        );
        let old = format!(r#"{{"ID":"{id}","Addrs":["/ip4/10.0.0.1/tcp/5001"]}}"#);
        // Sorted: the peers come in a random order.
        let texts = |b: &str| -> Vec<String> {
            let mut texts: Vec<String> = parse_entries(b.as_bytes())
                .expect("valid")
                .iter()
                .map(|a| a.to_string())
                .collect();
            texts.sort();
            texts
        };
        let with_id = format!("/ip4/10.0.0.1/tcp/5001/p2p/{id}");
        assert_eq!(texts(&ours), std::slice::from_ref(&with_id));
        assert_eq!(
            texts(&spegel),
            [
                with_id.clone(),
                format!("/ip4/10.0.0.2/tcp/5001/p2p/{id}"),
                "/ip4/10.0.0.3/tcp/5001".to_string()
            ]
        );
        assert_eq!(texts(&old), [with_id]);
        for bad in [
            "",
            "{}x",
            "[1, 2]",
            r#"["not a multiaddr"]"#,
            r#"{"ID":"nope","Addrs":["/ip4/10.0.0.1/tcp/1"]}"#,
        ] {
            assert!(parse_entries(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..5000)
            .map(|i| format!("/ip4/10.0.{}.{}/tcp/1", i / 250, i % 250))
            .collect();
        let many = serde_json::to_vec(&many).expect("json");
        assert_eq!(parse_entries(&many).expect("valid").len(), MAX_ENTRIES);
    }

    /// 64 entries of 16 addresses each, whose ids sort before the real
    /// node's, once filled the 1,024 addresses a node dials; the real node
    /// at the end was never dialled.
    #[test]
    fn junk_entries_cannot_crowd_out_a_real_node() {
        let peer = || {
            libp2p::identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id()
                .to_string()
        };
        let mut junk: Vec<String> = (0..64).map(|_| peer()).collect();
        junk.sort();
        let mut entries: Vec<serde_json::Value> = junk
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let addrs: Vec<String> = (0..16)
                    .map(|j| format!("/ip4/10.66.{i}.{j}/tcp/5001"))
                    .collect();
                serde_json::json!({ "ID": id, "Addrs": addrs })
            })
            .collect();
        // An entry whose addresses name other peers counts as one peer
        // with none of them.
        let others: Vec<String> = (0..16)
            .map(|j| format!("/ip4/10.67.0.{j}/tcp/5001/p2p/{}", peer()))
            .collect();
        entries.push(serde_json::json!({ "ID": peer(), "Addrs": others }));
        let real = peer();
        entries.push(serde_json::json!({ "ID": real, "Addrs": ["/ip4/10.0.0.1/tcp/5001"] }));
        let doc = serde_json::to_vec(&entries).expect("json");
        for _ in 0..20 {
            let addrs = parse_entries(&doc).expect("valid");
            assert!(
                addrs.iter().any(|a| a.to_string().ends_with(&real)),
                "the real node is not among {} addresses",
                addrs.len()
            );
            assert_eq!(addrs.len(), 64 * MAX_ADDRS_PER_PEER + 1);
        }
        // More peers than fit: one address of each before a second of any.
        let many: Vec<serde_json::Value> = (0..2 * MAX_ENTRIES)
            .map(|i| {
                serde_json::json!({
                    "ID": peer(),
                    "Addrs": [format!("/ip4/10.1.{}.{}/tcp/1", i / 250, i % 250), "/ip4/10.2.0.1/tcp/1"],
                })
            })
            .collect();
        let addrs = parse_entries(&serde_json::to_vec(&many).expect("json")).expect("valid");
        assert_eq!(addrs.len(), MAX_ENTRIES);
        assert!(
            addrs
                .iter()
                .all(|a| a.to_string().starts_with("/ip4/10.1."))
        );
    }

    #[test]
    fn urls() {
        let parts = |u: &str| split_url(u).map(|u| (u.https, u.authority, u.host, u.path));
        let t = |https, a: &str, h: &str, p: &str| Some((https, a.into(), h.into(), p.into()));
        assert_eq!(
            parts("http://a.b:8080/x/y"),
            t(false, "a.b:8080", "a.b", "/x/y")
        );
        assert_eq!(parts("http://a.b"), t(false, "a.b:80", "a.b", "/"));
        assert_eq!(
            parts("http://[::1]:81/p"),
            t(false, "[::1]:81", "::1", "/p")
        );
        assert_eq!(parts("https://[::1]/p"), t(true, "[::1]:443", "::1", "/p"));
        assert_eq!(
            parts("https://boot.example:8443/bootstrap-nodes"),
            t(
                true,
                "boot.example:8443",
                "boot.example",
                "/bootstrap-nodes"
            )
        );
        for bad in [
            "ftp://a/",
            "http:///x",
            "https://",
            "http://a:99999/",
            "http://u@a/",
            "http://[]/",
        ] {
            assert_eq!(split_url(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn dns_resolves_every_address() {
        let addrs = discover(&BootstrapConfig::Dns {
            domain: "localhost".into(),
            port: 5001,
        })
        .await
        .expect("localhost resolves");
        assert!(
            addrs.contains(&"/ip4/127.0.0.1/tcp/5001".parse().expect("multiaddr")),
            "{addrs:?}"
        );
    }

    #[tokio::test]
    async fn http_round_trip_and_bad_documents() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let entry: Arc<dyn Fn() -> Vec<String> + Send + Sync> = Arc::new(|| {
            vec![
                "/ip4/10.1.2.3/tcp/5001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                    .into(),
            ]
        });
        tokio::spawn(serve_entry(listener, entry, shutdown.clone()));
        let got = discover(&BootstrapConfig::Http {
            url: format!("http://{addr}/"),
            tls: None,
            register: false,
        })
        .await
        .expect("fetch");
        assert_eq!(got.len(), 1);
        assert!(
            got[0]
                .to_string()
                .starts_with("/ip4/10.1.2.3/tcp/5001/p2p/")
        );
        shutdown.cancel();

        // A server that answers something else.
        let bad = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let bad_addr = bad.local_addr().expect("addr");
        let bad_entry: Arc<dyn Fn() -> Vec<String> + Send + Sync> =
            Arc::new(|| vec!["not a multiaddr".into()]);
        let stop = CancellationToken::new();
        tokio::spawn(serve_entry(bad, bad_entry, stop.clone()));
        let err = discover(&BootstrapConfig::Http {
            url: format!("http://{bad_addr}/"),
            tls: None,
            register: false,
        })
        .await
        .expect_err("bad entry");
        assert!(matches!(err, BootstrapError::Body { .. }), "{err}");
        stop.cancel();
        let err = discover(&BootstrapConfig::Http {
            url: "ftp://x/".into(),
            tls: None,
            register: false,
        })
        .await
        .expect_err("bad url");
        assert!(matches!(err, BootstrapError::Url { .. }));
        let err = discover(&BootstrapConfig::Http {
            url: "https://x/".into(),
            tls: None,
            register: false,
        })
        .await
        .expect_err("https without certificates");
        assert!(matches!(err, BootstrapError::NoTls { .. }), "{err}");
    }

    #[test]
    fn a_source_naming_only_this_node_names_no_other() {
        let id = PeerId::random();
        let other = PeerId::random();
        let own = OwnNode {
            id,
            ips: [
                "10.0.0.1".parse().expect("ip"),
                "127.0.0.1".parse().expect("ip"),
            ]
            .into_iter()
            .collect(),
            ports: vec![5001],
        };
        let addr = |s: &str| s.parse::<Multiaddr>().expect("multiaddr");
        // Itself by address (a headless Service, a static list) or by id.
        assert!(own.others(vec![addr("/ip4/10.0.0.1/tcp/5001")]).is_empty());
        assert!(
            own.others(vec![addr(&format!("/ip4/10.9.9.9/tcp/5001/p2p/{id}"))])
                .is_empty()
        );
        // Another node: another address, or another port on this host.
        let named = vec![
            addr("/ip4/10.0.0.1/tcp/5001"),
            addr("/ip4/10.0.0.2/tcp/5001"),
            addr(&format!("/ip4/10.0.0.1/tcp/6001/p2p/{other}")),
        ];
        assert_eq!(own.others(named.clone()), named[1..].to_vec());
    }
}
