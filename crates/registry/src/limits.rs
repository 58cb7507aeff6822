//! Upload limits: how many blob bodies this node sends at once to other
//! hosts, in total and per client address. Beyond them the answer is 503,
//! which containerd treats like any failed endpoint: it moves on to the next
//! one, and a node that everybody pulls from stays usable.
//!
//! Loopback clients (the node's own containerd) are not counted: their
//! requests are this node's own pulls, not uploads.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct UploadLimits {
    /// Blob bodies sent to other hosts at once (0: no limit); beyond it the
    /// answer is 503 and containerd tries its next endpoint.
    #[arg(
        long = "max-uploads",
        value_name = "MAX_UPLOADS",
        env = "PEERMIRROR_MAX_UPLOADS",
        default_value_t = 64
    )]
    pub total: usize,

    /// Blob bodies sent to one client address at once (0: no limit).
    #[arg(
        long = "max-uploads-per-client",
        value_name = "MAX_UPLOADS_PER_CLIENT",
        env = "PEERMIRROR_MAX_UPLOADS_PER_CLIENT",
        default_value_t = 8
    )]
    pub per_client: usize,
}

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            total: 64,
            per_client: 8,
        }
    }
}

/// How many bytes per second this node's registry port sends to other hosts,
/// as last measured (the daemon samples the dataplane's counters). Told to
/// peers that fetch from this node, so that a node fetching from several
/// holders uses the busy ones less. Unknown until measured (no dataplane).
#[derive(Debug, Clone)]
pub struct UploadRate(Arc<AtomicU64>);

/// The stored value of an unknown rate.
const UNKNOWN_RATE: u64 = u64::MAX;

impl Default for UploadRate {
    fn default() -> Self {
        UploadRate(Arc::new(AtomicU64::new(UNKNOWN_RATE)))
    }
}

impl UploadRate {
    pub fn set(&self, bytes_per_second: u64) {
        self.0
            .store(bytes_per_second.min(UNKNOWN_RATE - 1), Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|r| *r != UNKNOWN_RATE)
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// Hands out [`UploadPermit`]s.
#[derive(Clone)]
pub struct Uploads {
    limits: UploadLimits,
    counts: Arc<Mutex<Counts>>,
}

/// One upload in progress; dropping it frees the slot.
pub struct UploadPermit {
    counts: Arc<Mutex<Counts>>,
    client: IpAddr,
}

impl std::fmt::Debug for UploadPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UploadPermit({})", self.client)
    }
}

impl Uploads {
    pub fn new(limits: UploadLimits) -> Uploads {
        Uploads {
            limits,
            counts: Arc::default(),
        }
    }

    /// A permit for an upload to `client`: `Ok(None)` when the client is not
    /// counted, `Err(())` when a limit is reached.
    #[allow(clippy::result_unit_err)]
    pub fn acquire(&self, client: IpAddr) -> Result<Option<UploadPermit>, ()> {
        if client.is_loopback() || client.to_canonical().is_loopback() {
            return Ok(None);
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mine = counts.per_client.get(&client).copied().unwrap_or(0);
        if (self.limits.total > 0 && counts.total >= self.limits.total)
            || (self.limits.per_client > 0 && mine >= self.limits.per_client)
        {
            return Err(());
        }
        counts.total += 1;
        *counts.per_client.entry(client).or_default() += 1;
        Ok(Some(UploadPermit {
            counts: self.counts.clone(),
            client,
        }))
    }
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.per_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_node_and_per_client() {
        let uploads = Uploads::new(UploadLimits {
            total: 3,
            per_client: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = uploads.acquire(a).expect("free").expect("counted");
        let _a2 = uploads.acquire(a).expect("free").expect("counted");
        assert!(uploads.acquire(a).is_err(), "per-client limit");
        let _b1 = uploads.acquire(b).expect("free").expect("counted");
        assert!(uploads.acquire(b).is_err(), "node limit");
        drop(a1);
        assert!(uploads.acquire(b).is_ok());
        assert!(
            uploads
                .acquire("127.0.0.1".parse().expect("ip"))
                .expect("loopback")
                .is_none()
        );
        assert!(
            uploads
                .acquire("::ffff:127.0.0.1".parse().expect("ip"))
                .expect("loopback")
                .is_none()
        );
    }
}
