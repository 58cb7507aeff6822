//! The status port: `/metrics`, `/healthz`, `/readyz` and the debug page,
//! served from a [`Status`] and the metric registry.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use peermirror_metrics::encode;
use peermirror_net::acceptor::{Acceptor, AcceptorConfig, HttpDeadlines, serve_http1};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The daemon's readiness, computed on each `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Why the daemon is not ready; empty when it is.
    pub waiting_for: Vec<String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.waiting_for.is_empty()
    }
}

/// What the status server needs from the daemon.
#[async_trait::async_trait]
pub trait Status: Send + Sync + 'static {
    /// `/readyz`: whether the daemon does its job now.
    fn readiness(&self) -> Readiness;
    /// `/healthz`: `Err` with the reason once the daemon is failing (a task
    /// it cannot do without has stopped); it then exits and is restarted.
    fn health(&self) -> Result<(), String>;
    /// The debug endpoint at `path` (see [`is_debug_path`]) with the
    /// request's query string; `None` when there is none at `path`.
    async fn debug(&self, path: &str, query: Option<&str>) -> Option<DebugResponse>;
    /// Whether `client` may see the debug endpoints (they show image names,
    /// digests and peer addresses).
    async fn debug_allowed(&self, client: std::net::IpAddr) -> bool;
}

/// A debug endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugResponse {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl DebugResponse {
    pub fn ok(content_type: &'static str, body: String) -> DebugResponse {
        DebugResponse {
            code: 200,
            content_type,
            body,
        }
    }
}

/// Connections the status port serves at once from other hosts; beyond, a
/// connection is closed at once.
pub const MAX_STATUS_CONNECTIONS: usize = 64;
/// Of those, from one host (a scraper, say) at most.
pub const MAX_STATUS_CONNECTIONS_PER_SOURCE: usize = 16;
/// Connections only the node itself may use (the kubelet's probes, which
/// come from loopback or the node's own address).
pub const STATUS_RESERVED_FOR_LOCAL: usize = 16;
/// A status connection that sends nothing for this long is closed; a
/// client that reads nothing of its response for `request` is disconnected.
pub const STATUS_DEADLINES: HttpDeadlines = HttpDeadlines {
    idle: std::time::Duration::from_secs(30),
    request: std::time::Duration::from_secs(10),
};

/// Serves `/metrics`, `/healthz`, `/readyz` and `/debug` until `shutdown`,
/// within the caps and deadlines above.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    status: Arc<dyn Status>,
    shutdown: CancellationToken,
) {
    let acceptor = Acceptor::new(AcceptorConfig::new(
        "status port",
        MAX_STATUS_CONNECTIONS,
        MAX_STATUS_CONNECTIONS_PER_SOURCE,
        STATUS_RESERVED_FOR_LOCAL,
    ));
    let stop = shutdown.clone();
    let handle = move |stream, peer: SocketAddr| {
        let (registry, status, shutdown) = (registry.clone(), status.clone(), stop.clone());
        async move {
            let client = peer.ip().to_canonical();
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                let status = status.clone();
                async move {
                    Ok::<_, Infallible>(respond(&req, client, &registry, status.as_ref()).await)
                }
            });
            serve_http1(stream, service, STATUS_DEADLINES, &shutdown).await;
        }
    };
    acceptor.run(listener, shutdown, handle).await;
}

fn text(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// The Prometheus text format (version 0.0.4) of the OpenMetrics text `om`,
/// for clients that do not ask for OpenMetrics (curl, `promtool check
/// metrics`, scrapers of old): a counter family is named with its `_total`
/// suffix, `# UNIT` and `# EOF` are left out, `info` becomes a gauge named
/// `_info` and `unknown` becomes `untyped`.
pub fn to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // HELP comes before TYPE; it is written once the TYPE says the name.
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            let named = format!("{name}{suffix}");
            match help.take() {
                Some((n, text)) if n == name => {
                    // OpenMetrics also escapes quotes; the older format does not.
                    out.push_str(&format!("# HELP {named} {}\n", text.replace("\\\"", "\"")));
                }
                Some((n, text)) => out.push_str(&format!("# HELP {n} {text}\n")),
                None => {}
            }
            out.push_str(&format!("# TYPE {named} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some((name, text)) = help.take() {
            out.push_str(&format!("# HELP {name} {text}\n"));
        }
        // Exemplars exist only in OpenMetrics.
        let sample = line.split_once(" # {").map_or(line, |(s, _)| s);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Whether `path` is one of the debug endpoints (one access policy for all).
pub fn is_debug_path(path: &str) -> bool {
    path == "/" || path == "/debug" || path.starts_with("/debug/")
}

/// Whether the client asked for OpenMetrics (Prometheus does by default).
fn accepts_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn respond<B>(
    req: &Request<B>,
    client: std::net::IpAddr,
    registry: &Registry,
    status: &dyn Status,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or HEAD only\n".into(),
        );
    }
    let path = req.uri().path();
    if is_debug_path(path) && !status.debug_allowed(client).await {
        return text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "forbidden: the debug pages show image names and peer addresses; they answer this node, \
             its peers and --debug-allowed-cidrs\n"
                .into(),
        );
    }
    match path {
        "/metrics" => match encode(registry) {
            Ok(out) if accepts_openmetrics(req) => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                out,
            ),
            Ok(out) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                to_prometheus_text(&out),
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "encoding failed\n".into(),
            ),
        },
        "/healthz" => match status.health() {
            Ok(()) => text(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("failing: {reason}\n"),
            ),
        },
        "/readyz" => {
            let readiness = status.readiness();
            if readiness.is_ready() {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                let mut body = String::from("not ready, waiting for:\n");
                for reason in &readiness.waiting_for {
                    body.push_str("- ");
                    body.push_str(reason);
                    body.push('\n');
                }
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body)
            }
        }
        _ if is_debug_path(path) => match status.debug(path, req.uri().query()).await {
            Some(answer) => {
                let mut response = text(
                    StatusCode::from_u16(answer.code).unwrap_or(StatusCode::OK),
                    answer.content_type,
                    answer.body,
                );
                // The page and its data are for this moment only.
                response.headers_mut().insert(
                    hyper::header::CACHE_CONTROL,
                    hyper::header::HeaderValue::from_static("no-store"),
                );
                response
            }
            None => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermirror_metrics::Metrics;

    struct Fixed {
        waiting: Vec<String>,
        failing: Option<String>,
    }

    #[async_trait::async_trait]
    impl Status for Fixed {
        fn readiness(&self) -> Readiness {
            Readiness {
                waiting_for: self.waiting.clone(),
            }
        }
        fn health(&self) -> Result<(), String> {
            self.failing.clone().map_or(Ok(()), Err)
        }
        async fn debug(&self, path: &str, _query: Option<&str>) -> Option<DebugResponse> {
            (path == "/debug").then(|| DebugResponse::ok("text/plain", "page\n".into()))
        }
        async fn debug_allowed(&self, client: std::net::IpAddr) -> bool {
            client.is_loopback()
        }
    }

    async fn get(status: &Fixed, registry: &Registry, method: &str, path: &str) -> (u16, String) {
        get_from(status, registry, method, path, "127.0.0.1").await
    }

    async fn get_from(
        status: &Fixed,
        registry: &Registry,
        method: &str,
        path: &str,
        client: &str,
    ) -> (u16, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        let r = respond(&req, client.parse().expect("ip"), registry, status).await;
        let code = r.status().as_u16();
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .expect("body")
            .to_bytes();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn endpoints_answer_from_the_status() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.upload_rejections.inc();
        let ok = Fixed {
            waiting: vec![],
            failing: None,
        };
        assert_eq!(
            get(&ok, &registry, "GET", "/healthz").await,
            (200, "ok\n".into())
        );
        assert_eq!(
            get(&ok, &registry, "GET", "/readyz").await,
            (200, "ready\n".into())
        );
        assert_eq!(
            get(&ok, &registry, "GET", "/debug").await,
            (200, "page\n".into())
        );
        assert_eq!(get(&ok, &registry, "POST", "/metrics").await.0, 405);
        assert_eq!(get(&ok, &registry, "GET", "/nope").await.0, 404);
        let (code, body) = get(&ok, &registry, "GET", "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("peermirror_upload_rejections_total 1"),
            "{body}"
        );
        assert!(
            !body.contains("# EOF"),
            "the older format without an Accept"
        );
        let bad = Fixed {
            waiting: vec!["containerd".into()],
            failing: Some("task sync stopped".into()),
        };
        assert_eq!(
            get(&bad, &registry, "GET", "/readyz").await,
            (503, "not ready, waiting for:\n- containerd\n".into())
        );
        assert_eq!(
            get(&bad, &registry, "GET", "/healthz").await,
            (503, "failing: task sync stopped\n".into())
        );
        // The debug pages follow the access policy; the rest does not.
        for path in ["/", "/debug", "/debug/web", "/debug/api/peers"] {
            let (code, _) = get_from(&ok, &registry, "GET", path, "10.9.9.9").await;
            assert_eq!(code, 403, "{path}");
        }
        assert_eq!(
            get_from(&ok, &registry, "GET", "/metrics", "10.9.9.9")
                .await
                .0,
            200
        );
        assert_eq!(
            get_from(&ok, &registry, "GET", "/readyz", "10.9.9.9")
                .await
                .0,
            200
        );
    }

    #[test]
    fn the_older_text_format_names_counters_with_their_suffix() {
        let om = "# HELP a_requests Requests \\\"quoted\\\".\n# TYPE a_requests counter\n\
                  a_requests_total{x=\"1\"} 3 # {trace=\"t\"} 1\n\
                  # HELP b Bytes.\n# TYPE b gauge\n# UNIT b bytes\nb 7\n\
                  # HELP c Build.\n# TYPE c info\nc_info{v=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_requests_total Requests \"quoted\".\n# TYPE a_requests_total counter\n\
             a_requests_total{x=\"1\"} 3\n\
             # HELP b Bytes.\n# TYPE b gauge\nb 7\n\
             # HELP c_info Build.\n# TYPE c_info gauge\nc_info{v=\"1\"} 1\n"
        );
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_only_when_asked_for() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.upload_rejections.inc();
        metrics.count_mirror("docker.io".into(), "blob", true, None);
        let ok = Fixed {
            waiting: vec![],
            failing: None,
        };
        let req = |accept: Option<&str>| {
            let mut b = Request::builder().uri("/metrics");
            if let Some(a) = accept {
                b = b.header("accept", a);
            }
            b.body(()).expect("request")
        };
        let ip = "127.0.0.1".parse().expect("ip");
        let om = respond(
            &req(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            )),
            ip,
            &registry,
            &ok,
        )
        .await;
        assert!(
            om.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .starts_with("application/openmetrics-text")
        );
        let om_body = http_body_util::BodyExt::collect(om.into_body())
            .await
            .expect("body")
            .to_bytes();
        assert!(om_body.ends_with(b"# EOF\n"), "OpenMetrics ends with # EOF");
        let plain = respond(&req(None), ip, &registry, &ok).await;
        assert!(
            plain.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .starts_with("text/plain; version=0.0.4")
        );
        let body = http_body_util::BodyExt::collect(plain.into_body())
            .await
            .expect("body")
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("# HELP peermirror_upload_rejections_total "),
            "{body}"
        );
        assert!(
            body.contains("# TYPE spegel_mirror_requests_total counter"),
            "{body}"
        );
        assert!(!body.contains("# EOF"));
    }
}
