//! Property tests of `parley_proto::ws`: untrusted bytes never panic the handshake parser or the
//! frame decoder, and whatever the server encodes, once masked as a client would, decodes back
//! to the same messages however the byte stream is cut.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use parley_proto::ws::{
    ConnState, DEFAULT_MAX_REQUEST_BYTES, Event, FrameHeader, OpCode, WsConfig, WsConn, WsError,
    apply_mask, encode_binary, encode_close, encode_ping, encode_pong, encode_text, parse_request,
};
use proptest::prelude::*;

/// Turns one server frame (unmasked) at the start of `frame` into the client frame a browser
/// would send: mask bit set, `key` inserted, payload masked. Written from RFC 6455 5.2/5.3,
/// independently of the crate's decoder and `apply_mask`.
fn mask_as_client(frame: &[u8], key: [u8; 4]) -> Vec<u8> {
    let len7 = frame[1] & 0x7F;
    assert_eq!(frame[1] & 0x80, 0, "server frames are unmasked");
    let header_len = match len7 {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let mut out = frame[..header_len].to_vec();
    out[1] |= 0x80;
    out.extend_from_slice(&key);
    out.extend(
        frame[header_len..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4]),
    );
    out
}

/// RFC 6455 5.3 as written: byte `i` of the payload is XORed with byte `i mod 4` of the key.
fn mask_bytewise(payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i % 4])
        .collect()
}

/// A message the server can encode, and how a client splits it into frames.
#[derive(Debug, Clone)]
enum Msg {
    Binary(Vec<u8>, Vec<usize>),
    Text(String, Vec<usize>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn msg() -> impl Strategy<Value = Msg> {
    let cuts = || proptest::collection::vec(0usize..2000, 0..4);
    prop_oneof![
        (proptest::collection::vec(any::<u8>(), 0..2000), cuts())
            .prop_map(|(b, c)| Msg::Binary(b, c)),
        (".{0,300}", cuts()).prop_map(|(t, c)| Msg::Text(t, c)),
        proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
        proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Pong),
    ]
}

/// The client frames of `m`: data messages are cut into fragments at `cuts` (any byte
/// position, even inside a UTF-8 character); each frame is built by the server's encoders and
/// then masked.
fn client_frames(m: &Msg, key: [u8; 4]) -> Vec<u8> {
    let mut server_bytes = Vec::new();
    let mut out = BytesMut::new();
    let (data, opcode, cuts): (&[u8], OpCode, &[usize]) = match m {
        Msg::Binary(b, c) => (b, OpCode::Binary, c),
        Msg::Text(t, c) => (t.as_bytes(), OpCode::Text, c),
        Msg::Ping(p) => {
            encode_ping(&mut out, p).unwrap();
            return mask_as_client(&out, key);
        }
        Msg::Pong(p) => {
            encode_pong(&mut out, p).unwrap();
            return mask_as_client(&out, key);
        }
    };
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    if cuts.is_empty() {
        match m {
            Msg::Text(t, _) => encode_text(&mut out, t),
            _ => encode_binary(&mut out, data),
        }
        return mask_as_client(&out, key);
    }
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(data.len());
    let pieces: Vec<&[u8]> = bounds.windows(2).map(|w| &data[w[0]..w[1]]).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let mut frame = BytesMut::new();
        FrameHeader {
            fin: i + 1 == pieces.len(),
            opcode: if i == 0 { opcode } else { OpCode::Continuation },
            mask: None,
            payload_len: piece.len() as u64,
        }
        .encode(&mut frame);
        frame.extend_from_slice(piece);
        server_bytes.extend(mask_as_client(&frame, key));
    }
    server_bytes
}

fn expected_event(m: &Msg) -> Event {
    match m {
        Msg::Binary(b, _) => Event::Binary(Bytes::copy_from_slice(b)),
        Msg::Text(t, _) => Event::Text(Bytes::copy_from_slice(t.as_bytes())),
        Msg::Ping(p) => Event::Ping(Bytes::copy_from_slice(p)),
        Msg::Pong(p) => Event::Pong(Bytes::copy_from_slice(p)),
    }
}

/// What a connection did with a byte stream.
struct Fed {
    events: Vec<Event>,
    error: Option<WsError>,
    conn: WsConn,
    /// The bytes written by the last `decode` call.
    last_out: BytesMut,
}

/// Feeds `stream` to a fresh connection in pieces ending at `cuts`.
fn feed(stream: &[u8], cuts: &[usize]) -> Fed {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.push(stream.len());
    cuts.sort_unstable();
    let mut conn = WsConn::new(WsConfig::default());
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut events = Vec::new();
    let mut fed = 0;
    for cut in cuts {
        input.extend_from_slice(&stream[fed..cut]);
        fed = cut;
        loop {
            let before = out.len();
            let result = conn.decode(&mut input, &mut out);
            let last_out = out.split_off(before);
            match result {
                Ok(Some(e)) => events.push(e),
                Ok(None) => break,
                Err(e) => {
                    return Fed {
                        events,
                        error: Some(e),
                        conn,
                        last_out,
                    };
                }
            }
        }
    }
    Fed {
        events,
        error: None,
        conn,
        last_out: BytesMut::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn handshake_parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), max in 0usize..700) {
        let _ = parse_request(&bytes, max);
    }

    #[test]
    fn handshake_parser_never_panics_on_mutated_requests(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = b"GET /ws?token=a%20b HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: a, b\r\n\
            Authorization: Bearer t\r\n\r\n".to_vec();
        for (at, byte) in flips {
            let len = bytes.len();
            bytes[at % len] = byte;
        }
        let cut = cut % (bytes.len() + 1);
        let result = parse_request(&bytes[..cut], DEFAULT_MAX_REQUEST_BYTES);
        if let Ok(Some(request)) = result {
            prop_assert!(request.consumed <= cut);
        }
    }

    #[test]
    fn query_token_round_trips_through_percent_encoding(token in "\\PC{0,40}") {
        let mut encoded = String::new();
        for b in token.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        let request = format!(
            "GET /ws?x=1&token={encoded} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        let parsed = parse_request(request.as_bytes(), DEFAULT_MAX_REQUEST_BYTES).unwrap().unwrap();
        prop_assert_eq!(parsed.query_token, Some(token));
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes_in_arbitrary_chunks(
        stream in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let fed = feed(&stream, &cuts);
        if let Some(error) = fed.error {
            prop_assert_eq!(fed.conn.state(), ConnState::Closed);
            // A failure writes exactly one close frame, with the error's code.
            let out = &fed.last_out[..];
            prop_assert!(out.len() >= 4 && out[0] == 0x88 && usize::from(out[1]) == out.len() - 2);
            prop_assert_eq!(&out[2..4], &error.close_code().to_be_bytes()[..]);
        }
    }

    #[test]
    fn decoder_never_panics_on_masked_frames_with_arbitrary_headers(
        frames in proptest::collection::vec((any::<u8>(), 0u8..=127, proptest::collection::vec(any::<u8>(), 0..200)), 1..10),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        // Mostly well-formed masked frames with arbitrary first bytes: reaches deeper states
        // (fragments, close codes, UTF-8) than uniformly random bytes.
        let mut stream = Vec::new();
        for (b0, len7, payload) in frames {
            let len = payload.len().min(usize::from(len7).min(125));
            stream.push(b0);
            stream.push(0x80 | len as u8);
            stream.extend_from_slice(&[9, 8, 7, 6]);
            stream.extend_from_slice(&payload[..len]);
        }
        let _ = feed(&stream, &cuts);
    }

    #[test]
    fn server_encoded_messages_masked_by_a_client_decode_to_the_same_messages(
        msgs in proptest::collection::vec(msg(), 1..8),
        key in any::<[u8; 4]>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        close in proptest::option::of((1000u16..=1003, "[a-z ]{0,20}")),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(client_frames(m, key));
        }
        if let Some((code, reason)) = &close {
            let mut out = BytesMut::new();
            encode_close(&mut out, Some(*code), reason).unwrap();
            stream.extend(mask_as_client(&out, key));
        }
        let Fed { events, error, conn, .. } = feed(&stream, &cuts);
        prop_assert_eq!(error, None);
        let mut expected: Vec<Event> = msgs.iter().map(expected_event).collect();
        if let Some((code, reason)) = close {
            expected.push(Event::Close { code: Some(code), reason });
            prop_assert!(conn.is_closed());
        } else {
            prop_assert!(conn.is_open());
        }
        prop_assert_eq!(events, expected);
    }
}

// The default number of cases (256, or `PROPTEST_CASES`): each case checks 2,400 payloads.
proptest! {
    /// `apply_mask` works 8 and 4 bytes at a time; it must equal the byte-wise definition for
    /// every payload length up to 300 (every combination of 8-byte chunks, 4-byte step and
    /// byte tail), wherever the payload starts in its buffer (all 8 alignments of a word), and
    /// for any key, touching nothing outside the payload.
    #[test]
    fn apply_mask_equals_the_bytewise_reference_for_every_length_and_offset(
        key in any::<[u8; 4]>(),
        data in proptest::collection::vec(any::<u8>(), 300 + 8),
    ) {
        for offset in 0..8 {
            for len in 0..300 {
                let mut buf = data.clone();
                apply_mask(&mut buf[offset..offset + len], key);
                prop_assert_eq!(&buf[..offset], &data[..offset]);
                prop_assert_eq!(
                    &buf[offset..offset + len],
                    &mask_bytewise(&data[offset..offset + len], key)[..],
                    "len {} offset {}", len, offset
                );
                prop_assert_eq!(&buf[offset + len..], &data[offset + len..]);
                // Masking is an involution: applying the same key again restores the data.
                apply_mask(&mut buf[offset..offset + len], key);
                prop_assert_eq!(&buf, &data);
            }
        }
    }
}
