//! `imload presence`: users subscribed to their contacts, some flapping; the broker's CPU
//! for presence over an idle baseline, and the pushes the subscribers get.

use super::net::{Ev, Net};
use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No connection (before the first, or after an unexpected close).
    Idle,
    /// Connection opened, Login sent.
    LoggingIn,
    /// Logged in, not subscribed yet (initial set-up only).
    LoggedIn,
    /// SUBSCRIBE sent, answer awaited.
    Subscribing,
    Ready,
    /// Flapped: disconnected, or AWAY, until its return.
    Down,
}

#[derive(Debug)]
struct User {
    slot: Option<usize>,
    phase: Phase,
    /// Request id of the SUBSCRIBE awaited.
    rid: u64,
    /// When the reconnect (or SUBSCRIBE) started.
    since: Instant,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    push_frames: u64,
    push_entries: u64,
    errors: u64,
    unexpected_closes: u64,
    flaps: u64,
}

struct Bench<'a> {
    o: &'a PresenceOpts,
    secret: Vec<u8>,
    net: Net,
    users: Vec<User>,
    stride: usize,
    next_rid: u64,
    /// A reconnected user subscribes as soon as it is logged in.
    auto_subscribe: bool,
    /// Flapped users coming back: (when, user), in order.
    returns: VecDeque<(Instant, usize)>,
    mode: FlapMode,
    pings_sent: u64,
    ping_epoch: Instant,
    counts: Counts,
    /// Pushed entries naming each user.
    pushed_about: Vec<u32>,
    /// Reconnect (connect, login, subscribe answered) times, µs.
    reconnect_us: Vec<u64>,
    /// SUBSCRIBE answers still awaited, in the initial set-up.
    pending: usize,
    printed: u32,
}

/// Broker CPU time in seconds: (user, system).
fn cpu_secs(pid: u32) -> io::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| other("odd /proc stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: field 3 (state) is f[0], utime (14) f[11], stime (15) f[12].
    let ticks = |i: usize| -> io::Result<f64> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| other("odd /proc stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? / hz, ticks(12)? / hz))
}

fn name(i: usize) -> String {
    format!("u{i:05}")
}

fn index(name: &str) -> Option<usize> {
    name.strip_prefix('u')?.parse().ok()
}

/// The contacts of user `i`: `i + k*stride` for k in 1..=c (distinct when c*stride < n).
fn contacts(i: usize, n: usize, c: usize, stride: usize) -> impl Iterator<Item = usize> {
    (1..=c).map(move |k| (i + k * stride) % n)
}

/// `k` users none of whom watches another (so their returns cause no catch-up pushes).
fn independent(n: usize, c: usize, stride: usize, k: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::new();
    let mut i = 0;
    while chosen.len() < k && i < n {
        let clash = chosen.iter().any(|&j| {
            contacts(i, n, c, stride).any(|x| x == j) || contacts(j, n, c, stride).any(|x| x == i)
        });
        if !clash {
            chosen.push(i);
        }
        i += 37;
    }
    chosen
}

impl Bench<'_> {
    fn rid(&mut self) -> u64 {
        self.next_rid += 1;
        self.next_rid
    }

    fn subscribe(&mut self, u: usize) {
        let Some(slot) = self.users[u].slot else {
            return;
        };
        let rid = self.rid();
        let list = contacts(u, self.o.users, self.o.contacts, self.stride)
            .map(name)
            .collect();
        self.net.send(
            slot,
            &frame(
                rid,
                Body::PresenceRequest(pb::PresenceRequest {
                    action: pb::PresenceAction::Subscribe as i32,
                    users: list,
                    ..Default::default()
                }),
            ),
        );
        self.users[u].rid = rid;
        self.users[u].phase = Phase::Subscribing;
    }

    fn set(&mut self, u: usize, status: pb::PresenceStatus) {
        let Some(slot) = self.users[u].slot else {
            return;
        };
        let rid = self.rid();
        self.net.send(
            slot,
            &frame(
                rid,
                Body::PresenceRequest(pb::PresenceRequest {
                    action: pb::PresenceAction::Set as i32,
                    status: status as i32,
                    ..Default::default()
                }),
            ),
        );
    }

    fn connect(&mut self, u: usize) -> io::Result<()> {
        let f = login(&self.secret, &name(u));
        let slot = self.net.connect(u, &f)?;
        let user = &mut self.users[u];
        user.slot = Some(slot);
        user.phase = Phase::LoggingIn;
        user.since = Instant::now();
        Ok(())
    }

    fn flap(&mut self, u: usize, down: Duration) {
        let now = Instant::now();
        match self.mode {
            FlapMode::Reconnect => {
                if let Some(slot) = self.users[u].slot.take() {
                    self.net.close(slot);
                }
            }
            FlapMode::Away => self.set(u, pb::PresenceStatus::Away),
        }
        self.users[u].phase = Phase::Down;
        self.returns.push_back((now + down, u));
        self.counts.flaps += 1;
    }

    fn come_back(&mut self, u: usize) -> io::Result<()> {
        match self.mode {
            FlapMode::Reconnect => self.connect(u),
            FlapMode::Away => {
                self.set(u, pb::PresenceStatus::Online);
                self.users[u].phase = Phase::Ready;
                Ok(())
            }
        }
    }

    fn note(&mut self, what: String) {
        if self.printed < 10 {
            eprintln!("imload: {what}");
            self.printed += 1;
        }
    }

    fn on_frame(&mut self, u: usize, f: pb::Frame) {
        let rid = f.request_id;
        match f.body {
            Some(Body::LoginResult(_)) if self.users[u].phase == Phase::LoggingIn => {
                if self.auto_subscribe {
                    self.subscribe(u);
                } else {
                    self.users[u].phase = Phase::LoggedIn;
                }
            }
            Some(Body::PresenceUpdate(p)) if rid == 0 => {
                self.counts.push_frames += 1;
                self.counts.push_entries += p.users.len() as u64;
                for e in &p.users {
                    if let Some(i) = index(&e.user).filter(|&i| i < self.pushed_about.len()) {
                        self.pushed_about[i] += 1;
                    }
                }
            }
            Some(Body::PresenceUpdate(p)) => {
                let user = &mut self.users[u];
                if user.phase == Phase::Subscribing && rid == user.rid && !p.more {
                    user.phase = Phase::Ready;
                    let us = user.since.elapsed().as_micros() as u64;
                    if self.auto_subscribe {
                        self.reconnect_us.push(us);
                    } else {
                        self.pending = self.pending.saturating_sub(1);
                    }
                }
            }
            Some(Body::Ping(p)) => {
                if let Some(slot) = self.users[u].slot {
                    let pong = Body::Pong(pb::Pong {
                        nonce: p.nonce,
                        time: 0,
                    });
                    self.net.send(slot, &frame(rid, pong));
                }
            }
            Some(Body::Error(e)) => {
                self.counts.errors += 1;
                self.note(format!("error for {}: {e:?}", name(u)));
            }
            _ => {}
        }
    }

    /// One turn: due returns, pings, socket events (waiting at most `wait`).
    fn pump(&mut self, wait: Duration) -> io::Result<()> {
        let now = Instant::now();
        while let Some(&(at, u)) = self.returns.front() {
            if at > now {
                break;
            }
            self.returns.pop_front();
            self.come_back(u)?;
        }
        // Every connection pings once per `ping_ms`, spread evenly.
        let n = self.o.users as u64;
        let due = now.duration_since(self.ping_epoch).as_millis() as u64 * n / self.o.ping_ms;
        while self.pings_sent < due {
            let u = (self.pings_sent % n) as usize;
            self.pings_sent += 1;
            if let (Some(slot), Phase::Ready | Phase::Down) =
                (self.users[u].slot, self.users[u].phase)
            {
                let ping = Body::Ping(pb::Ping {
                    nonce: self.pings_sent,
                });
                self.net.send(slot, &frame(0, ping));
            }
        }
        let wait = match self.returns.front() {
            Some(&(at, _)) => wait.min(at.saturating_duration_since(now)),
            None => wait,
        };
        self.net.turn(wait)?;
        for (u, ev) in std::mem::take(&mut self.net.out) {
            match ev {
                Ev::Frame(f) => self.on_frame(u, f),
                Ev::Closed(why) => {
                    self.counts.unexpected_closes += 1;
                    self.note(format!("{} closed: {why}", name(u)));
                    let user = &mut self.users[u];
                    user.slot = None;
                    if user.phase == Phase::Subscribing || user.phase == Phase::LoggingIn {
                        self.pending = self.pending.saturating_sub(1);
                    }
                    // Comes back a second later, as a client would.
                    user.phase = Phase::Down;
                    self.returns
                        .push_back((Instant::now() + Duration::from_secs(1), u));
                }
            }
        }
        Ok(())
    }

    fn pump_for(&mut self, d: Duration) -> io::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump(
                end.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(5)),
            )?;
        }
        Ok(())
    }

    fn count(&self, p: Phase) -> usize {
        self.users.iter().filter(|u| u.phase == p).count()
    }

    /// Waits (bounded) until every user is Ready again.
    fn settle(&mut self, extra: Duration) -> io::Result<()> {
        let end = Instant::now() + Duration::from_secs(60);
        while (self.count(Phase::Ready) < self.o.users || !self.returns.is_empty())
            && Instant::now() < end
        {
            self.pump(Duration::from_millis(5))?;
        }
        self.pump_for(extra)
    }

    /// Runs a phase of `phase_secs`, flapping (`down` Some) or idle, lets it settle, and
    /// prints its RESULT line: rates over the phase, pushes per flap including the settling.
    fn phase(&mut self, label: &str, down: Option<Duration>) -> io::Result<()> {
        let o = self.o;
        self.counts = Counts::default();
        self.reconnect_us.clear();
        let mut order: Vec<usize> = (0..o.users).collect();
        shuffle(&mut order, 0x9e37_79b9_7f4a_7c15 ^ label.len() as u64);
        let mut cursor = 0;
        let interval = Duration::from_secs_f64(1.0 / (o.flap_rate * o.users as f64));
        let cpu0 = cpu_secs(o.broker_pid)?;
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(o.phase_secs);
        let mut next = t0;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if let Some(down) = down {
                while next <= now {
                    next += interval;
                    // The next user in a shuffled order that is connected and settled.
                    for _ in 0..o.users {
                        let u = order[cursor % o.users];
                        cursor += 1;
                        if self.users[u].phase == Phase::Ready {
                            self.flap(u, down);
                            break;
                        }
                    }
                }
            }
            let wait = if down.is_some() { next } else { end }.min(end);
            self.pump(
                wait.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(10)),
            )?;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu1 = cpu_secs(o.broker_pid)?;
        let (user, sys) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
        let c = self.counts.clone();
        // The last flaps' pushes come after the phase: count them for the per-flap figure.
        self.settle(Duration::from_millis(2 * o.coalesce_ms + 500))?;
        let all_entries = self.counts.push_entries;
        let mut lat = std::mem::take(&mut self.reconnect_us);
        lat.sort_unstable();
        let per_flap = if c.flaps == 0 {
            0.0
        } else {
            all_entries as f64 / (c.flaps as f64 * o.contacts as f64)
        };
        println!(
            "RESULT presence phase={label} secs={elapsed:.1} cpu_pct={:.2} user_pct={:.2} sys_pct={:.2} flaps_per_s={:.1} \
             push_frames_per_s={:.0} push_entries_per_s={:.0} entries_per_flap_per_watcher={per_flap:.3} \
             reconnect_p50_ms={:.2} reconnect_p99_ms={:.2} errors={} unexpected_closes={}",
            100.0 * (user + sys) / elapsed,
            100.0 * user / elapsed,
            100.0 * sys / elapsed,
            c.flaps as f64 / elapsed,
            c.push_frames as f64 / elapsed,
            c.push_entries as f64 / elapsed,
            quantile(&lat, 0.5) as f64 / 1000.0,
            quantile(&lat, 0.99) as f64 / 1000.0,
            c.errors,
            c.unexpected_closes,
        );
        Ok(())
    }

    /// Drops `users` at once, brings them back after `down`, and counts the pushes naming
    /// them until two windows after their return.
    fn check(&mut self, users: &[usize], down: Duration) -> io::Result<()> {
        self.mode = FlapMode::Reconnect;
        for &u in users {
            self.pushed_about[u] = 0;
        }
        let frames0 = self.counts.push_frames;
        for &u in users {
            self.flap(u, down);
        }
        let coalesce = Duration::from_millis(self.o.coalesce_ms);
        self.pump_for(down + 2 * coalesce + Duration::from_millis(700))?;
        self.settle(Duration::ZERO)?;
        let entries: u64 = users.iter().map(|&u| u64::from(self.pushed_about[u])).sum();
        let watchers = self.o.contacts as u64 * users.len() as u64;
        let expect = if down.as_millis() < u128::from(self.o.coalesce_ms) {
            0
        } else {
            2 * watchers
        };
        println!(
            "RESULT presence phase=coalesce-{} users={} watchers={watchers} push_entries={entries} \
             push_frames={} expected_entries={expect}",
            down.as_millis(),
            users.len(),
            self.counts.push_frames - frames0,
        );
        Ok(())
    }
}

/// A fixed-seed Fisher-Yates shuffle (xorshift64*).
fn shuffle(v: &mut [usize], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        let r = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
        v.swap(i, (r % (i as u64 + 1)) as usize);
    }
}

pub(crate) fn run(o: &PresenceOpts) -> io::Result<()> {
    let stride = o.users / (o.contacts + 1);
    if stride == 0 || o.contacts * stride >= o.users {
        return Err(other("need users > contacts"));
    }
    let now = Instant::now();
    let mut b = Bench {
        o,
        secret: read_secret(&o.common)?,
        net: Net::new(o.common.addr, o.sources)?,
        users: (0..o.users)
            .map(|_| User {
                slot: None,
                phase: Phase::Idle,
                rid: 0,
                since: now,
            })
            .collect(),
        stride,
        next_rid: 1,
        auto_subscribe: false,
        returns: VecDeque::new(),
        mode: FlapMode::Reconnect,
        pings_sent: 0,
        ping_epoch: now,
        counts: Counts::default(),
        pushed_about: vec![0; o.users],
        reconnect_us: Vec::new(),
        pending: 0,
        printed: 0,
    };
    // Set-up: everyone connects and logs in (at most 500 under way), then subscribes.
    let t = Instant::now();
    for u in 0..o.users {
        while b.count(Phase::LoggingIn) >= 500 {
            b.pump(Duration::from_millis(5))?;
        }
        b.connect(u)?;
    }
    let limit = Instant::now() + Duration::from_secs(120);
    while b.count(Phase::LoggedIn) < o.users && Instant::now() < limit {
        b.pump(Duration::from_millis(5))?;
    }
    let logged_in = b.count(Phase::LoggedIn);
    let login_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for u in 0..o.users {
        while b.pending >= 1000 {
            b.pump(Duration::from_millis(5))?;
        }
        if b.users[u].phase == Phase::LoggedIn {
            b.users[u].since = Instant::now();
            b.pending += 1;
            b.subscribe(u);
        }
    }
    let limit = Instant::now() + Duration::from_secs(120);
    while b.pending > 0 && Instant::now() < limit {
        b.pump(Duration::from_millis(5))?;
    }
    println!(
        "RESULT presence phase=setup users={} logged_in={logged_in} login_secs={login_secs:.2} \
         subscriptions={} subscribe_secs={:.2} ready={}",
        o.users,
        o.users * o.contacts,
        t.elapsed().as_secs_f64(),
        b.count(Phase::Ready),
    );
    if b.count(Phase::Ready) < o.users {
        return Err(other("not every user got ready"));
    }
    b.auto_subscribe = true;
    let coalesce = Duration::from_millis(o.coalesce_ms);
    b.settle(2 * coalesce)?;
    b.phase("idle", None)?;
    for spec in &o.flaps {
        let (mode, ms) = spec
            .split_once(':')
            .ok_or_else(|| other(format!("bad --flaps entry {spec}")))?;
        b.mode = FlapMode::from_str(mode, true).map_err(other)?;
        let ms: u64 = ms
            .parse()
            .map_err(|_| other(format!("bad --flaps entry {spec}")))?;
        b.phase(
            &format!("flap-{mode}-{ms}"),
            Some(Duration::from_millis(ms)),
        )?;
    }
    let chosen = independent(o.users, o.contacts, stride, o.check_users);
    b.check(&chosen, Duration::from_millis(200))?;
    b.settle(2 * coalesce)?;
    b.check(&chosen, coalesce + Duration::from_millis(500))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacts_are_distinct_and_each_user_has_as_many_watchers() {
        let (n, c) = (1000, 9);
        let stride = n / (c + 1);
        let mut watchers = vec![0; n];
        for i in 0..n {
            let mut cs: Vec<usize> = contacts(i, n, c, stride).collect();
            cs.sort_unstable();
            cs.dedup();
            assert_eq!(cs.len(), c);
            assert!(!cs.contains(&i));
            for x in cs {
                watchers[x] += 1;
            }
        }
        assert!(watchers.iter().all(|&w| w == c));
    }

    #[test]
    fn independent_users_do_not_watch_each_other() {
        let (n, c) = (10_000, 100);
        let stride = n / (c + 1);
        let s = independent(n, c, stride, 50);
        assert_eq!(s.len(), 50);
        for &i in &s {
            assert!(contacts(i, n, c, stride).all(|x| !s.contains(&x)));
        }
    }
}
