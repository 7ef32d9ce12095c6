//! Log lines that the outside world can cause, rate-limited per kind.
//!
//! A client (or a flood of them) must not be able to grow the node's log by one line per
//! connection or per frame. Every line that some outside event can trigger goes through a
//! [`LogLimiter`]: at most one line per kind per [`LOG_INTERVAL_MS`]; the next line of that kind
//! says how many were suppressed meanwhile, and the caller counts the suppressed ones. Time is
//! passed in: the limiter reads no clock.

use std::fmt;

/// At most one line per kind per this many milliseconds.
pub const LOG_INTERVAL_MS: u64 = 1_000;

/// What a log line is about; each kind has its own rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// The log (append, flush, maintenance, segment housekeeping) failed.
    Storage,
    /// A frame could not be encoded for a connection.
    Encode,
    /// Accepting a connection failed (e.g. out of file descriptors).
    Accept,
    /// Registering a socket with the poller failed.
    Register,
    /// A TLS connection failed (a protocol error, a handshake past its timeout).
    Tls,
    /// A UDP session failed (e.g. a frame too large for any datagram).
    Udp,
    /// Mail from another node of the cluster could not be taken.
    Cluster,
}

impl LogKind {
    const COUNT: usize = 7;

    fn index(self) -> usize {
        match self {
            LogKind::Storage => 0,
            LogKind::Encode => 1,
            LogKind::Accept => 2,
            LogKind::Register => 3,
            LogKind::Tls => 4,
            LogKind::Udp => 5,
            LogKind::Cluster => 6,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct KindState {
    /// When the last line of this kind was let through (`None`: never).
    last_ms: Option<u64>,
    /// Lines suppressed since.
    suppressed: u64,
}

/// Per-kind rate limit of log lines (see the module documentation).
#[derive(Debug, Default)]
pub struct LogLimiter {
    kinds: [KindState; LogKind::COUNT],
}

/// A line let through, with the count of similar lines suppressed before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Lines of the same kind suppressed since the last one let through.
    pub suppressed: u64,
}

impl fmt::Display for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.suppressed > 0 {
            write!(f, " (suppressed {} similar)", self.suppressed)
        } else {
            Ok(())
        }
    }
}

impl LogLimiter {
    /// Whether a line of `kind` may be written at `now_ms`: `Some` with the count suppressed
    /// before it, or `None` (counted as suppressed).
    pub fn admit(&mut self, kind: LogKind, now_ms: u64) -> Option<Admitted> {
        let k = &mut self.kinds[kind.index()];
        match k.last_ms {
            Some(last) if now_ms.saturating_sub(last) < LOG_INTERVAL_MS => {
                k.suppressed += 1;
                None
            }
            _ => {
                let admitted = Admitted {
                    suppressed: k.suppressed,
                };
                k.last_ms = Some(now_ms);
                k.suppressed = 0;
                Some(admitted)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_then_the_suppressed_count() {
        let mut l = LogLimiter::default();
        assert_eq!(
            l.admit(LogKind::Accept, 0),
            Some(Admitted { suppressed: 0 })
        );
        for t in 1..100 {
            assert_eq!(l.admit(LogKind::Accept, t), None);
        }
        assert_eq!(
            l.admit(LogKind::Storage, 50),
            Some(Admitted { suppressed: 0 }),
            "kinds are limited apart"
        );
        let next = l
            .admit(LogKind::Accept, LOG_INTERVAL_MS)
            .expect("a new interval");
        assert_eq!(next.suppressed, 99);
        assert_eq!(next.to_string(), " (suppressed 99 similar)");
    }
}
