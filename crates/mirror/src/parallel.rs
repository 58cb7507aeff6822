//! Fetching the rest of a large blob from several holders at once.
//!
//! Once several nodes hold a large blob, a node that relays it asks them
//! side by side: the remaining bytes are cut into segments, and each holder
//! fetches segment after segment with `Range` over its own keep-alive
//! connection. The relay puts the bytes back in order, hashes them as one
//! blob and holds the last chunk back until the digest matches, exactly as
//! for a single peer.
//!
//! - One task, the relay, makes every decision: which segment goes to which
//!   holder, who is too slow, who is retired. A worker only fetches what it
//!   is given and reports what it receives.
//! - The next segment goes to whichever holder finished one: a faster holder
//!   fetches more of the blob.
//! - Holders say how much they upload to other hosts
//!   ([`UPLOAD_RATE_HEADER`], from their dataplane's per-peer counters). A
//!   holder that uploads much more than another one working on this blob is
//!   retired after its segment, so busy holders are used less.
//! - Memory is bounded: a segment is handed out only within a window of
//!   bytes after the first byte not yet sent to the client.
//! - A holder that fails, stalls or is slower than the minimum speed gives
//!   its unfinished span back; another holder takes it. When none is left,
//!   the client's body ends short, as with one peer.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::client::{Connection, Timeouts};
use super::journal::Outcome;
use super::transfer::{Delivery, Transfer, TransferError};
use super::{content_range, header};
use peermirror_oci::{ByteRange, ContentRange, UPLOAD_RATE_HEADER};
use peermirror_routing::Peer;

/// Bytes one request asks one holder for.
pub(super) const SEGMENT: u64 = 4 << 20;
/// Uploads to other hosts (bytes per second) below which no holder counts
/// as busy.
const BUSY_FLOOR: u64 = 32 << 20;
/// How long a segment runs before its holder's speed is compared with
/// another's.
const JUDGE_AFTER: Duration = Duration::from_millis(100);

/// What a worker tells the relay.
enum Event {
    /// A response head arrived, with what the holder says it uploads.
    Head {
        worker: usize,
        upload_rate: Option<u64>,
    },
    /// The next bytes of the worker's segment, at `offset`.
    Data {
        worker: usize,
        offset: u64,
        bytes: Bytes,
    },
    /// The worker's segment is complete; it waits for the next one.
    SegmentDone { worker: usize },
    /// The worker stopped: its holder failed.
    Failed { worker: usize, reason: String },
}

/// The relay's view of one worker.
struct Slot {
    peer: Peer,
    /// Where its next segment is sent; `None` once retired (the worker ends
    /// when it sees the channel closed).
    segments: Option<mpsc::Sender<Range<u64>>>,
    task: AbortHandle,
    /// The segment it fetches, and the next byte of it expected.
    current: Option<Range<u64>>,
    pos: u64,
    /// Whether it failed or was stopped (its late events are ignored).
    dead: bool,
    /// What the holder said it uploads to other hosts, bytes per second.
    upload_rate: Option<u64>,
    /// When its current segment was handed out.
    segment_started: Instant,
    /// Bytes per second of its last complete segment: its upload to us.
    our_rate: u64,
    /// Bytes received since the last speed check.
    window_bytes: u64,
    /// Whether it delivered any byte (a contributor to the blob).
    contributed: bool,
}

impl Slot {
    fn working(&self) -> bool {
        !self.dead && self.segments.is_some()
    }

    /// What the holder uploads to hosts other than this one.
    fn load_from_others(&self) -> u64 {
        self.upload_rate.unwrap_or(0).saturating_sub(self.our_rate)
    }
}

/// The spans nobody fetches yet, by first byte.
#[derive(Debug, Default)]
struct Todo(BTreeMap<u64, u64>);

impl Todo {
    fn give_back(&mut self, span: Range<u64>) {
        if span.start < span.end {
            self.0.insert(span.start, span.end);
        }
    }

    /// The lowest unfetched segment, if it starts before `limit`.
    fn take(&mut self, limit: u64) -> Option<Range<u64>> {
        let (&start, &end) = self.0.iter().next()?;
        if start >= limit {
            return None;
        }
        self.0.remove(&start);
        let cut = end.min(start + SEGMENT);
        self.give_back(cut..end);
        Some(start..cut)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a worker needs to fetch from its holder.
struct Worker {
    id: usize,
    peer: Peer,
    path: String,
    timeouts: Timeouts,
    stall: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    events: mpsc::Sender<Event>,
}

impl Worker {
    /// Fetches the segments it is given until the relay stops sending them.
    /// `first`: a body already streaming from the segment's first byte
    /// (the transfer's first peer); it is dropped at the segment's end.
    async fn run(
        self,
        mut first: Option<(Incoming, Range<u64>)>,
        mut segments: mpsc::Receiver<Range<u64>>,
    ) {
        let mut connection: Option<Connection> = None;
        loop {
            let (body, segment, reusable) = match first.take() {
                Some((body, segment)) => (body, segment, false),
                None => {
                    let Some(segment) = segments.recv().await else {
                        return;
                    };
                    match self.request(&mut connection, &segment).await {
                        Ok(body) => (body, segment, true),
                        Err(reason) => return self.fail(reason).await,
                    }
                }
            };
            match self.receive(body, &segment).await {
                Ok(mut body) if reusable => {
                    // The end of the body lets the connection carry the next
                    // request.
                    if !matches!(
                        tokio::time::timeout(self.stall, body.frame()).await,
                        Ok(None)
                    ) {
                        connection = None;
                    }
                }
                Ok(_) => connection = None,
                Err(reason) => return self.fail(reason).await,
            }
            if self
                .events
                .send(Event::SegmentDone { worker: self.id })
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn fail(&self, reason: String) {
        let _ = self
            .events
            .send(Event::Failed {
                worker: self.id,
                reason,
            })
            .await;
    }

    /// Asks the holder for `segment` and checks that the answer is exactly it.
    async fn request(
        &self,
        connection: &mut Option<Connection>,
        segment: &Range<u64>,
    ) -> Result<Incoming, String> {
        let addr = self.peer.addr;
        let range = ByteRange::FromTo {
            first: segment.start,
            last: Some(segment.end - 1),
        }
        .to_string();
        let headers = [("range", range)];
        // A kept connection may have been closed by the holder meanwhile
        // (servers close idle ones): then once more on a new one.
        let response = loop {
            let reused = connection.is_some();
            let conn = match connection {
                Some(c) => c,
                None => connection.insert(
                    Connection::open(addr, self.timeouts, self.tls.clone())
                        .await
                        .map_err(|e| e.to_string())?,
                ),
            };
            match conn
                .send(Method::GET, &self.path, &headers, self.timeouts.header)
                .await
            {
                Ok(r) => break r,
                Err(e) => {
                    *connection = None;
                    if !reused {
                        return Err(e.to_string());
                    }
                }
            }
        };
        let exact = response.status().as_u16() == 206
            && header(&response, "content-length").and_then(|v| v.parse::<u64>().ok())
                == Some(segment.end - segment.start)
            && matches!(
                content_range(&response),
                Some(ContentRange::Span { first, last, .. })
                    if (first, last) == (segment.start, segment.end - 1)
            );
        if !exact {
            *connection = None;
            return Err(format!(
                "{} answered {} for bytes {}..{}",
                addr,
                response.status(),
                segment.start,
                segment.end
            ));
        }
        let upload_rate = header(&response, UPLOAD_RATE_HEADER).and_then(|v| v.parse().ok());
        self.events
            .send(Event::Head {
                worker: self.id,
                upload_rate,
            })
            .await
            .map_err(|_| "the relay stopped".to_string())?;
        Ok(response.into_body())
    }

    /// Reads `segment` from `body` (which starts at its first byte) and hands
    /// it to the relay; the body, positioned after the segment.
    async fn receive(&self, mut body: Incoming, segment: &Range<u64>) -> Result<Incoming, String> {
        let mut pos = segment.start;
        while pos < segment.end {
            let frame = tokio::time::timeout(self.stall, body.frame())
                .await
                .map_err(|_| format!("no byte for {:?}", self.stall))?;
            let data = match frame {
                None => return Err("body ended early".to_string()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers
                },
            };
            // A body that goes on past the segment (the first peer's) is cut.
            let take = data.len().min((segment.end - pos) as usize);
            if take == 0 {
                continue;
            }
            self.events
                .send(Event::Data {
                    worker: self.id,
                    offset: pos,
                    bytes: data.slice(..take),
                })
                .await
                .map_err(|_| "the relay stopped".to_string())?;
            pos += take as u64;
        }
        Ok(body)
    }
}

/// The relay's state while several holders fetch.
struct Fetch {
    slots: Vec<Slot>,
    tasks: JoinSet<()>,
    events: mpsc::Sender<Event>,
    todo: Todo,
    /// Bytes received ahead of the next byte to send, by offset.
    ready: BTreeMap<u64, Bytes>,
    /// How far past the next byte to send segments are handed out.
    window: u64,
    /// Workers that may still be started (bounds the holders tried).
    spawns_left: usize,
}

impl Fetch {
    fn working(&self) -> usize {
        self.slots.iter().filter(|s| s.working()).count()
    }

    fn spawn(&mut self, transfer: &Transfer, peer: Peer, first: Option<(Incoming, Range<u64>)>) {
        let id = self.slots.len();
        let (segments, receiver) = mpsc::channel(1);
        let worker = Worker {
            id,
            peer: peer.clone(),
            path: transfer.path.clone(),
            timeouts: transfer.mirror.timeouts(),
            stall: transfer.mirror.config.stall_timeout,
            tls: transfer.mirror.client_tls(),
            events: self.events.clone(),
        };
        let current = first.as_ref().map(|(_, segment)| segment.clone());
        let pos = current.as_ref().map_or(0, |s| s.start);
        let task = self.tasks.spawn(worker.run(first, receiver));
        self.slots.push(Slot {
            peer,
            segments: Some(segments),
            task,
            current,
            pos,
            dead: false,
            upload_rate: None,
            segment_started: Instant::now(),
            our_rate: 0,
            window_bytes: 0,
            contributed: false,
        });
        self.spawns_left = self.spawns_left.saturating_sub(1);
    }

    /// Stops a worker and gives its unfinished span back.
    fn stop(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.dead {
            return;
        }
        slot.dead = true;
        slot.segments = None;
        slot.task.abort();
        if let Some(segment) = slot.current.take() {
            self.todo.give_back(slot.pos..segment.end);
        }
    }

    /// Hands a segment to every idle worker, within the window after `next`
    /// (the next byte to send).
    fn assign(&mut self, next: u64) {
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if !slot.working() || slot.current.is_some() {
                continue;
            }
            let Some(segment) = self.todo.take(next.saturating_add(self.window)) else {
                return;
            };
            let slot = &mut self.slots[i];
            let sent = slot
                .segments
                .as_ref()
                .is_some_and(|s| s.try_send(segment.clone()).is_ok());
            if sent {
                slot.pos = segment.start;
                slot.current = Some(segment);
                slot.segment_started = Instant::now();
            } else {
                // The worker is gone (its failure is on its way).
                self.todo.give_back(segment);
            }
        }
    }

    /// The worker that holds back the client's body (its segment holds
    /// `next`, the next byte to send) while an idle worker has been more
    /// than twice as fast: the idle one should take the rest of that
    /// segment. Otherwise a slow holder would stall the others behind the
    /// window, and the end of the blob would wait for it.
    fn straggler(&self, next: u64) -> Option<usize> {
        let fastest_idle = self
            .slots
            .iter()
            .filter(|s| s.working() && s.current.is_none())
            .map(|s| s.our_rate)
            .max()?;
        let (i, slot) = self.slots.iter().enumerate().find(|(_, s)| {
            !s.dead
                && s.current
                    .as_ref()
                    .is_some_and(|c| c.start <= next && next < c.end)
        })?;
        let started = slot.current.as_ref().map_or(slot.pos, |c| c.start);
        let elapsed = slot.segment_started.elapsed();
        if elapsed < JUDGE_AFTER {
            return None;
        }
        let rate = ((slot.pos - started) as f64 / elapsed.as_secs_f64()) as u64;
        (fastest_idle > rate.saturating_mul(2)).then_some(i)
    }

    /// Whether worker `i`'s holder uploads much more to other hosts than
    /// another holder working on this blob.
    fn busy(&self, i: usize) -> bool {
        let load = self.slots[i].load_from_others();
        let least = self
            .slots
            .iter()
            .enumerate()
            .filter(|(j, s)| *j != i && s.working())
            .map(|(_, s)| s.load_from_others())
            .min();
        match least {
            Some(least) => load > BUSY_FLOOR && load > least.saturating_mul(2),
            None => false,
        }
    }
}

impl Transfer {
    /// Relays the rest of the blob from several holders: the current peer,
    /// whose `body` streams from `self.pos`, and `helper`, then others as
    /// the lookup finds them, up to the configured number.
    pub(super) async fn relay_parallel(
        &mut self,
        body: Incoming,
        helper: Peer,
        delivery: &mut Delivery,
        contributors: &mut Vec<Peer>,
    ) -> Outcome {
        let config = self.mirror.config.clone();
        let peers = config.parallel_peers.max(2);
        let (events, mut inbox) = mpsc::channel(2 * peers);
        let mut fetch = Fetch {
            slots: Vec::new(),
            tasks: JoinSet::new(),
            events,
            todo: Todo::default(),
            ready: BTreeMap::new(),
            window: SEGMENT * (peers as u64 + 1),
            spawns_left: peers + config.max_attempts,
        };
        tracing::info!(digest = %self.digest, first = %self.peer.addr, helper = %helper.addr, from = self.pos, end = self.end, "fetching from several holders at once");
        // The current peer finishes its first segment from the body it sends.
        let first_cut = self.end.min(self.pos + SEGMENT);
        fetch.todo.give_back(first_cut..self.end);
        fetch.spawn(self, self.peer.clone(), Some((body, self.pos..first_cut)));
        // Its bytes so far are in the client's body already.
        fetch.slots[0].contributed = true;
        fetch.slots[0].upload_rate = self.peer_upload_rate;
        fetch.spawn(self, helper, None);

        let stall = config.stall_timeout;
        let min_window_bytes = (config.min_speed as f64 * stall.as_secs_f64()) as u64;
        let mut speed_check = tokio::time::interval(stall);
        speed_check.reset();
        loop {
            fetch.assign(self.pos);
            if let Some(slow) = fetch.straggler(self.pos) {
                let slot = &fetch.slots[slow];
                tracing::info!(digest = %self.digest, peer = %slot.peer.addr, pos = slot.pos, "holder much slower than another; the faster one takes its bytes");
                fetch.stop(slow);
                fetch.assign(self.pos);
            }
            if self.pos == self.end {
                return self.finish(delivery, contributors).await;
            }
            if fetch.working() == 0 && !self.recruit(&mut fetch, true).await {
                delivery.fail(self.exhausted()).await;
                return Outcome::Failed;
            }
            let event = tokio::select! {
                _ = delivery.closed() => {
                    tracing::debug!(digest = %self.digest, pos = self.pos, "client went away; stopping the transfer");
                    return Outcome::Abandoned;
                }
                _ = tokio::time::sleep_until(self.deadline) => {
                    delivery.fail(TransferError::Deadline { digest: self.digest }).await;
                    return Outcome::Failed;
                }
                _ = speed_check.tick() => {
                    self.check_speeds(&mut fetch, min_window_bytes).await;
                    continue;
                }
                event = inbox.recv() => match event {
                    Some(event) => event,
                    // `fetch` holds a sender: never closed while it lives.
                    None => continue,
                },
            };
            match event {
                Event::Head {
                    worker,
                    upload_rate,
                } => fetch.slots[worker].upload_rate = upload_rate,
                Event::Data {
                    worker,
                    offset,
                    bytes,
                } => {
                    let slot = &mut fetch.slots[worker];
                    if slot.dead {
                        continue;
                    }
                    if offset != slot.pos || slot.current.is_none() {
                        // Cannot happen with an honest worker; never mix
                        // bytes whose place is in doubt.
                        tracing::warn!(peer = %slot.peer.addr, offset, expected = slot.pos, "segment bytes out of place; dropping the holder");
                        fetch.stop(worker);
                        continue;
                    }
                    slot.pos += bytes.len() as u64;
                    slot.window_bytes += bytes.len() as u64;
                    if !slot.contributed {
                        slot.contributed = true;
                        contributors.push(slot.peer.clone());
                    }
                    fetch.ready.insert(offset, bytes);
                    while let Some(bytes) = fetch.ready.remove(&self.pos) {
                        self.pos += bytes.len() as u64;
                        if delivery.push(bytes).await.is_err() {
                            return Outcome::Abandoned;
                        }
                    }
                }
                Event::SegmentDone { worker } => {
                    let slot = &mut fetch.slots[worker];
                    if let Some(segment) = slot.current.take() {
                        let secs = slot.segment_started.elapsed().as_secs_f64().max(1e-6);
                        slot.our_rate = ((segment.end - segment.start) as f64 / secs) as u64;
                    }
                    if fetch.busy(worker) {
                        let slot = &mut fetch.slots[worker];
                        tracing::debug!(peer = %slot.peer.addr, upload_rate = ?slot.upload_rate, "holder is busy uploading to others; using it less");
                        slot.segments = None;
                    }
                    if fetch.working() < peers && !fetch.todo.is_empty() {
                        self.recruit(&mut fetch, false).await;
                    }
                }
                Event::Failed { worker, reason } => {
                    let slot = &fetch.slots[worker];
                    if !slot.dead {
                        tracing::info!(digest = %self.digest, peer = %slot.peer.addr, pos = slot.pos, %reason, "holder failed mid-segment; another takes its bytes");
                        fetch.stop(worker);
                    }
                }
            }
        }
    }

    /// Starts a worker on the next holder the lookup knows. `wait`: no
    /// worker is left, so wait a little for one (as a one-peer transfer
    /// does when its peer fails).
    async fn recruit(&mut self, fetch: &mut Fetch, wait: bool) -> bool {
        let patience = if wait {
            self.mirror
                .config
                .resolve_timeout
                .max(Duration::from_millis(100))
        } else {
            Duration::ZERO
        };
        while fetch.spawns_left > 0 {
            let Some(peer) = self.candidates.next_or_relookup(patience).await else {
                break;
            };
            if fetch
                .slots
                .iter()
                .any(|s| s.peer.id == peer.id && s.working())
            {
                continue;
            }
            fetch.spawn(self, peer, None);
            return true;
        }
        // Nobody else: a holder retired for being busy is better than none.
        if wait
            && let Some(i) = fetch
                .slots
                .iter()
                .position(|s| !s.dead && s.segments.is_none())
        {
            fetch.slots[i].dead = true;
            let peer = fetch.slots[i].peer.clone();
            fetch.spawn(self, peer, None);
            return true;
        }
        false
    }

    /// Stops workers that delivered less than the minimum speed since the
    /// last check, while another holder can take their bytes.
    async fn check_speeds(&mut self, fetch: &mut Fetch, min_window_bytes: u64) {
        let slow: Vec<usize> = (0..fetch.slots.len())
            .filter(|&i| {
                let s = &fetch.slots[i];
                s.working() && s.current.is_some() && s.window_bytes < min_window_bytes
            })
            .collect();
        for i in slow {
            let others = fetch.working() > 1;
            if others || self.recruit(fetch, false).await {
                let slot = &fetch.slots[i];
                tracing::info!(digest = %self.digest, peer = %slot.peer.addr, bytes = slot.window_bytes, "holder below the minimum speed; another takes its bytes");
                fetch.stop(i);
            }
        }
        for slot in &mut fetch.slots {
            slot.window_bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn todo_hands_out_segments_in_order_within_the_limit() {
        let mut todo = Todo::default();
        todo.give_back(0..10 * SEGMENT + 5);
        assert_eq!(todo.take(u64::MAX), Some(0..SEGMENT));
        assert_eq!(todo.take(SEGMENT), None, "beyond the window");
        assert_eq!(todo.take(SEGMENT + 1), Some(SEGMENT..2 * SEGMENT));
        // A span given back goes first.
        todo.give_back(100..SEGMENT);
        assert_eq!(todo.take(u64::MAX), Some(100..SEGMENT));
        let mut last = 0;
        while let Some(s) = todo.take(u64::MAX) {
            assert!(s.start >= last && s.end - s.start <= SEGMENT);
            last = s.end;
        }
        assert_eq!(last, 10 * SEGMENT + 5);
        assert!(todo.is_empty());
        todo.give_back(7..7);
        assert!(todo.is_empty(), "an empty span is nothing to fetch");
    }
}
