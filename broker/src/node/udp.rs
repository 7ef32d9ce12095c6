//! UDP sessions, the driver's side: one socket per shard, the sessions that live on it, the
//! stateless retry cookies, session ids, pacing. The envelope itself (tags, replay window,
//! packing) is `parley_proto::udp`; what a session *says* is decided by the core, which sees a
//! UDP session as a connection with TCP framing and no socket.
//!
//! # How a datagram finds its session
//!
//! Every shard binds its own socket on `listen.udp` with `SO_REUSEPORT`; the kernel picks a
//! socket for each datagram by a hash of its source address. A session lives on its user's home
//! shard (where the core put its connection), and its id names that shard ([`SessionId`]): a
//! shard that receives a datagram for another shard's session passes it on through the shards'
//! mail, unopened. Replies always leave from the owning shard's socket (the same port).
//!
//! # Login
//!
//! A LOGIN without a valid cookie is answered by an 18-byte RETRY ([`Cookies`]) and nothing is
//! kept. With a valid cookie the shard opens a core connection and feeds it the `Login`; the
//! core's answer (a `LoginResult`, possibly from the home shard after a handover, or an `Error`)
//! goes back as the LOGIN_REPLY, with the session's id and a fresh random key written into the
//! `LoginResult`, never larger than the LOGIN. A LOGIN sent again (same address and nonce, its
//! reply lost or slow) is not a new session: while the session waits for its first data
//! datagram, the shard that took the LOGIN remembers it ([`Logins`]) and the owner answers it
//! with the same reply.
//!
//! # Memory
//!
//! A session is a [`Session`] here (key, id, address, replay window, pacing: about 130 bytes,
//! see the size test) next to its core connection; it holds no file descriptor and no buffer
//! while idle.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;

use hmac::{Hmac, KeyInit, Mac};
use parley_proto::udp::{self, ReplayWindow, SESSION_KEY_LEN, SessionKey};
use sha2::Sha256;
use socket2::{Domain, Protocol, Socket, Type};

use crate::core::ConnId;

/// The most datagrams a shard reads from its socket per turn before serving everything else.
pub(crate) const RECV_BUDGET: usize = 512;
/// The most datagrams of last words sent for a session that closes (a fatal error, a kick).
pub(crate) const LAST_WORDS_DATAGRAMS: usize = 4;

/// Binds one shard's UDP socket on `addr`: nonblocking, `SO_REUSEPORT` (every shard binds the
/// same address), with `buffer` bytes asked for `SO_RCVBUF` and `SO_SNDBUF`.
///
/// # Errors
///
/// The socket, option or `bind` error.
pub(crate) fn bind(addr: SocketAddr, buffer: usize) -> io::Result<mio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // The kernel caps these at net.core.rmem_max / wmem_max; a refusal is not fatal.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// Makes the kernel deliver each data datagram straight to the socket of the shard its session
/// id names, so no datagram has to be passed between shards: a classic BPF program on the
/// `SO_REUSEPORT` group (the group's sockets are indexed in bind order, which is shard order)
/// returns `(session id >> 48) - 1` for CLIENT_DATA. For anything else (a LOGIN, garbage) it
/// returns an index past the group, and the kernel falls back to its usual hash of the source
/// address. Linux only; elsewhere, or if the kernel refuses, datagrams are passed between shards
/// instead ([`SessionId::shard`]).
///
/// # Errors
///
/// `setsockopt`'s error.
#[cfg(target_os = "linux")]
pub(crate) fn steer_by_session(socket: &mio::net::UdpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // The program sees the UDP payload from offset 0. A load past the end ends it with 0
    // (shard 0, which drops what it cannot open).
    const LD_B_ABS: u16 = 0x30; // A = payload[k]
    const LD_H_ABS: u16 = 0x28; // A = u16 big-endian at payload[k]
    const JEQ_K: u16 = 0x15; // if A == k: skip jt, else skip jf
    const SUB_K: u16 = 0x14; // A -= k
    const RET_A: u16 = 0x16;
    const RET_K: u16 = 0x06;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut program = [
        op(LD_B_ABS, 0, 0, 1),
        op(
            JEQ_K,
            0,
            3,
            u32::from(udp::DatagramType::ClientData.to_byte()),
        ),
        op(LD_H_ABS, 0, 0, 2),
        op(SUB_K, 0, 0, 1),
        op(RET_A, 0, 0, 0),
        op(RET_K, 0, 0, u32::MAX),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `program`, a live array of `len` valid instructions, for the
    // whole call; the kernel copies the program and keeps no pointer to it. The option length is
    // the size of the `sock_fprog` passed, and the descriptor is the socket's own, open.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One shard's UDP side: its socket and sessions, and what the shards share (the cookie
/// secret, the node's session count).
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// The shard's socket (bound on `listen.udp` with `SO_REUSEPORT`).
    pub(crate) socket: mio::net::UdpSocket,
    /// Sessions by core slot.
    pub(crate) sessions: Vec<Option<Session>>,
    /// Logins not yet confirmed, by (address, nonce).
    pub(crate) logins: Logins,
    /// The node's retry cookies.
    pub(crate) cookies: Arc<Cookies>,
    /// UDP sessions open on the node (all shards).
    pub(crate) open: Arc<AtomicUsize>,
    /// `udp.max_sessions`.
    pub(crate) max_sessions: usize,
    /// `udp.pacing_*`.
    pub(crate) pacing: Pacing,
    /// `udp.max_datagram_bytes`.
    pub(crate) max_datagram: usize,
    /// `timeouts.login_ms`: how long a login is remembered.
    pub(crate) login_ms: u64,
    /// The receive buffer (one datagram of the largest size).
    pub(crate) recv: Box<[u8]>,
    /// Where outgoing datagrams are built.
    pub(crate) scratch: BytesMut,
    /// Datagrams may be waiting in the socket (the read budget ran out).
    pub(crate) more: bool,
    /// The socket refused a datagram (its send buffer is full): wait for it to be writable.
    pub(crate) blocked: bool,
    /// Sessions waiting for the socket.
    pub(crate) waiting: Vec<ConnId>,
    /// Sessions waiting for pacing, by when they may send.
    pub(crate) paced: BinaryHeap<Reverse<(u64, ConnId)>>,
    /// What this shard counted.
    pub(crate) counts: UdpCounts,
}

/// What an [`Endpoint`] is made of, apart from its socket.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) cookies: Arc<Cookies>,
    pub(crate) open: Arc<AtomicUsize>,
    pub(crate) max_sessions: usize,
    pub(crate) pacing: Pacing,
    pub(crate) max_datagram: usize,
    pub(crate) login_ms: u64,
}

impl Endpoint {
    /// A shard's endpoint on `socket`.
    pub(crate) fn new(socket: mio::net::UdpSocket, shared: Shared) -> Self {
        Endpoint {
            socket,
            sessions: Vec::new(),
            logins: Logins::default(),
            cookies: shared.cookies,
            open: shared.open,
            max_sessions: shared.max_sessions,
            pacing: shared.pacing,
            max_datagram: shared.max_datagram,
            login_ms: shared.login_ms,
            recv: vec![0; 1 << 16].into_boxed_slice(),
            scratch: BytesMut::with_capacity(1 << 16),
            more: false,
            blocked: false,
            waiting: Vec::new(),
            paced: BinaryHeap::new(),
            counts: UdpCounts::default(),
        }
    }

    /// Takes one of the node's session places, if one is free (`udp.max_sessions`).
    pub(crate) fn admit(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_sessions).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a session place back.
    pub(crate) fn release(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// When the next paced session may send, if one waits.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.paced.peek().map(|Reverse((at, _))| *at)
    }
}

/// A session id: `(shard + 1) << 48 | (generation & 0xffff) << 32 | slot`. It names where the
/// session lives (never 0, since the shard part is at least 1); knowing it gives nothing without
/// the session's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionId(pub(crate) u64);

impl SessionId {
    /// The id of the session of `conn` on `shard`.
    pub(crate) fn new(shard: usize, conn: ConnId) -> Self {
        debug_assert!(shard < 0xffff, "shard index fits 16 bits");
        let shard = ((shard as u64) + 1) << 48;
        let generation = u64::from(conn.generation & 0xffff) << 32;
        SessionId(shard | generation | u64::from(conn.slot))
    }

    /// The shard the session lives on, if the id names one.
    pub(crate) fn shard(self) -> Option<usize> {
        usize::try_from(self.0 >> 48).ok()?.checked_sub(1)
    }

    /// The core slot of the session on its shard.
    pub(crate) fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    /// Whether a connection's generation matches the one in the id.
    pub(crate) fn matches(self, generation: u32) -> bool {
        (self.0 >> 32) & 0xffff == u64::from(generation & 0xffff)
    }
}

/// Stateless retry cookies: a 64-bit MAC, under the node's secret, of the client's address, its
/// login nonce and the current period of `lifetime_ms`. A cookie made in this period or the one
/// before is good, so a cookie lives between one and two periods. Shared by every shard (a
/// client's LOGIN may land on another shard's socket the second time).
pub(crate) struct Cookies {
    mac: Hmac<Sha256>,
    lifetime_ms: u64,
}

impl std::fmt::Debug for Cookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cookies")
            .field("lifetime_ms", &self.lifetime_ms)
            .finish_non_exhaustive()
    }
}

impl Cookies {
    /// Cookies under `secret`, good for `lifetime_ms` to twice that.
    pub(crate) fn new(secret: &[u8; 32], lifetime_ms: u64) -> Self {
        // HMAC takes a key of any length.
        let mac = match Hmac::<Sha256>::new_from_slice(secret) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        Cookies {
            mac,
            lifetime_ms: lifetime_ms.max(1),
        }
    }

    /// The cookie for `from` and `nonce` at monotonic time `now_ms`.
    pub(crate) fn mint(&self, from: SocketAddr, nonce: u64, now_ms: u64) -> u64 {
        self.at(from, nonce, now_ms / self.lifetime_ms)
    }

    /// Whether `cookie` was minted for `from` and `nonce` in this period or the one before.
    pub(crate) fn check(&self, from: SocketAddr, nonce: u64, cookie: u64, now_ms: u64) -> bool {
        if cookie == 0 {
            return false;
        }
        let period = now_ms / self.lifetime_ms;
        // Not constant time: a 64-bit cookie bound to the sender's own address and nonce gives
        // an off-path attacker nothing to learn from timing it cannot see anyway.
        cookie == self.at(from, nonce, period)
            || period
                .checked_sub(1)
                .is_some_and(|p| cookie == self.at(from, nonce, p))
    }

    fn at(&self, from: SocketAddr, nonce: u64, period: u64) -> u64 {
        let mut mac = self.mac.clone();
        mac.update(&period.to_be_bytes());
        match from {
            SocketAddr::V4(a) => mac.update(&a.ip().octets()),
            SocketAddr::V6(a) => mac.update(&a.ip().octets()),
        }
        mac.update(&from.port().to_be_bytes());
        mac.update(&nonce.to_be_bytes());
        let tag = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(tag.get(..8).unwrap_or(&[1; 8]));
        // Never 0: 0 means "no cookie" in a LOGIN.
        u64::from_be_bytes(first) | 1
    }
}

/// Pacing of one session: a token bucket of bytes, refilled at the configured rate up to the
/// burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pacer {
    /// Bytes that may be sent now.
    tokens: u32,
    /// When `tokens` was last refilled, monotonic ms (wraps after 49 days; only differences
    /// matter).
    at_ms: u32,
}

/// The pacing settings (`udp.pacing_rate_bytes_per_sec`, `udp.pacing_burst_bytes`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    pub(crate) rate_per_sec: u64,
    pub(crate) burst: u32,
}

impl Pacer {
    /// A full bucket.
    pub(crate) fn new(pacing: Pacing, now_ms: u64) -> Self {
        Pacer {
            tokens: pacing.burst,
            at_ms: now_ms as u32,
        }
    }

    /// Refills for the time since the last refill; returns the bytes that may be sent now.
    pub(crate) fn refill(&mut self, pacing: Pacing, now_ms: u64) -> u32 {
        let now = now_ms as u32;
        let elapsed = u64::from(now.wrapping_sub(self.at_ms));
        let gained = elapsed.saturating_mul(pacing.rate_per_sec) / 1000;
        if gained > 0 {
            let tokens = u64::from(self.tokens).saturating_add(gained);
            self.tokens = tokens.min(u64::from(pacing.burst)) as u32;
            self.at_ms = now;
        }
        self.tokens
    }

    /// Takes `bytes` sent (the bucket may go to 0, never below).
    pub(crate) fn spend(&mut self, bytes: usize) {
        self.tokens = self
            .tokens
            .saturating_sub(u32::try_from(bytes).unwrap_or(u32::MAX));
    }

    /// How long until `bytes` may be sent, ms (at least 1).
    pub(crate) fn wait_ms(&self, pacing: Pacing, bytes: usize) -> u64 {
        let missing = (bytes as u64).saturating_sub(u64::from(self.tokens));
        (missing.saturating_mul(1000) / pacing.rate_per_sec.max(1)).max(1)
    }
}

/// A session waiting for its LOGIN_REPLY to be sent, or sent and not yet confirmed by a data
/// datagram (so a LOGIN sent again gets the same reply).
#[derive(Debug, Clone)]
pub(crate) struct PendingLogin {
    /// The LOGIN's nonce.
    pub(crate) nonce: u64,
    /// The LOGIN's size: the most the reply may take.
    pub(crate) limit: usize,
    /// The LOGIN_REPLY, once sent.
    pub(crate) reply: Option<Box<[u8]>>,
}

/// One UDP session on its shard.
#[derive(Debug)]
pub(crate) struct Session {
    /// The core connection's generation (the slot is the table index).
    pub(crate) generation: u32,
    /// The session id (0 until the login reply is made on the session's home shard).
    pub(crate) id: u64,
    /// The session key (all zero until the login reply is made).
    pub(crate) key: [u8; SESSION_KEY_LEN],
    /// Where the session's datagrams go: the source of its newest authenticated datagram.
    pub(crate) peer: SocketAddr,
    /// The client's packet numbers seen.
    pub(crate) window: ReplayWindow,
    /// The next packet number this side sends.
    pub(crate) next_packet: u64,
    /// Pacing of what is sent to it.
    pub(crate) pacer: Pacer,
    /// While logging in.
    pub(crate) login: Option<Box<PendingLogin>>,
    /// A pacing wake-up is queued for it.
    pub(crate) paced: bool,
    /// It waits for the socket to take datagrams again.
    pub(crate) blocked: bool,
}

impl Session {
    /// The session's key for tagging and opening.
    pub(crate) fn session_key(&self) -> SessionKey {
        SessionKey::new(&self.key)
    }
}

/// A session in login, as the shard that took its LOGIN knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoginAt {
    /// On this shard.
    Here(ConnId),
    /// Handed over to this shard.
    Shard(usize),
}

/// Logins not yet confirmed by a data datagram, by (address, nonce), each remembered until the
/// login timeout: a LOGIN that comes again is the same login.
#[derive(Debug, Default)]
pub(crate) struct Logins {
    by_key: HashMap<(SocketAddr, u64), (LoginAt, u64)>,
    /// (expiry ms, key), oldest first.
    order: VecDeque<(u64, (SocketAddr, u64))>,
}

impl Logins {
    /// Remembers a login until `expires_ms`.
    pub(crate) fn insert(&mut self, key: (SocketAddr, u64), at: LoginAt, expires_ms: u64) {
        self.by_key.insert(key, (at, expires_ms));
        self.order.push_back((expires_ms, key));
    }

    /// Where a login is, if remembered.
    pub(crate) fn get(&self, key: &(SocketAddr, u64)) -> Option<LoginAt> {
        self.by_key.get(key).map(|&(at, _)| at)
    }

    /// Forgets a login (confirmed, or its session closed).
    pub(crate) fn remove(&mut self, key: &(SocketAddr, u64)) {
        self.by_key.remove(key);
    }

    /// Forgets the logins past their time.
    pub(crate) fn expire(&mut self, now_ms: u64) {
        while let Some(&(expires, key)) = self.order.front() {
            if expires > now_ms {
                return;
            }
            self.order.pop_front();
            if self.by_key.get(&key).is_some_and(|&(_, e)| e <= now_ms) {
                self.by_key.remove(&key);
            }
        }
        // After a burst of logins, give the memory back.
        if self.by_key.capacity() > 64 && self.by_key.len() < self.by_key.capacity() / 4 {
            self.by_key.shrink_to(self.by_key.len() * 2);
        }
        if self.order.capacity() > 64 && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to(self.order.len() * 2);
        }
    }

    /// How many are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// What the driver counts about UDP (published into the shard's counters).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UdpCounts {
    /// Sessions on this shard now (a gauge).
    pub(crate) sessions: u64,
    /// Datagrams received.
    pub(crate) received: u64,
    /// Datagrams sent.
    pub(crate) sent: u64,
    /// Datagrams dropped unanswered: malformed, unauthenticated, replayed, for no session, or
    /// arriving while their session could take no input.
    pub(crate) dropped: u64,
    /// RETRY datagrams sent (LOGINs without a good cookie).
    pub(crate) retries: u64,
    /// Sessions that moved to a new client address.
    pub(crate) migrations: u64,
    /// Datagrams passed to the shard that owns their session.
    pub(crate) forwarded: u64,
}

impl UdpCounts {
    /// Writes these into the counters the shard publishes.
    pub(crate) fn publish(&self, counters: &mut crate::core::Counters) {
        counters.udp_sessions = self.sessions;
        counters.udp_datagrams_received = self.received;
        counters.udp_datagrams_sent = self.sent;
        counters.udp_datagrams_dropped = self.dropped;
        counters.udp_retries = self.retries;
        counters.udp_migrations = self.migrations;
        counters.udp_forwarded = self.forwarded;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_session_id_names_its_shard_slot_and_generation_and_is_never_zero() {
        let conn = ConnId {
            slot: 7,
            generation: 0x1_0003,
        };
        let id = SessionId::new(0, conn);
        assert_ne!(id.0, 0);
        assert_eq!(id.shard(), Some(0));
        assert_eq!(id.slot(), 7);
        assert!(id.matches(0x1_0003));
        assert!(
            id.matches(3),
            "only the low 16 bits of the generation are kept"
        );
        assert!(!id.matches(4));
        assert_eq!(SessionId::new(5, conn).shard(), Some(5));
        assert_eq!(SessionId(7).shard(), None, "no shard part");
    }

    #[test]
    fn a_cookie_is_good_for_its_address_and_nonce_for_one_to_two_lifetimes() {
        let cookies = Cookies::new(&[9; 32], 1000);
        let c = cookies.mint(addr(5000), 42, 10_500);
        assert_ne!(c, 0);
        assert!(cookies.check(addr(5000), 42, c, 10_500));
        assert!(cookies.check(addr(5000), 42, c, 11_999), "next period");
        assert!(!cookies.check(addr(5000), 42, c, 12_000), "two periods on");
        assert!(!cookies.check(addr(5001), 42, c, 10_500), "another port");
        assert!(
            !cookies.check(SocketAddr::from(([127, 0, 0, 2], 5000)), 42, c, 10_500),
            "another address"
        );
        assert!(!cookies.check(addr(5000), 43, c, 10_500), "another nonce");
        assert!(!cookies.check(addr(5000), 42, 0, 10_500), "no cookie");
        let other = Cookies::new(&[8; 32], 1000);
        assert!(!other.check(addr(5000), 42, c, 10_500), "another secret");
    }

    #[test]
    fn pacing_refills_at_the_rate_up_to_the_burst() {
        let pacing = Pacing {
            rate_per_sec: 10_000,
            burst: 5_000,
        };
        let mut p = Pacer::new(pacing, 100);
        assert_eq!(p.refill(pacing, 100), 5_000);
        p.spend(4_000);
        assert_eq!(p.refill(pacing, 100), 1_000);
        assert_eq!(p.wait_ms(pacing, 2_000), 100, "1000 bytes at 10 bytes/ms");
        assert_eq!(p.refill(pacing, 150), 1_500);
        assert_eq!(p.refill(pacing, 10_000), 5_000, "never past the burst");
        p.spend(100_000);
        assert_eq!(p.refill(pacing, 10_000), 0);
    }

    #[test]
    fn logins_are_forgotten_after_their_time() {
        let mut logins = Logins::default();
        logins.insert((addr(1), 1), LoginAt::Shard(1), 100);
        logins.insert((addr(2), 2), LoginAt::Shard(0), 200);
        logins.expire(150);
        assert_eq!(logins.get(&(addr(1), 1)), None);
        assert_eq!(logins.get(&(addr(2), 2)), Some(LoginAt::Shard(0)));
        logins.expire(200);
        assert_eq!(logins.len(), 0);
    }

    #[test]
    fn an_idle_session_is_small() {
        // The driver's part of an idle session's memory (the core's connection comes on top;
        // bench/RESULTS.md has the measured whole).
        let size = std::mem::size_of::<Option<Session>>();
        assert!(size <= 160, "Session is {size} bytes");
    }
}
