//! A sender thread: takes events off the queue, batches them, POSTs each batch and retries it
//! as [`super::retry`] says. It owns all the waiting (for events, for the endpoint, between
//! attempts); nothing here runs on a shard.
//!
//! Shutdown: once the node's shutdown begins (the stop channel is disconnected and the drain
//! deadline is set), a sender no longer waits for new events. It goes on delivering what is
//! queued until the deadline: no attempt starts after it, no attempt is given more time than is
//! left before it, and a retry that would come after it is not waited for. Whatever is left is
//! counted in `dropped_shutdown`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, select};

use super::event::{Encoded, Event, batch_body, body_len_with};
use super::retry::{Attempt, Backoff, Jitter, Verdict, classify};
use super::sign::{idempotency_key, signature};
use super::stats::Counts;

/// Most bytes of an endpoint's answer read (and quoted, cut shorter, in a log line).
const MAX_ANSWER_BYTES: u64 = 4096;
/// Most characters of an answer quoted in a log line.
const MAX_QUOTED_CHARS: usize = 200;
/// At most one log line per kind per sender per this long.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What every sender of one node needs, fixed at start.
#[derive(Debug)]
pub(crate) struct Settings {
    /// Where to POST.
    pub(crate) url: String,
    /// The HMAC key.
    pub(crate) secret: Vec<u8>,
    /// Most events per POST.
    pub(crate) max_batch: usize,
    /// Largest body per POST (an event larger on its own goes alone).
    pub(crate) max_batch_bytes: usize,
    /// Bound of one whole POST.
    pub(crate) timeout: Duration,
    /// Attempts per batch, the first included.
    pub(crate) max_attempts: u32,
    /// Delays between attempts.
    pub(crate) backoff: Backoff,
}

/// What the senders and the [`super::Webhooks`] handle share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The counters.
    pub(crate) counts: Arc<Counts>,
    /// Set when shutdown begins: the end of the drain.
    pub(crate) deadline: OnceLock<Instant>,
}

/// One sender thread's state.
#[derive(Debug)]
pub(crate) struct Sender {
    /// The fixed settings.
    pub(crate) settings: Arc<Settings>,
    /// The HTTP client (shared by the senders: its connection pool too).
    pub(crate) agent: ureq::Agent,
    /// The queue.
    pub(crate) events: Receiver<Event>,
    /// Never sent on: disconnected when shutdown begins.
    pub(crate) stop: Receiver<()>,
    /// Counters and the drain deadline.
    pub(crate) shared: Arc<Shared>,
    /// Randomness for the back-off.
    pub(crate) jitter: Jitter,
    /// An event taken off the queue that did not fit in the last batch.
    pub(crate) carry: Option<Encoded>,
    /// Rate limit of this sender's log lines.
    pub(crate) quiet: Quiet,
    /// Dropped when the thread ends (the shutdown waits for every sender's).
    pub(crate) _done: crossbeam_channel::Sender<()>,
}

impl Sender {
    /// Runs until shutdown (or until the [`super::Webhooks`] handle is dropped).
    pub(crate) fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            self.deliver(batch);
        }
    }

    /// The drain deadline, once shutdown has begun.
    fn deadline(&self) -> Option<Instant> {
        self.shared.deadline.get().copied()
    }

    /// The next batch: at least one event (waiting for it unless shutting down), then as many
    /// more as are queued, up to the batch limits. `None` when the sender is done.
    fn next_batch(&mut self) -> Option<Vec<Encoded>> {
        let first = match self.carry.take() {
            Some(e) => e,
            None => loop {
                let event = self.next_event()?;
                if let Some(e) = self.encode(&event) {
                    break e;
                }
            },
        };
        let mut batch = vec![first];
        while batch.len() < self.settings.max_batch {
            let Ok(event) = self.events.try_recv() else {
                break;
            };
            let Some(e) = self.encode(&event) else {
                continue;
            };
            if body_len_with(&batch, e.json.len()) > self.settings.max_batch_bytes {
                self.carry = Some(e);
                break;
            }
            batch.push(e);
        }
        Some(batch)
    }

    /// The next event: waits for one while the node runs; once it stops, takes what is queued
    /// until the deadline, then counts the rest as dropped. `None` when there is no more.
    fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(deadline) = self.deadline() {
                let event = self.events.try_recv().ok()?;
                if Instant::now() < deadline {
                    return Some(event);
                }
                let left = 1 + self.events.try_iter().count() as u64;
                Counts::add(&self.shared.counts.dropped_shutdown, left);
                return None;
            }
            select! {
                recv(self.events) -> event => return event.ok(),
                recv(self.stop) -> _ => self.stopping(),
            }
        }
    }

    /// The stop channel was disconnected: shutdown has begun (its deadline is normally set
    /// first; if not, the drain ends now).
    fn stopping(&self) {
        let _ = self.shared.deadline.set(Instant::now());
    }

    /// Serializes `event`; one that cannot be (it cannot happen with these types) is counted
    /// failed.
    fn encode(&mut self, event: &Event) -> Option<Encoded> {
        match event.encode() {
            Ok(e) => Some(e),
            Err(e) => {
                Counts::add(&self.shared.counts.failed, 1);
                if let Some(suppressed) = self.quiet.admit(LogKind::Failed) {
                    tracing::warn!(id = %event.id, "webhook: cannot serialize an event: {e}{suppressed}");
                }
                None
            }
        }
    }

    /// POSTs `batch` until it is delivered, fails for good, runs out of attempts or out of
    /// drain time, and counts the outcome.
    fn deliver(&mut self, batch: Vec<Encoded>) {
        let n = batch.len() as u64;
        let body = batch_body(&batch);
        let key = idempotency_key(batch.iter().map(|e| e.id.as_str()));
        let sig = signature(&self.settings.secret, &body);
        let counts = Arc::clone(&self.shared.counts);
        let mut attempt: u32 = 1;
        loop {
            let timeout = match self.deadline() {
                None => self.settings.timeout,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        Counts::add(&counts.dropped_shutdown, n);
                        return;
                    }
                    self.settings.timeout.min(left)
                }
            };
            let (outcome, detail) = self.post(&body, &sig, &key, attempt, timeout);
            let verdict = classify(&outcome);
            let after = match verdict {
                Verdict::Delivered => {
                    Counts::add(&counts.delivered, n);
                    return;
                }
                Verdict::Permanent => {
                    Counts::add(&counts.failed, n);
                    self.log_failed(n, &key, attempt, &detail, "the answer is final");
                    return;
                }
                Verdict::Retry { after } => after,
            };
            if attempt >= self.settings.max_attempts {
                Counts::add(&counts.failed, n);
                self.log_failed(n, &key, attempt, &detail, "no attempt left");
                return;
            }
            let delay = match after {
                Some(asked) => self.settings.backoff.honour(asked),
                None => self.settings.backoff.delay(attempt, self.jitter.next_u64()),
            };
            if let Some(suppressed) = self.quiet.admit(LogKind::Retrying) {
                tracing::warn!(
                    events = n,
                    key = %key,
                    attempt,
                    "webhook: POST failed ({detail}); retrying in {delay:?}{suppressed}"
                );
            }
            if !self.pause(delay) {
                Counts::add(&counts.dropped_shutdown, n);
                return;
            }
            Counts::add(&counts.retried, n);
            attempt += 1;
        }
    }

    /// Logs (rate-limited) that `n` events were given up.
    fn log_failed(&mut self, n: u64, key: &str, attempt: u32, detail: &str, why: &str) {
        if let Some(suppressed) = self.quiet.admit(LogKind::Failed) {
            tracing::warn!(
                events = n,
                key = %key,
                attempt,
                "webhook: POST failed ({detail}); {why}: the events are dropped{suppressed}"
            );
        }
    }

    /// Waits `delay` before the next attempt: `false` if shutdown's deadline comes first (the
    /// wait is then cut short).
    fn pause(&mut self, delay: Duration) -> bool {
        let now = Instant::now();
        let wake = now.checked_add(delay).unwrap_or(now);
        loop {
            if let Some(deadline) = self.deadline() {
                if wake > deadline {
                    return false;
                }
                std::thread::sleep(wake.saturating_duration_since(Instant::now()));
                return true;
            }
            match self
                .stop
                .recv_timeout(wake.saturating_duration_since(Instant::now()))
            {
                Err(RecvTimeoutError::Timeout) => return true,
                Ok(()) | Err(RecvTimeoutError::Disconnected) => self.stopping(),
            }
        }
    }

    /// One attempt: the outcome, and a short description of it for a log line.
    fn post(
        &self,
        body: &[u8],
        sig: &str,
        key: &str,
        attempt: u32,
        timeout: Duration,
    ) -> (Attempt, String) {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let request = self
            .agent
            .post(&self.settings.url)
            .header("Content-Type", "application/json")
            .header("X-Parley-Signature", sig)
            .header("X-Parley-Timestamp", timestamp.to_string())
            .header("X-Parley-Attempt", attempt.to_string())
            .header("Idempotency-Key", key)
            .config()
            .timeout_global(Some(timeout))
            .build();
        match request.send(body) {
            Ok(mut answer) => {
                let status = answer.status().as_u16();
                let retry_after = answer
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // Read the answer (so the connection can be reused), bounded; its start goes
                // in the log line of a failure.
                let text = answer
                    .body_mut()
                    .with_config()
                    .limit(MAX_ANSWER_BYTES)
                    .read_to_vec()
                    .unwrap_or_default();
                let detail = describe(status, &text);
                (
                    Attempt::Answered {
                        status,
                        retry_after,
                    },
                    detail,
                )
            }
            Err(e) => {
                let detail = e.to_string();
                (Attempt::Failed(detail.clone()), detail)
            }
        }
    }
}

/// `HTTP <status>`, and the start of the answer's text if it has any (control characters
/// replaced).
fn describe(status: u16, answer: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(answer)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_QUOTED_CHARS)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text:?}")
    }
}

/// Kinds of a sender's log lines, each rate-limited on its own.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LogKind {
    /// An attempt failed and will be retried.
    Retrying,
    /// Events were given up.
    Failed,
}

/// At most one log line per kind per [`LOG_INTERVAL`], the next one saying how many were
/// suppressed: a failing endpoint must not flood the node's log.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    /// Per kind: when the last line went out, and lines suppressed since.
    kinds: [(Option<Instant>, u64); 2],
}

/// The suffix of a line let through: how many similar ones were suppressed before it.
#[derive(Debug)]
pub(crate) struct Suppressed(u64);

impl std::fmt::Display for Suppressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 > 0 {
            write!(f, " ({} similar lines suppressed)", self.0)
        } else {
            Ok(())
        }
    }
}

impl Quiet {
    /// Whether a line of `kind` may go out now.
    fn admit(&mut self, kind: LogKind) -> Option<Suppressed> {
        let now = Instant::now();
        let (last, suppressed) = &mut self.kinds[kind as usize];
        match last {
            Some(t) if now.duration_since(*t) < LOG_INTERVAL => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(Suppressed(std::mem::take(suppressed)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_described_briefly_and_safely() {
        assert_eq!(describe(503, b""), "HTTP 503");
        assert_eq!(
            describe(400, b"bad\r\nthing\x1b[31m"),
            "HTTP 400: \"bad  thing [31m\""
        );
        let long = vec![b'x'; 10_000];
        assert!(describe(400, &long).len() < MAX_QUOTED_CHARS + 20);
    }
}
