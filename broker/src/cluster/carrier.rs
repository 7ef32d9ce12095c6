//! Shard mail between nodes (with `cluster.nodes`): the shards' side of the links.
//!
//! Shards are numbered across the cluster (`crate::core::conv::Placement`). A shard's driver
//! sends mail for another node's shard with its [`Carrier`]: the batch is encoded on the
//! shard's thread (`crate::core::wire`), framed as a link `Mail` and handed to the link
//! thread, which writes it on the link to that node, in order. The receiving link thread
//! passes the encoded batch to its shard's inbox (`Mail::Remote`), where it is decoded, on
//! the shard's thread again. Mail for a node without a link now is not queued: the driver
//! hands it back to its core ([`crate::core::ShardCore::handle_unreachable`]), which answers
//! the requests in it UNAVAILABLE.
//!
//! The link thread tells every shard when a link comes up or goes down (`Mail::LinkUp`,
//! `Mail::LinkDown`): what a shard does then is `crate::core::remote`'s business.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use crate::config::Config;
use crate::core::ShardMsg;
use crate::node::shard::Peer;

/// Encoded link frames the shards may queue for the link thread, at most.
const OUTBOUND_FRAMES: usize = 65_536;

/// An encoded link frame for a node.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// The node's position in the sorted node list.
    pub(crate) node: usize,
    /// The frame, length prefix included.
    pub(crate) frame: BytesMut,
}

/// A shard's way to the other nodes' shards.
#[derive(Debug, Clone)]
pub(crate) struct Carrier {
    tx: Sender<Outbound>,
    waker: Arc<Waker>,
    /// Which nodes have a link up now, one bit per position.
    up: Arc<AtomicU64>,
    /// The link thread was woken and has not drained the queue since: no need to wake it.
    notified: Arc<AtomicBool>,
    /// The retry hint of a request refused because its node is unreachable, ms.
    pub(crate) retry_after_ms: u32,
    /// Whether the node has heard from the other nodes since it started ([`LinkSide::settled`]).
    settled: Arc<AtomicBool>,
}

impl Carrier {
    /// Whether the node has heard from the other live nodes since it started.
    pub(crate) fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Whether node `node` has a link up now.
    pub(crate) fn is_up(&self, node: usize) -> bool {
        node < 64 && self.up.load(Ordering::Acquire) & (1 << node) != 0
    }

    /// Sends `batch` to shard `shard` (its index on its node) of node `node`; gives the
    /// batch back if it cannot be sent now (no link, or the link thread's queue is full).
    /// `scratch` is the caller's buffer for the encoding (kept between calls, so that it
    /// does not grow again for every batch).
    pub(crate) fn send(
        &self,
        node: usize,
        shard: usize,
        batch: Vec<ShardMsg>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), Vec<ShardMsg>> {
        if !self.is_up(node) {
            return Err(batch);
        }
        scratch.clear();
        if let Err(e) = crate::core::wire::encode_batch(&batch, scratch) {
            tracing::error!("cluster: mail for node {node} could not be encoded: {e}");
            return Err(batch);
        }
        let Some(out) = mail_frame(shard as u32, scratch) else {
            tracing::error!("cluster: a batch of mail for node {node} is over the frame limit");
            return Err(batch);
        };
        match self.tx.try_send(Outbound { node, frame: out }) {
            Ok(()) => {
                if !self.notified.swap(true, Ordering::SeqCst) {
                    let _ = self.waker.wake();
                }
                Ok(())
            }
            Err(_) => Err(batch),
        }
    }
}

/// The link frame carrying `batch` to shard `shard`, length prefix included, as prost would
/// encode `LinkFrame{mail: Mail{shard, batch}}`, with the batch copied once; `None` past
/// [`super::link::MAX_LINK_FRAME`].
fn mail_frame(shard: u32, batch: &[u8]) -> Option<BytesMut> {
    use prost::encoding::{encode_varint, encoded_len_varint};
    const MAIL_SHARD: u8 = 1 << 3; // field 1, varint
    const MAIL_BATCH: u8 = (2 << 3) | 2; // field 2, length-delimited
    const FRAME_MAIL: u8 = (4 << 3) | 2; // LinkFrame field 4, length-delimited
    let shard_len = if shard == 0 {
        0
    } else {
        1 + encoded_len_varint(u64::from(shard))
    };
    let batch_len = if batch.is_empty() {
        0
    } else {
        1 + encoded_len_varint(batch.len() as u64) + batch.len()
    };
    let mail_len = shard_len + batch_len;
    let frame_len = 1 + encoded_len_varint(mail_len as u64) + mail_len;
    if frame_len > super::link::MAX_LINK_FRAME {
        return None;
    }
    let mut out = BytesMut::with_capacity(encoded_len_varint(frame_len as u64) + frame_len);
    encode_varint(frame_len as u64, &mut out);
    out.extend_from_slice(&[FRAME_MAIL]);
    encode_varint(mail_len as u64, &mut out);
    if shard != 0 {
        out.extend_from_slice(&[MAIL_SHARD]);
        encode_varint(u64::from(shard), &mut out);
    }
    if !batch.is_empty() {
        out.extend_from_slice(&[MAIL_BATCH]);
        encode_varint(batch.len() as u64, &mut out);
        out.extend_from_slice(batch);
    }
    Some(out)
}

/// The link thread's side of the carrier.
#[derive(Debug)]
pub(crate) struct LinkSide {
    /// Frames from the shards.
    pub(crate) rx: Receiver<Outbound>,
    /// This node's shards.
    pub(crate) peers: Vec<Peer>,
    /// The cluster's node ids, sorted (a node's position is its index here).
    pub(crate) nodes: Vec<String>,
    /// The links up, one bit per position (published to the shards).
    pub(crate) up: Arc<AtomicU64>,
    /// Cleared before each drain of `rx` (see [`Carrier`]).
    pub(crate) notified: Arc<AtomicBool>,
    /// Shards handed mail since they were last woken.
    pub(crate) to_wake: Vec<bool>,
    /// Set once the node has had a link up to every live node of the cluster for a heartbeat
    /// (their link-up summaries have arrived), or five heartbeats after the start at the
    /// latest; until then its homes refuse logins.
    pub(crate) settled: Arc<AtomicBool>,
}

impl LinkSide {
    /// The position of node `id`, if it is one of the cluster's.
    pub(crate) fn position(&self, id: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.as_str().cmp(id)).ok()
    }

    /// Whether node `pos` has a link up now.
    pub(crate) fn is_up(&self, pos: usize) -> bool {
        pos < 64 && self.up.load(Ordering::Acquire) & (1 << pos) != 0
    }

    /// Marks node `pos`'s link up or down.
    pub(crate) fn set_up(&self, pos: usize, up: bool) {
        if pos < 64 {
            if up {
                self.up.fetch_or(1 << pos, Ordering::AcqRel);
            } else {
                self.up.fetch_and(!(1 << pos), Ordering::AcqRel);
            }
        }
    }
}

/// The two sides of the carrier of `config` (`None` without `cluster.nodes`); `waker` wakes
/// the link thread.
pub(crate) fn carrier(
    config: &Config,
    peers: Vec<Peer>,
    waker: Arc<Waker>,
) -> Option<(Carrier, LinkSide)> {
    if config.cluster.nodes.is_empty() {
        return None;
    }
    let mut nodes = config.cluster.nodes.clone();
    nodes.sort_unstable();
    nodes.dedup();
    let (tx, rx) = crossbeam_channel::bounded(OUTBOUND_FRAMES);
    let up = Arc::new(AtomicU64::new(0));
    let notified = Arc::new(AtomicBool::new(false));
    let settled = Arc::new(AtomicBool::new(false));
    let carrier = Carrier {
        settled: Arc::clone(&settled),
        tx,
        waker,
        up: Arc::clone(&up),
        notified: Arc::clone(&notified),
        retry_after_ms: u32::try_from(config.cluster.heartbeat_ms).unwrap_or(u32::MAX),
    };
    Some((
        carrier,
        LinkSide {
            rx,
            to_wake: vec![false; peers.len()],
            peers,
            nodes,
            up,
            notified,
            settled,
        },
    ))
}

/// The fingerprint of `config`'s cluster layout with `shards` shards per node (0 without
/// `cluster.nodes`): nodes whose layouts differ refuse to link.
pub(crate) fn layout(config: &Config, shards: usize) -> u64 {
    if config.cluster.nodes.is_empty() {
        return 0;
    }
    let mut nodes = config.cluster.nodes.clone();
    nodes.sort_unstable();
    nodes.dedup();
    let text = format!(
        "{}|{shards}|{}",
        nodes.join(","),
        crate::core::wire::WIRE_VERSION
    );
    crate::core::conv::stable_hash(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::link_pb as lpb;
    use parley_proto::tcp::FrameCodec;

    #[test]
    fn a_mail_frame_is_what_prost_makes_of_it() {
        for (shard, len) in [(0u32, 0usize), (0, 5), (3, 0), (7, 200), (300, 70_000)] {
            let batch: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mine = mail_frame(shard, &batch).expect("fits");
            let frame = lpb::LinkFrame {
                body: Some(lpb::link_frame::Body::Mail(lpb::Mail {
                    shard,
                    batch: batch.clone().into(),
                })),
            };
            let mut theirs = BytesMut::new();
            FrameCodec::new(super::super::link::MAX_LINK_FRAME)
                .encode_message(&frame, &mut theirs)
                .expect("encodes");
            assert_eq!(mine, theirs, "shard {shard}, {len} bytes");
        }
    }
}
