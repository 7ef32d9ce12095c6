//! Codec micro-benchmarks: encode and decode per frame, TCP framing and WebSocket, 100-B and
//! 4-KiB bodies. Target: at least 5 million 100-B frames per second per core each way.
//!
//! Each iteration handles a batch of [`BATCH`] frames, so the figures are per frame with the
//! batch cost amortized, as in the broker, which decodes every frame a read brought in one go.
//! Decode input is rebuilt outside the timed section (WebSocket unmasks in place).

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use parley_bench::{deliver_frame, masked_client_message, send_frame};
use parley_proto::{frame, tcp::FrameCodec, ws};
use std::hint::black_box;

const BATCH: usize = 256;
const BODIES: [(usize, &str); 2] = [(100, "100B"), (4096, "4KiB")];

fn tcp(c: &mut Criterion) {
    let mut g = c.benchmark_group("tcp");
    g.throughput(Throughput::Elements(BATCH as u64));
    let codec = FrameCodec::new(64 * 1024);
    for (size, name) in BODIES {
        let deliver = deliver_frame(size);
        let send = send_frame(size);
        let mut out = BytesMut::with_capacity(BATCH * (size + 128));
        g.bench_function(format!("encode_deliver_{name}"), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH {
                    codec
                        .encode(black_box(&deliver), &mut out)
                        .expect("fits the limit");
                }
                black_box(out.len())
            })
        });
        let mut input = BytesMut::new();
        for _ in 0..BATCH {
            codec.encode(&send, &mut input).expect("fits the limit");
        }
        let input = input.freeze();
        g.bench_function(format!("decode_send_{name}"), |b| {
            let mut codec = FrameCodec::new(64 * 1024);
            b.iter_batched(
                || BytesMut::from(&input[..]),
                |mut buf| {
                    let mut n = 0;
                    while let Some(f) = codec.decode_frame(&mut buf).expect("valid input") {
                        black_box(&f);
                        n += 1;
                    }
                    assert_eq!(n, BATCH);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn websocket(c: &mut Criterion) {
    let mut g = c.benchmark_group("websocket");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (size, name) in BODIES {
        let deliver = deliver_frame(size);
        let mut out = BytesMut::with_capacity(BATCH * (size + 140));
        g.bench_function(format!("encode_deliver_{name}"), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH {
                    let f = black_box(&deliver);
                    ws::frame::encode_data_header(
                        &mut out,
                        ws::frame::OpCode::Binary,
                        frame::encoded_len(f),
                    );
                    frame::encode(f, &mut out);
                }
                black_box(out.len())
            })
        });
        let send = send_frame(size);
        let mut encoded = BytesMut::new();
        frame::encode(&send, &mut encoded);
        let mut input = BytesMut::new();
        for i in 0..BATCH {
            masked_client_message(&encoded, i as u32, &mut input);
        }
        let input: Bytes = input.freeze();
        g.bench_function(format!("decode_send_{name}"), |b| {
            let mut sink = BytesMut::new();
            b.iter_batched(
                || {
                    (
                        BytesMut::from(&input[..]),
                        ws::WsConn::new(ws::WsConfig::default()),
                    )
                },
                |(mut buf, mut conn)| {
                    let mut n = 0;
                    while let Some(ev) = conn.decode(&mut buf, &mut sink).expect("valid input") {
                        let ws::Event::Binary(payload) = ev else {
                            panic!("expected binary messages")
                        };
                        black_box(frame::decode(payload).expect("valid frame"));
                        n += 1;
                    }
                    assert_eq!(n, BATCH);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, tcp, websocket);
criterion_main!(benches);
