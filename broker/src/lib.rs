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
//! Inside (private): `webhook` (signed HTTP POSTs of chosen events, `[webhooks]`), `admin` (the admin HTTP listener: probes and Prometheus metrics), `core` (the sans-IO shard core: sessions, delivery, sync, conversation
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
mod embed;
pub mod hooks;
mod local;
#[allow(unreachable_pub)]
mod loglimit;
mod node;
pub mod secret;
#[cfg(feature = "sim")]
pub mod transport;
#[cfg(not(feature = "sim"))]
#[allow(unreachable_pub, dead_code)]
mod transport;
mod webhook;

pub use crate::core::histogram::{self, Histogram, Latencies};
pub use crate::core::{ConversationInfo, Counters, GroupInfo, INSPECT_MAX_MEMBERS, MemberInfo};
pub use embed::{Broker, ControlError, Handle, SERVICE_DEVICE};
pub use local::{LOCAL_TIMEOUT, LocalClient, LocalError};
pub use node::{Lowered, NodeError, StartupReport};
/// The protocol's types (frames, messages, conversations), as [`LocalClient`] speaks them.
pub use parley_proto as proto;
