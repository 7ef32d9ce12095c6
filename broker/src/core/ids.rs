//! Time-ordered unique message ids.
//!
//! Layout of a 64-bit id: 42 bits of milliseconds since 2025-01-01T00:00:00Z (until ~2164),
//! 10 bits of shard, 12 bits of a per-millisecond counter. A shard issues at most 4,096 ids per
//! millisecond; past that it borrows the next millisecond, so ids stay unique and increasing even
//! if the clock stalls or steps back. After a restart the generator resumes above the largest id
//! found in the log.

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

    /// Makes every later id larger than `id` (called with ids found in the log at start-up).
    pub(crate) fn observe(&mut self, id: u64) {
        let ms = id >> (SHARD_BITS + COUNTER_BITS);
        if ms >= self.last_ms {
            self.last_ms = ms;
            self.counter = (id & ((1 << COUNTER_BITS) - 1)) + 1;
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
}
