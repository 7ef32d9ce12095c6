//! One [`pb::Frame`] to and from bytes: its protobuf encoding (what TCP, UDP and WebSocket binary
//! messages carry) and its canonical proto3 JSON form (what WebSocket text messages carry).
//!
//! This module knows nothing of framing, i.e. of where a frame ends in a stream or a datagram:
//! that is [`crate::tcp`], [`crate::udp`] and [`crate::ws`]. Those size-check a frame before it
//! gets here, so the functions below take whole frames and no size limit.
//!
//! # Rules
//!
//! * A frame must set one of the `Frame.body` cases this version of the schema knows. A frame
//!   without one is [`FrameError::MissingBody`]. Prost skips unknown fields, so a body case added
//!   by a newer schema arrives as "no body": the schema's evolution rule asks for
//!   `Error{code: UNEXPECTED_FRAME}` in that case, and that is the code of `MissingBody`.
//! * Unknown fields and unknown enum *values* are accepted in the binary form (proto3 enums are
//!   open). The JSON mapping names enum values, so a frame holding an unknown one cannot be
//!   written as JSON ([`FrameError::JsonUnrepresentable`]) and JSON that names an unknown value
//!   is rejected ([`FrameError::Json`]).
//! * Decoding is zero-copy for the payloads: `Send.body` and `Message.body` are `bytes::Bytes`
//!   slices of the buffer given to [`decode`]. Nesting deeper than prost's recursion limit (100)
//!   and JSON deeper than serde_json's (128) are errors, not stack overflows.
//!
//! # Errors and wire codes
//!
//! Every codec error type of this crate implements [`WireError`], whose [`WireError::code`] is
//! the one place a codec error becomes a wire [`pb::ErrorCode`]. [`WireError::to_error_frame`]
//! builds the `Error` frame to send back. Error messages never quote the input (a frame may
//! carry a token, and secrets are never logged).

use bytes::{Bytes, BytesMut};
use prost::Message as _;

use crate::pb;
use crate::pb::frame::Body;

/// A codec error that has a wire error code: implemented by [`FrameError`],
/// [`crate::tcp::TcpFrameError`], [`crate::udp::UdpError`], [`crate::udp::ReplayError`] (and the
/// WebSocket errors), so a caller maps any of them to the peer's `Error` frame the same way.
pub trait WireError: std::error::Error {
    /// The wire code that tells the peer what went wrong.
    fn code(&self) -> pb::ErrorCode;

    /// The `Error` frame that answers this error: the error's [`code`](Self::code), its message
    /// (which never quotes the input), `fatal` as given and the request's `request_id` (0 if the
    /// error is not an answer to a particular frame).
    fn to_error_frame(&self, request_id: u64, fatal: bool) -> pb::Frame {
        pb::Frame {
            request_id,
            body: Some(Body::Error(pb::Error {
                code: self.code() as i32,
                message: self.to_string(),
                fatal,
                ..pb::Error::default()
            })),
        }
    }
}

/// Why bytes (or JSON) are not a frame, or a frame cannot be written as JSON.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The bytes are not the protobuf encoding of a `Frame`: a field is cut off, has a bad wire
    /// type, a string is not UTF-8, nesting is too deep, and so on.
    #[error("bad frame: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// The frame sets no `Frame.body` case this schema knows: none at all, or one added by a
    /// newer schema (indistinguishable once decoded, as unknown fields are skipped).
    #[error("frame has no body this receiver knows")]
    MissingBody,
    /// The bytes are not the canonical proto3 JSON form of a `Frame`: bad JSON syntax, a field
    /// with an unknown name or the wrong type, a number out of range, an unknown enum name, bad
    /// base64, trailing characters, and so on.
    #[error("bad JSON frame: {reason}")]
    Json {
        /// What is wrong and where (line and column), without quoting the input.
        reason: String,
    },
    /// The frame cannot be written as proto3 JSON: it holds an enum value this schema does not
    /// name (possible in a frame decoded from protobuf, where enums are open).
    #[error("frame cannot be written as JSON: {reason}")]
    JsonUnrepresentable {
        /// Which value could not be written.
        reason: String,
    },
}

impl FrameError {
    /// The wire code for this error: `BAD_FRAME` for undecodable bytes or JSON,
    /// `UNEXPECTED_FRAME` for a missing (or unknown) body, `INTERNAL` for a frame this side
    /// cannot write as JSON.
    pub fn error_code(&self) -> pb::ErrorCode {
        match self {
            FrameError::Protobuf(_) | FrameError::Json { .. } => pb::ErrorCode::BadFrame,
            FrameError::MissingBody => pb::ErrorCode::UnexpectedFrame,
            FrameError::JsonUnrepresentable { .. } => pb::ErrorCode::Internal,
        }
    }

    /// A decode error from serde_json, described without quoting the input: serde's messages
    /// for data errors ("invalid type: string \"...\"") may contain a token.
    fn from_json_decode(err: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        let reason = match err.classify() {
            // Syntax and end-of-input messages describe the grammar, never the input's values.
            Category::Syntax | Category::Eof | Category::Io => err.to_string(),
            Category::Data => format!(
                "a field has an unknown name, the wrong type or an out-of-range or unknown \
                 value at line {} column {}",
                err.line(),
                err.column()
            ),
        };
        FrameError::Json { reason }
    }
}

impl WireError for FrameError {
    fn code(&self) -> pb::ErrorCode {
        self.error_code()
    }
}

/// The length of `frame`'s protobuf encoding, i.e. what [`encode`] appends.
pub fn encoded_len(frame: &pb::Frame) -> usize {
    frame.encoded_len()
}

/// Appends the protobuf encoding of `frame` to `out` (no length prefix), reserving the space once.
///
/// A frame without a body encodes fine but is refused by [`decode`]; senders always set one.
pub fn encode(frame: &pb::Frame, out: &mut BytesMut) {
    let len = frame.encoded_len();
    out.reserve(len);
    let before = out.len();
    // `BytesMut` grows on demand (its `remaining_mut` is `usize::MAX - len`), so prost's only
    // error, "buffer too small", cannot happen.
    let result = frame.encode(out);
    debug_assert!(
        result.is_ok(),
        "encoding into a BytesMut cannot run out of space"
    );
    debug_assert_eq!(out.len() - before, len, "prost wrote encoded_len bytes");
}

/// Decodes one frame from its whole protobuf encoding (no length prefix).
///
/// Zero-copy: `Send.body` and `Message.body` of the result are slices of `bytes`.
///
/// # Errors
///
/// [`FrameError::Protobuf`] if the bytes are not a `Frame`, [`FrameError::MissingBody`] if the
/// frame sets no body case this schema knows.
pub fn decode(bytes: Bytes) -> Result<pb::Frame, FrameError> {
    let frame = pb::Frame::decode(bytes)?;
    require_body(frame)
}

/// The canonical proto3 JSON form of `frame` (lowerCamelCase names, `bytes` as base64, 64-bit
/// integers as strings, default values omitted).
///
/// # Errors
///
/// [`FrameError::JsonUnrepresentable`] if the frame holds an enum value this schema does not
/// name.
pub fn to_json(frame: &pb::Frame) -> Result<String, FrameError> {
    serde_json::to_string(frame).map_err(|e| FrameError::JsonUnrepresentable {
        reason: e.to_string(),
    })
}

/// Appends the canonical proto3 JSON form of `frame` to `out` (see [`to_json`]).
///
/// # Errors
///
/// As [`to_json`]; `out` is then left as it was.
pub fn to_json_into(frame: &pb::Frame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let before = out.len();
    serde_json::to_writer(&mut *out, frame).map_err(|e| {
        out.truncate(before);
        FrameError::JsonUnrepresentable {
            reason: e.to_string(),
        }
    })
}

/// Decodes one frame from its proto3 JSON form. Accepts what the proto3 JSON mapping accepts
/// (field names in lowerCamelCase or as declared, enums by name or number, 64-bit integers as
/// strings or numbers); whitespace may surround the object, nothing else may.
///
/// # Errors
///
/// [`FrameError::Json`] if the bytes are not such JSON, [`FrameError::MissingBody`] if the
/// frame sets no body.
pub fn from_json(json: &[u8]) -> Result<pb::Frame, FrameError> {
    let frame: pb::Frame =
        serde_json::from_slice(json).map_err(|e| FrameError::from_json_decode(&e))?;
    require_body(frame)
}

/// The name of the frame's body case as written in the schema (`"send"`, `"deliver_ack"`, ...),
/// or `"none"`: for errors and logs.
pub fn body_name(frame: &pb::Frame) -> &'static str {
    let Some(body) = &frame.body else {
        return "none";
    };
    match body {
        Body::Login(_) => "login",
        Body::LoginResult(_) => "login_result",
        Body::Error(_) => "error",
        Body::Ping(_) => "ping",
        Body::Pong(_) => "pong",
        Body::Send(_) => "send",
        Body::SendAck(_) => "send_ack",
        Body::Deliver(_) => "deliver",
        Body::DeliverAck(_) => "deliver_ack",
        Body::Behind(_) => "behind",
        Body::SyncRequest(_) => "sync_request",
        Body::SyncSummary(_) => "sync_summary",
        Body::SyncPage(_) => "sync_page",
        Body::HistoryRequest(_) => "history_request",
        Body::HistoryPage(_) => "history_page",
        Body::PresenceRequest(_) => "presence_request",
        Body::PresenceUpdate(_) => "presence_update",
        Body::GroupRequest(_) => "group_request",
        Body::GroupResult(_) => "group_result",
        Body::RoomRequest(_) => "room_request",
        Body::RoomResult(_) => "room_result",
        Body::RoomLag(_) => "room_lag",
        Body::Receipt(_) => "receipt",
        Body::ConversationListRequest(_) => "conversation_list_request",
        Body::ConversationList(_) => "conversation_list",
        Body::ReadCountsRequest(_) => "read_counts_request",
        Body::ReadCounts(_) => "read_counts",
        Body::Typing(_) => "typing",
    }
}

fn require_body(frame: pb::Frame) -> Result<pb::Frame, FrameError> {
    if frame.body.is_none() {
        return Err(FrameError::MissingBody);
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_frame(body: &'static [u8]) -> pb::Frame {
        pb::Frame {
            request_id: 7,
            body: Some(Body::Send(pb::Send {
                to: Some(pb::Conversation {
                    r#type: pb::ConversationType::Direct as i32,
                    id: "bob".into(),
                }),
                client_msg_id: 42,
                content_type: 1,
                body: Bytes::from_static(body),
                kind: pb::MessageKind::Normal as i32,
                ref_seq: 0,
            })),
        }
    }

    fn encoded(frame: &pb::Frame) -> Bytes {
        let mut out = BytesMut::new();
        encode(frame, &mut out);
        out.freeze()
    }

    #[test]
    fn encode_appends_exactly_encoded_len_bytes_after_existing_content() {
        let frame = send_frame(b"hello");
        let mut out = BytesMut::from(&b"xyz"[..]);
        encode(&frame, &mut out);
        assert_eq!(out.len(), 3 + encoded_len(&frame));
        assert_eq!(&out[..3], b"xyz");
    }

    #[test]
    fn decode_returns_the_encoded_frame() {
        let frame = send_frame(b"hello");
        assert_eq!(decode(encoded(&frame)).expect("decodes"), frame);
    }

    #[test]
    fn decoded_body_borrows_the_input_buffer() {
        let bytes = encoded(&send_frame(b"a payload that must not be copied"));
        let range = bytes.as_ptr_range();
        let Some(Body::Send(send)) = decode(bytes.clone()).expect("decodes").body else {
            panic!("expected a send");
        };
        assert!(
            range.contains(&send.body.as_ptr()),
            "body points into the input"
        );
    }

    #[test]
    fn frame_without_body_is_missing_body() {
        let frame = pb::Frame {
            request_id: 1,
            body: None,
        };
        assert!(matches!(
            decode(encoded(&frame)),
            Err(FrameError::MissingBody)
        ));
    }

    #[test]
    fn empty_bytes_are_missing_body() {
        assert!(matches!(decode(Bytes::new()), Err(FrameError::MissingBody)));
    }

    #[test]
    fn unknown_body_case_is_missing_body_answered_with_unexpected_frame() {
        // Field 99, wire type 2 (length-delimited), 0 bytes: a body case from a newer schema.
        let err =
            decode(Bytes::from_static(&[0x08, 0x05, 0x9a, 0x06, 0x00])).expect_err("no known body");
        assert!(matches!(err, FrameError::MissingBody));
        assert_eq!(err.code(), pb::ErrorCode::UnexpectedFrame);
    }

    #[test]
    fn truncated_protobuf_is_bad_frame() {
        let bytes = encoded(&send_frame(b"hello"));
        let err = decode(bytes.slice(..bytes.len() - 1)).expect_err("cut off");
        assert!(matches!(err, FrameError::Protobuf(_)));
        assert_eq!(err.code(), pb::ErrorCode::BadFrame);
    }

    #[test]
    fn invalid_utf8_in_a_string_is_bad_frame() {
        // body case `behind` (field 24, wire type 2) holding Behind{reason (field 1) = 0xff}.
        let bytes = Bytes::from_static(&[0xc2, 0x01, 0x03, 0x0a, 0x01, 0xff]);
        assert!(matches!(decode(bytes), Err(FrameError::Protobuf(_))));
    }

    #[test]
    fn unknown_enum_value_survives_protobuf_round_trip() {
        let frame = pb::Frame {
            request_id: 0,
            body: Some(Body::Error(pb::Error {
                code: 999,
                ..pb::Error::default()
            })),
        };
        assert_eq!(decode(encoded(&frame)).expect("decodes"), frame);
    }

    #[test]
    fn json_uses_camel_case_base64_and_string_int64() {
        let json = to_json(&send_frame(b"hi")).expect("representable");
        assert_eq!(
            json,
            r#"{"requestId":"7","send":{"to":{"type":"DIRECT","id":"bob"},"clientMsgId":"42","contentType":1,"body":"aGk="}}"#
        );
    }

    #[test]
    fn json_round_trips() {
        let frame = send_frame(b"\x00\xffbinary");
        let json = to_json(&frame).expect("representable");
        assert_eq!(from_json(json.as_bytes()).expect("parses"), frame);
    }

    #[test]
    fn to_json_into_appends_the_same_text_as_to_json() {
        let frame = send_frame(b"hi");
        let mut out = b"prefix:".to_vec();
        to_json_into(&frame, &mut out).expect("representable");
        let json = to_json(&frame).expect("representable");
        assert_eq!(out, [&b"prefix:"[..], json.as_bytes()].concat());
    }

    #[test]
    fn from_json_accepts_proto_field_names_and_numeric_int64() {
        let frame = from_json(br#" {"request_id": 7, "ping": {"nonce": 9}} "#).expect("parses");
        assert_eq!(frame.request_id, 7);
        assert_eq!(frame.body, Some(Body::Ping(pb::Ping { nonce: 9 })));
    }

    #[test]
    fn json_without_body_is_missing_body() {
        assert!(matches!(
            from_json(br#"{"requestId":"1"}"#),
            Err(FrameError::MissingBody)
        ));
    }

    #[test]
    fn json_with_two_bodies_is_bad_json() {
        let err = from_json(br#"{"ping":{},"pong":{}}"#).expect_err("two bodies");
        assert!(matches!(err, FrameError::Json { .. }));
        assert_eq!(err.code(), pb::ErrorCode::BadFrame);
    }

    #[test]
    fn json_with_trailing_characters_is_bad_json() {
        assert!(matches!(
            from_json(br#"{"ping":{}} x"#),
            Err(FrameError::Json { .. })
        ));
    }

    #[test]
    fn json_unknown_fields_are_ignored_like_in_protobuf() {
        let f = from_json(
            br#"{"requestId":"7","ping":{"nonce":"5","fromTheFuture":1},"newField":true}"#,
        )
        .expect("unknown fields are ignored");
        assert_eq!(f.request_id, 7);
        assert_eq!(body_name(&f), "ping");
    }

    #[test]
    fn json_unknown_body_is_unexpected_frame() {
        let e = from_json(br#"{"requestId":"7","bodyFromANewerSchema":{}}"#)
            .expect_err("no body it knows");
        assert_eq!(e.error_code(), pb::ErrorCode::UnexpectedFrame);
    }

    #[test]
    fn json_error_does_not_quote_the_input() {
        let err = from_json(br#"{"login":"secret-token-value"}"#).expect_err("wrong type");
        assert!(!err.to_string().contains("secret-token-value"), "{err}");
    }

    #[test]
    fn json_nesting_beyond_the_limit_is_an_error_not_a_stack_overflow() {
        let json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            from_json(json.as_bytes()),
            Err(FrameError::Json { .. })
        ));
    }

    #[test]
    fn unknown_enum_value_is_not_representable_as_json_and_leaves_output_untouched() {
        let frame = pb::Frame {
            request_id: 0,
            body: Some(Body::Error(pb::Error {
                code: 999,
                ..pb::Error::default()
            })),
        };
        let mut out = b"keep".to_vec();
        let err = to_json_into(&frame, &mut out).expect_err("unknown enum value");
        assert!(matches!(err, FrameError::JsonUnrepresentable { .. }));
        assert_eq!(out, b"keep");
    }

    #[test]
    fn body_name_is_the_schema_field_name() {
        assert_eq!(body_name(&send_frame(b"")), "send");
        assert_eq!(
            body_name(&pb::Frame {
                request_id: 0,
                body: Some(Body::DeliverAck(pb::DeliverAck::default())),
            }),
            "deliver_ack"
        );
        assert_eq!(body_name(&pb::Frame::default()), "none");
    }

    #[test]
    fn error_frame_carries_code_message_fatal_and_request_id() {
        let frame = FrameError::MissingBody.to_error_frame(5, true);
        assert_eq!(frame.request_id, 5);
        let Some(Body::Error(error)) = frame.body else {
            panic!("expected an error body");
        };
        assert_eq!(error.code, pb::ErrorCode::UnexpectedFrame as i32);
        assert!(error.fatal);
        assert_eq!(error.message, FrameError::MissingBody.to_string());
    }
}
