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
use super::{Candidates, Mirror, client, content_range};
use crate::oci::{ByteRange, ContentRange, Digest, Hasher};
use crate::routing::Peer;

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
    pub body: Incoming,
    pub candidates: Candidates,
    pub deadline: tokio::time::Instant,
    /// The source this transfer follows (an in-flight blob on a peer the
    /// fan-out rendezvous named), if it does.
    pub followed: Option<libp2p::PeerId>,
}

/// Chunks queued for the hashing thread (each at most the client's read
/// buffer, 512 KiB): bounds what a relay holds while the hash catches up.
const HASH_QUEUE: usize = 8;

/// Hashes a relayed blob on a blocking thread, beside the network I/O: the
/// chunks are shared with the client's stream (`Bytes`), never copied, and
/// the relay waits for the hash only for the last chunk it holds back.
struct HashWorker {
    chunks: mpsc::Sender<Bytes>,
    digest: tokio::sync::oneshot::Receiver<Digest>,
}

impl HashWorker {
    fn start() -> HashWorker {
        let (chunks, mut rx) = mpsc::channel::<Bytes>(HASH_QUEUE);
        let (tx, digest) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let mut hasher = Hasher::new();
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
            }
            let _ = tx.send(hasher.finish());
        });
        HashWorker { chunks, digest }
    }

    async fn update(&mut self, chunk: Bytes) {
        // The thread only stops when the sender is dropped.
        let _ = self.chunks.send(chunk).await;
    }

    /// The digest of every chunk given; `None` if the thread was lost.
    async fn finish(self) -> Option<Digest> {
        drop(self.chunks);
        self.digest.await.ok()
    }
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

impl Transfer {
    async fn run(mut self, tx: mpsc::Sender<Result<Bytes, TransferError>>) {
        let mut contributors = vec![self.peer.clone()];
        let outcome = self.relay(&tx, &mut contributors).await;
        if let Some(source) = self.followed
            && matches!(outcome, Outcome::Failed | Outcome::Corrupt)
        {
            self.mirror.follow_failed(self.digest, source);
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

    /// Relays the body to `tx` until the end, the client leaves or no peer
    /// can deliver; says which.
    async fn relay(
        &mut self,
        tx: &mpsc::Sender<Result<Bytes, TransferError>>,
        contributors: &mut Vec<Peer>,
    ) -> Outcome {
        let stall = self.mirror.config.stall_timeout;
        let min_window_bytes = (self.mirror.config.min_speed as f64 * stall.as_secs_f64()) as u64;
        let mut hasher = self.verify.then(HashWorker::start);
        let mut held: Option<Bytes> = None;
        let mut window_start = tokio::time::Instant::now();
        let mut window_bytes = 0u64;
        loop {
            let next = tokio::select! {
                _ = tx.closed() => Next::ClientGone,
                _ = tokio::time::sleep_until(self.deadline) => {
                    let _ = tx.send(Err(TransferError::Deadline { digest: self.digest })).await;
                    return Outcome::Failed;
                }
                frame = tokio::time::timeout(stall, self.body.frame()) => match frame {
                    Err(_) => Next::Switch(format!("no byte for {stall:?}")),
                    Ok(None) => Next::End,
                    Ok(Some(Err(e))) => Next::Switch(e.to_string()),
                    Ok(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => Next::Data(data),
                        Err(_) => continue, // trailers
                    },
                },
            };
            match next {
                Next::ClientGone => {
                    tracing::debug!(digest = %self.digest, pos = self.pos, "client went away; stopping the transfer");
                    return Outcome::Abandoned;
                }
                Next::Data(data) if data.is_empty() => {}
                Next::Data(data) => {
                    let room = self.end - self.pos;
                    if data.len() as u64 > room {
                        // Nothing of this chunk is used; another peer resumes.
                        if !self.switch(contributors, "peer sent more than asked").await {
                            let _ = tx.send(Err(self.exhausted())).await;
                            return Outcome::Failed;
                        }
                        continue;
                    }
                    self.pos += data.len() as u64;
                    window_bytes += data.len() as u64;
                    let to_send = match &mut hasher {
                        Some(h) => {
                            h.update(data.clone()).await;
                            held.replace(data)
                        }
                        None => Some(data),
                    };
                    if let Some(chunk) = to_send
                        && tx.send(Ok(chunk)).await.is_err()
                    {
                        return Outcome::Abandoned;
                    }
                    // Too slow while someone else may be faster: switch.
                    if window_start.elapsed() >= stall {
                        if window_bytes < min_window_bytes && self.pos < self.end {
                            let reason = format!(
                                "{window_bytes} bytes in {stall:?}, below the minimum speed"
                            );
                            if let Some(next) =
                                self.candidates.next_or_relookup(Duration::ZERO).await
                            {
                                tracing::info!(digest = %self.digest, peer = %self.peer.addr, %reason, "trying a faster peer");
                                // If it cannot take over, the slow peer goes on.
                                self.resume_from(next, contributors).await;
                            }
                        }
                        window_start = tokio::time::Instant::now();
                        window_bytes = 0;
                    }
                }
                Next::End if self.pos == self.end => {
                    if let Some(h) = hasher.take() {
                        let Some(actual) = h.finish().await else {
                            tracing::error!(digest = %self.digest, "the hashing thread was lost; withholding the end of the body");
                            let _ = tx.send(Err(self.exhausted())).await;
                            return Outcome::Failed;
                        };
                        if actual != self.digest {
                            tracing::warn!(digest = %self.digest, %actual, peers = ?contributors.iter().map(|p| p.addr).collect::<Vec<_>>(), "corrupt blob from peer; withholding the end of the body");
                            for p in contributors.iter() {
                                self.mirror.mark_bad(&self.digest, p);
                            }
                            let _ = tx
                                .send(Err(TransferError::DigestMismatch {
                                    digest: self.digest,
                                    actual,
                                }))
                                .await;
                            return Outcome::Corrupt;
                        }
                    }
                    if let Some(chunk) = held.take()
                        && tx.send(Ok(chunk)).await.is_err()
                    {
                        return Outcome::Abandoned;
                    }
                    return Outcome::Hit;
                }
                Next::End => {
                    if !self.switch(contributors, "body ended early").await {
                        let _ = tx.send(Err(self.exhausted())).await;
                        return Outcome::Failed;
                    }
                    window_start = tokio::time::Instant::now();
                    window_bytes = 0;
                }
                Next::Switch(reason) => {
                    if !self.switch(contributors, &reason).await {
                        let _ = tx.send(Err(self.exhausted())).await;
                        return Outcome::Failed;
                    }
                    window_start = tokio::time::Instant::now();
                    window_bytes = 0;
                }
            }
        }
    }

    fn exhausted(&self) -> TransferError {
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

    /// Replaces the failed current peer with the next one that resumes.
    async fn switch(&mut self, contributors: &mut Vec<Peer>, reason: &str) -> bool {
        tracing::info!(digest = %self.digest, peer = %self.peer.addr, pos = self.pos, reason, "peer failed mid-body; resuming from another");
        let wait = self
            .mirror
            .config
            .resolve_timeout
            .max(Duration::from_millis(100));
        for _ in 0..self.mirror.config.max_attempts {
            let Some(next) = self.candidates.next_or_relookup(wait).await else {
                return false;
            };
            if self.resume_from(next, contributors).await {
                return true;
            }
        }
        false
    }

    /// Asks `peer` for the rest (`Range: bytes=<pos>-<end-1>`) and makes it
    /// the current peer if it answers correctly.
    async fn resume_from(&mut self, peer: Peer, contributors: &mut Vec<Peer>) -> bool {
        let timeouts = self.mirror.timeouts();
        let range = ByteRange::FromTo {
            first: self.pos,
            last: Some(self.end - 1),
        }
        .to_string();
        let tls = self.mirror.client_tls();
        let response = match client::request(
            peer.addr,
            Method::GET,
            &self.path,
            &[("range", range)],
            timeouts,
            tls,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(peer = %peer.addr, error = %e, "resume request failed");
                return false;
            }
        };
        let range_ok = response.status().as_u16() == 206
            && matches!(
                content_range(&response),
                Some(ContentRange::Span { first, last, .. }) if (first, last) == (self.pos, self.end - 1)
            );
        if !range_ok {
            tracing::debug!(peer = %peer.addr, status = %response.status(), "peer did not resume at the right byte");
            return false;
        }
        tracing::debug!(peer = %peer.addr, from = self.pos, "resumed");
        self.body = response.into_body();
        self.peer = peer.clone();
        contributors.push(peer);
        true
    }
}
