//! The byte layout of the side files (FORMAT.md sections 10 and 11): segment indexes and the
//! application checkpoint.
//!
//! Pure functions over byte slices: no I/O. Decoders take untrusted bytes and return a typed error
//! instead of panicking; all arithmetic on values read from disk is checked.

use crate::format::{self, Slot};
use crate::index::Entry;

/// Magic bytes at the start of a segment index file.
pub(crate) const INDEX_MAGIC: [u8; 8] = *b"PRLYIDX\0";
/// Version of the index file format.
pub(crate) const INDEX_VERSION: u32 = 1;
/// Length of the index file header.
pub(crate) const INDEX_HEADER_LEN: usize = 96;
/// Offset of the header CRC inside the index header.
const INDEX_HEADER_CRC_OFFSET: usize = 92;
/// Length of one summary entry (one conversation).
pub(crate) const SUMMARY_LEN: usize = 48;
/// Length of one index entry (seq u64, offset u32).
pub(crate) const ENTRY_LEN: usize = 12;
/// Index entries per CRC chunk.
pub(crate) const CHUNK: usize = 128;

/// Magic bytes at the start of the checkpoint file.
pub(crate) const CHECKPOINT_MAGIC: [u8; 8] = *b"PRLYCKP\0";
/// Version of the checkpoint file format.
pub(crate) const CHECKPOINT_VERSION: u32 = 1;
/// Length of the checkpoint header; the payload follows it.
pub(crate) const CHECKPOINT_HEADER_LEN: usize = 40;

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// What a segment index says about its segment (the header's fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentSummary {
    pub(crate) base: u64,
    pub(crate) segment_size: u64,
    /// Offset of the end of the segment's data.
    pub(crate) end: u64,
    /// Records and markers in the segment.
    pub(crate) records: u64,
    /// Newest record or marker timestamp (micros), `i64::MIN` if none.
    pub(crate) newest: i64,
    /// Offset of the last record or marker (0 if none).
    pub(crate) last_off: u64,
    /// The stored CRC of that record (0 if none).
    pub(crate) last_crc: u32,
}

/// One conversation's part of a segment, to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConvPart {
    pub(crate) conv: u64,
    /// Its records in the segment (absolute LSNs), increasing.
    pub(crate) entries: Vec<Entry>,
    /// The highest seq of its records and markers in the segment.
    pub(crate) latest: u64,
    /// LSN of its newest record or marker in the segment.
    pub(crate) last_lsn: u64,
}

/// One decoded summary entry, with where its entry block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvSummary {
    pub(crate) conv: u64,
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) latest: u64,
    pub(crate) last_off: u64,
    pub(crate) count: u32,
    /// Byte offset of the conversation's block (chunk CRCs, then entries) in the file.
    pub(crate) start: u64,
}

/// Why a segment's index file (FORMAT.md 10) was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexError {
    /// Too short, bad magic, version or header length.
    Header,
    /// The header or summary CRC does not match.
    Checksum,
    /// The fields are inconsistent (sizes, counts, order, file length).
    Malformed,
    /// The index is valid but belongs to other segment contents (base, size, last record, end).
    Stale,
    /// Its sequence numbers conflict with the segments before it.
    SeqConflict,
    /// It could not be read (an I/O error).
    Unreadable,
}

fn chunks_of(count: u64) -> u64 {
    count.div_ceil(CHUNK as u64)
}

/// Bytes of a conversation's block: chunk CRCs and entries.
fn block_len(count: u64) -> Option<u64> {
    chunks_of(count)
        .checked_mul(4)?
        .checked_add(count.checked_mul(ENTRY_LEN as u64)?)
}

/// Encodes the index of a segment, and returns it with its decoded summary (what
/// [`decode_index`] would return). `parts` are sorted by conversation (strictly), each with
/// entries inside the segment.
pub(crate) fn encode_index(s: &SegmentSummary, parts: &[ConvPart]) -> (Vec<u8>, Vec<ConvSummary>) {
    let entries: u64 = parts.iter().map(|p| p.entries.len() as u64).sum();
    let blocks: u64 = parts
        .iter()
        .map(|p| block_len(p.entries.len() as u64).unwrap_or(0))
        .sum();
    let total = INDEX_HEADER_LEN + parts.len() * SUMMARY_LEN + blocks as usize;
    let mut b = vec![0u8; INDEX_HEADER_LEN];
    b.reserve(total - INDEX_HEADER_LEN);
    let mut summaries = Vec::with_capacity(parts.len());
    let mut start = (INDEX_HEADER_LEN + parts.len() * SUMMARY_LEN) as u64;
    for p in parts {
        let mut e = [0u8; SUMMARY_LEN];
        e[0..8].copy_from_slice(&p.conv.to_le_bytes());
        let (first, last) = match (p.entries.first(), p.entries.last()) {
            (Some(f), Some(l)) => (f.seq, l.seq),
            _ => (0, 0),
        };
        e[8..16].copy_from_slice(&first.to_le_bytes());
        e[16..24].copy_from_slice(&last.to_le_bytes());
        e[24..32].copy_from_slice(&p.latest.to_le_bytes());
        e[32..40].copy_from_slice(&(p.last_lsn - s.base).to_le_bytes());
        e[40..44].copy_from_slice(&(p.entries.len() as u32).to_le_bytes());
        b.extend_from_slice(&e);
        summaries.push(ConvSummary {
            conv: p.conv,
            first,
            last,
            latest: p.latest,
            last_off: p.last_lsn - s.base,
            count: p.entries.len() as u32,
            start,
        });
        start += block_len(p.entries.len() as u64).unwrap_or(0);
    }
    let summary_crc = crc32c::crc32c(&b[INDEX_HEADER_LEN..]);
    for p in parts {
        let mut raw = Vec::with_capacity(p.entries.len() * ENTRY_LEN);
        for e in &p.entries {
            raw.extend_from_slice(&e.seq.to_le_bytes());
            raw.extend_from_slice(&((e.lsn - s.base) as u32).to_le_bytes());
        }
        for chunk in raw.chunks(CHUNK * ENTRY_LEN) {
            b.extend_from_slice(&crc32c::crc32c(chunk).to_le_bytes());
        }
        b.extend_from_slice(&raw);
    }
    debug_assert_eq!(b.len(), total);
    let h = &mut b[..INDEX_HEADER_LEN];
    h[0..8].copy_from_slice(&INDEX_MAGIC);
    h[8..12].copy_from_slice(&INDEX_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(INDEX_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&s.base.to_le_bytes());
    h[24..32].copy_from_slice(&s.segment_size.to_le_bytes());
    h[32..40].copy_from_slice(&s.end.to_le_bytes());
    h[40..48].copy_from_slice(&s.records.to_le_bytes());
    h[48..56].copy_from_slice(&s.newest.to_le_bytes());
    h[56..64].copy_from_slice(&s.last_off.to_le_bytes());
    h[64..68].copy_from_slice(&s.last_crc.to_le_bytes());
    h[68..72].copy_from_slice(&(parts.len() as u32).to_le_bytes());
    h[72..80].copy_from_slice(&entries.to_le_bytes());
    h[80..84].copy_from_slice(&summary_crc.to_le_bytes());
    let crc = crc32c::crc32c(&h[..INDEX_HEADER_CRC_OFFSET]);
    h[INDEX_HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    (b, summaries)
}

/// Decodes and validates an index file's header and summary (not its entry blocks, which are
/// verified chunk by chunk when read). O(conversations in the segment).
pub(crate) fn decode_index(
    b: &[u8],
    base: u64,
    segment_size: u64,
) -> Result<(SegmentSummary, Vec<ConvSummary>), IndexError> {
    let h = b.get(..INDEX_HEADER_LEN).ok_or(IndexError::Header)?;
    if h[0..8] != INDEX_MAGIC
        || read_u32(h, 8) != Some(INDEX_VERSION)
        || read_u32(h, 12) != Some(INDEX_HEADER_LEN as u32)
    {
        return Err(IndexError::Header);
    }
    if read_u32(h, INDEX_HEADER_CRC_OFFSET) != Some(crc32c::crc32c(&h[..INDEX_HEADER_CRC_OFFSET])) {
        return Err(IndexError::Checksum);
    }
    let field = |at| read_u64(h, at).ok_or(IndexError::Header);
    let s = SegmentSummary {
        base: field(16)?,
        segment_size: field(24)?,
        end: field(32)?,
        records: field(40)?,
        newest: field(48)? as i64,
        last_off: field(56)?,
        last_crc: read_u32(h, 64).ok_or(IndexError::Header)?,
    };
    if s.base != base || s.segment_size != segment_size {
        return Err(IndexError::Stale);
    }
    if h[84..92].iter().any(|&x| x != 0) {
        return Err(IndexError::Malformed);
    }
    let data_start = format::SEGMENT_HEADER_LEN as u64;
    let ends_ok = s.end >= data_start
        && s.end <= segment_size
        && s.end.is_multiple_of(format::RECORD_ALIGN as u64)
        && if s.records == 0 {
            s.end == data_start && s.last_off == 0
        } else {
            s.last_off >= data_start && s.last_off < s.end
        };
    if !ends_ok {
        return Err(IndexError::Malformed);
    }
    let conversations = read_u32(h, 68).ok_or(IndexError::Header)? as usize;
    let entries = field(72)?;
    let summary_len = conversations
        .checked_mul(SUMMARY_LEN)
        .ok_or(IndexError::Malformed)?;
    let summary_end = INDEX_HEADER_LEN
        .checked_add(summary_len)
        .ok_or(IndexError::Malformed)?;
    let summary = b
        .get(INDEX_HEADER_LEN..summary_end)
        .ok_or(IndexError::Malformed)?;
    if read_u32(h, 80) != Some(crc32c::crc32c(summary)) {
        return Err(IndexError::Checksum);
    }
    let mut out = Vec::with_capacity(conversations);
    let mut start = summary_end as u64;
    let mut total = 0u64;
    let mut prev_conv = 0u64;
    for e in summary.chunks_exact(SUMMARY_LEN) {
        let f = |at| read_u64(e, at).ok_or(IndexError::Malformed);
        let c = ConvSummary {
            conv: f(0)?,
            first: f(8)?,
            last: f(16)?,
            latest: f(24)?,
            last_off: f(32)?,
            count: read_u32(e, 40).ok_or(IndexError::Malformed)?,
            start,
        };
        let ok = c.conv > prev_conv
            && read_u32(e, 44) == Some(0)
            && c.last_off >= data_start
            && c.last_off < s.end
            && if c.count == 0 {
                c.first == 0 && c.last == 0
            } else {
                c.first <= c.last && c.last <= c.latest
            };
        if !ok {
            return Err(IndexError::Malformed);
        }
        prev_conv = c.conv;
        total = total
            .checked_add(u64::from(c.count))
            .ok_or(IndexError::Malformed)?;
        start = block_len(u64::from(c.count))
            .and_then(|l| start.checked_add(l))
            .ok_or(IndexError::Malformed)?;
        out.push(c);
    }
    if total != entries || total > s.records || start != b.len() as u64 {
        return Err(IndexError::Malformed);
    }
    Ok((s, out))
}

/// Checks that a (decoded, valid) index belongs to these segment bytes: the last record is where
/// the index says, with the CRC it says, ends at the data end, and the data ends there. Reads one
/// record, not the segment.
pub(crate) fn matches_segment(s: &SegmentSummary, seg: &[u8]) -> bool {
    let end_is_clean = match format::decode_record(seg, s.end) {
        Ok(Slot::End) => true,
        Ok(Slot::Record(_)) | Err(_) => false,
    };
    if !end_is_clean {
        return false;
    }
    if s.records == 0 {
        return true;
    }
    let Ok(at) = usize::try_from(s.last_off) else {
        return false;
    };
    match format::decode_record(seg, s.last_off) {
        Ok(Slot::Record(r)) => r.next == s.end && read_u32(seg, at + 4) == Some(s.last_crc),
        Ok(Slot::End) | Err(_) => false,
    }
}

/// One conversation's entry block inside an index file: `count` entries in CRC-checked chunks of
/// [`CHUNK`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Block<'a> {
    crcs: &'a [u8],
    entries: &'a [u8],
    count: usize,
}

impl<'a> Block<'a> {
    /// The block at `start` with `count` entries, if it lies inside `idx`.
    pub(crate) fn new(idx: &'a [u8], start: u64, count: u32) -> Option<Self> {
        let start = usize::try_from(start).ok()?;
        let count = count as usize;
        let crcs_len = chunks_of(count as u64) as usize * 4;
        let entries_start = start.checked_add(crcs_len)?;
        let end = entries_start.checked_add(count.checked_mul(ENTRY_LEN)?)?;
        Some(Self {
            crcs: idx.get(start..entries_start)?,
            entries: idx.get(entries_start..end)?,
            count,
        })
    }

    /// Number of entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Whether the chunk holding entry `i` matches its CRC.
    pub(crate) fn verify_chunk_of(&self, i: usize) -> bool {
        let c = i / CHUNK;
        let lo = c * CHUNK * ENTRY_LEN;
        let hi = ((c + 1) * CHUNK).min(self.count) * ENTRY_LEN;
        match (self.entries.get(lo..hi), read_u32(self.crcs, c * 4)) {
            (Some(bytes), Some(crc)) => crc32c::crc32c(bytes) == crc,
            _ => false,
        }
    }

    /// Entry `i`: (seq, offset in the segment). Unverified: check its chunk first.
    pub(crate) fn entry(&self, i: usize) -> Option<(u64, u64)> {
        let at = i.checked_mul(ENTRY_LEN)?;
        Some((
            read_u64(self.entries, at)?,
            u64::from(read_u32(self.entries, at + 8)?),
        ))
    }

    /// The first index whose seq is `>= seq` (`len()` if none), verifying every chunk it looks
    /// at; `None` if one of them fails its CRC.
    pub(crate) fn lower_bound(&self, seq: u64) -> Option<usize> {
        if self.count == 0 {
            return Some(0);
        }
        let chunks = self.count.div_ceil(CHUNK);
        // First chunk whose first seq is >= seq; the answer is in the chunk before it, or at it.
        let (mut lo, mut hi) = (0usize, chunks);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let i = mid * CHUNK;
            if !self.verify_chunk_of(i) {
                return None;
            }
            if self.entry(i)?.0 < seq {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == 0 {
            return Some(0);
        }
        let c = lo - 1;
        if !self.verify_chunk_of(c * CHUNK) {
            return None;
        }
        let (from, to) = (c * CHUNK, ((c + 1) * CHUNK).min(self.count));
        let (mut a, mut b) = (from, to);
        while a < b {
            let mid = a + (b - a) / 2;
            if self.entry(mid)?.0 < seq {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        Some(a)
    }
}

/// A decoded checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckpointRef<'a> {
    pub(crate) covers: u64,
    pub(crate) payload: &'a [u8],
}

/// Encodes a checkpoint file.
pub(crate) fn encode_checkpoint(covers: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; CHECKPOINT_HEADER_LEN];
    b[0..8].copy_from_slice(&CHECKPOINT_MAGIC);
    b[8..12].copy_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(CHECKPOINT_HEADER_LEN as u32).to_le_bytes());
    b[16..24].copy_from_slice(&covers.to_le_bytes());
    b[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    b[32..36].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// Decodes and verifies a checkpoint file; `None` if anything is wrong with it.
pub(crate) fn decode_checkpoint(b: &[u8]) -> Option<CheckpointRef<'_>> {
    let h = b.get(..CHECKPOINT_HEADER_LEN)?;
    if h[0..8] != CHECKPOINT_MAGIC
        || read_u32(h, 8)? != CHECKPOINT_VERSION
        || read_u32(h, 12)? != CHECKPOINT_HEADER_LEN as u32
        || read_u32(h, 36)? != crc32c::crc32c(&h[..36])
    {
        return None;
    }
    let covers = read_u64(h, 16)?;
    let len = usize::try_from(read_u64(h, 24)?).ok()?;
    let payload = b.get(CHECKPOINT_HEADER_LEN..)?;
    if payload.len() != len || read_u32(h, 32)? != crc32c::crc32c(payload) {
        return None;
    }
    Some(CheckpointRef { covers, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> Vec<ConvPart> {
        let mut a = ConvPart {
            conv: 3,
            entries: Vec::new(),
            latest: 0,
            last_lsn: 0,
        };
        for i in 0..300u64 {
            a.entries.push(Entry {
                seq: 10 + 2 * i,
                lsn: 8192 + 64 + i * 64,
            });
        }
        a.latest = 10 + 2 * 299;
        a.last_lsn = a.entries[299].lsn;
        let marker_only = ConvPart {
            conv: 9,
            entries: Vec::new(),
            latest: 77,
            last_lsn: 8192 + 64 + 300 * 64,
        };
        vec![a, marker_only]
    }

    fn summary() -> SegmentSummary {
        SegmentSummary {
            base: 8192,
            segment_size: 65536,
            end: 64 + 301 * 64,
            records: 301,
            newest: 5,
            last_off: 64 + 300 * 64,
            last_crc: 0xABCD,
        }
    }

    #[test]
    fn index_roundtrip_and_lookup() {
        let (b, encoded) = encode_index(&summary(), &parts());
        let (s, convs) = decode_index(&b, 8192, 65536).expect("valid");
        assert_eq!(s, summary());
        assert_eq!(convs, encoded);
        assert_eq!(convs.len(), 2);
        assert_eq!(
            (convs[0].first, convs[0].last, convs[0].count),
            (10, 608, 300)
        );
        assert_eq!((convs[1].count, convs[1].latest), (0, 77));
        let block = Block::new(&b, convs[0].start, convs[0].count).expect("in bounds");
        assert_eq!(block.lower_bound(0), Some(0));
        assert_eq!(block.lower_bound(10), Some(0));
        assert_eq!(block.lower_bound(11), Some(1));
        assert_eq!(block.lower_bound(10 + 2 * 200), Some(200));
        assert_eq!(block.lower_bound(10 + 2 * 256 - 1), Some(256));
        assert_eq!(block.lower_bound(u64::MAX), Some(300));
        assert_eq!(block.entry(299), Some((608, 64 + 300 * 64 - 64)));
        assert_eq!(decode_index(&b, 0, 65536), Err(IndexError::Stale));
    }

    #[test]
    fn every_flipped_byte_of_header_and_summary_is_detected() {
        let (b, _) = encode_index(&summary(), &parts());
        let (_, convs) = decode_index(&b, 8192, 65536).expect("valid");
        let blocks = convs[0].start as usize;
        for i in 0..blocks {
            let mut c = b.clone();
            c[i] ^= 0x04;
            assert!(decode_index(&c, 8192, 65536).is_err(), "byte {i}");
        }
        // Entry bytes are caught by the chunk CRCs.
        for i in blocks..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x04;
            let block = Block::new(&c, convs[0].start, convs[0].count).expect("bounds");
            let all_ok = (0..block.len())
                .step_by(CHUNK)
                .all(|j| block.verify_chunk_of(j));
            assert!(!all_ok, "byte {i}");
        }
        for len in 0..b.len() {
            assert!(decode_index(&b[..len], 8192, 65536).is_err());
        }
    }

    #[test]
    fn checkpoint_roundtrip_and_flips() {
        let b = encode_checkpoint(4242, b"state");
        assert_eq!(
            decode_checkpoint(&b),
            Some(CheckpointRef {
                covers: 4242,
                payload: b"state"
            })
        );
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 1;
            assert_eq!(decode_checkpoint(&c), None, "byte {i}");
        }
        assert_eq!(decode_checkpoint(&b[..b.len() - 1]), None);
    }
}
