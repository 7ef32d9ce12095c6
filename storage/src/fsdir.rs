//! A log directory on a filesystem: the lock, segment file names, atomic creation with
//! preallocation, removal. Shared by the mmap and pwrite backends (no `unsafe` here).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, FlockOperation};

use crate::OpenError;
use crate::backend::SideFile;

const SEGMENT_SUFFIX: &str = ".seg";
const TMP_SUFFIX: &str = ".seg.tmp";
/// Temporary name of a segment created by a spare ticket (`create_new`).
const NEW_TMP_SUFFIX: &str = ".new.seg.tmp";
const INDEX_SUFFIX: &str = ".idx";
const CHECKPOINT_NAME: &str = "CHECKPOINT";
/// Suffix of a side file being written.
const SIDE_TMP_SUFFIX: &str = ".tmp";
const LOCK_NAME: &str = "LOCK";

/// A locked log directory.
#[derive(Debug)]
pub(crate) struct SegmentDir {
    dir: PathBuf,
    /// The directory itself, opened for `fsync`.
    dir_handle: File,
    /// Holds the exclusive `flock` for as long as this value lives.
    _lock: File,
}

impl SegmentDir {
    /// Creates `dir` if needed, takes the exclusive lock, removes leftover temporary files.
    pub(crate) fn open(dir: &Path) -> Result<Self, OpenError> {
        fs::create_dir_all(dir).map_err(|e| OpenError::io("creating", dir, e))?;
        let lock_path = dir.join(LOCK_NAME);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| OpenError::io("opening", &lock_path, e))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(OpenError::Locked { dir: dir.into() });
            }
            Err(e) => return Err(OpenError::io("locking", &lock_path, e.into())),
        }
        let dir_handle = File::open(dir).map_err(|e| OpenError::io("opening", dir, e))?;
        let this = Self {
            dir: dir.into(),
            dir_handle,
            _lock: lock,
        };
        for entry in fs::read_dir(dir).map_err(|e| OpenError::io("listing", dir, e))? {
            let entry = entry.map_err(|e| OpenError::io("listing", dir, e))?;
            // Every temporary this module writes ends with ".tmp" (`TMP_SUFFIX`,
            // `NEW_TMP_SUFFIX`, side files' `SIDE_TMP_SUFFIX`): none is ever valid.
            if entry
                .file_name()
                .to_string_lossy()
                .ends_with(SIDE_TMP_SUFFIX)
            {
                let p = entry.path();
                fs::remove_file(&p).map_err(|e| OpenError::io("removing", &p, e))?;
            }
        }
        this.sync_dir()
            .map_err(|e| OpenError::io("syncing", dir, e))?;
        Ok(this)
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        self.dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
    }

    fn sync_dir(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.dir_handle).map_err(io::Error::from)
    }

    /// Base LSNs of the `*.seg` files with a well-formed name.
    pub(crate) fn list(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(digits) = name.strip_suffix(SEGMENT_SUFFIX)
                && digits.len() == 20
                && digits.bytes().all(|b| b.is_ascii_digit())
                && let Ok(base) = digits.parse::<u64>()
            {
                out.push(base);
            }
        }
        Ok(out)
    }

    /// Creates a segment file atomically (FORMAT.md 5.1) and returns it opened read-write.
    pub(crate) fn create(&self, base: u64, size: u64, header: &[u8]) -> io::Result<File> {
        let tmp = self.dir.join(format!("{base:020}{TMP_SUFFIX}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let result = (|| {
            allocate(&file, size)?;
            file.write_all_at(header, 0)?;
            rustix::fs::fsync(&file)?;
            fs::rename(&tmp, self.segment_path(base))?;
            self.sync_dir()
        })();
        if result.is_err() {
            // Best effort: a leftover is removed on the next open anyway.
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| file)
    }

    /// Creates a segment file atomically like [`SegmentDir::create`], but never replaces an
    /// existing one: the complete temporary file is hard-linked to the final name, which fails
    /// with `AlreadyExists` if that name exists. Safe to call from another thread.
    pub(crate) fn create_new(&self, base: u64, size: u64, header: &[u8]) -> io::Result<File> {
        let tmp = self.dir.join(format!("{base:020}{NEW_TMP_SUFFIX}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let result = (|| {
            allocate(&file, size)?;
            file.write_all_at(header, 0)?;
            rustix::fs::fsync(&file)?;
            fs::hard_link(&tmp, self.segment_path(base))
        })();
        // The temporary name goes in every case (the file lives on under its final name).
        let removed = fs::remove_file(&tmp);
        result?;
        removed?;
        self.sync_dir()?;
        Ok(file)
    }

    fn side_path(&self, name: SideFile) -> PathBuf {
        match name {
            SideFile::Index(base) => self.dir.join(format!("{base:020}{INDEX_SUFFIX}")),
            SideFile::Checkpoint => self.dir.join(CHECKPOINT_NAME),
        }
    }

    /// The side files present (well-formed names only).
    pub(crate) fn list_side(&self) -> io::Result<Vec<SideFile>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if name == CHECKPOINT_NAME {
                out.push(SideFile::Checkpoint);
            } else if let Some(digits) = name.strip_suffix(INDEX_SUFFIX)
                && digits.len() == 20
                && digits.bytes().all(|b| b.is_ascii_digit())
                && let Ok(base) = digits.parse::<u64>()
            {
                out.push(SideFile::Index(base));
            }
        }
        Ok(out)
    }

    /// Opens a side file read-only, or `None` if it does not exist.
    pub(crate) fn open_side(&self, name: SideFile) -> io::Result<Option<File>> {
        match File::open(self.side_path(name)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a side file atomically and durably: temporary file, `fsync`, `rename`, directory
    /// `fsync`. Safe to call from another thread (each side file has one writer at a time).
    pub(crate) fn write_side(&self, name: SideFile, bytes: &[u8]) -> io::Result<()> {
        let path = self.side_path(name);
        let mut tmp = path.clone().into_os_string();
        tmp.push(SIDE_TMP_SUFFIX);
        let tmp = PathBuf::from(tmp);
        let result = (|| {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            file.write_all_at(bytes, 0)?;
            rustix::fs::fsync(&file)?;
            fs::rename(&tmp, &path)?;
            self.sync_dir()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Deletes a side file and syncs the directory; a missing file is not an error.
    pub(crate) fn remove_side(&self, name: SideFile) -> io::Result<()> {
        match fs::remove_file(self.side_path(name)) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens an existing segment file read-write.
    pub(crate) fn open_segment(&self, base: u64) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.segment_path(base))
    }

    /// Deletes a segment file and syncs the directory.
    pub(crate) fn remove(&self, base: u64) -> io::Result<()> {
        fs::remove_file(self.segment_path(base))?;
        self.sync_dir()
    }
}

/// Allocates `size` bytes of real disk space (so a full disk fails here, not at a page write
/// through the map). Falls back to writing zeros where `fallocate` is unsupported.
fn allocate(file: &File, size: u64) -> io::Result<()> {
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            let zeros = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < size {
                let n = (size - off).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], off)?;
                off += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
