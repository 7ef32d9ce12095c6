//! 1:1 messages (promises 2 and 4): a send is acked with its seq once stored and pushed to every
//! online device of the recipient and to the sender's other devices, over TCP and WebSocket
//! alike, in order, with no gaps and no duplicates.

use std::thread;
use std::time::{Duration, Instant};

use parley_proto::pb;
use parley_tests::{Broker, TIMEOUT, assert_seqs, direct, numbered_body};

/// Checks the fields of a delivered message against the ack its sender got.
fn assert_delivered_as_sent(
    message: &pb::Message,
    ack: &pb::SendAck,
    seen_as: &pb::Conversation,
    from: (&str, &str),
    body: &[u8],
) {
    assert_eq!(
        message.conversation.as_ref(),
        Some(seen_as),
        "a message names its conversation from the receiver's point of view"
    );
    assert_eq!(message.seq, ack.seq, "the delivered seq is the acked one");
    assert_eq!(
        message.msg_id, ack.msg_id,
        "the delivered msg_id is the acked one"
    );
    assert_eq!(message.from_user, from.0, "the sending user");
    assert_eq!(message.from_device, from.1, "the sending device");
    assert_eq!(
        message.client_msg_id, ack.client_msg_id,
        "the sender's client_msg_id travels with the message"
    );
    assert_eq!(message.body.as_ref(), body, "the body arrives unchanged");
}

#[test]
fn direct_message_over_tcp_is_acked_stored_and_delivered() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");

    let ack = alice.send("bob", "hello bob");
    assert_eq!(ack.seq, 1, "the first message of a conversation has seq 1");
    assert_ne!(ack.msg_id, 0, "every stored message gets a message id");
    assert_eq!(
        ack.conversation,
        Some(direct("bob")),
        "the ack names the conversation from the sender's point of view"
    );
    assert_eq!(
        ack.durability,
        pb::Durability::Disk as i32,
        "under the default durability `always` an ack means flushed to disk"
    );
    let message = bob.expect_delivery(&direct("alice"), 1, TIMEOUT);
    assert_delivered_as_sent(
        &message,
        &ack,
        &direct("alice"),
        ("alice", "phone"),
        b"hello bob",
    );

    let second = alice.send("bob", "again");
    assert_eq!(second.seq, 2, "seqs go up by one");
    assert!(second.msg_id > ack.msg_id, "message ids are time-ordered");
    bob.expect_delivery(&direct("alice"), 2, TIMEOUT);
    bob.assert_no_duplicates();
}

#[test]
fn direct_message_over_websocket_is_delivered() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect_ws("alice", "phone");
    let mut bob = broker.connect_ws_url_token("bob", "phone");

    let ack = alice.send("bob", "hello over websocket");
    assert_eq!(ack.seq, 1);
    let message = bob.expect_delivery(&direct("alice"), 1, TIMEOUT);
    assert_delivered_as_sent(
        &message,
        &ack,
        &direct("alice"),
        ("alice", "phone"),
        b"hello over websocket",
    );

    let reply = bob.send("alice", "hello back");
    assert_eq!(reply.seq, 2, "both directions share the conversation's seq");
    alice.expect_delivery(&direct("bob"), 2, TIMEOUT);
}

#[test]
fn tcp_and_websocket_clients_talk_to_each_other() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect_ws("bob", "browser");

    let ack = alice.send("bob", "from tcp");
    let message = bob.expect_delivery(&direct("alice"), ack.seq, TIMEOUT);
    assert_delivered_as_sent(
        &message,
        &ack,
        &direct("alice"),
        ("alice", "phone"),
        b"from tcp",
    );

    let reply = bob.send("alice", "from websocket");
    let message = alice.expect_delivery(&direct("bob"), reply.seq, TIMEOUT);
    assert_delivered_as_sent(
        &message,
        &reply,
        &direct("bob"),
        ("bob", "browser"),
        b"from websocket",
    );
}

#[test]
fn every_online_device_of_the_recipient_receives() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob_phone = broker.connect("bob", "phone");
    let mut bob_laptop = broker.connect_ws("bob", "laptop");

    let ack = alice.send("bob", "to all of bob");
    let m = bob_phone.expect_delivery(&direct("alice"), ack.seq, TIMEOUT);
    assert_eq!(m.msg_id, ack.msg_id, "bob's phone gets the message");
    let m = bob_laptop.expect_delivery(&direct("alice"), ack.seq, TIMEOUT);
    assert_eq!(m.msg_id, ack.msg_id, "bob's laptop gets the same message");
}

#[test]
fn the_senders_other_devices_receive_its_message() {
    let broker = Broker::start(&[]);
    let mut alice_phone = broker.connect("alice", "phone");
    let mut alice_laptop = broker.connect("alice", "laptop");
    let _bob = broker.connect("bob", "phone");

    let ack = alice_phone.send("bob", "sent from the phone");
    let copy = alice_laptop.expect_delivery(&direct("bob"), ack.seq, TIMEOUT);
    assert_delivered_as_sent(
        &copy,
        &ack,
        &direct("bob"),
        ("alice", "phone"),
        b"sent from the phone",
    );
}

#[test]
fn ten_thousand_pipelined_messages_arrive_in_order_without_gaps_or_duplicates() {
    const N: u64 = 10_000;
    const WINDOW: usize = 256;
    let limit = Duration::from_secs(30);
    let broker = Broker::start(&["storage.durability=never"]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let started = Instant::now();

    let receiver = thread::spawn(move || {
        bob.wait_for_cursor(&direct("alice"), N, limit);
        bob
    });
    let acks = alice.send_many("bob", (1..=N).map(|i| numbered_body(i, 16)), WINDOW);
    let bob = receiver
        .join()
        .expect("the receiving thread got every message");
    let elapsed = started.elapsed();

    let ack_seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    assert_seqs(
        &ack_seqs,
        1..=N,
        "sends from one connection are acked with seqs 1..=N in the order they were sent",
    );
    let conversation = direct("alice");
    assert_seqs(
        &bob.delivered_seqs(&conversation),
        1..=N,
        "bob got seqs 1..=N pushed in order, each once",
    );
    for seq in [1, N / 2, N] {
        let message = bob.message(&conversation, seq).expect("held");
        assert_eq!(
            message.body,
            numbered_body(seq, 16),
            "seq {seq} carries the {seq}th body sent"
        );
    }
    bob.assert_no_duplicates();
    assert!(
        elapsed < limit,
        "{N} messages took {elapsed:?}, more than {limit:?}"
    );
}

/// A `Send` of kind RECALL of `ref_seq` in the conversation with `peer`.
fn recall(peer: &str, client_msg_id: u64, ref_seq: u64) -> pb::frame::Body {
    pb::frame::Body::Send(pb::Send {
        to: Some(direct(peer)),
        client_msg_id,
        content_type: 0,
        body: Default::default(),
        kind: pb::MessageKind::Recall as i32,
        ref_seq,
    })
}

#[test]
fn only_the_sender_may_recall_a_message_and_the_recall_is_delivered() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let sent = alice.send("bob", &b"oops"[..]);
    bob.wait_for_cursor(&direct("alice"), sent.seq, TIMEOUT);

    bob.request(recall("alice", 0xB0B, sent.seq));
    let refused = bob.expect_error(TIMEOUT);
    assert_eq!(
        refused.code,
        pb::ErrorCode::Forbidden as i32,
        "bob may not recall alice's message: {refused:?}"
    );
    assert_eq!(refused.client_msg_id, 0xB0B, "the refusal names the send");
    assert!(!refused.fatal, "a refused send does not end the connection");

    alice.request(recall("bob", 0xA11CE, sent.seq));
    let ack = alice.recv_until(
        TIMEOUT,
        |f| matches!(&f.body, Some(pb::frame::Body::SendAck(a)) if a.client_msg_id == 0xA11CE),
    );
    let Some(pb::frame::Body::SendAck(ack)) = ack.body else {
        unreachable!("the predicate matched a SendAck")
    };
    assert_eq!(
        ack.seq,
        sent.seq + 1,
        "the recall is stored as the next message"
    );
    bob.wait_for_cursor(&direct("alice"), ack.seq, TIMEOUT);
    let delivered = bob
        .message(&direct("alice"), ack.seq)
        .expect("bob holds the recall");
    assert_eq!(delivered.kind, pb::MessageKind::Recall as i32);
    assert_eq!(
        delivered.ref_seq, sent.seq,
        "the recall names the recalled message"
    );
}
