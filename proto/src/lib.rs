//! The parley wire protocol: the schema (`proto/parley.proto`, compiled into [`pb`]) and sans-IO
//! codecs that turn bytes into frames and frames into bytes, with no sockets and no clock inside.
//!
//! * [`frame`]: one `Frame` to and from its protobuf bytes and its proto3 JSON form.
//! * [`tcp`]: the TCP stream framing (varint length prefix, bounded, incremental).
//! * [`ws`]: the server side of WebSocket (RFC 6455): upgrade handshake, frames, messages, close.
//! * [`udp`]: the authenticated UDP datagram envelope.
//! * [`placement`]: where a cluster places users and conversations (every node alike).
//!
//! Every decoder takes untrusted bytes and returns a typed error instead of panicking; each one has
//! a property test and a fuzz target (`proto/fuzz`).

/// Generated message types of `proto/parley.proto` (package `parley.v1`), with their proto3 JSON
/// mapping (serde, via pbjson).
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/parley.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/parley.v1.serde.rs"));
}

/// The node-to-node link of a cluster (`proto/cluster.proto`): never seen by clients.
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod link_pb {
    include!(concat!(env!("OUT_DIR"), "/parley.cluster.v1.rs"));
}

pub mod frame;
pub mod placement;
pub mod splice;
pub mod tcp;
pub mod udp;
pub mod ws;

/// The protocol version this crate speaks (`pb::ProtocolVersion::ProtocolVersion1`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Default largest frame, in bytes of its protobuf encoding, that a decoder accepts (64 KiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;
