//! UDP (promise 7, security): what only the datagram transport has to keep, checked through
//! the real binary with the envelope of `parley_proto::udp` and plain `std` sockets.
//!
//! * No amplification: an unpadded LOGIN gets no answer; a LOGIN without a (good) cookie gets
//!   only an 18-byte RETRY and the node keeps nothing; a wrong, foreign or expired cookie gets a
//!   fresh RETRY; every LOGIN_REPLY, a refusal included, is no larger than its LOGIN.
//! * No hijacking: a datagram that does not authenticate is dropped, and the session goes on
//!   at its own address; a replayed datagram is not acted on twice; a session follows its
//!   client to a new address only on an authenticated, newest datagram, so a late one from
//!   elsewhere does not redirect it.
//!
//! The promises every transport keeps (login, order, sync, limits...) are in `transports.rs`.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parley_proto::frame;
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_proto::udp::{
    self, DatagramType, Direction, HEADER_LEN, MIN_LOGIN_DATAGRAM_BYTES, RETRY_LEN,
    SESSION_KEY_LEN, SessionKey,
};
use parley_tests::client::{code_name, fresh_client_msg_id};
use parley_tests::transport::{bind_udp_for, random_u64, recv_datagram};
use parley_tests::{Broker, ErrorCode, PROTOCOL_VERSION, TIMEOUT, UdpClient, direct, http, token};
use prometheus_parse::{Scrape, Value};

/// How long a test listens to make sure that nothing comes.
const SILENCE: Duration = Duration::from_millis(300);

/// The admin token the tests configure (to read `/metrics`).
const ADMIN_TOKEN: &str = "udp-test-admin-token-0123456789";

/// A broker with a UDP listener and an admin token, plus `extra` settings.
fn udp_broker(extra: &[&str]) -> Broker {
    let admin = format!("admin.token=\"{ADMIN_TOKEN}\"");
    let mut settings = vec!["listen.udp=\"127.0.0.1:0\"", admin.as_str()];
    settings.extend_from_slice(extra);
    Broker::start(&settings)
}

/// A fresh socket on loopback, to talk to `broker`'s UDP listener by hand.
fn socket(broker: &Broker) -> UdpSocket {
    bind_udp_for(broker.udp_addr()).expect("bind a UDP socket")
}

/// The `Login` frame carrying `token`.
fn login_frame(token: String) -> pb::Frame {
    pb::Frame {
        request_id: 1,
        body: Some(Body::Login(pb::Login {
            protocol_version: PROTOCOL_VERSION,
            token,
            client_name: "parley-tests-udp".into(),
        })),
    }
}

/// A LOGIN datagram of 1200 bytes: `login` with `cookie` and `nonce`.
fn login_datagram(cookie: u64, nonce: u64, login: &pb::Frame) -> Bytes {
    let mut out = BytesMut::new();
    udp::seal_login(cookie, nonce, login, MIN_LOGIN_DATAGRAM_BYTES, &mut out).expect("seal");
    out.freeze()
}

/// A ping frame with `nonce`.
fn ping(nonce: u64) -> pb::Frame {
    pb::Frame {
        request_id: nonce,
        body: Some(Body::Ping(pb::Ping { nonce })),
    }
}

/// Sends `datagram` to the broker's UDP listener from `socket`.
fn send(socket: &UdpSocket, broker: &Broker, datagram: &[u8]) {
    let sent = socket
        .send_to(datagram, broker.udp_addr())
        .expect("send a datagram");
    assert_eq!(sent, datagram.len());
}

/// The next datagram `socket` receives from the broker; panics after `timeout`.
fn expect_datagram(socket: &UdpSocket, broker: &Broker, what: &str) -> Bytes {
    let (datagram, from) = recv_datagram(socket, Instant::now() + TIMEOUT)
        .expect("receive")
        .unwrap_or_else(|| panic!("no answer within {TIMEOUT:?}: expected {what}"));
    assert_eq!(
        from,
        broker.udp_addr(),
        "{what} comes from the UDP listener's address"
    );
    datagram
}

/// Panics if `socket` receives anything during [`SILENCE`], saying `why` nothing may come.
fn expect_silence(socket: &UdpSocket, why: &str) {
    if let Some((datagram, from)) =
        recv_datagram(socket, Instant::now() + SILENCE).expect("receive")
    {
        panic!(
            "{why}; got a datagram of {} bytes from {from} ({:?})",
            datagram.len(),
            udp::peek_header(&datagram)
        );
    }
}

/// Sends a first LOGIN (cookie 0) with `nonce` from `socket` and returns the RETRY's cookie,
/// checking that the RETRY is all that came and that it is 18 bytes.
fn retry_cookie(socket: &UdpSocket, broker: &Broker, nonce: u64, login: &pb::Frame) -> u64 {
    send(socket, broker, &login_datagram(0, nonce, login));
    expect_retry(socket, broker, nonce, "a LOGIN without a cookie")
}

/// Waits for a RETRY answering the LOGIN with `nonce` and returns its cookie; `after` names
/// what was sent, for messages.
fn expect_retry(socket: &UdpSocket, broker: &Broker, nonce: u64, after: &str) -> u64 {
    let answer = expect_datagram(socket, broker, &format!("a RETRY for {after}"));
    assert_eq!(
        answer.len(),
        RETRY_LEN,
        "{after} is answered by an 18-byte RETRY only, got {} bytes ({:?})",
        answer.len(),
        udp::peek_header(&answer)
    );
    let cookie = udp::open_retry(&answer, nonce)
        .unwrap_or_else(|e| panic!("{after}: the answer is not a RETRY for its nonce: {e}"));
    assert_ne!(cookie, 0, "a RETRY carries a cookie");
    cookie
}

/// Scrapes `/metrics` and returns the sum of every series named `metric`.
fn metric(broker: &Broker, metric: &str) -> f64 {
    let answer = http::get(broker.admin_addr(), "/metrics", Some(ADMIN_TOKEN));
    assert_eq!(answer.status, 200, "{}", answer.body);
    let scrape = Scrape::parse(answer.body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}"));
    let values: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{metric} is not a single value: {:?}", s.value),
        })
        .collect();
    assert!(!values.is_empty(), "no {metric} in /metrics");
    values.iter().sum()
}

/// Scrapes `/metrics` until `done` holds for `metric` (the shards publish about every 100 ms)
/// and returns its value; panics after [`TIMEOUT`].
fn await_metric(broker: &Broker, name: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let v = metric(broker, name);
        if done(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sessions the node holds once its RETRY counter has reached `retries` (so the gauge is
/// from after the LOGINs sent so far).
fn sessions_after_retries(broker: &Broker, retries: f64) -> f64 {
    await_metric(broker, "parley_udp_retries_total", |v| v >= retries);
    metric(broker, "parley_udp_sessions")
}

/// Panics unless a CLIENT_DATA sealed under a made-up key for each id in `ids` gets nothing
/// back on `socket` (no session answers to them).
fn client_data_gets_nothing(socket: &UdpSocket, broker: &Broker, ids: &[u64]) {
    let key = SessionKey::new(&[0x33; SESSION_KEY_LEN]);
    for (i, &id) in ids.iter().enumerate() {
        let mut out = BytesMut::new();
        udp::seal(
            &key,
            Direction::ClientToServer,
            id,
            i as u64 + 1,
            &[ping(7)],
            udp::DEFAULT_MAX_DATAGRAM_BYTES,
            &mut out,
        )
        .expect("seal");
        send(socket, broker, &out);
    }
    expect_silence(
        socket,
        "a CLIENT_DATA for a session that does not exist (or under another key) gets no answer",
    );
}

/// Session ids as the node might make them (shard 1 or 2, low generations, low slots): a
/// guesser's first tries.
fn guessable_ids() -> Vec<u64> {
    let mut ids = Vec::new();
    for shard in 1..=2u64 {
        for generation in 0..=1u64 {
            for slot in 0..4u64 {
                ids.push(shard << 48 | generation << 32 | slot);
            }
        }
    }
    ids
}

// ---------------------------------------------------------------------------------------------
// No amplification
// ---------------------------------------------------------------------------------------------

#[test]
fn an_unpadded_login_gets_no_answer() {
    let broker = udp_broker(&[]);
    let socket = socket(&broker);
    let login = login_frame(broker.token("alice", "phone"));
    let nonce = random_u64();
    // The LOGIN cut after its frame: no padding up to 1200 bytes.
    let padded = login_datagram(0, nonce, &login);
    let unpadded_len = HEADER_LEN + 2 + frame::encoded_len(&login);
    assert!(unpadded_len < 600, "the login frame is small");
    let unpadded = &padded[..unpadded_len];
    send(&socket, &broker, unpadded);
    expect_silence(
        &socket,
        "an unpadded LOGIN is never answered (it could amplify)",
    );

    // Not even with a good cookie.
    let cookie = retry_cookie(&socket, &broker, nonce, &login);
    let padded = login_datagram(cookie, nonce, &login);
    send(&socket, &broker, &padded[..unpadded_len]);
    expect_silence(
        &socket,
        "an unpadded LOGIN with a good cookie is not answered either",
    );
    assert_eq!(
        sessions_after_retries(&broker, 1.0),
        0.0,
        "no session for an unpadded LOGIN"
    );

    // The same LOGIN padded is served: the silence was the padding's doing.
    send(&socket, &broker, &padded);
    let reply = expect_datagram(&socket, &broker, "a LOGIN_REPLY");
    let opened = udp::open_login_reply(&reply, nonce).expect("a LOGIN_REPLY for the nonce");
    assert_ne!(opened.header.session_id, 0, "the padded LOGIN is logged in");
}

#[test]
fn a_login_without_a_cookie_gets_only_an_18_byte_retry_and_the_node_keeps_nothing() {
    let broker = udp_broker(&[]);
    let socket = socket(&broker);
    let login = login_frame(broker.token("alice", "phone"));
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let cookie = retry_cookie(&socket, &broker, random_u64(), &login);
        expect_silence(
            &socket,
            "a RETRY is the only answer to a LOGIN without a cookie",
        );
        cookies.push(cookie);
    }
    assert_eq!(
        sessions_after_retries(&broker, 3.0),
        0.0,
        "the node keeps no session for a LOGIN without a cookie"
    );
    // Nor anything that answers to the cookies, or to the ids a session would get.
    let mut ids = cookies.clone();
    ids.extend(guessable_ids());
    client_data_gets_nothing(&socket, &broker, &ids);
    assert_eq!(metric(&broker, "parley_udp_sessions"), 0.0);
}

#[test]
fn a_wrong_foreign_or_expired_cookie_gets_a_fresh_retry_and_no_session() {
    const LIFETIME_MS: u64 = 200;
    let broker = udp_broker(&[&format!("udp.cookie_lifetime_ms={LIFETIME_MS}")]);
    let socket = socket(&broker);
    let login = login_frame(broker.token("alice", "phone"));
    let nonce = random_u64();
    let cookie = retry_cookie(&socket, &broker, nonce, &login);

    // A wrong cookie.
    send(
        &socket,
        &broker,
        &login_datagram(cookie ^ 0x80, nonce, &login),
    );
    expect_retry(&socket, &broker, nonce, "a LOGIN with a wrong cookie");
    // A good cookie with another nonce: cookies are bound to the nonce.
    let other_nonce = nonce.wrapping_add(1);
    send(
        &socket,
        &broker,
        &login_datagram(cookie, other_nonce, &login),
    );
    expect_retry(
        &socket,
        &broker,
        other_nonce,
        "a LOGIN with another nonce's cookie",
    );
    // The cookie from another address: cookies are bound to the address.
    let elsewhere = bind_udp_for(broker.udp_addr()).expect("bind");
    send(&elsewhere, &broker, &login_datagram(cookie, nonce, &login));
    expect_retry(
        &elsewhere,
        &broker,
        nonce,
        "a LOGIN with another address's cookie",
    );

    // An expired cookie: a cookie lives one to two lifetimes.
    std::thread::sleep(Duration::from_millis(2 * LIFETIME_MS + 100));
    send(&socket, &broker, &login_datagram(cookie, nonce, &login));
    let fresh = expect_retry(&socket, &broker, nonce, "a LOGIN with an expired cookie");
    assert_ne!(
        fresh, cookie,
        "the RETRY for an expired cookie carries a new one"
    );
    assert_eq!(
        sessions_after_retries(&broker, 5.0),
        0.0,
        "no session for a LOGIN without a good cookie"
    );

    // The fresh cookie logs in, with a reply no larger than the LOGIN.
    let datagram = login_datagram(fresh, nonce, &login);
    send(&socket, &broker, &datagram);
    let reply = expect_datagram(&socket, &broker, "a LOGIN_REPLY");
    assert!(
        reply.len() <= datagram.len(),
        "a LOGIN_REPLY of {} bytes answers a LOGIN of {}",
        reply.len(),
        datagram.len()
    );
    let opened = udp::open_login_reply(&reply, nonce).expect("a LOGIN_REPLY for the nonce");
    let frame = frame::decode(Bytes::copy_from_slice(opened.frame)).expect("a frame");
    let Some(Body::LoginResult(result)) = frame.body else {
        panic!("a good token and cookie log in, got {frame:?}");
    };
    assert_eq!(opened.header.session_id, result.udp_session_id);
    assert_ne!(result.udp_session_id, 0);
    assert_eq!(result.udp_session_key.len(), SESSION_KEY_LEN);
    await_metric(&broker, "parley_udp_sessions", |v| v == 1.0);
}

#[test]
fn a_login_sent_again_gets_the_same_reply_and_no_second_session() {
    let broker = udp_broker(&[]);
    let socket = socket(&broker);
    let login = login_frame(broker.token("alice", "phone"));
    let nonce = random_u64();
    let cookie = retry_cookie(&socket, &broker, nonce, &login);
    let datagram = login_datagram(cookie, nonce, &login);
    send(&socket, &broker, &datagram);
    let first = expect_datagram(&socket, &broker, "a LOGIN_REPLY");
    // Its reply lost, the client sends the LOGIN again.
    send(&socket, &broker, &datagram);
    let again = expect_datagram(&socket, &broker, "the LOGIN_REPLY again");
    assert_eq!(
        again, first,
        "a LOGIN sent again gets the same reply (the same session and key)"
    );
    assert_eq!(
        await_metric(&broker, "parley_udp_sessions", |v| v >= 1.0),
        1.0,
        "one session for one login"
    );
}

#[test]
fn a_refused_login_gets_an_error_in_a_login_reply_no_larger_than_the_login() {
    let broker = udp_broker(&[]);
    let socket = socket(&broker);
    let forged = token::mint_valid(b"not the broker's secret", "alice", "phone");
    let login = login_frame(forged);
    let nonce = random_u64();
    let cookie = retry_cookie(&socket, &broker, nonce, &login);
    let datagram = login_datagram(cookie, nonce, &login);
    send(&socket, &broker, &datagram);
    let reply = expect_datagram(&socket, &broker, "a LOGIN_REPLY refusing the login");
    assert!(
        reply.len() <= datagram.len(),
        "a refusal of {} bytes answers a LOGIN of {}",
        reply.len(),
        datagram.len()
    );
    let opened = udp::open_login_reply(&reply, nonce).unwrap_or_else(|e| {
        panic!(
            "the answer is a LOGIN_REPLY for the nonce: {e} ({:?})",
            udp::peek_header(&reply)
        )
    });
    assert_eq!(
        opened.header.session_id, 0,
        "a refused login has no session"
    );
    let frame = frame::decode(Bytes::copy_from_slice(opened.frame)).expect("a frame");
    let Some(Body::Error(error)) = frame.body else {
        panic!("a forged token is refused with an Error, got {frame:?}");
    };
    assert_eq!(
        error.code,
        ErrorCode::BadToken as i32,
        "got {} ({:?})",
        code_name(error.code),
        error.message
    );
    assert!(error.fatal && !error.message.is_empty());
    expect_silence(&socket, "nothing follows a refusal");
    assert_eq!(sessions_after_retries(&broker, 1.0), 0.0);
}

#[test]
fn the_test_client_logs_in_with_login_retry_login_and_its_session_works() {
    let broker = udp_broker(&[]);
    let mut bob: UdpClient = broker.udp();
    let result = bob.login("bob", "phone");
    assert_eq!(
        bob.transport().login_datagrams(),
        (2, 1),
        "one LOGIN, one RETRY, the LOGIN again with its cookie"
    );
    assert_eq!(bob.transport().session_id(), Some(result.udp_session_id));
    assert_eq!(result.udp_session_key.len(), SESSION_KEY_LEN);
    bob.sync();
    bob.ping();
}

// ---------------------------------------------------------------------------------------------
// No hijacking
// ---------------------------------------------------------------------------------------------

#[test]
fn a_spoofed_datagram_for_a_live_session_is_dropped_and_the_session_goes_on() {
    let broker = udp_broker(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob: UdpClient = broker.connect_udp("bob", "phone");
    let id = bob.transport().session_id().expect("logged in");
    let spoofer = socket(&broker);
    // The newest packet numbers, the session's id, a Ping: all but the key.
    let mut out = BytesMut::new();
    let newest = bob.transport().next_packet_number() + 100;
    udp::seal(
        &SessionKey::new(&[0x77; SESSION_KEY_LEN]),
        Direction::ClientToServer,
        id,
        newest,
        &[ping(1)],
        udp::DEFAULT_MAX_DATAGRAM_BYTES,
        &mut out,
    )
    .expect("seal");
    send(&spoofer, &broker, &out);
    // And a datagram of bob's with one bit of its frame flipped.
    let mut tampered = bob
        .transport_mut()
        .seal_frames(&[ping(2)])
        .expect("seal")
        .to_vec();
    tampered[HEADER_LEN + 1] ^= 0x01;
    send(&spoofer, &broker, &tampered);
    expect_silence(
        &spoofer,
        "a datagram that does not authenticate gets no answer",
    );
    let answers = bob.receive_for(SILENCE);
    assert!(
        !answers
            .iter()
            .any(|f| matches!(f.body, Some(Body::Pong(_)))),
        "the spoofed pings were not acted on: {answers:?}"
    );

    // The session stays at bob's address.
    let ack = alice.send("bob", "still yours");
    bob.expect_delivery(&direct("alice"), ack.seq, TIMEOUT);
    expect_silence(&spoofer, "the spoofed datagrams did not move the session");
    bob.ping();
    await_metric(&broker, "parley_udp_datagrams_dropped_total", |v| v >= 2.0);
    assert_eq!(metric(&broker, "parley_udp_migrations_total"), 0.0);
}

#[test]
fn a_replayed_datagram_is_not_acted_on_twice() {
    let broker = udp_broker(&[]);
    let mut bob: UdpClient = broker.connect_udp("bob", "phone");

    // A Ping, answered once.
    let nonce = fresh_client_msg_id();
    let captured = bob
        .transport_mut()
        .seal_frames(&[ping(nonce)])
        .expect("seal");
    bob.write_raw(&captured);
    bob.recv_until(
        TIMEOUT,
        |f| matches!(&f.body, Some(Body::Pong(p)) if p.nonce == nonce),
    );
    // Replayed from bob's address and from another one.
    let elsewhere = socket(&broker);
    bob.write_raw(&captured);
    send(&elsewhere, &broker, &captured);
    let pongs = bob
        .receive_for(SILENCE)
        .into_iter()
        .filter(|f| matches!(&f.body, Some(Body::Pong(p)) if p.nonce == nonce))
        .count();
    assert_eq!(pongs, 0, "a replayed Ping is not answered again");
    expect_silence(&elsewhere, "a replay from another address gets nothing");

    // A Send with a new client_msg_id, stored once.
    let send_frame = pb::Frame {
        request_id: 99,
        body: Some(Body::Send(pb::Send {
            to: Some(direct("alice")),
            client_msg_id: fresh_client_msg_id(),
            content_type: 1,
            body: Bytes::from_static(b"once"),
            kind: pb::MessageKind::Normal as i32,
            ref_seq: 0,
        })),
    };
    let captured = bob
        .transport_mut()
        .seal_frames(&[send_frame])
        .expect("seal");
    bob.write_raw(&captured);
    bob.recv_until(TIMEOUT, |f| matches!(f.body, Some(Body::SendAck(_))));
    bob.write_raw(&captured);
    send(&elsewhere, &broker, &captured);
    let acks = bob
        .receive_for(SILENCE)
        .into_iter()
        .filter(|f| matches!(f.body, Some(Body::SendAck(_)) | Some(Body::Error(_))))
        .count();
    assert_eq!(acks, 0, "a replayed Send is not acted on again");
    let history = bob.history(&direct("alice"), 0, None, 10);
    assert_eq!(
        history.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1],
        "the message is stored once"
    );
    bob.ping();
}

#[test]
fn a_session_follows_its_client_to_a_new_address_but_not_a_late_datagram_from_elsewhere() {
    let broker = udp_broker(&[]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob: UdpClient = broker.connect_udp("bob", "phone");
    let conversation = direct("alice");
    let id = bob.transport().session_id().expect("logged in");
    let first = alice.send("bob", "at the first address");
    bob.expect_delivery(&conversation, first.seq, TIMEOUT);

    // Sealed now, sent later: an authentic datagram that will be late.
    let late_nonce = fresh_client_msg_id();
    let late = bob
        .transport_mut()
        .seal_frames(&[ping(late_nonce)])
        .expect("seal");

    // Bob's address changes (a NAT rebinding): the next datagram comes from a new port.
    let old = bob.transport_mut().rebind().expect("a new socket");
    bob.ping();
    assert_eq!(bob.transport().session_id(), Some(id), "the same session");
    let second = alice.send("bob", "at the new address");
    bob.expect_delivery(&conversation, second.seq, TIMEOUT);
    expect_silence(
        &old,
        "once the session moved, nothing goes to the old address",
    );
    await_metric(&broker, "parley_udp_migrations_total", |v| v >= 1.0);

    // The late datagram, from a third address: acted on (it is authentic and new) but the
    // session does not move, so its answer goes to bob's current address.
    let third = socket(&broker);
    send(&third, &broker, &late);
    bob.recv_until(
        TIMEOUT,
        |f| matches!(&f.body, Some(Body::Pong(p)) if p.nonce == late_nonce),
    );
    let third_ack = alice.send("bob", "still at the new address");
    bob.expect_delivery(&conversation, third_ack.seq, TIMEOUT);
    expect_silence(&third, "a late datagram does not redirect the session");
    expect_silence(&old, "nor does anything go back to the old address");
    assert_eq!(
        metric(&broker, "parley_udp_migrations_total"),
        1.0,
        "one move: to the new address, none to the third"
    );
    assert_eq!(bob.held_seqs(&conversation), vec![1, 2, 3]);
    bob.assert_no_duplicates();
}

#[test]
fn a_server_datagram_reflected_back_is_dropped() {
    let broker = udp_broker(&[]);
    let mut bob: UdpClient = broker.connect_udp("bob", "phone");
    let key = bob.transport().session_key().expect("logged in").clone();
    let id = bob.transport().session_id().expect("logged in");
    // What the server would send, under the session's key: the type byte binds the direction.
    let mut out = BytesMut::new();
    udp::seal(
        &key,
        Direction::ServerToClient,
        id,
        bob.transport().next_packet_number() + 10,
        &[ping(5)],
        udp::DEFAULT_MAX_DATAGRAM_BYTES,
        &mut out,
    )
    .expect("seal");
    assert_eq!(
        udp::peek_header(&out).expect("header").kind,
        DatagramType::ServerData
    );
    bob.write_raw(&out);
    let answers = bob.receive_for(SILENCE);
    assert!(
        answers.is_empty(),
        "a SERVER_DATA sent to the server is dropped, got {answers:?}"
    );
    bob.ping();
}
