//! The parley broker: a node of sharded, sans-IO cores driven by mio event loops, as a library
//! an application embeds (the `broker` binary is one such application).
//!
//! * [`Broker`]: builds and starts a node (configuration, token verification, [`hooks`]) and
//!   returns its [`Handle`]: post messages (also SYSTEM ones) as any user, kick, list who is
//!   online, query presence and conversation lists, inspect conversations, manage groups, read
//!   [`Counters`] and [`Latencies`], shut down gracefully. [`StartupReport`]: how the start went.
//! * [`LocalClient`]: an in-process connection, with no socket ([`Handle::connect`],
//!   [`Handle::act_as`]); it speaks the protocol's frames ([`proto`]).
//! * [`hooks`]: gates (login, send, group request; answered at once or later, parking only the
//!   asking connection) and observers (stored messages, offline recipients, logins, presence,
//!   group changes).
//! * [`config`]: settings (defaults, TOML, environment, flags). [`auth`]: tokens and the
//!   [`auth::TokenVerifier`] an embedding application may plug in. [`secret`]: the token secret.
//! * [`histogram`]: the latency [`Histogram`]s behind [`Latencies`].
//!
//! Inside (private): `core` (the sans-IO shard core: sessions, delivery, sync, conversation
//! owner, user home, groups, rooms, presence, gates, timers), `node` (the mio driver: shard
//! threads, listeners, sockets, flushers, in-process links, the application's control),
//! `transport` (bytes to frames: TCP, WebSocket), `admin` (the admin HTTP listener: probes,
//! Prometheus metrics, the JSON API), `webhook` (signed HTTP POSTs of chosen events,
//! `[webhooks]`), `embed` and `local` (the front above), `loglimit` (log lines the outside world
//! can cause, rate-limited per kind). With the `sim` feature, `core` and `transport` are public
//! for the simulation crate.
//!
//! It depends on `parley-proto` and `parley-storage`, never the other way round.

mod admin;
pub mod auth;
mod cluster;
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
mod tls;
#[cfg(feature = "sim")]
pub mod transport;
#[cfg(not(feature = "sim"))]
#[allow(unreachable_pub, dead_code)]
mod transport;
mod webhook;

/// Entry points for the cargo-fuzz targets in `proto/fuzz` (the `fuzz` feature): they take bytes
/// and return nothing, so no internal type leaves the crate. Not an API.
#[cfg(feature = "fuzz")]
#[doc(hidden)]
pub mod fuzz {
    /// Decodes `bytes` as a batch of inter-node mail (it must not panic); a batch that decodes
    /// must encode again and decode to the same mail.
    pub fn mail_batch(bytes: &[u8]) {
        crate::core::wire::check_round_trip(bytes);
    }
}

pub use crate::core::histogram::{self, Histogram, Latencies};
pub use crate::core::{ConversationInfo, Counters, GroupInfo, INSPECT_MAX_MEMBERS, MemberInfo};
pub use embed::{Broker, ControlError, Handle, SERVICE_DEVICE};
pub use local::{LOCAL_TIMEOUT, LocalClient, LocalError};
pub use node::{Lowered, NodeError, StartupReport};
/// The protocol's types (frames, messages, conversations), as [`LocalClient`] speaks them.
pub use parley_proto as proto;
pub use tls::TlsError;
