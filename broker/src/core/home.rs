//! The user home: a user's connected devices and inbox (the last seq of each of the user's
//! conversations), live push to the devices, and login registration.
//!
//! A user's connections all live on the user's home shard (a connection moves there after login),
//! so a delivery reaches every device of a user with one cross-shard hop from the owner.

use std::sync::Arc;

use bytes::Bytes;
use parley_proto::{pb, splice};

use super::FastMap;
use super::conn::ConnId;
use super::conv::Conv;
use super::mail::Delivery;
use super::{ShardCore, mail::Device};
use parley_storage::Backend;

/// One conversation of a user, as the home knows it.
#[derive(Debug)]
pub(crate) struct InboxEntry {
    pub(crate) conv: Arc<Conv>,
    pub(crate) last_seq: u64,
    /// The user's view of the conversation, ready to splice after a stored message.
    pub(crate) view: Bytes,
}

impl InboxEntry {
    fn new(conv: Arc<Conv>, user: &str) -> Self {
        let view = Bytes::from(splice::view_field(&conv.view_for(user)));
        InboxEntry {
            conv,
            last_seq: 0,
            view,
        }
    }
}

/// A user whose home is this shard.
#[derive(Debug, Default)]
pub(crate) struct User {
    /// Connected devices and their connections.
    pub(crate) devices: Vec<(Arc<str>, ConnId)>,
    /// Conversations by id.
    pub(crate) inbox: FastMap<u64, InboxEntry>,
}

/// The home role's state.
///
/// A user is in [`Home::users`] while a device of theirs is online or they have a conversation
/// (the inbox is what a sync summarises); a user with neither costs nothing.
#[derive(Debug, Default)]
pub(crate) struct Home {
    pub(crate) users: FastMap<Arc<str>, User>,
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
            .or_insert_with(|| InboxEntry::new(Arc::clone(conv), user));
        e.last_seq = e.last_seq.max(last_seq);
        e
    }

    /// Registers `conn` as `device`'s connection; returns the connections it replaces.
    pub(crate) fn register(&mut self, device: &Device, conn: ConnId) -> Vec<ConnId> {
        let u = self.users.entry(Arc::clone(&device.user)).or_default();
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
        replaced
    }

    /// Forgets `conn` as a connection of `user`. A user with no device online and no
    /// conversation is forgotten altogether (it is rebuilt at its next login); returns whether
    /// it was.
    pub(crate) fn unregister(&mut self, user: &str, conn: ConnId) -> bool {
        let Some(u) = self.users.get_mut(user) else {
            return false;
        };
        u.devices.retain(|&(_, c)| c != conn);
        if u.devices.is_empty() && u.inbox.is_empty() {
            self.users.remove(user);
            return true;
        }
        if u.devices.is_empty() {
            u.devices = Vec::new();
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
        let mut targets = std::mem::take(&mut self.target_scratch);
        for r in &d.recipients {
            targets.clear();
            let entry = self.home.note(&r.user, &d.conv, d.seq);
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
                self.push_live(conn, d.conv.id, &view, d.seq, &d.stored);
            }
        }
        self.target_scratch = targets;
    }

    /// Pushes one live message to one connection, unless it is behind, syncing, or has it.
    fn push_live(&mut self, conn: ConnId, conv: u64, view: &Bytes, seq: u64, stored: &Bytes) {
        let now = self.now.ms;
        let (cfg, timers) = (&self.cfg, &mut self.timers);
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        if c.id != conn
            || !c
                .delivery
                .push(conv, view, seq, stored, now, cfg, timers, conn)
        {
            return;
        }
        self.counters.deliveries += 1;
        let m = [splice::Spliced { stored, view }];
        self.write_spliced(conn, |out| {
            splice::encode_deliver(0, &m, out);
        });
        self.check_backlog(conn);
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

    /// Start-up: `conv` holds messages up to `last_seq` for `user`.
    pub(crate) fn on_inbox(&mut self, user: Arc<str>, conv: Arc<Conv>, last_seq: u64) {
        self.home.note(&user, &conv, last_seq);
    }

    /// Builds the summary entry of a user's conversation.
    pub(crate) fn conversation_state(
        conv: &Conv,
        user: &str,
        last_seq: u64,
        cursor: u64,
    ) -> pb::ConversationState {
        pb::ConversationState {
            conversation: Some(conv.view_for(user)),
            last_seq,
            unread: last_seq - cursor,
            last_message: None,
        }
    }
}
