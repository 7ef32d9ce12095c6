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

/// HS256 JWTs with the claims `sub`, `dev`, `exp` (RFC 7519), as the broker verifies them.
mod token {
    use std::time::{SystemTime, UNIX_EPOCH};

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use hmac::{Hmac, KeyInit, Mac};
    use sha2::Sha256;

    const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    pub(crate) fn unix_secs() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    pub(crate) fn mint(secret: &[u8], user: &str, device: &str, exp: u64) -> String {
        let claims = serde_json::json!({ "sub": user, "dev": device, "exp": exp }).to_string();
        sign(secret, HEADER, &claims)
    }

    /// `b64(header).b64(claims).b64(HMAC-SHA256 over the first two)`.
    pub(crate) fn sign(secret: &[u8], header: &str, claims: &str) -> String {
        let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .expect("HMAC takes keys of any length");
        mac.update(input.as_bytes());
        format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn matches_the_jwt_io_example() {
            let t = super::sign(
                b"your-256-bit-secret",
                super::HEADER,
                r#"{"sub":"1234567890","name":"John Doe","iat":1516239022}"#,
            );
            assert!(
                t.ends_with(".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"),
                "{t}"
            );
        }
    }
}

/// Many non-blocking client connections on one mio loop: bytes in, frames out.
mod net {
    use super::*;

    /// What a connection reported.
    #[derive(Debug)]
    pub(crate) enum Ev {
        Frame(pb::Frame),
        /// It closed (EOF, error, bad framing); it is gone from the pool.
        Closed(String),
    }

    #[derive(Debug)]
    struct Conn {
        stream: TcpStream,
        user: usize,
        rbuf: BytesMut,
        wbuf: BytesMut,
        connected: bool,
    }

    #[derive(Debug)]
    pub(crate) struct Net {
        poll: Poll,
        events: Events,
        conns: Vec<Option<Conn>>,
        free: Vec<usize>,
        codec: FrameCodec,
        addr: SocketAddr,
        sources: Vec<IpAddr>,
        next_source: usize,
        scratch: Vec<u8>,
        /// (user, event) since the last `take`.
        pub(crate) out: Vec<(usize, Ev)>,
    }

    impl Net {
        pub(crate) fn new(addr: SocketAddr, sources: u8) -> io::Result<Self> {
            Ok(Net {
                poll: Poll::new()?,
                events: Events::with_capacity(4096),
                conns: Vec::new(),
                free: Vec::new(),
                codec: FrameCodec::default(),
                addr,
                sources: (1..=sources.max(1))
                    .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
                    .collect(),
                next_source: 0,
                scratch: vec![0; 64 * 1024],
                out: Vec::new(),
            })
        }

        /// Starts a connection for `user` with `first` queued; returns its slot.
        pub(crate) fn connect(&mut self, user: usize, first: &pb::Frame) -> io::Result<usize> {
            let socket = Socket::new(
                Domain::IPV4,
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )?;
            socket.set_tcp_nodelay(true)?;
            let src = self.sources[self.next_source % self.sources.len()];
            self.next_source += 1;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            match socket.connect(&self.addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            let mut stream = TcpStream::from_std(socket.into());
            let slot = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            self.poll.registry().register(
                &mut stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            let mut wbuf = BytesMut::new();
            self.codec
                .encode(first, &mut wbuf)
                .map_err(|e| other(e.to_string()))?;
            self.conns[slot] = Some(Conn {
                stream,
                user,
                rbuf: BytesMut::new(),
                wbuf,
                connected: false,
            });
            Ok(slot)
        }

        /// Queues `f` on `slot` and writes what the socket takes.
        pub(crate) fn send(&mut self, slot: usize, f: &pb::Frame) {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if self.codec.encode(f, &mut c.wbuf).is_err() {
                return self.fail(slot, "frame too large to send".to_owned());
            }
            self.flush(slot);
        }

        /// Closes `slot` (no event).
        pub(crate) fn close(&mut self, slot: usize) {
            if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
                let _ = self.poll.registry().deregister(&mut c.stream);
                self.free.push(slot);
            }
        }

        fn fail(&mut self, slot: usize, why: String) {
            if let Some(user) = self
                .conns
                .get(slot)
                .and_then(Option::as_ref)
                .map(|c| c.user)
            {
                self.close(slot);
                self.out.push((user, Ev::Closed(why)));
            }
        }

        fn flush(&mut self, slot: usize) {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if !c.connected {
                return;
            }
            while !c.wbuf.is_empty() {
                match c.stream.write(&c.wbuf) {
                    Ok(n) => {
                        let _ = c.wbuf.split_to(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return self.fail(slot, format!("write: {e}")),
                }
            }
        }

        fn readable(&mut self, slot: usize) {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            let mut why = None;
            loop {
                match c.stream.read(&mut self.scratch) {
                    Ok(0) => {
                        why = Some("closed by the broker".to_owned());
                        break;
                    }
                    Ok(n) => c.rbuf.extend_from_slice(&self.scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        why = Some(format!("read: {e}"));
                        break;
                    }
                }
            }
            loop {
                match self.codec.decode_frame(&mut c.rbuf) {
                    Ok(Some(f)) => self.out.push((c.user, Ev::Frame(f))),
                    Ok(None) => break,
                    Err(e) => {
                        why = Some(format!("bad frame: {e}"));
                        break;
                    }
                }
            }
            if let Some(why) = why {
                self.fail(slot, why);
            }
        }

        fn writable(&mut self, slot: usize) {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if !c.connected {
                match c.stream.take_error() {
                    Ok(None) => {}
                    Ok(Some(e)) | Err(e) => return self.fail(slot, format!("connect: {e}")),
                }
                if c.stream.peer_addr().is_err() {
                    return; // still connecting
                }
                c.connected = true;
            }
            self.flush(slot);
        }

        /// Waits up to `timeout` for socket events and handles them into `out`.
        pub(crate) fn turn(&mut self, timeout: Duration) -> io::Result<()> {
            match self.poll.poll(&mut self.events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
                Err(e) => return Err(e),
            }
            let ready: Vec<(usize, bool, bool)> = self
                .events
                .iter()
                .map(|e| {
                    (
                        e.token().0,
                        e.is_readable() || e.is_read_closed() || e.is_error(),
                        e.is_writable() || e.is_error(),
                    )
                })
                .collect();
            for (slot, r, w) in ready {
                if w {
                    self.writable(slot);
                }
                if r {
                    self.readable(slot);
                }
            }
            Ok(())
        }
    }
}

mod presence {
    use super::net::{Ev, Net};
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Phase {
        /// No connection (before the first, or after an unexpected close).
        Idle,
        /// Connection opened, Login sent.
        LoggingIn,
        /// Logged in, not subscribed yet (initial set-up only).
        LoggedIn,
        /// SUBSCRIBE sent, answer awaited.
        Subscribing,
        Ready,
        /// Flapped: disconnected, or AWAY, until its return.
        Down,
    }

    #[derive(Debug)]
    struct User {
        slot: Option<usize>,
        phase: Phase,
        /// Request id of the SUBSCRIBE awaited.
        rid: u64,
        /// When the reconnect (or SUBSCRIBE) started.
        since: Instant,
    }

    #[derive(Debug, Default, Clone)]
    struct Counts {
        push_frames: u64,
        push_entries: u64,
        errors: u64,
        unexpected_closes: u64,
        flaps: u64,
    }

    struct Bench<'a> {
        o: &'a PresenceOpts,
        secret: Vec<u8>,
        net: Net,
        users: Vec<User>,
        stride: usize,
        next_rid: u64,
        /// A reconnected user subscribes as soon as it is logged in.
        auto_subscribe: bool,
        /// Flapped users coming back: (when, user), in order.
        returns: VecDeque<(Instant, usize)>,
        mode: FlapMode,
        pings_sent: u64,
        ping_epoch: Instant,
        counts: Counts,
        /// Pushed entries naming each user.
        pushed_about: Vec<u32>,
        /// Reconnect (connect, login, subscribe answered) times, µs.
        reconnect_us: Vec<u64>,
        /// SUBSCRIBE answers still awaited, in the initial set-up.
        pending: usize,
        printed: u32,
    }

    /// Broker CPU time in seconds: (user, system).
    fn cpu_secs(pid: u32) -> io::Result<(f64, f64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| other("odd /proc stat"))?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the command: field 3 (state) is f[0], utime (14) f[11], stime (15) f[12].
        let ticks = |i: usize| -> io::Result<f64> {
            f.get(i)
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| other("odd /proc stat"))
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok((ticks(11)? / hz, ticks(12)? / hz))
    }

    fn name(i: usize) -> String {
        format!("u{i:05}")
    }

    fn index(name: &str) -> Option<usize> {
        name.strip_prefix('u')?.parse().ok()
    }

    /// The contacts of user `i`: `i + k*stride` for k in 1..=c (distinct when c*stride < n).
    fn contacts(i: usize, n: usize, c: usize, stride: usize) -> impl Iterator<Item = usize> {
        (1..=c).map(move |k| (i + k * stride) % n)
    }

    /// `k` users none of whom watches another (so their returns cause no catch-up pushes).
    fn independent(n: usize, c: usize, stride: usize, k: usize) -> Vec<usize> {
        let mut chosen: Vec<usize> = Vec::new();
        let mut i = 0;
        while chosen.len() < k && i < n {
            let clash = chosen.iter().any(|&j| {
                contacts(i, n, c, stride).any(|x| x == j)
                    || contacts(j, n, c, stride).any(|x| x == i)
            });
            if !clash {
                chosen.push(i);
            }
            i += 37;
        }
        chosen
    }

    impl Bench<'_> {
        fn rid(&mut self) -> u64 {
            self.next_rid += 1;
            self.next_rid
        }

        fn subscribe(&mut self, u: usize) {
            let Some(slot) = self.users[u].slot else {
                return;
            };
            let rid = self.rid();
            let list = contacts(u, self.o.users, self.o.contacts, self.stride)
                .map(name)
                .collect();
            self.net.send(
                slot,
                &frame(
                    rid,
                    Body::PresenceRequest(pb::PresenceRequest {
                        action: pb::PresenceAction::Subscribe as i32,
                        users: list,
                        ..Default::default()
                    }),
                ),
            );
            self.users[u].rid = rid;
            self.users[u].phase = Phase::Subscribing;
        }

        fn set(&mut self, u: usize, status: pb::PresenceStatus) {
            let Some(slot) = self.users[u].slot else {
                return;
            };
            let rid = self.rid();
            self.net.send(
                slot,
                &frame(
                    rid,
                    Body::PresenceRequest(pb::PresenceRequest {
                        action: pb::PresenceAction::Set as i32,
                        status: status as i32,
                        ..Default::default()
                    }),
                ),
            );
        }

        fn connect(&mut self, u: usize) -> io::Result<()> {
            let f = login(&self.secret, &name(u));
            let slot = self.net.connect(u, &f)?;
            let user = &mut self.users[u];
            user.slot = Some(slot);
            user.phase = Phase::LoggingIn;
            user.since = Instant::now();
            Ok(())
        }

        fn flap(&mut self, u: usize, down: Duration) {
            let now = Instant::now();
            match self.mode {
                FlapMode::Reconnect => {
                    if let Some(slot) = self.users[u].slot.take() {
                        self.net.close(slot);
                    }
                }
                FlapMode::Away => self.set(u, pb::PresenceStatus::Away),
            }
            self.users[u].phase = Phase::Down;
            self.returns.push_back((now + down, u));
            self.counts.flaps += 1;
        }

        fn come_back(&mut self, u: usize) -> io::Result<()> {
            match self.mode {
                FlapMode::Reconnect => self.connect(u),
                FlapMode::Away => {
                    self.set(u, pb::PresenceStatus::Online);
                    self.users[u].phase = Phase::Ready;
                    Ok(())
                }
            }
        }

        fn note(&mut self, what: String) {
            if self.printed < 10 {
                eprintln!("imload: {what}");
                self.printed += 1;
            }
        }

        fn on_frame(&mut self, u: usize, f: pb::Frame) {
            let rid = f.request_id;
            match f.body {
                Some(Body::LoginResult(_)) if self.users[u].phase == Phase::LoggingIn => {
                    if self.auto_subscribe {
                        self.subscribe(u);
                    } else {
                        self.users[u].phase = Phase::LoggedIn;
                    }
                }
                Some(Body::PresenceUpdate(p)) if rid == 0 => {
                    self.counts.push_frames += 1;
                    self.counts.push_entries += p.users.len() as u64;
                    for e in &p.users {
                        if let Some(i) = index(&e.user).filter(|&i| i < self.pushed_about.len()) {
                            self.pushed_about[i] += 1;
                        }
                    }
                }
                Some(Body::PresenceUpdate(p)) => {
                    let user = &mut self.users[u];
                    if user.phase == Phase::Subscribing && rid == user.rid && !p.more {
                        user.phase = Phase::Ready;
                        let us = user.since.elapsed().as_micros() as u64;
                        if self.auto_subscribe {
                            self.reconnect_us.push(us);
                        } else {
                            self.pending = self.pending.saturating_sub(1);
                        }
                    }
                }
                Some(Body::Ping(p)) => {
                    if let Some(slot) = self.users[u].slot {
                        let pong = Body::Pong(pb::Pong {
                            nonce: p.nonce,
                            time: 0,
                        });
                        self.net.send(slot, &frame(rid, pong));
                    }
                }
                Some(Body::Error(e)) => {
                    self.counts.errors += 1;
                    self.note(format!("error for {}: {e:?}", name(u)));
                }
                _ => {}
            }
        }

        /// One turn: due returns, pings, socket events (waiting at most `wait`).
        fn pump(&mut self, wait: Duration) -> io::Result<()> {
            let now = Instant::now();
            while let Some(&(at, u)) = self.returns.front() {
                if at > now {
                    break;
                }
                self.returns.pop_front();
                self.come_back(u)?;
            }
            // Every connection pings once per `ping_ms`, spread evenly.
            let n = self.o.users as u64;
            let due = now.duration_since(self.ping_epoch).as_millis() as u64 * n / self.o.ping_ms;
            while self.pings_sent < due {
                let u = (self.pings_sent % n) as usize;
                self.pings_sent += 1;
                if let (Some(slot), Phase::Ready | Phase::Down) =
                    (self.users[u].slot, self.users[u].phase)
                {
                    let ping = Body::Ping(pb::Ping {
                        nonce: self.pings_sent,
                    });
                    self.net.send(slot, &frame(0, ping));
                }
            }
            let wait = match self.returns.front() {
                Some(&(at, _)) => wait.min(at.saturating_duration_since(now)),
                None => wait,
            };
            self.net.turn(wait)?;
            for (u, ev) in std::mem::take(&mut self.net.out) {
                match ev {
                    Ev::Frame(f) => self.on_frame(u, f),
                    Ev::Closed(why) => {
                        self.counts.unexpected_closes += 1;
                        self.note(format!("{} closed: {why}", name(u)));
                        let user = &mut self.users[u];
                        user.slot = None;
                        if user.phase == Phase::Subscribing || user.phase == Phase::LoggingIn {
                            self.pending = self.pending.saturating_sub(1);
                        }
                        // Comes back a second later, as a client would.
                        user.phase = Phase::Down;
                        self.returns
                            .push_back((Instant::now() + Duration::from_secs(1), u));
                    }
                }
            }
            Ok(())
        }

        fn pump_for(&mut self, d: Duration) -> io::Result<()> {
            let end = Instant::now() + d;
            while Instant::now() < end {
                self.pump(
                    end.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(5)),
                )?;
            }
            Ok(())
        }

        fn count(&self, p: Phase) -> usize {
            self.users.iter().filter(|u| u.phase == p).count()
        }

        /// Waits (bounded) until every user is Ready again.
        fn settle(&mut self, extra: Duration) -> io::Result<()> {
            let end = Instant::now() + Duration::from_secs(60);
            while (self.count(Phase::Ready) < self.o.users || !self.returns.is_empty())
                && Instant::now() < end
            {
                self.pump(Duration::from_millis(5))?;
            }
            self.pump_for(extra)
        }

        /// Runs a phase of `phase_secs`, flapping (`down` Some) or idle, lets it settle, and
        /// prints its RESULT line: rates over the phase, pushes per flap including the settling.
        fn phase(&mut self, label: &str, down: Option<Duration>) -> io::Result<()> {
            let o = self.o;
            self.counts = Counts::default();
            self.reconnect_us.clear();
            let mut order: Vec<usize> = (0..o.users).collect();
            shuffle(&mut order, 0x9e37_79b9_7f4a_7c15 ^ label.len() as u64);
            let mut cursor = 0;
            let interval = Duration::from_secs_f64(1.0 / (o.flap_rate * o.users as f64));
            let cpu0 = cpu_secs(o.broker_pid)?;
            let t0 = Instant::now();
            let end = t0 + Duration::from_secs(o.phase_secs);
            let mut next = t0;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if let Some(down) = down {
                    while next <= now {
                        next += interval;
                        // The next user in a shuffled order that is connected and settled.
                        for _ in 0..o.users {
                            let u = order[cursor % o.users];
                            cursor += 1;
                            if self.users[u].phase == Phase::Ready {
                                self.flap(u, down);
                                break;
                            }
                        }
                    }
                }
                let wait = if down.is_some() { next } else { end }.min(end);
                self.pump(
                    wait.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(10)),
                )?;
            }
            let elapsed = t0.elapsed().as_secs_f64();
            let cpu1 = cpu_secs(o.broker_pid)?;
            let (user, sys) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
            let c = self.counts.clone();
            // The last flaps' pushes come after the phase: count them for the per-flap figure.
            self.settle(Duration::from_millis(2 * o.coalesce_ms + 500))?;
            let all_entries = self.counts.push_entries;
            let mut lat = std::mem::take(&mut self.reconnect_us);
            lat.sort_unstable();
            let per_flap = if c.flaps == 0 {
                0.0
            } else {
                all_entries as f64 / (c.flaps as f64 * o.contacts as f64)
            };
            println!(
                "RESULT presence phase={label} secs={elapsed:.1} cpu_pct={:.2} user_pct={:.2} sys_pct={:.2} flaps_per_s={:.1} \
                 push_frames_per_s={:.0} push_entries_per_s={:.0} entries_per_flap_per_watcher={per_flap:.3} \
                 reconnect_p50_ms={:.2} reconnect_p99_ms={:.2} errors={} unexpected_closes={}",
                100.0 * (user + sys) / elapsed,
                100.0 * user / elapsed,
                100.0 * sys / elapsed,
                c.flaps as f64 / elapsed,
                c.push_frames as f64 / elapsed,
                c.push_entries as f64 / elapsed,
                quantile(&lat, 0.5) as f64 / 1000.0,
                quantile(&lat, 0.99) as f64 / 1000.0,
                c.errors,
                c.unexpected_closes,
            );
            Ok(())
        }

        /// Drops `users` at once, brings them back after `down`, and counts the pushes naming
        /// them until two windows after their return.
        fn check(&mut self, users: &[usize], down: Duration) -> io::Result<()> {
            self.mode = FlapMode::Reconnect;
            for &u in users {
                self.pushed_about[u] = 0;
            }
            let frames0 = self.counts.push_frames;
            for &u in users {
                self.flap(u, down);
            }
            let coalesce = Duration::from_millis(self.o.coalesce_ms);
            self.pump_for(down + 2 * coalesce + Duration::from_millis(700))?;
            self.settle(Duration::ZERO)?;
            let entries: u64 = users.iter().map(|&u| u64::from(self.pushed_about[u])).sum();
            let watchers = self.o.contacts as u64 * users.len() as u64;
            let expect = if down.as_millis() < u128::from(self.o.coalesce_ms) {
                0
            } else {
                2 * watchers
            };
            println!(
                "RESULT presence phase=coalesce-{} users={} watchers={watchers} push_entries={entries} \
                 push_frames={} expected_entries={expect}",
                down.as_millis(),
                users.len(),
                self.counts.push_frames - frames0,
            );
            Ok(())
        }
    }

    /// A fixed-seed Fisher-Yates shuffle (xorshift64*).
    fn shuffle(v: &mut [usize], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            let r = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
            v.swap(i, (r % (i as u64 + 1)) as usize);
        }
    }

    pub(crate) fn run(o: &PresenceOpts) -> io::Result<()> {
        let stride = o.users / (o.contacts + 1);
        if stride == 0 || o.contacts * stride >= o.users {
            return Err(other("need users > contacts"));
        }
        let now = Instant::now();
        let mut b = Bench {
            o,
            secret: read_secret(&o.common)?,
            net: Net::new(o.common.addr, o.sources)?,
            users: (0..o.users)
                .map(|_| User {
                    slot: None,
                    phase: Phase::Idle,
                    rid: 0,
                    since: now,
                })
                .collect(),
            stride,
            next_rid: 1,
            auto_subscribe: false,
            returns: VecDeque::new(),
            mode: FlapMode::Reconnect,
            pings_sent: 0,
            ping_epoch: now,
            counts: Counts::default(),
            pushed_about: vec![0; o.users],
            reconnect_us: Vec::new(),
            pending: 0,
            printed: 0,
        };
        // Set-up: everyone connects and logs in (at most 500 under way), then subscribes.
        let t = Instant::now();
        for u in 0..o.users {
            while b.count(Phase::LoggingIn) >= 500 {
                b.pump(Duration::from_millis(5))?;
            }
            b.connect(u)?;
        }
        let limit = Instant::now() + Duration::from_secs(120);
        while b.count(Phase::LoggedIn) < o.users && Instant::now() < limit {
            b.pump(Duration::from_millis(5))?;
        }
        let logged_in = b.count(Phase::LoggedIn);
        let login_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for u in 0..o.users {
            while b.pending >= 1000 {
                b.pump(Duration::from_millis(5))?;
            }
            if b.users[u].phase == Phase::LoggedIn {
                b.users[u].since = Instant::now();
                b.pending += 1;
                b.subscribe(u);
            }
        }
        let limit = Instant::now() + Duration::from_secs(120);
        while b.pending > 0 && Instant::now() < limit {
            b.pump(Duration::from_millis(5))?;
        }
        println!(
            "RESULT presence phase=setup users={} logged_in={logged_in} login_secs={login_secs:.2} \
             subscriptions={} subscribe_secs={:.2} ready={}",
            o.users,
            o.users * o.contacts,
            t.elapsed().as_secs_f64(),
            b.count(Phase::Ready),
        );
        if b.count(Phase::Ready) < o.users {
            return Err(other("not every user got ready"));
        }
        b.auto_subscribe = true;
        let coalesce = Duration::from_millis(o.coalesce_ms);
        b.settle(2 * coalesce)?;
        b.phase("idle", None)?;
        for spec in &o.flaps {
            let (mode, ms) = spec
                .split_once(':')
                .ok_or_else(|| other(format!("bad --flaps entry {spec}")))?;
            b.mode = FlapMode::from_str(mode, true).map_err(other)?;
            let ms: u64 = ms
                .parse()
                .map_err(|_| other(format!("bad --flaps entry {spec}")))?;
            b.phase(
                &format!("flap-{mode}-{ms}"),
                Some(Duration::from_millis(ms)),
            )?;
        }
        let chosen = independent(o.users, o.contacts, stride, o.check_users);
        b.check(&chosen, Duration::from_millis(200))?;
        b.settle(2 * coalesce)?;
        b.check(&chosen, coalesce + Duration::from_millis(500))?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn contacts_are_distinct_and_each_user_has_as_many_watchers() {
            let (n, c) = (1000, 9);
            let stride = n / (c + 1);
            let mut watchers = vec![0; n];
            for i in 0..n {
                let mut cs: Vec<usize> = contacts(i, n, c, stride).collect();
                cs.sort_unstable();
                cs.dedup();
                assert_eq!(cs.len(), c);
                assert!(!cs.contains(&i));
                for x in cs {
                    watchers[x] += 1;
                }
            }
            assert!(watchers.iter().all(|&w| w == c));
        }

        #[test]
        fn independent_users_do_not_watch_each_other() {
            let (n, c) = (10_000, 100);
            let stride = n / (c + 1);
            let s = independent(n, c, stride, 50);
            assert_eq!(s.len(), 50);
            for &i in &s {
                assert!(contacts(i, n, c, stride).all(|x| !s.contains(&x)));
            }
        }
    }
}

mod convlist {
    use super::*;

    /// One blocking connection, for request/response timing.
    struct Client {
        s: StdStream,
        rbuf: BytesMut,
        codec: FrameCodec,
        scratch: Vec<u8>,
    }

    impl Client {
        fn login(addr: SocketAddr, secret: &[u8], user: &str) -> io::Result<Self> {
            let s = StdStream::connect(addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut c = Client {
                s,
                rbuf: BytesMut::new(),
                codec: FrameCodec::default(),
                scratch: vec![0; 128 * 1024],
            };
            match c.call(&login(secret, user))?.0.body {
                Some(Body::LoginResult(_)) => Ok(c),
                other_body => Err(other(format!("login of {user}: {other_body:?}"))),
            }
        }

        fn send(&mut self, f: &pb::Frame) -> io::Result<()> {
            let mut out = BytesMut::new();
            self.codec
                .encode(f, &mut out)
                .map_err(|e| other(e.to_string()))?;
            self.s.write_all(&out)
        }

        /// The next frame, and when the read that completed it returned.
        fn recv(&mut self) -> io::Result<(pb::Frame, Instant, usize)> {
            let mut at = Instant::now();
            loop {
                let before = self.rbuf.len();
                if let Some(f) = self
                    .codec
                    .decode_frame(&mut self.rbuf)
                    .map_err(|e| other(e.to_string()))?
                {
                    return Ok((f, at, before - self.rbuf.len()));
                }
                let n = self.s.read(&mut self.scratch)?;
                at = Instant::now();
                if n == 0 {
                    return Err(other("closed by the broker"));
                }
                self.rbuf.extend_from_slice(&self.scratch[..n]);
            }
        }

        /// Sends `f` and waits for the frame with its request id (others are skipped): the
        /// answer, the round trip, and the answer's size in bytes.
        fn call(&mut self, f: &pb::Frame) -> io::Result<(pb::Frame, Duration, usize)> {
            let t = Instant::now();
            self.send(f)?;
            loop {
                let (a, at, len) = self.recv()?;
                if a.request_id == f.request_id {
                    return Ok((a, at.duration_since(t), len));
                }
            }
        }
    }

    fn fill(o: &ConvOpts, secret: &[u8]) -> io::Result<()> {
        let t = Instant::now();
        let body = vec![b'x'; o.body_bytes];
        for s in 0..o.senders {
            let mut c = Client::login(o.common.addr, secret, &format!("s{s:04}"))?;
            let send = Body::Send(pb::Send {
                to: Some(pb::Conversation {
                    r#type: pb::ConversationType::Direct as i32,
                    id: "owner".to_owned(),
                }),
                client_msg_id: 1,
                content_type: 1,
                body: body.clone().into(),
                ..Default::default()
            });
            match c.call(&frame(7, send))?.0.body {
                Some(Body::SendAck(_)) => {}
                b => return Err(other(format!("send of s{s:04}: {b:?}"))),
            }
        }
        println!(
            "RESULT convlist phase=fill senders={} secs={:.2}",
            o.senders,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn list(limit: u32, rid: u64) -> pb::Frame {
        frame(
            rid,
            Body::ConversationListRequest(pb::ConversationListRequest {
                limit,
                ..Default::default()
            }),
        )
    }

    fn measure(o: &ConvOpts, secret: &[u8]) -> io::Result<()> {
        let mut c = Client::login(o.common.addr, secret, "owner")?;
        let mut rid = 100;
        let mut shape = Vec::new();
        for &limit in &o.limits {
            rid += 1;
            let (a, rtt, bytes) = c.call(&list(limit, rid))?;
            let Some(Body::ConversationList(l)) = a.body else {
                return Err(other(format!("list answer: {a:?}")));
            };
            let filled = l
                .conversations
                .iter()
                .filter(|s| s.last_message.is_some())
                .count();
            println!(
                "RESULT convlist label={} phase=first-{limit} rtt_us={} entries={} with_last_message={filled} more={} bytes={bytes}",
                o.label,
                rtt.as_micros(),
                l.conversations.len(),
                l.more,
            );
            shape.push((l.conversations.len(), bytes));
        }
        let mut ping = Vec::with_capacity(o.requests);
        let mut lists: Vec<Vec<u64>> = vec![Vec::with_capacity(o.requests); o.limits.len()];
        for i in 0..o.requests {
            rid += 1;
            let (a, rtt, _) = c.call(&frame(rid, Body::Ping(pb::Ping { nonce: i as u64 })))?;
            if !matches!(a.body, Some(Body::Pong(_))) {
                return Err(other(format!("ping answer: {a:?}")));
            }
            ping.push(rtt.as_micros() as u64);
            for (k, &limit) in o.limits.iter().enumerate() {
                rid += 1;
                let (a, rtt, _) = c.call(&list(limit, rid))?;
                if !matches!(a.body, Some(Body::ConversationList(_))) {
                    return Err(other(format!("list answer: {a:?}")));
                }
                lists[k].push(rtt.as_micros() as u64);
            }
        }
        ping.sort_unstable();
        let (p50, p99) = (quantile(&ping, 0.5), quantile(&ping, 0.99));
        println!(
            "RESULT convlist label={} phase=ping n={} p50_us={p50} p99_us={p99}",
            o.label, o.requests
        );
        for (k, &limit) in o.limits.iter().enumerate() {
            let v = &mut lists[k];
            v.sort_unstable();
            let (m, p) = (quantile(v, 0.5), quantile(v, 0.99));
            println!(
                "RESULT convlist label={} phase=list-{limit} n={} entries={} bytes={} p50_us={m} p99_us={p} server_p50_us={} server_p99_us={}",
                o.label,
                o.requests,
                shape[k].0,
                shape[k].1,
                m.saturating_sub(p50),
                p.saturating_sub(p50),
            );
        }
        Ok(())
    }

    pub(crate) fn run(o: &ConvOpts) -> io::Result<()> {
        let secret = read_secret(&o.common)?;
        if o.phase != ConvPhase::Measure {
            fill(o, &secret)?;
        }
        if o.phase != ConvPhase::Fill {
            measure(o, &secret)?;
        }
        Ok(())
    }
}
