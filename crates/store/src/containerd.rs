//! The containerd content store, over its gRPC API and, for blob bytes, its
//! files on disk.
//!
//! - Blob bytes come straight from `<content root>/blobs/sha256/<hex>`; the
//!   content root is discovered through the introspection API (or set by the
//!   operator). When the file cannot be opened, `Content.Read` streams the same
//!   bytes over gRPC. Only committed content is ever read: the file path is
//!   built from a validated digest inside `blobs/`, never `ingest/`.
//! - The catalog is rebuilt from `Images.List` and `Content.List` when an
//!   image or content event arrives, and on a timer, because containerd 1.6
//!   sends no event when the garbage collector removes content.
//! - The gRPC channel connects lazily and reconnects by itself; the event
//!   stream is re-subscribed with backoff, so a containerd restart is survived
//!   without restarting the daemon.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use containerd_client::services::v1::{
    GetImageRequest, InfoRequest, ListContentRequest, ListImagesRequest, PluginsRequest,
    ReadContentRequest, SubscribeRequest, content_client::ContentClient,
    events_client::EventsClient, images_client::ImagesClient,
    introspection_client::IntrospectionClient,
};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use peermirror_net::Backoff;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use super::catalog::{self, Catalog, DocumentCache, ImageRecord};
use super::{BlobBody, BlobInfo, ContentStore, StoreError, StoreHealth};
use peermirror_oci::{Descriptor, Digest, Reference, ReferenceFilter};

/// Which containerd and namespace: all that `peermirror import` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct ContainerdEndpoint {
    /// containerd's gRPC socket.
    #[arg(
        long = "containerd-sock",
        value_name = "CONTAINERD_SOCK",
        env = "PEERMIRROR_CONTAINERD_SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub socket: PathBuf,

    /// containerd namespace whose images are served (kubelet uses k8s.io).
    #[arg(
        long = "containerd-namespace",
        value_name = "CONTAINERD_NAMESPACE",
        env = "PEERMIRROR_CONTAINERD_NAMESPACE",
        default_value = "k8s.io"
    )]
    pub namespace: String,
}

/// How to reach containerd and what to read from it: the store's settings,
/// which are also its flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ContainerdConfig {
    #[command(flatten)]
    pub endpoint: ContainerdEndpoint,

    /// containerd's content store root (the directory holding `blobs/sha256`).
    /// Asked from containerd when not set. When its files cannot be read,
    /// blobs are streamed through containerd's gRPC API instead.
    #[arg(
        long = "containerd-content-path",
        value_name = "CONTAINERD_CONTENT_PATH",
        env = "PEERMIRROR_CONTAINERD_CONTENT_PATH"
    )]
    pub content_path: Option<PathBuf>,

    /// How often the image list is re-read even without containerd events
    /// (containerd 1.6 sends none when its garbage collector removes content).
    #[arg(long, env = "PEERMIRROR_RESYNC_INTERVAL", default_value = "60s", value_parser = peermirror_net::flags::parse_duration)]
    pub resync_interval: Duration,
}

/// The metric handles the store keeps current.
#[derive(Clone, Default)]
pub struct StoreGauges {
    /// 1 when the last call to containerd succeeded.
    pub connected: Gauge,
    pub tags: Gauge,
    pub blobs: Gauge,
}

impl StoreGauges {
    /// Creates the store's gauges and registers them in `registry`, under
    /// the daemon's `peermirror_` prefix.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> StoreGauges {
        let gauges = StoreGauges::default();
        let r = registry.sub_registry_with_prefix("peermirror");
        r.register(
            "containerd_connected",
            "1 when the last call to containerd succeeded",
            gauges.connected.clone(),
        );
        r.register(
            "catalog_tags",
            "Tagged images in the served containerd namespace",
            gauges.tags.clone(),
        );
        r.register(
            "catalog_blobs",
            "Blobs (manifests, configs, layers) reachable from the served images",
            gauges.blobs.clone(),
        );
        gauges
    }
}

/// The plugin that owns the content store, as introspection names it.
const CONTENT_PLUGIN_FILTER: &str = "type==io.containerd.content.v1,id==content";
/// Wait after an event for the ones that usually follow it (a pull creates
/// the image, then updates it), so that one pull is one rebuild.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(100);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub struct ContainerdStore {
    config: ContainerdConfig,
    /// Images left out of the catalog (and so never advertised).
    filter: ReferenceFilter,
    gauges: StoreGauges,
    channel: Channel,
    /// `<content root>/blobs/sha256`, once known.
    blobs_dir: RwLock<Option<PathBuf>>,
    catalog: watch::Sender<Arc<Catalog>>,
    health: watch::Sender<StoreHealth>,
    /// Whether the content root's readability has been logged.
    root_reported: AtomicBool,
    /// Wakes the rebuild loop.
    changed: Notify,
}

/// A lazily connected gRPC channel to containerd's socket; `timeout`
/// bounds each call.
pub(crate) fn unix_channel(socket: PathBuf, timeout: Option<Duration>) -> Channel {
    // The URI is ignored by the connector; tonic only needs a valid one.
    let mut endpoint =
        Endpoint::from_static("http://containerd.sock").connect_timeout(Duration::from_secs(2));
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let socket = socket.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(socket).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    }))
}

impl ContainerdStore {
    /// Creates the store; nothing is contacted until [`ContainerdStore::run`]
    /// or the first request.
    pub fn new(
        config: ContainerdConfig,
        filter: ReferenceFilter,
        gauges: StoreGauges,
    ) -> Arc<ContainerdStore> {
        let channel = unix_channel(
            config.endpoint.socket.clone(),
            Some(Duration::from_secs(30)),
        );
        let blobs_dir = config
            .content_path
            .as_ref()
            .map(|root| root.join("blobs").join("sha256"));
        Arc::new(ContainerdStore {
            config,
            filter,
            gauges,
            channel,
            blobs_dir: RwLock::new(blobs_dir),
            catalog: watch::Sender::new(Arc::new(Catalog::default())),
            health: watch::Sender::new(StoreHealth::default()),
            root_reported: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    /// Follows containerd until `shutdown`: subscribes to its events and
    /// rebuilds the catalog on each change and every resync interval.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let events = tokio::spawn(self.clone().follow_events(shutdown.clone()));
        self.rebuild_loop(shutdown).await;
        events.abort();
    }

    fn set_connected(&self, connected: bool) {
        self.gauges.connected.set(i64::from(connected));
        self.health
            .send_if_modified(|h| std::mem::replace(&mut h.connected, connected) != connected);
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = self.config.endpoint.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", value);
        }
        request
    }

    /// Records the outcome of a call: a transport failure means containerd is
    /// gone; any answer (even "not found") means it is there.
    fn note<T>(
        &self,
        call: &'static str,
        result: Result<T, tonic::Status>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                self.set_connected(true);
                Ok(v)
            }
            Err(status) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown
                ) {
                    self.set_connected(false);
                }
                Err(StoreError::Grpc {
                    call,
                    status: Box::new(status),
                })
            }
        }
    }

    async fn follow_events(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        let filter = format!(
            r#"namespace=="{}",topic~="^/(images|content)/""#,
            self.config.endpoint.namespace
        );
        loop {
            let mut client = EventsClient::new(self.channel.clone());
            let request = tonic::Request::new(SubscribeRequest {
                filters: vec![filter.clone()],
            });
            let subscribed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = client.subscribe(request) => r,
            };
            match self.note("Events.Subscribe", subscribed) {
                Ok(response) => {
                    tracing::debug!("subscribed to containerd events");
                    backoff.reset();
                    // Whatever happened while we were not listening.
                    self.changed.notify_one();
                    let mut stream = response.into_inner();
                    loop {
                        let next = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            n = stream.next() => n,
                        };
                        match next {
                            Some(Ok(envelope)) => {
                                tracing::debug!(topic = %envelope.topic, "containerd event");
                                self.changed.notify_one();
                            }
                            Some(Err(status)) => {
                                let _ = self.note::<()>("Events.Subscribe", Err(status));
                                break;
                            }
                            None => {
                                self.set_connected(false);
                                break;
                            }
                        }
                    }
                    tracing::warn!(socket = %self.config.endpoint.socket.display(), "lost containerd's event stream; reconnecting");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot subscribe to containerd events");
                }
            }
            let delay = backoff.failed();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn rebuild_loop(&self, shutdown: CancellationToken) {
        let mut cache = DocumentCache::new();
        let mut backoff = Backoff::new(RETRY_MIN * 2, RETRY_MAX);
        let mut logged_unreachable = false;
        loop {
            let wait = match self.rebuild(&mut cache).await {
                Ok(()) => {
                    backoff.reset();
                    if logged_unreachable {
                        tracing::info!(socket = %self.config.endpoint.socket.display(), "containerd is reachable again");
                        logged_unreachable = false;
                    }
                    self.config.resync_interval
                }
                Err(e) => {
                    if !logged_unreachable {
                        tracing::warn!(error = %e, "cannot list containerd's images; retrying");
                        logged_unreachable = true;
                    }
                    backoff.failed()
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.changed.notified() => {
                    tokio::time::sleep(EVENT_DEBOUNCE).await;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn rebuild(&self, cache: &mut DocumentCache) -> Result<(), StoreError> {
        self.discover_content_root().await;
        let images = self.list_images().await?;
        let present = self.list_content().await?;
        let read = |digest: Digest| {
            let size = present.get(&digest).copied();
            async move {
                let Some(size) = size else {
                    return Ok(None);
                };
                super::read_small(
                    self,
                    &digest,
                    size,
                    peermirror_oci::manifest::MAX_MANIFEST_SIZE,
                )
                .await
            }
        };
        let catalog = catalog::build(&images, &present, &self.filter, cache, &read).await?;
        let (tags, blobs) = (catalog.tag_count(), catalog.content_count());
        self.gauges.tags.set(tags as i64);
        self.gauges.blobs.set(blobs as i64);
        let changed = self.catalog.send_if_modified(|current| {
            if **current == catalog {
                false
            } else {
                *current = Arc::new(catalog);
                true
            }
        });
        let first = self
            .health
            .send_if_modified(|h| !std::mem::replace(&mut h.synced, true));
        if first {
            tracing::info!(namespace = %self.config.endpoint.namespace, images = images.len(), tags, blobs, "catalog built");
        } else if changed {
            tracing::debug!(tags, blobs, "catalog changed");
        }
        Ok(())
    }

    /// Finds the content root through introspection unless the operator set
    /// it, and says once whether its files can be read.
    async fn discover_content_root(&self) {
        if self.blobs_dir().is_none() {
            let mut client = IntrospectionClient::new(self.channel.clone());
            let request = tonic::Request::new(PluginsRequest {
                filters: vec![CONTENT_PLUGIN_FILTER.to_string()],
            });
            let root = match self.note("Introspection.Plugins", client.plugins(request).await) {
                Ok(r) => r
                    .into_inner()
                    .plugins
                    .into_iter()
                    .find_map(|p| p.exports.get("root").cloned()),
                Err(e) => {
                    tracing::debug!(error = %e, "content root not discovered yet");
                    return;
                }
            };
            let Some(root) = root else {
                if !self.root_reported.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "containerd does not report its content root; serving blobs through gRPC Content.Read"
                    );
                }
                return;
            };
            if let Ok(mut slot) = self.blobs_dir.write() {
                *slot = Some(Path::new(&root).join("blobs").join("sha256"));
            }
        }
        if self.root_reported.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(dir) = self.blobs_dir() {
            match std::fs::read_dir(&dir) {
                Ok(_) => {
                    tracing::info!(dir = %dir.display(), "serving blobs from containerd's content files")
                }
                Err(e) => tracing::warn!(
                    dir = %dir.display(), error = %e,
                    "containerd's content files are not readable; serving blobs through gRPC Content.Read (slower)"
                ),
            }
        }
    }

    fn blobs_dir(&self) -> Option<PathBuf> {
        self.blobs_dir.read().ok().and_then(|d| d.clone())
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut client = ImagesClient::new(self.channel.clone());
        let response = client
            .list(self.request(ListImagesRequest::default()))
            .await;
        let images = self.note("Images.List", response)?.into_inner().images;
        Ok(images
            .into_iter()
            .filter_map(|image| {
                let target = descriptor(image.target?)?;
                Some(ImageRecord {
                    name: image.name,
                    target,
                })
            })
            .collect())
    }

    async fn list_content(&self) -> Result<HashMap<Digest, u64>, StoreError> {
        let mut client = ContentClient::new(self.channel.clone());
        let response = client
            .list(self.request(ListContentRequest::default()))
            .await;
        let mut stream = self.note("Content.List", response)?.into_inner();
        let mut present = HashMap::new();
        while let Some(batch) = stream.next().await {
            for info in self.note("Content.List", batch)?.info {
                if let (Ok(digest), Ok(size)) = (info.digest.parse(), u64::try_from(info.size)) {
                    present.insert(digest, size);
                }
            }
        }
        Ok(present)
    }

    /// Asks containerd whether it holds `digest` in our namespace.
    async fn info(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let mut client = ContentClient::new(self.channel.clone());
        let response = client
            .info(self.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .await;
        match response {
            Err(status) if status.code() == tonic::Code::NotFound => {
                self.set_connected(true);
                Ok(None)
            }
            other => Ok(self
                .note("Content.Info", other)?
                .into_inner()
                .info
                .and_then(|i| u64::try_from(i.size).ok())),
        }
    }

    async fn grpc_read(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobBody>, StoreError> {
        if len == 0 {
            return Ok(Some(BlobBody::Stream(Box::pin(futures::stream::empty()))));
        }
        let mut client = ContentClient::new(self.channel.clone());
        let request = self.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: offset as i64,
            size: len as i64,
        });
        let response = match client.read(request).await {
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            other => self.note("Content.Read", other)?,
        };
        let mut stream = response.into_inner();
        // The first message tells whether the content exists.
        let first = match stream.next().await {
            None => return Ok(None),
            Some(Err(status)) if status.code() == tonic::Code::NotFound => return Ok(None),
            Some(other) => self.note("Content.Read", other)?.data,
        };
        let rest = stream.map(|m| {
            m.map(|m| Bytes::from(m.data))
                .map_err(|status| StoreError::Grpc {
                    call: "Content.Read",
                    status: Box::new(status),
                })
        });
        let body = futures::stream::once(async move { Ok(Bytes::from(first)) }).chain(rest);
        Ok(Some(BlobBody::Stream(Box::pin(body))))
    }
}

fn descriptor(d: containerd_client::types::Descriptor) -> Option<Descriptor> {
    Some(Descriptor {
        media_type: d.media_type,
        digest: d.digest.parse().ok()?,
        size: u64::try_from(d.size).ok()?,
    })
}

#[async_trait::async_trait]
impl ContentStore for ContainerdStore {
    async fn resolve_tag(&self, reference: &Reference) -> Result<Option<Descriptor>, StoreError> {
        let Some(name) = reference.tagged_name() else {
            return Ok(None);
        };
        if let Some(desc) = self.catalog.borrow().tag(&name) {
            return Ok(Some(desc.clone()));
        }
        // Not in the catalog yet (an image pulled a moment ago): ask.
        let mut client = ImagesClient::new(self.channel.clone());
        match client.get(self.request(GetImageRequest { name })).await {
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            other => Ok(self
                .note("Images.Get", other)?
                .into_inner()
                .image
                .and_then(|i| i.target)
                .and_then(descriptor)),
        }
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>, StoreError> {
        let known = self.catalog.borrow().content(digest).cloned();
        // containerd is asked every time: content deleted from the namespace
        // keeps its file until the garbage collector runs, so only containerd
        // knows whether it is still ours to serve.
        match self.info(digest).await {
            Ok(size) => Ok(size.map(|size| BlobInfo {
                size,
                media_type: known.map(|e| e.media_type),
            })),
            Err(e) => {
                // containerd unreachable: answer for what the catalog last
                // listed, as long as its file is still there.
                if let (Some(entry), Some(dir)) = (known, self.blobs_dir())
                    && !self.health().connected
                    && let Ok(meta) = std::fs::metadata(dir.join(digest.hex()))
                {
                    return Ok(Some(BlobInfo {
                        size: meta.len(),
                        media_type: Some(entry.media_type),
                    }));
                }
                Err(e)
            }
        }
    }

    async fn open(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobBody>, StoreError> {
        if let Some(dir) = self.blobs_dir() {
            let path = dir.join(digest.hex());
            match std::fs::File::open(&path) {
                Ok(file) => {
                    let size = file.metadata().map_err(|source| StoreError::Io {
                        path: path.clone(),
                        source,
                    })?;
                    if size.len() < offset.saturating_add(len) {
                        return Err(StoreError::Truncated {
                            digest: *digest,
                            got: size.len(),
                            expected: offset.saturating_add(len),
                        });
                    }
                    return Ok(Some(BlobBody::File { file, path }));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::debug!(path = %path.display(), "no content file; asking containerd");
                }
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "content file not readable; using gRPC");
                }
            }
        }
        self.grpc_read(digest, offset, len).await
    }

    async fn in_flight(&self, digest: &Digest, wait: Duration) -> Option<super::ingest::InFlight> {
        // `<root>/blobs/sha256` → `<root>`.
        let root = self.blobs_dir()?.parent()?.parent()?.to_path_buf();
        let namespace = self.config.endpoint.namespace.clone();
        super::ingest::wait_for(root, namespace, *digest, wait).await
    }

    fn catalog(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog.subscribe()
    }

    fn watch_health(&self) -> watch::Receiver<StoreHealth> {
        self.health.subscribe()
    }
}
