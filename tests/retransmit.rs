//! Deliveries are at-least-once: an unacknowledged delivery is re-sent with the same seq after
//! the retransmit timeout, with back-off, until the client acks it; when every retransmit goes
//! unacknowledged the connection is closed as broken (RETRANSMIT_EXHAUSTED).

use std::time::Duration;

use parley_tests::{Broker, ErrorCode, TIMEOUT, direct};

#[test]
fn an_unacked_delivery_is_retransmitted_with_the_same_seq() {
    let broker = Broker::start(&[
        "timeouts.retransmit_initial_ms=200",
        "timeouts.retransmit_max_ms=400",
    ]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    bob.set_auto_ack(false);

    let ack = alice.send("bob", "did you get this?");
    let first = bob.expect_delivery(&direct("alice"), ack.seq, TIMEOUT);
    let again = bob.expect_delivery(&direct("alice"), ack.seq, TIMEOUT);
    assert_eq!(
        again, first,
        "the retransmit is the same message: same seq, msg_id and body"
    );
}

#[test]
fn acking_a_delivery_stops_its_retransmission() {
    const MAX_MS: u64 = 400;
    let broker = Broker::start(&[
        "timeouts.retransmit_initial_ms=200",
        &format!("timeouts.retransmit_max_ms={MAX_MS}"),
    ]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    bob.set_auto_ack(false);
    let conversation = direct("alice");

    let ack = alice.send("bob", "ack me");
    bob.expect_delivery(&conversation, ack.seq, TIMEOUT);
    // Let one retransmit come, to see that retransmission is running, then ack.
    bob.expect_delivery(&conversation, ack.seq, TIMEOUT);
    bob.ack(&conversation, ack.seq);
    bob.assert_no_delivery(
        &conversation,
        ack.seq,
        Duration::from_millis(3 * MAX_MS),
        "an acked delivery is not retransmitted",
    );
}

#[test]
fn exhausted_retransmits_close_the_connection_with_retransmit_exhausted() {
    const TRIES: usize = 3;
    let broker = Broker::start(&[
        "timeouts.retransmit_initial_ms=100",
        "timeouts.retransmit_max_ms=200",
        &format!("timeouts.retransmit_tries={TRIES}"),
    ]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    bob.set_auto_ack(false);
    let conversation = direct("alice");

    let ack = alice.send("bob", "never acked");
    bob.expect_fatal_error(&[ErrorCode::RetransmitExhausted], TIMEOUT);
    let deliveries = bob
        .delivered_seqs(&conversation)
        .iter()
        .filter(|s| **s == ack.seq)
        .count();
    assert!(
        deliveries >= 2,
        "the message was retransmitted before giving up ({deliveries} deliveries)"
    );
    assert!(
        deliveries <= 1 + TRIES,
        "at most retransmit_tries = {TRIES} retransmits after the first delivery, got \
         {deliveries} deliveries"
    );
}
