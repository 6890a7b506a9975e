//! The file target: a loop device in user space. Each request becomes one io_uring operation
//! on the queue's own ring, completed asynchronously when its CQE arrives:
//! read/write → `READ`/`WRITE` straight into/out of the request's buffer, or
//! `READ_FIXED`/`WRITE_FIXED` on its fixed buffer in the registered and zero-copy buffer
//! modes, where in zero-copy the bytes go between the file and the kernel's own pages (FUA →
//! `RWF_DSYNC`), flush → `fdatasync`, discard → `fallocate(PUNCH_HOLE)`, write-zeroes →
//! `fallocate(ZERO_RANGE)` (or `PUNCH_HOLE` when unmapping is allowed).
//!
//! Each queue registers the backing file in its ring's file table on first use, so operations
//! name it by index (no per-operation file lookup). In-flight requests wait in a per-queue
//! slab keyed by the SQE's `user_data`; nothing on the path takes a lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use slab::Slab;
use ublk_core::io_uring::{opcode, squeue, types};
use ublk_zc::{Geometry, Io, Op, QueueCtx, QueueTarget, Target};

/// A device backed by a regular file (or a block device).
#[derive(Debug, Clone)]
pub struct FileTarget {
    file: Arc<File>,
    size: u64,
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
        let file = opts.open(path)?;
        let len = file.metadata()?.len();
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
        })
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Target for FileTarget {
    type Queue = FileQueue;

    fn open_queue(&self, _q_id: u16, geo: &Geometry) -> io::Result<FileQueue> {
        if geo.size > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the device is larger than its backing file",
            ));
        }
        Ok(FileQueue {
            file: Arc::clone(&self.file),
            fd: None,
            in_flight: Slab::new(),
        })
    }

    /// Reads and writes go to the file with fixed-buffer operations when the request has a
    /// fixed buffer, so the bytes never pass through this process in zero-copy mode.
    fn needs_data(&self) -> bool {
        false
    }
}

/// One queue of a [`FileTarget`].
#[derive(Debug)]
pub struct FileQueue {
    file: Arc<File>,
    /// How SQEs name the file, settled on the first request.
    fd: Option<FileRef>,
    /// Requests waiting for their operation, and whether it is a retry.
    in_flight: Slab<(Io, bool)>,
}

/// How this queue's SQEs name the backing file.
#[derive(Debug, Clone, Copy)]
enum FileRef {
    /// Index in the queue ring's file table.
    Fixed(u32),
    /// The plain descriptor (no file table on this ring).
    Fd(i32),
}

impl FileRef {
    /// The descriptor field of an SQE; [`FileRef::flags`] says how to read it.
    fn fd(self) -> types::Fd {
        match self {
            FileRef::Fixed(index) => types::Fd(index as i32),
            FileRef::Fd(fd) => types::Fd(fd),
        }
    }

    fn flags(self) -> squeue::Flags {
        match self {
            FileRef::Fixed(_) => squeue::Flags::FIXED_FILE,
            FileRef::Fd(_) => squeue::Flags::empty(),
        }
    }
}

/// The one io_uring operation that serves `io` on `file`.
fn sqe_for(file: FileRef, io: &mut Io) -> squeue::Entry {
    let fd = file.fd();
    let (offset, len) = (io.offset(), io.len());
    match io.op() {
        Op::Read => match io.fixed_buf() {
            Some(fb) => opcode::ReadFixed::new(fd, fb.addr as *mut u8, len, fb.index)
                .offset(offset)
                .build(),
            None => opcode::Read::new(fd, io.data_mut().as_mut_ptr(), len)
                .offset(offset)
                .build(),
        },
        Op::Write => {
            let flags = if io.flags().fua() { libc::RWF_DSYNC } else { 0 };
            match io.fixed_buf() {
                Some(fb) => opcode::WriteFixed::new(fd, fb.addr as *const u8, len, fb.index)
                    .offset(offset)
                    .rw_flags(flags)
                    .build(),
                None => opcode::Write::new(fd, io.data().as_ptr(), len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build(),
            }
        }
        Op::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Op::Discard => opcode::Fallocate::new(fd, u64::from(len))
            .offset(offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
        _ => {
            let mode = if io.flags().no_unmap() || io.op() != Op::WriteZeroes {
                libc::FALLOC_FL_ZERO_RANGE
            } else {
                libc::FALLOC_FL_PUNCH_HOLE
            };
            opcode::Fallocate::new(fd, u64::from(len))
                .offset(offset)
                .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
                .build()
        }
    }
}

impl QueueTarget for FileQueue {
    fn submit(&mut self, mut io: Io, ctx: &mut QueueCtx<'_>) {
        if !matches!(
            io.op(),
            Op::Read | Op::Write | Op::Flush | Op::Discard | Op::WriteZeroes
        ) {
            return io.fail(libc::EOPNOTSUPP);
        }
        let file = self.file_ref(ctx);
        let key = self.in_flight.vacant_key();
        let sqe = sqe_for(file, &mut io)
            .flags(file.flags())
            .user_data(key as u64);
        // SAFETY: the SQE reads or writes `io`'s buffer, which stays valid while `io` waits in
        // the slab until this operation's completion removes it; the file is held by `self`.
        match unsafe { ctx.push(&sqe) } {
            Ok(()) => {
                self.in_flight.insert((io, false));
            }
            Err(e) => {
                tracing::error!("file target cannot queue I/O: {e}");
                io.fail(libc::EIO);
            }
        }
    }

    fn complete(&mut self, user_data: u64, res: i32, ctx: &mut QueueCtx<'_>) {
        let Some((io, retried)) = usize::try_from(user_data)
            .ok()
            .and_then(|key| self.in_flight.try_remove(key))
        else {
            tracing::error!(user_data, "completion for no request of the file target");
            return;
        };
        match io.op() {
            // The backing file covers the device, so 0 bytes for a non-empty I/O is an error;
            // a short count is a partial completion that the kernel re-issues for the rest.
            Op::Read | Op::Write if res == 0 && !io.is_empty() => io.fail(libc::EIO),
            Op::Read | Op::Write => io.complete(res),
            // tmpfs cannot ZERO_RANGE: punching a hole also reads back as zeroes.
            Op::WriteZeroes if res == -libc::EOPNOTSUPP && !retried => self.punch(io, ctx),
            _ if res < 0 => io.complete(res),
            _ => io.complete_ok(),
        }
    }
}

impl FileQueue {
    /// The file as this queue's SQEs name it: registered in the ring's file table the first
    /// time, or the plain descriptor if the ring has no room.
    fn file_ref(&mut self, ctx: &mut QueueCtx<'_>) -> FileRef {
        *self
            .fd
            .get_or_insert_with(|| match ctx.register_file(self.file.as_fd()) {
                Ok(index) => FileRef::Fixed(index),
                Err(e) => {
                    tracing::debug!("file target uses a plain descriptor: {e}");
                    FileRef::Fd(self.file.as_raw_fd())
                }
            })
    }

    fn punch(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let file = self.file_ref(ctx);
        let key = self.in_flight.vacant_key();
        let sqe = opcode::Fallocate::new(file.fd(), u64::from(io.len()))
            .offset(io.offset())
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build()
            .flags(file.flags())
            .user_data(key as u64);
        // SAFETY: fallocate touches no memory; the file is held by `self`.
        match unsafe { ctx.push(&sqe) } {
            Ok(()) => {
                self.in_flight.insert((io, true));
            }
            Err(_) => io.fail(libc::EIO),
        }
    }
}
