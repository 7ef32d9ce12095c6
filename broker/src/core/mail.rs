//! What shards say to each other: [`ShardMsg`]s, always in batches (one `Vec` per target shard
//! per turn) over a bounded channel plus a wake-up, which the driver carries (over a link, to
//! another node's shard); and where each kind of mail goes in the core that receives it.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parley_proto::pb;

use super::conv::Conv;
use super::group::Change;
use super::wire;
use crate::auth::Identity;
use crate::transport::Transport;

/// A connection anywhere on the node: its shard, slot and the slot's generation (a reused slot
/// has a new one, so a late reply for a closed connection is dropped instead of reaching its
/// successor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Origin {
    pub(crate) shard: usize,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

/// A logged-in device, as every shard names it: the user and the device, shared strings made
/// once at login.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Device {
    #[serde(with = "wire::shared_str")]
    pub(crate) user: Arc<str>,
    #[serde(with = "wire::shared_str")]
    pub(crate) device: Arc<str>,
}

/// A validated send, for the conversation's owner.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Append {
    pub(crate) origin: Origin,
    pub(crate) request_id: u64,
    pub(crate) sender: Device,
    #[serde(with = "wire::conv")]
    pub(crate) conv: Arc<Conv>,
    /// The send as decoded (its body borrows the read buffer; `to` is the sender's view, echoed
    /// in the ack).
    #[serde(with = "wire::prost_msg")]
    pub(crate) send: pb::Send,
    /// Wall-clock time at the sender's shard when the send arrived.
    pub(crate) unix_ms: i64,
    /// Monotonic time (µs, [`super::Now::us`]) at the sender's shard when the send was routed to
    /// its owner (after the send gate, if a hook parked it): the start of its send-to-deliver
    /// latency.
    #[serde(with = "wire::mono")]
    pub(crate) arrived_us: u64,
}

/// A stored message's acknowledgement, for the sender's connection.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Acked {
    pub(crate) to: Origin,
    pub(crate) request_id: u64,
    #[serde(with = "wire::prost_msg")]
    pub(crate) ack: pb::SendAck,
}

/// One recipient user of a delivery; `exclude` is the sending device when the sender is this
/// user (its other devices receive, the sender does not).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Recipient {
    #[serde(with = "wire::shared_str")]
    pub(crate) user: Arc<str>,
    #[serde(with = "wire::shared_str_opt")]
    pub(crate) exclude: Option<Arc<str>>,
}

/// A stored message on its way to its recipients on one home shard: the bytes encoded once by
/// the owner, shared by every delivery and retransmit.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Delivery {
    #[serde(with = "wire::conv")]
    pub(crate) conv: Arc<Conv>,
    pub(crate) seq: u64,
    pub(crate) stored: Bytes,
    /// When it was stored (ms since the Unix epoch).
    pub(crate) time: i64,
    /// A send's [`Append::arrived_us`] (`None` for a group membership event, not a send): live
    /// pushes record their send-to-deliver latency from it.
    #[serde(with = "wire::mono_opt")]
    pub(crate) sent_us: Option<u64>,
    /// A direct conversation's recipients (empty for a group).
    pub(crate) recipients: Vec<Recipient>,
    /// A group message: the home pushes it to its members online.
    pub(crate) group: Option<GroupPush>,
}

/// How a home shard pushes a group's message: to the group's members it holds that are online,
/// not to the sending device; a membership event also says who starts and stops receiving.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct GroupPush {
    pub(crate) sender: Device,
    pub(crate) change: Option<Arc<Change>>,
}

/// A read-counts request, for the group's owner.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct ReadCountsAsk {
    pub(crate) origin: Origin,
    pub(crate) request_id: u64,
    #[serde(with = "wire::conv")]
    pub(crate) conv: Arc<Conv>,
    pub(crate) user: Arc<str>,
    #[serde(with = "wire::prost_msg")]
    pub(crate) view: pb::Conversation,
    pub(crate) from: u64,
    pub(crate) count: u32,
}

/// A group request, for the group's owner.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct GroupOp {
    pub(crate) origin: Origin,
    pub(crate) request_id: u64,
    pub(crate) actor: Device,
    #[serde(with = "wire::conv")]
    pub(crate) conv: Arc<Conv>,
    #[serde(with = "wire::prost_msg")]
    pub(crate) req: pb::GroupRequest,
    /// Wall-clock time at the requester's shard.
    pub(crate) unix_ms: i64,
}

/// At start-up, to a home shard: a group and what its users there may read.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct GroupInbox {
    #[serde(with = "wire::conv")]
    pub(crate) conv: Arc<Conv>,
    pub(crate) last_seq: u64,
    pub(crate) last_time: i64,
    /// Users of this home, with the seqs they may read, `(from, to)` inclusive (`to` is
    /// `u64::MAX` for a current member).
    pub(crate) users: Vec<(Arc<str>, u64, u64)>,
}

/// Why a range of a conversation is read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum ReadPurpose {
    /// A page of a running sync.
    Sync,
    /// The newest message of a conversation, for the conversation list being answered.
    ListFill,
    /// Messages a home learned of without their delivery, for its user's devices online
    /// (see `super::remote`).
    Fill,
    /// A history page for this request, in this view.
    History {
        request_id: u64,
        #[serde(with = "wire::prost_msg")]
        view: pb::Conversation,
    },
}

/// A read of a conversation's stored messages, for its owner.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Read {
    pub(crate) reply: Origin,
    #[serde(with = "wire::conv")]
    pub(crate) conv: Arc<Conv>,
    /// For a group: the user reading (the owner holds the range to what it may read).
    pub(crate) reader: Option<Arc<str>>,
    /// Seqs `[from, to]`.
    pub(crate) from: u64,
    pub(crate) to: u64,
    pub(crate) limit: u32,
    pub(crate) newest_first: bool,
    pub(crate) purpose: ReadPurpose,
}

/// The answer to a [`Read`]: stored messages in ascending seq order.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct ReadDone {
    pub(crate) to: Origin,
    #[serde(with = "wire::conv")]
    pub(crate) conv: Arc<Conv>,
    pub(crate) purpose: ReadPurpose,
    pub(crate) messages: Vec<(u64, Bytes)>,
    /// Seqs of the range not returned remain: the next page starts after the last message.
    pub(crate) more: bool,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    /// The upper end of the range asked for (for continuing a sync).
    pub(crate) to_seq: u64,
    /// The reader may not read this conversation at all.
    pub(crate) refused: Option<super::error::Refusal>,
}

/// A logged-in connection moving to its user's home shard. The driver moves the socket with it.
#[derive(Debug)]
pub struct Adoption {
    pub(crate) transport: Transport,
    /// Bytes read and not yet decoded (frames pipelined behind the login).
    pub(crate) inbuf: BytesMut,
    /// Bytes queued and not yet written.
    pub(crate) out: BytesMut,
    pub(crate) identity: Identity,
    pub(crate) request_id: u64,
}

/// A login accepted on another node for a user homed here: its session runs here, its socket
/// stays there (`super::relay`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RelayOpen {
    /// The accepting connection (the key of every mail of the session).
    pub(crate) from: Origin,
    /// Who logged in.
    pub(crate) identity: crate::auth::Identity,
    /// The login's request id (its answer comes from here).
    pub(crate) request_id: u64,
}

/// One message between shards (what it carries is the core's business).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[allow(private_interfaces)]
pub enum ShardMsg {
    /// To a conversation's owner: store this send.
    Append(Box<Append>),
    /// To a connection's shard: the send-ack of a stored message.
    Acked(Acked),
    /// To a connection's shard: a refusal of its request.
    Refused {
        /// The connection.
        to: Origin,
        /// The refused request.
        request_id: u64,
        /// The refused send's client message id (0 if not a send).
        client_msg_id: u64,
        /// Why.
        refusal: super::error::Refusal,
    },
    /// To a home shard: a stored message for some of its users.
    Deliver(Box<Delivery>),
    /// To a user's home shard at start-up: conversation `conv` has messages up to `last_seq`.
    Inbox {
        /// The user.
        user: Arc<str>,
        /// The conversation.
        #[serde(with = "wire::conv")]
        conv: Arc<Conv>,
        /// Its latest seq.
        last_seq: u64,
        /// When its latest message was stored.
        last_time: i64,
    },
    /// To a group's owner: a member's read cursor moved (or, at start-up, is).
    GroupRead {
        /// The group.
        #[serde(with = "wire::conv")]
        conv: Arc<Conv>,
        /// The member.
        user: Arc<str>,
        /// Its read cursor.
        read: u64,
    },
    /// To a user's home: the other user of a direct conversation read up to `seq`.
    PeerRead {
        /// The user told.
        user: Arc<str>,
        /// The conversation.
        #[serde(with = "wire::conv")]
        conv: Arc<Conv>,
        /// Who read.
        reader: Arc<str>,
        /// Up to here.
        seq: u64,
        /// When (ms since the Unix epoch).
        time: i64,
    },
    /// To a user's home at start-up: the user sent `conv`'s message `seq` (so it read it).
    OwnRead {
        /// The sender.
        user: Arc<str>,
        /// The conversation.
        #[serde(with = "wire::conv")]
        conv: Arc<Conv>,
        /// The seq of its newest message there.
        seq: u64,
    },
    /// To a group's owner: how many members read a range of seqs.
    ReadCountsAsk(Box<ReadCountsAsk>),
    /// The answer to `ReadCountsAsk` (or a refusal of it: `Refused`).
    ReadCountsDone {
        /// The connection.
        to: Origin,
        /// The request.
        request_id: u64,
        /// The counts.
        #[serde(with = "wire::prost_box")]
        result: Box<pb::ReadCounts>,
    },
    /// To a group's owner: a group request.
    Group(Box<GroupOp>),
    /// To a connection's shard: the answer to its group request.
    GroupDone {
        /// The connection.
        to: Origin,
        /// The request.
        request_id: u64,
        /// The answer.
        #[serde(with = "wire::prost_box")]
        result: Box<pb::GroupResult>,
    },
    /// To a home shard at start-up: a group's users there.
    GroupInbox(Box<GroupInbox>),
    /// To a conversation's owner: read a range.
    Read(Box<Read>),
    /// The answer to `Read`.
    ReadDone(Box<ReadDone>),
    /// To a room's owner: a join, leave or query of a room.
    RoomChange(Box<super::room::RoomChange>),
    /// To a listener's shard: the owner's answer to a `RoomChange`.
    RoomAnswer(Box<super::room::RoomAnswer>),
    /// To a room's owner: a send to the room.
    RoomPost(Box<super::room::RoomPost>),
    /// To a shard with listeners of a room: one message for all of them.
    RoomCast(Box<super::room::RoomCast>),
    /// Presence and typing (see [`super::presence::Mail`]).
    Presence(Box<super::presence::Mail>),
    /// To a user's home on another node: open the session of a relayed connection.
    RelayOpen(Box<RelayOpen>),
    /// To a relayed session's home: frames from its client (TCP framing).
    RelayIn {
        /// The accepting connection.
        from: Origin,
        /// The frames.
        #[serde(with = "super::wire::shared_bytes")]
        bytes: Bytes,
    },
    /// To a relayed connection: frames for its client (TCP framing).
    RelayOut {
        /// The accepting connection.
        to: Origin,
        /// The frames.
        #[serde(with = "super::wire::shared_bytes")]
        bytes: Bytes,
    },
    /// Window credit of a relayed session: `bytes` of the other side's were taken.
    RelayAck {
        /// The accepting connection.
        key: Origin,
        /// To the home (its output was taken), or to the accepting shard (its input was).
        to_home: bool,
        /// How many.
        bytes: u32,
    },
    /// A relayed session ended: at the home (with its last words for the client), or at the
    /// accepting shard (the client is gone).
    RelayClose {
        /// The accepting connection.
        key: Origin,
        /// To the home, or to the accepting shard.
        to_home: bool,
        /// The home's last frames (TCP framing); empty to the home.
        #[serde(with = "super::wire::shared_bytes")]
        last: Bytes,
    },
}

impl<B: parley_storage::Backend> super::ShardCore<B> {
    /// Sends `msg` to shard `target` (this one: handled before the turn ends). Mail for a node
    /// this shard has not heard is reachable goes back at once (`super::remote`).
    pub(super) fn route(&mut self, target: usize, msg: ShardMsg) {
        if target == self.index {
            self.local.push_back(msg);
        } else if self.reachable & (1 << self.placement.node_of(target)) == 0 {
            self.unreachable(msg);
        } else if let Some(q) = self.outgoing.get_mut(target) {
            q.push(msg);
        }
    }

    /// Handles the mail this shard sent itself.
    pub(super) fn drain_local(&mut self) {
        while let Some(msg) = self.local.pop_front() {
            self.on_mail(msg);
        }
    }

    /// Hands one piece of mail to the part of the core it is for.
    pub(super) fn on_mail(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Append(a) => self.on_append(*a),
            ShardMsg::Acked(a) => {
                if let Some(conn) = self.conn_of(a.to) {
                    self.unreserve(conn, super::session::ACK_RESERVE);
                    self.write_spliced(conn, |out| {
                        parley_proto::splice::encode_send_ack(a.request_id, &a.ack, out);
                    });
                }
            }
            ShardMsg::Refused {
                to,
                request_id,
                client_msg_id,
                refusal,
            } => {
                if let Some(conn) = self.conn_of(to) {
                    self.unreserve(conn, super::session::ACK_RESERVE);
                    self.refuse(conn, request_id, client_msg_id, &refusal);
                }
            }
            ShardMsg::Deliver(d) => self.on_deliver(*d),
            ShardMsg::Inbox {
                user,
                conv,
                last_seq,
                last_time,
            } => self.on_inbox(user, conv, last_seq, last_time),
            ShardMsg::GroupRead { conv, user, read } => self.on_group_read(&conv, &user, read),
            ShardMsg::PeerRead {
                user,
                conv,
                reader,
                seq,
                time,
            } => self.on_peer_read(&user, &conv, &reader, seq, time),
            ShardMsg::OwnRead { user, conv, seq } => {
                let e = self.home.note(&user, &conv, 0);
                e.cursors.read = e.cursors.read.max(seq);
            }
            ShardMsg::ReadCountsAsk(ask) => self.on_read_counts_ask(*ask),
            ShardMsg::ReadCountsDone {
                to,
                request_id,
                result,
            } => {
                if let Some(conn) = self.conn_of(to) {
                    self.unreserve(conn, super::receipt::READ_COUNTS_RESERVE);
                    self.write_frame(
                        conn,
                        &pb::Frame {
                            request_id,
                            body: Some(pb::frame::Body::ReadCounts(*result)),
                        },
                    );
                }
            }
            ShardMsg::Group(op) => self.on_group_op(*op),
            ShardMsg::GroupDone {
                to,
                request_id,
                result,
            } => {
                if let Some(conn) = self.conn_of(to) {
                    self.unreserve(conn, super::session::ACK_RESERVE);
                    self.write_frame(
                        conn,
                        &pb::Frame {
                            request_id,
                            body: Some(pb::frame::Body::GroupResult(*result)),
                        },
                    );
                }
            }
            ShardMsg::GroupInbox(gi) => self.on_group_inbox(*gi),
            ShardMsg::Read(r) => self.on_read(*r),
            ShardMsg::ReadDone(d) => self.on_read_done(*d),
            ShardMsg::RoomChange(c) => self.on_room_change(*c),
            ShardMsg::RoomAnswer(a) => self.on_room_answer(*a),
            ShardMsg::RoomPost(p) => self.on_room_post(*p),
            ShardMsg::RoomCast(c) => self.on_room_cast(*c),
            ShardMsg::Presence(m) => self.on_presence_mail(*m),
            m @ (ShardMsg::RelayOpen(_)
            | ShardMsg::RelayIn { .. }
            | ShardMsg::RelayOut { .. }
            | ShardMsg::RelayAck { .. }
            | ShardMsg::RelayClose { .. }) => self.on_relay_mail(m),
        }
    }
}
