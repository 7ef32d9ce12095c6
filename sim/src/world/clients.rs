//! The clients' side of the world: connecting, sending, reading, waking up to misbehave, and
//! dropping connections.

use bytes::BytesMut;
use parley_broker::core::Now;
use parley_proto::pb;

use super::{Ev, Host, Sock, UNIX_BASE_MS, World};
use crate::check::ConnView;
use crate::client::{Behaviour, Client, Final};

impl World {
    pub(super) fn client_send(&mut self, s: usize, frames: Vec<pb::Frame>) {
        if frames.is_empty() || self.socks[s].closed {
            return;
        }
        let mut out = BytesMut::new();
        for f in &frames {
            if self.codec.encode(f, &mut out).is_err() {
                self.history
                    .fail(self.now, "a client frame did not encode".into());
            }
        }
        self.socks[s].to_server.extend_from_slice(&out);
        self.schedule_read(s);
    }

    pub(super) fn wake(&mut self, ci: usize) {
        self.note(2, ci as u64, 0, || format!("client {ci} wakes"));
        let next = self.now + self.rng.range(20, 250);
        self.at(next, Ev::Wake(ci));
        let Some(s) = self.clients[ci].sock else {
            self.connect(ci);
            return;
        };
        if !self.quiescing {
            // Chaos: drop the connection, or start ignoring the socket for a while.
            if self.rng.chance(8) {
                let reset = self.rng.chance(500);
                return self.client_drop(ci, s, reset);
            }
            if self.clients[ci].behaviour == Behaviour::Staller
                && self.clients[ci].stalled_until <= self.now
                && self.rng.chance(100)
            {
                self.clients[ci].stalled_until = self.now + self.rng.range(200, 5_000);
                if self.clients[ci].logged_in {
                    // While it reads nothing, it asks for a pile of history pages: the node
                    // must hold its requests, not queue the answers past the budget.
                    let n = self.rng.range(10, 80) as usize;
                    let frames = self.clients[ci].hoard(n);
                    self.client_send(s, frames);
                }
            }
        }
        let c = &mut self.clients[ci];
        if !c.logged_in {
            return;
        }
        let mut frames = c.sends(&mut self.history, self.quiescing);
        frames.extend(c.next_op());
        if !self.quiescing && self.rng.chance(30) {
            // A client may send the same message again at any time (same client message id).
            frames.extend(c.resend_one());
        }
        if self.now >= c.next_ping {
            c.next_ping = self.now + 1_500;
            frames.push(pb::Frame {
                request_id: 0,
                body: Some(pb::frame::Body::Ping(pb::Ping { nonce: self.now })),
            });
        }
        let everyone_idle = self.quiescing && self.clients.iter().all(Client::idle);
        let c = &mut self.clients[ci];
        if everyone_idle && c.final_sync == Final::NotYet && !c.syncing {
            c.final_sync = Final::Requested;
            frames.push(c.sync_request());
        }
        let sent_something = !frames.is_empty();
        self.client_send(s, frames);
        if !self.quiescing && sent_something && self.rng.chance(20) {
            // Gone right after sending: the acks are lost, the sends come again.
            let reset = self.rng.chance(500);
            self.client_drop(ci, s, reset);
        }
    }

    /// Client `ci` connects to a shard of a running node (any node: a user homed elsewhere is
    /// relayed to its home).
    pub(super) fn connect(&mut self, ci: usize) {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].is_some())
            .collect();
        if running.is_empty() {
            return;
        }
        let node = running[self.rng.below(running.len() as u64) as usize];
        let shard = node * self.shards + self.rng.below(self.shards as u64) as usize;
        let now = Now {
            ms: self.now,
            us: self.now * 1000,
            unix_ms: UNIX_BASE_MS + self.now as i64,
        };
        let Some(core) = self.core_mut(shard) else {
            return;
        };
        let conn = core.handle_open(false, None, now);
        let s = self.socks.len();
        if let Some(h) = self.hosts_mut(shard) {
            h.insert(conn.slot, (conn.generation, s));
        }
        self.socks.push(Sock {
            client: ci,
            host: Host::Server { shard, conn },
            to_server: Vec::new(),
            read_scheduled: false,
            inflight: 0,
            deliver_at: self.now,
            kernel: Vec::new(),
            drain_scheduled: false,
            eof_arrived: false,
            rx: BytesMut::new(),
            view: ConnView::default(),
            closed: false,
        });
        let who = format!("{}/{}", self.clients[ci].user, self.clients[ci].device);
        self.note(4, ci as u64, s as u64, || {
            format!("client {ci} ({who}) connects as sock {s} to shard {shard}")
        });
        self.clients[ci].sock = Some(s);
        let login = pb::Frame {
            request_id: 1,
            body: Some(pb::frame::Body::Login(pb::Login {
                protocol_version: parley_proto::PROTOCOL_VERSION,
                token: self.clients[ci].token(),
                client_name: "sim".into(),
            })),
        };
        self.apply(shard);
        let mut frames = vec![login];
        if self.rng.chance(500) {
            // Pipelined behind the login: the sync travels with the connection to its home.
            frames.push(self.clients[ci].sync_request());
        }
        self.client_send(s, frames);
    }

    /// The client drops its connection: a reset, or a clean end of its sending side.
    pub(super) fn client_drop(&mut self, ci: usize, s: usize, reset: bool) {
        self.note(6, s as u64, u64::from(reset), || {
            format!(
                "client {ci} drops sock {s} ({})",
                if reset { "reset" } else { "eof" }
            )
        });
        let host = self.socks[s].host;
        self.client_lost(s);
        if let Host::Server { shard, conn } = host {
            let now = self.now();
            if reset {
                self.server_reset(shard, conn);
            } else if let Some(core) = self.core_mut(shard) {
                core.handle_eof(conn, now);
            }
            self.apply(shard);
        }
    }

    /// The client's side of socket `s` is over; it reconnects later.
    pub(super) fn client_lost(&mut self, s: usize) {
        if self.socks[s].closed {
            return;
        }
        self.socks[s].closed = true;
        let ci = self.socks[s].client;
        if self.clients[ci].sock == Some(s) {
            self.clients[ci].disconnected();
        }
    }

    /// The client reads what arrived, unless it is not reading now.
    pub(super) fn client_read(&mut self, s: usize) {
        if self.socks[s].closed {
            return;
        }
        let ci = self.socks[s].client;
        let stalled = self.clients[ci].stalled_until;
        if stalled > self.now {
            // Not reading: the bytes wait in the socket (and keep the window full).
            if !self.socks[s].drain_scheduled {
                self.socks[s].drain_scheduled = true;
                self.at(stalled, Ev::ClientDrain(s));
            }
            return;
        }
        let bytes = std::mem::take(&mut self.socks[s].kernel);
        self.note(15, s as u64, bytes.len() as u64, || {
            format!("sock {s}: client {ci} reads {} bytes", bytes.len())
        });
        self.socks[s].inflight = self.socks[s].inflight.saturating_sub(bytes.len());
        self.socks[s].rx.extend_from_slice(&bytes);
        let mut replies = Vec::new();
        loop {
            match self.codec.decode_frame(&mut self.socks[s].rx) {
                Ok(Some(frame)) => {
                    let got = match &frame.body {
                        Some(pb::frame::Body::Deliver(d)) => Some(("live", &d.messages)),
                        Some(pb::frame::Body::SyncPage(p)) => Some(("sync", &p.messages)),
                        _ => None,
                    };
                    if let Some((how, messages)) = got
                        && self.trace.is_some()
                    {
                        let seqs: Vec<String> = messages
                            .iter()
                            .map(|m| {
                                let id = m.conversation.as_ref().map_or("?", |c| c.id.as_str());
                                format!("{id}#{}", m.seq)
                            })
                            .collect();
                        let what = format!("sock {s}: client {ci} gets {how} {}", seqs.join(" "));
                        self.note(31, s as u64, messages.len() as u64, || what);
                    }
                    if let Some(pb::frame::Body::SendAck(a)) = &frame.body
                        && self.trace.is_some()
                    {
                        let what = format!(
                            "sock {s}: client {ci} acked {} at seq {} (id {})",
                            a.client_msg_id, a.seq, a.msg_id
                        );
                        self.note(32, s as u64, a.seq, || what);
                    }
                    if let Some(pb::frame::Body::Error(e)) = &frame.body {
                        let (code, fatal) = (e.code, e.fatal);
                        let message = e.message.clone();
                        self.note(30, s as u64, code as u64, || {
                            format!("sock {s}: error {code} (fatal: {fatal}): {message}")
                        });
                    }
                    let now = self.now;
                    let sock = &mut self.socks[s];
                    let c = &mut self.clients[ci];
                    replies.extend(c.on_frame(frame, now, &mut self.history, &mut sock.view));
                }
                Ok(None) => break,
                Err(e) => {
                    let head: Vec<String> = self.socks[s]
                        .rx
                        .iter()
                        .take(48)
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    let what = format!(
                        "sock {s}: the server sent a bad frame: {e} (next bytes: {})",
                        head.join("")
                    );
                    self.history.fail(self.now, what);
                    break;
                }
            }
        }
        self.client_send(s, replies);
        if self.socks[s].eof_arrived {
            return self.client_lost(s);
        }
        if let Host::Server { shard, conn } = self.socks[s].host {
            // The window opened: the server writes what waited.
            self.server_write(shard, conn);
            self.apply(shard);
        }
    }
}
