//! One connection's socket and buffers: bounded nonblocking reads, an outbound queue flushed with
//! as few syscalls as possible, buffers that cost nothing while the connection is idle, and the
//! close path that makes sure the peer gets the last bytes.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};
use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// The most one `read` syscall of [`Conn::read`] asks for: the size of the scratch buffer a
/// shard shares among its connections.
pub const READ_MAX: usize = 64 * 1024;
/// [`Conn::shrink_buffers`] keeps a non-empty inbound buffer of up to this capacity as it is;
/// larger ones are cut down when mostly empty.
pub const KEEP_CAPACITY: usize = 4 * 1024;
/// The most chunks passed to one `write_vectored` (well under every platform's `IOV_MAX`).
pub const MAX_IOVECS: usize = 64;
/// The stack buffer [`Conn::drive_close`] reads into (and throws away).
const DISCARD_CHUNK: usize = 4 * 1024;

/// What one [`Conn::read`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOutcome {
    /// Bytes appended to the inbound buffer.
    pub read: usize,
    /// Why reading stopped.
    pub status: ReadStatus,
}

/// Why [`Conn::read`] (or the discarding in [`Conn::drive_close`]) stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// The socket has nothing more (`WouldBlock`): the next readable event announces new bytes.
    Drained,
    /// The budget was used up; more bytes may be waiting, and no event will announce them: come
    /// back next turn.
    BudgetExhausted,
    /// The peer closed its sending side (EOF): nothing more will arrive. Bytes read before it
    /// are in the buffer.
    Eof,
}

/// What one [`Conn::flush`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Bytes the socket took (progress, for the write-stall timer).
    pub written: usize,
    /// `write`/`writev` syscalls that took bytes.
    pub writes: usize,
    /// The socket is full and bytes remain queued ([`Conn::queued_bytes`]): wait for the
    /// writable event. If false, the queue is empty.
    pub blocked: bool,
}

/// Where [`Conn::drive_close`] got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseProgress {
    /// Waiting for the socket: queued bytes remain (writable event) or the peer has not closed
    /// yet (readable event). Call again on the next event, or drop when the close timer fires.
    Pending,
    /// The discard budget ran out with more input waiting, which no event will announce: call
    /// again next turn.
    PendingMore,
    /// Everything was sent, the write side is shut, and the peer closed too: drop the `Conn`.
    Done,
}

/// One connection: a nonblocking `mio` TCP stream, its inbound buffer and its outbound queue.
/// Transport-agnostic: what the bytes mean is [`crate::transport::Transport`]'s business.
///
/// # Buffers
///
/// * **Inbound.** Empty with no heap until bytes arrive. [`Conn::read`] reads into the shard's
///   shared scratch buffer and appends only what arrived (one copy of the received bytes, no
///   zeroing, no read-sized buffer per connection). The transport splits frames off its front
///   without copying. [`Conn::shrink_buffers`] releases it
///   when the transport consumed everything, and cuts it to size when a large buffer holds a
///   small partial frame.
/// * **Outbound.** A `BytesMut` the session encodes frames into ([`Conn::out_buf`]), behind a
///   queue of shared chunks ([`Conn::push_shared`], for fan-out bytes encoded once for many
///   connections). [`Conn::flush`] writes it all with one `write` (one `writev` when shared
///   chunks are queued) and releases the buffer when the queue empties; a partial write keeps
///   the rest, with no copy.
///
/// So an idle connection (nothing partially read, nothing queued) holds no buffer heap at all;
/// a busy one holds what is in flight, and the session bounds that with [`Conn::queued_bytes`].
///
/// ### Invariants
///
/// * Queue order: every byte of `shared` goes out before any byte of `out`.
/// * `shared` holds no empty chunk, and `shared_bytes` is the sum of its lengths.
/// * Once `write_shut`, nothing is queued (the write side was shut after the last byte).
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    inbuf: BytesMut,
    out: BytesMut,
    shared: VecDeque<Bytes>,
    shared_bytes: usize,
    write_shut: bool,
    peer_eof: bool,
}

impl Conn {
    /// Wraps a connected, nonblocking stream (as [`super::listener::accept`] returns it).
    pub fn new(stream: TcpStream) -> Self {
        Conn {
            stream,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            shared: VecDeque::new(),
            shared_bytes: 0,
            write_shut: false,
            peer_eof: false,
        }
    }

    /// The socket (for its options and addresses).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The peer's address.
    ///
    /// # Errors
    ///
    /// As `getpeername` (e.g. `NotConnected` once the peer reset the connection).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// The bytes read and not yet consumed, for the transport to decode from.
    pub fn in_buf(&mut self) -> &mut BytesMut {
        &mut self.inbuf
    }

    /// The outbound buffer: append encoded frames; [`Conn::flush`] sends them after everything
    /// queued before.
    pub fn out_buf(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Both buffers at once, `(inbound, outbound)`: what
    /// [`crate::transport::Transport::decode`] takes.
    pub fn buffers(&mut self) -> (&mut BytesMut, &mut BytesMut) {
        (&mut self.inbuf, &mut self.out)
    }

    /// Queues `chunk`, bytes encoded once and shared by many connections (a fan-out), after
    /// everything queued so far. No copy: the connection holds a reference.
    pub fn push_shared(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if !self.out.is_empty() {
            // Seal what was encoded before, to keep the order; `out` keeps its spare capacity.
            let sealed = self.out.split().freeze();
            self.shared_bytes += sealed.len();
            self.shared.push_back(sealed);
        }
        self.shared_bytes += chunk.len();
        self.shared.push_back(chunk);
        self.debug_check();
    }

    /// Bytes queued and not yet taken by the socket: the measure for backpressure.
    pub fn queued_bytes(&self) -> usize {
        self.shared_bytes + self.out.len()
    }

    /// Heap capacity held by this connection's own buffers (shared chunks not counted): for
    /// metrics and tests of the buffer policy.
    pub fn buffer_capacity(&self) -> usize {
        self.inbuf.capacity() + self.out.capacity()
    }

    /// Whether the peer's EOF has been seen.
    pub fn peer_closed(&self) -> bool {
        self.peer_eof
    }

    /// Reads into the inbound buffer until the socket has nothing more (`WouldBlock`), the peer
    /// closed (EOF), or `budget` bytes were read (fairness: one connection must not hold the shard;
    /// a budget of 0 counts as 1). Retries `Interrupted`. Never reads more than `budget` bytes.
    ///
    /// Each `read` syscall goes into `scratch`, a buffer the caller shares among all its
    /// connections (at most [`READ_MAX`] of it is used per call); only the bytes received are
    /// then copied into the connection's inbound buffer. So an idle connection, or one that
    /// sends a small frame now and then, never holds (or churns through) a read-sized buffer of
    /// its own, and no buffer is zeroed before a read.
    ///
    /// # Errors
    ///
    /// A socket error (e.g. `ConnectionReset`): the connection is dead; drop it.
    pub fn read(&mut self, scratch: &mut [u8], budget: usize) -> io::Result<ReadOutcome> {
        let budget = budget.max(1);
        let mut total = 0;
        loop {
            if total >= budget {
                return Ok(ReadOutcome {
                    read: total,
                    status: ReadStatus::BudgetExhausted,
                });
            }
            let want = (budget - total).min(READ_MAX).min(scratch.len()).max(1);
            let result = match scratch.get_mut(..want) {
                Some(space) => self.stream.read(space),
                None => Ok(0),
            };
            match result {
                Ok(0) => {
                    self.peer_eof = true;
                    return Ok(ReadOutcome {
                        read: total,
                        status: ReadStatus::Eof,
                    });
                }
                Ok(n) => {
                    debug_assert!(n <= want);
                    self.inbuf
                        .extend_from_slice(scratch.get(..n).unwrap_or_default());
                    total += n;
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        return Ok(ReadOutcome {
                            read: total,
                            status: ReadStatus::Drained,
                        });
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                },
            }
        }
    }

    /// Writes queued bytes until the queue is empty or the socket is full (`WouldBlock`), with
    /// one `write` of the outbound buffer, or one `writev` of up to [`MAX_IOVECS`] chunks when
    /// shared chunks are queued; after a partial write it tries again until `WouldBlock` (so the
    /// writable event is sure to come). Retries `Interrupted`. Never blocks. Releases the
    /// outbound buffer once everything is sent.
    ///
    /// # Errors
    ///
    /// A socket error (e.g. `BrokenPipe`, `ConnectionReset`): the connection is dead; drop it.
    pub fn flush(&mut self) -> io::Result<FlushOutcome> {
        let mut outcome = FlushOutcome {
            written: 0,
            writes: 0,
            blocked: false,
        };
        while self.queued_bytes() > 0 {
            debug_assert!(!self.write_shut, "nothing is queued after shutdown");
            let result = if self.shared.is_empty() {
                self.stream.write(&self.out)
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let chunks = self.shared.iter().map(|c| &c[..]);
                let mut used = 0;
                for (slot, chunk) in slices.iter_mut().zip(chunks.chain([&self.out[..]])) {
                    *slot = IoSlice::new(chunk);
                    used += 1;
                }
                self.stream
                    .write_vectored(slices.get(..used).unwrap_or_default())
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.consume(n);
                    outcome.written += n;
                    outcome.writes += 1;
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        outcome.blocked = true;
                        break;
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                },
            }
        }
        if self.queued_bytes() == 0 {
            self.out = BytesMut::new();
        }
        Ok(outcome)
    }

    /// Releases buffers the connection no longer needs; call it at the end of each turn that
    /// served the connection (after decoding and flushing):
    ///
    /// * an empty inbound buffer is released (frames decoded from it keep their bytes alive on
    ///   their own);
    /// * a non-empty one (a partial frame) larger than [`KEEP_CAPACITY`] and more than 3/4 empty
    ///   is copied into one of its exact size (a slow sender does not pin a large buffer);
    /// * an empty outbound buffer is released.
    pub fn shrink_buffers(&mut self) {
        if self.inbuf.is_empty() {
            self.inbuf = BytesMut::new();
        } else if self.inbuf.capacity() > KEEP_CAPACITY
            && self.inbuf.capacity() / 4 > self.inbuf.len()
        {
            self.inbuf = BytesMut::from(&self.inbuf[..]);
        }
        if self.out.is_empty() {
            self.out = BytesMut::new();
        }
    }

    /// Drives a graceful close, one step per call: discards whatever the peer sends (at most
    /// `budget` bytes per call; unread input at close would make the kernel send a RST, which
    /// can destroy the last bytes in flight to the peer), flushes the queue, then shuts the write
    /// side (the peer sees EOF after the last byte), and finishes when the peer closes too.
    /// Undecoded inbound bytes are dropped.
    ///
    /// Call it once the last words are queued, then on every event until
    /// [`CloseProgress::Done`]; bound the whole by a timer (a peer that never closes is then
    /// dropped).
    ///
    /// # Errors
    ///
    /// A socket error: the connection is dead; drop it.
    pub fn drive_close(&mut self, budget: usize) -> io::Result<CloseProgress> {
        self.inbuf = BytesMut::new();
        let discarded = self.discard_input(budget)?;
        if !self.write_shut {
            if self.flush()?.blocked {
                return Ok(if discarded == ReadStatus::BudgetExhausted {
                    CloseProgress::PendingMore
                } else {
                    CloseProgress::Pending
                });
            }
            match self.stream.shutdown(Shutdown::Write) {
                Ok(()) => {}
                // The peer is gone already: nothing more to deliver.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    return Ok(CloseProgress::Done);
                }
                Err(e) => return Err(e),
            }
            self.write_shut = true;
        }
        Ok(match discarded {
            ReadStatus::Eof => CloseProgress::Done,
            ReadStatus::BudgetExhausted => CloseProgress::PendingMore,
            ReadStatus::Drained => CloseProgress::Pending,
        })
    }

    /// Reads and throws away up to `budget` bytes of input, into a stack buffer.
    fn discard_input(&mut self, budget: usize) -> io::Result<ReadStatus> {
        if self.peer_eof {
            return Ok(ReadStatus::Eof);
        }
        let mut scratch = [0u8; DISCARD_CHUNK];
        let mut total = 0;
        while total < budget.max(1) {
            match self.stream.read(&mut scratch) {
                Ok(0) => {
                    self.peer_eof = true;
                    return Ok(ReadStatus::Eof);
                }
                Ok(n) => total += n,
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(ReadStatus::Drained),
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                },
            }
        }
        Ok(ReadStatus::BudgetExhausted)
    }

    /// Drops the first `n` queued bytes, which the socket took.
    fn consume(&mut self, mut n: usize) {
        debug_assert!(n <= self.queued_bytes());
        while n > 0 {
            let Some(front) = self.shared.front_mut() else {
                self.out.advance(n.min(self.out.len()));
                break;
            };
            if n < front.len() {
                front.advance(n);
                self.shared_bytes -= n;
                break;
            }
            n -= front.len();
            self.shared_bytes -= front.len();
            self.shared.pop_front();
        }
        self.debug_check();
    }

    fn debug_check(&self) {
        debug_assert!(self.shared.iter().all(|c| !c.is_empty()));
        debug_assert_eq!(
            self.shared_bytes,
            self.shared.iter().map(Bytes::len).sum::<usize>()
        );
    }
}

/// Registers the connection's socket, so the loop registers the `Conn` itself.
impl Source for Conn {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.stream.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.stream.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.stream.deregister(registry)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::TcpStream as StdStream;
    use std::time::{Duration, Instant};

    use mio::{Events, Poll};

    use super::super::listener;
    use super::*;

    /// A server-side `Conn` registered in its own poll, and the blocking client socket.
    struct Pair {
        conn: Conn,
        client: StdStream,
        poll: Poll,
    }

    fn pair() -> Pair {
        let l = listener::bind(SocketAddr::from(([127, 0, 0, 1], 0)), false).unwrap();
        let client = StdStream::connect(l.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut conn = loop {
            if let Some((conn, _)) = listener::accept(&l).unwrap() {
                break conn;
            }
            assert!(Instant::now() < deadline, "accept timed out");
            std::thread::yield_now();
        };
        let poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut conn, Token(0), Interest::READABLE | Interest::WRITABLE)
            .unwrap();
        Pair { conn, client, poll }
    }

    impl Pair {
        /// Waits (at most 2 s) until the server socket holds at least `n` unread bytes.
        fn wait_for_input(&mut self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut peek = vec![0; n];
            let mut events = Events::with_capacity(4);
            while self.conn.stream().peek(&mut peek).unwrap_or(0) < n {
                assert!(Instant::now() < deadline, "input did not arrive");
                self.poll
                    .poll(&mut events, Some(Duration::from_millis(10)))
                    .unwrap();
            }
        }

        /// Reads until EOF from the client side (bounded by its read timeout).
        fn client_reads_to_eof(&mut self) -> Vec<u8> {
            let mut all = Vec::new();
            self.client
                .read_to_end(&mut all)
                .expect("clean EOF, no reset");
            all
        }

        /// Drives the close until done, for at most 2 s.
        fn close(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut events = Events::with_capacity(4);
            while self.conn.drive_close(64 * 1024).unwrap() != CloseProgress::Done {
                assert!(Instant::now() < deadline, "close did not finish");
                self.poll
                    .poll(&mut events, Some(Duration::from_millis(10)))
                    .unwrap();
            }
        }
    }

    #[test]
    fn new_connection_holds_no_buffer_memory() {
        let p = pair();
        assert_eq!(p.conn.buffer_capacity(), 0);
        assert_eq!(p.conn.queued_bytes(), 0);
    }

    #[test]
    fn read_takes_everything_available_and_reports_drained() {
        let mut p = pair();
        p.client.write_all(&[7; 1000]).unwrap();
        p.wait_for_input(1000);
        let outcome = p.conn.read(&mut vec![0; READ_MAX], 64 * 1024).unwrap();
        assert_eq!(
            outcome,
            ReadOutcome {
                read: 1000,
                status: ReadStatus::Drained
            }
        );
        assert_eq!(&p.conn.in_buf()[..], &[7; 1000][..]);
    }

    #[test]
    fn read_stops_at_the_budget_and_reports_more_pending() {
        let mut p = pair();
        p.client.write_all(&[1; 40_000]).unwrap();
        p.wait_for_input(40_000);
        let outcome = p.conn.read(&mut vec![0; READ_MAX], 10_000).unwrap();
        assert_eq!(
            outcome,
            ReadOutcome {
                read: 10_000,
                status: ReadStatus::BudgetExhausted
            }
        );
        assert_eq!(p.conn.in_buf().len(), 10_000);
        let rest = p.conn.read(&mut vec![0; READ_MAX], 64 * 1024).unwrap();
        assert_eq!(rest.read, 30_000, "the rest was waiting");
    }

    #[test]
    fn read_reports_eof_when_the_peer_closes() {
        let mut p = pair();
        p.client.write_all(b"last words").unwrap();
        p.client.shutdown(Shutdown::Write).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = 0;
        loop {
            let outcome = p.conn.read(&mut vec![0; READ_MAX], 64 * 1024).unwrap();
            got += outcome.read;
            if outcome.status == ReadStatus::Eof {
                break;
            }
            assert!(Instant::now() < deadline, "no EOF");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got, 10, "bytes before the EOF are kept");
        assert_eq!(&p.conn.in_buf()[..], b"last words");
        assert!(p.conn.peer_closed());
    }

    #[test]
    fn many_queued_frames_go_out_in_one_write() {
        let mut p = pair();
        for i in 0..100u8 {
            p.conn.out_buf().extend_from_slice(&[i; 50]);
        }
        let outcome = p.conn.flush().unwrap();
        assert_eq!(
            outcome,
            FlushOutcome {
                written: 5000,
                writes: 1,
                blocked: false
            }
        );
        assert_eq!(p.conn.queued_bytes(), 0);
        let mut got = vec![0; 5000];
        p.client.read_exact(&mut got).unwrap();
        assert_eq!(got[4999], 99);
    }

    #[test]
    fn shared_chunks_keep_their_place_in_the_queue_and_go_out_in_one_writev() {
        let mut p = pair();
        p.conn.out_buf().extend_from_slice(b"one ");
        p.conn.push_shared(Bytes::from_static(b"two "));
        p.conn.out_buf().extend_from_slice(b"three ");
        p.conn.push_shared(Bytes::from_static(b"four"));
        assert_eq!(p.conn.queued_bytes(), 18);
        let outcome = p.conn.flush().unwrap();
        assert_eq!((outcome.written, outcome.writes), (18, 1));
        let mut got = [0; 18];
        p.client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one two three four");
    }

    #[test]
    fn more_shared_chunks_than_one_writev_takes_go_out_in_as_few_writes_as_possible() {
        let mut p = pair();
        for i in 0..100u8 {
            p.conn.push_shared(Bytes::from(vec![i; 10]));
        }
        let outcome = p.conn.flush().unwrap();
        assert_eq!(
            (outcome.written, outcome.writes),
            (1000, 2),
            "64 + 36 chunks"
        );
        let mut got = vec![0; 1000];
        p.client.read_exact(&mut got).unwrap();
        assert!(got.chunks(10).enumerate().all(|(i, c)| c == [i as u8; 10]));
    }

    #[test]
    fn a_peer_that_does_not_read_makes_the_queue_grow_and_flush_report_blocked_without_blocking() {
        let mut p = pair();
        let chunk = vec![0xab; 1 << 20];
        let started = Instant::now();
        let mut blocked = false;
        for _ in 0..32 {
            p.conn.out_buf().extend_from_slice(&chunk);
            if p.conn.flush().unwrap().blocked {
                blocked = true;
                break;
            }
        }
        assert!(blocked, "the socket buffers filled up");
        let queued = p.conn.queued_bytes();
        assert!(queued > 0);
        p.conn.out_buf().extend_from_slice(&chunk);
        let again = p.conn.flush().unwrap();
        assert!(again.blocked);
        assert!(p.conn.queued_bytes() >= queued + chunk.len() - again.written);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "flush never waits"
        );
    }

    #[test]
    fn a_partial_write_keeps_the_rest_in_order() {
        let mut p = pair();
        let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
        p.conn.out_buf().extend_from_slice(&data);
        let reader = {
            let mut client = p.client.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut got = vec![0; 8_000_000];
                client.read_exact(&mut got).unwrap();
                got
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut events = Events::with_capacity(4);
        while p.conn.flush().unwrap().blocked {
            assert!(Instant::now() < deadline, "peer stopped reading");
            p.poll
                .poll(&mut events, Some(Duration::from_millis(10)))
                .unwrap();
        }
        assert!(
            reader.join().unwrap() == data,
            "bytes arrive whole and in order"
        );
    }

    #[test]
    fn outbound_buffer_is_released_once_flushed() {
        let mut p = pair();
        p.conn.out_buf().extend_from_slice(&[0; 10_000]);
        assert!(p.conn.buffer_capacity() >= 10_000);
        assert!(!p.conn.flush().unwrap().blocked);
        assert_eq!(p.conn.buffer_capacity(), 0);
    }

    #[test]
    fn inbound_buffer_is_released_once_consumed() {
        let mut p = pair();
        p.client.write_all(&[5; 3000]).unwrap();
        p.wait_for_input(3000);
        p.conn.read(&mut vec![0; READ_MAX], 64 * 1024).unwrap();
        assert!(p.conn.buffer_capacity() >= 3000);
        p.conn.in_buf().clear(); // the transport consumed everything
        p.conn.shrink_buffers();
        assert_eq!(p.conn.buffer_capacity(), 0);
    }

    #[test]
    fn a_small_partial_frame_does_not_pin_a_large_inbound_buffer() {
        let mut p = pair();
        p.client.write_all(&[5; 60_000]).unwrap();
        p.wait_for_input(60_000);
        p.conn.read(&mut vec![0; READ_MAX], 64 * 1024).unwrap();
        p.conn.in_buf().advance(60_000 - 10); // all but the start of a next frame
        p.conn.shrink_buffers();
        assert_eq!(&p.conn.in_buf()[..], &[5; 10][..]);
        assert!(p.conn.buffer_capacity() <= KEEP_CAPACITY);
    }

    #[test]
    fn graceful_close_delivers_the_last_bytes_then_eof_even_with_unread_input() {
        let mut p = pair();
        // The peer sent bytes the server will never decode: closing with them unread would RST.
        p.client.write_all(&[9; 20_000]).unwrap();
        p.wait_for_input(20_000);
        p.conn.out_buf().extend_from_slice(b"Error{fatal}");
        let first = p.conn.drive_close(64 * 1024).unwrap();
        assert_eq!(
            first,
            CloseProgress::Pending,
            "waiting for the peer to close"
        );
        let unread = p.conn.stream().peek(&mut [0; 16]).map_err(|e| e.kind());
        assert_eq!(
            unread,
            Err(io::ErrorKind::WouldBlock),
            "the input was drained"
        );
        assert_eq!(p.client_reads_to_eof(), b"Error{fatal}");
        p.client.shutdown(Shutdown::Write).unwrap();
        p.close();
    }

    #[test]
    fn close_finishes_at_once_when_the_peer_closed_first() {
        let mut p = pair();
        p.client.shutdown(Shutdown::Write).unwrap();
        p.wait_for_eof();
        p.conn.out_buf().extend_from_slice(b"bye");
        assert_eq!(p.conn.drive_close(1024).unwrap(), CloseProgress::Done);
        assert_eq!(p.client_reads_to_eof(), b"bye");
    }

    impl Pair {
        /// Waits (at most 2 s) until the server has seen the peer's EOF.
        fn wait_for_eof(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.conn.read(&mut vec![0; READ_MAX], 1024).unwrap().status != ReadStatus::Eof {
                assert!(Instant::now() < deadline, "no EOF");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
