//! Tools for the abuse suite (`tests/abuse.rs`): raw sockets that misbehave on purpose (partial
//! frames, garbage, floods, thousands of anonymous connections, hand-written HTTP upgrades), and
//! a [`HealthyPair`] of ordinary clients that keeps talking beside the abuse and measures how long
//! each of its messages takes from send to delivery.
//!
//! Like the rest of the harness, nothing here uses broker code: frames are built with
//! `parley-proto`, everything else is bytes on sockets. Every read and write is bounded by a
//! timeout.

use std::io::{self, ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_proto::tcp::FrameCodec;
use socket2::{Domain, Socket, Type};

use crate::client::code_name;
use crate::transport::{Incoming, Tcp, Transport};
use crate::{Broker, Client, PROTOCOL_VERSION, TIMEOUT, assert_seqs, direct};

// -------------------------------------------------------------------------------------------
// Raw connections
// -------------------------------------------------------------------------------------------

/// `127.0.0.<last>`: loopback addresses other than 127.0.0.1, to connect from several sources.
pub fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A blocking TCP connection to `addr` (from `source`, if given: bound before connecting), with
/// `TCP_NODELAY` and read and write timeouts of [`TIMEOUT`].
pub fn connect_raw(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    connect_raw_with(addr, source, None, TIMEOUT)
}

/// [`connect_raw`] with a receive buffer of `recv_buffer` bytes (set before connecting, so the
/// kernel does not grow the window past it) and a bound on the connect itself.
pub fn connect_raw_with(
    addr: SocketAddr,
    source: Option<IpAddr>,
    recv_buffer: Option<usize>,
    connect_timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(ip) = source {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    if let Some(bytes) = recv_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    socket.connect_timeout(&addr.into(), connect_timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// The bytes of `frame` as it travels over TCP: its length as a varint, then the frame.
pub fn tcp_bytes(frame: &pb::Frame) -> Vec<u8> {
    let mut out = BytesMut::new();
    FrameCodec::new(usize::MAX)
        .encode(frame, &mut out)
        .expect("a test frame encodes");
    out.to_vec()
}

/// A `Login` frame with `token`.
pub fn login_frame(request_id: u64, token: &str) -> pb::Frame {
    pb::Frame {
        request_id,
        body: Some(Body::Login(pb::Login {
            protocol_version: PROTOCOL_VERSION,
            token: token.to_owned(),
            client_name: "parley-abuse".into(),
        })),
    }
}

/// A protobuf varint, as the TCP length prefix is written.
pub fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// How the broker answered a `Login` (or anything else awaited on a raw connection).
#[derive(Debug)]
pub enum Answer {
    /// A `LoginResult`.
    LoggedIn(pb::LoginResult),
    /// An `Error` frame.
    Refused(pb::Error),
    /// Another frame.
    Other(pb::Frame),
    /// The connection ended without a frame (why).
    Closed(String),
    /// Nothing came before the deadline.
    TimedOut,
    /// Bytes that are not a frame.
    Garbage(String),
}

/// Reads the next frame of `conn`, waiting until `deadline`, but always looking at the socket at
/// least once for `grace` (so a deadline that has passed still finds what already arrived).
pub fn read_answer(conn: &mut Tcp, deadline: Instant, grace: Duration) -> Answer {
    let deadline = deadline.max(Instant::now() + grace);
    match conn.read_frame(deadline) {
        Incoming::Frame(frame) => match frame.body {
            Some(Body::LoginResult(result)) => Answer::LoggedIn(result),
            Some(Body::Error(error)) => Answer::Refused(error),
            _ => Answer::Other(frame),
        },
        Incoming::Closed(why) => Answer::Closed(why),
        Incoming::TimedOut => Answer::TimedOut,
        Incoming::Garbage(e) => Answer::Garbage(e),
    }
}

/// Logs in on a raw connection: writes a `Login` with `token` and returns the answer (within
/// [`TIMEOUT`]).
pub fn raw_login(conn: &mut Tcp, token: &str) -> Answer {
    if let Err(e) = conn.write_frame(&login_frame(1, token)) {
        return Answer::Closed(format!("cannot write the Login: {e}"));
    }
    read_answer(conn, Instant::now() + TIMEOUT, Duration::ZERO)
}

/// Reads until the connection ends (EOF or reset) or `deadline`; returns whether it ended and
/// the frames that came meanwhile (described).
pub fn await_end(conn: &mut Tcp, deadline: Instant) -> (bool, Vec<String>) {
    let mut seen = Vec::new();
    loop {
        match read_answer(conn, deadline, Duration::from_millis(50)) {
            Answer::Closed(_) => return (true, seen),
            Answer::TimedOut => return (false, seen),
            Answer::Garbage(e) => {
                seen.push(format!("garbage: {e}"));
                return (false, seen);
            }
            other => seen.push(describe_answer(&other)),
        }
    }
}

/// A short description of an answer, for messages.
pub fn describe_answer(answer: &Answer) -> String {
    match answer {
        Answer::LoggedIn(r) => format!("LoginResult({}/{})", r.user, r.device),
        Answer::Refused(e) => format!(
            "Error({}{}, {:?})",
            code_name(e.code),
            if e.fatal { ", fatal" } else { "" },
            e.message
        ),
        Answer::Other(f) => parley_proto::frame::body_name(f).to_owned(),
        Answer::Closed(why) => format!("closed ({why})"),
        Answer::TimedOut => "nothing".into(),
        Answer::Garbage(e) => format!("garbage ({e})"),
    }
}

/// Whether `error` is the fatal `TOO_MANY_CONNECTIONS` refusal.
pub fn is_too_many_connections(error: &pb::Error) -> bool {
    error.code == pb::ErrorCode::TooManyConnections as i32 && error.fatal
}

/// Whether the peer of `stream` has closed it (EOF or reset) without us reading anything that
/// was sent: a non-blocking peek. `Some(false)`: open and silent; `None`: data is waiting.
pub fn peer_closed(stream: &TcpStream) -> Option<bool> {
    let mut byte = [0u8; 1];
    stream
        .set_nonblocking(true)
        .expect("set a socket non-blocking");
    let result = match stream.peek(&mut byte) {
        Ok(0) => Some(true),
        Ok(_) => None,
        Err(e) if e.kind() == ErrorKind::WouldBlock => Some(false),
        Err(_) => Some(true),
    };
    stream
        .set_nonblocking(false)
        .expect("set a socket blocking again");
    result
}

// -------------------------------------------------------------------------------------------
// Garbage
// -------------------------------------------------------------------------------------------

/// A small deterministic pseudo-random generator (xorshift64*), so abuse is reproducible without
/// another dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.fill(&mut buf);
        buf
    }
}

/// One malformed TCP frame: a valid length prefix, then bytes that are no protobuf `Frame` (the
/// first is the tag of field 1 with wire type 7, which does not exist; the rest is random).
pub fn junk_frame(rng: &mut Rng) -> Vec<u8> {
    let len = 4 + rng.below(28) as usize;
    let mut frame = Vec::with_capacity(len + 1);
    frame.push(u8::try_from(len).expect("a junk frame is shorter than 128 bytes"));
    frame.push(0x0f);
    frame.extend(rng.bytes(len - 1));
    frame
}

/// `count` malformed frames back to back (see [`junk_frame`]).
pub fn junk_frames(rng: &mut Rng, count: usize) -> Vec<u8> {
    (0..count).flat_map(|_| junk_frame(rng)).collect()
}

// -------------------------------------------------------------------------------------------
// WebSocket upgrades by hand
// -------------------------------------------------------------------------------------------

/// A WebSocket upgrade request for `addr`, with `extra` header lines (each ending in `\r\n`)
/// before the blank line.
pub fn ws_upgrade_request(addr: SocketAddr, extra: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Reads the HTTP status line the broker answered on `stream` (within `timeout`), e.g.
/// `HTTP/1.1 403 Forbidden`; `Err` says why there was none.
pub fn http_status_line(stream: &mut TcpStream, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = got.windows(2).position(|w| w == b"\r\n") {
            return Ok(String::from_utf8_lossy(&got[..end]).into_owned());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no status line within {timeout:?} (got {:?})",
                String::from_utf8_lossy(&got)
            ));
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "EOF before a status line (got {:?})",
                    String::from_utf8_lossy(&got)
                ));
            }
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "read error {e} before a status line (got {:?})",
                    String::from_utf8_lossy(&got)
                ));
            }
        }
    }
}

/// The status code of an HTTP status line (`HTTP/1.1 431 ...` -> 431).
pub fn http_status(line: &str) -> Option<u16> {
    let mut words = line.split_whitespace();
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

// -------------------------------------------------------------------------------------------
// Process figures
// -------------------------------------------------------------------------------------------

/// CPU time (user + system) the process `pid` used so far, from `/proc/PID/stat` (in the
/// kernel's clock ticks of 1/100 s, as Linux reports them to user space).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("unexpected /proc/{pid}/stat: {stat}"));
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (1-based overall).
    let ticks = |index: usize| -> u64 {
        fields
            .get(index - 3)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("no field {index} in /proc/{pid}/stat: {stat}"))
    };
    Duration::from_millis((ticks(14) + ticks(15)) * 10)
}

/// Samples the broker's RSS while `during` runs (every 50 ms, in a helper thread) and returns
/// what `during` returned and the highest RSS seen, in KiB.
pub fn peak_rss_during<R>(broker: &Broker, during: impl FnOnce() -> R) -> (R, u64) {
    let pid = broker.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib_of(pid).unwrap_or(0));
                thread::sleep(Duration::from_millis(50));
            }
            peak.max(rss_kib_of(pid).unwrap_or(0))
        })
    };
    let result = during();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().expect("the RSS sampler does not panic");
    (result, peak)
}

/// The RSS of process `pid` in KiB, if it is still there.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix("VmRSS:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// `kib` as MiB with one decimal, for figures.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// -------------------------------------------------------------------------------------------
// The healthy pair
// -------------------------------------------------------------------------------------------

/// How often the healthy pair sends.
pub const HEALTHY_PERIOD: Duration = Duration::from_millis(10);

/// Send-to-delivery latencies of the healthy pair over one stretch of time.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: Vec<Duration>,
}

impl Latencies {
    /// How many messages were measured.
    pub fn count(&self) -> usize {
        self.samples.len()
    }

    /// The `p`-th percentile (0..=100); zero if nothing was measured.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.samples.clone();
        sorted.sort();
        let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[rank.min(sorted.len() - 1)]
    }

    /// The slowest.
    pub fn max(&self) -> Duration {
        self.samples.iter().copied().max().unwrap_or_default()
    }
}

impl std::fmt::Display for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} messages, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.count(),
            self.percentile(50.0).as_secs_f64() * 1e3,
            self.percentile(99.0).as_secs_f64() * 1e3,
            self.max().as_secs_f64() * 1e3
        )
    }
}

/// Two logged-in clients, one sending to the other every [`HEALTHY_PERIOD`], measuring each
/// message from the send to its delivery: what an ordinary user sees while someone else abuses
/// the broker. Any message not acked or not delivered within [`TIMEOUT`] fails the test.
#[derive(Debug)]
pub struct HealthyPair {
    sender: Client,
    receiver: Client,
    /// Messages sent (and delivered) so far; the conversation's seqs are 1..=sent.
    sent: u64,
}

/// A [`HealthyPair`] talking in a background thread (see [`HealthyPair::start`]).
#[derive(Debug)]
pub struct RunningPair {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(HealthyPair, Latencies)>,
}

impl HealthyPair {
    /// Logs in the pair (`healthy-sender` and `healthy-receiver`, over TCP) and checks they talk.
    pub fn connect(broker: &Broker) -> Self {
        let sender = broker.connect("healthy-sender", "phone");
        let receiver = broker.connect("healthy-receiver", "phone");
        let mut pair = Self {
            sender,
            receiver,
            sent: 0,
        };
        pair.exchange();
        pair
    }

    /// Sends one message and waits for its delivery; returns the latency.
    fn exchange(&mut self) -> Duration {
        let seq = self.sent + 1;
        let receiver = self.receiver.user().to_owned();
        let conversation = direct(self.sender.user());
        let start = Instant::now();
        let client_msg_id = self
            .sender
            .start_send(&receiver, format!("healthy message {seq}"));
        let message = self.receiver.expect_delivery(&conversation, seq, TIMEOUT);
        let latency = start.elapsed();
        let ack = self.sender.wait_send_ack(client_msg_id, TIMEOUT);
        assert_eq!(
            ack.seq, seq,
            "the healthy pair's conversation is its own: message {seq} gets seq {seq}"
        );
        assert_eq!(
            message.client_msg_id, client_msg_id,
            "the delivered message is the sent one"
        );
        self.sent = seq;
        latency
    }

    /// Talks for `duration` (in this thread) and returns the latencies: the unloaded figures.
    pub fn measure(&mut self, duration: Duration) -> Latencies {
        let stop = AtomicBool::new(false);
        let deadline = Instant::now() + duration;
        self.talk(&stop, Some(deadline))
    }

    fn talk(&mut self, stop: &AtomicBool, deadline: Option<Instant>) -> Latencies {
        let mut latencies = Latencies::default();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
            latencies.samples.push(self.exchange());
            next += HEALTHY_PERIOD;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        latencies
    }

    /// Starts talking in a background thread until [`RunningPair::stop`].
    pub fn start(mut self) -> RunningPair {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("healthy-pair".into())
                .spawn(move || {
                    let latencies = self.talk(&stop, None);
                    (self, latencies)
                })
                .expect("spawn the healthy pair's thread")
        };
        RunningPair { stop, handle }
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Asserts the pair lost nothing: the receiver holds exactly seqs `1..=sent` of the
    /// conversation, and one more message still goes through.
    pub fn assert_lost_nothing(&mut self) {
        self.exchange();
        let conversation = direct(self.sender.user());
        assert_seqs(
            &self.receiver.held_seqs(&conversation),
            1..=self.sent,
            "the healthy pair lost nothing while another client abused the broker",
        );
    }
}

impl RunningPair {
    /// Stops the talk and returns the pair and the latencies measured meanwhile. Panics if the
    /// pair failed (a message not acked or not delivered in time; its panic message was printed).
    pub fn stop(self) -> (HealthyPair, Latencies) {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(result) => result,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                panic!("the healthy pair failed during the abuse: {why}");
            }
        }
    }
}

/// Prints the healthy pair's figures, unloaded and loaded, for the benchmark notes.
pub fn print_pair_figures(test: &str, unloaded: &Latencies, loaded: &Latencies) {
    eprintln!("[{test}] healthy pair unloaded: {unloaded}");
    eprintln!("[{test}] healthy pair loaded:   {loaded}");
}

/// Raises this process's soft open-file limit to its hard limit and returns the limit in force,
/// so a test holding thousands of sockets does not fail on a machine whose default soft limit is
/// low (the broker raises its own the same way).
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current
}
