//! Node-to-node links: one TCP connection per pair of live nodes, authenticated by the cluster's
//! link key, kept alive by pings, dialled again when it breaks.
//!
//! * **Who dials.** For each pair, the node whose id sorts first dials the other's advertise
//!   address (from the registry, handed over by the bridge at each heartbeat, [`LinkCmd`]). A
//!   failed dial is tried again after a back-off (100 ms, doubling up to the heartbeat).
//! * **Handshake** (`proto/cluster.proto`, `Hello`): each side proves it holds the link key by an
//!   HMAC over the other side's fresh nonce and its own node and boot id, so a recorded
//!   handshake cannot be replayed and a process without the key learns nothing. Until both
//!   proofs check, nothing else is accepted. A second link from a node replaces its first (the
//!   first is dead, or the node restarted).
//! * **Liveness.** An established link sends a `Ping` every heartbeat and is closed when nothing
//!   arrived for three; the dialling side then dials again.
//! * **Framing** is the clients' (a varint length prefix, [`FrameCodec`]), at most
//!   [`MAX_LINK_FRAME`] bytes per frame once the link is up and [`MAX_HANDSHAKE_FRAME`] before:
//!   an unauthenticated peer is never buffered for more than a Hello, and at most
//!   [`MAX_UNPROVEN`] accepted connections wait for their handshake at once (more are closed
//!   at accept).
//!
//! The thread is its own `mio::Poll` loop; it never runs on a shard. What the links carry
//! beyond the handshake and liveness comes with cross-node delivery.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};
use hmac::{Hmac, KeyInit, Mac};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use parley_proto::link_pb::{self as lpb, link_frame::Body};
use parley_proto::tcp::FrameCodec;
use prost::Message as _;
use sha2::Sha256;

use super::Member;
use super::carrier::{Carrier, LinkSide};

mod carry;

/// The link protocol version.
const VERSION: u32 = 1;

/// Most bytes waiting to be written on one link; past it the link is closed (the other node
/// does not keep up).
const MAX_LINK_BACKLOG: usize = 64 * 1024 * 1024;

/// The largest link frame, bytes.
pub(crate) const MAX_LINK_FRAME: usize = 16 * 1024 * 1024;

/// The largest frame before the handshake is over (a Hello is well under 1 KiB).
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 1024;

/// Most accepted connections waiting for their handshake at once.
pub(crate) const MAX_UNPROVEN: usize = 64;

/// The first delay before dialling again after a failure.
const DIAL_BACKOFF_START: Duration = Duration::from_millis(100);

/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// At most one warning per peer per this long about failed handshakes.
const WARN_EVERY: Duration = Duration::from_secs(10);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// What the bridge tells the link thread.
#[derive(Debug)]
pub(crate) enum LinkCmd {
    /// The live members now (this node included).
    Members(Vec<Member>),
}

/// One link as `GET /v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct LinkView {
    /// The other node.
    pub(crate) node_id: String,
    /// Its boot id (as it proved in the handshake).
    pub(crate) boot_id: String,
    /// Whether this node dialled it.
    pub(crate) dialled: bool,
    /// When the link was established (Unix ms).
    pub(crate) since_ms: u64,
}

/// What the link thread publishes.
#[derive(Debug, Default)]
pub(crate) struct LinkStatus {
    /// Established links, by node id.
    pub(crate) up: Mutex<BTreeMap<String, LinkView>>,
    /// Links established since start.
    pub(crate) opened: AtomicU64,
    /// Handshakes that failed (a wrong proof, garbage, a timeout).
    pub(crate) handshake_failures: AtomicU64,
    /// With `cluster.nodes`: whether the node has heard from the other nodes since it started
    /// (see `super::carrier::LinkSide::settled`).
    pub(crate) settled: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Who a node is on the links.
#[derive(Clone)]
pub(crate) struct LinkIdentity {
    /// This node's id.
    pub(crate) node_id: String,
    /// This process's boot id.
    pub(crate) boot_id: String,
    /// The link key (shared by the cluster's nodes).
    pub(crate) key: [u8; 32],
    /// The heartbeat (ping period).
    pub(crate) heartbeat: Duration,
    /// The fingerprint of this node's cluster layout (`super::carrier::layout`).
    pub(crate) layout: u64,
}

impl std::fmt::Debug for LinkIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkIdentity")
            .field("node_id", &self.node_id)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The running link thread.
#[derive(Debug)]
pub(crate) struct Links {
    cmd: Sender<LinkCmd>,
    waker: Arc<Waker>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    status: Arc<LinkStatus>,
    thread: Option<JoinHandle<()>>,
    /// The shards' way to the other nodes (with `cluster.nodes`).
    carrier: Option<Carrier>,
}

impl Links {
    /// Starts the link thread accepting on `listener`; with `cluster.nodes` in `config`, it
    /// carries mail between this node's shards (`peers`) and the other nodes'.
    pub(crate) fn start(
        identity: LinkIdentity,
        listener: std::net::TcpListener,
        config: &crate::config::Config,
        peers: Vec<crate::node::shard::Peer>,
    ) -> io::Result<Links> {
        listener.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let (cmd, cmds) = crossbeam_channel::bounded(64);
        let (carrier, side) = match super::carrier::carrier(config, peers, Arc::clone(&waker)) {
            Some((c, s)) => (Some(c), Some(s)),
            None => (None, None),
        };
        let status = Arc::new(LinkStatus {
            settled: side.as_ref().map(|s| Arc::clone(&s.settled)),
            ..LinkStatus::default()
        });
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut thread = LinkThread {
            me: identity,
            poll,
            listener,
            cmds,
            stop: Arc::clone(&stop),
            status: Arc::clone(&status),
            conns: Vec::new(),
            members: BTreeMap::new(),
            dial: BTreeMap::new(),
            codec: FrameCodec::new(MAX_LINK_FRAME),
            warned: BTreeMap::new(),
            side,
            started: Instant::now(),
            members_known: None,
            all_linked_since: None,
        };
        let handle = std::thread::Builder::new()
            .name("parley-links".into())
            .spawn(move || thread.run())?;
        Ok(Links {
            cmd,
            waker,
            stop,
            status,
            thread: Some(handle),
            carrier,
        })
    }

    /// The shards' way to the other nodes (with `cluster.nodes`).
    pub(crate) fn carrier(&self) -> Option<Carrier> {
        self.carrier.clone()
    }

    /// Where the bridge sends membership, and how it wakes the thread.
    pub(crate) fn commands(&self) -> (Sender<LinkCmd>, Arc<Waker>) {
        (self.cmd.clone(), Arc::clone(&self.waker))
    }

    /// What the thread publishes.
    pub(crate) fn status(&self) -> Arc<LinkStatus> {
        Arc::clone(&self.status)
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a connection's handshake stands.
#[derive(Debug, Clone)]
enum Phase {
    /// Dialled: our Hello sent, waiting for the acceptor's proof.
    Dialled { nonce: [u8; 16] },
    /// Accepted: waiting for the dialler's first Hello.
    Accepted,
    /// Accepted: our proof sent, waiting for the dialler's.
    Proving {
        nonce: [u8; 16],
        peer: String,
        boot: String,
    },
    /// Established.
    Up,
}

/// One link connection.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    phase: Phase,
    /// The other node, once known (dialled: from the start).
    peer: Option<String>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    opened: Instant,
    last_heard: Instant,
    last_ping: Instant,
    connected: bool,
}

impl Conn {
    /// A connection opened now (`connected`: accepted, so already connected).
    fn new(stream: TcpStream, phase: Phase, peer: Option<String>, connected: bool) -> Conn {
        let now = Instant::now();
        Conn {
            stream,
            phase,
            peer,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            opened: now,
            last_heard: now,
            last_ping: now,
            connected,
        }
    }
}

/// Dialling state of one member this node dials.
#[derive(Debug)]
struct Dial {
    /// Not before this.
    at: Instant,
    backoff: Duration,
}

struct LinkThread {
    me: LinkIdentity,
    poll: Poll,
    listener: TcpListener,
    cmds: Receiver<LinkCmd>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    status: Arc<LinkStatus>,
    conns: Vec<Option<Conn>>,
    /// The live members, by node id (this node's own entry left out).
    members: BTreeMap<String, Member>,
    /// Members this node dials, and when.
    dial: BTreeMap<String, Dial>,
    codec: FrameCodec,
    /// When a handshake warning about each peer was last written, and how many were held back
    /// since.
    warned: BTreeMap<String, (Instant, u64)>,
    /// Mail between the shards of this node and the others' (with `cluster.nodes`).
    side: Option<LinkSide>,
    /// When the thread started, when the membership was first read, and since when every
    /// live node of the cluster has had a link up (see [`LinkSide::settled`]).
    started: Instant,
    members_known: Option<Instant>,
    all_linked_since: Option<Instant>,
}

/// Why a link connection ends.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("closed by the other side")]
    Eof,
    #[error("bad frame: {0}")]
    Frame(String),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("silent for three heartbeats")]
    Silent,
    #[error("{0}")]
    Overloaded(&'static str),
}

impl LinkThread {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        while !self.stop.load(Ordering::SeqCst) {
            let wait = self.me.heartbeat.min(DIAL_BACKOFF_START);
            if let Err(e) = self.poll.poll(&mut events, Some(wait))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!("cluster links: poll failed: {e}; the link thread stops");
                return;
            }
            let ready: Vec<(Token, bool, bool)> = events
                .iter()
                .map(|e| {
                    (
                        e.token(),
                        e.is_readable() || e.is_read_closed() || e.is_error(),
                        e.is_writable(),
                    )
                })
                .collect();
            for (token, readable, writable) in ready {
                match token {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => {
                        let slot = t - FIRST_CONN;
                        if writable {
                            self.on_writable(slot);
                        }
                        if readable {
                            self.on_readable(slot);
                        }
                    }
                }
            }
            while let Ok(cmd) = self.cmds.try_recv() {
                match cmd {
                    LinkCmd::Members(members) => self.set_members(members),
                }
            }
            self.carry_out();
            self.wake_shards();
            self.tick();
        }
        for slot in 0..self.conns.len() {
            self.drop_conn(slot, None);
        }
    }

    /// Takes in the live members: dials new ones this node dials.
    fn set_members(&mut self, members: Vec<Member>) {
        self.members_known.get_or_insert_with(Instant::now);
        self.members = members
            .into_iter()
            .filter(|m| m.node_id != self.me.node_id)
            .map(|m| (m.node_id.clone(), m))
            .collect();
        let me = self.me.node_id.clone();
        self.dial.retain(|id, _| self.members.contains_key(id));
        for id in self.members.keys().filter(|id| me.as_str() < id.as_str()) {
            self.dial.entry(id.clone()).or_insert(Dial {
                at: Instant::now(),
                backoff: DIAL_BACKOFF_START,
            });
        }
    }

    /// Dials what is due, pings, and closes silent or stuck connections.
    fn tick(&mut self) {
        let now = Instant::now();
        self.settle(now);
        let due: Vec<String> = self
            .dial
            .iter()
            .filter(|(id, d)| d.at <= now && !self.has_conn(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.dial_to(&id);
        }
        let heartbeat = self.me.heartbeat;
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            let up = matches!(c.phase, Phase::Up);
            if up && now.duration_since(c.last_heard) > heartbeat * 3 {
                self.drop_conn(slot, Some(LinkError::Silent));
            } else if up && now.duration_since(c.last_ping) >= heartbeat {
                c.last_ping = now;
                self.send(slot, Body::Ping(lpb::Ping { nonce: unix_ms() }));
            } else if !up && now.duration_since(c.opened) > HANDSHAKE_TIMEOUT {
                self.handshake_failed(slot, "no handshake within 5 s".into());
            }
        }
    }

    /// This node's Hello with `nonce` and `proof`.
    fn hello(&self, nonce: &[u8], proof: &[u8]) -> Body {
        Body::Hello(lpb::Hello {
            version: VERSION,
            node_id: self.me.node_id.clone(),
            boot_id: self.me.boot_id.clone(),
            nonce: nonce.to_vec(),
            proof: proof.to_vec(),
            layout: self.me.layout,
        })
    }

    fn has_conn(&self, peer: &str) -> bool {
        self.conns
            .iter()
            .flatten()
            .any(|c| c.peer.as_deref() == Some(peer))
    }

    fn dial_to(&mut self, id: &str) {
        let Some(addr) = self
            .members
            .get(id)
            .and_then(|m| m.advertise.as_deref())
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            // No address to reach it at (yet): try again after a while.
            self.backoff(id);
            return;
        };
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = id, %addr, "cluster links: dial failed: {e}");
                self.backoff(id);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let nonce = fresh_nonce();
        let slot = self.insert(Conn::new(
            stream,
            Phase::Dialled { nonce },
            Some(id.to_owned()),
            false,
        ));
        if let Some(slot) = slot {
            self.send(slot, self.hello(&nonce, &[]));
        }
    }

    fn backoff(&mut self, id: &str) {
        let heartbeat = self.me.heartbeat;
        if let Some(d) = self.dial.get_mut(id) {
            d.at = Instant::now() + d.backoff;
            d.backoff = (d.backoff * 2).min(heartbeat);
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, from)) => {
                    let unproven = self
                        .conns
                        .iter()
                        .flatten()
                        .filter(|c| !matches!(c.phase, Phase::Up | Phase::Dialled { .. }))
                        .count();
                    if unproven >= MAX_UNPROVEN {
                        // Dropped at once: a flood of connections never reaches the handshake.
                        self.status
                            .handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                        self.warn_handshake(
                            &from.to_string(),
                            "too many connections waiting for their handshake",
                        );
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.insert(Conn::new(stream, Phase::Accepted, None, true));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("cluster links: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Registers `c`; its slot, or `None` if it could not be registered.
    fn insert(&mut self, mut c: Conn) -> Option<usize> {
        let slot = match self.conns.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut c.stream, Token(slot + FIRST_CONN), interest)
        {
            tracing::warn!("cluster links: cannot register a link: {e}");
            return None;
        }
        self.conns[slot] = Some(c);
        Some(slot)
    }

    fn send(&mut self, slot: usize, body: Body) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let frame = lpb::LinkFrame { body: Some(body) };
        if self.codec.encode_message(&frame, &mut c.wbuf).is_err() {
            return self.drop_conn(slot, Some(LinkError::Frame("frame too large".into())));
        }
        self.on_writable(slot);
    }

    fn on_writable(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        c.connected = true;
        while !c.wbuf.is_empty() {
            match c.stream.write(&c.wbuf) {
                Ok(0) => return self.drop_conn(slot, Some(LinkError::Eof)),
                Ok(n) => {
                    let _ = c.wbuf.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_conn(slot, Some(e.into())),
            }
        }
    }

    /// Reads what arrived, a chunk at a time, decoding the frames of each chunk before the
    /// next is read (so a peer is never buffered for more than one frame and one chunk).
    fn on_readable(&mut self, slot: usize) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            match c.stream.read(&mut buf) {
                Ok(0) => return self.drop_conn(slot, Some(LinkError::Eof)),
                Ok(n) => {
                    c.rbuf.extend_from_slice(&buf[..n]);
                    c.last_heard = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.drop_conn(slot, Some(e.into())),
            }
            if !self.decode_frames(slot) {
                return;
            }
        }
    }

    /// Handles every whole frame buffered on `slot`; `false` if the connection is gone.
    fn decode_frames(&mut self, slot: usize) -> bool {
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return false;
            };
            let limit = if matches!(c.phase, Phase::Up) {
                MAX_LINK_FRAME
            } else {
                MAX_HANDSHAKE_FRAME
            };
            let bytes = match FrameCodec::new(limit).decode(&mut c.rbuf) {
                Ok(Some(b)) => b,
                Ok(None) => return true,
                Err(e) => {
                    self.fail(slot, format!("bad framing: {e}"));
                    return false;
                }
            };
            match lpb::LinkFrame::decode(bytes) {
                Ok(lpb::LinkFrame { body: Some(body) }) => self.on_frame(slot, body),
                Ok(_) => {
                    self.fail(slot, "a frame without a body".into());
                    return false;
                }
                Err(e) => {
                    self.fail(slot, format!("undecodable frame: {e}"));
                    return false;
                }
            }
        }
    }

    /// A protocol error: a handshake failure before the link is up, else a broken link.
    fn fail(&mut self, slot: usize, why: String) {
        let up = matches!(
            self.conns
                .get(slot)
                .and_then(Option::as_ref)
                .map(|c| &c.phase),
            Some(Phase::Up)
        );
        if up {
            self.drop_conn(slot, Some(LinkError::Frame(why)));
        } else {
            self.handshake_failed(slot, why);
        }
    }

    fn on_frame(&mut self, slot: usize, body: Body) {
        let Some(phase) = self
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .map(|c| c.phase.clone())
        else {
            return;
        };
        match (phase, body) {
            (Phase::Up, Body::Ping(p)) => self.send(slot, Body::Pong(lpb::Pong { nonce: p.nonce })),
            (Phase::Up, Body::Pong(_)) => {}
            (Phase::Up, Body::Mail(m)) => self.carry_in(slot, m),
            (Phase::Up, Body::Hello(_)) => self.fail(slot, "a Hello on an established link".into()),
            (Phase::Accepted, Body::Hello(h)) => self.dialler_hello(slot, h),
            (Phase::Dialled { nonce }, Body::Hello(h)) => self.acceptor_hello(slot, nonce, h),
            (Phase::Proving { nonce, peer, boot }, Body::Hello(h)) => {
                self.dialler_proof(slot, nonce, &peer, &boot, h);
            }
            (_, other) => self.fail(slot, format!("{other:?} before the handshake is over")),
        }
    }

    /// Acceptor: the dialler's first Hello. Answer with our nonce and proof.
    fn dialler_hello(&mut self, slot: usize, h: lpb::Hello) {
        if h.version != VERSION || h.node_id.is_empty() || !h.proof.is_empty() {
            return self
                .handshake_failed(slot, format!("unexpected first Hello from {:?}", h.node_id));
        }
        if h.node_id == self.me.node_id {
            return self.handshake_failed(slot, "a link from this node's own id".into());
        }
        if h.layout != self.me.layout {
            return self.handshake_failed(slot, layout_mismatch(&h.node_id));
        }
        let nonce = fresh_nonce();
        let proof = prove(
            &self.me.key,
            b"parley-link/1 accept",
            &h.nonce,
            &self.me.node_id,
            &self.me.boot_id,
        );
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            c.peer = Some(h.node_id.clone());
            c.phase = Phase::Proving {
                nonce,
                peer: h.node_id.clone(),
                boot: h.boot_id.clone(),
            };
        }
        self.send(slot, self.hello(&nonce, &proof));
    }

    /// Dialler: the acceptor's Hello with its proof. Check it, then prove ourselves.
    fn acceptor_hello(&mut self, slot: usize, our_nonce: [u8; 16], h: lpb::Hello) {
        let expected_peer = self
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .and_then(|c| c.peer.clone())
            .unwrap_or_default();
        if h.node_id != expected_peer {
            return self.handshake_failed(
                slot,
                format!("dialled {expected_peer:?}, answered by {:?}", h.node_id),
            );
        }
        if h.layout != self.me.layout {
            return self.handshake_failed(slot, layout_mismatch(&h.node_id));
        }
        if !verify(
            &self.me.key,
            b"parley-link/1 accept",
            &our_nonce,
            &h.node_id,
            &h.boot_id,
            &h.proof,
        ) {
            return self
                .handshake_failed(slot, format!("{:?} did not prove the link key", h.node_id));
        }
        let proof = prove(
            &self.me.key,
            b"parley-link/1 dial",
            &h.nonce,
            &self.me.node_id,
            &self.me.boot_id,
        );
        self.send(slot, self.hello(&[], &proof));
        self.established(slot, h.node_id, h.boot_id, true);
    }

    /// Acceptor: the dialler's proof.
    fn dialler_proof(
        &mut self,
        slot: usize,
        our_nonce: [u8; 16],
        peer: &str,
        boot: &str,
        h: lpb::Hello,
    ) {
        if h.node_id != peer
            || h.boot_id != boot
            || !verify(
                &self.me.key,
                b"parley-link/1 dial",
                &our_nonce,
                peer,
                boot,
                &h.proof,
            )
        {
            return self.handshake_failed(slot, format!("{peer:?} did not prove the link key"));
        }
        self.established(slot, peer.to_owned(), boot.to_owned(), false);
    }

    fn established(&mut self, slot: usize, peer: String, boot: String, dialled: bool) {
        // A newer link from the same node replaces an older one.
        let older: Vec<usize> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(s, c)| {
                *s != slot
                    && c.as_ref()
                        .is_some_and(|c| c.peer.as_deref() == Some(peer.as_str()))
            })
            .map(|(s, _)| s)
            .collect();
        for s in older {
            self.drop_conn(s, None);
        }
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        c.phase = Phase::Up;
        c.peer = Some(peer.clone());
        c.last_ping = Instant::now();
        if let Some(d) = self.dial.get_mut(&peer) {
            d.backoff = DIAL_BACKOFF_START;
        }
        self.status.opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %peer, boot = %boot, dialled, "cluster: link to {peer} up");
        if let Ok(mut up) = self.status.up.lock() {
            up.insert(
                peer.clone(),
                LinkView {
                    node_id: peer.clone(),
                    boot_id: boot,
                    dialled,
                    since_ms: unix_ms(),
                },
            );
        }
        self.tell_shards(&peer, true);
    }

    fn handshake_failed(&mut self, slot: usize, why: String) {
        self.status
            .handshake_failures
            .fetch_add(1, Ordering::Relaxed);
        let peer = self
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .and_then(|c| c.peer.clone());
        if let Some(p) = &peer {
            self.backoff(p);
        }
        self.drop_conn(slot, Some(LinkError::Handshake(why)));
    }

    /// Closes the connection in `slot` (logging `why`, if given).
    fn drop_conn(&mut self, slot: usize, why: Option<LinkError>) {
        let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        let was_up = matches!(c.phase, Phase::Up);
        let peer = c.peer.clone().unwrap_or_else(|| "?".into());
        if was_up {
            // Only if the published link is this one (a replacement may be up already).
            let replaced =
                self.conns.iter().flatten().any(|o| {
                    o.peer.as_deref() == Some(peer.as_str()) && matches!(o.phase, Phase::Up)
                });
            if !replaced {
                if let Ok(mut up) = self.status.up.lock() {
                    up.remove(&peer);
                }
                self.tell_shards(&peer, false);
            }
            if let Some(d) = self.dial.get_mut(&peer) {
                d.at = Instant::now();
            }
        } else if !c.connected
            && let Some(p) = c.peer.clone()
        {
            self.backoff(&p);
        }
        match why {
            Some(LinkError::Handshake(w)) => self.warn_handshake(&peer, &w),
            Some(e) if was_up => tracing::warn!(peer = %peer, "cluster: link to {peer} down: {e}"),
            // Connected, then ended by the other side before the handshake was over: it did
            // not accept our proof (or is not a node).
            Some(e) if c.connected && !matches!(c.phase, Phase::Dialled { .. }) => {
                self.status
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.warn_handshake(&peer, &format!("the other side ended it ({e})"));
            }
            Some(e) => tracing::debug!(peer = %peer, "cluster: link attempt ended: {e}"),
            None => {}
        }
    }

    /// Logs a failed handshake with `peer`, at most one line per peer per [`WARN_EVERY`].
    fn warn_handshake(&mut self, peer: &str, why: &str) {
        let now = Instant::now();
        match self.warned.get_mut(peer) {
            Some((at, held)) if now.duration_since(*at) < WARN_EVERY => *held += 1,
            _ => {
                let held = self.warned.get(peer).map_or(0, |(_, h)| *h);
                tracing::warn!(
                    peer = %peer,
                    "cluster: link handshake failed: {why}{}",
                    if held > 0 {
                        format!(" ({held} more since the last line)")
                    } else {
                        String::new()
                    }
                );
                self.warned.insert(peer.to_owned(), (now, 0));
            }
        }
    }
}

/// Why a link with `peer` is refused when its layout differs.
fn layout_mismatch(peer: &str) -> String {
    format!(
        "{peer:?} has another cluster layout (cluster.nodes, shard count or release differ); \
         every node of a cluster must list the same nodes and run the same shard count and release"
    )
}

/// 16 fresh random bytes.
fn fresh_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    if getrandom::fill(&mut n).is_err() {
        // No OS randomness: the time still makes each nonce differ.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        n = t.to_le_bytes();
    }
    n
}

/// The HMAC-SHA256 state over label | nonce | node id | 0 | boot id, under `key`.
fn proof_mac(
    key: &[u8; 32],
    label: &[u8],
    nonce: &[u8],
    node_id: &str,
    boot_id: &str,
) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in [label, nonce, node_id.as_bytes(), &[0], boot_id.as_bytes()] {
        mac.update(part);
    }
    mac
}

/// The proof of `node_id`/`boot_id` over `nonce`.
fn prove(key: &[u8; 32], label: &[u8], nonce: &[u8], node_id: &str, boot_id: &str) -> [u8; 32] {
    proof_mac(key, label, nonce, node_id, boot_id)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `proof` is [`prove`]'s answer (compared in constant time).
fn verify(
    key: &[u8; 32],
    label: &[u8],
    nonce: &[u8],
    node_id: &str,
    boot_id: &str,
    proof: &[u8],
) -> bool {
    proof_mac(key, label, nonce, node_id, boot_id)
        .verify_slice(proof)
        .is_ok()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
