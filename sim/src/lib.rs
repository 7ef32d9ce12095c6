//! A deterministic simulation of a whole parley node.
//!
//! One thread runs every shard core of a node ([`parley_broker::core::ShardCore`]) over the
//! in-memory storage backend, a fake network and a fake clock. A seeded scheduler orders every
//! event — a client's action, bytes arriving at either end of a connection (with delay, and with
//! a receive window so a client that stops reading pushes back), a batch or a handed-over
//! connection between shards, a flush completing, a deadline firing, a crash of the whole node
//! (losing whatever was not flushed, sometimes keeping some unsynced pages, as out-of-order
//! writeback does) and its restart from what the disk kept. Time jumps to the next event.
//!
//! Simulated clients follow the protocol: they log in, sync from what they hold, resend unacked
//! sends with the same client message id after a reconnect, ack cumulatively, answer `Behind`
//! with a sync, and some go slow (stop reading), stop acking, or drop their connection on purpose.
//! At the end every fault stops, every client syncs once more, and the checker reads the whole
//! history ([`check`]).
//!
//! The same seed gives the same history: the run's trace hash is compared across two runs in the
//! tests. `cargo run -p parley-sim -- --seeds N` runs any number of seeds and prints a failing
//! seed with its trace.

mod check;
mod client;
mod rng;
mod setup;
mod world;

pub use rng::Rng;
pub use world::{Options, Outcome, Plant, run};
