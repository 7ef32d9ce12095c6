//! Proptest strategies for every message of `parley.proto`, shared by the property tests.
//!
//! Enum fields take only the values the schema names (so that the JSON mapping, which names
//! them, can round-trip); strings take any `char`s, bytes any bytes; collections stay short so
//! a frame stays small enough for a UDP datagram most of the time.

#![allow(dead_code)] // each test crate uses a different part

use bytes::Bytes;
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::Union;

/// The body case names of `Frame` as declared in `proto/parley.proto`, read from the file
/// itself so a new case cannot be forgotten by the tests.
pub(crate) fn schema_body_cases() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/parley.proto");
    let schema = std::fs::read_to_string(path).expect("schema readable");
    let start = schema.find("oneof body {").expect("Frame has a body oneof");
    let block = &schema[start..];
    let end = block.find("\n  }").expect("oneof closes");
    block[..end]
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|line| !line.starts_with("//") && line.ends_with(';'))
        .map(|line| {
            let mut words = line.split_whitespace();
            let _type = words.next();
            words.next().expect("a field name").to_string()
        })
        .collect()
}

/// Any value the enum `E` names (probing 0..64, which covers every enum of the schema).
fn enum_value<E: TryFrom<i32>>() -> impl Strategy<Value = i32> {
    let known: Vec<i32> = (0..64).filter(|&v| E::try_from(v).is_ok()).collect();
    select(known)
}

/// Any string of up to `max` chars, control characters and all.
fn text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..=max).prop_map(String::from_iter)
}

fn short_text() -> impl Strategy<Value = String> {
    text(12)
}

fn payload() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

pub(crate) fn conversation() -> impl Strategy<Value = pb::Conversation> {
    (enum_value::<pb::ConversationType>(), short_text())
        .prop_map(|(r#type, id)| pb::Conversation { r#type, id })
}

pub(crate) fn message() -> impl Strategy<Value = pb::Message> {
    (
        option::of(conversation()),
        any::<u64>(),
        any::<u64>(),
        short_text(),
        short_text(),
        any::<u64>(),
        any::<u32>(),
        payload(),
        any::<i64>(),
        enum_value::<pb::MessageKind>(),
        any::<u64>(),
        option::of(group_event()),
    )
        .prop_map(
            |(
                conversation,
                seq,
                msg_id,
                from_user,
                from_device,
                client_msg_id,
                content_type,
                body,
                server_time,
                kind,
                ref_seq,
                event,
            )| pb::Message {
                conversation,
                seq,
                msg_id,
                from_user,
                from_device,
                client_msg_id,
                content_type,
                body,
                server_time,
                kind,
                ref_seq,
                event,
            },
        )
}

fn group_event() -> impl Strategy<Value = pb::GroupEvent> {
    (
        enum_value::<pb::GroupEventType>(),
        short_text(),
        vec(short_text(), 0..3),
        short_text(),
        enum_value::<pb::GroupRole>(),
        any::<bool>(),
        short_text(),
    )
        .prop_map(
            |(r#type, actor, users, name, role, open, new_owner)| pb::GroupEvent {
                r#type,
                actor,
                users,
                name,
                role,
                open,
                new_owner,
            },
        )
}

fn group_member() -> impl Strategy<Value = pb::GroupMember> {
    (short_text(), enum_value::<pb::GroupRole>(), any::<u64>()).prop_map(
        |(user, role, joined_seq)| pb::GroupMember {
            user,
            role,
            joined_seq,
        },
    )
}

fn messages() -> impl Strategy<Value = Vec<pb::Message>> {
    vec(message(), 0..3)
}

fn ack_cursor() -> impl Strategy<Value = pb::AckCursor> {
    (option::of(conversation()), any::<u64>())
        .prop_map(|(conversation, seq)| pb::AckCursor { conversation, seq })
}

pub(crate) fn login() -> impl Strategy<Value = pb::Login> {
    (any::<u32>(), text(200), short_text()).prop_map(|(protocol_version, token, client_name)| {
        pb::Login {
            protocol_version,
            token,
            client_name,
        }
    })
}

fn login_result() -> impl Strategy<Value = pb::LoginResult> {
    (
        any::<u32>(),
        short_text(),
        short_text(),
        short_text(),
        any::<i64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        vec(any::<u8>(), 0..=32),
        any::<u64>(),
    )
        .prop_map(
            |(
                protocol_version,
                user,
                device,
                node,
                server_time,
                heartbeat_interval_ms,
                idle_timeout_ms,
                max_frame_bytes,
                udp_session_id,
                udp_session_key,
                token_expires_at,
            )| pb::LoginResult {
                protocol_version,
                user,
                device,
                node,
                server_time,
                heartbeat_interval_ms,
                idle_timeout_ms,
                max_frame_bytes,
                udp_session_id,
                udp_session_key,
                token_expires_at,
            },
        )
}

fn error() -> impl Strategy<Value = pb::Error> {
    (
        enum_value::<pb::ErrorCode>(),
        short_text(),
        any::<bool>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(code, message, fatal, client_msg_id, retry_after_ms)| pb::Error {
                code,
                message,
                fatal,
                client_msg_id,
                retry_after_ms,
            },
        )
}

fn send() -> impl Strategy<Value = pb::Send> {
    (
        option::of(conversation()),
        any::<u64>(),
        any::<u32>(),
        payload(),
        enum_value::<pb::MessageKind>(),
        any::<u64>(),
    )
        .prop_map(
            |(to, client_msg_id, content_type, body, kind, ref_seq)| pb::Send {
                to,
                client_msg_id,
                content_type,
                body,
                kind,
                ref_seq,
            },
        )
}

fn send_ack() -> impl Strategy<Value = pb::SendAck> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        option::of(conversation()),
        enum_value::<pb::Durability>(),
    )
        .prop_map(
            |(client_msg_id, msg_id, seq, server_time, conversation, durability)| pb::SendAck {
                client_msg_id,
                msg_id,
                seq,
                server_time,
                conversation,
                durability,
            },
        )
}

fn conversation_state() -> impl Strategy<Value = pb::ConversationState> {
    (
        option::of(conversation()),
        any::<u64>(),
        any::<u64>(),
        option::of(message()),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                conversation,
                last_seq,
                unread,
                last_message,
                read_seq,
                unread_count,
                delivered_seq,
                last_activity,
                peer_read_seq,
            )| pb::ConversationState {
                conversation,
                last_seq,
                unread,
                last_message,
                read_seq,
                unread_count,
                delivered_seq,
                last_activity,
                peer_read_seq,
            },
        )
}

fn user_presence() -> impl Strategy<Value = pb::UserPresence> {
    (
        short_text(),
        enum_value::<pb::PresenceStatus>(),
        vec(short_text(), 0..3),
        any::<i64>(),
    )
        .prop_map(|(user, status, devices, last_seen)| pb::UserPresence {
            user,
            status,
            devices,
            last_seen,
        })
}

/// Every `Frame.body` case, each equally likely.
pub(crate) fn body() -> impl Strategy<Value = Body> {
    Union::new(vec![
        login().prop_map(Body::Login).boxed(),
        login_result().prop_map(Body::LoginResult).boxed(),
        error().prop_map(Body::Error).boxed(),
        any::<u64>()
            .prop_map(|nonce| Body::Ping(pb::Ping { nonce }))
            .boxed(),
        (any::<u64>(), any::<i64>())
            .prop_map(|(nonce, time)| Body::Pong(pb::Pong { nonce, time }))
            .boxed(),
        send().prop_map(Body::Send).boxed(),
        send_ack().prop_map(Body::SendAck).boxed(),
        messages()
            .prop_map(|messages| Body::Deliver(pb::Deliver { messages }))
            .boxed(),
        vec(ack_cursor(), 0..4)
            .prop_map(|acks| Body::DeliverAck(pb::DeliverAck { acks }))
            .boxed(),
        short_text()
            .prop_map(|reason| Body::Behind(pb::Behind { reason }))
            .boxed(),
        (vec(ack_cursor(), 0..4), any::<u32>(), any::<u32>())
            .prop_map(|(cursors, page_size, max_per_conversation)| {
                Body::SyncRequest(pb::SyncRequest {
                    cursors,
                    page_size,
                    max_per_conversation,
                })
            })
            .boxed(),
        (vec(conversation_state(), 0..3), any::<u64>())
            .prop_map(|(conversations, total_messages)| {
                Body::SyncSummary(pb::SyncSummary {
                    conversations,
                    total_messages,
                })
            })
            .boxed(),
        (messages(), any::<bool>())
            .prop_map(|(messages, done)| Body::SyncPage(pb::SyncPage { messages, done }))
            .boxed(),
        (
            option::of(conversation()),
            any::<u64>(),
            option::of(any::<u64>()),
            any::<u32>(),
        )
            .prop_map(|(conversation, before_seq, after_seq, limit)| {
                Body::HistoryRequest(pb::HistoryRequest {
                    conversation,
                    before_seq,
                    after_seq,
                    limit,
                })
            })
            .boxed(),
        (
            option::of(conversation()),
            messages(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(conversation, messages, more, first_seq, last_seq)| {
                Body::HistoryPage(pb::HistoryPage {
                    conversation,
                    messages,
                    more,
                    first_seq,
                    last_seq,
                })
            })
            .boxed(),
        (
            enum_value::<pb::PresenceAction>(),
            vec(short_text(), 0..4),
            enum_value::<pb::PresenceStatus>(),
            short_text(),
        )
            .prop_map(|(action, users, status, group_id)| {
                Body::PresenceRequest(pb::PresenceRequest {
                    action,
                    users,
                    status,
                    group_id,
                })
            })
            .boxed(),
        (
            vec(user_presence(), 0..3),
            any::<u64>(),
            short_text(),
            any::<bool>(),
        )
            .prop_map(|(users, online_count, group_id, more)| {
                Body::PresenceUpdate(pb::PresenceUpdate {
                    users,
                    online_count,
                    group_id,
                    more,
                })
            })
            .boxed(),
        (
            enum_value::<pb::GroupAction>(),
            short_text(),
            vec(short_text(), 0..4),
            short_text(),
            enum_value::<pb::GroupRole>(),
            any::<bool>(),
            short_text(),
            any::<u32>(),
        )
            .prop_map(
                |(action, group_id, members, name, role, open, after_user, limit)| {
                    Body::GroupRequest(pb::GroupRequest {
                        action,
                        group_id,
                        members,
                        name,
                        role,
                        open,
                        after_user,
                        limit,
                    })
                },
            )
            .boxed(),
        (
            short_text(),
            vec(short_text(), 0..4),
            vec(group_member(), 0..3),
            short_text(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            enum_value::<pb::GroupRole>(),
        )
            .prop_map(
                |(group_id, members, roster, name, seq, member_count, more, open, your_role)| {
                    Body::GroupResult(pb::GroupResult {
                        group_id,
                        members,
                        roster,
                        name,
                        seq,
                        member_count,
                        more,
                        open,
                        your_role,
                    })
                },
            )
            .boxed(),
        (enum_value::<pb::RoomAction>(), short_text())
            .prop_map(|(action, room_id)| Body::RoomRequest(pb::RoomRequest { action, room_id }))
            .boxed(),
        (short_text(), any::<u64>(), any::<u64>())
            .prop_map(|(room_id, audience, last_seq)| {
                Body::RoomResult(pb::RoomResult {
                    room_id,
                    audience,
                    last_seq,
                })
            })
            .boxed(),
        (short_text(), any::<u64>(), any::<u64>())
            .prop_map(|(room_id, dropped, next_seq)| {
                Body::RoomLag(pb::RoomLag {
                    room_id,
                    dropped,
                    next_seq,
                })
            })
            .boxed(),
        (
            option::of(conversation()),
            enum_value::<pb::ReceiptType>(),
            any::<u64>(),
            short_text(),
            any::<i64>(),
        )
            .prop_map(|(conversation, r#type, seq, user, time)| {
                Body::Receipt(pb::Receipt {
                    conversation,
                    r#type,
                    seq,
                    user,
                    time,
                })
            })
            .boxed(),
        (any::<u32>(), any::<i64>(), option::of(conversation()))
            .prop_map(|(limit, after_activity, after_conversation)| {
                Body::ConversationListRequest(pb::ConversationListRequest {
                    limit,
                    after_activity,
                    after_conversation,
                })
            })
            .boxed(),
        (vec(conversation_state(), 0..3), any::<bool>())
            .prop_map(|(conversations, more)| {
                Body::ConversationList(pb::ConversationList {
                    conversations,
                    more,
                })
            })
            .boxed(),
        (option::of(conversation()), any::<u64>(), any::<u32>())
            .prop_map(|(conversation, from_seq, count)| {
                Body::ReadCountsRequest(pb::ReadCountsRequest {
                    conversation,
                    from_seq,
                    count,
                })
            })
            .boxed(),
        (
            option::of(conversation()),
            any::<u64>(),
            vec(any::<u32>(), 0..5),
            any::<u64>(),
        )
            .prop_map(|(conversation, from_seq, counts, member_count)| {
                Body::ReadCounts(pb::ReadCounts {
                    conversation,
                    from_seq,
                    counts,
                    member_count,
                })
            })
            .boxed(),
        (
            option::of(conversation()),
            any::<bool>(),
            short_text(),
            short_text(),
        )
            .prop_map(|(conversation, typing, user, device)| {
                Body::Typing(pb::Typing {
                    conversation,
                    typing,
                    user,
                    device,
                })
            })
            .boxed(),
    ])
}

/// Any frame with a body (every frame a conforming sender sends).
pub(crate) fn frame() -> impl Strategy<Value = pb::Frame> {
    (any::<u64>(), body()).prop_map(|(request_id, body)| pb::Frame {
        request_id,
        body: Some(body),
    })
}

/// A frame whose body is a `Login`.
pub(crate) fn login_frame() -> impl Strategy<Value = pb::Frame> {
    (any::<u64>(), login()).prop_map(|(request_id, login)| pb::Frame {
        request_id,
        body: Some(Body::Login(login)),
    })
}
