//! What shards say to each other, always in batches (`Vec<ShardMsg>`) over a bounded channel
//! plus a `mio::Waker`.

use std::sync::Arc;

use parley_proto::pb;

use super::session::SendRequest;
use crate::auth::Identity;
use crate::net::Conn;
use crate::transport::Transport;

/// A connection on a shard: its slot and the slot's generation (a reused slot has a new one, so a
/// late reply for a closed connection is dropped instead of reaching its successor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Origin {
    pub(crate) shard: usize,
    pub(crate) slot: usize,
    pub(crate) generation: u64,
}

/// Why a range of a conversation is read.
#[derive(Debug, Clone)]
pub(crate) enum ReadPurpose {
    /// A page of a running sync.
    Sync,
    /// A history page for this request, in this view.
    History {
        request_id: u64,
        view: pb::Conversation,
    },
}

/// A connection moving to its user's home shard after login.
#[derive(Debug)]
pub(crate) struct Adoption {
    pub(crate) conn: Conn,
    pub(crate) transport: Transport,
    pub(crate) identity: Identity,
    pub(crate) request_id: u64,
}

/// One message between shards.
#[derive(Debug)]
pub(crate) enum ShardMsg {
    /// To a conversation's owner: store this send.
    Append {
        origin: Origin,
        user: Arc<str>,
        device: Arc<str>,
        request: SendRequest,
        unix_ms: i64,
    },
    /// To a connection's shard: write this frame to it.
    Reply { to: Origin, frame: pb::Frame },
    /// To a user's home shard: a stored message of conversation `key` (stored form), shared by
    /// the deliveries to both users of the conversation (cloned only per device it reaches).
    Deliver {
        user: Arc<str>,
        key: Arc<str>,
        exclude_device: Option<Arc<str>>,
        message: Arc<pb::Message>,
    },
    /// To a user's home shard at start-up: conversation `key` has messages up to `last_seq`.
    Inbox {
        user: String,
        key: String,
        last_seq: u64,
    },
    /// To a conversation's owner: read seqs `[from, to]` (at most `limit`).
    Read {
        reply: Origin,
        user: String,
        key: String,
        from: u64,
        to: u64,
        limit: u32,
        newest_first: bool,
        purpose: ReadPurpose,
    },
    /// The answer to `Read`: stored-form messages in ascending seq order.
    ReadDone {
        to: Origin,
        key: String,
        purpose: ReadPurpose,
        messages: Vec<pb::Message>,
        /// Seqs of the range not returned remain: the next page starts after the last message.
        more: bool,
        first_seq: u64,
        last_seq: u64,
        /// The upper end of the range asked for (for continuing a sync).
        to_seq: u64,
    },
    /// To a user's home shard: take over this logged-in connection.
    Adopt(Box<Adoption>),
    /// Stop: close connections with SHUTTING_DOWN, flush, exit.
    Shutdown,
}
