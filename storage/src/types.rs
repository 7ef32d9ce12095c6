//! Small value types shared by the whole API: [`Lsn`], [`Timestamp`], [`RecordMeta`],
//! [`RecordRef`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A log sequence number: a logical byte position in the whole log (FORMAT.md section 1).
///
/// A record's LSN is where it starts. `durable_lsn` and `written_lsn` are end positions, so a
/// record is durable iff `record_lsn < durable_lsn` ([`Log::is_durable`](crate::Log::is_durable)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The raw position.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Wall-clock time in microseconds since the Unix epoch, always passed in by the caller (the
/// storage never reads a clock). Used for record timestamps, age retention and flush intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// From microseconds since the Unix epoch.
    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn micros(self) -> i64 {
        self.0
    }

    /// From a `SystemTime` (the driver's clock reading); saturates outside the `i64` range.
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |m| -m)),
        }
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        )
    }

    /// How long after `earlier` this is; zero if it is not after.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        let diff = i128::from(self.0) - i128::from(earlier.0);
        if diff <= 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(u64::try_from(diff).unwrap_or(u64::MAX))
        }
    }
}

/// The fixed fields of a record; the storage interprets only `conversation` and `seq` (index,
/// ordering) and `timestamp` (age retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    /// Caller-defined record type, `1..=255` (0 is reserved).
    pub kind: u8,
    /// Conversation id; 0 = not indexed (such records are reachable by `scan` only).
    pub conversation: u64,
    /// Sequence number, strictly increasing per conversation (≠ 0).
    pub seq: u64,
    /// Caller's message id (opaque to the storage).
    pub msg_id: u64,
    /// Caller-supplied time of the record.
    pub timestamp: Timestamp,
}

/// A record read from the log, borrowing its payload from the segment (no copy). Its CRC was
/// verified when it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Where the record starts.
    pub lsn: Lsn,
    /// Its fixed fields.
    pub meta: RecordMeta,
    /// Its payload.
    pub payload: &'a [u8],
}
