//! What a run measured: counters, latency histograms (hdrhistogram, nanoseconds) and the
//! checker's verdict, mergeable across processes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer as HistReader, Serializer as _, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::check::Verdict;

/// The longest latency recorded, nanoseconds (an hour); longer values are clamped.
pub const MAX_LATENCY_NS: u64 = 3_600_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits.
#[derive(Debug, Clone)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        // 1 ns .. 1 h at 3 significant digits is a valid configuration.
        Self(
            Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).unwrap_or_else(|_| {
                Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
            }),
        )
    }
}

impl Hist {
    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Hist) {
        // Both have the same bounds; `add` fails only on a bounds mismatch.
        let _ = self.0.add(&other.0);
    }

    /// The summary in microseconds.
    pub fn summary(&self) -> Summary {
        let h = &self.0;
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

impl Serialize for Hist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut buf)
            .map_err(|e| serde::ser::Error::custom(format!("histogram: {e:?}")))?;
        s.serialize_str(&STANDARD.encode(buf))
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = STANDARD
            .decode(text)
            .map_err(|e| serde::de::Error::custom(format!("histogram base64: {e}")))?;
        let h: Histogram<u64> = HistReader::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| serde::de::Error::custom(format!("histogram: {e:?}")))?;
        let mut out = Hist::default();
        out.0
            .add(&h)
            .map_err(|e| serde::de::Error::custom(format!("histogram bounds: {e:?}")))?;
        Ok(out)
    }
}

/// Percentiles of one histogram, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// How many were recorded.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// Everything one worker process counted; merged by adding.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Connections opened.
    pub conns: u64,
    /// Messages written.
    pub sent: u64,
    /// Sends the system acknowledged.
    pub acked: u64,
    /// Distinct messages that arrived (each receiver counts its own copy).
    pub delivered: u64,
    /// Deliveries that arrived inside the measurement window.
    pub delivered_measured: u64,
    /// Errors: reported by the system, protocol violations, connections lost or refused.
    pub errors: u64,
    /// The first few error texts.
    pub error_samples: Vec<String>,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Send → ack latency.
    pub ack: Hist,
    /// Send → deliver (end to end) latency, measured from the intended send time.
    pub e2e: Hist,
    /// TCP connect latency.
    pub connect: Hist,
    /// Connected → logged in (ready) latency.
    pub login: Hist,
    /// Per-client offline catch-up time (login → sync done).
    pub sync: Hist,
    /// Longest phase time of this worker for scenarios timed as a whole (storm: all
    /// connections up; offline: all receivers synced), nanoseconds.
    pub phase_ns: u64,
    /// Messages carried by the offline catch-up (groups: by the final sync, i.e. the ones live
    /// push had not brought).
    pub synced_messages: u64,
    /// Groups: membership changes made during the run (not counting the set-up).
    #[serde(default)]
    pub membership_changes: u64,
    /// Groups: `Behind`s received (live push paused; the member caught up by sync).
    #[serde(default)]
    pub behind: u64,
    /// The first few violations the checker found, described (groups: which member lacks or
    /// holds which seqs).
    #[serde(default)]
    pub violation_samples: Vec<String>,
    /// UDP: `Send`s sent again because their ack did not come in time.
    #[serde(default)]
    pub udp_resent: u64,
    /// UDP: datagrams dropped unread (forged, replayed, late answers to a LOGIN sent twice).
    #[serde(default)]
    pub udp_dropped: u64,
}

/// How many error texts are kept.
pub const ERROR_SAMPLES: usize = 5;

impl Tally {
    /// Counts an error, keeping its text if few are kept so far.
    pub fn error(&mut self, text: impl Into<String>) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(text.into());
        }
    }

    /// Adds another worker's tally.
    pub fn merge(&mut self, o: &Tally) {
        self.conns += o.conns;
        self.sent += o.sent;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.delivered_measured += o.delivered_measured;
        self.errors += o.errors;
        for e in &o.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES {
                self.error_samples.push(e.clone());
            }
        }
        self.verdict.merge(&o.verdict);
        self.ack.merge(&o.ack);
        self.e2e.merge(&o.e2e);
        self.connect.merge(&o.connect);
        self.login.merge(&o.login);
        self.sync.merge(&o.sync);
        self.phase_ns = self.phase_ns.max(o.phase_ns);
        self.synced_messages += o.synced_messages;
        self.membership_changes += o.membership_changes;
        self.behind += o.behind;
        self.udp_resent += o.udp_resent;
        self.udp_dropped += o.udp_dropped;
        for v in &o.violation_samples {
            if self.violation_samples.len() < ERROR_SAMPLES {
                self.violation_samples.push(v.clone());
            }
        }
    }
}

/// A worker's once-a-second progress, cumulative.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Connections ready.
    pub ready: u64,
    /// Messages written.
    pub sent: u64,
    /// Sends acknowledged.
    pub acked: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Errors.
    pub errors: u64,
    /// p99 send → deliver over the last second, microseconds.
    pub p99_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_survives_json_and_merges() {
        let mut h = Hist::default();
        for v in [1_000, 2_000, 1_000_000] {
            h.record(v);
        }
        let json = serde_json::to_string(&h).expect("serializes");
        let mut back: Hist = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.0.len(), 3);
        back.merge(&h);
        assert_eq!(back.0.len(), 6);
        assert!((back.summary().max_us - 1000.0).abs() < 1.0);
    }

    #[test]
    fn tallies_merge_by_adding() {
        let mut a = Tally {
            sent: 3,
            ..Tally::default()
        };
        a.error("x");
        let b = Tally {
            sent: 4,
            phase_ns: 9,
            ..Tally::default()
        };
        a.merge(&b);
        assert_eq!((a.sent, a.errors, a.phase_ns), (7, 1, 9));
    }
}
