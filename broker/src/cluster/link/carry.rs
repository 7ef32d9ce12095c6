//! The link thread's side of shard mail between nodes ([`crate::cluster::carrier`]): frames
//! from this node's shards written on their links, mail from other nodes handed to this node's
//! shards (each woken once per turn), and every shard told when a link comes up or goes down.

use std::sync::atomic::Ordering;

use parley_proto::link_pb as lpb;

use super::{LinkError, LinkThread, MAX_LINK_BACKLOG, Phase};
use crate::node::shard::Mail;

impl LinkThread {
    /// Publishes that the link to `peer` is up (or down) and tells every shard, so that they
    /// send (or stop sending) it mail and do what `crate::core::remote` says.
    pub(super) fn tell_shards(&mut self, peer: &str, up: bool) {
        let Some(side) = &self.side else {
            return;
        };
        let Some(node) = side.position(peer) else {
            return;
        };
        side.set_up(node, up);
        for (tx, waker) in &side.peers {
            let mail = if up {
                Mail::LinkUp { node }
            } else {
                Mail::LinkDown { node }
            };
            // Blocking: a shard drains its inbox every turn, and this must not be lost.
            if tx.send(mail).is_ok() {
                let _ = waker.wake();
            }
        }
    }

    /// Writes the shards' mail on its links (mail for a node whose link just went down is
    /// dropped: the shards were told, and a link-up repairs what it held).
    pub(super) fn carry_out(&mut self) {
        let Some(side) = &self.side else {
            return;
        };
        // Before draining: a frame queued from now on wakes the thread again.
        side.notified.store(false, Ordering::SeqCst);
        // Bounded: the shards queue at most `OUTBOUND_FRAMES` frames.
        let frames: Vec<_> = side.rx.try_iter().collect();
        // Each link written once, after every frame for it was queued.
        let mut touched: Vec<usize> = Vec::new();
        for o in frames {
            let Some(peer) = self
                .side
                .as_ref()
                .and_then(|s| s.nodes.get(o.node))
                .cloned()
            else {
                continue;
            };
            let Some(slot) = self.conns.iter().position(|c| {
                c.as_ref().is_some_and(|c| {
                    matches!(c.phase, Phase::Up) && c.peer.as_deref() == Some(peer.as_str())
                })
            }) else {
                continue;
            };
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if c.wbuf.len() + o.frame.len() > MAX_LINK_BACKLOG {
                self.drop_conn(
                    slot,
                    Some(LinkError::Overloaded("over 64 MiB waiting to be written")),
                );
                continue;
            }
            c.wbuf.extend_from_slice(&o.frame);
            if !touched.contains(&slot) {
                touched.push(slot);
            }
        }
        for slot in touched {
            self.on_writable(slot);
        }
    }

    /// Decides whether the node has heard from the other nodes since it started (see
    /// [`LinkSide::settled`]): every live node of the cluster linked for a heartbeat (its
    /// link-up summaries came with it), or five heartbeats after the membership was first read
    /// (after the start, if Redis never answered) whatever the links.
    pub(super) fn settle(&mut self, now: std::time::Instant) {
        let Some(side) = &self.side else {
            return;
        };
        if side.settled.load(Ordering::Acquire) {
            return;
        }
        let heartbeat = self.me.heartbeat;
        let all_linked = self.members_known.is_some()
            && self
                .members
                .keys()
                .filter_map(|id| side.position(id))
                .all(|pos| side.is_up(pos));
        if !all_linked {
            self.all_linked_since = None;
        }
        let since = *self.all_linked_since.get_or_insert(now);
        let linked = all_linked && now.duration_since(since) >= heartbeat;
        let from = self.members_known.unwrap_or(self.started);
        let late = now.duration_since(from) >= heartbeat * 5;
        if linked || late {
            if !linked {
                tracing::warn!(
                    "cluster: not linked to every live node five heartbeats after joining; \
                     serving logins anyway (conversations owned by unlinked nodes may be missing \
                     from syncs until their links come up)"
                );
            }
            side.settled.store(true, Ordering::Release);
            for (_, waker) in &side.peers {
                let _ = waker.wake();
            }
        }
    }

    /// Wakes the shards that were handed mail since the last call (once each, however many
    /// frames each got).
    pub(super) fn wake_shards(&mut self) {
        let Some(side) = &mut self.side else {
            return;
        };
        for (shard, woken) in side.to_wake.iter_mut().enumerate() {
            if std::mem::take(woken)
                && let Some((_, waker)) = side.peers.get(shard)
            {
                let _ = waker.wake();
            }
        }
    }

    /// Mail from the node on `slot` for one of this node's shards.
    pub(super) fn carry_in(&mut self, slot: usize, m: lpb::Mail) {
        let Some(side) = &self.side else {
            return self.fail(slot, "mail, but this node has no cluster.nodes".into());
        };
        let from = self
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .and_then(|c| c.peer.as_deref())
            .and_then(|p| side.position(p));
        let shard = m.shard as usize;
        let (Some(from), Some((tx, waker))) = (from, side.peers.get(shard)) else {
            return self.fail(slot, format!("mail for shard {} of no node here", m.shard));
        };
        let mail = Mail::Remote {
            from,
            bytes: m.batch,
        };
        // A shard drains its inbox every turn; one that cannot take mail for half a heartbeat
        // is overloaded, and the link is closed (its shards are told, and a link-up repairs).
        let mail = match tx.try_send(mail) {
            Ok(()) => {
                if let Some(w) = self.side.as_mut().and_then(|s| s.to_wake.get_mut(shard)) {
                    *w = true;
                }
                return;
            }
            Err(e) => e.into_inner(),
        };
        // Full: wake it now and wait for room, half a heartbeat at most (longer would starve
        // the other links' pings).
        let _ = waker.wake();
        match tx.send_timeout(mail, self.me.heartbeat / 2) {
            Ok(()) => {
                let _ = waker.wake();
            }
            Err(_) => self.drop_conn(
                slot,
                Some(LinkError::Overloaded(
                    "a shard's inbox stayed full for half a heartbeat",
                )),
            ),
        }
    }
}
