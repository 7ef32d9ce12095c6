//! The in-memory backend, for tests: it keeps **live** bytes (what the process wrote, like the page
//! cache) and **durable** bytes (what a sync made durable, like the disk) apart, so a test can build
//! the image a power loss would leave with [`MemoryBackend::crash_image`] (durable bytes only) or
//! [`MemoryBackend::crash_image_with`] (plus any subset of the unsynced 4 KiB pages, to simulate
//! out-of-order writeback).
//!
//! `MemoryBackend` is a cheap handle (`Clone`): keep a clone to reopen a log on the same "disk"
//! after dropping it (like a process restart: live bytes survive), or to take a crash image.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{Backend, BackendHandle, SegmentStore, SegmentSync, SideFile};

/// Page size used to simulate writeback and sync granularity.
pub(crate) const PAGE_SIZE: usize = 4096;

#[derive(Debug)]
struct Pages {
    live: Vec<u8>,
    durable: Vec<u8>,
}

type Shared = Arc<Mutex<Pages>>;

type Sides = Arc<Mutex<BTreeMap<SideFile, Arc<Vec<u8>>>>>;

/// Segments in memory; a handle, cloning shares the same segments.
///
/// Side files are replaced whole and are durable as soon as written (the file backends' temporary
/// file, sync, rename and directory sync), so a crash image keeps every side file.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    segments: Arc<Mutex<BTreeMap<u64, Shared>>>,
    sides: Sides,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain bytes behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new backend holding what a power loss would leave: only the durable bytes.
    pub fn crash_image(&self) -> MemoryBackend {
        self.crash_image_with(|_, _| false)
    }

    /// A new backend holding the durable bytes plus, for every 4 KiB page whose live bytes differ
    /// from its durable bytes, the live page if `keep_unsynced(segment_base, page_index)` says so.
    /// (A real disk may also tear a page; the log's CRCs make that equivalent to a lost page.)
    pub fn crash_image_with(&self, mut keep_unsynced: impl FnMut(u64, usize) -> bool) -> Self {
        let mut out = BTreeMap::new();
        for (&base, shared) in lock(&self.segments).iter() {
            let p = lock(shared);
            let mut image = p.durable.clone();
            for (i, (live, durable)) in p
                .live
                .chunks(PAGE_SIZE)
                .zip(p.durable.chunks(PAGE_SIZE))
                .enumerate()
            {
                if live != durable && keep_unsynced(base, i) {
                    image[i * PAGE_SIZE..i * PAGE_SIZE + live.len()].copy_from_slice(live);
                }
            }
            out.insert(
                base,
                Arc::new(Mutex::new(Pages {
                    live: image.clone(),
                    durable: image,
                })),
            );
        }
        Self {
            segments: Arc::new(Mutex::new(out)),
            sides: Arc::new(Mutex::new(lock(&self.sides).clone())),
        }
    }

    /// A copy of a side file's bytes, if it exists.
    pub fn side_bytes(&self, name: SideFile) -> Option<Vec<u8>> {
        lock(&self.sides).get(&name).map(|b| b.to_vec())
    }

    /// Changes a side file "on disk" (e.g. to simulate corruption); views already handed out keep
    /// the old bytes. Returns false if it does not exist.
    pub fn modify_side(&self, name: SideFile, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut sides = lock(&self.sides);
        let Some(old) = sides.get(&name) else {
            return false;
        };
        let mut bytes = old.to_vec();
        f(&mut bytes);
        sides.insert(name, Arc::new(bytes));
        true
    }

    /// A copy of a segment's live bytes, if it exists.
    pub fn segment_bytes(&self, base: u64) -> Option<Vec<u8>> {
        let segs = lock(&self.segments);
        segs.get(&base).map(|s| lock(s).live.clone())
    }

    /// Changes a segment's bytes "on disk" (live and durable alike), e.g. to simulate corruption.
    /// Only meaningful while no log has the segment open. Returns false if it does not exist.
    pub fn modify(&self, base: u64, f: impl FnOnce(&mut [u8])) -> bool {
        let segs = lock(&self.segments);
        let Some(s) = segs.get(&base) else {
            return false;
        };
        let mut p = lock(s);
        f(&mut p.live);
        p.durable = p.live.clone();
        true
    }

    /// The number of 4 KiB pages whose live bytes are not durable yet, over all segments.
    pub fn unsynced_pages(&self) -> usize {
        lock(&self.segments)
            .values()
            .map(|s| {
                let p = lock(s);
                p.live
                    .chunks(PAGE_SIZE)
                    .zip(p.durable.chunks(PAGE_SIZE))
                    .filter(|(a, b)| a != b)
                    .count()
            })
            .sum()
    }
}

fn new_segment(size: u64, header: &[u8]) -> io::Result<(MemorySegment, Shared)> {
    let size = usize::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
    let mut bytes = vec![0u8; size];
    let h = bytes
        .get_mut(..header.len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "header too large"))?;
    h.copy_from_slice(header);
    let shared = Arc::new(Mutex::new(Pages {
        live: bytes.clone(),
        durable: bytes.clone(),
    }));
    Ok((
        MemorySegment {
            view: bytes,
            shared: Arc::clone(&shared),
        },
        shared,
    ))
}

/// A view of an in-memory side file (shared, immutable: a rewrite replaces it).
#[derive(Debug, Clone)]
pub struct MemorySide(Arc<Vec<u8>>);

impl AsRef<[u8]> for MemorySide {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The [`BackendHandle`] of a [`MemoryBackend`].
#[derive(Debug, Clone)]
pub struct MemoryHandle {
    backend: MemoryBackend,
}

impl BackendHandle for MemoryHandle {
    type Segment = MemorySegment;

    fn create_new(&self, base: u64, size: u64, header: &[u8]) -> io::Result<MemorySegment> {
        let (segment, shared) = new_segment(size, header)?;
        let mut segs = lock(&self.backend.segments);
        if segs.contains_key(&base) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        segs.insert(base, shared);
        Ok(segment)
    }

    fn write_side(&self, name: SideFile, bytes: &[u8]) -> io::Result<()> {
        lock(&self.backend.sides).insert(name, Arc::new(bytes.to_vec()));
        Ok(())
    }
}

impl Backend for MemoryBackend {
    type Segment = MemorySegment;
    type Side = MemorySide;
    type Handle = MemoryHandle;

    fn list(&mut self) -> io::Result<Vec<u64>> {
        Ok(lock(&self.segments).keys().copied().collect())
    }

    fn create(&mut self, base: u64, size: u64, header: &[u8]) -> io::Result<MemorySegment> {
        let (segment, shared) = new_segment(size, header)?;
        lock(&self.segments).insert(base, shared);
        Ok(segment)
    }

    fn open(&mut self, base: u64) -> io::Result<MemorySegment> {
        let segs = lock(&self.segments);
        let shared = segs
            .get(&base)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let view = lock(shared).live.clone();
        Ok(MemorySegment {
            view,
            shared: Arc::clone(shared),
        })
    }

    fn remove(&mut self, base: u64) -> io::Result<()> {
        lock(&self.segments)
            .remove(&base)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn list_side(&mut self) -> io::Result<Vec<SideFile>> {
        Ok(lock(&self.sides).keys().copied().collect())
    }

    fn read_side(&mut self, name: SideFile) -> io::Result<Option<MemorySide>> {
        Ok(lock(&self.sides)
            .get(&name)
            .map(|b| MemorySide(Arc::clone(b))))
    }

    fn write_side(&mut self, name: SideFile, bytes: &[u8]) -> io::Result<()> {
        self.handle().write_side(name, bytes)
    }

    fn remove_side(&mut self, name: SideFile) -> io::Result<()> {
        lock(&self.sides).remove(&name);
        Ok(())
    }

    fn handle(&self) -> MemoryHandle {
        MemoryHandle {
            backend: self.clone(),
        }
    }
}

/// An in-memory segment: a private copy for lock-free reads, plus the shared live/durable pages.
#[derive(Debug)]
pub struct MemorySegment {
    view: Vec<u8>,
    shared: Shared,
}

impl SegmentStore for MemorySegment {
    type Sync = MemorySync;

    fn bytes(&self) -> &[u8] {
        &self.view
    }

    fn write(&mut self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let start = usize::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset"))?;
        let end = start
            .checked_add(total)
            .filter(|&e| e <= self.view.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write beyond segment"))?;
        let mut p = lock(&self.shared);
        let mut at = start;
        for part in parts {
            self.view[at..at + part.len()].copy_from_slice(part);
            p.live[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        debug_assert_eq!(at, end);
        Ok(())
    }

    fn sync_range(&self, start: u64, end: u64) -> MemorySync {
        MemorySync {
            shared: Arc::clone(&self.shared),
            start,
            end,
        }
    }
}

/// A pending sync of an in-memory segment: copies whole live pages to durable.
#[derive(Debug)]
pub struct MemorySync {
    shared: Shared,
    start: u64,
    end: u64,
}

impl SegmentSync for MemorySync {
    fn sync(self) -> io::Result<()> {
        let mut p = lock(&self.shared);
        let len = p.live.len();
        let start = usize::try_from(self.start).unwrap_or(usize::MAX).min(len);
        let end = usize::try_from(self.end).unwrap_or(usize::MAX).min(len);
        if start >= end {
            return Ok(());
        }
        // Like msync: whole pages containing the range.
        let start = start / PAGE_SIZE * PAGE_SIZE;
        let end = end.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE).min(len);
        let Pages { live, durable } = &mut *p;
        durable[start..end].copy_from_slice(&live[start..end]);
        Ok(())
    }
}
