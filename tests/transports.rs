//! One suite of promises, run over every transport: TCP, WebSocket (`ws`), TCP framing inside
//! TLS (`tls`), WebSocket inside TLS (`wss`) and UDP (the authenticated datagram envelope).
//!
//! Each promise is a generic function over the transport ([`Way`]); the macro at the end stamps
//! out one test per transport and promise, so a failure names both (`udp::history_pages`). Every
//! test starts its own broker, with `tls` and `wss` listeners (a self-signed certificate made
//! here) and, for UDP, `listen.udp`; all the clients of a test use the transport under test.
//!
//! The promises: login with a good token and refusal of a bad one; messages of a conversation
//! arriving once each, in seq order, on every device of the recipient; a retried send stored
//! once and acked identically; an offline recipient catching up by sync, gapless; history
//! pages; bad input refused without harm to other connections (a malformed frame on a stream;
//! garbage and forged datagrams over UDP, dropped without an answer); a frame over
//! `limits.max_frame_bytes` refused with FRAME_TOO_LARGE; requests over the rate refused with
//! RATE_LIMITED.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_proto::udp as envelope;
use parley_tests::client::{code_name, fresh_client_msg_id};
use parley_tests::transport::{
    Tcp, TlsStream, Transport, Udp, Ws, connect_tls, recv_datagram, tls_client_config,
};
use parley_tests::{
    Broker, Client, ErrorCode, PROTOCOL_VERSION, TIMEOUT, assert_pair_still_talks, assert_seqs,
    direct, numbered_body, token,
};
use rustls::ClientConfig;
use tempfile::TempDir;

/// How long a test listens to make sure that nothing comes.
const SILENCE: Duration = Duration::from_millis(300);

/// A broker with every listener a transport of this file needs, and the trust to reach its TLS
/// ones.
struct Net {
    broker: Broker,
    trust: Arc<ClientConfig>,
    /// Holds the certificate and key files the broker reads.
    _certs: TempDir,
}

/// Starts a broker for transport `T` with `tls` and `wss` listeners serving a fresh self-signed
/// certificate for `localhost`, `T`'s own settings, then `extra`.
fn start<T: Way>(extra: &[&str]) -> Net {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("rcgen makes a certificate");
    let certs = tempfile::tempdir().expect("a temp dir for the certificate");
    let cert_path = certs.path().join("cert.pem");
    let key_path = certs.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).expect("write the certificate");
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write the key");
    let cert_setting = format!("tls.cert_path=\"{}\"", cert_path.display());
    let key_setting = format!("tls.key_path=\"{}\"", key_path.display());
    let mut settings = vec![
        "listen.tls=\"127.0.0.1:0\"",
        "listen.wss=\"127.0.0.1:0\"",
        cert_setting.as_str(),
        key_setting.as_str(),
    ];
    settings.extend_from_slice(T::SETTINGS);
    settings.extend_from_slice(extra);
    Net {
        broker: Broker::start(&settings),
        trust: tls_client_config(&[certified.cert.der().clone()]),
        _certs: certs,
    }
}

/// A transport of the suite: how to open it on a [`Net`] and what bad input is on it.
trait Way: Transport {
    /// Settings the broker needs for this transport.
    const SETTINGS: &'static [&'static str];

    /// The broker's listener for this transport.
    fn listener(net: &Net) -> SocketAddr;

    /// Opens a connection (not logged in) to `addr`, the broker's listener for this transport.
    fn open_at(net: &Net, addr: SocketAddr) -> Self;

    /// Writes `frame`, bytes that are no protobuf `Frame`, well delimited in the transport's
    /// framing: behind a TCP length prefix, as one WebSocket binary message, in an
    /// authenticated UDP datagram.
    fn write_malformed_frame(client: &mut Client<Self>, frame: &[u8]);

    /// Checks that a connection the broker ended with a fatal error stays ended (streams: the
    /// close already said so; UDP: a datagram of the old session gets nothing back).
    fn stays_closed(_client: &mut Client<Self>) {}

    /// Writes input the transport drops without an answer and checks that none comes (UDP:
    /// garbage and forged datagrams, whose source may be forged). Streams have none.
    fn unauthenticated_input_is_dropped(_client: &mut Client<Self>) {}
}

/// Eight bytes that are no protobuf `Frame`: a field tag with wire type 7, varints that never end.
const MALFORMED_FRAME: [u8; 8] = [0xff; 8];

impl Way for Tcp<TcpStream> {
    const SETTINGS: &'static [&'static str] = &[];

    fn listener(net: &Net) -> SocketAddr {
        net.broker.tcp_addr()
    }

    fn open_at(_net: &Net, addr: SocketAddr) -> Self {
        <Self as Transport>::open(addr, None).unwrap_or_else(|e| panic!("tcp to {addr}: {e}"))
    }

    fn write_malformed_frame(client: &mut Client<Self>, frame: &[u8]) {
        client.write_raw(&length_prefixed(frame));
    }
}

impl Way for Tcp<TlsStream> {
    const SETTINGS: &'static [&'static str] = &[];

    fn listener(net: &Net) -> SocketAddr {
        net.broker.tls_addr()
    }

    fn open_at(net: &Net, addr: SocketAddr) -> Self {
        let stream = connect_tls(addr, net.trust.clone())
            .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
        Tcp::from_stream(stream)
    }

    fn write_malformed_frame(client: &mut Client<Self>, frame: &[u8]) {
        client.write_raw(&length_prefixed(frame));
    }
}

/// `frame` behind its TCP length prefix (a one-byte varint: `frame` is short).
fn length_prefixed(frame: &[u8]) -> Vec<u8> {
    let len = u8::try_from(frame.len()).expect("a short frame");
    assert!(len < 0x80, "a one-byte varint");
    let mut bytes = vec![len];
    bytes.extend_from_slice(frame);
    bytes
}

impl Way for Ws<TcpStream> {
    const SETTINGS: &'static [&'static str] = &[];

    fn listener(net: &Net) -> SocketAddr {
        net.broker.ws_addr()
    }

    fn open_at(_net: &Net, addr: SocketAddr) -> Self {
        <Self as Transport>::open(addr, None).unwrap_or_else(|e| panic!("ws to {addr}: {e}"))
    }

    fn write_malformed_frame(client: &mut Client<Self>, frame: &[u8]) {
        client.write_raw(frame);
    }
}

impl Way for Ws<TlsStream> {
    const SETTINGS: &'static [&'static str] = &[];

    fn listener(net: &Net) -> SocketAddr {
        net.broker.wss_addr()
    }

    fn open_at(net: &Net, addr: SocketAddr) -> Self {
        let stream = connect_tls(addr, net.trust.clone())
            .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
        Ws::over(stream, addr, None).unwrap_or_else(|e| panic!("wss upgrade at {addr}: {e}"))
    }

    fn write_malformed_frame(client: &mut Client<Self>, frame: &[u8]) {
        client.write_raw(frame);
    }
}

impl Way for Udp {
    const SETTINGS: &'static [&'static str] = &["listen.udp=\"127.0.0.1:0\""];

    fn listener(net: &Net) -> SocketAddr {
        net.broker.udp_addr()
    }

    fn open_at(_net: &Net, addr: SocketAddr) -> Self {
        <Self as Transport>::open(addr, None).unwrap_or_else(|e| panic!("udp to {addr}: {e}"))
    }

    fn write_malformed_frame(client: &mut Client<Self>, frame: &[u8]) {
        let datagram = client
            .transport_mut()
            .seal_encoded(&[frame])
            .expect("seal a datagram");
        client.write_raw(&datagram);
    }

    fn stays_closed(client: &mut Client<Self>) {
        let datagram = client
            .transport_mut()
            .seal_frames(&[pb::Frame {
                request_id: 1,
                body: Some(Body::Ping(pb::Ping { nonce: 1 })),
            }])
            .expect("seal");
        client.write_raw(&datagram);
        let socket = client.transport().socket();
        if let Some((answer, _)) = recv_datagram(socket, Instant::now() + SILENCE).expect("receive")
        {
            panic!(
                "a session ended by a fatal error is gone: a Ping on it gets nothing, got {} \
                 bytes ({:?})",
                answer.len(),
                envelope::peek_header(&answer)
            );
        }
    }

    fn unauthenticated_input_is_dropped(client: &mut Client<Self>) {
        let session_id = client.transport().session_id().expect("logged in");
        let ping = |nonce| pb::Frame {
            request_id: 7,
            body: Some(Body::Ping(pb::Ping { nonce })),
        };
        // A well-formed CLIENT_DATA of the session whose last byte (in the tag) is flipped.
        let mut tampered = client
            .transport_mut()
            .seal_frames(&[ping(1)])
            .expect("seal")
            .to_vec();
        *tampered.last_mut().expect("not empty") ^= 1;
        // A CLIENT_DATA for the session, sealed under another key (a forger who knows the id).
        let mut forged = bytes::BytesMut::new();
        envelope::seal(
            &envelope::SessionKey::new(&[0x5a; envelope::SESSION_KEY_LEN]),
            envelope::Direction::ClientToServer,
            session_id,
            client.transport().next_packet_number() + 1,
            &[ping(2)],
            envelope::DEFAULT_MAX_DATAGRAM_BYTES,
            &mut forged,
        )
        .expect("seal");
        // A datagram of the session with one byte of its frame changed: the tag no longer
        // matches.
        let mut altered = client
            .transport_mut()
            .seal_frames(&[ping(3)])
            .expect("seal")
            .to_vec();
        altered[envelope::HEADER_LEN + 3] ^= 0x40;
        let truncated_header = tampered[..envelope::HEADER_LEN - 1].to_vec();
        let datagrams: [(&str, Vec<u8>); 5] = [
            (
                "garbage",
                b"\x17\x03\x03 not a parley datagram at all".to_vec(),
            ),
            ("a datagram with a flipped tag bit", tampered),
            ("a datagram sealed under another key", forged.to_vec()),
            ("a datagram with an altered frame", altered),
            ("a datagram cut inside its header", truncated_header),
        ];
        for (what, datagram) in &datagrams {
            client.write_raw(datagram);
            let answers = client.receive_for(SILENCE);
            assert!(
                answers.is_empty(),
                "{what} is dropped without an answer (its source may be forged), got {:?}",
                answers
                    .iter()
                    .map(parley_tests::client::describe)
                    .collect::<Vec<_>>()
            );
        }
        // The session goes on.
        client.ping();
    }
}

/// A connection of transport `T` to the broker, not logged in.
fn client<T: Way>(net: &Net) -> Client<T> {
    let addr = T::listener(net);
    Client::with_conn(T::open_at(net, addr), addr, net.broker.secret())
}

/// A connection of transport `T`, logged in as `user` on `device` (not synced).
fn logged_in<T: Way>(net: &Net, user: &str, device: &str) -> Client<T> {
    let mut client = client::<T>(net);
    client.login(user, device);
    client
}

/// A ready client of transport `T`: logged in as `user` on `device` and synced.
fn connect<T: Way>(net: &Net, user: &str, device: &str) -> Client<T> {
    let mut client = logged_in(net, user, device);
    client.sync();
    client
}

// ---------------------------------------------------------------------------------------------
// The promises
// ---------------------------------------------------------------------------------------------

fn a_good_token_logs_in<T: Way>() {
    let net = start::<T>(&[]);
    let mut client = client::<T>(&net);
    let result = client.login("alice", "phone");
    assert_eq!(
        (result.user.as_str(), result.device.as_str()),
        ("alice", "phone"),
        "the user and device come from the token"
    );
    assert_eq!(result.protocol_version, PROTOCOL_VERSION);
    assert!(result.heartbeat_interval_ms > 0);
    client.ping();
}

fn a_bad_token_is_refused_with_a_clear_error<T: Way>() {
    let net = start::<T>(&[]);
    let mut client = client::<T>(&net);
    let forged = token::mint_valid(b"not the broker's secret", "alice", "phone");
    let error = client
        .try_login(&forged)
        .expect_err("a token signed with another secret is refused");
    assert_eq!(
        error.code,
        ErrorCode::BadToken as i32,
        "a forged token gets BAD_TOKEN, got {} ({:?})",
        code_name(error.code),
        error.message
    );
    assert!(error.fatal, "a refused login is fatal");
    assert!(!error.message.is_empty(), "the error says why");
    client.expect_closed(TIMEOUT);
    // The node goes on serving logins.
    connect::<T>(&net, "alice", "phone").ping();
}

fn messages_arrive_once_each_in_seq_order_on_every_device<T: Way>() {
    const N: u64 = 30;
    let net = start::<T>(&[]);
    let mut alice = connect::<T>(&net, "alice", "phone");
    let mut phone = connect::<T>(&net, "bob", "phone");
    let mut laptop = connect::<T>(&net, "bob", "laptop");
    let acks = alice.send_many("bob", (1..=N).map(|i| numbered_body(i, 0)), 8);
    let seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    assert_seqs(&seqs, 1..=N, "the sends are acked with seqs 1, 2, 3, ...");
    let conversation = direct("alice");
    for device in [&mut phone, &mut laptop] {
        device.wait_for_cursor(&conversation, N, TIMEOUT);
        assert_seqs(
            &device.delivered_seqs(&conversation),
            1..=N,
            "every device of the recipient is pushed each message once, in seq order",
        );
        device.assert_no_duplicates();
        for i in 1..=N {
            let message = device.message(&conversation, i).expect("held");
            assert_eq!(
                message.body,
                numbered_body(i, 0),
                "seq {i} carries its body"
            );
        }
    }
    // And back: the sender's device gets the reply.
    let reply = phone.send("alice", "got them all");
    alice.expect_delivery(&direct("bob"), reply.seq, TIMEOUT);
}

fn a_retried_send_is_stored_once_and_acked_identically<T: Way>() {
    let net = start::<T>(&[]);
    let mut alice = connect::<T>(&net, "alice", "phone");
    let mut bob = connect::<T>(&net, "bob", "phone");
    let id = fresh_client_msg_id();
    let first = alice.send_with_id("bob", id, "only once");
    let retry = alice.send_with_id("bob", id, "only once");
    assert_eq!(
        (
            retry.client_msg_id,
            retry.seq,
            retry.msg_id,
            &retry.conversation
        ),
        (
            first.client_msg_id,
            first.seq,
            first.msg_id,
            &first.conversation
        ),
        "a retried send (same client_msg_id) is acked with the original seq and msg_id"
    );
    let next = alice.send("bob", "the next one");
    assert_eq!(
        next.seq,
        first.seq + 1,
        "the retry took no seq: the next message follows the original directly"
    );
    let conversation = direct("alice");
    bob.wait_for_cursor(&conversation, next.seq, TIMEOUT);
    bob.assert_no_delivery(
        &conversation,
        first.seq,
        SILENCE,
        "the retry is not delivered again",
    );
    assert_eq!(
        bob.delivered_seqs(&conversation),
        vec![first.seq, next.seq],
        "the recipient is pushed the message once"
    );
    let page = alice.history(&direct("bob"), 0, None, 10);
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![first.seq, next.seq],
        "the message is stored once"
    );
}

fn an_offline_recipient_catches_up_by_sync_gapless<T: Way>() {
    const N: u64 = 40;
    let net = start::<T>(&[]);
    let mut alice = connect::<T>(&net, "alice", "phone");
    let conversation = direct("alice");
    {
        let mut bob = connect::<T>(&net, "bob", "phone");
        let first = alice.send("bob", numbered_body(1, 0));
        bob.expect_delivery(&conversation, first.seq, TIMEOUT);
        // Bob goes away (the connection dropped without a goodbye).
    }
    let acks = alice.send_many("bob", (2..=N).map(|i| numbered_body(i, 0)), 8);
    assert_eq!(acks.last().map(|a| a.seq), Some(N));

    let mut bob = logged_in::<T>(&net, "bob", "phone");
    let sync = bob.sync_with(
        vec![pb::AckCursor {
            conversation: Some(conversation.clone()),
            seq: 1,
        }],
        7,
    );
    assert_seqs(
        &sync.seqs(&conversation),
        2..=N,
        "the sync returns exactly what was missed, in order",
    );
    assert!(
        sync.pages.len() >= 2 && sync.pages.iter().all(|p| p.messages.len() <= 7),
        "{} messages come in pages of at most 7: {:?}",
        N - 1,
        sync.pages
            .iter()
            .map(|p| p.messages.len())
            .collect::<Vec<_>>()
    );
    for m in sync.messages() {
        assert_eq!(
            m.body,
            numbered_body(m.seq, 0),
            "seq {} carries its body",
            m.seq
        );
    }
    // Live push follows the sync.
    let live = alice.send("bob", "after the sync");
    assert_eq!(live.seq, N + 1);
    bob.expect_delivery(&conversation, live.seq, TIMEOUT);
    bob.assert_no_duplicates();
}

fn history_pages<T: Way>() {
    const N: u64 = 25;
    let net = start::<T>(&[]);
    let mut alice = connect::<T>(&net, "alice", "phone");
    alice.send_many("bob", (1..=N).map(|i| numbered_body(i, 0)), 8);
    let conversation = direct("bob");
    let seqs = |page: &pb::HistoryPage| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

    // Backwards from the newest, ten at a time.
    let mut before = 0;
    let mut pages = Vec::new();
    loop {
        let page = alice.history(&conversation, before, None, 10);
        assert_eq!(page.last_seq, N, "the page names the newest seq");
        assert!(page.messages.len() <= 10, "a page holds at most the limit");
        let got = seqs(&page);
        before = got.first().copied().unwrap_or(0);
        pages.push(got);
        if !page.more {
            break;
        }
        assert!(
            pages.len() < 10,
            "history backwards does not end: {pages:?}"
        );
    }
    assert_eq!(
        pages,
        vec![
            (16..=25).collect::<Vec<_>>(),
            (6..=15).collect(),
            (1..=5).collect()
        ],
        "history pages backwards, each page in ascending seq order"
    );

    // Forwards from the start.
    let page = alice.history(&conversation, 0, Some(0), 10);
    assert_eq!(seqs(&page), (1..=10).collect::<Vec<_>>());
    assert!(page.more, "more follow the first ten");
    let page = alice.history(&conversation, 0, Some(20), 10);
    assert_eq!(seqs(&page), (21..=N).collect::<Vec<_>>());
    assert!(!page.more, "nothing follows the newest");
    for m in &page.messages {
        assert_eq!(
            m.body,
            numbered_body(m.seq, 0),
            "seq {} carries its body",
            m.seq
        );
    }
}

fn bad_input_is_refused_and_other_connections_are_unaffected<T: Way>() {
    let net = start::<T>(&[]);
    let mut alice = connect::<T>(&net, "alice", "phone");
    let mut bob = connect::<T>(&net, "bob", "phone");
    assert_pair_still_talks(&mut alice, &mut bob);
    let mut mallory = connect::<T>(&net, "mallory", "phone");

    // A malformed frame, well delimited: a clear error, and the connection stays in sync.
    T::write_malformed_frame(&mut mallory, &MALFORMED_FRAME);
    let error = mallory.expect_error(TIMEOUT);
    assert_eq!(
        (error.code, error.fatal),
        (ErrorCode::BadFrame as i32, false),
        "a malformed but well-delimited frame gets a non-fatal BAD_FRAME, got {} (fatal {}, \
         {:?})",
        code_name(error.code),
        error.fatal,
        error.message
    );
    assert!(!error.message.is_empty(), "the error says what was wrong");
    mallory.ping();

    T::unauthenticated_input_is_dropped(&mut mallory);
    assert_pair_still_talks(&mut alice, &mut bob);
    mallory.ping();
}

fn a_frame_over_max_frame_bytes_gets_frame_too_large<T: Way>() {
    // Small enough that an oversized frame fits in one UDP datagram too.
    const MAX_FRAME: usize = 4096;
    let net = start::<T>(&[
        &format!("limits.max_frame_bytes={MAX_FRAME}"),
        "limits.max_body_bytes=2048",
    ]);
    let mut alice = connect::<T>(&net, "alice", "phone");
    let mut bob = connect::<T>(&net, "bob", "phone");
    let mut mallory = connect::<T>(&net, "mallory", "phone");
    let body = Bytes::from(vec![b'x'; MAX_FRAME + 1000]);
    mallory.start_send_with_id(direct("bob"), fresh_client_msg_id(), body);
    mallory.expect_fatal_error(&[ErrorCode::FrameTooLarge], TIMEOUT);
    T::stays_closed(&mut mallory);
    assert_pair_still_talks(&mut alice, &mut bob);
    assert!(
        bob.held_seqs(&direct("mallory")).is_empty(),
        "nothing of the oversized frame was stored or delivered"
    );
}

fn requests_over_the_rate_limit_get_rate_limited<T: Way>() {
    const RATE: usize = 10;
    const BURST: usize = 20;
    let net = start::<T>(&[
        &format!("limits.request_rate_per_sec={RATE}"),
        &format!("limits.request_burst={BURST}"),
        // Refusals must not close the connection here.
        "limits.max_errors=100000",
    ]);
    let mut alice = connect::<T>(&net, "alice", "phone");
    let ping = || {
        Body::Ping(pb::Ping {
            nonce: fresh_client_msg_id(),
        })
    };
    let got = alice.burst(3 * BURST, ping);
    assert!(
        !got.refused.is_empty() && got.served <= BURST,
        "a burst of {} pings over a bucket of {BURST} at {RATE}/s: at most {BURST} served, the \
         rest refused; got {} served, {} refused",
        3 * BURST,
        got.served,
        got.refused.len()
    );
    for e in &got.refused {
        assert!(
            e.code == ErrorCode::RateLimited as i32 && !e.fatal && e.retry_after_ms > 0,
            "a request over the rate gets a non-fatal RATE_LIMITED with a retry hint, got {} \
             (fatal {}, retry_after_ms {})",
            code_name(e.code),
            e.fatal,
            e.retry_after_ms
        );
    }
    // After the hint, the connection is served again.
    let wait = got
        .refused
        .iter()
        .map(|e| u64::from(e.retry_after_ms))
        .max()
        .unwrap_or(0)
        .min(3_000);
    std::thread::sleep(Duration::from_millis(wait + 100));
    let again = alice.burst(1, ping);
    assert_eq!(
        (again.served, again.refused.len()),
        (1, 0),
        "after retry_after_ms, a request is served again: {:?}",
        again.refused
    );
}

// ---------------------------------------------------------------------------------------------
// One test per transport and promise
// ---------------------------------------------------------------------------------------------

/// Stamps out, for each `module: Type` transport, a module of tests named for the promises.
macro_rules! promises_over {
    ($($module:ident: $transport:ty),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[test]
            fn a_good_token_logs_in() {
                super::a_good_token_logs_in::<$transport>();
            }

            #[test]
            fn a_bad_token_is_refused_with_a_clear_error() {
                super::a_bad_token_is_refused_with_a_clear_error::<$transport>();
            }

            #[test]
            fn messages_arrive_once_each_in_seq_order_on_every_device() {
                super::messages_arrive_once_each_in_seq_order_on_every_device::<$transport>();
            }

            #[test]
            fn a_retried_send_is_stored_once_and_acked_identically() {
                super::a_retried_send_is_stored_once_and_acked_identically::<$transport>();
            }

            #[test]
            fn an_offline_recipient_catches_up_by_sync_gapless() {
                super::an_offline_recipient_catches_up_by_sync_gapless::<$transport>();
            }

            #[test]
            fn history_pages() {
                super::history_pages::<$transport>();
            }

            #[test]
            fn bad_input_is_refused_and_other_connections_are_unaffected() {
                super::bad_input_is_refused_and_other_connections_are_unaffected::<$transport>();
            }

            #[test]
            fn a_frame_over_max_frame_bytes_gets_frame_too_large() {
                super::a_frame_over_max_frame_bytes_gets_frame_too_large::<$transport>();
            }

            #[test]
            fn requests_over_the_rate_limit_get_rate_limited() {
                super::requests_over_the_rate_limit_get_rate_limited::<$transport>();
            }
        }
    )*};
}

promises_over! {
    tcp: Tcp<TcpStream>,
    ws: Ws<TcpStream>,
    tls: Tcp<TlsStream>,
    wss: Ws<TlsStream>,
    udp: Udp,
}
