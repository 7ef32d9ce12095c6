//! Opening a log: recovery (FORMAT.md section 6).
//!
//! Validates segment headers, finds the active segment, loads the index of every sealed segment
//! from its index file (FORMAT.md 10) or, without a usable one, scans it (reporting and skipping
//! corruption), cuts the torn tail of the active segment and zeroes everything after it, syncs
//! what it found before calling it durable, writes the missing index files, and loads the
//! checkpoint (FORMAT.md 11).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::backend::{Backend, SegmentStore, SegmentSync, SideFile};
use crate::format::{self, KIND_SEQ_MARKER, RecordError, SegmentHeader, Slot};
use crate::index::Index;
use crate::log::{DATA_START, SegIdx, Segment};
use crate::side::{self, ConvSummary, IndexError, SegmentSummary};
use crate::{Log, LogConfig, Lsn, OpenError, StorageError, Timestamp};

/// What recovery found and did. Nothing in it is an error: the log opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The segment size in use (the existing log's, which wins over the configured one).
    pub segment_size: u64,
    /// Whether the directory held no usable segment and a new log was created.
    pub created: bool,
    /// Segments in use after recovery (sealed + active).
    pub segments: usize,
    /// Valid records found (seq markers included).
    pub records: u64,
    /// The written (and durable) LSN after recovery.
    pub written_lsn: Lsn,
    /// The torn tail cut from the active segment, if any.
    pub torn_tail: Option<TornTail>,
    /// Corruption found in sealed segments and bad segment headers (count = `len()`).
    pub corruptions: Vec<Corruption>,
    /// Empty segments beyond the spare that were removed.
    pub removed_segments: Vec<Lsn>,
    /// Sealed segments opened from their index file, without reading their records.
    pub indexed_segments: usize,
    /// Segments whose records were scanned: the active one, and every sealed one without a usable
    /// index file (all of them for a log written before index files existed).
    pub scanned_segments: usize,
    /// Index files that were present but not usable (deleted; their segment was scanned).
    pub index_problems: Vec<IndexProblem>,
    /// Index files written by this open (for sealed segments scanned without corruption).
    pub indexes_written: usize,
    /// The LSN covered by the checkpoint found ([`Log::checkpoint`]), if any.
    pub checkpoint: Option<Lsn>,
    /// Why a checkpoint file that was present is not used.
    pub checkpoint_ignored: Option<CheckpointProblem>,
}

/// An index file that recovery could not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexProblem {
    /// Base LSN of its segment.
    pub segment: Lsn,
    /// What was wrong.
    pub kind: IndexError,
}

/// Why a checkpoint file was ignored at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointProblem {
    /// Its header or payload CRC does not match, or it is malformed.
    Corrupt,
    /// It covers records beyond the end of the recovered log (they were lost).
    BeyondLog {
        /// The LSN it claims to cover.
        covers: Lsn,
        /// The recovered written LSN.
        written: Lsn,
    },
    /// It could not be read (an I/O error).
    Unreadable,
}

/// Where the log's data ended after a crash, and how many stale bytes were erased after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// The cut: the new written LSN.
    pub lsn: Lsn,
    /// Why the record at the cut was rejected; `None` if the data ended cleanly but stale nonzero
    /// bytes followed it (out-of-order writeback).
    pub reason: Option<CorruptionKind>,
    /// How many bytes (in 4 KiB chunks) had to be zeroed after the cut, in this and later segments.
    pub bytes_zeroed: u64,
}

/// A corruption found in a sealed segment (reading of that segment stopped there) or a bad header
/// (the segment was ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corruption {
    /// Base LSN of the segment (from its file name for a bad header).
    pub segment: Lsn,
    /// Offset in the segment.
    pub offset: u64,
    /// What was wrong.
    pub kind: CorruptionKind,
}

/// What made a record or segment invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptionKind {
    /// The segment header is invalid or disagrees with the file (name, length, segment size).
    BadHeader,
    /// A record length below the 48-byte header.
    BadLength,
    /// A record extending past the end of its segment.
    BeyondSegment,
    /// A record CRC mismatch.
    Checksum,
    /// Nonzero flags or reserved fields.
    Reserved,
    /// A record whose seq is not greater than its conversation's previous one.
    SeqNotIncreasing,
    /// Nonzero bytes after the clean end of a sealed segment's data.
    TrailingData,
}

impl From<RecordError> for CorruptionKind {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::BadLength => Self::BadLength,
            RecordError::BeyondSegment => Self::BeyondSegment,
            RecordError::Checksum => Self::Checksum,
            RecordError::Reserved => Self::Reserved,
        }
    }
}

/// The result of scanning one segment's records.
struct ScanResult {
    end: u64,
    newest: i64,
    records: u64,
    last_off: u64,
    problem: Option<CorruptionKind>,
}

/// Scans records from offset 64 until the end marker or the first invalid record, feeding the
/// index. Never panics on any bytes.
fn scan_segment(bytes: &[u8], base: u64, index: &mut Index) -> ScanResult {
    let mut r = ScanResult {
        end: DATA_START,
        newest: i64::MIN,
        records: 0,
        last_off: 0,
        problem: None,
    };
    loop {
        match format::decode_record(bytes, r.end) {
            Ok(Slot::End) => return r,
            Err(e) => {
                r.problem = Some(e.into());
                return r;
            }
            Ok(Slot::Record(rec)) => {
                let f = rec.fields;
                let lsn = base.saturating_add(r.end);
                if f.conversation != 0 {
                    if f.kind == KIND_SEQ_MARKER {
                        index.marker(f.conversation, f.seq, lsn);
                    } else {
                        if index.latest(f.conversation).is_some_and(|l| f.seq <= l) {
                            r.problem = Some(CorruptionKind::SeqNotIncreasing);
                            return r;
                        }
                        index.push(f.conversation, f.seq, lsn);
                    }
                }
                r.newest = r.newest.max(f.timestamp);
                r.records += 1;
                r.last_off = r.end;
                r.end = rec.next;
            }
        }
    }
}

const CHUNK: usize = 4096;

fn chunk_is_zero(c: &[u8]) -> bool {
    format::is_zero(c)
}

/// The offset of the first nonzero byte in `bytes[from..]`, if any.
fn first_nonzero(bytes: &[u8], from: u64) -> Option<u64> {
    let from = usize::try_from(from).ok()?;
    let tail = bytes.get(from..)?;
    tail.chunks(CHUNK)
        .enumerate()
        .find(|(_, c)| !chunk_is_zero(c))
        .and_then(|(i, c)| {
            let j = c.iter().position(|&b| b != 0)?;
            Some((from + i * CHUNK + j) as u64)
        })
}

/// Zeroes every nonzero byte of `seg` in `[from, len)` (writing only chunks that need it), then
/// syncs the range. Returns the number of bytes written.
fn zero_from<S: SegmentStore>(seg: &mut S, from: u64) -> io::Result<u64> {
    let len = seg.bytes().len() as u64;
    let mut at = from;
    let mut written = 0u64;
    while at < len {
        // Chunks aligned to 4 KiB so a zeroing write covers whole pages after the first.
        let chunk_end = ((at / CHUNK as u64) + 1) * CHUNK as u64;
        let end = chunk_end.min(len);
        let (a, e) = (at as usize, end as usize);
        let dirty = seg.bytes().get(a..e).is_some_and(|c| !chunk_is_zero(c));
        if dirty {
            seg.write(at, &[format::zeros(e - a)])?;
            written += end - at;
        }
        at = end;
    }
    if written > 0 {
        seg.sync_range(from, len).sync()?;
    }
    Ok(written)
}

/// A valid index file: what it says about its segment, its summary, and the view of it.
type LoadedIndex<X> = (SegmentSummary, Vec<ConvSummary>, X);

fn storage_io(op: &'static str) -> impl FnOnce(io::Error) -> OpenError {
    move |e| OpenError::Recovery(StorageError::io(op, e))
}

impl<B: Backend> Log<B> {
    /// Opens the log stored in `backend`, running recovery (FORMAT.md section 6), or creates a new
    /// one if it holds no segment. `now` is the current time (used for new segment headers and as
    /// the start of the flush interval).
    ///
    /// Everything found is synced before it is reported durable, so after open
    /// `durable_lsn() == written_lsn()`.
    pub fn open(
        mut backend: B,
        config: LogConfig,
        now: Timestamp,
    ) -> Result<(Self, RecoveryReport), OpenError> {
        if !format::valid_segment_size(config.segment_size) {
            return Err(OpenError::InvalidConfig(
                "segment_size must be a multiple of 4096 in [4 KiB, 4 GiB]",
            ));
        }
        if matches!(config.durability, crate::Durability::Interval(d) if d.is_zero()) {
            return Err(OpenError::InvalidConfig(
                "the flush interval must not be zero",
            ));
        }
        let mut report = RecoveryReport::default();
        let mut bases = backend.list().map_err(storage_io("listing segments"))?;
        bases.sort_unstable();
        bases.dedup();

        // 1. Headers.
        let mut valid: Vec<(u64, B::Segment)> = Vec::new();
        let mut size: Option<u64> = None;
        for base in bases {
            let seg = match backend.open(base) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    report.corruptions.push(bad_header(base));
                    continue;
                }
                Err(e) => return Err(storage_io("opening a segment")(e)),
            };
            let ok = match SegmentHeader::decode(seg.bytes()) {
                Ok(h) => {
                    h.base_lsn == base
                        && h.segment_size == seg.bytes().len() as u64
                        && size.is_none_or(|s| s == h.segment_size)
                }
                Err(_) => false,
            };
            if ok {
                size = Some(seg.bytes().len() as u64);
                valid.push((base, seg));
            } else {
                report.corruptions.push(bad_header(base));
            }
        }
        let segment_size = size.unwrap_or(config.segment_size);
        report.segment_size = segment_size;

        let mut log = Log {
            backend,
            config,
            segment_size,
            segments: VecDeque::new(),
            spare: None,
            ticket: std::sync::Weak::new(),
            rolls: 0,
            checkpoint: None,
            durable: 0,
            index: Index::new(),
            poisoned: Arc::new(AtomicBool::new(false)),
            clock: now,
            last_flush: now,
        };

        if valid.is_empty() {
            // 2'. A new log. Index files of an older log are orphans.
            log.remove_orphan_indexes(&[])?;
            let store = log.create_segment(0).map_err(OpenError::Recovery)?;
            log.segments.push_back(Segment::empty(0, store));
            report.created = true;
        } else {
            log.recover_segments(valid, &mut report)?;
        }

        // 7. Sync what was found: after a process crash it may be only in the page cache. A
        //    sealed segment opened from its index file is durable already (10.2).
        for seg in &log.segments {
            if seg.end > DATA_START && !matches!(seg.idx, Some(SegIdx::Mapped(_))) {
                seg.store
                    .sync_range(DATA_START, seg.end)
                    .sync()
                    .map_err(storage_io("syncing recovered segments"))?;
            }
        }
        log.durable = log.written_lsn().0;
        // 8. Index files for the sealed segments that were scanned cleanly (now durable).
        report.indexes_written = log.write_pending_indexes();
        // 9. The checkpoint.
        log.load_checkpoint(&mut report);
        if log.config.prefault {
            log.active().store.prefault();
            if let Some(spare) = &log.spare {
                spare.prefault();
            }
        }
        report.segments = log.segments.len();
        report.written_lsn = log.written_lsn();
        debug_assert_eq!(log.check_invariants(), Ok(()));
        Ok((log, report))
    }

    /// Steps 2–6 of FORMAT.md 6.1 over the segments with valid headers (sorted, non-empty).
    fn recover_segments(
        &mut self,
        valid: Vec<(u64, B::Segment)>,
        report: &mut RecoveryReport,
    ) -> Result<(), OpenError> {
        // 2. The active segment: the last one with any data.
        let active_idx = valid
            .iter()
            .rposition(|(_, s)| first_nonzero(s.bytes(), DATA_START).is_some())
            .unwrap_or(0);
        let mut zeroed_after = 0u64;
        let mut rest = valid;
        let after = rest.split_off(active_idx + 1);
        let active_base = rest.last().map_or(0, |(b, _)| *b);
        // Index files only belong to sealed segments: remove those of the active segment, of the
        // segments after it, and of segments that are gone or invalid.
        let sealed: Vec<u64> = rest
            .iter()
            .map(|(b, _)| *b)
            .filter(|&b| b != active_base)
            .collect();
        self.remove_orphan_indexes(&sealed)?;
        for (base, mut seg) in after {
            // Empty by definition of "active", up to stale bytes: erase them (6.3).
            zeroed_after += zero_from(&mut seg, DATA_START)
                .map_err(storage_io("zeroing a segment after the tail"))?;
            if self.spare.is_none() && Some(base) == active_base.checked_add(self.segment_size) {
                self.spare = Some(seg);
            } else {
                drop(seg);
                self.backend
                    .remove(base)
                    .map_err(storage_io("removing a stray segment"))?;
                report.removed_segments.push(Lsn(base));
            }
        }

        // 3. Sealed segments: report and skip corruption.
        let Some((active_base, mut active)) = rest.pop() else {
            return Err(OpenError::Recovery(StorageError::Corrupt { lsn: Lsn(0) }));
        };
        for (base, seg) in rest {
            if let Some((s, convs, view)) = self.load_index(base, &seg, report)? {
                self.index.add_sealed(base, &convs);
                report.records += s.records;
                report.indexed_segments += 1;
                self.segments.push_back(Segment {
                    base,
                    store: seg,
                    end: s.end,
                    newest: s.newest,
                    records: s.records,
                    last_off: s.last_off,
                    idx: Some(SegIdx::Mapped(view)),
                });
                continue;
            }
            let r = scan_segment(seg.bytes(), base, &mut self.index);
            let mut clean = true;
            if let Some(kind) = r.problem {
                clean = false;
                report.corruptions.push(Corruption {
                    segment: Lsn(base),
                    offset: r.end,
                    kind,
                });
            } else if let Some(at) = first_nonzero(seg.bytes(), r.end) {
                clean = false;
                report.corruptions.push(Corruption {
                    segment: Lsn(base),
                    offset: at,
                    kind: CorruptionKind::TrailingData,
                });
            }
            report.records += r.records;
            report.scanned_segments += 1;
            self.segments.push_back(Segment {
                base,
                store: seg,
                end: r.end,
                newest: r.newest,
                records: r.records,
                last_off: r.last_off,
                idx: None,
            });
            // Its index, in memory; written to a file after the sync (step 8) unless the segment
            // is corrupt: such a segment is scanned (and its corruption reported) at every open.
            self.seal_active();
            if !clean
                && let Some(Segment {
                    idx: Some(SegIdx::Owned(_, persist)),
                    ..
                }) = self.segments.back_mut()
            {
                *persist = false;
            }
        }

        // 4. The active segment: cut the torn tail, zero everything after it.
        let r = scan_segment(active.bytes(), active_base, &mut self.index);
        let zeroed = zero_from(&mut active, r.end).map_err(storage_io("zeroing the torn tail"))?;
        if r.problem.is_some() || zeroed > 0 || zeroed_after > 0 {
            report.torn_tail = Some(TornTail {
                lsn: Lsn(active_base + r.end),
                reason: r.problem,
                bytes_zeroed: zeroed + zeroed_after,
            });
        }
        report.records += r.records;
        report.scanned_segments += 1;
        self.segments.push_back(Segment {
            base: active_base,
            store: active,
            end: r.end,
            newest: r.newest,
            records: r.records,
            last_off: r.last_off,
            idx: None,
        });
        Ok(())
    }

    /// Deletes every index file whose segment is not one of `sealed` (sorted).
    fn remove_orphan_indexes(&mut self, sealed: &[u64]) -> Result<(), OpenError> {
        let sides = self
            .backend
            .list_side()
            .map_err(storage_io("listing side files"))?;
        for name in sides {
            if let SideFile::Index(base) = name
                && sealed.binary_search(&base).is_err()
            {
                self.backend
                    .remove_side(name)
                    .map_err(storage_io("removing a stale segment index"))?;
            }
        }
        Ok(())
    }

    /// The index file of sealed segment `base`, if present and valid for `seg` (FORMAT.md 10.3);
    /// an invalid one is reported and deleted.
    fn load_index(
        &mut self,
        base: u64,
        seg: &B::Segment,
        report: &mut RecoveryReport,
    ) -> Result<Option<LoadedIndex<B::Side>>, OpenError> {
        let view = match self.backend.read_side(SideFile::Index(base)) {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(None),
            Err(_) => {
                report.index_problems.push(IndexProblem {
                    segment: Lsn(base),
                    kind: IndexError::Unreadable,
                });
                return Ok(None);
            }
        };
        let checked =
            side::decode_index(view.as_ref(), base, self.segment_size).and_then(|(s, convs)| {
                if !side::matches_segment(&s, seg.bytes()) {
                    Err(IndexError::Stale)
                } else if !self.index.can_add_sealed(&convs) {
                    Err(IndexError::SeqConflict)
                } else {
                    Ok((s, convs))
                }
            });
        match checked {
            Ok((s, convs)) => Ok(Some((s, convs, view))),
            Err(kind) => {
                report.index_problems.push(IndexProblem {
                    segment: Lsn(base),
                    kind,
                });
                drop(view);
                self.backend
                    .remove_side(SideFile::Index(base))
                    .map_err(storage_io("removing an invalid segment index"))?;
                Ok(None)
            }
        }
    }

    /// Writes the pending index files on this thread (their segments are durable) and maps them;
    /// returns how many were written. A failure leaves the index pending for the next spare
    /// ticket.
    fn write_pending_indexes(&mut self) -> usize {
        let mut written = 0;
        for seg in &mut self.segments {
            let Some(SegIdx::Owned(bytes, true)) = &seg.idx else {
                continue;
            };
            let base = seg.base;
            if self
                .backend
                .write_side(SideFile::Index(base), bytes)
                .is_err()
            {
                continue;
            }
            written += 1;
            seg.idx = match self.backend.read_side(SideFile::Index(base)) {
                Ok(Some(view)) if view.as_ref().len() == bytes.len() => Some(SegIdx::Mapped(view)),
                // Written, but not mappable now: keep the bytes, done with the file.
                _ => Some(SegIdx::Owned(Arc::clone(bytes), false)),
            };
        }
        written
    }

    /// Loads the checkpoint file, if any and valid (FORMAT.md 11).
    fn load_checkpoint(&mut self, report: &mut RecoveryReport) {
        let view = match self.backend.read_side(SideFile::Checkpoint) {
            Ok(Some(v)) => v,
            Ok(None) => return,
            Err(_) => {
                report.checkpoint_ignored = Some(CheckpointProblem::Unreadable);
                return;
            }
        };
        match side::decode_checkpoint(view.as_ref()) {
            None => report.checkpoint_ignored = Some(CheckpointProblem::Corrupt),
            Some(c) if c.covers > self.written_lsn().0 => {
                report.checkpoint_ignored = Some(CheckpointProblem::BeyondLog {
                    covers: Lsn(c.covers),
                    written: self.written_lsn(),
                });
            }
            Some(c) => {
                report.checkpoint = Some(Lsn(c.covers));
                self.checkpoint = Some((c.covers, c.payload.to_vec()));
            }
        }
    }
}

fn bad_header(base: u64) -> Corruption {
    Corruption {
        segment: Lsn(base),
        offset: 0,
        kind: CorruptionKind::BadHeader,
    }
}
