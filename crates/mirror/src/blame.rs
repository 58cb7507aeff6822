//! Telling which holder sent wrong bytes when a blob fetched from several
//! holders does not match its digest.
//!
//! While a whole blob is relayed, its hash is also taken per *span*: a run
//! of bytes from one holder (a segment, or what one peer sent before
//! another resumed). When the blob's digest does not match, every holder
//! that contributed is avoided at once, and an audit fetches the whole blob
//! again from one of them alone, hashing it over the same spans. A copy that
//! matches the digest is the truth: the holders whose spans hash
//! differently sent wrong bytes and stay avoided; the others are trusted
//! again. A holder whose own whole copy does not match is a liar too, and
//! the next one is asked.
//!
//! The first span needs no hash of its own (it is a prefix of the blob:
//! the blob's running hash gives it), so a transfer that stays on one peer
//! hashes its bytes once, as before; spans after it are hashed twice.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use tokio::sync::mpsc;

use super::{Mirror, client};
use peermirror_metrics::CorruptHolderLabels;
use peermirror_oci::{Digest, Hasher};
use peermirror_routing::Peer;
use prometheus_client::metrics::{counter::Counter, family::Family};

/// A run of bytes from one holder and their hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Span {
    pub range: Range<u64>,
    /// Who sent it (an index the caller gives, into its list of holders).
    pub sender: usize,
    pub digest: Digest,
}

/// A blob's digest and the digests of its spans.
pub(super) struct Hashed {
    pub digest: Digest,
    pub spans: Vec<Span>,
}

/// Chunks queued for the hashing thread (each at most the client's read
/// buffer, 512 KiB): bounds what a relay holds while the hash catches up.
const HASH_QUEUE: usize = 8;

/// Hashes a body on a blocking thread, beside the network I/O, as a whole
/// and per span: the chunks are shared with the client's stream (`Bytes`),
/// never copied.
pub(super) struct HashWorker {
    chunks: mpsc::Sender<(Bytes, usize)>,
    hashed: tokio::sync::oneshot::Receiver<Hashed>,
}

impl HashWorker {
    pub fn start() -> HashWorker {
        let (chunks, mut rx) = mpsc::channel::<(Bytes, usize)>(HASH_QUEUE);
        let (tx, hashed) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let mut spans = SpanHasher::default();
            while let Some((chunk, sender)) = rx.blocking_recv() {
                spans.update(&chunk, sender);
            }
            let _ = tx.send(spans.finish());
        });
        HashWorker { chunks, hashed }
    }

    /// The next bytes of the body, from `sender`.
    pub async fn update(&mut self, chunk: Bytes, sender: usize) {
        // The thread only stops when the sender is dropped.
        let _ = self.chunks.send((chunk, sender)).await;
    }

    /// The hashes of every chunk given; `None` if the thread was lost.
    pub async fn finish(self) -> Option<Hashed> {
        drop(self.chunks);
        self.hashed.await.ok()
    }
}

/// The hashing itself: a span ends where the sender changes.
#[derive(Default)]
struct SpanHasher {
    whole: Hasher,
    /// The current span's own hash; `None` for the first span (a prefix).
    span: Option<Hasher>,
    sender: Option<usize>,
    start: u64,
    pos: u64,
    spans: Vec<Span>,
}

impl SpanHasher {
    fn update(&mut self, chunk: &[u8], sender: usize) {
        if self.sender.is_some_and(|s| s != sender) {
            self.close_span();
            self.span = Some(Hasher::new());
        }
        self.sender = Some(sender);
        self.whole.update(chunk);
        if let Some(span) = &mut self.span {
            span.update(chunk);
        }
        self.pos += chunk.len() as u64;
    }

    fn close_span(&mut self) {
        let Some(sender) = self.sender else { return };
        let digest = match self.span.take() {
            Some(span) => span.finish(),
            None => self.whole.clone().finish(),
        };
        self.spans.push(Span {
            range: self.start..self.pos,
            sender,
            digest,
        });
        self.start = self.pos;
    }

    fn finish(mut self) -> Hashed {
        self.close_span();
        Hashed {
            digest: self.whole.finish(),
            spans: self.spans,
        }
    }
}

/// What an audit found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Verdict {
    /// Holders that sent wrong bytes (indices of the transfer's holders).
    pub liars: Vec<usize>,
    /// Holders shown to have sent only right bytes.
    pub honest: Vec<usize>,
}

/// Compares the spans of a corrupt transfer with those of a copy that
/// matched the digest: whoever sent a span that hashes differently lied.
fn judge(corrupt: &[Span], truth: &[Span], holders: usize) -> Verdict {
    let mut liar = vec![false; holders];
    for (sent, right) in corrupt.iter().zip(truth) {
        if sent.range != right.range || sent.digest != right.digest {
            liar[sent.sender] = true;
        }
    }
    let senders: Vec<usize> = {
        let mut s: Vec<usize> = corrupt.iter().map(|s| s.sender).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    Verdict {
        liars: senders.iter().copied().filter(|&i| liar[i]).collect(),
        honest: senders.into_iter().filter(|&i| !liar[i]).collect(),
    }
}

/// Audits running at once, on any blob (each costs a blob's download).
const AUDITS_AT_ONCE: usize = 1;

/// Tracks running audits (one at a time, one per blob) and counts verdicts.
#[derive(Default)]
pub(super) struct Audits {
    running: std::sync::Mutex<std::collections::HashSet<Digest>>,
    pub counter: std::sync::OnceLock<Family<CorruptHolderLabels, Counter>>,
}

impl Audits {
    fn count(&self, verdict: &'static str, holders: usize) {
        if let Some(c) = self.counter.get() {
            c.get_or_create(&CorruptHolderLabels { verdict })
                .inc_by(holders as u64);
        }
    }

    fn begin(&self, digest: Digest) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.len() < AUDITS_AT_ONCE && running.insert(digest)
    }

    fn end(&self, digest: &Digest) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.remove(digest);
    }
}

/// A transfer of `digest` from `holders` (each one once) did not match its
/// digest; `spans` are what it hashed. Every holder is avoided at once; the
/// audit (in the background) trusts again those it clears.
pub(super) fn corrupt_transfer(
    mirror: &Arc<Mirror>,
    digest: Digest,
    path: String,
    holders: Vec<Peer>,
    spans: Vec<Span>,
) {
    for peer in &holders {
        mirror.mark_bad(&digest, peer);
    }
    if holders.len() < 2 {
        mirror.audits.count("liar", holders.len()); // Only one could have lied.
        return;
    }
    if !mirror.audits.begin(digest) {
        tracing::info!(%digest, "another audit is running; every holder of the corrupt copy stays avoided");
        return;
    }
    let mirror = mirror.clone();
    tokio::spawn(async move {
        let deadline = mirror.config.total_timeout;
        let verdict =
            tokio::time::timeout(deadline, audit(&mirror, digest, &path, &holders, &spans))
                .await
                .unwrap_or_else(|_| {
                    tracing::info!(%digest, "the audit of a corrupt copy ran out of time");
                    Verdict::default()
                });
        for &i in &verdict.honest {
            mirror.trust_again(&digest, &holders[i]);
        }
        mirror.audits.count("liar", verdict.liars.len());
        mirror.audits.count("cleared", verdict.honest.len());
        let liars: Vec<_> = verdict.liars.iter().map(|&i| holders[i].addr).collect();
        let honest: Vec<_> = verdict.honest.iter().map(|&i| holders[i].addr).collect();
        tracing::warn!(%digest, ?liars, ?honest, "audit of a corrupt copy: only the holders that sent wrong bytes stay avoided");
        mirror.audits.end(&digest);
    });
}

/// Fetches the blob from each holder alone until one copy matches the
/// digest, and judges the spans against it.
async fn audit(
    mirror: &Arc<Mirror>,
    digest: Digest,
    path: &str,
    holders: &[Peer],
    spans: &[Span],
) -> Verdict {
    let mut own_copy_wrong = Vec::new();
    for (i, holder) in holders.iter().enumerate() {
        match whole_copy(mirror, holder, path, spans).await {
            Ok(copy) if copy.digest == digest => {
                let mut verdict = judge(spans, &copy.spans, holders.len());
                verdict.honest.retain(|h| !own_copy_wrong.contains(h));
                for liar in own_copy_wrong {
                    if !verdict.liars.contains(&liar) {
                        verdict.liars.push(liar);
                    }
                }
                return verdict;
            }
            Ok(copy) => {
                tracing::info!(%digest, peer = %holder.addr, actual = %copy.digest, "audit: the holder's own copy is wrong too");
                own_copy_wrong.push(i);
            }
            Err(reason) => {
                tracing::debug!(%digest, peer = %holder.addr, %reason, "audit: no copy from this holder");
            }
        }
    }
    // No copy matched: nobody is cleared.
    Verdict {
        liars: own_copy_wrong,
        honest: Vec::new(),
    }
}

/// The whole blob from `holder`, hashed over the spans of `spans`.
async fn whole_copy(
    mirror: &Mirror,
    holder: &Peer,
    path: &str,
    spans: &[Span],
) -> Result<Hashed, String> {
    let size = spans.last().map_or(0, |s| s.range.end);
    let response = client::request(
        holder.addr,
        Method::GET,
        path,
        &[],
        mirror.timeouts(),
        mirror.client_tls(),
    )
    .await
    .map_err(|e| e.to_string())?;
    if response.status().as_u16() != 200 {
        return Err(format!("answered {}", response.status()));
    }
    let mut body = response.into_body();
    let stall = mirror.config.stall_timeout;
    let mut hasher = HashWorker::start();
    let mut pos = 0u64;
    let mut span = 0usize;
    while let Some(frame) = tokio::time::timeout(stall, body.frame())
        .await
        .map_err(|_| format!("no byte for {stall:?}"))?
    {
        let Ok(mut data) = frame.map_err(|e| e.to_string())?.into_data() else {
            continue; // trailers
        };
        if pos + data.len() as u64 > size {
            return Err("longer than the blob".to_string());
        }
        // Cut at the span ends, so that the copy's spans are the same.
        while !data.is_empty() {
            while spans[span].range.end <= pos {
                span += 1;
            }
            let take = data.len().min((spans[span].range.end - pos) as usize);
            hasher.update(data.split_to(take), span).await;
            pos += take as u64;
        }
    }
    if pos != size {
        return Err(format!("ended at byte {pos} of {size}"));
    }
    let mut hashed = hasher.finish().await.ok_or("the hashing thread was lost")?;
    // Spans are labelled by their index here; give them their senders back.
    for (copy, sent) in hashed.spans.iter_mut().zip(spans) {
        copy.sender = sent.sender;
    }
    Ok(hashed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(chunks: &[(&[u8], usize)]) -> Hashed {
        let mut h = SpanHasher::default();
        for (bytes, sender) in chunks {
            h.update(bytes, *sender);
        }
        h.finish()
    }

    #[test]
    fn spans_end_where_the_sender_changes() {
        let h = hash(&[(b"aa", 0), (b"a", 0), (b"bbbb", 1), (b"cc", 0)]);
        assert_eq!(h.digest, Digest::of(b"aaabbbbcc"));
        let got: Vec<_> = h
            .spans
            .iter()
            .map(|s| (s.range.clone(), s.sender, s.digest))
            .collect();
        assert_eq!(
            got,
            vec![
                (0..3, 0, Digest::of(b"aaa")),
                (3..7, 1, Digest::of(b"bbbb")),
                (7..9, 0, Digest::of(b"cc")),
            ]
        );
        // One sender: one span, the whole blob.
        let one = hash(&[(b"ab", 3), (b"c", 3)]);
        assert_eq!(one.spans.len(), 1);
        assert_eq!(one.spans[0].digest, Digest::of(b"abc"));
    }

    #[test]
    fn only_the_senders_of_wrong_spans_are_liars() {
        let sent = hash(&[(b"aaa", 0), (b"bXbb", 1), (b"cc", 2), (b"dd", 1)]);
        let truth = hash(&[(b"aaa", 0), (b"bbbb", 1), (b"cc", 2), (b"dd", 3)]);
        let verdict = judge(&sent.spans, &truth.spans, 3);
        assert_eq!(
            verdict,
            Verdict {
                liars: vec![1],
                honest: vec![0, 2],
            }
        );
    }
}
