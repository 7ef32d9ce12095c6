//! The embedding API, as an application uses it: a node started in-process with `Broker`,
//! in-process clients next to socket clients, the handle's operations, and hooks (gates answered
//! now or later, observers).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parley_broker::auth::{Hs256, Identity};
use parley_broker::config::Config;
use parley_broker::hooks::{
    AuthVerdict, ConversationKind, ConversationRef, DeviceEvent, Gates, GroupAttempt, Hooks,
    LoginAttempt, Observes, OfflineDelivery, Reply, SendAttempt, SendVerdict, StoredMessage,
    Verdict,
};
use parley_broker::proto::pb;
use parley_broker::proto::pb::frame::Body;
use parley_broker::proto::tcp::FrameCodec;
use parley_broker::{Broker, Handle, LocalError};

const SECRET: &[u8] = b"embed-test-secret-of-32-bytes!!!";
const WAIT: Duration = Duration::from_secs(10);

fn config(dir: &tempfile::TempDir) -> Config {
    let mut c = Config {
        data_dir: dir.path().to_path_buf(),
        shards: 2,
        ..Config::default()
    };
    c.listen.tcp = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    c.listen.ws = None;
    c.admin.listen = None;
    c
}

fn start(dir: &tempfile::TempDir, hooks: Option<Arc<dyn Hooks>>) -> Handle {
    let mut b = Broker::new(config(dir)).secret(SECRET.to_vec());
    if let Some(h) = hooks {
        b = b.hooks(h);
    }
    b.start().expect("the node starts")
}

fn stop(h: Handle) {
    h.shutdown();
    h.join().expect("the node stops cleanly");
}

fn direct(user: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Direct as i32,
        id: user.into(),
    }
}

fn group(id: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Group as i32,
        id: id.into(),
    }
}

/// A plain socket client speaking the TCP framing.
struct Sock {
    stream: TcpStream,
    codec: FrameCodec,
    buf: BytesMut,
}

impl Sock {
    fn login(addr: SocketAddr, token: &str) -> (Sock, pb::Frame) {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut s = Sock {
            stream,
            codec: FrameCodec::default(),
            buf: BytesMut::new(),
        };
        s.send(&pb::Frame {
            request_id: 1,
            body: Some(Body::Login(pb::Login {
                protocol_version: parley_broker::proto::PROTOCOL_VERSION,
                token: token.into(),
                client_name: "embed-test".into(),
            })),
        });
        let answer = s.recv().expect("a login answer");
        (s, answer)
    }

    fn user(addr: SocketAddr, user: &str) -> Sock {
        let token = Hs256::new(SECRET).mint(user, "phone", now_secs() + 3600);
        let (s, answer) = Sock::login(addr, &token);
        assert!(
            matches!(answer.body, Some(Body::LoginResult(_))),
            "{answer:?}"
        );
        s
    }

    fn send(&mut self, f: &pb::Frame) {
        let mut out = BytesMut::new();
        self.codec.encode(f, &mut out).expect("encodes");
        self.stream.write_all(&out).expect("write");
    }

    /// The next frame within [`WAIT`] (`None`: the connection closed or nothing came).
    fn recv(&mut self) -> Option<pb::Frame> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(f)) = self.codec.decode_frame(&mut self.buf) {
                return Some(f);
            }
            if Instant::now() > deadline {
                return None;
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
        }
    }

    /// The next delivered message (acking it).
    fn next_message(&mut self) -> Option<pb::Message> {
        loop {
            let f = self.recv()?;
            if let Some(Body::Deliver(d)) = f.body {
                let m = d.messages.into_iter().next()?;
                self.send(&pb::Frame {
                    request_id: 0,
                    body: Some(Body::DeliverAck(pb::DeliverAck {
                        acks: vec![pb::AckCursor {
                            conversation: m.conversation.clone(),
                            seq: m.seq,
                        }],
                    })),
                });
                return Some(m);
            }
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The next message delivered to a local client (acking it).
fn local_message(c: &mut parley_broker::LocalClient) -> Option<pb::Message> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match c.recv(Duration::from_millis(100)) {
            Ok(Some(pb::Frame {
                body: Some(Body::Deliver(d)),
                ..
            })) => {
                c.ack(&d).expect("ack");
                return d.messages.into_iter().next();
            }
            Ok(_) => {}
            Err(e) => panic!("local client failed: {e}"),
        }
    }
    None
}

#[test]
fn a_local_client_and_a_socket_client_chat_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let mut alice = h.connect("alice", "app").expect("local login");
    assert_eq!(alice.login_result().user, "alice");
    let mut bob = Sock::user(h.tcp_addr().expect("tcp"), "bob");

    let ack = alice
        .send_message(direct("bob"), "hi bob", 1, false)
        .expect("stored");
    assert_eq!(ack.seq, 1);
    let m = bob.next_message().expect("bob receives");
    assert_eq!(
        (m.seq, &m.from_user[..], &m.body[..]),
        (1, "alice", &b"hi bob"[..])
    );

    bob.send(&pb::Frame {
        request_id: 7,
        body: Some(Body::Send(pb::Send {
            to: Some(direct("alice")),
            client_msg_id: 1,
            body: Bytes::from_static(b"hi alice"),
            ..Default::default()
        })),
    });
    let m = local_message(&mut alice).expect("alice receives in-process");
    assert_eq!(
        (m.seq, &m.from_user[..], &m.body[..]),
        (2, "bob", &b"hi alice"[..])
    );
    drop(alice);
    stop(h);
}

#[test]
fn a_retried_local_send_is_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let mut alice = h.connect("alice", "app").expect("local login");
    let a = alice
        .send_message(direct("bob"), "once", 42, false)
        .expect("stored");
    let b = alice
        .send_message(direct("bob"), "once", 42, false)
        .expect("acked again");
    assert_eq!((a.seq, a.msg_id), (b.seq, b.msg_id));
    let c = alice
        .send_message(direct("bob"), "twice", 43, false)
        .expect("stored");
    assert_eq!(c.seq, a.seq + 1);
    drop(alice);
    stop(h);
}

#[test]
fn post_stores_a_system_message_that_socket_clients_receive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let mut bob = Sock::user(h.tcp_addr().expect("tcp"), "bob");
    let ack = h
        .post("alice", direct("bob"), "your order shipped", true)
        .expect("posted");
    let m = bob.next_message().expect("bob receives");
    assert_eq!(m.seq, ack.seq);
    assert_eq!(m.kind, pb::MessageKind::System as i32);
    assert_eq!(&m.body[..], b"your order shipped");
    stop(h);
}

#[test]
fn socket_clients_may_not_send_system_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let mut bob = Sock::user(h.tcp_addr().expect("tcp"), "bob");
    bob.send(&pb::Frame {
        request_id: 3,
        body: Some(Body::Send(pb::Send {
            to: Some(direct("alice")),
            client_msg_id: 1,
            body: Bytes::from_static(b"fake notice"),
            kind: pb::MessageKind::System as i32,
            ..Default::default()
        })),
    });
    let f = bob.recv().expect("an answer");
    assert!(
        matches!(&f.body, Some(Body::Error(e)) if e.code == pb::ErrorCode::InvalidArgument as i32),
        "{f:?}"
    );
    stop(h);
}

#[test]
fn kick_ends_a_users_sessions_with_kicked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let mut bob = Sock::user(h.tcp_addr().expect("tcp"), "bob");
    let mut local = h.connect("bob", "desk").expect("local login");
    assert_eq!(
        h.kick("bob", Some("phone"), "banned for a day")
            .expect("kick"),
        1
    );
    let f = bob.recv().expect("bob is told");
    match f.body {
        Some(Body::Error(e)) => {
            assert_eq!(e.code, pb::ErrorCode::Kicked as i32);
            assert!(e.message.contains("banned for a day"), "{}", e.message);
            assert!(e.fatal);
        }
        other => panic!("expected KICKED, got {other:?}"),
    }
    assert!(bob.recv().is_none(), "then the connection closes");
    // The desk device is still on; kicking the user ends it too.
    assert_eq!(h.kick("bob", None, "gone").expect("kick"), 1);
    let e = loop {
        match local.recv(WAIT) {
            Ok(Some(_)) => {}
            Ok(None) => panic!("no close"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&e, LocalError::Closed(Some(err)) if err.code == pb::ErrorCode::Kicked as i32),
        "{e:?}"
    );
    stop(h);
}

#[test]
fn online_lists_users_with_a_device_connected_and_service_connections_do_not_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let addr = h.tcp_addr().expect("tcp");
    let _carol = Sock::user(addr, "carol");
    let _alice = Sock::user(addr, "alice");
    let _bob_local = h.connect("bob", "desk").expect("local");
    let _service = h.act_as("dave").expect("service");
    let online = h.online("", 100).expect("online");
    assert_eq!(
        online,
        vec![
            ("alice".to_string(), vec!["phone".to_string()]),
            ("bob".to_string(), vec!["desk".to_string()]),
            ("carol".to_string(), vec!["phone".to_string()]),
        ]
    );
    assert_eq!(h.online("alice", 1).expect("page").len(), 1);
    assert_eq!(h.online("alice", 1).expect("page")[0].0, "bob");
    stop(h);
}

#[test]
fn groups_made_through_the_handle_can_be_inspected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let r = h
        .group(
            "olga",
            pb::GroupRequest {
                action: pb::GroupAction::Create as i32,
                group_id: "team".into(),
                members: vec!["pete".into(), "quinn".into()],
                name: "The team".into(),
                ..Default::default()
            },
        )
        .expect("created");
    assert!(r.seq > 0);
    h.post("pete", group("team"), "hello team", false)
        .expect("a member posts");
    let info = h
        .inspect(&ConversationRef {
            kind: ConversationKind::Group,
            id: "team".into(),
            users: Vec::new(),
        })
        .expect("answered")
        .expect("exists");
    assert_eq!(info.last_seq, r.seq + 1);
    let g = info.group.expect("a group");
    assert_eq!(g.name, "The team");
    assert_eq!(g.member_count, 3);
    let roles: Vec<(&str, &str)> = g.members.iter().map(|m| (&m.user[..], m.role)).collect();
    assert_eq!(
        roles,
        vec![("olga", "owner"), ("pete", "member"), ("quinn", "member")]
    );
    let none = h
        .inspect(&ConversationRef {
            kind: ConversationKind::Direct,
            id: String::new(),
            users: vec!["x".into(), "y".into()],
        })
        .expect("answered");
    assert_eq!(none, None);
    stop(h);
}

#[test]
fn the_conversation_list_and_presence_are_served_to_the_application() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let _bob = Sock::user(h.tcp_addr().expect("tcp"), "bob");
    h.post("alice", direct("bob"), "one", false)
        .expect("posted");
    h.post("alice", direct("carol"), "two", false)
        .expect("posted");
    let list = h.conversations("alice", 10).expect("list");
    assert_eq!(list.conversations.len(), 2);
    let p = h
        .presence(&["bob".to_string(), "carol".to_string()])
        .expect("presence");
    let online: Vec<(&str, bool)> = p
        .iter()
        .map(|u| (&u.user[..], u.status == pb::PresenceStatus::Online as i32))
        .collect();
    assert!(online.contains(&("bob", true)), "{p:?}");
    assert!(online.contains(&("carol", false)), "{p:?}");
    stop(h);
}

// ----- hooks -------------------------------------------------------------------------------------

/// Gates sends: denies bodies with "spam", rewrites "darn" to "d*rn", and keeps the replies of
/// sends whose body starts with "slow" until the test answers them (as a hook waiting on I/O
/// would).
#[derive(Default)]
struct Moderator {
    held: Mutex<Vec<Reply<SendVerdict>>>,
    stored: Mutex<Vec<StoredMessage>>,
    offline: Mutex<Vec<OfflineDelivery>>,
    connected: Mutex<Vec<DeviceEvent>>,
}

impl Hooks for Moderator {
    fn gates(&self) -> Gates {
        Gates {
            send: true,
            group: true,
            ..Gates::default()
        }
    }
    fn observes(&self) -> Observes {
        Observes {
            stored: true,
            offline: true,
        }
    }
    fn check_send(&self, send: &SendAttempt<'_>, reply: Reply<SendVerdict>) {
        let body = String::from_utf8_lossy(send.body).into_owned();
        if body.contains("spam") {
            reply.send(SendVerdict::Deny("no spam here".into()));
        } else if body.starts_with("slow") {
            if let Ok(mut held) = self.held.lock() {
                held.push(reply);
            }
        } else if body.contains("darn") {
            reply.send(SendVerdict::Rewrite(Bytes::from(
                body.replace("darn", "d*rn"),
            )));
        } else {
            reply.send(SendVerdict::Allow);
        }
    }
    fn check_group(&self, request: &GroupAttempt<'_>, reply: Reply<Verdict>) {
        if request.action == "join_group" && request.user == "mallory" {
            reply.send(Verdict::Deny("mallory may not join".into()));
        } else {
            reply.send(Verdict::Allow);
        }
    }
    fn message_stored(&self, message: &StoredMessage) {
        if let Ok(mut s) = self.stored.lock() {
            s.push(message.clone());
        }
    }
    fn stored_for_offline(&self, delivery: &OfflineDelivery) {
        if let Ok(mut s) = self.offline.lock() {
            s.push(delivery.clone());
        }
    }
    fn connected(&self, device: &DeviceEvent) {
        if let Ok(mut s) = self.connected.lock() {
            s.push(device.clone());
        }
    }
}

fn send_frame(request_id: u64, to: &str, cmid: u64, body: &'static str) -> pb::Frame {
    pb::Frame {
        request_id,
        body: Some(Body::Send(pb::Send {
            to: Some(direct(to)),
            client_msg_id: cmid,
            body: Bytes::from_static(body.as_bytes()),
            ..Default::default()
        })),
    }
}

#[test]
fn a_send_gate_denies_and_rewrites_before_anything_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(Moderator::default());
    let h = start(&dir, Some(hooks.clone()));
    let addr = h.tcp_addr().expect("tcp");
    let mut alice = Sock::user(addr, "alice");
    let mut bob = Sock::user(addr, "bob");
    alice.send(&send_frame(1, "bob", 1, "buy spam"));
    let f = alice.recv().expect("answer");
    assert!(
        matches!(&f.body, Some(Body::Error(e)) if e.code == pb::ErrorCode::Forbidden as i32 && e.message.contains("no spam here")),
        "{f:?}"
    );
    alice.send(&send_frame(2, "bob", 2, "darn it"));
    let f = alice.recv().expect("answer");
    let Some(Body::SendAck(ack)) = f.body else {
        panic!("{f:?}")
    };
    assert_eq!(ack.seq, 1, "the denied send took no seq");
    let m = bob.next_message().expect("delivered");
    assert_eq!(&m.body[..], b"d*rn it");
    stop(h);
}

#[test]
fn a_gate_answering_later_parks_only_its_connection_and_keeps_its_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(Moderator::default());
    let h = start(&dir, Some(hooks.clone()));
    let addr = h.tcp_addr().expect("tcp");
    let mut alice = Sock::user(addr, "alice");
    let mut carol = Sock::user(addr, "carol");
    // Alice's first send waits for the hook; her second is pipelined behind it.
    alice.send(&send_frame(1, "bob", 1, "slow one"));
    alice.send(&send_frame(2, "bob", 2, "fast two"));
    // Carol is served while alice's send is parked (its reply is still held).
    carol.send(&send_frame(1, "dave", 1, "not waiting"));
    let f = carol.recv().expect("carol's ack");
    assert!(matches!(f.body, Some(Body::SendAck(_))), "{f:?}");
    let held = hooks
        .held
        .lock()
        .map(|mut h| h.drain(..).collect::<Vec<_>>());
    let held = held.expect("lock");
    assert_eq!(held.len(), 1, "alice's first send is parked");
    alice
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut chunk = [0u8; 64];
    assert!(
        alice.stream.read(&mut chunk).is_err(),
        "nothing is answered to alice while her first send is parked"
    );
    for reply in held {
        reply.send(SendVerdict::Allow);
    }
    let first = alice.recv().expect("ack 1");
    let second = alice.recv().expect("ack 2");
    let seqs: Vec<(u64, u64)> = [first, second]
        .iter()
        .map(|f| match &f.body {
            Some(Body::SendAck(a)) => (f.request_id, a.seq),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![(1, 1), (2, 2)], "in the order sent");
    stop(h);
}

#[test]
fn a_group_gate_can_refuse_a_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(Moderator::default());
    let h = start(&dir, Some(hooks));
    h.group(
        "olga",
        pb::GroupRequest {
            action: pb::GroupAction::Create as i32,
            group_id: "open".into(),
            open: true,
            ..Default::default()
        },
    )
    .expect("created");
    let addr = h.tcp_addr().expect("tcp");
    for (user, allowed) in [("mallory", false), ("nina", true)] {
        let mut s = Sock::user(addr, user);
        s.send(&pb::Frame {
            request_id: 5,
            body: Some(Body::GroupRequest(pb::GroupRequest {
                action: pb::GroupAction::JoinGroup as i32,
                group_id: "open".into(),
                ..Default::default()
            })),
        });
        let f = s.recv().expect("answer");
        match (&f.body, allowed) {
            (Some(Body::GroupResult(_)), true) => {}
            (Some(Body::Error(e)), false) => assert_eq!(e.code, pb::ErrorCode::Forbidden as i32),
            _ => panic!("{user}: {f:?}"),
        }
    }
    stop(h);
}

#[test]
fn observers_hear_stored_messages_in_order_offline_recipients_and_logins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = Arc::new(Moderator::default());
    let h = start(&dir, Some(hooks.clone()));
    let addr = h.tcp_addr().expect("tcp");
    let mut alice = Sock::user(addr, "alice");
    for i in 1..=5u64 {
        alice.send(&send_frame(i, "bob", i, "hello"));
        assert!(matches!(
            alice.recv().expect("ack").body,
            Some(Body::SendAck(_))
        ));
    }
    let stored = hooks.stored.lock().map(|s| s.clone()).unwrap_or_default();
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert!(stored.iter().all(|m| m.sender == "alice"
        && m.conversation.users == ["alice", "bob"]
        && &m.body[..] == b"hello"
        && !m.system));
    let offline = hooks.offline.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(offline.len(), 5, "bob was offline for each");
    assert!(offline.iter().all(|d| d.users == ["bob"]));
    // Bob comes online: the next message is not offline for him.
    let mut bob = Sock::user(addr, "bob");
    alice.send(&send_frame(9, "bob", 9, "online now"));
    assert!(bob.next_message().is_some());
    let offline = hooks.offline.lock().map(|s| s.len()).unwrap_or_default();
    assert_eq!(offline, 5);
    let connected = hooks
        .connected
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    assert_eq!(
        connected,
        vec![
            DeviceEvent {
                user: "alice".into(),
                device: "phone".into()
            },
            DeviceEvent {
                user: "bob".into(),
                device: "phone".into()
            }
        ]
    );
    stop(h);
}

/// Logs users in from the application's own table of opaque session tokens.
struct SessionTable;

impl Hooks for SessionTable {
    fn gates(&self) -> Gates {
        Gates {
            authenticate: true,
            ..Gates::default()
        }
    }
    fn authenticate(&self, login: &LoginAttempt<'_>, reply: Reply<AuthVerdict>) {
        let verdict = match login.token {
            "sess-1" => AuthVerdict::Accept(Identity {
                user: "ursula".into(),
                device: "web".into(),
                expires_at: 0,
            }),
            t if t.starts_with("eyJ") => AuthVerdict::Builtin,
            _ => AuthVerdict::Reject("unknown session".into()),
        };
        // Answered later, from another thread, as a lookup over the network would.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            reply.send(verdict);
        });
    }
}

#[test]
fn a_login_gate_accepts_the_applications_own_tokens_and_can_defer_to_the_builtin_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, Some(Arc::new(SessionTable)));
    let addr = h.tcp_addr().expect("tcp");
    let (_s, f) = Sock::login(addr, "sess-1");
    match f.body {
        Some(Body::LoginResult(r)) => assert_eq!((&r.user[..], &r.device[..]), ("ursula", "web")),
        other => panic!("{other:?}"),
    }
    let (_s, f) = Sock::login(addr, "sess-2");
    assert!(
        matches!(&f.body, Some(Body::Error(e)) if e.code == pb::ErrorCode::BadToken as i32 && e.message.contains("unknown session")),
        "{f:?}"
    );
    let jwt = Hs256::new(SECRET).mint("victor", "phone", now_secs() + 60);
    let (_s, f) = Sock::login(addr, &jwt);
    assert!(matches!(f.body, Some(Body::LoginResult(r)) if r.user == "victor"));
    stop(h);
}

#[test]
fn shutdown_closes_local_clients_with_shutting_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start(&dir, None);
    let mut alice = h.connect("alice", "app").expect("local login");
    alice
        .send_message(direct("bob"), "before", 1, false)
        .expect("stored");
    h.shutdown();
    let e = loop {
        match alice.recv(WAIT) {
            Ok(Some(_)) => {}
            Ok(None) => panic!("not closed"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&e, LocalError::Closed(Some(err)) if err.code == pb::ErrorCode::ShuttingDown as i32),
        "{e:?}"
    );
    h.join().expect("stops");
    // What was stored is there after a restart.
    let h = start(&dir, None);
    let info = h
        .inspect(&ConversationRef {
            kind: ConversationKind::Direct,
            id: String::new(),
            users: vec!["alice".into(), "bob".into()],
        })
        .expect("answered")
        .expect("exists");
    assert_eq!(info.last_seq, 1);
    stop(h);
}
