//! The memory-mapped file backend, and the only module of this crate with `unsafe` code.
//!
//! [`MmapBackend`] stores each segment in a preallocated file mapped `MAP_SHARED` read-write;
//! an append is a `memcpy` into the map, a sync is `msync(MS_SYNC)` of the written range.
//! This module also holds [`PwriteFile`], the read-only map that the pwrite backend reads through,
//! so that every mapping, and the whole argument for its soundness, lives here.
//!
//! # Safety
//!
//! A file-backed map is only sound to view as `&[u8]` if the bytes cannot change while the slice is
//! alive, and only safe to touch at all if every page of it is backed by the file (else `SIGBUS`).
//! This module relies on the following, each of which it enforces or documents:
//!
//! 1. **One writer per log directory, process-wide.** A backend exists only while it holds an
//!    exclusive, non-blocking `flock` on `<dir>/LOCK` ([`SegmentDir`]). A second backend on the same
//!    directory, in this process or another, fails to open. So no other well-behaved writer maps or
//!    writes these files. (Processes that ignore the lock and write or truncate the files are outside
//!    the model, like any process that writes into another's memory.)
//! 2. **Mutation only through `&mut self`.** Bytes of a segment change only in
//!    [`MmapSegment::write`] / [`PwriteFile::write`], which take `&mut self`, while every slice
//!    handed out by `bytes(&self)` borrows `self`. The borrow checker therefore guarantees that no
//!    slice of a segment is alive while that segment is written. The only other holders of a map are
//!    [`MmapSync`] handles (shared `Arc<MmapRaw>`), and they never create references to the
//!    memory: they only call `msync`, which does not change its contents.
//! 3. **Every mapped page is backed by the file.** Segment files are created at their full size and
//!    fully allocated with `fallocate` before they are mapped (so `ENOSPC` is reported at creation,
//!    never as `SIGBUS` on a first write to a sparse page), they are never truncated or shrunk by
//!    this crate, and the map length is the file length read after opening. Retention drops the map
//!    before deleting a file; a sync handle that still holds the map keeps the inode alive (unlinking
//!    does not truncate), so a late `msync` is harmless.
//! 4. **Writes stay in bounds.** [`MmapSegment::write`] checks `offset + len <= map length` before
//!    copying and returns an error otherwise.
//! 5. **Readers see only published bytes.** The log only decodes records below its written tail;
//!    by (2) those bytes are not being written while read.
//! 6. **Side files are never changed in place.** [`SideMap`] maps a side file (a segment index,
//!    the checkpoint) read-only. This crate writes side files only whole, to a temporary file that
//!    is then renamed over the old name (`SegmentDir::write_side`), and deletes them only with
//!    `unlink`; neither changes or truncates an inode that is mapped, so the mapped bytes never
//!    change and every page stays backed. (As in 1, processes that ignore the lock are outside
//!    the model.)

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use memmap2::{Advice, Mmap, MmapOptions, MmapRaw};

use crate::OpenError;
use crate::backend::{Backend, BackendHandle, SegmentStore, SegmentSync, SideFile};
use crate::format::MIN_SEGMENT_SIZE;
use crate::fsdir::SegmentDir;

/// Segments as preallocated files mapped read-write: appends are `memcpy`s, syncs are `msync`.
///
/// ```no_run
/// use parley_storage::{Log, LogConfig, MmapBackend, Timestamp};
/// let backend = MmapBackend::open("/var/lib/parley/shard-0".as_ref())?;
/// let (log, report) = Log::open(backend, LogConfig::default(), Timestamp::from_micros(0))?;
/// # Ok::<(), parley_storage::OpenError>(())
/// ```
#[derive(Debug)]
pub struct MmapBackend {
    dir: Arc<SegmentDir>,
}

impl MmapBackend {
    /// Opens (creating it if needed) a log directory and takes its exclusive lock.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            dir: Arc::new(SegmentDir::open(dir)?),
        })
    }

    /// The log directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Checks a segment file's length before mapping it (see `# Safety`, item 3).
fn mappable_len(file: &File) -> io::Result<usize> {
    let len = file.metadata()?.len();
    if len < MIN_SEGMENT_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "segment file is shorter than the smallest segment",
        ));
    }
    usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))
}

fn map_rw(file: &File) -> io::Result<MmapRaw> {
    let len = mappable_len(file)?;
    MmapOptions::new().len(len).map_raw(file)
}

/// A read-only map of a side file (or nothing, for an empty file). Its bytes never change
/// (`# Safety`, item 6).
#[derive(Debug)]
pub struct SideMap {
    map: Option<Mmap>,
}

impl SideMap {
    /// Maps a whole side file read-only.
    pub(crate) fn new(file: &File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(Self { map: None });
        }
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "side file too large"))?;
        // SAFETY: the file is a side file of a locked log directory (# Safety, 1), which this
        // crate never modifies or truncates in place (# Safety, 6): the mapped bytes cannot change
        // while the map lives, and the length is the file's length read just now, so every page
        // is backed.
        let map = unsafe { MmapOptions::new().len(len).map(file)? };
        Ok(Self { map: Some(map) })
    }
}

impl AsRef<[u8]> for SideMap {
    fn as_ref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

pub(crate) fn read_side(dir: &SegmentDir, name: SideFile) -> io::Result<Option<SideMap>> {
    match dir.open_side(name)? {
        Some(file) => SideMap::new(&file).map(Some),
        None => Ok(None),
    }
}

/// The [`BackendHandle`] of an [`MmapBackend`]: shares its directory (and lock).
#[derive(Debug, Clone)]
pub struct MmapHandle {
    dir: Arc<SegmentDir>,
}

impl BackendHandle for MmapHandle {
    type Segment = MmapSegment;

    fn create_new(&self, base: u64, size: u64, header: &[u8]) -> io::Result<MmapSegment> {
        let file = self.dir.create_new(base, size, header)?;
        Ok(MmapSegment {
            map: Arc::new(map_rw(&file)?),
        })
    }

    fn write_side(&self, name: SideFile, bytes: &[u8]) -> io::Result<()> {
        self.dir.write_side(name, bytes)
    }
}

impl Backend for MmapBackend {
    type Segment = MmapSegment;
    type Side = SideMap;
    type Handle = MmapHandle;

    fn list(&mut self) -> io::Result<Vec<u64>> {
        self.dir.list()
    }

    fn create(&mut self, base: u64, size: u64, header: &[u8]) -> io::Result<MmapSegment> {
        let file = self.dir.create(base, size, header)?;
        Ok(MmapSegment {
            map: Arc::new(map_rw(&file)?),
        })
    }

    fn open(&mut self, base: u64) -> io::Result<MmapSegment> {
        let file = self.dir.open_segment(base)?;
        Ok(MmapSegment {
            map: Arc::new(map_rw(&file)?),
        })
    }

    fn remove(&mut self, base: u64) -> io::Result<()> {
        self.dir.remove(base)
    }

    fn list_side(&mut self) -> io::Result<Vec<SideFile>> {
        self.dir.list_side()
    }

    fn read_side(&mut self, name: SideFile) -> io::Result<Option<SideMap>> {
        read_side(&self.dir, name)
    }

    fn write_side(&mut self, name: SideFile, bytes: &[u8]) -> io::Result<()> {
        self.dir.write_side(name, bytes)
    }

    fn remove_side(&mut self, name: SideFile) -> io::Result<()> {
        self.dir.remove_side(name)
    }

    fn handle(&self) -> MmapHandle {
        MmapHandle {
            dir: Arc::clone(&self.dir),
        }
    }
}

/// A segment file mapped read-write.
#[derive(Debug)]
pub struct MmapSegment {
    map: Arc<MmapRaw>,
}

impl SegmentStore for MmapSegment {
    type Sync = MmapSync;

    #[inline]
    fn bytes(&self) -> &[u8] {
        // SAFETY: the pointer and length describe one live mapping owned (shared) by `self.map`,
        // which outlives the returned borrow of `self`. Every page is backed by the allocated file
        // (# Safety, 3). The bytes cannot change while the slice lives: writes need `&mut self`
        // and no other writer exists (# Safety, 1 and 2).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    #[inline]
    fn write(&mut self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let start = usize::try_from(offset).map_err(|_| out_of_bounds())?;
        let end = start.checked_add(total).ok_or_else(out_of_bounds)?;
        if end > self.map.len() {
            return Err(out_of_bounds());
        }
        let mut at = start;
        for part in parts {
            // SAFETY: `at + part.len() <= end <= map.len()` (checked above), so the destination
            // is inside the live, file-backed mapping. No `&[u8]` into this map is alive because we
            // hold `&mut self` (# Safety, 2), so writing through the raw pointer aliases nothing.
            // `part` cannot overlap the destination: the only way to get a slice of this mapping
            // is `bytes(&self)`, which cannot coexist with `&mut self`, and no other mapping of the
            // file exists (# Safety, 1).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    part.as_ptr(),
                    self.map.as_mut_ptr().add(at),
                    part.len(),
                );
            }
            at += part.len();
        }
        Ok(())
    }

    fn sync_range(&self, start: u64, end: u64) -> MmapSync {
        MmapSync {
            map: Arc::clone(&self.map),
            start,
            end,
        }
    }

    fn prefault(&self) {
        // Fault every page in *writable* now (Linux >= 5.14), off the append path: a read-only
        // prefault leaves the first write to each page to take a write fault, where the
        // filesystem's page_mkwrite runs (measured: 4-KiB appends at ~1 GB/s instead of memcpy
        // speed). This dirties the pages, so the OS writes the zero pages back once, converting
        // the preallocated (unwritten) extents to written ones, which also makes the later
        // group-commit syncs of those pages cheaper. Records are only ever written below the
        // tail, so this changes no byte on disk.
        if self.map.advise(Advice::PopulateWrite).is_ok() {
            return;
        }
        // Older kernels: readahead hint, then touch one byte per page so page tables and page
        // cache are filled now. Reading does not dirty anything.
        let _ = self.map.advise(Advice::WillNeed);
        let bytes = self.bytes();
        let mut i = 0;
        while i < bytes.len() {
            std::hint::black_box(bytes[i]);
            i += 4096;
        }
    }
}

fn out_of_bounds() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "write beyond the end of a segment",
    )
}

/// A pending `msync(MS_SYNC)` of a range of a mapped segment.
#[derive(Debug)]
pub struct MmapSync {
    map: Arc<MmapRaw>,
    start: u64,
    end: u64,
}

impl SegmentSync for MmapSync {
    fn sync(self) -> io::Result<()> {
        let len = self.map.len() as u64;
        let end = self.end.min(len);
        let start = self.start.min(end);
        if start == end {
            return Ok(());
        }
        // memmap2 rounds the start down to a page boundary itself.
        self.map.flush_range(start as usize, (end - start) as usize)
    }
}

/// A segment file written with `pwrite` and read through a read-only shared map (used by the
/// pwrite backend; here because it is a mapping, see the module's `# Safety`).
#[derive(Debug)]
pub(crate) struct PwriteFile {
    file: Arc<File>,
    map: MmapRaw,
}

impl PwriteFile {
    /// Maps `file` read-only over its whole length.
    pub(crate) fn new(file: File) -> io::Result<Self> {
        let len = mappable_len(&file)?;
        let map = MmapOptions::new().len(len).map_raw_read_only(&file)?;
        Ok(Self {
            file: Arc::new(file),
            map,
        })
    }

    /// The file's bytes, through the read-only map (coherent with `pwrite` through the page cache).
    #[inline]
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: as for `MmapSegment::bytes`: one live, fully file-backed mapping owned by
        // `self`; the file only changes through `PwriteFile::write(&mut self)` (and no other writer
        // exists, # Safety 1), so not while this borrow of `self` lives.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// Writes the concatenation of `parts` at `offset` with `pwritev`.
    pub(crate) fn write(&mut self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let end = offset.checked_add(total).ok_or_else(out_of_bounds)?;
        if end > self.map.len() as u64 {
            return Err(out_of_bounds());
        }
        let slices: [io::IoSlice<'_>; 2];
        let written = if let [a, b] = parts {
            slices = [io::IoSlice::new(a), io::IoSlice::new(b)];
            rustix::io::pwritev(&*self.file, &slices, offset)?
        } else {
            0
        };
        if written as u64 == total {
            return Ok(());
        }
        // Short write or another shape: write the remainder piece by piece.
        use std::os::unix::fs::FileExt;
        let mut skip = written;
        let mut at = offset + written as u64;
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            let rest = &part[skip..];
            skip = 0;
            self.file.write_all_at(rest, at)?;
            at += rest.len() as u64;
        }
        Ok(())
    }

    /// The file, for `fdatasync` from another thread (which does not change its contents).
    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }
}
