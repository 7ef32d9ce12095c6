//! Webhooks (issue 11) through the real binary: what happens on the node is POSTed to a real
//! HTTP server, signed with the shared secret; a failed POST is retried under the same
//! idempotency key; a misconfiguration stops the start.

use hmac::{Hmac, KeyInit, Mac};
use parley_proto::pb;
use parley_tests::http::{self, Received, Receiver};
use parley_tests::{Broker, direct};
use sha2::Sha256;

const SECRET: &str = "webhook-test-secret-0123456789";
const ADMIN: &str = "admin-test-token-0123456789";

/// A broker posting every kind of event to `receiver`, retrying quickly.
fn broker_posting_to(receiver: &Receiver, events: &str) -> Broker {
    Broker::start(&[
        &format!("webhooks.url=\"http://{}/hooks\"", receiver.addr()),
        &format!("webhooks.secret=\"{SECRET}\""),
        &format!("webhooks.events={events}"),
        "webhooks.backoff_base_ms=10",
        "webhooks.backoff_max_ms=50",
        &format!("admin.token=\"{ADMIN}\""),
    ])
}

/// The events of every request, in the order they came.
fn events(got: &[Received]) -> Vec<serde_json::Value> {
    got.iter()
        .flat_map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("a webhook body is not JSON: {e}"));
            v["events"].as_array().cloned().unwrap_or_default()
        })
        .collect()
}

fn has(got: &[Received], ty: &str, pred: impl Fn(&serde_json::Value) -> bool) -> bool {
    events(got)
        .iter()
        .any(|e| e["type"] == ty && pred(&e["data"]))
}

#[test]
fn logins_offline_messages_group_changes_and_logouts_are_posted_signed() {
    let receiver = Receiver::start(&[]);
    let broker = broker_posting_to(
        &receiver,
        r#"["message.offline","login","logout","group","presence"]"#,
    );
    let mut alice = broker.connect("alice", "phone");
    let ack = alice.send_to(&direct("bob"), "are you there?");
    alice.group(pb::GroupRequest {
        action: pb::GroupAction::Create as i32,
        group_id: "hikers".into(),
        members: vec!["bob".into()],
        ..Default::default()
    });
    drop(alice);
    let got = receiver.wait_for("login, message.offline, group and logout", |got| {
        has(got, "login", |d| {
            d["user"] == "alice" && d["device"] == "phone"
        }) && has(got, "message.offline", |d| {
            d["users"] == serde_json::json!(["bob"])
                && d["seq"] == ack.seq
                && d["sender"] == "alice"
                && d["conversation"]["kind"] == "direct"
        }) && has(got, "group", |d| {
            d["group"] == "hikers" && d["what"] == "created" && d["actor"] == "alice"
        }) && has(got, "presence", |d| {
            d["user"] == "alice" && d["online"] == false
        }) && has(got, "logout", |d| d["user"] == "alice")
    });
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/hooks");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).expect("key");
        mac.update(&r.body);
        let expected = format!("sha256={}", hex(&mac.finalize().into_bytes()));
        assert_eq!(r.header("x-parley-signature"), Some(expected.as_str()));
        assert!(r.header("idempotency-key").is_some());
    }
    let ids: Vec<String> = events(&got)
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ids.len(),
        "every event has its own id: {ids:?}"
    );
}

#[test]
fn a_failed_post_is_retried_with_the_same_idempotency_key_and_body() {
    let receiver = Receiver::start(&[503, 500]);
    let broker = broker_posting_to(&receiver, r#"["login"]"#);
    let _alice = broker.connect("alice", "phone");
    let got = receiver.wait_for("three attempts", |got| got.len() >= 3);
    let keys: Vec<_> = got.iter().map(|r| r.header("idempotency-key")).collect();
    assert!(keys[0].is_some());
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    assert!(got.iter().all(|r| r.body == got[0].body));
    let attempts: Vec<_> = got.iter().map(|r| r.header("x-parley-attempt")).collect();
    assert_eq!(attempts[..3], [Some("1"), Some("2"), Some("3")]);
    // The metrics say so, once the sender has taken the last answer.
    let deadline = std::time::Instant::now() + parley_tests::TIMEOUT;
    loop {
        let answer = http::get(broker.admin_addr(), "/metrics", Some(ADMIN));
        assert_eq!(answer.status, 200);
        let line = |name: &str| {
            answer
                .body
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        let delivered = line("parley_webhook_delivered_total");
        if delivered == Some(1.0) {
            assert_eq!(
                line("parley_webhook_retried_total"),
                Some(2.0),
                "{}",
                answer.body
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", answer.body);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn webhooks_without_a_secret_stop_the_start_with_a_clear_error() {
    let failed = Broker::start_expecting_failure(&["webhooks.url=\"http://127.0.0.1:9/hooks\""]);
    assert!(failed.status.is_some_and(|s| !s.success()), "{failed:?}");
    assert!(
        failed.output.contains("webhooks.secret"),
        "the error names the setting: {}",
        failed.output
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
