//! A worker process: holds its share of the clients in one [`Engine`] and runs the scenario.
//!
//! The orchestrator (see `run.rs`) starts K workers and talks to each through JSON lines: the
//! worker prints `{"ready":…}` once its connections are set up, waits for `go` on stdin, prints
//! `{"progress":…}` every second and `{"done":…}` (its [`Tally`]) at the end.
//!
//! The `groups` scenario (and parley's `fanout --conversation group`) lives in [`groups`].

mod clients;
mod groups;

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::body::Stamp;
use crate::check::{Arrival, Numberings, Stream};
use crate::cli::{Common, System, Transport};
use crate::driver::mqtt::MqttDriver;
use crate::driver::parley::{Framing, ParleyDriver};
use crate::driver::redis::RedisDriver;
use crate::driver::relay::RelayDriver;
use crate::driver::{ConvSeq, Driver, Endpoint, Event, Names, Role};
use crate::engine::{Engine, Happening, State, Wire};
use crate::stats::{Hist, Progress, Tally};
use crate::token::Minter;
use crate::ws::WsClient;

/// A line a worker prints.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Report {
    /// Set-up is done; waiting for `go`.
    Ready {
        /// Connections up.
        conns: u64,
    },
    /// Once a second.
    Progress(Progress),
    /// The end.
    Done(Box<Tally>),
    /// Set-up failed; the worker exits.
    Fatal(String),
}

/// What a worker does, as the orchestrator planned it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The scenario.
    pub scenario: Scenario,
    /// The clients of this worker (global numbers).
    pub clients: Range<u32>,
    /// Where the first connection of this worker sits in the run's connection numbering (for
    /// choosing source addresses).
    pub first_conn: usize,
    /// Source addresses to connect from, round robin; empty: let the kernel choose.
    pub sources: Vec<IpAddr>,
    /// The run's naming.
    pub names: Names,
    /// The target address.
    pub addr: SocketAddr,
    /// The nodes of a cluster the clients are spread over (empty: all go to `addr`).
    pub nodes: Vec<SocketAddr>,
    /// Members of one unit on different nodes (`--split`).
    pub split: bool,
}

/// The scenario with its parameters.
#[derive(Debug, Clone)]
pub enum Scenario {
    /// Pairs (2k, 2k+1) or fan-out groups (publisher p, subscribers p+1..=p+S).
    Traffic {
        /// Clients per group: 2 for pairs, S+1 for fan-out.
        group: u32,
        /// Whether groups are 1→S fan-out (else pairs).
        fanout: bool,
        /// In flight per sender (closed loop).
        window: u32,
        /// This worker's share of the open-loop rate.
        rate: Option<f64>,
        /// Body size.
        body_bytes: usize,
        /// Warm-up.
        warmup: Duration,
        /// Measured time.
        duration: Duration,
        /// Longest drain.
        drain: Duration,
    },
    /// Connect and log in, timed.
    Storm,
    /// Hold connections for a while.
    Idle {
        /// How long.
        duration: Duration,
    },
    /// Groups with publishers and membership churn (`groups`; parley's `fanout --conversation
    /// group` is one group per publisher, all online, no churn). The worker holds whole groups:
    /// group `g` is the clients `g * members ..`, member 0 its owner.
    Groups {
        /// Members per group, the owner included.
        members: u32,
        /// Members `0..online` of each group connect; the others never do.
        online: u32,
        /// Members `0..publishers` send (the owner is the first).
        publishers: u32,
        /// Membership changes per second per group.
        churn: f64,
        /// In flight per publisher (closed loop).
        window: u32,
        /// This worker's share of the open-loop rate.
        rate: Option<f64>,
        /// Body size.
        body_bytes: usize,
        /// Warm-up.
        warmup: Duration,
        /// Measured time.
        duration: Duration,
        /// Longest drain (and longest final sync).
        drain: Duration,
    },
    /// Offline senders then sync.
    Offline {
        /// Messages per sender.
        messages: u64,
        /// In flight per sender.
        window: u32,
        /// Body size.
        body_bytes: usize,
        /// Longest phase.
        timeout: Duration,
    },
}

/// The first source address of `--sources`.
pub const SOURCE_BASE: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 1);

/// `n` source addresses from [`SOURCE_BASE`] on.
pub fn source_addresses(n: usize) -> Vec<IpAddr> {
    let base = u32::from(SOURCE_BASE);
    (0..n as u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(base + i)))
        .collect()
}

/// How many connections a client of `system` opens when it `sends` and/or `receives`.
pub fn conns_per_client(system: System, sends: bool, receives: bool) -> usize {
    match system {
        System::Redis => usize::from(sends) + usize::from(receives),
        _ => 1,
    }
}

/// What carries parley's frames for `common.transport`.
fn wire(common: &Common) -> Result<Wire, String> {
    Ok(match common.transport {
        Transport::Tcp | Transport::Ws => Wire::Plain,
        Transport::Tls | Transport::Wss => {
            let Some(ca) = &common.ca else {
                return Err(format!(
                    "--transport {} needs --ca: the PEM certificate to trust (e.g. the cert.pem \
                     of `broker devcert --out DIR`)",
                    if common.transport == Transport::Tls {
                        "tls"
                    } else {
                        "wss"
                    }
                ));
            };
            let (config, name) = crate::tls::client_config(ca, &common.server_name)?;
            Wire::Tls { config, name }
        }
        Transport::Udp => Wire::Udp {
            max_datagram: parley_proto::udp::DEFAULT_MAX_DATAGRAM_BYTES,
            loss: common.udp_loss.clamp(0.0, 0.9),
        },
    })
}

/// A message in flight from one sender.
#[derive(Debug, Clone, Copy)]
struct Pending {
    sent_ns: u64,
    waiting: u32,
    acked: bool,
}

/// One client of this worker.
#[derive(Debug)]
struct Client {
    send_conn: Option<usize>,
    recv_conn: Option<usize>,
    /// Where its messages go (a client number / channel), if it sends.
    dest: Option<u32>,
    /// How many receivers each of its messages has.
    fan: u32,
    last_seq: u64,
    /// Messages `base..` still waiting for delivery or ack.
    pending: VecDeque<Pending>,
    base: u64,
    in_flight: u32,
    /// What it receives, if it does.
    stream: Option<Stream>,
    ready_conns: u32,
    conns: u32,
    synced: bool,
    started_ns: u64,
    /// The group it is a member of (global number), in `groups`.
    group: Option<u32>,
}

impl Client {
    fn settled(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Runs worker `plan` with options `common`, talking JSON lines on stdin/stdout.
pub fn run(common: &Common, plan: Plan) -> i32 {
    let stdout = std::io::stdout();
    let mut w = match Worker::new(common, plan) {
        Ok(w) => w,
        Err(e) => {
            emit(&stdout, &Report::Fatal(e));
            return 2;
        }
    };
    match w.run(&stdout) {
        Ok(()) => {
            let mut tally = std::mem::take(&mut w.tally);
            (tally.udp_resent, tally.udp_dropped) = w.engine.udp_counts();
            emit(&stdout, &Report::Done(Box::new(tally)));
            0
        }
        Err(e) => {
            emit(&stdout, &Report::Fatal(e));
            2
        }
    }
}

fn emit(stdout: &std::io::Stdout, report: &Report) {
    let mut out = stdout.lock();
    if let Ok(line) = serde_json::to_string(report) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn wait_for_go() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading go: {e}"))?;
    if line.trim() == "go" {
        Ok(())
    } else {
        Err("the orchestrator went away".into())
    }
}

struct Worker<'a> {
    common: &'a Common,
    plan: Plan,
    engine: Engine,
    minter: Option<Minter>,
    tally: Tally,
    clients: Vec<Client>,
    numberings: Numberings,
    /// Connection → local client index.
    owner: Vec<u32>,
    conns_opened: usize,
    interval: Hist,
    measure: Range<u64>,
    seed: u64,
}

impl<'a> Worker<'a> {
    fn new(common: &'a Common, plan: Plan) -> Result<Self, String> {
        let minter = match common.system {
            System::Parley => Some(match &common.secret {
                Some(s) => Minter::new(s.as_bytes()),
                None => Minter::from_data_dir(&common.data_dir)?,
            }),
            _ => None,
        };
        let mut engine = Engine::new(Instant::now()).map_err(|e| format!("poll: {e}"))?;
        if common.system == System::Parley {
            engine.set_wire(wire(common)?);
        }
        let seed = u64::from(plan.clients.start).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
        Ok(Self {
            common,
            plan,
            engine,
            minter,
            tally: Tally::default(),
            clients: Vec::new(),
            numberings: Numberings::default(),
            owner: Vec::new(),
            conns_opened: 0,
            interval: Hist::default(),
            measure: 0..0,
            seed,
        })
    }

    fn run(&mut self, stdout: &std::io::Stdout) -> Result<(), String> {
        match self.plan.scenario.clone() {
            Scenario::Traffic {
                group,
                fanout,
                window,
                rate,
                body_bytes,
                warmup,
                duration,
                drain,
            } => {
                self.lay_out_traffic(group, fanout);
                let all: Vec<u32> = (0..self.clients.len() as u32).collect();
                self.connect(&all, stdout, false)?;
                emit(stdout, &self.ready_report());
                wait_for_go()?;
                self.traffic(stdout, window, rate, body_bytes, warmup, duration, drain)
            }
            Scenario::Storm => {
                self.lay_out_idle();
                emit(stdout, &Report::Ready { conns: 0 });
                wait_for_go()?;
                let t0 = self.engine.now_ns();
                let all: Vec<u32> = (0..self.clients.len() as u32).collect();
                self.connect(&all, stdout, true)?;
                self.tally.phase_ns = self.engine.now_ns() - t0;
                Ok(())
            }
            Scenario::Idle { duration } => {
                self.lay_out_idle();
                let all: Vec<u32> = (0..self.clients.len() as u32).collect();
                self.connect(&all, stdout, false)?;
                emit(stdout, &self.ready_report());
                wait_for_go()?;
                self.hold(stdout, duration)
            }
            Scenario::Groups {
                members,
                online,
                publishers,
                churn,
                window,
                rate,
                body_bytes,
                warmup,
                duration,
                drain,
            } => {
                let shape = groups::Shape {
                    members,
                    online,
                    publishers,
                    churn,
                };
                let load = groups::Load {
                    window,
                    rate,
                    body_bytes,
                    warmup,
                    duration,
                    drain,
                };
                self.run_groups(stdout, shape, load)
            }
            Scenario::Offline {
                messages,
                window,
                body_bytes,
                timeout,
            } => {
                self.lay_out_offline();
                emit(stdout, &Report::Ready { conns: 0 });
                wait_for_go()?;
                self.offline(stdout, messages, window, body_bytes, timeout)
            }
        }
    }

    fn ready_report(&self) -> Report {
        Report::Ready {
            conns: self.tally.conns,
        }
    }

    fn progress(&mut self, stdout: &std::io::Stdout) {
        let p99 = self.interval.0.value_at_quantile(0.99) as f64 / 1000.0;
        self.interval.0.reset();
        emit(
            stdout,
            &Report::Progress(Progress {
                ready: self.tally.conns,
                sent: self.tally.sent,
                acked: self.tally.acked,
                delivered: self.tally.delivered,
                errors: self.tally.errors,
                p99_us: p99,
            }),
        );
    }

    /// Sends the next message of client `local`.
    fn send_one(&mut self, local: usize, sent_ns: u64, body_bytes: usize) {
        let me = self.global(local as u32);
        let c = &mut self.clients[local];
        let (Some(conn), Some(dest)) = (c.send_conn, c.dest) else {
            return;
        };
        c.last_seq += 1;
        let seq = c.last_seq;
        c.pending.push_back(Pending {
            sent_ns,
            waiting: c.fan,
            acked: false,
        });
        c.in_flight += 1;
        self.tally.sent += 1;
        let stamp = Stamp {
            sender: me,
            seq,
            sent_ns,
        };
        self.engine.send(conn, dest, seq, stamp, body_bytes);
    }

    fn pop_settled(c: &mut Client, needs_ack: bool) {
        while let Some(front) = c.pending.front() {
            if front.waiting == 0 && (front.acked || !needs_ack) {
                c.pending.pop_front();
                c.base += 1;
            } else {
                break;
            }
        }
    }

    /// Counts one receiver's copy of message `seq` of client `sender`; whether that was the last
    /// copy it waited for (its window opened).
    fn settle_copy(s: &mut Client, seq: u64) -> bool {
        let Some(p) = seq
            .checked_sub(s.base)
            .and_then(|i| s.pending.get_mut(i as usize))
        else {
            return false;
        };
        if p.waiting > 0 {
            p.waiting -= 1;
            if p.waiting == 0 {
                s.in_flight = s.in_flight.saturating_sub(1);
                return true;
            }
        }
        false
    }

    /// Handles one happening of a traffic run; returns the sender whose window opened and by how
    /// many messages.
    fn on_happening(&mut self, h: Happening, needs_ack: bool) -> Option<(usize, u32)> {
        let now = self.engine.now_ns();
        match h {
            Happening::Connected { .. } => None,
            Happening::Closed { reason, .. } => {
                self.tally.error(reason);
                None
            }
            Happening::Event { conn, event, .. } => {
                let local = self.owner[conn] as usize;
                match event {
                    Event::Delivered { body, seq } => {
                        if let Some(at) = seq
                            && !self.numberings.delivered(at)
                        {
                            return None; // a redelivery the protocol allows
                        }
                        let (arrival, excused) = match self.clients[local].stream.as_mut() {
                            Some(s) => (s.arrive_at(&body, seq.map(|at| at.seq)), s.take_excused()),
                            None => {
                                self.tally.verdict.corrupt += 1;
                                return None;
                            }
                        };
                        let Arrival::Fresh(stamp) = arrival else {
                            return None;
                        };
                        self.tally.delivered += 1;
                        if self.measure.contains(&now) {
                            self.tally.delivered_measured += 1;
                        }
                        let latency = now.saturating_sub(stamp.sent_ns);
                        self.interval.record(latency);
                        if self.measure.contains(&stamp.sent_ns) {
                            self.tally.e2e.record(latency);
                        }
                        let sender = self.local(stamp.sender)?;
                        let s = &mut self.clients[sender];
                        // Messages the system said it dropped for this receiver are settled
                        // for it too.
                        let opened = excused
                            .into_iter()
                            .flatten()
                            .chain(std::iter::once(stamp.seq))
                            .filter(|&seq| Self::settle_copy(s, seq))
                            .count() as u32;
                        if opened == 0 {
                            return None;
                        }
                        Self::pop_settled(s, needs_ack);
                        Some((sender, opened))
                    }
                    Event::Dropped { count, first } => {
                        if let Some(s) = self.clients[local].stream.as_mut() {
                            s.excuse(count);
                        }
                        if let Some(first) = first {
                            for seq in first.seq..first.seq.saturating_add(count) {
                                self.numberings.dropped(ConvSeq { seq, ..first });
                            }
                        }
                        None
                    }
                    Event::Acked { tag, seq } => {
                        if let Some(at) = seq {
                            self.numberings.acked(at);
                        }
                        let s = &mut self.clients[local];
                        let i = tag.checked_sub(s.base)? as usize;
                        let p = s.pending.get_mut(i)?;
                        if !p.acked {
                            p.acked = true;
                            self.tally.acked += 1;
                            if self.measure.contains(&p.sent_ns) {
                                self.tally.ack.record(now.saturating_sub(p.sent_ns));
                            }
                        }
                        Self::pop_settled(s, needs_ack);
                        None
                    }
                    Event::Error { text, .. } => {
                        self.tally.error(text);
                        None
                    }
                    Event::Synced => {
                        let c = &mut self.clients[local];
                        if !c.synced {
                            c.synced = true;
                            let t = now.saturating_sub(c.started_ns);
                            self.tally.sync.record(t);
                        }
                        None
                    }
                    Event::GroupResult { .. } | Event::GroupMessage { .. } => {
                        self.tally
                            .error("a group frame outside the groups scenario");
                        None
                    }
                    Event::Ready | Event::Behind => None,
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn traffic(
        &mut self,
        stdout: &std::io::Stdout,
        window: u32,
        rate: Option<f64>,
        body_bytes: usize,
        warmup: Duration,
        duration: Duration,
        drain: Duration,
    ) -> Result<(), String> {
        let needs_ack = self.common.system != System::Redis
            && !(self.common.system == System::Mqtt && self.common.qos == 0)
            && self.common.system != System::Relay;
        let t0 = self.engine.now_ns();
        let measure_start = t0 + warmup.as_nanos() as u64;
        let end = measure_start + duration.as_nanos() as u64;
        self.measure = measure_start..end;
        let senders: Vec<usize> = (0..self.clients.len())
            .filter(|&i| self.clients[i].dest.is_some())
            .collect();
        // Open loop: message k is due at t0 + k / rate, from senders[k % n].
        let gap_ns = rate.map(|r| (1e9 / r.max(1e-3)) as u64);
        let mut k: u64 = 0;
        if gap_ns.is_none() {
            for &s in &senders {
                for _ in 0..window {
                    self.send_one(s, self.engine.now_ns(), body_bytes);
                }
            }
            self.engine.finish_turn();
        }
        let mut next_progress = t0 + 1_000_000_000;
        let drain_end = end + drain.as_nanos() as u64;
        loop {
            let now = self.engine.now_ns();
            if now >= end {
                let settled = self.clients.iter().all(Client::settled);
                if settled || now >= drain_end {
                    break;
                }
            }
            let timeout = match gap_ns {
                Some(gap) if now < end && !senders.is_empty() => {
                    let due = t0 + k * gap;
                    if due <= now + 1_000_000 {
                        Duration::ZERO
                    } else {
                        Duration::from_nanos(due - now - 1_000_000)
                    }
                }
                _ => Duration::from_millis(10),
            };
            let events = self
                .engine
                .turn(Some(timeout.min(Duration::from_millis(100))))
                .map_err(|e| format!("poll: {e}"))?;
            let mut events = events;
            for h in events.drain(..) {
                if let Some((sender, opened)) = self.on_happening(h, needs_ack)
                    && gap_ns.is_none()
                    && self.engine.now_ns() < end
                {
                    for _ in 0..opened {
                        self.send_one(sender, self.engine.now_ns(), body_bytes);
                    }
                }
            }
            self.engine.recycle(events);
            if let Some(gap) = gap_ns
                && !senders.is_empty()
            {
                let now = self.engine.now_ns();
                while t0 + k * gap <= now && t0 + k * gap < end {
                    let s = senders[(k % senders.len() as u64) as usize];
                    self.send_one(s, t0 + k * gap, body_bytes);
                    k += 1;
                }
            }
            self.engine.finish_turn();
            if self.engine.now_ns() >= next_progress {
                next_progress += 1_000_000_000;
                self.progress(stdout);
            }
        }
        self.finish_verdict();
        self.engine.close_all();
        Ok(())
    }

    fn finish_verdict(&mut self) {
        let mut sent_by = std::collections::HashMap::new();
        for (i, c) in self.clients.iter().enumerate() {
            sent_by.insert(self.global(i as u32), c.last_seq);
        }
        for c in &self.clients {
            if let Some(s) = &c.stream {
                let sent = sent_by.get(&s.sender).copied().unwrap_or(0);
                self.tally.verdict.merge(&s.verdict(sent));
            }
        }
        self.tally.verdict.merge(&self.numberings.verdict());
    }

    fn hold(&mut self, stdout: &std::io::Stdout, duration: Duration) -> Result<(), String> {
        let end = Instant::now() + duration;
        let n = self.engine.len();
        let hb = Duration::from_secs_f64(self.common.heartbeat.max(0.1));
        // Heartbeats spread evenly: one connection every hb / n.
        let step = hb.as_nanos() as u64 / n.max(1) as u64;
        let t0 = self.engine.now_ns();
        let mut beat: u64 = 0;
        let mut next_progress = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            let events = self
                .engine
                .turn(Some(Duration::from_millis(20)))
                .map_err(|e| format!("poll: {e}"))?;
            for h in &events {
                match h {
                    Happening::Closed { reason, .. } => self.tally.error(reason.clone()),
                    Happening::Event {
                        event: Event::Error { text, .. },
                        ..
                    } => self.tally.error(text.clone()),
                    _ => {}
                }
            }
            self.engine.recycle(events);
            let now = self.engine.now_ns();
            while n > 0 && t0 + beat * step.max(1) <= now {
                self.engine.heartbeat((beat % n as u64) as usize);
                beat += 1;
            }
            self.engine.finish_turn();
            if Instant::now() >= next_progress {
                next_progress += Duration::from_secs(1);
                self.progress(stdout);
            }
        }
        self.engine.close_all();
        Ok(())
    }

    fn offline(
        &mut self,
        stdout: &std::io::Stdout,
        messages: u64,
        window: u32,
        body_bytes: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        if self.common.system != System::Parley {
            return Err(
                "offline needs a system that stores messages for offline clients: \
                        only parley here"
                    .into(),
            );
        }
        // Phase 1: senders connect and send everything to their offline partners.
        let senders: Vec<u32> = (0..self.clients.len() as u32)
            .filter(|&l| self.clients[l as usize].dest.is_some())
            .collect();
        let receivers: Vec<u32> = (0..self.clients.len() as u32)
            .filter(|&l| self.clients[l as usize].stream.is_some())
            .collect();
        self.connect(&senders, stdout, false)?;
        self.measure = 0..u64::MAX;
        let deadline = self.engine.now_ns() + timeout.as_nanos() as u64;
        for &s in &senders {
            for _ in 0..window.min(messages as u32) {
                self.send_one(s as usize, self.engine.now_ns(), body_bytes);
            }
        }
        self.engine.finish_turn();
        // Window by ack here: nobody is online to receive.
        loop {
            let all_acked = senders.iter().all(|&s| {
                let c = &self.clients[s as usize];
                c.last_seq == messages && c.pending.iter().all(|p| p.acked)
            });
            if all_acked {
                break;
            }
            if self.engine.now_ns() > deadline {
                return Err("offline: senders did not get every message acked in time".into());
            }
            let mut events = self
                .engine
                .turn(Some(Duration::from_millis(10)))
                .map_err(|e| format!("poll: {e}"))?;
            for h in events.drain(..) {
                let acked_by = match &h {
                    Happening::Event {
                        conn,
                        event: Event::Acked { .. },
                        ..
                    } => Some(self.owner[*conn] as usize),
                    _ => None,
                };
                self.on_happening(h, true);
                if let Some(s) = acked_by {
                    let c = &self.clients[s];
                    let unacked = c.pending.iter().filter(|p| !p.acked).count() as u32;
                    if c.last_seq < messages && unacked < window {
                        self.send_one(s, self.engine.now_ns(), body_bytes);
                    }
                }
            }
            self.engine.recycle(events);
            self.engine.finish_turn();
        }
        // Phase 2: receivers come back and sync; timed.
        let t0 = self.engine.now_ns();
        let delivered_before = self.tally.delivered;
        self.connect(&receivers, stdout, false)?;
        for &r in &receivers {
            if let Some(conn) = self.clients[r as usize].recv_conn {
                self.engine.sync(conn)?;
            }
        }
        self.engine.finish_turn();
        let deadline = self.engine.now_ns() + timeout.as_nanos() as u64;
        loop {
            let done = receivers.iter().all(|&r| {
                let c = &self.clients[r as usize];
                c.synced && c.stream.as_ref().is_some_and(|s| s.received() >= messages)
            });
            if done || self.engine.now_ns() > deadline {
                break;
            }
            let mut events = self
                .engine
                .turn(Some(Duration::from_millis(10)))
                .map_err(|e| format!("poll: {e}"))?;
            for h in events.drain(..) {
                self.on_happening(h, true);
            }
            self.engine.recycle(events);
            self.engine.finish_turn();
        }
        self.tally.phase_ns = self.engine.now_ns() - t0;
        self.tally.synced_messages = self.tally.delivered - delivered_before;
        self.finish_verdict();
        self.engine.close_all();
        Ok(())
    }
}
