//! Arbitrary bytes to the WebSocket handshake parser: it must never panic, and whatever it
//! returns must be consistent (a request it accepts lies within the input; every response it
//! writes is well-formed HTTP).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use parley_proto::ws::{DEFAULT_MAX_REQUEST_BYTES, parse_request};

fuzz_target!(|data: &[u8]| {
    let mut out = BytesMut::new();
    match parse_request(data, DEFAULT_MAX_REQUEST_BYTES) {
        Ok(Some(request)) => {
            assert!(request.consumed <= data.len());
            assert!(request.consumed <= DEFAULT_MAX_REQUEST_BYTES);
            // Every prefix that ends before the blank line is incomplete or already invalid,
            // never a different valid request.
            if let Some(prefix) = data.get(..request.consumed.saturating_sub(1)) {
                assert!(!matches!(
                    parse_request(prefix, DEFAULT_MAX_REQUEST_BYTES),
                    Ok(Some(_))
                ));
            }
            let protocol = request.protocols.first().cloned();
            request.write_accept(protocol.as_deref(), &mut out);
            assert!(out.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(out.ends_with(b"\r\n\r\n"));
        }
        Ok(None) => assert!(data.len() < DEFAULT_MAX_REQUEST_BYTES),
        Err(error) => {
            error.write_response(&mut out);
            assert!(out.starts_with(format!("HTTP/1.1 {} ", error.status()).as_bytes()));
        }
    }
});
