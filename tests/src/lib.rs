//! The integration-test harness: it starts the real `broker` binary on ephemeral loopback ports
//! with a temporary data directory and talks to it over real sockets, as an outside client. It
//! reaches the broker only through `parley-proto` and sockets, never through the broker's code
//! or its files (the data directory is only created and handed over).
//!
//! * [`Broker`]: the child process (start, restart on the same data, SIGKILL, SIGTERM); its
//!   output is printed when a test fails, and a broker that panicked fails the test.
//! * [`Client`] (TCP), [`WsClient`] (WebSocket, through tungstenite), [`TlsClient`],
//!   [`WssClient`] and [`UdpClient`] (the authenticated datagram envelope): clients that log in,
//!   sync, ack, de-duplicate and record what they were sent, generic over a
//!   [`transport::Transport`].
//! * [`token`]: HS256 tokens minted independently of the broker.
//! * [`http`]: a minimal HTTP client for the admin listener.
//! * [`redis`]: a `redis-server` of a test's own, for the cluster tests.
//! * [`hostile`]: raw sockets for abuse (partial frames, garbage, floods, many connections)
//!   and a healthy pair that measures delivery latency beside them.
//!
//! Everything is bounded: every read and wait has a deadline ([`TIMEOUT`] unless a test says
//! otherwise), so a broker that does not answer fails a test instead of hanging it.
//!
//! The test files (`tests/*.rs` beside this crate) are grouped by promise; see each file's docs.

pub mod broker;
pub mod chromium;
pub mod client;
pub mod hostile;
pub mod http;
pub mod loadgen;
pub mod redis;
pub mod token;
pub mod transport;

use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_proto::pb;

use crate::transport::Transport;

pub use broker::Broker;
pub use client::{
    Arrival, Burst, Client, Pipeline, SyncResult, TlsClient, UdpClient, Via, WsClient, WssClient,
};
pub use parley_proto::pb::ErrorCode;

/// The default bound of one operation (a login, an ack, a delivery, a close).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol version the test clients speak.
pub const PROTOCOL_VERSION: u32 = parley_proto::PROTOCOL_VERSION;

/// The direct conversation with `user`, as the other party names it.
pub fn direct(user: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Direct as i32,
        id: user.to_owned(),
    }
}

/// The group conversation `id`.
pub fn group(id: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Group as i32,
        id: id.to_owned(),
    }
}

/// The room `id`, as every listener names it.
pub fn room(id: &str) -> pb::Conversation {
    pb::Conversation {
        r#type: pb::ConversationType::Room as i32,
        id: id.to_owned(),
    }
}

/// A `GroupRequest` of `action` on group `id` naming `members`.
pub fn group_request(action: pb::GroupAction, id: &str, members: &[&str]) -> pb::GroupRequest {
    pb::GroupRequest {
        action: action as i32,
        group_id: id.to_owned(),
        members: members.iter().map(|m| (*m).to_owned()).collect(),
        ..Default::default()
    }
}

/// A `PresenceRequest` of `action` naming `users`.
pub fn presence_request(action: pb::PresenceAction, users: &[&str]) -> pb::PresenceRequest {
    pb::PresenceRequest {
        action: action as i32,
        users: users.iter().map(|u| (*u).to_owned()).collect(),
        ..Default::default()
    }
}

/// `DIRECT:bob`, for messages.
pub fn conv_name(conversation: &pb::Conversation) -> String {
    let kind = pb::ConversationType::try_from(conversation.r#type).map_or_else(
        |_| format!("type {}", conversation.r#type),
        |t| t.as_str_name().into(),
    );
    format!("{kind}:{}", conversation.id)
}

/// The body of the `i`-th numbered test message: `msg-<i>`, padded to `size` bytes if larger.
pub fn numbered_body(i: u64, size: usize) -> Bytes {
    let mut body = format!("msg-{i}").into_bytes();
    if body.len() < size {
        body.resize(size, b'.');
    }
    Bytes::from(body)
}

/// Sends one message from `from` to `to` and waits until `to` has it pushed live; returns how
/// long that took (send to delivery). Panics if it does not arrive within [`TIMEOUT`].
pub fn delivery_latency<A: Transport, B: Transport>(
    from: &mut Client<A>,
    to: &mut Client<B>,
    body: &str,
) -> Duration {
    let (to_user, from_user) = (to.user().to_owned(), from.user().to_owned());
    let start = Instant::now();
    let ack = from.send(&to_user, body.to_owned());
    let message = to.expect_delivery(&direct(&from_user), ack.seq, TIMEOUT);
    let latency = start.elapsed();
    assert_eq!(
        message.body.as_ref(),
        body.as_bytes(),
        "the delivered body is the sent one"
    );
    latency
}

/// Checks that two logged-in, synced clients can still talk both ways: a message each way is
/// acked and pushed live within [`TIMEOUT`]. Used after abusing the broker on other connections.
pub fn assert_pair_still_talks<A: Transport, B: Transport>(a: &mut Client<A>, b: &mut Client<B>) {
    delivery_latency(a, b, "still there?");
    delivery_latency(b, a, "still here.");
}

/// Asserts that `got` is exactly the seqs of `want`, in order, explaining `promise` and, on
/// failure, where the two part (without printing thousands of numbers).
pub fn assert_seqs(got: &[u64], want: std::ops::RangeInclusive<u64>, promise: &str) {
    if got.iter().copied().eq(want.clone()) {
        return;
    }
    let expected: Vec<u64> = want.collect();
    let diverge = got
        .iter()
        .zip(&expected)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(expected.len()));
    let around = |v: &[u64]| -> Vec<u64> { v.iter().skip(diverge).take(8).copied().collect() };
    let expected_set: std::collections::BTreeSet<u64> = expected.iter().copied().collect();
    let got_set: std::collections::BTreeSet<u64> = got.iter().copied().collect();
    let missing: Vec<u64> = expected_set.difference(&got_set).copied().collect();
    let extra: Vec<u64> = got_set.difference(&expected_set).copied().collect();
    panic!(
        "{promise}\n  expected {} seqs {:?}..={:?}, got {} (first {:?}, last {:?})\n  \
         they part at index {diverge}: got {:?}..., expected {:?}...\n  \
         missing {} (first {:?}), unexpected {} (first {:?}), repeated {}",
        expected.len(),
        expected.first(),
        expected.last(),
        got.len(),
        got.first(),
        got.last(),
        around(got),
        around(&expected),
        missing.len(),
        missing.iter().take(8).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(8).collect::<Vec<_>>(),
        got.len() - got_set.len(),
    );
}
