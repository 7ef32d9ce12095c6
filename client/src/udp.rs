//! UDP sessions behind the [`Connector`] seam: [`UdpConnector`].
//!
//! The broker's UDP envelope ([`parley_proto::udp`]) carries the same frames as TCP, so the
//! session does not change: the connection adapter takes the TCP-framed bytes the driver writes,
//! splits them into frames and packs them into authenticated datagrams, and hands the reader the
//! server's frames re-framed as a TCP byte stream.
//!
//! 1. **Login.** The first frame the session writes is its `Login`. The reader thread sends it as
//!    a LOGIN datagram (a random nonce, cookie 0, zero-padded to 1200 bytes); the broker answers
//!    a RETRY carrying a cookie, and the same LOGIN goes again with that cookie; the broker's
//!    LOGIN_REPLY carries one frame, a `LoginResult` (with `udp_session_id` and
//!    `udp_session_key`) or an `Error`. A LOGIN with no answer is sent again after
//!    [`UdpConnector::login_retry`] (500 ms), at most [`UdpConnector::login_attempts`] times in
//!    all, then the connection attempt fails (and the driver tries again after its back-off).
//!    The session gets the reply's frame (the key taken out); after an `Error` the connection
//!    ends.
//! 2. **Data.** Every later datagram is CLIENT_DATA sealed with the session key, numbered from
//!    0, +1 per datagram, packing as many frames as fit in
//!    [`UdpConnector::max_datagram_bytes`] (1200; a larger frame goes alone in a larger
//!    datagram). SERVER_DATA datagrams are opened with the key and kept only if their packet
//!    number is new to a [`ReplayWindow`]; anything else (garbage, a late LOGIN_REPLY, another
//!    session's datagram) is dropped.
//! 3. **Loss.** [`Connector::is_datagram`] is true, so the driver turns on
//!    [`SessionConfig::retry`](crate::SessionConfig::retry): sends, syncs and history requests
//!    whose answer does not come are asked again; the broker retransmits deliveries until they
//!    are acked. A broker that restarted does not know the session and drops its datagrams
//!    without an answer: the session notices the silence
//!    ([`SessionConfig::dead_after`](crate::SessionConfig::dead_after)), and the driver logs in
//!    again (a new UDP session), resends the outbox and syncs.
//!
//! ```no_run
//! use parley_client::{Client, ClientConfig, UdpConnector};
//! let client = Client::start(
//!     UdpConnector::new("127.0.0.1:7405"),
//!     Box::new(|| Ok("token".into())),
//!     ClientConfig::default(),
//! );
//! client.send_text("bob", "hello over UDP")?;
//! # Ok::<(), parley_client::SendError>(())
//! ```

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use parley_proto::pb::{self, frame::Body};
use parley_proto::tcp::FrameCodec;
use parley_proto::udp::{
    self, DatagramBuilder, DatagramType, Direction, MAX_DATAGRAM_BYTES, MIN_DATAGRAM_BYTES,
    MIN_LOGIN_DATAGRAM_BYTES, ReplayWindow, SessionKey, UdpError,
};

use crate::blocking::{Connection, Connector};
use crate::ids::random_seed;
use crate::session::MAX_READ_FRAME_BYTES;

/// How often a blocked read looks whether the connection was shut down.
const POLL: Duration = Duration::from_millis(50);
/// How long the reader waits for the session's `Login` frame before giving up.
const LOGIN_FRAME_WAIT: Duration = Duration::from_secs(10);
/// The most frames held while the login is under way (the session sends none before its
/// `LoginResult`; a bound all the same).
const MAX_QUEUED: usize = 4096;

/// Connects to the broker's UDP listener (`listen.udp`): see the module docs.
#[derive(Debug, Clone)]
pub struct UdpConnector {
    /// The broker's address (`host:port`, resolved again on every attempt).
    addr: String,
    /// Wait for an answer to a LOGIN before sending it again.
    login_retry: Duration,
    /// LOGIN datagrams sent at most per connection attempt.
    login_attempts: u32,
    /// Largest datagram packed with several frames.
    max_datagram_bytes: usize,
}

impl UdpConnector {
    /// A connector to the broker's UDP address `addr` (`host:port`): LOGIN resent after 500 ms
    /// without answer, 8 times at most; datagrams of at most 1200 bytes.
    ///
    /// ```
    /// let c = parley_client::UdpConnector::new("127.0.0.1:7405");
    /// # drop(c);
    /// ```
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            login_retry: Duration::from_millis(500),
            login_attempts: 8,
            max_datagram_bytes: udp::DEFAULT_MAX_DATAGRAM_BYTES,
        }
    }

    /// Sets how long to wait for an answer to a LOGIN before sending it again (at least 10 ms).
    ///
    /// ```
    /// use std::time::Duration;
    /// let c = parley_client::UdpConnector::new("127.0.0.1:7405").login_retry(Duration::from_millis(200));
    /// # drop(c);
    /// ```
    pub fn login_retry(mut self, wait: Duration) -> Self {
        self.login_retry = wait.max(Duration::from_millis(10));
        self
    }

    /// Sets how many LOGIN datagrams one connection attempt sends at most (at least 1; a RETRY
    /// answered counts as one more).
    ///
    /// ```
    /// let c = parley_client::UdpConnector::new("127.0.0.1:7405").login_attempts(4);
    /// # drop(c);
    /// ```
    pub fn login_attempts(mut self, attempts: u32) -> Self {
        self.login_attempts = attempts.max(1);
        self
    }

    /// Sets the largest datagram packed with several frames (clamped to the envelope's limits;
    /// the default 1200 fits any path).
    ///
    /// ```
    /// let c = parley_client::UdpConnector::new("127.0.0.1:7405").max_datagram_bytes(1400);
    /// # drop(c);
    /// ```
    pub fn max_datagram_bytes(mut self, bytes: usize) -> Self {
        self.max_datagram_bytes = bytes.clamp(MIN_DATAGRAM_BYTES, MAX_DATAGRAM_BYTES);
        self
    }
}

impl Connector for UdpConnector {
    fn connect(&mut self) -> io::Result<Connection> {
        let addr = self.addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{:?} resolves to no address", self.addr),
            )
        })?;
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(POLL))?;
        let shared = Arc::new(Shared {
            socket,
            closed: AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
            login_ready: Condvar::new(),
            max_datagram_bytes: self.max_datagram_bytes,
        });
        let reader = UdpReader {
            shared: Arc::clone(&shared),
            login_retry: self.login_retry,
            login_attempts: self.login_attempts,
            session: None,
            window: ReplayWindow::new(),
            out: BytesMut::new(),
            codec: FrameCodec::new(MAX_DATAGRAM_BYTES),
            ended: false,
            recv: vec![0; MAX_DATAGRAM_BYTES + 1],
        };
        let writer = UdpWriter {
            shared: Arc::clone(&shared),
            buf: BytesMut::new(),
            codec: FrameCodec::new(MAX_READ_FRAME_BYTES),
            pending: Vec::new(),
            login_seen: false,
        };
        let closer = shared;
        Ok(Connection::new(
            Box::new(reader),
            Box::new(writer),
            Box::new(move || closer.close()),
        ))
    }

    fn is_datagram(&self) -> bool {
        true
    }
}

/// What the reader and the writer of one UDP connection share.
#[derive(Debug)]
struct Shared {
    /// The socket, connected to the broker (only its datagrams are received).
    socket: UdpSocket,
    /// The connection was shut down.
    closed: AtomicBool,
    /// The login hand-over and the session's key.
    inner: Mutex<Inner>,
    /// Signalled when the `Login` frame is there (or the connection closes).
    login_ready: Condvar,
    /// Largest datagram packed with several frames.
    max_datagram_bytes: usize,
}

/// The mutable part of [`Shared`].
#[derive(Debug, Default)]
struct Inner {
    /// The session's `Login` frame, from the writer to the reader.
    login: Option<pb::Frame>,
    /// The UDP session once logged in: its id and key.
    session: Option<(u64, SessionKey)>,
    /// The next packet number to send.
    next_packet: u64,
    /// Encoded frames written before the login completed.
    queued: Vec<Bytes>,
}

impl Shared {
    /// The inner state, locked.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shuts the connection down: the reader returns end of stream within [`POLL`].
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.login_ready.notify_all();
    }

    /// Whether the connection was shut down.
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Sends one datagram; an ICMP error of an earlier datagram (the broker is not there) is not
    /// an error here: the session notices the silence.
    fn send(&self, datagram: &[u8]) -> io::Result<()> {
        match self.socket.send(datagram) {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Packs `frames` (encoded, without prefixes) into CLIENT_DATA datagrams of session `id`
    /// and sends them.
    fn send_frames(&self, inner: &mut Inner, frames: &[Bytes]) -> io::Result<()> {
        let Some((id, key)) = inner.session.clone() else {
            return Ok(());
        };
        let mut out = BytesMut::new();
        let mut rest = frames;
        while !rest.is_empty() {
            out.clear();
            let packet = inner.next_packet;
            let taken = pack(&mut out, &key, id, packet, self.max_datagram_bytes, rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            rest = rest.get(taken..).unwrap_or_default();
            inner.next_packet += 1;
            self.send(&out)?;
        }
        Ok(())
    }
}

/// Seals the first frames of `frames` that fit into one datagram in `out` (a first frame too
/// large for `max` alone, in a datagram as large as it needs); returns how many it took (at
/// least 1).
fn pack(
    out: &mut BytesMut,
    key: &SessionKey,
    id: u64,
    packet: u64,
    max: usize,
    frames: &[Bytes],
) -> Result<usize, UdpError> {
    let mut builder = DatagramBuilder::new(out, Direction::ClientToServer, id, packet, max)?;
    let mut taken = 0;
    for frame in frames {
        match builder.push_encoded(frame) {
            Ok(()) => taken += 1,
            Err(UdpError::DatagramFull { .. }) => break,
            Err(UdpError::FrameTooLarge { .. }) if builder.is_empty() => {
                drop(builder);
                let mut alone = DatagramBuilder::new(
                    out,
                    Direction::ClientToServer,
                    id,
                    packet,
                    MAX_DATAGRAM_BYTES,
                )?;
                alone.push_encoded(frame)?;
                alone.finish(key)?;
                return Ok(1);
            }
            // Too large for this size: it goes alone in the next datagram.
            Err(UdpError::FrameTooLarge { .. }) => break,
            Err(e) => return Err(e),
        }
    }
    builder.finish(key)?;
    Ok(taken)
}

/// Whether a socket error is one to wait out rather than end the connection on.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
    )
}

/// The writing half: TCP-framed bytes in, datagrams out (on `flush`).
#[derive(Debug)]
struct UdpWriter {
    /// Shared with the reader.
    shared: Arc<Shared>,
    /// Bytes written and not yet split into frames.
    buf: BytesMut,
    /// Splits `buf` into frames.
    codec: FrameCodec,
    /// Whole frames not yet sent.
    pending: Vec<Bytes>,
    /// The `Login` was handed to the reader.
    login_seen: bool,
}

impl Write for UdpWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.shared.is_closed() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the UDP connection was shut down",
            ));
        }
        self.buf.extend_from_slice(bytes);
        while let Some(frame) = self
            .codec
            .decode(&mut self.buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            self.pending.push(frame);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let frames = std::mem::take(&mut self.pending);
        let mut inner = self.shared.lock();
        if inner.session.is_some() {
            return self.shared.send_frames(&mut inner, &frames);
        }
        for encoded in frames {
            if !self.login_seen {
                let frame = parley_proto::frame::decode(encoded.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if matches!(frame.body, Some(Body::Login(_))) {
                    self.login_seen = true;
                    inner.login = Some(frame);
                    self.shared.login_ready.notify_all();
                    continue;
                }
            }
            if inner.queued.len() >= MAX_QUEUED {
                return Err(io::Error::other(
                    "too many frames written before the UDP login completed",
                ));
            }
            inner.queued.push(encoded);
        }
        Ok(())
    }
}

/// The reading half: runs the login, then turns the server's datagrams into TCP-framed bytes.
#[derive(Debug)]
struct UdpReader {
    /// Shared with the writer.
    shared: Arc<Shared>,
    /// Wait for an answer to a LOGIN before sending it again.
    login_retry: Duration,
    /// LOGIN datagrams sent at most.
    login_attempts: u32,
    /// The UDP session once logged in: its id and key.
    session: Option<(u64, SessionKey)>,
    /// Packet numbers of the server's datagrams seen.
    window: ReplayWindow,
    /// TCP-framed bytes for the caller.
    out: BytesMut,
    /// Re-frames the server's frames.
    codec: FrameCodec,
    /// The login failed: end of stream once `out` is read.
    ended: bool,
    /// The receive buffer.
    recv: Vec<u8>,
}

impl Read for UdpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.out.is_empty() {
                let n = buf.len().min(self.out.len());
                buf[..n].copy_from_slice(&self.out[..n]);
                self.out.advance(n);
                return Ok(n);
            }
            if self.ended || self.shared.is_closed() {
                return Ok(0);
            }
            if self.session.is_none() {
                self.login()?;
                continue;
            }
            match self.shared.socket.recv(&mut self.recv) {
                Ok(n) => self.datagram(n),
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl UdpReader {
    /// Waits for the session's `Login`, then runs the LOGIN / RETRY / LOGIN_REPLY exchange;
    /// leaves the reply's frame in `out` (or returns early if the connection is shut down).
    fn login(&mut self) -> io::Result<()> {
        let Some(login) = self.await_login_frame()? else {
            return Ok(());
        };
        let nonce = random_seed();
        let mut cookie = 0;
        let pad = (parley_proto::frame::encoded_len(&login) + udp::HEADER_LEN + 5)
            .max(MIN_LOGIN_DATAGRAM_BYTES);
        let mut datagram = BytesMut::new();
        udp::seal_login(cookie, nonce, &login, pad, &mut datagram)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        for _ in 0..self.login_attempts {
            self.shared.send(&datagram)?;
            let deadline = Instant::now() + self.login_retry;
            while Instant::now() < deadline {
                if self.shared.is_closed() {
                    return Ok(());
                }
                let n = match self.shared.socket.recv(&mut self.recv) {
                    Ok(n) => n,
                    Err(e) if is_transient(&e) => continue,
                    Err(e) => return Err(e),
                };
                let got = self.recv.get(..n).unwrap_or_default();
                match udp::peek_header(got).map(|h| h.kind) {
                    Ok(DatagramType::Retry) => {
                        // A fresh cookie: the same LOGIN with it, at once.
                        let Ok(fresh) = udp::open_retry(got, nonce) else {
                            continue;
                        };
                        if fresh != cookie {
                            cookie = fresh;
                            datagram.clear();
                            udp::seal_login(cookie, nonce, &login, pad, &mut datagram)
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                        }
                        break;
                    }
                    Ok(DatagramType::LoginReply) => {
                        let Ok(opened) = udp::open_login_reply(got, nonce) else {
                            continue;
                        };
                        let raw = Bytes::copy_from_slice(opened.frame);
                        return self.on_login_reply(raw);
                    }
                    // Garbage, or data of an older session: not for this login.
                    _ => {}
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer to the UDP login after {} LOGIN datagrams",
                self.login_attempts
            ),
        ))
    }

    /// The `Login` frame the session wrote (None: the connection was shut down meanwhile).
    fn await_login_frame(&self) -> io::Result<Option<pb::Frame>> {
        let deadline = Instant::now() + LOGIN_FRAME_WAIT;
        let mut inner = self.shared.lock();
        loop {
            if let Some(frame) = inner.login.take() {
                return Ok(Some(frame));
            }
            if self.shared.is_closed() {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the session wrote no Login",
                ));
            }
            inner = self
                .shared
                .login_ready
                .wait_timeout(inner, POLL.min(deadline - now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The frame of the LOGIN_REPLY: a `LoginResult` starts the session (its key taken out
    /// before the session sees it), an `Error` ends the connection after it is read.
    fn on_login_reply(&mut self, raw: Bytes) -> io::Result<()> {
        let mut frame = parley_proto::frame::decode(raw)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match &mut frame.body {
            Some(Body::LoginResult(r)) => {
                let id = r.udp_session_id;
                let key = SessionKey::from_slice(&r.udp_session_key)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if id == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "LoginResult without a udp_session_id",
                    ));
                }
                r.udp_session_key = Vec::new();
                self.session = Some((id, key.clone()));
                let mut inner = self.shared.lock();
                inner.session = Some((id, key));
                let queued = std::mem::take(&mut inner.queued);
                self.shared.send_frames(&mut inner, &queued)?;
            }
            Some(Body::Error(_)) => self.ended = true,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the LOGIN_REPLY carries neither a LoginResult nor an Error",
                ));
            }
        }
        self.codec
            .encode(&frame, &mut self.out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// One datagram of `self.recv[..n]` from the broker: its frames, if it is a new datagram
    /// of this session; otherwise nothing.
    fn datagram(&mut self, n: usize) {
        let Some((id, key)) = &self.session else {
            return;
        };
        let got = self.recv.get(..n).unwrap_or_default();
        let Ok(opened) = udp::open(key, got, Direction::ServerToClient) else {
            return;
        };
        if opened.header.session_id != *id
            || self.window.accept(opened.header.packet_number).is_err()
        {
            return;
        }
        for frame in opened.frames {
            // A frame is never larger than a datagram, the codec's limit: this cannot fail.
            let _ = self.codec.encode_raw(frame, &mut self.out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(n: u64, pad: usize) -> Bytes {
        let frame = pb::Frame {
            request_id: n,
            body: Some(Body::Send(pb::Send {
                body: Bytes::from(vec![b'x'; pad]),
                ..pb::Send::default()
            })),
        };
        let mut out = BytesMut::new();
        parley_proto::frame::encode(&frame, &mut out);
        out.freeze()
    }

    #[test]
    fn frames_are_packed_up_to_the_size_and_a_large_one_goes_alone() {
        let key = SessionKey::new(&[3; udp::SESSION_KEY_LEN]);
        let frames: Vec<Bytes> = (0..10).map(|i| ping(i, 300)).collect();
        let mut out = BytesMut::new();
        let n = pack(&mut out, &key, 7, 0, 1200, &frames).expect("pack");
        assert_eq!(n, 3, "three 300-byte frames fit in 1200 bytes");
        assert!(out.len() <= 1200);
        let opened = udp::open(&key, &out, Direction::ClientToServer).expect("opens");
        assert_eq!(opened.frames.count(), 3);

        let big = vec![ping(1, 5000), ping(2, 10)];
        out.clear();
        assert_eq!(pack(&mut out, &key, 7, 1, 1200, &big).expect("pack"), 1);
        assert!(out.len() > 5000);
        assert!(udp::open(&key, &out, Direction::ClientToServer).is_ok());
        // A large frame after a small one waits for the next datagram.
        let mixed = vec![ping(1, 10), ping(2, 5000)];
        out.clear();
        assert_eq!(pack(&mut out, &key, 7, 2, 1200, &mixed).expect("pack"), 1);
        assert!(out.len() <= 1200);
    }
}
