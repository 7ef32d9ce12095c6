//! The application's way into a running node: open in-process connections, ask shards
//! questions, post hooks' late answers. Cloneable and sendable; it never runs on a shard thread
//! and never blocks one (questions travel as mail and are answered between turns).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Sender;
use parley_proto::pb;
use parley_proto::pb::frame::Body;

use super::local::LocalEnd;
use super::shard::{Mail, Peer, Query};
use crate::auth::Identity;
use crate::core::conv::{Conv, Placement, direct_key};
use crate::core::{ConversationInfo, Counters, Latencies, ShardStats};
use crate::hooks::{Answer, Completions, ConversationKind, ConversationRef, Ticket};
use crate::local::{LOCAL_TIMEOUT, Link, LocalClient, LocalError};

/// The device name of service connections ([`crate::Handle::act_as`]: they are not among the
/// user's devices).
pub const SERVICE_DEVICE: &str = "parley-service";

/// How long a question to the shards may take before it counts as unanswered.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the node could not do what the application asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The node is stopping or stopped.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// A shard did not answer in time (it is overloaded or stuck).
    #[error("a shard did not answer within {0:?}")]
    Timeout(Duration),
    /// The request is not valid (e.g. an empty user id).
    #[error("{0}")]
    Invalid(String),
}

/// The node's shards as the application reaches them.
#[derive(Clone)]
pub(crate) struct Control {
    pub(crate) shards: Vec<Peer>,
    pub(crate) placement: Placement,
    pub(crate) stopping: Arc<AtomicBool>,
    pub(crate) stats: Arc<Mutex<Vec<ShardStats>>>,
    next_link: Arc<AtomicU64>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Control {
    pub(crate) fn new(
        shards: Vec<Peer>,
        stopping: Arc<AtomicBool>,
        stats: Arc<Mutex<Vec<ShardStats>>>,
    ) -> Self {
        Control {
            placement: Placement::new(shards.len()),
            shards,
            stopping,
            stats,
            next_link: Arc::new(AtomicU64::new(1)),
        }
    }

    fn mail(&self, shard: usize, mail: Mail) -> Result<(), ControlError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ControlError::ShuttingDown);
        }
        let (tx, waker) = self.shards.get(shard).ok_or(ControlError::ShuttingDown)?;
        tx.send_timeout(mail, QUERY_TIMEOUT).map_err(|e| match e {
            crossbeam_channel::SendTimeoutError::Timeout(_) => ControlError::Timeout(QUERY_TIMEOUT),
            crossbeam_channel::SendTimeoutError::Disconnected(_) => ControlError::ShuttingDown,
        })?;
        let _ = waker.wake();
        Ok(())
    }

    fn ask<T>(
        &self,
        shard: usize,
        query: impl FnOnce(Sender<T>) -> Query,
    ) -> Result<T, ControlError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.mail(shard, Mail::Query(query(tx)))?;
        rx.recv_timeout(QUERY_TIMEOUT).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => ControlError::Timeout(QUERY_TIMEOUT),
            crossbeam_channel::RecvTimeoutError::Disconnected => ControlError::ShuttingDown,
        })
    }

    /// Opens an in-process connection logged in as `identity` on its home shard.
    pub(crate) fn open_local(
        &self,
        identity: Identity,
        service: bool,
    ) -> Result<LocalClient, LocalError> {
        check_id("user", &identity.user, crate::auth::MAX_USER_BYTES)
            .and_then(|()| check_id("device", &identity.device, crate::auth::MAX_DEVICE_BYTES))
            .map_err(|e| LocalError::Invalid(e.to_string()))?;
        let shard = self.placement.home(&identity.user);
        let (to_client, from_shard) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let end = LocalEnd {
            to_client,
            queued: Arc::clone(&queued),
        };
        self.mail(
            shard,
            Mail::LocalOpen {
                id,
                identity,
                service,
                end,
            },
        )
        .map_err(|_| LocalError::Closed(None))?;
        let (tx, waker) = self.shards[shard].clone();
        LocalClient::open(Link {
            id,
            tx,
            waker,
            rx: from_shard,
            queued,
        })
    }

    /// Ends `user`'s connections (one device's, if given) with KICKED; returns how many.
    pub(crate) fn kick(
        &self,
        user: &str,
        device: Option<&str>,
        reason: &str,
    ) -> Result<usize, ControlError> {
        check_id("user", user, crate::auth::MAX_USER_BYTES)?;
        self.ask(self.placement.home(user), |reply| Query::Kick {
            user: user.to_owned(),
            device: device.map(str::to_owned),
            reason: reason.to_owned(),
            reply,
        })
    }

    /// Users online now, sorted, after `after`, at most `limit`.
    pub(crate) fn online(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<String>)>, ControlError> {
        let mut all = Vec::new();
        for shard in 0..self.shards.len() {
            all.extend(self.ask(shard, |reply| Query::Online {
                after: after.to_owned(),
                limit,
                reply,
            })?);
        }
        all.sort();
        all.truncate(limit);
        Ok(all)
    }

    /// A conversation as its owner holds it (`None`: it does not exist).
    pub(crate) fn inspect(
        &self,
        conversation: &ConversationRef,
    ) -> Result<Option<ConversationInfo>, ControlError> {
        let key = match conversation.kind {
            ConversationKind::Group => {
                let conv = Conv::group(&conversation.id)
                    .ok_or_else(|| ControlError::Invalid("a group id is 1..=128 bytes".into()))?;
                conv.key.to_string()
            }
            ConversationKind::Direct => match conversation.users.as_slice() {
                [a, b] => direct_key(a, b),
                [a] => direct_key(a, a),
                _ => {
                    return Err(ControlError::Invalid(
                        "a direct conversation names one or two users".into(),
                    ));
                }
            },
        };
        let Some(conv) = Conv::from_key(&key) else {
            return Err(ControlError::Invalid("not a conversation".into()));
        };
        let owner = self.placement.owner(conv.id);
        self.ask(owner, |reply| Query::Inspect { key, reply })
    }

    /// An in-process device connection (see [`crate::Handle::connect`]).
    pub(crate) fn connect(&self, user: &str, device: &str) -> Result<LocalClient, LocalError> {
        self.open_local(identity(user, device), false)
    }

    /// An in-process service connection (see [`crate::Handle::act_as`]).
    pub(crate) fn act_as(&self, user: &str) -> Result<LocalClient, LocalError> {
        self.open_local(identity(user, SERVICE_DEVICE), true)
    }

    /// Stores a message from `from` (see [`crate::Handle::post`]).
    pub(crate) fn post(
        &self,
        from: &str,
        to: pb::Conversation,
        body: Bytes,
        system: bool,
    ) -> Result<pb::SendAck, LocalError> {
        let mut client = self.act_as(from)?;
        client.send_message(to, body, fresh_client_msg_id(), system)
    }

    /// The presence of `users` (see [`crate::Handle::presence`]).
    pub(crate) fn presence(&self, users: &[String]) -> Result<Vec<pb::UserPresence>, LocalError> {
        let mut client = self.act_as(SERVICE_DEVICE)?;
        let req = pb::PresenceRequest {
            action: pb::PresenceAction::Query as i32,
            users: users.to_vec(),
            ..Default::default()
        };
        match client
            .request(Body::PresenceRequest(req), LOCAL_TIMEOUT)?
            .body
        {
            Some(Body::PresenceUpdate(u)) => Ok(u.users),
            _ => Err(LocalError::Invalid(
                "a presence query answered otherwise".into(),
            )),
        }
    }

    /// `user`'s conversation list (see [`crate::Handle::conversations`]).
    pub(crate) fn conversations(
        &self,
        user: &str,
        limit: u32,
    ) -> Result<pb::ConversationList, LocalError> {
        let mut client = self.act_as(user)?;
        let req = pb::ConversationListRequest {
            limit,
            ..Default::default()
        };
        match client
            .request(Body::ConversationListRequest(req), LOCAL_TIMEOUT)?
            .body
        {
            Some(Body::ConversationList(l)) => Ok(l),
            _ => Err(LocalError::Invalid(
                "a conversation list answered otherwise".into(),
            )),
        }
    }

    /// A group request made by `user` (see [`crate::Handle::group`]).
    pub(crate) fn group(
        &self,
        user: &str,
        request: pb::GroupRequest,
    ) -> Result<pb::GroupResult, LocalError> {
        let mut client = self.act_as(user)?;
        match client
            .request(Body::GroupRequest(request), LOCAL_TIMEOUT)?
            .body
        {
            Some(Body::GroupResult(r)) => Ok(r),
            _ => Err(LocalError::Invalid(
                "a group request answered otherwise".into(),
            )),
        }
    }

    /// The node's counters (summed over shards, as of at most ~100 ms ago).
    pub(crate) fn counters(&self) -> Counters {
        let mut total = Counters::default();
        if let Ok(s) = self.stats.lock() {
            for c in s.iter() {
                total.add(&c.counters);
            }
        }
        total
    }

    /// The node's latency histograms (all shards' merged, as of at most ~100 ms ago).
    pub(crate) fn latencies(&self) -> Latencies {
        let mut total = Latencies::default();
        if let Ok(s) = self.stats.lock() {
            for c in s.iter() {
                total.add(&c.latencies);
            }
        }
        total
    }
}

/// Posts a gate's late answer to the shard that parked the request (over an unbounded channel:
/// at most one request per connection is parked, and the sender may be any thread, a shard's
/// included, which must never block on another shard's full inbox).
pub(crate) struct Completer {
    pub(crate) answers: Vec<AnswerPeer>,
}

/// A shard's channel of late answers, and its waker.
pub(crate) type AnswerPeer = (Sender<(Ticket, Answer)>, Arc<mio::Waker>);

impl Completions for Completer {
    fn complete(&self, ticket: Ticket, answer: Answer) {
        // Tickets name shards across the cluster (`Placement`): this node's shard `i` is
        // `node * shards + i`.
        let shard = ticket.shard % self.answers.len().max(1);
        if let Some((tx, waker)) = self.answers.get(shard)
            && tx.send((ticket, answer)).is_ok()
        {
            let _ = waker.wake();
        }
    }
}

fn identity(user: &str, device: &str) -> Identity {
    Identity {
        user: user.to_owned(),
        device: device.to_owned(),
        // Never expires (see `Handle::connect`).
        expires_at: u64::MAX / 1000,
    }
}

/// A client message id no earlier `post` used: random, never 0.
fn fresh_client_msg_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No entropy: the clock's nanoseconds are unique enough for one process.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        return nanos.max(1);
    }
    u64::from_le_bytes(b).max(1)
}

fn check_id(what: &str, id: &str, max: usize) -> Result<(), ControlError> {
    if id.is_empty() || id.len() > max {
        return Err(ControlError::Invalid(format!(
            "a {what} id is 1..={max} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::SendVerdict;

    #[test]
    fn a_late_answer_reaches_the_shard_that_parked_it_when_tickets_name_shards_across_the_cluster()
    {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let completer = Completer {
            answers: vec![(tx0, Arc::clone(&waker)), (tx1, waker)],
        };
        // Node 1 of a cluster of two-shard nodes: its shard 1 is shard 3 of the cluster.
        let ticket = Ticket {
            shard: 3,
            slot: 7,
            generation: 1,
            serial: 1,
        };
        completer.complete(ticket, Answer::Send(SendVerdict::Allow));
        assert_eq!(rx1.try_recv().map(|(t, _)| t).ok(), Some(ticket));
        assert!(rx0.try_recv().is_err());
    }
}
