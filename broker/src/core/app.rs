//! What the embedding application asks of a shard directly (through the node's control, never
//! over a socket): in-process connections, kicks, who is online. See also [`super::inspect`].

use bytes::BytesMut;
use parley_storage::Backend;

use super::conn::ConnId;
use super::error::CloseReason;
use super::{Now, ShardCore};
use crate::transport::Transport;

impl<B: Backend> ShardCore<B> {
    /// An in-process connection of the embedding application, logged in as `identity` (no
    /// token: the application vouches for it). It speaks the TCP framing over the driver's
    /// in-memory link and may send SYSTEM messages; no gate asks about its requests. A
    /// `service` connection acts as the user without being one of its devices: it is not
    /// delivered to and changes no presence. Open it on the user's home shard.
    pub fn handle_open_local(
        &mut self,
        identity: crate::auth::Identity,
        service: bool,
        now: Now,
    ) -> ConnId {
        self.counters.local_connections_opened += 1;
        self.open_socketless(identity, 0, true, service, None, now)
    }

    /// A connection without a socket (TCP framing, fed by the driver), logged in as
    /// `identity` (see [`ShardCore::activate_as`]), or closed at once while shutting down. A
    /// session relayed from connection `relayed_from` of another node is in the relay table
    /// before its login is answered, so that even a refusal goes back there.
    pub(super) fn open_socketless(
        &mut self,
        identity: crate::auth::Identity,
        request_id: u64,
        trusted: bool,
        service: bool,
        relayed_from: Option<super::mail::Origin>,
        now: Now,
    ) -> ConnId {
        self.now = now;
        let conn = self.insert(
            Transport::tcp(self.limits),
            BytesMut::new(),
            BytesMut::new(),
        );
        if let Some(key) = relayed_from {
            self.relayed.add(conn, key);
        }
        self.mark_dirty(conn);
        if self.shutting_down {
            self.close(conn, request_id, Some(CloseReason::ShuttingDown));
        } else {
            self.activate_as(conn, identity, request_id, trusted, service);
        }
        self.drain_local();
        conn
    }

    /// Ends every connection of `user` (only `device`'s, if given) with KICKED and `reason`;
    /// returns how many. Call it on the user's home shard.
    pub fn kick(&mut self, user: &str, device: Option<&str>, reason: &str, now: Now) -> usize {
        self.now = now;
        let conns: Vec<ConnId> = self
            .home
            .users
            .get(user)
            .map(|u| {
                u.devices
                    .iter()
                    .filter(|(d, _)| device.is_none_or(|want| **d == *want))
                    .map(|&(_, c)| c)
                    .collect()
            })
            .unwrap_or_default();
        for &conn in &conns {
            self.counters.kicked += 1;
            self.close(conn, 0, Some(CloseReason::Kicked(reason.to_owned())));
        }
        self.drain_local();
        conns.len()
    }

    /// The devices of this shard's users online now, `(user, devices)` sorted by user, from
    /// `after` (exclusive), at most `limit` users.
    pub fn online_users(&self, after: &str, limit: usize) -> Vec<(String, Vec<String>)> {
        let mut users: Vec<(String, Vec<String>)> = self
            .home
            .users
            .iter()
            .filter(|(u, e)| !e.devices.is_empty() && &***u > after)
            .map(|(u, e)| {
                let mut d: Vec<String> = e.devices.iter().map(|(d, _)| d.to_string()).collect();
                d.sort();
                (u.to_string(), d)
            })
            .collect();
        users.sort();
        users.truncate(limit);
        users
    }

    /// The shard that is `user`'s home.
    pub fn home_of(&self, user: &str) -> usize {
        self.placement.home(user)
    }
}
