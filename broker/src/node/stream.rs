//! A connection's byte stream as the driver sees it: a plain TCP socket, or a TCP socket with a
//! rustls server session in front of it. The core reads and writes plaintext only
//! (`handle_bytes`, `outbound`); for a TLS connection this module decrypts what the socket
//! brings and encrypts what the core queued. The session is boxed, so a plain connection pays
//! one word for the choice; it moves with the socket when a logged-in connection is handed to
//! another shard.
//!
//! The session is rustls's unbuffered one: this module owns the ciphertext buffers, in and out,
//! and holds them only while they hold bytes. An idle connection (nothing half-received, nothing
//! unsent) keeps no buffer at all: the incoming one is allocated for a read and released once
//! the socket is drained and every whole record in it was processed; the outgoing one is
//! released once written.
//!
//! Reading TLS: plaintext already decrypted is handed out first; otherwise the session processes
//! the records already received (a TLS error ends the connection: its alert is sent, best
//! effort), whatever it must answer (handshake messages, alerts) is written at once, the rest
//! when the socket is writable again, and only when it needs more is the socket read (into the
//! free end of the incoming buffer, which holds at least one whole record).
//! Unlike a plain socket, a short TLS read does not mean the socket is drained: the reader comes
//! back until the socket says `WouldBlock` (mio is edge-triggered).
//!
//! Writing TLS: ciphertext already encoded goes out first; only when all of it is out is more
//! of the core's queue encrypted, at most [`TLS_WRITE_CHUNK`] at a time. So a connection whose
//! peer does not read holds at most one chunk of ciphertext besides the core's own (bounded)
//! queue, and the core's queue stays what the backpressure limits measure. Before the session
//! may send application data (its handshake is not that far), at most one chunk of the core's
//! queue is taken and held, and encrypted as soon as the session allows.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use bytes::{Buf, BytesMut};
use mio::net::TcpStream;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
};

/// Most plaintext encrypted per step of a TLS write (one full TLS record).
pub(crate) const TLS_WRITE_CHUNK: usize = 16 * 1024;

/// A connection's socket, plain or TLS.
#[derive(Debug)]
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TCP carrying TLS.
    Tls(Box<TlsStream>),
}

/// The incoming buffer's size when allocated: one TLS record at its largest (16 KiB of
/// plaintext, 2 KiB of expansion, 5 of header) and some.
const TLS_IN_BUF: usize = 20 * 1024;

/// The most the incoming buffer grows to (a handshake message spread over several records is
/// joined in it; a ClientHello is at most 64 KiB).
const TLS_IN_MAX: usize = 96 * 1024;

/// A TCP socket and the rustls server session over it, with the ciphertext buffers it needs.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    session: UnbufferedServerConnection,
    /// Ciphertext received: `incoming[in_start..in_end]` is not processed yet. Empty (no
    /// allocation) when it holds nothing.
    incoming: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Ciphertext encoded: `outgoing[out_start..]` is not written yet. Empty when all is out.
    outgoing: Vec<u8>,
    out_start: usize,
    /// Plaintext decrypted and not handed out yet: `plain[plain_start..]`.
    plain: Vec<u8>,
    plain_start: usize,
    /// Plaintext taken from the core's queue before the session could encrypt it (at most one
    /// chunk).
    held: Vec<u8>,
    /// The socket said EOF.
    eof: bool,
    /// The peer's close_notify came.
    peer_closed: bool,
    /// The handshake finished.
    handshaken: bool,
    /// The handshake finished and the driver has not been told yet.
    handshake_news: bool,
}

/// What one read produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadOutcome {
    /// Nothing waits: the next arrival raises a new event.
    Drained,
    /// The peer closed its side (for TLS: close_notify, or EOF without it).
    Eof,
    /// `len` bytes of plaintext in the scratch buffer; `more` if the stream may hold more now
    /// (read again before waiting for an event).
    Data {
        /// Bytes read.
        len: usize,
        /// Read again before waiting.
        more: bool,
    },
}

/// Why a read failed: the connection is over either way.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The socket failed (reset, …): nothing to tell anyone.
    Io,
    /// The peer broke the TLS protocol (garbage instead of a ClientHello, a bad record, …).
    Tls(rustls::Error),
}

impl Stream {
    /// A TLS stream over `tcp` with a fresh server session.
    pub(crate) fn tls(tcp: TcpStream, session: UnbufferedServerConnection) -> Stream {
        Stream::Tls(Box::new(TlsStream {
            tcp,
            session,
            incoming: Vec::new(),
            in_start: 0,
            in_end: 0,
            outgoing: Vec::new(),
            out_start: 0,
            plain: Vec::new(),
            plain_start: 0,
            held: Vec::new(),
            eof: false,
            peer_closed: false,
            handshaken: false,
            handshake_news: false,
        }))
    }

    /// The socket (to register with the poll).
    pub(crate) fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &mut t.tcp,
        }
    }

    /// Whether this is a TLS connection.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// A TLS connection whose handshake has not finished.
    pub(crate) fn is_handshaking(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.session.is_handshaking(),
        }
    }

    /// True once after a TLS handshake finished (for the driver's counter).
    pub(crate) fn take_handshake_news(&mut self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => std::mem::take(&mut t.handshake_news),
        }
    }

    /// Whether ciphertext waits to be written (a TLS session's own output, e.g. its handshake).
    pub(crate) fn has_pending_output(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.out_start < t.outgoing.len(),
        }
    }

    /// One read of plaintext into `scratch` (at most `want` bytes).
    pub(crate) fn read(
        &mut self,
        scratch: &mut [u8],
        want: usize,
    ) -> Result<ReadOutcome, ReadError> {
        let want = want.clamp(1, scratch.len().max(1));
        let Some(space) = scratch.get_mut(..want) else {
            return Ok(ReadOutcome::Drained);
        };
        match self {
            Stream::Plain(s) => loop {
                match s.read(space) {
                    Ok(0) => return Ok(ReadOutcome::Eof),
                    // A short read drained the socket (see `socket`'s loop contract).
                    Ok(n) => {
                        return Ok(ReadOutcome::Data {
                            len: n,
                            more: n >= want,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(ReadOutcome::Drained);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(ReadError::Io),
                }
            },
            Stream::Tls(t) => t.read(space),
        }
    }

    /// Writes as much of `buf` (plaintext) as the socket takes, advancing past what was taken;
    /// returns (bytes moved: plaintext taken plus ciphertext written, whether the socket is full).
    pub(crate) fn write_out(&mut self, buf: &mut BytesMut) -> io::Result<(usize, bool)> {
        match self {
            Stream::Plain(s) => write_plain(s, buf),
            Stream::Tls(t) => t.write_out(buf),
        }
    }

    /// The end of a connection: for TLS, `last` is encrypted (whole) and a close_notify follows
    /// it, all left for [`Stream::write_out`] to flush; a plain stream leaves `last` as it is.
    pub(crate) fn finish(&mut self, last: &mut BytesMut) {
        if let Stream::Tls(t) = self {
            t.finish(last);
        }
    }

    /// Reads and throws away what the peer sends, raw (a closing connection's input is not
    /// decrypted), into `sink`.
    pub(crate) fn discard(&mut self, sink: &mut [u8]) -> io::Result<usize> {
        self.tcp_mut().read(sink)
    }

    /// Shuts the socket's write side (the peer sees EOF after the last byte).
    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        self.tcp_mut().shutdown(Shutdown::Write)
    }
}

/// Where [`TlsStream::pump`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rest {
    /// The caller's space for plaintext is full.
    Full,
    /// The handshake waits for the peer: application data cannot be sent yet.
    Blocked,
    /// The session waits for the peer, and could send application data.
    Idle,
    /// Both sides sent close_notify: nothing more comes or goes.
    Closed,
}

/// What [`TlsStream::pump`] did.
#[derive(Debug, Clone, Copy)]
struct Pumped {
    /// Plaintext bytes put into the caller's space.
    read: usize,
    /// The plaintext to send was encrypted.
    encrypted: bool,
    /// Where it stopped.
    rest: Rest,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("handshaking", &self.session.is_handshaking())
            .field("incoming", &(self.in_end - self.in_start))
            .field("outgoing", &(self.outgoing.len() - self.out_start))
            .field("plain", &(self.plain.len() - self.plain_start))
            .field("held", &self.held.len())
            .field("eof", &self.eof)
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    fn read(&mut self, space: &mut [u8]) -> Result<ReadOutcome, ReadError> {
        if let Some(rest) = self.plain.get(self.plain_start..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(space.len());
            if let (Some(to), Some(from)) = (space.get_mut(..n), rest.get(..n)) {
                to.copy_from_slice(from);
            }
            self.plain_start += n;
            if self.plain_start >= self.plain.len() {
                self.plain = Vec::new();
                self.plain_start = 0;
            }
            return Ok(ReadOutcome::Data { len: n, more: true });
        }
        let outcome = self.read_tls(space);
        // Drained or over: the buffers that hold nothing go (more data: the reader comes back
        // at once, the incoming buffer with it).
        let drained = !matches!(outcome, Ok(ReadOutcome::Data { .. }));
        self.release(drained);
        outcome
    }

    fn read_tls(&mut self, space: &mut [u8]) -> Result<ReadOutcome, ReadError> {
        loop {
            let pumped = match self.pump(space, None) {
                Ok(p) => p,
                Err(e) => {
                    // Tell the peer why (the alert rustls queued), best effort.
                    self.send_alert();
                    return Err(ReadError::Tls(e));
                }
            };
            if !self.handshaken && !self.session.is_handshaking() {
                self.handshaken = true;
                self.handshake_news = true;
            }
            // Handshake messages and alerts go out now; the rest when the socket is writable.
            if self.flush().is_err() {
                return Err(ReadError::Io);
            }
            if pumped.read > 0 {
                return Ok(ReadOutcome::Data {
                    len: pumped.read,
                    more: true,
                });
            }
            // close_notify: a clean end; EOF without it: the end all the same.
            if self.peer_closed || pumped.rest == Rest::Closed || self.eof {
                return Ok(ReadOutcome::Eof);
            }
            match self.fill() {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(ReadOutcome::Drained);
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(ReadError::Tls(rustls::Error::General(e.to_string())));
                }
                Err(_) => return Err(ReadError::Io),
            }
        }
    }

    /// One read from the socket into the free end of the incoming buffer (allocated here if
    /// need be); returns the bytes read (0: EOF).
    fn fill(&mut self) -> io::Result<usize> {
        if self.incoming.is_empty() {
            self.incoming = vec![0; TLS_IN_BUF];
        }
        if self.in_start > 0 {
            self.incoming.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        if self.in_end >= self.incoming.len() {
            // Whole records the session keeps (a handshake message across several): room.
            if self.incoming.len() >= TLS_IN_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a TLS handshake message larger than the incoming buffer",
                ));
            }
            let len = (self.incoming.len() * 2).min(TLS_IN_MAX);
            self.incoming.resize(len, 0);
        }
        let free = self.incoming.get_mut(self.in_end..).unwrap_or_default();
        loop {
            match self.tcp.read(free) {
                Ok(n) => {
                    self.in_end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops the buffers that hold nothing (the incoming one only if `incoming` too).
    fn release(&mut self, incoming: bool) {
        if self.out_start >= self.outgoing.len() && self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.out_start = 0;
        }
        if incoming && self.in_start >= self.in_end && self.incoming.capacity() > 0 {
            self.incoming = Vec::new();
            self.in_start = 0;
            self.in_end = 0;
        }
    }

    /// Drives the session over the ciphertext received until it stops: plaintext goes into
    /// `space` (into `plain` if `space` is empty, or for the rest of a record that does not
    /// fit), handshake messages and alerts into `outgoing`, and `send` (plaintext, then a
    /// close_notify if asked) is encrypted into `outgoing` once the session allows it, as is
    /// `held` first.
    fn pump(
        &mut self,
        space: &mut [u8],
        mut send: Option<(&[u8], bool)>,
    ) -> Result<Pumped, rustls::Error> {
        let mut read = 0;
        let mut encrypted = false;
        loop {
            let incoming = self
                .incoming
                .get_mut(self.in_start..self.in_end)
                .unwrap_or_default();
            let UnbufferedStatus { mut discard, state } =
                self.session.process_tls_records(incoming);
            let mut stop = None;
            let mut failed = None;
            match state {
                Err(e) => failed = Some(e),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => loop {
                    if !space.is_empty() && read >= space.len() {
                        stop = Some(Rest::Full);
                        break;
                    }
                    match traffic.next_record() {
                        None => break,
                        Some(Err(e)) => {
                            failed = Some(e);
                            break;
                        }
                        Some(Ok(record)) => {
                            discard += record.discard;
                            let free = space.get_mut(read..).unwrap_or_default();
                            let n = record.payload.len().min(free.len());
                            if let (Some(to), Some(from)) =
                                (free.get_mut(..n), record.payload.get(..n))
                            {
                                to.copy_from_slice(from);
                            }
                            read += n;
                            // Only when `space` is full (or is none): order is kept.
                            self.plain
                                .extend_from_slice(record.payload.get(n..).unwrap_or_default());
                        }
                    }
                },
                Ok(ConnectionState::ReadEarlyData(mut early)) => {
                    // Never accepted (the configuration offers no early data): dropped.
                    while let Some(record) = early.next_record() {
                        if let Ok(record) = record {
                            discard += record.discard;
                        }
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut encoder)) => {
                    if let Err(e) = encode(&mut encoder, &mut self.outgoing) {
                        failed = Some(e);
                    }
                }
                // The ciphertext stays in `outgoing`, written in order by `flush`.
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                Ok(ConnectionState::BlockedHandshake) => stop = Some(Rest::Blocked),
                Ok(ConnectionState::PeerClosed) => self.peer_closed = true,
                Ok(ConnectionState::Closed) => stop = Some(Rest::Closed),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let held = std::mem::take(&mut self.held);
                    let mut result = if held.is_empty() {
                        Ok(())
                    } else {
                        encrypt(&mut traffic, &held, &mut self.outgoing)
                    };
                    if let Some((data, close)) = send.take() {
                        if result.is_ok() && !data.is_empty() {
                            result = encrypt(&mut traffic, data, &mut self.outgoing);
                        }
                        if result.is_ok() && close {
                            result = close_notify(&mut traffic, &mut self.outgoing);
                        }
                        encrypted = true;
                    } else if held.is_empty() {
                        stop = Some(Rest::Idle);
                    }
                    if let Err(e) = result {
                        failed = Some(e);
                    }
                }
                // Future states (`non_exhaustive`): wait for the peer.
                Ok(_) => stop = Some(Rest::Blocked),
            }
            self.in_start = (self.in_start + discard).min(self.in_end);
            if self.in_start == self.in_end {
                self.in_start = 0;
                self.in_end = 0;
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if let Some(rest) = stop {
                return Ok(Pumped {
                    read,
                    encrypted,
                    rest,
                });
            }
        }
    }

    /// After a TLS error: encodes what the session queued, up to and including its alert, best
    /// effort, and writes it. The session is not asked again after the alert: with the bad
    /// input still in the buffer it would fail (and alert) again.
    fn send_alert(&mut self) {
        for _ in 0..8 {
            let incoming = self
                .incoming
                .get_mut(self.in_start..self.in_end)
                .unwrap_or_default();
            let UnbufferedStatus { state, .. } = self.session.process_tls_records(incoming);
            let Ok(ConnectionState::EncodeTlsData(mut encoder)) = state else {
                break;
            };
            let start = self.outgoing.len();
            if encode(&mut encoder, &mut self.outgoing).is_err()
                || is_alert(self.outgoing.get(start..).unwrap_or_default())
            {
                break;
            }
        }
        let _ = self.flush();
    }

    /// The end: `last` (whole: the last words are small and bounded by the core) and a
    /// close_notify are encrypted for [`Stream::write_out`] to flush, if the session may send
    /// by now (otherwise the peer sees only the end). What the peer sent is not decrypted any
    /// more: the buffers holding it go.
    fn finish(&mut self, last: &mut BytesMut) {
        let _ = self.pump(&mut [], Some((last, true)));
        last.clear();
        self.held = Vec::new();
        self.plain = Vec::new();
        self.plain_start = 0;
        self.incoming = Vec::new();
        self.in_start = 0;
        self.in_end = 0;
    }

    /// Writes the ciphertext encoded; returns (bytes written, whether the socket is full).
    fn flush(&mut self) -> io::Result<(usize, bool)> {
        let mut written = 0;
        loop {
            let Some(rest) = self
                .outgoing
                .get(self.out_start..)
                .filter(|r| !r.is_empty())
            else {
                self.outgoing.clear();
                self.out_start = 0;
                return Ok((written, false));
            };
            match self.tcp.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_start += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((written, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn write_out(&mut self, buf: &mut BytesMut) -> io::Result<(usize, bool)> {
        let result = self.write_tls(buf);
        self.release(false);
        result
    }

    fn write_tls(&mut self, buf: &mut BytesMut) -> io::Result<(usize, bool)> {
        let mut moved = 0;
        loop {
            let (written, full) = self.flush()?;
            moved += written;
            if full || buf.is_empty() {
                return Ok((moved, full));
            }
            // All the ciphertext is out: one more chunk.
            let chunk = buf.len().min(TLS_WRITE_CHUNK);
            let data = buf.get(..chunk).unwrap_or_default();
            let pumped = self
                .pump(&mut [], Some((data, false)))
                .map_err(io::Error::other)?;
            if pumped.encrypted {
                buf.advance(chunk);
                moved += chunk;
                continue;
            }
            if pumped.rest == Rest::Closed {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            // The handshake is not that far: one chunk waits in `held`, the rest in the
            // core's queue; come back when the socket is writable.
            if self.held.is_empty() {
                self.held.extend_from_slice(data);
                buf.advance(chunk);
                moved += chunk;
            }
            let (written, full) = self.flush()?;
            return Ok((moved + written, full));
        }
    }
}

/// Whether a record is an alert: its type says so (plaintext, or TLS 1.2), or it has the size
/// of an encrypted one in TLS 1.3 (application data type, 2 bytes, the inner type, a 16-byte
/// tag); nothing else the session queues has that size.
fn is_alert(record: &[u8]) -> bool {
    match record {
        [0x15, ..] => true,
        [0x17, _, _, 0, 19, ..] => record.len() == 5 + 19,
        _ => false,
    }
}

/// Why a buffer was too small for what had to go in it.
enum Short {
    /// It needs this many bytes.
    Needs(usize),
    /// Something else went wrong.
    Failed(rustls::Error),
}

/// Appends to `out` what `put` writes into a slice (at first `room` bytes long, then as long as
/// it says it needs).
fn append(
    out: &mut Vec<u8>,
    mut room: usize,
    mut put: impl FnMut(&mut [u8]) -> Result<usize, Short>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match put(out.get_mut(start..).unwrap_or_default()) {
            Ok(n) => {
                out.truncate(start + n.min(room));
                return Ok(());
            }
            Err(Short::Needs(needed)) if needed > room => room = needed,
            Err(Short::Needs(_)) => {
                out.truncate(start);
                return Err(rustls::Error::General("TLS output does not fit".into()));
            }
            Err(Short::Failed(e)) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
}

fn encode(
    encoder: &mut EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    append(out, 4096, |to| {
        encoder.encode(to).map_err(|e| match e {
            EncodeError::InsufficientSize(s) => Short::Needs(s.required_size),
            e => Short::Failed(rustls::Error::General(e.to_string())),
        })
    })
}

fn encrypt(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    // A record's header, tag and content type, per full record.
    let room = data.len() + 64 * (data.len() / (16 * 1024) + 1);
    append(out, room, |to| {
        traffic.encrypt(data, to).map_err(encrypt_error)
    })
}

fn close_notify(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    append(out, 64, |to| {
        traffic.queue_close_notify(to).map_err(encrypt_error)
    })
}

fn encrypt_error(e: EncryptError) -> Short {
    match e {
        EncryptError::InsufficientSize(s) => Short::Needs(s.required_size),
        EncryptError::EncryptExhausted => Short::Failed(rustls::Error::EncryptError),
    }
}

/// Writes as much of `buf` as the socket takes, advancing past it; returns (bytes written,
/// whether the socket is full).
fn write_plain(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<(usize, bool)> {
    let mut written = 0;
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf.advance(n.min(buf.len()));
                written += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((written, true)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((written, false))
}
