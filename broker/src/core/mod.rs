//! The sans-IO shard core: everything a shard decides, with no socket, thread, clock or
//! randomness inside.
//!
//! [`ShardCore`] takes inputs — bytes read on a connection ([`ShardCore::handle_bytes`]), a
//! connection opened, closed or reset, a batch from another shard ([`ShardCore::handle_mail`]),
//! a connection handed over by another shard, a storage completion
//! ([`ShardCore::handle_flushed`]), the time ([`ShardCore::handle_timeout`]) — and returns
//! [`Effect`]s: bytes to write ([`Effect::Transmit`], then [`ShardCore::outbound`]), a close, a
//! connection to hand over, a batch for another shard, a flush to run; and
//! [`ShardCore::next_deadline`]. The driver (`crate::node`: mio, threads, wakers, the flusher,
//! the clock) applies them; the simulation (`parley-sim`) applies them to a fake network, a fake
//! clock and a storage backend that crashes.
//!
//! The core is generic over the storage backend ([`parley_storage::Backend`]) and iterates no
//! hash map in a way that reaches its output unsorted (its maps use a fixed hasher), so the same
//! inputs give the same effects.
//!
//! Roles, one module each:
//! * [`conn`]: a connection and its session (login, liveness, limits);
//! * [`delivery`]: what one connection was pushed and owes acks for (retransmit, `Behind`);
//! * [`sync`]: sync and history (the home side that pages, the owner side that reads);
//! * [`owner`]: conversation owner (de-dup, seq, id, one encode, append, release after flush);
//! * [`home`]: user home (devices, inbox, live push);
//! * [`group`]: group members, roles and settings (decided and stored by the group's owner);
//! * [`receipt`]: read and delivery cursors, read receipts, group read counts;
//! * [`convlist`]: the conversation list (by activity, with newest messages and unread counts);
//! * [`room`]: rooms (ephemeral broadcast: membership per connection, owner, fan-out, lag);
//! * [`presence`]: presence (coalesced pushes to subscribers, group online counts) and typing;
//! * [`timers`]: every deadline and its owner; [`conv`]: conversation kind and placement;
//! * [`outbound`]: frames out (encoded once per connection's wire form, counted, held to the
//!   budget; a refusal counts against the client's errors; past the queue bound, `Behind`);
//! * [`gate`]: the application's hooks (gates that may park a request, observers);
//!   [`app`]: what the application asks of a shard directly (in-process connections, kicks, who
//!   is online); [`inspect`]: a conversation as its owner holds it;
//! * [`mail`]: what shards tell each other; [`error`]: typed errors and their wire codes;
//!   [`counters`]: what a shard counts; [`histogram`]: the latencies it measures.
//!
//! ### Invariants
//! * A connection's state is in exactly one shard's table; a slot freed by an effect (close,
//!   handover) is reused only after [`ShardCore::take_effects`] handed that effect out.
//! * Frames reach a connection in the order the core wrote them ([`Connection::out`] is FIFO).

mod app;
mod checkpoint;
mod config;
pub(crate) mod conn;
pub(crate) mod conv;
pub(crate) mod convlist;
mod counters;
pub(crate) mod delivery;
pub(crate) mod error;
pub(crate) mod gate;
pub(crate) mod group;
pub mod histogram;
pub(crate) mod home;
pub(crate) mod ids;
mod inspect;
pub(crate) mod mail;
mod outbound;
pub(crate) mod owner;
pub(crate) mod presence;
pub(crate) mod receipt;
pub(crate) mod relay;
pub(crate) mod remote;
pub(crate) mod room;
mod route;
mod session;
pub(crate) mod sync;
pub(crate) mod timers;
pub(crate) mod wheel;
pub(crate) mod wire;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use bytes::BytesMut;
use parley_proto::frame::WireError as _;
use parley_storage::{Backend, Log, Lsn, SpareDone, SpareTicketOf, SyncOf, SyncTicket, Timestamp};

use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::loglimit::{LogKind, LogLimiter};
use crate::transport::{Transport, TransportError, TransportLimits};
use conn::Connection;
pub use conn::{ConnId, Intake};
use conv::Placement;
pub use counters::Counters;
pub(crate) use counters::ShardStats;
pub use error::ConnLimit;
use error::{CloseReason, Refusal};
pub use histogram::{Histogram, Latencies};
use home::Home;
pub use inspect::{ConversationInfo, GroupInfo, INSPECT_MAX_MEMBERS, MemberInfo};
use mail::Origin;
pub use mail::{Adoption, ShardMsg};
use owner::Owner;
pub use route::{RouteOp, RouteTag, Routed};
use timers::{TimerFor, Timers};
pub use wire::{mail_from_bytes, mail_to_bytes};

/// The core's hash map: foldhash with a fixed seed, so iteration order depends only on what was
/// inserted (the core never lets it reach its output unsorted anyway).
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// The time of this turn, read once by the driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds since the node started: every deadline is in these.
    pub ms: u64,
    /// The same monotonic time in microseconds (`ms` is `us / 1000`): latencies are measured
    /// in these ([`Latencies`]).
    pub us: u64,
    /// Wall-clock milliseconds since the Unix epoch: message times, ids, token expiry.
    pub unix_ms: i64,
}

/// What the driver must do for the core (`T`: a flush ticket, `S`: a spare-segment ticket).
#[derive(Debug)]
pub enum Effect<T, S> {
    /// Bytes are queued for this connection: write [`ShardCore::outbound`], then report with
    /// [`ShardCore::handle_written`].
    Transmit(ConnId),
    /// The connection is over on the core's side: write `last` (its last words), shut the write
    /// side, and drop the socket once the peer closed or a grace period passed.
    Close {
        /// The connection (its slot may be reused after this effect).
        conn: ConnId,
        /// Bytes still to write.
        last: BytesMut,
    },
    /// Move the connection's socket to shard `to` with `adoption`
    /// ([`ShardCore::handle_adopt`] there).
    Handover {
        /// The connection (its slot may be reused after this effect).
        conn: ConnId,
        /// The target shard.
        to: usize,
        /// Its state.
        adoption: Box<Adoption>,
    },
    /// A batch for shard `to` ([`ShardCore::handle_mail`] there).
    Mail {
        /// The target shard.
        to: usize,
        /// The messages, in order.
        batch: Vec<ShardMsg>,
    },
    /// Run this flush (off the shard thread) and report with [`ShardCore::handle_flushed`].
    Flush(T),
    /// Run this segment housekeeping (create and prefault the next segment, write index files)
    /// off the shard thread and hand the result to [`ShardCore::handle_spare`].
    Spare(S),
    /// A change to the cluster's presence index ([`route`]): carry it to Redis; answer an
    /// `Up` with a ticket through [`ShardCore::handle_routed`].
    Route(RouteOp),
    /// In a cluster: the live routes of `users` in the presence index, for presence answer
    /// `gather`; answer with [`ShardCore::handle_found`] (with nothing, if the index cannot be
    /// read: the answer then says what this node knows).
    Lookup {
        /// The answer waiting.
        gather: u64,
        /// The users asked.
        users: Vec<Arc<str>>,
    },
    /// The connection takes input again after [`Intake::Hold`]: read it (and call
    /// [`ShardCore::handle_continue`] if [`ShardCore::intake`] says [`Intake::Pending`]) on a
    /// coming turn, even without a new readiness event.
    Resume(ConnId),
}

/// The effect type of a core over backend `B`.
pub type CoreEffect<B> = Effect<SyncTicket<SyncOf<B>>, SpareTicketOf<B>>;

/// Switches that plant bugs, for proving that the simulation catches them. Never set outside
/// tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct TestSwitches {
    /// Release acks and deliveries before the flush made them durable.
    pub release_before_flush: bool,
    /// A member removed from a group keeps being pushed the group's messages.
    pub push_after_leave: bool,
    /// A closed connection's route is never withdrawn from the presence index.
    pub keep_routes: bool,
    /// A link that comes up does not make the shard tell the homes there what its
    /// conversations hold (what was lost with the link stays lost).
    pub mute_link_up: bool,
}

/// What a shard core starts from.
pub struct CoreSetup<B: Backend> {
    /// This shard's index.
    pub index: usize,
    /// Number of shards of the node.
    pub shards: usize,
    /// The node configuration.
    pub config: Config,
    /// Who a token names.
    pub verifier: Arc<dyn TokenVerifier>,
    /// The shard's log, opened (recovered).
    pub log: Log<B>,
    /// The time at start.
    pub now: Now,
    /// Print nothing (the simulation runs thousands of nodes).
    pub quiet: bool,
    /// Planted bugs (tests only).
    pub switches: TestSwitches,
    /// The embedding application's hooks, if any.
    pub hooks: Option<Arc<dyn crate::hooks::Hooks>>,
    /// Where a gate's late answers go (without one, a gate must answer before it returns).
    pub completions: Option<Arc<dyn crate::hooks::Completions>>,
}

impl<B: Backend> fmt::Debug for CoreSetup<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreSetup")
            .field("index", &self.index)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

pub(crate) use remote::cluster_placement;
pub use remote::exchange_startup_mail;

/// One shard's state and decisions (see the module documentation).
pub struct ShardCore<B: Backend> {
    index: usize,
    placement: Placement,
    cfg: Arc<config::CoreConfig>,
    limits: TransportLimits,
    verifier: Arc<dyn TokenVerifier>,
    conns: Vec<Option<Box<Connection>>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    freed: Vec<u32>,
    timers: Timers,
    owner: Owner<B>,
    home: Home,
    /// Rooms this shard owns and this shard's listeners.
    rooms: room::Rooms,
    outgoing: Vec<Vec<ShardMsg>>,
    local: VecDeque<ShardMsg>,
    effects: Vec<CoreEffect<B>>,
    dirty: Vec<ConnId>,
    scratch: BytesMut,
    target_scratch: Vec<ConnId>,
    /// Emptied outbound buffers, for the next connection that writes.
    pool: Vec<BytesMut>,
    counters: Counters,
    /// Latency histograms (published with the counters).
    latencies: Latencies,
    shutting_down: bool,
    /// A spare-segment ticket is out.
    spare_out: bool,
    now: Now,
    quiet: bool,
    log_limit: LogLimiter,
    test_switches: TestSwitches,
    /// Presence: the home side of this shard's users, and its connections' subscriptions.
    presence: presence::Presence,
    /// The application's hooks and the requests parked on them.
    gate: gate::Gatekeeper,
    /// In a cluster with `cluster.nodes`: until when the node's lease holds (monotonic ms),
    /// see `remote`.
    lease_until: Option<u64>,
    /// Connections relayed to their session's home on another node, and their windows.
    relays: HashMap<ConnId, relay::Relaying>,
    /// Sessions homed here whose clients are on other nodes.
    relayed: relay::Homes,
    /// Whether the node has heard from the other nodes since it started (see `remote`):
    /// until then its homes refuse logins.
    settled: bool,
    /// The nodes this shard may send mail to, one bit per position in the node list: its own,
    /// and those whose link it heard come up and not go down since (see `remote`).
    reachable: u32,
}

impl<B: Backend> fmt::Debug for ShardCore<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardCore")
            .field("index", &self.index)
            .field("connections", &self.counters.connections)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> ShardCore<B> {
    /// A core over its recovered log: rebuilds conversations and de-dup windows from the log
    /// and queues, as [`Effect::Mail`], what each user's home must know.
    pub fn new(setup: CoreSetup<B>) -> Self {
        let cfg = config::CoreConfig::from_config(&setup.config);
        let placement = cluster_placement(&setup.config, setup.shards)
            .unwrap_or_else(|| Placement::new(setup.shards));
        let index = placement.global(setup.index);
        let mut timers = Timers::new(setup.now.ms);
        timers.insert(setup.now.ms + cfg.maintenance_ms, TimerFor::Maintenance);
        let mut core = ShardCore {
            index,
            placement,
            limits: TransportLimits::from(&setup.config.limits),
            cfg: Arc::new(cfg),
            verifier: setup.verifier,
            conns: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            freed: Vec::new(),
            timers,
            owner: Owner::new(setup.log, index),
            home: Home::default(),
            rooms: room::Rooms::default(),
            outgoing: (0..placement.shards()).map(|_| Vec::new()).collect(),
            local: VecDeque::new(),
            effects: Vec::new(),
            dirty: Vec::new(),
            scratch: BytesMut::new(),
            target_scratch: Vec::new(),
            pool: Vec::new(),
            counters: Counters::default(),
            latencies: Latencies::default(),
            shutting_down: false,
            spare_out: false,
            now: setup.now,
            quiet: setup.quiet,
            log_limit: LogLimiter::default(),
            test_switches: setup.switches,
            presence: presence::Presence::default(),
            gate: gate::Gatekeeper::new(setup.hooks, setup.completions),
            lease_until: None,
            relays: HashMap::new(),
            relayed: relay::Homes::default(),
            settled: true,
            reachable: 1 << placement.this_node(),
        };
        core.rebuild();
        core.drain_local();
        core
    }

    // ----- inputs ------------------------------------------------------------------------------

    /// A connection was accepted (`websocket`: on the WebSocket listener). `refused`: a
    /// connection limit it hit; it is told so and closed.
    pub fn handle_open(&mut self, websocket: bool, refused: Option<ConnLimit>, now: Now) -> ConnId {
        self.now = now;
        let transport = if websocket {
            Transport::websocket(self.limits)
        } else {
            Transport::tcp(self.limits)
        };
        let conn = self.insert(transport, BytesMut::new(), BytesMut::new());
        self.counters.connections_opened += 1;
        tracing::debug!(
            shard = self.index,
            %conn,
            transport = if websocket { "ws" } else { "tcp" },
            "connection opened"
        );
        if let Some(limit) = refused {
            self.counters.refused_at_open += 1;
            self.close(conn, 0, Some(CloseReason::TooManyConnections(limit)));
        } else if self.shutting_down {
            self.close(conn, 0, Some(CloseReason::ShuttingDown));
        }
        self.drain_local();
        conn
    }

    /// Bytes read on `conn` (read only while [`ShardCore::intake`] says [`Intake::Read`]). At
    /// most `limits.frames_per_turn` frames are handled; the rest wait for
    /// [`ShardCore::handle_continue`].
    pub fn handle_bytes(&mut self, conn: ConnId, bytes: &[u8], now: Now) {
        self.now = now;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        c.inbuf.extend_from_slice(bytes);
        self.counters.bytes_in += bytes.len() as u64;
        self.decode(conn);
        self.after_io(conn);
        self.drain_local();
    }

    /// Handles more of what `conn` has buffered (when [`ShardCore::intake`] says
    /// [`Intake::Pending`]), again at most `limits.frames_per_turn` frames.
    pub fn handle_continue(&mut self, conn: ConnId, now: Now) {
        self.now = now;
        if let Some(c) = self.live_conn_mut(conn)
            && c.input == conn::Input::Backlog
        {
            self.decode(conn);
            self.after_io(conn);
        }
        self.drain_local();
    }

    /// Whether the driver should read `conn` now (`None`: the connection is gone).
    pub fn intake(&self, conn: ConnId) -> Option<Intake> {
        self.conns
            .get(conn.slot as usize)
            .and_then(Option::as_ref)
            .filter(|c| c.id == conn)
            .map(|c| c.intake())
    }

    /// Whether `conn` is open and logged in.
    pub fn is_logged_in(&self, conn: ConnId) -> bool {
        self.conns
            .get(conn.slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.id == conn && c.phase == conn::Phase::Active)
    }

    /// The peer closed its sending side: what it is owed is flushed, then the connection closes.
    pub fn handle_eof(&mut self, conn: ConnId, now: Now) {
        self.now = now;
        self.close(conn, 0, None);
        self.drain_local();
    }

    /// The socket failed (reset): the connection is gone; nothing more is written to it.
    pub fn handle_reset(&mut self, conn: ConnId, now: Now) {
        self.now = now;
        if let Some(c) = self.remove(conn) {
            log_closed(self.index, conn, &c, "reset");
            drop(c);
        }
        self.drain_local();
    }

    /// The bytes queued for `conn`: the driver writes from the front and advances past what the
    /// socket took.
    pub fn outbound(&mut self, conn: ConnId) -> Option<&mut BytesMut> {
        self.live_conn_mut(conn).map(|c| &mut c.out)
    }

    /// The driver wrote to `conn` (`progressed`: some bytes went out).
    pub fn handle_written(&mut self, conn: ConnId, progressed: bool, now: Now) {
        self.now = now;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        c.note_write(progressed, now.ms);
        let pool = &mut self.pool;
        if let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) {
            c.shrink(pool);
        }
        self.pump_sync(conn);
        self.pump_rooms(conn);
        self.maybe_resume(conn);
        self.relay_credit(conn);
        self.arm(conn);
        self.drain_local();
    }

    /// A batch from another shard.
    pub fn handle_mail(&mut self, batch: Vec<ShardMsg>, now: Now) {
        self.now = now;
        for msg in batch {
            self.on_mail(msg);
        }
        self.drain_local();
    }

    /// A logged-in connection handed over by another shard; the driver puts its socket at the
    /// returned id.
    pub fn handle_adopt(&mut self, a: Adoption, now: Now) -> ConnId {
        self.now = now;
        let Adoption {
            transport,
            inbuf,
            out,
            identity,
            request_id,
        } = a;
        let conn = self.insert(transport, inbuf, out);
        self.mark_dirty(conn);
        if self.shutting_down {
            self.close(conn, 0, Some(CloseReason::ShuttingDown));
        } else {
            self.activate(conn, identity, request_id);
            // Frames pipelined behind the login came along in the buffer.
            self.decode(conn);
            self.after_io(conn);
        }
        self.drain_local();
        conn
    }

    /// Where conversations and users live, as this core places them.
    pub(crate) fn placement(&self) -> Placement {
        self.placement
    }

    /// A flush the core asked for ([`Effect::Flush`]) finished. `ran_us`: how long the flush
    /// itself took, as the driver measured it around the `fsync` (`None`: it did not run, e.g.
    /// the flusher thread is gone); recorded in [`Latencies::flush`].
    pub fn handle_flushed(&mut self, result: std::io::Result<Lsn>, ran_us: Option<u64>, now: Now) {
        self.now = now;
        if let Some(us) = ran_us {
            self.latencies.flush.record(us);
        }
        self.on_flushed(result);
        self.drain_local();
    }

    /// Segment housekeeping the core asked for ([`Effect::Spare`]) was done.
    pub fn handle_spare(&mut self, done: SpareDone<B::Segment>, now: Now) {
        self.now = now;
        self.spare_out = false;
        if let Err(e) = self.owner.log.install_spare(done) {
            self.log_line(
                LogKind::Storage,
                format_args!("segment housekeeping failed: {e}"),
            );
        }
        self.drain_local();
    }

    /// Fires every deadline due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        self.now = now;
        while let Some((_, what)) = self.timers.poll(now.ms) {
            match what {
                TimerFor::Session(conn) => self.session_deadline(conn),
                TimerFor::Retransmit { conn, conv } => self.retransmit(conn, conv),
                TimerFor::Maintenance => self.maintenance(),
                TimerFor::Presence => self.presence_flush(),
            }
            self.drain_local();
        }
    }

    /// The node is stopping: makes what was appended durable (so its acks go out first), then
    /// closes every connection with SHUTTING_DOWN. New connections are refused from now on.
    pub fn handle_shutdown(&mut self, now: Now) {
        self.now = now;
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        match self.owner.log.flush() {
            Ok(_) => {
                self.release();
                // The next start reads nothing of the log but this checkpoint.
                self.write_checkpoint();
            }
            Err(e) => self.log_line(
                LogKind::Storage,
                format_args!("flush at shutdown failed: {e}"),
            ),
        }
        self.drain_local();
        for slot in 0..self.conns.len() {
            if let Some(conn) = self.conns[slot].as_ref().map(|c| c.id) {
                self.close(conn, 0, Some(CloseReason::ShuttingDown));
            }
        }
        self.drain_local();
    }

    /// Flushes the log at exit.
    pub fn finish(&mut self) {
        if let Err(e) = self.owner.log.flush() {
            self.log_line(LogKind::Storage, format_args!("final flush failed: {e}"));
        }
    }

    // ----- outputs -----------------------------------------------------------------------------

    /// Moves every pending effect to `out`, in order: closes and handovers as they happened, a
    /// flush of this turn's appends, one batch per other shard, then one transmit per
    /// connection with output.
    pub fn take_effects(&mut self, out: &mut Vec<CoreEffect<B>>) {
        self.drain_local();
        self.start_flush();
        self.drain_local();
        out.append(&mut self.effects);
        for (to, batch) in self.outgoing.iter_mut().enumerate() {
            if !batch.is_empty() {
                // One allocation of the exact size; the shard's own vector keeps its capacity
                // for the next turn (instead of growing again from nothing, copy by copy).
                let mut mail = Vec::with_capacity(batch.len());
                mail.append(batch);
                out.push(Effect::Mail { to, batch: mail });
            }
        }
        for conn in self.dirty.drain(..) {
            if let Some(Some(c)) = self.conns.get_mut(conn.slot as usize)
                && c.id == conn
                && c.transmit_queued
            {
                c.transmit_queued = false;
                out.push(Effect::Transmit(conn));
            }
        }
        self.free.append(&mut self.freed);
    }

    /// Whether [`ShardCore::take_effects`] has something to hand out.
    pub fn has_work(&self) -> bool {
        !self.effects.is_empty()
            || !self.dirty.is_empty()
            || !self.local.is_empty()
            || self.outgoing.iter().any(|b| !b.is_empty())
    }

    /// The earliest deadline (ms) at which [`ShardCore::handle_timeout`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next_deadline()
    }

    /// Shutting down, every connection gone and nothing waiting for durability.
    pub fn is_finished(&self) -> bool {
        self.shutting_down && self.counters.connections == 0 && !self.owner.is_busy()
    }

    /// The shard's counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The shard's latency histograms.
    pub fn latencies(&self) -> &Latencies {
        &self.latencies
    }

    /// What the driver publishes: the counters and the latency histograms.
    pub(crate) fn stats(&self) -> ShardStats {
        ShardStats {
            counters: self.counters,
            latencies: self.latencies,
        }
    }

    /// Bytes queued on `conn`, if it is open (for tests and the simulation's memory bound).
    pub fn queued_bytes(&self, conn: ConnId) -> Option<usize> {
        self.conns
            .get(conn.slot as usize)
            .and_then(Option::as_ref)
            .filter(|c| c.id == conn)
            .map(|c| c.out.len() + c.inbuf.len())
    }

    /// The shard's log (for the driver's start-up report and the simulation's crash images).
    pub fn log(&self) -> &Log<B> {
        &self.owner.log
    }

    // ----- connections -------------------------------------------------------------------------

    fn insert(&mut self, transport: Transport, inbuf: BytesMut, out: BytesMut) -> ConnId {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.generations.push(0);
                (self.conns.len() - 1) as u32
            }
        };
        let g = &mut self.generations[slot as usize];
        *g = g.wrapping_add(1);
        let id = ConnId {
            slot,
            generation: *g,
        };
        let mut c = Connection::new(id, transport, self.now.ms);
        c.inbuf = inbuf;
        c.out = out;
        debug_assert!(self.conns[slot as usize].is_none(), "a free slot is empty");
        if c.transport.is_websocket() {
            self.counters.websocket_connections += 1;
        }
        self.conns[slot as usize] = Some(Box::new(c));
        self.counters.connections += 1;
        self.arm(id);
        id
    }

    /// Takes a connection out of the table: unregisters it, cancels its deadlines, frees its
    /// slot (reusable after the next `take_effects`).
    fn remove(&mut self, conn: ConnId) -> Option<Box<Connection>> {
        let slot = conn.slot as usize;
        match self.conns.get(slot) {
            Some(Some(c)) if c.id == conn => {}
            _ => return None,
        }
        let mut c = self.conns[slot].take()?;
        self.gate.forget(conn);
        if let Some(r) = self.relays.remove(&conn) {
            self.relay_gone(self.origin(conn), &r);
        }
        self.end_relayed(conn);
        let service = c.who.as_ref().is_some_and(|w| w.service);
        if let Some(who) = c.who.as_ref().filter(|w| w.routed) {
            let (user, device) = (Arc::clone(&who.device.user), Arc::clone(&who.device.device));
            self.route_down(conn, user, device);
        }
        if !service
            && let Some(user) = c.user()
            && self.home.unregister(user, conn)
        {
            self.counters.users_freed += 1;
        }
        if let Some(user) = c.user().cloned() {
            self.presence_conn_gone(conn, &user, service);
        }
        if !service
            && let Some(who) = c.who.as_ref()
            && let Some(h) = self.gate.observer()
        {
            h.disconnected(&crate::hooks::DeviceEvent {
                user: who.device.user.to_string(),
                device: who.device.device.to_string(),
            });
        }
        c.delivery.clear(&mut self.timers);
        if let Some((key, _)) = c.timer.take() {
            self.timers.cancel(key);
        }
        if let Some(rooms) = c.rooms.take() {
            self.leave_rooms(*rooms);
        }
        self.freed.push(conn.slot);
        self.counters.connections -= 1;
        if c.transport.is_websocket() {
            self.counters.websocket_connections -= 1;
        }
        Some(c)
    }

    /// Ends a connection: with `reason`, its `Error` frame and the transport's close go out
    /// first; then the driver is told to flush and close.
    fn close(&mut self, conn: ConnId, request_id: u64, reason: Option<CloseReason>) {
        if let Some(reason) = &reason {
            self.write_frame(conn, &reason.frame(request_id));
            let message = reason.to_string();
            if let Some(c) = self.live_conn_mut(conn) {
                c.transport.close(reason.code(), &message, &mut c.out);
            }
        }
        // A relayed session's last words go to its client's node; there is no socket here.
        let relayed = self.relayed_last_words(conn);
        if let Some(mut c) = self.remove(conn) {
            let why = reason
                .as_ref()
                .map_or("closed by the peer", |r| r.code().as_str_name());
            log_closed(self.index, conn, &c, why);
            if !relayed {
                let last = std::mem::take(&mut c.out);
                self.effects.push(Effect::Close { conn, last });
            }
        }
    }

    fn live_conn(&self, conn: ConnId) -> Option<&Connection> {
        match self.conns.get(conn.slot as usize) {
            Some(Some(c)) if c.id == conn => Some(c),
            _ => None,
        }
    }

    /// The user `conn` is logged in as, if it is open and logged in.
    fn user_of(&self, conn: ConnId) -> Option<Arc<str>> {
        self.live_conn(conn).and_then(|c| c.user()).cloned()
    }

    fn live_conn_mut(&mut self, conn: ConnId) -> Option<&mut Connection> {
        match self.conns.get_mut(conn.slot as usize) {
            Some(Some(c)) if c.id == conn => Some(c),
            _ => None,
        }
    }

    fn origin(&self, conn: ConnId) -> Origin {
        Origin {
            shard: self.index,
            slot: conn.slot,
            generation: conn.generation,
        }
    }

    fn conn_of(&self, o: Origin) -> Option<ConnId> {
        debug_assert_eq!(o.shard, self.index);
        let conn = ConnId {
            slot: o.slot,
            generation: o.generation,
        };
        match self.conns.get(o.slot as usize) {
            Some(Some(c)) if c.id == conn => Some(conn),
            _ => None,
        }
    }

    /// A reply for which `bytes` of `conn`'s budget were reserved arrived.
    fn unreserve(&mut self, conn: ConnId, bytes: u32) {
        if let Some(c) = self.live_conn_mut(conn) {
            c.unreserve(bytes);
        }
        self.maybe_resume(conn);
    }

    fn mark_dirty(&mut self, conn: ConnId) {
        if let Some(c) = self.live_conn_mut(conn)
            && !c.transmit_queued
        {
            c.transmit_queued = true;
            self.dirty.push(conn);
        }
    }

    /// After a connection's input: it has output to send, and its deadline may have moved.
    fn after_io(&mut self, conn: ConnId) {
        if let Some(c) = self.live_conn_mut(conn)
            && !c.out.is_empty()
        {
            self.mark_dirty(conn);
        }
        self.arm(conn);
    }

    /// (Re-)arms the connection's session deadline, if it moved earlier.
    fn arm(&mut self, conn: ConnId) {
        let cfg = Arc::clone(&self.cfg);
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        if c.id != conn {
            return;
        }
        let deadline = c.next_deadline(&cfg);
        if let Some((key, at)) = c.timer {
            if at <= deadline && self.timers.deadline(key).is_some() {
                return;
            }
            self.timers.cancel(key);
        }
        let key = self.timers.insert(deadline, TimerFor::Session(conn));
        c.timer = Some((key, deadline));
    }

    fn session_deadline(&mut self, conn: ConnId) {
        let cfg = Arc::clone(&self.cfg);
        let now = self.now.ms;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        c.timer = None;
        match c.expired(&cfg, now) {
            Some(reason) => {
                if matches!(reason, CloseReason::TokenExpired) {
                    self.counters.tokens_expired += 1;
                }
                self.close(conn, 0, Some(reason));
            }
            None => self.arm(conn),
        }
    }

    fn maintenance(&mut self) {
        let now = self.now;
        // The next segment is created and prefaulted off the shard thread (while a ticket is
        // out, the log's own tick leaves that work alone).
        if !self.spare_out
            && let Some(ticket) = self.owner.log.spare_ticket()
        {
            self.spare_out = true;
            self.effects.push(Effect::Spare(ticket));
        }
        if let Err(e) = self
            .owner
            .log
            .tick(Timestamp::from_micros(now.unix_ms.saturating_mul(1000)))
        {
            self.log_line(
                LogKind::Storage,
                format_args!("log maintenance failed: {e}"),
            );
        }
        if !self.cfg.wait_for_flush {
            self.release();
        }
        self.home.shrink();
        self.rooms.shrink();
        if self.owner.log.written_lsn().0
            - self
                .owner
                .checkpointed
                .0
                .min(self.owner.log.written_lsn().0)
            >= self.cfg.checkpoint_every_bytes
        {
            self.write_checkpoint();
        }
        self.timers
            .insert(now.ms + self.cfg.maintenance_ms, TimerFor::Maintenance);
    }

    /// Writes a log line of `kind`, unless one of that kind went out within the last second
    /// (then it is counted as suppressed; the next line says how many were).
    fn log_line(&mut self, kind: LogKind, args: fmt::Arguments<'_>) {
        match self.log_limit.admit(kind, self.now.ms) {
            Some(admitted) if !self.quiet => {
                tracing::warn!(shard = self.index, ?kind, "{args}{admitted}");
            }
            Some(_) => {}
            None => self.counters.log_lines_suppressed += 1,
        }
    }
}

/// The debug line of a connection that ended: `why` is the wire code of the reason (never the
/// reason's text, which may quote what the client sent), `closed by the peer` or `reset`. Names
/// the user and device if it had logged in.
fn log_closed(shard: usize, conn: ConnId, c: &Connection, why: &str) {
    let who = c.who.as_ref().map(|w| &w.device);
    tracing::debug!(
        shard,
        %conn,
        user = who.map(|d| &*d.user),
        device = who.map(|d| &*d.device),
        reason = why,
        "connection closed"
    );
}

fn bad_frame(e: &TransportError) -> Refusal {
    Refusal::BadFrame {
        code: e.code(),
        message: e.to_string(),
    }
}
