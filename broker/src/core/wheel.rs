//! A hierarchical timing wheel on integer ticks: O(1) insert and cancel, and the next expiry known
//! without a scan.
//!
//! Each shard owns one wheel for retransmits, heartbeats, idle and handshake timeouts and presence
//! TTLs. The wheel knows nothing of clocks: the driver converts time to ticks (rounding deadlines
//! *up*, so a timer never fires early) and passes `now` in, which keeps every timeout test
//! deterministic and instant.
//!
//! The design follows tokio's timer wheel (`runtime/time/wheel`): [`LEVELS`] levels of 64 slots;
//! level `l` slot `s` covers ticks `[s * 64^l, (s + 1) * 64^l)` of the current level range; an entry
//! goes to the lowest level whose range separates its deadline from the wheel's elapsed tick, and
//! cascades down as time passes. Each level keeps an `occupied` bit mask, so the next expiry is a
//! rotate and a trailing-zeros count per level. Entries live in a slab and each slot is a doubly
//! linked list of slab indices, so cancel is O(1) and no `unsafe` is needed.
//!
//! ### Invariants
//! * Every live entry is in exactly one list: a wheel slot, or the `ready` list when its deadline
//!   is at or before `elapsed`.
//! * An entry in level `l`, slot `s` has `deadline > elapsed` and `level_for(elapsed, deadline)
//!   == l`, `slot_for(deadline, l) == s` (checked by `debug_assert!` on insert).
//! * Bit `s` of `levels[l].occupied` is set iff slot `s` of level `l` is non-empty.
//! * `elapsed` never decreases.

use std::fmt;

/// Number of levels. 6 levels of 64 slots span 64^6 ticks (over 2 years at 1 ms per tick);
/// a deadline further out is clamped to that horizon.
pub(crate) const LEVELS: usize = 6;
const SLOTS: usize = 64;
const SLOT_BITS: u32 = 6;
const SLOT_MASK: u64 = (SLOTS as u64) - 1;
/// The furthest a deadline may lie beyond the current tick; later deadlines are clamped to it.
pub(crate) const MAX_TICKS: u64 = (1 << (SLOT_BITS as usize * LEVELS)) - 1;
const NIL: u32 = u32::MAX;

/// Identifies a scheduled timer so it can be cancelled. Stale keys (of timers already fired or
/// cancelled) are recognised by a generation counter and ignored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct TimerKey {
    index: u32,
    generation: u32,
}

/// Where an entry currently lives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    Free,
    Ready,
    Slot { level: u8, slot: u8 },
}

#[derive(Debug)]
struct Entry<T> {
    deadline: u64,
    generation: u32,
    place: Place,
    prev: u32,
    next: u32,
    value: Option<T>,
}

#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
    };
}

#[derive(Debug)]
struct Level {
    slots: [List; SLOTS],
    occupied: u64,
}

/// A hierarchical timing wheel holding values of type `T` until their deadline tick.
pub(crate) struct TimerWheel<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    levels: [Level; LEVELS],
    ready: List,
    elapsed: u64,
    len: usize,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("elapsed", &self.elapsed)
            .field("len", &self.len)
            .finish()
    }
}

impl<T> Default for TimerWheel<T> {
    fn default() -> Self {
        Self::new(0)
    }
}

/// The level an entry due at `deadline` belongs to when the wheel has reached `elapsed`.
fn level_for(elapsed: u64, deadline: u64) -> usize {
    // The highest bit in which the two differ decides the level; the low slot bits are forced so
    // that deadlines within the current 64 ticks land on level 0.
    let mut masked = (elapsed ^ deadline) | SLOT_MASK;
    if masked >= MAX_TICKS {
        masked = MAX_TICKS - 1;
    }
    let significant = 63 - masked.leading_zeros() as usize;
    significant / SLOT_BITS as usize
}

/// The slot of `deadline` within `level`.
fn slot_for(deadline: u64, level: usize) -> usize {
    ((deadline >> (level as u32 * SLOT_BITS)) & SLOT_MASK) as usize
}

/// Ticks covered by one slot of `level`.
fn slot_range(level: usize) -> u64 {
    1u64 << (level as u32 * SLOT_BITS)
}

/// Ticks covered by all slots of `level`.
fn level_range(level: usize) -> u64 {
    slot_range(level) << SLOT_BITS
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose current tick is `now`.
    pub(crate) fn new(now: u64) -> Self {
        Self {
            entries: Vec::new(),
            free: Vec::new(),
            levels: std::array::from_fn(|_| Level {
                slots: [List::EMPTY; SLOTS],
                occupied: 0,
            }),
            ready: List::EMPTY,
            elapsed: now,
            len: 0,
        }
    }

    /// Number of scheduled timers.
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// True if no timer is scheduled.
    #[allow(dead_code)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tick the wheel has advanced to.
    #[allow(dead_code)]
    pub(crate) fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// Schedules `value` to fire at tick `deadline`. A deadline at or before the current tick fires
    /// at the next [`poll`](Self::poll); one more than [`MAX_TICKS`] ahead is clamped.
    pub(crate) fn insert(&mut self, deadline: u64, value: T) -> TimerKey {
        let deadline = deadline.min(self.elapsed.saturating_add(MAX_TICKS));
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = self.entries.len() as u32;
                assert!(i != NIL, "timer wheel is full (u32::MAX timers)");
                self.entries.push(Entry {
                    deadline: 0,
                    generation: 0,
                    place: Place::Free,
                    prev: NIL,
                    next: NIL,
                    value: None,
                });
                i
            }
        };
        let entry = &mut self.entries[index as usize];
        debug_assert_eq!(entry.place, Place::Free);
        entry.deadline = deadline;
        entry.value = Some(value);
        let generation = entry.generation;
        self.len += 1;
        self.place(index);
        TimerKey { index, generation }
    }

    /// Cancels a timer, returning its value, or `None` if it already fired or was cancelled.
    pub(crate) fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let entry = self.entries.get(key.index as usize)?;
        if entry.generation != key.generation || entry.place == Place::Free {
            return None;
        }
        self.unlink(key.index);
        Some(self.release(key.index))
    }

    /// The deadline of a scheduled timer, or `None` if it already fired or was cancelled.
    pub(crate) fn deadline(&self, key: TimerKey) -> Option<u64> {
        let entry = self.entries.get(key.index as usize)?;
        (entry.generation == key.generation && entry.place != Place::Free).then_some(entry.deadline)
    }

    /// The earliest tick at which [`poll`](Self::poll) may return a timer, or `None` if none is
    /// scheduled. This is a lower bound that costs no scan: at a higher level it is the start of
    /// the earliest occupied slot, where the entries cascade down.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        if self.ready.head != NIL {
            return Some(self.elapsed);
        }
        (0..LEVELS)
            .filter_map(|level| self.next_expiration(level))
            .min()
    }

    /// Advances the wheel to tick `now` and returns the next timer due at or before it, with its
    /// key, or `None` when no more are due. Call repeatedly until `None`. Timers come out in
    /// deadline order, except that timers sharing a level-0 slot come out in insertion order.
    pub(crate) fn poll(&mut self, now: u64) -> Option<(TimerKey, T)> {
        loop {
            let index = self.ready.head;
            if index != NIL {
                self.unlink(index);
                let generation = self.entries[index as usize].generation;
                let value = self.release(index);
                return Some((TimerKey { index, generation }, value));
            }
            let (level, deadline) = (0..LEVELS)
                .filter_map(|level| self.next_expiration(level).map(|d| (level, d)))
                .min_by_key(|&(_, d)| d)?;
            if deadline > now {
                self.elapsed = self.elapsed.max(now);
                return None;
            }
            self.process_slot(level, deadline);
        }
    }

    /// The start tick of the earliest occupied slot of `level`, if any.
    fn next_expiration(&self, level: usize) -> Option<u64> {
        let occupied = self.levels[level].occupied;
        if occupied == 0 {
            return None;
        }
        let now_slot = ((self.elapsed / slot_range(level)) & SLOT_MASK) as u32;
        let zeros = occupied.rotate_right(now_slot).trailing_zeros();
        let slot = (zeros + now_slot) as u64 & SLOT_MASK;
        let level_start = self.elapsed & !(level_range(level) - 1);
        let mut deadline = level_start + slot * slot_range(level);
        if deadline < self.elapsed {
            // Only the top level can hold a slot "behind" the current one (a clamped deadline
            // wrapped around); it belongs to the next turn of that level.
            deadline += level_range(level);
        }
        Some(deadline)
    }

    /// Moves every entry of the slot of `level` starting at `deadline` to where it now belongs
    /// (the ready list, or a lower level), advancing `elapsed` to `deadline`.
    fn process_slot(&mut self, level: usize, deadline: u64) {
        debug_assert!(deadline >= self.elapsed);
        self.elapsed = deadline;
        let slot = slot_for(deadline, level);
        let list = std::mem::replace(&mut self.levels[level].slots[slot], List::EMPTY);
        self.levels[level].occupied &= !(1u64 << slot);
        let mut index = list.head;
        while index != NIL {
            let next = self.entries[index as usize].next;
            let entry = &mut self.entries[index as usize];
            entry.prev = NIL;
            entry.next = NIL;
            self.place(index);
            index = next;
        }
    }

    /// Links a detached entry into the list its deadline belongs to.
    fn place(&mut self, index: u32) {
        let deadline = self.entries[index as usize].deadline;
        let place = if deadline <= self.elapsed {
            Place::Ready
        } else {
            let level = level_for(self.elapsed, deadline);
            let slot = slot_for(deadline, level);
            debug_assert!(level < LEVELS);
            Place::Slot {
                level: level as u8,
                slot: slot as u8,
            }
        };
        self.entries[index as usize].place = place;
        let list = match place {
            Place::Ready => &mut self.ready,
            Place::Slot { level, slot } => {
                let lvl = &mut self.levels[level as usize];
                lvl.occupied |= 1u64 << slot;
                &mut lvl.slots[slot as usize]
            }
            Place::Free => unreachable!("place() computes Ready or Slot"),
        };
        let tail = list.tail;
        if tail == NIL {
            list.head = index;
        }
        list.tail = index;
        if tail != NIL {
            self.entries[tail as usize].next = index;
        }
        let entry = &mut self.entries[index as usize];
        entry.prev = tail;
        entry.next = NIL;
    }

    /// Removes a linked entry from its list, keeping the entry itself.
    fn unlink(&mut self, index: u32) {
        let (place, prev, next) = {
            let e = &self.entries[index as usize];
            (e.place, e.prev, e.next)
        };
        if prev != NIL {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        match place {
            Place::Ready => {
                if self.ready.head == index {
                    self.ready.head = next;
                }
                if self.ready.tail == index {
                    self.ready.tail = prev;
                }
            }
            Place::Slot { level, slot } => {
                let lvl = &mut self.levels[level as usize];
                let list = &mut lvl.slots[slot as usize];
                if list.head == index {
                    list.head = next;
                }
                if list.tail == index {
                    list.tail = prev;
                }
                if list.head == NIL {
                    lvl.occupied &= !(1u64 << slot);
                }
            }
            Place::Free => debug_assert!(false, "unlink of a free entry"),
        }
        let e = &mut self.entries[index as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    /// Frees an unlinked entry and returns its value.
    fn release(&mut self, index: u32) -> T {
        let e = &mut self.entries[index as usize];
        e.place = Place::Free;
        e.generation = e.generation.wrapping_add(1);
        self.free.push(index);
        self.len -= 1;
        e.value
            .take()
            .expect("a linked timer entry always holds its value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(wheel: &mut TimerWheel<u64>, now: u64) -> Vec<u64> {
        std::iter::from_fn(|| wheel.poll(now).map(|(_, v)| v)).collect()
    }

    #[test]
    fn level_maths_places_near_deadlines_on_level_zero() {
        assert_eq!(level_for(0, 1), 0);
        assert_eq!(level_for(0, 63), 0);
        assert_eq!(level_for(0, 64), 1);
        assert_eq!(level_for(0, 64 * 64 - 1), 1);
        assert_eq!(level_for(0, 64 * 64), 2);
        assert_eq!(level_for(63, 64), 1);
        assert_eq!(level_for(64, 127), 0);
        assert_eq!(level_for(0, MAX_TICKS + 100), LEVELS - 1);
        assert_eq!(slot_for(130, 0), 2);
        assert_eq!(slot_for(130, 1), 2);
    }

    #[test]
    fn timer_fires_at_its_deadline_and_not_before() {
        let mut w = TimerWheel::new(0);
        w.insert(100, 7);
        assert_eq!(drain(&mut w, 99), Vec::<u64>::new());
        assert_eq!(drain(&mut w, 100), vec![7]);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadline_fires_on_next_poll() {
        let mut w = TimerWheel::new(50);
        w.insert(10, 1);
        assert_eq!(w.next_deadline(), Some(50));
        assert_eq!(drain(&mut w, 50), vec![1]);
    }

    #[test]
    fn timers_fire_in_deadline_order_across_levels() {
        let mut w = TimerWheel::new(0);
        let deadlines = [5_000_000u64, 3, 70, 4097, 64, 1, 262_144, 999];
        for &d in &deadlines {
            w.insert(d, d);
        }
        let mut fired = Vec::new();
        let mut now = 0;
        while let Some(next) = w.next_deadline() {
            now = now.max(next);
            fired.extend(drain(&mut w, now));
            now += 1;
        }
        let mut expected = deadlines.to_vec();
        expected.sort_unstable();
        assert_eq!(fired, expected);
    }

    #[test]
    fn one_big_jump_fires_everything_due_in_order() {
        let mut w = TimerWheel::new(0);
        for d in [900u64, 5, 64 * 64 * 3, 64, 300] {
            w.insert(d, d);
        }
        assert_eq!(drain(&mut w, 1_000_000), vec![5, 64, 300, 900, 64 * 64 * 3]);
    }

    #[test]
    fn cancel_removes_the_timer_and_returns_its_value() {
        let mut w = TimerWheel::new(0);
        let a = w.insert(10, 1);
        let b = w.insert(10, 2);
        let c = w.insert(10, 3);
        assert_eq!(w.cancel(b), Some(2));
        assert_eq!(w.len(), 2);
        assert_eq!(drain(&mut w, 10), vec![1, 3]);
        assert_eq!(w.cancel(a), None, "fired timers cannot be cancelled");
        assert_eq!(w.cancel(c), None);
    }

    #[test]
    fn stale_key_does_not_cancel_a_reused_slot() {
        let mut w = TimerWheel::new(0);
        let old = w.insert(10, 1);
        assert_eq!(w.cancel(old), Some(1));
        let new = w.insert(20, 2);
        assert_eq!(new.index, old.index, "the slab slot is reused");
        assert_eq!(w.cancel(old), None);
        assert_eq!(w.deadline(new), Some(20));
    }

    #[test]
    fn cancelling_the_last_entry_clears_the_occupied_bit() {
        let mut w = TimerWheel::new(0);
        let k = w.insert(5000, 1);
        assert!(w.next_deadline().is_some());
        w.cancel(k);
        assert_eq!(w.next_deadline(), None);
        assert_eq!(drain(&mut w, u64::MAX / 2), Vec::<u64>::new());
    }

    #[test]
    fn next_deadline_is_a_lower_bound_that_reaches_the_exact_tick() {
        let mut w = TimerWheel::new(0);
        w.insert(10_000, 1);
        let mut wakeups = 0;
        loop {
            let now = w.next_deadline().expect("timer pending");
            assert!(now <= 10_000);
            wakeups += 1;
            if let Some((_, v)) = w.poll(now) {
                assert_eq!(v, 1);
                assert_eq!(now, 10_000);
                break;
            }
        }
        assert!(
            wakeups <= LEVELS + 1,
            "cascading costs at most one wake-up per level"
        );
    }

    #[test]
    fn far_deadlines_are_clamped_to_the_horizon() {
        let mut w = TimerWheel::new(0);
        let k = w.insert(u64::MAX, 1);
        assert_eq!(w.deadline(k), Some(MAX_TICKS));
        assert_eq!(drain(&mut w, MAX_TICKS - 1), Vec::<u64>::new());
        assert_eq!(drain(&mut w, MAX_TICKS), vec![1]);
    }

    #[test]
    fn matches_a_sorted_model_under_random_operations() {
        // A small deterministic generator keeps this test free of extra dependencies.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut w = TimerWheel::new(0);
        let mut model: Vec<(u64, u64, TimerKey)> = Vec::new();
        let mut now = 0u64;
        for id in 0..20_000u64 {
            match rand() % 4 {
                0 | 1 => {
                    let span = [64, 4096, 300_000][(rand() % 3) as usize];
                    let d = now + rand() % span;
                    let k = w.insert(d, id);
                    model.push((d, id, k));
                }
                2 if !model.is_empty() => {
                    let i = (rand() as usize) % model.len();
                    let (_, id, k) = model.swap_remove(i);
                    assert_eq!(w.cancel(k), Some(id));
                }
                _ => {
                    now += rand() % 2000;
                    let mut fired = drain(&mut w, now);
                    let mut due: Vec<u64> = model
                        .iter()
                        .filter(|(d, _, _)| *d <= now)
                        .map(|(_, id, _)| *id)
                        .collect();
                    model.retain(|(d, _, _)| *d > now);
                    fired.sort_unstable();
                    due.sort_unstable();
                    assert_eq!(fired, due, "at tick {now}");
                }
            }
            assert_eq!(w.len(), model.len());
        }
    }
}
