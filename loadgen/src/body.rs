//! The self-checking message body every loadgen message carries.
//!
//! Layout (little-endian), `len >= MIN_LEN` bytes in all:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | sender: the sending client's number |
//! | 4..12 | seq: the sender's own message counter, 1, 2, 3, … per receiving stream |
//! | 12..20 | sent: intended send time, nanoseconds since the run's epoch |
//! | 20..24 | CRC32C of every other byte of the body |
//! | 24.. | padding up to the requested size, derived from seq |
//!
//! The receiver re-computes the checksum, so a flipped bit anywhere, a truncated body or one
//! glued to another is *corrupt*; the (sender, seq) pair finds loss, duplication and reordering.

use bytes::BufMut;

/// The smallest body: the header with no padding.
pub const MIN_LEN: usize = 24;

/// What a body says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The sending client.
    pub sender: u32,
    /// The sender's message counter (from 1).
    pub seq: u64,
    /// Intended send time, nanoseconds since the run's epoch.
    pub sent_ns: u64,
}

/// Why a body is corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Shorter than [`MIN_LEN`].
    #[error("body of {0} bytes is shorter than the {MIN_LEN}-byte header")]
    Short(usize),
    /// The checksum does not match.
    #[error("body checksum mismatch")]
    Checksum,
}

fn padding_byte(seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_add(i as u8).wrapping_mul(31)
}

fn checksum(body: &[u8]) -> u32 {
    let head = crc32c::crc32c(&body[..20]);
    crc32c::crc32c_append(head, &body[24..])
}

/// Appends a body of `len` bytes (at least [`MIN_LEN`]; shorter is raised to it) for `stamp`.
pub fn write(stamp: Stamp, len: usize, out: &mut impl BufMut) {
    let len = len.max(MIN_LEN);
    let mut buf = [0u8; 256];
    if len <= buf.len() {
        let body = &mut buf[..len];
        fill(stamp, body);
        out.put_slice(body);
    } else {
        let mut body = vec![0u8; len];
        fill(stamp, &mut body);
        out.put_slice(&body);
    }
}

/// Fills `body` (at least [`MIN_LEN`] bytes) for `stamp`.
pub fn fill(stamp: Stamp, body: &mut [u8]) {
    debug_assert!(body.len() >= MIN_LEN);
    body[0..4].copy_from_slice(&stamp.sender.to_le_bytes());
    body[4..12].copy_from_slice(&stamp.seq.to_le_bytes());
    body[12..20].copy_from_slice(&stamp.sent_ns.to_le_bytes());
    for (i, b) in body[24..].iter_mut().enumerate() {
        *b = padding_byte(stamp.seq, i);
    }
    let crc = checksum(body);
    body[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Reads and verifies a body.
///
/// # Errors
///
/// [`BodyError`] if it is short or its checksum does not match.
pub fn read(body: &[u8]) -> Result<Stamp, BodyError> {
    if body.len() < MIN_LEN {
        return Err(BodyError::Short(body.len()));
    }
    let field = |r: std::ops::Range<usize>| body.get(r).unwrap_or_default();
    let stored = u32::from_le_bytes(field(20..24).try_into().map_err(|_| BodyError::Checksum)?);
    if stored != checksum(body) {
        return Err(BodyError::Checksum);
    }
    let sender = u32::from_le_bytes(field(0..4).try_into().map_err(|_| BodyError::Checksum)?);
    let seq = u64::from_le_bytes(field(4..12).try_into().map_err(|_| BodyError::Checksum)?);
    let sent_ns = u64::from_le_bytes(field(12..20).try_into().map_err(|_| BodyError::Checksum)?);
    Ok(Stamp {
        sender,
        seq,
        sent_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body(stamp: Stamp, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        write(stamp, len, &mut out);
        out
    }

    const STAMP: Stamp = Stamp {
        sender: 7,
        seq: 42,
        sent_ns: 123_456_789,
    };

    #[test]
    fn a_written_body_reads_back_its_stamp_at_the_requested_length() {
        for len in [0, 24, 100, 256, 257, 4096] {
            let b = body(STAMP, len);
            assert_eq!(b.len(), len.max(MIN_LEN));
            assert_eq!(read(&b), Ok(STAMP));
        }
    }

    #[test]
    fn a_short_body_is_corrupt() {
        assert_eq!(read(&[0; 23]), Err(BodyError::Short(23)));
    }

    #[test]
    fn a_truncated_or_extended_body_is_corrupt() {
        let b = body(STAMP, 100);
        assert_eq!(read(&b[..99]), Err(BodyError::Checksum));
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(read(&longer), Err(BodyError::Checksum));
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_detected(len in 24usize..300, at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut b = body(STAMP, len);
            let i = at.index(b.len());
            b[i] ^= 1 << bit;
            prop_assert!(read(&b).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic_read(b in prop::collection::vec(any::<u8>(), 0..100)) {
            let _ = read(&b);
        }
    }
}
