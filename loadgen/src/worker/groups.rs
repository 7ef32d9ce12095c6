//! The `groups` scenario, and parley's `fanout --conversation group` (one group per publisher,
//! all members online, no churn).
//!
//! This worker holds whole groups. Group `g` is the clients `g * members ..`: member 0 owns it
//! (and is its first publisher), members `0..publishers` publish, members `0..online` connect,
//! the others are members that never do. The phases:
//!
//! 1. **Set-up**, before the run's clock starts: the online members connect; each owner creates
//!    its group with CREATE and ADD_MEMBERS requests of at most [`MAX_USERS_PER_REQUEST`] users
//!    (one at a time per group). A refusal fails the run (GROUP_FULL with a word on
//!    `groups.max_members`).
//! 2. **Traffic**: the publishers send to their group, closed loop (`window` messages in flight
//!    each; a message is settled once acked and received by every online member that is
//!    certainly a member at its seq) or open loop (`rate`, spread over the publishers). Each
//!    owner makes `churn` membership changes per second, one at a time: it removes an online
//!    member that does not publish, and later adds one back (the longest removed first).
//! 3. **Drain**, then a **final sync** of every online member.
//! 4. **Verdict**: every group's [`GroupCheck`].
//!
//! Everything a member receives, every ack and every answer to a change goes to its group's
//! [`GroupCheck`], which knows the membership windows from the changes' seqs.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use super::{Worker, emit, wait_for_go};
use crate::body;
use crate::check::group::{Change, Content, GroupCheck, Taken};
use crate::driver::parley::group_key;
use crate::driver::{Event, GroupAction, GroupEvent, GroupOp};
use crate::engine::{Happening, State};
use crate::stats::ERROR_SAMPLES;

/// Most users one group request names: 2,000 user ids stay well under the broker's 64 KiB frame
/// limit.
pub(super) const MAX_USERS_PER_REQUEST: usize = 2000;

/// Most bytes of user ids one request carries (long run ids make fewer users fit).
const MAX_USER_BYTES_PER_REQUEST: usize = 48 * 1024;

/// The first request id of group requests (the driver uses lower ones for login and joins).
const FIRST_REQUEST: u64 = 1000;

/// The groups of a run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    /// Members per group, the owner included.
    pub(super) members: u32,
    /// Members `0..online` connect.
    pub(super) online: u32,
    /// Members `0..publishers` send.
    pub(super) publishers: u32,
    /// Membership changes per second per group.
    pub(super) churn: f64,
}

/// How hard the publishers push, and for how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct Load {
    /// In flight per publisher (closed loop).
    pub(super) window: u32,
    /// This worker's total open-loop rate.
    pub(super) rate: Option<f64>,
    /// Body size.
    pub(super) body_bytes: usize,
    /// Warm-up.
    pub(super) warmup: Duration,
    /// Measured time.
    pub(super) duration: Duration,
    /// Longest drain (and longest final sync).
    pub(super) drain: Duration,
}

/// A group request on its way.
#[derive(Debug)]
struct Asked {
    /// Its request id.
    request: u64,
    /// What it changes.
    change: Change,
    /// Churn: the member (index in the group) it removes or adds back.
    member: Option<u32>,
}

/// What the flow control knows of one message seq.
#[derive(Debug, Default)]
struct Flow {
    /// Members that received it so far.
    got: u32,
    /// Its publisher (local index) and tag, once the ack came.
    sent: Option<(usize, u64)>,
}

/// One group of this worker.
#[derive(Debug)]
struct GroupRun {
    /// The group id.
    id: String,
    /// Its conversation key ([`group_key`]).
    key: u64,
    /// The owner's client number (member `i` is `owner + i`).
    owner: u32,
    /// Local index of the owner.
    first: usize,
    /// What every member should have seen.
    check: GroupCheck,
    /// Set-up requests still to make (CREATE first).
    setup: VecDeque<Change>,
    /// The request on its way (one at a time).
    asked: Option<Asked>,
    /// Churn: online non-publishing members that are members now (indices in the group).
    present: Vec<u32>,
    /// Churn: the ones removed, longest removed first.
    removed: VecDeque<u32>,
    /// When the next change is due, nanoseconds on the engine's clock.
    next_change_ns: u64,
    /// xorshift state for the churn's choices.
    rng: u64,
    /// Message seqs acked or received and not settled yet.
    flow: HashMap<u64, Flow>,
    /// Settled message seqs (one bit per seq).
    settled: Vec<u64>,
}

impl GroupRun {
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn is_settled(&self, seq: u64) -> bool {
        self.settled
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    fn mark_settled(&mut self, seq: u64) {
        let word = (seq / 64) as usize;
        if self.settled.len() <= word {
            self.settled.resize(word + 1, 0);
        }
        self.settled[word] |= 1 << (seq % 64);
    }
}

/// The groups of this worker.
#[derive(Debug)]
struct Groups {
    runs: Vec<GroupRun>,
    shape: Shape,
    next_request: u64,
    /// Refusals of set-up requests, with a word on what to do.
    refusals: Vec<String>,
}

/// Splits `users` into requests of at most [`MAX_USERS_PER_REQUEST`] users and
/// [`MAX_USER_BYTES_PER_REQUEST`] bytes of ids.
fn batches(users: &[(u32, String)]) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0;
    for (client, name) in users {
        let full = out.last().is_none_or(|b| {
            b.len() >= MAX_USERS_PER_REQUEST || bytes + name.len() > MAX_USER_BYTES_PER_REQUEST
        });
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += name.len() + 2;
        if let Some(b) = out.last_mut() {
            b.push(*client);
        }
    }
    out
}

impl Worker<'_> {
    /// Runs the scenario: lay-out, connections, set-up, ready, go, traffic, final sync, verdict.
    pub(super) fn run_groups(
        &mut self,
        stdout: &std::io::Stdout,
        shape: Shape,
        load: Load,
    ) -> Result<(), String> {
        let members = shape.members.max(1);
        for c in self.plan.clients.clone() {
            let (group, i) = (c / members, c % members);
            let mut client = self.new_client((i < shape.publishers).then_some(group), 1, None);
            client.group = Some(group);
            self.clients.push(client);
        }
        let online: Vec<u32> = (0..self.clients.len() as u32)
            .filter(|&l| self.global(l) % members < shape.online)
            .collect();
        self.connect(&online, stdout, false)?;
        let mut gs = self.lay_out_groups(shape)?;
        self.make_groups(&mut gs)?;
        emit(stdout, &self.ready_report());
        wait_for_go()?;
        self.group_traffic(stdout, &mut gs, load)?;
        let timeout = load.drain.max(Duration::from_secs(5));
        self.final_sync(&mut gs, timeout)?;
        for run in &mut gs.runs {
            let verdict = run.check.verdict();
            self.tally.verdict.merge(&verdict);
            let room = ERROR_SAMPLES.saturating_sub(self.tally.violation_samples.len());
            if !verdict.passed() && room > 0 {
                let lines = run.check.describe(room);
                let id = &run.id;
                self.tally
                    .violation_samples
                    .extend(lines.into_iter().map(|l| format!("group {id}: {l}")));
            }
        }
        // Sends never acked: nobody can say where they went.
        for c in &self.clients {
            self.tally.verdict.lost += c.pending.iter().filter(|p| !p.acked).count() as u64;
        }
        self.engine.close_all();
        Ok(())
    }

    /// This worker's groups, their checkers and set-up requests.
    fn lay_out_groups(&self, shape: Shape) -> Result<Groups, String> {
        let members = shape.members.max(1);
        let mut runs = Vec::new();
        for first in (0..self.clients.len()).step_by(members as usize) {
            let owner = self.global(first as u32);
            let number = owner / members;
            let id = self.plan.names.group(number);
            let others: Vec<(u32, String)> = (owner + 1..owner + members)
                .map(|c| (c, self.plan.names.of(c)))
                .collect();
            let mut setup: VecDeque<Change> = batches(&others)
                .into_iter()
                .map(|b| Change::new(GroupAction::Add, b))
                .collect();
            match setup.front_mut() {
                Some(create) => {
                    *create = Change::new(
                        GroupAction::Create,
                        create.users.iter().copied().chain([owner]),
                    );
                }
                None => setup.push_back(Change::new(GroupAction::Create, [owner])),
            }
            if self.clients[first].send_conn.is_none() {
                return Err(format!("the owner of group {id} has no connection"));
            }
            runs.push(GroupRun {
                key: group_key(&id),
                id,
                owner,
                first,
                check: GroupCheck::new(owner..owner + shape.online),
                setup,
                asked: None,
                present: (shape.publishers..shape.online).collect(),
                removed: VecDeque::new(),
                next_change_ns: 0,
                rng: (u64::from(number) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                flow: HashMap::new(),
                settled: Vec::new(),
            });
        }
        Ok(Groups {
            runs,
            shape,
            next_request: FIRST_REQUEST,
            refusals: Vec::new(),
        })
    }

    /// Writes group request `change` of run `r` from its owner's connection.
    fn ask(&mut self, gs: &mut Groups, r: usize, change: Change, member: Option<u32>) {
        let run = &gs.runs[r];
        let users = change
            .users
            .iter()
            .filter(|&&c| !(change.action == GroupAction::Create && c == run.owner))
            .map(|&c| self.plan.names.of(c))
            .collect();
        let op = GroupOp {
            action: change.action,
            group: run.id.clone(),
            users,
        };
        let request = gs.next_request;
        gs.next_request += 1;
        let Some(conn) = self.clients[run.first].send_conn else {
            return;
        };
        if let Err(e) = self.engine.group(conn, request, &op) {
            gs.refusals.push(format!("group {}: {e}", run.id));
            self.tally.error(format!("group {}: {e}", run.id));
            return;
        }
        gs.runs[r].asked = Some(Asked {
            request,
            change,
            member,
        });
    }

    /// Set-up: every owner creates its group and adds its members, one request at a time.
    fn make_groups(&mut self, gs: &mut Groups) -> Result<(), String> {
        let deadline = self.engine.now_ns()
            + Duration::from_secs_f64(self.common.connect_timeout).as_nanos() as u64;
        loop {
            let mut busy = false;
            for r in 0..gs.runs.len() {
                if gs.runs[r].asked.is_none()
                    && let Some(change) = gs.runs[r].setup.pop_front()
                {
                    self.ask(gs, r, change, None);
                }
                busy |= gs.runs[r].asked.is_some() || !gs.runs[r].setup.is_empty();
            }
            if let Some(refusal) = gs.refusals.first() {
                return Err(refusal.clone());
            }
            if !busy {
                return Ok(());
            }
            if self.engine.now_ns() > deadline {
                return Err(format!(
                    "set-up: the groups were not made within {} s (--connect-timeout)",
                    self.common.connect_timeout
                ));
            }
            let mut events = self
                .engine
                .turn(Some(Duration::from_millis(50)))
                .map_err(|e| format!("poll: {e}"))?;
            for h in events.drain(..) {
                self.on_group_happening(gs, h);
            }
            self.engine.recycle(events);
            self.engine.finish_turn();
        }
    }

    /// The membership change a SYSTEM message records, users as client numbers (a user id that
    /// is not one of this run's clients becomes `u32::MAX`, which no member is).
    fn change_of(&self, e: &GroupEvent) -> Change {
        let client = |u: &String| self.plan.names.client(u).unwrap_or(u32::MAX);
        let actor = (e.action == GroupAction::Create).then(|| client(&e.actor));
        Change::new(e.action, e.users.iter().map(client).chain(actor))
    }

    /// Handles one happening of a groups run; returns the publisher whose window opened and by
    /// how many messages.
    fn on_group_happening(&mut self, gs: &mut Groups, h: Happening) -> Option<(usize, u32)> {
        let now = self.engine.now_ns();
        let (conn, event) = match h {
            Happening::Connected { .. } => return None,
            Happening::Closed { reason, .. } => {
                self.tally.error(reason);
                return None;
            }
            Happening::Event { conn, event, .. } => (conn, event),
        };
        let local = self.owner[conn] as usize;
        let r = local / gs.shape.members.max(1) as usize;
        let me = self.global(local as u32);
        match event {
            Event::Acked { tag, seq } => {
                let seq = seq?.seq;
                gs.runs.get_mut(r)?.check.acked(me, tag, seq);
                let c = &mut self.clients[local];
                let i = tag.checked_sub(c.base)? as usize;
                let p = c.pending.get_mut(i)?;
                if p.acked {
                    return None;
                }
                p.acked = true;
                self.tally.acked += 1;
                if self.measure.contains(&p.sent_ns) {
                    self.tally.ack.record(now.saturating_sub(p.sent_ns));
                }
                let run = &mut gs.runs[r];
                if run.is_settled(seq) {
                    return None;
                }
                run.flow.entry(seq).or_default().sent = Some((local, tag));
                self.settle(gs, r, seq)
            }
            Event::GroupMessage {
                at,
                body,
                event,
                synced,
            } => {
                if gs.runs.get(r)?.key != at.conversation {
                    self.tally.verdict.misplaced += 1;
                    return None;
                }
                let (content, stamp) = match &event {
                    Some(e) => (Some(Content::Change(Box::new(self.change_of(e)))), None),
                    None => match body::read(&body) {
                        Ok(s) => (
                            Some(Content::Message {
                                sender: s.sender,
                                counter: s.seq,
                            }),
                            Some(s),
                        ),
                        Err(_) => (None, None),
                    },
                };
                let run = &mut gs.runs[r];
                if run.check.arrived(me, at.seq, content) != Taken::Fresh {
                    return None;
                }
                let stamp = stamp?;
                self.tally.delivered += 1;
                if synced {
                    self.tally.synced_messages += 1;
                } else {
                    let latency = now.saturating_sub(stamp.sent_ns);
                    self.interval.record(latency);
                    if self.measure.contains(&stamp.sent_ns) {
                        self.tally.e2e.record(latency);
                    }
                }
                if self.measure.contains(&now) {
                    self.tally.delivered_measured += 1;
                }
                if run.is_settled(at.seq) {
                    return None;
                }
                run.flow.entry(at.seq).or_default().got += 1;
                self.settle(gs, r, at.seq)
            }
            Event::GroupResult { request, result } => {
                self.on_group_result(gs, r, request, result);
                None
            }
            Event::Synced => {
                self.clients[local].synced = true;
                None
            }
            Event::Error { text, .. } => {
                self.tally.error(text);
                None
            }
            Event::Delivered { .. } | Event::Dropped { .. } => {
                self.tally
                    .error("a message outside the group in the groups scenario");
                None
            }
            Event::Behind => {
                self.tally.behind += 1;
                None
            }
            Event::Ready => None,
        }
    }

    /// The answer to the request of run `r` tagged `request`.
    fn on_group_result(
        &mut self,
        gs: &mut Groups,
        r: usize,
        request: u64,
        result: Result<u64, String>,
    ) {
        let Some(run) = gs.runs.get_mut(r) else {
            return;
        };
        let Some(asked) = run.asked.take_if(|a| a.request == request) else {
            self.tally
                .error(format!("group {}: an answer to no request", run.id));
            return;
        };
        let changed = match result {
            Ok(0) => {
                self.tally.error(format!(
                    "group {}: {:?} of {} user(s) changed nothing",
                    run.id,
                    asked.change.action,
                    asked.change.users.len()
                ));
                false
            }
            Ok(seq) => {
                run.check.changed(run.owner, asked.change.clone(), seq);
                true
            }
            Err(text) => {
                let members = gs.shape.members;
                let refusal = if text.starts_with("GROUP_FULL") {
                    format!(
                        "the broker refused group {} of {members} members ({text}): the broker's \
                         groups.max_members (default 10000) must be at least the members of a \
                         group: start it with --set groups.max_members={members}",
                        run.id
                    )
                } else {
                    format!(
                        "the broker refused a {:?} of group {}: {text}",
                        asked.change.action, run.id
                    )
                };
                if asked.member.is_none() {
                    gs.refusals.push(refusal.clone());
                }
                self.tally.error(refusal);
                false
            }
        };
        let Some(m) = asked.member else {
            return;
        };
        if changed {
            self.tally.membership_changes += 1;
        }
        // A refused change leaves the member where it was.
        match (asked.change.action, changed) {
            (GroupAction::Remove, true) | (GroupAction::Add, false) => run.removed.push_back(m),
            _ => run.present.push(m),
        }
    }

    /// Settles message `seq` of run `r` if it is acked and every member that is certainly in the
    /// group at its seq received it; returns its publisher if that opened its window.
    fn settle(&mut self, gs: &mut Groups, r: usize, seq: u64) -> Option<(usize, u32)> {
        let run = &mut gs.runs[r];
        let flow = run.flow.get(&seq)?;
        let (publisher, tag) = flow.sent?;
        let mut except = vec![self.global(publisher as u32)];
        if let Some(Asked {
            member: Some(m), ..
        }) = &run.asked
        {
            except.push(run.owner + m);
        }
        if flow.got < run.check.coverage(seq, &except) {
            return None;
        }
        run.flow.remove(&seq);
        run.mark_settled(seq);
        let c = &mut self.clients[publisher];
        if !Self::settle_copy(c, tag) {
            return None;
        }
        Self::pop_settled(c, true);
        Some((publisher, 1))
    }

    /// Makes the membership changes that are due.
    fn churn(&mut self, gs: &mut Groups, now: u64, period: u64) {
        for r in 0..gs.runs.len() {
            let run = &mut gs.runs[r];
            if run.asked.is_some() || now < run.next_change_ns {
                continue;
            }
            // Late (a change took longer than the period): catch up at most a second's worth.
            run.next_change_ns =
                (run.next_change_ns + period).max(now.saturating_sub(1_000_000_000));
            let remove = match (run.present.is_empty(), run.removed.is_empty()) {
                (true, true) => continue,
                (false, true) => true,
                (true, false) => false,
                (false, false) => run.random() & 1 == 0,
            };
            let (action, member) = if remove {
                let i = (run.random() % run.present.len() as u64) as usize;
                (GroupAction::Remove, run.present.swap_remove(i))
            } else {
                let Some(m) = run.removed.pop_front() else {
                    continue;
                };
                (GroupAction::Add, m)
            };
            let change = Change::new(action, [run.owner + member]);
            self.ask(gs, r, change, Some(member));
        }
    }

    /// The traffic phase: publishers send, owners churn, until the end and the drain.
    fn group_traffic(
        &mut self,
        stdout: &std::io::Stdout,
        gs: &mut Groups,
        load: Load,
    ) -> Result<(), String> {
        let t0 = self.engine.now_ns();
        let measure_start = t0 + load.warmup.as_nanos() as u64;
        let end = measure_start + load.duration.as_nanos() as u64;
        let drain_end = end + load.drain.as_nanos() as u64;
        self.measure = measure_start..end;
        let body_bytes = load.body_bytes;
        // Publishers, interleaved across groups so an open loop spreads over them evenly.
        let mut senders = Vec::new();
        for p in 0..gs.shape.publishers as usize {
            senders.extend(gs.runs.iter().map(|run| run.first + p));
        }
        let gap_ns = load.rate.map(|r| (1e9 / r.max(1e-3)) as u64);
        let churn_ns = (gs.shape.churn > 0.0).then(|| (1e9 / gs.shape.churn) as u64);
        if let Some(period) = churn_ns {
            let n = gs.runs.len() as u64;
            for (i, run) in gs.runs.iter_mut().enumerate() {
                run.next_change_ns = t0 + period * (i as u64 + 1) / (n + 1);
            }
        }
        let mut k: u64 = 0;
        if gap_ns.is_none() {
            for &s in &senders {
                for _ in 0..load.window {
                    self.send_one(s, self.engine.now_ns(), body_bytes);
                }
            }
            self.engine.finish_turn();
        }
        let mut next_progress = t0 + 1_000_000_000;
        loop {
            let now = self.engine.now_ns();
            if now >= end {
                let settled = self.clients.iter().all(|c| c.settled())
                    && gs.runs.iter().all(|r| r.asked.is_none());
                if settled || now >= drain_end {
                    break;
                }
            }
            let timeout = match gap_ns {
                Some(gap) if now < end && !senders.is_empty() => {
                    let due = t0 + k * gap;
                    Duration::from_nanos(due.saturating_sub(now + 1_000_000))
                }
                _ => Duration::from_millis(10),
            };
            let mut events = self
                .engine
                .turn(Some(timeout.min(Duration::from_millis(10))))
                .map_err(|e| format!("poll: {e}"))?;
            for h in events.drain(..) {
                if let Some((sender, opened)) = self.on_group_happening(gs, h)
                    && gap_ns.is_none()
                    && self.engine.now_ns() < end
                {
                    for _ in 0..opened {
                        self.send_one(sender, self.engine.now_ns(), body_bytes);
                    }
                }
            }
            self.engine.recycle(events);
            let now = self.engine.now_ns();
            if let Some(gap) = gap_ns
                && !senders.is_empty()
            {
                while t0 + k * gap <= now && t0 + k * gap < end {
                    let s = senders[(k % senders.len() as u64) as usize];
                    self.send_one(s, t0 + k * gap, body_bytes);
                    k += 1;
                }
            }
            if let Some(period) = churn_ns
                && now < end
            {
                self.churn(gs, now, period);
            }
            self.engine.finish_turn();
            if self.engine.now_ns() >= next_progress {
                next_progress += 1_000_000_000;
                self.progress(stdout);
            }
        }
        Ok(())
    }

    /// Every online member still connected syncs once more (a sync already under way after a
    /// `Behind` counts), so that what live push did not bring comes now; waits at most
    /// `timeout` for all of them.
    fn final_sync(&mut self, gs: &mut Groups, timeout: Duration) -> Result<(), String> {
        let mut waiting = Vec::new();
        for l in 0..self.clients.len() {
            let Some(conn) = self.clients[l].recv_conn else {
                continue;
            };
            if self.engine.state(conn) != State::Ready {
                continue;
            }
            self.clients[l].synced = false;
            match self.engine.sync(conn) {
                Ok(()) => waiting.push((l, conn)),
                Err(e) => self.tally.error(format!("final sync: {e}")),
            }
        }
        self.engine.finish_turn();
        let deadline = self.engine.now_ns() + timeout.as_nanos() as u64;
        loop {
            waiting.retain(|&(l, conn)| {
                !self.clients[l].synced && self.engine.state(conn) != State::Closed
            });
            if waiting.is_empty() {
                return Ok(());
            }
            if self.engine.now_ns() > deadline {
                self.tally.error(format!(
                    "final sync: {} member(s) not done after {:.1} s",
                    waiting.len(),
                    timeout.as_secs_f64()
                ));
                return Ok(());
            }
            let mut events = self
                .engine
                .turn(Some(Duration::from_millis(10)))
                .map_err(|e| format!("poll: {e}"))?;
            for h in events.drain(..) {
                self.on_group_happening(gs, h);
            }
            self.engine.recycle(events);
            self.engine.finish_turn();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_up_requests_hold_at_most_2000_users_and_48_kib_of_ids() {
        let users: Vec<(u32, String)> = (0..4500).map(|c| (c, format!("u{c}"))).collect();
        let sizes: Vec<usize> = batches(&users).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2000, 2000, 500]);
        let long: Vec<(u32, String)> = (0..100).map(|c| (c, "x".repeat(1000))).collect();
        let b = batches(&long);
        assert!(b.len() > 2, "long ids make smaller requests: {}", b.len());
        assert!(
            b.iter()
                .all(|b| b.len() * 1002 <= MAX_USER_BYTES_PER_REQUEST)
        );
        assert!(batches(&[]).is_empty());
    }
}
