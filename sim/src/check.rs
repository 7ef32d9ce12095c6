//! The checker: everything clients sent, were acked and received, and the promises over it.
//!
//! Checked as the history unfolds:
//! * a delivered message was sent by some client, with that body (no invented messages);
//! * one seq of a conversation holds one message, and one message (sender device, client message
//!   id) holds one seq (a retried send is stored once) and one ack;
//! * on one connection, new live deliveries of a conversation come in increasing seq order, a
//!   sync's pages too, and nothing new arrives live while a sync runs;
//! * the bytes a connection holds stay under its bound.
//!
//! Checked at the end ([`History::final_check`]), after every client synced once more with no
//! fault left: every device of every member holds exactly seqs `1..=last` of each of its
//! direct conversations, and each acked message sits at the seq its ack named. In a group, the
//! membership windows come from the group's events (every event is seen: the owner, a member
//! throughout, syncs them all): every device of a user holds every seq of the user's latest
//! window (from the event that added it to the event that removed it, or to the last seq) and
//! no seq outside all of its windows; a user never a member holds nothing of the group.

use std::collections::{BTreeMap, BTreeSet};

use parley_proto::pb;

use crate::client::Client;

/// A message's identity: sender user, sender device, client message id.
pub(crate) type MsgKey = (String, String, u64);

/// What a group's checker key starts with (`#g` is the group `g`).
pub(crate) const GROUP_MARK: char = '#';
/// What a room's checker key starts with (`!r` is the room `r`).
pub(crate) const ROOM_MARK: char = '!';

/// The key a checker uses for the conversation `a` has with `b`: the direct conversation of `a`
/// and `b`, or, if `b` is a group key (`#g`), the group.
pub(crate) fn conv_key(a: &str, b: &str) -> String {
    if b.starts_with(GROUP_MARK) || b.starts_with(ROOM_MARK) {
        return b.to_owned();
    }
    if a <= b {
        format!("{a}|{b}")
    } else {
        format!("{b}|{a}")
    }
}

/// The two users of a checker conversation key.
fn members(conv: &str) -> (&str, &str) {
    conv.split_once('|').unwrap_or((conv, conv))
}

/// What one connection has shown its client, for the per-connection order checks.
#[derive(Debug, Default)]
pub(crate) struct ConnView {
    seen: BTreeSet<(String, u64)>,
    last_live: BTreeMap<String, u64>,
    /// Per room, the seq of the last room message this connection got.
    last_room: BTreeMap<String, u64>,
    last_sync: BTreeMap<String, u64>,
    /// Between the summary and the last page of a sync.
    pub(crate) sync_running: bool,
}

impl ConnView {
    /// A sync starts (its summary arrived): its pages restart the order check.
    pub(crate) fn sync_started(&mut self) {
        self.sync_running = true;
        self.last_sync.clear();
    }
}

/// The whole history of a run.
#[derive(Debug, Default)]
pub(crate) struct History {
    pub(crate) failures: Vec<String>,
    sent: BTreeMap<MsgKey, (String, Vec<u8>)>,
    acks: BTreeMap<MsgKey, (String, u64, u64)>,
    by_seq: BTreeMap<(String, u64), (MsgKey, u64)>,
    by_msg: BTreeMap<MsgKey, (String, u64)>,
    /// Groups' events by (group, seq), with their message ids.
    events: BTreeMap<(String, u64), (pb::GroupEvent, u64)>,
}

impl History {
    pub(crate) fn fail(&mut self, now: u64, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(format!("t={now}ms: {what}"));
        }
    }

    /// Messages acked so far.
    pub(crate) fn acked(&self) -> usize {
        self.acks.len()
    }

    /// A client sent (or is about to send) this message.
    pub(crate) fn sent(&mut self, key: MsgKey, conv: String, body: Vec<u8>) {
        self.sent.entry(key).or_insert((conv, body));
    }

    /// A client got a send-ack.
    pub(crate) fn ack(&mut self, now: u64, key: MsgKey, conv: &str, seq: u64, msg_id: u64) {
        if let Some((c, s, id)) = self.acks.get(&key) {
            if (c.as_str(), *s, *id) != (conv, seq, msg_id) {
                let what = format!(
                    "{key:?} acked twice differently: {c} seq {s} id {id}, then {conv} seq {seq} id {msg_id}"
                );
                self.fail(now, what);
            }
            return;
        }
        self.acks
            .insert(key.clone(), (conv.to_owned(), seq, msg_id));
        self.place(now, key, conv, seq, msg_id);
    }

    /// Records that message `key` sits at (`conv`, `seq`), failing on any contradiction.
    fn place(&mut self, now: u64, key: MsgKey, conv: &str, seq: u64, msg_id: u64) {
        match self.by_seq.get(&(conv.to_owned(), seq)) {
            Some((k, id)) if *k != key || *id != msg_id => {
                let what = format!(
                    "{conv} seq {seq} holds two messages: {k:?} (id {id}) and {key:?} (id {msg_id})"
                );
                self.fail(now, what);
            }
            Some(_) => {}
            None => {
                self.by_seq
                    .insert((conv.to_owned(), seq), (key.clone(), msg_id));
            }
        }
        match self.by_msg.get(&key) {
            Some((c, s)) if (c.as_str(), *s) != (conv, seq) => {
                let what = format!("{key:?} stored twice: at {c} seq {s} and at {conv} seq {seq}");
                self.fail(now, what);
            }
            Some(_) => {}
            None => {
                self.by_msg.insert(key, (conv.to_owned(), seq));
            }
        }
    }

    /// A connection got room message `m` of room `conv` (rooms are at-most-once: it must be
    /// a message some client sent to that room, with its body, and a connection gets a room's
    /// messages in increasing seq order, each at most once; gaps are allowed).
    pub(crate) fn observed_room(
        &mut self,
        now: u64,
        conv: &str,
        m: &pb::Message,
        live: bool,
        view: &mut ConnView,
    ) {
        if !live {
            let what = format!("room {conv} seq {} came in a sync page", m.seq);
            return self.fail(now, what);
        }
        let key: MsgKey = (m.from_user.clone(), m.from_device.clone(), m.client_msg_id);
        match self.sent.get(&key) {
            Some((c, body)) if c == conv && body[..] == m.body[..] => {}
            _ => self.fail(
                now,
                format!("room {conv} seq {} was never sent: {key:?}", m.seq),
            ),
        }
        let last = view.last_room.entry(conv.to_owned()).or_insert(0);
        if m.seq <= *last {
            let what = format!(
                "room {conv} seq {} after seq {} on one connection",
                m.seq, *last
            );
            self.fail(now, what);
        }
        *last = (*last).max(m.seq);
    }

    /// A client's connection showed it message `m` of `conv` (live or in a sync page).
    pub(crate) fn observed(
        &mut self,
        now: u64,
        conv: &str,
        m: &pb::Message,
        live: bool,
        view: &mut ConnView,
    ) {
        if let Some(e) = m
            .event
            .as_ref()
            .filter(|_| m.kind == pb::MessageKind::System as i32)
        {
            match self.events.get(&(conv.to_owned(), m.seq)) {
                Some((known, id)) if known != e || *id != m.msg_id => {
                    let what = format!("{conv} seq {} holds two different events", m.seq);
                    self.fail(now, what);
                }
                Some(_) => {}
                None => {
                    if let Some((k, _)) = self.by_seq.get(&(conv.to_owned(), m.seq)) {
                        let what = format!("{conv} seq {} holds an event and {k:?}", m.seq);
                        self.fail(now, what);
                    }
                    self.events
                        .insert((conv.to_owned(), m.seq), (e.clone(), m.msg_id));
                }
            }
            return self.order(now, conv, m.seq, live, view);
        }
        let key: MsgKey = (m.from_user.clone(), m.from_device.clone(), m.client_msg_id);
        match self.sent.get(&key) {
            None => self.fail(now, format!("{conv} seq {} was never sent: {key:?}", m.seq)),
            Some((c, body)) if c != conv || body[..] != m.body[..] => {
                let what = format!("{conv} seq {} is not what {key:?} sent to {c}", m.seq);
                self.fail(now, what);
            }
            Some(_) => {}
        }
        if self.events.contains_key(&(conv.to_owned(), m.seq)) {
            let what = format!("{conv} seq {} holds an event and {key:?}", m.seq);
            self.fail(now, what);
        }
        self.place(now, key, conv, m.seq, m.msg_id);
        self.order(now, conv, m.seq, live, view);
    }

    /// The per-connection order checks of a message `seq` of `conv` shown to a client.
    fn order(&mut self, now: u64, conv: &str, seq: u64, live: bool, view: &mut ConnView) {
        let new = view.seen.insert((conv.to_owned(), seq));
        if !new {
            return;
        }
        if live {
            if view.sync_running {
                let what = format!("{conv} seq {} arrived live while a sync ran", seq);
                self.fail(now, what);
            }
            let last = view.last_live.entry(conv.to_owned()).or_insert(0);
            if seq <= *last {
                let what = format!("{conv} live seq {} after live seq {}", seq, *last);
                self.fail(now, what);
            }
            *last = (*last).max(seq);
        } else {
            let last = view.last_sync.entry(conv.to_owned()).or_insert(0);
            if seq <= *last {
                let what = format!("{conv} sync page seq {} after seq {}", seq, *last);
                self.fail(now, what);
            }
            *last = (*last).max(seq);
        }
    }

    /// The end: every device of every member holds `1..=last` of each conversation, and every
    /// acked message where its ack said.
    pub(crate) fn final_check(&mut self, now: u64, clients: &[Client]) {
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for (conv, seq) in self.by_seq.keys().chain(self.events.keys()) {
            let l = last.entry(conv.clone()).or_insert(0);
            *l = (*l).max(*seq);
        }
        let mut problems = Vec::new();
        for (conv, &upto) in &last {
            if conv.starts_with(GROUP_MARK) {
                self.check_group(conv, upto, clients, &mut problems);
                continue;
            }
            let (a, b) = members(conv);
            for c in clients.iter().filter(|c| c.user == a || c.user == b) {
                let held = c.store.get(conv);
                let count = held.map_or(0, |h| h.range(1..=upto).count() as u64);
                if count != upto {
                    let missing: Vec<u64> = (1..=upto)
                        .filter(|s| !held.is_some_and(|h| h.contains_key(s)))
                        .take(8)
                        .collect();
                    problems.push(format!(
                        "{}/{} holds {count} of {upto} messages of {conv} after its final sync (missing e.g. {missing:?})",
                        c.user, c.device
                    ));
                }
                if let Some(h) = held
                    && let Some((&s, _)) = h.range(upto + 1..).next()
                {
                    problems.push(format!(
                        "{}/{} holds {conv} seq {s} beyond the last",
                        c.user, c.device
                    ));
                }
            }
        }
        for (key, (conv, seq, id)) in &self.acks {
            if conv.starts_with(GROUP_MARK) {
                // Checked with the group's windows.
                continue;
            }
            let (a, b) = members(conv);
            for c in clients.iter().filter(|c| c.user == a || c.user == b) {
                match c.store.get(conv).and_then(|h| h.get(seq)) {
                    Some(held) if held == id => {}
                    Some(held) => problems.push(format!(
                        "{}/{} holds id {held} at {conv} seq {seq}, acked to {key:?} as id {id}",
                        c.user, c.device
                    )),
                    None => problems.push(format!(
                        "acked message {key:?} ({conv} seq {seq}) is missing at {}/{} after sync",
                        c.user, c.device
                    )),
                }
            }
        }
        for p in problems {
            self.fail(now, p);
        }
    }

    /// Each user's membership windows of group `conv`, `(from, to)` inclusive (`to` is `upto`
    /// for a current member), in seq order, from the group's events.
    fn windows(&self, conv: &str, upto: u64) -> BTreeMap<String, Vec<(u64, u64)>> {
        use pb::GroupEventType as E;
        let mut open: BTreeMap<String, u64> = BTreeMap::new();
        let mut done: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        let events = self
            .events
            .range((conv.to_owned(), 0)..=(conv.to_owned(), u64::MAX));
        for ((_, seq), (e, _)) in events {
            let seq = *seq;
            let mut join = |u: &str| {
                open.entry(u.to_owned()).or_insert(seq);
            };
            match E::try_from(e.r#type).unwrap_or(E::Unspecified) {
                E::Created => {
                    join(&e.actor);
                    e.users.iter().for_each(|u| join(u));
                }
                E::MembersAdded => e.users.iter().for_each(|u| join(u)),
                E::MemberJoined => join(&e.actor),
                E::MembersRemoved | E::MemberLeft | E::Dissolved => {
                    let gone: Vec<String> = match E::try_from(e.r#type) {
                        Ok(E::MembersRemoved) => e.users.clone(),
                        Ok(E::MemberLeft) => vec![e.actor.clone()],
                        _ => open.keys().cloned().collect(),
                    };
                    for u in gone {
                        if let Some(from) = open.remove(&u) {
                            done.entry(u).or_default().push((from, seq));
                        }
                    }
                }
                _ => {}
            }
        }
        for (u, from) in open {
            done.entry(u).or_default().push((from, upto));
        }
        done
    }

    /// A group at the end: every device of a user holds its latest window whole and nothing
    /// outside its windows; every acked message is where its ack said.
    fn check_group(&self, conv: &str, upto: u64, clients: &[Client], problems: &mut Vec<String>) {
        let windows = self.windows(conv, upto);
        for c in clients {
            let held = c.store.get(conv);
            let Some(ws) = windows.get(&c.user) else {
                if let Some(h) = held.filter(|h| !h.is_empty()) {
                    problems.push(format!(
                        "{}/{} was never a member of {conv} but holds seqs {:?}",
                        c.user,
                        c.device,
                        h.keys().take(8).collect::<Vec<_>>()
                    ));
                }
                continue;
            };
            if let Some(&(from, to)) = ws.last() {
                let missing: Vec<u64> = (from..=to)
                    .filter(|s| !held.is_some_and(|h| h.contains_key(s)))
                    .take(8)
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "{}/{} misses seqs {missing:?} of {conv} within its membership {from}..={to} after its final sync",
                        c.user, c.device
                    ));
                }
            }
            if let Some(h) = held {
                let outside: Vec<u64> = h
                    .keys()
                    .copied()
                    .filter(|s| !ws.iter().any(|&(from, to)| (from..=to).contains(s)))
                    .take(8)
                    .collect();
                if !outside.is_empty() {
                    problems.push(format!(
                        "{}/{} holds seqs {outside:?} of {conv} outside its memberships {ws:?}",
                        c.user, c.device
                    ));
                }
            }
        }
        for (key, (c, seq, id)) in &self.acks {
            if c != conv {
                continue;
            }
            for client in clients {
                let covered = windows
                    .get(&client.user)
                    .and_then(|ws| ws.last())
                    .is_some_and(|&(from, to)| (from..=to).contains(seq));
                if !covered {
                    continue;
                }
                match client.store.get(conv).and_then(|h| h.get(seq)) {
                    Some(held) if held == id => {}
                    Some(held) => problems.push(format!(
                        "{}/{} holds id {held} at {conv} seq {seq}, acked to {key:?} as id {id}",
                        client.user, client.device
                    )),
                    None => problems.push(format!(
                        "acked message {key:?} ({conv} seq {seq}) is missing at {}/{} after sync",
                        client.user, client.device
                    )),
                }
            }
        }
    }
}
