//! The session's side of the core: frames decoded from a connection, dispatched by phase; login
//! (verify, then activate here or hand the connection to its user's home shard); sends checked
//! and routed to their conversation's owner; cumulative acks. The connection's own state and
//! limits are in [`super::conn`].

use std::sync::Arc;

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_storage::Backend;

use super::config::cost;
use super::conn::{self, ConnId, Phase, Who};
use super::conv::Conv;
use super::error::{CloseReason, Refusal};
use super::gate::{Gated, Parked};
use super::mail::{self, Adoption, ShardMsg};
use super::{Effect, ShardCore, bad_frame};
use crate::auth::Identity;
use crate::hooks::{
    AuthVerdict, GroupAttempt, Hooks, LoginAttempt, Reply, SendAttempt, SendVerdict, Verdict,
};
use crate::transport::{Inbound, Transport};

/// Bytes of a connection's budget a send holds until its ack (or refusal) comes back.
pub(super) const ACK_RESERVE: u32 = 64;

impl<B: Backend> ShardCore<B> {
    /// Decodes and handles what `conn`'s buffer holds: at most `limits.frames_per_turn` items,
    /// and nothing once the connection is at its budget (see [`super::conn`]).
    pub(super) fn decode(&mut self, conn: ConnId) {
        let budget = self.cfg.frames_per_turn;
        let mut items = 0;
        loop {
            let now = self.now.ms;
            let relay_full = self.relay_full(conn);
            let (cfg, counters) = (&self.cfg, &mut self.counters);
            let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
                return;
            };
            if c.id != conn || c.input == conn::Input::Parked {
                // A parked request holds everything behind it until its hook answers.
                return;
            }
            if c.over_budget(cfg) || relay_full {
                if c.input != conn::Input::Held {
                    counters.holds += 1;
                }
                c.input = conn::Input::Held;
                return;
            }
            if items >= budget {
                c.input = conn::Input::Backlog;
                return;
            }
            let before = c.out.len();
            let item = c.transport.decode(&mut c.inbuf, &mut c.out);
            let wrote = c.out.len() != before;
            let phase = c.phase;
            if wrote {
                self.mark_dirty(conn);
            }
            items += 1;
            match item {
                Ok(None) => {
                    if let Some(c) = self.live_conn_mut(conn) {
                        c.input = conn::Input::Open;
                    }
                    return;
                }
                Ok(Some(Inbound::Frame(frame))) => {
                    self.counters.frames_in += 1;
                    if let Some(c) = self.live_conn_mut(conn) {
                        c.heard(now);
                    }
                    self.on_frame(conn, frame);
                }
                Ok(Some(Inbound::Upgraded { token, origin, .. })) => {
                    if !self.origin_allowed(origin.as_deref()) {
                        self.counters.origins_refused += 1;
                        if let Some(c) = self.live_conn_mut(conn) {
                            // Take back the 101 the transport wrote; a 403 goes instead.
                            c.out.truncate(before);
                            c.transport.refuse_upgrade(
                                pb::ErrorCode::Forbidden,
                                "origin not allowed",
                                &mut c.out,
                            );
                        }
                        return self.close(conn, 0, None);
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
                    if phase == Phase::Active {
                        self.charge(conn, cost::REQUEST, 0, None);
                    }
                }
                Ok(Some(Inbound::PeerClosed { .. })) => return self.close(conn, 0, None),
                // The transport wrote the peer's last words.
                Err(e) if e.is_fatal() => {
                    self.counters.fatal_frames += 1;
                    return self.close(conn, 0, None);
                }
                // Nothing valid has been said yet: this is not a client of ours.
                Err(e) if phase == Phase::AwaitingLogin => {
                    self.counters.fatal_frames += 1;
                    return self.close(conn, 0, Some(CloseReason::Garbage(e)));
                }
                Err(e) => {
                    self.counters.bad_frames += 1;
                    self.refuse(conn, 0, 0, &bad_frame(&e));
                }
            }
        }
    }

    /// Whether a WebSocket upgrade from `origin` may go on (`listen.ws_allowed_origins`).
    fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let allowed = &self.cfg.ws_allowed_origins;
        match origin {
            _ if allowed.is_empty() => true,
            // Not a browser: the allow-list protects browsers' users from other sites.
            None => true,
            Some(o) => allowed.iter().any(|a| a == o),
        }
    }

    /// Takes `cost` request tokens from `conn`'s session; if there are too few, refuses the
    /// request (`request_id`, `refusal_for` names the send) and returns `false`.
    fn charge(
        &mut self,
        conn: ConnId,
        cost: u64,
        request_id: u64,
        refusal_for: Option<u64>,
    ) -> bool {
        let now = self.now.ms;
        let cfg = &self.cfg;
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return false;
        };
        if c.id != conn {
            return false;
        }
        let Some(who) = c.who.as_mut() else {
            return false;
        };
        match who.take_tokens(cost, cfg, now) {
            Ok(()) => true,
            Err(r) => {
                self.counters.rate_limited += 1;
                self.refuse(conn, request_id, refusal_for.unwrap_or(0), &r);
                false
            }
        }
    }

    pub(super) fn on_frame(&mut self, conn: ConnId, frame: pb::Frame) {
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let request_id = frame.request_id;
        let phase = c.phase;
        if phase == Phase::Relaying {
            return self.relay_frame(conn, &frame);
        }
        // A logged-in connection pays for every request first (matched by reference: the
        // frame's body is moved only once, into its handler).
        if phase == Phase::Active
            && let Some(body) = &frame.body
        {
            let (price, cmid) = match body {
                Body::DeliverAck(_) => (cost::ACK, None),
                Body::SyncRequest(_)
                | Body::HistoryRequest(_)
                | Body::ConversationListRequest(_)
                | Body::ReadCountsRequest(_) => (cost::READ, None),
                Body::Send(s) => (cost::REQUEST, Some(s.client_msg_id)),
                _ => (cost::REQUEST, None),
            };
            if !self.charge(conn, price, request_id, cmid) {
                return;
            }
        }
        let body = match (phase, frame.body) {
            (Phase::AwaitingLogin, Some(Body::Login(login))) => {
                return self.login(conn, request_id, login);
            }
            (Phase::AwaitingLogin, _) => {
                return self.close(conn, request_id, Some(CloseReason::LoginRequired));
            }
            (Phase::Active, None) => return self.refuse(conn, request_id, 0, &Refusal::NoBody),
            (Phase::Active, Some(body)) => body,
            // Passed on before this (`relay_frame`).
            (Phase::Relaying, _) => return,
        };
        match body {
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
            Body::Login(login) => self.refresh(conn, request_id, login),
            Body::PresenceRequest(req) => self.on_presence_request(conn, request_id, req),
            Body::GroupRequest(req) => self.on_group_request(conn, request_id, req),
            Body::RoomRequest(req) => self.on_room_request(conn, request_id, req),
            Body::Receipt(r) => self.on_receipt(conn, request_id, r),
            Body::ConversationListRequest(req) => {
                self.on_conversation_list_request(conn, request_id, req);
            }
            Body::ReadCountsRequest(req) => self.on_read_counts_request(conn, request_id, req),
            Body::Typing(t) => self.on_typing(conn, request_id, t),
            _ => self.refuse(conn, request_id, 0, &Refusal::ServerOnlyFrame),
        }
    }

    /// Verifies a login (asking the login gate first, if hooks gate logins): activates the
    /// connection here, or hands it to its user's home shard.
    pub(super) fn login(&mut self, conn: ConnId, request_id: u64, login: pb::Login) {
        if login.protocol_version != 0 && login.protocol_version != parley_proto::PROTOCOL_VERSION {
            self.counters.logins_refused += 1;
            return self.close(conn, request_id, Some(CloseReason::UnsupportedVersion));
        }
        self.gate_login(conn, request_id, login, false);
    }

    /// Asks the login gate about a login (or a `refresh`), if hooks gate logins, and goes on
    /// with its answer (now, or when it comes: [`super::gate`]).
    fn gate_login(&mut self, conn: ConnId, request_id: u64, login: pb::Login, refresh: bool) {
        if !self.gate.gates.authenticate {
            return self.auth_verdict(conn, request_id, &login, refresh, AuthVerdict::Builtin);
        }
        let parked = Parked::Login {
            request_id,
            login,
            refresh,
        };
        if let Gated::Now(v, Parked::Login { login, .. }) =
            self.call_gate(conn, parked, authenticate)
        {
            self.auth_verdict(conn, request_id, &login, refresh, v);
        }
    }

    /// Goes on with a login or refresh the gate (or no gate) answered.
    pub(super) fn auth_verdict(
        &mut self,
        conn: ConnId,
        request_id: u64,
        login: &pb::Login,
        refresh: bool,
        verdict: AuthVerdict,
    ) {
        if refresh {
            self.refresh_verdict(conn, request_id, login, verdict);
        } else {
            self.login_verdict(conn, request_id, login, verdict);
        }
    }

    /// Who a gate's answer (or the built-in verifier, for [`AuthVerdict::Builtin`]) says the
    /// connection is.
    fn identity_of(
        &self,
        login: &pb::Login,
        verdict: AuthVerdict,
    ) -> Result<Identity, CloseReason> {
        match verdict {
            AuthVerdict::Builtin => self.verify(&login.token),
            AuthVerdict::Accept(identity) => accepted(identity),
            AuthVerdict::Reject(reason) => Err(CloseReason::HookRejected(reason)),
        }
    }

    /// Goes on with a login the gate (or no gate) answered.
    fn login_verdict(
        &mut self,
        conn: ConnId,
        request_id: u64,
        login: &pb::Login,
        verdict: AuthVerdict,
    ) {
        let identity = match self.identity_of(login, verdict) {
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
        if self.placement.local(home).is_none() {
            return self.start_relay(conn, identity, request_id, home);
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

    /// Verifies a token now: who it names, unless it is refused or valid for longer than
    /// `auth.max_token_lifetime_secs`.
    fn verify(&self, token: &str) -> Result<Identity, CloseReason> {
        let unix_secs = u64::try_from(self.now.unix_ms / 1000).unwrap_or(0);
        let identity = self
            .verifier
            .verify(token, unix_secs)
            .map_err(CloseReason::Auth)?;
        if identity.expires_at > unix_secs.saturating_add(self.cfg.max_token_lifetime_secs) {
            return Err(CloseReason::TokenLifetime);
        }
        Ok(identity)
    }

    /// A fresh `Login` on a logged-in connection: with a valid token for the same user and
    /// device, the session's expiry moves to the new token's; otherwise it is refused and the
    /// session goes on as it was.
    fn refresh(&mut self, conn: ConnId, request_id: u64, login: pb::Login) {
        self.gate_login(conn, request_id, login, true);
    }

    /// Goes on with a refresh the gate (or no gate) answered.
    fn refresh_verdict(
        &mut self,
        conn: ConnId,
        request_id: u64,
        login: &pb::Login,
        verdict: AuthVerdict,
    ) {
        let identity = match self.identity_of(login, verdict) {
            Ok(identity) => identity,
            Err(CloseReason::Auth(e)) => {
                return self.refuse(conn, request_id, 0, &Refusal::RefreshToken(e));
            }
            Err(CloseReason::HookRejected(reason)) => {
                return self.refuse(conn, request_id, 0, &Refusal::Denied(reason));
            }
            Err(_) => return self.refuse(conn, request_id, 0, &Refusal::RefreshTokenLifetime),
        };
        let (now, unix_ms) = (self.now.ms, self.now.unix_ms);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let Some(who) = c.who.as_mut() else {
            return;
        };
        if *who.device.user != *identity.user || *who.device.device != *identity.device {
            return self.refuse(conn, request_id, 0, &Refusal::RefreshOtherIdentity);
        }
        who.expires_ms = conn::expiry_ms(identity.expires_at, now, unix_ms);
        self.counters.token_refreshes += 1;
        let result = self.login_result(&identity);
        self.write_frame(
            conn,
            &pb::Frame {
                request_id,
                body: Some(Body::LoginResult(result)),
            },
        );
        self.arm(conn);
    }

    /// The answer to a login of `identity`.
    fn login_result(&self, identity: &Identity) -> pb::LoginResult {
        pb::LoginResult {
            protocol_version: parley_proto::PROTOCOL_VERSION,
            user: identity.user.clone(),
            device: identity.device.clone(),
            node: self.cfg.node.clone(),
            server_time: self.now.unix_ms,
            heartbeat_interval_ms: self.cfg.heartbeat_ms.min(u64::from(u32::MAX)) as u32,
            idle_timeout_ms: self.cfg.idle_ms.min(u64::from(u32::MAX)) as u32,
            max_frame_bytes: self.cfg.max_frame_bytes,
            udp_session_id: 0,
            udp_session_key: Vec::new(),
            token_expires_at: identity.expires_at,
        }
    }

    pub(super) fn activate(&mut self, conn: ConnId, identity: Identity, request_id: u64) {
        self.activate_as(conn, identity, request_id, false, false);
    }

    /// Logs `conn` in as `identity`; `trusted`: an in-process connection of the application;
    /// `service`: one that is not among the user's devices (see
    /// [`ShardCore::handle_open_local`]). In a cluster, a device's login waits for its route
    /// ([`super::route`]); a trusted one registers it without waiting.
    pub(super) fn activate_as(
        &mut self,
        conn: ConnId,
        identity: Identity,
        request_id: u64,
        trusted: bool,
        service: bool,
    ) {
        if service {
            return self.activate_now(conn, identity, request_id, trusted, service);
        }
        if trusted {
            let (user, device) = (
                identity.user.as_str().into(),
                identity.device.as_str().into(),
            );
            self.activate_now(conn, identity, request_id, trusted, service);
            return self.route_without_waiting(conn, &user, &device);
        }
        if !self.settled {
            // Its home would answer from an inbox the other nodes have not filled in yet.
            self.counters.logins_refused += 1;
            let reason = CloseReason::Starting {
                retry_after_ms: super::remote::STARTING_RETRY_MS,
            };
            return self.close(conn, request_id, Some(reason));
        }
        if self.park_for_route(conn, identity.clone(), request_id) {
            return;
        }
        self.activate_now(conn, identity, request_id, trusted, service);
    }

    /// Logs `conn` in as `identity` now (see [`ShardCore::activate_as`]).
    pub(super) fn activate_now(
        &mut self,
        conn: ConnId,
        identity: Identity,
        request_id: u64,
        trusted: bool,
        service: bool,
    ) {
        let mut who = Who::new(&identity, &self.cfg, self.now.ms, self.now.unix_ms);
        who.trusted = trusted;
        who.service = service;
        if !service {
            // The same user and device logging in again replaces the old connection.
            for old in self.home.register(&who.device, conn) {
                if old != conn {
                    self.close(old, 0, Some(CloseReason::Replaced));
                }
            }
            if let Some(h) = self.gate.observer() {
                h.connected(&crate::hooks::DeviceEvent {
                    user: identity.user.clone(),
                    device: identity.device.clone(),
                });
                let first = self
                    .home
                    .users
                    .get(identity.user.as_str())
                    .is_some_and(|u| u.devices.len() == 1);
                if first {
                    h.presence_changed(&crate::hooks::PresenceChange {
                        user: identity.user.clone(),
                        online: true,
                    });
                }
            }
        }
        let result = self.login_result(&identity);
        let (now, shard) = (self.now.ms, self.index);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let user = Arc::clone(&who.device.user);
        // Who, never the token.
        tracing::debug!(
            shard,
            %conn,
            user = &*identity.user,
            device = &*identity.device,
            "connection logged in"
        );
        c.activate(who, now);
        self.counters.logins += 1;
        if !service {
            self.presence_changed(&user);
        }
        self.write_frame(
            conn,
            &pb::Frame {
                request_id,
                body: Some(Body::LoginResult(result)),
            },
        );
    }

    pub(super) fn on_send(&mut self, conn: ConnId, request_id: u64, send: pb::Send) {
        if send
            .to
            .as_ref()
            .is_some_and(|v| v.r#type == pb::ConversationType::Room as i32)
        {
            return self.on_room_send(conn, request_id, send);
        }
        let cfg = Arc::clone(&self.cfg);
        let gate_sends = self.gate.gates.send;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let trusted = c.who.as_ref().is_some_and(|w| w.trusted);
        let checked = conn::check_send(&send, &cfg, trusted);
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
        if !gate_sends || trusted {
            return self.route_send(conn, request_id, send, conv);
        }
        let Some(device) = self
            .live_conn_mut(conn)
            .and_then(|c| c.who.as_ref().map(|w| w.device.clone()))
        else {
            return;
        };
        let parked = Parked::Send {
            request_id,
            send,
            conv,
        };
        let gated = self.call_gate(conn, parked, |h, p, reply| {
            if let Parked::Send { send, conv, .. } = p {
                let cref = super::gate::conversation_ref(conv);
                let attempt = SendAttempt {
                    user: &device.user,
                    device: &device.device,
                    conversation: &cref,
                    body: &send.body,
                    client_msg_id: send.client_msg_id,
                };
                h.check_send(&attempt, reply);
            }
        });
        if let Gated::Now(v, Parked::Send { send, conv, .. }) = gated {
            self.send_verdict(conn, request_id, send, conv, v);
        }
    }

    /// Goes on with a send the gate answered.
    pub(super) fn send_verdict(
        &mut self,
        conn: ConnId,
        request_id: u64,
        mut send: pb::Send,
        conv: Arc<Conv>,
        verdict: SendVerdict,
    ) {
        match verdict {
            SendVerdict::Allow => {}
            SendVerdict::Rewrite(body) => {
                if body.len() > self.cfg.max_body_bytes {
                    return self.refuse(
                        conn,
                        request_id,
                        send.client_msg_id,
                        &Refusal::BodyTooLarge,
                    );
                }
                send.body = body;
            }
            SendVerdict::Deny(reason) => {
                self.counters.hooks_denied += 1;
                return self.refuse(
                    conn,
                    request_id,
                    send.client_msg_id,
                    &Refusal::Denied(reason),
                );
            }
        }
        self.route_send(conn, request_id, send, conv);
    }

    /// Sends a checked send to its conversation's owner.
    fn route_send(&mut self, conn: ConnId, request_id: u64, send: pb::Send, conv: Arc<Conv>) {
        let now = self.now;
        let origin = self.origin(conn);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let Some(sender) = c.who.as_ref().map(|w| w.device.clone()) else {
            return;
        };
        // Room for the ack in the connection's budget, until it comes back.
        c.reserve(ACK_RESERVE);
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
                arrived_us: now.us,
            })),
        );
    }

    /// A `GroupRequest`: checked here, decided by the group's owner shard.
    pub(super) fn on_group_request(
        &mut self,
        conn: ConnId,
        request_id: u64,
        req: pb::GroupRequest,
    ) {
        let gate_groups = self.gate.gates.group;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let Some(who) = c.who.as_mut() else {
            return;
        };
        if gate_groups && !who.trusted {
            let device = who.device.clone();
            let parked = Parked::Group { request_id, req };
            let gated = self.call_gate(conn, parked, |h, p, reply| {
                if let Parked::Group { req, .. } = p {
                    let action = pb::GroupAction::try_from(req.action).map_or_else(
                        |_| String::from("unknown"),
                        |a| a.as_str_name().to_ascii_lowercase(),
                    );
                    let attempt = GroupAttempt {
                        user: &device.user,
                        group: &req.group_id,
                        action: &action,
                        members: &req.members,
                    };
                    h.check_group(&attempt, reply);
                }
            });
            if let Gated::Now(v, Parked::Group { req, .. }) = gated {
                self.group_verdict(conn, request_id, req, v);
            }
            return;
        }
        self.route_group_request(conn, request_id, req);
    }

    /// Goes on with a group request the gate answered.
    pub(super) fn group_verdict(
        &mut self,
        conn: ConnId,
        request_id: u64,
        req: pb::GroupRequest,
        verdict: Verdict,
    ) {
        match verdict {
            Verdict::Allow => self.route_group_request(conn, request_id, req),
            Verdict::Deny(reason) => {
                self.counters.hooks_denied += 1;
                self.refuse(conn, request_id, 0, &Refusal::Denied(reason));
            }
        }
    }

    /// Sends a group request to the group's owner.
    fn route_group_request(&mut self, conn: ConnId, request_id: u64, req: pb::GroupRequest) {
        let unix_ms = self.now.unix_ms;
        let origin = self.origin(conn);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let Some(who) = c.who.as_mut() else {
            return;
        };
        let view = pb::Conversation {
            r#type: pb::ConversationType::Group as i32,
            id: req.group_id.clone(),
        };
        let Some(conv) = who.conv(&view) else {
            return self.refuse(
                conn,
                request_id,
                0,
                &Refusal::BadGroupRequest("group_id must be 1..=128 bytes".into()),
            );
        };
        let actor = who.device.clone();
        // Room for the answer in the connection's budget, until it comes back.
        c.reserve(ACK_RESERVE);
        let owner = self.placement.owner(conv.id);
        self.route(
            owner,
            ShardMsg::Group(Box::new(mail::GroupOp {
                origin,
                request_id,
                actor,
                conv,
                req,
                unix_ms,
            })),
        );
    }

    pub(super) fn on_deliver_ack(&mut self, conn: ConnId, ack: pb::DeliverAck) {
        let now = self.now.ms;
        let (cfg, timers, home) = (&self.cfg, &mut self.timers, &mut self.home);
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        let Some(who) = c.who.as_mut() else {
            return;
        };
        for cursor in ack.acks {
            if let Some(conv) = cursor.conversation.as_ref().and_then(|v| who.conv(v)) {
                c.delivery.ack(conv.id, cursor.seq, now, cfg, timers, conn);
                // The user's delivery cursor follows its devices' acks.
                if let Some(e) = home.entry_mut(&who.device.user, conv.id) {
                    e.cursors.delivered = e.cursors.delivered.max(cursor.seq);
                }
            }
        }
    }
}

/// The login gate, for a parked login.
fn authenticate(h: &dyn Hooks, p: &Parked, reply: Reply<AuthVerdict>) {
    if let Parked::Login { login, .. } = p {
        let attempt = LoginAttempt {
            token: &login.token,
            client_name: &login.client_name,
        };
        h.authenticate(&attempt, reply);
    }
}

/// An identity a login gate accepted, held to the limits a token's would be (an `expires_at` of
/// 0: the session does not expire).
fn accepted(mut identity: Identity) -> Result<Identity, CloseReason> {
    use crate::auth::{MAX_DEVICE_BYTES, MAX_USER_BYTES};
    if identity.user.is_empty()
        || identity.user.len() > MAX_USER_BYTES
        || identity.device.is_empty()
        || identity.device.len() > MAX_DEVICE_BYTES
    {
        return Err(CloseReason::HookRejected(
            "the login hook accepted an identity with an empty or too long user or device".into(),
        ));
    }
    if identity.expires_at == 0 {
        identity.expires_at = u64::MAX / 1000;
    }
    Ok(identity)
}
