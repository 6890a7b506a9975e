//! The block-backend interface every target implements, and the request value it receives.
//!
//! A [`Target`] is shared by all queues; each queue thread opens its own [`QueueTarget`]. The
//! engine hands the queue target each request as an [`Io`]: a value that owns the request's
//! buffer until it is completed. Completing consumes it, so no borrow of the buffer can outlive
//! the request; dropping it unanswered fails the I/O with `-EIO` instead of hanging the device.
//!
//! An `Io` may be completed at once, kept and completed later on the same queue thread (after
//! the target's own asynchronous work), or turned into a [`RemoteIo`] and completed from any
//! thread. Because a target is just a value with `submit`, one target can own others as
//! children and build a stack (a mirror of stripes, compression over a mirror).

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_queue::SegQueue;

use crate::buf::{FixedBuf, TagArena};
use crate::io::{BlockIo, Geometry, IoFlags, Op};
use crate::mmap::Mapping;
use crate::sys;

/// A block backend: the device-wide half of a target.
pub trait Target: Send + Sync + 'static {
    /// Per-queue state, created and used only on that queue's thread.
    type Queue: QueueTarget;

    /// Opens the per-queue half for queue `q_id`; called on the queue's own thread (once per
    /// thread when a queue is served by several, see `DeviceBuilder::threads_per_queue`).
    fn open_queue(&self, q_id: u16, geo: &Geometry) -> io::Result<Self::Queue>;

    /// Whether the target reads or writes request bytes itself ([`Io::data`]). Targets that
    /// only pass buffers on (with [`Io::fixed_buf`]) or ignore data return false and may run
    /// in zero-copy mode.
    fn needs_data(&self) -> bool {
        true
    }

    /// Whether the target moves request bytes only with the copy methods of [`Io`]
    /// ([`Io::copy_data_to`], [`Io::copy_data_from`], their mapping variants and
    /// [`Io::zero_data`]) or not at all, never through [`Io::data`] or the buffer's address.
    /// In [`crate::BufferMode::UserCopy`] such a target gets one copy per request, straight
    /// between the request's pages and its own memory; any other target has its bytes staged
    /// in the tag buffer by the engine.
    fn copies_data(&self) -> bool {
        false
    }
}

/// The per-queue half of a target.
pub trait QueueTarget: 'static {
    /// Starts one request. Complete it now or later with [`Io::complete`] (or one of its
    /// shorthands); a panic here fails this request with `-EIO` and the queue keeps serving.
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>);

    /// An operation this target pushed with [`QueueCtx::push`] completed: `user_data` is the
    /// value it carried, `res` the CQE's result. Targets that never push ignore this.
    fn complete(&mut self, user_data: u64, res: i32, ctx: &mut QueueCtx<'_>) {
        let _ = (user_data, res, ctx);
    }
}

/// The bit the engine sets in `user_data` of target-pushed SQEs to route their CQEs back.
pub(crate) const TARGET_OP: u64 = 1 << 63;

/// Queues `sqe` on `ring`, submitting first if the submission queue is full.
///
/// # Safety
/// Every buffer and file the SQE refers to must stay valid until its completion arrives.
pub(crate) unsafe fn push_sqe(
    ring: &mut io_uring::IoUring,
    sqe: &io_uring::squeue::Entry,
) -> io::Result<()> {
    loop {
        // SAFETY: the caller guarantees the SQE's buffers outlive its completion.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Where request `tag` of queue `q_id` starts on the ublk char device in user-copy mode.
pub(crate) fn user_copy_offset(q_id: u16, tag: u16) -> u64 {
    sys::UBLKSRV_IO_BUF_OFFSET
        + (u64::from(q_id) << sys::UBLK_QID_OFF)
        + (u64::from(tag) << sys::UBLK_TAG_OFF)
}

/// Which way a user copy moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// From the request's pages to server memory (`pread`; a write's data).
    FromRequest,
    /// From server memory to the request's pages (`pwrite`; a read's data).
    ToRequest,
}

/// `pread`s or `pwrite`s exactly `len` bytes at `ptr` from or to `file` at `pos`.
///
/// # Safety
/// `ptr` must be valid for `len` bytes of reads (`ToRequest`) or writes (`FromRequest`) for
/// the duration of the call.
pub(crate) unsafe fn user_copy(
    file: &File,
    mut pos: u64,
    ptr: *mut u8,
    len: usize,
    to_request: bool,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let off = libc::off_t::try_from(pos)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        // SAFETY: done < len, so the rest lies inside the region the caller vouches for.
        let at = unsafe { ptr.add(done) };
        // SAFETY: as above; the kernel reads or writes at most `len - done` bytes there.
        let rc = unsafe {
            if to_request {
                libc::pwrite(file.as_raw_fd(), at.cast(), len - done, off)
            } else {
                libc::pread(file.as_raw_fd(), at.cast(), len - done, off)
            }
        };
        match rc {
            n if n > 0 => {
                done += n as usize;
                pos += n as u64;
            }
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the request's data ended early",
                ))
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Zeroes for zero-filling requests in user-copy mode: 64 KiB per `pwrite`, so a large
/// unwritten range takes few syscalls.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

/// What a queue target can see of its queue while it handles a request: its id, the device
/// geometry, and the queue's io_uring, on which the target may run its own I/O.
pub struct QueueCtx<'a> {
    pub(crate) q_id: u16,
    pub(crate) geo: &'a Geometry,
    pub(crate) ring: &'a mut io_uring::IoUring,
    pub(crate) files: &'a mut FileSlots,
}

/// The queue ring's table of registered files, created on first use.
#[derive(Debug, Default)]
pub(crate) struct FileSlots {
    /// Slots in the table: `None` until first use, 0 if the kernel refused a table.
    capacity: Option<u32>,
    next: u32,
}

/// Files a queue's ring can hold registered.
const FILE_SLOTS: u32 = 64;

impl std::fmt::Debug for QueueCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueCtx")
            .field("q_id", &self.q_id)
            .finish_non_exhaustive()
    }
}

impl QueueCtx<'_> {
    /// The queue's id.
    pub fn q_id(&self) -> u16 {
        self.q_id
    }

    /// The device's size and limits.
    pub fn geometry(&self) -> &Geometry {
        self.geo
    }

    /// Registers `file` in this queue ring's file table and returns its index: SQEs that
    /// name the file by that index (with `squeue::Flags::FIXED_FILE`, or `types::Fixed`)
    /// skip the per-operation file lookup and reference count. The ring keeps its own
    /// reference to the file until the queue ends. Fails when the table is full (64 files)
    /// or the kernel has none; use the plain descriptor then.
    pub fn register_file(&mut self, file: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
        let capacity = *self.files.capacity.get_or_insert_with(|| {
            match self.ring.submitter().register_files_sparse(FILE_SLOTS) {
                Ok(()) => FILE_SLOTS,
                Err(e) => {
                    tracing::debug!(q = self.q_id, "no file table on the queue ring: {e}");
                    0
                }
            }
        });
        let index = self.files.next;
        if index >= capacity {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "the queue ring's file table is full or missing",
            ));
        }
        self.ring
            .submitter()
            .register_files_update(index, &[file.as_raw_fd()])?;
        self.files.next += 1;
        Ok(index)
    }

    /// Queues `sqe` on this queue's io_uring; it is submitted with the loop turn's commits,
    /// and its completion comes back to [`QueueTarget::complete`] with the SQE's
    /// `user_data`, which must be below 2^63.
    ///
    /// # Safety
    /// Every buffer and file the SQE refers to must stay valid until its completion arrives,
    /// e.g. by keeping the [`Io`] whose buffer it reads into until then.
    pub unsafe fn push(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        let user_data = sqe.get_user_data();
        if user_data & TARGET_OP != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "user_data must be below 2^63",
            ));
        }
        let sqe = sqe.clone().user_data(user_data | TARGET_OP);
        // SAFETY: the caller guarantees the SQE's buffers outlive its completion.
        unsafe { push_sqe(self.ring, &sqe) }
    }
}

/// State of one queue shared with other threads: completions arriving from them, the wakeup
/// eventfd, the stop request, and the tag arena (kept alive while any request value exists).
#[derive(Debug)]
pub(crate) struct QueueShared {
    remote: SegQueue<(u16, i32)>,
    wake: OwnedFd,
    stop: AtomicBool,
    pub(crate) arena: TagArena,
    /// The ublk char device, in the modes that address request data through it (user copy,
    /// manual buffer registration); kept open while any request value exists.
    pub(crate) cdev: Option<Arc<File>>,
}

thread_local! {
    /// The queue this thread serves, so a completion made on it skips the eventfd.
    static CURRENT_QUEUE: Cell<*const QueueShared> = const { Cell::new(std::ptr::null()) };
}

impl QueueShared {
    pub(crate) fn new(arena: TagArena, cdev: Option<Arc<File>>) -> io::Result<Arc<Self>> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we now own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(QueueShared {
            remote: SegQueue::new(),
            // SAFETY: fd is a freshly created descriptor owned by nobody else.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            stop: AtomicBool::new(false),
            arena,
            cdev,
        }))
    }

    /// Marks the calling thread as this queue's thread.
    pub(crate) fn enter(self: &Arc<Self>) {
        CURRENT_QUEUE.with(|c| c.set(Arc::as_ptr(self)));
    }

    pub(crate) fn wake_fd(&self) -> &OwnedFd {
        &self.wake
    }

    /// Wakes the queue thread if it may be sleeping in `io_uring_enter`.
    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A full counter (EAGAIN)
        // already means "wake up", so the result needs no handling.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears the eventfd counter after a wakeup.
    pub(crate) fn clear_wake(&self) {
        let mut val: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; EAGAIN (nothing pending) is harmless.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut val as *mut u64).cast(), 8) };
    }

    /// Asks the queue thread to leave its loop.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn push_remote(&self, tag: u16, res: i32) {
        self.remote.push((tag, res));
        let here = CURRENT_QUEUE.with(Cell::get);
        if !std::ptr::eq(here, self) {
            self.wake();
        }
    }

    pub(crate) fn pop_remote(&self) -> Option<(u16, i32)> {
        self.remote.pop()
    }
}

/// Completions made on the queue thread itself, drained once per loop turn.
#[derive(Debug)]
pub(crate) struct LocalSink {
    done: RefCell<Vec<(u16, i32)>>,
    pub(crate) shared: Arc<QueueShared>,
}

impl LocalSink {
    pub(crate) fn new(shared: Arc<QueueShared>, depth: u16) -> Rc<Self> {
        Rc::new(LocalSink {
            done: RefCell::new(Vec::with_capacity(usize::from(depth))),
            shared,
        })
    }

    pub(crate) fn push(&self, tag: u16, res: i32) {
        self.done.borrow_mut().push((tag, res));
    }

    /// Moves every pending completion into `out`.
    pub(crate) fn take_into(&self, out: &mut Vec<(u16, i32)>) {
        out.append(&mut self.done.borrow_mut());
    }
}

/// The part of a request that does not depend on where it is completed.
#[derive(Debug, Clone, Copy)]
struct Inner {
    io: BlockIo,
    tag: u16,
    /// The tag buffer, or null when the server holds no copy of the data (zero-copy, and
    /// user copy for a target that copies the bytes itself).
    buf: *mut u8,
    fixed: Option<FixedBuf>,
    /// In user-copy mode: where the request's data starts on the ublk char device.
    user_copy: Option<u64>,
}

impl Inner {
    fn ok_result(&self) -> i32 {
        match self.io.op {
            // len <= max_io <= 32 MiB, checked when the descriptor was decoded.
            Op::Read | Op::Write => self.io.len as i32,
            _ => 0,
        }
    }

    fn data_len(&self) -> usize {
        if self.buf.is_null() {
            return 0;
        }
        match self.io.op {
            Op::Read | Op::Write => self.io.len as usize,
            _ => 0,
        }
    }

    /// # Safety
    /// The caller must own the request (see [`Io`]), so nothing else accesses the buffer.
    unsafe fn data<'a>(&self) -> &'a [u8] {
        if self.data_len() == 0 {
            return &[];
        }
        // SAFETY: buf points at this tag's arena buffer, at least max_io >= data_len bytes
        // (checked at decode); the arena outlives the request (the sink holds it); the caller
        // owns the request, so neither the kernel nor another thread touches the buffer.
        unsafe { std::slice::from_raw_parts(self.buf, self.data_len()) }
    }

    /// # Safety
    /// As for [`Inner::data`], and the returned borrow must be the only one.
    unsafe fn data_mut<'a>(&mut self) -> &'a mut [u8] {
        if self.data_len() == 0 {
            return &mut [];
        }
        // SAFETY: as in `data`; uniqueness is the caller's &mut borrow of the owning request.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.data_len()) }
    }

    /// Checks that bytes `[at, at + len)` of the request's data may move in direction `dir`:
    /// out of a write, or into a read.
    fn check_span(&self, at: usize, len: usize, dir: Dir) -> io::Result<()> {
        let op = match dir {
            Dir::FromRequest => Op::Write,
            Dir::ToRequest => Op::Read,
        };
        if self.io.op != op {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{dir:?} copies need a {op:?} request, this is {:?}",
                    self.io.op
                ),
            ));
        }
        match at.checked_add(len) {
            Some(end) if end <= self.io.len as usize => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bytes {at}..{at}+{len} lie outside the request's {} bytes",
                    self.io.len
                ),
            )),
        }
    }

    /// Moves `len` bytes between request offset `at` and `ptr` (`Some`), or writes `len`
    /// zeroes into the request (`None`, `ToRequest` only).
    ///
    /// # Safety
    /// The caller owns the request; `ptr`, if any, is valid for `len` bytes in the direction
    /// used and does not overlap the tag buffer.
    unsafe fn copy(
        &self,
        shared: &QueueShared,
        dir: Dir,
        at: usize,
        ptr: Option<*mut u8>,
        len: usize,
    ) -> io::Result<()> {
        self.check_span(at, len, dir)?;
        if !self.buf.is_null() {
            // SAFETY: at + len <= io.len <= the tag buffer's size (checked above and at
            // decode); the caller owns the request and vouches for `ptr`.
            unsafe {
                let here = self.buf.add(at);
                match (dir, ptr) {
                    (Dir::FromRequest, Some(p)) => std::ptr::copy_nonoverlapping(here, p, len),
                    (Dir::ToRequest, Some(p)) => std::ptr::copy_nonoverlapping(p, here, len),
                    (_, None) => std::ptr::write_bytes(here, 0, len),
                }
            }
            return Ok(());
        }
        let (Some(base), Some(cdev)) = (self.user_copy, shared.cdev.as_deref()) else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "zero-copy mode: the server holds no copy of the request's data",
            ));
        };
        let pos = base + at as u64;
        let to_request = dir == Dir::ToRequest;
        match ptr {
            // SAFETY: the caller vouches for ptr and len.
            Some(p) => unsafe { user_copy(cdev, pos, p, len, to_request) },
            None => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZEROES.len());
                    // SAFETY: ZEROES is n >= bytes of readable memory; a ToRequest copy only
                    // reads from it (the cast to *mut is never written through).
                    unsafe {
                        user_copy(cdev, pos + done as u64, ZEROES.as_ptr().cast_mut(), n, true)?
                    };
                    done += n;
                }
                Ok(())
            }
        }
    }
}

/// The data-moving methods shared by [`Io`] and [`RemoteIo`]: copies that work in every buffer
/// mode where the server can reach the bytes (not the zero-copy modes).
macro_rules! data_copies {
    ($shared:ident) => {
        /// Copies bytes `at..at + dst.len()` of a write request's data into `dst`. In
        /// user-copy mode this is the kernel's only copy of the data.
        pub fn copy_data_to(&self, at: usize, dst: &mut [u8]) -> io::Result<()> {
            // SAFETY: dst is a unique borrow of len bytes, apart from the tag buffer (which is
            // never lent out mutably while `self` is borrowed); self owns the request.
            unsafe {
                self.inner.copy(
                    self.$shared(),
                    Dir::FromRequest,
                    at,
                    Some(dst.as_mut_ptr()),
                    dst.len(),
                )
            }
        }

        /// Copies `src` into a read request's data at `at`.
        pub fn copy_data_from(&mut self, at: usize, src: &[u8]) -> io::Result<()> {
            // SAFETY: src is a live borrow of len bytes that is only read; self owns the
            // request uniquely (&mut self).
            unsafe {
                self.inner.copy(
                    self.$shared(),
                    Dir::ToRequest,
                    at,
                    Some(src.as_ptr().cast_mut()),
                    src.len(),
                )
            }
        }

        /// Fills `len` bytes of a read request's data with zeroes from `at`.
        pub fn zero_data(&mut self, at: usize, len: usize) -> io::Result<()> {
            // SAFETY: no pointer is passed; self owns the request uniquely.
            unsafe {
                self.inner
                    .copy(self.$shared(), Dir::ToRequest, at, None, len)
            }
        }

        /// Copies `len` bytes of a write request's data from `at` into `map` at `map_off`,
        /// without forming a reference to the mapping (which other queues may be using).
        pub fn copy_data_to_mapping(
            &self,
            at: usize,
            map: &Mapping,
            map_off: u64,
            len: usize,
        ) -> io::Result<()> {
            let dst = map_range(map, map_off, len)?;
            // SAFETY: dst is `len` bytes inside the live mapping (bounds-checked), which is
            // not the tag buffer; self owns the request.
            unsafe {
                self.inner
                    .copy(self.$shared(), Dir::FromRequest, at, Some(dst), len)
            }
        }

        /// Copies `len` bytes of `map` at `map_off` into a read request's data at `at`.
        pub fn copy_data_from_mapping(
            &mut self,
            at: usize,
            map: &Mapping,
            map_off: u64,
            len: usize,
        ) -> io::Result<()> {
            let src = map_range(map, map_off, len)?;
            // SAFETY: src is `len` bytes inside the live mapping (bounds-checked), only read;
            // self owns the request uniquely.
            unsafe {
                self.inner
                    .copy(self.$shared(), Dir::ToRequest, at, Some(src), len)
            }
        }
    };
}

/// `len` bytes of `map` from `off`, or an error naming the range.
fn map_range(map: &Mapping, off: u64, len: usize) -> io::Result<*mut u8> {
    map.range(off, len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bytes {off}..{off}+{len} lie outside the mapping"),
        )
    })
}

/// One request, owned by the target until it is completed.
///
/// For a write, [`Io::data`] holds the bytes to store; for a read, fill [`Io::data_mut`] and
/// complete. The buffer is borrowed from the `Io`, so it cannot outlive the completion.
#[must_use = "a request must be completed; dropping it fails the I/O with -EIO"]
#[derive(Debug)]
pub struct Io {
    inner: Inner,
    sink: Rc<LocalSink>,
    done: bool,
}

impl Io {
    /// # Safety
    /// `buf` must be null or point at `tag`'s buffer in `sink`'s arena, at least `io.len` bytes
    /// long for reads and writes, and the request must be the only user of that buffer (and
    /// of `fixed`, and of its user-copy range) until completed.
    pub(crate) unsafe fn new(
        io: BlockIo,
        tag: u16,
        buf: *mut u8,
        fixed: Option<FixedBuf>,
        user_copy: Option<u64>,
        sink: Rc<LocalSink>,
    ) -> Self {
        Io {
            inner: Inner {
                io,
                tag,
                buf,
                fixed,
                user_copy,
            },
            sink,
            done: false,
        }
    }

    /// The request: op, byte offset, length and flags.
    pub fn block_io(&self) -> BlockIo {
        self.inner.io
    }

    /// The operation.
    pub fn op(&self) -> Op {
        self.inner.io.op
    }

    /// Byte offset on the device.
    pub fn offset(&self) -> u64 {
        self.inner.io.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> u32 {
        self.inner.io.len
    }

    /// True for a zero-length request (a flush).
    pub fn is_empty(&self) -> bool {
        self.inner.io.len == 0
    }

    /// The request's flags.
    pub fn flags(&self) -> IoFlags {
        self.inner.io.flags
    }

    /// The tag the kernel gave this request on its queue.
    pub fn tag(&self) -> u16 {
        self.inner.tag
    }

    /// The request's buffer as an io_uring fixed buffer of the queue's ring, in the
    /// `Registered` and `ZeroCopy` buffer modes (see [`crate::buf::BufferMode`]).
    pub fn fixed_buf(&self) -> Option<FixedBuf> {
        self.inner.fixed
    }

    /// The request's data: the bytes to write, or the read buffer. Empty for other ops, in
    /// the zero-copy modes, where the server holds no copy of the data, and in user-copy mode
    /// for a target whose [`Target::copies_data`] is true (use the copy methods instead).
    pub fn data(&self) -> &[u8] {
        // SAFETY: self owns the request (not yet completed); the borrow is tied to &self.
        unsafe { self.inner.data() }
    }

    fn shared(&self) -> &QueueShared {
        &self.sink.shared
    }

    data_copies!(shared);

    /// The request's buffer, mutably: fill it for a read. Empty for ops without data.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: self owns the request; the borrow is tied to the unique &mut self.
        unsafe { self.inner.data_mut() }
    }

    /// Completes with `res`: bytes done (reads and writes) or 0, or a negative errno.
    pub fn complete(mut self, res: i32) {
        self.done = true;
        self.sink.push(self.inner.tag, res);
    }

    /// Completes successfully: the full length for reads and writes, 0 otherwise.
    pub fn complete_ok(self) {
        let res = self.inner.ok_result();
        self.complete(res);
    }

    /// Fails with the positive `errno` (`libc::EIO`, ...).
    pub fn fail(self, errno: i32) {
        self.complete(-errno.abs());
    }

    /// Turns this request into one that can be completed from any thread.
    pub fn into_remote(mut self) -> RemoteIo {
        self.done = true;
        RemoteIo {
            inner: self.inner,
            shared: Arc::clone(&self.sink.shared),
            done: false,
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(
                tag = self.inner.tag,
                "request dropped without completion: -EIO"
            );
            self.sink.push(self.inner.tag, -libc::EIO);
        }
    }
}

/// A request that can be completed from any thread; the queue thread is woken to commit it.
#[must_use = "a request must be completed; dropping it fails the I/O with -EIO"]
#[derive(Debug)]
pub struct RemoteIo {
    inner: Inner,
    shared: Arc<QueueShared>,
    done: bool,
}

// SAFETY: the raw buffer pointer is the only non-Send field; the buffer belongs to this request
// alone until it is completed (whichever thread holds the value), and the arena it points into
// is kept alive by `shared`.
unsafe impl Send for RemoteIo {}

impl RemoteIo {
    /// The request: op, byte offset, length and flags.
    pub fn block_io(&self) -> BlockIo {
        self.inner.io
    }

    /// The request's data: the bytes to write, or the read buffer (see [`Io::data`]).
    pub fn data(&self) -> &[u8] {
        // SAFETY: self owns the request; the borrow is tied to &self.
        unsafe { self.inner.data() }
    }

    fn shared(&self) -> &QueueShared {
        &self.shared
    }

    data_copies!(shared);

    /// The request's buffer, mutably.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: self owns the request; the borrow is tied to the unique &mut self.
        unsafe { self.inner.data_mut() }
    }

    /// Completes with `res`: bytes done or 0, or a negative errno.
    pub fn complete(mut self, res: i32) {
        self.done = true;
        self.shared.push_remote(self.inner.tag, res);
    }

    /// Completes successfully: the full length for reads and writes, 0 otherwise.
    pub fn complete_ok(self) {
        let res = self.inner.ok_result();
        self.complete(res);
    }

    /// Fails with the positive `errno`.
    pub fn fail(self, errno: i32) {
        self.complete(-errno.abs());
    }
}

impl Drop for RemoteIo {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(
                tag = self.inner.tag,
                "request dropped without completion: -EIO"
            );
            self.shared.push_remote(self.inner.tag, -libc::EIO);
        }
    }
}
