//! The parley Rust client library: the client's side of the broker's exactly-once promise.
//!
//! * [`Session`] ([`session`]): the sans-IO core, a state machine fed frames (or TCP bytes) and
//!   the time, producing frames to send and typed [`Event`]s: login, the [`outbox`] (every
//!   unacknowledged send, resent with the same client message id on every new connection),
//!   the [`inbox`] (de-duplication by (conversation, seq) and seq order per conversation, with
//!   cumulative acks), sync after (re)connect and on gaps, heartbeats, history paging.
//! * [`Client`] ([`blocking`]): a blocking driver with a reader thread and automatic reconnect
//!   with [`backoff`] and jitter, over a [`Connector`]: [`TcpConnector`], `TlsConnector`
//!   (module `tls`, cargo feature `tls`, on by default: the TCP framing inside rustls),
//!   [`UdpConnector`] ([`udp`]: the broker's UDP sessions; the session then retries what lost
//!   datagrams took, [`SessionConfig::retry`]), or a transport of your own.
//!
//! ```no_run
//! use std::time::Duration;
//! use parley_client::{Client, ClientConfig, Event, TcpConnector};
//!
//! let client = Client::start(
//!     TcpConnector::new("127.0.0.1:7400"),
//!     Box::new(|| Ok(std::env::var("PARLEY_TOKEN").map_err(|e| e.to_string())?)),
//!     ClientConfig::default(),
//! );
//! client.send_text("bob", "hello, bob")?;
//! loop {
//!     match client.next_event(Duration::from_secs(30)) {
//!         Some(Event::Message(m)) => println!("[{}] {}", m.seq, String::from_utf8_lossy(&m.body)),
//!         Some(Event::Acked { seq, .. }) => println!("(sent #{seq})"),
//!         Some(_) => {}
//!         None => break,
//!     }
//! }
//! # Ok::<(), parley_client::SendError>(())
//! ```
//!
//! What it does not do (yet): keep the outbox and the inbox's cursors across restarts of the
//! process (they are in memory: a restarted client syncs from the start and shows history
//! again), a WebSocket transport, an async driver.

pub mod backoff;
pub mod blocking;
pub mod event;
pub mod ids;
pub mod inbox;
pub mod outbox;
pub mod session;
#[cfg(feature = "tls")]
pub mod tls;
pub mod udp;

pub use blocking::{Client, ClientConfig, Connection, Connector, TcpConnector, TokenProvider};
pub use event::{DisconnectReason, Event, describe_error};
pub use parley_proto::pb;
pub use session::{RetryConfig, SendError, Session, SessionConfig, State, TEXT, direct};
#[cfg(feature = "tls")]
pub use tls::TlsConnector;
pub use udp::UdpConnector;
