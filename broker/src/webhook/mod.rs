//! Webhooks: what happens on the node, POSTed as signed JSON to an application's HTTP endpoint
//! (the `[webhooks]` settings), for applications not written in Rust. The contract with the
//! receiving application (requests, events, signature, delivery, metrics) is
//! `docs/WEBHOOKS.md`; keep the two in step.
//!
//! [`Webhooks`] is a [`Hooks`] with observers only (it gates nothing). Each observer call of a
//! configured kind becomes an [`event::Event`] pushed with `try_send` into a bounded queue: a
//! shard never waits, and an event that finds the queue full is dropped and counted. Sender
//! threads ([`sender`]) take events off the queue and POST them.
//!
//! # The request
//!
//! ```text
//! POST <webhooks.url>
//! Content-Type: application/json
//! X-Parley-Signature: sha256=<hex HMAC-SHA256 of the exact body, keyed by webhooks.secret>
//! X-Parley-Timestamp: <seconds since the Unix epoch when this attempt was sent>
//! X-Parley-Attempt: <1 for the first attempt, 2 for the first retry, ...>
//! Idempotency-Key: <the event's id for one event; batch-<32 hex digits> for several>
//!
//! {"events": [<event>, ...]}
//! ```
//!
//! The body is always an `events` array (one event or more, at most `webhooks.max_batch` and
//! about `webhooks.max_batch_bytes`), in the order the events were queued. The events are
//! described in [`event`]. Every attempt at a batch sends the same body, so the same signature
//! and the same `Idempotency-Key`; only `X-Parley-Timestamp` and `X-Parley-Attempt` change. The
//! receiver checks the signature over the raw body before parsing it (constant-time compare),
//! and de-duplicates by event `id` (or by `Idempotency-Key`). The timestamp is not signed: the
//! signature covers exactly the body, which stays the same across attempts.
//!
//! # Delivery
//!
//! At least once while the node runs: a 2xx answer delivers the batch. A network error, a
//! timeout (`webhooks.connect_timeout_ms`, `webhooks.timeout_ms`), 408, 429 and 5xx are retried
//! up to `webhooks.max_attempts` attempts in all, after an exponential back-off with jitter
//! ([`retry::Backoff`]) or the endpoint's `Retry-After` seconds (cut to
//! `webhooks.backoff_max_ms`); any other answer (another 4xx, a 3xx: redirects are not
//! followed) fails the batch at once. Failed events are counted and dropped: the queue is in
//! memory, so events are also lost when the process dies, and at shutdown what is not delivered
//! within `webhooks.shutdown_drain_ms` ([`Webhooks::shutdown`]). While a batch is being retried
//! its sender sends nothing else: with one thread (the default), events arrive in the order
//! they were observed; with more, out of order.
//!
//! The HTTP client is `ureq` (blocking, rustls with Mozilla's root certificates; it honours the
//! usual `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY` environment variables).
//!
//! # Counters
//!
//! [`WebhookStats`] (see [`stats`]); `/metrics` exposes them as `parley_webhook_*`.

pub(crate) mod event;
pub(crate) mod retry;
pub(crate) mod sender;
pub(crate) mod sign;
pub(crate) mod stats;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, TrySendError};

use crate::config::{WebhookConfig, WebhookEvent};
use crate::hooks::{
    DeviceEvent, GroupChange, Hooks, Observes, OfflineDelivery, PresenceChange, StoredMessage,
};

use self::event::{Data, Event, Ids};
use self::retry::{Backoff, Jitter};
use self::sender::{Quiet, Sender, Settings, Shared};
use self::stats::Counts;
pub(crate) use self::stats::{WebhookCounts, WebhookStats};

/// How long [`Webhooks::shutdown`] waits for its threads past the deadline (a POST in flight was
/// given no more time than was left, so they are normally done by then) before it leaves them.
const JOIN_GRACE: Duration = Duration::from_secs(1);

/// Why webhooks could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The `[webhooks]` settings are not valid.
    #[error("{0}")]
    Config(String),
    /// The system random number generator failed (the boot id of the event ids).
    #[error("webhooks: the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// A sender thread could not be started.
    #[error("webhooks: cannot start a sender thread: {0}")]
    Thread(std::io::Error),
}

/// The webhook sender of a node: a [`Hooks`] that turns observed events into queued webhook
/// events, and the threads that POST them (see the module documentation).
pub(crate) struct Webhooks {
    /// The kinds configured, by [`kind_bit`].
    enabled: u8,
    /// The queue's sending side.
    queue: crossbeam_channel::Sender<Event>,
    /// The queue's receiving side, to count what is left after shutdown.
    leftover: Receiver<Event>,
    /// Event ids.
    ids: Ids,
    /// Counters and the drain deadline, shared with the senders.
    shared: Arc<Shared>,
    /// Dropped to tell the senders that shutdown began.
    stop: Mutex<Option<crossbeam_channel::Sender<()>>>,
    /// Disconnected once every sender thread has ended.
    done: Receiver<()>,
    /// The sender threads.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhooks")
            .field("enabled", &self.enabled)
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

/// The bit of `kind` in [`Webhooks::enabled`].
fn kind_bit(kind: WebhookEvent) -> u8 {
    1 << (kind as u8)
}

/// Now, in ms since the Unix epoch.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Webhooks {
    /// Starts the webhook senders of node `node` as `config` says: `Ok(None)` if `webhooks.url`
    /// is unset (webhooks off), else the hooks to give the node (compose them with the
    /// application's through `hooks::Tee`) and the handle on their counters for `/metrics`.
    /// Call [`Webhooks::shutdown`] when the node stops.
    ///
    /// # Errors
    ///
    /// Invalid settings (as [`crate::config::Config::validate`] finds them), a failing random
    /// number generator, or a thread that cannot be spawned.
    pub(crate) fn start(
        config: &WebhookConfig,
        node: &str,
    ) -> Result<Option<(Arc<Webhooks>, WebhookStats)>, Error> {
        config.validate().map_err(Error::Config)?;
        let Some(url) = config.url.clone() else {
            return Ok(None);
        };
        let secret = config
            .secret
            .as_ref()
            .map(|s| s.expose().as_bytes().to_vec())
            .ok_or_else(|| Error::Config("webhooks.secret must be set".into()))?;
        let boot = getrandom::u64().map_err(Error::Random)?;
        let settings = Arc::new(Settings {
            url,
            secret,
            max_batch: config.max_batch,
            max_batch_bytes: config.max_batch_bytes,
            timeout: Duration::from_millis(config.timeout_ms),
            max_attempts: config.max_attempts,
            backoff: Backoff {
                base: Duration::from_millis(config.backoff_base_ms),
                max: Duration::from_millis(config.backoff_max_ms),
            },
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_millis(config.connect_timeout_ms)))
            .timeout_global(Some(settings.timeout))
            .user_agent(format!("parley/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let (queue, events) = crossbeam_channel::bounded(config.queue_capacity);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
        let shared = Arc::new(Shared::default());
        let enabled = config.events.iter().fold(0, |m, &k| m | kind_bit(k));
        let webhooks = Arc::new(Webhooks {
            enabled,
            queue,
            leftover: events.clone(),
            ids: Ids::new(node, boot),
            shared: Arc::clone(&shared),
            stop: Mutex::new(Some(stop_tx)),
            done,
            threads: Mutex::new(Vec::new()),
        });
        for i in 0..config.threads {
            let sender = Sender {
                settings: Arc::clone(&settings),
                agent: agent.clone(),
                events: events.clone(),
                stop: stop_rx.clone(),
                shared: Arc::clone(&shared),
                jitter: Jitter::new(getrandom::u64().unwrap_or(boot ^ i as u64)),
                carry: None,
                quiet: Quiet::default(),
                _done: done_tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("parley-webhook-{i}"))
                .spawn(move || sender.run());
            match spawned {
                Ok(t) => webhooks.lock_threads().push(t),
                Err(e) => {
                    webhooks.shutdown(Instant::now());
                    return Err(Error::Thread(e));
                }
            }
        }
        let names: Vec<&str> = config.events.iter().map(|k| k.name()).collect();
        tracing::info!(
            events = ?names,
            threads = config.threads,
            queue_capacity = config.queue_capacity,
            "webhooks: POSTing events to {}",
            settings.url
        );
        let stats = WebhookStats::new(Arc::clone(&shared.counts), events);
        Ok(Some((webhooks, stats)))
    }

    /// Stops the senders: from now on observed events are dropped (counted), and the senders
    /// deliver what is queued until `deadline` at the latest (see [`sender`]). Returns once they
    /// have ended, or [`JOIN_GRACE`] past the deadline if one is stuck (it is then left to end on
    /// its own). Calling it again does nothing more.
    pub(crate) fn shutdown(&self, deadline: Instant) {
        let _ = self.shared.deadline.set(deadline);
        drop(
            self.stop
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let threads = std::mem::take(&mut *self.lock_threads());
        if threads.is_empty() {
            return;
        }
        match self
            .done
            .recv_deadline(deadline.checked_add(JOIN_GRACE).unwrap_or(deadline))
        {
            Err(RecvTimeoutError::Disconnected) | Ok(()) => {
                for t in threads {
                    let _ = t.join();
                }
                // Observed while the senders were finishing: nobody will send them.
                let left = self.leftover.try_iter().count() as u64;
                Counts::add(&self.shared.counts.dropped_shutdown, left);
            }
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "webhooks: a sender is still busy past the shutdown deadline; leaving it"
                );
            }
        }
        let c = &self.shared.counts;
        tracing::info!(
            delivered = c.delivered.load(Ordering::Relaxed),
            failed = c.failed.load(Ordering::Relaxed),
            dropped_queue_full = c.dropped_queue_full.load(Ordering::Relaxed),
            dropped_shutdown = c.dropped_shutdown.load(Ordering::Relaxed),
            "webhooks: stopped"
        );
    }

    /// The sender threads' handles.
    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether events of `kind` are sent.
    fn wants(&self, kind: WebhookEvent) -> bool {
        self.enabled & kind_bit(kind) != 0
    }

    /// Queues an event of `kind` (if configured) that happened at `time_ms` (`None`: now),
    /// without ever waiting: counted queued, or dropped when the queue is full or shutdown has
    /// begun.
    fn push(&self, kind: WebhookEvent, time_ms: Option<i64>, data: impl FnOnce() -> Data) {
        if !self.wants(kind) {
            return;
        }
        let counts = &self.shared.counts;
        if self.shared.deadline.get().is_some() {
            Counts::add(&counts.dropped_shutdown, 1);
            return;
        }
        let event = Event {
            id: self.ids.next(),
            kind,
            time_ms: time_ms.unwrap_or_else(now_ms),
            data: data(),
        };
        // Counted before it is visible to a sender, so `delivered` never runs ahead of it.
        Counts::add(&counts.queued, 1);
        match self.queue.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                counts.queued.fetch_sub(1, Ordering::Relaxed);
                Counts::add(&counts.dropped_queue_full, 1);
            }
            Err(TrySendError::Disconnected(_)) => {
                counts.queued.fetch_sub(1, Ordering::Relaxed);
                Counts::add(&counts.dropped_shutdown, 1);
            }
        }
    }
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        // Dropped without a shutdown: the senders stop at once (dropping `stop` wakes them).
        let _ = self.shared.deadline.set(Instant::now());
    }
}

impl Hooks for Webhooks {
    fn observes(&self) -> Observes {
        Observes {
            stored: self.wants(WebhookEvent::MessageStored),
            offline: self.wants(WebhookEvent::MessageOffline),
        }
    }

    fn message_stored(&self, message: &StoredMessage) {
        self.push(WebhookEvent::MessageStored, Some(message.time_ms), || {
            Data::Stored {
                conversation: message.conversation.clone(),
                seq: message.seq,
                msg_id: message.msg_id,
                sender: message.sender.clone(),
                device: message.device.clone(),
                system: message.system,
                body: message.body.clone(),
            }
        });
    }

    fn stored_for_offline(&self, delivery: &OfflineDelivery) {
        self.push(WebhookEvent::MessageOffline, None, || Data::Offline {
            conversation: delivery.conversation.clone(),
            seq: delivery.seq,
            sender: delivery.sender.clone(),
            users: delivery.users.clone(),
        });
    }

    fn connected(&self, device: &DeviceEvent) {
        self.push(WebhookEvent::Login, None, || Data::Device {
            user: device.user.clone(),
            device: device.device.clone(),
        });
    }

    fn disconnected(&self, device: &DeviceEvent) {
        self.push(WebhookEvent::Logout, None, || Data::Device {
            user: device.user.clone(),
            device: device.device.clone(),
        });
    }

    fn presence_changed(&self, change: &PresenceChange) {
        self.push(WebhookEvent::Presence, None, || Data::Presence {
            user: change.user.clone(),
            online: change.online,
        });
    }

    fn group_changed(&self, change: &GroupChange) {
        self.push(WebhookEvent::Group, None, || Data::Group {
            group: change.group.clone(),
            seq: change.seq,
            actor: change.actor.clone(),
            what: change.what.clone(),
            members: change.members.clone(),
        });
    }
}
