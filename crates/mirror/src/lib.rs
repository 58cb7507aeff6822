//! Fetching content this node lacks from the peers that hold it.
//!
//! Uses `oci`, `net`, `metrics`, `routing` (who holds what) and `store`.
//!
//! - Peers come from the router as a stream; no provider within the resolve
//!   timeout means a miss at once (containerd then tries its next endpoint).
//! - Every step has a time limit: connect, response head, stall (no byte for
//!   a while), and a total budget per request.
//! - Hedging: when the first peer has not answered its response head within
//!   the hedge delay, the next one is raced against it. During the body, a
//!   peer that delivers less than the minimum speed is replaced when another
//!   holder exists.
//! - A peer that fails mid-body is replaced and the transfer resumes with
//!   `Range: bytes=<next byte>-`: the client sees one uninterrupted response.
//! - A large blob that several peers hold is fetched from them side by side,
//!   in segments, the busy ones used less (see `parallel`).
//! - Whole-blob responses are hashed on the way through and their last chunk
//!   is held back until the digest is confirmed; on a mismatch the client gets
//!   a short body and the peers that sent the bytes are not used again for
//!   that digest. Manifests are verified before any header is sent.
//! - A tag, which no digest checks, is answered only when two hosts agree on
//!   it (see `tags`).

mod blame;
mod client;
pub mod journal;
pub mod measure;
mod parallel;
mod tags;
mod transfer;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{BoxStream, FuturesUnordered};
use http_body_util::{BodyExt, Limited};
use hyper::Method;
use hyper::body::Incoming;
use libp2p::PeerId;

pub use client::{AttemptError, Timeouts};
pub use tags::TagResolution;
pub use transfer::TransferError;

use peermirror_net::tls::TlsState;
use peermirror_oci::manifest::{
    self, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MAX_MANIFEST_SIZE, OCI_INDEX, OCI_MANIFEST,
};
use peermirror_oci::{
    ByteRange, ContentRange, Descriptor, Digest, FOLLOW_HEADER, ManifestReference, Name, Reference,
    Route, UPLOAD_RATE_HEADER,
};
use peermirror_routing::{Asker, Fanout, Peer, Router};

/// Time limits and policies of mirroring.
#[derive(Debug, Clone, clap::Args)]
pub struct MirrorConfig {
    /// How long a local miss waits for a first peer that has the content
    /// before answering 404.
    #[arg(long = "mirror-resolve-timeout",
        value_name = "MIRROR_RESOLVE_TIMEOUT", env = "PEERMIRROR_MIRROR_RESOLVE_TIMEOUT", default_value = "20ms", value_parser = peermirror_net::flags::parse_duration)]
    pub resolve_timeout: Duration,

    /// Time limit of a TCP connection to a peer.
    #[arg(long = "mirror-connect-timeout",
        value_name = "MIRROR_CONNECT_TIMEOUT", env = "PEERMIRROR_MIRROR_CONNECT_TIMEOUT", default_value = "1s", value_parser = peermirror_net::flags::parse_duration)]
    pub connect_timeout: Duration,

    /// Time limit for a peer's response head.
    #[arg(long = "mirror-header-timeout",
        value_name = "MIRROR_HEADER_TIMEOUT", env = "PEERMIRROR_MIRROR_HEADER_TIMEOUT", default_value = "3s", value_parser = peermirror_net::flags::parse_duration)]
    pub header_timeout: Duration,

    /// When the first peer has not answered within this time, a second one
    /// is asked too and the first answer wins.
    #[arg(long = "mirror-hedge-delay",
        value_name = "MIRROR_HEDGE_DELAY", env = "PEERMIRROR_MIRROR_HEDGE_DELAY", default_value = "300ms", value_parser = peermirror_net::flags::parse_duration)]
    pub hedge_delay: Duration,

    /// A peer that sends nothing for this long is replaced, and the transfer
    /// resumes from another holder at the byte where it stopped.
    #[arg(long = "mirror-stall-timeout",
        value_name = "MIRROR_STALL_TIMEOUT", env = "PEERMIRROR_MIRROR_STALL_TIMEOUT", default_value = "3s", value_parser = peermirror_net::flags::parse_duration)]
    pub stall_timeout: Duration,

    /// Bytes per second (suffixes K, M, G; binary) below which a peer is
    /// replaced by another holder, and an in-flight source (first-deploy
    /// fan-out) is left, measured over the stall timeout.
    #[arg(long = "mirror-min-speed",
        value_name = "MIRROR_MIN_SPEED", env = "PEERMIRROR_MIRROR_MIN_SPEED", default_value = "1M", value_parser = peermirror_net::flags::parse_size)]
    pub min_speed: u64,

    /// Time limit of one mirrored request, body included.
    #[arg(long = "mirror-total-timeout",
        value_name = "MIRROR_TOTAL_TIMEOUT", env = "PEERMIRROR_MIRROR_TOTAL_TIMEOUT", default_value = "10m", value_parser = peermirror_net::flags::parse_duration)]
    pub total_timeout: Duration,

    /// Most peers tried for one request.
    #[arg(
        long = "mirror-max-attempts",
        value_name = "MIRROR_MAX_ATTEMPTS",
        env = "PEERMIRROR_MIRROR_MAX_ATTEMPTS",
        default_value_t = 5,
        alias = "mirror-resolve-retries"
    )]
    pub max_attempts: usize,

    /// Most holders a large blob is fetched from at once, in segments (the
    /// busy ones used less). 1 fetches from one holder at a time.
    #[arg(
        long = "mirror-parallel-peers",
        value_name = "MIRROR_PARALLEL_PEERS",
        env = "PEERMIRROR_MIRROR_PARALLEL_PEERS",
        default_value_t = 4
    )]
    pub parallel_peers: usize,

    /// Size (K, M, G) from which a blob that several peers hold is fetched
    /// from them at once.
    #[arg(long = "mirror-parallel-min-size",
        value_name = "MIRROR_PARALLEL_MIN_SIZE", env = "PEERMIRROR_MIRROR_PARALLEL_MIN_SIZE", default_value = "32M", value_parser = peermirror_net::flags::parse_size)]
    pub parallel_min_size: u64,

    /// Memory (K, M, G) the relays of blobs fetched from several holders at
    /// once may hold in all (each holds up to `(peers + 1) × 4 MiB` of
    /// segments ahead of its client). A relay that finds none left stays
    /// on one holder.
    #[arg(long = "mirror-relay-memory",
        value_name = "MIRROR_RELAY_MEMORY", env = "PEERMIRROR_MIRROR_RELAY_MEMORY", default_value = "64M", value_parser = peermirror_net::flags::parse_size)]
    pub relay_memory: u64,

    /// How tags are answered through peers: `agreement` (two hosts, an
    /// IPv4 address or IPv6 /64 each, state the same digest and none states
    /// another), `single-holder` (one is enough: air-gapped clusters whose
    /// images are imported on one node) or `off` (tags are left to the
    /// registry, as `configure-containerd --resolve-tags false` does).
    #[arg(
        long = "tag-resolution",
        value_name = "TAG_RESOLUTION",
        env = "PEERMIRROR_TAG_RESOLUTION",
        value_enum,
        default_value_t = TagResolution::Agreement
    )]
    pub tag_resolution: TagResolution,

    /// How long a tag lookup that found a holder waits for the answers that
    /// settle it (a second host) before it is a miss.
    #[arg(long = "mirror-tag-timeout",
        value_name = "MIRROR_TAG_TIMEOUT", env = "PEERMIRROR_MIRROR_TAG_TIMEOUT", default_value = "500ms", value_parser = peermirror_net::flags::parse_duration)]
    pub tag_timeout: Duration,

    /// How long a peer that sent corrupt bytes is avoided for that digest.
    #[arg(skip = Duration::from_secs(3600))]
    pub bad_peer_ttl: Duration,

    /// How long the first-deploy fan-out's rendezvous may take to answer
    /// before a blob no node holds is answered as a miss (as without
    /// fan-out: this node's containerd fetches it upstream).
    #[arg(help_heading = "Fan-out (first deploy)", long = "fanout-timeout",
        value_name = "FANOUT_TIMEOUT", env = "PEERMIRROR_FANOUT_TIMEOUT", default_value = "2s", value_parser = peermirror_net::flags::parse_duration)]
    pub fanout_timeout: Duration,

    /// How long a followed source may take to send its response head (it
    /// waits for its ingest to appear first).
    #[arg(skip = Duration::from_secs(5))]
    pub follow_header_timeout: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            resolve_timeout: Duration::from_millis(20),
            connect_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(3),
            hedge_delay: Duration::from_millis(300),
            stall_timeout: Duration::from_secs(3),
            min_speed: 1 << 20,
            total_timeout: Duration::from_secs(600),
            max_attempts: 5,
            bad_peer_ttl: Duration::from_secs(3600),
            fanout_timeout: Duration::from_secs(2),
            follow_header_timeout: Duration::from_secs(5),
            parallel_peers: 4,
            parallel_min_size: 32 << 20,
            relay_memory: 64 << 20,
            tag_resolution: TagResolution::Agreement,
            tag_timeout: Duration::from_millis(500),
        }
    }
}

/// Why the mirror has nothing to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorMiss {
    /// No peer holds the key (as far as the DHT knows within the timeout).
    NoProvider,
    /// Peers were found but none delivered.
    AllFailed { tried: usize },
    /// A peer holds the blob, and the requested range is outside it.
    Unsatisfiable { size: u64 },
    /// Holders of a tag answered, but not enough hosts stated one digest
    /// (`hosts` answered, stating `digests` different ones).
    TagNotAgreed { hosts: usize, digests: usize },
}

/// A blob response from a peer, ready to be relayed.
pub struct MirroredBlob {
    pub peer: Peer,
    /// Size of the whole blob.
    pub size: u64,
    /// First byte and length of what `body` carries.
    pub offset: u64,
    pub len: u64,
    /// Whether the client asked for a range (answer 206).
    pub partial: bool,
    /// `None` for HEAD.
    pub body: Option<BoxStream<'static, Result<Bytes, TransferError>>>,
    /// Time until the first provider was known.
    pub resolve_time: Duration,
}

/// A manifest fetched from a peer and verified.
#[derive(Debug, Clone)]
pub struct MirroredManifest {
    pub peer: Peer,
    pub descriptor: Descriptor,
    pub bytes: Bytes,
    pub resolve_time: Duration,
}

/// Peers that sent bytes that did not match their digest, per digest.
#[derive(Default)]
struct BadPeers {
    entries: Mutex<HashMap<(Digest, PeerId), Instant>>,
}

/// Upper bound of remembered bad (digest, peer) pairs.
const MAX_BAD_ENTRIES: usize = 10_000;

impl BadPeers {
    fn is_bad(&self, digest: &Digest, peer: &PeerId, ttl: Duration) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(*digest, *peer))
            .is_some_and(|at| at.elapsed() < ttl)
    }

    fn forget(&self, digest: &Digest, peer: &PeerId) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&(*digest, *peer));
    }

    fn mark(&self, digest: &Digest, peer: &PeerId, ttl: Duration) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_BAD_ENTRIES {
            entries.retain(|_, at| at.elapsed() < ttl);
        }
        if entries.len() < MAX_BAD_ENTRIES {
            entries.insert((*digest, *peer), Instant::now());
        }
    }
}

/// Fetches content from peers. Shared by all requests.
pub struct Mirror {
    router: Arc<dyn Router>,
    config: MirrorConfig,
    bad: BadPeers,
    audits: blame::Audits,
    /// When set, peers are reached over mTLS with this node's certificate.
    tls: Option<Arc<TlsState>>,
    journal: journal::Journal,
    /// Followed sources that stopped delivering, per digest, and when: an
    /// answer naming one again is treated as failed at once (the report to
    /// the rendezvous may still be on its way when containerd retries).
    stopped: Mutex<HashMap<Digest, (PeerId, Instant)>>,
    /// The fan-out answers by kind, once the daemon registers the counter.
    fanout_answers: std::sync::OnceLock<
        prometheus_client::metrics::family::Family<
            peermirror_metrics::FanoutAnswerLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    >,
    /// What is left of `--mirror-relay-memory`, in KiB.
    relay_room: Arc<tokio::sync::Semaphore>,
}

/// How long a followed source that stopped is not followed again.
const STOPPED_TTL: Duration = Duration::from_secs(30);
/// Most stopped sources remembered.
const MAX_STOPPED: usize = 1024;

/// The peers a request may still try, in the order the lookup found them.
/// When the lookup is over, a long transfer may look again (at most once per
/// [`RELOOKUP_INTERVAL`]): holders that appeared since can take over.
pub(crate) struct Candidates {
    router: Arc<dyn Router>,
    key: String,
    lookup: Option<BoxStream<'static, Peer>>,
    /// When the last lookup started (tokio's clock, which tests may pause).
    looked_up: tokio::time::Instant,
    queue: VecDeque<Peer>,
    seen: HashSet<PeerId>,
    skip: Box<dyn Fn(&Peer) -> bool + Send>,
}

/// Shortest time between two lookups of one request.
const RELOOKUP_INTERVAL: Duration = Duration::from_secs(1);

impl Candidates {
    fn new(
        router: Arc<dyn Router>,
        key: String,
        skip: Box<dyn Fn(&Peer) -> bool + Send>,
    ) -> Candidates {
        let lookup = router.lookup(&key);
        Candidates {
            router,
            key,
            lookup: Some(lookup),
            looked_up: tokio::time::Instant::now(),
            queue: VecDeque::new(),
            seen: HashSet::new(),
            skip,
        }
    }

    /// The next peer not tried yet, waiting up to `wait` for the lookup to
    /// find one.
    pub(crate) async fn next(&mut self, wait: Duration) -> Option<Peer> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.queue.pop_front() {
                return Some(p);
            }
            let lookup = self.lookup.as_mut()?;
            match tokio::time::timeout_at(deadline, lookup.next()).await {
                Ok(Some(p)) => {
                    if self.seen.insert(p.id) && !(self.skip)(&p) {
                        return Some(p);
                    }
                }
                Ok(None) => {
                    tracing::debug!(key = %self.key, "lookup over: no more holders");
                    self.lookup = None;
                    return None;
                }
                Err(_) => {
                    tracing::debug!(key = %self.key, ?wait, "no holder found in time");
                    return None;
                }
            }
        }
    }

    /// Whether the lookup is over and every peer it found was taken.
    pub(crate) fn is_over(&self) -> bool {
        self.lookup.is_none() && self.queue.is_empty()
    }

    /// Like [`Candidates::next`], but when the lookup is over, looks again
    /// for holders that appeared since (peers already tried stay skipped).
    pub(crate) async fn next_or_relookup(&mut self, wait: Duration) -> Option<Peer> {
        if self.lookup.is_none()
            && self.queue.is_empty()
            && self.looked_up.elapsed() >= RELOOKUP_INTERVAL
        {
            self.lookup = Some(self.router.lookup(&self.key));
            self.looked_up = tokio::time::Instant::now();
        }
        self.next(wait).await
    }

    /// The holder to resume from after the current one failed mid-body:
    /// the next one found, else one that appeared since, looked up again
    /// past the lookup caches (at most every [`FRESH_LOOKUP_INTERVAL`])
    /// until `budget` runs out. `None`: no holder is left.
    pub(crate) async fn next_after_failure(&mut self, budget: Duration) -> Option<Peer> {
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            if self.lookup.is_none() && self.queue.is_empty() {
                let due = self.looked_up + FRESH_LOOKUP_INTERVAL;
                if now < due {
                    tokio::time::sleep_until(due.min(deadline)).await;
                    continue;
                }
                tracing::debug!(key = %self.key, "looking again for holders");
                self.lookup = Some(self.router.lookup_fresh(&self.key));
                self.looked_up = now;
            }
            if let Some(peer) = self.next(deadline - now).await {
                return Some(peer);
            }
        }
    }
}

/// Shortest time between two fresh lookups of a transfer that lost its
/// holder.
const FRESH_LOOKUP_INTERVAL: Duration = Duration::from_millis(250);

/// Holders that answered `404` (stale records) that one request may skip
/// past, per attempt of its budget.
const STALE_PER_ATTEMPT: usize = 4;

/// The media types a manifest request accepts.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

impl Mirror {
    pub fn new(router: Arc<dyn Router>, config: MirrorConfig) -> Arc<Mirror> {
        Self::with_tls(router, config, None)
    }

    pub fn with_tls(
        router: Arc<dyn Router>,
        config: MirrorConfig,
        tls: Option<Arc<TlsState>>,
    ) -> Arc<Mirror> {
        // At least one peer is tried, one at a time when 0 is asked for.
        let config = MirrorConfig {
            max_attempts: config.max_attempts.max(1),
            parallel_peers: config.parallel_peers.max(1),
            ..config
        };
        Arc::new(Mirror {
            router,
            bad: BadPeers::default(),
            audits: blame::Audits::default(),
            tls,
            journal: journal::Journal::default(),
            stopped: Mutex::default(),
            fanout_answers: std::sync::OnceLock::new(),
            relay_room: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(config.relay_memory >> 10)
                    .unwrap_or(usize::MAX)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            config,
        })
    }

    /// Counts, in `counter`, the fan-out rendezvous' answers.
    pub fn count_fanout_answers(
        &self,
        counter: prometheus_client::metrics::family::Family<
            peermirror_metrics::FanoutAnswerLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    ) {
        let _ = self.fanout_answers.set(counter);
    }

    /// Asks the rendezvous of `digest` (see [`Router::fanout`]) within
    /// `--fanout-timeout`, and counts its answer.
    async fn ask_rendezvous(
        &self,
        digest: &Digest,
        failed: Option<PeerId>,
        asker: Asker,
    ) -> Option<Fanout> {
        let answer = tokio::time::timeout(
            self.config.fanout_timeout,
            self.router.fanout(digest, failed, asker),
        )
        .await;
        let label = match &answer {
            Err(_) => {
                tracing::info!(%digest, timeout = ?self.config.fanout_timeout, "the fan-out rendezvous did not answer in time");
                "late"
            }
            Ok(None) => "none",
            Ok(Some(Fanout::Lead)) => "lead",
            Ok(Some(Fanout::Follow(_))) => "follow",
        };
        if let Some(c) = self.fanout_answers.get() {
            c.get_or_create(&peermirror_metrics::FanoutAnswerLabels { answer: label })
                .inc();
        }
        answer.ok().flatten()
    }

    /// Counts, in `counter`, the holders of corrupt copies by verdict.
    pub fn count_corrupt_holders(
        &self,
        counter: prometheus_client::metrics::family::Family<
            peermirror_metrics::CorruptHolderLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    ) {
        let _ = self.audits.counter.set(counter);
    }

    /// How tags are answered through peers.
    pub fn tag_resolution(&self) -> TagResolution {
        self.config.tag_resolution
    }

    /// The last requests and the totals since start.
    pub fn journal(&self) -> &journal::Journal {
        &self.journal
    }

    fn record_miss(&self, kind: &'static str, key: String, miss: &MirrorMiss, started: Instant) {
        let outcome = match miss {
            MirrorMiss::NoProvider => journal::Outcome::Miss,
            MirrorMiss::AllFailed { .. } => journal::Outcome::Failed,
            // A peer answered: the range is outside the blob; or the tag
            // lookup recorded what the hosts said.
            MirrorMiss::Unsatisfiable { .. } | MirrorMiss::TagNotAgreed { .. } => return,
        };
        self.journal.record(journal::Entry {
            kind,
            key,
            outcome,
            peers: &[],
            bytes: 0,
            resolve: None,
            duration: started.elapsed(),
            verified: None,
        });
    }

    /// A verified manifest from `peers`, in the journal.
    fn record_manifest_hit(
        &self,
        key: String,
        peers: &[Peer],
        bytes: &Bytes,
        resolve_time: Duration,
        started: Instant,
    ) {
        self.journal.record(journal::Entry {
            kind: "manifest",
            key,
            outcome: journal::Outcome::Hit,
            peers,
            bytes: bytes.len() as u64,
            resolve: Some(resolve_time),
            duration: started.elapsed(),
            verified: Some(true),
        });
    }

    /// The client TLS configuration for the next connection (it follows
    /// certificate rotations).
    pub(crate) fn client_tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.as_ref().map(|t| t.client_config())
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.config.connect_timeout,
            header: self.config.header_timeout,
        }
    }

    fn candidates(self: &Arc<Self>, key: &str, digest: Option<Digest>) -> Candidates {
        let me = self.clone();
        let skip: Box<dyn Fn(&Peer) -> bool + Send> = match digest {
            Some(d) => Box::new(move |p: &Peer| me.bad.is_bad(&d, &p.id, me.config.bad_peer_ttl)),
            None => Box::new(|_| false),
        };
        Candidates::new(self.router.clone(), key.to_string(), skip)
    }

    /// Tries peers until one answers a response head that `accept` takes,
    /// racing a second peer when the first is slow to answer. `tried` is
    /// the request's attempt budget, shared by every call for one request.
    ///
    /// One peer's `416` settles nothing: a range is unsatisfiable only when
    /// every peer that answered said so, for the same size.
    async fn first_answer<T>(
        &self,
        candidates: &mut Candidates,
        tried: &mut usize,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        accept: impl Fn(&Peer, hyper::Response<Incoming>) -> Result<T, Answer>,
    ) -> Result<(Peer, T), MirrorMiss> {
        if *tried >= self.config.max_attempts {
            return Err(MirrorMiss::AllFailed { tried: *tried });
        }
        let Some(first) = candidates.next(self.config.resolve_timeout).await else {
            return Err(if *tried == 0 {
                MirrorMiss::NoProvider
            } else {
                MirrorMiss::AllFailed { tried: *tried }
            });
        };
        let timeouts = self.timeouts();
        let attempt = |peer: Peer| {
            let method = method.clone();
            let headers: Vec<(&str, String)> = headers.to_vec();
            let path = path.to_string();
            let tls = self.client_tls();
            async move {
                let result =
                    client::request(peer.addr, method, &path, &headers, timeouts, tls).await;
                (peer, result)
            }
        };
        let mut inflight = FuturesUnordered::new();
        inflight.push(attempt(first));
        *tried += 1;
        // Sizes named by 416 answers, and whether any other answer came.
        let mut unsatisfiable: Vec<u64> = Vec::new();
        let mut other_answers = false;
        // Peers that answered 404, not counted as attempts.
        let mut stale = 0;
        let hedge = tokio::time::sleep(self.config.hedge_delay);
        tokio::pin!(hedge);
        let mut hedged = false;
        loop {
            tokio::select! {
                Some((peer, result)) = inflight.next() => {
                    match result {
                        Ok(response) => match accept(&peer, response) {
                            Ok(v) => return Ok((peer, v)),
                            Err(Answer::Unsatisfiable(size)) => unsatisfiable.push(size),
                            Err(Answer::NotHere) => {
                                other_answers = true;
                                // A stale record costs a fast round trip, not
                                // an attempt (within a bound of its own): a
                                // holder may be behind several of them.
                                if stale < self.config.max_attempts * STALE_PER_ATTEMPT {
                                    stale += 1;
                                    *tried -= 1;
                                }
                                tracing::debug!(peer = %peer.addr, "peer no longer holds it");
                            }
                            Err(Answer::Retry(reason)) => {
                                other_answers = true;
                                tracing::debug!(peer = %peer.addr, %reason, "peer cannot serve this request");
                            }
                        },
                        Err(e) => {
                            other_answers = true;
                            tracing::debug!(peer = %peer.addr, error = %e, "peer request failed");
                        }
                    }
                    if *tried < self.config.max_attempts
                        && let Some(next) = candidates.next(self.config.resolve_timeout).await
                    {
                        inflight.push(attempt(next));
                        *tried += 1;
                    }
                    if inflight.is_empty() {
                        return Err(match unsatisfiable.first() {
                            Some(&size) if !other_answers && unsatisfiable.iter().all(|s| *s == size) => {
                                MirrorMiss::Unsatisfiable { size }
                            }
                            _ => MirrorMiss::AllFailed { tried: *tried },
                        });
                    }
                }
                _ = &mut hedge, if !hedged => {
                    hedged = true;
                    if *tried < self.config.max_attempts
                        && let Some(next) = candidates.next(Duration::ZERO).await
                    {
                        tracing::debug!(peer = %next.addr, "first peer is slow to answer; racing another");
                        inflight.push(attempt(next));
                        *tried += 1;
                    }
                }
            }
        }
    }

    /// Fetches a blob (or the requested range of it) from a peer, for this
    /// node's containerd: a blob no node holds may be this node's to fetch
    /// (the fan-out's lead).
    pub async fn blob(
        self: &Arc<Self>,
        name: &Name,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<MirroredBlob, MirrorMiss> {
        self.blob_for(name, digest, range, head, Asker::Node).await
    }

    /// Fetches a blob (or the requested range of it) from a peer for
    /// `asker`: anyone but this node's containerd only follows a fan-out
    /// under way, and never leads one (nobody would fetch it).
    pub async fn blob_for(
        self: &Arc<Self>,
        name: &Name,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
        asker: Asker,
    ) -> Result<MirroredBlob, MirrorMiss> {
        let started = Instant::now();
        let mut candidates = self.candidates(&digest.to_string(), Some(*digest));
        let path = Route::Blob {
            name: name.clone(),
            digest: *digest,
        }
        .to_path();
        let mut headers = Vec::new();
        if let Some(r) = range {
            headers.push(("range", r.to_string()));
        }
        let method = if head { Method::HEAD } else { Method::GET };
        let digest_text = digest.to_string();
        let accept = |peer: &Peer, response: hyper::Response<Incoming>| {
            blob_answer(peer, response, &digest_text, range)
        };
        let mut tried = 0;
        let mut followed = None;
        let (peer, answer) = match self
            .first_answer(&mut candidates, &mut tried, method, &path, &headers, accept)
            .await
        {
            Ok(answer) => answer,
            // Nobody holds it: maybe somebody is fetching it right now.
            Err(MirrorMiss::NoProvider) if !head => {
                match self.follow(digest, &path, &headers, range, asker).await {
                    Some(answer) => {
                        followed = Some(answer.0.id);
                        answer
                    }
                    None => {
                        let miss = MirrorMiss::NoProvider;
                        self.record_miss("blob", digest_text, &miss, started);
                        return Err(miss);
                    }
                }
            }
            Err(miss) => {
                self.record_miss("blob", digest_text, &miss, started);
                return Err(miss);
            }
        };
        let resolve_time = started.elapsed();
        let BlobAnswer {
            size,
            offset,
            len,
            body,
            first_bytes,
            upload_rate,
        } = answer;
        let body = match (head, body) {
            (true, _) | (_, None) => {
                self.journal.record(journal::Entry {
                    kind: "blob",
                    key: digest_text,
                    outcome: journal::Outcome::Hit,
                    peers: std::slice::from_ref(&peer),
                    bytes: 0,
                    resolve: Some(resolve_time),
                    duration: started.elapsed(),
                    verified: None,
                });
                None
            }
            (false, Some(body)) => {
                // `bytes=0-` is how containerd 2.1+ asks for a whole blob:
                // verify it like one.
                let verify = offset == 0 && len == size;
                Some(transfer::start(transfer::Transfer {
                    mirror: self.clone(),
                    digest: *digest,
                    path,
                    verify,
                    end: offset + len,
                    first: offset,
                    pos: offset,
                    started,
                    resolve_time,
                    peer: peer.clone(),
                    peer_upload_rate: upload_rate,
                    body: Some(body),
                    first_bytes,
                    candidates,
                    deadline: tokio::time::Instant::now() + self.config.total_timeout,
                    followed,
                    asker,
                }))
            }
        };
        Ok(MirroredBlob {
            peer,
            size,
            offset,
            len,
            partial: range.is_some(),
            body,
            resolve_time,
        })
    }

    /// Fetches a manifest by tag (see [`TagResolution`]) or digest and
    /// verifies it before returning.
    pub async fn manifest(
        self: &Arc<Self>,
        name: &Name,
        registry_reference: Option<&Reference>,
        reference: &ManifestReference,
    ) -> Result<MirroredManifest, MirrorMiss> {
        let started = Instant::now();
        let path = Route::Manifest {
            name: name.clone(),
            reference: reference.clone(),
        }
        .to_path();
        let wanted = match reference {
            ManifestReference::Digest(d) => *d,
            ManifestReference::Tag(_) => {
                let Some(key) = registry_reference.and_then(Reference::tagged_name) else {
                    return Err(MirrorMiss::NoProvider);
                };
                let result = self.manifest_by_tag(key.clone(), path, started).await;
                if let Err(miss) = &result {
                    self.record_miss("manifest", key, miss, started);
                }
                return result;
            }
        };
        let key = wanted.to_string();
        let mut candidates = self.candidates(&key, Some(wanted));
        let headers = [("accept", MANIFEST_ACCEPT.to_string())];
        // A manifest is small: a peer that cannot deliver it within this
        // is replaced, and the whole request is bounded too (containerd
        // waits for its answer before it tries the next endpoint).
        let per_peer = self.config.stall_timeout * 2;
        let budget = (self.config.header_timeout + per_peer).min(self.config.total_timeout);
        let deadline = tokio::time::Instant::now() + budget;
        let mut tried = 0;
        let fetch = async {
            loop {
                let accept =
                    |_: &Peer, response: hyper::Response<Incoming>| manifest_head(response);
                let (peer, (media_type, header_digest, body)) = self
                    .first_answer(
                        &mut candidates,
                        &mut tried,
                        Method::GET,
                        &path,
                        &headers,
                        accept,
                    )
                    .await?;
                let resolve_time = started.elapsed();
                let collected = tokio::time::timeout_at(
                    deadline.min(tokio::time::Instant::now() + per_peer),
                    Limited::new(body, MAX_MANIFEST_SIZE as usize).collect(),
                )
                .await;
                let bytes = match collected {
                    Ok(Ok(b)) => b.to_bytes(),
                    _ => {
                        tracing::debug!(peer = %peer.addr, "manifest body not received");
                        continue;
                    }
                };
                let actual = Digest::of(&bytes);
                if wanted != actual || header_digest.is_some_and(|h| h != actual) {
                    tracing::warn!(peer = %peer.addr, %actual, expected = %wanted, "peer sent a manifest that does not match its digest");
                    self.bad.mark(&actual, &peer.id, self.config.bad_peer_ttl);
                    self.bad.mark(&wanted, &peer.id, self.config.bad_peer_ttl);
                    continue;
                }
                // What the verified bytes say they are, not what the peer's
                // header claims.
                let Some(media_type) = manifest::media_type_of(&bytes, media_type.as_deref())
                else {
                    tracing::debug!(peer = %peer.addr, "peer sent a document that is no manifest");
                    continue;
                };
                self.record_manifest_hit(
                    key.clone(),
                    std::slice::from_ref(&peer),
                    &bytes,
                    resolve_time,
                    started,
                );
                return Ok(MirroredManifest {
                    peer,
                    descriptor: Descriptor {
                        media_type,
                        digest: actual,
                        size: bytes.len() as u64,
                    },
                    bytes,
                    resolve_time,
                });
            }
        };
        let result = match tokio::time::timeout_at(deadline, fetch).await {
            Ok(result) => result,
            Err(_) => Err(MirrorMiss::AllFailed { tried }),
        };
        if let Err(miss) = &result {
            self.record_miss("manifest", key, miss, started);
        }
        result
    }

    /// The first-deploy fan-out: asks the digest's rendezvous whether
    /// another node is fetching it, and if so, asks that node for its
    /// in-flight bytes. `None`: this node's containerd is to fetch it (a
    /// miss), or there is nothing to follow.
    async fn follow(
        &self,
        digest: &Digest,
        path: &str,
        headers: &[(&str, String)],
        range: Option<ByteRange>,
        asker: Asker,
    ) -> Option<(Peer, BlobAnswer)> {
        let mut failed = None;
        // A source that cannot serve is reported, and the next answer tried.
        for _ in 0..3 {
            let answer = self.ask_rendezvous(digest, failed, asker).await;
            let source = match answer {
                // A source that stopped, or that sent corrupt bytes of this
                // digest (a rendezvous entry outlives the fetch it was made
                // for: its leader may hold a bad copy now).
                Some(Fanout::Follow(source))
                    if self.has_stopped(digest, &source.id)
                        || self
                            .bad
                            .is_bad(digest, &source.id, self.config.bad_peer_ttl) =>
                {
                    failed = Some(source.id);
                    continue;
                }
                Some(Fanout::Follow(source)) => source,
                Some(Fanout::Lead) => {
                    tracing::debug!(%digest, "fan-out: this node fetches it");
                    return None;
                }
                None => return None,
            };
            let mut follow_headers = headers.to_vec();
            follow_headers.push((FOLLOW_HEADER, "1".to_string()));
            let timeouts = Timeouts {
                connect: self.config.connect_timeout,
                header: self.config.follow_header_timeout,
            };
            let response = client::request(
                source.addr,
                Method::GET,
                path,
                &follow_headers,
                timeouts,
                self.client_tls(),
            )
            .await;
            let answer = match response {
                Ok(r) => blob_answer(&source, r, &digest.to_string(), range).map_err(|a| match a {
                    Answer::NotHere => "404".to_string(),
                    Answer::Retry(reason) => reason,
                    Answer::Unsatisfiable(size) => format!("416 for a blob of {size} bytes"),
                }),
                Err(e) => Err(e.to_string()),
            };
            // Bytes before a response head: a silent source is left while
            // this node's client can still be told `404`.
            let answer = match answer {
                Ok(mut answer) => first_bytes(&mut answer, self.config.stall_timeout)
                    .await
                    .map(|()| answer),
                Err(reason) => Err(reason),
            };
            match answer {
                Ok(answer) => {
                    tracing::debug!(%digest, source = %source.addr, "fan-out: following an in-flight blob");
                    return Some((source, answer));
                }
                Err(reason) => {
                    tracing::info!(%digest, source = %source.addr, %reason, "fan-out source cannot serve");
                    failed = Some(source.id);
                }
            }
        }
        None
    }

    /// Remembers that `source` stopped delivering `digest`.
    pub(crate) fn note_stopped(&self, digest: Digest, source: PeerId) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if stopped.len() >= MAX_STOPPED {
            stopped.retain(|_, (_, at)| at.elapsed() < STOPPED_TTL);
        }
        if stopped.len() < MAX_STOPPED {
            stopped.insert(digest, (source, Instant::now()));
        }
    }

    fn has_stopped(&self, digest: &Digest, source: &PeerId) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        stopped
            .get(digest)
            .is_some_and(|(p, at)| p == source && at.elapsed() < STOPPED_TTL)
    }

    /// A followed source is too slow: it is not followed again for
    /// `digest`, the rendezvous is told, and the in-flight source it names
    /// instead is returned. `None`: no other source (or no answer).
    pub(crate) async fn another_source(
        &self,
        digest: &Digest,
        slow: PeerId,
        asker: Asker,
    ) -> Option<Peer> {
        self.note_stopped(*digest, slow);
        let answer = self.ask_rendezvous(digest, Some(slow), asker).await;
        match answer {
            Some(Fanout::Follow(next))
                if next.id != slow
                    && !self.has_stopped(digest, &next.id)
                    && !self.bad.is_bad(digest, &next.id, self.config.bad_peer_ttl) =>
            {
                Some(next)
            }
            other => {
                tracing::debug!(%digest, ?other, "no other in-flight source");
                None
            }
        }
    }

    /// Tells the rendezvous that a followed source stopped delivering, so
    /// that this node is placed again (it may be told to fetch it itself).
    pub(crate) fn follow_failed(self: &Arc<Self>, digest: Digest, source: PeerId, asker: Asker) {
        let me = self.clone();
        tokio::spawn(async move {
            let answer = me.ask_rendezvous(&digest, Some(source), asker).await;
            tracing::debug!(%digest, %source, ?answer, "fan-out: reported a source that stopped");
        });
    }

    pub(crate) fn mark_bad(&self, digest: &Digest, peer: &Peer) {
        self.bad.mark(digest, &peer.id, self.config.bad_peer_ttl);
    }

    /// Room for `bytes` more relay memory, held until the permit is
    /// dropped; `None` when `--mirror-relay-memory` is taken.
    pub(crate) fn relay_room(&self, bytes: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        self.relay_room.clone().try_acquire_many_owned(kib).ok()
    }

    /// An audit showed that `peer` sent only right bytes of `digest`.
    pub(crate) fn trust_again(&self, digest: &Digest, peer: &Peer) {
        self.bad.forget(digest, &peer.id);
    }
}

/// Why a peer's answer is not taken.
enum Answer {
    /// The peer says it does not hold it (`404`): its provider record is
    /// stale (containerd removed the content; Kademlia has no withdraw).
    NotHere,
    /// Try another peer.
    Retry(String),
    /// The peer says the range is outside a blob of this size (`416`).
    Unsatisfiable(u64),
}

struct BlobAnswer {
    size: u64,
    offset: u64,
    len: u64,
    body: Option<Incoming>,
    /// The body's first bytes, already read (an in-flight source must send
    /// some before this node's client gets a response head).
    first_bytes: Option<Bytes>,
    /// What the peer says it uploads to other hosts, bytes per second.
    upload_rate: Option<u64>,
}

/// Reads the first bytes of an in-flight source's body, waiting at most
/// `wait`: a source that sends none is left before the client hears
/// anything, so that its containerd can still go upstream on a `404`.
async fn first_bytes(answer: &mut BlobAnswer, wait: Duration) -> Result<(), String> {
    let Some(body) = answer.body.as_mut() else {
        return Ok(());
    };
    if answer.len == 0 {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(format!("no byte within {wait:?}")),
            Ok(None) => return Err("the body ended before its first byte".to_string()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                if data.is_empty() {
                    continue;
                }
                if data.len() as u64 > answer.len {
                    return Err(format!("{} bytes for a body of {}", data.len(), answer.len));
                }
                answer.first_bytes = Some(data);
                return Ok(());
            }
        }
    }
}

fn header<'a>(response: &'a hyper::Response<Incoming>, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A response's `Content-Range`, when it has a valid one.
fn content_range(response: &hyper::Response<Incoming>) -> Option<ContentRange> {
    header(response, "content-range").and_then(|v| v.parse().ok())
}

fn blob_answer(
    peer: &Peer,
    response: hyper::Response<Incoming>,
    digest: &str,
    range: Option<ByteRange>,
) -> Result<BlobAnswer, Answer> {
    let status = response.status().as_u16();
    if status == 416 {
        return Err(match content_range(&response) {
            // Only believable when the range really is outside that size.
            Some(ContentRange::Unsatisfied { size })
                if range.is_some_and(|r| r.resolve(size).is_err()) =>
            {
                Answer::Unsatisfiable(size)
            }
            _ => Answer::Retry(format!("{} answered 416", peer.addr)),
        });
    }
    if status == 404 {
        return Err(Answer::NotHere);
    }
    if status != 200 && status != 206 {
        return Err(Answer::Retry(format!("status {status}")));
    }
    if header(&response, "docker-content-digest").is_some_and(|d| d != digest) {
        return Err(Answer::Retry("answered for another digest".into()));
    }
    let len: u64 = header(&response, "content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Answer::Retry("no content-length".into()))?;
    let (offset, size) = judge_span(range, status, content_range(&response), len)?;
    let upload_rate = header(&response, UPLOAD_RATE_HEADER).and_then(|v| v.parse().ok());
    Ok(BlobAnswer {
        size,
        offset,
        len,
        body: Some(response.into_body()),
        first_bytes: None,
        upload_rate,
    })
}

/// Whether a `200`/`206` answer carries exactly what `range` asked for;
/// its first byte and the blob's size when it does.
fn judge_span(
    range: Option<ByteRange>,
    status: u16,
    content_range: Option<ContentRange>,
    len: u64,
) -> Result<(u64, u64), Answer> {
    if status == 206 {
        let Some(ContentRange::Span {
            first: a,
            last: b,
            size,
        }) = content_range
        else {
            return Err(Answer::Retry("206 without a valid content-range".into()));
        };
        if b - a + 1 != len {
            return Err(Answer::Retry(
                "content-range and content-length disagree".into(),
            ));
        }
        // Exactly the bytes asked for: a short answer to `bytes=0-` would
        // otherwise be relayed as a range, unverified.
        let Some(r) = range else {
            return Err(Answer::Retry(
                "a range answer to a whole-blob request".into(),
            ));
        };
        if r.resolve(size).ok() != Some(a..=b) {
            return Err(Answer::Retry("answered another range".into()));
        }
        Ok((a, size))
    } else {
        if range.is_some_and(|r| !r.is_from_start()) {
            return Err(Answer::Retry("range ignored".into()));
        }
        Ok((0, len))
    }
}

type ManifestHead = (Option<String>, Option<Digest>, Incoming);

fn manifest_head(response: hyper::Response<Incoming>) -> Result<ManifestHead, Answer> {
    if response.status().as_u16() == 404 {
        return Err(Answer::NotHere);
    }
    if response.status().as_u16() != 200 {
        return Err(Answer::Retry(format!("status {}", response.status())));
    }
    if header(&response, "content-length")
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > MAX_MANIFEST_SIZE)
    {
        return Err(Answer::Retry("manifest too large".into()));
    }
    let media_type = header(&response, "content-type")
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .filter(|mt| {
            [
                OCI_INDEX,
                OCI_MANIFEST,
                DOCKER_MANIFEST_LIST,
                DOCKER_MANIFEST,
            ]
            .contains(&mt.as_str())
        });
    let digest = header(&response, "docker-content-digest").and_then(|d| d.parse().ok());
    Ok((media_type, digest, response.into_body()))
}

#[cfg(test)]
mod tests;
