//! The mio driver of one shard: a thread with its own `Poll`, the shard's listeners, the
//! sockets of its connections, its flusher thread and the clock. It owns no protocol logic: it
//! reads bytes and the time into the [`ShardCore`] and carries out the core's [`Effect`]s.
//!
//! A turn: wait for events (bounded by the core's next deadline); complete finished flushes;
//! accept (within the node's [`Admission`] limits) and read (within a per-connection byte
//! budget, and only while the core takes input: [`Intake`]); drain the inbox of batches from
//! other shards; fire due deadlines; then apply the core's effects (writes, closes, handovers,
//! one batch per other shard, a flush, connections to read again) and step the closing sockets.
//!
//! Fairness: a connection gets at most `limits.read_budget_bytes` read and
//! `limits.frames_per_turn` frames handled per turn; one with more waiting goes on the `ready`
//! list and is served again next turn, after everyone else had their turn.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use parley_storage::{Lsn, MmapBackend, MmapSegment, SpareDone, SpareTicketOf, SyncOf, SyncTicket};

use super::admission::{Admission, AnonSlot, Verdict};
use super::listener;
use super::local::{LocalEnd, LocalPipe};
use super::socket::{self, CloseStep, Closing};
use super::stream::{ReadError, ReadOutcome, Stream};
use crate::auth::Identity;
use crate::cluster::BridgeMsg;
use crate::core::conv::Placement;
use crate::core::{
    Adoption, ConnId, CoreEffect, Effect, Intake, Now, ShardCore, ShardMsg, ShardStats,
};
use crate::hooks::{Answer, Ticket};
use crate::loglimit::{LogKind, LogLimiter};
use crate::tls::Certificate;

mod accept;
mod closing;
mod cluster;
mod links;
mod udp;

use accept::{Listener, TlsCounts};

pub(crate) const WAKER: Token = Token(0);
const TCP_LISTENER: Token = Token(1);
const WS_LISTENER: Token = Token(2);
const TLS_LISTENER: Token = Token(3);
const WSS_LISTENER: Token = Token(4);
const UDP_SOCKET: Token = Token(5);
const FIRST_CONN: usize = 6;
/// Tokens of closing sockets carry this bit (their index is not a core slot).
const CLOSING_BIT: usize = 1 << 40;
/// Bound of each shard's inbox, in mails.
pub(crate) const INBOX_MAILS: usize = 4096;
/// How long the node waits at shutdown for closing connections beyond their linger.
const SHUTDOWN_SLACK_MS: u64 = 500;
/// After `accept` failed (e.g. out of descriptors), accepting resumes this much later.
const ACCEPT_RETRY_MS: u64 = 100;
/// Longest wait in `poll` (the clock must move even when nothing happens).
const MAX_WAIT_MS: u64 = 50;
/// Inbox mails handled per turn before serving sockets again.
const INBOX_BUDGET: usize = 256;
/// The retry hint of a login refused because the cluster bridge's inbox was full, ms.
const ROUTE_RETRY_MS: u32 = 1_000;

/// What travels between shard threads.
#[derive(Debug)]
pub(crate) enum Mail {
    /// Messages from another shard's core.
    Batch(Vec<ShardMsg>),
    /// A logged-in connection moving here: its socket (with its TLS session, if any) and its
    /// state.
    Adopt(Stream, Box<Adoption>),
    /// A UDP session in login moving to its user's home shard.
    AdoptUdp(Box<udp::Moving>, Box<Adoption>),
    /// A datagram for a UDP session that lives here, received by another shard's socket.
    Datagram {
        /// The datagram, unopened.
        bytes: Bytes,
        /// Its source address.
        from: std::net::SocketAddr,
    },
    /// Stop.
    Shutdown,
    /// Open an in-process connection (on its user's home shard).
    LocalOpen {
        /// The link's id.
        id: u64,
        /// Who it is logged in as.
        identity: Identity,
        /// Not one of the user's devices (see `ShardCore::handle_open_local`).
        service: bool,
        /// Its way back to the client.
        end: LocalEnd,
    },
    /// Bytes from a local client.
    LocalInput {
        /// The link's id.
        id: u64,
        /// The bytes (TCP framing).
        bytes: Bytes,
    },
    /// The local client took output: write more if some waits.
    LocalDrained {
        /// The link's id.
        id: u64,
    },
    /// The local client is gone.
    LocalClose {
        /// The link's id.
        id: u64,
    },
    /// A question from the application about this shard's state.
    Query(Query),
    /// The cluster bridge's answers to route registrations.
    Routed(Vec<crate::core::Routed>),
    /// Mail from another node's shards (an encoded batch, decoded here).
    Remote {
        /// The node's position in the cluster's node list.
        from: usize,
        /// The batch (`crate::core::wire`).
        bytes: Bytes,
    },
    /// The link to a node came up.
    LinkUp {
        /// The node's position.
        node: usize,
    },
    /// The link to a node went down.
    LinkDown {
        /// The node's position.
        node: usize,
    },
    /// The presence index's routes for a presence answer: `(user, [(device, node id)])`.
    Found {
        /// The answer waiting.
        gather: u64,
        /// What the index holds.
        found: Vec<(String, Vec<(String, String)>)>,
    },
}

/// The application's questions to one shard (answered on the channel each carries).
#[derive(Debug)]
pub(crate) enum Query {
    /// End `user`'s connections (one device's, if given) with KICKED; answers how many.
    Kick {
        user: String,
        device: Option<String>,
        reason: String,
        reply: Sender<usize>,
    },
    /// Users of this shard online now (after `after`, at most `limit`).
    Online {
        after: String,
        limit: usize,
        reply: Sender<Vec<(String, Vec<String>)>>,
    },
    /// A conversation this shard owns, as it stands.
    Inspect {
        key: String,
        reply: Sender<Option<crate::core::ConversationInfo>>,
    },
}

/// Storage work the flusher thread does for the shard.
enum Job {
    Flush(SyncTicket<SyncOf<MmapBackend>>),
    Spare(SpareTicketOf<MmapBackend>),
}

/// What the flusher thread reports back.
enum Done {
    /// A flush's result and how long it ran, µs.
    Flushed(io::Result<Lsn>, u64),
    Spare(SpareDone<MmapSegment>),
}

/// A shard's way to reach another shard.
pub(crate) type Peer = (Sender<Mail>, Arc<Waker>);

/// The clock of a node: monotonic ms since start, and wall time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    /// The monotonic ms of instant `at` (0 before the start).
    pub(crate) fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    /// The time now.
    pub(crate) fn now(&self) -> Now {
        let elapsed = self.start.elapsed();
        Now {
            ms: elapsed.as_millis() as u64,
            us: elapsed.as_micros() as u64,
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        }
    }
}

struct Sock {
    stream: Stream,
    generation: u32,
    /// The anonymous slot it holds until it logs in or closes.
    anon: Option<AnonSlot>,
    /// Refused at accept: its last words go out at once, without a linger.
    refused: bool,
}

/// Everything a shard thread starts with.
pub(crate) struct DriverSetup {
    pub(crate) index: usize,
    pub(crate) core: ShardCore<MmapBackend>,
    pub(crate) poll: Poll,
    pub(crate) waker: Arc<Waker>,
    pub(crate) tcp: Option<TcpListener>,
    pub(crate) ws: Option<TcpListener>,
    /// The TLS listeners (raw TCP framing, WebSocket) and the certificate they serve.
    pub(crate) tls: Option<TcpListener>,
    pub(crate) wss: Option<TcpListener>,
    pub(crate) certificate: Option<Arc<Certificate>>,
    /// `tls.handshake_timeout_ms`.
    pub(crate) handshake_timeout_ms: u64,
    /// The shard's UDP socket and sessions (`listen.udp`).
    pub(crate) udp: Option<super::udp::Endpoint>,
    pub(crate) inbox: Receiver<Mail>,
    pub(crate) peers: Vec<Peer>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) read_budget: usize,
    pub(crate) close_linger_ms: u64,
    pub(crate) close_discard_bytes: usize,
    pub(crate) clock: Clock,
    pub(crate) stats: Arc<Mutex<Vec<ShardStats>>>,
    /// Hooks' late answers for this shard.
    pub(crate) answers: Receiver<(Ticket, Answer)>,
    /// The cluster bridge's inbox (in a cluster).
    pub(crate) bridge: Option<Sender<BridgeMsg>>,
    /// The way to the other nodes' shards (with `cluster.nodes`).
    pub(crate) carrier: Option<crate::cluster::carrier::Carrier>,
    /// The node's lease (with `cluster.nodes`: the core owns only while it holds).
    pub(crate) lease: Option<crate::cluster::Lease>,
}

/// One shard's driver; [`Driver::run`] is its thread.
pub(crate) struct Driver {
    index: usize,
    core: ShardCore<MmapBackend>,
    poll: Poll,
    tcp: Option<TcpListener>,
    ws: Option<TcpListener>,
    tls: Option<TcpListener>,
    wss: Option<TcpListener>,
    certificate: Option<Arc<Certificate>>,
    handshake_timeout_ms: u64,
    /// TLS connections accepted and the time by which their handshake must be done, oldest
    /// first (one timeout for all, so in deadline order).
    handshakes: VecDeque<(u64, ConnId)>,
    /// The driver's TLS counters (published with the core's).
    tls_counts: TlsCounts,
    inbox: Receiver<Mail>,
    peers: Vec<Peer>,
    /// Mails that did not fit a peer's inbox yet, per peer, in order.
    backlog: Vec<VecDeque<Mail>>,
    socks: Vec<Option<Sock>>,
    closing: Vec<Option<Closing>>,
    closing_free: Vec<usize>,
    closing_order: VecDeque<(u64, usize)>,
    closing_more: Vec<usize>,
    flush_tx: Sender<Job>,
    flush_rx: Receiver<Done>,
    /// The flusher thread (joined at exit: its tickets hold the log's files).
    flusher: Option<std::thread::JoinHandle<()>>,
    read_scratch: Box<[u8]>,
    ready: Vec<ConnId>,
    writable: Vec<ConnId>,
    effects: Vec<CoreEffect<MmapBackend>>,
    admission: Arc<Admission>,
    read_budget: usize,
    close_linger_ms: u64,
    close_discard_bytes: usize,
    log_limit: LogLimiter,
    clock: Clock,
    accept_retry_at: Option<u64>,
    shutdown_deadline: Option<u64>,
    stats: Arc<Mutex<Vec<ShardStats>>>,
    stats_at: u64,
    answers: Receiver<(Ticket, Answer)>,
    /// The cluster bridge's inbox (in a cluster).
    bridge: Option<Sender<BridgeMsg>>,
    /// The way to the other nodes' shards (with `cluster.nodes`).
    carrier: Option<crate::cluster::carrier::Carrier>,
    /// The node's lease (with `cluster.nodes`).
    lease: Option<crate::cluster::Lease>,
    /// Where conversations and users live (this node's shards are `placement.local`).
    placement: Placement,
    /// Mail sent to and taken from other nodes (published with the core's counters).
    remote_counts: (u64, u64),
    /// This turn's mail for other nodes' shards, by shard (see `queue_remote`).
    remote_out: Vec<(usize, Vec<ShardMsg>)>,
    /// The buffer mail for other nodes is encoded in.
    remote_scratch: Vec<u8>,
    /// In-process connections, by core slot.
    locals: Vec<Option<LocalPipe>>,
    /// In-process connections, by link id.
    local_ids: HashMap<u64, ConnId>,
    /// UDP sessions and their socket.
    udp: Option<super::udp::Endpoint>,
}

impl Driver {
    pub(crate) fn new(setup: DriverSetup) -> io::Result<Self> {
        // At most one flush and one spare ticket are out at a time: these never fill up.
        let (flush_tx, flush_jobs) = crossbeam_channel::bounded::<Job>(2);
        let (done_tx, flush_rx) = crossbeam_channel::bounded(2);
        let waker = Arc::clone(&setup.waker);
        let flusher = std::thread::Builder::new()
            .name(format!("parley-flush-{}", setup.index))
            .spawn(move || {
                for job in flush_jobs {
                    let done = match job {
                        Job::Flush(ticket) => {
                            // The flush's own duration, for the core's histogram (it reads no
                            // clock).
                            let started = Instant::now();
                            let result = ticket.run();
                            Done::Flushed(result, started.elapsed().as_micros() as u64)
                        }
                        Job::Spare(ticket) => Done::Spare(ticket.run()),
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                    let _ = waker.wake();
                }
            })?;
        let peers = setup.peers;
        let placement = setup.core.placement();
        Ok(Driver {
            index: setup.index,
            core: setup.core,
            poll: setup.poll,
            tcp: setup.tcp,
            ws: setup.ws,
            tls: setup.tls,
            wss: setup.wss,
            certificate: setup.certificate,
            handshake_timeout_ms: setup.handshake_timeout_ms,
            handshakes: VecDeque::new(),
            tls_counts: TlsCounts::default(),
            inbox: setup.inbox,
            backlog: (0..peers.len()).map(|_| VecDeque::new()).collect(),
            peers,
            socks: Vec::new(),
            closing: Vec::new(),
            closing_free: Vec::new(),
            closing_order: VecDeque::new(),
            closing_more: Vec::new(),
            flush_tx,
            flush_rx,
            flusher: Some(flusher),
            read_scratch: vec![0; socket::READ_MAX].into_boxed_slice(),
            ready: Vec::new(),
            writable: Vec::new(),
            effects: Vec::new(),
            admission: setup.admission,
            read_budget: setup.read_budget.max(1),
            close_linger_ms: setup.close_linger_ms,
            close_discard_bytes: setup.close_discard_bytes,
            log_limit: LogLimiter::default(),
            clock: setup.clock,
            accept_retry_at: None,
            shutdown_deadline: None,
            stats: setup.stats,
            stats_at: 0,
            answers: setup.answers,
            bridge: setup.bridge,
            lease: setup.lease,
            carrier: setup.carrier,
            placement,
            remote_counts: (0, 0),
            remote_out: Vec::new(),
            remote_scratch: Vec::new(),
            locals: Vec::new(),
            local_ids: HashMap::new(),
            udp: setup.udp,
        })
    }

    /// The shard's thread body.
    pub(crate) fn run(mut self) {
        let mut failed = Vec::new();
        for (token, listener) in [
            (TCP_LISTENER, self.tcp.as_mut()),
            (WS_LISTENER, self.ws.as_mut()),
            (TLS_LISTENER, self.tls.as_mut()),
            (WSS_LISTENER, self.wss.as_mut()),
        ] {
            if let Some(l) = listener
                && let Err(e) = self.poll.registry().register(l, token, Interest::READABLE)
            {
                failed.push(e);
            }
        }
        if let Some(udp) = self.udp.as_mut()
            && let Err(e) = self.poll.registry().register(
                &mut udp.socket,
                UDP_SOCKET,
                Interest::READABLE | Interest::WRITABLE,
            )
        {
            failed.push(e);
        }
        for e in failed {
            tracing::error!(shard = self.index, "cannot register listener: {e}");
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let now = self.clock.now();
            if let Some(lease) = &self.lease {
                let until = lease.until().map_or(0, |t| self.clock.ms_at(t));
                self.core.set_lease(until);
            }
            if let Some(carrier) = &self.carrier {
                self.core.set_settled(carrier.settled());
            }
            let busy = self.core.has_work()
                || self.udp.as_ref().is_some_and(|u| u.more)
                || !self.ready.is_empty()
                || !self.closing_more.is_empty()
                || self.backlog.iter().any(|b| !b.is_empty());
            let timeout = if busy {
                0
            } else {
                let paced = self.udp.as_ref().and_then(|u| u.next_deadline());
                self.core
                    .next_deadline()
                    .into_iter()
                    .chain(paced)
                    .min()
                    .map_or(MAX_WAIT_MS, |d| d.saturating_sub(now.ms))
                    .min(MAX_WAIT_MS)
            };
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(timeout)))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(shard = self.index, "poll failed: {e}");
                break;
            }
            // The clock is read once per turn.
            let now = self.clock.now();
            // Finished flushes first: their acks go out with this turn's writes.
            while let Ok(done) = self.flush_rx.try_recv() {
                match done {
                    Done::Flushed(result, ran_us) => {
                        self.core.handle_flushed(result, Some(ran_us), now)
                    }
                    Done::Spare(done) => self.core.handle_spare(done, now),
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    TCP_LISTENER => self.accept(Listener::Tcp, now),
                    WS_LISTENER => self.accept(Listener::Ws, now),
                    TLS_LISTENER => self.accept(Listener::Tls, now),
                    WSS_LISTENER => self.accept(Listener::Wss, now),
                    UDP_SOCKET => {
                        if ev.is_writable() {
                            self.udp_writable(now);
                        }
                        if ev.is_readable() {
                            self.udp_read(now);
                        }
                    }
                    Token(t) if t & CLOSING_BIT != 0 => self.step_closing(t & !CLOSING_BIT),
                    Token(t) => {
                        let Some(conn) = self.conn_at(t - FIRST_CONN) else {
                            continue;
                        };
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.service(conn, now);
                        }
                        if ev.is_writable() {
                            self.writable.push(conn);
                        }
                    }
                }
            }
            if self.udp.as_ref().is_some_and(|u| u.more) {
                self.udp_read(now);
            }
            for conn in std::mem::take(&mut self.ready) {
                self.service(conn, now);
            }
            self.drain_inbox(now);
            while let Ok((ticket, answer)) = self.answers.try_recv() {
                self.core.handle_hook_answer(ticket, answer, now);
            }
            self.core.handle_timeout(now);
            self.udp_paced(now);
            if self.accept_retry_at.is_some_and(|at| now.ms >= at) {
                self.accept_retry_at = None;
                for listener in Listener::ALL {
                    self.accept(listener, now);
                }
            }
            self.expire_handshakes(now);
            self.apply_effects(now);
            for conn in std::mem::take(&mut self.writable) {
                self.transmit(conn, now);
            }
            self.apply_effects(now);
            self.flush_remote(now);
            self.send_backlog();
            self.step_closings(now);
            if now.ms >= self.stats_at {
                self.stats_at = now.ms + 100;
                if let Ok(mut s) = self.stats.lock()
                    && let Some(slot) = s.get_mut(self.index)
                {
                    let mut stats = self.core.stats();
                    self.tls_counts.publish(&mut stats.counters);
                    stats.counters.remote_mail_out = self.remote_counts.0;
                    stats.counters.remote_mail_in = self.remote_counts.1;
                    if let Some(udp) = &self.udp {
                        udp.counts.publish(&mut stats.counters);
                    }
                    *slot = stats;
                }
            }
            if let Some(deadline) = self.shutdown_deadline {
                let done = self.core.is_finished()
                    && self.closing_order.is_empty()
                    && self.backlog.iter().all(VecDeque::is_empty);
                if done || now.ms >= deadline {
                    break;
                }
            }
        }
        self.core.finish();
        // The flusher ends when its channel closes; wait for it, so that once the shard
        // threads are joined nothing holds the log (a restart in the same process opens it).
        let (closed, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.flush_tx, closed));
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }

    fn conn_at(&self, slot: usize) -> Option<ConnId> {
        self.socks
            .get(slot)
            .and_then(Option::as_ref)
            .map(|s| ConnId {
                slot: slot as u32,
                generation: s.generation,
            })
    }

    /// Takes a connection's socket out of the table; its anonymous slot, if it held one, is
    /// freed (it logged in, or it is closing).
    fn take_sock(&mut self, conn: ConnId) -> Option<Sock> {
        let sock = match self.socks.get_mut(conn.slot as usize) {
            Some(slot @ Some(_))
                if slot
                    .as_ref()
                    .is_some_and(|s| s.generation == conn.generation) =>
            {
                slot.take()
            }
            _ => None,
        }?;
        if let Some(anon) = sock.anon {
            self.admission.release(anon);
        }
        if sock.stream.is_tls() {
            self.tls_counts.open = self.tls_counts.open.saturating_sub(1);
        }
        Some(sock)
    }

    fn put_sock(&mut self, conn: ConnId, mut sock: Sock) {
        let slot = conn.slot as usize;
        if self.socks.len() <= slot {
            self.socks.resize_with(slot + 1, || None);
        }
        if let Err(e) = self.poll.registry().register(
            sock.stream.tcp_mut(),
            Token(FIRST_CONN + slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.log(
                LogKind::Register,
                format_args!("cannot register a connection: {e}"),
            );
            self.core.handle_reset(conn, self.clock.now());
            if let Some(anon) = sock.anon {
                self.admission.release(anon);
            }
            self.admission.closed();
            return;
        }
        if sock.stream.is_tls() {
            self.tls_counts.open += 1;
        }
        self.socks[slot] = Some(sock);
    }

    /// A log line the outside world can cause: at most one per kind per second.
    fn log(&mut self, kind: LogKind, args: std::fmt::Arguments<'_>) {
        let now = self.clock.now().ms;
        if let Some(admitted) = self.log_limit.admit(kind, now) {
            tracing::warn!(shard = self.index, ?kind, "{args}{admitted}");
        }
    }

    /// A connection that logged in gives its anonymous slot back.
    fn note_login(&mut self, conn: ConnId) {
        let Some(Some(sock)) = self.socks.get_mut(conn.slot as usize) else {
            return;
        };
        if sock.generation == conn.generation
            && sock.anon.is_some()
            && self.core.is_logged_in(conn)
            && let Some(anon) = sock.anon.take()
        {
            self.admission.release(anon);
        }
    }

    /// Serves one connection's input for this turn: what the core has buffered first, then
    /// reads (within the byte budget) while the core takes input.
    fn service(&mut self, conn: ConnId, now: Now) {
        if self.local(conn).is_some() {
            return self.service_local(conn, now);
        }
        if self.core.is_relayed(conn) {
            if self.core.service_relayed(conn, self.read_budget, now) {
                self.ready.push(conn);
            }
            return;
        }
        if self.udp_session(conn).is_some() {
            return self.service_udp(conn, now);
        }
        let budget = self.read_budget;
        let mut total = 0;
        let mut handled = false;
        loop {
            match self.core.intake(conn) {
                None => {
                    // The core closed it or handed it over.
                    self.apply_effects(now);
                    return;
                }
                // The core says when to come back (`Effect::Resume`).
                Some(Intake::Hold) => return,
                Some(Intake::Pending) if handled => {
                    self.ready.push(conn);
                    return;
                }
                Some(Intake::Pending) => {
                    self.core.handle_continue(conn, now);
                    handled = true;
                    self.note_login(conn);
                }
                Some(Intake::Read) if total >= budget => {
                    self.ready.push(conn);
                    return;
                }
                Some(Intake::Read) => {
                    let want = (budget - total).min(socket::READ_MAX);
                    let scratch = &mut self.read_scratch;
                    let sock = match self.socks.get_mut(conn.slot as usize) {
                        Some(Some(s)) if s.generation == conn.generation => s,
                        _ => return,
                    };
                    let read = sock.stream.read(scratch, want);
                    if sock.stream.take_handshake_news() {
                        self.tls_counts.handshakes += 1;
                    }
                    match read {
                        // Drained: the next arrival raises a new event.
                        Ok(ReadOutcome::Drained) => return,
                        Ok(ReadOutcome::Eof) => return self.core.handle_eof(conn, now),
                        Ok(ReadOutcome::Data { len, more }) => {
                            total += len;
                            let bytes = self.read_scratch.get(..len).unwrap_or_default();
                            self.core.handle_bytes(conn, bytes, now);
                            handled = true;
                            self.note_login(conn);
                            if !more && self.core.intake(conn) == Some(Intake::Read) {
                                // A short read: the socket is drained.
                                return;
                            }
                        }
                        Err(ReadError::Io) => return self.reset(conn, now),
                        Err(ReadError::Tls(e)) => {
                            self.tls_counts.failures += 1;
                            self.log(
                                LogKind::Tls,
                                format_args!("TLS error, connection dropped: {e}"),
                            );
                            return self.reset(conn, now);
                        }
                    }
                }
            }
        }
    }

    fn reset(&mut self, conn: ConnId, now: Now) {
        if let Some(mut sock) = self.take_sock(conn) {
            let _ = self.poll.registry().deregister(sock.stream.tcp_mut());
            self.admission.closed();
        }
        self.core.handle_reset(conn, now);
    }

    /// Writes a connection's queued bytes.
    fn transmit(&mut self, conn: ConnId, now: Now) {
        if self.local(conn).is_some() {
            return self.transmit_local(conn, now);
        }
        if self.core.is_relayed(conn) {
            return self.core.transmit_relayed(conn, now);
        }
        if self.udp_session(conn).is_some() {
            return self.transmit_udp(conn, now);
        }
        let Some(Some(sock)) = self.socks.get_mut(conn.slot as usize) else {
            return;
        };
        if sock.generation != conn.generation {
            return;
        }
        let Some(buf) = self.core.outbound(conn) else {
            return;
        };
        if buf.is_empty() {
            // A TLS session may still hold its own output (a handshake reply that met a full
            // socket): out with it; the core has nothing to hear about.
            if sock.stream.has_pending_output() {
                let mut none = bytes::BytesMut::new();
                if sock.stream.write_out(&mut none).is_err() {
                    self.reset(conn, now);
                }
            }
            return;
        }
        match sock.stream.write_out(buf) {
            Ok((written, _)) => self.core.handle_written(conn, written > 0, now),
            Err(_) => self.reset(conn, now),
        }
    }

    fn drain_inbox(&mut self, now: Now) {
        for _ in 0..INBOX_BUDGET {
            match self.inbox.try_recv() {
                Ok(Mail::Batch(batch)) => self.core.handle_mail(batch, now),
                Ok(Mail::Adopt(stream, adoption)) => {
                    let conn = self.core.handle_adopt(*adoption, now);
                    let sock = Sock {
                        stream,
                        generation: conn.generation,
                        anon: None,
                        refused: false,
                    };
                    self.put_sock(conn, sock);
                    // Input may wait in the socket from before the move.
                    self.ready.push(conn);
                    self.apply_effects(now);
                }
                Ok(Mail::AdoptUdp(moving, adoption)) => self.adopt_udp(*moving, *adoption, now),
                Ok(Mail::Datagram { bytes, from }) => self.udp_datagram(&bytes, from, now),
                Ok(Mail::Shutdown) => self.shutdown(now),
                Ok(Mail::LocalOpen {
                    id,
                    identity,
                    service,
                    end,
                }) => {
                    let conn = self.core.handle_open_local(identity, service, now);
                    let slot = conn.slot as usize;
                    if self.locals.len() <= slot {
                        self.locals.resize_with(slot + 1, || None);
                    }
                    self.locals[slot] = Some(LocalPipe {
                        generation: conn.generation,
                        id,
                        end,
                        input: VecDeque::new(),
                    });
                    self.local_ids.insert(id, conn);
                    self.apply_effects(now);
                }
                Ok(Mail::LocalInput { id, bytes }) => {
                    if let Some(&conn) = self.local_ids.get(&id)
                        && let Some(pipe) = self.local_mut(conn)
                    {
                        pipe.input.push_back(bytes);
                        self.service_local(conn, now);
                    }
                }
                Ok(Mail::LocalDrained { id }) => {
                    if let Some(&conn) = self.local_ids.get(&id) {
                        self.writable.push(conn);
                    }
                }
                Ok(Mail::LocalClose { id }) => {
                    if let Some(&conn) = self.local_ids.get(&id) {
                        self.core.handle_eof(conn, now);
                        self.apply_effects(now);
                    }
                }
                Ok(Mail::Query(q)) => self.answer(q, now),
                Ok(Mail::Routed(done)) => {
                    self.core.handle_routed(done, now);
                    self.apply_effects(now);
                }
                Ok(Mail::Found { gather, found }) => {
                    self.core.handle_found(gather, found, now);
                    self.apply_effects(now);
                }
                Ok(Mail::Remote { from, bytes }) => self.remote_mail(from, &bytes, now),
                Ok(Mail::LinkUp { node }) => {
                    self.core.handle_link_up(node, now);
                    self.apply_effects(now);
                }
                Ok(Mail::LinkDown { node }) => {
                    let retry = self.carrier.as_ref().map_or(1_000, |c| c.retry_after_ms);
                    self.core.handle_link_down(node, retry, now);
                    self.apply_effects(now);
                }
                Err(_) => break,
            }
        }
    }

    fn shutdown(&mut self, now: Now) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(now.ms + self.close_linger_ms + SHUTDOWN_SLACK_MS);
        let listeners = [
            self.tcp.take(),
            self.ws.take(),
            self.tls.take(),
            self.wss.take(),
        ];
        for mut l in listeners.into_iter().flatten() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.core.handle_shutdown(now);
    }

    /// Carries out what the core asked for, until it asks for nothing more.
    fn apply_effects(&mut self, now: Now) {
        for _ in 0..8 {
            self.core.take_effects(&mut self.effects);
            if self.effects.is_empty() {
                return;
            }
            for effect in std::mem::take(&mut self.effects) {
                match effect {
                    Effect::Transmit(conn) => self.transmit(conn, now),
                    Effect::Close { conn, mut last } => {
                        if let Some(mut pipe) = self.take_local(conn) {
                            // Its last words, then the channel closes with the pipe.
                            pipe.write_last(std::mem::take(&mut last));
                            continue;
                        }
                        if self.udp_session(conn).is_some() {
                            self.close_udp(conn, std::mem::take(&mut last));
                            continue;
                        }
                        if let Some(mut sock) = self.take_sock(conn) {
                            if sock.refused {
                                // Refused at accept: one write of its last words, then gone
                                // (a flood past the limit must not hold descriptors).
                                let _ = self.poll.registry().deregister(sock.stream.tcp_mut());
                                socket::close_now(sock.stream, last);
                                self.admission.closed();
                            } else {
                                // Counted until its descriptor is closed, after the linger.
                                self.begin_closing(sock.stream, last, now);
                            }
                        }
                    }
                    Effect::Handover { conn, to, adoption } => {
                        let Some(to) = self.placement.local(to) else {
                            // The core relays a login homed on another node instead.
                            debug_assert!(false, "a handover to another node");
                            self.reset(conn, now);
                            continue;
                        };
                        if self.udp_session(conn).is_some() {
                            self.handover_udp(conn, to, adoption);
                        } else if let Some(mut sock) = self.take_sock(conn) {
                            let _ = self.poll.registry().deregister(sock.stream.tcp_mut());
                            self.post(to, Mail::Adopt(sock.stream, adoption));
                        }
                    }
                    Effect::Resume(conn) => self.ready.push(conn),
                    Effect::Route(op) => self.route(op, now),
                    Effect::Lookup { gather, users } => {
                        let asked = self.bridge.as_ref().is_some_and(|tx| {
                            tx.try_send(BridgeMsg::Presence {
                                shard: self.index,
                                gather,
                                users,
                            })
                            .is_ok()
                        });
                        if !asked {
                            // No index to ask now: the answer says what this node knows.
                            self.core.handle_found(gather, Vec::new(), now);
                        }
                    }
                    Effect::Mail { to, batch } => match self.placement.local(to) {
                        Some(local) => self.post(local, Mail::Batch(batch)),
                        None => self.queue_remote(to, batch),
                    },
                    Effect::Flush(ticket) => {
                        // The core has at most one flush in flight, so this never waits.
                        if self.flush_tx.send(Job::Flush(ticket)).is_err() {
                            self.core.handle_flushed(
                                Err(io::Error::other("the flusher thread is gone")),
                                None,
                                now,
                            );
                        }
                    }
                    Effect::Spare(ticket) => {
                        // Dropped if the flusher is gone: the log then does the work itself.
                        let _ = self.flush_tx.send(Job::Spare(ticket));
                    }
                }
            }
        }
    }

    fn post(&mut self, to: usize, mail: Mail) {
        if let Some(q) = self.backlog.get_mut(to) {
            q.push_back(mail);
        }
        self.send_backlog_to(to);
    }

    fn send_backlog(&mut self) {
        for to in 0..self.backlog.len() {
            self.send_backlog_to(to);
        }
    }

    /// Sends what waits for peer `to`, in order, until its inbox is full (never blocks a shard).
    fn send_backlog_to(&mut self, to: usize) {
        let Some((tx, waker)) = self.peers.get(to) else {
            return;
        };
        let Some(q) = self.backlog.get_mut(to) else {
            return;
        };
        let mut sent = false;
        while let Some(mail) = q.pop_front() {
            match tx.try_send(mail) {
                Ok(()) => sent = true,
                Err(TrySendError::Full(mail)) => {
                    q.push_front(mail);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        if sent {
            let _ = waker.wake();
        }
    }
}
