//! Messages from frames: reassembly of fragmented messages (RFC 6455 5.4), incremental UTF-8
//! validation of text, the message size limit, and close frame payloads (RFC 6455 5.5.1, 7.4).

use bytes::{Bytes, BytesMut};

use super::WsError;
use super::close_code;
use super::frame::{FrameHeader, OpCode};

/// What a client said, one complete message (or control frame) at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete binary message (fragments joined).
    Binary(Bytes),
    /// A complete text message (fragments joined). Guaranteed valid UTF-8: it was checked
    /// before the event was produced, so `std::str::from_utf8` on it cannot fail.
    Text(Bytes),
    /// A ping. [`crate::ws::WsConn::decode`] has already written the matching pong.
    Ping(Bytes),
    /// A pong (the answer to the server's ping, or an unsolicited heartbeat).
    Pong(Bytes),
    /// The client's close frame. When the client started the close handshake,
    /// [`crate::ws::WsConn::decode`] has already written the reply; either way the handshake is
    /// now complete and the server should flush its output and close the TCP connection.
    Close {
        /// The status code, or `None` if the frame had no payload (RFC 6455 "1005, no status").
        /// Always one of [`close_code::is_allowed_on_wire`].
        code: Option<u16>,
        /// The reason, at most 123 bytes (empty if none).
        reason: String,
    },
}

/// The kind of a data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataKind {
    Text,
    Binary,
}

/// A fragmented message in progress.
///
/// ### Invariants
/// * `buf.len() <= max` of the owning assembler.
/// * For text, `buf[..validated]` is valid UTF-8 and `buf[validated..]` is a (possibly empty)
///   valid prefix of a UTF-8 character: at most 3 bytes.
#[derive(Debug)]
struct Partial {
    kind: DataKind,
    buf: BytesMut,
    validated: usize,
}

/// Joins data frames into messages and enforces the fragmentation rules and the size limit.
///
/// Use it in two steps per data frame: [`MessageAssembler::check_header`] as soon as the header
/// is decoded (so an oversized or out-of-sequence frame is rejected before its payload is
/// buffered), then [`MessageAssembler::push`] with the unmasked payload. Control frames do not
/// go through the assembler: they may arrive between fragments without disturbing it.
#[derive(Debug)]
pub struct MessageAssembler {
    max_message_bytes: usize,
    partial: Option<Partial>,
}

impl MessageAssembler {
    /// An assembler that accepts messages of at most `max_message_bytes` (all fragments).
    pub fn new(max_message_bytes: usize) -> Self {
        MessageAssembler {
            max_message_bytes,
            partial: None,
        }
    }

    /// The largest message accepted, in bytes (all fragments).
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Changes the limit; a message already in progress is held to the new one.
    pub fn set_max_message_bytes(&mut self, max_message_bytes: usize) {
        self.max_message_bytes = max_message_bytes;
    }

    /// Whether a fragmented message is in progress.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// Checks a data frame's header against the message in progress, before its payload is
    /// buffered:
    ///
    /// * a continuation needs a message in progress ([`WsError::UnexpectedContinuation`]);
    /// * a text or binary frame needs none ([`WsError::ExpectedContinuation`]);
    /// * the message so far plus this payload must fit the limit ([`WsError::MessageTooLarge`]).
    pub fn check_header(&self, header: &FrameHeader) -> Result<(), WsError> {
        debug_assert!(!header.opcode.is_control());
        let so_far = match (header.opcode, &self.partial) {
            (OpCode::Continuation, None) => return Err(WsError::UnexpectedContinuation),
            (OpCode::Continuation, Some(partial)) => partial.buf.len(),
            (_, Some(_)) => return Err(WsError::ExpectedContinuation),
            (_, None) => 0,
        };
        let size = (so_far as u64).saturating_add(header.payload_len);
        if size > self.max_message_bytes as u64 {
            return Err(WsError::MessageTooLarge {
                size,
                max: self.max_message_bytes,
            });
        }
        Ok(())
    }

    /// Adds a data frame whose header passed [`MessageAssembler::check_header`], with its
    /// unmasked payload. Returns the message when this frame completes it.
    ///
    /// Text is validated as each fragment arrives: an invalid sequence fails at once
    /// ([`WsError::InvalidUtf8`]); a character split across fragments is fine; a message that
    /// ends inside a character fails at its final fragment.
    pub fn push(
        &mut self,
        header: &FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Event>, WsError> {
        self.check_header(header)?;
        debug_assert_eq!(payload.len() as u64, header.payload_len);
        let kind = match header.opcode {
            OpCode::Text => DataKind::Text,
            OpCode::Binary => DataKind::Binary,
            _ => {
                // A continuation: check_header proved a message is in progress.
                let Some(partial) = self.partial.as_mut() else {
                    return Err(WsError::UnexpectedContinuation);
                };
                partial.buf.extend_from_slice(&payload);
                if partial.kind == DataKind::Text {
                    partial.validated =
                        validate_utf8_from(&partial.buf, partial.validated, header.fin)?;
                }
                if !header.fin {
                    return Ok(None);
                }
                return Ok(self.partial.take().map(|p| finish(p.kind, p.buf)));
            }
        };
        if header.fin {
            // The common case: an unfragmented message, handed out without a copy.
            if kind == DataKind::Text {
                validate_utf8_from(&payload, 0, true)?;
            }
            return Ok(Some(finish(kind, payload)));
        }
        let validated = match kind {
            DataKind::Text => validate_utf8_from(&payload, 0, false)?,
            DataKind::Binary => 0,
        };
        self.partial = Some(Partial {
            kind,
            buf: payload,
            validated,
        });
        Ok(None)
    }
}

fn finish(kind: DataKind, buf: BytesMut) -> Event {
    match kind {
        DataKind::Text => Event::Text(buf.freeze()),
        DataKind::Binary => Event::Binary(buf.freeze()),
    }
}

/// Validates `buf[from..]` as UTF-8, given that `buf[..from]` is valid and `from` is a character
/// boundary. Returns the new boundary: `buf.len()`, or, if `buf` ends inside a character and
/// more fragments follow (`!fin`), the start of that character.
fn validate_utf8_from(buf: &[u8], from: usize, fin: bool) -> Result<usize, WsError> {
    let rest = buf.get(from..).ok_or(WsError::InvalidUtf8)?;
    match std::str::from_utf8(rest) {
        Ok(_) => Ok(buf.len()),
        // `error_len() == None`: the input ends with a valid prefix of a character.
        Err(e) if e.error_len().is_none() && !fin => {
            let boundary = from.saturating_add(e.valid_up_to());
            debug_assert!(buf.len() - boundary <= 3);
            Ok(boundary)
        }
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

/// Parses a close frame's payload: empty (no code), or a 2-byte big-endian code allowed on the
/// wire followed by a UTF-8 reason.
///
/// Errors: a 1-byte payload ([`WsError::CloseFrameTooShort`]), a code forbidden on the wire
/// ([`WsError::InvalidCloseCode`]), a reason that is not UTF-8 ([`WsError::InvalidCloseReason`]).
pub fn parse_close_payload(payload: &[u8]) -> Result<(Option<u16>, String), WsError> {
    match payload {
        [] => Ok((None, String::new())),
        [_] => Err(WsError::CloseFrameTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code::is_allowed_on_wire(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidCloseReason)?;
            Ok((Some(code), reason.to_owned()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header(opcode: OpCode, fin: bool, len: usize) -> FrameHeader {
        FrameHeader {
            fin,
            opcode,
            mask: Some([0; 4]),
            payload_len: len as u64,
        }
    }

    fn push(
        a: &mut MessageAssembler,
        op: OpCode,
        fin: bool,
        data: &[u8],
    ) -> Result<Option<Event>, WsError> {
        a.push(&header(op, fin, data.len()), BytesMut::from(data))
    }

    #[test]
    fn fragments_are_joined_in_order() {
        let mut a = MessageAssembler::new(100);
        assert_eq!(push(&mut a, OpCode::Binary, false, b"ab"), Ok(None));
        assert_eq!(push(&mut a, OpCode::Continuation, false, b""), Ok(None));
        assert_eq!(push(&mut a, OpCode::Continuation, false, b"cd"), Ok(None));
        assert_eq!(
            push(&mut a, OpCode::Continuation, true, b"e"),
            Ok(Some(Event::Binary(Bytes::from_static(b"abcde"))))
        );
        assert!(!a.in_progress());
    }

    #[test]
    fn utf8_character_split_at_every_byte_across_fragments_is_accepted() {
        let text = "a€𝄞b".as_bytes();
        for cut in 0..=text.len() {
            let mut a = MessageAssembler::new(100);
            assert_eq!(
                push(&mut a, OpCode::Text, false, &text[..cut]),
                Ok(None),
                "cut {cut}"
            );
            assert_eq!(
                push(&mut a, OpCode::Continuation, true, &text[cut..]),
                Ok(Some(Event::Text(Bytes::copy_from_slice(text)))),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn invalid_utf8_fails_at_the_first_bad_fragment() {
        let mut a = MessageAssembler::new(100);
        // 0xF4 0x90 starts a code point above U+10FFFF: no continuation can make it valid.
        assert_eq!(
            push(&mut a, OpCode::Text, false, &[b'o', b'k', 0xF4, 0x90]),
            Err(WsError::InvalidUtf8)
        );
    }

    #[test]
    fn text_ending_inside_a_character_is_invalid() {
        let mut a = MessageAssembler::new(100);
        assert_eq!(push(&mut a, OpCode::Text, false, &[0xE2, 0x82]), Ok(None));
        assert_eq!(
            push(&mut a, OpCode::Continuation, true, &[]),
            Err(WsError::InvalidUtf8)
        );
    }

    #[test]
    fn size_limit_counts_all_fragments() {
        let mut a = MessageAssembler::new(5);
        assert_eq!(push(&mut a, OpCode::Binary, false, b"abc"), Ok(None));
        assert_eq!(
            a.check_header(&header(OpCode::Continuation, true, 3)),
            Err(WsError::MessageTooLarge { size: 6, max: 5 })
        );
        assert!(
            a.check_header(&header(OpCode::Continuation, true, 2))
                .is_ok()
        );
    }

    #[test]
    fn close_payload_of_one_byte_is_protocol_error() {
        assert_eq!(parse_close_payload(&[3]), Err(WsError::CloseFrameTooShort));
    }

    #[test]
    fn empty_close_payload_has_no_code() {
        assert_eq!(parse_close_payload(&[]), Ok((None, String::new())));
    }

    #[test]
    fn close_codes_allowed_on_the_wire_are_accepted() {
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            let payload = code.to_be_bytes();
            assert_eq!(
                parse_close_payload(&payload),
                Ok((Some(code), String::new())),
                "{code}"
            );
        }
    }

    #[test]
    fn close_codes_forbidden_on_the_wire_are_protocol_errors() {
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let err = parse_close_payload(&code.to_be_bytes()).unwrap_err();
            assert_eq!(err, WsError::InvalidCloseCode(code));
            assert_eq!(err.close_code(), 1002);
        }
    }

    #[test]
    fn close_reason_must_be_utf8_else_1007() {
        let err = parse_close_payload(&[0x03, 0xE8, 0xFF]).unwrap_err();
        assert_eq!(err, WsError::InvalidCloseReason);
        assert_eq!(err.close_code(), 1007);
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8, b'o', b'k']),
            Ok((Some(1000), "ok".to_owned()))
        );
    }
}
