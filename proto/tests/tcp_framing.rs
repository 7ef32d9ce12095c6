//! Properties of `parley_proto::tcp`: frames survive the stream framing however the stream is
//! cut into reads, the framing is protobuf's standard length-delimited format, and no byte
//! stream makes the codec panic or hand out more than its limit.

mod strategies;

use bytes::{BufMut, BytesMut};
use parley_proto::pb;
use parley_proto::tcp::{FrameCodec, TcpFrameError};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

/// Feeds `stream` to a fresh codec in chunks cut at `cuts` and decodes everything it can.
/// Returns the raw frames and whether an error stopped decoding. (Which error may differ: an
/// incomplete prefix can already prove "too large" where the complete one is a bad varint.)
fn decode_in_chunks(
    max_frame_bytes: usize,
    stream: &[u8],
    cuts: &[Index],
) -> (Vec<bytes::Bytes>, bool) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    let mut codec = FrameCodec::new(max_frame_bytes);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut from = 0;
    for to in points {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn frames_survive_framing_with_arbitrary_split_points(
        frames in vec(strategies::frame(), 1..8),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        let codec = FrameCodec::default();
        let mut stream = BytesMut::new();
        for f in &frames {
            codec.encode(f, &mut stream)?;
        }
        let (raw, failed) = decode_in_chunks(codec.max_frame_bytes(), &stream, &cuts);
        prop_assert!(!failed);
        let decoded = raw
            .into_iter()
            .map(parley_proto::frame::decode)
            .collect::<Result<Vec<_>, _>>()?;
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn codec_output_is_what_prost_length_delimited_decoding_reads(frame in strategies::frame()) {
        let mut stream = BytesMut::new();
        FrameCodec::default().encode(&frame, &mut stream)?;
        let theirs = <pb::Frame as prost::Message>::decode_length_delimited(stream.freeze())?;
        prop_assert_eq!(theirs, frame);
    }

    #[test]
    fn prost_length_delimited_output_is_what_the_codec_reads(frame in strategies::frame()) {
        let mut stream = BytesMut::from(&prost::Message::encode_length_delimited_to_vec(&frame)[..]);
        let ours = FrameCodec::default().decode_frame(&mut stream)?;
        prop_assert_eq!(ours, Some(frame));
        prop_assert!(stream.is_empty());
    }

    #[test]
    fn arbitrary_stream_decodes_the_same_in_chunks_as_whole(
        stream in vec(any::<u8>(), 0..1024),
        cuts in vec(any::<Index>(), 0..16),
        max in 0usize..300,
    ) {
        let whole = decode_in_chunks(max, &stream, &[]);
        let chunked = decode_in_chunks(max, &stream, &cuts);
        prop_assert_eq!(chunked, whole);
    }

    #[test]
    fn codec_never_returns_a_frame_over_its_limit(
        stream in vec(any::<u8>(), 0..1024),
        max in 0usize..300,
    ) {
        let (frames, _) = decode_in_chunks(max, &stream, &[]);
        prop_assert!(frames.iter().all(|f| f.len() <= max));
    }

    #[test]
    fn decode_frame_never_panics_on_arbitrary_bytes(stream in vec(any::<u8>(), 0..1024)) {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&stream[..]);
        while let Ok(Some(_)) | Err(TcpFrameError::Frame(_)) = codec.decode_frame(&mut buf) {}
    }

    #[test]
    fn any_prefix_over_the_limit_is_rejected_without_its_payload(
        len in 65_537u32..,
    ) {
        let mut buf = BytesMut::new();
        // Minimal LEB128, as every protobuf library writes it.
        let mut v = len;
        while v >= 0x80 {
            buf.put_u8((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        buf.put_u8(v as u8);
        let result = FrameCodec::new(65_536).decode(&mut buf);
        let rejected = matches!(result, Err(TcpFrameError::TooLarge { .. }));
        prop_assert!(rejected);
    }
}
