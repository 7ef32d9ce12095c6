//! Promise 6, bad input: malformed or oversized frames and protocol violations get a clear error
//! (or a close), never a panic, and connections that behave are unaffected: each test keeps a
//! healthy pair connected through the abuse and checks it still talks afterwards.
//!
//! (Every test also relies on the harness's check that the broker never panicked.)

use std::time::{Duration, Instant};

use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_tests::{Broker, Client, ErrorCode, TIMEOUT, assert_pair_still_talks, direct};

/// The login timeout, short so that a silent connection is closed quickly.
const LOGIN_MS: u64 = 500;

/// A broker with a short login timeout and a healthy, talking pair on it.
fn broker_with_healthy_pair() -> (Broker, Client, Client) {
    let broker = Broker::start(&[&format!("timeouts.login_ms={LOGIN_MS}")]);
    let mut alice = broker.connect("alice", "phone");
    let mut bob = broker.connect("bob", "phone");
    assert_pair_still_talks(&mut alice, &mut bob);
    (broker, alice, bob)
}

/// The codes a broker may answer undecodable or oversized input with.
const FRAMING_ERRORS: [ErrorCode; 2] = [ErrorCode::BadFrame, ErrorCode::FrameTooLarge];

#[test]
fn garbage_bytes_get_a_framing_error_and_a_close_and_others_are_unaffected() {
    let (broker, mut alice, mut bob) = broker_with_healthy_pair();
    let mut abuser = broker.tcp();
    // A valid length prefix (8) followed by bytes that are no protobuf: field numbers and
    // varints that never end.
    abuser.write_raw(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    abuser.expect_fatal_error(&FRAMING_ERRORS, TIMEOUT);
    assert_pair_still_talks(&mut alice, &mut bob);
}

#[test]
fn garbage_from_a_logged_in_client_gets_a_framing_error_and_a_close() {
    let (broker, mut alice, mut bob) = broker_with_healthy_pair();
    let mut abuser = broker.connect("mallory", "phone");
    // No valid length prefix: the stream cannot be resynchronised, so this is fatal.
    abuser.write_raw(&[0xff; 16]);
    abuser.expect_fatal_error(&FRAMING_ERRORS, TIMEOUT);
    assert_pair_still_talks(&mut alice, &mut bob);
}

#[test]
fn an_oversized_length_prefix_is_refused_at_once_and_others_are_unaffected() {
    let (broker, mut alice, mut bob) = broker_with_healthy_pair();
    let mut abuser = broker.tcp();
    // A 5-byte varint claiming 1 GiB (0x4000_0000): refused from the prefix alone, long before
    // the login timeout, without waiting for (or buffering) the payload.
    let claimed_at = Instant::now();
    abuser.write_raw(&[0x80, 0x80, 0x80, 0x80, 0x04]);
    abuser.expect_fatal_error(&FRAMING_ERRORS, TIMEOUT);
    assert!(
        claimed_at.elapsed() < Duration::from_millis(LOGIN_MS),
        "refused from the prefix, not by a timeout ({:?})",
        claimed_at.elapsed()
    );
    assert_pair_still_talks(&mut alice, &mut bob);
}

#[test]
fn a_half_frame_then_silence_is_closed_by_the_login_timeout_and_others_are_unaffected() {
    let (broker, mut alice, mut bob) = broker_with_healthy_pair();
    let mut abuser = broker.tcp();
    let started = Instant::now();
    // A prefix announcing 100 bytes, then only 10 of them, then nothing.
    let mut half = vec![100u8];
    half.extend_from_slice(&[0x0a; 10]);
    abuser.write_raw(&half);
    let errors = abuser.expect_closed(TIMEOUT);
    assert!(
        errors.iter().all(|e| e.fatal
            && [
                ErrorCode::LoginTimeout as i32,
                ErrorCode::IdleTimeout as i32
            ]
            .contains(&e.code)),
        "a silent connection is closed by a timeout (with at most a timeout error): {errors:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(LOGIN_MS / 2),
        "the close comes from the timeout, not at once ({:?})",
        started.elapsed()
    );
    assert_pair_still_talks(&mut alice, &mut bob);
}

#[test]
fn a_non_login_first_frame_gets_login_required_and_others_are_unaffected() {
    let (broker, mut alice, mut bob) = broker_with_healthy_pair();
    let mut abuser = broker.tcp();
    abuser.request(Body::SyncRequest(pb::SyncRequest {
        cursors: vec![pb::AckCursor {
            conversation: Some(direct("alice")),
            seq: 0,
        }],
        page_size: 0,
        max_per_conversation: 0,
    }));
    abuser.expect_fatal_error(&[ErrorCode::LoginRequired], TIMEOUT);
    assert_pair_still_talks(&mut alice, &mut bob);
}
