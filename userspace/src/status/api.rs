//! The JSON behind `/debug/web`, at `/debug/api/<what>` (documented in the
//! README): `node`, `peers`, `catalog`, `requests` and `measure?image=REF`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::NodeStatus;
use super::server::DebugResponse;
use peermirror_metrics::TrafficSource;
use peermirror_mirror::journal::Record;
use peermirror_routing::{FirstRound, Router};

/// Tags listed in the catalog answer; the rest are counted.
const MAX_TAGS: usize = 500;

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn json_answer(code: u16, value: &Value) -> DebugResponse {
    DebugResponse {
        code,
        content_type: "application/json",
        body: value.to_string(),
    }
}

/// The answer at `/debug/api/<what>`; `None`: no such endpoint.
pub(super) async fn answer(
    status: &NodeStatus,
    what: &str,
    query: Option<&str>,
) -> Option<DebugResponse> {
    let value = match what {
        "node" => node(status),
        "peers" => peers(status).await,
        "catalog" => catalog(status),
        "requests" => requests(status),
        "measure" => return Some(measure(status, query).await),
        _ => return None,
    };
    Some(json_answer(200, &value))
}

fn node(status: &NodeStatus) -> Value {
    let facts = &status.facts;
    let health = status.store.health();
    let routing = status.router.status();
    let readiness = status.readiness();
    let first_round = match routing.first_round {
        FirstRound::Waiting => json!({"state": "waiting"}),
        FirstRound::Announcing { stored, total } => {
            json!({"state": "announcing", "stored": stored, "total": total})
        }
        FirstRound::Stored => json!({"state": "stored"}),
    };
    json!({
        "version": crate::VERSION,
        "peer_id": status.router.peer_id().to_string(),
        "p2p_listen_addrs": routing.listen_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "registry_addr": facts.registry_addr.to_string(),
        "serving_path": facts.serving_path.to_string(),
        "dataplane": {
            "mode": facts.dataplane_mode.as_str(),
            "attached": facts.dataplane_attached,
        },
        "containerd": {
            "socket": facts.containerd_socket.display().to_string(),
            "namespace": facts.namespace,
            "connected": health.connected,
        },
        "ready": readiness.is_ready(),
        "waiting_for": readiness.waiting_for,
        "routing": {
            "routing_table_peers": routing.routing_table_peers,
            "connected_peers": routing.connected_peers,
            "advertised_keys": routing.advertised_keys,
            "pending_keys": routing.pending_keys,
            "first_round": first_round,
        },
    })
}

/// Kernel byte counts of one address, per port and direction.
#[derive(Default, Clone, Copy)]
struct Traffic {
    registry_in: u64,
    registry_out: u64,
    p2p_in: u64,
    p2p_out: u64,
}

impl Traffic {
    fn add(&mut self, other: &Traffic) {
        self.registry_in += other.registry_in;
        self.registry_out += other.registry_out;
        self.p2p_in += other.p2p_in;
        self.p2p_out += other.p2p_out;
    }

    fn to_json(self) -> Value {
        json!({
            "bytes_in": self.registry_in + self.p2p_in,
            "bytes_out": self.registry_out + self.p2p_out,
            "registry_in": self.registry_in,
            "registry_out": self.registry_out,
            "p2p_in": self.p2p_in,
            "p2p_out": self.p2p_out,
        })
    }
}

async fn peers(status: &NodeStatus) -> Value {
    let peers = status.router.peers().await.unwrap_or_default();
    let admitted = status
        .admission
        .as_ref()
        .map(|a| a.admitted())
        .unwrap_or_default();
    // Per address, from the eBPF counters (only with the dataplane).
    let mut by_addr: HashMap<IpAddr, Traffic> = HashMap::new();
    if let Some(admission) = &status.admission {
        let (counters, _) = admission.traffic();
        for c in counters {
            let t = by_addr.entry(c.addr.to_canonical()).or_default();
            match (c.registry, c.inbound) {
                (true, true) => t.registry_in += c.bytes,
                (true, false) => t.registry_out += c.bytes,
                (false, true) => t.p2p_in += c.bytes,
                (false, false) => t.p2p_out += c.bytes,
            }
        }
    }
    let mut listed: Vec<IpAddr> = Vec::new();
    let mut out = Vec::new();
    for p in &peers {
        let admitted_addrs: Vec<IpAddr> = admitted
            .get(&p.id)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut addrs: Vec<IpAddr> = p
            .connection_ips
            .iter()
            .chain(admitted_addrs.iter())
            .map(|a| a.to_canonical())
            .collect();
        addrs.sort();
        addrs.dedup();
        let mut traffic = Traffic::default();
        for a in &addrs {
            if let Some(t) = by_addr.get(a) {
                traffic.add(t);
            }
        }
        listed.extend(&addrs);
        out.push(json!({
            "id": p.id.to_string(),
            "addresses": addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
            "endpoint": p.endpoint.map(|e| e.to_string()),
            "connected_since_unix_ms": unix_ms(p.connected_since),
            "admitted": !admitted_addrs.is_empty(),
            "admitted_addresses": admitted_addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
            "traffic": status.admission.is_some().then(|| traffic.to_json()),
        }));
    }
    // Addresses the kernel counted that are no connected peer (strangers,
    // peers that left): shown apart, never as peers.
    let mut others: Vec<(IpAddr, Traffic)> = by_addr
        .into_iter()
        .filter(|(a, _)| !listed.contains(a))
        .collect();
    others.sort_by_key(|(a, _)| *a);
    let own = peermirror_net::interface_addresses();
    json!({
        "sampled_at_unix_ms": unix_ms(SystemTime::now()),
        "counted_by_kernel": status.admission.is_some(),
        "peers": out,
        "other_addresses": others.iter().map(|(a, t)| json!({
            "address": a.to_string(),
            // This node's own clients (containerd on loopback, say).
            "local": a.is_loopback() || own.contains(a),
            "traffic": t.to_json(),
        })).collect::<Vec<_>>(),
    })
}

fn catalog(status: &NodeStatus) -> Value {
    let catalog = status.store.catalog().borrow().clone();
    let mut tags: Vec<Value> = Vec::new();
    let mut names: Vec<(&String, &peermirror_oci::Descriptor)> = catalog.tags().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (name, root) in names.iter().take(MAX_TAGS) {
        tags.push(json!({
            "name": name,
            "digest": root.digest.to_string(),
            "media_type": root.media_type,
            "size": catalog.image_size(&root.digest),
        }));
    }
    json!({
        "tags": tags,
        "tag_count": catalog.tag_count(),
        "blob_count": catalog.content_count(),
        "blob_bytes": catalog.content_bytes(),
    })
}

/// The `q` quantile of sorted `values`.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied()
}

fn requests(status: &NodeStatus) -> Value {
    let journal = status.mirror.journal();
    let recent: Vec<Record> = journal.recent();
    let totals = journal.totals();
    let mut resolve: Vec<f64> = recent.iter().filter_map(|r| r.resolve_ms).collect();
    resolve.sort_by(f64::total_cmp);
    let answered = totals.hits + totals.misses + totals.failed;
    json!({
        "totals": totals,
        "hit_ratio": (answered > 0).then(|| totals.hits as f64 / answered as f64),
        "resolve_ms": {
            "samples": resolve.len(),
            "p50": quantile(&resolve, 0.5),
            "p99": quantile(&resolve, 0.99),
        },
        "recent": recent,
    })
}

async fn measure(status: &NodeStatus, query: Option<&str>) -> DebugResponse {
    let image = query
        .into_iter()
        .flat_map(|q| form_urlencoded::parse(q.as_bytes()))
        .find(|(k, _)| k == "image")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if image.trim().is_empty() {
        return json_answer(
            400,
            &json!({"error": "give the image as ?image=<reference>"}),
        );
    }
    // One measure at a time: it pulls a whole image from peers.
    let Ok(_slot) = status.measuring.try_acquire() else {
        return json_answer(
            429,
            &json!({"error": "a measure is running; try again when it is done"}),
        );
    };
    match peermirror_mirror::measure::measure(&status.mirror, &image).await {
        Ok(report) => json_answer(200, &json!(report)),
        Err(e) => json_answer(
            if matches!(
                e,
                peermirror_mirror::measure::MeasureError::Reference(_)
                    | peermirror_mirror::measure::MeasureError::Unqualified(_)
            ) {
                400
            } else {
                404
            },
            &json!({"error": e.to_string()}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_of_sorted_samples() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(51.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
    }
}
