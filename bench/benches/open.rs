//! Start-up cost of a shard log: `Log::open` of a 1-GiB and a 10-GiB log (mmap backend, real
//! disk), after a clean close and after a simulated crash.
//!
//! Not a criterion bench (one open of a 10-GiB log can take seconds): a plain `main` that builds
//! the logs once, times several opens of each kind and prints the median (and min/max).
//!
//! * The log: 100-byte payloads over [`CONVERSATIONS`] conversations, round-robin, 64-MiB
//!   segments, built under `Durability::Never` with `prepare_spare` every [`CHUNK`] appends (as the
//!   broker's `tick` does), then flushed and closed. The 1-GiB figure is taken first; the same log
//!   then grows to 10 GiB.
//! * `clean`: open, drop, repeat.
//! * `crash`: before each timed open (untimed): open, append [`CRASH_APPENDS`] records without any
//!   flush, drop (a process crash: the bytes are only in the page cache), and overwrite part of
//!   the last record with garbage (a torn write). The timed open must cut the tail, zero it and
//!   sync the active segment.
//!
//! Page cache: warm (whatever of the log the machine's memory keeps after building it).
//!
//! Run: `CARGO_TARGET_DIR=/work/target-storage cargo bench -p parley-bench --bench open`
//! Environment: `OPEN_BENCH_DIR` (default `/work/tmp`), `OPEN_BENCH_GIB` (default `1,10`),
//! `OPEN_BENCH_RUNS` (default 5). The log directory is deleted at the end.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parley_storage::{Durability, Log, LogConfig, MmapBackend, RecordMeta, Timestamp};

const SEGMENT: u64 = 64 << 20;
const CONVERSATIONS: u64 = 4096;
const CHUNK: u64 = 1 << 16;
const CRASH_APPENDS: u64 = 20_000;
const PAYLOAD: usize = 100;

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

fn config() -> LogConfig {
    LogConfig {
        segment_size: SEGMENT,
        durability: Durability::Never,
        ..LogConfig::default()
    }
}

fn open(dir: &Path) -> (Log<MmapBackend>, parley_storage::RecoveryReport) {
    Log::open(
        MmapBackend::open(dir).expect("mmap backend"),
        config(),
        now(),
    )
    .expect("open")
}

/// Appends round-robin records until the log holds `target` bytes (or `count` more records if
/// `count` is set). `n` is the running record number (seq = n / CONVERSATIONS + 1).
fn grow(log: &mut Log<MmapBackend>, n: &mut u64, target: u64, count: Option<u64>) {
    let payload = [0x5Au8; PAYLOAD];
    let stop = count.map(|c| *n + c);
    loop {
        if let Some(s) = stop {
            if *n >= s {
                break;
            }
        } else if log.written_lsn().get() >= target {
            break;
        }
        let conversation = 1 + *n % CONVERSATIONS;
        let meta = RecordMeta {
            kind: 1,
            conversation,
            seq: log.latest_seq(conversation).unwrap_or(0) + 1,
            msg_id: *n,
            timestamp: Timestamp::from_micros(1_800_000_000_000_000 + *n as i64),
        };
        log.append(meta, &payload).expect("append");
        *n += 1;
        if count.is_none() && n.is_multiple_of(CHUNK) {
            log.prepare_spare().expect("spare");
        }
    }
}

/// Overwrites 8 bytes inside the last record with garbage (a torn write).
fn tear(dir: &Path, written: u64) {
    let last_seg = (written - 1) / SEGMENT * SEGMENT;
    let path = dir.join(format!("{last_seg:020}.seg"));
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("segment file");
    f.write_all_at(&[0xFF; 8], written - last_seg - 60)
        .expect("tear");
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "median {:8.1} ms  (min {:.1}, max {:.1}, n={})",
        ms(v[v.len() / 2]),
        ms(v[0]),
        ms(v[v.len() - 1]),
        v.len()
    )
}

fn measure(dir: &Path, gib: u64, runs: usize, n: &mut u64) {
    let mut clean = Vec::new();
    let mut last_report = None;
    let mut heap = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let (log, report) = open(dir);
        clean.push(start.elapsed());
        heap = log.index_heap_bytes();
        last_report = Some(report);
    }
    let report = last_report.expect("one run");
    println!(
        "{gib:>3} GiB: {} segments, {} records, written {} B, index heap {:.1} MB",
        report.segments,
        report.records,
        report.written_lsn,
        heap as f64 / 1e6
    );
    println!("{gib:>3} GiB clean open: {}", stats(clean));
    println!("{gib:>3} GiB   report: {report:?}");

    let mut crash = Vec::new();
    let mut report = None;
    for _ in 0..runs {
        let (mut log, _) = open(dir);
        grow(&mut log, n, 0, Some(CRASH_APPENDS));
        let written = log.written_lsn().get();
        drop(log); // no flush: a process crash
        tear(dir, written);
        let start = Instant::now();
        let (log, r) = open(dir);
        crash.push(start.elapsed());
        assert!(r.torn_tail.is_some(), "the tear was found");
        drop(log);
        report = Some(r);
    }
    println!("{gib:>3} GiB crash open: {}", stats(crash));
    println!("{gib:>3} GiB   report: {report:?}");
}

fn main() {
    // `cargo bench` passes `--bench`; a test run (`cargo test --benches`) passes nothing useful.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let base: PathBuf =
        std::env::var_os("OPEN_BENCH_DIR").map_or_else(|| "/work/tmp".into(), PathBuf::from);
    let sizes: Vec<u64> = std::env::var("OPEN_BENCH_GIB")
        .unwrap_or_else(|_| "1,10".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs: usize = std::env::var("OPEN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    std::fs::create_dir_all(&base).expect("bench dir");
    let dir = tempfile::Builder::new()
        .prefix("open-bench-")
        .tempdir_in(&base)
        .expect("temp dir");
    let mut n = 0u64;
    for gib in sizes {
        let build = Instant::now();
        let (mut log, _) = open(dir.path());
        grow(&mut log, &mut n, gib << 30, None);
        log.prepare_spare().expect("spare");
        log.flush().expect("flush");
        drop(log);
        println!(
            "{gib:>3} GiB: built in {:.1} s",
            build.elapsed().as_secs_f64()
        );
        measure(dir.path(), gib, runs, &mut n);
    }
    drop(dir);
}
