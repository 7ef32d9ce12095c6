//! The webhook counters: what was queued, delivered, retried, failed and dropped.
//!
//! Every count is of events, not of POSTs (a batch of 10 delivered counts 10). An event counted
//! `queued` ends as exactly one of `delivered`, `failed` or `dropped_shutdown` (or is still in
//! the queue or in flight); an event dropped because the queue was full was never queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::Receiver;

use super::event::Event;

/// The live counters, shared by the observers, the senders and the stats handle.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Events put in the queue.
    pub(crate) queued: AtomicU64,
    /// Events the endpoint accepted (a 2xx).
    pub(crate) delivered: AtomicU64,
    /// Event deliveries attempted again (an event retried twice counts 2).
    pub(crate) retried: AtomicU64,
    /// Events given up: a permanent answer, or no success after the last attempt.
    pub(crate) failed: AtomicU64,
    /// Events not queued because the queue was full.
    pub(crate) dropped_queue_full: AtomicU64,
    /// Events dropped by a shutdown: still queued or waiting for a retry when the drain time ran
    /// out, or observed after it began.
    pub(crate) dropped_shutdown: AtomicU64,
}

impl Counts {
    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A handle on the counters of a running [`super::Webhooks`], for `/metrics`.
#[derive(Debug, Clone)]
pub(crate) struct WebhookStats {
    /// The counters.
    counts: Arc<Counts>,
    /// The queue (only its length is read).
    queue: Receiver<Event>,
}

/// The counters at one moment (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WebhookCounts {
    /// Events put in the queue.
    pub(crate) queued: u64,
    /// Events the endpoint accepted.
    pub(crate) delivered: u64,
    /// Event deliveries attempted again.
    pub(crate) retried: u64,
    /// Events given up (permanent answer, or attempts exhausted).
    pub(crate) failed: u64,
    /// Events not queued because the queue was full.
    pub(crate) dropped_queue_full: u64,
    /// Events dropped by a shutdown.
    pub(crate) dropped_shutdown: u64,
    /// Events waiting in the queue now.
    pub(crate) queue_len: u64,
}

impl WebhookStats {
    /// A handle on `counts` and `queue`.
    pub(crate) fn new(counts: Arc<Counts>, queue: Receiver<Event>) -> Self {
        Self { counts, queue }
    }

    /// The counters now.
    pub(crate) fn snapshot(&self) -> WebhookCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counts;
        WebhookCounts {
            queued: get(&c.queued),
            delivered: get(&c.delivered),
            retried: get(&c.retried),
            failed: get(&c.failed),
            dropped_queue_full: get(&c.dropped_queue_full),
            dropped_shutdown: get(&c.dropped_shutdown),
            queue_len: self.queue.len() as u64,
        }
    }
}
