//! Log micro-benchmarks (storage/ on the mmap backend unless named otherwise).
//!
//! * `append_never/*`: appends of 100-B and 4-KiB records under `never` (no flush), against a
//!   plain `memcpy` of the same sizes into a pre-touched buffer (`memcpy/*`), and the same appends
//!   on the `pwrite` backend, so the mmap choice is measured.
//! * `append_always/batch_N`: group commit with a fixed batch: N appends, then one flush (msync),
//!   so records per flush is N; figures are durable records per second.
//! * `append_always/pipelined_*`: group commit as the broker runs it: the writer keeps appending
//!   while a flusher thread syncs the previous batch (a `SyncTicket`); records per flush are
//!   whatever accumulated during the previous flush (printed).
//! * `read_range/100_from_middle_of_1GiB`: 100 consecutive records of one conversation from the
//!   middle of a 1-GiB log.
//! * `recovery/reopen_1GiB_*`: reopening that log after a clean shutdown and after a torn tail
//!   (warm page cache).
//!
//! Logs live in a temp dir on the same disk as `bench/disk-bandwidth.sh` measures
//! (`TMPDIR`, default /tmp). Log files are recreated outside the timed sections whenever they pass
//! [`REBUILD_AT`], so the figures are steady-state appends, spare segment prepared as the broker's
//! tick does.

use std::fs::OpenOptions;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use parley_storage::{
    Backend, Durability, Log, LogConfig, MmapBackend, PwriteBackend, RecordMeta, Timestamp,
};

const SEGMENT: u64 = 64 << 20;
const REBUILD_AT: u64 = 512 << 20;
const CONVERSATIONS: u64 = 1024;

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

fn config(durability: Durability) -> LogConfig {
    LogConfig {
        segment_size: SEGMENT,
        durability,
        ..LogConfig::default()
    }
}

/// A log that appends round-robin over [`CONVERSATIONS`] conversations and is recreated (untimed)
/// when it grows past [`REBUILD_AT`].
struct Rig<B: Backend> {
    make: fn(&Path) -> B,
    durability: Durability,
    dir: Option<tempfile::TempDir>,
    log: Option<Log<B>>,
    n: u64,
}

impl<B: Backend> Rig<B> {
    fn new(make: fn(&Path) -> B, durability: Durability) -> Self {
        let mut rig = Self {
            make,
            durability,
            dir: None,
            log: None,
            n: 0,
        };
        rig.rebuild();
        rig
    }

    fn rebuild(&mut self) {
        self.log = None;
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut log, _) =
            Log::open((self.make)(dir.path()), config(self.durability), now()).expect("open log");
        log.prepare_spare().expect("spare segment");
        self.log = Some(log);
        self.dir = Some(dir);
        self.n = 0;
    }

    /// Makes room for `records` more appends of `size` bytes without a rebuild in the middle.
    fn reserve(&mut self, records: u64, size: usize) {
        let log = self.log.as_mut().expect("log open");
        if log.written_lsn().get() + records * (size as u64 + 56) > REBUILD_AT {
            self.rebuild();
        } else {
            log.prepare_spare().expect("spare segment");
        }
    }

    fn log(&mut self) -> &mut Log<B> {
        self.log.as_mut().expect("log open")
    }

    #[inline]
    fn append(&mut self, payload: &[u8]) -> parley_storage::Lsn {
        let n = self.n;
        self.n += 1;
        let meta = RecordMeta {
            kind: 1,
            conversation: 1 + n % CONVERSATIONS,
            seq: 1 + n / CONVERSATIONS,
            msg_id: n,
            timestamp: Timestamp::from_micros(1_800_000_000_000_000 + n as i64),
        };
        self.log
            .as_mut()
            .expect("log open")
            .append(meta, payload)
            .expect("append")
    }
}

fn mmap(dir: &Path) -> MmapBackend {
    MmapBackend::open(dir).expect("mmap backend")
}

fn pwrite(dir: &Path) -> PwriteBackend {
    PwriteBackend::open(dir).expect("pwrite backend")
}

/// Appends in chunks of at most this many records between untimed housekeeping.
const CHUNK: u64 = 1 << 16;

fn timed_appends<B: Backend>(rig: &mut Rig<B>, payload: &[u8], iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        rig.reserve(n, payload.len());
        let start = Instant::now();
        for _ in 0..n {
            black_box(rig.append(black_box(payload)));
        }
        total += start.elapsed();
        left -= n;
    }
    total
}

fn append_never(c: &mut Criterion) {
    let mut g = c.benchmark_group("append_never");
    for (size, name) in [(100usize, "100B"), (4096, "4KiB")] {
        let payload = vec![0xA5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        let mut rig = Rig::new(mmap, Durability::Never);
        g.bench_function(format!("mmap_{name}"), |b| {
            b.iter_custom(|iters| timed_appends(&mut rig, &payload, iters))
        });
        drop(rig);
        let mut rig = Rig::new(pwrite, Durability::Never);
        g.bench_function(format!("pwrite_{name}"), |b| {
            b.iter_custom(|iters| timed_appends(&mut rig, &payload, iters))
        });
    }
    g.finish();

    // The ceiling for an append: copying the same bytes into already-resident memory.
    let mut g = c.benchmark_group("memcpy");
    let mut dst = vec![1u8; 256 << 20];
    for (size, name) in [(100usize, "100B"), (4096, "4KiB")] {
        let src = vec![0xA5u8; size];
        let stride = size.next_multiple_of(8);
        g.throughput(Throughput::Bytes(size as u64));
        let mut at = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                if at + stride > dst.len() {
                    at = 0;
                }
                dst[at..at + size].copy_from_slice(black_box(&src));
                at += stride;
            })
        });
        black_box(&dst);
    }
    g.finish();
}

fn append_always(c: &mut Criterion) {
    let payload = vec![0xA5u8; 100];
    let mut g = c.benchmark_group("append_always");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));
    for batch in [16u64, 64, 256, 1024] {
        let mut rig = Rig::new(mmap, Durability::Always);
        g.bench_function(format!("batch_{batch}_100B"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(CHUNK);
                    rig.reserve(n, payload.len());
                    let start = Instant::now();
                    let mut in_batch = 0;
                    for _ in 0..n {
                        rig.append(&payload);
                        in_batch += 1;
                        if in_batch == batch {
                            rig.log().flush().expect("flush");
                            in_batch = 0;
                        }
                    }
                    rig.log().flush().expect("flush");
                    total += start.elapsed();
                    left -= n;
                }
                total
            })
        });
    }
    pipelined(&mut g, Rig::new(mmap, Durability::Always), "mmap", &payload);
    pipelined(
        &mut g,
        Rig::new(pwrite, Durability::Always),
        "pwrite",
        &payload,
    );
    g.finish();
}

/// Group commit as the broker runs it: one flush in flight on a flusher thread while the writer
/// keeps appending; a record counts when the flush covering it completed.
fn pipelined<B: Backend>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    mut rig: Rig<B>,
    name: &str,
    payload: &[u8],
) where
    parley_storage::SyncOf<B>: Send + 'static,
{
    let mut flushes_total = 0u64;
    let mut records_total = 0u64;
    g.bench_function(format!("pipelined_{name}_100B"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                rig.reserve(n, payload.len());
                let (to_flusher, tickets) = mpsc::channel::<parley_storage::SyncTicket<_>>();
                let (done_tx, done) = mpsc::channel();
                let flusher = std::thread::spawn(move || {
                    for t in tickets {
                        done_tx.send(t.run().expect("sync")).expect("writer alive");
                    }
                });
                let start = Instant::now();
                let mut in_flight = false;
                let mut last = parley_storage::Lsn(0);
                for _ in 0..n {
                    last = rig.append(payload);
                    if in_flight && let Ok(lsn) = done.try_recv() {
                        rig.log().complete_sync(lsn);
                        in_flight = false;
                    }
                    if !in_flight && let Some(t) = rig.log().sync_ticket() {
                        to_flusher.send(t).expect("flusher alive");
                        in_flight = true;
                        flushes_total += 1;
                    }
                }
                while !rig.log().is_durable(last) {
                    if in_flight {
                        let lsn = done.recv().expect("flusher alive");
                        rig.log().complete_sync(lsn);
                        in_flight = false;
                    } else if let Some(t) = rig.log().sync_ticket() {
                        to_flusher.send(t).expect("flusher alive");
                        in_flight = true;
                        flushes_total += 1;
                    }
                }
                total += start.elapsed();
                drop(to_flusher);
                flusher.join().expect("flusher");
                records_total += n;
                left -= n;
            }
            total
        })
    });
    if flushes_total > 0 {
        println!(
            "pipelined_{name}_100B: {:.0} records per flush on average ({records_total} records, {flushes_total} flushes)",
            records_total as f64 / flushes_total as f64
        );
    }
}

/// A 1-GiB log of 100-B records over [`CONVERSATIONS`] conversations, flushed and closed.
fn build_gib_log(dir: &Path) -> u64 {
    let (mut log, _) = Log::open(mmap(dir), config(Durability::Never), now()).expect("open");
    let payload = [0x5Au8; 100];
    let mut n = 0u64;
    while log.written_lsn().get() < (1 << 30) - SEGMENT / 2 {
        let meta = RecordMeta {
            kind: 1,
            conversation: 1 + n % CONVERSATIONS,
            seq: 1 + n / CONVERSATIONS,
            msg_id: n,
            timestamp: Timestamp::from_micros(1_800_000_000_000_000 + n as i64),
        };
        log.append(meta, &payload).expect("append");
        n += 1;
        if n.is_multiple_of(CHUNK) {
            log.prepare_spare().expect("spare");
        }
    }
    log.flush().expect("flush");
    n
}

fn gib_log(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let records = build_gib_log(dir.path());
    let per_conv = records / CONVERSATIONS;

    let mut g = c.benchmark_group("read_range");
    g.throughput(Throughput::Elements(100));
    {
        let (log, _) = Log::open(mmap(dir.path()), config(Durability::Never), now()).expect("open");
        let mid = per_conv / 2;
        let mut conv = 0u64;
        g.bench_function("100_from_middle_of_1GiB", |b| {
            b.iter(|| {
                conv = conv % CONVERSATIONS + 1;
                let mut bytes = 0usize;
                let mut count = 0;
                for r in log.read(conv, mid..mid + 100) {
                    let r = r.expect("record");
                    bytes += r.payload.len();
                    count += 1;
                }
                assert_eq!(count, 100);
                black_box(bytes)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("recovery");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    g.bench_function("reopen_1GiB_clean", |b| {
        b.iter(|| {
            let (log, report) =
                Log::open(mmap(dir.path()), config(Durability::Never), now()).expect("open");
            assert!(report.torn_tail.is_none());
            black_box(log.written_lsn())
        })
    });
    let mut tail = {
        let (log, _) = Log::open(mmap(dir.path()), config(Durability::Never), now()).expect("open");
        log.written_lsn().get()
    };
    g.bench_function("reopen_1GiB_torn_tail", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Untimed: garbage over the last record, as a crash mid-write leaves it.
                let last_seg = (tail - 1) / SEGMENT * SEGMENT;
                let path = dir.path().join(format!("{last_seg:020}.seg"));
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("segment file");
                f.write_all_at(&[0xFF; 8], tail - last_seg - 60)
                    .expect("tear");
                drop(f);
                let start = Instant::now();
                let (log, report) =
                    Log::open(mmap(dir.path()), config(Durability::Never), now()).expect("open");
                total += start.elapsed();
                assert!(report.torn_tail.is_some(), "the tear was found");
                tail = log.written_lsn().get();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, append_never, append_always, gib_log);
criterion_main!(benches);
