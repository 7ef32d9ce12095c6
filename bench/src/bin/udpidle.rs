//! `udpidle`: opens many idle UDP sessions on a parley broker and measures what they cost it:
//! resident memory per session and CPU per session kept alive (one `Ping` per session per
//! `--ping-interval-ms`, as a client keeps within the heartbeat interval).
//!
//! A UDP session is named by its id and key, not by its address, so a few sockets carry any
//! number of sessions (one file descriptor per socket, not per session): the count is limited by
//! memory, not by the 20,000 open files of this machine.
//!
//! ```sh
//! broker serve --set listen.udp=127.0.0.1:7403 ... &
//! udpidle --addr 127.0.0.1:7403 --data-dir data --pid $! --sessions 200000
//! ```

#[path = "imload/token.rs"]
mod token;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use parley_proto::pb::{self, frame::Body};
use parley_proto::{frame, udp};

#[derive(Debug, Parser)]
#[command(about = "Open many idle UDP sessions on a parley broker and measure their cost")]
struct Args {
    /// The broker's UDP address (`listen.udp`).
    #[arg(long)]
    addr: SocketAddr,
    /// The broker's data directory (its `secret` file signs the tokens).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// The broker's process id (its memory and CPU are read from /proc).
    #[arg(long)]
    pid: u32,
    /// Sessions to open.
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Client sockets to spread them over.
    #[arg(long, default_value_t = 32)]
    sockets: usize,
    /// Logins in flight at most.
    #[arg(long, default_value_t = 2_000)]
    window: usize,
    /// Each session sends a Ping this often while held.
    #[arg(long, default_value_t = 30_000)]
    ping_interval_ms: u64,
    /// How long to hold the sessions idle (pinging) while measuring CPU.
    #[arg(long, default_value_t = 30)]
    hold_secs: u64,
    /// User names are `<prefix><i>`.
    #[arg(long, default_value = "idle")]
    prefix: String,
}

/// One session as the client holds it.
struct Held {
    socket: usize,
    id: u64,
    key: udp::SessionKey,
    packet: u64,
}

/// A login under way: (socket, nonce) → (session index, cookie, sent at).
type Pending = HashMap<(usize, u64), (usize, u64, Instant)>;

fn main() -> io::Result<()> {
    let args = Args::parse();
    let secret = std::fs::read_to_string(args.data_dir.join("secret"))?
        .trim()
        .as_bytes()
        .to_vec();
    let sockets: Vec<UdpSocket> = (0..args.sockets.max(1))
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect(args.addr)?;
            s.set_nonblocking(true)?;
            let raw = socket2::SockRef::from(&s);
            let _ = raw.set_recv_buffer_size(8 << 20);
            let _ = raw.set_send_buffer_size(8 << 20);
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let rss_before = rss_kib(args.pid)?;
    let cpu_before = cpu_ticks(args.pid)?;
    let started = Instant::now();
    let held = open_all(&args, &secret, &sockets)?;
    let opened_in = started.elapsed();
    let cpu_open = cpu_ticks(args.pid)? - cpu_before;
    // Let allocations settle, then read the memory.
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kib(args.pid)?;
    let per_session = (rss_after.saturating_sub(rss_before) * 1024) as f64 / held.len() as f64;
    println!(
        "opened {} sessions in {:.1} s ({:.0}/s; broker CPU {:.1} s, {:.0} logins per CPU-s)",
        held.len(),
        opened_in.as_secs_f64(),
        held.len() as f64 / opened_in.as_secs_f64(),
        ticks_secs(cpu_open),
        held.len() as f64 / ticks_secs(cpu_open).max(0.01)
    );
    println!("broker RSS {rss_before} KiB -> {rss_after} KiB: {per_session:.0} B per idle session");
    let count = held.len().max(1);
    let (pings, pongs, cpu_hold) = hold(&args, held, &sockets)?;
    let rss_held = rss_kib(args.pid)?;
    println!(
        "after the hold (every session heard from; logins forgotten): broker RSS {rss_held} KiB: \
         {:.0} B per idle session",
        (rss_held.saturating_sub(rss_before) * 1024) as f64 / count as f64
    );
    let hold = args.hold_secs as f64;
    println!(
        "held {hold:.0} s pinging every {} ms: {pings} pings, {pongs} pongs; broker CPU {:.2} s \
         ({:.1} % of one core)",
        args.ping_interval_ms,
        ticks_secs(cpu_hold),
        100.0 * ticks_secs(cpu_hold) / hold
    );
    Ok(())
}

/// Opens `args.sessions` sessions, `args.window` logins at a time.
fn open_all(args: &Args, secret: &[u8], sockets: &[UdpSocket]) -> io::Result<Vec<Option<Held>>> {
    let mut held: Vec<Option<Held>> = (0..args.sessions).map(|_| None).collect();
    let mut pending: Pending = HashMap::new();
    let mut next = 0usize;
    let mut done = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut out = BytesMut::new();
    let exp = token::unix_secs() + 24 * 3600;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_report = Instant::now();
    while done < args.sessions && Instant::now() < deadline {
        while pending.len() < args.window && next < args.sessions {
            let socket = next % sockets.len();
            let nonce = (next as u64) << 8 | 0x5a;
            send_login(args, secret, exp, next, socket, nonce, 0, sockets, &mut out)?;
            pending.insert((socket, nonce), (next, 0, Instant::now()));
            next += 1;
        }
        let mut idle = true;
        for (socket, s) in sockets.iter().enumerate() {
            for _ in 0..256 {
                let n = match s.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                };
                idle = false;
                let Some(d) = buf.get(..n) else { continue };
                let Ok(h) = udp::peek_header(d) else { continue };
                let key = (socket, h.packet_number);
                let Some(&(index, _, _)) = pending.get(&key) else {
                    continue;
                };
                match h.kind {
                    udp::DatagramType::Retry => {
                        if let Ok(cookie) = udp::open_retry(d, h.packet_number) {
                            pending.insert(key, (index, cookie, Instant::now()));
                            send_login(
                                args,
                                secret,
                                exp,
                                index,
                                socket,
                                h.packet_number,
                                cookie,
                                sockets,
                                &mut out,
                            )?;
                        }
                    }
                    udp::DatagramType::LoginReply => {
                        let Ok(r) = udp::open_login_reply(d, h.packet_number) else {
                            continue;
                        };
                        let Ok(f) = frame::decode(Bytes::copy_from_slice(r.frame)) else {
                            continue;
                        };
                        pending.remove(&key);
                        match f.body {
                            Some(Body::LoginResult(lr)) => {
                                let key = udp::SessionKey::from_slice(&lr.udp_session_key)
                                    .map_err(io::Error::other)?;
                                if let Some(slot) = held.get_mut(index) {
                                    *slot = Some(Held {
                                        socket,
                                        id: lr.udp_session_id,
                                        key,
                                        packet: 0,
                                    });
                                }
                                done += 1;
                            }
                            other => {
                                return Err(io::Error::other(format!(
                                    "login {index} refused: {other:?}"
                                )));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        // Logins unanswered for a second go again (a datagram was lost).
        let now = Instant::now();
        let late: Vec<_> = pending
            .iter()
            .filter(|(_, (_, _, at))| now.duration_since(*at) > Duration::from_secs(1))
            .map(|(&k, &(i, c, _))| (k, i, c))
            .collect();
        for ((socket, nonce), index, cookie) in late {
            pending.insert((socket, nonce), (index, cookie, now));
            send_login(
                args, secret, exp, index, socket, nonce, cookie, sockets, &mut out,
            )?;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!("... {done} sessions open");
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(held)
}

#[allow(clippy::too_many_arguments)]
fn send_login(
    args: &Args,
    secret: &[u8],
    exp: u64,
    index: usize,
    socket: usize,
    nonce: u64,
    cookie: u64,
    sockets: &[UdpSocket],
    out: &mut BytesMut,
) -> io::Result<()> {
    let login = pb::Frame {
        request_id: 1,
        body: Some(Body::Login(pb::Login {
            protocol_version: 1,
            token: token::mint(secret, &format!("{}{index}", args.prefix), "d", exp),
            client_name: "udpidle".into(),
        })),
    };
    out.clear();
    udp::seal_login(cookie, nonce, &login, udp::MIN_LOGIN_DATAGRAM_BYTES, out)
        .map_err(io::Error::other)?;
    send(&sockets[socket], out)
}

/// Sends, waiting briefly while the socket's buffer is full.
fn send(socket: &UdpSocket, datagram: &[u8]) -> io::Result<()> {
    loop {
        match socket.send(datagram) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(100))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Pings every session once per interval for `hold_secs`, draining answers; returns (pings,
/// pongs, broker CPU ticks).
fn hold(
    args: &Args,
    mut held: Vec<Option<Held>>,
    sockets: &[UdpSocket],
) -> io::Result<(u64, u64, u64)> {
    let cpu_before = cpu_ticks(args.pid)?;
    let start = Instant::now();
    let end = start + Duration::from_secs(args.hold_secs);
    let interval = Duration::from_millis(args.ping_interval_ms.max(1));
    let count = held.len().max(1);
    let (mut pings, mut pongs) = (0u64, 0u64);
    let mut next = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut out = BytesMut::new();
    while Instant::now() < end {
        // Pings due by now, spread evenly over the interval.
        let elapsed = start.elapsed().as_secs_f64();
        let due = (elapsed / interval.as_secs_f64() * count as f64) as usize;
        while next < due {
            if let Some(Some(h)) = held.get_mut(next % count) {
                let ping = pb::Frame {
                    request_id: 7,
                    body: Some(Body::Ping(pb::Ping { nonce: h.packet })),
                };
                out.clear();
                udp::seal(
                    &h.key,
                    udp::Direction::ClientToServer,
                    h.id,
                    h.packet,
                    [&ping],
                    udp::DEFAULT_MAX_DATAGRAM_BYTES,
                    &mut out,
                )
                .map_err(io::Error::other)?;
                h.packet += 1;
                send(&sockets[h.socket], &out)?;
                pings += 1;
            }
            next += 1;
        }
        let mut idle = true;
        for s in sockets {
            loop {
                match s.recv(&mut buf) {
                    Ok(_) => {
                        pongs += 1;
                        idle = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok((pings, pongs, cpu_ticks(args.pid)? - cpu_before))
}

/// The process's resident memory, KiB.
fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS"))
}

/// The process's user + system CPU time, in clock ticks.
fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("bad stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat; here 0-based after the state field.
    Ok(field(11) + field(12))
}

fn ticks_secs(ticks: u64) -> f64 {
    // Linux's USER_HZ is 100 on every mainstream configuration.
    ticks as f64 / 100.0
}
