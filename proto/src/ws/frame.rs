//! One WebSocket wire frame (RFC 6455 section 5.2): header decoding with every receiver rule
//! checked, payload masking, and the server's encoders.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! | Masking-key (continued)       |          Payload Data         |
//! +-------------------------------- - - - - - - - - - - - - - - - +
//! ```
//!
//! All multi-byte lengths are big-endian. Frames from a client are always masked; frames from
//! the server never are.

use bytes::{BufMut, BytesMut};

use super::WsError;
use super::close_code;

/// The largest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// The largest reason of a close frame: the control payload minus the 2-byte status code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// The longest frame header: 2 bytes, an 8-byte extended length and a 4-byte masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// A frame's opcode. The reserved opcodes (0x3-0x7, 0xB-0xF) have no variant: decoding one is
/// [`WsError::ReservedOpcode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: the next fragment of a fragmented text or binary message.
    Continuation,
    /// 0x1: the first (or only) frame of a text message (UTF-8).
    Text,
    /// 0x2: the first (or only) frame of a binary message.
    Binary,
    /// 0x8: the close handshake.
    Close,
    /// 0x9: a liveness check; the receiver answers with a pong carrying the same payload.
    Ping,
    /// 0xA: the answer to a ping (or an unsolicited heartbeat).
    Pong,
}

impl OpCode {
    /// The opcode for the low 4 bits of the first header byte, or `None` if it is reserved.
    pub const fn from_u8(bits: u8) -> Option<Self> {
        match bits {
            0x0 => Some(OpCode::Continuation),
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            0x8 => Some(OpCode::Close),
            0x9 => Some(OpCode::Ping),
            0xA => Some(OpCode::Pong),
            _ => None,
        }
    }

    /// The 4-bit wire value.
    pub const fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Whether this is a control opcode (close, ping, pong): at most 125 bytes, never fragmented.
    pub const fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A decoded (or to-be-encoded) frame header.
///
/// ### Invariants (of a header returned by [`FrameHeader::decode`])
/// * `mask` is `Some`: client frames are masked.
/// * Control frames have `fin` set and `payload_len <= 125`.
/// * `payload_len < 2^63`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN: this is the final fragment of its message.
    pub fin: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key; `Some` on every client frame, `None` on every server frame.
    pub mask: Option<[u8; 4]>,
    /// The payload length in bytes.
    pub payload_len: u64,
}

impl FrameHeader {
    /// Decodes a client-to-server frame header from the start of `buf`.
    ///
    /// Returns `Ok(None)` if `buf` does not yet hold the whole header (a client may split its
    /// bytes anywhere), or the header and its length in bytes (the payload starts right after).
    /// Rules are checked as soon as the bytes that break them are present, so a bad frame is
    /// rejected from its first two bytes when possible:
    ///
    /// * RSV1-3 must be clear: no extension is ever negotiated ([`WsError::ReservedBits`]);
    /// * the opcode must not be reserved ([`WsError::ReservedOpcode`]);
    /// * the frame must be masked ([`WsError::UnmaskedFrame`]);
    /// * a control frame must have FIN ([`WsError::FragmentedControlFrame`]) and at most 125
    ///   bytes of payload ([`WsError::ControlFrameTooLong`]);
    /// * a 64-bit length must have its most significant bit clear ([`WsError::LengthMsbSet`]);
    /// * the length must use the minimal encoding ([`WsError::NonMinimalLength`]). RFC 6455 5.2
    ///   says "the minimal number of bytes MUST be used" and leaves the receiver's reaction open;
    ///   we reject, because no conforming client sends such a frame and accepting two encodings
    ///   of one frame only widens the attack surface.
    ///
    /// The message size limit is not checked here: it depends on the message in progress (see
    /// [`crate::ws::WsConn`]).
    #[inline]
    pub fn decode(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
        let Some(&b0) = buf.first() else {
            return Ok(None);
        };
        let rsv = b0 & 0x70;
        if rsv != 0 {
            return Err(WsError::ReservedBits(rsv >> 4));
        }
        let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(WsError::ReservedOpcode(b0 & 0x0F))?;
        let fin = b0 & 0x80 != 0;
        if opcode.is_control() && !fin {
            return Err(WsError::FragmentedControlFrame);
        }
        let Some(&b1) = buf.get(1) else {
            return Ok(None);
        };
        if b1 & 0x80 == 0 {
            return Err(WsError::UnmaskedFrame);
        }
        let len7 = b1 & 0x7F;
        if opcode.is_control() && usize::from(len7) > MAX_CONTROL_PAYLOAD {
            // 126 and 127 both announce more than 125 bytes: reject before reading them.
            return Err(WsError::ControlFrameTooLong(u64::from(len7)));
        }
        let (payload_len, len_bytes) = match len7 {
            126 => {
                let Some(&[hi, lo]) = buf.get(2..4).and_then(|s| <&[u8; 2]>::try_from(s).ok())
                else {
                    return Ok(None);
                };
                let len = u64::from(u16::from_be_bytes([hi, lo]));
                if len < 126 {
                    return Err(WsError::NonMinimalLength(len));
                }
                (len, 2)
            }
            127 => {
                let Some(bytes) = buf.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) else {
                    return Ok(None);
                };
                let len = u64::from_be_bytes(bytes);
                if len >> 63 != 0 {
                    return Err(WsError::LengthMsbSet);
                }
                if len <= u64::from(u16::MAX) {
                    return Err(WsError::NonMinimalLength(len));
                }
                (len, 8)
            }
            short => (u64::from(short), 0),
        };
        let mask_at = 2 + len_bytes;
        let Some(mask) = buf
            .get(mask_at..mask_at + 4)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
        else {
            return Ok(None);
        };
        let header = FrameHeader {
            fin,
            opcode,
            mask: Some(mask),
            payload_len,
        };
        debug_assert_eq!(header.encoded_len(), mask_at + 4);
        Ok(Some((header, mask_at + 4)))
    }

    /// The number of bytes [`FrameHeader::encode`] writes: 2, plus 2 or 8 for an extended
    /// length, plus 4 for a masking key.
    pub const fn encoded_len(&self) -> usize {
        let len_bytes = if self.payload_len < 126 {
            0
        } else if self.payload_len <= u16::MAX as u64 {
            2
        } else {
            8
        };
        let mask_bytes = if self.mask.is_some() { 4 } else { 0 };
        2 + len_bytes + mask_bytes
    }

    /// Appends this header to `out`, with the minimal length encoding. The payload (masked with
    /// [`apply_mask`] if `mask` is set) is the caller's to append.
    ///
    /// The caller upholds `payload_len < 2^63` (every `usize` length does) and, for control
    /// frames, `fin` and `payload_len <= 125`; both are checked with `debug_assert!`.
    pub fn encode(&self, out: &mut BytesMut) {
        debug_assert!(
            self.payload_len >> 63 == 0,
            "payload length MSB must be clear"
        );
        debug_assert!(
            !self.opcode.is_control()
                || (self.fin && self.payload_len <= MAX_CONTROL_PAYLOAD as u64),
            "control frames are final and at most 125 bytes"
        );
        out.reserve(self.encoded_len());
        let fin = if self.fin { 0x80 } else { 0 };
        out.put_u8(fin | self.opcode.as_u8());
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        if self.payload_len < 126 {
            // Lossless: payload_len < 126.
            out.put_u8(mask_bit | self.payload_len as u8);
        } else if let Ok(len16) = u16::try_from(self.payload_len) {
            out.put_u8(mask_bit | 126);
            out.put_u16(len16);
        } else {
            out.put_u8(mask_bit | 127);
            out.put_u64(self.payload_len);
        }
        if let Some(mask) = self.mask {
            out.put_slice(&mask);
        }
    }
}

/// XORs `buf` with the 4-byte masking `key` (RFC 6455 5.3), in place; masking and unmasking are
/// the same operation. `buf` must start at the first byte of a frame's payload.
///
/// Works 8 bytes at a time (the key repeats every 4 bytes, so every 8-byte chunk sees the same
/// 8-byte key), which the compiler turns into vector code; of the remainder, 4 bytes at once if
/// there are that many, then byte by byte. No alignment is needed: the chunks are read and
/// written as byte arrays.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let narrow = u32::from_ne_bytes(key);
    // The key twice, in memory order, whatever the endianness.
    let wide = u64::from(narrow) << 32 | u64::from(narrow);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        if let Some(bytes) = chunk.first_chunk_mut::<8>() {
            *bytes = (u64::from_ne_bytes(*bytes) ^ wide).to_ne_bytes();
        }
    }
    // The remainder starts at a multiple of 8, so its key phase starts at 0.
    let rest = chunks.into_remainder();
    let rest = match rest.split_first_chunk_mut::<4>() {
        Some((bytes, tail)) => {
            *bytes = (u32::from_ne_bytes(*bytes) ^ narrow).to_ne_bytes();
            tail
        }
        None => rest,
    };
    for (byte, k) in rest.iter_mut().zip(key) {
        *byte ^= k;
    }
}

/// What the server asked an encoder to write cannot be a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A ping or pong payload longer than 125 bytes.
    #[error("control payload of {0} bytes (at most 125)")]
    ControlPayloadTooLong(usize),
    /// A close reason longer than 123 bytes.
    #[error("close reason of {0} bytes (at most 123)")]
    CloseReasonTooLong(usize),
    /// A close code that may not be sent on the wire ([`close_code::is_allowed_on_wire`]).
    #[error("close code {0} may not be sent on the wire")]
    InvalidCloseCode(u16),
    /// A close reason without a status code (the reason can only follow a code).
    #[error("close reason without a status code")]
    ReasonWithoutCode,
}

/// Appends an unmasked, final header for a data frame of `payload_len` bytes; the caller then
/// appends exactly `payload_len` bytes of payload (for example a protobuf encoded straight into
/// `out`, with no intermediate copy).
///
/// `opcode` is [`OpCode::Text`] or [`OpCode::Binary`] (a control opcode is checked by
/// `debug_assert!`; use the control encoders instead). For a text frame the caller promises the
/// payload is UTF-8.
pub fn encode_data_header(out: &mut BytesMut, opcode: OpCode, payload_len: usize) {
    debug_assert!(matches!(opcode, OpCode::Text | OpCode::Binary));
    FrameHeader {
        fin: true,
        opcode,
        mask: None,
        payload_len: payload_len as u64,
    }
    .encode(out);
}

/// Appends an unfragmented binary message.
pub fn encode_binary(out: &mut BytesMut, payload: &[u8]) {
    out.reserve(MAX_HEADER_LEN + payload.len());
    encode_data_header(out, OpCode::Binary, payload.len());
    out.put_slice(payload);
}

/// Appends an unfragmented text message.
pub fn encode_text(out: &mut BytesMut, text: &str) {
    out.reserve(MAX_HEADER_LEN + text.len());
    encode_data_header(out, OpCode::Text, text.len());
    out.put_slice(text.as_bytes());
}

/// Appends a ping with `payload` (at most 125 bytes).
pub fn encode_ping(out: &mut BytesMut, payload: &[u8]) -> Result<(), EncodeError> {
    encode_control(out, OpCode::Ping, payload)
}

/// Appends a pong with `payload` (at most 125 bytes): the payload of the ping it answers.
pub fn encode_pong(out: &mut BytesMut, payload: &[u8]) -> Result<(), EncodeError> {
    encode_control(out, OpCode::Pong, payload)
}

fn encode_control(out: &mut BytesMut, opcode: OpCode, payload: &[u8]) -> Result<(), EncodeError> {
    if payload.len() > MAX_CONTROL_PAYLOAD {
        return Err(EncodeError::ControlPayloadTooLong(payload.len()));
    }
    FrameHeader {
        fin: true,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    }
    .encode(out);
    out.put_slice(payload);
    Ok(())
}

/// Appends a close frame. `None` sends an empty payload ("no status code"; `reason` must then be
/// empty); `Some(code)` sends the code (allowed on the wire, see
/// [`close_code::is_allowed_on_wire`]) followed by `reason` (at most 123 bytes of UTF-8).
pub fn encode_close(
    out: &mut BytesMut,
    code: Option<u16>,
    reason: &str,
) -> Result<(), EncodeError> {
    let Some(code) = code else {
        if !reason.is_empty() {
            // A reason can only follow a status code (RFC 6455 5.5.1).
            return Err(EncodeError::ReasonWithoutCode);
        }
        return encode_control(out, OpCode::Close, &[]);
    };
    if !close_code::is_allowed_on_wire(code) {
        return Err(EncodeError::InvalidCloseCode(code));
    }
    if reason.len() > MAX_CLOSE_REASON {
        return Err(EncodeError::CloseReasonTooLong(reason.len()));
    }
    FrameHeader {
        fin: true,
        opcode: OpCode::Close,
        mask: None,
        payload_len: 2 + reason.len() as u64,
    }
    .encode(out);
    out.put_u16(code);
    out.put_slice(reason.as_bytes());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn decode(bytes: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
        FrameHeader::decode(bytes)
    }

    /// A masked client header with the given first byte and length field bytes.
    fn client_header(b0: u8, len: &[u8]) -> Vec<u8> {
        let mut v = vec![b0];
        v.extend_from_slice(len);
        if let Some(first) = v.get_mut(1) {
            *first |= 0x80;
        }
        v.extend_from_slice(&KEY);
        v
    }

    #[test]
    fn rfc_example_masked_hello_decodes() {
        // RFC 6455 5.7: "A single-frame masked text message" containing "Hello".
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (header, len) = decode(&bytes).unwrap().unwrap();
        assert_eq!(len, 6);
        assert_eq!(
            header,
            FrameHeader {
                fin: true,
                opcode: OpCode::Text,
                mask: Some(KEY),
                payload_len: 5
            }
        );
        let mut payload = bytes[6..].to_vec();
        apply_mask(&mut payload, KEY);
        assert_eq!(payload, b"Hello");
    }

    #[test]
    fn header_split_at_every_byte_is_partial_until_complete() {
        for (len, field) in [
            (5u64, vec![5u8]),
            (300, vec![126, 1, 44]),
            (70_000, {
                let mut f = vec![127];
                f.extend_from_slice(&70_000u64.to_be_bytes());
                f
            }),
        ] {
            let bytes = client_header(0x82, &field);
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), Ok(None), "cut at {cut}");
            }
            let (header, used) = decode(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(header.payload_len, len);
        }
    }

    #[test]
    fn unmasked_client_frame_is_protocol_error_1002() {
        let err = decode(&[0x82, 0x05]).unwrap_err();
        assert_eq!(err, WsError::UnmaskedFrame);
        assert_eq!(err.close_code(), 1002);
    }

    #[test]
    fn reserved_bits_without_extension_are_protocol_error_1002() {
        for rsv in [0x40u8, 0x20, 0x10, 0x70] {
            let err = decode(&[0x82 | rsv]).unwrap_err();
            assert!(matches!(err, WsError::ReservedBits(_)), "{rsv:#x}");
            assert_eq!(err.close_code(), 1002);
        }
    }

    #[test]
    fn reserved_opcodes_are_protocol_error_1002() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            let err = decode(&[0x80 | op]).unwrap_err();
            assert_eq!(err, WsError::ReservedOpcode(op));
            assert_eq!(err.close_code(), 1002);
        }
    }

    #[test]
    fn fragmented_control_frame_is_rejected() {
        for op in [0x8u8, 0x9, 0xA] {
            assert_eq!(decode(&[op]), Err(WsError::FragmentedControlFrame));
        }
    }

    #[test]
    fn control_frame_longer_than_125_is_rejected() {
        assert_eq!(
            decode(&[0x89, 0x80 | 126]),
            Err(WsError::ControlFrameTooLong(126))
        );
        assert_eq!(
            decode(&[0x8A, 0x80 | 127]),
            Err(WsError::ControlFrameTooLong(127))
        );
        assert!(decode(&client_header(0x89, &[125])).unwrap().is_some());
    }

    #[test]
    fn length_with_msb_set_is_rejected() {
        let mut field = vec![127];
        field.extend_from_slice(&(1u64 << 63 | 200_000).to_be_bytes());
        assert_eq!(
            decode(&client_header(0x82, &field)),
            Err(WsError::LengthMsbSet)
        );
    }

    #[test]
    fn non_minimal_16_bit_length_is_rejected() {
        assert_eq!(
            decode(&client_header(0x82, &[126, 0, 125])),
            Err(WsError::NonMinimalLength(125))
        );
        assert!(
            decode(&client_header(0x82, &[126, 0, 126]))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn non_minimal_64_bit_length_is_rejected() {
        let mut field = vec![127];
        field.extend_from_slice(&65_535u64.to_be_bytes());
        assert_eq!(
            decode(&client_header(0x82, &field)),
            Err(WsError::NonMinimalLength(65_535))
        );
        let mut field = vec![127];
        field.extend_from_slice(&65_536u64.to_be_bytes());
        assert!(decode(&client_header(0x82, &field)).unwrap().is_some());
    }

    #[test]
    fn apply_mask_matches_bytewise_xor_for_every_length() {
        let data: Vec<u8> = (0..=255u8).cycle().take(100).collect();
        for len in 0..data.len() {
            let mut fast = data[..len].to_vec();
            apply_mask(&mut fast, KEY);
            let slow: Vec<u8> = data[..len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ KEY[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn encoder_uses_minimal_length_at_125_126_65535_65536() {
        for (len, header_len, len7) in [
            (125usize, 2usize, 125u8),
            (126, 4, 126),
            (65_535, 4, 126),
            (65_536, 10, 127),
        ] {
            let mut out = BytesMut::new();
            encode_binary(&mut out, &vec![0xAB; len]);
            assert_eq!(out.len(), header_len + len);
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1], len7, "server frames are unmasked");
        }
    }

    #[test]
    fn data_header_announces_the_payload_written_after_it() {
        let mut out = BytesMut::new();
        encode_data_header(&mut out, OpCode::Binary, 300);
        assert_eq!(&out[..], &[0x82, 126, 1, 44]);
    }

    #[test]
    fn ping_longer_than_125_cannot_be_encoded() {
        let mut out = BytesMut::new();
        assert_eq!(
            encode_ping(&mut out, &[0; 126]),
            Err(EncodeError::ControlPayloadTooLong(126))
        );
        assert!(out.is_empty());
        encode_pong(&mut out, &[7; 125]).unwrap();
        assert_eq!(&out[..2], &[0x8A, 125]);
    }

    #[test]
    fn close_frame_carries_code_then_reason() {
        let mut out = BytesMut::new();
        encode_close(&mut out, Some(1000), "bye").unwrap();
        assert_eq!(&out[..], &[0x88, 5, 0x03, 0xE8, b'b', b'y', b'e']);
    }

    #[test]
    fn close_without_code_is_empty() {
        let mut out = BytesMut::new();
        encode_close(&mut out, None, "").unwrap();
        assert_eq!(&out[..], &[0x88, 0]);
        assert_eq!(
            encode_close(&mut out, None, "why"),
            Err(EncodeError::ReasonWithoutCode)
        );
    }

    #[test]
    fn close_reason_longer_than_123_cannot_be_encoded() {
        let mut out = BytesMut::new();
        assert_eq!(
            encode_close(&mut out, Some(1000), &"x".repeat(124)),
            Err(EncodeError::CloseReasonTooLong(124))
        );
        encode_close(&mut out, Some(1000), &"x".repeat(123)).unwrap();
        assert_eq!(out.len(), 2 + 125);
    }

    #[test]
    fn close_code_forbidden_on_the_wire_cannot_be_encoded() {
        let mut out = BytesMut::new();
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                encode_close(&mut out, Some(code), ""),
                Err(EncodeError::InvalidCloseCode(code))
            );
        }
        assert!(out.is_empty());
    }
}
