//! The outbox: every send not yet acknowledged, in the order the application made them.
//!
//! A send stays in the outbox until its `SendAck` (or a refusal that retrying cannot cure).
//! On every new connection, once logged in, the whole outbox is sent again in order with the
//! SAME client message ids: the server stores each (user, device, client_msg_id) once and
//! answers a retry with the original ack, so a message whose ack was lost with the connection is
//! not stored twice. A send refused for a passing reason (RATE_LIMITED, STORAGE_FAILURE,
//! INTERNAL, SHUTTING_DOWN) waits `retry_after_ms` (at least [`MIN_RETRY`]) and is sent again;
//! a later send may then be stored before it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parley_proto::pb;

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
            },
        );
    }

    /// The sends to transmit now, in order, marking them sent: those not sent on this
    /// connection and not waiting for a retry time after `now`.
    pub fn due(&mut self, now: Instant) -> Vec<pb::Send> {
        self.entries
            .values_mut()
            .filter(|e| !e.sent && e.not_before.is_none_or(|t| t <= now))
            .map(|e| {
                e.sent = true;
                e.not_before = None;
                e.send.clone()
            })
            .collect()
    }

    /// A new connection: everything is to be sent again.
    pub fn reset(&mut self) {
        for e in self.entries.values_mut() {
            e.sent = false;
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
        assert_eq!(ids(o.due(now)), [5, 3, 9]);
        assert!(o.due(now).is_empty());
        assert!(o.remove(3).is_some());
        assert!(o.retry_at(5, now + Duration::from_secs(1)));
        assert!(o.due(now).is_empty());
        assert_eq!(o.next_retry(), Some(now + Duration::from_secs(1)));
        assert_eq!(ids(o.due(now + Duration::from_secs(1))), [5]);
        o.reset();
        assert_eq!(ids(o.due(now)), [5, 9]);
        assert_eq!(o.ids(), [5, 9]);
    }
}
