//! The parley client: log in with a token, send 1:1 messages, ack deliveries cumulatively,
//! answer `Behind` with a sync, and sync on request; over TCP (varint-delimited frames) or
//! WebSocket (one binary message per frame). In `fanout` it uses a room instead
//! ([`ParleyDriver::in_room`]).
//!
//! Client `j` is the user [`Names::of`]`(j)` with device `d0`. A message to client `k` is a
//! `Send` to `{DIRECT, names.of(k)}` with `client_msg_id` = the tag. Both sides of a direct
//! conversation name it differently (each by the other user), so [`ConvSeq::conversation`] is
//! the FNV-1a hash of the two user ids in sorted order, joined by a newline: the same number for
//! the sender's acks and the receiver's deliveries.
//!
//! In a room, the publisher and its subscribers join the room `names.of(publisher)` right after
//! logging in (the connection is ready once the join is answered) and the publisher sends to
//! `{ROOM, names.of(publisher)}`. Every subscriber gets every seq of the room, so a room's
//! [`ConvSeq::conversation`] is per receiver ([`room_key`]): each subscriber's seqs must form an
//! unbroken run from 1, counting the ones a `RoomLag` said were dropped.
//!
//! In a group ([`ParleyDriver::in_group`]: `groups`, and `fanout --conversation group`) the
//! connection is ready at login, sends to `{GROUP, group_id}`, makes the group requests the
//! scenario asks for ([`Driver::group`]: create, add and remove members) and reports every
//! message of the group as [`Event::GroupMessage`] (its own ones echoed by a sync and the
//! SYSTEM messages of membership changes included): every member sees the same seqs, so the
//! group's [`ConvSeq::conversation`] is one key for all ([`group_key`]), and the scenario's
//! checker ([`crate::check::group`]) decides what each member should have seen.
//!
//! Over UDP ([`ParleyDriver::reordering`]) datagrams may be lost or come late, so the driver does
//! what any UDP client must: it hands direct messages on in seq order, holding back those that
//! come after a hole until the hole is filled (by the broker's retransmit), counts the seqs of
//! its own sends (their `SendAck`s) as held, acks per conversation only the unbroken run of seqs
//! it holds, and acks again whenever a message arrives (so a lost `DeliverAck` is made good by the
//! retransmit it causes). A message arriving again below that run is still reported (with its
//! seq, so the checker counts it as a redelivery, not a duplicate).

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use parley_proto::pb::{self, frame::Body};
use parley_proto::tcp::FrameCodec;
use parley_proto::{PROTOCOL_VERSION, frame};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use super::{
    ConvSeq, Driver, DriverError, Endpoint, Event, GroupAction, GroupEvent, GroupOp, Names, fnv1a,
};
use crate::ws::{WsClient, WsMessage};

/// How frames travel.
#[derive(Debug)]
pub enum Framing {
    /// Varint-length-delimited frames on a TCP stream.
    Tcp,
    /// One binary WebSocket message per frame.
    Ws(Box<WsClient>),
}

/// The parley client side of one connection.
#[derive(Debug)]
pub struct ParleyDriver {
    me: String,
    names: Names,
    token: String,
    framing: Framing,
    codec: FrameCodec,
    /// Per conversation: the highest seq delivered and whether an ack is pending.
    cursors: Vec<Cursor>,
    syncing: bool,
    nonce: u64,
    /// Scratch for hand-encoded frames before WebSocket framing.
    scratch: BytesMut,
    /// The last recipient's user id, kept to avoid formatting it per message.
    last_to: Option<(u32, String)>,
    /// The room this connection joins at start and sends to, if any.
    room: Option<String>,
    /// The group this connection sends to, if any.
    group: Option<String>,
    /// Group requests written and not answered yet (their request ids).
    group_requests: Vec<u64>,
    /// [`Event::Ready`] was emitted.
    ready: bool,
    /// Direct messages are handed on in seq order and acked without holes (UDP).
    reorder: bool,
}

/// What the connection holds of one conversation.
#[derive(Debug)]
struct Cursor {
    /// The conversation, as this client names it.
    conv: pb::Conversation,
    /// Its [`ConvSeq::conversation`] key.
    key: u64,
    /// The highest seq delivered.
    seq: u64,
    /// `seq` moved since the last ack (or, re-ordering, a message arrived).
    dirty: bool,
    /// Re-ordering: seqs above `seq + 1` already held, with the message's body (`None`: one of
    /// this client's own sends, acked).
    ahead: BTreeMap<u64, Option<Bytes>>,
}

impl Cursor {
    /// Re-ordering: seq `seq` is held (delivered with `body`, or an own send if `None`); pushes
    /// the deliveries that are now in order. Returns whether `seq` was new.
    fn hold(&mut self, seq: u64, body: Option<Bytes>, events: &mut Vec<Event>) -> bool {
        if seq <= self.seq || self.ahead.contains_key(&seq) {
            return false;
        }
        if seq > self.seq + 1 {
            self.ahead.insert(seq, body);
            return true;
        }
        self.seq = seq;
        self.dirty = true;
        let key = self.key;
        let mut release = |seq: u64, body: Option<Bytes>| {
            if let Some(body) = body {
                events.push(Event::Delivered {
                    body,
                    seq: Some(ConvSeq {
                        conversation: key,
                        seq,
                    }),
                });
            }
        };
        release(seq, body);
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() != self.seq + 1 {
                break;
            }
            let body = entry.remove();
            self.seq += 1;
            release(self.seq, body);
        }
        true
    }
}

/// The conversation key of the direct conversation between users `a` and `b`.
pub fn direct_key(a: &str, b: &str) -> u64 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut s = Vec::with_capacity(lo.len() + hi.len() + 1);
    s.extend_from_slice(lo.as_bytes());
    s.push(b'\n');
    s.extend_from_slice(hi.as_bytes());
    fnv1a(&s)
}

/// The conversation key of room `room` as seen by the receiver `me`: one run of seqs per
/// receiver (every subscriber gets every seq of the room).
pub fn room_key(room: &str, me: &str) -> u64 {
    fnv1a(format!("room\n{room}\n{me}").as_bytes())
}

/// The conversation key of group `group`: the same for every member (they all see the same
/// seqs).
pub fn group_key(group: &str) -> u64 {
    fnv1a(format!("group\n{group}").as_bytes())
}

/// The request id of the room JOIN written at start.
const JOIN_REQUEST_ID: u64 = 2;

/// Frame field numbers used by the hand-written `Send` encoder (checked against prost in tests).
const FRAME_SEND: u32 = 20;
const SEND_TO: u32 = 1;
const SEND_CLIENT_MSG_ID: u32 = 2;
const SEND_CONTENT_TYPE: u32 = 3;
const SEND_BODY: u32 = 4;
const CONV_TYPE: u32 = 1;
const CONV_ID: u32 = 2;
/// The content type loadgen sends: "application-defined", here 1 (text-like opaque bytes).
const CONTENT_TYPE: u64 = 1;

fn key_len(tag: u32) -> usize {
    encoded_len_varint(u64::from(tag << 3))
}

/// Appends the protobuf encoding of `Frame{send: Send{to: {kind, to}, client_msg_id, content_type, body}}`.
fn encode_send(
    kind: pb::ConversationType,
    to: &str,
    client_msg_id: u64,
    body: &[u8],
    out: &mut BytesMut,
) {
    let conv_len =
        key_len(CONV_TYPE) + 1 + key_len(CONV_ID) + encoded_len_varint(to.len() as u64) + to.len();
    let send_len = key_len(SEND_TO)
        + encoded_len_varint(conv_len as u64)
        + conv_len
        + key_len(SEND_CLIENT_MSG_ID)
        + encoded_len_varint(client_msg_id)
        + key_len(SEND_CONTENT_TYPE)
        + encoded_len_varint(CONTENT_TYPE)
        + key_len(SEND_BODY)
        + encoded_len_varint(body.len() as u64)
        + body.len();
    out.reserve(send_len + 8);
    encode_key(FRAME_SEND, WireType::LengthDelimited, out);
    encode_varint(send_len as u64, out);
    encode_key(SEND_TO, WireType::LengthDelimited, out);
    encode_varint(conv_len as u64, out);
    encode_key(CONV_TYPE, WireType::Varint, out);
    encode_varint(kind as u64, out);
    encode_key(CONV_ID, WireType::LengthDelimited, out);
    encode_varint(to.len() as u64, out);
    out.put_slice(to.as_bytes());
    encode_key(SEND_CLIENT_MSG_ID, WireType::Varint, out);
    encode_varint(client_msg_id, out);
    encode_key(SEND_CONTENT_TYPE, WireType::Varint, out);
    encode_varint(CONTENT_TYPE, out);
    encode_key(SEND_BODY, WireType::LengthDelimited, out);
    encode_varint(body.len() as u64, out);
    out.put_slice(body);
}

impl ParleyDriver {
    /// A driver for `endpoint`, logging in with `token` (minted for `names.of(client)`, device
    /// `d0`), framing as `framing`.
    pub fn new(endpoint: &Endpoint, token: String, framing: Framing) -> Self {
        Self {
            me: endpoint.names.of(endpoint.client),
            names: endpoint.names.clone(),
            token,
            framing,
            codec: FrameCodec::new(parley_proto::DEFAULT_MAX_FRAME_BYTES),
            cursors: Vec::new(),
            syncing: false,
            nonce: 0,
            scratch: BytesMut::new(),
            last_to: None,
            room: None,
            group: None,
            group_requests: Vec::new(),
            ready: false,
            reorder: false,
        }
    }

    /// Makes this connection hand direct messages on in seq order and ack only the unbroken run
    /// of seqs it holds, acking again on every arrival: for transports that may lose or reorder
    /// (UDP). Rooms and groups are not re-ordered.
    pub fn reordering(mut self) -> Self {
        self.reorder = true;
        self
    }

    /// Makes this connection join room `room` right after its login (it is ready once the
    /// join is answered) and send to that room: [`Driver::send`]'s `to` then names the room's
    /// client number ([`Names::of`] it is the room id).
    pub fn in_room(mut self, room: String) -> Self {
        self.room = Some(room);
        self
    }

    /// Makes this connection send to group `group` (it must be a member; the scenario's owner
    /// creates the group with [`Driver::group`]): [`Driver::send`]'s `to` is then ignored.
    pub fn in_group(mut self, group: String) -> Self {
        self.group = Some(group);
        self
    }

    /// Writes `frame` with the connection's framing.
    fn write_frame(&mut self, frame: &pb::Frame, out: &mut BytesMut) {
        match &mut self.framing {
            Framing::Tcp => {
                // Frames loadgen builds are small; the limit cannot be hit.
                let _ = self.codec.encode(frame, out);
            }
            Framing::Ws(ws) => {
                self.scratch.clear();
                frame::encode(frame, &mut self.scratch);
                ws.write_binary(&self.scratch, out);
            }
        }
    }

    /// The cursor of conversation `conv` (of type DIRECT or GROUP), made on first use.
    fn cursor(&mut self, conv: &pb::Conversation) -> &mut Cursor {
        let i = match self
            .cursors
            .iter()
            .position(|c| c.conv.id == conv.id && c.conv.r#type == conv.r#type)
        {
            Some(i) => i,
            None => {
                let key = if conv.r#type == pb::ConversationType::Group as i32 {
                    group_key(&conv.id)
                } else {
                    direct_key(&self.me, &conv.id)
                };
                self.cursors.push(Cursor {
                    conv: conv.clone(),
                    key,
                    seq: 0,
                    dirty: false,
                    ahead: BTreeMap::new(),
                });
                self.cursors.len() - 1
            }
        };
        &mut self.cursors[i]
    }

    fn sync_request(&mut self, out: &mut BytesMut) {
        let cursors = self
            .cursors
            .iter()
            .map(|c| pb::AckCursor {
                conversation: Some(c.conv.clone()),
                seq: c.seq,
            })
            .collect();
        self.syncing = true;
        let frame = pb::Frame {
            request_id: 0,
            body: Some(Body::SyncRequest(pb::SyncRequest {
                cursors,
                page_size: 0,
                max_per_conversation: 0,
            })),
        };
        self.write_frame(&frame, out);
    }

    /// Turns the messages of a `Deliver` (or, if `synced`, a `SyncPage`) into events.
    fn messages(&mut self, messages: Vec<pb::Message>, events: &mut Vec<Event>, synced: bool) {
        for m in messages {
            if let Some(c) = m
                .conversation
                .as_ref()
                .filter(|c| c.r#type == pb::ConversationType::Room as i32)
            {
                // Room messages need no ack.
                events.push(Event::Delivered {
                    seq: Some(ConvSeq {
                        conversation: room_key(&c.id, &self.me),
                        seq: m.seq,
                    }),
                    body: m.body,
                });
                continue;
            }
            if let Some(c) = m
                .conversation
                .as_ref()
                .filter(|c| c.r#type == pb::ConversationType::Group as i32)
            {
                let cursor = self.cursor(c);
                let key = cursor.key;
                if m.seq > cursor.seq {
                    cursor.seq = m.seq;
                    cursor.dirty = true;
                }
                let event = (m.kind == pb::MessageKind::System as i32).then(|| {
                    let e = m.event.unwrap_or_default();
                    GroupEvent {
                        action: match pb::GroupEventType::try_from(e.r#type) {
                            Ok(pb::GroupEventType::Created) => GroupAction::Create,
                            Ok(pb::GroupEventType::MembersAdded) => GroupAction::Add,
                            Ok(pb::GroupEventType::MembersRemoved) => GroupAction::Remove,
                            _ => GroupAction::Other,
                        },
                        actor: e.actor,
                        users: e.users,
                    }
                });
                events.push(Event::GroupMessage {
                    at: ConvSeq {
                        conversation: key,
                        seq: m.seq,
                    },
                    body: m.body,
                    event,
                    synced,
                });
                continue;
            }
            if m.from_user == self.me {
                continue; // our own message, echoed by a sync: we hold it already
            }
            let peer = m.conversation.unwrap_or_else(|| direct(&m.from_user));
            let reorder = self.reorder;
            let cursor = self.cursor(&peer);
            let key = cursor.key;
            if reorder {
                // Ack again whatever came: a retransmit means the broker lacks our ack.
                cursor.dirty = true;
                if m.seq <= cursor.seq {
                    // Again, below what we hold: reported, so the checker counts a redelivery.
                    events.push(Event::Delivered {
                        body: m.body,
                        seq: Some(ConvSeq {
                            conversation: key,
                            seq: m.seq,
                        }),
                    });
                } else {
                    cursor.hold(m.seq, Some(m.body), events);
                }
                continue;
            }
            if m.seq > cursor.seq {
                cursor.seq = m.seq;
                cursor.dirty = true;
            }
            events.push(Event::Delivered {
                body: m.body,
                seq: Some(ConvSeq {
                    conversation: key,
                    seq: m.seq,
                }),
            });
        }
    }

    fn on_frame(
        &mut self,
        frame: pb::Frame,
        out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError> {
        match frame.body {
            // In a room the connection is ready once the join pipelined behind the login is
            // answered.
            Some(Body::LoginResult(_)) if self.room.is_none() => {
                self.ready = true;
                events.push(Event::Ready);
            }
            Some(Body::LoginResult(_)) => {}
            Some(Body::RoomResult(_)) => {
                if !self.ready {
                    self.ready = true;
                    events.push(Event::Ready);
                }
            }
            Some(Body::RoomLag(lag)) => events.push(Event::Dropped {
                count: lag.dropped,
                first: Some(ConvSeq {
                    conversation: room_key(&lag.room_id, &self.me),
                    seq: lag.next_seq.saturating_sub(lag.dropped),
                }),
            }),
            Some(Body::Error(e)) if frame.request_id == JOIN_REQUEST_ID && !self.ready => {
                let code = pb::ErrorCode::try_from(e.code)
                    .map(|c| c.as_str_name())
                    .unwrap_or("UNKNOWN");
                return Err(DriverError(format!(
                    "room join refused: {code}: {}",
                    e.message
                )));
            }
            Some(Body::SendAck(ack)) => {
                let conv = ack.conversation.unwrap_or_default();
                if self.reorder && conv.r#type == pb::ConversationType::Direct as i32 {
                    // Our own message holds its seq: deliveries after it may now go on.
                    self.cursor(&conv).hold(ack.seq, None, events);
                }
                let key = if conv.r#type == pb::ConversationType::Room as i32 {
                    room_key(&conv.id, &self.me)
                } else if conv.r#type == pb::ConversationType::Group as i32 {
                    group_key(&conv.id)
                } else {
                    direct_key(&self.me, &conv.id)
                };
                events.push(Event::Acked {
                    tag: ack.client_msg_id,
                    seq: Some(ConvSeq {
                        conversation: key,
                        seq: ack.seq,
                    }),
                });
            }
            Some(Body::Deliver(d)) => self.messages(d.messages, events, false),
            Some(Body::SyncPage(p)) => {
                self.messages(p.messages, events, true);
                if p.done {
                    self.syncing = false;
                    events.push(Event::Synced);
                }
            }
            Some(Body::SyncSummary(_)) | Some(Body::Pong(_)) => {}
            Some(Body::Ping(p)) => {
                let pong = pb::Frame {
                    request_id: frame.request_id,
                    body: Some(Body::Pong(pb::Pong {
                        nonce: p.nonce,
                        time: 0,
                    })),
                };
                self.write_frame(&pong, out);
            }
            Some(Body::Behind(_)) => {
                events.push(Event::Behind);
                if !self.syncing {
                    self.sync_request(out);
                }
            }
            Some(Body::GroupResult(r)) => {
                self.group_requests.retain(|&id| id != frame.request_id);
                events.push(Event::GroupResult {
                    request: frame.request_id,
                    result: Ok(r.seq),
                });
            }
            Some(Body::Error(e)) if self.group_requests.contains(&frame.request_id) => {
                self.group_requests.retain(|&id| id != frame.request_id);
                let code = pb::ErrorCode::try_from(e.code)
                    .map(|c| c.as_str_name())
                    .unwrap_or("UNKNOWN");
                events.push(Event::GroupResult {
                    request: frame.request_id,
                    result: Err(format!("{code}: {}", e.message)),
                });
            }
            Some(Body::Error(e)) => {
                let code = pb::ErrorCode::try_from(e.code)
                    .map(|c| c.as_str_name())
                    .unwrap_or("UNKNOWN");
                events.push(Event::Error {
                    fatal: e.fatal,
                    text: format!("{code}: {}", e.message),
                });
            }
            _ => {
                return Err(DriverError(format!(
                    "unexpected {} frame from the broker",
                    frame::body_name(&frame)
                )));
            }
        }
        Ok(())
    }
}

fn direct(id: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Direct as i32,
        id: id.to_owned(),
    }
}

impl Driver for ParleyDriver {
    fn start(&mut self, out: &mut BytesMut) {
        if let Framing::Ws(ws) = &self.framing {
            ws.write_handshake(out);
        }
        let login = pb::Frame {
            request_id: 1,
            body: Some(Body::Login(pb::Login {
                protocol_version: PROTOCOL_VERSION,
                token: std::mem::take(&mut self.token),
                client_name: "parley-loadgen".into(),
            })),
        };
        self.write_frame(&login, out);
        if let Some(room) = &self.room {
            let join = pb::Frame {
                request_id: JOIN_REQUEST_ID,
                body: Some(Body::RoomRequest(pb::RoomRequest {
                    action: pb::RoomAction::Join as i32,
                    room_id: room.clone(),
                })),
            };
            self.write_frame(&join, out);
        }
    }

    fn receive(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError> {
        loop {
            let raw = match &mut self.framing {
                Framing::Tcp => self
                    .codec
                    .decode(input)
                    .map_err(|e| DriverError(format!("framing: {e}")))?,
                Framing::Ws(ws) => match ws
                    .read(input, out)
                    .map_err(|e| DriverError(format!("websocket: {e}")))?
                {
                    Some(WsMessage::Binary(b)) => Some(b),
                    Some(WsMessage::Text(_)) => {
                        return Err(DriverError("unexpected text message".into()));
                    }
                    None => None,
                },
            };
            let Some(raw) = raw else { return Ok(()) };
            let frame = frame::decode(raw).map_err(|e| DriverError(format!("frame: {e}")))?;
            self.on_frame(frame, out, events)?;
        }
    }

    fn send(&mut self, to: u32, tag: u64, body: &[u8], out: &mut BytesMut) {
        debug_assert!(tag != 0, "client_msg_id 0 is refused by the broker");
        if self.last_to.as_ref().is_none_or(|(n, _)| *n != to) {
            self.last_to = Some((to, self.names.of(to)));
        }
        let (kind, to_id) = if let Some(group) = &self.group {
            (pb::ConversationType::Group, group.as_str())
        } else if self.room.is_some() {
            let to_id = self.last_to.as_ref().map(|(_, s)| s.as_str()).unwrap_or("");
            (pb::ConversationType::Room, to_id)
        } else {
            let to_id = self.last_to.as_ref().map(|(_, s)| s.as_str()).unwrap_or("");
            (pb::ConversationType::Direct, to_id)
        };
        match &mut self.framing {
            Framing::Tcp => {
                let mut frame = std::mem::take(&mut self.scratch);
                frame.clear();
                encode_send(kind, to_id, tag, body, &mut frame);
                let _ = self.codec.encode_raw(&frame, out);
                self.scratch = frame;
            }
            Framing::Ws(ws) => {
                self.scratch.clear();
                encode_send(kind, to_id, tag, body, &mut self.scratch);
                ws.write_binary(&self.scratch, out);
            }
        }
    }

    fn heartbeat(&mut self, out: &mut BytesMut) {
        self.nonce += 1;
        let ping = pb::Frame {
            request_id: 0,
            body: Some(Body::Ping(pb::Ping { nonce: self.nonce })),
        };
        self.write_frame(&ping, out);
    }

    fn flush(&mut self, out: &mut BytesMut) {
        if !self.cursors.iter().any(|c| c.dirty) {
            return;
        }
        let mut acks = Vec::new();
        for c in self.cursors.iter_mut().filter(|c| c.dirty) {
            c.dirty = false;
            acks.push(pb::AckCursor {
                conversation: Some(c.conv.clone()),
                seq: c.seq,
            });
        }
        let frame = pb::Frame {
            request_id: 0,
            body: Some(Body::DeliverAck(pb::DeliverAck { acks })),
        };
        self.write_frame(&frame, out);
    }

    fn acks_sends(&self) -> bool {
        true
    }

    /// A sync already under way (after a `Behind`) is not asked for again (the broker would
    /// refuse it): its `done` page, which carries everything stored until then, answers both.
    fn sync(&mut self, out: &mut BytesMut) -> Result<(), DriverError> {
        if !self.syncing {
            self.sync_request(out);
        }
        Ok(())
    }

    fn group(&mut self, request: u64, op: &GroupOp, out: &mut BytesMut) -> Result<(), DriverError> {
        let action = match op.action {
            GroupAction::Create => pb::GroupAction::Create,
            GroupAction::Add => pb::GroupAction::AddMembers,
            GroupAction::Remove => pb::GroupAction::RemoveMembers,
            GroupAction::Other => {
                return Err(DriverError("loadgen makes no other group request".into()));
            }
        };
        let frame = pb::Frame {
            request_id: request,
            body: Some(Body::GroupRequest(pb::GroupRequest {
                action: action as i32,
                group_id: op.group.clone(),
                members: op.users.clone(),
                ..Default::default()
            })),
        };
        if frame::encoded_len(&frame) > parley_proto::DEFAULT_MAX_FRAME_BYTES {
            return Err(DriverError(format!(
                "a group request of {} users does not fit a frame",
                op.users.len()
            )));
        }
        self.group_requests.push(request);
        self.write_frame(&frame, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Role;
    use bytes::Bytes;

    fn endpoint(client: u32) -> Endpoint {
        Endpoint {
            names: Names {
                prefix: "t-".into(),
                homes: None,
            },
            client,
            listen: Some(client),
            role: Role::Both,
        }
    }

    #[test]
    fn the_hand_written_send_encodes_exactly_as_prost_does() {
        let mut ours = BytesMut::new();
        encode_send(
            pb::ConversationType::Direct,
            "t-c7",
            300,
            b"hello body",
            &mut ours,
        );
        let frame = pb::Frame {
            request_id: 0,
            body: Some(Body::Send(pb::Send {
                to: Some(direct("t-c7")),
                client_msg_id: 300,
                content_type: CONTENT_TYPE as u32,
                body: Bytes::from_static(b"hello body"),
                kind: 0,
                ref_seq: 0,
            })),
        };
        let mut theirs = BytesMut::new();
        frame::encode(&frame, &mut theirs);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn both_sides_of_a_direct_conversation_get_the_same_key() {
        assert_eq!(direct_key("a", "b"), direct_key("b", "a"));
        assert_ne!(direct_key("a", "b"), direct_key("a", "c"));
    }

    fn server_frames(frames: &[pb::Frame]) -> BytesMut {
        let mut buf = BytesMut::new();
        for f in frames {
            FrameCodec::default().encode(f, &mut buf).expect("fits");
        }
        buf
    }

    fn message(from: &str, seq: u64) -> pb::Message {
        pb::Message {
            conversation: Some(direct(from)),
            seq,
            from_user: from.into(),
            body: Bytes::from_static(b"x"),
            ..Default::default()
        }
    }

    #[test]
    fn deliveries_become_events_and_one_cumulative_ack_per_turn() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp);
        let deliver = |seqs: &[u64]| pb::Frame {
            request_id: 0,
            body: Some(Body::Deliver(pb::Deliver {
                messages: seqs.iter().map(|&s| message("t-c0", s)).collect(),
            })),
        };
        let mut input = server_frames(&[deliver(&[1, 2]), deliver(&[4])]);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        assert_eq!(events.len(), 3);
        assert!(out.is_empty());
        d.flush(&mut out);
        let ack = FrameCodec::default()
            .decode_frame(&mut out)
            .expect("valid")
            .expect("one frame");
        let Some(Body::DeliverAck(ack)) = ack.body else {
            panic!("not an ack")
        };
        assert_eq!(ack.acks.len(), 1);
        assert_eq!(ack.acks[0].seq, 4);
        assert!(out.is_empty());
        d.flush(&mut out);
        assert!(out.is_empty(), "nothing new, no ack");
    }

    #[test]
    fn a_send_ack_names_the_tag_and_the_shared_conversation_key() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp);
        let ack = pb::Frame {
            request_id: 0,
            body: Some(Body::SendAck(pb::SendAck {
                client_msg_id: 77,
                seq: 5,
                conversation: Some(direct("t-c0")),
                ..Default::default()
            })),
        };
        let mut input = server_frames(&[ack]);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        assert_eq!(
            events,
            vec![Event::Acked {
                tag: 77,
                seq: Some(ConvSeq {
                    conversation: direct_key("t-c0", "t-c1"),
                    seq: 5
                })
            }]
        );
    }

    #[test]
    fn behind_starts_a_sync_from_the_cursors_held() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp);
        let mut input = server_frames(&[
            pb::Frame {
                request_id: 0,
                body: Some(Body::Deliver(pb::Deliver {
                    messages: vec![message("t-c0", 3)],
                })),
            },
            pb::Frame {
                request_id: 0,
                body: Some(Body::Behind(pb::Behind::default())),
            },
        ]);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        let f = FrameCodec::default()
            .decode_frame(&mut out)
            .expect("valid")
            .expect("frame");
        let Some(Body::SyncRequest(req)) = f.body else {
            panic!("not a sync")
        };
        assert_eq!(req.cursors[0].seq, 3);
    }

    #[test]
    fn own_messages_echoed_by_a_sync_are_not_deliveries() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp);
        let mut input = server_frames(&[pb::Frame {
            request_id: 0,
            body: Some(Body::SyncPage(pb::SyncPage {
                messages: vec![message("t-c1", 1), message("t-c0", 2)],
                done: true,
            })),
        }]);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        assert_eq!(events.len(), 2);
        assert!(matches!(events[1], Event::Synced));
    }

    #[test]
    fn in_a_room_the_join_follows_the_login_and_its_answer_makes_the_connection_ready() {
        let mut d =
            ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp).in_room("t-c0".into());
        let mut out = BytesMut::new();
        d.start(&mut out);
        let mut codec = FrameCodec::default();
        let login = codec.decode_frame(&mut out).expect("valid").expect("login");
        assert!(matches!(login.body, Some(Body::Login(_))));
        let join = codec.decode_frame(&mut out).expect("valid").expect("join");
        let Some(Body::RoomRequest(req)) = join.body else {
            panic!("not a join")
        };
        assert_eq!(
            (req.action, req.room_id.as_str()),
            (pb::RoomAction::Join as i32, "t-c0")
        );

        let mut input = server_frames(&[
            pb::Frame {
                request_id: 1,
                body: Some(Body::LoginResult(pb::LoginResult::default())),
            },
            pb::Frame {
                request_id: JOIN_REQUEST_ID,
                body: Some(Body::RoomResult(pb::RoomResult::default())),
            },
        ]);
        let mut events = Vec::new();
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        assert_eq!(events, vec![Event::Ready], "ready once, after the join");
    }

    #[test]
    fn a_room_lag_is_reported_as_dropped_messages_numbered_before_the_next_seq() {
        let mut d =
            ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp).in_room("t-c0".into());
        let room = pb::Conversation {
            r#type: pb::ConversationType::Room as i32,
            id: "t-c0".into(),
        };
        let mut input = server_frames(&[
            pb::Frame {
                request_id: 0,
                body: Some(Body::RoomLag(pb::RoomLag {
                    room_id: "t-c0".into(),
                    dropped: 3,
                    next_seq: 7,
                })),
            },
            pb::Frame {
                request_id: 0,
                body: Some(Body::Deliver(pb::Deliver {
                    messages: vec![pb::Message {
                        conversation: Some(room),
                        seq: 7,
                        from_user: "t-c0".into(),
                        body: Bytes::from_static(b"x"),
                        ..Default::default()
                    }],
                })),
            },
        ]);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        let key = room_key("t-c0", "t-c1");
        assert_eq!(
            events,
            vec![
                Event::Dropped {
                    count: 3,
                    first: Some(ConvSeq {
                        conversation: key,
                        seq: 4
                    })
                },
                Event::Delivered {
                    body: Bytes::from_static(b"x"),
                    seq: Some(ConvSeq {
                        conversation: key,
                        seq: 7
                    })
                },
            ]
        );
        d.flush(&mut out);
        assert!(out.is_empty(), "room messages are not acked");
    }

    #[test]
    fn a_refused_room_join_fails_the_connection() {
        let mut d =
            ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp).in_room("t-c0".into());
        let mut input = server_frames(&[pb::Frame {
            request_id: JOIN_REQUEST_ID,
            body: Some(Body::Error(pb::Error {
                code: pb::ErrorCode::Forbidden as i32,
                message: "the room is full".into(),
                ..Default::default()
            })),
        }]);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        let e = d
            .receive(&mut input, &mut out, &mut events)
            .expect_err("refused");
        assert!(e.0.contains("room is full"), "{e}");
    }

    fn group(id: &str) -> pb::Conversation {
        pb::Conversation {
            r#type: pb::ConversationType::Group as i32,
            id: id.into(),
        }
    }

    #[test]
    fn in_a_group_a_send_goes_to_the_group_and_its_ack_carries_the_groups_key() {
        let mut d =
            ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp).in_group("t-g0".into());
        let mut out = BytesMut::new();
        d.send(7, 5, b"body", &mut out);
        let f = FrameCodec::default()
            .decode_frame(&mut out)
            .expect("valid")
            .expect("a send");
        let Some(Body::Send(send)) = f.body else {
            panic!("not a send")
        };
        assert_eq!(send.to, Some(group("t-g0")), "`to` is ignored in a group");
        let mut input = server_frames(&[pb::Frame {
            request_id: 0,
            body: Some(Body::SendAck(pb::SendAck {
                client_msg_id: 5,
                seq: 9,
                conversation: Some(group("t-g0")),
                ..Default::default()
            })),
        }]);
        let mut events = Vec::new();
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        assert_eq!(
            events,
            vec![Event::Acked {
                tag: 5,
                seq: Some(ConvSeq {
                    conversation: group_key("t-g0"),
                    seq: 9
                })
            }]
        );
    }

    #[test]
    fn group_messages_and_their_changes_become_group_events_acked_per_group() {
        let mut d =
            ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp).in_group("t-g0".into());
        let removal = pb::Message {
            conversation: Some(group("t-g0")),
            seq: 4,
            from_user: "t-c0".into(),
            kind: pb::MessageKind::System as i32,
            event: Some(pb::GroupEvent {
                r#type: pb::GroupEventType::MembersRemoved as i32,
                actor: "t-c0".into(),
                users: vec!["t-c2".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let own = pb::Message {
            conversation: Some(group("t-g0")),
            seq: 5,
            from_user: "t-c1".into(),
            body: Bytes::from_static(b"mine"),
            ..Default::default()
        };
        let mut input = server_frames(&[
            pb::Frame {
                request_id: 0,
                body: Some(Body::Deliver(pb::Deliver {
                    messages: vec![removal],
                })),
            },
            pb::Frame {
                request_id: 0,
                body: Some(Body::SyncPage(pb::SyncPage {
                    messages: vec![own],
                    done: true,
                })),
            },
        ]);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        let at = |seq| ConvSeq {
            conversation: group_key("t-g0"),
            seq,
        };
        assert_eq!(
            events,
            vec![
                Event::GroupMessage {
                    at: at(4),
                    body: Bytes::new(),
                    event: Some(GroupEvent {
                        action: GroupAction::Remove,
                        actor: "t-c0".into(),
                        users: vec!["t-c2".into()],
                    }),
                    synced: false,
                },
                Event::GroupMessage {
                    at: at(5),
                    body: Bytes::from_static(b"mine"),
                    event: None,
                    synced: true,
                },
                Event::Synced,
            ],
            "its own messages, echoed by a sync, are reported too"
        );
        d.flush(&mut out);
        let ack = FrameCodec::default()
            .decode_frame(&mut out)
            .expect("valid")
            .expect("an ack");
        let Some(Body::DeliverAck(ack)) = ack.body else {
            panic!("not an ack")
        };
        assert_eq!(
            ack.acks,
            vec![pb::AckCursor {
                conversation: Some(group("t-g0")),
                seq: 5
            }]
        );
    }

    #[test]
    fn a_group_request_is_answered_by_its_result_or_its_refusal() {
        let mut d =
            ParleyDriver::new(&endpoint(0), "tok".into(), Framing::Tcp).in_group("t-g0".into());
        let mut out = BytesMut::new();
        for (request, action) in [(1000, GroupAction::Create), (1001, GroupAction::Add)] {
            let op = GroupOp {
                action,
                group: "t-g0".into(),
                users: vec!["t-c1".into(), "t-c2".into()],
            };
            d.group(request, &op, &mut out).expect("fits");
        }
        let mut codec = FrameCodec::default();
        let create = codec
            .decode_frame(&mut out)
            .expect("valid")
            .expect("create");
        let Some(Body::GroupRequest(req)) = create.body else {
            panic!("not a group request")
        };
        assert_eq!(create.request_id, 1000);
        assert_eq!(
            (req.action, req.group_id.as_str(), req.members.len()),
            (pb::GroupAction::Create as i32, "t-g0", 2)
        );
        let mut input = server_frames(&[
            pb::Frame {
                request_id: 1000,
                body: Some(Body::GroupResult(pb::GroupResult {
                    seq: 1,
                    ..Default::default()
                })),
            },
            pb::Frame {
                request_id: 1001,
                body: Some(Body::Error(pb::Error {
                    code: pb::ErrorCode::GroupFull as i32,
                    message: "full".into(),
                    ..Default::default()
                })),
            },
        ]);
        let mut events = Vec::new();
        d.receive(&mut input, &mut out, &mut events).expect("valid");
        assert_eq!(
            events,
            vec![
                Event::GroupResult {
                    request: 1000,
                    result: Ok(1)
                },
                Event::GroupResult {
                    request: 1001,
                    result: Err("GROUP_FULL: full".into())
                },
            ]
        );
        let other = GroupOp {
            action: GroupAction::Other,
            group: "t-g0".into(),
            users: Vec::new(),
        };
        assert!(d.group(1002, &other, &mut out).is_err());
    }

    #[test]
    fn a_sync_already_under_way_is_not_asked_for_again() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp);
        let mut out = BytesMut::new();
        d.sync(&mut out).expect("parley syncs");
        let first = out.len();
        assert!(first > 0);
        d.sync(&mut out).expect("parley syncs");
        assert_eq!(out.len(), first, "the running sync answers both");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp);
        let mut input = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..]);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        assert!(d.receive(&mut input, &mut out, &mut events).is_err());
    }

    fn delivered_seqs(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Delivered { seq: Some(at), .. } => Some(at.seq),
                _ => None,
            })
            .collect()
    }

    fn acked_cursor(d: &mut ParleyDriver) -> Option<u64> {
        let mut out = BytesMut::new();
        d.flush(&mut out);
        let frame = FrameCodec::default()
            .decode_frame(&mut out)
            .expect("valid")?;
        let Some(Body::DeliverAck(ack)) = frame.body else {
            panic!("not an ack: {frame:?}");
        };
        Some(ack.acks[0].seq)
    }

    fn deliver(seqs: &[u64]) -> pb::Frame {
        pb::Frame {
            request_id: 0,
            body: Some(Body::Deliver(pb::Deliver {
                messages: seqs.iter().map(|&s| message("t-c0", s)).collect(),
            })),
        }
    }

    #[test]
    fn reordering_holds_messages_after_a_hole_and_acks_only_the_unbroken_run() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp).reordering();
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        d.receive(
            &mut server_frames(&[deliver(&[1, 3, 4])]),
            &mut out,
            &mut events,
        )
        .expect("valid");
        assert_eq!(delivered_seqs(&events), vec![1], "3 and 4 wait for 2");
        assert_eq!(
            acked_cursor(&mut d),
            Some(1),
            "the ack does not pass the hole"
        );
        events.clear();
        // The broker sends 2 (and 3) again: everything goes on in order.
        d.receive(
            &mut server_frames(&[deliver(&[2, 3])]),
            &mut out,
            &mut events,
        )
        .expect("valid");
        assert_eq!(
            delivered_seqs(&events),
            vec![2, 3, 4, 3],
            "2 releases 3 and 4; the second 3 is a redelivery (the checker counts it so)"
        );
        assert_eq!(acked_cursor(&mut d), Some(4));
        events.clear();
        // A retransmit below the run is reported (a redelivery) and acked again.
        d.receive(&mut server_frames(&[deliver(&[4])]), &mut out, &mut events)
            .expect("valid");
        assert_eq!(delivered_seqs(&events), vec![4]);
        assert_eq!(acked_cursor(&mut d), Some(4), "a lost ack is made good");
    }

    #[test]
    fn reordering_counts_own_acked_sends_as_held() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp).reordering();
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        // Seq 1 is the peer's, 2 our own (its ack comes late), 3 the peer's again.
        d.receive(
            &mut server_frames(&[deliver(&[1, 3])]),
            &mut out,
            &mut events,
        )
        .expect("valid");
        assert_eq!(delivered_seqs(&events), vec![1]);
        events.clear();
        let ack = pb::Frame {
            request_id: 0,
            body: Some(Body::SendAck(pb::SendAck {
                client_msg_id: 1,
                seq: 2,
                conversation: Some(direct("t-c0")),
                ..Default::default()
            })),
        };
        d.receive(&mut server_frames(&[ack]), &mut out, &mut events)
            .expect("valid");
        assert_eq!(
            delivered_seqs(&events),
            vec![3],
            "our seq 2 filled the hole"
        );
        assert!(matches!(events.last(), Some(Event::Acked { tag: 1, .. })));
        assert_eq!(acked_cursor(&mut d), Some(3));
    }

    #[test]
    fn without_reordering_deliveries_pass_straight_through() {
        let mut d = ParleyDriver::new(&endpoint(1), "tok".into(), Framing::Tcp);
        let (mut out, mut events) = (BytesMut::new(), Vec::new());
        d.receive(
            &mut server_frames(&[deliver(&[1, 3, 2])]),
            &mut out,
            &mut events,
        )
        .expect("valid");
        assert_eq!(
            delivered_seqs(&events),
            vec![1, 3, 2],
            "the checker judges the order"
        );
    }
}
