//! The log: append, read, scan, durability (flush and group commit), spare segments.
//! Recovery (`Log::open`) is in `recovery.rs`, retention in `retention.rs`.
//!
//! ### Invariants
//!
//! Checked with `debug_assert!` after every mutation (see [`Log::check_invariants`]); numbered as in
//! FORMAT.md section 9.
//!
//! 1. The active segment's tail (`segments.back().end`) is 8-aligned and in `[64, S]`; every byte
//!    of the active segment at or after the tail is zero.
//! 2. `durable <= written`; both only grow. `durable` only takes values `written` had (so it never
//!    points inside a record), normalized past the unused end of sealed segments.
//! 3. Under `Always`/`Interval`, a sealed segment was synced to its end before the next segment
//!    got any data (the seal sync), so `durable >= base + 64` of the active segment as soon as it
//!    holds a record.
//! 4. `segments` is never empty, sorted by base, each base a multiple of `S`; the active segment is
//!    the last; the spare, if any, has base `active.base + S`.
//! 5. Per conversation, index entries are strictly increasing in seq and LSN, all `>=` the first
//!    segment's base, and `latest >=` the last entry's seq.
//! 6. Only records below the written tail whose CRC verifies are returned.
//!
//! ### Threads
//!
//! A `Log` is used by one thread. The only things that cross threads are a [`SyncTicket`] and a
//! [`SpareTicket`]: they hold shared handles to segment maps/files, byte ranges, the backend's
//! [`BackendHandle`] and index bytes, never a reference to the `Log`. They share one `AtomicBool`
//! with the log: the poison flag.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::backend::{Backend, BackendHandle, SegmentStore, SegmentSync, SideFile};
use crate::format::{
    self, DEFAULT_SEGMENT_SIZE, KIND_SEQ_MARKER, RECORD_HEADER_LEN, RecordFields,
    SEGMENT_HEADER_LEN, SegmentHeader, Slot,
};
use crate::index::{Entry, Index, Span};
use crate::retention::RetentionReport;
use crate::side::{self, Block, SegmentSummary};
use crate::{AppendError, Lsn, RecordMeta, RecordRef, StorageError, Timestamp};

pub(crate) const DATA_START: u64 = SEGMENT_HEADER_LEN as u64;

/// When appended records become durable (FORMAT.md 5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Group commit: the caller syncs each batch ([`Log::sync_ticket`] or [`Log::flush`]) and acks
    /// only durable records. Rolling to a new segment syncs the old one first (the seal sync).
    Always,
    /// [`Log::tick`] syncs when this much time has passed since the last sync; records may be
    /// acked before they are durable, so up to one interval of acked records can be lost on power
    /// loss. Rolls do the seal sync.
    Interval(Duration),
    /// Only explicit [`Log::flush`] calls sync. No seal sync: after a power loss the log may have
    /// a hole at a segment boundary (reported by recovery).
    Never,
}

/// Which old segments [`Log::apply_retention`] drops (whole segments, oldest first, never the
/// active one). `None` means no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Drop a sealed segment once its newest record is older than this.
    pub max_age: Option<Duration>,
    /// Drop the oldest sealed segments while `segments in use × segment_size` exceeds this (the
    /// preallocated spare adds one more segment on disk).
    pub max_bytes: Option<u64>,
}

/// Configuration of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Size of every segment file, a multiple of 4096 in `[4 KiB, 4 GiB]`; the largest record is 64
    /// bytes smaller. Only used when a new log is created: an existing log keeps its own size.
    /// Default: 64 MiB.
    pub segment_size: u64,
    /// Durability policy. Default: [`Durability::Always`] (the safe one).
    pub durability: Durability,
    /// Retention limits. Default: none (keep everything).
    pub retention: Retention,
    /// Make the active and spare segments' pages resident ahead of the appends (off the append
    /// path). Default: true.
    pub prefault: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_size: DEFAULT_SEGMENT_SIZE,
            durability: Durability::Always,
            retention: Retention::default(),
            prefault: true,
        }
    }
}

/// One segment in use.
#[derive(Debug)]
pub(crate) struct Segment<S, X> {
    pub(crate) base: u64,
    pub(crate) store: S,
    /// Offset of the end of valid data (the tail, for the active segment).
    pub(crate) end: u64,
    /// Newest record or marker timestamp in micros; `i64::MIN` if none.
    pub(crate) newest: i64,
    /// Records (markers included) in this segment.
    pub(crate) records: u64,
    /// Offset of the last record or marker (0 if none).
    pub(crate) last_off: u64,
    /// The segment's index (FORMAT.md 10): `Some` for every sealed segment, `None` for the active.
    pub(crate) idx: Option<SegIdx<X>>,
}

impl<S, X> Segment<S, X> {
    /// A segment without records.
    pub(crate) fn empty(base: u64, store: S) -> Self {
        Self {
            base,
            store,
            end: DATA_START,
            newest: i64::MIN,
            records: 0,
            last_off: 0,
            idx: None,
        }
    }
}

/// The index bytes of a sealed segment: the mapped file, or bytes in memory (not written yet, or
/// not to be written because the segment is corrupt).
#[derive(Debug)]
pub(crate) enum SegIdx<X> {
    /// In memory; the flag says whether its file is still to be written (false for a segment
    /// found corrupt by recovery: it is scanned again at every open).
    Owned(Arc<Vec<u8>>, bool),
    /// A view of the index file.
    Mapped(X),
}

impl<X: AsRef<[u8]>> SegIdx<X> {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            SegIdx::Owned(b, _) => b,
            SegIdx::Mapped(m) => m.as_ref(),
        }
    }
}

/// What [`Log::tick`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// The new durable LSN if the interval flush ran.
    pub flushed: Option<Lsn>,
    /// What retention dropped.
    pub retention: RetentionReport,
    /// Whether a spare segment was created (or, on this thread, the spare work was done: see
    /// [`Log::prepare_spare`]).
    pub spare_created: bool,
}

/// An append-only log over a [`Backend`]. See the crate docs and FORMAT.md.
pub struct Log<B: Backend> {
    pub(crate) backend: B,
    pub(crate) config: LogConfig,
    pub(crate) segment_size: u64,
    /// Oldest first; the last one is active. Never empty.
    pub(crate) segments: VecDeque<Segment<B::Segment, B::Side>>,
    /// A preallocated empty segment with base `active.base + S`.
    pub(crate) spare: Option<B::Segment>,
    /// Alive while a [`SpareTicket`] (or its [`SpareDone`]) exists: at most one at a time. A
    /// ticket or result that is dropped frees the slot.
    pub(crate) ticket: std::sync::Weak<()>,
    /// Number of rolls so far: a spare ticket taken before a roll is stale.
    pub(crate) rolls: u64,
    /// The newest valid checkpoint: (covers, payload).
    pub(crate) checkpoint: Option<(u64, Vec<u8>)>,
    pub(crate) durable: u64,
    pub(crate) index: Index,
    pub(crate) poisoned: Arc<AtomicBool>,
    /// The latest `now` the caller passed (for segment headers).
    pub(crate) clock: Timestamp,
    pub(crate) last_flush: Timestamp,
}

impl<B: Backend> fmt::Debug for Log<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("segment_size", &self.segment_size)
            .field("segments", &self.segments.len())
            .field("first_lsn", &self.first_lsn())
            .field("written_lsn", &self.written_lsn())
            .field("durable_lsn", &self.durable_lsn())
            .field("conversations", &self.index.len())
            .field("poisoned", &self.is_poisoned())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Log<B> {
    // ----- append -------------------------------------------------------------------------------

    /// Appends a record and returns its LSN. A header encode, a CRC and a copy into the active
    /// segment: no syscall and no allocation (except amortized index growth), unless the segment is
    /// full and the log must roll (then see FORMAT.md 5.3: a seal sync under `Always`/`Interval`,
    /// and a synchronous segment creation if no spare was prepared).
    ///
    /// The record is **not durable** yet: ack it only once [`Log::is_durable`] says so.
    ///
    /// Errors: [`AppendError::SeqNotIncreasing`] if `conversation != 0` and `seq` is not greater
    /// than [`Log::latest_seq`]; [`AppendError::TooLarge`]; [`AppendError::InvalidKind`] for kind 0;
    /// [`AppendError::Storage`] if the log is poisoned or a write, seal sync or segment creation
    /// failed (a failed write or sync poisons the log).
    #[inline]
    pub fn append(&mut self, meta: RecordMeta, payload: &[u8]) -> Result<Lsn, AppendError> {
        if meta.kind == KIND_SEQ_MARKER {
            return Err(AppendError::InvalidKind);
        }
        let len = (RECORD_HEADER_LEN as u64).saturating_add(payload.len() as u64);
        let max = format::max_record_len(self.segment_size);
        if len > max {
            return Err(AppendError::TooLarge { len, max });
        }
        if meta.conversation != 0
            && let Some(latest) = self.index.latest(meta.conversation)
            && meta.seq <= latest
        {
            return Err(AppendError::SeqNotIncreasing {
                conversation: meta.conversation,
                seq: meta.seq,
                latest,
            });
        }
        let fields = RecordFields {
            kind: meta.kind,
            conversation: meta.conversation,
            seq: meta.seq,
            msg_id: meta.msg_id,
            timestamp: meta.timestamp.micros(),
        };
        Ok(self.append_raw(&fields, payload)?)
    }

    /// Appends a validated record (or a seq marker). `48 + payload.len() <= S - 64` was checked.
    #[inline]
    pub(crate) fn append_raw(
        &mut self,
        f: &RecordFields,
        payload: &[u8],
    ) -> Result<Lsn, StorageError> {
        if self.is_poisoned() {
            return Err(StorageError::Poisoned);
        }
        let len = RECORD_HEADER_LEN as u64 + payload.len() as u64;
        let aligned = format::align8(len).unwrap_or(u64::MAX);
        if self.active().end.saturating_add(aligned) > self.segment_size {
            self.roll(f.timestamp)?;
        }
        let seg = self.segments.back_mut().ok_or(StorageError::Poisoned)?;
        let offset = seg.end;
        // `len <= S - 64 <= u32::MAX`, checked by the callers.
        let header = format::encode_record_header(f, len as u32, payload);
        if let Err(e) = seg.store.write(offset, &[&header, payload]) {
            // Part of the record may be in the segment past the tail: only recovery may judge.
            self.poison();
            return Err(StorageError::io("appending a record", e));
        }
        seg.end = offset + aligned;
        seg.newest = seg.newest.max(f.timestamp);
        seg.records += 1;
        seg.last_off = offset;
        let lsn = seg.base + offset;
        if f.conversation != 0 {
            if f.kind == KIND_SEQ_MARKER {
                self.index.marker(f.conversation, f.seq, lsn);
            } else {
                self.index.push(f.conversation, f.seq, lsn);
            }
        }
        debug_assert!(
            self.active().end.is_multiple_of(8),
            "invariant 1: tail 8-aligned"
        );
        debug_assert!(self.active().end <= self.segment_size, "invariant 1");
        Ok(Lsn(lsn))
    }

    /// Seals the active segment and makes the next one active (FORMAT.md 5.3).
    fn roll(&mut self, now_micros: i64) -> Result<(), StorageError> {
        let active_base = self.active().base;
        let next_base =
            active_base
                .checked_add(self.segment_size)
                .ok_or(StorageError::Corrupt {
                    lsn: Lsn(active_base),
                })?;
        if self.config.durability != Durability::Never {
            // The seal sync: nothing may reach segment k+1 before segment k is durable.
            if let Some(ticket) = self.sync_ticket() {
                let lsn = ticket
                    .run()
                    .map_err(|e| StorageError::io("syncing a segment before rolling", e))?;
                self.complete_sync(lsn);
            }
        }
        let store = match self.spare.take() {
            Some(s) => s,
            None => {
                if now_micros > self.clock.micros() {
                    self.clock = Timestamp::from_micros(now_micros);
                }
                // Replaces whatever a spare ticket still out may have created for this base: its
                // result is stale from now on (`rolls`), and `install_spare` drops it.
                self.create_segment(next_base)?
            }
        };
        self.seal_active();
        self.rolls += 1;
        self.segments.push_back(Segment::empty(next_base, store));
        self.durable = self.normalize_durable(self.durable);
        self.debug_check();
        Ok(())
    }

    /// Moves the active segment's index entries into an index for it (bytes in the format of its
    /// file, FORMAT.md 10), to be written by the next spare ticket. The segment is about to be
    /// sealed: no record will be added to it.
    pub(crate) fn seal_active(&mut self) {
        let parts = self.index.take_active();
        let segment_size = self.segment_size;
        let Some(seg) = self.segments.back_mut() else {
            return;
        };
        let last_crc = if seg.records == 0 {
            0
        } else {
            let at = seg.last_off as usize + 4;
            seg.store
                .bytes()
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        let summary = SegmentSummary {
            base: seg.base,
            segment_size,
            end: seg.end,
            records: seg.records,
            newest: seg.newest,
            last_off: seg.last_off,
            last_crc,
        };
        let (bytes, convs) = side::encode_index(&summary, &parts);
        drop(parts);
        seg.idx = Some(SegIdx::Owned(Arc::new(bytes), true));
        let base = seg.base;
        self.index.add_sealed(base, &convs);
    }

    pub(crate) fn create_segment(&mut self, base: u64) -> Result<B::Segment, StorageError> {
        let header = SegmentHeader {
            base_lsn: base,
            segment_size: self.segment_size,
            created: self.clock,
        }
        .encode();
        self.backend
            .create(base, self.segment_size, &header)
            .map_err(|e| StorageError::io("creating a segment", e))
    }

    /// Creates and prefaults the spare segment if there is none, and writes the index files of
    /// sealed segments that have none yet, **on this thread** (`tick` calls it). The same work as
    /// [`Log::spare_ticket`] + [`SpareTicket::run`] + [`Log::install_spare`], which do it on
    /// another thread. Returns whether a spare was created; does nothing (`Ok(false)`) while a
    /// spare ticket is out. Fails with an I/O error if the disk is full; the log stays usable.
    pub fn prepare_spare(&mut self) -> Result<bool, StorageError> {
        match self.spare_ticket() {
            Some(ticket) => self.install_spare(ticket.run()),
            None => Ok(false),
        }
    }

    /// The off-the-append-path housekeeping of segments, as a ticket that can run on another
    /// thread: create and prefault the next segment (the spare) if there is none, and write the
    /// index files of newly sealed segments (FORMAT.md 10.2). `None` if there is nothing to do,
    /// a ticket is already out, or the log is poisoned.
    ///
    /// Run it with [`SpareTicket::run`] (blocking: file creation, `fallocate`, syncs, prefault),
    /// then hand the result to [`Log::install_spare`]. Appending may go on meanwhile; if a roll
    /// needs the next segment before the ticket is done, it creates it itself and the ticket's
    /// segment is discarded on install. Only one ticket is out at a time. A ticket holds the
    /// backend's directory (and its lock) until it has run: run or drop it before reopening.
    pub fn spare_ticket(&mut self) -> Option<SpareTicketOf<B>> {
        if self.ticket.strong_count() > 0 || self.is_poisoned() {
            return None;
        }
        let active = self.active();
        let spare = match (&self.spare, active.base.checked_add(self.segment_size)) {
            (None, Some(base)) => Some(SpareJob {
                base,
                size: self.segment_size,
                header: SegmentHeader {
                    base_lsn: base,
                    segment_size: self.segment_size,
                    created: self.clock,
                }
                .encode(),
            }),
            _ => None,
        };
        let mut indexes = Vec::new();
        for seg in &self.segments {
            let Some(SegIdx::Owned(bytes, true)) = &seg.idx else {
                continue;
            };
            let base = seg.base;
            // The index is only written once the segment's data is durable (FORMAT.md 10.2):
            // already true after the seal sync, otherwise (`Never`) the ticket syncs first.
            let sync = (self.durable < seg.base + seg.end)
                .then(|| seg.store.sync_range(DATA_START, seg.end));
            indexes.push(IndexJob {
                base,
                bytes: Arc::clone(bytes),
                sync,
            });
        }
        if spare.is_none() && indexes.is_empty() {
            return None;
        }
        let token = Arc::new(());
        self.ticket = Arc::downgrade(&token);
        Some(SpareTicket {
            token,
            handle: self.backend.handle(),
            spare,
            prefault: self.config.prefault,
            indexes,
            rolls: self.rolls,
            poisoned: Arc::clone(&self.poisoned),
        })
    }

    /// Installs what a [`SpareTicket`] did: the spare segment (unless the log rolled past it
    /// meanwhile: then it is dropped, and the file on disk is the log's own), and the written
    /// index files (mapped in place of the in-memory bytes). Returns whether a spare was
    /// installed. An index that could not be written is retried by the next ticket; the first
    /// error is returned (the log stays usable, unless a sync failed: that poisoned it).
    pub fn install_spare(&mut self, done: SpareDone<B::Segment>) -> Result<bool, StorageError> {
        let mut first_err = None;
        for (base, result) in done.indexes {
            let pos = self.segments.iter().position(|s| s.base == base);
            match (result, pos) {
                (Ok(()), Some(i)) => {
                    let view = self.backend.read_side(SideFile::Index(base));
                    if let Some(seg) = self.segments.get_mut(i) {
                        seg.idx = match (seg.idx.take(), view) {
                            (Some(SegIdx::Owned(bytes, _)), Ok(Some(view)))
                                if view.as_ref().len() == bytes.len() =>
                            {
                                Some(SegIdx::Mapped(view))
                            }
                            // Written, but not mappable now: keep the bytes, done with the file.
                            (Some(SegIdx::Owned(bytes, _)), _) => Some(SegIdx::Owned(bytes, false)),
                            (other, _) => other,
                        };
                    }
                }
                (Ok(()), None) => {
                    // Retention dropped the segment meanwhile: the index is an orphan.
                    let _ = self.backend.remove_side(SideFile::Index(base));
                }
                (Err(e), _) => {
                    // Still `Owned(_, true)`: the next ticket retries.
                    first_err.get_or_insert(StorageError::io("writing a segment index", e));
                }
            }
        }
        let mut installed = false;
        let fresh = done.rolls == self.rolls;
        match done.spare {
            Some((base, Ok(store))) => {
                let next = self.active().base.checked_add(self.segment_size);
                if fresh && self.spare.is_none() && Some(base) == next {
                    self.spare = Some(store);
                    installed = true;
                }
            }
            Some((base, Err(e))) if fresh && self.spare.is_none() => {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    // A leftover file of that base (e.g. a segment with a bad header that
                    // recovery left as evidence): no ticket is out now, so replacing it here
                    // races with nothing.
                    match self.create_segment(base) {
                        Ok(store) => {
                            if self.config.prefault {
                                store.prefault();
                            }
                            self.spare = Some(store);
                            installed = true;
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                } else {
                    first_err.get_or_insert(StorageError::io("creating the spare segment", e));
                }
            }
            Some((_, Err(_))) | None => {}
        }
        self.debug_check();
        match first_err {
            Some(e) => Err(e),
            None => Ok(installed),
        }
    }

    // ----- checkpoint ---------------------------------------------------------------------------

    /// Stores an application checkpoint (FORMAT.md 11): an opaque `payload` that says "this state
    /// reflects every record below `covers`", so that after a restart the caller can load it and
    /// replay only `scan(covers)` instead of the whole log. Atomic and durable when it returns
    /// (a side file written through the backend); it replaces the previous checkpoint.
    ///
    /// Refused ([`StorageError::CheckpointBeyondDurable`]) unless `covers <= durable_lsn()`: a
    /// checkpoint must never claim records a crash could take back. Pass a record boundary (a
    /// record's LSN, or `durable_lsn()`). `covers` is stored as the lowest LSN with the same
    /// records below it (`durable_lsn()` right after a roll is the new segment's `base + 64`; it
    /// is stored as the end of the previous segment's data), so [`Log::checkpoint`] may return
    /// a smaller LSN than was passed; `scan` from either returns the same records. A failed write
    /// leaves the previous checkpoint in place and does not poison the log.
    pub fn write_checkpoint(&mut self, covers: Lsn, payload: &[u8]) -> Result<(), StorageError> {
        if self.is_poisoned() {
            return Err(StorageError::Poisoned);
        }
        if covers.0 > self.durable {
            return Err(StorageError::CheckpointBeyondDurable {
                covers,
                durable: self.durable_lsn(),
            });
        }
        let covers = self.lowest_equivalent(covers.0);
        let bytes = side::encode_checkpoint(covers, payload);
        self.backend
            .write_side(SideFile::Checkpoint, &bytes)
            .map_err(|e| StorageError::io("writing the checkpoint", e))?;
        self.checkpoint = Some((covers, payload.to_vec()));
        Ok(())
    }

    /// The lowest LSN with the same records below it as `lsn`: positions in the unused end of a
    /// segment or in the next segment's header (where a normalized durable LSN points, 5.4) map
    /// to the end of the previous segment's data. Recovery can only vouch for LSNs up to the
    /// recovered end of data, and appends after a recovery that cut back to that segment go there.
    fn lowest_equivalent(&self, lsn: u64) -> u64 {
        let Some(i) = self
            .segments
            .partition_point(|s| s.base <= lsn)
            .checked_sub(1)
        else {
            return lsn;
        };
        let seg = &self.segments[i];
        let mut lsn = lsn.min(seg.base + seg.end);
        if lsn <= seg.base + DATA_START
            && let Some(prev) = i.checked_sub(1).and_then(|p| self.segments.get(p))
        {
            lsn = prev.base + prev.end;
        }
        lsn
    }

    /// The newest valid checkpoint (found at open, or written since): the LSN it covers and its
    /// payload. Replay `scan(covers)` on top of it; records below `covers` may have been dropped
    /// by retention since (the checkpoint summarizes them), and if `covers < first_lsn()`, records
    /// between the two were dropped too, exactly as a full replay would not see them.
    pub fn checkpoint(&self) -> Option<(Lsn, &[u8])> {
        self.checkpoint.as_ref().map(|(c, p)| (Lsn(*c), &p[..]))
    }

    // ----- durability ---------------------------------------------------------------------------

    /// A sync of everything written so far that can run on another thread (group commit), or
    /// `None` if everything is durable already or the log is poisoned. Run it with
    /// [`SyncTicket::run`], then pass the result to [`Log::complete_sync`]. Appending may go on
    /// meanwhile.
    pub fn sync_ticket(&self) -> Option<SyncTicket<SyncOf<B>>> {
        if self.is_poisoned() {
            return None;
        }
        let written = self.written_lsn().0;
        if self.durable >= written {
            return None;
        }
        let mut parts = Vec::new();
        for seg in self.segments.iter().rev() {
            let seg_end = seg.base + seg.end;
            if seg_end <= self.durable {
                break;
            }
            let start = self.durable.saturating_sub(seg.base).max(DATA_START);
            if start < seg.end {
                parts.push(seg.store.sync_range(start, seg.end));
            }
        }
        parts.reverse();
        Some(SyncTicket {
            parts,
            lsn: Lsn(written),
            poisoned: Arc::clone(&self.poisoned),
        })
    }

    /// Records that a [`SyncTicket`] completed: `durable_lsn` becomes at least `lsn`. Ignored if the
    /// log is poisoned (a sync after a failed one proves nothing).
    pub fn complete_sync(&mut self, lsn: Lsn) {
        if self.is_poisoned() {
            return;
        }
        let written = self.written_lsn().0;
        debug_assert!(lsn.0 <= written, "a ticket can not cover unwritten bytes");
        let d = self.durable.max(lsn.0.min(written));
        self.durable = self.normalize_durable(d);
        self.debug_check();
    }

    /// Syncs everything written so far, on this thread, and returns the new durable LSN.
    /// A failure poisons the log ([`StorageError::Poisoned`] from then on).
    pub fn flush(&mut self) -> Result<Lsn, StorageError> {
        if self.is_poisoned() {
            return Err(StorageError::Poisoned);
        }
        if let Some(ticket) = self.sync_ticket() {
            let lsn = ticket
                .run()
                .map_err(|e| StorageError::io("syncing the log", e))?;
            self.complete_sync(lsn);
        }
        Ok(self.durable_lsn())
    }

    /// Periodic housekeeping, called by the driver with the current time: the `Interval` flush when
    /// due, retention (if configured), and the spare segment. All off the append path.
    pub fn tick(&mut self, now: Timestamp) -> Result<TickReport, StorageError> {
        self.clock = now;
        let mut report = TickReport::default();
        if let Durability::Interval(every) = self.config.durability
            && now.saturating_since(self.last_flush) >= every
        {
            report.flushed = Some(self.flush()?);
            self.last_flush = now;
        }
        let r = self.config.retention;
        if r.max_age.is_some() || r.max_bytes.is_some() {
            report.retention = self.apply_retention(now)?;
        }
        report.spare_created = self.prepare_spare()?;
        Ok(report)
    }

    pub(crate) fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// Moves `d` past the unused end of sealed segments (so `durable == written` iff nothing is
    /// left to sync).
    fn normalize_durable(&self, mut d: u64) -> u64 {
        // Only the active segment can be empty, so only the last two segments matter.
        let skip = self.segments.len().saturating_sub(2);
        for (i, seg) in self.segments.iter().enumerate().skip(skip) {
            if d == seg.base + seg.end
                && let Some(next) = self.segments.get(i + 1)
                && next.end == DATA_START
            {
                d = next.base + DATA_START;
            }
        }
        d
    }

    // ----- reads --------------------------------------------------------------------------------

    /// The records of `conversation` with seq in `seqs`, in seq order, found through the index
    /// (no scan): for sealed segments their index (FORMAT.md 10), whose chunks are CRC-verified as
    /// they are read (a chunk that fails falls back to scanning that segment for the
    /// conversation), for the active segment the in-memory entries. Lazy: the cost is that of the
    /// records taken, plus a binary search. Each item borrows its payload from the segment; a
    /// record whose CRC no longer verifies yields [`StorageError::Corrupt`].
    pub fn read(&self, conversation: u64, seqs: Range<u64>) -> Records<'_, B> {
        let mut r = Records {
            log: self,
            conv: conversation,
            seqs: seqs.clone(),
            spans: [].iter(),
            cur: Cursor::Done,
            active: [].iter(),
            remaining: 0,
        };
        let Some(c) = self.index.conv(conversation) else {
            return r;
        };
        if seqs.start >= seqs.end {
            return r;
        }
        let (spans, _) = c.parts();
        let lo = spans
            .partition_point(|s| s.first <= seqs.start)
            .saturating_sub(1);
        let hi = spans.partition_point(|s| s.first < seqs.end).max(lo);
        let spans = &spans[lo..hi];
        let active = self.index.active_range(conversation, seqs.clone());
        let mut remaining = active.len();
        let mut iter = spans.iter();
        if let Some(first) = iter.next() {
            let (cur, n) = self.open_span(first, conversation, seqs.clone());
            r.cur = cur;
            remaining += n;
            if let Some((last, middle)) = iter.as_slice().split_last() {
                remaining += middle.iter().map(|s| s.count as usize).sum::<usize>();
                remaining += self.open_span(last, conversation, seqs.clone()).1;
            }
        }
        r.spans = iter;
        r.active = active.iter();
        r.remaining = remaining;
        r
    }

    /// A cursor over the entries of `span` with seq in `seqs`, and how many there are.
    fn open_span(&self, span: &Span, conv: u64, seqs: Range<u64>) -> (Cursor<'_>, usize) {
        let Some(seg) = self.segment_for(span.base) else {
            return (Cursor::Done, 0);
        };
        let idx = seg.idx.as_ref().map_or(&[][..], |x| x.bytes());
        if let Some(block) = Block::new(idx, span.start, span.count)
            && let Some(lo) = block.lower_bound(seqs.start)
            && let Some(hi) = block.lower_bound(seqs.end)
        {
            let hi = hi.max(lo);
            return (
                Cursor::Block {
                    base: seg.base,
                    block,
                    pos: lo,
                    end: hi,
                    verified: lo,
                    next_seq: seqs.start,
                    seq_end: seqs.end,
                },
                hi - lo,
            );
        }
        let entries = self.scan_conversation(seg, conv, seqs);
        let n = entries.len();
        (Cursor::Scanned(entries.into_iter()), n)
    }

    /// The fallback when a segment's index is unusable: its records of `conv` with seq in `seqs`,
    /// found by scanning the segment (CRC-verified, up to the first invalid record).
    fn scan_conversation(
        &self,
        seg: &Segment<B::Segment, B::Side>,
        conv: u64,
        seqs: Range<u64>,
    ) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut offset = DATA_START;
        while offset < seg.end {
            match format::decode_record(seg.store.bytes(), offset) {
                Ok(Slot::Record(r)) => {
                    let f = r.fields;
                    if f.conversation == conv && f.kind != KIND_SEQ_MARKER && seqs.contains(&f.seq)
                    {
                        out.push(Entry {
                            seq: f.seq,
                            lsn: seg.base + offset,
                        });
                    }
                    offset = r.next;
                }
                Ok(Slot::End) | Err(_) => break,
            }
        }
        out
    }

    /// The record at `lsn`, CRC-verified, which must be `conv`'s record `seq`.
    fn record_of(&self, lsn: u64, conv: u64, seq: u64) -> Result<RecordRef<'_>, StorageError> {
        let r = self.record_at(lsn)?;
        if r.meta.conversation != conv || r.meta.seq != seq {
            return Err(StorageError::Corrupt { lsn: Lsn(lsn) });
        }
        Ok(r)
    }

    /// Every record (kinds 1..=255, any conversation) with `lsn >= from`, in LSN order. Walks the
    /// segments from the start of the one containing `from` (verifying CRCs).
    pub fn scan(&self, from: Lsn) -> Scan<'_, B> {
        let seg = self
            .segments
            .partition_point(|s| s.base.saturating_add(self.segment_size) <= from.0);
        Scan {
            log: self,
            seg,
            offset: DATA_START,
            from: from.0,
        }
    }

    /// The record starting at `lsn`, CRC-verified.
    pub(crate) fn record_at(&self, lsn: u64) -> Result<RecordRef<'_>, StorageError> {
        let corrupt = StorageError::Corrupt { lsn: Lsn(lsn) };
        let seg = self
            .segment_for(lsn)
            .ok_or(StorageError::Corrupt { lsn: Lsn(lsn) })?;
        let offset = lsn - seg.base;
        match format::decode_record(seg.store.bytes(), offset) {
            Ok(Slot::Record(r)) if offset + r.len <= seg.end && r.fields.kind != 0 => {
                Ok(to_ref(lsn, &r.fields, r.payload))
            }
            _ => Err(corrupt),
        }
    }

    fn segment_for(&self, lsn: u64) -> Option<&Segment<B::Segment, B::Side>> {
        let first = self.segments.front()?.base;
        let guess = usize::try_from(lsn.checked_sub(first)? / self.segment_size).ok()?;
        match self.segments.get(guess) {
            Some(s) if s.base <= lsn && lsn < s.base.saturating_add(self.segment_size) => Some(s),
            _ => {
                // Not contiguous (a segment was missing at recovery): binary search.
                let i = self
                    .segments
                    .partition_point(|s| s.base <= lsn)
                    .checked_sub(1)?;
                let s = self.segments.get(i)?;
                (lsn < s.base.saturating_add(self.segment_size)).then_some(s)
            }
        }
    }

    // ----- getters ------------------------------------------------------------------------------

    /// The latest seq of a conversation (kept even after retention dropped all its records, and
    /// across restarts), or `None` if the log never saw it. The broker's next seq is this + 1.
    pub fn latest_seq(&self, conversation: u64) -> Option<u64> {
        self.index.latest(conversation)
    }

    /// The first seq of a conversation still in the log, or `None` if none of its records is left.
    pub fn first_seq(&self, conversation: u64) -> Option<u64> {
        self.index.first(conversation)
    }

    /// One past the last byte written (FORMAT.md section 1).
    pub fn written_lsn(&self) -> Lsn {
        let a = self.active();
        Lsn(a.base + a.end)
    }

    /// Everything below this is durable.
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.durable)
    }

    /// Whether the record at `lsn` is durable (`lsn < durable_lsn`). The ack contract: a caller
    /// acknowledges a record only once this is true.
    pub fn is_durable(&self, lsn: Lsn) -> bool {
        lsn.0 < self.durable
    }

    /// The base of the oldest segment: records below it were dropped by retention.
    pub fn first_lsn(&self) -> Lsn {
        Lsn(self.segments.front().map_or(0, |s| s.base))
    }

    /// Number of conversations in the index (with records, or only a latest seq).
    pub fn conversations(&self) -> usize {
        self.index.len()
    }

    /// Number of segments in use (sealed + active; the spare is not counted).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The segment size of this log (the existing log's, which wins over the configured one).
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// The largest payload one record can carry (`segment_size - 64 - 48`).
    pub fn max_payload(&self) -> u64 {
        format::max_record_len(self.segment_size) - RECORD_HEADER_LEN as u64
    }

    /// Whether a spare segment is ready.
    pub fn has_spare(&self) -> bool {
        self.spare.is_some()
    }

    /// Whether a failed write or sync poisoned the log (see FORMAT.md 5.4, fsyncgate).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Changes the retention limits (applied by the next `tick`/`apply_retention`).
    pub fn set_retention(&mut self, retention: Retention) {
        self.config.retention = retention;
    }

    /// The configuration in use.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// An estimate of the index's heap use in bytes.
    pub fn index_heap_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    /// The backend (e.g. to reach a test backend's state).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub(crate) fn active(&self) -> &Segment<B::Segment, B::Side> {
        // Invariant 4: never empty.
        match self.segments.back() {
            Some(s) => s,
            None => unreachable!("a log always has an active segment"),
        }
    }

    // ----- invariants ---------------------------------------------------------------------------

    /// Checks every invariant of the module docs, including a full walk of the index and of the
    /// zero tail (slow: for tests and debug builds).
    pub fn check_invariants(&self) -> Result<(), String> {
        let s = self.segment_size;
        let a = self.active();
        if !a.end.is_multiple_of(8) || a.end < DATA_START || a.end > s {
            return Err(format!("tail {} not aligned or out of range", a.end));
        }
        if a.store
            .bytes()
            .get(a.end as usize..)
            .is_some_and(|t| !format::is_zero(t))
        {
            return Err("nonzero bytes after the tail".into());
        }
        if self.durable > self.written_lsn().0 {
            return Err("durable > written".into());
        }
        for w in self.segments.iter().collect::<Vec<_>>().windows(2) {
            if w[0].base >= w[1].base {
                return Err("segments not sorted".into());
            }
        }
        if self.segments.iter().any(|g| !g.base.is_multiple_of(s)) {
            return Err("segment base not a multiple of the size".into());
        }
        let sealed = self.segments.len() - 1;
        if self.segments.iter().take(sealed).any(|g| g.idx.is_none()) || a.idx.is_some() {
            return Err("every sealed segment, and only those, has an index".into());
        }
        self.index.check(self.first_lsn().0, a.base)
    }

    #[inline]
    fn debug_check(&self) {
        debug_assert!(self.durable <= self.written_lsn().0, "invariant 2");
        debug_assert!(self.active().end.is_multiple_of(8), "invariant 1");
    }
}

fn to_ref<'a>(lsn: u64, f: &RecordFields, payload: &'a [u8]) -> RecordRef<'a> {
    RecordRef {
        lsn: Lsn(lsn),
        meta: RecordMeta {
            kind: f.kind,
            conversation: f.conversation,
            seq: f.seq,
            msg_id: f.msg_id,
            timestamp: Timestamp::from_micros(f.timestamp),
        },
        payload,
    }
}

/// The [`SegmentSync`] type of a backend's segments (what a [`SyncTicket`] holds).
pub type SyncOf<B> = <<B as Backend>::Segment as SegmentStore>::Sync;

/// The [`SpareTicket`] type of a backend (what [`Log::spare_ticket`] returns).
pub type SpareTicketOf<B> = SpareTicket<<B as Backend>::Handle, SyncOf<B>>;

/// A sync of the bytes written up to some LSN, runnable on any thread (group commit): `Send +
/// 'static`, it holds shared handles to the segments (maps or files), never a reference to the
/// log. Get one from [`Log::sync_ticket`].
pub struct SyncTicket<S> {
    parts: Vec<S>,
    lsn: Lsn,
    poisoned: Arc<AtomicBool>,
}

impl<S> fmt::Debug for SyncTicket<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncTicket")
            .field("lsn", &self.lsn)
            .field("segments", &self.parts.len())
            .finish()
    }
}

impl<S: SegmentSync> SyncTicket<S> {
    /// The LSN that will be durable when this ticket has run.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// Syncs the ranges (blocking) and returns the LSN to pass to [`Log::complete_sync`]. On error,
    /// the log is poisoned (the flag is shared), whether or not the caller reports it.
    pub fn run(self) -> Result<Lsn, io::Error> {
        for part in self.parts {
            if let Err(e) = part.sync() {
                self.poisoned.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(self.lsn)
    }
}

/// The creation of the spare segment, as a [`SpareTicket`] carries it.
#[derive(Debug)]
struct SpareJob {
    base: u64,
    size: u64,
    header: [u8; SEGMENT_HEADER_LEN],
}

/// The writing of one sealed segment's index, as a [`SpareTicket`] carries it.
#[derive(Debug)]
struct IndexJob<S> {
    base: u64,
    bytes: Arc<Vec<u8>>,
    /// Makes the segment's data durable first (`None` if it already is).
    sync: Option<S>,
}

/// Segment housekeeping runnable on any thread (like [`SyncTicket`]): creates and prefaults the
/// spare segment, and writes the index files of newly sealed segments. `Send + 'static`; get one
/// from [`Log::spare_ticket`], run it, give the result to [`Log::install_spare`].
pub struct SpareTicket<H, S> {
    token: Arc<()>,
    handle: H,
    spare: Option<SpareJob>,
    prefault: bool,
    indexes: Vec<IndexJob<S>>,
    rolls: u64,
    poisoned: Arc<AtomicBool>,
}

impl<H, S> fmt::Debug for SpareTicket<H, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpareTicket")
            .field("spare", &self.spare.as_ref().map(|j| Lsn(j.base)))
            .field("indexes", &self.indexes.len())
            .finish_non_exhaustive()
    }
}

impl<H: BackendHandle, S: SegmentSync> SpareTicket<H, S>
where
    H::Segment: SegmentStore,
{
    /// Whether the ticket creates a spare segment (otherwise it only writes indexes).
    pub fn creates_spare(&self) -> bool {
        self.spare.is_some()
    }

    /// Does the work (blocking): the spare first (`create_new`, then prefault), then each index
    /// (sync the segment if needed, write the file). A failed sync poisons the log (the flag is
    /// shared), whether or not the result is installed.
    pub fn run(self) -> SpareDone<H::Segment> {
        let spare = self.spare.map(|job| {
            let created = self.handle.create_new(job.base, job.size, &job.header);
            if self.prefault
                && let Ok(seg) = &created
            {
                seg.prefault();
            }
            (job.base, created)
        });
        let mut indexes = Vec::with_capacity(self.indexes.len());
        for job in self.indexes {
            let synced = match job.sync {
                Some(sync) => sync.sync().inspect_err(|_| {
                    self.poisoned.store(true, Ordering::Release);
                }),
                None => Ok(()),
            };
            let written = synced.and_then(|()| {
                self.handle
                    .write_side(SideFile::Index(job.base), &job.bytes)
            });
            indexes.push((job.base, written));
        }
        SpareDone {
            _token: self.token,
            spare,
            indexes,
            rolls: self.rolls,
        }
    }
}

/// The result of [`SpareTicket::run`], for [`Log::install_spare`]. `Send` if the segment type is.
pub struct SpareDone<G> {
    _token: Arc<()>,
    spare: Option<(u64, io::Result<G>)>,
    indexes: Vec<(u64, io::Result<()>)>,
    rolls: u64,
}

impl<G> fmt::Debug for SpareDone<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpareDone")
            .field(
                "spare",
                &self.spare.as_ref().map(|(b, r)| (Lsn(*b), r.is_ok())),
            )
            .field("indexes", &self.indexes.len())
            .finish_non_exhaustive()
    }
}

/// Where [`Records`] is in a sealed segment.
enum Cursor<'a> {
    Done,
    /// Entries `pos..end` of a verified-as-read index block.
    Block {
        base: u64,
        block: Block<'a>,
        pos: usize,
        end: usize,
        /// Entries below this are in chunks already verified.
        verified: usize,
        /// The seq range still to return (for a fallback scan if a chunk fails).
        next_seq: u64,
        seq_end: u64,
    },
    /// Entries found by scanning the segment (its index was unusable).
    Scanned(std::vec::IntoIter<Entry>),
}

/// Iterator returned by [`Log::read`].
pub struct Records<'a, B: Backend> {
    log: &'a Log<B>,
    conv: u64,
    seqs: Range<u64>,
    /// Sealed spans after the current one.
    spans: std::slice::Iter<'a, Span>,
    cur: Cursor<'a>,
    active: std::slice::Iter<'a, Entry>,
    remaining: usize,
}

impl<B: Backend> fmt::Debug for Records<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("conversation", &self.conv)
            .field("seqs", &self.seqs)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl<'a, B: Backend> Iterator for Records<'a, B> {
    type Item = Result<RecordRef<'a>, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.remaining == 0 {
                return None;
            }
            match &mut self.cur {
                Cursor::Block {
                    base,
                    block,
                    pos,
                    end,
                    verified,
                    next_seq,
                    seq_end,
                } if *pos < *end => {
                    if *pos >= *verified {
                        if block.verify_chunk_of(*pos) {
                            *verified = (*pos / side::CHUNK + 1) * side::CHUNK;
                        } else {
                            // The index went bad under us: scan the segment for the rest.
                            let range = *next_seq..*seq_end;
                            let base = *base;
                            self.cur = match self.log.segment_for(base) {
                                Some(seg) => Cursor::Scanned(
                                    self.log
                                        .scan_conversation(seg, self.conv, range)
                                        .into_iter(),
                                ),
                                None => Cursor::Done,
                            };
                            continue;
                        }
                    }
                    let Some((seq, offset)) = block.entry(*pos) else {
                        self.cur = Cursor::Done;
                        continue;
                    };
                    *pos += 1;
                    *next_seq = seq.saturating_add(1);
                    self.remaining -= 1;
                    return Some(self.log.record_of(*base + offset, self.conv, seq));
                }
                Cursor::Scanned(entries) => {
                    if let Some(e) = entries.next() {
                        self.remaining -= 1;
                        return Some(self.log.record_of(e.lsn, self.conv, e.seq));
                    }
                }
                Cursor::Block { .. } | Cursor::Done => {}
            }
            if let Some(span) = self.spans.next() {
                self.cur = self.log.open_span(span, self.conv, self.seqs.clone()).0;
                continue;
            }
            self.cur = Cursor::Done;
            if let Some(e) = self.active.next() {
                self.remaining -= 1;
                return Some(self.log.record_of(e.lsn, self.conv, e.seq));
            }
            // An index promised more records than its segment holds.
            self.remaining -= 1;
            return Some(Err(StorageError::Corrupt {
                lsn: self.log.first_lsn(),
            }));
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<B: Backend> ExactSizeIterator for Records<'_, B> {}

/// Iterator returned by [`Log::scan`]. After a corrupt record it yields the error once and goes on
/// with the next segment.
pub struct Scan<'a, B: Backend> {
    log: &'a Log<B>,
    seg: usize,
    offset: u64,
    from: u64,
}

impl<B: Backend> fmt::Debug for Scan<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scan")
            .field("segment", &self.seg)
            .field("offset", &self.offset)
            .finish()
    }
}

impl<'a, B: Backend> Iterator for Scan<'a, B> {
    type Item = Result<RecordRef<'a>, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let seg = self.log.segments.get(self.seg)?;
            if self.offset >= seg.end {
                self.seg += 1;
                self.offset = DATA_START;
                continue;
            }
            let lsn = seg.base + self.offset;
            match format::decode_record(seg.store.bytes(), self.offset) {
                Ok(Slot::Record(r)) if self.offset + r.len <= seg.end => {
                    self.offset = r.next;
                    if lsn < self.from || r.fields.kind == KIND_SEQ_MARKER {
                        continue;
                    }
                    return Some(Ok(to_ref(lsn, &r.fields, r.payload)));
                }
                _ => {
                    self.seg += 1;
                    self.offset = DATA_START;
                    return Some(Err(StorageError::Corrupt { lsn: Lsn(lsn) }));
                }
            }
        }
    }
}
