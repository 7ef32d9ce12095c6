//! Gates and observers: where the core calls an embedding application's [`Hooks`].
//!
//! A gate (login, send, group request) is called with a [`crate::hooks::Reply`]. An answer given
//! before the gate returns is applied at once; otherwise the request is **parked**: the
//! connection's input stops ([`Input::Parked`]: it reads and decodes nothing more, so its
//! requests stay in order), the shard goes on with everyone else, and the answer comes back
//! later as [`ShardCore::handle_hook_answer`] with the ticket it was parked under. A connection
//! that closes while parked drops its parked request; a late answer for it is dropped.
//!
//! Observers are called where the event happens; they are the application's to keep quick.
//!
//! ### Invariants
//! * A connection has at most one parked request, and its input is [`Input::Parked`] exactly
//!   while it has one.

use std::sync::Arc;

use parley_proto::pb;
use parley_storage::Backend;

use super::conn::{ConnId, Input};
use super::conv::{Conv, ConvKind};
use super::{FastMap, ShardCore};
use crate::hooks::{
    Answer, Completions, ConversationKind, ConversationRef, Gates, Hooks, Reply, Ticket, call_gate,
};

/// A request waiting for a gate's answer.
#[derive(Debug)]
pub(crate) enum Parked {
    /// A login (or, on a logged-in connection, a token refresh).
    Login {
        request_id: u64,
        login: pb::Login,
        refresh: bool,
    },
    /// A send, checked and resolved to its conversation.
    Send {
        request_id: u64,
        send: pb::Send,
        conv: Arc<Conv>,
    },
    /// A group request.
    Group {
        request_id: u64,
        req: pb::GroupRequest,
    },
    /// A login, accepted, waiting for its route in the cluster's presence index
    /// ([`super::route`]).
    Route {
        request_id: u64,
        identity: crate::auth::Identity,
    },
}

/// The hooks of a core and the requests parked on them.
pub(crate) struct Gatekeeper {
    pub(crate) hooks: Option<Arc<dyn Hooks>>,
    pub(crate) gates: Gates,
    /// Whether the offline observer wants its (costly) calls.
    pub(crate) offline: bool,
    /// Whether the stored-message observer wants its calls.
    pub(crate) stored: bool,
    sink: Option<Arc<dyn Completions>>,
    parked: FastMap<ConnId, (u64, Parked)>,
    serial: u64,
}

impl std::fmt::Debug for Gatekeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gatekeeper")
            .field("hooks", &self.hooks.is_some())
            .field("gates", &self.gates)
            .field("parked", &self.parked.len())
            .finish()
    }
}

impl Gatekeeper {
    /// `hooks` as a core calls them; answers given later go to `sink` (without a sink, every
    /// gate must answer before it returns: one that does not denies).
    pub(crate) fn new(hooks: Option<Arc<dyn Hooks>>, sink: Option<Arc<dyn Completions>>) -> Self {
        let gates = hooks.as_ref().map(|h| h.gates()).unwrap_or_default();
        let observes = hooks.as_ref().map(|h| h.observes()).unwrap_or_default();
        let (offline, stored) = (observes.offline, observes.stored);
        Gatekeeper {
            hooks,
            gates,
            offline,
            stored,
            sink,
            parked: FastMap::default(),
            serial: 0,
        }
    }

    /// The hooks, if any observe.
    pub(crate) fn observer(&self) -> Option<&dyn Hooks> {
        self.hooks.as_deref()
    }

    /// Forgets what `conn` had parked (it closed).
    pub(crate) fn forget(&mut self, conn: ConnId) {
        self.parked.remove(&conn);
    }

    /// Parks `request` of `conn` (on shard `shard`) for an answer from outside the hooks (the
    /// caller stops the connection's input); `None` if `conn` has a parked request already.
    pub(crate) fn park(&mut self, shard: usize, conn: ConnId, request: Parked) -> Option<Ticket> {
        if self.parked.contains_key(&conn) {
            debug_assert!(false, "one parked per conn");
            return None;
        }
        self.serial += 1;
        self.parked.insert(conn, (self.serial, request));
        Some(Ticket {
            shard,
            slot: conn.slot,
            generation: conn.generation,
            serial: self.serial,
        })
    }

    /// Takes back what `conn` parked under `serial` (`None`: nothing, or something newer).
    pub(crate) fn unpark(&mut self, conn: ConnId, serial: u64) -> Option<Parked> {
        match self.parked.get(&conn) {
            Some((s, _)) if *s == serial => self.parked.remove(&conn).map(|(_, p)| p),
            _ => None,
        }
    }
}

/// The sink of a core without one: an answer that comes late has nowhere to go (the request was
/// denied when the gate returned without answering).
struct Nowhere;

impl Completions for Nowhere {
    fn complete(&self, _: Ticket, _: Answer) {}
}

/// How hooks name `conv`.
pub(crate) fn conversation_ref(conv: &Conv) -> ConversationRef {
    match conv.kind {
        ConvKind::Group => ConversationRef {
            kind: ConversationKind::Group,
            id: conv.group_id().unwrap_or_default().to_owned(),
            users: Vec::new(),
        },
        ConvKind::Direct => {
            let users: Vec<String> = conv.members.iter().map(|u| u.to_string()).collect();
            let id = match users.as_slice() {
                [a] => format!("{a}:{a}"),
                _ => users.join(":"),
            };
            ConversationRef {
                kind: ConversationKind::Direct,
                id,
                users,
            }
        }
    }
}

/// What a gate call came to.
pub(crate) enum Gated<V> {
    /// Answered now: the answer, and the request back.
    Now(V, Parked),
    /// Parked; the answer comes later.
    Parked,
}

impl<B: Backend> ShardCore<B> {
    /// Calls a gate for `conn`'s `request` (`gate` sees it while it decides): its answer now
    /// with the request back, or `Parked` (then the request is kept and the connection reads
    /// nothing more until the answer).
    pub(crate) fn call_gate<V: crate::hooks::GateAnswer>(
        &mut self,
        conn: ConnId,
        request: Parked,
        gate: impl FnOnce(&dyn Hooks, &Parked, Reply<V>),
    ) -> Gated<V> {
        let Some(hooks) = self.gate.hooks.clone() else {
            return Gated::Now(V::dropped(), request);
        };
        self.gate.serial += 1;
        let ticket = Ticket {
            shard: self.index,
            slot: conn.slot,
            generation: conn.generation,
            serial: self.gate.serial,
        };
        let sink: Arc<dyn Completions> = match &self.gate.sink {
            Some(s) => Arc::clone(s),
            None => Arc::new(Nowhere),
        };
        match call_gate(ticket, &sink, |reply| gate(&*hooks, &request, reply)) {
            Some(v) => Gated::Now(v, request),
            None if self.gate.sink.is_none() => Gated::Now(V::dropped(), request),
            None => {
                debug_assert!(!self.gate.parked.contains_key(&conn), "one parked per conn");
                if let Some(c) = self.live_conn_mut(conn) {
                    c.input = Input::Parked;
                }
                self.counters.hooks_parked += 1;
                self.gate.parked.insert(conn, (ticket.serial, request));
                Gated::Parked
            }
        }
    }

    /// A gate answered a parked request: it goes on as if answered at once, and the connection
    /// reads again.
    pub fn handle_hook_answer(&mut self, ticket: Ticket, answer: Answer, now: super::Now) {
        self.now = now;
        let conn = ConnId {
            slot: ticket.slot,
            generation: ticket.generation,
        };
        match self.gate.parked.get(&conn) {
            Some((serial, _)) if *serial == ticket.serial => {}
            // Closed meanwhile (its slot may even be someone else's now).
            _ => return,
        }
        let Some((_, parked)) = self.gate.parked.remove(&conn) else {
            return;
        };
        if let Some(c) = self.live_conn_mut(conn) {
            debug_assert_eq!(c.input, Input::Parked);
            c.input = Input::Backlog;
            self.effects.push(super::Effect::Resume(conn));
        }
        match (parked, answer) {
            (
                Parked::Login {
                    request_id,
                    login,
                    refresh,
                },
                Answer::Auth(v),
            ) => self.auth_verdict(conn, request_id, &login, refresh, v),
            (
                Parked::Send {
                    request_id,
                    send,
                    conv,
                },
                Answer::Send(v),
            ) => self.send_verdict(conn, request_id, send, conv, v),
            (Parked::Group { request_id, req }, Answer::Group(v)) => {
                self.group_verdict(conn, request_id, req, v);
            }
            // A gate answers with its own kind: the types see to it.
            (p, a) => debug_assert!(false, "answer {a:?} for {p:?}"),
        }
        self.after_io(conn);
        self.drain_local();
    }
}
