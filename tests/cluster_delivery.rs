//! Messages across the nodes of a cluster (`cluster.nodes`): three nodes on one Redis, each
//! conversation owned by one node and each user homed on one, clients connected anywhere. A
//! message between users on different nodes is stored once by its owner and delivered to both
//! sides; a user may log in on any node (its session runs at its home, the socket stays where
//! it connected), over TCP, WebSocket or UDP, and sees the same conversations from each; a group
//! spans the nodes; a node killed with SIGKILL under load loses nothing acked: its clients log in
//! elsewhere, resend and sync, and every conversation ends gapless with every acked message
//! exactly once; a restarted node learns its users' conversations from the other nodes, and a
//! node takes logins only once it heard from them (or gave up waiting); a presence subscription follows a user on every node;
//! and a node whose lease ran out stores nothing until it holds it again. Each test starts its own `redis-server` (see
//! `parley_tests::redis`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_proto::pb;
use parley_tests::redis::Redis;
use parley_tests::{Broker, Client, UdpClient, WsClient, direct, group, group_request, http};

/// The admin token the tests configure.
const TOKEN: &str = "cluster-test-token-0123456789";
/// A token secret the nodes share (a token is good on every node).
const SECRET: &str = "cluster-shared-token-secret-0123456789abc";
/// Short leases, so that the tests are quick.
const LEASE_MS: u64 = 1500;
/// The heartbeat of the test nodes.
const HEARTBEAT_MS: u64 = 200;
/// The node ids of the test cluster.
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// Node `id` of the three-node cluster on `redis`.
fn member(redis: &Redis, id: &str) -> Broker {
    member_with(redis, id, &[])
}

/// Node `id` of the three-node cluster on `redis`, with `extra` settings.
fn member_with(redis: &Redis, id: &str, extra: &[&str]) -> Broker {
    let mut settings = vec![
        "listen.udp=\"127.0.0.1:0\"".to_owned(),
        format!("admin.token=\"{TOKEN}\""),
        format!("auth.secret=\"{SECRET}\""),
        format!("cluster.redis=\"{}\"", redis.url()),
        format!("cluster.node_id=\"{id}\""),
        "cluster.listen=\"127.0.0.1:0\"".to_owned(),
        "cluster.nodes=[\"n1\",\"n2\",\"n3\"]".to_owned(),
        format!("cluster.lease_ms={LEASE_MS}"),
        format!("cluster.heartbeat_ms={HEARTBEAT_MS}"),
        "shards=2".to_owned(),
    ];
    settings.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
    Broker::start(&refs)
}

/// The three nodes, each linked to the other two and taking logins.
fn cluster(redis: &Redis) -> Vec<Broker> {
    let nodes: Vec<Broker> = NODES.iter().map(|id| member(redis, id)).collect();
    for n in &nodes {
        await_settled(n, 2);
    }
    nodes
}

/// Waits until `node` has `count` links up and takes logins (it heard from the others).
fn await_settled(node: &Broker, count: usize) {
    let start = Instant::now();
    loop {
        let answer = http::get(node.admin_addr(), "/v1/cluster", Some(TOKEN));
        let json = answer.json();
        let up = json["links"].as_array().map_or(0, Vec::len);
        if up == count && json["settled"] == true {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "links up: {up}, not {count}; {json}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client of `node` logged in as `user/device` (with the cluster's shared secret).
fn login(node: &Broker, user: &str, device: &str) -> Client {
    let mut c = Client::connect(node.tcp_addr(), SECRET);
    c.login(user, device);
    c
}

/// The value of the unlabelled series `name` in `node`'s `/metrics`.
fn metric(node: &Broker, name: &str) -> f64 {
    let answer = http::get(node.admin_addr(), "/metrics", Some(TOKEN));
    answer
        .body
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until the sum of `name` over `nodes` is at least `least` (counters are published every
/// 100 ms or so); panics after [`PATIENCE`].
fn await_sum_at_least(nodes: &[Broker], name: &str, least: f64) {
    let start = Instant::now();
    loop {
        let sum: f64 = nodes.iter().map(|n| metric(n, name)).sum();
        if sum >= least {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{name} is {sum}, not {least} or more"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_message_between_users_on_different_nodes_is_stored_once_and_reaches_the_other_side() {
    let redis = Redis::start();
    let nodes = cluster(&redis);
    let mut alice = login(&nodes[0], "alice", "phone");
    let mut bob = login(&nodes[1], "bob", "phone");
    let mut seqs = Vec::new();
    for i in 0..20 {
        let ack = alice.send("bob", format!("hello {i}"));
        seqs.push(ack.seq);
    }
    assert_eq!(
        seqs,
        (1..=20).collect::<Vec<_>>(),
        "gapless seqs from the owner"
    );
    bob.wait_for_cursor(&direct("alice"), 20, PATIENCE);
    for seq in 1..=20 {
        let m = bob.message(&direct("alice"), seq).expect("held");
        assert_eq!(m.body, Bytes::from(format!("hello {}", seq - 1)));
        assert_eq!(m.from_user, "alice");
    }
    // The other way, answered on the same conversation.
    let ack = bob.send("alice", "back");
    assert_eq!(ack.seq, 21);
    alice.expect_delivery(&direct("bob"), 21, PATIENCE);
    bob.assert_no_duplicates();
    alice.assert_no_duplicates();
    // Mail crossed the links (the users' homes and the owner are not all on one node).
    await_sum_at_least(&nodes, "parley_node_remote_mail_in_total", 1.0);
}

#[test]
fn a_user_may_log_in_on_any_node_and_every_device_gets_the_same_conversation() {
    let redis = Redis::start();
    let nodes = cluster(&redis);
    // carol's three devices, one on each node: two of them are relayed to her home.
    let mut devices: Vec<Client> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| login(n, "carol", &format!("dev{i}")))
        .collect();
    let mut dave = login(&nodes[2], "dave", "laptop");
    for i in 0..5 {
        dave.send("carol", format!("m{i}"));
    }
    for d in &mut devices {
        d.wait_for_cursor(&direct("dave"), 5, PATIENCE);
        d.assert_no_duplicates();
    }
    // A device sends from a relayed connection; the others and dave see it.
    devices[0].send("dave", "from dev0");
    dave.expect_delivery(&direct("carol"), 6, PATIENCE);
    devices[1].expect_delivery(&direct("dave"), 6, PATIENCE);
    devices[2].expect_delivery(&direct("dave"), 6, PATIENCE);
    // History and sync from a relayed connection come from the owner.
    let page = devices[1].history(&direct("dave"), 0, None, 50);
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    await_sum_at_least(&nodes, "parley_node_relays_opened_total", 2.0);
    // A fresh device on another node syncs everything.
    let mut late = login(&nodes[1], "carol", "late");
    let synced = late.sync();
    assert_eq!(synced.seqs(&direct("dave")), (1..=6).collect::<Vec<_>>());
}

#[test]
fn websocket_and_udp_sessions_are_relayed_to_their_home_like_tcp() {
    let redis = Redis::start();
    let nodes = cluster(&redis);
    // erin on every node over WebSocket and over UDP: at least four of the six are relayed.
    let mut ws: Vec<WsClient> = Vec::new();
    let mut udp: Vec<UdpClient> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut w = WsClient::connect(n.ws_addr(), SECRET);
        w.login("erin", &format!("ws{i}"));
        ws.push(w);
        let mut u = UdpClient::connect(n.udp_addr(), SECRET);
        u.login("erin", &format!("udp{i}"));
        udp.push(u);
    }
    let mut frank = login(&nodes[0], "frank", "laptop");
    for i in 0..10 {
        frank.send("erin", format!("m{i}"));
    }
    for w in &mut ws {
        w.wait_for_cursor(&direct("frank"), 10, PATIENCE);
        w.assert_no_duplicates();
    }
    for u in &mut udp {
        u.wait_for_cursor(&direct("frank"), 10, PATIENCE);
        u.assert_no_duplicates();
    }
    // And back, from a relayed WebSocket and a relayed UDP session.
    ws[1].send("frank", "ws reply");
    udp[2].send("frank", "udp reply");
    frank.expect_delivery(&direct("erin"), 11, PATIENCE);
    frank.expect_delivery(&direct("erin"), 12, PATIENCE);
}

#[test]
fn a_group_spans_the_nodes() {
    let redis = Redis::start();
    let nodes = cluster(&redis);
    let members = ["gina", "hank", "ivy", "jack"];
    let mut clients: Vec<Client> = members
        .iter()
        .enumerate()
        .map(|(i, u)| login(&nodes[i % 3], u, "phone"))
        .collect();
    clients[0].group(group_request(
        pb::GroupAction::Create,
        "crew",
        &members[1..],
    ));
    let team = group("crew");
    let mut sent = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_to(&team, format!("from {i}"));
        sent += 1;
    }
    // The creation event is seq 1; each send one more. A sender's own message is not pushed
    // to it: the others' are, and a sync brings the rest.
    let last = 1 + sent;
    for (i, c) in clients.iter_mut().enumerate() {
        let others: Vec<u64> = (2..=last).filter(|&s| s != 2 + i as u64).collect();
        for &seq in &others {
            if !c.held_seqs(&team).contains(&seq) {
                c.expect_delivery(&team, seq, PATIENCE);
            }
        }
        eprintln!("{i}: arrivals {:?}", c.arrivals());
        c.assert_no_duplicates();
        c.sync();
        assert_eq!(c.held_seqs(&team), (1..=last).collect::<Vec<_>>());
    }
    let page = clients[3].history(&team, 0, None, 50);
    assert_eq!(page.messages.len() as u64, last);
}

/// One user of the load test: sends to its peer through whatever node answers, resending each
/// message (same client message id) until it is acked.
struct Sender {
    client: Client,
    peer: String,
    /// The node it is connected to (an index into the address list).
    at: usize,
    /// Acked client message ids → seq.
    acked: BTreeMap<u64, u64>,
}

impl Sender {
    /// Sends message `n` until acked, moving to the next node when its node fails it;
    /// `waiting` runs whenever it waits (the test restarts the killed node from there).
    fn send(&mut self, n: u64, addrs: &[SocketAddr], waiting: &mut dyn FnMut()) {
        let client_msg_id = 1_000_000 + n;
        let body = Bytes::from(format!("{} #{n}", self.client.user()));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "message {n} never acked");
            self.client
                .start_send_with_id(direct(&self.peer), client_msg_id, body.clone());
            match self
                .client
                .try_send_ack(client_msg_id, Duration::from_secs(3))
            {
                Ok(ack) => {
                    self.acked.insert(client_msg_id, ack.seq);
                    return;
                }
                Err(why) => {
                    if why.starts_with("refused") {
                        // UNAVAILABLE: the owner is down; wait a little and retry there.
                        waiting();
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    // Closed or silent: log in again on the next node that takes us.
                    loop {
                        assert!(Instant::now() < deadline, "no node takes {}", self.peer);
                        self.at = (self.at + 1) % addrs.len();
                        if self.client.try_reconnect_to(addrs[self.at]).is_ok() {
                            break;
                        }
                        waiting();
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }
}

#[test]
fn a_node_killed_under_load_loses_nothing_acked_and_seqs_stay_gapless() {
    let redis = Redis::start();
    let mut nodes = cluster(&redis);
    let addrs: Vec<SocketAddr> = nodes.iter().map(Broker::tcp_addr).collect();
    const PAIRS: usize = 6;
    const MESSAGES: u64 = 40;
    let mut senders: Vec<Sender> = (0..PAIRS * 2)
        .map(|i| {
            let (me, peer) = (format!("u{i}"), format!("u{}", i ^ 1));
            let at = i % 3;
            Sender {
                client: login(&nodes[at], &me, "d"),
                peer,
                at,
                acked: BTreeMap::new(),
            }
        })
        .collect();
    let started = Instant::now();
    let mut killed_at: Option<Instant> = None;
    let mut back_at: Option<Instant> = None;
    for n in 0..MESSAGES {
        if n == MESSAGES / 3 {
            nodes[1].kill9();
            killed_at = Some(Instant::now());
        }
        // Restarted a second after the kill, from whichever sender is waiting then (or once
        // every message of this round went through the other nodes).
        let mut restart = || {
            if back_at.is_none() && killed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1))
            {
                nodes[1].restart_on_same_ports();
                back_at = Some(Instant::now());
            }
        };
        for s in &mut senders {
            s.send(n, &addrs, &mut restart);
        }
        restart();
    }
    let (killed, back) = (killed_at.expect("killed"), back_at.expect("restarted"));
    eprintln!(
        "killed, restarted after {:?}; everything acked {:?} after the restart",
        back - killed,
        back.elapsed()
    );
    eprintln!(
        "{} messages acked in {:?}",
        PAIRS as u64 * 2 * MESSAGES,
        started.elapsed()
    );
    // Every conversation: gapless seqs, each acked message exactly once, nothing else.
    for pair in 0..PAIRS {
        let (a, b) = (pair * 2, pair * 2 + 1);
        let mut want: BTreeMap<u64, String> = BTreeMap::new();
        for i in [a, b] {
            for (&cmid, &seq) in &senders[i].acked {
                let body = format!("u{i} #{}", cmid - 1_000_000);
                assert!(
                    want.insert(seq, body).is_none(),
                    "two acked messages share seq {seq}"
                );
            }
        }
        assert_eq!(
            want.keys().copied().collect::<Vec<_>>(),
            (1..=2 * MESSAGES).collect::<Vec<_>>(),
            "acked seqs of pair {pair} are gapless and one per message"
        );
        let mut reader = login(&nodes[(pair + 1) % 3], &format!("u{a}"), "reader");
        let peer = direct(&format!("u{b}"));
        let mut got: BTreeMap<u64, String> = BTreeMap::new();
        let mut before = 0;
        loop {
            let page = reader.history(&peer, before, None, 100);
            for m in &page.messages {
                got.insert(m.seq, String::from_utf8_lossy(&m.body).into_owned());
            }
            match page.messages.first() {
                Some(first) if page.more => before = first.seq,
                _ => break,
            }
        }
        assert_eq!(
            got, want,
            "pair {pair}: the stored conversation is what was acked"
        );
        let distinct: BTreeSet<&String> = got.values().collect();
        assert_eq!(distinct.len(), got.len(), "no message stored twice");
    }
}

#[test]
fn a_node_whose_lease_ran_out_stores_nothing_until_it_holds_it_again() {
    let mut redis = Redis::start();
    // A cluster of one node: its conversations are its own, its lease still fences them.
    let settings = [
        format!("admin.token=\"{TOKEN}\""),
        format!("auth.secret=\"{SECRET}\""),
        format!("cluster.redis=\"{}\"", redis.url()),
        "cluster.node_id=\"n1\"".to_owned(),
        "cluster.nodes=[\"n1\"]".to_owned(),
        format!("cluster.lease_ms={LEASE_MS}"),
        format!("cluster.heartbeat_ms={HEARTBEAT_MS}"),
    ];
    let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
    let node = Broker::start(&refs);
    let mut alice = login(&node, "alice", "phone");
    assert_eq!(alice.send("bob", "before").seq, 1);
    // Redis gone: the lease cannot be renewed, and once it has run out the node stores nothing.
    redis.kill9();
    std::thread::sleep(Duration::from_millis(LEASE_MS + 2 * HEARTBEAT_MS));
    let refused = alice.send_refused(&direct("bob"), "while fenced");
    assert_eq!(
        refused.code,
        pb::ErrorCode::Unavailable as i32,
        "{refused:?}"
    );
    assert!(refused.retry_after_ms > 0);
    await_sum_at_least(std::slice::from_ref(&node), "parley_node_fenced_total", 1.0);
    // Redis back (empty): the node registers again, holds its lease, and stores again, the
    // next seq after the last one stored.
    redis.spawn();
    let start = Instant::now();
    loop {
        let id = parley_tests::client::fresh_client_msg_id();
        alice.start_send_with_id(direct("bob"), id, Bytes::from_static(b"after"));
        match alice.try_send_ack(id, PATIENCE) {
            Ok(ack) => {
                assert_eq!(ack.seq, 2, "nothing was stored while fenced");
                break;
            }
            Err(why) => {
                assert!(start.elapsed() < PATIENCE, "still refused: {why}");
                std::thread::sleep(Duration::from_millis(HEARTBEAT_MS));
            }
        }
    }
}

#[test]
fn presence_subscriptions_follow_users_on_every_node() {
    let redis = Redis::start();
    let nodes = cluster(&redis);
    let mut alice = login(&nodes[0], "alice", "phone");
    let answer = alice.presence(pb::PresenceRequest {
        action: pb::PresenceAction::Subscribe as i32,
        users: vec!["bob".into()],
        ..Default::default()
    });
    assert_eq!(answer.users[0].status, pb::PresenceStatus::Offline as i32);
    // bob connects to the other two nodes, one after the other.
    let online = pb::PresenceStatus::Online as i32;
    let bob = login(&nodes[1], "bob", "phone");
    alice.wait_until(PATIENCE, "bob is pushed ONLINE", |c| {
        c.presence_pushes()
            .iter()
            .flat_map(|p| &p.users)
            .any(|u| u.user == "bob" && u.status == online && u.devices == ["phone"])
    });
    let _tablet = login(&nodes[2], "bob", "tablet");
    alice.wait_until(PATIENCE, "bob's second device is pushed", |c| {
        c.presence_pushes()
            .iter()
            .flat_map(|p| &p.users)
            .any(|u| u.user == "bob" && u.devices.len() == 2)
    });
    drop(bob);
    alice.wait_until(PATIENCE, "bob's phone leaves", |c| {
        c.presence_pushes()
            .last()
            .and_then(|p| p.users.iter().find(|u| u.user == "bob"))
            .is_some_and(|u| u.devices == ["tablet"])
    });
}

#[test]
fn a_restarted_node_learns_its_users_conversations_from_the_other_nodes() {
    let redis = Redis::start();
    let mut nodes = cluster(&redis);
    // Ten conversations started on n1: most of them are owned by the other two nodes.
    for i in 0..10 {
        let mut r = login(&nodes[0], &format!("r{i}"), "d");
        r.send(&format!("q{i}"), format!("to q{i}"));
    }
    nodes[0].kill9();
    // Restarted once its lease has run out, so that it registers at once and listens before
    // its links are up.
    std::thread::sleep(Duration::from_millis(LEASE_MS + 2 * HEARTBEAT_MS));
    nodes[0].restart_on_same_ports();
    // Logged in as soon as n1 takes logins (it may refuse them UNAVAILABLE until it heard from
    // the others): the first sync lists every conversation, whichever node owns it.
    let mut refused = 0;
    for i in 0..10 {
        let user = format!("r{i}");
        let token = parley_tests::token::mint_valid(SECRET.as_bytes(), &user, "d");
        let start = Instant::now();
        let mut r = loop {
            let mut r: Client = Client::connect(nodes[0].tcp_addr(), SECRET);
            match r.try_login(&token) {
                Ok(_) => break r,
                Err(e) => {
                    assert_eq!(e.code, pb::ErrorCode::Unavailable as i32, "{e:?}");
                    assert!(e.retry_after_ms > 0);
                    assert!(start.elapsed() < PATIENCE, "n1 never took the login");
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let synced = r.sync();
        assert_eq!(
            synced.seqs(&direct(&format!("q{i}"))),
            vec![1],
            "{user}'s first sync after the restart"
        );
    }
    eprintln!("{refused} logins refused while n1 was starting");
}

#[test]
fn a_node_that_has_not_heard_from_the_others_refuses_logins_until_it_gives_up_waiting() {
    let redis = Redis::start();
    let _n2 = member(&redis, "n2");
    let _n3 = member(&redis, "n3");
    // n1 proves another link key: the others never link with it, so it never hears from them.
    let n1 = member_with(
        &redis,
        "n1",
        &["cluster.secret=\"another-link-secret-0123456789abcdefgh\""],
    );
    // A user homed on n1 (placement is the cluster's, computed here as any client may).
    let user = (0..)
        .map(|i| format!("nina{i}"))
        .find(|u| parley_proto::placement::home_node(&NODES, u) == 0)
        .expect("some user is homed on n1");
    let token = parley_tests::token::mint_valid(SECRET.as_bytes(), &user, "d");
    let mut early: Client = Client::connect(n1.tcp_addr(), SECRET);
    let refused = early
        .try_login(&token)
        .expect_err("a login before n1 heard from the others");
    assert_eq!(
        refused.code,
        pb::ErrorCode::Unavailable as i32,
        "{refused:?}"
    );
    assert!(refused.message.contains("just started"), "{refused:?}");
    // Five heartbeats after it read the membership it serves logins anyway.
    let start = Instant::now();
    loop {
        let mut c: Client = Client::connect(n1.tcp_addr(), SECRET);
        if c.try_login(&token).is_ok() {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "n1 never took logins");
        std::thread::sleep(Duration::from_millis(100));
    }
}
