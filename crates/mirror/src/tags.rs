//! Tags answered through peers: only what two hosts agree on.
//!
//! A digest checks itself; a tag does not. The manifest a peer sends for a
//! tag can only be checked against the digest that peer states, so one keyed
//! peer that tags its own image with another image's name would otherwise
//! decide what that name means on every node that asks it. The rule:
//!
//! - **agreement** (the default): the answer is a manifest that two hosts
//!   (an IPv4 address or an IPv6 /64 of their P2P connections, which proved
//!   the preshared key) state with the same digest, while no host that
//!   answered states another. Anything else is a miss, and containerd asks
//!   the registry.
//! - **single holder**: the first verified answer (air-gapped clusters, where
//!   an image imported on one node is pullable by tag from every node).
//! - **off**: tags are left to the registry (the registry crate answers the
//!   local containerd's tag requests with a miss).
//!
//! The first holder is awaited for the blob resolve timeout, as a digest's,
//! so that a tag no node holds costs what it did; from there, up to the tag
//! timeout for the answers that settle it. A lookup that ends (the DHT knows
//! no further holder) settles it at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http_body_util::{BodyExt, Limited};
use hyper::Method;
use peermirror_net::acceptor::SourceKey;
use peermirror_oci::manifest::{self, MAX_MANIFEST_SIZE};
use peermirror_oci::{Descriptor, Digest};
use peermirror_routing::Peer;

use crate::{
    Answer, MANIFEST_ACCEPT, Mirror, MirrorMiss, MirroredManifest, client, journal, manifest_head,
};

/// How tags are answered through peers (`--tag-resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TagResolution {
    /// Two hosts state the same digest and none states another.
    #[default]
    Agreement,
    /// The first verified answer: for air-gapped clusters, where an image
    /// imported on one node is to be pullable by tag everywhere.
    SingleHolder,
    /// Tags are resolved at the registry; digests still come from peers.
    Off,
}

impl TagResolution {
    /// Distinct hosts that must state a digest before it is answered.
    fn hosts_needed(self) -> usize {
        match self {
            TagResolution::Agreement => 2,
            TagResolution::SingleHolder => 1,
            TagResolution::Off => usize::MAX,
        }
    }
}

/// What the hosts that answered a tag said.
#[derive(Default)]
struct Votes {
    /// The digest each host stated, in the order they answered.
    by_host: Vec<(SourceKey, Digest)>,
    /// One verified manifest per digest, with the peer that sent it first.
    manifests: HashMap<Digest, (Peer, Descriptor, Bytes)>,
    /// Every peer that answered.
    peers: Vec<Peer>,
}

impl Votes {
    fn add(&mut self, host: SourceKey, peer: Peer, descriptor: Descriptor, bytes: Bytes) {
        self.by_host.push((host, descriptor.digest));
        self.peers.push(peer.clone());
        self.manifests
            .entry(descriptor.digest)
            .or_insert((peer, descriptor, bytes));
    }

    fn digests(&self) -> usize {
        self.manifests.len()
    }

    /// The digest enough hosts state, when no host states another.
    fn settled(&self, needed: usize) -> Option<Digest> {
        let (_, first) = self.by_host.first()?;
        (self.digests() == 1 && self.by_host.len() >= needed).then_some(*first)
    }
}

/// Most manifest requests of one tag lookup in flight at once.
const IN_FLIGHT: usize = 4;

impl Mirror {
    /// A tag's manifest as the peers agree on it (see the module doc).
    pub(crate) async fn manifest_by_tag(
        self: &Arc<Self>,
        key: String,
        path: String,
        started: Instant,
    ) -> Result<MirroredManifest, MirrorMiss> {
        let needed = self.config.tag_resolution.hosts_needed();
        if self.config.tag_resolution == TagResolution::Off {
            return Err(MirrorMiss::NoProvider);
        }
        let mut candidates = self.candidates(&key, None);
        let Some(first) = candidates.next(self.config.resolve_timeout).await else {
            return Err(MirrorMiss::NoProvider);
        };
        let resolve_time = started.elapsed();
        let deadline = tokio::time::Instant::now() + self.config.tag_timeout;
        let fetch = |peer: Peer| {
            let me = self.clone();
            let path = path.clone();
            async move {
                let host = SourceKey::of(peer.addr.ip());
                let answer = tokio::time::timeout_at(deadline, me.fetch_tagged(&peer, &path))
                    .await
                    .unwrap_or(None);
                (host, peer, answer)
            }
        };
        // Hosts asked or answered: a second peer on one host adds no vote,
        // and waits until that host's attempt fails.
        let mut hosts: HashSet<SourceKey> = HashSet::from([SourceKey::of(first.addr.ip())]);
        let mut waiting: HashMap<SourceKey, Vec<Peer>> = HashMap::new();
        let mut in_flight = FuturesUnordered::new();
        in_flight.push(fetch(first));
        let mut tried = 1;
        let mut votes = Votes::default();
        let budget = self.config.max_attempts + needed;
        loop {
            if votes.digests() > 1 {
                break;
            }
            if let Some(digest) = votes.settled(needed) {
                let (peer, descriptor, bytes) = votes.manifests.remove(&digest).expect("voted");
                self.record_manifest_hit(key, &votes.peers, &bytes, resolve_time, started);
                return Ok(MirroredManifest {
                    peer,
                    descriptor,
                    bytes,
                    resolve_time,
                });
            }
            let room = in_flight.len() < IN_FLIGHT && tried < budget && !candidates.is_over();
            if in_flight.is_empty() && !room {
                break;
            }
            tokio::select! {
                Some((host, peer, answer)) = in_flight.next() => match answer {
                    Some((descriptor, bytes)) => {
                        waiting.remove(&host);
                        votes.add(host, peer, descriptor, bytes);
                    }
                    // Another peer on that host may still answer.
                    None => match waiting.get_mut(&host).and_then(Vec::pop) {
                        Some(next) if tried < budget => {
                            in_flight.push(fetch(next));
                            tried += 1;
                        }
                        _ => { hosts.remove(&host); }
                    },
                },
                next = candidates.next(deadline.saturating_duration_since(tokio::time::Instant::now())), if room => {
                    if let Some(peer) = next {
                        let host = SourceKey::of(peer.addr.ip());
                        if hosts.insert(host) {
                            in_flight.push(fetch(peer));
                            tried += 1;
                        } else if !votes.by_host.iter().any(|(h, _)| *h == host) {
                            let queue = waiting.entry(host).or_default();
                            if queue.len() < IN_FLIGHT {
                                queue.insert(0, peer);
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let hosts = votes.by_host.len();
        if hosts == 0 {
            return Err(MirrorMiss::AllFailed { tried });
        }
        let digests: Vec<String> = votes.manifests.keys().map(Digest::to_string).collect();
        if votes.digests() > 1 {
            tracing::warn!(%key, ?digests, peers = ?votes.peers.iter().map(|p| p.addr).collect::<Vec<_>>(), "peers disagree on what a tag names; the client asks its next endpoint");
        }
        self.journal.record(journal::Entry {
            kind: "manifest",
            key,
            outcome: journal::Outcome::NotAgreed,
            peers: &votes.peers,
            bytes: 0,
            resolve: Some(resolve_time),
            duration: started.elapsed(),
            verified: None,
        });
        Err(MirrorMiss::TagNotAgreed {
            hosts,
            digests: votes.digests(),
        })
    }

    /// One peer's manifest for a tag, verified against the digest the peer
    /// states; `None` when it has none or sends something else.
    async fn fetch_tagged(&self, peer: &Peer, path: &str) -> Option<(Descriptor, Bytes)> {
        let headers = [("accept", MANIFEST_ACCEPT.to_string())];
        let response = client::request(
            peer.addr,
            Method::GET,
            path,
            &headers,
            self.timeouts(),
            self.client_tls(),
        )
        .await
        .inspect_err(|e| tracing::debug!(peer = %peer.addr, error = %e, "tag request failed"))
        .ok()?;
        let (media_type, stated, body) = match manifest_head(response) {
            Ok(head) => head,
            Err(Answer::NotHere) => {
                tracing::debug!(peer = %peer.addr, "peer no longer holds the tag");
                return None;
            }
            Err(_) => return None,
        };
        let per_peer: Duration = self.config.stall_timeout * 2;
        let bytes = tokio::time::timeout(
            per_peer,
            Limited::new(body, MAX_MANIFEST_SIZE as usize).collect(),
        )
        .await
        .ok()?
        .ok()?
        .to_bytes();
        let actual = Digest::of(&bytes);
        // Without a stated digest there is nothing to agree on.
        let Some(stated) = stated else {
            tracing::debug!(peer = %peer.addr, "peer answered a tag without its digest");
            return None;
        };
        if stated != actual {
            tracing::warn!(peer = %peer.addr, %actual, %stated, "peer sent a manifest that does not match its digest");
            self.bad.mark(&actual, &peer.id, self.config.bad_peer_ttl);
            return None;
        }
        let media_type = manifest::media_type_of(&bytes, media_type.as_deref())?;
        Some((
            Descriptor {
                media_type,
                digest: actual,
                size: bytes.len() as u64,
            },
            bytes,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> Peer {
        Peer {
            id: libp2p::PeerId::random(),
            addr: std::net::SocketAddr::from(([10, 0, 0, n], 5000)),
        }
    }

    fn manifest(digest: Digest) -> Descriptor {
        Descriptor {
            media_type: manifest::OCI_MANIFEST.to_string(),
            digest,
            size: 2,
        }
    }

    #[test]
    fn two_hosts_settle_a_tag_and_any_other_digest_unsettles_it() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut votes = Votes::default();
        votes.add(
            SourceKey::of(peer(1).addr.ip()),
            peer(1),
            manifest(a),
            Bytes::new(),
        );
        assert_eq!(votes.settled(2), None, "one host is not enough");
        assert_eq!(votes.settled(1), Some(a));
        votes.add(
            SourceKey::of(peer(2).addr.ip()),
            peer(2),
            manifest(a),
            Bytes::new(),
        );
        assert_eq!(votes.settled(2), Some(a));
        votes.add(
            SourceKey::of(peer(3).addr.ip()),
            peer(3),
            manifest(b),
            Bytes::new(),
        );
        assert_eq!(votes.settled(2), None, "a third host disagrees");
        assert_eq!(votes.settled(1), None);
    }

    #[test]
    fn off_never_settles() {
        assert_eq!(TagResolution::Off.hosts_needed(), usize::MAX);
        let mut votes = Votes::default();
        votes.add(
            SourceKey::of(peer(1).addr.ip()),
            peer(1),
            manifest(Digest::of(b"a")),
            Bytes::new(),
        );
        assert_eq!(votes.settled(TagResolution::Off.hosts_needed()), None);
    }
}
