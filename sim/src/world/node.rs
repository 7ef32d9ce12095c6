//! The nodes' side of the world: a node's life (start from its disks, crash, clean stop), what
//! its shard cores ask for (their effects), and its end of the sockets.

use std::collections::BTreeMap;
use std::sync::Arc;

use parley_broker::core::{ConnId, CoreEffect, CoreSetup, Effect, Intake, ShardCore};
use parley_broker::hooks::{Completions, Hooks};
use parley_storage::{Log, MemoryBackend, Timestamp};

use super::{Ev, Host, Mail, Node, SMALL_WINDOW, WINDOW, World};
use crate::client::Behaviour;
use crate::setup::SimVerifier;

impl World {
    /// Node `node` dies: unflushed bytes are lost, its sockets and links break.
    pub(super) fn crash(&mut self, node: usize) {
        if self.nodes[node].is_none() {
            return;
        }
        self.crashes += 1;
        self.note(8, node as u64, self.crashes as u64, || {
            format!("CRASH: node {node} dies; unflushed bytes are lost")
        });
        self.count_cores(node);
        self.nodes[node] = None;
        self.forget_answers(node);
        let rng = &mut self.rng;
        let range = node * self.shards..(node + 1) * self.shards;
        for disk in &mut self.disks[range] {
            *disk = disk.crash_image_with(|_, _| rng.chance(300));
        }
        self.node_gone(node);
    }

    /// A clean stop of node `node`: every shard flushes, checkpoints and says goodbye; the node
    /// restarts from its disks as they are.
    pub(super) fn stop(&mut self, node: usize) {
        if self.nodes[node].is_none() {
            return;
        }
        self.crashes += 1;
        self.note(16, node as u64, 0, || {
            format!("STOP: node {node} shuts down cleanly")
        });
        let now = self.now();
        for shard in node * self.shards..(node + 1) * self.shards {
            if let Some(core) = self.core_mut(shard) {
                core.handle_shutdown(now);
            }
            self.apply(shard);
        }
        self.count_cores(node);
        self.nodes[node] = None;
        self.forget_answers(node);
        self.node_gone(node);
    }

    /// What follows node `node`'s end: its boot's events are void, its clients lose their
    /// sockets, the other nodes lose their links to it, and it starts again a little later.
    fn node_gone(&mut self, node: usize) {
        self.epochs[node] += 1;
        for s in 0..self.socks.len() {
            let here = match self.socks[s].host {
                Host::Server { shard, .. } => self.node_of(shard) == node,
                Host::Transit { node: n } => n == node,
                Host::Gone => false,
            };
            if here && !self.socks[s].closed {
                self.client_lost(s);
            }
        }
        self.links_gone(node);
        let t = self.now + self.rng.range(20, 600);
        self.at(t, Ev::Restart(node));
    }

    /// Node `node` starts from its disks.
    pub(super) fn restart(&mut self, node: usize) {
        let epoch = self.epochs[node];
        self.note(9, node as u64, epoch, || {
            format!("node {node} starts from its disks")
        });
        if let Some(r) = self.routes.as_mut() {
            // A new boot: the old one's routes name a dead boot, which readers ignore.
            let shards = self.shards;
            r.index.retain(|_, tag| tag.shard as usize / shards != node);
            r.last_at[node] = self.now;
        }
        let now = self.now();
        let ts = Timestamp::from_micros(now.unix_ms * 1000);
        let config = self.node_config(node);
        let mut cores = Vec::new();
        for index in 0..self.shards {
            let disk = self.disks[node * self.shards + index].clone();
            let log = match Log::open(disk, self.log_config, ts) {
                Ok((log, _report)) => log,
                Err(e) => {
                    let what = format!(
                        "node {node} shard {index}: the log did not open after a crash: {e}"
                    );
                    self.history.fail(self.now, what);
                    return;
                }
            };
            cores.push(ShardCore::new(CoreSetup {
                index,
                shards: self.shards,
                config: config.clone(),
                verifier: Arc::new(SimVerifier),
                log,
                now,
                quiet: true,
                switches: self.switches,
                hooks: self
                    .gates
                    .get(node)
                    .map(|g| Arc::clone(g) as Arc<dyn Hooks>),
                completions: Some(Arc::clone(&self.answers[node]) as Arc<dyn Completions>),
            }));
        }
        // What each user's home must know, before any client is served (as the driver does).
        parley_broker::core::exchange_startup_mail(&mut cores, now);
        self.nodes[node] = Some(Node {
            cores,
            hosts: vec![BTreeMap::new(); self.shards],
        });
        let range = node * self.shards..(node + 1) * self.shards;
        for row in &mut self.mail_at[range] {
            row.fill(self.now);
        }
        self.node_started(node);
    }

    /// Carries out a shard's effects until it has none.
    pub(super) fn apply(&mut self, shard: usize) {
        self.schedule_answers();
        let mut effects: Vec<CoreEffect<MemoryBackend>> = Vec::new();
        for _ in 0..64 {
            let Some(core) = self.core_mut(shard) else {
                return;
            };
            core.take_effects(&mut effects);
            if effects.is_empty() {
                return;
            }
            for e in effects.drain(..) {
                match e {
                    Effect::Transmit(conn) => self.server_write(shard, conn),
                    Effect::Close { conn, last } => {
                        let Some(s) = self.unhost(shard, conn) else {
                            continue;
                        };
                        self.note(11, s as u64, last.len() as u64, || {
                            format!(
                                "sock {s}: closed by shard {shard} ({} last bytes)",
                                last.len()
                            )
                        });
                        self.socks[s].host = Host::Gone;
                        if !self.socks[s].closed {
                            if !last.is_empty() {
                                self.send_to_client(s, last.to_vec());
                            }
                            let t = self.socks[s].deliver_at;
                            self.at(t, Ev::ClientEof(s));
                        }
                    }
                    Effect::Handover { conn, to, adoption } => {
                        let Some(s) = self.unhost(shard, conn) else {
                            continue;
                        };
                        let node = self.node_of(shard);
                        if self.node_of(to) != node {
                            self.history.fail(
                                self.now,
                                format!("sock {s}: handed from shard {shard} to shard {to} of another node"),
                            );
                            continue;
                        }
                        self.note(12, s as u64, to as u64, || {
                            format!("sock {s}: handed from shard {shard} to shard {to}")
                        });
                        self.socks[s].host = Host::Transit { node };
                        self.post(shard, to, Mail::Adopt(s, adoption));
                    }
                    Effect::Mail { to, batch } => {
                        if self.node_of(to) == self.node_of(shard) {
                            self.post(shard, to, Mail::Batch(batch));
                        } else {
                            self.send_remote(shard, to, batch);
                        }
                    }
                    Effect::Route(op) => self.queue_route(shard, op),
                    Effect::Lookup { gather, users } => self.queue_lookup(shard, gather, users),
                    Effect::Resume(conn) => {
                        let host = self
                            .hosts_mut(shard)
                            .and_then(|h| h.get(&conn.slot).copied())
                            .filter(|(g, _)| *g == conn.generation)
                            .map(|(_, s)| s);
                        if let Some(s) = host {
                            self.note(16, s as u64, 0, || {
                                format!("sock {s}: shard {shard} takes input again")
                            });
                            self.schedule_read(s);
                        } else if self.core(shard).is_some_and(|c| c.is_relayed(conn)) {
                            let t = self.now + self.rng.range(0, 2);
                            let epoch = self.epoch_of(shard);
                            self.at(t, Ev::Serve { epoch, shard, conn });
                        }
                    }
                    Effect::Spare(ticket) => {
                        let t = self.now + self.rng.range(1, 30);
                        let epoch = self.epoch_of(shard);
                        self.at(
                            t,
                            Ev::Spared {
                                epoch,
                                shard,
                                ticket,
                            },
                        );
                    }
                    Effect::Flush(ticket) => {
                        // A flush takes what an fsync takes: a few to tens of milliseconds.
                        let took_ms = self.rng.range(1, 40);
                        let epoch = self.epoch_of(shard);
                        self.at(
                            self.now + took_ms,
                            Ev::Flushed {
                                epoch,
                                shard,
                                ticket,
                                took_ms,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Mail between two shards of one node.
    fn post(&mut self, from: usize, to: usize, mail: Mail) {
        // Shard-to-shard channels are FIFO.
        let t = (self.now + self.rng.range(0, 2)).max(self.mail_at[from][to]);
        self.mail_at[from][to] = t;
        let epoch = self.epoch_of(to);
        self.at(t, Ev::Mail { epoch, to, mail });
    }

    pub(super) fn mail(&mut self, to: usize, mail: Mail) {
        let now = self.now();
        match mail {
            Mail::Batch(batch) => {
                self.note(13, to as u64, batch.len() as u64, || {
                    format!("shard {to}: a batch of {}", batch.len())
                });
                if let Some(core) = self.core_mut(to) {
                    core.handle_mail(batch, now);
                }
            }
            Mail::Adopt(s, adoption) => {
                let Some(core) = self.core_mut(to) else {
                    return;
                };
                let conn = core.handle_adopt(*adoption, now);
                if let Some(h) = self.hosts_mut(to) {
                    h.insert(conn.slot, (conn.generation, s));
                }
                self.note(14, s as u64, to as u64, || {
                    format!("sock {s}: adopted by shard {to}")
                });
                self.socks[s].host = Host::Server { shard: to, conn };
                if self.socks[s].closed {
                    self.server_reset(to, conn);
                } else {
                    // Frames behind the login may wait in the core or the socket.
                    self.schedule_read(s);
                }
            }
        }
        self.apply(to);
    }

    fn unhost(&mut self, shard: usize, conn: ConnId) -> Option<usize> {
        let h = self.hosts_mut(shard)?;
        match h.get(&conn.slot) {
            Some(&(g, s)) if g == conn.generation => {
                h.remove(&conn.slot);
                Some(s)
            }
            _ => None,
        }
    }

    /// The client's side of `conn` is gone: the server's next write fails and it drops it.
    pub(super) fn server_reset(&mut self, shard: usize, conn: ConnId) {
        let now = self.now();
        self.unhost(shard, conn);
        if let Some(core) = self.core_mut(shard) {
            core.handle_reset(conn, now);
        }
    }

    /// The server writes what the connection's window takes (a session relayed from another
    /// node: what the relay's window takes, as mail to the client's node).
    pub(super) fn server_write(&mut self, shard: usize, conn: ConnId) {
        let now = self.now();
        let host = self
            .hosts_mut(shard)
            .and_then(|h| h.get(&conn.slot).copied());
        let Some((g, s)) = host else {
            if let Some(core) = self.core_mut(shard)
                && core.is_relayed(conn)
            {
                core.transmit_relayed(conn, now);
            }
            return;
        };
        if g != conn.generation {
            return;
        }
        if self.socks[s].closed {
            return self.server_reset(shard, conn);
        }
        let window = if self.clients[self.socks[s].client].behaviour == Behaviour::Staller {
            SMALL_WINDOW
        } else {
            WINDOW
        };
        let room = window.saturating_sub(self.socks[s].inflight);
        let bound = self.bound;
        let Some(core) = self.core_mut(shard) else {
            return;
        };
        if let Some(q) = core.queued_bytes(conn)
            && q > bound
        {
            let what =
                format!("sock {s} holds {q} bytes on shard {shard}, over its bound of {bound}");
            self.history.fail(self.now, what);
        }
        let Some(core) = self.core_mut(shard) else {
            return;
        };
        let Some(buf) = core.outbound(conn) else {
            return;
        };
        let n_bytes = room.min(buf.len());
        if n_bytes == 0 {
            return;
        }
        let bytes = buf.split_to(n_bytes).to_vec();
        core.handle_written(conn, true, now);
        self.socks[s].inflight += n_bytes;
        self.send_to_client(s, bytes);
    }

    /// A session relayed from another node takes its waiting input, as the driver feeds it.
    pub(super) fn serve_relayed(&mut self, shard: usize, conn: ConnId) {
        let now = self.now();
        let budget = self.read_budget;
        let Some(core) = self.core_mut(shard) else {
            return;
        };
        let again = core.service_relayed(conn, budget, now);
        self.note(20, shard as u64, u64::from(conn.slot), || {
            format!("shard {shard}: relayed session {conn} takes input")
        });
        self.apply(shard);
        if again {
            let t = self.now + self.rng.range(1, 3);
            let epoch = self.epoch_of(shard);
            self.at(t, Ev::Serve { epoch, shard, conn });
        }
    }

    pub(super) fn send_to_client(&mut self, s: usize, bytes: Vec<u8>) {
        let t = (self.now + self.rng.range(1, 5)).max(self.socks[s].deliver_at);
        self.socks[s].deliver_at = t;
        self.at(t, Ev::ClientRead(s, bytes));
    }

    pub(super) fn schedule_read(&mut self, s: usize) {
        if !self.socks[s].read_scheduled {
            self.socks[s].read_scheduled = true;
            let t = self.now + self.rng.range(1, 5);
            self.at(t, Ev::ServerRead(s));
        }
    }

    /// The server side of a socket reads, as the driver does: what the core has buffered
    /// first, then at most `limits.read_budget_bytes`, and nothing while the core holds input.
    pub(super) fn server_read(&mut self, s: usize) {
        self.socks[s].read_scheduled = false;
        if self.socks[s].closed {
            return;
        }
        let Host::Server { shard, conn } = self.socks[s].host else {
            return;
        };
        let now = self.now();
        let budget = self.read_budget;
        let shards = self.shards;
        let Some(n) = self.nodes[shard / shards].as_mut() else {
            return;
        };
        let core = &mut n.cores[shard % shards];
        match core.intake(conn) {
            None | Some(Intake::Hold) => {}
            Some(Intake::Pending) => core.handle_continue(conn, now),
            Some(Intake::Read) => {
                let take = budget.min(self.socks[s].to_server.len());
                let bytes: Vec<u8> = self.socks[s].to_server.drain(..take).collect();
                core.handle_bytes(conn, &bytes, now);
                self.note(3, s as u64, bytes.len() as u64, || {
                    format!("sock {s}: shard {shard} reads {} bytes", bytes.len())
                });
            }
        }
        self.apply(shard);
        self.read_again(s);
    }

    /// Schedules another read of socket `s` if its core takes input and there is some.
    fn read_again(&mut self, s: usize) {
        let Host::Server { shard, conn } = self.socks[s].host else {
            return;
        };
        let Some(core) = self.core(shard) else {
            return;
        };
        let again = match core.intake(conn) {
            Some(Intake::Pending) => true,
            Some(Intake::Read) => !self.socks[s].to_server.is_empty(),
            Some(Intake::Hold) | None => false,
        };
        if again {
            self.schedule_read(s);
        }
    }
}
