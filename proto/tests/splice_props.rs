//! Property tests of the frames built around pre-encoded messages (`parley_proto::splice`): the
//! hand-written encoders write what prost writes, spliced frames decode as the message in the
//! receiver's view, and the start-up peek reads what was encoded and never panics.

use bytes::{Bytes, BytesMut};
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_proto::splice::{self, MessageRef, Spliced};
use proptest::prelude::*;
use prost::Message as _;

fn conversation() -> impl Strategy<Value = pb::Conversation> {
    (-2i32..5, "\\PC{0,40}").prop_map(|(t, id)| pb::Conversation { r#type: t, id })
}

fn message() -> impl Strategy<Value = pb::Message> {
    (
        conversation(),
        any::<u64>(),
        any::<u64>(),
        "\\PC{0,20}",
        "\\PC{0,20}",
        any::<u64>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..300),
        any::<i64>(),
        -3i32..5,
        any::<u64>(),
    )
        .prop_map(
            |(c, seq, msg_id, user, device, cmid, ct, body, time, kind, ref_seq)| pb::Message {
                conversation: Some(c),
                seq,
                msg_id,
                from_user: user,
                from_device: device,
                client_msg_id: cmid,
                content_type: ct,
                body: Bytes::from(body),
                server_time: time,
                kind,
                ref_seq,
                event: None,
            },
        )
}

fn as_ref<'a>(m: &'a pb::Message, c: &'a pb::Conversation) -> MessageRef<'a> {
    MessageRef {
        conversation: c,
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
    }
}

proptest! {
    #[test]
    fn a_hand_encoded_message_is_what_prost_writes(m in message()) {
        let c = m.conversation.clone().unwrap_or_default();
        prop_assert_eq!(splice::encode_message(&as_ref(&m, &c)), m.encode_to_vec());
    }

    #[test]
    fn a_hand_encoded_send_ack_is_what_prost_writes(
        rid in any::<u64>(),
        cmid in any::<u64>(),
        id in any::<u64>(),
        seq in any::<u64>(),
        time in any::<i64>(),
        c in proptest::option::of(conversation()),
        d in -2i32..4,
    ) {
        let ack = pb::SendAck {
            client_msg_id: cmid,
            msg_id: id,
            seq,
            server_time: time,
            conversation: c,
            durability: d,
        };
        let frame = pb::Frame { request_id: rid, body: Some(Body::SendAck(ack.clone())) };
        let mut out = BytesMut::new();
        let len = splice::encode_send_ack(rid, &ack, &mut out);
        prop_assert_eq!(len, out.len());
        prop_assert_eq!(&out[..], &frame.encode_to_vec()[..]);
    }

    #[test]
    fn a_spliced_deliver_is_the_messages_in_the_receivers_view(
        ms in proptest::collection::vec(message(), 1..5),
        view in conversation(),
    ) {
        let stored: Vec<Vec<u8>> = ms.iter().map(|m| m.encode_to_vec()).collect();
        let v = splice::view_field(&view);
        let spliced: Vec<Spliced<'_>> =
            stored.iter().map(|s| Spliced { stored: s, view: &v }).collect();
        let mut out = BytesMut::new();
        splice::encode_deliver(0, &spliced, &mut out);
        let want: Vec<pb::Message> = ms
            .iter()
            .cloned()
            .map(|mut m| {
                // Merged, as protobuf merges a repeated embedded message field.
                let mut c = m.conversation.take().unwrap_or_default();
                c.merge(&view.encode_to_vec()[..]).expect("a conversation");
                m.conversation = Some(c);
                m
            })
            .collect();
        let got = pb::Frame::decode(&out[..]).expect("a frame");
        prop_assert_eq!(got.body, Some(Body::Deliver(pb::Deliver { messages: want })));
    }

    #[test]
    fn the_peek_reads_what_was_encoded(m in message()) {
        let bytes = m.encode_to_vec();
        let h = splice::peek_message(&bytes).expect("a message");
        let c = m.conversation.clone().unwrap_or_default();
        prop_assert_eq!(h.conversation, c.id.as_str());
        prop_assert_eq!((h.seq, h.msg_id, h.client_msg_id, h.server_time),
            (m.seq, m.msg_id, m.client_msg_id, m.server_time));
        prop_assert_eq!((h.from_user, h.from_device), (m.from_user.as_str(), m.from_device.as_str()));
    }

    #[test]
    fn the_peek_never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = splice::peek_message(&bytes);
    }
}
