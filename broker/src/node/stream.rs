//! A connection's byte stream as the driver sees it: a plain TCP socket, or a TCP socket with a
//! rustls server session in front of it. The core reads and writes plaintext only
//! (`handle_bytes`, `outbound`); for a TLS connection this module decrypts what the socket
//! brings and encrypts what the core queued. The session is boxed, so a plain connection pays
//! one word for the choice; it moves with the socket when a logged-in connection is handed to
//! another shard.
//!
//! Reading TLS: plaintext already decrypted is handed out first; otherwise one `read_tls` from
//! the socket (at most one TLS record's worth of ciphertext), `process_new_packets` (a TLS error
//! ends the connection: its alert is sent, best effort), and whatever the session must answer
//! (handshake messages, alerts) is written at once, the rest when the socket is writable again.
//! Unlike a plain socket, a short TLS read does not mean the socket is drained: the reader comes
//! back until the socket says `WouldBlock` (mio is edge-triggered).
//!
//! Writing TLS: ciphertext the session holds goes out first; only when all of it is out is more
//! of the core's queue encrypted, at most [`TLS_WRITE_CHUNK`] at a time. So a connection whose
//! peer does not read holds at most one chunk of ciphertext besides the core's own (bounded)
//! queue, and the core's queue stays what the backpressure limits measure.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use bytes::{Buf, BytesMut};
use mio::net::TcpStream;
use rustls::ServerConnection;

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

/// A TCP socket and the rustls server session over it.
#[derive(Debug)]
pub(crate) struct TlsStream {
    tcp: TcpStream,
    session: ServerConnection,
    /// The socket said EOF.
    eof: bool,
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
    pub(crate) fn tls(tcp: TcpStream, session: ServerConnection) -> Stream {
        Stream::Tls(Box::new(TlsStream {
            tcp,
            session,
            eof: false,
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
            Stream::Tls(t) => t.session.wants_write(),
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
            // The last words are small and bounded by the core; they go whole.
            t.session.set_buffer_limit(None);
            if !last.is_empty() {
                let _ = t.session.writer().write_all(last);
            }
            last.clear();
            t.session.send_close_notify();
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

impl TlsStream {
    fn read(&mut self, space: &mut [u8]) -> Result<ReadOutcome, ReadError> {
        loop {
            match self.session.reader().read(space) {
                // close_notify: a clean end.
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => return Ok(ReadOutcome::Data { len: n, more: true }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EOF without close_notify: the end all the same.
                Err(_) => return Ok(ReadOutcome::Eof),
            }
            if self.eof {
                return Ok(ReadOutcome::Eof);
            }
            match self.session.read_tls(&mut self.tcp) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(ReadOutcome::Drained);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(ReadError::Io),
            }
            if let Err(e) = self.session.process_new_packets() {
                // Tell the peer why (the alert rustls queued), best effort.
                let _ = self.flush();
                return Err(ReadError::Tls(e));
            }
            if !self.handshaken && !self.session.is_handshaking() {
                self.handshaken = true;
                self.handshake_news = true;
            }
            // Handshake messages and alerts go out now; the rest when the socket is writable.
            if self.flush().is_err() {
                return Err(ReadError::Io);
            }
        }
    }

    /// Writes the session's ciphertext; returns (bytes written, whether the socket is full).
    fn flush(&mut self) -> io::Result<(usize, bool)> {
        let mut written = 0;
        while self.session.wants_write() {
            match self.session.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((written, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((written, false))
    }

    fn write_out(&mut self, buf: &mut BytesMut) -> io::Result<(usize, bool)> {
        let mut moved = 0;
        loop {
            let (written, full) = self.flush()?;
            moved += written;
            if full || buf.is_empty() {
                return Ok((moved, full));
            }
            let chunk = buf.len().min(TLS_WRITE_CHUNK);
            let taken = self
                .session
                .writer()
                .write(buf.get(..chunk).unwrap_or_default())?;
            if taken == 0 {
                // The session's buffer is full (before the handshake ends, plaintext waits in
                // it): come back when the socket is writable.
                return Ok((moved, false));
            }
            buf.advance(taken.min(buf.len()));
            moved += taken;
        }
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
