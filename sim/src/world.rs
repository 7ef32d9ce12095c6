//! The simulated world: the nodes' shard cores, the disks, the network (sockets to clients,
//! links between nodes), Redis, the clients and the scheduler that orders everything by
//! (virtual time, arrival order).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use parley_broker::core::{
    Adoption, ConnId, Counters, Now, RouteOp, ShardCore, ShardMsg, TestSwitches,
};
use parley_proto::tcp::FrameCodec;
use parley_storage::{
    Durability, LogConfig, MemoryBackend, Retention, SpareTicketOf, SyncOf, SyncTicket,
};

use crate::check::{ConnView, GROUP_MARK, History, ROOM_MARK};
use crate::client::{Behaviour, Client, Final};
use crate::rng::Rng;
use crate::setup::sim_config;
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
mod cluster;
mod node;
mod routes;
use cluster::Cluster;
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
    /// A link that comes up does not make the owners tell the homes there what their
    /// conversations hold.
    MuteLinkUp,
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
    /// Crashes and clean stops of nodes.
    pub crashes: u32,
    /// Events processed.
    pub events: u64,
    /// Virtual time at the end, ms.
    pub virtual_ms: u64,
    /// Nodes of the cluster (1: a node alone).
    pub nodes: usize,
    /// Shards of each node.
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
    /// Mail between two shards of one node.
    Mail {
        epoch: u64,
        to: usize,
        mail: Mail,
    },
    /// Mail from node `from` to shard `to` of another node, in the links' wire form, sent on
    /// the link's incarnation `link` (lost if the link broke meanwhile).
    Remote {
        link: u64,
        from: usize,
        to: usize,
        bytes: Bytes,
    },
    /// A session relayed from another node has input to take (its shard serves it).
    Serve {
        epoch: u64,
        shard: usize,
        conn: ConnId,
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
    Crash(usize),
    Stop(usize),
    Restart(usize),
    Quiesce,
    /// The gate of node `node` answers a parked send.
    Answer {
        node: usize,
        epoch: u64,
        reply: Reply<SendVerdict>,
    },
    /// The presence index applies a route op of node `node` (and answers a registration);
    /// `fail`: the registration does not get through in time.
    Route {
        node: usize,
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
    /// The link between nodes `a` and `b` comes up (if both run and it is down).
    Connect {
        a: usize,
        b: usize,
    },
    /// Node `node` notices that its link to `peer` (incarnation `link`) is gone.
    LinkLost {
        node: usize,
        peer: usize,
        link: u64,
    },
    /// Shard `to` hears that its node's link to `peer` came up or went down (in order with the
    /// mail from `peer`, as the link thread tells it).
    News {
        epoch: u64,
        to: usize,
        peer: usize,
        up: bool,
    },
    /// A fault: the link between `a` and `b` breaks (mail on it is lost).
    Cut {
        a: usize,
        b: usize,
    },
    /// Node `node` renews its lease in Redis (when Redis takes the write).
    Beat {
        node: usize,
        epoch: u64,
    },
    /// A fault: Redis takes no writes until `until`.
    RedisDown {
        until: u64,
    },
    /// Node `node`'s start-up gate opens (if it is still the same boot).
    Settle {
        node: usize,
        epoch: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    Server {
        shard: usize,
        conn: ConnId,
    },
    /// Being handed between two shards of node `node`.
    Transit {
        node: usize,
    },
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

/// A running node.
struct Node {
    /// Its shards' cores, by local index.
    cores: Vec<Core>,
    /// Per shard: which socket each connection slot holds.
    hosts: Vec<BTreeMap<u32, (u32, usize)>>,
}

struct World {
    rng: Rng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    /// The nodes, by position in the cluster's node list (`None`: down).
    nodes: Vec<Option<Node>>,
    /// Each node's boot count: events of an earlier boot are dropped.
    epochs: Vec<u64>,
    /// The disks of every shard, by global shard index (node × shards + shard).
    disks: Vec<MemoryBackend>,
    /// Shards of each node.
    shards: usize,
    /// The settings every node shares (each node's id is set at its start).
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
    /// The send gate of each node, in half the seeds.
    gates: Vec<Arc<SimGate>>,
    /// Where each node's gate answers land.
    answers: Vec<Arc<SimAnswers>>,
    /// The presence index, in a third of the single-node seeds (the node then runs as a
    /// cluster member) and in every seed of several nodes.
    routes: Option<SimIndex>,
    /// The links between nodes, the lease and the start-up gate (several nodes).
    cluster: Option<Cluster>,
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
    for node in 0..w.nodes.len() {
        w.count_cores(node);
    }
    Outcome {
        seed,
        failures: std::mem::take(&mut w.history.failures),
        trace_hash: w.trace_hash,
        trace: w.trace.take().unwrap_or_default(),
        acked: w.history.acked(),
        crashes: w.crashes,
        events: w.events_run,
        virtual_ms: w.now,
        nodes: w.nodes.len(),
        shards: w.shards,
        clients: w.clients.len(),
        counters: w.counters,
    }
}

impl World {
    fn new(seed: u64, opts: &Options) -> Self {
        let mut rng = Rng::new(seed);
        // Four seeds in ten run a cluster of two or three nodes; of the rest, a third run a
        // node alone as a cluster member (with the presence index), the others without one.
        let nodes = if rng.chance(400) {
            rng.range(2, 3) as usize
        } else {
            1
        };
        let shards = if nodes > 1 {
            rng.range(1, 2) as usize
        } else {
            rng.range(1, 3) as usize
        };
        let gated = rng.chance(500);
        let mut config = sim_config();
        let routes = (nodes > 1 || rng.chance(333)).then(|| SimIndex::new(nodes));
        if routes.is_some() {
            // Never contacted: the simulation stands in for the bridge and Redis.
            config.cluster.redis = Some("redis://simulated.invalid:1".into());
        }
        let cluster = (nodes > 1).then(|| Cluster::new(nodes, shards, &mut config, &mut rng));
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
            mute_link_up: opts.plant == Plant::MuteLinkUp,
        };
        let total = nodes * shards;
        World {
            rng,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            nodes: (0..nodes).map(|_| None).collect(),
            epochs: vec![0; nodes],
            disks: (0..total).map(|_| MemoryBackend::new()).collect(),
            shards,
            codec: FrameCodec::new(config.limits.max_frame_bytes as usize),
            config,
            log_config,
            switches,
            clients: Vec::new(),
            socks: Vec::new(),
            history: History::default(),
            mail_at: vec![vec![0; total]; total],
            quiescing: false,
            crashes: 0,
            events_run: 0,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            trace: opts.trace.then(Vec::new),
            counters: Counters::default(),
            bound,
            read_budget,
            gates: if gated {
                (0..nodes).map(|_| Arc::new(SimGate::default())).collect()
            } else {
                Vec::new()
            },
            answers: (0..nodes)
                .map(|_| Arc::new(SimAnswers::default()))
                .collect(),
            routes,
            cluster,
        }
    }

    /// The node of global shard `g`.
    fn node_of(&self, g: usize) -> usize {
        g / self.shards
    }

    /// The core of global shard `g`, if its node runs.
    fn core_mut(&mut self, g: usize) -> Option<&mut Core> {
        let shards = self.shards;
        self.nodes
            .get_mut(g / shards)?
            .as_mut()?
            .cores
            .get_mut(g % shards)
    }

    /// The core of global shard `g`, if its node runs.
    fn core(&self, g: usize) -> Option<&Core> {
        self.nodes
            .get(g / self.shards)?
            .as_ref()?
            .cores
            .get(g % self.shards)
    }

    /// Which socket each connection slot of global shard `g` holds, if its node runs.
    fn hosts_mut(&mut self, g: usize) -> Option<&mut BTreeMap<u32, (u32, usize)>> {
        let shards = self.shards;
        self.nodes
            .get_mut(g / shards)?
            .as_mut()?
            .hosts
            .get_mut(g % shards)
    }

    /// The boot of global shard `g`'s node.
    fn epoch_of(&self, g: usize) -> u64 {
        self.epochs[self.node_of(g)]
    }

    /// Every global shard index.
    fn all_shards(&self) -> std::ops::Range<usize> {
        0..self.nodes.len() * self.shards
    }

    /// Schedules the answers of the sends the gates parked (at a random later time).
    fn schedule_answers(&mut self) {
        for node in 0..self.gates.len() {
            let held: Vec<Reply<SendVerdict>> = self.gates[node]
                .held
                .lock()
                .map(|mut h| h.drain(..).collect())
                .unwrap_or_default();
            for reply in held {
                let t = self.now + self.rng.range(1, 60);
                let epoch = self.epochs[node];
                self.at(t, Ev::Answer { node, epoch, reply });
            }
        }
    }

    /// Node `node`'s gate answers a parked send: the answer goes to its shard's core.
    fn answer(&mut self, node: usize, epoch: u64, reply: Reply<SendVerdict>) {
        if epoch != self.epochs[node] {
            // Its node died: dropping the reply answers nobody.
            drop(reply);
            self.forget_answers(node);
            return;
        }
        self.note(17, epoch, node as u64, || {
            format!("node {node}: the send gate answers")
        });
        reply.send(SendVerdict::Allow);
        let answers: Vec<(HookTicket, Answer)> = self.answers[node]
            .0
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default();
        let now = self.now();
        for (ticket, answer) in answers {
            // Tickets name shards across the cluster.
            let shard = ticket.shard();
            if self.node_of(shard) != node {
                self.history.fail(
                    self.now,
                    format!("node {node}'s gate answered a ticket of shard {shard}"),
                );
                continue;
            }
            if let Some(core) = self.core_mut(shard) {
                core.handle_hook_answer(ticket, answer, now);
            }
            self.apply(shard);
        }
    }

    /// Node `node` died: what its gate held and the answers on their way are gone with it.
    fn forget_answers(&mut self, node: usize) {
        if let Some(g) = self.gates.get(node) {
            let held: Vec<Reply<SendVerdict>> = g
                .held
                .lock()
                .map(|mut h| h.drain(..).collect())
                .unwrap_or_default();
            drop(held);
        }
        if let Some(a) = self.answers.get(node)
            && let Ok(mut q) = a.0.lock()
        {
            q.clear();
        }
    }

    /// Adds the counters of node `node`'s cores (before they go, and at the end).
    fn count_cores(&mut self, node: usize) {
        if let Some(n) = self.nodes.get(node).and_then(Option::as_ref) {
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
        for node in 0..self.nodes.len() {
            self.restart(node);
        }
        for i in 0..self.clients.len() {
            let t = self.rng.range(0, 50);
            self.at(t, Ev::Wake(i));
        }
        let crashes = self.rng.range(0, 2);
        for _ in 0..crashes {
            let t = self.rng.range(100, QUIESCE_AT - 1_000);
            let node = self.rng.below(self.nodes.len() as u64) as usize;
            let ev = if self.rng.chance(250) {
                Ev::Stop(node)
            } else {
                Ev::Crash(node)
            };
            self.at(t, ev);
        }
        self.schedule_cluster_faults();
        self.at(QUIESCE_AT, Ev::Quiesce);
    }

    /// One scheduling step: the earliest of the next event and the cores' deadlines.
    fn step(&mut self) -> bool {
        let next_event = self.events.keys().next().map(|k| k.0);
        let next_timer = self
            .nodes
            .iter()
            .flatten()
            .flat_map(|n| n.cores.iter().filter_map(|c| c.next_deadline()))
            .min();
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
            for shard in self.all_shards() {
                let due = self
                    .core(shard)
                    .and_then(|c| c.next_deadline())
                    .is_some_and(|d| d <= now.ms);
                if due {
                    self.note(1, shard as u64, 0, || format!("deadlines of shard {shard}"));
                    if let Some(core) = self.core_mut(shard) {
                        core.handle_timeout(now);
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
                if epoch == self.epoch_of(to) {
                    self.mail(to, mail);
                }
            }
            Ev::Remote {
                link,
                from,
                to,
                bytes,
            } => self.remote(link, from, to, &bytes),
            Ev::Serve { epoch, shard, conn } => {
                if epoch == self.epoch_of(shard) {
                    self.serve_relayed(shard, conn);
                }
            }
            Ev::Flushed {
                epoch,
                shard,
                ticket,
                took_ms,
            } => {
                if epoch == self.epoch_of(shard) {
                    self.note(7, shard as u64, ticket.lsn().0, || {
                        format!("shard {shard}: flush to {:?} done", ticket.lsn())
                    });
                    let result = ticket.run();
                    let now = self.now();
                    if let Some(core) = self.core_mut(shard) {
                        core.handle_flushed(result, Some(took_ms * 1000), now);
                    }
                    self.apply(shard);
                }
            }
            Ev::Spared {
                epoch,
                shard,
                ticket,
            } => {
                if epoch == self.epoch_of(shard) {
                    self.note(17, shard as u64, 0, || {
                        format!("shard {shard}: segment housekeeping done")
                    });
                    let done = ticket.run();
                    let now = self.now();
                    if let Some(core) = self.core_mut(shard) {
                        core.handle_spare(done, now);
                    }
                    self.apply(shard);
                }
            }
            Ev::Crash(node) => self.crash(node),
            Ev::Answer { node, epoch, reply } => self.answer(node, epoch, reply),
            Ev::Route {
                node,
                epoch,
                op,
                fail,
            } => self.route(node, epoch, op, fail),
            Ev::Found {
                epoch,
                shard,
                gather,
                users,
            } => self.found(epoch, shard, gather, &users),
            Ev::Stop(node) => self.stop(node),
            Ev::Restart(node) => self.restart(node),
            Ev::Connect { a, b } => self.connect_link(a, b),
            Ev::LinkLost { node, peer, link } => self.link_lost(node, peer, link),
            Ev::News {
                epoch,
                to,
                peer,
                up,
            } => self.news(epoch, to, peer, up),
            Ev::Cut { a, b } => self.cut(a, b),
            Ev::Beat { node, epoch } => self.beat(node, epoch),
            Ev::RedisDown { until } => self.redis_down(until),
            Ev::Settle { node, epoch } => self.settle(node, epoch),
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
}
