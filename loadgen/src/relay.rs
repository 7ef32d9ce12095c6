//! The relay: a minimal pub/sub forwarder, the ceiling any broker on this machine can reach.
//!
//! It does the least a broker must: read frames, look up who listens, copy the bytes to them.
//! No acks, no storage, no authentication. Whatever loadgen measures against it is the cost of
//! the sockets, the kernel and loadgen itself; a broker's numbers are read against it.
//!
//! # Wire protocol
//!
//! Every frame, in both directions:
//!
//! ```text
//! +----------------+----------+------------------+
//! | len: u32 (BE)  | kind: u8 | payload          |
//! +----------------+----------+------------------+
//!   4 bytes          `len` bytes: kind + payload
//! ```
//!
//! `len` counts what follows it (so it is at least 1) and is at most [`MAX_FRAME_BYTES`]. A
//! longer or zero length prefix is refused as soon as its 4 bytes arrive, before any payload is
//! buffered: the relay closes that connection, the driver returns a `DriverError`.
//!
//! | kind | name      | payload                 | direction      | answer                     |
//! |------|-----------|-------------------------|----------------|----------------------------|
//! | 1    | SUBSCRIBE | `channel: u32` (BE)     | client → relay | SUBACK                     |
//! | 2    | PUBLISH   | `channel: u32`, body    | both           | none; forwarded unchanged  |
//! | 3    | PING      | empty                   | client → relay | PONG                       |
//! | 4    | SUBACK    | `channel: u32`          | relay → client |                            |
//! | 5    | PONG      | empty                   | relay → client |                            |
//!
//! A PUBLISH is forwarded, byte for byte, to every connection subscribed to its channel at the
//! moment it is read (the sender too, if it subscribed), and to nobody else; with no subscriber
//! it is discarded. Frames from one connection are handled in order, so a subscriber receives one
//! publisher's frames in the order they were sent, and a SUBACK or PONG follows everything
//! forwarded to that connection before the SUBSCRIBE or PING was read. A frame of any other kind,
//! or of a known kind with the wrong length (SUBSCRIBE ≠ 5, PUBLISH < 5, PING ≠ 1), closes the
//! connection. A connection may subscribe to several channels; subscribing twice is harmless.
//!
//! # Server
//!
//! [`run`] is one thread, one `mio` event loop. Each turn it reads every readable connection
//! until `WouldBlock` (or a short read, or a [`READ_BUDGET`] so one flooding connection cannot
//! starve the rest: it is resumed next turn), parses every complete frame, appends forwarded
//! frames to the destinations' output buffers, and at the end of the turn writes each dirty
//! connection's output once. WRITABLE interest is registered only while output is pending.
//!
//! Routing (`Router`) holds no socket: it turns input bytes into output buffers, so it is
//! tested without I/O; the loop only moves bytes.
//!
//! Idle connections hold no buffer: input and output buffers are released when drained, so the
//! per-connection cost is the slab slot and the subscription entries (the idle-memory reference).
//!
//! A subscriber that does not read is closed once more than [`MAX_PENDING_OUT`] bytes wait for
//! it, rather than letting the relay grow without bound.
//!
//! # Faults
//!
//! `--fault KIND:N` ([`Fault`]) breaks the N-th forwarded PUBLISH exactly once, to prove
//! loadgen's checker catches it. Forwarded PUBLISHes are counted per delivery (one per
//! subscriber a PUBLISH reaches), from 1, across the whole relay.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

// ---------------------------------------------------------------------------------------------
// Wire
// ---------------------------------------------------------------------------------------------

/// The largest `len` a frame may carry (kind + payload): 1 MiB.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;
/// Bytes before a PUBLISH body: length prefix, kind and channel.
pub const PUBLISH_HEAD_BYTES: usize = LEN_BYTES + 1 + 4;
/// The largest PUBLISH body: [`MAX_FRAME_BYTES`] less the kind and the channel.
pub const MAX_BODY_BYTES: usize = MAX_FRAME_BYTES - 5;

/// Frame kind: subscribe to a channel (client → relay).
pub const KIND_SUBSCRIBE: u8 = 1;
/// Frame kind: a message on a channel (client → relay, forwarded relay → subscribers).
pub const KIND_PUBLISH: u8 = 2;
/// Frame kind: keep-alive request (client → relay).
pub const KIND_PING: u8 = 3;
/// Frame kind: subscription confirmed (relay → client).
pub const KIND_SUBACK: u8 = 4;
/// Frame kind: keep-alive answer (relay → client).
pub const KIND_PONG: u8 = 5;

/// Total bytes of a SUBSCRIBE or SUBACK frame.
pub const CHANNEL_FRAME_BYTES: usize = LEN_BYTES + 1 + 4;
/// Total bytes of a PING or PONG frame.
pub const EMPTY_FRAME_BYTES: usize = LEN_BYTES + 1;

/// A length prefix no frame may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Length 0: a frame holds at least its kind byte.
    #[error("relay frame of length 0 (a frame holds at least its kind)")]
    Empty,
    /// Longer than [`MAX_FRAME_BYTES`].
    #[error("relay frame of length {0} exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLong(u32),
}

/// The total size (prefix included) of the frame at the start of `buf`, if all of it is there.
///
/// `Ok(None)`: more bytes are needed. The length is checked as soon as its 4 bytes are present,
/// so a hostile prefix is refused before its payload is buffered. The kind is not checked.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(head) = buf.first_chunk::<LEN_BYTES>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*head);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len as usize > MAX_FRAME_BYTES {
        return Err(FrameError::TooLong(len));
    }
    let total = LEN_BYTES + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// The channel of a SUBSCRIBE, SUBACK or PUBLISH frame (`frame` starts at its length prefix and
/// holds at least [`PUBLISH_HEAD_BYTES`]; otherwise 0).
pub fn frame_channel(frame: &[u8]) -> u32 {
    match frame.get(LEN_BYTES + 1..PUBLISH_HEAD_BYTES) {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

fn put_channel_frame(out: &mut BytesMut, kind: u8, channel: u32) {
    out.reserve(CHANNEL_FRAME_BYTES);
    out.put_u32(5);
    out.put_u8(kind);
    out.put_u32(channel);
}

fn put_empty_frame(out: &mut BytesMut, kind: u8) {
    out.reserve(EMPTY_FRAME_BYTES);
    out.put_u32(1);
    out.put_u8(kind);
}

/// Appends a SUBSCRIBE for `channel`.
pub fn put_subscribe(out: &mut BytesMut, channel: u32) {
    put_channel_frame(out, KIND_SUBSCRIBE, channel);
}

/// Appends a SUBACK for `channel`.
pub fn put_suback(out: &mut BytesMut, channel: u32) {
    put_channel_frame(out, KIND_SUBACK, channel);
}

/// Appends a PUBLISH of `body` on `channel`.
///
/// A body longer than [`MAX_BODY_BYTES`] makes a frame the relay refuses (it closes the
/// connection); the length is never silently truncated.
pub fn put_publish(out: &mut BytesMut, channel: u32, body: &[u8]) {
    let len = u32::try_from(5 + body.len()).unwrap_or(u32::MAX);
    out.reserve(PUBLISH_HEAD_BYTES + body.len());
    out.put_u32(len);
    out.put_u8(KIND_PUBLISH);
    out.put_u32(channel);
    out.put_slice(body);
}

/// Appends a PING.
pub fn put_ping(out: &mut BytesMut) {
    put_empty_frame(out, KIND_PING);
}

/// Appends a PONG.
pub fn put_pong(out: &mut BytesMut) {
    put_empty_frame(out, KIND_PONG);
}

// ---------------------------------------------------------------------------------------------
// Options and faults
// ---------------------------------------------------------------------------------------------

/// Command-line options of the relay server.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayOptions {
    /// Address to listen on (port 0: any free port; the chosen one is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7500")]
    pub listen: SocketAddr,

    /// Break one forwarded PUBLISH on purpose, to prove loadgen's checker notices:
    /// `drop:N` discards the N-th, `reorder:N` delivers it right after the next PUBLISH to the
    /// same subscriber, `duplicate:N` delivers it twice, `corrupt:N` flips a bit in its last
    /// body byte. Counted per delivery from 1 across the relay; happens exactly once.
    #[arg(long, value_name = "KIND:N")]
    pub fault: Option<Fault>,

    /// Connections held at most; more are accepted and closed at once. Each connection is one
    /// file descriptor: raise the open-files limit (`ulimit -n`) above this plus a few.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pub max_conns: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 7500)),
            fault: None,
            max_conns: 20_000,
        }
    }
}

/// A deliberate fault: which forwarded PUBLISH (counted per delivery, from 1) and what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Silently discard the N-th forwarded PUBLISH.
    Drop(u64),
    /// Hold the N-th forwarded PUBLISH and deliver it right after the next PUBLISH forwarded to
    /// the same subscriber (lost if none follows or the subscriber leaves).
    Reorder(u64),
    /// Deliver the N-th forwarded PUBLISH twice.
    Duplicate(u64),
    /// Flip the lowest bit of the last body byte of the N-th forwarded PUBLISH (if its body is
    /// empty, of the next forwarded PUBLISH with a body).
    Corrupt(u64),
}

impl Fault {
    /// The N: which forwarded PUBLISH the fault hits.
    pub fn nth(self) -> u64 {
        match self {
            Fault::Drop(n) | Fault::Reorder(n) | Fault::Duplicate(n) | Fault::Corrupt(n) => n,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Fault::Drop(_) => "drop",
            Fault::Reorder(_) => "reorder",
            Fault::Duplicate(_) => "duplicate",
            Fault::Corrupt(_) => "corrupt",
        };
        write!(f, "{kind}:{}", self.nth())
    }
}

/// Why a `--fault` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultParseError {
    /// No `:` between kind and count.
    #[error("fault {0:?} is not KIND:N (e.g. drop:3)")]
    Shape(String),
    /// The kind is none of drop, reorder, duplicate, corrupt.
    #[error("unknown fault kind {0:?}: expected drop, reorder, duplicate or corrupt")]
    Kind(String),
    /// The count is not an integer ≥ 1.
    #[error("fault count {0:?} is not an integer >= 1 (PUBLISHes are counted from 1)")]
    Count(String),
}

impl FromStr for Fault {
    type Err = FaultParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, n) = s
            .split_once(':')
            .ok_or_else(|| FaultParseError::Shape(s.to_owned()))?;
        let n = match n.trim().parse::<u64>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(FaultParseError::Count(n.to_owned())),
        };
        match kind.trim().to_ascii_lowercase().as_str() {
            "drop" => Ok(Fault::Drop(n)),
            "reorder" => Ok(Fault::Reorder(n)),
            "duplicate" | "dup" => Ok(Fault::Duplicate(n)),
            "corrupt" => Ok(Fault::Corrupt(n)),
            _ => Err(FaultParseError::Kind(kind.to_owned())),
        }
    }
}

/// What the fault does to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Pass,
    Drop,
    Hold,
    Duplicate,
    Corrupt,
}

/// The armed fault (if any), the delivery count, and the frame a reorder holds.
#[derive(Debug, Default)]
struct FaultState {
    /// `None` once the fault has happened (or if there is none): the hot path tests only this.
    armed: Option<Fault>,
    delivered: u64,
    /// A reordered frame and the peer it waits for.
    held: Option<(usize, Box<[u8]>)>,
}

impl FaultState {
    fn new(fault: Option<Fault>) -> Self {
        FaultState {
            armed: fault,
            ..FaultState::default()
        }
    }

    /// Counts one delivery of a PUBLISH with a `body_len`-byte body; says what to do with it.
    #[inline]
    fn next(&mut self, body_len: usize) -> Action {
        let Some(fault) = self.armed else {
            return Action::Pass;
        };
        self.delivered += 1;
        if self.delivered < fault.nth() {
            return Action::Pass;
        }
        let action = match fault {
            Fault::Drop(_) => Action::Drop,
            Fault::Reorder(_) => Action::Hold,
            Fault::Duplicate(_) => Action::Duplicate,
            Fault::Corrupt(_) if body_len == 0 => return Action::Pass,
            Fault::Corrupt(_) => Action::Corrupt,
        };
        self.armed = None;
        action
    }
}

// ---------------------------------------------------------------------------------------------
// Routing (no I/O)
// ---------------------------------------------------------------------------------------------

/// A subscriber whose pending output exceeds this many bytes is closed.
pub const MAX_PENDING_OUT: usize = 64 << 20;
/// Bytes read from one connection per turn before the others get theirs.
pub const READ_BUDGET: usize = 256 << 10;
/// Initial capacity of an output buffer (released again once written out).
const OUT_CHUNK: usize = 16 << 10;
/// The read buffer shared by all connections.
const READ_CHUNK: usize = 64 << 10;

/// A protocol violation: the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Violation {
    /// A length prefix no frame may carry.
    Frame(FrameError),
    /// An unknown kind, or a known kind with the wrong length.
    Kind { kind: u8, total: usize },
}

/// One connection's routing state.
#[derive(Debug, Default)]
struct Peer {
    /// The start of a frame not yet complete (empty and unallocated between frames).
    partial: BytesMut,
    /// Bytes to write (empty and unallocated when drained).
    out: BytesMut,
    /// Channels this peer subscribed to.
    subs: Vec<u32>,
    /// In the router's dirty list.
    dirty: bool,
    /// Over [`MAX_PENDING_OUT`]: to be closed at the end of the turn.
    doomed: bool,
}

/// Channels, subscribers and output buffers: the relay without sockets.
///
/// ### Invariants
/// - every id in `channels` is an open peer, listed once per channel, and that channel is in
///   the peer's `subs` (and the reverse);
/// - `peer.dirty` ⇔ the id is in `dirty`, for open peers;
/// - ids in `free` are `None` in `peers`.
#[derive(Debug)]
struct Router {
    peers: Vec<Option<Peer>>,
    free: Vec<usize>,
    channels: HashMap<u32, Vec<usize>>,
    dirty: Vec<usize>,
    fault: FaultState,
}

impl Router {
    fn new(fault: Option<Fault>) -> Self {
        Router {
            peers: Vec::new(),
            free: Vec::new(),
            channels: HashMap::new(),
            dirty: Vec::new(),
            fault: FaultState::new(fault),
        }
    }

    /// A new peer's id (reusing closed ones).
    fn open(&mut self) -> usize {
        if let Some(id) = self.free.pop() {
            self.peers[id] = Some(Peer::default());
            id
        } else {
            self.peers.push(Some(Peer::default()));
            self.peers.len() - 1
        }
    }

    /// Forgets peer `id`: its subscriptions, buffers and any frame held for it.
    fn close(&mut self, id: usize) {
        let Some(peer) = self.peers.get_mut(id).and_then(Option::take) else {
            return;
        };
        for ch in peer.subs {
            if let Entry::Occupied(mut e) = self.channels.entry(ch) {
                let ids = e.get_mut();
                if let Some(i) = ids.iter().position(|&p| p == id) {
                    ids.swap_remove(i);
                }
                if ids.is_empty() {
                    e.remove();
                }
            }
        }
        if self.fault.held.as_ref().is_some_and(|(h, _)| *h == id) {
            self.fault.held = None;
        }
        self.free.push(id);
    }

    fn peer_mut(&mut self, id: usize) -> Option<&mut Peer> {
        self.peers.get_mut(id).and_then(Option::as_mut)
    }

    /// Marks `id` for writing if it has output (after a WRITABLE event).
    fn want_flush(&mut self, id: usize) {
        if let Some(peer) = self.peers.get_mut(id).and_then(Option::as_mut)
            && !peer.out.is_empty()
            && !peer.dirty
        {
            peer.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Handles bytes read from peer `id`: every complete frame is acted on, a partial one kept.
    fn input(&mut self, id: usize, data: &[u8]) -> Result<(), Violation> {
        let Some(peer) = self.peer_mut(id) else {
            return Ok(());
        };
        if peer.partial.is_empty() {
            let used = self.frames(id, data)?;
            if used < data.len()
                && let Some(peer) = self.peer_mut(id)
            {
                peer.partial.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut peer.partial);
            buf.extend_from_slice(data);
            let used = self.frames(id, &buf)?;
            buf.advance(used);
            if !buf.is_empty()
                && let Some(peer) = self.peer_mut(id)
            {
                peer.partial = buf;
            }
            // else: dropped, so an idle connection holds no input buffer.
        }
        Ok(())
    }

    /// Acts on every complete frame at the start of `data`; returns the bytes consumed.
    fn frames(&mut self, id: usize, data: &[u8]) -> Result<usize, Violation> {
        let mut pos = 0;
        while let Some(total) = frame_len(&data[pos..]).map_err(Violation::Frame)? {
            let frame = &data[pos..pos + total];
            match (frame[LEN_BYTES], total) {
                (KIND_PUBLISH, t) if t >= PUBLISH_HEAD_BYTES => self.forward(frame),
                (KIND_SUBSCRIBE, CHANNEL_FRAME_BYTES) => self.subscribe(id, frame_channel(frame)),
                (KIND_PING, EMPTY_FRAME_BYTES) => self.reply(id, put_pong),
                (kind, total) => return Err(Violation::Kind { kind, total }),
            }
            pos += total;
        }
        Ok(pos)
    }

    fn subscribe(&mut self, id: usize, channel: u32) {
        let Some(peer) = self.peers.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        if !peer.subs.contains(&channel) {
            peer.subs.push(channel);
            self.channels.entry(channel).or_default().push(id);
        }
        self.reply(id, |out| put_suback(out, channel));
    }

    fn reply(&mut self, id: usize, write: impl FnOnce(&mut BytesMut)) {
        let Some(peer) = self.peers.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        write(&mut peer.out);
        if !peer.dirty {
            peer.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Copies a PUBLISH frame to every subscriber of its channel (applying the fault, if armed).
    fn forward(&mut self, frame: &[u8]) {
        let Some(subs) = self.channels.get(&frame_channel(frame)) else {
            return;
        };
        let body_len = frame.len() - PUBLISH_HEAD_BYTES;
        for &id in subs {
            let Some(peer) = self.peers.get_mut(id).and_then(Option::as_mut) else {
                debug_assert!(false, "subscriber {id} is not open");
                continue;
            };
            if peer.doomed {
                continue;
            }
            let action = self.fault.next(body_len);
            match action {
                Action::Drop => continue,
                Action::Hold => {
                    self.fault.held = Some((id, frame.into()));
                    continue;
                }
                Action::Pass | Action::Duplicate | Action::Corrupt => {}
            }
            let out = &mut peer.out;
            if out.capacity() == 0 {
                out.reserve(OUT_CHUNK.max(frame.len()));
            }
            out.extend_from_slice(frame);
            match action {
                Action::Duplicate => out.extend_from_slice(frame),
                Action::Corrupt => {
                    if let Some(last) = out.last_mut() {
                        *last ^= 1;
                    }
                }
                Action::Pass | Action::Drop | Action::Hold => {}
            }
            if self.fault.held.as_ref().is_some_and(|(h, _)| *h == id)
                && let Some((_, held)) = self.fault.held.take()
            {
                out.extend_from_slice(&held);
            }
            if out.len() > MAX_PENDING_OUT {
                peer.doomed = true;
            }
            if !peer.dirty {
                peer.dirty = true;
                self.dirty.push(id);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server (I/O)
// ---------------------------------------------------------------------------------------------

const LISTENER: Token = Token(usize::MAX);
/// How long a turn waits for events at most, so the stop flag is seen.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// The listen backlog (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Runs the relay until the process is killed: [`run_until`] with a flag nothing sets.
///
/// The relay holds no state worth saving, so SIGINT and SIGTERM keep their default action.
pub fn run(opts: &RelayOptions, ready: impl FnOnce(SocketAddr)) -> io::Result<()> {
    run_until(opts, ready, Arc::new(AtomicBool::new(false)))
}

/// Binds `opts.listen`, calls `ready` with the bound address, and serves until `stop` is set
/// (seen within about 50 ms). Errors only if binding or polling fails.
pub fn run_until(
    opts: &RelayOptions,
    ready: impl FnOnce(SocketAddr),
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let listener = bind(opts.listen)?;
    let addr = listener.local_addr()?;
    let mut server = Server::new(listener, opts)?;
    ready(addr);
    server.serve(&stop)
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

#[derive(Debug)]
struct Sock {
    stream: TcpStream,
    /// WRITABLE interest is registered.
    want_write: bool,
}

#[derive(Debug)]
struct Server {
    poll: Poll,
    listener: TcpListener,
    /// Indexed by the router's peer ids.
    socks: Vec<Option<Sock>>,
    router: Router,
    live: usize,
    max_conns: usize,
    scratch: Box<[u8]>,
    /// Connections whose read budget ran out, to resume next turn (`true`: read to the end).
    again: Vec<(usize, bool)>,
    again_now: Vec<(usize, bool)>,
    flushing: Vec<usize>,
    /// Accepting failed (e.g. out of file descriptors): retry next turn, report once.
    accept_failing: bool,
}

impl Server {
    fn new(mut listener: TcpListener, opts: &RelayOptions) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Server {
            poll,
            listener,
            socks: Vec::new(),
            router: Router::new(opts.fault),
            live: 0,
            max_conns: opts.max_conns,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            again: Vec::new(),
            again_now: Vec::new(),
            flushing: Vec::new(),
            accept_failing: false,
        })
    }

    fn serve(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) {
            let timeout = if self.again.is_empty() {
                POLL_TIMEOUT
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            std::mem::swap(&mut self.again, &mut self.again_now);
            let mut again = std::mem::take(&mut self.again_now);
            for &(id, to_end) in &again {
                self.read(id, to_end);
            }
            again.clear();
            self.again_now = again;
            if self.accept_failing {
                self.accept();
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(id) => {
                        let to_end = event.is_read_closed() || event.is_error();
                        if event.is_readable() || to_end {
                            self.read(id, to_end);
                        }
                        if event.is_writable() {
                            self.router.want_flush(id);
                        }
                    }
                }
            }
            self.flush();
        }
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    self.accept_failing = false;
                    if self.live >= self.max_conns {
                        continue; // dropped: the client sees the connection closed
                    }
                    // Best effort: a failure only costs latency.
                    let _ = stream.set_nodelay(true);
                    let id = self.router.open();
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, Token(id), Interest::READABLE)
                        .is_err()
                    {
                        self.router.close(id);
                        continue;
                    }
                    if self.socks.len() <= id {
                        self.socks.resize_with(id + 1, || None);
                    }
                    self.socks[id] = Some(Sock {
                        stream,
                        want_write: false,
                    });
                    self.live += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    if !self.accept_failing {
                        eprintln!("relay: accept failed (retrying each turn): {e}");
                    }
                    self.accept_failing = true;
                    return;
                }
            }
        }
    }

    /// Reads connection `id` until `WouldBlock`, a short read (unless `to_end`: the peer closed
    /// or errored, so read until EOF), or the read budget runs out.
    ///
    /// Stopping at a short read is sound on Linux: epoll(7) notes that for stream sockets a
    /// short read means the buffer was drained, and data arriving later raises a new edge.
    fn read(&mut self, id: usize, to_end: bool) {
        let Some(sock) = self.socks.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        let mut budget = READ_BUDGET;
        let keep = loop {
            match sock.stream.read(&mut self.scratch) {
                Ok(0) => break false,
                Ok(n) => {
                    if self.router.input(id, &self.scratch[..n]).is_err() {
                        break false;
                    }
                    if n < self.scratch.len() && !to_end {
                        break true;
                    }
                    if n >= budget {
                        self.again.push((id, to_end));
                        break true;
                    }
                    budget -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        if !keep {
            self.close(id);
        }
    }

    /// Writes every dirty connection's output once; closes doomed and failed ones.
    fn flush(&mut self) {
        let mut dirty =
            std::mem::replace(&mut self.router.dirty, std::mem::take(&mut self.flushing));
        for &id in &dirty {
            let Some(peer) = self.router.peers.get_mut(id).and_then(Option::as_mut) else {
                continue;
            };
            peer.dirty = false;
            let Some(sock) = self.socks.get_mut(id).and_then(Option::as_mut) else {
                continue;
            };
            let ok = !peer.doomed
                && write_out(&mut sock.stream, &mut peer.out).is_ok()
                && set_interest(&self.poll, sock, id, !peer.out.is_empty()).is_ok();
            if !ok {
                self.close(id);
            }
        }
        dirty.clear();
        self.flushing = dirty;
    }

    fn close(&mut self, id: usize) {
        self.router.close(id);
        if let Some(mut sock) = self.socks.get_mut(id).and_then(Option::take) {
            // The fd is closed on drop, which removes it from epoll anyway.
            let _ = self.poll.registry().deregister(&mut sock.stream);
            self.live -= 1;
        }
    }
}

/// Writes `out` until it is empty, the socket is full (`WouldBlock` or a short write), or an
/// error. A drained buffer is released.
fn write_out(stream: &mut TcpStream, out: &mut BytesMut) -> io::Result<()> {
    while !out.is_empty() {
        match stream.write(out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                let short = n < out.len();
                out.advance(n);
                if short {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        *out = BytesMut::new();
    }
    Ok(())
}

/// Registers WRITABLE interest exactly while output is pending.
fn set_interest(poll: &Poll, sock: &mut Sock, id: usize, want_write: bool) -> io::Result<()> {
    if sock.want_write == want_write {
        return Ok(());
    }
    let interest = if want_write {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    poll.registry()
        .reregister(&mut sock.stream, Token(id), interest)?;
    sock.want_write = want_write;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;
    use std::sync::mpsc;
    use std::thread::{self, JoinHandle};

    use bytes::BytesMut;

    use super::*;
    use crate::driver::relay::RelayDriver;
    use crate::driver::{Driver, Endpoint, Event, Names, Role};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A relay on 127.0.0.1:0 in a thread, stopped and joined on drop.
    struct Relay {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<io::Result<()>>>,
    }

    impl Relay {
        fn start(fault: Option<Fault>) -> Relay {
            Relay::with(RelayOptions {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                fault,
                max_conns: 100,
            })
        }

        fn with(opts: RelayOptions) -> Relay {
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = mpsc::channel();
            let flag = Arc::clone(&stop);
            let thread = thread::spawn(move || {
                run_until(&opts, |addr| tx.send(addr).expect("test alive"), flag)
            });
            let addr = rx.recv_timeout(TIMEOUT).expect("relay bound");
            Relay {
                addr,
                stop,
                thread: Some(thread),
            }
        }

        fn connect(&self) -> StdStream {
            let s = StdStream::connect(self.addr).expect("connect");
            s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            s.set_write_timeout(Some(TIMEOUT)).expect("timeout");
            s.set_nodelay(true).expect("nodelay");
            s
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let r = t.join().expect("relay thread panicked");
                if !thread::panicking() {
                    r.expect("relay failed");
                }
            }
        }
    }

    fn send(s: &mut StdStream, write: impl FnOnce(&mut BytesMut)) {
        let mut b = BytesMut::new();
        write(&mut b);
        s.write_all(&b).expect("write");
    }

    /// One whole frame, length prefix included.
    fn read_frame(s: &mut StdStream) -> Vec<u8> {
        let mut head = [0; 4];
        s.read_exact(&mut head).expect("frame head");
        let len = u32::from_be_bytes(head) as usize;
        let mut frame = head.to_vec();
        frame.resize(4 + len, 0);
        s.read_exact(&mut frame[4..]).expect("frame payload");
        frame
    }

    fn bytes_of(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut b = BytesMut::new();
        write(&mut b);
        b.to_vec()
    }

    fn subscribe(s: &mut StdStream, channel: u32) {
        send(s, |b| put_subscribe(b, channel));
        assert_eq!(read_frame(s), bytes_of(|b| put_suback(b, channel)));
    }

    /// PING and expect PONG as the very next frame: nothing else was queued for `s`.
    fn barrier(s: &mut StdStream) {
        send(s, put_ping);
        assert_eq!(
            read_frame(s),
            bytes_of(put_pong),
            "unexpected frame before PONG"
        );
    }

    /// The body of the next frame, which must be a PUBLISH on `channel`.
    fn read_body(s: &mut StdStream, channel: u32) -> Vec<u8> {
        let f = read_frame(s);
        assert_eq!(f[4], KIND_PUBLISH, "{f:?}");
        assert_eq!(frame_channel(&f), channel);
        f[PUBLISH_HEAD_BYTES..].to_vec()
    }

    fn assert_closed(s: &mut StdStream) {
        let mut buf = [0; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("connection still open: {other:?}"),
        }
    }

    #[test]
    fn forwards_to_every_subscriber_and_nobody_else() {
        let relay = Relay::start(None);
        let (mut a, mut b, mut c, mut d) = (
            relay.connect(),
            relay.connect(),
            relay.connect(),
            relay.connect(),
        );
        let mut p = relay.connect();
        subscribe(&mut a, 7);
        subscribe(&mut b, 7);
        subscribe(&mut b, 7); // twice: still one copy
        subscribe(&mut c, 8);
        // d subscribes to nothing; p publishes without subscribing.
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|i| bytes_of(|o| put_publish(o, 7, &[i; 10])))
            .collect();
        for f in &frames {
            p.write_all(f).expect("publish");
        }
        barrier(&mut p); // p's publishes have all been forwarded
        for s in [&mut a, &mut b] {
            for f in &frames {
                assert_eq!(&read_frame(s), f, "forwarded byte for byte");
            }
            barrier(s);
        }
        barrier(&mut c);
        barrier(&mut d);
        // A channel without subscribers swallows the frame.
        send(&mut p, |o| put_publish(o, 99, b"nobody"));
        barrier(&mut p);
    }

    #[test]
    fn order_is_preserved_including_the_senders_own_copy() {
        let relay = Relay::start(None);
        let (mut s, mut p) = (relay.connect(), relay.connect());
        subscribe(&mut s, 1);
        subscribe(&mut p, 1);
        let mut wire = BytesMut::new();
        for i in 0..5000u32 {
            put_publish(&mut wire, 1, &i.to_be_bytes());
        }
        p.write_all(&wire).expect("publish");
        for r in [&mut s, &mut p] {
            for i in 0..5000u32 {
                assert_eq!(read_body(r, 1), i.to_be_bytes());
            }
            barrier(r);
        }
    }

    #[test]
    fn split_and_large_frames_are_reassembled() {
        let relay = Relay::start(None);
        let (mut s, mut p) = (relay.connect(), relay.connect());
        subscribe(&mut s, 3);
        // A frame dribbled one byte per write.
        let small = bytes_of(|o| put_publish(o, 3, b"dribbled"));
        for byte in &small {
            p.write_all(std::slice::from_ref(byte)).expect("write");
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(read_frame(&mut s), small);
        // Maximum-size frames, more than the socket buffers hold: the relay keeps output
        // pending and resumes on WRITABLE.
        let bodies: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; MAX_BODY_BYTES]).collect();
        let writer = {
            let mut p = p.try_clone().expect("clone");
            let bodies = bodies.clone();
            thread::spawn(move || {
                for b in &bodies {
                    send(&mut p, |o| put_publish(o, 3, b));
                }
            })
        };
        for b in &bodies {
            assert!(read_body(&mut s, 3) == *b, "large body mismatch");
        }
        writer.join().expect("writer");
        barrier(&mut s);
        barrier(&mut p);
    }

    /// Publishes bodies `[1]..=[n]` on channel 1 to one subscriber; returns what it got.
    fn deliveries(fault: Fault, n: u8) -> Vec<Vec<u8>> {
        let relay = Relay::start(Some(fault));
        let (mut s, mut p) = (relay.connect(), relay.connect());
        subscribe(&mut s, 1);
        for i in 1..=n {
            send(&mut p, |o| put_publish(o, 1, &[i, i]));
        }
        barrier(&mut p);
        send(&mut s, put_ping);
        let mut got = Vec::new();
        loop {
            let f = read_frame(&mut s);
            if f == bytes_of(put_pong) {
                return got;
            }
            assert_eq!(frame_channel(&f), 1);
            got.push(f[PUBLISH_HEAD_BYTES..].to_vec());
        }
    }

    fn bodies(ids: &[u8]) -> Vec<Vec<u8>> {
        ids.iter().map(|&i| vec![i, i]).collect()
    }

    #[test]
    fn fault_drop_loses_the_nth_once() {
        assert_eq!(deliveries(Fault::Drop(2), 6), bodies(&[1, 3, 4, 5, 6]));
        assert_eq!(deliveries(Fault::Drop(1), 3), bodies(&[2, 3]));
    }

    #[test]
    fn fault_reorder_swaps_the_nth_with_the_next_once() {
        assert_eq!(
            deliveries(Fault::Reorder(2), 6),
            bodies(&[1, 3, 2, 4, 5, 6])
        );
        // The last one has no successor: it stays held (lost).
        assert_eq!(deliveries(Fault::Reorder(3), 3), bodies(&[1, 2]));
    }

    #[test]
    fn fault_duplicate_repeats_the_nth_once() {
        assert_eq!(
            deliveries(Fault::Duplicate(2), 5),
            bodies(&[1, 2, 2, 3, 4, 5])
        );
    }

    #[test]
    fn fault_corrupt_flips_one_bit_of_the_nth_once() {
        let mut want = bodies(&[1, 2, 3, 4, 5]);
        want[1][1] ^= 1;
        assert_eq!(deliveries(Fault::Corrupt(2), 5), want);
    }

    #[test]
    fn faults_count_deliveries_across_subscribers() {
        let relay = Relay::start(Some(Fault::Duplicate(3)));
        let (mut a, mut b, mut p) = (relay.connect(), relay.connect(), relay.connect());
        subscribe(&mut a, 1);
        subscribe(&mut b, 1);
        send(&mut p, |o| put_publish(o, 1, b"m1")); // deliveries 1 (a), 2 (b)
        send(&mut p, |o| put_publish(o, 1, b"m2")); // deliveries 3 (a, doubled), 4 (b)
        barrier(&mut p);
        assert_eq!(read_body(&mut a, 1), b"m1");
        assert_eq!(read_body(&mut a, 1), b"m2");
        assert_eq!(read_body(&mut a, 1), b"m2");
        barrier(&mut a);
        assert_eq!(read_body(&mut b, 1), b"m1");
        assert_eq!(read_body(&mut b, 1), b"m2");
        barrier(&mut b);
    }

    /// `bad` is written on one connection; it must be closed while a pair on the same relay
    /// keeps working.
    fn closes_only_the_offender(bad: &[u8]) {
        let relay = Relay::start(None);
        let (mut s, mut p, mut x) = (relay.connect(), relay.connect(), relay.connect());
        subscribe(&mut s, 4);
        subscribe(&mut x, 4);
        x.write_all(bad).expect("write garbage");
        assert_closed(&mut x);
        send(&mut p, |o| put_publish(o, 4, b"still here"));
        assert_eq!(read_body(&mut s, 4), b"still here");
        barrier(&mut s);
        barrier(&mut p);
    }

    #[test]
    fn bad_kind_closes_only_that_connection() {
        closes_only_the_offender(&[0, 0, 0, 1, 9]);
        closes_only_the_offender(&[0, 0, 0, 1, KIND_PONG]); // a relay → client kind
        closes_only_the_offender(&[0, 0, 0, 5, KIND_SUBACK, 0, 0, 0, 4]);
    }

    #[test]
    fn oversized_length_closes_only_that_connection() {
        let len = u32::try_from(MAX_FRAME_BYTES + 1).expect("fits");
        closes_only_the_offender(&len.to_be_bytes());
        closes_only_the_offender(&[0xff, 0xff, 0xff, 0xff, KIND_PUBLISH, 1, 2, 3]);
    }

    #[test]
    fn malformed_frames_close_only_that_connection() {
        closes_only_the_offender(&[0, 0, 0, 0]); // zero length
        closes_only_the_offender(&[0, 0, 0, 4, KIND_SUBSCRIBE, 0, 0, 4]); // short subscribe
        closes_only_the_offender(&[0, 0, 0, 6, KIND_SUBSCRIBE, 0, 0, 0, 4, 0]); // long subscribe
        closes_only_the_offender(&[0, 0, 0, 3, KIND_PUBLISH, 0, 4]); // publish without channel
        closes_only_the_offender(&[0, 0, 0, 2, KIND_PING, 0]); // ping with payload
    }

    #[test]
    fn connections_beyond_max_conns_are_closed() {
        let relay = Relay::with(RelayOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            fault: None,
            max_conns: 2,
        });
        let (mut a, mut b) = (relay.connect(), relay.connect());
        barrier(&mut a);
        barrier(&mut b);
        let mut c = relay.connect();
        assert_closed(&mut c);
        drop(a);
        // The slot is freed once the relay sees the close; retry briefly.
        let mut ok = false;
        for _ in 0..100 {
            let mut d = relay.connect();
            send(&mut d, put_ping);
            let mut head = [0; 5];
            if d.read_exact(&mut head).is_ok() {
                assert_eq!(head.to_vec(), bytes_of(put_pong));
                ok = true;
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert!(ok, "a freed slot is reused");
        barrier(&mut b);
    }

    #[test]
    fn driver_talks_to_relay() {
        let relay = Relay::start(None);
        let names = Names {
            prefix: "lg-".into(),
            homes: None,
        };
        let endpoint = |client, listen| Endpoint {
            names: names.clone(),
            client,
            listen,
            role: Role::Both,
        };
        let mut ends = [
            (RelayDriver::new(endpoint(0, Some(0))), relay.connect()),
            (RelayDriver::new(endpoint(1, None)), relay.connect()),
        ];
        // Waits for the next events on one connection.
        fn events(d: &mut RelayDriver, s: &mut StdStream, input: &mut BytesMut) -> Vec<Event> {
            let mut out = BytesMut::new();
            let mut ev = Vec::new();
            while ev.is_empty() {
                let mut buf = [0; 4096];
                let n = s.read(&mut buf).expect("read");
                assert!(n > 0, "closed");
                input.extend_from_slice(&buf[..n]);
                d.receive(input, &mut out, &mut ev).expect("valid");
            }
            ev
        }
        let mut inputs = [BytesMut::new(), BytesMut::new()];
        for ((d, s), input) in ends.iter_mut().zip(&mut inputs) {
            let mut out = BytesMut::new();
            d.start(&mut out);
            s.write_all(&out).expect("start");
            assert_eq!(events(d, s, input), vec![Event::Ready]);
        }
        let mut out = BytesMut::new();
        ends[1].0.send(0, 1, b"hello relay", &mut out);
        ends[1].1.write_all(&out).expect("send");
        let (d, s) = &mut ends[0];
        assert_eq!(
            events(d, s, &mut inputs[0]),
            vec![Event::Delivered {
                body: bytes::Bytes::from_static(b"hello relay"),
                seq: None
            }]
        );
    }

    #[test]
    fn router_forgets_closed_peers() {
        let mut r = Router::new(None);
        let (a, b) = (r.open(), r.open());
        let sub = bytes_of(|o| put_subscribe(o, 5));
        r.input(a, &sub).expect("subscribe");
        r.input(b, &sub).expect("subscribe");
        r.close(a);
        assert_eq!(r.channels.get(&5).map(Vec::as_slice), Some(&[b][..]));
        let c = r.open();
        assert_eq!(c, a, "ids are reused");
        let publish = bytes_of(|o| put_publish(o, 5, b"x"));
        r.input(c, &publish).expect("publish");
        let peer_c = r.peers[c].as_ref().expect("open");
        assert!(
            peer_c.out.is_empty(),
            "the new peer inherits no subscription"
        );
        r.close(b);
        r.close(c);
        assert!(r.channels.is_empty());
    }

    #[test]
    fn router_keeps_partial_frames_and_releases_them() {
        let mut r = Router::new(None);
        let (a, b) = (r.open(), r.open());
        r.input(a, &bytes_of(|o| put_subscribe(o, 1)))
            .expect("subscribe");
        let f = bytes_of(|o| put_publish(o, 1, b"split"));
        for i in 0..f.len() {
            r.input(b, &f[..i]).expect("first part");
            assert_eq!(r.peers[b].as_ref().expect("open").partial.len(), i);
            r.input(b, &f[i..]).expect("second part");
            let pb = r.peers[b].as_ref().expect("open");
            assert!(
                pb.partial.is_empty() && pb.partial.capacity() == 0,
                "released"
            );
        }
        let out = &r.peers[a].as_ref().expect("open").out;
        assert_eq!(out.len(), CHANNEL_FRAME_BYTES + f.len() * f.len());
    }

    #[test]
    fn corrupt_skips_empty_bodies() {
        let mut r = Router::new(Some(Fault::Corrupt(1)));
        let (a, b) = (r.open(), r.open());
        r.input(a, &bytes_of(|o| put_subscribe(o, 1)))
            .expect("subscribe");
        r.peers[a].as_mut().expect("open").out.clear();
        r.input(b, &bytes_of(|o| put_publish(o, 1, b"")))
            .expect("publish");
        r.input(b, &bytes_of(|o| put_publish(o, 1, b"ab")))
            .expect("publish");
        r.input(b, &bytes_of(|o| put_publish(o, 1, b"cd")))
            .expect("publish");
        let mut want = BytesMut::new();
        put_publish(&mut want, 1, b"");
        put_publish(&mut want, 1, b"ac");
        put_publish(&mut want, 1, b"cd");
        assert_eq!(r.peers[a].as_ref().expect("open").out, want);
    }

    #[test]
    fn fault_parsing() {
        assert_eq!("drop:3".parse(), Ok(Fault::Drop(3)));
        assert_eq!("reorder:1".parse(), Ok(Fault::Reorder(1)));
        assert_eq!("duplicate:10".parse(), Ok(Fault::Duplicate(10)));
        assert_eq!("corrupt:2".parse(), Ok(Fault::Corrupt(2)));
        for f in [
            Fault::Drop(4),
            Fault::Reorder(5),
            Fault::Duplicate(6),
            Fault::Corrupt(7),
        ] {
            assert_eq!(f.to_string().parse(), Ok(f));
        }
        assert!(matches!(
            "drop".parse::<Fault>(),
            Err(FaultParseError::Shape(_))
        ));
        assert!(matches!(
            "lose:1".parse::<Fault>(),
            Err(FaultParseError::Kind(_))
        ));
        assert!(matches!(
            "drop:0".parse::<Fault>(),
            Err(FaultParseError::Count(_))
        ));
        assert!(matches!(
            "drop:x".parse::<Fault>(),
            Err(FaultParseError::Count(_))
        ));
        let err = "lose:1".parse::<Fault>().expect_err("bad kind").to_string();
        assert!(err.contains("drop, reorder, duplicate or corrupt"), "{err}");
    }

    #[test]
    fn options_parse_from_the_command_line() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            relay: RelayOptions,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["relay"]).expect("defaults");
        assert_eq!(cli.relay.listen, RelayOptions::default().listen);
        assert_eq!(cli.relay.max_conns, 20_000);
        assert_eq!(cli.relay.fault, None);
        let cli = <Cli as clap::Parser>::try_parse_from([
            "relay",
            "--listen",
            "0.0.0.0:9",
            "--fault",
            "drop:2",
            "--max-conns",
            "5",
        ])
        .expect("flags");
        assert_eq!(cli.relay.fault, Some(Fault::Drop(2)));
        assert_eq!(cli.relay.max_conns, 5);
        assert!(<Cli as clap::Parser>::try_parse_from(["relay", "--fault", "x:1"]).is_err());
    }
}
