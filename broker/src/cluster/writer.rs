//! The presence index's writer, sans-IO: the queue of route ops, batching, the answers to
//! waiting logins, the digest check and the replay. The bridge drives it with the time and a
//! [`RouteStore`] (Redis, through [`super::routes::ROUTES`]); the tests drive it with a model of
//! Redis that loses, repeats and forgets writes.
//!
//! ### Invariants
//! * Every ticketed `Up` pushed is answered exactly once: `Ok` once a batch holding it was
//!   written, `Err` (UNAVAILABLE) when its deadline passes first, or `Err` at once when the
//!   queue holds `max_queue` ops already.
//! * The queue is bounded: ticketed `Up`s enter only below `max_queue`; the other ops are
//!   withdrawals of routes held (at most one per route) and in-process `Up`s.
//! * The mirror holds exactly the routes whose `Up` was written and whose `Down` was not; a
//!   route whose login expired is withdrawn (it may have been written by a run whose answer was
//!   lost) without counting in the digest.
//! * After a check that succeeds without a difference, or a replay that succeeds, the store
//!   holds this node's routes exactly as the mirror does (the digest says so).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::routes::{self, Digest, Mirror};
use crate::core::{RouteOp, RouteTag, Routed};

/// What one write does (see [`routes::ROUTES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Register (counts in the digest).
    Up,
    /// Withdraw a route the digest counts.
    Down,
    /// Withdraw a route the digest does not count (one never known to be written).
    Forget,
    /// Renew the TTL of the user's key only.
    Renew,
}

impl Kind {
    /// The op letter of [`routes::ROUTES`].
    pub(crate) fn letter(self) -> &'static str {
        match self {
            Kind::Up => "U",
            Kind::Down => "D",
            Kind::Forget => "X",
            Kind::Renew => "R",
        }
    }
}

/// One route write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Write<'a> {
    pub(crate) kind: Kind,
    pub(crate) user: &'a str,
    pub(crate) device: &'a str,
    pub(crate) tag: RouteTag,
}

/// Where the writer writes: one run of [`routes::ROUTES`] per call.
pub(crate) trait RouteStore {
    /// Why a run failed (it may or may not have been applied).
    type Error;
    /// Applies `writes` in order (`reset`: the digest starts again from zero); the digest
    /// after.
    fn run(&mut self, writes: &[Write<'_>], reset: bool) -> Result<Digest, Self::Error>;
}

/// A route op waiting to be written.
#[derive(Debug)]
struct Queued {
    op: RouteOp,
    /// For a login waiting on it: when it is answered UNAVAILABLE instead.
    deadline: Option<Instant>,
}

/// What a replay or check came to, for the bridge's log and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Outcome {
    /// Ops written.
    pub(crate) writes: u64,
    /// Replays run.
    pub(crate) replays: u64,
}

/// The writer of one node's routes.
#[derive(Debug)]
pub(crate) struct RouteWriter {
    queue: VecDeque<Queued>,
    mirror: Mirror,
    /// How long a login waits for its route.
    timeout: Duration,
    /// The retry hint of a login answered UNAVAILABLE.
    retry_after_ms: u32,
    /// No run has succeeded yet: runs reset the digest (a new boot starts from zero).
    fresh: bool,
    /// Most ops queued before a login is refused at once (`cluster.max_pending_routes`).
    max_queue: usize,
}

impl RouteWriter {
    /// A writer whose logins wait at most `timeout`, then are told to retry after
    /// `retry_after_ms`; past `max_queue` queued ops a login is refused at once.
    pub(crate) fn new(timeout: Duration, retry_after_ms: u32, max_queue: usize) -> Self {
        RouteWriter {
            queue: VecDeque::new(),
            mirror: Mirror::default(),
            timeout,
            retry_after_ms,
            fresh: true,
            max_queue: max_queue.max(1),
        }
    }

    /// Queues `op` (a ticketed `Up` waits at most the timeout from `now`). A login that finds
    /// the queue full (Redis has not answered for a while) is answered UNAVAILABLE at once:
    /// that answer is returned.
    pub(crate) fn push(&mut self, op: RouteOp, now: Instant) -> Option<Routed> {
        let deadline = match &op {
            RouteOp::Up {
                ticket: Some(ticket),
                user,
                device,
                tag,
            } => {
                if self.queue.len() >= self.max_queue {
                    return Some(Routed {
                        ticket: *ticket,
                        user: Arc::clone(user),
                        device: Arc::clone(device),
                        tag: *tag,
                        result: Err(self.retry_after_ms),
                    });
                }
                Some(now + self.timeout)
            }
            _ => None,
        };
        self.queue.push_back(Queued { op, deadline });
        None
    }

    /// Whether ops wait to be written.
    pub(crate) fn pending(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The earliest login deadline, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.iter().filter_map(|q| q.deadline).min()
    }

    /// Routes held.
    pub(crate) fn routes(&self) -> usize {
        self.mirror.len()
    }

    /// Answers UNAVAILABLE every login whose deadline passed at `now`; its op becomes a
    /// withdrawal.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Routed> {
        let mut answers = Vec::new();
        for q in &mut self.queue {
            if q.deadline.is_some_and(|d| now >= d)
                && let RouteOp::Up {
                    ticket: Some(ticket),
                    user,
                    device,
                    tag,
                } = &q.op
            {
                answers.push(Routed {
                    ticket: *ticket,
                    user: Arc::clone(user),
                    device: Arc::clone(device),
                    tag: *tag,
                    result: Err(self.retry_after_ms),
                });
                q.op = RouteOp::Down {
                    user: Arc::clone(user),
                    device: Arc::clone(device),
                    tag: *tag,
                };
                q.deadline = None;
            }
        }
        answers
    }

    /// Writes the queued ops, a batch per run, until none is left or a run fails (the rest
    /// stay queued). Returns the answers of the logins written, what was done, and the error
    /// that stopped it, if one did. A digest that differs after a batch makes it replay.
    pub(crate) fn flush<S: RouteStore>(
        &mut self,
        store: &mut S,
    ) -> (Vec<Routed>, Outcome, Option<S::Error>) {
        let mut answers = Vec::new();
        let mut outcome = Outcome::default();
        while !self.queue.is_empty() {
            let n = self.queue.len().min(routes::BATCH);
            let ops: Vec<RouteOp> = self.queue.iter().take(n).map(|q| q.op.clone()).collect();
            let writes: Vec<Write<'_>> = ops.iter().map(|op| self.write_of(op)).collect();
            match store.run(&writes, self.fresh) {
                Ok(digest) => {
                    self.fresh = false;
                    outcome.writes += n as u64;
                    self.queue.drain(..n);
                    for op in &ops {
                        self.mirror.apply(op);
                        if let RouteOp::Up {
                            ticket: Some(ticket),
                            user,
                            device,
                            tag,
                        } = op
                        {
                            answers.push(Routed {
                                ticket: *ticket,
                                user: Arc::clone(user),
                                device: Arc::clone(device),
                                tag: *tag,
                                result: Ok(()),
                            });
                        }
                    }
                    if digest != self.mirror.digest()
                        && let Err(e) = self.replay(store, &mut outcome)
                    {
                        return (answers, outcome, Some(e));
                    }
                }
                Err(e) => return (answers, outcome, Some(e)),
            }
        }
        (answers, outcome, None)
    }

    /// The check of a heartbeat: renews the TTLs of the next `renew` routes and compares the
    /// digests, replaying on a difference.
    pub(crate) fn check<S: RouteStore>(
        &mut self,
        store: &mut S,
        renew: usize,
    ) -> (Outcome, Result<(), S::Error>) {
        let mut outcome = Outcome::default();
        let slice = self.mirror.next_to_renew(renew.min(routes::BATCH));
        let writes: Vec<Write<'_>> = slice
            .iter()
            .map(|(tag, r)| Write {
                kind: Kind::Renew,
                user: &r.user,
                device: &r.device,
                tag: *tag,
            })
            .collect();
        let result = match store.run(&writes, self.fresh) {
            Ok(digest) if digest != self.mirror.digest() => self.replay(store, &mut outcome),
            Ok(_) => {
                self.fresh = false;
                Ok(())
            }
            Err(e) => Err(e),
        };
        (outcome, result)
    }

    /// Writes every route again from a digest of zero.
    fn replay<S: RouteStore>(
        &mut self,
        store: &mut S,
        outcome: &mut Outcome,
    ) -> Result<(), S::Error> {
        outcome.replays += 1;
        let all = self.mirror.all();
        tracing::warn!(
            routes = all.len(),
            "cluster: the presence index in Redis differs from this node's routes (Redis \
             restarted, failed over or lost writes); writing them again"
        );
        if all.is_empty() {
            store.run(&[], true)?;
            self.fresh = false;
            return Ok(());
        }
        for (i, chunk) in all.chunks(routes::BATCH).enumerate() {
            let writes: Vec<Write<'_>> = chunk.iter().map(|op| self.write_of(op)).collect();
            store.run(&writes, i == 0)?;
            self.fresh = false;
            outcome.writes += chunk.len() as u64;
        }
        Ok(())
    }

    /// How `op` is written now: a withdrawal of a route the mirror does not hold does not
    /// count in the digest.
    fn write_of<'a>(&self, op: &'a RouteOp) -> Write<'a> {
        match op {
            RouteOp::Up {
                user, device, tag, ..
            } => Write {
                kind: Kind::Up,
                user,
                device,
                tag: *tag,
            },
            RouteOp::Down { user, device, tag } => Write {
                kind: if self.mirror.holds(*tag) {
                    Kind::Down
                } else {
                    Kind::Forget
                },
                user,
                device,
                tag: *tag,
            },
        }
    }
}

#[cfg(test)]
mod tests;
