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
//! * Sends are rate-limited by a token bucket (`limits.send_rate_per_sec`, `limits.send_burst`).

use std::sync::Arc;

use bytes::BytesMut;
use parley_proto::pb;

use super::FastMap;
use super::config::CoreConfig;
use super::conv::{Conv, key_for};
use super::delivery::Delivery;
use super::error::Refusal;
use super::mail::Device;
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

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for a valid login.
    AwaitingLogin,
    /// Logged in on the user's home shard.
    Active,
}

/// Who is logged in, and the conversations this device has named (so a send names its
/// conversation without building its key again).
#[derive(Debug)]
pub(crate) struct Who {
    /// The user and device, shared with every message and registration that names them.
    pub(crate) device: Device,
    convs: FastMap<Box<str>, Arc<Conv>>,
}

/// Most conversations a connection remembers by the name it used for them.
const CONV_CACHE: usize = 64;

impl Who {
    pub(crate) fn new(identity: Identity) -> Self {
        let device = Device {
            user: identity.user.as_str().into(),
            device: identity.device.as_str().into(),
        };
        Who {
            device,
            convs: FastMap::default(),
        }
    }

    /// The conversation this user names `view`, or `None` if it names none this node serves.
    pub(crate) fn conv(&mut self, view: &pb::Conversation) -> Option<Arc<Conv>> {
        if view.r#type == pb::ConversationType::Direct as i32
            && let Some(c) = self.convs.get(view.id.as_str())
        {
            return Some(Arc::clone(c));
        }
        let key = key_for(&self.device.user, view)?;
        let conv = Arc::new(Conv::from_key(&key)?);
        if self.convs.len() >= CONV_CACHE {
            self.convs.clear();
        }
        if view.r#type == pb::ConversationType::Direct as i32 {
            self.convs
                .insert(view.id.as_str().into(), Arc::clone(&conv));
        }
        Some(conv)
    }
}

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last_ms: u64,
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
    pub(crate) who: Option<Box<Who>>,
    login_deadline: u64,
    last_heard: u64,
    bucket: Bucket,
    /// Since when queued output has made no progress ([`NOT_STALLED`] if none is queued):
    /// a plain `u64`, which keeps the whole connection in a 256-byte allocation.
    stall_since: u64,
    pub(crate) delivery: Delivery,
    /// The sync under way, boxed: rare, and most connections never hold one.
    pub(crate) sync: Option<Box<SyncRun>>,
    /// The session timer in the shard's wheel and its deadline.
    pub(crate) timer: Option<(TimerKey, u64)>,
    /// Already reported to the driver as having output this turn.
    pub(crate) transmit_queued: bool,
}

impl Connection {
    /// A fresh connection at `now`, waiting for its login.
    pub(crate) fn new(id: ConnId, transport: Transport, cfg: &CoreConfig, now: u64) -> Self {
        Connection {
            id,
            transport,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            phase: Phase::AwaitingLogin,
            who: None,
            login_deadline: now + cfg.login_ms,
            last_heard: now,
            bucket: Bucket {
                tokens: f64::from(cfg.send_burst),
                last_ms: now,
            },
            stall_since: NOT_STALLED,
            delivery: Delivery::default(),
            sync: None,
            timer: None,
            transmit_queued: false,
        }
    }

    /// The logged-in user, once active.
    pub(crate) fn user(&self) -> Option<&Arc<str>> {
        self.who.as_ref().map(|w| &w.device.user)
    }

    /// Marks the session logged in.
    pub(crate) fn activate(&mut self, who: Who, now: u64) {
        self.last_heard = now;
        self.who = Some(Box::new(who));
        self.phase = Phase::Active;
    }

    /// Traffic was heard.
    pub(crate) fn heard(&mut self, now: u64) {
        self.last_heard = now;
    }

    /// Takes a send token, or says how long until one is there.
    pub(crate) fn take_send_token(&mut self, cfg: &CoreConfig, now: u64) -> Result<(), Refusal> {
        let rate = f64::from(cfg.send_rate_per_sec.max(1));
        let elapsed = now.saturating_sub(self.bucket.last_ms) as f64;
        self.bucket.last_ms = now;
        self.bucket.tokens =
            (self.bucket.tokens + elapsed * rate / 1000.0).min(f64::from(cfg.send_burst));
        if self.bucket.tokens < 1.0 {
            let wait = ((1.0 - self.bucket.tokens) * 1000.0 / rate).ceil() as u32;
            return Err(Refusal::RateLimited {
                retry_after_ms: wait.max(1),
            });
        }
        self.bucket.tokens -= 1.0;
        Ok(())
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
            Phase::AwaitingLogin => self.login_deadline,
            Phase::Active => self.last_heard + cfg.idle_ms,
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
            Phase::AwaitingLogin if now >= self.login_deadline => Some(CloseReason::LoginTimeout),
            Phase::AwaitingLogin => None,
            Phase::Active if now >= self.last_heard + cfg.idle_ms => Some(CloseReason::IdleTimeout),
            Phase::Active => (self.stall_since != NOT_STALLED
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
pub(crate) fn check_send(send: &pb::Send, cfg: &CoreConfig) -> Result<(), Refusal> {
    if send.client_msg_id == 0 {
        return Err(Refusal::ClientMsgIdZero);
    }
    if send.body.len() > cfg.max_body_bytes {
        return Err(Refusal::BodyTooLarge);
    }
    match pb::MessageKind::try_from(send.kind) {
        Ok(pb::MessageKind::Normal) => Ok(()),
        Ok(pb::MessageKind::Recall | pb::MessageKind::Edit) if send.ref_seq > 0 => Ok(()),
        Ok(pb::MessageKind::Recall | pb::MessageKind::Edit) => Err(Refusal::RefSeqMissing),
        _ => Err(Refusal::KindNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::transport::TransportLimits;

    fn cfg() -> CoreConfig {
        let mut c = CoreConfig::from_config(&Config::default());
        c.login_ms = 1000;
        c.idle_ms = 5000;
        c.write_stall_ms = 2000;
        c.send_rate_per_sec = 10;
        c.send_burst = 2;
        c
    }

    fn conn(now: u64) -> Connection {
        let id = ConnId {
            slot: 0,
            generation: 1,
        };
        Connection::new(id, Transport::tcp(TransportLimits::default()), &cfg(), now)
    }

    fn active(now: u64) -> Connection {
        let mut c = conn(now);
        c.activate(
            Who::new(Identity {
                user: "bob".into(),
                device: "phone".into(),
                expires_at: u64::MAX,
            }),
            now,
        );
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
    fn sends_over_the_rate_limit_are_refused_with_a_retry_hint() {
        let mut c = active(0);
        assert!(c.take_send_token(&cfg(), 0).is_ok());
        assert!(c.take_send_token(&cfg(), 0).is_ok());
        assert_eq!(
            c.take_send_token(&cfg(), 0),
            Err(Refusal::RateLimited {
                retry_after_ms: 100
            })
        );
        assert!(
            c.take_send_token(&cfg(), 100).is_ok(),
            "a token came back after 100 ms at 10/s"
        );
    }

    #[test]
    fn a_device_names_a_direct_conversation_by_the_other_user() {
        let mut w = Who::new(Identity {
            user: "bob".into(),
            device: "phone".into(),
            expires_at: u64::MAX,
        });
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
