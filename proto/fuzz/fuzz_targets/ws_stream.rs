//! Arbitrary bytes, in arbitrary chunks, to the WebSocket connection decoder: it must never
//! panic, must never grow its output faster than its input, and must stop for good after an
//! error or the close handshake.
//!
//! Input layout: byte 0 picks the message limit (small limits reach the 1009 path), byte 1 the
//! number of chunk-length bytes that follow, byte 2 whether the server starts a close
//! handshake midway; the rest is the client's byte stream.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use parley_proto::ws::{ConnState, WsConfig, WsConn};

fuzz_target!(|data: &[u8]| {
    let [limit, n_chunks, server_close, rest @ ..] = data else {
        return;
    };
    let n_chunks = usize::from(*n_chunks % 16).min(rest.len());
    let (chunk_lens, stream) = rest.split_at(n_chunks);
    let max_message_bytes = if *limit == 0 {
        64 * 1024
    } else {
        usize::from(*limit) * 4
    };
    let mut conn = WsConn::new(WsConfig { max_message_bytes });
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut fed = 0usize;
    let mut lens = chunk_lens
        .iter()
        .map(|&l| usize::from(l))
        .chain(std::iter::repeat(usize::MAX));
    let mut chunk_index = 0usize;
    while fed < stream.len() {
        let len = lens.next().unwrap_or(usize::MAX).min(stream.len() - fed);
        input.extend_from_slice(&stream[fed..fed + len]);
        fed += len;
        chunk_index += 1;
        if *server_close != 0 && chunk_index == usize::from(*server_close % 8) {
            let _ = conn.close(1001, "going away", &mut out);
        }
        loop {
            let before_in = input.len();
            let before_out = out.len();
            match conn.decode(&mut input, &mut out) {
                Ok(Some(_)) => {
                    let read = before_in - input.len();
                    assert!(
                        out.len() - before_out <= read,
                        "output grew faster than input"
                    );
                }
                Ok(None) => {
                    if conn.is_closed() {
                        assert_eq!(input.len(), before_in, "nothing is read once closed");
                        assert_eq!(out.len(), before_out, "nothing is written once closed");
                    }
                    break;
                }
                Err(error) => {
                    assert_eq!(conn.state(), ConnState::Closed);
                    assert!(matches!(error.close_code(), 1002 | 1007 | 1009));
                    // Terminal: later bytes change nothing.
                    let written = out.len();
                    assert!(matches!(conn.decode(&mut input, &mut out), Ok(None)));
                    assert_eq!(out.len(), written);
                    return;
                }
            }
        }
    }
});
