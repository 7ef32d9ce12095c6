//! Reconnect back-off: exponential, bounded, with jitter (sans-IO: the randomness is passed in).
//!
//! The n-th consecutive failed attempt waits a random time between half and all of
//! `min(initial * 2^n, max)` ("equal jitter"), so a crowd of clients that lost the same broker
//! does not come back in lock-step, yet each waits at least half the nominal delay. A successful
//! login resets the count. A server's `retry_after_ms` raises the wait to at least that.

use std::time::Duration;

/// Back-off settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The nominal wait after the first failure.
    pub initial: Duration,
    /// The largest nominal wait.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Consecutive failures and the next wait.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Settings.
    config: BackoffConfig,
    /// Consecutive failures so far.
    failures: u32,
}

impl Backoff {
    /// No failures yet.
    ///
    /// ```
    /// use parley_client::backoff::{Backoff, BackoffConfig};
    /// let mut b = Backoff::new(BackoffConfig::default());
    /// let first = b.next_delay(u64::MAX, None);
    /// assert_eq!(first, std::time::Duration::from_millis(100));
    /// ```
    pub fn new(config: BackoffConfig) -> Self {
        Self {
            config,
            failures: 0,
        }
    }

    /// The wait before the next attempt, counting one more failure; `random` is any random
    /// value (the jitter), `retry_after_ms` the server's request, if any.
    pub fn next_delay(&mut self, random: u64, retry_after_ms: Option<u32>) -> Duration {
        let nominal = self
            .config
            .initial
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.config.max);
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(nominal.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        // random / 2^64 of the half, so u64::MAX gives the whole half: (0..=half).
        let scaled = (u128::from(random) * (u128::from(half) + 1)) >> 64;
        let jitter = u64::try_from(scaled).unwrap_or(half);
        let delay = Duration::from_nanos(nanos - half + jitter);
        let asked = Duration::from_millis(u64::from(retry_after_ms.unwrap_or(0)));
        delay.max(asked)
    }

    /// A login succeeded: the next failure waits the initial time again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_bound_with_jitter_in_the_upper_half() {
        let config = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let mut b = Backoff::new(config);
        let waits: Vec<_> = (0..6).map(|_| b.next_delay(u64::MAX, None)).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(waits[1], Duration::from_millis(200));
        assert_eq!(waits[4], Duration::from_secs(1));
        assert_eq!(waits[5], Duration::from_secs(1));
        assert_eq!(b.next_delay(0, None), Duration::from_millis(500));
        assert_eq!(b.next_delay(0, Some(3000)), Duration::from_secs(3));
        b.reset();
        assert_eq!(b.next_delay(0, None), Duration::from_millis(50));
        for r in [1u64, 7, 12345, u64::MAX / 3] {
            let d = Backoff::new(config).next_delay(r, None);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
    }
}
