//! The library over UDP against the real broker: two clients chat both ways exactly once and in
//! order; through a proxy that drops and duplicates datagrams nothing is lost or doubled; across
//! a `kill -9` and a restart of the broker (on the same ports) every send is acked once and every
//! message shown once, in order; a refused login reaches the application.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{LossyProxy, acked, bodies, bodies_from, client, drain, synced, until};
use parley_client::backoff::BackoffConfig;
use parley_client::{
    Client, ClientConfig, DisconnectReason, Event, RetryConfig, SessionConfig, UdpConnector,
    direct, pb,
};
use parley_tests::broker::Broker;

/// Broker settings for UDP tests: a UDP listener on `udp`, a 1 s heartbeat (the client pings
/// every 500 ms) and fast retransmits of deliveries.
fn settings(udp: &str) -> Vec<String> {
    vec![
        format!("listen.udp=\"{udp}\""),
        "timeouts.heartbeat_ms=1000".into(),
        "timeouts.idle_ms=4000".into(),
        "timeouts.retransmit_initial_ms=300".into(),
        "timeouts.retransmit_max_ms=1000".into(),
        "timeouts.retransmit_tries=20".into(),
    ]
}

fn start(udp: &str) -> Broker {
    let settings = settings(udp);
    let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
    Broker::start(&refs)
}

fn udp_client(broker: &Broker, addr: SocketAddr, user: &str) -> Client {
    client(
        UdpConnector::new(addr.to_string()).login_retry(Duration::from_millis(300)),
        broker.token(user, "udp"),
    )
}

/// Sends `n` numbered texts from `from` to `to` (prefix `tag`); returns their client ids.
fn send_all(from: &Client, to: &str, tag: &str, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| from.send_text(to, &format!("{tag}{i}")).expect("send"))
        .collect()
}

/// Waits until `c` has seen every id of `ids` acked and `n` messages of `peer` shown; returns
/// the events.
fn settle(c: &Client, ids: &[u64], peer: &str, n: usize) -> Vec<Event> {
    let want: BTreeSet<u64> = ids.iter().copied().collect();
    let mut events = until(c, |e| {
        acked(e).iter().copied().collect::<BTreeSet<_>>() == want && bodies_from(e, peer).len() >= n
    });
    events.extend(drain(c, Duration::from_millis(700)));
    events
}

/// The seqs `c`'s sends were acked with, by body order (the acks' order follows the sends').
fn acked_seqs(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Acked { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

#[test]
fn two_clients_chat_over_udp_both_ways_exactly_once_and_in_order() {
    let broker = start("127.0.0.1:0");
    let alice = udp_client(&broker, broker.udp_addr(), "alice");
    let bob = udp_client(&broker, broker.udp_addr(), "bob");
    for c in [&alice, &bob] {
        let events = synced(c);
        let Some(Event::Connected(r)) = events.first() else {
            panic!("expected Connected first, got {events:?}");
        };
        assert_ne!(r.udp_session_id, 0, "a UDP session");
        assert!(
            r.udp_session_key.is_empty(),
            "the key stays in the transport"
        );
    }
    let a_ids = send_all(&alice, "bob", "a", 25);
    let b_ids = send_all(&bob, "alice", "b", 25);
    let a_events = settle(&alice, &a_ids, "bob", 25);
    let b_events = settle(&bob, &b_ids, "alice", 25);

    for (events, ids, peer, peer_tag, own_events) in [
        (&b_events, &a_ids, "alice", "a", &a_events),
        (&a_events, &b_ids, "bob", "b", &b_events),
    ] {
        assert_eq!(acked(own_events), *ids, "each send acked once, in order");
        let got = bodies_from(events, peer);
        let want: Vec<String> = (0..25).map(|i| format!("{peer_tag}{i}")).collect();
        assert_eq!(
            got.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
            want,
            "each message shown once, in order"
        );
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            acked_seqs(own_events),
            "shown with the seqs the sender was acked"
        );
    }
    // Together the two sides hold seqs 1..=50 of the conversation, each once.
    let mut all: Vec<u64> = acked_seqs(&a_events);
    all.extend(acked_seqs(&b_events));
    all.sort_unstable();
    assert_eq!(all, (1..=50).collect::<Vec<u64>>());
    assert!(alice.close(Duration::from_secs(1)).is_empty());
    assert!(bob.close(Duration::from_secs(1)).is_empty());
}

#[test]
fn nothing_is_lost_or_doubled_through_a_proxy_that_drops_and_duplicates_datagrams() {
    let broker = start("127.0.0.1:0");
    // Every 6th datagram each way is dropped, every 5th (not dropped) sent twice.
    let proxy = LossyProxy::start(broker.udp_addr(), 6, 5);
    let lossy = |user: &str| {
        let config = ClientConfig {
            session: SessionConfig {
                dead_after: Some(Duration::from_secs(3)),
                retry: Some(RetryConfig {
                    initial: Duration::from_millis(300),
                    max: Duration::from_secs(1),
                }),
                ..SessionConfig::default()
            },
            backoff: BackoffConfig {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(500),
            },
            ..ClientConfig::default()
        };
        let token = broker.token(user, "lossy");
        Client::start(
            UdpConnector::new(proxy.addr().to_string()).login_retry(Duration::from_millis(200)),
            Box::new(move || Ok(token.clone())),
            config,
        )
    };
    let alice = lossy("alice");
    let bob = lossy("bob");
    for c in [&alice, &bob] {
        synced(c);
    }
    // In bursts, so some datagrams carry several frames.
    let mut a_ids = Vec::new();
    let mut b_ids = Vec::new();
    for round in 0..4 {
        a_ids.extend(send_all(&alice, "bob", &format!("a{round}."), 10));
        b_ids.extend(send_all(&bob, "alice", &format!("b{round}."), 10));
        std::thread::sleep(Duration::from_millis(100));
    }
    let a_events = settle(&alice, &a_ids, "bob", 40);
    let b_events = settle(&bob, &b_ids, "alice", 40);
    assert!(proxy.dropped() > 0, "the proxy dropped nothing");

    for (sender_ids, sender_events, receiver_events, tag) in [
        (&a_ids, &a_events, &b_events, "a"),
        (&b_ids, &b_events, &a_events, "b"),
    ] {
        let acks = acked(sender_events);
        assert_eq!(acks.len(), sender_ids.len(), "one ack per send: {acks:?}");
        assert_eq!(
            acks.iter().collect::<BTreeSet<_>>(),
            sender_ids.iter().collect::<BTreeSet<_>>()
        );
        // Every seq shown once, in order (the receiver's own messages may be among them:
        // one whose ack was lost comes back in a sync, once, instead of its seq being settled
        // by the ack).
        let seqs: Vec<u64> = bodies(receiver_events).iter().map(|(s, _)| *s).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "shown in seq order: {seqs:?}"
        );
        let sender = if tag == "a" { "alice" } else { "bob" };
        let got = bodies_from(receiver_events, sender);
        let mut shown: Vec<String> = got.into_iter().map(|(_, b)| b).collect();
        shown.sort();
        let mut want: Vec<String> = (0..4)
            .flat_map(|r| (0..10).map(move |i| format!("{tag}{r}.{i}")))
            .collect();
        want.sort();
        assert_eq!(shown, want, "every message shown exactly once");
    }
    // Stored once each: the history holds the 80 messages, no body twice.
    let id = bob.history(direct("alice"), 0, None, 200);
    let page = until(&bob, |e| {
        e.iter()
            .any(|e| matches!(e, Event::HistoryPage { request_id, .. } if *request_id == id))
    });
    let Some(Event::HistoryPage { page, .. }) = page.into_iter().last() else {
        panic!("no history page");
    };
    let stored: BTreeSet<&[u8]> = page.messages.iter().map(|m| &m.body[..]).collect();
    assert_eq!(page.messages.len(), 80, "{:?}", page.messages.len());
    assert_eq!(stored.len(), 80, "a body stored twice");
    assert!(alice.close(Duration::from_secs(1)).is_empty());
    assert!(bob.close(Duration::from_secs(1)).is_empty());
}

#[test]
fn over_udp_the_outbox_survives_a_kill_9_and_nothing_is_doubled() {
    let mut broker = start("127.0.0.1:0");
    let udp = broker.udp_addr();
    let alice = udp_client(&broker, udp, "alice");
    let bob = udp_client(&broker, udp, "bob");
    for c in [&alice, &bob] {
        synced(c);
    }
    let mut alice_events = Vec::new();
    let mut ids = send_all(&alice, "bob", "m", 5);
    alice_events.extend(until(&alice, |e| acked(e).len() == 5));

    // In flight when the broker dies.
    for i in 5..10 {
        ids.push(alice.send_text("bob", &format!("m{i}")).expect("send"));
    }
    broker.kill9();
    // Sent while the broker is down.
    for i in 10..15 {
        ids.push(alice.send_text("bob", &format!("m{i}")).expect("send"));
    }
    std::thread::sleep(Duration::from_millis(300));
    // On the same UDP address, where the clients send.
    broker.restart_on_same_ports();
    assert_eq!(broker.udp_addr(), udp);
    // The client notices the silence, logs in again, resends.
    alice_events.extend(until(&alice, |e| acked(e).len() == 10));
    alice_events.extend(drain(&alice, Duration::from_millis(500)));
    assert!(alice.unacked().is_empty());
    assert_eq!(acked(&alice_events), ids, "every send acked exactly once");
    assert!(
        alice_events
            .iter()
            .any(|e| matches!(e, Event::Disconnected { .. })),
        "the silence was noticed"
    );

    let mut bob_events = until(&bob, |e| bodies(e).len() >= 15);
    bob_events.extend(drain(&bob, Duration::from_millis(700)));
    let want: Vec<(u64, String)> = (0..15u64).map(|i| (i + 1, format!("m{i}"))).collect();
    assert_eq!(bodies(&bob_events), want);

    assert!(alice.close(Duration::from_secs(1)).is_empty());
    assert!(bob.close(Duration::from_secs(1)).is_empty());
}

#[test]
fn a_refused_udp_login_reaches_the_application() {
    let broker = start("127.0.0.1:0");
    let c = client(
        UdpConnector::new(broker.udp_addr().to_string()),
        "not a token".into(),
    );
    let events = until(&c, |e| {
        e.iter().any(|e| {
            matches!(
                e,
                Event::Disconnected {
                    reason: DisconnectReason::Server(_)
                }
            )
        })
    });
    let code = events.iter().find_map(|e| match e {
        Event::Disconnected { reason } => reason.code(),
        _ => None,
    });
    assert_eq!(code, Some(pb::ErrorCode::BadToken));
    drop(c);
}
