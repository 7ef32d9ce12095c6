//! `imload routes`: the cluster's presence index seen from another node.
//!
//! * **Visibility** (`--samples` logins, one at a time): a client logs in on node A while a
//!   watcher asks node B's admin API (`GET /v1/cluster/routes?user=`) in a loop; the time from
//!   sending the `Login` to B listing the device is one sample. Then the client hangs up and the
//!   time until B no longer lists it is another (a withdrawal).
//! * **Logins under load** (`--logins`, `--window` in flight): the time from connect to
//!   `LoginResult`. The broker answers a login only once its route is in Redis, so this bounds
//!   when any node can see the device. Redis's own `INFO commandstats` before and after give
//!   the Redis calls per login (each login also withdraws its route when it hangs up).

use std::net::SocketAddr;

use super::net::{Ev, Net};
use super::*;

/// Options of `imload routes`.
#[derive(Debug, Args)]
pub(crate) struct RoutesOpts {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Node B's admin address (the watcher asks it).
    #[arg(long)]
    pub(crate) watch_admin: SocketAddr,
    /// Node B's admin token.
    #[arg(long)]
    pub(crate) admin_token: String,
    /// The Redis both nodes use (`host:port`), for its command counts.
    #[arg(long)]
    pub(crate) redis: SocketAddr,
    /// Logins timed one at a time for visibility.
    #[arg(long, default_value_t = 300)]
    pub(crate) samples: usize,
    /// Logins under load.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) logins: usize,
    /// Logins in flight under load.
    #[arg(long, default_value_t = 500)]
    pub(crate) window: usize,
    /// Source addresses 127.0.1.1..=N for the load's connections.
    #[arg(long, default_value_t = 4)]
    pub(crate) sources: u8,
}

pub(crate) fn run(o: &RoutesOpts) -> io::Result<()> {
    let secret = read_secret(&o.common)?;
    let (mut seen, mut gone) = (Vec::new(), Vec::new());
    for i in 0..o.samples {
        let user = format!("vis{i}");
        let (s, g) = one_sample(o, &secret, &user)?;
        seen.push(s);
        gone.push(g);
    }
    seen.sort_unstable();
    gone.sort_unstable();
    println!(
        "RESULT scenario=visibility samples={} seen_p50_us={} seen_p99_us={} seen_max_us={} gone_p50_us={} gone_p99_us={} gone_max_us={}",
        seen.len(),
        quantile(&seen, 0.5),
        quantile(&seen, 0.99),
        seen.last().copied().unwrap_or(0),
        quantile(&gone, 0.5),
        quantile(&gone, 0.99),
        gone.last().copied().unwrap_or(0),
    );
    let calls_before = redis_script_calls(o.redis)?;
    let started = Instant::now();
    let mut latencies = logins_under_load(o, &secret)?;
    let took = started.elapsed();
    // Let the withdrawals of the last logins reach Redis before counting.
    std::thread::sleep(Duration::from_millis(500));
    let calls = redis_script_calls(o.redis)?.saturating_sub(calls_before);
    latencies.sort_unstable();
    println!(
        "RESULT scenario=logins logins={} secs={:.2} per_sec={:.0} login_p50_us={} login_p99_us={} login_max_us={} redis_calls={} redis_calls_per_login={:.3}",
        latencies.len(),
        took.as_secs_f64(),
        latencies.len() as f64 / took.as_secs_f64(),
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0),
        calls,
        calls as f64 / latencies.len().max(1) as f64,
    );
    Ok(())
}

/// One login on node A watched from node B: (µs until B lists it, µs after the hang-up until B
/// no longer does).
fn one_sample(o: &RoutesOpts, secret: &[u8], user: &str) -> io::Result<(u64, u64)> {
    let mut client = StdStream::connect(o.common.addr)?;
    client.set_nodelay(true)?;
    let mut bytes = BytesMut::new();
    FrameCodec::default()
        .encode(&login_as(secret, user), &mut bytes)
        .map_err(|e| other(e.to_string()))?;
    let t0 = Instant::now();
    client.write_all(&bytes)?;
    while !listed(o, user)? {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(other(format!("{user} not listed on node B within 10 s")));
        }
    }
    let seen = t0.elapsed().as_micros() as u64;
    // The LoginResult must have come (the route is written before it is sent).
    let mut buf = [0u8; 4096];
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let n = client.read(&mut buf)?;
    if n == 0 {
        return Err(other(format!("{user}: the broker closed the connection")));
    }
    drop(client);
    let t1 = Instant::now();
    while listed(o, user)? {
        if t1.elapsed() > Duration::from_secs(10) {
            return Err(other(format!("{user} still listed 10 s after hanging up")));
        }
    }
    Ok((seen, t1.elapsed().as_micros() as u64))
}

/// Whether node B lists a route of `user`.
fn listed(o: &RoutesOpts, user: &str) -> io::Result<bool> {
    let mut s = StdStream::connect(o.watch_admin)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /v1/cluster/routes?user={user} HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        o.admin_token
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200") {
        return Err(other(format!(
            "node B answered {:?}",
            answer.lines().next()
        )));
    }
    Ok(answer.contains("\"device\""))
}

/// `logins` logins, `window` in flight, each closed once answered: their latencies, µs.
fn logins_under_load(o: &RoutesOpts, secret: &[u8]) -> io::Result<Vec<u64>> {
    let mut net = Net::new(o.common.addr, o.sources)?;
    let mut started: Vec<Option<(Instant, usize)>> = vec![None; o.logins];
    let mut latencies = Vec::with_capacity(o.logins);
    let (mut next, mut in_flight) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(o.common.deadline_secs);
    while latencies.len() < o.logins {
        while in_flight < o.window && next < o.logins {
            let f = login_as(secret, &format!("load{next}"));
            let slot = net.connect(next, &f)?;
            started[next] = Some((Instant::now(), slot));
            next += 1;
            in_flight += 1;
        }
        net.turn(Duration::from_millis(10))?;
        for (user, ev) in std::mem::take(&mut net.out) {
            let Some((t0, slot)) = started.get_mut(user).and_then(Option::take) else {
                continue;
            };
            match ev {
                Ev::Frame(f) if matches!(f.body, Some(Body::LoginResult(_))) => {
                    latencies.push(t0.elapsed().as_micros() as u64);
                    net.close(slot);
                    in_flight -= 1;
                }
                Ev::Frame(f) => {
                    return Err(other(format!("load{user}: answered {:?}", f.body)));
                }
                Ev::Closed(why) => return Err(other(format!("load{user}: closed: {why}"))),
            }
        }
        if Instant::now() > deadline {
            return Err(other("logins under load did not finish"));
        }
    }
    Ok(latencies)
}

/// The `Login` frame of `user` on device `d`.
fn login_as(secret: &[u8], user: &str) -> pb::Frame {
    login(secret, user)
}

/// Script runs Redis has served (`EVAL` + `EVALSHA` calls in `INFO commandstats`).
fn redis_script_calls(addr: SocketAddr) -> io::Result<u64> {
    let mut s = StdStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"INFO commandstats\r\n")?;
    let mut text = String::new();
    let mut buf = [0u8; 65536];
    // A bulk string: `$len\r\n` then the text; read until it is complete.
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some((head, rest)) = text.split_once("\r\n")
            && let Some(len) = head.strip_prefix('$').and_then(|l| l.parse::<usize>().ok())
            && rest.len() >= len
        {
            break;
        }
    }
    let mut calls = 0;
    for line in text.lines() {
        for cmd in ["cmdstat_eval:", "cmdstat_evalsha:"] {
            if let Some(rest) = line.strip_prefix(cmd)
                && let Some(n) = rest
                    .strip_prefix("calls=")
                    .and_then(|r| r.split(',').next())
                    .and_then(|n| n.parse::<u64>().ok())
            {
                calls += n;
            }
        }
    }
    Ok(calls)
}
