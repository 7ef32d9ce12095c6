//! A test client that behaves like a real parley client (it logs in, syncs, acks cumulatively,
//! de-duplicates by `(conversation, seq)`, answers server pings) and keeps a record of everything
//! it was sent, so that tests can assert on order, gaps and duplicates.
//!
//! Every frame read from the broker, whatever call reads it, is first *observed*: messages of
//! `Deliver` and `SyncPage` go into the per-conversation store, `SendAck`s and `Error`s are filed
//! by `client_msg_id`, `Behind` is counted. So a wait for one kind of frame never loses another.

use std::collections::{BTreeMap, HashMap, VecDeque, btree_map};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_proto::pb;
use parley_proto::pb::frame::Body;

use crate::transport::{Incoming, Tcp, Transport, Ws};
use crate::{PROTOCOL_VERSION, TIMEOUT, conv_name, token};

/// A test client over WebSocket.
pub type WsClient = Client<Ws>;

/// A client over TLS (TCP framing inside TLS, see [`crate::transport::connect_tls`]).
pub type TlsClient = Client<crate::transport::Tcp<crate::transport::TlsStream>>;

/// A client over WebSocket inside TLS (wss).
pub type WssClient = Client<Ws<crate::transport::TlsStream>>;

/// A client over UDP (the authenticated datagram envelope, see [`crate::transport::Udp`]).
pub type UdpClient = Client<crate::transport::Udp>;

/// Client message ids are unique across the whole test process, so that no two sends of one
/// device ever share one by accident (the broker would take the second for a retry).
static NEXT_CLIENT_MSG_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh client message id, never handed out before in this process.
pub fn fresh_client_msg_id() -> u64 {
    NEXT_CLIENT_MSG_ID.fetch_add(1, Ordering::Relaxed)
}

/// How a message reached the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Pushed in a `Deliver` frame.
    Deliver,
    /// Returned in a `SyncPage`.
    Sync,
}

/// One message arrival, in the order the client saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// The conversation, from this client's point of view.
    pub conversation: pb::Conversation,
    /// The message's seq.
    pub seq: u64,
    /// How it came.
    pub via: Via,
}

/// What this client holds of one conversation.
#[derive(Debug, Default)]
struct Held {
    messages: BTreeMap<u64, pb::Message>,
    /// The highest seq with every seq from 1 up to it held.
    contiguous: u64,
    /// The highest seq acked on the current connection.
    acked: u64,
}

/// What a sync returned.
#[derive(Debug, Clone, Default)]
pub struct SyncResult {
    /// The summary (answered first).
    pub summary: pb::SyncSummary,
    /// The pages, in the order they came; the last one has `done`.
    pub pages: Vec<pb::SyncPage>,
}

impl SyncResult {
    /// Every message of every page, in the order they came.
    pub fn messages(&self) -> impl Iterator<Item = &pb::Message> {
        self.pages.iter().flat_map(|p| p.messages.iter())
    }

    /// The seqs the pages carried for `conversation`, in the order they came.
    pub fn seqs(&self, conversation: &pb::Conversation) -> Vec<u64> {
        self.messages()
            .filter(|m| m.conversation.as_ref() == Some(conversation))
            .map(|m| m.seq)
            .collect()
    }
}

/// What a pipelined run of sends achieved (see [`Client::pipeline_sends`]).
#[derive(Debug, Default)]
pub struct Pipeline {
    /// The acks, in the order the sends were written.
    pub acks: Vec<pb::SendAck>,
    /// The bodies of the acked sends, matching `acks`.
    pub bodies: Vec<Bytes>,
    /// Sends written but not acked when the run ended (client_msg_ids).
    pub unacked: Vec<u64>,
    /// Why the connection closed, if it did.
    pub closed: Option<String>,
}

/// What a burst of requests got (see [`Client::burst`]).
#[derive(Debug, Default)]
pub struct Burst {
    /// Requests answered with their final answer (not an `Error`).
    pub served: usize,
    /// The `Error`s that refused requests.
    pub refused: Vec<pb::Error>,
}

/// A client connection to the broker: TCP by default, [`WsClient`] for WebSocket.
pub struct Client<T: Transport = Tcp> {
    conn: T,
    addr: SocketAddr,
    secret: String,
    /// `user/device` once logged in, for messages.
    label: String,
    identity: Option<(String, String)>,
    next_request_id: u64,
    /// Ack every delivered or synced message at once (cumulatively), as a real client does.
    auto_ack: bool,
    held: HashMap<pb::Conversation, Held>,
    arrivals: Vec<Arrival>,
    duplicates: Vec<Arrival>,
    send_acks: HashMap<u64, pb::SendAck>,
    send_errors: HashMap<u64, pb::Error>,
    /// Send requests in flight: request_id -> client_msg_id.
    pending_sends: HashMap<u64, u64>,
    /// Errors that matched no pending send (shown in failure messages).
    errors: Vec<pb::Error>,
    behind: usize,
    /// `RoomLag`s, with the number of arrivals before each.
    room_lags: Vec<(usize, pb::RoomLag)>,
    closed: Option<String>,
    /// Presence pushes (`PresenceUpdate` frames with request_id 0), in arrival order.
    presence_pushes: Vec<pb::PresenceUpdate>,
    /// Typing frames relayed to this client, in arrival order.
    typings: Vec<pb::Typing>,
}

impl<T: Transport> fmt::Debug for Client<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("label", &self.label)
            .field("transport", &self.conn.name())
            .field("conversations", &self.held.len())
            .field("arrivals", &self.arrivals.len())
            .field("duplicates", &self.duplicates.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Client<T> {
    /// Connects to `addr` without logging in. `secret` signs the tokens of [`Client::login`].
    pub fn connect(addr: SocketAddr, secret: &str) -> Self {
        let conn = T::open(addr, None)
            .unwrap_or_else(|e| panic!("cannot connect to the broker at {addr}: {e}"));
        Self::with_conn(conn, addr, secret)
    }

    /// Wraps an open connection.
    pub fn with_conn(conn: T, addr: SocketAddr, secret: &str) -> Self {
        Self {
            conn,
            addr,
            secret: secret.to_owned(),
            label: "(not logged in)".into(),
            identity: None,
            next_request_id: 1,
            auto_ack: true,
            held: HashMap::new(),
            arrivals: Vec::new(),
            duplicates: Vec::new(),
            send_acks: HashMap::new(),
            send_errors: HashMap::new(),
            pending_sends: HashMap::new(),
            errors: Vec::new(),
            behind: 0,
            room_lags: Vec::new(),
            closed: None,
            presence_pushes: Vec::new(),
            typings: Vec::new(),
        }
    }

    /// The user this client is logged in as; panics if it is not.
    pub fn user(&self) -> &str {
        match &self.identity {
            Some((user, _)) => user,
            None => panic!("{}: not logged in", self.label),
        }
    }

    /// Whether every delivered or synced message is acked at once (default: yes).
    pub fn set_auto_ack(&mut self, on: bool) {
        self.auto_ack = on;
    }

    // ---------------------------------------------------------------------------------------
    // Writing
    // ---------------------------------------------------------------------------------------

    /// Writes `body` as a frame with a fresh request id, which it returns.
    pub fn request(&mut self, body: Body) -> u64 {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.write(pb::Frame {
            request_id,
            body: Some(body),
        });
        request_id
    }

    /// Writes `bytes` as they are, as one unit of the transport (malformed input on purpose:
    /// see [`Transport::write_raw`]); panics if the transport cannot.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.conn.write_raw(bytes) {
            panic!("{}: cannot write raw bytes: {e}", self.label);
        }
    }

    /// The connection underneath (e.g. a UDP session's key and address).
    pub fn transport(&self) -> &T {
        &self.conn
    }

    /// The connection underneath, to write to it beside the client (e.g. datagrams crafted by
    /// hand); what it then receives is still read through the client.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.conn
    }

    /// Writes a frame; panics if the connection cannot take it.
    pub fn write(&mut self, frame: pb::Frame) {
        if let Err(e) = self.conn.write_frame(&frame) {
            panic!(
                "{}: cannot write a {} frame: {e} (connection closed: {:?})",
                self.label,
                parley_proto::frame::body_name(&frame),
                self.closed
            );
        }
    }

    // ---------------------------------------------------------------------------------------
    // Reading
    // ---------------------------------------------------------------------------------------

    /// Reads the next frame (observing it, see the module docs), waiting until `deadline`.
    /// Panics if the broker sends bytes that are not a frame.
    pub fn next(&mut self, deadline: Instant) -> Incoming {
        if let Some(why) = &self.closed {
            return Incoming::Closed(why.clone());
        }
        match self.conn.read_frame(deadline) {
            Incoming::Frame(frame) => {
                self.observe(&frame);
                Incoming::Frame(frame)
            }
            Incoming::Closed(why) => {
                self.closed = Some(why.clone());
                Incoming::Closed(why)
            }
            Incoming::Garbage(e) => panic!(
                "{}: the broker sent bytes that are not a valid frame: {e}",
                self.label
            ),
            Incoming::TimedOut => Incoming::TimedOut,
        }
    }

    /// Reads frames until one satisfies `predicate` and returns it. Panics after `timeout`, or
    /// if the connection closes first, naming the frames that did arrive.
    pub fn recv_until(
        &mut self,
        timeout: Duration,
        mut predicate: impl FnMut(&pb::Frame) -> bool,
    ) -> pb::Frame {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match self.next(deadline) {
                Incoming::Frame(frame) if predicate(&frame) => return frame,
                Incoming::Frame(frame) => seen.push(describe(&frame)),
                Incoming::Closed(why) => panic!(
                    "{}: the connection closed ({why}) before the awaited frame; frames seen \
                     meanwhile: {}",
                    self.label,
                    summarize(&seen)
                ),
                Incoming::TimedOut => panic!(
                    "{}: the awaited frame did not come within {timeout:?}; frames seen \
                     meanwhile: {}",
                    self.label,
                    summarize(&seen)
                ),
                Incoming::Garbage(_) => unreachable!("next() panics on garbage"),
            }
        }
    }

    /// Reads frames until `condition` holds for the client's state. Panics after `timeout` or if
    /// the connection closes first, saying `what` was awaited.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&Self) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !condition(self) {
            match self.next(deadline) {
                Incoming::Frame(_) => {}
                Incoming::Closed(why) => panic!(
                    "{}: the connection closed ({why}) while waiting until {what}; {}",
                    self.label,
                    self.state()
                ),
                Incoming::TimedOut => panic!(
                    "{}: not {what} within {timeout:?}; {}",
                    self.label,
                    self.state()
                ),
                Incoming::Garbage(_) => unreachable!("next() panics on garbage"),
            }
        }
    }

    /// Reads (and observes) every frame that arrives during `duration`, returning them. Panics if
    /// the connection closes meanwhile.
    pub fn receive_for(&mut self, duration: Duration) -> Vec<pb::Frame> {
        let deadline = Instant::now() + duration;
        let mut frames = Vec::new();
        loop {
            match self.next(deadline) {
                Incoming::Frame(frame) => frames.push(frame),
                Incoming::TimedOut => return frames,
                Incoming::Closed(why) => panic!(
                    "{}: the connection closed ({why}) unexpectedly; {}",
                    self.label,
                    self.state()
                ),
                Incoming::Garbage(_) => unreachable!("next() panics on garbage"),
            }
        }
    }

    /// Waits for the next `Error` frame and returns it (panics on timeout or close).
    pub fn expect_error(&mut self, timeout: Duration) -> pb::Error {
        match self
            .recv_until(timeout, |f| matches!(f.body, Some(Body::Error(_))))
            .body
        {
            Some(Body::Error(e)) => e,
            _ => unreachable!("the predicate matched an error"),
        }
    }

    /// Waits for a fatal `Error` whose code is one of `codes`, then for the close that must follow
    /// it. Returns the error.
    pub fn expect_fatal_error(&mut self, codes: &[pb::ErrorCode], timeout: Duration) -> pb::Error {
        let error = self.expect_error(timeout);
        assert!(
            codes.iter().any(|c| *c as i32 == error.code),
            "{}: expected an error with a code in {:?}, got {} ({:?})",
            self.label,
            codes.iter().map(|c| c.as_str_name()).collect::<Vec<_>>(),
            code_name(error.code),
            error.message
        );
        assert!(
            error.fatal,
            "{}: error {} must be fatal (the server closes after it)",
            self.label,
            code_name(error.code)
        );
        self.expect_closed(timeout);
        error
    }

    /// Reads until the connection closes and returns the `Error` frames that came before the close.
    /// Panics if it stays open for `timeout`.
    pub fn expect_closed(&mut self, timeout: Duration) -> Vec<pb::Error> {
        let deadline = Instant::now() + timeout;
        let mut errors = Vec::new();
        let mut seen = Vec::new();
        loop {
            match self.next(deadline) {
                Incoming::Frame(frame) => {
                    seen.push(describe(&frame));
                    if let Some(Body::Error(e)) = frame.body {
                        errors.push(e);
                    }
                }
                Incoming::Closed(_) => return errors,
                Incoming::TimedOut => panic!(
                    "{}: the broker did not close the connection within {timeout:?}; frames \
                     seen meanwhile: {}",
                    self.label,
                    summarize(&seen)
                ),
                Incoming::Garbage(_) => unreachable!("next() panics on garbage"),
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Login and heartbeat
    // ---------------------------------------------------------------------------------------

    /// Logs in as `user` on `device` with a valid token; panics unless it succeeds.
    pub fn login(&mut self, user: &str, device: &str) -> pb::LoginResult {
        let token = token::mint_valid(self.secret.as_bytes(), user, device);
        match self.try_login(&token) {
            Ok(result) => result,
            Err(e) => panic!(
                "login of {user}/{device} failed: {} ({:?})",
                code_name(e.code),
                e.message
            ),
        }
    }

    /// Sends `Login{token}` and returns the `LoginResult`, or the `Error` that answered it.
    pub fn try_login(&mut self, token: &str) -> Result<pb::LoginResult, pb::Error> {
        let request_id = self.request(Body::Login(pb::Login {
            protocol_version: PROTOCOL_VERSION,
            token: token.to_owned(),
            client_name: "parley-tests".into(),
        }));
        let frame = self.recv_until(TIMEOUT, |f| {
            matches!(f.body, Some(Body::LoginResult(_)) | Some(Body::Error(_)))
        });
        match frame.body {
            Some(Body::LoginResult(result)) => {
                assert_eq!(
                    frame.request_id, request_id,
                    "LoginResult must echo the Login's request_id"
                );
                self.logged_in(&result);
                Ok(result)
            }
            Some(Body::Error(error)) => Err(error),
            _ => unreachable!("the predicate matched a login result or an error"),
        }
    }

    fn logged_in(&mut self, result: &pb::LoginResult) {
        self.label = format!("{}/{}", result.user, result.device);
        self.identity = Some((result.user.clone(), result.device.clone()));
    }

    /// Marks the connection logged in as `user/device` without a `Login` frame (a WebSocket
    /// upgrade that carried the token; a `LoginResult` the server may send for it is ignored).
    pub fn assume_logged_in(&mut self, user: &str, device: &str) {
        self.label = format!("{user}/{device}");
        self.identity = Some((user.to_owned(), device.to_owned()));
    }

    /// Sends a `Ping` and waits for its `Pong`; returns the round-trip time.
    pub fn ping(&mut self) -> Duration {
        let start = Instant::now();
        let nonce = fresh_client_msg_id();
        self.request(Body::Ping(pb::Ping { nonce }));
        self.recv_until(
            TIMEOUT,
            |f| matches!(&f.body, Some(Body::Pong(p)) if p.nonce == nonce),
        );
        start.elapsed()
    }

    /// Opens a new connection to `addr` in place of this one (dropping the old one abruptly),
    /// logs in again as the same user and device and syncs from what the client holds. Keeps
    /// everything the client has recorded.
    pub fn reconnect_to(&mut self, addr: SocketAddr) -> SyncResult {
        let (user, device) = self
            .identity
            .clone()
            .unwrap_or_else(|| panic!("{}: reconnect needs a logged-in client", self.label));
        self.conn = T::open(addr, None)
            .unwrap_or_else(|e| panic!("{}: cannot reconnect to {addr}: {e}", self.label));
        self.addr = addr;
        self.closed = None;
        self.pending_sends.clear();
        for held in self.held.values_mut() {
            held.acked = 0;
        }
        self.login(&user, &device);
        self.sync()
    }

    /// [`Client::reconnect_to`] the same address.
    pub fn reconnect(&mut self) -> SyncResult {
        self.reconnect_to(self.addr)
    }

    // ---------------------------------------------------------------------------------------
    // Sending
    // ---------------------------------------------------------------------------------------

    /// Writes a `Send` to user `to` (a direct conversation) with a fresh client message id and
    /// returns that id, without waiting for the ack.
    pub fn start_send(&mut self, to: &str, body: impl Into<Bytes>) -> u64 {
        let client_msg_id = fresh_client_msg_id();
        self.start_send_with_id(crate::direct(to), client_msg_id, body.into());
        client_msg_id
    }

    /// Writes a `Send` with the given client message id, without waiting for the ack.
    pub fn start_send_with_id(
        &mut self,
        to: pb::Conversation,
        client_msg_id: u64,
        body: Bytes,
    ) -> u64 {
        self.send_acks.remove(&client_msg_id);
        self.send_errors.remove(&client_msg_id);
        let request_id = self.request(Body::Send(pb::Send {
            to: Some(to),
            client_msg_id,
            content_type: 1,
            body,
            kind: pb::MessageKind::Normal as i32,
            ref_seq: 0,
        }));
        self.pending_sends.insert(request_id, client_msg_id);
        request_id
    }

    /// Waits for the ack of the send with `client_msg_id`; panics on an error, a close or after
    /// `timeout`.
    pub fn wait_send_ack(&mut self, client_msg_id: u64, timeout: Duration) -> pb::SendAck {
        let what = format!("send {client_msg_id} is acked");
        self.wait_until(timeout, &what, |c| {
            c.send_acks.contains_key(&client_msg_id) || c.send_errors.contains_key(&client_msg_id)
        });
        if let Some(e) = self.send_errors.get(&client_msg_id) {
            panic!(
                "{}: send {client_msg_id} was refused: {} ({:?})",
                self.label,
                code_name(e.code),
                e.message
            );
        }
        self.send_acks[&client_msg_id].clone()
    }

    /// Waits for the ack of the send with `client_msg_id` like [`Client::wait_send_ack`], but
    /// returns why not instead of panicking: an `Error` that refused it, the connection
    /// closing, or `timeout` passing.
    pub fn try_send_ack(
        &mut self,
        client_msg_id: u64,
        timeout: Duration,
    ) -> Result<pb::SendAck, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ack) = self.send_acks.get(&client_msg_id) {
                return Ok(ack.clone());
            }
            if let Some(e) = self.send_errors.get(&client_msg_id) {
                return Err(format!("refused: {} ({})", code_name(e.code), e.message));
            }
            match self.next(deadline) {
                Incoming::Frame(_) => {}
                Incoming::Closed(why) => return Err(format!("closed: {why}")),
                Incoming::TimedOut => return Err(format!("no ack within {timeout:?}")),
                Incoming::Garbage(_) => unreachable!("next() panics on garbage"),
            }
        }
    }

    /// Opens a new connection to `addr` in place of this one and logs in again as the same
    /// user and device, like [`Client::reconnect_to`] without the sync; returns why not instead
    /// of panicking (no connection, a refused login, a close).
    pub fn try_reconnect_to(&mut self, addr: SocketAddr) -> Result<(), String> {
        let (user, device) = self
            .identity
            .clone()
            .unwrap_or_else(|| panic!("{}: reconnect needs a logged-in client", self.label));
        self.conn = T::open(addr, None).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        self.addr = addr;
        self.closed = None;
        self.pending_sends.clear();
        for held in self.held.values_mut() {
            held.acked = 0;
        }
        let token = token::mint_valid(self.secret.as_bytes(), &user, &device);
        let request_id = self.request(Body::Login(pb::Login {
            protocol_version: PROTOCOL_VERSION,
            token,
            client_name: "parley-tests".into(),
        }));
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.next(deadline) {
                Incoming::Frame(pb::Frame {
                    body: Some(Body::LoginResult(result)),
                    ..
                }) => {
                    self.logged_in(&result);
                    return Ok(());
                }
                Incoming::Frame(pb::Frame {
                    body: Some(Body::Error(e)),
                    request_id: r,
                }) if r == request_id || r == 0 => {
                    return Err(format!(
                        "login refused: {} ({})",
                        code_name(e.code),
                        e.message
                    ));
                }
                Incoming::Frame(_) => {}
                Incoming::Closed(why) => return Err(format!("closed: {why}")),
                Incoming::TimedOut => return Err("no login answer".into()),
                Incoming::Garbage(_) => unreachable!("next() panics on garbage"),
            }
        }
    }

    /// Sends `body` to `conversation` (e.g. a group) and waits for the `SendAck`.
    pub fn send_to(
        &mut self,
        conversation: &pb::Conversation,
        body: impl Into<Bytes>,
    ) -> pb::SendAck {
        let client_msg_id = fresh_client_msg_id();
        self.start_send_with_id(conversation.clone(), client_msg_id, body.into());
        self.wait_send_ack(client_msg_id, TIMEOUT)
    }

    /// Sends `body` to `conversation` and returns the refusal; panics if it is acked.
    pub fn send_refused(
        &mut self,
        conversation: &pb::Conversation,
        body: impl Into<Bytes>,
    ) -> pb::Error {
        let client_msg_id = fresh_client_msg_id();
        self.start_send_with_id(conversation.clone(), client_msg_id, body.into());
        let what = format!("send {client_msg_id} is answered");
        self.wait_until(TIMEOUT, &what, |c| {
            c.send_acks.contains_key(&client_msg_id) || c.send_errors.contains_key(&client_msg_id)
        });
        match self.send_errors.get(&client_msg_id) {
            Some(e) => e.clone(),
            None => panic!(
                "{}: send {client_msg_id} was acked, not refused",
                self.label
            ),
        }
    }

    /// Sends a `GroupRequest` and returns its `GroupResult`, or the `Error` that refused it.
    pub fn try_group(&mut self, req: pb::GroupRequest) -> Result<pb::GroupResult, pb::Error> {
        let request_id = self.request(Body::GroupRequest(req));
        let frame = self.recv_until(TIMEOUT, |f| f.request_id == request_id);
        match frame.body {
            Some(Body::GroupResult(r)) => Ok(r),
            Some(Body::Error(e)) => Err(e),
            other => panic!(
                "{}: unexpected answer to a GroupRequest: {other:?}",
                self.label
            ),
        }
    }

    /// Sends a `GroupRequest` and returns its `GroupResult`; panics if it is refused.
    pub fn group(&mut self, req: pb::GroupRequest) -> pb::GroupResult {
        let action = req.action;
        self.try_group(req).unwrap_or_else(|e| {
            panic!(
                "{}: group request {action} refused: {} ({:?})",
                self.label,
                code_name(e.code),
                e.message
            )
        })
    }

    /// Reports that the user read `conversation` up to `seq` (not answered).
    pub fn mark_read(&mut self, conversation: &pb::Conversation, seq: u64) {
        self.request(Body::Receipt(pb::Receipt {
            conversation: Some(conversation.clone()),
            r#type: pb::ReceiptType::Read as i32,
            seq,
            user: String::new(),
            time: 0,
        }));
    }

    /// Asks for one page of the user's conversation list; panics if it is refused.
    pub fn conversation_list(
        &mut self,
        limit: u32,
        after: Option<(i64, pb::Conversation)>,
    ) -> pb::ConversationList {
        let (after_activity, after_conversation) = match after {
            Some((t, c)) => (t, Some(c)),
            None => (0, None),
        };
        let request_id = self.request(Body::ConversationListRequest(pb::ConversationListRequest {
            limit,
            after_activity,
            after_conversation,
        }));
        let frame = self.recv_until(TIMEOUT, |f| f.request_id == request_id);
        match frame.body {
            Some(Body::ConversationList(l)) => l,
            other => panic!(
                "{}: unexpected answer to a ConversationListRequest: {other:?}",
                self.label
            ),
        }
    }

    /// Asks how many members read each of `count` seqs of a group from `from`.
    pub fn read_counts(
        &mut self,
        conversation: &pb::Conversation,
        from_seq: u64,
        count: u32,
    ) -> Result<pb::ReadCounts, pb::Error> {
        let request_id = self.request(Body::ReadCountsRequest(pb::ReadCountsRequest {
            conversation: Some(conversation.clone()),
            from_seq,
            count,
        }));
        let frame = self.recv_until(TIMEOUT, |f| f.request_id == request_id);
        match frame.body {
            Some(Body::ReadCounts(r)) => Ok(r),
            Some(Body::Error(e)) => Err(e),
            other => panic!(
                "{}: unexpected answer to a ReadCountsRequest: {other:?}",
                self.label
            ),
        }
    }

    /// Waits for a relayed `Receipt` of `conversation` and returns it.
    pub fn expect_receipt(&mut self, conversation: &pb::Conversation) -> pb::Receipt {
        let frame = self.recv_until(TIMEOUT, |f| {
            matches!(&f.body, Some(Body::Receipt(r)) if r.conversation.as_ref() == Some(conversation))
        });
        match frame.body {
            Some(Body::Receipt(r)) => r,
            _ => unreachable!("the predicate matched a receipt"),
        }
    }

    /// Sends a `PresenceRequest` and returns its answer (the frames of an answer split with
    /// `more` joined into one), or the `Error` that refused it.
    pub fn try_presence(
        &mut self,
        req: pb::PresenceRequest,
    ) -> Result<pb::PresenceUpdate, pb::Error> {
        let request_id = self.request(Body::PresenceRequest(req));
        let mut answer: Option<pb::PresenceUpdate> = None;
        loop {
            let frame = self.recv_until(TIMEOUT, |f| f.request_id == request_id);
            match frame.body {
                Some(Body::PresenceUpdate(part)) => {
                    let more = part.more;
                    match &mut answer {
                        Some(a) => a.users.extend(part.users),
                        None => answer = Some(part),
                    }
                    if !more {
                        let mut answer = answer.unwrap_or_default();
                        answer.more = false;
                        return Ok(answer);
                    }
                }
                Some(Body::Error(e)) => return Err(e),
                other => panic!(
                    "{}: unexpected answer to a PresenceRequest: {other:?}",
                    self.label
                ),
            }
        }
    }

    /// Sends a `PresenceRequest` and returns its answer; panics if it is refused.
    pub fn presence(&mut self, req: pb::PresenceRequest) -> pb::PresenceUpdate {
        let action = req.action;
        self.try_presence(req).unwrap_or_else(|e| {
            panic!(
                "{}: presence request {action} refused: {} ({:?})",
                self.label,
                code_name(e.code),
                e.message
            )
        })
    }

    /// Sends `Typing{conversation, typing}` (never answered unless refused).
    pub fn send_typing(&mut self, conversation: &pb::Conversation, typing: bool) -> u64 {
        self.request(Body::Typing(pb::Typing {
            conversation: Some(conversation.clone()),
            typing,
            user: String::new(),
            device: String::new(),
        }))
    }

    /// The presence pushes received so far (request_id 0), in order.
    pub fn presence_pushes(&self) -> &[pb::PresenceUpdate] {
        &self.presence_pushes
    }

    /// Takes the presence pushes received so far.
    pub fn take_presence_pushes(&mut self) -> Vec<pb::PresenceUpdate> {
        std::mem::take(&mut self.presence_pushes)
    }

    /// The typing frames received so far, in order.
    pub fn typings(&self) -> &[pb::Typing] {
        &self.typings
    }

    /// Takes the typing frames received so far.
    pub fn take_typings(&mut self) -> Vec<pb::Typing> {
        std::mem::take(&mut self.typings)
    }

    /// Sends `body` to user `to` and waits for the `SendAck`.
    pub fn send(&mut self, to: &str, body: impl Into<Bytes>) -> pb::SendAck {
        let client_msg_id = self.start_send(to, body);
        self.wait_send_ack(client_msg_id, TIMEOUT)
    }

    /// Sends `body` to user `to` with a chosen client message id (e.g. a retry) and waits for the
    /// `SendAck`.
    pub fn send_with_id(
        &mut self,
        to: &str,
        client_msg_id: u64,
        body: impl Into<Bytes>,
    ) -> pb::SendAck {
        self.start_send_with_id(crate::direct(to), client_msg_id, body.into());
        self.wait_send_ack(client_msg_id, TIMEOUT)
    }

    /// Sends every body to user `to`, keeping up to `window` sends unacked at a time, and
    /// returns the acks in sending order. Panics on any failure.
    pub fn send_many(
        &mut self,
        to: &str,
        bodies: impl IntoIterator<Item = Bytes>,
        window: usize,
    ) -> Vec<pb::SendAck> {
        let run = self.pipeline_sends(to, bodies, window, |_| {});
        if let Some(why) = &run.closed {
            panic!(
                "{}: the connection closed ({why}) after {} acked sends, {} unacked",
                self.label,
                run.acks.len(),
                run.unacked.len()
            );
        }
        run.acks
    }

    /// Pipelined sends like [`Client::send_many`], but a close of the connection ends the run
    /// instead of failing it: the result says what was acked before. `on_ack` sees each ack as
    /// it is matched. Still panics on a refused send or a silent broker.
    pub fn pipeline_sends(
        &mut self,
        to: &str,
        bodies: impl IntoIterator<Item = Bytes>,
        window: usize,
        on_ack: impl FnMut(&pb::SendAck),
    ) -> Pipeline {
        self.pipeline_sends_to(crate::direct(to), bodies, window, on_ack)
    }

    /// [`Client::pipeline_sends`] to any conversation (e.g. a room).
    pub fn pipeline_sends_to(
        &mut self,
        conversation: pb::Conversation,
        bodies: impl IntoIterator<Item = Bytes>,
        window: usize,
        mut on_ack: impl FnMut(&pb::SendAck),
    ) -> Pipeline {
        assert!(window > 0, "a pipeline needs a window of at least one send");
        let mut run = Pipeline::default();
        let mut in_flight: VecDeque<(u64, Bytes)> = VecDeque::new();
        let mut bodies = bodies.into_iter().peekable();
        while bodies.peek().is_some() || !in_flight.is_empty() {
            while in_flight.len() < window {
                let Some(body) = bodies.next() else { break };
                let client_msg_id = fresh_client_msg_id();
                let request_id = self.next_request_id;
                self.next_request_id += 1;
                let frame = pb::Frame {
                    request_id,
                    body: Some(Body::Send(pb::Send {
                        to: Some(conversation.clone()),
                        client_msg_id,
                        content_type: 1,
                        body: body.clone(),
                        kind: pb::MessageKind::Normal as i32,
                        ref_seq: 0,
                    })),
                };
                if let Err(e) = self.conn.write_frame(&frame) {
                    run.closed = Some(format!("write failed: {e}"));
                    break;
                }
                self.pending_sends.insert(request_id, client_msg_id);
                in_flight.push_back((client_msg_id, body));
            }
            if run.closed.is_some() {
                break;
            }
            let Some((front, _)) = in_flight.front() else {
                continue;
            };
            let front = *front;
            let deadline = Instant::now() + TIMEOUT;
            while !self.send_acks.contains_key(&front) {
                if let Some(e) = self.send_errors.get(&front) {
                    panic!(
                        "{}: pipelined send {front} was refused: {} ({:?})",
                        self.label,
                        code_name(e.code),
                        e.message
                    );
                }
                match self.next(deadline) {
                    Incoming::Frame(_) => {}
                    Incoming::Closed(why) => {
                        run.closed = Some(why);
                        break;
                    }
                    Incoming::TimedOut => panic!(
                        "{}: pipelined send {front} was not acked within {TIMEOUT:?}",
                        self.label
                    ),
                    Incoming::Garbage(_) => unreachable!("next() panics on garbage"),
                }
            }
            if run.closed.is_some() {
                break;
            }
            let (client_msg_id, body) = in_flight.pop_front().expect("the front is in flight");
            let ack = self.send_acks[&client_msg_id].clone();
            on_ack(&ack);
            run.acks.push(ack);
            run.bodies.push(body);
        }
        run.unacked = in_flight.into_iter().map(|(id, _)| id).collect();
        run
    }

    /// Writes `n` requests made by `make` at once (one after the other, without waiting), then
    /// reads until each is answered: served (its final answer: `Pong`, `HistoryPage`, the
    /// `SyncPage` with `done`, `SendAck`, ...) or refused (an `Error` with its request_id).
    /// Panics if any is still unanswered after [`TIMEOUT`] or the connection closes.
    pub fn burst(&mut self, n: usize, make: impl Fn() -> Body) -> Burst {
        let mut outstanding: std::collections::HashSet<u64> =
            (0..n).map(|_| self.request(make())).collect();
        let mut result = Burst::default();
        let deadline = Instant::now() + TIMEOUT;
        while !outstanding.is_empty() {
            match self.next(deadline) {
                Incoming::Frame(frame) => {
                    if !outstanding.contains(&frame.request_id) {
                        continue;
                    }
                    let finished = match &frame.body {
                        Some(Body::Error(e)) => {
                            result.refused.push(e.clone());
                            true
                        }
                        Some(Body::SyncPage(p)) => p.done,
                        Some(Body::SyncSummary(_)) => false,
                        Some(_) => true,
                        None => false,
                    };
                    if finished {
                        outstanding.remove(&frame.request_id);
                        if !matches!(frame.body, Some(Body::Error(_))) {
                            result.served += 1;
                        }
                    }
                }
                other => panic!(
                    "{}: a burst of {n} requests: {} still unanswered: {other:?}",
                    self.label,
                    outstanding.len()
                ),
            }
        }
        result
    }

    // ---------------------------------------------------------------------------------------
    // Rooms
    // ---------------------------------------------------------------------------------------

    /// Sends `RoomRequest{action, room_id}` and returns its `RoomResult`, or the `Error` that
    /// answered it.
    pub fn try_room(
        &mut self,
        action: pb::RoomAction,
        room_id: &str,
    ) -> Result<pb::RoomResult, pb::Error> {
        let request_id = self.request(Body::RoomRequest(pb::RoomRequest {
            action: action as i32,
            room_id: room_id.to_owned(),
        }));
        let frame = self.recv_until(TIMEOUT, |f| f.request_id == request_id);
        match frame.body {
            Some(Body::RoomResult(result)) => Ok(result),
            Some(Body::Error(error)) => Err(error),
            other => panic!(
                "{}: unexpected answer to a RoomRequest: {other:?}",
                self.label
            ),
        }
    }

    /// Joins room `room_id` on this connection; panics unless the broker answers `RoomResult`.
    pub fn join_room(&mut self, room_id: &str) -> pb::RoomResult {
        self.try_room(pb::RoomAction::Join, room_id)
            .unwrap_or_else(|e| panic!("{}: join of {room_id:?} refused: {e:?}", self.label))
    }

    /// Leaves room `room_id`; panics unless the broker answers `RoomResult`.
    pub fn leave_room(&mut self, room_id: &str) -> pb::RoomResult {
        self.try_room(pb::RoomAction::LeaveRoom, room_id)
            .unwrap_or_else(|e| panic!("{}: leave of {room_id:?} refused: {e:?}", self.label))
    }

    /// Sends `body` to room `room_id` and returns its `SendAck`, or the `Error` that refused it.
    pub fn try_send_to_room(
        &mut self,
        room_id: &str,
        body: impl Into<Bytes>,
    ) -> Result<pb::SendAck, pb::Error> {
        let client_msg_id = fresh_client_msg_id();
        self.start_send_with_id(crate::room(room_id), client_msg_id, body.into());
        let what = format!("room send {client_msg_id} is answered");
        self.wait_until(TIMEOUT, &what, |c| {
            c.send_acks.contains_key(&client_msg_id) || c.send_errors.contains_key(&client_msg_id)
        });
        match self.send_errors.get(&client_msg_id) {
            Some(e) => Err(e.clone()),
            None => Ok(self.send_acks[&client_msg_id].clone()),
        }
    }

    /// Sends `body` to room `room_id` and waits for the `SendAck`; panics if refused.
    pub fn send_to_room(&mut self, room_id: &str, body: impl Into<Bytes>) -> pb::SendAck {
        self.try_send_to_room(room_id, body)
            .unwrap_or_else(|e| panic!("{}: room send refused: {e:?}", self.label))
    }

    /// Every `RoomLag` received, with the number of message arrivals before it (so
    /// `arrivals()[i]` is the first message after a lag recorded at `i`).
    pub fn room_lags(&self) -> &[(usize, pb::RoomLag)] {
        &self.room_lags
    }

    // ---------------------------------------------------------------------------------------
    // Receiving messages, acking, syncing
    // ---------------------------------------------------------------------------------------

    /// Waits for a `Deliver` frame carrying `(conversation, seq)` (a new one: frames read
    /// earlier do not count) and returns that message.
    pub fn expect_delivery(
        &mut self,
        conversation: &pb::Conversation,
        seq: u64,
        timeout: Duration,
    ) -> pb::Message {
        let frame = self.recv_until(timeout, |f| {
            delivered(f).any(|m| m.seq == seq && m.conversation.as_ref() == Some(conversation))
        });
        delivered(&frame)
            .find(|m| m.seq == seq && m.conversation.as_ref() == Some(conversation))
            .cloned()
            .expect("the predicate matched this message")
    }

    /// Reads for `duration` and panics if a `Deliver` of `(conversation, seq)` arrives, saying
    /// `why` it must not.
    pub fn assert_no_delivery(
        &mut self,
        conversation: &pb::Conversation,
        seq: u64,
        duration: Duration,
        why: &str,
    ) {
        for frame in self.receive_for(duration) {
            assert!(
                !delivered(&frame)
                    .any(|m| m.seq == seq && m.conversation.as_ref() == Some(conversation)),
                "{}: seq {seq} of {} was delivered again: {why}",
                self.label,
                conv_name(conversation)
            );
        }
    }

    /// Reads until the client holds every seq `1..=seq` of `conversation`.
    pub fn wait_for_cursor(
        &mut self,
        conversation: &pb::Conversation,
        seq: u64,
        timeout: Duration,
    ) {
        let what = format!("holding seqs 1..={seq} of {}", conv_name(conversation));
        self.wait_until(timeout, &what, |c| c.cursor(conversation) >= seq);
    }

    /// Acks `(conversation, seq)` (cumulatively).
    pub fn ack(&mut self, conversation: &pb::Conversation, seq: u64) {
        self.request(Body::DeliverAck(pb::DeliverAck {
            acks: vec![pb::AckCursor {
                conversation: Some(conversation.clone()),
                seq,
            }],
        }));
        let held = self.held.entry(conversation.clone()).or_default();
        held.acked = held.acked.max(seq);
    }

    /// Syncs from what the client holds: one cursor per conversation it knows, at the highest
    /// seq it holds with no gap below. Returns what the sync carried once its last page came.
    pub fn sync(&mut self) -> SyncResult {
        let cursors = self
            .held
            .iter()
            .filter(|(_, h)| h.contiguous > 0)
            .map(|(conversation, h)| pb::AckCursor {
                conversation: Some(conversation.clone()),
                seq: h.contiguous,
            })
            .collect();
        self.sync_with(cursors, 0)
    }

    /// Sends `SyncRequest{cursors, page_size}` and reads its `SyncSummary` and `SyncPage`s up to
    /// the one with `done`. Checks that the summary comes first.
    pub fn sync_with(&mut self, cursors: Vec<pb::AckCursor>, page_size: u32) -> SyncResult {
        self.sync_request(pb::SyncRequest {
            cursors,
            page_size,
            max_per_conversation: 0,
        })
    }

    /// Sends `request` and reads its answers up to the `done` page, as [`Client::sync_with`].
    pub fn sync_request(&mut self, request: pb::SyncRequest) -> SyncResult {
        let request_id = self.request(Body::SyncRequest(request));
        self.finish_sync(request_id)
    }

    /// Reads the `SyncSummary` and `SyncPage`s answering the sync `request_id` up to the one
    /// with `done` (frames of other requests are observed and passed over). Checks that the
    /// summary comes first.
    pub fn finish_sync(&mut self, request_id: u64) -> SyncResult {
        let mut summary = None;
        let mut pages = Vec::new();
        loop {
            let frame = self.recv_until(TIMEOUT, |f| f.request_id == request_id);
            match frame.body {
                Some(Body::SyncSummary(s)) => {
                    assert!(
                        summary.is_none() && pages.is_empty(),
                        "{}: one SyncSummary, before the pages",
                        self.label
                    );
                    summary = Some(s);
                }
                Some(Body::SyncPage(page)) => {
                    assert!(
                        summary.is_some(),
                        "{}: the SyncSummary is answered before the first SyncPage",
                        self.label
                    );
                    let done = page.done;
                    pages.push(page);
                    if done {
                        break;
                    }
                }
                Some(Body::Error(e)) => panic!(
                    "{}: sync refused: {} ({:?})",
                    self.label,
                    code_name(e.code),
                    e.message
                ),
                other => panic!(
                    "{}: unexpected answer to a SyncRequest: {other:?}",
                    self.label
                ),
            }
        }
        SyncResult {
            summary: summary.expect("the summary came before the last page"),
            pages,
        }
    }

    /// Sends a `HistoryRequest` and returns its `HistoryPage`: backwards from `before_seq` (0:
    /// the newest), or forwards after `after_seq` if it is `Some` (even `Some(0)`).
    pub fn history(
        &mut self,
        conversation: &pb::Conversation,
        before_seq: u64,
        after_seq: Option<u64>,
        limit: u32,
    ) -> pb::HistoryPage {
        let request_id = self.request(Body::HistoryRequest(pb::HistoryRequest {
            conversation: Some(conversation.clone()),
            before_seq,
            after_seq,
            limit,
        }));
        let frame = self.recv_until(TIMEOUT, |f| f.request_id == request_id);
        match frame.body {
            Some(Body::HistoryPage(page)) => page,
            Some(Body::Error(e)) => panic!(
                "{}: history refused: {} ({:?})",
                self.label,
                code_name(e.code),
                e.message
            ),
            other => panic!(
                "{}: unexpected answer to a HistoryRequest: {other:?}",
                self.label
            ),
        }
    }

    // ---------------------------------------------------------------------------------------
    // What the client holds
    // ---------------------------------------------------------------------------------------

    /// The highest seq of `conversation` held with every seq below it held (0: none).
    pub fn cursor(&self, conversation: &pb::Conversation) -> u64 {
        self.held.get(conversation).map_or(0, |h| h.contiguous)
    }

    /// The seqs of `conversation` held, ascending.
    pub fn held_seqs(&self, conversation: &pb::Conversation) -> Vec<u64> {
        self.held
            .get(conversation)
            .map(|h| h.messages.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The held message `(conversation, seq)`.
    pub fn message(&self, conversation: &pb::Conversation, seq: u64) -> Option<&pb::Message> {
        self.held.get(conversation)?.messages.get(&seq)
    }

    /// Every message arrival, in order, including duplicates.
    pub fn arrivals(&self) -> &[Arrival] {
        &self.arrivals
    }

    /// The seqs of `conversation` that came in `Deliver` frames, in arrival order.
    pub fn delivered_seqs(&self, conversation: &pb::Conversation) -> Vec<u64> {
        self.arrivals
            .iter()
            .filter(|a| a.via == Via::Deliver && &a.conversation == conversation)
            .map(|a| a.seq)
            .collect()
    }

    /// Arrivals of a `(conversation, seq)` the client already held.
    pub fn duplicates(&self) -> &[Arrival] {
        &self.duplicates
    }

    /// Panics if any `(conversation, seq)` arrived twice, explaining the promise.
    pub fn assert_no_duplicates(&self) {
        assert!(
            self.duplicates.is_empty(),
            "{}: a client that acks promptly is never sent the same (conversation, seq) twice, \
             but {} arrived again (first few: {:?})",
            self.label,
            self.duplicates.len(),
            self.duplicates
                .iter()
                .take(10)
                .map(|a| format!(
                    "{} seq {} via {:?}",
                    conv_name(&a.conversation),
                    a.seq,
                    a.via
                ))
                .collect::<Vec<_>>()
        );
    }

    /// How many `Behind` frames came.
    pub fn behind_count(&self) -> usize {
        self.behind
    }

    /// A one-line account of what the client holds, for failure messages.
    pub fn state(&self) -> String {
        let mut parts: Vec<String> = self
            .held
            .iter()
            .map(|(c, h)| {
                format!(
                    "{}: {} held, contiguous to {}, highest {}",
                    conv_name(c),
                    h.messages.len(),
                    h.contiguous,
                    h.messages.keys().next_back().copied().unwrap_or(0)
                )
            })
            .collect();
        parts.sort();
        format!(
            "holds [{}]; {} duplicates, {} Behind, errors {:?}, closed: {:?}",
            parts.join("; "),
            self.duplicates.len(),
            self.behind,
            self.errors
                .iter()
                .map(|e| code_name(e.code))
                .collect::<Vec<_>>(),
            self.closed
        )
    }

    // ---------------------------------------------------------------------------------------
    // Observation
    // ---------------------------------------------------------------------------------------

    fn observe(&mut self, frame: &pb::Frame) {
        match &frame.body {
            Some(Body::Deliver(d)) => self.hold(&d.messages, Via::Deliver),
            Some(Body::SyncPage(p)) => self.hold(&p.messages, Via::Sync),
            Some(Body::SendAck(ack)) => {
                self.pending_sends.remove(&frame.request_id);
                self.send_acks.insert(ack.client_msg_id, ack.clone());
            }
            Some(Body::Error(e)) => {
                let send = if e.client_msg_id != 0 {
                    Some(e.client_msg_id)
                } else {
                    self.pending_sends.get(&frame.request_id).copied()
                };
                match send {
                    Some(client_msg_id) => {
                        self.pending_sends.remove(&frame.request_id);
                        self.send_errors.insert(client_msg_id, e.clone());
                    }
                    None => self.errors.push(e.clone()),
                }
            }
            Some(Body::Behind(_)) => self.behind += 1,
            Some(Body::RoomLag(lag)) => self.room_lags.push((self.arrivals.len(), lag.clone())),
            Some(Body::PresenceUpdate(u)) if frame.request_id == 0 => {
                self.presence_pushes.push(u.clone());
            }
            Some(Body::Typing(t)) => self.typings.push(t.clone()),
            Some(Body::Ping(ping)) => {
                // A server ping is answered at once, as any client must; a failed write shows
                // up as a close on the next read.
                let pong = pb::Frame {
                    request_id: frame.request_id,
                    body: Some(Body::Pong(pb::Pong {
                        nonce: ping.nonce,
                        time: 0,
                    })),
                };
                let _ = self.conn.write_frame(&pong);
            }
            _ => {}
        }
    }

    fn hold(&mut self, messages: &[pb::Message], via: Via) {
        let mut touched = Vec::new();
        for m in messages {
            let conversation = m.conversation.clone().unwrap_or_else(|| {
                panic!(
                    "{}: a {via:?} message (seq {}) without a conversation",
                    self.label, m.seq
                )
            });
            let arrival = Arrival {
                conversation: conversation.clone(),
                seq: m.seq,
                via,
            };
            let me = self.identity.as_ref().map(|(u, _)| u.as_str());
            let held = self.held.entry(conversation.clone()).or_default();
            // A group member sees the group from the event that added it: the seqs below are
            // not ours to hold.
            if me.is_some_and(|me| adds_user(m, me)) && held.contiguous + 1 < m.seq {
                held.contiguous = m.seq - 1;
            }
            match held.messages.entry(m.seq) {
                btree_map::Entry::Occupied(_) => self.duplicates.push(arrival.clone()),
                btree_map::Entry::Vacant(slot) => {
                    slot.insert(m.clone());
                    while held.messages.contains_key(&(held.contiguous + 1)) {
                        held.contiguous += 1;
                    }
                }
            }
            self.arrivals.push(arrival);
            if !touched.contains(&conversation) {
                touched.push(conversation);
            }
        }
        if !self.auto_ack {
            return;
        }
        let acks: Vec<pb::AckCursor> = touched
            .into_iter()
            .filter_map(|conversation| {
                let held = self.held.get_mut(&conversation)?;
                (held.contiguous > held.acked).then(|| {
                    held.acked = held.contiguous;
                    pb::AckCursor {
                        conversation: Some(conversation),
                        seq: held.contiguous,
                    }
                })
            })
            .collect();
        if !acks.is_empty() {
            // As with pongs, a failed write shows up as a close on the next read.
            let frame = pb::Frame {
                request_id: 0,
                body: Some(Body::DeliverAck(pb::DeliverAck { acks })),
            };
            let _ = self.conn.write_frame(&frame);
        }
    }
}

impl Client<Ws> {
    /// Speaks JSON in WebSocket text messages from now on; the broker answers in JSON too.
    pub fn use_json(&mut self) {
        self.conn.use_text();
    }

    /// How many frames came as JSON text messages.
    pub fn json_frames_read(&self) -> usize {
        self.conn.texts_read()
    }
}

impl<S: crate::transport::Socket> Client<Tcp<S>> {
    /// Writes one frame per body, each with a fresh request id, in a single write (so the broker
    /// reads them together); returns the request ids in order.
    pub fn request_together(&mut self, bodies: Vec<Body>) -> Vec<u64> {
        let frames: Vec<pb::Frame> = bodies
            .into_iter()
            .map(|body| {
                let request_id = self.next_request_id;
                self.next_request_id += 1;
                pb::Frame {
                    request_id,
                    body: Some(body),
                }
            })
            .collect();
        if let Err(e) = self.conn.write_frames(&frames) {
            panic!("{}: cannot write {} frames: {e}", self.label, frames.len());
        }
        frames.iter().map(|f| f.request_id).collect()
    }
}

/// Whether `m` is the group event that makes `user` a member.
pub fn adds_user(m: &pb::Message, user: &str) -> bool {
    use pb::GroupEventType as E;
    let Some(e) = &m.event else {
        return false;
    };
    match E::try_from(e.r#type) {
        Ok(E::Created) => e.actor == user || e.users.iter().any(|u| u == user),
        Ok(E::MembersAdded) => e.users.iter().any(|u| u == user),
        Ok(E::MemberJoined) => e.actor == user,
        _ => false,
    }
}

/// The messages of a `Deliver` frame (none for other frames).
pub fn delivered(frame: &pb::Frame) -> impl Iterator<Item = &pb::Message> {
    let messages: &[pb::Message] = match &frame.body {
        Some(Body::Deliver(d)) => &d.messages,
        _ => &[],
    };
    messages.iter()
}

/// The name of an error code, or its number if this schema does not know it.
pub fn code_name(code: i32) -> String {
    pb::ErrorCode::try_from(code)
        .map_or_else(|_| format!("code {code}"), |c| c.as_str_name().into())
}

/// A short description of a frame for failure messages.
pub fn describe(frame: &pb::Frame) -> String {
    match &frame.body {
        Some(Body::Error(e)) => format!("error {}", code_name(e.code)),
        Some(Body::Deliver(d)) => format!(
            "deliver [{}]",
            d.messages
                .iter()
                .map(|m| m.seq.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        _ => parley_proto::frame::body_name(frame).to_owned(),
    }
}

/// The first few frame descriptions and how many there were.
fn summarize(seen: &[String]) -> String {
    if seen.is_empty() {
        return "none".into();
    }
    let shown: Vec<&str> = seen.iter().take(20).map(String::as_str).collect();
    format!("{} frames: {}", seen.len(), shown.join(", "))
}
