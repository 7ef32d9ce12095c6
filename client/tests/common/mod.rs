//! Helpers of the library's tests against the real broker: clients over any connector, event
//! waits, and a lossy UDP proxy.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parley_client::backoff::BackoffConfig;
use parley_client::{Client, ClientConfig, Connector, Event, SessionConfig};

/// How long a test waits for what it expects before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A client of `user` with fast reconnects and a short silence limit.
pub fn client(connector: impl Connector, token: String) -> Client {
    let config = ClientConfig {
        session: SessionConfig {
            dead_after: Some(Duration::from_secs(2)),
            ..SessionConfig::default()
        },
        backoff: BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        ..ClientConfig::default()
    };
    Client::start(connector, Box::new(move || Ok(token.clone())), config)
}

/// Takes events until `done` says so (or panics after [`PATIENCE`]); returns them.
pub fn until(c: &Client, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    while !done(&seen) {
        assert!(Instant::now() < deadline, "gave up waiting; saw {seen:#?}");
        if let Some(e) = c.next_event(Duration::from_millis(50)) {
            seen.push(e);
        }
    }
    seen
}

/// Takes what events come within `quiet` of each other.
pub fn drain(c: &Client, quiet: Duration) -> Vec<Event> {
    std::iter::from_fn(|| c.next_event(quiet)).collect()
}

/// Waits for the first `Synced`.
pub fn synced(c: &Client) -> Vec<Event> {
    until(c, |e| e.iter().any(|e| matches!(e, Event::Synced)))
}

/// The (seq, body) of the messages shown.
pub fn bodies(events: &[Event]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.seq, String::from_utf8_lossy(&m.body).into_owned())),
            _ => None,
        })
        .collect()
}

/// The (seq, body) of the messages from `user` shown.
pub fn bodies_from(events: &[Event], user: &str) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.from_user == user => {
                Some((m.seq, String::from_utf8_lossy(&m.body).into_owned()))
            }
            _ => None,
        })
        .collect()
}

/// The client message ids acked, in order.
pub fn acked(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Acked { client_msg_id, .. } => Some(*client_msg_id),
            _ => None,
        })
        .collect()
}

/// A UDP proxy on loopback between clients and a broker that drops every `drop_every`-th
/// datagram and sends every `dup_every`-th twice, each way (0: never). Each client address
/// gets its own upstream socket. Its threads stop when it is dropped.
pub struct LossyProxy {
    /// Where clients send.
    addr: SocketAddr,
    /// Tells the threads to stop.
    stop: Arc<AtomicBool>,
    /// Datagrams dropped so far, both ways.
    dropped: Arc<AtomicU64>,
    /// The thread.
    thread: Option<thread::JoinHandle<()>>,
}

impl LossyProxy {
    /// A proxy in front of `broker`.
    pub fn start(broker: SocketAddr, drop_every: u64, dup_every: u64) -> LossyProxy {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind the proxy");
        front.set_nonblocking(true).expect("nonblocking");
        let addr = front.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (stop2, dropped2) = (Arc::clone(&stop), Arc::clone(&dropped));
        let thread = thread::spawn(move || {
            let mut ups: HashMap<SocketAddr, UdpSocket> = HashMap::new();
            let (mut up_count, mut down_count) = (0u64, 0u64);
            let mut buf = vec![0u8; 65_536];
            let hit = |n: u64, every: u64| every != 0 && n.is_multiple_of(every);
            while !stop2.load(Ordering::SeqCst) {
                let mut idle = true;
                // Client to broker.
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    idle = false;
                    let up = ups.entry(from).or_insert_with(|| {
                        let s = UdpSocket::bind("127.0.0.1:0").expect("bind an upstream socket");
                        s.set_nonblocking(true).expect("nonblocking");
                        s.connect(broker).expect("connect upstream");
                        s
                    });
                    up_count += 1;
                    if hit(up_count, drop_every) {
                        dropped2.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let copies = if hit(up_count, dup_every) { 2 } else { 1 };
                    for _ in 0..copies {
                        let _ = up.send(&buf[..n]);
                    }
                }
                // Broker to clients.
                for (client, up) in &ups {
                    while let Ok(n) = up.recv(&mut buf) {
                        idle = false;
                        down_count += 1;
                        if hit(down_count, drop_every) {
                            dropped2.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let copies = if hit(down_count, dup_every) { 2 } else { 1 };
                        for _ in 0..copies {
                            let _ = front.send_to(&buf[..n], client);
                        }
                    }
                }
                if idle {
                    thread::sleep(Duration::from_micros(500));
                }
            }
        });
        LossyProxy {
            addr,
            stop,
            dropped,
            thread: Some(thread),
        }
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams dropped so far, both ways.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
