//! The driver's side of UDP sessions ([`super::super::udp`]): reading the shard's socket,
//! logins and retries, opening data datagrams into the core, packing the core's output into
//! paced datagrams, closes and handovers. A child of the driver, so it works on its tables.

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use parley_proto::pb::{self, frame::Body};
use parley_proto::tcp::{self, Check};
use parley_proto::udp::{
    self, Accepted, DatagramBuilder, DatagramType, Direction, HEADER_LEN, MAX_DATAGRAM_BYTES,
    TAG_LEN, UdpError,
};

use super::super::udp::{
    LAST_WORDS_DATAGRAMS, LoginAt, Pacer, PendingLogin, RECV_BUDGET, Session, SessionId,
};
use super::{Driver, Intake, Mail};
use crate::core::{Adoption, ConnId, Now};
use crate::loglimit::LogKind;

/// The largest frame a datagram can carry (one frame alone in the largest datagram).
pub(crate) const MAX_UDP_FRAME_BYTES: usize = MAX_DATAGRAM_BYTES - HEADER_LEN - TAG_LEN - 5;

/// A UDP session moving to its home shard with its login.
#[derive(Debug)]
pub(crate) struct Moving {
    peer: SocketAddr,
    login: Box<PendingLogin>,
}

/// The next whole frame at the start of `buf`: (prefix length, frame length). The core writes
/// whole frames only.
fn next_frame(buf: &[u8]) -> Option<(usize, usize)> {
    match tcp::check(buf, usize::MAX >> 1) {
        Ok(Check::Ready {
            prefix_len,
            frame_len,
        }) => Some((prefix_len, frame_len)),
        _ => None,
    }
}

impl Driver {
    /// The UDP session of `conn`, if it is one.
    pub(super) fn udp_session(&self, conn: ConnId) -> Option<&Session> {
        self.udp
            .as_ref()?
            .sessions
            .get(conn.slot as usize)?
            .as_ref()
            .filter(|s| s.generation == conn.generation)
    }

    fn udp_session_mut(&mut self, conn: ConnId) -> Option<&mut Session> {
        self.udp
            .as_mut()?
            .sessions
            .get_mut(conn.slot as usize)?
            .as_mut()
            .filter(|s| s.generation == conn.generation)
    }

    /// Puts a session into the table at its connection's slot.
    fn put_udp_session(&mut self, conn: ConnId, session: Session) {
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        let slot = conn.slot as usize;
        if udp.sessions.len() <= slot {
            udp.sessions.resize_with(slot + 1, || None);
        }
        udp.sessions[slot] = Some(session);
        udp.counts.sessions += 1;
    }

    /// Takes a session out of the table (it closes or moves).
    fn take_udp_session(&mut self, conn: ConnId) -> Option<Session> {
        self.udp_session(conn)?;
        let udp = self.udp.as_mut()?;
        let session = udp.sessions.get_mut(conn.slot as usize)?.take()?;
        udp.counts.sessions = udp.counts.sessions.saturating_sub(1);
        if let Some(login) = &session.login {
            udp.logins.remove(&(session.peer, login.nonce));
        }
        Some(session)
    }

    /// Reads the socket's datagrams, at most [`RECV_BUDGET`] this turn.
    pub(super) fn udp_read(&mut self, now: Now) {
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        udp.more = false;
        let mut buf = std::mem::take(&mut udp.recv);
        for _ in 0..RECV_BUDGET {
            let Some(udp) = self.udp.as_mut() else {
                break;
            };
            match udp.socket.recv_from(&mut buf) {
                Ok((len, from)) => {
                    udp.counts.received += 1;
                    let datagram = buf.get(..len).unwrap_or_default();
                    self.udp_datagram(datagram, from, now);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(udp) = self.udp.as_mut() {
                        udp.recv = buf;
                    }
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // An ICMP error of an earlier send surfaces here; the next read goes on.
                Err(_) => {}
            }
        }
        if let Some(udp) = self.udp.as_mut() {
            udp.recv = buf;
            // Edge-triggered: what is left raises no new event; read again next turn.
            udp.more = true;
        }
    }

    /// One datagram from `from`, received here or passed on by another shard.
    pub(super) fn udp_datagram(&mut self, datagram: &[u8], from: SocketAddr, now: Now) {
        let Ok(header) = udp::peek_header(datagram) else {
            return self.udp_drop();
        };
        match header.kind {
            DatagramType::Login => self.udp_login(datagram, from, now),
            DatagramType::ClientData => self.udp_data(datagram, header.session_id, from, now),
            DatagramType::LoginReply | DatagramType::ServerData | DatagramType::Retry => {
                self.udp_drop()
            }
        }
    }

    fn udp_drop(&mut self) {
        if let Some(udp) = self.udp.as_mut() {
            udp.counts.dropped += 1;
        }
    }

    /// Sends one datagram now (no pacing: retries, login replies, last words); a full socket
    /// drops it (the client asks again).
    fn udp_send_now(&mut self, datagram: &[u8], to: SocketAddr) {
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        match udp.socket.send_to(datagram, to) {
            Ok(_) => udp.counts.sent += 1,
            Err(_) => udp.counts.dropped += 1,
        }
    }

    /// A LOGIN: a RETRY unless its cookie is good; a login already under way is answered as
    /// before; otherwise a new session, fed its `Login`.
    fn udp_login(&mut self, datagram: &[u8], from: SocketAddr, now: Now) {
        let Ok(opened) = udp::open_login(datagram) else {
            // Unpadded or malformed: never answered (it could amplify).
            return self.udp_drop();
        };
        let (cookie, nonce, limit) = (
            opened.header.session_id,
            opened.header.packet_number,
            opened.datagram_len,
        );
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        if !udp.cookies.check(from, nonce, cookie, now.ms) {
            let fresh = udp.cookies.mint(from, nonce, now.ms);
            let mut out = BytesMut::with_capacity(udp::RETRY_LEN);
            if udp::seal_retry(fresh, nonce, &mut out).is_ok() {
                udp.counts.retries += 1;
                self.udp_send_now(&out, from);
            }
            return;
        }
        match udp.logins.get(&(from, nonce)) {
            Some(LoginAt::Here(conn)) => {
                // The same login again: its reply was lost or is not made yet.
                let reply: Option<Box<[u8]>> = self
                    .udp_session(conn)
                    .and_then(|s| s.login.as_ref())
                    .and_then(|l| l.reply.as_ref())
                    .cloned();
                if let Some(reply) = reply {
                    self.udp_send_now(&reply, from);
                }
                return;
            }
            Some(LoginAt::Shard(to)) if to != self.index => {
                self.udp_forward(to, datagram, from);
                return;
            }
            _ => {}
        }
        if self.shutdown_deadline.is_some() {
            return self.udp_drop();
        }
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        let frame_end = datagram
            .get(HEADER_LEN..)
            .and_then(next_frame)
            .map(|(p, f)| HEADER_LEN + p + f);
        let Some(login_bytes) = frame_end.and_then(|end| datagram.get(HEADER_LEN..end)) else {
            return self.udp_drop();
        };
        if !udp.admit() {
            let refusal = pb::Frame {
                request_id: 0,
                body: Some(Body::Error(pb::Error {
                    code: pb::ErrorCode::TooManyConnections as i32,
                    message: format!("this node holds udp.max_sessions = {}", udp.max_sessions),
                    fatal: true,
                    ..Default::default()
                })),
            };
            let mut out = BytesMut::new();
            if udp::seal_login_reply(0, nonce, &refusal, limit, &mut out).is_ok() {
                self.udp_send_now(&out, from);
            }
            return;
        }
        let conn = self.core.handle_open(false, None, now);
        let session = Session {
            generation: conn.generation,
            id: 0,
            key: [0; udp::SESSION_KEY_LEN],
            peer: from,
            window: udp::ReplayWindow::new(),
            next_packet: 0,
            pacer: Pacer::new(udp.pacing, now.ms),
            login: Some(Box::new(PendingLogin {
                nonce,
                limit,
                reply: None,
            })),
            paced: false,
            blocked: false,
        };
        let expires = now.ms + udp.login_ms;
        udp.logins
            .insert((from, nonce), LoginAt::Here(conn), expires);
        self.put_udp_session(conn, session);
        self.core.handle_bytes(conn, login_bytes, now);
        self.apply_effects(now);
    }

    /// Passes a datagram to the shard its session lives on.
    fn udp_forward(&mut self, to: usize, datagram: &[u8], from: SocketAddr) {
        if let Some(udp) = self.udp.as_mut() {
            udp.counts.forwarded += 1;
        }
        self.post(
            to,
            Mail::Datagram {
                bytes: Bytes::copy_from_slice(datagram),
                from,
            },
        );
    }

    /// A data datagram: authenticated, new, then its frames go to the core.
    fn udp_data(&mut self, datagram: &[u8], id: u64, from: SocketAddr, now: Now) {
        let id = SessionId(id);
        match id.shard() {
            Some(shard) if shard == self.index => {}
            Some(shard) if shard < self.peers.len() => {
                return self.udp_forward(shard, datagram, from);
            }
            _ => return self.udp_drop(),
        }
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        let slot = id.slot();
        let Some(session) = udp
            .sessions
            .get_mut(slot)
            .and_then(Option::as_mut)
            .filter(|s| s.id == id.0 && id.matches(s.generation))
        else {
            udp.counts.dropped += 1;
            return;
        };
        let conn = ConnId {
            slot: slot as u32,
            generation: session.generation,
        };
        let opened = match udp::open(&session.session_key(), datagram, Direction::ClientToServer) {
            Ok(opened) => opened,
            Err(_) => {
                udp.counts.dropped += 1;
                return;
            }
        };
        if session.window.check(opened.header.packet_number).is_err() {
            udp.counts.dropped += 1;
            return;
        }
        // Input the core cannot take now is dropped before it counts as received: the client's
        // retry (a new packet number) gets in later. Input buffered before it (e.g. after a
        // login that waited for a hook or its route) is decoded first, in order, so a datagram
        // right behind such a login is taken, not dropped.
        if self.core.intake(conn) == Some(Intake::Pending) {
            self.core.handle_continue(conn, now);
        }
        match self.core.intake(conn) {
            Some(Intake::Read) => {}
            Some(Intake::Pending) => {
                udp.counts.dropped += 1;
                self.ready.push(conn);
                return;
            }
            _ => {
                udp.counts.dropped += 1;
                return;
            }
        }
        if let Some(login) = session.login.take() {
            // The client has its session: a LOGIN sent again is a new login from now on.
            udp.logins.remove(&(session.peer, login.nonce));
        }
        let accepted = session.window.accept(opened.header.packet_number);
        if accepted == Ok(Accepted::Newest) && session.peer != from {
            // NAT rebinding: an authenticated, newest datagram from elsewhere moves the session.
            session.peer = from;
            udp.counts.migrations += 1;
        }
        let frames = datagram
            .get(HEADER_LEN..datagram.len() - TAG_LEN)
            .unwrap_or_default();
        self.core.handle_bytes(conn, frames, now);
        if self.core.intake(conn) == Some(Intake::Pending) {
            self.ready.push(conn);
        }
    }

    /// Serves a UDP session's buffered input (it has no socket to read: datagrams come in
    /// through [`Self::udp_read`]).
    pub(super) fn service_udp(&mut self, conn: ConnId, now: Now) {
        let mut handled = false;
        loop {
            match self.core.intake(conn) {
                None => return self.apply_effects(now),
                Some(Intake::Hold | Intake::Read) => return,
                Some(Intake::Pending) if handled => return self.ready.push(conn),
                Some(Intake::Pending) => {
                    self.core.handle_continue(conn, now);
                    handled = true;
                }
            }
        }
    }

    /// Sends a session's queued output: its login's answer first, then data datagrams packed up
    /// to `udp.max_datagram_bytes`, as pacing and the socket allow.
    pub(super) fn transmit_udp(&mut self, conn: ConnId, now: Now) {
        let index = self.index;
        let Driver { core, udp, .. } = self;
        let Some(udp) = udp.as_mut() else {
            return;
        };
        let Some(session) = udp
            .sessions
            .get_mut(conn.slot as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.generation == conn.generation)
        else {
            return;
        };
        let Some(buf) = core.outbound(conn) else {
            return;
        };
        if buf.is_empty() {
            return;
        }
        let mut progressed = false;
        if session.login.as_ref().is_some_and(|l| l.reply.is_none()) {
            // The first frame out answers the login.
            let Some((prefix, len)) = next_frame(buf) else {
                return;
            };
            let raw = buf.split_to(prefix + len).freeze().slice(prefix..);
            progressed = true;
            let reply = login_reply(session, index, conn, raw);
            if let (Some(reply), Some(login)) = (reply, session.login.as_mut()) {
                match udp.socket.send_to(&reply, session.peer) {
                    Ok(_) => udp.counts.sent += 1,
                    Err(_) => udp.counts.dropped += 1,
                }
                login.reply = Some(reply.to_vec().into_boxed_slice());
            }
        }
        if session.id == 0 {
            // No session to send in (a refused login's leftovers): dropped with it.
            buf.clear();
            core.handle_written(conn, progressed, now);
            return;
        }
        let key = session.session_key();
        let max = udp.max_datagram;
        let mut too_large = None;
        while !buf.is_empty() {
            if udp.blocked {
                if !session.blocked {
                    session.blocked = true;
                    udp.waiting.push(conn);
                }
                break;
            }
            let tokens = session.pacer.refill(udp.pacing, now.ms) as usize;
            let need = max.min(buf.len() + HEADER_LEN + TAG_LEN);
            if tokens < need {
                if !session.paced {
                    session.paced = true;
                    let wait = session.pacer.wait_ms(udp.pacing, need);
                    udp.paced.push(std::cmp::Reverse((now.ms + wait, conn)));
                }
                break;
            }
            udp.scratch.clear();
            let (consumed, len) = match pack(
                &mut udp.scratch,
                buf,
                session.id,
                session.next_packet,
                max,
                &key,
            ) {
                Ok(done) => done,
                Err(len) => {
                    too_large = Some(len);
                    break;
                }
            };
            match udp.socket.send_to(&udp.scratch, session.peer) {
                Ok(_) => {
                    udp.counts.sent += 1;
                    session.next_packet += 1;
                    session.pacer.spend(len);
                    buf.advance(consumed);
                    progressed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    udp.blocked = true;
                }
                Err(_) => {
                    // Not sendable to this address (e.g. unreachable): dropped like a lost
                    // datagram; deliveries are retransmitted until acked.
                    udp.counts.dropped += 1;
                    session.next_packet += 1;
                    buf.advance(consumed);
                    progressed = true;
                }
            }
        }
        if let Some(len) = too_large {
            let message = format!(
                "a frame of {len} bytes does not fit in a UDP datagram (at most \
                 {MAX_UDP_FRAME_BYTES}); use TCP or WebSocket for messages this large"
            );
            let error = fatal_error(pb::ErrorCode::FrameTooLarge, message);
            udp.scratch.clear();
            let sealed = udp::seal(
                &key,
                Direction::ServerToClient,
                session.id,
                session.next_packet,
                [&error],
                max,
                &mut udp.scratch,
            );
            if sealed.is_ok() && udp.socket.send_to(&udp.scratch, session.peer).is_ok() {
                udp.counts.sent += 1;
            }
            self.log(
                LogKind::Udp,
                format_args!("a UDP session was closed: a frame of {len} bytes fits no datagram"),
            );
            self.take_udp_session(conn);
            self.core.handle_reset(conn, now);
            return;
        }
        core.handle_written(conn, progressed, now);
    }

    /// The socket takes datagrams again: sessions that waited for it send.
    pub(super) fn udp_writable(&mut self, now: Now) {
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        udp.blocked = false;
        let waiting = std::mem::take(&mut udp.waiting);
        for conn in waiting {
            if let Some(s) = self.udp_session_mut(conn) {
                s.blocked = false;
                self.transmit_udp(conn, now);
            }
        }
    }

    /// Sessions whose pacing wait is over send again.
    pub(super) fn udp_paced(&mut self, now: Now) {
        loop {
            let Some(udp) = self.udp.as_mut() else {
                return;
            };
            let due = match udp.paced.peek() {
                Some(std::cmp::Reverse((at, conn))) if *at <= now.ms => *conn,
                _ => break,
            };
            udp.paced.pop();
            if let Some(s) = self.udp_session_mut(due) {
                s.paced = false;
                self.transmit_udp(due, now);
            }
        }
        if let Some(udp) = self.udp.as_mut() {
            udp.logins.expire(now.ms);
        }
    }

    /// The core closed a UDP session: its last words (the tail of what was queued, with the
    /// closing `Error`) go out, and the session is forgotten.
    pub(super) fn close_udp(&mut self, conn: ConnId, mut last: BytesMut) {
        let Some(session) = self.take_udp_session(conn) else {
            return;
        };
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        udp.release();
        if let Some(login) = session.login.as_ref().filter(|l| l.reply.is_none()) {
            // Refused before it had a session: the error is the LOGIN_REPLY.
            if let Some((prefix, len)) = next_frame(&last) {
                let raw = last.split_to(prefix + len).freeze().slice(prefix..);
                let mut out = BytesMut::new();
                if let Ok(frame) = parley_proto::frame::decode(raw)
                    && udp::seal_login_reply(0, login.nonce, &frame, login.limit, &mut out).is_ok()
                {
                    self.udp_send_now(&out, session.peer);
                }
            }
            return;
        }
        if session.id == 0 {
            return;
        }
        // Only the tail: the closing Error is last; what comes before it is synced later.
        let max = udp.max_datagram;
        let room = LAST_WORDS_DATAGRAMS * (max - HEADER_LEN - TAG_LEN);
        while last.len() > room {
            let Some((prefix, len)) = next_frame(&last) else {
                return;
            };
            last.advance(prefix + len);
        }
        let key = session.session_key();
        let mut packet = session.next_packet;
        let mut out = BytesMut::new();
        while !last.is_empty() {
            out.clear();
            let Ok((consumed, _)) = pack(&mut out, &last, session.id, packet, max, &key) else {
                break;
            };
            last.advance(consumed);
            packet += 1;
            self.udp_send_now(&out, session.peer);
        }
    }

    /// The core hands a UDP session in login to its user's home shard.
    pub(super) fn handover_udp(&mut self, conn: ConnId, to: usize, adoption: Box<Adoption>) {
        let Some(session) = self.take_udp_session(conn) else {
            return;
        };
        let Some(login) = session.login else {
            // Only a session in login moves; anything else has no way to follow.
            self.udp_release();
            return;
        };
        if let Some(udp) = self.udp.as_mut() {
            let expires = self.clock.now().ms + udp.login_ms;
            udp.logins
                .insert((session.peer, login.nonce), LoginAt::Shard(to), expires);
        }
        let moving = Box::new(Moving {
            peer: session.peer,
            login,
        });
        self.post(to, Mail::AdoptUdp(moving, adoption));
    }

    fn udp_release(&mut self) {
        if let Some(udp) = self.udp.as_mut() {
            udp.release();
        }
    }

    /// A UDP session in login arrives from the shard that took its LOGIN.
    pub(super) fn adopt_udp(&mut self, moving: Moving, adoption: Adoption, now: Now) {
        let conn = self.core.handle_adopt(adoption, now);
        let Some(udp) = self.udp.as_mut() else {
            // No UDP socket here (cannot happen: every shard binds one); the session ends.
            self.core.handle_reset(conn, now);
            return;
        };
        let Moving { peer, login } = moving;
        let expires = now.ms + udp.login_ms;
        udp.logins
            .insert((peer, login.nonce), LoginAt::Here(conn), expires);
        let session = Session {
            generation: conn.generation,
            id: 0,
            key: [0; udp::SESSION_KEY_LEN],
            peer,
            window: udp::ReplayWindow::new(),
            next_packet: 0,
            pacer: Pacer::new(udp.pacing, now.ms),
            login: Some(login),
            paced: false,
            blocked: false,
        };
        self.put_udp_session(conn, session);
        self.apply_effects(now);
    }
}

/// The LOGIN_REPLY for the core's answer `raw` to a session's login: a `LoginResult` gets the
/// session's id and a fresh key (made here, on the shard the session lives on), an `Error` goes
/// back with session id 0.
fn login_reply(session: &mut Session, shard: usize, conn: ConnId, raw: Bytes) -> Option<BytesMut> {
    let login = session.login.as_ref()?;
    let (nonce, limit) = (login.nonce, login.limit);
    let mut frame = parley_proto::frame::decode(raw).ok()?;
    let mut session_id = 0;
    if let Some(Body::LoginResult(result)) = frame.body.as_mut() {
        let mut key = [0u8; udp::SESSION_KEY_LEN];
        if getrandom::fill(&mut key).is_err() {
            frame = fatal_error(
                pb::ErrorCode::Internal,
                "no randomness for a session key".into(),
            );
        } else {
            session.key = key;
            session.id = SessionId::new(shard, conn).0;
            session_id = session.id;
            result.udp_session_id = session.id;
            result.udp_session_key = key.to_vec();
            result.max_frame_bytes = result.max_frame_bytes.min(MAX_UDP_FRAME_BYTES as u32);
        }
    }
    let mut out = BytesMut::new();
    match udp::seal_login_reply(session_id, nonce, &frame, limit, &mut out) {
        Ok(()) => Some(out),
        Err(_) => None,
    }
}

/// A fatal error frame.
fn fatal_error(code: pb::ErrorCode, message: String) -> pb::Frame {
    pb::Frame {
        request_id: 0,
        body: Some(Body::Error(pb::Error {
            code: code as i32,
            message,
            fatal: true,
            ..Default::default()
        })),
    }
}

/// Packs the whole frames at the start of `frames` into one SERVER_DATA datagram in `out`, up
/// to `max` bytes (a single frame larger than that goes alone in a datagram of its size):
/// returns (bytes of `frames` consumed, datagram length), or the length of a first frame that
/// fits no datagram at all.
fn pack(
    out: &mut BytesMut,
    frames: &[u8],
    id: u64,
    packet: u64,
    max: usize,
    key: &udp::SessionKey,
) -> Result<(usize, usize), usize> {
    let Some((prefix, len)) = next_frame(frames) else {
        return Err(frames.len());
    };
    // One frame larger than `max`: a datagram of its own size.
    let size = if prefix + len + HEADER_LEN + TAG_LEN > max {
        let own = prefix + len + HEADER_LEN + TAG_LEN;
        if own > MAX_DATAGRAM_BYTES {
            return Err(len);
        }
        own
    } else {
        max
    };
    let Ok(mut builder) = DatagramBuilder::new(out, Direction::ServerToClient, id, packet, size)
    else {
        return Err(len);
    };
    let mut consumed = 0;
    while let Some((prefix, len)) = frames.get(consumed..).and_then(next_frame) {
        let Some(frame) = frames.get(consumed + prefix..consumed + prefix + len) else {
            break;
        };
        match builder.push_encoded(frame) {
            Ok(()) => consumed += prefix + len,
            Err(UdpError::DatagramFull { .. }) => break,
            Err(_) if builder.is_empty() => return Err(len),
            Err(_) => break,
        }
    }
    match builder.finish(key) {
        Ok(dgram_len) => Ok((consumed, dgram_len)),
        Err(_) => Err(len),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use parley_proto::frame;

    fn ping(n: u64, pad: usize) -> pb::Frame {
        pb::Frame {
            request_id: n,
            body: Some(Body::Error(pb::Error {
                message: "x".repeat(pad),
                ..Default::default()
            })),
        }
    }

    fn queue(frames: &[pb::Frame]) -> BytesMut {
        let codec = tcp::FrameCodec::new(1 << 20);
        let mut out = BytesMut::new();
        for f in frames {
            codec.encode(f, &mut out).expect("encodes");
        }
        out
    }

    #[test]
    fn frames_are_packed_whole_and_in_order_up_to_the_size() {
        let key = udp::SessionKey::new(&[1; 32]);
        let frames: Vec<_> = (0..10).map(|n| ping(n, 300)).collect();
        let mut q = queue(&frames);
        let mut got = Vec::new();
        let mut packet = 0;
        while !q.is_empty() {
            let mut out = BytesMut::new();
            let (consumed, len) = pack(&mut out, &q, 77, packet, 1200, &key).expect("packs");
            assert!(len <= 1200 && len == out.len());
            let opened = udp::open(&key, &out, Direction::ServerToClient).expect("opens");
            assert_eq!(opened.header.packet_number, packet);
            for raw in opened.frames {
                got.push(frame::decode(Bytes::copy_from_slice(raw)).expect("frame"));
            }
            q.advance(consumed);
            packet += 1;
        }
        assert_eq!(got, frames);
        assert!(packet >= 3, "300-byte frames, three to a datagram");
    }

    #[test]
    fn a_frame_larger_than_the_size_goes_alone_and_one_too_large_for_any_is_refused() {
        let key = udp::SessionKey::new(&[1; 32]);
        let big = queue(&[ping(1, 5000), ping(2, 1)]);
        let mut out = BytesMut::new();
        let (consumed, len) = pack(&mut out, &big, 77, 0, 1200, &key).expect("packs");
        assert!(len > 1200);
        let opened = udp::open(&key, &out, Direction::ServerToClient).expect("opens");
        assert_eq!(opened.frames.len(), 1);
        assert!(consumed < big.len());
        let huge = queue(&[ping(1, 70_000)]);
        let mut out = BytesMut::new();
        assert!(pack(&mut out, &huge, 77, 0, 1200, &key).is_err());
        assert!(out.is_empty());
    }

    proptest::proptest! {
        /// Whatever the frames' sizes and the datagram size, packing sends every frame once, in
        /// order, whole; every datagram authenticates and stays within the size, except one
        /// carrying a single frame too large for it; a frame no datagram can carry is refused
        /// and nothing is consumed.
        #[test]
        fn packing_keeps_every_frame_once_in_order_within_the_size(
            sizes in proptest::collection::vec(
                proptest::prop_oneof![0usize..200, 200usize..3000, 60_000usize..70_000], 1..40),
            max in proptest::prop_oneof![
                proptest::strategy::Just(1200usize), 100usize..2000, 2000usize..65_507],
        ) {
            let key = udp::SessionKey::new(&[3; 32]);
            let frames: Vec<pb::Frame> = sizes.iter().enumerate().map(|(i, &n)| ping(i as u64, n)).collect();
            let mut q = queue(&frames);
            let mut got = Vec::new();
            let mut packet = 0;
            while !q.is_empty() {
                let mut out = BytesMut::new();
                match pack(&mut out, &q, 77, packet, max, &key) {
                    Ok((consumed, len)) => {
                        proptest::prop_assert!(consumed > 0);
                        proptest::prop_assert_eq!(len, out.len());
                        let opened = udp::open(&key, &out, Direction::ServerToClient)
                            .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
                        let n = opened.frames.len();
                        proptest::prop_assert!(len <= max || n == 1, "{} bytes, {} frames", len, n);
                        proptest::prop_assert!(len <= MAX_DATAGRAM_BYTES);
                        for raw in opened.frames {
                            got.push(frame::decode(Bytes::copy_from_slice(raw)).expect("a frame"));
                        }
                        q.advance(consumed);
                        packet += 1;
                    }
                    Err(_) => {
                        proptest::prop_assert!(out.is_empty());
                        let (prefix, len) = next_frame(&q).expect("a whole frame");
                        proptest::prop_assert!(prefix + len + HEADER_LEN + TAG_LEN > MAX_DATAGRAM_BYTES);
                        // The session ends here in the broker; the frames before it went out.
                        let sent = got.len();
                        proptest::prop_assert_eq!(&got[..], &frames[..sent]);
                        return Ok(());
                    }
                }
            }
            proptest::prop_assert_eq!(got, frames);
        }
    }
}
