//! Properties of `parley_proto::frame`: every frame survives protobuf and JSON, and no input,
//! however malformed, makes a decoder panic.

mod strategies;

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use parley_proto::frame::{self, FrameError};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

fn encoded(frame: &parley_proto::pb::Frame) -> Bytes {
    let mut out = BytesMut::new();
    frame::encode(frame, &mut out);
    out.freeze()
}

#[test]
fn strategy_generates_every_body_case_of_the_schema() {
    let cases: BTreeSet<String> = strategies::schema_body_cases().into_iter().collect();
    assert_eq!(cases.len(), 28, "parley.proto's Frame.body, as parsed");
    let mut runner = TestRunner::deterministic();
    let mut seen = BTreeSet::new();
    for _ in 0..3000 {
        let frame = strategies::frame()
            .new_tree(&mut runner)
            .expect("strategy")
            .current();
        seen.insert(frame::body_name(&frame).to_string());
    }
    assert_eq!(seen, cases);
}

/// A history request with `after_seq` as given.
fn history_after(after_seq: Option<u64>) -> parley_proto::pb::Frame {
    use parley_proto::pb;
    pb::Frame {
        request_id: 1,
        body: Some(pb::frame::Body::HistoryRequest(pb::HistoryRequest {
            conversation: None,
            before_seq: 0,
            after_seq,
            limit: 0,
        })),
    }
}

#[test]
fn history_after_seq_zero_is_present_in_both_forms_and_absent_stays_absent() {
    // Present with 0: on the wire as field 3 with value 0 (the same varint field as before
    // `optional`), in JSON as "afterSeq": "0"; both decode back to `Some(0)`.
    let zero = history_after(Some(0));
    let bytes = encoded(&zero);
    assert!(
        bytes.windows(2).any(|w| w == [0x18, 0x00]),
        "field 3, varint 0, is written: {bytes:?}"
    );
    assert_eq!(frame::decode(bytes).expect("decodes"), zero);
    let json = frame::to_json(&zero).expect("json");
    assert!(json.contains(r#""afterSeq":"0""#), "{json}");
    assert_eq!(frame::from_json(json.as_bytes()).expect("from json"), zero);

    let absent = history_after(None);
    let json = frame::to_json(&absent).expect("json");
    assert!(!json.contains("afterSeq"), "{json}");
    assert_eq!(
        frame::from_json(json.as_bytes()).expect("from json"),
        absent
    );
    assert_eq!(frame::decode(encoded(&absent)).expect("decodes"), absent);
    let by_hand = br#"{"requestId":"1","historyRequest":{"afterSeq":0}}"#;
    assert_eq!(
        frame::from_json(by_hand).expect("a number is read too"),
        zero
    );
}

proptest! {
    #[test]
    fn protobuf_round_trip_preserves_every_frame(frame in strategies::frame()) {
        prop_assert_eq!(frame::decode(encoded(&frame))?, frame);
    }

    #[test]
    fn encoded_len_is_the_length_encode_writes(frame in strategies::frame()) {
        prop_assert_eq!(encoded(&frame).len(), frame::encoded_len(&frame));
    }

    #[test]
    fn json_round_trip_preserves_every_frame(frame in strategies::frame()) {
        let json = frame::to_json(&frame)?;
        prop_assert_eq!(frame::from_json(json.as_bytes())?, frame);
    }

    #[test]
    fn to_json_into_writes_what_to_json_returns(frame in strategies::frame()) {
        let mut out = Vec::new();
        frame::to_json_into(&frame, &mut out)?;
        prop_assert_eq!(out, frame::to_json(&frame)?.into_bytes());
    }

    #[test]
    fn body_name_is_a_body_case_of_the_schema(frame in strategies::frame()) {
        let name = frame::body_name(&frame);
        prop_assert!(strategies::schema_body_cases().iter().any(|c| c == name), "{}", name);
    }

    #[test]
    fn arbitrary_bytes_never_panic_decode(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::decode(Bytes::from(bytes));
    }

    #[test]
    fn arbitrary_bytes_never_panic_from_json(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::from_json(&bytes);
    }

    #[test]
    fn damaged_protobuf_fails_cleanly_or_decodes_to_a_re_encodable_frame(
        frame in strategies::frame(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encoded(&frame).to_vec();
        prop_assume!(!bytes.is_empty());
        let i = at.index(bytes.len());
        bytes[i] = byte;
        bytes.truncate(cut.index(bytes.len() + 1));
        if let Ok(decoded) = frame::decode(Bytes::from(bytes)) {
            prop_assert_eq!(frame::decode(encoded(&decoded))?, decoded);
        }
    }

    #[test]
    fn damaged_json_fails_cleanly_or_decodes_to_a_json_representable_frame(
        frame in strategies::frame(),
        at in any::<prop::sample::Index>(),
        byte in prop::sample::select(b"{}[]\":,0123456789-.eEtrufalsn \\".to_vec()),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut json = frame::to_json(&frame)?.into_bytes();
        let i = at.index(json.len());
        json[i] = byte;
        json.truncate(cut.index(json.len() + 1));
        match frame::from_json(&json) {
            Ok(decoded) => {
                let again = frame::to_json(&decoded)?;
                prop_assert_eq!(frame::from_json(again.as_bytes())?, decoded);
            }
            Err(FrameError::Json { .. } | FrameError::MissingBody) => {}
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}
