//! The parley load generator, with correctness checking built in.
//!
//! loadgen is an outside client: it reaches the systems it loads only through sockets (and, for
//! parley, the `parley-proto` codecs). One process is one `mio` event loop holding thousands of
//! connections; `--procs K` spreads the clients over K processes and merges their results.
//!
//! The tree follows the architecture:
//! - [`driver`]: sans-IO client protocols (parley over TCP or WebSocket, plain or in TLS, or
//!   over UDP; MQTT 3.1.1, Redis pub/sub, the relay), one per system under test;
//! - [`ws`]: the client side of RFC 6455, for parley over WebSocket;
//! - [`udp`]: the client side of parley's UDP sessions (login, envelope, retries);
//! - [`tls`]: the TLS client configuration of `--transport tls|wss`;
//! - [`body`]: the self-checking message body;
//! - [`check`]: the arrival checker (lost, duplicated, out of order, corrupt, seq gaps);
//! - [`relay`]: the minimal relay server, the ceiling any broker on this machine can reach;
//! - [`engine`]: the event loop of one worker process;
//! - [`worker`]: the scenarios, run by each worker on its share of the clients;
//! - [`run`]: the orchestrator that starts workers, samples the broker and reports;
//! - [`stats`], [`procstat`], [`token`], [`cli`]: measurement, broker sampling, parley tokens,
//!   the command line.

pub mod body;
pub mod check;
pub mod cli;
pub mod driver;
pub mod engine;
pub mod procstat;
pub mod relay;
pub mod run;
pub mod stats;
pub mod tls;
pub mod token;
pub mod udp;
pub mod worker;
pub mod ws;
