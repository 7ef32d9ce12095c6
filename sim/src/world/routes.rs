//! The simulated cluster's presence index: Redis's side of the route ops a node in a cluster
//! sends (in a third of the seeds), and the check that it names exactly the devices logged in.

use std::collections::BTreeMap;

use std::sync::Arc;

use parley_broker::core::{RouteOp, RouteTag, Routed};

use super::{Ev, World};

/// The presence index of a simulated cluster (in a third of the seeds): Redis's side of the
/// route ops, applied in order (as the bridge writes them) after a random delay, with one
/// registration in ten not getting through in time (the login is closed UNAVAILABLE).
#[derive(Debug, Default)]
pub(super) struct SimIndex {
    /// (user, device) → the connection its route names.
    pub(super) index: BTreeMap<(String, String), RouteTag>,
    /// When the last op queued applies (ops apply in order).
    pub(super) last_at: u64,
}

impl World {
    /// Queues a route op for the simulated index (in order, after a random delay).
    pub(super) fn queue_route(&mut self, op: RouteOp) {
        let delay = self.rng.range(1, 80);
        let fail = matches!(
            op,
            RouteOp::Up {
                ticket: Some(_),
                ..
            }
        ) && self.rng.chance(100);
        let Some(r) = self.routes.as_mut() else {
            self.history
                .fail(self.now, format!("a route op without a cluster: {op:?}"));
            return;
        };
        let t = (self.now + delay).max(r.last_at);
        r.last_at = t;
        let epoch = self.epoch;
        self.at(t, Ev::Route { epoch, op, fail });
    }

    /// The simulated index applies `op` and answers its registration.
    pub(super) fn route(&mut self, epoch: u64, op: RouteOp, fail: bool) {
        if epoch != self.epoch {
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
            if let Some(n) = self.node.as_mut()
                && let Some(core) = n.cores.get_mut(shard)
            {
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
            if let Some(Ev::Route { epoch, op, fail }) = self.events.remove(&key) {
                self.now = self.now.max(key.0);
                self.route(epoch, op, fail);
            }
        }
        self.history
            .fail(self.now, "route ops kept coming at the end".into());
    }

    /// The index names exactly the devices the cores hold as routed.
    fn compare_routes(&mut self) {
        let mut held: BTreeMap<(String, String), RouteTag> = BTreeMap::new();
        if let Some(n) = self.node.as_ref() {
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
        let epoch = self.epoch;
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

    /// The index answers a presence lookup: the routes of `users` (all of them this node's,
    /// the only node simulated).
    pub(super) fn found(&mut self, epoch: u64, shard: usize, gather: u64, users: &[Arc<str>]) {
        if epoch != self.epoch {
            return;
        }
        let node = self
            .config
            .cluster
            .effective_node_id(&self.config.node)
            .to_owned();
        let found: Vec<(String, Vec<(String, String)>)> = match self.routes.as_ref() {
            Some(r) => users
                .iter()
                .map(|u| {
                    let devices = r
                        .index
                        .keys()
                        .filter(|(user, _)| **user == **u)
                        .map(|(_, device)| (device.clone(), node.clone()))
                        .collect();
                    (u.to_string(), devices)
                })
                .collect(),
            None => Vec::new(),
        };
        let now = self.now();
        if let Some(n) = self.node.as_mut()
            && let Some(core) = n.cores.get_mut(shard)
        {
            core.handle_found(gather, found, now);
        }
        self.apply(shard);
    }
}
