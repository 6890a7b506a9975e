//! Owned memory mappings, accessed only by bounds-checked copies.
//!
//! Memory here may be shared with the kernel or with other threads serving other queues, so it
//! is never lent out as a long-lived `&[u8]`: callers copy in and out with checked offsets.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use nix::unistd::{sysconf, SysconfVar};

/// A region from `mmap(2)`, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Mapped with `PROT_WRITE`: only then do the writing methods write.
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; all access goes through raw-pointer
// copies whose callers document their own synchronisation (see `read_at`/`write_at`).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only permits copies, never references into the memory.
unsafe impl Sync for Mapping {}

/// The system page size.
pub fn page_size() -> usize {
    sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(4096)
}

/// Rounds `n` up to a multiple of `align` (a power of two), or `None` on overflow.
pub fn round_up(n: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    Some(n.checked_add(align - 1)? & !(align - 1))
}

impl Mapping {
    /// Private anonymous memory of `len` bytes (rounded up to pages), zero-filled, lazily
    /// backed: untouched pages cost nothing.
    pub fn anonymous(len: usize) -> io::Result<Self> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            0,
        )
    }

    /// A shared read-write mapping of `len` bytes of `fd` from `offset`.
    pub fn shared(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Self> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            Some(fd),
            offset,
        )
    }

    /// A shared read-only mapping (the kernel's descriptor array). Its writing methods
    /// refuse to write.
    pub(crate) fn shared_read_only(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: u64,
    ) -> io::Result<Self> {
        Self::map(
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            Some(fd),
            offset,
        )
    }

    fn map(
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
    ) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        let raw_fd = fd.map_or(-1, |fd| fd.as_raw_fd());
        // SAFETY: a fresh mapping at an address of the kernel's choosing (null hint) cannot
        // alias any Rust object; the arguments are checked by the kernel.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw_fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping {
            ptr,
            len,
            writable: prot & libc::PROT_WRITE != 0,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Checks that `[offset, offset + len)` lies inside the mapping and returns its start.
    pub fn range(&self, offset: u64, len: usize) -> Option<*mut u8> {
        let offset = usize::try_from(offset).ok()?;
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset <= end <= self.len, so the result stays inside the mapping.
        Some(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// As [`Mapping::range`], for writing: `None` also when the mapping is read-only.
    pub fn range_mut(&self, offset: u64, len: usize) -> Option<*mut u8> {
        if !self.writable {
            return None;
        }
        self.range(offset, len)
    }

    /// Whether the mapping can be written.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Copies `dst.len()` bytes from `offset`; `false` (nothing copied) when out of bounds.
    ///
    /// Concurrent writers to the same range (other queues) leave the copied bytes unspecified,
    /// as a disk does for overlapping in-flight I/O; no Rust reference to the mapping exists.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> bool {
        let Some(src) = self.range(offset, dst.len()) else {
            return false;
        };
        // SAFETY: src..src+len is inside the mapping (checked by `range`); dst is a distinct
        // Rust buffer that cannot overlap a mapping we own.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copies `src` to `offset`; `false` (nothing copied) when out of bounds or read-only.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> bool {
        let Some(dst) = self.range_mut(offset, src.len()) else {
            return false;
        };
        // SAFETY: dst..dst+len is inside the mapping, which is writable (both checked by
        // `range_mut`); src is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        true
    }

    /// Zeroes `[offset, offset + len)`; `false` when out of bounds or read-only.
    pub fn zero(&self, offset: u64, len: usize) -> bool {
        let Some(dst) = self.range_mut(offset, len) else {
            return false;
        };
        // SAFETY: inside the mapping and writable (both checked by `range_mut`).
        unsafe { std::ptr::write_bytes(dst, 0, len) };
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped exactly once, here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_bounds_checked() {
        let m = Mapping::anonymous(8192).expect("anonymous mmap");
        assert!(m.write_at(8190, &[1, 2]));
        assert!(!m.write_at(8191, &[1, 2]));
        assert!(!m.write_at(u64::MAX, &[1]));
        let mut out = [0u8; 2];
        assert!(m.read_at(8190, &mut out));
        assert_eq!(out, [1, 2]);
        assert!(m.zero(8190, 2));
        assert!(m.read_at(8190, &mut out));
        assert_eq!(out, [0, 0]);
        assert!(!m.zero(8000, 500));
    }

    #[test]
    fn read_only_mappings_refuse_writes() {
        let file = std::fs::File::open("/proc/self/exe").expect("own executable");
        let m = Mapping::shared_read_only(std::os::fd::AsFd::as_fd(&file), 4096, 0)
            .expect("read-only mmap");
        assert!(!m.is_writable());
        assert!(!m.write_at(0, &[1]));
        assert!(!m.zero(0, 1));
        assert!(m.range_mut(0, 1).is_none());
        let mut out = [0u8; 4];
        assert!(m.read_at(0, &mut out));
        assert_eq!(&out, b"\x7fELF");
    }

    #[test]
    fn round_up_handles_overflow() {
        assert_eq!(round_up(1, 4096), Some(4096));
        assert_eq!(round_up(4096, 4096), Some(4096));
        assert_eq!(round_up(usize::MAX, 4096), None);
    }
}
