//! Interoperability of `parley_proto::ws` (the server side) with tungstenite 0.27 as an
//! independent client, over real loopback TCP.
//!
//! Each test starts a small server thread that uses nothing but our codec (handshake, `WsConn`,
//! encoders) on a `TcpListener` bound to 127.0.0.1:0, connects a tungstenite client to it, and
//! checks what both sides saw. Every socket has read and write timeouts, so no test can hang.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parley_proto::ws::{
    DEFAULT_MAX_REQUEST_BYTES, Event, HandshakeError, OpCode, UpgradeRequest, WsConfig, WsConn,
    WsError, encode_binary, encode_data_header, parse_request,
};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode as TOpCode};
use tungstenite::{Message, WebSocket};

const TIMEOUT: Duration = Duration::from_secs(10);

/// What the test server does with the messages it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Echo every data message back, as the same kind.
    Echo,
    /// Start the close handshake (1001 "bye") on the first data message.
    CloseOnFirstMessage,
}

/// What the test server saw.
#[derive(Debug)]
struct ServerReport {
    request: Result<UpgradeRequest, HandshakeError>,
    events: Vec<Event>,
    error: Option<WsError>,
    closed_cleanly: bool,
}

fn spawn_server(mode: Mode) -> (SocketAddr, JoinHandle<ServerReport>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream, mode)
    });
    (addr, handle)
}

/// Reads once into `input`; `false` on EOF, timeout or error.
fn read_some(stream: &mut TcpStream, input: &mut BytesMut) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            input.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Closes like a careful server: flush, half-close, drain what the client still sends (so the
/// kernel does not answer unread data with a reset that could destroy our close frame), close.
fn finish(mut stream: TcpStream, out: &[u8]) {
    let _ = stream.write_all(out);
    let _ = stream.shutdown(Shutdown::Write);
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut sink = [0u8; 16 * 1024];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

fn serve(mut stream: TcpStream, mode: Mode) -> ServerReport {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut input = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();

    let request = loop {
        match parse_request(&input, DEFAULT_MAX_REQUEST_BYTES) {
            Ok(Some(request)) => break request,
            Ok(None) => {
                if !read_some(&mut stream, &mut input) {
                    panic!("connection ended during the handshake");
                }
            }
            Err(e) => {
                e.write_response(&mut out);
                finish(stream, &out);
                return ServerReport {
                    request: Err(e),
                    events: vec![],
                    error: None,
                    closed_cleanly: false,
                };
            }
        }
    };
    let _ = input.split_to(request.consumed);
    let protocol = request
        .protocols
        .iter()
        .find(|p| *p == "parley.v1")
        .cloned();
    request.write_accept(protocol.as_deref(), &mut out);

    let mut conn = WsConn::new(WsConfig::default());
    let mut events = Vec::new();
    let mut error = None;
    'conn: loop {
        loop {
            match conn.decode(&mut input, &mut out) {
                Ok(Some(event)) => {
                    match (&event, mode) {
                        (Event::Binary(b), Mode::Echo) => encode_binary(&mut out, b),
                        (Event::Text(t), Mode::Echo) => {
                            // A text payload is already valid UTF-8: write it without re-checking.
                            encode_data_header(&mut out, OpCode::Text, t.len());
                            out.extend_from_slice(t);
                        }
                        (Event::Binary(_) | Event::Text(_), Mode::CloseOnFirstMessage) => {
                            conn.close(1001, "bye", &mut out).unwrap();
                        }
                        _ => {}
                    }
                    events.push(event);
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'conn;
                }
            }
        }
        stream.write_all(&out).unwrap();
        out.clear();
        if conn.is_closed() || !read_some(&mut stream, &mut input) {
            break;
        }
    }
    let closed_cleanly = conn.is_closed() && error.is_none();
    finish(stream, &out);
    ServerReport {
        request: Ok(request),
        events,
        error,
        closed_cleanly,
    }
}

type Client = WebSocket<TcpStream>;

fn connect_with(
    addr: SocketAddr,
    configure: impl FnOnce(&mut tungstenite::handshake::client::Request),
) -> Client {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    configure(&mut request);
    let (client, response) = tungstenite::client(request, stream).unwrap();
    assert_eq!(response.status(), 101);
    client
}

fn connect(addr: SocketAddr) -> Client {
    connect_with(addr, |_| {})
}

/// Reads the next message, which must be the server's close frame.
fn read_close(client: &mut Client) -> Option<CloseFrame> {
    match client.read().unwrap() {
        Message::Close(frame) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Drives the client after the close frames crossed until tungstenite reports the clean end.
fn expect_connection_closed(client: &mut Client) {
    for _ in 0..10 {
        match client.read() {
            Err(tungstenite::Error::ConnectionClosed) => return,
            Ok(Message::Close(_)) => continue,
            other => panic!("expected a clean close, got {other:?}"),
        }
    }
    panic!("the connection did not close");
}

fn close_client(mut client: Client) {
    client.close(None).unwrap();
    expect_connection_closed(&mut client);
}

#[test]
fn handshake_succeeds_and_tungstenite_accepts_our_accept_key() {
    let (addr, server) = spawn_server(Mode::Echo);
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut request = format!("ws://{addr}/ws?room=7&token=abc%2Edef")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("Authorization", "Bearer jwt.jwt.jwt".parse().unwrap());
    headers.insert("Sec-WebSocket-Protocol", "chat, parley.v1".parse().unwrap());
    // tungstenite checks the Sec-WebSocket-Accept value and the echoed subprotocol.
    let (client, response) = tungstenite::client(request, stream).unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["Sec-WebSocket-Protocol"], "parley.v1");
    close_client(client);

    let report = server.join().unwrap();
    let request = report.request.unwrap();
    assert_eq!(request.path, "/ws");
    assert_eq!(request.query_token.as_deref(), Some("abc.def"));
    assert_eq!(request.bearer_token.as_deref(), Some("jwt.jwt.jwt"));
    assert_eq!(request.protocols, ["chat", "parley.v1"]);
    assert!(report.closed_cleanly);
}

#[test]
fn binary_messages_of_boundary_sizes_echo_intact() {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut client = connect(addr);
    for len in [0usize, 1, 125, 126, 127, 65_535, 65_536] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
        client.send(Message::binary(payload.clone())).unwrap();
        assert_eq!(
            client.read().unwrap(),
            Message::binary(payload),
            "len {len}"
        );
    }
    close_client(client);
    assert!(server.join().unwrap().closed_cleanly);
}

/// Text of exactly `len` bytes, mostly multi-byte characters.
fn text_of_len(len: usize) -> String {
    let mut text = String::with_capacity(len);
    for c in "héllo, 世界 🎉 ".chars().cycle() {
        if text.len() + c.len_utf8() > len {
            break;
        }
        text.push(c);
    }
    while text.len() < len {
        text.push('.');
    }
    text
}

#[test]
fn text_messages_of_boundary_sizes_echo_intact() {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut client = connect(addr);
    for len in [0usize, 125, 126, 65_535, 65_536] {
        let text = text_of_len(len);
        client.send(Message::text(text.clone())).unwrap();
        let echoed = client.read().unwrap();
        assert!(echoed == Message::text(text), "{len} bytes");
    }
    close_client(client);
    assert!(server.join().unwrap().closed_cleanly);
}

#[test]
fn fragmented_messages_with_a_ping_between_fragments_are_reassembled() {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut client = connect(addr);
    let text = "κόσμε".as_bytes();
    // Split inside the multi-byte character 'ό'.
    let frames = [
        Frame::message(
            Bytes::copy_from_slice(&text[..3]),
            TOpCode::Data(Data::Text),
            false,
        ),
        Frame::ping(Bytes::from_static(b"mid")),
        Frame::message(
            Bytes::copy_from_slice(&text[3..7]),
            TOpCode::Data(Data::Continue),
            false,
        ),
        Frame::message(
            Bytes::copy_from_slice(&text[7..]),
            TOpCode::Data(Data::Continue),
            true,
        ),
    ];
    for frame in frames {
        client.send(Message::Frame(frame)).unwrap();
    }
    assert_eq!(
        client.read().unwrap(),
        Message::Pong(Bytes::from_static(b"mid"))
    );
    assert_eq!(client.read().unwrap(), Message::text("κόσμε"));
    close_client(client);
    let report = server.join().unwrap();
    assert_eq!(report.events[0], Event::Ping(Bytes::from_static(b"mid")));
    assert_eq!(report.events[1], Event::Text(Bytes::copy_from_slice(text)));
}

#[test]
fn ping_gets_pong_with_the_same_payload() {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut client = connect(addr);
    client
        .send(Message::Ping(Bytes::from(vec![0xA5; 125])))
        .unwrap();
    assert_eq!(
        client.read().unwrap(),
        Message::Pong(Bytes::from(vec![0xA5; 125]))
    );
    close_client(client);
    assert!(server.join().unwrap().closed_cleanly);
}

#[test]
fn close_handshake_started_by_the_client_completes_cleanly() {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut client = connect(addr);
    client
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))
        .unwrap();
    expect_connection_closed(&mut client);
    drop(client);
    let report = server.join().unwrap();
    assert_eq!(
        report.events,
        vec![Event::Close {
            code: Some(1000),
            reason: "done".to_owned()
        }]
    );
    assert!(report.closed_cleanly);
}

#[test]
fn close_handshake_started_by_the_server_completes_cleanly() {
    let (addr, server) = spawn_server(Mode::CloseOnFirstMessage);
    let mut client = connect(addr);
    client.send(Message::text("please leave")).unwrap();
    let frame = read_close(&mut client).unwrap();
    assert_eq!(frame.code, CloseCode::Away);
    assert_eq!(frame.reason, "bye");
    // tungstenite queued its reply; reading drives it out and sees the server end the TCP.
    expect_connection_closed(&mut client);
    drop(client);
    let report = server.join().unwrap();
    assert!(matches!(
        report.events.last(),
        Some(Event::Close {
            code: Some(1001),
            ..
        })
    ));
    assert!(report.closed_cleanly);
}

/// Completes a handshake, then writes `raw` straight to the socket (bypassing tungstenite's
/// framing) and returns the code of the server's close frame.
fn close_code_after_raw_bytes(raw: &[u8]) -> (CloseCode, ServerReport) {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut client = connect(addr);
    client.get_mut().write_all(raw).unwrap();
    let frame = read_close(&mut client).unwrap();
    drop(client);
    (frame.code, server.join().unwrap())
}

/// A masked client frame built by hand.
fn raw_client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let key = [1u8, 2, 3, 4];
    assert!(payload.len() < 126);
    let mut v = vec![first_byte, 0x80 | payload.len() as u8];
    v.extend_from_slice(&key);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    v
}

#[test]
fn unmasked_frame_from_the_client_gets_close_1002() {
    let (code, report) = close_code_after_raw_bytes(&[0x82, 0x03, 1, 2, 3]);
    assert_eq!(code, CloseCode::Protocol);
    assert_eq!(report.error, Some(WsError::UnmaskedFrame));
}

#[test]
fn reserved_opcode_from_the_client_gets_close_1002() {
    let (code, report) = close_code_after_raw_bytes(&raw_client_frame(0x83, b"x"));
    assert_eq!(code, CloseCode::Protocol);
    assert_eq!(report.error, Some(WsError::ReservedOpcode(3)));
}

#[test]
fn continuation_without_a_message_gets_close_1002() {
    let (code, report) = close_code_after_raw_bytes(&raw_client_frame(0x80, b"x"));
    assert_eq!(code, CloseCode::Protocol);
    assert_eq!(report.error, Some(WsError::UnexpectedContinuation));
}

#[test]
fn invalid_utf8_text_sent_by_tungstenite_gets_close_1007() {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut client = connect(addr);
    // tungstenite does not validate raw frames it sends: a text frame with invalid UTF-8.
    let bad = Frame::message(
        Bytes::from_static(&[b'o', b'k', 0xFF]),
        TOpCode::Data(Data::Text),
        true,
    );
    client.send(Message::Frame(bad)).unwrap();
    let frame = read_close(&mut client).unwrap();
    assert_eq!(frame.code, CloseCode::Invalid);
    drop(client);
    assert_eq!(server.join().unwrap().error, Some(WsError::InvalidUtf8));
}

#[test]
fn oversized_message_sent_by_tungstenite_gets_close_1009() {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut client = connect(addr);
    let max = WsConfig::default().max_message_bytes;
    client.send(Message::binary(vec![0u8; max + 1])).unwrap();
    let frame = read_close(&mut client).unwrap();
    assert_eq!(frame.code, CloseCode::Size);
    drop(client);
    let report = server.join().unwrap();
    assert!(matches!(
        report.error,
        Some(WsError::MessageTooLarge { .. })
    ));
}

#[test]
fn handshake_with_another_version_is_refused_with_426() {
    let (addr, server) = spawn_server(Mode::Echo);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
        )
        .unwrap();
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{e}"),
    }
    let response = String::from_utf8(response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{response}"
    );
    assert!(response.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    drop(stream);
    assert_eq!(
        server.join().unwrap().request,
        Err(HandshakeError::UnsupportedVersion)
    );
}
