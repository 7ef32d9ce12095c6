//! Retention: dropping whole old segments (FORMAT.md section 8).

use crate::backend::{Backend, SideFile};
use crate::format::{KIND_SEQ_MARKER, RecordFields};
use crate::{Log, Lsn, StorageError, Timestamp};

/// What [`Log::apply_retention`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_removed: usize,
    /// Bytes of segment files deleted.
    pub bytes_removed: u64,
    /// Records (seq markers included) that were in the deleted segments.
    pub records_removed: u64,
    /// Index entries removed.
    pub index_entries_removed: u64,
    /// Seq markers written to keep the latest seq of conversations left without records.
    pub markers_written: usize,
    /// The oldest LSN still in the log afterwards.
    pub first_lsn: Lsn,
}

impl<B: Backend> Log<B> {
    /// Drops the oldest sealed segments that are over the configured limits (FORMAT.md 8):
    /// while `segments in use × segment_size > max_bytes`, or while the oldest segment's newest
    /// record is older than `max_age` at `now`. Never drops the active segment.
    ///
    /// Conversations that would lose all their records keep their latest seq, in the index and on
    /// disk (a seq marker is appended). Before any file is deleted the log is flushed, so this does
    /// a sync: call it from `tick`, off the append path. A failed sync poisons the log and deletes
    /// nothing; a failed delete returns the error (the file comes back on the next open, harmless).
    pub fn apply_retention(&mut self, now: Timestamp) -> Result<RetentionReport, StorageError> {
        if self.is_poisoned() {
            return Err(StorageError::Poisoned);
        }
        let mut report = RetentionReport {
            first_lsn: self.first_lsn(),
            ..RetentionReport::default()
        };
        let r = self.config.retention;
        let s = self.segment_size;
        let sealed = self.segments.len() - 1;
        let mut drop_n = 0;
        while drop_n < sealed {
            let remaining = (self.segments.len() - drop_n) as u64;
            let over_size = r.max_bytes.is_some_and(|m| remaining.saturating_mul(s) > m);
            let newest = self.segments[drop_n].newest;
            let too_old = r.max_age.is_some_and(|age| {
                newest == i64::MIN || now.saturating_since(Timestamp::from_micros(newest)) > age
            });
            if !(over_size || too_old) {
                break;
            }
            drop_n += 1;
        }
        if drop_n == 0 {
            return Ok(report);
        }
        let new_first = self.segments[drop_n].base;

        // Keep the latest seq of conversations that would vanish.
        for (conversation, latest) in self.index.vanishing(new_first) {
            let marker = RecordFields {
                kind: KIND_SEQ_MARKER,
                conversation,
                seq: latest,
                msg_id: 0,
                timestamp: now.micros(),
            };
            self.append_raw(&marker, &[])?;
            report.markers_written += 1;
        }
        // Nothing is deleted before everything (markers included) is durable.
        self.flush()?;

        let dropped: Vec<_> = self.segments.drain(..drop_n).collect();
        report.index_entries_removed = self.index.drop_below(new_first);
        report.first_lsn = self.first_lsn();
        for seg in dropped {
            let base = seg.base;
            report.records_removed += seg.records;
            // Unmap before deleting (a sync ticket may still hold the map: unlink does not
            // truncate, so that is harmless).
            drop(seg);
            self.backend
                .remove(base)
                .map_err(|e| StorageError::io("removing a segment", e))?;
            // Its index file, if written (an index still being written by a spare ticket is
            // removed by `install_spare`, or as an orphan by the next open).
            self.backend
                .remove_side(SideFile::Index(base))
                .map_err(|e| StorageError::io("removing a segment index", e))?;
            report.segments_removed += 1;
            report.bytes_removed += s;
        }
        debug_assert_eq!(self.check_invariants(), Ok(()));
        Ok(report)
    }
}
