//! The user home: a user's connected devices and inbox (the last seq of each of the user's
//! conversations), live push to the devices, and login registration.
//!
//! A user's connections all live on the user's home shard (a connection moves there after login),
//! so a delivery reaches every device of a user with one cross-shard hop from the owner.
//!
//! Groups: a home keeps, per group with members here, a [`LocalGroup`] — the group's last seq,
//! its members homed here and which of them are online. A group message comes once per home
//! shard (not once per member); the home pushes it to the members online, so the work per
//! message grows with the members online, never with all members. A member's inbox entry holds
//! the seqs it may read (from its join, to its leave), which its syncs follow; the group's last
//! seq is kept once, in the [`LocalGroup`], not in every member's entry.

use std::sync::Arc;

use bytes::Bytes;
use parley_proto::{pb, splice};

use super::FastMap;
use super::conn::ConnId;
use super::conv::Conv;
use super::mail::{Delivery, GroupInbox, GroupPush};
use super::{ShardCore, mail::Device};
use parley_storage::Backend;

/// One conversation of a user, as the home knows it.
#[derive(Debug)]
pub(crate) struct InboxEntry {
    pub(crate) conv: Arc<Conv>,
    /// A direct conversation's last seq (a group's is in its [`LocalGroup`]).
    pub(crate) last_seq: u64,
    /// The user's view of the conversation, ready to splice after a stored message.
    pub(crate) view: Bytes,
    /// A group: the seqs the user may read, `(from, to)` inclusive (`to` is `u64::MAX` while
    /// it is a member).
    pub(crate) window: Option<(u64, u64)>,
    /// The user's cursors in this conversation.
    pub(crate) cursors: Cursors,
    /// A direct conversation's newest message (when known) and its time (a group's are in its
    /// [`LocalGroup`]).
    pub(crate) last: Option<Bytes>,
    pub(crate) last_time: i64,
}

/// A user's cursors in one conversation. Each only moves forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cursors {
    /// Read up to here (READ receipts, and the user's own messages).
    pub(crate) read: u64,
    /// A device acknowledged up to here.
    pub(crate) delivered: u64,
    /// Direct only: the other user read up to here.
    pub(crate) peer_read: u64,
}

impl Cursors {
    /// Moves each cursor up to `other`'s where that is further; whether any moved.
    pub(crate) fn merge(&mut self, other: Cursors) -> bool {
        let before = *self;
        self.read = self.read.max(other.read);
        self.delivered = self.delivered.max(other.delivered);
        self.peer_read = self.peer_read.max(other.peer_read);
        *self != before
    }
}

impl InboxEntry {
    fn new(conv: Arc<Conv>, user: &str) -> Self {
        let view = Bytes::from(splice::view_field(&conv.view_for(user)));
        InboxEntry {
            view,
            ..InboxEntry::new_without_view(conv)
        }
    }

    /// An entry whose view is to be set by the caller.
    fn new_without_view(conv: Arc<Conv>) -> Self {
        InboxEntry {
            conv,
            last_seq: 0,
            view: Bytes::new(),
            window: None,
            cursors: Cursors::default(),
            last: None,
            last_time: 0,
        }
    }

    /// Whether the user is a current member of this group entry.
    fn is_current_member(&self) -> bool {
        self.window.is_some_and(|(_, to)| to == u64::MAX)
    }
}

/// Marks a member of a [`LocalGroup`] that is not online.
const OFFLINE: u32 = u32::MAX;

/// A group with members on this home shard.
#[derive(Debug)]
pub(crate) struct LocalGroup {
    /// The highest seq of the group this home has seen.
    pub(crate) last_seq: u64,
    /// The newest message (when known: seq `last_seq`) and its time.
    pub(crate) last: Option<Bytes>,
    pub(crate) last_time: i64,
    /// The members' view (the same for every member).
    pub(crate) view: Bytes,
    /// Current members homed here, with their index in `online` (or [`OFFLINE`]).
    members: FastMap<Arc<str>, u32>,
    /// Members homed here with at least one device online.
    pub(crate) online: Vec<Arc<str>>,
}

impl LocalGroup {
    fn new(conv: Arc<Conv>) -> Self {
        let view = Bytes::from(splice::view_field(&conv.view_for("")));
        LocalGroup {
            last_seq: 0,
            last: None,
            last_time: 0,
            view,
            members: FastMap::default(),
            online: Vec::new(),
        }
    }

    fn set_online(&mut self, user: &Arc<str>, online: bool) {
        let Some(&at) = self.members.get(user) else {
            return;
        };
        match (at == OFFLINE, online) {
            (true, true) => {
                self.members
                    .insert(Arc::clone(user), self.online.len() as u32);
                self.online.push(Arc::clone(user));
            }
            (false, false) => {
                self.members.insert(Arc::clone(user), OFFLINE);
                self.online.swap_remove(at as usize);
                if let Some(moved) = self.online.get(at as usize) {
                    self.members.insert(Arc::clone(moved), at);
                }
            }
            _ => {}
        }
        debug_assert!(self.online.len() <= self.members.len());
    }

    fn remove(&mut self, user: &Arc<str>) {
        self.set_online(user, false);
        self.members.remove(user);
    }
}

/// A user whose home is this shard.
#[derive(Debug, Default)]
pub(crate) struct User {
    /// Connected devices and their connections.
    pub(crate) devices: Vec<(Arc<str>, ConnId)>,
    /// Conversations by id.
    /// Boxed: most users have a few conversations, and a small map's slots (at least four)
    /// then cost a pointer each, not a whole entry.
    pub(crate) inbox: FastMap<u64, Box<InboxEntry>>,
    /// When its last device left (Unix ms; 0: not since start, or since the home forgot it).
    pub(crate) last_seen: i64,
}

/// The home role's state.
///
/// A user is in [`Home::users`] while a device of theirs is online or they have a conversation
/// (the inbox is what a sync summarises); a user with neither costs nothing.
#[derive(Debug, Default)]
pub(crate) struct Home {
    pub(crate) users: FastMap<Arc<str>, User>,
    /// Groups with members homed here.
    pub(crate) groups: FastMap<u64, LocalGroup>,
}

impl Home {
    /// Records that `conv` holds messages up to `last_seq` for `user`; returns the entry.
    pub(crate) fn note(
        &mut self,
        user: &Arc<str>,
        conv: &Arc<Conv>,
        last_seq: u64,
    ) -> &mut InboxEntry {
        let u = self.users.entry(Arc::clone(user)).or_default();
        let e = u
            .inbox
            .entry(conv.id)
            .or_insert_with(|| Box::new(InboxEntry::new(Arc::clone(conv), user)));
        e.last_seq = e.last_seq.max(last_seq);
        e
    }

    /// The user's entry of conversation `conv`, if it has one.
    pub(crate) fn entry_mut(&mut self, user: &str, conv: u64) -> Option<&mut InboxEntry> {
        self.users
            .get_mut(user)?
            .inbox
            .get_mut(&conv)
            .map(|e| &mut **e)
    }

    /// The newest message the user may read of entry `e` (when the home holds it) and when it
    /// was stored.
    pub(crate) fn last_of(&self, e: &InboxEntry) -> (Option<Bytes>, i64) {
        match e.window {
            None => (e.last.clone(), e.last_time),
            Some((_, to)) => match self.groups.get(&e.conv.id) {
                Some(g) if to >= g.last_seq => (g.last.clone(), g.last_time),
                // A former member's last message is the event that ended its membership.
                Some(_) => (None, e.last_time),
                None => (None, 0),
            },
        }
    }

    /// When `user`'s last device left (0: unknown: not since start, or the home forgot the user
    /// when it had no device and no conversation).
    pub(crate) fn last_seen(&self, user: &str) -> i64 {
        self.users.get(user).map_or(0, |u| u.last_seen)
    }

    /// The seqs of `e` the user may read: above `floor`, up to `last` (`last <= floor`: none).
    pub(crate) fn visible(&self, e: &InboxEntry) -> (u64, u64) {
        match e.window {
            None => (0, e.last_seq),
            Some((from, to)) => {
                let last = self
                    .groups
                    .get(&e.conv.id)
                    .map_or(0, |g| g.last_seq)
                    .min(to);
                (from.saturating_sub(1), last)
            }
        }
    }

    /// The home's state of group `conv`, made if it has none.
    fn group(&mut self, conv: &Arc<Conv>) -> &mut LocalGroup {
        self.groups
            .entry(conv.id)
            .or_insert_with(|| LocalGroup::new(Arc::clone(conv)))
    }

    /// `user` (homed here) may read group `conv` from `from` to `to` (inclusive; `u64::MAX`:
    /// it is a member).
    pub(crate) fn set_membership(&mut self, user: &Arc<str>, conv: &Arc<Conv>, from: u64, to: u64) {
        // Every member names a group the same way: its entries share the group's view.
        let view = self.group(conv).view.clone();
        let u = self.users.entry(Arc::clone(user)).or_default();
        let online = !u.devices.is_empty();
        let e = u.inbox.entry(conv.id).or_insert_with(|| {
            Box::new(InboxEntry {
                view,
                ..InboxEntry::new_without_view(Arc::clone(conv))
            })
        });
        e.window = Some((from, to));
        let g = self.group(conv);
        if to == u64::MAX {
            g.members.entry(Arc::clone(user)).or_insert(OFFLINE);
            g.set_online(user, online);
        } else {
            g.remove(user);
        }
    }

    /// `user`'s membership of group `conv` ends at `seq` (it still reads `seq`).
    fn end_membership(&mut self, user: &Arc<str>, conv: &Arc<Conv>, seq: u64) {
        let from = self
            .users
            .get(user)
            .and_then(|u| u.inbox.get(&conv.id))
            .and_then(|e| e.window)
            .map_or(seq, |w| w.0);
        self.set_membership(user, conv, from, seq);
    }

    /// `user`'s first device came online (or its last went): its groups' online lists follow.
    fn set_online(&mut self, user: &Arc<str>, online: bool) {
        let Some(u) = self.users.get(user) else {
            return;
        };
        for e in u.inbox.values().filter(|e| e.is_current_member()) {
            if let Some(g) = self.groups.get_mut(&e.conv.id) {
                g.set_online(user, online);
            }
        }
    }

    /// Registers `conn` as `device`'s connection; returns the connections it replaces.
    pub(crate) fn register(&mut self, device: &Device, conn: ConnId) -> Vec<ConnId> {
        let u = self.users.entry(Arc::clone(&device.user)).or_default();
        let first = u.devices.is_empty();
        let mut replaced = Vec::new();
        u.devices.retain(|(d, c)| {
            if **d == *device.device {
                replaced.push(*c);
                false
            } else {
                true
            }
        });
        if u.devices.capacity() == 0 {
            // Most users have one device online: no room for four.
            u.devices.reserve_exact(1);
        }
        u.devices.push((Arc::clone(&device.device), conn));
        if first {
            self.set_online(&device.user, true);
        }
        replaced
    }

    /// Forgets `conn` as a connection of `user`. A user with no device online and no
    /// conversation is forgotten altogether (it is rebuilt at its next login); returns whether
    /// it was.
    pub(crate) fn unregister(&mut self, user: &str, conn: ConnId) -> bool {
        let Some(u) = self.users.get_mut(user) else {
            return false;
        };
        let before = u.devices.len();
        u.devices.retain(|&(_, c)| c != conn);
        if u.devices.is_empty() && u.inbox.is_empty() {
            self.users.remove(user);
            return true;
        }
        if u.devices.is_empty() {
            u.devices = Vec::new();
            if before > 0
                && let Some((user, _)) = self.users.get_key_value(user)
            {
                let user = Arc::clone(user);
                self.set_online(&user, false);
            }
        }
        false
    }

    /// Gives back the table's memory after many users left (a hash map never shrinks by
    /// itself): when it is under a quarter full.
    pub(crate) fn shrink(&mut self) {
        const MIN_CAPACITY: usize = 1024;
        let (len, cap) = (self.users.len(), self.users.capacity());
        if cap > MIN_CAPACITY && len < cap / 4 {
            self.users.shrink_to((len * 2).max(MIN_CAPACITY));
        }
    }
}

impl<B: Backend> ShardCore<B> {
    /// A stored message for some users of this shard: note it in their inboxes and push it to
    /// their connected devices.
    pub(crate) fn on_deliver(&mut self, d: Delivery) {
        if let Some(push) = d.group.clone() {
            return self.on_group_deliver(d, push);
        }
        if self.gate.offline {
            let offline: Vec<String> = d
                .recipients
                .iter()
                .filter(|r| r.exclude.is_none())
                .filter(|r| {
                    self.home
                        .users
                        .get(&*r.user)
                        .is_none_or(|u| u.devices.is_empty())
                })
                .map(|r| r.user.to_string())
                .collect();
            self.observe_offline(&d, offline);
        }
        let mut targets = std::mem::take(&mut self.target_scratch);
        for r in &d.recipients {
            targets.clear();
            let entry = self.home.note(&r.user, &d.conv, d.seq);
            if entry.last_seq == d.seq {
                entry.last = Some(d.stored.clone());
                entry.last_time = d.time;
            }
            if r.exclude.is_some() {
                // The sender has read its own message.
                entry.cursors.read = entry.cursors.read.max(d.seq);
            }
            let view = entry.view.clone();
            let Some(u) = self.home.users.get(&*r.user) else {
                continue;
            };
            targets.extend(
                u.devices
                    .iter()
                    .filter(|(dev, _)| r.exclude.as_ref().is_none_or(|x| x != dev))
                    .map(|&(_, c)| c),
            );
            for &conn in targets.iter() {
                self.push_live(conn, d.conv.id, &view, d.seq, &d.stored, d.sent_us);
            }
        }
        self.target_scratch = targets;
    }

    /// A group's stored message for its members homed here: the joiners it records start
    /// receiving (with this message), the members online get it, the leavers it records stop
    /// receiving (after this message).
    fn on_group_deliver(&mut self, d: Delivery, push: GroupPush) {
        let (me, placement) = (self.index, self.placement);
        let g = self.home.group(&d.conv);
        if d.seq >= g.last_seq {
            g.last_seq = d.seq;
            g.last = Some(d.stored.clone());
            g.last_time = d.time;
        }
        if placement.home(&push.sender.user) == me
            && let Some(e) = self.home.entry_mut(&push.sender.user, d.conv.id)
        {
            // The sender has read its own message.
            e.cursors.read = e.cursors.read.max(d.seq);
        }
        if let Some(change) = &push.change {
            for user in change.joined.iter().filter(|u| placement.home(u) == me) {
                self.home.set_membership(user, &d.conv, d.seq, u64::MAX);
            }
        }
        let mut targets = std::mem::take(&mut self.target_scratch);
        targets.clear();
        let Some(g) = self.home.groups.get(&d.conv.id) else {
            return;
        };
        let view = g.view.clone();
        for user in &g.online {
            let Some(u) = self.home.users.get(user) else {
                continue;
            };
            // Only what the user's membership covers: a summary after a lost link may have
            // told this home of a membership (a re-add) newer than this message.
            let covered = u
                .inbox
                .get(&d.conv.id)
                .and_then(|e| e.window)
                .is_none_or(|(from, to)| (from..=to).contains(&d.seq));
            if !covered {
                continue;
            }
            let own = **user == *push.sender.user;
            targets.extend(
                u.devices
                    .iter()
                    .filter(|(dev, _)| !(own && **dev == *push.sender.device))
                    .map(|&(_, c)| c),
            );
        }
        for &conn in &targets {
            if self.push_live(conn, d.conv.id, &view, d.seq, &d.stored, d.sent_us) {
                self.counters.group_deliveries += 1;
            }
        }
        self.target_scratch = targets;
        if self.gate.offline
            && let Some(g) = self.home.groups.get(&d.conv.id)
        {
            let mut offline: Vec<String> = g
                .members
                .iter()
                .filter(|&(u, &at)| at == OFFLINE && **u != *push.sender.user)
                .map(|(u, _)| u.to_string())
                .collect();
            offline.sort();
            self.observe_offline(&d, offline);
        }
        if let Some(change) = &push.change {
            let keep_pushing = self.test_switches.push_after_leave;
            for user in change.left.iter().filter(|u| placement.home(u) == me) {
                if keep_pushing {
                    continue;
                }
                self.home.end_membership(user, &d.conv, d.seq);
                if let Some(e) = self.home.entry_mut(user, d.conv.id) {
                    // What a former member's conversation list shows.
                    e.last_time = d.time;
                }
            }
            if change.dissolved {
                let members: Vec<Arc<str>> = self
                    .home
                    .groups
                    .get(&d.conv.id)
                    .map(|g| g.members.keys().cloned().collect())
                    .unwrap_or_default();
                for user in &members {
                    self.home.end_membership(user, &d.conv, d.seq);
                }
            }
        }
    }

    /// Tells the offline observer that `users` were offline for `d`'s message (if any were).
    fn observe_offline(&self, d: &Delivery, users: Vec<String>) {
        let Some(h) = self.gate.observer() else {
            return;
        };
        if users.is_empty() {
            return;
        }
        let sender = match &d.group {
            Some(push) => push.sender.user.to_string(),
            None => parley_proto::splice::peek_message(&d.stored)
                .map(|h| h.from_user.to_owned())
                .unwrap_or_default(),
        };
        h.stored_for_offline(&crate::hooks::OfflineDelivery {
            conversation: super::gate::conversation_ref(&d.conv),
            seq: d.seq,
            sender,
            users,
        });
    }

    /// Start-up: a group's users homed here and what they may read.
    pub(crate) fn on_group_inbox(&mut self, gi: GroupInbox) {
        let g = self.home.group(&gi.conv);
        let known = g.last_seq;
        g.last_seq = g.last_seq.max(gi.last_seq);
        g.last_time = g.last_time.max(gi.last_time);
        for (user, from, to) in &gi.users {
            self.home.set_membership(user, &gi.conv, *from, *to);
        }
        self.report_group_reads(&gi);
        // As for a direct conversation (`on_inbox`): the members online get what they missed.
        if gi.last_seq > known {
            let online: Vec<Arc<str>> = self
                .home
                .groups
                .get(&gi.conv.id)
                .map(|g| g.online.to_vec())
                .unwrap_or_default();
            for user in online {
                let from = gi
                    .users
                    .iter()
                    .find(|(u, _, _)| *u == user)
                    .map_or(known, |&(_, joined, _)| known.max(joined.saturating_sub(1)));
                self.fill(&user, &gi.conv, from, gi.last_seq);
            }
        }
    }

    /// Pushes one live message to one connection, unless it is behind, syncing, or has it;
    /// returns whether it was pushed. A push records the send-to-deliver latency from `sent_us`
    /// (the send's arrival at its sender's shard, [`super::Latencies::send_to_deliver`]);
    /// retransmits and sync pages do not come here and are not recorded.
    pub(crate) fn push_live(
        &mut self,
        conn: ConnId,
        conv: u64,
        view: &Bytes,
        seq: u64,
        stored: &Bytes,
        sent_us: Option<u64>,
    ) -> bool {
        let now = self.now.ms;
        let (cfg, timers) = (&self.cfg, &mut self.timers);
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return false;
        };
        if c.id != conn
            || !c
                .delivery
                .push(conv, view, seq, stored, now, cfg, timers, conn)
        {
            return false;
        }
        self.counters.deliveries += 1;
        if let Some(sent) = sent_us {
            self.latencies
                .send_to_deliver
                .record(self.now.us.saturating_sub(sent));
        }
        let m = [splice::Spliced { stored, view }];
        self.write_spliced(conn, |out| {
            splice::encode_deliver(0, &m, out);
        });
        self.check_backlog(conn);
        true
    }

    /// The user's view of conversation `conv`, if the user has it in its inbox.
    pub(crate) fn view_of(&self, user: &str, conv: u64) -> Option<Bytes> {
        self.home
            .users
            .get(user)
            .and_then(|u| u.inbox.get(&conv))
            .map(|e| e.view.clone())
    }

    /// The view of `conv` for `user`, made if the inbox does not hold it.
    pub(crate) fn view_for(&self, user: &str, conv: &Conv) -> Bytes {
        self.view_of(user, conv.id)
            .unwrap_or_else(|| Bytes::from(splice::view_field(&conv.view_for(user))))
    }

    /// Start-up: `conv` holds messages up to `last_seq` (stored at `last_time`) for `user`.
    pub(crate) fn on_inbox(
        &mut self,
        user: Arc<str>,
        conv: Arc<Conv>,
        last_seq: u64,
        last_time: i64,
    ) {
        let known = self
            .home
            .entry_mut(&user, conv.id)
            .map_or(0, |e| e.last_seq);
        let e = self.home.note(&user, &conv, last_seq);
        e.last_time = e.last_time.max(last_time);
        // Told of messages whose delivery never came (a lost link, a crashed owner): the
        // devices online get them now. At start-up nobody is online: nothing to pull.
        self.fill(&user, &conv, known, last_seq);
    }

    /// Builds the summary entry of a user's conversation `e` (`cursor`: what the client holds).
    pub(crate) fn conversation_state(
        &self,
        e: &InboxEntry,
        user: &str,
        cursor: u64,
    ) -> pb::ConversationState {
        let (floor, last_seq) = self.home.visible(e);
        let read = e.cursors.read.max(floor).min(last_seq);
        let (_, last_activity) = self.home.last_of(e);
        pb::ConversationState {
            conversation: Some(e.conv.view_for(user)),
            last_seq,
            unread: last_seq.saturating_sub(cursor),
            last_message: None,
            read_seq: read,
            unread_count: last_seq - read,
            delivered_seq: e.cursors.delivered.min(last_seq),
            last_activity,
            peer_read_seq: e.cursors.peer_read,
        }
    }
}
