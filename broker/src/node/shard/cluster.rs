//! The driver's side of a cluster: route ops for the presence index, handed to the bridge, and
//! mail for other nodes' shards, collected over a turn and sent on the links
//! ([`crate::cluster::carrier`]); mail from other nodes, decoded and handed to the core.

use bytes::Bytes;

use super::{Driver, ROUTE_RETRY_MS};
use crate::cluster::BridgeMsg;
use crate::core::{Now, RouteOp, Routed, ShardMsg};
use crate::loglimit::LogKind;

impl Driver {
    /// Hands a route op to the cluster bridge; a login whose op cannot be queued (the bridge's
    /// inbox is full) is answered UNAVAILABLE at once.
    pub(super) fn route(&mut self, op: RouteOp, now: Now) {
        let refused = match &self.bridge {
            Some(tx) => match tx.try_send(BridgeMsg::Route(op)) {
                Ok(()) => return,
                Err(e) => match e.into_inner() {
                    BridgeMsg::Route(op) => op,
                    BridgeMsg::Lookup { .. } | BridgeMsg::Presence { .. } => return,
                },
            },
            None => op,
        };
        // A withdrawal that cannot be queued is left to the bridge's digest check.
        if let RouteOp::Up {
            ticket: Some(ticket),
            user,
            device,
            tag,
        } = refused
        {
            self.core.handle_routed(
                vec![Routed {
                    ticket,
                    user,
                    device,
                    tag,
                    result: Err(ROUTE_RETRY_MS),
                }],
                now,
            );
        }
    }

    /// Queues `batch` for shard `to` of another node: the turn's mail for each such shard goes
    /// out together, as one frame ([`Driver::flush_remote`]).
    pub(super) fn queue_remote(&mut self, to: usize, mut batch: Vec<ShardMsg>) {
        if batch.is_empty() {
            return;
        }
        match self.remote_out.iter_mut().find(|(t, _)| *t == to) {
            Some((_, queued)) => queued.append(&mut batch),
            None => self.remote_out.push((to, batch)),
        }
    }

    /// Sends the turn's mail for other nodes (what the core answers to mail it gets back, if a
    /// node cannot be reached, goes out in the same way, a few rounds at most).
    pub(super) fn flush_remote(&mut self, now: Now) {
        for _ in 0..4 {
            if self.remote_out.is_empty() {
                return;
            }
            for (to, batch) in std::mem::take(&mut self.remote_out) {
                self.send_remote(to, batch, now);
            }
            self.apply_effects(now);
        }
    }

    /// Sends `batch` to shard `to` of another node, or hands it back to the core if that node
    /// cannot be reached now.
    fn send_remote(&mut self, to: usize, batch: Vec<ShardMsg>, now: Now) {
        let (node, shard) = (
            self.placement.node_of(to),
            to % self.placement.shards_per_node(),
        );
        let n = batch.len() as u64;
        let bounced = match &self.carrier {
            Some(carrier) => carrier
                .send(node, shard, batch, &mut self.remote_scratch)
                .err(),
            None => Some(batch),
        };
        match bounced {
            None => self.remote_counts.0 += n,
            Some(batch) => {
                let retry = self.carrier.as_ref().map_or(1_000, |c| c.retry_after_ms);
                self.core.handle_unreachable(batch, retry, now);
            }
        }
    }

    /// Mail from node `from`'s shards.
    pub(super) fn remote_mail(&mut self, from: usize, bytes: &Bytes, now: Now) {
        match crate::core::wire::decode_shared(bytes, now.us) {
            Ok(batch) => {
                self.remote_counts.1 += batch.len() as u64;
                self.core.handle_mail(batch, now);
                self.apply_effects(now);
            }
            Err(e) => self.log(
                LogKind::Cluster,
                format_args!(
                    "mail from node {from} could not be decoded (a different release?): {e}"
                ),
            ),
        }
    }
}
