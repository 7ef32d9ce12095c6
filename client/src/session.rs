//! The sans-IO session: the client's side of the protocol as a state machine.
//!
//! It owns no socket, thread, clock or randomness. The driver tells it that a connection is up
//! ([`Session::connected`]), hands it what the server sent ([`Session::handle_bytes`] for the
//! TCP stream framing, or [`Session::handle_frame`]), that the connection ended
//! ([`Session::disconnected`]) and the time ([`Session::handle_timeout`] at
//! [`Session::poll_timeout`]); it takes out frames to send ([`Session::poll_transmit`]), whether
//! to close the connection ([`Session::take_close`]) and events for the application
//! ([`Session::poll_event`]). Every input takes `now`.
//!
//! What it does, per connection:
//!
//! 1. sends `Login` (with the token the driver got), and waits for `LoginResult` (at most
//!    [`SessionConfig::login_timeout`]);
//! 2. sends the whole [outbox](crate::outbox) again, in order, with the same client message ids;
//! 3. sends a `SyncRequest` with the [inbox]'s cursor per conversation, takes the
//!    pages until `done` ([`Event::Synced`]);
//! 4. then: new sends go out at once; deliveries are de-duplicated and ordered by the inbox and
//!    acknowledged with one cumulative `DeliverAck` per batch of frames; a gap that lasts
//!    [`SessionConfig::gap_timeout`] (or a `Behind`) starts another sync; a `Ping` goes out when
//!    nothing was sent for half the server's heartbeat interval, and a connection from which
//!    nothing was heard for [`SessionConfig::dead_after`] (default: twice the heartbeat
//!    interval, at least 5 s) is closed.
//!
//! Over a transport that loses, duplicates and reorders frames (UDP: the broker retransmits
//! `Deliver` until acked, and nothing else), set [`SessionConfig::retry`] (the blocking driver
//! does for a [datagram connector](crate::Connector::is_datagram)): then a `Send` whose
//! `SendAck` has not come within the retry timeout is sent again with the same client message id
//! (the broker stores it once and answers the same `SendAck`), a sync whose next page has not
//! come is started again from the inbox's cursors, and a history request whose page has not come
//! is sent again with the same request id, each with a doubling timeout. Duplicated answers are
//! harmless (acks and pages are matched to what is outstanding, messages de-duplicated by seq).
//! Requests made with [`Session::request`] are not retried (they need not be idempotent).
//!
//! The outbox and the inbox outlive connections (not the process: they are in memory).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parley_proto::pb::{self, frame::Body};
use parley_proto::tcp::{FrameCodec, TcpFrameError};
use parley_proto::{DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION};

use crate::event::{DisconnectReason, Event};
use crate::ids::{ClientMsgIds, RequestIds};
use crate::inbox::{self, ConversationKey, Inbox, Released, Source};
use crate::outbox::{MIN_RETRY, Outbox};

/// Largest frame accepted from the server, whatever it announces (bounds memory).
pub const MAX_READ_FRAME_BYTES: usize = 4 << 20;

/// Content type of UTF-8 text (an application convention the `chat` command uses).
pub const TEXT: u32 = 1;

/// Settings of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Sent in `Login.client_name` (at most 64 bytes), for the operator's logs.
    pub client_name: String,
    /// Seed of the client message ids (see [`crate::ids`]); use a random value.
    pub id_seed: u64,
    /// How long to wait for the answer to `Login`.
    pub login_timeout: Duration,
    /// How long a gap in a conversation may stay open before a sync is started to fill it.
    pub gap_timeout: Duration,
    /// The most messages held above a gap per conversation.
    pub max_held: usize,
    /// `SyncRequest.page_size` (0: the server's default).
    pub sync_page_size: u32,
    /// A connection from which nothing was heard this long is closed (None: twice the server's
    /// heartbeat interval, at least 5 s).
    pub dead_after: Option<Duration>,
    /// Retry sends, syncs and history requests whose answer does not come (None: never, as a
    /// stream transport needs; the blocking driver sets it for a datagram connector).
    pub retry: Option<RetryConfig>,
}

/// How long to wait for an answer before asking again over a lossy transport: `initial` after
/// the first try, twice as long after each further one, at most `max`.
///
/// ```
/// use std::time::Duration;
/// use parley_client::RetryConfig;
/// let r = RetryConfig::default();
/// assert_eq!(r.delay(1), r.initial);
/// assert_eq!(r.delay(2), r.initial * 2);
/// assert_eq!(r.delay(50), r.max);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// The wait after the first try.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for RetryConfig {
    /// 1 s, doubling up to 8 s.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
        }
    }
}

impl RetryConfig {
    /// The wait for an answer after the `tries`-th try (1 for the first).
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = parley_client::RetryConfig { initial: Duration::from_millis(300), max: Duration::from_secs(1) };
    /// assert_eq!(r.delay(2), Duration::from_millis(600));
    /// assert_eq!(r.delay(3), Duration::from_secs(1));
    /// ```
    pub fn delay(&self, tries: u32) -> Duration {
        self.initial
            .saturating_mul(1u32 << tries.saturating_sub(1).min(20))
            .min(self.max)
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            client_name: "parley-client".into(),
            id_seed: 1,
            login_timeout: Duration::from_secs(10),
            gap_timeout: Duration::from_millis(500),
            max_held: 10_000,
            sync_page_size: 0,
            dead_after: None,
            retry: None,
        }
    }
}

impl SessionConfig {
    /// The default settings with [`SessionConfig::retry`] on: for a transport that loses frames.
    ///
    /// ```
    /// let config = parley_client::SessionConfig::lossy();
    /// assert!(config.retry.is_some());
    /// ```
    pub fn lossy() -> Self {
        Self {
            retry: Some(RetryConfig::default()),
            ..Self::default()
        }
    }
}

/// What the pages of one sync request brought (lossy transports: a sync's pages may be lost or
/// come out of order, so its end may skip gaps only if every page came).
#[derive(Debug, Clone, Default)]
struct SyncStats {
    /// The cursors it was asked from.
    cursors: Vec<(ConversationKey, u64)>,
    /// The summary's count of the messages its pages carry.
    total: Option<u64>,
    /// The (conversation, seq) its pages carried.
    seen: std::collections::BTreeSet<(ConversationKey, u64)>,
    /// Per conversation, the highest seq its pages carried.
    tops: HashMap<ConversationKey, u64>,
}

/// A request of the session's own sent again if its answer does not come (lossy transports).
#[derive(Debug, Clone)]
struct Retrying {
    /// The frame's body, as sent.
    body: Body,
    /// When it was last sent (None: sent, time not known yet).
    sent_at: Option<Instant>,
    /// How often it was sent.
    tries: u32,
}

/// Heartbeat used when the server does not state one.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// The shortest time without news after which a connection counts as dead.
const MIN_DEAD_AFTER: Duration = Duration::from_secs(5);

/// Why a send was not accepted by the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The recipient is empty.
    EmptyRecipient,
    /// The encoded frame would be larger than the server accepts.
    TooLarge {
        /// Its encoded size.
        bytes: usize,
        /// The server's limit.
        max: usize,
    },
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::EmptyRecipient => f.write_str("the recipient is empty"),
            SendError::TooLarge { bytes, max } => write!(
                f,
                "message too long ({bytes} bytes encoded; the server takes at most {max})"
            ),
        }
    }
}

impl std::error::Error for SendError {}

/// Where the session stands with its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No connection.
    Disconnected,
    /// Connected, `Login` sent, no answer yet.
    LoggingIn,
    /// Logged in.
    Ready,
}

/// What a request of the session's own was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// The Login.
    Login,
    /// A SyncRequest.
    Sync,
    /// A HistoryRequest.
    History,
    /// A request made with [`Session::request`].
    Other,
}

/// The client's side of the protocol (see the module docs).
#[derive(Debug)]
pub struct Session {
    /// Settings.
    config: SessionConfig,
    /// Connection state.
    state: State,
    /// Client message ids.
    ids: ClientMsgIds,
    /// Request ids.
    request_ids: RequestIds,
    /// Requests awaiting their answer on this connection.
    requests: HashMap<u64, Request>,
    /// Unacknowledged sends.
    outbox: Outbox,
    /// De-duplication and order of received messages.
    inbox: Inbox,
    /// Frames to send.
    transmit: VecDeque<pb::Frame>,
    /// Events for the application.
    events: VecDeque<Event>,
    /// The TCP framing (inbound).
    codec: FrameCodec,
    /// Inbound bytes not yet decoded.
    buf: BytesMut,
    /// The largest frame the server accepts.
    max_frame_bytes: usize,
    /// Half the heartbeat interval: a Ping goes out when nothing was sent this long.
    ping_every: Duration,
    /// Close a connection silent this long.
    dead_after: Duration,
    /// When the current connection started (login deadline).
    connected_at: Option<Instant>,
    /// When something was last sent.
    last_sent: Instant,
    /// When something was last heard.
    last_heard: Instant,
    /// The running sync's request id.
    sync: Option<u64>,
    /// When the running sync was sent or last made progress (None: time not known yet).
    sync_at: Option<Instant>,
    /// How often the running sync was (re)started without completing.
    sync_tries: u32,
    /// Every request id of the running sync (it is asked again over a lossy transport; the
    /// broker refuses a second one while the first runs, whose pages then still count).
    sync_ids: Vec<u64>,
    /// What each of them brought (lossy transports only).
    sync_stats: HashMap<u64, SyncStats>,
    /// The cursors and seqs of the last sync that ended with fewer messages than its summary
    /// announced (lossy transports): a second one alike confirms the gaps are for good.
    last_incomplete: Option<SyncStats>,
    /// History requests awaiting their page, to send again (with [`SessionConfig::retry`]).
    retrying: HashMap<u64, Retrying>,
    /// The session asks the driver to close the connection.
    close: bool,
    /// Ping nonces.
    nonce: u64,
}

impl Session {
    /// A session with no connection yet.
    ///
    /// ```
    /// use parley_client::{Session, SessionConfig};
    /// let session = Session::new(SessionConfig::default(), std::time::Instant::now());
    /// assert_eq!(session.state(), parley_client::State::Disconnected);
    /// ```
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        Self {
            ids: ClientMsgIds::new(config.id_seed),
            inbox: Inbox::new(config.max_held),
            config,
            state: State::Disconnected,
            request_ids: RequestIds::default(),
            requests: HashMap::new(),
            outbox: Outbox::default(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            codec: FrameCodec::new(MAX_READ_FRAME_BYTES),
            buf: BytesMut::new(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            ping_every: DEFAULT_HEARTBEAT / 2,
            dead_after: DEFAULT_HEARTBEAT * 2,
            connected_at: None,
            last_sent: now,
            last_heard: now,
            sync: None,
            sync_at: None,
            sync_tries: 0,
            sync_ids: Vec::new(),
            sync_stats: HashMap::new(),
            last_incomplete: None,
            retrying: HashMap::new(),
            close: false,
            nonce: 0,
        }
    }

    // -----------------------------------------------------------------------------------------
    // The application's calls
    // -----------------------------------------------------------------------------------------

    /// Queues a text message to user `to` (a direct conversation); returns its client message
    /// id. It goes out now if logged in, else after the next login; it stays in the outbox until
    /// acknowledged ([`Event::Acked`]) or refused ([`Event::Refused`]).
    ///
    /// ```
    /// use parley_client::{Session, SessionConfig};
    /// let mut s = Session::new(SessionConfig::default(), std::time::Instant::now());
    /// let id = s.send_text("bob", "hi").expect("valid");
    /// assert_eq!(s.unacked(), vec![id]);
    /// ```
    pub fn send_text(&mut self, to: &str, text: &str) -> Result<u64, SendError> {
        self.send(direct(to), TEXT, Bytes::copy_from_slice(text.as_bytes()))
    }

    /// Queues a message of `content_type` to conversation `to`; returns its client message id
    /// (see [`Session::send_text`]).
    ///
    /// ```
    /// use parley_client::{Session, SessionConfig, direct};
    /// let mut s = Session::new(SessionConfig::default(), std::time::Instant::now());
    /// assert!(s.send(direct("bob"), 2, bytes::Bytes::from_static(b"{}")).is_ok());
    /// ```
    pub fn send(
        &mut self,
        to: pb::Conversation,
        content_type: u32,
        body: Bytes,
    ) -> Result<u64, SendError> {
        self.send_message(pb::Send {
            to: Some(to),
            content_type,
            body,
            ..pb::Send::default()
        })
    }

    /// Queues `send` as it is (a RECALL or EDIT, say), with a fresh client message id (any id
    /// it carries is replaced); returns that id.
    ///
    /// ```
    /// use parley_client::{Session, SessionConfig, direct, pb};
    /// let mut s = Session::new(SessionConfig::default(), std::time::Instant::now());
    /// let recall = pb::Send { to: Some(direct("bob")), kind: pb::MessageKind::Recall as i32,
    ///                         ref_seq: 3, ..pb::Send::default() };
    /// assert!(s.send_message(recall).is_ok());
    /// ```
    pub fn send_message(&mut self, mut send: pb::Send) -> Result<u64, SendError> {
        if send.to.as_ref().is_none_or(|c| c.id.is_empty()) {
            return Err(SendError::EmptyRecipient);
        }
        send.client_msg_id = self.ids.next_id();
        let frame = send_frame(send.clone());
        let bytes = parley_proto::frame::encoded_len(&frame);
        if bytes > self.max_frame_bytes {
            return Err(SendError::TooLarge {
                bytes,
                max: self.max_frame_bytes,
            });
        }
        let id = send.client_msg_id;
        self.outbox.push(send);
        if self.state == State::Ready {
            // Not `now`-dependent: a fresh send has no retry time; it is stamped when the
            // driver reports it sent.
            self.flush_outbox_unstamped();
        }
        Ok(id)
    }

    /// Asks for a page of a conversation's history; the answer comes as
    /// [`Event::HistoryPage`] (or [`Event::RequestFailed`]) with the returned request id.
    /// `before_seq` pages backwards (0: from the newest), `after_seq` forwards (it wins if set).
    /// History pages bypass the inbox: they are shown as they are, whatever was shown before.
    /// Made while not logged in, the request is lost with the connection: ask again after
    /// [`Event::Connected`] if no answer came.
    ///
    /// ```
    /// use parley_client::{Session, SessionConfig, direct};
    /// let mut s = Session::new(SessionConfig::default(), std::time::Instant::now());
    /// let id = s.history(direct("bob"), 0, None, 50);
    /// assert_ne!(id, 0);
    /// ```
    pub fn history(
        &mut self,
        conversation: pb::Conversation,
        before_seq: u64,
        after_seq: Option<u64>,
        limit: u32,
    ) -> u64 {
        let body = Body::HistoryRequest(pb::HistoryRequest {
            conversation: Some(conversation),
            before_seq,
            after_seq,
            limit,
        });
        let id = self.start_request(Request::History, body.clone());
        if self.config.retry.is_some() && self.requests.contains_key(&id) {
            self.retrying.insert(
                id,
                Retrying {
                    body,
                    sent_at: None,
                    tries: 1,
                },
            );
        }
        id
    }

    /// Sends any other request (group, presence, room, receipt ...); its answer comes as
    /// [`Event::Response`] (or [`Event::RequestFailed`]) with the returned request id. Only sent
    /// when logged in: returns None otherwise.
    ///
    /// ```
    /// use parley_client::{Session, SessionConfig, pb};
    /// let mut s = Session::new(SessionConfig::default(), std::time::Instant::now());
    /// let ask = pb::frame::Body::PresenceRequest(pb::PresenceRequest::default());
    /// assert_eq!(s.request(ask), None); // not logged in
    /// ```
    pub fn request(&mut self, body: Body) -> Option<u64> {
        (self.state == State::Ready).then(|| self.start_request(Request::Other, body))
    }

    // -----------------------------------------------------------------------------------------
    // The driver's inputs
    // -----------------------------------------------------------------------------------------

    /// A new connection is up: queues the `Login` with `token`. Any previous connection is
    /// taken as ended.
    ///
    /// ```
    /// use parley_client::{Session, SessionConfig, State};
    /// let now = std::time::Instant::now();
    /// let mut s = Session::new(SessionConfig::default(), now);
    /// s.connected(now, "token".into());
    /// assert_eq!(s.state(), State::LoggingIn);
    /// assert!(s.poll_transmit().is_some()); // the Login
    /// ```
    pub fn connected(&mut self, now: Instant, token: String) {
        if self.state != State::Disconnected {
            self.disconnected(now, DisconnectReason::Closed);
        }
        self.state = State::LoggingIn;
        self.close = false;
        self.buf.clear();
        self.codec = FrameCodec::new(MAX_READ_FRAME_BYTES);
        self.connected_at = Some(now);
        self.last_heard = now;
        self.last_sent = now;
        let id = self.request_ids.next_id();
        self.requests.insert(id, Request::Login);
        self.push_frame(
            id,
            Body::Login(pb::Login {
                protocol_version: PROTOCOL_VERSION,
                token,
                client_name: self.config.client_name.clone(),
            }),
        );
    }

    /// The connection ended (the driver saw end of stream or an error). Does nothing if the
    /// session already considers itself disconnected.
    pub fn disconnected(&mut self, _now: Instant, reason: DisconnectReason) {
        if self.state == State::Disconnected {
            return;
        }
        self.state = State::Disconnected;
        self.transmit.clear();
        self.requests.clear();
        self.retrying.clear();
        self.end_sync();
        self.last_incomplete = None;
        self.connected_at = None;
        self.outbox.reset();
        self.events.push_back(Event::Disconnected { reason });
    }

    /// Bytes read from a TCP stream (length-delimited frames). A stream that is not frames
    /// disconnects the session (see [`Session::take_close`]).
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) {
        if self.state == State::Disconnected {
            return;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            match self.codec.decode_frame(&mut self.buf) {
                Ok(Some(frame)) => {
                    self.handle_frame(now, frame);
                    if self.state == State::Disconnected {
                        return;
                    }
                }
                Ok(None) => break,
                // A frame of a newer schema, or one that does not decode: skipped.
                Err(TcpFrameError::Frame(_)) => {}
                Err(e) => {
                    self.close_with(now, DisconnectReason::Protocol(e.to_string()));
                    return;
                }
            }
        }
        self.flush_acks();
    }

    /// One frame from the server. (After a batch of frames from [`Session::handle_frame`], the
    /// driver should call [`Session::flush_acks`]; [`Session::handle_bytes`] does.)
    pub fn handle_frame(&mut self, now: Instant, frame: pb::Frame) {
        if self.state == State::Disconnected {
            return;
        }
        self.last_heard = now;
        let request_id = frame.request_id;
        let Some(body) = frame.body else { return };
        match body {
            Body::LoginResult(r) => self.on_login(now, request_id, r),
            Body::Error(e) => self.on_error(now, request_id, e),
            Body::Ping(p) => self.push_frame(
                request_id,
                Body::Pong(pb::Pong {
                    nonce: p.nonce,
                    time: 0,
                }),
            ),
            Body::Pong(_) => {
                self.requests.remove(&request_id);
            }
            Body::SendAck(a) => self.on_send_ack(now, a),
            Body::Deliver(d) => {
                let mut out = Vec::new();
                for m in d.messages {
                    self.inbox.receive(m, Source::Deliver, now, &mut out);
                }
                self.release(out);
            }
            Body::SyncSummary(summary) => {
                if let Some(stats) = self.sync_stats.get_mut(&request_id) {
                    stats.total = Some(summary.total_messages);
                }
            }
            Body::SyncPage(p) => {
                let mut out = Vec::new();
                let lossy = self.config.retry.is_some();
                let current = self.sync_ids.contains(&request_id);
                for m in p.messages {
                    if let (Some(stats), Some(c)) = (
                        self.sync_stats.get_mut(&request_id),
                        m.conversation.as_ref(),
                    ) {
                        let k = inbox::key(c);
                        let top = stats.tops.entry(k.clone()).or_default();
                        *top = (*top).max(m.seq);
                        stats.seen.insert((k, m.seq));
                    }
                    let source = if lossy {
                        Source::SyncUnordered
                    } else {
                        Source::Sync
                    };
                    self.inbox.receive(m, source, now, &mut out);
                }
                if p.done && current {
                    if lossy {
                        let stats = self.sync_stats.remove(&request_id).unwrap_or_default();
                        self.lossy_sync_done(stats, now, &mut out);
                    } else {
                        self.inbox.sync_done(&mut out);
                    }
                    self.release(out);
                    self.end_sync();
                    self.events.push_back(Event::Synced);
                } else {
                    if current {
                        // Progress: the next page has a whole timeout again.
                        self.sync_at = Some(now);
                        self.sync_tries = 1;
                    }
                    self.release(out);
                }
            }
            Body::Behind(_) => self.start_sync(Some(now)),
            Body::HistoryPage(page) => {
                self.retrying.remove(&request_id);
                if self.requests.remove(&request_id).is_some() {
                    self.events
                        .push_back(Event::HistoryPage { request_id, page });
                }
            }
            body => {
                let frame = pb::Frame {
                    request_id,
                    body: Some(body),
                };
                if request_id != 0 && self.requests.get(&request_id) == Some(&Request::Other) {
                    // Presence answers may come in several frames (`more`): keep the request
                    // until the last.
                    let more = matches!(
                        &frame.body,
                        Some(Body::PresenceUpdate(p)) if p.more
                    );
                    if !more {
                        self.requests.remove(&request_id);
                    }
                    self.events.push_back(Event::Response(frame));
                } else {
                    self.events.push_back(Event::Other(frame));
                }
            }
        }
    }

    /// Sends one cumulative `DeliverAck` for the deliveries taken since the last one, if any.
    pub fn flush_acks(&mut self) {
        if self.state == State::Disconnected || !self.inbox.ack_due() {
            return;
        }
        let acks = self.inbox.take_acks();
        if !acks.is_empty() {
            self.push_frame(0, Body::DeliverAck(pb::DeliverAck { acks }));
        }
    }

    /// The time passed: heartbeats, the login and liveness deadlines, retries, lasting gaps.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Disconnected => {}
            State::LoggingIn => {
                if self
                    .connected_at
                    .is_some_and(|t| now >= t + self.config.login_timeout)
                {
                    self.close_with(now, DisconnectReason::Timeout);
                }
            }
            State::Ready => {
                if now >= self.last_heard + self.dead_after {
                    self.close_with(now, DisconnectReason::Timeout);
                    return;
                }
                if let Some(retry) = self.config.retry {
                    self.retry_due(now, &retry);
                }
                self.flush_outbox(now);
                if self.sync.is_none()
                    && self
                        .inbox
                        .oldest_gap()
                        .is_some_and(|t| now >= t + self.config.gap_timeout)
                {
                    self.start_sync(Some(now));
                }
                if now >= self.last_sent + self.ping_every {
                    self.nonce += 1;
                    let id = self.request_ids.next_id();
                    self.push_frame(id, Body::Ping(pb::Ping { nonce: self.nonce }));
                    self.last_sent = now;
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // The driver's outputs
    // -----------------------------------------------------------------------------------------

    /// The next frame to send, if any. (The driver encodes it; for TCP with
    /// `parley_proto::tcp::FrameCodec`.)
    pub fn poll_transmit(&mut self) -> Option<pb::Frame> {
        self.transmit.pop_front()
    }

    /// When [`Session::handle_timeout`] should be called next (None: only after some input).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Disconnected => None,
            State::LoggingIn => self.connected_at.map(|t| t + self.config.login_timeout),
            State::Ready => {
                let mut next =
                    (self.last_sent + self.ping_every).min(self.last_heard + self.dead_after);
                if let Some(t) = self.outbox.next_retry() {
                    next = next.min(t);
                }
                if self.sync.is_none()
                    && let Some(t) = self.inbox.oldest_gap()
                {
                    next = next.min(t + self.config.gap_timeout);
                }
                if let Some(retry) = self.config.retry
                    && let Some(t) = self.next_retry(&retry)
                {
                    next = next.min(t);
                }
                Some(next)
            }
        }
    }

    /// The next event for the application, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether the session wants the driver to close the connection (once: the flag clears).
    /// The session has then already counted itself disconnected.
    pub fn take_close(&mut self) -> bool {
        std::mem::take(&mut self.close)
    }

    /// The driver sent what [`Session::poll_transmit`] gave at `now` (for the heartbeat clock,
    /// and the retry timers of [`SessionConfig::retry`]).
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = now;
        self.stamp(now);
    }

    // -----------------------------------------------------------------------------------------
    // Getters
    // -----------------------------------------------------------------------------------------

    /// Where the session stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// The client message ids of the sends not acknowledged yet, in order.
    pub fn unacked(&self) -> Vec<u64> {
        self.outbox.ids()
    }

    /// Every seq of conversation `c` up to this one was shown (or skipped, or sent by this
    /// device).
    pub fn cursor(&self, c: &pb::Conversation) -> u64 {
        self.inbox.cursor(c)
    }

    /// Whether a sync is running.
    pub fn syncing(&self) -> bool {
        self.sync.is_some()
    }

    /// How many messages are held above gaps.
    pub fn held(&self) -> usize {
        self.inbox.held()
    }

    /// The largest frame the server accepts (its `LoginResult`, else the protocol default).
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    // -----------------------------------------------------------------------------------------
    // Inside
    // -----------------------------------------------------------------------------------------

    /// Queues a frame.
    fn push_frame(&mut self, request_id: u64, body: Body) {
        self.transmit.push_back(pb::Frame {
            request_id,
            body: Some(body),
        });
    }

    /// Sends a request of the session's own; returns its id.
    fn start_request(&mut self, kind: Request, body: Body) -> u64 {
        let id = self.request_ids.next_id();
        if self.state == State::Ready {
            self.requests.insert(id, kind);
            self.push_frame(id, body);
        }
        id
    }

    /// Starts a sync from the inbox's cursors, unless one runs; `now` is when it goes out, if
    /// known.
    fn start_sync(&mut self, now: Option<Instant>) {
        if self.sync.is_some() || self.state != State::Ready {
            return;
        }
        self.send_sync_request(now);
    }

    /// Sends a `SyncRequest` from the inbox's cursors as (another attempt of) the running sync.
    fn send_sync_request(&mut self, now: Option<Instant>) {
        self.sync_at = now;
        self.sync_tries = self.sync_tries.saturating_add(1);
        let cursors = self.inbox.cursors();
        let stats = SyncStats {
            cursors: cursors
                .iter()
                .filter_map(|c| c.conversation.as_ref().map(|v| (inbox::key(v), c.seq)))
                .collect(),
            ..SyncStats::default()
        };
        let body = Body::SyncRequest(pb::SyncRequest {
            cursors,
            page_size: self.config.sync_page_size,
            max_per_conversation: 0,
        });
        let id = self.start_request(Request::Sync, body);
        self.sync = Some(id);
        self.sync_ids.push(id);
        if self.config.retry.is_some() {
            self.sync_stats.insert(id, stats);
        }
        // Only the latest attempts are worth waiting for.
        while self.sync_ids.len() > 4 {
            let old = self.sync_ids.remove(0);
            self.requests.remove(&old);
            self.sync_stats.remove(&old);
        }
    }

    /// The running sync ended (done, failed, or the connection ended).
    fn end_sync(&mut self) {
        for id in self.sync_ids.drain(..) {
            self.requests.remove(&id);
        }
        self.sync_stats.clear();
        self.sync = None;
        self.sync_at = None;
        self.sync_tries = 0;
    }

    /// The last page of a sync over a lossy transport: its gaps are skipped (up to the highest
    /// seq its pages carried) only if every message its summary announced came, or if it
    /// brought exactly what the previous incomplete sync from the same cursors brought (the gaps
    /// are then holes for good, e.g. expired messages, not lost pages).
    fn lossy_sync_done(&mut self, stats: SyncStats, now: Instant, out: &mut Vec<Released>) {
        let complete = stats
            .total
            .is_some_and(|t| u64::try_from(stats.seen.len()).unwrap_or(u64::MAX) >= t);
        let confirmed = self
            .last_incomplete
            .as_ref()
            .is_some_and(|last| last.cursors == stats.cursors && last.seen == stats.seen);
        if complete || confirmed {
            self.inbox.skip_up_to(&stats.tops, now, out);
            self.last_incomplete = None;
        } else {
            self.last_incomplete = Some(stats);
        }
    }

    /// Sends the outbox's due sends (going out at `now`).
    fn flush_outbox(&mut self, now: Instant) {
        for send in self.outbox.due(now, Some(now)) {
            self.transmit.push_back(send_frame(send));
        }
    }

    /// Sends the outbox's due sends, at a time not known yet (see [`Session::stamp`]).
    fn flush_outbox_unstamped(&mut self) {
        for send in self.outbox.due(self.last_sent, None) {
            self.transmit.push_back(send_frame(send));
        }
    }

    /// What went out without a known time went out at `now`.
    fn stamp(&mut self, now: Instant) {
        self.outbox.stamp(now);
        if self.sync.is_some() {
            self.sync_at.get_or_insert(now);
        }
        for r in self.retrying.values_mut() {
            r.sent_at.get_or_insert(now);
        }
    }

    /// When the next unanswered request times out (`last_sent`, in the past, if one went out at
    /// a time not known yet: handle the timeout now, which stamps it).
    fn next_retry(&self, retry: &RetryConfig) -> Option<Instant> {
        let unstamped = self.outbox.unstamped()
            || (self.sync.is_some() && self.sync_at.is_none())
            || self.retrying.values().any(|r| r.sent_at.is_none());
        if unstamped {
            return Some(self.last_sent);
        }
        let sync = self
            .sync
            .and(self.sync_at)
            .map(|t| t + retry.delay(self.sync_tries));
        let history = self
            .retrying
            .values()
            .filter_map(|r| r.sent_at.map(|t| t + retry.delay(r.tries)))
            .min();
        [self.outbox.next_expiry(retry), sync, history]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sends again what was not answered in time (lossy transports).
    fn retry_due(&mut self, now: Instant, retry: &RetryConfig) {
        self.stamp(now);
        // Sends: due again, flushed by the caller.
        self.outbox.expire(now, retry);
        // The sync: given up, and started again from the inbox's cursors (late pages of the
        // old one are still taken as messages; its `done` no longer counts).
        if self.sync.is_some()
            && let Some(at) = self.sync_at
            && now >= at + retry.delay(self.sync_tries)
        {
            self.send_sync_request(Some(now));
        }
        // History requests: the same request again, same id.
        let mut again = Vec::new();
        for (id, r) in &mut self.retrying {
            if r.sent_at.is_some_and(|t| now >= t + retry.delay(r.tries)) {
                r.sent_at = Some(now);
                r.tries = r.tries.saturating_add(1);
                again.push((*id, r.body.clone()));
            }
        }
        again.sort_by_key(|(id, _)| *id);
        for (id, body) in again {
            self.push_frame(id, body);
        }
    }

    /// Ends the connection from this side.
    fn close_with(&mut self, now: Instant, reason: DisconnectReason) {
        self.disconnected(now, reason);
        self.close = true;
    }

    /// Hands what the inbox released to the application.
    fn release(&mut self, out: Vec<Released>) {
        for r in out {
            self.events.push_back(match r {
                Released::Message(m) => Event::Message(*m),
                Released::Skipped { conversation, seqs } => Event::Skipped { conversation, seqs },
            });
        }
    }

    /// The answer to Login.
    fn on_login(&mut self, now: Instant, request_id: u64, r: pb::LoginResult) {
        if self.state != State::LoggingIn
            || self.requests.remove(&request_id) != Some(Request::Login)
        {
            return;
        }
        self.state = State::Ready;
        if r.max_frame_bytes > 0 {
            self.max_frame_bytes = usize::try_from(r.max_frame_bytes).unwrap_or(usize::MAX);
        }
        let heartbeat = match r.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        self.ping_every = (heartbeat / 2).max(Duration::from_millis(50));
        self.dead_after = self
            .config
            .dead_after
            .unwrap_or_else(|| (heartbeat * 2).max(MIN_DEAD_AFTER));
        self.events.push_back(Event::Connected(r));
        // The outbox first, in order, then the sync.
        self.outbox.reset();
        self.flush_outbox(now);
        self.start_sync(Some(now));
    }

    /// A SendAck: the send leaves the outbox; its seq is this device's own.
    fn on_send_ack(&mut self, now: Instant, a: pb::SendAck) {
        let sent = self.outbox.remove(a.client_msg_id);
        let conversation = a
            .conversation
            .clone()
            .or_else(|| sent.as_ref().and_then(|s| s.to.clone()));
        let Some(conversation) = conversation else {
            return;
        };
        let mut out = Vec::new();
        self.inbox.own(&conversation, a.seq, now, &mut out);
        if sent.is_some() {
            self.events.push_back(Event::Acked {
                client_msg_id: a.client_msg_id,
                seq: a.seq,
                conversation,
                msg_id: a.msg_id,
            });
        }
        self.release(out);
    }

    /// An Error: for a send, a request, or the connection.
    fn on_error(&mut self, now: Instant, request_id: u64, e: pb::Error) {
        let code = pb::ErrorCode::try_from(e.code).ok();
        let send_id = if e.client_msg_id != 0 {
            Some(e.client_msg_id)
        } else if request_id != 0 && !RequestIds::is_request_id(request_id) {
            Some(request_id)
        } else {
            None
        };
        if let Some(id) = send_id {
            let passing = matches!(
                code,
                Some(
                    pb::ErrorCode::RateLimited
                        | pb::ErrorCode::StorageFailure
                        | pb::ErrorCode::Internal
                        | pb::ErrorCode::ShuttingDown
                        | pb::ErrorCode::Unavailable
                )
            );
            if passing {
                let wait = Duration::from_millis(u64::from(e.retry_after_ms)).max(MIN_RETRY);
                self.outbox.retry_at(id, now + wait);
            } else if self.outbox.remove(id).is_some() {
                self.events.push_back(Event::Refused {
                    client_msg_id: id,
                    error: e.clone(),
                });
            }
        } else if let Some(kind) = self.requests.remove(&request_id) {
            self.retrying.remove(&request_id);
            match kind {
                Request::Sync => {
                    // This attempt failed (e.g. refused: over a lossy transport, because an
                    // earlier attempt still runs, whose pages count); with none left, the sync
                    // failed, and a lasting gap starts another.
                    self.sync_ids.retain(|&id| id != request_id);
                    self.sync_stats.remove(&request_id);
                    if self.sync_ids.is_empty() {
                        self.end_sync();
                    }
                }
                Request::History | Request::Other => {
                    self.events.push_back(Event::RequestFailed {
                        request_id,
                        error: e.clone(),
                    });
                }
                Request::Login => {}
            }
        } else if !e.fatal {
            self.events.push_back(Event::Other(pb::Frame {
                request_id,
                body: Some(Body::Error(e.clone())),
            }));
        }
        if e.fatal {
            self.close_with(now, DisconnectReason::Server(e));
        }
    }
}

/// A Send frame, with the client message id as its request id.
fn send_frame(send: pb::Send) -> pb::Frame {
    pb::Frame {
        request_id: send.client_msg_id,
        body: Some(Body::Send(send)),
    }
}

/// The direct conversation with user `user`.
///
/// ```
/// let c = parley_client::direct("bob");
/// assert_eq!(c.id, "bob");
/// ```
pub fn direct(user: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Direct as i32,
        id: user.to_owned(),
    }
}

/// Whether two conversations are the same.
pub fn same(a: &pb::Conversation, b: &pb::Conversation) -> bool {
    inbox::key(a) == inbox::key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login_result() -> Body {
        Body::LoginResult(pb::LoginResult {
            protocol_version: 1,
            user: "alice".into(),
            device: "d".into(),
            heartbeat_interval_ms: 1000,
            max_frame_bytes: 65536,
            ..pb::LoginResult::default()
        })
    }

    fn msg(peer: &str, seq: u64) -> pb::Message {
        pb::Message {
            conversation: Some(direct(peer)),
            seq,
            from_user: peer.into(),
            body: Bytes::from(format!("m{seq}")),
            ..pb::Message::default()
        }
    }

    fn frame(request_id: u64, body: Body) -> pb::Frame {
        pb::Frame {
            request_id,
            body: Some(body),
        }
    }

    /// A session logged in on a connection; returns it with the frames it sent after login.
    fn ready(now: Instant) -> (Session, Vec<pb::Frame>) {
        let mut s = Session::new(SessionConfig::default(), now);
        let sent = login(&mut s, now);
        assert!(matches!(events(&mut s)[..], [Event::Connected(_)]));
        (s, sent)
    }

    /// Connects and logs `s` in; returns the frames sent after the Login.
    fn login(s: &mut Session, now: Instant) -> Vec<pb::Frame> {
        s.connected(now, "tok".into());
        let login = s.poll_transmit().expect("login");
        assert!(matches!(login.body, Some(Body::Login(ref l)) if l.token == "tok"));
        s.handle_frame(now, frame(login.request_id, login_result()));
        drain(s)
    }

    fn drain(s: &mut Session) -> Vec<pb::Frame> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn shown(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.seq),
                _ => None,
            })
            .collect()
    }

    fn sync_id(frames: &[pb::Frame]) -> u64 {
        frames
            .iter()
            .find(|f| matches!(f.body, Some(Body::SyncRequest(_))))
            .expect("a sync request")
            .request_id
    }

    #[test]
    fn login_resends_the_outbox_in_order_with_the_same_ids_then_syncs() {
        let now = Instant::now();
        let mut s = Session::new(SessionConfig::default(), now);
        let a = s.send_text("bob", "one").expect("send");
        let b = s.send_text("bob", "two").expect("send");
        assert!(s.poll_transmit().is_none(), "nothing goes out before login");
        let sent = login(&mut s, now);
        let ids: Vec<u64> = sent
            .iter()
            .filter_map(|f| match &f.body {
                Some(Body::Send(send)) => Some(send.client_msg_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [a, b]);
        assert!(matches!(sent[2].body, Some(Body::SyncRequest(_))));
        assert!(matches!(events(&mut s)[0], Event::Connected(_)));

        // The first is acked; the connection drops; the second goes again, same id.
        s.handle_frame(
            now,
            frame(
                a,
                Body::SendAck(pb::SendAck {
                    client_msg_id: a,
                    seq: 1,
                    conversation: Some(direct("bob")),
                    ..pb::SendAck::default()
                }),
            ),
        );
        assert!(
            matches!(events(&mut s)[..], [Event::Acked { client_msg_id, seq: 1, .. }] if client_msg_id == a)
        );
        s.disconnected(now, DisconnectReason::Closed);
        let sent = login(&mut s, now);
        assert!(matches!(&sent[0].body, Some(Body::Send(send)) if send.client_msg_id == b));
        // The sync starts from the own message's seq.
        let Some(Body::SyncRequest(req)) = &sent[1].body else {
            panic!("expected a sync, got {sent:?}");
        };
        assert_eq!(req.cursors[0].seq, 1);
        // A retried ack (the server's de-dup) for the first changes nothing.
        s.handle_frame(
            now,
            frame(
                a,
                Body::SendAck(pb::SendAck {
                    client_msg_id: a,
                    seq: 1,
                    conversation: Some(direct("bob")),
                    ..pb::SendAck::default()
                }),
            ),
        );
        assert!(
            !events(&mut s)
                .iter()
                .any(|e| matches!(e, Event::Acked { .. }))
        );
        assert_eq!(s.unacked(), vec![b]);
    }

    #[test]
    fn deliveries_are_deduplicated_ordered_and_acked_cumulatively_in_one_frame() {
        let now = Instant::now();
        let (mut s, sent) = ready(now);
        let sync = sync_id(&sent);
        s.handle_frame(
            now,
            frame(
                sync,
                Body::SyncPage(pb::SyncPage {
                    messages: vec![msg("bob", 1)],
                    done: true,
                }),
            ),
        );
        let mut bytes = BytesMut::new();
        let codec = FrameCodec::default();
        for seqs in [[2, 4], [2, 3]] {
            let d = pb::Deliver {
                messages: seqs.iter().map(|&q| msg("bob", q)).collect(),
            };
            codec
                .encode(&frame(0, Body::Deliver(d)), &mut bytes)
                .expect("encode");
        }
        s.handle_bytes(now, &bytes);
        assert_eq!(shown(&events(&mut s)), [1, 2, 3, 4]);
        let acks = drain(&mut s);
        assert_eq!(acks.len(), 1, "one ack for the whole batch: {acks:?}");
        let Some(Body::DeliverAck(ack)) = &acks.last().and_then(|f| f.body.clone()) else {
            panic!("expected an ack, got {acks:?}");
        };
        assert_eq!(ack.acks[0].seq, 4);
    }

    #[test]
    fn a_lasting_gap_starts_a_sync_whose_pages_fill_it() {
        let now = Instant::now();
        let (mut s, sent) = ready(now);
        let first = sync_id(&sent);
        s.handle_frame(
            now,
            frame(
                first,
                Body::SyncPage(pb::SyncPage {
                    messages: vec![msg("bob", 1)],
                    done: true,
                }),
            ),
        );
        s.handle_frame(
            now,
            frame(
                0,
                Body::Deliver(pb::Deliver {
                    messages: vec![msg("bob", 3)],
                }),
            ),
        );
        s.flush_acks();
        let acked = drain(&mut s);
        assert!(matches!(&acked[0].body, Some(Body::DeliverAck(a)) if a.acks[0].seq == 1));
        assert_eq!(shown(&events(&mut s)), [1]);
        // Before the gap timeout: nothing.
        s.handle_timeout(now + Duration::from_millis(100));
        assert!(drain(&mut s).is_empty());
        let later = now + SessionConfig::default().gap_timeout;
        assert!(s.poll_timeout().is_some_and(|t| t <= later));
        s.handle_timeout(later);
        let sent = drain(&mut s);
        let Some(Body::SyncRequest(req)) = &sent[0].body else {
            panic!("expected a sync, got {sent:?}");
        };
        assert_eq!(req.cursors[0].seq, 1);
        s.handle_frame(
            later,
            frame(
                sent[0].request_id,
                Body::SyncPage(pb::SyncPage {
                    messages: vec![msg("bob", 2)],
                    done: true,
                }),
            ),
        );
        let ev = events(&mut s);
        assert_eq!(shown(&ev), [2, 3]);
        assert!(matches!(ev.last(), Some(Event::Synced)));
    }

    #[test]
    fn heartbeats_go_out_at_half_the_interval_and_a_silent_server_is_dropped() {
        let now = Instant::now();
        let (mut s, _) = ready(now);
        let half = now + Duration::from_millis(500);
        assert_eq!(s.poll_timeout(), Some(half));
        s.handle_timeout(half);
        assert!(matches!(
            drain(&mut s)[..],
            [pb::Frame {
                body: Some(Body::Ping(_)),
                ..
            }]
        ));
        // A server ping is answered with its nonce.
        s.handle_frame(half, frame(9, Body::Ping(pb::Ping { nonce: 7 })));
        let pong = drain(&mut s);
        assert!(
            matches!(&pong[0], pb::Frame { request_id: 9, body: Some(Body::Pong(p)) } if p.nonce == 7)
        );
        // Nothing heard for the dead time (5 s at least): closed.
        s.handle_timeout(half + Duration::from_secs(5));
        assert!(s.take_close());
        assert_eq!(s.state(), State::Disconnected);
        assert!(events(&mut s).contains(&Event::Disconnected {
            reason: DisconnectReason::Timeout
        }));
    }

    #[test]
    fn refusals_leave_the_outbox_and_passing_errors_are_retried_with_the_same_id() {
        let now = Instant::now();
        let (mut s, _) = ready(now);
        let a = s.send_text("bob", "x").expect("send");
        let b = s.send_text("nobody", "y").expect("send");
        drain(&mut s);
        s.handle_frame(
            now,
            frame(
                a,
                Body::Error(pb::Error {
                    code: pb::ErrorCode::RateLimited as i32,
                    retry_after_ms: 300,
                    client_msg_id: a,
                    ..pb::Error::default()
                }),
            ),
        );
        s.handle_frame(
            now,
            frame(
                b,
                Body::Error(pb::Error {
                    code: pb::ErrorCode::InvalidArgument as i32,
                    client_msg_id: b,
                    ..pb::Error::default()
                }),
            ),
        );
        assert!(
            matches!(events(&mut s)[..], [Event::Refused { client_msg_id, .. }] if client_msg_id == b)
        );
        assert_eq!(s.unacked(), vec![a]);
        s.handle_timeout(now + Duration::from_millis(299));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(now + Duration::from_millis(300));
        let again = drain(&mut s);
        assert!(matches!(&again[0].body, Some(Body::Send(send)) if send.client_msg_id == a));
    }

    #[test]
    fn a_fatal_error_closes_and_history_and_garbage_are_handled() {
        let now = Instant::now();
        let (mut s, _) = ready(now);
        let h = s.history(direct("bob"), 0, None, 10);
        let sent = drain(&mut s);
        assert!(
            matches!(&sent[0], pb::Frame { request_id, body: Some(Body::HistoryRequest(_)) } if *request_id == h)
        );
        s.handle_frame(
            now,
            frame(
                h,
                Body::HistoryPage(pb::HistoryPage {
                    messages: vec![msg("bob", 1)],
                    ..pb::HistoryPage::default()
                }),
            ),
        );
        assert!(
            matches!(&events(&mut s)[..], [Event::HistoryPage { request_id, .. }] if *request_id == h)
        );
        // A delimited frame that is not protobuf is skipped.
        s.handle_bytes(now, &[3, 0xff, 0xff, 0xff]);
        assert_eq!(s.state(), State::Ready);
        s.handle_frame(
            now,
            frame(
                0,
                Body::Error(pb::Error {
                    code: pb::ErrorCode::ShuttingDown as i32,
                    fatal: true,
                    retry_after_ms: 2000,
                    ..pb::Error::default()
                }),
            ),
        );
        assert!(s.take_close());
        let ev = events(&mut s);
        let Some(Event::Disconnected { reason }) = ev.last() else {
            panic!("expected a disconnect, got {ev:?}");
        };
        assert_eq!(reason.retry_after_ms(), Some(2000));
        assert!(!reason.is_permanent());
        // A desynchronised stream closes.
        login(&mut s, now);
        s.handle_bytes(now, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(s.take_close());
    }

    /// A lossy session (retry after 1 s, doubling up to 8 s) logged in; the frames after login.
    fn lossy_ready(now: Instant) -> (Session, Vec<pb::Frame>) {
        let mut s = Session::new(SessionConfig::lossy(), now);
        let sent = login(&mut s, now);
        s.sent(now);
        events(&mut s);
        (s, sent)
    }

    fn sends(frames: &[pb::Frame]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match &f.body {
                Some(Body::Send(send)) => Some(send.client_msg_id),
                _ => None,
            })
            .collect()
    }

    fn ack(id: u64, seq: u64) -> pb::Frame {
        frame(
            id,
            Body::SendAck(pb::SendAck {
                client_msg_id: id,
                seq,
                conversation: Some(direct("bob")),
                ..pb::SendAck::default()
            }),
        )
    }

    #[test]
    fn lossy_an_unacked_send_goes_again_with_the_same_id_backing_off_and_one_ack_counts() {
        let now = Instant::now();
        let (mut s, _) = lossy_ready(now);
        let id = s.send_text("bob", "x").expect("send");
        assert_eq!(sends(&drain(&mut s)), [id]);
        s.sent(now);
        let ms = |n| now + Duration::from_millis(n);
        s.handle_timeout(ms(999));
        assert!(sends(&drain(&mut s)).is_empty());
        assert!(s.poll_timeout().is_some_and(|t| t <= ms(1000)));
        s.handle_timeout(ms(1000));
        assert_eq!(sends(&drain(&mut s)), [id], "the same id again");
        s.sent(ms(1000));
        // The second wait is twice as long.
        s.handle_timeout(ms(2999));
        assert!(sends(&drain(&mut s)).is_empty());
        s.handle_timeout(ms(3000));
        assert_eq!(sends(&drain(&mut s)), [id]);
        s.sent(ms(3000));
        // Both copies are answered: one Acked, nothing sent again.
        s.handle_frame(ms(3001), ack(id, 1));
        s.handle_frame(ms(3002), ack(id, 1));
        let acked: Vec<Event> = events(&mut s)
            .into_iter()
            .filter(|e| matches!(e, Event::Acked { .. }))
            .collect();
        assert_eq!(acked.len(), 1);
        s.handle_timeout(ms(20_000));
        assert!(sends(&drain(&mut s)).is_empty());
        assert!(s.unacked().is_empty());
    }

    #[test]
    fn without_retry_a_send_is_not_repeated_on_the_same_connection() {
        let now = Instant::now();
        let (mut s, _) = ready(now);
        let id = s.send_text("bob", "x").expect("send");
        assert_eq!(sends(&drain(&mut s)), [id]);
        s.sent(now);
        for step in 1..=8 {
            let t = now + Duration::from_millis(500 * step);
            s.handle_frame(t, frame(0, Body::Pong(pb::Pong::default())));
            s.handle_timeout(t);
            assert!(sends(&drain(&mut s)).is_empty());
        }
        assert_eq!(s.unacked(), [id]);
    }

    #[test]
    fn lossy_a_sync_without_answer_is_asked_again_and_a_late_page_of_the_first_still_counts() {
        let now = Instant::now();
        let (mut s, sent) = lossy_ready(now);
        let first = sync_id(&sent);
        let later = now + Duration::from_secs(1);
        s.handle_timeout(later);
        let again = drain(&mut s);
        let second = sync_id(&again);
        assert_ne!(first, second);
        // The broker refuses the second (the first still runs there) ...
        s.handle_frame(
            later,
            frame(
                second,
                Body::Error(pb::Error {
                    code: pb::ErrorCode::UnexpectedFrame as i32,
                    ..pb::Error::default()
                }),
            ),
        );
        assert!(s.syncing());
        // ... and the first's pages come, out of order: the last first.
        s.handle_frame(
            later,
            frame(
                first,
                Body::SyncSummary(pb::SyncSummary {
                    total_messages: 3,
                    ..pb::SyncSummary::default()
                }),
            ),
        );
        s.handle_frame(
            later,
            frame(
                first,
                Body::SyncPage(pb::SyncPage {
                    messages: vec![msg("bob", 3)],
                    done: false,
                }),
            ),
        );
        assert!(shown(&events(&mut s)).is_empty(), "3 waits for 1 and 2");
        s.handle_frame(
            later,
            frame(
                first,
                Body::SyncPage(pb::SyncPage {
                    messages: vec![msg("bob", 1), msg("bob", 2)],
                    done: true,
                }),
            ),
        );
        let ev = events(&mut s);
        assert_eq!(shown(&ev), [1, 2, 3]);
        assert!(matches!(ev.last(), Some(Event::Synced)));
        assert!(!s.syncing());
    }

    #[test]
    fn lossy_a_sync_whose_page_was_lost_skips_nothing() {
        let now = Instant::now();
        let (mut s, sent) = lossy_ready(now);
        let id = sync_id(&sent);
        s.handle_frame(
            now,
            frame(
                id,
                Body::SyncSummary(pb::SyncSummary {
                    total_messages: 4,
                    ..pb::SyncSummary::default()
                }),
            ),
        );
        // The page with 1 and 2 is lost; the last one (3, 4) comes.
        s.handle_frame(
            now,
            frame(
                id,
                Body::SyncPage(pb::SyncPage {
                    messages: vec![msg("bob", 3), msg("bob", 4)],
                    done: true,
                }),
            ),
        );
        let ev = events(&mut s);
        assert!(shown(&ev).is_empty(), "nothing skipped: {ev:?}");
        assert_eq!(s.held(), 2);
        // The gap starts another sync, which brings them.
        let t = now + SessionConfig::default().gap_timeout;
        s.handle_timeout(t);
        let next = sync_id(&drain(&mut s));
        s.handle_frame(
            t,
            frame(
                next,
                Body::SyncPage(pb::SyncPage {
                    messages: vec![msg("bob", 1), msg("bob", 2), msg("bob", 3), msg("bob", 4)],
                    done: true,
                }),
            ),
        );
        assert_eq!(shown(&events(&mut s)), [1, 2, 3, 4]);
    }

    #[test]
    fn lossy_a_history_request_without_answer_goes_again_with_the_same_id() {
        let now = Instant::now();
        let (mut s, _) = lossy_ready(now);
        let h = s.history(direct("bob"), 0, None, 10);
        let first = drain(&mut s);
        assert!(first.iter().any(|f| f.request_id == h));
        s.sent(now);
        let later = now + Duration::from_secs(1);
        s.handle_timeout(later);
        let again = drain(&mut s);
        assert!(
            again
                .iter()
                .any(|f| f.request_id == h && matches!(f.body, Some(Body::HistoryRequest(_))))
        );
        let page = frame(h, Body::HistoryPage(pb::HistoryPage::default()));
        s.handle_frame(later, page.clone());
        s.handle_frame(later, page);
        let pages = events(&mut s)
            .into_iter()
            .filter(|e| matches!(e, Event::HistoryPage { .. }))
            .count();
        assert_eq!(pages, 1, "a duplicated answer is shown once");
        s.handle_timeout(now + Duration::from_secs(10));
        assert!(
            !drain(&mut s)
                .iter()
                .any(|f| matches!(f.body, Some(Body::HistoryRequest(_))))
        );
    }

    #[test]
    fn oversized_and_empty_sends_are_refused_locally() {
        let now = Instant::now();
        let mut s = Session::new(SessionConfig::default(), now);
        assert_eq!(s.send_text("", "x"), Err(SendError::EmptyRecipient));
        let big = "x".repeat(DEFAULT_MAX_FRAME_BYTES);
        assert!(matches!(
            s.send_text("bob", &big),
            Err(SendError::TooLarge { .. })
        ));
        assert!(s.unacked().is_empty());
    }
}
