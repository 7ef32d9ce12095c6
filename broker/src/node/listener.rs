//! Listening sockets for the shards.
//!
//! # Accepting: one `SO_REUSEPORT` listener per shard
//!
//! Every shard binds its own listener on the node's port with `SO_REUSEPORT` ([`bind`]) and
//! registers it in its own `mio::Poll`. The kernel spreads incoming connections over the
//! listeners (by a hash of the 4-tuple), so there is no acceptor thread, no shared accept queue
//! and no thundering herd; shards accept in parallel, each at its own pace. The spread is by
//! hash, not by load (at thousands of connections the shards even out). Linux lets only sockets
//! of the same effective user join a `SO_REUSEPORT` group, so another user cannot steal the
//! port's connections. Listeners are bound only once every shard has rebuilt its state, so a
//! client never waits in a backlog during start-up: it is refused and retries.

use std::io;
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

/// The accept queue length asked of the kernel (it caps it at `net.core.somaxconn`, 4096 on
/// current Linux): room for a burst of connections while the shard is busy.
pub(crate) const BACKLOG: i32 = 4096;

/// Binds a nonblocking listener on `addr` for a mio loop, with `SO_REUSEADDR` (restart without
/// waiting for old connections in `TIME_WAIT`) and, if `reuse_port`, `SO_REUSEPORT`: then every
/// shard binds its own listener on the same address and the kernel spreads connections over
/// them. Each listener in a `SO_REUSEPORT` group must set it, the first one included.
///
/// # Errors
///
/// The socket, option, `bind` or `listen` error (e.g. `AddrInUse` when another listener holds
/// the address without `SO_REUSEPORT`).
pub(crate) fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Accepts the next pending connection, ready for the loop: nonblocking (mio accepts with
/// `SOCK_NONBLOCK`) and with `TCP_NODELAY` on (frames are written whole, one `write` per turn, so
/// Nagle's algorithm would only add latency).
///
/// Returns `Ok(None)` when no connection is pending (`WouldBlock`: wait for the next readable
/// event). Retries `Interrupted`; skips connections that died in the queue (`ConnectionAborted`,
/// or a failure to set `TCP_NODELAY` on a socket already reset).
///
/// # Errors
///
/// Anything else, typically running out of descriptors (`EMFILE`, `ENFILE`) or memory. The
/// pending connections stay queued and, mio being edge-triggered, no new event announces them:
/// the loop stops accepting for this turn and retries from a timer.
pub(crate) fn accept(listener: &TcpListener) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    loop {
        match listener.accept() {
            Ok((stream, addr)) => {
                if stream.set_nodelay(true).is_err() {
                    continue;
                }
                return Ok(Some((stream, addr)));
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                _ => return Err(e),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::*;

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// Accepts from `listener`, retrying until a connection is there or a second has passed.
    fn accept_within_a_second(listener: &TcpListener) -> mio::net::TcpStream {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some((conn, _)) = accept(listener).expect("accept") {
                return conn;
            }
            assert!(Instant::now() < deadline, "no connection accepted");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn reuse_port_lets_two_listeners_bind_the_same_port() {
        let first = bind(loopback(), true).expect("first bind");
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).expect("second bind on the same port");
        assert_eq!(second.local_addr().unwrap(), addr);
    }

    #[test]
    fn without_reuse_port_a_second_listener_on_the_port_is_refused() {
        let first = bind(loopback(), false).expect("first bind");
        let addr = first.local_addr().unwrap();
        let err = bind(addr, false).expect_err("port taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn listener_is_nonblocking_and_reports_no_pending_connection() {
        let listener = bind(loopback(), false).unwrap();
        assert!(accept(&listener).expect("no error").is_none());
    }

    #[test]
    fn accepted_connection_has_nodelay_on() {
        let listener = bind(loopback(), true).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let conn = accept_within_a_second(&listener);
        assert!(conn.nodelay().unwrap());
    }

    #[test]
    fn connections_to_a_reuse_port_group_are_spread_over_its_listeners() {
        let first = bind(loopback(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).unwrap();
        let clients: Vec<_> = (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let deadline = Instant::now() + Duration::from_secs(2);
        let (mut on_first, mut on_second) = (0, 0);
        while on_first + on_second < clients.len() && Instant::now() < deadline {
            on_first += std::iter::from_fn(|| accept(&first).unwrap()).count();
            on_second += std::iter::from_fn(|| accept(&second).unwrap()).count();
        }
        assert_eq!(
            on_first + on_second,
            clients.len(),
            "every connection accepted"
        );
        assert!(
            on_first > 0 && on_second > 0,
            "both listeners got some: {on_first} and {on_second}"
        );
    }
}
