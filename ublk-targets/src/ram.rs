//! The RAM target: the device's bytes live in shared memory — an anonymous memfd, or a file
//! on a tmpfs such as `/dev/shm` when a backing path is given, so the data can outlive the
//! server (for recovery).
//!
//! Every queue serves from the same mapping. Requests that overlap while in flight on
//! different queues give unspecified bytes for the overlap, as a disk does; the mapping is only
//! ever accessed by bounds-checked copies. Discard and write-zeroes punch holes in the memory
//! (freeing it); write-zeroes with NOUNMAP writes zeroes in place.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;

use ublk_zc::{Geometry, Io, Mapping, Op, QueueCtx, QueueTarget, Target};

#[derive(Debug)]
struct Memory {
    file: File,
    map: Mapping,
}

/// A device held in memory.
#[derive(Debug, Clone)]
pub struct Ram(Arc<Memory>);

impl Ram {
    /// `size` bytes of anonymous shared memory (a memfd), zero-filled, allocated on first
    /// write.
    pub fn new(size: u64) -> io::Result<Self> {
        // SAFETY: the name is a NUL-terminated literal; a non-negative result is a new fd.
        let fd = unsafe { libc::memfd_create(c"ublk-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        Self::map(file, size)
    }

    /// `size` bytes kept in the file at `path` (created if missing, grown if smaller). Use a
    /// tmpfs path such as `/dev/shm/NAME` to keep the data in memory.
    pub fn with_backing(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < size {
            file.set_len(size)?;
        } else if len > size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} holds {len} bytes, more than the device size {size}",
                    path.display()
                ),
            ));
        }
        Self::map(file, size)
    }

    fn map(file: File, size: u64) -> io::Result<Self> {
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size exceeds memory"))?;
        let map = Mapping::shared(file.as_fd(), len, 0)?;
        Ok(Ram(Arc::new(Memory { file, map })))
    }

    /// Frees `[offset, offset + len)`: later reads return zeroes.
    fn punch(&self, offset: u64, len: u32) -> bool {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return false;
        };
        let n = libc::off_t::from(len);
        if self.0.map.range(offset, len as usize).is_none() {
            return false;
        }
        // SAFETY: fallocate takes no pointers; the fd is ours and the range was checked.
        let rc = unsafe {
            libc::fallocate(
                self.0.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        // A file system without hole punching still gets the zeroes.
        rc == 0 || self.0.map.zero(offset, len as usize)
    }

    fn serve(&self, mut io: Io) {
        let offset = io.offset();
        let done = match io.op() {
            Op::Read => self.0.map.read_at(offset, io.data_mut()),
            Op::Write => self.0.map.write_at(offset, io.data()),
            Op::Flush => true,
            Op::Discard => self.punch(offset, io.len()),
            Op::WriteZeroes if io.flags().no_unmap() => self.0.map.zero(offset, io.len() as usize),
            Op::WriteZeroes => self.punch(offset, io.len()),
            _ => return io.fail(libc::EOPNOTSUPP),
        };
        if done {
            io.complete_ok();
        } else {
            io.fail(libc::EIO);
        }
    }
}

impl Target for Ram {
    type Queue = Ram;

    fn open_queue(&self, _q_id: u16, geo: &Geometry) -> io::Result<Ram> {
        if (self.0.map.len() as u64) < geo.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RAM target is smaller than the device",
            ));
        }
        Ok(self.clone())
    }
}

impl QueueTarget for Ram {
    fn submit(&mut self, io: Io, _ctx: &mut QueueCtx<'_>) {
        self.serve(io);
    }
}
