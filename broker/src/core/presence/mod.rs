//! Presence and typing indicators: who is online (over all of a user's devices), pushed to
//! subscribers in coalesced, bounded batches; online counts of groups; typing relayed at most
//! once, never stored.
//!
//! ### Where things live
//! * **The watched user's home** (`placement.home(user)`, which holds all of the user's
//!   connections) keeps its presence in a [`Board`]: what subscribers were last told
//!   ([`Entry::published`]), `last_seen`, and the connections watching it ([`Watcher`]s, on any
//!   shard). The status is computed on demand from the home's devices and each connection's
//!   AWAY flag ([`snapshot`]): ONLINE if a device is connected and not every connected device set
//!   AWAY; AWAY if every one did; OFFLINE with no device. `last_seen` (the wall-clock time the
//!   last device left) is kept in memory only: it resets on restart, and a user not seen since
//!   start has 0. The board keeps one small entry per user watched or gone offline since start
//!   (an entry without watchers and without a `last_seen` is forgotten).
//! * **The watching connection's shard** keeps, per connection ([`ConnPresence`]), the users it
//!   watches (so the subscriptions end with the connection: its close unsubscribes them at their
//!   homes), its AWAY flag, its typing stamps, and the answers it waits for ([`Gather`]: one per
//!   QUERY, SUBSCRIBE or QUERY_GROUP, with a count of the shards still to answer).
//!
//! ### Coalescing and the bounded flush
//! A change does not push anything: the home marks the user dirty ([`Board::changed`]) and arms
//! one [`super::timers::TimerFor::Presence`] deadline `presence.coalesce_ms` ahead. The flush
//! ([`Board::flush`]) takes the dirty users, and for each whose status or devices now differ from
//! [`Entry::published`] publishes the new presence to every watcher; a user whose presence is
//! back to what was published (a device that dropped and came back) pushes nothing. A flush sends
//! at most `presence.max_notifications_per_turn` notifications (one user for one watcher); the
//! rest continue on the next turn from a cursor into the user's (ordered) watchers, so a user
//! with 100,000 subscribers never stalls the shard. Notifications go out as one mail per target
//! shard per turn ([`Mail::Push`]), and the target writes one `PresenceUpdate` per watching
//! connection carrying every changed user it watches.
//!
//! ### Invariants
//! * A user with an entry and not dirty has `published` equal to its presence now (every change
//!   goes through [`Board::changed`], which publishes at once when nobody watches, else marks it
//!   dirty; a new entry starts from the presence then).
//! * At most one presence deadline is in the wheel ([`Board::armed`]); dirty users are taken
//!   only by a flush that starts with no job left, so a user is pushed at most once per window.
//! * A watcher that unsubscribed (or whose connection closed) is never notified after its
//!   unsubscription reached the home; a notification on its way is dropped by the watcher's
//!   shard, which checks the connection still watches the user.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_storage::Backend;

use super::conn::ConnId;
use super::conv::{Conv, ConvKind, MAX_CONV_ID_BYTES};
use super::error::Refusal;
use super::home::Home;
use super::mail::{Device, Origin, ShardMsg};
use super::session::ACK_RESERVE;
use super::timers::TimerFor;
use super::{FastMap, ShardCore};

mod handlers;

/// A connection watching a user: its shard, slot and the slot's generation (ordered, so a
/// flush cut short resumes after the last one it notified).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub(crate) struct Watcher {
    shard: usize,
    slot: u32,
    generation: u32,
}

impl From<Origin> for Watcher {
    fn from(o: Origin) -> Self {
        Watcher {
            shard: o.shard,
            slot: o.slot,
            generation: o.generation,
        }
    }
}

impl Watcher {
    /// The connection, on its own shard.
    fn conn(self) -> ConnId {
        ConnId {
            slot: self.slot,
            generation: self.generation,
        }
    }
}

/// A user's presence as subscribers see it: its status and its connected devices (sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    status: pb::PresenceStatus,
    devices: Vec<Arc<str>>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            status: pb::PresenceStatus::Offline,
            devices: Vec::new(),
        }
    }
}

impl Snapshot {
    /// The wire form for `user` (`last_seen` only when OFFLINE).
    fn to_pb(&self, user: &str, last_seen: i64) -> pb::UserPresence {
        let offline = self.status == pb::PresenceStatus::Offline;
        pb::UserPresence {
            user: user.to_owned(),
            status: self.status as i32,
            devices: self.devices.iter().map(|d| d.to_string()).collect(),
            last_seen: if offline { last_seen } else { 0 },
        }
    }
}

/// `user`'s presence now, from the home's connected devices and their connections' AWAY flags.
pub(crate) fn snapshot(home: &Home, conns: &FastMap<ConnId, ConnPresence>, user: &str) -> Snapshot {
    let devices = home.users.get(user).map_or(&[][..], |u| &u.devices[..]);
    if devices.is_empty() {
        return Snapshot::default();
    }
    let away = devices
        .iter()
        .all(|(_, c)| conns.get(c).is_some_and(|p| p.away));
    let mut names: Vec<Arc<str>> = devices.iter().map(|(d, _)| Arc::clone(d)).collect();
    names.sort_unstable();
    names.dedup();
    Snapshot {
        status: if away {
            pb::PresenceStatus::Away
        } else {
            pb::PresenceStatus::Online
        },
        devices: names,
    }
}

/// One user's presence at its home.
#[derive(Debug, Default)]
struct Entry {
    /// What the watchers were last told (kept current while nobody watches).
    published: Snapshot,
    /// When the last device left (Unix ms; 0: not since start).
    last_seen: i64,
    /// In [`Board::dirty`].
    dirty: bool,
    /// The connections watching the user.
    watchers: BTreeSet<Watcher>,
    /// Watchers answered with a presence other than `published` since the last flush (the user
    /// was dirty): the next flush brings them up to date even if it publishes nothing.
    catchup: Vec<Watcher>,
}

/// Who a flush job notifies.
#[derive(Debug)]
enum Targets {
    /// Every watcher, in order, after this one (`None`: from the first).
    All(Option<Watcher>),
    /// These watchers (taken from the end), if they still watch.
    Only(Vec<Watcher>),
}

/// One user's update on its way to its watchers.
#[derive(Debug)]
struct Job {
    user: Arc<str>,
    update: Arc<pb::UserPresence>,
    to: Targets,
}

/// The home side of presence: every user of this home with presence state, the dirty ones,
/// and the flush under way.
#[derive(Debug, Default)]
pub(crate) struct Board {
    users: FastMap<Arc<str>, Entry>,
    /// Users changed since the last flush took them, in order.
    dirty: Vec<Arc<str>>,
    /// Updates published and not yet sent to every watcher.
    jobs: VecDeque<Job>,
    /// A presence deadline is in the wheel.
    armed: bool,
}

impl Board {
    /// `user`'s presence may have changed (it is `current` now), at `now`: published at once
    /// if nobody watches, else the user is marked dirty. Returns the deadline to arm, if one is
    /// needed (`coalesce` ms ahead). A user without an entry (never watched, never left) needs
    /// none: a subscription makes one from its presence then.
    pub(crate) fn changed(
        &mut self,
        user: &Arc<str>,
        current: Snapshot,
        now: u64,
        coalesce: u64,
    ) -> Option<u64> {
        let e = self.users.get_mut(user)?;
        if e.watchers.is_empty() && e.catchup.is_empty() {
            e.published = current;
            return None;
        }
        self.mark_dirty(user, now, coalesce)
    }

    /// Marks `user` (which has an entry) dirty; returns the deadline to arm, if any.
    fn mark_dirty(&mut self, user: &Arc<str>, now: u64, coalesce: u64) -> Option<u64> {
        let e = self.users.get_mut(user)?;
        if !e.dirty {
            e.dirty = true;
            self.dirty.push(Arc::clone(user));
        }
        if self.armed {
            return None;
        }
        self.armed = true;
        Some(now.saturating_add(coalesce))
    }

    /// `user`'s last device left at `unix_ms` (kept here for a watched user; the home keeps
    /// it for every user it holds).
    pub(crate) fn left(&mut self, user: &Arc<str>, unix_ms: i64) {
        if let Some(e) = self.users.get_mut(user) {
            e.last_seen = unix_ms;
        }
    }

    /// `watcher` subscribes to `user`, whose presence is `current`: returns the answer (its
    /// presence now) and the deadline to arm, if one is needed.
    pub(crate) fn subscribe(
        &mut self,
        user: &Arc<str>,
        watcher: Watcher,
        (current, last_seen): (Snapshot, i64),
        now: u64,
        coalesce: u64,
    ) -> (pb::UserPresence, Option<u64>) {
        let e = self.users.entry(Arc::clone(user)).or_insert_with(|| Entry {
            published: current.clone(),
            last_seen,
            ..Entry::default()
        });
        e.watchers.insert(watcher);
        debug_assert!(
            e.dirty || current == e.published,
            "a user not dirty has its presence published"
        );
        let answer = current.to_pb(user, e.last_seen);
        if current == e.published {
            return (answer, None);
        }
        // Answered with what the others will be told at the next flush, unless the user comes
        // back to what was published: then this one is told so (and only this one).
        e.catchup.push(watcher);
        let arm = self.mark_dirty(user, now, coalesce);
        (answer, arm)
    }

    /// Forgets every watcher on a shard for which `gone` holds (the link to their node went
    /// down, and those connections are closed there).
    pub(crate) fn forget_watchers(&mut self, gone: impl Fn(usize) -> bool) {
        self.users.retain(|_, e| {
            e.watchers.retain(|w| !gone(w.shard));
            e.catchup.retain(|w| !gone(w.shard));
            !e.watchers.is_empty() || e.dirty
        });
    }

    /// `watcher` no longer watches `user`.
    pub(crate) fn unsubscribe(&mut self, user: &str, watcher: Watcher) {
        let Some(e) = self.users.get_mut(user) else {
            return;
        };
        e.watchers.remove(&watcher);
        e.catchup.retain(|w| *w != watcher);
        // Without watchers the entry holds nothing worth keeping: a user nobody watches costs
        // nothing here (its last_seen is kept by its home while the home holds the user).
        if e.watchers.is_empty() && !e.dirty {
            self.users.remove(user);
        }
    }

    /// Runs one flush turn at `now`: starts a new flush if none is under way (taking the dirty
    /// users, publishing those whose presence changed), then hands out at most `budget`
    /// notifications to `out`, in order. `current` says a user's presence now. Returns the next
    /// deadline to arm: the next turn if notifications remain, a window ahead if users are dirty.
    pub(crate) fn flush(
        &mut self,
        now: u64,
        coalesce: u64,
        budget: usize,
        mut current: impl FnMut(&str) -> Snapshot,
        out: &mut Vec<(Watcher, Arc<pb::UserPresence>)>,
    ) -> Option<u64> {
        self.armed = false;
        if self.jobs.is_empty() {
            for user in std::mem::take(&mut self.dirty) {
                let Some(e) = self.users.get_mut(&user) else {
                    continue;
                };
                e.dirty = false;
                let catchup = std::mem::take(&mut e.catchup);
                let now_is = current(&user);
                let to = if now_is != e.published {
                    e.published = now_is;
                    if e.watchers.is_empty() {
                        continue;
                    }
                    Targets::All(None)
                } else if !catchup.is_empty() {
                    Targets::Only(catchup)
                } else {
                    continue;
                };
                let update = Arc::new(e.published.to_pb(&user, e.last_seen));
                self.jobs.push_back(Job { user, update, to });
            }
        }
        let mut sent = 0;
        while sent < budget
            && let Some(job) = self.jobs.front_mut()
        {
            let Some(e) = self.users.get(&job.user) else {
                self.jobs.pop_front();
                continue;
            };
            let done = match &mut job.to {
                Targets::All(after) => {
                    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
                    let mut rest = e.watchers.range((from, Bound::Unbounded)).peekable();
                    while sent < budget
                        && let Some(&w) = rest.next()
                    {
                        out.push((w, Arc::clone(&job.update)));
                        sent += 1;
                        *after = Some(w);
                    }
                    rest.peek().is_none()
                }
                Targets::Only(list) => {
                    while sent < budget
                        && let Some(w) = list.pop()
                    {
                        if e.watchers.contains(&w) {
                            out.push((w, Arc::clone(&job.update)));
                            sent += 1;
                        }
                    }
                    list.is_empty()
                }
            };
            if !done {
                break;
            }
            self.jobs.pop_front();
        }
        debug_assert!(sent <= budget, "a flush turn stays within its budget");
        if !self.jobs.is_empty() {
            self.armed = true;
            return Some(now + 1);
        }
        if !self.dirty.is_empty() {
            self.armed = true;
            return Some(now.saturating_add(coalesce));
        }
        None
    }
}

/// A connection's presence state, on its own shard.
#[derive(Debug, Default)]
pub(crate) struct ConnPresence {
    /// The connection set AWAY.
    away: bool,
    /// The users it watches (sorted: unsubscribing at close goes in a fixed order).
    watching: BTreeSet<Arc<str>>,
    /// Answers it waits for ([`Presence::gathers`] ids).
    gathers: Vec<u64>,
    /// The last relayed typing frames: conversation id, typing, when (ms).
    typing: Vec<(u64, bool, u64)>,
}

/// Most conversations a connection's typing stamps remember (the oldest is forgotten).
const TYPING_STAMPS: usize = 16;

impl ConnPresence {
    /// Whether a typing frame (`typing`) for conversation `conv` is relayed at `now`: at most one
    /// of each kind per `interval` ms.
    fn admit_typing(&mut self, conv: u64, typing: bool, now: u64, interval: u64) -> bool {
        if let Some(stamp) = self
            .typing
            .iter_mut()
            .find(|(c, t, _)| *c == conv && *t == typing)
        {
            if now.saturating_sub(stamp.2) < interval {
                return false;
            }
            stamp.2 = now;
            return true;
        }
        if self.typing.len() >= TYPING_STAMPS {
            self.typing
                .retain(|&(_, _, at)| now.saturating_sub(at) < interval);
            if self.typing.len() >= TYPING_STAMPS {
                self.typing.remove(0);
            }
        }
        self.typing.push((conv, typing, now));
        debug_assert!(self.typing.len() <= TYPING_STAMPS);
        true
    }
}

/// What an answer under way collects.
#[derive(Debug)]
enum Collect {
    /// QUERY or SUBSCRIBE: the users asked, in order, and the presences answered so far;
    /// `cluster_wide`: a QUERY in a cluster, completed from the presence index before it is
    /// answered (a SUBSCRIBE's answer and pushes are this node's: a push must never be
    /// overtaken by an older answer).
    Users {
        order: Vec<Arc<str>>,
        got: FastMap<Arc<str>, pb::UserPresence>,
        cluster_wide: bool,
    },
    /// QUERY_GROUP: the group and the online members counted so far.
    GroupCount { group_id: String, count: u64 },
}

/// An answer under way: the shards still to reply, then one frame for the requester.
#[derive(Debug)]
pub(crate) struct Gather {
    conn: ConnId,
    request_id: u64,
    remaining: usize,
    collect: Collect,
}

/// What a request asks of the watched users' homes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Op {
    /// Their presence now.
    Query,
    /// Their presence now, and their changes from now on.
    Subscribe,
    /// No more changes (no answer).
    Unsubscribe,
}

/// A typing frame on its way to the devices of one shard.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct TypingRelay {
    #[serde(with = "super::wire::conv")]
    conv: Arc<Conv>,
    from: Device,
    typing: bool,
    /// DIRECT: the users homed at the target (GROUP: empty; the target's members online).
    users: Vec<Arc<str>>,
}

#[cfg(test)]
impl TypingRelay {
    /// A relay as [`ShardCore::on_typing`] makes one (for the mail encoding's tests).
    pub(crate) fn for_test(
        conv: Arc<Conv>,
        from: Device,
        typing: bool,
        users: Vec<Arc<str>>,
    ) -> Self {
        TypingRelay {
            conv,
            from,
            typing,
            users,
        }
    }
}

/// What shards tell each other about presence and typing.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Mail {
    /// To the users' home: QUERY, SUBSCRIBE or UNSUBSCRIBE of `users` by connection `from`.
    Users {
        from: Origin,
        gather: u64,
        op: Op,
        users: Vec<Arc<str>>,
    },
    /// A home's answer to [`Mail::Users`].
    Answer {
        to: Origin,
        gather: u64,
        #[serde(with = "super::wire::prost_vec")]
        users: Vec<pb::UserPresence>,
    },
    /// To a watchers' shard: changed users, each with the connections there that watch it.
    Push {
        #[serde(with = "super::wire::prost_arc_pairs")]
        updates: Vec<(Arc<pb::UserPresence>, Vec<Watcher>)>,
    },
    /// To every shard: count the members of group `conv` homed there that are online.
    CountGroup {
        from: Origin,
        gather: u64,
        conv: u64,
    },
    /// A shard's answer to [`Mail::CountGroup`].
    Counted { to: Origin, gather: u64, count: u64 },
    /// A typing frame to relay.
    Typing(TypingRelay),
}

/// A shard's presence state: the home side ([`Board`]) and the connection side.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    board: Board,
    conns: FastMap<ConnId, ConnPresence>,
    gathers: FastMap<u64, Gather>,
    next_gather: u64,
    /// In a cluster: answers complete on this node, waiting for the presence index's routes.
    looking: FastMap<u64, Gather>,
}

impl Presence {
    /// Whether connection `conn` watches a user for whom `watched` holds.
    pub(crate) fn watches_any(&self, conn: ConnId, watched: impl Fn(&str) -> bool) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|p| p.watching.iter().any(|u| watched(u)))
    }

    /// Forgets the watchers on a shard for which `gone` holds (see [`Board::forget_watchers`]).
    pub(crate) fn forget_watchers(&mut self, gone: impl Fn(usize) -> bool) {
        self.board.forget_watchers(gone);
    }
}

/// Bytes a user's entry adds to a `PresenceUpdate` beyond its own encoding (tag and length).
const ENTRY_OVERHEAD: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 100;

    fn online(devices: &[&str]) -> Snapshot {
        Snapshot {
            status: pb::PresenceStatus::Online,
            devices: devices.iter().map(|d| Arc::from(*d)).collect(),
        }
    }

    fn w(slot: u32) -> Watcher {
        Watcher {
            shard: (slot % 2) as usize,
            slot,
            generation: 1,
        }
    }

    /// A board where `user` is online on "phone" (published) and watched by `watchers`.
    fn watched(user: &Arc<str>, watchers: impl IntoIterator<Item = Watcher>) -> Board {
        let mut b = Board::default();
        assert_eq!(
            b.changed(user, online(&["phone"]), 0, C),
            None,
            "nobody watches yet"
        );
        for x in watchers {
            let (p, arm) = b.subscribe(user, x, (online(&["phone"]), 0), 0, C);
            assert_eq!(p.status, pb::PresenceStatus::Online as i32);
            assert_eq!(arm, None, "the answer is what is published");
        }
        b
    }

    fn flush_all(
        b: &mut Board,
        now: u64,
        current: &Snapshot,
    ) -> Vec<(Watcher, Arc<pb::UserPresence>)> {
        let mut out = Vec::new();
        b.flush(now, C, usize::MAX, |_| current.clone(), &mut out);
        out
    }

    #[test]
    fn a_device_that_drops_and_comes_back_within_the_window_pushes_nothing() {
        let bob: Arc<str> = Arc::from("bob");
        let mut b = watched(&bob, [w(1), w(2)]);
        assert_eq!(
            b.changed(&bob, Snapshot::default(), 10, C),
            Some(110),
            "one deadline a window ahead"
        );
        b.left(&bob, 1234);
        assert_eq!(
            b.changed(&bob, online(&["phone"]), 20, C),
            None,
            "already armed"
        );
        assert!(flush_all(&mut b, 110, &online(&["phone"])).is_empty());
    }

    #[test]
    fn a_real_change_reaches_every_watcher_once_per_window() {
        let bob: Arc<str> = Arc::from("bob");
        let mut b = watched(&bob, [w(1), w(2), w(3)]);
        b.left(&bob, 1234);
        let arm = b.changed(&bob, Snapshot::default(), 10, C);
        assert_eq!(arm, Some(110));
        let out = flush_all(&mut b, 110, &Snapshot::default());
        assert_eq!(
            out.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
            vec![w(2), w(1), w(3)],
            "in watcher order (by shard first)"
        );
        assert_eq!(out[0].1.status, pb::PresenceStatus::Offline as i32);
        assert_eq!(out[0].1.last_seen, 1234);
        assert!(
            flush_all(&mut b, 210, &Snapshot::default()).is_empty(),
            "published: nothing more"
        );
        // A second device is a change too (the devices are listed).
        assert_eq!(
            b.changed(&bob, online(&["laptop", "phone"]), 300, C),
            Some(400)
        );
        let out = flush_all(&mut b, 400, &online(&["laptop", "phone"]));
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].1.devices, vec!["laptop", "phone"]);
        assert_eq!(out[0].1.last_seen, 0, "last_seen only while offline");
    }

    #[test]
    fn a_flush_sends_at_most_its_budget_per_turn_and_each_watcher_once() {
        let bob: Arc<str> = Arc::from("bob");
        let mut b = watched(&bob, (0..25).map(w));
        b.changed(&bob, Snapshot::default(), 0, C);
        let mut out = Vec::new();
        let off = Snapshot::default();
        assert_eq!(
            b.flush(100, C, 10, |_| off.clone(), &mut out),
            Some(101),
            "the next turn"
        );
        assert_eq!(out.len(), 10);
        // Meanwhile one watcher leaves and a new one comes (it was answered OFFLINE already).
        b.unsubscribe(&bob, w(20));
        let (p, _) = b.subscribe(&bob, w(99), (off.clone(), 0), 100, C);
        assert_eq!(p.status, pb::PresenceStatus::Offline as i32);
        // A change during the flush waits for the next window.
        assert_eq!(b.changed(&bob, online(&["phone"]), 100, C), None);
        assert_eq!(b.flush(101, C, 10, |_| off.clone(), &mut out), Some(102));
        assert_eq!(out.len(), 20);
        assert_eq!(
            b.flush(102, C, 10, |_| off.clone(), &mut out),
            Some(202),
            "then a window for the dirty user"
        );
        let mut got: Vec<u32> = out.iter().map(|(x, _)| x.slot).collect();
        got.sort_unstable();
        let mut want: Vec<u32> = (0..25).filter(|&s| s != 20).chain([99]).collect();
        want.sort_unstable();
        assert_eq!(
            got, want,
            "every watcher once, the one that left not at all"
        );
    }

    #[test]
    fn a_watcher_answered_during_a_flap_is_told_the_flap_is_over_and_only_it() {
        let bob: Arc<str> = Arc::from("bob");
        let mut b = watched(&bob, [w(1)]);
        assert_eq!(b.changed(&bob, Snapshot::default(), 0, C), Some(C));
        let (p, arm) = b.subscribe(&bob, w(2), (Snapshot::default(), 0), 5, C);
        assert_eq!((p.status, arm), (pb::PresenceStatus::Offline as i32, None));
        b.changed(&bob, online(&["phone"]), 10, C);
        let out = flush_all(&mut b, C, &online(&["phone"]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, w(2));
        assert_eq!(out[0].1.status, pb::PresenceStatus::Online as i32);
    }

    #[test]
    fn changes_nobody_watches_are_published_at_once_and_arm_nothing() {
        let bob: Arc<str> = Arc::from("bob");
        let mut b = Board::default();
        assert_eq!(b.changed(&bob, online(&["phone"]), 0, C), None);
        b.left(&bob, 77);
        assert_eq!(b.changed(&bob, Snapshot::default(), 1, C), None);
        assert!(!b.armed);
        // The home kept bob's last_seen; a subscription takes it from there.
        let (p, arm) = b.subscribe(&bob, w(1), (Snapshot::default(), 77), 2, C);
        assert_eq!(
            (p.status, p.last_seen, arm),
            (pb::PresenceStatus::Offline as i32, 77, None)
        );
    }

    #[test]
    fn a_user_is_forgotten_once_nobody_watches_it_whatever_it_did() {
        let ghost: Arc<str> = Arc::from("ghost");
        let seen: Arc<str> = Arc::from("seen");
        let mut b = Board::default();
        b.subscribe(&ghost, w(1), (Snapshot::default(), 0), 0, C);
        b.changed(&seen, online(&["phone"]), 0, C);
        b.left(&seen, 5);
        assert!(!b.users.contains_key("seen"), "nobody watches it: no entry");
        b.subscribe(&seen, w(1), (Snapshot::default(), 5), 0, C);
        assert_eq!(b.users.get("seen").map(|e| e.last_seen), Some(5));
        b.left(&seen, 9);
        assert_eq!(
            b.users.get("seen").map(|e| e.last_seen),
            Some(9),
            "watched: kept current"
        );
        b.unsubscribe(&ghost, w(1));
        b.unsubscribe(&seen, w(1));
        assert!(b.users.is_empty(), "a user nobody watches costs nothing");
    }

    #[test]
    fn typing_is_relayed_once_per_kind_and_interval() {
        let mut p = ConnPresence::default();
        assert!(p.admit_typing(1, true, 0, 1000));
        assert!(!p.admit_typing(1, true, 999, 1000));
        assert!(p.admit_typing(1, false, 999, 1000), "a stop passes");
        assert!(p.admit_typing(2, true, 999, 1000), "another conversation");
        assert!(p.admit_typing(1, true, 1000, 1000));
        for conv in 10..40 {
            assert!(p.admit_typing(conv, true, 2000, 1000));
        }
        assert!(p.typing.len() <= TYPING_STAMPS);
    }
}
