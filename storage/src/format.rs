//! The byte layout of segment headers and records (FORMAT.md sections 3 and 4).
//!
//! Pure functions over byte slices: no I/O. Every decoder takes untrusted bytes and returns a typed
//! error instead of panicking; all arithmetic on values read from disk is checked.

use crate::Timestamp;

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"PRLYSEG\0";
/// The on-disk format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the segment header; records start at this offset.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Length of a record header; the payload follows it.
pub const RECORD_HEADER_LEN: usize = 48;
/// Records start at offsets that are multiples of this.
pub const RECORD_ALIGN: usize = 8;
/// Smallest legal segment size (also the granularity: sizes are multiples of it).
pub const MIN_SEGMENT_SIZE: u64 = 4096;
/// Largest legal segment size.
pub const MAX_SEGMENT_SIZE: u64 = 1 << 32;
/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// Record kind reserved for storage-internal seq markers (FORMAT.md 4.1).
pub(crate) const KIND_SEQ_MARKER: u8 = 0;

/// Offset of the header CRC inside the segment header.
const HEADER_CRC_OFFSET: usize = 60;

/// Is `size` a legal segment size?
pub(crate) fn valid_segment_size(size: u64) -> bool {
    (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size) && size.is_multiple_of(MIN_SEGMENT_SIZE)
}

/// The largest record (header + payload, without padding) a segment of `segment_size` can hold.
pub(crate) fn max_record_len(segment_size: u64) -> u64 {
    segment_size.saturating_sub(SEGMENT_HEADER_LEN as u64)
}

const ZERO_CHUNK: usize = 4096;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// A page of zeros (for zeroing writes).
pub(crate) fn zeros(len: usize) -> &'static [u8] {
    &ZEROS[..len.min(ZERO_CHUNK)]
}

/// Whether every byte is zero (chunked `memcmp`: fast even in debug builds).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(ZERO_CHUNK).all(|c| c == &ZEROS[..c.len()])
}

/// Rounds `len` up to the record alignment (`None` on overflow).
pub(crate) fn align8(len: u64) -> Option<u64> {
    len.checked_add(RECORD_ALIGN as u64 - 1)
        .map(|v| v & !(RECORD_ALIGN as u64 - 1))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The decoded header of a segment file (FORMAT.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub(crate) base_lsn: u64,
    pub(crate) segment_size: u64,
    pub(crate) created: Timestamp,
}

/// Why a segment header is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderError {
    TooShort,
    Magic,
    Version,
    HeaderLen,
    Checksum,
    Reserved,
    SegmentSize,
    Base,
}

impl SegmentHeader {
    /// Encodes the 64-byte header, CRC included.
    pub(crate) fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.base_lsn.to_le_bytes());
        b[24..32].copy_from_slice(&self.segment_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.created.micros().to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_OFFSET]);
        b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header read from disk. `bytes` is the start of the segment (at least
    /// 64 bytes); the caller checks base/size against the file name and length.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let b = bytes
            .get(..SEGMENT_HEADER_LEN)
            .ok_or(HeaderError::TooShort)?;
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        let stored_crc = read_u32(b, HEADER_CRC_OFFSET).ok_or(HeaderError::TooShort)?;
        if crc32c::crc32c(&b[..HEADER_CRC_OFFSET]) != stored_crc {
            return Err(HeaderError::Checksum);
        }
        if read_u32(b, 8) != Some(FORMAT_VERSION) {
            return Err(HeaderError::Version);
        }
        if read_u32(b, 12) != Some(SEGMENT_HEADER_LEN as u32) {
            return Err(HeaderError::HeaderLen);
        }
        if b[40..HEADER_CRC_OFFSET].iter().any(|&x| x != 0) {
            return Err(HeaderError::Reserved);
        }
        let base_lsn = read_u64(b, 16).ok_or(HeaderError::TooShort)?;
        let segment_size = read_u64(b, 24).ok_or(HeaderError::TooShort)?;
        let created = read_u64(b, 32).ok_or(HeaderError::TooShort)?;
        if !valid_segment_size(segment_size) {
            return Err(HeaderError::SegmentSize);
        }
        if !base_lsn.is_multiple_of(segment_size) || base_lsn.checked_add(segment_size).is_none() {
            return Err(HeaderError::Base);
        }
        Ok(Self {
            base_lsn,
            segment_size,
            created: Timestamp::from_micros(created as i64),
        })
    }
}

/// The fixed fields of a record header (everything but len and crc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordFields {
    pub(crate) kind: u8,
    pub(crate) conversation: u64,
    pub(crate) seq: u64,
    pub(crate) msg_id: u64,
    pub(crate) timestamp: i64,
}

/// Encodes a record header for a payload of `payload.len()` bytes. `len` is the total record length
/// (48 + payload), already checked by the caller to fit in a segment (so in a u32).
#[inline]
pub(crate) fn encode_record_header(
    f: &RecordFields,
    len: u32,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[8] = f.kind;
    // h[9] flags = 0, h[10..16] reserved = 0
    h[16..24].copy_from_slice(&f.conversation.to_le_bytes());
    h[24..32].copy_from_slice(&f.seq.to_le_bytes());
    h[32..40].copy_from_slice(&f.msg_id.to_le_bytes());
    h[40..48].copy_from_slice(&f.timestamp.to_le_bytes());
    let crc = record_crc(&h, payload);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h
}

/// CRC-32C over header bytes [0,4) and [8,48), then the payload.
#[inline]
fn record_crc(header: &[u8; RECORD_HEADER_LEN], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&header[0..4]);
    let c = crc32c::crc32c_append(c, &header[8..RECORD_HEADER_LEN]);
    crc32c::crc32c_append(c, payload)
}

/// Why the bytes at a record position are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordError {
    /// `len` is smaller than a record header (and not the end marker 0).
    BadLength,
    /// The record would extend past the end of the segment.
    BeyondSegment,
    /// The stored CRC does not match.
    Checksum,
    /// Flags or reserved fields are not zero.
    Reserved,
}

/// A record decoded from segment bytes, borrowing its payload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecodedRecord<'a> {
    pub(crate) fields: RecordFields,
    pub(crate) payload: &'a [u8],
    /// Record length without padding.
    pub(crate) len: u64,
    /// Offset of the next record (this one's offset + aligned len).
    pub(crate) next: u64,
}

/// The outcome of looking at a record position.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot<'a> {
    /// `len == 0`, or fewer than 4 bytes left: the end of data.
    End,
    /// A valid record.
    Record(DecodedRecord<'a>),
}

/// Decodes (and CRC-verifies) the record at `offset` of a segment's bytes. `seg` is the whole
/// segment (so `seg.len()` is its capacity).
pub(crate) fn decode_record(seg: &[u8], offset: u64) -> Result<Slot<'_>, RecordError> {
    let off = usize::try_from(offset).map_err(|_| RecordError::BeyondSegment)?;
    let Some(len) = read_u32(seg, off) else {
        return Ok(Slot::End);
    };
    if len == 0 {
        return Ok(Slot::End);
    }
    let len = len as usize;
    if len < RECORD_HEADER_LEN {
        return Err(RecordError::BadLength);
    }
    let end = off.checked_add(len).ok_or(RecordError::BeyondSegment)?;
    let bytes = seg.get(off..end).ok_or(RecordError::BeyondSegment)?;
    let (header, payload) = bytes.split_at(RECORD_HEADER_LEN);
    let header: &[u8; RECORD_HEADER_LEN] = header.try_into().map_err(|_| RecordError::BadLength)?;
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if record_crc(header, payload) != stored {
        return Err(RecordError::Checksum);
    }
    if header[9..16].iter().any(|&x| x != 0) {
        return Err(RecordError::Reserved);
    }
    let fields = RecordFields {
        kind: header[8],
        conversation: read_u64(header, 16).ok_or(RecordError::BadLength)?,
        seq: read_u64(header, 24).ok_or(RecordError::BadLength)?,
        msg_id: read_u64(header, 32).ok_or(RecordError::BadLength)?,
        timestamp: read_u64(header, 40).ok_or(RecordError::BadLength)? as i64,
    };
    let len = len as u64;
    let next = align8(len)
        .and_then(|a| offset.checked_add(a))
        .ok_or(RecordError::BeyondSegment)?;
    Ok(Slot::Record(DecodedRecord {
        fields,
        payload,
        len,
        next,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> RecordFields {
        RecordFields {
            kind: 7,
            conversation: 42,
            seq: 9,
            msg_id: 1234,
            timestamp: -5,
        }
    }

    #[test]
    fn header_roundtrip() {
        let h = SegmentHeader {
            base_lsn: 8192,
            segment_size: 4096,
            created: Timestamp::from_micros(77),
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
    }

    #[test]
    fn header_any_flipped_byte_is_rejected() {
        let h = SegmentHeader {
            base_lsn: 0,
            segment_size: 4096,
            created: Timestamp::from_micros(1),
        };
        let b = h.encode();
        for i in 0..SEGMENT_HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(SegmentHeader::decode(&c).is_err(), "byte {i}");
        }
    }

    #[test]
    fn record_roundtrip_and_every_flip_detected() {
        let payload = b"hello, world";
        let len = (RECORD_HEADER_LEN + payload.len()) as u32;
        let h = encode_record_header(&fields(), len, payload);
        let mut seg = vec![0u8; 256];
        seg[64..112].copy_from_slice(&h);
        seg[112..112 + payload.len()].copy_from_slice(payload);
        match decode_record(&seg, 64) {
            Ok(Slot::Record(r)) => {
                assert_eq!(r.fields, fields());
                assert_eq!(r.payload, payload);
                assert_eq!(r.next, 64 + 64);
            }
            other => panic!("{other:?}"),
        }
        for i in 64..64 + len as usize {
            for bit in 0..8 {
                let mut c = seg.clone();
                c[i] ^= 1 << bit;
                assert!(
                    !matches!(decode_record(&c, 64), Ok(Slot::Record(_))),
                    "byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn decode_never_panics_on_garbage_lengths() {
        let mut seg = vec![0u8; 128];
        for len in [1u32, 47, 48, 49, 64, 65, 127, 128, u32::MAX] {
            seg[64..68].copy_from_slice(&len.to_le_bytes());
            assert!(decode_record(&seg, 64).is_err());
        }
        assert!(matches!(decode_record(&seg, 126), Ok(Slot::End)));
        assert!(matches!(
            decode_record(&seg, u64::MAX),
            Err(_) | Ok(Slot::End)
        ));
    }
}
