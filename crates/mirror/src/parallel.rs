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
use super::transfer::{Delivery, Transfer, TransferError, sender};
use super::{content_range, header};
use peermirror_oci::{ByteRange, ContentRange, UPLOAD_RATE_HEADER};
use peermirror_protocol::segments::{Delivered, Schedule, Standing};
use peermirror_routing::Peer;

pub(super) use peermirror_protocol::segments::SEGMENT;
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

/// The relay's handle on one worker (its schedule is in [`Schedule`]).
struct Slot {
    peer: Peer,
    /// Where its next segment is sent; `None` once it is to stop (the
    /// worker ends when it sees the channel closed).
    segments: Option<mpsc::Sender<Range<u64>>>,
    task: AbortHandle,
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
    schedule: Schedule,
    slots: Vec<Slot>,
    tasks: JoinSet<()>,
    events: mpsc::Sender<Event>,
    /// Bytes received ahead of the next byte to send, by offset, with
    /// their sender (see [`sender`]).
    ready: BTreeMap<u64, (Bytes, usize)>,
    /// Workers that may still be started (bounds the holders tried).
    spawns_left: usize,
}

impl Fetch {
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
        let task = self.tasks.spawn(worker.run(first, receiver));
        let added = self.schedule.add(current, Instant::now());
        debug_assert_eq!(added, id);
        self.slots.push(Slot {
            peer,
            segments: Some(segments),
            task,
        });
        self.spawns_left = self.spawns_left.saturating_sub(1);
    }

    /// Stops a worker; its unfinished span goes back to the schedule.
    fn stop(&mut self, i: usize) {
        self.schedule.stop(i);
        let slot = &mut self.slots[i];
        slot.segments = None;
        slot.task.abort();
    }

    /// Passes on the segments the schedule hands out, within the window
    /// after `next` (the next byte to send).
    fn assign(&mut self, next: u64) {
        for (i, segment) in self.schedule.assign(next, Instant::now()) {
            let sent = self.slots[i]
                .segments
                .as_ref()
                .is_some_and(|s| s.try_send(segment).is_ok());
            if !sent {
                // The worker is gone (its failure is on its way).
                self.schedule.unsent(i);
            }
        }
    }
}

/// The most segment bytes a relay from `peers` holders holds ahead of its
/// client: the window segments are handed out in.
fn window(peers: usize) -> u64 {
    SEGMENT * (peers.max(2) as u64 + 1)
}

impl Transfer {
    /// Room in `--mirror-relay-memory` for a relay from several holders;
    /// `None` (the relay stays on one holder) when it is taken.
    pub(super) fn parallel_room(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let room = self
            .mirror
            .relay_room(window(self.mirror.config.parallel_peers));
        if room.is_none() {
            tracing::debug!(digest = %self.digest, "relay memory taken by others; staying on one holder");
        }
        room
    }

    /// Relays the rest of the blob from several holders: the current peer,
    /// whose `body` streams from `self.pos`, and `helper`, then others as
    /// the lookup finds them, up to the configured number.
    pub(super) async fn relay_parallel(
        &mut self,
        body: Incoming,
        helper: Peer,
        // Held while the segments are fetched.
        _room: tokio::sync::OwnedSemaphorePermit,
        delivery: &mut Delivery,
        contributors: &mut Vec<Peer>,
    ) -> Outcome {
        let config = self.mirror.config.clone();
        let peers = config.parallel_peers.max(2);
        let (events, mut inbox) = mpsc::channel(2 * peers);
        // The current peer finishes its first segment from the body it sends.
        let first_cut = self.end.min(self.pos + SEGMENT);
        let mut fetch = Fetch {
            schedule: Schedule::new(first_cut..self.end, window(peers)),
            slots: Vec::new(),
            tasks: JoinSet::new(),
            events,
            ready: BTreeMap::new(),
            spawns_left: peers + config.max_attempts,
        };
        tracing::info!(digest = %self.digest, first = %self.peer.addr, helper = %helper.addr, from = self.pos, end = self.end, "fetching from several holders at once");
        fetch.spawn(self, self.peer.clone(), Some((body, self.pos..first_cut)));
        // Its bytes so far are in the client's body already.
        fetch.schedule.contributed(0);
        fetch.schedule.upload_rate(0, self.peer_upload_rate);
        fetch.spawn(self, helper, None);

        let stall = config.stall_timeout;
        let min_window_bytes = (config.min_speed as f64 * stall.as_secs_f64()) as u64;
        let mut speed_check = tokio::time::interval(stall);
        speed_check.reset();
        loop {
            fetch.assign(self.pos);
            if let Some(slow) = fetch.schedule.straggler(self.pos, Instant::now()) {
                let (peer, pos) = (&fetch.slots[slow].peer, fetch.schedule.holder(slow).pos);
                tracing::info!(digest = %self.digest, peer = %peer.addr, pos, "holder much slower than another; the faster one takes its bytes");
                fetch.stop(slow);
                fetch.assign(self.pos);
            }
            if self.pos == self.end {
                return self.finish(delivery, contributors).await;
            }
            if fetch.schedule.working() == 0 && !self.recruit(&mut fetch, true).await {
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
                } => fetch.schedule.upload_rate(worker, upload_rate),
                Event::Data {
                    worker,
                    offset,
                    bytes,
                } => {
                    let peer = &fetch.slots[worker].peer;
                    match fetch.schedule.delivered(worker, offset, bytes.len() as u64) {
                        Delivered::Accepted { first } => {
                            if first {
                                contributors.push(peer.clone());
                            }
                        }
                        Delivered::Ignored => continue,
                        Delivered::OutOfPlace { expected } => {
                            // Cannot happen with an honest worker; never mix
                            // bytes whose place is in doubt.
                            tracing::warn!(peer = %peer.addr, offset, expected, "segment bytes out of place; dropping the holder");
                            fetch.stop(worker);
                            continue;
                        }
                    }
                    fetch
                        .ready
                        .insert(offset, (bytes, sender(contributors, peer)));
                    while let Some((bytes, from)) = fetch.ready.remove(&self.pos) {
                        self.pos += bytes.len() as u64;
                        if delivery.push(bytes, from).await.is_err() {
                            return Outcome::Abandoned;
                        }
                    }
                }
                Event::SegmentDone { worker } => {
                    if fetch.schedule.segment_done(worker, Instant::now()) {
                        let upload_rate = fetch.schedule.holder(worker).upload_rate;
                        let slot = &mut fetch.slots[worker];
                        tracing::debug!(peer = %slot.peer.addr, ?upload_rate, "holder is busy uploading to others; using it less");
                        slot.segments = None;
                    }
                    if fetch.schedule.working() < peers && fetch.schedule.has_todo() {
                        self.recruit(&mut fetch, false).await;
                    }
                }
                Event::Failed { worker, reason } => {
                    let holder = fetch.schedule.holder(worker);
                    if holder.standing != Standing::Stopped {
                        let (peer, pos) = (&fetch.slots[worker].peer, holder.pos);
                        tracing::info!(digest = %self.digest, peer = %peer.addr, pos, %reason, "holder failed mid-segment; another takes its bytes");
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
            let working =
                |(i, s): (usize, &Slot)| fetch.schedule.holder(i).working() && s.peer.id == peer.id;
            if fetch.slots.iter().enumerate().any(working) {
                continue;
            }
            fetch.spawn(self, peer, None);
            return true;
        }
        // Nobody else: a holder retired for being busy is better than none.
        if wait && let Some(i) = fetch.schedule.take_back_retired() {
            let peer = fetch.slots[i].peer.clone();
            fetch.spawn(self, peer, None);
            return true;
        }
        false
    }

    /// Stops workers that delivered less than the minimum speed since the
    /// last check, while another holder can take their bytes.
    async fn check_speeds(&mut self, fetch: &mut Fetch, min_window_bytes: u64) {
        let slow = fetch.schedule.below_speed(min_window_bytes);
        for i in slow {
            let others = fetch.schedule.working() > 1;
            if others || self.recruit(fetch, false).await {
                let peer = &fetch.slots[i].peer;
                tracing::info!(digest = %self.digest, peer = %peer.addr, "holder below the minimum speed; another takes its bytes");
                fetch.stop(i);
            }
        }
    }
}
