//! One client connection: its transport and buffers, and its session (login, liveness, limits).
//!
//! The core owns a connection's bytes; the driver owns its socket. Bytes the driver read land in
//! [`Connection::inbuf`]; frames the core writes go to [`Connection::out`], which the driver
//! writes to the socket and then reports how far it got.
//!
//! ### Session rules
//! * A connection must log in within `timeouts.login_ms` (the first frame, or the WebSocket
//!   upgrade's token); any other first frame is LOGIN_REQUIRED.
//! * Anything heard (a frame, a WebSocket ping or pong) keeps it alive; silence past
//!   `timeouts.idle_ms` is IDLE_TIMEOUT.
//! * Queued output that makes no progress for `timeouts.write_stall_ms` is SLOW_CONSUMER.
//! * Every request costs tokens of one bucket per session (`limits.request_rate_per_sec`,
//!   `limits.request_burst`; costs in [`super::config::cost`]); a request that finds too few is
//!   refused with RATE_LIMITED.
//! * Every error the client causes counts; past `limits.max_errors` within
//!   `limits.error_window_ms` the connection is closed (TOO_MANY_ERRORS).
//! * The session ends when its token expires (TOKEN_EXPIRED), unless a fresh `Login` on the
//!   connection moved the expiry.
//!
//! ### The connection's budget
//! Everything queued for a connection ([`Connection::out`]) plus what is reserved for replies it
//! is owed ([`Connection::reserved`]: send-acks and history pages on their way from an owner) is
//! held to `limits.max_outbound_bytes`. At the budget the core stops decoding the connection's
//! input and tells the driver not to read it ([`Intake::Hold`]); requests then wait in the
//! kernel, not in the node's memory. Once the queue drains under the budget the core says so
//! with [`super::Effect::Resume`]. Per call, at most `limits.frames_per_turn` frames are decoded
//! ([`Intake::Pending`] says more are buffered), so one busy connection cannot starve the rest.
//! Room messages are queued only while the queue is under half the budget; past it they wait in
//! the connection's bounded room lag queues ([`super::room`]), so rooms alone never reach it.

use std::sync::Arc;

use bytes::BytesMut;
use parley_proto::pb;

use super::FastMap;
use super::config::CoreConfig;
use super::conv::{Conv, key_for};
use super::delivery::Delivery;
use super::error::Refusal;
use super::mail::Device;
use super::room::ConnRooms;
use super::sync::SyncRun;
use super::wheel::TimerKey;
use crate::auth::Identity;
use crate::transport::Transport;

/// `Connection::stall_since` when nothing is queued.
const NOT_STALLED: u64 = u64::MAX;

/// Outbound buffers a shard keeps for reuse.
pub(crate) const POOL_BUFFERS: usize = 64;
/// Size of a pooled outbound buffer.
pub(crate) const POOL_BUFFER_BYTES: usize = 16 * 1024;

/// A connection on one shard: its slot and the slot's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Index in the shard's connection table (the driver keeps its socket at the same index).
    pub slot: u32,
    /// Bumped each time the slot is reused.
    pub generation: u32,
}

impl std::fmt::Display for ConnId {
    /// `slot.generation`, as log lines name a connection.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.slot, self.generation)
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for a valid login.
    AwaitingLogin,
    /// Logged in on the user's home shard.
    Active,
    /// Logged in for a user homed on another node: the connection relays to the session
    /// there ([`super::relay`]).
    Relaying,
}

/// Whether the core takes input from a connection now (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Read the socket and hand the bytes in.
    Read,
    /// Frames already read wait to be decoded: call [`super::ShardCore::handle_continue`] on a
    /// later turn (before reading more).
    Pending,
    /// Read nothing: the connection is at its budget. [`super::Effect::Resume`] says when to
    /// come back.
    Hold,
}

/// Who is logged in, and the session's limits: the conversations this device has named (so a
/// send names its conversation without building its key again), its request bucket, its error
/// count and its token's expiry. Boxed: only logged-in connections carry it.
#[derive(Debug)]
pub(crate) struct Who {
    /// The user and device, shared with every message and registration that names them.
    pub(crate) device: Device,
    /// Made at the first send (most connections of a big node are idle and never need it).
    convs: Option<Box<ConvCache>>,
    /// Request tokens, in thousandths of a request, as of `tokens_at` (a `u32`, so the session
    /// fits 96 bytes: bursts are capped at about four million requests).
    tokens: u32,
    /// Errors counted in the window that began at `errors_since`.
    errors: u32,
    tokens_at: u64,
    errors_since: u64,
    /// When the token expires, in the core's monotonic ms.
    pub(crate) expires_ms: u64,
    /// A conversation list waiting for messages read from their owners.
    pub(crate) list: Option<Box<super::convlist::ListRun>>,
    /// An in-process connection of the embedding application: it may send SYSTEM messages,
    /// and no gate asks about its requests.
    pub(crate) trusted: bool,
    /// A service connection (the application acting as a user): not one of the user's
    /// devices, so it is not delivered to, counts for no presence and is observed by no hook.
    pub(crate) service: bool,
    /// Its route is registered in the cluster's presence index (withdrawn at removal).
    pub(crate) routed: bool,
}

/// Most conversations of each kind a connection remembers by the name it used for them.
const CONV_CACHE: usize = 64;

/// The conversations a connection named, by kind and the id it used.
#[derive(Debug, Default)]
struct ConvCache {
    direct: FastMap<Box<str>, Arc<Conv>>,
    group: FastMap<Box<str>, Arc<Conv>>,
}

impl Who {
    /// The session of `identity`, logged in at `now` (`unix_ms` on the wall clock).
    pub(crate) fn new(identity: &Identity, cfg: &CoreConfig, now: u64, unix_ms: i64) -> Self {
        let device = Device {
            user: identity.user.as_str().into(),
            device: identity.device.as_str().into(),
        };
        Who {
            device,
            convs: None,
            tokens: burst_milli(cfg),
            tokens_at: now,
            errors: 0,
            errors_since: now,
            expires_ms: expiry_ms(identity.expires_at, now, unix_ms),
            list: None,
            trusted: false,
            service: false,
            routed: false,
        }
    }

    /// Takes `cost` request tokens at `now`, or says how long until they are there.
    pub(crate) fn take_tokens(
        &mut self,
        cost: u64,
        cfg: &CoreConfig,
        now: u64,
    ) -> Result<(), Refusal> {
        let elapsed = now.saturating_sub(self.tokens_at);
        self.tokens_at = now;
        // Thousandths of a request per ms = requests per second: no division on the hot path.
        let earned = elapsed.saturating_mul(cfg.request_rate_milli / 1000);
        let tokens = u64::from(self.tokens)
            .saturating_add(earned)
            .min(u64::from(burst_milli(cfg)));
        if tokens < cost {
            self.tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
            let missing = cost - tokens;
            let wait = missing
                .saturating_mul(1000)
                .div_ceil(cfg.request_rate_milli.max(1));
            return Err(Refusal::RateLimited {
                retry_after_ms: u32::try_from(wait.max(1)).unwrap_or(u32::MAX),
            });
        }
        self.tokens = u32::try_from(tokens - cost).unwrap_or(u32::MAX);
        Ok(())
    }

    /// Counts an error at `now`; `true` if it is one too many for the window.
    pub(crate) fn count_error(&mut self, cfg: &CoreConfig, now: u64) -> bool {
        if now.saturating_sub(self.errors_since) >= cfg.error_window_ms {
            self.errors_since = now;
            self.errors = 0;
        }
        self.errors = self.errors.saturating_add(1);
        self.errors > cfg.max_errors
    }

    /// The conversation this user names `view`, or `None` if it names none this node serves.
    pub(crate) fn conv(&mut self, view: &pb::Conversation) -> Option<Arc<Conv>> {
        fn cached<'c>(
            cache: &'c mut ConvCache,
            view: &pb::Conversation,
        ) -> Option<&'c mut FastMap<Box<str>, Arc<Conv>>> {
            match pb::ConversationType::try_from(view.r#type).ok()? {
                pb::ConversationType::Direct => Some(&mut cache.direct),
                pb::ConversationType::Group => Some(&mut cache.group),
                _ => None,
            }
        }
        if let Some(c) = self
            .convs
            .as_deref_mut()
            .and_then(|c| cached(c, view))
            .and_then(|m| m.get(view.id.as_str()))
        {
            return Some(Arc::clone(c));
        }
        let key = key_for(&self.device.user, view)?;
        let conv = Arc::new(Conv::from_key(&key)?);
        if let Some(map) = cached(self.convs.get_or_insert_default(), view) {
            if map.len() >= CONV_CACHE {
                map.clear();
            }
            map.insert(view.id.as_str().into(), Arc::clone(&conv));
        }
        Some(conv)
    }
}

/// The session's bucket size, in thousandths of a request, as it is stored.
fn burst_milli(cfg: &CoreConfig) -> u32 {
    u32::try_from(cfg.request_burst_milli).unwrap_or(u32::MAX)
}

/// The monotonic ms at which a token expiring at `expires_at` (Unix seconds) expires, seen at
/// `now` (monotonic) = `unix_ms` (wall clock).
pub(crate) fn expiry_ms(expires_at: u64, now: u64, unix_ms: i64) -> u64 {
    let unix_now = u64::try_from(unix_ms).unwrap_or(0);
    let left = expires_at.saturating_mul(1000).saturating_sub(unix_now);
    now.saturating_add(left)
}

/// The input state of a connection (see [`Intake`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    /// Everything buffered was decoded; read more.
    Open,
    /// The per-turn frame budget ran out with input buffered.
    Backlog,
    /// At the budget: nothing is decoded or read until the queue drains.
    Held,
    /// A request waits for a hook's answer: nothing is decoded or read until it comes
    /// ([`super::gate`]).
    Parked,
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) id: ConnId,
    pub(crate) transport: Transport,
    /// Bytes read and not yet decoded.
    pub(crate) inbuf: BytesMut,
    /// Bytes queued for the socket.
    pub(crate) out: BytesMut,
    pub(crate) phase: Phase,
    /// Whether input is taken now.
    pub(crate) input: Input,
    pub(crate) who: Option<Box<Who>>,
    /// Bytes reserved for replies on their way (send-acks, history pages), counted against
    /// the budget with the queue.
    pub(crate) reserved: u32,
    /// When something was last heard (before login: when the connection opened).
    last_heard: u64,
    /// Since when queued output has made no progress ([`NOT_STALLED`] if none is queued):
    /// a plain `u64`, which keeps the whole connection in a 256-byte allocation.
    stall_since: u64,
    pub(crate) delivery: Delivery,
    /// The sync under way, boxed: rare, and most connections never hold one.
    pub(crate) sync: Option<Box<SyncRun>>,
    /// The rooms it is in, boxed: most connections are in none.
    pub(crate) rooms: Option<Box<ConnRooms>>,
    /// The session timer in the shard's wheel and its deadline.
    pub(crate) timer: Option<(TimerKey, u64)>,
    /// Already reported to the driver as having output this turn.
    pub(crate) transmit_queued: bool,
}

impl Connection {
    /// A fresh connection at `now`, waiting for its login.
    pub(crate) fn new(id: ConnId, transport: Transport, now: u64) -> Self {
        Connection {
            id,
            transport,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            phase: Phase::AwaitingLogin,
            input: Input::Open,
            who: None,
            reserved: 0,
            last_heard: now,
            stall_since: NOT_STALLED,
            delivery: Delivery::default(),
            sync: None,
            rooms: None,
            timer: None,
            transmit_queued: false,
        }
    }

    /// The logged-in user, once active.
    pub(crate) fn user(&self) -> Option<&Arc<str>> {
        self.who.as_ref().map(|w| &w.device.user)
    }

    /// Marks the session logged in: frames up to the full limit are accepted from now on.
    pub(crate) fn activate(&mut self, who: Who, now: u64) {
        self.last_heard = now;
        self.who = Some(Box::new(who));
        self.phase = Phase::Active;
        self.transport.open_session();
    }

    /// Traffic was heard (before login the login deadline stands, whatever is heard).
    pub(crate) fn heard(&mut self, now: u64) {
        if self.phase == Phase::Active {
            self.last_heard = now;
        }
    }

    /// Whether the queue and the reservations have reached the connection's budget.
    pub(crate) fn over_budget(&self, cfg: &CoreConfig) -> bool {
        self.out.len() + self.reserved as usize >= cfg.max_outbound_bytes
    }

    /// Reserves `bytes` of the budget for a reply on its way.
    pub(crate) fn reserve(&mut self, bytes: u32) {
        self.reserved = self.reserved.saturating_add(bytes);
    }

    /// A reply for which `bytes` were reserved arrived (or will not).
    pub(crate) fn unreserve(&mut self, bytes: u32) {
        debug_assert!(self.reserved >= bytes, "released more than was reserved");
        self.reserved = self.reserved.saturating_sub(bytes);
    }

    /// What the driver should do with the connection's socket now.
    pub(crate) fn intake(&self) -> Intake {
        match self.input {
            Input::Open => Intake::Read,
            Input::Backlog => Intake::Pending,
            Input::Held | Input::Parked => Intake::Hold,
        }
    }

    /// The driver wrote some of the queue (`progressed`); `queued` bytes remain.
    pub(crate) fn note_write(&mut self, progressed: bool, now: u64) {
        if self.out.is_empty() {
            self.stall_since = NOT_STALLED;
        } else if progressed || self.stall_since == NOT_STALLED {
            self.stall_since = now;
        }
    }

    /// When the session must be looked at next (login, idle or write-stall deadline).
    pub(crate) fn next_deadline(&self, cfg: &CoreConfig) -> u64 {
        let mut d = match self.phase {
            Phase::AwaitingLogin => self.last_heard + cfg.login_ms,
            Phase::Active => (self.last_heard + cfg.idle_ms)
                .min(self.who.as_ref().map_or(u64::MAX, |w| w.expires_ms)),
            // The session's deadlines are the home's.
            Phase::Relaying => u64::MAX,
        };
        if self.stall_since != NOT_STALLED {
            d = d.min(self.stall_since.saturating_add(cfg.write_stall_ms));
        }
        d
    }

    /// What is due at `now`: the reason to close, if any.
    pub(crate) fn expired(&self, cfg: &CoreConfig, now: u64) -> Option<super::error::CloseReason> {
        use super::error::CloseReason;
        match self.phase {
            Phase::AwaitingLogin if now >= self.last_heard + cfg.login_ms => {
                Some(CloseReason::LoginTimeout)
            }
            Phase::AwaitingLogin => None,
            Phase::Active if now >= self.last_heard + cfg.idle_ms => Some(CloseReason::IdleTimeout),
            Phase::Active if self.who.as_ref().is_some_and(|w| now >= w.expires_ms) => {
                Some(CloseReason::TokenExpired)
            }
            Phase::Active | Phase::Relaying => (self.stall_since != NOT_STALLED
                && now >= self.stall_since.saturating_add(cfg.write_stall_ms))
            .then_some(CloseReason::SlowConsumer),
        }
    }

    /// Releases buffers the connection no longer needs (an idle connection holds none): an
    /// emptied outbound buffer goes back to the shard's `pool` (up to [`POOL_BUFFERS`]).
    pub(crate) fn shrink(&mut self, pool: &mut Vec<BytesMut>) {
        const KEEP: usize = 4 * 1024;
        if self.inbuf.is_empty() {
            self.inbuf = BytesMut::new();
        } else if self.inbuf.capacity() > KEEP && self.inbuf.capacity() / 4 > self.inbuf.len() {
            self.inbuf = BytesMut::from(&self.inbuf[..]);
        }
        if self.out.is_empty() {
            let mut b = std::mem::take(&mut self.out);
            if pool.len() < POOL_BUFFERS && b.capacity() > 0 {
                b.clear();
                // Unique and empty: this reclaims the whole allocation, without a copy.
                b.reserve(POOL_BUFFER_BYTES);
                if b.capacity() <= 2 * POOL_BUFFER_BYTES {
                    pool.push(b);
                }
            }
        }
    }

    /// Before a write: once the queue is past a few pool buffers (the client is not keeping
    /// up), its buffer grows once to the whole budget and a frame, instead of doubling step by
    /// step (each step would leave the allocator a freed buffer of the size before).
    pub(crate) fn make_room(&mut self, cfg: &CoreConfig) {
        const GROW_AT: usize = 4 * POOL_BUFFER_BYTES;
        let full = cfg.max_outbound_bytes + 2 * cfg.max_frame_bytes as usize;
        if self.out.len() >= GROW_AT && self.out.capacity() < full {
            self.out.reserve(full - self.out.len());
        }
    }

    /// Gives an empty outbound buffer one from the shard's pool, so writing does not grow a
    /// fresh buffer by doubling.
    pub(crate) fn fill_from(&mut self, pool: &mut Vec<BytesMut>) {
        if self.out.capacity() == 0
            && let Some(b) = pool.pop()
        {
            self.out = b;
        }
    }
}

/// Checks a send's fields (the rate limit is checked before).
pub(crate) fn check_send(send: &pb::Send, cfg: &CoreConfig, trusted: bool) -> Result<(), Refusal> {
    if send.client_msg_id == 0 {
        return Err(Refusal::ClientMsgIdZero);
    }
    if send.body.len() > cfg.max_body_bytes {
        return Err(Refusal::BodyTooLarge);
    }
    match pb::MessageKind::try_from(send.kind) {
        Ok(pb::MessageKind::Normal) => Ok(()),
        Ok(pb::MessageKind::System) if trusted => Ok(()),
        Ok(pb::MessageKind::Recall | pb::MessageKind::Edit) if send.ref_seq > 0 => Ok(()),
        Ok(pb::MessageKind::Recall | pb::MessageKind::Edit) => Err(Refusal::RefSeqMissing),
        _ => Err(Refusal::KindNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::cost;
    use super::*;
    use crate::config::Config;
    use crate::transport::TransportLimits;

    fn cfg() -> CoreConfig {
        let mut c = CoreConfig::from_config(&Config::default());
        c.login_ms = 1000;
        c.idle_ms = 5000;
        c.write_stall_ms = 2000;
        c.request_rate_milli = 10_000;
        c.request_burst_milli = 2_000;
        c.max_errors = 3;
        c.error_window_ms = 1000;
        c
    }

    fn identity(expires_at: u64) -> Identity {
        Identity {
            user: "bob".into(),
            device: "phone".into(),
            expires_at,
        }
    }

    fn conn(now: u64) -> Connection {
        let id = ConnId {
            slot: 0,
            generation: 1,
        };
        Connection::new(id, Transport::tcp(TransportLimits::default()), now)
    }

    fn active(now: u64) -> Connection {
        let mut c = conn(now);
        c.activate(Who::new(&identity(u64::MAX), &cfg(), now, 0), now);
        c
    }

    #[test]
    fn no_login_within_the_timeout_is_login_timeout() {
        let c = conn(0);
        assert_eq!(c.next_deadline(&cfg()), 1000);
        assert!(c.expired(&cfg(), 999).is_none());
        assert!(matches!(
            c.expired(&cfg(), 1000),
            Some(super::super::error::CloseReason::LoginTimeout)
        ));
    }

    #[test]
    fn silence_past_the_idle_timeout_is_idle_timeout() {
        let mut c = active(0);
        c.heard(3000);
        assert!(c.expired(&cfg(), 7999).is_none());
        assert!(matches!(
            c.expired(&cfg(), 8000),
            Some(super::super::error::CloseReason::IdleTimeout)
        ));
    }

    #[test]
    fn output_that_never_drains_is_a_slow_consumer() {
        let mut c = active(0);
        c.out.extend_from_slice(&[0; 100]);
        c.note_write(false, 100);
        c.heard(1500);
        c.note_write(false, 1500);
        assert!(matches!(
            c.expired(&cfg(), 2100),
            Some(super::super::error::CloseReason::SlowConsumer)
        ));
    }

    #[test]
    fn a_connection_fits_a_256_byte_allocation() {
        // Memory per idle connection: the connection is boxed, and mimalloc's next size class
        // after 256 bytes is 320.
        assert!(std::mem::size_of::<Connection>() <= 256);
    }

    #[test]
    fn a_session_fits_a_96_byte_allocation() {
        assert!(std::mem::size_of::<Who>() <= 96);
    }

    #[test]
    fn requests_over_the_rate_limit_are_refused_with_a_retry_hint() {
        let mut c = active(0);
        let who = c.who.as_mut().expect("logged in");
        assert!(who.take_tokens(cost::REQUEST, &cfg(), 0).is_ok());
        assert!(who.take_tokens(cost::REQUEST, &cfg(), 0).is_ok());
        assert_eq!(
            who.take_tokens(cost::REQUEST, &cfg(), 0),
            Err(Refusal::RateLimited {
                retry_after_ms: 100
            })
        );
        assert!(
            who.take_tokens(cost::REQUEST, &cfg(), 100).is_ok(),
            "a token came back after 100 ms at 10/s"
        );
    }

    #[test]
    fn a_read_costs_five_requests_and_an_ack_a_tenth() {
        let mut c = active(0);
        let who = c.who.as_mut().expect("logged in");
        // Burst of 2 requests: no read fits; twenty acks do.
        assert!(who.take_tokens(cost::READ, &cfg(), 0).is_err());
        for _ in 0..20 {
            assert!(who.take_tokens(cost::ACK, &cfg(), 0).is_ok());
        }
        assert!(who.take_tokens(cost::ACK, &cfg(), 0).is_err());
    }

    #[test]
    fn one_error_over_the_budget_in_a_window_is_too_many() {
        let mut c = active(0);
        let who = c.who.as_mut().expect("logged in");
        assert!(!who.count_error(&cfg(), 0));
        assert!(!who.count_error(&cfg(), 10));
        assert!(!who.count_error(&cfg(), 20));
        assert!(who.count_error(&cfg(), 30), "the fourth error within 1 s");
        assert!(!who.count_error(&cfg(), 1030), "a new window starts");
    }

    #[test]
    fn a_session_ends_when_its_token_expires() {
        let mut c = conn(0);
        // Logged in at monotonic 0 = Unix 1,000 s; the token expires at Unix 1,003 s.
        c.activate(Who::new(&identity(1_003), &cfg(), 0, 1_000_000), 0);
        assert_eq!(c.next_deadline(&cfg()), 3000);
        assert!(c.expired(&cfg(), 2999).is_none());
        assert!(matches!(
            c.expired(&cfg(), 3000),
            Some(super::super::error::CloseReason::TokenExpired)
        ));
    }

    #[test]
    fn the_queue_and_the_reservations_share_one_budget() {
        let mut c = active(0);
        let budget = cfg().max_outbound_bytes;
        c.reserve(u32::try_from(budget / 2).expect("fits"));
        assert!(!c.over_budget(&cfg()));
        c.out.extend_from_slice(&vec![0; budget / 2]);
        assert!(c.over_budget(&cfg()));
        c.unreserve(u32::try_from(budget / 2).expect("fits"));
        assert!(!c.over_budget(&cfg()));
    }

    #[test]
    fn a_device_names_a_direct_conversation_by_the_other_user() {
        let mut w = Who::new(&identity(u64::MAX), &cfg(), 0, 0);
        let view = pb::Conversation {
            r#type: pb::ConversationType::Direct as i32,
            id: "alice".into(),
        };
        let a = w.conv(&view).expect("a conversation");
        let b = w.conv(&view).expect("the same, from the cache");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a.key, "d5:alicebob");
    }
}
