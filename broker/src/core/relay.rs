//! Sessions on any node (a cluster with `cluster.nodes`): a client logged in on a node that is
//! not its user's home keeps its socket there, and its session runs at the home.
//!
//! * **The accepting shard** (here) verifies the login's token, then, instead of handing the
//!   connection to a home shard of this node, keeps it in [`Phase::Relaying`] and tells the
//!   home ([`RelayOpen`]). From then on it only translates: every frame the client sends is
//!   decoded by the connection's transport (TCP, WebSocket, UDP, with or without TLS) and
//!   forwarded to the home in the TCP framing ([`ShardMsg::RelayIn`]); every frame the home
//!   writes ([`ShardMsg::RelayOut`]) is written to the client in its transport's form. The
//!   login's answer, deliveries, syncs, everything the session says, come from the home.
//! * **The home** runs the session as a connection of its own, without a socket ([`home`]).
//! * **Flow control** both ways, a window of `limits.max_outbound_bytes` (the bound of one
//!   connection's queue): the accepting shard stops reading the client (the connection is
//!   held) while that much of its input is not taken by the home, and credits the home's
//!   output ([`ShardMsg::RelayAck`]) only once its own queue to the client is empty. So the
//!   accepting connection holds at most one window of output, within the same bound as any
//!   connection, and a slow client backs up into the home's queue, where the session's own
//!   limits (`Behind`, slow consumer) act as they do on any connection.
//! * **Frames** may be split across [`ShardMsg::RelayOut`]s (the home sends what the window
//!   takes): the accepting side reassembles them before writing each in its transport's form.
//! * **Endings.** The home ends the session with [`ShardMsg::RelayClose`] carrying its last
//!   words, which are written before the socket closes. A client gone here (closed, reset,
//!   timed out) ends the session at the home the same way. A link to the home that goes
//!   down closes the client's connection UNAVAILABLE (`super::remote`): the client logs in
//!   again, anywhere.

use bytes::{Bytes, BytesMut};
use parley_proto::pb;
use parley_proto::tcp::FrameCodec;
use parley_storage::Backend;
use prost::Message as _;

use super::ShardCore;
use super::conn::{ConnId, Phase};
use super::mail::{Origin, RelayOpen, ShardMsg};
use crate::auth::Identity;

mod home;
pub(crate) use home::Homes;

/// The accepting side of a relayed session.
#[derive(Debug)]
pub(crate) struct Relaying {
    /// The user's home shard (on another node).
    pub(crate) home: usize,
    /// Client bytes forwarded and not yet taken by the home.
    pub(crate) unacked_in: usize,
    /// Bytes of the home's output taken here and not yet credited back.
    pub(crate) owed_ack: usize,
    /// The start of a frame of the home's whose rest is still on its way.
    pub(crate) partial: BytesMut,
}

impl<B: Backend> ShardCore<B> {
    /// The login on `conn` is for a user homed on another node (shard `home`): the session
    /// is opened there, this connection relays to it from now on.
    pub(super) fn start_relay(
        &mut self,
        conn: ConnId,
        identity: Identity,
        request_id: u64,
        home: usize,
    ) {
        let from = self.origin(conn);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        c.phase = Phase::Relaying;
        // The home checks the frame limits of a session; here, frames up to the full limit
        // are passed on.
        c.transport.open_session();
        self.relays.insert(
            conn,
            Relaying {
                home,
                unacked_in: 0,
                owed_ack: 0,
                partial: BytesMut::new(),
            },
        );
        self.counters.relays_opened += 1;
        self.route(
            home,
            ShardMsg::RelayOpen(Box::new(RelayOpen {
                from,
                identity,
                request_id,
            })),
        );
    }

    /// A frame from the client of a relayed connection: on to the home.
    pub(super) fn relay_frame(&mut self, conn: ConnId, frame: &pb::Frame) {
        let from = self.origin(conn);
        let Some(r) = self.relays.get_mut(&conn) else {
            return;
        };
        let mut bytes = BytesMut::with_capacity(frame.encoded_len() + 5);
        if FrameCodec::new(usize::MAX)
            .encode_message(frame, &mut bytes)
            .is_err()
        {
            return;
        }
        r.unacked_in += bytes.len();
        let home = r.home;
        self.route(
            home,
            ShardMsg::RelayIn {
                from,
                bytes: bytes.freeze(),
            },
        );
    }

    /// Mail of a relayed session, for the accepting side.
    pub(super) fn on_relay_mail(&mut self, m: ShardMsg) {
        match m {
            ShardMsg::RelayOut { to, bytes } => self.on_relay_out(to, &bytes),
            ShardMsg::RelayAck {
                key,
                to_home: false,
                bytes,
            } => self.on_relay_ack(key, bytes),
            ShardMsg::RelayClose {
                key,
                to_home: false,
                last,
            } => self.on_relay_close(key, &last),
            home => self.on_relay_home_mail(home),
        }
    }

    /// Bytes the home wrote for the client of relayed connection `to` (TCP framing; a frame
    /// may continue in the next): each whole frame is written in the connection's transport.
    pub(super) fn on_relay_out(&mut self, to: Origin, bytes: &Bytes) {
        let Some(conn) = self.conn_of(to) else {
            return;
        };
        let Some(r) = self.relays.get_mut(&conn) else {
            return;
        };
        r.owed_ack += bytes.len();
        let mut rest = std::mem::take(&mut r.partial);
        rest.extend_from_slice(bytes);
        let mut codec = FrameCodec::new(usize::MAX);
        loop {
            match codec.decode(&mut rest) {
                Ok(Some(frame)) => self.write_encoded(conn, &frame),
                Ok(None) => break,
                Err(_) => {
                    // The home writes only frames it encoded: nothing to resync on.
                    debug_assert!(false, "a relayed session's output is not frames");
                    rest.clear();
                    break;
                }
            }
        }
        if let Some(r) = self.relays.get_mut(&conn) {
            r.partial = rest;
        }
        self.relay_credit(conn);
    }

    /// Credits the home with what it wrote, once this connection's queue to its client is
    /// empty (called again as the queue drains).
    pub(super) fn relay_credit(&mut self, conn: ConnId) {
        let from = self.origin(conn);
        let Some(queued) = self.live_conn_mut(conn).map(|c| c.out.len()) else {
            return;
        };
        let Some(r) = self.relays.get_mut(&conn) else {
            return;
        };
        if r.owed_ack == 0 || queued > 0 {
            return;
        }
        let bytes = u32::try_from(std::mem::take(&mut r.owed_ack)).unwrap_or(u32::MAX);
        let home = r.home;
        self.route(
            home,
            ShardMsg::RelayAck {
                key: from,
                to_home: true,
                bytes,
            },
        );
    }

    /// The home took `bytes` of the client's input: read more if the window allows.
    pub(super) fn on_relay_ack(&mut self, key: Origin, bytes: u32) {
        let Some(conn) = self.conn_of(key) else {
            return;
        };
        if let Some(r) = self.relays.get_mut(&conn) {
            r.unacked_in = r.unacked_in.saturating_sub(bytes as usize);
        }
        self.maybe_resume(conn);
    }

    /// The home ended the session: its last words, then the connection closes.
    pub(super) fn on_relay_close(&mut self, key: Origin, last: &Bytes) {
        let Some(conn) = self.conn_of(key) else {
            return;
        };
        self.on_relay_out(key, last);
        // Gone at the home: nothing to tell it when this side closes.
        self.relays.remove(&conn);
        self.close(conn, 0, None);
    }

    /// Whether relayed connection `conn`'s input window to the home is full (it is held until
    /// the home credits some).
    pub(super) fn relay_full(&self, conn: ConnId) -> bool {
        self.relays
            .get(&conn)
            .is_some_and(|r| r.unacked_in >= self.relay_window())
    }

    /// Bytes in flight each way on one relayed session, at most: the bound of one
    /// connection's queue (`limits.max_outbound_bytes`).
    pub(super) fn relay_window(&self) -> usize {
        self.cfg.max_outbound_bytes
    }

    /// A relayed connection is gone here: the session ends at its home.
    pub(super) fn relay_gone(&mut self, key: Origin, relay: &Relaying) {
        self.route(
            relay.home,
            ShardMsg::RelayClose {
                key,
                to_home: true,
                last: Bytes::new(),
            },
        );
    }
}
