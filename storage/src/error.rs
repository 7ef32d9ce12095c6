//! Typed errors, one enum per operation family.
//!
//! - [`OpenError`]: opening a backend or a log (recovery).
//! - [`AppendError`]: refusing or failing an append.
//! - [`StorageError`]: I/O or corruption during any other operation (flush, read, retention).

use std::io;
use std::path::PathBuf;

use crate::Lsn;

/// An error of a log operation other than open and append.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The operating system reported an I/O error; `op` says what the storage was doing.
    #[error("I/O error while {op}: {source}")]
    Io {
        /// What the storage was doing (e.g. "syncing a segment").
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or sync failed: the log refuses to go on (fsyncgate). Drop and reopen it.
    #[error("the log is poisoned by an earlier failed write or sync; reopen it to recover")]
    Poisoned,
    /// A record failed its CRC check (or its length is impossible) when read back.
    #[error("corrupt record at lsn {lsn}")]
    Corrupt {
        /// Where the bad record starts.
        lsn: Lsn,
    },
    /// [`Log::write_checkpoint`](crate::Log::write_checkpoint) was asked to cover records that
    /// are not durable yet; nothing was written.
    #[error("a checkpoint may only cover durable records: covers {covers}, durable {durable}")]
    CheckpointBeyondDurable {
        /// The LSN the checkpoint was to cover.
        covers: Lsn,
        /// The durable LSN at the time.
        durable: Lsn,
    },
}

impl StorageError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Self::Io { op, source }
    }
}

/// Why an append was refused or failed. Refusals (`SeqNotIncreasing`, `TooLarge`, `InvalidKind`)
/// change nothing; the log stays usable.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The seq is not greater than the conversation's latest seq.
    #[error("seq {seq} of conversation {conversation} is not greater than its latest seq {latest}")]
    SeqNotIncreasing {
        /// The conversation.
        conversation: u64,
        /// The refused seq.
        seq: u64,
        /// The conversation's latest seq.
        latest: u64,
    },
    /// The record (48-byte header + payload) is larger than a segment can hold.
    #[error("record of {len} bytes is larger than the maximum of {max} bytes")]
    TooLarge {
        /// Header + payload length.
        len: u64,
        /// The largest record this log accepts (`segment_size - 64`).
        max: u64,
    },
    /// Kind 0 is reserved for the storage itself.
    #[error("record kind 0 is reserved")]
    InvalidKind,
    /// Creating the next segment, writing, or the seal sync failed, or the log is poisoned
    /// (`StorageError::Poisoned`). A failed write or sync poisons the log; a failed segment
    /// creation (e.g. disk full) does not, and the append can be retried later.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a backend or a log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// An I/O error; `op` says what was being done and `path` to what.
    #[error("I/O error while {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process (or another backend in this process) holds the log directory's lock.
    #[error("log directory {} is locked by another open log", dir.display())]
    Locked {
        /// The log directory.
        dir: PathBuf,
    },
    /// The configuration is not usable (e.g. a segment size that is not a multiple of 4096).
    #[error("invalid log configuration: {0}")]
    InvalidConfig(&'static str),
    /// A storage operation during recovery failed (zeroing the torn tail, creating the first
    /// segment, removing a stale segment).
    #[error("recovery failed: {0}")]
    Recovery(#[from] StorageError),
}

impl OpenError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
