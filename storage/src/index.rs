//! The per-conversation index (FORMAT.md section 7): conversation -> where its records are.
//!
//! Per conversation: the latest seq ever seen (kept after retention drops the records), one
//! [`Span`] per sealed segment holding some of its records (first seq, count, and where its entry
//! block is in that segment's index, FORMAT.md 10), and the `(seq, lsn)` entries of its records in
//! the active segment. Per-record entries of sealed segments live in their index (a file, mapped,
//! or bytes in memory until the file is written), never in this map.
//!
//! Memory: 16 bytes per record of the active segment (plus `Vec` growth slack), 32 bytes per
//! (conversation, sealed segment) pair, and ~100 bytes per conversation; see [`Index::heap_bytes`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::ops::Range;

use crate::side::{ConvPart, ConvSummary};

/// One indexed record of the active segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) lsn: u64,
}

/// A conversation's records in one sealed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    /// The segment's base LSN.
    pub(crate) base: u64,
    /// The first seq of the conversation in that segment.
    pub(crate) first: u64,
    /// Byte offset of its entry block in the segment's index.
    pub(crate) start: u64,
    /// Number of its records in the segment (>= 1).
    pub(crate) count: u32,
}

/// What the index knows about one conversation.
#[derive(Debug, Default)]
pub(crate) struct Conv {
    /// Sealed segments holding its records, oldest first (seqs increase from span to span).
    spans: Vec<Span>,
    /// Its records in the active segment, strictly increasing in seq and in lsn.
    active: Vec<Entry>,
    /// The latest seq ever appended (or carried by a seq marker); `>=` every entry's seq.
    latest: u64,
    /// LSN of the newest record or marker of this conversation (what retention must preserve).
    last_lsn: u64,
}

impl Conv {
    /// Sealed spans and active entries.
    pub(crate) fn parts(&self) -> (&[Span], &[Entry]) {
        (&self.spans, &self.active)
    }
}

/// Conversation id -> index entries.
#[derive(Debug)]
pub(crate) struct Index {
    map: HashMap<u64, Conv, SeededHash>,
    /// Conversations with records or markers in the active segment (possibly repeated).
    touched: Vec<u64>,
    /// Seq markers in the active segment: (conversation, seq, lsn).
    markers: Vec<(u64, u64, u64)>,
}

impl Index {
    pub(crate) fn new() -> Self {
        Self {
            map: HashMap::with_hasher(SeededHash::new()),
            touched: Vec::new(),
            markers: Vec::new(),
        }
    }

    /// The latest seq of a conversation, if it is known.
    #[inline]
    pub(crate) fn latest(&self, conv: u64) -> Option<u64> {
        self.map.get(&conv).map(|c| c.latest)
    }

    /// The first seq still in the log, if the conversation has records.
    pub(crate) fn first(&self, conv: u64) -> Option<u64> {
        let c = self.map.get(&conv)?;
        match c.spans.first() {
            Some(s) => Some(s.first),
            None => c.active.first().map(|e| e.seq),
        }
    }

    /// A conversation's entry.
    pub(crate) fn conv(&self, conv: u64) -> Option<&Conv> {
        self.map.get(&conv)
    }

    /// Number of conversations known (with records, or only a latest seq).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Records a new record in the active segment. The caller checked `seq > latest`.
    #[inline]
    pub(crate) fn push(&mut self, conv: u64, seq: u64, lsn: u64) {
        let c = self.map.entry(conv).or_default();
        debug_assert!(
            (c.active.is_empty() && c.spans.is_empty()) || seq > c.latest,
            "index: seq must increase"
        );
        debug_assert!(
            c.active.last().is_none_or(|e| lsn > e.lsn),
            "index: lsn must increase"
        );
        if c.active.is_empty() {
            self.touched.push(conv);
        }
        c.active.push(Entry { seq, lsn });
        c.latest = seq;
        c.last_lsn = lsn;
    }

    /// Records a seq marker in the active segment: the conversation's latest seq is at least
    /// `seq`.
    pub(crate) fn marker(&mut self, conv: u64, seq: u64, lsn: u64) {
        let c = self.map.entry(conv).or_default();
        c.latest = c.latest.max(seq);
        c.last_lsn = lsn;
        self.markers.push((conv, seq, lsn));
    }

    /// Takes the active segment's entries and markers out of the map, per conversation sorted by
    /// conversation, to encode the sealed segment's index. Follow with [`Index::add_sealed`].
    pub(crate) fn take_active(&mut self) -> Vec<ConvPart> {
        let mut convs = std::mem::take(&mut self.touched);
        convs.extend(self.markers.iter().map(|m| m.0));
        convs.sort_unstable();
        convs.dedup();
        let mut parts: Vec<ConvPart> = Vec::with_capacity(convs.len());
        for conv in convs {
            let Some(c) = self.map.get_mut(&conv) else {
                continue;
            };
            let entries = std::mem::take(&mut c.active);
            let (latest, last_lsn) = entries.last().map_or((0, 0), |e| (e.seq, e.lsn));
            parts.push(ConvPart {
                conv,
                entries,
                latest,
                last_lsn,
            });
        }
        for (conv, seq, lsn) in std::mem::take(&mut self.markers) {
            if let Ok(i) = parts.binary_search_by_key(&conv, |p| p.conv) {
                let p = &mut parts[i];
                p.latest = p.latest.max(seq);
                p.last_lsn = p.last_lsn.max(lsn);
            }
        }
        parts
    }

    /// Checks that a sealed segment's summary can follow what the index holds: every
    /// conversation's first seq there is above its latest seq so far.
    pub(crate) fn can_add_sealed(&self, convs: &[ConvSummary]) -> bool {
        convs.iter().all(|s| {
            s.count == 0
                || self
                    .map
                    .get(&s.conv)
                    .is_none_or(|c| c.active.is_empty() && s.first > c.latest)
        })
    }

    /// Adds a sealed segment (from its index summary) after every segment already indexed.
    pub(crate) fn add_sealed(&mut self, base: u64, convs: &[ConvSummary]) {
        for s in convs {
            let c = self.map.entry(s.conv).or_default();
            if s.count > 0 {
                c.spans.push(Span {
                    base,
                    first: s.first,
                    start: s.start,
                    count: s.count,
                });
            }
            c.latest = c.latest.max(s.latest);
            c.last_lsn = c.last_lsn.max(base.saturating_add(s.last_off));
        }
    }

    /// The active entries of `conv` with seq in `seqs` (binary search).
    pub(crate) fn active_range(&self, conv: u64, seqs: Range<u64>) -> &[Entry] {
        let Some(c) = self.map.get(&conv) else {
            return &[];
        };
        let lo = c.active.partition_point(|e| e.seq < seqs.start);
        let hi = c.active.partition_point(|e| e.seq < seqs.end).max(lo);
        &c.active[lo..hi]
    }

    /// Conversations whose newest record or marker is below `first_lsn`, with their latest seq:
    /// those that would vanish if everything below `first_lsn` were dropped.
    pub(crate) fn vanishing(&self, first_lsn: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .map
            .iter()
            .filter(|(_, c)| c.last_lsn < first_lsn)
            .map(|(&conv, c)| (conv, c.latest))
            .collect();
        out.sort_unstable();
        out
    }

    /// Removes every span and entry below `first_lsn`; conversations keep their latest seq.
    /// Returns the number of records removed from the index.
    pub(crate) fn drop_below(&mut self, first_lsn: u64) -> u64 {
        let mut removed = 0u64;
        for c in self.map.values_mut() {
            let k = c.spans.partition_point(|s| s.base < first_lsn);
            if k > 0 {
                removed += c.spans[..k].iter().map(|s| u64::from(s.count)).sum::<u64>();
                c.spans.drain(..k);
                if c.spans.len() < c.spans.capacity() / 4 {
                    c.spans.shrink_to(c.spans.len() * 2);
                }
            }
            let k = c.active.partition_point(|e| e.lsn < first_lsn);
            if k > 0 {
                removed += k as u64;
                c.active.drain(..k);
            }
        }
        removed
    }

    /// Bytes of heap this index uses (entries' and spans' capacity, the table's buckets), an
    /// estimate.
    pub(crate) fn heap_bytes(&self) -> usize {
        let buckets = self.map.capacity() * (size_of::<u64>() + size_of::<Conv>() + 1);
        let vecs: usize = self
            .map
            .values()
            .map(|c| {
                c.active.capacity() * size_of::<Entry>() + c.spans.capacity() * size_of::<Span>()
            })
            .sum();
        buckets + vecs + (self.touched.capacity() + self.markers.capacity() * 3) * 8
    }

    /// Checks the index invariants (FORMAT.md 9.5); `first_lsn` is the oldest segment's base and
    /// `active_base` the active segment's.
    pub(crate) fn check(&self, first_lsn: u64, active_base: u64) -> Result<(), String> {
        for (&conv, c) in &self.map {
            for w in c.active.windows(2) {
                if !(w[0].seq < w[1].seq && w[0].lsn < w[1].lsn) {
                    return Err(format!("conversation {conv}: entries not increasing"));
                }
            }
            for w in c.spans.windows(2) {
                if !(w[0].first < w[1].first && w[0].base < w[1].base) {
                    return Err(format!("conversation {conv}: spans not increasing"));
                }
            }
            if c.spans
                .iter()
                .any(|s| s.base < first_lsn || s.base >= active_base)
            {
                return Err(format!(
                    "conversation {conv}: span outside the sealed segments"
                ));
            }
            if let Some(first) = c.active.first()
                && first.lsn < active_base
            {
                return Err(format!(
                    "conversation {conv}: active entry below the active segment"
                ));
            }
            if let (Some(s), Some(e)) = (c.spans.last(), c.active.first())
                && s.first >= e.seq
            {
                return Err(format!("conversation {conv}: spans overlap active entries"));
            }
            if let Some(last) = c.active.last()
                && (c.latest < last.seq || c.last_lsn < last.lsn)
            {
                return Err(format!("conversation {conv}: latest behind its entries"));
            }
            if c.spans.last().is_some_and(|s| c.latest < s.first) {
                return Err(format!("conversation {conv}: latest behind its spans"));
            }
        }
        Ok(())
    }
}

/// A keyed multiply-fold hash for `u64` conversation ids: much faster than SipHash on the append
/// path, seeded per process from the standard library's random keys so ids chosen by an attacker
/// can not be precomputed to collide.
#[derive(Debug, Clone)]
pub(crate) struct SeededHash {
    seed: u64,
}

impl SeededHash {
    fn new() -> Self {
        Self {
            seed: RandomState::new().hash_one(0x5eed_u64) | 1,
        }
    }
}

impl BuildHasher for SeededHash {
    type Hasher = FoldHasher;

    #[inline]
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher {
            seed: self.seed,
            hash: 0,
        }
    }
}

/// The hasher built by [`SeededHash`].
#[derive(Debug)]
pub(crate) struct FoldHasher {
    seed: u64,
    hash: u64,
}

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Hasher for FoldHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(buf));
        }
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.hash = fold_mul(x ^ self.seed ^ self.hash, 0x9E37_79B9_7F4A_7C15);
    }

    #[inline]
    fn finish(&self) -> u64 {
        fold_mul(self.hash, self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_range_is_half_open_and_sorted() {
        let mut ix = Index::new();
        for (i, seq) in [1u64, 2, 5, 9].into_iter().enumerate() {
            ix.push(7, seq, 64 + i as u64 * 64);
        }
        let seqs: Vec<u64> = ix.active_range(7, 2..9).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 5]);
        let (hi, lo) = (9, 2);
        assert!(ix.active_range(7, hi..lo).is_empty());
        assert!(ix.active_range(8, 0..100).is_empty());
        assert_eq!(ix.latest(7), Some(9));
        assert_eq!(ix.first(7), Some(1));
    }

    #[test]
    fn take_active_groups_entries_and_markers_by_conversation() {
        let mut ix = Index::new();
        ix.push(2, 1, 64);
        ix.push(1, 4, 128);
        ix.marker(3, 9, 192);
        ix.push(2, 2, 256);
        let parts = ix.take_active();
        let convs: Vec<u64> = parts.iter().map(|p| p.conv).collect();
        assert_eq!(convs, vec![1, 2, 3]);
        assert_eq!(parts[1].entries.len(), 2);
        assert_eq!((parts[2].latest, parts[2].last_lsn), (9, 192));
        assert!(ix.active_range(2, 0..10).is_empty());
        assert_eq!(ix.latest(2), Some(2));
    }

    #[test]
    fn drop_below_keeps_latest_and_reports_vanishing() {
        let mut ix = Index::new();
        ix.push(1, 10, 100);
        ix.push(2, 3, 200);
        ix.push(1, 11, 300);
        assert_eq!(ix.vanishing(250), vec![(2, 3)]);
        assert_eq!(ix.drop_below(250), 2);
        assert_eq!(ix.first(2), None);
        assert_eq!(ix.latest(2), Some(3));
        assert_eq!(ix.first(1), Some(11));
        ix.check(250, 0).expect("invariants");
    }
}
