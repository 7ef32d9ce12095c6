//! Accepting connections: the shard's TCP, WebSocket, TLS and WSS listeners (within the node's
//! admission limits), the TLS handshake's deadline, and what the driver counts about
//! TLS. A child of the driver, so it works on its tables.

use super::{ACCEPT_RETRY_MS, Driver, Sock, Stream, Verdict, listener};
use crate::core::Now;
use crate::loglimit::LogKind;

impl Driver {
    /// Accepts what waits on listener `kind` (a refused connection gets its last words at once;
    /// a failing `accept`, e.g. out of descriptors, is retried after [`ACCEPT_RETRY_MS`]).
    pub(super) fn accept(&mut self, kind: Listener, now: Now) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        loop {
            let listener = match kind {
                Listener::Tcp => self.tcp.as_ref(),
                Listener::Ws => self.ws.as_ref(),
                Listener::Tls => self.tls.as_ref(),
                Listener::Wss => self.wss.as_ref(),
            };
            let Some(listener) = listener else {
                return;
            };
            match listener::accept(listener) {
                Ok(Some((tcp, addr))) => {
                    let stream = if kind.is_tls() {
                        let Some(config) = self.certificate.as_ref().map(|c| c.current()) else {
                            // A TLS listener is bound only with a certificate.
                            continue;
                        };
                        match rustls::server::UnbufferedServerConnection::new(config) {
                            Ok(session) => Stream::tls(tcp, session),
                            Err(e) => {
                                self.tls_counts.failures += 1;
                                self.log(
                                    LogKind::Tls,
                                    format_args!("cannot start a TLS session: {e}"),
                                );
                                continue;
                            }
                        }
                    } else {
                        Stream::Plain(tcp)
                    };
                    let (anon, limit) = match self.admission.admit(addr.ip()) {
                        Verdict::Admit(slot) => (Some(slot), None),
                        Verdict::Refuse(limit) => (None, Some(limit)),
                    };
                    let refused = limit.is_some();
                    let tls = stream.is_tls();
                    let conn = self.core.handle_open(kind.is_websocket(), limit, now);
                    let sock = Sock {
                        stream,
                        generation: conn.generation,
                        anon,
                        refused,
                    };
                    self.put_sock(conn, sock);
                    if tls && !refused {
                        self.handshakes
                            .push_back((now.ms + self.handshake_timeout_ms, conn));
                    }
                    // A close the core decided at once must see the socket.
                    self.apply_effects(now);
                }
                Ok(None) => return,
                Err(e) => {
                    let max = self.admission.max_connections();
                    self.log(
                        LogKind::Accept,
                        format_args!(
                            "accept failed ({e}); retrying in {ACCEPT_RETRY_MS} ms \
                             (limits.max_connections in force: {max})"
                        ),
                    );
                    self.accept_retry_at = Some(now.ms + ACCEPT_RETRY_MS);
                    return;
                }
            }
        }
    }

    /// Drops the TLS connections whose handshake is not done by its deadline
    /// (`tls.handshake_timeout_ms`).
    pub(super) fn expire_handshakes(&mut self, now: Now) {
        while let Some(&(deadline, conn)) = self.handshakes.front() {
            if now.ms < deadline {
                return;
            }
            self.handshakes.pop_front();
            let stalled = self
                .socks
                .get(conn.slot as usize)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.generation == conn.generation && s.stream.is_handshaking());
            if stalled {
                self.tls_counts.failures += 1;
                let ms = self.handshake_timeout_ms;
                self.log(
                    LogKind::Tls,
                    format_args!("a TLS handshake did not finish within {ms} ms: dropped"),
                );
                self.reset(conn, now);
            }
        }
    }
}

/// The listeners of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listener {
    /// Plain TCP.
    Tcp,
    /// Plain WebSocket.
    Ws,
    /// TCP framing inside TLS.
    Tls,
    /// WebSocket inside TLS.
    Wss,
}

impl Listener {
    /// Every listener, in the order accepting is retried.
    pub(super) const ALL: [Listener; 4] =
        [Listener::Tcp, Listener::Ws, Listener::Tls, Listener::Wss];

    /// Whether its connections speak WebSocket (inside TLS or not).
    pub(super) fn is_websocket(self) -> bool {
        matches!(self, Listener::Ws | Listener::Wss)
    }

    /// Whether its connections start with a TLS handshake.
    pub(super) fn is_tls(self) -> bool {
        matches!(self, Listener::Tls | Listener::Wss)
    }
}

/// What the driver counts about TLS (the core sees plaintext only), published into the shard's
/// [`crate::core::Counters`].
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TlsCounts {
    /// Handshakes completed.
    pub(super) handshakes: u64,
    /// Connections ended by a TLS error or a handshake past `tls.handshake_timeout_ms`.
    pub(super) failures: u64,
    /// TLS connections open on this shard now.
    pub(super) open: u64,
}

impl TlsCounts {
    /// Writes these into the counters the shard publishes.
    pub(super) fn publish(&self, counters: &mut crate::core::Counters) {
        counters.tls_handshakes = self.handshakes;
        counters.tls_failures = self.failures;
        counters.tls_connections = self.open;
    }
}
