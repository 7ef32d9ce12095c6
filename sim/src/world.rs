//! The simulated world: the node's shard cores, the disks, the network, the clients and the
//! scheduler that orders everything by (virtual time, arrival order).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use parley_broker::core::{
    Adoption, ConnId, CoreEffect, CoreSetup, Counters, Effect, Intake, Now, RouteOp, ShardCore,
    ShardMsg, TestSwitches,
};
use parley_proto::tcp::FrameCodec;
use parley_storage::{
    Durability, Log, LogConfig, MemoryBackend, Retention, SpareTicketOf, SyncOf, SyncTicket,
    Timestamp,
};

use crate::check::{ConnView, GROUP_MARK, History, ROOM_MARK};
use crate::client::{Behaviour, Client, Final};
use crate::rng::Rng;
use crate::setup::{SimVerifier, sim_config};
use parley_broker::config::Config;
use parley_broker::hooks::{
    Answer, Completions, Gates, Hooks, Reply, SendAttempt, SendVerdict, Ticket as HookTicket,
};
use parley_proto::pb;

/// The simulation's hooks (in half the seeds): every send is gated, and a third of them are
/// answered later, at a random time, so parked requests meet pipelining, budgets, crashes and
/// restarts. Every send is allowed in the end: the checker's promises stay as they are.
#[derive(Default)]
struct SimGate {
    held: Mutex<Vec<Reply<SendVerdict>>>,
}

impl Hooks for SimGate {
    fn gates(&self) -> Gates {
        Gates {
            send: true,
            ..Gates::default()
        }
    }
    fn check_send(&self, send: &SendAttempt<'_>, reply: Reply<SendVerdict>) {
        if send.client_msg_id.is_multiple_of(3) {
            if let Ok(mut held) = self.held.lock() {
                held.push(reply);
            }
        } else {
            reply.send(SendVerdict::Allow);
        }
    }
}

/// Where the gate's late answers land, for the world to hand to their shard.
#[derive(Default)]
struct SimAnswers(Mutex<Vec<(HookTicket, Answer)>>);

impl Completions for SimAnswers {
    fn complete(&self, ticket: HookTicket, answer: Answer) {
        if let Ok(mut q) = self.0.lock() {
            q.push((ticket, answer));
        }
    }
}

mod clients;
mod routes;
use routes::SimIndex;

type Core = ShardCore<MemoryBackend>;
type Ticket = SyncTicket<SyncOf<MemoryBackend>>;

/// Wall-clock time of virtual time 0 (2026-01-01).
const UNIX_BASE_MS: i64 = 1_767_225_600_000;
/// When faults stop and clients settle (ms of virtual time).
const QUIESCE_AT: u64 = 8_000;
/// A run that has not converged by then fails.
const HARD_LIMIT: u64 = 180_000;
/// Most events one seed may run: a few thousand is usual; past this the run is stuck in one
/// instant (a livelock) and fails rather than hang.
const MAX_EVENTS: u64 = 5_000_000;
/// A client's receive window (bytes the server may have in flight to it).
const WINDOW: usize = 32 * 1024;
/// A slow client's receive window.
const SMALL_WINDOW: usize = 1536;

/// A bug planted behind a test-only switch, to prove the checker catches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Plant {
    /// No bug.
    #[default]
    None,
    /// Acks and deliveries are released before the flush made the message durable.
    ReleaseBeforeFlush,
    /// A member removed from a group keeps being pushed its messages.
    PushAfterLeave,
    /// A closed connection's route is never withdrawn from the presence index.
    KeepRoutes,
}

/// How to run a seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A planted bug.
    pub plant: Plant,
    /// Keep a readable trace of every event (slower).
    pub trace: bool,
}

/// What a run did and found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Broken promises, with the virtual time they were seen at (empty: the run passed).
    pub failures: Vec<String>,
    /// A hash of the whole history: the same seed must give the same hash.
    pub trace_hash: u64,
    /// The readable trace (with [`Options::trace`]).
    pub trace: Vec<String>,
    /// Messages acked to their senders.
    pub acked: usize,
    /// Crashes of the node.
    pub crashes: u32,
    /// Events processed.
    pub events: u64,
    /// Virtual time at the end, ms.
    pub virtual_ms: u64,
    /// Shards of the node.
    pub shards: usize,
    /// Simulated devices.
    pub clients: usize,
    /// The shard cores' counters, summed over shards and restarts.
    pub counters: Counters,
}

enum Mail {
    Batch(Vec<ShardMsg>),
    Adopt(usize, Box<Adoption>),
}

enum Ev {
    Wake(usize),
    ServerRead(usize),
    ClientRead(usize, Vec<u8>),
    ClientDrain(usize),
    ClientEof(usize),
    Mail {
        epoch: u64,
        to: usize,
        mail: Mail,
    },
    Flushed {
        epoch: u64,
        shard: usize,
        ticket: Ticket,
        /// How long the flush "ran" (virtual ms), for the core's flush histogram.
        took_ms: u64,
    },
    Spared {
        epoch: u64,
        shard: usize,
        ticket: SpareTicketOf<MemoryBackend>,
    },
    Crash,
    Stop,
    Restart,
    Quiesce,
    /// The gate answers a parked send.
    Answer {
        epoch: u64,
        reply: Reply<SendVerdict>,
    },
    /// The presence index applies a route op (and answers a registration); `fail`: the
    /// registration does not get through in time.
    Route {
        epoch: u64,
        op: RouteOp,
        fail: bool,
    },
    /// The presence index answers a presence lookup of shard `shard`.
    Found {
        epoch: u64,
        shard: usize,
        gather: u64,
        users: Vec<std::sync::Arc<str>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    Server { shard: usize, conn: ConnId },
    Transit,
    Gone,
}

struct Sock {
    client: usize,
    host: Host,
    to_server: Vec<u8>,
    read_scheduled: bool,
    inflight: usize,
    deliver_at: u64,
    /// Bytes arrived at the client and not read by it yet (its socket buffer).
    kernel: Vec<u8>,
    drain_scheduled: bool,
    eof_arrived: bool,
    rx: BytesMut,
    view: ConnView,
    /// The client's side is gone.
    closed: bool,
}

struct Node {
    cores: Vec<Core>,
    /// Per shard: which socket each connection slot holds.
    hosts: Vec<BTreeMap<u32, (u32, usize)>>,
}

struct World {
    rng: Rng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    node: Option<Node>,
    epoch: u64,
    disks: Vec<MemoryBackend>,
    shards: usize,
    config: Config,
    log_config: LogConfig,
    switches: TestSwitches,
    clients: Vec<Client>,
    socks: Vec<Sock>,
    history: History,
    mail_at: Vec<Vec<u64>>,
    quiescing: bool,
    crashes: u32,
    events_run: u64,
    trace_hash: u64,
    trace: Option<Vec<String>>,
    counters: Counters,
    codec: FrameCodec,
    bound: usize,
    /// Most bytes a server read takes from a socket (`limits.read_budget_bytes`).
    read_budget: usize,
    /// The send gate, in half the seeds.
    gate: Option<Arc<SimGate>>,
    answers: Arc<SimAnswers>,
    /// The presence index, in a third of the seeds (the node then runs as a cluster member).
    routes: Option<SimIndex>,
}

/// Runs one seed.
pub fn run(seed: u64, opts: &Options) -> Outcome {
    let mut w = World::new(seed, opts);
    w.start();
    loop {
        if w.now > HARD_LIMIT {
            let pending: Vec<String> = w
                .clients
                .iter()
                .filter(|c| c.final_sync != Final::Done)
                .map(|c| {
                    format!(
                        "{}/{} (plan {}, outbox {}, sock {:?}, final {:?})",
                        c.user,
                        c.device,
                        c.plan.len(),
                        c.outbox.len(),
                        c.sock,
                        c.final_sync
                    )
                })
                .collect();
            w.history.fail(
                w.now,
                format!("the run did not settle; waiting on {pending:?}"),
            );
            break;
        }
        if w.quiescing && w.clients.iter().all(|c| c.final_sync == Final::Done) {
            break;
        }
        if w.events_run > MAX_EVENTS {
            w.history.fail(
                w.now,
                format!("more than {MAX_EVENTS} events without settling (a livelock)"),
            );
            break;
        }
        if !w.step() {
            w.history.fail(
                w.now,
                "nothing left to do before every client settled".into(),
            );
            break;
        }
    }
    let now = w.now;
    w.history.final_check(now, &w.clients);
    w.check_routes();
    w.count_cores();
    Outcome {
        seed,
        failures: std::mem::take(&mut w.history.failures),
        trace_hash: w.trace_hash,
        trace: w.trace.take().unwrap_or_default(),
        acked: w.history.acked(),
        crashes: w.crashes,
        events: w.events_run,
        virtual_ms: w.now,
        shards: w.shards,
        clients: w.clients.len(),
        counters: w.counters,
    }
}

impl World {
    fn new(seed: u64, opts: &Options) -> Self {
        let mut rng = Rng::new(seed);
        let shards = rng.range(1, 3) as usize;
        let gate = rng.chance(500).then(|| Arc::new(SimGate::default()));
        let mut config = sim_config();
        let routes = rng.chance(333).then(SimIndex::default);
        if routes.is_some() {
            // Never contacted: the simulation stands in for the bridge and Redis.
            config.cluster.redis = Some("redis://simulated.invalid:1".into());
        }
        let read_budget = config.limits.read_budget_bytes;
        // The budget, overshot by at most one frame written past it, plus one read's input.
        let bound = config.limits.max_outbound_bytes
            + config.limits.max_frame_bytes as usize
            + config.limits.read_budget_bytes;
        let log_config = LogConfig {
            segment_size: 64 * 1024,
            durability: Durability::Always,
            retention: Retention::default(),
            prefault: false,
        };
        let switches = TestSwitches {
            release_before_flush: opts.plant == Plant::ReleaseBeforeFlush,
            push_after_leave: opts.plant == Plant::PushAfterLeave,
            keep_routes: opts.plant == Plant::KeepRoutes,
        };
        World {
            rng,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            node: None,
            epoch: 0,
            disks: (0..shards).map(|_| MemoryBackend::new()).collect(),
            shards,
            codec: FrameCodec::new(config.limits.max_frame_bytes as usize),
            config,
            log_config,
            switches,
            clients: Vec::new(),
            socks: Vec::new(),
            history: History::default(),
            mail_at: vec![vec![0; shards]; shards],
            quiescing: false,
            crashes: 0,
            events_run: 0,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            trace: opts.trace.then(Vec::new),
            counters: Counters::default(),
            bound,
            read_budget,
            gate,
            answers: Arc::new(SimAnswers::default()),
            routes,
        }
    }

    /// Schedules the answers of the sends the gate parked (at a random later time).
    fn schedule_answers(&mut self) {
        let held: Vec<Reply<SendVerdict>> = match self.gate.as_ref() {
            Some(g) => g
                .held
                .lock()
                .map(|mut h| h.drain(..).collect())
                .unwrap_or_default(),
            None => return,
        };
        for reply in held {
            let t = self.now + self.rng.range(1, 60);
            let epoch = self.epoch;
            self.at(t, Ev::Answer { epoch, reply });
        }
    }

    /// The gate answers a parked send: the answer goes to its shard's core.
    fn answer(&mut self, epoch: u64, reply: Reply<SendVerdict>) {
        if epoch != self.epoch {
            // Its node died: dropping the reply answers nobody.
            drop(reply);
            self.forget_answers();
            return;
        }
        self.note(17, epoch, 0, || "the send gate answers".into());
        reply.send(SendVerdict::Allow);
        let answers: Vec<(HookTicket, Answer)> = self
            .answers
            .0
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default();
        let now = self.now();
        for (ticket, answer) in answers {
            let shard = ticket.shard();
            if let Some(n) = self.node.as_mut()
                && let Some(core) = n.cores.get_mut(shard)
            {
                core.handle_hook_answer(ticket, answer, now);
            }
            self.apply(shard);
        }
    }

    /// The node died: what its gate held and the answers on their way are gone with it.
    fn forget_answers(&mut self) {
        if let Some(g) = self.gate.as_ref() {
            let held: Vec<Reply<SendVerdict>> = g
                .held
                .lock()
                .map(|mut h| h.drain(..).collect())
                .unwrap_or_default();
            drop(held);
        }
        if let Ok(mut q) = self.answers.0.lock() {
            q.clear();
        }
    }

    fn count_cores(&mut self) {
        if let Some(n) = self.node.as_ref() {
            for c in &n.cores {
                self.counters.add(&c.counters());
            }
        }
    }

    fn now(&self) -> Now {
        Now {
            ms: self.now,
            us: self.now * 1000,
            unix_ms: UNIX_BASE_MS + self.now as i64,
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((t.max(self.now), self.seq), ev);
    }

    /// Mixes an event into the history hash (and the readable trace).
    fn note(&mut self, kind: u64, a: u64, b: u64, what: impl FnOnce() -> String) {
        for x in [self.now, kind, a, b] {
            self.trace_hash ^= x;
            self.trace_hash = self
                .trace_hash
                .wrapping_mul(0x0100_0000_01b3)
                .rotate_left(5);
        }
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{:>7}ms {}", self.now, what()));
        }
    }

    fn start(&mut self) {
        let users = self.rng.range(2, 4);
        let names: Vec<String> = (0..users).map(|u| format!("u{u}")).collect();
        // Half the seeds have a group of every user, owned by u0, whose members are removed
        // and added again while messages flow.
        let group = self.rng.chance(500).then(|| format!("{GROUP_MARK}g"));
        // And half have a room some devices listen to and some send to.
        let room = self.rng.chance(500).then(|| format!("{ROOM_MARK}r"));
        for name in &names {
            let devices = self.rng.range(1, 2);
            for d in 0..devices {
                let behaviour = match self.rng.below(100) {
                    0..70 => Behaviour::Normal,
                    70..85 => Behaviour::Staller,
                    _ => Behaviour::NoAck,
                };
                let window = self.rng.range(1, 6) as usize;
                let mut c = Client::new(name, &format!("d{d}"), behaviour, window);
                if room.is_some() && self.rng.chance(700) {
                    c.room.clone_from(&room);
                }
                let n = self.rng.range(3, 40);
                for i in 0..n {
                    let peer = match (&group, &room) {
                        (Some(g), _) if self.rng.chance(400) => g.clone(),
                        (_, Some(r)) if c.room.is_some() && self.rng.chance(300) => r.clone(),
                        _ => names[self.rng.below(users) as usize].clone(),
                    };
                    let pad = self.rng.below(300) as usize;
                    let mut body = format!("{name}/d{d}#{i}:").into_bytes();
                    body.extend(std::iter::repeat_n(b'x', pad));
                    c.plan.push_back((peer, body));
                }
                self.clients.push(c);
            }
        }
        if group.is_some()
            && let Some(owner) = self.clients.first_mut()
        {
            use parley_proto::pb::GroupAction as A;
            let op = |action: A, members: Vec<String>| pb::GroupRequest {
                action: action as i32,
                group_id: "g".into(),
                members,
                ..Default::default()
            };
            owner
                .ops
                .push_back(op(A::Create, names.iter().skip(1).cloned().collect()));
            let mut out: Vec<bool> = vec![false; names.len()];
            for _ in 0..self.rng.range(1, 6) {
                let u = self.rng.range(1, users - 1) as usize;
                let action = if out[u] {
                    A::AddMembers
                } else {
                    A::RemoveMembers
                };
                out[u] = !out[u];
                owner.ops.push_back(op(action, vec![names[u].clone()]));
            }
        }
        self.restart();
        for i in 0..self.clients.len() {
            let t = self.rng.range(0, 50);
            self.at(t, Ev::Wake(i));
        }
        let crashes = self.rng.range(0, 2);
        for _ in 0..crashes {
            let t = self.rng.range(100, QUIESCE_AT - 1_000);
            let ev = if self.rng.chance(250) {
                Ev::Stop
            } else {
                Ev::Crash
            };
            self.at(t, ev);
        }
        self.at(QUIESCE_AT, Ev::Quiesce);
    }

    /// One scheduling step: the earliest of the next event and the cores' deadlines.
    fn step(&mut self) -> bool {
        let next_event = self.events.keys().next().map(|k| k.0);
        let next_timer = self
            .node
            .as_ref()
            .and_then(|n| n.cores.iter().filter_map(|c| c.next_deadline()).min());
        let timer_first = match (next_event, next_timer) {
            (None, None) => return false,
            (Some(e), Some(t)) => t <= e,
            (None, Some(_)) => true,
            (Some(_), None) => false,
        };
        self.events_run += 1;
        if timer_first {
            let t = next_timer.unwrap_or(self.now);
            self.now = self.now.max(t);
            let now = self.now();
            for shard in 0..self.shards {
                let due = self
                    .node
                    .as_ref()
                    .and_then(|n| n.cores.get(shard))
                    .and_then(|c| c.next_deadline())
                    .is_some_and(|d| d <= now.ms);
                if due {
                    self.note(1, shard as u64, 0, || format!("deadlines of shard {shard}"));
                    if let Some(n) = self.node.as_mut() {
                        n.cores[shard].handle_timeout(now);
                    }
                    self.apply(shard);
                }
            }
            return true;
        }
        let Some(((t, _), ev)) = self.events.pop_first() else {
            return false;
        };
        self.now = self.now.max(t);
        self.event(ev);
        true
    }

    fn event(&mut self, ev: Ev) {
        match ev {
            Ev::Wake(c) => self.wake(c),
            Ev::ServerRead(s) => self.server_read(s),
            Ev::ClientRead(s, bytes) => {
                if !self.socks[s].closed {
                    self.socks[s].kernel.extend_from_slice(&bytes);
                    self.client_read(s);
                }
            }
            Ev::ClientDrain(s) => {
                self.socks[s].drain_scheduled = false;
                self.client_read(s);
            }
            Ev::ClientEof(s) => {
                self.note(5, s as u64, 0, || format!("sock {s}: the server closed it"));
                self.socks[s].eof_arrived = true;
                self.client_read(s);
            }
            Ev::Mail { epoch, to, mail } => {
                if epoch == self.epoch {
                    self.mail(to, mail);
                }
            }
            Ev::Flushed {
                epoch,
                shard,
                ticket,
                took_ms,
            } => {
                if epoch == self.epoch {
                    self.note(7, shard as u64, ticket.lsn().0, || {
                        format!("shard {shard}: flush to {:?} done", ticket.lsn())
                    });
                    let result = ticket.run();
                    let now = self.now();
                    if let Some(n) = self.node.as_mut() {
                        n.cores[shard].handle_flushed(result, Some(took_ms * 1000), now);
                    }
                    self.apply(shard);
                }
            }
            Ev::Spared {
                epoch,
                shard,
                ticket,
            } => {
                if epoch == self.epoch {
                    self.note(17, shard as u64, 0, || {
                        format!("shard {shard}: segment housekeeping done")
                    });
                    let done = ticket.run();
                    let now = self.now();
                    if let Some(n) = self.node.as_mut() {
                        n.cores[shard].handle_spare(done, now);
                    }
                    self.apply(shard);
                }
            }
            Ev::Crash => self.crash(),
            Ev::Answer { epoch, reply } => self.answer(epoch, reply),
            Ev::Route { epoch, op, fail } => self.route(epoch, op, fail),
            Ev::Found {
                epoch,
                shard,
                gather,
                users,
            } => self.found(epoch, shard, gather, &users),
            Ev::Stop => self.stop(),
            Ev::Restart => self.restart(),
            Ev::Quiesce => {
                self.note(10, 0, 0, || "faults stop; clients settle".into());
                self.quiescing = true;
                for c in &mut self.clients {
                    c.behaviour = Behaviour::Normal;
                    c.stalled_until = 0;
                }
            }
        }
    }

    // ----- the node --------------------------------------------------------------------------

    fn crash(&mut self) {
        if self.node.is_none() {
            return;
        }
        self.crashes += 1;
        self.note(8, self.crashes as u64, 0, || {
            "CRASH: the node dies; unflushed bytes are lost".into()
        });
        self.count_cores();
        self.node = None;
        self.forget_answers();
        let rng = &mut self.rng;
        for disk in &mut self.disks {
            *disk = disk.crash_image_with(|_, _| rng.chance(300));
        }
        self.epoch += 1;
        for s in 0..self.socks.len() {
            if !self.socks[s].closed {
                self.client_lost(s);
            }
        }
        let t = self.now + self.rng.range(20, 400);
        self.at(t, Ev::Restart);
    }

    /// A clean stop: every shard flushes, checkpoints and says goodbye; the node restarts from
    /// its disks as they are.
    fn stop(&mut self) {
        if self.node.is_none() {
            return;
        }
        self.note(16, 0, 0, || "STOP: the node shuts down cleanly".into());
        let now = self.now();
        for shard in 0..self.shards {
            if let Some(n) = self.node.as_mut() {
                n.cores[shard].handle_shutdown(now);
            }
            self.apply(shard);
        }
        self.count_cores();
        self.node = None;
        self.forget_answers();
        self.epoch += 1;
        for s in 0..self.socks.len() {
            if !self.socks[s].closed && self.socks[s].host != Host::Gone {
                self.client_lost(s);
            }
        }
        let t = self.now + self.rng.range(20, 400);
        self.at(t, Ev::Restart);
    }

    fn restart(&mut self) {
        self.note(9, self.epoch, 0, || "the node starts from its disks".into());
        if let Some(r) = self.routes.as_mut() {
            // A new boot: the old one's routes name a dead boot, which readers ignore.
            r.index.clear();
            r.last_at = self.now;
        }
        let now = self.now();
        let ts = Timestamp::from_micros(now.unix_ms * 1000);
        let mut cores = Vec::new();
        for (index, disk) in self.disks.iter().enumerate() {
            let log = match Log::open(disk.clone(), self.log_config, ts) {
                Ok((log, _report)) => log,
                Err(e) => {
                    let what = format!("shard {index}: the log did not open after a crash: {e}");
                    self.history.fail(self.now, what);
                    return;
                }
            };
            cores.push(ShardCore::new(CoreSetup {
                index,
                shards: self.shards,
                config: self.config.clone(),
                verifier: Arc::new(SimVerifier),
                log,
                now,
                quiet: true,
                switches: self.switches,
                hooks: self.gate.clone().map(|g| g as Arc<dyn Hooks>),
                completions: Some(Arc::clone(&self.answers) as Arc<dyn Completions>),
            }));
        }
        // What each user's home must know, before any client is served (as the driver does).
        parley_broker::core::exchange_startup_mail(&mut cores, now);
        self.node = Some(Node {
            cores,
            hosts: vec![BTreeMap::new(); self.shards],
        });
        for row in &mut self.mail_at {
            row.fill(self.now);
        }
    }

    /// Carries out a shard's effects until it has none.
    fn apply(&mut self, shard: usize) {
        self.schedule_answers();
        let mut effects: Vec<CoreEffect<MemoryBackend>> = Vec::new();
        for _ in 0..64 {
            let Some(n) = self.node.as_mut() else {
                return;
            };
            n.cores[shard].take_effects(&mut effects);
            if effects.is_empty() {
                return;
            }
            for e in effects.drain(..) {
                match e {
                    Effect::Transmit(conn) => self.server_write(shard, conn),
                    Effect::Close { conn, last } => {
                        let Some(s) = self.unhost(shard, conn) else {
                            continue;
                        };
                        self.note(11, s as u64, last.len() as u64, || {
                            format!(
                                "sock {s}: closed by shard {shard} ({} last bytes)",
                                last.len()
                            )
                        });
                        self.socks[s].host = Host::Gone;
                        if !self.socks[s].closed {
                            if !last.is_empty() {
                                self.send_to_client(s, last.to_vec());
                            }
                            let t = self.socks[s].deliver_at;
                            self.at(t, Ev::ClientEof(s));
                        }
                    }
                    Effect::Handover { conn, to, adoption } => {
                        let Some(s) = self.unhost(shard, conn) else {
                            continue;
                        };
                        self.note(12, s as u64, to as u64, || {
                            format!("sock {s}: handed from shard {shard} to shard {to}")
                        });
                        self.socks[s].host = Host::Transit;
                        self.post(shard, to, Mail::Adopt(s, adoption));
                    }
                    Effect::Mail { to, batch } => self.post(shard, to, Mail::Batch(batch)),
                    Effect::Route(op) => self.queue_route(op),
                    Effect::Lookup { gather, users } => self.queue_lookup(shard, gather, users),
                    Effect::Resume(conn) => {
                        let host = self.node.as_ref().and_then(|n| {
                            n.hosts[shard]
                                .get(&conn.slot)
                                .filter(|(g, _)| *g == conn.generation)
                                .map(|&(_, s)| s)
                        });
                        if let Some(s) = host {
                            self.note(16, s as u64, 0, || {
                                format!("sock {s}: shard {shard} takes input again")
                            });
                            self.schedule_read(s);
                        }
                    }
                    Effect::Spare(ticket) => {
                        let t = self.now + self.rng.range(1, 30);
                        let epoch = self.epoch;
                        self.at(
                            t,
                            Ev::Spared {
                                epoch,
                                shard,
                                ticket,
                            },
                        );
                    }
                    Effect::Flush(ticket) => {
                        // A flush takes what an fsync takes: a few to tens of milliseconds.
                        let took_ms = self.rng.range(1, 40);
                        let epoch = self.epoch;
                        self.at(
                            self.now + took_ms,
                            Ev::Flushed {
                                epoch,
                                shard,
                                ticket,
                                took_ms,
                            },
                        );
                    }
                }
            }
        }
    }

    fn post(&mut self, from: usize, to: usize, mail: Mail) {
        // Shard-to-shard channels are FIFO.
        let t = (self.now + self.rng.range(0, 2)).max(self.mail_at[from][to]);
        self.mail_at[from][to] = t;
        let epoch = self.epoch;
        self.at(t, Ev::Mail { epoch, to, mail });
    }

    fn mail(&mut self, to: usize, mail: Mail) {
        let now = self.now();
        match mail {
            Mail::Batch(batch) => {
                self.note(13, to as u64, batch.len() as u64, || {
                    format!("shard {to}: a batch of {}", batch.len())
                });
                if let Some(n) = self.node.as_mut() {
                    n.cores[to].handle_mail(batch, now);
                }
            }
            Mail::Adopt(s, adoption) => {
                let Some(n) = self.node.as_mut() else {
                    return;
                };
                let conn = n.cores[to].handle_adopt(*adoption, now);
                n.hosts[to].insert(conn.slot, (conn.generation, s));
                self.note(14, s as u64, to as u64, || {
                    format!("sock {s}: adopted by shard {to}")
                });
                self.socks[s].host = Host::Server { shard: to, conn };
                if self.socks[s].closed {
                    self.server_reset(to, conn);
                } else {
                    // Frames behind the login may wait in the core or the socket.
                    self.schedule_read(s);
                }
            }
        }
        self.apply(to);
    }

    fn unhost(&mut self, shard: usize, conn: ConnId) -> Option<usize> {
        let n = self.node.as_mut()?;
        match n.hosts[shard].get(&conn.slot) {
            Some(&(g, s)) if g == conn.generation => {
                n.hosts[shard].remove(&conn.slot);
                Some(s)
            }
            _ => None,
        }
    }

    /// The client's side of `conn` is gone: the server's next write fails and it drops it.
    fn server_reset(&mut self, shard: usize, conn: ConnId) {
        let now = self.now();
        self.unhost(shard, conn);
        if let Some(n) = self.node.as_mut() {
            n.cores[shard].handle_reset(conn, now);
        }
    }

    /// The server writes what the connection's window takes.
    fn server_write(&mut self, shard: usize, conn: ConnId) {
        let now = self.now();
        let Some(n) = self.node.as_mut() else {
            return;
        };
        let Some(&(g, s)) = n.hosts[shard].get(&conn.slot) else {
            return;
        };
        if g != conn.generation {
            return;
        }
        if self.socks[s].closed {
            return self.server_reset(shard, conn);
        }
        let window = if self.clients[self.socks[s].client].behaviour == Behaviour::Staller {
            SMALL_WINDOW
        } else {
            WINDOW
        };
        let room = window.saturating_sub(self.socks[s].inflight);
        let core = &mut n.cores[shard];
        if let Some(q) = core.queued_bytes(conn)
            && q > self.bound
        {
            let what = format!(
                "sock {s} holds {q} bytes on shard {shard}, over its bound of {}",
                self.bound
            );
            self.history.fail(self.now, what);
        }
        let Some(buf) = core.outbound(conn) else {
            return;
        };
        let n_bytes = room.min(buf.len());
        if n_bytes == 0 {
            return;
        }
        let bytes = buf.split_to(n_bytes).to_vec();
        core.handle_written(conn, true, now);
        self.socks[s].inflight += n_bytes;
        self.send_to_client(s, bytes);
    }

    fn send_to_client(&mut self, s: usize, bytes: Vec<u8>) {
        let t = (self.now + self.rng.range(1, 5)).max(self.socks[s].deliver_at);
        self.socks[s].deliver_at = t;
        self.at(t, Ev::ClientRead(s, bytes));
    }

    fn schedule_read(&mut self, s: usize) {
        if !self.socks[s].read_scheduled {
            self.socks[s].read_scheduled = true;
            let t = self.now + self.rng.range(1, 5);
            self.at(t, Ev::ServerRead(s));
        }
    }

    /// The server side of a socket reads, as the driver does: what the core has buffered
    /// first, then at most `limits.read_budget_bytes`, and nothing while the core holds input.
    fn server_read(&mut self, s: usize) {
        self.socks[s].read_scheduled = false;
        if self.socks[s].closed {
            return;
        }
        let Host::Server { shard, conn } = self.socks[s].host else {
            return;
        };
        let now = self.now();
        let budget = self.read_budget;
        let Some(n) = self.node.as_mut() else {
            return;
        };
        match n.cores[shard].intake(conn) {
            None | Some(Intake::Hold) => {}
            Some(Intake::Pending) => n.cores[shard].handle_continue(conn, now),
            Some(Intake::Read) => {
                let take = budget.min(self.socks[s].to_server.len());
                let bytes: Vec<u8> = self.socks[s].to_server.drain(..take).collect();
                n.cores[shard].handle_bytes(conn, &bytes, now);
                self.note(3, s as u64, bytes.len() as u64, || {
                    format!("sock {s}: shard {shard} reads {} bytes", bytes.len())
                });
            }
        }
        self.apply(shard);
        self.read_again(s);
    }

    /// Schedules another read of socket `s` if its core takes input and there is some.
    fn read_again(&mut self, s: usize) {
        let Host::Server { shard, conn } = self.socks[s].host else {
            return;
        };
        let Some(n) = self.node.as_ref() else {
            return;
        };
        let again = match n.cores[shard].intake(conn) {
            Some(Intake::Pending) => true,
            Some(Intake::Read) => !self.socks[s].to_server.is_empty(),
            Some(Intake::Hold) | None => false,
        };
        if again {
            self.schedule_read(s);
        }
    }
}
