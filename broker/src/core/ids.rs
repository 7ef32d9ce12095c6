//! Unique message ids, ordered by millisecond.
//!
//! Layout of a 64-bit id: 42 bits of milliseconds since 2025-01-01T00:00:00Z (until ~2164),
//! 10 bits of shard, 12 bits of a per-millisecond counter. A shard issues at most 4,096 ids per
//! millisecond; past that it borrows the next millisecond, so ids stay unique and increasing even
//! if the clock stalls or steps back. After a restart the generator resumes above the largest id
//! found in the checkpoint and the log.
//!
//! ### What the order promises (and what it does not)
//! * **Unique on the node**: the shard bits tell shards apart, and a shard never issues an id
//!   twice.
//! * **Ordered by millisecond across the node**: ids compare by their millisecond first, so an id
//!   stamped in a later millisecond is larger, whichever shard issued it. Within one millisecond
//!   ids of different shards sort by *shard*, not by time: shard 1's first id of a millisecond is
//!   larger than shard 0's last one of that millisecond, even if shard 0 issued it later. The
//!   stamped millisecond is the wall clock's, except that a shard never stamps an earlier one
//!   than it already has (after the clock steps back it goes on counting in its last
//!   millisecond) and borrows the next one past 4,096 ids.
//! * **Strictly increasing within a shard, so within a conversation strictly increasing with
//!   seq**: a conversation is owned by one shard (placement by `id % shards`, and the shard count
//!   of a data directory never changes), which assigns a message's seq and id together when it
//!   stores it, seq by seq. Across restarts the generator is rebuilt above every id of the
//!   checkpoint and of the replayed log ([`MsgIdGen::observe`], whatever the order).

/// Milliseconds since the Unix epoch of the id epoch (2025-01-01T00:00:00Z).
pub(crate) const ID_EPOCH_MS: u64 = 1_735_689_600_000;
const SHARD_BITS: u32 = 10;
const COUNTER_BITS: u32 = 12;
/// Largest number of shards the id layout can tell apart.
pub(crate) const MAX_SHARDS: usize = 1 << SHARD_BITS;

/// Issues ids for one shard.
#[derive(Debug)]
pub(crate) struct MsgIdGen {
    shard: u64,
    last_ms: u64,
    counter: u64,
}

impl MsgIdGen {
    /// A generator for `shard` (< [`MAX_SHARDS`]).
    pub(crate) fn new(shard: usize) -> Self {
        debug_assert!(shard < MAX_SHARDS);
        Self {
            shard: shard as u64 & ((1 << SHARD_BITS) - 1),
            last_ms: 0,
            counter: 0,
        }
    }

    /// Makes every later id larger than `id` (called with ids found in the checkpoint and the
    /// log at start-up, in any order: an id below what was already observed changes nothing).
    pub(crate) fn observe(&mut self, id: u64) {
        let ms = id >> (SHARD_BITS + COUNTER_BITS);
        let next = (id & ((1 << COUNTER_BITS) - 1)) + 1;
        if ms > self.last_ms || (ms == self.last_ms && next > self.counter) {
            self.last_ms = ms;
            self.counter = next;
        }
    }

    /// The largest id issued or observed so far (0 if none): every later id is larger.
    pub(crate) fn last(&self) -> u64 {
        if self.last_ms == 0 && self.counter == 0 {
            return 0;
        }
        (self.last_ms << (SHARD_BITS + COUNTER_BITS))
            | (self.shard << COUNTER_BITS)
            | self.counter.saturating_sub(1)
    }

    /// The next id, at wall-clock time `now_unix_ms`.
    pub(crate) fn next(&mut self, now_unix_ms: u64) -> u64 {
        let ms = now_unix_ms.saturating_sub(ID_EPOCH_MS);
        if ms > self.last_ms {
            self.last_ms = ms;
            self.counter = 0;
        }
        if self.counter >= 1 << COUNTER_BITS {
            self.last_ms += 1;
            self.counter = 0;
        }
        let id = (self.last_ms << (SHARD_BITS + COUNTER_BITS))
            | (self.shard << COUNTER_BITS)
            | self.counter;
        self.counter += 1;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn ids_increase_within_one_millisecond_and_across_the_counter_limit() {
        let mut g = MsgIdGen::new(3);
        let mut last = 0;
        for _ in 0..10_000 {
            let id = g.next(NOW);
            assert!(id > last);
            last = id;
        }
    }

    #[test]
    fn ids_keep_increasing_when_the_clock_steps_back() {
        let mut g = MsgIdGen::new(0);
        let a = g.next(NOW);
        let b = g.next(NOW - 5_000);
        assert!(b > a);
    }

    #[test]
    fn shards_never_issue_the_same_id() {
        let mut a = MsgIdGen::new(0);
        let mut b = MsgIdGen::new(1);
        assert_ne!(a.next(NOW), b.next(NOW));
    }

    #[test]
    fn after_observing_an_id_the_next_ones_are_larger() {
        let mut g = MsgIdGen::new(0);
        let seen = MsgIdGen::new(0).next(NOW + 60_000);
        g.observe(seen);
        assert!(g.next(NOW) > seen);
    }

    /// A conversation's ids come from its owner shard's one generator, seq by seq: they must
    /// strictly increase whatever the clock does, and across a restart (a new generator that
    /// observed the old ids, in whatever order start-up finds them).
    #[test]
    fn within_a_shard_ids_strictly_increase_even_when_the_clock_steps_back() {
        // The clock: steady, stalled, stepping back by a second, then by a minute, a burst past
        // the counter limit in one millisecond, a jump forward and back again.
        let mut clock: Vec<u64> = (0..50).map(|i| NOW + i).collect();
        clock.extend([NOW + 49; 20]);
        clock.extend((0..50).map(|i| NOW - 1_000 + i));
        clock.extend((0..50).map(|i| NOW - 60_000 + i * 7));
        clock.extend(std::iter::repeat_n(NOW + 60, 5_000));
        clock.extend([NOW + 10_000, NOW + 5, NOW + 10_000, NOW]);
        let mut g = MsgIdGen::new(7);
        let before: Vec<u64> = clock.iter().map(|&t| g.next(t)).collect();
        assert!(
            before.windows(2).all(|w| w[0] < w[1]),
            "one shard's ids strictly increase"
        );

        // A restart: the checkpoint's largest id, then a replayed tail that starts earlier (so
        // smaller ids of the same millisecond come after a larger one), in log order and shuffled.
        let last = *before.last().expect("ids");
        for order in [false, true] {
            let mut replay: Vec<u64> = before[before.len() - 3_000..].to_vec();
            if order {
                replay.reverse();
                replay.swap(0, 1_500);
            }
            let mut g = MsgIdGen::new(7);
            g.observe(last);
            for &id in &replay {
                g.observe(id);
            }
            assert_eq!(g.last(), last, "the largest observed id");
            let mut prev = last;
            for t in [NOW - 3_600_000, NOW, NOW + 10_000, NOW + 10_001] {
                let id = g.next(t);
                assert!(id > prev, "after a restart, ids go on above the log's");
                prev = id;
            }
        }
    }

    /// The cross-shard order is by millisecond only: documented in parley.proto (SendAck.msg_id).
    #[test]
    fn across_shards_ids_order_by_millisecond_and_within_one_by_shard_not_time() {
        let mut shard0 = MsgIdGen::new(0);
        let mut shard5 = MsgIdGen::new(5);
        let early = shard5.next(NOW);
        let later_same_ms = shard0.next(NOW);
        let next_ms = shard0.next(NOW + 1);
        assert!(
            next_ms > early && next_ms > later_same_ms,
            "an id of a later millisecond is larger, whichever shard issued it"
        );
        assert!(
            later_same_ms < early,
            "within one millisecond, shard 0's id sorts below shard 5's although it came later"
        );
    }
}
