//! `net::Conn` and `transport::Transport` plugged together under a minimal mio loop, talked to by
//! real clients over loopback: a raw TCP client and tungstenite. The loop here is a test double,
//! not the shard loop; it shows how the two pieces fit (read, decode, encode, flush, close).
//!
//! The test server answers a `Ping` with a `Pong` of the same nonce, greets a WebSocket upgrade
//! with a `LoginResult` naming the token it carried (a stand-in for a login), answers a `Send`
//! with `Error{SHUTTING_DOWN, fatal}` and a close (a stand-in for a server-initiated close), and
//! answers a recoverable bad frame with a non-fatal `Error`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use parley_broker::net::{self, CloseProgress, Conn, ReadStatus};
use parley_broker::transport::{Inbound, Transport, TransportLimits};
use parley_proto::frame::{self, WireError};
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_proto::tcp::FrameCodec;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

const TIMEOUT: Duration = Duration::from_secs(5);
const BUDGET: usize = 64 * 1024;

/// One served connection.
struct Served {
    conn: Conn,
    transport: Transport,
    closing: bool,
}

/// The test server: a TCP and a WebSocket listener, served by one thread until dropped.
struct Server {
    tcp: SocketAddr,
    ws: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

fn start_server() -> Server {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let tcp = net::listener::bind(loopback, true).unwrap();
    let ws = net::listener::bind(loopback, true).unwrap();
    let (tcp_addr, ws_addr) = (tcp.local_addr().unwrap(), ws.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || serve(tcp, ws, &stop))
    };
    Server {
        tcp: tcp_addr,
        ws: ws_addr,
        stop,
        thread: Some(thread),
    }
}

fn serve(mut tcp: TcpListener, mut ws: TcpListener, stop: &AtomicBool) {
    let mut poll = Poll::new().unwrap();
    poll.registry()
        .register(&mut tcp, Token(0), Interest::READABLE)
        .unwrap();
    poll.registry()
        .register(&mut ws, Token(1), Interest::READABLE)
        .unwrap();
    let mut served: Vec<Option<Served>> = Vec::new();
    let mut events = Events::with_capacity(64);
    let limits = TransportLimits::new(1024);
    while !stop.load(Ordering::Relaxed) {
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
        // A test loop may serve everything every turn; the shard loop serves what is ready.
        for (listener, make) in [
            (&tcp, Transport::tcp as fn(TransportLimits) -> Transport),
            (&ws, Transport::websocket),
        ] {
            while let Some((mut conn, _)) = net::listener::accept(listener).unwrap() {
                let token = Token(served.len() + 2);
                poll.registry()
                    .register(&mut conn, token, Interest::READABLE | Interest::WRITABLE)
                    .unwrap();
                served.push(Some(Served {
                    conn,
                    transport: make(limits),
                    closing: false,
                }));
            }
        }
        for slot in &mut served {
            let Some(s) = slot else { continue };
            if !turn(s) {
                poll.registry().deregister(&mut s.conn).unwrap();
                *slot = None;
            }
        }
    }
}

/// Serves one connection for one turn; false when it is over.
fn turn(s: &mut Served) -> bool {
    if !s.closing {
        let status = match s.conn.read(&mut [0; net::READ_MAX], BUDGET) {
            Ok(outcome) => outcome.status,
            Err(_) => return false,
        };
        loop {
            let (inbuf, out) = s.conn.buffers();
            match s.transport.decode(inbuf, out) {
                Ok(Some(Inbound::Frame(frame))) => answer(s, &frame),
                Ok(Some(Inbound::Upgraded { token, .. })) => {
                    let greeting = pb::Frame {
                        request_id: 0,
                        body: Some(Body::LoginResult(pb::LoginResult {
                            user: token.unwrap_or_default(),
                            ..pb::LoginResult::default()
                        })),
                    };
                    s.transport.encode(&greeting, s.conn.out_buf()).unwrap();
                }
                Ok(Some(Inbound::Liveness)) => {}
                Ok(Some(Inbound::PeerClosed { .. })) => s.closing = true,
                Ok(None) => break,
                Err(e) if e.is_fatal() => s.closing = true,
                Err(e) => s
                    .transport
                    .encode(&e.to_error_frame(0, false), s.conn.out_buf())
                    .unwrap(),
            }
            if s.closing {
                break;
            }
        }
        if status == ReadStatus::Eof || s.transport.is_closed() {
            s.closing = true;
        }
        if !s.closing && s.conn.flush().is_err() {
            return false;
        }
    }
    if s.closing {
        return matches!(
            s.conn.drive_close(BUDGET),
            Ok(CloseProgress::Pending | CloseProgress::PendingMore)
        );
    }
    s.conn.shrink_buffers();
    true
}

fn answer(s: &mut Served, frame: &pb::Frame) {
    match &frame.body {
        Some(Body::Ping(ping)) => {
            let pong = pb::Frame {
                request_id: frame.request_id,
                body: Some(Body::Pong(pb::Pong {
                    nonce: ping.nonce,
                    time: 0,
                })),
            };
            s.transport.encode(&pong, s.conn.out_buf()).unwrap();
        }
        Some(Body::Send(_)) => {
            let error = pb::Frame {
                request_id: 0,
                body: Some(Body::Error(pb::Error {
                    code: pb::ErrorCode::ShuttingDown as i32,
                    fatal: true,
                    ..pb::Error::default()
                })),
            };
            s.transport.encode(&error, s.conn.out_buf()).unwrap();
            s.transport
                .close(pb::ErrorCode::ShuttingDown, "", s.conn.out_buf());
            s.closing = true;
        }
        _ => {}
    }
}

fn ping(nonce: u64) -> pb::Frame {
    pb::Frame {
        request_id: nonce,
        body: Some(Body::Ping(pb::Ping { nonce })),
    }
}

fn pong_nonce(frame: &pb::Frame) -> u64 {
    match &frame.body {
        Some(Body::Pong(pong)) => pong.nonce,
        other => panic!("expected a pong, got {other:?}"),
    }
}

fn error_code(frame: &pb::Frame) -> (i32, bool) {
    match &frame.body {
        Some(Body::Error(e)) => (e.code, e.fatal),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn tcp_client(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// Reads one length-delimited frame from a blocking TCP client.
fn read_tcp_frame(client: &mut TcpStream, pending: &mut BytesMut) -> pb::Frame {
    let mut codec = FrameCodec::default();
    loop {
        if let Some(frame) = codec.decode_frame(pending).unwrap() {
            return frame;
        }
        let mut chunk = [0; 4096];
        let n = client.read(&mut chunk).unwrap();
        assert!(n > 0, "EOF before a whole frame");
        pending.extend_from_slice(&chunk[..n]);
    }
}

fn ws_client(addr: SocketAddr, query: &str) -> WebSocket<TcpStream> {
    let request = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .unwrap();
    let (client, response) = tungstenite::client(request, tcp_client(addr)).unwrap();
    assert_eq!(response.status(), 101);
    client
}

fn binary_of(frame: &pb::Frame) -> Message {
    let mut bytes = BytesMut::new();
    frame::encode(frame, &mut bytes);
    Message::binary(bytes.freeze())
}

fn frame_of(message: Message) -> pb::Frame {
    match message {
        Message::Binary(bytes) => frame::decode(bytes).unwrap(),
        Message::Text(text) => frame::from_json(text.as_bytes()).unwrap(),
        other => panic!("expected a data message, got {other:?}"),
    }
}

#[test]
fn tcp_client_frames_sent_in_one_write_are_each_answered() {
    let server = start_server();
    let mut client = tcp_client(server.tcp);
    let mut bytes = BytesMut::new();
    for nonce in 1..=20 {
        FrameCodec::default()
            .encode(&ping(nonce), &mut bytes)
            .unwrap();
    }
    client.write_all(&bytes).unwrap();
    let mut pending = BytesMut::new();
    for nonce in 1..=20 {
        assert_eq!(
            pong_nonce(&read_tcp_frame(&mut client, &mut pending)),
            nonce
        );
    }
}

#[test]
fn tcp_oversized_frame_gets_a_fatal_error_then_a_clean_eof() {
    let server = start_server();
    let mut client = tcp_client(server.tcp);
    // A prefix announcing 1 MiB (the server's limit is 1 KiB), then bytes that stay unread.
    client.write_all(&[0x80, 0x80, 0x40]).unwrap();
    client.write_all(&[0; 10_000]).unwrap();
    let mut pending = BytesMut::new();
    let answer = read_tcp_frame(&mut client, &mut pending);
    assert_eq!(
        error_code(&answer),
        (pb::ErrorCode::FrameTooLarge as i32, true)
    );
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .expect("EOF after the error frame, not a reset");
    assert!(rest.is_empty() && pending.is_empty());
}

#[test]
fn ws_upgrade_carries_the_token_and_binary_frames_are_answered_in_binary() {
    let server = start_server();
    let mut client = ws_client(server.ws, "?token=tok-1");
    let greeting = frame_of(client.read().unwrap());
    assert!(matches!(greeting.body, Some(Body::LoginResult(r)) if r.user == "tok-1"));
    client.send(binary_of(&ping(7))).unwrap();
    let reply = client.read().unwrap();
    assert!(reply.is_binary());
    assert_eq!(pong_nonce(&frame_of(reply)), 7);
}

#[test]
fn ws_text_frames_are_answered_in_json_text() {
    let server = start_server();
    let mut client = ws_client(server.ws, "");
    client.read().unwrap(); // the greeting
    client
        .send(Message::text(r#"{"requestId":"8","ping":{"nonce":"8"}}"#))
        .unwrap();
    let reply = client.read().unwrap();
    assert!(reply.is_text());
    assert_eq!(pong_nonce(&frame_of(reply)), 8);
}

#[test]
fn ws_bad_json_gets_a_non_fatal_error_and_the_connection_goes_on() {
    let server = start_server();
    let mut client = ws_client(server.ws, "");
    client.read().unwrap(); // the greeting
    client.send(Message::text("{oops")).unwrap();
    assert_eq!(
        error_code(&frame_of(client.read().unwrap())),
        (pb::ErrorCode::BadFrame as i32, false)
    );
    client.send(binary_of(&ping(9))).unwrap();
    assert_eq!(pong_nonce(&frame_of(client.read().unwrap())), 9);
}

#[test]
fn ws_server_close_sends_the_error_then_close_1001_and_ends_cleanly() {
    let server = start_server();
    let mut client = ws_client(server.ws, "");
    client.read().unwrap(); // the greeting
    let send = pb::Frame {
        request_id: 1,
        body: Some(Body::Send(pb::Send {
            client_msg_id: 1,
            body: Bytes::from_static(b"hi"),
            ..pb::Send::default()
        })),
    };
    client.send(binary_of(&send)).unwrap();
    assert_eq!(
        error_code(&frame_of(client.read().unwrap())),
        (pb::ErrorCode::ShuttingDown as i32, true)
    );
    match client.read().unwrap() {
        Message::Close(Some(close)) => {
            assert_eq!(close.code, CloseCode::Away);
            assert_eq!(close.reason.as_str(), "SHUTTING_DOWN");
        }
        other => panic!("expected a close, got {other:?}"),
    }
    // tungstenite answers the close; the server then sees EOF and the socket ends without reset.
    loop {
        match client.read() {
            Err(tungstenite::Error::ConnectionClosed) => break,
            Ok(Message::Close(_)) => {}
            other => panic!("expected a clean end, got {other:?}"),
        }
    }
}

#[test]
fn ws_client_close_is_echoed_and_the_connection_ends_cleanly() {
    let server = start_server();
    let mut client = ws_client(server.ws, "");
    client.read().unwrap(); // the greeting
    client.close(None).unwrap();
    loop {
        match client.read() {
            Err(tungstenite::Error::ConnectionClosed) => break,
            Ok(Message::Close(_)) => {}
            other => panic!("expected a clean end, got {other:?}"),
        }
    }
}
