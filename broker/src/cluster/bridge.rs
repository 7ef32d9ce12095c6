//! The bridge thread: the node's only Redis client. One heartbeat per `cluster.heartbeat_ms` is
//! one script run (renew the lease and read the membership in one round trip, see
//! [`super::registry`]); errors reconnect with back-off; at stop the registration is deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::Script;

use super::registry::{self, Beat, Change, Member};
use super::{ClusterError, Status};
use crate::config::{Config, redact_url};

/// The first delay after a failed heartbeat; it doubles up to `heartbeat_ms`.
const BACKOFF_START: Duration = Duration::from_millis(100);

/// At most one line about failing Redis calls per this long.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why one heartbeat failed.
#[derive(Debug, thiserror::Error)]
enum BeatError {
    /// Redis could not be reached, or answered with an error.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    /// The script answered something else than the registry's shape.
    #[error("{0}")]
    Reply(#[from] registry::BadReply),
}

/// The bridge's state (owned by its thread once started).
pub(super) struct Bridge {
    /// The Redis client (its URL).
    client: redis::Client,
    /// The URL, password redacted, for log lines.
    url: String,
    /// The open connection, if any.
    con: Option<redis::Connection>,
    /// [`registry::HEARTBEAT`].
    heartbeat: Script,
    /// [`registry::LEAVE`].
    leave: Script,
    /// This node's registration key.
    key: String,
    /// The membership index key.
    index: String,
    /// `cluster.advertise`, `""` for none.
    advertise: String,
    /// Start time, Unix ms.
    started_ms: u64,
    /// `cluster.lease_ms`.
    lease: Duration,
    /// `cluster.heartbeat_ms`.
    every: Duration,
    /// Connect, read and write timeout of a Redis call.
    io_timeout: Duration,
    /// What is published.
    status: Arc<Status>,
    /// The membership last read.
    members: BTreeMap<String, Member>,
    /// When the lease was last renewed by this process.
    renewed: Option<Instant>,
    /// The boot id holding this node id when it is not this process.
    usurper: Option<String>,
    /// The next delay after a failure.
    backoff: Duration,
    /// Failures in a row (0: the last call worked).
    failing: u64,
    /// When an error line was last written, and how many were suppressed since.
    error_log: Option<(Instant, u64)>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("url", &self.url)
            .field("node_id", &self.status.node_id)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// A bridge for `config`, not connected yet.
    pub(super) fn new(config: &Config, url: &str) -> Result<Bridge, ClusterError> {
        let shown = redact_url(url);
        let client = redis::Client::open(url).map_err(|e| ClusterError::Url {
            url: shown.clone(),
            message: e.to_string(),
        })?;
        let c = &config.cluster;
        let node_id = c.effective_node_id(&config.node).to_owned();
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let every = Duration::from_millis(c.heartbeat_ms);
        Ok(Bridge {
            client,
            url: shown,
            con: None,
            heartbeat: Script::new(registry::HEARTBEAT),
            leave: Script::new(registry::LEAVE),
            key: registry::node_key(&node_id),
            index: registry::index_key(),
            advertise: c.advertise.clone().unwrap_or_default(),
            started_ms,
            lease: Duration::from_millis(c.lease_ms),
            every,
            io_timeout: every.clamp(Duration::from_millis(100), Duration::from_secs(2)),
            status: Arc::new(Status {
                node_id,
                boot_id: super::boot_id(),
                lease_ok: false.into(),
                errors: 0.into(),
                members: std::sync::Mutex::new(Vec::new()),
            }),
            members: BTreeMap::new(),
            renewed: None,
            usurper: None,
            backoff: BACKOFF_START,
            failing: 0,
            error_log: None,
        })
    }

    /// What the bridge publishes.
    pub(super) fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    /// The first registration, before the node serves. If another boot holds the node id, waits
    /// (at most `lease_ms` + `heartbeat_ms`) to see whether it is alive: an error if its holder
    /// renews it, the id taken over if its lease runs out. An unreachable Redis is logged and
    /// left to the thread's retries.
    pub(super) fn register(&mut self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + self.lease + self.every;
        let mut first_seen: Option<(String, Option<u64>)> = None;
        loop {
            match self.beat() {
                Ok(beat) if beat.held => {
                    tracing::info!(
                        node_id = %self.status.node_id,
                        boot_id = %self.status.boot_id,
                        redis = %self.url,
                        "cluster: registered (lease {} ms, heartbeat {} ms)",
                        self.lease.as_millis(),
                        self.every.as_millis()
                    );
                    self.apply(beat);
                    return Ok(());
                }
                Ok(beat) => {
                    let holder = beat.holder_boot.clone().unwrap_or_default();
                    match &first_seen {
                        None => {
                            tracing::warn!(
                                node_id = %self.status.node_id,
                                "cluster: node id held by boot {holder}; waiting up to {} ms to \
                                 see whether that process is still alive",
                                (self.lease + self.every).as_millis()
                            );
                            first_seen = Some((holder.clone(), beat.holder_renewed_ms));
                        }
                        Some((boot, renewed))
                            if *boot != holder || *renewed != beat.holder_renewed_ms =>
                        {
                            return Err(ClusterError::Duplicate {
                                node_id: self.status.node_id.clone(),
                                holder_boot: holder,
                                boot_id: self.status.boot_id.clone(),
                            });
                        }
                        Some(_) => {}
                    }
                    if Instant::now() >= deadline {
                        return Err(ClusterError::Duplicate {
                            node_id: self.status.node_id.clone(),
                            holder_boot: holder,
                            boot_id: self.status.boot_id.clone(),
                        });
                    }
                    std::thread::sleep(self.every / 4);
                }
                Err(e) => {
                    self.failed(&e);
                    tracing::warn!(
                        node_id = %self.status.node_id,
                        "cluster: not registered yet, the node starts without a lease and keeps \
                         retrying"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// The thread: a heartbeat every `heartbeat_ms` (or after the back-off, after a failure)
    /// until `stop` says otherwise, then leaving.
    pub(super) fn run(mut self, stop: &Receiver<()>) {
        let mut wait = if self.failing > 0 {
            self.backoff
        } else {
            self.every
        };
        // Until told to stop (or the node is gone).
        while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(wait) {
            wait = match self.beat() {
                Ok(beat) => {
                    self.apply(beat);
                    self.every
                }
                Err(e) => {
                    self.failed(&e);
                    let wait = self.backoff;
                    self.backoff = (self.backoff * 2).min(self.every);
                    wait
                }
            };
            self.check_lease();
        }
        self.depart();
    }

    /// One heartbeat: connects if needed, runs the script.
    fn beat(&mut self) -> Result<Beat, BeatError> {
        // Taken out while in use, put back only after a good answer: an error drops it.
        let mut con = match self.con.take() {
            Some(con) => con,
            None => self.connect()?,
        };
        let reply: Vec<String> = self
            .heartbeat
            .key(&self.key)
            .key(&self.index)
            .arg(&self.status.node_id)
            .arg(&self.status.boot_id)
            .arg(&self.advertise)
            .arg(self.started_ms)
            .arg(self.lease.as_millis() as u64)
            .arg(format!("{}node:", registry::KEY_PREFIX))
            .invoke(&mut con)?;
        self.con = Some(con);
        Ok(registry::parse_beat(&reply)?)
    }

    /// A new connection, with the I/O timeouts set.
    fn connect(&self) -> Result<redis::Connection, redis::RedisError> {
        let con = self.client.get_connection_with_timeout(self.io_timeout)?;
        con.set_read_timeout(Some(self.io_timeout))?;
        con.set_write_timeout(Some(self.io_timeout))?;
        Ok(con)
    }

    /// Takes in a heartbeat's answer: the lease, the membership (logging each change).
    fn apply(&mut self, beat: Beat) {
        if self.failing > 0 {
            tracing::info!(
                "cluster: Redis at {} answers again (after {} failed call(s))",
                self.url,
                self.failing
            );
        }
        self.failing = 0;
        self.backoff = BACKOFF_START;
        self.error_log = None;
        if beat.held {
            self.renewed = Some(Instant::now());
            if let Some(other) = self.usurper.take() {
                tracing::warn!(
                    node_id = %self.status.node_id,
                    "cluster: the lease of boot {other} on this node id ended; this process holds \
                     it again"
                );
            }
        } else {
            let holder = beat.holder_boot.clone().unwrap_or_default();
            if self.usurper.as_deref() != Some(holder.as_str()) {
                tracing::error!(
                    node_id = %self.status.node_id,
                    boot_id = %self.status.boot_id,
                    "cluster: node id is held by another process (boot {holder}); two processes \
                     share this node id. This one does not renew over it and reports its lease \
                     lost; give every node its own cluster.node_id"
                );
                self.usurper = Some(holder);
            }
            self.renewed = None;
        }
        for change in registry::diff(&self.members, &beat.members) {
            match change {
                Change::Joined(m) => tracing::info!(
                    node = %m.node_id,
                    boot = %m.boot_id,
                    advertise = m.advertise.as_deref().unwrap_or("-"),
                    "cluster: node {} joined",
                    m.node_id
                ),
                Change::Restarted { old_boot, member } => tracing::info!(
                    node = %member.node_id,
                    boot = %member.boot_id,
                    "cluster: node {} restarted (boot {old_boot} before)",
                    member.node_id
                ),
                Change::Left(m) => tracing::info!(
                    node = %m.node_id,
                    boot = %m.boot_id,
                    "cluster: node {} left",
                    m.node_id
                ),
            }
        }
        self.members = beat.members;
        if let Ok(mut shown) = self.status.members.lock() {
            *shown = self.members.values().cloned().collect();
        }
        self.check_lease();
    }

    /// Counts a failed call and logs it, at most one line per [`ERROR_LOG_EVERY`].
    fn failed(&mut self, e: &BeatError) {
        self.failing += 1;
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        match &mut self.error_log {
            Some((last, suppressed)) if now.duration_since(*last) < ERROR_LOG_EVERY => {
                *suppressed += 1;
            }
            _ => {
                let suppressed = self.error_log.map_or(0, |(_, s)| s);
                tracing::warn!(
                    node_id = %self.status.node_id,
                    "cluster: Redis at {} failed: {e}; retrying with back-off{}",
                    self.url,
                    if suppressed > 0 {
                        format!(" ({suppressed} similar suppressed)")
                    } else {
                        String::new()
                    }
                );
                self.error_log = Some((now, 0));
            }
        }
    }

    /// Publishes whether the lease holds (renewed within `lease_ms`), logging a change.
    fn check_lease(&self) {
        let ok = self.renewed.is_some_and(|r| r.elapsed() < self.lease);
        let was = self.status.lease_ok.swap(ok, Ordering::SeqCst);
        if was && !ok && self.usurper.is_none() {
            tracing::error!(
                node_id = %self.status.node_id,
                "cluster: lease lost: not renewed for {} ms (cluster.lease_ms); the other nodes \
                 now count this node dead",
                self.lease.as_millis()
            );
        } else if !was && ok && self.status.errors.load(Ordering::Relaxed) > 0 {
            tracing::info!(node_id = %self.status.node_id, "cluster: lease held again");
        }
    }

    /// Clean shutdown: deletes this boot's registration (one try, bounded by the I/O timeout).
    fn depart(&mut self) {
        let result = (|| -> Result<i64, redis::RedisError> {
            let mut con = match self.con.take() {
                Some(con) => con,
                None => self.connect()?,
            };
            self.leave
                .key(&self.key)
                .key(&self.index)
                .arg(&self.status.node_id)
                .arg(&self.status.boot_id)
                .invoke(&mut con)
        })();
        self.status.lease_ok.store(false, Ordering::SeqCst);
        match result {
            Ok(1) => tracing::info!(
                node_id = %self.status.node_id,
                "cluster: left (registration removed)"
            ),
            Ok(_) => tracing::info!(
                node_id = %self.status.node_id,
                "cluster: left (this process held no registration)"
            ),
            Err(e) => tracing::warn!(
                node_id = %self.status.node_id,
                "cluster: cannot remove the registration ({e}); the others see this node leave \
                 when its lease expires"
            ),
        }
    }
}
