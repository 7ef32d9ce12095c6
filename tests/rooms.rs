//! Rooms: ephemeral, at-most-once broadcast to the connections that joined. A JOIN or LEAVE_ROOM
//! is answered with the room's audience and last seq; a message sent to a room reaches every
//! other connection in it, across shards and over every transport (TCP, WebSocket binary and
//! JSON text), once and in seq order; only a member may send; a listener that reads too slowly
//! loses the oldest messages and is told how many (`RoomLag`) while the broker's other
//! connections go on as usual; leaving or closing ends the membership; a joiner gets the room's
//! last messages; limits are refused with clear errors.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_tests::{
    Broker, Client, TIMEOUT, WsClient, assert_seqs, delivery_latency, numbered_body, room,
};

/// What "normal latency" means on loopback, with generous room for a loaded 2-core machine.
const NORMAL_LATENCY: Duration = Duration::from_secs(1);

/// The receive buffer of a listener that stops reading: small, so that the broker (not the
/// kernel) holds the backlog.
const SMALL_RECV_BUFFER: usize = 4096;

/// The room most tests use.
const LIVE: &str = "live";

/// Waits until `client` was pushed at least `n` messages of room `id`; returns their seqs in
/// arrival order.
fn wait_for_room_messages<T: parley_tests::transport::Transport>(
    client: &mut Client<T>,
    id: &str,
    n: usize,
) -> Vec<u64> {
    let conversation = room(id);
    client.wait_until(TIMEOUT, &format!("{n} messages of room {id}"), |c| {
        c.delivered_seqs(&conversation).len() >= n
    });
    client.delivered_seqs(&conversation)
}

#[test]
fn joining_and_leaving_are_answered_with_the_rooms_audience_and_last_seq() {
    let broker = Broker::start(&["storage.durability=never"]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");

    let joined = alice.join_room(LIVE);
    assert_eq!(joined.room_id, LIVE, "the result names the room");
    assert_eq!(
        (joined.audience, joined.last_seq),
        (1, 0),
        "a new room: its first listener, no message yet"
    );
    assert_eq!(
        bob.join_room(LIVE).audience,
        2,
        "the audience counts connections"
    );

    let ack = alice.send_to_room(LIVE, "first");
    assert_eq!(ack.seq, 1, "a room's first message has seq 1");
    assert_eq!(
        ack.durability,
        pb::Durability::Memory as i32,
        "room messages are not stored: acked from memory"
    );
    assert_eq!(ack.conversation, Some(room(LIVE)));
    bob.expect_delivery(&room(LIVE), 1, TIMEOUT);

    let mut carol = broker.connect("carol", "phone");
    let third = carol.join_room(LIVE);
    assert_eq!(
        (third.audience, third.last_seq),
        (3, 1),
        "a later joiner learns the last seq"
    );
    assert_eq!(
        carol.join_room(LIVE).audience,
        3,
        "joining again changes nothing and is answered the same"
    );

    let left = bob.leave_room(LIVE);
    assert_eq!(
        (left.audience, left.last_seq),
        (2, 1),
        "leaving is answered with the audience without the leaver"
    );
    assert_eq!(
        bob.leave_room(LIVE).audience,
        2,
        "leaving a room one is not in changes nothing and is answered too"
    );

    // Room deliveries need no ack: an ack of a room is ignored, not an error.
    carol.request(Body::DeliverAck(pb::DeliverAck {
        acks: vec![pb::AckCursor {
            conversation: Some(room(LIVE)),
            seq: 1,
        }],
    }));
    carol.request(Body::Ping(pb::Ping { nonce: 1 }));
    let next = carol.recv_until(TIMEOUT, |f| {
        matches!(f.body, Some(Body::Pong(_)) | Some(Body::Error(_)))
    });
    assert!(
        matches!(next.body, Some(Body::Pong(_))),
        "an ack of a room is ignored, not refused: {next:?}"
    );
}

#[test]
fn a_room_message_reaches_every_listener_across_shards_once_and_in_order_on_every_transport() {
    const N: u64 = 200;
    let broker = Broker::start(&["shards=2", "storage.durability=never"]);
    // Ten users, so both shards have listeners (each user lives on the shard its id hashes to).
    let mut tcp: Vec<Client> = (0..4)
        .map(|i| broker.connect(&format!("tcp{i}"), "d"))
        .collect();
    let mut binary: Vec<WsClient> = (0..3)
        .map(|i| broker.connect_ws(&format!("ws{i}"), "d"))
        .collect();
    let mut json: Vec<WsClient> = (0..3)
        .map(|i| {
            let mut c = broker.ws();
            c.use_json();
            c.login(&format!("json{i}"), "d");
            c
        })
        .collect();
    let mut host = broker.connect("host", "phone");
    // The sender's other device is a listener like any other.
    let mut host_laptop = broker.connect("host", "laptop");
    host.join_room(LIVE);
    host_laptop.join_room(LIVE);
    for c in &mut tcp {
        c.join_room(LIVE);
    }
    for c in &mut binary {
        c.join_room(LIVE);
    }
    let mut audience = 0;
    for c in &mut json {
        audience = c.join_room(LIVE).audience;
    }
    assert_eq!(audience, 12, "every connection counted, across shards");

    let run = host.pipeline_sends_to(
        room(LIVE),
        (1..=N).map(|i| numbered_body(i, 64)),
        32,
        |_| {},
    );
    assert!(run.closed.is_none(), "the sender stays connected");
    let acked: Vec<u64> = run.acks.iter().map(|a| a.seq).collect();
    assert_seqs(
        &acked,
        1..=N,
        "room sends are acked with seqs 1..=N in order",
    );

    let check = |got: Vec<u64>, who: &str| {
        assert_seqs(
            &got,
            1..=N,
            &format!("{who} got every room message once, in seq order"),
        );
    };
    for (i, c) in tcp.iter_mut().enumerate() {
        check(
            wait_for_room_messages(c, LIVE, N as usize),
            &format!("tcp{i}"),
        );
        c.assert_no_duplicates();
    }
    for (i, c) in binary.iter_mut().enumerate() {
        check(
            wait_for_room_messages(c, LIVE, N as usize),
            &format!("ws{i}"),
        );
        c.assert_no_duplicates();
    }
    for (i, c) in json.iter_mut().enumerate() {
        check(
            wait_for_room_messages(c, LIVE, N as usize),
            &format!("json{i}"),
        );
        c.assert_no_duplicates();
        assert!(
            c.json_frames_read() > N as usize / 2,
            "json{i} was answered in JSON text"
        );
    }
    check(
        wait_for_room_messages(&mut host_laptop, LIVE, N as usize),
        "the sender's other device",
    );

    for (who, message) in [
        ("tcp0", tcp[0].message(&room(LIVE), 1)),
        ("ws2", binary[2].message(&room(LIVE), N)),
        ("json1", json[1].message(&room(LIVE), N / 2)),
    ] {
        let m = message.unwrap_or_else(|| panic!("{who} holds the message"));
        let ack = &run.acks[(m.seq - 1) as usize];
        assert_eq!(
            m.conversation,
            Some(room(LIVE)),
            "{who}: named {{ROOM, live}}"
        );
        assert_eq!(m.msg_id, ack.msg_id, "{who}: the acked message id");
        assert_eq!(
            (m.from_user.as_str(), m.from_device.as_str()),
            ("host", "phone")
        );
        assert_eq!(m.client_msg_id, ack.client_msg_id);
        assert_eq!(m.body, numbered_body(m.seq, 64), "{who}: the body as sent");
    }

    host.receive_for(Duration::from_millis(300));
    assert!(
        host.delivered_seqs(&room(LIVE)).is_empty(),
        "the sending connection does not get its own room messages"
    );
}

#[test]
fn only_a_connection_that_joined_may_send_to_a_room() {
    let broker = Broker::start(&["storage.durability=never"]);
    let mut phone = broker.connect("alice", "phone");
    let mut laptop = broker.connect("alice", "laptop");
    laptop.join_room(LIVE);

    let refused = phone
        .try_send_to_room(LIVE, "not a member")
        .expect_err("a connection that did not join may not send");
    assert_eq!(
        refused.code,
        pb::ErrorCode::Forbidden as i32,
        "{refused:?} (membership is per connection: the user's other device joined)"
    );
    assert!(!refused.fatal, "the connection goes on");
    assert!(refused.message.contains("join"), "{:?}", refused.message);

    phone.join_room(LIVE);
    let ack = phone.send_to_room(LIVE, "now a member");
    laptop.expect_delivery(&room(LIVE), ack.seq, TIMEOUT);
}

/// How many `body`-sized messages overflow what the kernel can buffer for a stalled loopback
/// reader (the broker's socket send buffer can grow to `tcp_wmem`'s maximum), with 1 MiB to
/// spare; at least `min`.
fn backlog_len(body: usize, min: u64) -> u64 {
    let wmem_max: usize = fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
        .min(64 << 20);
    let overflow = (wmem_max + SMALL_RECV_BUFFER + (1 << 20)) / body;
    min.max(u64::try_from(overflow).expect("fits"))
}

#[test]
fn a_listener_that_stops_reading_loses_the_oldest_messages_and_is_told_how_many() {
    const BODY: usize = 8 * 1024;
    const QUEUE: u64 = 16;
    let n = backlog_len(BODY, 300);
    let broker = Broker::start(&[
        "storage.durability=never",
        "limits.max_outbound_bytes=65536",
        &format!("rooms.listener_queue={QUEUE}"),
    ]);
    let mut slow = broker.tcp_with_recv_buffer(SMALL_RECV_BUFFER);
    slow.login("slow", "phone");
    slow.join_room(LIVE);
    let mut fast = broker.connect("fast", "phone");
    fast.join_room(LIVE);
    let mut host = broker.connect("host", "phone");
    host.join_room(LIVE);
    let mut carol = broker.connect("carol", "phone");
    let mut dave = broker.connect("dave", "phone");

    // The slow listener reads nothing while the host sends several MiB, the fast listener reads
    // along, and carol and dave chat.
    let (run, fast) = thread::scope(|s| {
        let reader = s.spawn(move || {
            wait_for_room_messages(&mut fast, LIVE, n as usize);
            fast
        });
        let sender = s.spawn(|| {
            host.pipeline_sends_to(
                room(LIVE),
                (1..=n).map(|i| numbered_body(i, BODY)),
                16,
                |_| {},
            )
        });
        let mut round = 0;
        while !sender.is_finished() {
            let latency = delivery_latency(&mut carol, &mut dave, &format!("round {round}"));
            assert!(
                latency < NORMAL_LATENCY,
                "a stalled listener must not slow others down: message {round} took {latency:?}"
            );
            round += 1;
        }
        let run = sender.join().expect("the host's sends all succeed");
        (
            run,
            reader.join().expect("the fast listener got everything"),
        )
    });
    assert_eq!(run.acks.len() as u64, n, "every room send was acked");
    assert_seqs(
        &fast.delivered_seqs(&room(LIVE)),
        1..=n,
        "a listener that keeps up gets every message, once, in order",
    );
    assert!(fast.room_lags().is_empty(), "and is never told of a lag");

    // The slow listener reads again: what the kernel and its queue held, then for each gap a
    // RoomLag with its size, then the newest messages.
    slow.wait_until(TIMEOUT, "the last room message arrived", |c| {
        c.delivered_seqs(&room(LIVE)).last() == Some(&n)
    });
    let lags = slow.room_lags().to_vec();
    assert!(
        !lags.is_empty(),
        "a listener that read nothing through {n} messages of {BODY} bytes was told it lagged"
    );
    let arrivals = slow.arrivals().to_vec();
    let mut expected = 1;
    let mut lag_iter = lags.iter().peekable();
    for (i, arrival) in arrivals.iter().enumerate() {
        assert_eq!(arrival.conversation, room(LIVE));
        while let Some((_, lag)) = lag_iter.next_if(|(at, _)| *at == i) {
            assert_eq!(lag.room_id, LIVE);
            assert!(lag.dropped > 0, "a lag reports a drop: {lag:?}");
            expected += lag.dropped;
            assert_eq!(
                lag.next_seq, expected,
                "RoomLag names the seq that comes next: {lag:?}"
            );
        }
        assert_eq!(
            arrival.seq, expected,
            "after arrival {i}, the seqs go on in order, gaps only where a RoomLag said so"
        );
        expected += 1;
    }
    assert!(lag_iter.next().is_none(), "every lag precedes a message");
    assert_eq!(
        expected,
        n + 1,
        "received plus dropped is every message sent"
    );
    let dropped: u64 = lags.iter().map(|(_, l)| l.dropped).sum();
    assert!(
        dropped >= QUEUE,
        "the broker held at most rooms.listener_queue for the stalled listener; {dropped} dropped"
    );
    slow.assert_no_duplicates();
    slow.ping();
    assert_eq!(
        slow.behind_count(),
        0,
        "room traffic never makes a connection Behind"
    );
}

#[test]
fn a_listener_that_leaves_gets_no_more_of_the_rooms_messages() {
    let broker = Broker::start(&["storage.durability=never"]);
    let mut host = broker.connect("host", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut carol = broker.connect("carol", "phone");
    for c in [&mut host, &mut bob, &mut carol] {
        c.join_room(LIVE);
    }
    let first = host.send_to_room(LIVE, "all three");
    bob.expect_delivery(&room(LIVE), first.seq, TIMEOUT);

    bob.leave_room(LIVE);
    let second = host.send_to_room(LIVE, "bob left");
    carol.expect_delivery(&room(LIVE), second.seq, TIMEOUT);
    bob.assert_no_delivery(
        &room(LIVE),
        second.seq,
        Duration::from_millis(300),
        "bob left the room before it was sent",
    );
    let refused = bob
        .try_send_to_room(LIVE, "not any more")
        .expect_err("a connection that left may not send");
    assert_eq!(refused.code, pb::ErrorCode::Forbidden as i32);
}

#[test]
fn closing_a_connection_takes_it_out_of_its_rooms() {
    let broker = Broker::start(&["shards=2", "storage.durability=never"]);
    let mut host = broker.connect("host", "phone");
    host.join_room(LIVE);
    let mut listeners: Vec<Client> = (0..4)
        .map(|i| {
            let mut c = broker.connect(&format!("u{i}"), "d");
            c.join_room(LIVE);
            c
        })
        .collect();
    assert_eq!(host.join_room(LIVE).audience, 5);

    listeners.truncate(1);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let audience = host.join_room(LIVE).audience;
        if audience == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the audience is still {audience} {TIMEOUT:?} after three listeners closed"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let ack = host.send_to_room(LIVE, "to who is left");
    listeners[0].expect_delivery(&room(LIVE), ack.seq, TIMEOUT);
}

#[test]
fn a_joiner_gets_the_rooms_last_messages_then_the_live_ones() {
    let broker = Broker::start(&["storage.durability=never", "rooms.history=3"]);
    let mut host = broker.connect("host", "phone");
    host.join_room(LIVE);
    for i in 1..=5 {
        host.send_to_room(LIVE, numbered_body(i, 8));
    }
    let mut late = broker.connect("late", "phone");
    let request_id = late.request(Body::RoomRequest(pb::RoomRequest {
        action: pb::RoomAction::Join as i32,
        room_id: LIVE.into(),
    }));
    let result = late.recv_until(TIMEOUT, |f| f.request_id == request_id);
    let Some(Body::RoomResult(result)) = result.body else {
        panic!("a join is answered with RoomResult first: {result:?}")
    };
    assert_eq!(result.last_seq, 5);
    let history = late.recv_until(TIMEOUT, |f| matches!(f.body, Some(Body::Deliver(_))));
    let Some(Body::Deliver(history)) = history.body else {
        unreachable!("the predicate matched a Deliver")
    };
    let seqs: Vec<u64> = history.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        vec![3, 4, 5],
        "right after the RoomResult, one Deliver with the last rooms.history messages"
    );
    assert_eq!(history.messages[2].body, numbered_body(5, 8));
    let next = host.send_to_room(LIVE, "live");
    assert_eq!(next.seq, 6);
    late.expect_delivery(&room(LIVE), 6, TIMEOUT);
    late.assert_no_duplicates();
}

#[test]
fn room_limits_and_bad_requests_are_refused_with_clear_errors() {
    let broker = Broker::start(&[
        "storage.durability=never",
        "rooms.max_per_connection=2",
        "rooms.max_listeners=2",
    ]);
    let mut alice = broker.connect("alice", "phone");
    alice.join_room("a");
    alice.join_room("b");
    let e = alice
        .try_room(pb::RoomAction::Join, "c")
        .expect_err("a third room is one too many");
    assert_eq!(e.code, pb::ErrorCode::InvalidArgument as i32, "{e:?}");
    assert!(
        e.message.contains("rooms.max_per_connection"),
        "{:?}",
        e.message
    );
    assert!(!e.fatal);
    alice.leave_room("b");
    alice.join_room("c");

    let mut bob = broker.connect("bob", "phone");
    bob.join_room("a");
    let mut carol = broker.connect("carol", "phone");
    let e = carol
        .try_room(pb::RoomAction::Join, "a")
        .expect_err("a room at rooms.max_listeners is full");
    assert_eq!(e.code, pb::ErrorCode::Forbidden as i32, "{e:?}");
    assert!(e.message.contains("rooms.max_listeners"), "{:?}", e.message);
    let e = carol
        .try_send_to_room("a", "from outside")
        .expect_err("a refused joiner is not a member");
    assert_eq!(e.code, pb::ErrorCode::Forbidden as i32, "{e:?}");

    for (id, why) in [
        ("", "an empty room id"),
        (&*"x".repeat(129), "a 129-byte room id"),
    ] {
        let e = carol.try_room(pb::RoomAction::Join, id).expect_err(why);
        assert_eq!(
            e.code,
            pb::ErrorCode::InvalidArgument as i32,
            "{why}: {e:?}"
        );
        assert!(e.message.contains("room_id"), "{:?}", e.message);
    }
    let e = carol
        .try_room(pb::RoomAction::Unspecified, "a")
        .expect_err("an action that is neither JOIN nor LEAVE_ROOM");
    assert_eq!(e.code, pb::ErrorCode::InvalidArgument as i32, "{e:?}");

    alice.request(Body::Send(pb::Send {
        to: Some(room("a")),
        client_msg_id: 77,
        content_type: 0,
        body: Default::default(),
        kind: pb::MessageKind::Recall as i32,
        ref_seq: 1,
    }));
    let e = alice.expect_error(TIMEOUT);
    assert_eq!(
        (e.code, e.client_msg_id),
        (pb::ErrorCode::InvalidArgument as i32, 77),
        "room messages are not stored: nothing to recall ({e:?})"
    );
    alice.ping();
    carol.ping();
}

#[test]
fn room_seqs_live_in_memory_and_start_again_after_a_restart() {
    let mut broker = Broker::start(&[]);
    let mut host = broker.connect("host", "phone");
    host.join_room(LIVE);
    host.send_to_room(LIVE, "before");
    assert_eq!(host.send_to_room(LIVE, "before").seq, 2);
    drop(host);
    broker.restart();
    let mut host = broker.connect("host", "phone");
    let joined = host.join_room(LIVE);
    assert_eq!(
        (joined.audience, joined.last_seq),
        (1, 0),
        "a restarted node knows no room: membership and seqs were in memory"
    );
    assert_eq!(host.send_to_room(LIVE, "after").seq, 1);
}
