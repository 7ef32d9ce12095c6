//! Delivery to one connection: what was pushed live, what awaits an ack, retransmits, `Behind`.
//!
//! * Live deliveries wait in the conversation's lane until a cumulative `DeliverAck` covers
//!   them. Acks are cumulative, so a lane has **one** retransmit deadline in the shard's wheel,
//!   not one per message: armed when the lane gets its first unacked message, re-armed when an
//!   ack moves the lane forward, cancelled when the lane empties. When it fires, everything the
//!   lane holds is re-sent (the same stored bytes, no re-encoding), with doubling back-off
//!   capped at `retransmit_max_ms`; after `retransmit_tries` retransmits without progress the
//!   connection is closed as broken (RETRANSMIT_EXHAUSTED) and the client re-syncs.
//! * When the connection's queue passes its bound (`limits.max_outbound_bytes`), or more
//!   deliveries await acks than `limits.max_unacked_deliveries`, the connection goes *behind*:
//!   it gets `Behind`, its lanes forget their unacked messages, and nothing is pushed live until
//!   a sync completes (the messages are in the log).
//! * While a sync runs nothing is pushed live: the sync's last step reads whatever arrived
//!   meanwhile, so a syncing client gets each conversation in seq order.
//! * A lane's `live` range holds the latest contiguous run of seqs pushed live (the owner releases
//!   in seq order and routes are FIFO, but a device is not pushed its own sends, so the seqs it
//!   gets may skip), and a sync skips them; `synced` is the highest seq a sync
//!   covered (sent, or left out on purpose: dropped by retention, or older than a sync's
//!   `max_per_conversation`), and a live delivery at or below it is skipped. So an acking client gets each
//!   (conversation, seq) once, apart from retransmits.
//!
//! ### Invariants
//! * A lane's unacked seqs are strictly increasing; `unacked` is the sum of the lanes' lengths.
//! * A lane has a timer iff it has unacked messages.

use std::collections::VecDeque;

use bytes::Bytes;

use super::FastMap;
use super::config::CoreConfig;
use super::conn::ConnId;
use super::timers::{TimerFor, Timers};
use super::wheel::TimerKey;

/// One conversation's delivery state on one connection.
#[derive(Debug)]
pub(crate) struct Lane {
    /// The receiver's view of the conversation, spliced after each stored message.
    pub(crate) view: Bytes,
    live: Option<(u64, u64)>,
    synced: u64,
    /// Delivered and not yet acked: `(seq, stored bytes)`, ascending.
    pub(crate) unacked: VecDeque<(u64, Bytes)>,
    timer: Option<TimerKey>,
    retransmits: u32,
}

impl Lane {
    fn new(view: Bytes) -> Self {
        Lane {
            view,
            live: None,
            synced: 0,
            unacked: VecDeque::new(),
            timer: None,
            retransmits: 0,
        }
    }
}

/// What a fired retransmit deadline asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Retransmit {
    /// Nothing (a stale deadline).
    Nothing,
    /// Re-send the lane's unacked messages ([`Delivery::lane`]).
    Resend,
    /// Every retransmit went unacknowledged: close the connection.
    Exhausted,
}

/// A connection's delivery state.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    lanes: FastMap<u64, Lane>,
    unacked: usize,
    behind: bool,
    /// A sync runs: live push waits.
    pub(crate) syncing: bool,
}

impl Delivery {
    /// Deliveries awaiting an ack.
    pub(crate) fn unacked(&self) -> usize {
        self.unacked
    }

    /// The lane of conversation `conv`, if it has one.
    pub(crate) fn lane(&self, conv: u64) -> Option<&Lane> {
        self.lanes.get(&conv)
    }

    /// A live message `seq` of conversation `conv`: returns true if it is to be written now (it
    /// then awaits an ack), false if it is skipped (behind, syncing, or a sync already sent it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        conv: u64,
        view: &Bytes,
        seq: u64,
        stored: &Bytes,
        now: u64,
        cfg: &CoreConfig,
        timers: &mut Timers,
        conn: ConnId,
    ) -> bool {
        if self.behind || self.syncing {
            return false;
        }
        let lane = self
            .lanes
            .entry(conv)
            .or_insert_with(|| Lane::new(view.clone()));
        if seq <= lane.synced {
            return false;
        }
        if lane.unacked.back().is_some_and(|&(last, _)| last >= seq) {
            // Already awaiting its ack (a duplicate route); the retransmit covers it.
            return false;
        }
        // The range must hold only seqs this connection was sent: a device does not get its
        // own sends live, so the seqs it is pushed may skip some. After a gap the range starts
        // again (a sync then re-sends the older ones, which the client drops as duplicates).
        lane.live = Some(match lane.live {
            Some((lo, hi)) if seq == hi + 1 => (lo, seq),
            _ => (seq, seq),
        });
        lane.unacked.push_back((seq, stored.clone()));
        self.unacked += 1;
        if lane.timer.is_none() {
            lane.retransmits = 0;
            lane.timer = Some(timers.insert(
                now + cfg.retransmit_initial_ms,
                TimerFor::Retransmit { conn, conv },
            ));
        }
        true
    }

    /// Cumulative ack: every delivery of `conv` up to `seq` arrived.
    pub(crate) fn ack(
        &mut self,
        conv: u64,
        seq: u64,
        now: u64,
        cfg: &CoreConfig,
        timers: &mut Timers,
        conn: ConnId,
    ) {
        let Some(lane) = self.lanes.get_mut(&conv) else {
            return;
        };
        let before = lane.unacked.len();
        while lane.unacked.front().is_some_and(|&(s, _)| s <= seq) {
            lane.unacked.pop_front();
        }
        let acked = before - lane.unacked.len();
        if acked == 0 {
            return;
        }
        self.unacked -= acked;
        if let Some(t) = lane.timer.take() {
            timers.cancel(t);
        }
        if !lane.unacked.is_empty() {
            // Progress: the rest gets a fresh deadline and a fresh count of tries.
            lane.retransmits = 0;
            lane.timer = Some(timers.insert(
                now + cfg.retransmit_initial_ms,
                TimerFor::Retransmit { conn, conv },
            ));
        }
    }

    /// The retransmit deadline of `conv` fired at `now`.
    pub(crate) fn retransmit(
        &mut self,
        conv: u64,
        now: u64,
        cfg: &CoreConfig,
        timers: &mut Timers,
        conn: ConnId,
    ) -> Retransmit {
        let Some(lane) = self.lanes.get_mut(&conv) else {
            return Retransmit::Nothing;
        };
        lane.timer = None;
        if lane.unacked.is_empty() {
            return Retransmit::Nothing;
        }
        if lane.retransmits >= cfg.retransmit_tries {
            self.clear(timers);
            return Retransmit::Exhausted;
        }
        lane.retransmits += 1;
        let backoff = cfg
            .retransmit_initial_ms
            .saturating_mul(1 << lane.retransmits.min(20))
            .min(cfg.retransmit_max_ms);
        lane.timer = Some(timers.insert(now + backoff, TimerFor::Retransmit { conn, conv }));
        Retransmit::Resend
    }

    /// The retransmit deadline of `conv` fired while the connection's queue still held bytes:
    /// nothing is re-sent and no try is counted; the deadline moves by the initial interval.
    pub(crate) fn postpone(
        &mut self,
        conv: u64,
        now: u64,
        cfg: &CoreConfig,
        timers: &mut Timers,
        conn: ConnId,
    ) {
        let Some(lane) = self.lanes.get_mut(&conv) else {
            return;
        };
        lane.timer = None;
        if !lane.unacked.is_empty() {
            lane.timer = Some(timers.insert(
                now + cfg.retransmit_initial_ms,
                TimerFor::Retransmit { conn, conv },
            ));
        }
    }

    /// Forgets every unacked delivery and cancels the deadlines (falling back to sync, or the
    /// connection is going away).
    pub(crate) fn clear(&mut self, timers: &mut Timers) {
        for lane in self.lanes.values_mut() {
            if let Some(t) = lane.timer.take() {
                timers.cancel(t);
            }
            lane.unacked.clear();
        }
        self.unacked = 0;
    }

    /// The queue passed its bound: stop live push until the client syncs. Returns true if the
    /// connection was not behind yet (the caller then writes `Behind`).
    pub(crate) fn go_behind(&mut self, timers: &mut Timers) -> bool {
        if self.behind {
            return false;
        }
        self.behind = true;
        self.clear(timers);
        for lane in self.lanes.values_mut() {
            lane.live = None;
        }
        true
    }

    /// A sync starts: nothing it sends before is remembered, live push waits.
    pub(crate) fn start_sync(&mut self) {
        self.syncing = true;
        for lane in self.lanes.values_mut() {
            lane.synced = 0;
        }
    }

    /// The sync is done: live push resumes.
    pub(crate) fn end_sync(&mut self) {
        self.syncing = false;
        self.behind = false;
    }

    /// Whether a sync page should carry `seq` of `conv` (not already pushed live and acked);
    /// records it as sent by the sync. A seq pushed live and not acked yet is carried again:
    /// the push may have been lost (a datagram), and a client takes a sync page for seq `s` as
    /// the server saying that nothing it lacks below `s` is still coming; it drops the copy it
    /// already holds.
    pub(crate) fn sync_takes(&mut self, conv: u64, view: &Bytes, seq: u64) -> bool {
        let lane = self
            .lanes
            .entry(conv)
            .or_insert_with(|| Lane::new(view.clone()));
        let pushed = lane.live.is_some_and(|(lo, hi)| seq >= lo && seq <= hi);
        if pushed && lane.unacked.binary_search_by_key(&seq, |u| u.0).is_err() {
            return false;
        }
        lane.synced = lane.synced.max(seq);
        true
    }

    /// A sync range of `conv` up to `upto` is complete, whether or not every seq in it still
    /// existed (retention may have dropped some) and wherever it started (a sync with
    /// `max_per_conversation` leaves the older seqs out): live push goes on above `upto`.
    pub(crate) fn mark_synced(&mut self, conv: u64, view: &Bytes, upto: u64) {
        let lane = self
            .lanes
            .entry(conv)
            .or_insert_with(|| Lane::new(view.clone()));
        lane.synced = lane.synced.max(upto);
    }

    /// The highest seq of `conv` this connection holds or was sent.
    pub(crate) fn sent_upto(&self, conv: u64) -> u64 {
        self.lanes
            .get(&conv)
            .map_or(0, |l| l.live.map_or(0, |r| r.1).max(l.synced))
    }

    #[cfg(test)]
    fn check(&self) {
        let sum: usize = self.lanes.values().map(|l| l.unacked.len()).sum();
        assert_eq!(sum, self.unacked);
        for l in self.lanes.values() {
            assert_eq!(l.timer.is_some(), !l.unacked.is_empty());
            assert!(
                l.unacked
                    .iter()
                    .zip(l.unacked.iter().skip(1))
                    .all(|(a, b)| a.0 < b.0)
            );
        }
    }
}

impl<B: parley_storage::Backend> super::ShardCore<B> {
    /// A connection's retransmit deadline for `conv`: re-sends what it has not acknowledged (in
    /// as few frames as the frame limit allows), or gives up on it.
    pub(super) fn retransmit(&mut self, conn: ConnId, conv: u64) {
        let now = self.now.ms;
        let (cfg, timers) = (&self.cfg, &mut self.timers);
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        if c.id != conn {
            return;
        }
        if !c.out.is_empty() {
            // The last copy has not even left: re-sending would only pile up copies behind it
            // (a reader that stopped is the write-stall timeout's business).
            c.delivery.postpone(conv, now, cfg, timers, conn);
            return;
        }
        match c.delivery.retransmit(conv, now, cfg, timers, conn) {
            Retransmit::Nothing => {}
            Retransmit::Exhausted => {
                self.close(
                    conn,
                    0,
                    Some(super::error::CloseReason::RetransmitExhausted),
                );
            }
            Retransmit::Resend => {
                let budget = self.cfg.page_budget;
                let Some(lane) = c.delivery.lane(conv) else {
                    return;
                };
                // Re-sent together, in as few frames as the frame limit allows.
                let mut frames: Vec<bytes::BytesMut> = Vec::new();
                let mut batch: Vec<parley_proto::splice::Spliced<'_>> = Vec::new();
                let mut bytes = 0;
                let mut count = 0u64;
                for (_, stored) in &lane.unacked {
                    let m = parley_proto::splice::Spliced {
                        stored,
                        view: &lane.view,
                    };
                    let size = m.len() + parley_proto::splice::PER_MESSAGE_OVERHEAD;
                    if !batch.is_empty() && bytes + size > budget {
                        let mut f = bytes::BytesMut::new();
                        parley_proto::splice::encode_deliver(0, &batch, &mut f);
                        frames.push(f);
                        batch.clear();
                        bytes = 0;
                    }
                    bytes += size;
                    count += 1;
                    batch.push(m);
                }
                if !batch.is_empty() {
                    let mut f = bytes::BytesMut::new();
                    parley_proto::splice::encode_deliver(0, &batch, &mut f);
                    frames.push(f);
                }
                self.counters.retransmits += count;
                for f in frames {
                    self.write_encoded(conn, &f);
                }
                self.check_backlog(conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const CONN: ConnId = ConnId {
        slot: 0,
        generation: 1,
    };

    fn cfg() -> CoreConfig {
        let mut c = CoreConfig::from_config(&Config::default());
        c.retransmit_initial_ms = 100;
        c.retransmit_max_ms = 400;
        c.retransmit_tries = 3;
        c
    }

    fn push(d: &mut Delivery, t: &mut Timers, seq: u64, now: u64) -> bool {
        let r = d.push(
            7,
            &Bytes::new(),
            seq,
            &Bytes::from(vec![seq as u8]),
            now,
            &cfg(),
            t,
            CONN,
        );
        d.check();
        r
    }

    /// Fires every deadline due at `now`; returns what each asked for.
    fn fire(d: &mut Delivery, t: &mut Timers, now: u64) -> Vec<Retransmit> {
        let mut out = Vec::new();
        while let Some((_, what)) = t.poll(now) {
            if let TimerFor::Retransmit { conv, .. } = what {
                out.push(d.retransmit(conv, now, &cfg(), t, CONN));
            }
        }
        d.check();
        out
    }

    #[test]
    fn one_deadline_per_conversation_however_many_messages_await_acks() {
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        for seq in 1..=50 {
            assert!(push(&mut d, &mut t, seq, 0));
        }
        assert_eq!(t.len(), 1);
        assert_eq!(d.unacked(), 50);
    }

    #[test]
    fn unacked_deliveries_are_resent_with_backoff_then_exhausted() {
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        push(&mut d, &mut t, 1, 0);
        let mut fired = Vec::new();
        while let Some(now) = t.next_deadline() {
            // `next_deadline` is a lower bound (entries cascade down the levels).
            let r = fire(&mut d, &mut t, now);
            if !r.is_empty() {
                fired.push((now, r));
            }
            if d.unacked() == 0 {
                break;
            }
        }
        // 100, then +200, then +400 (capped), then exhausted at +400.
        assert_eq!(
            fired,
            vec![
                (100, vec![Retransmit::Resend]),
                (300, vec![Retransmit::Resend]),
                (700, vec![Retransmit::Resend]),
                (1100, vec![Retransmit::Exhausted]),
            ]
        );
        assert!(t.is_empty(), "no deadline outlives the deliveries");
    }

    #[test]
    fn a_cumulative_ack_removes_what_it_covers_and_rearms_for_the_rest() {
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        for seq in 1..=3 {
            push(&mut d, &mut t, seq, 0);
        }
        d.ack(7, 2, 50, &cfg(), &mut t, CONN);
        d.check();
        assert_eq!(d.unacked(), 1);
        assert!(t.poll(149).is_none(), "re-armed from the ack");
        assert_eq!(fire(&mut d, &mut t, 150), vec![Retransmit::Resend]);
        d.ack(7, 3, 160, &cfg(), &mut t, CONN);
        d.check();
        assert!(t.is_empty());
    }

    #[test]
    fn sync_skips_what_was_pushed_live_and_acked_and_live_skips_what_sync_sent() {
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        push(&mut d, &mut t, 5, 0);
        push(&mut d, &mut t, 6, 0);
        d.ack(7, 5, 10, &cfg(), &mut t, CONN);
        let taken: Vec<u64> = (1..=7)
            .filter(|&s| d.sync_takes(7, &Bytes::new(), s))
            .collect();
        // 6 was pushed but not acked: its push may be lost, so the sync carries it again.
        assert_eq!(taken, vec![1, 2, 3, 4, 6, 7]);
        assert!(!push(&mut d, &mut t, 7, 0), "seq 7 came with the sync");
        assert!(push(&mut d, &mut t, 8, 0));
    }

    #[test]
    fn a_sync_brings_the_seqs_live_push_skipped_for_this_device() {
        // Seqs 2 and 3 are this device's own sends: never pushed to it live.
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        push(&mut d, &mut t, 1, 0);
        push(&mut d, &mut t, 4, 0);
        let taken: Vec<u64> = (1..=4)
            .filter(|&s| d.sync_takes(7, &Bytes::new(), s))
            .collect();
        assert_eq!(
            taken,
            vec![1, 2, 3, 4],
            "2 and 3 come with the sync; 1 and 4, pushed and not acked, again"
        );
    }

    #[test]
    fn live_deliveries_wait_while_a_sync_runs() {
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        d.start_sync();
        assert!(!push(&mut d, &mut t, 1, 0));
        d.end_sync();
        assert!(push(&mut d, &mut t, 2, 0));
    }

    #[test]
    fn after_a_sync_that_left_older_seqs_out_live_push_goes_on_above_its_range() {
        // The client lacks 1..=30; a sync with max_per_conversation 10 sends 21..=30 only.
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        d.start_sync();
        for seq in 21..=30 {
            assert!(d.sync_takes(7, &Bytes::new(), seq));
        }
        d.mark_synced(7, &Bytes::new(), 30);
        assert_eq!(
            d.sent_upto(7),
            30,
            "the sync's last step reads above 30 only"
        );
        d.end_sync();
        assert!(!push(&mut d, &mut t, 30, 0), "covered by the sync");
        assert!(push(&mut d, &mut t, 31, 0));
        assert!(push(&mut d, &mut t, 32, 0));
    }

    #[test]
    fn a_postponed_deadline_counts_no_try() {
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        push(&mut d, &mut t, 1, 0);
        while t.poll(100).is_some() {}
        d.postpone(7, 100, &cfg(), &mut t, CONN);
        d.check();
        assert!(t.poll(199).is_none());
        assert_eq!(fire(&mut d, &mut t, 200), vec![Retransmit::Resend]);
    }

    #[test]
    fn behind_pushes_nothing_until_a_sync_is_done() {
        let mut d = Delivery::default();
        let mut t = Timers::new(0);
        push(&mut d, &mut t, 1, 0);
        assert!(d.go_behind(&mut t));
        assert!(!d.go_behind(&mut t), "told once");
        assert!(t.is_empty());
        assert!(!push(&mut d, &mut t, 2, 0));
        d.start_sync();
        d.end_sync();
        assert!(push(&mut d, &mut t, 3, 0));
    }
}
