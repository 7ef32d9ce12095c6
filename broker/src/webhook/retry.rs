//! When a POST counts as delivered, when it is tried again and after how long. Pure: no clock,
//! no I/O; the randomness of the jitter is passed in.

use std::time::Duration;

/// How one attempt ended, as the sender saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The endpoint answered with this status and, if it sent one, this `Retry-After` value.
    Answered {
        /// The HTTP status.
        status: u16,
        /// The `Retry-After` header, as sent.
        retry_after: Option<String>,
    },
    /// No answer: the connection, TLS or the request failed, or the time ran out.
    Failed(String),
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A 2xx: the events are delivered.
    Delivered,
    /// An answer that another attempt would not change: the events failed.
    Permanent,
    /// Worth another attempt, after the endpoint's `Retry-After` if it gave one.
    Retry {
        /// The endpoint's `Retry-After`, in seconds, when it sent one as a number.
        after: Option<Duration>,
    },
}

/// Classifies an attempt: a 2xx is delivered; 408 (request timeout), 429 (too many requests),
/// any 5xx and a failure without an answer are retried; anything else (another 4xx; a 3xx, since
/// redirects are not followed; a 1xx) is permanent.
pub(crate) fn classify(attempt: &Attempt) -> Verdict {
    match attempt {
        Attempt::Failed(_) => Verdict::Retry { after: None },
        Attempt::Answered {
            status,
            retry_after,
        } => match status {
            200..=299 => Verdict::Delivered,
            408 | 429 | 500..=599 => Verdict::Retry {
                after: retry_after.as_deref().and_then(parse_retry_after),
            },
            _ => Verdict::Permanent,
        },
    }
}

/// A `Retry-After` in delay-seconds (`"120"`). The HTTP-date form is not read (the back-off
/// applies instead): a date needs a clock that agrees with the endpoint's.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The retry schedule of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// The delay before the first retry, before jitter.
    pub(crate) base: Duration,
    /// The longest delay (also the cap of a `Retry-After`).
    pub(crate) max: Duration,
}

impl Backoff {
    /// The delay after failed attempt `attempt` (1 for the first): `base * 2^(attempt-1)`, capped
    /// at `max`, then drawn between half of it and all of it by `random` (any value: its
    /// remainder picks the point), so that nodes that failed together do not retry together.
    pub(crate) fn delay(&self, attempt: u32, random: u64) -> Duration {
        let full = self.ceiling(attempt);
        let full_ms = u64::try_from(full.as_millis()).unwrap_or(u64::MAX);
        let half = full_ms / 2;
        let spread = full_ms - half;
        // `spread + 1` cannot overflow: `spread` is at most half of u64::MAX, rounded up.
        Duration::from_millis(half + random % (spread + 1))
    }

    /// The delay after failed attempt `attempt` before jitter: `base * 2^(attempt-1)`, capped.
    pub(crate) fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The delay before the next attempt when the endpoint asked for `retry_after`: what it
    /// asked, cut to `max`.
    pub(crate) fn honour(&self, retry_after: Duration) -> Duration {
        retry_after.min(self.max)
    }
}

/// A small, fast pseudo-random sequence for the jitter (xorshift64*); not for secrets.
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    /// A sequence from `seed` (a zero seed is replaced: xorshift never leaves zero).
    pub(crate) fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next value.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16, retry_after: Option<&str>) -> Attempt {
        Attempt::Answered {
            status,
            retry_after: retry_after.map(str::to_owned),
        }
    }

    #[test]
    fn a_2xx_is_delivered_408_429_5xx_and_failures_are_retried_the_rest_is_permanent() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(classify(&answered(s, None)), Verdict::Delivered, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(
                classify(&answered(s, None)),
                Verdict::Retry { after: None },
                "{s}"
            );
        }
        for s in [
            100, 301, 302, 307, 400, 401, 403, 404, 410, 413, 422, 499, 600,
        ] {
            assert_eq!(classify(&answered(s, None)), Verdict::Permanent, "{s}");
        }
        assert_eq!(
            classify(&Attempt::Failed("connection refused".into())),
            Verdict::Retry { after: None }
        );
    }

    #[test]
    fn retry_after_in_seconds_is_read_and_a_date_or_garbage_is_not() {
        assert_eq!(
            classify(&answered(429, Some(" 7 "))),
            Verdict::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            classify(&answered(503, Some("0"))),
            Verdict::Retry {
                after: Some(Duration::ZERO)
            }
        );
        for v in ["Wed, 21 Oct 2015 07:28:00 GMT", "-1", "1.5", "", "soon"] {
            assert_eq!(parse_retry_after(v), None, "{v:?}");
        }
        // A Retry-After on a permanent answer changes nothing.
        assert_eq!(classify(&answered(400, Some("1"))), Verdict::Permanent);
    }

    #[test]
    fn the_back_off_doubles_from_base_up_to_max_with_jitter_between_half_and_all() {
        let b = Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_millis(30_000),
        };
        let ceilings: Vec<u64> = (1..=9).map(|a| b.ceiling(a).as_millis() as u64).collect();
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
        assert_eq!(b.ceiling(0), b.base, "attempt 0 is read as the first");
        assert_eq!(b.ceiling(u32::MAX), b.max, "no overflow");
        let mut jitter = Jitter::new(42);
        for attempt in 1..=12 {
            let ceiling = b.ceiling(attempt);
            for _ in 0..200 {
                let d = b.delay(attempt, jitter.next_u64());
                assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
            }
        }
        // The ends of the range are reachable.
        assert_eq!(b.delay(1, 0), Duration::from_millis(250));
        assert_eq!(b.delay(1, 250), Duration::from_millis(500));
        assert_eq!(
            b.delay(1, u64::MAX),
            Duration::from_millis(250 + u64::MAX % 251)
        );
        let huge = Backoff {
            base: Duration::from_secs(u64::MAX / 2),
            max: Duration::MAX,
        };
        let _ = huge.delay(40, u64::MAX);
    }

    #[test]
    fn retry_after_is_honoured_up_to_max() {
        let b = Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        assert_eq!(
            b.honour(Duration::from_secs(3600)),
            Duration::from_millis(50)
        );
        assert_eq!(b.honour(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_jitter_sequence_varies_and_never_sticks_at_zero() {
        let mut j = Jitter::new(0);
        let v: Vec<u64> = (0..100).map(|_| j.next_u64()).collect();
        assert!(v.iter().all(|&x| x != 0));
        let mut sorted = v.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), v.len());
    }
}
