//! Arbitrary bytes as a batch of the broker's inter-node mail (what cluster nodes send each
//! other over their links): decoding must never panic, and a batch that decodes must encode
//! again and decode to the same mail.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    parley_broker::fuzz::mail_batch(data);
});
