//! What the mirror did lately: the last requests it relayed or missed (for
//! the debug page), running totals, and one log line per blob relayed and
//! per miss, rate-limited under floods.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use peermirror_metrics::LogBudget;
use peermirror_routing::Peer;

/// Requests kept for the debug page.
pub const RECENT: usize = 100;

/// How a mirror request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A peer delivered (the whole body, for a GET).
    Hit,
    /// No peer had it: the client goes to its next endpoint.
    Miss,
    /// Peers were found, and none delivered all of it.
    Failed,
    /// The bytes did not match the digest; the tail was withheld.
    Corrupt,
    /// The client went away before the end.
    Abandoned,
    /// Holders of a tag answered, but too few hosts agreed on one digest.
    NotAgreed,
}

/// A peer as the debug page names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerRef {
    pub id: String,
    pub addr: String,
}

impl From<&Peer> for PeerRef {
    fn from(p: &Peer) -> Self {
        PeerRef {
            id: p.id.to_string(),
            addr: p.addr.to_string(),
        }
    }
}

/// One mirror request.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// When it ended, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// `blob` or `manifest`.
    pub kind: &'static str,
    /// The digest or tag asked for.
    pub key: String,
    pub outcome: Outcome,
    /// The peers that sent bytes, in order (several after a resume).
    pub peers: Vec<PeerRef>,
    /// Body bytes relayed.
    pub bytes: u64,
    /// Time until a peer answered, when one did.
    pub resolve_ms: Option<f64>,
    pub duration_ms: f64,
    pub mib_per_s: Option<f64>,
    /// `true`: the whole blob was hashed and matched; `None`: not checked
    /// here (a range, or a HEAD).
    pub verified: Option<bool>,
}

/// Totals since the daemon started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub hits: u64,
    pub misses: u64,
    pub failed: u64,
    pub bytes: u64,
}

pub struct Journal {
    recent: Mutex<VecDeque<Record>>,
    hits: AtomicU64,
    misses: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    log: LogBudget,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            // Enough for a pull of a large image at once; floods of misses
            // are summarised.
            log: LogBudget::new(50, 10),
        }
    }
}

/// What a finished request was, before it becomes a [`Record`].
pub struct Entry<'a> {
    pub kind: &'static str,
    pub key: String,
    pub outcome: Outcome,
    pub peers: &'a [Peer],
    pub bytes: u64,
    pub resolve: Option<Duration>,
    pub duration: Duration,
    pub verified: Option<bool>,
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Journal {
    /// Records a finished request and logs it (within the log budget).
    pub fn record(&self, entry: Entry<'_>) {
        let counter = match entry.outcome {
            Outcome::Hit => &self.hits,
            Outcome::Miss | Outcome::NotAgreed => &self.misses,
            Outcome::Failed | Outcome::Corrupt | Outcome::Abandoned => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(entry.bytes, Ordering::Relaxed);
        let seconds = entry.duration.as_secs_f64();
        let mib_per_s = (entry.bytes > 0 && seconds > 0.0)
            .then(|| ((entry.bytes as f64 / seconds / f64::from(1 << 20)) * 10.0).round() / 10.0);
        let record = Record {
            at_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            kind: entry.kind,
            key: entry.key,
            outcome: entry.outcome,
            peers: entry.peers.iter().map(PeerRef::from).collect(),
            bytes: entry.bytes,
            resolve_ms: entry.resolve.map(millis),
            duration_ms: millis(entry.duration),
            mib_per_s,
            verified: entry.verified,
        };
        self.log(&record);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    fn log(&self, r: &Record) {
        let Some(suppressed) = self.log.take() else {
            return;
        };
        let peers: Vec<&str> = r.peers.iter().map(|p| p.addr.as_str()).collect();
        match r.outcome {
            Outcome::Miss => tracing::info!(
                kind = r.kind,
                key = %r.key,
                ms = r.duration_ms,
                suppressed,
                "miss: no peer holds it; the client goes to its next endpoint"
            ),
            Outcome::Failed if r.peers.is_empty() => tracing::info!(
                kind = r.kind,
                key = %r.key,
                ms = r.duration_ms,
                suppressed,
                "miss: holders were found and none answered; the client goes to its next endpoint"
            ),
            Outcome::NotAgreed => tracing::info!(
                kind = r.kind,
                key = %r.key,
                peers = ?peers,
                ms = r.duration_ms,
                suppressed,
                "miss: the holders of this tag did not agree on its digest (two hosts must); the client goes to its next endpoint"
            ),
            outcome => tracing::info!(
                kind = r.kind,
                key = %r.key,
                peers = ?peers,
                bytes = r.bytes,
                ms = r.duration_ms,
                mib_per_s = r.mib_per_s.unwrap_or(0.0),
                verified = ?r.verified,
                suppressed,
                "{}",
                match outcome {
                    Outcome::Hit => "relayed from a peer",
                    Outcome::Corrupt => "relayed from a peer: corrupt, the tail was withheld",
                    Outcome::Abandoned => "relayed from a peer: the client left before the end",
                    _ => "relayed from a peer: cut short, no holder could deliver the rest",
                }
            ),
        }
    }

    /// The last [`RECENT`] requests, newest first.
    pub fn recent(&self) -> Vec<Record> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().rev().cloned().collect()
    }

    pub fn totals(&self) -> Totals {
        Totals {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(outcome: Outcome, bytes: u64) -> Entry<'static> {
        Entry {
            kind: "blob",
            key: "sha256:00".into(),
            outcome,
            peers: &[],
            bytes,
            resolve: Some(Duration::from_millis(3)),
            duration: Duration::from_millis(500),
            verified: Some(true),
        }
    }

    #[test]
    fn keeps_the_last_hundred_newest_first_and_counts_all() {
        let journal = Journal::default();
        for i in 0..(RECENT as u64 + 20) {
            journal.record(entry(Outcome::Hit, i));
        }
        journal.record(entry(Outcome::Miss, 0));
        let recent = journal.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].outcome, Outcome::Miss);
        assert_eq!(recent[1].bytes, RECENT as u64 + 19);
        let totals = journal.totals();
        assert_eq!((totals.hits, totals.misses), (RECENT as u64 + 20, 1));
    }

    #[test]
    fn throughput_is_bytes_over_duration() {
        let journal = Journal::default();
        journal.record(entry(Outcome::Hit, 64 << 20));
        let r = &journal.recent()[0];
        assert_eq!(r.mib_per_s, Some(128.0));
        assert_eq!(r.resolve_ms, Some(3.0));
        journal.record(entry(Outcome::Miss, 0));
        assert_eq!(journal.recent()[0].mib_per_s, None);
    }
}
