//! A child process appends under `Durability::Always` with group commit (tickets run on a flusher
//! thread) and prints the highest durable seq after each completed sync; the parent kills it with
//! SIGKILL at random points and checks that every record reported durable is present and intact,
//! and that the log is a gapless prefix. The child is this test binary itself, re-executed with
//! an environment variable and `--exact child_appender`.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use parley_storage::{Log, LogConfig, Lsn, MmapBackend};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "PARLEY_STORAGE_KILL_CHILD_DIR";
const CONV: u64 = 1;

fn config() -> LogConfig {
    let mut c = small_config();
    c.segment_size = 16 * 1024;
    c.prefault = true;
    c
}

fn len_of(seq: u64) -> usize {
    (seq * 131 % 500) as usize
}

/// The child: runs only when re-executed by `sigkill_never_loses_a_record_reported_durable`.
#[test]
fn child_appender() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let backend = MmapBackend::open(dir.as_ref()).unwrap();
    let (mut log, _) = Log::open(backend, config(), now()).unwrap();
    let mut seq = log.latest_seq(CONV).unwrap_or(0);
    let (ticket_tx, ticket_rx) = mpsc::channel::<parley_storage::SyncTicket<_>>();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for t in ticket_rx {
            done_tx.send(t.run().unwrap()).unwrap();
        }
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id().into());
    let mut pending: VecDeque<(u64, Lsn)> = VecDeque::new();
    let mut out = std::io::stdout().lock();
    let mut in_flight = false;
    loop {
        for _ in 0..rng.random_range(1..40) {
            seq += 1;
            let lsn = log
                .append(meta(CONV, seq), &payload(CONV, seq, len_of(seq)))
                .unwrap();
            pending.push_back((seq, lsn));
        }
        if in_flight {
            // Group commit: the batch above was appended while the previous sync ran.
            let lsn = done_rx.recv().unwrap();
            log.complete_sync(lsn);
            in_flight = false;
            let mut durable = None;
            while let Some(&(s, lsn)) = pending.front() {
                if !log.is_durable(lsn) {
                    break;
                }
                durable = Some(s);
                pending.pop_front();
            }
            if let Some(s) = durable {
                writeln!(out, "durable {s}").unwrap();
                out.flush().unwrap();
            }
        }
        if let Some(t) = log.sync_ticket() {
            ticket_tx.send(t).unwrap();
            in_flight = true;
        }
        if rng.random_bool(0.05) {
            log.tick(now()).unwrap();
        }
    }
}

#[test]
fn sigkill_never_loses_a_record_reported_durable() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6c);
    let started = Instant::now();
    let mut max_durable = 0u64;
    let mut iterations = 0;
    while iterations < 8 && started.elapsed() < Duration::from_secs(6) {
        iterations += 1;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_appender",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line
                    .strip_prefix("durable ")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    let _ = tx.send(n);
                }
            }
        });
        // Wait until the child is appending, then kill it at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("child reports");
        max_durable = max_durable.max(first);
        std::thread::sleep(Duration::from_millis(rng.random_range(1..150)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        max_durable = rx.try_iter().fold(max_durable, u64::max);

        let (log, report) =
            Log::open(MmapBackend::open(dir.path()).unwrap(), config(), now()).unwrap();
        assert!(report.corruptions.is_empty(), "{report:?}");
        let latest = log.latest_seq(CONV).unwrap_or(0);
        assert!(
            latest >= max_durable,
            "iteration {iterations}: reported durable up to {max_durable}, found {latest}"
        );
        // A gapless prefix, every record intact.
        assert_conversation(&log, CONV, &(1..=latest).collect::<Vec<_>>(), len_of);
        log.check_invariants().unwrap();
    }
    println!("{iterations} kills, highest seq reported durable: {max_durable}");
    assert!(iterations >= 3, "only {iterations} iterations");
}
