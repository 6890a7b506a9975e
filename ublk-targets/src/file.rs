//! The file target: a loop device in user space. Each request becomes one io_uring operation
//! on the queue's own ring, completed asynchronously when its CQE arrives:
//! read/write → `READ`/`WRITE` straight into/out of the request's buffer, or
//! `READ_FIXED`/`WRITE_FIXED` on its fixed buffer in the registered and zero-copy buffer
//! modes, where in zero-copy the bytes go between the file and the kernel's own pages (FUA →
//! `RWF_DSYNC`), flush → `fdatasync`, discard → `fallocate(PUNCH_HOLE)`, write-zeroes →
//! `fallocate(ZERO_RANGE)` (or `PUNCH_HOLE` when unmapping is allowed).
//!
//! Each queue registers the backing file in its ring's file table on first use, so operations
//! name it by index (no per-operation file lookup). The operations are the engine's safe
//! ones ([`QueueCtx::read`], [`QueueCtx::write`], ...): the engine keeps each request alive
//! until its operation completes and hands it back; nothing on the path takes a lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use ublk_zc::{Bounce, Completion, Io, Op, OpenCtx, QueueCtx, QueueFile, QueueTarget, Target};

/// A device backed by a regular file (or a block device).
#[derive(Debug, Clone)]
pub struct FileTarget {
    file: Arc<File>,
    size: u64,
    direct: bool,
}

impl FileTarget {
    /// Opens `path` (created if missing). With `size`, the file is grown to it if smaller;
    /// without, the device takes the file's size. `direct` opens with `O_DIRECT`, bypassing the
    /// page cache.
    pub fn open(path: &Path, size: Option<u64>, direct: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true)
            .write(true)
            .create(size.is_some())
            .truncate(false);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(path)?;
        // A block device's metadata says 0 bytes; seeking to its end gives its size.
        let len = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
        let size = match size {
            Some(size) if len < size => {
                file.set_len(size)?;
                size
            }
            Some(size) => size,
            None if len == 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is empty: give a size", path.display()),
                ))
            }
            None => len,
        };
        Ok(FileTarget {
            file: Arc::new(file),
            size,
            direct,
        })
    }

    /// Opens `path` read-only, for direct access ([`Target::read_at`]) by a tool that must
    /// not change it (`ublk check`). Its queues are not meant to serve: a write through
    /// one fails with `EBADF`.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        let mut file = File::open(path)?;
        // A block device's metadata says 0 bytes; seeking to its end gives its size.
        let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
        Ok(FileTarget {
            file: Arc::new(file),
            size,
            direct: false,
        })
    }

    /// Serves an already open file of at least `size` bytes.
    pub fn from_file(file: File, size: u64) -> io::Result<Self> {
        if file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        Ok(FileTarget {
            file: Arc::new(file),
            size,
            direct: false,
        })
    }

    /// Checks that `[offset, offset + len)` lies inside the device.
    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} lie past the end ({} bytes)",
                    self.size
                ),
            )),
        }
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Target for FileTarget {
    type Queue = FileQueue;

    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<FileQueue> {
        if ctx.node().index() == 0 && ctx.geometry().size > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the device is larger than its backing file",
            ));
        }
        Ok(FileQueue {
            file: Arc::clone(&self.file),
            queue_file: None,
        })
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    /// Reads and writes go to the file with fixed-buffer operations when the request has a
    /// fixed buffer, so the bytes never pass through this process in zero-copy mode.
    fn needs_data(&self) -> bool {
        false
    }

    /// `pread`; with `O_DIRECT`, straight into a page-aligned buffer or through one (offset
    /// and length must then be multiples of the file's logical block size).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        if self.direct && !aligned(buf) {
            let mut bounce = Bounce::new(buf.len())?;
            self.file.read_exact_at(bounce.as_mut_slice(), offset)?;
            buf.copy_from_slice(bounce.as_slice());
            Ok(())
        } else {
            self.file.read_exact_at(buf, offset)
        }
    }

    /// `pwrite` then `fdatasync`; with `O_DIRECT`, through a page-aligned buffer.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        if self.direct && !aligned(buf) {
            let mut bounce = Bounce::new(buf.len())?;
            bounce.as_mut_slice().copy_from_slice(buf);
            self.file.write_all_at(bounce.as_slice(), offset)?;
        } else {
            self.file.write_all_at(buf, offset)?;
        }
        self.file.sync_data()
    }
}

/// Whether `buf` can go to an `O_DIRECT` file as it is: page-aligned address and length.
fn aligned(buf: &[u8]) -> bool {
    const PAGE: usize = 4096;
    (buf.as_ptr() as usize) % PAGE == 0 && buf.len() % PAGE == 0
}

/// One queue of a [`FileTarget`].
#[derive(Debug)]
pub struct FileQueue {
    file: Arc<File>,
    /// How this queue's operations name the file, settled on the first request.
    queue_file: Option<QueueFile>,
}

/// Tokens of this node's operations: what the completion must still do.
const DONE: u64 = 0;
/// A write-zeroes whose ZERO_RANGE the file system refused: punch a hole instead.
const ZERO_RANGE: u64 = 1;

impl QueueTarget for FileQueue {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let file = self.queue_file(ctx);
        let (offset, len) = (io.offset(), u64::from(io.len()));
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        match io.op() {
            Op::Read => ctx.read(&file, io, offset, DONE),
            Op::Write => ctx.write(&file, io, offset, DONE),
            Op::Flush => ctx.fsync(&file, true, Some(io), DONE),
            Op::Discard => {
                let punch = (libc::FALLOC_FL_PUNCH_HOLE | KEEP, offset, len);
                ctx.fallocate(&file, punch, Some(io), DONE)
            }
            Op::WriteZeroes => {
                let (mode, token) = if io.flags().no_unmap() {
                    (libc::FALLOC_FL_ZERO_RANGE, ZERO_RANGE)
                } else {
                    (libc::FALLOC_FL_PUNCH_HOLE, DONE)
                };
                ctx.fallocate(&file, (mode | KEEP, offset, len), Some(io), token)
            }
            _ => io.fail(libc::EOPNOTSUPP),
        }
    }

    fn complete(&mut self, done: Completion, ctx: &mut QueueCtx<'_>) {
        let Some(io) = done.io else {
            tracing::error!("file target: a completion without its request");
            return;
        };
        let res = done.result;
        match io.op() {
            // The backing file covers the device, so 0 bytes for a non-empty I/O is an error;
            // a short count is a partial completion that the kernel re-issues for the rest.
            Op::Read | Op::Write if res == 0 && !io.is_empty() => io.fail(libc::EIO),
            Op::Read | Op::Write => io.complete(res),
            // tmpfs cannot ZERO_RANGE: punching a hole also reads back as zeroes.
            Op::WriteZeroes if res == -libc::EOPNOTSUPP && done.token == ZERO_RANGE => {
                let file = self.queue_file(ctx);
                let (offset, len) = (io.offset(), u64::from(io.len()));
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                ctx.fallocate(&file, (mode, offset, len), Some(io), DONE)
            }
            _ if res < 0 => io.complete(res),
            _ => io.complete_ok(),
        }
    }
}

impl FileQueue {
    /// The file as this queue's operations name it: registered in the ring's file table the
    /// first time, or the plain descriptor if the ring has no room.
    fn queue_file(&mut self, ctx: &mut QueueCtx<'_>) -> QueueFile {
        self.queue_file
            .get_or_insert_with(|| ctx.file(&self.file))
            .clone()
    }
}
