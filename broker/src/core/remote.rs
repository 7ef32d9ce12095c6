//! Mail to and from the other nodes of a cluster (with `cluster.nodes`): what a shard does when
//! a node cannot be reached, when a link to one goes down and when it comes up.
//!
//! Shards are numbered across the cluster ([`super::conv::Placement`]), so most of the core
//! does not know whether a conversation's owner or a user's home is on this node: its mail
//! goes out as [`super::Effect::Mail`] either way and the driver carries it, over a link for
//! another node. What the links cannot promise is dealt with here:
//!
//! * **A node that cannot be reached** (no link to it now): the driver hands the mail back
//!   ([`ShardCore::handle_unreachable`]). A request is answered UNAVAILABLE with a retry hint,
//!   at once; anything else (a delivery, an inbox update, an answer to a connection there) is
//!   dropped: the next link-up repairs it (below), and that node's connections are closed.
//! * **A link that went down** ([`ShardCore::handle_link_down`]) may have lost mail in
//!   flight. A request lost that way would never be answered, so every connection of this
//!   shard that waits for an answer (bytes reserved for a reply, or a sync page asked) is
//!   closed UNAVAILABLE: its client logs in again, resends with the same ids (which the owners
//!   de-duplicate) and syncs.
//! * **A link that came up** ([`ShardCore::handle_link_up`]), the first time or again: each
//!   shard tells the homes on that node what it tells its own node's homes at start-up (each
//!   member's conversations and their last seq, each group's readers, each sender's newest
//!   message); the homes answer with their users' group read cursors. A home that learns of
//!   messages it was not told about (their delivery was lost with a link, or their owner
//!   crashed between storing and delivering) pulls them from the owner and pushes them to its
//!   users' devices online ([`ReadPurpose::Fill`]).

use std::sync::Arc;

use parley_storage::Backend;

use super::Effect;
use super::ShardCore;
use super::conv::{Conv, Placement};
use super::error::{CloseReason, Refusal};
use super::mail::{Device, GroupInbox, Read, ReadDone, ReadPurpose, ShardMsg};
use super::presence::Mail as PresenceMail;
use super::room::RoomAnswer;
use crate::config::Config;
use crate::core::{ConnId, Now};

/// The placement over `config`'s cluster (`cluster.nodes`, with `cluster.redis` set), each
/// node running `shards` shards; `None` without one.
pub(crate) fn cluster_placement(config: &Config, shards: usize) -> Option<Placement> {
    let c = &config.cluster;
    if c.redis.is_none() || c.nodes.is_empty() {
        return None;
    }
    Placement::cluster(shards, &c.nodes, c.effective_node_id(&config.node))
}

/// Hands every core's start-up mail (what each user's home must know of the conversations the
/// other shards own) to its target, until none is left. Run it before any client is served.
pub fn exchange_startup_mail<B: Backend>(cores: &mut [ShardCore<B>], now: Now) {
    let mut effects = Vec::new();
    loop {
        let mut mails = Vec::new();
        for core in cores.iter_mut() {
            core.take_effects(&mut effects);
            for e in effects.drain(..) {
                if let Effect::Mail { to, batch } = e {
                    mails.push((to, batch));
                }
            }
        }
        if mails.is_empty() {
            return;
        }
        for (to, batch) in mails {
            // Mail for another node's shards is not sent at start-up: each node tells the
            // homes of another what they must know when the link between them comes up.
            let local = cores.first().and_then(|c| c.placement.local(to));
            if let Some(core) = local.and_then(|i| cores.get_mut(i)) {
                core.handle_mail(batch, now);
            }
        }
    }
}

/// The retry hint of a login refused while the node is still hearing from the others, ms.
pub(crate) const STARTING_RETRY_MS: u32 = 500;

/// The retry hint of a request refused while this node holds no lease, ms.
const FENCED_RETRY_MS: u32 = 1_000;

impl<B: Backend> ShardCore<B> {
    /// Mail this shard sent to a node it cannot reach now (see the module documentation):
    /// requests are answered UNAVAILABLE with `retry_after_ms`, the rest is dropped.
    pub fn handle_unreachable(
        &mut self,
        batch: Vec<super::ShardMsg>,
        retry_after_ms: u32,
        now: Now,
    ) {
        self.now = now;
        let refusal = Refusal::Unavailable { retry_after_ms };
        for msg in batch {
            self.counters.unreachable_mail += 1;
            self.bounce(msg, &refusal);
        }
        self.drain_local();
    }

    /// Mail for a node whose link this shard has not heard come up (since it last went down):
    /// it goes back as if the carrier had handed it back. So nothing reaches a node before
    /// this shard's [`ShardCore::handle_link_up`] told its homes what they missed: a delivery
    /// that overtook that summary could reach a home that still holds a stale view (a group
    /// member removed while the link was down would be pushed the group's next message).
    pub(super) fn unreachable(&mut self, msg: ShardMsg) {
        self.counters.unreachable_mail += 1;
        let refusal = Refusal::Unavailable {
            retry_after_ms: self.cfg.link_retry_ms,
        };
        self.bounce(msg, &refusal);
    }

    /// One piece of mail that could not be sent: the answer its sender waits for, if any.
    fn bounce(&mut self, msg: ShardMsg, refusal: &Refusal) {
        let refused = |to, request_id, client_msg_id| ShardMsg::Refused {
            to,
            request_id,
            client_msg_id,
            refusal: refusal.clone(),
        };
        let answer = match msg {
            ShardMsg::Append(a) => refused(a.origin, a.request_id, a.send.client_msg_id),
            ShardMsg::Group(g) => refused(g.origin, g.request_id, 0),
            ShardMsg::ReadCountsAsk(r) => refused(r.origin, r.request_id, 0),
            ShardMsg::RoomPost(p) => refused(p.origin, p.request_id, p.send.client_msg_id),
            ShardMsg::RoomChange(c) => match c.reply {
                Some((to, request_id)) => ShardMsg::RoomAnswer(Box::new(RoomAnswer {
                    to,
                    request_id,
                    room: c.room,
                    op: c.op,
                    result: Err(refusal.clone()),
                })),
                None => return,
            },
            ShardMsg::Read(r) => ShardMsg::ReadDone(Box::new(ReadDone {
                to: r.reply,
                conv: r.conv,
                purpose: r.purpose,
                messages: Vec::new(),
                more: false,
                first_seq: 0,
                last_seq: 0,
                to_seq: r.to,
                refused: Some(refusal.clone()),
            })),
            ShardMsg::Presence(p) => match *p {
                // The users homed there are not online anywhere (their home is unreachable).
                PresenceMail::Users { from, gather, .. } => {
                    ShardMsg::Presence(Box::new(PresenceMail::Answer {
                        to: from,
                        gather,
                        users: Vec::new(),
                    }))
                }
                PresenceMail::CountGroup { from, gather, .. } => {
                    ShardMsg::Presence(Box::new(PresenceMail::Counted {
                        to: from,
                        gather,
                        count: 0,
                    }))
                }
                _ => return,
            },
            // A relayed connection whose home cannot be reached: its client logs in again.
            ShardMsg::RelayOpen(o) => return self.close_relayed(o.from, refusal),
            ShardMsg::RelayIn { from, .. } => return self.close_relayed(from, refusal),
            // Answers to connections there, deliveries and inbox updates: repaired at link-up.
            _ => return,
        };
        let to = answer_target(&answer);
        debug_assert_eq!(
            to,
            Some(self.index),
            "requests go out from their asker's shard"
        );
        if let Some(to) = to {
            self.route(to, answer);
        }
    }

    /// Closes relayed connection `key` UNAVAILABLE (its session's home cannot be reached).
    fn close_relayed(&mut self, key: super::mail::Origin, refusal: &Refusal) {
        let Refusal::Unavailable { retry_after_ms } = *refusal else {
            return;
        };
        if let Some(conn) = self.conn_of(key) {
            // Nothing to tell a home that never heard of it.
            self.relays.remove(&conn);
            self.close(
                conn,
                0,
                Some(CloseReason::NodeUnreachable { retry_after_ms }),
            );
        }
    }

    /// The link to node `node` (its position in the cluster's node list) went down: mail in
    /// flight on it may be lost, and what the other side holds for this one may be gone (it
    /// may have crashed). So every connection here that depends on that node is closed
    /// UNAVAILABLE (its client resends, rejoins and syncs after logging in again, anywhere):
    /// one waiting for an answer, one relayed to a session there, one in a room owned there,
    /// one watching the presence of a user homed there. Every session relayed from there ends,
    /// and that node's listeners and watchers are forgotten here.
    pub fn handle_link_down(&mut self, node: usize, retry_after_ms: u32, now: Now) {
        self.now = now;
        if node != self.placement.this_node() {
            self.reachable &= !(1u32 << (node % 32));
        }
        self.drop_relayed_from(node);
        let placement = self.placement;
        let there = |shard: usize| placement.node_of(shard) == node;
        self.rooms.forget_shards(there, self.cfg.room_max_idle);
        self.presence.forget_watchers(there);
        let (relays, presence) = (&self.relays, &self.presence);
        let waiting: Vec<ConnId> = self
            .conns
            .iter()
            .flatten()
            .filter(|c| {
                c.reserved > 0
                    || c.sync.as_ref().is_some_and(|s| s.waiting())
                    || relays.get(&c.id).is_some_and(|r| there(r.home))
                    || c.rooms
                        .as_ref()
                        .is_some_and(|r| super::room::Rooms::any_owned(r, &placement, there))
                    || presence.watches_any(c.id, |user| there(placement.home(user)))
            })
            .map(|c| c.id)
            .collect();
        for conn in waiting {
            self.counters.closed_for_link += 1;
            self.close(
                conn,
                0,
                Some(CloseReason::NodeUnreachable { retry_after_ms }),
            );
        }
        self.drain_local();
    }

    /// The node's lease holds until `until` (monotonic ms; 0: not held). Called by the
    /// driver every turn in a cluster with `cluster.nodes`; from the first call on, this shard
    /// assigns seqs only before the deadline ([`ShardCore::fenced`]).
    pub fn set_lease(&mut self, until: u64) {
        self.lease_until = Some(until);
    }

    /// Why this shard must not assign a seq now, if it must not: in a cluster, a node whose
    /// lease has run out (paused, or cut off from Redis, past `cluster.lease_ms`) may have
    /// been replaced by another process with its id, and answers UNAVAILABLE until it renewed
    /// its lease.
    pub(crate) fn fenced(&mut self) -> Option<Refusal> {
        let until = self.lease_until?;
        if self.now.ms < until {
            return None;
        }
        self.counters.fenced += 1;
        Some(Refusal::Unavailable {
            retry_after_ms: FENCED_RETRY_MS,
        })
    }

    /// Whether the node has heard from the other nodes since it started: until it has, its
    /// homes refuse logins UNAVAILABLE (a session would sync from an inbox that the other
    /// nodes' owners have not filled in yet). Called by the driver every turn in a cluster
    /// with `cluster.nodes`; the link thread decides (`crate::cluster::link`).
    pub fn set_settled(&mut self, settled: bool) {
        self.settled = settled;
    }

    /// The link to node `node` came up: tell its homes what this shard's conversations hold
    /// (see the module documentation).
    pub fn handle_link_up(&mut self, node: usize, now: Now) {
        self.now = now;
        self.reachable |= 1u32 << (node % 32);
        if self.test_switches.mute_link_up {
            return;
        }
        let reads = self.own_reads();
        self.tell_homes(reads, Some(node));
        self.drain_local();
    }

    /// A home learned that `user`'s conversation `conv` holds messages up to `last_seq`, of
    /// which it knew up to `known`: if the user has devices online, the messages in between
    /// are read from the owner and pushed to them, the newest `max_page` at most (a device
    /// that misses older ones sees the gap below them and syncs, as after any lost delivery).
    pub(crate) fn fill(&mut self, user: &Arc<str>, conv: &Arc<Conv>, known: u64, last_seq: u64) {
        if last_seq <= known {
            return;
        }
        let newest = last_seq.saturating_sub(u64::from(self.cfg.max_page)) + 1;
        let known = known.max(newest - 1);
        let Some(&(_, conn)) = self.home.users.get(user).and_then(|u| u.devices.first()) else {
            return;
        };
        self.counters.fills += 1;
        let reply = self.origin(conn);
        let owner = self.placement.owner(conv.id);
        let reader = conv.group_id().is_some().then(|| Arc::clone(user));
        self.route(
            owner,
            ShardMsg::Read(Box::new(Read {
                reply,
                conv: Arc::clone(conv),
                reader,
                from: known + 1,
                to: last_seq,
                limit: self.cfg.max_page,
                newest_first: false,
                purpose: ReadPurpose::Fill,
            })),
        );
    }

    /// The owner's answer to [`ShardCore::fill`]: pushed to every device of the user online
    /// (a device that has a message already is not sent it again), then the rest asked for.
    pub(crate) fn on_fill(&mut self, conn: ConnId, d: &ReadDone) {
        if d.refused.is_some() {
            return;
        }
        let Some(user) = self.user_of(conn) else {
            return;
        };
        let view = self.view_for(&user, &d.conv);
        let conns: Vec<ConnId> = self
            .home
            .users
            .get(&user)
            .map(|u| u.devices.iter().map(|&(_, c)| c).collect())
            .unwrap_or_default();
        for &c in &conns {
            // Live pushes of a conversation go out in seq order: what a connection was pushed
            // (or synced) past is not filled in below it; the device sees the gap and syncs.
            let upto = self
                .live_conn(c)
                .map_or(0, |x| x.delivery.sent_upto(d.conv.id));
            for (seq, stored) in d.messages.iter().filter(|(seq, _)| *seq > upto) {
                self.push_live(c, d.conv.id, &view, *seq, stored, None);
            }
        }
        if d.more
            && let Some(&(last, _)) = d.messages.last()
        {
            self.fill(&user, &d.conv, last, d.to_seq);
        }
    }

    /// Tells the homes (only those on node `only`, if given) what they must know of this
    /// shard's conversations: each member's conversation and its last seq, each group's users
    /// and what they may read, and each sender's newest message (`own_reads`: (conversation
    /// id, sender) → seq), which its sender has read.
    pub(crate) fn tell_homes(
        &mut self,
        mut own_reads: Vec<((u64, Device), u64)>,
        only: Option<usize>,
    ) {
        let placement = self.placement;
        let wanted = |home: usize| only.is_none_or(|n| placement.node_of(home) == n);
        own_reads.sort_by(|a, b| (a.0.0, &a.0.1.user).cmp(&(b.0.0, &b.0.1.user)));
        for ((id, sender), seq) in own_reads {
            if let Some(st) = self.owner.convs.get(&id) {
                let home = self.placement.home(&sender.user);
                if !wanted(home) {
                    continue;
                }
                let msg = ShardMsg::OwnRead {
                    user: sender.user,
                    conv: Arc::clone(&st.conv),
                    seq,
                };
                self.route(home, msg);
            }
        }
        let mut news = Vec::new();
        let mut groups = Vec::new();
        for st in self.owner.convs.values() {
            // Only what was released: a home must not fill its devices with a message that is
            // not durable yet (nor ahead of its own delivery, still on its way).
            let last_seq = self.owner.released_seq(st.conv.id, st.last_seq);
            for user in &st.conv.members {
                news.push((
                    Arc::clone(user),
                    Arc::clone(&st.conv),
                    last_seq,
                    st.last_time,
                ));
            }
            if let Some(g) = st.group.as_deref() {
                groups.push((Arc::clone(&st.conv), last_seq, st.last_time, g));
            }
        }
        // Each home learns, per group, which of its users may read what.
        groups.sort_by_key(|g| g.0.id);
        let mut group_mail = Vec::new();
        for (conv, last_seq, last_time, g) in groups {
            let mut per_home: Vec<Vec<(Arc<str>, u64, u64)>> =
                vec![Vec::new(); self.placement.shards()];
            for (user, m) in &g.members {
                per_home[self.placement.home(user)].push((Arc::clone(user), m.joined, u64::MAX));
            }
            let mut former: Vec<_> = g.former.iter().collect();
            former.sort_by(|a, b| a.0.cmp(b.0));
            for (user, &(from, to)) in former {
                per_home[self.placement.home(user)].push((Arc::clone(user), from, to));
            }
            for (home, users) in per_home.into_iter().enumerate() {
                if !users.is_empty() && wanted(home) {
                    group_mail.push((
                        home,
                        ShardMsg::GroupInbox(Box::new(GroupInbox {
                            conv: Arc::clone(&conv),
                            last_seq,
                            last_time,
                            users,
                        })),
                    ));
                }
            }
        }
        for (home, msg) in group_mail {
            self.route(home, msg);
        }
        // Deterministic order, whatever the map's.
        news.sort_by(|a, b| (a.1.id, &a.0).cmp(&(b.1.id, &b.0)));
        for (user, conv, last_seq, last_time) in news {
            let home = self.placement.home(&user);
            if !wanted(home) {
                continue;
            }
            self.route(
                home,
                ShardMsg::Inbox {
                    user,
                    conv,
                    last_seq,
                    last_time,
                },
            );
        }
    }

    /// Each sender's newest message in each conversation this shard owns, as its de-dup window
    /// remembers it (what [`ShardCore::tell_homes`] reports as read by its sender).
    pub(crate) fn own_reads(&self) -> Vec<((u64, Device), u64)> {
        let mut reads = Vec::new();
        for (&id, st) in &self.owner.convs {
            for (sender, ring) in &st.dedup {
                if let Some(seq) = ring.max_seq() {
                    reads.push(((id, sender.clone()), seq));
                }
            }
        }
        reads
    }
}

/// The shard an answer made by [`ShardCore::bounce`] goes to.
fn answer_target(msg: &ShardMsg) -> Option<usize> {
    match msg {
        ShardMsg::Refused { to, .. } => Some(to.shard),
        ShardMsg::RoomAnswer(a) => Some(a.to.shard),
        ShardMsg::ReadDone(d) => Some(d.to.shard),
        ShardMsg::Presence(p) => match &**p {
            PresenceMail::Answer { to, .. } | PresenceMail::Counted { to, .. } => Some(to.shard),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mail::Origin;
    use crate::core::{CoreSetup, Effect, TestSwitches};
    use parley_storage::{Durability, Log, LogConfig, MemoryBackend, Retention, Timestamp};

    const NOW: Now = Now {
        ms: 1,
        us: 1_000,
        unix_ms: 1_767_225_600_000,
    };

    /// The only shard of node `a` in a cluster of nodes `a` and `b` (shard 1 is `b`'s).
    fn shard_of_a() -> ShardCore<MemoryBackend> {
        let mut config = Config::default();
        config.cluster.redis = Some("redis://127.0.0.1:1".into());
        config.cluster.nodes = vec!["a".into(), "b".into()];
        config.cluster.node_id = Some("a".into());
        let log_config = LogConfig {
            segment_size: 64 * 1024,
            durability: Durability::Always,
            retention: Retention::default(),
            prefault: false,
        };
        let ts = Timestamp::from_micros(NOW.unix_ms * 1000);
        let (log, _) = Log::open(MemoryBackend::new(), log_config, ts).expect("log");
        ShardCore::new(CoreSetup {
            index: 0,
            shards: 1,
            config,
            verifier: Arc::new(crate::auth::Hs256::new(
                b"0123456789abcdef0123456789abcdef".to_vec(),
            )),
            log,
            now: NOW,
            quiet: true,
            switches: TestSwitches::default(),
            hooks: None,
            completions: None,
        })
    }

    /// Sends one piece of mail to node `b`'s shard; returns how many went out as mail to it.
    fn send_to_b(core: &mut ShardCore<MemoryBackend>) -> usize {
        let key = Origin {
            shard: 1,
            slot: 0,
            generation: 1,
        };
        core.route(
            1,
            ShardMsg::RelayAck {
                key,
                to_home: true,
                bytes: 1,
            },
        );
        let mut effects = Vec::new();
        core.take_effects(&mut effects);
        effects
            .iter()
            .map(|e| match e {
                Effect::Mail { to: 1, batch } => batch.len(),
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn mail_for_a_node_waits_for_this_shards_link_up_and_stops_at_its_link_down() {
        let mut core = shard_of_a();
        // Before the link came up (at start, or the carrier's bit already set but this shard
        // not told yet): handed back, as the carrier would.
        assert_eq!(send_to_b(&mut core), 0);
        assert_eq!(core.counters().unreachable_mail, 1);
        core.handle_link_up(1, NOW);
        let mut summaries = Vec::new();
        core.take_effects(&mut summaries);
        assert_eq!(send_to_b(&mut core), 1, "sent once the link is up here");
        core.handle_link_down(1, 100, NOW);
        assert_eq!(send_to_b(&mut core), 0);
        assert_eq!(core.counters().unreachable_mail, 2);
    }
}
