//! The socket layer under a shard's mio loop: listening sockets ([`listener`]) and one
//! connection's buffered, nonblocking I/O ([`Conn`]). No protocol here: the bytes are turned into
//! frames by [`crate::transport::Transport`], and the session above decides what to say.
//!
//! # Accepting: one `SO_REUSEPORT` listener per shard
//!
//! Every shard binds its own listener on the node's port with `SO_REUSEPORT`
//! ([`listener::bind`]) and registers it in its own `mio::Poll`. The kernel spreads incoming
//! connections over the listeners (by a hash of the 4-tuple), so a connection is accepted by the
//! shard that serves it for its whole life:
//!
//! * no acceptor thread and no hand-over of sockets between threads (no channel, no wake-up, no
//!   second registration) on the connection-rate path;
//! * no shared accept queue and no thundering herd: each shard's queue is its own;
//! * shards accept in parallel, each at its own pace.
//!
//! The trade-offs, accepted: the spread is by hash, not by load (at thousands of connections
//! the shards even out); a connection waits in its shard's accept queue while that shard is busy
//! (bounded by the shard's batch size); and closing a shard's listener resets the connections
//! still queued on it, so listeners live as long as the node serves. Linux lets only sockets of
//! the same effective user join a `SO_REUSEPORT` group, so another user cannot steal the
//! port's connections.
//!
//! # Loop contract (mio is edge-triggered)
//!
//! * Register each [`Conn`] once with `Interest::READABLE | Interest::WRITABLE`; never
//!   re-register. An edge comes only after `WouldBlock`, so:
//! * On readable: [`Conn::read`] with the fairness budget; decode everything it brought
//!   ([`Conn::buffers`] gives the transport both buffers); if the read stopped at the budget
//!   ([`ReadStatus::BudgetExhausted`]) no new event will come: put the connection on the shard's
//!   "come back" list for the next turn.
//! * After writing frames into [`Conn::out_buf`], [`Conn::flush`] once per turn (many frames, one
//!   `write`). If it reports `blocked`, wait for the writable event, which then calls `flush`
//!   again; progress (`written > 0`) resets the write-stall timer; [`Conn::queued_bytes`] against
//!   the per-connection bound decides backpressure.
//! * At the end of a turn for a connection, [`Conn::shrink_buffers`], so an idle connection holds
//!   no buffer.
//! * To close: the transport's last words go into the out buffer, then [`Conn::drive_close`] on
//!   every event (and at once) until [`CloseProgress::Done`] or the shard's close timer fires;
//!   then drop the `Conn` (deregistering it first).
//!
//! # Buffers
//!
//! An idle connection holds no buffer memory: a [`Conn`] is a socket, two empty `BytesMut` and an
//! empty chunk queue (about 100 bytes, no heap). See [`Conn`] for when buffers grow and when they
//! are released.

pub mod conn;
pub mod listener;

pub use conn::{CloseProgress, Conn, FlushOutcome, READ_MAX, ReadOutcome, ReadStatus};
