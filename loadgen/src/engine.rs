//! The event loop: one `mio::Poll` holding every connection of this worker.
//!
//! A turn is: [`Engine::turn`] waits for readiness, finishes connects, reads until `WouldBlock`
//! (or a per-connection budget, the rest is read next turn), lets each connection's driver turn
//! bytes into [`Happening`]s and returns them; the scenario reacts (sends more, records
//! latencies); [`Engine::finish_turn`] lets drivers batch their acks and writes each dirty
//! connection once. A connection costs a socket, two buffers that start empty, and its driver.
//!
//! Drivers always speak plain bytes (TCP framing, or WebSocket frames); the engine's [`Wire`]
//! says what carries them: the TCP socket itself, a rustls client session on it (`tls`, `wss`),
//! or a [`UdpSession`] on a connected UDP socket (`udp`), whose timers (login resends, `Send`
//! retries, keep-alives) the engine runs every [`UDP_TICK_NS`] from [`Engine::turn`].

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use mio::event::Source;
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConnection;
use rustls::pki_types::ServerName;
use socket2::{Domain, Protocol, Socket, Type};

use crate::body::{self, Stamp};
use crate::driver::{Driver, Event, GroupOp, Role};
use crate::udp::UdpSession;

/// Bytes read from one connection per turn before others get their turn.
pub const READ_BUDGET: usize = 1 << 20;
/// Bytes read per `read` call (into the engine's scratch buffer, then appended to the
/// connection's input).
const READ_CHUNK: usize = 64 * 1024;
/// An empty buffer with more capacity than this is released (idle connections stay small).
const KEEP_CAPACITY: usize = 64 * 1024;
/// How often the UDP sessions' timers run, at most.
pub const UDP_TICK_NS: u64 = 10_000_000;
/// `SO_RCVBUF` asked for each UDP socket (the kernel caps it at `net.core.rmem_max`), so a
/// burst from the broker is not dropped before it is read.
const UDP_RECV_BUFFER: usize = 1 << 20;

/// What carries the drivers' bytes.
#[derive(Clone)]
pub enum Wire {
    /// The TCP socket itself.
    Plain,
    /// A TLS client session on the TCP socket, verifying the broker as `name` under `config`.
    Tls {
        /// Trust roots and protocol versions.
        config: Arc<rustls::ClientConfig>,
        /// The name the broker's certificate must be valid for.
        name: ServerName<'static>,
    },
    /// A UDP session (the driver must speak TCP framing).
    Udp {
        /// The largest datagram to send, in bytes (a larger frame goes alone, in one of its own
        /// size).
        max_datagram: usize,
        /// For tests: the fraction of datagrams dropped at random, both ways.
        loss: f64,
    },
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wire::Plain => f.write_str("Plain"),
            Wire::Tls { name, .. } => write!(f, "Tls({name:?})"),
            Wire::Udp { max_datagram, loss } => write!(f, "Udp({max_datagram}, loss {loss})"),
        }
    }
}

/// A connection's socket, and what runs on it.
enum Link {
    Tcp(TcpStream),
    Tls(Box<TlsLink>),
    Udp(Box<UdpLink>),
    Gone,
}

struct TlsLink {
    sock: TcpStream,
    tls: ClientConnection,
}

struct UdpLink {
    sock: UdpSocket,
    session: UdpSession,
    /// For tests: the fraction of datagrams dropped at random, both ways.
    loss: f64,
}

impl UdpLink {
    fn lose(&self) -> bool {
        self.loss > 0.0 && rand::random::<f64>() < self.loss
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Tcp(_) => "Tcp",
            Link::Tls(_) => "Tls",
            Link::Udp(_) => "Udp",
            Link::Gone => "Gone",
        })
    }
}

impl Link {
    fn source(&mut self) -> Option<&mut dyn Source> {
        match self {
            Link::Tcp(s) => Some(s),
            Link::Tls(t) => Some(&mut t.sock),
            Link::Udp(u) => Some(&mut u.sock),
            Link::Gone => None,
        }
    }

    /// The socket's pending error, or whether it is connected yet.
    fn connect_state(&self) -> io::Result<bool> {
        let (error, peer) = match self {
            Link::Tcp(s) => (s.take_error(), s.peer_addr()),
            Link::Tls(t) => (t.sock.take_error(), t.sock.peer_addr()),
            Link::Udp(u) => (u.sock.take_error(), u.sock.peer_addr()),
            Link::Gone => return Err(io::Error::other("no socket")),
        };
        if let Some(e) = error? {
            return Err(e);
        }
        match peer {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }
}

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
    link: Link,
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
    wire: Wire,
    /// Connections on UDP (their timers run in [`Engine::turn`]).
    udp_conns: Vec<usize>,
    next_udp_tick_ns: u64,
    udp_retransmits: u64,
    udp_dropped: u64,
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
            wire: Wire::Plain,
            udp_conns: Vec::new(),
            next_udp_tick_ns: 0,
            udp_retransmits: 0,
            udp_dropped: 0,
        })
    }

    /// Makes connections opened from now on travel over `wire`.
    pub fn set_wire(&mut self, wire: Wire) {
        self.wire = wire;
    }

    /// UDP: `Send`s sent again for want of an ack, and datagrams dropped (forged, replayed,
    /// late, stray), over every connection so far.
    pub fn udp_counts(&self) -> (u64, u64) {
        let (mut resent, mut dropped) = (self.udp_retransmits, self.udp_dropped);
        for &id in &self.udp_conns {
            if let Link::Udp(u) = &self.conns[id].link {
                resent += u.session.retransmits();
                dropped += u.session.dropped();
            }
        }
        (resent, dropped)
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
        let id = self.conns.len();
        let mut link = match &self.wire {
            Wire::Udp { max_datagram, loss } => {
                let socket = Socket::new(
                    Domain::for_address(addr),
                    Type::DGRAM.nonblocking(),
                    Some(Protocol::UDP),
                )?;
                let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
                let any = match addr {
                    SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                socket.bind(&SocketAddr::new(source.unwrap_or(any), 0).into())?;
                socket.connect(&addr.into())?;
                let session = UdpSession::new(rand::random(), rand::random(), *max_datagram);
                self.udp_conns.push(id);
                Link::Udp(Box::new(UdpLink {
                    sock: UdpSocket::from_std(socket.into()),
                    session,
                    loss: *loss,
                }))
            }
            Wire::Plain | Wire::Tls { .. } => {
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
                let sock = TcpStream::from_std(socket.into());
                match &self.wire {
                    Wire::Tls { config, name } => {
                        let tls = ClientConnection::new(config.clone(), name.clone())
                            .map_err(io::Error::other)?;
                        Link::Tls(Box::new(TlsLink { sock, tls }))
                    }
                    _ => Link::Tcp(sock),
                }
            }
        };
        if let Some(source) = link.source() {
            self.poll.registry().register(
                source,
                Token(id),
                Interest::READABLE | Interest::WRITABLE,
            )?;
        }
        self.conns.push(Conn {
            client,
            role,
            link,
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
        // After reading: answers that waited in the sockets while this process was not
        // scheduled must count before any timer judges them missing.
        self.tick_udp();
        Ok(std::mem::take(&mut self.happenings))
    }

    /// Returns the vector [`Engine::turn`] gave out, for reuse.
    pub fn recycle(&mut self, mut v: Vec<Happening>) {
        v.clear();
        if self.happenings.is_empty() {
            self.happenings = v;
        }
    }

    /// Runs the UDP sessions' timers (at most every [`UDP_TICK_NS`]).
    fn tick_udp(&mut self) {
        if self.udp_conns.is_empty() {
            return;
        }
        let now = self.now_ns();
        if now < self.next_udp_tick_ns {
            return;
        }
        self.next_udp_tick_ns = now + UDP_TICK_NS;
        for i in 0..self.udp_conns.len() {
            let id = self.udp_conns[i];
            let c = &mut self.conns[id];
            if c.state == State::Closed || c.state == State::Connecting {
                continue;
            }
            let Link::Udp(u) = &mut c.link else { continue };
            match u.session.tick(now) {
                Ok(()) => {
                    if u.session.has_datagrams() {
                        self.mark_dirty(id);
                    }
                }
                Err(reason) => self.close(id, reason),
            }
        }
    }

    fn finish_connect(&mut self, id: usize) {
        let now = self.now_ns();
        match self.conns[id].link.connect_state() {
            Ok(true) => {}
            Ok(false) => return, // not yet
            Err(e) => {
                self.close(id, format!("connect failed: {e}"));
                return;
            }
        }
        let c = &mut self.conns[id];
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
        match self.conns[id].link {
            Link::Tcp(_) => self.read_tcp(id),
            Link::Tls(_) => self.read_tls(id),
            Link::Udp(_) => self.read_udp(id),
            Link::Gone => {}
        }
    }

    fn read_tls(&mut self, id: usize) {
        let mut total = 0;
        let mut eof = None;
        {
            let c = &mut self.conns[id];
            let Link::Tls(t) = &mut c.link else { return };
            'socket: loop {
                match t.tls.read_tls(&mut t.sock) {
                    Ok(0) => {
                        eof = Some("closed by the peer".to_string());
                        break;
                    }
                    Ok(n) => total += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eof = Some(format!("read failed: {e}"));
                        break;
                    }
                }
                if let Err(e) = t.tls.process_new_packets() {
                    eof = Some(format!("tls: {e}"));
                    break;
                }
                loop {
                    match t.tls.reader().read(&mut self.scratch[..]) {
                        Ok(0) => {
                            eof = Some("closed by the peer (TLS close_notify)".to_string());
                            break 'socket;
                        }
                        Ok(n) => c.input.extend_from_slice(&self.scratch[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            eof = Some(format!("tls: {e}"));
                            break 'socket;
                        }
                    }
                }
                if total >= READ_BUDGET {
                    self.more_to_read.push(id);
                    break;
                }
            }
        }
        if total > 0 {
            // The handshake may want to answer even when no plaintext came.
            self.drive(id);
        }
        if let Some(reason) = eof
            && self.conns[id].state != State::Closed
        {
            self.close(id, reason);
        }
    }

    fn read_udp(&mut self, id: usize) {
        let now = self.now_ns();
        let mut total = 0;
        let mut failed = None;
        {
            let c = &mut self.conns[id];
            let Link::Udp(u) = &mut c.link else { return };
            loop {
                match u.sock.recv(&mut self.scratch[..]) {
                    Ok(_) if u.lose() => {}
                    Ok(n) => {
                        total += n.max(1);
                        if let Err(reason) =
                            u.session.receive(&self.scratch[..n], now, &mut c.input)
                        {
                            failed = Some(reason);
                            break;
                        }
                        if total >= READ_BUDGET {
                            self.more_to_read.push(id);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(format!("udp: {e}"));
                        break;
                    }
                }
            }
        }
        if total > 0 {
            // A RETRY is answered, a login result lets queued frames go.
            self.drive(id);
        }
        if let Some(reason) = failed
            && self.conns[id].state != State::Closed
        {
            self.close(id, reason);
        }
    }

    fn read_tcp(&mut self, id: usize) {
        let mut total = 0;
        let mut eof = None;
        {
            let c = &mut self.conns[id];
            let Link::Tcp(stream) = &mut c.link else {
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
        let now = self.now_ns();
        let mut failed;
        {
            let c = &mut self.conns[id];
            if c.state == State::Connecting {
                return;
            }
            let more = match &mut c.link {
                Link::Tcp(stream) => {
                    failed = write_tcp(stream, &mut c.output).err();
                    !c.output.is_empty()
                }
                Link::Tls(t) => {
                    failed = write_tls(t, &mut c.output).err();
                    !c.output.is_empty() || t.tls.wants_write()
                }
                Link::Udp(u) => {
                    failed = write_udp(u, &mut c.output, now).err();
                    u.session.has_datagrams()
                }
                Link::Gone => return,
            };
            if failed.is_none() {
                if c.output.is_empty() && c.output.capacity() > KEEP_CAPACITY {
                    c.output = BytesMut::new();
                }
                let want = more;
                if want != c.writable_interest
                    && let Some(source) = c.link.source()
                {
                    let interest = if want {
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        Interest::READABLE
                    };
                    if let Err(e) = self.poll.registry().reregister(source, Token(id), interest) {
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
        if let Link::Udp(u) = &c.link {
            self.udp_retransmits += u.session.retransmits();
            self.udp_dropped += u.session.dropped();
        }
        if let Some(s) = c.link.source() {
            let _ = self.poll.registry().deregister(s);
        }
        c.link = Link::Gone;
        c.input = BytesMut::new();
        c.output = BytesMut::new();
        self.happenings.push(Happening::Closed { conn: id, reason });
    }

    /// Closes every connection quietly (end of run).
    pub fn close_all(&mut self) {
        let (resent, dropped) = self.udp_counts();
        (self.udp_retransmits, self.udp_dropped) = (resent, dropped);
        for c in &mut self.conns {
            c.state = State::Closed;
            if let Some(s) = c.link.source() {
                let _ = self.poll.registry().deregister(s);
            }
            c.link = Link::Gone;
        }
        self.happenings.clear();
    }
}

/// Writes `output` to a TCP socket until it would block.
fn write_tcp(stream: &mut TcpStream, output: &mut BytesMut) -> Result<(), String> {
    while !output.is_empty() {
        match stream.write(output) {
            Ok(0) => return Err("write returned 0".to_string()),
            Ok(n) => output.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write failed: {e}")),
        }
    }
    Ok(())
}

/// Hands `output` to the TLS session (as much as it buffers) and writes its records to the
/// socket until it would block.
fn write_tls(t: &mut TlsLink, output: &mut BytesMut) -> Result<(), String> {
    loop {
        if !output.is_empty() {
            match t.tls.writer().write(output) {
                Ok(n) => output.advance(n),
                Err(e) => return Err(format!("tls: {e}")),
            }
        }
        let mut blocked = false;
        while t.tls.wants_write() {
            match t.tls.write_tls(&mut t.sock) {
                Ok(0) => return Err("write returned 0".to_string()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    blocked = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write failed: {e}")),
            }
        }
        // Until the handshake is done rustls only buffers plaintext: nothing more to do now.
        if blocked || output.is_empty() || t.tls.is_handshaking() {
            return Ok(());
        }
    }
}

/// Turns `output` into datagrams and sends them until the socket would block.
fn write_udp(u: &mut UdpLink, output: &mut BytesMut, now_ns: u64) -> Result<(), String> {
    u.session.write(output, now_ns)?;
    while let Some(datagram) = u.session.next_datagram() {
        if u.lose() {
            continue;
        }
        match u.sock.send(&datagram) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                u.session.unsend(datagram);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => u.session.unsend(datagram),
            Err(e) => return Err(format!("udp: {e}")),
        }
    }
    Ok(())
}
