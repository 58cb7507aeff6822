//! The plain-text debug page: this node, its readiness, its peers and what
//! it serves.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::NodeStatus;
use peermirror_routing::Router;

/// Tags listed on the page; the rest are counted.
const MAX_TAGS: usize = 200;

pub(super) async fn render(status: &NodeStatus) -> String {
    let mut out = String::new();
    let facts = &status.facts;
    let health = status.store.health();
    let catalog = status.store.catalog().borrow().clone();
    let routing = status.router.status();
    let _ = writeln!(out, "peermirror {}", crate::VERSION);
    let _ = writeln!(out, "peer id:       {}", status.router.peer_id());
    let _ = writeln!(out, "registry:      {}", facts.registry_addr);
    let _ = writeln!(out, "serving path:  {}", facts.serving_path);
    let _ = writeln!(
        out,
        "dataplane:     {} ({})",
        facts.dataplane_mode.as_str(),
        if facts.dataplane_attached {
            "attached"
        } else {
            "not attached"
        }
    );
    let _ = writeln!(
        out,
        "containerd:    {} namespace {} ({})",
        facts.containerd_socket.display(),
        facts.namespace,
        if health.connected {
            "connected"
        } else {
            "not connected"
        }
    );
    let _ = writeln!(out, "readiness:     {:?}", status.readiness().waiting_for);
    let listening: Vec<String> = routing.listen_addrs.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(out, "p2p listening: {listening:?}");
    let _ = writeln!(
        out,
        "routing:       {} peers in the table, {} keys advertised ({:?})",
        routing.routing_table_peers, routing.advertised_keys, routing.first_round
    );
    let peers = status.router.peers().await.unwrap_or_default();
    let admitted = status
        .admission
        .as_ref()
        .map(|a| a.admitted())
        .unwrap_or_default();
    let _ = writeln!(out, "connected peers: {}", peers.len());
    for p in &peers {
        let ips: Vec<String> = p.connection_ips.iter().map(IpAddr::to_string).collect();
        let mut line = format!("  {} {}", p.id, ips.join(" "));
        if let Some(set) = admitted.get(&p.id) {
            let set: Vec<String> = set.iter().map(IpAddr::to_string).collect();
            let _ = write!(line, " (admitted: {})", set.join(" "));
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "catalog:       {} tags, {} blobs",
        catalog.tag_count(),
        catalog.content_count()
    );
    let mut tags: Vec<_> = catalog
        .tags()
        .map(|(n, d)| format!("{n} -> {}", d.digest))
        .collect();
    tags.sort();
    for line in tags.iter().take(MAX_TAGS) {
        let _ = writeln!(out, "  {line}");
    }
    if tags.len() > MAX_TAGS {
        let _ = writeln!(out, "  … and {} more", tags.len() - MAX_TAGS);
    }
    out
}
