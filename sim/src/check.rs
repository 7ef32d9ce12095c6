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
//! conversations, and each acked message sits at the seq its ack named.

use std::collections::{BTreeMap, BTreeSet};

use parley_proto::pb;

use crate::client::Client;

/// A message's identity: sender user, sender device, client message id.
pub(crate) type MsgKey = (String, String, u64);

/// The key a checker uses for the direct conversation of `a` and `b`.
pub(crate) fn conv_key(a: &str, b: &str) -> String {
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

    /// A client's connection showed it message `m` of `conv` (live or in a sync page).
    pub(crate) fn observed(
        &mut self,
        now: u64,
        conv: &str,
        m: &pb::Message,
        live: bool,
        view: &mut ConnView,
    ) {
        let key: MsgKey = (m.from_user.clone(), m.from_device.clone(), m.client_msg_id);
        match self.sent.get(&key) {
            None => self.fail(now, format!("{conv} seq {} was never sent: {key:?}", m.seq)),
            Some((c, body)) if c != conv || body[..] != m.body[..] => {
                let what = format!("{conv} seq {} is not what {key:?} sent to {c}", m.seq);
                self.fail(now, what);
            }
            Some(_) => {}
        }
        self.place(now, key, conv, m.seq, m.msg_id);
        let new = view.seen.insert((conv.to_owned(), m.seq));
        if !new {
            return;
        }
        if live {
            if view.sync_running {
                let what = format!("{conv} seq {} arrived live while a sync ran", m.seq);
                self.fail(now, what);
            }
            let last = view.last_live.entry(conv.to_owned()).or_insert(0);
            if m.seq <= *last {
                let what = format!("{conv} live seq {} after live seq {}", m.seq, *last);
                self.fail(now, what);
            }
            *last = (*last).max(m.seq);
        } else {
            let last = view.last_sync.entry(conv.to_owned()).or_insert(0);
            if m.seq <= *last {
                let what = format!("{conv} sync page seq {} after seq {}", m.seq, *last);
                self.fail(now, what);
            }
            *last = (*last).max(m.seq);
        }
    }

    /// The end: every device of every member holds `1..=last` of each conversation, and every
    /// acked message where its ack said.
    pub(crate) fn final_check(&mut self, now: u64, clients: &[Client]) {
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for (conv, seq) in self.by_seq.keys() {
            let l = last.entry(conv.clone()).or_insert(0);
            *l = (*l).max(*seq);
        }
        let mut problems = Vec::new();
        for (conv, &upto) in &last {
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
}
