//! The bridge thread: the node's only Redis client. One heartbeat per `cluster.heartbeat_ms` is
//! one script run (renew the lease and read the membership in one round trip, see
//! [`super::registry`]), followed by one route check (the digest, and a slice of the rolling
//! TTL renewal, see [`super::routes`]); errors reconnect with back-off; at stop the
//! registration is deleted.
//!
//! Route ops come from the shards over one bounded channel ([`BridgeMsg`]). The thread writes
//! what has queued up as one script run per [`routes::BATCH`] ops, so the busier the node the
//! bigger the batches; answers go back to each shard's inbox in one mail per shard and batch.
//! A batch that fails stays queued and is retried with back-off; a login that waited
//! `cluster.route_timeout_ms` is answered UNAVAILABLE and its route withdrawn.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use redis::Script;

use super::link::LinkCmd;
use super::registry::{self, Beat, Change, Member};
use super::routes::{self, Found};
use super::writer::{Outcome, RouteStore, RouteWriter, Write};
use super::{ClusterError, Status};
use crate::config::{Config, redact_url};
use crate::core::{RouteOp, Routed};
use crate::node::shard::{Mail, Peer};

/// Most messages the shards may have queued for the bridge; past it a login is answered
/// UNAVAILABLE at once (and a withdrawal is left to the digest check).
pub(crate) const INBOX: usize = 65_536;

/// Most route ops taken from the inbox per turn of the thread.
const TAKE_PER_TURN: usize = 4 * routes::BATCH;

/// What shards and the admin listener ask of the bridge.
#[derive(Debug)]
pub(crate) enum BridgeMsg {
    /// A change to the presence index from shard `.0`'s core.
    Route(RouteOp),
    /// The live routes of `user`, answered on `reply`.
    Lookup { user: String, reply: LookupReply },
    /// The live routes of `users`, for presence answer `gather` of shard `shard` (answered in
    /// the shard's inbox, `Mail::Found`).
    Presence {
        shard: usize,
        gather: u64,
        users: Vec<Arc<str>>,
    },
}

/// Where a lookup's answer goes.
pub(crate) type LookupReply = Sender<Result<Vec<Found>, String>>;

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
    /// The route script answered something else than a digest.
    #[error("{0}")]
    Digest(#[from] routes::BadDigest),
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
    /// When the lease was last renewed by this process (when the renewal was sent).
    renewed: Option<Instant>,
    /// When the heartbeat under way was sent.
    beat_sent: Instant,
    /// The boot id holding this node id when it is not this process.
    usurper: Option<String>,
    /// The next delay after a failure.
    backoff: Duration,
    /// Failures in a row (0: the last call worked).
    failing: u64,
    /// When an error line was last written, and how many were suppressed since.
    error_log: Option<(Instant, u64)>,
    /// [`routes::ROUTES`].
    routes_script: Script,
    /// [`routes::LOOKUP`].
    lookup_script: Script,
    /// This node's digest key.
    digest_key: String,
    /// `cluster.route_ttl_ms`.
    route_ttl: Duration,
    /// What shards and the admin listener ask.
    inbox: Receiver<BridgeMsg>,
    /// The shards, for answers.
    peers: Vec<Peer>,
    /// Lookups to answer.
    lookups: Vec<(String, LookupReply)>,
    /// Presence answers waiting for routes: (shard, gather, users).
    presence_lookups: Vec<(usize, u64, Vec<Arc<str>>)>,
    /// The route ops, their batching and the digest check.
    writer: RouteWriter,
    /// No route write before this (back-off after a failure).
    routes_retry_at: Option<Instant>,
    /// The link thread, told the membership at each heartbeat.
    links: Option<(Sender<LinkCmd>, Arc<mio::Waker>)>,
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
        let (tx, inbox) = crossbeam_channel::bounded(INBOX);
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
                inbox: tx,
                links: std::sync::OnceLock::new(),
                lease: super::Lease::default(),
                routes: 0.into(),
                route_writes: 0.into(),
                redis_calls: 0.into(),
                replays: 0.into(),
            }),
            members: BTreeMap::new(),
            renewed: None,
            beat_sent: Instant::now(),
            usurper: None,
            backoff: BACKOFF_START,
            failing: 0,
            error_log: None,
            routes_script: Script::new(routes::ROUTES),
            lookup_script: Script::new(routes::LOOKUP),
            digest_key: routes::digest_key(c.effective_node_id(&config.node)),
            route_ttl: Duration::from_millis(c.route_ttl_ms),
            inbox,
            peers: Vec::new(),
            lookups: Vec::new(),
            presence_lookups: Vec::new(),
            writer: RouteWriter::new(
                Duration::from_millis(c.route_timeout_ms),
                c.heartbeat_ms.min(u64::from(u32::MAX)) as u32,
                c.max_pending_routes,
            ),
            routes_retry_at: None,
            links: None,
        })
    }

    /// The link thread to tell the membership (set before the thread starts).
    pub(super) fn set_links(&mut self, links: (Sender<LinkCmd>, Arc<mio::Waker>)) {
        self.links = Some(links);
    }

    /// The address published for links (when `cluster.advertise` is unset: where the link
    /// listener is bound).
    pub(super) fn set_advertise(&mut self, advertise: String) {
        self.advertise = advertise;
    }

    /// The shards' inboxes, for answers (set before the thread starts).
    pub(super) fn set_peers(&mut self, peers: Vec<Peer>) {
        self.peers = peers;
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

    /// The thread: a heartbeat every `heartbeat_ms` (or after the back-off, after a failure),
    /// route writes as they come, until `stop` says otherwise, then leaving.
    pub(super) fn run(mut self, stop: &Receiver<()>) {
        let first = if self.failing > 0 {
            self.backoff
        } else {
            self.every
        };
        let mut next_beat = Instant::now() + first;
        let inbox = self.inbox.clone();
        loop {
            let now = Instant::now();
            let mut wake = next_beat;
            if self.writer.pending() {
                wake = wake.min(self.routes_retry_at.unwrap_or(now));
                if let Some(d) = self.writer.next_deadline() {
                    wake = wake.min(d);
                }
            }
            let wait = wake.saturating_duration_since(now);
            crossbeam_channel::select! {
                recv(stop) -> _ => break,
                recv(inbox) -> msg => match msg {
                    Ok(msg) => self.take(msg),
                    Err(_) => break,
                },
                default(wait) => {}
            }
            for _ in 0..TAKE_PER_TURN {
                match inbox.try_recv() {
                    Ok(msg) => self.take(msg),
                    Err(_) => break,
                }
            }
            if Instant::now() >= next_beat {
                let wait = match self.beat() {
                    Ok(beat) => {
                        self.apply(beat);
                        self.check_routes();
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
                next_beat = Instant::now() + wait;
            }
            self.expire_logins();
            if self.routes_retry_at.is_none_or(|t| Instant::now() >= t) {
                self.write_routes();
            }
            self.answer_lookups();
        }
        // The shards stopped first: the withdrawals of their last connections are in the
        // inbox. One try to write them, so a clean stop leaves no route behind.
        while let Ok(msg) = inbox.try_recv() {
            self.take(msg);
        }
        if self.failing == 0 {
            self.write_routes();
        }
        self.depart();
    }

    /// Takes in one message.
    fn take(&mut self, msg: BridgeMsg) {
        match msg {
            BridgeMsg::Route(op) => {
                if let Some(refused) = self.writer.push(op, Instant::now()) {
                    self.answer(vec![refused]);
                }
            }
            BridgeMsg::Lookup { user, reply } => self.lookups.push((user, reply)),
            BridgeMsg::Presence {
                shard,
                gather,
                users,
            } => self.presence_lookups.push((shard, gather, users)),
        }
    }

    /// Answers UNAVAILABLE every login that waited `route_timeout_ms` (its route is withdrawn:
    /// it may have been written by a call whose answer was lost).
    fn expire_logins(&mut self) {
        let answers = self.writer.expire(Instant::now());
        self.answer(answers);
    }

    /// Writes the queued route ops, a batch per script run, until none is left or a call
    /// fails (then they stay queued, retried after the back-off).
    fn write_routes(&mut self) {
        let (writer, mut store) = self.writer_and_store();
        let (answers, outcome, error) = writer.flush(&mut store);
        self.count(outcome);
        self.answer(answers);
        match error {
            None => self.routes_retry_at = None,
            Some(e) => {
                self.failed(&e);
                self.routes_retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(self.every);
            }
        }
    }

    /// At each heartbeat: renews the TTLs of the next slice of routes (each once per third of
    /// `route_ttl_ms`) and compares the digests, replaying on a difference.
    fn check_routes(&mut self) {
        let cycle = (self.route_ttl / 3).max(self.every);
        let renew = (self.writer.routes() as u128 * self.every.as_millis())
            .div_ceil(cycle.as_millis().max(1)) as usize;
        let (writer, mut store) = self.writer_and_store();
        let (outcome, result) = writer.check(&mut store, renew);
        self.count(outcome);
        if let Err(e) = result {
            self.failed(&e);
        }
    }

    /// The route writer and the Redis it writes to (borrowing the bridge's connection).
    fn writer_and_store(&mut self) -> (&mut RouteWriter, RedisStore<'_>) {
        let store = RedisStore {
            con: &mut self.con,
            client: &self.client,
            io_timeout: self.io_timeout,
            script: &self.routes_script,
            digest_key: &self.digest_key,
            ttl_ms: self.route_ttl.as_millis() as u64,
            status: &self.status,
        };
        (&mut self.writer, store)
    }

    /// Publishes what the writer did.
    fn count(&self, outcome: Outcome) {
        let s = &self.status;
        s.route_writes.fetch_add(outcome.writes, Ordering::Relaxed);
        s.replays.fetch_add(outcome.replays, Ordering::Relaxed);
        s.routes
            .store(self.writer.routes() as u64, Ordering::Relaxed);
    }

    /// Sends route answers to their shards, one mail per shard.
    fn answer(&self, answers: Vec<Routed>) {
        if answers.is_empty() {
            return;
        }
        let mut per: BTreeMap<usize, Vec<Routed>> = BTreeMap::new();
        for a in answers {
            per.entry(a.ticket.shard()).or_default().push(a);
        }
        for (shard, done) in per {
            // Tickets name shards across the cluster (`Placement`): this node's shard `i`
            // is `node * shards + i`.
            let Some((tx, waker)) = self.peers.get(shard % self.peers.len().max(1)) else {
                continue;
            };
            // A shard drains its inbox every turn; a full one means it is stopping.
            if tx
                .send_timeout(Mail::Routed(done), Duration::from_secs(1))
                .is_ok()
            {
                let _ = waker.wake();
            }
        }
    }

    /// Answers the lookups asked.
    fn answer_lookups(&mut self) {
        for (user, reply) in std::mem::take(&mut self.lookups) {
            let result = self.lookup(&user).map_err(|e| {
                self.failed(&e);
                e.to_string()
            });
            let _ = reply.send(result);
        }
        // Presence answers: one script run per user; a failure answers with what was found so
        // far (the answer then says what the asking node knows of the rest).
        for (shard, gather, users) in std::mem::take(&mut self.presence_lookups) {
            let mut found = Vec::with_capacity(users.len());
            for user in &users {
                match self.lookup(user) {
                    Ok(routes) => found.push((
                        user.to_string(),
                        routes.into_iter().map(|r| (r.device, r.node_id)).collect(),
                    )),
                    Err(e) => {
                        self.failed(&e);
                        break;
                    }
                }
            }
            if let Some((tx, waker)) = self.peers.get(shard)
                && tx
                    .send_timeout(Mail::Found { gather, found }, Duration::from_secs(1))
                    .is_ok()
            {
                let _ = waker.wake();
            }
        }
    }

    /// The live routes of `user` ([`routes::LOOKUP`]).
    fn lookup(&mut self, user: &str) -> Result<Vec<Found>, BeatError> {
        let mut con = match self.con.take() {
            Some(con) => con,
            None => self.connect()?,
        };
        self.status.redis_calls.fetch_add(1, Ordering::Relaxed);
        let reply: Vec<String> = self
            .lookup_script
            .key(format!("{}{user}", routes::PRESENCE_PREFIX))
            .arg(format!("{}node:", registry::KEY_PREFIX))
            .arg(routes::digest_prefix())
            .invoke(&mut con)?;
        self.con = Some(con);
        Ok(routes::parse_lookup(&reply)?)
    }

    /// One heartbeat: connects if needed, runs the script.
    fn beat(&mut self) -> Result<Beat, BeatError> {
        self.beat_sent = Instant::now();
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
        self.status.redis_calls.fetch_add(1, Ordering::Relaxed);
        self.con = Some(con);
        Ok(registry::parse_beat(&reply)?)
    }

    /// A new connection, with the I/O timeouts set.
    fn connect(&self) -> Result<redis::Connection, redis::RedisError> {
        connect(&self.client, self.io_timeout)
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
            self.renewed = Some(self.beat_sent);
            self.status.lease.set(Some(self.beat_sent + self.lease));
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
            self.status.lease.set(None);
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
        if let Some((tx, waker)) = &self.links {
            let members = self.members.values().cloned().collect();
            if tx.try_send(LinkCmd::Members(members)).is_ok() {
                let _ = waker.wake();
            }
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
        self.status.lease.set(None);
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

/// A new connection to `client`'s Redis, with the I/O timeouts set.
fn connect(
    client: &redis::Client,
    io_timeout: Duration,
) -> Result<redis::Connection, redis::RedisError> {
    let con = client.get_connection_with_timeout(io_timeout)?;
    con.set_read_timeout(Some(io_timeout))?;
    con.set_write_timeout(Some(io_timeout))?;
    Ok(con)
}

/// The bridge's Redis as the route writer writes to it: one run of [`routes::ROUTES`] per call.
struct RedisStore<'a> {
    con: &'a mut Option<redis::Connection>,
    client: &'a redis::Client,
    io_timeout: Duration,
    script: &'a Script,
    digest_key: &'a str,
    ttl_ms: u64,
    status: &'a Status,
}

impl RouteStore for RedisStore<'_> {
    type Error = BeatError;

    fn run(&mut self, writes: &[Write<'_>], reset: bool) -> Result<routes::Digest, BeatError> {
        // Taken out while in use, put back only after a good answer: an error drops it.
        let mut con = match self.con.take() {
            Some(con) => con,
            None => connect(self.client, self.io_timeout)?,
        };
        let (node, boot) = (&self.status.node_id, &self.status.boot_id);
        let mut call = self.script.key(self.digest_key);
        call.arg(boot)
            .arg(self.ttl_ms)
            .arg(routes::PRESENCE_PREFIX)
            .arg(if reset { "1" } else { "0" });
        for w in writes {
            call.arg(w.kind.letter())
                .arg(w.user)
                .arg(w.device)
                .arg(routes::value(node, boot, w.tag))
                .arg(routes::fingerprint(w.user, w.device, w.tag));
        }
        self.status.redis_calls.fetch_add(1, Ordering::Relaxed);
        let reply: Vec<i64> = call.invoke(&mut con)?;
        *self.con = Some(con);
        Ok(routes::parse_digest(&reply)?)
    }
}
