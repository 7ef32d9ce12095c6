//! The blocking driver: a [`Session`] over a byte stream, with threads and a clock.
//!
//! [`Client::start`] spawns a driver thread that connects (through a [`Connector`]: TCP by
//! default, any byte stream with the TCP framing, e.g. TLS, through your own), logs in with a
//! token from a [`TokenProvider`] (asked again on every connection, so tokens can be refreshed),
//! runs one reader thread per connection, sends what the session produces, and reconnects with
//! exponential [back-off and jitter](crate::backoff) whenever the connection drops, the server
//! ends the session (SHUTTING_DOWN, a crash, ...) or cannot be reached. Only a permanent reason
//! ([`DisconnectReason::is_permanent`]) or [`Client::close`] stops it.
//!
//! The application calls [`Client::send_text`] / [`Client::send`] (queued in the outbox,
//! delivered exactly once across reconnects), [`Client::history`], and reads
//! [`Client::next_event`].
//!
//! ```no_run
//! use std::time::Duration;
//! use parley_client::{Client, ClientConfig, Event, TcpConnector};
//!
//! let token = "eyJ...".to_owned();
//! let client = Client::start(
//!     TcpConnector::new("127.0.0.1:7400"),
//!     Box::new(move || Ok(token.clone())),
//!     ClientConfig::default(),
//! );
//! client.send_text("bob", "hello").expect("a valid message");
//! while let Some(event) = client.next_event(Duration::from_secs(1)) {
//!     if let Event::Message(m) = event {
//!         println!("{}: {}", m.from_user, String::from_utf8_lossy(&m.body));
//!     }
//! }
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parley_proto::pb::{self, frame::Body};
use parley_proto::tcp::FrameCodec;

use crate::backoff::{Backoff, BackoffConfig};
use crate::event::{DisconnectReason, Event};
use crate::ids::random_seed;
use crate::session::{RetryConfig, SendError, Session, SessionConfig, State};

/// Hands out the token for the next login (asked on every connection). An `Err` counts as a
/// failed connection attempt (retried after the back-off).
pub type TokenProvider = Box<dyn FnMut() -> Result<String, String> + Send>;

/// One open connection: a reading half, a writing half, and a way to shut both down (which must
/// make a blocked read return).
pub struct Connection {
    /// Where the server's bytes come from.
    reader: Box<dyn Read + Send>,
    /// Where the client's bytes go.
    writer: Box<dyn Write + Send>,
    /// Ends the connection.
    shutdown: Box<dyn Fn() + Send>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connection")
    }
}

impl Connection {
    /// A connection from its parts (for a transport of your own, e.g. TLS: a stream shared by
    /// both halves behind a lock, with a read timeout so the writer gets its turn).
    ///
    /// ```
    /// use parley_client::blocking::Connection;
    /// let c = Connection::new(Box::new(std::io::empty()), Box::new(std::io::sink()), Box::new(|| {}));
    /// # drop(c);
    /// ```
    pub fn new(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        shutdown: Box<dyn Fn() + Send>,
    ) -> Self {
        Self {
            reader,
            writer,
            shutdown,
        }
    }

    /// A TCP connection (no delay, a write timeout so a server that stops reading is noticed).
    ///
    /// ```no_run
    /// let stream = std::net::TcpStream::connect("127.0.0.1:7400")?;
    /// let c = parley_client::blocking::Connection::tcp(stream)?;
    /// # drop(c);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn tcp(stream: TcpStream) -> io::Result<Self> {
        // Best effort: a socket without these options still works, only less promptly.
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        Ok(Self::new(
            Box::new(reader),
            Box::new(stream),
            Box::new(move || {
                let _ = closer.shutdown(Shutdown::Both);
            }),
        ))
    }
}

/// Opens connections to the server: the seam for other transports ([`TcpConnector`],
/// [`UdpConnector`](crate::UdpConnector), `TlsConnector` with the `tls` feature, or your own).
///
/// ```
/// use parley_client::{Connection, Connector};
/// /// A transport of one's own: here, nothing but an empty stream.
/// struct Nowhere;
/// impl Connector for Nowhere {
///     fn connect(&mut self) -> std::io::Result<Connection> {
///         Ok(Connection::new(Box::new(std::io::empty()), Box::new(std::io::sink()), Box::new(|| {})))
///     }
/// }
/// assert!(!Nowhere.is_datagram());
/// ```
pub trait Connector: Send + 'static {
    /// Opens a new connection (called for the first connection and every reconnect).
    fn connect(&mut self) -> io::Result<Connection>;

    /// Whether its connections may lose, duplicate or reorder frames (UDP): then
    /// [`Client::start`] turns on [`SessionConfig::retry`] (with its defaults) unless the
    /// configuration sets it. False by default (a byte stream).
    fn is_datagram(&self) -> bool {
        false
    }
}

/// A write blocked this long means the server stopped reading: the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects over TCP to an address (`host:port`, resolved again on every attempt).
#[derive(Debug, Clone)]
pub struct TcpConnector {
    /// The address.
    addr: String,
    /// How long to try each resolved address.
    timeout: Duration,
}

impl TcpConnector {
    /// A connector to `addr` (`host:port`), with a 5 s connect timeout per address.
    ///
    /// ```
    /// let c = parley_client::TcpConnector::new("127.0.0.1:7400");
    /// # drop(c);
    /// ```
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            timeout: Duration::from_secs(5),
        }
    }
}

impl Connector for TcpConnector {
    fn connect(&mut self) -> io::Result<Connection> {
        let mut last = None;
        for a in self.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => return Connection::tcp(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{:?} resolves to no address", self.addr),
            )
        }))
    }
}

/// Settings of a [`Client`].
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// The session's settings (its `id_seed` is replaced by a random one unless
    /// `keep_id_seed`; its `retry` is set for a [datagram](Connector::is_datagram) connector
    /// unless given).
    pub session: SessionConfig,
    /// Use `session.id_seed` as given (tests), instead of a random seed.
    pub keep_id_seed: bool,
    /// Reconnect back-off.
    pub backoff: BackoffConfig,
}

/// What the driver thread is told.
enum Input {
    /// The session has something to send.
    Wake,
    /// Bytes read on connection `.0`.
    Read(u64, Vec<u8>),
    /// Connection `.0` ended.
    Ended(u64, DisconnectReason),
    /// Stop.
    Close,
}

/// A client connected (and reconnecting) in the background: see the module docs.
#[derive(Debug)]
pub struct Client {
    /// The session, shared with the driver thread.
    session: Arc<Mutex<Session>>,
    /// To the driver thread.
    input: Sender<Input>,
    /// From the driver thread.
    events: Receiver<Event>,
    /// The driver thread.
    thread: Option<thread::JoinHandle<()>>,
}

impl Client {
    /// Starts the driver: it connects with `connector`, logs in with a token from `tokens`, and
    /// keeps the session connected until [`Client::close`]. Returns at once; the first event is
    /// [`Event::Connected`] or [`Event::Disconnected`].
    ///
    /// ```no_run
    /// use parley_client::{Client, ClientConfig, TcpConnector};
    /// let client = Client::start(TcpConnector::new("127.0.0.1:7400"),
    ///                            Box::new(|| Ok("token".into())), ClientConfig::default());
    /// # drop(client);
    /// ```
    pub fn start(
        connector: impl Connector,
        tokens: TokenProvider,
        mut config: ClientConfig,
    ) -> Client {
        if !config.keep_id_seed {
            config.session.id_seed = random_seed();
        }
        if connector.is_datagram() && config.session.retry.is_none() {
            config.session.retry = Some(RetryConfig::default());
        }
        let now = Instant::now();
        let session = Arc::new(Mutex::new(Session::new(config.session.clone(), now)));
        let (input_tx, input_rx) = mpsc::channel();
        let (event_tx, event_rx) = mpsc::channel();
        let driver = Driver {
            session: Arc::clone(&session),
            connector: Box::new(connector),
            tokens,
            backoff: Backoff::new(config.backoff),
            input_tx: input_tx.clone(),
            input_rx,
            events: event_tx,
            conn: None,
            conn_id: 0,
            next_attempt: Some(now),
            codec: FrameCodec::default(),
        };
        let thread = thread::Builder::new()
            .name("parley-client".into())
            .spawn(move || driver.run())
            .ok();
        Client {
            session,
            input: input_tx,
            events: event_rx,
            thread,
        }
    }

    /// Sends a text message to user `to`; returns its client message id (see
    /// [`Session::send_text`]). It is resent after every reconnect until acknowledged.
    ///
    /// ```no_run
    /// # fn demo(client: &parley_client::Client) -> Result<(), parley_client::SendError> {
    /// let id = client.send_text("bob", "hello")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn send_text(&self, to: &str, text: &str) -> Result<u64, SendError> {
        let id = self.lock().send_text(to, text)?;
        let _ = self.input.send(Input::Wake);
        Ok(id)
    }

    /// Sends a message of `content_type` to conversation `to` (see [`Session::send`]).
    ///
    /// ```no_run
    /// # fn demo(client: &parley_client::Client) -> Result<(), parley_client::SendError> {
    /// let group = parley_client::pb::Conversation { r#type: 2, id: "team".into() };
    /// client.send(group, 1, bytes::Bytes::from_static(b"hi all"))?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn send(
        &self,
        to: pb::Conversation,
        content_type: u32,
        body: Bytes,
    ) -> Result<u64, SendError> {
        let id = self.lock().send(to, content_type, body)?;
        let _ = self.input.send(Input::Wake);
        Ok(id)
    }

    /// Asks for a page of history (see [`Session::history`]); the answer comes as
    /// [`Event::HistoryPage`] with the returned request id.
    ///
    /// ```no_run
    /// # fn demo(client: &parley_client::Client) -> Result<(), parley_client::SendError> {
    /// let id = client.history(parley_client::direct("bob"), 0, None, 50);
    /// # Ok(())
    /// # }
    /// ```
    pub fn history(
        &self,
        conversation: pb::Conversation,
        before_seq: u64,
        after_seq: Option<u64>,
        limit: u32,
    ) -> u64 {
        let id = self
            .lock()
            .history(conversation, before_seq, after_seq, limit);
        let _ = self.input.send(Input::Wake);
        id
    }

    /// Sends any other request (see [`Session::request`]); None if not logged in right now.
    ///
    /// ```no_run
    /// # fn demo(client: &parley_client::Client) -> Result<(), parley_client::SendError> {
    /// use parley_client::pb;
    /// let ask = pb::frame::Body::PresenceRequest(pb::PresenceRequest {
    ///     action: pb::PresenceAction::Query as i32, users: vec!["bob".into()], ..Default::default() });
    /// let id = client.request(ask);
    /// # Ok(())
    /// # }
    /// ```
    pub fn request(&self, body: Body) -> Option<u64> {
        let id = self.lock().request(body);
        let _ = self.input.send(Input::Wake);
        id
    }

    /// The next event, waiting at most `timeout`; None if none came (or the driver stopped and
    /// every event was taken).
    ///
    /// ```no_run
    /// # fn demo(client: &parley_client::Client) -> Result<(), parley_client::SendError> {
    /// if let Some(event) = client.next_event(std::time::Duration::from_millis(100)) {
    ///     println!("{event:?}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// The client message ids of the sends not acknowledged yet, in order.
    ///
    /// ```no_run
    /// # fn demo(client: &parley_client::Client) -> Result<(), parley_client::SendError> {
    /// assert!(client.unacked().is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn unacked(&self) -> Vec<u64> {
        self.lock().unacked()
    }

    /// Whether the session is logged in right now.
    ///
    /// ```no_run
    /// # fn demo(client: &parley_client::Client) -> Result<(), parley_client::SendError> {
    /// let up = client.is_connected();
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_connected(&self) -> bool {
        self.lock().state() == State::Ready
    }

    /// Stops the client: waits up to `drain` for the outbox to empty (reconnecting meanwhile if
    /// need be), then closes the connection and stops the driver. Returns the client message
    /// ids still unacknowledged (they may or may not have been stored). Events not taken yet
    /// are dropped.
    ///
    /// ```no_run
    /// # fn demo(client: parley_client::Client) -> Result<(), parley_client::SendError> {
    /// let lost = client.close(std::time::Duration::from_secs(5));
    /// assert!(lost.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn close(mut self, drain: Duration) -> Vec<u64> {
        let deadline = Instant::now() + drain;
        while !self.unacked().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        self.stop();
        self.unacked()
    }

    /// Stops the driver thread.
    fn stop(&mut self) {
        let _ = self.input.send(Input::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The session, locked.
    fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The live connection's writing side.
struct Live {
    /// Its number (stale reads of older connections are ignored).
    id: u64,
    /// The writing half.
    writer: Box<dyn Write + Send>,
    /// Ends it.
    shutdown: Box<dyn Fn() + Send>,
}

/// The driver thread's state.
struct Driver {
    /// The session.
    session: Arc<Mutex<Session>>,
    /// Opens connections.
    connector: Box<dyn Connector>,
    /// Tokens for logins.
    tokens: TokenProvider,
    /// Reconnect back-off.
    backoff: Backoff,
    /// For reader threads.
    input_tx: Sender<Input>,
    /// Inputs.
    input_rx: Receiver<Input>,
    /// To the application.
    events: Sender<Event>,
    /// The live connection.
    conn: Option<Live>,
    /// The last connection's number.
    conn_id: u64,
    /// When to try connecting next (None: stopped).
    next_attempt: Option<Instant>,
    /// TCP framing (outbound).
    codec: FrameCodec,
}

impl Driver {
    /// Runs until closed or stopped for good.
    fn run(mut self) {
        loop {
            let now = Instant::now();
            if self.conn.is_none()
                && let Some(at) = self.next_attempt
                && at <= now
            {
                self.attempt(now);
            }
            let (frames, timeout) = {
                let mut s = lock(&self.session);
                s.handle_timeout(now);
                let mut buf = BytesMut::new();
                while let Some(frame) = s.poll_transmit() {
                    if let Err(e) = self.codec.encode(&frame, &mut buf) {
                        // A frame the server would refuse; the session checked sends, so this
                        // is a bug: drop it rather than the connection.
                        let _ = e;
                    }
                }
                (buf, s.poll_timeout())
            };
            if !frames.is_empty()
                && let Some(live) = self.conn.as_mut()
            {
                let result = live
                    .writer
                    .write_all(&frames)
                    .and_then(|()| live.writer.flush());
                let mut s = lock(&self.session);
                match result {
                    Ok(()) => s.sent(now),
                    Err(e) => {
                        s.disconnected(now, DisconnectReason::Io(format!("write: {e}")));
                    }
                }
            }
            if self.pump_events(now) {
                return;
            }
            let mut wait = timeout.map(|t| t.saturating_duration_since(now));
            if self.conn.is_none()
                && let Some(at) = self.next_attempt
            {
                let until = at.saturating_duration_since(now);
                wait = Some(wait.map_or(until, |w| w.min(until)));
            }
            let input = match wait {
                Some(w) => self.input_rx.recv_timeout(w),
                None => self
                    .input_rx
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            let now = Instant::now();
            match input {
                Ok(Input::Wake) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Input::Read(id, bytes)) => {
                    if self.is_current(id) {
                        lock(&self.session).handle_bytes(now, &bytes);
                    }
                }
                Ok(Input::Ended(id, reason)) => {
                    if self.is_current(id) {
                        lock(&self.session).disconnected(now, reason);
                    }
                }
                Ok(Input::Close) | Err(RecvTimeoutError::Disconnected) => {
                    lock(&self.session).disconnected(now, DisconnectReason::Local);
                    self.drop_conn();
                    let _ = self.pump_events(now);
                    let _ = self.events.send(Event::Stopped {
                        reason: DisconnectReason::Local,
                    });
                    return;
                }
            }
        }
    }

    /// Whether `id` is the live connection.
    fn is_current(&self, id: u64) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id == id)
    }

    /// Tries to connect and log in.
    fn attempt(&mut self, now: Instant) {
        let opened = (self.tokens)()
            .map_err(|e| format!("no token: {e}"))
            .and_then(|token| {
                self.connector
                    .connect()
                    .map(|c| (token, c))
                    .map_err(|e| format!("connect: {e}"))
            });
        match opened {
            Ok((token, c)) => {
                self.conn_id += 1;
                let id = self.conn_id;
                let tx = self.input_tx.clone();
                let reader = c.reader;
                let spawned = thread::Builder::new()
                    .name("parley-client-reader".into())
                    .spawn(move || read_loop(id, reader, &tx));
                if let Err(e) = spawned {
                    (c.shutdown)();
                    self.failed(
                        now,
                        DisconnectReason::Io(format!("cannot start a thread: {e}")),
                    );
                    return;
                }
                self.conn = Some(Live {
                    id,
                    writer: c.writer,
                    shutdown: c.shutdown,
                });
                lock(&self.session).connected(now, token);
            }
            Err(why) => self.failed(now, DisconnectReason::Io(why)),
        }
    }

    /// A connection attempt failed: reports it and schedules the next.
    fn failed(&mut self, now: Instant, reason: DisconnectReason) {
        let delay = self.backoff.next_delay(random_seed(), None);
        self.next_attempt = Some(now + delay);
        let _ = self.events.send(Event::Disconnected { reason });
        let _ = self.events.send(Event::Reconnecting { delay });
    }

    /// Shuts the live connection down.
    fn drop_conn(&mut self) {
        if let Some(live) = self.conn.take() {
            (live.shutdown)();
        }
    }

    /// Hands the session's events on, acting on connects and disconnects; true if the driver
    /// stops for good.
    fn pump_events(&mut self, now: Instant) -> bool {
        let session = Arc::clone(&self.session);
        let mut s = lock(&session);
        if s.take_close() {
            self.drop_conn();
        }
        let mut stop = false;
        while let Some(ev) = s.poll_event() {
            let mut then = None;
            match &ev {
                Event::Connected(_) => self.backoff.reset(),
                Event::Disconnected { reason } => {
                    self.drop_conn();
                    if reason.is_permanent() {
                        stop = true;
                        then = Some(Event::Stopped {
                            reason: reason.clone(),
                        });
                    } else if *reason != DisconnectReason::Local {
                        let delay = self
                            .backoff
                            .next_delay(random_seed(), reason.retry_after_ms());
                        self.next_attempt = Some(now + delay);
                        then = Some(Event::Reconnecting { delay });
                    }
                }
                _ => {}
            }
            let _ = self.events.send(ev);
            if let Some(then) = then {
                let _ = self.events.send(then);
            }
        }
        if stop {
            self.next_attempt = None;
        }
        stop
    }
}

/// The session, locked (a panic elsewhere does not poison it for good).
fn lock(session: &Mutex<Session>) -> MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A reader thread: hands the connection's bytes to the driver until it ends.
fn read_loop(id: u64, mut reader: Box<dyn Read + Send>, tx: &Sender<Input>) {
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => {
                let _ = tx.send(Input::Ended(id, DisconnectReason::Closed));
                return;
            }
            Ok(n) => {
                if tx.send(Input::Read(id, chunk[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Input::Ended(id, DisconnectReason::Io(format!("read: {e}"))));
                return;
            }
        }
    }
}
