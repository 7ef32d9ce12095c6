//! The ways a test client reaches the broker: raw TCP with varint-delimited frames ([`Tcp`],
//! through `parley_proto::tcp::FrameCodec`) and WebSocket binary messages ([`Ws`], through
//! tungstenite, an implementation independent of the broker's), each over a plain socket or
//! over TLS ([`TlsStream`]: a rustls client session, see [`connect_tls`]).
//!
//! All are blocking `std::net` sockets whose every read and write is bounded by a timeout.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parley_proto::frame;
use parley_proto::pb;
use parley_proto::tcp::FrameCodec;
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
}
