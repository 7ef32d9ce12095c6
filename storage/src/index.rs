//! The per-conversation index (FORMAT.md section 7): conversation -> sorted `(seq, lsn)` entries,
//! plus the latest seq ever seen (kept after retention drops the records).
//!
//! Memory: 16 bytes per indexed record in a `Vec` (plus its amortized growth slack) and a few dozen
//! bytes per conversation; see [`Index::heap_bytes`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::ops::Range;

/// One indexed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) lsn: u64,
}

/// What the index knows about one conversation.
#[derive(Debug, Default)]
pub(crate) struct Conv {
    /// Records still in the log, strictly increasing in seq and in lsn.
    entries: Vec<Entry>,
    /// The latest seq ever appended (or carried by a seq marker); `>=` the last entry's seq.
    latest: u64,
    /// LSN of the newest record or marker of this conversation (what retention must preserve).
    last_lsn: u64,
}

/// Conversation id -> index entries.
#[derive(Debug)]
pub(crate) struct Index {
    map: HashMap<u64, Conv, SeededHash>,
}

impl Index {
    pub(crate) fn new() -> Self {
        Self {
            map: HashMap::with_hasher(SeededHash::new()),
        }
    }

    /// The latest seq of a conversation, if it is known.
    #[inline]
    pub(crate) fn latest(&self, conv: u64) -> Option<u64> {
        self.map.get(&conv).map(|c| c.latest)
    }

    /// The first seq still in the log, if the conversation has records.
    pub(crate) fn first(&self, conv: u64) -> Option<u64> {
        self.map
            .get(&conv)
            .and_then(|c| c.entries.first())
            .map(|e| e.seq)
    }

    /// Number of conversations known (with records, or only a latest seq).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Records a new record. The caller checked `seq > latest`.
    #[inline]
    pub(crate) fn push(&mut self, conv: u64, seq: u64, lsn: u64) {
        let c = self.map.entry(conv).or_default();
        debug_assert!(
            c.entries.is_empty() || seq > c.latest,
            "index: seq must increase"
        );
        debug_assert!(
            c.entries.last().is_none_or(|e| lsn > e.lsn),
            "index: lsn must increase"
        );
        c.entries.push(Entry { seq, lsn });
        c.latest = seq;
        c.last_lsn = lsn;
    }

    /// Records a seq marker: the conversation's latest seq is at least `seq`.
    pub(crate) fn marker(&mut self, conv: u64, seq: u64, lsn: u64) {
        let c = self.map.entry(conv).or_default();
        c.latest = c.latest.max(seq);
        c.last_lsn = lsn;
    }

    /// The entries of `conv` with seq in `seqs` (binary search).
    pub(crate) fn range(&self, conv: u64, seqs: Range<u64>) -> &[Entry] {
        let Some(c) = self.map.get(&conv) else {
            return &[];
        };
        let lo = c.entries.partition_point(|e| e.seq < seqs.start);
        let hi = c.entries.partition_point(|e| e.seq < seqs.end).max(lo);
        &c.entries[lo..hi]
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

    /// Removes every entry with `lsn < first_lsn`; conversations keep their latest seq.
    pub(crate) fn drop_below(&mut self, first_lsn: u64) -> u64 {
        let mut removed = 0u64;
        for c in self.map.values_mut() {
            let k = c.entries.partition_point(|e| e.lsn < first_lsn);
            if k == 0 {
                continue;
            }
            removed += k as u64;
            c.entries.drain(..k);
            if c.entries.len() < c.entries.capacity() / 4 {
                c.entries.shrink_to(c.entries.len() * 2);
            }
        }
        removed
    }

    /// Bytes of heap this index uses (entries' capacity, the table's buckets), an estimate.
    pub(crate) fn heap_bytes(&self) -> usize {
        let buckets = self.map.capacity() * (size_of::<u64>() + size_of::<Conv>() + 1);
        let entries: usize = self
            .map
            .values()
            .map(|c| c.entries.capacity() * size_of::<Entry>())
            .sum();
        buckets + entries
    }

    /// Checks the index invariants (FORMAT.md 9.5); `first_lsn` is the oldest segment's base.
    pub(crate) fn check(&self, first_lsn: u64) -> Result<(), String> {
        for (&conv, c) in &self.map {
            for w in c.entries.windows(2) {
                if !(w[0].seq < w[1].seq && w[0].lsn < w[1].lsn) {
                    return Err(format!("conversation {conv}: entries not increasing"));
                }
            }
            if let Some(first) = c.entries.first()
                && first.lsn < first_lsn
            {
                return Err(format!(
                    "conversation {conv}: entry below the first segment"
                ));
            }
            if let Some(last) = c.entries.last()
                && (c.latest < last.seq || c.last_lsn < last.lsn)
            {
                return Err(format!("conversation {conv}: latest behind its entries"));
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
    fn range_is_half_open_and_sorted() {
        let mut ix = Index::new();
        for (i, seq) in [1u64, 2, 5, 9].into_iter().enumerate() {
            ix.push(7, seq, 64 + i as u64 * 64);
        }
        let seqs: Vec<u64> = ix.range(7, 2..9).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 5]);
        let (hi, lo) = (9, 2);
        assert!(ix.range(7, hi..lo).is_empty());
        assert!(ix.range(8, 0..100).is_empty());
        assert_eq!(ix.latest(7), Some(9));
        assert_eq!(ix.first(7), Some(1));
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
        ix.check(250).expect("invariants");
    }
}
