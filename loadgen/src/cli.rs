//! The command line: scenarios and their options.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::relay::RelayOptions;

/// Load-tests parley (or MQTT, Redis pub/sub, or the raw relay ceiling) and checks every message
/// on arrival: lost, duplicated, out-of-order or corrupt messages and seq gaps fail the run.
///
/// Start a broker (`cargo run --release -p parley-broker --bin broker -- serve`), then e.g.:
///
///   loadgen pairs --conns 1000 --window 64 --duration 10
///
///   loadgen pairs --conns 1000 --rate 100000          (open loop, latency from intended send time)
///
///   loadgen storm --conns 15000 --procs 2
///
///   loadgen idle --conns 19000 --procs 2 --broker-pid $(pgrep -x broker)
///
///   loadgen offline --conns 200 --messages 1000
///
///   loadgen groups --groups 10 --members 100 --online 0.5 --churn 1
///
///   loadgen pairs --system mqtt --qos 1 --addr 127.0.0.1:1883
///
/// Parley transports (`--transport`, default tcp; the broker listens where `listen.*` says):
///
///   loadgen pairs --transport ws  --addr 127.0.0.1:7401
///
///   broker devcert --out certs     (then serve with --set listen.tls=127.0.0.1:7443
///                                   --set listen.wss=127.0.0.1:7444
///                                   --set tls.cert_path=certs/cert.pem
///                                   --set tls.key_path=certs/key.pem)
///
///   loadgen pairs --transport tls --addr 127.0.0.1:7443 --ca certs/cert.pem
///
///   loadgen pairs --transport wss --addr 127.0.0.1:7444 --ca certs/cert.pem
///
///   loadgen pairs --transport udp --addr 127.0.0.1:7403    (serve with --set listen.udp=…)
///
/// Parley tokens are minted from the broker's secret: `--secret`, or the file `secret` in
/// `--data-dir` (default ./data, where `broker serve` writes it).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, verbatim_doc_comment)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub command: Command,
}

/// A scenario.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// N clients in N/2 chatting pairs; each sends to its partner and checks what it receives.
    /// Closed loop with `--window` sends in flight per client, or open loop at `--rate`.
    Pairs(PairsArgs),
    /// Groups of one publisher and S subscribers (1→S fan-out): a parley room per publisher
    /// (messages a room drops for a slow subscriber, as its `RoomLag` says, are reported, not
    /// failed) or, with `--conversation group`, a parley group (stored, at-least-once: every
    /// subscriber must get every message), an MQTT topic, a Redis channel or a relay channel.
    Fanout(FanoutArgs),
    /// Parley groups: G groups of M members, some online, P publishers each, and membership
    /// churn (the owner removes and adds back members while messages flow). Checks every
    /// online member's view: every seq of its membership windows, nothing outside them.
    Groups(GroupsArgs),
    /// Connect and log in N clients as fast as possible; report logins per second and the
    /// connect and login latency.
    Storm(StormArgs),
    /// Hold N logged-in connections with heartbeats; with `--broker-pid`, report the broker's
    /// resident memory per connection and its CPU time.
    Idle(IdleArgs),
    /// Receivers stay offline while senders send M messages each; then the receivers connect and
    /// sync. Reports catch-up time and throughput (parley only).
    Offline(OfflineArgs),
    /// Run the relay: the ceiling any broker on this machine can reach (frames from each
    /// publisher go to the subscribers of its channel, nothing else).
    Relay(RelayOptions),
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// The parley broker.
    Parley,
    /// An MQTT 3.1.1 broker (e.g. mosquitto).
    Mqtt,
    /// Redis pub/sub.
    Redis,
    /// `loadgen relay`.
    Relay,
}

impl System {
    /// The usual address of the system on this machine.
    pub fn default_addr(self, transport: Transport) -> SocketAddr {
        let port = match (self, transport) {
            (System::Parley, Transport::Tcp) => 7400,
            (System::Parley, Transport::Ws) => 7401,
            (System::Parley, Transport::Udp) => 7403,
            (System::Parley, Transport::Tls) => 7443,
            (System::Parley, Transport::Wss) => 7444,
            (System::Mqtt, _) => 1883,
            (System::Redis, _) => 6379,
            (System::Relay, _) => 7500,
        };
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    }
}

/// How parley frames travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Length-delimited frames on TCP.
    Tcp,
    /// WebSocket (binary messages).
    Ws,
    /// Length-delimited frames inside TLS (`listen.tls`; trust the broker's certificate with
    /// `--ca`).
    Tls,
    /// WebSocket inside TLS (`listen.wss`; `--ca` as for `tls`).
    Wss,
    /// The broker's UDP sessions (`listen.udp`): the authenticated datagram envelope, several
    /// frames per datagram; loadgen retries its login and its sends, and re-orders and
    /// de-duplicates deliveries by seq as any UDP client must (pairs, storm and idle only).
    Udp,
}

impl Transport {
    /// Whether frames travel inside TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }
}

/// Options every scenario shares: what to load and how to report.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The system under test.
    #[arg(long, value_enum, default_value_t = System::Parley)]
    pub system: System,
    /// Its address [default: parley 127.0.0.1:7400 (ws: 7401, udp: 7403, tls: 7443, wss:
    /// 7444), mqtt :1883, redis :6379, relay :7500].
    #[arg(long)]
    pub addr: Option<SocketAddr>,
    /// Parley: the nodes of a cluster to spread the clients over, instead of --addr
    /// (`ADDR,ADDR,...`). Each pair, fan-out (publisher and its subscribers) or group's members
    /// connect to one node, round robin over the nodes (with --split, to different nodes).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "addr",
        value_name = "ADDR,..."
    )]
    pub nodes: Vec<SocketAddr>,
    /// With --nodes: the members of each pair or fan-out connect to different nodes
    /// (member i of unit u to node u + i, round robin), so that every message crosses nodes.
    #[arg(long, requires = "nodes")]
    pub split: bool,
    /// With --split: the node id of each address of --nodes, in the same order
    /// (`ID,ID,...`), so that each user id is chosen to be homed on the node its client
    /// connects to (the cluster places users by rendezvous hashing of their id over the node
    /// ids). Without it, about half the clients of two nodes are relayed to their home.
    #[arg(long, value_delimiter = ',', requires = "split", value_name = "ID,...")]
    pub node_ids: Vec<String>,
    /// Parley transport: tcp, ws, tls (TCP framing inside TLS), wss (WebSocket inside TLS) or
    /// udp (the broker's UDP sessions).
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// tls / wss: a PEM file of the certificate(s) to trust, e.g. the `cert.pem` that `broker
    /// devcert --out DIR` writes.
    #[arg(long, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// Testing udp: drop this fraction of the datagrams sent and of those received, at
    /// random (the checks must still pass: the broker and loadgen resend what is lost).
    #[arg(long, hide = true, default_value_t = 0.0)]
    pub udp_loss: f64,
    /// tls / wss: the name the broker's certificate must be valid for (`broker devcert` makes
    /// one for localhost, 127.0.0.1 and ::1).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// MQTT quality of service for publishes and subscriptions (0 or 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// The broker's token secret (else read from `<data-dir>/secret`).
    #[arg(long, env = "LOADGEN_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The broker's data dir, to read its token secret from.
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// Spread the clients over this many processes (each may hold at most ~20,000 sockets here).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Source addresses to connect from (127.0.1.1, 127.0.1.2, …), so tens of thousands of
    /// connections do not run out of ports [default: one per 20,000 connections; 1 = let the
    /// kernel choose].
    #[arg(long)]
    pub sources: Option<usize>,
    /// Print the final report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// The broker's process id: report its CPU time (and delivered messages per CPU-second) and
    /// resident memory over the run.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Connections being set up at once, per process.
    #[arg(long, default_value_t = 2000)]
    pub concurrency: usize,
    /// Give up if setting up connections takes longer than this, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
    /// Seconds between keep-alives on otherwise idle connections.
    #[arg(long, default_value_t = 15.0)]
    pub heartbeat: f64,
    /// Names this run's users/topics (`lg<run-id>-c<n>`); random by default, so runs never
    /// see each other's messages.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Internal: run as worker `i/K` of a multi-process run.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

/// How hard `pairs` and `fanout` push.
#[derive(Debug, Clone, Args)]
pub struct Load {
    /// Messages in flight per sender (closed loop); ignored with `--rate`.
    #[arg(long, default_value_t = 64)]
    pub window: u32,
    /// Open loop: total messages per second over all senders, sent on schedule whatever the
    /// replies; latency counts from the scheduled time (no coordinated omission).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Message body size in bytes (at least 24: the checked header).
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// After sending stops, wait at most this many seconds for every message to arrive.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
}

/// `pairs` options.
#[derive(Debug, Clone, Args)]
pub struct PairsArgs {
    /// Clients (connections for most systems); rounded down to an even number.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// The load.
    #[command(flatten)]
    pub load: Load,
    /// The target and reporting.
    #[command(flatten)]
    pub common: Common,
}

/// What a parley fan-out goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FanoutConversation {
    /// A room: ephemeral broadcast, at-most-once (drops for slow subscribers are declared).
    Room,
    /// A group of the publisher and its subscribers: stored, at-least-once, complete.
    Group,
}

/// `fanout` options.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Subscribers per publisher.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publishers (each with its own subscribers).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Parley: what each publisher's messages go through.
    #[arg(long, value_enum, default_value_t = FanoutConversation::Room)]
    pub conversation: FanoutConversation,
    /// The load.
    #[command(flatten)]
    pub load: Load,
    /// The target and reporting.
    #[command(flatten)]
    pub common: Common,
}

/// `groups` options.
#[derive(Debug, Clone, Args)]
pub struct GroupsArgs {
    /// Groups.
    #[arg(long, default_value_t = 10)]
    pub groups: usize,
    /// Members per group, the owner included (the broker's `groups.max_members` must allow
    /// it).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// The fraction of each group's members that connect; the others are members that never
    /// do. The owner and the publishers are always online.
    #[arg(long, default_value_t = 1.0)]
    pub online: f64,
    /// Publishers per group (online members; the owner is the first).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Membership changes per second per group, made by its owner while messages flow: an
    /// online member that does not publish is removed, and later added back.
    #[arg(long, default_value_t = 0.5)]
    pub churn: f64,
    /// Messages in flight per publisher (closed loop: a message is settled once acked and
    /// received by every online member of the group at its seq); ignored with `--rate`.
    #[arg(long, default_value_t = 64)]
    pub window: u32,
    /// Open loop: messages per second per group (spread over its publishers), sent on schedule
    /// whatever the replies; latency counts from the scheduled time.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Message body size in bytes (at least 24: the checked header).
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Seconds of load before measuring (the groups are made before this clock starts).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// After sending stops, wait at most this many seconds for every message to arrive (then
    /// every member syncs once more, and the views are checked).
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// The target and reporting.
    #[command(flatten)]
    pub common: Common,
}

impl GroupsArgs {
    /// The load as the traffic scenarios take it (`rate` there is over all groups).
    pub fn load(&self) -> Load {
        Load {
            window: self.window,
            rate: self.rate.map(|r| r * self.groups as f64),
            body_bytes: self.body_bytes,
            warmup: self.warmup,
            duration: self.duration,
            drain: self.drain,
        }
    }
}

/// `storm` options.
#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    /// Connections to open and log in.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// The target and reporting.
    #[command(flatten)]
    pub common: Common,
}

/// `idle` options.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Connections to hold.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Seconds to hold them once all are up.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// The target and reporting.
    #[command(flatten)]
    pub common: Common,
}

/// `offline` options.
#[derive(Debug, Clone, Args)]
pub struct OfflineArgs {
    /// Clients: half send, half receive after coming back.
    #[arg(long, default_value_t = 200)]
    pub conns: usize,
    /// Messages each sender sends while its partner is away.
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 64)]
    pub window: u32,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Wait at most this many seconds for each phase.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// The target and reporting.
    #[command(flatten)]
    pub common: Common,
}
