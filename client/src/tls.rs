//! TLS: the TCP framing inside TLS ([rustls](https://docs.rs/rustls), with the *ring* provider),
//! to the broker's `listen.tls` listener: [`TlsConnector`] (cargo feature `tls`, on by default).
//!
//! The roots to trust are a PEM file of CA certificates (for a development broker, the
//! certificate `broker devcert --out DIR` wrote: `DIR/cert.pem`), or a `rustls::ClientConfig`
//! of the caller's (system roots, client certificates, ...). The server name is checked against
//! the certificate (a DNS name such as `localhost`, or an IP address such as `127.0.0.1`).
//!
//! The handshake runs in [`Connector::connect`] (at most the connect timeout, 5 s); then the
//! connection's reader thread reads the socket without holding the TLS state's lock, and locks it
//! only to decrypt what came, so the writer is never held up by a blocked read.
//!
//! ```no_run
//! use parley_client::{Client, ClientConfig, TlsConnector};
//! let connector = TlsConnector::with_ca_file("127.0.0.1:7443", "localhost", "certs/cert.pem")?;
//! let client = Client::start(connector, Box::new(|| Ok("token".into())), ClientConfig::default());
//! # drop(client);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, RootCertStore};

use crate::blocking::{Connection, Connector};

/// A write blocked this long means the server stopped reading: the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects over TLS to the broker's `listen.tls` address: see the module docs.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    /// The address (`host:port`, resolved again on every attempt).
    addr: String,
    /// The name the server's certificate must carry.
    server_name: ServerName<'static>,
    /// Roots and settings.
    config: Arc<rustls::ClientConfig>,
    /// How long to try each resolved address, and the longest handshake.
    timeout: Duration,
}

impl TlsConnector {
    /// A connector to `addr` that trusts the CA certificates of the PEM file `ca_pem` (e.g. the
    /// broker's development certificate) and expects `server_name` in the server's certificate.
    ///
    /// # Errors
    ///
    /// The file cannot be read, holds no certificate, a certificate is refused, or
    /// `server_name` is not a DNS name or IP address.
    ///
    /// ```no_run
    /// let c = parley_client::TlsConnector::with_ca_file("127.0.0.1:7443", "localhost", "certs/cert.pem")?;
    /// # drop(c);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_ca_file(
        addr: impl Into<String>,
        server_name: &str,
        ca_pem: impl AsRef<Path>,
    ) -> io::Result<Self> {
        let config = client_config_with_ca_file(ca_pem)?;
        Self::with_config(addr, server_name, config)
    }

    /// A connector to `addr` with a `rustls::ClientConfig` of the caller's (its roots, its
    /// protocol versions; the ALPN list is left as it is), expecting `server_name` in the
    /// server's certificate.
    ///
    /// # Errors
    ///
    /// `server_name` is not a DNS name or IP address.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let provider = Arc::new(rustls::crypto::ring::default_provider());
    /// let config = rustls::ClientConfig::builder_with_provider(provider)
    ///     .with_safe_default_protocol_versions()
    ///     .expect("ring speaks TLS 1.2 and 1.3")
    ///     .with_root_certificates(rustls::RootCertStore::empty())
    ///     .with_no_client_auth();
    /// let c = parley_client::TlsConnector::with_config("127.0.0.1:7443", "localhost", Arc::new(config))?;
    /// # drop(c);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_config(
        addr: impl Into<String>,
        server_name: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<Self> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Self {
            addr: addr.into(),
            server_name,
            config,
            timeout: Duration::from_secs(5),
        })
    }

    /// Sets how long to try each resolved address, and the longest handshake (default 5 s).
    ///
    /// ```no_run
    /// let c = parley_client::TlsConnector::with_ca_file("127.0.0.1:7443", "localhost", "cert.pem")?
    ///     .timeout(std::time::Duration::from_secs(2));
    /// # drop(c);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// A TCP connection to the first address that answers.
    fn tcp(&self) -> io::Result<TcpStream> {
        let mut last = None;
        for a in self.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => return Ok(s),
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

/// A `rustls::ClientConfig` (the *ring* provider, TLS 1.2 and 1.3, no client certificate)
/// trusting the CA certificates of the PEM file `ca_pem`.
///
/// # Errors
///
/// The file cannot be read, holds no certificate, or a certificate is refused.
///
/// ```no_run
/// let config = parley_client::tls::client_config_with_ca_file("certs/cert.pem")?;
/// # drop(config);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn client_config_with_ca_file(
    ca_pem: impl AsRef<Path>,
) -> io::Result<Arc<rustls::ClientConfig>> {
    let path = ca_pem.as_ref();
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(invalid(format!("{}: no certificate in it", path.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Connector for TlsConnector {
    fn connect(&mut self) -> io::Result<Connection> {
        let mut tcp = self.tcp()?;
        // Best effort: a socket without these options still works, only less promptly.
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(self.timeout))?;
        tcp.set_write_timeout(Some(self.timeout))?;
        let mut tls = ClientConnection::new(Arc::clone(&self.config), self.server_name.clone())
            .map_err(|e| io::Error::other(e.to_string()))?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)?;
        }
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let tls = Arc::new(Mutex::new(tls));
        let reader = TlsReader {
            tls: Arc::clone(&tls),
            tcp: tcp.try_clone()?,
            plain: Vec::new(),
            at: 0,
            raw: vec![0; 16 << 10],
            eof: false,
        };
        let closer = tcp.try_clone()?;
        let writer = TlsWriter { tls, tcp };
        Ok(Connection::new(
            Box::new(reader),
            Box::new(writer),
            Box::new(move || {
                let _ = closer.shutdown(Shutdown::Both);
            }),
        ))
    }
}

/// The TLS state, locked.
fn lock(tls: &Mutex<ClientConnection>) -> MutexGuard<'_, ClientConnection> {
    tls.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes what TLS has to send (records, alerts) to `tcp`.
fn send_tls(tls: &mut ClientConnection, tcp: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(tcp)?;
    }
    Ok(())
}

/// The reading half: reads the socket unlocked, decrypts under the lock.
struct TlsReader {
    /// The TLS state, shared with the writer.
    tls: Arc<Mutex<ClientConnection>>,
    /// The socket (a clone).
    tcp: TcpStream,
    /// Plaintext decrypted, not yet returned (from `at`).
    plain: Vec<u8>,
    /// How much of `plain` was returned.
    at: usize,
    /// The raw read buffer.
    raw: Vec<u8>,
    /// The socket ended.
    eof: bool,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.at < self.plain.len() {
                let n = buf.len().min(self.plain.len() - self.at);
                buf[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            self.plain.clear();
            self.at = 0;
            if self.eof {
                return Ok(0);
            }
            let n = match self.tcp.read(&mut self.raw) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.eof = true;
            }
            let mut tls = lock(&self.tls);
            let mut rest = &self.raw[..n];
            loop {
                if !rest.is_empty() {
                    tls.read_tls(&mut rest)?;
                }
                let state = tls.process_new_packets();
                // An alert to send, if the peer broke the protocol; best effort.
                let _ = send_tls(&mut tls, &mut self.tcp);
                let state = state.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if state.plaintext_bytes_to_read() > 0 {
                    let mut r = tls.reader();
                    let mut chunk = [0u8; 16 << 10];
                    loop {
                        match r.read(&mut chunk) {
                            Ok(0) => break,
                            Ok(k) => self.plain.extend_from_slice(&chunk[..k]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            // An end without close_notify: what was decrypted is still used.
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
                if state.peer_has_closed() {
                    self.eof = true;
                }
                if rest.is_empty() {
                    break;
                }
            }
        }
    }
}

/// The writing half: encrypts under the lock and writes the records.
struct TlsWriter {
    /// The TLS state, shared with the reader.
    tls: Arc<Mutex<ClientConnection>>,
    /// The socket.
    tcp: TcpStream,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut tls = lock(&self.tls);
        loop {
            let n = tls.writer().write(buf)?;
            send_tls(&mut tls, &mut self.tcp)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut tls = lock(&self.tls);
        tls.writer().flush()?;
        send_tls(&mut tls, &mut self.tcp)?;
        self.tcp.flush()
    }
}
