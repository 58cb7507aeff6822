//! The one way the daemon opens a connection to another server: TCP with
//! Nagle off, then TLS when asked, then an HTTP/1.1 client on it. The
//! mirror's peer connections and the bootstrap client both use it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::net::{TcpStream, ToSocketAddrs};

/// TLS towards a server: the client configuration and the name its
/// certificate must carry (an IP address for peers, dialled by IP).
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
}

/// A connection this node opened.
pub type Dialled = crate::MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// Which step of [`dial`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting: {0}")]
    Connect(#[source] io::Error),
    #[error("TLS handshake: {0}")]
    Tls(#[source] io::Error),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
}

/// Connects to `target` and, with `tls`, completes the TLS handshake; each
/// step within `timeout`.
pub async fn dial(
    target: impl ToSocketAddrs,
    tls: Option<ClientTls>,
    timeout: Duration,
) -> Result<Dialled, DialError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| DialError::Timeout(timeout))?
        .map_err(DialError::Connect)?;
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Dialled::Plain(stream));
    };
    let connector = tokio_rustls::TlsConnector::from(tls.config);
    let stream = tokio::time::timeout(timeout, connector.connect(tls.name, stream))
        .await
        .map_err(|_| DialError::Timeout(timeout))?
        .map_err(DialError::Tls)?;
    Ok(Dialled::Tls(Box::new(stream)))
}

/// Starts an HTTP/1.1 client on `stream`; the connection runs in its own
/// task until the sender is dropped and the last body is read or dropped.
/// `read_buffer` fixes the size of reads (large for blob bodies).
pub async fn http1<B>(
    stream: Dialled,
    read_buffer: Option<usize>,
) -> Result<SendRequest<B>, hyper::Error>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::client::conn::http1::Builder::new();
    if read_buffer.is_some() {
        builder.read_buf_exact_size(read_buffer);
    }
    let (sender, conn) = builder
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real exchange over loopback: dial, speak HTTP/1.1, read the answer.
    #[tokio::test]
    async fn dial_and_speak_http1() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut head = vec![0u8; 1024];
            let n = s.read(&mut head).await.expect("read");
            assert!(head[..n].starts_with(b"GET /x HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .expect("write");
        });
        let stream = dial(addr, None, Duration::from_secs(5))
            .await
            .expect("dial");
        let mut sender = http1::<Empty<Bytes>>(stream, None).await.expect("http");
        let request = hyper::Request::get("/x")
            .header("host", addr.to_string())
            .body(Empty::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes(), "ok");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = dial(addr, None, Duration::from_secs(5))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, DialError::Connect(_)), "{err}");
    }
}
