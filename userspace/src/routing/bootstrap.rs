//! Finding the first peers: a static list, the A/AAAA records of a DNS name
//! (a Kubernetes headless service), or a JSON list fetched over HTTP. The
//! bootstrap loop retries with backoff until the routing table has a peer,
//! and again whenever it becomes empty.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::p2p::P2pRouter;
use super::{Router, RouterError};

/// Where the first peers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapConfig {
    /// No bootstrap: this node waits to be dialled.
    None,
    /// Fixed multiaddrs (`/ip4/10.0.0.1/tcp/5001[/p2p/<id>]`).
    Static(Vec<Multiaddr>),
    /// Every A/AAAA record of a name, on the P2P port.
    Dns { domain: String, port: u16 },
    /// A JSON array of multiaddr strings served at an `http://` URL.
    Http { url: String },
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
    #[error("invalid bootstrap URL {url:?}: only http://host[:port]/path is supported")]
    Url { url: String },
    #[error("fetching {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url} did not answer a JSON array of multiaddrs: {reason}")]
    Body { url: String, reason: String },
}

/// Largest bootstrap document accepted.
const MAX_BODY: usize = 1 << 20;
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// The peers to dial, according to `config`.
pub async fn discover(config: &BootstrapConfig) -> Result<Vec<Multiaddr>, BootstrapError> {
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
        BootstrapConfig::Http { url } => fetch_http(url).await,
    }
}

fn split_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Some((authority, path.to_string()))
}

async fn fetch_http(url: &str) -> Result<Vec<Multiaddr>, BootstrapError> {
    let (authority, path) = split_url(url).ok_or_else(|| BootstrapError::Url {
        url: url.to_string(),
    })?;
    let http_err = |reason: String| BootstrapError::Http {
        url: url.to_string(),
        reason,
    };
    let body = tokio::time::timeout(HTTP_TIMEOUT, async {
        let stream = TcpStream::connect(&authority)
            .await
            .map_err(|e| http_err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_err(e.to_string()))?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", &authority)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| http_err(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_err(e.to_string()))?;
        if !response.status().is_success() {
            return Err(http_err(format!("status {}", response.status())));
        }
        Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| http_err(e.to_string()))
    })
    .await
    .map_err(|_| http_err(format!("no answer within {HTTP_TIMEOUT:?}")))??;
    parse_entries(&body).map_err(|reason| BootstrapError::Body {
        url: url.to_string(),
        reason,
    })
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

/// The peers of a bootstrap document in any of the accepted formats (see
/// [`Document`]); an `ID` is added to addresses that lack a `/p2p/` part.
pub fn parse_entries(body: &[u8]) -> Result<Vec<Multiaddr>, String> {
    let doc: Document = serde_json::from_slice(body).map_err(|_| {
        "not a JSON array of multiaddrs, nor Spegel's {\"ID\", \"Addrs\"} entries".to_string()
    })?;
    let infos = match doc {
        Document::Multiaddrs(addrs) => vec![AddrInfo { id: None, addrs }],
        Document::Infos(infos) => infos,
        Document::Info(info) => vec![info],
    };
    let mut out = Vec::new();
    for info in infos {
        let id = info
            .id
            .map(|id| {
                id.parse::<PeerId>()
                    .map_err(|e| format!("{:?} is not a peer id: {e}", crate::oci::excerpt(&id)))
            })
            .transpose()?;
        for text in info.addrs {
            let mut addr: Multiaddr = text
                .parse()
                .map_err(|e| format!("{:?}: {e}", crate::oci::excerpt(&text)))?;
            if let Some(id) = id
                && !addr.iter().any(|p| matches!(p, Protocol::P2p(_)))
            {
                addr.push(Protocol::P2p(id));
            }
            if out.len() >= MAX_ENTRIES {
                return Ok(out);
            }
            out.push(addr);
        }
    }
    Ok(out)
}

/// Dials the bootstrap peers until the routing table has one, retrying with
/// backoff; afterwards checks every 30 s and starts over when it is empty.
/// Returns at `shutdown`, or with an error when the router has stopped.
pub async fn run(
    config: BootstrapConfig,
    router: P2pRouter,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let mut status = router.watch_status();
    let mut delay = Duration::from_millis(500);
    loop {
        if router.status().routing_table_peers == 0 {
            match discover(&config).await {
                Ok(addrs) if addrs.is_empty() => {
                    tracing::warn!(?config, "bootstrap found no peers; retrying")
                }
                Ok(addrs) => {
                    tracing::debug!(?addrs, "dialling bootstrap peers");
                    for addr in addrs {
                        router.dial(addr).await?;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "bootstrap failed; retrying"),
            }
            // Give the dials a moment, then ask the new peers for theirs.
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            router.bootstrap().await?;
            delay = (delay * 2).min(Duration::from_secs(30));
        } else {
            delay = Duration::from_millis(500);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = status.changed() => r.map_err(|_| RouterError::Stopped)?,
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    }
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

/// Serves this node's own entry (a JSON array of its multiaddrs with peer
/// id) for `--http-bootstrap-url` of other nodes.
/// Serves at most this many connections at once.
const MAX_ENTRY_CONNECTIONS: usize = 32;
/// A connection that sends nothing, or reads nothing of its answer, for
/// this long is closed.
const ENTRY_IO_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve_http(
    listener: TcpListener,
    entry: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    shutdown: CancellationToken,
) {
    let cap = crate::net::ConnectionCap::new(MAX_ENTRY_CONNECTIONS);
    loop {
        let (stream, _peer): (TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = cap.try_admit() else {
            continue;
        };
        let entry = entry.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |_req| {
                let body = serde_json::to_vec(&entry()).unwrap_or_default();
                async move {
                    hyper::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let io = crate::net::Deadlined::new(stream, ENTRY_IO_TIMEOUT, ENTRY_IO_TIMEOUT);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ENTRY_IO_TIMEOUT)
                .serve_connection(TokioIo::new(io), service)
                .await;
        });
    }
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
        let texts = |b: &str| -> Vec<String> {
            parse_entries(b.as_bytes())
                .expect("valid")
                .iter()
                .map(|a| a.to_string())
                .collect()
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

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://a.b:8080/x/y"),
            Some(("a.b:8080".into(), "/x/y".into()))
        );
        assert_eq!(split_url("http://a.b"), Some(("a.b:80".into(), "/".into())));
        assert_eq!(
            split_url("http://[::1]:81/p"),
            Some(("[::1]:81".into(), "/p".into()))
        );
        assert_eq!(split_url("https://a.b/"), None);
        assert_eq!(split_url("http:///x"), None);
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
        tokio::spawn(serve_http(listener, entry, shutdown.clone()));
        let got = discover(&BootstrapConfig::Http {
            url: format!("http://{addr}/"),
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
        tokio::spawn(serve_http(bad, bad_entry, stop.clone()));
        let err = discover(&BootstrapConfig::Http {
            url: format!("http://{bad_addr}/"),
        })
        .await
        .expect_err("bad entry");
        assert!(matches!(err, BootstrapError::Body { .. }), "{err}");
        stop.cancel();
        let err = discover(&BootstrapConfig::Http {
            url: "ftp://x/".into(),
        })
        .await
        .expect_err("bad url");
        assert!(matches!(err, BootstrapError::Url { .. }));
    }
}
