//! The event loop: one `mio::Poll` holding every connection of this worker.
//!
//! A turn is: [`Engine::turn`] waits for readiness, finishes connects, reads until `WouldBlock`
//! (or a per-connection budget, the rest is read next turn), lets each connection's driver turn
//! bytes into [`Happening`]s and returns them; the scenario reacts (sends more, records
//! latencies); [`Engine::finish_turn`] lets drivers batch their acks and writes each dirty
//! connection once. A connection costs a socket, two buffers that start empty, and its driver.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::body::{self, Stamp};
use crate::driver::{Driver, Event, GroupOp, Role};

/// Bytes read from one connection per turn before others get their turn.
pub const READ_BUDGET: usize = 1 << 20;
/// Bytes read per `read` call (into the engine's scratch buffer, then appended to the
/// connection's input).
const READ_CHUNK: usize = 64 * 1024;
/// An empty buffer with more capacity than this is released (idle connections stay small).
const KEEP_CAPACITY: usize = 64 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The TCP connect is under way.
    Connecting,
    /// Connected; the driver's opening (login, subscribe) is under way.
    Open,
    /// The driver said the connection is ready for messages.
    Ready,
    /// Closed (by either side, or failed).
    Closed,
}

/// One connection.
#[derive(Debug)]
struct Conn {
    client: u32,
    role: Role,
    stream: Option<TcpStream>,
    state: State,
    driver: Box<dyn Driver>,
    input: BytesMut,
    output: BytesMut,
    started_ns: u64,
    connected_ns: u64,
    dirty: bool,
    writable_interest: bool,
}

impl std::fmt::Debug for dyn Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Driver")
    }
}

/// Something that happened on a connection this turn.
#[derive(Debug)]
pub enum Happening {
    /// The TCP connect completed after `connect_ns`.
    Connected {
        /// The connection.
        conn: usize,
        /// How long the connect took.
        connect_ns: u64,
    },
    /// The driver reported an event. For [`Event::Ready`], `since_connect_ns` is the time
    /// from connect completion (the login latency).
    Event {
        /// The connection.
        conn: usize,
        /// What happened.
        event: Event,
        /// For `Ready`: time since the connect completed.
        since_connect_ns: u64,
    },
    /// The connection is closed; `reason` says why.
    Closed {
        /// The connection.
        conn: usize,
        /// Why.
        reason: String,
    },
}

/// The worker's event loop.
#[derive(Debug)]
pub struct Engine {
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    epoch: Instant,
    happenings: Vec<Happening>,
    driver_events: Vec<Event>,
    dirty: Vec<usize>,
    more_to_read: Vec<usize>,
    body: Vec<u8>,
    scratch: Box<[u8]>,
}

impl Engine {
    /// A new engine whose clock starts at `epoch`.
    ///
    /// # Errors
    ///
    /// The poll cannot be created.
    pub fn new(epoch: Instant) -> io::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            conns: Vec::new(),
            epoch,
            happenings: Vec::new(),
            driver_events: Vec::new(),
            dirty: Vec::new(),
            more_to_read: Vec::new(),
            body: Vec::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        })
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Starts connecting to `addr` from `source` (any port), for `client` in `role`, spoken by
    /// `driver`; returns the connection's number.
    ///
    /// # Errors
    ///
    /// The socket cannot be created, bound or registered (e.g. out of file descriptors). A
    /// refused connect shows up later as [`Happening::Closed`].
    pub fn connect(
        &mut self,
        addr: SocketAddr,
        source: Option<IpAddr>,
        client: u32,
        role: Role,
        driver: Box<dyn Driver>,
    ) -> io::Result<usize> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        socket.set_tcp_nodelay(true)?;
        if let Some(ip) = source {
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(socket.into());
        let id = self.conns.len();
        self.poll.registry().register(
            &mut stream,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.conns.push(Conn {
            client,
            role,
            stream: Some(stream),
            state: State::Connecting,
            driver,
            input: BytesMut::new(),
            output: BytesMut::new(),
            started_ns: self.now_ns(),
            connected_ns: 0,
            dirty: false,
            writable_interest: true,
        });
        Ok(id)
    }

    /// How many connections were ever opened.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection was opened.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The client and role of connection `conn`.
    pub fn who(&self, conn: usize) -> (u32, Role) {
        let c = &self.conns[conn];
        (c.client, c.role)
    }

    /// The state of connection `conn`.
    pub fn state(&self, conn: usize) -> State {
        self.conns[conn].state
    }

    /// Bytes waiting to be written on `conn`.
    pub fn pending_output(&self, conn: usize) -> usize {
        self.conns[conn].output.len()
    }

    /// Waits up to `timeout` for readiness and returns what happened. Give the vector back with
    /// [`Engine::recycle`] to reuse it.
    ///
    /// # Errors
    ///
    /// The poll itself failed.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<Vec<Happening>> {
        let timeout = if self.more_to_read.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let mut ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token().0,
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable(),
                )
            })
            .collect();
        for conn in std::mem::take(&mut self.more_to_read) {
            ready.push((conn, true, false));
        }
        for (conn, readable, writable) in ready {
            if conn >= self.conns.len() {
                continue;
            }
            if self.conns[conn].state == State::Connecting {
                if writable || readable {
                    self.finish_connect(conn);
                }
                if self.conns[conn].state == State::Connecting {
                    continue;
                }
            }
            if writable && self.conns[conn].state != State::Closed {
                self.mark_dirty(conn);
            }
            if readable && self.conns[conn].state != State::Closed {
                self.read(conn);
            }
        }
        Ok(std::mem::take(&mut self.happenings))
    }

    /// Returns the vector [`Engine::turn`] gave out, for reuse.
    pub fn recycle(&mut self, mut v: Vec<Happening>) {
        v.clear();
        if self.happenings.is_empty() {
            self.happenings = v;
        }
    }

    fn finish_connect(&mut self, id: usize) {
        let now = self.now_ns();
        let c = &mut self.conns[id];
        let Some(stream) = &c.stream else { return };
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => {
                let reason = format!("connect failed: {e}");
                self.close(id, reason);
                return;
            }
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // not yet
            Err(e) => {
                self.close(id, format!("connect failed: {e}"));
                return;
            }
        }
        c.state = State::Open;
        c.connected_ns = now;
        let connect_ns = now.saturating_sub(c.started_ns);
        c.driver.start(&mut c.output);
        self.happenings.push(Happening::Connected {
            conn: id,
            connect_ns,
        });
        self.mark_dirty(id);
    }

    fn mark_dirty(&mut self, id: usize) {
        let c = &mut self.conns[id];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    fn read(&mut self, id: usize) {
        let mut total = 0;
        let mut eof = None;
        {
            let c = &mut self.conns[id];
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            loop {
                match stream.read(&mut self.scratch[..]) {
                    Ok(0) => {
                        eof = Some("closed by the peer".to_string());
                        break;
                    }
                    Ok(n) => {
                        c.input.extend_from_slice(&self.scratch[..n]);
                        total += n;
                        if total >= READ_BUDGET {
                            self.more_to_read.push(id);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        eof = Some(format!("read failed: {e}"));
                        break;
                    }
                }
            }
        }
        if total > 0 {
            self.drive(id);
        }
        if let Some(reason) = eof
            && self.conns[id].state != State::Closed
        {
            self.close(id, reason);
        }
    }

    fn drive(&mut self, id: usize) {
        let now = self.now_ns();
        let mut events = std::mem::take(&mut self.driver_events);
        let c = &mut self.conns[id];
        let result = c.driver.receive(&mut c.input, &mut c.output, &mut events);
        if c.input.is_empty() && c.input.capacity() > KEEP_CAPACITY {
            c.input = BytesMut::new();
        }
        let since_connect = now.saturating_sub(c.connected_ns);
        for event in events.drain(..) {
            if matches!(event, Event::Ready) {
                c.state = State::Ready;
            }
            self.happenings.push(Happening::Event {
                conn: id,
                event,
                since_connect_ns: since_connect,
            });
        }
        self.driver_events = events;
        // Drivers may batch (acks) until the end of the turn: flush them then.
        self.mark_dirty(id);
        if let Err(e) = result {
            self.close(id, format!("protocol error: {e}"));
        }
    }

    /// Writes a message `stamp` with a body of `body_len` bytes from `conn` to client `to`,
    /// tagged `tag`.
    pub fn send(&mut self, conn: usize, to: u32, tag: u64, stamp: Stamp, body_len: usize) {
        let c = &mut self.conns[conn];
        if c.state == State::Closed {
            return;
        }
        let len = body_len.max(body::MIN_LEN);
        self.body.resize(len, 0);
        body::fill(stamp, &mut self.body);
        c.driver.send(to, tag, &self.body, &mut c.output);
        self.mark_dirty(conn);
    }

    /// Lets `conn`'s driver write a keep-alive.
    pub fn heartbeat(&mut self, conn: usize) {
        let c = &mut self.conns[conn];
        if c.state == State::Ready {
            c.driver.heartbeat(&mut c.output);
            self.mark_dirty(conn);
        }
    }

    /// Asks `conn`'s driver for an offline catch-up.
    ///
    /// # Errors
    ///
    /// The system keeps nothing for offline clients.
    pub fn sync(&mut self, conn: usize) -> Result<(), String> {
        let c = &mut self.conns[conn];
        c.driver.sync(&mut c.output).map_err(|e| e.0)?;
        self.mark_dirty(conn);
        Ok(())
    }

    /// Lets `conn`'s driver write group request `op` tagged `request`.
    ///
    /// # Errors
    ///
    /// The system has no groups, or the request does not fit a frame.
    pub fn group(&mut self, conn: usize, request: u64, op: &GroupOp) -> Result<(), String> {
        let c = &mut self.conns[conn];
        c.driver
            .group(request, op, &mut c.output)
            .map_err(|e| e.0)?;
        self.mark_dirty(conn);
        Ok(())
    }

    /// Ends the turn: drivers flush what they batched and every dirty connection is written.
    pub fn finish_turn(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &id in &dirty {
            self.conns[id].dirty = false;
            if self.conns[id].state == State::Closed {
                continue;
            }
            {
                let c = &mut self.conns[id];
                if c.state != State::Connecting {
                    c.driver.flush(&mut c.output);
                }
            }
            self.write(id);
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn write(&mut self, id: usize) {
        let mut failed = None;
        {
            let c = &mut self.conns[id];
            if c.state == State::Connecting {
                return;
            }
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            while !c.output.is_empty() {
                match stream.write(&c.output) {
                    Ok(0) => {
                        failed = Some("write returned 0".to_string());
                        break;
                    }
                    Ok(n) => c.output.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(format!("write failed: {e}"));
                        break;
                    }
                }
            }
            if failed.is_none() {
                if c.output.is_empty() && c.output.capacity() > KEEP_CAPACITY {
                    c.output = BytesMut::new();
                }
                let want = !c.output.is_empty();
                if want != c.writable_interest {
                    let interest = if want {
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        Interest::READABLE
                    };
                    if let Err(e) = self.poll.registry().reregister(stream, Token(id), interest) {
                        failed = Some(format!("reregister failed: {e}"));
                    } else {
                        c.writable_interest = want;
                    }
                }
            }
        }
        if let Some(reason) = failed {
            self.close(id, reason);
        }
    }

    /// Closes `conn` (if open) and reports it.
    pub fn close(&mut self, id: usize, reason: String) {
        let c = &mut self.conns[id];
        if c.state == State::Closed {
            return;
        }
        c.state = State::Closed;
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.input = BytesMut::new();
        c.output = BytesMut::new();
        self.happenings.push(Happening::Closed { conn: id, reason });
    }

    /// Closes every connection quietly (end of run).
    pub fn close_all(&mut self) {
        for c in &mut self.conns {
            c.state = State::Closed;
            if let Some(mut s) = c.stream.take() {
                let _ = self.poll.registry().deregister(&mut s);
            }
        }
        self.happenings.clear();
    }
}
