//! One client connection's protocol state, sans-IO: frames and time in, frames and requests out.
//!
//! The shard owns the socket and the transport; it feeds the session decoded frames
//! ([`Session::handle_frame`]), deliveries routed to the user ([`Session::deliver`]), sync pages
//! read from the log ([`Session::sync_page`]) and the time ([`Session::handle_timeout`]), and
//! carries out what the session asks for in an [`Outbox`]: frames to write, routing requests,
//! a close. [`Session::next_deadline`] tells the shard when to call back; nothing here reads a
//! clock, so the unit tests drive it with fake time.
//!
//! ### Delivery state
//! * Live deliveries wait in `unacked` until a cumulative `DeliverAck` covers them. Each has a
//!   retransmit timer in the shard's timing wheel ([`Timers`]: O(1) to schedule and to cancel on
//!   ack); it is retransmitted after `retransmit_initial_ms`, then with doubling back-off capped at
//!   `retransmit_max_ms`; after `retransmit_tries` retransmits the connection is closed as
//!   broken (RETRANSMIT_EXHAUSTED) and the client re-syncs when it reconnects.
//! * When the shard reports the outbound queue over its bound, the session goes *behind*: it
//!   sends `Behind`, forgets its unacked deliveries and pushes nothing live until a sync
//!   completes (the messages are in the log; the sync fetches them).
//! * While a sync runs nothing is pushed live: the sync's last step reads from the log whatever
//!   arrived meanwhile, so a syncing client gets each conversation in seq order.
//! * `live[conv]` is the range of seqs pushed live since login (contiguous: the owner releases
//!   deliveries in seq order and the route is FIFO); a sync skips those seqs. `synced[conv]` is
//!   the highest seq a sync sent; a live delivery at or below it is skipped. So an acking client
//!   gets each (conversation, seq) once, apart from retransmits.

use super::FastMap;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use prost::Message as _;

use crate::auth::Identity;
use crate::config::Config;
use crate::wheel::TimerKey;

/// The session's view of the settings it enforces.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub(crate) login_ms: u64,
    pub(crate) heartbeat_ms: u64,
    pub(crate) idle_ms: u64,
    pub(crate) write_stall_ms: u64,
    pub(crate) retransmit_initial_ms: u64,
    pub(crate) retransmit_max_ms: u64,
    pub(crate) retransmit_tries: u32,
    pub(crate) send_rate_per_sec: u32,
    pub(crate) send_burst: u32,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_frame_bytes: u32,
    pub(crate) max_page: u32,
    /// Most deliveries awaiting an ack before the session counts as behind.
    pub(crate) max_unacked: usize,
}

impl SessionConfig {
    pub(crate) fn from_config(c: &Config) -> Self {
        Self {
            login_ms: c.timeouts.login_ms,
            heartbeat_ms: c.timeouts.heartbeat_ms,
            idle_ms: c.timeouts.idle_ms,
            write_stall_ms: c.timeouts.write_stall_ms,
            retransmit_initial_ms: c.timeouts.retransmit_initial_ms,
            retransmit_max_ms: c.timeouts.retransmit_max_ms,
            retransmit_tries: c.timeouts.retransmit_tries,
            send_rate_per_sec: c.limits.send_rate_per_sec,
            send_burst: c.limits.send_burst,
            max_body_bytes: c.limits.max_body_bytes as usize,
            max_frame_bytes: c.limits.max_frame_bytes,
            max_page: c.limits.max_page,
            max_unacked: 4096,
        }
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for a valid login (the first frame, or the WebSocket upgrade's token).
    AwaitingLogin,
    /// Logged in on the user's home shard.
    Active,
    /// Closing: nothing more is read or sent but the last words.
    Closing,
}

/// A validated send, for the conversation's owner shard.
#[derive(Debug, Clone)]
pub(crate) struct SendRequest {
    pub(crate) request_id: u64,
    pub(crate) key: String,
    pub(crate) send: pb::Send,
}

/// A sync the session asked for; the shard answers with [`Session::sync_summary_sent`] and pages.
#[derive(Debug, Clone)]
pub(crate) struct SyncAsk {
    pub(crate) request_id: u64,
    /// Highest seq the client holds, per conversation key.
    pub(crate) cursors: HashMap<String, u64>,
    pub(crate) page_size: u32,
}

/// A history read the session asked for.
#[derive(Debug, Clone)]
pub(crate) struct HistoryAsk {
    pub(crate) request_id: u64,
    pub(crate) key: String,
    pub(crate) view: pb::Conversation,
    /// Seqs to read: `[from, to]` inclusive.
    pub(crate) from: u64,
    pub(crate) to: u64,
    pub(crate) limit: u32,
    pub(crate) newest_first: bool,
}

/// What the session asks the shard to do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Store and deliver a message.
    Send(SendRequest),
    /// Answer a sync request (summary, then pages).
    Sync(SyncAsk),
    /// Read a page of one conversation's history.
    History(HistoryAsk),
    /// Flush the frames written so far, then close with this code (after an `Error` frame
    /// already in the outbox when `code` is not `Unspecified`).
    Close(pb::ErrorCode, String),
}

/// Frames and actions produced by one call into the session.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) frames: Vec<pb::Frame>,
    pub(crate) actions: Vec<Action>,
}

impl Outbox {
    fn error(&mut self, request_id: u64, code: pb::ErrorCode, message: &str, fatal: bool) {
        self.frames
            .push(error_frame(request_id, code, message, fatal, 0));
        if fatal {
            self.actions.push(Action::Close(code, message.to_owned()));
        }
    }
}

/// An `Error` frame.
pub(crate) fn error_frame(
    request_id: u64,
    code: pb::ErrorCode,
    message: &str,
    fatal: bool,
    client_msg_id: u64,
) -> pb::Frame {
    pb::Frame {
        request_id,
        body: Some(Body::Error(pb::Error {
            code: code as i32,
            message: message.to_owned(),
            fatal,
            client_msg_id,
            retry_after_ms: 0,
        })),
    }
}

fn deliver_frame(messages: Vec<pb::Message>) -> pb::Frame {
    pb::Frame {
        request_id: 0,
        body: Some(Body::Deliver(pb::Deliver { messages })),
    }
}

/// The retransmit timers of a session's deliveries, kept in the shard's timing wheel (one entry
/// per unacknowledged delivery: O(1) to schedule when it is sent and to cancel when it is acked).
pub(crate) trait Timers {
    /// Schedules the retransmit of (`key`, `seq`) at tick `at`.
    fn schedule(&mut self, at: u64, key: &Arc<str>, seq: u64) -> TimerKey;
    /// Cancels a scheduled retransmit.
    fn cancel(&mut self, timer: TimerKey);
}

#[derive(Debug)]
struct Unacked {
    message: pb::Message,
    retransmits: u32,
    timer: TimerKey,
}

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last_ms: u64,
}

/// One client connection's protocol state.
#[derive(Debug)]
pub(crate) struct Session {
    cfg: Arc<SessionConfig>,
    phase: Phase,
    identity: Option<Identity>,
    login_deadline: u64,
    last_heard: u64,
    bucket: Bucket,
    /// Unacked live deliveries, per conversation key, by seq; each has a retransmit timer.
    unacked: FastMap<Arc<str>, BTreeMap<u64, Unacked>>,
    unacked_count: usize,
    /// Messages whose retransmit fired this turn, sent together by `flush_resends`.
    resend: Vec<pb::Message>,
    behind: bool,
    live: FastMap<String, (u64, u64)>,
    synced: FastMap<String, u64>,
    syncing: bool,
    stall_since: Option<u64>,
}

impl Session {
    /// A fresh connection at time `now` (ms), waiting for its login.
    pub(crate) fn new(cfg: Arc<SessionConfig>, now: u64) -> Self {
        let login_deadline = now + cfg.login_ms;
        let burst = f64::from(cfg.send_burst);
        Self {
            cfg,
            phase: Phase::AwaitingLogin,
            identity: None,
            login_deadline,
            last_heard: now,
            bucket: Bucket {
                tokens: burst,
                last_ms: now,
            },
            unacked: FastMap::default(),
            unacked_count: 0,
            resend: Vec::new(),
            behind: false,
            live: FastMap::default(),
            synced: FastMap::default(),
            syncing: false,
            stall_since: None,
        }
    }

    /// The session's phase.
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Who is logged in, once active.
    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Whether live push is paused (the client must sync).
    #[cfg(test)]
    pub(crate) fn is_behind(&self) -> bool {
        self.behind
    }

    /// Marks the session logged in as `identity` and writes the `LoginResult`.
    pub(crate) fn activate(
        &mut self,
        identity: Identity,
        request_id: u64,
        node: &str,
        now: u64,
        unix_ms: i64,
        out: &mut Outbox,
    ) {
        self.last_heard = now;
        out.frames.push(pb::Frame {
            request_id,
            body: Some(Body::LoginResult(pb::LoginResult {
                protocol_version: parley_proto::PROTOCOL_VERSION,
                user: identity.user.clone(),
                device: identity.device.clone(),
                node: node.to_owned(),
                server_time: unix_ms,
                heartbeat_interval_ms: self.cfg.heartbeat_ms.min(u64::from(u32::MAX)) as u32,
                idle_timeout_ms: self.cfg.idle_ms.min(u64::from(u32::MAX)) as u32,
                max_frame_bytes: self.cfg.max_frame_bytes,
                udp_session_id: 0,
                udp_session_key: Vec::new(),
            })),
        });
        self.identity = Some(identity);
        self.phase = Phase::Active;
    }

    /// Closes the session from the server side with `code` (e.g. REPLACED, SHUTTING_DOWN).
    pub(crate) fn close(&mut self, code: pb::ErrorCode, message: &str, out: &mut Outbox) {
        if self.phase == Phase::Closing {
            return;
        }
        self.phase = Phase::Closing;
        out.error(0, code, message, true);
    }

    /// Traffic that carries no frame (a WebSocket ping or pong) still counts as heard.
    pub(crate) fn handle_liveness(&mut self, now: u64) {
        self.last_heard = now;
    }

    /// A frame from the client. Login frames are answered by the shard (it verifies the token),
    /// so here a `Login` is returned for the shard to handle when the session awaits one.
    pub(crate) fn handle_frame(
        &mut self,
        frame: pb::Frame,
        now: u64,
        timers: &mut dyn Timers,
        out: &mut Outbox,
    ) -> Option<(u64, pb::Login)> {
        self.last_heard = now;
        let request_id = frame.request_id;
        match (self.phase, frame.body) {
            (Phase::Closing, _) => None,
            (Phase::AwaitingLogin, Some(Body::Login(login))) => Some((request_id, login)),
            (Phase::AwaitingLogin, _) => {
                self.phase = Phase::Closing;
                out.error(
                    request_id,
                    pb::ErrorCode::LoginRequired,
                    "the first frame must be a Login",
                    true,
                );
                None
            }
            (Phase::Active, Some(body)) => {
                self.handle_active(request_id, body, now, timers, out);
                None
            }
            (Phase::Active, None) => {
                out.error(
                    request_id,
                    pb::ErrorCode::UnexpectedFrame,
                    "frame without a body",
                    false,
                );
                None
            }
        }
    }

    fn handle_active(
        &mut self,
        request_id: u64,
        body: Body,
        now: u64,
        timers: &mut dyn Timers,
        out: &mut Outbox,
    ) {
        let Some(user) = self.identity.as_ref().map(|i| i.user.clone()) else {
            return;
        };
        match body {
            Body::Ping(ping) => out.frames.push(pb::Frame {
                request_id,
                body: Some(Body::Pong(pb::Pong {
                    nonce: ping.nonce,
                    time: 0,
                })),
            }),
            Body::Pong(_) => {}
            Body::Send(send) => self.handle_send(&user, request_id, send, now, out),
            Body::DeliverAck(ack) => {
                for cursor in ack.acks {
                    let Some(view) = cursor.conversation else {
                        continue;
                    };
                    if let Some(key) = super::conv::key_for(&user, &view) {
                        self.ack(&key, cursor.seq, timers);
                    }
                }
            }
            Body::SyncRequest(req) => {
                let mut cursors = HashMap::new();
                for c in req.cursors {
                    if let Some(key) = c
                        .conversation
                        .as_ref()
                        .and_then(|v| super::conv::key_for(&user, v))
                    {
                        cursors.insert(key, c.seq);
                    }
                }
                let page_size = match req.page_size {
                    0 => self.cfg.max_page,
                    n => n.min(self.cfg.max_page),
                };
                self.synced.clear();
                self.syncing = true;
                out.actions.push(Action::Sync(SyncAsk {
                    request_id,
                    cursors,
                    page_size,
                }));
            }
            Body::HistoryRequest(req) => self.handle_history(&user, request_id, req, out),
            Body::Login(_) => out.error(
                request_id,
                pb::ErrorCode::UnexpectedFrame,
                "already logged in",
                false,
            ),
            other => {
                let name = match other {
                    Body::PresenceRequest(_) => "presence is not available yet",
                    Body::GroupRequest(_) => "groups are not available yet",
                    Body::RoomRequest(_) => "rooms are not available yet",
                    Body::Receipt(_) => "receipts are not available yet",
                    _ => "this frame is sent by the server, not the client",
                };
                out.error(request_id, pb::ErrorCode::UnexpectedFrame, name, false);
            }
        }
    }

    fn handle_send(
        &mut self,
        user: &str,
        request_id: u64,
        send: pb::Send,
        now: u64,
        out: &mut Outbox,
    ) {
        let reject = |out: &mut Outbox, code: pb::ErrorCode, msg: &str, retry: u32| {
            let mut f = error_frame(request_id, code, msg, false, send.client_msg_id);
            if let Some(Body::Error(e)) = f.body.as_mut() {
                e.retry_after_ms = retry;
            }
            out.frames.push(f);
        };
        // Token bucket.
        let rate = f64::from(self.cfg.send_rate_per_sec);
        let elapsed = now.saturating_sub(self.bucket.last_ms) as f64;
        self.bucket.last_ms = now;
        self.bucket.tokens =
            (self.bucket.tokens + elapsed * rate / 1000.0).min(f64::from(self.cfg.send_burst));
        if self.bucket.tokens < 1.0 {
            let wait = ((1.0 - self.bucket.tokens) * 1000.0 / rate).ceil() as u32;
            reject(
                out,
                pb::ErrorCode::RateLimited,
                "sending faster than the rate limit",
                wait.max(1),
            );
            return;
        }
        self.bucket.tokens -= 1.0;
        if send.client_msg_id == 0 {
            reject(
                out,
                pb::ErrorCode::InvalidArgument,
                "client_msg_id must not be 0",
                0,
            );
            return;
        }
        if send.body.len() > self.cfg.max_body_bytes {
            reject(
                out,
                pb::ErrorCode::InvalidArgument,
                "body larger than limits.max_body_bytes",
                0,
            );
            return;
        }
        match pb::MessageKind::try_from(send.kind) {
            Ok(pb::MessageKind::Normal) => {}
            Ok(pb::MessageKind::Recall | pb::MessageKind::Edit) if send.ref_seq > 0 => {}
            Ok(pb::MessageKind::Recall | pb::MessageKind::Edit) => {
                reject(
                    out,
                    pb::ErrorCode::InvalidArgument,
                    "recall and edit need ref_seq",
                    0,
                );
                return;
            }
            _ => {
                reject(
                    out,
                    pb::ErrorCode::InvalidArgument,
                    "clients may not send this kind",
                    0,
                );
                return;
            }
        }
        let Some(key) = send.to.as_ref().and_then(|v| super::conv::key_for(user, v)) else {
            reject(
                out,
                pb::ErrorCode::InvalidArgument,
                "to must name a DIRECT conversation with a user id of 1..=128 bytes",
                0,
            );
            return;
        };
        out.actions.push(Action::Send(SendRequest {
            request_id,
            key,
            send,
        }));
    }

    fn handle_history(
        &mut self,
        user: &str,
        request_id: u64,
        req: pb::HistoryRequest,
        out: &mut Outbox,
    ) {
        let Some(view) = req.conversation.clone() else {
            out.error(
                request_id,
                pb::ErrorCode::InvalidArgument,
                "conversation is required",
                false,
            );
            return;
        };
        let Some(key) = super::conv::key_for(user, &view) else {
            out.error(
                request_id,
                pb::ErrorCode::InvalidArgument,
                "unknown conversation",
                false,
            );
            return;
        };
        let limit = match req.limit {
            0 => self.cfg.max_page,
            n => n.min(self.cfg.max_page),
        };
        let (from, to, newest_first) = if req.after_seq > 0 {
            // Up to the newest: the owner stops at `limit` and says whether more remain.
            (req.after_seq.saturating_add(1), u64::MAX, false)
        } else if req.before_seq > 0 {
            let to = req.before_seq - 1;
            (to.saturating_sub(u64::from(limit) - 1).max(1), to, true)
        } else {
            (0, u64::MAX, true)
        };
        out.actions.push(Action::History(HistoryAsk {
            request_id,
            key,
            view,
            from,
            to,
            limit,
            newest_first,
        }));
    }

    /// Cumulative ack: every delivery of conversation `key` up to `seq` arrived.
    fn ack(&mut self, key: &str, seq: u64, timers: &mut dyn Timers) {
        if let Some(map) = self.unacked.get_mut(key) {
            let keep = map.split_off(&(seq.saturating_add(1)));
            let acked = std::mem::replace(map, keep);
            self.unacked_count -= acked.len();
            for u in acked.into_values() {
                timers.cancel(u.timer);
            }
            if map.is_empty() {
                self.unacked.remove(key);
            }
        }
    }

    /// Cancels every retransmit timer (the connection is going away or falling back to sync).
    pub(crate) fn clear_unacked(&mut self, timers: &mut dyn Timers) {
        for map in std::mem::take(&mut self.unacked).into_values() {
            for u in map.into_values() {
                timers.cancel(u.timer);
            }
        }
        self.unacked_count = 0;
        self.resend.clear();
    }

    /// A live message for this user, in the receiver's view. Returns false if it was not sent
    /// (behind, already sent by a sync, or closing).
    pub(crate) fn deliver(
        &mut self,
        key: &str,
        message: pb::Message,
        now: u64,
        timers: &mut dyn Timers,
        out: &mut Outbox,
    ) -> bool {
        // While a sync runs, its last step reads everything newer from the log, in order.
        if self.phase != Phase::Active || self.behind || self.syncing {
            return false;
        }
        let seq = message.seq;
        if self.synced.get(key).is_some_and(|&s| seq <= s) {
            return false;
        }
        match self.live.get_mut(key) {
            Some(range) => range.1 = range.1.max(seq),
            None => {
                self.live.insert(key.to_owned(), (seq, seq));
            }
        }
        out.frames.push(deliver_frame(vec![message.clone()]));
        let key: Arc<str> = match self.unacked.get_key_value(key) {
            Some((k, _)) => Arc::clone(k),
            None => key.into(),
        };
        let timer = timers.schedule(now + self.cfg.retransmit_initial_ms, &key, seq);
        let unacked = Unacked {
            message,
            retransmits: 0,
            timer,
        };
        match self.unacked.entry(key).or_default().insert(seq, unacked) {
            Some(old) => timers.cancel(old.timer),
            None => self.unacked_count += 1,
        }
        if self.unacked_count > self.cfg.max_unacked {
            self.go_behind("too many unacknowledged deliveries", timers, out);
        }
        true
    }

    /// The outbound queue passed its bound: stop live push until the client syncs.
    pub(crate) fn go_behind(&mut self, reason: &str, timers: &mut dyn Timers, out: &mut Outbox) {
        if self.behind || self.phase != Phase::Active {
            return;
        }
        self.behind = true;
        self.clear_unacked(timers);
        self.live.clear();
        out.frames.push(pb::Frame {
            request_id: 0,
            body: Some(Body::Behind(pb::Behind {
                reason: reason.to_owned(),
            })),
        });
    }

    /// Writes one sync page; the messages are in the receiver's view, `key` per message.
    pub(crate) fn sync_page(
        &mut self,
        request_id: u64,
        messages: Vec<(String, pb::Message)>,
        done: bool,
        out: &mut Outbox,
    ) {
        let mut page = Vec::with_capacity(messages.len());
        for (key, m) in messages {
            if self
                .live
                .get(&key)
                .is_some_and(|&(lo, hi)| m.seq >= lo && m.seq <= hi)
            {
                continue;
            }
            let s = self.synced.entry(key).or_insert(0);
            *s = (*s).max(m.seq);
            page.push(m);
        }
        if page.is_empty() && !done {
            return;
        }
        out.frames.push(pb::Frame {
            request_id,
            body: Some(Body::SyncPage(pb::SyncPage {
                messages: page,
                done,
            })),
        });
        if done {
            self.syncing = false;
            self.behind = false;
        }
    }

    /// A sync range of `key` up to `upto` is complete, whether or not every seq in it still
    /// existed (retention may have dropped some).
    pub(crate) fn mark_synced(&mut self, key: &str, upto: u64) {
        let s = self.synced.entry(key.to_owned()).or_insert(0);
        *s = (*s).max(upto);
    }

    /// The highest seq of `key` this connection already holds or was sent, for the shard's
    /// "anything newer?" check at the end of a sync.
    pub(crate) fn sent_upto(&self, key: &str) -> u64 {
        let live = self.live.get(key).map_or(0, |r| r.1);
        let synced = self.synced.get(key).copied().unwrap_or(0);
        live.max(synced)
    }

    /// The shard reports the connection's write state after a flush.
    pub(crate) fn note_write(&mut self, queued: usize, progressed: bool, now: u64) {
        if queued == 0 {
            self.stall_since = None;
        } else if progressed || self.stall_since.is_none() {
            self.stall_since = Some(now);
        }
    }

    /// When the shard should call [`Session::handle_timeout`] next.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        let mut d = match self.phase {
            Phase::AwaitingLogin => self.login_deadline,
            Phase::Active => self.last_heard + self.cfg.idle_ms,
            Phase::Closing => return None,
        };
        if let Some(s) = self.stall_since {
            d = d.min(s + self.cfg.write_stall_ms);
        }
        Some(d)
    }

    /// Fires what is due at `now`: login, idle and write-stall timeouts.
    pub(crate) fn handle_timeout(&mut self, now: u64, out: &mut Outbox) {
        match self.phase {
            Phase::Closing => return,
            Phase::AwaitingLogin => {
                if now >= self.login_deadline {
                    self.close(
                        pb::ErrorCode::LoginTimeout,
                        "no login within the login timeout",
                        out,
                    );
                }
                return;
            }
            Phase::Active => {}
        }
        if now >= self.last_heard + self.cfg.idle_ms {
            self.close(
                pb::ErrorCode::IdleTimeout,
                "nothing heard within the idle timeout",
                out,
            );
            return;
        }
        if self
            .stall_since
            .is_some_and(|s| now >= s + self.cfg.write_stall_ms)
        {
            self.close(
                pb::ErrorCode::SlowConsumer,
                "the connection read nothing within the write-stall timeout",
                out,
            );
        }
    }

    /// The retransmit timer of (`key`, `seq`) fired at `now`: queue it for
    /// [`Session::flush_resends`] and schedule the next try with back-off, or close the
    /// connection as broken after the last one.
    pub(crate) fn retransmit(
        &mut self,
        key: &str,
        seq: u64,
        now: u64,
        timers: &mut dyn Timers,
        out: &mut Outbox,
    ) {
        if self.phase != Phase::Active {
            return;
        }
        let Some((key, map)) = self.unacked.get_key_value(key) else {
            return;
        };
        let key = Arc::clone(key);
        let Some(u) = map.get(&seq) else {
            return;
        };
        if u.retransmits >= self.cfg.retransmit_tries {
            self.clear_unacked(timers);
            self.close(
                pb::ErrorCode::RetransmitExhausted,
                "deliveries went unacknowledged through every retransmit",
                out,
            );
            return;
        }
        let retransmits = u.retransmits + 1;
        let backoff = self
            .cfg
            .retransmit_initial_ms
            .saturating_mul(1 << retransmits.min(20))
            .min(self.cfg.retransmit_max_ms);
        let timer = timers.schedule(now + backoff, &key, seq);
        if let Some(u) = self.unacked.get_mut(&key).and_then(|m| m.get_mut(&seq)) {
            u.retransmits = retransmits;
            u.timer = timer;
            self.resend.push(u.message.clone());
        }
    }

    /// Writes the retransmits queued this turn, together, in as few frames as the limit allows.
    pub(crate) fn flush_resends(&mut self, out: &mut Outbox) {
        let resend = std::mem::take(&mut self.resend);
        // Re-sent together, in as many frames as the frame limit needs.
        let budget = (self.cfg.max_frame_bytes as usize)
            .saturating_sub(1024)
            .max(1);
        let mut batch: Vec<pb::Message> = Vec::new();
        let mut bytes = 0;
        for m in resend {
            let size = m.encoded_len() + 16;
            if !batch.is_empty() && bytes + size > budget {
                out.frames.push(deliver_frame(std::mem::take(&mut batch)));
                bytes = 0;
            }
            bytes += size;
            batch.push(m);
        }
        if !batch.is_empty() {
            out.frames.push(deliver_frame(batch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shard's wheel, as a session sees it in a test.
    #[derive(Default)]
    struct TestTimers(crate::wheel::TimerWheel<(Arc<str>, u64)>);

    impl Timers for TestTimers {
        fn schedule(&mut self, at: u64, key: &Arc<str>, seq: u64) -> TimerKey {
            self.0.insert(at, (Arc::clone(key), seq))
        }
        fn cancel(&mut self, timer: TimerKey) {
            self.0.cancel(timer);
        }
    }

    impl TestTimers {
        /// Fires every retransmit due at `now` into the session.
        fn fire(&mut self, s: &mut Session, now: u64, out: &mut Outbox) {
            while let Some((_, (key, seq))) = self.0.poll(now) {
                s.retransmit(&key, seq, now, self, out);
            }
            s.flush_resends(out);
        }
    }

    fn cfg() -> Arc<SessionConfig> {
        let mut c = SessionConfig::from_config(&Config::default());
        c.retransmit_initial_ms = 100;
        c.retransmit_max_ms = 400;
        c.retransmit_tries = 3;
        c.login_ms = 1000;
        c.idle_ms = 5000;
        c.write_stall_ms = 2000;
        c.send_rate_per_sec = 10;
        c.send_burst = 2;
        Arc::new(c)
    }

    fn active(now: u64) -> Session {
        let mut s = Session::new(cfg(), now);
        let mut out = Outbox::default();
        s.activate(
            Identity {
                user: "bob".into(),
                device: "phone".into(),
                expires_at: u64::MAX,
            },
            1,
            "node-1",
            now,
            0,
            &mut out,
        );
        s
    }

    fn msg(seq: u64) -> pb::Message {
        pb::Message {
            seq,
            conversation: Some(pb::Conversation {
                r#type: pb::ConversationType::Direct as i32,
                id: "alice".into(),
            }),
            ..Default::default()
        }
    }

    fn delivered_seqs(out: &Outbox) -> Vec<u64> {
        out.frames
            .iter()
            .filter_map(|f| match &f.body {
                Some(Body::Deliver(d)) => {
                    Some(d.messages.iter().map(|m| m.seq).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn codes(out: &Outbox) -> Vec<pb::ErrorCode> {
        out.frames
            .iter()
            .filter_map(|f| match &f.body {
                Some(Body::Error(e)) => pb::ErrorCode::try_from(e.code).ok(),
                _ => None,
            })
            .collect()
    }

    const KEY: &str = "d5:alicebob";

    #[test]
    fn no_login_within_the_timeout_closes_with_login_timeout() {
        let mut s = Session::new(cfg(), 0);
        let mut out = Outbox::default();
        assert_eq!(s.next_deadline(), Some(1000));
        s.handle_timeout(999, &mut out);
        assert!(out.frames.is_empty());
        s.handle_timeout(1000, &mut out);
        assert_eq!(codes(&out), vec![pb::ErrorCode::LoginTimeout]);
        assert!(matches!(
            out.actions[..],
            [Action::Close(pb::ErrorCode::LoginTimeout, _)]
        ));
    }

    #[test]
    fn a_first_frame_other_than_login_is_login_required() {
        let mut s = Session::new(cfg(), 0);
        let mut out = Outbox::default();
        let ping = pb::Frame {
            request_id: 4,
            body: Some(Body::Ping(pb::Ping { nonce: 1 })),
        };
        assert!(
            s.handle_frame(ping, 0, &mut TestTimers::default(), &mut out)
                .is_none()
        );
        assert_eq!(codes(&out), vec![pb::ErrorCode::LoginRequired]);
        assert_eq!(s.phase(), Phase::Closing);
    }

    #[test]
    fn unacked_delivery_is_retransmitted_with_backoff_then_the_connection_is_closed() {
        let mut s = active(0);
        let mut t = TestTimers::default();
        let mut out = Outbox::default();
        assert!(s.deliver(KEY, msg(1), 0, &mut t, &mut out));
        assert_eq!(delivered_seqs(&out), vec![1]);
        let mut sent_at = Vec::new();
        let mut now = 0;
        while s.phase() == Phase::Active && now < 10_000 {
            now = t.0.next_deadline().expect("a retransmit is scheduled");
            let mut o = Outbox::default();
            t.fire(&mut s, now, &mut o);
            if !delivered_seqs(&o).is_empty() {
                sent_at.push(now);
            }
            if !codes(&o).is_empty() {
                assert_eq!(codes(&o), vec![pb::ErrorCode::RetransmitExhausted]);
            }
        }
        // 100, then +200, then +400 (capped), then exhausted.
        assert_eq!(sent_at, vec![100, 300, 700]);
        assert_eq!(s.phase(), Phase::Closing);
        assert!(t.0.is_empty(), "no timer outlives the session's deliveries");
    }

    #[test]
    fn cumulative_ack_stops_retransmission() {
        let mut s = active(0);
        let mut t = TestTimers::default();
        let mut out = Outbox::default();
        for seq in 1..=3 {
            s.deliver(KEY, msg(seq), 0, &mut t, &mut out);
        }
        let ack = pb::Frame {
            request_id: 0,
            body: Some(Body::DeliverAck(pb::DeliverAck {
                acks: vec![pb::AckCursor {
                    conversation: msg(1).conversation,
                    seq: 2,
                }],
            })),
        };
        s.handle_frame(ack, 10, &mut t, &mut out);
        assert_eq!(t.0.len(), 1, "the ack cancelled two timers");
        let mut o = Outbox::default();
        t.fire(&mut s, 100, &mut o);
        assert_eq!(
            delivered_seqs(&o),
            vec![3],
            "only the unacked seq is resent"
        );
    }

    #[test]
    fn sync_skips_what_was_pushed_live_and_live_skips_what_sync_sent() {
        let mut s = active(0);
        let mut out = Outbox::default();
        s.deliver(KEY, msg(5), 0, &mut TestTimers::default(), &mut out);
        s.deliver(KEY, msg(6), 0, &mut TestTimers::default(), &mut out);
        let mut o = Outbox::default();
        let page = (1..=7).map(|q| (KEY.to_string(), msg(q))).collect();
        s.sync_page(9, page, false, &mut o);
        let Some(Body::SyncPage(p)) = &o.frames[0].body else {
            panic!("a sync page")
        };
        assert_eq!(
            p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 7]
        );
        let mut o = Outbox::default();
        assert!(
            !s.deliver(KEY, msg(7), 0, &mut TestTimers::default(), &mut o),
            "seq 7 came with the sync"
        );
        assert!(s.deliver(KEY, msg(8), 0, &mut TestTimers::default(), &mut o));
    }

    #[test]
    fn live_deliveries_wait_while_a_sync_runs() {
        let mut s = active(0);
        let mut out = Outbox::default();
        let req = pb::Frame {
            request_id: 3,
            body: Some(Body::SyncRequest(pb::SyncRequest::default())),
        };
        s.handle_frame(req, 0, &mut TestTimers::default(), &mut out);
        assert!(matches!(out.actions[..], [Action::Sync(_)]));
        assert!(
            !s.deliver(KEY, msg(1), 0, &mut TestTimers::default(), &mut out),
            "the sync will read it from the log"
        );
        s.sync_page(3, vec![(KEY.to_string(), msg(1))], true, &mut out);
        assert!(
            s.deliver(KEY, msg(2), 0, &mut TestTimers::default(), &mut out),
            "live push resumes after the sync"
        );
    }

    #[test]
    fn behind_session_pushes_nothing_until_its_sync_is_done() {
        let mut s = active(0);
        let mut out = Outbox::default();
        s.go_behind("queue full", &mut TestTimers::default(), &mut out);
        assert!(matches!(
            out.frames.last().and_then(|f| f.body.as_ref()),
            Some(Body::Behind(_))
        ));
        assert!(!s.deliver(KEY, msg(1), 0, &mut TestTimers::default(), &mut out));
        s.sync_page(1, vec![(KEY.to_string(), msg(1))], true, &mut out);
        assert!(!s.is_behind());
        assert!(s.deliver(KEY, msg(2), 0, &mut TestTimers::default(), &mut out));
    }

    #[test]
    fn sends_over_the_rate_limit_are_refused_with_a_retry_hint() {
        let mut s = active(0);
        let send = |cmid| pb::Frame {
            request_id: cmid,
            body: Some(Body::Send(pb::Send {
                to: msg(1).conversation,
                client_msg_id: cmid,
                ..Default::default()
            })),
        };
        let mut out = Outbox::default();
        for cmid in 1..=3 {
            s.handle_frame(send(cmid), 0, &mut TestTimers::default(), &mut out);
        }
        assert_eq!(
            out.actions
                .iter()
                .filter(|a| matches!(a, Action::Send(_)))
                .count(),
            2
        );
        assert_eq!(codes(&out), vec![pb::ErrorCode::RateLimited]);
        let mut o = Outbox::default();
        s.handle_frame(send(4), 100, &mut TestTimers::default(), &mut o);
        assert_eq!(o.actions.len(), 1, "a token came back after 100 ms at 10/s");
    }

    #[test]
    fn silence_past_the_idle_timeout_closes_the_session() {
        let mut s = active(0);
        let mut out = Outbox::default();
        s.handle_liveness(3000);
        s.handle_timeout(7999, &mut out);
        assert!(out.frames.is_empty());
        s.handle_timeout(8000, &mut out);
        assert_eq!(codes(&out), vec![pb::ErrorCode::IdleTimeout]);
    }

    #[test]
    fn a_connection_that_never_drains_is_closed_as_slow() {
        let mut s = active(0);
        let mut out = Outbox::default();
        s.note_write(10_000, false, 100);
        s.handle_liveness(1500);
        s.note_write(10_000, false, 1500);
        s.handle_timeout(2100, &mut out);
        assert_eq!(codes(&out), vec![pb::ErrorCode::SlowConsumer]);
    }
}
