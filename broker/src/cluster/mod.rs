//! Several nodes over one Redis (`[cluster]`): the node registry, the presence index, the links
//! between nodes and the mail that crosses them.
//!
//! With `cluster.redis` set, the node starts a **bridge thread** ([`bridge`]), the only place
//! that talks to Redis (never a shard thread). It registers the node (node id, a boot id drawn
//! at start, the advertise address, the start time) under a lease of `cluster.lease_ms`, renews
//! it every `cluster.heartbeat_ms`, and with the same round trip reads every live node
//! ([`registry`] has the data model). Joins and leaves are logged, one line per change; the
//! view is published in [`Status`], which `/metrics` (`parley_cluster_*`) and `GET /v1/cluster`
//! read. The lease's deadline (the time the last renewal was sent plus `lease_ms`) is published
//! as a [`Lease`]: with `cluster.nodes`, a shard assigns seqs only before it.
//!
//! It also keeps the **presence index** ([`routes`]): shards send it route ops (a device logged
//! in here, a connection gone) over its inbox, the same kind of bounded channel shards use among
//! themselves; it writes them in batches and answers each waiting login in the shard's inbox
//! (the core's side is `crate::core::route`). A digest compared after every batch and at every
//! heartbeat makes it replay every route when Redis lost them. What to write when is decided by
//! the sans-IO [`writer`], which a property test runs against a faulty model of Redis.
//!
//! With `cluster.listen`, a **link thread** ([`link`]) keeps one authenticated TCP link per pair
//! of live nodes (the bridge hands it the membership at each heartbeat). With `cluster.nodes`,
//! the links carry the shards' mail ([`carrier`]): conversations and users' homes are placed
//! over the listed nodes (`crate::core::conv::Placement`), so a shard's mail for another node's
//! shard goes on the link to that node, encoded once per batch (`crate::core::wire`). What a
//! shard does when a node cannot be reached, a link goes down or comes up is
//! `crate::core::remote`; how a client connected to a node that is not its user's home is
//! relayed to its session there is `crate::core::relay`.
//!
//! Failures:
//! * Redis unreachable: the node keeps serving; the bridge retries with back-off (from 100 ms,
//!   doubling up to `heartbeat_ms`), logs the first error and then at most one line per 10 s,
//!   counts every error (`parley_cluster_redis_errors_total`), and reports its lease lost
//!   (`parley_cluster_lease_ok 0`, and a log line) once `lease_ms` has passed without a
//!   renewal; with `cluster.nodes` its shards then store nothing (UNAVAILABLE) until it renewed.
//!   The membership view keeps what was last read.
//! * Two processes with one node id: the registration is held by a boot id. A process starting
//!   while another boot holds its id watches that lease for up to `lease_ms` + `heartbeat_ms`: if
//!   the holder renews it, it is alive and the new process **refuses to start**, naming both boot
//!   ids; if the lease expires instead (a previous run killed), it takes the id over. A running
//!   process that finds its id held by another boot (it was paused or cut off past its lease,
//!   and another process took the id) never writes over it: it logs an error (rate-limited)
//!   and reports its lease lost until the other one's lease ends.
//! * A login waits at most `cluster.route_timeout_ms` for its route, then is closed
//!   UNAVAILABLE with a retry hint; route ops that failed stay queued and are retried.
//! * A node down: its conversations and its users' homes answer UNAVAILABLE until it returns
//!   with its disk (nothing is handed over, so nothing acked can be lost or numbered twice).
//! * Clean shutdown deletes the registration, so the others see the node leave at their next
//!   heartbeat instead of after its lease.
//!
//! ### What is not built yet
//! * Growing or shrinking `cluster.nodes` (moving conversations and homes to other nodes).
//! * A simulation of several nodes (the simulation runs one node, with a simulated index).

mod bridge;
pub(crate) mod carrier;
pub(crate) mod link;
pub(crate) mod registry;
pub(crate) mod routes;
pub(crate) mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use crate::config::Config;
use crate::node::shard::Peer;
pub(crate) use bridge::BridgeMsg;
pub(crate) use registry::Member;
pub(crate) use routes::Found;

/// Why the cluster bridge could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClusterError {
    /// `cluster.redis` is not a URL the Redis client takes.
    #[error("cluster.redis {url}: {message}")]
    Url {
        /// The URL, its password redacted.
        url: String,
        /// Why not.
        message: String,
    },
    /// Another live process holds this node id.
    #[error(
        "node id {node_id:?} is held by another live process (boot {holder_boot}) that renews its \
         lease in Redis; this process (boot {boot_id}) refuses to start. Give every node its own \
         cluster.node_id (default: its `node` name)"
    )]
    Duplicate {
        /// The node id.
        node_id: String,
        /// The holder's boot id.
        holder_boot: String,
        /// This process's boot id.
        boot_id: String,
    },
    /// The bridge or link thread could not be started.
    #[error("cannot start the cluster bridge thread: {0}")]
    Thread(String),
    /// `cluster.listen` could not be bound.
    #[error("cannot listen for cluster links on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why not.
        source: std::io::Error,
    },
    /// Links without a key to prove.
    #[error(
        "cluster.listen is set but there is no link key: set cluster.secret (the same on every \
         node), or use the built-in token secret"
    )]
    NoLinkKey,
}

/// What the bridge publishes for the admin listener.
#[derive(Debug)]
pub(crate) struct Status {
    /// This node's id.
    pub(crate) node_id: String,
    /// This process's boot id.
    pub(crate) boot_id: String,
    /// Whether this process holds an unexpired lease (renewed within `lease_ms`).
    lease_ok: AtomicBool,
    /// Redis errors (connect, I/O, bad answers) since start.
    errors: AtomicU64,
    /// The live nodes last read, this one included when it holds its lease.
    members: Mutex<Vec<Member>>,
    /// The bridge's inbox (route ops from the shards, lookups).
    inbox: Sender<BridgeMsg>,
    /// Routes this node holds in the presence index.
    routes: AtomicU64,
    /// Route ops written (registrations, withdrawals, replays).
    route_writes: AtomicU64,
    /// Redis calls made (each script run is one command on the wire).
    redis_calls: AtomicU64,
    /// Replays of every route after the digest differed.
    replays: AtomicU64,
    /// The link thread's view, with `cluster.listen` set.
    links: std::sync::OnceLock<Arc<link::LinkStatus>>,
    /// Until when this process holds its lease (see [`Lease`]).
    lease: Lease,
}

/// Until when this process holds its lease: the time its last renewal was sent plus
/// `cluster.lease_ms` (`None`: not held). A node acts as the owner of its conversations only
/// before this deadline: a process paused past it (and perhaps replaced by another process
/// with its node id) assigns no seq until it renewed it, which it cannot while another holds
/// the id.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lease(Arc<Mutex<Option<std::time::Instant>>>);

impl Lease {
    /// The deadline now.
    pub(crate) fn until(&self) -> Option<std::time::Instant> {
        self.0.lock().ok().and_then(|l| *l)
    }

    /// Sets the deadline.
    fn set(&self, until: Option<std::time::Instant>) {
        if let Ok(mut l) = self.0.lock() {
            *l = until;
        }
    }
}

/// A copy of [`Status`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Snapshot {
    /// This node's id.
    pub(crate) node_id: String,
    /// This process's boot id.
    pub(crate) boot_id: String,
    /// Whether this process holds an unexpired lease.
    pub(crate) lease_ok: bool,
    /// Redis errors since start.
    pub(crate) redis_errors: u64,
    /// The live nodes last read, by node id.
    pub(crate) members: Vec<Member>,
    /// Routes this node holds in the presence index.
    pub(crate) routes: u64,
    /// Route ops written since start.
    pub(crate) route_writes: u64,
    /// Redis calls since start.
    pub(crate) redis_calls: u64,
    /// Route replays since start.
    pub(crate) route_replays: u64,
    /// The links up now, by node id (empty without `cluster.listen`).
    pub(crate) links: Vec<link::LinkView>,
    /// Links established since start.
    pub(crate) links_opened: u64,
    /// Link handshakes that failed since start.
    pub(crate) link_handshake_failures: u64,
    /// Whether the node takes logins: with `cluster.nodes`, once it has heard from the other
    /// live nodes since it started (always true without).
    pub(crate) settled: bool,
}

impl Status {
    /// A copy of the status now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            node_id: self.node_id.clone(),
            boot_id: self.boot_id.clone(),
            lease_ok: self.lease_ok.load(Ordering::SeqCst),
            redis_errors: self.errors.load(Ordering::Relaxed),
            members: self.members.lock().map(|m| m.clone()).unwrap_or_default(),
            routes: self.routes.load(Ordering::Relaxed),
            route_writes: self.route_writes.load(Ordering::Relaxed),
            redis_calls: self.redis_calls.load(Ordering::Relaxed),
            route_replays: self.replays.load(Ordering::Relaxed),
            links: self
                .links
                .get()
                .and_then(|l| l.up.lock().ok().map(|m| m.values().cloned().collect()))
                .unwrap_or_default(),
            links_opened: self
                .links
                .get()
                .map_or(0, |l| l.opened.load(Ordering::Relaxed)),
            link_handshake_failures: self
                .links
                .get()
                .map_or(0, |l| l.handshake_failures.load(Ordering::Relaxed)),
            settled: self
                .links
                .get()
                .and_then(|l| l.settled.as_ref())
                .is_none_or(|s| s.load(Ordering::Acquire)),
        }
    }

    /// The live routes of `user` in the presence index (asks the bridge; waits at most
    /// `timeout`).
    pub(crate) fn lookup(
        &self,
        user: &str,
        timeout: std::time::Duration,
    ) -> Result<Vec<Found>, String> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.inbox
            .try_send(BridgeMsg::Lookup {
                user: user.to_owned(),
                reply,
            })
            .map_err(|_| "the cluster bridge is busy or stopped".to_owned())?;
        answer
            .recv_timeout(timeout)
            .map_err(|_| "the cluster bridge did not answer in time".to_owned())?
    }

    /// Where shards send route ops.
    pub(crate) fn sender(&self) -> Sender<BridgeMsg> {
        self.inbox.clone()
    }
}

/// A running cluster bridge.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// What it publishes.
    status: Arc<Status>,
    /// Tells the bridge thread to leave and stop.
    stop: Sender<()>,
    /// The bridge thread.
    thread: Option<JoinHandle<()>>,
    /// The link thread (with `cluster.listen`), stopped after the bridge.
    links: Option<link::Links>,
}

impl Cluster {
    /// Starts the bridge of `config` if `cluster.redis` is set (else `None`: no Redis at all).
    /// Registers the node first, bounded: a live process holding the same node id is an error;
    /// an unreachable Redis is not (the bridge keeps trying).
    ///
    /// With `cluster.listen`, the link thread starts first (its bound address is what is
    /// advertised unless `cluster.advertise` says otherwise); `link_key` is the key links prove
    /// (`cluster.secret`'s, or one derived from the token secret).
    pub(crate) fn start(
        config: &Config,
        peers: Vec<Peer>,
        link_key: Option<[u8; 32]>,
        shards: usize,
    ) -> Result<Option<Cluster>, ClusterError> {
        let Some(url) = &config.cluster.redis else {
            return Ok(None);
        };
        let mut bridge = bridge::Bridge::new(config, url)?;
        bridge.set_peers(peers.clone());
        let links = match config.cluster.listen {
            None => None,
            Some(addr) => {
                let key = link_key.ok_or(ClusterError::NoLinkKey)?;
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|source| ClusterError::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| ClusterError::Bind { addr, source })?;
                let status = bridge.status();
                let links = link::Links::start(
                    link::LinkIdentity {
                        node_id: status.node_id.clone(),
                        boot_id: status.boot_id.clone(),
                        key,
                        heartbeat: std::time::Duration::from_millis(config.cluster.heartbeat_ms),
                        layout: carrier::layout(config, shards),
                    },
                    listener,
                    config,
                    peers,
                )
                .map_err(|e| ClusterError::Thread(e.to_string()))?;
                let _ = status.links.set(links.status());
                if config.cluster.advertise.is_none() {
                    bridge.set_advertise(bound.to_string());
                }
                tracing::info!(listen = %bound, "cluster: accepting links from other nodes");
                bridge.set_links(links.commands());
                Some(links)
            }
        };
        bridge.register()?;
        let status = bridge.status();
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("parley-cluster".into())
            .spawn(move || bridge.run(&stopped))
            .map_err(|e| ClusterError::Thread(e.to_string()))?;
        Ok(Some(Cluster {
            status,
            stop,
            thread: Some(thread),
            links,
        }))
    }

    /// Until when this process holds its lease.
    pub(crate) fn lease(&self) -> Lease {
        self.status.lease.clone()
    }

    /// The shards' way to the other nodes (with `cluster.nodes`).
    pub(crate) fn carrier(&self) -> Option<carrier::Carrier> {
        self.links.as_ref().and_then(link::Links::carrier)
    }

    /// What the bridge publishes.
    pub(crate) fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    /// Removes the node's registration and stops the bridge thread (as dropping it does).
    pub(crate) fn stop(self) {
        drop(self);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The links after the bridge: it no longer tells them anything.
        drop(self.links.take());
    }
}

/// The link key of `config`: `cluster.secret`'s (HMAC-derived, so any length of secret gives
/// a 32-byte key), else one derived from the token secret `minter` holds, if any.
pub(crate) fn link_key(config: &Config, minter: Option<&crate::auth::Hs256>) -> Option<[u8; 32]> {
    const LABEL: &[u8] = b"parley cluster link key v1";
    match &config.cluster.secret {
        Some(s) => Some(crate::auth::Hs256::new(s.expose().as_bytes()).derive_key(LABEL)),
        None => minter.map(|m| m.derive_key(LABEL)),
    }
}

/// A new boot id: 16 hex digits, random.
fn boot_id() -> String {
    let random = getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: the time and the pid still tell two boots apart in practice.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (u64::from(std::process::id()) << 32)
    });
    format!("{random:016x}")
}
