//! The library over TLS against the real broker (its `listen.tls` listener serving the
//! certificate `broker devcert` made): two clients chat both ways exactly once and in order, one
//! trusting the PEM file, the other a `rustls::ClientConfig` of its own with an IP server name;
//! a client that does not trust the certificate never logs in.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{acked, bodies_from, client, drain, synced, until};
use parley_client::{DisconnectReason, Event, TlsConnector};
use parley_tests::broker::{Broker, broker_bin};

/// Makes the development certificate with `broker devcert --out dir`; returns (cert, key).
fn devcert(dir: &Path) -> (PathBuf, PathBuf) {
    let status = Command::new(broker_bin())
        .args(["devcert", "--out"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run broker devcert");
    assert!(status.success(), "broker devcert failed: {status}");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

fn tls_broker(cert: &Path, key: &Path) -> Broker {
    let cert = format!("tls.cert_path=\"{}\"", cert.display());
    let key = format!("tls.key_path=\"{}\"", key.display());
    Broker::start(&["listen.tls=\"127.0.0.1:0\"", &cert, &key])
}

#[test]
fn two_clients_chat_over_tls_both_ways_exactly_once_and_in_order() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (cert, key) = devcert(dir.path());
    let broker = tls_broker(&cert, &key);
    let addr = broker.tls_addr().to_string();
    let alice = client(
        TlsConnector::with_ca_file(addr.clone(), "localhost", &cert).expect("the dev cert loads"),
        broker.token("alice", "tls"),
    );
    let config = parley_client::tls::client_config_with_ca_file(&cert).expect("a config");
    let bob = client(
        TlsConnector::with_config(addr, "127.0.0.1", config).expect("an IP server name"),
        broker.token("bob", "tls"),
    );
    for c in [&alice, &bob] {
        synced(c);
    }
    let a_ids: Vec<u64> = (0..30)
        .map(|i| alice.send_text("bob", &format!("a{i}")).expect("send"))
        .collect();
    let b_ids: Vec<u64> = (0..30)
        .map(|i| bob.send_text("alice", &format!("b{i}")).expect("send"))
        .collect();
    let settle = |c: &parley_client::Client, peer: &str| {
        let mut events = until(c, |e| {
            acked(e).len() >= 30 && bodies_from(e, peer).len() >= 30
        });
        events.extend(drain(c, Duration::from_millis(500)));
        events
    };
    let a_events = settle(&alice, "bob");
    let b_events = settle(&bob, "alice");
    assert_eq!(acked(&a_events), a_ids, "each send acked once, in order");
    assert_eq!(acked(&b_events), b_ids, "each send acked once, in order");
    for (events, peer, tag) in [(&b_events, "alice", "a"), (&a_events, "bob", "b")] {
        let got = bodies_from(events, peer);
        let want: Vec<String> = (0..30).map(|i| format!("{tag}{i}")).collect();
        assert_eq!(got.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), want);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "in seq order");
    }
    assert!(alice.close(Duration::from_secs(1)).is_empty());
    assert!(bob.close(Duration::from_secs(1)).is_empty());
}

#[test]
fn a_client_that_does_not_trust_the_certificate_never_logs_in() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (cert, key) = devcert(&dir.path().join("served"));
    let (other, _) = devcert(&dir.path().join("other"));
    let broker = tls_broker(&cert, &key);
    let c = client(
        TlsConnector::with_ca_file(broker.tls_addr().to_string(), "localhost", &other)
            .expect("the other cert loads"),
        broker.token("alice", "tls"),
    );
    let events = until(&c, |e| {
        e.iter().any(|e| {
            matches!(
                e,
                Event::Disconnected {
                    reason: DisconnectReason::Io(_)
                }
            )
        })
    });
    assert!(!events.iter().any(|e| matches!(e, Event::Connected(_))));
    let why = format!("{events:?}");
    assert!(
        why.contains("certificate") || why.contains("Certificate"),
        "{why}"
    );
    // A file with no certificate is refused up front.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    assert!(TlsConnector::with_ca_file("127.0.0.1:1", "localhost", &empty).is_err());
    drop(c);
}
