//! Arbitrary bytes, in arbitrary chunks, to the TCP framing codec: it must never panic, never
//! hand out a frame over its limit, consume exactly what it hands out, and decode a stream the
//! same however it is cut into reads. Every frame it accepts must survive re-encoding.
//!
//! Input layout: byte 0 picks `max_frame_bytes` (0: the default 64 KiB, else 4 times the
//! byte), byte 1 the number of chunk-length bytes that follow (mod 16); the rest is the stream.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use parley_proto::frame;
use parley_proto::tcp::{FrameCodec, MAX_PREFIX_LEN};

/// Decodes `stream` fed in chunks of the given lengths (the last chunk takes the rest).
/// Returns the raw frames and whether an error stopped decoding.
fn decode(codec: FrameCodec, stream: &[u8], chunk_lens: &[u8]) -> (Vec<Bytes>, bool) {
    let mut codec = codec;
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0usize;
    let mut consumed = 0usize;
    let mut lens = chunk_lens.iter().map(|&l| usize::from(l));
    while fed < stream.len() {
        let len = lens.next().unwrap_or(usize::MAX).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + len]);
        fed += len;
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(
                        frame.len() <= codec.max_frame_bytes(),
                        "frame over the limit"
                    );
                    let taken = before - buf.len();
                    assert!(taken > frame.len() && taken <= frame.len() + MAX_PREFIX_LEN);
                    consumed += taken;
                    frames.push(frame);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "nothing consumed without a frame");
                    break;
                }
                Err(_) => {
                    assert_eq!(buf.len(), before, "nothing consumed on error");
                    return (frames, true);
                }
            }
        }
        assert_eq!(consumed + buf.len(), fed, "every byte is consumed or kept");
    }
    (frames, false)
}

fuzz_target!(|data: &[u8]| {
    let [limit, n_chunks, rest @ ..] = data else {
        return;
    };
    let n_chunks = usize::from(*n_chunks % 16).min(rest.len());
    let (chunk_lens, stream) = rest.split_at(n_chunks);
    let codec = if *limit == 0 {
        FrameCodec::default()
    } else {
        FrameCodec::new(usize::from(*limit) * 4)
    };

    let chunked = decode(codec, stream, chunk_lens);
    let whole = decode(codec, stream, &[]);
    assert_eq!(chunked, whole, "decoding depends on how the stream is cut");

    for raw in chunked.0 {
        let Ok(decoded) = frame::decode(raw) else {
            continue;
        };
        // Re-encoding may grow a frame (prost writes a negative enum as 10 bytes where another
        // encoder may have used 5), so no limit here.
        let unlimited = FrameCodec::new(usize::MAX);
        let mut out = BytesMut::new();
        unlimited.encode(&decoded, &mut out).expect("no limit");
        let again = FrameCodec::new(usize::MAX)
            .decode_frame(&mut out)
            .expect("re-encoded frame decodes")
            .expect("whole");
        assert_eq!(again, decoded);
    }
});
