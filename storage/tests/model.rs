//! Property test: random appends, reads, flushes, reopens, crashes, spares (on this thread and as
//! tickets held across other operations), retention, damaged and missing segment index files and
//! checkpoints against a simple model (a Vec of records plus each conversation's latest seq).
//! Logs roll every few records, so most reads cross sealed segments and their index files.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use parley_storage::{
    AppendError, Backend, Log, Lsn, MemoryBackend, MmapBackend, Retention, SideFile, SpareTicketOf,
    Timestamp,
};
use proptest::prelude::*;

const S: u64 = 4096;

#[derive(Debug, Clone)]
enum Op {
    /// Append to `conv` with seq = latest + delta (delta 0 must be refused).
    Append {
        conv: u64,
        delta: u64,
        len: usize,
    },
    Read {
        conv: u64,
        a: u64,
        b: u64,
    },
    Flush,
    Reopen,
    /// Power loss: only durable bytes survive (memory backend; a plain reopen otherwise).
    Crash,
    Spare,
    /// Advance the clock by this many seconds.
    Advance(u64),
    RetainBytes(u64),
    RetainAge(u64),
    /// Take a spare ticket (if none is held) and keep it across the next operations.
    TakeTicket,
    /// Run the held ticket on another thread and install its result.
    RunTicket,
    /// Close, flip one byte of one index file (pick, byte, both modulo), reopen.
    DamageIndex(usize, usize),
    /// Close, delete every index file, reopen.
    DropIndexes,
    /// Write a checkpoint at the durable LSN.
    Checkpoint,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0..5u64, 0..3u64, 0..700usize).prop_map(|(conv, delta, len)| Op::Append { conv, delta, len }),
        4 => (0..5u64, 0..40u64, 0..40u64).prop_map(|(conv, a, b)| Op::Read { conv, a, b }),
        3 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => Just(Op::Spare),
        2 => (1..20u64).prop_map(Op::Advance),
        1 => (1..6u64).prop_map(Op::RetainBytes),
        1 => (1..30u64).prop_map(Op::RetainAge),
        2 => Just(Op::TakeTicket),
        2 => Just(Op::RunTicket),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(p, b)| Op::DamageIndex(p, b)),
        1 => Just(Op::DropIndexes),
        1 => Just(Op::Checkpoint),
    ]
}

#[derive(Debug, Clone)]
struct Rec {
    conv: u64,
    seq: u64,
    len: usize,
    lsn: Lsn,
    ts: i64,
}

trait Harness {
    type B: Backend;
    fn open(&mut self) -> Log<Self::B>;
    /// Replaces the storage by its crash image; false if the backend can not.
    fn crash(&mut self) -> bool;
    /// Index files present, sorted by base (no log open).
    fn indexes(&mut self) -> Vec<u64>;
    /// Flips one byte of an index file (no log open).
    fn flip(&mut self, base: u64, at: usize);
    /// Deletes an index file (no log open).
    fn remove_index(&mut self, base: u64);
}

struct Mem(MemoryBackend);
impl Harness for Mem {
    type B = MemoryBackend;
    fn open(&mut self) -> Log<MemoryBackend> {
        Log::open(self.0.clone(), small_config(), now()).unwrap().0
    }
    fn crash(&mut self) -> bool {
        self.0 = self.0.crash_image();
        true
    }
    fn indexes(&mut self) -> Vec<u64> {
        index_bases(self.0.list_side().unwrap())
    }
    fn flip(&mut self, base: u64, at: usize) {
        self.0.modify_side(SideFile::Index(base), |b| {
            if !b.is_empty() {
                let i = at % b.len();
                b[i] ^= 0x20;
            }
        });
    }
    fn remove_index(&mut self, base: u64) {
        self.0.remove_side(SideFile::Index(base)).unwrap();
    }
}

fn index_bases(sides: Vec<SideFile>) -> Vec<u64> {
    let mut v: Vec<u64> = sides
        .into_iter()
        .filter_map(|s| match s {
            SideFile::Index(b) => Some(b),
            SideFile::Checkpoint => None,
        })
        .collect();
    v.sort();
    v
}

struct Files(tempfile::TempDir);
impl Harness for Files {
    type B = MmapBackend;
    fn open(&mut self) -> Log<MmapBackend> {
        Log::open(
            MmapBackend::open(self.0.path()).unwrap(),
            small_config(),
            now(),
        )
        .unwrap()
        .0
    }
    fn crash(&mut self) -> bool {
        false
    }
    fn indexes(&mut self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(self.0.path())
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().to_string();
                n.strip_suffix(".idx")?.parse().ok()
            })
            .collect();
        v.sort();
        v
    }
    fn flip(&mut self, base: u64, at: usize) {
        let p = self.0.path().join(format!("{base:020}.idx"));
        let mut b = std::fs::read(&p).unwrap();
        if !b.is_empty() {
            let i = at % b.len();
            b[i] ^= 0x20;
        }
        std::fs::write(&p, b).unwrap();
    }
    fn remove_index(&mut self, base: u64) {
        std::fs::remove_file(self.0.path().join(format!("{base:020}.idx"))).unwrap();
    }
}

/// A checkpoint written: the LSN passed, the payload, the LSNs of the records it reflects.
type Ckpt = (Lsn, Vec<u8>, std::collections::HashSet<Lsn>);

fn record_meta(r: &Rec) -> parley_storage::RecordMeta {
    let mut m = meta(r.conv, r.seq);
    m.timestamp = Timestamp::from_micros(r.ts);
    m
}

fn check<B: Backend>(
    log: &Log<B>,
    model: &[Rec],
    latest: &HashMap<u64, u64>,
    checkpoint: Option<&Ckpt>,
) -> Result<(), TestCaseError> {
    for conv in 0..5u64 {
        let want: Vec<&Rec> = model
            .iter()
            .filter(|r| r.conv == conv && conv != 0)
            .collect();
        let got: Vec<_> = log.read(conv, 0..u64::MAX).map(|r| r.unwrap()).collect();
        prop_assert_eq!(got.len(), want.len(), "conversation {}", conv);
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!(g.lsn, w.lsn);
            prop_assert_eq!(g.meta, record_meta(w));
            prop_assert_eq!(g.payload, &payload(w.conv, w.seq, w.len)[..]);
        }
        if conv != 0 {
            prop_assert_eq!(log.latest_seq(conv), latest.get(&conv).copied());
            prop_assert_eq!(log.first_seq(conv), want.first().map(|r| r.seq));
        }
    }
    let scanned: Vec<Lsn> = log.scan(Lsn(0)).map(|r| r.unwrap().lsn).collect();
    let want: Vec<Lsn> = model.iter().map(|r| r.lsn).collect();
    prop_assert_eq!(scanned, want);
    // The log may store a lower LSN with the same records below it (`write_checkpoint`).
    prop_assert_eq!(
        log.checkpoint().map(|(_, p)| p),
        checkpoint.map(|(_, p, _)| &p[..])
    );
    if let (Some((covers, _, reflected)), Some((stored, _))) = (checkpoint, log.checkpoint()) {
        prop_assert!(stored <= *covers);
        // A replay from the checkpoint returns exactly the records it does not reflect (also
        // those appended after a crash below the LSN that was passed).
        let replay: Vec<Lsn> = log.scan(stored).map(|r| r.unwrap().lsn).collect();
        let want: Vec<Lsn> = model
            .iter()
            .map(|r| r.lsn)
            .filter(|l| !reflected.contains(l))
            .collect();
        prop_assert_eq!(replay, want);
    }
    prop_assert_eq!(log.check_invariants(), Ok(()));
    Ok(())
}

fn run<H: Harness>(mut h: H, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut log = h.open();
    let mut ticket: Option<SpareTicketOf<H::B>> = None;
    let mut checkpoint: Option<Ckpt> = None;
    let mut model: Vec<Rec> = Vec::new();
    let mut latest: HashMap<u64, u64> = HashMap::new();
    // Latest seq carried by seq markers (durable: retention flushes).
    let mut floor: HashMap<u64, u64> = HashMap::new();
    let mut clock = T0;
    for op in ops {
        match op {
            Op::Append { conv, delta, len } => {
                let seq = latest.get(&conv).map_or(delta, |l| l + delta);
                let rec = Rec {
                    conv,
                    seq,
                    len,
                    lsn: Lsn(0),
                    ts: clock,
                };
                let r = log.append(record_meta(&rec), &payload(conv, seq, len));
                let refused = conv != 0 && delta == 0 && latest.contains_key(&conv);
                match r {
                    Ok(lsn) => {
                        prop_assert!(!refused, "seq {} accepted for {}", seq, conv);
                        prop_assert!(model.last().is_none_or(|l| l.lsn < lsn));
                        if conv != 0 {
                            latest.insert(conv, seq);
                        }
                        model.push(Rec { lsn, ..rec });
                    }
                    Err(AppendError::SeqNotIncreasing { .. }) => prop_assert!(refused),
                    Err(e) => return Err(TestCaseError::fail(format!("{e:?}"))),
                }
            }
            Op::Read { conv, a, b } => {
                let got: Vec<u64> = log.read(conv, a..b).map(|r| r.unwrap().meta.seq).collect();
                let want: Vec<u64> = model
                    .iter()
                    .filter(|r| conv != 0 && r.conv == conv && (a..b).contains(&r.seq))
                    .map(|r| r.seq)
                    .collect();
                prop_assert_eq!(got, want);
            }
            Op::Flush => {
                let d = log.flush().unwrap();
                prop_assert_eq!(d, log.written_lsn());
            }
            Op::Reopen => {
                ticket = None;
                drop(log);
                log = h.open();
                check(&log, &model, &latest, checkpoint.as_ref())?;
            }
            Op::Crash => {
                ticket = None;
                let durable = log.durable_lsn();
                drop(log);
                if h.crash() {
                    model.retain(|r| log_is_durable(r.lsn, durable));
                    latest = floor.clone();
                    for r in &model {
                        if r.conv != 0 {
                            let l = latest.entry(r.conv).or_insert(r.seq);
                            *l = (*l).max(r.seq);
                        }
                    }
                }
                log = h.open();
                check(&log, &model, &latest, checkpoint.as_ref())?;
            }
            Op::Spare => {
                log.prepare_spare().unwrap();
            }
            Op::TakeTicket => {
                if ticket.is_none() {
                    ticket = log.spare_ticket();
                }
            }
            Op::RunTicket => {
                if let Some(t) = ticket.take() {
                    let done = std::thread::spawn(move || t.run()).join().unwrap();
                    log.install_spare(done).unwrap();
                }
            }
            Op::DamageIndex(pick, at) => {
                ticket = None;
                drop(log);
                let bases = h.indexes();
                if !bases.is_empty() {
                    h.flip(bases[pick % bases.len()], at);
                }
                log = h.open();
                check(&log, &model, &latest, checkpoint.as_ref())?;
            }
            Op::DropIndexes => {
                ticket = None;
                drop(log);
                for base in h.indexes() {
                    h.remove_index(base);
                }
                log = h.open();
                check(&log, &model, &latest, checkpoint.as_ref())?;
            }
            Op::Checkpoint => {
                let covers = log.durable_lsn();
                let payload = format!("{} records", model.len()).into_bytes();
                log.write_checkpoint(covers, &payload).unwrap();
                let reflected = model
                    .iter()
                    .map(|r| r.lsn)
                    .filter(|&l| l < covers)
                    .collect();
                checkpoint = Some((covers, payload, reflected));
            }
            Op::Advance(secs) => clock += secs as i64 * 1_000_000,
            Op::RetainBytes(_) | Op::RetainAge(_) => {
                let retention = match op {
                    Op::RetainBytes(n) => Retention {
                        max_bytes: Some(n * S),
                        max_age: None,
                    },
                    Op::RetainAge(s) => Retention {
                        max_bytes: None,
                        max_age: Some(Duration::from_secs(s)),
                    },
                    _ => unreachable!(),
                };
                let before = log.segment_count();
                let active_base = log.written_lsn().0 / S * S;
                log.set_retention(retention);
                let report = log.apply_retention(Timestamp::from_micros(clock)).unwrap();
                let first = log.first_lsn();
                prop_assert_eq!(first.0 % S, 0);
                prop_assert!(first.0 <= active_base);
                if let Some(max) = retention.max_bytes {
                    prop_assert!(log.segment_count() as u64 <= (max / S).max(1) + 1);
                }
                prop_assert!(report.segments_removed <= before);
                // Conversations left without records keep their latest seq (marker, durable).
                for (&conv, &l) in &latest {
                    let had = model.iter().any(|r| r.conv == conv);
                    let has = model.iter().any(|r| r.conv == conv && r.lsn >= first);
                    if had && !has {
                        floor.insert(conv, l);
                    }
                }
                model.retain(|r| r.lsn >= first);
                check(&log, &model, &latest, checkpoint.as_ref())?;
            }
        }
    }
    check(&log, &model, &latest, checkpoint.as_ref())
}

fn log_is_durable(lsn: Lsn, durable: Lsn) -> bool {
    lsn < durable
}

/// `PROPTEST_CASES` if set (for long runs), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]
    #[test]
    fn memory_backend_matches_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(Mem(MemoryBackend::new()), ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]
    #[test]
    fn mmap_backend_matches_the_model(ops in proptest::collection::vec(op(), 1..50)) {
        run(Files(tempfile::tempdir().unwrap()), ops)?;
    }
}
