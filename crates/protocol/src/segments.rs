//! Scheduling the segments of one blob fetched from several holders at
//! once: which segment goes to which holder, who is too slow, who is
//! retired. The mirror's relay drives it with what its workers report and
//! does what it answers; a simulator can drive it with scripted events.
//!
//! - The remaining bytes are cut into segments of [`SEGMENT`] bytes. The
//!   next segment goes to whichever holder is idle: a faster holder fetches
//!   more of the blob.
//! - Memory is bounded: a segment is handed out only within a window of
//!   bytes after the first byte not yet sent to the client.
//! - A holder whose segment holds back the client's body while an idle one
//!   has been more than twice as fast is a straggler: the idle one takes
//!   the rest of its segment.
//! - A holder that says it uploads much more to other hosts than another
//!   holder of this blob is retired after its segment (busy holders are
//!   used less).
//! - A holder that stops, fails or delivers below the minimum speed gives
//!   its unfinished span back, and another takes it.
//!
//! Time is passed in (`now`); nothing here reads a clock.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Bytes one request asks one holder for.
pub const SEGMENT: u64 = 4 << 20;
/// Uploads to other hosts (bytes per second) below which no holder counts
/// as busy.
pub const BUSY_FLOOR: u64 = 32 << 20;
/// How long a segment runs before its holder's speed is compared with
/// another's.
pub const JUDGE_AFTER: Duration = Duration::from_millis(100);

/// The spans nobody fetches yet, by first byte.
#[derive(Debug, Default)]
pub struct Todo(BTreeMap<u64, u64>);

impl Todo {
    pub fn give_back(&mut self, span: Range<u64>) {
        if span.start < span.end {
            self.0.insert(span.start, span.end);
        }
    }

    /// The lowest unfetched segment, if it starts before `limit`.
    pub fn take(&mut self, limit: u64) -> Option<Range<u64>> {
        let (&start, &end) = self.0.iter().next()?;
        if start >= limit {
            return None;
        }
        self.0.remove(&start);
        let cut = end.min(start + SEGMENT);
        self.give_back(cut..end);
        Some(start..cut)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where a holder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Takes segments.
    Working,
    /// Finishes nothing more: it was busy uploading to others. It may be
    /// taken again when no other holder is left.
    Retired,
    /// Failed or stopped; what it still reports is ignored.
    Stopped,
}

/// The schedule's view of one holder.
#[derive(Debug, Clone)]
pub struct Holder {
    pub standing: Standing,
    /// The segment it fetches, and the next byte of it expected.
    pub current: Option<Range<u64>>,
    pub pos: u64,
    /// When its current segment was handed out.
    pub segment_started: Instant,
    /// What the holder said it uploads to other hosts, bytes per second.
    pub upload_rate: Option<u64>,
    /// Bytes per second of its last complete segment: its upload to us.
    pub our_rate: u64,
    /// Bytes received since the last speed check.
    pub window_bytes: u64,
    /// Whether it delivered any byte (a contributor to the blob).
    pub contributed: bool,
}

impl Holder {
    pub fn working(&self) -> bool {
        self.standing == Standing::Working
    }

    /// What the holder uploads to hosts other than this one, when its claim
    /// can be believed: this node has measured the holder's own speed (one
    /// finished segment), and the holder claims at least half of it (its
    /// upload includes what it sends here). A holder that says it uploads
    /// nothing while it sends bytes here is not believed, so it cannot make
    /// the others look busy and draw every segment to itself.
    fn load_from_others(&self) -> Option<u64> {
        let claim = self.upload_rate?;
        (self.our_rate > 0 && claim >= self.our_rate / 2)
            .then(|| claim.saturating_sub(self.our_rate))
    }
}

/// What the schedule makes of bytes a holder delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// In place; `first` when they are the holder's first bytes.
    Accepted { first: bool },
    /// From a stopped holder: ignore them.
    Ignored,
    /// Not where the holder's segment stands: the holder was stopped (never
    /// mix bytes whose place is in doubt).
    OutOfPlace { expected: u64 },
}

/// The segments of one blob among its holders.
#[derive(Debug)]
pub struct Schedule {
    holders: Vec<Holder>,
    todo: Todo,
    /// How far past the next byte to send segments are handed out.
    window: u64,
}

impl Schedule {
    /// Schedules `rest` (the bytes not yet asked for) with a window of
    /// `window` bytes.
    pub fn new(rest: Range<u64>, window: u64) -> Schedule {
        let mut todo = Todo::default();
        todo.give_back(rest);
        Schedule {
            holders: Vec::new(),
            todo,
            window,
        }
    }

    /// Adds a holder, already fetching `current` when given; its index.
    pub fn add(&mut self, current: Option<Range<u64>>, now: Instant) -> usize {
        let pos = current.as_ref().map_or(0, |c| c.start);
        self.holders.push(Holder {
            standing: Standing::Working,
            current,
            pos,
            segment_started: now,
            upload_rate: None,
            our_rate: 0,
            window_bytes: 0,
            contributed: false,
        });
        self.holders.len() - 1
    }

    pub fn holder(&self, i: usize) -> &Holder {
        &self.holders[i]
    }

    pub fn holders(&self) -> &[Holder] {
        &self.holders
    }

    /// Holders taking segments.
    pub fn working(&self) -> usize {
        self.holders.iter().filter(|h| h.working()).count()
    }

    /// Whether bytes are left that nobody fetches.
    pub fn has_todo(&self) -> bool {
        !self.todo.is_empty()
    }

    /// What holder `i` says it uploads to other hosts.
    pub fn upload_rate(&mut self, i: usize, rate: Option<u64>) {
        self.holders[i].upload_rate = rate;
    }

    /// Marks holder `i` as a contributor (its bytes were sent before the
    /// schedule started).
    pub fn contributed(&mut self, i: usize) {
        self.holders[i].contributed = true;
    }

    /// Hands a segment to every idle working holder, within the window
    /// after `next` (the next byte to send). The caller passes each one on;
    /// a segment it cannot pass on goes back with [`Schedule::unsent`].
    pub fn assign(&mut self, next: u64, now: Instant) -> Vec<(usize, Range<u64>)> {
        let mut out = Vec::new();
        for (i, holder) in self.holders.iter_mut().enumerate() {
            if !holder.working() || holder.current.is_some() {
                continue;
            }
            let Some(segment) = self.todo.take(next.saturating_add(self.window)) else {
                break;
            };
            holder.pos = segment.start;
            holder.current = Some(segment.clone());
            holder.segment_started = now;
            out.push((i, segment));
        }
        out
    }

    /// Holder `i` could not be given its segment (it is gone): the segment
    /// goes back.
    pub fn unsent(&mut self, i: usize) {
        if let Some(segment) = self.holders[i].current.take() {
            self.todo.give_back(segment);
        }
    }

    /// Bytes `offset..offset + len` from holder `i`.
    pub fn delivered(&mut self, i: usize, offset: u64, len: u64) -> Delivered {
        let holder = &mut self.holders[i];
        if holder.standing == Standing::Stopped {
            return Delivered::Ignored;
        }
        if offset != holder.pos || holder.current.is_none() {
            let expected = holder.pos;
            self.stop(i);
            return Delivered::OutOfPlace { expected };
        }
        holder.pos += len;
        holder.window_bytes += len;
        let first = !holder.contributed;
        holder.contributed = true;
        Delivered::Accepted { first }
    }

    /// Holder `i` finished its segment. `true` when it is now retired for
    /// uploading much more to other hosts than another holder of this blob.
    pub fn segment_done(&mut self, i: usize, now: Instant) -> bool {
        let holder = &mut self.holders[i];
        if let Some(segment) = holder.current.take() {
            let secs = now
                .saturating_duration_since(holder.segment_started)
                .as_secs_f64()
                .max(1e-6);
            holder.our_rate = ((segment.end - segment.start) as f64 / secs) as u64;
        }
        if holder.working() && self.busy(i) {
            self.holders[i].standing = Standing::Retired;
            return true;
        }
        false
    }

    /// Stops holder `i` (failed, too slow, out of place) and gives its
    /// unfinished span back.
    pub fn stop(&mut self, i: usize) {
        let holder = &mut self.holders[i];
        if holder.standing == Standing::Stopped {
            return;
        }
        holder.standing = Standing::Stopped;
        if let Some(segment) = holder.current.take() {
            self.todo.give_back(holder.pos..segment.end);
        }
    }

    /// A retired holder, stopped here so that the caller can take it again
    /// as a new holder: better than none when no other is left.
    pub fn take_back_retired(&mut self) -> Option<usize> {
        let i = self
            .holders
            .iter()
            .position(|h| h.standing == Standing::Retired)?;
        self.holders[i].standing = Standing::Stopped;
        Some(i)
    }

    /// The holder that holds back the client's body (its segment holds
    /// `next`, the next byte to send) while an idle holder has been more
    /// than twice as fast: the idle one should take the rest of that
    /// segment. Otherwise a slow holder would stall the others behind the
    /// window, and the end of the blob would wait for it.
    pub fn straggler(&self, next: u64, now: Instant) -> Option<usize> {
        let fastest_idle = self
            .holders
            .iter()
            .filter(|h| h.working() && h.current.is_none())
            .map(|h| h.our_rate)
            .max()?;
        let (i, holder) = self.holders.iter().enumerate().find(|(_, h)| {
            h.standing != Standing::Stopped
                && h.current
                    .as_ref()
                    .is_some_and(|c| c.start <= next && next < c.end)
        })?;
        let started = holder.current.as_ref().map_or(holder.pos, |c| c.start);
        let elapsed = now.saturating_duration_since(holder.segment_started);
        if elapsed < JUDGE_AFTER {
            return None;
        }
        let rate = ((holder.pos - started) as f64 / elapsed.as_secs_f64()) as u64;
        (fastest_idle > rate.saturating_mul(2)).then_some(i)
    }

    /// Whether holder `i` uploads much more to other hosts than another
    /// holder working on this blob (claims that cannot be believed count
    /// for neither side).
    fn busy(&self, i: usize) -> bool {
        let Some(load) = self.holders[i].load_from_others() else {
            return false;
        };
        let least = self
            .holders
            .iter()
            .enumerate()
            .filter(|(j, h)| *j != i && h.working())
            .filter_map(|(_, h)| h.load_from_others())
            .min();
        match least {
            Some(least) => load > BUSY_FLOOR && load > least.saturating_mul(2),
            None => false,
        }
    }

    /// The working holders that delivered fewer than `min_bytes` since the
    /// last check while fetching a segment; the window starts again.
    pub fn below_speed(&mut self, min_bytes: u64) -> Vec<usize> {
        let slow = self
            .holders
            .iter()
            .enumerate()
            .filter(|(_, h)| h.working() && h.current.is_some() && h.window_bytes < min_bytes)
            .map(|(i, _)| i)
            .collect();
        for holder in &mut self.holders {
            holder.window_bytes = 0;
        }
        slow
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

    /// Two holders, scripted: the faster one takes more segments, a
    /// straggler's bytes move to the idle one, and a failure gives the
    /// unfinished span back.
    #[test]
    fn the_faster_holder_fetches_more_and_a_straggler_hands_over() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = Schedule::new(0..4 * SEGMENT, 2 * SEGMENT);
        let (a, b) = (s.add(None, t0), s.add(None, t0));
        assert_eq!(
            s.assign(0, t0),
            vec![(a, 0..SEGMENT), (b, SEGMENT..2 * SEGMENT)]
        );
        assert_eq!(s.assign(0, t0), vec![], "both busy, and the window is full");
        // b delivers its whole segment fast; a is slow.
        assert_eq!(
            s.delivered(b, SEGMENT, SEGMENT),
            Delivered::Accepted { first: true }
        );
        assert!(!s.segment_done(b, at(10)));
        assert_eq!(s.delivered(a, 0, 1000), Delivered::Accepted { first: true });
        assert_eq!(s.straggler(0, at(50)), None, "too early to judge");
        assert_eq!(s.straggler(0, at(200)), Some(a));
        s.stop(a);
        // The rest of a's segment goes first, to b.
        assert_eq!(s.assign(1000, at(200)), vec![(b, 1000..SEGMENT)]);
        assert_eq!(s.delivered(a, 1000, 10), Delivered::Ignored, "a is stopped");
        assert_eq!(
            s.delivered(b, 5, 10),
            Delivered::OutOfPlace { expected: 1000 }
        );
        assert_eq!(s.working(), 0);
        assert!(s.has_todo(), "b's span went back too");
    }

    #[test]
    fn a_holder_busy_with_others_is_retired_and_taken_back_last() {
        let t0 = Instant::now();
        let mut s = Schedule::new(0..8 * SEGMENT, 8 * SEGMENT);
        let (a, b) = (s.add(None, t0), s.add(None, t0));
        s.upload_rate(a, Some(10 * BUSY_FLOOR));
        // b sends a segment a second, and says so: it uploads to nobody else.
        s.upload_rate(b, Some(SEGMENT));
        assert_eq!(s.assign(0, t0).len(), 2);
        s.delivered(b, SEGMENT, SEGMENT);
        assert!(!s.segment_done(b, t0 + Duration::from_secs(1)));
        s.delivered(a, 0, SEGMENT);
        assert!(s.segment_done(a, t0 + Duration::from_secs(1)), "a is busy");
        assert_eq!(s.holder(a).standing, Standing::Retired);
        assert!(
            s.assign(0, t0).iter().all(|(i, _)| *i != a),
            "a retired takes nothing more"
        );
        s.stop(b);
        assert_eq!(s.take_back_retired(), Some(a));
        assert_eq!(s.take_back_retired(), None);
    }

    #[test]
    fn a_claim_of_no_upload_that_contradicts_what_arrives_is_not_believed() {
        let t0 = Instant::now();
        let second = t0 + Duration::from_secs(1);
        let busy_and_liar = |liar_claim: u64, liar_delivers: bool| {
            let mut s = Schedule::new(0..8 * SEGMENT, 8 * SEGMENT);
            let (a, b) = (s.add(None, t0), s.add(None, t0));
            s.upload_rate(a, Some(10 * BUSY_FLOOR));
            s.upload_rate(b, Some(liar_claim));
            s.assign(0, t0);
            if liar_delivers {
                s.delivered(b, SEGMENT, SEGMENT);
                s.segment_done(b, second);
            }
            s.delivered(a, 0, SEGMENT);
            s.segment_done(a, second)
        };
        // b sends a segment a second but says it uploads nothing.
        assert!(!busy_and_liar(0, true), "b's claim was believed");
        // Nothing measured of b yet: its claim is no reference either.
        assert!(!busy_and_liar(0, false), "an unmeasured claim was believed");
        // The same claim that covers what b sends here is believed.
        assert!(busy_and_liar(SEGMENT, true));
    }

    #[test]
    fn holders_below_the_minimum_speed_are_named_once_per_window() {
        let t0 = Instant::now();
        let mut s = Schedule::new(0..4 * SEGMENT, 4 * SEGMENT);
        let (a, b) = (s.add(None, t0), s.add(None, t0));
        s.assign(0, t0);
        s.delivered(a, 0, 1 << 20);
        s.delivered(b, SEGMENT, 10);
        assert_eq!(s.below_speed(1 << 16), vec![b]);
        assert_eq!(s.below_speed(1 << 16), vec![a, b], "the window restarted");
    }
}
