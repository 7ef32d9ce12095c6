//! The arrival checker: every message loadgen sends is checked when it arrives.
//!
//! Each receiving connection listens to exactly one sender (its partner in `pairs` and
//! `offline`, the publisher in `fanout`), so the checker keeps one [`Stream`] per receiver and
//! classifies every arrival by the body's (sender, seq):
//!
//! - the next seq: in order;
//! - a later seq: the ones skipped become *missing*;
//! - an earlier seq that was missing: *out of order* (it came late);
//! - an earlier seq that was not missing: *duplicated*;
//! - a bad checksum or a body from another sender: *corrupt*.
//!
//! At the end, after the drain, *lost* = still missing + never arrived (the sender's count
//! beyond the highest seq seen).
//!
//! A system that drops messages for a slow receiver *and says so* (parley rooms, at-most-once:
//! `RoomLag`) is not failed for it: the count it declared ([`Stream::excuse`]) covers the seqs
//! skipped right before the next arrival, which are then *dropped*, reported, not *lost*.
//!
//! Systems that number messages (parley) are also checked per conversation: every seq the
//! system handed out, seen by the sender's ack or the receiver's delivery, must form an unbroken
//! run from 1; each hole is a *gap*. A (conversation, seq) delivered twice is a *redelivery*: the
//! protocol allows it (a retransmit after a late ack) and an acking client drops it, so it is
//! counted for information and not checked twice.
//!
//! Over a transport that may lose datagrams (parley over UDP), a sender's messages can be stored
//! in another order than it sent them: message k is lost, k+1 is stored, k's retry is stored
//! after it. Order is then the system's to define, by its seqs: such a stream is checked
//! [`Stream::ordered_by_system`], where an arrival is *out of order* if its seq in the
//! conversation is below one that arrived before it (redeliveries aside), and a late body that
//! fills a hole in the sender's numbering is not (it is still checked for loss and duplicates).
//!
//! Groups (parley) are checked per member instead, by seqs and membership windows: see
//! [`group`].

pub mod group;

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::body::{self, Stamp};
use crate::driver::ConvSeq;

/// The largest forward jump in seq the checker believes; a bigger one is a corrupt body.
pub const MAX_SEQ_JUMP: u64 = 1 << 24;

/// The verdict counters; any non-zero one but `redelivered` fails the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Sent but never arrived by the end of the drain.
    pub lost: u64,
    /// Arrived more than once.
    pub duplicated: u64,
    /// Arrived after a later message of the same stream.
    pub out_of_order: u64,
    /// Failed the checksum, or came from the wrong sender.
    pub corrupt: u64,
    /// Holes in a conversation's seq numbering.
    pub gaps: u64,
    /// The same (conversation, seq) delivered again (allowed; information only).
    pub redelivered: u64,
    /// Dropped for a slow receiver, as the system said (at-most-once rooms; information only).
    #[serde(default)]
    pub dropped: u64,
    /// Groups: seqs a member received outside its membership windows (after the event that
    /// ended its membership, before the one that began it again).
    #[serde(default)]
    pub outside_window: u64,
    /// Groups: seqs whose copies disagree (a member got another message or change at a seq
    /// than the sender's ack or the owner's result named).
    #[serde(default)]
    pub misplaced: u64,
}

impl Verdict {
    /// Whether nothing went wrong.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.corrupt == 0
            && self.gaps == 0
            && self.outside_window == 0
            && self.misplaced == 0
    }

    /// Adds another verdict's counters to this one.
    pub fn merge(&mut self, other: &Verdict) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.corrupt += other.corrupt;
        self.gaps += other.gaps;
        self.redelivered += other.redelivered;
        self.dropped += other.dropped;
        self.outside_window += other.outside_window;
        self.misplaced += other.misplaced;
    }

    /// The failures, worst first, as `name=count` for those that are not zero.
    pub fn failures(&self) -> Vec<(&'static str, u64)> {
        [
            ("lost", self.lost),
            ("corrupt", self.corrupt),
            ("duplicated", self.duplicated),
            ("out_of_order", self.out_of_order),
            ("gaps", self.gaps),
            ("outside_window", self.outside_window),
            ("misplaced", self.misplaced),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .collect()
    }
}

/// What one receiver has seen of its one sender.
#[derive(Debug, Clone)]
pub struct Stream {
    /// The only client allowed to send to this receiver.
    pub sender: u32,
    next: u64,
    missing: BTreeSet<u64>,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    corrupt: u64,
    /// Drops the system declared and no gap has used up yet.
    credit: u64,
    dropped: u64,
    /// The seqs the last arrival skipped that a declared drop covered.
    excused: Option<Range<u64>>,
    /// Order is judged by the system's seqs, not the sender's numbering.
    by_system: bool,
    /// The highest system seq arrived so far (with `by_system`).
    last_system_seq: u64,
}

/// How one arrival was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// New to the stream (in order, or late filling a hole); carries the body's stamp.
    Fresh(Stamp),
    /// Already seen.
    Duplicate,
    /// Bad checksum, wrong sender or an unbelievable seq.
    Corrupt,
}

impl Stream {
    /// A stream expecting seq 1 from `sender`.
    pub fn new(sender: u32) -> Self {
        Self {
            sender,
            next: 1,
            missing: BTreeSet::new(),
            received: 0,
            duplicated: 0,
            out_of_order: 0,
            corrupt: 0,
            credit: 0,
            dropped: 0,
            excused: None,
            by_system: false,
            last_system_seq: 0,
        }
    }

    /// Judges order by the seqs the system gave the messages (see [`Stream::arrive_at`]):
    /// for transports where the sender's messages may be stored in another order than sent.
    pub fn ordered_by_system(mut self) -> Self {
        self.by_system = true;
        self
    }

    /// Classifies the arrival of `body`, which the system numbered `system_seq` in its
    /// conversation (if it numbers messages). With [`Stream::ordered_by_system`], an arrival
    /// below an earlier one's `system_seq` is out of order, and a late body filling a hole in
    /// the sender's numbering is not.
    pub fn arrive_at(&mut self, body: &[u8], system_seq: Option<u64>) -> Arrival {
        let (Some(at), true) = (system_seq, self.by_system) else {
            return self.arrive(body);
        };
        let out_of_order_before = self.out_of_order;
        let arrival = self.arrive(body);
        if arrival == Arrival::Duplicate || arrival == Arrival::Corrupt {
            return arrival;
        }
        // Filling a hole in the sender's numbering is how a resent message shows: not late.
        self.out_of_order = out_of_order_before;
        if at < self.last_system_seq {
            self.out_of_order += 1;
        }
        self.last_system_seq = self.last_system_seq.max(at);
        arrival
    }

    /// The system said it dropped `count` messages of this stream (before the next arrival).
    pub fn excuse(&mut self, count: u64) {
        self.credit += count;
    }

    /// The seqs the last arrival skipped that a declared drop covered (dropped, not missing).
    pub fn take_excused(&mut self) -> Option<Range<u64>> {
        self.excused.take()
    }

    /// Classifies the arrival of `body`.
    pub fn arrive(&mut self, body: &[u8]) -> Arrival {
        let stamp = match body::read(body) {
            Ok(s) if s.sender == self.sender && s.seq >= 1 => s,
            _ => {
                self.corrupt += 1;
                return Arrival::Corrupt;
            }
        };
        let seq = stamp.seq;
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            if seq - self.next > MAX_SEQ_JUMP {
                self.corrupt += 1;
                return Arrival::Corrupt;
            }
            let excused = (seq - self.next).min(self.credit);
            if excused > 0 {
                self.credit -= excused;
                self.dropped += excused;
                self.excused = Some(self.next..self.next + excused);
            }
            self.missing.extend(self.next + excused..seq);
            self.next = seq + 1;
        } else if self.missing.remove(&seq) {
            self.out_of_order += 1;
        } else {
            self.duplicated += 1;
            return Arrival::Duplicate;
        }
        self.received += 1;
        Arrival::Fresh(stamp)
    }

    /// Distinct messages received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The verdict, given that the sender sent `sent` messages to this stream.
    pub fn verdict(&self, sent: u64) -> Verdict {
        let highest = self.next - 1;
        Verdict {
            lost: self.missing.len() as u64 + sent.saturating_sub(highest),
            duplicated: self.duplicated,
            out_of_order: self.out_of_order,
            corrupt: self.corrupt,
            dropped: self.dropped,
            ..Verdict::default()
        }
    }
}

/// The seqs a system handed out in one conversation, as a bitmap from seq 1.
#[derive(Debug, Default, Clone)]
struct Numbering {
    delivered: Vec<u64>,
    seen: Vec<u64>,
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

/// Per-conversation numbering check (systems that number messages).
#[derive(Debug, Default)]
pub struct Numberings {
    convs: HashMap<u64, Numbering>,
    redelivered: u64,
    unbelievable: u64,
}

impl Numberings {
    /// Records a seq the system acked to a sender.
    pub fn acked(&mut self, at: ConvSeq) {
        if let Some(i) = Self::index(at.seq) {
            set_bit(&mut self.convs.entry(at.conversation).or_default().seen, i);
        } else {
            self.unbelievable += 1;
        }
    }

    /// Records a seq the system said it dropped for a receiver: numbered, so not a gap.
    pub fn dropped(&mut self, at: ConvSeq) {
        self.acked(at);
    }

    /// Records a seq delivered to a receiver; false if that (conversation, seq) was already
    /// delivered (a redelivery the caller should not check again).
    pub fn delivered(&mut self, at: ConvSeq) -> bool {
        let Some(i) = Self::index(at.seq) else {
            self.unbelievable += 1;
            return true;
        };
        let conv = self.convs.entry(at.conversation).or_default();
        set_bit(&mut conv.seen, i);
        if set_bit(&mut conv.delivered, i) {
            self.redelivered += 1;
            false
        } else {
            true
        }
    }

    fn index(seq: u64) -> Option<u64> {
        (1..=MAX_SEQ_JUMP * 16).contains(&seq).then(|| seq - 1)
    }

    /// Holes below each conversation's highest seq, plus unbelievable seqs; and redeliveries.
    pub fn verdict(&self) -> Verdict {
        let mut gaps = self.unbelievable;
        for n in self.convs.values() {
            let Some(last) = n.seen.iter().rposition(|&w| w != 0) else {
                continue;
            };
            let top = 63 - u64::from(n.seen[last].leading_zeros());
            let ones: u64 = n.seen.iter().map(|w| u64::from(w.count_ones())).sum();
            gaps += (last as u64 * 64 + top + 1) - ones;
        }
        Verdict {
            gaps,
            redelivered: self.redelivered,
            ..Verdict::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(sender: u32, seq: u64) -> Vec<u8> {
        let mut b = Vec::new();
        body::write(
            Stamp {
                sender,
                seq,
                sent_ns: 0,
            },
            100,
            &mut b,
        );
        b
    }

    fn run(seqs: &[u64], sent: u64) -> Verdict {
        let mut s = Stream::new(1);
        for &q in seqs {
            s.arrive(&msg(1, q));
        }
        s.verdict(sent)
    }

    #[test]
    fn everything_in_order_passes() {
        let v = run(&[1, 2, 3, 4], 4);
        assert!(v.passed(), "{v:?}");
    }

    #[test]
    fn a_dropped_message_in_the_middle_is_one_lost() {
        let v = run(&[1, 2, 4, 5], 5);
        assert_eq!(v.lost, 1);
        assert_eq!(v.failures(), vec![("lost", 1)]);
    }

    #[test]
    fn messages_that_never_arrive_at_the_end_are_lost() {
        assert_eq!(run(&[1, 2], 5).lost, 3);
    }

    #[test]
    fn a_swapped_pair_is_one_out_of_order_and_nothing_lost() {
        let v = run(&[1, 3, 2, 4], 4);
        assert_eq!((v.out_of_order, v.lost, v.duplicated), (1, 0, 0));
    }

    #[test]
    fn a_repeat_is_a_duplicate() {
        let v = run(&[1, 2, 2, 3], 3);
        assert_eq!((v.duplicated, v.lost), (1, 0));
    }

    #[test]
    fn a_flipped_bit_or_a_stranger_is_corrupt() {
        let mut s = Stream::new(1);
        let mut bad = msg(1, 1);
        bad[50] ^= 4;
        assert_eq!(s.arrive(&bad), Arrival::Corrupt);
        assert_eq!(s.arrive(&msg(2, 1)), Arrival::Corrupt);
        assert_eq!(s.verdict(0).corrupt, 2);
    }

    #[test]
    fn an_unbelievable_jump_is_corrupt_not_millions_lost() {
        let v = run(&[1, MAX_SEQ_JUMP + 10], 1);
        assert_eq!((v.corrupt, v.lost), (1, 0));
    }

    fn at(seq: u64) -> ConvSeq {
        ConvSeq {
            conversation: 9,
            seq,
        }
    }

    #[test]
    fn acked_and_delivered_seqs_together_must_leave_no_hole() {
        let mut n = Numberings::default();
        n.acked(at(1));
        n.delivered(at(2));
        n.acked(at(3));
        assert_eq!(n.verdict().gaps, 0);
        n.delivered(at(5));
        assert_eq!(n.verdict().gaps, 1);
    }

    #[test]
    fn a_redelivery_is_counted_but_not_a_failure() {
        let mut n = Numberings::default();
        assert!(n.delivered(at(1)));
        assert!(!n.delivered(at(1)));
        let v = n.verdict();
        assert_eq!(v.redelivered, 1);
        assert!(v.passed());
    }

    #[test]
    fn a_declared_drop_covers_the_gap_before_the_next_arrival_and_is_not_a_failure() {
        let mut s = Stream::new(1);
        s.arrive(&msg(1, 1));
        s.excuse(2);
        s.arrive(&msg(1, 4));
        assert_eq!(s.take_excused(), Some(2..4));
        s.arrive(&msg(1, 5));
        let v = s.verdict(5);
        assert!(v.passed(), "{v:?}");
        assert_eq!(v.dropped, 2);
    }

    #[test]
    fn a_gap_larger_than_the_declared_drop_is_still_lost() {
        let mut s = Stream::new(1);
        s.excuse(1);
        s.arrive(&msg(1, 4));
        assert_eq!(s.take_excused(), Some(1..2));
        let v = s.verdict(4);
        assert_eq!((v.dropped, v.lost), (1, 2));
    }

    #[test]
    fn verdicts_merge_by_adding() {
        let mut a = run(&[1, 3], 3);
        a.merge(&run(&[2], 2));
        assert_eq!(a.lost, 2);
    }

    #[test]
    fn ordered_by_the_system_a_resent_message_stored_later_is_in_order() {
        // Sender's 2 was lost and resent: stored at seq 3, after 3 (seq 2).
        let mut s = Stream::new(1).ordered_by_system();
        s.arrive_at(&msg(1, 1), Some(1));
        s.arrive_at(&msg(1, 3), Some(2));
        s.arrive_at(&msg(1, 2), Some(3));
        let v = s.verdict(3);
        assert!(v.passed(), "{v:?}");
        // The same arrivals judged by the sender's numbering: one out of order.
        let mut t = Stream::new(1);
        for q in [1, 3, 2] {
            t.arrive_at(&msg(1, q), Some(q));
        }
        assert_eq!(t.verdict(3).out_of_order, 1);
    }

    #[test]
    fn ordered_by_the_system_a_lower_seq_after_a_higher_one_is_out_of_order() {
        let mut s = Stream::new(1).ordered_by_system();
        s.arrive_at(&msg(1, 1), Some(1));
        s.arrive_at(&msg(1, 3), Some(3));
        s.arrive_at(&msg(1, 2), Some(2));
        s.arrive_at(&msg(1, 2), Some(2));
        let v = s.verdict(3);
        assert_eq!((v.out_of_order, v.duplicated, v.lost), (1, 1, 0), "{v:?}");
    }
}
