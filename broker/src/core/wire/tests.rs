//! Tests of the mail encoding: every kind of mail comes back as it was sent (monotonic times
//! read as the arrival time), and no input makes the decoder panic.

use std::sync::Arc;

use bytes::Bytes;
use parley_proto::pb;
use proptest::prelude::*;

use super::*;
use crate::auth::AuthError;
use crate::core::conv::{Conv, conv_id, direct_key};
use crate::core::error::Refusal;
use crate::core::group::Change;
use crate::core::mail::{
    Acked, Append, Delivery, Device, GroupInbox, GroupOp, GroupPush, Origin, ReadCountsAsk,
    ReadDone, ReadPurpose, Recipient,
};
use crate::core::presence::{Mail, Op, TypingRelay, Watcher};
use crate::core::room::{RoomAnswer, RoomCast, RoomChange, RoomFigures, RoomOp, RoomPost};

/// The sender's monotonic clock when it encoded the mail.
const SENT_US: u64 = 987_654_321;
/// The receiver's monotonic clock when the mail arrived.
const NOW_US: u64 = 5_000_000;

fn origin(shard: usize, slot: u32) -> Origin {
    Origin {
        shard,
        slot,
        generation: 7,
    }
}

fn device(user: &str, device: &str) -> Device {
    Device {
        user: user.into(),
        device: device.into(),
    }
}

fn direct() -> Arc<Conv> {
    Arc::new(Conv::from_key(&direct_key("alice", "bob")).expect("a direct key"))
}

fn group() -> Arc<Conv> {
    Arc::new(Conv::group("team").expect("a group id"))
}

fn view(kind: pb::ConversationType, id: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: kind as i32,
        id: id.into(),
    }
}

fn send(body: &'static [u8]) -> pb::Send {
    pb::Send {
        to: Some(view(pb::ConversationType::Direct, "bob")),
        client_msg_id: 0x1234_5678_9abc,
        content_type: 1,
        body: Bytes::from_static(body),
        kind: pb::MessageKind::Normal as i32,
        ref_seq: 0,
    }
}

/// A stored message of `len` bytes, as an owner encodes one.
fn stored(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>())
}

fn presence(user: &str) -> pb::UserPresence {
    pb::UserPresence {
        user: user.into(),
        status: pb::PresenceStatus::Online as i32,
        devices: vec!["laptop".into(), "phone".into()],
        last_seen: 0,
    }
}

fn append(t: u64) -> ShardMsg {
    ShardMsg::Append(Box::new(Append {
        origin: origin(1, 17),
        request_id: 99,
        sender: device("alice", "phone"),
        conv: direct(),
        send: send(b"hello, bob"),
        unix_ms: 1_760_000_000_123,
        arrived_us: t,
    }))
}

fn deliver(t: u64) -> ShardMsg {
    ShardMsg::Deliver(Box::new(Delivery {
        conv: direct(),
        seq: 1234,
        stored: stored(100),
        time: 1_760_000_000_123,
        sent_us: Some(t),
        recipients: vec![
            Recipient {
                user: "alice".into(),
                exclude: Some("phone".into()),
            },
            Recipient {
                user: "bob".into(),
                exclude: None,
            },
        ],
        group: None,
    }))
}

fn deliver_group_event(_: u64) -> ShardMsg {
    ShardMsg::Deliver(Box::new(Delivery {
        conv: group(),
        seq: 3,
        stored: stored(60),
        time: 1_760_000_000_500,
        sent_us: None,
        recipients: Vec::new(),
        group: Some(GroupPush {
            sender: device("carol", "desk"),
            change: Some(Arc::new(Change {
                joined: vec!["dave".into(), "erin".into()],
                left: vec!["frank".into()],
                dissolved: false,
            })),
        }),
    }))
}

fn deliver_group_message(t: u64) -> ShardMsg {
    ShardMsg::Deliver(Box::new(Delivery {
        conv: group(),
        seq: 4,
        stored: stored(80),
        time: 1_760_000_000_600,
        sent_us: Some(t),
        recipients: Vec::new(),
        group: Some(GroupPush {
            sender: device("carol", "desk"),
            change: None,
        }),
    }))
}

fn acked(_: u64) -> ShardMsg {
    ShardMsg::Acked(Acked {
        to: origin(0, 3),
        request_id: 5,
        ack: pb::SendAck {
            client_msg_id: 0x1234_5678_9abc,
            msg_id: 0x0190_0000_0001_0002,
            seq: 1234,
            server_time: 1_760_000_000_123,
            conversation: Some(view(pb::ConversationType::Direct, "bob")),
            durability: pb::Durability::Memory as i32,
        },
    })
}

fn refused(refusal: Refusal) -> ShardMsg {
    ShardMsg::Refused {
        to: origin(2, 40),
        request_id: 8,
        client_msg_id: 77,
        refusal,
    }
}

/// One refusal of each kind (with what each carries).
fn every_refusal() -> Vec<Refusal> {
    vec![
        Refusal::RateLimited {
            retry_after_ms: 250,
        },
        Refusal::ClientMsgIdZero,
        Refusal::BodyTooLarge,
        Refusal::RefSeqMissing,
        Refusal::KindNotAllowed,
        Refusal::BadRecipient,
        Refusal::ConversationRequired,
        Refusal::UnknownConversation,
        Refusal::RefreshOtherIdentity,
        Refusal::RefreshToken(AuthError::Missing),
        Refusal::RefreshToken(AuthError::TooLong),
        Refusal::RefreshToken(AuthError::Malformed("header is not base64url")),
        Refusal::RefreshToken(AuthError::UnsupportedAlgorithm),
        Refusal::RefreshToken(AuthError::BadSignature),
        Refusal::RefreshToken(AuthError::Expired),
        Refusal::RefreshToken(AuthError::NotYetValid),
        Refusal::RefreshTokenLifetime,
        Refusal::NoBody,
        Refusal::ServerOnlyFrame,
        Refusal::SyncRunning,
        Refusal::RefNotFound,
        Refusal::NotSender,
        Refusal::IdCollision,
        Refusal::Storage("disk full".into()),
        Refusal::LogFailed,
        Refusal::GroupNotFound,
        Refusal::NotMember,
        Refusal::GroupForbidden("only an owner may change roles".into()),
        Refusal::GroupExists,
        Refusal::GroupFull,
        Refusal::BadGroupRequest("name longer than 256 bytes".into()),
        Refusal::BadReceipt,
        Refusal::ListRunning,
        Refusal::BadRoomId,
        Refusal::BadRoomAction,
        Refusal::TooManyRooms,
        Refusal::RoomFull,
        Refusal::NotInRoom,
        Refusal::RoomKindNotAllowed,
        Refusal::PresenceTooManyUsers,
        Refusal::PresenceTooManySubscriptions,
        Refusal::BadPresenceRequest("SET takes status ONLINE or AWAY".into()),
        Refusal::Denied("the send hook said no".into()),
        Refusal::Unavailable {
            retry_after_ms: 2000,
        },
        Refusal::BadFrame {
            code: pb::ErrorCode::FrameTooLarge,
            message: "frame of 9000000 bytes".into(),
        },
    ]
}

fn inbox(_: u64) -> ShardMsg {
    ShardMsg::Inbox {
        user: "bob".into(),
        conv: direct(),
        last_seq: 1234,
        last_time: 1_760_000_000_123,
    }
}

fn group_read(_: u64) -> ShardMsg {
    ShardMsg::GroupRead {
        conv: group(),
        user: "dave".into(),
        read: 3,
    }
}

fn peer_read(_: u64) -> ShardMsg {
    ShardMsg::PeerRead {
        user: "alice".into(),
        conv: direct(),
        reader: "bob".into(),
        seq: 1234,
        time: 1_760_000_001_000,
    }
}

fn own_read(_: u64) -> ShardMsg {
    ShardMsg::OwnRead {
        user: "alice".into(),
        conv: direct(),
        seq: 1234,
    }
}

fn read_counts_ask(_: u64) -> ShardMsg {
    ShardMsg::ReadCountsAsk(Box::new(ReadCountsAsk {
        origin: origin(3, 9),
        request_id: 12,
        conv: group(),
        user: "dave".into(),
        view: view(pb::ConversationType::Group, "team"),
        from: 1,
        count: 50,
    }))
}

fn read_counts_done(_: u64) -> ShardMsg {
    ShardMsg::ReadCountsDone {
        to: origin(3, 9),
        request_id: 12,
        result: Box::new(pb::ReadCounts {
            conversation: Some(view(pb::ConversationType::Group, "team")),
            from_seq: 1,
            counts: vec![4, 4, 3, 1, 0],
            member_count: 4,
        }),
    }
}

fn group_op(_: u64) -> ShardMsg {
    ShardMsg::Group(Box::new(GroupOp {
        origin: origin(0, 1),
        request_id: 13,
        actor: device("carol", "desk"),
        conv: group(),
        req: pb::GroupRequest {
            action: pb::GroupAction::AddMembers as i32,
            group_id: "team".into(),
            members: vec!["dave".into(), "erin".into()],
            name: String::new(),
            role: pb::GroupRole::Unspecified as i32,
            open: false,
            after_user: String::new(),
            limit: 0,
        },
        unix_ms: 1_760_000_000_400,
    }))
}

fn group_done(_: u64) -> ShardMsg {
    ShardMsg::GroupDone {
        to: origin(0, 1),
        request_id: 13,
        result: Box::new(pb::GroupResult {
            group_id: "team".into(),
            members: vec!["carol".into(), "dave".into()],
            roster: vec![
                pb::GroupMember {
                    user: "carol".into(),
                    role: pb::GroupRole::Owner as i32,
                    joined_seq: 1,
                },
                pb::GroupMember {
                    user: "dave".into(),
                    role: pb::GroupRole::Member as i32,
                    joined_seq: 3,
                },
            ],
            name: "The team".into(),
            seq: 3,
            member_count: 2,
            more: false,
            open: true,
            your_role: pb::GroupRole::Owner as i32,
        }),
    }
}

fn group_inbox(_: u64) -> ShardMsg {
    ShardMsg::GroupInbox(Box::new(GroupInbox {
        conv: group(),
        last_seq: 4,
        last_time: 1_760_000_000_600,
        users: vec![("carol".into(), 1, u64::MAX), ("frank".into(), 1, 3)],
    }))
}

fn read(purpose: ReadPurpose) -> ShardMsg {
    ShardMsg::Read(Box::new(crate::core::mail::Read {
        reply: origin(1, 2),
        conv: group(),
        reader: Some("dave".into()),
        from: 1,
        to: 100,
        limit: 50,
        newest_first: true,
        purpose,
    }))
}

fn every_purpose() -> Vec<ReadPurpose> {
    vec![
        ReadPurpose::Sync,
        ReadPurpose::ListFill,
        ReadPurpose::Fill,
        ReadPurpose::History {
            request_id: 21,
            view: view(pb::ConversationType::Group, "team"),
        },
    ]
}

fn read_done(refused: Option<Refusal>) -> ShardMsg {
    ShardMsg::ReadDone(Box::new(ReadDone {
        to: origin(1, 2),
        conv: direct(),
        purpose: ReadPurpose::History {
            request_id: 21,
            view: view(pb::ConversationType::Direct, "bob"),
        },
        messages: vec![(1, stored(40)), (2, stored(100)), (5, stored(0))],
        more: true,
        first_seq: 1,
        last_seq: 1234,
        to_seq: 1234,
        refused,
    }))
}

fn room_change(op: RoomOp, reply: Option<(Origin, u64)>) -> ShardMsg {
    ShardMsg::RoomChange(Box::new(RoomChange {
        room: "lobby".into(),
        shard: 2,
        op,
        reply,
    }))
}

fn room_answer(result: Result<RoomFigures, Refusal>) -> ShardMsg {
    ShardMsg::RoomAnswer(Box::new(RoomAnswer {
        to: origin(2, 5),
        request_id: 31,
        room: "lobby".into(),
        op: RoomOp::Join,
        result,
    }))
}

fn room_post(_: u64) -> ShardMsg {
    let mut s = send(b"hi room");
    s.to = Some(view(pb::ConversationType::Room, "lobby"));
    ShardMsg::RoomPost(Box::new(RoomPost {
        origin: origin(2, 5),
        request_id: 32,
        room: "lobby".into(),
        sender: device("alice", "phone"),
        send: s,
        unix_ms: 1_760_000_002_000,
    }))
}

fn room_cast(_: u64) -> ShardMsg {
    ShardMsg::RoomCast(Box::new(RoomCast {
        room: "lobby".into(),
        seq: 77,
        stored: stored(90),
        exclude: origin(2, 5),
    }))
}

fn relay_open(_: u64) -> ShardMsg {
    ShardMsg::RelayOpen(Box::new(crate::core::mail::RelayOpen {
        from: origin(3, 8),
        identity: crate::auth::Identity {
            user: "carol".into(),
            device: "tablet".into(),
            expires_at: 1_900_000_000,
        },
        request_id: 1,
    }))
}

fn presence_mail(mail: Mail) -> ShardMsg {
    ShardMsg::Presence(Box::new(mail))
}

fn every_presence_mail() -> Vec<Mail> {
    vec![
        Mail::Users {
            from: origin(0, 4),
            gather: 6,
            op: Op::Query,
            users: vec!["alice".into(), "bob".into()],
        },
        Mail::Users {
            from: origin(0, 4),
            gather: 7,
            op: Op::Subscribe,
            users: vec!["bob".into()],
        },
        Mail::Users {
            from: origin(0, 4),
            gather: 0,
            op: Op::Unsubscribe,
            users: vec!["bob".into()],
        },
        Mail::Answer {
            to: origin(0, 4),
            gather: 6,
            users: vec![presence("alice"), presence("bob")],
        },
        Mail::Push {
            updates: vec![
                (
                    Arc::new(presence("alice")),
                    vec![Watcher::from(origin(1, 3)), Watcher::from(origin(1, 8))],
                ),
                (Arc::new(presence("bob")), vec![Watcher::from(origin(1, 3))]),
            ],
        },
        Mail::CountGroup {
            from: origin(0, 4),
            gather: 8,
            conv: conv_id("g:team"),
        },
        Mail::Counted {
            to: origin(0, 4),
            gather: 8,
            count: 3,
        },
        Mail::Typing(TypingRelay::for_test(
            direct(),
            device("alice", "phone"),
            true,
            vec!["bob".into()],
        )),
        Mail::Typing(TypingRelay::for_test(
            group(),
            device("carol", "desk"),
            false,
            Vec::new(),
        )),
    ]
}

/// Every kind of mail, built with `t` as the sender's monotonic time (one of each variant of
/// [`ShardMsg`], and of what they carry where it has variants of its own).
fn every_kind(t: u64) -> Vec<ShardMsg> {
    let mut all = vec![
        append(t),
        acked(t),
        deliver(t),
        deliver_group_event(t),
        deliver_group_message(t),
        inbox(t),
        group_read(t),
        peer_read(t),
        own_read(t),
        read_counts_ask(t),
        read_counts_done(t),
        group_op(t),
        group_done(t),
        group_inbox(t),
        read_done(None),
        read_done(Some(Refusal::NotMember)),
        room_change(RoomOp::Join, Some((origin(2, 5), 31))),
        room_change(RoomOp::Leave, None),
        room_change(RoomOp::Query, Some((origin(2, 6), 33))),
        room_answer(Ok(RoomFigures {
            audience: 1000,
            last_seq: 77,
            history: vec![(76, stored(30)), (77, stored(90))],
        })),
        room_answer(Err(Refusal::RoomFull)),
        room_post(t),
        room_cast(t),
        relay_open(t),
        ShardMsg::RelayIn {
            from: origin(3, 8),
            bytes: stored(40),
        },
        ShardMsg::RelayOut {
            to: origin(3, 8),
            bytes: stored(70),
        },
        ShardMsg::RelayAck {
            key: origin(3, 8),
            to_home: true,
            bytes: 4096,
        },
        ShardMsg::RelayAck {
            key: origin(3, 8),
            to_home: false,
            bytes: 17,
        },
        ShardMsg::RelayClose {
            key: origin(3, 8),
            to_home: false,
            last: stored(12),
        },
        ShardMsg::RelayClose {
            key: origin(3, 8),
            to_home: true,
            last: Bytes::new(),
        },
    ];
    all.extend(every_refusal().into_iter().map(refused));
    all.extend(every_purpose().into_iter().map(read));
    all.extend(every_presence_mail().into_iter().map(presence_mail));
    all
}

/// The index of `m`'s variant, of [`SHARD_MSG_VARIANTS`]. A new variant fails to compile here:
/// add it, and a value of it to [`every_kind`].
fn variant(m: &ShardMsg) -> usize {
    match m {
        ShardMsg::Append(_) => 0,
        ShardMsg::Acked(_) => 1,
        ShardMsg::Refused { .. } => 2,
        ShardMsg::Deliver(_) => 3,
        ShardMsg::Inbox { .. } => 4,
        ShardMsg::GroupRead { .. } => 5,
        ShardMsg::PeerRead { .. } => 6,
        ShardMsg::OwnRead { .. } => 7,
        ShardMsg::ReadCountsAsk(_) => 8,
        ShardMsg::ReadCountsDone { .. } => 9,
        ShardMsg::Group(_) => 10,
        ShardMsg::GroupDone { .. } => 11,
        ShardMsg::GroupInbox(_) => 12,
        ShardMsg::Read(_) => 13,
        ShardMsg::ReadDone(_) => 14,
        ShardMsg::RoomChange(_) => 15,
        ShardMsg::RoomAnswer(_) => 16,
        ShardMsg::RoomPost(_) => 17,
        ShardMsg::RoomCast(_) => 18,
        ShardMsg::Presence(_) => 19,
        ShardMsg::RelayOpen(_) => 20,
        ShardMsg::RelayIn { .. } => 21,
        ShardMsg::RelayOut { .. } => 22,
        ShardMsg::RelayAck { .. } => 23,
        ShardMsg::RelayClose { .. } => 24,
    }
}

/// How many variants [`ShardMsg`] has.
const SHARD_MSG_VARIANTS: usize = 25;

/// The index of `r`'s variant, of [`REFUSAL_VARIANTS`]. A new variant fails to compile here:
/// add it, and a value of it to [`every_refusal`].
fn refusal_variant(r: &Refusal) -> usize {
    match r {
        Refusal::RateLimited { .. } => 0,
        Refusal::ClientMsgIdZero => 1,
        Refusal::BodyTooLarge => 2,
        Refusal::RefSeqMissing => 3,
        Refusal::KindNotAllowed => 4,
        Refusal::BadRecipient => 5,
        Refusal::ConversationRequired => 6,
        Refusal::UnknownConversation => 7,
        Refusal::RefreshOtherIdentity => 8,
        Refusal::RefreshToken(_) => 9,
        Refusal::RefreshTokenLifetime => 10,
        Refusal::NoBody => 11,
        Refusal::ServerOnlyFrame => 12,
        Refusal::SyncRunning => 13,
        Refusal::RefNotFound => 14,
        Refusal::NotSender => 15,
        Refusal::IdCollision => 16,
        Refusal::Storage(_) => 17,
        Refusal::LogFailed => 18,
        Refusal::GroupNotFound => 19,
        Refusal::NotMember => 20,
        Refusal::GroupForbidden(_) => 21,
        Refusal::GroupExists => 22,
        Refusal::GroupFull => 23,
        Refusal::BadGroupRequest(_) => 24,
        Refusal::BadReceipt => 25,
        Refusal::ListRunning => 26,
        Refusal::BadRoomId => 27,
        Refusal::BadRoomAction => 28,
        Refusal::TooManyRooms => 29,
        Refusal::RoomFull => 30,
        Refusal::NotInRoom => 31,
        Refusal::RoomKindNotAllowed => 32,
        Refusal::PresenceTooManyUsers => 33,
        Refusal::PresenceTooManySubscriptions => 34,
        Refusal::BadPresenceRequest(_) => 35,
        Refusal::Denied(_) => 36,
        Refusal::BadFrame { .. } => 37,
        Refusal::Unavailable { .. } => 38,
    }
}

/// How many variants [`Refusal`] has.
const REFUSAL_VARIANTS: usize = 39;

/// The index of `m`'s variant, of [`MAIL_VARIANTS`]. A new variant fails to compile here: add
/// it, and a value of it to [`every_presence_mail`].
fn mail_variant(m: &Mail) -> usize {
    match m {
        Mail::Users { .. } => 0,
        Mail::Answer { .. } => 1,
        Mail::Push { .. } => 2,
        Mail::CountGroup { .. } => 3,
        Mail::Counted { .. } => 4,
        Mail::Typing(_) => 5,
    }
}

/// How many variants [`Mail`] has.
const MAIL_VARIANTS: usize = 6;

#[test]
fn the_tests_cover_every_variant() {
    let covered = |indexes: Vec<usize>, n: usize| {
        let set: std::collections::BTreeSet<usize> = indexes.into_iter().collect();
        assert_eq!(set, (0..n).collect(), "a variant has no value in the tests");
    };
    covered(
        every_kind(0).iter().map(variant).collect(),
        SHARD_MSG_VARIANTS,
    );
    covered(
        every_refusal().iter().map(refusal_variant).collect(),
        REFUSAL_VARIANTS,
    );
    covered(
        every_presence_mail().iter().map(mail_variant).collect(),
        MAIL_VARIANTS,
    );
}

fn encode(batch: &[ShardMsg]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch(batch, &mut out).expect("mail encodes");
    out
}

/// Sends the mail `build(SENT_US)` and checks `build(NOW_US)` arrives: everything as it was,
/// monotonic times read as the arrival time.
fn round_trip(build: impl Fn(u64) -> ShardMsg) {
    let bytes = encode(&[build(SENT_US)]);
    let got = decode_batch(&bytes, NOW_US).expect("mail decodes");
    assert_eq!(
        format!("{got:?}"),
        format!("{:?}", [build(NOW_US)]),
        "round trip"
    );
}

#[test]
fn an_append_arrives_with_the_arrival_time() {
    round_trip(append);
    let got = decode_batch(&encode(&[append(SENT_US)]), NOW_US).expect("decodes");
    let Some(ShardMsg::Append(a)) = got.first() else {
        panic!("an append: {got:?}")
    };
    assert_eq!(a.arrived_us, NOW_US);
    assert_eq!(a.send.body, Bytes::from_static(b"hello, bob"));
    assert_eq!(a.conv.id, direct().id);
    assert_eq!(a.conv.members, direct().members);
}

#[test]
fn an_acked_arrives() {
    round_trip(acked);
}

#[test]
fn every_refusal_arrives_as_it_was() {
    for r in every_refusal() {
        let bytes = encode(&[refused(r.clone())]);
        let got = decode_batch(&bytes, NOW_US).expect("decodes");
        let [ShardMsg::Refused { refusal, .. }] = &got[..] else {
            panic!("a refusal: {got:?}")
        };
        assert_eq!(refusal, &r);
        assert_eq!(refusal.to_string(), r.to_string());
        assert_eq!(refusal.code(), r.code());
    }
    round_trip(|_| refused(Refusal::GroupForbidden("only an owner may dissolve".into())));
}

#[test]
fn a_delivery_arrives_with_the_arrival_time_if_it_had_a_send_time() {
    round_trip(deliver);
    round_trip(deliver_group_event);
    round_trip(deliver_group_message);
    let got = decode_batch(
        &encode(&[deliver(SENT_US), deliver_group_event(SENT_US)]),
        NOW_US,
    )
    .expect("decodes");
    let [ShardMsg::Deliver(d), ShardMsg::Deliver(e)] = &got[..] else {
        panic!("two deliveries: {got:?}")
    };
    assert_eq!(d.sent_us, Some(NOW_US));
    assert_eq!(e.sent_us, None, "a membership event had no send time");
    assert_eq!(d.stored, stored(100));
}

#[test]
fn inboxes_and_read_cursors_arrive() {
    round_trip(inbox);
    round_trip(group_read);
    round_trip(peer_read);
    round_trip(own_read);
    round_trip(group_inbox);
}

#[test]
fn read_counts_arrive() {
    round_trip(read_counts_ask);
    round_trip(read_counts_done);
}

#[test]
fn group_requests_and_answers_arrive() {
    round_trip(group_op);
    round_trip(group_done);
}

#[test]
fn reads_of_every_purpose_and_their_answers_arrive() {
    for p in every_purpose() {
        round_trip(|_| read(p.clone()));
    }
    round_trip(|_| read_done(None));
    round_trip(|_| read_done(Some(Refusal::NotMember)));
}

#[test]
fn room_mail_arrives() {
    round_trip(|_| room_change(RoomOp::Join, Some((origin(2, 5), 31))));
    round_trip(|_| room_change(RoomOp::Leave, None));
    round_trip(|_| room_change(RoomOp::Query, Some((origin(2, 6), 33))));
    round_trip(|_| {
        room_answer(Ok(RoomFigures {
            audience: 1000,
            last_seq: 77,
            history: vec![(76, stored(30)), (77, stored(90))],
        }))
    });
    round_trip(|_| room_answer(Err(Refusal::RoomFull)));
    round_trip(room_post);
    round_trip(room_cast);
}

#[test]
fn presence_and_typing_mail_arrives() {
    for i in 0..every_presence_mail().len() {
        round_trip(|_| {
            let mut all = every_presence_mail();
            presence_mail(all.swap_remove(i))
        });
    }
}

#[test]
fn a_mixed_batch_arrives_whole_and_in_order() {
    let sent = every_kind(SENT_US);
    assert!(sent.len() > 70, "{}", sent.len());
    let mut bytes = vec![0xAA, 0xBB];
    encode_batch(&sent, &mut bytes).expect("encodes");
    assert_eq!(&bytes[..2], &[0xAA, 0xBB], "the encoding is appended");
    let got = decode_batch(&bytes[2..], NOW_US).expect("decodes");
    assert_eq!(got.len(), sent.len());
    for (g, e) in got.iter().zip(every_kind(NOW_US)) {
        assert_eq!(format!("{g:?}"), format!("{e:?}"));
    }
    assert!(
        decode_batch(&encode(&[]), NOW_US)
            .expect("an empty batch")
            .is_empty()
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = encode(&[acked(0)]);
    bytes.push(0);
    assert!(matches!(
        decode_batch(&bytes, NOW_US),
        Err(WireError::TrailingBytes(1))
    ));
    // Two batches back to back are not one.
    let mut two = encode(&[acked(0)]);
    two.extend(encode(&[acked(0)]));
    assert!(matches!(
        decode_batch(&two, NOW_US),
        Err(WireError::TrailingBytes(_))
    ));
}

/// The encoding of `batch` with every occurrence of `from` (a string in it) replaced by `to`
/// of the same length.
fn patched(batch: &[ShardMsg], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut bytes = encode(batch);
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the string is in the encoding");
    bytes[at..at + to.len()].copy_from_slice(to);
    bytes
}

#[test]
fn a_key_that_names_no_conversation_is_refused() {
    // "d5:alicebob" with a length that overruns the key.
    let bytes = patched(&[inbox(0)], b"d5:alicebob", b"d9:alicebob");
    match decode_batch(&bytes, NOW_US) {
        Err(WireError::BadConversation(key)) => assert_eq!(key, "d9:alicebob"),
        other => panic!("a bad conversation: {other:?}"),
    }
    let bytes = patched(&[group_read(0)], b"g:team", b"x:team");
    assert!(matches!(
        decode_batch(&bytes, NOW_US),
        Err(WireError::BadConversation(_))
    ));
}

#[test]
fn a_protocol_message_that_is_not_protobuf_is_refused() {
    // The Send's body is a length-delimited field: a length past its end breaks the message.
    let body = b"hi room";
    let mut bytes = encode(&[room_post(0)]);
    let at = bytes
        .windows(body.len())
        .position(|w| w == body)
        .expect("the body is in the encoding");
    // The byte before the body is its protobuf length.
    assert_eq!(bytes[at - 1], body.len() as u8);
    bytes[at - 1] = 0x7f;
    match decode_batch(&bytes, NOW_US) {
        Err(WireError::BadProtocolMessage(_)) => {}
        other => panic!("a bad protocol message: {other:?}"),
    }
}

#[test]
fn an_error_code_the_schema_does_not_know_is_refused() {
    let r = Refusal::BadFrame {
        code: pb::ErrorCode::FrameTooLarge,
        message: "m".into(),
    };
    let code = pb::ErrorCode::FrameTooLarge as i32;
    let mut bytes = encode(&[refused(r)]);
    // The code is a zigzag varint right before the message's length and text.
    let zz = ((code << 1) ^ (code >> 31)) as u8;
    let at = bytes
        .windows(3)
        .rposition(|w| w == [zz, 1, b'm'])
        .expect("the code is in the encoding");
    bytes[at] = 0x7e; // 63: no error code has this number
    assert!(pb::ErrorCode::try_from(63).is_err());
    assert!(matches!(
        decode_batch(&bytes, NOW_US),
        Err(WireError::Malformed(_))
    ));
}

#[test]
fn every_malformed_token_text_of_the_built_in_verifier_arrives_as_it_was() {
    let source = include_str!("../../auth.rs");
    let mut found = 0;
    for (at, _) in source.match_indices("AuthError::Malformed(\"") {
        let rest = &source[at + "AuthError::Malformed(\"".len()..];
        let text = &rest[..rest.find('"').expect("a closing quote")];
        assert!(
            token_text::KNOWN.contains(&text),
            "{text:?} is missing from wire::token_text::KNOWN"
        );
        found += 1;
    }
    assert_eq!(found, token_text::KNOWN.len());
    let custom = refused(Refusal::RefreshToken(AuthError::Malformed(
        "a custom verifier's",
    )));
    let got = decode_batch(&encode(&[custom]), NOW_US).expect("decodes");
    let [ShardMsg::Refused { refusal, .. }] = &got[..] else {
        panic!("a refusal: {got:?}")
    };
    assert_eq!(
        refusal,
        &Refusal::RefreshToken(AuthError::Malformed(token_text::OTHER))
    );
}

/// The sizes quoted for the format (one mail, without the batch's 1-byte count): a direct
/// message's delivery with a 100-byte stored message to its two users, and the append of a send
/// with a 10-byte body.
#[test]
fn typical_mail_is_small() {
    let deliver = encode(&[deliver(SENT_US)]).len() - 1;
    let append = encode(&[append(SENT_US)]).len() - 1;
    println!("Deliver (100-byte stored message, 2 recipients): {deliver} bytes");
    println!("Append (10-byte body): {append} bytes");
    assert_eq!(deliver, 143);
    assert_eq!(append, 67);
}

/// Pins the encoding of every kind of mail: if this fails, a mail type changed shape, and
/// [`WIRE_VERSION`] must be bumped (then update the pinned hash).
#[test]
fn the_encoding_is_pinned_to_its_wire_version() {
    let bytes = encode(&every_kind(SENT_US));
    let hash = crate::core::conv::stable_hash(&bytes);
    assert_eq!(
        (WIRE_VERSION, bytes.len(), hash),
        (1, 2507, 6_124_815_906_181_787_823),
        "a mail type changed shape: bump WIRE_VERSION and update this pin"
    );
}

proptest! {
    // The default number of cases (256, or `PROPTEST_CASES` for long runs). Whatever decodes
    // must also survive a round trip unchanged (`check_round_trip`).

    #[test]
    fn any_bytes_decode_or_fail_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..600)
    ) {
        check_round_trip(&bytes);
    }

    #[test]
    fn any_bytes_after_the_start_of_real_mail_decode_or_fail_without_panicking(
        kind in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
        rest in proptest::collection::vec(any::<u8>(), 0..300)
    ) {
        // A batch of one real mail cut anywhere, then anything: the decoder gets past the
        // first bytes into every kind of mail.
        let mut all = every_kind(SENT_US);
        let one = all.swap_remove(kind.index(all.len()));
        let mut bytes = encode(&[one]);
        bytes.truncate(cut.index(bytes.len() + 1));
        bytes.extend(rest);
        check_round_trip(&bytes);
    }

    #[test]
    fn a_damaged_batch_decodes_or_fails_without_panicking(
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6),
        truncate in any::<bool>(),
    ) {
        let mut bytes = encode(&every_kind(SENT_US));
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        check_round_trip(&bytes);
    }
}
