//! A running node: shard threads, their listeners and logs, started and stopped together.
//!
//! Start-up: the listeners are bound here, so their real ports are known before any thread runs
//! (shard 0 binds the configured address, possibly port 0; the other shards bind the port it got,
//! with SO_REUSEPORT, and the kernel spreads connections over them). Each shard opens its own log
//! (`<data_dir>/shard-<i>`), rebuilds its conversations from it and sends every user's home shard
//! what that user's conversations hold; a barrier makes sure all of that is in before any shard
//! serves a client. The shard count of a data dir is recorded at its first start
//! (`<data_dir>/shards`) and must not change: conversations are placed by `id % shards`.

mod conv;
mod ids;
mod msg;
mod session;
mod shard;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use mio::{Poll, Token, Waker};
use parley_storage::{Log, LogConfig, MmapBackend, Retention, Timestamp};

use crate::auth::{Hs256, TokenVerifier};
use crate::config::Config;
use crate::net::listener;
use msg::ShardMsg;

/// The hash map of the shard's hot-path state (users, conversations, de-duplication windows,
/// a session's unacked deliveries): foldhash, several times faster than the default SipHash on
/// the short string and integer keys used here, with a per-process random seed.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

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
}

/// A running node.
pub struct Node {
    tcp: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    handle: ShutdownHandle,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("tcp", &self.tcp)
            .field("ws", &self.ws)
            .field("shards", &self.threads.len())
            .finish()
    }
}

/// Asks a node to stop (cloneable, sendable: e.g. into a signal handler).
#[derive(Clone)]
pub struct ShutdownHandle {
    shards: Vec<(Sender<Vec<ShardMsg>>, Arc<Waker>)>,
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
    pub fn shutdown(&self) {
        for (tx, waker) in &self.shards {
            // A full inbox still drains; block briefly rather than lose the request.
            let _ = tx.send_timeout(vec![ShardMsg::Shutdown], std::time::Duration::from_secs(1));
            let _ = waker.wake();
        }
    }
}

const WAKER: Token = Token(0);

impl Node {
    /// Starts a node with the HS256 token `secret`.
    pub fn start(config: Config, secret: Vec<u8>) -> Result<Node, NodeError> {
        Self::start_with_verifier(config, Arc::new(Hs256::new(secret)))
    }

    /// Starts a node that authenticates connections with `verifier` (an embedding
    /// application's own).
    pub fn start_with_verifier(
        config: Config,
        verifier: Arc<dyn TokenVerifier>,
    ) -> Result<Node, NodeError> {
        config
            .validate()
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let shards = config.shard_count();
        if shards > ids::MAX_SHARDS {
            return Err(NodeError::Config(format!(
                "at most {} shards",
                ids::MAX_SHARDS
            )));
        }
        let shards = check_shard_count(&config.data_dir, shards)?;

        let mut tcp_listeners = Vec::new();
        let mut ws_listeners = Vec::new();
        let tcp = bind_all(config.listen.tcp, shards, &mut tcp_listeners)?;
        let ws = bind_all(config.listen.ws, shards, &mut ws_listeners)?;

        let mut polls = Vec::new();
        let mut peers = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..shards {
            let poll = Poll::new().map_err(|e| NodeError::Thread(e.to_string()))?;
            let waker = Arc::new(
                Waker::new(poll.registry(), WAKER).map_err(|e| NodeError::Thread(e.to_string()))?,
            );
            let (tx, rx) = crossbeam_channel::bounded(shard::INBOX_BATCHES);
            peers.push((tx, waker));
            inboxes.push(rx);
            polls.push(poll);
        }

        let config = Arc::new(config);
        let connections = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(shards));
        let now = Timestamp::from_system_time(std::time::SystemTime::now());
        let log_config = LogConfig {
            segment_size: config.storage.segment_bytes,
            durability: shard::log_durability(&config),
            retention: Retention {
                max_age: config
                    .storage
                    .retention_max_age_secs
                    .map(std::time::Duration::from_secs),
                max_bytes: config.storage.retention_max_bytes,
            },
            prefault: true,
        };
        // Open every log first, so a failure stops the start before any thread runs.
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
            let (log, report) =
                Log::open(backend, log_config, now).map_err(|e| NodeError::Log {
                    shard: i,
                    message: e.to_string(),
                })?;
            if report.torn_tail.is_some() || !report.corruptions.is_empty() {
                eprintln!(
                    "shard {i}: recovered its log: torn tail {:?}, {} corruption(s) skipped",
                    report.torn_tail,
                    report.corruptions.len()
                );
            }
            logs.push(log);
        }

        let mut shard_states = Vec::new();
        let mut tcp_iter = tcp_listeners.into_iter();
        let mut ws_iter = ws_listeners.into_iter();
        for (i, ((poll, inbox), log)) in polls.into_iter().zip(inboxes).zip(logs).enumerate() {
            let setup = shard::ShardSetup {
                index: i,
                shards,
                config: Arc::clone(&config),
                verifier: Arc::clone(&verifier),
                waker: Arc::clone(&peers[i].1),
                poll,
                tcp: tcp_iter.next(),
                ws: ws_iter.next(),
                inbox,
                peers: peers.clone(),
                log,
                connections: Arc::clone(&connections),
                barrier: Arc::clone(&barrier),
            };
            shard_states.push(setup);
        }
        let mut threads = Vec::new();
        for setup in shard_states {
            let index = setup.index;
            let barrier = Arc::clone(&setup.barrier);
            let thread = std::thread::Builder::new()
                .name(format!("parley-shard-{index}"))
                .spawn(move || match shard::Shard::new(setup) {
                    Ok(s) => s.run(barrier),
                    Err(e) => {
                        eprintln!("shard {index}: cannot start: {e}");
                        barrier.wait();
                    }
                })
                .map_err(|e| NodeError::Thread(e.to_string()))?;
            threads.push(thread);
        }
        Ok(Node {
            tcp,
            ws,
            handle: ShutdownHandle { shards: peers },
            threads,
        })
    }

    /// The TCP listener's address (port 0 resolved), if TCP is enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The WebSocket listener's address (port 0 resolved), if enabled.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws
    }

    /// A handle that stops the node.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Waits until every shard has stopped.
    pub fn join(self) -> Result<(), NodeError> {
        let mut failed = 0;
        for t in self.threads {
            if t.join().is_err() {
                failed += 1;
            }
        }
        if failed > 0 {
            return Err(NodeError::Thread(format!(
                "{failed} shard thread(s) panicked"
            )));
        }
        Ok(())
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

/// Records the shard count at a data dir's first start; later starts must use the same.
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
                eprintln!(
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
