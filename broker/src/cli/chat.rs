//! `broker chat`: a small interactive terminal client over TCP (or TLS with `--ca`, or UDP with
//! `--udp`), a thin user of the client library (`parley-client`).
//!
//! It logs in, syncs (so the conversation's history and anything missed print first), then sends
//! each line of stdin as a text message to `--to` and prints what arrives:
//!
//! * stdout: messages as `[seq N] from: text` (messages of other conversations, once the first
//!   sync is done, as `[dm carol seq N] carol: text`, `[group g seq N] ...`), and `(sent #N)` for
//!   each message of ours the server stored;
//! * stderr: status and errors.
//!
//! The library keeps the client's side of exactly-once: every line stays in its outbox until the
//! server acknowledges it, and is resent with the same client message id after a reconnect, so a
//! line typed while the broker is down (or restarting after `kill -9`) is sent once it is back,
//! and stored once; deliveries are acknowledged and de-duplicated by (conversation, seq), and a
//! sync after each reconnect fetches what was missed, so each message prints once, in order.
//! When the connection drops the client reconnects with back-off and jitter (and a token minted
//! from the node's secret is minted afresh for each connection). Only a failure to connect or log
//! in at the start, or a permanent refusal (another login of the same device, no common protocol
//! version), ends the session; end of stdin (Ctrl-D) waits briefly for the acknowledgements of
//! lines still in flight and quits.

use std::io::{self, BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use parley_broker::auth::MAX_USER_BYTES;
use parley_client::backoff::BackoffConfig;
use parley_client::{
    Client, ClientConfig, Connector, DisconnectReason, Event, SendError, SessionConfig,
    TcpConnector, TlsConnector, TokenProvider, UdpConnector, pb,
};

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
    /// The broker's address [default: from the configuration: listen.tcp, 127.0.0.1:7400; with
    /// --ca listen.tls; with --udp listen.udp].
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// Over TLS (the TCP framing inside TLS, `listen.tls`), trusting the CA certificate in this
    /// PEM file (e.g. cert.pem of `broker devcert`).
    #[arg(long, value_name = "PEM", conflicts_with = "udp")]
    ca: Option<std::path::PathBuf>,
    /// The name the TLS certificate must carry.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "localhost",
        requires = "ca"
    )]
    server_name: String,
    /// Over the broker's UDP sessions (`listen.udp`).
    #[arg(long)]
    udp: bool,
    /// The token to log in with. Without it, one is minted from the node's secret, read from the
    /// configuration or data dir as `broker token` does (and minted again on every reconnect).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Where the configuration (and so the secret and default address) comes from.
    #[command(flatten)]
    config: ConfigArgs,
}

/// How long the session waits at each step.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// For the first login (connect and answer) before giving up.
    login: Duration,
    /// For the sync after login to finish before stdin is read.
    sync: Duration,
    /// After end of input, for the acknowledgements of messages in flight.
    drain: Duration,
    /// Longest wait between reconnect attempts.
    max_backoff: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            login: Duration::from_secs(15),
            sync: Duration::from_secs(15),
            drain: Duration::from_secs(5),
            max_backoff: Duration::from_secs(2),
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
        None => {
            let listen = &need_config()?.listen;
            let (configured, name) = if args.udp {
                (listen.udp, "UDP listener (listen.udp)")
            } else if args.ca.is_some() {
                (listen.tls, "TLS listener (listen.tls)")
            } else {
                (listen.tcp, "TCP listener (listen.tcp)")
            };
            match configured {
                Some(a) => connectable(a).to_string(),
                None => {
                    return Err(CliError::new(format!(
                        "the configuration has no {name}; pass --addr HOST:PORT"
                    )));
                }
            }
        }
    };
    let tokens: TokenProvider = match &args.token {
        Some(token) => {
            let token = token.clone();
            Box::new(move || Ok(token.clone()))
        }
        None => {
            let user = args
                .user
                .clone()
                .ok_or_else(|| CliError::new("--user is required unless --token is given"))?;
            check_claims(&user, &args.device, DEFAULT_TTL_SECS)?;
            let secret = load_secret(need_config()?)?;
            let device = args.device.clone();
            // A fresh token for every connection, so a long chat outlives a token's expiry.
            Box::new(move || Ok(mint(secret.clone(), &user, &device, DEFAULT_TTL_SECS)))
        }
    };
    let input: Box<dyn BufRead + Send> = Box::new(io::BufReader::new(io::stdin()));
    let output: Output = Arc::new(Mutex::new(Box::new(io::stdout())));
    let timing = Timing::default();
    if args.udp {
        let connector = UdpConnector::new(addr.clone());
        return session(connector, &addr, tokens, &args.to, input, output, timing);
    }
    if let Some(ca) = &args.ca {
        let connector = TlsConnector::with_ca_file(addr.clone(), &args.server_name, ca)
            .map_err(|e| CliError::new(format!("--ca {}: {e}", ca.display())))?;
        return session(connector, &addr, tokens, &args.to, input, output, timing);
    }
    let connector = TcpConnector::new(addr.clone());
    session(connector, &addr, tokens, &args.to, input, output, timing)
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

/// A line of input, or its end.
#[derive(Debug)]
enum Input {
    /// A line (without its line ending).
    Line(Vec<u8>),
    /// The input ended (with the error, if reading failed).
    End(Option<io::Error>),
}

/// How often the main loop looks at the input between events.
const TICK: Duration = Duration::from_millis(20);

/// Runs a chat session until the input ends or the client stops for good.
fn session(
    connector: impl Connector,
    addr: &str,
    tokens: TokenProvider,
    peer: &str,
    input: Box<dyn BufRead + Send>,
    output: Output,
    timing: Timing,
) -> Result<ExitCode, CliError> {
    let config = ClientConfig {
        session: SessionConfig {
            client_name: "broker-chat".into(),
            ..SessionConfig::default()
        },
        backoff: BackoffConfig {
            max: timing.max_backoff,
            ..BackoffConfig::default()
        },
        ..ClientConfig::default()
    };
    let client = Client::start(connector, tokens, config);
    let mut chat = Chat {
        peer: parley_client::direct(peer),
        output,
        synced_once: false,
    };

    // The first login: a failure to connect or a refusal ends the session at once.
    let deadline = Instant::now() + timing.login;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left) {
            Some(Event::Connected(welcome)) => {
                if welcome.protocol_version != parley_proto::PROTOCOL_VERSION {
                    eprintln!(
                        "chat: the server speaks protocol version {}, this client {}",
                        welcome.protocol_version,
                        parley_proto::PROTOCOL_VERSION
                    );
                }
                eprintln!(
                    "chat: logged in as {}/{} on node {}; chatting with {peer}",
                    welcome.user, welcome.device, welcome.node
                );
                break;
            }
            Some(Event::Disconnected { reason }) => {
                return Err(CliError::new(match reason {
                    DisconnectReason::Io(e) => {
                        format!("cannot reach {addr}: {e} (is `broker serve` running?)")
                    }
                    DisconnectReason::Server(e) => format!("login refused: {}", describe_error(&e)),
                    DisconnectReason::Timeout => {
                        format!("no answer to the login within {} s", timing.login.as_secs())
                    }
                    other => format!("login: {other}"),
                }));
            }
            Some(_) => {}
            None => {
                return Err(CliError::new(format!(
                    "no answer to the login within {} s",
                    timing.login.as_secs()
                )));
            }
        }
    }

    // History first: stdin is read only once the sync has finished (or taken too long).
    let deadline = Instant::now() + timing.sync;
    while !chat.synced_once {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("chat: the sync did not finish in time; going on");
            break;
        }
        if let Some(event) = client.next_event(left)
            && let Some(code) = chat.handle(event)
        {
            return Ok(code);
        }
    }
    eprintln!("chat: type a message and press Enter; Ctrl-D quits");

    let lines =
        spawn_input(input).map_err(|e| CliError::new(format!("cannot start a thread: {e}")))?;
    let mut input_failed = false;
    loop {
        match lines.try_recv() {
            Ok(Input::Line(line)) => {
                if line.is_empty() {
                    continue;
                }
                let text = String::from_utf8_lossy(&line);
                match client.send(
                    chat.peer.clone(),
                    parley_client::TEXT,
                    bytes::Bytes::from(line.clone()),
                ) {
                    Ok(_) => {}
                    Err(e @ SendError::TooLarge { .. }) => eprintln!("chat: {e}"),
                    Err(e) => eprintln!("chat: cannot send {text:?}: {e}"),
                }
                continue;
            }
            Ok(Input::End(error)) => {
                if let Some(e) = error {
                    eprintln!("chat: cannot read the input: {e}");
                    input_failed = true;
                }
                break;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        if let Some(event) = client.next_event(TICK)
            && let Some(code) = chat.handle(event)
        {
            return Ok(code);
        }
    }

    // End of input: wait for the acknowledgements of lines in flight, printing them.
    let deadline = Instant::now() + timing.drain;
    while !client.unacked().is_empty() && Instant::now() < deadline {
        if let Some(event) = client.next_event(TICK)
            && let Some(code) = chat.handle(event)
        {
            return Ok(code);
        }
    }
    while let Some(event) = client.next_event(Duration::ZERO) {
        if let Some(code) = chat.handle(event) {
            return Ok(code);
        }
    }
    let unacked = client.close(Duration::ZERO);
    if !unacked.is_empty() {
        eprintln!(
            "chat: gave up waiting for {} acknowledgement(s); those messages may not have been \
             stored",
            unacked.len()
        );
    }
    Ok(if input_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Reads lines from `input` on a thread until it ends.
fn spawn_input(mut input: Box<dyn BufRead + Send>) -> io::Result<Receiver<Input>> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("chat-input".into())
        .spawn(move || {
            let mut line = Vec::new();
            loop {
                line.clear();
                match input.read_until(b'\n', &mut line) {
                    Ok(0) => {
                        let _ = tx.send(Input::End(None));
                        return;
                    }
                    Ok(_) => {
                        while matches!(line.last(), Some(b'\n' | b'\r')) {
                            line.pop();
                        }
                        if tx.send(Input::Line(line.clone())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Input::End(Some(e)));
                        return;
                    }
                }
            }
        })?;
    Ok(rx)
}

/// What the chat shows.
struct Chat {
    /// The conversation with `--to`.
    peer: pb::Conversation,
    /// Where messages are printed.
    output: Output,
    /// Whether the first sync finished (messages of other conversations print from then on).
    synced_once: bool,
}

impl Chat {
    /// Shows one event; `Some(exit code)` if the session is over.
    fn handle(&mut self, event: Event) -> Option<ExitCode> {
        match event {
            Event::Message(m) => {
                let mine = m.conversation.as_ref() == Some(&self.peer);
                if mine || self.synced_once {
                    self.print(&format_message(&m, &self.peer));
                }
            }
            Event::Acked {
                seq, conversation, ..
            } => {
                let line = if conversation == self.peer {
                    format!("(sent #{seq})")
                } else {
                    format!("(sent #{seq} to {})", conversation_label(&conversation))
                };
                self.print(&line);
            }
            Event::Refused { error, .. } => {
                eprintln!("chat: message not stored: {}", describe_error(&error));
            }
            Event::Synced => self.synced_once = true,
            Event::Connected(w) => {
                eprintln!(
                    "chat: reconnected as {}/{} on node {}",
                    w.user, w.device, w.node
                );
            }
            Event::Disconnected { reason } => eprintln!("chat: connection lost: {reason}"),
            Event::Reconnecting { delay } => {
                eprintln!("chat: reconnecting in {} ms", delay.as_millis());
            }
            Event::Skipped { conversation, seqs } => eprintln!(
                "chat: {} messages {}..={} are not available",
                conversation_label(&conversation),
                seqs.start(),
                seqs.end()
            ),
            Event::Other(pb::Frame {
                body: Some(pb::frame::Body::Error(e)),
                ..
            }) => eprintln!("chat: server error: {}", describe_error(&e)),
            Event::Stopped { reason } => {
                eprintln!("chat: stopped: {reason}");
                return Some(ExitCode::FAILURE);
            }
            _ => {}
        }
        None
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
    use std::net::{Shutdown, TcpListener, TcpStream};

    use bytes::{Bytes, BytesMut};
    use parley_proto::pb::frame::Body;
    use parley_proto::tcp::FrameCodec;

    use super::*;

    #[test]
    fn sanitize_keeps_text_on_one_line_and_escapes_terminal_controls() {
        assert_eq!(sanitize("héllo".as_bytes()), "héllo");
        assert_eq!(sanitize(b"a\nb\x1b[2Jc"), "a\\nb\\u{1b}[2Jc");
        assert_eq!(sanitize(b"\xff ok"), "\u{fffd} ok");
    }

    fn message(conv: &str, seq: u64, from: &str, body: &'static [u8]) -> pb::Message {
        pb::Message {
            conversation: Some(parley_client::direct(conv)),
            seq,
            from_user: from.into(),
            body: Bytes::from_static(body),
            ..pb::Message::default()
        }
    }

    #[test]
    fn messages_format_with_seq_and_sender() {
        let peer = parley_client::direct("bob");
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
        stream: TcpStream,
        buf: BytesMut,
        codec: FrameCodec,
    }

    impl Fake {
        fn accept(listener: &TcpListener) -> Self {
            let (stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            Self {
                stream,
                buf: BytesMut::new(),
                codec: FrameCodec::default(),
            }
        }

        /// The next frame that is not a Ping or a DeliverAck.
        fn recv(&mut self) -> pb::Frame {
            loop {
                let f = self.next();
                if !matches!(f.body, Some(Body::Ping(_) | Body::DeliverAck(_))) {
                    return f;
                }
            }
        }

        fn next(&mut self) -> pb::Frame {
            use std::io::Read as _;
            loop {
                if let Some(f) = self.codec.decode_frame(&mut self.buf).expect("a frame") {
                    return f;
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).expect("read");
                assert!(n > 0, "the client closed the connection");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        fn send(&mut self, request_id: u64, body: Body) {
            let mut buf = BytesMut::new();
            self.codec
                .encode(
                    &pb::Frame {
                        request_id,
                        body: Some(body),
                    },
                    &mut buf,
                )
                .expect("encode");
            self.stream.write_all(&buf).expect("write");
        }

        fn login(&mut self) {
            let f = self.recv();
            let Some(Body::Login(login)) = f.body else {
                panic!("expected login, got {f:?}");
            };
            assert_eq!(login.token, "tok");
            self.send(
                f.request_id,
                Body::LoginResult(pb::LoginResult {
                    protocol_version: 1,
                    user: "alice".into(),
                    device: "cli".into(),
                    node: "n1".into(),
                    heartbeat_interval_ms: 2000,
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
    ) -> (thread::JoinHandle<Result<ExitCode, String>>, Captured) {
        let addr = listener.local_addr().expect("addr").to_string();
        let captured = Captured::default();
        let output: Output = Arc::new(Mutex::new(Box::new(captured.clone())));
        let timing = Timing {
            max_backoff: Duration::from_millis(50),
            ..Timing::default()
        };
        let client = thread::spawn(move || {
            session(
                TcpConnector::new(addr.clone()),
                &addr,
                Box::new(|| Ok("tok".into())),
                "bob",
                input,
                output,
                timing,
            )
            .map_err(|e| e.to_string())
        });
        (client, captured)
    }

    #[test]
    fn chat_syncs_sends_deduplicates_and_resends_after_the_server_drops() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (pipe_out, mut pipe_in) = io::pipe().expect("pipe");
        let (client, out) = run_session(&listener, Box::new(io::BufReader::new(pipe_out)));
        let mut fake = Fake::accept(&listener);
        fake.login();
        let sync = fake.recv();
        assert!(matches!(sync.body, Some(Body::SyncRequest(_))));
        // A live message sent twice (a retransmit) prints once.
        for _ in 0..2 {
            fake.send(
                0,
                Body::Deliver(pb::Deliver {
                    messages: vec![message("bob", 2, "bob", b"live\x1b!")],
                }),
            );
        }
        fake.send(
            sync.request_id,
            Body::SyncPage(pb::SyncPage {
                messages: vec![message("bob", 1, "bob", b"old news")],
                done: true,
            }),
        );
        pipe_in.write_all(b"hello bob\r\n\n").expect("type");
        let f = fake.recv();
        let Some(Body::Send(send)) = f.body else {
            panic!("expected a send, got {f:?}");
        };
        assert_eq!(&send.body[..], b"hello bob");
        // The server drops the connection before acking: the client reconnects and resends
        // the same message with the same id.
        fake.stream.shutdown(Shutdown::Both).expect("close");
        let mut fake = Fake::accept(&listener);
        fake.login();
        let again = fake.recv();
        let Some(Body::Send(resent)) = again.body else {
            panic!("expected the resend, got {again:?}");
        };
        assert_eq!(resent.client_msg_id, send.client_msg_id);
        let sync = fake.recv();
        let Some(Body::SyncRequest(req)) = sync.body else {
            panic!("expected a sync, got {sync:?}");
        };
        assert_eq!(req.cursors[0].seq, 2);
        fake.send(
            again.request_id,
            Body::SendAck(pb::SendAck {
                client_msg_id: send.client_msg_id,
                seq: 3,
                conversation: Some(parley_client::direct("bob")),
                ..pb::SendAck::default()
            }),
        );
        fake.send(
            sync.request_id,
            Body::SyncPage(pb::SyncPage {
                messages: vec![message("bob", 2, "bob", b"live\x1b!")],
                done: true,
            }),
        );
        drop(pipe_in);
        let code = client.join().expect("thread").expect("session ok");
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(
            out.text(),
            "[seq 1] bob: old news\n[seq 2] bob: live\\u{1b}!\n(sent #3)\n"
        );
    }

    #[test]
    fn refused_login_is_an_error_with_the_code() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (client, _) = run_session(&listener, Box::new(io::Cursor::new(&b""[..])));
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

    #[test]
    fn an_unreachable_server_at_the_start_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let output: Output = Arc::new(Mutex::new(Box::new(Captured::default())));
        let err = session(
            TcpConnector::new(addr.to_string()),
            &addr.to_string(),
            Box::new(|| Ok("tok".into())),
            "bob",
            Box::new(io::Cursor::new(&b""[..])),
            output,
            Timing::default(),
        )
        .expect_err("unreachable");
        assert!(
            err.to_string().contains("is `broker serve` running?"),
            "{err}"
        );
    }
}
