//! Receipts, unread counts and the conversation list: a user's read cursor per conversation
//! moves with READ receipts from any of its devices (and with its own messages), is relayed to
//! the other user of a direct conversation and to the reader's other devices, survives restarts
//! and `kill -9`; unread = newest seq − read cursor, the same on every device; groups count
//! readers per message without telling every member; the conversation list orders a user's
//! conversations by activity with their newest message, in pages.

use std::time::Duration;

use parley_proto::pb;
use parley_proto::pb::GroupAction as A;
use parley_tests::{Broker, ErrorCode, TIMEOUT, direct, group, group_request};

/// The list entry of `conversation` in `list`.
fn entry<'a>(
    list: &'a pb::ConversationList,
    conversation: &pb::Conversation,
) -> &'a pb::ConversationState {
    list.conversations
        .iter()
        .find(|c| c.conversation.as_ref() == Some(conversation))
        .unwrap_or_else(|| panic!("{conversation:?} is not in the list: {list:?}"))
}

#[test]
fn a_read_receipt_reaches_the_sender_and_the_readers_other_devices() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut bob_laptop = broker.connect("bob", "laptop");
    for i in 1..=3 {
        alice.send("bob", format!("m{i}"));
    }
    bob.wait_for_cursor(&direct("alice"), 3, TIMEOUT);
    bob.mark_read(&direct("alice"), 2);

    let to_sender = alice.expect_receipt(&direct("bob"));
    assert_eq!(
        (to_sender.r#type, to_sender.seq, to_sender.user.as_str()),
        (pb::ReceiptType::Read as i32, 2, "bob")
    );
    assert!(to_sender.time > 0);
    let to_other_device = bob_laptop.expect_receipt(&direct("alice"));
    assert_eq!(
        (to_other_device.seq, to_other_device.user.as_str()),
        (2, "bob")
    );
    for frame in bob.receive_for(Duration::from_millis(300)) {
        assert!(
            !matches!(frame.body, Some(pb::frame::Body::Receipt(_))),
            "the reading device is not told its own receipt"
        );
    }
}

#[test]
fn unread_counts_follow_the_read_cursor_on_every_device_and_never_go_back() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut bob_laptop = broker.connect("bob", "laptop");
    for i in 1..=3 {
        alice.send("bob", format!("m{i}"));
    }
    // Lists answer from the home: once bob has the messages, so has his home.
    bob.wait_for_cursor(&direct("alice"), 3, TIMEOUT);
    bob_laptop.wait_for_cursor(&direct("alice"), 3, TIMEOUT);
    let list = bob.conversation_list(0, None);
    let e = entry(&list, &direct("alice"));
    assert_eq!(
        (e.last_seq, e.read_seq, e.unread_count, e.unread),
        (3, 0, 3, 3)
    );

    bob.mark_read(&direct("alice"), 2);
    bob_laptop.expect_receipt(&direct("alice"));
    let e = bob_laptop.conversation_list(0, None);
    assert_eq!(
        entry(&e, &direct("alice")).unread_count,
        1,
        "the other device agrees"
    );

    bob.mark_read(&direct("alice"), 1);
    let e = bob.conversation_list(0, None);
    assert_eq!(
        entry(&e, &direct("alice")).read_seq,
        2,
        "a receipt below the cursor changes nothing"
    );
    bob.mark_read(&direct("alice"), 99);
    bob_laptop.expect_receipt(&direct("alice"));
    let e = bob.conversation_list(0, None);
    assert_eq!(
        (
            entry(&e, &direct("alice")).read_seq,
            entry(&e, &direct("alice")).unread_count
        ),
        (3, 0),
        "a receipt past the newest message is held to it"
    );

    let sender = alice.conversation_list(0, None);
    assert_eq!(
        entry(&sender, &direct("bob")).unread_count,
        0,
        "a user's own messages count as read"
    );
    assert_eq!(entry(&sender, &direct("bob")).peer_read_seq, 3);
}

#[test]
fn the_delivery_cursor_follows_the_devices_acks_and_delivered_receipts_are_refused() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    alice.send("bob", "one");
    alice.send("bob", "two");
    bob.wait_for_cursor(&direct("alice"), 2, TIMEOUT);
    // The acks went out with the deliveries; a ping orders them before the list request.
    bob.ping();
    let list = bob.conversation_list(0, None);
    assert_eq!(entry(&list, &direct("alice")).delivered_seq, 2);

    bob.request(pb::frame::Body::Receipt(pb::Receipt {
        conversation: Some(direct("alice")),
        r#type: pb::ReceiptType::Delivered as i32,
        seq: 2,
        user: String::new(),
        time: 0,
    }));
    assert_eq!(
        bob.expect_error(TIMEOUT).code,
        ErrorCode::InvalidArgument as i32
    );
}

#[test]
fn the_conversation_list_orders_by_activity_with_the_newest_message_in_pages() {
    let broker = Broker::start(&[]);
    let mut me = broker.connect("me", "phone");
    let mut friends: Vec<_> = (0..5)
        .map(|i| broker.connect(&format!("f{i}"), "phone"))
        .collect();
    for (i, f) in friends.iter_mut().enumerate() {
        f.send("me", format!("hello from f{i}"));
        std::thread::sleep(Duration::from_millis(3));
    }
    // f1 speaks again: it is the most recent.
    friends[1].send("me", "f1 again");
    me.wait_until(TIMEOUT, "holding every friend's messages", |c| {
        (0..5).all(|i| c.cursor(&direct(&format!("f{i}"))) >= 1) && c.cursor(&direct("f1")) >= 2
    });

    let first = me.conversation_list(2, None);
    let ids: Vec<_> = first
        .conversations
        .iter()
        .map(|c| c.conversation.as_ref().map(|v| v.id.clone()))
        .collect();
    assert_eq!(ids, vec![Some("f1".into()), Some("f4".into())]);
    assert!(first.more);
    let newest = first.conversations[0]
        .last_message
        .as_ref()
        .expect("newest message");
    assert_eq!(&newest.body[..], b"f1 again");
    assert_eq!(newest.conversation.as_ref(), Some(&direct("f1")));
    assert!(first.conversations[0].last_activity >= first.conversations[1].last_activity);

    let last = &first.conversations[1];
    let next = me.conversation_list(
        10,
        Some((last.last_activity, last.conversation.clone().expect("set"))),
    );
    let ids: Vec<_> = next
        .conversations
        .iter()
        .map(|c| c.conversation.as_ref().map(|v| v.id.clone()))
        .collect();
    assert_eq!(
        ids,
        vec![Some("f3".into()), Some("f2".into()), Some("f0".into())]
    );
    assert!(!next.more);
}

#[test]
fn cursors_and_the_conversation_list_survive_a_restart_and_a_kill_9() {
    let mut broker = Broker::start(&[]);
    {
        let mut alice = broker.connect("alice", "phone");
        let mut bob = broker.connect("bob", "phone");
        for i in 1..=4 {
            alice.send("bob", format!("m{i}"));
        }
        bob.wait_for_cursor(&direct("alice"), 4, TIMEOUT);
        bob.mark_read(&direct("alice"), 2);
        alice.expect_receipt(&direct("bob"));
    }
    broker.restart();
    let mut bob = broker.connect("bob", "phone");
    let list = bob.conversation_list(0, None);
    let e = entry(&list, &direct("alice"));
    assert_eq!(
        (e.read_seq, e.unread_count),
        (2, 2),
        "after a clean restart"
    );
    assert_eq!(
        e.last_message.as_ref().map(|m| m.body.to_vec()),
        Some(b"m4".to_vec()),
        "the newest message is read back from the log"
    );

    let mut alice = broker.connect("alice", "phone");
    bob.mark_read(&direct("alice"), 3);
    alice.expect_receipt(&direct("bob"));
    broker.kill9();
    broker.restart();
    let mut bob = broker.connect("bob", "laptop");
    let e = bob.conversation_list(0, None);
    assert_eq!(entry(&e, &direct("alice")).read_seq, 3, "after kill -9");
    let mut alice = broker.connect("alice", "phone");
    let e = alice.conversation_list(0, None);
    assert_eq!(entry(&e, &direct("bob")).peer_read_seq, 3);
    assert_eq!(entry(&e, &direct("bob")).unread_count, 0);
}

#[test]
fn a_group_counts_its_readers_per_message_without_telling_every_member() {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut carol = broker.connect("carol", "phone");
    let mut eve = broker.connect("eve", "phone");
    alice.group(group_request(A::Create, "team", &["bob", "carol"]));
    alice.send_to(&team, "one"); // seq 2
    alice.send_to(&team, "two"); // seq 3
    // A client marks read what it has: the deliveries first.
    bob.expect_delivery(&team, 3, TIMEOUT);
    carol.expect_delivery(&team, 3, TIMEOUT);
    bob.mark_read(&team, 3);
    carol.mark_read(&team, 2);
    // Receipts are not answered, and a reader's home tells the group's owner (maybe another
    // shard) after it took the receipt: the counts catch up within moments, not at once.
    bob.ping();
    carol.ping();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let counts = loop {
        let counts = alice.read_counts(&team, 1, 10).expect("a member may ask");
        // alice sent 2 and 3 (so read them), bob read all, carol up to 2.
        if counts.counts == [3, 3, 2] || std::time::Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(counts.from_seq, 1);
    assert_eq!(counts.counts, vec![3, 3, 2]);
    assert_eq!(counts.member_count, 3);
    for frame in alice.receive_for(Duration::from_millis(300)) {
        assert!(
            !matches!(frame.body, Some(pb::frame::Body::Receipt(_))),
            "members are not told each reader's receipt"
        );
    }
    let list = carol.conversation_list(0, None);
    assert_eq!(entry(&list, &team).unread_count, 1);
    assert_eq!(
        eve.read_counts(&team, 1, 3).map_err(|e| e.code),
        Err(ErrorCode::Forbidden as i32)
    );
}

#[test]
fn a_conversation_list_page_never_passes_the_frame_limit_and_the_rest_comes_next() {
    let broker = Broker::start(&[]);
    let mut me = broker.connect("me", "phone");
    let body = "x".repeat(4000);
    for i in 0..30 {
        let mut f = broker.connect(&format!("f{i:02}"), "phone");
        f.send("me", body.clone());
    }
    me.wait_until(TIMEOUT, "holding every friend's message", |c| {
        (0..30).all(|i| c.cursor(&direct(&format!("f{i:02}"))) >= 1)
    });
    let first = me.conversation_list(0, None);
    assert!(
        first.more,
        "30 newest messages of 4 KB do not fit one 64-KiB frame"
    );
    let n = first.conversations.len();
    assert!(
        (10..30).contains(&n),
        "a page as full as the frame allows: {n}"
    );
    let last = first.conversations.last().expect("entries");
    let rest = me.conversation_list(
        0,
        Some((last.last_activity, last.conversation.clone().expect("set"))),
    );
    let mut seen: Vec<_> = first
        .conversations
        .iter()
        .chain(rest.conversations.iter())
        .filter_map(|c| c.conversation.as_ref().map(|v| v.id.clone()))
        .collect();
    if rest.more {
        let last = rest.conversations.last().expect("entries");
        let third = me.conversation_list(
            0,
            Some((last.last_activity, last.conversation.clone().expect("set"))),
        );
        assert!(!third.more);
        seen.extend(
            third
                .conversations
                .iter()
                .filter_map(|c| c.conversation.as_ref().map(|v| v.id.clone())),
        );
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 30, "every conversation, once, over the pages");
}
