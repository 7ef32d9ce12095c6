//! Shared test fixtures: one `Fixture` per backend, so the same test body runs over all of them.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use parley_storage::{
    Backend, Durability, Faults, FaultyBackend, Log, LogConfig, MemoryBackend, MmapBackend,
    PwriteBackend, RecordMeta, RecoveryReport, Retention, SideFile, Timestamp,
};

pub const T0: i64 = 1_700_000_000_000_000;

pub fn now() -> Timestamp {
    Timestamp::from_micros(T0)
}

/// Small segments so tests roll often; no prefault (speed).
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_size: 4096,
        durability: Durability::Always,
        retention: Retention::default(),
        prefault: false,
    }
}

pub fn meta(conversation: u64, seq: u64) -> RecordMeta {
    RecordMeta {
        kind: 1 + (seq % 200) as u8,
        conversation,
        seq,
        msg_id: conversation.wrapping_mul(1_000_003).wrapping_add(seq),
        timestamp: Timestamp::from_micros(T0 + seq as i64),
    }
}

/// A deterministic payload for (conversation, seq) of length `len`.
pub fn payload(conversation: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut x = conversation
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seq)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A storage that can be reopened and tampered with between opens.
pub trait Fixture {
    type B: Backend;
    /// A fresh backend onto the same storage (what a restarted process would open).
    fn backend(&self) -> Self::B;
    /// Changes a segment's bytes on "disk" while no log is open.
    fn modify(&self, base: u64, f: &mut dyn FnMut(&mut [u8]));
    /// Segment bases present in storage.
    fn bases(&self) -> Vec<u64>;
    fn name(&self) -> &'static str;
    /// Side files present in storage, sorted.
    fn sides(&self) -> Vec<SideFile> {
        let mut v = self.backend().list_side().unwrap();
        v.sort();
        v
    }
    /// The bytes of a side file.
    fn side(&self, name: SideFile) -> Option<Vec<u8>>;
    /// Replaces (`Some`) or deletes (`None`) a side file while no log is open.
    fn set_side(&self, name: SideFile, bytes: Option<Vec<u8>>);
    /// Sorted bases of the segments that have an index file.
    fn indexed(&self) -> Vec<u64> {
        self.sides()
            .into_iter()
            .filter_map(|s| match s {
                SideFile::Index(b) => Some(b),
                SideFile::Checkpoint => None,
            })
            .collect()
    }

    fn open(&self, config: LogConfig) -> (Log<Self::B>, RecoveryReport) {
        Log::open(self.backend(), config, now()).unwrap()
    }
}

pub struct MmapFx {
    pub dir: tempfile::TempDir,
}
pub struct PwriteFx {
    pub dir: tempfile::TempDir,
}
pub struct MemFx {
    pub mem: MemoryBackend,
}
pub struct FaultyFx {
    pub mem: MemoryBackend,
    pub faults: Faults,
}

impl MmapFx {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}
impl PwriteFx {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}
impl MemFx {
    pub fn new() -> Self {
        Self {
            mem: MemoryBackend::new(),
        }
    }
}
impl FaultyFx {
    pub fn new() -> Self {
        Self {
            mem: MemoryBackend::new(),
            faults: Faults::new(),
        }
    }
}

fn seg_path(dir: &std::path::Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

fn file_modify(dir: &std::path::Path, base: u64, f: &mut dyn FnMut(&mut [u8])) {
    let p = seg_path(dir, base);
    let mut bytes = fs::read(&p).unwrap();
    f(&mut bytes);
    let file = fs::OpenOptions::new().write(true).open(&p).unwrap();
    file.write_all_at(&bytes, 0).unwrap();
    file.sync_all().unwrap();
}

fn side_path(dir: &std::path::Path, name: SideFile) -> PathBuf {
    match name {
        SideFile::Index(base) => dir.join(format!("{base:020}.idx")),
        SideFile::Checkpoint => dir.join("CHECKPOINT"),
    }
}

fn file_side(dir: &std::path::Path, name: SideFile) -> Option<Vec<u8>> {
    fs::read(side_path(dir, name)).ok()
}

fn file_set_side(dir: &std::path::Path, name: SideFile, bytes: Option<Vec<u8>>) {
    let p = side_path(dir, name);
    match bytes {
        Some(b) => fs::write(p, b).unwrap(),
        None => {
            let _ = fs::remove_file(p);
        }
    }
}

fn mem_set_side(mem: &MemoryBackend, name: SideFile, bytes: Option<Vec<u8>>) {
    let mut m = mem.clone();
    match bytes {
        Some(b) => m.write_side(name, &b).unwrap(),
        None => m.remove_side(name).unwrap(),
    }
}

fn file_sides(dir: &std::path::Path) -> Vec<SideFile> {
    let mut v: Vec<SideFile> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            if n == "CHECKPOINT" {
                return Some(SideFile::Checkpoint);
            }
            Some(SideFile::Index(n.strip_suffix(".idx")?.parse().ok()?))
        })
        .collect();
    v.sort();
    v
}

fn file_bases(dir: &std::path::Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            n.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    v.sort();
    v
}

impl Fixture for MmapFx {
    type B = MmapBackend;
    fn backend(&self) -> MmapBackend {
        MmapBackend::open(self.dir.path()).unwrap()
    }
    fn modify(&self, base: u64, f: &mut dyn FnMut(&mut [u8])) {
        file_modify(self.dir.path(), base, f)
    }
    fn bases(&self) -> Vec<u64> {
        file_bases(self.dir.path())
    }
    fn name(&self) -> &'static str {
        "mmap"
    }
    fn sides(&self) -> Vec<SideFile> {
        file_sides(self.dir.path())
    }
    fn side(&self, name: SideFile) -> Option<Vec<u8>> {
        file_side(self.dir.path(), name)
    }
    fn set_side(&self, name: SideFile, bytes: Option<Vec<u8>>) {
        file_set_side(self.dir.path(), name, bytes)
    }
}

impl Fixture for PwriteFx {
    type B = PwriteBackend;
    fn backend(&self) -> PwriteBackend {
        PwriteBackend::open(self.dir.path()).unwrap()
    }
    fn modify(&self, base: u64, f: &mut dyn FnMut(&mut [u8])) {
        file_modify(self.dir.path(), base, f)
    }
    fn bases(&self) -> Vec<u64> {
        file_bases(self.dir.path())
    }
    fn name(&self) -> &'static str {
        "pwrite"
    }
    fn sides(&self) -> Vec<SideFile> {
        file_sides(self.dir.path())
    }
    fn side(&self, name: SideFile) -> Option<Vec<u8>> {
        file_side(self.dir.path(), name)
    }
    fn set_side(&self, name: SideFile, bytes: Option<Vec<u8>>) {
        file_set_side(self.dir.path(), name, bytes)
    }
}

impl Fixture for MemFx {
    type B = MemoryBackend;
    fn backend(&self) -> MemoryBackend {
        self.mem.clone()
    }
    fn modify(&self, base: u64, f: &mut dyn FnMut(&mut [u8])) {
        assert!(self.mem.modify(base, |b| f(b)));
    }
    fn bases(&self) -> Vec<u64> {
        self.mem.clone().list().unwrap()
    }
    fn name(&self) -> &'static str {
        "memory"
    }
    fn side(&self, name: SideFile) -> Option<Vec<u8>> {
        self.mem.side_bytes(name)
    }
    fn set_side(&self, name: SideFile, bytes: Option<Vec<u8>>) {
        mem_set_side(&self.mem, name, bytes)
    }
}

impl Fixture for FaultyFx {
    type B = FaultyBackend<MemoryBackend>;
    fn backend(&self) -> FaultyBackend<MemoryBackend> {
        FaultyBackend::new(self.mem.clone(), self.faults.clone())
    }
    fn modify(&self, base: u64, f: &mut dyn FnMut(&mut [u8])) {
        assert!(self.mem.modify(base, |b| f(b)));
    }
    fn bases(&self) -> Vec<u64> {
        self.mem.clone().list().unwrap()
    }
    fn name(&self) -> &'static str {
        "faulty(memory)"
    }
    fn side(&self, name: SideFile) -> Option<Vec<u8>> {
        self.mem.side_bytes(name)
    }
    fn set_side(&self, name: SideFile, bytes: Option<Vec<u8>>) {
        mem_set_side(&self.mem, name, bytes)
    }
}

/// Reads every record of `conv` and checks it against the deterministic payload.
pub fn assert_conversation<B: Backend>(
    log: &Log<B>,
    conv: u64,
    seqs: &[u64],
    len_of: impl Fn(u64) -> usize,
) {
    let got: Vec<u64> = log
        .read(conv, 0..u64::MAX)
        .map(|r| {
            let r = r.unwrap();
            assert_eq!(r.meta, meta(conv, r.meta.seq), "meta of seq {}", r.meta.seq);
            assert_eq!(
                r.payload,
                payload(conv, r.meta.seq, len_of(r.meta.seq)),
                "payload of seq {}",
                r.meta.seq
            );
            r.meta.seq
        })
        .collect();
    assert_eq!(got, seqs, "seqs of conversation {conv}");
}

/// Every record the log returns for conversations `convs` (all seqs), with its bytes: what two
/// opens of the same log must agree on.
pub fn snapshot<B: Backend>(
    log: &Log<B>,
    convs: impl IntoIterator<Item = u64>,
) -> Vec<(u64, u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for conv in convs {
        for r in log.read(conv, 0..u64::MAX) {
            let r = r.unwrap();
            out.push((conv, r.meta.seq, r.lsn.get(), r.payload.to_vec()));
        }
    }
    out
}
