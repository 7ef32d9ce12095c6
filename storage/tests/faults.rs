//! Fault injection (FaultyBackend), crash images (MemoryBackend), and file-backend specifics.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use parley_storage::{
    AppendError, Backend, Durability, Faults, FaultyBackend, Log, Lsn, MemoryBackend, MmapBackend,
    OpenError, PwriteBackend, StorageError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const S: u64 = 4096;

#[test]
fn failed_sync_poisons_the_log() {
    let fx = FaultyFx::new();
    let (mut log, _) = fx.open(small_config());
    let a = log.append(meta(1, 1), b"acked").unwrap();
    log.flush().unwrap();
    log.append(meta(1, 2), b"not acked").unwrap();
    fx.faults.fail_sync(1);
    let durable = log.durable_lsn();
    assert!(matches!(log.flush(), Err(StorageError::Io { .. })));
    assert!(log.is_poisoned());
    // Never retry-and-pretend.
    assert!(matches!(log.flush(), Err(StorageError::Poisoned)));
    assert!(matches!(
        log.append(meta(1, 3), b"x"),
        Err(AppendError::Storage(StorageError::Poisoned))
    ));
    assert!(log.sync_ticket().is_none());
    assert_eq!(log.durable_lsn(), durable);
    assert!(log.is_durable(a));
    // Reads still work; reopening recovers and accepts appends again.
    assert_eq!(log.read(1, 0..10).count(), 2);
    drop(log);
    let (mut log, _) = fx.open(small_config());
    assert!(!log.is_poisoned());
    log.append(meta(1, 3), b"after reopen").unwrap();
}

#[test]
fn failed_ticket_poisons_the_log_even_if_the_caller_forgets_to_report_it() {
    let fx = FaultyFx::new();
    let (mut log, _) = fx.open(small_config());
    log.append(meta(1, 1), b"x").unwrap();
    fx.faults.fail_sync(1);
    let ticket = log.sync_ticket().unwrap();
    let lsn = ticket.lsn();
    assert!(
        std::thread::spawn(move || ticket.run())
            .join()
            .unwrap()
            .is_err()
    );
    assert!(log.is_poisoned());
    log.complete_sync(lsn); // a confused caller: ignored
    assert_eq!(log.durable_lsn(), Lsn(64));
}

#[test]
fn failed_write_surfaces_an_error_and_loses_nothing_acked() {
    let fx = FaultyFx::new();
    let (mut log, _) = fx.open(small_config());
    for seq in 1..=10 {
        log.append(meta(1, seq), &payload(1, seq, 40)).unwrap();
    }
    log.flush().unwrap();
    fx.faults.fail_write(2);
    log.append(meta(1, 11), &payload(1, 11, 40)).unwrap();
    match log.append(meta(1, 12), &payload(1, 12, 40)) {
        Err(AppendError::Storage(StorageError::Io { .. })) => {}
        other => panic!("{other:?}"),
    }
    assert!(log.is_poisoned());
    drop(log);
    let (log, _) = fx.open(small_config());
    assert_conversation(&log, 1, &(1..=11).collect::<Vec<_>>(), |_| 40);
}

#[test]
fn full_disk_at_roll_is_an_error_and_the_log_stays_usable() {
    let fx = FaultyFx::new();
    let (mut log, _) = fx.open(small_config());
    let mut seq = 0;
    while log.segment_count() == 1 {
        seq += 1;
        fx.faults.fail_create(1);
        match log.append(meta(1, seq), &payload(1, seq, 100)) {
            Ok(_) => fx.faults.clear(),
            Err(AppendError::Storage(StorageError::Io { source, .. })) => {
                assert_eq!(source.raw_os_error(), Some(28), "ENOSPC");
                assert!(!log.is_poisoned());
                fx.faults.clear();
                // Space came back: the same append now succeeds.
                log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(fx.faults.injected(), 1);
    fx.faults.fail_create(1);
    assert!(log.prepare_spare().is_err());
    assert!(!log.is_poisoned());
    assert!(log.prepare_spare().unwrap());
    assert_conversation(&log, 1, &(1..=seq).collect::<Vec<_>>(), |_| 100);
}

#[test]
fn failed_seal_sync_on_roll_poisons_and_writes_nothing_to_the_next_segment() {
    let fx = FaultyFx::new();
    let (mut log, _) = fx.open(small_config());
    let mut seq = 0;
    loop {
        seq += 1;
        let before = log.segment_count();
        fx.faults.fail_sync(1);
        let r = log.append(meta(1, seq), &payload(1, seq, 100));
        if r.is_err() {
            assert_eq!(before, 1);
            assert_eq!(log.segment_count(), 1, "did not roll");
            assert!(log.is_poisoned());
            break;
        }
        fx.faults.clear();
    }
    drop(log);
    fx.faults.clear();
    let (log, _) = fx.open(small_config());
    assert_eq!(log.latest_seq(1), Some(seq - 1));
}

/// Under `Always` with random flush points, the image a power loss leaves (durable bytes plus a
/// random subset of unsynced pages) recovers to a prefix of what was appended that contains every
/// record durable at the crash, nothing corrupt, and no stale record comes back later.
#[test]
fn crash_images_keep_every_durable_record_and_resurrect_nothing() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mem = MemoryBackend::new();
        let (mut log, _) = Log::open(mem.clone(), small_config(), now()).unwrap();
        let mut appended: Vec<(u64, u64, usize, Lsn)> = Vec::new(); // conv, seq, len, lsn
        let n = rng.random_range(20..200);
        let mut next = [0u64; 4];
        for _ in 0..n {
            let conv = rng.random_range(0..4u64);
            next[conv as usize] += 1;
            let seq = next[conv as usize];
            let len = rng.random_range(0..600);
            let lsn = log
                .append(meta(conv, seq), &payload(conv, seq, len))
                .unwrap();
            appended.push((conv, seq, len, lsn));
            if rng.random_bool(0.1) {
                if rng.random_bool(0.5) {
                    log.flush().unwrap();
                } else if let Some(t) = log.sync_ticket() {
                    let lsn = t.run().unwrap();
                    log.complete_sync(lsn);
                }
            }
            if rng.random_bool(0.05) {
                log.prepare_spare().unwrap();
            }
        }
        let durable = log.durable_lsn();
        let p = rng.random_range(0.0..1.0);
        let image = mem.crash_image_with(|_, _| rng.random_bool(p));
        drop(log);

        let (mut log, report) = Log::open(image.clone(), small_config(), now()).unwrap();
        let got: Vec<_> = log.scan(Lsn(0)).map(|r| r.unwrap()).collect();
        assert!(report.corruptions.is_empty(), "seed {seed}: {report:?}");
        assert!(got.len() <= appended.len());
        for (r, &(conv, seq, len, lsn)) in got.iter().zip(&appended) {
            assert_eq!(r.lsn, lsn, "seed {seed}: a prefix");
            assert_eq!(r.meta, meta(conv, seq));
            assert_eq!(r.payload, payload(conv, seq, len));
        }
        let kept = got.len();
        for &(_, _, _, lsn) in &appended[kept..] {
            assert!(lsn >= durable, "seed {seed}: durable record at {lsn} lost");
        }
        // Append more, crash again (durable only): the log is the prefix plus the new records.
        let mut more = Vec::new();
        for i in 0..rng.random_range(1..30u64) {
            let conv = 7;
            let len = rng.random_range(0..300);
            more.push((
                log.append(meta(conv, i + 1), &payload(conv, i + 1, len))
                    .unwrap(),
                len,
            ));
        }
        log.flush().unwrap();
        let image2 = image.crash_image();
        drop(log);
        let (log, _) = Log::open(image2, small_config(), now()).unwrap();
        let all: Vec<_> = log.scan(Lsn(0)).map(|r| r.unwrap()).collect();
        assert_eq!(
            all.len(),
            kept + more.len(),
            "seed {seed}: nothing resurrected"
        );
        for (r, (i, &(lsn, len))) in all[kept..].iter().zip(more.iter().enumerate()) {
            assert_eq!(r.lsn, lsn);
            assert_eq!(r.payload, payload(7, i as u64 + 1, len));
        }
        log.check_invariants().unwrap();
    }
}

#[test]
fn reads_detect_bit_rot_after_open() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(
        MmapBackend::open(dir.path()).unwrap(),
        small_config(),
        now(),
    )
    .unwrap();
    let lsn = log.append(meta(1, 1), b"precious payload").unwrap();
    log.append(meta(1, 2), b"fine").unwrap();
    log.flush().unwrap();
    // Rot the stored bytes underneath the map (no slice of it is alive here).
    let path = dir.path().join(format!("{:020}.seg", 0));
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"X", lsn.0 + 50).unwrap();
    let reads: Vec<_> = log.read(1, 0..10).collect();
    assert!(matches!(reads[0], Err(StorageError::Corrupt { lsn: l }) if l == lsn));
    assert_eq!(reads[1].as_ref().unwrap().payload, b"fine");
    let scanned: Vec<_> = log.scan(Lsn(0)).collect();
    assert!(matches!(scanned[0], Err(StorageError::Corrupt { .. })));
}

#[test]
fn a_locked_directory_can_not_be_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let first = MmapBackend::open(dir.path()).unwrap();
    assert!(matches!(
        MmapBackend::open(dir.path()),
        Err(OpenError::Locked { .. })
    ));
    assert!(matches!(
        PwriteBackend::open(dir.path()),
        Err(OpenError::Locked { .. })
    ));
    drop(first);
    PwriteBackend::open(dir.path()).unwrap();
}

#[test]
fn bad_configurations_are_refused() {
    for size in [0, 4095, 4097, 3 << 32] {
        let mut c = small_config();
        c.segment_size = size;
        assert!(matches!(
            Log::open(MemoryBackend::new(), c, now()),
            Err(OpenError::InvalidConfig(_))
        ));
    }
    let mut c = small_config();
    c.durability = Durability::Interval(std::time::Duration::ZERO);
    assert!(Log::open(MemoryBackend::new(), c, now()).is_err());
}

#[test]
fn a_segment_with_a_bad_header_is_reported_and_ignored() {
    let mem = MemoryBackend::new();
    let (mut log, _) = Log::open(mem.clone(), small_config(), now()).unwrap();
    for seq in 1..=100 {
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    drop(log);
    mem.modify(0, |b| b[20] ^= 1);
    let (log, report) = Log::open(mem.clone(), small_config(), now()).unwrap();
    assert_eq!(report.corruptions.len(), 1);
    assert_eq!(
        report.corruptions[0].kind,
        parley_storage::CorruptionKind::BadHeader
    );
    assert_eq!(log.first_lsn(), Lsn(S));
    assert_eq!(log.latest_seq(1), Some(100));
}

#[test]
fn interval_durability_flushes_on_tick_when_due() {
    let mut c = small_config();
    c.durability = Durability::Interval(std::time::Duration::from_millis(10));
    let (mut log, _) = Log::open(MemoryBackend::new(), c, now()).unwrap();
    let lsn = log.append(meta(1, 1), b"x").unwrap();
    let r = log.tick(now()).unwrap();
    assert_eq!(r.flushed, None);
    assert!(!log.is_durable(lsn));
    let later = now().saturating_add(std::time::Duration::from_millis(10));
    let r = log.tick(later).unwrap();
    assert_eq!(r.flushed, Some(log.written_lsn()));
    assert!(log.is_durable(lsn));
}

#[test]
fn faulty_backend_without_faults_injects_nothing() {
    let faults = Faults::new();
    let backend = FaultyBackend::new(MemoryBackend::new(), faults.clone());
    let (mut log, _) = Log::open(backend, small_config(), now()).unwrap();
    for seq in 1..=200 {
        log.append(meta(1, seq), &payload(1, seq, 50)).unwrap();
    }
    log.flush().unwrap();
    assert_eq!(faults.injected(), 0);
}

/// Prints the index's memory per record (FORMAT.md section 7 quotes it).
#[test]
fn index_memory_per_record() {
    let mut c = small_config();
    c.segment_size = 64 << 20;
    let (mut log, _) = Log::open(MemoryBackend::new(), c, now()).unwrap();
    let records = 200_000u64;
    for i in 0..records {
        let conv = i % 1000;
        log.append(meta(conv + 1, i / 1000 + 1), &[0; 100]).unwrap();
    }
    let bytes = log.index_heap_bytes() as f64;
    let per = bytes / records as f64;
    println!(
        "index: {bytes} bytes for {records} records in 1000 conversations = {per:.1} B/record"
    );
    assert!(per < 40.0, "{per}");
}

/// Every record the log returns for conversations 0..8, and their (latest, first) seqs.
type FullView = (
    Vec<(u64, u64, u64, Vec<u8>)>,
    Vec<(Option<u64>, Option<u64>)>,
);

fn full_view<B: parley_storage::Backend>(log: &Log<B>) -> FullView {
    let seqs = (0..8u64)
        .map(|c| (log.latest_seq(c), log.first_seq(c)))
        .collect();
    (snapshot(log, 0..8), seqs)
}

/// Crash images of logs with index files (written by `prepare_spare` and by spare tickets, under
/// every durability policy) open to exactly what the same image opens to without any index file
/// (a full scan), and only the active segment (plus sealed ones without an index) is scanned.
#[test]
fn crash_images_with_index_files_read_like_a_full_scan() {
    for seed in 0..60u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut config = small_config();
        config.durability = match seed % 3 {
            0 => Durability::Always,
            1 => Durability::Interval(std::time::Duration::from_millis(1)),
            _ => Durability::Never,
        };
        let mem = MemoryBackend::new();
        let (mut log, _) = Log::open(mem.clone(), config, now()).unwrap();
        let mut next = [0u64; 8];
        let mut ticket = None;
        for _ in 0..rng.random_range(50..400) {
            let conv = rng.random_range(0..8u64);
            next[conv as usize] += 1;
            let seq = next[conv as usize];
            let len = rng.random_range(0..500);
            log.append(meta(conv, seq), &payload(conv, seq, len))
                .unwrap();
            match rng.random_range(0..40) {
                0 => {
                    log.flush().unwrap();
                }
                1 => {
                    log.prepare_spare().unwrap();
                }
                2 if ticket.is_none() => ticket = log.spare_ticket(),
                3 => {
                    if let Some(t) = ticket.take() {
                        let done = std::thread::spawn(move || t.run()).join().unwrap();
                        log.install_spare(done).unwrap();
                    }
                }
                _ => {}
            }
        }
        drop(ticket);
        let p = rng.random_range(0.0..1.0);
        let image = mem.crash_image_with(|_, _| rng.random_bool(p));
        drop(log);
        let plain = image.crash_image();
        for name in plain.clone().list_side().unwrap() {
            plain.clone().remove_side(name).unwrap();
        }
        let (a, ra) = Log::open(image, config, now()).unwrap();
        let (b, rb) = Log::open(plain, config, now()).unwrap();
        assert_eq!(full_view(&a), full_view(&b), "seed {seed}");
        assert_eq!(ra.records, rb.records, "seed {seed}");
        assert_eq!(ra.written_lsn, rb.written_lsn, "seed {seed}");
        assert!(ra.index_problems.is_empty(), "seed {seed}: {ra:?}");
        assert_eq!(
            ra.indexed_segments + ra.scanned_segments,
            rb.scanned_segments,
            "seed {seed}"
        );
        a.check_invariants().unwrap();
    }
}

#[test]
fn an_index_is_written_only_after_its_segment_is_durable_under_never() {
    let mut config = small_config();
    config.durability = Durability::Never;
    let mem = MemoryBackend::new();
    let (mut log, _) = Log::open(mem.clone(), config, now()).unwrap();
    let mut seq = 0;
    while log.segment_count() < 4 {
        seq += 1;
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    let in_sealed = log
        .read(1, 0..u64::MAX)
        .filter(|r| r.as_ref().unwrap().lsn.get() < 3 * S)
        .count();
    // No seal sync under Never: nothing is durable yet.
    assert_eq!(log.durable_lsn(), Lsn(64));
    log.prepare_spare().unwrap();
    // Power loss: only durable bytes survive; the indexed segments are complete.
    let (log, report) = Log::open(mem.crash_image(), config, now()).unwrap();
    // Segment 3 lost everything, so segment 2 is the active one again (its index is removed and
    // it is scanned); segments 0 and 1 open from their index files.
    assert_eq!(report.indexed_segments, 2);
    assert_eq!(report.scanned_segments, 1);
    assert!(report.corruptions.is_empty());
    assert_conversation(&log, 1, &(1..=in_sealed as u64).collect::<Vec<_>>(), |_| {
        100
    });
}

#[test]
fn a_failed_index_write_is_retried_and_the_log_stays_usable() {
    let fx = FaultyFx::new();
    let (mut log, _) = fx.open(small_config());
    let mut seq = 0;
    while log.segment_count() < 3 {
        seq += 1;
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    fx.faults.fail_side_write(1);
    assert!(matches!(log.prepare_spare(), Err(StorageError::Io { .. })));
    assert!(!log.is_poisoned());
    assert!(
        log.has_spare(),
        "the spare was created before the index failed"
    );
    seq += 1;
    log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    assert_eq!(log.read(1, 0..u64::MAX).count() as u64, seq);
    // The next ticket writes what is missing.
    assert!(!log.prepare_spare().unwrap());
    assert_eq!(fx.mem.clone().list_side().unwrap().len(), 2);
    // A failed checkpoint write keeps the old checkpoint and does not poison.
    log.flush().unwrap();
    log.write_checkpoint(Lsn(64), b"old").unwrap();
    fx.faults.fail_side_write(1);
    assert!(log.write_checkpoint(log.durable_lsn(), b"new").is_err());
    assert!(!log.is_poisoned());
    drop(log);
    let (log, report) = fx.open(small_config());
    assert_eq!(report.indexed_segments, 2);
    assert_eq!(log.checkpoint(), Some((Lsn(64), &b"old"[..])));
    assert_conversation(&log, 1, &(1..=seq).collect::<Vec<_>>(), |_| 100);
}

#[test]
fn a_failed_segment_sync_in_a_spare_ticket_poisons_the_log() {
    let mut config = small_config();
    config.durability = Durability::Never;
    let fx = FaultyFx::new();
    let (mut log, _) = fx.open(config);
    let mut seq = 0;
    while log.segment_count() < 2 {
        seq += 1;
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    let ticket = log.spare_ticket().unwrap();
    fx.faults.fail_sync(1);
    let done = ticket.run();
    assert!(log.is_poisoned(), "the flag is shared with the ticket");
    assert!(log.install_spare(done).is_err());
    assert_eq!(
        fx.mem.clone().list_side().unwrap().len(),
        0,
        "no index for an unsynced segment"
    );
}

/// Index memory once segments are sealed: spans per (conversation, segment), not entries per
/// record (FORMAT.md section 7 quotes it).
#[test]
fn index_memory_of_sealed_segments() {
    let mut c = small_config();
    c.segment_size = 4 << 20;
    let (mut log, _) = Log::open(MemoryBackend::new(), c, now()).unwrap();
    let records = 200_000u64;
    for i in 0..records {
        let conv = i % 1000;
        log.append(meta(conv + 1, i / 1000 + 1), &[0; 100]).unwrap();
        if i % 10_000 == 0 {
            log.prepare_spare().unwrap();
        }
    }
    log.prepare_spare().unwrap();
    let bytes = log.index_heap_bytes() as f64;
    let per = bytes / records as f64;
    println!(
        "index: {bytes} bytes for {records} records in 1000 conversations, {} segments = {per:.1} B/record",
        log.segment_count()
    );
    assert!(per < 8.0, "{per}");
}
