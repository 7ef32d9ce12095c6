//! Latency histograms a shard keeps: fixed, log-spaced buckets of integer microseconds, recorded
//! on the hot path with no allocation and no clock (the caller passes the duration in), read as a
//! copy by the driver with the counters, and merged into node totals by the admin listener.
//!
//! ### Buckets
//! Two per octave: the upper bounds (inclusive, like Prometheus's `le`) are 64 µs, then
//! `1.5·2^k` and `2^(k+1)` µs for `k` = 6..=23, so 96 µs, 128 µs, 192 µs, … 12.6 s, 16.8 s, then
//! +Inf: [`BUCKETS`] counters. A value's bucket is found from its leading bit and the bit after
//! it (a handful of instructions, no search); a bucket is at most 50% wider than the one below,
//! so a quantile read from the buckets is off by at most that much (less with interpolation).

/// Number of buckets of a [`Histogram`], the last one +Inf.
pub const BUCKETS: usize = 38;

/// The upper bound of the first bucket, µs (2^[`FIRST_EXP`]).
const FIRST_BOUND_US: u64 = 1 << FIRST_EXP;

/// The exponent of the first bucket's upper bound.
const FIRST_EXP: u32 = 6;

/// A histogram of durations in µs over the fixed buckets described in the module documentation.
///
/// Recording is an index computation and two additions; the struct is plain data (copied to
/// publish it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Histogram {
    /// Values per bucket (not cumulative), the last bucket +Inf.
    counts: [u64; BUCKETS],
    /// Sum of the values recorded, µs (saturating).
    sum_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            sum_us: 0,
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .field("sum_us", &self.sum_us)
            .field("p50_us", &self.quantile_us(0.5))
            .field("p99_us", &self.quantile_us(0.99))
            .finish()
    }
}

impl Histogram {
    /// Records one duration of `us` microseconds.
    #[inline]
    pub fn record(&mut self, us: u64) {
        if let Some(c) = self.counts.get_mut(bucket_of(us)) {
            *c += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Adds `other`'s values into `self` (for node totals).
    pub fn merge(&mut self, other: &Histogram) {
        for (c, o) in self.counts.iter_mut().zip(other.counts.iter()) {
            *c += o;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of the values recorded, µs.
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// Each bucket as (its upper bound in µs, inclusive, `f64::INFINITY` for the last; the
    /// number of values in it, not cumulative), in ascending order.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &c)| (upper_bound_us(i).map_or(f64::INFINITY, |b| b as f64), c))
    }

    /// The `q`-quantile (0..=1) of the values recorded, in µs, estimated from the buckets as
    /// [`quantile`] does; `None` if nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let buckets: [(f64, u64); BUCKETS] = std::array::from_fn(|i| {
            (
                upper_bound_us(i).map_or(f64::INFINITY, |b| b as f64),
                self.counts[i],
            )
        });
        quantile(&buckets, q)
    }
}

/// The `q`-quantile (0..=1) of a histogram given as `buckets`: (upper bound, inclusive; the
/// number of values in the bucket, not cumulative), bounds ascending, the last may be
/// `f64::INFINITY`. `None` if the buckets hold nothing or `q` is not in 0..=1.
///
/// Like Prometheus's `histogram_quantile`, it interpolates linearly inside the bucket the
/// quantile falls in, from the bucket below's bound (0 for the first) to its own (values are
/// taken as spread evenly across a bucket); in the +Inf bucket it answers the largest finite
/// bound.
pub fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    if !(0.0..=1.0).contains(&q) {
        return None;
    }
    let total: u64 = buckets.iter().map(|b| b.1).sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for &(upper, count) in buckets {
        let through = below + count;
        if count > 0 && through as f64 >= rank {
            if upper.is_infinite() {
                return Some(lower);
            }
            let into = (rank - below as f64) / count as f64;
            return Some(lower + (upper - lower) * into.clamp(0.0, 1.0));
        }
        below = through;
        if upper.is_finite() {
            lower = upper;
        }
    }
    Some(lower)
}

/// The bucket of a duration of `us` µs.
#[inline]
fn bucket_of(us: u64) -> usize {
    if us <= FIRST_BOUND_US {
        return 0;
    }
    // Bounds are inclusive: `us` in (2^k, 1.5·2^k] or (1.5·2^k, 2^(k+1)] is `us - 1` in
    // [2^k, 1.5·2^k) or [1.5·2^k, 2^(k+1)): its leading bit k and the bit after it.
    let w = us - 1;
    let k = 63 - w.leading_zeros();
    let half = (w >> (k - 1)) & 1;
    let i = 1 + 2 * (k - FIRST_EXP) as usize + half as usize;
    i.min(BUCKETS - 1)
}

/// The inclusive upper bound of bucket `i`, µs (`None`: the +Inf bucket, or no such bucket).
pub fn upper_bound_us(i: usize) -> Option<u64> {
    match i {
        0 => Some(FIRST_BOUND_US),
        i if i < BUCKETS - 1 => {
            let k = FIRST_EXP + ((i - 1) / 2) as u32;
            Some(if (i - 1) % 2 == 0 {
                3 << (k - 1)
            } else {
                1 << (k + 1)
            })
        }
        _ => None,
    }
}

/// A shard's latency histograms, published with its [`super::Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latencies {
    /// Send to live delivery: from the driver turn in which a send arrived at its sender's shard
    /// to the turn in which its delivery frame was queued for a recipient's live connection
    /// (the home shard's live push), once per connection pushed. Both ends are the node's
    /// monotonic clock (one per node, shared by its shards) as the driver read it at the start
    /// of the turn, so work inside those turns is not seen and a send stored and pushed in the
    /// same turn counts 0. Only live pushes are counted: retransmits, sync and history pages,
    /// pushes withheld (a connection behind or syncing, which then catches up by sync) and group
    /// membership events (not sends) are not.
    pub send_to_deliver: Histogram,
    /// Log flushes: how long each flush the flusher thread ran took (the `fsync`, measured by
    /// the driver around it; not the wait for the flusher, not the release that follows).
    pub flush: Histogram,
}

impl Latencies {
    /// Adds `other` into `self` (for node totals).
    pub fn add(&mut self, other: &Latencies) {
        self.send_to_deliver.merge(&other.send_to_deliver);
        self.flush.merge(&other.flush);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounds_are_two_per_octave_from_64_us_to_16_s_then_inf() {
        let bounds: Vec<u64> = (0..BUCKETS).filter_map(upper_bound_us).collect();
        assert_eq!(bounds.len(), BUCKETS - 1);
        assert_eq!(&bounds[..5], &[64, 96, 128, 192, 256]);
        assert_eq!(bounds.last(), Some(&(1 << 24)));
        assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(upper_bound_us(BUCKETS - 1), None);
        assert_eq!(upper_bound_us(BUCKETS), None);
    }

    #[test]
    fn a_value_lands_in_the_first_bucket_whose_inclusive_bound_holds_it() {
        for us in (0..70_000).chain([1 << 24, (1 << 24) + 1, u64::MAX]) {
            let i = bucket_of(us);
            let expected = (0..BUCKETS)
                .find(|&j| upper_bound_us(j).is_none_or(|b| us <= b))
                .unwrap_or(BUCKETS - 1);
            assert_eq!(i, expected, "{us} µs");
        }
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(64), 0);
        assert_eq!(bucket_of(65), 1);
        assert_eq!(bucket_of(96), 1);
        assert_eq!(bucket_of(97), 2);
        assert_eq!(bucket_of(1 << 24), BUCKETS - 2);
        assert_eq!(bucket_of((1 << 24) + 1), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn count_sum_and_buckets_follow_the_records() {
        let mut h = Histogram::default();
        assert_eq!((h.count(), h.sum_us(), h.quantile_us(0.5)), (0, 0, None));
        for us in [10, 100, 100, 5_000] {
            h.record(us);
        }
        assert_eq!((h.count(), h.sum_us()), (4, 5_210));
        let nonzero: Vec<(f64, u64)> = h.buckets().filter(|b| b.1 > 0).collect();
        assert_eq!(nonzero, vec![(64.0, 1), (128.0, 2), (6144.0, 1)]);
        assert_eq!(h.buckets().count(), BUCKETS);
        assert_eq!(h.buckets().last(), Some((f64::INFINITY, 0)));
    }

    #[test]
    fn quantiles_interpolate_inside_a_bucket_and_stop_at_the_largest_finite_bound() {
        // 100 values in (0, 64], 100 in (64, 96]: the median is the first bucket's bound.
        let b = [(64.0, 100), (96.0, 100), (f64::INFINITY, 0)];
        assert_eq!(quantile(&b, 0.5), Some(64.0));
        assert_eq!(quantile(&b, 0.25), Some(32.0));
        assert_eq!(quantile(&b, 0.75), Some(80.0));
        assert_eq!(quantile(&b, 1.0), Some(96.0));
        // Empty buckets are skipped, whatever q.
        let b = [(64.0, 0), (96.0, 4), (128.0, 0)];
        assert_eq!(quantile(&b, 0.0), Some(64.0));
        // The +Inf bucket answers the largest finite bound.
        let b = [(64.0, 1), (96.0, 0), (f64::INFINITY, 9)];
        assert_eq!(quantile(&b, 0.99), Some(96.0));
        assert_eq!(quantile(&[(64.0, 0), (f64::INFINITY, 0)], 0.5), None);
        assert_eq!(quantile(&b, 1.5), None);
        assert_eq!(quantile(&b, f64::NAN), None);
    }

    #[test]
    fn a_quantile_falls_in_the_bucket_of_the_exact_value() {
        let mut h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record(us);
        }
        for (q, exact) in [(0.5, 5_000u64), (0.9, 9_000), (0.99, 9_900)] {
            let est = h.quantile_us(q).expect("values recorded");
            let i = bucket_of(exact);
            let lower = i.checked_sub(1).and_then(upper_bound_us).unwrap_or(0) as f64;
            let upper = upper_bound_us(i).map_or(f64::INFINITY, |b| b as f64);
            assert!(
                lower <= est && est <= upper,
                "q{q}: {est} outside ({lower}, {upper}], the bucket of {exact}"
            );
        }
        assert_eq!(
            h.quantile_us(0.5),
            Some(5_000.0),
            "uniform in its bucket: exact"
        );
    }

    #[test]
    fn merged_histograms_hold_both_sets_of_values() {
        let (mut a, mut b, mut both) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for us in [1, 500, 70_000] {
            a.record(us);
            both.record(us);
        }
        for us in [3, 40_000_000] {
            b.record(us);
            both.record(us);
        }
        let mut merged = a;
        merged.merge(&b);
        assert_eq!(merged, both);
        assert_eq!(merged.count(), 5);
        let mut l = Latencies::default();
        l.add(&Latencies {
            send_to_deliver: a,
            flush: b,
        });
        assert_eq!((l.send_to_deliver, l.flush), (a, b));
    }
}
