//! The client side of parley's UDP sessions, sans-IO: the envelope of `parley_proto::udp`
//! around the frames a [`crate::driver::parley::ParleyDriver`] writes.
//!
//! The driver speaks TCP framing (varint-length-delimited frames) whatever the transport; over
//! UDP the engine hands the driver's output to a [`UdpSession`], which
//!
//! 1. takes the first frame (the `Login`) and logs in: a LOGIN padded to 1200 bytes with a
//!    random nonce and cookie 0, the same LOGIN again with the cookie of the broker's RETRY, and
//!    a LOGIN_REPLY carrying `LoginResult` (its session id and 32-byte key) or an `Error`. With
//!    no answer it sends the LOGIN again after [`LOGIN_RESEND_NS`], doubling, at most
//!    [`LOGIN_ATTEMPTS`] times;
//! 2. then packs every later frame into CLIENT_DATA datagrams of at most `max_datagram` bytes
//!    (a single larger frame goes alone in a datagram of its own size), sealed with the session
//!    key and numbered from a random start, one more per datagram;
//! 3. opens the broker's SERVER_DATA datagrams (tag, direction, [`ReplayWindow`]) and hands their
//!    frames back to the driver in TCP framing;
//! 4. since UDP may lose datagrams, keeps every `Send` until its `SendAck` comes and sends it again
//!    (same bytes, same `client_msg_id`: the broker stores it once and answers the same ack)
//!    after [`SEND_RTO_NS`], doubling up to [`MAX_SEND_RTO_NS`]; the broker retransmits its
//!    `Deliver`s until acked, and the driver (in its re-ordering mode) acks only the unbroken
//!    run of seqs it holds, so a lost delivery is sent again;
//! 5. sends a `Ping` when nothing else was sent for most of `LoginResult.heartbeat_interval_ms`.
//!
//! It owns no socket and no clock: the engine passes the time in and sends the datagrams it
//! returns ([`UdpSession::next_datagram`]). Garbage, forged or replayed datagrams are dropped
//! and counted ([`UdpSession::dropped`]), never answered.

use std::collections::{BTreeMap, VecDeque};

use bytes::{Buf, Bytes, BytesMut};
use parley_proto::frame;
use parley_proto::pb::{self, frame::Body};
use parley_proto::tcp::FrameCodec;
use parley_proto::udp::{
    self, DatagramBuilder, DatagramType, Direction, HEADER_LEN, MAX_DATAGRAM_BYTES,
    MIN_LOGIN_DATAGRAM_BYTES, ReplayWindow, SessionKey, TAG_LEN, UdpError,
};
use prost::encoding::{WireType, decode_key, decode_varint};

/// First wait for an answer to a LOGIN before sending it again.
pub const LOGIN_RESEND_NS: u64 = 500_000_000;
/// LOGINs sent at most (waits of 0.5, 1, 2, 2, … s between them) before the login fails.
pub const LOGIN_ATTEMPTS: u32 = 8;
/// RETRY datagrams accepted for one login (each answered by the LOGIN with its cookie).
pub const MAX_RETRIES: u32 = 8;
/// First wait for a `SendAck` before the `Send` goes again.
pub const SEND_RTO_NS: u64 = 1_000_000_000;
/// Longest wait between two copies of a `Send`.
pub const MAX_SEND_RTO_NS: u64 = 8_000_000_000;
/// The keep-alive interval when the broker names none.
const DEFAULT_HEARTBEAT_NS: u64 = 15_000_000_000;
/// Frame field numbers read here (checked against prost in the tests).
const FRAME_SEND: u32 = 20;
const FRAME_SEND_ACK: u32 = 21;
const SEND_CLIENT_MSG_ID: u32 = 2;
const SEND_ACK_CLIENT_MSG_ID: u32 = 1;

/// Where the session is.
#[derive(Debug)]
enum State {
    /// Waiting for the driver's `Login` frame.
    Start,
    /// The LOGIN is out; waiting for RETRY or LOGIN_REPLY.
    LoggingIn {
        login: Box<pb::Frame>,
        nonce: u64,
        cookie: u64,
        attempts: u32,
        retries: u32,
        resend_ns: u64,
    },
    /// Logged in: data both ways under `key`.
    Open { id: u64, key: SessionKey },
    /// The login failed or the session broke; nothing more is sent.
    Failed,
}

/// A `Send` not acknowledged yet.
#[derive(Debug)]
struct Unacked {
    frame: Bytes,
    due_ns: u64,
    rto_ns: u64,
}

/// One client's UDP session.
#[derive(Debug)]
pub struct UdpSession {
    state: State,
    max_datagram: usize,
    codec: FrameCodec,
    /// Encoded frames (no prefix) waiting for a datagram.
    queue: VecDeque<Bytes>,
    /// `Send`s waiting for their `SendAck`, by `client_msg_id`.
    sends: BTreeMap<u64, Unacked>,
    /// The earliest `due_ns` in `sends` (or later: then the scan finds nothing).
    next_due_ns: u64,
    /// Sealed datagrams waiting for the socket.
    datagrams: VecDeque<Bytes>,
    scratch: BytesMut,
    next_pn: u64,
    replay: ReplayWindow,
    last_sent_ns: u64,
    heartbeat_ns: u64,
    ping_nonce: u64,
    retransmits: u64,
    dropped: u64,
    /// The login's nonce (drawn by the caller, so this stays sans-IO).
    nonce: u64,
}

/// An error the session cannot go on after.
fn fatal(what: &str, e: impl std::fmt::Display) -> String {
    format!("udp: {what}: {e}")
}

impl UdpSession {
    /// A session that logs in with `nonce`, numbers its data datagrams from `first_pn` and packs
    /// frames into datagrams of at most `max_datagram` bytes.
    pub fn new(nonce: u64, first_pn: u64, max_datagram: usize) -> Self {
        Self {
            state: State::Start,
            max_datagram: max_datagram.clamp(udp::MIN_DATAGRAM_BYTES + 64, MAX_DATAGRAM_BYTES),
            codec: FrameCodec::new(parley_proto::DEFAULT_MAX_FRAME_BYTES),
            queue: VecDeque::new(),
            sends: BTreeMap::new(),
            next_due_ns: u64::MAX,
            datagrams: VecDeque::new(),
            scratch: BytesMut::new(),
            // Keep well clear of wrapping however many datagrams a run sends.
            next_pn: first_pn >> 2,
            replay: ReplayWindow::new(),
            last_sent_ns: 0,
            heartbeat_ns: DEFAULT_HEARTBEAT_NS,
            ping_nonce: 0,
            retransmits: 0,
            dropped: 0,
            nonce,
        }
    }

    /// Whether the login completed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// `Send`s sent again for want of a `SendAck`.
    pub fn retransmits(&self) -> u64 {
        self.retransmits
    }

    /// Datagrams dropped: not parley, not for this session, forged, replayed or late.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// `Send`s not acknowledged yet.
    pub fn unacked(&self) -> usize {
        self.sends.len()
    }

    /// The next datagram to send, if any.
    pub fn next_datagram(&mut self) -> Option<Bytes> {
        self.datagrams.pop_front()
    }

    /// Puts back a datagram the socket could not take now (it goes first next time).
    pub fn unsend(&mut self, datagram: Bytes) {
        self.datagrams.push_front(datagram);
    }

    /// Whether datagrams are waiting for the socket.
    pub fn has_datagrams(&self) -> bool {
        !self.datagrams.is_empty()
    }

    /// Takes the complete frames the driver wrote into `plain` (TCP framing) and turns them into
    /// datagrams: the first one must be the `Login`.
    ///
    /// # Errors
    ///
    /// The driver's bytes are not frames, or its first frame is not a `Login`.
    pub fn write(&mut self, plain: &mut BytesMut, now_ns: u64) -> Result<(), String> {
        if matches!(self.state, State::Failed) {
            plain.clear();
            return Ok(());
        }
        while let Some(raw) = self
            .codec
            .decode(plain)
            .map_err(|e| fatal("the driver's frames", e))?
        {
            if let State::Start = self.state {
                let login = frame::decode(raw).map_err(|e| fatal("the login frame", e))?;
                if !matches!(login.body, Some(Body::Login(_))) {
                    return Err("udp: the first frame must be a Login".into());
                }
                self.state = State::LoggingIn {
                    login: Box::new(login),
                    nonce: self.nonce,
                    cookie: 0,
                    attempts: 0,
                    retries: 0,
                    resend_ns: 0,
                };
                self.send_login(now_ns)?;
                continue;
            }
            if body_field(&raw) == Some(FRAME_SEND)
                && let Some(id) =
                    field_in(&raw, FRAME_SEND).and_then(|s| varint_in(s, SEND_CLIENT_MSG_ID))
            {
                let due_ns = now_ns.saturating_add(SEND_RTO_NS);
                self.next_due_ns = self.next_due_ns.min(due_ns);
                self.sends.insert(
                    id,
                    Unacked {
                        frame: raw.clone(),
                        due_ns,
                        rto_ns: SEND_RTO_NS,
                    },
                );
            }
            self.queue.push_back(raw);
        }
        self.pack(now_ns)
    }

    fn send_login(&mut self, now_ns: u64) -> Result<(), String> {
        let State::LoggingIn {
            login,
            nonce,
            cookie,
            attempts,
            resend_ns,
            ..
        } = &mut self.state
        else {
            return Ok(());
        };
        *attempts += 1;
        let wait = LOGIN_RESEND_NS << (*attempts - 1).min(2);
        *resend_ns = now_ns.saturating_add(wait);
        udp::seal_login(
            *cookie,
            *nonce,
            login,
            MIN_LOGIN_DATAGRAM_BYTES,
            &mut self.scratch,
        )
        .map_err(|e| fatal("sealing the login", e))?;
        self.datagrams.push_back(self.scratch.split().freeze());
        self.last_sent_ns = now_ns;
        Ok(())
    }

    /// Packs the queued frames into sealed datagrams (once the session is open).
    fn pack(&mut self, now_ns: u64) -> Result<(), String> {
        let State::Open { id, key } = &self.state else {
            return Ok(());
        };
        while !self.queue.is_empty() {
            let mut builder = DatagramBuilder::new(
                &mut self.scratch,
                Direction::ClientToServer,
                *id,
                self.next_pn,
                self.max_datagram,
            )
            .map_err(|e| fatal("a datagram", e))?;
            while let Some(front) = self.queue.front() {
                match builder.push_encoded(front) {
                    Ok(()) => {
                        self.queue.pop_front();
                    }
                    Err(UdpError::DatagramFull { .. }) => break,
                    Err(UdpError::FrameTooLarge { .. }) if builder.is_empty() => break,
                    Err(e) => return Err(fatal("packing a frame", e)),
                }
            }
            if builder.is_empty() {
                // One frame larger than the usual datagram: alone, in one of its own size.
                drop(builder);
                let Some(front) = self.queue.pop_front() else {
                    break;
                };
                let size = (HEADER_LEN + TAG_LEN + 5 + front.len()).min(MAX_DATAGRAM_BYTES);
                let mut alone = DatagramBuilder::new(
                    &mut self.scratch,
                    Direction::ClientToServer,
                    *id,
                    self.next_pn,
                    size,
                )
                .map_err(|e| fatal("a datagram", e))?;
                alone
                    .push_encoded(&front)
                    .map_err(|e| fatal("a frame too large for any datagram", e))?;
                alone.finish(key).map_err(|e| fatal("sealing", e))?;
            } else {
                builder.finish(key).map_err(|e| fatal("sealing", e))?;
            }
            self.next_pn += 1;
            self.datagrams.push_back(self.scratch.split().freeze());
            self.last_sent_ns = now_ns;
        }
        Ok(())
    }

    /// Takes one datagram from the broker; the frames it carries are appended to `input` in
    /// TCP framing, for the driver. Datagrams that do not belong are dropped and counted.
    ///
    /// # Errors
    ///
    /// The login was refused (its `Error` frame is in `input`, for the driver to report) or its
    /// answer is unusable: the session is over.
    pub fn receive(
        &mut self,
        datagram: &[u8],
        now_ns: u64,
        input: &mut BytesMut,
    ) -> Result<(), String> {
        let Ok(header) = udp::peek_header(datagram) else {
            self.dropped += 1;
            return Ok(());
        };
        match (&mut self.state, header.kind) {
            (
                State::LoggingIn {
                    nonce,
                    cookie,
                    retries,
                    attempts,
                    ..
                },
                DatagramType::Retry,
            ) => {
                let Ok(fresh) = udp::open_retry(datagram, *nonce) else {
                    self.dropped += 1;
                    return Ok(());
                };
                *retries += 1;
                if *retries > MAX_RETRIES {
                    self.state = State::Failed;
                    return Err(format!(
                        "udp: login answered by {MAX_RETRIES} RETRYs and nothing else"
                    ));
                }
                *cookie = fresh;
                // The cookie is progress: the LOGIN goes again now, with a fresh attempt count.
                *attempts = 0;
                self.send_login(now_ns)
            }
            (State::LoggingIn { nonce, .. }, DatagramType::LoginReply) => {
                let Ok(reply) = udp::open_login_reply(datagram, *nonce) else {
                    self.dropped += 1;
                    return Ok(());
                };
                let raw = Bytes::copy_from_slice(reply.frame);
                let frame = frame::decode(raw.clone()).map_err(|e| {
                    self.state = State::Failed;
                    fatal("the login reply", e)
                })?;
                match frame.body {
                    Some(Body::LoginResult(r)) => {
                        if r.udp_session_id == 0 || r.udp_session_id != reply.header.session_id {
                            self.state = State::Failed;
                            return Err(format!(
                                "udp: the login reply names session {} in its header and {} in its LoginResult",
                                reply.header.session_id, r.udp_session_id
                            ));
                        }
                        let key = SessionKey::from_slice(&r.udp_session_key).map_err(|e| {
                            self.state = State::Failed;
                            fatal("the session key", e)
                        })?;
                        if r.heartbeat_interval_ms > 0 {
                            // Well inside the interval, so a late timer turn still makes it.
                            self.heartbeat_ns = u64::from(r.heartbeat_interval_ms) * 800_000;
                        }
                        self.state = State::Open {
                            id: r.udp_session_id,
                            key,
                        };
                        self.codec
                            .encode_raw(&raw, input)
                            .map_err(|e| fatal("the login result", e))?;
                        self.pack(now_ns)
                    }
                    Some(Body::Error(e)) => {
                        self.state = State::Failed;
                        let _ = self.codec.encode_raw(&raw, input);
                        let code = pb::ErrorCode::try_from(e.code)
                            .map(|c| c.as_str_name())
                            .unwrap_or("UNKNOWN");
                        Err(format!("udp: login refused: {code}: {}", e.message))
                    }
                    _ => {
                        self.state = State::Failed;
                        Err(format!(
                            "udp: the login reply carries a {} frame",
                            frame::body_name(&frame)
                        ))
                    }
                }
            }
            (State::Open { key, .. }, DatagramType::ServerData) => {
                let Ok(opened) = udp::open(key, datagram, Direction::ServerToClient) else {
                    self.dropped += 1;
                    return Ok(());
                };
                if opened.header.session_id != self.session_id()
                    || self.replay.accept(opened.header.packet_number).is_err()
                {
                    self.dropped += 1;
                    return Ok(());
                }
                for raw in opened.frames {
                    if body_field(raw) == Some(FRAME_SEND_ACK)
                        && let Some(id) = field_in(raw, FRAME_SEND_ACK)
                            .and_then(|a| varint_in(a, SEND_ACK_CLIENT_MSG_ID))
                    {
                        self.sends.remove(&id);
                    }
                    self.codec
                        .encode_raw(raw, input)
                        .map_err(|e| fatal("a frame from the broker", e))?;
                }
                Ok(())
            }
            // Late answers to a LOGIN sent twice, stray datagrams: not for us now.
            _ => {
                self.dropped += 1;
                Ok(())
            }
        }
    }

    fn session_id(&self) -> u64 {
        match &self.state {
            State::Open { id, .. } => *id,
            _ => 0,
        }
    }

    /// Runs the timers at `now_ns`: the login's resend, `Send`s whose ack is late, the
    /// keep-alive.
    ///
    /// # Errors
    ///
    /// The login went unanswered [`LOGIN_ATTEMPTS`] times.
    pub fn tick(&mut self, now_ns: u64) -> Result<(), String> {
        match &self.state {
            State::LoggingIn {
                attempts,
                resend_ns,
                ..
            } => {
                if now_ns < *resend_ns {
                    return Ok(());
                }
                if *attempts >= LOGIN_ATTEMPTS {
                    self.state = State::Failed;
                    return Err(format!(
                        "udp: no answer to the login after {LOGIN_ATTEMPTS} attempts"
                    ));
                }
                self.send_login(now_ns)
            }
            State::Open { .. } => {
                if now_ns >= self.next_due_ns {
                    let mut next = u64::MAX;
                    for u in self.sends.values_mut() {
                        if u.due_ns <= now_ns {
                            self.queue.push_back(u.frame.clone());
                            self.retransmits += 1;
                            u.rto_ns = (u.rto_ns * 2).min(MAX_SEND_RTO_NS);
                            u.due_ns = now_ns.saturating_add(u.rto_ns);
                        }
                        next = next.min(u.due_ns);
                    }
                    self.next_due_ns = next;
                }
                if self.queue.is_empty()
                    && now_ns.saturating_sub(self.last_sent_ns) >= self.heartbeat_ns
                {
                    self.ping_nonce += 1;
                    let ping = pb::Frame {
                        request_id: 0,
                        body: Some(Body::Ping(pb::Ping {
                            nonce: self.ping_nonce,
                        })),
                    };
                    let mut buf = BytesMut::new();
                    frame::encode(&ping, &mut buf);
                    self.queue.push_back(buf.freeze());
                }
                self.pack(now_ns)
            }
            State::Start | State::Failed => Ok(()),
        }
    }
}

/// The number of the `Frame.body` field `frame` (a protobuf `Frame`) carries, if any.
fn body_field(frame: &[u8]) -> Option<u32> {
    let mut buf = frame;
    while buf.has_remaining() {
        let (number, wire) = decode_key(&mut buf).ok()?;
        if number >= 10 {
            return Some(number);
        }
        skip(&mut buf, wire)?;
    }
    None
}

/// The bytes of length-delimited field `number` of the protobuf message `msg`.
fn field_in(msg: &[u8], number: u32) -> Option<&[u8]> {
    let mut buf = msg;
    while buf.has_remaining() {
        let (n, wire) = decode_key(&mut buf).ok()?;
        if n == number && wire == WireType::LengthDelimited {
            let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
            return buf.get(..len);
        }
        skip(&mut buf, wire)?;
    }
    None
}

/// Varint field `number` of the protobuf message `msg` (0 if absent, as proto3 says).
fn varint_in(msg: &[u8], number: u32) -> Option<u64> {
    let mut buf = msg;
    while buf.has_remaining() {
        let (n, wire) = decode_key(&mut buf).ok()?;
        if n == number && wire == WireType::Varint {
            return decode_varint(&mut buf).ok();
        }
        skip(&mut buf, wire)?;
    }
    Some(0)
}

fn skip(buf: &mut &[u8], wire: WireType) -> Option<()> {
    let n = match wire {
        WireType::Varint => {
            decode_varint(buf).ok()?;
            0
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => usize::try_from(decode_varint(buf).ok()?).ok()?,
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    if buf.len() < n {
        return None;
    }
    buf.advance(n);
    Some(())
}
