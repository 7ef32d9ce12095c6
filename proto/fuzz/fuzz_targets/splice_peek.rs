//! Arbitrary bytes as a stored message for the start-up peek: it must never panic, and whatever
//! prost decodes as a message, the peek reads the same fields of.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_proto::{pb, splice};
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let peeked = splice::peek_message(data);
    if let (Ok(m), Some(h)) = (pb::Message::decode(data), peeked) {
        assert_eq!(h.seq, m.seq);
        assert_eq!(h.msg_id, m.msg_id);
        assert_eq!(h.client_msg_id, m.client_msg_id);
        assert_eq!(h.from_user, m.from_user);
        assert_eq!(h.from_device, m.from_device);
        assert_eq!(h.server_time, m.server_time);
    }
});
