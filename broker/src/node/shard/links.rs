//! The driver's side of in-process connections ([`super::super::local`]) and of the
//! application's questions ([`Query`]): a child of the driver, so it works on its tables.

use super::{Driver, Intake, LocalPipe, Query};
use crate::core::{ConnId, Now};

impl Driver {
    /// The local pipe of `conn`, if it is an in-process connection.
    pub(super) fn local(&self, conn: ConnId) -> Option<&LocalPipe> {
        self.locals
            .get(conn.slot as usize)
            .and_then(Option::as_ref)
            .filter(|p| p.generation == conn.generation)
    }

    pub(super) fn local_mut(&mut self, conn: ConnId) -> Option<&mut LocalPipe> {
        self.locals
            .get_mut(conn.slot as usize)
            .and_then(Option::as_mut)
            .filter(|p| p.generation == conn.generation)
    }

    pub(super) fn take_local(&mut self, conn: ConnId) -> Option<LocalPipe> {
        self.local(conn)?;
        let pipe = self.locals.get_mut(conn.slot as usize)?.take()?;
        self.local_ids.remove(&pipe.id);
        Some(pipe)
    }

    /// Feeds a local connection's input to the core while it takes input, within the turn's
    /// byte budget (the rest waits for the next turn, after everyone else).
    pub(super) fn service_local(&mut self, conn: ConnId, now: Now) {
        let budget = self.read_budget;
        let mut total = 0;
        let mut handled = false;
        loop {
            match self.core.intake(conn) {
                None => return self.apply_effects(now),
                Some(Intake::Hold) => return,
                Some(Intake::Pending) if handled => return self.ready.push(conn),
                Some(Intake::Pending) => {
                    self.core.handle_continue(conn, now);
                    handled = true;
                }
                Some(Intake::Read) if total >= budget => return self.ready.push(conn),
                Some(Intake::Read) => {
                    let Some(chunk) = self.local_mut(conn).and_then(|p| p.input.pop_front()) else {
                        return;
                    };
                    total += chunk.len();
                    self.core.handle_bytes(conn, &chunk, now);
                    handled = true;
                }
            }
        }
    }

    /// Hands a local connection's queued output to its client, within the window.
    pub(super) fn transmit_local(&mut self, conn: ConnId, now: Now) {
        let Some(pipe) = self
            .locals
            .get_mut(conn.slot as usize)
            .and_then(Option::as_mut)
            .filter(|p| p.generation == conn.generation)
        else {
            return;
        };
        let Some(buf) = self.core.outbound(conn) else {
            return;
        };
        if buf.is_empty() {
            return;
        }
        match pipe.write(buf) {
            Some(n) => self.core.handle_written(conn, n > 0, now),
            None => {
                // The client is gone.
                self.take_local(conn);
                self.core.handle_reset(conn, now);
            }
        }
    }

    /// Answers the application's question.
    pub(super) fn answer(&mut self, q: Query, now: Now) {
        match q {
            Query::Kick {
                user,
                device,
                reason,
                reply,
            } => {
                let n = self.core.kick(&user, device.as_deref(), &reason, now);
                self.apply_effects(now);
                let _ = reply.send(n);
            }
            Query::Online {
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(self.core.online_users(&after, limit));
            }
            Query::Inspect { key, reply } => {
                let _ = reply.send(self.core.inspect(&key));
            }
        }
    }
}
