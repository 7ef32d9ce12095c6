//! The server side of WebSocket (RFC 6455), sans-IO: bytes in, events and bytes out.
//!
//! A WebSocket connection goes through two phases, each with its own module:
//!
//! 1. [`handshake`]: the client's HTTP/1.1 upgrade request is parsed incrementally with
//!    [`parse_request`] until it is complete; the server answers with
//!    [`UpgradeRequest::write_accept`] (101 Switching Protocols) or
//!    [`HandshakeError::write_response`] (a 4xx/5xx with `Connection: close`). Bytes after the
//!    request ([`UpgradeRequest::consumed`]) already belong to the frame stream.
//! 2. [`WsConn`] ([`conn`]): the frame stream. [`WsConn::decode`] takes the read buffer and
//!    returns one complete [`Event`] at a time; automatic answers (pong to a ping, the close
//!    reply, the close frame of a protocol error) are written into the caller's outbound buffer.
//!    The server's own messages are written with the encoders of [`frame`]
//!    ([`encode_binary`], [`encode_text`], [`encode_data_header`] for a payload written in place).
//!
//! Layers, bottom up: [`frame`] (one wire frame: header, masking, encoders), [`message`]
//! (fragment reassembly, incremental UTF-8 validation of text, close payloads), [`conn`] (the
//! connection state machine and the close handshake).
//!
//! # Strictness
//!
//! This is a server without extensions, so the decoder enforces every receiver rule of RFC 6455
//! and fails the connection with the status code the RFC (and the Autobahn test suite) expects:
//! 1002 for protocol violations, 1007 for invalid UTF-8, 1009 for a message above the configured
//! limit. See [`WsError`] for the full list and [`frame::FrameHeader::decode`] for the choices the
//! RFC leaves open (non-minimal length encodings are rejected).

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod message;

pub use conn::{ConnState, DEFAULT_MAX_MESSAGE_BYTES, Event, WsConfig, WsConn};
pub use frame::{
    EncodeError, FrameHeader, OpCode, apply_mask, encode_binary, encode_close, encode_data_header,
    encode_ping, encode_pong, encode_text,
};
pub use handshake::{
    DEFAULT_MAX_REQUEST_BYTES, HandshakeError, MAX_HEADERS, UpgradeRequest, accept_key,
    parse_request, write_status_response,
};

/// Close status codes (RFC 6455 section 7.4.1 and the IANA "WebSocket Close Code Number"
/// registry) that this crate sends or names.
pub mod close_code {
    /// 1000: normal closure; the purpose of the connection was fulfilled.
    pub const NORMAL: u16 = 1000;
    /// 1001: the endpoint is going away (server shutting down, browser leaving the page).
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: the peer broke the protocol (bad framing, bad fragmentation, bad close frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1003: the endpoint cannot accept this data type.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// 1007: a text message (or close reason) was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// 1008: the message violates the endpoint's policy (e.g. authentication failed).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// 1009: the message is too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// 1011: the server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// 1012: the service is restarting.
    pub const SERVICE_RESTART: u16 = 1012;
    /// 1013: try again later (temporary overload).
    pub const TRY_AGAIN_LATER: u16 = 1013;

    /// Whether `code` may appear in a Close frame on the wire.
    ///
    /// Allowed: 1000-1003 and 1007-1014 (RFC 6455 section 7.4.1 plus the IANA registrations
    /// 1012-1014), and 3000-4999 (registered libraries and private use). Everything else is
    /// forbidden on the wire: below 1000 (unused), 1004 (reserved), 1005 and 1006 (local-only
    /// "no status" and "abnormal closure"), 1015 (local-only TLS failure), 1016-2999 (reserved
    /// for future RFCs) and 5000 and above.
    pub const fn is_allowed_on_wire(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Everything that makes the server fail a WebSocket connection after the handshake: a broken
/// protocol rule in the client's frames. Each variant has the close code to send
/// ([`WsError::close_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// A client frame without the mask bit (RFC 6455 5.1: the server MUST fail the connection).
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// RSV1, RSV2 or RSV3 is set, but no extension was negotiated (RFC 6455 5.2).
    #[error("reserved bits set without a negotiated extension: {0:#05b}")]
    ReservedBits(u8),
    /// An opcode reserved by RFC 6455 (0x3-0x7, 0xB-0xF).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame (close, ping, pong) without FIN: control frames are never fragmented.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A control frame with a payload longer than 125 bytes.
    #[error("control frame payload of {0} bytes (at most 125)")]
    ControlFrameTooLong(u64),
    /// A 64-bit payload length with its most significant bit set (RFC 6455 5.2).
    #[error("64-bit payload length with the most significant bit set")]
    LengthMsbSet,
    /// A payload length not encoded in the minimal number of bytes (RFC 6455 5.2 "MUST").
    #[error("payload length {0} not minimally encoded")]
    NonMinimalLength(u64),
    /// A continuation frame with no fragmented message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still in progress.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// The (reassembled) message would exceed the configured limit; detected from the frame
    /// header, before the payload is buffered.
    #[error("message of at least {size} bytes exceeds the limit of {max}")]
    MessageTooLarge {
        /// The message size the header announces (fragments so far plus this frame), saturated.
        size: u64,
        /// The configured limit ([`WsConfig::max_message_bytes`]).
        max: usize,
    },
    /// A text message that is not valid UTF-8 (detected at the first invalid fragment).
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A close frame with a 1-byte payload (a status code takes 2 bytes).
    #[error("close frame with a 1-byte payload")]
    CloseFrameTooShort,
    /// A close frame whose status code may not be sent on the wire
    /// ([`close_code::is_allowed_on_wire`]).
    #[error("close code {0} is not allowed on the wire")]
    InvalidCloseCode(u16),
    /// A close frame whose reason is not valid UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl WsError {
    /// The close status code the server sends when it fails the connection for this error:
    /// 1007 for invalid UTF-8, 1009 for an oversized message, 1002 for everything else.
    pub const fn close_code(&self) -> u16 {
        match self {
            WsError::InvalidUtf8 | WsError::InvalidCloseReason => close_code::INVALID_PAYLOAD,
            WsError::MessageTooLarge { .. } => close_code::MESSAGE_TOO_BIG,
            WsError::UnmaskedFrame
            | WsError::ReservedBits(_)
            | WsError::ReservedOpcode(_)
            | WsError::FragmentedControlFrame
            | WsError::ControlFrameTooLong(_)
            | WsError::LengthMsbSet
            | WsError::NonMinimalLength(_)
            | WsError::UnexpectedContinuation
            | WsError::ExpectedContinuation
            | WsError::CloseFrameTooShort
            | WsError::InvalidCloseCode(_) => close_code::PROTOCOL_ERROR,
        }
    }
}

/// The wire code of a WebSocket protocol error, for an `Error` frame sent before the close frame
/// (or for the broker's metrics): `FRAME_TOO_LARGE` for an oversized message, `BAD_FRAME` for
/// every other broken rule.
impl crate::frame::WireError for WsError {
    fn code(&self) -> crate::pb::ErrorCode {
        match self {
            WsError::MessageTooLarge { .. } => crate::pb::ErrorCode::FrameTooLarge,
            _ => crate::pb::ErrorCode::BadFrame,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::WireError as _;
    use crate::pb::ErrorCode;

    #[test]
    fn oversized_message_maps_to_frame_too_large_on_the_wire() {
        let error = WsError::MessageTooLarge {
            size: 70_000,
            max: 66_560,
        };
        assert_eq!(error.code(), ErrorCode::FrameTooLarge);
    }

    #[test]
    fn every_other_protocol_error_maps_to_bad_frame_on_the_wire() {
        for error in [
            WsError::UnmaskedFrame,
            WsError::InvalidUtf8,
            WsError::InvalidCloseCode(1005),
        ] {
            assert_eq!(error.code(), ErrorCode::BadFrame);
        }
    }
}
