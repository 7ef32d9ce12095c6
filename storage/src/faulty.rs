//! A fault-injecting wrapper around another backend: fails the Nth write, the Nth sync, the Nth
//! segment creation or the Nth side-file write (like `EIO` or `ENOSPC`), as armed through a shared
//! [`Faults`] handle.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{Backend, BackendHandle, SegmentStore, SegmentSync, SideFile};

/// The error number used for injected write and sync failures (`EIO`).
const EIO: i32 = 5;
/// The error number used for injected creation failures (`ENOSPC`).
const ENOSPC: i32 = 28;

#[derive(Debug, Default)]
struct FaultState {
    /// Countdown to the failing operation: `Some(1)` fails the next one.
    write: Option<u64>,
    sync: Option<u64>,
    create: Option<u64>,
    side: Option<u64>,
    injected: u64,
}

/// Which operations to fail; a handle shared between the test and the backend (`Clone`).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
}

impl Faults {
    /// No faults armed.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `nth` segment write from now fails (1 = the next one), writing nothing.
    pub fn fail_write(&self, nth: u64) {
        self.state().write = Some(nth.max(1));
    }

    /// The `nth` sync from now fails (1 = the next one), syncing nothing.
    pub fn fail_sync(&self, nth: u64) {
        self.state().sync = Some(nth.max(1));
    }

    /// The `nth` segment creation from now fails with `ENOSPC` (1 = the next one).
    pub fn fail_create(&self, nth: u64) {
        self.state().create = Some(nth.max(1));
    }

    /// The `nth` side-file write (segment index, checkpoint) from now fails with `ENOSPC`,
    /// writing nothing (1 = the next one).
    pub fn fail_side_write(&self, nth: u64) {
        self.state().side = Some(nth.max(1));
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        let mut s = self.state();
        s.write = None;
        s.sync = None;
        s.create = None;
        s.side = None;
    }

    /// How many faults have been injected so far.
    pub fn injected(&self) -> u64 {
        self.state().injected
    }

    /// Counts one operation of a kind; true if it must fail.
    fn hit(&self, pick: impl FnOnce(&mut FaultState) -> &mut Option<u64>) -> bool {
        let mut s = self.state();
        let slot = pick(&mut s);
        let fail = match slot {
            Some(1) => {
                *slot = None;
                true
            }
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        };
        if fail {
            s.injected += 1;
        }
        fail
    }
}

/// Wraps a backend and injects the faults armed in its [`Faults`].
#[derive(Debug)]
pub struct FaultyBackend<B> {
    inner: B,
    faults: Faults,
}

impl<B: Backend> FaultyBackend<B> {
    /// Wraps `inner`; arm faults through `faults` (keep a clone).
    pub fn new(inner: B, faults: Faults) -> Self {
        Self { inner, faults }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

/// The [`BackendHandle`] of a [`FaultyBackend`]: injects creation and side-write faults.
#[derive(Debug)]
pub struct FaultyHandle<H> {
    inner: H,
    faults: Faults,
}

impl<H: BackendHandle> BackendHandle for FaultyHandle<H> {
    type Segment = FaultySegment<H::Segment>;

    fn create_new(&self, base: u64, size: u64, header: &[u8]) -> io::Result<Self::Segment> {
        if self.faults.hit(|s| &mut s.create) {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        Ok(FaultySegment {
            inner: self.inner.create_new(base, size, header)?,
            faults: self.faults.clone(),
        })
    }

    fn write_side(&self, name: SideFile, bytes: &[u8]) -> io::Result<()> {
        if self.faults.hit(|s| &mut s.side) {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        self.inner.write_side(name, bytes)
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    type Segment = FaultySegment<B::Segment>;
    type Side = B::Side;
    type Handle = FaultyHandle<B::Handle>;

    fn list(&mut self) -> io::Result<Vec<u64>> {
        self.inner.list()
    }

    fn create(&mut self, base: u64, size: u64, header: &[u8]) -> io::Result<Self::Segment> {
        if self.faults.hit(|s| &mut s.create) {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        Ok(FaultySegment {
            inner: self.inner.create(base, size, header)?,
            faults: self.faults.clone(),
        })
    }

    fn open(&mut self, base: u64) -> io::Result<Self::Segment> {
        Ok(FaultySegment {
            inner: self.inner.open(base)?,
            faults: self.faults.clone(),
        })
    }

    fn remove(&mut self, base: u64) -> io::Result<()> {
        self.inner.remove(base)
    }

    fn list_side(&mut self) -> io::Result<Vec<SideFile>> {
        self.inner.list_side()
    }

    fn read_side(&mut self, name: SideFile) -> io::Result<Option<B::Side>> {
        self.inner.read_side(name)
    }

    fn write_side(&mut self, name: SideFile, bytes: &[u8]) -> io::Result<()> {
        if self.faults.hit(|s| &mut s.side) {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        self.inner.write_side(name, bytes)
    }

    fn remove_side(&mut self, name: SideFile) -> io::Result<()> {
        self.inner.remove_side(name)
    }

    fn handle(&self) -> Self::Handle {
        FaultyHandle {
            inner: self.inner.handle(),
            faults: self.faults.clone(),
        }
    }
}

/// A segment of a [`FaultyBackend`].
#[derive(Debug)]
pub struct FaultySegment<S> {
    inner: S,
    faults: Faults,
}

impl<S: SegmentStore> SegmentStore for FaultySegment<S> {
    type Sync = FaultySync<S::Sync>;

    fn bytes(&self) -> &[u8] {
        self.inner.bytes()
    }

    fn write(&mut self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        if self.faults.hit(|s| &mut s.write) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        self.inner.write(offset, parts)
    }

    fn sync_range(&self, start: u64, end: u64) -> Self::Sync {
        FaultySync {
            inner: self.inner.sync_range(start, end),
            faults: self.faults.clone(),
        }
    }

    fn prefault(&self) {
        self.inner.prefault()
    }
}

/// A pending sync of a [`FaultySegment`]; the fault is decided when it runs.
#[derive(Debug)]
pub struct FaultySync<T> {
    inner: T,
    faults: Faults,
}

impl<T: SegmentSync> SegmentSync for FaultySync<T> {
    fn sync(self) -> io::Result<()> {
        if self.faults.hit(|s| &mut s.sync) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        self.inner.sync()
    }
}
