//! The mirror (`peermirror_mirror`) against real peers over real sockets: peermirror's own registry
//! server on a `MemoryStore`, and scripted misbehaving peers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Handler, HandlerConfig, Server, ServerConfig};
use futures::stream::BoxStream;
use peermirror_metrics::Metrics;
use peermirror_mirror::*;
use peermirror_oci::manifest::OCI_MANIFEST;
use peermirror_oci::{ByteRange, Descriptor, Digest, ManifestReference, Name, Reference};
use peermirror_routing::MemoryRouter;
use peermirror_routing::{Fanout, Peer};
use peermirror_store::MemoryStore;

const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn random_blob(len: usize) -> Bytes {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ len as u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// peermirror's registry server over a memory store.
async fn real_peer(store: Arc<MemoryStore>) -> (SocketAddr, Metrics, CancellationToken) {
    real_peer_uploading(store, None).await
}

/// peermirror's registry server over a memory store, on a loopback address
/// of its own (a host of its own, as far as tag agreement counts).
async fn real_peer_at(
    store: Arc<MemoryStore>,
    ip: [u8; 4],
) -> (SocketAddr, Metrics, CancellationToken) {
    real_peer_on(store, None, std::net::Ipv4Addr::from(ip)).await
}

/// peermirror's registry server over a memory store, telling peers that it
/// uploads `upload_rate` bytes per second.
async fn real_peer_uploading(
    store: Arc<MemoryStore>,
    upload_rate: Option<u64>,
) -> (SocketAddr, Metrics, CancellationToken) {
    real_peer_on(store, upload_rate, std::net::Ipv4Addr::LOCALHOST).await
}

async fn real_peer_on(
    store: Arc<MemoryStore>,
    upload_rate: Option<u64>,
    ip: std::net::Ipv4Addr,
) -> (SocketAddr, Metrics, CancellationToken) {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let rate = crate::UploadRate::default();
    if let Some(r) = upload_rate {
        rate.set(r);
    }
    let handler = Arc::new(
        Handler::new(store, None, HandlerConfig::default(), metrics.clone()).with_upload_rate(rate),
    );
    let server = Server::new(handler, ServerConfig::default(), metrics.clone());
    let listener = TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(listener, shutdown.clone()));
    (addr, metrics, shutdown)
}

#[derive(Clone)]
enum Behaviour {
    /// Correct head for the whole blob, then `after` bytes, then close.
    Truncate { body: Bytes, after: usize },
    /// The whole blob with one byte flipped.
    Corrupt { body: Bytes },
    /// Reads the request and never answers.
    Silent,
    /// Correct head, `after` bytes, then silence.
    Stall { body: Bytes, after: usize },
    /// Correct head, then `chunk` bytes every 100 ms.
    Slow { body: Bytes, chunk: usize },
    /// A fixed response (head and body).
    Raw(Bytes),
    /// Honours `Range` (206, or 200 without one), then behaves as `mode`.
    Ranged { body: Bytes, mode: RangedMode },
}

#[derive(Clone, Copy, Debug)]
enum RangedMode {
    /// Sends half of what was asked, then closes.
    Half,
    /// Sends what was asked with its first byte flipped.
    Corrupt,
    /// Flips the first byte of ranges only: the whole blob is right.
    CorruptRanges,
    /// Sends 64 KiB every 25 ms (2.5 MB/s: above the minimum speed).
    Slow,
}

/// The span a request head's `Range: bytes=a-b` asks of `size` bytes.
fn asked_span(head: &str, size: usize) -> Option<(usize, usize)> {
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("range:"))?;
    let spec = line.split_once('=')?.1.trim();
    let (a, b) = spec.split_once('-')?;
    let a: usize = a.parse().ok()?;
    let b: usize = if b.is_empty() {
        size - 1
    } else {
        b.parse().ok()?
    };
    Some((a, b.min(size - 1)))
}

struct Fake {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    /// Set when a write to a client failed (the client went away).
    client_gone: Arc<Mutex<Option<Instant>>>,
}

async fn fake_peer(behaviour: Behaviour) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(Mutex::new(Vec::new()));
    let client_gone = Arc::new(Mutex::new(None));
    let (reqs, gone) = (requests.clone(), client_gone.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let behaviour = behaviour.clone();
            let (reqs, gone) = (reqs.clone(), gone.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                reqs.lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&head).into_owned());
                let ok_head =
                    |len: usize| format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                let result: std::io::Result<()> = async {
                    match behaviour {
                        Behaviour::Truncate { body, after } => {
                            socket.write_all(ok_head(body.len()).as_bytes()).await?;
                            socket.write_all(&body[..after]).await?;
                        }
                        Behaviour::Corrupt { body } => {
                            let mut bad = body.to_vec();
                            let mid = bad.len() / 2;
                            bad[mid] ^= 0xff;
                            socket.write_all(ok_head(bad.len()).as_bytes()).await?;
                            socket.write_all(&bad).await?;
                        }
                        Behaviour::Silent => tokio::time::sleep(Duration::from_secs(30)).await,
                        Behaviour::Stall { body, after } => {
                            socket.write_all(ok_head(body.len()).as_bytes()).await?;
                            socket.write_all(&body[..after]).await?;
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        Behaviour::Slow { body, chunk } => {
                            socket.write_all(ok_head(body.len()).as_bytes()).await?;
                            for part in body.chunks(chunk) {
                                socket.write_all(part).await?;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                        Behaviour::Raw(bytes) => socket.write_all(&bytes).await?,
                        Behaviour::Ranged { body, mode } => {
                            let text = String::from_utf8_lossy(&head).into_owned();
                            let (status, a, b) = match asked_span(&text, body.len()) {
                                Some((a, b)) => ("206 Partial Content", a, b),
                                None => ("200 OK", 0, body.len() - 1),
                            };
                            let mut part = body[a..=b].to_vec();
                            socket
                                .write_all(
                                    format!(
                                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-range: bytes {a}-{b}/{}\r\n\r\n",
                                        part.len(),
                                        body.len()
                                    )
                                    .as_bytes(),
                                )
                                .await?;
                            match mode {
                                RangedMode::Half => {
                                    socket.write_all(&part[..part.len() / 2]).await?
                                }
                                RangedMode::Corrupt => {
                                    part[0] ^= 0xff;
                                    socket.write_all(&part).await?;
                                }
                                RangedMode::CorruptRanges => {
                                    if status.starts_with("206") {
                                        part[0] ^= 0xff;
                                    }
                                    socket.write_all(&part).await?;
                                }
                                RangedMode::Slow => {
                                    for piece in part.chunks(64 << 10) {
                                        socket.write_all(piece).await?;
                                        tokio::time::sleep(Duration::from_millis(25)).await;
                                    }
                                }
                            }
                        }
                    }
                    Ok(())
                }
                .await;
                if result.is_err() {
                    *gone.lock().expect("lock") = Some(Instant::now());
                }
            });
        }
    });
    Fake {
        addr,
        requests,
        client_gone,
    }
}

/// A stable peer id per test name ("real", "slow", …).
fn id(name: &str) -> libp2p::PeerId {
    static IDS: Mutex<Option<std::collections::HashMap<String, libp2p::PeerId>>> = Mutex::new(None);
    *IDS.lock()
        .expect("lock")
        .get_or_insert_with(Default::default)
        .entry(name.to_string())
        .or_insert_with(libp2p::PeerId::random)
}

fn peer(name: &str, addr: SocketAddr) -> Peer {
    Peer { id: id(name), addr }
}

fn name() -> Name {
    Name {
        registry: Some("docker.io".parse().expect("registry")),
        repository: "library/app".parse().expect("repo"),
    }
}

fn fast_config() -> MirrorConfig {
    MirrorConfig {
        resolve_timeout: Duration::from_millis(50),
        connect_timeout: Duration::from_millis(500),
        header_timeout: Duration::from_secs(5),
        hedge_delay: Duration::from_millis(100),
        stall_timeout: Duration::from_millis(400),
        min_speed: 1 << 20,
        total_timeout: Duration::from_secs(20),
        max_attempts: 4,
        bad_peer_ttl: Duration::from_secs(60),
        fanout_timeout: Duration::from_millis(200),
        follow_header_timeout: Duration::from_secs(2),
        ..MirrorConfig::default()
    }
}

/// Reads a relayed body: the bytes, and whether it ended with an error.
async fn drain(
    mut body: BoxStream<'static, Result<Bytes, TransferError>>,
) -> (Vec<u8>, Option<TransferError>) {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => out.extend_from_slice(&c),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

struct Setup {
    blob: Bytes,
    digest: Digest,
    real: SocketAddr,
    real_metrics: Metrics,
    router: Arc<MemoryRouter>,
    _stop: CancellationToken,
}

async fn setup(size: usize) -> Setup {
    let blob = random_blob(size);
    let store = Arc::new(MemoryStore::new());
    let desc = store.add_blob(LAYER, blob.clone()).await;
    let (real, real_metrics, stop) = real_peer(store).await;
    Setup {
        blob,
        digest: desc.digest,
        real,
        real_metrics,
        router: MemoryRouter::new(),
        _stop: stop,
    }
}

fn requests_with_status(metrics: &Metrics, code: u16) -> u64 {
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("h", "h", metrics.http_request_duration.clone());
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text.lines()
        .filter(|l| l.starts_with("h_count") && l.contains(&format!("code=\"{code}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn whole_blob_from_a_peer_is_verified_and_relayed() {
    let s = setup(3 << 20).await;
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    assert_eq!(
        (m.size, m.offset, m.len, m.partial),
        (3 << 20, 0, 3 << 20, false)
    );
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(Bytes::from(bytes), s.blob);
}

#[tokio::test]
async fn ranges_pass_through() {
    let s = setup(10_000).await;
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let range = ByteRange::FromTo {
        first: 1000,
        last: Some(1999),
    };
    let m = mirror
        .blob(&name(), &s.digest, Some(range), false)
        .await
        .expect("hit");
    assert_eq!(
        (m.size, m.offset, m.len, m.partial),
        (10_000, 1000, 1000, true)
    );
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none());
    assert_eq!(bytes, s.blob[1000..2000]);
    let head = mirror
        .blob(&name(), &s.digest, None, true)
        .await
        .expect("hit");
    assert!(head.body.is_none());
    assert_eq!(head.len, 10_000);
}

#[tokio::test]
async fn no_provider_is_a_fast_miss() {
    let s = setup(10).await;
    let mirror = Mirror::new(s.router.clone(), MirrorConfig::default());
    let started = Instant::now();
    let miss = mirror.blob(&name(), &s.digest, None, false).await.err();
    assert_eq!(miss, Some(MirrorMiss::NoProvider));
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_peer_dying_mid_body_is_replaced_and_the_transfer_resumes() {
    let s = setup(1 << 20).await;
    let fake = fake_peer(Behaviour::Truncate {
        body: s.blob.clone(),
        after: 300_000,
    })
    .await;
    s.router.add(&s.digest.to_string(), peer("dies", fake.addr));
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(Bytes::from(bytes), s.blob);
    // The second holder was asked for the rest only.
    assert_eq!(requests_with_status(&s.real_metrics, 206), 1);
    assert_eq!(requests_with_status(&s.real_metrics, 200), 0);
}

/// The only holder the lookup found dies mid-body, and the lookup's answer
/// is cached from before a second holder appeared: the transfer looks again
/// past the cache and resumes from the new holder, instead of cutting the
/// body short (which containerd 2.1 does not retry).
#[tokio::test]
async fn a_holder_that_appeared_after_the_lookup_resumes_a_failed_transfer() {
    let s = setup(1 << 20).await;
    let fake = fake_peer(Behaviour::Truncate {
        body: s.blob.clone(),
        after: 300_000,
    })
    .await;
    s.router.add(&s.digest.to_string(), peer("dies", fake.addr));
    s.router
        .add_uncached(&s.digest.to_string(), peer("real", s.real));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(Bytes::from(bytes), s.blob);
    // The new holder was asked for the rest only.
    assert_eq!(requests_with_status(&s.real_metrics, 206), 1);
    assert_eq!(requests_with_status(&s.real_metrics, 200), 0);
}

/// When no other holder exists, the transfer gives up once the budget of a
/// stalled peer has passed, and says which bytes are missing.
#[tokio::test]
async fn with_no_holder_left_the_body_is_cut_short_within_the_stall_budget() {
    let s = setup(1 << 20).await;
    let fake = fake_peer(Behaviour::Truncate {
        body: s.blob.clone(),
        after: 300_000,
    })
    .await;
    s.router.add(&s.digest.to_string(), peer("dies", fake.addr));
    let config = fast_config();
    let budget = config.stall_timeout;
    let mirror = Mirror::new(s.router.clone(), config);
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    let started = Instant::now();
    let (bytes, err) = drain(m.body.expect("body")).await;
    let waited = started.elapsed();
    // (The last chunk of a whole blob is held back until its digest.)
    assert!(bytes.len() <= 300_000);
    assert!(
        matches!(err, Some(TransferError::Exhausted { pos: 300_000, .. })),
        "{err:?}"
    );
    // It looked for new holders for the whole budget, and not much longer.
    assert!(
        waited >= budget && waited < budget * 4,
        "gave up after {waited:?}"
    );
}

#[tokio::test]
async fn a_stalled_peer_is_replaced() {
    let s = setup(1 << 20).await;
    let fake = fake_peer(Behaviour::Stall {
        body: s.blob.clone(),
        after: 100_000,
    })
    .await;
    s.router
        .add(&s.digest.to_string(), peer("stalls", fake.addr));
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let started = Instant::now();
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(Bytes::from(bytes), s.blob);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_silent_peer_is_raced_by_another() {
    let s = setup(100_000).await;
    let fake = fake_peer(Behaviour::Silent).await;
    s.router
        .add(&s.digest.to_string(), peer("silent", fake.addr));
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let started = Instant::now();
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    assert_eq!(m.peer.id, id("real"));
    // Far below the 5 s header timeout: the hedge answered.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let (bytes, _) = drain(m.body.expect("body")).await;
    assert_eq!(Bytes::from(bytes), s.blob);
}

#[tokio::test]
async fn a_slow_peer_is_replaced_by_a_faster_one() {
    let s = setup(2 << 20).await;
    let fake = fake_peer(Behaviour::Slow {
        body: s.blob.clone(),
        chunk: 8 << 10,
    })
    .await;
    s.router.add(&s.digest.to_string(), peer("slow", fake.addr));
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let started = Instant::now();
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    assert_eq!(m.peer.id, id("slow"));
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(Bytes::from(bytes), s.blob);
    // At 80 KiB/s the slow peer alone would take ~25 s.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_corrupt_copy_is_cut_short_and_its_peer_avoided() {
    let s = setup(500_000).await;
    let fake = fake_peer(Behaviour::Corrupt {
        body: s.blob.clone(),
    })
    .await;
    s.router
        .add(&s.digest.to_string(), peer("corrupt", fake.addr));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("answered");
    assert_eq!(m.len, 500_000);
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(
        matches!(err, Some(TransferError::DigestMismatch { .. })),
        "{err:?}"
    );
    assert!(bytes.len() < 500_000, "a complete corrupt body was relayed");
    // Never asked again for this digest.
    let again = mirror.blob(&name(), &s.digest, None, false).await.err();
    assert_eq!(again, Some(MirrorMiss::NoProvider));
    assert_eq!(fake.requests.lock().expect("lock").len(), 1);
    // A range of a corrupt copy is not something the mirror can check; it is
    // not asked either.
    let range = Some(ByteRange::FromTo {
        first: 10,
        last: None,
    });
    assert!(mirror.blob(&name(), &s.digest, range, false).await.is_err());
}

#[tokio::test]
async fn the_transfer_stops_when_the_client_goes_away() {
    let s = setup(4 << 20).await;
    let fake = fake_peer(Behaviour::Slow {
        body: s.blob.clone(),
        chunk: 64 << 10,
    })
    .await;
    s.router.add(&s.digest.to_string(), peer("slow", fake.addr));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    let mut body = m.body.expect("body");
    let first = body.next().await.expect("a chunk").expect("data");
    assert!(!first.is_empty());
    let dropped = Instant::now();
    drop(body);
    for _ in 0..40 {
        if fake.client_gone.lock().expect("lock").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = fake
        .client_gone
        .lock()
        .expect("lock")
        .expect("the peer kept sending to nobody");
    assert!(gone.duration_since(dropped) < Duration::from_secs(2));
}

#[tokio::test]
async fn manifests_are_verified_before_use() {
    let store = Arc::new(MemoryStore::new());
    let layer = store.add_blob(LAYER, random_blob(100)).await;
    let manifest = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": layer, "layers": [layer],
        }))
        .expect("json"),
    );
    let desc = store.add_blob(OCI_MANIFEST, manifest.clone()).await;
    store
        .set_image("docker.io/library/app:1", desc.clone())
        .await;
    let (real, _, _stop) = real_peer(store).await;
    // A peer that answers the tag with other bytes under the right digest.
    let forged = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {OCI_MANIFEST}\r\ndocker-content-digest: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        desc.digest
    );
    let fake = fake_peer(Behaviour::Raw(Bytes::from(forged))).await;
    let router = MemoryRouter::new();
    for key in [
        "docker.io/library/app:1".to_string(),
        desc.digest.to_string(),
    ] {
        router.add(&key, peer("forger", fake.addr));
        router.add(&key, peer("real", real));
    }
    // One real holder: the air-gapped setting answers from one host.
    let config = MirrorConfig {
        tag_resolution: TagResolution::SingleHolder,
        ..fast_config()
    };
    let mirror = Mirror::new(router, config);
    let reference = app_1();
    let by_tag = mirror
        .manifest(
            &name(),
            Some(&reference),
            &ManifestReference::Tag("1".parse().expect("tag")),
        )
        .await
        .expect("hit");
    assert_eq!(by_tag.descriptor.digest, desc.digest);
    assert_eq!(by_tag.descriptor.media_type, OCI_MANIFEST);
    assert_eq!(by_tag.bytes, manifest);
    assert_eq!(by_tag.peer.id, id("real"));
    let by_digest = mirror
        .manifest(&name(), None, &ManifestReference::Digest(desc.digest))
        .await
        .expect("hit");
    assert_eq!(by_digest.bytes, manifest);
}

fn app_1() -> Reference {
    Reference::tagged(
        "docker.io".parse().expect("registry"),
        "app".parse().expect("repo"),
        "1".parse().expect("tag"),
    )
}

/// A memory store holding an image of one layer of `len` random bytes,
/// tagged `docker.io/library/app:1`.
async fn store_tagging_app_1(len: usize) -> (Arc<MemoryStore>, Descriptor) {
    let store = Arc::new(MemoryStore::new());
    let layer = store.add_blob(LAYER, random_blob(len)).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": layer, "layers": [layer],
    }))
    .expect("json");
    let desc = store.add_blob(OCI_MANIFEST, manifest).await;
    store
        .set_image("docker.io/library/app:1", desc.clone())
        .await;
    (store, desc)
}

/// Asks `mirror` for `app:1` by tag.
async fn by_tag(mirror: &Arc<Mirror>) -> Result<MirroredManifest, MirrorMiss> {
    mirror
        .manifest(
            &name(),
            Some(&app_1()),
            &ManifestReference::Tag("1".parse().expect("tag")),
        )
        .await
}

#[tokio::test]
async fn a_tag_is_answered_when_two_hosts_agree_and_not_otherwise() {
    let (same, image) = store_tagging_app_1(100).await;
    let (other, other_image) = store_tagging_app_1(200).await;
    // Hosts 127.0.0.2 and .3 hold the image; .4 tags another image app:1;
    // .5 runs two peers (one host).
    let (a, _, _s1) = real_peer_at(same.clone(), [127, 0, 0, 2]).await;
    let (b, _, _s2) = real_peer_at(same.clone(), [127, 0, 0, 3]).await;
    let (liar, _, _s3) = real_peer_at(other, [127, 0, 0, 4]).await;
    let (c1, _, _s4) = real_peer_at(same.clone(), [127, 0, 0, 5]).await;
    let (c2, _, _s5) = real_peer_at(same, [127, 0, 0, 5]).await;
    let key = "docker.io/library/app:1";
    let mirror_of = |peers: &[(&str, SocketAddr)], resolution: TagResolution| {
        let router = MemoryRouter::new();
        for (n, addr) in peers {
            router.add(key, peer(n, *addr));
        }
        let config = MirrorConfig {
            tag_resolution: resolution,
            ..fast_config()
        };
        Mirror::new(router, config)
    };
    use TagResolution::*;

    // Two hosts agree: answered, with the bytes both stated.
    let hit = by_tag(&mirror_of(&[("a", a), ("b", b)], Agreement))
        .await
        .expect("two hosts agree");
    assert_eq!(hit.descriptor.digest, image.digest);

    // They disagree: a miss, whoever answers first.
    for peers in [[("liar", liar), ("a", a)], [("a", a), ("liar", liar)]] {
        let miss = by_tag(&mirror_of(&peers, Agreement)).await.err();
        assert_eq!(
            miss,
            Some(MirrorMiss::TagNotAgreed {
                hosts: 2,
                digests: 2
            }),
            "{peers:?}"
        );
    }
    // With a third host that disagrees, the answer is the agreed image
    // (when two agreed before the third answered) or a miss: never the
    // third's.
    for _ in 0..10 {
        match by_tag(&mirror_of(&[("liar", liar), ("a", a), ("b", b)], Agreement)).await {
            Ok(hit) => assert_eq!(hit.descriptor.digest, image.digest),
            Err(miss) => assert!(
                matches!(miss, MirrorMiss::TagNotAgreed { digests: 2, .. }),
                "{miss:?}"
            ),
        }
    }

    // The only holder, be it honest or not: a miss by default ...
    for only in [("a", a), ("liar", liar)] {
        let miss = by_tag(&mirror_of(&[only], Agreement)).await.err();
        assert_eq!(
            miss,
            Some(MirrorMiss::TagNotAgreed {
                hosts: 1,
                digests: 1
            })
        );
    }
    // ... and so are two peers on one host.
    let miss = by_tag(&mirror_of(&[("c1", c1), ("c2", c2)], Agreement))
        .await
        .err();
    assert_eq!(
        miss,
        Some(MirrorMiss::TagNotAgreed {
            hosts: 1,
            digests: 1
        })
    );

    // The air-gapped setting takes one holder.
    let hit = by_tag(&mirror_of(&[("liar", liar)], SingleHolder))
        .await
        .expect("single holder");
    assert_eq!(hit.descriptor.digest, other_image.digest);
    // `off` asks nobody.
    let miss = by_tag(&mirror_of(&[("a", a), ("b", b)], Off)).await.err();
    assert_eq!(miss, Some(MirrorMiss::NoProvider));
}

#[tokio::test]
async fn a_holder_that_appears_mid_transfer_takes_over_from_a_slow_one() {
    let s = setup(2 << 20).await;
    let fake = fake_peer(Behaviour::Slow {
        body: s.blob.clone(),
        chunk: 8 << 10,
    })
    .await;
    // At first the slow peer is the only holder.
    s.router.add(&s.digest.to_string(), peer("slow", fake.addr));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let started = Instant::now();
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("hit");
    let router = s.router.clone();
    let (key, real) = (s.digest.to_string(), s.real);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        router.add(&key, peer("real", real));
    });
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(Bytes::from(bytes), s.blob);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(requests_with_status(&s.real_metrics, 206), 1);
}

/// One peer's `416` settles nothing while another holder can serve; a
/// range is unsatisfiable only when every answer says so.
#[tokio::test]
async fn a_lying_416_does_not_end_the_request() {
    let s = setup(10_000).await;
    let liar = fake_peer(Behaviour::Raw(Bytes::from_static(
        b"HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */10\r\ncontent-length: 0\r\n\r\n",
    )))
    .await;
    s.router.add(&s.digest.to_string(), peer("liar", liar.addr));
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let range = ByteRange::FromTo {
        first: 100,
        last: None,
    };
    let m = mirror
        .blob(&name(), &s.digest, Some(range), false)
        .await
        .expect("the real holder serves the range");
    assert_eq!(m.peer.id, id("real"));
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none());
    assert_eq!(bytes, s.blob[100..]);
    // Really beyond the end: every holder says so, and so does the mirror.
    let beyond = ByteRange::FromTo {
        first: 20_000,
        last: None,
    };
    let real_only = MemoryRouter::new();
    real_only.add(&s.digest.to_string(), peer("real", s.real));
    let miss = Mirror::new(real_only, fast_config())
        .blob(&name(), &s.digest, Some(beyond), false)
        .await
        .err();
    assert_eq!(miss, Some(MirrorMiss::Unsatisfiable { size: 10_000 }));
}

/// A `206` that does not cover what was asked (a short answer to
/// `bytes=0-`, which would be relayed unverified) is not taken.
#[tokio::test]
async fn a_short_answer_to_bytes_0_is_refused() {
    let s = setup(10_000).await;
    let mut short = b"HTTP/1.1 206 Partial Content\r\ncontent-range: bytes 0-99/10000\r\ncontent-length: 100\r\n\r\n".to_vec();
    short.extend_from_slice(&s.blob[..100]);
    let fake = fake_peer(Behaviour::Raw(Bytes::from(short))).await;
    s.router
        .add(&s.digest.to_string(), peer("short", fake.addr));
    let mirror = Mirror::new(s.router.clone(), fast_config());
    let whole = ByteRange::FromTo {
        first: 0,
        last: None,
    };
    let miss = mirror
        .blob(&name(), &s.digest, Some(whole), false)
        .await
        .err();
    assert!(
        matches!(miss, Some(MirrorMiss::AllFailed { .. })),
        "{miss:?}"
    );
    // With an honest holder too, the whole blob comes, verified.
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let m = mirror
        .blob(&name(), &s.digest, Some(whole), false)
        .await
        .expect("hit");
    assert_eq!((m.offset, m.len, m.size), (0, 10_000, 10_000));
    assert_eq!(m.peer.id, id("real"));
}

/// A verified manifest is served as what its bytes say it is.
#[tokio::test]
async fn a_manifest_keeps_the_media_type_its_body_declares() {
    let layer = Descriptor {
        media_type: LAYER.to_string(),
        digest: Digest::of(b"l"),
        size: 1,
    };
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": layer, "layers": [layer],
    }))
    .expect("json");
    let digest = Digest::of(&manifest);
    let mut raw = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n",
        peermirror_oci::manifest::OCI_INDEX,
        manifest.len()
    )
    .into_bytes();
    raw.extend_from_slice(&manifest);
    let fake = fake_peer(Behaviour::Raw(Bytes::from(raw))).await;
    let router = MemoryRouter::new();
    router.add(&digest.to_string(), peer("mislabels", fake.addr));
    let m = Mirror::new(router, fast_config())
        .manifest(&name(), None, &ManifestReference::Digest(digest))
        .await
        .expect("hit");
    assert_eq!(m.descriptor.media_type, OCI_MANIFEST);
}

/// However many holders fail, a manifest request makes at most the allowed
/// number of attempts and ends within its budget.
#[tokio::test]
async fn manifest_attempts_are_bounded() {
    let digest = Digest::of(b"wanted");
    let router = MemoryRouter::new();
    let mut fakes = Vec::new();
    for i in 0..10 {
        let fake = fake_peer(Behaviour::Silent).await;
        router.add(&digest.to_string(), peer(&format!("silent{i}"), fake.addr));
        fakes.push(fake);
    }
    let config = MirrorConfig {
        header_timeout: Duration::from_millis(300),
        ..fast_config()
    };
    let started = Instant::now();
    let miss = Mirror::new(router, config.clone())
        .manifest(&name(), None, &ManifestReference::Digest(digest))
        .await
        .err();
    let took = started.elapsed();
    assert!(
        matches!(miss, Some(MirrorMiss::AllFailed { .. })),
        "{miss:?}"
    );
    let asked: usize = fakes
        .iter()
        .map(|f| f.requests.lock().expect("lock").len())
        .sum();
    assert!(asked <= config.max_attempts, "{asked} attempts");
    let budget = config.header_timeout + config.stall_timeout * 2;
    assert!(took <= budget + Duration::from_millis(300), "took {took:?}");
}

#[tokio::test]
async fn fanout_lead_is_a_fast_miss_and_follow_streams_the_source() {
    let s = setup(1 << 20).await;
    let mirror = Mirror::new(s.router.clone(), fast_config());
    // No holder, and this node is told to fetch it: a miss at once.
    s.router.answer_fanout(Fanout::Lead);
    let started = Instant::now();
    let miss = mirror.blob(&name(), &s.digest, None, false).await.err();
    assert_eq!(miss, Some(MirrorMiss::NoProvider));
    assert!(started.elapsed() < Duration::from_millis(300));
    // HEAD never asks the rendezvous.
    let head = mirror.blob(&name(), &s.digest, None, true).await.err();
    assert_eq!(head, Some(MirrorMiss::NoProvider));
    assert_eq!(s.router.fanout_asks(), [None]);

    // Told to follow a source: its bytes are relayed, verified, and the
    // request says it follows.
    let mut raw = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
        s.blob.len()
    )
    .into_bytes();
    raw.extend_from_slice(&s.blob);
    let source = fake_peer(Behaviour::Raw(raw.into())).await;
    s.router
        .answer_fanout(Fanout::Follow(peer("source", source.addr)));
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("followed");
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(Bytes::from(bytes), s.blob);
    let requests = source.requests.lock().expect("lock").clone();
    assert!(
        requests[0]
            .to_ascii_lowercase()
            .contains("x-peermirror-follow: 1")
    );
}

/// A followed in-flight source that crawls (its leader's registry link is
/// slow) is left within the speed window: for the in-flight source the
/// rendezvous names next, or, when there is none, the body ends (the
/// registry serves the rest); the slow one is reported and never followed
/// again for that digest.
#[tokio::test]
async fn a_slow_followed_source_is_left_for_another_or_the_body_ends() {
    let s = setup(1 << 20).await;
    let config = fast_config();
    let window = config.stall_timeout;
    let mirror = Mirror::new(s.router.clone(), config);
    // 80 KiB/s against a minimum of 1 MiB/s; the next source is a holder
    // that serves the rest (from its store, as a finished ingest would).
    let crawl = fake_peer(Behaviour::Slow {
        body: s.blob.clone(),
        chunk: 8 << 10,
    })
    .await;
    s.router
        .answer_fanout(Fanout::Follow(peer("crawl", crawl.addr)));
    s.router.answer_fanout(Fanout::Follow(peer("next", s.real)));
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("followed");
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(Bytes::from(bytes), s.blob);
    assert_eq!(s.router.fanout_asks(), [None, Some(id("crawl"))]);
    assert_eq!(requests_with_status(&s.real_metrics, 206), 1);

    // No other source: the body ends within about two windows, and the
    // crawling source is not followed again.
    let digest = s.digest;
    let crawl2 = fake_peer(Behaviour::Slow {
        body: s.blob.clone(),
        chunk: 8 << 10,
    })
    .await;
    let mirror = Mirror::new(s.router.clone(), fast_config());
    s.router
        .answer_fanout(Fanout::Follow(peer("crawl2", crawl2.addr)));
    let started = Instant::now();
    let m = mirror
        .blob(&name(), &digest, None, false)
        .await
        .expect("followed");
    let (bytes, err) = drain(m.body.expect("body")).await;
    let took = started.elapsed();
    assert!(bytes.len() < s.blob.len());
    assert!(
        matches!(err, Some(TransferError::Exhausted { .. })),
        "{err:?}"
    );
    assert!(took < window * 4, "ended after {took:?}");
    // Asked again, the rendezvous names it again: it is reported, not
    // followed, and this node fetches the blob itself (a miss).
    s.router
        .answer_fanout(Fanout::Follow(peer("crawl2", crawl2.addr)));
    let miss = mirror.blob(&name(), &digest, None, false).await.err();
    assert_eq!(miss, Some(MirrorMiss::NoProvider));
    let asks = s.router.fanout_asks();
    assert_eq!(
        asks[2..],
        [None, Some(id("crawl2")), None, Some(id("crawl2"))]
    );
    assert_eq!(crawl2.requests.lock().expect("lock").len(), 1);
}

/// An in-flight source that answers with a head and then sends nothing is
/// left before this node answers its client: the request is a `404`
/// (containerd goes upstream), not a body that never comes.
#[tokio::test]
async fn a_silent_followed_source_is_left_before_the_response_head() {
    let s = setup(1 << 20).await;
    let config = fast_config();
    let stall = config.stall_timeout;
    let mirror = Mirror::new(s.router.clone(), config);
    let silent = fake_peer(Behaviour::Stall {
        body: s.blob.clone(),
        after: 0,
    })
    .await;
    s.router
        .answer_fanout(Fanout::Follow(peer("silent", silent.addr)));
    let started = Instant::now();
    let miss = mirror.blob(&name(), &s.digest, None, false).await.err();
    let took = started.elapsed();
    assert_eq!(miss, Some(MirrorMiss::NoProvider));
    assert!(took >= stall && took < stall * 4, "{took:?}");
    assert_eq!(s.router.fanout_asks(), [None, Some(id("silent"))]);
}

#[tokio::test]
async fn a_fanout_source_that_cannot_serve_is_reported() {
    let s = setup(1 << 20).await;
    let mirror = Mirror::new(s.router.clone(), fast_config());
    // The source has no ingest (404): reported; then this node leads.
    let none = fake_peer(Behaviour::Raw(Bytes::from_static(
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    )))
    .await;
    s.router
        .answer_fanout(Fanout::Follow(peer("none", none.addr)));
    s.router.answer_fanout(Fanout::Lead);
    let miss = mirror.blob(&name(), &s.digest, None, false).await.err();
    assert_eq!(miss, Some(MirrorMiss::NoProvider));
    assert_eq!(s.router.fanout_asks(), [None, Some(id("none"))]);

    // A source that stalls mid-body: the body ends short (containerd
    // retries) and the source is reported so the retry is placed anew.
    let stall = fake_peer(Behaviour::Stall {
        body: s.blob.clone(),
        after: 100_000,
    })
    .await;
    s.router
        .answer_fanout(Fanout::Follow(peer("stall", stall.addr)));
    let m = mirror
        .blob(&name(), &s.digest, None, false)
        .await
        .expect("followed");
    let (bytes, err) = drain(m.body.expect("body")).await;
    // Never more than was sent (the held-back tail included).
    assert!(bytes.len() <= 100_000, "{}", bytes.len());
    assert!(err.is_some());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.router.fanout_asks().contains(&Some(id("stall"))) {
        assert!(Instant::now() < deadline, "{:?}", s.router.fanout_asks());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Several holders of one large blob, each peermirror's server over the same
/// store; the first one's upload rate as given, the others' zero.
struct Holders {
    blob: Bytes,
    digest: Digest,
    addrs: Vec<SocketAddr>,
    metrics: Vec<Metrics>,
    router: Arc<MemoryRouter>,
    _stops: Vec<CancellationToken>,
}

async fn holders(size: usize, count: usize, first_upload_rate: u64) -> Holders {
    let blob = random_blob(size);
    let store = Arc::new(MemoryStore::new());
    let desc = store.add_blob(LAYER, blob.clone()).await;
    let router = MemoryRouter::new();
    let (mut addrs, mut metrics, mut stops) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        // The others say they upload what loopback may carry to this node
        // (a claim below what arrives from them is not believed).
        let rate = if i == 0 { first_upload_rate } else { 8 << 30 };
        let (addr, m, stop) = real_peer_uploading(store.clone(), Some(rate)).await;
        router.add(&desc.digest.to_string(), peer(&format!("holder{i}"), addr));
        addrs.push(addr);
        metrics.push(m);
        stops.push(stop);
    }
    Holders {
        blob,
        digest: desc.digest,
        addrs,
        metrics,
        router,
        _stops: stops,
    }
}

fn parallel_config() -> MirrorConfig {
    MirrorConfig {
        parallel_peers: 3,
        parallel_min_size: 8 << 20,
        ..fast_config()
    }
}

/// Asks `mirror` for the whole blob and reads its body: the bytes, and the
/// error it ended with, if any.
async fn fetch_whole(mirror: &Arc<Mirror>, digest: &Digest) -> (Vec<u8>, Option<TransferError>) {
    let m = mirror
        .blob(&name(), digest, None, false)
        .await
        .expect("hit");
    drain(m.body.expect("body")).await
}

/// The peers of the last journal record.
fn last_record_peers(mirror: &Mirror) -> Vec<String> {
    mirror
        .journal()
        .recent()
        .last()
        .map(|r| r.peers.iter().map(|p| p.addr.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_large_blob_is_fetched_from_several_holders_at_once() {
    let h = holders(48 << 20, 3, 0).await;
    let mirror = Mirror::new(h.router.clone(), parallel_config());
    let m = mirror
        .blob(&name(), &h.digest, None, false)
        .await
        .expect("hit");
    assert_eq!((m.offset, m.len, m.size), (0, 48 << 20, 48 << 20));
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert!(bytes[..] == h.blob[..], "the relayed bytes differ");
    // The first holder answered the request, and every holder was asked for
    // segments of the rest.
    assert_eq!(requests_with_status(&h.metrics[0], 200), 1);
    let segments: Vec<u64> = h
        .metrics
        .iter()
        .map(|m| requests_with_status(m, 206))
        .collect();
    assert!(
        segments[1] >= 1 && segments[2] >= 1,
        "segments per holder: {segments:?}"
    );
    assert!(
        segments.iter().sum::<u64>() >= 6,
        "48 MiB in 4 MiB segments: {segments:?}"
    );
    let mut peers = last_record_peers(&mirror);
    peers.sort();
    let mut all: Vec<String> = h.addrs.iter().map(|a| a.to_string()).collect();
    all.sort();
    assert_eq!(peers, all, "the journal names every holder");
    let record = mirror.journal().recent().last().cloned().expect("record");
    assert_eq!(record.verified, Some(true));
}

#[tokio::test]
async fn a_range_of_a_large_blob_is_fetched_in_parallel_too() {
    let h = holders(40 << 20, 2, 0).await;
    let mirror = Mirror::new(h.router.clone(), parallel_config());
    // containerd 2.1's way of asking for a blob from its middle on.
    let range = ByteRange::FromTo {
        first: 3 << 20,
        last: None,
    };
    let m = mirror
        .blob(&name(), &h.digest, Some(range), false)
        .await
        .expect("hit");
    assert_eq!((m.offset, m.len, m.partial), (3 << 20, 37 << 20, true));
    let (bytes, err) = drain(m.body.expect("body")).await;
    assert!(err.is_none(), "{err:?}");
    assert!(bytes[..] == h.blob[3 << 20..], "the relayed range differs");
    assert!(requests_with_status(&h.metrics[1], 206) >= 1);
}

#[tokio::test]
async fn busy_holders_are_used_less() {
    // The first holder says it uploads 50 GiB/s to other hosts: after the
    // segment it started with, the idle ones fetch the rest.
    let h = holders(48 << 20, 3, 50 << 30).await;
    let mirror = Mirror::new(h.router.clone(), parallel_config());
    let (bytes, err) = fetch_whole(&mirror, &h.digest).await;
    assert!(err.is_none(), "{err:?}");
    assert!(bytes[..] == h.blob[..], "the relayed bytes differ");
    let segments: Vec<u64> = h
        .metrics
        .iter()
        .map(|m| requests_with_status(m, 206))
        .collect();
    // 8 MiB from the first holder alone, its first 4 MiB segment, then the
    // other 36 MiB in 9 segments: the busy one is retired as soon as an
    // idle one has finished a segment (its speed measured, a claim is
    // believed), so it takes at most one of them.
    assert!(
        segments[0] <= 1,
        "the busy holder was asked again: {segments:?}"
    );
    assert_eq!(
        segments.iter().sum::<u64>(),
        9,
        "the idle holders fetched the rest: {segments:?}"
    );
}

#[tokio::test]
async fn relays_from_several_holders_share_a_bounded_memory() {
    // Two blobs (`random_blob` is the same for the same size).
    let first = holders(48 << 20, 3, 0).await;
    let second = holders(40 << 20, 3, 0).await;
    for (i, addr) in second.addrs.iter().enumerate() {
        first.router.add(
            &second.digest.to_string(),
            peer(&format!("second{i}"), *addr),
        );
    }
    // Room for one relay's window: 3 holders, (3 + 1) × 4 MiB.
    let config = MirrorConfig {
        relay_memory: 16 << 20,
        ..parallel_config()
    };
    let mirror = Mirror::new(first.router.clone(), config);
    let segments =
        |h: &Holders| -> u64 { h.metrics.iter().map(|m| requests_with_status(m, 206)).sum() };
    // The first relay goes parallel, and its client stops reading.
    let m = mirror
        .blob(&name(), &first.digest, None, false)
        .await
        .expect("hit");
    let mut body = m.body.expect("body");
    let mut got = Vec::new();
    while got.len() < 8 << 20 {
        got.extend_from_slice(&body.next().await.expect("more").expect("bytes"));
    }
    let mut waited = 0;
    while segments(&first) == 0 && waited < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(segments(&first) > 0, "the first relay did not go parallel");
    // Meanwhile the second stays on one holder.
    let (bytes, err) = fetch_whole(&mirror, &second.digest).await;
    assert!(err.is_none() && bytes[..] == second.blob[..], "{err:?}");
    assert_eq!(
        segments(&second),
        0,
        "the second relay took memory it had not"
    );
    // Once the first is done, the room is back.
    let (rest, err) = drain(body).await;
    assert!(err.is_none(), "{err:?}");
    got.extend_from_slice(&rest);
    assert!(got[..] == first.blob[..], "the first relay's bytes differ");
    let (bytes, err) = fetch_whole(&mirror, &second.digest).await;
    assert!(err.is_none() && bytes[..] == second.blob[..], "{err:?}");
    assert!(segments(&second) > 0, "the room did not come back");
}

#[tokio::test]
async fn a_holder_failing_mid_segment_gives_its_bytes_to_another() {
    let h = holders(24 << 20, 1, 0).await;
    let half = fake_peer(Behaviour::Ranged {
        body: h.blob.clone(),
        mode: RangedMode::Half,
    })
    .await;
    h.router.add(&h.digest.to_string(), peer("half", half.addr));
    let mirror = Mirror::new(h.router.clone(), parallel_config());
    let (bytes, err) = fetch_whole(&mirror, &h.digest).await;
    assert!(err.is_none(), "{err:?}");
    assert!(bytes[..] == h.blob[..], "the relayed bytes differ");
    assert_eq!(
        half.requests.lock().expect("lock").len(),
        1,
        "a holder that failed is not asked again"
    );
    let record = mirror.journal().recent().last().cloned().expect("record");
    assert_eq!(record.verified, Some(true));
}

#[tokio::test]
async fn a_corrupt_segment_withholds_the_end_and_only_its_sender_stays_avoided() {
    // A liar whose every answer is wrong, and one that sends the whole blob
    // right but wrong segments (an audit that asks it alone finds a copy
    // that matches, and its earlier segments still give it away).
    for mode in [RangedMode::Corrupt, RangedMode::CorruptRanges] {
        let h = holders(24 << 20, 1, 0).await;
        let liar = fake_peer(Behaviour::Ranged {
            body: h.blob.clone(),
            mode,
        })
        .await;
        h.router
            .add(&h.digest.to_string(), peer("corrupt-segments", liar.addr));
        let mirror = Mirror::new(h.router.clone(), parallel_config());
        let (bytes, err) = fetch_whole(&mirror, &h.digest).await;
        assert!(
            matches!(err, Some(TransferError::DigestMismatch { .. })),
            "{mode:?}: {err:?}"
        );
        assert!(
            bytes.len() < h.blob.len(),
            "{mode:?}: a corrupt blob was relayed whole"
        );
        let segments = requests_with_status(&h.metrics[0], 206);
        assert!(segments >= 1, "{mode:?}: the honest holder sent no segment");
        // At once, neither is asked; the audit then clears the honest one.
        let mut cleared = None;
        for _ in 0..100 {
            if let Ok(m) = mirror.blob(&name(), &h.digest, None, false).await {
                cleared = Some(m);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let m = cleared.unwrap_or_else(|| panic!("{mode:?}: the honest holder stayed avoided"));
        let liar_requests = liar.requests.lock().expect("lock").len();
        let (again, err) = drain(m.body.expect("body")).await;
        assert!(err.is_none(), "{mode:?}: {err:?}");
        assert!(
            again[..] == h.blob[..],
            "{mode:?}: the relayed bytes differ"
        );
        assert_eq!(
            liar.requests.lock().expect("lock").len(),
            liar_requests,
            "{mode:?}: the liar was asked again"
        );
        // The newest record.
        let record = mirror.journal().recent().first().cloned().expect("record");
        assert_eq!(record.verified, Some(true), "{mode:?}");
        assert_eq!(
            record
                .peers
                .iter()
                .map(|p| p.addr.clone())
                .collect::<Vec<_>>(),
            vec![h.addrs[0].to_string()],
            "{mode:?}"
        );
    }
}

#[tokio::test]
async fn a_slow_holder_gives_its_segment_to_a_faster_idle_one() {
    let h = holders(32 << 20, 1, 0).await;
    let slow = fake_peer(Behaviour::Ranged {
        body: h.blob.clone(),
        mode: RangedMode::Slow,
    })
    .await;
    h.router
        .add(&h.digest.to_string(), peer("slow-segments", slow.addr));
    let mirror = Mirror::new(h.router.clone(), parallel_config());
    let (bytes, err) = fetch_whole(&mirror, &h.digest).await;
    assert!(err.is_none(), "{err:?}");
    assert!(bytes[..] == h.blob[..], "the relayed bytes differ");
    // At 2.5 MB/s its first 4 MiB segment would take 1.7 s, while the real
    // holder fetches the rest: it is stopped, and not asked again.
    assert_eq!(slow.requests.lock().expect("lock").len(), 1);
    // It notices at one of its next writes (every 25 ms).
    let mut gone = false;
    for _ in 0..40 {
        gone = slow.client_gone.lock().expect("lock").is_some();
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gone, "the slow holder's segment was abandoned");
}

#[tokio::test]
async fn small_blobs_and_one_holder_stay_on_one_connection() {
    // Below the size: one peer, even when several hold it.
    let h = holders(4 << 20, 2, 0).await;
    let mirror = Mirror::new(h.router.clone(), parallel_config());
    let (bytes, err) = fetch_whole(&mirror, &h.digest).await;
    assert!(err.is_none() && bytes[..] == h.blob[..]);
    let total: u64 = h.metrics.iter().map(|m| requests_with_status(m, 206)).sum();
    assert_eq!(total, 0, "a small blob was fetched in segments");
    // Large, one holder: no segments either.
    let one = holders(40 << 20, 1, 0).await;
    let mirror = Mirror::new(one.router.clone(), parallel_config());
    let (bytes, err) = fetch_whole(&mirror, &one.digest).await;
    assert!(err.is_none() && bytes[..] == one.blob[..]);
    assert_eq!(requests_with_status(&one.metrics[0], 206), 0);
}

#[tokio::test]
async fn a_chunk_request_dropped_early_sets_no_other_holder_sending() {
    let h = holders(48 << 20, 1, 0).await;
    let mut others = Vec::new();
    for i in 0..2 {
        let fake = fake_peer(Behaviour::Ranged {
            body: h.blob.clone(),
            mode: RangedMode::Slow,
        })
        .await;
        h.router
            .add(&h.digest.to_string(), peer(&format!("idle{i}"), fake.addr));
        others.push(fake);
    }
    let mirror = Mirror::new(h.router.clone(), parallel_config());
    // containerd 2.1's parallel layer fetch: `bytes=N-`, one chunk read.
    let range = ByteRange::FromTo {
        first: 8 << 20,
        last: None,
    };
    let m = mirror
        .blob(&name(), &h.digest, Some(range), false)
        .await
        .expect("hit");
    let mut body = m.body.expect("body");
    let first = body.next().await.expect("a chunk").expect("bytes");
    assert!(first[..] == h.blob[8 << 20..(8 << 20) + first.len()]);
    // The relay fills its channel to the client meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked: Vec<usize> = others
        .iter()
        .map(|f| f.requests.lock().expect("lock").len())
        .collect();
    assert_eq!(asked, [0, 0], "other holders were asked for segments");
    drop(body);
}

#[tokio::test]
async fn stale_holders_answering_404_do_not_use_up_the_attempts() {
    // Nodes that held the blob and had it removed: their records outlive
    // the content (Kademlia has no withdraw), and they answer 404.
    let s = setup(100_000).await;
    let not_found = Bytes::from_static(
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}",
    );
    let mut stale = Vec::new();
    for i in 0..6 {
        let fake = fake_peer(Behaviour::Raw(not_found.clone())).await;
        s.router
            .add(&s.digest.to_string(), peer(&format!("stale{i}"), fake.addr));
        stale.push(fake);
    }
    s.router.add(&s.digest.to_string(), peer("real", s.real));
    let config = MirrorConfig {
        max_attempts: 3,
        ..fast_config()
    };
    let mirror = Mirror::new(s.router.clone(), config);
    let (bytes, err) = fetch_whole(&mirror, &s.digest).await;
    assert!(err.is_none(), "{err:?}");
    assert!(bytes[..] == s.blob[..]);
    assert!(
        stale
            .iter()
            .all(|f| f.requests.lock().expect("lock").len() == 1)
    );
    // Other failures still count: three holders that never answer end it.
    let t = setup(1000).await;
    for i in 0..3 {
        let fake = fake_peer(Behaviour::Silent).await;
        t.router.add(
            &t.digest.to_string(),
            peer(&format!("silent{i}"), fake.addr),
        );
    }
    t.router.add(&t.digest.to_string(), peer("real2", t.real));
    let config = MirrorConfig {
        max_attempts: 3,
        header_timeout: Duration::from_millis(300),
        ..fast_config()
    };
    let mirror = Mirror::new(t.router.clone(), config);
    let miss = mirror.blob(&name(), &t.digest, None, false).await.err();
    assert_eq!(miss, Some(MirrorMiss::AllFailed { tried: 3 }));
}
