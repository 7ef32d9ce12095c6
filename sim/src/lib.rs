//! A deterministic simulation of whole parley nodes: one node alone, or a cluster of two or
//! three.
//!
//! One thread runs every shard core of every node ([`parley_broker::core::ShardCore`]) over the
//! in-memory storage backend, a fake network and a fake clock. A seeded scheduler orders every
//! event — a client's action, bytes arriving at either end of a connection (with delay, and with
//! a receive window so a client that stops reading pushes back), a batch or a handed-over
//! connection between shards, a flush completing, a deadline firing, a crash of a whole node
//! (losing whatever was not flushed, sometimes keeping some unsynced pages, as out-of-order
//! writeback does) and its restart from what the disk kept. Time jumps to the next event.
//!
//! In a cluster (four seeds in ten) clients connect to any node, and those whose user is homed
//! elsewhere are relayed to their home. Mail between nodes goes in the links' wire form over
//! links that break (a node's crash, or a cut) and come back, losing what was on them; Redis
//! (the presence index and the node leases) loses writes, and is sometimes down for a while,
//! so that a node runs past its lease and must refuse to assign seqs. See `world::cluster`.
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
