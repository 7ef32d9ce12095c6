//! The storage backend trait: where segment bytes live.
//!
//! The [`Log`](crate::Log) owns all format logic (headers, records, recovery, retention); a backend
//! only stores fixed-size segments and makes byte ranges durable. That keeps every backend small
//! and lets one test suite run over all of them (`tests/suite.rs`):
//!
//! - [`MmapBackend`](crate::MmapBackend): files written through a shared memory map (production).
//! - [`PwriteBackend`](crate::PwriteBackend): the same files written with `pwrite`, for comparison.
//! - [`MemoryBackend`](crate::MemoryBackend): memory, keeping live and durable bytes apart so tests
//!   can build the image a power loss would leave.
//! - [`FaultyBackend`](crate::FaultyBackend): wraps another backend and fails chosen operations.

use std::io;

/// A side file: a small file a log keeps next to its segments (FORMAT.md sections 10 and 11).
/// Side files are written whole and atomically ([`Backend::write_side`]) and never changed in
/// place, so a view of one ([`Backend::Side`]) never changes while it is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SideFile {
    /// The persistent index of the sealed segment with this base LSN (`<base:020>.idx`).
    Index(u64),
    /// The application checkpoint (`CHECKPOINT`).
    Checkpoint,
}

/// A place to keep the segments of one log.
///
/// Segments are identified by their base LSN. Implementations need not be thread-safe: a log and
/// its backend are used by one thread; only [`SegmentSync`] values and the [`BackendHandle`]
/// (through a [`SpareTicket`](crate::SpareTicket)) travel to other threads.
pub trait Backend {
    /// One open segment (`Send`: a spare ticket creates it on another thread).
    type Segment: SegmentStore + Send + 'static;
    /// A read-only view of a side file's bytes (a read-only map, or shared memory).
    type Side: AsRef<[u8]>;
    /// A `Send` handle that creates segments and writes side files from another thread.
    type Handle: BackendHandle<Segment = Self::Segment>;

    /// The base LSNs of all complete segments, in any order. Incomplete creations (a crash during
    /// [`Backend::create`]) are not listed and are cleaned up by the backend.
    fn list(&mut self) -> io::Result<Vec<u64>>;

    /// Creates the segment `base` of exactly `size` bytes: zero-filled, fully allocated (a full disk
    /// is an error here, never later), with `header` at offset 0, durable (data and directory entry)
    /// before returning. Atomic: after a crash the segment either exists complete or not at all. An
    /// existing segment of that base is replaced.
    fn create(&mut self, base: u64, size: u64, header: &[u8]) -> io::Result<Self::Segment>;

    /// Opens an existing segment (created by [`Backend::create`], possibly by an earlier process).
    /// A file that can not be a segment (e.g. too short) is an [`io::ErrorKind::InvalidData`] error.
    fn open(&mut self, base: u64) -> io::Result<Self::Segment>;

    /// Deletes a segment durably. The caller has dropped its [`Backend::Segment`] for it.
    fn remove(&mut self, base: u64) -> io::Result<()>;

    /// The side files present, in any order (incomplete writes are not listed).
    fn list_side(&mut self) -> io::Result<Vec<SideFile>>;

    /// A view of a side file, or `None` if it does not exist.
    fn read_side(&mut self, name: SideFile) -> io::Result<Option<Self::Side>>;

    /// Writes a side file whole, atomically and durably (temporary file, sync, rename, directory
    /// sync): after a crash it holds either the old or the new bytes. Views of the old file stay
    /// valid and unchanged.
    fn write_side(&mut self, name: SideFile, bytes: &[u8]) -> io::Result<()>;

    /// Deletes a side file durably; a missing file is not an error.
    fn remove_side(&mut self, name: SideFile) -> io::Result<()>;

    /// A handle for [`BackendHandle::create_new`] and [`BackendHandle::write_side`] on another
    /// thread.
    fn handle(&self) -> Self::Handle;
}

/// What a [`SpareTicket`](crate::SpareTicket) needs of a backend on another thread: creating the
/// next segment and writing segment indexes. `Send + 'static`; it shares the backend's directory
/// (and lock), never a reference to the backend.
pub trait BackendHandle: Send + 'static {
    /// The backend's segment type; `Send`, since it is created on another thread.
    type Segment: Send + 'static;

    /// Like [`Backend::create`], but never replaces: if a segment of that base exists (or appears
    /// while this one is being created), fails with [`io::ErrorKind::AlreadyExists`] and leaves
    /// the existing one alone. That makes a creation racing with the log's own (a roll that could
    /// not wait for the spare) harmless.
    fn create_new(&self, base: u64, size: u64, header: &[u8]) -> io::Result<Self::Segment>;

    /// Like [`Backend::write_side`].
    fn write_side(&self, name: SideFile, bytes: &[u8]) -> io::Result<()>;
}

/// One fixed-size segment.
pub trait SegmentStore {
    /// A handle that makes a byte range of this segment durable, usable from another thread.
    type Sync: SegmentSync;

    /// The whole segment, header included, as last written. Its length is the segment size.
    fn bytes(&self) -> &[u8];

    /// Writes the concatenation of `parts` at `offset`. For a memory map this is a `memcpy` and
    /// cannot fail; other backends may return an I/O error (and may have written a prefix).
    fn write(&mut self, offset: u64, parts: &[&[u8]]) -> io::Result<()>;

    /// A handle that, when run, makes bytes `[start, end)` durable (it may sync more).
    fn sync_range(&self, start: u64, end: u64) -> Self::Sync;

    /// Makes the pages resident and writable ahead of use (off the append path). Best effort.
    fn prefault(&self) {}
}

/// A pending sync of part of a segment; `Send + 'static` so group commit can run it on another
/// thread while the owner keeps appending.
pub trait SegmentSync: Send + 'static {
    /// Performs the sync. An error means the range's durability is unknown (fsyncgate).
    fn sync(self) -> io::Result<()>;
}
