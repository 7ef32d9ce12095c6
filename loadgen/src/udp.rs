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
//!    when it is judged lost: at once when a send sent after it was acked and it is older than
//!    9/8 of the round trip (QUIC's rule), else after a timeout of at least [`SEND_RTO_NS`],
//!    adapted to the acks' round trip as TCP does (RFC 6298, timing only sends never sent
//!    again), doubling per copy up to [`MAX_SEND_RTO_NS`], and only once no ack at all came for
//!    that long, and then only the [`PROBE_SENDS`] oldest (QUIC's probe: once their acks come,
//!    the first rule finds the rest), so a broker that is merely slow or stalled for a moment is
//!    not sent its backlog twice;
//!    the broker retransmits its
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
/// Least wait for a `SendAck` before the `Send` goes again (the first one, before any round
/// trip was measured).
pub const SEND_RTO_NS: u64 = 1_000_000_000;
/// Longest wait between two copies of a `Send`.
pub const MAX_SEND_RTO_NS: u64 = 8_000_000_000;
/// Sends resent at most per timeout when the broker is quiet (the oldest ones).
pub const PROBE_SENDS: usize = 2;
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
    /// When it was first sent; `None` once sent again (its ack then times nothing: Karn).
    first_ns: Option<u64>,
    /// When it was last sent.
    sent_ns: u64,
    /// Its place in the order of transmissions (of sends) when last sent.
    order: u64,
}

impl Unacked {
    /// Queues the frame again and backs its timer off.
    fn resend(&mut self, now_ns: u64, order: &mut u64, queue: &mut VecDeque<Bytes>) {
        queue.push_back(self.frame.clone());
        *order += 1;
        self.order = *order;
        self.rto_ns = (self.rto_ns * 2).min(MAX_SEND_RTO_NS);
        self.first_ns = None;
        self.sent_ns = now_ns;
        self.due_ns = now_ns.saturating_add(self.rto_ns);
    }
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
    /// Smoothed round trip of sends and its variation (RFC 6298), once measured.
    srtt_ns: Option<u64>,
    /// The last round trip measured.
    latest_rtt_ns: u64,
    /// Sends transmitted so far (copies included): numbers their order.
    send_order: u64,
    /// The latest place in that order of an acked send that went once: unacked sends sent
    /// before it were overtaken.
    largest_acked_order: u64,
    /// Before this the timeout does not fire: a timeout after the last `SendAck` (or the first
    /// send with none outstanding), longer after each probe of a quiet broker.
    quiet_until_ns: u64,
    /// Probes sent since the last `SendAck` (each doubles the wait for the next).
    probes: u32,
    rttvar_ns: u64,
    /// The timeout of a new send.
    rto_ns: u64,
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
            srtt_ns: None,
            latest_rtt_ns: 0,
            send_order: 0,
            largest_acked_order: 0,
            quiet_until_ns: 0,
            probes: 0,
            rttvar_ns: 0,
            rto_ns: SEND_RTO_NS,
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
                if self.sends.is_empty() {
                    // Silence is counted from when there is something to answer.
                    self.quiet_until_ns = now_ns.saturating_add(self.rto_ns);
                    self.probes = 0;
                }
                let due_ns = now_ns.saturating_add(self.rto_ns);
                self.next_due_ns = self.next_due_ns.min(due_ns);
                self.sends.insert(
                    id,
                    Unacked {
                        frame: raw.clone(),
                        due_ns,
                        rto_ns: self.rto_ns,
                        first_ns: Some(now_ns),
                        sent_ns: now_ns,
                        order: {
                            self.send_order += 1;
                            self.send_order
                        },
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
                    Err(UdpError::FrameTooLarge { .. }) => break,
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
                        self.quiet_until_ns = now_ns;
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
                        && let Some(u) = self.sends.remove(&id)
                    {
                        self.acked(&u, now_ns);
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

    /// Send `u` was acked at `now_ns`: every send last sent before it and still unacked may now
    /// be judged lost (a probe's ack included: that is how a burst lost whole is found), and its
    /// round trip (if it went once: Karn) updates the timeout.
    fn acked(&mut self, u: &Unacked, now_ns: u64) {
        self.probes = 0;
        self.quiet_until_ns = now_ns.saturating_add(self.rto_ns);
        self.largest_acked_order = self.largest_acked_order.max(u.order);
        let Some(first) = u.first_ns else { return };
        let sample = now_ns.saturating_sub(first);
        self.latest_rtt_ns = sample;
        let (srtt, rttvar) = match self.srtt_ns {
            None => (sample, sample / 2),
            Some(srtt) => (
                srtt - srtt / 8 + sample / 8,
                self.rttvar_ns - self.rttvar_ns / 4 + srtt.abs_diff(sample) / 4,
            ),
        };
        self.srtt_ns = Some(srtt);
        self.rttvar_ns = rttvar;
        self.rto_ns = srtt
            .saturating_add(4 * rttvar)
            .clamp(SEND_RTO_NS, MAX_SEND_RTO_NS);
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
                // Lost, as QUIC judges it: a send sent later was acked, and this one is older
                // than 9/8 of the round trip (a little re-ordering is not loss). Sends go in
                // `client_msg_id` order, so the scan stops at the first one not overtaken.
                if let Some(srtt) = self.srtt_ns {
                    let threshold = srtt.max(self.latest_rtt_ns) / 8 * 9;
                    for u in self.sends.values_mut() {
                        if u.order >= self.largest_acked_order {
                            if u.first_ns.is_some() {
                                break;
                            }
                            continue; // sent again lately: later sends may still be older
                        }
                        if now_ns.saturating_sub(u.sent_ns) >= threshold {
                            u.resend(now_ns, &mut self.send_order, &mut self.queue);
                            self.retransmits += 1;
                            self.next_due_ns = self.next_due_ns.min(u.due_ns);
                        }
                    }
                }
                // The timeout, for the last sends (nothing later to overtake them) or a broker
                // gone quiet: only once no ack at all came for a timeout, so a broker that is
                // slow but answering is not sent its backlog twice; and then only the
                // [`PROBE_SENDS`] oldest go (QUIC's probe), the wait doubling per probe: once
                // their acks come, the loss rule above finds what else was lost.
                if now_ns >= self.next_due_ns && now_ns >= self.quiet_until_ns {
                    let mut next = u64::MAX;
                    let mut probed = 0;
                    for u in self.sends.values_mut() {
                        if u.due_ns <= now_ns && probed < PROBE_SENDS {
                            u.resend(now_ns, &mut self.send_order, &mut self.queue);
                            self.retransmits += 1;
                            probed += 1;
                        }
                        next = next.min(u.due_ns);
                    }
                    self.next_due_ns = next;
                    if probed > 0 {
                        self.probes = (self.probes + 1).min(4);
                        self.quiet_until_ns = now_ns.saturating_add(self.rto_ns << self.probes);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::udp::{Opened, seal, seal_login_reply, seal_retry};

    const NONCE: u64 = 0xfeed;
    const SESSION: u64 = 77;
    const KEY: [u8; 32] = [9; 32];
    const MS: u64 = 1_000_000;

    fn framed(frames: &[pb::Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for f in frames {
            FrameCodec::default().encode(f, &mut out).expect("fits");
        }
        out
    }

    fn login() -> pb::Frame {
        pb::Frame {
            request_id: 1,
            body: Some(Body::Login(pb::Login {
                protocol_version: 1,
                token: "tok".into(),
                client_name: "test".into(),
            })),
        }
    }

    fn send(id: u64) -> pb::Frame {
        pb::Frame {
            request_id: 0,
            body: Some(Body::Send(pb::Send {
                to: Some(pb::Conversation {
                    r#type: pb::ConversationType::Direct as i32,
                    id: "peer".into(),
                }),
                client_msg_id: id,
                content_type: 1,
                body: Bytes::from_static(b"hello"),
                ..Default::default()
            })),
        }
    }

    fn send_ack(id: u64) -> pb::Frame {
        pb::Frame {
            request_id: 0,
            body: Some(Body::SendAck(pb::SendAck {
                client_msg_id: id,
                seq: id,
                ..Default::default()
            })),
        }
    }

    fn datagrams(s: &mut UdpSession) -> Vec<Bytes> {
        std::iter::from_fn(|| s.next_datagram()).collect()
    }

    /// The `Send` frames of the datagrams waiting (keep-alives aside).
    fn sends_in(s: &mut UdpSession) -> Vec<pb::Frame> {
        datagrams(s)
            .iter()
            .flat_map(|d| client_frames(d))
            .filter(|f| matches!(f.body, Some(Body::Send(_))))
            .collect()
    }

    fn frames_of(opened: Opened<'_>) -> Vec<pb::Frame> {
        opened
            .frames
            .map(|f| frame::decode(Bytes::copy_from_slice(f)).expect("a frame"))
            .collect()
    }

    /// The broker's side of a successful login: the session is open afterwards.
    fn open_session(s: &mut UdpSession, input: &mut BytesMut) {
        s.write(&mut framed(&[login()]), 0).expect("login");
        let first = datagrams(s);
        assert_eq!(first.len(), 1);
        let opened = udp::open_login(&first[0]).expect("a LOGIN");
        assert_eq!(
            (opened.header.session_id, opened.header.packet_number),
            (0, NONCE),
            "a first LOGIN carries cookie 0 and the nonce"
        );
        assert_eq!(first[0].len(), MIN_LOGIN_DATAGRAM_BYTES, "padded");
        let mut retry = BytesMut::new();
        seal_retry(4242, NONCE, &mut retry).expect("retry");
        s.receive(&retry, MS, input).expect("a retry is fine");
        let again = datagrams(s);
        assert_eq!(again.len(), 1, "the LOGIN goes again at once");
        let opened = udp::open_login(&again[0]).expect("a LOGIN");
        assert_eq!(opened.header.session_id, 4242, "with the cookie");
        let result = pb::Frame {
            request_id: 1,
            body: Some(Body::LoginResult(pb::LoginResult {
                udp_session_id: SESSION,
                udp_session_key: KEY.to_vec(),
                heartbeat_interval_ms: 1000,
                ..Default::default()
            })),
        };
        let mut reply = BytesMut::new();
        seal_login_reply(SESSION, NONCE, &result, opened.datagram_len, &mut reply).expect("reply");
        s.receive(&reply, 2 * MS, input).expect("logged in");
        assert!(s.is_open());
        let got = FrameCodec::default()
            .decode_frame(input)
            .expect("valid")
            .expect("the login result is handed to the driver");
        assert!(matches!(got.body, Some(Body::LoginResult(_))));
    }

    fn server_data(pn: u64, frames: &[pb::Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        seal(
            &SessionKey::new(&KEY),
            Direction::ServerToClient,
            SESSION,
            pn,
            frames,
            1200,
            &mut out,
        )
        .expect("sealed");
        out
    }

    fn client_frames(d: &[u8]) -> Vec<pb::Frame> {
        frames_of(udp::open(&SessionKey::new(&KEY), d, Direction::ClientToServer).expect("opens"))
    }

    #[test]
    fn the_login_goes_through_retry_then_reply_and_later_frames_are_sealed_with_the_key() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        let mut input = BytesMut::new();
        open_session(&mut s, &mut input);
        s.write(&mut framed(&[send(1), send(2)]), 3 * MS)
            .expect("sends");
        let out = datagrams(&mut s);
        assert_eq!(out.len(), 1, "two small frames share one datagram");
        let frames = client_frames(&out[0]);
        assert_eq!(frames, vec![send(1), send(2)]);
    }

    #[test]
    fn packet_numbers_increase_by_one_per_datagram() {
        let mut s = UdpSession::new(NONCE, 400, 1200);
        open_session(&mut s, &mut BytesMut::new());
        let mut pns = Vec::new();
        for i in 1..=3 {
            s.write(&mut framed(&[send(i)]), 3 * MS).expect("send");
            for d in datagrams(&mut s) {
                pns.push(udp::peek_header(&d).expect("header").packet_number);
            }
        }
        assert_eq!(pns, vec![pns[0], pns[0] + 1, pns[0] + 2]);
    }

    #[test]
    fn many_frames_fill_datagrams_up_to_the_limit_and_a_big_one_goes_alone() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        open_session(&mut s, &mut BytesMut::new());
        let many: Vec<pb::Frame> = (1..=100).map(send).collect();
        s.write(&mut framed(&many), 3 * MS).expect("sends");
        let out = datagrams(&mut s);
        assert!(
            out.len() > 1 && out.iter().all(|d| d.len() <= 1200),
            "{out:?}"
        );
        let back: Vec<pb::Frame> = out.iter().flat_map(|d| client_frames(d)).collect();
        assert_eq!(back, many, "every frame, in order");
        let mut big = send(99);
        if let Some(Body::Send(m)) = &mut big.body {
            m.body = Bytes::from(vec![7u8; 5000]);
        }
        s.write(&mut framed(&[send(98), big.clone()]), 4 * MS)
            .expect("send");
        let out = datagrams(&mut s);
        assert_eq!(out.len(), 2);
        assert!(out[1].len() > 5000);
        assert_eq!(client_frames(&out[1]), vec![big]);
    }

    #[test]
    fn an_unanswered_login_is_sent_again_then_fails() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        s.write(&mut framed(&[login()]), 0).expect("login");
        assert_eq!(datagrams(&mut s).len(), 1);
        s.tick(LOGIN_RESEND_NS - 1).expect("not yet");
        assert!(datagrams(&mut s).is_empty());
        let mut now = 0;
        let mut sent = 1;
        let failed = loop {
            now += 100 * MS;
            match s.tick(now) {
                Ok(()) => sent += datagrams(&mut s).len() as u32,
                Err(e) => break e,
            }
            assert!(now < 60_000 * MS, "gives up in bounded time");
        };
        assert_eq!(sent, LOGIN_ATTEMPTS);
        assert!(failed.contains("no answer"), "{failed}");
    }

    #[test]
    fn a_refused_login_ends_the_session_and_hands_the_error_to_the_driver() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        s.write(&mut framed(&[login()]), 0).expect("login");
        let login_len = datagrams(&mut s)[0].len();
        let refusal = pb::Frame {
            request_id: 1,
            body: Some(Body::Error(pb::Error {
                code: pb::ErrorCode::BadToken as i32,
                message: "no".into(),
                fatal: true,
                ..Default::default()
            })),
        };
        let mut reply = BytesMut::new();
        seal_login_reply(0, NONCE, &refusal, login_len, &mut reply).expect("reply");
        let mut input = BytesMut::new();
        let e = s.receive(&reply, MS, &mut input).expect_err("refused");
        assert!(e.contains("BAD_TOKEN"), "{e}");
        let got = FrameCodec::default()
            .decode_frame(&mut input)
            .expect("valid")
            .expect("the error frame");
        assert_eq!(got, refusal);
    }

    #[test]
    fn a_reply_to_another_nonce_or_garbage_is_dropped() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        s.write(&mut framed(&[login()]), 0).expect("login");
        let mut retry = BytesMut::new();
        seal_retry(5, NONCE + 1, &mut retry).expect("retry");
        let mut input = BytesMut::new();
        s.receive(&retry, MS, &mut input).expect("dropped");
        s.receive(b"\x00garbage", MS, &mut input).expect("dropped");
        assert_eq!(s.dropped(), 2);
        assert!(!s.is_open() && input.is_empty());
    }

    #[test]
    fn a_send_goes_again_until_its_ack_comes_then_never_again() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        open_session(&mut s, &mut BytesMut::new());
        let t0 = 10 * MS;
        s.write(&mut framed(&[send(1), send(2)]), t0).expect("send");
        datagrams(&mut s);
        s.tick(t0 + SEND_RTO_NS - MS).expect("tick");
        assert!(sends_in(&mut s).is_empty(), "not before the timeout");
        s.tick(t0 + SEND_RTO_NS).expect("tick");
        assert_eq!(sends_in(&mut s), vec![send(1), send(2)], "the same frames");
        assert_eq!(s.retransmits(), 2);
        // Send 1 is acked; 2 goes again after a doubled wait.
        let mut input = BytesMut::new();
        s.receive(
            &server_data(1, &[send_ack(1)]),
            t0 + SEND_RTO_NS + MS,
            &mut input,
        )
        .expect("ack");
        assert_eq!(s.unacked(), 1);
        s.tick(t0 + 2 * SEND_RTO_NS).expect("tick");
        assert!(
            sends_in(&mut s).is_empty(),
            "send 2 waits twice as long now"
        );
        s.tick(t0 + 3 * SEND_RTO_NS).expect("tick");
        assert_eq!(sends_in(&mut s), vec![send(2)]);
        s.receive(
            &server_data(2, &[send_ack(2)]),
            t0 + 3 * SEND_RTO_NS,
            &mut input,
        )
        .expect("ack");
        assert_eq!(s.unacked(), 0);
        s.tick(t0 + 100 * SEND_RTO_NS).expect("tick");
        assert!(
            sends_in(&mut s).is_empty(),
            "an acked send never goes again"
        );
        let acks = std::iter::from_fn(|| {
            FrameCodec::default()
                .decode_frame(&mut input)
                .ok()
                .flatten()
        })
        .count();
        assert_eq!(acks, 2, "the acks reach the driver");
    }

    #[test]
    fn server_datagrams_are_checked_for_key_direction_and_replay() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        open_session(&mut s, &mut BytesMut::new());
        let mut input = BytesMut::new();
        let d = server_data(5, &[send_ack(1)]);
        s.receive(&d, 3 * MS, &mut input).expect("fine");
        s.receive(&d, 3 * MS, &mut input)
            .expect("a replay is dropped");
        let mut forged = BytesMut::new();
        seal(
            &SessionKey::new(&[1; 32]),
            Direction::ServerToClient,
            SESSION,
            6,
            &[send_ack(2)],
            1200,
            &mut forged,
        )
        .expect("sealed");
        s.receive(&forged, 3 * MS, &mut input)
            .expect("a forgery is dropped");
        let mut reflected = BytesMut::new();
        seal(
            &SessionKey::new(&KEY),
            Direction::ClientToServer,
            SESSION,
            7,
            &[send_ack(3)],
            1200,
            &mut reflected,
        )
        .expect("sealed");
        s.receive(&reflected, 3 * MS, &mut input)
            .expect("a reflection is dropped");
        assert_eq!(s.dropped(), 3);
        let frames = std::iter::from_fn(|| {
            FrameCodec::default()
                .decode_frame(&mut input)
                .ok()
                .flatten()
        })
        .count();
        assert_eq!(
            frames, 1,
            "only the genuine datagram's frame reaches the driver"
        );
    }

    #[test]
    fn a_quiet_session_pings_within_the_heartbeat_interval() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        open_session(&mut s, &mut BytesMut::new());
        // Logged in at 2 ms with a 1000 ms interval: a ping goes by 800 ms after the last send.
        s.tick(500 * MS).expect("tick");
        assert!(datagrams(&mut s).is_empty());
        s.tick(900 * MS).expect("tick");
        let out = datagrams(&mut s);
        assert_eq!(out.len(), 1);
        assert!(matches!(
            client_frames(&out[0])[0].body,
            Some(Body::Ping(_))
        ));
    }

    #[test]
    fn the_field_numbers_read_by_hand_match_the_schema() {
        let mut buf = BytesMut::new();
        frame::encode(&send(300), &mut buf);
        assert_eq!(body_field(&buf), Some(FRAME_SEND));
        let inner = field_in(&buf, FRAME_SEND).expect("the send");
        assert_eq!(varint_in(inner, SEND_CLIENT_MSG_ID), Some(300));
        let mut buf = BytesMut::new();
        frame::encode(&send_ack(301), &mut buf);
        assert_eq!(body_field(&buf), Some(FRAME_SEND_ACK));
        let inner = field_in(&buf, FRAME_SEND_ACK).expect("the ack");
        assert_eq!(varint_in(inner, SEND_ACK_CLIENT_MSG_ID), Some(301));
        assert_eq!(body_field(b"\xff\xff"), None, "garbage is no frame");
    }

    #[test]
    fn the_send_timeout_follows_a_slow_brokers_round_trip() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        open_session(&mut s, &mut BytesMut::new());
        let mut input = BytesMut::new();
        let slow = 3_000 * MS;
        // Send 1 is answered after 3 s: it went again once (its ack then times nothing).
        s.write(&mut framed(&[send(1)]), 0).expect("send");
        s.tick(1_100 * MS).expect("tick");
        assert_eq!(
            s.retransmits(),
            1,
            "no ack at all for a timeout: it goes again"
        );
        s.receive(&server_data(1, &[send_ack(1)]), slow, &mut input)
            .expect("ack");
        assert_eq!(s.rto_ns, SEND_RTO_NS, "no sample from a send sent twice");
        // Send 2 goes once and is answered after 0.9 s: the first sample.
        s.write(&mut framed(&[send(2)]), slow).expect("send");
        s.receive(&server_data(2, &[send_ack(2)]), slow + 900 * MS, &mut input)
            .expect("ack");
        assert_eq!(s.srtt_ns, Some(900 * MS));
        assert_eq!(s.rto_ns, 900 * MS + 4 * 450 * MS, "srtt + 4 rttvar");
        // Send 3, sent now, waits that long before it goes again.
        let t = slow + SEND_RTO_NS;
        s.write(&mut framed(&[send(3)]), t).expect("send");
        datagrams(&mut s);
        s.tick(t + SEND_RTO_NS).expect("tick");
        assert!(
            sends_in(&mut s).is_empty(),
            "not after the least timeout: the broker is slower than that"
        );
        s.tick(t + 2_700 * MS).expect("tick");
        assert_eq!(s.retransmits(), 2, "after srtt + 4 rttvar");
    }

    #[test]
    fn a_send_overtaken_by_a_later_acked_one_goes_again_before_its_timeout() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        open_session(&mut s, &mut BytesMut::new());
        let mut input = BytesMut::new();
        let t = 10 * MS;
        s.write(&mut framed(&[send(1), send(2), send(3)]), t)
            .expect("send");
        datagrams(&mut s);
        // 2 and 3 are acked after 100 ms; 1's datagram (say) was lost.
        s.receive(
            &server_data(1, &[send_ack(2), send_ack(3)]),
            t + 100 * MS,
            &mut input,
        )
        .expect("acks");
        s.tick(t + 105 * MS).expect("tick");
        assert!(
            sends_in(&mut s).is_empty(),
            "within 9/8 of the round trip: maybe re-ordered"
        );
        s.tick(t + 120 * MS).expect("tick");
        assert_eq!(sends_in(&mut s), vec![send(1)], "overtaken: lost");
        s.receive(&server_data(40, &[send_ack(1)]), t + 150 * MS, &mut input)
            .expect("ack");
        // A slow broker acks a backlog in order, one every 100 ms: the last sends wait far
        // past the least timeout, and go again only once the acks stop.
        let backlog: Vec<pb::Frame> = (4..=33).map(send).collect();
        let t = t + 200 * MS;
        s.write(&mut framed(&backlog), t).expect("send");
        datagrams(&mut s);
        let before = s.retransmits();
        for i in 0..29 {
            let now = t + (i + 1) * 100 * MS;
            s.receive(&server_data(41 + i, &[send_ack(4 + i)]), now, &mut input)
                .expect("ack");
            s.tick(now).expect("tick");
        }
        assert_eq!(
            s.retransmits(),
            before,
            "nothing went twice while acks flowed"
        );
        assert_eq!(s.unacked(), 1, "send 33");
        s.tick(t + 2_900 * MS + s.rto_ns).expect("tick");
        assert!(
            sends_in(&mut s).contains(&send(33)),
            "the acks stopped: 33 goes again"
        );
    }

    #[test]
    fn a_quiet_broker_is_probed_with_the_oldest_sends_not_sent_the_whole_window() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        open_session(&mut s, &mut BytesMut::new());
        let window: Vec<pb::Frame> = (1..=64).map(send).collect();
        let t = 10 * MS;
        s.write(&mut framed(&window), t).expect("send");
        datagrams(&mut s);
        s.tick(t + SEND_RTO_NS).expect("tick");
        assert_eq!(
            sends_in(&mut s),
            vec![send(1), send(2)],
            "a probe: the two oldest"
        );
        s.tick(t + 2 * SEND_RTO_NS).expect("tick");
        assert!(
            sends_in(&mut s).is_empty(),
            "the next probe waits twice as long"
        );
        s.tick(t + 3 * SEND_RTO_NS).expect("tick");
        assert_eq!(
            sends_in(&mut s),
            vec![send(1), send(2)],
            "the oldest again, not the window"
        );
        // The broker comes back and acks everything, in order: nothing else goes again.
        let mut input = BytesMut::new();
        let now = t + 3 * SEND_RTO_NS + 10 * MS;
        for id in 1..=64 {
            s.receive(&server_data(id, &[send_ack(id)]), now, &mut input)
                .expect("ack");
        }
        s.tick(now + 20 * SEND_RTO_NS).expect("tick");
        assert!(sends_in(&mut s).is_empty());
        assert_eq!((s.retransmits(), s.unacked()), (4, 0));
    }

    #[test]
    fn a_window_lost_whole_goes_again_once_the_probe_is_acked() {
        let mut s = UdpSession::new(NONCE, 0, 1200);
        let mut input = BytesMut::new();
        open_session(&mut s, &mut input);
        // A round trip is known.
        let t = 10 * MS;
        s.write(&mut framed(&[send(1)]), t).expect("send");
        datagrams(&mut s);
        s.receive(&server_data(1, &[send_ack(1)]), t + 10 * MS, &mut input)
            .expect("ack");
        // A whole window is lost.
        let t = t + 100 * MS;
        let window: Vec<pb::Frame> = (2..=65).map(send).collect();
        s.write(&mut framed(&window), t).expect("send");
        datagrams(&mut s);
        s.tick(t + SEND_RTO_NS).expect("tick");
        assert_eq!(sends_in(&mut s), vec![send(2), send(3)], "a probe");
        // The probe's ack shows the path works: the rest of the window goes at once, not two
        // by two with the wait doubling.
        let now = t + SEND_RTO_NS + 10 * MS;
        s.receive(&server_data(2, &[send_ack(2)]), now, &mut input)
            .expect("ack");
        s.tick(now).expect("tick");
        let again = sends_in(&mut s);
        assert_eq!(again, (4..=65).map(send).collect::<Vec<_>>());
    }
}
