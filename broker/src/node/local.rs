//! In-process connections: the driver's end of a [`crate::LocalClient`]'s link.
//!
//! A local connection is a core connection without a socket. Its bytes (the TCP framing) come
//! from the client as [`Mail::LocalInput`](super::shard::Mail) and wait in the pipe's `input`
//! until the core takes input ([`crate::core::Intake`]); the core's output goes to the client
//! over a channel, at most [`LOCAL_WINDOW`] bytes ahead of what the client has taken (like a
//! socket's buffer: past it, output stays queued in the core, under the same budgets and
//! `Behind` rules as a slow socket's, until the client reads and says so with
//! `Mail::LocalDrained`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::Sender;

/// Bytes handed to a local client and not yet taken, at most.
pub(crate) const LOCAL_WINDOW: usize = 1 << 20;

/// The shard's way to a local client: output, and the count of bytes it has not taken.
#[derive(Debug)]
pub(crate) struct LocalEnd {
    /// Output chunks; dropping the sender tells the client the connection closed.
    pub(crate) to_client: Sender<Bytes>,
    /// Bytes sent and not yet taken by the client.
    pub(crate) queued: Arc<AtomicUsize>,
}

/// A local connection in the driver's table.
#[derive(Debug)]
pub(crate) struct LocalPipe {
    /// The core connection's generation (the slot is the table index).
    pub(crate) generation: u32,
    /// The link's id (how the client's mails name it).
    pub(crate) id: u64,
    pub(crate) end: LocalEnd,
    /// Input from the client the core has not taken yet.
    pub(crate) input: VecDeque<Bytes>,
}

impl LocalPipe {
    /// Room for this many more bytes towards the client.
    pub(crate) fn room(&self) -> usize {
        LOCAL_WINDOW.saturating_sub(self.end.queued.load(Ordering::Acquire))
    }

    /// Hands all of `last` to the client (its last words: past the window, since nothing
    /// follows them).
    pub(crate) fn write_last(&mut self, last: BytesMut) {
        if !last.is_empty() {
            self.end.queued.fetch_add(last.len(), Ordering::AcqRel);
            let _ = self.end.to_client.send(last.freeze());
        }
    }

    /// Hands up to [`LocalPipe::room`] bytes of `out` to the client; returns how many went
    /// (`None`: the client is gone).
    pub(crate) fn write(&mut self, out: &mut BytesMut) -> Option<usize> {
        let n = out.len().min(self.room());
        if n == 0 {
            return Some(0);
        }
        let chunk = out.split_to(n).freeze();
        self.end.queued.fetch_add(n, Ordering::AcqRel);
        self.end.to_client.send(chunk).ok().map(|()| n)
    }
}
