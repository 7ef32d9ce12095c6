//! The conversation list: a user's conversations, most recently active first, each with its
//! newest message, read cursor and unread count — what a client asks for first after login.
//!
//! It is answered from the user's home alone: the home knows each conversation's newest seq
//! and time, the user's cursors, and (for conversations with a message since start-up) the
//! newest message's stored bytes, shared with the deliveries. Only entries of the requested
//! page whose newest message the home does not hold (after a restart) are read from their
//! owners, in parallel, once; the home keeps them for the next request. Sorting is done per
//! request over the user's conversations (a user with 1,000 conversations costs a sort of
//! 1,000 entries).

use std::cmp::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_storage::Backend;
use prost::Message as _;

use super::ShardCore;
use super::conn::ConnId;
use super::error::Refusal;
use super::mail::{Read, ReadDone, ReadPurpose, ShardMsg};

/// A conversation list waiting for newest messages read from their owners.
#[derive(Debug)]
pub(crate) struct ListRun {
    request_id: u64,
    /// The page, in order; `ids[i]` is the conversation of `page[i]`.
    page: Vec<pb::ConversationState>,
    ids: Vec<u64>,
    more: bool,
    /// Reads still out.
    missing: usize,
}

/// The order of the list: newest activity first, then conversation type and id.
fn order(a: (i64, &pb::Conversation), b: (i64, &pb::Conversation)) -> Ordering {
    b.0.cmp(&a.0)
        .then_with(|| a.1.r#type.cmp(&b.1.r#type))
        .then_with(|| a.1.id.cmp(&b.1.id))
}

impl<B: Backend> ShardCore<B> {
    /// A `ConversationListRequest` from `conn`.
    pub(crate) fn on_conversation_list_request(
        &mut self,
        conn: ConnId,
        request_id: u64,
        req: pb::ConversationListRequest,
    ) {
        let limit = match req.limit {
            0 => self.cfg.max_page,
            n => n.min(self.cfg.max_page),
        } as usize;
        let origin = self.origin(conn);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let Some(who) = c.who.as_ref() else {
            return;
        };
        if who.list.is_some() {
            return self.refuse(conn, request_id, 0, &Refusal::ListRunning);
        }
        let user = Arc::clone(&who.device.user);
        let after = req
            .after_conversation
            .as_ref()
            .map(|v| (req.after_activity, v));
        // Every conversation with something the user may read, in list order.
        let mut rows: Vec<(i64, pb::Conversation, &super::home::InboxEntry)> = Vec::new();
        if let Some(u) = self.home.users.get(&*user) {
            for e in u.inbox.values() {
                let (floor, last) = self.home.visible(e);
                if last <= floor {
                    continue;
                }
                let (_, time) = self.home.last_of(e);
                let view = e.conv.view_for(&user);
                if after.is_some_and(|a| order((time, &view), (a.0, a.1)) != Ordering::Greater) {
                    continue;
                }
                rows.push((time, view, e));
            }
        }
        rows.sort_by(|a, b| order((a.0, &a.1), (b.0, &b.1)));
        let more = rows.len() > limit;
        rows.truncate(limit);
        let mut page = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        let mut reads = Vec::new();
        for (_, view, e) in &rows {
            let mut state = self.conversation_state(e, &user, 0);
            state.unread = state.unread_count;
            let (last, _) = self.home.last_of(e);
            match last {
                Some(bytes) => state.last_message = message_in(&bytes, view),
                None => {
                    let reader = e.conv.group_id().is_some().then(|| Arc::clone(&user));
                    reads.push(Read {
                        reply: origin,
                        conv: Arc::clone(&e.conv),
                        reader,
                        from: state.last_seq,
                        to: state.last_seq,
                        limit: 1,
                        newest_first: false,
                        purpose: ReadPurpose::ListFill,
                    });
                }
            }
            page.push(state);
            ids.push(e.conv.id);
        }
        let run = ListRun {
            request_id,
            page,
            ids,
            more,
            missing: reads.len(),
        };
        if reads.is_empty() {
            return self.answer_list(conn, run);
        }
        if let Some(who) = self.live_conn_mut(conn).and_then(|c| c.who.as_mut()) {
            who.list = Some(Box::new(run));
        }
        for r in reads {
            let owner = self.placement.owner(r.conv.id);
            self.route(owner, ShardMsg::Read(Box::new(r)));
        }
    }

    /// A newest message read for a conversation list: kept by the home, put in the page.
    pub(crate) fn on_list_fill(&mut self, conn: ConnId, d: &ReadDone) {
        let Some((seq, bytes)) = d.messages.last().cloned() else {
            return self.list_filled(conn, d.conv.id, None);
        };
        // Kept for the next list (if it is still the newest).
        match d.conv.group_id() {
            Some(_) => {
                if let Some(g) = self.home.groups.get_mut(&d.conv.id)
                    && g.last_seq == seq
                {
                    g.last = Some(bytes.clone());
                }
            }
            None => {
                let user = self.user_of(conn);
                if let Some(e) = user.and_then(|u| self.home.entry_mut(&u, d.conv.id))
                    && e.last_seq == seq
                {
                    e.last = Some(bytes.clone());
                }
            }
        }
        self.list_filled(conn, d.conv.id, Some(bytes));
    }

    fn list_filled(&mut self, conn: ConnId, conv: u64, bytes: Option<Bytes>) {
        let Some(who) = self.live_conn_mut(conn).and_then(|c| c.who.as_mut()) else {
            return;
        };
        let Some(run) = who.list.as_mut() else {
            return;
        };
        if let Some(i) = run.ids.iter().position(|&id| id == conv)
            && let Some(state) = run.page.get_mut(i)
            && state.last_message.is_none()
        {
            let view = state.conversation.clone().unwrap_or_default();
            state.last_message = bytes.and_then(|b| message_in(&b, &view));
        }
        run.missing = run.missing.saturating_sub(1);
        if run.missing == 0
            && let Some(run) = who.list.take()
        {
            self.answer_list(conn, *run);
        }
    }

    /// Writes a list page (cut shorter if it would not fit a frame).
    fn answer_list(&mut self, conn: ConnId, run: ListRun) {
        let budget = self.cfg.page_budget;
        let mut list = pb::ConversationList {
            conversations: run.page,
            more: run.more,
        };
        // Keep the entries that fit one frame (at least one), measuring each entry once.
        let mut used = 0usize;
        let fits = list
            .conversations
            .iter()
            .take_while(|c| {
                let len = c.encoded_len();
                // The field key and the length prefix of each entry.
                used += len + 1 + prost::encoding::encoded_len_varint(len as u64);
                used <= budget
            })
            .count()
            .max(1);
        if fits < list.conversations.len() {
            list.conversations.truncate(fits);
            list.more = true;
        }
        self.counters.conversation_lists += 1;
        self.write_frame(
            conn,
            &pb::Frame {
                request_id: run.request_id,
                body: Some(Body::ConversationList(list)),
            },
        );
    }
}

/// The stored message `bytes` as `view` names its conversation.
fn message_in(bytes: &[u8], view: &pb::Conversation) -> Option<pb::Message> {
    let mut m = pb::Message::decode(bytes).ok()?;
    m.conversation = Some(view.clone());
    Some(m)
}
