//! The backend-independent test suite: every test runs over the mmap, pwrite, memory and
//! faulty(memory, no faults) backends (STYLE 7).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use parley_storage::{
    AppendError, CheckpointProblem, CorruptionKind, IndexError, Lsn, Retention, SideFile,
    StorageError, Timestamp,
};

const S: u64 = 4096;

fn seqs(r: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    r.collect()
}

fn append_then_read_returns_records_in_seq_order<F: Fixture>(fx: F) {
    let (mut log, report) = fx.open(small_config());
    assert!(report.created);
    for seq in 1..=10 {
        for conv in [1, 2] {
            log.append(meta(conv, seq), &payload(conv, seq, 30))
                .unwrap();
        }
    }
    assert_conversation(&log, 1, &seqs(1..=10), |_| 30);
    assert_conversation(&log, 2, &seqs(1..=10), |_| 30);
    let mid: Vec<u64> = log.read(2, 3..6).map(|r| r.unwrap().meta.seq).collect();
    assert_eq!(mid, vec![3, 4, 5]);
    assert_eq!(log.read(2, 3..6).len(), 3);
    assert!(log.read(3, 0..10).next().is_none());
    log.check_invariants().unwrap();
}

fn latest_and_first_seq_follow_appends<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    assert_eq!(log.latest_seq(5), None);
    assert_eq!(log.first_seq(5), None);
    for seq in [10, 20, 30] {
        log.append(meta(5, seq), b"x").unwrap();
    }
    assert_eq!(log.latest_seq(5), Some(30));
    assert_eq!(log.first_seq(5), Some(10));
    assert_eq!(log.conversations(), 1);
    // Conversation 0 is not indexed, but scan finds it.
    log.append(meta(0, 1), b"unindexed").unwrap();
    log.append(meta(0, 1), b"again: no seq rule for conversation 0")
        .unwrap();
    assert_eq!(log.conversations(), 1);
    assert_eq!(log.scan(Lsn(0)).count(), 5);
}

fn reopen_returns_the_same_records<F: Fixture>(fx: F) {
    let len_of = |seq: u64| (seq * 37 % 300) as usize;
    let (mut log, _) = fx.open(small_config());
    for seq in 1..=70 {
        for conv in [1, 2, 3] {
            log.append(meta(conv, seq), &payload(conv, seq, len_of(seq)))
                .unwrap();
        }
    }
    log.flush().unwrap();
    let written = log.written_lsn();
    drop(log);
    let (log, report) = fx.open(small_config());
    assert_eq!(report.torn_tail, None, "{}", fx.name());
    assert!(report.corruptions.is_empty());
    assert_eq!(report.records, 210);
    assert_eq!(log.written_lsn(), written);
    assert_eq!(log.durable_lsn(), written);
    for conv in [1, 2, 3] {
        assert_conversation(&log, conv, &seqs(1..=70), len_of);
        assert_eq!(log.latest_seq(conv), Some(70));
    }
    log.check_invariants().unwrap();
}

fn unflushed_records_survive_a_clean_restart<F: Fixture>(fx: F) {
    // A process restart (no power loss) keeps what was written; open syncs it before calling it
    // durable.
    let (mut log, _) = fx.open(small_config());
    for seq in 1..=20 {
        log.append(meta(1, seq), &payload(1, seq, 50)).unwrap();
    }
    drop(log);
    let (log, _) = fx.open(small_config());
    assert_conversation(&log, 1, &seqs(1..=20), |_| 50);
    assert_eq!(log.durable_lsn(), log.written_lsn());
}

fn records_roll_over_into_new_segments<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    let mut lsns = Vec::new();
    for seq in 1..=300 {
        lsns.push(log.append(meta(9, seq), &payload(9, seq, 100)).unwrap());
    }
    assert!(log.segment_count() > 10, "{}", log.segment_count());
    for (i, lsn) in lsns.iter().enumerate() {
        // No record straddles a segment boundary.
        let offset = lsn.0 % S;
        assert!(
            offset >= 64 && offset + 48 + 100 <= S,
            "record {i} at {lsn}"
        );
    }
    assert_conversation(&log, 9, &seqs(1..=300), |_| 100);
    assert_eq!(log.scan(Lsn(0)).count(), 300);
    drop(log);
    let (log, report) = fx.open(small_config());
    assert_eq!(report.records, 300);
    assert_conversation(&log, 9, &seqs(1..=300), |_| 100);
}

fn scan_from_any_lsn_returns_the_suffix<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    for seq in 1..=120 {
        log.append(
            meta(seq % 4, seq),
            &payload(seq % 4, seq, (seq % 90) as usize),
        )
        .unwrap();
    }
    let all: Vec<Lsn> = log.scan(Lsn(0)).map(|r| r.unwrap().lsn).collect();
    assert_eq!(all.len(), 120);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    for i in [0, 1, 44, 45, 46, 90, 119] {
        let from_exact: Vec<Lsn> = log.scan(all[i]).map(|r| r.unwrap().lsn).collect();
        assert_eq!(from_exact, all[i..]);
        let from_inside: Vec<Lsn> = log
            .scan(Lsn(all[i].0 + 1))
            .map(|r| r.unwrap().lsn)
            .collect();
        assert_eq!(from_inside, all[i + 1..]);
    }
    assert_eq!(log.scan(log.written_lsn()).count(), 0);
}

fn seq_not_increasing_is_rejected_and_changes_nothing<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    log.append(meta(1, 5), b"five").unwrap();
    let written = log.written_lsn();
    for bad in [5, 4, 0] {
        match log.append(meta(1, bad), b"bad") {
            Err(AppendError::SeqNotIncreasing {
                conversation: 1,
                seq,
                latest: 5,
            }) => assert_eq!(seq, bad),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(log.written_lsn(), written);
    log.append(meta(1, 6), b"six").unwrap();
    let got: Vec<u64> = log.read(1, 0..100).map(|r| r.unwrap().meta.seq).collect();
    assert_eq!(got, vec![5, 6]);
}

fn oversized_records_and_kind_zero_are_rejected<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    let max = log.max_payload() as usize;
    assert_eq!(max, 4096 - 64 - 48);
    match log.append(meta(1, 1), &vec![7; max + 1]) {
        Err(AppendError::TooLarge { len, max: m }) => {
            assert_eq!(len, 48 + max as u64 + 1);
            assert_eq!(m, 4096 - 64);
        }
        other => panic!("{other:?}"),
    }
    let mut m = meta(1, 1);
    m.kind = 0;
    assert!(matches!(log.append(m, b""), Err(AppendError::InvalidKind)));
    // The largest record fits, alone in a segment.
    log.append(meta(1, 1), &vec![7; max]).unwrap();
    log.append(meta(1, 2), &vec![8; max]).unwrap();
    log.append(meta(1, 3), b"").unwrap();
    drop(log);
    let (log, report) = fx.open(small_config());
    assert_eq!(report.records, 3);
    let lens: Vec<usize> = log
        .read(1, 0..10)
        .map(|r| r.unwrap().payload.len())
        .collect();
    assert_eq!(lens, vec![max, max, 0]);
}

fn flush_makes_records_durable<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    let a = log.append(meta(1, 1), b"a").unwrap();
    assert!(!log.is_durable(a));
    assert!(log.durable_lsn() <= a);
    let d = log.flush().unwrap();
    assert_eq!(d, log.written_lsn());
    assert!(log.is_durable(a));
    let b = log.append(meta(1, 2), b"b").unwrap();
    assert!(!log.is_durable(b));
    assert!(log.sync_ticket().is_some());
    log.flush().unwrap();
    assert!(log.sync_ticket().is_none());
}

fn sync_ticket_runs_on_another_thread_while_appending<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    let mut first = Vec::new();
    for seq in 1..=30 {
        first.push(log.append(meta(1, seq), &payload(1, seq, 64)).unwrap());
    }
    let ticket = log.sync_ticket().unwrap();
    assert_eq!(ticket.lsn(), log.written_lsn());
    let flusher = std::thread::spawn(move || ticket.run());
    let mut second = Vec::new();
    for seq in 31..=200 {
        second.push(log.append(meta(1, seq), &payload(1, seq, 64)).unwrap());
    }
    let lsn = flusher.join().unwrap().unwrap();
    log.complete_sync(lsn);
    assert!(first.iter().all(|&l| log.is_durable(l)));
    // The seal sync on each roll made earlier segments durable too, but not the active tail.
    assert!(!log.is_durable(*second.last().unwrap()));
    log.flush().unwrap();
    assert!(second.iter().all(|&l| log.is_durable(l)));
    assert_conversation(&log, 1, &seqs(1..=200), |_| 64);
}

fn rolls_use_the_prepared_spare<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    assert!(!log.has_spare());
    assert!(log.prepare_spare().unwrap());
    assert!(!log.prepare_spare().unwrap());
    let before = fx.bases();
    assert_eq!(before.len(), 2);
    let mut seq = 0;
    while log.segment_count() == 1 {
        seq += 1;
        log.append(meta(1, seq), &payload(1, seq, 200)).unwrap();
    }
    assert!(!log.has_spare());
    assert_eq!(
        fx.bases(),
        before,
        "the roll took the spare, created nothing"
    );
    let report = log.tick(now()).unwrap();
    assert!(report.spare_created);
    assert_eq!(fx.bases().len(), 3);
    // A reopen finds the spare again and keeps it.
    drop(log);
    let (log, report) = fx.open(small_config());
    assert!(log.has_spare());
    assert!(report.removed_segments.is_empty());
    assert_eq!(report.torn_tail, None);
    assert_conversation(&log, 1, &seqs(1..=seq), |_| 200);
}

fn retention_by_size_drops_oldest_segments_and_keeps_index_consistent<F: Fixture>(fx: F) {
    let mut config = small_config();
    config.retention = Retention {
        max_age: None,
        max_bytes: Some(3 * S),
    };
    let (mut log, _) = fx.open(config);
    for seq in 1..=150 {
        for conv in [1, 2] {
            log.append(meta(conv, seq), &payload(conv, seq, 100))
                .unwrap();
        }
    }
    let segments_before = log.segment_count();
    let report = log.apply_retention(now()).unwrap();
    assert_eq!(report.segments_removed, segments_before - 3);
    assert_eq!(log.segment_count(), 3);
    assert_eq!(report.first_lsn, log.first_lsn());
    assert_eq!(report.markers_written, 0);
    let check = |log: &parley_storage::Log<F::B>| {
        for conv in [1, 2] {
            let got: Vec<_> = log.read(conv, 0..u64::MAX).map(|r| r.unwrap()).collect();
            assert!(!got.is_empty());
            let first = got[0].meta.seq;
            assert_eq!(log.first_seq(conv), Some(first));
            assert_eq!(log.latest_seq(conv), Some(150));
            assert_eq!(
                got.iter().map(|r| r.meta.seq).collect::<Vec<_>>(),
                seqs(first..=150)
            );
            assert!(got.iter().all(|r| r.lsn >= log.first_lsn()));
            // Reads of the dropped range return only what remains.
            assert_eq!(log.read(conv, 0..first).count(), 0);
        }
    };
    check(&log);
    assert!(fx.bases().len() <= 4);
    drop(log);
    let (log, report) = fx.open(config);
    assert!(report.corruptions.is_empty());
    check(&log);
}

fn retention_by_age_drops_segments_older_than_max_age<F: Fixture>(fx: F) {
    let mut config = small_config();
    config.retention = Retention {
        max_age: Some(Duration::from_secs(5)),
        max_bytes: None,
    };
    let (mut log, _) = fx.open(config);
    let at = |seq: u64, secs: i64| {
        let mut m = meta(1, seq);
        m.timestamp = Timestamp::from_micros(T0 + secs * 1_000_000);
        m
    };
    for seq in 1..=100 {
        log.append(at(seq, 0), &payload(1, seq, 100)).unwrap();
    }
    let young_from = log.written_lsn();
    for seq in 101..=200 {
        log.append(at(seq, 10), &payload(1, seq, 100)).unwrap();
    }
    // At T0+11 s the first batch is 11 s old, the second 1 s.
    let r = log
        .apply_retention(Timestamp::from_micros(T0 + 11_000_000))
        .unwrap();
    assert!(r.segments_removed > 0);
    // Everything of the second batch is kept, and the boundary segment too.
    assert!(log.first_lsn().0 <= young_from.0 && young_from.0 - log.first_lsn().0 < S);
    let got: Vec<u64> = log
        .read(1, 0..u64::MAX)
        .map(|r| r.unwrap().meta.seq)
        .collect();
    let first = got[0];
    assert!(first <= 101);
    assert_eq!(got, seqs(first..=200));
    // Nothing older is due yet.
    let r = log
        .apply_retention(Timestamp::from_micros(T0 + 14_000_000))
        .unwrap();
    assert_eq!(r.segments_removed, 0);
}

fn latest_seq_survives_retention_and_reopen<F: Fixture>(fx: F) {
    let mut config = small_config();
    config.retention.max_bytes = Some(2 * S);
    let (mut log, _) = fx.open(config);
    for seq in 1..=5 {
        log.append(meta(1, seq), b"early").unwrap();
    }
    for seq in 1..=100 {
        log.append(meta(2, seq), &payload(2, seq, 100)).unwrap();
    }
    let r = log.apply_retention(now()).unwrap();
    assert_eq!(r.markers_written, 1);
    assert_eq!(log.first_seq(1), None);
    assert_eq!(log.latest_seq(1), Some(5));
    assert_eq!(log.read(1, 0..100).count(), 0);
    // Markers are invisible to scan.
    assert!(log.scan(Lsn(0)).all(|r| r.unwrap().meta.conversation == 2));
    drop(log);
    let (mut log, _) = fx.open(config);
    assert_eq!(log.latest_seq(1), Some(5));
    assert_eq!(log.first_seq(1), None);
    assert!(matches!(
        log.append(meta(1, 5), b"reused seq"),
        Err(AppendError::SeqNotIncreasing { latest: 5, .. })
    ));
    log.append(meta(1, 6), b"next").unwrap();
    assert_eq!(log.first_seq(1), Some(6));
    // Rolling the marker's segment away writes a new marker: still known after more retention.
    for seq in 101..=300 {
        log.append(meta(2, seq), &payload(2, seq, 100)).unwrap();
    }
    log.apply_retention(now()).unwrap();
    drop(log);
    let (log, _) = fx.open(config);
    assert_eq!(log.latest_seq(1), Some(6));
    assert_eq!(log.latest_seq(2), Some(300));
}

/// Builds a log whose last record (conversation 1, seq 60) sits in segment 1, after a full
/// segment 0. Returns (lsn of the last record, its length without padding).
fn build_with_last_record_in_second_segment<F: Fixture>(fx: &F) -> (u64, usize) {
    let (mut log, _) = fx.open(small_config());
    let mut last = Lsn(0);
    for seq in 1..=60 {
        last = log.append(meta(1, seq), &payload(1, seq, 40)).unwrap();
    }
    assert_eq!(last.0 / S, 1, "last record in segment 1");
    log.flush().unwrap();
    (last.0, 48 + 40)
}

fn torn_damage_at_every_offset_of_the_last_record_is_cut<F: Fixture>(
    fx: F,
    damage: fn(&mut [u8], usize),
) {
    let (last, len) = build_with_last_record_in_second_segment(&fx);
    let base = last / S * S;
    let mut snapshot = Vec::new();
    fx.modify(base, &mut |b| snapshot = b.to_vec());
    for off in 0..len {
        fx.modify(base, &mut |b| {
            b.copy_from_slice(&snapshot);
            damage(b, (last - base) as usize + off);
        });
        let (mut log, report) = fx.open(small_config());
        assert!(report.corruptions.is_empty(), "offset {off}");
        assert_eq!(
            log.written_lsn(),
            Lsn(last),
            "offset {off}: cut at the last record"
        );
        assert_conversation(&log, 1, &seqs(1..=59), |_| 40);
        assert_eq!(log.scan(Lsn(0)).filter(|r| r.is_err()).count(), 0);
        // Appends after recovery work and survive another reopen.
        log.append(meta(1, 60), &payload(1, 60, 40)).unwrap();
        log.append(meta(1, 61), &payload(1, 61, 40)).unwrap();
        log.flush().unwrap();
        drop(log);
        let (log, report) = fx.open(small_config());
        assert_eq!(report.torn_tail, None, "offset {off}");
        assert_conversation(&log, 1, &seqs(1..=61), |_| 40);
        log.check_invariants().unwrap();
    }
}

fn torn_write_at_every_offset_of_the_last_record_is_cut<F: Fixture>(fx: F) {
    // Everything from the offset to the end of the segment never reached the disk.
    torn_damage_at_every_offset_of_the_last_record_is_cut(fx, |b, at| b[at..].fill(0));
}

fn corrupt_byte_at_every_offset_of_the_last_record_is_cut<F: Fixture>(fx: F) {
    torn_damage_at_every_offset_of_the_last_record_is_cut(fx, |b, at| b[at] ^= 0x5A);
}

fn stale_records_after_a_lost_page_are_never_resurrected<F: Fixture>(fx: F) {
    // Out-of-order writeback: record 3's bytes were lost but records 4 and 5 reached the disk.
    let (mut log, _) = fx.open(small_config());
    let lsns: Vec<Lsn> = (1..=5)
        .map(|seq| log.append(meta(1, seq), &payload(1, seq, 40)).unwrap())
        .collect();
    drop(log);
    let (r3, r4) = (lsns[2].0 as usize, lsns[3].0 as usize);
    fx.modify(0, &mut |b| b[r3..r4].fill(0));
    let (mut log, report) = fx.open(small_config());
    let torn = report.torn_tail.expect("stale bytes were erased");
    assert_eq!(torn.lsn, lsns[2]);
    assert!(torn.bytes_zeroed > 0);
    assert_conversation(&log, 1, &seqs(1..=2), |_| 40);
    // A new record 3 of the same length ends exactly where the stale record 4 started.
    assert_eq!(log.append(meta(1, 3), &payload(1, 3, 40)).unwrap(), lsns[2]);
    drop(log);
    let (log, report) = fx.open(small_config());
    assert_eq!(report.torn_tail, None);
    assert_conversation(&log, 1, &seqs(1..=3), |_| 40);
    assert_eq!(log.scan(Lsn(0)).count(), 3);
    log.check_invariants().unwrap();
}

fn corruption_in_a_sealed_segment_is_reported_and_skipped<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    let mut lsns = Vec::new();
    for seq in 1..=120 {
        lsns.push(log.append(meta(1, seq), &payload(1, seq, 40)).unwrap());
    }
    assert!(log.segment_count() >= 3);
    drop(log);
    // Flip a bit in the payload of record 10 (segment 0, sealed).
    let bad = lsns[9].0;
    fx.modify(0, &mut |b| b[bad as usize + 60] ^= 1);
    let (log, report) = fx.open(small_config());
    assert_eq!(report.corruptions.len(), 1);
    let c = report.corruptions[0];
    assert_eq!(
        (c.segment, c.offset, c.kind),
        (Lsn(0), bad, CorruptionKind::Checksum)
    );
    assert_eq!(report.torn_tail, None);
    let in_seg0 = lsns.iter().filter(|l| l.0 < S).count() as u64;
    let expected: Vec<u64> = (1..=9).chain(in_seg0 + 1..=120).collect();
    assert_conversation(&log, 1, &expected, |_| 40);
    assert_eq!(log.latest_seq(1), Some(120));
}

fn existing_segment_size_wins_over_the_configured_one<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    for seq in 1..=100 {
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    drop(log);
    let mut bigger = small_config();
    bigger.segment_size = 16 * S;
    let (mut log, report) = fx.open(bigger);
    assert_eq!(report.segment_size, S);
    assert_eq!(log.segment_size(), S);
    log.append(meta(1, 101), &payload(1, 101, 100)).unwrap();
    assert_conversation(&log, 1, &seqs(1..=101), |_| 100);
}

/// Appends `n` rounds over conversations 1..=5 with varying payload sizes (several segments),
/// writes the sealed segments' index files (prepare_spare), flushes, closes.
fn build_multi_segment_log<F: Fixture>(fx: &F, rounds: u64) -> Vec<(u64, u64, u64, Vec<u8>)> {
    let (mut log, _) = fx.open(small_config());
    for seq in 1..=rounds {
        for conv in 1..=5u64 {
            if (seq + conv) % 3 == 0 {
                continue;
            }
            let len = ((seq * 31 + conv * 7) % 200) as usize;
            log.append(meta(conv, seq), &payload(conv, seq, len))
                .unwrap();
        }
        if seq % 10 == 0 {
            log.prepare_spare().unwrap();
        }
    }
    log.prepare_spare().unwrap();
    log.flush().unwrap();
    assert!(log.segment_count() >= 6, "{}", log.segment_count());
    let snap = snapshot(&log, 1..=5);
    drop(log);
    snap
}

fn len_in_multi(conv: u64, seq: u64) -> usize {
    ((seq * 31 + conv * 7) % 200) as usize
}

fn sealed_segments_open_from_their_index_files<F: Fixture>(fx: F) {
    let before = build_multi_segment_log(&fx, 120);
    let (log, report) = fx.open(small_config());
    let sealed = log.segment_count() - 1;
    assert_eq!(report.indexed_segments, sealed, "{}", fx.name());
    assert_eq!(
        report.scanned_segments, 1,
        "only the active segment is scanned"
    );
    assert!(report.index_problems.is_empty());
    assert_eq!(report.indexes_written, 0);
    assert_eq!(fx.indexed().len(), sealed);
    assert_eq!(snapshot(&log, 1..=5), before);
    for conv in 1..=5u64 {
        let want: Vec<u64> = (1..=120).filter(|s| (s + conv) % 3 != 0).collect();
        assert_conversation(&log, conv, &want, |seq| len_in_multi(conv, seq));
        assert_eq!(log.latest_seq(conv), want.last().copied());
        assert_eq!(log.first_seq(conv), want.first().copied());
        // Sub-ranges across segment boundaries, and their exact lengths.
        for (a, b) in [
            (0, 1),
            (1, 2),
            (5, 77),
            (40, 41),
            (60, 121),
            (119, 500),
            (200, 300),
        ] {
            let got: Vec<u64> = log.read(conv, a..b).map(|r| r.unwrap().meta.seq).collect();
            let exp: Vec<u64> = want
                .iter()
                .copied()
                .filter(|s| (a..b).contains(s))
                .collect();
            assert_eq!(got, exp, "conv {conv} {a}..{b}");
            assert_eq!(log.read(conv, a..b).len(), exp.len());
        }
    }
    assert_eq!(log.scan(Lsn(0)).count(), before.len());
    log.check_invariants().unwrap();
}

fn logs_without_index_files_are_scanned_then_indexed<F: Fixture>(fx: F) {
    let before = build_multi_segment_log(&fx, 100);
    // As a log written before index files existed.
    for name in fx.sides() {
        fx.set_side(name, None);
    }
    let (log, report) = fx.open(small_config());
    let sealed = log.segment_count() - 1;
    assert_eq!(report.indexed_segments, 0);
    assert_eq!(report.scanned_segments, sealed + 1);
    assert!(
        report.index_problems.is_empty(),
        "a missing index is no problem"
    );
    assert_eq!(report.indexes_written, sealed);
    assert_eq!(snapshot(&log, 1..=5), before);
    drop(log);
    let (log, report) = fx.open(small_config());
    assert_eq!(report.indexed_segments, sealed);
    assert_eq!(snapshot(&log, 1..=5), before);
}

fn damaged_or_stale_index_files_fall_back_to_a_scan<F: Fixture>(fx: F) {
    let before = build_multi_segment_log(&fx, 100);
    let bases = fx.indexed();
    assert!(bases.len() >= 4);
    let original: Vec<Vec<u8>> = bases
        .iter()
        .map(|&b| fx.side(SideFile::Index(b)).unwrap())
        .collect();
    type Damage = fn(&mut Vec<u8>, &[u8]);
    let cases: [(&str, Damage, Option<IndexError>); 7] = [
        ("header byte", |b, _| b[20] ^= 1, Some(IndexError::Checksum)),
        ("magic", |b, _| b[0] = b'X', Some(IndexError::Header)),
        (
            "summary byte",
            |b, _| b[100] ^= 0x40,
            Some(IndexError::Checksum),
        ),
        (
            "truncated",
            |b, _| b.truncate(b.len() - 5),
            Some(IndexError::Malformed),
        ),
        ("empty", |b, _| b.clear(), Some(IndexError::Header)),
        (
            "another segment's",
            |b, other| *b = other.to_vec(),
            Some(IndexError::Stale),
        ),
        // The entry blocks are only checked when read: found then, and the read scans instead.
        ("last entry byte", |b, _| *b.last_mut().unwrap() ^= 1, None),
    ];
    for (what, damage, problem) in cases {
        let victim = bases[1];
        let mut bytes = original[1].clone();
        damage(&mut bytes, &original[2]);
        fx.set_side(SideFile::Index(victim), Some(bytes));
        let (log, report) = fx.open(small_config());
        assert_eq!(snapshot(&log, 1..=5), before, "{what}");
        match problem {
            Some(kind) => {
                assert_eq!(report.index_problems.len(), 1, "{what}");
                assert_eq!(report.index_problems[0].segment, Lsn(victim));
                assert_eq!(report.index_problems[0].kind, kind, "{what}");
                assert_eq!(report.scanned_segments, 2, "{what}");
                assert_eq!(report.indexes_written, 1, "{what}: rewritten");
                assert_eq!(
                    fx.side(SideFile::Index(victim)).as_ref(),
                    Some(&original[1])
                );
            }
            None => assert!(report.index_problems.is_empty(), "{what}"),
        }
        log.check_invariants().unwrap();
        drop(log);
        fx.set_side(SideFile::Index(victim), Some(original[1].clone()));
    }
    // An index of the active segment (e.g. from before a crash) is removed, never used.
    let active = *fx.bases().iter().rev().nth(1).unwrap_or(&0);
    fx.set_side(SideFile::Index(active), Some(original[0].clone()));
    fx.set_side(SideFile::Index(1 << 40), Some(original[0].clone()));
    let (log, report) = fx.open(small_config());
    assert!(report.index_problems.is_empty());
    assert_eq!(snapshot(&log, 1..=5), before);
    drop(log);
    assert_eq!(fx.indexed(), bases, "orphans removed");
}

fn index_entries_damaged_on_disk_are_caught_at_read<F: Fixture>(fx: F) {
    let before = build_multi_segment_log(&fx, 100);
    // Flip a byte inside every entry block of every index (past header and summary).
    for base in fx.indexed() {
        let mut b = fx.side(SideFile::Index(base)).unwrap();
        let convs = u32::from_le_bytes(b[68..72].try_into().unwrap()) as usize;
        let blocks = 96 + 48 * convs;
        for i in (blocks..b.len()).step_by(97) {
            b[i] ^= 0x10;
        }
        fx.set_side(SideFile::Index(base), Some(b));
    }
    let (log, report) = fx.open(small_config());
    assert!(
        report.index_problems.is_empty(),
        "blocks are not read at open"
    );
    assert_eq!(snapshot(&log, 1..=5), before);
    for conv in 1..=5u64 {
        let want: Vec<u64> = (1..=100)
            .filter(|s| (s + conv) % 3 != 0 && (30..70).contains(s))
            .collect();
        let got: Vec<u64> = log
            .read(conv, 30..70)
            .map(|r| r.unwrap().meta.seq)
            .collect();
        assert_eq!(got, want);
        assert_eq!(log.read(conv, 30..70).len(), want.len());
    }
}

fn retention_removes_index_files_with_their_segments<F: Fixture>(fx: F) {
    build_multi_segment_log(&fx, 120);
    let mut config = small_config();
    config.retention.max_bytes = Some(3 * S);
    let (mut log, _) = fx.open(config);
    let r = log.apply_retention(now()).unwrap();
    assert!(r.segments_removed > 0);
    let first = log.first_lsn().get();
    assert!(
        fx.indexed().iter().all(|&b| b >= first),
        "{:?}",
        fx.indexed()
    );
    let kept = snapshot(&log, 1..=5);
    drop(log);
    let (log, report) = fx.open(config);
    assert!(report.index_problems.is_empty());
    assert_eq!(snapshot(&log, 1..=5), kept);
}

fn spare_ticket_runs_on_another_thread<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    let mut seq = 0;
    // Seal a few segments (no index files yet), then hand the work to a thread.
    while log.segment_count() < 4 {
        seq += 1;
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    assert!(fx.indexed().is_empty());
    let ticket = log
        .spare_ticket()
        .expect("a spare and three indexes to write");
    assert!(ticket.creates_spare());
    assert!(log.spare_ticket().is_none(), "one ticket at a time");
    assert!(
        !log.prepare_spare().unwrap(),
        "no work on this thread while a ticket is out"
    );
    let worker = std::thread::spawn(move || ticket.run());
    // Appends go on meanwhile (they stay in the active segment: 3 small ones).
    let mut small = Vec::new();
    for _ in 0..3 {
        seq += 1;
        small.push(seq);
        log.append(meta(1, seq), &payload(1, seq, 10)).unwrap();
    }
    let done = worker.join().unwrap();
    assert!(log.install_spare(done).unwrap());
    assert!(log.has_spare());
    assert_eq!(fx.indexed().len(), 3);
    assert!(log.spare_ticket().is_none(), "nothing left to do");
    // A ticket overtaken by a roll: its spare is dropped, the log goes on with its own.
    while log.segment_count() < 5 {
        seq += 1;
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    let ticket = log.spare_ticket().expect("spare and one index");
    while log.segment_count() < 6 {
        seq += 1;
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    let done = std::thread::spawn(move || ticket.run()).join().unwrap();
    let _ = log.install_spare(done);
    for _ in 0..60 {
        seq += 1;
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    // A dropped ticket frees the slot.
    drop(log.spare_ticket());
    assert!(log.prepare_spare().unwrap());
    log.flush().unwrap();
    let before = snapshot(&log, [1]);
    drop(log);
    let (log, report) = fx.open(small_config());
    assert!(
        report.index_problems.is_empty(),
        "{:?}",
        report.index_problems
    );
    assert_eq!(snapshot(&log, [1]), before);
    assert_conversation(&log, 1, &seqs(1..=seq), |s| {
        if small.contains(&s) { 10 } else { 100 }
    });
    log.check_invariants().unwrap();
}

fn checkpoint_survives_reopen_and_scan_resumes_from_it<F: Fixture>(fx: F) {
    let (mut log, report) = fx.open(small_config());
    assert_eq!(report.checkpoint, None);
    assert_eq!(log.checkpoint(), None);
    for seq in 1..=80 {
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    // Not durable yet: refused.
    let written = log.written_lsn();
    match log.write_checkpoint(written, b"too early") {
        Err(StorageError::CheckpointBeyondDurable { covers, durable }) => {
            assert_eq!(covers, written);
            assert!(durable < written);
        }
        other => panic!("{other:?}"),
    }
    log.flush().unwrap();
    let covers = log.written_lsn();
    log.write_checkpoint(covers, b"state after 80").unwrap();
    assert_eq!(log.checkpoint(), Some((covers, &b"state after 80"[..])));
    for seq in 81..=100 {
        log.append(meta(1, seq), &payload(1, seq, 100)).unwrap();
    }
    log.prepare_spare().unwrap();
    drop(log);
    let (log, report) = fx.open(small_config());
    assert_eq!(report.checkpoint, Some(covers));
    assert_eq!(report.checkpoint_ignored, None);
    let (at, state) = log.checkpoint().unwrap();
    assert_eq!((at, state), (covers, &b"state after 80"[..]));
    let replay: Vec<u64> = log.scan(at).map(|r| r.unwrap().meta.seq).collect();
    assert_eq!(replay, seqs(81..=100));
    // A newer checkpoint replaces it.
    drop(log);
    let (mut log, _) = fx.open(small_config());
    log.write_checkpoint(Lsn(0), b"").unwrap();
    drop(log);
    let (log, _) = fx.open(small_config());
    assert_eq!(log.checkpoint(), Some((Lsn(0), &b""[..])));
}

fn bad_checkpoints_are_ignored_and_reported<F: Fixture>(fx: F) {
    let (mut log, _) = fx.open(small_config());
    for seq in 1..=10 {
        log.append(meta(1, seq), &payload(1, seq, 40)).unwrap();
    }
    log.flush().unwrap();
    let lsn9 = log.read(1, 9..10).next().unwrap().unwrap().lsn;
    let covers = log.written_lsn();
    log.write_checkpoint(covers, b"ten").unwrap();
    drop(log);
    let good = fx.side(SideFile::Checkpoint).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1;
    fx.set_side(SideFile::Checkpoint, Some(bad));
    let (log, report) = fx.open(small_config());
    assert_eq!(report.checkpoint_ignored, Some(CheckpointProblem::Corrupt));
    assert_eq!(log.checkpoint(), None);
    drop(log);
    // The log lost the records it covers (here: damaged, cut at record 9).
    fx.set_side(SideFile::Checkpoint, Some(good));
    fx.modify(0, &mut |b| b[lsn9.get() as usize + 50] ^= 1);
    let (log, report) = fx.open(small_config());
    assert_eq!(log.written_lsn(), lsn9);
    assert_eq!(
        report.checkpoint_ignored,
        Some(CheckpointProblem::BeyondLog {
            covers,
            written: lsn9
        })
    );
    assert_eq!(log.checkpoint(), None);
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod mmap { $( #[test] fn $test() { super::$test(super::MmapFx::new()) } )* }
        mod pwrite { $( #[test] fn $test() { super::$test(super::PwriteFx::new()) } )* }
        mod memory { $( #[test] fn $test() { super::$test(super::MemFx::new()) } )* }
        mod faulty_memory { $( #[test] fn $test() { super::$test(super::FaultyFx::new()) } )* }
    };
}

suite!(
    append_then_read_returns_records_in_seq_order,
    latest_and_first_seq_follow_appends,
    reopen_returns_the_same_records,
    unflushed_records_survive_a_clean_restart,
    records_roll_over_into_new_segments,
    scan_from_any_lsn_returns_the_suffix,
    seq_not_increasing_is_rejected_and_changes_nothing,
    oversized_records_and_kind_zero_are_rejected,
    flush_makes_records_durable,
    sync_ticket_runs_on_another_thread_while_appending,
    rolls_use_the_prepared_spare,
    retention_by_size_drops_oldest_segments_and_keeps_index_consistent,
    retention_by_age_drops_segments_older_than_max_age,
    latest_seq_survives_retention_and_reopen,
    torn_write_at_every_offset_of_the_last_record_is_cut,
    corrupt_byte_at_every_offset_of_the_last_record_is_cut,
    stale_records_after_a_lost_page_are_never_resurrected,
    corruption_in_a_sealed_segment_is_reported_and_skipped,
    existing_segment_size_wins_over_the_configured_one,
    sealed_segments_open_from_their_index_files,
    logs_without_index_files_are_scanned_then_indexed,
    damaged_or_stale_index_files_fall_back_to_a_scan,
    index_entries_damaged_on_disk_are_caught_at_read,
    retention_removes_index_files_with_their_segments,
    spare_ticket_runs_on_another_thread,
    checkpoint_survives_reopen_and_scan_resumes_from_it,
    bad_checkpoints_are_ignored_and_reported,
);
