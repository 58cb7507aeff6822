//! What the registry answers: from a parsed request head to a status, headers
//! and a body, with no socket in sight (unit-tested against `MemoryStore`).

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;

use futures::TryStreamExt;

use super::limits::{UploadLimits, UploadPermit, UploadRate, Uploads};
use peermirror_metrics::{self as metrics, Metrics, Source};
use peermirror_mirror::{Mirror, MirrorMiss, TagResolution};
use peermirror_oci::manifest::{self, Kind, MAX_MANIFEST_SIZE, OCTET_STREAM};
use peermirror_oci::{
    ByteRange, ContentRange, Descriptor, Digest, ManifestReference, Name, OciError, RangeRequest,
    Reference, ReferenceFilter, Route, UPLOAD_RATE_HEADER, parse_range_header, parse_target,
};
use peermirror_store::{BlobBody, ContentStore, StoreError};

/// The request methods the registry tells apart (also a metric label).
pub use peermirror_metrics::Method;

/// The parts of a request the registry looks at.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub target: String,
    pub range: Option<String>,
    /// Set when the request carries [`MIRRORED_HEADER`].
    pub mirrored: bool,
    /// Set when the request carries [`FOLLOW_HEADER`](peermirror_oci::FOLLOW_HEADER).
    pub follow: bool,
    /// The connection is mTLS with a verified client certificate.
    pub certified: bool,
    pub client: SocketAddr,
    /// The client is this node (loopback, or the address it reached): its
    /// containerd. Only its misses may lead a fan-out.
    pub from_node: bool,
}

/// A response body.
pub enum Body {
    Empty,
    Bytes(Bytes),
    /// `len` bytes of a content-store file from `offset`.
    File {
        file: File,
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    /// Exactly `len` bytes, as a stream; an error mid-way aborts the response.
    Stream {
        stream: BoxStream<'static, Result<Bytes, std::io::Error>>,
        len: u64,
        source: Source,
    },
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Bytes(b) => write!(f, "Bytes({})", b.len()),
            Body::File {
                path, offset, len, ..
            } => write!(f, "File({}, {offset}+{len})", path.display()),
            Body::Stream { len, source, .. } => write!(f, "Stream({len}, {source:?})"),
        }
    }
}

impl Body {
    /// Where the bytes are read from; `None` when there are none.
    pub fn source(&self) -> Option<Source> {
        match self {
            Body::Empty => None,
            Body::Bytes(_) => Some(Source::Memory),
            Body::File { .. } => Some(Source::File),
            Body::Stream { source, .. } => Some(*source),
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Headers other than `Content-Length`.
    pub headers: Vec<(&'static str, String)>,
    /// The value of `Content-Length` (also for HEAD, whose body is empty).
    pub content_length: u64,
    pub body: Body,
    /// For metrics.
    pub route: metrics::RouteKind,
    /// Held while a blob body is sent (the upload limits).
    pub permit: Option<UploadPermit>,
}

impl Response {
    pub fn error(route: metrics::RouteKind, err: &OciError) -> Response {
        let body = Bytes::from(err.to_json());
        let mut headers = vec![("content-type", "application/json".to_string())];
        if err.status == 405 {
            headers.push(("allow", "GET, HEAD".to_string()));
        }
        Response {
            status: err.status,
            headers,
            content_length: body.len() as u64,
            body: Body::Bytes(body),
            route,
            permit: None,
        }
    }

    /// Drops the body of a HEAD response, keeping its length.
    fn for_method(mut self, method: Method) -> Response {
        if method == Method::Head {
            self.body = Body::Empty;
        }
        self
    }
}

/// Settings of the request handler.
#[derive(Debug, Clone, Default)]
pub struct HandlerConfig {
    /// Which registries and references are served and mirrored.
    pub filter: ReferenceFilter,
    pub uploads: UploadLimits,
    /// Serving blobs still being written to peers that follow them.
    pub in_flight: InFlightConfig,
}

/// How blobs still being written are served to peers that follow them.
#[derive(Debug, Clone, clap::Args)]
pub struct InFlightConfig {
    /// How long a follower's request waits for the ingest of the blob it
    /// follows to appear in this node's content store.
    #[arg(help_heading = "Fan-out (first deploy)", long = "fanout-ingest-wait", value_name = "FANOUT_INGEST_WAIT", env = "PEERMIRROR_FANOUT_INGEST_WAIT", default_value = "2s", value_parser = peermirror_net::flags::parse_duration)]
    pub wait: Duration,

    /// A followed ingest that grows by nothing for this long fails the
    /// response (the follower resumes elsewhere or goes upstream); the
    /// mirror's stall timeout.
    #[arg(skip = Duration::from_secs(3))]
    pub stall: Duration,
}

impl Default for InFlightConfig {
    fn default() -> Self {
        InFlightConfig {
            wait: Duration::from_secs(2),
            stall: Duration::from_secs(3),
        }
    }
}

/// Who proved the preshared key: the addresses of the live P2P
/// connections.
#[async_trait::async_trait]
pub trait PeerDirectory: Send + Sync + 'static {
    async fn is_peer(&self, ip: std::net::IpAddr) -> bool;
}

/// Answers registry requests from the local content store, and from peers
/// (through the mirror) for what the store lacks.
pub struct Handler {
    store: Arc<dyn ContentStore>,
    mirror: Option<Arc<Mirror>>,
    config: HandlerConfig,
    metrics: Metrics,
    uploads: Uploads,
    /// Who may follow in-flight blobs; nobody when `None`.
    peers: Option<Arc<dyn PeerDirectory>>,
    /// What this node uploads, told to peers fetching blobs.
    upload_rate: UploadRate,
}

/// How a request's name may be used.
enum Scope {
    /// Excluded by configuration: a miss, without looking anywhere.
    Excluded,
    /// Served from the local store only.
    LocalOnly,
    /// Local store, then peers.
    Mirrored,
}

impl Handler {
    pub fn new(
        store: Arc<dyn ContentStore>,
        mirror: Option<Arc<Mirror>>,
        config: HandlerConfig,
        metrics: Metrics,
    ) -> Handler {
        Handler {
            uploads: Uploads::new(config.uploads),
            store,
            mirror,
            config,
            metrics,
            peers: None,
            upload_rate: UploadRate::default(),
        }
    }

    /// Tells peers that fetch blobs what `rate` says this node uploads.
    pub fn with_upload_rate(mut self, rate: UploadRate) -> Handler {
        self.upload_rate = rate;
        self
    }

    /// Lets the peers `peers` names follow blobs still being written.
    pub fn with_peers(mut self, peers: Arc<dyn PeerDirectory>) -> Handler {
        self.peers = Some(peers);
        self
    }

    /// Whether `req` may have bytes of a blob still being written: it asks
    /// for them, and it comes from a peer that proved the preshared key or
    /// over verified mTLS. A header alone is not enough: the registry port
    /// also admits loopback and client networks.
    async fn may_follow(&self, req: &RequestHead) -> bool {
        if !req.follow {
            return false;
        }
        if req.certified {
            return true;
        }
        match &self.peers {
            Some(peers) => peers.is_peer(req.client.ip().to_canonical()).await,
            None => false,
        }
    }

    pub async fn handle(&self, req: &RequestHead) -> Response {
        if req.method == Method::Other {
            return Response::error(
                metrics::RouteKind::Other,
                &OciError::unsupported(405, "this registry is read-only: GET and HEAD only"),
            );
        }
        let route = match parse_target(&req.target) {
            Ok(route) => route,
            Err(e) => return Response::error(metrics::RouteKind::Other, &e),
        };
        let metric_route = match route {
            Route::Base => metrics::RouteKind::Base,
            Route::Manifest { .. } => metrics::RouteKind::Manifest,
            Route::Blob { .. } => metrics::RouteKind::Blob,
        };
        let result = match route {
            Route::Base => Ok(Response {
                status: 200,
                headers: vec![
                    ("content-type", "application/json".to_string()),
                    (
                        "docker-distribution-api-version",
                        "registry/2.0".to_string(),
                    ),
                ],
                content_length: 2,
                body: Body::Bytes(Bytes::from_static(b"{}")),
                route: metrics::RouteKind::Base,
                permit: None,
            }),
            Route::Manifest { name, reference } => {
                let scope = self.scope(&name, Some(&reference), req.mirrored);
                // Manifests (up to 4 MiB) count against the upload limits
                // like blobs.
                let permit = match req.method {
                    Method::Get => match self.upload_permit(req.client.ip()) {
                        Ok(p) => p,
                        Err(busy) => return busy,
                    },
                    _ => None,
                };
                self.manifest(&name, &reference, scope)
                    .await
                    .map(|mut response| {
                        response.permit = permit;
                        response
                    })
            }
            Route::Blob { name, digest } => {
                let scope = self.scope(&name, None, req.mirrored);
                let permit = match req.method {
                    Method::Get => match self.upload_permit(req.client.ip()) {
                        Ok(p) => p,
                        Err(busy) => return busy,
                    },
                    _ => None,
                };
                let follow = self.may_follow(req).await;
                let rate = self.upload_rate.get().filter(|_| req.mirrored);
                self.blob(&name, &digest, req, scope, follow)
                    .await
                    .map(|mut response| {
                        response.permit = permit;
                        if let Some(rate) = rate
                            && matches!(response.status, 200 | 206)
                        {
                            response
                                .headers
                                .push((UPLOAD_RATE_HEADER, rate.to_string()));
                        }
                        response
                    })
            }
        };
        match result {
            Ok(response) => response.for_method(req.method),
            Err(e) => Response::error(metric_route, &e).for_method(req.method),
        }
    }

    /// A permit for a body sent to `client`, or the 503 to answer when the
    /// upload limits are reached.
    fn upload_permit(&self, client: std::net::IpAddr) -> Result<Option<UploadPermit>, Response> {
        self.uploads.acquire(client).map_err(|()| {
            self.metrics.upload_rejections.inc();
            let mut busy = Response::error(
                metrics::RouteKind::Blob,
                &OciError::new(
                    503,
                    peermirror_oci::ErrorCode::TooManyRequests,
                    "upload limit reached; try another endpoint",
                ),
            );
            busy.headers.push(("retry-after", "1".to_string()));
            busy
        })
    }

    /// Applies `--mirrored-registries`, `--registry-filters` and the rule that
    /// a mirrored request is never forwarded again.
    fn scope(&self, name: &Name, reference: Option<&ManifestReference>, mirrored: bool) -> Scope {
        let filter = &self.config.filter;
        let local_or = |s: Scope| {
            if mirrored || self.mirror.is_none() {
                Scope::LocalOnly
            } else {
                s
            }
        };
        let Some(registry) = &name.registry else {
            // Without a registry, only digests can be matched: served
            // locally, mirrored only when every registry is.
            return local_or(if filter.all_registries() {
                Scope::Mirrored
            } else {
                Scope::LocalOnly
            });
        };
        let tag = match reference {
            Some(ManifestReference::Tag(tag)) => Some(tag),
            _ => None,
        };
        // `--tag-resolution off`: the node's containerd resolves tags at the
        // registry (peers asking for this node's own view still get it).
        if tag.is_some()
            && !mirrored
            && self
                .mirror
                .as_ref()
                .is_some_and(|m| m.tag_resolution() == TagResolution::Off)
        {
            return Scope::Excluded;
        }
        let key = name
            .reference(tag)
            .map(|r| r.filter_key())
            .unwrap_or_default();
        if !filter.allows(registry, &key) {
            return Scope::Excluded;
        }
        local_or(Scope::Mirrored)
    }

    /// The `registry` label of a request: a registry this node mirrors by
    /// name, or holds images of; anything else is `other` (a request's
    /// `?ns=` is the client's to choose, and every new label value would be
    /// a series kept forever).
    pub fn registry_label(&self, registry: Option<&peermirror_oci::Registry>) -> String {
        let Some(registry) = registry else {
            return "unknown".to_string();
        };
        let listed = self.config.filter.registries();
        let known = if listed.is_empty() {
            self.store
                .catalog()
                .borrow()
                .has_registry(registry.as_str())
        } else {
            listed.contains(registry)
        };
        if known {
            registry.to_string()
        } else {
            "other".to_string()
        }
    }

    fn count_mirror(
        &self,
        name: &Name,
        kind: &'static str,
        hit: bool,
        resolve: Option<std::time::Duration>,
    ) {
        let registry = self.registry_label(name.registry.as_ref());
        self.metrics.count_mirror(registry, kind, hit, resolve);
    }

    async fn manifest(
        &self,
        name: &Name,
        reference: &ManifestReference,
        scope: Scope,
    ) -> Result<Response, OciError> {
        if matches!(scope, Scope::Excluded) {
            return Err(OciError::manifest_unknown());
        }
        let tagged = match reference {
            ManifestReference::Tag(tag) => {
                let Some(tagged) = name.reference(Some(tag)) else {
                    return Err(OciError::new(
                        404,
                        peermirror_oci::ErrorCode::ManifestUnknown,
                        "a tag needs its registry: add ?ns=<registry> or start the name with the registry host",
                    ));
                };
                Some(tagged)
            }
            ManifestReference::Digest(_) => None,
        };
        match self.local_manifest(reference, tagged.as_ref()).await {
            Ok(Some(response)) => return Ok(response),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        let (Scope::Mirrored, Some(mirror)) = (scope, &self.mirror) else {
            return Err(OciError::manifest_unknown());
        };
        match mirror.manifest(name, tagged.as_ref(), reference).await {
            Ok(m) => {
                self.count_mirror(name, "manifest", true, Some(m.resolve_time));
                tracing::debug!(peer = %m.peer.addr, digest = %m.descriptor.digest, "manifest mirrored");
                Ok(manifest_response(&m.descriptor, m.bytes))
            }
            Err(miss) => {
                self.count_mirror(name, "manifest", false, None);
                if let MirrorMiss::TagNotAgreed { digests, .. } = miss {
                    let reason = if digests > 1 {
                        "disagreement"
                    } else {
                        "single_host"
                    };
                    self.metrics
                        .tags_not_agreed
                        .get_or_create(&peermirror_metrics::TagLabels { reason })
                        .inc();
                }
                tracing::debug!(?miss, "manifest not found on peers");
                Err(OciError::manifest_unknown())
            }
        }
    }

    /// The manifest from the local store; `Ok(None)` when it is not there.
    async fn local_manifest(
        &self,
        reference: &ManifestReference,
        tagged: Option<&Reference>,
    ) -> Result<Option<Response>, OciError> {
        let (digest, media_type) = match (reference, tagged) {
            (ManifestReference::Digest(digest), _) => (*digest, None),
            (ManifestReference::Tag(_), Some(reference)) => {
                match self.store.resolve_tag(reference).await {
                    Ok(Some(desc)) => (desc.digest, Some(desc.media_type)),
                    Ok(None) => return Ok(None),
                    Err(e) => {
                        log_store_error(&e);
                        return Ok(None);
                    }
                }
            }
            (ManifestReference::Tag(_), None) => return Ok(None),
        };
        let info = match self.store.stat(&digest).await {
            Ok(Some(info)) => info,
            Ok(None) => return Ok(None),
            Err(e) => {
                log_store_error(&e);
                return Ok(None);
            }
        };
        if info.size > MAX_MANIFEST_SIZE {
            return Err(OciError::manifest_unknown());
        }
        let bytes = match peermirror_store::read_small(
            self.store.as_ref(),
            &digest,
            info.size,
            MAX_MANIFEST_SIZE,
        )
        .await
        {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(e) => {
                log_store_error(&e);
                return Ok(None);
            }
        };
        let known = media_type
            .or(info.media_type)
            .filter(|mt| manifest::kind_of(mt) != Kind::Blob);
        let Some(media_type) = known.or_else(|| manifest::sniff_media_type(&bytes)) else {
            // Present, but a layer or config: not a manifest.
            return Err(OciError::manifest_unknown());
        };
        Ok(Some(manifest_response(
            &Descriptor {
                media_type,
                digest,
                size: info.size,
            },
            bytes,
        )))
    }

    async fn blob(
        &self,
        name: &Name,
        digest: &Digest,
        req: &RequestHead,
        scope: Scope,
        follow: bool,
    ) -> Result<Response, OciError> {
        if matches!(scope, Scope::Excluded) {
            return Err(OciError::blob_unknown());
        }
        let (range, method) = (req.range.as_deref(), req.method);
        // Only the node's own containerd fetches what nobody holds.
        let asker = if req.from_node {
            peermirror_routing::Asker::Node
        } else {
            peermirror_routing::Asker::Other
        };
        let range = match range.map(parse_range_header).transpose() {
            Ok(Some(RangeRequest::Single(r))) => Ok(Some(r)),
            Ok(Some(RangeRequest::Multiple)) | Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        let local = match self.store.stat(digest).await {
            Ok(info) => info,
            Err(e) => {
                log_store_error(&e);
                None
            }
        };
        if let Some(info) = local {
            let range = match range {
                Ok(r) => r,
                Err(message) => return Ok(range_not_satisfiable(message, Some(info.size))),
            };
            // `None`: gone between stat and open; look on peers.
            if let Some(response) = self.local_blob(digest, info.size, range, method).await? {
                return Ok(response);
            }
        }
        if follow
            && let Some(in_flight) = self
                .store
                .in_flight(digest, self.config.in_flight.wait)
                .await
        {
            return Ok(self.in_flight_blob(in_flight, range, method));
        }
        let (Scope::Mirrored, Some(mirror)) = (scope, &self.mirror) else {
            return Err(OciError::blob_unknown());
        };
        let range = match range {
            Ok(r) => r,
            Err(message) => return Ok(range_not_satisfiable(message, None)),
        };
        match mirror
            .blob_for(name, digest, range, method == Method::Head, asker)
            .await
        {
            Ok(m) => {
                self.count_mirror(name, "blob", true, Some(m.resolve_time));
                tracing::debug!(peer = %m.peer.addr, %digest, offset = m.offset, len = m.len, "blob mirrored");
                let partial = m.partial && m.len > 0;
                let mut headers = blob_headers(digest);
                if partial && let Some(span) = ContentRange::span(m.offset, m.len, m.size) {
                    headers.push(("content-range", span.to_string()));
                }
                let body = match m.body {
                    Some(stream) => Body::Stream {
                        stream: Box::pin(stream.map_err(std::io::Error::other)),
                        len: m.len,
                        source: Source::Mirror,
                    },
                    None => Body::Empty,
                };
                Ok(Response {
                    status: if partial { 206 } else { 200 },
                    headers,
                    content_length: m.len,
                    body,
                    route: metrics::RouteKind::Blob,
                    permit: None,
                })
            }
            Err(MirrorMiss::Unsatisfiable { size }) => {
                self.count_mirror(name, "blob", true, None);
                Ok(range_not_satisfiable(
                    "range outside the blob".to_string(),
                    Some(size),
                ))
            }
            Err(miss) => {
                self.count_mirror(name, "blob", false, None);
                tracing::debug!(?miss, %digest, "blob not found on peers");
                Err(OciError::blob_unknown())
            }
        }
    }

    /// A blob still being written, to a peer that follows it.
    fn in_flight_blob(
        &self,
        in_flight: peermirror_store::ingest::InFlight,
        range: Result<Option<ByteRange>, String>,
        method: Method,
    ) -> Response {
        let size = in_flight.total;
        let range = match range {
            Ok(r) => r,
            Err(message) => return range_not_satisfiable(message, Some(size)),
        };
        let digest = in_flight.digest;
        let BlobSpan {
            status,
            offset,
            len,
            headers,
        } = match blob_span(&digest, size, range) {
            Ok(span) => span,
            Err(unsatisfiable) => return unsatisfiable,
        };
        tracing::debug!(%digest, offset, len, "serving an in-flight blob to a follower");
        let body = if method == Method::Head {
            Body::Empty
        } else {
            let stream = in_flight.stream(offset, offset + len, self.config.in_flight.stall);
            Body::Stream {
                stream: Box::pin(stream.map_err(std::io::Error::other)),
                len,
                source: Source::InFlight,
            }
        };
        Response {
            status,
            headers,
            content_length: len,
            body,
            route: metrics::RouteKind::Blob,
            permit: None,
        }
    }

    /// A blob from the local store; `Ok(None)` if it vanished since `stat`.
    async fn local_blob(
        &self,
        digest: &Digest,
        size: u64,
        range: Option<ByteRange>,
        method: Method,
    ) -> Result<Option<Response>, OciError> {
        let BlobSpan {
            status,
            offset,
            len,
            headers,
        } = match blob_span(digest, size, range) {
            Ok(span) => span,
            Err(unsatisfiable) => return Ok(Some(unsatisfiable)),
        };
        let body = if method == Method::Head {
            Body::Empty
        } else {
            match self.store.open(digest, offset, len).await {
                Ok(Some(BlobBody::File { file, path })) => Body::File {
                    file,
                    path,
                    offset,
                    len,
                },
                Ok(Some(BlobBody::Stream(stream))) => Body::Stream {
                    stream: Box::pin(stream.map_err(std::io::Error::other)),
                    len,
                    source: Source::Grpc,
                },
                Ok(None) => return Ok(None),
                Err(e) => {
                    log_store_error(&e);
                    return Ok(None);
                }
            }
        };
        Ok(Some(Response {
            status,
            headers,
            content_length: len,
            body,
            route: metrics::RouteKind::Blob,
            permit: None,
        }))
    }
}

/// What a blob response of `size` bytes carries for `range`.
struct BlobSpan {
    status: u16,
    offset: u64,
    len: u64,
    /// The blob headers, with `Content-Range` on a `206`.
    headers: Vec<(&'static str, String)>,
}

/// The status, span and headers of a blob response; the `416` to answer
/// when the range is outside the blob.
fn blob_span(digest: &Digest, size: u64, range: Option<ByteRange>) -> Result<BlobSpan, Response> {
    let (status, offset, len) = match range {
        // An empty blob has no satisfiable range, but `bytes=0-` is how
        // containerd 2.1+ asks for any whole blob: send it.
        Some(r) if size == 0 && r.is_from_start() => (200, 0, 0),
        Some(r) => match r.resolve(size) {
            Ok(span) => (206, *span.start(), span.end() - span.start() + 1),
            Err(e) => return Err(range_not_satisfiable(e.to_string(), Some(size))),
        },
        None => (200, 0, size),
    };
    let mut headers = blob_headers(digest);
    if status == 206
        && let Some(span) = ContentRange::span(offset, len, size)
    {
        headers.push(("content-range", span.to_string()));
    }
    Ok(BlobSpan {
        status,
        offset,
        len,
        headers,
    })
}

fn blob_headers(digest: &Digest) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", OCTET_STREAM.to_string()),
        ("docker-content-digest", digest.to_string()),
        ("accept-ranges", "bytes".to_string()),
        ("etag", format!("\"{digest}\"")),
    ]
}

/// A store failure is answered as a miss (so that containerd moves on to its
/// next endpoint instead of failing the pull); the cause is logged.
fn log_store_error(e: &StoreError) {
    tracing::warn!(error = %e, "content store error, answering as a miss");
}

/// 416, with the `Content-Range: bytes */<size>` RFC 9110 asks for when
/// the size is known.
fn range_not_satisfiable(message: String, size: Option<u64>) -> Response {
    let mut response = Response::error(metrics::RouteKind::Blob, &OciError::range_invalid(message));
    if let Some(size) = size {
        response.headers.push((
            "content-range",
            ContentRange::Unsatisfied { size }.to_string(),
        ));
    }
    response
}

fn manifest_response(desc: &Descriptor, bytes: Bytes) -> Response {
    Response {
        status: 200,
        headers: vec![
            ("content-type", desc.media_type.clone()),
            ("docker-content-digest", desc.digest.to_string()),
            ("etag", format!("\"{}\"", desc.digest)),
        ],
        content_length: bytes.len() as u64,
        body: Body::Bytes(bytes),
        route: metrics::RouteKind::Manifest,
        permit: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermirror_oci::manifest::{OCI_INDEX, OCI_MANIFEST};
    use peermirror_store::MemoryStore;

    const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

    struct Fixture {
        store: Arc<MemoryStore>,
        handler: Handler,
        layer: Bytes,
        layer_desc: Descriptor,
        manifest: Bytes,
        manifest_desc: Descriptor,
        index_desc: Descriptor,
    }

    async fn fixture() -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let layer = Bytes::from((0..10_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let layer_desc = store.add_blob(LAYER, layer.clone()).await;
        let config_desc = store
            .add_blob("application/vnd.oci.image.config.v1+json", &b"{}"[..])
            .await;
        let manifest = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": config_desc, "layers": [layer_desc],
            }))
            .expect("json"),
        );
        let manifest_desc = store.add_blob(OCI_MANIFEST, manifest.clone()).await;
        // An index without mediaType field: its type comes from the image.
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "manifests": [manifest_desc],
        }))
        .expect("json");
        let index_desc = store.add_blob(OCI_INDEX, index).await;
        store
            .set_image("docker.io/library/app:1", index_desc.clone())
            .await;
        store
            .set_image("example.com:5000/team/app:v2", manifest_desc.clone())
            .await;
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let handler = Handler::new(store.clone(), None, HandlerConfig::default(), metrics);
        Fixture {
            store,
            handler,
            layer,
            layer_desc,
            manifest,
            manifest_desc,
            index_desc,
        }
    }

    impl Fixture {
        /// A handler over the fixture's store that mirrors through `mirror`.
        fn handler_with(&self, mirror: Arc<Mirror>) -> Handler {
            let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
            Handler::new(
                self.store.clone(),
                Some(mirror),
                HandlerConfig::default(),
                metrics,
            )
        }
    }

    fn get(target: &str) -> RequestHead {
        RequestHead {
            method: Method::Get,
            target: target.to_string(),
            range: None,
            mirrored: false,
            follow: false,
            certified: false,
            client: "127.0.0.1:1".parse().expect("addr"),
            from_node: true,
        }
    }

    fn ranged(target: &str, range: &str) -> RequestHead {
        RequestHead {
            range: Some(range.to_string()),
            ..get(target)
        }
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    async fn body(r: Response) -> Bytes {
        use futures::StreamExt;
        match r.body {
            Body::Empty => Bytes::new(),
            Body::Bytes(b) => b,
            Body::File { .. } => panic!("memory store has no files"),
            Body::Stream { mut stream, .. } => {
                let mut out = Vec::new();
                while let Some(chunk) = stream.next().await {
                    out.extend_from_slice(&chunk.expect("chunk"));
                }
                Bytes::from(out)
            }
        }
    }

    fn error_code(r: &Response) -> String {
        let Body::Bytes(b) = &r.body else {
            panic!("error without body")
        };
        let v: serde_json::Value = serde_json::from_slice(b).expect("json");
        v["errors"][0]["code"].as_str().expect("code").to_string()
    }

    #[tokio::test]
    async fn base_route() {
        let f = fixture().await;
        let r = f.handler.handle(&get("/v2/")).await;
        assert_eq!(r.status, 200);
    }

    #[tokio::test]
    async fn tag_resolves_with_ns_and_normalises_docker_hub() {
        let f = fixture().await;
        for target in [
            "/v2/app/manifests/1?ns=docker.io",
            "/v2/library/app/manifests/1?ns=docker.io",
            "/v2/library/app/manifests/1?ns=registry-1.docker.io",
            "/v2/docker.io/library/app/manifests/1",
        ] {
            let r = f.handler.handle(&get(target)).await;
            assert_eq!(r.status, 200, "{target}");
            assert_eq!(header(&r, "content-type"), Some(OCI_INDEX), "{target}");
            assert_eq!(
                header(&r, "docker-content-digest"),
                Some(f.index_desc.digest.to_string().as_str())
            );
            assert_eq!(r.content_length, f.index_desc.size);
        }
        let r = f
            .handler
            .handle(&get("/v2/team/app/manifests/v2?ns=example.com%3A5000"))
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "content-type"), Some(OCI_MANIFEST));
        assert_eq!(body(r).await, f.manifest);
    }

    #[tokio::test]
    async fn tag_resolution_off_leaves_the_local_clients_tags_to_the_registry() {
        let f = fixture().await;
        let router = peermirror_routing::MemoryRouter::new();
        let mirror = Mirror::new(
            router,
            peermirror_mirror::MirrorConfig {
                tag_resolution: TagResolution::Off,
                ..Default::default()
            },
        );
        let handler = f.handler_with(mirror);
        let by_tag = "/v2/app/manifests/1?ns=docker.io";
        // The node's containerd: a miss although the tag is here ...
        let r = handler.handle(&get(by_tag)).await;
        assert_eq!(r.status, 404);
        assert_eq!(error_code(&r), "MANIFEST_UNKNOWN");
        // ... digests still answered ...
        let by_digest = format!("/v2/app/manifests/{}?ns=docker.io", f.index_desc.digest);
        assert_eq!(handler.handle(&get(&by_digest)).await.status, 200);
        // ... and a peer asking for this node's view gets it.
        let mirrored = RequestHead {
            mirrored: true,
            ..get(by_tag)
        };
        assert_eq!(handler.handle(&mirrored).await.status, 200);
    }

    #[tokio::test]
    async fn only_the_nodes_own_misses_may_lead_a_fan_out() {
        let f = fixture().await;
        let router = peermirror_routing::MemoryRouter::new();
        let handler = f.handler_with(Mirror::new(router.clone(), Default::default()));
        let missing = format!(
            "/v2/app/blobs/{}?ns=docker.io",
            Digest::of(b"nobody has it")
        );
        // The node's containerd (loopback) ...
        assert_eq!(handler.handle(&get(&missing)).await.status, 404);
        // ... and another host, which may only follow.
        let other = RequestHead {
            client: "10.0.0.9:40000".parse().expect("addr"),
            from_node: false,
            ..get(&missing)
        };
        assert_eq!(handler.handle(&other).await.status, 404);
        use peermirror_routing::Asker;
        assert_eq!(
            router.fanout_askers(),
            [(None, Asker::Node), (None, Asker::Other)]
        );
    }

    #[tokio::test]
    async fn tag_misses() {
        let f = fixture().await;
        for target in [
            "/v2/app/manifests/2?ns=docker.io",
            "/v2/app/manifests/1?ns=ghcr.io",
            "/v2/library/app/manifests/1",
        ] {
            let r = f.handler.handle(&get(target)).await;
            assert_eq!(r.status, 404, "{target}");
            assert_eq!(error_code(&r), "MANIFEST_UNKNOWN");
        }
    }

    #[tokio::test]
    async fn manifest_by_digest_and_not_for_layers() {
        let f = fixture().await;
        let r = f
            .handler
            .handle(&get(&format!("/v2/x/manifests/{}", f.manifest_desc.digest)))
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "content-type"), Some(OCI_MANIFEST));
        let r = f
            .handler
            .handle(&get(&format!("/v2/x/manifests/{}", f.layer_desc.digest)))
            .await;
        assert_eq!(r.status, 404);
        assert_eq!(error_code(&r), "MANIFEST_UNKNOWN");
    }

    #[tokio::test]
    async fn manifest_type_is_sniffed_when_not_in_any_image() {
        let f = fixture().await;
        f.store.remove_image("docker.io/library/app:1").await;
        f.store.remove_image("example.com:5000/team/app:v2").await;
        let r = f
            .handler
            .handle(&get(&format!("/v2/x/manifests/{}", f.manifest_desc.digest)))
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "content-type"), Some(OCI_MANIFEST));
    }

    #[tokio::test]
    async fn whole_blob_and_head() {
        let f = fixture().await;
        let target = format!("/v2/library/app/blobs/{}", f.layer_desc.digest);
        let r = f.handler.handle(&get(&target)).await;
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "accept-ranges"), Some("bytes"));
        assert_eq!(
            header(&r, "docker-content-digest"),
            Some(f.layer_desc.digest.to_string().as_str())
        );
        assert_eq!(r.content_length, 10_000);
        assert_eq!(body(r).await, f.layer);

        let mut head = get(&target);
        head.method = Method::Head;
        let r = f.handler.handle(&head).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_length, 10_000);
        assert!(matches!(r.body, Body::Empty));
    }

    #[tokio::test]
    async fn peers_fetching_blobs_are_told_the_upload_rate() {
        let f = fixture().await;
        let rate = UploadRate::default();
        let handler = Handler::new(
            f.store.clone(),
            None,
            HandlerConfig::default(),
            Metrics::new(&mut prometheus_client::registry::Registry::default()),
        )
        .with_upload_rate(rate.clone());
        let target = format!("/v2/library/app/blobs/{}", f.layer_desc.digest);
        let mirrored = RequestHead {
            mirrored: true,
            ..get(&target)
        };
        // Unknown until measured: nothing said.
        let r = handler.handle(&mirrored).await;
        assert_eq!(header(&r, UPLOAD_RATE_HEADER), None);
        rate.set(123_456);
        for req in [mirrored.clone(), ranged(&target, "bytes=5-9")] {
            let r = handler
                .handle(&RequestHead {
                    mirrored: true,
                    ..req
                })
                .await;
            assert!(matches!(r.status, 200 | 206));
            assert_eq!(header(&r, UPLOAD_RATE_HEADER), Some("123456"));
        }
        // Only peers are told; misses say nothing.
        let r = handler.handle(&get(&target)).await;
        assert_eq!(header(&r, UPLOAD_RATE_HEADER), None);
        let missing = format!("/v2/library/app/blobs/sha256:{}", "0".repeat(64));
        let r = handler
            .handle(&RequestHead {
                mirrored: true,
                ..get(&missing)
            })
            .await;
        assert_eq!(r.status, 404);
        assert_eq!(header(&r, UPLOAD_RATE_HEADER), None);
    }

    #[tokio::test]
    async fn ranges() {
        let f = fixture().await;
        let target = format!("/v2/a/blobs/{}", f.layer_desc.digest);
        let cases = [
            ("bytes=0-", 206, 0, 9_999),
            ("bytes=0-99", 206, 0, 99),
            ("bytes=9000-", 206, 9_000, 9_999),
            ("bytes=-10", 206, 9_990, 9_999),
            ("bytes=9999-20000", 206, 9_999, 9_999),
        ];
        for (range, status, first, last) in cases {
            let r = f.handler.handle(&ranged(&target, range)).await;
            assert_eq!(r.status, status, "{range}");
            let expect = format!("bytes {first}-{last}/10000");
            assert_eq!(
                header(&r, "content-range"),
                Some(expect.as_str()),
                "{range}"
            );
            assert_eq!(r.content_length, last - first + 1);
            assert_eq!(
                body(r).await,
                f.layer.slice(first as usize..=last as usize),
                "{range}"
            );
        }
        // Multiple ranges are ignored: the whole blob with 200.
        let r = f.handler.handle(&ranged(&target, "bytes=0-1,5-6")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_length, 10_000);
        for bad in [
            "bytes=10000-",
            "bytes=-0",
            "bytes=5-1",
            "bytes=x",
            "lines=1-2",
        ] {
            let r = f.handler.handle(&ranged(&target, bad)).await;
            assert_eq!(r.status, 416, "{bad}");
            assert_eq!(error_code(&r), "RANGE_INVALID");
            assert_eq!(header(&r, "content-range"), Some("bytes */10000"));
        }
    }

    #[tokio::test]
    async fn empty_blob_with_bytes_0_is_whole() {
        let f = fixture().await;
        let empty = f.store.add_blob(LAYER, Bytes::new()).await;
        let target = format!("/v2/a/blobs/{}", empty.digest);
        let r = f.handler.handle(&ranged(&target, "bytes=0-")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_length, 0);
        let r = f.handler.handle(&ranged(&target, "bytes=0-0")).await;
        assert_eq!(r.status, 416);
    }

    #[tokio::test]
    async fn misses_and_bad_requests() {
        let f = fixture().await;
        let unknown = Digest::of(b"unknown");
        let r = f
            .handler
            .handle(&get(&format!("/v2/a/blobs/{unknown}")))
            .await;
        assert_eq!((r.status, error_code(&r).as_str()), (404, "BLOB_UNKNOWN"));
        let r = f.handler.handle(&get("/v2/a/blobs/sha256:1234")).await;
        assert_eq!((r.status, error_code(&r).as_str()), (400, "DIGEST_INVALID"));
        let r = f.handler.handle(&get("/v2/A/blobs/sha256:1234")).await;
        assert_eq!((r.status, error_code(&r).as_str()), (400, "NAME_INVALID"));
        let mut post = get("/v2/");
        post.method = Method::Other;
        let r = f.handler.handle(&post).await;
        assert_eq!(r.status, 405);
        assert_eq!(header(&r, "allow"), Some("GET, HEAD"));
    }

    /// However many registries clients name in `?ns=`, the metric labels
    /// stay the few this node knows.
    #[tokio::test]
    async fn registry_labels_are_bounded() {
        let f = fixture().await;
        let router = peermirror_routing::MemoryRouter::new();
        let mirror = Mirror::new(router, peermirror_mirror::MirrorConfig::default());
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let handler = Handler::new(
            f.store.clone(),
            Some(mirror),
            HandlerConfig::default(),
            metrics.clone(),
        );
        for i in 0..3_000u32 {
            let target = format!(
                "/v2/a/blobs/{}?ns=r{i}.example",
                Digest::of(&i.to_be_bytes())
            );
            assert_eq!(handler.handle(&get(&target)).await.status, 404);
        }
        let held = format!("/v2/library/x/blobs/{}?ns=docker.io", Digest::of(b"none"));
        handler.handle(&get(&held)).await;
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("m", "m", metrics.mirror_requests.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let series = text.lines().filter(|l| l.starts_with("m_total")).count();
        assert_eq!(series, 2, "{text}");
        assert!(text.contains(r#"registry="other""#) && text.contains(r#"registry="docker.io""#));
        assert_eq!(
            handler.registry_label(Some(&"r1.example".parse().expect("registry"))),
            "other"
        );
    }

    proptest::proptest! {
        /// Whatever `ns` a client sends, the label is one of a fixed few
        /// values or a registry the node mirrors by name or holds.
        #[test]
        fn labels_come_from_a_bounded_set(ns in "[a-z0-9.-]{1,30}(:[0-9]{1,5})?") {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let f = runtime.block_on(fixture());
            let Ok(registry) = ns.parse::<peermirror_oci::Registry>() else { return Ok(()) };
            let label = f.handler.registry_label(Some(&registry));
            let held = ["docker.io", "example.com:5000"];
            proptest::prop_assert!(
                label == "other" || held.contains(&label.as_str()),
                "{} became the label {}", ns, label
            );
        }
    }

    #[tokio::test]
    async fn removed_blob_is_a_miss_at_once() {
        let f = fixture().await;
        f.store.remove_blob(&f.layer_desc.digest).await;
        let r = f
            .handler
            .handle(&get(&format!("/v2/a/blobs/{}", f.layer_desc.digest)))
            .await;
        assert_eq!(r.status, 404);
    }
}
