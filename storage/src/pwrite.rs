//! The `pwrite` backend: the same preallocated segment files as [`MmapBackend`](crate::MmapBackend),
//! written with `pwritev` and synced with `fdatasync`, read through a read-only map.
//!
//! It exists so a benchmark can measure the mmap choice against plain system calls on the same
//! appends (every append is one syscall here, none with the map).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::OpenError;
use crate::backend::{Backend, BackendHandle, SegmentStore, SegmentSync, SideFile};
use crate::fsdir::SegmentDir;
use crate::mmap::{PwriteFile, SideMap, read_side};

/// Segments as preallocated files written with `pwrite`.
#[derive(Debug)]
pub struct PwriteBackend {
    dir: Arc<SegmentDir>,
}

impl PwriteBackend {
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

/// The [`BackendHandle`] of a [`PwriteBackend`]: shares its directory (and lock).
#[derive(Debug, Clone)]
pub struct PwriteHandle {
    dir: Arc<SegmentDir>,
}

impl BackendHandle for PwriteHandle {
    type Segment = PwriteSegment;

    fn create_new(&self, base: u64, size: u64, header: &[u8]) -> io::Result<PwriteSegment> {
        let file = self.dir.create_new(base, size, header)?;
        Ok(PwriteSegment {
            file: PwriteFile::new(file)?,
        })
    }

    fn write_side(&self, name: SideFile, bytes: &[u8]) -> io::Result<()> {
        self.dir.write_side(name, bytes)
    }
}

impl Backend for PwriteBackend {
    type Segment = PwriteSegment;
    type Side = SideMap;
    type Handle = PwriteHandle;

    fn list(&mut self) -> io::Result<Vec<u64>> {
        self.dir.list()
    }

    fn create(&mut self, base: u64, size: u64, header: &[u8]) -> io::Result<PwriteSegment> {
        let file = self.dir.create(base, size, header)?;
        Ok(PwriteSegment {
            file: PwriteFile::new(file)?,
        })
    }

    fn open(&mut self, base: u64) -> io::Result<PwriteSegment> {
        let file = self.dir.open_segment(base)?;
        Ok(PwriteSegment {
            file: PwriteFile::new(file)?,
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

    fn handle(&self) -> PwriteHandle {
        PwriteHandle {
            dir: Arc::clone(&self.dir),
        }
    }
}

/// A segment file written with `pwrite`.
#[derive(Debug)]
pub struct PwriteSegment {
    file: PwriteFile,
}

impl SegmentStore for PwriteSegment {
    type Sync = PwriteSync;

    fn bytes(&self) -> &[u8] {
        self.file.bytes()
    }

    fn write(&mut self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        self.file.write(offset, parts)
    }

    fn sync_range(&self, _start: u64, _end: u64) -> PwriteSync {
        PwriteSync {
            file: Arc::clone(self.file.file()),
        }
    }
}

/// A pending `fdatasync` of a segment file (the whole file: Linux has no durable range sync).
#[derive(Debug)]
pub struct PwriteSync {
    file: Arc<File>,
}

impl SegmentSync for PwriteSync {
    fn sync(self) -> io::Result<()> {
        rustix::fs::fdatasync(&*self.file).map_err(io::Error::from)
    }
}
