//! Opening a log: recovery (FORMAT.md section 6).
//!
//! Validates segment headers, finds the active segment, scans sealed segments (reporting and
//! skipping corruption), cuts the torn tail of the active segment and zeroes everything after it,
//! rebuilds the index, and syncs what it found before calling it durable.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::backend::{Backend, SegmentStore, SegmentSync};
use crate::format::{self, KIND_SEQ_MARKER, RecordError, SegmentHeader, Slot};
use crate::index::Index;
use crate::log::{DATA_START, Segment};
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
    problem: Option<CorruptionKind>,
}

/// Scans records from offset 64 until the end marker or the first invalid record, feeding the
/// index. Never panics on any bytes.
fn scan_segment(bytes: &[u8], base: u64, index: &mut Index) -> ScanResult {
    let mut r = ScanResult {
        end: DATA_START,
        newest: i64::MIN,
        records: 0,
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
            durable: 0,
            index: Index::new(),
            poisoned: Arc::new(AtomicBool::new(false)),
            clock: now,
            last_flush: now,
        };

        if valid.is_empty() {
            // 2'. A new log.
            let store = log.create_segment(0).map_err(OpenError::Recovery)?;
            log.segments.push_back(Segment {
                base: 0,
                store,
                end: DATA_START,
                newest: i64::MIN,
                records: 0,
            });
            report.created = true;
        } else {
            log.recover_segments(valid, &mut report)?;
        }

        // 7. Sync what was found: after a process crash it may be only in the page cache.
        for seg in &log.segments {
            if seg.end > DATA_START {
                seg.store
                    .sync_range(DATA_START, seg.end)
                    .sync()
                    .map_err(storage_io("syncing recovered segments"))?;
            }
        }
        log.durable = log.written_lsn().0;
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
            let r = scan_segment(seg.bytes(), base, &mut self.index);
            if let Some(kind) = r.problem {
                report.corruptions.push(Corruption {
                    segment: Lsn(base),
                    offset: r.end,
                    kind,
                });
            } else if let Some(at) = first_nonzero(seg.bytes(), r.end) {
                report.corruptions.push(Corruption {
                    segment: Lsn(base),
                    offset: at,
                    kind: CorruptionKind::TrailingData,
                });
            }
            report.records += r.records;
            self.segments.push_back(Segment {
                base,
                store: seg,
                end: r.end,
                newest: r.newest,
                records: r.records,
            });
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
        self.segments.push_back(Segment {
            base: active_base,
            store: active,
            end: r.end,
            newest: r.newest,
            records: r.records,
        });
        Ok(())
    }
}

fn bad_header(base: u64) -> Corruption {
    Corruption {
        segment: Lsn(base),
        offset: 0,
        kind: CorruptionKind::BadHeader,
    }
}
