//! Embedding: start a node inside an application and work with it.
//!
//! ```no_run
//! use parley_broker::{Broker, config::Config};
//! use parley_broker::proto::pb;
//!
//! let mut config = Config::default();
//! config.data_dir = "/tmp/my-app-data".into();
//! let broker = Broker::new(config).secret(b"a secret of at least 32 bytes!!!!".to_vec()).start()?;
//! // The application posts a message as "alice" to "bob" (stored, then delivered to bob's
//! // devices, over sockets or in-process).
//! let bob = pb::Conversation {
//!     r#type: pb::ConversationType::Direct as i32,
//!     id: "bob".into(),
//! };
//! let ack = broker.post("alice", bob, "hello", false)?;
//! assert_eq!(ack.seq, 1);
//! broker.shutdown();
//! broker.join()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use parley_proto::pb;

use crate::auth::{Hs256, TokenVerifier};
use crate::config::Config;
use crate::core::{ConversationInfo, Counters};
use crate::hooks::{ConversationRef, Hooks};
use crate::local::{LocalClient, LocalError};
use crate::node::control::Control;
pub use crate::node::control::ControlError;
use crate::node::{Node, NodeError, ShutdownHandle, StartupReport};
use crate::tls::{Certificate, TlsError};

pub use crate::node::control::SERVICE_DEVICE;

/// Builds a node: its configuration, how it authenticates, its hooks.
pub struct Broker {
    config: Config,
    verifier: Option<Arc<dyn TokenVerifier>>,
    hooks: Vec<Arc<dyn Hooks>>,
    /// The HS256 secret given with [`Broker::secret`], kept to sign the dev tokens of
    /// `admin.web` (none with an application's own verifier).
    minter: Option<Hs256>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("verifier", &self.verifier)
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A node with `config` (see [`crate::config`] for every setting and its default).
    pub fn new(config: Config) -> Self {
        Broker {
            config,
            verifier: None,
            hooks: Vec::new(),
            minter: None,
        }
    }

    /// Tokens are HS256 JWTs signed with `secret` (at least 32 bytes).
    pub fn secret(mut self, secret: Vec<u8>) -> Self {
        let hs256 = Hs256::new(secret);
        self.verifier = Some(Arc::new(hs256.clone()));
        self.minter = Some(hs256);
        self
    }

    /// Tokens are verified by `verifier` (the application's own scheme).
    pub fn verifier(mut self, verifier: Arc<dyn TokenVerifier>) -> Self {
        self.verifier = Some(verifier);
        self.minter = None;
        self
    }

    /// The node calls `hooks` (see [`crate::hooks`]). Given more than once, observers are all
    /// told, and gates are asked of the first only.
    pub fn hooks(mut self, hooks: Arc<dyn Hooks>) -> Self {
        self.hooks.push(hooks);
        self
    }

    /// Starts the node: recovers its logs, then listens; returns once it serves.
    pub fn start(self) -> Result<Handle, NodeError> {
        let verifier = self.verifier.ok_or_else(|| {
            NodeError::Config(
                "no way to verify tokens: give the broker a secret or a verifier".into(),
            )
        })?;
        let hooks: Option<Arc<dyn Hooks>> = match self.hooks.len() {
            0 => None,
            1 => self.hooks.into_iter().next(),
            _ => Some(Arc::new(crate::hooks::Tee(self.hooks))),
        };
        let node = Node::start_with(self.config, verifier, hooks, self.minter)?;
        Ok(Handle {
            control: node.control().clone(),
            shutdown: node.shutdown_handle(),
            report: node.report(),
            addrs: Addrs {
                tcp: node.tcp_addr(),
                ws: node.ws_addr(),
                tls: node.tls_addr(),
                wss: node.wss_addr(),
                udp: node.udp_addr(),
                admin: node.admin_addr(),
            },
            certificate: node.certificate(),
            node: Arc::new(Mutex::new(Some(node))),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Addrs {
    tcp: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    udp: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

/// A running node, as the application holds it: cloneable, sendable. Every call blocks the
/// calling thread until the node answers (never call one from a hook).
#[derive(Clone)]
pub struct Handle {
    control: Control,
    shutdown: ShutdownHandle,
    addrs: Addrs,
    report: StartupReport,
    /// The TLS listeners' certificate, if TLS is on.
    certificate: Option<Arc<Certificate>>,
    node: Arc<Mutex<Option<Node>>>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("tcp", &self.addrs.tcp)
            .field("ws", &self.addrs.ws)
            .field("tls", &self.addrs.tls)
            .field("wss", &self.addrs.wss)
            .field("admin", &self.addrs.admin)
            .finish()
    }
}

impl Handle {
    /// The TCP listener's address (port 0 resolved), if TCP is enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addrs.tcp
    }

    /// The WebSocket listener's address (port 0 resolved), if enabled.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.addrs.ws
    }

    /// The admin HTTP listener's address (port 0 resolved), if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.addrs.admin
    }

    /// How the start went (recovery time, limits lowered to fit the machine).
    pub fn startup_report(&self) -> StartupReport {
        self.report
    }

    /// The TLS listener's address (`listen.tls`, port 0 resolved), if enabled.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.addrs.tls
    }

    /// The WebSocket-over-TLS listener's address (`listen.wss`, port 0 resolved), if enabled.
    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.addrs.wss
    }

    /// The UDP address (`listen.udp`, port 0 resolved), if enabled.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.addrs.udp
    }

    /// Reads `tls.cert_path` and `tls.key_path` again (as `broker serve` does on SIGHUP):
    /// handshakes from now on present the new certificate; connections already open keep
    /// theirs.
    ///
    /// # Errors
    ///
    /// [`TlsError::NotEnabled`] if no TLS listener is on; otherwise why the files do not load,
    /// and then the old certificate stays in force.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        self.certificate
            .as_ref()
            .ok_or(TlsError::NotEnabled)?
            .reload()
    }

    /// The node's counters, summed over its shards (as of at most ~100 ms ago).
    pub fn stats(&self) -> Counters {
        self.control.counters()
    }

    /// Each shard's counters.
    pub fn shard_stats(&self) -> Vec<Counters> {
        self.control
            .stats
            .lock()
            .map(|s| s.iter().map(|s| s.counters).collect())
            .unwrap_or_default()
    }

    /// The node's latency histograms: send to live delivery, and log flushes (all shards'
    /// merged; [`crate::Histogram::quantile_us`] reads a percentile).
    pub fn latencies(&self) -> crate::Latencies {
        self.control.latencies()
    }

    /// Stops the node gracefully: no new connections; what was stored is made durable and
    /// acknowledged first; then every connection is closed with SHUTTING_DOWN. [`Handle::join`]
    /// returns when that is done.
    pub fn shutdown(&self) {
        self.shutdown.shutdown();
    }

    /// Waits until the node has stopped (after [`Handle::shutdown`], or a signal handler's).
    /// Only the first call waits; later ones return at once.
    pub fn join(&self) -> Result<(), NodeError> {
        let node = self.node.lock().ok().and_then(|mut n| n.take());
        match node {
            Some(node) => node.join(),
            None => Ok(()),
        }
    }

    /// A function that stops the node, for a signal handler.
    pub fn shutdown_fn(&self) -> impl Fn() + Send + Sync + 'static {
        let s = self.shutdown.clone();
        move || s.shutdown()
    }

    /// An in-process connection as `user`'s `device`: one of its devices (it is delivered to,
    /// and the user is online while it is open; a device of the same name connected elsewhere
    /// is replaced, as with any login). `expires_at` of the identity is ignored: it lasts until
    /// dropped or kicked.
    pub fn connect(&self, user: &str, device: &str) -> Result<LocalClient, LocalError> {
        self.control.connect(user, device)
    }

    /// An in-process connection through which the application acts as `user` without being
    /// one of its devices: nothing is delivered to it, it changes no presence, it replaces no
    /// device. Use it to send as the user, read its conversation list or history, manage its
    /// groups.
    pub fn act_as(&self, user: &str) -> Result<LocalClient, LocalError> {
        self.control.act_as(user)
    }

    /// Stores a message from `from` to `to` (as `from` names it: a direct conversation by the
    /// other user, a group by its id; `from` must be a member of a group) and returns its ack
    /// once stored. `system`: a SYSTEM message (e.g. a notice from the application).
    pub fn post(
        &self,
        from: &str,
        to: pb::Conversation,
        body: impl Into<Bytes>,
        system: bool,
    ) -> Result<pb::SendAck, LocalError> {
        self.control.post(from, to, body.into(), system)
    }

    /// Ends `user`'s connections (only `device`'s, if given) with KICKED and `reason`; returns
    /// how many were ended. It may log in again (a login hook can refuse it).
    pub fn kick(
        &self,
        user: &str,
        device: Option<&str>,
        reason: &str,
    ) -> Result<usize, ControlError> {
        self.control.kick(user, device, reason)
    }

    /// Users with a device online, sorted by user id: at most `limit`, after `after` (pass the
    /// last user of the previous page; `""` for the first).
    pub fn online(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<String>)>, ControlError> {
        self.control.online(after, limit)
    }

    /// The presence of `users` (status, devices online, last seen), as any user would see it.
    pub fn presence(&self, users: &[String]) -> Result<Vec<pb::UserPresence>, LocalError> {
        self.control.presence(users)
    }

    /// `user`'s conversation list: the most recently active first, at most `limit`.
    pub fn conversations(
        &self,
        user: &str,
        limit: u32,
    ) -> Result<pb::ConversationList, LocalError> {
        self.control.conversations(user, limit)
    }

    /// A conversation as its owner holds it: newest seq, a group's members and settings
    /// (`None`: no such conversation).
    pub fn inspect(
        &self,
        conversation: &ConversationRef,
    ) -> Result<Option<ConversationInfo>, ControlError> {
        self.control.inspect(conversation)
    }

    /// A group request made by `user` (who must be allowed to make it by the group's rules),
    /// answered once durable.
    pub fn group(
        &self,
        user: &str,
        request: pb::GroupRequest,
    ) -> Result<pb::GroupResult, LocalError> {
        self.control.group(user, request)
    }
}
