//! The simulated cluster (seeds of two or three nodes): the links between nodes, Redis's side
//! of the node registry (leases that a lossy Redis may fail to renew), and the start-up gate.
//!
//! * **Links.** Each pair of running nodes keeps one link. Mail between shards of different
//!   nodes goes in the links' wire form ([`parley_broker::core::mail_to_bytes`]), in order per
//!   (sending node, receiving shard), as the link threads carry it. A link breaks when either
//!   node dies, or by a fault (a cut): mail on it is lost, each side notices a few ms later
//!   (its shards hear `LinkDown` in order with the mail before it), and mail sent meanwhile is
//!   lost too. A cut link comes back after a while; a restarted node links to every running
//!   node. Both sides' shards hear `LinkUp`.
//! * **Mail for a node without a link** goes back to the sending core
//!   ([`parley_broker::core::ShardCore::handle_unreachable`]), as the carrier hands it back.
//! * **Leases.** Each node renews its lease every heartbeat; Redis loses one renewal in eight,
//!   and in some seeds takes no writes at all for a while (an outage, which also fails route
//!   registrations). A node's cores assign seqs only before the last renewal's time plus the
//!   lease.
//! * **Start-up gate.** A node that starts takes logins once its links to every running node
//!   have been up for a heartbeat, or five heartbeats after it started.

use parley_broker::config::Config;
use parley_broker::core::ShardMsg;

use super::{Ev, QUIESCE_AT, World};
use crate::rng::Rng;

/// How often a node renews its lease (virtual ms).
const HEARTBEAT_MS: u64 = 100;
/// How long a renewed lease holds (virtual ms).
const LEASE_MS: u64 = 350;
/// The retry hint of mail handed back for want of a link (ms).
const RETRY_MS: u32 = 200;

/// The links and Redis of a simulated cluster.
#[derive(Debug)]
pub(super) struct Cluster {
    nodes: usize,
    /// Per pair (symmetric): whether the link is established.
    established: Vec<bool>,
    /// Per pair (symmetric): the link's incarnation, bumped whenever it breaks or comes up;
    /// mail sent on an earlier one is lost.
    incarnation: Vec<u64>,
    /// Per (node, peer): whether the node believes its link to the peer is up (its carrier's
    /// bit: mail for a peer without one goes back to the core).
    view: Vec<bool>,
    /// Per (sending node, receiving global shard): when the last mail or news arrives (FIFO).
    wire_at: Vec<Vec<u64>>,
    /// Redis takes no writes before this (virtual ms).
    pub(super) redis_down_until: u64,
    /// Per node: whether its start-up gate is open.
    settled: Vec<bool>,
}

impl Cluster {
    /// A cluster of `nodes` nodes of `shards` shards; sets the cluster's node list in `config`.
    pub(super) fn new(nodes: usize, shards: usize, config: &mut Config, _rng: &mut Rng) -> Self {
        config.cluster.nodes = (0..nodes).map(node_id).collect();
        config.cluster.lease_ms = LEASE_MS;
        config.cluster.heartbeat_ms = HEARTBEAT_MS;
        Cluster {
            nodes,
            established: vec![false; nodes * nodes],
            incarnation: vec![0; nodes * nodes],
            view: vec![false; nodes * nodes],
            wire_at: vec![vec![0; nodes * shards]; nodes],
            redis_down_until: 0,
            settled: vec![false; nodes],
        }
    }

    fn pair(&self, a: usize, b: usize) -> usize {
        a.min(b) * self.nodes + a.max(b)
    }

    fn link(&self, a: usize, b: usize) -> u64 {
        self.incarnation[self.pair(a, b)]
    }
}

/// The kinds of the mail in `batch`, for the trace.
fn kinds(batch: &[ShardMsg]) -> String {
    let kinds: Vec<String> = batch
        .iter()
        .map(|m| {
            let d = format!("{m:?}");
            d.split(['(', ' ', '{'])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    kinds.join(", ")
}

/// The id of node `n` in the cluster's node list.
fn node_id(n: usize) -> String {
    format!("n{n}")
}

impl World {
    /// The settings of node `node`.
    pub(super) fn node_config(&self, node: usize) -> Config {
        let mut c = self.config.clone();
        if self.cluster.is_some() {
            c.cluster.node_id = Some(node_id(node));
        }
        c
    }

    /// The name the presence index gives node `node`.
    pub(super) fn node_name(&self, node: usize) -> String {
        if self.cluster.is_some() {
            node_id(node)
        } else {
            self.config
                .cluster
                .effective_node_id(&self.config.node)
                .to_owned()
        }
    }

    /// Schedules the cluster's faults: cuts of links between running nodes, and Redis
    /// outages, all before the run quiesces.
    pub(super) fn schedule_cluster_faults(&mut self) {
        let Some(nodes) = self.cluster.as_ref().map(|c| c.nodes) else {
            return;
        };
        for _ in 0..self.rng.range(0, 3) {
            let t = self.rng.range(100, QUIESCE_AT - 1_000);
            let a = self.rng.below(nodes as u64) as usize;
            let b = (a + 1 + self.rng.below(nodes as u64 - 1) as usize) % nodes;
            self.at(t, Ev::Cut { a, b });
        }
        if self.rng.chance(300) {
            let t = self.rng.range(100, QUIESCE_AT - 2_000);
            let until = t + self.rng.range(200, 1_500);
            self.at(t, Ev::RedisDown { until });
        }
    }

    /// Node `node` has started: it holds a fresh lease (it registered), it links to every
    /// running node, and its gate is shut until it has heard from them.
    pub(super) fn node_started(&mut self, node: usize) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.settled[node] = false;
        let until = self.now + LEASE_MS;
        let epoch = self.epochs[node];
        if let Some(n) = self.nodes[node].as_mut() {
            for core in &mut n.cores {
                core.set_lease(until);
                core.set_settled(false);
            }
        }
        for peer in 0..self.nodes.len() {
            if peer != node && self.nodes[peer].is_some() {
                let t = self.now + self.rng.range(5, 60);
                self.at(t, Ev::Connect { a: node, b: peer });
            }
        }
        let t = self.now + HEARTBEAT_MS;
        self.at(t, Ev::Beat { node, epoch });
        let t = self.now + 5 * HEARTBEAT_MS;
        self.at(t, Ev::Settle { node, epoch });
    }

    /// Node `node` is gone: its links break; each running peer notices a few ms later.
    pub(super) fn links_gone(&mut self, node: usize) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let mut lost = Vec::new();
        for peer in 0..c.nodes {
            if peer == node {
                continue;
            }
            let p = c.pair(node, peer);
            c.view[node * c.nodes + peer] = false;
            if c.established[p] {
                c.established[p] = false;
                c.incarnation[p] += 1;
                lost.push((peer, c.incarnation[p]));
            }
        }
        for (peer, link) in lost {
            let t = self.now + self.rng.range(1, 15);
            self.at(
                t,
                Ev::LinkLost {
                    node: peer,
                    peer: node,
                    link,
                },
            );
        }
    }

    /// The link between `a` and `b` comes up, if both run and it is down.
    pub(super) fn connect_link(&mut self, a: usize, b: usize) {
        if self.nodes[a].is_none() || self.nodes[b].is_none() {
            return;
        }
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let p = c.pair(a, b);
        if c.established[p] {
            return;
        }
        c.established[p] = true;
        c.incarnation[p] += 1;
        c.view[a * c.nodes + b] = true;
        c.view[b * c.nodes + a] = true;
        self.note(21, a as u64, b as u64, || {
            format!("the link between nodes {a} and {b} comes up")
        });
        self.tell_node(a, b, true);
        self.tell_node(b, a, true);
        for n in [a, b] {
            self.maybe_settle(n);
        }
    }

    /// A fault: the link between `a` and `b` breaks; both notice a few ms later, and it comes
    /// back after a while.
    pub(super) fn cut(&mut self, a: usize, b: usize) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let p = c.pair(a, b);
        if !c.established[p] {
            return;
        }
        c.established[p] = false;
        c.incarnation[p] += 1;
        let link = c.incarnation[p];
        self.note(22, a as u64, b as u64, || {
            format!("CUT: the link between nodes {a} and {b} breaks")
        });
        for (node, peer) in [(a, b), (b, a)] {
            let t = self.now + self.rng.range(1, 15);
            self.at(t, Ev::LinkLost { node, peer, link });
        }
        let t = self.now + self.rng.range(50, 600);
        self.at(t, Ev::Connect { a, b });
    }

    /// Node `node` notices that its link to `peer` (incarnation `link`) is gone.
    pub(super) fn link_lost(&mut self, node: usize, peer: usize, link: u64) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        // A link that came up again since is not the one lost.
        if c.link(node, peer) != link || !c.view[node * c.nodes + peer] {
            return;
        }
        c.view[node * c.nodes + peer] = false;
        if self.nodes[node].is_none() {
            return;
        }
        self.note(23, node as u64, peer as u64, || {
            format!("node {node} notices its link to node {peer} is gone")
        });
        self.tell_node(node, peer, false);
    }

    /// Tells every shard of node `node` that its link to `peer` came up or went down, in order
    /// with the mail from `peer`.
    fn tell_node(&mut self, node: usize, peer: usize, up: bool) {
        let epoch = self.epochs[node];
        for to in node * self.shards..(node + 1) * self.shards {
            let t = self.wire_time(peer, to);
            self.at(
                t,
                Ev::News {
                    epoch,
                    to,
                    peer,
                    up,
                },
            );
        }
    }

    /// When the next mail or news from node `from` to global shard `to` arrives (FIFO).
    fn wire_time(&mut self, from: usize, to: usize) -> u64 {
        let t = self.now + self.rng.range(0, 3);
        let Some(c) = self.cluster.as_mut() else {
            return t;
        };
        let t = t.max(c.wire_at[from][to]);
        c.wire_at[from][to] = t;
        t
    }

    /// Shard `to` hears of its node's link to `peer`.
    pub(super) fn news(&mut self, epoch: u64, to: usize, peer: usize, up: bool) {
        if epoch != self.epoch_of(to) {
            return;
        }
        let now = self.now();
        self.note(24, to as u64, peer as u64, || {
            format!(
                "shard {to}: the link to node {peer} is {}",
                if up { "up" } else { "down" }
            )
        });
        if let Some(core) = self.core_mut(to) {
            if up {
                core.handle_link_up(peer, now);
            } else {
                core.handle_link_down(peer, RETRY_MS, now);
            }
        }
        self.apply(to);
    }

    /// Sends `batch` from global shard `from` to global shard `to` of another node, over their
    /// link (or back to the core, if the sending node has no link to that node now).
    pub(super) fn send_remote(&mut self, from: usize, to: usize, batch: Vec<ShardMsg>) {
        let (a, b) = (self.node_of(from), self.node_of(to));
        let Some(c) = self.cluster.as_ref() else {
            self.history.fail(
                self.now,
                format!("shard {from} sent mail to shard {to} of another node, without a cluster"),
            );
            return;
        };
        if !c.view[a * c.nodes + b] {
            let now = self.now();
            self.note(25, from as u64, to as u64, || {
                format!(
                    "shard {from}: no link for mail to shard {to}, handed back: {}",
                    kinds(&batch)
                )
            });
            if let Some(core) = self.core_mut(from) {
                core.handle_unreachable(batch, RETRY_MS, now);
            }
            return;
        }
        let link = c.link(a, b);
        let broken = !c.established[c.pair(a, b)];
        let bytes = match parley_broker::core::mail_to_bytes(&batch) {
            Ok(b) => b,
            Err(e) => {
                self.history.fail(
                    self.now,
                    format!("mail from shard {from} to shard {to} did not encode: {e}"),
                );
                return;
            }
        };
        if broken {
            // Written to a link that broke and that this node has not noticed yet: lost.
            self.note(26, a as u64, to as u64, || {
                format!("mail from node {a} to shard {to} lost with its link")
            });
            return;
        }
        // Counted by the driver in a node: here, by the world that stands in for it.
        self.counters.remote_mail_out += batch.len() as u64;
        let t = self.wire_time(a, to);
        self.at(
            t,
            Ev::Remote {
                link,
                from: a,
                to,
                bytes,
            },
        );
    }

    /// Mail from node `from` arrives at shard `to`, unless its link broke on the way.
    pub(super) fn remote(&mut self, link: u64, from: usize, to: usize, bytes: &bytes::Bytes) {
        let b = self.node_of(to);
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        if c.link(from, b) != link {
            self.note(26, from as u64, to as u64, || {
                format!("mail from node {from} to shard {to} lost with its link")
            });
            return;
        }
        let now = self.now();
        let batch = match parley_broker::core::mail_from_bytes(bytes, now) {
            Ok(batch) => batch,
            Err(e) => {
                self.history.fail(
                    self.now,
                    format!("mail from node {from} to shard {to} did not decode: {e}"),
                );
                return;
            }
        };
        self.note(13, to as u64, batch.len() as u64, || {
            format!(
                "shard {to}: a batch of {} from node {from}: {}",
                batch.len(),
                kinds(&batch)
            )
        });
        self.counters.remote_mail_in += batch.len() as u64;
        if let Some(core) = self.core_mut(to) {
            core.handle_mail(batch, now);
        }
        self.apply(to);
    }

    /// Node `node` renews its lease, unless Redis loses the write (one in eight, and all of
    /// them during an outage before the run quiesces).
    pub(super) fn beat(&mut self, node: usize, epoch: u64) {
        if epoch != self.epochs[node] || self.nodes[node].is_none() {
            return;
        }
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let lost = !self.quiescing && (self.now < c.redis_down_until || self.rng.chance(125));
        self.note(27, node as u64, u64::from(lost), || {
            format!("node {node} renews its lease (lost: {lost})")
        });
        if !lost {
            let until = self.now + LEASE_MS;
            if let Some(n) = self.nodes[node].as_mut() {
                for core in &mut n.cores {
                    core.set_lease(until);
                }
            }
        }
        let t = self.now + HEARTBEAT_MS;
        self.at(t, Ev::Beat { node, epoch });
    }

    /// A fault: Redis takes no writes until `until`.
    pub(super) fn redis_down(&mut self, until: u64) {
        self.note(28, until, 0, || {
            format!("REDIS: takes no writes until {until} ms")
        });
        if let Some(c) = self.cluster.as_mut() {
            c.redis_down_until = until;
        }
    }

    /// Opens node `node`'s gate a heartbeat from now if its links to every running node are
    /// up.
    fn maybe_settle(&mut self, node: usize) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        if c.settled[node] || self.nodes[node].is_none() {
            return;
        }
        let all_up = (0..c.nodes)
            .filter(|&p| p != node && self.nodes[p].is_some())
            .all(|p| c.established[c.pair(node, p)]);
        if all_up {
            let epoch = self.epochs[node];
            let t = self.now + HEARTBEAT_MS;
            self.at(t, Ev::Settle { node, epoch });
        }
    }

    /// Node `node`'s gate opens (if it is the same boot).
    pub(super) fn settle(&mut self, node: usize, epoch: u64) {
        if epoch != self.epochs[node] {
            return;
        }
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.settled[node] {
            return;
        }
        c.settled[node] = true;
        self.note(29, node as u64, 0, || format!("node {node} takes logins"));
        if let Some(n) = self.nodes[node].as_mut() {
            for core in &mut n.cores {
                core.set_settled(true);
            }
        }
    }
}
