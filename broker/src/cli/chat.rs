//! `broker chat`: a small interactive terminal client over TCP.
//!
//! It logs in, syncs (so the conversation's history and anything missed print first), then sends
//! each line of stdin as a text message to `--to` and prints what arrives:
//!
//! * stdout: messages as `[seq N] from: text` (messages of other conversations as
//!   `[dm carol seq N] carol: text`, `[group g seq N] ...`), and `(sent #N)` for each message of
//!   ours the server stored;
//! * stderr: status and errors.
//!
//! Deliveries are acknowledged (per conversation, the highest seq of each Deliver) and
//! de-duplicated by (conversation, seq), so a retransmitted message prints once. Server Pings are
//! answered, and the client pings every half heartbeat interval so the idle timeout never trips.
//! End of stdin (Ctrl-D) waits briefly for the acknowledgements of messages still in flight and
//! quits; so does the server closing the connection. Nothing the server sends can make it panic:
//! unreadable frames are reported and skipped, a desynchronised stream ends the session.
//!
//! Threads: the main thread logs in, then handles events (stdin lines, acknowledgements, the
//! connection ending); a reader thread decodes and prints server frames and answers them; a writer
//! thread owns the socket's sending side and sends the heartbeats; a thread reads stdin.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::{self, BufRead, Read as _, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Args;
use parley_broker::auth::MAX_USER_BYTES;
use parley_proto::frame::{FrameError, body_name};
use parley_proto::pb::{self, frame::Body};
use parley_proto::tcp::{FrameCodec, TcpFrameError};
use parley_proto::{DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION};

use super::token::{DEFAULT_TTL_SECS, check_claims, mint};
use super::{CliError, ConfigArgs, load_config_from, load_secret};

/// Flags of `broker chat`.
#[derive(Debug, Args)]
pub(super) struct ChatArgs {
    /// Your user id (needed to mint a token unless --token is given).
    #[arg(long, value_name = "USER", required_unless_present = "token")]
    user: Option<String>,
    /// The user to chat with.
    #[arg(long, value_name = "USER")]
    to: String,
    /// Your device id (for a minted token).
    #[arg(long, value_name = "DEVICE", default_value = "cli")]
    device: String,
    /// The broker's TCP address [default: listen.tcp of the configuration, 127.0.0.1:7400].
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// The token to log in with. Without it, one is minted from the node's secret, read from the
    /// configuration or data dir as `broker token` does.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Where the configuration (and so the secret and default address) comes from.
    #[command(flatten)]
    config: ConfigArgs,
}

/// How long to try connecting to one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A write blocked this long means the server stopped reading: the session ends.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame accepted from the server (it may send frames up to its own limit, which
/// `LoginResult.max_frame_bytes` states; this bounds memory whatever it says).
const MAX_READ_FRAME_BYTES: usize = 4 << 20;
/// Heartbeat used when the server does not state one.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Request id of the Login frame.
const LOGIN_REQUEST_ID: u64 = 1;
/// Request id of the SyncRequest sent after login.
const SYNC_REQUEST_ID: u64 = 2;
/// Content type of a text message.
const TEXT: u32 = 1;

/// How long the session waits at each step.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// For the answer to Login.
    login: Duration,
    /// For the sync after login to finish before stdin is read.
    sync: Duration,
    /// After end of input, for the acknowledgements of messages in flight.
    drain: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            login: Duration::from_secs(15),
            sync: Duration::from_secs(15),
            drain: Duration::from_secs(5),
        }
    }
}

/// Where messages are printed (stdout, or a buffer in tests).
type Output = Arc<Mutex<Box<dyn Write + Send>>>;

/// Runs `broker chat`.
pub(super) fn run(args: ChatArgs) -> Result<ExitCode, CliError> {
    if args.to.is_empty() || args.to.len() > MAX_USER_BYTES {
        return Err(CliError::new(format!(
            "--to must be a user id of 1 to {MAX_USER_BYTES} bytes"
        )));
    }
    let config = if args.addr.is_none() || args.token.is_none() {
        Some(load_config_from(&args.config)?)
    } else {
        None
    };
    let need_config = || {
        config
            .as_ref()
            .ok_or_else(|| CliError::new("internal: configuration not loaded"))
    };
    let addr = match &args.addr {
        Some(addr) => addr.clone(),
        None => match need_config()?.listen.tcp {
            Some(a) => connectable(a).to_string(),
            None => {
                return Err(CliError::new(
                    "the configuration has no TCP listener (listen.tcp); pass --addr HOST:PORT",
                ));
            }
        },
    };
    let token = match &args.token {
        Some(token) => token.clone(),
        None => {
            let user = args
                .user
                .as_deref()
                .ok_or_else(|| CliError::new("--user is required unless --token is given"))?;
            check_claims(user, &args.device, DEFAULT_TTL_SECS)?;
            mint(
                load_secret(need_config()?)?,
                user,
                &args.device,
                DEFAULT_TTL_SECS,
            )
        }
    };
    let stream = connect(&addr)?;
    let input: Box<dyn BufRead + Send> = Box::new(io::BufReader::new(io::stdin()));
    let output: Output = Arc::new(Mutex::new(Box::new(io::stdout())));
    session(stream, &token, &args.to, input, output, Timing::default())
}

/// The address to connect to for a listening address: a wildcard (0.0.0.0, ::) means this host.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Connects to `addr` (`host:port`), trying each address it resolves to.
fn connect(addr: &str) -> Result<TcpStream, CliError> {
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| CliError::new(format!("bad address {addr:?}: {e}")))?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(CliError::new(match last {
        Some(e) => format!("cannot connect to {addr}: {e} (is `broker serve` running?)"),
        None => format!("address {addr:?} resolves to nothing"),
    }))
}

/// What the other threads tell the main thread.
#[derive(Debug)]
enum Event {
    /// A line of input (without its line ending).
    Line(Vec<u8>),
    /// The input ended (with the error, if reading failed).
    InputEnd(Option<io::Error>),
    /// The sync after login finished.
    SyncDone,
    /// The request with this id was answered (SendAck or Error).
    Answered(u64),
    /// The connection ended.
    Closed(Closed),
}

/// How the connection ended.
#[derive(Debug)]
enum Closed {
    /// The server closed it.
    ByServer,
    /// The server closed it after a fatal Error (already printed).
    AfterFatalError,
    /// Reading or writing failed, or the stream made no sense.
    Broken(String),
}

/// What the writer thread is asked to do.
#[derive(Debug)]
enum Out {
    /// Send this frame.
    Frame(pb::Frame),
    /// Stop.
    Close,
}

/// Runs a chat session on a connected stream until the input ends or the connection does.
fn session(
    stream: TcpStream,
    token: &str,
    peer: &str,
    input: Box<dyn BufRead + Send>,
    output: Output,
    timing: Timing,
) -> Result<ExitCode, CliError> {
    let io_err = |what: &str| {
        let what = what.to_owned();
        move |e: io::Error| CliError::new(format!("{what}: {e}"))
    };
    // Best effort: a socket without these options still works, only less promptly.
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    stream
        .set_read_timeout(Some(timing.login))
        .map_err(io_err("socket"))?;
    let mut reader = FrameReader::new(
        stream.try_clone().map_err(io_err("socket"))?,
        FrameCodec::new(MAX_READ_FRAME_BYTES),
    );
    let mut send_stream = stream.try_clone().map_err(io_err("socket"))?;

    let login = pb::Frame {
        request_id: LOGIN_REQUEST_ID,
        body: Some(Body::Login(pb::Login {
            protocol_version: PROTOCOL_VERSION,
            token: token.to_owned(),
            client_name: "broker-chat".into(),
        })),
    };
    write_frame(&mut send_stream, &FrameCodec::default(), &login)
        .map_err(|e| CliError::new(format!("cannot send the login: {e}")))?;
    let welcome = loop {
        match reader.read_frame() {
            Ok(Some(pb::Frame {
                body: Some(Body::LoginResult(r)),
                ..
            })) => break r,
            Ok(Some(pb::Frame {
                body: Some(Body::Error(e)),
                ..
            })) => {
                return Err(CliError::new(format!(
                    "login refused: {}",
                    describe_error(&e)
                )));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(CliError::new(
                    "the server closed the connection without answering the login",
                ));
            }
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(CliError::new(format!(
                    "no answer to the login within {} s",
                    timing.login.as_secs()
                )));
            }
            Err(e) => return Err(CliError::new(format!("login: {e}"))),
        }
    };
    stream.set_read_timeout(None).map_err(io_err("socket"))?;
    if welcome.protocol_version != PROTOCOL_VERSION {
        eprintln!(
            "chat: the server speaks protocol version {}, this client {PROTOCOL_VERSION}",
            welcome.protocol_version
        );
    }
    eprintln!(
        "chat: logged in as {}/{} on node {}; chatting with {peer}",
        welcome.user, welcome.device, welcome.node
    );

    let send_codec = match welcome.max_frame_bytes {
        0 => FrameCodec::default(),
        n => FrameCodec::new(usize::try_from(n).unwrap_or(DEFAULT_MAX_FRAME_BYTES)),
    };
    let heartbeat = match welcome.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let ping_every = (heartbeat / 2).max(Duration::from_millis(100));

    let (out_tx, out_rx) = mpsc::channel::<Out>();
    let (ev_tx, ev_rx) = mpsc::channel::<Event>();
    let quitting = Arc::new(AtomicBool::new(false));
    let next_request = Arc::new(AtomicU64::new(SYNC_REQUEST_ID + 1));

    let writer = {
        let ev = ev_tx.clone();
        thread::Builder::new()
            .name("chat-writer".into())
            .spawn(move || write_loop(send_stream, send_codec, &out_rx, ping_every, &ev))
            .map_err(io_err("cannot start a thread"))?
    };
    let _ = out_tx.send(Out::Frame(pb::Frame {
        request_id: SYNC_REQUEST_ID,
        body: Some(Body::SyncRequest(pb::SyncRequest::default())),
    }));
    let reader = {
        let state = ReaderState {
            peer: direct(peer),
            held: HashMap::new(),
            fatal: false,
            out: out_tx.clone(),
            events: ev_tx.clone(),
            output,
            next_request: Arc::clone(&next_request),
        };
        let quitting = Arc::clone(&quitting);
        thread::Builder::new()
            .name("chat-reader".into())
            .spawn(move || read_loop(reader, state, &quitting))
            .map_err(io_err("cannot start a thread"))?
    };
    let mut ending = Ending {
        stream,
        out: out_tx.clone(),
        quitting,
        writer: Some(writer),
        reader: Some(reader),
    };

    // History first: stdin is read only once the sync has finished (or taken too long).
    let deadline = Instant::now() + timing.sync;
    loop {
        match ev_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::SyncDone) => break,
            Ok(Event::Closed(c)) => return ending.closed(c, 0),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                eprintln!("chat: the sync did not finish in time; going on");
                break;
            }
            Err(RecvTimeoutError::Disconnected) => {
                return ending.closed(Closed::Broken("internal: threads gone".into()), 0);
            }
        }
    }
    eprintln!("chat: type a message and press Enter; Ctrl-D quits");

    {
        let ev = ev_tx.clone();
        thread::Builder::new()
            .name("chat-input".into())
            .spawn(move || input_loop(input, &ev))
            .map_err(io_err("cannot start a thread"))?;
    }
    drop(ev_tx);

    let mut next_msg_id = client_msg_id_seed();
    let mut pending: HashSet<u64> = HashSet::new();
    let mut draining: Option<Instant> = None;
    let mut input_failed = false;
    loop {
        let event = match draining {
            None => ev_rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(deadline) => {
                ev_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
        };
        match event {
            Ok(Event::Line(line)) if draining.is_none() => {
                if line.is_empty() {
                    continue;
                }
                let frame = pb::Frame {
                    request_id: next_request.fetch_add(1, Ordering::Relaxed),
                    body: Some(Body::Send(pb::Send {
                        to: Some(direct(peer)),
                        client_msg_id: next_msg_id,
                        content_type: TEXT,
                        body: Bytes::from(line),
                        kind: pb::MessageKind::Normal as i32,
                        ref_seq: 0,
                    })),
                };
                next_msg_id = next_msg_id.wrapping_add(1).max(1);
                let len = parley_proto::frame::encoded_len(&frame);
                if len > send_codec.max_frame_bytes() {
                    eprintln!(
                        "chat: message too long ({len} bytes encoded; the server takes at most {})",
                        send_codec.max_frame_bytes()
                    );
                    continue;
                }
                pending.insert(frame.request_id);
                let _ = out_tx.send(Out::Frame(frame));
            }
            Ok(Event::Line(_) | Event::SyncDone) => {}
            Ok(Event::InputEnd(error)) => {
                if let Some(e) = error {
                    eprintln!("chat: cannot read the input: {e}");
                    input_failed = true;
                }
                if pending.is_empty() {
                    break;
                }
                draining = Some(Instant::now() + timing.drain);
            }
            Ok(Event::Answered(id)) => {
                pending.remove(&id);
                if draining.is_some() && pending.is_empty() {
                    break;
                }
            }
            Ok(Event::Closed(c)) => return ending.closed(c, pending.len()),
            Err(RecvTimeoutError::Timeout) => {
                eprintln!(
                    "chat: gave up waiting for {} acknowledgement(s); those messages may not \
                     have been stored",
                    pending.len()
                );
                break;
            }
            Err(RecvTimeoutError::Disconnected) => {
                return ending.closed(Closed::Broken("internal: threads gone".into()), 0);
            }
        }
    }
    ending.quit();
    Ok(if input_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Stops the session's threads and closes the connection.
struct Ending {
    /// The connection (a handle to shut it down).
    stream: TcpStream,
    /// To the writer thread.
    out: Sender<Out>,
    /// Set when the client is closing the connection itself (so its end is not reported).
    quitting: Arc<AtomicBool>,
    /// The writer thread.
    writer: Option<thread::JoinHandle<()>>,
    /// The reader thread.
    reader: Option<thread::JoinHandle<()>>,
}

impl Ending {
    /// The client ends the session: flushes what is queued, closes, waits for the threads.
    fn quit(&mut self) {
        self.quitting.store(true, Ordering::SeqCst);
        let _ = self.out.send(Out::Close);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// The connection ended by itself: reports how, with `unacked` messages still in flight.
    fn closed(&mut self, how: Closed, unacked: usize) -> Result<ExitCode, CliError> {
        self.quitting.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        let _ = self.out.send(Out::Close);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if unacked > 0 {
            eprintln!(
                "chat: {unacked} message(s) were not acknowledged and may not have been stored"
            );
        }
        match how {
            Closed::ByServer => {
                eprintln!("chat: the server closed the connection");
                Ok(ExitCode::SUCCESS)
            }
            Closed::AfterFatalError => {
                eprintln!("chat: the server closed the connection after an error");
                Ok(ExitCode::FAILURE)
            }
            Closed::Broken(why) => Err(CliError::new(why)),
        }
    }
}

/// The conversation with user `peer`.
fn direct(peer: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Direct as i32,
        id: peer.to_owned(),
    }
}

/// A starting client message id: random, so ids of successive runs on one device do not collide
/// within the server's de-duplication window. Never 0.
fn client_msg_id_seed() -> u64 {
    let seed = getrandom::u64().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        // Truncation intended: the low bits of the clock vary most.
        (nanos as u64) ^ (u64::from(std::process::id()) << 32)
    });
    // Leave room to count up without wrapping to 0 soon.
    (seed >> 1).max(1)
}

/// Reads lines from `input` until it ends, as events.
fn input_loop(mut input: Box<dyn BufRead + Send>, events: &Sender<Event>) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => {
                let _ = events.send(Event::InputEnd(None));
                return;
            }
            Ok(_) => {
                while matches!(line.last(), Some(b'\n' | b'\r')) {
                    line.pop();
                }
                if events.send(Event::Line(line.clone())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = events.send(Event::InputEnd(Some(e)));
                return;
            }
        }
    }
}

/// Encodes `frame` and writes it.
fn write_frame(stream: &mut TcpStream, codec: &FrameCodec, frame: &pb::Frame) -> io::Result<()> {
    let mut buf = BytesMut::new();
    codec
        .encode(frame, &mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    stream.write_all(&buf)
}

/// The writer thread: sends what it is given, and a Ping whenever nothing was sent for
/// `ping_every`.
fn write_loop(
    mut stream: TcpStream,
    codec: FrameCodec,
    frames: &Receiver<Out>,
    ping_every: Duration,
    events: &Sender<Event>,
) {
    let mut next_ping = Instant::now() + ping_every;
    let mut nonce = 0u64;
    loop {
        let frame = match frames.recv_timeout(next_ping.saturating_duration_since(Instant::now())) {
            Ok(Out::Frame(f)) => f,
            Ok(Out::Close) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                nonce = nonce.wrapping_add(1);
                pb::Frame {
                    request_id: 0,
                    body: Some(Body::Ping(pb::Ping { nonce })),
                }
            }
        };
        match write_frame(&mut stream, &codec, &frame) {
            Ok(()) => next_ping = Instant::now() + ping_every,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                eprintln!("chat: cannot send a {} frame: {e}", body_name(&frame));
            }
            Err(e) => {
                let _ = stream.shutdown(Shutdown::Both);
                let _ = events.send(Event::Closed(Closed::Broken(format!(
                    "cannot write to the server: {e}"
                ))));
                return;
            }
        }
    }
}

/// Why no frame could be read.
#[derive(Debug)]
enum ReadError {
    /// The socket failed.
    Io(io::Error),
    /// The stream is not length-delimited frames the client accepts; it cannot go on.
    Desync(TcpFrameError),
    /// The connection ended in the middle of a frame.
    Truncated,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "cannot read from the server: {e}"),
            ReadError::Desync(e) => write!(f, "the server sent an unreadable stream: {e}"),
            ReadError::Truncated => f.write_str("the server closed the connection mid-frame"),
        }
    }
}

/// Reads frames from a blocking stream.
struct FrameReader {
    /// The socket.
    stream: TcpStream,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    /// The framing.
    codec: FrameCodec,
}

impl FrameReader {
    /// A reader of `stream` with `codec`'s size limit.
    fn new(stream: TcpStream, codec: FrameCodec) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(16 << 10),
            codec,
        }
    }

    /// The next frame the client understands, `None` at a clean end of the stream. A frame that
    /// is delimited but not understood is reported (unless it is merely of a newer kind) and
    /// skipped.
    fn read_frame(&mut self) -> Result<Option<pb::Frame>, ReadError> {
        let mut chunk = [0u8; 16 << 10];
        loop {
            match self.codec.decode_frame(&mut self.buf) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                // A body case from a newer schema: nothing this client needs.
                Err(TcpFrameError::Frame(FrameError::MissingBody)) => continue,
                Err(TcpFrameError::Frame(e)) => {
                    eprintln!("chat: skipping an unreadable frame from the server: {e}");
                    continue;
                }
                Err(e) => return Err(ReadError::Desync(e)),
            }
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReadError::Io(e)),
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// What the reader thread knows and whom it tells.
struct ReaderState {
    /// The conversation with `--to`.
    peer: pb::Conversation,
    /// Per conversation (type, id): the seqs held, for de-duplication and re-sync.
    held: HashMap<(i32, String), Held>,
    /// Whether the server sent a fatal Error.
    fatal: bool,
    /// To the writer thread.
    out: Sender<Out>,
    /// To the main thread.
    events: Sender<Event>,
    /// Where messages are printed.
    output: Output,
    /// Request ids for requests the reader makes.
    next_request: Arc<AtomicU64>,
}

/// The reader thread: handles every frame until the connection ends.
fn read_loop(mut reader: FrameReader, mut state: ReaderState, quitting: &AtomicBool) {
    let closed = loop {
        match reader.read_frame() {
            Ok(Some(frame)) => state.handle(frame),
            Ok(None) if state.fatal => break Closed::AfterFatalError,
            Ok(None) => break Closed::ByServer,
            Err(_) if state.fatal => break Closed::AfterFatalError,
            Err(e) => break Closed::Broken(e.to_string()),
        }
    };
    if !quitting.load(Ordering::SeqCst) {
        let _ = state.events.send(Event::Closed(closed));
    }
}

impl ReaderState {
    /// Handles one frame from the server.
    fn handle(&mut self, frame: pb::Frame) {
        let request_id = frame.request_id;
        let Some(body) = frame.body else { return };
        match body {
            Body::Deliver(d) => {
                let mut acks: Vec<pb::AckCursor> = Vec::new();
                for m in &d.messages {
                    let conversation = m.conversation.clone().unwrap_or_default();
                    if self.hold(&conversation, m.seq) {
                        let line = format_message(m, &self.peer);
                        self.print(&line);
                    }
                    match acks
                        .iter_mut()
                        .find(|a| a.conversation.as_ref() == Some(&conversation))
                    {
                        Some(a) => a.seq = a.seq.max(m.seq),
                        None => acks.push(pb::AckCursor {
                            conversation: Some(conversation),
                            seq: m.seq,
                        }),
                    }
                }
                // Every Deliver is acked, duplicates too: a retransmit means our ack was late.
                acks.retain(|a| a.seq > 0);
                if !acks.is_empty() {
                    self.send(0, Body::DeliverAck(pb::DeliverAck { acks }));
                }
            }
            Body::SyncPage(p) => {
                for m in &p.messages {
                    let conversation = m.conversation.clone().unwrap_or_default();
                    // Other conversations' history is held (so it is not printed when it comes
                    // again) but only the chat with --to is shown.
                    if self.hold(&conversation, m.seq) && conversation == self.peer {
                        let line = format_message(m, &self.peer);
                        self.print(&line);
                    }
                }
                if p.done {
                    let _ = self.events.send(Event::SyncDone);
                }
            }
            Body::SyncSummary(s) => {
                if s.total_messages > 0 {
                    eprintln!("chat: catching up on {} message(s)", s.total_messages);
                } else if request_id == SYNC_REQUEST_ID {
                    let _ = self.events.send(Event::SyncDone);
                }
            }
            Body::SendAck(a) => {
                let conversation = a.conversation.clone().unwrap_or_else(|| self.peer.clone());
                self.hold(&conversation, a.seq);
                let line = if conversation == self.peer {
                    format!("(sent #{})", a.seq)
                } else {
                    format!("(sent #{} to {})", a.seq, conversation_label(&conversation))
                };
                self.print(&line);
                let _ = self.events.send(Event::Answered(request_id));
            }
            Body::Error(e) => {
                if e.client_msg_id != 0 {
                    eprintln!("chat: message not stored: {}", describe_error(&e));
                } else {
                    eprintln!("chat: server error: {}", describe_error(&e));
                }
                self.fatal |= e.fatal;
                if request_id == SYNC_REQUEST_ID {
                    let _ = self.events.send(Event::SyncDone);
                }
                if request_id != 0 {
                    let _ = self.events.send(Event::Answered(request_id));
                }
            }
            Body::Ping(p) => {
                let time = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                self.send(
                    request_id,
                    Body::Pong(pb::Pong {
                        nonce: p.nonce,
                        time,
                    }),
                );
            }
            Body::Behind(b) => {
                eprintln!(
                    "chat: the server paused live messages ({}); catching up",
                    sanitize(b.reason.as_bytes())
                );
                let cursors = self
                    .held
                    .iter()
                    .filter(|(_, h)| h.contiguous > 0)
                    .map(|((kind, id), h)| pb::AckCursor {
                        conversation: Some(pb::Conversation {
                            r#type: *kind,
                            id: id.clone(),
                        }),
                        seq: h.contiguous,
                    })
                    .collect();
                let id = self.next_request.fetch_add(1, Ordering::Relaxed);
                self.send(
                    id,
                    Body::SyncRequest(pb::SyncRequest {
                        cursors,
                        ..pb::SyncRequest::default()
                    }),
                );
            }
            // Nothing this client asks for or shows.
            _ => {}
        }
    }

    /// Records that (conversation, seq) is held; false if it already was.
    fn hold(&mut self, conversation: &pb::Conversation, seq: u64) -> bool {
        if seq == 0 {
            // Not a stored message's seq; show it, remember nothing.
            return true;
        }
        self.held
            .entry((conversation.r#type, conversation.id.clone()))
            .or_default()
            .insert(seq)
    }

    /// Queues a frame for the writer.
    fn send(&self, request_id: u64, body: Body) {
        let _ = self.out.send(Out::Frame(pb::Frame {
            request_id,
            body: Some(body),
        }));
    }

    /// Prints a line to the output.
    fn print(&self, line: &str) {
        let mut out = self
            .output
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A closed stdout must not stop the session; there is nowhere to report it anyway.
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }
}

/// The seqs of one conversation held by the client: every seq up to `contiguous`, and `above`.
#[derive(Debug, Default)]
struct Held {
    /// Every seq in 1..=contiguous is held.
    contiguous: u64,
    /// Held seqs above `contiguous + 1` (there is a gap below each).
    above: BTreeSet<u64>,
}

impl Held {
    /// Records `seq`; false if it was already held.
    fn insert(&mut self, seq: u64) -> bool {
        if seq <= self.contiguous || !self.above.insert(seq) {
            return false;
        }
        while self.above.first() == Some(&(self.contiguous + 1)) {
            self.above.pop_first();
            self.contiguous += 1;
        }
        true
    }
}

/// `CODE: message`, with the retry delay and fatality if given.
fn describe_error(e: &pb::Error) -> String {
    let code = pb::ErrorCode::try_from(e.code).map_or_else(
        |_| format!("error code {}", e.code),
        |c| c.as_str_name().to_owned(),
    );
    let mut s = format!("{code}: {}", sanitize(e.message.as_bytes()));
    if e.retry_after_ms > 0 {
        s.push_str(&format!(" (retry after {} ms)", e.retry_after_ms));
    }
    if e.fatal {
        s.push_str(" (fatal)");
    }
    s
}

/// How a conversation is named in a line: `dm carol`, `group g`, `room r`.
fn conversation_label(c: &pb::Conversation) -> String {
    let kind = match pb::ConversationType::try_from(c.r#type) {
        Ok(pb::ConversationType::Direct) => "dm",
        Ok(pb::ConversationType::Group) => "group",
        Ok(pb::ConversationType::Room) => "room",
        _ => "conversation",
    };
    format!("{kind} {}", sanitize(c.id.as_bytes()))
}

/// One message as a line: `[seq N] from: text` in the chat with `peer`, with the conversation
/// named otherwise (`[dm carol seq N] carol: text`).
fn format_message(m: &pb::Message, peer: &pb::Conversation) -> String {
    let conversation = m.conversation.clone().unwrap_or_default();
    let place = if &conversation == peer {
        format!("[seq {}]", m.seq)
    } else {
        format!("[{} seq {}]", conversation_label(&conversation), m.seq)
    };
    let from = sanitize(m.from_user.as_bytes());
    let text = sanitize(&m.body);
    match pb::MessageKind::try_from(m.kind) {
        Ok(pb::MessageKind::Recall) => format!("{place} {from} recalled #{}", m.ref_seq),
        Ok(pb::MessageKind::Edit) => format!("{place} {from} (edits #{}): {text}", m.ref_seq),
        Ok(pb::MessageKind::System) => format!("{place} * {text}"),
        _ => format!("{place} {from}: {text}"),
    }
}

/// `bytes` as text for a terminal: invalid UTF-8 replaced, control characters (newlines, escape
/// sequences) escaped so a message is one line and cannot drive the terminal.
fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn held_deduplicates_and_tracks_the_contiguous_prefix() {
        let mut h = Held::default();
        assert!(h.insert(1));
        assert!(h.insert(3));
        assert!(!h.insert(3));
        assert!(!h.insert(1));
        assert_eq!(h.contiguous, 1);
        assert!(h.insert(2));
        assert_eq!(h.contiguous, 3);
        assert!(h.above.is_empty());
        assert!(!h.insert(2));
    }

    #[test]
    fn sanitize_keeps_text_on_one_line_and_escapes_terminal_controls() {
        assert_eq!(sanitize("héllo".as_bytes()), "héllo");
        assert_eq!(sanitize(b"a\nb\x1b[2Jc"), "a\\nb\\u{1b}[2Jc");
        assert_eq!(sanitize(b"\xff ok"), "\u{fffd} ok");
    }

    fn message(conv: &str, seq: u64, from: &str, body: &'static [u8]) -> pb::Message {
        pb::Message {
            conversation: Some(direct(conv)),
            seq,
            from_user: from.into(),
            body: Bytes::from_static(body),
            ..pb::Message::default()
        }
    }

    #[test]
    fn messages_format_with_seq_and_sender() {
        let peer = direct("bob");
        assert_eq!(
            format_message(&message("bob", 7, "bob", b"hi"), &peer),
            "[seq 7] bob: hi"
        );
        assert_eq!(
            format_message(&message("carol", 2, "carol", b"yo"), &peer),
            "[dm carol seq 2] carol: yo"
        );
        let recall = pb::Message {
            kind: pb::MessageKind::Recall as i32,
            ref_seq: 7,
            ..message("bob", 8, "bob", b"")
        };
        assert_eq!(format_message(&recall, &peer), "[seq 8] bob recalled #7");
    }

    #[test]
    fn errors_are_described_by_code_name() {
        let e = pb::Error {
            code: pb::ErrorCode::RateLimited as i32,
            message: "slow down".into(),
            retry_after_ms: 250,
            ..pb::Error::default()
        };
        assert_eq!(
            describe_error(&e),
            "RATE_LIMITED: slow down (retry after 250 ms)"
        );
        let unknown = pb::Error {
            code: 999,
            fatal: true,
            ..pb::Error::default()
        };
        assert_eq!(describe_error(&unknown), "error code 999:  (fatal)");
    }

    #[test]
    fn wildcard_listen_address_connects_to_loopback() {
        assert_eq!(
            connectable("0.0.0.0:7400".parse().expect("addr")),
            "127.0.0.1:7400".parse().expect("addr")
        );
        assert_eq!(
            connectable("[::]:7400".parse().expect("addr")),
            "[::1]:7400".parse().expect("addr")
        );
        let a: SocketAddr = "10.1.2.3:1".parse().expect("addr");
        assert_eq!(connectable(a), a);
    }

    /// A scripted fake server on one accepted connection.
    struct Fake {
        reader: FrameReader,
        stream: TcpStream,
    }

    impl Fake {
        fn accept(listener: &TcpListener) -> Self {
            let (stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            Self {
                reader: FrameReader::new(stream.try_clone().expect("clone"), FrameCodec::default()),
                stream,
            }
        }

        fn recv(&mut self) -> pb::Frame {
            loop {
                let f = self.reader.read_frame().expect("read").expect("a frame");
                if !matches!(f.body, Some(Body::Ping(_))) {
                    return f;
                }
            }
        }

        fn send(&mut self, request_id: u64, body: Body) {
            write_frame(
                &mut self.stream,
                &FrameCodec::default(),
                &pb::Frame {
                    request_id,
                    body: Some(body),
                },
            )
            .expect("write");
        }

        fn login(&mut self) {
            let f = self.recv();
            let Some(Body::Login(login)) = f.body else {
                panic!("expected login, got {f:?}");
            };
            assert_eq!(login.token, "tok");
            assert_eq!(login.protocol_version, PROTOCOL_VERSION);
            self.send(
                f.request_id,
                Body::LoginResult(pb::LoginResult {
                    protocol_version: 1,
                    user: "alice".into(),
                    device: "cli".into(),
                    node: "n1".into(),
                    heartbeat_interval_ms: 200,
                    max_frame_bytes: 65536,
                    ..pb::LoginResult::default()
                }),
            );
        }
    }

    /// A shared buffer standing in for stdout.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
        }
    }

    fn run_session(
        listener: &TcpListener,
        input: Box<dyn BufRead + Send>,
        timing: Timing,
    ) -> (thread::JoinHandle<Result<ExitCode, String>>, Captured) {
        let addr = listener.local_addr().expect("addr");
        let captured = Captured::default();
        let output: Output = Arc::new(Mutex::new(Box::new(captured.clone())));
        let client = thread::spawn(move || {
            let stream = connect(&addr.to_string()).map_err(|e| e.to_string())?;
            session(stream, "tok", "bob", input, output, timing).map_err(|e| e.to_string())
        });
        (client, captured)
    }

    #[test]
    fn session_syncs_sends_acks_deduplicates_and_quits_at_end_of_input() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (client, out) = run_session(
            &listener,
            Box::new(io::Cursor::new(&b"hello bob\r\n\nsecond\n"[..])),
            Timing::default(),
        );
        let mut fake = Fake::accept(&listener);
        fake.login();

        let sync = fake.recv();
        assert_eq!(sync.request_id, SYNC_REQUEST_ID);
        assert!(matches!(sync.body, Some(Body::SyncRequest(_))));
        fake.send(
            sync.request_id,
            Body::SyncSummary(pb::SyncSummary {
                total_messages: 2,
                ..pb::SyncSummary::default()
            }),
        );
        // A server ping is answered with a pong of the same nonce.
        fake.send(9, Body::Ping(pb::Ping { nonce: 77 }));
        let pong = fake.recv();
        assert_eq!(pong.request_id, 9);
        assert!(matches!(
            pong.body,
            Some(Body::Pong(pb::Pong { nonce: 77, .. }))
        ));

        // Live messages during the sync, sent twice (a retransmit): printed once, acked each time
        // with the highest seq.
        for _ in 0..2 {
            fake.send(
                0,
                Body::Deliver(pb::Deliver {
                    messages: vec![
                        message("bob", 1, "bob", b"old news"),
                        message("bob", 2, "bob", b"live\x1b!"),
                    ],
                }),
            );
            let ack = fake.recv();
            let Some(Body::DeliverAck(ack)) = ack.body else {
                panic!("expected an ack, got {ack:?}");
            };
            assert_eq!(
                ack.acks,
                [pb::AckCursor {
                    conversation: Some(direct("bob")),
                    seq: 2
                }]
            );
        }

        // The end of the sync (its messages already held are not printed again); stdin is read
        // only after it.
        fake.send(
            sync.request_id,
            Body::SyncPage(pb::SyncPage {
                messages: vec![
                    message("bob", 1, "bob", b"old news"),
                    message("carol", 1, "carol", b"not shown"),
                ],
                done: true,
            }),
        );

        // The input's lines become Sends (the empty line is skipped), each acked.
        for (text, seq) in [(&b"hello bob"[..], 3), (b"second", 4)] {
            let f = fake.recv();
            let Some(Body::Send(send)) = f.body else {
                panic!("expected a send, got {f:?}");
            };
            assert_eq!(send.to, Some(direct("bob")));
            assert_eq!(&send.body[..], text);
            assert_eq!(send.content_type, TEXT);
            assert_ne!(send.client_msg_id, 0);
            fake.send(
                f.request_id,
                Body::SendAck(pb::SendAck {
                    client_msg_id: send.client_msg_id,
                    seq,
                    conversation: Some(direct("bob")),
                    ..pb::SendAck::default()
                }),
            );
        }
        let code = client.join().expect("thread").expect("session ok");
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(
            out.text(),
            "[seq 1] bob: old news\n[seq 2] bob: live\\u{1b}!\n(sent #3)\n(sent #4)\n"
        );
        // The client closed the connection.
        assert!(fake.reader.read_frame().expect("clean end").is_none());
    }

    #[test]
    fn refused_login_is_an_error_with_the_code() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (client, _) = run_session(&listener, no_input(), Timing::default());
        let mut fake = Fake::accept(&listener);
        let login = fake.recv();
        fake.send(
            login.request_id,
            Body::Error(pb::Error {
                code: pb::ErrorCode::BadToken as i32,
                message: "bad token signature".into(),
                fatal: true,
                ..pb::Error::default()
            }),
        );
        let err = client.join().expect("thread").expect_err("refused");
        assert_eq!(err, "login refused: BAD_TOKEN: bad token signature (fatal)");
    }

    fn no_input() -> Box<dyn BufRead + Send> {
        Box::new(io::Cursor::new(&b""[..]))
    }

    #[test]
    fn server_closing_after_a_fatal_error_ends_the_session_and_garbage_does_not_panic() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let timing = Timing {
            sync: Duration::from_millis(200),
            ..Timing::default()
        };
        // Input that stays open until the test ends, so only the server can end the session.
        let (pipe_out, pipe_in) = io::pipe().expect("pipe");
        let (client, _) = run_session(&listener, Box::new(io::BufReader::new(pipe_out)), timing);
        let mut fake = Fake::accept(&listener);
        fake.login();
        let _sync = fake.recv();
        // A delimited frame that is not protobuf is skipped; the session goes on.
        fake.stream
            .write_all(&[3, 0xff, 0xff, 0xff])
            .expect("write");
        fake.send(
            0,
            Body::Error(pb::Error {
                code: pb::ErrorCode::ShuttingDown as i32,
                fatal: true,
                ..pb::Error::default()
            }),
        );
        fake.stream.shutdown(Shutdown::Both).expect("close");
        let code = client.join().expect("thread").expect("no error");
        assert_eq!(code, ExitCode::FAILURE);
        drop(pipe_in);
    }

    #[test]
    fn server_closing_plainly_is_a_clean_end() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (pipe_out, pipe_in) = io::pipe().expect("pipe");
        let (client, _) = run_session(
            &listener,
            Box::new(io::BufReader::new(pipe_out)),
            Timing::default(),
        );
        let mut fake = Fake::accept(&listener);
        fake.login();
        let sync = fake.recv();
        fake.send(
            sync.request_id,
            Body::SyncSummary(pb::SyncSummary::default()),
        );
        fake.stream.shutdown(Shutdown::Both).expect("close");
        let code = client.join().expect("thread").expect("no error");
        assert_eq!(code, ExitCode::SUCCESS);
        drop(pipe_in);
    }

    #[test]
    fn desynchronised_stream_is_an_error_not_a_panic() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (client, _) = run_session(&listener, no_input(), Timing::default());
        let mut fake = Fake::accept(&listener);
        let _login = fake.recv();
        // A length prefix of more than 5 bytes.
        fake.stream
            .write_all(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01])
            .expect("write");
        let err = client.join().expect("thread").expect_err("desync");
        assert!(
            err.starts_with("login: the server sent an unreadable stream"),
            "{err}"
        );
    }
}
