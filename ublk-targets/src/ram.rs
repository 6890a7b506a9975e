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
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ublk_zc::{Io, Mapping, Op, OpenCtx, QueueCtx, QueueTarget, Target};

#[derive(Debug)]
struct Memory {
    file: File,
    map: Mapping,
    written: PageMap,
}

/// Which 4 KiB pages may hold data; the others read as zeroes without touching the mapping.
///
/// Reading a never-written page of a shared memfd mapping would allocate and zero a page;
/// like brd, which answers absent pages with zeroes, the RAM target skips them. One bit per
/// page, set after a write's bytes are in place (Release) and tested before a read (Acquire);
/// cleared for pages a discard frees completely.
#[derive(Debug)]
struct PageMap(Vec<AtomicU64>);

const PAGE: u64 = 4096;

impl PageMap {
    fn new(size: u64) -> Self {
        let pages = size.div_ceil(PAGE);
        PageMap((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn is_set(&self, page: u64) -> bool {
        let (word, bit) = ((page / 64) as usize, page % 64);
        self.0
            .get(word)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << bit) != 0)
    }

    /// Sets (or clears) the bits of pages `first..end`.
    fn update(&self, first: u64, end: u64, set: bool) {
        for page in first..end {
            let (word, bit) = ((page / 64) as usize, page % 64);
            if let Some(w) = self.0.get(word) {
                if set {
                    w.fetch_or(1 << bit, Ordering::Release);
                } else {
                    w.fetch_and(!(1 << bit), Ordering::Release);
                }
            }
        }
    }

    /// The number of pages set.
    fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Marks every page of `[offset, offset + len)` as written.
    fn mark(&self, offset: u64, len: u64) {
        if len > 0 {
            self.update(offset / PAGE, (offset + len).div_ceil(PAGE), true);
        }
    }

    /// Clears the pages lying wholly inside `[offset, offset + len)`.
    fn clear_whole(&self, offset: u64, len: u64) {
        self.update(offset.div_ceil(PAGE), (offset + len) / PAGE, false);
    }
}

/// A device held in memory.
#[derive(Debug, Clone)]
pub struct Ram(Arc<Memory>);

impl Ram {
    /// `size` bytes of anonymous shared memory (a memfd), zero-filled, allocated on first
    /// write.
    pub fn new(size: u64) -> io::Result<Self> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let file = File::from(memfd_create(c"ublk-ram", MFdFlags::MFD_CLOEXEC)?);
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
        let written = PageMap::new(size);
        mark_data_ranges(&file, size, &written)?;
        Ok(Ram(Arc::new(Memory { file, map, written })))
    }

    /// The 4 KiB pages that may hold data: written, and not freed since by a discard or
    /// write-zeroes covering them whole.
    pub fn written_pages(&self) -> u64 {
        self.0.written.count()
    }

    /// Answers a read: pages ever written are copied from memory, the others are zero-filled
    /// without touching the mapping. Runs of pages in the same state move in one copy (one
    /// `pwrite` in user-copy mode).
    fn read(&self, io: &mut Io) -> io::Result<()> {
        let (offset, len) = (io.offset(), io.len() as usize);
        let written = |at: usize| self.0.written.is_set((offset + at as u64) / PAGE);
        let mut done = 0usize;
        while done < len {
            let state = written(done);
            // The first run ends at a page boundary; later ones step a page at a time.
            let mut end = done + ((PAGE - (offset + done as u64) % PAGE) as usize).min(len - done);
            while end < len && written(end) == state {
                end += (PAGE as usize).min(len - end);
            }
            if state {
                io.copy_data_from_mapping(done, &self.0.map, offset + done as u64, end - done)?;
            } else {
                io.zero_data(done, end - done)?;
            }
            done = end;
        }
        Ok(())
    }

    /// Stores a write's data and marks its pages written.
    fn write(&self, io: &Io) -> io::Result<()> {
        let len = io.len() as usize;
        io.copy_data_to_mapping(0, &self.0.map, io.offset(), len)?;
        self.0.written.mark(io.offset(), len as u64);
        Ok(())
    }

    /// Frees `[offset, offset + len)`: later reads return zeroes.
    fn punch(&self, offset: u64, len: u32) -> bool {
        use nix::fcntl::{fallocate, FallocateFlags};
        let Ok(off) = libc::off_t::try_from(offset) else {
            return false;
        };
        let n = libc::off_t::from(len);
        if self.0.map.range(offset, len as usize).is_none() {
            return false;
        }
        self.0.written.clear_whole(offset, u64::from(len));
        let punched = fallocate(
            &self.0.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        );
        // A file system without hole punching still gets the zeroes.
        punched.is_ok() || self.0.map.zero(offset, len as usize)
    }

    fn serve(&self, mut io: Io) {
        let offset = io.offset();
        let done = match io.op() {
            Op::Read => self.read(&mut io).is_ok(),
            Op::Write => self.write(&io).is_ok(),
            Op::Flush => true,
            Op::Discard => self.punch(offset, io.len()),
            Op::WriteZeroes if io.flags().no_unmap() => {
                let ok = self.0.map.zero(offset, io.len() as usize);
                self.0.written.mark(offset, u64::from(io.len()));
                ok
            }
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

/// Marks the pages holding data in an existing backing file (`SEEK_DATA`/`SEEK_HOLE`), so
/// data kept from an earlier server is found.
fn mark_data_ranges(file: &File, size: u64, written: &PageMap) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let mut pos: libc::off_t = 0;
    let end = libc::off_t::try_from(size).unwrap_or(libc::off_t::MAX);
    while pos < end {
        let data = match lseek(file, pos, Whence::SeekData) {
            Ok(data) => data,
            Err(Errno::ENXIO) => return Ok(()), // no data past pos
            // A file system without SEEK_DATA: treat everything as data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                written.mark(0, size);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(file, data, Whence::SeekHole).map_or(end, |hole| hole.min(end));
        if data >= end {
            break;
        }
        written.mark(data as u64, (hole - data) as u64);
        pos = hole;
    }
    Ok(())
}

impl Target for Ram {
    type Queue = Ram;

    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<Ram> {
        // As a child, requests are checked against `size()`; as the root, against the device.
        if ctx.node().index() == 0 && (self.0.map.len() as u64) < ctx.geometry().size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RAM target is smaller than the device",
            ));
        }
        Ok(self.clone())
    }

    fn size(&self) -> Option<u64> {
        Some(self.0.map.len() as u64)
    }

    fn copies_data(&self) -> bool {
        true
    }

    /// Copies from memory.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.0.map.read_at(offset, buf) {
            Ok(())
        } else {
            Err(out_of_range(offset, buf.len()))
        }
    }

    /// Copies into memory (durable as memory is: until the backing goes away).
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if !self.0.map.write_at(offset, buf) {
            return Err(out_of_range(offset, buf.len()));
        }
        self.0.written.mark(offset, buf.len() as u64);
        Ok(())
    }
}

fn out_of_range(offset: u64, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{len} bytes at {offset} lie outside the RAM device"),
    )
}

impl QueueTarget for Ram {
    fn submit(&mut self, io: Io, _ctx: &mut QueueCtx<'_>) {
        self.serve(io);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublk_core::sim::SimQueue;
    use ublk_core::sys;
    use ublk_zc::Geometry;

    const GEO: Geometry = Geometry {
        size: 1 << 20,
        logical_block_size: 512,
        max_io: 64 << 10,
    };

    #[test]
    fn unwritten_pages_read_as_zeroes_and_written_ones_back() {
        let mut q = SimQueue::new(&Ram::new(GEO.size).expect("memfd"), GEO, 4).expect("queue");
        assert_eq!(q.read(0, 8192), Ok(vec![0; 8192]));
        // A write straddling a page boundary marks both pages.
        assert_eq!(q.write(4096 - 512, &[7; 2048]), Ok(2048));
        let back = q.read(0, 8192).expect("read");
        assert!(back[..4096 - 512].iter().all(|b| *b == 0));
        assert!(back[4096 - 512..4096 + 1536].iter().all(|b| *b == 7));
        assert!(back[4096 + 1536..].iter().all(|b| *b == 0));
        // Discarding part of a page keeps the rest of it.
        assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, 4096, 512), Ok(0));
        let back = q.read(4096, 1024).expect("read");
        assert!(back[..512].iter().all(|b| *b == 0));
        assert!(back[512..].iter().all(|b| *b == 7));
    }

    #[test]
    fn user_copy_moves_runs_of_written_and_unwritten_pages() {
        use ublk_core::BufferMode;
        let ram = Ram::new(GEO.size).expect("memfd");
        let mut q = SimQueue::with_mode(&ram, GEO, 4, BufferMode::UserCopy).expect("queue");
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 253) as u8 + 1).collect();
        assert_eq!(q.write(8192 + 512, &data), Ok(12288));
        let back = q.read(4096, 32768).expect("read");
        assert!(back[..4096 + 512].iter().all(|b| *b == 0));
        assert_eq!(&back[4096 + 512..4096 + 512 + 12288], &data[..]);
        assert!(back[4096 + 512 + 12288..].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_backing_file_keeps_data_for_the_next_server() {
        let path = std::env::temp_dir().join(format!("ublk-ram-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let ram = Ram::with_backing(&path, GEO.size).expect("backing file");
            let mut q = SimQueue::new(&ram, GEO, 4).expect("queue");
            assert_eq!(q.write(512 << 10, &[9; 4096]), Ok(4096));
        }
        let ram = Ram::with_backing(&path, GEO.size).expect("reopen");
        let mut q = SimQueue::new(&ram, GEO, 4).expect("queue");
        assert_eq!(q.read(512 << 10, 4096), Ok(vec![9; 4096]));
        assert_eq!(q.read(0, 4096), Ok(vec![0; 4096]));
        std::fs::remove_file(&path).expect("cleanup");
    }
}
