//! A small HTTP/1.1 server for the registry port.
//!
//! The registry only ever answers GET and HEAD, and its big answers are files:
//! owning the socket lets a blob body go from the page cache to the socket
//! with `sendfile` (hyper only writes from userspace buffers). Keep-alive and
//! pipelining work because unconsumed bytes stay in the connection's buffer.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::body::{self, FileBodies};
use super::handler::{Body, Handler, Method, RequestHead, Response};
use peermirror_net::acceptor::{Acceptor, AcceptorConfig, AcceptorCounters, Stream};
use peermirror_net::tls::TlsState;
use prometheus_client::metrics::counter::Counter;

use peermirror_metrics::{self as metrics, Metrics, Source, SourceLabels};
use peermirror_oci::{FOLLOW_HEADER, MIRRORED_HEADER, OciError};

/// Connections of the registry port that only the node itself (loopback
/// or its own address: the local containerd) may use, beyond
/// `--max-connections`.
pub const RESERVED_FOR_LOCAL: usize = 64;

/// Largest request head accepted (request line plus headers).
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// How long an idle keep-alive connection on the registry port is kept.
    #[arg(long, env = "PEERMIRROR_IDLE_TIMEOUT", default_value = "90s", value_parser = peermirror_net::flags::parse_duration)]
    pub idle_timeout: Duration,

    /// How long a client may take to send a request head once it started.
    #[arg(skip = Duration::from_secs(10))]
    pub header_timeout: Duration,

    /// How long a registry client may make no progress reading a response
    /// before its connection is closed.
    #[arg(long, env = "PEERMIRROR_WRITE_TIMEOUT", default_value = "30s", value_parser = peermirror_net::flags::parse_duration)]
    pub write_timeout: Duration,

    /// How long shutdown waits for responses in flight.
    #[arg(skip = Duration::from_secs(10))]
    pub drain_timeout: Duration,

    /// Connections the registry port serves at once; beyond, a new
    /// connection is answered 503 and closed.
    #[arg(long, env = "PEERMIRROR_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            idle_timeout: Duration::from_secs(90),
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// A connection the server can speak HTTP on.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The TCP socket, when what is written to it goes to the wire as is (so
    /// that zero-copy sending is possible).
    fn plain_tcp(&self) -> Option<&TcpStream>;
}

impl Conn for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// Over TLS the bytes are encrypted in userspace (no kTLS on this kernel):
/// file bodies take the buffered path.
impl Conn for tokio_rustls::server::TlsStream<TcpStream> {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

pub struct Server {
    handler: Arc<Handler>,
    config: ServerConfig,
    metrics: Metrics,
    /// How file bodies go out on plain TCP.
    files: FileBodies,
    /// mTLS; when set, the port speaks only TLS.
    tls: Option<Arc<TlsState>>,
}

/// A request head that could not be read or parsed: answered, then closed.
pub(crate) struct BadRequest(OciError);

impl Server {
    /// A plain-HTTP server sending file bodies with sendfile.
    pub fn new(handler: Arc<Handler>, config: ServerConfig, metrics: Metrics) -> Arc<Server> {
        Self::build(handler, config, metrics, FileBodies::Sendfile, None)
    }

    /// A server with every option: how file bodies go out on plain TCP,
    /// and mTLS (then the port speaks only TLS).
    pub fn build(
        handler: Arc<Handler>,
        config: ServerConfig,
        metrics: Metrics,
        files: FileBodies,
        tls: Option<Arc<TlsState>>,
    ) -> Arc<Server> {
        // At least one connection at a time.
        let config = ServerConfig {
            max_connections: config.max_connections.max(1),
            ..config
        };
        Arc::new(Server {
            handler,
            config,
            metrics,
            files,
            tls,
        })
    }

    /// The registry port's acceptor: `--max-connections` from other hosts,
    /// an eighth of them (at least 16) from any one host,
    /// [`RESERVED_FOR_LOCAL`] more for the node itself (the local
    /// containerd); a refused client gets a 503 that tells it to try another
    /// endpoint.
    fn acceptor(&self) -> AcceptorConfig {
        let max = self.config.max_connections;
        let per_source = (max / 8).max(16);
        let mut acceptor =
            AcceptorConfig::new("registry port", max, per_source, RESERVED_FOR_LOCAL);
        let busy = OciError::new(
            503,
            peermirror_oci::ErrorCode::TooManyRequests,
            "too many connections; try another endpoint",
        )
        .to_json();
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
            busy.len()
        );
        acceptor.refusal = Some([head.as_bytes(), &busy[..]].concat().into());
        acceptor.tls = self.tls.clone();
        acceptor.handshake_timeout = self.config.header_timeout;
        acceptor.drain_timeout = self.config.drain_timeout;
        acceptor.counters = AcceptorCounters {
            refused: self.metrics.registry_connections_refused.clone(),
            handshake_failures: self.metrics.tls_handshake_failures.clone(),
            open: self.metrics.registry_connections.clone(),
        };
        acceptor
    }

    /// Accepts connections until `shutdown`, then waits (up to the drain
    /// timeout) for responses in flight.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let acceptor = Acceptor::new(self.acceptor());
        let stop = shutdown.clone();
        let handle = move |stream: Stream, peer: SocketAddr| {
            let (server, shutdown) = (self.clone(), stop.clone());
            async move {
                let local = match &stream {
                    Stream::Plain(tcp) => tcp.local_addr().ok(),
                    Stream::Tls(tls) => tls.get_ref().0.local_addr().ok(),
                };
                let from_node = peermirror_net::acceptor::is_local(local, peer);
                let result = match stream {
                    Stream::Plain(tcp) => server.connection(tcp, peer, from_node, shutdown).await,
                    Stream::Tls(tls) => server.connection(*tls, peer, from_node, shutdown).await,
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
            }
        };
        acceptor.run(listener, shutdown, handle).await;
    }

    /// Serves requests on one connection until it closes; `from_node`: the
    /// client is this node itself (see [`RequestHead::from_node`]).
    pub async fn connection<C: Conn>(
        &self,
        mut conn: C,
        peer: SocketAddr,
        from_node: bool,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            let parsed = match self.read_head(&mut conn, &mut buf, &shutdown).await {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(BadRequest(e)) => {
                    let response = Response::error(metrics::RouteKind::Other, &e);
                    self.write_response(&mut conn, response, Method::Other, true)
                        .await?;
                    return Ok(());
                }
            };
            let started = Instant::now();
            let head = RequestHead {
                method: parsed.method,
                target: parsed.target,
                range: parsed.range,
                mirrored: parsed.mirrored,
                follow: parsed.follow,
                // Every mTLS client showed a certificate of the cluster's CA.
                certified: self.tls.is_some(),
                client: peer,
                from_node,
            };
            let mut response = self.handler.handle(&head).await;
            // A request with a body is not something a registry client sends
            // on GET/HEAD; answer it and close rather than parse the body.
            let close = !parsed.keep_alive || parsed.has_body || shutdown.is_cancelled();
            if parsed.has_body && response.status < 400 {
                response = Response::error(
                    response.route,
                    &OciError::unsupported(400, "request bodies are not accepted"),
                );
            }
            let (route, status) = (response.route, response.status);
            let body_bytes = if head.method == Method::Head {
                0
            } else {
                response.content_length
            };
            let source = response.body.source();
            tracing::debug!(%peer, method = ?head.method, target = %head.target, range = ?head.range, mirrored = head.mirrored, status, "request");
            let inflight = self.metrics.request_started(route);
            let result = self
                .write_response(&mut conn, response, head.method, close)
                .await;
            drop(inflight);
            let elapsed = started.elapsed();
            self.metrics
                .request_done(route, head.method, status, elapsed, body_bytes);
            if result.is_ok()
                && route == metrics::RouteKind::Blob
                && body_bytes > 0
                && matches!(source, Some(Source::File | Source::Grpc))
                && !peer.ip().to_canonical().is_loopback()
            {
                log_served_to_peer(&head.target, peer, body_bytes, elapsed);
            }
            result?;
            if close {
                let _ = conn.shutdown().await;
                return Ok(());
            }
        }
    }

    /// Reads one request head. `Ok(None)`: the connection ended (or we are
    /// shutting down) between requests.
    async fn read_head<C: Conn>(
        &self,
        conn: &mut C,
        buf: &mut BytesMut,
        shutdown: &CancellationToken,
    ) -> Result<Option<ParsedHead>, BadRequest> {
        let mut deadline = None;
        loop {
            if !buf.is_empty() {
                match parse_head(buf)? {
                    Some(head) => return Ok(Some(head)),
                    None if buf.len() >= MAX_HEAD => {
                        return Err(BadRequest(OciError::unsupported(
                            431,
                            "request head too large",
                        )));
                    }
                    None => {}
                }
                deadline.get_or_insert_with(|| {
                    tokio::time::Instant::now() + self.config.header_timeout
                });
            }
            let idle = buf.is_empty();
            let until =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + self.config.idle_timeout);
            let read = tokio::select! {
                _ = shutdown.cancelled(), if idle => return Ok(None),
                r = tokio::time::timeout_at(until, conn.read_buf(buf)) => r,
            };
            match read {
                Err(_) if idle => return Ok(None),
                Err(_) => {
                    return Err(BadRequest(OciError::unsupported(
                        408,
                        "request head not received in time",
                    )));
                }
                Ok(Ok(0)) if idle => return Ok(None),
                Ok(Ok(0)) => {
                    return Err(BadRequest(OciError::unsupported(
                        400,
                        "connection closed mid-request",
                    )));
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Ok(None),
            }
        }
    }

    async fn write_response<C: Conn>(
        &self,
        conn: &mut C,
        response: Response,
        method: Method,
        close: bool,
    ) -> io::Result<()> {
        let mut head = String::with_capacity(256);
        head.push_str("HTTP/1.1 ");
        head.push_str(&response.status.to_string());
        head.push(' ');
        head.push_str(reason(response.status));
        head.push_str("\r\ncontent-length: ");
        head.push_str(&response.content_length.to_string());
        head.push_str("\r\n");
        for (name, value) in &response.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        if close {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        let stall = self.config.write_timeout;
        let body = if method == Method::Head {
            Body::Empty
        } else {
            response.body
        };
        // Large bodies on plain TCP go out corked (as nginx's `tcp_nopush`):
        // the head rides in the first full segment, and each opening of a
        // slow reader's window releases full segments only, not a small
        // tail per write (the socket has TCP_NODELAY). Uncorking at the end,
        // whatever happened, sends the last segment.
        let cork = matches!(body, Body::File { .. } | Body::Stream { .. })
            && conn
                .plain_tcp()
                .is_some_and(|tcp| rustix::net::sockopt::set_tcp_cork(tcp, true).is_ok());
        let result = self.write_body(conn, head, body, stall).await;
        if cork && let Some(tcp) = conn.plain_tcp() {
            let _ = rustix::net::sockopt::set_tcp_cork(tcp, false);
        }
        result?;
        conn.flush().await
    }

    /// Writes `head` and `body` (the part of [`Server::write_response`]
    /// that may be corked).
    async fn write_body<C: Conn>(
        &self,
        conn: &mut C,
        head: String,
        body: Body,
        stall: Duration,
    ) -> io::Result<()> {
        let timed = |what: &'static str| {
            move |_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("client did not read the {what} for {stall:?}"),
                )
            }
        };
        match body {
            Body::Empty => {
                tokio::time::timeout(stall, conn.write_all(head.as_bytes()))
                    .await
                    .map_err(timed("head"))??;
            }
            Body::Bytes(bytes) => {
                let mut out = Vec::with_capacity(head.len() + bytes.len());
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(&bytes);
                tokio::time::timeout(stall, conn.write_all(&out))
                    .await
                    .map_err(timed("response"))??;
                self.count(Source::Memory, bytes.len() as u64);
            }
            Body::File {
                file, offset, len, ..
            } => {
                tokio::time::timeout(stall, conn.write_all(head.as_bytes()))
                    .await
                    .map_err(timed("head"))??;
                // Counted as the bytes go, so that a transfer in progress shows.
                let counter = self.counter(Source::File);
                match (&self.files, conn.plain_tcp()) {
                    (FileBodies::IoUring(uring), Some(tcp)) => {
                        uring.send(&file, tcp, offset, len, stall, &counter).await?
                    }
                    (FileBodies::Sendfile, Some(tcp)) => {
                        body::sendfile(tcp, &file, offset, len, stall, &counter).await?
                    }
                    _ => body::buffered(conn, file, offset, len, stall, &counter).await?,
                }
            }
            Body::Stream {
                mut stream,
                len,
                source,
            } => {
                tokio::time::timeout(stall, conn.write_all(head.as_bytes()))
                    .await
                    .map_err(timed("head"))??;
                let counter = self.counter(source);
                let mut sent = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(io::Error::other)?;
                    if sent + chunk.len() as u64 > len {
                        return Err(io::Error::other(
                            "body stream longer than its content length",
                        ));
                    }
                    tokio::time::timeout(stall, conn.write_all(&chunk))
                        .await
                        .map_err(timed("body"))??;
                    sent += chunk.len() as u64;
                    counter.inc_by(chunk.len() as u64);
                }
                if sent != len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("body stream ended after {sent} of {len} bytes"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn count(&self, source: Source, bytes: u64) {
        self.counter(source).inc_by(bytes);
    }

    fn counter(&self, source: Source) -> Counter {
        self.metrics
            .served_bytes
            .get_or_create(&SourceLabels { source })
            .clone()
    }
}

/// Lines about blobs served to other hosts: a few per second at most.
static SERVED_LOG: std::sync::LazyLock<metrics::LogBudget> =
    std::sync::LazyLock::new(|| metrics::LogBudget::new(20, 5));

/// One info line per blob body sent from this node's store to another host.
fn log_served_to_peer(target: &str, client: SocketAddr, bytes: u64, elapsed: Duration) {
    let Some(suppressed) = SERVED_LOG.take() else {
        return;
    };
    // The target routed to a blob, so its last segment is the digest.
    let digest = target.rsplit('/').next().unwrap_or(target);
    let seconds = elapsed.as_secs_f64().max(1e-6);
    tracing::info!(
        digest,
        %client,
        bytes,
        ms = elapsed.as_millis() as u64,
        mib_per_s = format!("{:.1}", bytes as f64 / seconds / (1 << 20) as f64),
        suppressed,
        "blob served to a peer"
    );
}

/// The parts of a request head we use, copied out of the read buffer.
pub(crate) struct ParsedHead {
    method: Method,
    target: String,
    range: Option<String>,
    mirrored: bool,
    follow: bool,
    keep_alive: bool,
    has_body: bool,
}

/// Parses a request head at the start of `buf` and consumes it.
pub(crate) fn parse_head(buf: &mut BytesMut) -> Result<Option<ParsedHead>, BadRequest> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(BadRequest(OciError::unsupported(
                431,
                "too many request headers",
            )));
        }
        Err(e) => {
            return Err(BadRequest(OciError::unsupported(
                400,
                format!("malformed request: {e}"),
            )));
        }
    };
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or_default().to_string();
    let version = req.version.unwrap_or(1);
    let mut range = None;
    let mut mirrored = false;
    let mut follow = false;
    let mut keep_alive = version >= 1;
    let mut has_body = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| {
            BadRequest(OciError::unsupported(
                400,
                format!("header {} is not valid UTF-8", h.name),
            ))
        })?;
        if h.name.eq_ignore_ascii_case("range") {
            if range.is_some() {
                return Err(BadRequest(OciError::range_invalid(
                    "more than one Range header",
                )));
            }
            range = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case(MIRRORED_HEADER) {
            mirrored = true;
        } else if h.name.eq_ignore_ascii_case(FOLLOW_HEADER) {
            follow = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && value.trim() != "0")
        {
            has_body = true;
        }
    }
    buf.advance(consumed);
    Ok(Some(ParsedHead {
        method,
        target,
        range,
        mirrored,
        follow,
        keep_alive,
        has_body,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
impl Conn for tokio::io::DuplexStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HandlerConfig;
    use bytes::Bytes;
    use peermirror_oci::ErrorCode;
    use peermirror_store::MemoryStore;

    fn parse(text: &str) -> Result<Option<ParsedHead>, BadRequest> {
        parse_head(&mut BytesMut::from(text.as_bytes()))
    }

    fn head(text: &str) -> ParsedHead {
        match parse(text) {
            Ok(Some(h)) => h,
            Ok(None) => panic!("incomplete: {text:?}"),
            Err(BadRequest(e)) => panic!("{text:?}: {e:?}"),
        }
    }

    fn refused(text: &str) -> OciError {
        match parse(text) {
            Err(BadRequest(e)) => e,
            _ => panic!("accepted: {text:?}"),
        }
    }

    #[test]
    fn request_heads() {
        let h = head(
            "GET /v2/a/blobs/x HTTP/1.1\r\nHost: h\r\nRange: bytes=0-\r\nX-Peermirror-Mirrored: 1\r\n\r\n",
        );
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.target, "/v2/a/blobs/x");
        assert_eq!(h.range.as_deref(), Some("bytes=0-"));
        assert!(h.mirrored && h.keep_alive && !h.has_body);
        let h = head("HEAD / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n");
        assert_eq!(h.method, Method::Head);
        assert!(!h.keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert_eq!(head("DELETE / HTTP/1.1\r\n\r\n").method, Method::Other);
        assert!(head("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").has_body);
        assert!(head("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").has_body);
        assert!(!head("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").has_body);
    }

    #[test]
    fn partial_and_pipelined_heads() {
        let mut buf = BytesMut::from(&b"GET /a HTTP/1.1\r\nHost"[..]);
        assert!(matches!(parse_head(&mut buf), Ok(None)));
        assert_eq!(buf.len(), 21, "an incomplete head is not consumed");
        let mut buf = BytesMut::from(&b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"[..]);
        let first = parse_head(&mut buf).ok().flatten().expect("first");
        assert_eq!(first.target, "/a");
        assert_eq!(&buf[..], b"GET /b HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn bad_heads_are_refused_with_a_code() {
        let e = refused("GET / HTTP/1.1\r\nRange: bytes=0-\r\nrange: bytes=1-\r\n\r\n");
        assert_eq!((e.status, e.code), (416, ErrorCode::RangeInvalid));
        let mut raw = BytesMut::from(&b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n"[..]);
        match parse_head(&mut raw) {
            Err(BadRequest(e)) => assert_eq!(e.status, 400),
            _ => panic!("a header that is not UTF-8 was accepted"),
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("H{i}: v\r\n"))
            .collect();
        let e = refused(&format!("GET / HTTP/1.1\r\n{many}\r\n"));
        assert_eq!(e.status, 431);
        assert_eq!(refused("\x00\x01\x02 garbage\r\n\r\n").status, 400);
    }

    fn server() -> Arc<Server> {
        server_with(FileBodies::Sendfile)
    }

    /// A server over an empty store whose file bodies go out as `files` says.
    fn server_with(files: FileBodies) -> Arc<Server> {
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let handler = Arc::new(Handler::new(
            Arc::new(MemoryStore::new()),
            None,
            HandlerConfig::default(),
            metrics.clone(),
        ));
        Server::build(handler, ServerConfig::default(), metrics, files, None)
    }

    fn response(body: Body, len: u64) -> Response {
        Response {
            status: 200,
            headers: vec![("content-type", "text/plain".to_string())],
            content_length: len,
            body,
            route: metrics::RouteKind::Blob,
            permit: None,
        }
    }

    async fn written(resp: Response, method: Method, close: bool) -> (io::Result<()>, String) {
        let (mut ours, mut theirs) = tokio::io::duplex(1 << 20);
        let result = server()
            .write_response(&mut ours, resp, method, close)
            .await;
        drop(ours);
        let mut out = Vec::new();
        theirs.read_to_end(&mut out).await.expect("read");
        (result, String::from_utf8_lossy(&out).into_owned())
    }

    /// A 4-byte mirrored body whose source fails after 2 bytes.
    fn failing_body() -> Body {
        let stream = futures::stream::iter([
            Ok(Bytes::from_static(b"ab")),
            Err(io::Error::other("peer gone")),
        ]);
        Body::Stream {
            stream: Box::pin(stream),
            len: 4,
            source: Source::Mirror,
        }
    }

    /// A connected pair of loopback TCP sockets: (server side, client side).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        server.set_nodelay(true).expect("nodelay");
        (server, client)
    }

    #[tokio::test]
    async fn large_bodies_leave_corked_and_the_socket_is_uncorked_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blob");
        // Not a multiple of any segment size: the last one is partial.
        let data: Vec<u8> = (0..(3 << 20) + 777).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        for files in [FileBodies::Sendfile, FileBodies::Buffered] {
            let server = server_with(files);
            let (mut ours, mut theirs) = tcp_pair().await;
            let file = std::fs::File::open(&path).expect("open");
            let body = Body::File {
                file,
                path: path.clone(),
                offset: 0,
                len: data.len() as u64,
            };
            let reader = tokio::spawn(async move {
                let mut out = Vec::new();
                theirs.read_to_end(&mut out).await.map(|_| out)
            });
            server
                .write_response(
                    &mut ours,
                    response(body, data.len() as u64),
                    Method::Get,
                    false,
                )
                .await
                .expect("written");
            assert!(
                !rustix::net::sockopt::tcp_cork(&ours).expect("cork"),
                "left corked"
            );
            drop(ours);
            let out = reader.await.expect("join").expect("read");
            assert!(out.ends_with(&data), "the body arrived whole");
        }
        // A body that fails half-way still leaves the socket uncorked.
        let server = server();
        let (mut ours, _theirs) = tcp_pair().await;
        let body = failing_body();
        let result = server
            .write_response(&mut ours, response(body, 4), Method::Get, false)
            .await;
        assert!(result.is_err());
        assert!(!rustix::net::sockopt::tcp_cork(&ours).expect("cork"));
    }

    #[tokio::test]
    async fn responses_are_written_as_http() {
        let (r, text) = written(
            response(Body::Bytes(Bytes::from_static(b"hello")), 5),
            Method::Get,
            false,
        )
        .await;
        r.expect("written");
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello"
        );
        // HEAD: the same head, no body.
        let (r, text) = written(
            response(Body::Bytes(Bytes::from_static(b"hello")), 5),
            Method::Head,
            true,
        )
        .await;
        r.expect("written");
        assert!(
            text.ends_with(
                "content-length: 5\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
            ),
            "{text}"
        );
        // A stream is sent as it comes.
        let stream =
            futures::stream::iter([Ok(Bytes::from_static(b"ab")), Ok(Bytes::from_static(b"cd"))]);
        let body = Body::Stream {
            stream: Box::pin(stream),
            len: 4,
            source: Source::Mirror,
        };
        let (r, text) = written(response(body, 4), Method::Get, false).await;
        r.expect("written");
        assert!(text.ends_with("\r\n\r\nabcd"));
    }

    #[tokio::test]
    async fn a_body_that_does_not_match_its_length_fails_the_response() {
        for (chunks, len) in [(vec!["abc"], 5u64), (vec!["abc", "def"], 4)] {
            let stream = futures::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok(Bytes::from_static(c.as_bytes())))
                    .collect::<Vec<_>>(),
            );
            let body = Body::Stream {
                stream: Box::pin(stream),
                len,
                source: Source::Mirror,
            };
            let (r, text) = written(response(body, len), Method::Get, false).await;
            assert!(r.is_err(), "{len}: {text:?}");
            assert!(text.starts_with(&format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n")));
        }
        // An error from the source ends the response too.
        let body = failing_body();
        let (r, _) = written(response(body, 4), Method::Get, false).await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn file_bodies_without_a_plain_socket_are_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blob");
        std::fs::write(&path, b"0123456789").expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let body = Body::File {
            file,
            path,
            offset: 2,
            len: 5,
        };
        let (r, text) = written(response(body, 5), Method::Get, false).await;
        r.expect("written");
        assert!(text.ends_with("\r\n\r\n23456"), "{text}");
    }
}
