//! Shared inputs for the benchmarks: representative frames and records, and the client-side
//! masking that the server-side WebSocket codec expects.

use bytes::{BufMut, Bytes, BytesMut};
use parley_proto::pb;

/// A body of `size` bytes with a recognisable pattern.
pub fn body(size: usize) -> Bytes {
    (0..size)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A direct conversation as a client names it.
pub fn direct(peer: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Direct as i32,
        id: peer.to_owned(),
    }
}

/// What a client sends most: a `Send` with a `size`-byte body.
pub fn send_frame(size: usize) -> pb::Frame {
    pb::Frame {
        request_id: 42,
        body: Some(pb::frame::Body::Send(pb::Send {
            to: Some(direct("bob-000123")),
            client_msg_id: 0x0123_4567_89ab_cdef,
            content_type: 1,
            body: body(size),
            kind: pb::MessageKind::Normal as i32,
            ref_seq: 0,
        })),
    }
}

/// What the broker sends most: a `Deliver` of one message with a `size`-byte body.
pub fn deliver_frame(size: usize) -> pb::Frame {
    pb::Frame {
        request_id: 0,
        body: Some(pb::frame::Body::Deliver(pb::Deliver {
            messages: vec![pb::Message {
                conversation: Some(direct("alice-000042")),
                seq: 1_234_567,
                msg_id: 0x0190_0000_0000_1234,
                from_user: "alice-000042".to_owned(),
                from_device: "phone".to_owned(),
                client_msg_id: 0x0123_4567_89ab_cdef,
                content_type: 1,
                body: body(size),
                server_time: 1_800_000_000_000,
                kind: pb::MessageKind::Normal as i32,
                ref_seq: 0,
                event: None,
            }],
        })),
    }
}

/// Appends `payload` as one masked, unfragmented binary WebSocket frame, as a client sends it
/// (RFC 6455 5.2, 5.3). `seed` varies the masking key.
pub fn masked_client_message(payload: &[u8], seed: u32, out: &mut BytesMut) {
    let key = seed.wrapping_mul(0x9E37_79B9).to_be_bytes();
    out.put_u8(0x80 | 0x2);
    let len = payload.len();
    if len < 126 {
        out.put_u8(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.put_u8(0x80 | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(len as u64);
    }
    out.put_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
}
