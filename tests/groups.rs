//! Groups: created, changed and listed through the real binary; every change is a stored event
//! with its own seq, and what a member sees is decided by seqs (from its join on, nothing after
//! it leaves), live, in sync and in history, across restarts and `kill -9`; a group message is
//! stored once and reaches every online member's devices but the sending one.

use std::time::Duration;

use parley_proto::pb;
use parley_proto::pb::GroupAction as A;
use parley_tests::transport::Transport;
use parley_tests::{Broker, Client, ErrorCode, TIMEOUT, group, group_request, numbered_body};

/// Creates group `id` as `owner` with `members`; returns the result.
fn create<T: Transport>(owner: &mut Client<T>, id: &str, members: &[&str]) -> pb::GroupResult {
    owner.group(group_request(A::Create, id, members))
}

/// The seqs of `conversation` in `messages`.
fn seqs_of<'a>(
    messages: impl Iterator<Item = &'a pb::Message>,
    conversation: &pb::Conversation,
) -> Vec<u64> {
    messages
        .filter(|m| m.conversation.as_ref() == Some(conversation))
        .map(|m| m.seq)
        .collect()
}

fn event_type(m: &pb::Message) -> Option<pb::GroupEventType> {
    m.event
        .as_ref()
        .and_then(|e| pb::GroupEventType::try_from(e.r#type).ok())
}

#[test]
fn a_group_message_reaches_every_online_members_devices_once_but_not_the_sending_device() {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect("alice", "phone");
    let mut alice_laptop = broker.connect("alice", "laptop");
    let mut bob = broker.connect("bob", "phone");
    let mut bob_tablet = broker.connect_ws("bob", "tablet");
    let mut carol = broker.connect("carol", "phone");
    let mut dave = broker.connect("dave", "phone");

    let created = create(&mut alice, "team", &["bob", "carol"]);
    assert_eq!(
        created.seq, 1,
        "the creation is the group's first stored event"
    );
    assert_eq!(created.member_count, 3);
    assert_eq!(created.your_role, pb::GroupRole::Owner as i32);

    let ack = alice.send_to(&team, "hello team");
    assert_eq!(ack.seq, 2);
    assert_eq!(ack.conversation.as_ref(), Some(&team));
    for member in [&mut alice_laptop, &mut bob, &mut carol] {
        let m = member.expect_delivery(&team, 2, TIMEOUT);
        assert_eq!(&m.body[..], b"hello team");
        assert_eq!(m.from_user, "alice");
    }
    let m = bob_tablet.expect_delivery(&team, 2, TIMEOUT);
    assert_eq!(&m.body[..], b"hello team", "over WebSocket too");
    alice.assert_no_delivery(&team, 2, Duration::from_millis(300), "the sending device");
    dave.assert_no_delivery(&team, 2, Duration::from_millis(100), "dave is no member");
    for member in [&alice_laptop, &bob, &carol] {
        member.assert_no_duplicates();
    }
}

#[test]
fn every_change_is_a_system_message_with_its_own_seq_that_members_receive_in_order() {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");

    create(&mut alice, "team", &["bob"]);
    let renamed = alice.group(pb::GroupRequest {
        name: "The Team".into(),
        ..group_request(A::Rename, "team", &[])
    });
    assert_eq!((renamed.seq, renamed.name.as_str()), (2, "The Team"));
    alice.send_to(&team, "after the rename");
    let added = alice.group(group_request(A::AddMembers, "team", &["carol"]));
    assert_eq!((added.seq, added.member_count), (4, 3));

    bob.wait_until(TIMEOUT, "holding seqs 1..=4 of the group", |c| {
        c.held_seqs(&team) == vec![1, 2, 3, 4]
    });
    let kinds: Vec<_> = (1..=4)
        .map(|seq| bob.message(&team, seq).map(event_type))
        .collect();
    assert_eq!(
        kinds,
        vec![
            Some(Some(pb::GroupEventType::Created)),
            Some(Some(pb::GroupEventType::Renamed)),
            Some(None),
            Some(Some(pb::GroupEventType::MembersAdded)),
        ]
    );
    let created = bob.message(&team, 1).expect("held");
    assert_eq!(created.kind, pb::MessageKind::System as i32);
    assert_eq!(created.from_user, "alice");
    assert_eq!(
        bob.message(&team, 4)
            .and_then(|m| m.event.as_ref())
            .map(|e| e.users.clone()),
        Some(vec!["carol".to_owned()])
    );
}

#[test]
fn a_member_added_later_sees_the_group_from_its_join_on_live_in_sync_and_in_history() {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect("alice", "phone");
    create(&mut alice, "team", &["bob"]);
    for i in 0..3 {
        alice.send_to(&team, numbered_body(i, 16));
    }
    let added = alice.group(group_request(A::AddMembers, "team", &["dave"]));
    assert_eq!(added.seq, 5);
    alice.send_to(&team, "for dave too");

    let mut dave = broker.tcp();
    dave.login("dave", "phone");
    let sync = dave.sync_with(Vec::new(), 0);
    let summary: Vec<_> = sync
        .summary
        .conversations
        .iter()
        .map(|c| (c.conversation.clone(), c.last_seq, c.unread))
        .collect();
    assert_eq!(
        summary,
        vec![(Some(team.clone()), 6, 2)],
        "only what dave may read counts"
    );
    assert_eq!(seqs_of(sync.messages(), &team), vec![5, 6]);

    let page = dave.history(&team, 0, None, 100);
    assert_eq!(seqs_of(page.messages.iter(), &team), vec![5, 6]);
    assert_eq!((page.first_seq, page.last_seq, page.more), (5, 6, false));
    let older = dave.history(&team, 5, None, 100);
    assert!(
        older.messages.is_empty(),
        "nothing before its join: {older:?}"
    );

    alice.send_to(&team, "live");
    dave.expect_delivery(&team, 7, TIMEOUT);
}

#[test]
fn a_removed_member_gets_its_removal_and_nothing_after_it() {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    create(&mut alice, "team", &["bob", "carol"]);
    alice.send_to(&team, "before");
    let removed = alice.group(group_request(A::RemoveMembers, "team", &["bob"]));
    assert_eq!((removed.seq, removed.member_count), (3, 2));
    let m = bob.expect_delivery(&team, 3, TIMEOUT);
    assert_eq!(event_type(&m), Some(pb::GroupEventType::MembersRemoved));
    alice.send_to(&team, "after");
    bob.assert_no_delivery(
        &team,
        4,
        Duration::from_millis(500),
        "bob was removed at seq 3",
    );

    let refused = bob.send_refused(&team, "still here?");
    assert_eq!(refused.code, ErrorCode::Forbidden as i32);
    let fresh = broker.tcp();
    let mut bob_again = fresh;
    bob_again.login("bob", "laptop");
    let sync = bob_again.sync_with(Vec::new(), 0);
    assert_eq!(seqs_of(sync.messages(), &team), vec![1, 2, 3]);
    let page = bob_again.history(&team, 0, None, 100);
    assert_eq!(seqs_of(page.messages.iter(), &team), vec![1, 2, 3]);
    assert_eq!(
        page.last_seq, 3,
        "a former member's history ends at its removal"
    );
}

#[test]
fn who_may_do_what_follows_the_permission_table() {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut carol = broker.connect("carol", "phone");
    let mut eve = broker.connect("eve", "phone");
    create(&mut alice, "team", &["bob", "carol"]);
    let code = |r: Result<pb::GroupResult, pb::Error>| r.map(|_| ()).map_err(|e| e.code);

    assert_eq!(
        code(bob.try_group(group_request(A::AddMembers, "team", &["eve"]))),
        Err(ErrorCode::Forbidden as i32),
        "a member may not add"
    );
    assert_eq!(
        code(eve.try_group(group_request(A::GetMembers, "team", &[]))),
        Err(ErrorCode::Forbidden as i32),
        "a stranger may not list"
    );
    assert_eq!(
        eve.send_refused(&team, "let me in").code,
        ErrorCode::Forbidden as i32,
        "a stranger may not send"
    );
    assert_eq!(
        code(eve.try_group(group_request(A::JoinGroup, "team", &[]))),
        Err(ErrorCode::Forbidden as i32),
        "a closed group is not joined"
    );
    assert_eq!(
        code(eve.try_group(group_request(A::Create, "team", &[]))),
        Err(ErrorCode::AlreadyExists as i32)
    );
    assert_eq!(
        code(alice.try_group(group_request(A::Create, "team", &["bob"]))),
        Ok(()),
        "the owner creating it again (a retry) gets the group as it is"
    );
    let promote = pb::GroupRequest {
        role: pb::GroupRole::Admin as i32,
        ..group_request(A::SetRole, "team", &["bob", "carol"])
    };
    assert_eq!(
        code(bob.try_group(promote.clone())),
        Err(ErrorCode::Forbidden as i32),
        "only the owner gives roles"
    );
    alice.group(promote);
    assert_eq!(
        code(bob.try_group(group_request(A::RemoveMembers, "team", &["carol"]))),
        Err(ErrorCode::Forbidden as i32),
        "an admin does not remove an admin"
    );
    assert_eq!(
        code(bob.try_group(group_request(A::Dissolve, "team", &[]))),
        Err(ErrorCode::Forbidden as i32)
    );
    bob.group(group_request(A::AddMembers, "team", &["eve"]));
    bob.group(group_request(A::RemoveMembers, "team", &["eve"]));
    assert_eq!(
        code(bob.try_group(group_request(A::AddMembers, "nope", &["eve"]))),
        Err(ErrorCode::NotFound as i32)
    );

    let dissolved = alice.group(group_request(A::Dissolve, "team", &[]));
    assert_eq!(dissolved.member_count, 0);
    assert_eq!(
        carol.send_refused(&team, "anyone?").code,
        ErrorCode::NotFound as i32
    );
    assert_eq!(
        code(alice.try_group(group_request(A::Create, "team", &[]))),
        Err(ErrorCode::AlreadyExists as i32),
        "a dissolved group's id is not used again"
    );
}

#[test]
fn an_open_group_is_joined_and_an_owner_who_leaves_hands_it_on() {
    let broker = Broker::start(&[]);
    let lobby = group("lobby");
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut carol = broker.connect("carol", "phone");
    alice.group(pb::GroupRequest {
        open: true,
        name: "Lobby".into(),
        ..group_request(A::Create, "lobby", &[])
    });
    let joined = bob.group(group_request(A::JoinGroup, "lobby", &[]));
    assert_eq!(
        (joined.seq, joined.your_role),
        (2, pb::GroupRole::Member as i32)
    );
    carol.group(group_request(A::JoinGroup, "lobby", &[]));
    alice.group(group_request(A::Leave, "lobby", &[]));
    let left = bob.expect_delivery(&lobby, 4, TIMEOUT);
    assert_eq!(
        left.event.map(|e| e.new_owner),
        Some("bob".to_owned()),
        "the member who joined first owns it now"
    );
    let info = bob.group(group_request(A::GetMembers, "lobby", &[]));
    assert_eq!(info.your_role, pb::GroupRole::Owner as i32);
    assert_eq!(info.members, vec!["bob", "carol"]);
    carol.group(group_request(A::Leave, "lobby", &[]));
    let last = bob.group(group_request(A::Leave, "lobby", &[]));
    assert_eq!(
        last.member_count, 0,
        "the last member leaving dissolves the group"
    );
    assert_eq!(
        alice
            .try_group(group_request(A::JoinGroup, "lobby", &[]))
            .map_err(|e| e.code),
        Err(ErrorCode::NotFound as i32)
    );
}

#[test]
fn groups_work_over_websocket_json() {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect_ws_json("alice", "browser");
    let mut bob = broker.connect_ws_json("bob", "browser");
    let created = create(&mut alice, "team", &["bob"]);
    assert_eq!(created.member_count, 2);
    let m = bob.expect_delivery(&team, 1, TIMEOUT);
    assert_eq!(event_type(&m), Some(pb::GroupEventType::Created));
    alice.send_to(&team, "json hello");
    let m = bob.expect_delivery(&team, 2, TIMEOUT);
    assert_eq!(&m.body[..], b"json hello");
}

#[test]
fn member_lists_come_in_pages_and_the_member_limit_holds() {
    let broker = Broker::start(&["groups.max_members=5", "groups.max_members_page=2"]);
    let mut alice = broker.connect("alice", "phone");
    create(&mut alice, "team", &["u1", "u2", "u3"]);
    let first = alice.group(group_request(A::GetMembers, "team", &[]));
    assert_eq!(
        (first.members.clone(), first.more),
        (vec!["alice".into(), "u1".into()], true)
    );
    let next = alice.group(pb::GroupRequest {
        after_user: "u1".into(),
        ..group_request(A::GetMembers, "team", &[])
    });
    assert_eq!(
        (next.members, next.more),
        (vec!["u2".into(), "u3".into()], false)
    );
    assert_eq!(next.member_count, 4);
    assert_eq!(next.roster[0].joined_seq, 1);
    assert_eq!(
        alice
            .try_group(group_request(A::AddMembers, "team", &["u4", "u5"]))
            .map_err(|e| e.code),
        Err(ErrorCode::GroupFull as i32)
    );
    alice.group(group_request(A::AddMembers, "team", &["u4"]));
    assert_eq!(
        alice
            .try_group(group_request(A::Create, "big", &["a", "b", "c", "d", "e"]))
            .map_err(|e| e.code),
        Err(ErrorCode::GroupFull as i32)
    );
}

#[test]
fn a_group_of_100_000_members_works_and_pushes_only_to_those_online() {
    let broker = Broker::start(&["groups.max_members=100000"]);
    let big = group("big");
    let mut owner = broker.connect("owner", "phone");
    create(&mut owner, "big", &[]);
    let users: Vec<String> = (0..99_999).map(|i| format!("m{i:05}")).collect();
    for chunk in users.chunks(4000) {
        let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
        owner.group(group_request(A::AddMembers, "big", &names));
    }
    let info = owner.group(pb::GroupRequest {
        limit: 3,
        ..group_request(A::GetMembers, "big", &[])
    });
    assert_eq!(info.member_count, 100_000);
    assert_eq!(info.members, vec!["m00000", "m00001", "m00002"]);
    assert_eq!(
        owner
            .try_group(group_request(A::AddMembers, "big", &["one-too-many"]))
            .map_err(|e| e.code),
        Err(ErrorCode::GroupFull as i32)
    );
    let mut online: Vec<Client> = ["m00007", "m50000", "m99998"]
        .iter()
        .map(|u| {
            let mut c = broker.tcp();
            c.login(u, "phone");
            c
        })
        .collect();
    let ack = owner.send_to(&big, "to the hundred thousand");
    for member in &mut online {
        let m = member.expect_delivery(&big, ack.seq, TIMEOUT);
        assert_eq!(&m.body[..], b"to the hundred thousand");
    }
}

#[test]
fn memberships_survive_a_restart_and_a_kill_9_in_the_middle_of_changes() {
    let mut broker = Broker::start(&[]);
    let team = group("team");
    {
        let mut alice = broker.connect("alice", "phone");
        create(&mut alice, "team", &["bob", "carol"]);
        alice.send_to(&team, "one");
        alice.group(group_request(A::RemoveMembers, "team", &["carol"]));
        alice.group(group_request(A::AddMembers, "team", &["dave"]));
    }
    broker.restart();
    let mut alice = broker.connect("alice", "phone");
    let info = alice.group(group_request(A::GetMembers, "team", &[]));
    assert_eq!(
        info.members,
        vec!["alice", "bob", "dave"],
        "after a clean restart"
    );

    // Changes acked before a kill -9 hold after it; the rest may or may not have happened,
    // but seqs stay gapless and every member's view follows its events.
    let mut acked = Vec::new();
    for i in 0..40 {
        let user = format!("x{i}");
        let r = alice.group(group_request(A::AddMembers, "team", &[&user]));
        acked.push((user, r.seq));
        if i % 2 == 1 {
            alice.send_to(&team, numbered_body(i, 8));
        }
        if i % 3 == 2 {
            let gone = format!("x{}", i - 1);
            alice.group(group_request(A::RemoveMembers, "team", &[&gone]));
        }
    }
    // In flight when the broker dies.
    for i in 40..60 {
        let user = format!("x{i}");
        alice.request(pb::frame::Body::GroupRequest(group_request(
            A::AddMembers,
            "team",
            &[&user],
        )));
    }
    broker.kill9();
    broker.restart();

    let mut alice = broker.tcp();
    alice.login("alice", "laptop");
    let sync = alice.sync_with(Vec::new(), 0);
    let seqs = seqs_of(sync.messages(), &team);
    let last = *seqs.last().expect("the group has messages");
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "gapless after kill -9"
    );
    let info = alice.group(pb::GroupRequest {
        limit: 1000,
        ..group_request(A::GetMembers, "team", &[])
    });
    for (i, (user, seq)) in acked.iter().enumerate() {
        let removed = i % 3 == 1 && i + 1 < 40;
        let member = info.roster.iter().find(|m| &m.user == user);
        if removed {
            assert!(member.is_none(), "{user} was removed before the kill");
        } else {
            assert_eq!(
                member.map(|m| m.joined_seq),
                Some(*seq),
                "{user}'s acked join holds"
            );
        }
    }
    assert!(info.members.contains(&"bob".to_owned()));
    assert!(!info.members.contains(&"carol".to_owned()));

    // A member added before the kill sees from its join, a removed one up to its removal.
    let (user, seq) = &acked[0];
    let mut x0 = broker.tcp();
    x0.login(user, "phone");
    let sync = x0.sync_with(Vec::new(), 0);
    assert_eq!(seqs_of(sync.messages(), &team).first(), Some(seq));
    let mut carol = broker.tcp();
    carol.login("carol", "phone");
    let sync = carol.sync_with(Vec::new(), 0);
    assert_eq!(seqs_of(sync.messages(), &team), vec![1, 2, 3]);
}

#[test]
fn recalls_and_edits_reach_every_member_as_their_own_records_and_admins_may_recall_any() {
    let broker = Broker::start(&[]);
    let team = group("team");
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    let mut carol = broker.connect("carol", "phone");
    create(&mut alice, "team", &["bob", "carol"]);
    let original = bob.send_to(&team, "typo"); // seq 2
    let send = |c: &mut Client, kind: pb::MessageKind, ref_seq: u64, body: &str| {
        let id = parley_tests::client::fresh_client_msg_id();
        c.request(pb::frame::Body::Send(pb::Send {
            to: Some(team.clone()),
            client_msg_id: id,
            content_type: 1,
            body: body.as_bytes().to_vec().into(),
            kind: kind as i32,
            ref_seq,
        }));
        c.wait_send_ack(id, TIMEOUT)
    };
    let edit = send(&mut bob, pb::MessageKind::Edit, original.seq, "fixed");
    assert_eq!(edit.seq, 3, "an edit is a record of its own");
    for member in [&mut alice, &mut carol] {
        let m = member.expect_delivery(&team, 3, TIMEOUT);
        assert_eq!(
            (m.kind, m.ref_seq, &m.body[..]),
            (pb::MessageKind::Edit as i32, 2, &b"fixed"[..])
        );
    }
    // Carol (a member) may not recall bob's message; alice (the owner) may.
    let id = parley_tests::client::fresh_client_msg_id();
    carol.request(pb::frame::Body::Send(pb::Send {
        to: Some(team.clone()),
        client_msg_id: id,
        content_type: 1,
        body: Default::default(),
        kind: pb::MessageKind::Recall as i32,
        ref_seq: 2,
    }));
    assert_eq!(
        carol.expect_error(TIMEOUT).code,
        ErrorCode::Forbidden as i32
    );
    let recall = send(&mut alice, pb::MessageKind::Recall, 2, "");
    let m = bob.expect_delivery(&team, recall.seq, TIMEOUT);
    assert_eq!(
        (m.kind, m.ref_seq, m.from_user.as_str()),
        (pb::MessageKind::Recall as i32, 2, "alice")
    );
    carol.expect_delivery(&team, recall.seq, TIMEOUT);
    // The group's own events are neither recalled nor edited.
    let id = parley_tests::client::fresh_client_msg_id();
    alice.request(pb::frame::Body::Send(pb::Send {
        to: Some(team.clone()),
        client_msg_id: id,
        content_type: 1,
        body: Default::default(),
        kind: pb::MessageKind::Recall as i32,
        ref_seq: 1,
    }));
    assert_eq!(
        alice.expect_error(TIMEOUT).code,
        ErrorCode::Forbidden as i32
    );
}
