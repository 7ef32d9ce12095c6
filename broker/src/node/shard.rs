//! One shard: a thread with its own `mio::Poll`, connections, conversations, log and timing wheel.
//!
//! A turn of the loop: wait for events (bounded by the next timer), accept, read and decode
//! within a per-connection budget, run the sessions, drain the shard's inbox of batches from
//! other shards, fire due timers, start a group-commit flush if appends are waiting, then write
//! every connection with output once and send each other shard one batch.
//!
//! Roles (see [`super::conv`] for placement):
//! * **owner** of conversations: de-duplicates retried sends, assigns seqs and message ids,
//!   appends to the log, and once the record is durable under the policy releases the send-ack
//!   and the deliveries (in seq order);
//! * **home** of users: their connections (a connection moves here after login), their devices,
//!   their inbox (last seq per conversation), live push and sync.

use super::FastMap;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use parley_proto::frame::WireError;
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_storage::{Durability, Log, Lsn, MmapBackend, RecordMeta, SyncTicket, Timestamp};
use prost::Message as _;

use super::conv::{conv_id, direct_users, home_shard, owner_shard, view_for};
use super::ids::MsgIdGen;
use super::msg::{Adoption, Origin, ReadPurpose, ShardMsg};
use super::session::{Action, Outbox, Phase, Session, SessionConfig, SyncAsk, Timers};
use crate::auth::{AuthError, Identity, TokenVerifier};
use crate::config::{Config, DurabilityPolicy};
use crate::net::{CloseProgress, Conn, ReadStatus, listener};
use crate::transport::{Inbound, Transport, TransportLimits};

/// Record kind of a stored message in the log.
pub(crate) const KIND_MESSAGE: u8 = 1;
const WAKER: Token = Token(0);
const TCP_LISTENER: Token = Token(1);
const WS_LISTENER: Token = Token(2);
const FIRST_CONN: usize = 3;
/// Bound of each shard's inbox, in batches.
pub(crate) const INBOX_BATCHES: usize = 4096;
/// How long a closing connection may take to say goodbye.
const CLOSE_GRACE_MS: u64 = 2_000;

type MmapLog = Log<MmapBackend>;

/// Everything a shard thread starts with.
pub(crate) struct ShardSetup {
    pub(crate) index: usize,
    pub(crate) shards: usize,
    pub(crate) config: Arc<Config>,
    pub(crate) verifier: Arc<dyn TokenVerifier>,
    pub(crate) poll: Poll,
    pub(crate) waker: Arc<Waker>,
    pub(crate) tcp: Option<TcpListener>,
    pub(crate) ws: Option<TcpListener>,
    pub(crate) inbox: Receiver<Vec<ShardMsg>>,
    pub(crate) peers: Vec<(Sender<Vec<ShardMsg>>, Arc<Waker>)>,
    pub(crate) log: MmapLog,
    pub(crate) connections: Arc<AtomicUsize>,
    pub(crate) barrier: Arc<Barrier>,
}

struct Connection {
    conn: Conn,
    transport: Transport,
    session: Session,
    generation: u64,
    timer: Option<(parley_timer::TimerKey, u64)>,
    closing: Option<u64>,
    /// The sync under way, boxed: rare, and most connections never hold one.
    sync: Option<Box<SyncRun>>,
    eof: bool,
    /// The logged-in user and device as shared strings, made on the first send and reused by
    /// every later one (a send would otherwise allocate both).
    who: Option<(Arc<str>, Arc<str>)>,
}

/// Re-exported wheel types, under a short name.
mod parley_timer {
    pub(crate) use crate::wheel::{TimerKey, TimerWheel};
}

/// What an entry of the shard's timing wheel is for.
enum TimerFor {
    /// The session's own next deadline (login, idle, write stall) or a closing grace period.
    Session,
    /// The retransmit of one unacknowledged delivery.
    Retransmit(Arc<str>, u64),
}

/// An entry of the shard's timing wheel: a connection (slot and generation) and what for.
struct Tick {
    slot: usize,
    generation: u64,
    what: TimerFor,
}

/// The shard's wheel as one connection's session sees it ([`Timers`]).
struct ConnTimers<'a> {
    wheel: &'a mut parley_timer::TimerWheel<Tick>,
    slot: usize,
    generation: u64,
}

impl Timers for ConnTimers<'_> {
    fn schedule(&mut self, at: u64, key: &Arc<str>, seq: u64) -> parley_timer::TimerKey {
        self.wheel.insert(
            at,
            Tick {
                slot: self.slot,
                generation: self.generation,
                what: TimerFor::Retransmit(Arc::clone(key), seq),
            },
        )
    }

    fn cancel(&mut self, timer: parley_timer::TimerKey) {
        self.wheel.cancel(timer);
    }
}

struct SyncRun {
    request_id: u64,
    page_size: u32,
    cursors: HashMap<String, u64>,
    ranges: VecDeque<(String, u64, u64)>,
    in_flight: bool,
}

/// A sender device's recently stored messages, by client message id: enough to answer a retry
/// with the original ack (the conversation view is rebuilt from the request), in 32 bytes each.
struct DedupWindow {
    order: VecDeque<u64>,
    acks: FastMap<u64, Remembered>,
}

/// What a retry's ack repeats.
#[derive(Clone, Copy)]
struct Remembered {
    msg_id: u64,
    seq: u64,
    server_time: i64,
    lsn: Lsn,
}

/// The send-ack of a stored message, from the sender `user`'s view of conversation `key`.
fn send_ack(
    client_msg_id: u64,
    r: &Remembered,
    key: &str,
    user: &str,
    always: bool,
) -> pb::SendAck {
    pb::SendAck {
        client_msg_id,
        msg_id: r.msg_id,
        seq: r.seq,
        server_time: r.server_time,
        conversation: Some(view_for(key, user)),
        durability: if always {
            pb::Durability::Disk
        } else {
            pb::Durability::Memory
        } as i32,
    }
}

struct ConvState {
    key: String,
    /// `key` and its two users as shared strings, for the deliveries of every message (made
    /// once per conversation, not per message). `None` for a key that names no direct pair.
    shared: Option<SharedKey>,
    last_seq: u64,
    dedup: FastMap<(Arc<str>, Arc<str>), DedupWindow>,
}

/// A conversation key and its users, shared by every delivery of the conversation.
struct SharedKey {
    key: Arc<str>,
    users: [Arc<str>; 2],
}

impl SharedKey {
    fn of(key: &str) -> Option<SharedKey> {
        let (a, b) = direct_users(key)?;
        Some(SharedKey {
            key: key.into(),
            users: [a.into(), b.into()],
        })
    }
}

struct Pending {
    lsn: Lsn,
    origin: Origin,
    request_id: u64,
    ack: pb::SendAck,
    /// The conversation (by id), the message, its sender user and device.
    deliver: Option<(u64, pb::Message, Arc<str>, Arc<str>)>,
}

#[derive(Default)]
struct UserState {
    devices: Vec<(Arc<str>, usize)>,
    inbox: FastMap<String, u64>,
}

/// A shard's state; [`Shard::run`] is its thread.
pub(crate) struct Shard {
    index: usize,
    shards: usize,
    config: Arc<Config>,
    scfg: Arc<SessionConfig>,
    verifier: Arc<dyn TokenVerifier>,
    poll: Poll,
    tcp: Option<TcpListener>,
    ws: Option<TcpListener>,
    accept_paused: bool,
    inbox: Receiver<Vec<ShardMsg>>,
    peers: Vec<(Sender<Vec<ShardMsg>>, Arc<Waker>)>,
    outgoing: Vec<Vec<ShardMsg>>,
    local: VecDeque<ShardMsg>,
    /// Connections by slot, boxed: a free or grown-but-unused slot costs a pointer, not a
    /// whole `Connection` (the vector doubles as it grows).
    conns: Vec<Option<Box<Connection>>>,
    /// Every connection's `read` syscalls land here first ([`Conn::read`]).
    read_scratch: Box<[u8]>,
    /// Reused list of a user's device slots while delivering.
    slot_scratch: Vec<usize>,
    free: Vec<usize>,
    generations: Vec<u64>,
    wheel: parley_timer::TimerWheel<Tick>,
    start: Instant,
    log: MmapLog,
    convs: FastMap<u64, ConvState>,
    ids: MsgIdGen,
    pending: VecDeque<Pending>,
    flush_tx: Sender<SyncTicket<parley_storage::MmapSync>>,
    flush_rx: Receiver<io::Result<Lsn>>,
    flushing: bool,
    users: FastMap<String, UserState>,
    ready: Vec<usize>,
    dirty: Vec<usize>,
    connections: Arc<AtomicUsize>,
    shutting_down: Option<u64>,
    last_tick: u64,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn is_active(c: &Connection) -> bool {
    c.session.phase() == Phase::Active && c.closing.is_none()
}

impl Shard {
    /// Builds the shard and rebuilds its state from its log (conversations, de-dup windows,
    /// inboxes sent to the users' home shards).
    pub(crate) fn new(setup: ShardSetup) -> io::Result<Self> {
        let (flush_tx, flush_jobs) = crossbeam_channel::bounded::<SyncTicket<_>>(1);
        let (done_tx, flush_rx) = crossbeam_channel::bounded(1);
        let waker = Arc::clone(&setup.waker);
        std::thread::Builder::new()
            .name(format!("parley-flush-{}", setup.index))
            .spawn(move || {
                for ticket in flush_jobs {
                    if done_tx.send(ticket.run()).is_err() {
                        break;
                    }
                    let _ = waker.wake();
                }
            })?;
        let scfg = Arc::new(SessionConfig::from_config(&setup.config));
        let mut shard = Shard {
            index: setup.index,
            shards: setup.shards,
            scfg,
            verifier: setup.verifier,
            poll: setup.poll,
            tcp: setup.tcp,
            ws: setup.ws,
            accept_paused: false,
            inbox: setup.inbox,
            outgoing: (0..setup.shards).map(|_| Vec::new()).collect(),
            peers: setup.peers,
            local: VecDeque::new(),
            conns: Vec::new(),
            read_scratch: vec![0; crate::net::conn::READ_MAX].into_boxed_slice(),
            slot_scratch: Vec::new(),
            free: Vec::new(),
            generations: Vec::new(),
            wheel: parley_timer::TimerWheel::new(0),
            start: Instant::now(),
            log: setup.log,
            convs: FastMap::default(),
            ids: MsgIdGen::new(setup.index),
            pending: VecDeque::new(),
            flush_tx,
            flush_rx,
            flushing: false,
            users: FastMap::default(),
            ready: Vec::new(),
            dirty: Vec::new(),
            connections: setup.connections,
            shutting_down: None,
            last_tick: 0,
            config: setup.config,
        };
        shard.rebuild();
        Ok(shard)
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Rebuilds conversations, de-dup windows and id generator from the log, and tells each
    /// participant's home shard what its conversations hold.
    fn rebuild(&mut self) {
        let window = self.config.limits.dedup_window.max(1);
        for rec in self.log.scan(Lsn(0)) {
            let Ok(rec) = rec else {
                continue;
            };
            if rec.meta.kind != KIND_MESSAGE {
                continue;
            }
            let Ok(m) = pb::Message::decode(rec.payload) else {
                continue;
            };
            let Some(key) = m.conversation.as_ref().map(|c| c.id.clone()) else {
                continue;
            };
            self.ids.observe(rec.meta.msg_id);
            let st = self
                .convs
                .entry(rec.meta.conversation)
                .or_insert_with(|| ConvState {
                    key: key.clone(),
                    shared: SharedKey::of(&key),
                    last_seq: 0,
                    dedup: FastMap::default(),
                });
            st.last_seq = st.last_seq.max(m.seq);
            let remembered = Remembered {
                msg_id: m.msg_id,
                seq: m.seq,
                server_time: m.server_time,
                lsn: rec.lsn,
            };
            let dk: (Arc<str>, Arc<str>) =
                (m.from_user.as_str().into(), m.from_device.as_str().into());
            remember(
                st.dedup.entry(dk).or_insert_with(new_window),
                m.client_msg_id,
                remembered,
                window,
            );
        }
        let mut news = Vec::new();
        for st in self.convs.values() {
            if let Some((a, b)) = direct_users(&st.key) {
                news.push((a.to_owned(), st.key.clone(), st.last_seq));
                if a != b {
                    news.push((b.to_owned(), st.key.clone(), st.last_seq));
                }
            }
        }
        for (user, key, last_seq) in news {
            let target = home_shard(&user, self.shards);
            self.route(
                target,
                ShardMsg::Inbox {
                    user,
                    key,
                    last_seq,
                },
            );
        }
        self.send_outgoing();
    }

    /// The shard's thread body.
    pub(crate) fn run(mut self, barrier: Arc<Barrier>) {
        // Every shard has sent its inbox rebuild before any shard serves a client.
        barrier.wait();
        self.drain_inbox();
        for (token, listener) in [
            (TCP_LISTENER, self.tcp.as_mut()),
            (WS_LISTENER, self.ws.as_mut()),
        ] {
            if let Some(l) = listener
                && let Err(e) = self.poll.registry().register(l, token, Interest::READABLE)
            {
                eprintln!("shard {}: cannot register listener: {e}", self.index);
            }
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let now = self.now();
            let mut timeout = self
                .wheel
                .next_deadline()
                .map_or(50, |d| d.saturating_sub(now))
                .min(50);
            if !self.ready.is_empty()
                || !self.local.is_empty()
                || self.outgoing.iter().any(|o| !o.is_empty())
            {
                timeout = 0;
            }
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(timeout)))
                && e.kind() != io::ErrorKind::Interrupted
            {
                eprintln!("shard {}: poll failed: {e}", self.index);
                break;
            }
            let now = self.now();
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    TCP_LISTENER => self.accept(false, now),
                    WS_LISTENER => self.accept(true, now),
                    Token(t) => {
                        let slot = t - FIRST_CONN;
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.service(slot, now);
                        }
                        if ev.is_writable() {
                            self.mark_dirty(slot);
                        }
                    }
                }
            }
            for slot in std::mem::take(&mut self.ready) {
                self.service(slot, now);
            }
            self.drain_inbox();
            self.poll_flush();
            self.fire_timers(now);
            if now.saturating_sub(self.last_tick) >= 20 {
                self.last_tick = now;
                if let Err(e) = self.log.tick(Timestamp::from_micros(unix_ms() * 1000)) {
                    eprintln!("shard {}: log maintenance failed: {e}", self.index);
                }
                if self.config.storage.durability != DurabilityPolicy::Always {
                    self.release();
                }
                if self.accept_paused {
                    self.accept_paused = false;
                    self.accept(false, now);
                    self.accept(true, now);
                }
            }
            self.start_flush();
            self.flush_connections(now);
            self.send_outgoing();
            if let Some(deadline) = self.shutting_down {
                let open = self.conns.iter().any(Option::is_some);
                if (!open && self.pending.is_empty() && !self.flushing) || now >= deadline {
                    break;
                }
            }
        }
        if let Err(e) = self.log.flush() {
            eprintln!("shard {}: final flush failed: {e}", self.index);
        }
    }

    // ----- routing -------------------------------------------------------------------------

    fn route(&mut self, target: usize, msg: ShardMsg) {
        if target == self.index {
            self.local.push_back(msg);
        } else if let Some(q) = self.outgoing.get_mut(target) {
            q.push(msg);
        }
    }

    fn send_outgoing(&mut self) {
        for target in 0..self.outgoing.len() {
            if self.outgoing[target].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.outgoing[target]);
            let Some((tx, waker)) = self.peers.get(target) else {
                continue;
            };
            match tx.try_send(batch) {
                Ok(()) => {
                    let _ = waker.wake();
                }
                // The peer is behind: keep the batch and retry next turn (never block a shard).
                Err(TrySendError::Full(batch)) => self.outgoing[target] = batch,
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    fn drain_inbox(&mut self) {
        let mut budget = 256;
        while budget > 0 {
            budget -= 1;
            match self.inbox.try_recv() {
                Ok(batch) => {
                    for msg in batch {
                        self.handle_msg(msg);
                    }
                }
                Err(_) => break,
            }
        }
        while let Some(msg) = self.local.pop_front() {
            self.handle_msg(msg);
        }
    }

    fn handle_msg(&mut self, msg: ShardMsg) {
        let now = self.now();
        match msg {
            ShardMsg::Append {
                origin,
                user,
                device,
                request,
                unix_ms,
            } => self.append(origin, user, device, request, unix_ms),
            ShardMsg::Reply { to, frame } => {
                if let Some(slot) = self.slot_of(to) {
                    let mut out = Outbox::default();
                    out.frames.push(frame);
                    self.apply(slot, out, now);
                }
            }
            ShardMsg::Deliver {
                user,
                key,
                exclude_device,
                message,
            } => self.deliver(user, key, exclude_device, message, now),
            ShardMsg::Inbox {
                user,
                key,
                last_seq,
            } => {
                let e = self
                    .users
                    .entry(user)
                    .or_default()
                    .inbox
                    .entry(key)
                    .or_insert(0);
                *e = (*e).max(last_seq);
            }
            ShardMsg::Read {
                reply,
                user,
                key,
                from,
                to,
                limit,
                newest_first,
                purpose,
            } => self.read(reply, user, key, from, to, limit, newest_first, purpose),
            ShardMsg::ReadDone {
                to,
                key,
                purpose,
                messages,
                more,
                first_seq,
                last_seq,
                to_seq,
            } => self.read_done(
                to, key, purpose, messages, more, first_seq, last_seq, to_seq, now,
            ),
            ShardMsg::Adopt(adoption) => self.adopt(*adoption, now),
            ShardMsg::Shutdown => self.shutdown(now),
        }
    }

    // ----- connections ---------------------------------------------------------------------

    fn accept(&mut self, websocket: bool, now: u64) {
        if self.shutting_down.is_some() {
            return;
        }
        loop {
            let listener = if websocket {
                self.ws.as_ref()
            } else {
                self.tcp.as_ref()
            };
            let Some(listener) = listener else {
                return;
            };
            match listener::accept(listener) {
                Ok(Some((conn, _addr))) => {
                    let limits = TransportLimits::from(&self.config.limits);
                    let transport = if websocket {
                        Transport::websocket(limits)
                    } else {
                        Transport::tcp(limits)
                    };
                    let over = self.connections.fetch_add(1, Ordering::Relaxed)
                        >= self.config.limits.max_connections;
                    let Some(slot) = self.insert(conn, transport, now) else {
                        continue;
                    };
                    if over {
                        let mut out = Outbox::default();
                        if let Some(c) = self.conns[slot].as_mut() {
                            c.session.close(
                                pb::ErrorCode::TooManyConnections,
                                "the node has reached limits.max_connections",
                                &mut out,
                            );
                        }
                        self.apply(slot, out, now);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    eprintln!(
                        "shard {}: accept failed ({e}); retrying shortly",
                        self.index
                    );
                    self.accept_paused = true;
                    return;
                }
            }
        }
    }

    /// Registers a connection in a free slot; `None` (and the connection dropped) on failure.
    fn insert(&mut self, mut conn: Conn, transport: Transport, now: u64) -> Option<usize> {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.generations.push(0);
            self.conns.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut conn,
            Token(FIRST_CONN + slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            eprintln!("shard {}: cannot register a connection: {e}", self.index);
            self.free.push(slot);
            self.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.generations[slot] += 1;
        self.conns[slot] = Some(Box::new(Connection {
            conn,
            transport,
            session: Session::new(Arc::clone(&self.scfg), now),
            generation: self.generations[slot],
            timer: None,
            closing: None,
            sync: None,
            eof: false,
            who: None,
        }));
        self.arm(slot);
        Some(slot)
    }

    fn origin(&self, slot: usize) -> Origin {
        Origin {
            shard: self.index,
            slot,
            generation: self.generations.get(slot).copied().unwrap_or(0),
        }
    }

    fn slot_of(&self, o: Origin) -> Option<usize> {
        match self.conns.get(o.slot) {
            Some(Some(c)) if c.generation == o.generation => Some(o.slot),
            _ => None,
        }
    }

    /// Reads and decodes what a connection sent, and runs its session.
    fn service(&mut self, slot: usize, now: u64) {
        let budget = self.config.limits.read_budget_bytes;
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.closing.is_some() {
            match c.conn.drive_close(budget) {
                Ok(CloseProgress::Done) | Err(_) => self.remove(slot),
                Ok(CloseProgress::PendingMore) => self.ready.push(slot),
                Ok(CloseProgress::Pending) => {}
            }
            return;
        }
        match c.conn.read(&mut self.read_scratch, budget) {
            Ok(r) => match r.status {
                ReadStatus::BudgetExhausted => self.ready.push(slot),
                ReadStatus::Eof => c.eof = true,
                ReadStatus::Drained => {}
            },
            Err(_) => {
                self.remove(slot);
                return;
            }
        }
        self.decode(slot, now);
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut)
            && c.eof
            && c.closing.is_none()
        {
            // The peer stopped sending: flush what it is owed, then close.
            self.begin_close(slot, now);
        }
    }

    fn decode(&mut self, slot: usize, now: u64) {
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if c.closing.is_some() {
                return;
            }
            let mut out = Outbox::default();
            let (inbuf, outbuf) = c.conn.buffers();
            let item = c.transport.decode(inbuf, outbuf);
            let mut login = None;
            match item {
                Ok(None) => return,
                Ok(Some(Inbound::Frame(frame))) => {
                    let mut timers = ConnTimers {
                        wheel: &mut self.wheel,
                        slot,
                        generation: c.generation,
                    };
                    login = c.session.handle_frame(frame, now, &mut timers, &mut out);
                }
                Ok(Some(Inbound::Upgraded { token, .. })) => {
                    c.session.handle_liveness(now);
                    if let Some(token) = token {
                        login = Some((
                            0,
                            pb::Login {
                                protocol_version: parley_proto::PROTOCOL_VERSION,
                                token,
                                client_name: String::new(),
                            },
                        ));
                    }
                    self.mark_dirty(slot);
                }
                Ok(Some(Inbound::Liveness)) => {
                    c.session.handle_liveness(now);
                    self.mark_dirty(slot);
                }
                Ok(Some(Inbound::PeerClosed { .. })) => {
                    self.begin_close(slot, now);
                    return;
                }
                Err(e) if e.is_fatal() => {
                    // The transport wrote the peer's last words.
                    self.begin_close(slot, now);
                    return;
                }
                Err(e) if c.session.phase() == Phase::AwaitingLogin => {
                    // Nothing valid has been said yet: this is not a client of ours.
                    out.frames.push(e.to_error_frame(0, true));
                    out.actions.push(Action::Close(e.code(), e.to_string()));
                }
                Err(e) => out.frames.push(e.to_error_frame(0, false)),
            }
            self.apply(slot, out, now);
            if let Some((request_id, login)) = login
                && self.login(slot, request_id, login, now)
            {
                // The connection moved to its home shard.
                return;
            }
        }
    }

    /// Verifies a login; returns true if the connection was handed to another shard.
    fn login(&mut self, slot: usize, request_id: u64, login: pb::Login, now: u64) -> bool {
        let unix_secs = (unix_ms() / 1000).max(0) as u64;
        let verdict = if login.protocol_version != 0
            && login.protocol_version != parley_proto::PROTOCOL_VERSION
        {
            Err((
                pb::ErrorCode::UnsupportedVersion,
                "protocol_version must be 1".to_string(),
            ))
        } else {
            self.verifier.verify(&login.token, unix_secs).map_err(|e| {
                let code = match e {
                    AuthError::Expired => pb::ErrorCode::TokenExpired,
                    _ => pb::ErrorCode::BadToken,
                };
                (code, e.to_string())
            })
        };
        let identity = match verdict {
            Ok(identity) => identity,
            Err((code, message)) => {
                let mut out = Outbox::default();
                out.frames.push(super::session::error_frame(
                    request_id, code, &message, true, 0,
                ));
                out.actions.push(Action::Close(code, message));
                self.apply(slot, out, now);
                return false;
            }
        };
        let home = home_shard(&identity.user, self.shards);
        if home == self.index {
            self.activate(slot, identity, request_id, now);
            return false;
        }
        let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return false;
        };
        self.release_slot(slot, &mut c);
        let _ = self.poll.registry().deregister(&mut c.conn);
        self.route(
            home,
            ShardMsg::Adopt(Box::new(Adoption {
                conn: c.conn,
                transport: c.transport,
                identity,
                request_id,
            })),
        );
        true
    }

    fn adopt(&mut self, a: Adoption, now: u64) {
        let Some(slot) = self.insert(a.conn, a.transport, now) else {
            return;
        };
        self.activate(slot, a.identity, a.request_id, now);
        // Frames pipelined behind the login are already in the buffer.
        self.decode(slot, now);
    }

    fn activate(&mut self, slot: usize, identity: Identity, request_id: u64, now: u64) {
        let device: Arc<str> = identity.device.as_str().into();
        let user = identity.user.clone();
        // The same user and device logging in again replaces the old connection.
        let old: Vec<usize> = self
            .users
            .get(&user)
            .map(|u| {
                u.devices
                    .iter()
                    .filter(|(d, _)| *d == device)
                    .map(|&(_, s)| s)
                    .collect()
            })
            .unwrap_or_default();
        for old_slot in old {
            let mut out = Outbox::default();
            if let Some(c) = self.conns.get_mut(old_slot).and_then(Option::as_mut) {
                c.session.close(
                    pb::ErrorCode::Replaced,
                    "the same user and device logged in on another connection",
                    &mut out,
                );
            }
            self.apply(old_slot, out, now);
            if let Some(u) = self.users.get_mut(&user) {
                u.devices.retain(|&(_, s)| s != old_slot);
            }
        }
        self.users
            .entry(user)
            .or_default()
            .devices
            .push((device, slot));
        let mut out = Outbox::default();
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            c.session.activate(
                identity,
                request_id,
                &self.config.node,
                now,
                unix_ms(),
                &mut out,
            );
        }
        self.apply(slot, out, now);
    }

    /// Carries out a session's outbox for connection `slot`.
    fn apply(&mut self, slot: usize, out: Outbox, now: u64) {
        let max_out = self.config.limits.max_outbound_bytes;
        let mut actions = out.actions;
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.closing.is_none() {
            let mut behind = Outbox::default();
            for frame in &out.frames {
                let is_deliver = matches!(frame.body, Some(Body::Deliver(_)));
                if let Err(e) = c.transport.encode(frame, c.conn.out_buf()) {
                    eprintln!("shard {}: cannot encode a frame: {e}", self.index);
                    continue;
                }
                if is_deliver && c.conn.queued_bytes() > max_out {
                    c.session.go_behind(
                        "outbound queue over limits.max_outbound_bytes",
                        &mut ConnTimers {
                            wheel: &mut self.wheel,
                            slot,
                            generation: c.generation,
                        },
                        &mut behind,
                    );
                }
            }
            for frame in &behind.frames {
                let _ = c.transport.encode(frame, c.conn.out_buf());
            }
            self.dirty.push(slot);
        }
        let origin = self.origin(slot);
        for action in actions.drain(..) {
            match action {
                Action::Send(request) => {
                    let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                        continue;
                    };
                    let (user, device) = match &c.who {
                        Some((u, d)) => (Arc::clone(u), Arc::clone(d)),
                        None => {
                            let Some(identity) = c.session.identity() else {
                                continue;
                            };
                            let who: (Arc<str>, Arc<str>) = (
                                identity.user.as_str().into(),
                                identity.device.as_str().into(),
                            );
                            c.who = Some(who.clone());
                            who
                        }
                    };
                    let target = owner_shard(conv_id(&request.key), self.shards);
                    self.route(
                        target,
                        ShardMsg::Append {
                            origin,
                            user,
                            device,
                            request,
                            unix_ms: unix_ms(),
                        },
                    );
                }
                Action::Sync(ask) => self.start_sync(slot, ask, now),
                Action::History(h) => {
                    let Some(user) = self.conns[slot]
                        .as_ref()
                        .and_then(|c| c.session.identity())
                        .map(|i| i.user.clone())
                    else {
                        continue;
                    };
                    let target = owner_shard(conv_id(&h.key), self.shards);
                    self.route(
                        target,
                        ShardMsg::Read {
                            reply: origin,
                            user,
                            key: h.key,
                            from: h.from,
                            to: h.to,
                            limit: h.limit,
                            newest_first: h.newest_first,
                            purpose: ReadPurpose::History {
                                request_id: h.request_id,
                                view: h.view,
                            },
                        },
                    );
                }
                Action::Close(code, reason) => {
                    if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                        c.transport.close(code, &reason, c.conn.out_buf());
                    }
                    self.begin_close(slot, now);
                }
            }
        }
        self.arm(slot);
    }

    fn begin_close(&mut self, slot: usize, now: u64) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.closing.is_none() {
            c.closing = Some(now + CLOSE_GRACE_MS);
        }
        let mut c = self.conns[slot].take();
        if let Some(c) = c.as_mut() {
            self.release_slot_user(slot, c);
        }
        self.conns[slot] = c;
        self.dirty.push(slot);
        self.arm(slot);
    }

    fn mark_dirty(&mut self, slot: usize) {
        self.dirty.push(slot);
    }

    /// Forgets the user's registration of this slot (the connection itself stays).
    fn release_slot_user(&mut self, slot: usize, c: &mut Connection) {
        if let Some(identity) = c.session.identity()
            && let Some(u) = self.users.get_mut(&identity.user)
        {
            u.devices.retain(|&(_, s)| s != slot);
        }
    }

    /// Frees a slot whose connection was taken out.
    fn release_slot(&mut self, slot: usize, c: &mut Connection) {
        self.release_slot_user(slot, c);
        c.session.clear_unacked(&mut ConnTimers {
            wheel: &mut self.wheel,
            slot,
            generation: c.generation,
        });
        if let Some((key, _)) = c.timer.take() {
            self.wheel.cancel(key);
        }
        self.free.push(slot);
    }

    fn remove(&mut self, slot: usize) {
        let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.release_slot(slot, &mut c);
        let _ = self.poll.registry().deregister(&mut c.conn);
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    fn flush_connections(&mut self, now: u64) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for slot in dirty {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if c.closing.is_some() {
                match c.conn.drive_close(self.config.limits.read_budget_bytes) {
                    Ok(CloseProgress::Done) | Err(_) => self.remove(slot),
                    Ok(CloseProgress::PendingMore) => self.ready.push(slot),
                    Ok(CloseProgress::Pending) => {}
                }
                continue;
            }
            match c.conn.flush() {
                Ok(f) => {
                    let queued = c.conn.queued_bytes();
                    c.session.note_write(queued, f.written > 0, now);
                    c.conn.shrink_buffers();
                }
                Err(_) => {
                    self.remove(slot);
                    continue;
                }
            }
            self.pump_sync(slot);
            self.arm(slot);
        }
    }

    /// (Re-)arms the connection's timer for its next deadline, if it moved earlier.
    fn arm(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let deadline = match c.closing {
            Some(d) => Some(d),
            None => c.session.next_deadline(),
        };
        let Some(deadline) = deadline else {
            return;
        };
        if let Some((key, at)) = c.timer {
            if at <= deadline && self.wheel.deadline(key).is_some() {
                return;
            }
            self.wheel.cancel(key);
        }
        let key = self.wheel.insert(
            deadline,
            Tick {
                slot,
                generation: c.generation,
                what: TimerFor::Session,
            },
        );
        c.timer = Some((key, deadline));
    }

    fn fire_timers(&mut self, now: u64) {
        let mut resent = Vec::new();
        while let Some((_, tick)) = self.wheel.poll(now) {
            let Tick {
                slot,
                generation,
                what,
            } = tick;
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if c.generation != generation {
                continue;
            }
            if let TimerFor::Retransmit(key, seq) = what {
                let mut out = Outbox::default();
                let mut timers = ConnTimers {
                    wheel: &mut self.wheel,
                    slot,
                    generation,
                };
                c.session.retransmit(&key, seq, now, &mut timers, &mut out);
                resent.push(slot);
                if !out.frames.is_empty() || !out.actions.is_empty() {
                    self.apply(slot, out, now);
                }
                continue;
            }
            c.timer = None;
            if let Some(deadline) = c.closing {
                if now >= deadline {
                    self.remove(slot);
                } else {
                    self.arm(slot);
                }
                continue;
            }
            let mut out = Outbox::default();
            c.session.handle_timeout(now, &mut out);
            self.apply(slot, out, now);
        }
        // Everything due for one connection goes out together.
        resent.sort_unstable();
        resent.dedup();
        for slot in resent {
            let mut out = Outbox::default();
            if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                c.session.flush_resends(&mut out);
            }
            self.apply(slot, out, now);
        }
    }

    // ----- owner: appends, group commit, reads -----------------------------------------------

    fn append(
        &mut self,
        origin: Origin,
        user: Arc<str>,
        device: Arc<str>,
        request: super::session::SendRequest,
        unix_ms: i64,
    ) {
        let id = conv_id(&request.key);
        let window = self.config.limits.dedup_window.max(1);
        let (request_id, client_msg_id) = (request.request_id, request.send.client_msg_id);
        let fail = move |shard: &mut Shard, code: pb::ErrorCode, message: &str| {
            let frame =
                super::session::error_frame(request_id, code, message, false, client_msg_id);
            shard.route(origin.shard, ShardMsg::Reply { to: origin, frame });
        };
        let latest = self.log.latest_seq(id).unwrap_or(0);
        let st = self.convs.entry(id).or_insert_with(|| ConvState {
            key: request.key.clone(),
            shared: SharedKey::of(&request.key),
            last_seq: latest,
            dedup: FastMap::default(),
        });
        if st.key != request.key {
            fail(
                self,
                pb::ErrorCode::Internal,
                "conversation id collision; this conversation cannot be stored",
            );
            return;
        }
        let dk = (Arc::clone(&user), Arc::clone(&device));
        if let Some(r) = st
            .dedup
            .get(&dk)
            .and_then(|w| w.acks.get(&request.send.client_msg_id))
            .copied()
        {
            // A retry: the same ack, once the original is durable.
            let always = self.config.storage.durability == DurabilityPolicy::Always;
            let p = Pending {
                lsn: r.lsn,
                origin,
                request_id: request.request_id,
                ack: send_ack(client_msg_id, &r, &request.key, &user, always),
                deliver: None,
            };
            self.pending.push_back(p);
            self.release_if_not_waiting();
            return;
        }
        let seq = st.last_seq + 1;
        // Only a message's sender may recall or edit it.
        if request.send.kind != pb::MessageKind::Normal as i32 {
            let target = self
                .log
                .read(
                    id,
                    request.send.ref_seq..request.send.ref_seq.saturating_add(1),
                )
                .next()
                .and_then(Result::ok)
                .and_then(|rec| pb::Message::decode(rec.payload).ok());
            match target {
                None => {
                    fail(
                        self,
                        pb::ErrorCode::NotFound,
                        "ref_seq names no stored message",
                    );
                    return;
                }
                Some(m) if m.from_user != *user => {
                    fail(
                        self,
                        pb::ErrorCode::Forbidden,
                        "only a message's sender may recall or edit it",
                    );
                    return;
                }
                Some(_) => {}
            }
        }
        let msg_id = self.ids.next(unix_ms.max(0) as u64);
        let send = request.send;
        let message = pb::Message {
            conversation: Some(pb::Conversation {
                r#type: pb::ConversationType::Direct as i32,
                id: request.key.clone(),
            }),
            seq,
            msg_id,
            from_user: user.to_string(),
            from_device: device.to_string(),
            client_msg_id: send.client_msg_id,
            content_type: send.content_type,
            body: send.body,
            server_time: unix_ms,
            kind: send.kind,
            ref_seq: send.ref_seq,
        };
        let payload = message.encode_to_vec();
        let meta = RecordMeta {
            kind: KIND_MESSAGE,
            conversation: id,
            seq,
            msg_id,
            timestamp: Timestamp::from_micros(unix_ms.saturating_mul(1000)),
        };
        let lsn = match self.log.append(meta, &payload) {
            Ok(lsn) => lsn,
            Err(e) => {
                eprintln!("shard {}: append failed: {e}", self.index);
                let st_fail = format!("the message could not be stored: {e}");
                fail(self, pb::ErrorCode::StorageFailure, &st_fail);
                return;
            }
        };
        let always = self.config.storage.durability == DurabilityPolicy::Always;
        let remembered = Remembered {
            msg_id,
            seq,
            server_time: unix_ms,
            lsn,
        };
        let ack = send_ack(send.client_msg_id, &remembered, &request.key, &user, always);
        let Some(st) = self.convs.get_mut(&id) else {
            return;
        };
        st.last_seq = seq;
        remember(
            st.dedup.entry(dk).or_insert_with(new_window),
            send.client_msg_id,
            remembered,
            window,
        );
        self.pending.push_back(Pending {
            lsn,
            origin,
            request_id: request.request_id,
            ack,
            deliver: Some((id, message, user, device)),
        });
        self.release_if_not_waiting();
    }

    fn release_if_not_waiting(&mut self) {
        if self.config.storage.durability != DurabilityPolicy::Always {
            self.release();
        }
    }

    /// Sends the acks and deliveries of every stored message that is durable enough.
    fn release(&mut self) {
        let always = self.config.storage.durability == DurabilityPolicy::Always;
        while let Some(p) = self.pending.front() {
            if always && !self.log.is_durable(p.lsn) {
                break;
            }
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let frame = pb::Frame {
                request_id: p.request_id,
                body: Some(Body::SendAck(p.ack)),
            };
            self.route(
                p.origin.shard,
                ShardMsg::Reply {
                    to: p.origin,
                    frame,
                },
            );
            if let Some((id, message, sender, device)) = p.deliver {
                let Some(shared) = self.convs.get(&id).and_then(|st| st.shared.as_ref()) else {
                    continue;
                };
                let key = Arc::clone(&shared.key);
                let [a, b] = &shared.users;
                let users = if a == b {
                    [Some(Arc::clone(a)), None]
                } else {
                    [Some(Arc::clone(a)), Some(Arc::clone(b))]
                };
                let message = Arc::new(message);
                for user in users.into_iter().flatten() {
                    let exclude = (*user == *sender).then(|| Arc::clone(&device));
                    let target = home_shard(&user, self.shards);
                    self.route(
                        target,
                        ShardMsg::Deliver {
                            user,
                            key: Arc::clone(&key),
                            exclude_device: exclude,
                            message: Arc::clone(&message),
                        },
                    );
                }
            }
        }
    }

    /// Starts a group-commit flush of everything appended so far, if none is running.
    fn start_flush(&mut self) {
        if self.config.storage.durability != DurabilityPolicy::Always || self.flushing {
            return;
        }
        if self.pending.is_empty() {
            return;
        }
        match self.log.sync_ticket() {
            Some(ticket) => {
                if self.flush_tx.try_send(ticket).is_ok() {
                    self.flushing = true;
                }
            }
            None => self.release(),
        }
    }

    fn poll_flush(&mut self) {
        while let Ok(result) = self.flush_rx.try_recv() {
            self.flushing = false;
            match result {
                Ok(lsn) => {
                    self.log.complete_sync(lsn);
                    self.release();
                }
                Err(e) => {
                    eprintln!(
                        "shard {}: log flush failed, the log is poisoned: {e}",
                        self.index
                    );
                    // Nothing pending will ever be durable: tell the senders.
                    while let Some(p) = self.pending.pop_front() {
                        let frame = super::session::error_frame(
                            p.request_id,
                            pb::ErrorCode::StorageFailure,
                            "the node's log failed; the message may not be stored: retry",
                            false,
                            p.ack.client_msg_id,
                        );
                        self.route(
                            p.origin.shard,
                            ShardMsg::Reply {
                                to: p.origin,
                                frame,
                            },
                        );
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        reply: Origin,
        _user: String,
        key: String,
        from: u64,
        to: u64,
        limit: u32,
        newest_first: bool,
        purpose: ReadPurpose,
    ) {
        let id = conv_id(&key);
        let known = self.convs.get(&id).is_some_and(|st| st.key == key);
        let last_seq = if known {
            self.log.latest_seq(id).unwrap_or(0)
        } else {
            0
        };
        let first_seq = if known {
            self.log.first_seq(id).unwrap_or(0)
        } else {
            0
        };
        let to = to.min(last_seq);
        let limit = u64::from(limit.max(1));
        let mut from = from.max(first_seq).max(1);
        if newest_first && to >= from && to - from + 1 > limit {
            from = to - limit + 1;
        }
        // A page must fit one frame: at most `limit` messages and `budget` bytes (at least one).
        let budget = page_budget(&self.config);
        let mut messages = VecDeque::new();
        let mut bytes = 0usize;
        let mut more = false;
        if known && from <= to {
            for rec in self.log.read(id, from..to.saturating_add(1)) {
                let Ok(rec) = rec else {
                    continue;
                };
                if messages.len() as u64 >= limit {
                    more = true;
                    break;
                }
                let size = rec.payload.len() + PAGE_ENTRY_OVERHEAD;
                if !newest_first && !messages.is_empty() && bytes + size > budget {
                    more = true;
                    break;
                }
                if let Ok(m) = pb::Message::decode(rec.payload) {
                    bytes += size;
                    messages.push_back(m);
                    // Newest first: keep the newest that fit, drop from the old end.
                    while newest_first && bytes > budget && messages.len() > 1 {
                        if let Some(old) = messages.pop_front() {
                            bytes -= old.encoded_len() + PAGE_ENTRY_OVERHEAD;
                        }
                    }
                }
            }
        }
        if newest_first {
            let oldest = messages.front().map_or(from, |m| m.seq);
            more = oldest > first_seq.max(1);
        }
        let messages: Vec<pb::Message> = messages.into();
        self.route(
            reply.shard,
            ShardMsg::ReadDone {
                to: reply,
                key,
                purpose,
                messages,
                more,
                first_seq,
                last_seq,
                to_seq: to,
            },
        );
    }

    // ----- home: deliveries, sync, history -----------------------------------------------------

    fn deliver(
        &mut self,
        user: Arc<str>,
        key: Arc<str>,
        exclude: Option<Arc<str>>,
        message: Arc<pb::Message>,
        now: u64,
    ) {
        let Some(u) = self.users.get_mut(&*user) else {
            self.users
                .entry(user.to_string())
                .or_default()
                .inbox
                .insert(key.to_string(), message.seq);
            return;
        };
        match u.inbox.get_mut(&*key) {
            Some(e) => *e = (*e).max(message.seq),
            None => {
                u.inbox.insert(key.to_string(), message.seq);
            }
        }
        let mut slots = std::mem::take(&mut self.slot_scratch);
        slots.clear();
        slots.extend(
            u.devices
                .iter()
                .filter(|(d, _)| exclude.as_ref().is_none_or(|x| x != d))
                .map(|&(_, s)| s),
        );
        if !slots.is_empty() {
            let view = view_for(&key, &user);
            let mut message = Arc::unwrap_or_clone(message);
            message.conversation = Some(view);
            for (i, &slot) in slots.iter().enumerate() {
                let mut out = Outbox::default();
                let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                if !is_active(c) {
                    continue;
                }
                // The last device takes the message itself; the others get copies.
                let m = if i + 1 == slots.len() {
                    std::mem::take(&mut message)
                } else {
                    message.clone()
                };
                let mut timers = ConnTimers {
                    wheel: &mut self.wheel,
                    slot,
                    generation: c.generation,
                };
                c.session.deliver(&key, m, now, &mut timers, &mut out);
                self.apply(slot, out, now);
            }
        }
        self.slot_scratch = slots;
    }

    fn start_sync(&mut self, slot: usize, ask: SyncAsk, now: u64) {
        let Some(c) = self.conns.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let Some(user) = c.session.identity().map(|i| i.user.clone()) else {
            return;
        };
        let mut summary = Vec::new();
        let mut ranges = VecDeque::new();
        let mut total = 0u64;
        if let Some(u) = self.users.get(&user) {
            let mut keys: Vec<(&String, &u64)> = u.inbox.iter().collect();
            keys.sort();
            for (key, &last_seq) in keys {
                let cursor = ask.cursors.get(key).copied().unwrap_or(0);
                if last_seq > cursor {
                    summary.push(pb::ConversationState {
                        conversation: Some(view_for(key, &user)),
                        last_seq,
                        unread: last_seq - cursor,
                        last_message: None,
                    });
                    total += last_seq - cursor;
                    ranges.push_back((key.clone(), cursor + 1, last_seq));
                }
            }
        }
        let mut out = Outbox::default();
        out.frames.push(pb::Frame {
            request_id: ask.request_id,
            body: Some(Body::SyncSummary(pb::SyncSummary {
                conversations: summary,
                total_messages: total,
            })),
        });
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            c.sync = Some(Box::new(SyncRun {
                request_id: ask.request_id,
                page_size: ask.page_size.max(1),
                cursors: ask.cursors,
                ranges,
                in_flight: false,
            }));
        }
        self.apply(slot, out, now);
        self.pump_sync(slot);
    }

    /// Asks for the next page of a running sync, when the connection has room for it; finishes
    /// the sync when nothing newer than what the client holds remains.
    fn pump_sync(&mut self, slot: usize) {
        let half = self.config.limits.max_outbound_bytes / 2;
        let origin = self.origin(slot);
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.closing.is_some() || c.conn.queued_bytes() > half {
            return;
        }
        let Some(user) = c.session.identity().map(|i| i.user.clone()) else {
            return;
        };
        let Some(run) = c.sync.as_mut() else {
            return;
        };
        if run.in_flight {
            return;
        }
        if run.ranges.is_empty() {
            // Anything stored since the summary that this connection was not sent (it was behind)?
            if let Some(u) = self.users.get(&user) {
                for (key, &last_seq) in &u.inbox {
                    let held = run
                        .cursors
                        .get(key)
                        .copied()
                        .unwrap_or(0)
                        .max(c.session.sent_upto(key));
                    if last_seq > held {
                        run.ranges.push_back((key.clone(), held + 1, last_seq));
                    }
                }
            }
        }
        let Some((key, from, to)) = run.ranges.pop_front() else {
            let request_id = run.request_id;
            c.sync = None;
            let mut out = Outbox::default();
            c.session.sync_page(request_id, Vec::new(), true, &mut out);
            let now = self.now();
            self.apply(slot, out, now);
            return;
        };
        run.in_flight = true;
        let limit = run.page_size;
        // Remember where this range ends, in case the page comes back short.
        run.ranges.push_front((key.clone(), from, to));
        let target = owner_shard(conv_id(&key), self.shards);
        self.route(
            target,
            ShardMsg::Read {
                reply: origin,
                user,
                key,
                from,
                to,
                limit,
                newest_first: false,
                purpose: ReadPurpose::Sync,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn read_done(
        &mut self,
        to: Origin,
        key: String,
        purpose: ReadPurpose,
        messages: Vec<pb::Message>,
        more: bool,
        first_seq: u64,
        last_seq: u64,
        to_seq: u64,
        now: u64,
    ) {
        let Some(slot) = self.slot_of(to) else {
            return;
        };
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(user) = c.session.identity().map(|i| i.user.clone()) else {
            return;
        };
        let view = view_for(&key, &user);
        let messages: Vec<pb::Message> = messages
            .into_iter()
            .map(|mut m| {
                m.conversation = Some(view.clone());
                m
            })
            .collect();
        let mut out = Outbox::default();
        match purpose {
            ReadPurpose::History { request_id, view } => {
                out.frames.push(pb::Frame {
                    request_id,
                    body: Some(Body::HistoryPage(pb::HistoryPage {
                        conversation: Some(view),
                        messages,
                        more,
                        first_seq,
                        last_seq,
                    })),
                });
            }
            ReadPurpose::Sync => {
                let Some(run) = c.sync.as_mut() else {
                    return;
                };
                run.in_flight = false;
                let range = run.ranges.pop_front();
                let last = messages.last().map(|m| m.seq);
                if let Some((k, _, end)) = range {
                    let end = end.min(to_seq);
                    match last {
                        Some(last) if more && last < end => {
                            run.ranges.push_front((k, last + 1, end));
                        }
                        // The range is done, even if retention dropped part of it.
                        _ => c.session.mark_synced(&k, end),
                    }
                }
                let request_id = run.request_id;
                let page = messages.into_iter().map(|m| (key.clone(), m)).collect();
                c.session.sync_page(request_id, page, false, &mut out);
            }
        }
        self.apply(slot, out, now);
        self.pump_sync(slot);
    }

    // ----- shutdown ----------------------------------------------------------------------------

    fn shutdown(&mut self, now: u64) {
        if self.shutting_down.is_some() {
            return;
        }
        self.shutting_down = Some(now + CLOSE_GRACE_MS + 500);
        for (token, listener) in [
            (TCP_LISTENER, self.tcp.take()),
            (WS_LISTENER, self.ws.take()),
        ] {
            if let Some(mut l) = listener {
                let _ = self.poll.registry().deregister(&mut l);
                let _ = token;
            }
        }
        // Make what was appended durable, so its acks go out before the goodbyes.
        if let Err(e) = self.log.flush() {
            eprintln!("shard {}: flush at shutdown failed: {e}", self.index);
        } else {
            self.release();
        }
        self.drain_local();
        for slot in 0..self.conns.len() {
            let mut out = Outbox::default();
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            c.session.close(
                pb::ErrorCode::ShuttingDown,
                "the node is shutting down",
                &mut out,
            );
            self.apply(slot, out, now);
        }
    }

    fn drain_local(&mut self) {
        while let Some(msg) = self.local.pop_front() {
            self.handle_msg(msg);
        }
    }
}

fn new_window() -> DedupWindow {
    DedupWindow {
        order: VecDeque::new(),
        acks: FastMap::default(),
    }
}

fn remember(w: &mut DedupWindow, client_msg_id: u64, r: Remembered, window: usize) {
    if w.acks.insert(client_msg_id, r).is_none() {
        w.order.push_back(client_msg_id);
    }
    while w.order.len() > window {
        if let Some(old) = w.order.pop_front() {
            w.acks.remove(&old);
        }
    }
}

/// Bytes a page entry may take beyond its stored payload (field tags and lengths).
const PAGE_ENTRY_OVERHEAD: usize = 16;

/// Bytes of messages one sync, history or deliver frame may carry: under the frame limit with room
/// for the frame's own fields.
pub(crate) fn page_budget(c: &Config) -> usize {
    (c.limits.max_frame_bytes as usize)
        .saturating_sub(1024)
        .max(1)
}

/// How a log's durability policy maps from the node configuration.
pub(crate) fn log_durability(c: &Config) -> Durability {
    match c.storage.durability {
        DurabilityPolicy::Always => Durability::Always,
        DurabilityPolicy::Interval => {
            Durability::Interval(Duration::from_millis(c.storage.flush_interval_ms))
        }
        DurabilityPolicy::Never => Durability::Never,
    }
}
