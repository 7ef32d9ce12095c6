//! The conversation owner: de-duplicates retried sends, assigns seqs and message ids, encodes the
//! stored message once, appends it to the shard's log, and once the record is durable under the
//! policy releases the send-ack and the deliveries, in seq order.
//!
//! ### Invariants
//! * Within a conversation, seqs are assigned strictly increasing by one, and a record is
//!   appended before its seq is handed out.
//! * `pending` is in LSN order, and nothing is released before every earlier entry is.
//! * A retried send (same device, same client message id, within the window) is never stored
//!   again: it gets the original's ack, released no earlier than the original.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use parley_proto::{pb, splice};
use parley_storage::{Backend, Log, Lsn, RecordMeta, SyncOf, SyncTicket, Timestamp};
use prost::Message as _;

use super::FastMap;
use super::checkpoint::{Checkpoint, ConvEntry, DeviceWindow, ENTRIES_PER_DEVICE, GroupEntry};
use super::conv::Placement;
use super::conv::{Conv, ConvKind};
use super::error::Refusal;
use super::group::{Change, Group, Role};
use super::ids::MsgIdGen;
use super::mail::{Acked, Append, Delivery, Device, GroupPush, Origin, Recipient, ShardMsg};
use super::{Effect, ShardCore};
use crate::loglimit::LogKind;

/// Record kind of a stored message in the log.
pub(crate) const KIND_MESSAGE: u8 = 1;
/// Record kind of a group's membership or settings event (a SYSTEM message with a
/// `GroupEvent`): start-up decodes only these in full.
pub(crate) const KIND_GROUP_EVENT: u8 = 2;
/// Record kind of a user's cursors in a conversation (read, delivered, the peer's read), written
/// by the user's home when they move (conversation 0: not indexed, replayed at start-up).
pub(crate) const KIND_CURSOR: u8 = 3;

/// What a retry's ack repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Remembered {
    pub(crate) msg_id: u64,
    pub(crate) seq: u64,
    pub(crate) server_time: i64,
    pub(crate) lsn: Lsn,
}

/// A sender device's recently stored client message ids, in a fixed ring: the oldest is
/// forgotten when a new one comes in and the ring is full.
#[derive(Debug, Default)]
pub(crate) struct DedupRing {
    slots: Vec<(u64, Remembered)>,
    next: usize,
    index: FastMap<u64, u32>,
}

impl DedupRing {
    /// What was stored for `client_msg_id`, if it is still remembered.
    pub(crate) fn get(&self, client_msg_id: u64) -> Option<Remembered> {
        let &i = self.index.get(&client_msg_id)?;
        self.slots.get(i as usize).map(|s| s.1)
    }

    /// Remembers `client_msg_id`, forgetting the oldest if `capacity` are held.
    pub(crate) fn insert(&mut self, client_msg_id: u64, r: Remembered, capacity: usize) {
        if let Some(&i) = self.index.get(&client_msg_id) {
            if let Some(slot) = self.slots.get_mut(i as usize) {
                slot.1 = r;
            }
            return;
        }
        let capacity = capacity.max(1);
        if self.slots.len() < capacity {
            self.index.insert(client_msg_id, self.slots.len() as u32);
            self.slots.push((client_msg_id, r));
            return;
        }
        let i = self.next % self.slots.len();
        let old = self.slots[i].0;
        self.index.remove(&old);
        self.slots[i] = (client_msg_id, r);
        self.index.insert(client_msg_id, i as u32);
        self.next = (i + 1) % self.slots.len();
        debug_assert_eq!(self.index.len(), self.slots.len());
    }

    /// Number of ids remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The highest seq remembered (the sender's newest message, as far as the window goes).
    pub(crate) fn max_seq(&self) -> Option<u64> {
        self.slots.iter().map(|(_, r)| r.seq).max()
    }

    /// The `n` newest remembered ids, oldest first.
    pub(crate) fn newest(&self, n: usize) -> Vec<(u64, Remembered)> {
        // Oldest first is slots[next..] then slots[..next] (before the ring is full, next is 0).
        let split = self.next.min(self.slots.len());
        let ordered = self.slots[split..].iter().chain(self.slots[..split].iter());
        let skip = self.slots.len().saturating_sub(n);
        ordered.skip(skip).copied().collect()
    }
}

/// One conversation this shard owns.
#[derive(Debug)]
pub(crate) struct ConvState {
    pub(crate) conv: Arc<Conv>,
    pub(crate) last_seq: u64,
    /// When its newest message was stored (ms since the Unix epoch; 0: not known).
    pub(crate) last_time: i64,
    pub(crate) dedup: FastMap<Device, DedupRing>,
    /// A group's members and settings.
    pub(crate) group: Option<Box<Group>>,
}

impl ConvState {
    /// A conversation this shard has stored nothing of yet (or knows only from the log's index).
    pub(crate) fn new(conv: Arc<Conv>, last_seq: u64) -> Self {
        ConvState {
            conv,
            last_seq,
            last_time: 0,
            dedup: FastMap::default(),
            group: None,
        }
    }
}

/// What a stored request is answered with once it is durable.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A send.
    Send(pb::SendAck),
    /// A group request.
    Group(Box<pb::GroupResult>),
}

/// A stored message (or a retry's ack) waiting for durability.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) lsn: Lsn,
    pub(crate) origin: Origin,
    pub(crate) request_id: u64,
    pub(crate) reply: Reply,
    /// A new message to deliver (none for a retry).
    pub(crate) deliver: Option<Box<Stored>>,
}

/// A new stored message, for its recipients.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) conv: Arc<Conv>,
    pub(crate) seq: u64,
    pub(crate) bytes: Bytes,
    pub(crate) time: i64,
    /// The send's arrival ([`super::mail::Delivery::sent_us`]).
    pub(crate) sent_us: Option<u64>,
    pub(crate) sender: Device,
    /// A group's message: the home shards with members when it was stored (and with members
    /// it removed), and the membership change it records.
    pub(crate) group: Option<(Vec<usize>, Option<Arc<Change>>)>,
}

/// The owner role's state.
#[derive(Debug)]
pub(crate) struct Owner<B: Backend> {
    pub(crate) log: Log<B>,
    pub(crate) convs: FastMap<u64, ConvState>,
    pub(crate) ids: MsgIdGen,
    pending: VecDeque<Pending>,
    /// When the flush in flight started (ms), if one is.
    flushing: Option<u64>,
    /// The log's written LSN when the last checkpoint was written.
    pub(crate) checkpointed: Lsn,
}

impl<B: Backend> Owner<B> {
    pub(crate) fn new(log: Log<B>, shard: usize) -> Self {
        Owner {
            log,
            convs: FastMap::default(),
            ids: MsgIdGen::new(shard),
            pending: VecDeque::new(),
            flushing: None,
            checkpointed: Lsn(0),
        }
    }

    /// The last seq of conversation `id` whose message was released (acked and delivered:
    /// durable), given its last stored seq `last_seq`. What has not been released is not
    /// shown to anyone: not by a read, not in what homes are told at a link-up.
    pub(crate) fn released_seq(&self, id: u64, last_seq: u64) -> u64 {
        self.pending
            .iter()
            .filter_map(|p| p.deliver.as_deref())
            .find(|d| d.conv.id == id)
            .map_or(last_seq, |d| d.seq.saturating_sub(1))
    }

    /// Whether stored messages wait for durability or a flush is in flight.
    pub(crate) fn is_busy(&self) -> bool {
        !self.pending.is_empty() || self.flushing.is_some()
    }

    /// Queues a stored request's answer (and its deliveries) until it is durable, behind
    /// everything queued before it (a retry's older LSN waits its turn too).
    pub(crate) fn hold(&mut self, p: Pending) {
        self.pending.push_back(p);
    }

    /// A flush of everything appended so far, if acks wait for one and none is in flight.
    pub(crate) fn flush_ticket(&mut self, now: u64) -> Option<SyncTicket<SyncOf<B>>> {
        if self.flushing.is_some() || self.pending.is_empty() {
            return None;
        }
        let ticket = self.log.sync_ticket()?;
        self.flushing = Some(now);
        Some(ticket)
    }
}

impl<B: Backend> ShardCore<B> {
    /// Stores a send (or answers a retry of one).
    pub(crate) fn on_append(&mut self, a: Append) {
        let Append {
            origin,
            request_id,
            sender,
            conv,
            send,
            unix_ms,
            arrived_us,
        } = a;
        let client_msg_id = send.client_msg_id;
        let refuse = |core: &mut Self, refusal: Refusal| {
            core.route(
                origin.shard,
                ShardMsg::Refused {
                    to: origin,
                    request_id,
                    client_msg_id,
                    refusal,
                },
            );
        };
        if let Some(refusal) = self.fenced() {
            return refuse(self, refusal);
        }
        let id = conv.id;
        let window = self.cfg.dedup_window;
        let wait = self.cfg.wait_for_flush;
        let owner = &mut self.owner;
        let st = match owner.convs.get_mut(&id) {
            Some(st) => st,
            // A group exists only once created.
            None if conv.kind == ConvKind::Group => return refuse(self, Refusal::GroupNotFound),
            None => {
                let last_seq = owner.log.latest_seq(id).unwrap_or(0);
                owner
                    .convs
                    .entry(id)
                    .or_insert(ConvState::new(Arc::clone(&conv), last_seq))
            }
        };
        if st.conv.key != conv.key {
            refuse(self, Refusal::IdCollision);
            return;
        }
        let ack_view = send.to.clone();
        if let Some(r) = st.dedup.get(&sender).and_then(|w| w.get(client_msg_id)) {
            // A retry: the same ack, once the original is durable.
            let ack = send_ack(client_msg_id, &r, ack_view, wait);
            self.owner.hold(Pending {
                lsn: r.lsn,
                origin,
                request_id,
                reply: Reply::Send(ack),
                deliver: None,
            });
            self.counters.retries_deduplicated += 1;
            self.release_if_not_waiting();
            return;
        }
        // Checked after the de-dup: a retry of a stored send gets its ack even if the sender
        // left the group since.
        let sender_role = match st.group.as_deref() {
            Some(g) if !g.is_live() => return refuse(self, Refusal::GroupNotFound),
            Some(g) => match g.role(&sender.user) {
                Some(role) => Some(role),
                None => return refuse(self, Refusal::NotMember),
            },
            None => None,
        };
        let seq = st.last_seq + 1;
        let conv = Arc::clone(&st.conv);
        // Only a message's sender may recall or edit it (and a group's owner and admins may
        // recall any); the server's own messages are neither recalled nor edited.
        // (A SYSTEM send comes only from the application's trusted connections.)
        if send.kind == pb::MessageKind::Recall as i32 || send.kind == pb::MessageKind::Edit as i32
        {
            let moderator = send.kind == pb::MessageKind::Recall as i32
                && sender_role.is_some_and(|r| r >= Role::Admin);
            let target = self
                .owner
                .log
                .read(id, send.ref_seq..send.ref_seq.saturating_add(1))
                .next()
                .and_then(Result::ok)
                .and_then(|rec| pb::Message::decode(rec.payload).ok());
            match target {
                None => return refuse(self, Refusal::RefNotFound),
                Some(m) if m.kind == pb::MessageKind::System as i32 => {
                    return refuse(self, Refusal::NotSender);
                }
                Some(m) if m.from_user != *sender.user && !moderator => {
                    return refuse(self, Refusal::NotSender);
                }
                Some(_) => {}
            }
        }
        let msg_id = self.owner.ids.next(unix_ms.max(0) as u64);
        // The one encode of this message: the log stores these bytes, and every delivery,
        // retransmit, sync and history page copies them.
        let stored = Bytes::from(splice::encode_message(&splice::MessageRef {
            conversation: &conv.stored,
            seq,
            msg_id,
            from_user: &sender.user,
            from_device: &sender.device,
            client_msg_id,
            content_type: send.content_type,
            body: &send.body,
            server_time: unix_ms,
            kind: send.kind,
            ref_seq: send.ref_seq,
        }));
        let lsn = match self.append_record(KIND_MESSAGE, id, seq, msg_id, unix_ms, &stored) {
            Ok(lsn) => lsn,
            Err(r) => return refuse(self, r),
        };
        let remembered = Remembered {
            msg_id,
            seq,
            server_time: unix_ms,
            lsn,
        };
        let ack = send_ack(client_msg_id, &remembered, ack_view, wait);
        let mut group = None;
        if let Some(st) = self.owner.convs.get_mut(&id) {
            debug_assert_eq!(st.last_seq + 1, seq, "seqs advance by one");
            st.last_seq = seq;
            st.last_time = unix_ms;
            st.dedup
                .entry(sender.clone())
                .or_default()
                .insert(client_msg_id, remembered, window);
            if let Some(g) = st.group.as_deref_mut() {
                // A sender has read its own message.
                g.set_read(&sender.user, seq);
                group = Some((g.home_shards().collect(), None));
            }
        }
        self.counters.messages_stored += 1;
        self.owner.hold(Pending {
            lsn,
            origin,
            request_id,
            reply: Reply::Send(ack),
            deliver: Some(Box::new(Stored {
                conv,
                seq,
                bytes: stored,
                time: unix_ms,
                sent_us: Some(arrived_us),
                sender,
                group,
            })),
        });
        self.release_if_not_waiting();
    }

    /// Appends the record (`kind`) of conversation `id`'s message `seq`; a failure is logged
    /// and becomes the request's refusal.
    pub(crate) fn append_record(
        &mut self,
        kind: u8,
        id: u64,
        seq: u64,
        msg_id: u64,
        unix_ms: i64,
        bytes: &[u8],
    ) -> Result<Lsn, Refusal> {
        let meta = RecordMeta {
            kind,
            conversation: id,
            seq,
            msg_id,
            timestamp: Timestamp::from_micros(unix_ms.saturating_mul(1000)),
        };
        self.owner.log.append(meta, bytes).map_err(|e| {
            self.log_line(LogKind::Storage, format_args!("append failed: {e}"));
            Refusal::Storage(e.to_string())
        })
    }

    pub(crate) fn release_if_not_waiting(&mut self) {
        if !self.cfg.wait_for_flush {
            self.release();
        }
    }

    /// Sends the acks and deliveries of every stored message that is durable enough.
    pub(crate) fn release(&mut self) {
        let wait = self.cfg.wait_for_flush && !self.test_switches.release_before_flush;
        while let Some(p) = self.owner.pending.front() {
            if wait && !self.owner.log.is_durable(p.lsn) {
                break;
            }
            let Some(p) = self.owner.pending.pop_front() else {
                break;
            };
            let is_event = matches!(p.reply, Reply::Group(_));
            let msg = match p.reply {
                Reply::Send(ack) => ShardMsg::Acked(Acked {
                    to: p.origin,
                    request_id: p.request_id,
                    ack,
                }),
                Reply::Group(result) => ShardMsg::GroupDone {
                    to: p.origin,
                    request_id: p.request_id,
                    result,
                },
            };
            self.route(p.origin.shard, msg);
            let Some(stored) = p.deliver else {
                continue;
            };
            if let Some(h) = self.gate.observer()
                && (self.gate.stored || is_event)
            {
                observe_stored(h, &stored, self.gate.stored);
            }
            let Stored {
                conv,
                seq,
                bytes: stored,
                time,
                sent_us,
                sender,
                group,
            } = *stored;
            if let Some((homes, change)) = group {
                // One delivery per home shard with members: the home knows who is online.
                for home in homes {
                    self.route(
                        home,
                        ShardMsg::Deliver(Box::new(Delivery {
                            conv: Arc::clone(&conv),
                            seq,
                            stored: stored.clone(),
                            time,
                            sent_us,
                            recipients: Vec::new(),
                            group: Some(GroupPush {
                                sender: sender.clone(),
                                change: change.clone(),
                            }),
                        })),
                    );
                }
                continue;
            }
            // One delivery per home shard, listing that shard's recipients.
            let mut per_home: Vec<(usize, Vec<Recipient>)> = Vec::new();
            for user in &conv.members {
                let home = self.placement.home(user);
                let exclude = (**user == *sender.user).then(|| Arc::clone(&sender.device));
                let r = Recipient {
                    user: Arc::clone(user),
                    exclude,
                };
                match per_home.iter_mut().find(|(h, _)| *h == home) {
                    Some((_, list)) => list.push(r),
                    None => per_home.push((home, vec![r])),
                }
            }
            for (home, recipients) in per_home {
                self.route(
                    home,
                    ShardMsg::Deliver(Box::new(Delivery {
                        conv: Arc::clone(&conv),
                        seq,
                        stored: stored.clone(),
                        time,
                        sent_us,
                        recipients,
                        group: None,
                    })),
                );
            }
        }
    }

    /// Starts a group-commit flush if acks wait for one.
    pub(crate) fn start_flush(&mut self) {
        if !self.cfg.wait_for_flush {
            return;
        }
        let now = self.now.ms;
        match self.owner.flush_ticket(now) {
            Some(ticket) => self.effects.push(Effect::Flush(ticket)),
            None if self.owner.flushing.is_none() => self.release(),
            None => {}
        }
    }

    /// A flush finished.
    pub(crate) fn on_flushed(&mut self, result: std::io::Result<Lsn>) {
        if let Some(started) = self.owner.flushing.take() {
            self.counters.flushes += 1;
            let took = self.now.ms.saturating_sub(started);
            self.counters.flush_ms_total += took;
            self.counters.flush_ms_max = self.counters.flush_ms_max.max(took);
        }
        match result {
            Ok(lsn) => {
                self.owner.log.complete_sync(lsn);
                self.release();
            }
            Err(e) => {
                self.log_line(
                    LogKind::Storage,
                    format_args!("log flush failed, the log is poisoned: {e}"),
                );
                // Nothing pending will ever be durable: tell the senders.
                while let Some(p) = self.owner.pending.pop_front() {
                    let client_msg_id = match &p.reply {
                        Reply::Send(ack) => ack.client_msg_id,
                        Reply::Group(_) => 0,
                    };
                    self.route(
                        p.origin.shard,
                        ShardMsg::Refused {
                            to: p.origin,
                            request_id: p.request_id,
                            client_msg_id,
                            refusal: Refusal::LogFailed,
                        },
                    );
                }
            }
        }
    }

    /// Writes a start-up checkpoint of the conversations and the newest remembered sends of
    /// each device in each ([`super::checkpoint`]).
    pub(crate) fn write_checkpoint(&mut self) {
        let mut states: Vec<&ConvState> = self.owner.convs.values().collect();
        states.sort_unstable_by_key(|st| st.conv.id);
        let mut convs = Vec::with_capacity(states.len());
        for st in states {
            let mut devices: Vec<DeviceWindow> = st
                .dedup
                .iter()
                .map(|(d, ring)| DeviceWindow {
                    user: String::from(&*d.user),
                    device: String::from(&*d.device),
                    entries: ring.newest(ENTRIES_PER_DEVICE),
                })
                .collect();
            devices.sort_unstable_by(|a, b| (&a.user, &a.device).cmp(&(&b.user, &b.device)));
            convs.push(ConvEntry {
                id: st.conv.id,
                key: String::from(&*st.conv.key),
                last_time: st.last_time,
                devices,
                group: st.group.as_deref().map(group_entry),
            });
        }
        let cp = Checkpoint {
            max_msg_id: self.owner.ids.last(),
            convs,
            cursors: self.home.cursor_entries(),
        };
        let bytes = cp.encode();
        let covers = self.owner.log.durable_lsn();
        let written = self.owner.log.written_lsn();
        match self.owner.log.write_checkpoint(covers, &bytes) {
            Ok(()) => {
                self.owner.checkpointed = written;
                self.counters.checkpoints += 1;
            }
            Err(e) => self.log_line(
                LogKind::Storage,
                format_args!("checkpoint not written: {e}"),
            ),
        }
    }

    /// Rebuilds conversations, de-dup windows and the id generator from the last checkpoint and
    /// a bounded tail of the log (or the whole log without a checkpoint), and tells each
    /// member's home shard what its conversations hold.
    pub(crate) fn rebuild(&mut self) {
        let window = self.cfg.dedup_window;
        let restored = self
            .owner
            .log
            .checkpoint()
            .and_then(|(lsn, bytes)| Checkpoint::decode(bytes).map(|cp| (lsn, cp)));
        let from_checkpoint = restored.is_some();
        let start = match restored {
            Some((lsn, cp)) => {
                self.owner.ids.observe(cp.max_msg_id);
                let end = self.owner.log.written_lsn();
                for c in cp.convs {
                    self.owner_conv(c, end);
                }
                for c in cp.cursors {
                    self.home.restore_cursors(&c);
                }
                self.owner.checkpointed = lsn;
                // Replay from a checkpoint interval before it: the de-dup windows of recent sends.
                Lsn(lsn.0.saturating_sub(self.cfg.checkpoint_every_bytes))
            }
            None => Lsn(0),
        };
        let placement = self.placement;
        let owner = &mut self.owner;
        let home = &mut self.home;
        // The newest message of each sender in each conversation replayed: its sender read it.
        let mut own_reads: FastMap<(u64, Device), u64> = FastMap::default();
        // Senders seen in this replay, so each record costs no string allocation.
        let mut senders: FastMap<(&[u8], &[u8]), Device> = FastMap::default();
        for rec in owner.log.scan(start) {
            let Ok(rec) = rec else {
                continue;
            };
            if rec.meta.kind == KIND_CURSOR {
                if let Some(c) = super::receipt::decode_cursor_record(rec.payload) {
                    home.restore_cursors(&c);
                }
                continue;
            }
            if rec.meta.kind == KIND_GROUP_EVENT {
                owner.ids.observe(rec.meta.msg_id);
                replay_group_event(&mut owner.convs, &owner.log, rec.payload, &placement);
                continue;
            }
            if rec.meta.kind != KIND_MESSAGE {
                continue;
            }
            // Only what start-up needs, without decoding the whole message.
            let Some(m) = splice::peek_message(rec.payload) else {
                continue;
            };
            owner.ids.observe(rec.meta.msg_id);
            let id = rec.meta.conversation;
            let st = match owner.convs.get_mut(&id) {
                Some(st) => st,
                None => {
                    let Some(conv) = Conv::from_key(m.conversation) else {
                        continue;
                    };
                    if conv.kind == ConvKind::Group {
                        // A group exists from its CREATED event on, replayed before this.
                        continue;
                    }
                    let last_seq = owner.log.latest_seq(id).unwrap_or(0);
                    owner
                        .convs
                        .entry(id)
                        .or_insert(ConvState::new(Arc::new(conv), last_seq))
                }
            };
            st.last_seq = st.last_seq.max(m.seq);
            st.last_time = st.last_time.max(m.server_time);
            let sender = senders
                .entry((m.from_user.as_bytes(), m.from_device.as_bytes()))
                .or_insert_with(|| Device {
                    user: m.from_user.into(),
                    device: m.from_device.into(),
                });
            let own = own_reads.entry((id, sender.clone())).or_default();
            *own = (*own).max(m.seq);
            let ring = match st.dedup.get_mut(sender) {
                Some(ring) => ring,
                None => st.dedup.entry(sender.clone()).or_default(),
            };
            ring.insert(
                m.client_msg_id,
                Remembered {
                    msg_id: m.msg_id,
                    seq: m.seq,
                    server_time: m.server_time,
                    lsn: rec.lsn,
                },
                window,
            );
        }
        if from_checkpoint {
            // The checkpoint may hold what a crash took back (sends remembered with the LSN of
            // a record that is gone, dropped above as at or past the recovered end). Appends
            // from now on reuse those LSNs, so the next start could no longer tell: the state
            // just rebuilt, all of it durable, replaces that checkpoint before any append.
            self.write_checkpoint();
        }
        let own_reads: Vec<((u64, Device), u64)> = own_reads.into_iter().collect();
        self.tell_homes(own_reads, None);
    }
}

impl<B: Backend> ShardCore<B> {
    /// Knows a conversation from a checkpoint (its last seq from the log's index) with its
    /// remembered sends, dropping those at or beyond the log's recovered `end`.
    fn owner_conv(&mut self, c: ConvEntry, end: Lsn) {
        let window = self.cfg.dedup_window;
        let Some(conv) = Conv::from_key(&c.key) else {
            return;
        };
        if conv.id != c.id {
            return;
        }
        let last_seq = self.owner.log.latest_seq(c.id).unwrap_or(0);
        let group = match (conv.kind, c.group) {
            (ConvKind::Group, Some(g)) if g.applied <= last_seq => {
                Some(group_from(g, &self.placement))
            }
            // The checkpoint reflects an event a crash lost: rebuild from the group's events.
            (ConvKind::Group, _) => Some(self.group_from_log(c.id, last_seq)),
            (ConvKind::Direct, _) => None,
        };
        if group.as_ref().is_some_and(|g| g.applied == 0) {
            // Even its creation was lost: the group does not exist.
            return;
        }
        let st = self.owner.convs.entry(c.id).or_insert(ConvState {
            conv: Arc::new(conv),
            last_seq,
            last_time: c.last_time,
            dedup: FastMap::default(),
            group: group.map(Box::new),
        });
        for d in c.devices {
            let device = Device {
                user: d.user.as_str().into(),
                device: d.device.as_str().into(),
            };
            let ring = st.dedup.entry(device).or_default();
            for (cmid, r) in d.entries {
                if r.lsn < end {
                    ring.insert(cmid, r, window);
                }
            }
        }
    }
}

impl<B: Backend> ShardCore<B> {
    /// A group's state from its events in the log, seqs `1..=last_seq` (read through the
    /// conversation index; only done when a checkpoint cannot be trusted for this group).
    fn group_from_log(&self, id: u64, last_seq: u64) -> Group {
        let mut g = Group::default();
        for rec in self.owner.log.read(id, 1..last_seq.saturating_add(1)) {
            let Ok(rec) = rec else {
                continue;
            };
            if rec.meta.kind != KIND_GROUP_EVENT {
                continue;
            }
            if let Some(e) = pb::Message::decode(rec.payload).ok().and_then(|m| m.event) {
                g.apply(&e, rec.meta.seq, &self.placement);
            }
        }
        g
    }
}

/// Applies a group event found in the log's replay (creating the group at its CREATED event).
fn replay_group_event<B: Backend>(
    convs: &mut FastMap<u64, ConvState>,
    log: &Log<B>,
    payload: &[u8],
    placement: &Placement,
) {
    let Ok(m) = pb::Message::decode(payload) else {
        return;
    };
    let (Some(view), Some(event)) = (m.conversation.as_ref(), m.event.as_ref()) else {
        return;
    };
    let Some(conv) = Conv::from_key(&view.id) else {
        return;
    };
    let id = conv.id;
    let st = convs.entry(id).or_insert_with(|| {
        let last_seq = log.latest_seq(id).unwrap_or(0);
        ConvState::new(Arc::new(conv), last_seq)
    });
    st.last_seq = st.last_seq.max(m.seq);
    st.group
        .get_or_insert_default()
        .apply(event, m.seq, placement);
}

/// A group's checkpoint entry.
fn group_entry(g: &Group) -> GroupEntry {
    let mut former: Vec<(String, u64, u64)> = g
        .former
        .iter()
        .map(|(u, &(from, to))| (u.to_string(), from, to))
        .collect();
    former.sort();
    GroupEntry {
        name: g.name.clone(),
        open: g.open,
        applied: g.applied,
        dissolved: g.dissolved.unwrap_or(0),
        members: g
            .members
            .iter()
            .map(|(u, m)| (u.to_string(), m.role.to_byte(), m.joined))
            .collect(),
        former,
    }
}

/// A group from its checkpoint entry.
fn group_from(e: GroupEntry, placement: &Placement) -> Group {
    let mut g = Group::default();
    g.name = e.name;
    g.open = e.open;
    g.applied = e.applied;
    g.dissolved = (e.dissolved > 0).then_some(e.dissolved);
    for (user, role, joined) in e.members {
        let role = Role::from_byte(role).unwrap_or(Role::Member);
        g.restore_member(
            user.into(),
            super::group::Member { role, joined },
            placement,
        );
    }

    for (user, from, to) in e.former {
        g.former.insert(user.into(), (from, to));
    }
    g
}

/// The send-ack of a stored message.
/// Tells the observers of a message stored durably (`message_stored`: if they want every
/// message) and, for a group event, of the change.
fn observe_stored(h: &dyn crate::hooks::Hooks, stored: &Stored, message_stored: bool) {
    let Ok(m) = pb::Message::decode(stored.bytes.clone()) else {
        return;
    };
    let conversation = super::gate::conversation_ref(&stored.conv);
    if let Some(e) = &m.event {
        let what = pb::GroupEventType::try_from(e.r#type).map_or_else(
            |_| "unknown".to_owned(),
            |t| t.as_str_name().to_ascii_lowercase(),
        );
        h.group_changed(&crate::hooks::GroupChange {
            group: conversation.id.clone(),
            seq: m.seq,
            actor: e.actor.clone(),
            what,
            members: e.users.clone(),
        });
    }
    if !message_stored {
        return;
    }
    h.message_stored(&crate::hooks::StoredMessage {
        conversation,
        seq: m.seq,
        msg_id: m.msg_id,
        sender: m.from_user,
        device: m.from_device,
        time_ms: m.server_time,
        system: m.kind == pb::MessageKind::System as i32,
        body: m.body,
    });
}

fn send_ack(
    client_msg_id: u64,
    r: &Remembered,
    view: Option<pb::Conversation>,
    on_disk: bool,
) -> pb::SendAck {
    pb::SendAck {
        client_msg_id,
        msg_id: r.msg_id,
        seq: r.seq,
        server_time: r.server_time,
        conversation: view,
        durability: if on_disk {
            pb::Durability::Disk
        } else {
            pb::Durability::Memory
        } as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(seq: u64) -> Remembered {
        Remembered {
            msg_id: seq * 10,
            seq,
            server_time: 0,
            lsn: Lsn(seq),
        }
    }

    #[test]
    fn the_ring_remembers_the_newest_ids_up_to_its_capacity() {
        let mut ring = DedupRing::default();
        for id in 1..=10 {
            ring.insert(id, r(id), 4);
        }
        assert_eq!(ring.len(), 4);
        for id in 1..=6 {
            assert_eq!(ring.get(id), None, "{id} was forgotten");
        }
        for id in 7..=10 {
            assert_eq!(ring.get(id), Some(r(id)));
        }
    }

    #[test]
    fn the_newest_ids_come_oldest_first_before_and_after_the_ring_wraps() {
        let mut ring = DedupRing::default();
        for id in 1..=3 {
            ring.insert(id, r(id), 4);
        }
        let ids = |v: Vec<(u64, Remembered)>| v.into_iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(ids(ring.newest(2)), vec![2, 3]);
        for id in 4..=6 {
            ring.insert(id, r(id), 4);
        }
        assert_eq!(ids(ring.newest(10)), vec![3, 4, 5, 6]);
        assert_eq!(ids(ring.newest(2)), vec![5, 6]);
    }

    #[test]
    fn a_remembered_id_inserted_again_keeps_one_slot() {
        let mut ring = DedupRing::default();
        ring.insert(1, r(1), 2);
        ring.insert(1, r(5), 2);
        ring.insert(2, r(2), 2);
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.get(1), Some(r(5)));
    }
}
