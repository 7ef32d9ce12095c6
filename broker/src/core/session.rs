//! The session's side of the core: frames decoded from a connection, dispatched by phase; login
//! (verify, then activate here or hand the connection to its user's home shard); sends checked
//! and routed to their conversation's owner; cumulative acks. The connection's own state and
//! limits are in [`super::conn`].

use std::sync::Arc;

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_storage::Backend;

use super::conn::{self, ConnId, Phase, Who};
use super::error::{CloseReason, Refusal};
use super::mail::{self, Adoption, ShardMsg};
use super::{Effect, ShardCore, bad_frame};
use crate::transport::{Inbound, Transport};

impl<B: Backend> ShardCore<B> {
    /// Decodes and handles everything `conn`'s buffer holds.
    pub(super) fn decode(&mut self, conn: ConnId) {
        loop {
            let now = self.now.ms;
            let Some(c) = self.live_conn_mut(conn) else {
                return;
            };
            let before = c.out.len();
            let item = c.transport.decode(&mut c.inbuf, &mut c.out);
            let wrote = c.out.len() != before;
            let phase = c.phase;
            if wrote {
                self.mark_dirty(conn);
            }
            match item {
                Ok(None) => return,
                Ok(Some(Inbound::Frame(frame))) => {
                    self.counters.frames_in += 1;
                    if let Some(c) = self.live_conn_mut(conn) {
                        c.heard(now);
                    }
                    self.on_frame(conn, frame);
                }
                Ok(Some(Inbound::Upgraded { token, .. })) => {
                    if let Some(c) = self.live_conn_mut(conn) {
                        c.heard(now);
                    }
                    if let Some(token) = token {
                        let login = pb::Login {
                            protocol_version: parley_proto::PROTOCOL_VERSION,
                            token,
                            client_name: String::new(),
                        };
                        self.login(conn, 0, login);
                    }
                }
                Ok(Some(Inbound::Liveness)) => {
                    if let Some(c) = self.live_conn_mut(conn) {
                        c.heard(now);
                    }
                }
                Ok(Some(Inbound::PeerClosed { .. })) => return self.close(conn, 0, None),
                // The transport wrote the peer's last words.
                Err(e) if e.is_fatal() => return self.close(conn, 0, None),
                // Nothing valid has been said yet: this is not a client of ours.
                Err(e) if phase == Phase::AwaitingLogin => {
                    return self.close(conn, 0, Some(CloseReason::Garbage(e)));
                }
                Err(e) => self.refuse(conn, 0, 0, &bad_frame(&e)),
            }
        }
    }

    pub(super) fn on_frame(&mut self, conn: ConnId, frame: pb::Frame) {
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let request_id = frame.request_id;
        match (c.phase, frame.body) {
            (Phase::AwaitingLogin, Some(Body::Login(login))) => self.login(conn, request_id, login),
            (Phase::AwaitingLogin, _) => {
                self.close(conn, request_id, Some(CloseReason::LoginRequired));
            }
            (Phase::Active, None) => self.refuse(conn, request_id, 0, &Refusal::NoBody),
            (Phase::Active, Some(body)) => match body {
                Body::Ping(ping) => self.write_frame(
                    conn,
                    &pb::Frame {
                        request_id,
                        body: Some(Body::Pong(pb::Pong {
                            nonce: ping.nonce,
                            time: 0,
                        })),
                    },
                ),
                Body::Pong(_) => {}
                Body::Send(send) => self.on_send(conn, request_id, send),
                Body::DeliverAck(ack) => self.on_deliver_ack(conn, ack),
                Body::SyncRequest(req) => self.on_sync_request(conn, request_id, req),
                Body::HistoryRequest(req) => self.on_history_request(conn, request_id, req),
                Body::Login(_) => self.refuse(conn, request_id, 0, &Refusal::AlreadyLoggedIn),
                Body::PresenceRequest(_) => {
                    self.refuse(
                        conn,
                        request_id,
                        0,
                        &Refusal::NotAvailable("presence queries"),
                    );
                }
                Body::GroupRequest(_) => {
                    self.refuse(conn, request_id, 0, &Refusal::NotAvailable("groups"));
                }
                Body::RoomRequest(_) => {
                    self.refuse(conn, request_id, 0, &Refusal::NotAvailable("rooms"));
                }
                Body::Receipt(_) => {
                    self.refuse(conn, request_id, 0, &Refusal::NotAvailable("receipts"));
                }
                _ => self.refuse(conn, request_id, 0, &Refusal::ServerOnlyFrame),
            },
        }
    }

    /// Verifies a login: activates the connection here, or hands it to its user's home shard.
    pub(super) fn login(&mut self, conn: ConnId, request_id: u64, login: pb::Login) {
        let unix_secs = (self.now.unix_ms / 1000).max(0) as u64;
        let verdict = if login.protocol_version != 0
            && login.protocol_version != parley_proto::PROTOCOL_VERSION
        {
            Err(CloseReason::UnsupportedVersion)
        } else {
            self.verifier
                .verify(&login.token, unix_secs)
                .map_err(CloseReason::Auth)
        };
        let identity = match verdict {
            Ok(identity) => identity,
            Err(reason) => {
                self.counters.logins_refused += 1;
                return self.close(conn, request_id, Some(reason));
            }
        };
        let home = self.placement.home(&identity.user);
        if home == self.index {
            return self.activate(conn, identity, request_id);
        }
        if let Some(mut c) = self.remove(conn) {
            let adoption = Box::new(Adoption {
                transport: std::mem::replace(&mut c.transport, Transport::tcp(self.limits)),
                inbuf: std::mem::take(&mut c.inbuf),
                out: std::mem::take(&mut c.out),
                identity,
                request_id,
            });
            self.effects.push(Effect::Handover {
                conn,
                to: home,
                adoption,
            });
        }
    }

    pub(super) fn activate(
        &mut self,
        conn: ConnId,
        identity: crate::auth::Identity,
        request_id: u64,
    ) {
        let who = Who::new(identity);
        // The same user and device logging in again replaces the old connection.
        for old in self.home.register(&who.device, conn) {
            if old != conn {
                self.close(old, 0, Some(CloseReason::Replaced));
            }
        }
        let result = pb::LoginResult {
            protocol_version: parley_proto::PROTOCOL_VERSION,
            user: String::from(&*who.device.user),
            device: String::from(&*who.device.device),
            node: self.cfg.node.clone(),
            server_time: self.now.unix_ms,
            heartbeat_interval_ms: self.cfg.heartbeat_ms.min(u64::from(u32::MAX)) as u32,
            idle_timeout_ms: self.cfg.idle_ms.min(u64::from(u32::MAX)) as u32,
            max_frame_bytes: self.cfg.max_frame_bytes,
            udp_session_id: 0,
            udp_session_key: Vec::new(),
        };
        let now = self.now.ms;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        c.activate(who, now);
        self.counters.logins += 1;
        self.write_frame(
            conn,
            &pb::Frame {
                request_id,
                body: Some(Body::LoginResult(result)),
            },
        );
    }

    pub(super) fn on_send(&mut self, conn: ConnId, request_id: u64, send: pb::Send) {
        let cfg = Arc::clone(&self.cfg);
        let now = self.now;
        let origin = self.origin(conn);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let checked = c
            .take_send_token(&cfg, now.ms)
            .and_then(|()| conn::check_send(&send, &cfg));
        let conv = checked.and_then(|()| {
            c.who
                .as_mut()
                .and_then(|w| send.to.as_ref().and_then(|v| w.conv(v)))
                .ok_or(Refusal::BadRecipient)
        });
        let conv = match conv {
            Ok(conv) => conv,
            Err(r) => return self.refuse(conn, request_id, send.client_msg_id, &r),
        };
        let Some(sender) = c.who.as_ref().map(|w| w.device.clone()) else {
            return;
        };
        let owner = self.placement.owner(conv.id);
        self.route(
            owner,
            ShardMsg::Append(Box::new(mail::Append {
                origin,
                request_id,
                sender,
                conv,
                send,
                unix_ms: now.unix_ms,
            })),
        );
    }

    pub(super) fn on_deliver_ack(&mut self, conn: ConnId, ack: pb::DeliverAck) {
        let now = self.now.ms;
        let (cfg, timers) = (&self.cfg, &mut self.timers);
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        let Some(who) = c.who.as_mut() else {
            return;
        };
        for cursor in ack.acks {
            if let Some(conv) = cursor.conversation.as_ref().and_then(|v| who.conv(v)) {
                c.delivery.ack(conv.id, cursor.seq, now, cfg, timers, conn);
            }
        }
    }
}
