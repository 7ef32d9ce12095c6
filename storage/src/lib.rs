//! parley-storage: the per-shard append-only log of the parley broker.
//!
//! One [`Log`] per broker shard stores opaque records (a caller-defined kind, a conversation id,
//! a per-conversation seq, a message id, a timestamp and a payload) in preallocated, memory-mapped
//! segment files with CRC-32C per record. It answers "records of conversation C with seq in
//! `a..b`" from an index without scanning (in memory for the active segment, an index file per
//! sealed segment), recovers from crashes by cutting the torn tail, opens in a time that does not
//! grow with the log (only the active segment is scanned), makes appends durable with group
//! commit, keeps an application checkpoint, and drops whole old segments for retention. It knows
//! nothing about sessions or the wire format.
//!
//! The on-disk format and every protocol (append, flush, recovery, retention) are specified in
//! `FORMAT.md` next to this crate's `Cargo.toml`; read it first.
//!
//! ```
//! use parley_storage::{Log, LogConfig, MemoryBackend, RecordMeta, Timestamp};
//!
//! let now = Timestamp::from_micros(1_700_000_000_000_000);
//! let (mut log, _report) = Log::open(MemoryBackend::new(), LogConfig::default(), now)?;
//! let meta = RecordMeta { kind: 1, conversation: 7, seq: 1, msg_id: 99, timestamp: now };
//! let lsn = log.append(meta, b"hello")?;
//! log.flush()?; // or sync_ticket() + run() on another thread + complete_sync()
//! assert!(log.is_durable(lsn)); // only now may the broker ack it
//! let rec = log.read(7, 1..2).next().expect("one record")?;
//! assert_eq!(rec.payload, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout: [`format`](mod@format) (bytes), `side` (bytes of index files and the checkpoint),
//! [`backend`] (the trait) with `mmap`, `pwrite`, `memory`, `faulty` (the backends), `index`,
//! `log` (append, read, flush, spare tickets, checkpoint), `recovery`, `retention`, `error`.

pub mod backend;
mod error;
mod faulty;
pub mod format;
mod fsdir;
mod index;
mod log;
mod memory;
mod mmap;
mod pwrite;
mod recovery;
mod retention;
mod side;
mod types;

pub use backend::{Backend, BackendHandle, SegmentStore, SegmentSync, SideFile};
pub use error::{AppendError, OpenError, StorageError};
pub use faulty::{Faults, FaultyBackend, FaultyHandle, FaultySegment, FaultySync};
pub use log::{
    Durability, Log, LogConfig, Records, Retention, Scan, SpareDone, SpareTicket, SpareTicketOf,
    SyncOf, SyncTicket, TickReport,
};
pub use memory::{MemoryBackend, MemoryHandle, MemorySegment, MemorySide, MemorySync};
pub use mmap::{MmapBackend, MmapHandle, MmapSegment, MmapSync, SideMap};
pub use pwrite::{PwriteBackend, PwriteHandle, PwriteSegment, PwriteSync};
pub use recovery::{
    CheckpointProblem, Corruption, CorruptionKind, IndexProblem, RecoveryReport, TornTail,
};
pub use retention::RetentionReport;
pub use side::IndexError;
pub use types::{Lsn, RecordMeta, RecordRef, Timestamp};
