//! Receipts and cursors: a user's read cursor per conversation (moved by READ receipts from
//! any of its devices, and by its own messages), its delivery cursor (moved by its devices'
//! acks), and, in a direct conversation, the other user's read cursor.
//!
//! * A READ receipt is handled at the reader's home (where its connections are): the read
//!   cursor moves forward only (held to the newest message the user may read), a cursor record
//!   is appended to the home's log, the receipt goes to the user's other devices (they clear
//!   their unread count), and then, in a direct conversation, to the other user's home, which
//!   relays it to that user's devices; in a group, to the group's owner, which only counts it
//!   ([`super::group::Group::read_counts`]): no member is told of another's receipt.
//! * Cursor records (kind [`super::owner::KIND_CURSOR`], conversation 0, so not indexed) are
//!   replayed at start-up after the checkpoint's cursors; delivery cursors are written with
//!   them and in checkpoints only (an ack moves one far too often for a record each), so after
//!   a crash a delivery cursor may be behind by up to a checkpoint interval. Records are
//!   flushed with the log's next group commit.
//! * Unread count = newest seq the user may read − read cursor, computed on demand from the
//!   home's state, never by scanning.

use std::sync::Arc;

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_storage::{Backend, RecordMeta, Timestamp};

use super::ShardCore;
use super::checkpoint::CursorEntry;
use super::conn::ConnId;
use super::conv::{Conv, ConvKind};
use super::error::Refusal;
use super::home::Cursors;
use super::mail::{GroupInbox, ReadCountsAsk, ShardMsg};
use super::owner::KIND_CURSOR;
use crate::loglimit::LogKind;

/// Bytes of a connection's budget a read-counts request holds until its answer arrives (the
/// answer carries at most `limits.max_page` counts of at most 5 bytes each).
pub(crate) const READ_COUNTS_RESERVE: u32 = 4096;

/// A cursor record's entry, or `None` if the payload is not one.
pub(crate) fn decode_cursor_record(payload: &[u8]) -> Option<CursorEntry> {
    CursorEntry::from_bytes(payload)
}

impl<B: Backend> ShardCore<B> {
    /// A `Receipt` from `conn` (its user's home is this shard).
    pub(crate) fn on_receipt(&mut self, conn: ConnId, request_id: u64, r: pb::Receipt) {
        let unix_ms = self.now.unix_ms;
        if r.r#type != pb::ReceiptType::Read as i32 {
            return self.refuse(conn, request_id, 0, &Refusal::BadReceipt);
        }
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let Some(who) = c.who.as_mut() else {
            return;
        };
        let Some(view) = r.conversation.clone() else {
            return self.refuse(conn, request_id, 0, &Refusal::ConversationRequired);
        };
        let Some(conv) = who.conv(&view) else {
            return self.refuse(conn, request_id, 0, &Refusal::UnknownConversation);
        };
        let user = Arc::clone(&who.device.user);
        let device = Arc::clone(&who.device.device);
        let Some(e) = self
            .home
            .users
            .get(&*user)
            .and_then(|u| u.inbox.get(&conv.id))
        else {
            // Nothing to read in a conversation the user has no message of.
            return;
        };
        let (floor, last) = self.home.visible(e);
        let target = r.seq.min(last);
        if target <= e.cursors.read.max(floor) {
            return;
        }
        if let Some(e) = self.home.entry_mut(&user, conv.id) {
            e.cursors.read = target;
        }
        self.counters.receipts += 1;
        self.persist_cursors(&user, &conv);
        // The user's other devices clear their unread count.
        let relay = pb::Receipt {
            conversation: Some(view),
            r#type: pb::ReceiptType::Read as i32,
            seq: target,
            user: user.to_string(),
            time: unix_ms,
        };
        self.push_receipt(&user, Some(&device), &relay);
        match conv.kind {
            ConvKind::Direct => {
                for other in conv.members.iter().filter(|m| ***m != *user) {
                    let home = self.placement.home(other);
                    self.route(
                        home,
                        ShardMsg::PeerRead {
                            user: Arc::clone(other),
                            conv: Arc::clone(&conv),
                            reader: Arc::clone(&user),
                            seq: target,
                            time: unix_ms,
                        },
                    );
                }
            }
            ConvKind::Group => {
                let owner = self.placement.owner(conv.id);
                self.route(
                    owner,
                    ShardMsg::GroupRead {
                        conv,
                        user,
                        read: target,
                    },
                );
            }
        }
    }

    /// The other user of a direct conversation read up to `seq`: `user`'s devices are told.
    pub(crate) fn on_peer_read(
        &mut self,
        user: &Arc<str>,
        conv: &Arc<Conv>,
        reader: &str,
        seq: u64,
        time: i64,
    ) {
        let e = self.home.note(user, conv, 0);
        if seq <= e.cursors.peer_read {
            return;
        }
        e.cursors.peer_read = seq;
        let view = conv.view_for(user);
        self.persist_cursors(user, conv);
        let relay = pb::Receipt {
            conversation: Some(view),
            r#type: pb::ReceiptType::Read as i32,
            seq,
            user: reader.to_owned(),
            time,
        };
        self.push_receipt(user, None, &relay);
    }

    /// Group owner: a member's read cursor.
    pub(crate) fn on_group_read(&mut self, conv: &Conv, user: &str, read: u64) {
        if let Some(g) = self
            .owner
            .convs
            .get_mut(&conv.id)
            .and_then(|st| st.group.as_deref_mut())
        {
            g.set_read(user, read);
        }
    }

    /// Start-up, at a home: the group's owner learns the read cursors of its members here.
    pub(crate) fn report_group_reads(&mut self, gi: &GroupInbox) {
        let owner = self.placement.owner(gi.conv.id);
        let mut reads = Vec::new();
        for (user, _, to) in &gi.users {
            if *to != u64::MAX {
                continue;
            }
            if let Some(e) = self
                .home
                .users
                .get(user)
                .and_then(|u| u.inbox.get(&gi.conv.id))
                && e.cursors.read > 0
            {
                reads.push((Arc::clone(user), e.cursors.read));
            }
        }
        for (user, read) in reads {
            self.route(
                owner,
                ShardMsg::GroupRead {
                    conv: Arc::clone(&gi.conv),
                    user,
                    read,
                },
            );
        }
    }

    /// A `ReadCountsRequest` from `conn`: asked of the group's owner.
    pub(crate) fn on_read_counts_request(
        &mut self,
        conn: ConnId,
        request_id: u64,
        req: pb::ReadCountsRequest,
    ) {
        let max = self.cfg.max_page;
        let origin = self.origin(conn);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let Some(who) = c.who.as_mut() else {
            return;
        };
        let Some(view) = req.conversation else {
            return self.refuse(conn, request_id, 0, &Refusal::ConversationRequired);
        };
        let conv = match who.conv(&view) {
            Some(conv) if conv.kind == ConvKind::Group => conv,
            _ => {
                return self.refuse(
                    conn,
                    request_id,
                    0,
                    &Refusal::BadGroupRequest("read counts are kept for groups only".into()),
                );
            }
        };
        let user = Arc::clone(&who.device.user);
        c.reserve(READ_COUNTS_RESERVE);
        let owner = self.placement.owner(conv.id);
        self.route(
            owner,
            ShardMsg::ReadCountsAsk(Box::new(ReadCountsAsk {
                origin,
                request_id,
                conv,
                user,
                view,
                from: req.from_seq,
                count: req.count.min(max),
            })),
        );
    }

    /// Group owner: answers a read-counts request.
    pub(crate) fn on_read_counts_ask(&mut self, ask: ReadCountsAsk) {
        let st = self.owner.convs.get(&ask.conv.id);
        let answer = match st.and_then(|st| st.group.as_deref().map(|g| (st.last_seq, g))) {
            Some((_, g)) if !g.is_live() => Err(Refusal::GroupNotFound),
            Some((_, g)) if g.role(&ask.user).is_none() => Err(Refusal::NotMember),
            Some((last_seq, g)) => Ok(pb::ReadCounts {
                conversation: Some(ask.view),
                from_seq: ask.from.max(1),
                counts: g.read_counts(ask.from, ask.count, last_seq),
                member_count: g.members.len() as u64,
            }),
            None => Err(Refusal::GroupNotFound),
        };
        let msg = match answer {
            Ok(result) => ShardMsg::ReadCountsDone {
                to: ask.origin,
                request_id: ask.request_id,
                result: Box::new(result),
            },
            Err(refusal) => ShardMsg::Refused {
                to: ask.origin,
                request_id: ask.request_id,
                client_msg_id: 0,
                refusal,
            },
        };
        self.route(ask.origin.shard, msg);
    }

    /// Writes `user`'s cursors in `conv` to the log (a cursor record).
    fn persist_cursors(&mut self, user: &str, conv: &Conv) {
        let Some(e) = self
            .home
            .users
            .get(user)
            .and_then(|u| u.inbox.get(&conv.id))
        else {
            return;
        };
        let entry = CursorEntry {
            user: user.to_owned(),
            key: conv.key.to_string(),
            read: e.cursors.read,
            delivered: e.cursors.delivered,
            peer_read: e.cursors.peer_read,
        };
        let mut payload = Vec::with_capacity(64);
        entry.put(&mut payload);
        let meta = RecordMeta {
            kind: KIND_CURSOR,
            conversation: 0,
            seq: 0,
            msg_id: 0,
            timestamp: Timestamp::from_micros(self.now.unix_ms.saturating_mul(1000)),
        };
        if let Err(e) = self.owner.log.append(meta, &payload) {
            self.log_line(LogKind::Storage, format_args!("cursor not stored: {e}"));
        }
    }

    /// Writes receipt `r` to every device of `user` (homed here) but `except`.
    fn push_receipt(&mut self, user: &str, except: Option<&Arc<str>>, r: &pb::Receipt) {
        let targets: Vec<ConnId> = self
            .home
            .users
            .get(user)
            .map(|u| {
                u.devices
                    .iter()
                    .filter(|(d, _)| except.is_none_or(|x| x != d))
                    .map(|&(_, c)| c)
                    .collect()
            })
            .unwrap_or_default();
        let frame = pb::Frame {
            request_id: 0,
            body: Some(Body::Receipt(r.clone())),
        };
        for conn in targets {
            self.write_frame(conn, &frame);
        }
    }
}

impl super::home::Home {
    /// Every user's cursors that moved from zero, sorted (for the checkpoint).
    pub(crate) fn cursor_entries(&self) -> Vec<CursorEntry> {
        let mut out = Vec::new();
        for (user, u) in &self.users {
            for e in u.inbox.values() {
                if e.cursors != Cursors::default() {
                    out.push(CursorEntry {
                        user: user.to_string(),
                        key: e.conv.key.to_string(),
                        read: e.cursors.read,
                        delivered: e.cursors.delivered,
                        peer_read: e.cursors.peer_read,
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.user, &a.key).cmp(&(&b.user, &b.key)));
        out
    }

    /// Start-up: the cursors of a checkpoint or a cursor record (moved forward only).
    pub(crate) fn restore_cursors(&mut self, c: &CursorEntry) {
        let Some(conv) = Conv::from_key(&c.key) else {
            return;
        };
        let user: Arc<str> = c.user.as_str().into();
        let e = self.note(&user, &Arc::new(conv), 0);
        e.cursors.merge(Cursors {
            read: c.read,
            delivered: c.delivered,
            peer_read: c.peer_read,
        });
    }
}
