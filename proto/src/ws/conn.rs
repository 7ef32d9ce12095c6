//! The WebSocket connection state machine (after the handshake): frames in, events out, and the
//! close handshake (RFC 6455 section 7), sans-IO.
//!
//! ```text
//!              client Close / protocol error
//!   Open  ─────────────────────────────────────────────▶  Closed
//!    │                                                      ▲
//!    │ WsConn::close (server sends Close)                   │ client Close / protocol error
//!    ▼                                                      │
//!   CloseSent ──────────────────────────────────────────────┘
//! ```
//!
//! * `Open`: data messages, pings and pongs are reported; a ping is answered with a pong; a
//!   client Close is answered with a Close echoing its code, then the connection is `Closed`.
//! * `CloseSent`: the server has sent its Close; data frames, pings and pongs are still parsed
//!   (to find the client's Close) but dropped, and nothing more is written.
//! * `Closed`: terminal. The caller flushes its output and closes the TCP connection (the server
//!   closes TCP first, RFC 6455 7.1.1). [`WsConn::decode`] reads nothing more.
//!
//! A protocol error in `Open` writes a Close with the error's code
//! ([`WsError::close_code`]) and ends in `Closed`; in `CloseSent` it writes nothing more.
//!
//! What the state machine writes into `out` is never larger than what it read (a pong is 4 bytes
//! shorter than the masked ping it answers), so a client cannot make the server's output grow
//! faster than its own input.

use bytes::{Buf, BytesMut};

use super::WsError;
use super::frame::{EncodeError, encode_close, encode_pong};
use super::frame::{FrameHeader, MAX_CLOSE_REASON, OpCode, apply_mask};
pub use super::message::Event;
use super::message::{MessageAssembler, parse_close_payload};
use crate::DEFAULT_MAX_FRAME_BYTES;

/// The default limit on a whole (reassembled) message: [`DEFAULT_MAX_FRAME_BYTES`] plus 1 KiB of
/// slack, so that a protobuf `Frame` a little over its own limit still reaches the frame decoder
/// and gets the precise `Error{code: FRAME_TOO_LARGE}` instead of a bare WebSocket 1009.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = DEFAULT_MAX_FRAME_BYTES + 1024;

/// Limits of a WebSocket connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsConfig {
    /// The largest message (all fragments together) the server accepts, in bytes of payload.
    /// A frame whose header would take the message past it fails the connection with 1009
    /// before any of its payload is buffered.
    pub max_message_bytes: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Where a connection is in its life (see the module documentation for the transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Messages flow both ways.
    Open,
    /// The server sent its Close and waits for the client's; the server must send nothing more.
    CloseSent,
    /// The close handshake is over or the connection failed: flush and close the socket.
    Closed,
}

/// The server side of one WebSocket connection after a successful handshake.
///
/// ```
/// use bytes::BytesMut;
/// use parley_proto::ws::{Event, WsConfig, WsConn};
///
/// let mut conn = WsConn::new(WsConfig::default());
/// // RFC 6455 5.7: a masked text frame "Hello", as read from the socket.
/// let mut input = BytesMut::from(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58][..]);
/// let mut out = BytesMut::new();
/// let event = conn.decode(&mut input, &mut out).unwrap();
/// assert_eq!(event, Some(Event::Text("Hello".into())));
/// assert!(input.is_empty() && out.is_empty());
/// ```
#[derive(Debug)]
pub struct WsConn {
    state: ConnState,
    assembler: MessageAssembler,
}

impl WsConn {
    /// A connection in state [`ConnState::Open`].
    pub fn new(config: WsConfig) -> Self {
        WsConn {
            state: ConnState::Open,
            assembler: MessageAssembler::new(config.max_message_bytes),
        }
    }

    /// Changes the largest message accepted from the next frame on (e.g. raised after login).
    pub fn set_max_message_bytes(&mut self, max_message_bytes: usize) {
        self.assembler.set_max_message_bytes(max_message_bytes);
    }

    /// The connection's state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Whether the server may still send messages (state [`ConnState::Open`]).
    pub fn is_open(&self) -> bool {
        self.state == ConnState::Open
    }

    /// Whether the connection is over (state [`ConnState::Closed`]): flush and close the socket.
    pub fn is_closed(&self) -> bool {
        self.state == ConnState::Closed
    }

    /// Decodes the next event from the bytes read so far.
    ///
    /// Consumes whole frames from the front of `input` and returns the first event they
    /// complete; call again until `Ok(None)`, which means "need more bytes" (or, once
    /// [`WsConn::is_closed`], "nothing more will be read"). When a frame header is complete but
    /// its payload is not, `input` is reserved room for the rest of the frame, which is at most
    /// the message limit. Frames that complete no event (a fragment, anything while
    /// `CloseSent`) are consumed silently.
    ///
    /// Automatic answers are appended to `out`: the pong for a ping (in `Open`), the Close
    /// echoing a client's Close (in `Open`), and the Close carrying the error's code when the
    /// client breaks the protocol (in `Open`).
    ///
    /// Payloads are split off `input` and unmasked in place: an unfragmented message costs no
    /// allocation or copy. A fragmented one is joined in a buffer of its own.
    ///
    /// # Errors
    /// A [`WsError`] when the client breaks the protocol; the connection is then `Closed`.
    #[inline(always)]
    pub fn decode(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Option<Event>, WsError> {
        // The fast path, small enough to inline into the caller's read loop, so that the event
        // is built once, in place, instead of being copied out through the general decoder's
        // layers (those copies cost more than the unmasking). Every other frame, and every
        // error but invalid UTF-8 in such a frame, goes through `decode_general`.
        let Some(frame) = self.whole_data_frame(input) else {
            return self.decode_general(input, out);
        };
        // Split header and payload off together and skip the header once frozen: one call
        // into `BytesMut` per frame instead of two (`Bytes::advance` is a pointer bump).
        let mut whole = input.split_to(frame.header_len + frame.payload_len);
        let payload = whole.get_mut(frame.header_len..).unwrap_or_default();
        apply_mask(payload, frame.mask);
        if frame.text && std::str::from_utf8(payload).is_err() {
            return Err(self.fail(WsError::InvalidUtf8, out));
        }
        let mut payload = whole.freeze();
        payload.advance(frame.header_len);
        Ok(Some(if frame.text {
            Event::Text(payload)
        } else {
            Event::Binary(payload)
        }))
    }

    /// Recognises the frame that clients send nearly always, complete at the front of `input`:
    /// a final (unfragmented) text or binary frame, masked, with a 7- or 16-bit length in its
    /// minimal encoding and within the message limit, while the connection is `Open` and no
    /// fragmented message is in progress.
    ///
    /// `Some` only for a frame that [`WsConn::decode_general`] would accept as a whole message
    /// (so the two agree on everything); `None` for anything else, including a frame that is
    /// still incomplete.
    #[inline]
    fn whole_data_frame(&self, input: &[u8]) -> Option<WholeDataFrame> {
        if self.state != ConnState::Open || self.assembler.in_progress() {
            return None;
        }
        let (&[b0, b1], rest) = input.split_first_chunk::<2>()?;
        let text = match b0 {
            // FIN, no RSV bits, binary / text.
            0x82 => false,
            0x81 => true,
            _ => return None,
        };
        let (payload_len, rest) = match b1 {
            // Masked, 7-bit length.
            0x80..=0xFD => (usize::from(b1 & 0x7F), rest),
            // Masked, 16-bit length, minimal only if at least 126.
            0xFE => {
                let (len, rest) = rest.split_first_chunk::<2>()?;
                let len = usize::from(u16::from_be_bytes(*len));
                if len < 126 {
                    return None;
                }
                (len, rest)
            }
            // Unmasked, or a 64-bit length (at least 64 KiB: not worth a fast path).
            _ => return None,
        };
        let (&mask, payload) = rest.split_first_chunk::<4>()?;
        if payload_len > self.assembler.max_message_bytes() || payload.len() < payload_len {
            return None;
        }
        Some(WholeDataFrame {
            text,
            header_len: input.len() - payload.len(),
            payload_len,
            mask,
        })
    }

    /// [`WsConn::decode`] for every frame and state: the fast path of `decode` is a shortcut
    /// through this function for one kind of frame.
    #[inline(never)]
    fn decode_general(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Option<Event>, WsError> {
        loop {
            if self.state == ConnState::Closed {
                return Ok(None);
            }
            let (header, header_len) = match FrameHeader::decode(input) {
                Ok(Some(decoded)) => decoded,
                // No reservation for a header: it is at most 14 bytes, and an idle connection's
                // buffer should stay as small as the caller keeps it.
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(e, out)),
            };
            if !header.opcode.is_control()
                && let Err(e) = self.assembler.check_header(&header)
            {
                return Err(self.fail(e, out));
            }
            // The payload length is now at most the message limit (a usize) or 125.
            let Some((payload_len, frame_len)) = usize::try_from(header.payload_len)
                .ok()
                .and_then(|len| Some((len, len.checked_add(header_len)?)))
            else {
                let e = WsError::MessageTooLarge {
                    size: header.payload_len,
                    max: usize::MAX,
                };
                return Err(self.fail(e, out));
            };
            if input.len() < frame_len {
                input.reserve(frame_len - input.len());
                return Ok(None);
            }
            input.advance(header_len);
            let mut payload = input.split_to(payload_len);
            if let Some(mask) = header.mask {
                apply_mask(&mut payload, mask);
            }
            if let Some(event) = self.take_frame(header, payload, out)? {
                return Ok(Some(event));
            }
        }
    }

    /// Acts on one complete frame, already consumed from the input: its decoded `header` and
    /// its unmasked `payload`.
    fn take_frame(
        &mut self,
        header: FrameHeader,
        payload: BytesMut,
        out: &mut BytesMut,
    ) -> Result<Option<Event>, WsError> {
        let open = self.state == ConnState::Open;
        match header.opcode {
            OpCode::Ping => {
                if !open {
                    return Ok(None);
                }
                // Cannot fail: the header check bounded control payloads to 125 bytes.
                let answered = encode_pong(out, &payload);
                debug_assert!(answered.is_ok());
                Ok(Some(Event::Ping(payload.freeze())))
            }
            OpCode::Pong => Ok(open.then(|| Event::Pong(payload.freeze()))),
            OpCode::Close => {
                let (code, reason) = match parse_close_payload(&payload) {
                    Ok(parsed) => parsed,
                    Err(e) => return Err(self.fail(e, out)),
                };
                if open {
                    // Echo the code (RFC 6455 5.5.1); it passed `is_allowed_on_wire`, so this
                    // cannot fail.
                    let answered = encode_close(out, code, "");
                    debug_assert!(answered.is_ok());
                }
                self.state = ConnState::Closed;
                Ok(Some(Event::Close { code, reason }))
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                match self.assembler.push(&header, payload) {
                    Ok(event) => Ok(event.filter(|_| open)),
                    Err(e) => Err(self.fail(e, out)),
                }
            }
        }
    }

    /// Starts the close handshake from the server side: in `Open`, appends a Close with `code`
    /// and `reason` to `out` and moves to `CloseSent` (then keep decoding until the client's
    /// Close arrives, bounded by the caller's own timeout). In any other state it does nothing:
    /// a Close was already sent or the connection is over.
    ///
    /// # Errors
    /// The [`EncodeError`] of [`encode_close`] (a code not allowed on the wire, a reason over
    /// 123 bytes); nothing is written and the state does not change.
    pub fn close(
        &mut self,
        code: u16,
        reason: &str,
        out: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        if self.state == ConnState::Open {
            encode_close(out, Some(code), reason)?;
            self.state = ConnState::CloseSent;
        }
        Ok(())
    }

    /// Fails the connection for `error`: writes a Close with its code (unless a Close was
    /// already sent), moves to `Closed` and hands the error back.
    #[cold]
    #[inline(never)]
    fn fail(&mut self, error: WsError, out: &mut BytesMut) -> WsError {
        if self.state == ConnState::Open {
            let reason = error.to_string();
            let reason = truncate_to_char_boundary(&reason, MAX_CLOSE_REASON);
            let written = encode_close(out, Some(error.close_code()), reason);
            debug_assert!(written.is_ok());
        }
        self.state = ConnState::Closed;
        error
    }
}

/// A frame recognised by [`WsConn::whole_data_frame`]: complete in the input, `header_len`
/// bytes of header then `payload_len` bytes of payload masked with `mask`.
#[derive(Debug, Clone, Copy)]
struct WholeDataFrame {
    /// A text message (else binary).
    text: bool,
    header_len: usize,
    payload_len: usize,
    mask: [u8; 4],
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_to_char_boundary(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::ws::message::parse_close_payload;

    const KEY: [u8; 4] = [0xA1, 0x02, 0xC3, 0x44];

    /// A masked client frame, built independently of the server's encoder.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&KEY);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
        v
    }

    fn text(payload: &str) -> Vec<u8> {
        client_frame(true, 0x1, payload.as_bytes())
    }

    fn binary(payload: &[u8]) -> Vec<u8> {
        client_frame(true, 0x2, payload)
    }

    fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        client_frame(true, 0x8, &payload)
    }

    /// Everything one connection reports for `stream` fed in chunks of `chunk` bytes: events and
    /// the error (if any), and the bytes it wrote.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        events: Vec<Event>,
        error: Option<WsError>,
        out: Vec<u8>,
        state: ConnState,
    }

    fn run_with(conn: &mut WsConn, stream: &[u8], chunk: usize) -> Outcome {
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        let mut error = None;
        'feed: for piece in stream.chunks(chunk.max(1)) {
            input.extend_from_slice(piece);
            loop {
                match conn.decode(&mut input, &mut out) {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(e) => {
                        error = Some(e);
                        break 'feed;
                    }
                }
            }
        }
        Outcome {
            events,
            error,
            out: out.to_vec(),
            state: conn.state(),
        }
    }

    fn run(stream: &[u8]) -> Outcome {
        run_with(&mut WsConn::new(WsConfig::default()), stream, stream.len())
    }

    /// Runs `stream` whole, then byte by byte and split once at every position, and checks that
    /// every way of cutting it gives the same outcome.
    fn run_every_split(stream: &[u8]) -> Outcome {
        let whole = run(stream);
        let bytewise = run_with(&mut WsConn::new(WsConfig::default()), stream, 1);
        assert_eq!(bytewise, whole, "byte by byte");
        for cut in 0..=stream.len() {
            let mut conn = WsConn::new(WsConfig::default());
            let mut input = BytesMut::from(&stream[..cut]);
            let mut out = BytesMut::new();
            let mut events = Vec::new();
            let mut error = None;
            for part in [&stream[cut..], &[]] {
                loop {
                    match conn.decode(&mut input, &mut out) {
                        Ok(Some(e)) => events.push(e),
                        Ok(None) => break,
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                if error.is_some() {
                    break;
                }
                input.extend_from_slice(part);
            }
            let split = Outcome {
                events,
                error,
                out: out.to_vec(),
                state: conn.state(),
            };
            assert_eq!(split, whole, "split at {cut}");
        }
        whole
    }

    /// The close frame the server wrote, as (code, reason).
    fn server_close(out: &[u8]) -> (Option<u16>, String) {
        assert_eq!(out.first(), Some(&0x88), "a final close frame: {out:?}");
        let len = usize::from(out[1]);
        assert!(len <= 125 && out[1] & 0x80 == 0, "unmasked, short");
        assert_eq!(out.len(), 2 + len);
        parse_close_payload(&out[2..]).unwrap()
    }

    fn assert_failed_with(outcome: &Outcome, code: u16) {
        let error = outcome.error.as_ref().expect("an error");
        assert_eq!(error.close_code(), code, "{error}");
        assert_eq!(server_close(&outcome.out).0, Some(code));
        assert_eq!(outcome.state, ConnState::Closed);
    }

    #[test]
    fn rfc_example_hello_is_a_text_event() {
        let outcome = run_every_split(&[
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ]);
        assert_eq!(
            outcome.events,
            vec![Event::Text(Bytes::from_static(b"Hello"))]
        );
        assert!(outcome.out.is_empty());
        assert_eq!(outcome.state, ConnState::Open);
    }

    #[test]
    fn many_frames_in_one_buffer_yield_one_event_each_in_order() {
        let mut stream = text("one");
        stream.extend(binary(&[2; 200]));
        stream.extend(client_frame(true, 0xA, b"pong"));
        stream.extend(binary(&[]));
        let outcome = run_every_split(&stream);
        assert_eq!(
            outcome.events,
            vec![
                Event::Text(Bytes::from_static(b"one")),
                Event::Binary(Bytes::from(vec![2; 200])),
                Event::Pong(Bytes::from_static(b"pong")),
                Event::Binary(Bytes::new()),
            ]
        );
    }

    #[test]
    fn boundary_sizes_125_126_65535_65536_are_delivered_intact() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let outcome = run(&binary(&payload));
            assert_eq!(
                outcome.events,
                vec![Event::Binary(Bytes::from(payload))],
                "len {len}"
            );
        }
    }

    #[test]
    fn unfragmented_payload_is_split_off_the_read_buffer_without_copy() {
        let frame = binary(&[9; 1000]);
        let mut input = BytesMut::from(&frame[..]);
        let start = input.as_ptr() as usize;
        let mut conn = WsConn::new(WsConfig::default());
        let Some(Event::Binary(payload)) = conn.decode(&mut input, &mut BytesMut::new()).unwrap()
        else {
            panic!("expected a binary event");
        };
        assert_eq!(
            payload.as_ptr() as usize,
            start + 8,
            "payload lies in the read buffer"
        );
    }

    #[test]
    fn partial_frame_reserves_room_for_the_rest() {
        let frame = binary(&[1; 5000]);
        let mut input = BytesMut::from(&frame[..10]);
        let mut conn = WsConn::new(WsConfig::default());
        assert_eq!(conn.decode(&mut input, &mut BytesMut::new()), Ok(None));
        assert_eq!(
            input.len(),
            10,
            "nothing consumed until the frame is complete"
        );
        assert!(input.capacity() >= frame.len());
    }

    #[test]
    fn unmasked_client_frame_is_protocol_error_1002() {
        assert_failed_with(&run(&[0x82, 0x01, 0xFF]), 1002);
    }

    #[test]
    fn reserved_bits_set_is_protocol_error_1002() {
        let mut frame = binary(b"x");
        frame[0] |= 0x40;
        let outcome = run(&frame);
        assert!(matches!(outcome.error, Some(WsError::ReservedBits(_))));
        assert_failed_with(&outcome, 1002);
    }

    #[test]
    fn unknown_opcode_is_protocol_error_1002() {
        for op in [0x3, 0x7, 0xB, 0xF] {
            let outcome = run(&client_frame(true, op, b""));
            assert_eq!(outcome.error, Some(WsError::ReservedOpcode(op)));
            assert_failed_with(&outcome, 1002);
        }
    }

    #[test]
    fn control_frame_longer_than_125_is_rejected() {
        let outcome = run(&client_frame(true, 0x9, &[0; 126]));
        assert_eq!(outcome.error, Some(WsError::ControlFrameTooLong(126)));
        assert_failed_with(&outcome, 1002);
    }

    #[test]
    fn fragmented_control_frame_is_rejected() {
        let outcome = run(&client_frame(false, 0x9, b"x"));
        assert_eq!(outcome.error, Some(WsError::FragmentedControlFrame));
        assert_failed_with(&outcome, 1002);
    }

    #[test]
    fn non_minimal_length_is_protocol_error_1002() {
        let mut frame = vec![0x82, 0x80 | 126, 0, 5];
        frame.extend_from_slice(&KEY);
        frame.extend_from_slice(&[0; 5]);
        let outcome = run(&frame);
        assert_eq!(outcome.error, Some(WsError::NonMinimalLength(5)));
        assert_failed_with(&outcome, 1002);
    }

    #[test]
    fn length_with_msb_set_is_protocol_error_1002() {
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&u64::MAX.to_be_bytes());
        let outcome = run(&frame);
        assert_eq!(outcome.error, Some(WsError::LengthMsbSet));
        assert_failed_with(&outcome, 1002);
    }

    #[test]
    fn ping_is_answered_with_pong_echoing_its_payload() {
        let outcome = run_every_split(&client_frame(true, 0x9, b"are you there"));
        assert_eq!(
            outcome.events,
            vec![Event::Ping(Bytes::from_static(b"are you there"))]
        );
        let mut expected = vec![0x8A, 13];
        expected.extend_from_slice(b"are you there");
        assert_eq!(outcome.out, expected);
    }

    #[test]
    fn pong_is_reported_and_not_answered() {
        let outcome = run(&client_frame(true, 0xA, b"n"));
        assert_eq!(outcome.events, vec![Event::Pong(Bytes::from_static(b"n"))]);
        assert!(outcome.out.is_empty());
    }

    #[test]
    fn fragmented_message_is_reassembled() {
        let mut stream = client_frame(false, 0x2, b"frag");
        stream.extend(client_frame(false, 0x0, b"ment"));
        stream.extend(client_frame(true, 0x0, b"ed"));
        let outcome = run_every_split(&stream);
        assert_eq!(
            outcome.events,
            vec![Event::Binary(Bytes::from_static(b"fragmented"))]
        );
    }

    #[test]
    fn ping_between_fragments_is_answered() {
        let mut stream = client_frame(false, 0x1, b"Hel");
        stream.extend(client_frame(true, 0x9, b"p"));
        stream.extend(client_frame(true, 0x0, b"lo"));
        let outcome = run_every_split(&stream);
        assert_eq!(
            outcome.events,
            vec![
                Event::Ping(Bytes::from_static(b"p")),
                Event::Text(Bytes::from_static(b"Hello"))
            ]
        );
        assert_eq!(outcome.out, vec![0x8A, 1, b'p']);
    }

    #[test]
    fn continuation_without_started_message_is_protocol_error_1002() {
        let outcome = run(&client_frame(true, 0x0, b"orphan"));
        assert_eq!(outcome.error, Some(WsError::UnexpectedContinuation));
        assert_failed_with(&outcome, 1002);
    }

    #[test]
    fn new_data_frame_during_fragmented_message_is_protocol_error_1002() {
        let mut stream = client_frame(false, 0x1, b"start");
        stream.extend(text("intruder"));
        let outcome = run(&stream);
        assert_eq!(outcome.error, Some(WsError::ExpectedContinuation));
        assert_failed_with(&outcome, 1002);
    }

    #[test]
    fn invalid_utf8_text_closes_1007() {
        let outcome = run(&client_frame(true, 0x1, &[b'a', 0xFF, b'b']));
        assert_eq!(outcome.error, Some(WsError::InvalidUtf8));
        assert_failed_with(&outcome, 1007);
    }

    #[test]
    fn utf8_character_split_across_fragments_is_accepted() {
        let bytes = "κόσμε".as_bytes();
        let mut stream = client_frame(false, 0x1, &bytes[..3]);
        stream.extend(client_frame(true, 0x0, &bytes[3..]));
        let outcome = run_every_split(&stream);
        assert_eq!(
            outcome.events,
            vec![Event::Text(Bytes::copy_from_slice(bytes))]
        );
    }

    #[test]
    fn invalid_utf8_split_across_fragments_closes_1007() {
        // 0xED 0xA0 0x80 would be a UTF-16 surrogate: invalid as soon as 0xA0 follows 0xED.
        let mut stream = client_frame(false, 0x1, &[b'x', 0xED]);
        stream.extend(client_frame(false, 0x0, &[0xA0, 0x80]));
        let outcome = run_every_split(&stream);
        assert_eq!(outcome.error, Some(WsError::InvalidUtf8));
        assert_failed_with(&outcome, 1007);
    }

    #[test]
    fn invalid_utf8_fails_fast_before_the_final_fragment() {
        let stream = client_frame(false, 0x1, &[0xC0, 0xAF]);
        let outcome = run(&stream);
        assert_eq!(outcome.error, Some(WsError::InvalidUtf8));
        assert_failed_with(&outcome, 1007);
    }

    #[test]
    fn oversized_length_rejected_before_payload_arrives() {
        let max = DEFAULT_MAX_MESSAGE_BYTES;
        let frame = binary(&vec![0; max + 1]);
        let header_only = &frame[..14];
        let mut input = BytesMut::from(header_only);
        let mut out = BytesMut::new();
        let mut conn = WsConn::new(WsConfig::default());
        let error = conn.decode(&mut input, &mut out).unwrap_err();
        assert_eq!(
            error,
            WsError::MessageTooLarge {
                size: max as u64 + 1,
                max
            }
        );
        assert_eq!(error.close_code(), 1009);
        assert_eq!(server_close(&out).0, Some(1009));
        assert!(conn.is_closed());
        assert!(input.capacity() < max, "the payload was never buffered");
    }

    #[test]
    fn message_of_exactly_the_limit_is_accepted() {
        let mut conn = WsConn::new(WsConfig {
            max_message_bytes: 300,
        });
        let outcome = run_with(&mut conn, &binary(&[7; 300]), 64);
        assert_eq!(
            outcome.events,
            vec![Event::Binary(Bytes::from(vec![7; 300]))]
        );
    }

    #[test]
    fn fragmented_message_over_the_limit_is_rejected_at_the_crossing_fragment() {
        let mut conn = WsConn::new(WsConfig {
            max_message_bytes: 10,
        });
        let mut stream = client_frame(false, 0x2, &[0; 6]);
        stream.extend(client_frame(false, 0x0, &[0; 4]));
        stream.extend(&client_frame(true, 0x0, &[0; 1])[..6]); // the header, not the payload
        let outcome = run_with(&mut conn, &stream, 1);
        assert_eq!(
            outcome.error,
            Some(WsError::MessageTooLarge { size: 11, max: 10 })
        );
        assert_failed_with(&outcome, 1009);
    }

    #[test]
    fn client_close_is_echoed_with_its_code_and_ends_the_connection() {
        let outcome = run_every_split(&close_frame(1001, b"leaving"));
        assert_eq!(
            outcome.events,
            vec![Event::Close {
                code: Some(1001),
                reason: "leaving".to_owned()
            }]
        );
        assert_eq!(server_close(&outcome.out), (Some(1001), String::new()));
        assert_eq!(outcome.state, ConnState::Closed);
    }

    #[test]
    fn empty_client_close_is_answered_with_empty_close() {
        let outcome = run(&client_frame(true, 0x8, b""));
        assert_eq!(
            outcome.events,
            vec![Event::Close {
                code: None,
                reason: String::new()
            }]
        );
        assert_eq!(outcome.out, vec![0x88, 0]);
    }

    #[test]
    fn close_between_fragments_abandons_the_message() {
        let mut stream = client_frame(false, 0x2, b"half");
        stream.extend(close_frame(1000, b""));
        let outcome = run(&stream);
        assert_eq!(
            outcome.events,
            vec![Event::Close {
                code: Some(1000),
                reason: String::new()
            }]
        );
    }

    #[test]
    fn close_with_one_byte_payload_is_protocol_error_1002() {
        let outcome = run(&client_frame(true, 0x8, &[0x03]));
        assert_eq!(outcome.error, Some(WsError::CloseFrameTooShort));
        assert_failed_with(&outcome, 1002);
    }

    #[test]
    fn close_with_code_forbidden_on_the_wire_is_protocol_error_1002() {
        for code in [999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let outcome = run(&close_frame(code, b""));
            assert_eq!(outcome.error, Some(WsError::InvalidCloseCode(code)));
            assert_failed_with(&outcome, 1002);
        }
    }

    #[test]
    fn close_with_invalid_utf8_reason_closes_1007() {
        let outcome = run(&close_frame(1000, &[0xCE, 0xBA, 0xFF]));
        assert_eq!(outcome.error, Some(WsError::InvalidCloseReason));
        assert_failed_with(&outcome, 1007);
    }

    #[test]
    fn nothing_is_read_after_the_close_handshake() {
        let mut stream = close_frame(1000, b"");
        stream.extend(text("late"));
        let mut input = BytesMut::from(&stream[..]);
        let mut out = BytesMut::new();
        let mut conn = WsConn::new(WsConfig::default());
        assert!(matches!(
            conn.decode(&mut input, &mut out),
            Ok(Some(Event::Close { .. }))
        ));
        let written = out.len();
        assert_eq!(conn.decode(&mut input, &mut out), Ok(None));
        assert_eq!(
            input.len(),
            text("late").len(),
            "later bytes are left alone"
        );
        assert_eq!(out.len(), written);
    }

    #[test]
    fn nothing_is_read_after_a_protocol_error() {
        let mut conn = WsConn::new(WsConfig::default());
        let mut out = BytesMut::new();
        assert!(
            conn.decode(&mut BytesMut::from(&[0x82, 0x00][..]), &mut out)
                .is_err()
        );
        let written = out.len();
        assert_eq!(
            conn.decode(&mut BytesMut::from(&text("x")[..]), &mut out),
            Ok(None)
        );
        assert_eq!(out.len(), written, "a single close frame");
    }

    #[test]
    fn server_close_writes_one_close_and_waits_for_the_client() {
        let mut conn = WsConn::new(WsConfig::default());
        let mut out = BytesMut::new();
        conn.close(1001, "shutting down", &mut out).unwrap();
        assert_eq!(server_close(&out), (Some(1001), "shutting down".to_owned()));
        assert_eq!(conn.state(), ConnState::CloseSent);
        assert!(!conn.is_open());
        let written = out.len();
        conn.close(1000, "", &mut out).unwrap();
        assert_eq!(out.len(), written, "a second close writes nothing");
    }

    #[test]
    fn after_server_close_data_and_pings_are_ignored_until_client_close() {
        let mut conn = WsConn::new(WsConfig::default());
        let mut out = BytesMut::new();
        conn.close(1000, "", &mut out).unwrap();
        out.clear();
        let mut stream = text("ignored");
        stream.extend(client_frame(true, 0x9, b"ping"));
        stream.extend(client_frame(false, 0x2, b"frag"));
        stream.extend(client_frame(true, 0x0, b"ment"));
        stream.extend(close_frame(1000, b"ok"));
        let outcome = run_with(&mut conn, &stream, 3);
        assert_eq!(
            outcome.events,
            vec![Event::Close {
                code: Some(1000),
                reason: "ok".to_owned()
            }]
        );
        assert!(outcome.out.is_empty(), "no pong and no second close");
        assert_eq!(outcome.state, ConnState::Closed);
    }

    #[test]
    fn protocol_error_after_server_close_writes_no_second_close() {
        let mut conn = WsConn::new(WsConfig::default());
        let mut out = BytesMut::new();
        conn.close(1000, "", &mut out).unwrap();
        out.clear();
        let outcome = run_with(&mut conn, &[0x82, 0x00], 2);
        assert_eq!(outcome.error, Some(WsError::UnmaskedFrame));
        assert!(outcome.out.is_empty());
        assert_eq!(outcome.state, ConnState::Closed);
    }

    #[test]
    fn server_close_with_forbidden_code_is_refused_and_changes_nothing() {
        let mut conn = WsConn::new(WsConfig::default());
        let mut out = BytesMut::new();
        assert_eq!(
            conn.close(1005, "", &mut out),
            Err(EncodeError::InvalidCloseCode(1005))
        );
        assert!(out.is_empty());
        assert!(conn.is_open());
    }

    #[test]
    fn error_close_reason_fits_a_control_frame() {
        let long = "é".repeat(100);
        assert!(truncate_to_char_boundary(&long, MAX_CLOSE_REASON).len() <= MAX_CLOSE_REASON);
        assert_eq!(truncate_to_char_boundary(&long, 3), "é");
    }

    /// One client frame for the differential test: any first byte (biased towards the frames
    /// the fast path takes and their near misses), masked or not, its length in any of the
    /// three encodings (minimal or not), and a payload that is text or arbitrary bytes.
    fn any_frame() -> impl Strategy<Value = Vec<u8>> {
        let b0 = prop_oneof![
            4 => Just(0x82u8),
            4 => Just(0x81),
            1 => Just(0x02),
            1 => Just(0x01),
            1 => Just(0x80),
            1 => Just(0x88),
            1 => Just(0x89),
            1 => Just(0xC2),
            2 => any::<u8>(),
        ];
        let payload = prop_oneof![
            "\\PC{0,80}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..300),
            // Around the 7-bit / 16-bit boundary.
            proptest::collection::vec(any::<u8>(), 100..=130),
        ];
        (b0, proptest::bool::weighted(0.9), 0u8..3, payload).prop_map(
            |(b0, masked, encoding, payload)| {
                let len = payload.len();
                let mask_bit = if masked { 0x80 } else { 0 };
                let mut v = vec![b0];
                match encoding {
                    0 if len < 126 => v.push(mask_bit | len as u8),
                    0 | 1 => {
                        v.push(mask_bit | 126);
                        v.extend_from_slice(&(len as u16).to_be_bytes());
                    }
                    _ => {
                        v.push(mask_bit | 127);
                        v.extend_from_slice(&(len as u64).to_be_bytes());
                    }
                }
                if masked {
                    v.extend_from_slice(&KEY);
                    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
                } else {
                    v.extend_from_slice(&payload);
                }
                v
            },
        )
    }

    /// Feeds `stream` cut at `cuts` through `decode` (the fast path included) or through
    /// `decode_general` only; the bytes left unread are part of the outcome.
    fn drive(
        conn: &mut WsConn,
        stream: &[u8],
        cuts: &[usize],
        general_only: bool,
    ) -> (Outcome, Vec<u8>) {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        let mut error = None;
        let mut fed = 0;
        'feed: for cut in cuts {
            input.extend_from_slice(&stream[fed..cut]);
            fed = cut;
            loop {
                let result = if general_only {
                    conn.decode_general(&mut input, &mut out)
                } else {
                    conn.decode(&mut input, &mut out)
                };
                match result {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(e) => {
                        error = Some(e);
                        break 'feed;
                    }
                }
            }
        }
        let outcome = Outcome {
            events,
            error,
            out: out.to_vec(),
            state: conn.state(),
        };
        (outcome, input.to_vec())
    }

    proptest! {
        /// The fast path of `decode` is only a shortcut: on any stream, cut anywhere, with any
        /// limit and in any state, it reports exactly what the general decoder reports.
        #[test]
        fn fast_path_agrees_with_the_general_decoder(
            frames in proptest::collection::vec(any_frame(), 1..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            max_message_bytes in prop_oneof![Just(DEFAULT_MAX_MESSAGE_BYTES), 0usize..400],
            server_closed_first in proptest::bool::weighted(0.1),
        ) {
            let stream = frames.concat();
            let new_conn = || {
                let mut conn = WsConn::new(WsConfig { max_message_bytes });
                if server_closed_first {
                    conn.close(1000, "", &mut BytesMut::new()).unwrap();
                }
                conn
            };
            let fast = drive(&mut new_conn(), &stream, &cuts, false);
            let general = drive(&mut new_conn(), &stream, &cuts, true);
            prop_assert_eq!(fast, general);
        }
    }
}
