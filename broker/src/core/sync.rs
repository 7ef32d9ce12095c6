//! Sync and history, in one place: the home side that runs a client's sync (summary, then pages
//! read from the owners, then whatever arrived meanwhile) and answers history requests, and the
//! owner side that reads a range of a conversation from the log.
//!
//! A sync is paced by the connection: the next page is asked for only when the connection's
//! queue is under half its bound, and one page is in flight at a time. One sync runs at a time
//! per connection: a `SyncRequest` while one runs is refused, and the running one goes on. Live push waits while a
//! sync runs ([`super::delivery`]); the sync's last step reads what was stored since the summary,
//! so nothing live overtakes it.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use parley_proto::pb::frame::Body;
use parley_proto::{pb, splice};
use parley_storage::Backend;

use super::FastMap;
use super::ShardCore;
use super::conn::ConnId;
use super::conv::Conv;
use super::error::Refusal;
use super::home::InboxEntry;
use super::mail::{Read, ReadDone, ReadPurpose, ShardMsg};

/// Bytes a page entry may take beyond its stored payload (field keys, lengths, the view).
const PAGE_ENTRY_OVERHEAD: usize = 16;

/// The first seq a sync sends of a conversation whose newest is `last_seq` (> `cursor`) to a
/// client holding up to `cursor`: the one after the cursor, or, with `max_per_conversation`
/// N > 0, no older than the newest N.
fn first_to_sync(cursor: u64, last_seq: u64, max_per_conversation: u32) -> u64 {
    let from = cursor + 1;
    match u64::from(max_per_conversation) {
        0 => from,
        n => from.max(last_seq.saturating_sub(n) + 1),
    }
}

/// A sync under way on one connection.
#[derive(Debug)]
pub(crate) struct SyncRun {
    request_id: u64,
    page_size: u32,
    /// What the client said it holds, by conversation id.
    cursors: FastMap<u64, u64>,
    /// Ranges still to read: conversation, first and last seq.
    ranges: VecDeque<(Arc<Conv>, u64, u64)>,
    in_flight: bool,
    /// Conversations whose owner could not be reached during this run (on another node, its
    /// link down): skipped for the rest of the run, not asked again and again.
    unreachable: Vec<u64>,
}

impl SyncRun {
    /// Whether a page was asked of an owner and has not come back.
    pub(crate) fn waiting(&self) -> bool {
        self.in_flight
    }
}

impl<B: Backend> ShardCore<B> {
    /// A `SyncRequest` from `conn`: the summary now, then pages. One sync runs at a time on a
    /// connection: a further request while one runs is refused ([`Refusal::SyncRunning`]) and
    /// the running one goes on untouched.
    pub(crate) fn on_sync_request(&mut self, conn: ConnId, request_id: u64, req: pb::SyncRequest) {
        let max_page = self.cfg.max_page;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        if c.sync.is_some() {
            return self.refuse(conn, request_id, 0, &Refusal::SyncRunning);
        }
        let Some(who) = c.who.as_mut() else {
            return;
        };
        let user = Arc::clone(&who.device.user);
        let mut cursors = FastMap::default();
        for cur in &req.cursors {
            if let Some(conv) = cur.conversation.as_ref().and_then(|v| who.conv(v)) {
                cursors.insert(conv.id, cur.seq);
            }
        }
        let page_size = match req.page_size {
            0 => max_page,
            n => n.min(max_page),
        };
        c.delivery.start_sync();
        // What the user may read of each conversation: above `floor` (a group member's join),
        // up to `last_seq`.
        let home = &self.home;
        let mut entries: Vec<&InboxEntry> = home
            .users
            .get(&*user)
            .map(|u| u.inbox.values().map(|e| &**e).collect())
            .unwrap_or_default();
        entries.sort_by(|a, b| a.conv.key.cmp(&b.conv.key));
        let mut summary = Vec::new();
        let mut ranges = VecDeque::new();
        let mut total = 0u64;
        for e in entries {
            let conv = &e.conv;
            let (floor, last_seq) = home.visible(e);
            let cursor = cursors.get(&conv.id).copied().unwrap_or(0).max(floor);
            if last_seq > cursor {
                // `unread` says what the client lacks; the pages carry at most the newest
                // `max_per_conversation` of it (older ones stay reachable by history).
                summary.push(self.conversation_state(e, &user, cursor));
                let from = first_to_sync(cursor, last_seq, req.max_per_conversation);
                total += last_seq - from + 1;
                ranges.push_back((Arc::clone(conv), from, last_seq));
            }
        }
        if let Some(c) = self.live_conn_mut(conn) {
            c.sync = Some(Box::new(SyncRun {
                request_id,
                page_size: page_size.max(1),
                cursors,
                ranges,
                in_flight: false,
                unreachable: Vec::new(),
            }));
        }
        self.counters.syncs += 1;
        self.write_frame(
            conn,
            &pb::Frame {
                request_id,
                body: Some(Body::SyncSummary(pb::SyncSummary {
                    conversations: summary,
                    total_messages: total,
                })),
            },
        );
        self.pump_sync(conn);
    }

    /// Asks for the next page of a running sync when the connection has room for it; finishes
    /// the sync when nothing newer than what the client holds remains.
    pub(crate) fn pump_sync(&mut self, conn: ConnId) {
        let half = self.cfg.max_outbound_bytes / 2;
        let origin = self.origin(conn);
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        if c.id != conn || c.out.len() > half {
            return;
        }
        let Some(user) = c.who.as_ref().map(|w| Arc::clone(&w.device.user)) else {
            return;
        };
        let Some(run) = c.sync.as_mut() else {
            return;
        };
        if run.in_flight {
            return;
        }
        if run.ranges.is_empty()
            && let Some(u) = self.home.users.get(&*user)
        {
            // Anything stored since the summary that this connection was not sent?
            let mut newer: Vec<(Arc<Conv>, u64, u64)> = Vec::new();
            for e in u.inbox.values() {
                if run.unreachable.contains(&e.conv.id) {
                    continue;
                }
                let (floor, last) = self.home.visible(e);
                let held = run
                    .cursors
                    .get(&e.conv.id)
                    .copied()
                    .unwrap_or(0)
                    .max(c.delivery.sent_upto(e.conv.id))
                    .max(floor);
                if last > held {
                    newer.push((Arc::clone(&e.conv), held + 1, last));
                }
            }
            newer.sort_by(|a, b| a.0.key.cmp(&b.0.key));
            run.ranges.extend(newer);
        }
        let Some((conv, from, to)) = run.ranges.front().cloned() else {
            let request_id = run.request_id;
            c.sync = None;
            c.delivery.end_sync();
            let mut out = std::mem::take(&mut self.scratch);
            out.clear();
            splice::encode_sync_page(request_id, &[], true, &mut out);
            self.write_encoded(conn, &out);
            self.scratch = out;
            return;
        };
        run.in_flight = true;
        let limit = run.page_size;
        let owner = self.placement.owner(conv.id);
        let reader = conv.group_id().is_some().then_some(user);
        self.route(
            owner,
            ShardMsg::Read(Box::new(Read {
                reply: origin,
                conv,
                reader,
                from,
                to,
                limit,
                newest_first: false,
                purpose: ReadPurpose::Sync,
            })),
        );
    }

    /// A `HistoryRequest` from `conn`.
    pub(crate) fn on_history_request(
        &mut self,
        conn: ConnId,
        request_id: u64,
        req: pb::HistoryRequest,
    ) {
        let max_page = self.cfg.max_page;
        let reserve = self.history_reserve();
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
        let Some(conv) = who.conv(&view) else {
            return self.refuse(conn, request_id, 0, &Refusal::UnknownConversation);
        };
        let limit = match req.limit {
            0 => max_page,
            n => n.min(max_page),
        };
        let (from, to, newest_first) = if let Some(after) = req.after_seq {
            // Forwards (from the first message if `after` is 0) up to the newest: the owner
            // stops at `limit` and says whether more remain.
            (after.saturating_add(1), u64::MAX, false)
        } else if req.before_seq > 0 {
            let to = req.before_seq - 1;
            (to.saturating_sub(u64::from(limit) - 1).max(1), to, true)
        } else {
            (0, u64::MAX, true)
        };
        let reader = conv
            .group_id()
            .is_some()
            .then(|| Arc::clone(&who.device.user));
        // Room for the page in the connection's budget, until it comes back.
        c.reserve(reserve);
        let owner = self.placement.owner(conv.id);
        self.route(
            owner,
            ShardMsg::Read(Box::new(Read {
                reply: origin,
                conv,
                reader,
                from,
                to,
                limit,
                newest_first,
                purpose: ReadPurpose::History { request_id, view },
            })),
        );
    }

    /// Bytes of a connection's budget a history request holds until its page arrives: the most
    /// a page may take.
    fn history_reserve(&self) -> u32 {
        u32::try_from(self.cfg.page_budget + 1024).unwrap_or(u32::MAX)
    }

    /// Owner side: reads a range of a conversation for a sync page or a history page.
    pub(crate) fn on_read(&mut self, r: Read) {
        let Read {
            reply,
            conv,
            reader,
            from,
            to,
            limit,
            newest_first,
            purpose,
        } = r;
        let id = conv.id;
        let log = &self.owner.log;
        let state = self
            .owner
            .convs
            .get(&id)
            .filter(|st| st.conv.key == conv.key);
        // A group's reader reads only what its membership covers.
        let window = match (state.and_then(|st| st.group.as_deref()), reader.as_deref()) {
            (Some(g), Some(user)) => g.window(user),
            (Some(_), None) => None,
            (None, _) => Some((0, u64::MAX)),
        };
        let refused = match (&window, state) {
            (None, Some(_)) => Some(Refusal::NotMember),
            _ => None,
        };
        let known = state.is_some() && window.is_some();
        let (lo, hi) = window.unwrap_or((0, 0));
        let (first_seq, last_seq) = if known {
            // Nothing that was not released (durable) is read out.
            let latest = log.latest_seq(id).unwrap_or(0);
            (
                log.first_seq(id).unwrap_or(0).max(lo),
                self.owner.released_seq(id, latest).min(hi),
            )
        } else {
            (0, 0)
        };
        let to = to.min(last_seq);
        let limit = u64::from(limit.max(1));
        let mut from = from.max(first_seq).max(1);
        if newest_first && to >= from && to - from + 1 > limit {
            from = to - limit + 1;
        }
        // A page must fit one frame: at most `limit` messages and `budget` bytes (at least one).
        let budget = self.cfg.page_budget;
        let mut messages: VecDeque<(u64, Bytes)> = VecDeque::new();
        let mut bytes = 0usize;
        let mut more = false;
        if known && from <= to {
            for rec in log.read(id, from..to.saturating_add(1)) {
                let Ok(rec) = rec else {
                    continue;
                };
                if messages.len() as u64 >= limit {
                    more = true;
                    break;
                }
                let size = rec.payload.len() + PAGE_ENTRY_OVERHEAD;
                if !newest_first && !messages.is_empty() && bytes + size > budget {
                    more = true;
                    break;
                }
                bytes += size;
                messages.push_back((rec.meta.seq, Bytes::copy_from_slice(rec.payload)));
                // Newest first: keep the newest that fit, drop from the old end.
                while newest_first && bytes > budget && messages.len() > 1 {
                    if let Some((_, old)) = messages.pop_front() {
                        bytes -= old.len() + PAGE_ENTRY_OVERHEAD;
                    }
                }
            }
        }
        if newest_first {
            let oldest = messages.front().map_or(from, |m| m.0);
            more = oldest > first_seq.max(1);
        }
        self.route(
            reply.shard,
            ShardMsg::ReadDone(Box::new(ReadDone {
                to: reply,
                conv,
                purpose,
                messages: messages.into(),
                more,
                first_seq,
                last_seq,
                to_seq: to,
                refused,
            })),
        );
    }

    /// Home side: a page read by an owner.
    pub(crate) fn on_read_done(&mut self, d: ReadDone) {
        let Some(conn) = self.conn_of(d.to) else {
            return;
        };
        let Some(user) = self.user_of(conn) else {
            return;
        };
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        match d.purpose {
            ReadPurpose::ListFill => {
                self.scratch = out;
                return self.on_list_fill(conn, &d);
            }
            ReadPurpose::Fill => {
                self.scratch = out;
                return self.on_fill(conn, &d);
            }
            ReadPurpose::History { request_id, .. } if d.refused.is_some() => {
                self.unreserve(conn, self.history_reserve());
                if let Some(r) = &d.refused {
                    self.refuse(conn, request_id, 0, r);
                }
            }
            ReadPurpose::History { request_id, view } => {
                self.unreserve(conn, self.history_reserve());
                let view_bytes = splice::view_field(&view);
                let spliced: Vec<splice::Spliced<'_>> = d
                    .messages
                    .iter()
                    .map(|(_, m)| splice::Spliced {
                        stored: m,
                        view: &view_bytes,
                    })
                    .collect();
                splice::encode_history_page(
                    request_id,
                    splice::HistoryPageHead {
                        conversation: &view,
                        more: d.more,
                        first_seq: d.first_seq,
                        last_seq: d.last_seq,
                    },
                    &spliced,
                    &mut out,
                );
                self.write_encoded(conn, &out);
            }
            ReadPurpose::Sync => {
                let view = self.view_for(&user, &d.conv);
                let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
                    self.scratch = out;
                    return;
                };
                let Some(run) = c.sync.as_mut() else {
                    self.scratch = out;
                    return;
                };
                run.in_flight = false;
                let range = run.ranges.pop_front();
                let last = d.messages.last().map(|m| m.0);
                if d.refused.is_some() {
                    // The owner is unreachable (another node, down): the range is skipped for
                    // this run, not marked synced; when the owner is back, its link-up tells
                    // this home, which pushes what the devices online miss.
                    run.unreachable.push(d.conv.id);
                } else if let Some((k, _, want)) = range {
                    let end = want.min(d.to_seq);
                    match last {
                        Some(last) if d.more && last < end => {
                            run.ranges.push_front((k, last + 1, end));
                        }
                        // Nothing at all up to what was asked: the range is done as asked (if
                        // the owner held the reader to less than this home thought, asking again
                        // would get nothing again, forever).
                        None if !d.more => c.delivery.mark_synced(k.id, &view, want),
                        // The range is done, even if retention dropped part of it.
                        _ => c.delivery.mark_synced(k.id, &view, end),
                    }
                }
                let request_id = run.request_id;
                let id = d.conv.id;
                let taken: Vec<splice::Spliced<'_>> = d
                    .messages
                    .iter()
                    .filter(|(seq, _)| c.delivery.sync_takes(id, &view, *seq))
                    .map(|(_, m)| splice::Spliced {
                        stored: m,
                        view: &view,
                    })
                    .collect();
                if !taken.is_empty() {
                    splice::encode_sync_page(request_id, &taken, false, &mut out);
                    self.write_encoded(conn, &out);
                }
            }
        }
        self.scratch = out;
        self.pump_sync(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_per_conversation_keeps_the_newest_missed_messages_only() {
        assert_eq!(first_to_sync(0, 30, 0), 1, "0: everything missed");
        assert_eq!(first_to_sync(0, 30, 10), 21, "the newest ten");
        assert_eq!(first_to_sync(5, 30, 10), 21);
        assert_eq!(
            first_to_sync(25, 30, 10),
            26,
            "fewer missed than the bound: all"
        );
        assert_eq!(first_to_sync(0, 3, 10), 1);
        assert_eq!(first_to_sync(0, 30, 1), 30);
        assert_eq!(
            first_to_sync(0, u64::MAX, u32::MAX),
            u64::MAX - u64::from(u32::MAX) + 1
        );
    }
}
