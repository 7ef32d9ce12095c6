//! The outbox: every send not yet acknowledged, in the order the application made them.
//!
//! A send stays in the outbox until its `SendAck` (or a refusal that retrying cannot cure).
//! On every new connection, once logged in, the whole outbox is sent again in order with the
//! SAME client message ids: the server stores each (user, device, client_msg_id) once and
//! answers a retry with the original ack, so a message whose ack was lost with the connection is
//! not stored twice. A send refused for a passing reason (RATE_LIMITED, STORAGE_FAILURE,
//! INTERNAL, SHUTTING_DOWN) waits `retry_after_ms` (at least [`MIN_RETRY`]) and is sent again;
//! a later send may then be stored before it.
//!
//! Over a transport that loses datagrams (UDP), a send whose answer has not come within a
//! [`RetryConfig`] timeout is sent again on the same connection, with the same id, the timeout
//! doubling up to its maximum: [`Outbox::expire`]. (Then too a later send may be stored first.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parley_proto::pb;

use crate::session::RetryConfig;

/// The shortest wait before a send refused for a passing reason is tried again.
pub const MIN_RETRY: Duration = Duration::from_millis(100);

/// One unacknowledged send.
#[derive(Debug, Clone)]
struct Entry {
    /// The Send frame's body.
    send: pb::Send,
    /// Sent on the current connection (awaiting its answer).
    sent: bool,
    /// Not to be sent again before this time (after a passing refusal).
    not_before: Option<Instant>,
    /// When it was last sent on this connection (None: sent, time not known yet, see
    /// [`Outbox::stamp`]).
    sent_at: Option<Instant>,
    /// How often it was sent on this connection (for the retry back-off).
    tries: u32,
}

/// The unacknowledged sends, by order of creation.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Insertion order -> entry.
    entries: BTreeMap<u64, Entry>,
    /// client_msg_id -> insertion order.
    by_id: std::collections::HashMap<u64, u64>,
    /// The next insertion order.
    order: u64,
}

impl Outbox {
    /// Adds `send` (its `client_msg_id` set), not sent yet.
    pub fn push(&mut self, send: pb::Send) {
        let order = self.order;
        self.order += 1;
        self.by_id.insert(send.client_msg_id, order);
        self.entries.insert(
            order,
            Entry {
                send,
                sent: false,
                not_before: None,
                sent_at: None,
                tries: 0,
            },
        );
    }

    /// The sends to transmit now, in order, marking them sent: those not sent on this
    /// connection and not waiting for a retry time after `now`.
    /// `stamp` is the time they go out, if known (else [`Outbox::stamp`] sets it later).
    pub fn due(&mut self, now: Instant, stamp: Option<Instant>) -> Vec<pb::Send> {
        self.entries
            .values_mut()
            .filter(|e| !e.sent && e.not_before.is_none_or(|t| t <= now))
            .map(|e| {
                e.sent = true;
                e.not_before = None;
                e.sent_at = stamp;
                e.tries = e.tries.saturating_add(1);
                e.send.clone()
            })
            .collect()
    }

    /// The sends that went out without a known time went out at `now`.
    ///
    /// ```
    /// use parley_client::{outbox::Outbox, pb};
    /// let now = std::time::Instant::now();
    /// let mut o = Outbox::default();
    /// o.push(pb::Send { client_msg_id: 7, ..Default::default() });
    /// o.due(now, None);
    /// assert!(o.unstamped());
    /// o.stamp(now);
    /// assert!(!o.unstamped());
    /// ```
    pub fn stamp(&mut self, now: Instant) {
        for e in self.entries.values_mut().filter(|e| e.sent) {
            e.sent_at.get_or_insert(now);
        }
    }

    /// Whether a send went out without a known time (see [`Outbox::stamp`] for an example).
    pub fn unstamped(&self) -> bool {
        self.entries.values().any(|e| e.sent && e.sent_at.is_none())
    }

    /// Sends unanswered for their retry timeout at `now` are due again (same id); returns how
    /// many.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use parley_client::{RetryConfig, outbox::Outbox, pb};
    /// let (now, retry) = (Instant::now(), RetryConfig::default());
    /// let mut o = Outbox::default();
    /// o.push(pb::Send { client_msg_id: 7, ..Default::default() });
    /// o.due(now, Some(now));
    /// assert_eq!(o.next_expiry(&retry), Some(now + retry.initial));
    /// assert_eq!(o.expire(now + retry.initial, &retry), 1);
    /// assert_eq!(o.due(now + retry.initial, None)[0].client_msg_id, 7);
    /// ```
    pub fn expire(&mut self, now: Instant, retry: &RetryConfig) -> usize {
        let mut n = 0;
        for e in self.entries.values_mut().filter(|e| e.sent) {
            if e.sent_at.is_some_and(|t| now >= t + retry.delay(e.tries)) {
                e.sent = false;
                e.sent_at = None;
                n += 1;
            }
        }
        n
    }

    /// When the earliest unanswered send times out (see [`Outbox::expire`] for an example).
    pub fn next_expiry(&self, retry: &RetryConfig) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.sent)
            .filter_map(|e| e.sent_at.map(|t| t + retry.delay(e.tries)))
            .min()
    }

    /// A new connection: everything is to be sent again.
    pub fn reset(&mut self) {
        for e in self.entries.values_mut() {
            e.sent = false;
            e.sent_at = None;
            e.tries = 0;
        }
    }

    /// Removes and returns the send with `client_msg_id`, if still there.
    pub fn remove(&mut self, client_msg_id: u64) -> Option<pb::Send> {
        let order = self.by_id.remove(&client_msg_id)?;
        self.entries.remove(&order).map(|e| e.send)
    }

    /// The send with `client_msg_id` is to be tried again, not before `at`.
    pub fn retry_at(&mut self, client_msg_id: u64, at: Instant) -> bool {
        let Some(order) = self.by_id.get(&client_msg_id) else {
            return false;
        };
        match self.entries.get_mut(order) {
            Some(e) => {
                e.sent = false;
                e.sent_at = None;
                e.not_before = Some(at);
                true
            }
            None => false,
        }
    }

    /// The earliest retry time of a waiting send.
    pub fn next_retry(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| !e.sent)
            .filter_map(|e| e.not_before)
            .min()
    }

    /// How many sends await their ack.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every send was acknowledged (or refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The client message ids awaiting their ack, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.entries
            .values()
            .map(|e| e.send.client_msg_id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(id: u64) -> pb::Send {
        pb::Send {
            client_msg_id: id,
            ..pb::Send::default()
        }
    }

    #[test]
    fn resends_everything_in_order_after_a_reset_and_waits_for_retries() {
        let now = Instant::now();
        let mut o = Outbox::default();
        for id in [5, 3, 9] {
            o.push(send(id));
        }
        let ids = |v: Vec<pb::Send>| v.iter().map(|s| s.client_msg_id).collect::<Vec<_>>();
        assert_eq!(ids(o.due(now, Some(now))), [5, 3, 9]);
        assert!(o.due(now, Some(now)).is_empty());
        assert!(o.remove(3).is_some());
        assert!(o.retry_at(5, now + Duration::from_secs(1)));
        assert!(o.due(now, Some(now)).is_empty());
        assert_eq!(o.next_retry(), Some(now + Duration::from_secs(1)));
        assert_eq!(ids(o.due(now + Duration::from_secs(1), None)), [5]);
        o.reset();
        assert_eq!(ids(o.due(now, None)), [5, 9]);
        assert_eq!(o.ids(), [5, 9]);
    }

    #[test]
    fn unanswered_sends_expire_with_a_doubling_timeout() {
        let now = Instant::now();
        let retry = RetryConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(3),
        };
        let mut o = Outbox::default();
        o.push(send(1));
        let ids = |v: Vec<pb::Send>| v.iter().map(|s| s.client_msg_id).collect::<Vec<_>>();
        assert_eq!(ids(o.due(now, None)), [1]);
        assert!(o.unstamped());
        assert_eq!(o.next_expiry(&retry), None, "no time, no expiry");
        o.stamp(now);
        assert_eq!(o.next_expiry(&retry), Some(now + Duration::from_secs(1)));
        assert_eq!(o.expire(now + Duration::from_millis(999), &retry), 0);
        assert_eq!(o.expire(now + Duration::from_secs(1), &retry), 1);
        let t1 = now + Duration::from_secs(1);
        assert_eq!(ids(o.due(t1, Some(t1))), [1]);
        // Second try: twice the wait; third: capped at the maximum.
        assert_eq!(o.next_expiry(&retry), Some(t1 + Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(o.expire(t2, &retry), 1);
        assert_eq!(ids(o.due(t2, Some(t2))), [1]);
        assert_eq!(o.next_expiry(&retry), Some(t2 + Duration::from_secs(3)));
        // A new connection starts the count again.
        o.reset();
        assert_eq!(ids(o.due(t2, Some(t2))), [1]);
        assert_eq!(o.next_expiry(&retry), Some(t2 + Duration::from_secs(1)));
    }
}
