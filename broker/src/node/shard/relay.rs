//! The home's side of relayed sessions (`crate::core::relay`): a client logged in on another
//! node for a user homed here. Its session is a connection of this shard's core, fed like an
//! in-process one ([`super::LocalPipe`]): the client's frames come as `RelayIn` mail and wait
//! in the pipe until the core takes input (each chunk taken is credited back, so the accepting
//! node reads its client only as fast as the session here takes it); the core's output goes
//! back as `RelayOut` mail, at most [`crate::node::local::LOCAL_WINDOW`] bytes ahead of what
//! the accepting node has credited. A session ends with `RelayClose` either way; a link to the
//! accepting node that goes down ends every session relayed from it.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{Driver, LocalPipe};
use crate::core::mail::{Origin, RelayOpen};
use crate::core::{ConnId, Now, ShardMsg};
use crate::node::local::PipeEnd;

/// Where a relayed session's output goes: the accepting connection on another node. What it
/// says waits in `pending` until the driver sends the turn's mail ([`Driver::queue_remote`]).
#[derive(Debug)]
pub(crate) struct RemoteEnd {
    /// The accepting connection (the key of the session's mail).
    pub(crate) key: Origin,
    /// Bytes sent and not yet credited.
    pub(crate) queued: usize,
    /// Mail for the accepting shard, not yet handed to the driver.
    pub(crate) pending: Vec<ShardMsg>,
}

impl RemoteEnd {
    /// Sends output.
    pub(crate) fn send(&mut self, bytes: Bytes) {
        self.queued += bytes.len();
        self.pending.push(ShardMsg::RelayOut {
            to: self.key,
            bytes,
        });
    }

    /// Ends the session there, with its last words.
    pub(crate) fn close(&mut self, last: Bytes) {
        self.pending.push(ShardMsg::RelayClose {
            key: self.key,
            to_home: false,
            last,
        });
    }

    /// Credits the accepting node with `bytes` of its client's input taken here.
    pub(crate) fn credit(&mut self, bytes: usize) {
        self.pending.push(ShardMsg::RelayAck {
            key: self.key,
            to_home: false,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        });
    }
}

impl Driver {
    /// Takes the mail of relayed sessions homed here out of `batch`; the rest is the core's.
    pub(super) fn relay_mail(&mut self, batch: Vec<ShardMsg>, now: Now) -> Vec<ShardMsg> {
        let mut rest = Vec::with_capacity(batch.len());
        for msg in batch {
            match msg {
                ShardMsg::RelayOpen(open) => self.relay_open(*open, now),
                ShardMsg::RelayIn { from, bytes } => self.relay_in(from, bytes, now),
                ShardMsg::RelayAck {
                    key,
                    to_home: true,
                    bytes,
                } => {
                    if let Some(conn) = self.relay_conn(key)
                        && let Some(pipe) = self.local_mut(conn)
                        && let PipeEnd::Remote(end) = &mut pipe.end
                    {
                        end.queued = end.queued.saturating_sub(bytes as usize);
                        self.writable.push(conn);
                    }
                }
                ShardMsg::RelayClose {
                    key, to_home: true, ..
                } => {
                    if let Some(conn) = self.relay_conn(key) {
                        self.take_local(conn);
                        self.core.handle_eof(conn, now);
                        self.apply_effects(now);
                    }
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// Queues what relayed session `conn`'s end said (if it is one) for this turn's mail.
    pub(super) fn take_pipe_mail(&mut self, conn: ConnId) {
        if let Some(LocalPipe {
            end: PipeEnd::Remote(end),
            ..
        }) = self.local_mut(conn)
        {
            let to = end.key.shard;
            let mail = std::mem::take(&mut end.pending);
            self.queue_remote(to, mail);
        }
    }

    /// The session of relayed connection `key`, if it lives here.
    fn relay_conn(&self, key: Origin) -> Option<ConnId> {
        self.relay_ids
            .get(&key)
            .and_then(|id| self.local_ids.get(id))
            .copied()
    }

    /// Opens the session of a login accepted on another node.
    fn relay_open(&mut self, open: RelayOpen, now: Now) {
        if self.carrier.is_none() {
            return;
        }
        let key = open.from;
        let end = RemoteEnd {
            key,
            queued: 0,
            pending: Vec::new(),
        };
        if let Some(old) = self.relay_conn(key) {
            // The same key again (cannot happen: a key's connection is gone before its slot
            // is reused): the older session ends.
            self.take_local(old);
            self.core.handle_reset(old, now);
        }
        let conn = self
            .core
            .handle_open_relayed(open.identity, open.request_id, now);
        let slot = conn.slot as usize;
        if self.locals.len() <= slot {
            self.locals.resize_with(slot + 1, || None);
        }
        self.next_relay_id += 1;
        let id = RELAY_IDS | self.next_relay_id;
        self.locals[slot] = Some(LocalPipe {
            generation: conn.generation,
            id,
            end: PipeEnd::Remote(end),
            input: VecDeque::new(),
        });
        self.local_ids.insert(id, conn);
        self.relay_ids.insert(key, id);
        self.apply_effects(now);
    }

    /// Frames from a relayed session's client.
    fn relay_in(&mut self, from: Origin, bytes: Bytes, now: Now) {
        if let Some(conn) = self.relay_conn(from)
            && let Some(pipe) = self.local_mut(conn)
        {
            pipe.input.push_back(bytes);
            self.service_local(conn, now);
        }
    }

    /// The link to node `node` went down: every session relayed from it ends.
    pub(super) fn relay_link_down(&mut self, node: usize, now: Now) {
        let gone: Vec<ConnId> = self
            .relay_ids
            .keys()
            .filter(|k| self.placement.node_of(k.shard) == node)
            .filter_map(|&k| self.relay_conn(k))
            .collect();
        for conn in gone {
            self.take_local(conn);
            self.core.handle_reset(conn, now);
        }
        self.apply_effects(now);
    }
}

/// The high bit marks a relayed session's pipe id (in-process links count from 1).
pub(super) const RELAY_IDS: u64 = 1 << 63;
