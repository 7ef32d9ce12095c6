//! The library against the real broker: a client keeps its outbox across a `kill -9` and a
//! restart of the broker, resends it with the same ids, and nothing is stored or shown twice.

use std::time::Duration;

use parley_client::backoff::BackoffConfig;
use parley_client::{Client, ClientConfig, Event, TcpConnector, direct};
use parley_tests::broker::Broker;

mod common;
use common::{acked, bodies, until};

fn client(broker: &Broker, user: &str) -> Client {
    let token = broker.token(user, "lib");
    let config = ClientConfig {
        backoff: BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        ..ClientConfig::default()
    };
    Client::start(
        TcpConnector::new(broker.tcp_addr().to_string()),
        Box::new(move || Ok(token.clone())),
        config,
    )
}

#[test]
fn the_outbox_survives_a_kill_9_and_nothing_is_doubled() {
    let mut broker = Broker::start(&[]);
    let alice = client(&broker, "alice");
    let bob = client(&broker, "bob");
    for c in [&alice, &bob] {
        until(c, |e| e.iter().any(|e| matches!(e, Event::Synced)));
    }
    let mut alice_events = Vec::new();
    for i in 0..5 {
        alice.send_text("bob", &format!("m{i}")).expect("send");
    }
    alice_events.extend(until(&alice, |e| acked(e).len() == 5));

    broker.kill9();
    alice_events.extend(until(&alice, |e| {
        e.iter().any(|e| matches!(e, Event::Disconnected { .. }))
    }));
    // Sent while the broker is down: they wait in the outbox.
    for i in 5..10 {
        alice.send_text("bob", &format!("m{i}")).expect("send");
    }
    assert_eq!(alice.unacked().len(), 5);
    broker.restart_on_same_ports();
    alice_events.extend(until(&alice, |e| acked(e).len() == 5));
    assert!(alice.unacked().is_empty());

    // Bob sees all ten, once each, in order, with seqs 1..=10.
    let mut bob_events = until(&bob, |e| bodies(e).len() >= 10);
    while let Some(e) = bob.next_event(Duration::from_millis(500)) {
        bob_events.push(e);
    }
    let got = bodies(&bob_events);
    let want: Vec<(u64, String)> = (0..10u64).map(|i| (i + 1, format!("m{i}"))).collect();
    assert_eq!(got, want);

    // The history agrees: ten stored messages, none twice.
    let id = bob.history(direct("alice"), 0, None, 50);
    let page = until(&bob, |e| {
        e.iter()
            .any(|e| matches!(e, Event::HistoryPage { request_id, .. } if *request_id == id))
    });
    let Some(Event::HistoryPage { page, .. }) = page.into_iter().last() else {
        panic!("no history page");
    };
    assert_eq!(page.messages.len(), 10);
    assert_eq!(page.last_seq, 10);

    assert!(alice.close(Duration::from_secs(1)).is_empty());
    assert!(bob.close(Duration::from_secs(1)).is_empty());
}
