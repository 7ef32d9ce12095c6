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
/// Field number of `Frame.send_ack`.
const FRAME_SEND_ACK: u32 = 21;
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

/// Appends `v` as a varint with one copy (writing byte by byte into a `BytesMut` costs a
/// capacity check per byte).
fn put_varint(out: &mut impl BufMut, mut v: u64) {
    let mut b = [0u8; 10];
    let mut i = 0;
    while v >= 0x80 {
        b[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    b[i] = v as u8;
    out.put_slice(&b[..=i]);
}

/// Bytes of a varint field `tag` holding `v` (0 when `v` is 0: proto3 omits defaults).
fn varint_field_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn put_varint_field(out: &mut impl BufMut, tag: u32, v: u64) {
    if v != 0 {
        put_varint(out, u64::from(tag) << 3);
        put_varint(out, v);
    }
}

/// Bytes of a length-delimited field `tag` of `len` bytes (0 when empty).
fn bytes_field_len(tag: u32, len: usize) -> usize {
    if len == 0 { 0 } else { field_len(tag, len) }
}

fn put_bytes_field(out: &mut impl BufMut, tag: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_varint(out, (u64::from(tag) << 3) | 2);
        put_varint(out, bytes.len() as u64);
        out.put_slice(bytes);
    }
}

/// An enum or `int32` as protobuf writes it: negative values sign-extend to 64 bits.
fn int32(v: i32) -> u64 {
    i64::from(v) as u64
}

fn conversation_len(c: &pb::Conversation) -> usize {
    varint_field_len(1, int32(c.r#type)) + bytes_field_len(2, c.id.len())
}

fn put_conversation(out: &mut impl BufMut, c: &pb::Conversation) {
    put_varint_field(out, 1, int32(c.r#type));
    put_bytes_field(out, 2, c.id.as_bytes());
}

/// Appends the protobuf encoding of `Frame{request_id, send_ack}`; returns its length. Equal to
/// prost's encoding of the same frame (checked by the tests), several times cheaper: the ack is
/// the one frame every send gets.
pub fn encode_send_ack(request_id: u64, ack: &pb::SendAck, out: &mut BytesMut) -> usize {
    let conv = ack.conversation.as_ref().map(conversation_len);
    let body = varint_field_len(1, ack.client_msg_id)
        + varint_field_len(2, ack.msg_id)
        + varint_field_len(3, ack.seq)
        + varint_field_len(4, ack.server_time as u64)
        + conv.map_or(0, |l| field_len(5, l))
        + varint_field_len(6, int32(ack.durability));
    let len = request_id_len(request_id) + field_len(FRAME_SEND_ACK, body);
    out.reserve(len);
    put_request_id(request_id, out);
    put_field_header(FRAME_SEND_ACK, body, out);
    put_varint_field(out, 1, ack.client_msg_id);
    put_varint_field(out, 2, ack.msg_id);
    put_varint_field(out, 3, ack.seq);
    put_varint_field(out, 4, ack.server_time as u64);
    if let (Some(c), Some(l)) = (&ack.conversation, conv) {
        put_field_header(5, l, out);
        put_conversation(out, c);
    }
    put_varint_field(out, 6, int32(ack.durability));
    len
}

/// A message to store, by reference: what [`encode_message`] encodes.
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    /// The conversation in its stored form.
    pub conversation: &'a pb::Conversation,
    /// `Message.seq`.
    pub seq: u64,
    /// `Message.msg_id`.
    pub msg_id: u64,
    /// `Message.from_user`.
    pub from_user: &'a str,
    /// `Message.from_device`.
    pub from_device: &'a str,
    /// `Message.client_msg_id`.
    pub client_msg_id: u64,
    /// `Message.content_type`.
    pub content_type: u32,
    /// `Message.body`.
    pub body: &'a [u8],
    /// `Message.server_time`.
    pub server_time: i64,
    /// `Message.kind`.
    pub kind: i32,
    /// `Message.ref_seq`.
    pub ref_seq: u64,
}

/// The protobuf encoding of a `Message` with these fields, byte for byte what prost writes for
/// the same `pb::Message` (checked by the tests), without building one (no strings allocated).
pub fn encode_message(m: &MessageRef<'_>) -> Vec<u8> {
    let conv = conversation_len(m.conversation);
    let len = field_len(1, conv)
        + varint_field_len(2, m.seq)
        + varint_field_len(3, m.msg_id)
        + bytes_field_len(4, m.from_user.len())
        + bytes_field_len(5, m.from_device.len())
        + varint_field_len(6, m.client_msg_id)
        + varint_field_len(7, u64::from(m.content_type))
        + bytes_field_len(8, m.body.len())
        + varint_field_len(9, m.server_time as u64)
        + varint_field_len(10, int32(m.kind))
        + varint_field_len(11, m.ref_seq);
    let mut out = Vec::with_capacity(len);
    put_varint(&mut out, (1 << 3) | 2);
    put_varint(&mut out, conv as u64);
    put_conversation(&mut out, m.conversation);
    put_varint_field(&mut out, 2, m.seq);
    put_varint_field(&mut out, 3, m.msg_id);
    put_bytes_field(&mut out, 4, m.from_user.as_bytes());
    put_bytes_field(&mut out, 5, m.from_device.as_bytes());
    put_varint_field(&mut out, 6, m.client_msg_id);
    put_varint_field(&mut out, 7, u64::from(m.content_type));
    put_bytes_field(&mut out, 8, m.body);
    put_varint_field(&mut out, 9, m.server_time as u64);
    put_varint_field(&mut out, 10, int32(m.kind));
    put_varint_field(&mut out, 11, m.ref_seq);
    debug_assert_eq!(out.len(), len);
    out
}

/// What start-up needs from a stored message, read without decoding it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageHead<'a> {
    /// `Message.conversation.id` (the stored, canonical key).
    pub conversation: &'a str,
    /// `Message.seq`.
    pub seq: u64,
    /// `Message.msg_id`.
    pub msg_id: u64,
    /// `Message.from_user`.
    pub from_user: &'a str,
    /// `Message.from_device`.
    pub from_device: &'a str,
    /// `Message.client_msg_id`.
    pub client_msg_id: u64,
    /// `Message.server_time`.
    pub server_time: i64,
}

/// A cursor over protobuf fields; every read is bounds-checked (bad input gives `None`).
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(b)
    }

    /// The next field: its number and, for varints, the value, for length-delimited fields, the
    /// bytes. Fixed-width fields are skipped over; groups are refused.
    fn next(&mut self) -> Option<Option<(u32, u64, &'a [u8])>> {
        if self.0.is_empty() {
            return Some(None);
        }
        let key = self.varint()?;
        let tag = u32::try_from(key >> 3).ok()?;
        match key & 7 {
            0 => Some(Some((tag, self.varint()?, &[]))),
            1 => {
                self.0 = self.0.get(8..)?;
                Some(Some((tag, 0, &[])))
            }
            2 => {
                let b = self.bytes()?;
                Some(Some((tag, 0, b)))
            }
            5 => {
                self.0 = self.0.get(4..)?;
                Some(Some((tag, 0, &[])))
            }
            _ => None,
        }
    }
}

/// Reads the fields of a stored message that start-up needs (conversation key, seq, ids,
/// sender), skipping the body: several times cheaper than decoding it. `None` if the bytes are
/// not a protobuf message (never panics). Later occurrences of a field win, as in protobuf.
pub fn peek_message(bytes: &[u8]) -> Option<MessageHead<'_>> {
    let mut head = MessageHead::default();
    let mut f = Fields(bytes);
    while let Some((tag, v, b)) = f.next()? {
        match tag {
            1 => {
                let mut c = Fields(b);
                while let Some((ctag, _, cb)) = c.next()? {
                    if ctag == 2 {
                        head.conversation = std::str::from_utf8(cb).ok()?;
                    }
                }
            }
            2 => head.seq = v,
            3 => head.msg_id = v,
            4 => head.from_user = std::str::from_utf8(b).ok()?,
            5 => head.from_device = std::str::from_utf8(b).ok()?,
            6 => head.client_msg_id = v,
            9 => head.server_time = v as i64,
            _ => {}
        }
    }
    Some(head)
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
            event: None,
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
            for durability in [0, 2, -3] {
                let ack = pb::SendAck {
                    client_msg_id: 99,
                    msg_id: u64::MAX - 3,
                    seq: 1 << 40,
                    server_time: -5,
                    conversation: Some(view(id)),
                    durability,
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
    fn a_hand_encoded_message_is_byte_for_byte_prosts() {
        let mut m = stored(7, b"hi");
        for (kind, time, ct) in [(0, 5i64, 0u32), (-1, -9, 7), (2, i64::MAX, u32::MAX)] {
            m.kind = kind;
            m.server_time = time;
            m.content_type = ct;
            let conv = m.conversation.clone().expect("a conversation");
            let r = MessageRef {
                conversation: &conv,
                seq: m.seq,
                msg_id: m.msg_id,
                from_user: &m.from_user,
                from_device: &m.from_device,
                client_msg_id: m.client_msg_id,
                content_type: m.content_type,
                body: &m.body,
                server_time: m.server_time,
                kind: m.kind,
                ref_seq: m.ref_seq,
            };
            assert_eq!(
                encode_message(&r),
                m.encode_to_vec(),
                "kind {kind} time {time}"
            );
        }
        let empty = pb::Message {
            conversation: Some(pb::Conversation::default()),
            ..Default::default()
        };
        let conv = pb::Conversation::default();
        let r = MessageRef {
            conversation: &conv,
            seq: 0,
            msg_id: 0,
            from_user: "",
            from_device: "",
            client_msg_id: 0,
            content_type: 0,
            body: &[],
            server_time: 0,
            kind: 0,
            ref_seq: 0,
        };
        assert_eq!(encode_message(&r), empty.encode_to_vec());
    }

    #[test]
    fn a_peek_reads_what_start_up_needs_and_refuses_garbage() {
        let m = stored(9, b"a body that is skipped");
        let bytes = m.encode_to_vec();
        let h = peek_message(&bytes).expect("a message");
        assert_eq!(
            (h.conversation, h.seq, h.msg_id, h.from_user, h.from_device),
            ("d5:alicebob", 9, 77, "alice", "phone")
        );
        assert_eq!((h.client_msg_id, h.server_time), (9, 1_700_000_000_000));
        for cut in 1..bytes.len() {
            // A cut message is either refused or reads as a prefix; it never panics.
            let _ = peek_message(&bytes[..cut]);
        }
        assert_eq!(peek_message(&[0x0b]), None, "a group is refused");
        assert_eq!(
            peek_message(&[0x0a, 0x05, 0x01]),
            None,
            "a length past the end"
        );
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
