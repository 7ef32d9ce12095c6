//! The client side of WebSocket (RFC 6455), sans-IO: bytes in, messages and bytes out.
//!
//! loadgen speaks parley over WebSocket through [`WsClient`]. The driver owns the socket and
//! only moves bytes:
//!
//! 1. [`WsClient::write_handshake`] appends the HTTP/1.1 upgrade request to the outbound buffer.
//! 2. [`WsClient::read`] is called with the read buffer (and the outbound buffer) in a loop until
//!    it returns `Ok(None)`. It first consumes the server's `101 Switching Protocols` response
//!    (checked, including `Sec-WebSocket-Accept`), then frames, and returns one complete data
//!    message ([`WsMessage`]) per call. Bytes that follow the response in the same read are
//!    frames and are decoded by the same call.
//! 3. [`WsClient::write_binary`] (and the other writers) append masked frames to the outbound
//!    buffer.
//!
//! Automatic answers are written into the outbound buffer by [`WsClient::read`]: a masked pong
//! for every ping, the reply to the server's Close (once), and a Close carrying the status code
//! when the server breaks the protocol (1002, 1007 for invalid UTF-8, 1009 for a message over
//! the limit).
//!
//! # The fast path
//!
//! The common case is many small unfragmented binary frames back to back in one read. Server
//! frames are never masked, so such a message is split off the read buffer without copying
//! (`split_to(..).freeze()`): decoding a frame is a header parse and two pointer moves.
//!
//! # Strictness
//!
//! The server is the system under test, so the decoder enforces the receiver rules of RFC 6455
//! and fails on the first broken one: a masked server frame, reserved bits (no extension is ever
//! negotiated), a reserved opcode, a fragmented or over-long control frame, a non-minimal or
//! 64-bit-MSB length, a continuation with no message in progress (or a new message inside one),
//! a text message or close reason that is not UTF-8, a close code not allowed on the wire.
//!
//! # Masking
//!
//! Masking keys and the `Sec-WebSocket-Key` nonce come from a splitmix64 generator seeded by the
//! caller: deterministic and fast, not cryptographic. The masks protect intermediaries from
//! cache poisoning by scripts (RFC 6455 10.3), a threat loadgen does not have.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

/// The default limit on a (reassembled) message from the server: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The GUID appended to the key before hashing (RFC 6455 1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The largest HTTP response head (status line and headers) accepted during the handshake.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// The most headers accepted in the HTTP response.
const MAX_RESPONSE_HEADERS: usize = 64;

/// The largest payload of a control frame (close, ping, pong).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// The [`WsClientError::Protocol`] message of a text message that is not UTF-8 (Close 1007).
const INVALID_UTF8_TEXT: &str = "text message is not valid UTF-8";

/// The [`WsClientError::Protocol`] message of a close reason that is not UTF-8 (Close 1007).
const INVALID_UTF8_REASON: &str = "close reason is not valid UTF-8";

/// Frame opcodes (RFC 6455 5.2).
mod opcode {
    pub(super) const CONTINUATION: u8 = 0x0;
    pub(super) const TEXT: u8 = 0x1;
    pub(super) const BINARY: u8 = 0x2;
    pub(super) const CLOSE: u8 = 0x8;
    pub(super) const PING: u8 = 0x9;
    pub(super) const PONG: u8 = 0xA;
}

/// Close status codes this module sends or reports (RFC 6455 7.4.1).
mod close_code {
    /// 1002: the peer broke the protocol.
    pub(super) const PROTOCOL_ERROR: u16 = 1002;
    /// 1005: reported when the server's Close carries no status code; never on the wire.
    pub(super) const NO_STATUS: u16 = 1005;
    /// 1007: a text message or close reason was not UTF-8.
    pub(super) const INVALID_PAYLOAD: u16 = 1007;
    /// 1009: a message over the limit.
    pub(super) const MESSAGE_TOO_BIG: u16 = 1009;

    /// Whether `code` may appear in a Close frame on the wire: 1000-1003, 1007-1014 and
    /// 3000-4999.
    pub(super) const fn is_allowed_on_wire(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// A complete data message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// A binary message (opcode 0x2 and its continuations).
    Binary(Bytes),
    /// A text message (opcode 0x1 and its continuations); the payload is valid UTF-8.
    Text(Bytes),
}

impl WsMessage {
    /// The payload, whatever the message type.
    pub fn payload(&self) -> &Bytes {
        match self {
            WsMessage::Binary(payload) | WsMessage::Text(payload) => payload,
        }
    }
}

/// Why [`WsClient::read`] stopped. After any error the connection is over: every later call to
/// [`WsClient::read`] returns the same error and consumes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsClientError {
    /// The server's answer to the upgrade request was not an acceptable `101 Switching
    /// Protocols` (status, `Upgrade`, `Connection`, `Sec-WebSocket-Accept`, an extension or
    /// subprotocol that was not offered, or a malformed or oversized response).
    #[error("bad WebSocket handshake response: {0}")]
    BadHandshake(String),
    /// The server broke a framing rule of RFC 6455; a Close (1002, or 1007 for invalid UTF-8)
    /// was written to the outbound buffer.
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    /// A message would exceed [`WsClient::set_max_message_bytes`]; detected from the frame
    /// header, before the payload is buffered. A Close 1009 was written.
    #[error("message of at least {size} bytes exceeds the limit of {max}")]
    TooBig {
        /// The size announced so far (earlier fragments plus this frame), saturated.
        size: u64,
        /// The configured limit.
        max: usize,
    },
    /// The server closed the connection with a Close frame; the reply was written (unless the
    /// client had already sent its own Close). `code` is 1005 when the frame carried none.
    #[error("closed by the server: {code} {reason:?}")]
    Closed {
        /// The status code of the server's Close (1005 if it had none).
        code: u16,
        /// The reason of the server's Close (empty if none).
        reason: String,
    },
}

impl WsClientError {
    /// The status code of the Close the client sends when it fails the connection for this
    /// error, or `None` if it sends none.
    fn close_code(&self) -> Option<u16> {
        match self {
            WsClientError::BadHandshake(_) | WsClientError::Closed { .. } => None,
            WsClientError::Protocol(why)
                if why == INVALID_UTF8_TEXT || why == INVALID_UTF8_REASON =>
            {
                Some(close_code::INVALID_PAYLOAD)
            }
            WsClientError::Protocol(_) => Some(close_code::PROTOCOL_ERROR),
            WsClientError::TooBig { .. } => Some(close_code::MESSAGE_TOO_BIG),
        }
    }
}

/// Where a [`WsClient`] is in its life.
#[derive(Debug)]
enum State {
    /// The upgrade request is (to be) sent; the 101 has not arrived yet.
    Handshake,
    /// The 101 was accepted; frames flow.
    Open,
    /// The server's Close arrived (terminal).
    Closed {
        /// Its status code (1005 if none).
        code: u16,
        /// Its reason.
        reason: String,
    },
    /// The handshake was refused or the server broke the protocol (terminal).
    Failed(WsClientError),
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Partial {
    /// Whether the first frame was text (else binary).
    text: bool,
    /// The payload of the fragments so far.
    data: BytesMut,
}

/// A decoded server frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    /// FIN: the final fragment of its message.
    fin: bool,
    /// The opcode (one of [`opcode`]).
    opcode: u8,
    /// The payload length.
    payload_len: u64,
    /// The header length in bytes (2, 4 or 10: server frames carry no masking key).
    len: usize,
}

/// The client side of one WebSocket connection, sans-IO.
///
/// ### Invariants
/// * `close_sent` is set once a Close has been written; nothing is written afterwards.
/// * `partial` is `Some` only between the first and the final frame of a fragmented message, and
///   its length never exceeds `max_message_bytes`.
#[derive(Debug)]
pub struct WsClient {
    /// The complete upgrade request, built once by [`WsClient::new`].
    request: Vec<u8>,
    /// The `Sec-WebSocket-Accept` value the server must send.
    expected_accept: String,
    /// Whether the caller offered a subprotocol (an extra `Sec-WebSocket-Protocol` header).
    offered_protocol: bool,
    /// The splitmix64 state for masking keys.
    rng: u64,
    /// Where the connection is.
    state: State,
    /// Whether the 101 has been accepted (stays true after a close).
    accepted: bool,
    /// Whether a Close has been written.
    close_sent: bool,
    /// The limit on a (reassembled) message.
    max_message_bytes: usize,
    /// The fragmented message in progress.
    partial: Option<Partial>,
}

impl WsClient {
    /// A client that will request `path` (the request target, e.g. `"/"` or `"/?token=..."`)
    /// from `host` (the `Host` header), with `extra_headers` appended to the upgrade request
    /// (e.g. `Authorization`, `Sec-WebSocket-Protocol`). CR and LF bytes in any of them are
    /// dropped, so a caller cannot break the request's framing.
    ///
    /// `key_seed` seeds the generator of the 16-byte `Sec-WebSocket-Key` nonce and of the
    /// masking keys: two clients with different seeds use different keys.
    pub fn new(host: &str, path: &str, extra_headers: &[(&str, &str)], key_seed: u64) -> Self {
        let mut rng = key_seed;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&splitmix64(&mut rng).to_le_bytes());
        nonce[8..].copy_from_slice(&splitmix64(&mut rng).to_le_bytes());
        let key = BASE64.encode(nonce);
        let expected_accept = accept_for(&key);

        let mut request = Vec::with_capacity(160 + host.len() + path.len());
        request.extend_from_slice(b"GET ");
        put_field(&mut request, path);
        request.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        put_field(&mut request, host);
        request.extend_from_slice(
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ",
        );
        request.extend_from_slice(key.as_bytes());
        request.extend_from_slice(b"\r\nSec-WebSocket-Version: 13\r\n");
        for (name, value) in extra_headers {
            put_field(&mut request, name);
            request.extend_from_slice(b": ");
            put_field(&mut request, value);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");

        let offered_protocol = extra_headers
            .iter()
            .any(|(name, _)| name.trim().eq_ignore_ascii_case("Sec-WebSocket-Protocol"));
        WsClient {
            request,
            expected_accept,
            offered_protocol,
            rng,
            state: State::Handshake,
            accepted: false,
            close_sent: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            partial: None,
        }
    }

    /// Appends the HTTP/1.1 upgrade request to `out`. parley's server reads bytes that follow
    /// the request as frames, so frames may be written before the 101 arrives; other servers
    /// (tungstenite, for one) refuse such "junk after the request": wait for
    /// [`WsClient::is_open`] when talking to them.
    pub fn write_handshake(&self, out: &mut BytesMut) {
        out.extend_from_slice(&self.request);
    }

    /// Whether the server's 101 response has been accepted. It stays true after the
    /// connection is closed.
    pub fn is_open(&self) -> bool {
        self.accepted
    }

    /// Whether the connection is over: the server's Close arrived, the handshake was refused,
    /// or the server broke the protocol. Flush the outbound buffer and close the socket.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. } | State::Failed(_))
    }

    /// Sets the limit on a (reassembled) message from the server; a larger one fails the
    /// connection with [`WsClientError::TooBig`] as soon as its frame header arrives. The
    /// default is [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub fn set_max_message_bytes(&mut self, n: usize) {
        self.max_message_bytes = n;
    }

    /// Consumes bytes from the front of `input`: first the server's HTTP response to the
    /// upgrade request, then frames. Returns the next complete data message, or `Ok(None)`
    /// when `input` holds no complete message yet (call again after the next socket read).
    /// Call it in a loop until `Ok(None)`: one read often carries many messages.
    ///
    /// Bytes that are consumed never come back; a partial frame stays in `input`. When a frame
    /// header is complete but its payload is not, `input` is grown to hold the whole frame.
    ///
    /// The response must be `101` with `Upgrade: websocket`, `Connection: upgrade` and the
    /// right `Sec-WebSocket-Accept`, and must not select an extension (none is offered) or a
    /// subprotocol the caller did not offer.
    ///
    /// A ping is answered with a masked pong (written to `out`) and a pong is ignored; both
    /// may arrive between the fragments of a message, which is reassembled. An unfragmented
    /// message is split from `input` without copying.
    ///
    /// # Errors
    /// * [`WsClientError::BadHandshake`]: the response is not an acceptable 101.
    /// * [`WsClientError::Protocol`] or [`WsClientError::TooBig`]: the server broke a rule; a
    ///   Close with the matching code is written to `out` (unless one was already sent).
    /// * [`WsClientError::Closed`]: the server's Close arrived; the reply (echoing its code)
    ///   is written to `out` once, unless the client had already sent its own Close.
    ///
    /// Every later call returns the same error.
    pub fn read(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Option<WsMessage>, WsClientError> {
        match &self.state {
            State::Handshake => match self.read_response(input) {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) => return Err(self.fail(e, out)),
            },
            State::Open => {}
            State::Closed { code, reason } => {
                return Err(WsClientError::Closed {
                    code: *code,
                    reason: reason.clone(),
                });
            }
            State::Failed(e) => return Err(e.clone()),
        }
        match self.read_frames(input, out) {
            Ok(message) => Ok(message),
            Err(e @ WsClientError::Closed { .. }) => Err(e),
            Err(e) => Err(self.fail(e, out)),
        }
    }

    /// Appends one masked binary frame (FIN set) carrying `payload` to `out`. Nothing is
    /// written once a Close has been sent.
    pub fn write_binary(&mut self, payload: &[u8], out: &mut BytesMut) {
        if !self.close_sent {
            self.write_frame(opcode::BINARY, payload, out);
        }
    }

    /// Appends one masked text frame (FIN set) carrying `payload` to `out`; the caller makes
    /// sure it is UTF-8. Nothing is written once a Close has been sent.
    pub fn write_text(&mut self, payload: &[u8], out: &mut BytesMut) {
        if !self.close_sent {
            self.write_frame(opcode::TEXT, payload, out);
        }
    }

    /// Appends one masked ping carrying `payload` (its first 125 bytes: a control frame holds
    /// no more) to `out`. Nothing is written once a Close has been sent.
    pub fn write_ping(&mut self, payload: &[u8], out: &mut BytesMut) {
        if !self.close_sent {
            let payload = payload.get(..MAX_CONTROL_PAYLOAD).unwrap_or(payload);
            self.write_frame(opcode::PING, payload, out);
        }
    }

    /// Starts the close handshake: appends one masked Close with `code` and `reason` (cut to
    /// 123 bytes at a character boundary) to `out`, then keep reading until
    /// [`WsClientError::Closed`] reports the server's answer. Code 1005 ("no status") is sent
    /// as a Close without a payload. Written at most once per connection: nothing happens if a
    /// Close was already sent (by this call or as an automatic reply).
    pub fn write_close(&mut self, code: u16, reason: &str, out: &mut BytesMut) {
        let code = (code != close_code::NO_STATUS).then_some(code);
        self.send_close(code, reason, out);
    }

    /// Parses the HTTP response at the front of `input`. `Ok(true)` once it was accepted (and
    /// consumed), `Ok(false)` if it is not complete yet.
    fn read_response(&mut self, input: &mut BytesMut) -> Result<bool, WsClientError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let consumed = match response.parse(input) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_BYTES => n,
            Ok(httparse::Status::Partial) if input.len() <= MAX_RESPONSE_BYTES => return Ok(false),
            Ok(_) => {
                return Err(WsClientError::BadHandshake(format!(
                    "response head longer than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            Err(e) => {
                return Err(WsClientError::BadHandshake(format!(
                    "malformed HTTP response: {e}"
                )));
            }
        };
        self.check_response(&response)?;
        input.advance(consumed);
        self.state = State::Open;
        self.accepted = true;
        Ok(true)
    }

    /// Checks a complete response against RFC 6455 4.1 (the client's requirements).
    fn check_response(&self, response: &httparse::Response<'_, '_>) -> Result<(), WsClientError> {
        let bad = |why: String| Err(WsClientError::BadHandshake(why));
        let code = response.code.unwrap_or(0);
        if code != 101 {
            let reason = response.reason.unwrap_or("");
            return bad(format!("status {code} {reason}, expected 101"));
        }
        let headers = &*response.headers;
        if !header_tokens(headers, "Upgrade").any(|t| t.eq_ignore_ascii_case(b"websocket")) {
            return bad("no `Upgrade: websocket` header".to_owned());
        }
        if !header_tokens(headers, "Connection").any(|t| t.eq_ignore_ascii_case(b"upgrade")) {
            return bad("no `Connection: upgrade` header".to_owned());
        }
        let mut accepts = header_values(headers, "Sec-WebSocket-Accept");
        match (accepts.next(), accepts.next()) {
            (Some(value), None) if value.trim_ascii() == self.expected_accept.as_bytes() => {}
            (Some(value), None) => {
                return bad(format!(
                    "Sec-WebSocket-Accept is {:?}, expected {:?}",
                    String::from_utf8_lossy(value.trim_ascii()),
                    self.expected_accept
                ));
            }
            (None, _) => return bad("no Sec-WebSocket-Accept header".to_owned()),
            (Some(_), Some(_)) => return bad("repeated Sec-WebSocket-Accept header".to_owned()),
        }
        if header_tokens(headers, "Sec-WebSocket-Extensions")
            .next()
            .is_some()
        {
            return bad("the server selected an extension that was not offered".to_owned());
        }
        if !self.offered_protocol
            && header_tokens(headers, "Sec-WebSocket-Protocol")
                .next()
                .is_some()
        {
            return bad("the server selected a subprotocol that was not offered".to_owned());
        }
        Ok(())
    }

    /// Decodes frames from `input` until a data message is complete or more bytes are needed.
    fn read_frames(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Option<WsMessage>, WsClientError> {
        loop {
            let Some(header) = decode_header(input)? else {
                return Ok(None);
            };
            let is_data = header.opcode & 0x08 == 0;
            if is_data {
                match (header.opcode, &self.partial) {
                    (opcode::CONTINUATION, None) => {
                        return Err(protocol("continuation frame without a message in progress"));
                    }
                    (opcode::TEXT | opcode::BINARY, Some(_)) => {
                        return Err(protocol(
                            "new data frame while a fragmented message is in progress",
                        ));
                    }
                    _ => {}
                }
                let so_far = self.partial.as_ref().map_or(0, |p| p.data.len());
                let size = (so_far as u64).saturating_add(header.payload_len);
                if size > self.max_message_bytes as u64 {
                    return Err(WsClientError::TooBig {
                        size,
                        max: self.max_message_bytes,
                    });
                }
            }
            // Bounded by the limit above (data) or by 125 (control, checked in decode_header).
            let too_big = || WsClientError::TooBig {
                size: header.payload_len,
                max: self.max_message_bytes,
            };
            let len = usize::try_from(header.payload_len).map_err(|_| too_big())?;
            let frame_len = header.len.checked_add(len).ok_or_else(too_big)?;
            if input.len() < frame_len {
                input.reserve(frame_len - input.len());
                return Ok(None);
            }
            input.advance(header.len);
            match header.opcode {
                opcode::TEXT | opcode::BINARY if header.fin => {
                    let payload = input.split_to(len).freeze();
                    return message(header.opcode == opcode::TEXT, payload).map(Some);
                }
                opcode::TEXT | opcode::BINARY => {
                    let mut data = BytesMut::with_capacity(len);
                    data.extend_from_slice(&input[..len]);
                    input.advance(len);
                    self.partial = Some(Partial {
                        text: header.opcode == opcode::TEXT,
                        data,
                    });
                }
                opcode::CONTINUATION => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(protocol("continuation frame without a message in progress"));
                    };
                    partial.data.extend_from_slice(&input[..len]);
                    input.advance(len);
                    if header.fin
                        && let Some(Partial { text, data }) = self.partial.take()
                    {
                        return message(text, data.freeze()).map(Some);
                    }
                }
                opcode::PING => {
                    if !self.close_sent {
                        self.write_frame(opcode::PONG, &input[..len], out);
                    }
                    input.advance(len);
                }
                opcode::PONG => input.advance(len),
                _ => {
                    // opcode::CLOSE: decode_header lets no other opcode through.
                    let (code, reason) = parse_close(&input[..len])?;
                    input.advance(len);
                    let echoed = (code != close_code::NO_STATUS).then_some(code);
                    self.send_close(echoed, "", out);
                    self.state = State::Closed {
                        code,
                        reason: reason.clone(),
                    };
                    return Err(WsClientError::Closed { code, reason });
                }
            }
        }
    }

    /// Fails the connection for `error`: writes a Close with its code (if it has one, the
    /// connection is open and no Close was sent yet), enters `Failed` and hands the error back.
    fn fail(&mut self, error: WsClientError, out: &mut BytesMut) -> WsClientError {
        if let (Some(code), State::Open) = (error.close_code(), &self.state) {
            self.send_close(Some(code), "", out);
        }
        self.partial = None;
        self.state = State::Failed(error.clone());
        error
    }

    /// Writes a Close with `code` (none: an empty payload) and `reason`, unless one was sent.
    fn send_close(&mut self, code: Option<u16>, reason: &str, out: &mut BytesMut) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
        let len = match code {
            None => 0,
            Some(code) => {
                payload[..2].copy_from_slice(&code.to_be_bytes());
                let reason = truncate_to_char_boundary(reason, MAX_CONTROL_PAYLOAD - 2);
                payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
                2 + reason.len()
            }
        };
        self.write_frame(opcode::CLOSE, &payload[..len], out);
    }

    /// Appends one masked frame with FIN set: header, key and masked payload in one pass.
    fn write_frame(&mut self, opcode: u8, payload: &[u8], out: &mut BytesMut) {
        let key = self.next_mask();
        let len = payload.len();
        let len_bytes = if len < 126 {
            0
        } else if len <= usize::from(u16::MAX) {
            2
        } else {
            8
        };
        out.reserve(2 + len_bytes + 4 + len);
        out.put_u8(0x80 | opcode);
        match len_bytes {
            0 => out.put_u8(0x80 | len as u8),
            2 => {
                out.put_u8(0x80 | 126);
                out.put_u16(len as u16);
            }
            _ => {
                out.put_u8(0x80 | 127);
                out.put_u64(len as u64);
            }
        }
        out.put_slice(&key);
        put_masked(out, payload, key);
    }

    /// The next masking key.
    fn next_mask(&mut self) -> [u8; 4] {
        ((splitmix64(&mut self.rng) >> 32) as u32).to_be_bytes()
    }
}

/// Decodes a server frame header from the start of `buf`: `Ok(None)` if it is not complete.
/// Each rule is checked as soon as the bytes that could break it are present.
fn decode_header(buf: &[u8]) -> Result<Option<Header>, WsClientError> {
    let &[b0, b1, ..] = buf else {
        return Ok(None);
    };
    let rsv = b0 & 0x70;
    if rsv != 0 {
        return Err(WsClientError::Protocol(format!(
            "reserved bits set without a negotiated extension: {:#05b}",
            rsv >> 4
        )));
    }
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        opcode::CONTINUATION
            | opcode::TEXT
            | opcode::BINARY
            | opcode::CLOSE
            | opcode::PING
            | opcode::PONG
    ) {
        return Err(WsClientError::Protocol(format!(
            "reserved opcode {opcode:#x}"
        )));
    }
    let fin = b0 & 0x80 != 0;
    let control = opcode & 0x08 != 0;
    if control && !fin {
        return Err(protocol("fragmented control frame"));
    }
    if b1 & 0x80 != 0 {
        return Err(protocol("masked server frame"));
    }
    let len7 = b1 & 0x7F;
    if control && usize::from(len7) > MAX_CONTROL_PAYLOAD {
        return Err(protocol("control frame payload over 125 bytes"));
    }
    let (payload_len, len) = match len7 {
        126 => {
            let Some(&[hi, lo]) = buf.get(2..4).and_then(|s| <&[u8; 2]>::try_from(s).ok()) else {
                return Ok(None);
            };
            let n = u16::from_be_bytes([hi, lo]);
            if n < 126 {
                return Err(WsClientError::Protocol(format!(
                    "payload length {n} not minimally encoded"
                )));
            }
            (u64::from(n), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) else {
                return Ok(None);
            };
            let n = u64::from_be_bytes(bytes);
            if n >> 63 != 0 {
                return Err(protocol(
                    "64-bit payload length with the most significant bit set",
                ));
            }
            if n <= u64::from(u16::MAX) {
                return Err(WsClientError::Protocol(format!(
                    "payload length {n} not minimally encoded"
                )));
            }
            (n, 10)
        }
        short => (u64::from(short), 2),
    };
    Ok(Some(Header {
        fin,
        opcode,
        payload_len,
        len,
    }))
}

/// A complete message; a text payload must be UTF-8.
fn message(text: bool, payload: Bytes) -> Result<WsMessage, WsClientError> {
    if !text {
        return Ok(WsMessage::Binary(payload));
    }
    if std::str::from_utf8(&payload).is_err() {
        return Err(protocol(INVALID_UTF8_TEXT));
    }
    Ok(WsMessage::Text(payload))
}

/// The status code and reason of a Close payload (1005 and "" for an empty one).
fn parse_close(payload: &[u8]) -> Result<(u16, String), WsClientError> {
    match payload {
        [] => Ok((close_code::NO_STATUS, String::new())),
        [_] => Err(protocol("close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code::is_allowed_on_wire(code) {
                return Err(WsClientError::Protocol(format!(
                    "close code {code} is not allowed on the wire"
                )));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| protocol(INVALID_UTF8_REASON))?;
            Ok((code, reason.to_owned()))
        }
    }
}

/// A [`WsClientError::Protocol`] with a fixed message.
fn protocol(why: &str) -> WsClientError {
    WsClientError::Protocol(why.to_owned())
}

/// Appends `payload` XORed with the repeated 4-byte `key`: 64-byte blocks through a stack
/// buffer (eight u64 XORs the compiler vectorises), then 8-byte words, then a byte tail.
/// Every block and word starts at a multiple of 4, so the key is always in phase.
fn put_masked(out: &mut BytesMut, payload: &[u8], key: [u8; 4]) {
    let [k0, k1, k2, k3] = key;
    let key8 = u64::from_ne_bytes([k0, k1, k2, k3, k0, k1, k2, k3]);
    let (blocks, rest) = payload.as_chunks::<64>();
    for block in blocks {
        let mut masked = [0u8; 64];
        let (dst, _) = masked.as_chunks_mut::<8>();
        let (src, _) = block.as_chunks::<8>();
        for (d, s) in dst.iter_mut().zip(src) {
            *d = (u64::from_ne_bytes(*s) ^ key8).to_ne_bytes();
        }
        out.put_slice(&masked);
    }
    let (words, tail) = rest.as_chunks::<8>();
    for word in words {
        out.put_slice(&(u64::from_ne_bytes(*word) ^ key8).to_ne_bytes());
    }
    for (byte, k) in tail.iter().zip(key.iter().cycle()) {
        out.put_u8(byte ^ k);
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)) (RFC 6455 4.2.2).
fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

/// splitmix64 (Steele, Lea, Flood 2014): one step of the generator.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Appends `s` without its CR and LF bytes.
fn put_field(out: &mut Vec<u8>, s: &str) {
    out.extend(s.bytes().filter(|b| !matches!(b, b'\r' | b'\n')));
}

/// The values of every header called `name` (case-insensitive).
fn header_values<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The non-empty comma-separated tokens of every header called `name`, trimmed.
fn header_tokens<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> {
    header_values(headers, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_to_char_boundary(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use bytes::{Bytes, BytesMut};
    use proptest::prelude::*;
    use sha1::{Digest as _, Sha1};

    use super::{WsClient, WsClientError, WsMessage};

    // ---- independent helpers: a server's view of the wire ----

    /// The `Sec-WebSocket-Key` of the client's request, parsed as a server would.
    fn request_key(client: &WsClient) -> String {
        let mut out = BytesMut::new();
        client.write_handshake(&mut out);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let status = request.parse(&out).expect("request parses");
        assert!(status.is_complete());
        let key = request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Key"))
            .expect("a key header")
            .value;
        String::from_utf8(key.to_vec()).expect("ASCII key")
    }

    /// The accept value a server computes for `key`.
    fn server_accept(key: &str) -> String {
        let mut sha = Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        B64.encode(sha.finalize())
    }

    /// A 101 response with the given accept value and extra header lines.
    fn response_with(accept: &str, extra: &str) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
        )
    }

    /// The correct 101 for `client`.
    fn accept_response(client: &WsClient) -> String {
        response_with(&server_accept(&request_key(client)), "")
    }

    /// A client whose handshake completed, and an empty outbound buffer.
    fn open_client() -> WsClient {
        let mut client = WsClient::new("localhost", "/", &[], 42);
        let mut input = BytesMut::from(accept_response(&client).as_bytes());
        let mut out = BytesMut::new();
        assert_eq!(client.read(&mut input, &mut out), Ok(None));
        assert!(client.is_open());
        assert!(input.is_empty());
        client
    }

    /// An unmasked server frame; `b0` is the whole first byte (FIN, RSV, opcode).
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![b0];
        match payload.len() {
            n if n < 126 => v.push(n as u8),
            n if n <= 0xFFFF => {
                v.push(126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(payload);
        v
    }

    fn binary(payload: &[u8]) -> Vec<u8> {
        frame(0x82, payload)
    }

    fn close(code: u16, reason: &str) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        frame(0x88, &payload)
    }

    /// One frame the client wrote, unmasked independently of the client's code.
    #[derive(Debug, PartialEq)]
    struct ClientFrame {
        fin: bool,
        opcode: u8,
        /// The 7-bit length field (to check which length form was used).
        len7: u8,
        payload: Vec<u8>,
    }

    /// Every frame in `bytes` (which must hold whole frames only).
    fn client_frames(mut bytes: &[u8]) -> Vec<ClientFrame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (b0, b1) = (bytes[0], bytes[1]);
            assert_eq!(b0 & 0x70, 0, "no reserved bits");
            assert_ne!(b1 & 0x80, 0, "client frames are masked");
            let len7 = b1 & 0x7F;
            let (len, mut at) = match len7 {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => {
                    let mut be = [0u8; 8];
                    be.copy_from_slice(&bytes[2..10]);
                    (u64::from_be_bytes(be) as usize, 10)
                }
                n => (n as usize, 2),
            };
            let key = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
            at += 4;
            let payload = bytes[at..at + len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            frames.push(ClientFrame {
                fin: b0 & 0x80 != 0,
                opcode: b0 & 0x0F,
                len7,
                payload,
            });
            bytes = &bytes[at + len..];
        }
        frames
    }

    /// Everything a client reports for a byte stream: messages, the error that ended it, and
    /// the bytes it wrote.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        messages: Vec<WsMessage>,
        error: Option<WsClientError>,
        out: Vec<u8>,
    }

    /// Calls `read` until `Ok(None)` or an error, collecting into `outcome`.
    fn drain(client: &mut WsClient, input: &mut BytesMut, out: &mut BytesMut, o: &mut Outcome) {
        if o.error.is_some() {
            return;
        }
        loop {
            match client.read(input, out) {
                Ok(Some(m)) => o.messages.push(m),
                Ok(None) => return,
                Err(e) => {
                    o.error = Some(e);
                    return;
                }
            }
        }
    }

    /// Feeds `stream` to a fresh client in the given pieces.
    fn run_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
        let mut client = WsClient::new("localhost", "/", &[], 42);
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut o = Outcome {
            messages: Vec::new(),
            error: None,
            out: Vec::new(),
        };
        for piece in pieces {
            input.extend_from_slice(piece);
            drain(&mut client, &mut input, &mut out, &mut o);
        }
        o.out = out.to_vec();
        o
    }

    /// The handshake response of the seed-42 client used by `run_pieces`.
    fn seed42_response() -> Vec<u8> {
        accept_response(&WsClient::new("localhost", "/", &[], 42)).into_bytes()
    }

    /// Feeds `bytes` to `client` after the handshake and returns the single error.
    fn error_for(bytes: &[u8]) -> (WsClientError, Vec<ClientFrame>) {
        let mut client = open_client();
        let mut input = BytesMut::from(bytes);
        let mut out = BytesMut::new();
        let error = client.read(&mut input, &mut out).expect_err("an error");
        assert_eq!(client.read(&mut input, &mut out), Err(error.clone()));
        assert!(client.is_closed());
        (error, client_frames(&out))
    }

    /// The (code, reason) of a Close frame's payload.
    fn close_payload(frame: &ClientFrame) -> (u16, Vec<u8>) {
        assert_eq!((frame.fin, frame.opcode), (true, 0x8));
        let code = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
        (code, frame.payload[2..].to_vec())
    }

    fn assert_protocol_error_closes_1002(bytes: &[u8]) {
        let (error, written) = error_for(bytes);
        assert!(matches!(error, WsClientError::Protocol(_)), "{error:?}");
        assert_eq!(written.len(), 1);
        assert_eq!(close_payload(&written[0]).0, 1002);
    }

    // ---- handshake ----

    #[test]
    fn handshake_request_is_a_valid_upgrade_request() {
        let client = WsClient::new(
            "example.org:8080",
            "/ws?token=abc",
            &[
                ("Authorization", "Bearer t"),
                ("X-Evil", "a\r\nInjected: 1"),
            ],
            7,
        );
        let mut out = BytesMut::new();
        client.write_handshake(&mut out);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let status = request.parse(&out).expect("request parses");
        assert_eq!(status, httparse::Status::Complete(out.len()));
        assert_eq!(request.method, Some("GET"));
        assert_eq!(request.path, Some("/ws?token=abc"));
        assert_eq!(request.version, Some(1));
        let header = |name: &str| {
            let values: Vec<&[u8]> = request
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
                .collect();
            assert_eq!(values.len(), 1, "exactly one {name}");
            std::str::from_utf8(values[0]).expect("text").to_owned()
        };
        assert_eq!(header("Host"), "example.org:8080");
        assert!(header("Upgrade").eq_ignore_ascii_case("websocket"));
        assert!(header("Connection").eq_ignore_ascii_case("upgrade"));
        assert_eq!(header("Sec-WebSocket-Version"), "13");
        assert_eq!(header("Authorization"), "Bearer t");
        assert_eq!(header("X-Evil"), "aInjected: 1", "CR/LF dropped");
        let key = B64.decode(header("Sec-WebSocket-Key")).expect("base64 key");
        assert_eq!(key.len(), 16);
    }

    #[test]
    fn different_seeds_give_different_keys() {
        let a = request_key(&WsClient::new("h", "/", &[], 1));
        let b = request_key(&WsClient::new("h", "/", &[], 2));
        assert_ne!(a, b);
    }

    #[test]
    fn rfc_example_key_gets_rfc_example_accept() {
        assert_eq!(
            super::accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn correct_101_is_accepted() {
        let client = open_client();
        assert!(client.is_open());
        assert!(!client.is_closed());
    }

    #[test]
    fn header_names_and_tokens_are_case_insensitive_lists() {
        let mut client = WsClient::new("h", "/", &[], 3);
        let accept = server_accept(&request_key(&client));
        let response = format!(
            "HTTP/1.1 101 OK\r\nupgrade: WebSocket\r\nconnection: keep-alive, UPGRADE\r\n\
             sec-websocket-accept:  {accept} \r\n\r\n"
        );
        let mut input = BytesMut::from(response.as_bytes());
        assert_eq!(client.read(&mut input, &mut BytesMut::new()), Ok(None));
        assert!(client.is_open());
    }

    fn refused(response: &str) -> WsClientError {
        let mut client = WsClient::new("localhost", "/", &[], 42);
        let mut input = BytesMut::from(response.as_bytes());
        let mut out = BytesMut::new();
        let error = client.read(&mut input, &mut out).expect_err("refused");
        assert!(!client.is_open());
        assert!(client.is_closed());
        assert!(out.is_empty(), "no frame before the handshake");
        assert!(matches!(error, WsClientError::BadHandshake(_)), "{error:?}");
        error
    }

    #[test]
    fn wrong_accept_value_is_refused() {
        refused(&response_with(
            &server_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "",
        ));
    }

    #[test]
    fn missing_accept_is_refused() {
        refused(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        );
    }

    #[test]
    fn missing_upgrade_is_refused() {
        let client = WsClient::new("localhost", "/", &[], 42);
        let accept = server_accept(&request_key(&client));
        refused(&format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ));
    }

    #[test]
    fn missing_connection_upgrade_is_refused() {
        let client = WsClient::new("localhost", "/", &[], 42);
        let accept = server_accept(&request_key(&client));
        refused(&format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: close\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ));
    }

    #[test]
    fn non_101_status_is_refused() {
        let error = refused("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
        assert!(error.to_string().contains("401"), "{error}");
    }

    #[test]
    fn unoffered_extension_is_refused() {
        let client = WsClient::new("localhost", "/", &[], 42);
        let accept = server_accept(&request_key(&client));
        refused(&response_with(
            &accept,
            "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        ));
    }

    #[test]
    fn malformed_or_oversized_response_is_refused() {
        refused("HTTP/1.1 1o1 Switching\r\n\r\n");
        refused(&format!("HTTP/1.1 101 OK\r\nX: {}", "a".repeat(20_000)));
    }

    #[test]
    fn partial_response_needs_more_bytes() {
        let mut client = WsClient::new("localhost", "/", &[], 42);
        let response = accept_response(&client);
        let mut input = BytesMut::from(&response.as_bytes()[..response.len() - 1]);
        let mut out = BytesMut::new();
        assert_eq!(client.read(&mut input, &mut out), Ok(None));
        assert!(!client.is_open());
        input.extend_from_slice(b"\n");
        assert_eq!(client.read(&mut input, &mut out), Ok(None));
        assert!(client.is_open());
    }

    #[test]
    fn frames_after_the_101_in_the_same_read_are_not_lost() {
        let mut stream = seed42_response();
        stream.extend(binary(b"first"));
        stream.extend(binary(b"second"));
        stream.extend(binary(&[0xAB; 3])[..4].iter()); // half a frame
        let o = run_pieces([stream.as_slice()]);
        assert_eq!(o.error, None);
        assert_eq!(
            o.messages,
            [
                WsMessage::Binary(Bytes::from_static(b"first")),
                WsMessage::Binary(Bytes::from_static(b"second")),
            ]
        );
    }

    // ---- frames ----

    /// A stream exercising every frame kind, with small frames only.
    fn small_stream() -> Vec<u8> {
        let mut s = seed42_response();
        s.extend(binary(b""));
        s.extend(binary(b"x"));
        s.extend(frame(0x81, "héllo".as_bytes()));
        s.extend(binary(&[7; 125]));
        s.extend(binary(&[9; 126])); // 16-bit length
        s.extend(frame(0x89, b"ping!"));
        s.extend(frame(0x8A, b"pong"));
        s.extend(frame(0x02, b"frag"));
        s.extend(frame(0x89, b"mid"));
        s.extend(frame(0x00, b"men"));
        s.extend(frame(0x80, b"ted"));
        s.extend(close(1001, "going away"));
        s
    }

    fn expected_small_messages() -> Vec<WsMessage> {
        vec![
            WsMessage::Binary(Bytes::new()),
            WsMessage::Binary(Bytes::from_static(b"x")),
            WsMessage::Text(Bytes::from("héllo")),
            WsMessage::Binary(Bytes::from(vec![7; 125])),
            WsMessage::Binary(Bytes::from(vec![9; 126])),
            WsMessage::Binary(Bytes::from_static(b"fragmented")),
        ]
    }

    #[test]
    fn small_stream_decodes_to_its_messages_pongs_and_close() {
        let o = run_pieces([small_stream().as_slice()]);
        assert_eq!(o.messages, expected_small_messages());
        assert_eq!(
            o.error,
            Some(WsClientError::Closed {
                code: 1001,
                reason: "going away".to_owned()
            })
        );
        let written = client_frames(&o.out);
        let kinds: Vec<(u8, &[u8])> = written
            .iter()
            .map(|f| (f.opcode, f.payload.as_slice()))
            .collect();
        assert_eq!(
            kinds,
            [
                (0xA, b"ping!".as_slice()),
                (0xA, b"mid".as_slice()),
                (0x8, [0x03, 0xE9].as_slice())
            ]
        );
    }

    #[test]
    fn frames_split_at_every_byte_boundary_decode_identically() {
        let stream = small_stream();
        let whole = run_pieces([stream.as_slice()]);
        for at in 0..=stream.len() {
            let (a, b) = stream.split_at(at);
            assert_eq!(run_pieces([a, b]), whole, "split at {at}");
        }
        assert_eq!(run_pieces(stream.chunks(1)), whole, "one byte at a time");
    }

    #[test]
    fn large_frames_fed_byte_by_byte_decode_identically() {
        let mut stream = seed42_response();
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        stream.extend(binary(&big)); // 64-bit length
        stream.extend(frame(0x02, &big[..40_000]));
        stream.extend(frame(0x80, &big[40_000..]));
        let whole = run_pieces([stream.as_slice()]);
        assert_eq!(
            whole.messages,
            [
                WsMessage::Binary(Bytes::from(big.clone())),
                WsMessage::Binary(Bytes::from(big))
            ]
        );
        assert_eq!(run_pieces(stream.chunks(1)), whole);
        assert_eq!(run_pieces(stream.chunks(1000)), whole);
    }

    #[test]
    fn many_small_frames_in_one_read_all_decode() {
        let mut client = open_client();
        let mut input = BytesMut::new();
        for i in 0..1000u32 {
            input.extend(binary(&i.to_be_bytes()));
        }
        let mut out = BytesMut::new();
        for i in 0..1000u32 {
            let m = client
                .read(&mut input, &mut out)
                .expect("ok")
                .expect("a message");
            assert_eq!(
                m,
                WsMessage::Binary(Bytes::copy_from_slice(&i.to_be_bytes()))
            );
        }
        assert_eq!(client.read(&mut input, &mut out), Ok(None));
        assert!(input.is_empty() && out.is_empty());
    }

    #[test]
    fn unfragmented_message_is_split_from_input_without_copy() {
        let mut client = open_client();
        let mut input = BytesMut::from(binary(b"zero copy please").as_slice());
        let range = input.as_ptr_range();
        let m = client
            .read(&mut input, &mut BytesMut::new())
            .expect("ok")
            .expect("a message");
        assert!(range.contains(&m.payload().as_ptr()));
        assert_eq!(m.payload().as_ref(), b"zero copy please");
    }

    #[test]
    fn masked_client_frames_unmask_to_the_payload() {
        let mut client = open_client();
        for (len, len7) in [
            (0, 0),
            (1, 1),
            (7, 7),
            (8, 8),
            (9, 9),
            (63, 63),
            (64, 64),
            (65, 65),
            (125, 125),
            (126, 126),
            (65_535, 126),
            (65_536, 127),
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            for opcode in [0x2, 0x1] {
                let mut out = BytesMut::new();
                if opcode == 0x2 {
                    client.write_binary(&payload, &mut out);
                } else {
                    client.write_text(&payload, &mut out);
                }
                let frames = client_frames(&out);
                assert_eq!(
                    frames,
                    [ClientFrame {
                        fin: true,
                        opcode,
                        len7,
                        payload: payload.clone()
                    }],
                    "length {len}"
                );
            }
        }
    }

    #[test]
    fn consecutive_frames_use_different_masking_keys() {
        let mut client = open_client();
        let mut out = BytesMut::new();
        client.write_binary(b"a", &mut out);
        client.write_binary(b"a", &mut out);
        assert_ne!(out[2..6], out[9..13]);
    }

    #[test]
    fn ping_gets_a_masked_pong_with_the_same_payload() {
        let mut client = open_client();
        let mut input = BytesMut::from(frame(0x89, b"are you there").as_slice());
        let mut out = BytesMut::new();
        assert_eq!(client.read(&mut input, &mut out), Ok(None));
        assert!(input.is_empty());
        assert_eq!(
            client_frames(&out),
            [ClientFrame {
                fin: true,
                opcode: 0xA,
                len7: 13,
                payload: b"are you there".to_vec()
            }]
        );
    }

    #[test]
    fn pong_is_ignored() {
        let mut client = open_client();
        let mut input = BytesMut::from(frame(0x8A, b"late").as_slice());
        let mut out = BytesMut::new();
        assert_eq!(client.read(&mut input, &mut out), Ok(None));
        assert!(input.is_empty() && out.is_empty());
    }

    #[test]
    fn server_close_is_answered_once_and_reported() {
        let mut client = open_client();
        let mut input = BytesMut::from(close(1001, "bye").as_slice());
        input.extend(binary(b"after close"));
        let mut out = BytesMut::new();
        let closed = WsClientError::Closed {
            code: 1001,
            reason: "bye".to_owned(),
        };
        assert_eq!(client.read(&mut input, &mut out), Err(closed.clone()));
        assert!(client.is_closed());
        let written = client_frames(&out);
        assert_eq!(written.len(), 1);
        assert_eq!(close_payload(&written[0]), (1001, Vec::new()));
        let before = out.len();
        assert_eq!(client.read(&mut input, &mut out), Err(closed));
        client.write_close(1000, "again", &mut out);
        client.write_binary(b"late", &mut out);
        assert_eq!(out.len(), before, "nothing more is written");
    }

    #[test]
    fn close_without_status_is_reported_as_1005_and_answered_empty() {
        let mut client = open_client();
        let mut input = BytesMut::from(frame(0x88, b"").as_slice());
        let mut out = BytesMut::new();
        assert_eq!(
            client.read(&mut input, &mut out),
            Err(WsClientError::Closed {
                code: 1005,
                reason: String::new()
            })
        );
        let written = client_frames(&out);
        assert_eq!((written[0].opcode, written[0].payload.len()), (0x8, 0));
    }

    #[test]
    fn client_close_is_written_once_and_the_server_echo_is_not_answered() {
        let mut client = open_client();
        let mut out = BytesMut::new();
        client.write_close(1000, "done", &mut out);
        client.write_close(1001, "twice", &mut out);
        let written = client_frames(&out);
        assert_eq!(written.len(), 1);
        assert_eq!(close_payload(&written[0]), (1000, b"done".to_vec()));
        out.clear();
        let mut input = BytesMut::from(frame(0x89, b"p").as_slice());
        input.extend(binary(b"still delivered"));
        input.extend(close(1000, ""));
        assert_eq!(
            client.read(&mut input, &mut out),
            Ok(Some(WsMessage::Binary(Bytes::from_static(
                b"still delivered"
            ))))
        );
        assert!(matches!(
            client.read(&mut input, &mut out),
            Err(WsClientError::Closed { code: 1000, .. })
        ));
        assert!(
            out.is_empty(),
            "no pong and no second close after our Close"
        );
    }

    #[test]
    fn close_reason_is_cut_to_fit_a_control_frame() {
        let mut client = open_client();
        let mut out = BytesMut::new();
        client.write_close(1000, &"é".repeat(100), &mut out);
        let written = client_frames(&out);
        let (_, reason) = close_payload(&written[0]);
        assert_eq!(reason.len(), 122);
        assert!(std::str::from_utf8(&reason).is_ok());
    }

    // ---- protocol errors ----

    #[test]
    fn masked_server_frame_is_a_protocol_error() {
        assert_protocol_error_closes_1002(&[0x82, 0x81, 1, 2, 3, 4, 0x55]);
    }

    #[test]
    fn reserved_bit_is_a_protocol_error() {
        for rsv in [0x40, 0x20, 0x10] {
            assert_protocol_error_closes_1002(&frame(0x82 | rsv, b"x"));
        }
    }

    #[test]
    fn unknown_opcode_is_a_protocol_error() {
        for op in [0x3, 0x7, 0xB, 0xF] {
            assert_protocol_error_closes_1002(&frame(0x80 | op, b"x"));
        }
    }

    #[test]
    fn fragmented_control_frame_is_a_protocol_error() {
        for op in [0x8, 0x9, 0xA] {
            assert_protocol_error_closes_1002(&frame(op, b""));
        }
    }

    #[test]
    fn control_frame_over_125_bytes_is_a_protocol_error() {
        assert_protocol_error_closes_1002(&frame(0x89, &[0; 126]));
    }

    #[test]
    fn non_minimal_length_is_a_protocol_error() {
        assert_protocol_error_closes_1002(&[0x82, 126, 0, 5, 1, 2, 3, 4, 5]);
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&200u64.to_be_bytes());
        assert_protocol_error_closes_1002(&long);
        let mut msb = vec![0x82, 127];
        msb.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_protocol_error_closes_1002(&msb);
    }

    #[test]
    fn continuation_without_a_message_is_a_protocol_error() {
        assert_protocol_error_closes_1002(&frame(0x80, b"orphan"));
    }

    #[test]
    fn new_message_inside_a_fragmented_one_is_a_protocol_error() {
        let mut bytes = frame(0x02, b"start");
        bytes.extend(binary(b"interloper"));
        assert_protocol_error_closes_1002(&bytes);
    }

    #[test]
    fn bad_close_payloads_are_protocol_errors() {
        assert_protocol_error_closes_1002(&frame(0x88, &[0x03]));
        assert_protocol_error_closes_1002(&close(1005, ""));
        assert_protocol_error_closes_1002(&close(999, ""));
    }

    #[test]
    fn invalid_utf8_text_fails_with_1007() {
        for bytes in [frame(0x81, &[0xC3]), frame(0x88, &[0x03, 0xE8, 0xFF])] {
            let (error, written) = error_for(&bytes);
            assert!(matches!(error, WsClientError::Protocol(_)), "{error:?}");
            assert_eq!(close_payload(&written[0]).0, 1007);
        }
    }

    #[test]
    fn message_over_max_is_too_big_from_its_header() {
        let mut client = open_client();
        client.set_max_message_bytes(100);
        let mut input = BytesMut::from(&binary(&[0; 101])[..2]);
        let mut out = BytesMut::new();
        assert_eq!(
            client.read(&mut input, &mut out),
            Err(WsClientError::TooBig {
                size: 101,
                max: 100
            })
        );
        assert_eq!(close_payload(&client_frames(&out)[0]).0, 1009);
    }

    #[test]
    fn fragmented_message_over_max_is_too_big() {
        let mut client = open_client();
        client.set_max_message_bytes(100);
        let mut input = BytesMut::from(frame(0x02, &[0; 60]).as_slice());
        input.extend(frame(0x80, &[0; 60]));
        assert_eq!(
            client.read(&mut input, &mut BytesMut::new()),
            Err(WsClientError::TooBig {
                size: 120,
                max: 100
            })
        );
    }

    #[test]
    fn message_at_max_is_accepted() {
        let mut client = open_client();
        client.set_max_message_bytes(100);
        let mut input = BytesMut::from(frame(0x02, &[1; 60]).as_slice());
        input.extend(frame(0x80, &[1; 40]));
        let m = client.read(&mut input, &mut BytesMut::new()).expect("ok");
        assert_eq!(m, Some(WsMessage::Binary(Bytes::from(vec![1; 100]))));
    }

    #[test]
    fn fragmentation_with_an_interleaved_ping_reassembles() {
        let mut client = open_client();
        let mut input = BytesMut::new();
        input.extend(frame(0x01, b"hel"));
        input.extend(frame(0x89, b"p"));
        input.extend(frame(0x00, b"lo "));
        input.extend(frame(0x8A, b"q"));
        input.extend(frame(0x80, b"world"));
        let mut out = BytesMut::new();
        assert_eq!(
            client.read(&mut input, &mut out),
            Ok(Some(WsMessage::Text(Bytes::from_static(b"hello world"))))
        );
        assert_eq!(
            client_frames(&out),
            [ClientFrame {
                fin: true,
                opcode: 0xA,
                len7: 1,
                payload: b"p".to_vec()
            }]
        );
    }

    // ---- against tungstenite as the server ----

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A TCP client with a `WsClient`, reading and writing through blocking calls.
    struct Peer {
        stream: TcpStream,
        client: WsClient,
        input: BytesMut,
        out: BytesMut,
        /// Messages decoded while waiting for the 101.
        pending: std::collections::VecDeque<WsMessage>,
    }

    impl Peer {
        fn connect(addr: std::net::SocketAddr) -> Peer {
            let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
            stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            stream.set_write_timeout(Some(TIMEOUT)).expect("timeout");
            let host = addr.to_string();
            let client = WsClient::new(&host, "/", &[], 0x5EED);
            let mut peer = Peer {
                stream,
                client,
                input: BytesMut::new(),
                out: BytesMut::new(),
                pending: std::collections::VecDeque::new(),
            };
            peer.client.write_handshake(&mut peer.out);
            peer.flush();
            // tungstenite refuses frames pipelined after the request: wait for the 101.
            // Frames that arrive with the 101 are decoded by the same `read`: keep them.
            while !peer.client.is_open() {
                let polled = peer.client.read(&mut peer.input, &mut peer.out);
                match polled.expect("handshake accepted") {
                    Some(message) => peer.pending.push_back(message),
                    None if !peer.client.is_open() => peer.fill(),
                    None => {}
                }
            }
            peer
        }

        /// One blocking socket read into `input`.
        fn fill(&mut self) {
            let mut buf = [0u8; 16 * 1024];
            let n = self.stream.read(&mut buf).expect("read");
            assert_ne!(n, 0, "unexpected EOF");
            self.input.extend_from_slice(&buf[..n]);
        }

        fn flush(&mut self) {
            self.stream.write_all(&self.out).expect("write");
            self.out.clear();
        }

        /// The next message (or the error that ended the connection), flushing automatic
        /// answers on the way.
        fn recv(&mut self) -> Result<WsMessage, WsClientError> {
            if let Some(message) = self.pending.pop_front() {
                return Ok(message);
            }
            loop {
                let result = self.client.read(&mut self.input, &mut self.out);
                self.flush();
                if let Some(message) = result? {
                    return Ok(message);
                }
                self.fill();
            }
        }
    }

    /// Binds a listener and runs `serve` on the accepted tungstenite server connection.
    fn tungstenite_server<T: Send + 'static>(
        serve: impl FnOnce(&mut tungstenite::WebSocket<TcpStream>) -> T + Send + 'static,
    ) -> (std::net::SocketAddr, std::thread::JoinHandle<T>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            stream.set_write_timeout(Some(TIMEOUT)).expect("timeout");
            let mut ws = tungstenite::accept(stream).expect("tungstenite handshake");
            serve(&mut ws)
        });
        (addr, handle)
    }

    #[test]
    fn tungstenite_server_echoes_pings_and_closes_with_the_client() {
        use tungstenite::Message;
        let (addr, server) = tungstenite_server(|ws| {
            loop {
                match ws.read().expect("server read") {
                    Message::Binary(b) => ws.send(Message::Binary(b)).expect("send"),
                    Message::Text(t) if t.as_str() == "ping me" => {
                        ws.send(Message::Ping(Bytes::from_static(b"are you there")))
                            .expect("send ping");
                    }
                    // The pong's payload goes back as a binary message, for the client to check.
                    Message::Pong(p) => ws.send(Message::Binary(p)).expect("send"),
                    Message::Close(frame) => {
                        // Drive the automatic close reply out.
                        while ws.flush().is_ok() {}
                        return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        let mut peer = Peer::connect(addr);
        for size in [0usize, 1, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            peer.client.write_binary(&payload, &mut peer.out);
            peer.flush();
            assert_eq!(
                peer.recv(),
                Ok(WsMessage::Binary(Bytes::from(payload))),
                "size {size}"
            );
            assert!(peer.client.is_open());
        }
        peer.client.write_text(b"ping me", &mut peer.out);
        peer.flush();
        assert_eq!(
            peer.recv(),
            Ok(WsMessage::Binary(Bytes::from_static(b"are you there")))
        );
        peer.client.write_close(1000, "bye", &mut peer.out);
        peer.flush();
        assert_eq!(
            peer.recv(),
            Err(WsClientError::Closed {
                code: 1000,
                reason: "bye".to_owned()
            })
        );
        assert_eq!(
            server.join().expect("server thread"),
            Some((1000, "bye".to_owned()))
        );
    }

    #[test]
    fn tungstenite_server_burst_and_server_initiated_close() {
        use tungstenite::Message;
        use tungstenite::protocol::CloseFrame;
        use tungstenite::protocol::frame::coding::CloseCode;
        let (addr, server) = tungstenite_server(|ws| {
            for i in 0..2000u32 {
                ws.write(Message::binary(i.to_be_bytes().to_vec()))
                    .expect("write");
            }
            ws.close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "shutting down".into(),
            }))
            .expect("close");
            // Until the client's reply arrives: then tungstenite reports ConnectionClosed.
            loop {
                match ws.read() {
                    Ok(_) => {}
                    Err(tungstenite::Error::ConnectionClosed) => return true,
                    Err(e) => panic!("server: {e}"),
                }
            }
        });
        let mut peer = Peer::connect(addr);
        for i in 0..2000u32 {
            assert_eq!(
                peer.recv(),
                Ok(WsMessage::Binary(Bytes::copy_from_slice(&i.to_be_bytes())))
            );
        }
        assert_eq!(
            peer.recv(),
            Err(WsClientError::Closed {
                code: 1001,
                reason: "shutting down".to_owned()
            })
        );
        assert!(
            server.join().expect("server thread"),
            "close handshake completed"
        );
    }

    // ---- fuzz ----

    proptest! {
        #[test]
        fn arbitrary_bytes_after_a_valid_handshake_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            cut in 0usize..600,
            max in 0usize..300,
        ) {
            let mut client = open_client();
            client.set_max_message_bytes(max);
            let cut = cut.min(bytes.len());
            let mut input = BytesMut::new();
            let mut out = BytesMut::new();
            for piece in [&bytes[..cut], &bytes[cut..]] {
                input.extend_from_slice(piece);
                for _ in 0..1000 {
                    match client.read(&mut input, &mut out) {
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            client_frames(&out); // whatever was written is well-formed
        }

        #[test]
        fn arbitrary_frame_sequences_never_panic(
            frames in proptest::collection::vec(
                (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..200)),
                0..20,
            ),
        ) {
            let mut client = open_client();
            let mut input = BytesMut::new();
            for (b0, payload) in &frames {
                input.extend(frame(*b0, payload));
            }
            let mut out = BytesMut::new();
            for _ in 0..100 {
                match client.read(&mut input, &mut out) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            client_frames(&out);
        }
    }
}
