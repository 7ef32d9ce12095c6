//! A running node: the mio driver around the shard cores. Shard threads (one `mio::Poll` each),
//! their listeners, sockets, flusher threads and the clock live here; every decision is made by
//! the sans-IO [`crate::core::ShardCore`] each thread drives.
//!
//! Start-up: each shard opens its own log (`<data_dir>/shard-<i>`, recovering it) and builds its
//! core, which rebuilds the conversations from the log (shards in parallel); what each user's home
//! must know is handed between the cores before any thread runs. Only then are the listeners
//! bound (shard 0 binds the configured address, possibly port 0; the other shards bind the port
//! it got, with `SO_REUSEPORT`), so a client never waits in a backlog while the node recovers: it
//! is refused and retries. The TLS listeners (`listen.tls`, `listen.wss`) bind the same way; their
//! certificate is loaded before anything else, so a bad one stops the start at once. The shard count of a data dir is recorded at its first start
//! (`<data_dir>/shards`) and must not change: conversations are placed by `id % shards`.

mod admission;
pub(crate) mod control;
mod listener;
pub(crate) mod local;
pub(crate) mod shard;
mod socket;
mod stream;
mod udp;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use mio::{Poll, Waker};
use parley_storage::{Log, LogConfig, MmapBackend, Retention, Timestamp};

use crate::admin::{AdminServer, Sources};
use crate::auth::TokenVerifier;
use crate::cluster::Cluster;
use crate::config::{Config, DurabilityPolicy};
use crate::core::{CoreSetup, ShardCore, ShardStats, TestSwitches};
use crate::hooks::{Hooks, Tee};
use crate::tls::{Certificate, TlsError};
use crate::webhook::{Error as WebhookError, Webhooks};
use control::{Completer, Control};
use shard::{Clock, Driver, DriverSetup, Mail};

/// Why a node could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is not usable (e.g. more shards than message ids can tell apart).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The data dir could not be prepared.
    #[error("data dir {path}: {message}")]
    DataDir {
        /// The path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A shard's log could not be opened.
    #[error("shard {shard}: cannot open its log: {message}")]
    Log {
        /// The shard.
        shard: usize,
        /// What went wrong.
        message: String,
    },
    /// A thread could not be started or died.
    #[error("shard thread: {0}")]
    Thread(String),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The cluster bridge could not start (e.g. another live process holds this node id).
    #[error("cluster: {0}")]
    Cluster(String),
}

/// A running node.
pub(crate) struct Node {
    tcp: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    udp: Option<SocketAddr>,
    /// The certificate of the TLS listeners, if any (reloaded by [`Node::reload_tls`]).
    certificate: Option<Arc<Certificate>>,
    handle: ShutdownHandle,
    threads: Vec<JoinHandle<()>>,
    admin: Option<AdminServer>,
    control: Control,
    report: StartupReport,
    /// The webhook senders, drained at the end (after the shards' last events).
    webhooks: Option<(Arc<Webhooks>, std::time::Duration)>,
    /// The cluster bridge (`cluster.redis`), stopped (leaving the registry) after the shards.
    cluster: Option<Cluster>,
}

/// How a node's start went (the binary prints it; scripts and tests read those lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupReport {
    /// From the start to serving, in ms.
    pub ready_ms: u64,
    /// Of which opening (recovering) the logs.
    pub logs_opened_ms: u64,
    /// Of which rebuilding the state from checkpoints and log tails.
    pub rebuilt_ms: u64,
    /// `limits.max_connections` was lowered to fit the open-file limit.
    pub max_connections_lowered: Option<Lowered>,
}

/// `limits.max_connections` lowered to fit the process's open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lowered {
    /// As configured.
    pub configured: usize,
    /// In force.
    pub effective: usize,
    /// The open-file limit.
    pub open_files: u64,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("tcp", &self.tcp)
            .field("ws", &self.ws)
            .field("tls", &self.tls)
            .field("wss", &self.wss)
            .field("udp", &self.udp)
            .field("admin", &self.admin_addr())
            .field("shards", &self.threads.len())
            .finish()
    }
}

/// Asks a node to stop (cloneable, sendable: e.g. into a signal handler).
#[derive(Clone)]
pub(crate) struct ShutdownHandle {
    shards: Vec<(Sender<Mail>, Arc<Waker>)>,
    /// Set by [`ShutdownHandle::shutdown`] (the admin listener's `/readyz` reads it).
    stopping: Arc<AtomicBool>,
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl ShutdownHandle {
    /// Stops accepting, closes every connection with SHUTTING_DOWN after the acks of everything
    /// stored, flushes the logs. [`Node::join`] returns when that is done.
    pub(crate) fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for (tx, waker) in &self.shards {
            // A full inbox still drains; block briefly rather than lose the request.
            let _ = tx.send_timeout(Mail::Shutdown, std::time::Duration::from_secs(1));
            let _ = waker.wake();
        }
    }
}

impl Node {
    /// Starts a node that authenticates connections with `verifier` (an embedding
    /// application's own) and calls `hooks`; `minter` (the node's HS256 secret, if it has one)
    /// signs the dev tokens of `admin.web`.
    pub(crate) fn start_with(
        config: Config,
        verifier: Arc<dyn TokenVerifier>,
        hooks: Option<Arc<dyn Hooks>>,
        minter: Option<crate::auth::Hs256>,
    ) -> Result<Node, NodeError> {
        config
            .validate()
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let shards = config.shard_count();
        if shards > crate::core::ids::MAX_SHARDS {
            return Err(NodeError::Config(format!(
                "at most {} shards",
                crate::core::ids::MAX_SHARDS
            )));
        }
        // The certificate before anything else: a missing or bad file stops the start at once.
        let certificate = if crate::config::Tls::enabled(&config.listen) {
            Some(Arc::new(Certificate::load(&config.tls)?))
        } else {
            None
        };
        let fresh = !config.data_dir.join("shards").exists();
        let shards = check_shard_count(&config.data_dir, shards)?;
        check_cluster_layout(&config, shards, fresh)?;
        let clock = Clock::new();
        let now = clock.now();
        let started = std::time::Instant::now();
        let logs = open_logs(&config, shards, now.unix_ms)?;
        let opened = started.elapsed();

        // Webhooks are observers like the application's hooks (which gate first).
        let hooks_started =
            Webhooks::start(&config.webhooks, &config.node).map_err(|e| match e {
                WebhookError::Thread(_) => NodeError::Thread(e.to_string()),
                _ => NodeError::Config(e.to_string()),
            })?;
        let (webhooks, webhook_stats) =
            hooks_started.map_or((None, None), |(w, s)| (Some(w), Some(s)));
        let hooks: Option<Arc<dyn Hooks>> = match (hooks, &webhooks) {
            (h, None) => h,
            (None, Some(w)) => Some(Arc::clone(w) as Arc<dyn Hooks>),
            (Some(app), Some(w)) => Some(Arc::new(Tee(vec![app, Arc::clone(w) as Arc<dyn Hooks>]))),
        };

        // The shards' polls, wakers and inboxes first: the cores' hooks answer through them.
        let mut polls = Vec::new();
        let mut peers = Vec::new();
        let mut inboxes = Vec::new();
        let mut answers = Vec::new();
        let mut answer_rx = Vec::new();
        for _ in 0..shards {
            let poll = Poll::new().map_err(|e| NodeError::Thread(e.to_string()))?;
            let waker = Arc::new(
                Waker::new(poll.registry(), shard::WAKER)
                    .map_err(|e| NodeError::Thread(e.to_string()))?,
            );
            let (tx, rx) = crossbeam_channel::bounded(shard::INBOX_MAILS);
            let (atx, arx) = crossbeam_channel::unbounded();
            answers.push((atx, Arc::clone(&waker)));
            answer_rx.push(arx);
            peers.push((tx, waker));
            inboxes.push(rx);
            polls.push(poll);
        }
        let completions: Arc<dyn crate::hooks::Completions> = Arc::new(Completer { answers });

        // Build every core (rebuilding its state from its log), shards in parallel.
        let mut cores: Vec<ShardCore<MmapBackend>> = std::thread::scope(|s| {
            let handles: Vec<_> = logs
                .into_iter()
                .enumerate()
                .map(|(index, log)| {
                    let setup = CoreSetup {
                        index,
                        shards,
                        config: config.clone(),
                        verifier: Arc::clone(&verifier),
                        log,
                        now,
                        quiet: false,
                        switches: TestSwitches::default(),
                        hooks: hooks.clone(),
                        completions: Some(Arc::clone(&completions)),
                    };
                    s.spawn(move || ShardCore::new(setup))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| NodeError::Thread("a shard panicked at start".into()))
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        // What each user's home must know, before any client is served.
        crate::core::exchange_startup_mail(&mut cores, now);
        let mut report = StartupReport {
            ready_ms: started.elapsed().as_millis() as u64,
            logs_opened_ms: opened.as_millis() as u64,
            rebuilt_ms: (started.elapsed() - opened).as_millis() as u64,
            max_connections_lowered: None,
        };
        // Ready: now the listeners.
        let mut tcp_listeners = Vec::new();
        let mut ws_listeners = Vec::new();
        let tcp = bind_all(config.listen.tcp, shards, &mut tcp_listeners)?;
        let ws = bind_all(config.listen.ws, shards, &mut ws_listeners)?;
        let mut tls_listeners = Vec::new();
        let mut wss_listeners = Vec::new();
        let tls = bind_all(config.listen.tls, shards, &mut tls_listeners)?;
        let wss = bind_all(config.listen.wss, shards, &mut wss_listeners)?;
        let mut udp_sockets = Vec::new();
        let udp = bind_udp(&config, shards, &mut udp_sockets)?;
        let admin_listener = match config.admin.listen {
            Some(addr) => {
                Some(AdminServer::bind(addr).map_err(|source| NodeError::Bind { addr, source })?)
            }
            None => None,
        };
        // Registered before any client is served: a live process holding this node id stops
        // the start here. Dropped (leaving the registry) if the start fails after this.
        let link_key = crate::cluster::link_key(&config, minter.as_ref());
        let cluster = Cluster::start(&config, peers.clone(), link_key, shards)
            .map_err(|e| NodeError::Cluster(e.to_string()))?;
        let bridge = cluster.as_ref().map(|c| c.status().sender());
        let carrier = cluster.as_ref().and_then(Cluster::carrier);

        let (max_connections, files) =
            admission::effective_max_connections(config.limits.max_connections, shards);
        if let Some(files) = files {
            report.max_connections_lowered = Some(Lowered {
                configured: config.limits.max_connections,
                effective: max_connections,
                open_files: files,
            });
        }
        let admission = Arc::new(admission::Admission::new(&config.limits, max_connections));
        let stats = Arc::new(Mutex::new(vec![ShardStats::default(); shards]));
        let mut tcp_iter = tcp_listeners.into_iter();
        let mut ws_iter = ws_listeners.into_iter();
        let mut tls_iter = tls_listeners.into_iter();
        let mut wss_iter = wss_listeners.into_iter();
        let mut udp_iter = udp_sockets.into_iter();
        let mut threads = Vec::new();
        let mut answer_rx = answer_rx.into_iter();
        for (index, ((poll, inbox), core)) in polls.into_iter().zip(inboxes).zip(cores).enumerate()
        {
            let answers = answer_rx
                .next()
                .ok_or_else(|| NodeError::Thread("no answer channel".into()))?;
            let setup = DriverSetup {
                index,
                core,
                poll,
                waker: Arc::clone(&peers[index].1),
                tcp: tcp_iter.next(),
                ws: ws_iter.next(),
                tls: tls_iter.next(),
                wss: wss_iter.next(),
                certificate: certificate.clone(),
                handshake_timeout_ms: config.tls.handshake_timeout_ms,
                udp: udp_iter.next(),
                inbox,
                peers: peers.clone(),
                admission: Arc::clone(&admission),
                read_budget: config.limits.read_budget_bytes,
                close_linger_ms: config.timeouts.close_linger_ms,
                close_discard_bytes: config.limits.close_discard_bytes,
                clock,
                stats: Arc::clone(&stats),
                answers,
                bridge: bridge.clone(),
                carrier: carrier.clone(),
                // With `cluster.nodes` a node owns its conversations only under its lease.
                lease: cluster
                    .as_ref()
                    .filter(|_| !config.cluster.nodes.is_empty())
                    .map(Cluster::lease),
            };
            let driver = Driver::new(setup).map_err(|e| NodeError::Thread(e.to_string()))?;
            let thread = std::thread::Builder::new()
                .name(format!("parley-shard-{index}"))
                .spawn(move || driver.run())
                .map_err(|e| NodeError::Thread(e.to_string()))?;
            threads.push(thread);
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let control = Control::new(peers.clone(), Arc::clone(&stopping), Arc::clone(&stats));
        let handle = ShutdownHandle {
            shards: peers,
            stopping,
        };
        // Only now, with the logs recovered and the listeners bound, is the node ready.
        let admin = match admin_listener {
            None => None,
            Some(listener) => {
                let sources = Sources {
                    stats: Arc::clone(&stats),
                    stopping: Arc::clone(&handle.stopping),
                    control: control.clone(),
                    ws,
                    minter,
                    cluster: cluster.as_ref().map(Cluster::status),
                };
                match AdminServer::start_with_webhooks(listener, &config, sources, webhook_stats) {
                    Ok(server) => {
                        if config.admin.web {
                            tracing::warn!(
                                admin = %server.addr(),
                                "admin.web is on: DEV ONLY. http://{}/chat/ serves the browser \
                                 page and /dev/token mints a token for ANY user without \
                                 authentication; never expose this listener",
                                server.addr()
                            );
                        }
                        Some(server)
                    }
                    Err(e) => {
                        handle.shutdown();
                        for t in threads {
                            let _ = t.join();
                        }
                        return Err(NodeError::Thread(format!(
                            "cannot start the admin listener: {e}"
                        )));
                    }
                }
            }
        };
        Ok(Node {
            tcp,
            ws,
            tls,
            wss,
            udp,
            certificate,
            handle,
            threads,
            admin,
            control,
            report,
            webhooks: webhooks.map(|w| {
                let drain = std::time::Duration::from_millis(config.webhooks.shutdown_drain_ms);
                (w, drain)
            }),
            cluster,
        })
    }

    /// How the start went.
    pub(crate) fn report(&self) -> StartupReport {
        self.report
    }

    /// The application's way into the node.
    pub(crate) fn control(&self) -> &Control {
        &self.control
    }

    /// The TCP listener's address (port 0 resolved), if TCP is enabled.
    pub(crate) fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The WebSocket listener's address (port 0 resolved), if enabled.
    pub(crate) fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws
    }

    /// The TLS listener's address (port 0 resolved), if enabled (`listen.tls`).
    pub(crate) fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// The WebSocket-over-TLS listener's address (port 0 resolved), if enabled (`listen.wss`).
    pub(crate) fn wss_addr(&self) -> Option<SocketAddr> {
        self.wss
    }

    /// The UDP address (port 0 resolved), if enabled (`listen.udp`).
    pub(crate) fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp
    }

    /// The certificate the TLS listeners serve, if any.
    pub(crate) fn certificate(&self) -> Option<Arc<Certificate>> {
        self.certificate.clone()
    }

    /// The admin HTTP listener's address (port 0 resolved), if enabled (`admin.listen`).
    pub(crate) fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::addr)
    }

    /// A handle that stops the node.
    pub(crate) fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Waits until every shard has stopped.
    pub(crate) fn join(self) -> Result<(), NodeError> {
        let mut failed = 0;
        for t in self.threads {
            if t.join().is_err() {
                failed += 1;
            }
        }
        // The shards' last events (the logouts of shutdown) are queued: drain them, bounded.
        if let Some((webhooks, drain)) = &self.webhooks {
            webhooks.shutdown(std::time::Instant::now() + *drain);
        }
        // The shards have stopped: leave the registry, so the other nodes see it at once.
        if let Some(cluster) = self.cluster {
            cluster.stop();
        }
        // The admin listener answers (`/readyz`: 503) until the shards have stopped.
        if let Some(admin) = self.admin {
            admin.stop();
        }
        if failed > 0 {
            return Err(NodeError::Thread(format!(
                "{failed} shard thread(s) panicked"
            )));
        }
        Ok(())
    }
}

/// Opens (recovers) every shard's log; a failure stops the start before any thread runs.
fn open_logs(
    config: &Config,
    shards: usize,
    unix_ms: i64,
) -> Result<Vec<Log<MmapBackend>>, NodeError> {
    let log_config = LogConfig {
        segment_size: config.storage.segment_bytes,
        durability: log_durability(config),
        retention: Retention {
            max_age: config
                .storage
                .retention_max_age_secs
                .map(std::time::Duration::from_secs),
            max_bytes: config.storage.retention_max_bytes,
        },
        prefault: true,
    };
    let now = Timestamp::from_micros(unix_ms.saturating_mul(1000));
    let mut logs = Vec::new();
    for i in 0..shards {
        let dir = config.data_dir.join(format!("shard-{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| NodeError::DataDir {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let backend = MmapBackend::open(&dir).map_err(|e| NodeError::Log {
            shard: i,
            message: e.to_string(),
        })?;
        let (log, report) = Log::open(backend, log_config, now).map_err(|e| NodeError::Log {
            shard: i,
            message: e.to_string(),
        })?;
        if report.torn_tail.is_some() || !report.corruptions.is_empty() {
            tracing::warn!(
                shard = i,
                torn_tail = ?report.torn_tail,
                corruptions = report.corruptions.len(),
                "recovered its log (a torn tail cut, corrupt records skipped)"
            );
        }
        logs.push(log);
    }
    Ok(logs)
}

/// How a log's durability policy maps from the node configuration.
pub(crate) fn log_durability(c: &Config) -> parley_storage::Durability {
    use parley_storage::Durability;
    match c.storage.durability {
        DurabilityPolicy::Always => Durability::Always,
        DurabilityPolicy::Interval => Durability::Interval(std::time::Duration::from_millis(
            c.storage.flush_interval_ms,
        )),
        DurabilityPolicy::Never => Durability::Never,
    }
}

/// Binds one listener per shard on `addr`: the first decides the port, the rest share it.
fn bind_all(
    addr: Option<SocketAddr>,
    shards: usize,
    out: &mut Vec<mio::net::TcpListener>,
) -> Result<Option<SocketAddr>, NodeError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let first = listener::bind(addr, true).map_err(|source| NodeError::Bind { addr, source })?;
    let bound = first
        .local_addr()
        .map_err(|source| NodeError::Bind { addr, source })?;
    out.push(first);
    for _ in 1..shards {
        out.push(
            listener::bind(bound, true).map_err(|source| NodeError::Bind {
                addr: bound,
                source,
            })?,
        );
    }
    Ok(Some(bound))
}

/// Binds one UDP socket per shard on `listen.udp` (the first decides the port, the rest share
/// it with `SO_REUSEPORT`), each with its endpoint; the shards share one cookie secret, drawn
/// here.
fn bind_udp(
    config: &Config,
    shards: usize,
    out: &mut Vec<udp::Endpoint>,
) -> Result<Option<SocketAddr>, NodeError> {
    let Some(addr) = config.listen.udp else {
        return Ok(None);
    };
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| NodeError::Thread(format!("no randomness for the UDP cookie secret: {e}")))?;
    let u = &config.udp;
    let shared = udp::Shared {
        cookies: Arc::new(udp::Cookies::new(&secret, u.cookie_lifetime_ms)),
        open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        max_sessions: u.max_sessions,
        pacing: udp::Pacing {
            rate_per_sec: u.pacing_rate_bytes_per_sec,
            burst: u32::try_from(u.pacing_burst_bytes).unwrap_or(u32::MAX),
        },
        max_datagram: u.max_datagram_bytes,
        login_ms: config.timeouts.login_ms,
    };
    let buffer = u.socket_buffer_bytes;
    let first = udp::bind(addr, buffer).map_err(|source| NodeError::Bind { addr, source })?;
    let bound = first
        .local_addr()
        .map_err(|source| NodeError::Bind { addr, source })?;
    let mut sockets = vec![first];
    for _ in 1..shards {
        let socket = udp::bind(bound, buffer).map_err(|source| NodeError::Bind {
            addr: bound,
            source,
        })?;
        sockets.push(socket);
    }
    // With the whole group bound (its sockets indexed in shard order), steer by session id.
    #[cfg(target_os = "linux")]
    if shards > 1
        && let Some(first) = sockets.first()
        && let Err(e) = udp::steer_by_session(first)
    {
        tracing::warn!(
            "cannot steer UDP datagrams to their session's shard ({e}); shards pass them on"
        );
    }
    out.extend(
        sockets
            .into_iter()
            .map(|s| udp::Endpoint::new(s, shared.clone())),
    );
    Ok(Some(bound))
}

/// Records the shard count at a data dir's first start; later starts must use the same.
/// With `cluster.nodes` (and `cluster.redis`): the cluster's shards fit the message id layout,
/// and the node list is the one the data directory was created with (recorded in
/// `<data_dir>/cluster-nodes` at the first start with one): the homes and conversations a data
/// directory holds were placed by it. A data directory used before without it (not `fresh`)
/// cannot join a cluster of several nodes: its conversations were placed on this node alone.
fn check_cluster_layout(config: &Config, shards: usize, fresh: bool) -> Result<(), NodeError> {
    let c = &config.cluster;
    if c.redis.is_none() || c.nodes.is_empty() {
        return Ok(());
    }
    if c.nodes.len() * shards > crate::core::ids::MAX_SHARDS {
        return Err(NodeError::Config(format!(
            "cluster.nodes lists {} nodes of {shards} shards each: a cluster has at most {} \
             shards in all",
            c.nodes.len(),
            crate::core::ids::MAX_SHARDS
        )));
    }
    let mut nodes = c.nodes.clone();
    nodes.sort_unstable();
    let text = format!("{}\n", nodes.join("\n"));
    let dir = &config.data_dir;
    let err = |message: String| NodeError::DataDir {
        path: dir.display().to_string(),
        message,
    };
    let file = dir.join("cluster-nodes");
    match std::fs::read_to_string(&file) {
        Ok(recorded) if recorded == text => Ok(()),
        Ok(recorded) => Err(err(format!(
            "this data directory belongs to the cluster of nodes [{}], not [{}] (cluster.nodes): \
             conversations and homes are placed by the node list, which cannot change",
            recorded.trim().replace('\n', ", "),
            nodes.join(", ")
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !fresh && nodes.len() > 1 => {
            Err(err(
                "this data directory was used without cluster.nodes: its conversations were \
                 placed on this node alone. A node joins a cluster of several nodes with an empty \
                 data directory"
                    .into(),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&file, text).map_err(|e| err(e.to_string()))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn check_shard_count(dir: &Path, shards: usize) -> Result<usize, NodeError> {
    let err = |message: String| NodeError::DataDir {
        path: dir.display().to_string(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let file = dir.join("shards");
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let recorded: usize = text
                .trim()
                .parse()
                .map_err(|_| err(format!("{} does not hold a shard count", file.display())))?;
            if recorded != shards {
                tracing::warn!(
                    "data dir was created with {recorded} shards; using {recorded} (conversations are placed by shard count)"
                );
            }
            Ok(recorded)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&file, format!("{shards}\n")).map_err(|e| err(e.to_string()))?;
            Ok(shards)
        }
        Err(e) => Err(err(e.to_string())),
    }
}
