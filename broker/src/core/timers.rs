//! What the shard's timing wheel holds: every deadline of the core, each with its owner.
//!
//! One wheel per shard ([`super::wheel::TimerWheel`], 1 ms ticks of the driver's monotonic
//! clock). Owners:
//! * a connection's session deadline (login, idle, write stall): one entry per connection,
//!   moved only when the deadline moves earlier, checked again when it fires;
//! * a delivery lane's retransmit deadline: one per (connection, conversation);
//! * the shard's maintenance tick (log retention, interval flush), owned by the shard itself;
//! * the presence flush (at most one in the wheel: the end of a coalescing window, or the next
//!   turn of a flush cut by its budget), owned by the shard's presence board.
//!
//! A deadline names a connection by [`ConnId`] (slot and generation), so a deadline of a closed
//! connection finds no one and is dropped.

use super::conn::ConnId;
use super::wheel::TimerWheel;

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerFor {
    /// The connection's session deadline.
    Session(ConnId),
    /// The retransmit of a delivery lane.
    Retransmit {
        /// The connection.
        conn: ConnId,
        /// The conversation id.
        conv: u64,
    },
    /// The shard's periodic maintenance.
    Maintenance,
    /// A presence flush turn.
    Presence,
}

/// The shard's timing wheel.
pub(crate) type Timers = TimerWheel<TimerFor>;
