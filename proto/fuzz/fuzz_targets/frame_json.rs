//! Arbitrary bytes as a frame's proto3 JSON form and as its protobuf encoding: decoding must
//! never panic, and whatever decodes must survive a round trip through both forms.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use parley_proto::{frame, pb};

/// `frame` through protobuf and (when representable) JSON comes back equal.
fn round_trips(decoded: &pb::Frame) {
    let mut bytes = BytesMut::new();
    frame::encode(decoded, &mut bytes);
    assert_eq!(bytes.len(), frame::encoded_len(decoded));
    let again = frame::decode(bytes.freeze()).expect("an encoded frame decodes");
    assert_eq!(&again, decoded);

    // Frames from protobuf may hold enum values the JSON mapping cannot name: then to_json
    // refuses, cleanly.
    if let Ok(json) = frame::to_json(decoded) {
        let again = frame::from_json(json.as_bytes()).expect("our JSON parses");
        assert_eq!(&again, decoded);
        let mut into = Vec::new();
        frame::to_json_into(decoded, &mut into).expect("same as to_json");
        assert_eq!(into, json.as_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = frame::from_json(data) {
        assert!(decoded.body.is_some());
        assert!(
            frame::to_json(&decoded).is_ok(),
            "a frame read from JSON is representable as JSON"
        );
        round_trips(&decoded);
    }
    if let Ok(decoded) = frame::decode(Bytes::copy_from_slice(data)) {
        assert_ne!(frame::body_name(&decoded), "none");
        round_trips(&decoded);
    }
});
