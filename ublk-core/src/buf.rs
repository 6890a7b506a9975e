//! The tag arena: one page-aligned buffer per tag of a queue, carved from one mapping.

use std::io;

use crate::mmap::{page_size, round_up, Mapping};

/// `depth` buffers of `buf_len` bytes each, page aligned, for one queue.
///
/// The kernel copies a write's data into a tag's buffer before it completes that tag's fetch,
/// and copies a read's data out after the commit; in between the buffer belongs to the server
/// alone. The arena hands out raw regions; [`crate::Io`] is what lends them safely.
#[derive(Debug)]
pub struct TagArena {
    map: Mapping,
    buf_len: usize,
    depth: u16,
}

impl TagArena {
    /// Maps `depth` buffers of `max_io` bytes (each rounded up to whole pages).
    pub fn new(depth: u16, max_io: u32) -> io::Result<Self> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "tag arena too large");
        let buf_len = round_up(max_io as usize, page_size()).ok_or_else(too_big)?;
        let total = buf_len
            .checked_mul(usize::from(depth))
            .ok_or_else(too_big)?;
        Ok(TagArena {
            map: Mapping::anonymous(total)?,
            buf_len,
            depth,
        })
    }

    /// Bytes per tag.
    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    /// Number of tags.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Start of `tag`'s buffer, or `None` for a tag beyond the depth.
    pub fn buf_ptr(&self, tag: u16) -> Option<*mut u8> {
        if tag >= self.depth {
            return None;
        }
        self.map
            .range(u64::from(tag) * self.buf_len as u64, self.buf_len)
    }

    /// Address of `tag`'s buffer as the kernel wants it in FETCH/COMMIT commands (0 if none).
    pub fn buf_addr(&self, tag: u16) -> u64 {
        self.buf_ptr(tag).map_or(0, |p| p as u64)
    }
}

/// Bytes of idle buffers a [`BufPool`] keeps once none is lent out; the rest are unmapped.
pub(crate) const POOL_IDLE_BYTES: usize = 2 << 20;

/// Buffers lent to requests only while they are in flight (`UBLK_F_NEED_GET_DATA`): a
/// write's buffer is taken when the kernel asks where to put its data, a read's when the
/// target is handed the request, and both come back after the commit. Sizes go by powers of
/// two from one page. Buffers that come back wait for reuse, so a busy queue maps nothing new;
/// once none is out, the queue trims the idle ones beyond `max_idle` when it has had nothing
/// to do for a moment ([`crate::queue`] waits with a timeout while [`BufPool::has_excess`]),
/// so an idle queue holds at most that much.
#[derive(Debug)]
pub(crate) struct BufPool {
    /// Idle buffers by size class (class `c`: `page << c` bytes).
    idle: Vec<Vec<Mapping>>,
    idle_bytes: usize,
    max_idle: usize,
    /// Buffers lent out.
    lent: usize,
}

/// A buffer of a [`BufPool`], lent to one request.
#[derive(Debug)]
pub(crate) struct PoolBuf {
    map: Mapping,
    class: usize,
}

impl PoolBuf {
    /// Start of the buffer.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Its size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

impl BufPool {
    /// A pool keeping up to `max_idle` bytes of idle buffers.
    pub(crate) fn new(max_idle: usize) -> Self {
        BufPool {
            idle: Vec::new(),
            idle_bytes: 0,
            max_idle,
            lent: 0,
        }
    }

    /// The size class of a buffer of at least `len` bytes.
    fn class_of(len: usize) -> usize {
        let pages = len.max(1).div_ceil(page_size());
        pages.next_power_of_two().trailing_zeros() as usize
    }

    /// A buffer of at least `len` bytes.
    pub(crate) fn take(&mut self, len: usize) -> io::Result<PoolBuf> {
        let class = Self::class_of(len);
        let map = match self.idle.get_mut(class).and_then(Vec::pop) {
            Some(map) => {
                self.idle_bytes -= map.len();
                map
            }
            None => {
                let size = page_size()
                    .checked_shl(class as u32)
                    .filter(|&s| s >= len)
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "buffer too large")
                    })?;
                Mapping::anonymous(size)?
            }
        };
        self.lent += 1;
        Ok(PoolBuf { map, class })
    }

    /// Returns a buffer for reuse.
    pub(crate) fn give(&mut self, buf: PoolBuf) {
        self.lent = self.lent.saturating_sub(1);
        if self.idle.len() <= buf.class {
            self.idle.resize_with(buf.class + 1, Vec::new);
        }
        self.idle_bytes += buf.len();
        self.idle[buf.class].push(buf.map);
    }

    /// Whether none is lent out and more than `max_idle` bytes wait idle: a [`BufPool::trim`]
    /// would free memory.
    pub(crate) fn has_excess(&self) -> bool {
        self.lent == 0 && self.idle_bytes > self.max_idle
    }

    /// Unmaps idle buffers, the largest first, until at most `max_idle` bytes are left.
    pub(crate) fn trim(&mut self) {
        for class in (0..self.idle.len()).rev() {
            while self.idle_bytes > self.max_idle {
                let Some(map) = self.idle[class].pop() else {
                    break;
                };
                self.idle_bytes -= map.len();
            }
        }
    }

    /// Bytes of idle buffers kept.
    #[cfg(test)]
    pub(crate) fn idle_bytes(&self) -> usize {
        self.idle_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;

    #[test]
    fn modes_fall_back_to_what_the_kernel_has() {
        let all = sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_USER_COPY;
        for mode in BufferMode::ALL {
            assert_eq!(mode.effective(all), mode);
        }
        let manual_only = sys::UBLK_F_SUPPORT_ZERO_COPY;
        assert_eq!(
            BufferMode::ZeroCopy.effective(manual_only),
            BufferMode::ManualZeroCopy
        );
        assert_eq!(
            BufferMode::ManualZeroCopy.effective(sys::UBLK_F_AUTO_BUF_REG),
            BufferMode::ZeroCopy
        );
        assert_eq!(BufferMode::ZeroCopy.effective(0), BufferMode::Registered);
        assert_eq!(BufferMode::UserCopy.effective(0), BufferMode::Copy);
        assert_eq!(BufferMode::Registered.effective(0), BufferMode::Registered);
        assert_eq!(BufferMode::Copy.effective(0), BufferMode::Copy);
    }

    #[test]
    fn pool_reuses_buffers_by_size_and_trims_to_its_budget() {
        let page = page_size();
        let mut pool = BufPool::new(4 * page);
        let a = pool.take(1).expect("one page");
        assert_eq!(a.len(), page);
        let b = pool.take(page + 1).expect("two pages");
        assert_eq!(b.len(), 2 * page);
        let c = pool.take(5 * page).expect("eight pages");
        assert_eq!(c.len(), 8 * page);
        let b_ptr = b.as_ptr();
        // While some are out, everything returned is kept.
        pool.give(c);
        pool.give(b);
        assert_eq!(pool.idle_bytes(), 10 * page);
        let again = pool.take(2 * page).expect("two pages again");
        assert_eq!(again.as_ptr(), b_ptr);
        pool.give(again);
        assert!(!pool.has_excess(), "one is still out");
        pool.give(a);
        assert!(pool.has_excess());
        // Trimmed to the budget, the largest first.
        pool.trim();
        assert_eq!(pool.idle_bytes(), 3 * page);
        assert!(!pool.has_excess());
        assert!(pool.take(usize::MAX).is_err());
    }

    #[test]
    fn buffers_are_page_aligned_and_disjoint() {
        let arena = TagArena::new(4, 5000).expect("arena");
        assert_eq!(arena.buf_len(), 8192);
        let a = arena.buf_ptr(0).expect("tag 0") as usize;
        let b = arena.buf_ptr(1).expect("tag 1") as usize;
        assert_eq!(a % page_size(), 0);
        assert_eq!(b - a, 8192);
        assert!(arena.buf_ptr(4).is_none());
        assert_eq!(arena.buf_addr(4), 0);
    }
}

/// How request data moves between the kernel and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum BufferMode {
    /// The kernel copies each request's data to and from the tag's buffer in the server.
    #[default]
    Copy,
    /// As `Copy`, with every tag buffer registered on the queue's io_uring, so targets can
    /// use `READ_FIXED`/`WRITE_FIXED` (buffer index = tag) without pinning pages per request.
    Registered,
    /// Kernel zero-copy (`UBLK_F_AUTO_BUF_REG`): the kernel registers the request's own pages
    /// in the queue ring's buffer table at index = tag for the life of the request. The
    /// server never sees the bytes; targets pass them on with fixed-buffer operations.
    ZeroCopy,
    /// Kernel zero-copy the manual way (`UBLK_F_SUPPORT_ZERO_COPY`): the engine registers each
    /// request's pages at index = tag with `UBLK_U_IO_REGISTER_IO_BUF` before the target sees
    /// it and unregisters them before the commit. Same target contract as `ZeroCopy`; for
    /// kernels without `UBLK_F_AUTO_BUF_REG`, and as its reference point in benchmarks.
    ManualZeroCopy,
    /// User copy (`UBLK_F_USER_COPY`): the kernel copies nothing. The server moves bytes
    /// between the request's pages and its own memory with `pread`/`pwrite` on the ublk char
    /// device, so a target that keeps data in memory (RAM) copies once, straight into place.
    /// Targets that use [`crate::Io::data`] still work: the engine stages their bytes in the
    /// tag buffer.
    UserCopy,
}

impl BufferMode {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BufferMode::Copy => "copy",
            BufferMode::Registered => "registered",
            BufferMode::ZeroCopy => "zero-copy",
            BufferMode::ManualZeroCopy => "manual-zero-copy",
            BufferMode::UserCopy => "user-copy",
        }
    }

    /// Every mode, in the order the command line lists them.
    pub const ALL: [BufferMode; 5] = [
        BufferMode::Copy,
        BufferMode::Registered,
        BufferMode::ZeroCopy,
        BufferMode::ManualZeroCopy,
        BufferMode::UserCopy,
    ];

    /// The `UBLK_F_*` flag the device needs for this mode (0 for the copy modes).
    pub fn kernel_flag(self) -> u64 {
        match self {
            BufferMode::Copy | BufferMode::Registered => 0,
            BufferMode::ZeroCopy => crate::sys::UBLK_F_AUTO_BUF_REG,
            BufferMode::ManualZeroCopy => crate::sys::UBLK_F_SUPPORT_ZERO_COPY,
            BufferMode::UserCopy => crate::sys::UBLK_F_USER_COPY,
        }
    }

    /// The mode to serve in on a kernel reporting `features` (GET_FEATURES): `self` when the
    /// kernel has its flag, else the nearest mode it has. Auto and manual zero-copy fall back
    /// to each other, then to `Registered`; user copy falls back to `Copy`. Every mode gives
    /// the same data to the same target, so a fallback costs speed, never correctness.
    pub fn effective(self, features: u64) -> BufferMode {
        let has = |m: BufferMode| features & m.kernel_flag() == m.kernel_flag();
        let choices: &[BufferMode] = match self {
            BufferMode::ZeroCopy => &[BufferMode::ZeroCopy, BufferMode::ManualZeroCopy],
            BufferMode::ManualZeroCopy => &[BufferMode::ManualZeroCopy, BufferMode::ZeroCopy],
            other => &[other],
        };
        let fallback = if self == BufferMode::UserCopy {
            BufferMode::Copy
        } else if self.is_zero_copy() {
            BufferMode::Registered
        } else {
            self
        };
        choices
            .iter()
            .copied()
            .find(|&m| has(m))
            .unwrap_or(fallback)
    }

    /// Whether the kernel copies request data into the server's tag buffers.
    pub fn kernel_copies(self) -> bool {
        matches!(self, BufferMode::Copy | BufferMode::Registered)
    }

    /// Whether the server addresses request data through the ublk char device: user copy
    /// (`pread`/`pwrite`) and manual zero-copy (REGISTER/UNREGISTER_IO_BUF commands).
    pub fn uses_char_device(self) -> bool {
        matches!(self, BufferMode::UserCopy | BufferMode::ManualZeroCopy)
    }

    /// Whether request pages are lent to the queue's ring as fixed buffers (no copy at all).
    pub fn is_zero_copy(self) -> bool {
        matches!(self, BufferMode::ZeroCopy | BufferMode::ManualZeroCopy)
    }

    /// The mode a command-line name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A request's buffer as an io_uring fixed buffer: use `index` as `buf_index` and `addr` as
/// the address of `READ_FIXED`/`WRITE_FIXED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedBuf {
    /// Index in the queue ring's registered buffer table.
    pub index: u16,
    /// Start address to pass in the SQE (0 for kernel-registered request pages).
    pub addr: u64,
}

impl TagArena {
    /// One `iovec` per tag, for registering the arena with an io_uring.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.depth)
            .filter_map(|tag| self.buf_ptr(tag))
            .map(|p| libc::iovec {
                iov_base: p.cast(),
                iov_len: self.buf_len,
            })
            .collect()
    }
}

/// Memory a node owns for I/O of its own: page aligned (so `O_DIRECT` children accept it),
/// zero-filled when allocated, and `Send`, so it can travel to a worker thread and back.
///
/// A node lends it to a child as the buffer of a request it makes itself
/// ([`crate::QueueCtx::bounce_io`]): a mirror's read-repair or resync (a READ's kernel pages can
/// only be read into, never written out), a compressing target's blocks. The engine keeps it
/// alive until every operation using it has completed, then hands it back.
pub struct Bounce {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

/// Alignment of [`Bounce`] memory.
const BOUNCE_ALIGN: usize = 4096;

// SAFETY: a Bounce owns its allocation exclusively (like a Box<[u8]>); moving it between
// threads moves that ownership.
unsafe impl Send for Bounce {}
// SAFETY: `&Bounce` only permits reads (`as_slice`), like `&[u8]`.
unsafe impl Sync for Bounce {}

impl Bounce {
    /// `len` zeroed bytes (at least one page is allocated for `len` 0).
    pub fn new(len: usize) -> io::Result<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size (at least one alignment unit).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "bounce buffer"))?;
        Ok(Bounce { ptr, len })
    }

    fn layout(len: usize) -> io::Result<std::alloc::Layout> {
        let size = round_up(len.max(1), BOUNCE_ALIGN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bounce too large"))?;
        std::alloc::Layout::from_size_align(size, BOUNCE_ALIGN)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bounce too large"))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of at least len bytes owned by self, initialised
        // (zeroed at allocation); the borrow is tied to &self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; &mut self makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start of the memory, for the engine's views and operations.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        let layout = Self::layout(self.len).expect("the same layout was accepted at allocation");
        // SAFETY: ptr was allocated with exactly this layout in `new` and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl std::fmt::Debug for Bounce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounce").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod bounce_tests {
    use super::*;

    #[test]
    fn bounce_memory_is_aligned_zeroed_and_writable() {
        let mut b = Bounce::new(5000).expect("alloc");
        assert_eq!(b.as_ptr() as usize % BOUNCE_ALIGN, 0);
        assert!(b.as_slice().iter().all(|x| *x == 0));
        b.as_mut_slice()[4999] = 9;
        assert_eq!(b.as_slice()[4999], 9);
        assert_eq!(Bounce::new(0).expect("empty").len(), 0);
    }
}
