//! Routes: the cluster's presence index (user, device → node) as a shard sees it.
//!
//! In a cluster (`cluster.redis` set), a device's login is answered only once its route is
//! registered: the home shard parks the login ([`Parked::Route`], the connection reads nothing
//! more), asks for the route with [`Effect::Route`]`(`[`RouteOp::Up`]`)`, and goes on when
//! [`ShardCore::handle_routed`] says how it went: logged in, or closed with UNAVAILABLE and a
//! retry hint when the index could not be written in time. When a routed connection goes, its
//! route is withdrawn ([`RouteOp::Down`]). Who carries the ops to Redis (batched, off the shard)
//! is the driver's business (`crate::cluster`).
//!
//! A route names its connection by a [`RouteTag`], unique within the process, so withdrawing
//! an old connection's route never removes a newer one of the same device (a device that
//! logged in again, here or on another node).
//!
//! In-process connections of the application (trusted) register without waiting: their login
//! is the application's own, and it expects the connection at once. Service connections are no
//! device and have no route.
//!
//! ### Invariants
//! * Every `Up` that was answered as registered is matched by exactly one `Down`: at the
//!   connection's removal, or at once when the answer finds the connection gone.

use std::sync::Arc;

use parley_storage::Backend;

use super::conn::{ConnId, Input};
use super::error::CloseReason;
use super::gate::Parked;
use super::{Effect, Now, ShardCore};
use crate::auth::Identity;
use crate::hooks::Ticket;

/// Names one routed connection within a process: its shard, slot and the slot's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteTag {
    /// The shard.
    pub shard: u32,
    /// The slot in the shard's table.
    pub slot: u32,
    /// The slot's generation.
    pub generation: u32,
}

impl std::fmt::Display for RouteTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.shard, self.slot, self.generation)
    }
}

/// A change to the presence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteOp {
    /// The device is connected here: register its route, then answer with
    /// [`ShardCore::handle_routed`] (`ticket` `None`: nobody waits, no answer is wanted).
    Up {
        /// The parked login it answers.
        ticket: Option<Ticket>,
        /// The user.
        user: Arc<str>,
        /// The device.
        device: Arc<str>,
        /// The connection.
        tag: RouteTag,
    },
    /// The connection is gone: withdraw its route (only if it is still this connection's).
    Down {
        /// The user.
        user: Arc<str>,
        /// The device.
        device: Arc<str>,
        /// The connection.
        tag: RouteTag,
    },
}

/// The answer to a [`RouteOp::Up`] with a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The parked login.
    pub ticket: Ticket,
    /// The user (as asked).
    pub user: Arc<str>,
    /// The device (as asked).
    pub device: Arc<str>,
    /// The connection (as asked).
    pub tag: RouteTag,
    /// `Ok`: registered. `Err(retry_after_ms)`: not registered in time; the client may retry
    /// after this long.
    pub result: Result<(), u32>,
}

impl<B: Backend> ShardCore<B> {
    /// The route tag of `conn` on this shard.
    pub(super) fn route_tag(&self, conn: ConnId) -> RouteTag {
        RouteTag {
            shard: self.index as u32,
            slot: conn.slot,
            generation: conn.generation,
        }
    }

    /// The routes this shard holds: every logged-in connection whose route was registered
    /// (for checks: the simulation compares them with its presence index).
    pub fn routes(&self) -> Vec<(Arc<str>, Arc<str>, RouteTag)> {
        self.conns
            .iter()
            .flatten()
            .filter_map(|c| {
                let who = c.who.as_ref().filter(|w| w.routed)?;
                Some((
                    Arc::clone(&who.device.user),
                    Arc::clone(&who.device.device),
                    self.route_tag(c.id),
                ))
            })
            .collect()
    }

    /// In a cluster, parks the login of `identity` on `conn` until its route is registered and
    /// returns `true`; otherwise (no cluster) `false`: log in now.
    pub(super) fn park_for_route(
        &mut self,
        conn: ConnId,
        identity: Identity,
        request_id: u64,
    ) -> bool {
        if !self.cfg.cluster_routes {
            return false;
        }
        let user: Arc<str> = identity.user.as_str().into();
        let device: Arc<str> = identity.device.as_str().into();
        let tag = self.route_tag(conn);
        let Some(ticket) = self.gate.park(
            self.index,
            conn,
            Parked::Route {
                request_id,
                identity,
            },
        ) else {
            return false;
        };
        if let Some(c) = self.live_conn_mut(conn) {
            c.input = Input::Parked;
        }
        self.counters.routes_asked += 1;
        self.effects.push(Effect::Route(RouteOp::Up {
            ticket: Some(ticket),
            user,
            device,
            tag,
        }));
        true
    }

    /// Registers the route of a trusted in-process connection without waiting for it.
    pub(super) fn route_without_waiting(
        &mut self,
        conn: ConnId,
        user: &Arc<str>,
        device: &Arc<str>,
    ) {
        if !self.cfg.cluster_routes {
            return;
        }
        self.counters.routes_asked += 1;
        self.effects.push(Effect::Route(RouteOp::Up {
            ticket: None,
            user: Arc::clone(user),
            device: Arc::clone(device),
            tag: self.route_tag(conn),
        }));
        if let Some(c) = self.live_conn_mut(conn)
            && let Some(who) = c.who.as_mut()
        {
            who.routed = true;
        }
    }

    /// Withdraws the route of a connection being removed, if it has one.
    pub(super) fn route_down(&mut self, conn: ConnId, user: Arc<str>, device: Arc<str>) {
        if self.test_switches.keep_routes {
            return;
        }
        let tag = self.route_tag(conn);
        self.effects
            .push(Effect::Route(RouteOp::Down { user, device, tag }));
    }

    /// How route registrations went: each parked login goes on (logged in, or closed with
    /// UNAVAILABLE); a registration whose connection is gone meanwhile is withdrawn at once.
    pub fn handle_routed(&mut self, done: Vec<Routed>, now: Now) {
        self.now = now;
        for r in done {
            let conn = ConnId {
                slot: r.ticket.slot,
                generation: r.ticket.generation,
            };
            let parked = match self.gate.unpark(conn, r.ticket.serial) {
                Some(Parked::Route {
                    request_id,
                    identity,
                }) => Some((request_id, identity)),
                Some(other) => {
                    debug_assert!(false, "a route answer for {other:?}");
                    None
                }
                None => None,
            };
            let Some((request_id, identity)) = parked else {
                // The login is gone (closed, timed out): nobody holds this route.
                if r.result.is_ok() {
                    self.counters.routes_orphaned += 1;
                    self.effects.push(Effect::Route(RouteOp::Down {
                        user: r.user,
                        device: r.device,
                        tag: r.tag,
                    }));
                }
                continue;
            };
            if let Some(c) = self.live_conn_mut(conn) {
                debug_assert_eq!(c.input, Input::Parked);
                c.input = Input::Backlog;
                self.effects.push(Effect::Resume(conn));
            }
            match r.result {
                Ok(()) => {
                    self.activate_now(conn, identity, request_id, false, false);
                    if let Some(c) = self.live_conn_mut(conn)
                        && let Some(who) = c.who.as_mut()
                    {
                        who.routed = true;
                    }
                }
                Err(retry_after_ms) => {
                    self.counters.routes_failed += 1;
                    self.close(
                        conn,
                        request_id,
                        Some(CloseReason::Unavailable { retry_after_ms }),
                    );
                }
            }
            self.after_io(conn);
        }
        self.drain_local();
    }
}
