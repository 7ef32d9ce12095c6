//! A simulated client: one device of one user, following the protocol the way a client library
//! must for exactly-once: log in, sync from what it holds, resend unacked sends with the same
//! client message id, ack cumulatively, de-duplicate by (conversation, seq), answer `Behind`
//! with a sync.

use std::collections::{BTreeMap, VecDeque};

use parley_proto::pb;
use parley_proto::pb::frame::Body;

use crate::check::{ConnView, GROUP_MARK, History, ROOM_MARK, conv_key};

/// The request id of a client's group request (sends use their client message ids, which
/// count from 1).
const GROUP_OP_REQUEST: u64 = 1 << 62;
/// The request id of a client's room join.
const ROOM_JOIN_REQUEST: u64 = (1 << 62) + 1;

/// How a client misbehaves (on purpose) until the run quiets down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    /// Reads, acks and sends as it should.
    Normal,
    /// Stops reading now and then.
    Staller,
    /// Never acks deliveries (they are retransmitted until the connection is closed).
    NoAck,
}

/// A send waiting for its ack.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) peer: String,
    pub(crate) body: Vec<u8>,
    /// Sent on the current connection (else: send it, again, with the same id).
    pub(crate) sent: bool,
}

/// Where the final sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Final {
    NotYet,
    Requested,
    Done,
}

/// One simulated device.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) user: String,
    pub(crate) device: String,
    /// Messages still to send: peer user and body.
    pub(crate) plan: VecDeque<(String, Vec<u8>)>,
    next_cmid: u64,
    pub(crate) outbox: BTreeMap<u64, Outgoing>,
    /// The connection (socket index) if connected.
    pub(crate) sock: Option<usize>,
    pub(crate) logged_in: bool,
    pub(crate) syncing: bool,
    pub(crate) behaviour: Behaviour,
    /// A staller reads nothing before this time.
    pub(crate) stalled_until: u64,
    /// What the application holds: conversation -> seq -> message id.
    pub(crate) store: BTreeMap<String, BTreeMap<u64, u64>>,
    pub(crate) final_sync: Final,
    pub(crate) next_ping: u64,
    /// Most sends in flight at once.
    pub(crate) window: usize,
    /// Group requests still to make, one at a time (the group's owner only).
    pub(crate) ops: VecDeque<pb::GroupRequest>,
    /// The front of `ops` is sent on the current connection.
    op_sent: bool,
    /// Per group: the seq before the event that last added this user (what it holds starts
    /// above it).
    bases: BTreeMap<String, u64>,
    /// A room this client joins on every connection (membership is per connection).
    pub(crate) room: Option<String>,
}

impl Client {
    pub(crate) fn new(user: &str, device: &str, behaviour: Behaviour, window: usize) -> Self {
        Client {
            user: user.to_owned(),
            device: device.to_owned(),
            plan: VecDeque::new(),
            next_cmid: 1,
            outbox: BTreeMap::new(),
            sock: None,
            logged_in: false,
            syncing: false,
            behaviour,
            stalled_until: 0,
            store: BTreeMap::new(),
            final_sync: Final::NotYet,
            next_ping: 0,
            window,
            ops: VecDeque::new(),
            op_sent: false,
            bases: BTreeMap::new(),
            room: None,
        }
    }

    /// The next group request, if one is due and none is waiting for its answer.
    pub(crate) fn next_op(&mut self) -> Option<pb::Frame> {
        if !self.logged_in || self.op_sent {
            return None;
        }
        let op = self.ops.front()?.clone();
        self.op_sent = true;
        Some(pb::Frame {
            request_id: GROUP_OP_REQUEST,
            body: Some(Body::GroupRequest(op)),
        })
    }

    /// The highest seq of `conv` this client holds with nothing missing below it (from its
    /// join, for a group).
    fn cursor(&self, conv: &str) -> u64 {
        let base = self.bases.get(conv).copied().unwrap_or(0);
        self.store
            .get(conv)
            .map_or(base, |held| contiguous(held, base))
    }

    /// The token the simulation's verifier reads.
    pub(crate) fn token(&self) -> String {
        format!("{}/{}", self.user, self.device)
    }

    /// The connection is gone: unacked sends go again on the next one.
    pub(crate) fn disconnected(&mut self) {
        self.sock = None;
        self.logged_in = false;
        self.syncing = false;
        self.op_sent = false;
        if self.final_sync == Final::Requested {
            self.final_sync = Final::NotYet;
        }
        // Rooms are at-most-once: a room message whose ack was lost is not sent again.
        self.outbox.retain(|_, o| !o.peer.starts_with(ROOM_MARK));
        for o in self.outbox.values_mut() {
            o.sent = false;
        }
    }

    /// Everything sent and acked.
    pub(crate) fn idle(&self) -> bool {
        self.plan.is_empty() && self.outbox.is_empty() && self.ops.is_empty()
    }

    fn cursors(&self) -> Vec<pb::AckCursor> {
        self.store
            .keys()
            .map(|conv| pb::AckCursor {
                conversation: Some(self.view(conv)),
                seq: self.cursor(conv),
            })
            .collect()
    }

    fn view(&self, conv: &str) -> pb::Conversation {
        if let Some(group) = conv.strip_prefix(GROUP_MARK) {
            return pb::Conversation {
                r#type: pb::ConversationType::Group as i32,
                id: group.to_owned(),
            };
        }
        let (a, b) = conv.split_once('|').unwrap_or((conv, conv));
        let other = if a == self.user { b } else { a };
        pb::Conversation {
            r#type: pb::ConversationType::Direct as i32,
            id: other.to_owned(),
        }
    }

    /// `n` history requests for the first conversation it holds (none if it holds none): what
    /// a client that stopped reading may pile up.
    pub(crate) fn hoard(&self, n: usize) -> Vec<pb::Frame> {
        let Some(conv) = self.store.keys().next() else {
            return Vec::new();
        };
        let view = self.view(conv);
        (0..n)
            .map(|_| pb::Frame {
                request_id: 0,
                body: Some(Body::HistoryRequest(pb::HistoryRequest {
                    conversation: Some(view.clone()),
                    before_seq: 0,
                    after_seq: None,
                    limit: 0,
                })),
            })
            .collect()
    }

    /// A sync request from what the application holds.
    pub(crate) fn sync_request(&mut self) -> pb::Frame {
        self.syncing = true;
        pb::Frame {
            request_id: 0,
            body: Some(Body::SyncRequest(pb::SyncRequest {
                cursors: self.cursors(),
                page_size: 0,
                max_per_conversation: 0,
            })),
        }
    }

    /// Frames to send now: unacked sends again, then new ones up to the window.
    pub(crate) fn sends(&mut self, history: &mut History, quiet: bool) -> Vec<pb::Frame> {
        let mut out = Vec::new();
        if !self.logged_in {
            return out;
        }
        for (&cmid, o) in self.outbox.iter_mut() {
            if !o.sent {
                o.sent = true;
                out.push(send_frame(cmid, &o.peer, &o.body));
            }
        }
        let _ = quiet;
        while self.outbox.len() < self.window {
            let Some((peer, body)) = self.plan.pop_front() else {
                break;
            };
            let cmid = self.next_cmid;
            self.next_cmid += 1;
            history.sent(
                (self.user.clone(), self.device.clone(), cmid),
                conv_key(&self.user, &peer),
                body.clone(),
            );
            out.push(send_frame(cmid, &peer, &body));
            self.outbox.insert(
                cmid,
                Outgoing {
                    peer,
                    body,
                    sent: true,
                },
            );
        }
        out
    }

    /// The first unacked send again, as it was (a retry on the same connection).
    pub(crate) fn resend_one(&self) -> Option<pb::Frame> {
        let (&cmid, o) = self.outbox.iter().find(|(_, o)| o.sent)?;
        Some(send_frame(cmid, &o.peer, &o.body))
    }

    /// A frame from the server; returns the frames to answer with.
    pub(crate) fn on_frame(
        &mut self,
        frame: pb::Frame,
        now: u64,
        history: &mut History,
        view: &mut ConnView,
    ) -> Vec<pb::Frame> {
        let mut out = Vec::new();
        match frame.body {
            Some(Body::LoginResult(_)) => {
                self.logged_in = true;
                if let Some(room) = self.room.as_ref().and_then(|r| r.strip_prefix(ROOM_MARK)) {
                    out.push(pb::Frame {
                        request_id: ROOM_JOIN_REQUEST,
                        body: Some(Body::RoomRequest(pb::RoomRequest {
                            action: pb::RoomAction::Join as i32,
                            room_id: room.to_owned(),
                        })),
                    });
                }
                // A client that pipelined its sync behind the login does not ask again.
                if !self.syncing {
                    out.push(self.sync_request());
                }
                out.extend(self.sends(history, false));
            }
            Some(Body::SendAck(ack)) => {
                if let Some(o) = self.outbox.remove(&ack.client_msg_id)
                    && !o.peer.starts_with(ROOM_MARK)
                {
                    let conv = conv_key(&self.user, &o.peer);
                    history.ack(
                        now,
                        (self.user.clone(), self.device.clone(), ack.client_msg_id),
                        &conv,
                        ack.seq,
                        ack.msg_id,
                    );
                }
                out.extend(self.sends(history, false));
            }
            Some(Body::Error(e)) => {
                if frame.request_id == GROUP_OP_REQUEST {
                    // Refused for now (its owner's node is unreachable, or fenced): again
                    // later; refused for good: the next one.
                    if e.code != pb::ErrorCode::Unavailable as i32 {
                        self.ops.pop_front();
                    }
                    self.op_sent = false;
                } else if !e.fatal
                    && e.client_msg_id != 0
                    && e.code == pb::ErrorCode::Forbidden as i32
                {
                    // Not a member of the group (any more): it was not stored; give it up.
                    self.outbox.remove(&e.client_msg_id);
                } else if !e.fatal
                    && e.client_msg_id != 0
                    && let Some(o) = self.outbox.get_mut(&e.client_msg_id)
                {
                    // Retried later with the same id (on the next wake-up).
                    o.sent = false;
                }
            }
            Some(Body::GroupResult(_)) if frame.request_id == GROUP_OP_REQUEST => {
                self.ops.pop_front();
                self.op_sent = false;
            }
            Some(Body::Deliver(d)) => {
                let mut touched = Vec::new();
                for m in d.messages {
                    if let Some(conv) = self.receive(&m, now, true, history, view) {
                        touched.push(conv);
                    }
                }
                if self.behaviour != Behaviour::NoAck && !touched.is_empty() {
                    out.push(self.acks(&touched));
                }
            }
            Some(Body::SyncSummary(_)) => view.sync_started(),
            Some(Body::SyncPage(p)) => {
                let mut touched = Vec::new();
                for m in p.messages {
                    if let Some(conv) = self.receive(&m, now, false, history, view) {
                        touched.push(conv);
                    }
                }
                if p.done {
                    view.sync_running = false;
                    self.syncing = false;
                    if self.final_sync == Final::Requested {
                        self.final_sync = Final::Done;
                    }
                }
                if self.behaviour != Behaviour::NoAck && !touched.is_empty() {
                    // Cumulative acks also clear what was pushed live before a gap was filled.
                    out.push(self.acks(&touched));
                }
            }
            Some(Body::Behind(_)) if !self.syncing => out.push(self.sync_request()),
            _ => {}
        }
        out
    }

    /// Stores a received message in the application (once per seq); returns its conversation.
    fn receive(
        &mut self,
        m: &pb::Message,
        now: u64,
        live: bool,
        history: &mut History,
        view: &mut ConnView,
    ) -> Option<String> {
        let c = m.conversation.as_ref()?;
        if c.r#type == pb::ConversationType::Room as i32 {
            let room = format!("{ROOM_MARK}{}", c.id);
            history.observed_room(now, &room, m, live, view);
            return None;
        }
        let conv = if c.r#type == pb::ConversationType::Group as i32 {
            format!("{GROUP_MARK}{}", c.id)
        } else {
            conv_key(&self.user, &c.id)
        };
        if adds(m, &self.user) {
            // What this user may see of the group starts here.
            let base = self.bases.entry(conv.clone()).or_insert(0);
            *base = (*base).max(m.seq - 1);
        }
        history.observed(now, &conv, m, live, view);
        self.store
            .entry(conv.clone())
            .or_default()
            .entry(m.seq)
            .or_insert(m.msg_id);
        Some(conv)
    }

    fn acks(&self, convs: &[String]) -> pb::Frame {
        let mut convs = convs.to_vec();
        convs.sort();
        convs.dedup();
        let acks = convs
            .iter()
            .map(|conv| pb::AckCursor {
                conversation: Some(self.view(conv)),
                seq: self.cursor(conv),
            })
            .collect();
        pb::Frame {
            request_id: 0,
            body: Some(Body::DeliverAck(pb::DeliverAck { acks })),
        }
    }
}

/// Whether `m` is the group event that makes `user` a member.
fn adds(m: &pb::Message, user: &str) -> bool {
    use pb::GroupEventType as E;
    let Some(e) = m.event.as_ref() else {
        return false;
    };
    match E::try_from(e.r#type) {
        Ok(E::Created) => e.actor == user || e.users.iter().any(|u| u == user),
        Ok(E::MembersAdded) => e.users.iter().any(|u| u == user),
        Ok(E::MemberJoined) => e.actor == user,
        _ => false,
    }
}

/// The highest seq `s` such that `base+1..=s` are all held.
fn contiguous(held: &BTreeMap<u64, u64>, base: u64) -> u64 {
    let mut s = base;
    for (&seq, _) in held.range(base + 1..) {
        if seq == s + 1 {
            s = seq;
        } else if seq > s + 1 {
            break;
        }
    }
    s
}

fn send_frame(cmid: u64, peer: &str, body: &[u8]) -> pb::Frame {
    let room = peer.strip_prefix(ROOM_MARK);
    let to = match peer.strip_prefix(GROUP_MARK) {
        Some(group) => pb::Conversation {
            r#type: pb::ConversationType::Group as i32,
            id: group.to_owned(),
        },
        None if room.is_some() => pb::Conversation {
            r#type: pb::ConversationType::Room as i32,
            id: room.unwrap_or_default().to_owned(),
        },
        None => pb::Conversation {
            r#type: pb::ConversationType::Direct as i32,
            id: peer.to_owned(),
        },
    };
    pb::Frame {
        request_id: cmid,
        body: Some(Body::Send(pb::Send {
            to: Some(to),
            client_msg_id: cmid,
            content_type: 1,
            body: bytes::Bytes::copy_from_slice(body),
            kind: 0,
            ref_seq: 0,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_is_the_end_of_the_contiguous_prefix() {
        let held: BTreeMap<u64, u64> = [(1, 0), (2, 0), (4, 0)].into_iter().collect();
        assert_eq!(contiguous(&held, 0), 2);
        assert_eq!(contiguous(&BTreeMap::new(), 0), 0);
        // A group member's holdings start at its join.
        let joined: BTreeMap<u64, u64> = [(5, 0), (6, 0), (8, 0)].into_iter().collect();
        assert_eq!(contiguous(&joined, 4), 6);
        assert_eq!(contiguous(&joined, 0), 0);
    }
}
