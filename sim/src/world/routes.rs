//! The simulated cluster's presence index: Redis's side of the route ops the nodes of a cluster
//! send (in every seed of several nodes, and a third of those of one), and the check that it
//! names exactly the devices logged in.

use std::collections::BTreeMap;

use std::sync::Arc;

use parley_broker::core::{RouteOp, RouteTag, Routed};

use super::{Ev, World};

/// The presence index of a simulated cluster: Redis's side of the route ops, applied in order
/// per node (as its bridge writes them) after a random delay, with one registration in
/// ten not getting through in time, and none during a Redis outage (the login is closed
/// UNAVAILABLE).
#[derive(Debug)]
pub(super) struct SimIndex {
    /// (user, device) → the connection its route names.
    pub(super) index: BTreeMap<(String, String), RouteTag>,
    /// Per node: when the last op queued applies (a node's ops apply in order).
    pub(super) last_at: Vec<u64>,
}

impl SimIndex {
    /// The index of a cluster of `nodes` nodes.
    pub(super) fn new(nodes: usize) -> Self {
        SimIndex {
            index: BTreeMap::new(),
            last_at: vec![0; nodes],
        }
    }
}

impl World {
    /// Queues a route op of global shard `shard` for the simulated index (in order, after a
    /// random delay).
    pub(super) fn queue_route(&mut self, shard: usize, op: RouteOp) {
        let node = self.node_of(shard);
        let delay = self.rng.range(1, 80);
        let redis_down = self
            .cluster
            .as_ref()
            .is_some_and(|c| self.now < c.redis_down_until);
        let fail = matches!(
            op,
            RouteOp::Up {
                ticket: Some(_),
                ..
            }
        ) && (redis_down || self.rng.chance(100));
        let Some(r) = self.routes.as_mut() else {
            self.history
                .fail(self.now, format!("a route op without a cluster: {op:?}"));
            return;
        };
        let t = (self.now + delay).max(r.last_at[node]);
        r.last_at[node] = t;
        let epoch = self.epochs[node];
        self.at(
            t,
            Ev::Route {
                node,
                epoch,
                op,
                fail,
            },
        );
    }

    /// The simulated index applies node `node`'s `op` and answers its registration.
    pub(super) fn route(&mut self, node: usize, epoch: u64, op: RouteOp, fail: bool) {
        if epoch != self.epochs[node] {
            // The node that asked is gone (its routes with it: a new boot starts empty).
            return;
        }
        let Some(r) = self.routes.as_mut() else {
            return;
        };
        let answer = match op {
            RouteOp::Up {
                ticket,
                user,
                device,
                tag,
            } => {
                if !fail {
                    r.index.insert((user.to_string(), device.to_string()), tag);
                }
                self.note(18, u64::from(tag.slot), u64::from(fail), || {
                    format!("index: route {user}/{device} -> {tag} (failed: {fail})")
                });
                ticket.map(|ticket| Routed {
                    ticket,
                    user,
                    device,
                    tag,
                    result: if fail { Err(50) } else { Ok(()) },
                })
            }
            RouteOp::Down { user, device, tag } => {
                let key = (user.to_string(), device.to_string());
                if r.index.get(&key) == Some(&tag) {
                    r.index.remove(&key);
                }
                self.note(19, u64::from(tag.slot), 0, || {
                    format!("index: withdraw {user}/{device} of {tag}")
                });
                None
            }
        };
        if let Some(done) = answer {
            let shard = done.ticket.shard();
            let now = self.now();
            if let Some(core) = self.core_mut(shard) {
                core.handle_routed(vec![done], now);
            }
            self.apply(shard);
        }
    }

    /// At the end: the index names exactly the devices logged in, each at its connection;
    /// then every client hangs up, and the index must end empty.
    pub(super) fn check_routes(&mut self) {
        if self.routes.is_none() {
            return;
        }
        // Withdrawals still on their way apply first (the bridge would write them).
        self.drain_routes(true);
        self.compare_routes();
        for s in 0..self.socks.len() {
            if !self.socks[s].closed {
                let ci = self.socks[s].client;
                self.client_drop(ci, s, true);
            }
        }
        self.drain_routes(false);
        self.compare_routes();
    }

    /// Applies the route ops on their way, in order, and those they lead to (only withdrawals
    /// if `downs_only`), leaving every other event where it is.
    fn drain_routes(&mut self, downs_only: bool) {
        for _ in 0..10_000 {
            let next = self.events.iter().find_map(|(k, ev)| match ev {
                Ev::Route { op, .. } if !downs_only || matches!(op, RouteOp::Down { .. }) => {
                    Some(*k)
                }
                _ => None,
            });
            let Some(key) = next else {
                return;
            };
            if let Some(Ev::Route {
                node,
                epoch,
                op,
                fail,
            }) = self.events.remove(&key)
            {
                self.now = self.now.max(key.0);
                self.route(node, epoch, op, fail);
            }
        }
        self.history
            .fail(self.now, "route ops kept coming at the end".into());
    }

    /// The index names exactly the devices the cores hold as routed.
    fn compare_routes(&mut self) {
        let mut held: BTreeMap<(String, String), RouteTag> = BTreeMap::new();
        for n in self.nodes.iter().flatten() {
            for core in &n.cores {
                for (user, device, tag) in core.routes() {
                    let key = (user.to_string(), device.to_string());
                    if let Some(other) = held.insert(key, tag) {
                        self.history.fail(
                            self.now,
                            format!("{user}/{device} is routed at {other} and at {tag}"),
                        );
                    }
                }
            }
        }
        let index = self
            .routes
            .as_ref()
            .map(|r| r.index.clone())
            .unwrap_or_default();
        if index != held {
            self.history.fail(
                self.now,
                format!("the presence index {index:?} differs from the devices logged in {held:?}"),
            );
        }
    }

    /// Queues the index's answer to a presence lookup (after a random delay).
    pub(super) fn queue_lookup(&mut self, shard: usize, gather: u64, users: Vec<Arc<str>>) {
        let t = self.now + self.rng.range(1, 40);
        let epoch = self.epoch_of(shard);
        self.at(
            t,
            Ev::Found {
                epoch,
                shard,
                gather,
                users,
            },
        );
    }

    /// The index answers a presence lookup: the routes of `users`, each with its node's name.
    pub(super) fn found(&mut self, epoch: u64, shard: usize, gather: u64, users: &[Arc<str>]) {
        if epoch != self.epoch_of(shard) {
            return;
        }
        let found: Vec<(String, Vec<(String, String)>)> = match self.routes.as_ref() {
            Some(r) => users
                .iter()
                .map(|u| {
                    let devices = r
                        .index
                        .iter()
                        .filter(|((user, _), _)| **user == **u)
                        .map(|((_, device), tag)| {
                            (
                                device.clone(),
                                self.node_name(tag.shard as usize / self.shards),
                            )
                        })
                        .collect();
                    (u.to_string(), devices)
                })
                .collect(),
            None => Vec::new(),
        };
        let now = self.now();
        if let Some(core) = self.core_mut(shard) {
            core.handle_found(gather, found, now);
        }
        self.apply(shard);
    }
}
