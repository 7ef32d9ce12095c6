//! The cluster over Redis. The node registry: nodes on one Redis register under leases, see each
//! other join and leave, survive Redis restarting empty, refuse a duplicate node id, and a node
//! without `cluster.redis` never touches Redis. The presence index: a login is answered only
//! once its route is in Redis, every node sees it, a closed connection's route goes, a dead
//! node's routes are not served, Redis restarted empty gets every route back, and a login while
//! Redis is down is refused UNAVAILABLE with a retry hint. Each test starts its own
//! `redis-server` (Debian's package; `.ci/run` installs it) on a free loopback port, without
//! persistence, in a temporary directory, and stops it by PID.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use parley_proto::pb;
use parley_tests::Broker;
use parley_tests::http;
use parley_tests::loadgen::Loadgen;
use parley_tests::redis::Redis;

/// The admin token the tests configure.
const TOKEN: &str = "cluster-test-token-0123456789";

/// Short leases, so that the tests are quick.
const LEASE_MS: u64 = 1500;
/// The heartbeat of the test nodes.
const HEARTBEAT_MS: u64 = 200;

/// A cluster node on `redis` with node id `id`.
fn node(redis: &Redis, id: &str, extra: &[&str]) -> Broker {
    let mut settings = vec![
        format!("admin.token=\"{TOKEN}\""),
        format!("cluster.redis=\"{}\"", redis.url()),
        format!("cluster.node_id=\"{id}\""),
        format!("cluster.advertise=\"{id}.example:7400\""),
        format!("cluster.lease_ms={LEASE_MS}"),
        format!("cluster.heartbeat_ms={HEARTBEAT_MS}"),
    ];
    settings.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
    Broker::start(&refs)
}

/// `GET /v1/cluster` of `broker`.
fn cluster(broker: &Broker) -> serde_json::Value {
    let answer = http::get(broker.admin_addr(), "/v1/cluster", Some(TOKEN));
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

/// The node ids `broker` sees live, sorted.
fn members(broker: &Broker) -> Vec<String> {
    let mut ids: Vec<String> = cluster(broker)["members"]
        .as_array()
        .expect("members is an array")
        .iter()
        .map(|m| m["node_id"].as_str().expect("node_id").to_owned())
        .collect();
    ids.sort();
    ids
}

/// Waits until `broker` sees exactly `expected`; returns how long it took. Panics after
/// `within`.
fn await_members(broker: &Broker, expected: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let seen = members(broker);
        if seen == expected {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "after {within:?} the node sees {seen:?}, not {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the unlabelled series `name` in `/metrics`, if present.
fn metric(broker: &Broker, name: &str) -> Option<f64> {
    let answer = http::get(broker.admin_addr(), "/metrics", Some(TOKEN));
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

/// Waits until `/metrics` of `broker` shows `name` at `value`.
fn await_metric(broker: &Broker, name: &str, value: f64, within: Duration) {
    let start = Instant::now();
    loop {
        let v = metric(broker, name);
        if v == Some(value) {
            return;
        }
        assert!(start.elapsed() < within, "{name} is {v:?}, not {value}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Generous bound of "soon": a few heartbeats.
fn soon() -> Duration {
    Duration::from_millis(HEARTBEAT_MS * 10)
}

#[test]
fn three_nodes_on_one_redis_each_see_all_three() {
    let redis = Redis::start();
    let nodes = [
        node(&redis, "n1", &[]),
        node(&redis, "n2", &[]),
        node(&redis, "n3", &[]),
    ];
    for n in &nodes {
        await_members(n, &["n1", "n2", "n3"], soon());
        await_metric(n, "parley_cluster_nodes", 3.0, soon());
        assert_eq!(metric(n, "parley_cluster_lease_ok"), Some(1.0));
        assert_eq!(metric(n, "parley_cluster_redis_errors_total"), Some(0.0));
    }
    let view = cluster(&nodes[0]);
    assert_eq!(view["node_id"], "n1");
    assert_eq!(view["lease_ok"], true);
    let n2 = view["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["node_id"] == "n2"))
        .expect("n2 listed");
    assert_eq!(n2["advertise"], "n2.example:7400");
    assert_eq!(n2["boot_id"].as_str().map(str::len), Some(16));
    assert!(n2["lease_expires_ms"].as_u64() > n2["renewed_ms"].as_u64());
    // The first node logged the others' joins, one line each.
    let out = nodes[0].output();
    for id in ["n2", "n3"] {
        let joined = format!("cluster: node {id} joined");
        assert_eq!(
            out.matches(&joined).count(),
            1,
            "{joined:?} once in:\n{out}"
        );
    }
}

#[test]
fn a_second_process_with_a_live_node_id_refuses_to_start() {
    let redis = Redis::start();
    let first = node(&redis, "dup", &[]);
    await_members(&first, &["dup"], soon());
    let second = Broker::start_expecting_failure(&[
        &format!("cluster.redis=\"{}\"", redis.url()),
        "cluster.node_id=\"dup\"",
        &format!("cluster.lease_ms={LEASE_MS}"),
        &format!("cluster.heartbeat_ms={HEARTBEAT_MS}"),
    ]);
    let status = second.status.expect("the second process exits");
    assert!(!status.success());
    assert!(
        second.output.contains("held by another live process"),
        "{}",
        second.output
    );
    // The first one still holds its lease and never saw a second member.
    assert_eq!(members(&first), ["dup"]);
    assert_eq!(metric(&first, "parley_cluster_lease_ok"), Some(1.0));
}

#[test]
fn a_node_killed_disappears_within_lease_and_heartbeat_and_one_stopped_at_once() {
    let redis = Redis::start();
    let a = node(&redis, "a", &[]);
    let mut b = node(&redis, "b", &[]);
    let mut c = node(&redis, "c", &[]);
    await_members(&a, &["a", "b", "c"], soon());
    // kill -9: no goodbye; it is dead once its lease expires.
    c.kill9();
    let took = await_members(&a, &["a", "b"], Duration::from_secs(5));
    let bound = Duration::from_millis(LEASE_MS + HEARTBEAT_MS + 300);
    assert!(
        took <= bound,
        "a killed node vanished after {took:?} (> {bound:?})"
    );
    assert!(a.output().contains("cluster: node c left"));
    // A clean stop removes the registration: seen at the next heartbeat, not after the lease.
    assert!(b.terminate().success());
    let took = await_members(&a, &["a"], Duration::from_secs(5));
    assert!(
        took < Duration::from_millis(LEASE_MS / 2),
        "a stopped node vanished only after {took:?}"
    );
    assert_eq!(metric(&a, "parley_cluster_nodes"), Some(1.0));
}

#[test]
fn redis_restarted_empty_the_nodes_register_again() {
    let mut redis = Redis::start();
    let a = node(&redis, "a", &[]);
    let b = node(&redis, "b", &[]);
    await_members(&a, &["a", "b"], soon());
    await_members(&b, &["a", "b"], soon());
    redis.kill9();
    // Past the lease without a renewal, each reports its lease lost, and counts errors.
    for n in [&a, &b] {
        await_metric(n, "parley_cluster_lease_ok", 0.0, Duration::from_secs(5));
        assert!(metric(n, "parley_cluster_redis_errors_total").is_some_and(|e| e > 0.0));
    }
    redis.spawn();
    for n in [&a, &b] {
        await_metric(n, "parley_cluster_lease_ok", 1.0, Duration::from_secs(5));
        await_members(n, &["a", "b"], Duration::from_secs(5));
    }
    let out = a.output();
    assert!(out.contains("lease lost"), "{out}");
    assert!(out.contains("answers again"), "{out}");
    // Rate-limited: a few failures a second for ~2 s, at most a couple of lines.
    let lines = out.matches("cluster: Redis at").count();
    assert!((1..=3).contains(&lines), "{lines} error lines:\n{out}");
}

#[test]
fn a_node_without_cluster_redis_does_not_touch_redis() {
    let redis = Redis::start();
    let before = redis.command("INFO stats").is_some();
    assert!(before);
    let connections = |r: &Redis| {
        // `total_connections_received` counts every client, this test's own included.
        let addr = SocketAddr::from(([127, 0, 0, 1], r.port()));
        let mut s = TcpStream::connect(addr).expect("redis");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s.write_all(b"INFO stats\r\n").expect("write");
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read");
            if let Some(v) = line.trim().strip_prefix("total_connections_received:") {
                return v.parse::<u64>().expect("a number");
            }
            assert!(!line.is_empty(), "no total_connections_received");
        }
    };
    let at_start = connections(&redis);
    let plain = Broker::start(&[&format!("admin.token=\"{TOKEN}\"")]);
    std::thread::sleep(Duration::from_millis(HEARTBEAT_MS * 3));
    let answer = http::get(plain.admin_addr(), "/metrics", Some(TOKEN));
    assert_eq!(answer.status, 200);
    assert!(!answer.body.contains("parley_cluster"), "{}", answer.body);
    let api = http::get(plain.admin_addr(), "/v1/cluster", Some(TOKEN));
    assert_eq!(api.status, 404, "{}", api.body);
    // Only this test's own two INFO connections reached Redis; its keyspace is empty.
    assert_eq!(connections(&redis), at_start + 1);
    assert_eq!(redis.command("DBSIZE").as_deref(), Some(":0"));
}

/// `GET /v1/cluster/routes?user=` of `broker`: device → node id.
fn routes_seen_by(broker: &Broker, user: &str) -> BTreeMap<String, String> {
    let answer = http::get(
        broker.admin_addr(),
        &format!("/v1/cluster/routes?user={user}"),
        Some(TOKEN),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let v = answer.json();
    assert_eq!(v["user"], user);
    v["routes"]
        .as_array()
        .expect("routes is an array")
        .iter()
        .map(|r| {
            (
                r["device"].as_str().expect("device").to_owned(),
                r["node_id"].as_str().expect("node_id").to_owned(),
            )
        })
        .collect()
}

/// `pairs` as a map.
fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Waits until `f` holds, polling; panics with `what` after `within`.
fn await_true(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "after {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_login_is_answered_only_once_its_route_is_in_redis_and_every_node_sees_it() {
    let redis = Redis::start();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    let n3 = node(&redis, "n3", &[]);
    await_members(&n3, &["n1", "n2", "n3"], soon());
    let phone = n1.connect("alice", "phone");
    // Answered: so the route is in Redis already, with no wait.
    assert_eq!(redis.routes_of("alice"), map(&[("phone", "n1")]));
    let laptop = n2.connect("alice", "laptop");
    assert_eq!(
        redis.routes_of("alice"),
        map(&[("laptop", "n2"), ("phone", "n1")])
    );
    // A node holding none of her devices sees both.
    assert_eq!(
        routes_seen_by(&n3, "alice"),
        map(&[("laptop", "n2"), ("phone", "n1")])
    );
    assert!(routes_seen_by(&n3, "nobody").is_empty());
    // A connection that ends takes its route with it; the other device's stays.
    drop(phone);
    await_true(soon(), "the phone's route withdrawn", || {
        redis.routes_of("alice") == map(&[("laptop", "n2")])
    });
    assert_eq!(routes_seen_by(&n1, "alice"), map(&[("laptop", "n2")]));
    // The same device logging in on another node moves its route there; the old connection's
    // end (the laptop on n2 replaced by nothing: it stays open) does not touch the new route.
    let laptop_again = n3.connect("alice", "laptop");
    assert_eq!(redis.routes_of("alice"), map(&[("laptop", "n3")]));
    drop(laptop);
    std::thread::sleep(Duration::from_millis(HEARTBEAT_MS * 2));
    assert_eq!(redis.routes_of("alice"), map(&[("laptop", "n3")]));
    drop(laptop_again);
    await_metric(&n1, "parley_node_routes_asked_total", 1.0, soon());
    assert_eq!(metric(&n3, "parley_cluster_route_replays_total"), Some(0.0));
}

#[test]
fn a_killed_nodes_routes_are_not_served_once_its_lease_is_gone() {
    let redis = Redis::start();
    let a = node(&redis, "a", &[]);
    let mut b = node(&redis, "b", &[]);
    await_members(&a, &["a", "b"], soon());
    let _bob = b.connect("bob", "phone");
    assert_eq!(routes_seen_by(&a, "bob"), map(&[("phone", "b")]));
    b.kill9();
    await_members(&a, &["a"], Duration::from_secs(5));
    // The route names a boot that is gone: readers drop it (and delete it from Redis).
    assert!(routes_seen_by(&a, "bob").is_empty());
    assert!(redis.routes_of("bob").is_empty());
    // Restarted with its disk, b is a new boot; bob logs in again and is found there.
    b.restart();
    let _bob = b.connect("bob", "phone");
    assert_eq!(routes_seen_by(&a, "bob"), map(&[("phone", "b")]));
}

#[test]
fn redis_restarted_empty_gets_every_route_back_from_the_nodes() {
    let mut redis = Redis::start();
    let a = node(&redis, "a", &[]);
    let b = node(&redis, "b", &[]);
    let mut clients = Vec::new();
    for i in 0..20 {
        let n = if i % 2 == 0 { &a } else { &b };
        clients.push(n.connect(&format!("u{i}"), "d"));
    }
    for i in 0..20 {
        let expected = if i % 2 == 0 { "a" } else { "b" };
        assert_eq!(redis.routes_of(&format!("u{i}")), map(&[("d", expected)]));
    }
    redis.kill9();
    std::thread::sleep(Duration::from_millis(HEARTBEAT_MS * 2));
    redis.spawn();
    assert!(redis.routes_of("u0").is_empty(), "Redis starts empty");
    // At the next heartbeat each node finds its digest gone and writes its routes again.
    await_true(Duration::from_secs(5), "every route back in Redis", || {
        (0..20).all(|i| {
            let expected = if i % 2 == 0 { "a" } else { "b" };
            redis.routes_of(&format!("u{i}")) == map(&[("d", expected)])
        })
    });
    for n in [&a, &b] {
        assert!(metric(n, "parley_cluster_route_replays_total").is_some_and(|r| r >= 1.0));
        assert_eq!(metric(n, "parley_cluster_routes"), Some(10.0));
    }
    assert!(a.output().contains("writing them again"), "{}", a.output());
    // And the clients never noticed: still logged in, still answered.
    for c in &mut clients {
        c.ping();
    }
}

#[test]
fn a_login_while_redis_is_down_is_refused_unavailable_with_a_retry_hint() {
    let mut redis = Redis::start();
    let a = node(&redis, "a", &["cluster.route_timeout_ms=400"]);
    let _early = a.connect("early", "d");
    redis.kill9();
    let mut c = a.tcp();
    let token = a.token("late", "d");
    let started = Instant::now();
    let e = c.try_login(&token).expect_err("no route, no login");
    assert_eq!(e.code, pb::ErrorCode::Unavailable as i32, "{e:?}");
    assert!(e.fatal);
    assert!(e.retry_after_ms > 0, "{e:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "refused after {:?}, before the route timeout",
        started.elapsed()
    );
    await_metric(&a, "parley_node_routes_failed_total", 1.0, soon());
    // Redis back: the same login goes through, and both routes are there.
    redis.spawn();
    let _late = a.connect("late", "d");
    assert_eq!(redis.routes_of("late"), map(&[("d", "a")]));
    await_true(Duration::from_secs(5), "the early route replayed", || {
        redis.routes_of("early") == map(&[("d", "a")])
    });
}

/// The link key the linked test nodes share.
const LINK_SECRET: &str = "cluster-link-test-secret-0123456789abcdef";

/// A cluster node on `redis` with id `id` that accepts links on a free port (advertised as
/// bound) and proves `secret`.
fn linked(redis: &Redis, id: &str, secret: &str) -> Broker {
    let settings = [
        format!("admin.token=\"{TOKEN}\""),
        format!("cluster.redis=\"{}\"", redis.url()),
        format!("cluster.node_id=\"{id}\""),
        "cluster.listen=\"127.0.0.1:0\"".to_owned(),
        format!("cluster.secret=\"{secret}\""),
        format!("cluster.lease_ms={LEASE_MS}"),
        format!("cluster.heartbeat_ms={HEARTBEAT_MS}"),
    ];
    let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
    Broker::start(&refs)
}

/// The links `broker` has up: node id → (boot id, dialled by `broker`).
fn links(broker: &Broker) -> BTreeMap<String, (String, bool)> {
    cluster(broker)["links"]
        .as_array()
        .expect("links is an array")
        .iter()
        .map(|l| {
            (
                l["node_id"].as_str().expect("node_id").to_owned(),
                (
                    l["boot_id"].as_str().expect("boot_id").to_owned(),
                    l["dialled"].as_bool().expect("dialled"),
                ),
            )
        })
        .collect()
}

/// The node ids `broker` has links up to.
fn linked_to(broker: &Broker) -> Vec<String> {
    links(broker).into_keys().collect()
}

#[test]
fn nodes_that_share_the_link_key_link_up_pairwise_the_first_id_dialling() {
    let redis = Redis::start();
    let nodes = [
        linked(&redis, "n1", LINK_SECRET),
        linked(&redis, "n2", LINK_SECRET),
        linked(&redis, "n3", LINK_SECRET),
    ];
    let expect = [["n2", "n3"], ["n1", "n3"], ["n1", "n2"]];
    for (n, others) in nodes.iter().zip(expect) {
        await_true(Duration::from_secs(5), "two links up", || {
            linked_to(n) == others
        });
        await_metric(n, "parley_cluster_links", 2.0, soon());
        assert_eq!(
            metric(n, "parley_cluster_link_handshake_failures_total"),
            Some(0.0)
        );
    }
    // One link per pair, dialled by the node whose id sorts first; boots as registered.
    let n1 = links(&nodes[0]);
    assert!(n1.values().all(|(_, dialled)| *dialled), "{n1:?}");
    let n3 = links(&nodes[2]);
    assert!(n3.values().all(|(_, dialled)| !*dialled), "{n3:?}");
    let n2_boot = cluster(&nodes[1])["boot_id"].as_str().map(str::to_owned);
    assert_eq!(n1.get("n2").map(|(b, _)| b.clone()), n2_boot);
    // The advertised address is the bound one: what the others dialled.
    let view = cluster(&nodes[0]);
    let advertised = view["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["node_id"] == "n1"))
        .and_then(|m| m["advertise"].as_str())
        .expect("n1 advertises");
    assert!(advertised.starts_with("127.0.0.1:"), "{advertised}");
    assert!(!advertised.ends_with(":0"), "{advertised}");
}

#[test]
fn a_node_with_another_link_key_is_refused_and_the_others_stay_linked() {
    let redis = Redis::start();
    let a = linked(&redis, "a", LINK_SECRET);
    let b = linked(&redis, "b", LINK_SECRET);
    let c = linked(&redis, "c", "another-link-secret-0123456789abcdefgh");
    await_true(Duration::from_secs(5), "a and b linked", || {
        linked_to(&a) == ["b"] && linked_to(&b) == ["a"]
    });
    // c dials nobody it can prove itself to, and nobody accepts it: over several rounds of
    // dialling, no link involving c comes up.
    std::thread::sleep(Duration::from_millis(HEARTBEAT_MS * 5));
    assert!(linked_to(&c).is_empty(), "{:?}", links(&c));
    assert_eq!(linked_to(&a), ["b"]);
    assert_eq!(linked_to(&b), ["a"]);
    let failures = |n: &Broker| metric(n, "parley_cluster_link_handshake_failures_total");
    assert!(failures(&a).is_some_and(|f| f >= 1.0), "{:?}", failures(&a));
    assert!(failures(&c).is_some_and(|f| f >= 1.0), "{:?}", failures(&c));
    assert!(
        a.output().contains("did not prove the link key"),
        "{}",
        a.output()
    );
    // Rate-limited: one line per peer per 10 s, however often it is dialled.
    let lines = a.output().matches("link handshake").count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{}", a.output());
}

#[test]
fn a_killed_node_loses_its_links_and_links_again_as_a_new_boot_after_restart() {
    let redis = Redis::start();
    let a = linked(&redis, "a", LINK_SECRET);
    let mut b = linked(&redis, "b", LINK_SECRET);
    await_true(Duration::from_secs(5), "a linked to b", || {
        linked_to(&a) == ["b"]
    });
    let first_boot = links(&a)["b"].0.clone();
    b.kill9();
    await_true(Duration::from_secs(5), "a's link to b down", || {
        linked_to(&a).is_empty()
    });
    b.restart();
    await_true(Duration::from_secs(5), "a linked to b's new boot", || {
        links(&a)
            .get("b")
            .is_some_and(|(boot, _)| *boot != first_boot)
    });
    assert!(
        a.output().contains("cluster: link to b down"),
        "{}",
        a.output()
    );
}

/// Sends `signal` (e.g. `STOP`, `CONT`) to `broker`'s process.
fn signal(broker: &Broker, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(broker.pid().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}

#[test]
fn a_node_paused_past_its_lease_is_not_served_and_serves_its_routes_again_once_resumed() {
    let redis = Redis::start();
    let a = node(&redis, "a", &[]);
    let b = node(&redis, "b", &[]);
    await_members(&a, &["a", "b"], soon());
    let mut bob = b.connect("bob", "phone");
    assert_eq!(routes_seen_by(&a, "bob"), map(&[("phone", "b")]));
    signal(&b, "STOP");
    // Past its lease b is dead to the others, and so are its routes.
    await_members(&a, &["a"], Duration::from_secs(5));
    assert!(routes_seen_by(&a, "bob").is_empty());
    signal(&b, "CONT");
    // Resumed, b registers again under the same boot; the reader spoiled its digest when it
    // dropped bob's route, so b finds the difference and writes its routes again.
    await_members(&a, &["a", "b"], Duration::from_secs(5));
    await_true(Duration::from_secs(5), "bob's route served again", || {
        routes_seen_by(&a, "bob") == map(&[("phone", "b")])
    });
    assert!(
        metric(&b, "parley_cluster_route_replays_total").is_some_and(|r| r >= 1.0),
        "{}",
        b.output()
    );
    // bob never noticed.
    bob.ping();
}

/// A token secret the nodes of one test share (so that a token is good on every node).
const SHARED_SECRET: &str = "cluster-shared-token-secret-0123456789abc";

#[test]
fn loadgen_spreads_pairs_over_the_nodes_of_a_cluster_and_every_message_arrives() {
    let redis = Redis::start();
    let shared = format!("auth.secret=\"{SHARED_SECRET}\"");
    let a = node(&redis, "a", &[&shared]);
    let b = node(&redis, "b", &[&shared]);
    await_members(&a, &["a", "b"], soon());
    let run = Loadgen::new(["pairs", "--json", "--secret", SHARED_SECRET])
        .arg("--nodes")
        .arg(format!("{},{}", a.tcp_addr(), b.tcp_addr()))
        .args(["--conns", "40", "--window", "4"])
        .args(["--warmup", "0.2", "--duration", "1"])
        .run();
    run.assert_code(0, "a clean run over two nodes exits with 0");
    let report = run.report();
    report.check(report.bool("passed"), "the report says passed");
    report.check_eq(report.failures(), (0, 0, 0, 0, 0), "a clean verdict");
    let sent = report.u64("sent");
    report.check(sent > 0, "the run sent messages");
    report.check_eq(
        report.u64("delivered"),
        sent,
        "every message sent was delivered",
    );
    // Half the pairs on each node: each registered its 20 clients' routes.
    for n in [&a, &b] {
        await_metric(n, "parley_node_routes_asked_total", 20.0, soon());
    }
}

#[test]
fn a_node_stopped_cleanly_leaves_no_route_behind_in_redis() {
    let redis = Redis::start();
    let mut a = node(&redis, "a", &[]);
    let _alice = a.connect("alice", "phone");
    let _bob = a.connect("bob", "laptop");
    assert_eq!(redis.routes_of("alice"), map(&[("phone", "a")]));
    assert!(a.terminate().success());
    // Withdrawn by the node itself on its way out, not left to readers or the TTL.
    assert!(redis.routes_of("alice").is_empty());
    assert!(redis.routes_of("bob").is_empty());
    assert!(redis.hgetall("parley:cluster:node:a").is_empty());
}

#[test]
fn garbage_on_the_link_port_is_refused_and_links_still_form() {
    let redis = Redis::start();
    let a = linked(&redis, "a", LINK_SECRET);
    let addr: SocketAddr = cluster(&a)["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["node_id"] == "a"))
        .and_then(|m| m["advertise"].as_str())
        .and_then(|s| s.parse().ok())
        .expect("a advertises its link address");
    // Not a link: a length prefix announcing 1 GiB, then bytes (closed at once); and an HTTP
    // request, read as a 71-byte frame that never completes (closed at the handshake's 5 s).
    for junk in [
        &b"\xff\xff\xff\xff\x03garbage"[..],
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(addr).expect("connect to the link port");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(junk);
        let mut buf = [0u8; 64];
        // Closed by a; nothing was ever answered to it.
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the link port answered {junk:?} with {other:?}"),
        }
    }
    await_true(soon(), "both counted", || {
        metric(&a, "parley_cluster_link_handshake_failures_total").is_some_and(|f| f >= 2.0)
    });
    // A real node still links.
    let b = linked(&redis, "b", LINK_SECRET);
    await_true(Duration::from_secs(5), "a and b linked", || {
        linked_to(&a) == ["b"] && linked_to(&b) == ["a"]
    });
}

#[test]
fn logins_over_websocket_and_udp_wait_for_their_routes_too() {
    let redis = Redis::start();
    let a = node(&redis, "a", &["listen.udp=\"127.0.0.1:0\""]);
    let mut ws = a.connect_ws("carol", "browser");
    assert_eq!(redis.routes_of("carol"), map(&[("browser", "a")]));
    let mut udp = a.connect_udp("carol", "game");
    assert_eq!(
        redis.routes_of("carol"),
        map(&[("browser", "a"), ("game", "a")])
    );
    // Both sessions work as they do outside a cluster.
    ws.ping();
    udp.ping();
    drop(udp);
    drop(ws);
    // A UDP session has no close: its route stays until the broker stops hearing from it (the
    // idle timeout). The WebSocket's goes at once.
    await_true(soon(), "the browser's route withdrawn", || {
        !redis.routes_of("carol").contains_key("browser")
    });
}

#[test]
fn a_presence_query_counts_devices_connected_to_other_nodes() {
    let redis = Redis::start();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    await_members(&n1, &["n1", "n2"], soon());
    let mut alice = n1.connect("alice", "phone");
    let _dave = n1.connect("dave", "laptop");
    let _bob_phone = n2.connect("bob", "phone");
    let _bob_tablet = n2.connect("bob", "tablet");
    let answer = alice.presence(pb::PresenceRequest {
        action: pb::PresenceAction::Query as i32,
        users: vec!["bob".into(), "carol".into(), "dave".into()],
        ..Default::default()
    });
    let by_user: BTreeMap<String, (i32, Vec<String>)> = answer
        .users
        .into_iter()
        .map(|u| (u.user, (u.status, u.devices)))
        .collect();
    let online = pb::PresenceStatus::Online as i32;
    let offline = pb::PresenceStatus::Offline as i32;
    // bob's devices are all on n2; alice asks n1.
    assert_eq!(
        by_user["bob"],
        (online, vec!["phone".to_owned(), "tablet".to_owned()])
    );
    assert_eq!(by_user["carol"], (offline, Vec::new()));
    assert_eq!(by_user["dave"], (online, vec!["laptop".to_owned()]));
}
