//! Exponential backoff with jitter, for every retry loop of the daemon.

use std::time::Duration;

/// Waits between attempts that keep failing: `min` after the first failure,
/// doubling after each further one up to `max`, plus up to a fifth more at
/// random so that nodes that failed together (a restarted bootstrapper or
/// containerd) do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            failures: 0,
        }
    }

    /// Records a failure; how long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Backoff::delay(self.min, self.max, self.failures, rand::random::<f64>())
    }

    /// An attempt succeeded: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The wait after the `failures`-th failure in a row, with `jitter` (in
    /// `[0, 1)`) drawn by the caller: `min · 2^(failures−1)`, at most `max`,
    /// plus `jitter` fifths of that.
    pub fn delay(min: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
        let base = min
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(max);
        base + base.mul_f64(0.2 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_min_to_max_then_resets() {
        let ms = Duration::from_millis;
        let delays: Vec<Duration> = (1..=8)
            .map(|n| Backoff::delay(ms(100), ms(5000), n, 0.0))
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
                .map(ms)
                .to_vec()
        );
        assert_eq!(Backoff::delay(ms(100), ms(5000), 1, 0.5), ms(110));
        assert_eq!(Backoff::delay(ms(100), ms(5000), u32::MAX, 0.0), ms(5000));
        let mut backoff = Backoff::new(ms(100), ms(5000));
        for expected in [100, 200, 400] {
            let wait = backoff.failed();
            assert!(
                wait >= ms(expected) && wait <= ms(expected * 6 / 5),
                "{wait:?}"
            );
        }
        assert_eq!(backoff.failures(), 3);
        backoff.reset();
        assert!(backoff.failed() <= ms(120));
    }
}
