//! The per-connection wire adapter, sans-IO: a connection's inbound bytes in, [`pb::Frame`]s
//! out; frames in, bytes out. Whatever the transport (TCP or WebSocket), the session above sees
//! only frames and a few connection-level events ([`Inbound`]).
//!
//! No sockets and no clock: [`Transport::decode`] takes the connection's read buffer and the
//! connection's outbound buffer (for the automatic answers: the WebSocket 101, pongs, close
//! replies, error responses); [`Transport::encode`] appends one frame to the outbound buffer. The
//! event loop reads and writes the socket ([`crate::net::Conn`]) and owns the timers.
//!
//! # Transports
//!
//! * [`Transport::tcp`]: a stream of protobuf frames, each preceded by its length as a varint
//!   ([`parley_proto::tcp::FrameCodec`]). An oversized frame is refused from its length prefix,
//!   before its payload is buffered.
//! * [`Transport::websocket`]: first the HTTP upgrade ([`ws::parse_request`]); on success the 101
//!   is written and [`Inbound::Upgraded`] reports the credentials the request carried (so the
//!   session may log in from the upgrade; the 101 selects the subprotocol [`WS_SUBPROTOCOL`] if
//!   the client offered it); then one frame per WebSocket message ([`WsConn`]): a
//!   binary message is a frame's protobuf encoding, a text message its proto3 JSON form. Frames
//!   are sent in the form the client used last ([`WireForm`]): binary until the client sends a
//!   text message, text (JSON) from then until it sends a binary one.
//!
//! # Errors: fatal or not
//!
//! [`TransportError::is_fatal`] splits decode errors in two:
//!
//! * **Fatal**: the byte stream cannot be followed any further (a bad TCP length prefix, a frame
//!   over the limit, a refused upgrade, a broken WebSocket rule). The transport has already
//!   written the peer's last words into `out`, in the transport's own idiom, and is closed
//!   ([`Transport::is_closed`]):
//!   - TCP: `Error{code, fatal: true}`;
//!   - WebSocket handshake: the HTTP error response (400, 426, 431, ...);
//!   - WebSocket protocol violation: a Close frame with the RFC 6455 code (1002, 1007, 1009),
//!     written by [`WsConn`];
//!   - WebSocket message whose frame exceeds `max_frame_bytes` (but not the WebSocket message
//!     limit): `Error{FRAME_TOO_LARGE, fatal: true}`, then a Close with 1009.
//!
//!   The caller logs the error, flushes `out` and closes the socket
//!   ([`crate::net::Conn::drive_close`]); it sends nothing itself.
//! * **Not fatal** ([`TransportError::BadFrame`]): one delimited frame (a TCP frame, a WebSocket
//!   message) was consumed but is not an acceptable frame (bad protobuf, bad JSON, no known body).
//!   The stream is still in sync and nothing was written. The session answers
//!   `err.to_error_frame(0, false)` with [`Transport::encode`] and goes on (or decides it has
//!   heard enough and closes, see below).
//!
//! Encode errors ([`TransportError::OutboundTooLarge`], [`TransportError::Unrepresentable`],
//! [`TransportError::NotOpen`]) are never fatal: nothing was written, the transport is unchanged.
//!
//! # Closing from the server side
//!
//! The session sends `Error{code, fatal: true}` with [`Transport::encode`] (where it can: not
//! before the WebSocket upgrade), then calls [`Transport::close`] with the same code:
//!
//! * TCP: writes nothing (the Error frame said it all); the transport is closed.
//! * WebSocket: writes a Close frame with the code of [`ws_close_code`]; the transport waits for
//!   the client's Close ([`Inbound::PeerClosed`]). The caller may keep decoding until then,
//!   bounded by its own timer, or close the socket at once.
//! * WebSocket, before the upgrade: writes an HTTP error response with the status of
//!   [`http_status`] (e.g. 408 for a handshake that never completed, 503 when full).
//!
//! ## Close codes ([`ws_close_code`])
//!
//! | `pb::ErrorCode`                                                 | close code               |
//! |-----------------------------------------------------------------|--------------------------|
//! | `ERROR_CODE_UNSPECIFIED` (a normal close)                       | 1000 normal closure      |
//! | `SHUTTING_DOWN`                                                 | 1001 going away          |
//! | `BAD_FRAME`                                                     | 1007 invalid payload     |
//! | `BAD_TOKEN`, `TOKEN_EXPIRED`, `LOGIN_REQUIRED`, `LOGIN_TIMEOUT` | 1008 policy violation    |
//! | `FORBIDDEN`, `RATE_LIMITED`                                     | 1008 policy violation    |
//! | `FRAME_TOO_LARGE`                                               | 1009 message too big     |
//! | `INTERNAL`, `STORAGE_FAILURE`                                   | 1011 internal error      |
//! | `TOO_MANY_CONNECTIONS`, `SLOW_CONSUMER`                         | 1013 try again later     |
//! | every other code (`REPLACED` 4011, `IDLE_TIMEOUT` 4012, ...)    | 4000 + code (private)    |
//!
//! `BAD_FRAME` is 1007, not 1002: the WebSocket framing was fine, the message's content was not
//! a frame, which is what RFC 6455 7.4.1 describes as "data within a message that was not
//! consistent with the type of the message". 1002 stays reserved for broken WebSocket rules
//! ([`WsConn`] sends it itself), so a client that sees 1002 knows its WebSocket library is at
//! fault and one that sees 1007 knows its frames are. 1003 ("cannot accept this data type") is
//! not used: the broker accepts both text and binary. The close reason is the caller's reason
//! (cut to 123 bytes on a character boundary), or the code's name (`"SHUTTING_DOWN"`) if empty.
//!
//! ### Invariants
//!
//! * Nothing is written to `out` after a Close frame or an HTTP error response.
//! * An inbound frame is returned only if its protobuf encoding is at most `max_frame_bytes`
//!   (TCP: from the prefix; WebSocket binary: the message length; WebSocket text: the encoded
//!   length of the parsed frame). An outbound frame is written only under the same limit.
//! * [`Transport::is_closed`] is true after every fatal error, and then `decode` returns
//!   `Ok(None)` and `encode` refuses.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parley_proto::frame::{self, FrameError, WireError};
use parley_proto::pb;
use parley_proto::tcp::{FrameCodec, TcpFrameError};
use parley_proto::ws::{
    self, Event, HandshakeError, OpCode, WsConfig, WsConn, WsError, close_code,
};

/// The WebSocket subprotocol the broker selects when a client offers it
/// (`Sec-WebSocket-Protocol: parley.v1`). Offering it is optional; a browser that offers any
/// subprotocol fails the handshake unless the server selects one of them.
pub const WS_SUBPROTOCOL: &str = "parley.v1";

/// How much larger than `max_frame_bytes` a WebSocket message may be, by default: JSON spells
/// `bytes` in base64 (4/3) and every field by name, so the text form of a frame at the protobuf
/// limit is larger than the limit. Twice the limit plus 1 KiB covers a `Send` with a body at the
/// limit; the frame limit itself is then checked on the parsed frame.
const WS_MESSAGE_SLACK_FACTOR: usize = 2;
/// Extra bytes on top of [`WS_MESSAGE_SLACK_FACTOR`] (field names of a small frame).
const WS_MESSAGE_SLACK_BYTES: usize = 1024;

/// The limits a transport enforces on what it reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportLimits {
    /// The largest frame, in bytes of its protobuf encoding, accepted or sent (both ways, so a
    /// client may size its own buffers by `LoginResult.max_frame_bytes`).
    pub max_frame_bytes: usize,
    /// The largest WebSocket message (all fragments) buffered before it is parsed; a larger one
    /// fails the connection with close code 1009 before its payload is read. Must be at least
    /// `max_frame_bytes` (binary messages) and should leave room for JSON (text messages).
    pub max_ws_message_bytes: usize,
    /// The largest WebSocket upgrade request (request line and headers); a larger one gets 431.
    pub max_upgrade_request_bytes: usize,
    /// The largest frame (TCP) or WebSocket message accepted until [`Transport::open_session`]
    /// (before login), so an anonymous peer cannot make the node buffer a large frame.
    pub max_login_frame_bytes: usize,
}

impl TransportLimits {
    /// Limits for frames of at most `max_frame_bytes`, with the WebSocket message limit derived
    /// from it (twice the frame limit plus 1 KiB, room for the JSON form) and the default upgrade
    /// request limit ([`ws::DEFAULT_MAX_REQUEST_BYTES`], 8 KiB).
    pub fn new(max_frame_bytes: usize) -> Self {
        TransportLimits {
            max_frame_bytes,
            max_ws_message_bytes: max_frame_bytes
                .saturating_mul(WS_MESSAGE_SLACK_FACTOR)
                .saturating_add(WS_MESSAGE_SLACK_BYTES),
            max_upgrade_request_bytes: ws::DEFAULT_MAX_REQUEST_BYTES,
            max_login_frame_bytes: max_frame_bytes,
        }
    }
}

impl TransportLimits {
    /// The largest WebSocket message accepted before login: the login frame limit, unless it
    /// is no lower than the frame limit (then the usual message limit).
    fn login_message_bytes(&self) -> usize {
        if self.max_login_frame_bytes >= self.max_frame_bytes {
            self.max_ws_message_bytes
        } else {
            self.max_login_frame_bytes
        }
    }
}

impl Default for TransportLimits {
    /// [`TransportLimits::new`] with [`parley_proto::DEFAULT_MAX_FRAME_BYTES`] (64 KiB).
    fn default() -> Self {
        Self::new(parley_proto::DEFAULT_MAX_FRAME_BYTES)
    }
}

impl From<&crate::config::Limits> for TransportLimits {
    /// [`TransportLimits::new`] with the node's `limits.max_frame_bytes`, and its login frame
    /// and handshake limits.
    fn from(limits: &crate::config::Limits) -> Self {
        let size = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
        TransportLimits {
            max_upgrade_request_bytes: size(limits.max_handshake_bytes),
            max_login_frame_bytes: size(limits.max_login_frame_bytes.min(limits.max_frame_bytes)),
            ..Self::new(size(limits.max_frame_bytes))
        }
    }
}

/// What the peer said, one item at a time ([`Transport::decode`]).
#[derive(Clone, PartialEq)]
pub enum Inbound {
    /// A frame. Its payloads (`Send.body`, ...) are slices of the read buffer when it came as
    /// protobuf, no copy.
    Frame(pb::Frame),
    /// WebSocket only: the upgrade succeeded and its 101 response is in `out`. Frames may follow
    /// at once (even from the same read). `Debug` never shows the token.
    Upgraded {
        /// The credentials the request carried: the `Authorization: Bearer` token if present,
        /// else the `token` query parameter (browsers cannot set headers), else `None` (the
        /// client must then send a `Login` frame). Never log it.
        token: Option<String>,
        /// The request path without the query, as sent (not percent-decoded), e.g. `/ws`.
        path: String,
        /// The `Origin` header, if any (browsers send it; the session may check it).
        origin: Option<String>,
    },
    /// WebSocket only: a ping (already answered with a pong in `out`) or a pong. It carries no
    /// frame, but it is traffic: the session's idle timer counts it.
    Liveness,
    /// WebSocket only: the client's Close arrived (answered in `out` if the client started the
    /// close handshake). The transport is closed: flush `out` and close the socket.
    PeerClosed {
        /// The client's close code, `None` if its Close carried none. For logs.
        code: Option<u16>,
    },
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inbound::Frame(frame) => f.debug_tuple("Frame").field(frame).finish(),
            Inbound::Upgraded {
                token,
                path,
                origin,
            } => f
                .debug_struct("Upgraded")
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .field("path", path)
                .field("origin", origin)
                .finish(),
            Inbound::Liveness => f.write_str("Liveness"),
            Inbound::PeerClosed { code } => {
                f.debug_struct("PeerClosed").field("code", code).finish()
            }
        }
    }
}

/// Why bytes could not be read as frames, or a frame could not be written.
///
/// The one place transport errors become wire codes ([`WireError::code`]); see the module
/// documentation for what the caller does after each (`is_fatal`).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP: the length prefix is not a varint of at most 5 bytes fitting in 32 bits. Fatal;
    /// `Error{BAD_FRAME, fatal: true}` was written.
    #[error("bad length prefix: not a varint of at most 5 bytes fitting in 32 bits")]
    BadLengthPrefix,
    /// An inbound frame exceeds `max_frame_bytes` (TCP: as its prefix says, before its payload
    /// arrived; WebSocket: the message or the parsed frame's encoding). Fatal;
    /// `Error{FRAME_TOO_LARGE, fatal: true}` was written (and, for WebSocket, a Close 1009).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's length in bytes (at least this much, if a TCP prefix was incomplete).
        len: u64,
        /// The limit, `max_frame_bytes`.
        max: usize,
    },
    /// WebSocket: the upgrade request was refused. Fatal; the HTTP error response was written.
    #[error("WebSocket upgrade refused: {0}")]
    Handshake(#[source] HandshakeError),
    /// WebSocket: the client broke a rule of RFC 6455 (or sent a message over the WebSocket
    /// message limit). Fatal; the Close frame with the error's code was written.
    #[error("WebSocket protocol error: {0}")]
    WebSocket(#[source] WsError),
    /// One inbound frame was delimited correctly but is not acceptable: bad protobuf, bad JSON,
    /// or no body this schema knows. Not fatal: it was consumed, nothing was written, the stream
    /// is in sync.
    #[error(transparent)]
    BadFrame(FrameError),
    /// Encode: the frame's protobuf encoding exceeds `max_frame_bytes`; nothing was written.
    /// A bug of the sender (pages must be sized to fit), not of the peer.
    #[error("outbound frame of {len} bytes exceeds the limit of {max} bytes")]
    OutboundTooLarge {
        /// The frame's encoded length.
        len: usize,
        /// The limit, `max_frame_bytes`.
        max: usize,
    },
    /// Encode: the client reads JSON but the frame holds an enum value the schema does not name
    /// (possible only for values copied from a peer's protobuf); nothing was written.
    #[error("frame cannot be sent as JSON: {0}")]
    Unrepresentable(#[source] FrameError),
    /// Encode: the transport cannot send frames now (the WebSocket upgrade is not done, or the
    /// connection is closing or closed); nothing was written.
    #[error("transport is not open for frames")]
    NotOpen,
}

impl TransportError {
    /// Whether this (decode) error ends the connection: the transport has written the peer's
    /// last words into `out` and is closed; the caller flushes and closes the socket.
    pub fn is_fatal(&self) -> bool {
        match self {
            TransportError::BadLengthPrefix
            | TransportError::FrameTooLarge { .. }
            | TransportError::Handshake(_)
            | TransportError::WebSocket(_) => true,
            TransportError::BadFrame(_)
            | TransportError::OutboundTooLarge { .. }
            | TransportError::Unrepresentable(_)
            | TransportError::NotOpen => false,
        }
    }
}

impl WireError for TransportError {
    fn code(&self) -> pb::ErrorCode {
        match self {
            TransportError::BadLengthPrefix | TransportError::Handshake(_) => {
                pb::ErrorCode::BadFrame
            }
            TransportError::FrameTooLarge { .. } => pb::ErrorCode::FrameTooLarge,
            TransportError::WebSocket(e) => e.code(),
            TransportError::BadFrame(e) => e.code(),
            TransportError::OutboundTooLarge { .. }
            | TransportError::Unrepresentable(_)
            | TransportError::NotOpen => pb::ErrorCode::Internal,
        }
    }
}

impl From<TcpFrameError> for TransportError {
    fn from(e: TcpFrameError) -> Self {
        match e {
            TcpFrameError::BadLengthPrefix => TransportError::BadLengthPrefix,
            TcpFrameError::TooLarge { len, max } => TransportError::FrameTooLarge { len, max },
            TcpFrameError::Frame(e) => TransportError::BadFrame(e),
        }
    }
}

/// The byte form a transport gives a frame on the wire. Every connection in the same form gets
/// the same bytes for the same frame, so a fan-out may encode once per form and share the bytes
/// ([`WireForm::encode_prebuilt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireForm {
    /// TCP: varint length prefix, then the protobuf encoding.
    Tcp,
    /// WebSocket: one unfragmented binary message holding the protobuf encoding.
    WsBinary,
    /// WebSocket: one unfragmented text message holding the proto3 JSON form.
    WsText,
}

impl WireForm {
    /// Appends `frame` to `out` in this form, if its protobuf encoding is at most
    /// `max_frame_bytes`.
    ///
    /// Protobuf forms are encoded straight into `out` after their header or prefix (no
    /// intermediate buffer). JSON is written straight into `out` too; its length is known only
    /// afterwards, so the WebSocket header is appended behind it and rotated to the front: one
    /// `memmove` of the JSON, no allocation.
    ///
    /// # Errors
    ///
    /// [`TransportError::OutboundTooLarge`] or (text) [`TransportError::Unrepresentable`];
    /// `out` is then unchanged.
    pub fn encode(
        self,
        frame: &pb::Frame,
        max_frame_bytes: usize,
        out: &mut BytesMut,
    ) -> Result<(), TransportError> {
        let len = match self {
            // The codec checks the limit itself.
            WireForm::Tcp => {
                return FrameCodec::new(max_frame_bytes)
                    .encode(frame, out)
                    .map_err(|e| match e {
                        TcpFrameError::TooLarge { len, max } => TransportError::OutboundTooLarge {
                            len: usize::try_from(len).unwrap_or(usize::MAX),
                            max,
                        },
                        other => TransportError::from(other),
                    });
            }
            WireForm::WsBinary | WireForm::WsText => frame::encoded_len(frame),
        };
        if len > max_frame_bytes {
            return Err(TransportError::OutboundTooLarge {
                len,
                max: max_frame_bytes,
            });
        }
        if self == WireForm::WsText {
            return encode_json_message(frame, out);
        }
        out.reserve(ws::frame::MAX_HEADER_LEN + len);
        ws::encode_data_header(out, OpCode::Binary, len);
        frame::encode(frame, out);
        Ok(())
    }
}

impl WireForm {
    /// Appends a frame already encoded as protobuf (`encoded`) in this form, if it is at most
    /// `max_frame_bytes`: TCP and WebSocket binary copy the bytes behind their prefix or header;
    /// text gets the frame decoded and written as JSON.
    ///
    /// The result depends only on the form and the frame, never on the connection (a server's
    /// WebSocket frames are unmasked), so a fan-out frames a frame once per form and appends the
    /// same bytes to every connection that reads that form.
    ///
    /// # Errors
    ///
    /// [`TransportError::OutboundTooLarge`] or (text) [`TransportError::Unrepresentable`];
    /// `out` is then unchanged.
    pub fn encode_prebuilt(
        self,
        encoded: &[u8],
        max_frame_bytes: usize,
        out: &mut BytesMut,
    ) -> Result<(), TransportError> {
        if encoded.len() > max_frame_bytes {
            return Err(TransportError::OutboundTooLarge {
                len: encoded.len(),
                max: max_frame_bytes,
            });
        }
        match self {
            WireForm::Tcp => FrameCodec::new(max_frame_bytes)
                .encode_raw(encoded, out)
                .map_err(TransportError::from),
            WireForm::WsBinary => {
                out.reserve(ws::frame::MAX_HEADER_LEN + encoded.len());
                ws::encode_data_header(out, OpCode::Binary, encoded.len());
                out.extend_from_slice(encoded);
                Ok(())
            }
            WireForm::WsText => {
                let frame = frame::decode(Bytes::copy_from_slice(encoded))
                    .map_err(TransportError::Unrepresentable)?;
                encode_json_message(&frame, out)
            }
        }
    }
}

/// Appends `frame` as a WebSocket text message holding its proto3 JSON form.
fn encode_json_message(frame: &pb::Frame, out: &mut BytesMut) -> Result<(), TransportError> {
    let start = out.len();
    if let Err(e) = serde_json::to_writer((&mut *out).writer(), frame) {
        out.truncate(start);
        return Err(TransportError::Unrepresentable(
            FrameError::JsonUnrepresentable {
                reason: e.to_string(),
            },
        ));
    }
    let json_len = out.len() - start;
    ws::encode_data_header(out, OpCode::Text, json_len);
    let header_len = out.len() - start - json_len;
    // The header went in behind the JSON: rotate it to the front.
    if let Some(message) = out.get_mut(start..) {
        message.rotate_right(header_len);
    }
    Ok(())
}

/// The WebSocket close code for closing a connection because of `code` (table in the module
/// documentation). Always allowed on the wire ([`close_code::is_allowed_on_wire`]).
pub fn ws_close_code(code: pb::ErrorCode) -> u16 {
    use pb::ErrorCode as E;
    match code {
        E::Unspecified => close_code::NORMAL,
        E::ShuttingDown => close_code::GOING_AWAY,
        E::BadFrame => close_code::INVALID_PAYLOAD,
        E::BadToken
        | E::TokenExpired
        | E::LoginRequired
        | E::LoginTimeout
        | E::Forbidden
        | E::RateLimited
        | E::TooManyErrors => close_code::POLICY_VIOLATION,
        E::FrameTooLarge => close_code::MESSAGE_TOO_BIG,
        E::Internal | E::StorageFailure => close_code::INTERNAL_ERROR,
        E::TooManyConnections | E::SlowConsumer | E::Unavailable => close_code::TRY_AGAIN_LATER,
        E::UnsupportedVersion
        | E::Replaced
        | E::IdleTimeout
        | E::NotFound
        | E::InvalidArgument
        | E::RetransmitExhausted
        | E::UnexpectedFrame
        | E::AlreadyExists
        | E::GroupFull
        | E::Kicked => private_close_code(code),
    }
}

/// 4000 + the wire code: the private-use range of RFC 6455 7.4.2 (4000-4999).
fn private_close_code(code: pb::ErrorCode) -> u16 {
    let private = u16::try_from(code as i32)
        .ok()
        .filter(|c| *c < 1000)
        .map_or(close_code::POLICY_VIOLATION, |c| 4000 + c);
    debug_assert!(close_code::is_allowed_on_wire(private));
    private
}

/// The HTTP status for refusing a WebSocket upgrade because of `code`, when the session closes
/// the connection before the upgrade completed: 401 for missing or bad credentials, 403
/// forbidden, 408 for a request that did not complete in time, 429 rate limited, 500 internal,
/// 503 when the node is full or shutting down, 400 for anything else.
pub fn http_status(code: pb::ErrorCode) -> u16 {
    use pb::ErrorCode as E;
    match code {
        E::BadToken | E::TokenExpired | E::LoginRequired => 401,
        E::Forbidden => 403,
        E::LoginTimeout | E::IdleTimeout => 408,
        E::RateLimited => 429,
        E::Internal | E::StorageFailure => 500,
        E::TooManyConnections | E::ShuttingDown | E::SlowConsumer => 503,
        _ => 400,
    }
}

/// Where a transport is in its life.
#[derive(Debug)]
enum State {
    /// TCP: frames both ways until closed.
    Tcp(FrameCodec),
    /// WebSocket, before the upgrade: the request is being read. `examined` is the buffer length
    /// at the last parse that found the request incomplete (a parse is skipped until more bytes
    /// arrived).
    Handshake { examined: usize },
    /// WebSocket, after the upgrade. `form` is [`WireForm::WsBinary`] or [`WireForm::WsText`]:
    /// the form of the client's last data message. Boxed: every TCP connection would otherwise
    /// carry the WebSocket state's size.
    WebSocket { conn: Box<WsConn>, form: WireForm },
    /// Over: nothing more is read or written.
    Closed,
}

/// One connection's wire adapter (see the module documentation).
#[derive(Debug)]
pub struct Transport {
    limits: TransportLimits,
    state: State,
    /// Made by [`Transport::websocket`] (kept after the state closes).
    websocket: bool,
}

impl Transport {
    /// A TCP transport: length-delimited protobuf frames, open at once.
    pub fn tcp(limits: TransportLimits) -> Self {
        Transport {
            limits,
            state: State::Tcp(FrameCodec::new(limits.max_login_frame_bytes)),
            websocket: false,
        }
    }

    /// Whether this is a WebSocket connection (whatever its state now).
    pub fn is_websocket(&self) -> bool {
        self.websocket
    }

    /// A WebSocket transport, waiting for the client's HTTP upgrade request.
    pub fn websocket(limits: TransportLimits) -> Self {
        debug_assert!(limits.max_ws_message_bytes >= limits.max_frame_bytes);
        Transport {
            limits,
            state: State::Handshake { examined: 0 },
            websocket: true,
        }
    }

    /// The transport's limits.
    pub fn limits(&self) -> &TransportLimits {
        &self.limits
    }

    /// The peer logged in: from the next frame on, frames up to `max_frame_bytes` (WebSocket
    /// messages up to `max_ws_message_bytes`) are accepted instead of the login limit.
    pub fn open_session(&mut self) {
        match &mut self.state {
            State::Tcp(codec) => codec.set_max_frame_bytes(self.limits.max_frame_bytes),
            State::WebSocket { conn, .. } => {
                conn.set_max_message_bytes(self.limits.max_ws_message_bytes);
            }
            State::Handshake { .. } | State::Closed => {}
        }
    }

    /// Refuses a WebSocket upgrade that [`Transport::decode`] just reported as
    /// [`Inbound::Upgraded`] (e.g. for its `Origin`): the caller has cut `out` back to where it
    /// stood before that decode (removing the 101 answer); this writes an HTTP error response
    /// with [`http_status`] of `code` instead, and the transport is closed.
    pub fn refuse_upgrade(&mut self, code: pb::ErrorCode, reason: &str, out: &mut BytesMut) {
        ws::write_status_response(out, http_status(code), reason);
        self.state = State::Closed;
    }

    /// The form [`Transport::encode`] writes now, or `None` if it cannot send frames (before the
    /// WebSocket upgrade, or once closing).
    pub fn wire_form(&self) -> Option<WireForm> {
        match &self.state {
            State::Tcp(_) => Some(WireForm::Tcp),
            State::WebSocket { conn, form } if conn.is_open() => Some(*form),
            State::WebSocket { .. } | State::Handshake { .. } | State::Closed => None,
        }
    }

    /// Whether frames may be sent ([`Transport::wire_form`] is `Some`).
    pub fn is_open(&self) -> bool {
        self.wire_form().is_some()
    }

    /// Whether the connection is over: nothing more will be read or written; flush `out` and
    /// close the socket. After [`Transport::close`] a WebSocket is closing but not yet closed
    /// (it waits for the client's Close); TCP is closed at once.
    pub fn is_closed(&self) -> bool {
        match &self.state {
            State::Closed => true,
            State::WebSocket { conn, .. } => conn.is_closed(),
            State::Tcp(_) | State::Handshake { .. } => false,
        }
    }

    /// Decodes the next item from the front of `inbuf` (everything read and not yet decoded),
    /// consuming its bytes; automatic answers go to `out`. Call it again until `Ok(None)`, which
    /// means "need more bytes" (or, once closed, "nothing more will be read").
    ///
    /// # Errors
    ///
    /// A [`TransportError`]; if [`TransportError::is_fatal`], the peer's last words are in `out`
    /// and the transport is closed. Otherwise one bad frame was consumed and the stream goes on.
    pub fn decode(
        &mut self,
        inbuf: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Option<Inbound>, TransportError> {
        match &mut self.state {
            State::Closed => Ok(None),
            State::Tcp(codec) => match codec.decode_frame(inbuf) {
                Ok(frame) => Ok(frame.map(Inbound::Frame)),
                Err(e) => {
                    let e = TransportError::from(e);
                    if e.is_fatal() {
                        self.fail_tcp(&e, out);
                    }
                    Err(e)
                }
            },
            State::Handshake { examined } => {
                if inbuf.len() == *examined {
                    return Ok(None);
                }
                match ws::parse_request(inbuf, self.limits.max_upgrade_request_bytes) {
                    Ok(None) => {
                        *examined = inbuf.len();
                        Ok(None)
                    }
                    Ok(Some(request)) => {
                        request.write_accept(Some(WS_SUBPROTOCOL), out);
                        debug_assert!(request.consumed <= inbuf.len());
                        inbuf.advance(request.consumed.min(inbuf.len()));
                        self.state = State::WebSocket {
                            conn: Box::new(WsConn::new(WsConfig {
                                max_message_bytes: self.limits.login_message_bytes(),
                            })),
                            form: WireForm::WsBinary,
                        };
                        Ok(Some(Inbound::Upgraded {
                            token: request.bearer_token.or(request.query_token),
                            path: request.path,
                            origin: request.origin,
                        }))
                    }
                    Err(e) => {
                        e.write_response(out);
                        self.state = State::Closed;
                        Err(TransportError::Handshake(e))
                    }
                }
            }
            State::WebSocket { conn, form } => {
                let event = match conn.decode(inbuf, out) {
                    Ok(Some(event)) => event,
                    Ok(None) => return Ok(None),
                    Err(e) => {
                        // WsConn wrote the Close with the error's code.
                        self.state = State::Closed;
                        return Err(TransportError::WebSocket(e));
                    }
                };
                let max = self.limits.max_frame_bytes;
                let decoded = match event {
                    Event::Ping(_) | Event::Pong(_) => return Ok(Some(Inbound::Liveness)),
                    Event::Close { code, .. } => {
                        self.state = State::Closed;
                        return Ok(Some(Inbound::PeerClosed { code }));
                    }
                    Event::Binary(payload) => {
                        *form = WireForm::WsBinary;
                        if payload.len() > max {
                            let len = u64::try_from(payload.len()).unwrap_or(u64::MAX);
                            return Err(self.fail_ws_too_large(len, out));
                        }
                        frame::decode(payload)
                    }
                    Event::Text(json) => {
                        *form = WireForm::WsText;
                        match frame::from_json(&json) {
                            Ok(frame) if frame::encoded_len(&frame) > max => {
                                let len = frame::encoded_len(&frame);
                                let len = u64::try_from(len).unwrap_or(u64::MAX);
                                return Err(self.fail_ws_too_large(len, out));
                            }
                            decoded => decoded,
                        }
                    }
                };
                decoded
                    .map(|frame| Some(Inbound::Frame(frame)))
                    .map_err(TransportError::BadFrame)
            }
        }
    }

    /// Appends `frame` to `out` in the form the peer reads ([`Transport::wire_form`]).
    ///
    /// # Errors
    ///
    /// [`TransportError::NotOpen`] before the upgrade or once closing,
    /// [`TransportError::OutboundTooLarge`], [`TransportError::Unrepresentable`]. Nothing is
    /// written then.
    pub fn encode(&mut self, frame: &pb::Frame, out: &mut BytesMut) -> Result<(), TransportError> {
        let form = self.wire_form().ok_or(TransportError::NotOpen)?;
        form.encode(frame, self.limits.max_frame_bytes, out)
    }

    /// Appends a frame already encoded as protobuf (`encoded`, e.g. spliced around stored
    /// messages by [`parley_proto::splice`]) in the form the peer reads: TCP and WebSocket binary
    /// copy the bytes behind their prefix or header; a JSON client gets the frame decoded and
    /// written as JSON.
    ///
    /// # Errors
    ///
    /// As [`Transport::encode`]; nothing is written then.
    pub fn encode_prebuilt(
        &mut self,
        encoded: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), TransportError> {
        let form = self.wire_form().ok_or(TransportError::NotOpen)?;
        form.encode_prebuilt(encoded, self.limits.max_frame_bytes, out)
    }

    /// Closes the connection from the server side because of `code`
    /// ([`pb::ErrorCode::Unspecified`] for a normal close), with `reason` for the peer's logs
    /// (never a secret). Send `Error{code, fatal: true}` with [`Transport::encode`] first; this
    /// writes only the transport's own close:
    ///
    /// * TCP: nothing; the transport is closed.
    /// * WebSocket: a Close frame with [`ws_close_code`] and `reason` (cut to 123 bytes; the
    ///   code's name if empty). The transport then waits for the client's Close.
    /// * WebSocket before the upgrade: an HTTP error response with [`http_status`]; closed.
    /// * Already closing or closed: nothing.
    pub fn close(&mut self, code: pb::ErrorCode, reason: &str, out: &mut BytesMut) {
        let reason = if reason.is_empty() {
            code.as_str_name()
        } else {
            reason
        };
        match &mut self.state {
            State::Tcp(_) => self.state = State::Closed,
            State::Handshake { .. } => {
                ws::write_status_response(out, http_status(code), reason);
                self.state = State::Closed;
            }
            State::WebSocket { conn, .. } => {
                let reason = truncate_to_char_boundary(reason, ws::frame::MAX_CLOSE_REASON);
                // Cannot fail: the code is allowed on the wire and the reason fits.
                let written = conn.close(ws_close_code(code), reason, out);
                debug_assert!(written.is_ok(), "close frame refused: {written:?}");
            }
            State::Closed => {}
        }
    }

    /// Fails a TCP connection: `Error{code, fatal: true}` into `out`, then closed.
    fn fail_tcp(&mut self, error: &TransportError, out: &mut BytesMut) {
        debug_assert!(error.is_fatal());
        let written = WireForm::Tcp.encode(
            &error.to_error_frame(0, true),
            self.limits.max_frame_bytes,
            out,
        );
        debug_assert!(written.is_ok(), "an error frame fits any sane limit");
        self.state = State::Closed;
    }

    /// Fails a WebSocket connection for a frame of `len` bytes over the frame limit (but within
    /// the message limit): `Error{FRAME_TOO_LARGE, fatal: true}` in the client's form, a Close
    /// 1009, then closed.
    fn fail_ws_too_large(&mut self, len: u64, out: &mut BytesMut) -> TransportError {
        let error = TransportError::FrameTooLarge {
            len,
            max: self.limits.max_frame_bytes,
        };
        // Best effort: with an absurdly small limit even the error frame may not fit.
        let _ = self.encode(&error.to_error_frame(0, true), out);
        self.close(pb::ErrorCode::FrameTooLarge, "", out);
        self.state = State::Closed;
        error
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_to_char_boundary(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use bytes::Bytes;
    use parley_proto::pb::frame::Body;

    use super::*;

    const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    fn ping(nonce: u64) -> pb::Frame {
        pb::Frame {
            request_id: nonce,
            body: Some(Body::Ping(pb::Ping { nonce })),
        }
    }

    fn send(body_len: usize) -> pb::Frame {
        pb::Frame {
            request_id: 9,
            body: Some(Body::Send(pb::Send {
                to: Some(pb::Conversation {
                    r#type: pb::ConversationType::Direct as i32,
                    id: "bob".into(),
                }),
                client_msg_id: 1,
                body: Bytes::from(vec![0x5a; body_len]),
                ..pb::Send::default()
            })),
        }
    }

    fn tcp_bytes(frames: &[pb::Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for f in frames {
            FrameCodec::default().encode(f, &mut out).expect("fits");
        }
        out
    }

    /// A masked client frame, built independently of the server's encoder.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80 | opcode];
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

    fn binary_message(frame: &pb::Frame) -> Vec<u8> {
        let mut pb_bytes = BytesMut::new();
        frame::encode(frame, &mut pb_bytes);
        client_frame(0x2, &pb_bytes)
    }

    fn text_message(json: &str) -> Vec<u8> {
        client_frame(0x1, json.as_bytes())
    }

    fn upgrade_request(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: chat.example\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    /// A WebSocket transport past its upgrade, with the 101 already taken out of `out`.
    fn upgraded() -> Transport {
        let mut t = Transport::websocket(TransportLimits::default());
        let mut inbuf = BytesMut::from(upgrade_request("/ws", "").as_bytes());
        let mut out = BytesMut::new();
        let item = t.decode(&mut inbuf, &mut out).expect("valid request");
        assert!(matches!(item, Some(Inbound::Upgraded { .. })));
        t
    }

    /// Decodes everything decodable from `bytes` in one go.
    fn decode_all(t: &mut Transport, bytes: &[u8]) -> (Vec<Inbound>, BytesMut) {
        let mut inbuf = BytesMut::from(bytes);
        let mut out = BytesMut::new();
        let mut items = Vec::new();
        while let Some(item) = t.decode(&mut inbuf, &mut out).expect("decodes") {
            items.push(item);
        }
        (items, out)
    }

    /// Parses one unmasked server frame: (opcode, payload), and the bytes after it.
    fn server_frame(bytes: &[u8]) -> (u8, &[u8], &[u8]) {
        let opcode = bytes[0] & 0x0f;
        assert_eq!(bytes[0] & 0x80, 0x80, "final frame");
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        let (len, at) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        (opcode, &bytes[at..at + len], &bytes[at + len..])
    }

    fn error_of(frame: &pb::Frame) -> &pb::Error {
        match &frame.body {
            Some(Body::Error(e)) => e,
            other => panic!("expected an error frame, got {other:?}"),
        }
    }

    // ---- TCP -----------------------------------------------------------------------------

    #[test]
    fn tcp_frames_split_at_every_byte_boundary_decode_to_the_same_frames() {
        let frames = vec![ping(1), send(300), ping(2)];
        let stream = tcp_bytes(&frames);
        for cut in 0..=stream.len() {
            let mut t = Transport::tcp(TransportLimits::default());
            let mut inbuf = BytesMut::new();
            let mut out = BytesMut::new();
            let mut got = Vec::new();
            for piece in [&stream[..cut], &stream[cut..]] {
                inbuf.extend_from_slice(piece);
                while let Some(item) = t.decode(&mut inbuf, &mut out).expect("decodes") {
                    got.push(item);
                }
            }
            let want: Vec<_> = frames.iter().cloned().map(Inbound::Frame).collect();
            assert_eq!(got, want, "cut at {cut}");
            assert!(inbuf.is_empty() && out.is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn tcp_oversized_prefix_is_frame_too_large_before_the_payload_arrives() {
        let mut t = Transport::tcp(TransportLimits::new(1024));
        // A prefix saying 2048 bytes, and none of the payload.
        let mut inbuf = BytesMut::from(&[0x80, 0x10][..]);
        let mut out = BytesMut::new();
        let err = t.decode(&mut inbuf, &mut out).expect_err("too large");
        assert!(matches!(
            err,
            TransportError::FrameTooLarge {
                len: 2048,
                max: 1024
            }
        ));
        assert!(err.is_fatal());
        assert_eq!(err.code(), pb::ErrorCode::FrameTooLarge);
        let answer = FrameCodec::default()
            .decode_frame(&mut out)
            .expect("an error frame")
            .expect("complete");
        let error = error_of(&answer);
        assert_eq!(error.code, pb::ErrorCode::FrameTooLarge as i32);
        assert!(error.fatal);
        assert!(out.is_empty(), "nothing after the error frame");
        assert!(t.is_closed());
    }

    #[test]
    fn tcp_bad_length_prefix_is_fatal_bad_frame() {
        let mut t = Transport::tcp(TransportLimits::default());
        let mut inbuf = BytesMut::from(&[0x80, 0x80, 0x80, 0x80, 0x10][..]);
        let mut out = BytesMut::new();
        let err = t.decode(&mut inbuf, &mut out).expect_err("bad prefix");
        assert!(matches!(err, TransportError::BadLengthPrefix));
        assert!(err.is_fatal());
        assert!(!out.is_empty(), "the fatal error frame was written");
        assert_eq!(t.decode(&mut inbuf, &mut out).expect("closed"), None);
    }

    #[test]
    fn tcp_undecodable_frame_is_a_recoverable_bad_frame_and_the_stream_goes_on() {
        let mut t = Transport::tcp(TransportLimits::default());
        // A 2-byte frame that is a truncated field, then a good frame.
        let mut inbuf = BytesMut::from(&[0x02, 0x0a, 0x05][..]);
        inbuf.extend_from_slice(&tcp_bytes(&[ping(7)]));
        let mut out = BytesMut::new();
        let err = t.decode(&mut inbuf, &mut out).expect_err("bad protobuf");
        assert!(matches!(err, TransportError::BadFrame(_)));
        assert!(!err.is_fatal());
        assert_eq!(err.code(), pb::ErrorCode::BadFrame);
        assert!(out.is_empty(), "the session answers, not the transport");
        assert_eq!(
            t.decode(&mut inbuf, &mut out).expect("in sync"),
            Some(Inbound::Frame(ping(7)))
        );
    }

    #[test]
    fn tcp_encode_writes_a_length_delimited_frame() {
        let mut t = Transport::tcp(TransportLimits::default());
        let mut out = BytesMut::new();
        t.encode(&send(100), &mut out).expect("fits");
        assert_eq!(out, tcp_bytes(&[send(100)]));
        assert_eq!(t.wire_form(), Some(WireForm::Tcp));
    }

    #[test]
    fn tcp_close_writes_nothing_and_stops_sending() {
        let mut t = Transport::tcp(TransportLimits::default());
        let mut out = BytesMut::new();
        t.close(pb::ErrorCode::ShuttingDown, "bye", &mut out);
        assert!(out.is_empty());
        assert!(t.is_closed());
        assert!(matches!(
            t.encode(&ping(1), &mut out),
            Err(TransportError::NotOpen)
        ));
    }

    #[test]
    fn encode_of_a_frame_over_the_limit_is_refused_and_writes_nothing() {
        for mut t in [
            Transport::tcp(TransportLimits::new(100)),
            Transport::websocket(TransportLimits::new(100)),
        ] {
            if t.wire_form().is_none() {
                let mut inbuf = BytesMut::from(upgrade_request("/", "").as_bytes());
                t.decode(&mut inbuf, &mut BytesMut::new()).expect("upgrade");
            }
            let mut out = BytesMut::from(&b"queued"[..]);
            let err = t.encode(&send(200), &mut out).expect_err("too large");
            assert!(matches!(
                err,
                TransportError::OutboundTooLarge { max: 100, .. }
            ));
            assert!(!err.is_fatal());
            assert_eq!(&out[..], b"queued");
        }
    }

    // ---- WebSocket handshake -------------------------------------------------------------

    #[test]
    fn ws_upgrade_with_query_token_reports_the_token_and_writes_101() {
        let mut t = Transport::websocket(TransportLimits::default());
        let request = upgrade_request("/ws?token=abc.def%2Dg", "Origin: https://app.example\r\n");
        let (items, out) = decode_all(&mut t, request.as_bytes());
        assert_eq!(
            items,
            vec![Inbound::Upgraded {
                token: Some("abc.def-g".into()),
                path: "/ws".into(),
                origin: Some("https://app.example".into()),
            }]
        );
        let response = std::str::from_utf8(&out).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert_eq!(t.wire_form(), Some(WireForm::WsBinary));
    }

    #[test]
    fn ws_upgrade_selects_the_parley_subprotocol_when_offered() {
        let mut t = Transport::websocket(TransportLimits::default());
        let request = upgrade_request("/ws", "Sec-WebSocket-Protocol: chat, parley.v1\r\n");
        let (_, out) = decode_all(&mut t, request.as_bytes());
        let response = std::str::from_utf8(&out).unwrap();
        assert!(response.contains("\r\nSec-WebSocket-Protocol: parley.v1\r\n"));
    }

    #[test]
    fn ws_upgrade_prefers_the_bearer_token_over_the_query_token() {
        let mut t = Transport::websocket(TransportLimits::default());
        let request = upgrade_request("/ws?token=q", "Authorization: Bearer h\r\n");
        let (items, _) = decode_all(&mut t, request.as_bytes());
        assert!(matches!(&items[..], [Inbound::Upgraded { token: Some(t), .. }] if t == "h"));
    }

    #[test]
    fn upgraded_debug_output_hides_the_token() {
        let item = Inbound::Upgraded {
            token: Some("secret-token".into()),
            path: "/".into(),
            origin: None,
        };
        assert!(!format!("{item:?}").contains("secret-token"));
    }

    #[test]
    fn ws_partial_upgrade_request_waits_for_more_bytes() {
        let mut t = Transport::websocket(TransportLimits::default());
        let request = upgrade_request("/ws", "");
        let mut inbuf = BytesMut::from(&request.as_bytes()[..20]);
        let mut out = BytesMut::new();
        assert_eq!(t.decode(&mut inbuf, &mut out).expect("incomplete"), None);
        assert_eq!(inbuf.len(), 20, "nothing consumed");
        inbuf.extend_from_slice(&request.as_bytes()[20..]);
        assert!(matches!(
            t.decode(&mut inbuf, &mut out),
            Ok(Some(Inbound::Upgraded { .. }))
        ));
    }

    #[test]
    fn ws_frames_pipelined_behind_the_upgrade_request_are_decoded() {
        let mut t = Transport::websocket(TransportLimits::default());
        let mut bytes = upgrade_request("/ws", "").into_bytes();
        bytes.extend(binary_message(&ping(3)));
        let (items, _) = decode_all(&mut t, &bytes);
        assert!(matches!(items[0], Inbound::Upgraded { .. }));
        assert_eq!(items[1..], [Inbound::Frame(ping(3))]);
    }

    #[test]
    fn ws_bad_upgrade_request_writes_400_and_is_terminal() {
        let mut t = Transport::websocket(TransportLimits::default());
        let mut inbuf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
        let mut out = BytesMut::new();
        let err = t.decode(&mut inbuf, &mut out).expect_err("not an upgrade");
        assert!(matches!(err, TransportError::Handshake(_)));
        assert!(err.is_fatal());
        assert!(out.starts_with(b"HTTP/1.1 400 "));
        assert!(t.is_closed());
    }

    #[test]
    fn ws_upgrade_of_another_version_writes_426() {
        let mut t = Transport::websocket(TransportLimits::default());
        let request = upgrade_request("/ws", "").replace("Version: 13", "Version: 8");
        let mut out = BytesMut::new();
        let err = t
            .decode(&mut BytesMut::from(request.as_bytes()), &mut out)
            .expect_err("version 8");
        assert!(err.is_fatal());
        assert!(out.starts_with(b"HTTP/1.1 426 "));
    }

    #[test]
    fn close_before_the_upgrade_writes_an_http_status() {
        let mut t = Transport::websocket(TransportLimits::default());
        let mut out = BytesMut::new();
        t.close(pb::ErrorCode::LoginTimeout, "", &mut out);
        assert!(out.starts_with(b"HTTP/1.1 408 "));
        assert!(t.is_closed());
    }

    // ---- WebSocket messages --------------------------------------------------------------

    #[test]
    fn ws_binary_message_is_a_frame() {
        let mut t = upgraded();
        let (items, out) = decode_all(&mut t, &binary_message(&send(10)));
        assert_eq!(items, vec![Inbound::Frame(send(10))]);
        assert!(out.is_empty());
    }

    #[test]
    fn ws_binary_frames_are_sent_as_one_binary_message_of_protobuf() {
        let mut t = Transport::websocket(TransportLimits::new(1 << 20));
        let mut inbuf = BytesMut::from(upgrade_request("/", "").as_bytes());
        t.decode(&mut inbuf, &mut BytesMut::new()).unwrap();
        // Payloads below 126, below 65536 and above: 2-, 4- and 10-byte headers.
        for len in [0, 200, 70_000] {
            let mut out = BytesMut::new();
            t.encode(&send(len), &mut out).expect("fits");
            let mut expected = BytesMut::new();
            frame::encode(&send(len), &mut expected);
            let (opcode, payload, rest) = server_frame(&out);
            assert_eq!(opcode, 0x2);
            assert_eq!(payload, &expected[..], "len {len}");
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn ws_text_json_message_is_a_frame_and_later_frames_are_sent_as_json_text() {
        let mut t = upgraded();
        let (items, _) = decode_all(
            &mut t,
            &text_message(r#"{"requestId":"4","ping":{"nonce":"4"}}"#),
        );
        assert_eq!(items, vec![Inbound::Frame(ping(4))]);
        assert_eq!(t.wire_form(), Some(WireForm::WsText));
        let mut out = BytesMut::new();
        t.encode(&ping(5), &mut out).expect("representable");
        let (opcode, payload, rest) = server_frame(&out);
        assert_eq!(opcode, 0x1);
        assert_eq!(frame::from_json(payload).expect("JSON"), ping(5));
        assert!(rest.is_empty());
    }

    #[test]
    fn ws_json_text_of_every_header_size_is_framed_correctly() {
        let mut t = Transport::websocket(TransportLimits::new(1 << 20));
        let mut inbuf = BytesMut::from(upgrade_request("/", "").as_bytes());
        t.decode(&mut inbuf, &mut BytesMut::new()).unwrap();
        decode_all(&mut t, &text_message(r#"{"ping":{}}"#));
        // JSON lengths below 126, below 65536 and above: 2-, 4- and 10-byte headers.
        for body_len in [0, 100, 60_000] {
            let mut out = BytesMut::from(&b"queued"[..]);
            t.encode(&send(body_len), &mut out).expect("fits");
            assert_eq!(&out[..6], b"queued", "earlier bytes untouched");
            let mut expected = BytesMut::from(&b"queued"[..]);
            ws::encode_text(&mut expected, &frame::to_json(&send(body_len)).unwrap());
            assert_eq!(out, expected, "body of {body_len} bytes");
        }
    }

    #[test]
    fn ws_frame_with_an_unnamed_enum_value_cannot_go_to_a_json_client_and_writes_nothing() {
        let mut t = upgraded();
        decode_all(&mut t, &text_message(r#"{"ping":{}}"#));
        let frame = pb::Frame {
            request_id: 0,
            body: Some(Body::Error(pb::Error {
                code: 999,
                ..pb::Error::default()
            })),
        };
        let mut out = BytesMut::from(&b"queued"[..]);
        let err = t.encode(&frame, &mut out).expect_err("999 has no name");
        assert!(matches!(err, TransportError::Unrepresentable(_)));
        assert_eq!(&out[..], b"queued");
        assert!(t.is_open(), "nothing changed");
    }

    #[test]
    fn ws_binary_message_after_text_switches_replies_back_to_binary() {
        let mut t = upgraded();
        decode_all(&mut t, &text_message(r#"{"ping":{}}"#));
        decode_all(&mut t, &binary_message(&ping(1)));
        assert_eq!(t.wire_form(), Some(WireForm::WsBinary));
    }

    #[test]
    fn ws_invalid_json_text_is_a_recoverable_bad_frame_answered_in_json() {
        let mut t = upgraded();
        let mut inbuf = BytesMut::from(&text_message("{not json")[..]);
        inbuf.extend_from_slice(&text_message(r#"{"ping":{"nonce":"1"}}"#));
        let mut out = BytesMut::new();
        let err = t.decode(&mut inbuf, &mut out).expect_err("bad JSON");
        assert!(matches!(
            err,
            TransportError::BadFrame(FrameError::Json { .. })
        ));
        assert!(!err.is_fatal());
        assert_eq!(err.code(), pb::ErrorCode::BadFrame);
        assert!(out.is_empty());
        // The session's answer goes out as JSON text, and the next message still decodes.
        t.encode(&err.to_error_frame(0, false), &mut out).unwrap();
        assert_eq!(server_frame(&out).0, 0x1);
        assert!(matches!(
            t.decode(&mut inbuf, &mut out),
            Ok(Some(Inbound::Frame(_)))
        ));
    }

    #[test]
    fn ws_message_over_the_frame_limit_gets_an_error_frame_then_close_1009() {
        let mut t = Transport::websocket(TransportLimits::new(100));
        let mut inbuf = BytesMut::from(upgrade_request("/", "").as_bytes());
        t.decode(&mut inbuf, &mut BytesMut::new()).unwrap();
        let mut out = BytesMut::new();
        let err = t
            .decode(
                &mut BytesMut::from(&binary_message(&send(150))[..]),
                &mut out,
            )
            .expect_err("too large");
        assert!(matches!(
            err,
            TransportError::FrameTooLarge { max: 100, .. }
        ));
        assert!(err.is_fatal());
        let (opcode, payload, rest) = server_frame(&out);
        assert_eq!(opcode, 0x2);
        let answer = frame::decode(Bytes::copy_from_slice(payload)).unwrap();
        assert_eq!(error_of(&answer).code, pb::ErrorCode::FrameTooLarge as i32);
        let (opcode, payload, rest) = server_frame(rest);
        assert_eq!(opcode, 0x8);
        assert_eq!(payload[..2], 1009u16.to_be_bytes());
        assert!(rest.is_empty());
        assert!(t.is_closed());
    }

    #[test]
    fn ws_json_frame_over_the_frame_limit_is_too_large_even_if_the_text_fits() {
        let mut t = Transport::websocket(TransportLimits {
            max_ws_message_bytes: 10_000,
            ..TransportLimits::new(100)
        });
        let mut inbuf = BytesMut::from(upgrade_request("/", "").as_bytes());
        t.decode(&mut inbuf, &mut BytesMut::new()).unwrap();
        let json = frame::to_json(&send(150)).unwrap();
        let err = t
            .decode(
                &mut BytesMut::from(&text_message(&json)[..]),
                &mut BytesMut::new(),
            )
            .expect_err("too large");
        assert!(matches!(
            err,
            TransportError::FrameTooLarge { max: 100, .. }
        ));
    }

    #[test]
    fn ws_ping_is_answered_with_pong_and_reported_as_liveness() {
        let mut t = upgraded();
        let (items, out) = decode_all(&mut t, &client_frame(0x9, b"hi"));
        assert_eq!(items, vec![Inbound::Liveness]);
        assert_eq!(&out[..], &[0x8a, 2, b'h', b'i']);
    }

    #[test]
    fn ws_pong_is_reported_as_liveness() {
        let mut t = upgraded();
        let (items, out) = decode_all(&mut t, &client_frame(0xa, b""));
        assert_eq!(items, vec![Inbound::Liveness]);
        assert!(out.is_empty());
    }

    #[test]
    fn ws_client_close_is_echoed_and_reported_as_peer_closed() {
        let mut t = upgraded();
        let (items, out) = decode_all(&mut t, &client_frame(0x8, &1000u16.to_be_bytes()));
        assert_eq!(items, vec![Inbound::PeerClosed { code: Some(1000) }]);
        let (opcode, payload, _) = server_frame(&out);
        assert_eq!((opcode, payload), (0x8, &1000u16.to_be_bytes()[..]));
        assert!(t.is_closed());
    }

    #[test]
    fn ws_protocol_error_is_fatal_with_the_close_already_written() {
        let mut t = upgraded();
        let mut out = BytesMut::new();
        // An unmasked binary frame.
        let err = t
            .decode(&mut BytesMut::from(&[0x82, 0x00][..]), &mut out)
            .expect_err("unmasked");
        assert!(matches!(
            err,
            TransportError::WebSocket(WsError::UnmaskedFrame)
        ));
        assert!(err.is_fatal());
        let (opcode, payload, _) = server_frame(&out);
        assert_eq!((opcode, &payload[..2]), (0x8, &1002u16.to_be_bytes()[..]));
        assert!(t.is_closed());
    }

    #[test]
    fn ws_invalid_utf8_text_closes_1007() {
        let mut t = upgraded();
        let mut out = BytesMut::new();
        let err = t
            .decode(
                &mut BytesMut::from(&client_frame(0x1, &[0xff])[..]),
                &mut out,
            )
            .expect_err("not UTF-8");
        assert!(err.is_fatal());
        assert_eq!(server_frame(&out).1[..2], 1007u16.to_be_bytes());
    }

    #[test]
    fn ws_close_writes_a_close_frame_with_the_mapped_code_and_waits_for_the_client() {
        let mut t = upgraded();
        let mut out = BytesMut::new();
        t.close(pb::ErrorCode::ShuttingDown, "", &mut out);
        let (opcode, payload, _) = server_frame(&out);
        assert_eq!(opcode, 0x8);
        assert_eq!(payload[..2], 1001u16.to_be_bytes());
        assert_eq!(&payload[2..], b"SHUTTING_DOWN");
        assert!(!t.is_open() && !t.is_closed());
        let (items, _) = decode_all(&mut t, &client_frame(0x8, &1001u16.to_be_bytes()));
        assert_eq!(items, vec![Inbound::PeerClosed { code: Some(1001) }]);
        assert!(t.is_closed());
    }

    #[test]
    fn ws_close_reason_is_cut_to_fit_a_control_frame() {
        let mut t = upgraded();
        let mut out = BytesMut::new();
        t.close(pb::ErrorCode::Internal, &"é".repeat(100), &mut out);
        let (_, payload, _) = server_frame(&out);
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    // ---- Close codes ---------------------------------------------------------------------

    #[test]
    fn close_code_table_maps_each_error_code_as_documented() {
        use pb::ErrorCode as E;
        let table = [
            (E::Unspecified, 1000),
            (E::ShuttingDown, 1001),
            (E::BadFrame, 1007),
            (E::BadToken, 1008),
            (E::TokenExpired, 1008),
            (E::LoginRequired, 1008),
            (E::LoginTimeout, 1008),
            (E::Forbidden, 1008),
            (E::RateLimited, 1008),
            (E::FrameTooLarge, 1009),
            (E::Internal, 1011),
            (E::StorageFailure, 1011),
            (E::TooManyConnections, 1013),
            (E::SlowConsumer, 1013),
            (E::UnsupportedVersion, 4003),
            (E::Replaced, 4011),
            (E::IdleTimeout, 4012),
            (E::NotFound, 4013),
            (E::InvalidArgument, 4015),
            (E::RetransmitExhausted, 4018),
            (E::UnexpectedFrame, 4019),
        ];
        for (code, close) in table {
            assert_eq!(ws_close_code(code), close, "{code:?}");
        }
    }

    #[test]
    fn every_error_code_maps_to_a_close_code_allowed_on_the_wire() {
        for value in 0..=i32::from(u8::MAX) {
            if let Ok(code) = pb::ErrorCode::try_from(value) {
                assert!(
                    close_code::is_allowed_on_wire(ws_close_code(code)),
                    "{code:?}"
                );
            }
        }
    }

    #[test]
    fn transport_errors_map_to_wire_codes() {
        assert_eq!(
            TransportError::BadLengthPrefix.code(),
            pb::ErrorCode::BadFrame
        );
        assert_eq!(
            TransportError::WebSocket(WsError::MessageTooLarge { size: 9, max: 1 }).code(),
            pb::ErrorCode::FrameTooLarge
        );
        assert_eq!(
            TransportError::BadFrame(FrameError::MissingBody).code(),
            pb::ErrorCode::UnexpectedFrame
        );
        assert_eq!(TransportError::NotOpen.code(), pb::ErrorCode::Internal);
    }
}
