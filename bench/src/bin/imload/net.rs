//! Many non-blocking client connections on one mio loop: bytes in, frames out.

use super::*;

/// What a connection reported.
#[derive(Debug)]
pub(crate) enum Ev {
    Frame(pb::Frame),
    /// It closed (EOF, error, bad framing); it is gone from the pool.
    Closed(String),
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    user: usize,
    rbuf: BytesMut,
    wbuf: BytesMut,
    connected: bool,
}

#[derive(Debug)]
pub(crate) struct Net {
    poll: Poll,
    events: Events,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    codec: FrameCodec,
    addr: SocketAddr,
    sources: Vec<IpAddr>,
    next_source: usize,
    scratch: Vec<u8>,
    /// (user, event) since the last `take`.
    pub(crate) out: Vec<(usize, Ev)>,
}

impl Net {
    pub(crate) fn new(addr: SocketAddr, sources: u8) -> io::Result<Self> {
        Ok(Net {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            conns: Vec::new(),
            free: Vec::new(),
            codec: FrameCodec::default(),
            addr,
            sources: (1..=sources.max(1))
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
                .collect(),
            next_source: 0,
            scratch: vec![0; 64 * 1024],
            out: Vec::new(),
        })
    }

    /// Starts a connection for `user` with `first` queued; returns its slot.
    pub(crate) fn connect(&mut self, user: usize, first: &pb::Frame) -> io::Result<usize> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        socket.set_tcp_nodelay(true)?;
        let src = self.sources[self.next_source % self.sources.len()];
        self.next_source += 1;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        match socket.connect(&self.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(socket.into());
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut wbuf = BytesMut::new();
        self.codec
            .encode(first, &mut wbuf)
            .map_err(|e| other(e.to_string()))?;
        self.conns[slot] = Some(Conn {
            stream,
            user,
            rbuf: BytesMut::new(),
            wbuf,
            connected: false,
        });
        Ok(slot)
    }

    /// Queues `f` on `slot` and writes what the socket takes.
    pub(crate) fn send(&mut self, slot: usize, f: &pb::Frame) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if self.codec.encode(f, &mut c.wbuf).is_err() {
            return self.fail(slot, "frame too large to send".to_owned());
        }
        self.flush(slot);
    }

    /// Closes `slot` (no event).
    pub(crate) fn close(&mut self, slot: usize) {
        if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.free.push(slot);
        }
    }

    fn fail(&mut self, slot: usize, why: String) {
        if let Some(user) = self
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .map(|c| c.user)
        {
            self.close(slot);
            self.out.push((user, Ev::Closed(why)));
        }
    }

    fn flush(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if !c.connected {
            return;
        }
        while !c.wbuf.is_empty() {
            match c.stream.write(&c.wbuf) {
                Ok(n) => {
                    let _ = c.wbuf.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(slot, format!("write: {e}")),
            }
        }
    }

    fn readable(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let mut why = None;
        loop {
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    why = Some("closed by the broker".to_owned());
                    break;
                }
                Ok(n) => c.rbuf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    why = Some(format!("read: {e}"));
                    break;
                }
            }
        }
        loop {
            match self.codec.decode_frame(&mut c.rbuf) {
                Ok(Some(f)) => self.out.push((c.user, Ev::Frame(f))),
                Ok(None) => break,
                Err(e) => {
                    why = Some(format!("bad frame: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = why {
            self.fail(slot, why);
        }
    }

    fn writable(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if !c.connected {
            match c.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return self.fail(slot, format!("connect: {e}")),
            }
            if c.stream.peer_addr().is_err() {
                return; // still connecting
            }
            c.connected = true;
        }
        self.flush(slot);
    }

    /// Waits up to `timeout` for socket events and handles them into `out`.
    pub(crate) fn turn(&mut self, timeout: Duration) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token().0,
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable() || e.is_error(),
                )
            })
            .collect();
        for (slot, r, w) in ready {
            if w {
                self.writable(slot);
            }
            if r {
                self.readable(slot);
            }
        }
        Ok(())
    }
}
