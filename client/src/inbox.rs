//! The inbox: per-conversation de-duplication and ordering of received messages.
//!
//! Deliveries are at-least-once on the wire; the inbox makes them exactly-once and in seq order
//! for the application. Per conversation it keeps a *cursor* (every seq up to it is settled:
//! handed to the application, sent by this device, or skipped as unreadable) and the seqs above
//! the cursor that arrived early (above a gap), until the gap fills.
//!
//! ### Invariants
//!
//! * Every seq the inbox releases for a conversation is greater than every seq it released for
//!   that conversation before (strictly increasing), so nothing is released twice.
//! * `pending` holds only seqs greater than `cursor + 1`: a seq equal to `cursor + 1` is released
//!   at once, with everything contiguous above it.
//! * At most `max_held` messages are held per conversation; beyond that a message above a gap is
//!   dropped unacknowledged (a sync fetches it again once the gap is resolved).
//!
//! ### Gaps
//!
//! A message above a gap is held, not shown. The gap is resolved by what fills it (a delivery, a
//! sync page, one of this device's own send-acks), or, when the session's sync says so, skipped:
//! a sync page for seq `s` means the server had nothing readable for this client between the
//! cursor and `s` that it had not already pushed, so the missing seqs below `s` are skipped (and
//! reported, unless the conversation was new to the inbox, whose first readable seq is simply
//! where it starts, e.g. a group's join event). The session asks for a sync when a gap lasts.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::time::Instant;

use parley_proto::pb;

/// A conversation as a map key: its type and id.
pub type ConversationKey = (i32, String);

/// The key of `c`.
pub fn key(c: &pb::Conversation) -> ConversationKey {
    (c.r#type, c.id.clone())
}

/// The conversation of a key.
pub fn conversation(k: &ConversationKey) -> pb::Conversation {
    pb::Conversation {
        r#type: k.0,
        id: k.1.clone(),
    }
}

/// Whether `c` is a room (rooms are at-most-once and bypass the inbox).
pub fn is_room(c: &pb::Conversation) -> bool {
    c.r#type == pb::ConversationType::Room as i32
}

/// Something the inbox hands on, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Released {
    /// A message, for the application.
    Message(Box<pb::Message>),
    /// Seqs that will never come (the server has nothing readable for this client there).
    Skipped {
        /// The conversation.
        conversation: pb::Conversation,
        /// The seqs skipped.
        seqs: RangeInclusive<u64>,
    },
}

/// One held seq above the cursor.
#[derive(Debug, Clone)]
enum Held {
    /// A received message.
    Message(Box<pb::Message>),
    /// A seq this device sent itself (known from its send-ack): settled without a message.
    Own,
}

/// What the inbox knows of one conversation.
#[derive(Debug, Default)]
struct Lane {
    /// Every seq in `1..=cursor` is settled.
    cursor: u64,
    /// Whether the cursor means something yet: false until the first seq is settled, so the
    /// conversation may start at any seq (a group member starts at its join event).
    known: bool,
    /// Seqs above `cursor + 1`, waiting for the gap below them.
    pending: BTreeMap<u64, Held>,
    /// Since when the lowest gap has been open (None: no gap).
    gap_since: Option<Instant>,
    /// A message arrived since the last ack was taken: the next DeliverAck names this lane.
    ack_due: bool,
}

impl Lane {
    /// Settles `cursor + 1` onward while contiguous, appending what is released.
    fn release(&mut self, conversation: &pb::Conversation, out: &mut Vec<Released>) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.cursor + 1 {
                break;
            }
            self.cursor += 1;
            self.known = true;
            if let Held::Message(m) = entry.remove() {
                out.push(Released::Message(m));
            }
        }
        let _ = conversation;
    }

    /// Skips every missing seq below `seq`: they settle without a message.
    fn skip_below(&mut self, seq: u64, conversation: &pb::Conversation, out: &mut Vec<Released>) {
        loop {
            self.release(conversation, out);
            let next = self.cursor + 1;
            if next >= seq {
                return;
            }
            // The missing run: from cursor+1 up to (but not including) the next held seq or seq.
            let end = self.pending.keys().next().copied().unwrap_or(seq).min(seq) - 1;
            if self.known {
                out.push(Released::Skipped {
                    conversation: conversation.clone(),
                    seqs: next..=end,
                });
            }
            self.cursor = end;
            self.known = true;
        }
    }
}

/// Per-conversation de-duplication and ordering (see the module docs).
#[derive(Debug)]
pub struct Inbox {
    /// The conversations seen.
    lanes: HashMap<ConversationKey, Lane>,
    /// The most messages held above a gap per conversation.
    max_held: usize,
}

/// How a message reached the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Pushed live in a `Deliver` (acked by the session).
    Deliver,
    /// Returned by a sync (`SyncPage`): its seq also says the gap below it cannot be filled.
    Sync,
    /// Returned by a sync over a transport that may lose or reorder its pages: held like a
    /// delivery, saying nothing of the gap below it (see [`Inbox::skip_up_to`]).
    SyncUnordered,
}

impl Inbox {
    /// An empty inbox holding at most `max_held` early messages per conversation.
    pub fn new(max_held: usize) -> Self {
        Self {
            lanes: HashMap::new(),
            max_held: max_held.max(1),
        }
    }

    /// Takes in message `m` at time `now`; appends what it releases. Messages without a seq or a
    /// conversation, and room messages, pass straight through.
    pub fn receive(
        &mut self,
        m: pb::Message,
        source: Source,
        now: Instant,
        out: &mut Vec<Released>,
    ) {
        let Some(c) = m.conversation.clone() else {
            out.push(Released::Message(Box::new(m)));
            return;
        };
        if m.seq == 0 || is_room(&c) {
            out.push(Released::Message(Box::new(m)));
            return;
        }
        let seq = m.seq;
        let max_held = self.max_held;
        let lane = self.lanes.entry(key(&c)).or_default();
        if source == Source::Deliver {
            lane.ack_due = true;
        }
        if seq <= lane.cursor || lane.pending.contains_key(&seq) {
            return; // a duplicate
        }
        if source == Source::Sync {
            lane.skip_below(seq, &c, out);
        }
        if seq == lane.cursor + 1 || lane.pending.len() < max_held {
            lane.pending.insert(seq, Held::Message(Box::new(m)));
        } else {
            // Too many held: drop it unacked; a sync fetches it again.
            lane.gap_since.get_or_insert(now);
            return;
        }
        lane.release(&c, out);
        lane.update_gap(now);
    }

    /// Records that this device's own message got `seq` in `c` (from its send-ack): it is settled
    /// without being shown. Appends what that releases.
    pub fn own(&mut self, c: &pb::Conversation, seq: u64, now: Instant, out: &mut Vec<Released>) {
        if seq == 0 || is_room(c) {
            return;
        }
        let lane = self.lanes.entry(key(c)).or_default();
        if seq <= lane.cursor || lane.pending.contains_key(&seq) {
            return;
        }
        lane.pending.insert(seq, Held::Own);
        lane.release(c, out);
        lane.update_gap(now);
    }

    /// A sync whose every page arrived finished (over a lossy transport): the gaps up to
    /// `tops` (per conversation, the highest seq its pages carried) are skipped, releasing what
    /// was held up to there; gaps above (live pushes overtaking the sync's end) stay open.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use parley_client::inbox::{Inbox, Released, Source, key};
    /// let (now, c) = (std::time::Instant::now(), parley_client::direct("bob"));
    /// let m = |seq| parley_client::pb::Message { conversation: Some(c.clone()), seq, ..Default::default() };
    /// let mut inbox = Inbox::new(100);
    /// let mut out = Vec::new();
    /// inbox.receive(m(1), Source::Deliver, now, &mut out);
    /// inbox.receive(m(3), Source::SyncUnordered, now, &mut out); // 2 missing: held
    /// inbox.receive(m(5), Source::Deliver, now, &mut out);       // 4 missing: held
    /// inbox.skip_up_to(&HashMap::from([(key(&c), 3)]), now, &mut out);
    /// assert_eq!(inbox.cursor(&c), 3); // 2 skipped; 4 may still come
    /// assert!(out.iter().any(|r| matches!(r, Released::Skipped { seqs, .. } if *seqs == (2..=2))));
    /// ```
    pub fn skip_up_to(
        &mut self,
        tops: &HashMap<ConversationKey, u64>,
        now: Instant,
        out: &mut Vec<Released>,
    ) {
        let mut keys: Vec<&ConversationKey> = tops.keys().collect();
        keys.sort();
        for k in keys {
            let (Some(lane), Some(&top)) = (self.lanes.get_mut(k), tops.get(k)) else {
                continue;
            };
            let c = conversation(k);
            lane.skip_below(top.saturating_add(1), &c, out);
            lane.release(&c, out);
            lane.gap_since = None;
            lane.update_gap(now);
        }
    }

    /// A sync finished: every gap left is skipped (the server sent all it had for this client),
    /// releasing everything held.
    pub fn sync_done(&mut self, out: &mut Vec<Released>) {
        for (k, lane) in &mut self.lanes {
            if let Some(&top) = lane.pending.keys().next_back() {
                let c = conversation(k);
                lane.skip_below(top + 1, &c, out);
                lane.gap_since = None;
            }
        }
    }

    /// The cursors to ack: one per conversation that received a delivery since the last call,
    /// at its cursor (only settled seqs are acked, never one above a gap).
    pub fn take_acks(&mut self) -> Vec<pb::AckCursor> {
        let mut acks: Vec<pb::AckCursor> = self
            .lanes
            .iter_mut()
            .filter(|(_, l)| l.ack_due)
            .filter_map(|(k, l)| {
                l.ack_due = false;
                (l.cursor > 0).then(|| pb::AckCursor {
                    conversation: Some(conversation(k)),
                    seq: l.cursor,
                })
            })
            .collect();
        acks.sort_by(|a, b| {
            a.conversation
                .as_ref()
                .map(key)
                .cmp(&b.conversation.as_ref().map(key))
        });
        acks
    }

    /// Whether some delivery awaits its ack.
    pub fn ack_due(&self) -> bool {
        self.lanes.values().any(|l| l.ack_due)
    }

    /// The cursors to sync from: every conversation with a settled seq.
    pub fn cursors(&self) -> Vec<pb::AckCursor> {
        let mut cursors: Vec<pb::AckCursor> = self
            .lanes
            .iter()
            .filter(|(_, l)| l.cursor > 0)
            .map(|(k, l)| pb::AckCursor {
                conversation: Some(conversation(k)),
                seq: l.cursor,
            })
            .collect();
        cursors.sort_by(|a, b| {
            a.conversation
                .as_ref()
                .map(key)
                .cmp(&b.conversation.as_ref().map(key))
        });
        cursors
    }

    /// The cursor of `c`: every seq up to it is settled (0: none yet).
    pub fn cursor(&self, c: &pb::Conversation) -> u64 {
        self.lanes.get(&key(c)).map_or(0, |l| l.cursor)
    }

    /// Since when the oldest open gap has been open.
    pub fn oldest_gap(&self) -> Option<Instant> {
        self.lanes.values().filter_map(|l| l.gap_since).min()
    }

    /// How many messages are held above gaps, over all conversations.
    pub fn held(&self) -> usize {
        self.lanes.values().map(|l| l.pending.len()).sum()
    }
}

impl Lane {
    /// Opens or closes the gap clock after a change.
    fn update_gap(&mut self, now: Instant) {
        if self.pending.is_empty() {
            self.gap_since = None;
        } else {
            self.gap_since.get_or_insert(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(id: &str) -> pb::Conversation {
        pb::Conversation {
            r#type: pb::ConversationType::Direct as i32,
            id: id.into(),
        }
    }

    fn msg(c: &pb::Conversation, seq: u64) -> pb::Message {
        pb::Message {
            conversation: Some(c.clone()),
            seq,
            ..pb::Message::default()
        }
    }

    fn seqs(out: &[Released]) -> Vec<u64> {
        out.iter()
            .filter_map(|r| match r {
                Released::Message(m) => Some(m.seq),
                Released::Skipped { .. } => None,
            })
            .collect()
    }

    #[test]
    fn duplicates_are_dropped_and_gaps_hold_until_filled() {
        let now = Instant::now();
        let c = direct("bob");
        let mut inbox = Inbox::new(100);
        let mut out = Vec::new();
        for s in [1, 1, 3, 4, 3] {
            inbox.receive(msg(&c, s), Source::Deliver, now, &mut out);
        }
        assert_eq!(seqs(&out), [1]);
        assert_eq!(inbox.oldest_gap(), Some(now));
        inbox.receive(msg(&c, 2), Source::Deliver, now, &mut out);
        assert_eq!(seqs(&out), [1, 2, 3, 4]);
        assert_eq!(inbox.oldest_gap(), None);
        assert_eq!(inbox.take_acks()[0].seq, 4);
        assert!(inbox.take_acks().is_empty());
    }

    #[test]
    fn own_sends_settle_their_seq_without_a_message() {
        let now = Instant::now();
        let c = direct("bob");
        let mut inbox = Inbox::new(100);
        let mut out = Vec::new();
        inbox.own(&c, 2, now, &mut out);
        inbox.receive(msg(&c, 1), Source::Deliver, now, &mut out);
        inbox.receive(msg(&c, 2), Source::Deliver, now, &mut out);
        assert_eq!(seqs(&out), [1]);
        assert_eq!(inbox.cursor(&c), 2);
    }

    #[test]
    fn a_sync_page_skips_what_cannot_come_and_a_new_conversation_starts_anywhere() {
        let now = Instant::now();
        let g = pb::Conversation {
            r#type: pb::ConversationType::Group as i32,
            id: "g".into(),
        };
        let mut inbox = Inbox::new(100);
        let mut out = Vec::new();
        inbox.receive(msg(&g, 57), Source::Sync, now, &mut out);
        inbox.receive(msg(&g, 60), Source::Sync, now, &mut out);
        assert_eq!(seqs(&out), [57, 60]);
        assert_eq!(
            out[1],
            Released::Skipped {
                conversation: g.clone(),
                seqs: 58..=59
            }
        );
    }

    #[test]
    fn sync_done_releases_everything_held() {
        let now = Instant::now();
        let g = direct("g");
        let mut inbox = Inbox::new(100);
        let mut out = Vec::new();
        inbox.receive(msg(&g, 5), Source::Deliver, now, &mut out);
        inbox.receive(msg(&g, 7), Source::Deliver, now, &mut out);
        assert!(out.is_empty());
        inbox.sync_done(&mut out);
        assert_eq!(seqs(&out), [5, 7]);
        assert_eq!(inbox.cursor(&g), 7);
        assert_eq!(inbox.held(), 0);
    }
}
