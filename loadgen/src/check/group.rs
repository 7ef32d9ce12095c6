//! The group checker: what each online member of a parley group should have seen, and what it
//! did see.
//!
//! A group's history is one run of seqs 1, 2, 3, … that every member sees the same way: users'
//! messages and the SYSTEM messages that record membership changes. The checker learns what
//! each seq *is* from the first word it hears of it — the sender's ack (message `(sender,
//! counter)` at seq s), the owner's `GroupResult` (a change at seq s), or any member's copy —
//! and every later word about that seq must agree, else the seq is *misplaced*.
//!
//! From the changes, in seq order, it derives each member's **windows**: from the seq of the
//! event that added it (included) to the seq of the event that removed it (included), and from
//! its latest join to the group's last seq while it is a member. A member *holds* what it
//! received (pushed live or in a sync page), plus its own messages (from their acks) and, for the
//! owner, its own changes (from their results): the broker pushes neither back to the device that
//! made them.
//!
//! The verdict, once every member has done its final sync:
//! - *lost*: a seq inside a member's latest window that it does not hold (the broker serves a
//!   member who came back from its new join on; what it held of an earlier window is its own,
//!   and holding it is allowed, but a missing part of an earlier window is not lost);
//! - *outside_window*: a seq a member holds outside all its windows (after it was removed and
//!   before it came back);
//! - *gaps*: a seq below the group's last that nobody ever heard of;
//! - *duplicated*: one message (sender, counter) stored at two seqs;
//! - *misplaced*: copies of one seq (or the ack or result naming it) that disagree;
//! - *out_of_order*: a member receiving a seq below one it already received (what lay between
//!   was skipped, then came late);
//! - *corrupt*: a body failing its checksum (the seq is not held, so it is lost as well);
//! - *redelivered* (information only): a member receiving a seq it already holds — allowed on
//!   the wire (a retransmit), dropped by the member's (conversation, seq) check, so its view
//!   stays exactly-once.
//!
//! The checker is also asked, for flow control, how many members certainly see a message
//! ([`GroupCheck::coverage`]).
//!
//! ### Invariants
//! * `seqs[s - 1]` is the first content heard of seq `s`; it never changes once set.
//! * `timeline` is `None` or derived from the changes in `seqs` as they are now.

use std::collections::HashMap;

use super::Verdict;
use crate::driver::GroupAction;

/// A membership change, its users as client numbers (sorted, without repeats; a CREATED change
/// counts its actor, the owner, among them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What changed.
    pub action: GroupAction,
    /// Who joined (Create, Add) or left (Remove).
    pub users: Vec<u32>,
}

impl Change {
    /// A change of `action` for `users` (in any order).
    pub fn new(action: GroupAction, users: impl IntoIterator<Item = u32>) -> Self {
        let mut users: Vec<u32> = users.into_iter().collect();
        users.sort_unstable();
        users.dedup();
        Change { action, users }
    }
}

/// What one seq of a group carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A user's message: its sender's client number and the sender's own counter (the body's
    /// stamp).
    Message {
        /// The sending client.
        sender: u32,
        /// Its message counter.
        counter: u64,
    },
    /// A SYSTEM message recording a membership change.
    Change(Box<Change>),
}

/// How an arrival was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// New to the member's view.
    Fresh,
    /// The member held it already (a redelivery).
    Again,
    /// Not a member this checker watches, or a seq that cannot be (0, or absurdly high).
    Stranger,
}

/// The largest seq believed; a higher one is corrupt.
const MAX_SEQ: u64 = super::MAX_SEQ_JUMP * 16;

/// One watched member.
#[derive(Debug, Clone)]
struct Member {
    /// Seqs it holds, one bit per seq (bit `s` for seq `s`).
    held: Vec<u64>,
    /// Of those, the ones it made itself (its messages, by their acks; its changes, by their
    /// results).
    own: Vec<u64>,
    /// The highest seq it received (not counting its own messages and changes).
    highest: u64,
}

/// The membership windows derived from the changes known so far.
#[derive(Debug, Clone, Default)]
struct Timeline {
    /// Per member slot: its windows `(from, to)`, `to` = `None` while open.
    windows: Vec<Vec<(u64, Option<u64>)>>,
    /// After each change (by seq): how many watched members are in the group.
    counts: Vec<(u64, u32)>,
}

/// The checker of one group.
#[derive(Debug, Clone)]
pub struct GroupCheck {
    /// The watched (online) members by client number: their slot.
    slots: HashMap<u32, usize>,
    members: Vec<Member>,
    /// What each seq is, by the first word heard of it (index seq − 1).
    seqs: Vec<Option<Content>>,
    /// Where each message (sender, counter) was first seen stored.
    placed: HashMap<(u32, u64), u64>,
    /// The seqs of changes, ascending.
    changes: Vec<u64>,
    timeline: Option<Timeline>,
    out_of_order: u64,
    misplaced: u64,
    duplicated: u64,
    corrupt: u64,
    redelivered: u64,
}

fn set_bit(bits: &mut Vec<u64>, i: u64) -> bool {
    let (word, bit) = ((i / 64) as usize, i % 64);
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    let was = bits[word] & (1 << bit) != 0;
    bits[word] |= 1 << bit;
    was
}

fn has_bit(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// How many bits of `bits` are set in `lo..=hi`.
fn ones_in(bits: &[u64], lo: u64, hi: u64) -> u64 {
    if lo > hi {
        return 0;
    }
    let (first, last) = ((lo / 64) as usize, (hi / 64) as usize);
    let mut n = 0;
    for (w, &word) in bits.iter().enumerate().take(last + 1).skip(first) {
        let mut mask = u64::MAX;
        if w == first {
            mask &= u64::MAX << (lo % 64);
        }
        if w == last {
            mask &= u64::MAX >> (63 - hi % 64);
        }
        n += u64::from((word & mask).count_ones());
    }
    n
}

impl GroupCheck {
    /// A checker watching the members `members` (client numbers: the online ones).
    pub fn new(members: impl IntoIterator<Item = u32>) -> Self {
        let mut slots = HashMap::new();
        for m in members {
            let n = slots.len();
            slots.entry(m).or_insert(n);
        }
        GroupCheck {
            members: vec![
                Member {
                    held: Vec::new(),
                    own: Vec::new(),
                    highest: 0,
                };
                slots.len()
            ],
            slots,
            seqs: Vec::new(),
            placed: HashMap::new(),
            changes: Vec::new(),
            timeline: None,
            out_of_order: 0,
            misplaced: 0,
            duplicated: 0,
            corrupt: 0,
            redelivered: 0,
        }
    }

    /// Whether `client` is a watched member.
    pub fn watches(&self, client: u32) -> bool {
        self.slots.contains_key(&client)
    }

    /// The highest seq heard of.
    pub fn last_seq(&self) -> u64 {
        self.seqs.len() as u64
    }

    /// Records what seq `seq` is; false if it disagrees with what was heard before (counted as
    /// misplaced).
    fn learn(&mut self, seq: u64, content: Content) -> bool {
        let i = (seq - 1) as usize;
        if self.seqs.len() <= i {
            self.seqs.resize(i + 1, None);
        }
        match &self.seqs[i] {
            Some(known) if *known == content => return true,
            Some(_) => {
                self.misplaced += 1;
                return false;
            }
            None => {}
        }
        match &content {
            Content::Message { sender, counter } => {
                if let Some(&other) = self.placed.get(&(*sender, *counter)) {
                    if other != seq {
                        self.duplicated += 1;
                    }
                } else {
                    self.placed.insert((*sender, *counter), seq);
                }
            }
            Content::Change(_) => {
                let at = self.changes.partition_point(|&s| s < seq);
                self.changes.insert(at, seq);
                self.timeline = None;
            }
        }
        self.seqs[i] = Some(content);
        true
    }

    /// The sender `sender` was told its message `counter` is stored at `seq`: that is what seq
    /// is, and the sender holds it.
    pub fn acked(&mut self, sender: u32, counter: u64, seq: u64) {
        if !(1..=MAX_SEQ).contains(&seq) {
            self.corrupt += 1;
            return;
        }
        self.learn(seq, Content::Message { sender, counter });
        self.hold_own(sender, seq);
    }

    /// The owner `actor` was told its change is stored at `seq`: that is what seq is, and the
    /// actor holds it.
    pub fn changed(&mut self, actor: u32, change: Change, seq: u64) {
        if !(1..=MAX_SEQ).contains(&seq) {
            self.corrupt += 1;
            return;
        }
        self.learn(seq, Content::Change(Box::new(change)));
        self.hold_own(actor, seq);
    }

    /// `client` made seq `seq` itself: it holds it.
    fn hold_own(&mut self, client: u32, seq: u64) {
        if let Some(&slot) = self.slots.get(&client) {
            let m = &mut self.members[slot];
            set_bit(&mut m.held, seq);
            set_bit(&mut m.own, seq);
        }
    }

    /// Member `member` received seq `seq` carrying `content` (`None`: a body that failed its
    /// checksum).
    pub fn arrived(&mut self, member: u32, seq: u64, content: Option<Content>) -> Taken {
        let Some(&slot) = self.slots.get(&member) else {
            return Taken::Stranger;
        };
        if !(1..=MAX_SEQ).contains(&seq) {
            self.corrupt += 1;
            return Taken::Stranger;
        }
        let Some(content) = content else {
            self.corrupt += 1;
            return Taken::Stranger;
        };
        self.learn(seq, content);
        let m = &mut self.members[slot];
        if set_bit(&mut m.held, seq) {
            // Its own messages and changes come back only in a sync: not redeliveries.
            if !has_bit(&m.own, seq) {
                self.redelivered += 1;
            }
            m.highest = m.highest.max(seq);
            return Taken::Again;
        }
        if seq < m.highest {
            self.out_of_order += 1;
        }
        m.highest = m.highest.max(seq);
        Taken::Fresh
    }

    fn timeline(&mut self) -> &Timeline {
        if self.timeline.is_none() {
            let mut t = Timeline {
                windows: vec![Vec::new(); self.members.len()],
                counts: Vec::with_capacity(self.changes.len()),
            };
            let mut count = 0u32;
            for &seq in &self.changes {
                let Some(Some(Content::Change(change))) = self.seqs.get((seq - 1) as usize) else {
                    continue;
                };
                for u in &change.users {
                    let Some(&slot) = self.slots.get(u) else {
                        continue;
                    };
                    let w = &mut t.windows[slot];
                    let open = w.last().is_some_and(|(_, to)| to.is_none());
                    match change.action {
                        GroupAction::Create | GroupAction::Add if !open => {
                            w.push((seq, None));
                            count += 1;
                        }
                        GroupAction::Remove if open => {
                            if let Some(last) = w.last_mut() {
                                last.1 = Some(seq);
                            }
                            count -= 1;
                        }
                        _ => {}
                    }
                }
                t.counts.push((seq, count));
            }
            self.timeline = Some(t);
        }
        self.timeline.get_or_insert_default()
    }

    /// The windows of member `member` as far as the changes known so far tell, `(from, to)`
    /// inclusive, `to` = the group's last seq for an open one.
    pub fn windows(&mut self, member: u32) -> Vec<(u64, u64)> {
        let last = self.last_seq();
        let Some(&slot) = self.slots.get(&member) else {
            return Vec::new();
        };
        self.timeline().windows[slot]
            .iter()
            .map(|&(from, to)| (from, to.unwrap_or(last).max(from)))
            .collect()
    }

    /// How many watched members, `except` those listed (the sender; a member whose change is
    /// still on its way), are in the group at message seq `seq` by the changes known so far:
    /// the copies of that message to wait for.
    pub fn coverage(&mut self, seq: u64, except: &[u32]) -> u32 {
        let slots: Vec<usize> = except
            .iter()
            .filter_map(|c| self.slots.get(c).copied())
            .collect();
        let t = self.timeline();
        let at = t.counts.partition_point(|&(s, _)| s <= seq);
        let mut n = at.checked_sub(1).map_or(0, |i| t.counts[i].1);
        for slot in slots {
            let inside = t.windows[slot]
                .iter()
                .any(|&(from, to)| from <= seq && to.is_none_or(|to| seq <= to));
            if inside {
                n = n.saturating_sub(1);
            }
        }
        n
    }

    /// The verdict of the whole group: call it after every member's final sync.
    pub fn verdict(&mut self) -> Verdict {
        let last = self.last_seq();
        let gaps = self.seqs.iter().filter(|c| c.is_none()).count() as u64;
        let windows = self.timeline().windows.clone();
        let (mut lost, mut outside) = (0, 0);
        for (m, windows) in self.members.iter().zip(&windows) {
            let held_total = ones_in(&m.held, 1, last.max(1));
            let mut held_inside = 0;
            for (i, &(from, to)) in windows.iter().enumerate() {
                let to = to.unwrap_or(last);
                let inside = ones_in(&m.held, from, to);
                held_inside += inside;
                if i + 1 == windows.len() {
                    lost += (to + 1).saturating_sub(from) - inside;
                }
            }
            outside += held_total - held_inside;
        }
        Verdict {
            lost,
            duplicated: self.duplicated,
            out_of_order: self.out_of_order,
            corrupt: self.corrupt,
            gaps,
            redelivered: self.redelivered,
            outside_window: outside,
            misplaced: self.misplaced,
            ..Verdict::default()
        }
    }

    /// Up to `limit` lines saying which member lacks what inside its windows, or holds what
    /// outside them (for the report of a failed run), e.g. `member 12 (windows 1..=40,
    /// 52..=90): lost 61..=64; outside 41..=41`.
    pub fn describe(&mut self, limit: usize) -> Vec<String> {
        let last = self.last_seq();
        let windows = self.timeline().windows.clone();
        let mut clients: Vec<(u32, usize)> = self.slots.iter().map(|(&c, &s)| (c, s)).collect();
        clients.sort_unstable();
        let mut out = Vec::new();
        for (client, slot) in clients {
            if out.len() >= limit {
                break;
            }
            let held = &self.members[slot].held;
            let windows: Vec<(u64, u64)> = windows[slot]
                .iter()
                .map(|&(from, to)| (from, to.unwrap_or(last)))
                .collect();
            let inside = |seq: u64| windows.iter().any(|&(a, b)| a <= seq && seq <= b);
            let latest = |seq: u64| windows.last().is_some_and(|&(a, b)| a <= seq && seq <= b);
            // Runs of seqs held outside every window, or missing from the latest one.
            let (mut lost, mut outside) = (Vec::new(), Vec::new());
            let mut run: Option<(u64, bool)> = None;
            for seq in 1..=last + 1 {
                let held_here = has_bit(held, seq);
                let wrong =
                    seq <= last && ((held_here && !inside(seq)) || (!held_here && latest(seq)));
                let kind = wrong.then(|| inside(seq));
                match (run, kind) {
                    (Some((_, k)), Some(k2)) if k == k2 => {}
                    (Some((from, k)), _) => {
                        let range = format!("{from}..={}", seq - 1);
                        if k {
                            lost.push(range)
                        } else {
                            outside.push(range)
                        }
                        run = kind.map(|k| (seq, k));
                    }
                    (None, Some(k)) => run = Some((seq, k)),
                    (None, None) => {}
                }
            }
            if lost.is_empty() && outside.is_empty() {
                continue;
            }
            let ws: Vec<String> = windows.iter().map(|(a, b)| format!("{a}..={b}")).collect();
            let mut line = format!("member {client} (windows {})", ws.join(", "));
            for (name, ranges) in [("lost", &lost), ("outside", &outside)] {
                if !ranges.is_empty() {
                    let shown: Vec<&str> = ranges.iter().take(4).map(String::as_str).collect();
                    let more = if ranges.len() > 4 { ", …" } else { "" };
                    line.push_str(&format!(": {name} {}{more}", shown.join(", ")));
                }
            }
            out.push(line);
        }
        out
    }

    /// Whether member `member` holds seq `seq`.
    pub fn holds(&self, member: u32, seq: u64) -> bool {
        self.slots
            .get(&member)
            .is_some_and(|&slot| has_bit(&self.members[slot].held, seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: u32 = 0;
    const BOB: u32 = 1;
    const CAROL: u32 = 2;

    fn msg(sender: u32, counter: u64) -> Option<Content> {
        Some(Content::Message { sender, counter })
    }

    fn change(action: GroupAction, users: &[u32]) -> Change {
        Change::new(action, users.iter().copied())
    }

    fn event(action: GroupAction, users: &[u32]) -> Option<Content> {
        Some(Content::Change(Box::new(change(action, users))))
    }

    /// A group of the owner (who sends), bob and carol, created at seq 1; the owner sends
    /// seqs 2 and 3, removes carol at 4, sends 5 and 6, adds carol back at 7, sends 8.
    /// Every member receives what its windows cover, live.
    fn history() -> GroupCheck {
        let mut g = GroupCheck::new([OWNER, BOB, CAROL]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB, CAROL]), 1);
        g.acked(OWNER, 1, 2);
        g.acked(OWNER, 2, 3);
        g.changed(OWNER, change(GroupAction::Remove, &[CAROL]), 4);
        g.acked(OWNER, 3, 5);
        g.acked(OWNER, 4, 6);
        g.changed(OWNER, change(GroupAction::Add, &[CAROL]), 7);
        g.acked(OWNER, 5, 8);
        let all = [
            (1, event(GroupAction::Create, &[OWNER, BOB, CAROL])),
            (2, msg(OWNER, 1)),
            (3, msg(OWNER, 2)),
            (4, event(GroupAction::Remove, &[CAROL])),
            (5, msg(OWNER, 3)),
            (6, msg(OWNER, 4)),
            (7, event(GroupAction::Add, &[CAROL])),
            (8, msg(OWNER, 5)),
        ];
        for (seq, content) in &all {
            assert_eq!(g.arrived(BOB, *seq, content.clone()), Taken::Fresh);
        }
        for (seq, content) in all.iter().filter(|(s, _)| ![5, 6].contains(s)) {
            assert_eq!(g.arrived(CAROL, *seq, content.clone()), Taken::Fresh);
        }
        g
    }

    #[test]
    fn members_that_got_exactly_their_windows_pass() {
        let mut g = history();
        let v = g.verdict();
        assert!(v.passed(), "{v:?}");
        assert_eq!(v.redelivered, 0);
    }

    #[test]
    fn windows_run_from_each_join_to_the_removal_included_and_from_the_last_join_to_the_end() {
        let mut g = history();
        assert_eq!(g.windows(CAROL), vec![(1, 4), (7, 8)]);
        assert_eq!(g.windows(BOB), vec![(1, 8)]);
        assert_eq!(g.windows(OWNER), vec![(1, 8)]);
    }

    #[test]
    fn a_message_after_a_removal_is_reported_outside_the_window() {
        let mut g = GroupCheck::new([OWNER, BOB]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB]), 1);
        g.changed(OWNER, change(GroupAction::Remove, &[BOB]), 2);
        g.acked(OWNER, 1, 3);
        g.arrived(BOB, 1, event(GroupAction::Create, &[OWNER, BOB]));
        g.arrived(BOB, 2, event(GroupAction::Remove, &[BOB]));
        assert!(g.verdict().passed());
        assert_eq!(g.arrived(BOB, 3, msg(OWNER, 1)), Taken::Fresh);
        let v = g.verdict();
        assert_eq!(v.failures(), vec![("outside_window", 1)], "{v:?}");
    }

    #[test]
    fn a_message_between_a_removal_and_the_return_is_outside_the_window() {
        let mut g = history();
        g.arrived(CAROL, 6, msg(OWNER, 4));
        let v = g.verdict();
        assert_eq!(v.outside_window, 1, "{v:?}");
    }

    #[test]
    fn a_gap_inside_a_window_is_reported_lost() {
        let mut g = GroupCheck::new([OWNER, BOB]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB]), 1);
        for (counter, seq) in [(1, 2), (2, 3), (3, 4)] {
            g.acked(OWNER, counter, seq);
        }
        g.arrived(BOB, 1, event(GroupAction::Create, &[OWNER, BOB]));
        g.arrived(BOB, 2, msg(OWNER, 1));
        g.arrived(BOB, 4, msg(OWNER, 3));
        let v = g.verdict();
        assert_eq!(v.failures(), vec![("lost", 1)], "{v:?}");
    }

    #[test]
    fn a_member_back_in_the_group_is_held_to_its_latest_window_only() {
        // Carol missed part of her first window (she was behind when removed): the broker
        // serves a member who came back from its new join on, so that is not lost; a gap in
        // her latest window is.
        let mut g = GroupCheck::new([OWNER, BOB, CAROL]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB, CAROL]), 1);
        g.acked(OWNER, 1, 2);
        g.changed(OWNER, change(GroupAction::Remove, &[CAROL]), 3);
        g.changed(OWNER, change(GroupAction::Add, &[CAROL]), 4);
        g.acked(OWNER, 2, 5);
        for (seq, content) in [
            (1, event(GroupAction::Create, &[OWNER, BOB, CAROL])),
            (2, msg(OWNER, 1)),
            (3, event(GroupAction::Remove, &[CAROL])),
            (4, event(GroupAction::Add, &[CAROL])),
            (5, msg(OWNER, 2)),
        ] {
            g.arrived(BOB, seq, content);
        }
        g.arrived(CAROL, 1, event(GroupAction::Create, &[OWNER, BOB, CAROL]));
        g.arrived(CAROL, 4, event(GroupAction::Add, &[CAROL]));
        assert_eq!(g.verdict().lost, 1, "seq 5 of her latest window");
        g.arrived(CAROL, 5, msg(OWNER, 2));
        let v = g.verdict();
        assert!(
            v.passed(),
            "2 and 3 of the earlier window are not lost: {v:?}"
        );
    }

    #[test]
    fn the_removal_event_itself_belongs_to_the_removed_members_window() {
        let mut g = GroupCheck::new([OWNER, BOB]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB]), 1);
        g.changed(OWNER, change(GroupAction::Remove, &[BOB]), 2);
        g.arrived(BOB, 1, event(GroupAction::Create, &[OWNER, BOB]));
        assert_eq!(g.verdict().lost, 1, "bob did not get its removal");
        g.arrived(BOB, 2, event(GroupAction::Remove, &[BOB]));
        assert!(g.verdict().passed());
    }

    #[test]
    fn a_copy_that_is_not_what_the_ack_named_is_misplaced() {
        let mut g = GroupCheck::new([OWNER, BOB]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB]), 1);
        g.acked(OWNER, 1, 2);
        g.arrived(BOB, 1, event(GroupAction::Create, &[OWNER, BOB]));
        g.arrived(BOB, 2, msg(OWNER, 2));
        assert_eq!(g.verdict().misplaced, 1);
    }

    #[test]
    fn one_message_stored_at_two_seqs_is_duplicated() {
        let mut g = GroupCheck::new([OWNER, BOB]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB]), 1);
        g.acked(OWNER, 1, 2);
        g.arrived(BOB, 1, event(GroupAction::Create, &[OWNER, BOB]));
        g.arrived(BOB, 2, msg(OWNER, 1));
        g.arrived(BOB, 3, msg(OWNER, 1));
        assert_eq!(g.verdict().duplicated, 1);
    }

    #[test]
    fn a_failed_view_is_described_by_member_windows_and_ranges() {
        let mut g = history();
        assert!(g.describe(5).is_empty(), "nothing to say of a clean group");
        g.arrived(CAROL, 5, msg(OWNER, 3));
        let mut lacks = GroupCheck::new([OWNER, BOB]);
        lacks.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB]), 1);
        lacks.acked(OWNER, 1, 2);
        lacks.acked(OWNER, 2, 3);
        assert_eq!(
            g.describe(5),
            vec!["member 2 (windows 1..=4, 7..=8): outside 5..=5".to_owned()]
        );
        assert_eq!(
            lacks.describe(5),
            vec!["member 1 (windows 1..=3): lost 1..=3".to_owned()]
        );
    }

    #[test]
    fn a_redelivery_is_counted_not_failed_and_the_view_stays_exactly_once() {
        let mut g = history();
        assert_eq!(g.arrived(BOB, 8, msg(OWNER, 5)), Taken::Again);
        let v = g.verdict();
        assert!(v.passed(), "{v:?}");
        assert_eq!(v.redelivered, 1);
    }

    #[test]
    fn own_messages_echoed_by_a_sync_are_not_redeliveries() {
        let mut g = history();
        assert_eq!(g.arrived(OWNER, 2, msg(OWNER, 1)), Taken::Again);
        assert_eq!(g.verdict().redelivered, 0);
    }

    #[test]
    fn a_late_seq_is_out_of_order_and_a_seq_nobody_heard_of_is_a_gap() {
        let mut g = GroupCheck::new([OWNER, BOB]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB]), 1);
        g.arrived(BOB, 1, event(GroupAction::Create, &[OWNER, BOB]));
        g.arrived(BOB, 3, msg(OWNER, 2));
        g.arrived(BOB, 2, msg(OWNER, 1));
        g.acked(OWNER, 4, 5);
        let v = g.verdict();
        assert_eq!(v.out_of_order, 1);
        assert_eq!(v.gaps, 1, "seq 4: {v:?}");
    }

    #[test]
    fn a_corrupt_body_is_corrupt_and_its_seq_lost() {
        let mut g = GroupCheck::new([OWNER, BOB]);
        g.changed(OWNER, change(GroupAction::Create, &[OWNER, BOB]), 1);
        g.acked(OWNER, 1, 2);
        g.arrived(BOB, 1, event(GroupAction::Create, &[OWNER, BOB]));
        assert_eq!(g.arrived(BOB, 2, None), Taken::Stranger);
        let v = g.verdict();
        assert_eq!((v.corrupt, v.lost), (1, 1));
    }

    #[test]
    fn members_that_never_connect_are_members_but_not_checked() {
        const OFFLINE: u32 = 9;
        let mut g = GroupCheck::new([OWNER, BOB]);
        g.changed(
            OWNER,
            change(GroupAction::Create, &[OWNER, BOB, OFFLINE]),
            1,
        );
        g.arrived(BOB, 1, event(GroupAction::Create, &[OWNER, BOB, OFFLINE]));
        assert!(g.verdict().passed());
        assert_eq!(
            g.coverage(2, &[]),
            2,
            "only the watched members are counted"
        );
        assert_eq!(g.arrived(OFFLINE, 1, None), Taken::Stranger);
    }

    #[test]
    fn coverage_counts_the_members_at_a_seq_but_the_ones_excepted() {
        let mut g = history();
        assert_eq!(g.coverage(2, &[OWNER]), 2, "bob and carol");
        assert_eq!(g.coverage(5, &[OWNER]), 1, "carol was removed at 4");
        assert_eq!(g.coverage(8, &[OWNER]), 2, "carol is back from 7");
        assert_eq!(
            g.coverage(8, &[OWNER, CAROL]),
            1,
            "carol's change is uncertain"
        );
        assert_eq!(
            g.coverage(5, &[OWNER, CAROL]),
            1,
            "carol is not a member at 5 anyway"
        );
    }

    #[test]
    fn bit_ranges_count_across_words() {
        let mut bits = Vec::new();
        for i in [0, 1, 63, 64, 65, 127, 128, 200] {
            set_bit(&mut bits, i);
        }
        assert_eq!(ones_in(&bits, 0, 200), 8);
        assert_eq!(ones_in(&bits, 1, 64), 3);
        assert_eq!(ones_in(&bits, 64, 64), 1);
        assert_eq!(ones_in(&bits, 66, 126), 0);
        assert_eq!(ones_in(&bits, 129, 1000), 1);
        assert_eq!(ones_in(&bits, 5, 4), 0);
    }
}
