//! Relaying a blob body from peers to the client: stall and speed checks,
//! resume from another peer, and the digest check of whole blobs.
//!
//! The transfer runs in its own task and hands chunks to the client's
//! response through a small channel. When the client goes away the channel
//! closes, the task stops, and dropping the peer's body closes that
//! connection: work done on a client's behalf stops with the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::journal::Outcome;
use super::{Candidates, Mirror, blame, client, content_range};
use peermirror_oci::{ByteRange, ContentRange, Digest};
use peermirror_protocol::source::{Received, SourceRules, SourceWatch};
use peermirror_routing::Peer;

/// The time for the protocol's state machines, from tokio's clock (which
/// tests may pause).
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Why a relayed body ended early. The client's response is cut short.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError {
    #[error("no peer could deliver bytes {pos}..{end} of {digest}")]
    Exhausted { digest: Digest, pos: u64, end: u64 },
    #[error("{digest} from peers hashed to {actual}: corrupt copy, withheld the tail")]
    DigestMismatch { digest: Digest, actual: Digest },
    #[error("transfer of {digest} exceeded its time budget")]
    Deadline { digest: Digest },
}

pub(super) struct Transfer {
    pub mirror: Arc<Mirror>,
    pub digest: Digest,
    /// The request path on peers.
    pub path: String,
    /// Whether this is the whole blob (then it is hashed and verified).
    pub verify: bool,
    /// Absolute offset one past the last byte wanted.
    pub end: u64,
    /// Absolute offset of the first byte wanted.
    pub first: u64,
    /// Absolute offset of the next byte to receive.
    pub pos: u64,
    /// When the client's request began, and how long until a peer answered.
    pub started: std::time::Instant,
    pub resolve_time: Duration,
    pub peer: Peer,
    /// What the current peer says it uploads to other hosts.
    pub peer_upload_rate: Option<u64>,
    /// The current peer's response body (taken by the relay).
    pub body: Option<Incoming>,
    /// Bytes of that body read before the relay began (relayed first).
    pub first_bytes: Option<Bytes>,
    pub candidates: Candidates,
    pub deadline: tokio::time::Instant,
    /// The source this transfer follows (an in-flight blob on a peer the
    /// fan-out rendezvous named), if it does.
    pub followed: Option<libp2p::PeerId>,
    /// Who asked: anyone but this node's containerd never leads a fan-out.
    pub asker: peermirror_routing::Asker,
}

/// Chunks buffered between the peer and the client.
const CHANNEL_CHUNKS: usize = 8;

pub(super) fn start(transfer: Transfer) -> BoxStream<'static, Result<Bytes, TransferError>> {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::spawn(transfer.run(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

enum Next {
    Data(Bytes),
    End,
    /// The current peer failed or is too slow; try another.
    Switch(String),
    ClientGone,
}

/// The client's side of a transfer: bytes go out in order, hashed on the
/// way when the whole blob is verified, with the last chunk held back until
/// the digest is confirmed.
pub(super) struct Delivery {
    tx: mpsc::Sender<Result<Bytes, TransferError>>,
    hasher: Option<blame::HashWorker>,
    held: Option<Bytes>,
}

/// The client's stream was dropped.
pub(super) struct ClientGone;

impl Delivery {
    fn new(tx: mpsc::Sender<Result<Bytes, TransferError>>, verify: bool) -> Delivery {
        Delivery {
            tx,
            hasher: verify.then(blame::HashWorker::start),
            held: None,
        }
    }

    /// Hands on the next bytes of the body, sent by `sender` (see
    /// [`sender`]).
    pub(super) async fn push(&mut self, data: Bytes, sender: usize) -> Result<(), ClientGone> {
        let to_send = match &mut self.hasher {
            Some(h) => {
                h.update(data.clone(), sender).await;
                self.held.replace(data)
            }
            None => Some(data),
        };
        match to_send {
            Some(chunk) => self.tx.send(Ok(chunk)).await.map_err(|_| ClientGone),
            None => Ok(()),
        }
    }

    /// Ends the client's body short with `error`.
    pub(super) async fn fail(&self, error: TransferError) {
        let _ = self.tx.send(Err(error)).await;
    }

    /// Resolves when the client is gone.
    pub(super) async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Who sent bytes, as the hashing of spans knows them: the place of the
/// first of `contributors` that is `peer` (a peer resumed from twice is one
/// sender).
pub(super) fn sender(contributors: &[Peer], peer: &Peer) -> usize {
    contributors
        .iter()
        .position(|p| p.id == peer.id)
        .unwrap_or(contributors.len())
}

impl Transfer {
    async fn run(mut self, tx: mpsc::Sender<Result<Bytes, TransferError>>) {
        let mut contributors = vec![self.peer.clone()];
        let mut delivery = Delivery::new(tx, self.verify);
        let outcome = self.relay(&mut delivery, &mut contributors).await;
        if let Some(source) = self.followed
            && matches!(outcome, Outcome::Failed | Outcome::Corrupt)
        {
            self.mirror.follow_failed(self.digest, source, self.asker);
        }
        self.mirror.journal.record(super::journal::Entry {
            kind: "blob",
            key: self.digest.to_string(),
            outcome,
            peers: &contributors,
            bytes: self.pos - self.first,
            resolve: Some(self.resolve_time),
            duration: self.started.elapsed(),
            verified: (self.verify && outcome != Outcome::Abandoned)
                .then_some(outcome == Outcome::Hit),
        });
    }

    /// What the source watch goes by (see [`SourceWatch`]).
    fn source_rules(&self) -> SourceRules {
        let config = &self.mirror.config;
        SourceRules {
            stall: config.stall_timeout,
            min_speed: config.min_speed,
            parallel_peers: config.parallel_peers,
            parallel_min_size: config.parallel_min_size,
            followed: self.followed.is_some(),
        }
    }

    /// Relays the body until the end, the client leaves or no peer can
    /// deliver; says which.
    async fn relay(&mut self, delivery: &mut Delivery, contributors: &mut Vec<Peer>) -> Outcome {
        let Some(mut body) = self.body.take() else {
            delivery.fail(self.exhausted()).await;
            return Outcome::Failed;
        };
        let mut watch = SourceWatch::new(self.source_rules(), now());
        let stall = watch.stall();
        // Bytes read before the relay began go the way of any other.
        let mut first_bytes = self.first_bytes.take();
        loop {
            if watch.look_for_helper(self.first, self.pos, self.end, now())
                && let Some(room) = self.parallel_room()
                && let Some(helper) = self.candidates.next(Duration::ZERO).await
            {
                return self
                    .relay_parallel(body, helper, room, delivery, contributors)
                    .await;
            }
            let next = if let Some(data) = first_bytes.take() {
                Next::Data(data)
            } else {
                tokio::select! {
                    _ = delivery.closed() => Next::ClientGone,
                    _ = tokio::time::sleep_until(self.deadline) => {
                        delivery.fail(TransferError::Deadline { digest: self.digest }).await;
                        return Outcome::Failed;
                    }
                    frame = tokio::time::timeout(stall, body.frame()) => match frame {
                        Err(_) => Next::Switch(format!("no byte for {stall:?}")),
                        Ok(None) => Next::End,
                        Ok(Some(Err(e))) => Next::Switch(e.to_string()),
                        Ok(Some(Ok(frame))) => match frame.into_data() {
                            Ok(data) => Next::Data(data),
                            Err(_) => continue, // trailers
                        },
                    },
                }
            };
            match next {
                Next::ClientGone => {
                    tracing::debug!(digest = %self.digest, pos = self.pos, "client went away; stopping the transfer");
                    return Outcome::Abandoned;
                }
                Next::Data(data) if data.is_empty() => {}
                Next::Data(data) => {
                    let received = watch.received(data.len() as u64, self.pos, self.end, now());
                    if received == Received::Overrun {
                        // Nothing of this chunk is used; another peer resumes.
                        match self.switch(contributors, "peer sent more than asked").await {
                            Some(b) => body = b,
                            None => {
                                delivery.fail(self.exhausted()).await;
                                return Outcome::Failed;
                            }
                        }
                        watch.switched(now());
                        continue;
                    }
                    self.pos += data.len() as u64;
                    let from = sender(contributors, &self.peer);
                    if delivery.push(data, from).await.is_err() {
                        return Outcome::Abandoned;
                    }
                    // Too slow while someone else may be faster: switch.
                    if let Received::DeliverThenTryFaster { bytes } = received {
                        let reason = format!("{bytes} bytes in {stall:?}, below the minimum speed");
                        if let Some(next) = self.candidates.next_or_relookup(Duration::ZERO).await {
                            tracing::info!(digest = %self.digest, peer = %self.peer.addr, %reason, "trying a faster peer");
                            // If it cannot take over, the slow peer goes on.
                            if let Some(b) = self.resume_from(next, contributors, false).await {
                                body = b;
                                watch.switched(now());
                            }
                        } else if let Some(source) = self.followed {
                            // An in-flight blob grows no faster than its
                            // leader's registry link: leave it for another
                            // in-flight source, or end the body (the
                            // registry, which the leader reaches, serves
                            // the rest to this node's containerd).
                            tracing::info!(digest = %self.digest, peer = %self.peer.addr, %reason, "leaving a slow in-flight source");
                            match self.another_source(source, contributors).await {
                                Some(b) => {
                                    body = b;
                                    watch.switched(now());
                                }
                                None => {
                                    delivery.fail(self.exhausted()).await;
                                    return Outcome::Failed;
                                }
                            }
                        }
                    }
                }
                Next::End if self.pos == self.end => {
                    return self.finish(delivery, contributors).await;
                }
                Next::End | Next::Switch(_) => {
                    let reason = match next {
                        Next::Switch(reason) => reason,
                        _ => "body ended early".to_string(),
                    };
                    match self.switch(contributors, &reason).await {
                        Some(b) => body = b,
                        None => {
                            delivery.fail(self.exhausted()).await;
                            return Outcome::Failed;
                        }
                    }
                    watch.switched(now());
                }
            }
        }
    }

    /// Every byte was handed on: confirms the digest (when verifying) and
    /// releases the chunk held back, or withholds it and avoids the peers
    /// that sent the bytes.
    pub(super) async fn finish(
        &mut self,
        delivery: &mut Delivery,
        contributors: &[Peer],
    ) -> Outcome {
        if let Some(h) = delivery.hasher.take() {
            let Some(hashed) = h.finish().await else {
                tracing::error!(digest = %self.digest, "the hashing thread was lost; withholding the end of the body");
                delivery.fail(self.exhausted()).await;
                return Outcome::Failed;
            };
            let actual = hashed.digest;
            if actual != self.digest {
                tracing::warn!(digest = %self.digest, %actual, peers = ?contributors.iter().map(|p| p.addr).collect::<Vec<_>>(), "corrupt blob from peer; withholding the end of the body");
                // Each holder once; spans name them by their place in it.
                let mut holders: Vec<Peer> = Vec::new();
                for p in contributors.iter() {
                    if !holders.iter().any(|h| h.id == p.id) {
                        holders.push(p.clone());
                    }
                }
                let mut spans = hashed.spans;
                for span in &mut spans {
                    let id = contributors[span.sender].id;
                    span.sender = holders.iter().position(|h| h.id == id).unwrap_or(0);
                }
                blame::corrupt_transfer(
                    &self.mirror,
                    self.digest,
                    self.path.clone(),
                    holders,
                    spans,
                );
                delivery
                    .fail(TransferError::DigestMismatch {
                        digest: self.digest,
                        actual,
                    })
                    .await;
                return Outcome::Corrupt;
            }
        }
        if let Some(chunk) = delivery.held.take()
            && delivery.tx.send(Ok(chunk)).await.is_err()
        {
            return Outcome::Abandoned;
        }
        Outcome::Hit
    }

    pub(super) fn exhausted(&self) -> TransferError {
        // Before the client hears of it (containerd retries at once).
        if let Some(source) = self.followed {
            self.mirror.note_stopped(self.digest, source);
        }
        TransferError::Exhausted {
            digest: self.digest,
            pos: self.pos,
            end: self.end,
        }
    }

    /// Replaces the failed current peer with the next one that resumes; its
    /// body, or `None` when no peer could.
    async fn switch(&mut self, contributors: &mut Vec<Peer>, reason: &str) -> Option<Incoming> {
        tracing::info!(digest = %self.digest, peer = %self.peer.addr, pos = self.pos, reason, "peer failed mid-body; resuming from another");
        let budget = if let Some(source) = self.followed {
            // An in-flight source failed: the rendezvous may name another.
            // Holders are unlikely (nobody has finished the fetch), so only
            // a quick look for them follows.
            if let Some(body) = self.another_source(source, contributors).await {
                return Some(body);
            }
            self.mirror.config.resolve_timeout
        } else {
            // The body has begun: a client that is cut short may not retry
            // the rest (containerd 2.1 does not), so holders that appeared
            // since the lookup are worth waiting for, as long as a stalled
            // peer is.
            let config = &self.mirror.config;
            config.stall_timeout.max(config.resolve_timeout)
        };
        let budget = budget.min(
            self.deadline
                .saturating_duration_since(tokio::time::Instant::now()),
        );
        let give_up = tokio::time::Instant::now() + budget;
        for _ in 0..self.mirror.config.max_attempts {
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            let next = self.candidates.next_after_failure(left).await?;
            if let Some(body) = self.resume_from(next, contributors, false).await {
                return Some(body);
            }
        }
        None
    }

    /// The followed `source` is too slow: tells the rendezvous (it is never
    /// followed again for this digest) and resumes from the in-flight source
    /// it names instead, if any. `None`: there is none; the rendezvous may
    /// have handed this node the lead, which its containerd takes when it
    /// asks again.
    async fn another_source(
        &mut self,
        source: libp2p::PeerId,
        contributors: &mut Vec<Peer>,
    ) -> Option<Incoming> {
        // Reported here, not again when the transfer ends.
        self.followed = None;
        let next = self
            .mirror
            .another_source(&self.digest, source, self.asker)
            .await?;
        let id = next.id;
        let body = self.resume_from(next, contributors, true).await?;
        self.followed = Some(id);
        Some(body)
    }

    /// Asks `peer` for the rest (`Range: bytes=<pos>-<end-1>`; of its
    /// in-flight ingest when `follow`); when it answers correctly it becomes
    /// the current peer, and this is its body.
    async fn resume_from(
        &mut self,
        peer: Peer,
        contributors: &mut Vec<Peer>,
        follow: bool,
    ) -> Option<Incoming> {
        let timeouts = if follow {
            client::Timeouts {
                header: self.mirror.config.follow_header_timeout,
                ..self.mirror.timeouts()
            }
        } else {
            self.mirror.timeouts()
        };
        let range = ByteRange::FromTo {
            first: self.pos,
            last: Some(self.end - 1),
        }
        .to_string();
        let mut headers = vec![("range", range)];
        if follow {
            headers.push((peermirror_oci::FOLLOW_HEADER, "1".to_string()));
        }
        let tls = self.mirror.client_tls();
        let response = match client::request(
            peer.addr,
            Method::GET,
            &self.path,
            &headers,
            timeouts,
            tls,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(peer = %peer.addr, error = %e, "resume request failed");
                return None;
            }
        };
        let range_ok = response.status().as_u16() == 206
            && matches!(
                content_range(&response),
                Some(ContentRange::Span { first, last, .. }) if (first, last) == (self.pos, self.end - 1)
            );
        if !range_ok {
            tracing::debug!(peer = %peer.addr, status = %response.status(), "peer did not resume at the right byte");
            return None;
        }
        tracing::debug!(peer = %peer.addr, from = self.pos, "resumed");
        self.peer_upload_rate = super::header(&response, peermirror_oci::UPLOAD_RATE_HEADER)
            .and_then(|v| v.parse().ok());
        self.peer = peer.clone();
        contributors.push(peer);
        Some(response.into_body())
    }
}
