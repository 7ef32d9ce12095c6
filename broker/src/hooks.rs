//! Hooks: how an embedding application takes part in the broker's decisions and hears what it
//! did.
//!
//! Implement [`Hooks`] (every method has a default that changes nothing) and give it to
//! [`crate::Broker::hooks`]. Two kinds of method:
//!
//! * **Gates** decide a request: [`Hooks::authenticate`] a login, [`Hooks::check_send`] a send
//!   (allow, deny or rewrite its body before it is stored), [`Hooks::check_group`] a group
//!   request (e.g. a join). A gate gets the request and a [`Reply`], and answers through the
//!   reply, either before it returns (the fast path: the shard goes on at once) or later from any
//!   thread (for a hook that needs I/O: the shard parks that connection's request, keeps serving
//!   everyone else, and takes the answer when it comes). A connection with a request parked
//!   reads nothing more until the answer, so its requests stay in order. A reply dropped
//!   unanswered denies.
//! * **Observers** hear what happened: a message stored durably ([`Hooks::message_stored`]), a
//!   message stored for users with no device online ([`Hooks::stored_for_offline`], e.g. to
//!   trigger an offline push), a device connecting or leaving, a presence change, a group
//!   change. They run on the shard thread that saw the event, so they must return quickly: hand
//!   the event to a queue or a channel (as the webhook sender does) and do the work elsewhere.
//!
//! Gates are only called when [`Hooks::gates`] says so, and the per-message observers only when
//! [`Hooks::observes`] does, so hooks that want neither cost nothing per message.

use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::auth::Identity;

/// What a connection presented to log in.
#[derive(Debug, Clone, Copy)]
pub struct LoginAttempt<'a> {
    /// The token, as sent (never log it).
    pub token: &'a str,
    /// The client's self-description (`Login.client_name`; may be empty).
    pub client_name: &'a str,
}

/// A gate's answer to a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthVerdict {
    /// Let the built-in verifier decide (HS256, or the node's [`crate::auth::TokenVerifier`]).
    Builtin,
    /// The connection is this identity (its `expires_at` bounds the session).
    Accept(Identity),
    /// Refused (`reason` goes to the client with `BAD_TOKEN`, and the connection closes).
    Reject(String),
}

/// Kind of a conversation, as hooks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversationKind {
    /// Two users.
    Direct,
    /// A group (members, roles).
    Group,
}

/// A conversation: a group by its id, a direct conversation by its users.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ConversationRef {
    /// Its kind.
    pub kind: ConversationKind,
    /// Its name: the group id, or the two users sorted and joined by `:` (for display: user ids
    /// may hold `:`; [`ConversationRef::users`] is exact).
    pub id: String,
    /// A direct conversation's users, sorted (one if a user writes to itself); empty for a
    /// group.
    pub users: Vec<String>,
}

/// A send, before it is stored.
#[derive(Debug, Clone, Copy)]
pub struct SendAttempt<'a> {
    /// Who sends.
    pub user: &'a str,
    /// From which device.
    pub device: &'a str,
    /// Where to: for a direct conversation, `id` is the two users (see [`ConversationRef`]).
    pub conversation: &'a ConversationRef,
    /// The message body.
    pub body: &'a [u8],
    /// The sender's idempotency key for this message.
    pub client_msg_id: u64,
}

/// A gate's answer to a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendVerdict {
    /// Store it as sent.
    Allow,
    /// Store it with this body instead (checked against `limits.max_body_bytes` again).
    Rewrite(Bytes),
    /// Refuse it (`reason` goes to the client with `FORBIDDEN`; nothing is stored; a denial
    /// does not count against the connection's `limits.max_errors`).
    Deny(String),
}

/// A group request, before the group's owner decides it.
#[derive(Debug, Clone, Copy)]
pub struct GroupAttempt<'a> {
    /// Who asks.
    pub user: &'a str,
    /// The group.
    pub group: &'a str,
    /// What: the action's wire name in lower case (`create`, `add_members`,
    /// `remove_members`, `leave`, `get_members`, `join_group`, `dissolve`, `rename`,
    /// `set_role`).
    pub action: &'a str,
    /// The users it names (added, removed, given a role).
    pub members: &'a [String],
}

/// A gate's answer to a group request (or anything else that is allowed or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Allow,
    /// Refuse (`reason` goes to the client with `FORBIDDEN`).
    Deny(String),
}

/// A message stored durably (under the node's durability policy), in seq order per
/// conversation.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The conversation.
    pub conversation: ConversationRef,
    /// Its seq there (gapless from 1).
    pub seq: u64,
    /// Its node-wide id.
    pub msg_id: u64,
    /// Who sent it.
    pub sender: String,
    /// From which device.
    pub device: String,
    /// When it was stored (ms since the Unix epoch).
    pub time_ms: i64,
    /// Its body.
    pub body: Bytes,
    /// A SYSTEM message (a group event or one posted by the application).
    pub system: bool,
}

/// A stored message some of its recipients were not online for (one call per message per
/// shard that holds such recipients).
#[derive(Debug, Clone)]
pub struct OfflineDelivery {
    /// The conversation.
    pub conversation: ConversationRef,
    /// The message's seq.
    pub seq: u64,
    /// Who sent it.
    pub sender: String,
    /// Recipients with no device connected when it was stored.
    pub users: Vec<String>,
}

/// A device that logged in or left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    /// The user.
    pub user: String,
    /// The device.
    pub device: String,
}

/// A user who came online (first device) or went offline (last device left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The user.
    pub user: String,
    /// Online now.
    pub online: bool,
}

/// A group change, once durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    /// The group.
    pub group: String,
    /// The seq of the event in the group's conversation.
    pub seq: u64,
    /// Who made it.
    pub actor: String,
    /// What: `created`, `members_added`, `members_removed`, `member_left`, `member_joined`,
    /// `renamed`, `role_changed` or `dissolved`.
    pub what: String,
    /// The users it concerns.
    pub members: Vec<String>,
}

/// Which per-message observers a [`Hooks`] wants called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observes {
    /// Call [`Hooks::message_stored`] for every stored message.
    pub stored: bool,
    /// Compute and call [`Hooks::stored_for_offline`].
    pub offline: bool,
}

/// Which gates a [`Hooks`] wants called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gates {
    /// Call [`Hooks::authenticate`].
    pub authenticate: bool,
    /// Call [`Hooks::check_send`].
    pub send: bool,
    /// Call [`Hooks::check_group`].
    pub group: bool,
}

impl Gates {
    /// Every gate.
    pub const ALL: Gates = Gates {
        authenticate: true,
        send: true,
        group: true,
    };
}

/// An embedding application's part in the broker (see the module documentation). Every method
/// has a default that changes nothing.
pub trait Hooks: Send + Sync + 'static {
    /// Which gates to call (default: none).
    fn gates(&self) -> Gates {
        Gates::default()
    }

    /// Which per-message observers to call (default: [`Hooks::message_stored`] only;
    /// [`Hooks::stored_for_offline`] walks a group's members per message). The others (devices,
    /// presence, groups) are always called: they are rare.
    fn observes(&self) -> Observes {
        Observes {
            stored: true,
            offline: false,
        }
    }

    /// Decides a login. Default: the built-in verifier decides.
    fn authenticate(&self, login: &LoginAttempt<'_>, reply: Reply<AuthVerdict>) {
        let _ = login;
        reply.send(AuthVerdict::Builtin);
    }

    /// Decides a send to a direct conversation or a group. Default: allowed as sent.
    fn check_send(&self, send: &SendAttempt<'_>, reply: Reply<SendVerdict>) {
        let _ = send;
        reply.send(SendVerdict::Allow);
    }

    /// Decides a group request before the group's rules do. Default: allowed.
    fn check_group(&self, request: &GroupAttempt<'_>, reply: Reply<Verdict>) {
        let _ = request;
        reply.send(Verdict::Allow);
    }

    /// A message was stored durably.
    fn message_stored(&self, message: &StoredMessage) {
        let _ = message;
    }

    /// A message was stored for recipients with no device online (only if
    /// [`Hooks::observes`] says `offline`).
    fn stored_for_offline(&self, delivery: &OfflineDelivery) {
        let _ = delivery;
    }

    /// A device logged in.
    fn connected(&self, device: &DeviceEvent) {
        let _ = device;
    }

    /// A logged-in device left.
    fn disconnected(&self, device: &DeviceEvent) {
        let _ = device;
    }

    /// A user came online or went offline.
    fn presence_changed(&self, change: &PresenceChange) {
        let _ = change;
    }

    /// A group changed (durably).
    fn group_changed(&self, change: &GroupChange) {
        let _ = change;
    }
}

/// Several hooks as one: gates ask each in turn (the first that does not simply allow decides),
/// observers tell all.
pub(crate) struct Tee(pub(crate) Vec<Arc<dyn Hooks>>);

impl fmt::Debug for Tee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tee").field("hooks", &self.0.len()).finish()
    }
}

impl Tee {
    /// The hooks that gate; a tee of gates asks only the first (see [`crate::Broker::hooks`]).
    fn gate(&self) -> Option<&Arc<dyn Hooks>> {
        self.0.first()
    }
}

impl Hooks for Tee {
    fn gates(&self) -> Gates {
        self.gate().map(|h| h.gates()).unwrap_or_default()
    }
    fn observes(&self) -> Observes {
        self.0.iter().fold(Observes::default(), |a, h| {
            let o = h.observes();
            Observes {
                stored: a.stored || o.stored,
                offline: a.offline || o.offline,
            }
        })
    }
    fn authenticate(&self, login: &LoginAttempt<'_>, reply: Reply<AuthVerdict>) {
        match self.gate() {
            Some(h) => h.authenticate(login, reply),
            None => reply.send(AuthVerdict::Builtin),
        }
    }
    fn check_send(&self, send: &SendAttempt<'_>, reply: Reply<SendVerdict>) {
        match self.gate() {
            Some(h) => h.check_send(send, reply),
            None => reply.send(SendVerdict::Allow),
        }
    }
    fn check_group(&self, request: &GroupAttempt<'_>, reply: Reply<Verdict>) {
        match self.gate() {
            Some(h) => h.check_group(request, reply),
            None => reply.send(Verdict::Allow),
        }
    }
    fn message_stored(&self, message: &StoredMessage) {
        self.0
            .iter()
            .filter(|h| h.observes().stored)
            .for_each(|h| h.message_stored(message));
    }
    fn stored_for_offline(&self, delivery: &OfflineDelivery) {
        self.0
            .iter()
            .filter(|h| h.observes().offline)
            .for_each(|h| h.stored_for_offline(delivery));
    }
    fn connected(&self, device: &DeviceEvent) {
        self.0.iter().for_each(|h| h.connected(device));
    }
    fn disconnected(&self, device: &DeviceEvent) {
        self.0.iter().for_each(|h| h.disconnected(device));
    }
    fn presence_changed(&self, change: &PresenceChange) {
        self.0.iter().for_each(|h| h.presence_changed(change));
    }
    fn group_changed(&self, change: &GroupChange) {
        self.0.iter().for_each(|h| h.group_changed(change));
    }
}

// ----- replies -----------------------------------------------------------------------------------

/// A gate's answer, whichever gate gave it, on its way back to the shard that parked the
/// request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// From [`Hooks::authenticate`].
    Auth(AuthVerdict),
    /// From [`Hooks::check_send`].
    Send(SendVerdict),
    /// From [`Hooks::check_group`].
    Group(Verdict),
}

/// What a gate answers with.
pub trait GateAnswer: Send + 'static + private::Sealed {
    /// The answer of a reply dropped unanswered (a denial).
    #[doc(hidden)]
    fn dropped() -> Self;
    /// Type-erased.
    #[doc(hidden)]
    fn erase(self) -> Answer;
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::AuthVerdict {}
    impl Sealed for super::SendVerdict {}
    impl Sealed for super::Verdict {}
}

impl GateAnswer for AuthVerdict {
    fn dropped() -> Self {
        AuthVerdict::Reject("the login hook gave no answer".into())
    }
    fn erase(self) -> Answer {
        Answer::Auth(self)
    }
}

impl GateAnswer for SendVerdict {
    fn dropped() -> Self {
        SendVerdict::Deny("the send hook gave no answer".into())
    }
    fn erase(self) -> Answer {
        Answer::Send(self)
    }
}

impl GateAnswer for Verdict {
    fn dropped() -> Self {
        Verdict::Deny("the group hook gave no answer".into())
    }
    fn erase(self) -> Answer {
        Answer::Group(self)
    }
}

/// Which parked request an answer is for: the shard, its connection, and the connection's
/// park count (a stale answer, for a connection closed meanwhile, is dropped). Opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub(crate) shard: usize,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    pub(crate) serial: u64,
}

impl Ticket {
    /// The shard that parked the request (hand the answer to its core).
    pub fn shard(&self) -> usize {
        self.shard
    }
}

/// Where answers given after the gate returned go: the node's driver posts them to the shard
/// and wakes it; the simulation queues them.
pub trait Completions: Send + Sync {
    /// An answer for a parked request.
    fn complete(&self, ticket: Ticket, answer: Answer);
}

enum State<V> {
    /// The gate is running and has not answered.
    Running,
    /// The gate answered before it returned.
    Answered(V),
    /// The gate returned without answering: the request is parked.
    Parked,
    /// Answered and taken.
    Done,
}

struct Slot<V> {
    state: Mutex<State<V>>,
    ticket: Ticket,
    sink: Arc<dyn Completions>,
}

/// The way a gate answers: [`Reply::send`], now or later, from any thread. Dropped unanswered,
/// it denies.
pub struct Reply<V: GateAnswer> {
    slot: Option<Arc<Slot<V>>>,
}

impl<V: GateAnswer> fmt::Debug for Reply<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("answered", &self.slot.is_none())
            .finish()
    }
}

impl<V: GateAnswer> Reply<V> {
    /// Answers the gate.
    pub fn send(mut self, answer: V) {
        if let Some(slot) = self.slot.take() {
            deliver(&slot, answer);
        }
    }
}

impl<V: GateAnswer> Drop for Reply<V> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            deliver(&slot, V::dropped());
        }
    }
}

fn deliver<V: GateAnswer>(slot: &Slot<V>, answer: V) {
    let Ok(mut state) = slot.state.lock() else {
        return;
    };
    match std::mem::replace(&mut *state, State::Done) {
        State::Running => *state = State::Answered(answer),
        State::Parked => {
            drop(state);
            slot.sink.complete(slot.ticket, answer.erase());
        }
        // Answered twice cannot happen (`send` takes the reply); keep the first.
        other @ (State::Answered(_) | State::Done) => *state = other,
    }
}

/// Calls a gate: `Some(answer)` if it answered before it returned; `None` if the request is
/// parked (the answer will come through `sink` with `ticket`).
pub(crate) fn call_gate<V: GateAnswer>(
    ticket: Ticket,
    sink: &Arc<dyn Completions>,
    gate: impl FnOnce(Reply<V>),
) -> Option<V> {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Running),
        ticket,
        sink: Arc::clone(sink),
    });
    gate(Reply {
        slot: Some(Arc::clone(&slot)),
    });
    let mut state = slot.state.lock().ok()?;
    match std::mem::replace(&mut *state, State::Parked) {
        State::Answered(v) => {
            *state = State::Done;
            Some(v)
        }
        State::Running => None,
        // Not reachable (only this function sets Parked, once); treat as parked.
        State::Parked | State::Done => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Queue(Mutex<Vec<(Ticket, Answer)>>);

    impl Completions for Queue {
        fn complete(&self, ticket: Ticket, answer: Answer) {
            if let Ok(mut q) = self.0.lock() {
                q.push((ticket, answer));
            }
        }
    }

    fn ticket() -> Ticket {
        Ticket {
            shard: 1,
            slot: 2,
            generation: 3,
            serial: 4,
        }
    }

    #[test]
    fn an_answer_given_before_the_gate_returns_is_taken_at_once() {
        let q = Arc::new(Queue::default());
        let sink: Arc<dyn Completions> = q.clone();
        let got = call_gate(ticket(), &sink, |r: Reply<Verdict>| r.send(Verdict::Allow));
        assert_eq!(got, Some(Verdict::Allow));
        assert!(q.0.lock().map(|v| v.is_empty()).unwrap_or(false));
    }

    #[test]
    fn an_answer_given_later_comes_through_the_sink_with_its_ticket() {
        let q = Arc::new(Queue::default());
        let sink: Arc<dyn Completions> = q.clone();
        let mut kept = None;
        let got = call_gate(ticket(), &sink, |r: Reply<SendVerdict>| kept = Some(r));
        assert_eq!(got, None);
        let r = kept.take().expect("kept");
        std::thread::spawn(move || r.send(SendVerdict::Deny("no".into())))
            .join()
            .expect("thread");
        let q = q.0.lock().expect("lock");
        assert_eq!(
            q.as_slice(),
            &[(ticket(), Answer::Send(SendVerdict::Deny("no".into())))]
        );
    }

    #[test]
    fn a_reply_dropped_unanswered_denies() {
        let q = Arc::new(Queue::default());
        let sink: Arc<dyn Completions> = q.clone();
        let got = call_gate(ticket(), &sink, |r: Reply<Verdict>| drop(r));
        assert!(matches!(got, Some(Verdict::Deny(_))));
        let mut kept = None;
        assert_eq!(
            call_gate(ticket(), &sink, |r: Reply<AuthVerdict>| kept = Some(r)),
            None
        );
        drop(kept);
        let q = q.0.lock().expect("lock");
        assert!(matches!(
            q.as_slice(),
            [(_, Answer::Auth(AuthVerdict::Reject(_)))]
        ));
    }
}
