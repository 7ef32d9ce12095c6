//! The parley broker: a node of sharded, sans-IO cores driven by mio event loops.
//!
//! * [`node`]: a running node. Start one with [`node::Node::start`]; stop it with its
//!   [`node::ShutdownHandle`].
//! * [`config`]: settings (defaults, TOML, environment, flags). [`auth`]: tokens and the
//!   [`auth::TokenVerifier`] an embedding application may plug in. [`secret`]: the token secret.
//! * [`Counters`] and [`Latencies`] (send-to-deliver and flush [`Histogram`]s, [`histogram`]):
//!   what each shard counts and measures, as [`node::Node::counters`] and
//!   [`node::Node::latencies`] read them.
//!
//! Inside (private): `admin` (the admin HTTP listener: probes and Prometheus metrics), `core` (the sans-IO shard core: sessions, delivery, sync, conversation
//! owner, user home, timers), `transport` (bytes to frames: TCP, WebSocket), `loglimit` (log
//! lines the outside world can cause, rate-limited per kind) and the mio driver under `node`. With the `sim` feature, `core` is public for the simulation crate.
//!
//! It depends on `parley-proto` and `parley-storage`, never the other way round.

mod admin;
pub mod auth;
pub mod config;
#[cfg(feature = "sim")]
pub mod core;
#[cfg(not(feature = "sim"))]
#[allow(unreachable_pub, dead_code)]
mod core;
#[allow(unreachable_pub)]
mod loglimit;
pub mod node;
pub mod secret;
#[cfg(feature = "sim")]
pub mod transport;
#[cfg(not(feature = "sim"))]
#[allow(unreachable_pub, dead_code)]
mod transport;

pub use crate::core::Counters;
pub use crate::core::histogram::{self, Histogram, Latencies};
