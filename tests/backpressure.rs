//! Promise 5, backpressure: a slow or stuck client never stalls its shard or other clients. Past
//! the per-connection bound the broker stops pushing and says `Behind`; the client catches up by
//! sync. A client that reads nothing at all is closed after the write-stall timeout.
//!
//! The backlogs are sized to overflow the kernel first: on loopback, the broker's socket send
//! buffer alone can grow to `tcp_wmem`'s maximum (4 MiB by default) while the reader is stalled,
//! and only what the kernel does not take reaches the broker's per-connection queue.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use parley_proto::pb::frame::Body;
use parley_tests::{Broker, Client, TIMEOUT, assert_seqs, delivery_latency, direct, numbered_body};

/// The per-connection outbound bound the tests configure.
const MAX_OUTBOUND: &str = "limits.max_outbound_bytes=65536";

/// Retransmits far beyond the tests' length: a stalled client is not also a retransmit case.
const NO_RETRANSMIT: [&str; 2] = [
    "timeouts.retransmit_initial_ms=30000",
    "timeouts.retransmit_max_ms=30000",
];

/// The receive buffer of a stalled client's socket: small, so the broker's own queue (not the
/// kernel's buffers) absorbs the backlog.
const SMALL_RECV_BUFFER: usize = 4096;

/// What "normal latency" means on loopback, with generous room for a loaded 2-core machine.
const NORMAL_LATENCY: Duration = Duration::from_secs(1);

/// The body size of the backlog messages.
const BODY: usize = 1024;

/// How many `BODY`-sized messages overflow what the kernel can buffer for a stalled loopback
/// reader (the sender's socket buffer can grow to `tcp_wmem`'s maximum), with 1 MiB to spare
/// for the broker's own queue; at least `min`.
fn backlog_len(min: u64) -> u64 {
    let wmem_max: usize = fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
        .min(64 << 20);
    let overflow = (wmem_max + SMALL_RECV_BUFFER + (1 << 20)) / BODY;
    min.max(u64::try_from(overflow).expect("fits"))
}

/// A logged-in, synced client with a small receive buffer, which the test then stops reading.
fn stalled_client(broker: &Broker, user: &str) -> Client {
    let mut client = broker.tcp_with_recv_buffer(SMALL_RECV_BUFFER);
    client.login(user, "phone");
    client.sync();
    client
}

/// Measures one message from `a` to `b`, asserting it was as fast as on an idle broker.
fn chat_once(a: &mut Client, b: &mut Client, round: usize) -> Duration {
    let latency = delivery_latency(a, b, &format!("round {round}"));
    assert!(
        latency < NORMAL_LATENCY,
        "another pair's message {round} took {latency:?}: a stalled client must not slow \
         others down (bound {NORMAL_LATENCY:?})"
    );
    latency
}

#[test]
fn a_slow_reader_is_told_it_is_behind_and_catches_up_in_order_while_others_chat_normally() {
    let n = backlog_len(2_000);
    let broker = Broker::start(&[
        "storage.durability=never",
        MAX_OUTBOUND,
        NO_RETRANSMIT[0],
        NO_RETRANSMIT[1],
    ]);
    let mut bob = stalled_client(&broker, "bob");
    let mut alice = broker.connect("alice", "phone");
    let mut carol = broker.connect("carol", "phone");
    let mut dave = broker.connect("dave", "phone");
    let conversation = direct("alice");

    // Bob reads nothing while alice sends him a backlog of several MiB and carol and dave chat.
    let (acks, send_time) = thread::scope(|s| {
        let sender = s.spawn(|| {
            let start = Instant::now();
            let acks = alice.send_many("bob", (1..=n).map(|i| numbered_body(i, BODY)), 256);
            (acks, start.elapsed())
        });
        let mut round = 0;
        while !sender.is_finished() {
            chat_once(&mut carol, &mut dave, round);
            round += 1;
        }
        sender.join().expect("alice's sends all succeed")
    });
    assert!(
        send_time < TIMEOUT,
        "a stalled reader does not hold up its sender ({n} sends took {send_time:?})"
    );
    for round in 0..20 {
        chat_once(&mut dave, &mut carol, round);
    }

    // Bob reads again: first what was queued for him, then Behind.
    bob.wait_until(TIMEOUT, "told it is Behind", |c| c.behind_count() > 0);
    let had = bob.cursor(&conversation);
    assert!(
        had < n,
        "the broker stopped pushing before the backlog was through (bob had {had} of {n})"
    );
    let sync = bob.sync();
    assert_seqs(
        &sync.seqs(&conversation),
        had + 1..=n,
        "the sync after Behind returns exactly what bob lacks, in order",
    );
    let arrived: Vec<u64> = bob
        .arrivals()
        .iter()
        .filter(|a| a.conversation == conversation)
        .map(|a| a.seq)
        .collect();
    assert_seqs(
        &arrived,
        1..=n,
        "pushed then synced, bob got every message once and in order",
    );
    for ack in [&acks[0], &acks[acks.len() - 1]] {
        assert_eq!(
            bob.message(&conversation, ack.seq).expect("held").msg_id,
            ack.msg_id
        );
    }

    // Live push resumed with the sync.
    let next = alice.send("bob", "live again");
    bob.expect_delivery(&conversation, next.seq, TIMEOUT);
    bob.assert_no_duplicates();
}

#[test]
fn a_client_that_reads_but_never_acks_is_behind_past_limits_max_unacked_deliveries() {
    const MAX_UNACKED: u64 = 16;
    const N: u64 = 40;
    let broker = Broker::start(&[
        "storage.durability=never",
        &format!("limits.max_unacked_deliveries={MAX_UNACKED}"),
        NO_RETRANSMIT[0],
        NO_RETRANSMIT[1],
    ]);
    let mut bob = broker.connect("bob", "phone");
    bob.set_auto_ack(false);
    let mut alice = broker.connect("alice", "phone");
    let conversation = direct("alice");

    alice.send_many("bob", (1..=N).map(|i| numbered_body(i, 32)), 8);
    let behind = bob.recv_until(TIMEOUT, |f| matches!(f.body, Some(Body::Behind(_))));
    let Some(Body::Behind(behind)) = behind.body else {
        unreachable!("the predicate matched a Behind")
    };
    assert!(
        behind.reason.contains("limits.max_unacked_deliveries"),
        "the reason names the setting: {:?}",
        behind.reason
    );
    bob.receive_for(Duration::from_millis(300));
    assert_seqs(
        &bob.delivered_seqs(&conversation),
        1..=MAX_UNACKED + 1,
        "live push stops at the first delivery past limits.max_unacked_deliveries unacked",
    );
    assert_eq!(bob.behind_count(), 1, "told once");

    // The client acks again and syncs: it gets the rest, and live push resumes.
    bob.set_auto_ack(true);
    let sync = bob.sync();
    assert_seqs(
        &sync.seqs(&conversation),
        MAX_UNACKED + 2..=N,
        "the sync after Behind brings what was not pushed",
    );
    let next = alice.send("bob", "live again");
    bob.expect_delivery(&conversation, next.seq, TIMEOUT);
    bob.assert_no_duplicates();
}

#[test]
fn a_client_that_never_reads_is_closed_after_the_write_stall_timeout() {
    const WRITE_STALL_MS: u64 = 1000;
    // The backlog overflows the kernel's buffers, and the outbound bound is set above it so that
    // the broker keeps queueing (no Behind): what it cannot write stays pending, with no
    // progress, which is what the write-stall timeout is for. (With a small bound, whether any
    // output is still pending after Behind stops the pushes would depend on kernel autotuning.)
    let n = backlog_len(500);
    let bound = 2 * n * u64::try_from(BODY).expect("fits");
    let broker = Broker::start(&[
        "storage.durability=never",
        &format!("limits.max_outbound_bytes={bound}"),
        &format!("timeouts.write_stall_ms={WRITE_STALL_MS}"),
        NO_RETRANSMIT[0],
        NO_RETRANSMIT[1],
    ]);
    let mut stuck = stalled_client(&broker, "stuck");
    let mut alice = broker.connect("alice", "phone");
    let mut carol = broker.connect("carol", "phone");
    let mut dave = broker.connect("dave", "phone");

    alice.send_many("stuck", (1..=n).map(|i| numbered_body(i, BODY)), 256);

    // The stall: for several write-stall timeouts the stuck client reads nothing, while the
    // others go on as usual.
    let stall_until = Instant::now() + Duration::from_millis(4 * WRITE_STALL_MS);
    let mut round = 0;
    while Instant::now() < stall_until {
        chat_once(&mut carol, &mut dave, round);
        round += 1;
    }
    alice.send("dave", "the sender of the backlog is fine too");

    // Reading now drains what the kernel held, then must find the connection closed (a broker
    // that had not closed it would now see progress and keep it open).
    stuck.expect_closed(TIMEOUT);
    assert!(
        stuck.cursor(&direct("alice")) < n,
        "the stuck client was cut off, not served its whole backlog"
    );
    chat_once(&mut dave, &mut carol, round);
}
