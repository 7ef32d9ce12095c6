//! TCP stream framing: each frame preceded by its length as a protobuf varint.
//!
//! This is the standard "length-delimited" protobuf format (`writeDelimitedTo` in Java,
//! `encode_length_delimited` in Rust, ...), so any protobuf library can speak it:
//!
//! ```text
//! +----------------------+---------------------------+----------------------+-----
//! | length L (varint,    | L bytes: protobuf of one  | length (varint)      | ...
//! | 1..=5 bytes, LEB128) | pb::Frame                 |                      |
//! +----------------------+---------------------------+----------------------+-----
//! ```
//!
//! # Rules
//!
//! * The prefix is an unsigned LEB128 varint of at most [`MAX_PREFIX_LEN`] (5) bytes whose value
//!   fits in a `u32`. Longer varints, and a fifth byte with more than 4 value bits, are
//!   [`TcpFrameError::BadLengthPrefix`]. Non-minimal encodings (`0x80 0x00` for 0) are accepted,
//!   as every protobuf parser accepts them.
//! * `L` must not exceed the codec's `max_frame_bytes` (by default
//!   [`DEFAULT_MAX_FRAME_BYTES`], 64 KiB). This is decided from the prefix alone, before any of
//!   the payload is buffered: a 5-byte prefix claiming 4 GiB is [`TcpFrameError::TooLarge`] at
//!   once, and so is an incomplete prefix whose bits so far already exceed the limit (e.g.
//!   `ff ff ff`). A reader never needs to buffer more than `5 + max_frame_bytes` bytes.
//! * `L = 0` is a valid, empty frame on this layer ([`FrameCodec::decode`] returns empty bytes):
//!   an empty protobuf is a `Frame` with nothing set, so [`FrameCodec::decode_frame`] reports
//!   [`FrameError::MissingBody`] for it, like any frame without a body.
//!
//! # After an error
//!
//! A prefix error ([`TcpFrameError::BadLengthPrefix`], [`TcpFrameError::TooLarge`]) leaves the
//! buffer untouched and the stream desynchronised: answer with the error (its wire code is
//! `BAD_FRAME` or `FRAME_TOO_LARGE`) and close. A [`TcpFrameError::Frame`] error from
//! [`FrameCodec::decode_frame`] comes after the frame's bytes were consumed: the stream is still
//! in sync, and the caller may answer and go on.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::DEFAULT_MAX_FRAME_BYTES;
use crate::frame::{self, FrameError, WireError};
use crate::pb;

/// The longest length prefix accepted: 5 bytes of varint carry 32 bits.
pub const MAX_PREFIX_LEN: usize = 5;

/// Why the TCP byte stream is not a sequence of acceptable frames, or a frame cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum TcpFrameError {
    /// The length prefix is longer than 5 bytes or its value does not fit in 32 bits.
    #[error("bad length prefix: not a varint of at most 5 bytes fitting in 32 bits")]
    BadLengthPrefix,
    /// The frame is larger than the limit; when decoding, `len` may be a lower bound read from an
    /// incomplete prefix.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The frame's length in bytes (at least this much, if the prefix was incomplete).
        len: u64,
        /// The limit, `max_frame_bytes`.
        max: usize,
    },
    /// The frame's bytes were delimited correctly but are not an acceptable frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl WireError for TcpFrameError {
    fn code(&self) -> pb::ErrorCode {
        match self {
            TcpFrameError::BadLengthPrefix => pb::ErrorCode::BadFrame,
            TcpFrameError::TooLarge { .. } => pb::ErrorCode::FrameTooLarge,
            TcpFrameError::Frame(e) => e.error_code(),
        }
    }
}

/// What the bytes at the start of a buffer say about the next frame (see [`check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The prefix or the frame is incomplete: at least `needed` (> 0) more bytes must arrive.
    /// When the prefix is complete, `needed` is exact.
    Incomplete {
        /// How many more bytes are needed, at least.
        needed: usize,
    },
    /// A whole frame is buffered: `prefix_len` bytes of prefix, then `frame_len` bytes of frame.
    Ready {
        /// Length of the varint prefix (1..=5).
        prefix_len: usize,
        /// Length of the frame after it (0..=max_frame_bytes).
        frame_len: usize,
    },
}

/// Looks at the length prefix at the start of `buf` and says whether a whole frame is there,
/// how many more bytes are needed, or (as an error) that the frame is too large or the prefix is
/// bad, without reading the payload. Never consumes anything.
///
/// # Errors
///
/// [`TcpFrameError::BadLengthPrefix`] and [`TcpFrameError::TooLarge`], as soon as the prefix
/// bytes seen so far prove it.
pub fn check(buf: &[u8], max_frame_bytes: usize) -> Result<Check, TcpFrameError> {
    match read_prefix(buf).map_err(|BadPrefix| TcpFrameError::BadLengthPrefix)? {
        Prefix::Incomplete { at_least } => {
            if exceeds(at_least, max_frame_bytes) {
                return Err(TcpFrameError::TooLarge {
                    len: u64::from(at_least),
                    max: max_frame_bytes,
                });
            }
            Ok(Check::Incomplete { needed: 1 })
        }
        Prefix::Complete { len, prefix_len } => {
            let too_large = TcpFrameError::TooLarge {
                len: u64::from(len),
                max: max_frame_bytes,
            };
            if exceeds(len, max_frame_bytes) {
                return Err(too_large);
            }
            let frame_len = usize::try_from(len).map_err(|_| too_large)?;
            // prefix_len <= 5 and frame_len <= max_frame_bytes, but stay checked regardless.
            let total = prefix_len
                .checked_add(frame_len)
                .ok_or(TcpFrameError::TooLarge {
                    len: u64::from(len),
                    max: max_frame_bytes,
                })?;
            match total.checked_sub(buf.len()) {
                Some(needed) if needed > 0 => Ok(Check::Incomplete { needed }),
                _ => Ok(Check::Ready {
                    prefix_len,
                    frame_len,
                }),
            }
        }
    }
}

/// The TCP framing codec: splits a read buffer into frames and appends prefixed frames to a
/// write buffer. Sans-IO: the caller reads and writes the socket.
///
/// ### Invariants
///
/// * [`decode`](Self::decode) consumes a prefix and its frame together, or nothing.
/// * No frame longer than `max_frame_bytes` is ever returned or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl Default for FrameCodec {
    /// A codec with the default limit, [`DEFAULT_MAX_FRAME_BYTES`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl FrameCodec {
    /// A codec that accepts and writes frames of at most `max_frame_bytes` bytes (the prefix not
    /// counted). Values above `u32::MAX` act as `u32::MAX`, the most a prefix can say.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// The largest frame, in bytes, this codec accepts and writes.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Changes the limit from the next frame on (e.g. a server raises it after login).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// [`check`] with this codec's limit.
    ///
    /// # Errors
    ///
    /// As [`check`].
    pub fn check(&self, buf: &[u8]) -> Result<Check, TcpFrameError> {
        check(buf, self.max_frame_bytes)
    }

    /// Splits the next whole frame off the front of `buf`, zero-copy, as its raw protobuf bytes
    /// (the prefix dropped). `Ok(None)`: more bytes are needed and `buf` is unchanged.
    ///
    /// # Errors
    ///
    /// As [`check`]; `buf` is then unchanged and the stream cannot be resynchronised.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, TcpFrameError> {
        match self.check(buf)? {
            Check::Incomplete { .. } => Ok(None),
            Check::Ready {
                prefix_len,
                frame_len,
            } => {
                debug_assert!(prefix_len + frame_len <= buf.len());
                buf.advance(prefix_len);
                Ok(Some(buf.split_to(frame_len).freeze()))
            }
        }
    }

    /// [`decode`](Self::decode), then [`frame::decode`] of the bytes split off.
    ///
    /// # Errors
    ///
    /// As [`decode`](Self::decode), or [`TcpFrameError::Frame`] if the delimited bytes are not an
    /// acceptable frame; they have been consumed, so the stream is still in sync.
    pub fn decode_frame(&mut self, buf: &mut BytesMut) -> Result<Option<pb::Frame>, TcpFrameError> {
        match self.decode(buf)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(frame::decode(bytes)?)),
        }
    }

    /// Appends any protobuf `message`'s length prefix and encoding to `out` (the same framing
    /// as frames; the cluster's links use it).
    ///
    /// # Errors
    ///
    /// [`TcpFrameError::TooLarge`] if the encoding is longer than `max_frame_bytes`; nothing is
    /// written then.
    pub fn encode_message<M: prost::Message>(
        &self,
        message: &M,
        out: &mut BytesMut,
    ) -> Result<(), TcpFrameError> {
        let len = message.encoded_len();
        let prefix = self.prefix_for(len)?;
        out.reserve(prefix_len(prefix) + len);
        put_prefix(prefix, out);
        message.encode(out).map_err(|_| TcpFrameError::TooLarge {
            len: len as u64,
            max: self.max_frame_bytes,
        })
    }

    /// Appends `frame`'s length prefix and protobuf encoding to `out`.
    ///
    /// # Errors
    ///
    /// [`TcpFrameError::TooLarge`] if the encoding is longer than `max_frame_bytes`; nothing is
    /// written then.
    pub fn encode(&self, frame: &pb::Frame, out: &mut BytesMut) -> Result<(), TcpFrameError> {
        let len = frame::encoded_len(frame);
        let prefix = self.prefix_for(len)?;
        out.reserve(prefix_len(prefix) + len);
        put_prefix(prefix, out);
        frame::encode(frame, out);
        Ok(())
    }

    /// Appends a length prefix and `encoded`, the protobuf encoding of a frame made beforehand
    /// (e.g. once for a fan-out to many connections).
    ///
    /// # Errors
    ///
    /// [`TcpFrameError::TooLarge`] if `encoded` is longer than `max_frame_bytes`; nothing is
    /// written then.
    pub fn encode_raw(&self, encoded: &[u8], out: &mut BytesMut) -> Result<(), TcpFrameError> {
        let prefix = self.prefix_for(encoded.len())?;
        out.reserve(prefix_len(prefix) + encoded.len());
        put_prefix(prefix, out);
        out.put_slice(encoded);
        Ok(())
    }

    /// The prefix value for a frame of `len` bytes, if this codec may write it.
    fn prefix_for(&self, len: usize) -> Result<u32, TcpFrameError> {
        let too_large = || TcpFrameError::TooLarge {
            len: u64::try_from(len).unwrap_or(u64::MAX),
            max: self.max_frame_bytes,
        };
        if len > self.max_frame_bytes {
            return Err(too_large());
        }
        u32::try_from(len).map_err(|_| too_large())
    }
}

/// Whether a frame of `len` bytes exceeds `max` (compared without narrowing either side).
fn exceeds(len: u32, max: usize) -> bool {
    u64::from(len) > u64::try_from(max).unwrap_or(u64::MAX)
}

/// A length prefix read from the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefix {
    /// The buffer ends inside the prefix; the value will be at least `at_least`.
    Incomplete {
        /// The value of the bits seen so far: a lower bound of the final value.
        at_least: u32,
    },
    /// A complete prefix of `prefix_len` bytes saying `len`.
    Complete {
        /// The length the prefix says.
        len: u32,
        /// How many bytes the prefix takes (1..=5).
        prefix_len: usize,
    },
}

/// The prefix is not a varint of at most 5 bytes fitting in a `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadPrefix;

/// Reads the varint length prefix at the start of `buf`. Looks at no more than 5 bytes.
pub(crate) fn read_prefix(buf: &[u8]) -> Result<Prefix, BadPrefix> {
    let mut value: u32 = 0;
    for (i, &byte) in buf.iter().take(MAX_PREFIX_LEN).enumerate() {
        if i == MAX_PREFIX_LEN - 1 && byte > 0x0f {
            // The fifth byte may carry only bits 28..32 and must end the varint.
            return Err(BadPrefix);
        }
        // i <= 4 and, at i == 4, byte <= 0x0f: the shifted bits stay within 32 bits.
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Prefix::Complete {
                len: value,
                prefix_len: i + 1,
            });
        }
    }
    debug_assert!(buf.len() < MAX_PREFIX_LEN, "a fifth byte always decides");
    Ok(Prefix::Incomplete { at_least: value })
}

/// How many bytes the varint prefix for `len` takes (1..=5).
pub(crate) fn prefix_len(len: u32) -> usize {
    match len {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0x0fff_ffff => 4,
        _ => 5,
    }
}

/// Appends the minimal varint encoding of `len`.
pub(crate) fn put_prefix(mut len: u32, out: &mut impl BufMut) {
    while len >= 0x80 {
        // Truncation intended: the low 7 bits, with the continuation bit set.
        out.put_u8((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.put_u8(len as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::frame::Body;

    fn ping(nonce: u64) -> pb::Frame {
        pb::Frame {
            request_id: nonce,
            body: Some(Body::Ping(pb::Ping { nonce })),
        }
    }

    fn send(body_len: usize) -> pb::Frame {
        pb::Frame {
            request_id: 1,
            body: Some(Body::Send(pb::Send {
                client_msg_id: 1,
                body: Bytes::from(vec![0xab; body_len]),
                ..pb::Send::default()
            })),
        }
    }

    fn stream_of(frames: &[pb::Frame]) -> BytesMut {
        let codec = FrameCodec::default();
        let mut out = BytesMut::new();
        for f in frames {
            codec.encode(f, &mut out).expect("fits");
        }
        out
    }

    #[test]
    fn prefix_is_a_protobuf_length_delimiter() {
        let frame = send(300);
        let mut ours = BytesMut::new();
        FrameCodec::default()
            .encode(&frame, &mut ours)
            .expect("fits");
        let theirs = prost::Message::encode_length_delimited_to_vec(&frame);
        assert_eq!(&ours[..], &theirs[..]);
    }

    #[test]
    fn prefix_len_matches_what_put_prefix_writes() {
        for len in [
            0,
            1,
            0x7f,
            0x80,
            0x3fff,
            0x4000,
            0x1f_ffff,
            0x20_0000,
            0x0fff_ffff,
            0x1000_0000,
            u32::MAX,
        ] {
            let mut out = Vec::new();
            put_prefix(len, &mut out);
            assert_eq!(out.len(), prefix_len(len), "len {len}");
            assert_eq!(
                read_prefix(&out),
                Ok(Prefix::Complete {
                    len,
                    prefix_len: out.len()
                })
            );
        }
    }

    #[test]
    fn decodes_one_frame_and_leaves_the_rest() {
        let mut buf = stream_of(&[ping(1)]);
        buf.extend_from_slice(&[0x05, 0x01]);
        let mut codec = FrameCodec::default();
        assert_eq!(codec.decode_frame(&mut buf).expect("ok"), Some(ping(1)));
        assert_eq!(&buf[..], &[0x05, 0x01]);
    }

    #[test]
    fn many_frames_in_one_buffer_decode_in_order() {
        let frames: Vec<_> = (0..10).map(ping).collect();
        let mut buf = stream_of(&frames);
        let mut codec = FrameCodec::default();
        let mut got = Vec::new();
        while let Some(f) = codec.decode_frame(&mut buf).expect("ok") {
            got.push(f);
        }
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn split_at_every_byte_boundary_yields_the_same_frames() {
        let frames = vec![ping(1), send(200), ping(u64::MAX), send(0)];
        let whole = stream_of(&frames);
        for cut in 0..=whole.len() {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for part in [&whole[..cut], &whole[cut..]] {
                buf.extend_from_slice(part);
                while let Some(f) = codec.decode_frame(&mut buf).expect("ok") {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn byte_by_byte_feeding_yields_the_same_frames() {
        let frames = vec![send(1000), ping(3)];
        let whole = stream_of(&frames);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in whole.iter() {
            buf.put_u8(b);
            while let Some(f) = codec.decode_frame(&mut buf).expect("ok") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn incomplete_frame_returns_none_and_keeps_the_buffer() {
        let whole = stream_of(&[send(50)]);
        let mut buf = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(FrameCodec::default().decode(&mut buf).expect("ok"), None);
        assert_eq!(buf.len(), whole.len() - 1);
    }

    #[test]
    fn check_tells_exactly_how_many_bytes_are_missing_once_the_prefix_is_complete() {
        let whole = stream_of(&[send(300)]); // 2-byte prefix
        let codec = FrameCodec::default();
        assert_eq!(
            codec.check(&whole[..2]).expect("ok"),
            Check::Incomplete {
                needed: whole.len() - 2
            }
        );
        assert_eq!(
            codec.check(&whole[..1]).expect("ok"),
            Check::Incomplete { needed: 1 }
        );
        assert_eq!(
            codec.check(&[]).expect("ok"),
            Check::Incomplete { needed: 1 }
        );
        assert_eq!(
            codec.check(&whole).expect("ok"),
            Check::Ready {
                prefix_len: 2,
                frame_len: whole.len() - 2
            }
        );
    }

    #[test]
    fn decoded_frame_bytes_are_split_off_the_read_buffer_without_copy() {
        let mut buf = stream_of(&[send(100)]);
        let start = buf.as_ptr();
        let bytes = FrameCodec::default()
            .decode(&mut buf)
            .expect("ok")
            .expect("whole frame");
        assert_eq!(bytes.as_ptr(), start.wrapping_add(1));
    }

    #[test]
    fn oversized_prefix_is_rejected_before_the_payload_arrives() {
        // 5-byte prefix claiming 4 GiB - 1, and no payload at all.
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x0f][..]);
        let err = FrameCodec::default()
            .decode(&mut buf)
            .expect_err("too large");
        assert!(matches!(
            err,
            TcpFrameError::TooLarge {
                len: 0xffff_ffff,
                max: DEFAULT_MAX_FRAME_BYTES
            }
        ));
        assert_eq!(err.code(), pb::ErrorCode::FrameTooLarge);
    }

    #[test]
    fn incomplete_prefix_already_over_the_limit_is_rejected() {
        // Three continuation bytes: the value is already >= 2^21 - 1 > 64 KiB.
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff][..]);
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(TcpFrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn frame_of_exactly_the_limit_is_accepted() {
        let mut buf = BytesMut::new();
        put_prefix(100, &mut buf);
        buf.extend_from_slice(&[0; 100]);
        let bytes = FrameCodec::new(100).decode(&mut buf).expect("at the limit");
        assert_eq!(bytes.map(|b| b.len()), Some(100));
    }

    #[test]
    fn frame_one_byte_over_the_limit_is_too_large() {
        let mut buf = BytesMut::new();
        put_prefix(101, &mut buf);
        assert!(matches!(
            FrameCodec::new(100).decode(&mut buf),
            Err(TcpFrameError::TooLarge { len: 101, max: 100 })
        ));
    }

    #[test]
    fn six_byte_varint_is_rejected() {
        let mut buf = BytesMut::from(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x00][..]);
        let err = FrameCodec::new(usize::MAX)
            .decode(&mut buf)
            .expect_err("bad");
        assert!(matches!(err, TcpFrameError::BadLengthPrefix));
        assert_eq!(err.code(), pb::ErrorCode::BadFrame);
    }

    #[test]
    fn varint_overflowing_u32_is_rejected() {
        // 2^32: fifth byte 0x10 carries bit 32.
        let mut buf = BytesMut::from(&[0x80, 0x80, 0x80, 0x80, 0x10][..]);
        assert!(matches!(
            FrameCodec::new(usize::MAX).decode(&mut buf),
            Err(TcpFrameError::BadLengthPrefix)
        ));
    }

    #[test]
    fn prefix_errors_leave_the_buffer_untouched() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        let _ = FrameCodec::default().decode(&mut buf);
        assert_eq!(buf.len(), 6);
    }

    #[test]
    fn non_minimal_prefix_is_accepted() {
        let mut buf = BytesMut::from(&[0x82, 0x00, 0x08, 0x01][..]);
        let bytes = FrameCodec::default().decode(&mut buf).expect("ok");
        assert_eq!(bytes.as_deref(), Some(&[0x08, 0x01][..]));
    }

    #[test]
    fn zero_length_frame_is_empty_bytes_and_missing_body() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0x00, 0x00][..]);
        assert_eq!(codec.decode(&mut buf).expect("ok"), Some(Bytes::new()));
        let err = codec.decode_frame(&mut buf).expect_err("no body");
        assert!(matches!(err, TcpFrameError::Frame(FrameError::MissingBody)));
        assert_eq!(err.code(), pb::ErrorCode::UnexpectedFrame);
        assert!(
            buf.is_empty(),
            "the bad frame was consumed; the stream is in sync"
        );
    }

    #[test]
    fn bad_protobuf_is_consumed_and_the_next_frame_decodes() {
        let mut buf = BytesMut::from(&[0x01, 0xff][..]); // one byte: a truncated tag
        buf.extend_from_slice(&stream_of(&[ping(9)]));
        let mut codec = FrameCodec::default();
        assert!(matches!(
            codec.decode_frame(&mut buf),
            Err(TcpFrameError::Frame(FrameError::Protobuf(_)))
        ));
        assert_eq!(codec.decode_frame(&mut buf).expect("ok"), Some(ping(9)));
    }

    #[test]
    fn encode_refuses_a_frame_over_the_limit_and_writes_nothing() {
        let mut out = BytesMut::new();
        let err = FrameCodec::new(100)
            .encode(&send(200), &mut out)
            .expect_err("too large");
        assert!(matches!(err, TcpFrameError::TooLarge { max: 100, .. }));
        assert!(out.is_empty());
    }

    #[test]
    fn encode_raw_prefixes_pre_encoded_bytes() {
        let frame = ping(5);
        let mut encoded = BytesMut::new();
        frame::encode(&frame, &mut encoded);
        let mut out = BytesMut::new();
        FrameCodec::default()
            .encode_raw(&encoded, &mut out)
            .expect("fits");
        assert_eq!(out, stream_of(&[frame]));
    }

    #[test]
    fn encode_raw_refuses_bytes_over_the_limit() {
        let mut out = BytesMut::new();
        assert!(matches!(
            FrameCodec::new(3).encode_raw(&[0; 4], &mut out),
            Err(TcpFrameError::TooLarge { len: 4, max: 3 })
        ));
        assert!(out.is_empty());
    }
}
