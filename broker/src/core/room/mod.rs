//! Rooms: ephemeral, at-most-once broadcast from one connection to every connection that joined
//! (a live event: one sender, up to `rooms.max_listeners` listeners).
//!
//! * **Membership** is per connection, in memory only: it ends with the connection or a
//!   `LEAVE_ROOM`. A connection's rooms are in its [`ConnRooms`]; the connections of this shard
//!   in a room are in [`Rooms::local`], the list a message is fanned out over.
//! * **Owner.** A room has an owner shard, placed by the stable id of the key `r<room_id>`
//!   ([`owner_of`]), as conversations are. The owner knows how many listeners each shard has
//!   (joins and leaves are mail to it, [`RoomChange`]) and their total, the audience; it
//!   assigns each message the room's next seq (1, 2, 3, … since the room came to exist on this
//!   node: in memory, so a restart, or a room forgotten for lack of listeners, starts again from
//!   1), a message id from the shard's generator, encodes the `Message` once, keeps the last
//!   `rooms.history` of them for joiners, acks the sender (durability MEMORY) and sends **one**
//!   [`RoomCast`] per shard that has listeners.
//! * **Fan-out.** The listeners' shard frames the message once per wire form its listeners read
//!   (TCP, WebSocket binary, WebSocket JSON text) and appends those same bytes to each
//!   listener's queue, except the sender's own connection. Nothing per listener is kept: no
//!   timer, no retransmit, no ack (a `DeliverAck` for a room is ignored).
//! * **Slow listeners.** A connection whose queue (with its reservations) is over
//!   `room_share_bytes` (half its budget) gets room messages in its bounded [`LagQueue`] per
//!   room instead (references to the one copy of each message). When a queue is full the oldest
//!   message is dropped and counted. When the connection drains ([`ShardCore::pump_rooms`], from
//!   `handle_written`) the held messages are written, each room's preceded by a `RoomLag` saying
//!   how many were dropped. So room traffic never takes a connection past its budget: it never
//!   causes `Behind`, a hold of its input, or by itself a SLOW_CONSUMER close (a reader that
//!   reads nothing at all for `timeouts.write_stall_ms` is closed as dead, as for any traffic).
//! * **Joining.** The owner answers a join ([`RoomAnswer`]) with the audience, the last seq and
//!   the history; the listener is put on the shard's list only when that answer arrives. Mail
//!   between two shards is FIFO, so every message the owner sent before the answer (seq up to
//!   `last_seq`) reached the shard before it and is not pushed to the joiner, and every later
//!   one comes after it: the joiner gets `RoomResult`, the history, then `last_seq + 1`, … once
//!   each, in order.
//!
//! ### Invariants
//! * The owner counts a connection's join once: a join the owner counted ([`RoomAnswer::counted`])
//!   whose connection no longer waits for it (gone, left, or already counted) is undone with a
//!   leave, and a connection leaves (or closes) with a leave mail only for a counted join. So
//!   `per_shard[s]` is the number of counted joins of shard `s` not yet left, and
//!   `audience` is their sum.
//! * A connection is on [`Rooms::local`]'s list of a room exactly when its [`Joined`] entry for
//!   that room has `at: Some(i)`, and then the list holds it at index `i`.
//! * A [`LagQueue`] holds at most `rooms.listener_queue` messages, in seq order; it is non-empty
//!   only while the connection is in the room, and new messages go behind it, never around it.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parley_proto::pb::frame::Body;
use parley_proto::{pb, splice};
use parley_storage::Backend;

use super::conn::ConnId;
use super::conv::{MAX_CONV_ID_BYTES, Placement, stable_hash};
use super::error::Refusal;
use super::mail::{Acked, Device, Origin, ShardMsg};
use super::session::ACK_RESERVE;
use super::{FastMap, ShardCore};
use crate::loglimit::LogKind;
use crate::transport::WireForm;

mod handlers;

/// The shard that owns room `room`: placed by the stable id of the key `r<room>`, like a
/// conversation (the `r` keeps room keys apart from conversation keys).
pub(crate) fn owner_of(placement: &Placement, room: &str) -> usize {
    let mut key = Vec::with_capacity(room.len() + 1);
    key.push(b'r');
    key.extend_from_slice(room.as_bytes());
    placement.owner(stable_hash(&key))
}

/// Whether `room` is an acceptable room id: 1..=128 bytes (it is UTF-8 already: protobuf and
/// JSON strings are checked by the decoder).
pub(crate) fn valid_room_id(room: &str) -> bool {
    !room.is_empty() && room.len() <= MAX_CONV_ID_BYTES
}

/// The conversation of room `room`, as every listener names it.
fn room_view(room: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Room as i32,
        id: room.to_owned(),
    }
}

// ----- one connection's rooms ----------------------------------------------------------------------

/// Room messages held for one listener of one room while its connection is slow, and how many
/// were dropped since it was last told.
#[derive(Debug, Default)]
pub(crate) struct LagQueue {
    /// `(seq, stored message)`, ascending seq.
    pending: VecDeque<(u64, Bytes)>,
    /// Messages dropped since the last `RoomLag`.
    dropped: u64,
}

impl LagQueue {
    /// Holds message `seq`; if `capacity` are held, the oldest is dropped first. Returns how
    /// many were dropped.
    pub(crate) fn push(&mut self, seq: u64, stored: Bytes, capacity: usize) -> usize {
        debug_assert!(
            self.pending.back().is_none_or(|&(s, _)| s < seq),
            "room messages arrive in seq order"
        );
        let mut dropped = 0;
        while self.pending.len() >= capacity.max(1) {
            self.pending.pop_front();
            self.dropped += 1;
            dropped += 1;
        }
        self.pending.push_back((seq, stored));
        debug_assert!(self.pending.len() <= capacity.max(1));
        dropped
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Messages held.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// The lag to tell before the next held message: `(dropped, next_seq)` if any was dropped
    /// since the last time (then the count starts again from 0).
    pub(crate) fn take_lag(&mut self) -> Option<(u64, u64)> {
        let &(next_seq, _) = self.pending.front()?;
        if self.dropped == 0 {
            return None;
        }
        Some((std::mem::take(&mut self.dropped), next_seq))
    }

    /// Takes held messages from the front, oldest first, while they fit `budget` bytes (at least
    /// one).
    pub(crate) fn take_batch(&mut self, budget: usize, out: &mut Vec<(u64, Bytes)>) {
        let mut bytes = 0;
        while let Some((_, stored)) = self.pending.front() {
            let size = stored.len() + splice::PER_MESSAGE_OVERHEAD;
            if !out.is_empty() && bytes + size > budget {
                break;
            }
            bytes += size;
            if let Some(m) = self.pending.pop_front() {
                out.push(m);
            }
        }
    }
}

/// One room a connection joined.
#[derive(Debug)]
pub(crate) struct Joined {
    /// The room (the shard's listener-list key once listed).
    pub(crate) room: Arc<str>,
    /// Its index in the shard's listener list of the room, once the owner counted the join;
    /// `None` while the join is on its way.
    pub(crate) at: Option<u32>,
    /// Messages held while the connection is slow.
    pub(crate) lag: LagQueue,
}

/// The rooms a connection is in (boxed in the connection: most connections are in none).
#[derive(Debug, Default)]
pub(crate) struct ConnRooms {
    /// At most `rooms.max_per_connection` entries, one per room.
    pub(crate) joined: Vec<Joined>,
    /// Messages held in all the entries' lag queues.
    pub(crate) pending: usize,
}

impl ConnRooms {
    /// The index of the entry of `room`.
    pub(crate) fn find(&self, room: &str) -> Option<usize> {
        self.joined.iter().position(|j| *j.room == *room)
    }

    fn check(&self) {
        debug_assert_eq!(
            self.pending,
            self.joined.iter().map(|j| j.lag.len()).sum::<usize>(),
            "the pending count is the sum of the lag queues"
        );
    }
}

// ----- the shard's rooms ---------------------------------------------------------------------------

/// A room this shard owns.
#[derive(Debug)]
pub(crate) struct Owned {
    /// The room's conversation, as stored in its messages.
    pub(crate) conv: pb::Conversation,
    /// The seq of its latest message.
    pub(crate) last_seq: u64,
    /// Counted listeners per shard.
    pub(crate) per_shard: Vec<u64>,
    /// Their sum.
    pub(crate) audience: u64,
    /// The latest `rooms.history` messages, ascending seq.
    pub(crate) history: VecDeque<(u64, Bytes)>,
    /// The stamp of its entry in [`Rooms::idle`] while it has no listener (0: it has some).
    idle: u64,
}

/// What the shard knows of rooms: the rooms it owns and its listeners' lists.
#[derive(Debug, Default)]
pub(crate) struct Rooms {
    /// Rooms this shard owns, by id.
    pub(crate) owned: FastMap<Arc<str>, Owned>,
    /// Owned rooms with no listener kept for their history, oldest first, with the stamp they
    /// got (an entry whose room was joined again since is stale and skipped).
    idle: VecDeque<(Arc<str>, u64)>,
    last_stamp: u64,
    /// This shard's connections in each room (counted joins), by room id.
    pub(crate) local: FastMap<Arc<str>, Vec<ConnId>>,
}

impl Rooms {
    /// Counts a join of room `room` from shard `shard` (of `shards`), making the room if it is
    /// new, unless it already has `max_listeners`.
    pub(crate) fn join(
        &mut self,
        room: &Arc<str>,
        shard: usize,
        shards: usize,
        max_listeners: u64,
    ) -> Result<&Owned, Refusal> {
        let r = self.owned.entry(Arc::clone(room)).or_insert_with(|| Owned {
            conv: room_view(room),
            last_seq: 0,
            per_shard: vec![0; shards],
            audience: 0,
            history: VecDeque::new(),
            idle: 0,
        });
        if r.audience >= max_listeners {
            return Err(Refusal::RoomFull);
        }
        let Some(n) = r.per_shard.get_mut(shard) else {
            return Err(Refusal::RoomFull);
        };
        *n += 1;
        r.audience += 1;
        r.idle = 0;
        debug_assert_eq!(r.audience, r.per_shard.iter().sum::<u64>());
        Ok(r)
    }

    /// Counts a leave of room `room` from shard `shard` (of a join counted before), then
    /// settles the room (see [`Rooms::settle`]).
    pub(crate) fn leave(&mut self, room: &str, shard: usize, max_idle: usize) {
        let Some(r) = self.owned.get_mut(room) else {
            debug_assert!(false, "a leave of a room that is not there");
            return;
        };
        match r.per_shard.get_mut(shard) {
            Some(n) if *n > 0 => {
                *n -= 1;
                r.audience -= 1;
            }
            _ => debug_assert!(false, "a leave without its join"),
        }
        debug_assert_eq!(r.audience, r.per_shard.iter().sum::<u64>());
        self.settle(room, max_idle);
    }

    /// Forgets the listeners of every shard for which `gone` holds (the link to their node went
    /// down, and those connections are closed there), then settles the rooms left without any.
    pub(crate) fn forget_shards(&mut self, gone: impl Fn(usize) -> bool, max_idle: usize) {
        let mut emptied = Vec::new();
        for (key, r) in &mut self.owned {
            for (s, n) in r.per_shard.iter_mut().enumerate() {
                if *n > 0 && gone(s) {
                    r.audience -= *n;
                    *n = 0;
                }
            }
            debug_assert_eq!(r.audience, r.per_shard.iter().sum::<u64>());
            if r.audience == 0 {
                emptied.push(Arc::clone(key));
            }
        }
        for room in emptied {
            self.settle(&room, max_idle);
        }
    }

    /// Whether connection rooms `rooms` include one whose owner shard `far` holds.
    pub(crate) fn any_owned(
        rooms: &ConnRooms,
        placement: &Placement,
        far: impl Fn(usize) -> bool,
    ) -> bool {
        rooms
            .joined
            .iter()
            .any(|j| far(owner_of(placement, &j.room)))
    }

    /// A room with no listener is forgotten if it keeps no history; else it is kept idle for its
    /// history, at most `max_idle` of them (the one idle longest is forgotten first).
    pub(crate) fn settle(&mut self, room: &str, max_idle: usize) {
        let Some((key, r)) = self.owned.get_key_value(room) else {
            return;
        };
        if r.audience > 0 || r.idle != 0 {
            return;
        }
        if r.history.is_empty() {
            self.owned.remove(room);
            return;
        }
        let key = Arc::clone(key);
        self.last_stamp += 1;
        let stamp = self.last_stamp;
        if let Some(r) = self.owned.get_mut(room) {
            r.idle = stamp;
        }
        self.idle.push_back((key, stamp));
        while self.idle.len() > max_idle {
            let Some((old, stamp)) = self.idle.pop_front() else {
                break;
            };
            if self
                .owned
                .get(&old)
                .is_some_and(|r| r.audience == 0 && r.idle == stamp)
            {
                self.owned.remove(&old);
            }
        }
    }

    /// Puts `conn` on this shard's list of room `room`; returns the list's key (shared by every
    /// entry of the room) and the index.
    pub(crate) fn list(&mut self, room: &Arc<str>, conn: ConnId) -> (Arc<str>, u32) {
        let (key, list) = match self.local.get_key_value(&**room) {
            Some((key, _)) => {
                let key = Arc::clone(key);
                let list = self.local.entry(Arc::clone(&key)).or_default();
                (key, list)
            }
            None => (
                Arc::clone(room),
                self.local.entry(Arc::clone(room)).or_default(),
            ),
        };
        list.push(conn);
        (key, (list.len() - 1) as u32)
    }

    /// Takes the connection at index `at` off the list of room `room`; returns the connection
    /// moved into its place, if any (its index is now `at`). An empty list is forgotten.
    pub(crate) fn unlist(&mut self, room: &str, at: u32) -> Option<ConnId> {
        let list = self.local.get_mut(room)?;
        let at = at as usize;
        debug_assert!(at < list.len(), "a listed connection is on the list");
        if at >= list.len() {
            return None;
        }
        list.swap_remove(at);
        let moved = list.get(at).copied();
        if list.is_empty() {
            self.local.remove(room);
        } else if list.capacity() > 64 && list.len() < list.capacity() / 4 {
            list.shrink_to(list.len() * 2);
        }
        moved
    }

    /// Gives back the tables' memory after many rooms went (a hash map never shrinks itself).
    pub(crate) fn shrink(&mut self) {
        const MIN_CAPACITY: usize = 64;
        for (len, cap, map) in [
            (self.owned.len(), self.owned.capacity(), 0),
            (self.local.len(), self.local.capacity(), 1),
        ] {
            if cap > MIN_CAPACITY && len < cap / 4 {
                let to = (len * 2).max(MIN_CAPACITY);
                if map == 0 {
                    self.owned.shrink_to(to);
                } else {
                    self.local.shrink_to(to);
                }
            }
        }
    }
}

// ----- mail ------------------------------------------------------------------------------------------

/// What a [`RoomChange`] does at the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum RoomOp {
    /// Count a join (unless the room is full); the answer carries the history.
    Join,
    /// Count a leave of a join counted before.
    Leave,
    /// Count nothing; answer with the room's figures.
    Query,
}

/// To a room's owner: a listener's shard joins, leaves or asks.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RoomChange {
    /// The room.
    pub(crate) room: Arc<str>,
    /// The listener's shard.
    pub(crate) shard: usize,
    /// What to count.
    pub(crate) op: RoomOp,
    /// The connection and request to answer (none for a closed connection's leave).
    pub(crate) reply: Option<(Origin, u64)>,
}

/// A room's figures, as the owner answers a [`RoomChange`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RoomFigures {
    /// Counted listeners across the node.
    pub(crate) audience: u64,
    /// The seq of the room's latest message (0: none).
    pub(crate) last_seq: u64,
    /// The history (for a counted join).
    pub(crate) history: Vec<(u64, Bytes)>,
}

/// To a listener's shard: the answer to its [`RoomChange`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RoomAnswer {
    /// The requesting connection.
    pub(crate) to: Origin,
    /// Its request.
    pub(crate) request_id: u64,
    /// The room.
    pub(crate) room: Arc<str>,
    /// What the change asked for.
    pub(crate) op: RoomOp,
    /// The room's figures, or why a join was refused.
    pub(crate) result: Result<RoomFigures, Refusal>,
}

impl RoomAnswer {
    /// Whether the owner counted a join for this answer.
    pub(crate) fn counted(&self) -> bool {
        self.op == RoomOp::Join && self.result.is_ok()
    }
}

/// To a room's owner: a send to the room from a connection in it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RoomPost {
    /// The sending connection (acked, and left out of the fan-out).
    pub(crate) origin: Origin,
    /// Its request.
    pub(crate) request_id: u64,
    /// The room.
    pub(crate) room: Arc<str>,
    /// The sending user and device.
    pub(crate) sender: Device,
    /// The send as decoded (`to` is echoed in the ack).
    #[serde(with = "super::wire::prost_msg")]
    pub(crate) send: pb::Send,
    /// Wall-clock time at the sender's shard when the send arrived.
    pub(crate) unix_ms: i64,
}

/// To a shard with listeners: one room message for all of them.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RoomCast {
    /// The room.
    pub(crate) room: Arc<str>,
    /// The message's seq in the room.
    pub(crate) seq: u64,
    /// The message, encoded once by the owner.
    pub(crate) stored: Bytes,
    /// The sending connection (it does not get its own message).
    pub(crate) exclude: Origin,
}

// ----- the core's side ---------------------------------------------------------------------------

/// The index of a wire form in a per-form array.
fn form_index(form: WireForm) -> usize {
    match form {
        WireForm::Tcp => 0,
        WireForm::WsBinary => 1,
        WireForm::WsText => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Bytes {
        Bytes::from(format!("m{seq}"))
    }

    fn seqs(q: &LagQueue) -> Vec<u64> {
        q.pending.iter().map(|&(s, _)| s).collect()
    }

    #[test]
    fn a_lag_queue_under_its_capacity_drops_nothing_and_keeps_order() {
        let mut q = LagQueue::default();
        for s in 1..=3 {
            assert_eq!(q.push(s, msg(s), 4), 0);
        }
        assert_eq!(seqs(&q), vec![1, 2, 3]);
        assert_eq!(q.take_lag(), None, "nothing was dropped: no lag to tell");
    }

    #[test]
    fn a_full_lag_queue_drops_the_oldest_and_says_how_many_before_the_next() {
        let mut q = LagQueue::default();
        let dropped: usize = (1..=10).map(|s| q.push(s, msg(s), 4)).sum();
        assert_eq!(dropped, 6);
        assert_eq!(seqs(&q), vec![7, 8, 9, 10], "the newest four are held");
        assert_eq!(
            q.take_lag(),
            Some((6, 7)),
            "six were dropped; the next one the listener gets is seq 7"
        );
        assert_eq!(q.take_lag(), None, "a lag is told once");
        q.push(11, msg(11), 4);
        assert_eq!(q.take_lag(), Some((1, 8)), "a new drop is told anew");
    }

    #[test]
    fn a_lag_queue_holds_references_to_the_one_copy() {
        let mut q = LagQueue::default();
        let m = msg(1);
        q.push(1, m.clone(), 4);
        assert_eq!(q.pending[0].1.as_ptr(), m.as_ptr(), "no copy of the bytes");
    }

    #[test]
    fn a_lag_batch_stays_within_its_budget_but_takes_at_least_one() {
        let mut q = LagQueue::default();
        for s in 1..=5 {
            q.push(s, Bytes::from(vec![0u8; 100]), 8);
        }
        let mut batch = Vec::new();
        q.take_batch(250, &mut batch);
        assert_eq!(batch.len(), 2, "two 100-byte messages fit 250 bytes");
        let mut batch = Vec::new();
        q.take_batch(10, &mut batch);
        assert_eq!(batch.len(), 1, "one goes even over the budget");
        assert_eq!(q.len(), 2);
    }

    fn conn(slot: u32) -> ConnId {
        ConnId {
            slot,
            generation: 1,
        }
    }

    #[test]
    fn the_owner_counts_listeners_per_shard_and_refuses_past_the_limit() {
        let mut rooms = Rooms::default();
        let room: Arc<str> = "live".into();
        assert_eq!(rooms.join(&room, 0, 2, 3).map(|r| r.audience), Ok(1));
        assert_eq!(rooms.join(&room, 1, 2, 3).map(|r| r.audience), Ok(2));
        assert_eq!(
            rooms.join(&room, 1, 2, 3).map(|r| r.per_shard.clone()),
            Ok(vec![1, 2])
        );
        assert_eq!(rooms.join(&room, 0, 2, 3).err(), Some(Refusal::RoomFull));
        rooms.leave(&room, 1, 8);
        assert_eq!(rooms.owned[&room].audience, 2);
    }

    #[test]
    fn a_room_without_listeners_or_history_is_forgotten() {
        let mut rooms = Rooms::default();
        let room: Arc<str> = "gone".into();
        rooms.join(&room, 0, 1, 10).expect("joins");
        rooms.leave(&room, 0, 8);
        assert!(
            rooms.owned.is_empty(),
            "the memory of an empty room is freed"
        );
    }

    #[test]
    fn idle_rooms_with_history_are_kept_up_to_the_limit_oldest_forgotten_first() {
        let mut rooms = Rooms::default();
        for name in ["a", "b", "c"] {
            let room: Arc<str> = name.into();
            rooms.join(&room, 0, 1, 10).expect("joins");
            if let Some(r) = rooms.owned.get_mut(name) {
                r.history.push_back((1, msg(1)));
            }
            rooms.leave(&room, 0, 2);
        }
        let mut kept: Vec<&str> = rooms.owned.keys().map(|k| &**k).collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            vec!["b", "c"],
            "at most two idle rooms; the oldest went"
        );
        // Joined again, a room is not idle: its stale idle entry forgets nothing.
        let b: Arc<str> = "b".into();
        rooms.join(&b, 0, 1, 10).expect("joins");
        rooms.settle("b", 2);
        assert_eq!(rooms.owned["b"].audience, 1);
    }

    #[test]
    fn a_listener_list_swaps_the_last_entry_into_a_leavers_place() {
        let mut rooms = Rooms::default();
        let room: Arc<str> = "r".into();
        let (key, a) = rooms.list(&room, conn(1));
        let other: Arc<str> = "r".into();
        let (key2, b) = rooms.list(&other, conn(2));
        assert!(Arc::ptr_eq(&key, &key2), "one key per room, shared");
        let (_, c) = rooms.list(&room, conn(3));
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(
            rooms.unlist("r", 0),
            Some(conn(3)),
            "the last moves to index 0"
        );
        assert_eq!(rooms.local["r"], vec![conn(3), conn(2)]);
        assert_eq!(rooms.unlist("r", 1), None);
        assert_eq!(rooms.unlist("r", 0), None);
        assert!(rooms.local.is_empty(), "an empty list is forgotten");
    }

    #[test]
    fn rooms_are_placed_by_a_stable_key_apart_from_conversations() {
        let p = Placement::new(4);
        assert_eq!(owner_of(&p, "live"), owner_of(&p, "live"));
        assert_eq!(owner_of(&p, "live"), p.owner(stable_hash(b"rlive")));
        assert!(valid_room_id("x") && !valid_room_id("") && !valid_room_id(&"x".repeat(129)));
    }
}
