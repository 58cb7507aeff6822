//! Test certificates made with rcgen: a cluster CA and node certificates
//! that carry what peermirror's mTLS needs (IP SANs, serverAuth and
//! clientAuth), and a TLS client for the tests.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::http::{Response, read_response};

/// A certificate authority.
pub struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pub pem: String,
}

/// A node's certificate and key, written to files.
#[derive(Debug, Clone)]
pub struct NodeCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            pem: cert.pem(),
            params,
            key,
        })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, &self.pem)?;
        Ok(())
    }

    /// A node certificate for `ips`, usable as server and client
    /// certificate, written to `<dir>/<name>.crt` and `.key`.
    pub fn issue(&self, dir: &Path, name: &str, ips: &[IpAddr]) -> Result<NodeCert> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.subject_alt_names = ips
            .iter()
            .map(|ip| rcgen::SanType::IpAddress(*ip))
            .collect();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        let node = NodeCert {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        // Written under temporary names and renamed, as a rotation would.
        for (path, text) in [(&node.cert, cert.pem()), (&node.key, key.serialize_pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(node)
    }
}

/// A TLS client configuration trusting `ca_pem`, presenting `client` if
/// given.
pub fn client_config(ca_pem: &str, client: Option<&NodeCert>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(&c.cert)?.collect::<std::result::Result<_, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&c.key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr`, handshake done.
pub fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<TlsStream> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = rustls::ClientConnection::new(config, ServerName::IpAddress(addr.ip().into()))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .context("TLS handshake")?;
    }
    Ok(stream)
}

/// The certificate the server presented.
pub fn server_cert(stream: &TlsStream) -> Option<Vec<u8>> {
    stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
}

/// `PUT` each `(path, body)` in turn over one TLS connection kept alive;
/// the status of each.
pub fn put_all(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    requests: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> Result<Vec<u16>> {
    let mut stream = connect(addr, config)?;
    let mut buffer = Vec::new();
    let mut statuses = Vec::new();
    for (path, body) in requests {
        // One write: a head and a body sent apart wait for a delayed ACK.
        let mut request = format!(
            "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        stream.write_all(&request)?;
        statuses.push(read_response(&mut stream, false, &mut buffer)?.status);
    }
    Ok(statuses)
}

/// `GET path` over a fresh TLS connection.
pub fn get(addr: SocketAddr, config: Arc<rustls::ClientConfig>, path: &str) -> Result<Response> {
    let mut stream = connect(addr, config)?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    read_response(&mut stream, false, &mut Vec::new())
}
