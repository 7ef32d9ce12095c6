//! Socket I/O for the driver: reading into the shard's scratch buffer, writing a connection's
//! queue, and the graceful close of a connection the core has finished with.
//!
//! Loop contract (mio is edge-triggered): a socket is registered once for reads and writes; an
//! edge comes only after the socket was drained, so a read that stops at the fairness budget puts
//! the connection on the "come back next turn" list. A read that returns fewer bytes than asked
//! counts as drained (a TCP socket hands over everything it holds; the next arrival raises a new
//! edge), which saves the extra `read` that would only return `WouldBlock`. That holds for plain
//! sockets only: a TLS stream reads until `WouldBlock` (see `stream`).

use std::io;

use bytes::BytesMut;

use super::stream::Stream;

/// Most bytes one `read` call asks for.
pub(crate) const READ_MAX: usize = 64 * 1024;

/// Closes a connection at once: one write of its last bytes (a fresh socket's buffer takes a
/// small error frame whole), shut the write side, drop. For connections refused at accept (a
/// TLS one has not shaken hands yet: its peer sees only the end).
pub(crate) fn close_now(mut stream: Stream, mut last: BytesMut) {
    stream.finish(&mut last);
    let _ = stream.write_out(&mut last);
    let _ = stream.shutdown_write();
}

/// A connection being closed: its last bytes go out, its write side is shut (the peer sees EOF
/// after the last byte), and whatever the peer still sends is read and thrown away (unread input
/// at close would make the kernel send a RST, which can destroy the last bytes in flight) — up
/// to `discard_max` bytes (`limits.close_discard_bytes`) and the linger deadline, whichever comes
/// first: a peer that goes on sending after a fatal error gets cut off, not served megabytes of
/// reads. A TLS connection's last bytes are encrypted and followed by a close_notify; what its
/// peer sends meanwhile is discarded undecrypted.
#[derive(Debug)]
pub(crate) struct Closing {
    pub(crate) stream: Stream,
    last: BytesMut,
    write_shut: bool,
    /// Bytes read and thrown away so far, and the most that will be.
    discarded: usize,
    discard_max: usize,
    /// When to give up on a peer that never closes (ms).
    pub(crate) deadline: u64,
}

/// What a step of a close did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseStep {
    /// Waiting for the socket (writable, or the peer's EOF).
    Pending,
    /// The discard budget ran out: call again next turn.
    More,
    /// Done: drop the socket.
    Done,
}

impl Closing {
    /// A close of `stream` with `last` to write, given up at `deadline` (ms) or once
    /// `discard_max` bytes were read from the peer meanwhile.
    pub(crate) fn new(
        mut stream: Stream,
        mut last: BytesMut,
        deadline: u64,
        discard_max: usize,
    ) -> Self {
        stream.finish(&mut last);
        Closing {
            stream,
            last,
            write_shut: false,
            discarded: 0,
            discard_max,
            deadline,
        }
    }

    /// One step: discard input (at most `budget` bytes), flush, shut the write side, finish when
    /// the peer has closed too. An error means the peer is gone: done.
    pub(crate) fn step(&mut self, budget: usize) -> CloseStep {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        let mut eof = false;
        while total < budget.max(1) {
            match self.stream.discard(&mut sink) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return CloseStep::Done,
            }
        }
        self.discarded += total;
        if self.discarded > self.discard_max {
            // It keeps talking after it was told goodbye: stop listening.
            return CloseStep::Done;
        }
        let more = !eof && total >= budget.max(1);
        if !self.write_shut {
            match self.stream.write_out(&mut self.last) {
                Ok((_, true)) => {
                    return if more {
                        CloseStep::More
                    } else {
                        CloseStep::Pending
                    };
                }
                Ok((_, false)) => {}
                Err(_) => return CloseStep::Done,
            }
            self.last = BytesMut::new();
            if self.stream.shutdown_write().is_err() {
                return CloseStep::Done;
            }
            self.write_shut = true;
        }
        if eof {
            CloseStep::Done
        } else if more {
            CloseStep::More
        } else {
            CloseStep::Pending
        }
    }
}
