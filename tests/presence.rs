//! Presence and typing indicators through the real binary: a user's status over all its devices
//! (AWAY only when every device is away, OFFLINE with `last_seen`), queried once or subscribed
//! to (the current state, then coalesced changes: a flap inside the window pushes nothing, a real
//! change exactly once), subscriptions that end with their connection, a user with thousands of
//! subscribers that reaches each once without stalling its shard, the online count of a group,
//! typing relayed to the right devices and never stored, and every limit refused with a clear
//! code.

use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parley_proto::pb;
use parley_proto::pb::GroupAction as G;
use parley_proto::pb::PresenceAction as A;
use parley_proto::pb::PresenceStatus as S;
use parley_proto::pb::frame::Body;
use parley_tests::transport::Transport;
use parley_tests::{
    Broker, Client, ErrorCode, TIMEOUT, direct, group, group_request, presence_request,
};

/// The coalescing window of most tests, ms.
const WINDOW_MS: u64 = 100;
const WINDOW: Duration = Duration::from_millis(WINDOW_MS);

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn status(p: &pb::UserPresence) -> S {
    S::try_from(p.status).unwrap_or(S::Unspecified)
}

/// `(user, status, devices)` of each presence, for comparisons.
fn summary(users: &[pb::UserPresence]) -> Vec<(String, S, Vec<String>)> {
    users
        .iter()
        .map(|p| (p.user.clone(), status(p), p.devices.clone()))
        .collect()
}

fn query<T: Transport>(c: &mut Client<T>, users: &[&str]) -> Vec<pb::UserPresence> {
    c.presence(presence_request(A::Query, users)).users
}

fn set<T: Transport>(c: &mut Client<T>, s: S) -> pb::UserPresence {
    let answer = c.presence(pb::PresenceRequest {
        status: s as i32,
        ..presence_request(A::Set, &[])
    });
    assert_eq!(
        answer.users.len(),
        1,
        "SET answers with the user's presence"
    );
    answer.users[0].clone()
}

/// Queries `user` until its status is `want` (a close reaches the broker a moment after the
/// client drops its socket); returns that presence.
fn wait_for_status<T: Transport>(c: &mut Client<T>, user: &str, want: S) -> pb::UserPresence {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let p = query(c, &[user]).remove(0);
        if status(&p) == want {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "{user} is not {want:?} within {TIMEOUT:?}: {p:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The online count of group `id` as `c` asks it.
fn online_count<T: Transport>(c: &mut Client<T>, id: &str) -> Result<u64, i32> {
    c.try_presence(pb::PresenceRequest {
        group_id: id.to_owned(),
        ..presence_request(A::QueryGroup, &[])
    })
    .map(|u| {
        assert_eq!(u.group_id, id, "the answer names the group");
        u.online_count
    })
    .map_err(|e| e.code)
}

/// Asks for the online count of `id` until it is `want`.
fn wait_for_count<T: Transport>(c: &mut Client<T>, id: &str, want: u64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = online_count(c, id).expect("a member may ask");
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the online count of {id} is not {want} within {TIMEOUT:?}: {got}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `c` has `n` presence pushes, then reads for `quiet` more and returns every push.
fn pushes_after<T: Transport>(
    c: &mut Client<T>,
    n: usize,
    quiet: Duration,
) -> Vec<pb::PresenceUpdate> {
    let what = format!("{n} presence pushes");
    c.wait_until(TIMEOUT, &what, |c| c.presence_pushes().len() >= n);
    c.receive_for(quiet);
    c.take_presence_pushes()
}

#[test]
fn a_user_is_online_while_any_device_is_not_away_away_when_all_are_and_offline_with_last_seen() {
    let broker = Broker::start(&[&format!("presence.coalesce_ms={WINDOW_MS}")]);
    let mut asker = broker.connect_ws_json("asker", "browser");
    let mut phone = broker.connect("alice", "phone");
    let mut laptop = broker.connect("alice", "laptop");
    // A user the node holds (it has a conversation): its last_seen is kept when it leaves.
    phone.send("asker", "hi");

    assert_eq!(
        summary(&query(&mut asker, &["carol", "alice", "carol"])),
        vec![
            ("carol".into(), S::Offline, vec![]),
            (
                "alice".into(),
                S::Online,
                vec!["laptop".into(), "phone".into()]
            ),
        ],
        "in the order asked, repeats once, devices sorted"
    );
    let carol = query(&mut asker, &["carol"]).remove(0);
    assert_eq!(carol.last_seen, 0, "never seen since the node started");

    assert_eq!(
        status(&set(&mut phone, S::Away)),
        S::Online,
        "one device away of two: still ONLINE"
    );
    assert_eq!(
        status(&set(&mut laptop, S::Away)),
        S::Away,
        "every device away"
    );
    assert_eq!(status(&query(&mut asker, &["alice"])[0]), S::Away);
    {
        let mut tablet = broker.connect("alice", "tablet");
        assert_eq!(
            status(&query(&mut asker, &["alice"])[0]),
            S::Online,
            "a new connection starts ONLINE"
        );
        let _ = tablet.ping();
    }
    wait_for_status(&mut asker, "alice", S::Away);
    assert_eq!(status(&set(&mut laptop, S::Online)), S::Online);

    let before = now_unix_ms();
    drop(phone);
    drop(laptop);
    let gone = wait_for_status(&mut asker, "alice", S::Offline);
    let after = now_unix_ms();
    assert!(gone.devices.is_empty(), "{gone:?}");
    assert!(
        (before..=after).contains(&gone.last_seen),
        "last_seen {} is when the last device left (between {before} and {after})",
        gone.last_seen
    );
    let mut back = broker.connect("alice", "phone");
    let online = query(&mut asker, &["alice"]).remove(0);
    assert_eq!(
        (status(&online), online.last_seen),
        (S::Online, 0),
        "last_seen is reported while OFFLINE only"
    );
    let _ = back.ping();
}

#[test]
fn a_subscriber_gets_the_state_now_then_one_update_per_real_change_and_none_for_a_flap() {
    // A wider window than the other tests, so that the flap below surely falls inside it.
    let broker = Broker::start(&["presence.coalesce_ms=500"]);
    let window = Duration::from_millis(500);
    let mut watcher = broker.connect("watcher", "phone");
    let bob = broker.connect("bob", "phone");

    let answer = watcher.presence(presence_request(A::Subscribe, &["bob", "carol"]));
    assert_eq!(
        summary(&answer.users),
        vec![
            ("bob".into(), S::Online, vec!["phone".into()]),
            ("carol".into(), S::Offline, vec![])
        ]
    );
    watcher.receive_for(window * 2);
    assert!(
        watcher.presence_pushes().is_empty(),
        "nothing changed: {:?}",
        watcher.presence_pushes()
    );

    // A flap: the device drops and is back well within the window.
    drop(bob);
    let mut bob = broker.connect("bob", "phone");
    watcher.receive_for(window * 3);
    assert!(
        watcher.presence_pushes().is_empty(),
        "a device that drops and comes back within the window causes no update: {:?}",
        watcher.presence_pushes()
    );

    // A real change: exactly one update.
    let before = now_unix_ms();
    drop(bob);
    let pushes = pushes_after(&mut watcher, 1, window * 3);
    assert_eq!(pushes.len(), 1, "one update per change: {pushes:?}");
    let gone = &pushes[0].users;
    assert_eq!(summary(gone), vec![("bob".into(), S::Offline, vec![])]);
    assert!(gone[0].last_seen >= before, "{gone:?}");

    // Away and back, and a second device: each an update of its own window.
    bob = broker.connect("bob", "phone");
    let pushes = pushes_after(&mut watcher, 1, window * 2);
    assert_eq!(
        pushes.iter().map(|u| summary(&u.users)).collect::<Vec<_>>(),
        vec![vec![("bob".into(), S::Online, vec!["phone".into()])]]
    );
    set(&mut bob, S::Away);
    let pushes = pushes_after(&mut watcher, 1, window * 2);
    assert_eq!(summary(&pushes[0].users)[0].1, S::Away);
    assert_eq!(pushes.len(), 1);
    let _laptop = broker.connect("bob", "laptop");
    let pushes = pushes_after(&mut watcher, 1, window * 2);
    assert_eq!(
        pushes.iter().map(|u| summary(&u.users)).collect::<Vec<_>>(),
        vec![vec![(
            "bob".into(),
            S::Online,
            vec!["laptop".into(), "phone".into()]
        )]],
        "a device not away makes the user ONLINE again"
    );

    // Unsubscribed: no more.
    let done = watcher.presence(presence_request(A::Unsubscribe, &["bob"]));
    assert!(done.users.is_empty());
    drop(bob);
    watcher.receive_for(window * 3);
    assert!(watcher.presence_pushes().is_empty());
}

#[test]
fn subscriptions_end_with_their_connection() {
    let broker = Broker::start(&[&format!("presence.coalesce_ms={WINDOW_MS}")]);
    let mut watcher = broker.connect("watcher", "phone");
    let bob = broker.connect("bob", "phone");
    watcher.presence(presence_request(A::Subscribe, &["bob"]));
    drop(watcher);

    let mut again = broker.connect("watcher", "phone");
    let mut probe = broker.connect("probe", "phone");
    drop(bob);
    wait_for_status(&mut probe, "bob", S::Offline);
    again.receive_for(WINDOW * 4);
    assert!(
        again.presence_pushes().is_empty(),
        "a new connection of the same device has no subscription: {:?}",
        again.presence_pushes()
    );

    let answer = again.presence(presence_request(A::Subscribe, &["bob"]));
    assert_eq!(status(&answer.users[0]), S::Offline);
    let _bob = broker.connect("bob", "tablet");
    let pushes = pushes_after(&mut again, 1, WINDOW * 2);
    assert_eq!(
        summary(&pushes[0].users),
        vec![("bob".into(), S::Online, vec!["tablet".into()])]
    );
}

#[test]
fn a_user_with_5000_subscribers_going_online_reaches_each_once_and_the_shard_stays_responsive() {
    const WATCHERS: usize = 5000;
    let broker = Broker::start(&[
        &format!("presence.coalesce_ms={WINDOW_MS}"),
        // A flush of 5,000 notifications takes ten turns.
        "presence.max_notifications_per_turn=500",
        "limits.max_unauthenticated=20000",
        "limits.max_unauthenticated_per_source=20000",
    ]);
    // Logged in and subscribed in one write each, answered afterwards.
    let mut watchers: Vec<(Client, u64)> = (0..WATCHERS)
        .map(|i| {
            let mut c = broker.tcp();
            let user = format!("w{i:04}");
            c.request(Body::Login(pb::Login {
                protocol_version: parley_tests::PROTOCOL_VERSION,
                token: broker.token(&user, "phone"),
                client_name: String::new(),
            }));
            c.assume_logged_in(&user, "phone");
            let request_id = c.request(Body::PresenceRequest(presence_request(
                A::Subscribe,
                &["star"],
            )));
            (c, request_id)
        })
        .collect();
    for (c, request_id) in &mut watchers {
        let id = *request_id;
        let answer = c.recv_until(TIMEOUT, |f| f.request_id == id);
        match answer.body {
            Some(Body::PresenceUpdate(u)) => {
                assert_eq!(summary(&u.users), vec![("star".into(), S::Offline, vec![])]);
            }
            other => panic!("unexpected answer to SUBSCRIBE: {other:?}"),
        }
    }
    let mut pingers: Vec<Client> = (0..4)
        .map(|i| broker.connect(&format!("pinger{i}"), "phone"))
        .collect();

    let _star = broker.connect("star", "phone");
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    while start.elapsed() < WINDOW * 5 {
        for p in &mut pingers {
            slowest = slowest.max(p.ping());
        }
    }
    eprintln!("[presence] slowest ping while star's 5000 subscribers were notified: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "the shards stay responsive while a flush runs: slowest ping {slowest:?}"
    );

    for (c, _) in &mut watchers {
        c.wait_until(TIMEOUT, "star's update", |c| {
            !c.presence_pushes().is_empty()
        });
    }
    thread::sleep(WINDOW * 3);
    // A ping answered on each connection: anything pushed before its pong has been read.
    let pings: Vec<u64> = watchers
        .iter_mut()
        .map(|(c, _)| c.request(Body::Ping(pb::Ping { nonce: 7 })))
        .collect();
    for ((c, _), id) in watchers.iter_mut().zip(pings) {
        c.recv_until(TIMEOUT, |f| f.request_id == id);
        let pushes = c.take_presence_pushes();
        assert_eq!(
            pushes.iter().map(|u| summary(&u.users)).collect::<Vec<_>>(),
            vec![vec![("star".into(), S::Online, vec!["phone".into()])]],
            "every subscriber gets the change once"
        );
    }
}

#[test]
fn the_online_count_of_a_group_counts_its_members_with_a_device_online_over_every_shard() {
    let broker = Broker::start(&[&format!("presence.coalesce_ms={WINDOW_MS}")]);
    let team = group("team");
    let members = ["bob", "carol", "dave", "erin", "frank", "gina"];
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut bob_laptop = broker.connect("bob", "laptop");
    let mut carol = broker.connect_ws_json("carol", "browser");
    let mut eve = broker.connect("eve", "phone");
    alice.group(group_request(G::Create, "team", &members));
    bob.expect_delivery(&team, 1, TIMEOUT);
    bob_laptop.expect_delivery(&team, 1, TIMEOUT);
    carol.expect_delivery(&team, 1, TIMEOUT);

    assert_eq!(
        online_count(&mut alice, "team"),
        Ok(3),
        "alice, bob (two devices) and carol"
    );
    assert_eq!(
        online_count(&mut carol, "team"),
        Ok(3),
        "over WebSocket JSON too"
    );
    set(&mut bob, S::Away);
    set(&mut bob_laptop, S::Away);
    assert_eq!(online_count(&mut alice, "team"), Ok(3), "AWAY is online");
    let _dave = broker.connect("dave", "phone");
    assert_eq!(online_count(&mut alice, "team"), Ok(4));
    drop(carol);
    wait_for_count(&mut alice, "team", 3);

    assert_eq!(
        online_count(&mut eve, "team"),
        Err(ErrorCode::Forbidden as i32),
        "only members may ask"
    );
    assert_eq!(
        online_count(&mut eve, "nope"),
        Err(ErrorCode::Forbidden as i32)
    );
    assert_eq!(
        online_count(&mut alice, ""),
        Err(ErrorCode::InvalidArgument as i32)
    );
}

#[test]
fn typing_in_a_direct_conversation_reaches_the_other_users_devices_and_the_senders_others_never_stored()
 {
    let broker = Broker::start(&["presence.typing_min_interval_ms=1000"]);
    let mut alice = broker.connect("alice", "phone");
    let mut alice_laptop = broker.connect("alice", "laptop");
    let mut bob = broker.connect("bob", "phone");
    let mut bob_tablet = broker.connect_ws("bob", "tablet");
    let mut carol = broker.connect("carol", "phone");

    let first = Instant::now();
    alice.send_typing(&direct("bob"), true);
    // At most one of each kind per interval: this repeat is dropped.
    alice.send_typing(&direct("bob"), true);
    for (c, conversation) in [
        (&mut bob, direct("alice")),
        (&mut alice_laptop, direct("bob")),
    ] {
        c.wait_until(TIMEOUT, "a typing frame", |c| !c.typings().is_empty());
        let t = c.take_typings();
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[0].conversation.as_ref(),
            Some(&conversation),
            "in the reader's view"
        );
        assert_eq!(
            (t[0].user.as_str(), t[0].device.as_str(), t[0].typing),
            ("alice", "phone", true)
        );
    }
    bob_tablet.wait_until(TIMEOUT, "a typing frame", |c| !c.typings().is_empty());
    assert_eq!(bob_tablet.take_typings()[0].user, "alice");
    alice.receive_for(Duration::from_millis(200));
    carol.receive_for(Duration::from_millis(10));
    assert!(alice.typings().is_empty(), "not to the sending device");
    assert!(carol.typings().is_empty(), "not to strangers");

    bob.receive_for(Duration::from_millis(10));
    assert!(
        bob.take_typings().is_empty(),
        "the repeated typing:true within the interval was dropped"
    );
    // The stop is of the other kind: it passes.
    alice.send_typing(&direct("bob"), false);
    bob.wait_until(TIMEOUT, "the stop", |c| !c.typings().is_empty());
    assert!(!bob.take_typings()[0].typing);
    thread::sleep(
        Duration::from_millis(1000).saturating_sub(first.elapsed()) + Duration::from_millis(50),
    );
    alice.send_typing(&direct("bob"), true);
    bob.wait_until(TIMEOUT, "typing again after the interval", |c| {
        c.typings().iter().any(|t| t.typing)
    });

    // Never stored: nothing to sync, nothing in history.
    let sync = bob.sync_with(Vec::new(), 0);
    assert!(sync.summary.conversations.is_empty(), "{:?}", sync.summary);
    let page = bob.history(&direct("alice"), 0, None, 10);
    assert!(page.messages.is_empty() && page.last_seq == 0, "{page:?}");
}

#[test]
fn typing_in_a_group_reaches_its_members_online_but_not_the_sending_device_and_strangers_are_forbidden()
 {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect("alice", "phone");
    let mut alice_laptop = broker.connect("alice", "laptop");
    let mut bob = broker.connect("bob", "phone");
    let mut carol = broker.connect_ws_json("carol", "browser");
    let mut dave = broker.connect("dave", "phone");
    alice.group(group_request(G::Create, "team", &["bob", "carol", "erin"]));
    for c in [&mut bob, &mut alice_laptop] {
        c.expect_delivery(&team, 1, TIMEOUT);
    }
    carol.expect_delivery(&team, 1, TIMEOUT);

    alice.send_typing(&team, true);
    for c in [&mut bob, &mut alice_laptop] {
        c.wait_until(TIMEOUT, "a typing frame", |c| !c.typings().is_empty());
        let t = c.take_typings();
        assert_eq!(t[0].conversation.as_ref(), Some(&team));
        assert_eq!(
            (t[0].user.as_str(), t[0].device.as_str()),
            ("alice", "phone")
        );
    }
    carol.wait_until(TIMEOUT, "a typing frame", |c| !c.typings().is_empty());
    alice.receive_for(Duration::from_millis(200));
    dave.receive_for(Duration::from_millis(10));
    assert!(alice.typings().is_empty(), "not to the sending device");
    assert!(dave.typings().is_empty(), "not to non-members");

    let request_id = dave.send_typing(&team, true);
    let refused = dave.recv_until(TIMEOUT, |f| f.request_id == request_id);
    match refused.body {
        Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::Forbidden as i32),
        other => panic!("a stranger's typing is refused: {other:?}"),
    }

    let page = bob.history(&team, 0, None, 10);
    assert_eq!(page.last_seq, 1, "only the creation is stored: {page:?}");
}

#[test]
fn presence_limits_and_malformed_requests_are_refused_with_clear_codes() {
    let broker = Broker::start(&[
        "presence.max_users_per_request=3",
        "presence.max_subscriptions_per_connection=5",
    ]);
    let mut c = broker.connect("alice", "phone");
    let code = |r: Result<pb::PresenceUpdate, pb::Error>| r.map(|_| ()).map_err(|e| e.code);
    let invalid = Err(ErrorCode::InvalidArgument as i32);

    assert_eq!(
        code(c.try_presence(presence_request(A::Query, &["a", "b", "c", "d"]))),
        invalid,
        "past presence.max_users_per_request"
    );
    assert_eq!(
        code(c.try_presence(presence_request(A::Subscribe, &["a", "b", "c"]))),
        Ok(())
    );
    assert_eq!(
        code(c.try_presence(presence_request(A::Subscribe, &["a", "d", "e", "f"]))),
        invalid,
        "a request past the per-request limit"
    );
    assert_eq!(
        code(c.try_presence(presence_request(A::Subscribe, &["d", "e", "f"]))),
        invalid,
        "past presence.max_subscriptions_per_connection, refused whole"
    );
    assert_eq!(
        code(c.try_presence(presence_request(A::Subscribe, &["a", "d", "e"]))),
        Ok(()),
        "users already watched do not count twice"
    );
    c.presence(presence_request(A::Unsubscribe, &["a"]));
    assert_eq!(
        code(c.try_presence(presence_request(A::Subscribe, &["f"]))),
        Ok(()),
        "an unsubscription makes room"
    );
    assert_eq!(
        code(c.try_presence(presence_request(A::Query, &[""]))),
        invalid
    );
    assert_eq!(
        code(c.try_presence(presence_request(A::Unspecified, &["a"]))),
        invalid
    );
    assert_eq!(
        code(c.try_presence(pb::PresenceRequest {
            status: S::Offline as i32,
            ..presence_request(A::Set, &[])
        })),
        invalid,
        "SET takes ONLINE or AWAY"
    );
    let request_id = c.request(Body::Typing(pb::Typing::default()));
    let refused = c.recv_until(TIMEOUT, |f| f.request_id == request_id);
    assert!(
        matches!(&refused.body, Some(Body::Error(e)) if e.code == ErrorCode::InvalidArgument as i32),
        "typing needs a conversation: {refused:?}"
    );
    let _ = c.ping();
}

#[test]
fn presence_and_typing_work_over_websocket_json() {
    let broker = Broker::start(&[&format!("presence.coalesce_ms={WINDOW_MS}")]);
    let mut watcher = broker.connect_ws_json("watcher", "browser");
    let answer = watcher.presence(presence_request(A::Subscribe, &["bob"]));
    assert_eq!(status(&answer.users[0]), S::Offline);
    let mut bob = broker.connect("bob", "phone");
    let pushes = pushes_after(&mut watcher, 1, WINDOW * 2);
    assert_eq!(
        summary(&pushes[0].users),
        vec![("bob".into(), S::Online, vec!["phone".into()])]
    );
    bob.send_typing(&direct("watcher"), true);
    watcher.wait_until(TIMEOUT, "a typing frame", |c| !c.typings().is_empty());
    let t = watcher.take_typings();
    assert_eq!(t[0].conversation.as_ref(), Some(&direct("bob")));
    assert!(t[0].typing);
}
