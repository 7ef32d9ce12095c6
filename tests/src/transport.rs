//! The ways a test client reaches the broker: raw TCP with varint-delimited frames ([`Tcp`],
//! through `parley_proto::tcp::FrameCodec`) and WebSocket binary messages ([`Ws`], through
//! tungstenite, an implementation independent of the broker's), each over a plain socket or
//! over TLS ([`TlsStream`]: a rustls client session, see [`connect_tls`]); and UDP datagrams in
//! the authenticated envelope of `parley_proto::udp` ([`Udp`]).
//!
//! All are blocking `std::net` sockets whose every read and write is bounded by a timeout.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parley_proto::frame;
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_proto::tcp::FrameCodec;
use parley_proto::udp::{self, DatagramType, Direction, ReplayWindow, SessionKey};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use socket2::{Domain, Socket as RawSocket, Type};
use tungstenite::{Message, WebSocket};

use crate::TIMEOUT;

/// The largest frame the test client accepts from the broker. Deliberately generous: the client
/// is not what is under test, and a large frame should show up as an assertion, not a cut.
const CLIENT_MAX_FRAME_BYTES: usize = 16 << 20;

/// What one read from the broker produced.
#[derive(Debug)]
pub enum Incoming {
    /// A whole frame.
    Frame(pb::Frame),
    /// The connection ended (EOF, reset, WebSocket close); why, for messages.
    Closed(String),
    /// Nothing arrived before the deadline.
    TimedOut,
    /// The broker sent bytes that are not a frame: always a broker bug.
    Garbage(String),
}

/// A connection to the broker that carries frames.
pub trait Transport: Send + fmt::Debug + Sized {
    /// Opens a connection to `addr` (for WebSocket: performs the upgrade, with `token` in the URL
    /// if given; TCP ignores `token`).
    fn open(addr: SocketAddr, token: Option<&str>) -> io::Result<Self>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &pb::Frame) -> io::Result<()>;
    /// Reads the next frame, waiting no later than `deadline`.
    fn read_frame(&mut self, deadline: Instant) -> Incoming;
    /// Which transport this is, for messages.
    fn name(&self) -> &'static str;
    /// Writes `bytes` as one unit of this transport without looking at them (malformed input on
    /// purpose): TCP: the bytes on the stream; WebSocket: one binary message; UDP: one datagram,
    /// as it is.
    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let _ = bytes;
        Err(io::Error::new(
            ErrorKind::Unsupported,
            format!("{} cannot write raw bytes", self.name()),
        ))
    }
}

/// Time left until `deadline`, at least 1 ms (a zero socket timeout means "block forever").
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Connects a TCP stream with the harness's timeouts, optionally with a small receive buffer
/// (set before connecting, so the kernel does not grow the window past it).
pub fn connect_tcp(addr: SocketAddr, recv_buffer: Option<usize>) -> io::Result<TcpStream> {
    let socket = RawSocket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(bytes) = recv_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    socket.connect_timeout(&addr.into(), TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// A TCP connection to the broker inside a rustls client session.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// The byte stream under a transport: a plain socket or a TLS session over one.
pub trait Socket: Read + Write + Send + fmt::Debug + Sized {
    /// Whether this is TLS (for messages: `tls`, `wss`).
    const TLS: bool;
    /// Connects to `addr` (a TLS stream cannot: it needs its trust roots, see [`connect_tls`]).
    fn open(addr: SocketAddr) -> io::Result<Self>;
    /// The TCP socket underneath (for timeouts and addresses).
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    const TLS: bool = false;

    fn open(addr: SocketAddr) -> io::Result<Self> {
        connect_tcp(addr, None)
    }

    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for TlsStream {
    const TLS: bool = true;

    fn open(_addr: SocketAddr) -> io::Result<Self> {
        Err(io::Error::new(
            ErrorKind::Unsupported,
            "a TLS connection needs its trust roots: open it with transport::connect_tls",
        ))
    }

    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

/// A client configuration (ring provider, TLS 1.2 and 1.3) that trusts exactly `roots`.
pub fn tls_client_config(roots: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .unwrap_or_else(|e| panic!("not a usable root certificate: {e}"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("rustls refuses its own defaults: {e}"))
        .with_root_certificates(store)
        .with_no_client_auth();
    Arc::new(config)
}

/// Connects to `addr` and completes a TLS handshake for the name `localhost` under `config`
/// (every step bounded by the harness's timeouts).
pub fn connect_tls(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsStream> {
    let tcp = connect_tcp(addr, None)?;
    let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
    let session = ClientConnection::new(config, name).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(session, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// The certificate the server presented on `stream` (its end-entity certificate).
pub fn peer_certificate(stream: &TlsStream) -> Option<CertificateDer<'static>> {
    stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.clone().into_owned())
}

/// Raw TCP: each frame preceded by its length as a protobuf varint; over TLS if `S` is
/// [`TlsStream`].
#[derive(Debug)]
pub struct Tcp<S: Socket = TcpStream> {
    stream: S,
    codec: FrameCodec,
    input: BytesMut,
    output: BytesMut,
}

impl<S: Socket> Tcp<S> {
    /// Wraps a connected stream.
    pub fn from_stream(stream: S) -> Self {
        Self {
            stream,
            codec: FrameCodec::new(CLIENT_MAX_FRAME_BYTES),
            input: BytesMut::with_capacity(64 << 10),
            output: BytesMut::new(),
        }
    }

    /// Writes `frames` with one `write` call, so that they reach the broker together (in one
    /// read, on loopback).
    pub fn write_frames(&mut self, frames: &[pb::Frame]) -> io::Result<()> {
        self.output.clear();
        for frame in frames {
            self.codec
                .encode(frame, &mut self.output)
                .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        }
        self.stream.write_all(&self.output)
    }

    /// Writes `bytes` as they are: for malformed input.
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// The stream underneath (e.g. to look at a TLS session).
    pub fn stream(&self) -> &S {
        &self.stream
    }
}

impl Tcp<TcpStream> {
    /// Connects with a receive buffer of `recv_buffer` bytes (see [`connect_tcp`]).
    pub fn open_with_recv_buffer(addr: SocketAddr, recv_buffer: usize) -> io::Result<Self> {
        connect_tcp(addr, Some(recv_buffer)).map(Self::from_stream)
    }
}

impl<S: Socket> Transport for Tcp<S> {
    fn open(addr: SocketAddr, _token: Option<&str>) -> io::Result<Self> {
        S::open(addr).map(Self::from_stream)
    }

    fn write_frame(&mut self, frame: &pb::Frame) -> io::Result<()> {
        self.output.clear();
        self.codec
            .encode(frame, &mut self.output)
            .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        self.stream.write_all(&self.output)?;
        self.stream.flush()
    }

    fn read_frame(&mut self, deadline: Instant) -> Incoming {
        let mut chunk = [0u8; 64 << 10];
        loop {
            match self.codec.decode_frame(&mut self.input) {
                Ok(Some(frame)) => return Incoming::Frame(frame),
                Ok(None) => {}
                Err(e) => return Incoming::Garbage(e.to_string()),
            }
            if Instant::now() >= deadline {
                return Incoming::TimedOut;
            }
            if let Err(e) = self
                .stream
                .tcp()
                .set_read_timeout(Some(remaining(deadline)))
            {
                return Incoming::Closed(format!("cannot set a read timeout: {e}"));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) if self.input.is_empty() => return Incoming::Closed("EOF".into()),
                Ok(0) => {
                    return Incoming::Closed(format!(
                        "EOF inside a frame ({} bytes of it buffered)",
                        self.input.len()
                    ));
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Incoming::Closed(format!("read error: {e}")),
            }
        }
    }

    fn name(&self) -> &'static str {
        if S::TLS { "tls" } else { "tcp" }
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        Tcp::write_raw(self, bytes)
    }
}

/// WebSocket: one binary message per frame (or, after [`Ws::use_text`], one text message with
/// the frame's JSON form), through tungstenite; over TLS (wss) if `S` is [`TlsStream`].
pub struct Ws<S: Socket = TcpStream> {
    ws: WebSocket<S>,
    buf: BytesMut,
    text: bool,
    texts_read: usize,
}

impl<S: Socket> Ws<S> {
    /// Performs the WebSocket upgrade over `stream` (connected to `addr`), with `token` in the
    /// URL if given.
    pub fn over(stream: S, addr: SocketAddr, token: Option<&str>) -> io::Result<Self> {
        let scheme = if S::TLS { "wss" } else { "ws" };
        let url = match token {
            Some(token) => format!("{scheme}://{addr}/?token={token}"),
            None => format!("{scheme}://{addr}/"),
        };
        let (ws, _response) = tungstenite::client(url.as_str(), stream).map_err(|e| {
            io::Error::new(
                ErrorKind::ConnectionRefused,
                format!("WebSocket upgrade failed: {e}"),
            )
        })?;
        Ok(Self {
            ws,
            buf: BytesMut::new(),
            text: false,
            texts_read: 0,
        })
    }

    /// The stream underneath (e.g. to look at a TLS session).
    pub fn stream(&self) -> &S {
        self.ws.get_ref()
    }

    /// Writes frames as text messages holding their proto3 JSON form from now on (the broker
    /// then answers in JSON too).
    pub fn use_text(&mut self) {
        self.text = true;
    }

    /// How many text (JSON) messages were read.
    pub fn texts_read(&self) -> usize {
        self.texts_read
    }

    /// This connection, writing every frame as a JSON text message from now on.
    pub fn speaking_json(mut self) -> Self {
        self.text = true;
        self
    }
}

impl<S: Socket> fmt::Debug for Ws<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ws")
            .field("peer", &self.ws.get_ref().tcp().peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl<S: Socket> Transport for Ws<S> {
    fn open(addr: SocketAddr, token: Option<&str>) -> io::Result<Self> {
        Self::over(S::open(addr)?, addr, token)
    }

    fn write_frame(&mut self, frame: &pb::Frame) -> io::Result<()> {
        if self.text {
            let json = frame::to_json(frame).map_err(io::Error::other)?;
            return self
                .ws
                .send(Message::Text(json.into()))
                .map_err(io::Error::other);
        }
        self.buf.clear();
        frame::encode(frame, &mut self.buf);
        let message = Message::Binary(self.buf.split().freeze());
        self.ws.send(message).map_err(io::Error::other)
    }

    fn read_frame(&mut self, deadline: Instant) -> Incoming {
        loop {
            if Instant::now() >= deadline {
                return Incoming::TimedOut;
            }
            if let Err(e) = self
                .ws
                .get_ref()
                .tcp()
                .set_read_timeout(Some(remaining(deadline)))
            {
                return Incoming::Closed(format!("cannot set a read timeout: {e}"));
            }
            match self.ws.read() {
                Ok(Message::Binary(bytes)) => {
                    return match frame::decode(bytes) {
                        Ok(frame) => Incoming::Frame(frame),
                        Err(e) => Incoming::Garbage(format!("binary message: {e}")),
                    };
                }
                Ok(Message::Text(text)) => {
                    self.texts_read += 1;
                    return match frame::from_json(Bytes::from(text).as_ref()) {
                        Ok(frame) => Incoming::Frame(frame),
                        Err(e) => Incoming::Garbage(format!("text message: {e}")),
                    };
                }
                Ok(Message::Close(close)) => {
                    return Incoming::Closed(match close {
                        Some(c) => format!("WebSocket close {} {:?}", u16::from(c.code), c.reason),
                        None => "WebSocket close without a code".into(),
                    });
                }
                // tungstenite answers pings itself; pongs and raw frames carry nothing for us.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(tungstenite::Error::Io(e))
                    if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Incoming::Closed(format!("WebSocket: {e}")),
            }
        }
    }

    fn name(&self) -> &'static str {
        if S::TLS { "wss" } else { "ws" }
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let message = Message::Binary(Bytes::copy_from_slice(bytes));
        self.ws.send(message).map_err(io::Error::other)
    }
}

// -------------------------------------------------------------------------------------------
// UDP
// -------------------------------------------------------------------------------------------

/// How long the UDP client waits for an answer to its LOGIN before sending it again.
const UDP_LOGIN_RESEND: Duration = Duration::from_millis(500);

/// How many LOGIN datagrams the UDP client sends at most (first tries, resends and the ones that
/// answer a RETRY) before it gives up.
const UDP_LOGIN_ATTEMPTS: u32 = 6;

/// A random 64-bit number (a login nonce), from the standard library's randomly seeded hasher:
/// unpredictable enough for a test client.
pub fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    std::hash::RandomState::new().hash_one((DRAWS.fetch_add(1, Ordering::Relaxed), Instant::now()))
}

/// Binds a UDP socket on an ephemeral port of `server`'s loopback family.
pub fn bind_udp_for(server: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    UdpSocket::bind(local)
}

/// Waits for one datagram on `socket` until `deadline`: `Ok(None)` if none came.
pub fn recv_datagram(
    socket: &UdpSocket,
    deadline: Instant,
) -> io::Result<Option<(Bytes, SocketAddr)>> {
    let mut buf = vec![0u8; udp::MAX_DATAGRAM_BYTES + 1];
    loop {
        if Instant::now() >= deadline {
            return Ok(None);
        }
        socket.set_read_timeout(Some(remaining(deadline)))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => return Ok(Some((Bytes::copy_from_slice(&buf[..n]), from))),
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// An established UDP session: what `LoginResult` gave.
#[derive(Debug, Clone)]
struct UdpSession {
    id: u64,
    key: SessionKey,
}

/// UDP: the authenticated datagram envelope of `parley_proto::udp`, written from its spec as
/// an outside client (only `parley_proto` and a `std` socket).
///
/// * The first frame written must be a `Login`: it goes as a LOGIN datagram (cookie 0, a random
///   nonce, padded to 1200 bytes); a RETRY's cookie sends the same LOGIN again; the LOGIN is
///   resent every 500 ms without an answer, a few times. The LOGIN_REPLY's one frame
///   (`LoginResult`, whose key and session id the session then uses, or `Error`) is handed to the
///   next [`Transport::read_frame`]. All of that happens inside that `write_frame`.
/// * Then each frame goes alone in a CLIENT_DATA datagram sealed with the session key, packet
///   numbers counting up by one; SERVER_DATA is opened with the key and checked against a
///   [`ReplayWindow`] (duplicates are dropped and counted). Late RETRY and LOGIN_REPLY datagrams
///   (answers to a resent LOGIN) are ignored.
/// * After a fatal `Error` (or an `Error` that refused the login), reads report
///   [`Incoming::Closed`], as a stream's close would follow it.
/// * A datagram from another address than the broker's, or a SERVER_DATA that does not open,
///   is [`Incoming::Garbage`]: the broker must not send it.
///
/// Nothing is retried after login: loopback does not drop datagrams at the tests' volumes, and
/// the broker retransmits deliveries until acked.
#[derive(Debug)]
pub struct Udp {
    socket: UdpSocket,
    server: SocketAddr,
    session: Option<UdpSession>,
    /// The packet number of the next CLIENT_DATA.
    next_packet_number: u64,
    /// Packet numbers of the SERVER_DATA received.
    received: ReplayWindow,
    /// Frames received and not yet read (a datagram may carry several).
    inbox: VecDeque<pb::Frame>,
    /// Why the session is over, once it is.
    over: Option<String>,
    /// The last datagram sent (for replay tests).
    last_sent: Option<Bytes>,
    /// SERVER_DATA datagrams the replay window refused.
    duplicates: usize,
    /// LOGIN datagrams sent and RETRYs received by the login.
    logins_sent: u32,
    retries_received: u32,
}

impl Udp {
    /// The session id, once logged in.
    pub fn session_id(&self) -> Option<u64> {
        self.session.as_ref().map(|s| s.id)
    }

    /// The session key, once logged in.
    pub fn session_key(&self) -> Option<&SessionKey> {
        self.session.as_ref().map(|s| &s.key)
    }

    /// The broker's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.server
    }

    /// The address datagrams are sent from.
    pub fn local_addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .unwrap_or_else(|e| panic!("a bound UDP socket has an address: {e}"))
    }

    /// The socket datagrams go from and come to (e.g. to wait for a datagram by hand).
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The packet number the next sealed datagram gets.
    pub fn next_packet_number(&self) -> u64 {
        self.next_packet_number
    }

    /// The last datagram sent (LOGIN or CLIENT_DATA), as it went.
    pub fn last_sent(&self) -> Option<&Bytes> {
        self.last_sent.as_ref()
    }

    /// SERVER_DATA datagrams dropped as duplicates (the replay window refused them).
    pub fn duplicates_dropped(&self) -> usize {
        self.duplicates
    }

    /// How many LOGIN datagrams the login sent and how many RETRYs it received.
    pub fn login_datagrams(&self) -> (u32, u32) {
        (self.logins_sent, self.retries_received)
    }

    /// Seals `frames` into one CLIENT_DATA datagram with the next packet number (which it takes)
    /// without sending it. Panics if there is no session.
    pub fn seal_frames(&mut self, frames: &[pb::Frame]) -> io::Result<Bytes> {
        let session = self.session.as_ref().ok_or_else(|| {
            io::Error::new(ErrorKind::NotConnected, "no UDP session: log in first")
        })?;
        let mut out = BytesMut::new();
        udp::seal(
            &session.key,
            Direction::ClientToServer,
            session.id,
            self.next_packet_number,
            frames,
            udp::MAX_DATAGRAM_BYTES,
            &mut out,
        )
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        self.next_packet_number += 1;
        Ok(out.freeze())
    }

    /// Seals already encoded frames (each a frame's protobuf bytes, not checked: malformed
    /// frames on purpose) into one CLIENT_DATA datagram with the next packet number, without
    /// sending it.
    pub fn seal_encoded(&mut self, frames: &[&[u8]]) -> io::Result<Bytes> {
        let session = self.session.as_ref().ok_or_else(|| {
            io::Error::new(ErrorKind::NotConnected, "no UDP session: log in first")
        })?;
        let invalid = |e| io::Error::new(ErrorKind::InvalidInput, e);
        let mut out = BytesMut::new();
        let mut builder = udp::DatagramBuilder::new(
            &mut out,
            Direction::ClientToServer,
            session.id,
            self.next_packet_number,
            udp::MAX_DATAGRAM_BYTES,
        )
        .map_err(invalid)?;
        for frame in frames {
            builder.push_encoded(frame).map_err(invalid)?;
        }
        builder.finish(&session.key).map_err(invalid)?;
        self.next_packet_number += 1;
        Ok(out.freeze())
    }

    /// Sends `datagram` to the broker as it is, from the current socket.
    pub fn send_datagram(&mut self, datagram: &[u8]) -> io::Result<()> {
        let sent = self.socket.send_to(datagram, self.server)?;
        if sent != datagram.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of a {}-byte datagram",
                datagram.len()
            )));
        }
        self.last_sent = Some(Bytes::copy_from_slice(datagram));
        Ok(())
    }

    /// Moves the session to a new socket (a new source port, as after a NAT rebinding); the
    /// key and packet numbers go on. Returns the old socket (still open, to check what it is
    /// sent); the client reads from the new one.
    pub fn rebind(&mut self) -> io::Result<UdpSocket> {
        Ok(std::mem::replace(
            &mut self.socket,
            bind_udp_for(self.server)?,
        ))
    }

    /// Logs in with the `Login` frame `login` (see the type's docs).
    fn login(&mut self, login: &pb::Frame) -> io::Result<()> {
        let nonce = random_u64();
        let mut cookie = 0;
        let mut datagram = BytesMut::new();
        'send: while self.logins_sent < UDP_LOGIN_ATTEMPTS {
            datagram.clear();
            udp::seal_login(
                cookie,
                nonce,
                login,
                udp::MIN_LOGIN_DATAGRAM_BYTES,
                &mut datagram,
            )
            .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
            self.send_datagram(&datagram)?;
            self.logins_sent += 1;
            let deadline = Instant::now() + UDP_LOGIN_RESEND;
            while let Some((answer, from)) = recv_datagram(&self.socket, deadline)? {
                if from != self.server {
                    continue;
                }
                if let Ok(fresh) = udp::open_retry(&answer, nonce) {
                    self.retries_received += 1;
                    cookie = fresh;
                    continue 'send;
                }
                let Ok(reply) = udp::open_login_reply(&answer, nonce) else {
                    continue;
                };
                let frame = frame::decode(Bytes::copy_from_slice(reply.frame)).map_err(|e| {
                    io::Error::new(
                        ErrorKind::InvalidData,
                        format!("the LOGIN_REPLY's frame does not decode: {e}"),
                    )
                })?;
                if let Some(Body::LoginResult(result)) = &frame.body {
                    let key = SessionKey::from_slice(&result.udp_session_key).map_err(|e| {
                        io::Error::new(ErrorKind::InvalidData, format!("udp_session_key: {e}"))
                    })?;
                    let id = reply.header.session_id;
                    if id == 0 || id != result.udp_session_id {
                        return Err(io::Error::new(
                            ErrorKind::InvalidData,
                            format!(
                                "the LOGIN_REPLY's session id {id} is not the LoginResult's \
                                 udp_session_id {}",
                                result.udp_session_id
                            ),
                        ));
                    }
                    self.session = Some(UdpSession { id, key });
                }
                self.inbox.push_back(frame);
                return Ok(());
            }
        }
        Err(io::Error::new(
            ErrorKind::TimedOut,
            format!(
                "no LOGIN_REPLY from {} after {} LOGIN datagrams ({} RETRYs came)",
                self.server, self.logins_sent, self.retries_received
            ),
        ))
    }

    /// Takes a datagram from the broker: its frames go to the inbox. Err: what is wrong with it.
    fn take_datagram(&mut self, datagram: &[u8], from: SocketAddr) -> Result<(), String> {
        if from != self.server {
            return Err(format!(
                "a datagram from {from}, not from the broker's {}",
                self.server
            ));
        }
        let header = udp::peek_header(datagram).map_err(|e| format!("bad datagram: {e}"))?;
        match header.kind {
            // Late answers to a LOGIN sent again.
            DatagramType::Retry | DatagramType::LoginReply => return Ok(()),
            DatagramType::ServerData => {}
            other => return Err(format!("a {other:?} datagram from the broker")),
        }
        let Some(session) = &self.session else {
            return Err("SERVER_DATA before the session exists".into());
        };
        if header.session_id != session.id {
            return Err(format!(
                "SERVER_DATA for session {}, ours is {}",
                header.session_id, session.id
            ));
        }
        let opened = udp::open(&session.key, datagram, Direction::ServerToClient)
            .map_err(|e| format!("SERVER_DATA that does not open under the session key: {e}"))?;
        if self.received.accept(header.packet_number).is_err() {
            self.duplicates += 1;
            return Ok(());
        }
        for raw in opened.frames {
            let frame = frame::decode(Bytes::copy_from_slice(raw))
                .map_err(|e| format!("a frame of a SERVER_DATA does not decode: {e}"))?;
            self.inbox.push_back(frame);
        }
        Ok(())
    }
}

impl Transport for Udp {
    fn open(addr: SocketAddr, _token: Option<&str>) -> io::Result<Self> {
        Ok(Self {
            socket: bind_udp_for(addr)?,
            server: addr,
            session: None,
            next_packet_number: 1,
            received: ReplayWindow::new(),
            inbox: VecDeque::new(),
            over: None,
            last_sent: None,
            duplicates: 0,
            logins_sent: 0,
            retries_received: 0,
        })
    }

    fn write_frame(&mut self, frame: &pb::Frame) -> io::Result<()> {
        if let Some(why) = &self.over {
            return Err(io::Error::new(
                ErrorKind::BrokenPipe,
                format!("the UDP session is over: {why}"),
            ));
        }
        if self.session.is_none() {
            return match frame.body {
                Some(Body::Login(_)) => self.login(frame),
                _ => Err(io::Error::new(
                    ErrorKind::NotConnected,
                    format!(
                        "a UDP session starts with a Login frame, not a {}",
                        frame::body_name(frame)
                    ),
                )),
            };
        }
        let datagram = self.seal_frames(std::slice::from_ref(frame))?;
        self.send_datagram(&datagram)
    }

    fn read_frame(&mut self, deadline: Instant) -> Incoming {
        loop {
            if let Some(frame) = self.inbox.pop_front() {
                if let Some(Body::Error(e)) = &frame.body
                    && (e.fatal || self.session.is_none())
                {
                    self.over = Some(format!(
                        "after the error {} ({:?})",
                        pb::ErrorCode::try_from(e.code)
                            .map_or_else(|_| e.code.to_string(), |c| c.as_str_name().into()),
                        e.message
                    ));
                }
                return Incoming::Frame(frame);
            }
            if let Some(why) = &self.over {
                return Incoming::Closed(why.clone());
            }
            match recv_datagram(&self.socket, deadline) {
                Ok(Some((datagram, from))) => {
                    if let Err(e) = self.take_datagram(&datagram, from) {
                        return Incoming::Garbage(e);
                    }
                }
                Ok(None) => return Incoming::TimedOut,
                Err(e) => return Incoming::Closed(format!("UDP socket error: {e}")),
            }
        }
    }

    fn name(&self) -> &'static str {
        "udp"
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.send_datagram(bytes)
    }
}
