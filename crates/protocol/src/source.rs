//! Watching the one source a blob is relayed from: when its bytes are too
//! many, too slow or stop, the relay switches to another holder; when the
//! blob is large and the client reads, it asks other holders for segments
//! too (see [`crate::segments`]). The mirror's transfer drives it with what
//! its source sends, and does what it answers.
//!
//! Time is passed in (`now`); nothing here reads a clock.

use std::time::{Duration, Instant};

/// How often a one-source transfer looks for a second holder (to switch to
/// parallel segments).
pub const RECHECK: Duration = Duration::from_millis(100);

/// Bytes relayed from the first source before other holders are asked too.
/// The channel to the client holds at most 8 chunks of the client's 512 KiB
/// read buffer (4 MiB) plus the chunk held back: past 8 MiB relayed, the
/// client has read at least 3.5 MiB.
pub const PARALLEL_AFTER: u64 = 8 << 20;

/// What the watch is told once.
#[derive(Debug, Clone, Copy)]
pub struct SourceRules {
    /// No byte for this long: the source is stalled. Also the window over
    /// which the minimum speed is checked.
    pub stall: Duration,
    /// Bytes per second below which another source is tried.
    pub min_speed: u64,
    /// Holders asked at once for a large blob (1: never in parallel).
    pub parallel_peers: usize,
    /// Remaining bytes from which a blob is fetched in parallel.
    pub parallel_min_size: u64,
    /// The blob is followed while its source still writes it: it has one
    /// source, never several.
    pub followed: bool,
}

/// What to do with bytes the source sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Pass them on.
    Deliver,
    /// Pass them on, then try a faster source: only `bytes` came in the
    /// last window.
    DeliverThenTryFaster { bytes: u64 },
    /// More than asked for: use none of them and switch source.
    Overrun,
}

/// Where the relay stands with its current source. The positions are the
/// relay's own (`first` asked for, `pos` the next byte to relay, `end`);
/// the watch keeps only what it measures.
#[derive(Debug, Clone)]
pub struct SourceWatch {
    rules: SourceRules,
    window_start: Instant,
    window_bytes: u64,
    /// When another holder was last looked for.
    parallel_checked: Option<Instant>,
}

impl SourceWatch {
    pub fn new(rules: SourceRules, now: Instant) -> SourceWatch {
        SourceWatch {
            rules,
            window_start: now,
            window_bytes: 0,
            parallel_checked: None,
        }
    }

    /// How long the source may stay silent now.
    pub fn stall(&self) -> Duration {
        self.rules.stall
    }

    /// Whether to look for a second holder now, to fetch the rest in
    /// parallel: a large remainder of a complete blob, once the client has
    /// read a few MiB, at most every [`RECHECK`]. (containerd 2.1's parallel
    /// layer fetch sends `bytes=N-` requests that it drops after one chunk:
    /// those must not set several holders sending.) Records the look.
    pub fn look_for_helper(&mut self, first: u64, pos: u64, end: u64, now: Instant) -> bool {
        let large = !self.rules.followed
            && self.rules.parallel_peers > 1
            && pos - first >= PARALLEL_AFTER
            && end - pos >= self.rules.parallel_min_size.max(1);
        let due = self
            .parallel_checked
            .is_none_or(|at| now.saturating_duration_since(at) >= RECHECK);
        if large && due {
            self.parallel_checked = Some(now);
        }
        large && due
    }

    /// `len` bytes from the source, to be relayed at `pos` of a body that
    /// ends at `end`. Unless they are an overrun, the relay passes them on
    /// and moves `pos` past them.
    pub fn received(&mut self, len: u64, pos: u64, end: u64, now: Instant) -> Received {
        if len > end - pos {
            return Received::Overrun;
        }
        self.window_bytes += len;
        if now.saturating_duration_since(self.window_start) < self.rules.stall {
            return Received::Deliver;
        }
        let bytes = std::mem::take(&mut self.window_bytes);
        self.window_start = now;
        let min_bytes = (self.rules.min_speed as f64 * self.rules.stall.as_secs_f64()) as u64;
        if bytes < min_bytes && pos + len < end {
            Received::DeliverThenTryFaster { bytes }
        } else {
            Received::Deliver
        }
    }

    /// Another source took over at the current position: its speed is
    /// measured afresh.
    pub fn switched(&mut self, now: Instant) {
        self.window_start = now;
        self.window_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> SourceRules {
        SourceRules {
            stall: Duration::from_secs(1),
            min_speed: 1000,
            parallel_peers: 4,
            parallel_min_size: 1 << 20,
            followed: false,
        }
    }

    #[test]
    fn a_slow_source_is_named_once_per_window_and_overruns_are_refused() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let end = 10_000;
        let mut w = SourceWatch::new(rules(), t0);
        let mut pos = 0;
        let mut receive = |w: &mut SourceWatch, len: u64, ms: u64| {
            let r = w.received(len, pos, end, at(ms));
            if r != Received::Overrun {
                pos += len;
            }
            (r, pos)
        };
        assert_eq!(receive(&mut w, 100, 500).0, Received::Deliver);
        assert_eq!(
            receive(&mut w, 100, 1000).0,
            Received::DeliverThenTryFaster { bytes: 200 }
        );
        assert_eq!(
            receive(&mut w, 100, 1500).0,
            Received::Deliver,
            "a new window"
        );
        assert_eq!(
            receive(&mut w, 5000, 2000).0,
            Received::Deliver,
            "fast enough"
        );
        assert_eq!(
            receive(&mut w, 4701, 2100),
            (Received::Overrun, 5300),
            "an overrun relays nothing"
        );
        w.switched(at(3000));
        assert_eq!(receive(&mut w, 4700, 4000), (Received::Deliver, end));
    }

    #[test]
    fn helpers_are_looked_for_once_the_client_reads_and_at_most_every_recheck() {
        let t0 = Instant::now();
        let end = 64 << 20;
        let mut w = SourceWatch::new(rules(), t0);
        assert!(
            !w.look_for_helper(0, 0, end, t0),
            "the client has read nothing yet"
        );
        let pos = PARALLEL_AFTER;
        assert!(w.look_for_helper(0, pos, end, t0));
        assert!(
            !w.look_for_helper(0, pos, end, t0 + RECHECK / 2),
            "not again so soon"
        );
        assert!(w.look_for_helper(0, pos, end, t0 + RECHECK));
        let followed = SourceRules {
            followed: true,
            ..rules()
        };
        let mut w = SourceWatch::new(followed, t0);
        assert!(
            !w.look_for_helper(0, pos, end, t0),
            "an in-flight blob has one source"
        );
    }
}
