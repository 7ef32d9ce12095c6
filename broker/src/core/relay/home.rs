//! The home's side of relayed sessions: a client logged in on another node for a user homed
//! here. Its session is a connection of this core without a socket, fed in the TCP framing:
//!
//! * **Input.** The client's frames come as [`ShardMsg::RelayIn`] and wait in the session's
//!   queue; the core asks its driver to serve the connection ([`Effect::Resume`]), and the
//!   driver feeds it with [`ShardCore::service_relayed`] within its read budget, as it reads a
//!   socket. Each chunk taken is credited back ([`ShardMsg::RelayAck`]), so the accepting node
//!   reads its client only as fast as the session here takes its input.
//! * **Output.** The driver's transmit ([`Effect::Transmit`]) goes to
//!   [`ShardCore::transmit_relayed`], which sends the connection's queued bytes as
//!   [`ShardMsg::RelayOut`], at most a window (`limits.max_outbound_bytes`) ahead of what the
//!   accepting node has credited (a frame may be split between two). Past that, output stays queued here under the session's own budgets and
//!   `Behind` rules, as a slow socket's does.
//! * **Endings.** A session closed here sends its last words and a [`ShardMsg::RelayClose`];
//!   one ended there (`RelayClose` to the home) or relayed from a node whose link went down is
//!   dropped here without a word back.
//!
//! Both the node's driver and the simulation drive it the same way, so the simulation runs
//! sessions relayed between its nodes exactly as the binary does.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use parley_storage::Backend;

use crate::core::conn::ConnId;
use crate::core::mail::{Origin, RelayOpen, ShardMsg};
use crate::core::{Effect, Intake, Now, ShardCore};

/// One relayed session at its home.
#[derive(Debug)]
struct Session {
    /// The accepting connection (the key of the session's mail).
    key: Origin,
    /// Client input the core has not taken yet.
    input: VecDeque<Bytes>,
    /// Output sent to the accepting node and not yet credited.
    queued: usize,
}

/// The relayed sessions homed on a shard.
#[derive(Debug, Default)]
pub(crate) struct Homes {
    sessions: HashMap<ConnId, Session>,
    /// The session of each accepting connection.
    keys: HashMap<Origin, ConnId>,
}

impl Homes {
    /// Adds the session of connection `conn`, relayed from `key`.
    pub(in crate::core) fn add(&mut self, conn: ConnId, key: Origin) {
        self.keys.insert(key, conn);
        self.sessions.insert(
            conn,
            Session {
                key,
                input: VecDeque::new(),
                queued: 0,
            },
        );
    }

    /// Takes `conn`'s session out of the table (the connection is going).
    fn take(&mut self, conn: ConnId) -> Option<Session> {
        let s = self.sessions.remove(&conn)?;
        self.keys.remove(&s.key);
        Some(s)
    }
}

impl<B: Backend> ShardCore<B> {
    /// Whether `conn` is a session relayed from another node (served with
    /// [`ShardCore::service_relayed`] and [`ShardCore::transmit_relayed`] instead of a socket).
    pub fn is_relayed(&self, conn: ConnId) -> bool {
        self.relayed.sessions.contains_key(&conn)
    }

    /// Feeds relayed session `conn` the client input it has waiting, while the core takes
    /// input and within `budget` bytes. Returns whether to call again on the next turn (the
    /// budget ran out, or more frames wait decoded); the core says [`Effect::Resume`] when a
    /// held session may take input again, and when new input arrives.
    pub fn service_relayed(&mut self, conn: ConnId, budget: usize, now: Now) -> bool {
        self.now = now;
        let mut total = 0;
        let mut handled = false;
        loop {
            match self.intake(conn) {
                None | Some(Intake::Hold) => return false,
                Some(Intake::Pending) if handled => return true,
                Some(Intake::Pending) => {
                    self.handle_continue(conn, now);
                    handled = true;
                }
                Some(Intake::Read) if total >= budget => return true,
                Some(Intake::Read) => {
                    let Some(s) = self.relayed.sessions.get_mut(&conn) else {
                        return false;
                    };
                    let Some(chunk) = s.input.pop_front() else {
                        return false;
                    };
                    let key = s.key;
                    total += chunk.len();
                    self.route(
                        key.shard,
                        ShardMsg::RelayAck {
                            key,
                            to_home: false,
                            bytes: u32::try_from(chunk.len()).unwrap_or(u32::MAX),
                        },
                    );
                    self.handle_bytes(conn, &chunk, now);
                    handled = true;
                }
            }
        }
    }

    /// Sends relayed session `conn`'s queued output to its client's node, as much as the
    /// window takes.
    pub fn transmit_relayed(&mut self, conn: ConnId, now: Now) {
        self.now = now;
        let Some(s) = self.relayed.sessions.get_mut(&conn) else {
            return;
        };
        let room = self.cfg.max_outbound_bytes.saturating_sub(s.queued);
        let key = s.key;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let n = room.min(c.out.len());
        if n == 0 {
            return;
        }
        let bytes = c.out.split_to(n).freeze();
        if let Some(s) = self.relayed.sessions.get_mut(&conn) {
            s.queued += n;
        }
        self.route(key.shard, ShardMsg::RelayOut { to: key, bytes });
        self.handle_written(conn, true, now);
    }

    /// Mail of a relayed session, for its home.
    pub(super) fn on_relay_home_mail(&mut self, m: ShardMsg) {
        match m {
            ShardMsg::RelayOpen(open) => self.open_relayed(*open),
            ShardMsg::RelayIn { from, bytes } => {
                if let Some(&conn) = self.relayed.keys.get(&from)
                    && let Some(s) = self.relayed.sessions.get_mut(&conn)
                {
                    s.input.push_back(bytes);
                    self.effects.push(Effect::Resume(conn));
                }
            }
            ShardMsg::RelayAck { key, bytes, .. } => {
                if let Some(&conn) = self.relayed.keys.get(&key)
                    && let Some(s) = self.relayed.sessions.get_mut(&conn)
                {
                    s.queued = s.queued.saturating_sub(bytes as usize);
                    if self.live_conn_mut(conn).is_some_and(|c| !c.out.is_empty()) {
                        self.mark_dirty(conn);
                    }
                }
            }
            ShardMsg::RelayClose { key, .. } => {
                if let Some(&conn) = self.relayed.keys.get(&key) {
                    // Gone there: nothing goes back.
                    self.relayed.take(conn);
                    self.close(conn, 0, None);
                }
            }
            _ => debug_assert!(false, "a relayed connection's mail reached the home side"),
        }
    }

    /// Opens the session of a login accepted on another node.
    fn open_relayed(&mut self, open: RelayOpen) {
        let now = self.now;
        let key = open.from;
        if let Some(&old) = self.relayed.keys.get(&key) {
            // The same key again (cannot happen: a key's connection is gone before its slot
            // is reused there): the older session ends.
            self.relayed.take(old);
            self.handle_reset(old, now);
        }
        // Its login is answered here (after its route, in a cluster) with the request id the
        // client gave it there.
        self.open_socketless(open.identity, open.request_id, false, false, Some(key), now);
    }

    /// Connection `conn` is closing here: if it is a relayed session, its queued output (its
    /// last words) goes to the client's node now, whatever the window. Returns whether it is
    /// one (the driver then has no socket to close).
    pub(in crate::core) fn relayed_last_words(&mut self, conn: ConnId) -> bool {
        let Some(key) = self.relayed.sessions.get(&conn).map(|s| s.key) else {
            return false;
        };
        if let Some(c) = self.live_conn_mut(conn)
            && !c.out.is_empty()
        {
            let bytes = std::mem::take(&mut c.out).freeze();
            self.route(key.shard, ShardMsg::RelayOut { to: key, bytes });
        }
        true
    }

    /// Connection `conn` is gone here: if it was a relayed session, it ends at the client's
    /// node too.
    pub(in crate::core) fn end_relayed(&mut self, conn: ConnId) {
        if let Some(s) = self.relayed.take(conn) {
            self.route(
                s.key.shard,
                ShardMsg::RelayClose {
                    key: s.key,
                    to_home: false,
                    last: Bytes::new(),
                },
            );
        }
    }

    /// The link to node `node` went down: every session relayed from it ends here (its client
    /// there was closed UNAVAILABLE and logs in again).
    pub(in crate::core) fn drop_relayed_from(&mut self, node: usize) {
        let placement = self.placement;
        let gone: Vec<ConnId> = self
            .relayed
            .sessions
            .iter()
            .filter(|(_, s)| placement.node_of(s.key.shard) == node)
            .map(|(&conn, _)| conn)
            .collect();
        let now = self.now;
        for conn in gone {
            self.relayed.take(conn);
            self.handle_reset(conn, now);
        }
    }
}
