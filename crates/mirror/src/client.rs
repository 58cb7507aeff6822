//! One HTTP request to a peer's registry port, with its time bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response};
use peermirror_net::client::{ClientTls, DialError, dial, http1};

use peermirror_oci::MIRRORED_HEADER;

/// Why a request to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} sent no response head within {after:?}")]
    HeaderTimeout { addr: SocketAddr, after: Duration },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP with {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{addr} answered {status}")]
    Status { addr: SocketAddr, status: u16 },
    #[error("{addr} answered an unusable response: {reason}")]
    Invalid { addr: SocketAddr, reason: String },
}

/// Bytes read from a peer's socket at a time.
const READ_BUFFER: usize = 512 << 10;

/// Time limits of one request.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub header: Duration,
}

/// Sends `method path` to the peer at `addr` (over mTLS when `tls` is set),
/// marked as mirrored so that the peer answers from its own store only.
/// Dropping the response (or its body) closes the connection.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, String)],
    timeouts: Timeouts,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Response<Incoming>, AttemptError> {
    let mut connection = Connection::open(addr, timeouts, tls).await?;
    connection
        .send(method, path_and_query, headers, timeouts.header)
        .await
}

/// An HTTP/1.1 connection to one peer that can carry several requests in
/// turn (keep-alive): a ranged fetch asks one holder for segment after
/// segment without a new handshake each time. A request may be sent once
/// the body of the previous one was read to its end; dropping an unfinished
/// body closes the connection.
pub struct Connection {
    addr: SocketAddr,
    sender: SendRequest<Empty<Bytes>>,
}

impl Connection {
    /// Connects (and, with `tls`, completes the mTLS handshake) within
    /// `timeouts.connect`.
    pub async fn open(
        addr: SocketAddr,
        timeouts: Timeouts,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Connection, AttemptError> {
        // Peers are dialled by IP: their certificate carries IP SANs.
        let tls = tls.map(|config| ClientTls {
            config,
            name: rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
        });
        let after = timeouts.connect;
        let stream = dial(addr, tls, after).await.map_err(|e| match e {
            DialError::Connect(source) => AttemptError::Connect { addr, source },
            DialError::Tls(source) => AttemptError::Tls { addr, source },
            DialError::Timeout(_) => AttemptError::ConnectTimeout { addr, after },
        })?;
        // Large reads: blob bodies arrive in few, big frames (fewer wakeups,
        // hash updates and writes per gigabyte).
        let sender = tokio::time::timeout(after, http1(stream, Some(READ_BUFFER)))
            .await
            .map_err(|_| AttemptError::ConnectTimeout { addr, after })?
            .map_err(|source| AttemptError::Http { addr, source })?;
        Ok(Connection { addr, sender })
    }

    /// Sends one request and waits up to `header` for the response head.
    pub async fn send(
        &mut self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, String)],
        header: Duration,
    ) -> Result<Response<Incoming>, AttemptError> {
        let addr = self.addr;
        let exchange = async {
            // The previous response's body must have been read to its end.
            self.sender
                .ready()
                .await
                .map_err(|source| AttemptError::Http { addr, source })?;
            let mut builder = Request::builder()
                .method(method)
                .uri(path_and_query)
                .header("host", addr.to_string())
                .header(MIRRORED_HEADER, "1")
                .header(
                    "user-agent",
                    concat!("peermirror/", env!("CARGO_PKG_VERSION")),
                );
            for (name, value) in headers {
                builder = builder.header(*name, value.as_str());
            }
            let request =
                builder
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| AttemptError::Invalid {
                        addr,
                        reason: e.to_string(),
                    })?;
            self.sender
                .send_request(request)
                .await
                .map_err(|source| AttemptError::Http { addr, source })
        };
        tokio::time::timeout(header, exchange)
            .await
            .map_err(|_| AttemptError::HeaderTimeout {
                addr,
                after: header,
            })?
    }
}
