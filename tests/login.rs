//! Promise 1, auth: a connection authenticates with a signed token naming its user and device;
//! a bad, expired or missing token, or no login at all, gets a clear error and a close. One
//! device logging in again replaces its old connection.

use std::time::{Duration, Instant};

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_tests::{Broker, ErrorCode, PROTOCOL_VERSION, TIMEOUT, direct, token};

/// The login timeout the tests that need one configure.
const LOGIN_MS: u64 = 500;

#[test]
fn login_with_a_valid_token_names_the_user_and_device() {
    let broker = Broker::start(&[]);
    let mut client = broker.tcp();
    let token = broker.token("alice", "phone");
    let request_id = client.request(Body::Login(pb::Login {
        protocol_version: PROTOCOL_VERSION,
        token,
        client_name: "login-test".into(),
    }));
    let frame = client.recv_until(TIMEOUT, |f| {
        matches!(f.body, Some(Body::LoginResult(_)) | Some(Body::Error(_)))
    });
    assert_eq!(
        frame.request_id, request_id,
        "the answer echoes the Login's request_id"
    );
    let Some(Body::LoginResult(result)) = frame.body else {
        panic!("a valid token must be accepted, got {frame:?}");
    };
    assert_eq!(result.user, "alice", "the user comes from the token's sub");
    assert_eq!(
        result.device, "phone",
        "the device comes from the token's dev"
    );
    assert_eq!(
        result.protocol_version, PROTOCOL_VERSION,
        "the server speaks the client's version"
    );
    assert!(
        result.heartbeat_interval_ms > 0,
        "the client is told how often to send something"
    );
    client.ping();
}

#[test]
fn token_with_a_bad_signature_is_refused_with_bad_token() {
    let broker = Broker::start(&[]);
    let mut client = broker.tcp();
    let forged = token::mint_valid(b"not the broker's secret", "alice", "phone");
    let error = client
        .try_login(&forged)
        .expect_err("a token signed with another secret must be refused");
    assert_refused(&mut client, error, ErrorCode::BadToken);
}

#[test]
fn expired_token_is_refused_with_token_expired() {
    let broker = Broker::start(&[]);
    let mut client = broker.tcp();
    let expired = token::mint(
        broker.secret().as_bytes(),
        "alice",
        "phone",
        token::unix_now() - 60,
    );
    let error = client
        .try_login(&expired)
        .expect_err("an expired token must be refused");
    assert_refused(&mut client, error, ErrorCode::TokenExpired);
}

#[test]
fn missing_token_is_refused_with_bad_token() {
    let broker = Broker::start(&[]);
    let mut client = broker.tcp();
    let error = client
        .try_login("")
        .expect_err("a Login without a token must be refused");
    assert_refused(&mut client, error, ErrorCode::BadToken);
}

#[test]
fn a_first_frame_other_than_login_is_refused_with_login_required() {
    let broker = Broker::start(&[]);
    let mut client = broker.tcp();
    client.request(Body::Send(pb::Send {
        to: Some(direct("bob")),
        client_msg_id: 1,
        content_type: 1,
        body: "sneaking in".into(),
        kind: pb::MessageKind::Normal as i32,
        ref_seq: 0,
    }));
    client.expect_fatal_error(&[ErrorCode::LoginRequired], TIMEOUT);
}

#[test]
fn a_connection_that_never_logs_in_is_closed_after_the_login_timeout() {
    let broker = Broker::start(&[&format!("timeouts.login_ms={LOGIN_MS}")]);
    let connected = Instant::now();
    let mut client = broker.tcp();
    let errors = client.expect_closed(TIMEOUT);
    let waited = connected.elapsed();
    assert!(
        errors
            .iter()
            .all(|e| e.code == ErrorCode::LoginTimeout as i32 && e.fatal),
        "the only error before the close may be a fatal LOGIN_TIMEOUT, got {errors:?}"
    );
    assert!(
        waited >= Duration::from_millis(LOGIN_MS / 2),
        "the close comes from the login timeout ({LOGIN_MS} ms), not at once ({waited:?})"
    );
}

#[test]
fn the_same_device_logging_in_again_replaces_the_old_connection() {
    let broker = Broker::start(&[]);
    let mut old = broker.connect("alice", "phone");
    let mut new = broker.connect("alice", "phone");
    old.expect_fatal_error(&[ErrorCode::Replaced], TIMEOUT);
    let ack = new.send("bob", "from the new connection");
    assert_eq!(ack.seq, 1, "the new connection is fully usable");
}

#[test]
fn the_secret_and_tokens_never_appear_in_the_broker_output() {
    let broker = Broker::start(&[]);
    let mut client = broker.tcp();
    let token = broker.token("alice", "phone");
    client.try_login(&token).expect("a valid token is accepted");
    let mut refused = broker.tcp();
    let forged = token::mint_valid(b"another secret", "mallory", "laptop");
    let _ = refused.try_login(&forged);
    refused.expect_closed(TIMEOUT);
    client.ping();
    let output = broker.output();
    for (what, secret) in [
        ("the token secret", broker.secret()),
        ("a valid token", token.as_str()),
        ("a refused token", forged.as_str()),
    ] {
        assert!(
            !output.contains(secret),
            "{what} must never be logged, but the broker printed it"
        );
    }
}

/// A refused login: the error has `code` and is fatal, and the connection closes.
fn assert_refused(client: &mut parley_tests::Client, error: pb::Error, code: ErrorCode) {
    assert_eq!(
        error.code,
        code as i32,
        "expected {}, got {} ({:?})",
        code.as_str_name(),
        parley_tests::client::code_name(error.code),
        error.message
    );
    assert!(error.fatal, "a refused login is fatal");
    client.expect_closed(TIMEOUT);
}
