//! `imload`: end-to-end measurements of presence and the conversation list (issue 8) against a
//! running broker over raw TCP. `bench/im.sh` starts the broker and runs it; see RESULTS.md.
//!
//! * `presence`: N users, one connection each, every one subscribed to C contacts (the same user
//!   set, so each user has C watchers). After an idle baseline, a fraction of the users flaps
//!   every second (its connection closes and reconnects after `down` ms and subscribes again,
//!   or it sets AWAY and back to ONLINE); the broker's CPU time over each phase comes from
//!   `/proc/<broker-pid>/stat`. Then a coalescing check: K users drop at once and come back
//!   after a short and after a long gap, and the pushes naming them are counted.
//! * `convlist`: 1,000 senders each send one message to one user (`--phase fill`), who then asks
//!   for the first page of its conversation list (`--phase measure`), timed at the client
//!   against a `Ping` round trip.
//! * `routes`: the cluster's presence index (issue 10): a login on node A seen from node B, and
//!   logins under load with the Redis calls they cost (`bench/cluster.sh`).
//!
//! Every figure is printed on a line starting `RESULT` (`key=value` pairs) for the script.
//! Tokens are minted from the broker's secret (the trimmed text of `<data-dir>/secret`).

use std::collections::VecDeque;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream as StdStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Args, Parser, Subcommand, ValueEnum};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_proto::tcp::FrameCodec;
use socket2::{Domain, Protocol, Socket, Type};

/// End-to-end IM benchmarks (presence at scale, conversation list) against a running broker.
#[derive(Debug, Parser)]
#[command(name = "imload")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A scenario.
#[derive(Debug, Subcommand)]
enum Command {
    /// Presence subscriptions, flapping users, coalescing.
    Presence(PresenceOpts),
    /// The first page of a conversation list of 1,000 direct conversations.
    Convlist(ConvOpts),
    /// The cluster's presence index: a login seen from another node, logins under load.
    Routes(routes::RoutesOpts),
}

/// Where the broker is and how to log in.
#[derive(Debug, Args)]
struct Common {
    /// The broker's TCP address.
    #[arg(long, default_value = "127.0.0.1:17600")]
    addr: SocketAddr,
    /// The broker's data directory (its `secret` file signs the tokens).
    #[arg(long)]
    data_dir: PathBuf,
    /// Give up (exit 2) after this many seconds, whatever happens.
    #[arg(long, default_value_t = 900)]
    deadline_secs: u64,
}

/// How a user flaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FlapMode {
    /// Its only connection closes; a new one connects, logs in and subscribes again.
    Reconnect,
    /// `SET AWAY`, then `SET ONLINE` on the same connection.
    Away,
}

#[derive(Debug, Args)]
struct PresenceOpts {
    #[command(flatten)]
    common: Common,
    /// The broker process, whose CPU time is read from /proc.
    #[arg(long)]
    broker_pid: u32,
    /// Users (one connection each).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Contacts each user subscribes to (so each user also has this many watchers).
    #[arg(long, default_value_t = 100)]
    contacts: usize,
    /// Source addresses 127.0.1.1 .. 127.0.1.N to connect from.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Fraction of the users that flaps per second.
    #[arg(long, default_value_t = 0.01)]
    flap_rate: f64,
    /// Length of the idle baseline and of each flapping phase, seconds.
    #[arg(long, default_value_t = 30)]
    phase_secs: u64,
    /// Flapping phases to run, each `MODE:DOWN_MS` (how long a flapping user stays away).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "reconnect:200,reconnect:1500,away:1500"
    )]
    flaps: Vec<String>,
    /// The broker's `presence.coalesce_ms` (for the settling waits and the check).
    #[arg(long, default_value_t = 1000)]
    coalesce_ms: u64,
    /// Users dropped at once in the coalescing check (none of them watches another).
    #[arg(long, default_value_t = 50)]
    check_users: usize,
    /// Each connection sends a Ping this often (the broker closes silent connections).
    #[arg(long, default_value_t = 20_000)]
    ping_ms: u64,
}

/// What `convlist` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ConvPhase {
    /// Only the senders' messages.
    Fill,
    /// Only the timed requests.
    Measure,
    /// Both.
    Both,
}

#[derive(Debug, Args)]
struct ConvOpts {
    #[command(flatten)]
    common: Common,
    /// Fill, measure, or both.
    #[arg(long, value_enum, default_value = "both")]
    phase: ConvPhase,
    /// Senders, each starting one direct conversation with the owner.
    #[arg(long, default_value_t = 1000)]
    senders: usize,
    /// Body bytes of each message.
    #[arg(long, default_value_t = 32)]
    body_bytes: usize,
    /// Page sizes asked for; the first request of each comes first, in this order, untimed by
    /// the loop (after a restart it is the one that reads the newest messages from the log).
    #[arg(long, value_delimiter = ',', default_value = "50,500")]
    limits: Vec<u32>,
    /// Timed requests of each kind (ping and each limit, interleaved).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Label printed with the results (e.g. `warm`, `restart`).
    #[arg(long, default_value = "warm")]
    label: String,
}

fn main() {
    let cli = Cli::parse();
    let deadline = match &cli.command {
        Command::Presence(o) => o.common.deadline_secs,
        Command::Convlist(o) => o.common.deadline_secs,
        Command::Routes(o) => o.common.deadline_secs,
    };
    // Time-bounded whatever the broker does.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(deadline));
        eprintln!("imload: deadline of {deadline} s passed, giving up");
        std::process::exit(2);
    });
    let r = match cli.command {
        Command::Presence(o) => presence::run(&o),
        Command::Convlist(o) => convlist::run(&o),
        Command::Routes(o) => routes::run(&o),
    };
    if let Err(e) = r {
        eprintln!("imload: {e}");
        std::process::exit(1);
    }
}

/// The HS256 token secret of the broker in `data_dir`.
fn read_secret(common: &Common) -> io::Result<Vec<u8>> {
    let text = std::fs::read_to_string(common.data_dir.join("secret"))?;
    Ok(text.trim().as_bytes().to_vec())
}

/// The `Login` frame for `user` on device `d`.
fn login(secret: &[u8], user: &str) -> pb::Frame {
    frame(
        1,
        Body::Login(pb::Login {
            protocol_version: parley_proto::PROTOCOL_VERSION,
            token: token::mint(secret, user, "d", token::unix_secs() + 6 * 3600),
            client_name: "imload".to_owned(),
        }),
    )
}

fn frame(request_id: u64, body: Body) -> pb::Frame {
    pb::Frame {
        request_id,
        body: Some(body),
    }
}

fn other(what: impl Into<String>) -> io::Error {
    io::Error::other(what.into())
}

/// The value at quantile `q` (0..=1) of sorted `v` (nearest rank).
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

mod token;

mod net;

mod presence;

mod convlist;

mod routes;
