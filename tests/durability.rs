//! Promise 3, no loss and no duplicates: a send-ack means the message is stored (under the
//! default `always`, flushed: it survives `kill -9`), and a retried send is stored once and
//! acked identically, across restarts too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_proto::pb;
use parley_tests::client::fresh_client_msg_id;
use parley_tests::{Broker, SyncResult, TIMEOUT, assert_seqs, direct, numbered_body};

/// Asserts that `retry` is the same acknowledgement as `first`.
fn assert_same_ack(retry: &pb::SendAck, first: &pb::SendAck, when: &str) {
    assert_eq!(
        (retry.seq, retry.msg_id),
        (first.seq, first.msg_id),
        "{when}: a retried send (same client_msg_id, same device) is acked with the original \
         seq and msg_id"
    );
    assert_eq!(retry.client_msg_id, first.client_msg_id);
    assert_eq!(retry.conversation, first.conversation);
}

/// Logs bob in (without the automatic sync) and syncs once, in small pages.
fn bob_syncs(broker: &Broker) -> (parley_tests::Client, SyncResult) {
    let mut bob = broker.tcp();
    bob.login("bob", "phone");
    let result = bob.sync_with(Vec::new(), 64);
    (bob, result)
}

#[test]
fn a_retried_send_is_stored_once_and_acked_identically() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let id = fresh_client_msg_id();

    let first = alice.send_with_id("bob", id, "only once");
    let retry = alice.send_with_id("bob", id, "only once");
    assert_same_ack(&retry, &first, "on the same connection");
    let next = alice.send("bob", "the next one");
    assert_eq!(
        next.seq,
        first.seq + 1,
        "the retry took no seq: the next message follows the original directly"
    );

    let (bob, sync) = bob_syncs(&broker);
    assert_eq!(
        sync.seqs(&direct("alice")),
        vec![first.seq, next.seq],
        "bob finds the retried message once"
    );
    bob.assert_no_duplicates();
}

#[test]
fn a_send_retried_after_a_clean_restart_gets_the_original_ack() {
    let mut broker = Broker::start(&[]);
    let id = fresh_client_msg_id();
    let first = broker
        .connect("alice", "phone")
        .send_with_id("bob", id, "once");

    let status = broker.terminate();
    assert!(
        status.success(),
        "SIGTERM shuts the broker down cleanly ({status})"
    );
    broker.restart();

    let mut alice = broker.connect("alice", "phone");
    let retry = alice.send_with_id("bob", id, "once");
    assert_same_ack(&retry, &first, "after a restart");
    let (_bob, sync) = bob_syncs(&broker);
    assert_eq!(
        sync.seqs(&direct("alice")),
        vec![first.seq],
        "the message is stored once"
    );
}

#[test]
fn a_send_retried_after_kill_9_gets_the_original_ack() {
    let mut broker = Broker::start(&[]);
    let id = fresh_client_msg_id();
    let first = broker
        .connect("alice", "phone")
        .send_with_id("bob", id, "once");

    broker.kill9();
    broker.restart();

    let mut alice = broker.connect("alice", "phone");
    let retry = alice.send_with_id("bob", id, "once");
    assert_same_ack(&retry, &first, "after a crash");
    let (_bob, sync) = bob_syncs(&broker);
    assert_eq!(
        sync.seqs(&direct("alice")),
        vec![first.seq],
        "the message is stored once"
    );
}

#[test]
fn every_acked_message_survives_kill_9_and_syncs_in_order() {
    const N: u64 = 200;
    let mut broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let acks = alice.send_many("bob", (1..=N).map(|i| numbered_body(i, 100)), 32);
    assert!(
        acks.iter()
            .all(|a| a.durability == pb::Durability::Disk as i32),
        "under `always` every ack says DISK"
    );

    broker.kill9();
    broker.restart();

    let (bob, sync) = bob_syncs(&broker);
    let conversation = direct("alice");
    assert_seqs(
        &sync.seqs(&conversation),
        1..=N,
        "after kill -9 the sync returns every acked message, in seq order, once",
    );
    for ack in &acks {
        let message = bob.message(&conversation, ack.seq).expect("synced");
        assert_eq!(
            message.msg_id, ack.msg_id,
            "seq {} keeps its msg_id",
            ack.seq
        );
        assert_eq!(
            message.body,
            numbered_body(ack.seq, 100),
            "seq {} keeps its body",
            ack.seq
        );
    }
    let state = sync
        .summary
        .conversations
        .iter()
        .find(|c| c.conversation.as_ref() == Some(&conversation))
        .expect("the summary lists the conversation with news");
    assert_eq!(state.last_seq, N, "the summary's last_seq");
    assert_eq!(state.unread, N, "bob lacks all of them");
    assert_eq!(
        sync.summary.total_messages, N,
        "the pages carry every message"
    );
}

#[test]
fn a_crash_in_mid_stream_loses_no_acked_message_and_leaves_no_gap() {
    const KILL_AFTER_ACKS: usize = 300;
    let mut broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let acked = AtomicUsize::new(0);

    let run = thread::scope(|s| {
        let sender = s.spawn(|| {
            alice.pipeline_sends(
                "bob",
                (1..=100_000).map(|i| numbered_body(i, 64)),
                64,
                |_| {
                    acked.fetch_add(1, Ordering::Relaxed);
                },
            )
        });
        let deadline = Instant::now() + TIMEOUT;
        while acked.load(Ordering::Relaxed) < KILL_AFTER_ACKS {
            assert!(
                Instant::now() < deadline,
                "only {} sends acked within {TIMEOUT:?}",
                acked.load(Ordering::Relaxed)
            );
            thread::sleep(Duration::from_millis(2));
        }
        broker.kill9();
        sender
            .join()
            .expect("the sender thread ends when the broker dies")
    });
    assert!(
        run.closed.is_some(),
        "the sender saw the broker die before it ran out of messages"
    );
    let last_acked = run.acks.last().expect("some sends were acked").seq;

    broker.restart();
    let (bob, sync) = bob_syncs(&broker);
    let conversation = direct("alice");
    let synced = sync.seqs(&conversation);
    let highest = synced.last().copied().unwrap_or(0);
    assert_seqs(
        &synced,
        1..=highest,
        "what survived is a gap-free prefix 1..=k, in order",
    );
    assert!(
        highest >= last_acked,
        "every acked message survived kill -9: the last ack had seq {last_acked}, the log ends \
         at {highest}"
    );
    for (ack, body) in run.acks.iter().zip(&run.bodies) {
        let message = bob.message(&conversation, ack.seq).expect("synced");
        assert_eq!(
            (message.msg_id, &message.body),
            (ack.msg_id, body),
            "acked seq {} survived as it was acked",
            ack.seq
        );
    }
    bob.assert_no_duplicates();
}

#[test]
fn seqs_continue_after_a_crash_without_reuse() {
    let mut broker = Broker::start(&[]);
    let acks = broker.connect("alice", "phone").send_many(
        "bob",
        (1..=20).map(|i| numbered_body(i, 10)),
        8,
    );

    broker.kill9();
    broker.restart();

    let after = broker
        .connect("alice", "phone")
        .send("bob", Bytes::from_static(b"after the crash"));
    assert_eq!(
        after.seq, 21,
        "the conversation's seq goes on from the last stored message"
    );
    assert!(
        acks.iter().all(|a| a.msg_id < after.msg_id),
        "message ids stay time-ordered across the crash"
    );
}
