//! The parley broker: event loop, shards, sessions, routing, timers, presence and cluster.
//!
//! * [`node`]: a running node: shard threads (one `mio::Poll` each), sessions, routing, group
//!   commit, sync. Start one with [`node::Node::start`].
//! * [`transport`] and [`net`]: bytes to frames (TCP, WebSocket) and sockets.
//! * [`wheel`]: the per-shard timing wheel. [`auth`]: tokens. [`config`]: settings.
//!   [`secret`]: the token secret.
//!
//! It depends on `parley-proto` and `parley-storage`, never the other way round.

pub mod auth;
pub mod config;
pub mod net;
pub mod node;
pub mod secret;
pub mod transport;
pub mod wheel;
