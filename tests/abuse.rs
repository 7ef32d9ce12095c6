//! The abuse suite: what a hostile or broken client can make the broker spend, and what it can
//! take from everyone else. Each test names one promise and drives the real broker binary over
//! real sockets the way an attacker would: clients that never read, floods of malformed frames or
//! requests, thousands of half-sent logins and upgrades, oversized length prefixes, garbage storms,
//! peers that keep writing after a fatal error, more connections than the broker has file
//! descriptors, anonymous connections that try to fill the log or every connection slot, users
//! churning through logins, expired and over-long tokens, weak secrets and foreign browser
//! origins.
//!
//! What the tests assert is bounded cost and clear refusals: the broker's memory (RSS, from
//! `/proc`) stays within a stated bound, refused connections get the documented fatal error and
//! are closed, the log does not grow one line per anonymous client, and a *healthy pair* of
//! ordinary clients talking beside the abuse (one message every 10 ms, see
//! [`parley_tests::hostile::HealthyPair`]) loses nothing. The only time bounds asserted are
//! generous ones on closes and refusals ("within N seconds"); latencies and memory figures are
//! printed (`cargo test --test abuse -- --nocapture`) for the benchmark notes, not asserted.
//!
//! The tests run one at a time (they take a lock): several of them hold thousands of sockets or
//! measure the broker's memory, and on a small machine they would disturb each other's figures
//! and share the test process's file descriptors (each connection costs one descriptor here and
//! one in the broker).
//!
//! Every test also relies on the harness's check that the broker never panicked.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_tests::client::{code_name, fresh_client_msg_id};
use parley_tests::hostile::{
    self, Answer, HealthyPair, Rng, await_end, connect_raw, connect_raw_with, describe_answer,
    http_status, http_status_line, is_too_many_connections, junk_frames, loopback, mib,
    peak_rss_during, peer_closed, print_pair_figures, raw_login, read_answer, tcp_bytes, varint,
    ws_upgrade_request,
};
use parley_tests::token::{self, unix_now};
use parley_tests::transport::{Tcp, Transport};
use parley_tests::{Broker, ErrorCode, TIMEOUT, assert_pair_still_talks, direct, numbered_body};

/// The tests of this file run one at a time (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The default of `limits.max_errors`.
const DEFAULT_MAX_ERRORS: usize = 32;

/// Retransmits far beyond the tests' length: a client that does not read is not also a
/// retransmit case.
const NO_RETRANSMIT: [&str; 2] = [
    "timeouts.retransmit_initial_ms=30000",
    "timeouts.retransmit_max_ms=30000",
];

// ---------------------------------------------------------------------------------------------
// Memory a client can pin
// ---------------------------------------------------------------------------------------------

#[test]
fn a_client_that_stops_reading_costs_at_most_its_outbound_budget() {
    const TEST: &str = "stops-reading";
    const BUDGET: u64 = 1 << 20;
    /// What the broker may grow by beyond the budget (allocator slack, buffers, the pair).
    const SLACK_KIB: u64 = 8 << 10;
    const REQUESTS: usize = 100_000;
    let _serial = serial();
    let broker = Broker::start(&[
        "storage.durability=never",
        &format!("limits.max_outbound_bytes={BUDGET}"),
        // Not closed as a slow consumer during the measurement: it must be held, not dropped.
        "timeouts.write_stall_ms=600000",
        NO_RETRANSMIT[0],
        NO_RETRANSMIT[1],
    ]);
    let mut pair = HealthyPair::connect(&broker);
    let unloaded = pair.measure(Duration::from_secs(1));

    // A conversation of 20 messages of 1 KiB, so that each history page is some 20 KiB.
    let peer = "hoard-peer";
    let mut author = broker.connect("hoarder", "laptop");
    author.send_many(peer, (1..=20).map(|i| numbered_body(i, 1024)), 20);
    let page = author.history(&direct(peer), 0, None, 20);
    assert_eq!(
        page.messages.len(),
        20,
        "the history page holds all 20 messages"
    );
    let page_bytes: usize = page.messages.iter().map(|m| m.body.len()).sum();

    // The hoarder's other device: logs in, then only writes.
    let stream = connect_raw_with(broker.tcp_addr(), None, Some(4096), TIMEOUT)
        .expect("connect the hoarder");
    let mut conn = Tcp::from_stream(stream.try_clone().expect("clone the hoarder's socket"));
    match raw_login(&mut conn, &broker.token("hoarder", "phone")) {
        Answer::LoggedIn(_) => {}
        other => panic!("the hoarder could not log in: {}", describe_answer(&other)),
    }
    let request = move |i: usize| pb::Frame {
        request_id: i as u64 + 10,
        body: Some(Body::HistoryRequest(pb::HistoryRequest {
            conversation: Some(direct(peer)),
            before_seq: 0,
            after_seq: None,
            limit: 20,
        })),
    };

    let baseline = broker.rss_kib();
    let bound = baseline + BUDGET / 1024 + SLACK_KIB;
    let running = pair.start();
    let ((written, stopped_early), peak) = peak_rss_during(&broker, || {
        let writer = thread::spawn(move || {
            let mut stream = stream;
            stream
                .set_write_timeout(Some(Duration::from_secs(3)))
                .expect("set the hoarder's write timeout");
            let mut written = 0;
            for batch in (0..REQUESTS).collect::<Vec<_>>().chunks(1000) {
                let bytes: Vec<u8> = batch.iter().flat_map(|&i| tcp_bytes(&request(i))).collect();
                if stream.write_all(&bytes).is_err() {
                    break;
                }
                written += batch.len();
            }
            // Handed back (still never read), so that it stays open through the measurement.
            (written, stream)
        });
        // Watch until the writer is done (all written, or stalled for its write timeout) and two
        // seconds more; stop at once if the broker is already far past the bound.
        let start = Instant::now();
        let mut done_at = None;
        let mut stopped_early = false;
        while start.elapsed() < Duration::from_secs(12) {
            if done_at.is_none() && writer.is_finished() {
                done_at = Some(Instant::now());
            }
            if done_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) {
                break;
            }
            if broker.rss_kib() > bound + (64 << 10) {
                stopped_early = true;
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        // The writer ends within its write timeout once the broker stops reading.
        let (written, stream) = writer.join().expect("the writer does not panic");
        drop(stream);
        (written, stopped_early)
    });
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "[{TEST}] {written} of {REQUESTS} HistoryRequests written (each answer ~{page_bytes} \
         bytes of bodies); broker RSS baseline {}, peak {}, growth {} (bound: budget {} + slack {})",
        mib(baseline),
        mib(peak),
        mib(growth),
        mib(BUDGET / 1024),
        mib(SLACK_KIB)
    );
    let (mut pair, loaded) = running.stop();
    print_pair_figures(TEST, &unloaded, &loaded);
    assert!(
        peak <= bound && !stopped_early,
        "a client that never reads may pin at most its outbound budget ({}) plus slack ({}) of \
         the broker's memory, but RSS grew by {} (peak {})",
        mib(BUDGET / 1024),
        mib(SLACK_KIB),
        mib(growth),
        mib(peak)
    );
    pair.assert_lost_nothing();
}

#[test]
fn thousands_of_half_sent_logins_and_upgrades_cost_at_most_8_kib_each() {
    const TEST: &str = "half-sent";
    const TCP_CONNS: usize = 6000;
    const WS_CONNS: usize = 300;
    const PER_CONN_KIB: u64 = 8;
    let _serial = serial();
    let files = hostile::raise_open_file_limit();
    assert!(
        files.is_none_or(|n| n > 2 * (TCP_CONNS + WS_CONNS) as u64),
        "this test holds {} connections: the open-file limit ({files:?}) is too low",
        TCP_CONNS + WS_CONNS
    );
    let broker = Broker::start(&[
        "limits.max_unauthenticated=10000",
        "limits.max_unauthenticated_per_source=10000",
        // Held, not timed out, while they are counted.
        "timeouts.login_ms=60000",
    ]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    assert_pair_still_talks(&mut alice, &mut bob);
    thread::sleep(Duration::from_millis(300));
    let baseline = broker.rss_kib();

    // TCP: a length prefix announcing 4000 bytes, and 3000 of them.
    let mut partial_login = varint(4000);
    partial_login.extend(std::iter::repeat_n(b'\x0a', 3000));
    // WebSocket: some 3 KiB of an upgrade request, without its end.
    let partial_upgrade = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nX-Padding: {}",
        broker.ws_addr(),
        "p".repeat(3000)
    );
    let started = Instant::now();
    let mut held: Vec<TcpStream> = Vec::with_capacity(TCP_CONNS + WS_CONNS);
    for (addr, count, bytes) in [
        (broker.tcp_addr(), TCP_CONNS, partial_login.as_slice()),
        (broker.ws_addr(), WS_CONNS, partial_upgrade.as_bytes()),
    ] {
        for i in 0..count {
            let mut stream = connect_raw(addr, None).unwrap_or_else(|e| {
                panic!("connection {i} of {count} to {addr} could not be opened: {e}")
            });
            stream
                .write_all(bytes)
                .unwrap_or_else(|e| panic!("connection {i} to {addr}: cannot write: {e}"));
            held.push(stream);
        }
    }
    let opened_in = started.elapsed();
    // Let the broker read everything, then take the highest of a few samples.
    let mut rss = 0;
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(150));
        rss = rss.max(broker.rss_kib());
    }
    let closed = held
        .iter()
        .filter(|s| peer_closed(s) != Some(false))
        .count();
    let total = (TCP_CONNS + WS_CONNS) as u64;
    let growth = rss.saturating_sub(baseline);
    eprintln!(
        "[{TEST}] {TCP_CONNS} TCP connections with 3000 of 4000 bytes of a login frame and \
         {WS_CONNS} with 3 KiB of an upgrade request, opened in {opened_in:?}: broker RSS {} -> \
         {}, growth {} = {:.2} KiB per connection (bound {PER_CONN_KIB} KiB); {closed} answered \
         or closed by the broker",
        mib(baseline),
        mib(rss),
        mib(growth),
        growth as f64 / total as f64
    );
    assert_eq!(
        closed, 0,
        "every half-sent login or upgrade is held until its timeout (none answered or closed early)"
    );
    assert!(
        growth <= PER_CONN_KIB * total,
        "a connection holding a partial login frame or upgrade request costs at most \
         {PER_CONN_KIB} KiB of broker memory, but {total} cost {} ({:.2} KiB each)",
        mib(growth),
        growth as f64 / total as f64
    );
    // Logins still work beside them.
    let mut carol = broker.connect("carol", "phone");
    assert_pair_still_talks(&mut alice, &mut carol);
}

#[test]
fn users_who_leave_free_their_memory() {
    const TEST: &str = "leavers";
    const WARM_UP: usize = 3_000;
    const USERS: usize = 100_000;
    let _serial = serial();
    // For the benchmark notes (release build): `ABUSE_LEAVERS=1000000` (not `PARLEY_*`, which
    // the broker would read as its configuration).
    let users = std::env::var("ABUSE_LEAVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(USERS);
    // Client threads, each connecting from its own source address, at most 20,000 connections
    // each (closed connections wait in TIME_WAIT and hold their port).
    let threads = (users / 20_000).clamp(16, 250);
    let broker = Broker::start(&["shards=1", "storage.durability=never"]);

    let churn = |prefix: &str, users: usize| -> Duration {
        let start = Instant::now();
        let failures = AtomicU64::new(0);
        thread::scope(|s| {
            for t in 0..threads {
                let (broker, failures) = (&broker, &failures);
                s.spawn(move || {
                    let source = std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                        127,
                        0,
                        2,
                        u8::try_from(t + 1).expect("few threads"),
                    ));
                    for i in (t..users).step_by(threads) {
                        if failures.load(Ordering::Relaxed) > 0 {
                            return;
                        }
                        let user = format!("{prefix}-{i}");
                        let answer = match connect_raw(broker.tcp_addr(), Some(source)) {
                            Ok(stream) => {
                                let mut conn = Tcp::from_stream(stream);
                                raw_login(&mut conn, &broker.token(&user, "phone"))
                            }
                            Err(e) => Answer::Closed(format!("connect failed: {e}")),
                        };
                        if !matches!(answer, Answer::LoggedIn(_)) {
                            failures.fetch_add(1, Ordering::Relaxed);
                            panic!("{user} could not log in: {}", describe_answer(&answer));
                        }
                        // The connection is closed here, right after its LoginResult.
                    }
                });
            }
        });
        start.elapsed()
    };

    churn("warm", WARM_UP);
    thread::sleep(Duration::from_secs(1));
    let baseline = broker.rss_kib();
    let cpu_before = hostile::cpu_time(broker.pid());
    let (took, peak) = peak_rss_during(&broker, || churn("leaver", users));
    let cpu = hostile::cpu_time(broker.pid()) - cpu_before;
    thread::sleep(Duration::from_secs(1));
    let after = broker.rss_kib();
    let bound = baseline + baseline / 20 + 1024;
    eprintln!(
        "[{TEST}] {users} distinct users logged in and left in {took:?} ({:.0} logins/s, broker \
         CPU {cpu:?}): broker RSS baseline {} (after {WARM_UP} warm-up logins), peak {}, 1 s \
         after {} (bound {})",
        users as f64 / took.as_secs_f64(),
        mib(baseline),
        mib(peak),
        mib(after),
        mib(bound)
    );
    assert!(
        after <= bound,
        "a user with no device online and nothing pending costs nothing: after {users} users \
         logged in and out, RSS is {} against a baseline of {} (bound: +5 % + 1 MiB = {})",
        mib(after),
        mib(baseline),
        mib(bound)
    );
}

// ---------------------------------------------------------------------------------------------
// Errors and rates
// ---------------------------------------------------------------------------------------------

#[test]
fn a_client_sending_only_malformed_frames_is_closed_after_max_errors() {
    let _serial = serial();
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut abuser = broker.connect("mallory", "phone");
    let mut rng = Rng::new(2);
    // Three times the allowance, in one go: valid length prefixes, undecodable contents.
    abuser.write_raw(&junk_frames(&mut rng, 3 * DEFAULT_MAX_ERRORS));
    let errors = abuser.expect_closed(TIMEOUT);
    let codes: Vec<String> = errors
        .iter()
        .map(|e| format!("{}{}", code_name(e.code), if e.fatal { "!" } else { "" }))
        .collect();
    eprintln!(
        "[malformed] {} error frames before the close: {}",
        errors.len(),
        codes.join(" ")
    );
    let (last, before) = errors
        .split_last()
        .expect("the broker answered the malformed frames with at least one error");
    assert!(
        last.code == ErrorCode::TooManyErrors as i32 && last.fatal,
        "after too many malformed frames the connection ends with fatal TOO_MANY_ERRORS, got {} \
         (all: {codes:?})",
        code_name(last.code)
    );
    assert!(
        before.iter().all(|e| !e.fatal),
        "the errors before TOO_MANY_ERRORS are not fatal: {codes:?}"
    );
    assert!(
        before.len() <= DEFAULT_MAX_ERRORS,
        "at most max_errors ({DEFAULT_MAX_ERRORS}) non-fatal errors come before the close, got \
         {}",
        before.len()
    );
    assert_pair_still_talks(&mut alice, &mut bob);
}

#[test]
fn every_request_kind_is_rate_limited_with_a_retry_hint() {
    const RATE: usize = 10;
    const BURST: usize = 20;
    let _serial = serial();
    let broker = Broker::start(&[
        &format!("limits.request_rate_per_sec={RATE}"),
        &format!("limits.request_burst={BURST}"),
        // Refusals must not close the connection here: that is another test.
        "limits.max_errors=100000",
    ]);
    let peer = "rl-peer";
    let history = || {
        Body::HistoryRequest(pb::HistoryRequest {
            conversation: Some(direct(peer)),
            before_seq: 0,
            after_seq: None,
            limit: 10,
        })
    };
    let sync = || {
        Body::SyncRequest(pb::SyncRequest {
            cursors: Vec::new(),
            page_size: 0,
            max_per_conversation: 0,
        })
    };
    let send = || {
        Body::Send(pb::Send {
            to: Some(direct(peer)),
            client_msg_id: fresh_client_msg_id(),
            content_type: 1,
            body: "hello".into(),
            kind: pb::MessageKind::Normal as i32,
            ref_seq: 0,
        })
    };
    let ping = || {
        Body::Ping(pb::Ping {
            nonce: fresh_client_msg_id(),
        })
    };
    let kinds: [(&str, usize, &dyn Fn() -> Body); 4] = [
        ("Ping", 100, &ping),
        ("Send", 100, &send),
        ("HistoryRequest", 40, &history),
        ("SyncRequest", 40, &sync),
    ];
    for (kind, n, make) in kinds {
        // A connection (and so a bucket) of its own; its login and sync spend a few tokens.
        let mut client = broker.connect(&format!("rl-{kind}"), "phone");
        if kind == "HistoryRequest" {
            client.send(peer, "something to page through");
        }
        let got = client.burst(n, make);
        eprintln!(
            "[rate] a burst of {n} {kind}s at {RATE}/s, burst {BURST}: {} served, {} refused \
             (retry_after_ms {:?})",
            got.served,
            got.refused.len(),
            got.refused
                .iter()
                .map(|e| e.retry_after_ms)
                .collect::<std::collections::BTreeSet<_>>()
        );
        assert!(
            !got.refused.is_empty(),
            "a burst of {n} {kind}s is over a bucket of {BURST} at {RATE}/s: some must be refused"
        );
        for e in &got.refused {
            assert!(
                e.code == ErrorCode::RateLimited as i32 && !e.fatal && e.retry_after_ms > 0,
                "a {kind} over the rate is refused with non-fatal RATE_LIMITED and a retry hint, \
                 got {} (fatal {}, retry_after_ms {})",
                code_name(e.code),
                e.fatal,
                e.retry_after_ms
            );
        }
        assert!(
            got.served <= BURST,
            "at most the burst ({BURST}) of {kind}s is served at once, got {}",
            got.served
        );
        // After the hint, the same kind of request is served again on the same connection.
        let wait = got
            .refused
            .iter()
            .map(|e| u64::from(e.retry_after_ms))
            .max()
            .unwrap_or(0)
            .min(5_000);
        thread::sleep(Duration::from_millis(wait + 200));
        let again = client.burst(1, make);
        assert_eq!(
            (again.served, again.refused.len()),
            (1, 0),
            "after waiting retry_after_ms, a {kind} is served again on the same connection: \
             {:?}",
            again.refused
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Oversized and endless input
// ---------------------------------------------------------------------------------------------

#[test]
fn an_oversized_login_frame_or_upgrade_request_is_refused_at_once() {
    let _serial = serial();
    let broker = Broker::start(&["timeouts.login_ms=20000"]);

    // A frame at the login limit's side is waited for...
    let mut patient = broker.tcp();
    let mut within = varint(4000);
    within.extend([0x0a; 100]);
    patient.write_raw(&within);
    let frames = patient.receive_for(Duration::from_millis(500));
    assert!(
        frames.is_empty(),
        "a login frame within max_login_frame_bytes is waited for, not refused: {frames:?}"
    );

    // ...one over it is refused from its prefix alone.
    let mut abuser = broker.tcp();
    let start = Instant::now();
    abuser.write_raw(&varint(10_000));
    abuser.expect_fatal_error(&[ErrorCode::FrameTooLarge], Duration::from_secs(2));
    eprintln!(
        "[oversized] a 10,000-byte length prefix before login refused in {:?}",
        start.elapsed()
    );

    // A WebSocket upgrade request longer than max_handshake_bytes: 431.
    let mut stream = connect_raw(broker.ws_addr(), None).expect("connect to the WebSocket port");
    let request = ws_upgrade_request(
        broker.ws_addr(),
        &format!("X-Padding: {}\r\n", "p".repeat(6000)),
    );
    let start = Instant::now();
    // The broker may answer and close before it has read all of it.
    let _ = stream.write_all(request.as_bytes());
    let line = http_status_line(&mut stream, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("an over-long upgrade request gets an HTTP answer: {e}"));
    eprintln!(
        "[oversized] a {}-byte upgrade request answered {line:?} in {:?}",
        request.len(),
        start.elapsed()
    );
    assert_eq!(
        http_status(&line),
        Some(431),
        "an upgrade request over max_handshake_bytes gets 431, got {line:?}"
    );
}

#[test]
fn a_peer_that_keeps_writing_after_a_fatal_error_is_cut_off() {
    const BLAST: usize = 10 << 20;
    let _serial = serial();
    let broker = Broker::start(&["timeouts.close_linger_ms=10000"]);
    let mut stream = connect_raw(broker.tcp_addr(), None).expect("connect");
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("set a write timeout");
    // No valid length prefix: a fatal framing error before login.
    stream.write_all(&[0xff; 16]).expect("write the garbage");
    let start = Instant::now();
    let mut rng = Rng::new(7);
    let chunk = rng.bytes(64 << 10);
    let mut written = 0;
    let ended = loop {
        if written >= BLAST || start.elapsed() > Duration::from_secs(6) {
            break None;
        }
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    let took = start.elapsed();
    eprintln!(
        "[linger] after the fatal error the peer wrote {written} more bytes; its connection \
         ended after {took:?}: {ended:?}"
    );
    let error = ended.unwrap_or_else(|| {
        panic!(
            "a peer that keeps writing after a fatal error is cut off (reset), but it wrote \
             {written} bytes in {took:?} without an error"
        )
    });
    assert!(
        took <= Duration::from_secs(3),
        "the blasting peer is cut off within 3 s (linger 10 s, at most 64 KiB discarded), it \
         took {took:?} ({error})"
    );
}

#[test]
fn a_garbage_storm_on_50_connections_does_not_hurt_a_healthy_pair() {
    const TEST: &str = "garbage-storm";
    const PER_KIND: usize = 25;
    const STORM: Duration = Duration::from_secs(5);
    let _serial = serial();
    let broker = Broker::start(&["storage.durability=never"]);
    let mut pair = HealthyPair::connect(&broker);
    let unloaded = pair.measure(Duration::from_secs(2));

    let stop = AtomicBool::new(false);
    let connections = AtomicU64::new(0);
    let logins = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let running = pair.start();
    thread::scope(|s| {
        for t in 0..2 * PER_KIND {
            let (broker, stop, connections, logins, bytes) =
                (&broker, &stop, &connections, &logins, &bytes);
            s.spawn(move || {
                let logged_in = t >= PER_KIND;
                let mut rng = Rng::new(t as u64);
                let user = format!("garbage-{t}");
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = connect_raw(broker.tcp_addr(), None) else {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    if logged_in {
                        let Ok(clone) = stream.try_clone() else {
                            continue;
                        };
                        let mut conn = Tcp::from_stream(clone);
                        if !matches!(
                            raw_login(&mut conn, &broker.token(&user, "phone")),
                            Answer::LoggedIn(_)
                        ) {
                            thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        logins.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
                    // Garbage until the broker closes the connection (or the storm ends).
                    while !stop.load(Ordering::Relaxed) {
                        let garbage = if logged_in {
                            junk_frames(&mut rng, 8)
                        } else {
                            rng.bytes(512)
                        };
                        match stream.write(&garbage) {
                            Ok(n) => {
                                bytes.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock
                                        | ErrorKind::TimedOut
                                        | ErrorKind::Interrupted
                                ) => {}
                            Err(_) => break,
                        }
                        thread::sleep(Duration::from_millis(5));
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            });
        }
        thread::sleep(STORM);
        stop.store(true, Ordering::Relaxed);
    });
    let (mut pair, loaded) = running.stop();
    eprintln!(
        "[{TEST}] {} garbage connections ({} of them logged in first), {} bytes of garbage in \
         {STORM:?}",
        connections.load(Ordering::Relaxed),
        logins.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed)
    );
    print_pair_figures(TEST, &unloaded, &loaded);
    pair.assert_lost_nothing();
    assert!(
        connections.load(Ordering::Relaxed) > 2 * PER_KIND as u64,
        "the broker closes garbage connections (the storm had to reconnect)"
    );
    assert!(
        logins.load(Ordering::Relaxed) > PER_KIND as u64,
        "logged-in connections sending garbage are closed too (past limits.max_errors), so \
         they had to log in again: {} logins for {PER_KIND} of them",
        logins.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------------------------
// Connection slots and the log
// ---------------------------------------------------------------------------------------------

/// The numbers in `line`.
fn numbers(line: &str) -> impl Iterator<Item = u64> + '_ {
    line.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
}

#[test]
fn past_the_open_file_limit_new_connections_are_refused_not_left_hanging() {
    const NOFILE: u32 = 256;
    const CONNS: usize = 400;
    const ANSWER_WITHIN: Duration = Duration::from_secs(2);
    let _serial = serial();
    let broker =
        Broker::start_with_open_file_limit(NOFILE, &["shards=1", "timeouts.login_ms=30000"]);
    let output = broker.output();
    let line = output
        .lines()
        .find(|l| {
            l.contains("max_connections") && numbers(l).any(|n| n > 0 && n < u64::from(NOFILE))
        })
        .unwrap_or_else(|| {
            panic!(
                "under `ulimit -n {NOFILE}` the broker says at start-up that it lowered \
                 max_connections (a line naming max_connections and a value below {NOFILE}); \
                 its output:\n{output}"
            )
        });
    eprintln!("[nofile] start-up: {line}");
    let lines_before = broker.stderr_lines();
    let cpu_before = hostile::cpu_time(broker.pid());

    let mut pending = Vec::new();
    let mut failures = Vec::new();
    for i in 0..CONNS {
        if failures.len() >= 5 {
            break;
        }
        let opened = Instant::now();
        match connect_raw_with(broker.tcp_addr(), None, None, ANSWER_WITHIN) {
            Ok(stream) => {
                let mut conn = Tcp::from_stream(stream);
                let token = broker.token(&format!("crowd-{i}"), "phone");
                match conn.write_frame(&hostile::login_frame(1, &token)) {
                    Ok(()) => pending.push((i, opened, conn)),
                    Err(e) => failures.push(format!("connection {i}: cannot write a login: {e}")),
                }
            }
            Err(e) => failures.push(format!("connection {i}: connect failed: {e}")),
        }
    }
    let mut working = Vec::new();
    let mut refused = 0;
    for (i, opened, mut conn) in pending {
        match read_answer(&mut conn, opened + ANSWER_WITHIN, Duration::from_millis(20)) {
            Answer::LoggedIn(_) => working.push(conn),
            Answer::Refused(e) if is_too_many_connections(&e) => {
                let (ended, seen) = await_end(&mut conn, Instant::now() + ANSWER_WITHIN);
                if ended {
                    refused += 1;
                } else {
                    failures.push(format!(
                        "connection {i}: not closed after TOO_MANY_CONNECTIONS ({seen:?})"
                    ));
                }
            }
            other => failures.push(format!(
                "connection {i}: neither logged in nor refused with TOO_MANY_CONNECTIONS \
                 within {ANSWER_WITHIN:?}: {}",
                describe_answer(&other)
            )),
        }
    }
    // Holding them all: an idle broker at its limit must be idle (no accept loop).
    thread::sleep(Duration::from_secs(1));
    let cpu = hostile::cpu_time(broker.pid()) - cpu_before;
    // One more at a time, at the limit: how long until it is told.
    let mut refusal_times = Vec::new();
    for i in 0..20 {
        let opened = Instant::now();
        let Ok(stream) = connect_raw_with(broker.tcp_addr(), None, None, ANSWER_WITHIN) else {
            failures.push(format!("late connection {i}: connect failed"));
            continue;
        };
        let mut conn = Tcp::from_stream(stream);
        match read_answer(&mut conn, opened + ANSWER_WITHIN, Duration::from_millis(1)) {
            Answer::Refused(e) if is_too_many_connections(&e) => {
                refusal_times.push(opened.elapsed());
            }
            other => failures.push(format!(
                "late connection {i}: not refused with TOO_MANY_CONNECTIONS: {}",
                describe_answer(&other)
            )),
        }
    }
    refusal_times.sort();
    eprintln!(
        "[nofile] at the limit, connect to TOO_MANY_CONNECTIONS: median {:?}, max {:?} (of {})",
        refusal_times.get(refusal_times.len() / 2),
        refusal_times.last(),
        refusal_times.len()
    );
    let new_lines = broker.stderr_since(lines_before);
    eprintln!(
        "[nofile] {CONNS} connections under ulimit -n {NOFILE}: {} logged in, {refused} refused \
         with TOO_MANY_CONNECTIONS, {} failed; broker CPU {cpu:?} meanwhile; {} new stderr \
         lines: {:?}",
        working.len(),
        failures.len(),
        new_lines.len(),
        new_lines.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        failures.is_empty(),
        "every connection past the open-file limit is refused at once, none hangs:\n{}",
        failures.join("\n")
    );
    assert!(
        !working.is_empty() && refused > 0,
        "some connections work and those past the limit are refused ({} worked, {refused} \
         refused)",
        working.len()
    );
    assert!(
        new_lines.len() <= 5,
        "refusing connections logs at most about a line a second, not one per connection: {} \
         lines: {:?}",
        new_lines.len(),
        new_lines.iter().take(20).collect::<Vec<_>>()
    );
    assert!(
        cpu < Duration::from_millis(1500),
        "a broker at its connection limit does not spin (accept loop): it used {cpu:?} of CPU \
         in about {:?}",
        Duration::from_secs(1)
    );
    // Slots come back when connections go.
    drop(working);
    thread::sleep(Duration::from_millis(500));
    let mut late = broker.tcp();
    late.login("after-the-crowd", "phone");
}

#[test]
fn anonymous_clients_cannot_grow_the_log_line_by_line() {
    const PER_KIND: usize = 2_000;
    const THREADS: usize = 4;
    const MAX_NEW_LINES: usize = 10;
    let _serial = serial();
    let broker = Broker::start(&[]);
    thread::sleep(Duration::from_millis(300));
    let before = broker.stderr_lines();
    let start = Instant::now();
    // A bound on the whole run, whatever the broker does with them.
    let give_up = start + Duration::from_secs(25);
    let patience = Duration::from_millis(500);
    thread::scope(|s| {
        for t in 0..THREADS {
            let broker = &broker;
            s.spawn(move || {
                let mut rng = Rng::new(100 + t as u64);
                for i in (t..PER_KIND).step_by(THREADS) {
                    if Instant::now() > give_up {
                        return;
                    }
                    // WebSocket: an invalid upgrade request, or half of one and a close.
                    if let Ok(mut ws) = connect_raw(broker.ws_addr(), None) {
                        if i % 2 == 0 {
                            let request = if i % 4 == 0 {
                                "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned()
                            } else {
                                format!("NONSENSE {i}\r\n\r\n")
                            };
                            let _ = ws.write_all(request.as_bytes());
                            let _ = http_status_line(&mut ws, patience);
                        } else {
                            let _ = ws.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgr");
                        }
                    }
                    // TCP: garbage that is fatal before login (no valid length prefix, or a
                    // frame that does not decode); read until the broker closes.
                    if let Ok(stream) = connect_raw(broker.tcp_addr(), None) {
                        let mut conn = Tcp::from_stream(stream);
                        let garbage = if i % 2 == 0 {
                            vec![0xff; 16]
                        } else {
                            junk_frames(&mut rng, 1)
                        };
                        if conn.write_raw(&garbage).is_ok() {
                            let _ = await_end(&mut conn, Instant::now() + patience);
                        }
                    }
                }
            });
        }
    });
    let took = start.elapsed();
    thread::sleep(Duration::from_millis(1500));
    let new_lines = broker.stderr_since(before);
    eprintln!(
        "[log] {PER_KIND} bad WebSocket upgrades and {PER_KIND} garbage TCP connections in \
         {took:?}: {} new stderr lines: {:?}",
        new_lines.len(),
        new_lines.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        new_lines.len() <= MAX_NEW_LINES,
        "anonymous clients cannot grow the log by a line each: {} new lines for {} connections \
         (bound {MAX_NEW_LINES}); first ones: {:?}",
        new_lines.len(),
        2 * PER_KIND,
        new_lines.iter().take(20).collect::<Vec<_>>()
    );
}

/// Opens `count` idle TCP connections to the broker, one every 20 ms, from the sources that
/// `source` picks for each; after the last, reads each for an answer (until a second after the
/// last was opened). Returns, per connection, `Ok(stream)` if it was held silently, or `Err` with
/// what came (a TOO_MANY_CONNECTIONS refusal is checked to end the connection).
fn open_idle(
    broker: &Broker,
    count: usize,
    source: impl Fn(usize) -> std::net::IpAddr,
) -> Vec<Result<Tcp, String>> {
    let mut conns = Vec::new();
    for i in 0..count {
        let stream = connect_raw(broker.tcp_addr(), Some(source(i)))
            .unwrap_or_else(|e| panic!("idle connection {i}: connect failed: {e}"));
        conns.push(Tcp::from_stream(stream));
        thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    conns
        .into_iter()
        .map(
            |mut conn| match read_answer(&mut conn, deadline, Duration::from_millis(20)) {
                Answer::TimedOut => Ok(conn),
                Answer::Refused(e) if is_too_many_connections(&e) => {
                    let (ended, seen) = await_end(&mut conn, Instant::now() + TIMEOUT);
                    Err(if ended {
                        "TOO_MANY_CONNECTIONS".to_owned()
                    } else {
                        format!("TOO_MANY_CONNECTIONS, then not closed: {seen:?}")
                    })
                }
                other => Err(describe_answer(&other)),
            },
        )
        .collect()
}

/// Asserts that of `outcomes` the first `held` were held and the rest refused with
/// TOO_MANY_CONNECTIONS (and closed); returns the held ones.
fn first_held_rest_refused(outcomes: Vec<Result<Tcp, String>>, held: usize, why: &str) -> Vec<Tcp> {
    let summary: Vec<String> = outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| match o {
            Ok(_) => format!("{i}: held"),
            Err(what) => format!("{i}: {what}"),
        })
        .collect();
    let mut kept = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(conn) if i < held => kept.push(conn),
            Err(what) if i >= held && what == "TOO_MANY_CONNECTIONS" => {}
            _ => panic!(
                "{why}: the first {held} anonymous connections are held and the others get fatal \
                 TOO_MANY_CONNECTIONS and a close; got:\n{}",
                summary.join("\n")
            ),
        }
    }
    kept
}

#[test]
fn anonymous_connections_from_one_source_cannot_lock_out_logins() {
    const PER_SOURCE: usize = 20;
    let _serial = serial();
    let broker = Broker::start(&[
        &format!("limits.max_unauthenticated_per_source={PER_SOURCE}"),
        "timeouts.login_ms=30000",
    ]);
    let outcomes = open_idle(&broker, PER_SOURCE + 10, |_| loopback(1));
    let held = first_held_rest_refused(
        outcomes,
        PER_SOURCE,
        "max_unauthenticated_per_source=20, 30 connections from 127.0.0.1",
    );
    // Another source still gets in, while the 20 are held.
    let stream = connect_raw(broker.tcp_addr(), Some(loopback(2))).expect("connect from 127.0.0.2");
    let mut conn = Tcp::from_stream(stream);
    match raw_login(&mut conn, &broker.token("elsewhere", "phone")) {
        Answer::LoggedIn(_) => {}
        other => panic!(
            "a client from 127.0.0.2 logs in while 127.0.0.1 holds its {PER_SOURCE} anonymous \
             connections: {}",
            describe_answer(&other)
        ),
    }
    eprintln!(
        "[per-source] {} anonymous connections from 127.0.0.1 held, 10 refused; a login from \
         127.0.0.2 went through",
        held.len()
    );
}

#[test]
fn anonymous_connections_cannot_take_every_slot_of_the_node() {
    const NODE_WIDE: usize = 20;
    let _serial = serial();
    let broker = Broker::start(&[
        &format!("limits.max_unauthenticated={NODE_WIDE}"),
        "timeouts.login_ms=30000",
    ]);
    // Logged-in connections do not count against the limit.
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut others: Vec<_> = (0..3)
        .map(|i| broker.connect(&format!("member-{i}"), "phone"))
        .collect();
    let outcomes = open_idle(&broker, NODE_WIDE + 10, |i| loopback(1 + (i % 3) as u8));
    let mut held = first_held_rest_refused(
        outcomes,
        NODE_WIDE,
        "max_unauthenticated=20 with 5 logged-in clients, 30 connections from 3 sources",
    );
    // Full of anonymous connections: a new one, from yet another source, is refused too...
    let stream = connect_raw(broker.tcp_addr(), Some(loopback(4))).expect("connect");
    let mut conn = Tcp::from_stream(stream);
    match read_answer(
        &mut conn,
        Instant::now() + Duration::from_secs(2),
        Duration::ZERO,
    ) {
        Answer::Refused(e) if is_too_many_connections(&e) => {}
        other => panic!(
            "with {NODE_WIDE} anonymous connections held node-wide, one more is refused with \
             TOO_MANY_CONNECTIONS: {}",
            describe_answer(&other)
        ),
    }
    // ...while logged-in clients go on, and slots come back when anonymous ones leave.
    assert_pair_still_talks(&mut alice, &mut bob);
    for other in &mut others {
        other.ping();
    }
    held.truncate(NODE_WIDE - 5);
    thread::sleep(Duration::from_millis(300));
    let stream = connect_raw(broker.tcp_addr(), Some(loopback(4))).expect("connect");
    let mut conn = Tcp::from_stream(stream);
    match raw_login(&mut conn, &broker.token("latecomer", "phone")) {
        Answer::LoggedIn(_) => {}
        other => panic!(
            "once anonymous connections close, a new client logs in: {}",
            describe_answer(&other)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens and secrets
// ---------------------------------------------------------------------------------------------

#[test]
fn a_session_ends_when_its_token_expires() {
    let _serial = serial();
    let broker = Broker::start(&[]);
    let exp = unix_now() + 2;
    let mut client = broker.tcp();
    let token = token::mint(broker.secret().as_bytes(), "ephemeral", "phone", exp);
    let result = client
        .try_login(&token)
        .unwrap_or_else(|e| panic!("a token valid for 2 s logs in: {}", code_name(e.code)));
    assert_eq!(
        result.token_expires_at, exp,
        "LoginResult.token_expires_at is the token's exp"
    );
    let start = Instant::now();
    client.expect_fatal_error(&[ErrorCode::TokenExpired], Duration::from_secs(6));
    let now = unix_now();
    eprintln!(
        "[expiry] the session of a token expiring in 2 s ended after {:?}",
        start.elapsed()
    );
    assert!(
        now + 1 >= exp,
        "the session does not end before its token expires (ended at {now}, exp {exp})"
    );
}

#[test]
fn a_fresh_login_on_the_connection_extends_the_session() {
    let _serial = serial();
    let broker = Broker::start(&[]);
    let secret = broker.secret().as_bytes().to_owned();
    let first_exp = unix_now() + 2;
    let mut client = broker.tcp();
    let first = client
        .try_login(&token::mint(&secret, "renewer", "phone", first_exp))
        .unwrap_or_else(|e| panic!("login: {}", code_name(e.code)));
    assert_eq!(first.token_expires_at, first_exp);
    client.sync();

    // The refresh: same user and device, a later expiry; answered with a LoginResult (whose
    // request_id try_login checks) carrying the new expiry.
    let second_exp = unix_now() + 3600;
    let second = client
        .try_login(&token::mint(&secret, "renewer", "phone", second_exp))
        .unwrap_or_else(|e| {
            panic!(
                "a fresh Login on a logged-in connection refreshes the session: {} ({:?})",
                code_name(e.code),
                e.message
            )
        });
    assert_eq!(
        second.token_expires_at, second_exp,
        "the refreshed LoginResult reports the new token's expiry"
    );

    // Past the first token's expiry the session goes on.
    let frames = client.receive_for(Duration::from_secs(4));
    let errors: Vec<String> = frames
        .iter()
        .filter_map(|f| match &f.body {
            Some(Body::Error(e)) => Some(code_name(e.code)),
            _ => None,
        })
        .collect();
    assert!(
        errors.is_empty(),
        "no error once the session was refreshed: {errors:?}"
    );
    client.ping();
    let mut peer = broker.connect("renewer-peer", "phone");
    assert_pair_still_talks(&mut client, &mut peer);
}

#[test]
fn a_refresh_naming_another_user_or_device_is_refused_and_the_connection_stays_usable() {
    let _serial = serial();
    let broker = Broker::start(&[]);
    let mut client = broker.connect("refresher", "phone");
    for (user, device) in [("mallory", "phone"), ("refresher", "tablet")] {
        let token = broker.token(user, device);
        match client.try_login(&token) {
            Err(e) => assert!(
                e.code == ErrorCode::Forbidden as i32 && !e.fatal,
                "a refresh naming {user}/{device} on refresher/phone's connection is refused \
                 with non-fatal FORBIDDEN, got {} (fatal {})",
                code_name(e.code),
                e.fatal
            ),
            Ok(result) => panic!(
                "a refresh naming {user}/{device} on refresher/phone's connection must be \
                 refused, but it was answered {result:?}"
            ),
        }
    }
    client.ping();
    let mut peer = broker.connect("refresher-peer", "phone");
    assert_pair_still_talks(&mut client, &mut peer);
}

#[test]
fn tokens_valid_longer_than_the_maximum_lifetime_are_refused() {
    let _serial = serial();
    let broker = Broker::start(&["auth.max_token_lifetime_secs=3600"]);
    let secret = broker.secret().as_bytes().to_owned();

    let mut long = broker.tcp();
    match long.try_login(&token::mint(&secret, "forever", "phone", unix_now() + 7200)) {
        Err(e) => assert!(
            e.code == ErrorCode::BadToken as i32 && e.fatal,
            "a token expiring in 7200 s with a maximum lifetime of 3600 s is refused with fatal \
             BAD_TOKEN, got {} (fatal {})",
            code_name(e.code),
            e.fatal
        ),
        Ok(result) => panic!(
            "a token expiring in 7200 s with a maximum lifetime of 3600 s must be refused, but \
             it logged in: {result:?}"
        ),
    }
    long.expect_closed(TIMEOUT);

    let exp = unix_now() + 1800;
    let mut short = broker.tcp();
    let result = short
        .try_login(&token::mint(&secret, "reasonable", "phone", exp))
        .unwrap_or_else(|e| {
            panic!(
                "a token expiring in 1800 s (maximum 3600 s) logs in: {}",
                code_name(e.code)
            )
        });
    assert_eq!(result.token_expires_at, exp);
}

#[test]
fn a_secret_shorter_than_32_bytes_is_refused_at_start_up() {
    let _serial = serial();
    let failed = Broker::start_expecting_failure(&["auth.secret=\"short\""]);
    eprintln!(
        "[secret] `broker serve` with a 5-byte secret: {:?}\n{}",
        failed.status, failed.output
    );
    let status = failed.status.unwrap_or_else(|| {
        panic!(
            "the broker started with a 5-byte secret; it must refuse it:\n{}",
            failed.output
        )
    });
    assert!(
        !status.success(),
        "a secret shorter than 32 bytes makes `broker serve` exit non-zero ({status})"
    );
    assert!(
        !failed.output.contains("panicked at"),
        "the refusal is an orderly exit, not a panic:\n{}",
        failed.output
    );
    assert!(
        failed.output.contains("32"),
        "the refusal says the secret needs 32 bytes:\n{}",
        failed.output
    );
}

// ---------------------------------------------------------------------------------------------
// Browsers
// ---------------------------------------------------------------------------------------------

#[test]
fn websocket_upgrades_are_checked_against_the_origin_allow_list() {
    const GOOD: &str = "https://good.example";
    let _serial = serial();
    let broker = Broker::start(&[&format!("listen.ws_allowed_origins=[\"{GOOD}\"]")]);

    // A foreign origin: 403.
    let mut stream = connect_raw(broker.ws_addr(), None).expect("connect");
    stream
        .write_all(
            ws_upgrade_request(broker.ws_addr(), "Origin: https://evil.example\r\n").as_bytes(),
        )
        .expect("write the upgrade request");
    let line = http_status_line(&mut stream, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("an upgrade from a foreign origin gets an HTTP answer: {e}"));
    assert_eq!(
        http_status(&line),
        Some(403),
        "an upgrade from an origin not in the allow-list gets 403, got {line:?}"
    );
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);

    // The allowed origin: upgraded (tungstenite), and the WebSocket carries a login.
    let stream = connect_raw(broker.ws_addr(), None).expect("connect");
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/",
        broker.ws_addr()
    ))
    .expect("a WebSocket URL");
    request
        .headers_mut()
        .insert("Origin", tungstenite::http::HeaderValue::from_static(GOOD));
    let (mut ws, response) = tungstenite::client(request, stream)
        .unwrap_or_else(|e| panic!("an upgrade from the allowed origin {GOOD} succeeds: {e}"));
    assert_eq!(response.status().as_u16(), 101);
    let mut login = bytes::BytesMut::new();
    parley_proto::frame::encode(
        &hostile::login_frame(1, &broker.token("browser", "tab")),
        &mut login,
    );
    ws.send(tungstenite::Message::Binary(login.freeze()))
        .expect("send a Login over the WebSocket");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "no LoginResult over the WebSocket"
        );
        match ws.read().expect("read over the WebSocket") {
            tungstenite::Message::Binary(bytes) => {
                let frame = parley_proto::frame::decode(bytes).expect("a frame");
                assert!(
                    matches!(frame.body, Some(Body::LoginResult(_))),
                    "a client from the allowed origin logs in: {frame:?}"
                );
                break;
            }
            _ => continue,
        }
    }

    // No Origin header (not a browser): upgraded.
    let mut native = broker.connect_ws("native", "app");
    native.ping();
}
