//! The admin listener (issue 11): `/healthz` and `/readyz` answer anyone, `/metrics` needs the
//! admin bearer token and is Prometheus text that an independent parser reads, its counters and
//! latency histograms move as traffic flows, and `broker stats --once` prints the same figures.

use std::process::Command;
use std::time::Instant;

use parley_tests::broker::broker_bin;
use parley_tests::http;
use parley_tests::{Broker, TIMEOUT, direct};
use prometheus_parse::{Scrape, Value};

/// The admin token the tests configure.
const TOKEN: &str = "admin-test-token-0123456789";

/// A broker with the admin token set.
fn broker_with_token() -> Broker {
    Broker::start(&[&format!("admin.token=\"{TOKEN}\"")])
}

/// Scrapes `/metrics` with the token and parses it with `prometheus-parse`.
fn scrape(broker: &Broker) -> Scrape {
    let answer = http::get(broker.admin_addr(), "/metrics", Some(TOKEN));
    assert_eq!(answer.status, 200, "{}", answer.body);
    Scrape::parse(answer.body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{}", answer.body))
}

/// The sum of every series named `metric` (over its `shard` labels), or `None` if absent.
fn total(scrape: &Scrape, metric: &str) -> Option<f64> {
    let values: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{metric} is not a single value: {:?}", s.value),
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Scrapes until `done` holds for the sum of `metric` (the shards publish their counters about
/// every 100 ms), and returns that value; panics after [`TIMEOUT`].
fn await_metric(broker: &Broker, metric: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let s = scrape(broker);
        let v = total(&s, metric).unwrap_or_else(|| panic!("no {metric} in /metrics"));
        if done(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{metric} stayed at {v}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn healthz_and_readyz_answer_without_a_token_and_metrics_without_one_configured_is_401() {
    let broker = Broker::start(&[]);
    let health = http::get(broker.admin_addr(), "/healthz", None);
    assert_eq!((health.status, health.body.trim()), (200, "ok"));
    let ready = http::get(broker.admin_addr(), "/readyz", None);
    assert_eq!(
        ready.status, 200,
        "ready once the node listens: {}",
        ready.body
    );
    let metrics = http::get(
        broker.admin_addr(),
        "/metrics",
        Some("anything-at-all-long"),
    );
    assert_eq!(
        metrics.status, 401,
        "no admin.token configured: nothing but the probes"
    );
    assert!(
        metrics.body.contains("admin.token"),
        "the refusal says what to set: {}",
        metrics.body
    );
}

#[test]
fn metrics_without_the_token_is_401_and_with_it_200() {
    let broker = broker_with_token();
    let none = http::get(broker.admin_addr(), "/metrics", None);
    assert_eq!(none.status, 401);
    assert!(none.header("WWW-Authenticate").is_some(), "{none:?}");
    let wrong = http::get(broker.admin_addr(), "/metrics", Some("not-the-admin-token"));
    assert_eq!(wrong.status, 401);
    let right = http::get(broker.admin_addr(), "/metrics", Some(TOKEN));
    assert_eq!(right.status, 200);
    assert!(
        right
            .header("Content-Type")
            .is_some_and(|t| t.contains("openmetrics-text") || t.contains("text/plain")),
        "{right:?}"
    );
    let probe = http::get(broker.admin_addr(), "/healthz", None);
    assert_eq!(
        probe.status, 200,
        "probes stay open with a token configured"
    );
}

#[test]
fn metrics_are_prometheus_text_and_the_counters_move_as_traffic_flows() {
    let broker = broker_with_token();
    let before = scrape(&broker);
    let stored_before = total(&before, "parley_messages_stored_total").expect("per-shard counter");
    assert_eq!(
        total(&before, "parley_node_messages_stored_total"),
        Some(stored_before),
        "the node total is the sum of the shards"
    );
    assert!(
        before
            .docs
            .get("parley_messages_stored")
            .is_some_and(|d| d.contains("Messages stored")),
        "every metric has its HELP line: {:?}",
        before.docs.get("parley_messages_stored")
    );
    let shards: Vec<_> = before
        .samples
        .iter()
        .filter(|s| s.metric == "parley_messages_stored_total")
        .filter_map(|s| s.labels.get("shard"))
        .collect();
    assert_eq!(shards.len(), 2, "one series per shard: {shards:?}");

    let mut alice = broker.connect("alice", "laptop");
    let mut bob = broker.connect("bob", "phone");
    await_metric(&broker, "parley_connections", |v| v == 2.0);
    await_metric(&broker, "parley_logins_total", |v| v >= 2.0);

    const SENT: u64 = 7;
    for i in 0..SENT {
        let ack = alice.send("bob", format!("hello {i}"));
        bob.expect_delivery(&direct("alice"), ack.seq, TIMEOUT);
    }
    let stored = await_metric(&broker, "parley_messages_stored_total", |v| {
        v >= stored_before + SENT as f64
    });
    assert_eq!(
        stored,
        stored_before + SENT as f64,
        "exactly one stored message per send"
    );
    // Each shard publishes its counters on its own (about every 100 ms): the delivering shard's
    // may come a little after the storing shard's.
    await_metric(&broker, "parley_deliveries_total", |v| v >= SENT as f64);
    let after = scrape(&broker);
    assert_eq!(
        total(&after, "parley_node_messages_stored_total"),
        Some(stored)
    );
    assert!(total(&after, "parley_deliveries_total").unwrap_or(0.0) >= SENT as f64);
    await_metric(&broker, "parley_frames_in_total", |v| v > SENT as f64);

    drop(bob);
    await_metric(&broker, "parley_connections", |v| v == 1.0);
}

#[test]
fn broker_stats_once_prints_the_figures_from_metrics() {
    let broker = broker_with_token();
    let mut alice = broker.connect("alice", "laptop");
    let _bob = broker.connect("bob", "phone");
    alice.send("bob", "one");
    alice.send("bob", "two");
    await_metric(&broker, "parley_messages_stored_total", |v| v >= 2.0);
    await_metric(&broker, "parley_connections", |v| v == 2.0);
    await_metric(&broker, "parley_logins_total", |v| v >= 2.0);

    let out = Command::new(broker_bin())
        .args(["stats", "--once", "--admin"])
        .arg(broker.admin_addr().to_string())
        .env("PARLEY_ADMIN__TOKEN", TOKEN)
        .output()
        .expect("run broker stats");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in ["connections 2", "messages_stored 2", "logins 2"] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in\n{stdout}"
        );
    }
    for name in [
        "frames_in",
        "frames_out",
        "deliveries",
        "retransmits",
        "behinds",
        "flushes",
        "flush_ms_max",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{name} "))),
            "no {name} in\n{stdout}"
        );
    }

    let refused = Command::new(broker_bin())
        .args(["stats", "--once", "--admin"])
        .arg(broker.admin_addr().to_string())
        .env_remove("PARLEY_ADMIN__TOKEN")
        .output()
        .expect("run broker stats");
    assert!(!refused.status.success(), "no token, no figures");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
}

#[test]
fn metrics_count_websocket_connections_apart_from_tcp_ones() {
    let broker = broker_with_token();
    let _tcp = broker.connect("alice", "laptop");
    let ws = broker.connect_ws("bob", "browser");
    await_metric(&broker, "parley_connections", |v| v == 2.0);
    let ws_total = await_metric(&broker, "parley_websocket_connections", |v| v >= 1.0);
    assert_eq!(ws_total, 1.0, "one WebSocket connection of two");
    drop(ws);
    await_metric(&broker, "parley_websocket_connections", |v| v == 0.0);
    await_metric(&broker, "parley_connections", |v| v == 1.0);
}

/// The per-shard series of histogram `metric`, parsed: (shard, cumulative buckets as
/// `(le, count)`).
fn shard_histograms(scrape: &Scrape, metric: &str) -> Vec<(String, Vec<(f64, f64)>)> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter_map(|s| {
            let shard = s.labels.get("shard")?.to_owned();
            match &s.value {
                Value::Histogram(buckets) => Some((
                    shard,
                    buckets.iter().map(|b| (b.less_than, b.count)).collect(),
                )),
                other => panic!("{metric} is not a histogram: {other:?}"),
            }
        })
        .collect()
}

#[test]
fn latency_histograms_count_live_deliveries_and_flushes() {
    let broker = Broker::start(&[
        &format!("admin.token=\"{TOKEN}\""),
        "storage.durability=\"always\"",
    ]);
    let mut alice = broker.connect("alice", "laptop");
    let mut bob = broker.connect("bob", "phone");
    await_metric(&broker, "parley_connections", |v| v == 2.0);

    // Both ways, so that both home shards push (two shards: the users may live on either).
    const EACH: u64 = 6;
    for i in 0..EACH {
        let ack = alice.send("bob", format!("to bob {i}"));
        bob.expect_delivery(&direct("alice"), ack.seq, TIMEOUT);
        let ack = bob.send("alice", format!("to alice {i}"));
        alice.expect_delivery(&direct("bob"), ack.seq, TIMEOUT);
    }
    let delivered = (2 * EACH) as f64;
    // The shards publish about every 100 ms, each on its own.
    await_metric(&broker, "parley_send_to_deliver_seconds_count", |v| {
        v >= delivered
    });
    await_metric(&broker, "parley_flush_seconds_count", |v| v > 0.0);
    let s = scrape(&broker);
    let node_count = total(&s, "parley_node_send_to_deliver_seconds_count");
    assert_eq!(
        node_count,
        total(&s, "parley_send_to_deliver_seconds_count"),
        "the node's count is the sum of the shards'"
    );
    assert!(node_count >= Some(delivered), "{node_count:?}");
    assert_eq!(
        node_count,
        total(&s, "parley_node_deliveries_total"),
        "every live push of a send is timed (one scrape: the same snapshots)"
    );
    assert!(total(&s, "parley_node_flush_seconds_count") > Some(0.0));
    assert!(total(&s, "parley_node_send_to_deliver_seconds_sum").is_some());
    for metric in ["parley_send_to_deliver_seconds", "parley_flush_seconds"] {
        assert!(
            s.docs.get(metric).is_some_and(|d| d.starts_with("Seconds")),
            "{metric} has its HELP line: {:?}",
            s.docs.get(metric)
        );
        let shards = shard_histograms(&s, metric);
        assert_eq!(shards.len(), 2, "one {metric} series per shard");
        for (shard, buckets) in shards {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{metric}{{shard={shard}}} buckets are ascending and cumulative: {buckets:?}"
            );
            let inf = buckets.last().filter(|b| b.0.is_infinite()).map(|b| b.1);
            let count = s
                .samples
                .iter()
                .find(|x| {
                    x.metric == format!("{metric}_count")
                        && x.labels.get("shard") == Some(shard.as_str())
                })
                .map(|x| x.value.clone());
            assert_eq!(
                count,
                inf.map(Value::Untyped),
                "{metric}{{shard={shard}}}: the +Inf bucket holds every value"
            );
        }
    }

    let out = Command::new(broker_bin())
        .args(["stats", "--once", "--admin"])
        .arg(broker.admin_addr().to_string())
        .env("PARLEY_ADMIN__TOKEN", TOKEN)
        .output()
        .expect("run broker stats");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for name in [
        "send_to_deliver_p50_ms",
        "send_to_deliver_p99_ms",
        "flush_p99_ms",
    ] {
        let value = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(
            value.is_some_and(|v| v >= 0.0),
            "{name} is a latency in ms in\n{stdout}"
        );
    }
}
