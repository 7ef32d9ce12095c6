//! Frames built around messages that are already encoded: the broker encodes a stored message
//! once, and every `Deliver`, `SyncPage` and `HistoryPage` that carries it copies those bytes in
//! instead of encoding the message again.
//!
//! A stored message is a protobuf `Message` whose `conversation` names the conversation in its
//! stored (canonical) form. Each receiver must see its *own* view of the conversation (for a
//! direct conversation, the other user). Protobuf merges repeated occurrences of an embedded
//! message field and lets the last occurrence of a scalar win, so the view is spliced **after**
//! the stored bytes as one more `conversation` field ([`view_field`]): every conforming decoder
//! reads `stored ++ view` as the stored message with the receiver's view. The proto3 JSON form
//! is made by decoding those bytes, so it shows the same.
//!
//! Everything here writes plain protobuf; the transport adds its own framing around the result
//! (a TCP length prefix, a WebSocket header).

use bytes::{BufMut, BytesMut};
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::pb;

/// Field number of `Frame.request_id`.
const FRAME_REQUEST_ID: u32 = 1;
/// Field number of `Frame.deliver`.
const FRAME_DELIVER: u32 = 22;
/// Field number of `Frame.sync_page`.
const FRAME_SYNC_PAGE: u32 = 32;
/// Field number of `Frame.history_page`.
const FRAME_HISTORY_PAGE: u32 = 34;
/// Field number of `Message.conversation`.
const MESSAGE_CONVERSATION: u32 = 1;

/// One message to splice: its stored bytes, then the receiver's view field.
#[derive(Debug, Clone, Copy)]
pub struct Spliced<'a> {
    /// The stored message's protobuf encoding.
    pub stored: &'a [u8],
    /// The receiver's view as made by [`view_field`] (empty: the stored conversation stands).
    pub view: &'a [u8],
}

impl Spliced<'_> {
    /// Length of the spliced message's bytes.
    pub fn len(&self) -> usize {
        self.stored.len() + self.view.len()
    }

    /// Whether the message has no bytes at all (a default `Message`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bytes of one `Message.conversation` field holding `view`: appended after a stored message,
/// they replace its conversation for the receiver.
pub fn view_field(view: &pb::Conversation) -> Vec<u8> {
    let inner = view.encoded_len();
    let mut out = Vec::with_capacity(key_len(MESSAGE_CONVERSATION) + 10 + inner);
    encode_key(MESSAGE_CONVERSATION, WireType::LengthDelimited, &mut out);
    encode_varint(inner as u64, &mut out);
    view.encode_raw(&mut out);
    out
}

/// Bytes a length-delimited field of `len` bytes takes with its key.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_field_header(tag: u32, len: usize, out: &mut BytesMut) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

/// Bytes the repeated `messages` field (number `tag`) takes.
fn messages_len(tag: u32, messages: &[Spliced<'_>]) -> usize {
    messages.iter().map(|m| field_len(tag, m.len())).sum()
}

fn put_messages(tag: u32, messages: &[Spliced<'_>], out: &mut BytesMut) {
    for m in messages {
        put_field_header(tag, m.len(), out);
        out.put_slice(m.stored);
        out.put_slice(m.view);
    }
}

fn request_id_len(request_id: u64) -> usize {
    if request_id == 0 {
        0
    } else {
        key_len(FRAME_REQUEST_ID) + encoded_len_varint(request_id)
    }
}

fn put_request_id(request_id: u64, out: &mut BytesMut) {
    if request_id != 0 {
        encode_key(FRAME_REQUEST_ID, WireType::Varint, out);
        encode_varint(request_id, out);
    }
}

fn bool_len(tag: u32, v: bool) -> usize {
    if v { key_len(tag) + 1 } else { 0 }
}

fn put_bool(tag: u32, v: bool, out: &mut BytesMut) {
    if v {
        encode_key(tag, WireType::Varint, out);
        out.put_u8(1);
    }
}

fn u64_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn put_u64(tag: u32, v: u64, out: &mut BytesMut) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

/// Appends the protobuf encoding of `Frame{request_id, deliver: Deliver{messages}}`; returns its
/// length.
pub fn encode_deliver(request_id: u64, messages: &[Spliced<'_>], out: &mut BytesMut) -> usize {
    let body = messages_len(1, messages);
    let len = request_id_len(request_id) + field_len(FRAME_DELIVER, body);
    out.reserve(len);
    put_request_id(request_id, out);
    put_field_header(FRAME_DELIVER, body, out);
    put_messages(1, messages, out);
    len
}

/// Appends the protobuf encoding of `Frame{request_id, sync_page: SyncPage{messages, done}}`;
/// returns its length.
pub fn encode_sync_page(
    request_id: u64,
    messages: &[Spliced<'_>],
    done: bool,
    out: &mut BytesMut,
) -> usize {
    let body = messages_len(1, messages) + bool_len(2, done);
    let len = request_id_len(request_id) + field_len(FRAME_SYNC_PAGE, body);
    out.reserve(len);
    put_request_id(request_id, out);
    put_field_header(FRAME_SYNC_PAGE, body, out);
    put_messages(1, messages, out);
    put_bool(2, done, out);
    len
}

/// What a history page says besides its messages.
#[derive(Debug, Clone, Copy)]
pub struct HistoryPageHead<'a> {
    /// The conversation as the requester named it.
    pub conversation: &'a pb::Conversation,
    /// More messages exist in the direction asked.
    pub more: bool,
    /// Lowest seq still stored.
    pub first_seq: u64,
    /// Highest seq stored.
    pub last_seq: u64,
}

/// Appends the protobuf encoding of `Frame{request_id, history_page: HistoryPage{...}}`; returns
/// its length.
pub fn encode_history_page(
    request_id: u64,
    head: HistoryPageHead<'_>,
    messages: &[Spliced<'_>],
    out: &mut BytesMut,
) -> usize {
    let conv_len = head.conversation.encoded_len();
    let body = field_len(1, conv_len)
        + messages_len(2, messages)
        + bool_len(3, head.more)
        + u64_len(4, head.first_seq)
        + u64_len(5, head.last_seq);
    let len = request_id_len(request_id) + field_len(FRAME_HISTORY_PAGE, body);
    out.reserve(len);
    put_request_id(request_id, out);
    put_field_header(FRAME_HISTORY_PAGE, body, out);
    put_field_header(1, conv_len, out);
    head.conversation.encode_raw(out);
    put_messages(2, messages, out);
    put_bool(3, head.more, out);
    put_u64(4, head.first_seq, out);
    put_u64(5, head.last_seq, out);
    len
}

/// Field number of `Frame.send_ack`.
const FRAME_SEND_ACK: u32 = 21;

/// A small protobuf writer into a stack buffer: fields are appended with one bounds check each
/// and copied out once (writing byte by byte into a `BytesMut` costs a capacity check per byte).
struct Small {
    buf: [u8; 512],
    len: usize,
}

impl Small {
    fn new() -> Self {
        Small {
            buf: [0; 512],
            len: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn varint(&mut self, mut v: u64) -> bool {
        if self.len + 10 > self.buf.len() {
            return false;
        }
        while v >= 0x80 {
            self.buf[self.len] = (v as u8) | 0x80;
            self.len += 1;
            v >>= 7;
        }
        self.buf[self.len] = v as u8;
        self.len += 1;
        true
    }

    fn key(&mut self, tag: u32, wire: u64) -> bool {
        self.varint((u64::from(tag) << 3) | wire)
    }

    fn u64_field(&mut self, tag: u32, v: u64) -> bool {
        v == 0 || (self.key(tag, 0) && self.varint(v))
    }

    fn slice(&mut self, s: &[u8]) -> bool {
        if self.len + s.len() > self.buf.len() {
            return false;
        }
        self.buf[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
        true
    }

    fn bytes_field(&mut self, tag: u32, s: &[u8]) -> bool {
        s.is_empty() || (self.key(tag, 2) && self.varint(s.len() as u64) && self.slice(s))
    }
}

/// Appends the protobuf encoding of `Frame{request_id, send_ack}`; returns its length. Equal to
/// prost's encoding of the same frame (checked by the tests), several times cheaper: the ack is
/// the one frame every send gets.
pub fn encode_send_ack(request_id: u64, ack: &pb::SendAck, out: &mut BytesMut) -> usize {
    let mut conv = Small::new();
    let mut body = Small::new();
    let mut ok = true;
    if let Some(c) = &ack.conversation {
        ok &= conv.u64_field(1, c.r#type as u64);
        ok &= conv.bytes_field(2, c.id.as_bytes());
    }
    ok &= body.u64_field(1, ack.client_msg_id);
    ok &= body.u64_field(2, ack.msg_id);
    ok &= body.u64_field(3, ack.seq);
    ok &= body.u64_field(4, ack.server_time as u64);
    if ack.conversation.is_some() {
        ok &= body.key(5, 2) && body.varint(conv.len as u64) && body.slice(conv.bytes());
    }
    ok &= body.u64_field(6, ack.durability as u64);
    let mut head = Small::new();
    ok &= head.u64_field(FRAME_REQUEST_ID, request_id);
    ok &= head.key(FRAME_SEND_ACK, 2) && head.varint(body.len as u64);
    if !ok {
        // Larger than the stack buffers (a conversation id far over the limit): prost.
        let frame = pb::Frame {
            request_id,
            body: Some(pb::frame::Body::SendAck(ack.clone())),
        };
        let len = frame.encoded_len();
        frame.encode_raw(out);
        return len;
    }
    out.reserve(head.len + body.len);
    out.put_slice(head.bytes());
    out.put_slice(body.bytes());
    head.len + body.len
}

/// Bytes a spliced message adds to a page or `Deliver` beyond its own bytes (its field key and
/// length), at most.
pub const PER_MESSAGE_OVERHEAD: usize = 6;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::pb::frame::Body;

    fn stored(seq: u64, body: &[u8]) -> pb::Message {
        pb::Message {
            conversation: Some(pb::Conversation {
                r#type: pb::ConversationType::Direct as i32,
                id: "d5:alicebob".into(),
            }),
            seq,
            msg_id: 77,
            from_user: "alice".into(),
            from_device: "phone".into(),
            client_msg_id: 9,
            content_type: 1,
            body: bytes::Bytes::copy_from_slice(body),
            server_time: 1_700_000_000_000,
            kind: 0,
            ref_seq: 0,
        }
    }

    fn view(id: &str) -> pb::Conversation {
        pb::Conversation {
            r#type: pb::ConversationType::Direct as i32,
            id: id.into(),
        }
    }

    #[test]
    fn a_spliced_deliver_decodes_as_the_message_in_the_receivers_view() {
        let m = stored(3, b"hello");
        let bytes = m.encode_to_vec();
        let v = view_field(&view("alice"));
        let mut out = BytesMut::new();
        let len = encode_deliver(
            0,
            &[Spliced {
                stored: &bytes,
                view: &v,
            }],
            &mut out,
        );
        assert_eq!(len, out.len());
        let frame = pb::Frame::decode(&out[..]).unwrap();
        let mut want = m.clone();
        want.conversation = Some(view("alice"));
        assert_eq!(
            frame,
            pb::Frame {
                request_id: 0,
                body: Some(Body::Deliver(pb::Deliver {
                    messages: vec![want]
                })),
            }
        );
    }

    #[test]
    fn spliced_pages_equal_the_frames_built_field_by_field() {
        let ms: Vec<pb::Message> = (1..=3).map(|s| stored(s, &[s as u8; 200])).collect();
        let enc: Vec<Vec<u8>> = ms.iter().map(|m| m.encode_to_vec()).collect();
        let v = view_field(&view("bob"));
        let spliced: Vec<Spliced<'_>> = enc
            .iter()
            .map(|b| Spliced {
                stored: b,
                view: &v,
            })
            .collect();
        let viewed: Vec<pb::Message> = ms
            .iter()
            .cloned()
            .map(|mut m| {
                m.conversation = Some(view("bob"));
                m
            })
            .collect();

        let mut out = BytesMut::new();
        encode_sync_page(300, &spliced, true, &mut out);
        let want = pb::Frame {
            request_id: 300,
            body: Some(Body::SyncPage(pb::SyncPage {
                messages: viewed.clone(),
                done: true,
            })),
        };
        assert_eq!(pb::Frame::decode(&out[..]).unwrap(), want);

        let mut out = BytesMut::new();
        let head = HistoryPageHead {
            conversation: &view("bob"),
            more: true,
            first_seq: 1,
            last_seq: 3,
        };
        encode_history_page(5, head, &spliced, &mut out);
        let want = pb::Frame {
            request_id: 5,
            body: Some(Body::HistoryPage(pb::HistoryPage {
                conversation: Some(view("bob")),
                messages: viewed,
                more: true,
                first_seq: 1,
                last_seq: 3,
            })),
        };
        assert_eq!(pb::Frame::decode(&out[..]).unwrap(), want);
    }

    #[test]
    fn a_hand_encoded_send_ack_is_byte_for_byte_prosts() {
        for (rid, id) in [(0u64, "bob"), (7, ""), (u64::MAX, &"x".repeat(300)[..])] {
            let ack = pb::SendAck {
                client_msg_id: 99,
                msg_id: u64::MAX - 3,
                seq: 1 << 40,
                server_time: -5,
                conversation: Some(view(id)),
                durability: pb::Durability::Disk as i32,
            };
            let frame = pb::Frame {
                request_id: rid,
                body: Some(Body::SendAck(ack.clone())),
            };
            let mut out = BytesMut::new();
            let len = encode_send_ack(rid, &ack, &mut out);
            assert_eq!(
                &out[..],
                &frame.encode_to_vec()[..],
                "request {rid}, id {id:?}"
            );
            assert_eq!(len, out.len());
        }
        let bare = pb::SendAck::default();
        let mut out = BytesMut::new();
        encode_send_ack(0, &bare, &mut out);
        let want = pb::Frame {
            request_id: 0,
            body: Some(Body::SendAck(bare)),
        };
        assert_eq!(&out[..], &want.encode_to_vec()[..]);
    }

    #[test]
    fn an_empty_view_keeps_the_stored_conversation() {
        let m = stored(1, b"x");
        let bytes = m.encode_to_vec();
        let mut out = BytesMut::new();
        encode_sync_page(
            0,
            &[Spliced {
                stored: &bytes,
                view: &[],
            }],
            false,
            &mut out,
        );
        let Some(Body::SyncPage(p)) = pb::Frame::decode(&out[..]).unwrap().body else {
            panic!("a sync page");
        };
        assert_eq!(p.messages, vec![m]);
    }
}
