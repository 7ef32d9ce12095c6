//! Offline sync and history (promise 2): a reconnecting client says what it holds and gets
//! exactly what it missed, in seq order, paged; history pages through a conversation in both
//! directions; a client that reconnects again and again while messages flow ends up with every
//! message once.

use std::thread;
use std::time::{Duration, Instant};

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_tests::{
    Broker, Client, ErrorCode, SyncResult, TIMEOUT, assert_seqs, direct, numbered_body,
};

/// Sends `n` numbered messages from a fresh alice/phone to bob; returns their acks.
fn alice_sends(broker: &Broker, n: u64) -> Vec<pb::SendAck> {
    let mut alice = broker.connect("alice", "phone");
    alice.send_many("bob", (1..=n).map(|i| numbered_body(i, 32)), 32)
}

/// Bob/phone, logged in but not yet synced.
fn bob_logged_in(broker: &Broker) -> Client {
    let mut bob = broker.tcp();
    bob.login("bob", "phone");
    bob
}

fn seqs(messages: &[pb::Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

#[test]
fn an_offline_receiver_gets_every_missed_message_in_order_on_reconnect() {
    const N: u64 = 50;
    const PAGE: u32 = 16;
    let broker = Broker::start(&[]);
    let acks = alice_sends(&broker, N);

    let mut bob = bob_logged_in(&broker);
    let sync = bob.sync_with(Vec::new(), PAGE);
    let conversation = direct("alice");

    let news: Vec<_> = sync
        .summary
        .conversations
        .iter()
        .map(|c| (c.conversation.clone(), c.last_seq, c.unread))
        .collect();
    assert_eq!(
        news,
        vec![(Some(conversation.clone()), N, N)],
        "the summary lists the one conversation with news: last_seq and unread"
    );
    assert_eq!(
        sync.summary.total_messages, N,
        "the summary counts what follows"
    );
    assert!(
        sync.pages.iter().all(|p| p.messages.len() <= PAGE as usize),
        "no page is larger than the page size asked for"
    );
    assert!(
        sync.pages.len() as u64 >= N.div_ceil(u64::from(PAGE)),
        "{N} messages in pages of {PAGE} take several pages"
    );
    assert!(
        sync.pages[..sync.pages.len() - 1].iter().all(|p| !p.done),
        "only the last page says done"
    );
    assert_seqs(
        &sync.seqs(&conversation),
        1..=N,
        "every missed message comes once, in seq order",
    );
    for ack in &acks {
        let message = bob.message(&conversation, ack.seq).expect("synced");
        assert_eq!(message.msg_id, ack.msg_id);
        assert_eq!(message.from_user, "alice");
        assert_eq!(message.body, numbered_body(ack.seq, 32));
    }
}

#[test]
fn sync_returns_only_what_the_cursor_lacks() {
    const N: u64 = 30;
    const HELD: u64 = 20;
    let broker = Broker::start(&[]);
    alice_sends(&broker, N);

    let mut bob = bob_logged_in(&broker);
    let cursor = pb::AckCursor {
        conversation: Some(direct("alice")),
        seq: HELD,
    };
    let sync = bob.sync_with(vec![cursor], 0);
    assert_eq!(
        sync.seqs(&direct("alice")),
        (HELD + 1..=N).collect::<Vec<_>>(),
        "a client holding 1..={HELD} gets {}..={N}, in order",
        HELD + 1
    );
    let state = sync
        .summary
        .conversations
        .first()
        .expect("the summary lists the conversation with news");
    assert_eq!(
        (state.last_seq, state.unread),
        (N, N - HELD),
        "unread = last_seq - cursor"
    );
}

#[test]
fn a_client_that_missed_nothing_gets_one_empty_final_page() {
    let broker = Broker::start(&[]);
    alice_sends(&broker, 5);
    let mut bob = bob_logged_in(&broker);
    bob.sync_with(Vec::new(), 0);

    let again = bob.sync();
    assert!(
        again.summary.conversations.is_empty() && again.summary.total_messages == 0,
        "nothing is news: {:?}",
        again.summary
    );
    assert_eq!(again.pages.len(), 1, "a single page");
    assert!(
        again.pages[0].done && again.pages[0].messages.is_empty(),
        "an empty page that says done"
    );
}

#[test]
fn a_second_sync_request_while_one_runs_is_refused_and_the_first_completes_untouched() {
    const N: u64 = 60;
    const PAGE: u32 = 4;
    let broker = Broker::start(&[]);
    alice_sends(&broker, N);
    let mut bob = bob_logged_in(&broker);
    let conversation = direct("alice");
    let request = || {
        Body::SyncRequest(pb::SyncRequest {
            cursors: Vec::new(),
            page_size: PAGE,
            max_per_conversation: 0,
        })
    };
    // Both in one write: the broker reads the second while the first is still paging.
    let ids = bob.request_together(vec![request(), request()]);
    let (first, second) = (ids[0], ids[1]);

    let mut to_first = Vec::new();
    let mut to_second = Vec::new();
    bob.recv_until(TIMEOUT, |f| {
        if f.request_id == second {
            to_second.push(f.clone());
        }
        if f.request_id != first {
            return false;
        }
        to_first.push(f.clone());
        matches!(&f.body, Some(Body::SyncPage(p)) if p.done)
    });
    // Anything still on its way for the second request.
    to_second.extend(
        bob.receive_for(Duration::from_millis(300))
            .into_iter()
            .filter(|f| f.request_id == second),
    );

    let mut sync = SyncResult::default();
    for f in to_first {
        match f.body {
            Some(Body::SyncSummary(s)) => sync.summary = s,
            Some(Body::SyncPage(p)) => sync.pages.push(p),
            other => panic!("the running sync is answered by a summary and pages: {other:?}"),
        }
    }
    assert_eq!(sync.summary.total_messages, N, "the first sync's summary");
    assert_seqs(
        &sync.seqs(&conversation),
        1..=N,
        "the running sync carries every missed message once, in order, to its done page",
    );
    assert_eq!(
        sync.pages.iter().filter(|p| p.done).count(),
        1,
        "one done page"
    );
    let answers: Vec<_> = to_second.iter().map(|f| f.body.clone()).collect();
    let [Some(Body::Error(e))] = answers.as_slice() else {
        panic!("the second SyncRequest gets one Error and nothing else, got {answers:?}");
    };
    assert_eq!(
        (e.code, e.fatal),
        (ErrorCode::UnexpectedFrame as i32, false),
        "the refusal is UNEXPECTED_FRAME and not fatal: {:?}",
        e.message
    );
    assert!(e.message.contains("already running"), "{:?}", e.message);

    // The connection goes on: a sync after the done page is served, and live push resumed.
    let again = bob.sync();
    assert_eq!(again.summary.total_messages, 0, "nothing is news");
    let mut alice = broker.connect("alice", "laptop");
    let next = alice.send("bob", "after the sync");
    bob.expect_delivery(&conversation, next.seq, TIMEOUT);
    bob.assert_no_duplicates();
}

#[test]
fn max_per_conversation_syncs_only_the_newest_missed_messages_and_live_push_goes_on_above() {
    const N: u64 = 30;
    const MAX: u32 = 10;
    let broker = Broker::start(&[
        // A client holding 21..=30 cannot ack cumulatively from 1: no retransmit in this test.
        "timeouts.retransmit_initial_ms=30000",
        "timeouts.retransmit_max_ms=30000",
    ]);
    alice_sends(&broker, N);
    let conversation = direct("alice");
    let newest = |bob: &mut Client, cursor: Option<u64>| {
        bob.sync_request(pb::SyncRequest {
            cursors: cursor
                .map(|seq| pb::AckCursor {
                    conversation: Some(direct("alice")),
                    seq,
                })
                .into_iter()
                .collect(),
            page_size: 4,
            max_per_conversation: MAX,
        })
    };

    let mut phone = bob_logged_in(&broker);
    let sync = newest(&mut phone, None);
    let state = &sync.summary.conversations[0];
    assert_eq!(
        (state.last_seq, state.unread),
        (N, N),
        "unread still says what the client lacks"
    );
    assert_eq!(
        sync.summary.total_messages,
        u64::from(MAX),
        "total_messages counts what the pages carry"
    );
    assert_seqs(
        &sync.seqs(&conversation),
        N - u64::from(MAX) + 1..=N,
        "the pages carry the newest max_per_conversation missed messages, in order",
    );

    // A client lacking fewer than the bound gets all it lacks.
    let mut tablet = broker.tcp();
    tablet.login("bob", "tablet");
    let sync = newest(&mut tablet, Some(25));
    assert_eq!(
        (
            sync.summary.conversations[0].unread,
            sync.summary.total_messages
        ),
        (5, 5)
    );
    assert_seqs(&sync.seqs(&conversation), 26..=N, "all it lacks");

    // Live push resumes above last_seq; the older seqs are simply never sent.
    phone.ack(&conversation, N);
    let mut alice = broker.connect("alice", "laptop");
    let next = alice.send("bob", "live after a short sync");
    assert_eq!(next.seq, N + 1);
    phone.expect_delivery(&conversation, N + 1, TIMEOUT);
    phone.receive_for(Duration::from_millis(300));
    assert_seqs(
        &phone.held_seqs(&conversation),
        N - u64::from(MAX) + 1..=N + 1,
        "nothing older than the synced range arrives later",
    );
    phone.assert_no_duplicates();
}

#[test]
fn a_sync_of_large_messages_brings_every_one() {
    const N: u64 = 40;
    const BODY: usize = 16 * 1024;
    let broker = Broker::start(&["storage.durability=never"]);
    let mut alice = broker.connect("alice", "phone");
    alice.send_many("bob", (1..=N).map(|i| numbered_body(i, BODY)), 8);

    let mut bob = bob_logged_in(&broker);
    let sync = bob.sync_with(Vec::new(), 0);
    assert_seqs(
        &sync.seqs(&direct("alice")),
        1..=N,
        "a sync brings every missed message however large they are (pages must fit a frame)",
    );
}

#[test]
fn a_history_page_of_large_messages_is_cut_to_fit_and_says_more() {
    const N: u64 = 40;
    const BODY: usize = 16 * 1024;
    let broker = Broker::start(&["storage.durability=never"]);
    let mut alice = broker.connect("alice", "phone");
    alice.send_many("bob", (1..=N).map(|i| numbered_body(i, BODY)), 8);

    let page = alice.history(&direct("bob"), 0, None, 0);
    let got = seqs(&page.messages);
    let oldest = got.first().copied().unwrap_or(N + 1);
    assert!(
        !got.is_empty(),
        "the newest page holds at least one message"
    );
    assert_seqs(
        &got,
        oldest..=N,
        "the newest page holds the newest messages, ascending",
    );
    assert_eq!(
        page.more,
        oldest > 1,
        "`more` says whether older messages exist beyond the page"
    );
}

#[test]
fn history_pages_backwards_from_the_newest() {
    let broker = Broker::start(&[]);
    alice_sends(&broker, 30);
    let mut alice = broker.connect("alice", "laptop");
    let bob = direct("bob");

    let newest = alice.history(&bob, 0, None, 10);
    assert_eq!(
        seqs(&newest.messages),
        (21..=30).collect::<Vec<_>>(),
        "the newest ten, ascending"
    );
    assert!(newest.more, "older messages exist");
    assert_eq!(
        (newest.first_seq, newest.last_seq),
        (1, 30),
        "the stored range"
    );

    let older = alice.history(&bob, 21, None, 10);
    assert_eq!(
        seqs(&older.messages),
        (11..=20).collect::<Vec<_>>(),
        "the ten before seq 21"
    );
    assert!(older.more);

    let oldest = alice.history(&bob, 11, None, 10);
    assert_eq!(
        seqs(&oldest.messages),
        (1..=10).collect::<Vec<_>>(),
        "the ten before seq 11"
    );
    assert!(!oldest.more, "nothing is older than seq 1");
    assert!(
        oldest
            .messages
            .iter()
            .all(|m| m.conversation.as_ref() == Some(&bob)),
        "history names the conversation from the reader's point of view"
    );
}

#[test]
fn history_pages_forwards_after_a_seq() {
    let broker = Broker::start(&[]);
    alice_sends(&broker, 30);
    let mut alice = broker.connect("alice", "laptop");
    let bob = direct("bob");

    let page = alice.history(&bob, 0, Some(5), 10);
    assert_eq!(
        seqs(&page.messages),
        (6..=15).collect::<Vec<_>>(),
        "the ten after seq 5"
    );
    assert!(page.more, "newer messages exist");

    let last = alice.history(&bob, 0, Some(25), 10);
    assert_eq!(
        seqs(&last.messages),
        (26..=30).collect::<Vec<_>>(),
        "what is left after seq 25"
    );
    assert!(!last.more, "nothing is newer than seq 30");
}

#[test]
fn history_pages_forwards_from_the_very_first_message_with_after_seq_zero() {
    let broker = Broker::start(&[]);
    alice_sends(&broker, 30);
    let mut alice = broker.connect("alice", "laptop");
    let bob = direct("bob");

    let first = alice.history(&bob, 0, Some(0), 10);
    assert_eq!(
        seqs(&first.messages),
        (1..=10).collect::<Vec<_>>(),
        "after_seq present and 0: the oldest ten, not the newest"
    );
    assert!(first.more, "newer messages exist");
    let next = alice.history(&bob, 0, Some(10), 10);
    assert_eq!(seqs(&next.messages), (11..=20).collect::<Vec<_>>());

    let newest = alice.history(&bob, 0, None, 10);
    assert_eq!(
        seqs(&newest.messages),
        (21..=30).collect::<Vec<_>>(),
        "after_seq absent: the newest page, as before"
    );
}

#[test]
fn message_ids_are_unique_ordered_by_millisecond_and_increase_with_seq_across_restarts() {
    const PEERS: [&str; 4] = ["bob", "carol", "dave", "erin"];
    const CHUNK: u64 = 20;
    let mut broker = Broker::start(&[
        "storage.durability=never",
        // Checkpoints every few dozen messages: restarts replay from before one.
        "storage.checkpoint_every_bytes=8192",
    ]);
    // Interleaved sends to four conversations (spread over the shards), with a crash and a
    // clean restart in between.
    let mut sent = 0;
    for round in 0..6 {
        if round == 2 {
            broker.kill9();
            broker.restart();
        } else if round == 4 {
            broker.restart();
        }
        let mut alice = broker.connect("alice", "phone");
        for peer in PEERS {
            alice.send_many(peer, (1..=CHUNK).map(|i| numbered_body(sent + i, 32)), 8);
        }
        sent += CHUNK;
    }

    let mut alice = broker.connect("alice", "laptop");
    let mut all: Vec<pb::Message> = Vec::new();
    for peer in PEERS {
        let page = alice.history(&direct(peer), 0, Some(0), 0);
        assert_seqs(&seqs(&page.messages), 1..=sent, "every message is stored");
        assert!(
            page.messages.windows(2).all(|w| w[0].msg_id < w[1].msg_id),
            "within a conversation msg_id strictly increases with seq, across a crash and a \
             restart: {:?}",
            page.messages
                .iter()
                .map(|m| (m.seq, m.msg_id))
                .collect::<Vec<_>>()
        );
        all.extend(page.messages);
    }
    let ids: std::collections::BTreeSet<u64> = all.iter().map(|m| m.msg_id).collect();
    assert_eq!(ids.len(), all.len(), "msg_ids are unique on the node");
    all.sort_by_key(|m| m.msg_id);
    for w in all.windows(2) {
        assert!(
            w[0].server_time <= w[1].server_time,
            "an id of a later millisecond is larger, whichever conversation (shard) it is in: \
             seq {} of {:?} (id {}, stored at {}) and seq {} of {:?} (id {}, stored at {})",
            w[0].seq,
            w[0].conversation,
            w[0].msg_id,
            w[0].server_time,
            w[1].seq,
            w[1].conversation,
            w[1].msg_id,
            w[1].server_time
        );
    }
}

#[test]
fn history_is_the_same_conversation_from_either_side() {
    let broker = Broker::start(&[]);
    let acks = alice_sends(&broker, 12);
    let mut alice = broker.connect("alice", "laptop");
    let mut bob = broker.connect("bob", "phone");

    let from_alice = alice.history(&direct("bob"), 0, None, 0);
    let from_bob = bob.history(&direct("alice"), 0, None, 0);
    let ids = |page: &pb::HistoryPage| -> Vec<(u64, u64)> {
        page.messages.iter().map(|m| (m.seq, m.msg_id)).collect()
    };
    let sent: Vec<(u64, u64)> = acks.iter().map(|a| (a.seq, a.msg_id)).collect();
    assert_eq!(ids(&from_alice), sent, "alice's view holds what she sent");
    assert_eq!(ids(&from_bob), sent, "bob's view holds the same messages");
}

#[test]
fn a_receiver_reconnecting_mid_stream_misses_nothing_and_gets_nothing_twice() {
    const N: u64 = 2_000;
    const CHUNK: u64 = 100;
    const RECONNECT_EVERY: u64 = 300;
    let limit = Duration::from_secs(30);
    let broker = Broker::start(&[
        "storage.durability=never",
        // Well beyond the test's pace: a duplicate here can only be a real one.
        "timeouts.retransmit_initial_ms=10000",
        "timeouts.retransmit_max_ms=10000",
    ]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let conversation = direct("alice");
    let started = Instant::now();

    let (acks, reconnects) = thread::scope(|s| {
        let sender = s.spawn(|| {
            let mut acks = Vec::new();
            for chunk in 0..N / CHUNK {
                let bodies =
                    (chunk * CHUNK + 1..=(chunk + 1) * CHUNK).map(|i| numbered_body(i, 32));
                acks.extend(alice.send_many("bob", bodies, 32));
                // Pacing, not synchronisation: spread the stream over the receiver's reconnects.
                thread::sleep(Duration::from_millis(25));
            }
            acks
        });
        let mut reconnects = 0;
        let mut next_reconnect = RECONNECT_EVERY;
        while next_reconnect < N {
            let remaining = limit.saturating_sub(started.elapsed());
            bob.wait_for_cursor(&conversation, next_reconnect, remaining);
            if !sender.is_finished() {
                reconnects += 1;
            }
            bob.reconnect();
            next_reconnect += RECONNECT_EVERY;
        }
        let acks = sender.join().expect("the sender sent every message");
        (acks, reconnects)
    });
    bob.wait_for_cursor(&conversation, N, limit.saturating_sub(started.elapsed()));

    let acked: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    assert_seqs(
        &acked,
        1..=N,
        "alice's sends got seqs 1..=N in sending order",
    );
    assert!(
        reconnects >= 5,
        "bob reconnected {reconnects} times mid-stream"
    );
    assert_seqs(
        &bob.held_seqs(&conversation),
        1..=N,
        "bob holds every message",
    );
    for seq in [1, N / 3, N] {
        assert_eq!(
            bob.message(&conversation, seq).expect("held").body,
            numbered_body(seq, 32)
        );
    }
    bob.assert_no_duplicates();
}
