//! The metric families the parts of the daemon record into: registry
//! requests, mirror fetches, P2P and dataplane counters, the Spegel-named
//! copies, per-peer traffic read from the dataplane at each scrape, and a
//! budget for repetitive log lines.
//!
//! Owns metric definitions only; serving them is the status port's job (in
//! the binary). Uses no other peermirror crate.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: RouteKind,
    pub method: Method,
    pub code: u16,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RouteKind {
    Base,
    Manifest,
    Blob,
    Other,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other,
}

/// Where served bytes were read from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: Source,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Source {
    /// The content-store file, sent with the serving path in use.
    File,
    /// containerd's gRPC `Content.Read` stream.
    Grpc,
    /// Bytes held in memory (manifests).
    Memory,
    /// Relayed from a peer.
    Mirror,
    /// A blob still being written by containerd, to a peer that follows it.
    InFlight,
}

/// Why a tag that peers hold was not answered from them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TagLabels {
    /// `disagreement` (hosts stated different digests) or `single_host`
    /// (fewer hosts than needed answered).
    pub reason: &'static str,
}

/// What the first-deploy fan-out's rendezvous answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FanoutAnswerLabels {
    /// `lead` (this node's containerd fetches it), `follow` (streamed from
    /// a node fetching it), `none` (no rendezvous, or it refused) or `late`
    /// (no answer within `--fanout-timeout`).
    pub answer: &'static str,
}

/// What became of a holder that sent part of a blob that did not match
/// its digest.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CorruptHolderLabels {
    /// `liar` (it sent wrong bytes: avoided for that blob) or `cleared` (an
    /// audit showed its bytes were right).
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// The registry of the request (`ns`), or `unknown`.
    pub registry: String,
    /// `blob` or `manifest`.
    pub kind: String,
    /// `hit` (a peer answered) or `miss`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DataplaneLabels {
    /// The configured mode: `required`, `optional` or `off`.
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServingPathLabels {
    /// How file bodies leave the process: `sendfile`, `io_uring`, `buffered`.
    pub path: String,
}

/// Label values are the lower-case names operators see in queries.
macro_rules! label_values {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),* }
            }
        }
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_values!(RouteKind { Base => "base", Manifest => "manifest", Blob => "blob", Other => "other" });
label_values!(Method { Get => "GET", Head => "HEAD", Other => "other" });
label_values!(Source { File => "file", Grpc => "grpc", Memory => "memory", Mirror => "mirror", InFlight => "in_flight" });

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Which other daemon's metric names are exported besides ours: `Spegel`
/// also exports Spegel's names and labels, for what the two daemons share;
/// `None` only `peermirror_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MetricsCompat {
    #[default]
    Spegel,
    None,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpegelMirrorLabels {
    pub registry: String,
    /// `hit` or `miss`.
    pub cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouterLabels {
    router: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    handler: RouteKind,
    method: Method,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    handler: RouteKind,
}

/// Spegel's metric names, kept beside ours (`--metrics-compat spegel`) so
/// that Spegel's and K3s's queries and dashboards work unchanged.
#[derive(Clone)]
struct SpegelMetrics {
    mirror_requests: Family<SpegelMirrorLabels, Counter>,
    resolve_duration: HistogramFamily<RouterLabels>,
    http_request_duration: HistogramFamily<HttpLabels>,
    http_response_size: HistogramFamily<HttpLabels>,
    http_requests_inflight: Family<HandlerLabels, Gauge>,
}

/// The default buckets of the Prometheus Go client, which Spegel uses.
fn go_default_buckets() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl SpegelMetrics {
    fn register(registry: &mut Registry) -> SpegelMetrics {
        let m = SpegelMetrics {
            mirror_requests: Family::default(),
            resolve_duration: HistogramFamily::new_with_constructor(go_default_buckets),
            http_request_duration: HistogramFamily::new_with_constructor(go_default_buckets),
            http_response_size: HistogramFamily::new_with_constructor(|| {
                Histogram::new(exponential_buckets(100.0, 10.0, 8))
            }),
            http_requests_inflight: Family::default(),
        };
        registry.register(
            "spegel_mirror_requests",
            "Total number of mirror requests (Spegel's name for peermirror_mirror_requests, without the kind)",
            m.mirror_requests.clone(),
        );
        registry.register(
            "spegel_resolve_duration_seconds",
            "The duration for router to resolve a peer (Spegel's name for peermirror_mirror_resolve_duration_seconds)",
            m.resolve_duration.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Registry-port requests by handler (base, manifest, blob, other), method and code (Spegel's HTTP metric)",
            m.http_request_duration.clone(),
        );
        registry.register(
            "http_response_size_bytes",
            "Registry-port response body sizes by handler, method and code (Spegel's HTTP metric)",
            m.http_response_size.clone(),
        );
        registry.register(
            "http_requests_inflight",
            "Registry-port requests being answered, by handler (Spegel's HTTP metric)",
            m.http_requests_inflight.clone(),
        );
        m
    }
}

/// The daemon's metrics. Cheap to clone (`Arc` inside each metric).
#[derive(Clone)]
pub struct Metrics {
    pub http_request_duration: HistogramFamily<RequestLabels>,
    pub served_bytes: Family<SourceLabels, Counter>,
    pub serving_path: Family<ServingPathLabels, Gauge>,
    pub registry_connections: Gauge,
    pub registry_connections_refused: Counter,
    pub mirror_requests: Family<MirrorLabels, Counter>,
    pub mirror_resolve_duration: Histogram,
    pub p2p_open_network: Gauge,
    pub uring_in_flight: Gauge,
    pub uring_idle_pipes: Gauge,
    pub upload_rejections: Counter,
    pub tags_not_agreed: Family<TagLabels, Counter>,
    pub corrupt_holders: Family<CorruptHolderLabels, Counter>,
    pub fanout_answers: Family<FanoutAnswerLabels, Counter>,
    pub tls_handshake_failures: Counter,
    pub dataplane_active: Family<DataplaneLabels, Gauge>,
    spegel: Option<SpegelMetrics>,
}

impl Metrics {
    /// Creates every metric, with Spegel's names too, and registers them in
    /// `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        Self::with_compat(registry, MetricsCompat::Spegel)
    }

    /// Creates every metric and registers it in `registry`, with the other
    /// names `compat` asks for.
    pub fn with_compat(registry: &mut Registry, compat: MetricsCompat) -> Metrics {
        let spegel = (compat == MetricsCompat::Spegel).then(|| SpegelMetrics::register(registry));
        let metrics = Metrics {
            http_request_duration: HistogramFamily::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 4.0, 10))
            }),
            served_bytes: Family::default(),
            serving_path: Family::default(),
            registry_connections: Gauge::default(),
            registry_connections_refused: Counter::default(),
            mirror_requests: Family::default(),
            mirror_resolve_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            p2p_open_network: Gauge::default(),
            uring_in_flight: Gauge::default(),
            uring_idle_pipes: Gauge::default(),
            upload_rejections: Counter::default(),
            tags_not_agreed: Family::default(),
            corrupt_holders: Family::default(),
            fanout_answers: Family::default(),
            tls_handshake_failures: Counter::default(),
            dataplane_active: Family::default(),
            spegel,
        };
        let r = registry.sub_registry_with_prefix("peermirror");
        r.register(
            "http_request_duration_seconds",
            "Registry requests by route, method and status code, from request head to last body byte",
            metrics.http_request_duration.clone(),
        );
        r.register(
            "served_bytes",
            "Body bytes sent to registry clients, by where they were read from",
            metrics.served_bytes.clone(),
        );
        r.register(
            "serving_path",
            "1 for the way file bodies leave the process on plain HTTP",
            metrics.serving_path.clone(),
        );
        r.register(
            "registry_connections",
            "Open connections on the registry port",
            metrics.registry_connections.clone(),
        );
        r.register(
            "registry_connections_refused",
            "Connections to the registry port answered 503 at once because --max-connections were open",
            metrics.registry_connections_refused.clone(),
        );
        r.register(
            "mirror_requests",
            "Requests the local store could not answer, by registry, kind and whether a peer answered",
            metrics.mirror_requests.clone(),
        );
        r.register(
            "mirror_resolve_duration_seconds",
            "Time from a local miss until a peer started answering",
            metrics.mirror_resolve_duration.clone(),
        );
        r.register(
            "p2p_open_network",
            "1 when the P2P network runs without a preshared key (--insecure-open-network)",
            metrics.p2p_open_network.clone(),
        );
        r.register(
            "uring_transfers_in_flight",
            "Blob bodies the io_uring serving path is sending",
            metrics.uring_in_flight.clone(),
        );
        r.register(
            "uring_idle_pipes",
            "Pipes the io_uring serving path keeps for reuse (two descriptors each)",
            metrics.uring_idle_pipes.clone(),
        );
        r.register(
            "upload_rejections",
            "Blob requests answered 503 because the upload limits were reached",
            metrics.upload_rejections.clone(),
        );
        r.register(
            "mirror_tags_not_agreed",
            "Tags that peers hold, answered as misses because too few hosts agreed on their digest",
            metrics.tags_not_agreed.clone(),
        );
        r.register(
            "mirror_corrupt_holders",
            "Holders that sent part of a blob that did not match its digest: liar (sent wrong bytes, avoided for that blob) or cleared (an audit showed their bytes right)",
            metrics.corrupt_holders.clone(),
        );
        r.register(
            "fanout_answers",
            "First-deploy fan-out asks (misses of blobs no node holds, reports of failed sources) by the rendezvous' answer: lead, follow, none, or late (no answer within --fanout-timeout)",
            metrics.fanout_answers.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes refused on the registry port (no client certificate, another CA, not TLS)",
            metrics.tls_handshake_failures.clone(),
        );
        r.register(
            "dataplane_active",
            "1 when the eBPF dataplane (per-peer counters, kernel boundary) is attached; the label says the configured mode",
            metrics.dataplane_active.clone(),
        );
        metrics
    }
}

impl Metrics {
    /// One request the local store could not answer: `hit` when a peer
    /// answered; `resolve` is the time until it did.
    pub fn count_mirror(
        &self,
        registry: String,
        kind: &str,
        hit: bool,
        resolve: Option<std::time::Duration>,
    ) {
        let cache = if hit { "hit" } else { "miss" };
        if let Some(spegel) = &self.spegel {
            spegel
                .mirror_requests
                .get_or_create(&SpegelMirrorLabels {
                    registry: registry.clone(),
                    cache: cache.to_string(),
                })
                .inc();
            if let Some(d) = resolve {
                spegel
                    .resolve_duration
                    .get_or_create(&RouterLabels { router: "libp2p" })
                    .observe(d.as_secs_f64());
            }
        }
        self.mirror_requests
            .get_or_create(&MirrorLabels {
                registry,
                kind: kind.to_string(),
                result: cache.to_string(),
            })
            .inc();
        if let Some(d) = resolve {
            self.mirror_resolve_duration.observe(d.as_secs_f64());
        }
    }

    /// A registry request begins; the guard counts it in flight until it is
    /// dropped.
    pub fn request_started(&self, route: RouteKind) -> InflightGuard {
        let gauge = self.spegel.as_ref().map(|s| {
            s.http_requests_inflight
                .get_or_create(&HandlerLabels { handler: route })
                .clone()
        });
        if let Some(g) = &gauge {
            g.inc();
        }
        InflightGuard(gauge)
    }

    /// A registry request answered: its time from head to last body byte
    /// and the body bytes it promised.
    pub fn request_done(
        &self,
        route: RouteKind,
        method: Method,
        code: u16,
        elapsed: std::time::Duration,
        body_bytes: u64,
    ) {
        let seconds = elapsed.as_secs_f64();
        self.http_request_duration
            .get_or_create(&RequestLabels {
                route,
                method,
                code,
            })
            .observe(seconds);
        if let Some(spegel) = &self.spegel {
            let labels = HttpLabels {
                handler: route,
                method,
                code,
            };
            spegel
                .http_request_duration
                .get_or_create(&labels)
                .observe(seconds);
            spegel
                .http_response_size
                .get_or_create(&labels)
                .observe(body_bytes as f64);
        }
    }

    /// Whether Spegel's names are exported.
    pub fn spegel_compat(&self) -> bool {
        self.spegel.is_some()
    }
}

/// Counts one request in flight while it lives (see [`Metrics::request_started`]).
pub struct InflightGuard(Option<Gauge>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

/// A gauge family computed at each scrape: `read` returns each series'
/// label pairs and value.
pub type GaugeReader = Box<dyn Fn() -> Vec<(Vec<(String, String)>, i64)> + Send + Sync>;

struct ComputedGauges {
    name: &'static str,
    help: &'static str,
    read: GaugeReader,
}

impl std::fmt::Debug for ComputedGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl prometheus_client::collector::Collector for ComputedGauges {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::gauge::ConstGauge;
        let series = (self.read)();
        let mut family =
            encoder.encode_descriptor(self.name, self.help, None, MetricType::Gauge)?;
        for (labels, value) in &series {
            ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// Registers a gauge family whose series `read` computes at each scrape
/// (series that `read` stops returning disappear).
pub fn register_computed_gauges(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    read: GaugeReader,
) {
    registry.register_collector(Box::new(ComputedGauges { name, help, read }));
}

/// A budget for log lines that may come in floods: at most `burst` lines,
/// refilled at `per_second` (a `governor` rate limiter); what was held back
/// is counted and reported by the next line that passes.
pub struct LogBudget {
    limiter: governor::DefaultDirectRateLimiter,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogBudget {
    pub fn new(burst: u32, per_second: u32) -> LogBudget {
        let at_least_one =
            |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        let quota =
            governor::Quota::per_second(at_least_one(per_second)).allow_burst(at_least_one(burst));
        LogBudget {
            limiter: governor::RateLimiter::direct(quota),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be
    /// written now; `None` when it must be dropped.
    pub fn take(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        match self.limiter.check() {
            Ok(()) => Some(self.suppressed.swap(0, Relaxed)),
            Err(_) => {
                self.suppressed.fetch_add(1, Relaxed);
                None
            }
        }
    }
}

/// One per-address traffic counter, as the per-peer collector exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTraffic {
    pub addr: std::net::IpAddr,
    /// The peer id admitted on this address, if any.
    pub peer_id: Option<String>,
    /// `true`: from the remote address to this node.
    pub inbound: bool,
    /// `true`: registry port; `false`: P2P port.
    pub registry: bool,
    pub bytes: u64,
    pub packets: u64,
}

/// Packets dropped at the kernel boundary, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BoundaryDrops {
    pub registry_not_admitted: u64,
    pub p2p_not_allowed: u64,
    pub unparseable: u64,
}

/// Where per-peer traffic figures come from (read at each scrape, so that
/// the series of forgotten addresses disappear).
pub trait TrafficSource: Send + Sync + 'static {
    fn traffic(&self) -> (Vec<PeerTraffic>, BoundaryDrops);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    peer_id: String,
    direction: String,
    port: String,
}

/// Encodes `peer_bytes`, `peer_packets` and `dataplane_dropped_packets` from
/// a [`TrafficSource`] at each scrape.
struct PeerCollector(Arc<dyn TrafficSource>);

impl std::fmt::Debug for PeerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCollector")
    }
}

impl prometheus_client::collector::Collector for PeerCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        let (counters, drops) = self.0.traffic();
        let label = |c: &PeerTraffic| PeerLabels {
            peer: c.addr.to_string(),
            peer_id: c.peer_id.clone().unwrap_or_default(),
            direction: if c.inbound { "in" } else { "out" }.to_string(),
            port: if c.registry { "registry" } else { "p2p" }.to_string(),
        };
        let mut bytes = encoder.encode_descriptor(
            "peer_bytes",
            "Bytes exchanged with each remote address on the registry and P2P ports, counted in the kernel (eBPF), by direction",
            None,
            MetricType::Counter,
        )?;
        for c in &counters {
            ConstCounter::new(c.bytes).encode(bytes.encode_family(&label(c))?)?;
        }
        let mut packets = encoder.encode_descriptor(
            "peer_packets",
            "Packets exchanged with each remote address, as the kernel's skbs: a segmentation-offload batch counts once",
            None,
            MetricType::Counter,
        )?;
        for c in &counters {
            ConstCounter::new(c.packets).encode(packets.encode_family(&label(c))?)?;
        }
        let mut dropped = encoder.encode_descriptor(
            "dataplane_dropped_packets",
            "Packets (skbs) dropped in the kernel at the boundary, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("registry_not_admitted", drops.registry_not_admitted),
            ("p2p_not_allowed", drops.p2p_not_allowed),
            ("unparseable", drops.unparseable),
        ] {
            ConstCounter::new(n).encode(dropped.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }
}

/// Exports per-peer traffic from `source` under the `peermirror_` prefix.
pub fn register_traffic(registry: &mut Registry, source: Arc<dyn TrafficSource>) {
    registry
        .sub_registry_with_prefix("peermirror")
        .register_collector(Box::new(PeerCollector(source)));
}

/// The OpenMetrics text of `registry`.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OnePeer;

    impl TrafficSource for OnePeer {
        fn traffic(&self) -> (Vec<PeerTraffic>, BoundaryDrops) {
            (
                vec![PeerTraffic {
                    addr: "10.0.0.2".parse().expect("ip"),
                    peer_id: Some("12D3Koo".into()),
                    inbound: false,
                    registry: true,
                    bytes: 1234,
                    packets: 3,
                }],
                BoundaryDrops {
                    registry_not_admitted: 7,
                    ..BoundaryDrops::default()
                },
            )
        }
    }

    #[test]
    fn per_peer_traffic_is_read_at_each_scrape() {
        let mut registry = Registry::default();
        register_traffic(&mut registry, Arc::new(OnePeer));
        let text = encode(&registry).expect("encode");
        assert!(
            text.contains(
                r#"peermirror_peer_bytes_total{peer="10.0.0.2",peer_id="12D3Koo",direction="out",port="registry"} 1234"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"peermirror_dataplane_dropped_packets_total{reason="registry_not_admitted"} 7"#
        ));
        assert!(text.contains("# HELP peermirror_peer_packets"));
    }

    #[test]
    fn spegel_names_count_what_ours_count_unless_switched_off() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let ms = std::time::Duration::from_millis(3);
        metrics.count_mirror("docker.io".into(), "blob", true, Some(ms));
        metrics.count_mirror("docker.io".into(), "manifest", true, Some(ms));
        metrics.count_mirror("docker.io".into(), "blob", false, None);
        {
            let _inflight = metrics.request_started(RouteKind::Blob);
            let text = encode(&registry).expect("encode");
            assert!(
                text.contains(r#"http_requests_inflight{handler="blob"} 1"#),
                "{text}"
            );
        }
        metrics.request_done(RouteKind::Blob, Method::Get, 200, ms, 1234);
        let text = encode(&registry).expect("encode");
        for line in [
            r#"spegel_mirror_requests_total{registry="docker.io",cache="hit"} 2"#,
            r#"spegel_mirror_requests_total{registry="docker.io",cache="miss"} 1"#,
            r#"spegel_resolve_duration_seconds_count{router="libp2p"} 2"#,
            r#"http_request_duration_seconds_count{handler="blob",method="GET",code="200"} 1"#,
            r#"http_response_size_bytes_sum{handler="blob",method="GET",code="200"} 1234.0"#,
            r#"http_requests_inflight{handler="blob"} 0"#,
            r#"peermirror_mirror_resolve_duration_seconds_count 2"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let mut plain = Registry::default();
        let only_ours = Metrics::with_compat(&mut plain, MetricsCompat::None);
        only_ours.count_mirror("docker.io".into(), "blob", true, Some(ms));
        only_ours.request_done(RouteKind::Blob, Method::Get, 200, ms, 1);
        let text = encode(&plain).expect("encode");
        assert!(
            !text.contains("spegel_") && !text.contains("\nhttp_"),
            "{text}"
        );
        assert!(text.contains("peermirror_mirror_requests_total"));
    }

    #[test]
    fn a_log_flood_passes_its_burst_then_reports_what_it_held_back() {
        let budget = LogBudget::new(3, 1);
        for _ in 0..3 {
            assert_eq!(budget.take(), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(budget.take(), None);
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(
            budget.take(),
            Some(5),
            "the next line says how many were held back"
        );
    }
}
