//! Requests as targets hold them: [`Io`] (a kernel request or a sub-request), [`SubIo`] (a
//! request a node made and has not sent yet) and [`RemoteIo`] (an `Io` completed from another
//! thread), with the bookkeeping that keeps their buffers alive.
//!
//! # Ownership of the bytes
//! Every `Io` has an *origin*: the kernel tag whose buffer (or registered pages, or user-copy
//! range) it views, or a [`Bounce`] buffer a node lent. An origin counts the `Io`s viewing it;
//! the kernel request is committed — and its buffer given back to the kernel — only when its
//! own `Io` has completed *and* no sub-request of it is left, so no view can outlive the
//! request that owns the memory, whatever order a target completes things in.
//!
//! Aliasing is ruled out by construction: a write's bytes are only ever read (any number of
//! sub-requests may share them, a mirror's legs do); a read's bytes are written through one
//! `Io` at a time — an `Io` that has been split into sub-requests loses access to its bytes,
//! and the sub-requests of one read never overlap (each starts at or after the end of the
//! previous one).

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::SegQueue;
use nix::sys::eventfd::{EfdFlags, EventFd};
use slab::Slab;

use crate::buf::{Bounce, FixedBuf, TagArena};
use crate::io::{BlockIo, Op};
use crate::mmap::Mapping;
use crate::sys;

/// A node of a queue's target tree: its index in the queue's node table (0 is the root).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NodeId(pub(crate) u32);

impl NodeId {
    /// The index in the node table: nodes are numbered in the order they are opened, the
    /// root first, each node before its children (pre-order).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where a request's bytes are, for the buffer mode in effect. Offsets and lengths are
/// relative to the request; a sub-request's view is a slice of its parent's. Kept small (24
/// bytes): it travels with every request and completion.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    /// The bytes in server memory (tag buffer or bounce), or null when the server holds no
    /// copy (zero-copy; user copy for a target that copies the bytes itself).
    pub(crate) buf: *mut u8,
    /// With [`VIEW_FIXED`]: the fixed buffer's address; with [`VIEW_USER_COPY`]: where the
    /// bytes start on the ublk char device.
    pos: u64,
    /// With [`VIEW_FIXED`]: the fixed buffer's index in the ring's table.
    index: u16,
    kind: u8,
    /// Bytes viewed: the length of a read or write, 0 for other ops.
    pub(crate) len: u32,
}

const VIEW_PLAIN: u8 = 0;
const VIEW_FIXED: u8 = 1;
const VIEW_USER_COPY: u8 = 2;

impl View {
    pub(crate) const NONE: View = View {
        buf: std::ptr::null_mut(),
        pos: 0,
        index: 0,
        kind: VIEW_PLAIN,
        len: 0,
    };

    /// A view of `len` bytes: at `buf` in server memory (or null), and also as a fixed
    /// buffer of the ring or as a user-copy range (never both: the modes exclude it).
    pub(crate) fn new(
        buf: *mut u8,
        fixed: Option<FixedBuf>,
        user_copy: Option<u64>,
        len: u32,
    ) -> View {
        let (kind, pos, index) = match (fixed, user_copy) {
            (Some(f), _) => (VIEW_FIXED, f.addr, f.index),
            (None, Some(at)) => (VIEW_USER_COPY, at, 0),
            (None, None) => (VIEW_PLAIN, 0, 0),
        };
        View {
            buf,
            pos,
            index,
            kind,
            len,
        }
    }

    /// The bytes as a fixed buffer of the queue ring.
    pub(crate) fn fixed(&self) -> Option<FixedBuf> {
        (self.kind == VIEW_FIXED).then_some(FixedBuf {
            index: self.index,
            addr: self.pos,
        })
    }

    /// User copy: where the bytes start on the ublk char device.
    pub(crate) fn user_copy(&self) -> Option<u64> {
        (self.kind == VIEW_USER_COPY).then_some(self.pos)
    }

    /// Bytes `[at, at + len)` of this view; the caller checked the range.
    fn slice(&self, at: u32, len: u32) -> View {
        View {
            // The caller checked at + len <= self.len, so the pointer stays inside the viewed
            // memory; wrapping_add keeps a null pointer null-based without UB.
            buf: if self.buf.is_null() {
                self.buf
            } else {
                self.buf.wrapping_add(at as usize)
            },
            pos: if self.kind == VIEW_PLAIN {
                0
            } else {
                self.pos + u64::from(at)
            },
            index: self.index,
            kind: self.kind,
            len,
        }
    }
}

/// What a request's memory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A kernel request's tag.
    Tag(u16),
    /// A bounce buffer held by the queue, by key.
    Bounce(u32),
}

/// Where a request's result goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    /// The kernel: commit the tag.
    Kernel(u16),
    /// An engine-run join (the default rule), by key.
    Join(u32),
    /// The node that sent it, with the token it chose.
    Node { node: NodeId, token: u64 },
    /// Nobody waits (a sub-request never sent, or one handed back for a retry).
    Detached,
}

/// A request's completion on its way to the engine.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) req: BlockIo,
    pub(crate) view: View,
    pub(crate) origin: Origin,
    pub(crate) dest: Dest,
    /// The node that completed it (for per-node error counts).
    pub(crate) node: NodeId,
    /// Whether this is the origin's own request (the kernel's, or the bounce's).
    pub(crate) root: bool,
    /// When `node` received it, on the engine's clock (for its latency histogram).
    pub(crate) started: u64,
    pub(crate) res: i32,
}

// SAFETY: the only non-Send field is the view's raw pointer, into memory kept alive by the
// origin's count (tag arena or bounce slot) that the engine releases only on the queue thread.
unsafe impl Send for Done {}

impl Done {
    /// The result a complete success has: the length for reads and writes, else 0.
    pub(crate) fn ok_len(&self) -> i32 {
        ok_result(&self.req)
    }
}

pub(crate) fn ok_result(req: &BlockIo) -> i32 {
    match req.op {
        // len <= max_io <= 32 MiB (decode), and sub-requests are shorter.
        Op::Read | Op::Write => req.len as i32,
        _ => 0,
    }
}

/// Where request `tag` of queue `q_id` starts on the ublk char device in user-copy mode.
pub(crate) fn user_copy_offset(q_id: u16, tag: u16) -> u64 {
    sys::UBLKSRV_IO_BUF_OFFSET
        + (u64::from(q_id) << sys::UBLK_QID_OFF)
        + (u64::from(tag) << sys::UBLK_TAG_OFF)
}

/// `pread`s or `pwrite`s exactly `len` bytes at `ptr` from or to `file` at `pos`.
///
/// # Safety
/// `ptr` must be valid for `len` bytes of reads (`to_request`) or writes (otherwise) for the
/// duration of the call.
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

/// Zeroes for zero-filling requests in user-copy mode: 64 KiB per `pwrite`.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

/// State of one queue shared with other threads: completions arriving from them, the wakeup
/// eventfd, the stop request, and the tag arena (kept alive while any request value exists).
#[derive(Debug)]
pub(crate) struct QueueShared {
    remote: SegQueue<Done>,
    /// Notifications for nodes from other threads: `(node, token, result)`.
    notices: SegQueue<(NodeId, u64, i32)>,
    wake: EventFd,
    stop: AtomicBool,
    pub(crate) arena: TagArena,
    /// The ublk char device, in the modes that address request data through it (user copy,
    /// manual buffer registration); kept open while any request value exists.
    pub(crate) cdev: Option<Arc<File>>,
    /// The device's size in bytes, which requests are checked against; changed while the
    /// device runs by [`crate::SizeHandle::resize`].
    pub(crate) size: AtomicU64,
}

thread_local! {
    /// The queue this thread serves, so a completion made on it skips the eventfd.
    static CURRENT_QUEUE: Cell<*const QueueShared> = const { Cell::new(std::ptr::null()) };
}

impl QueueShared {
    pub(crate) fn new(
        arena: TagArena,
        cdev: Option<Arc<File>>,
        size: u64,
    ) -> io::Result<Arc<Self>> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Arc::new(QueueShared {
            remote: SegQueue::new(),
            notices: SegQueue::new(),
            wake,
            stop: AtomicBool::new(false),
            arena,
            cdev,
            size: AtomicU64::new(size),
        }))
    }

    /// Marks the calling thread as this queue's thread.
    pub(crate) fn enter(self: &Arc<Self>) {
        CURRENT_QUEUE.with(|c| c.set(Arc::as_ptr(self)));
    }

    pub(crate) fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Wakes the queue thread if it may be sleeping in `io_uring_enter`.
    pub(crate) fn wake(&self) {
        // A full counter (EAGAIN) already means "wake up", so the result needs no handling.
        let _ = self.wake.write(1);
    }

    /// Clears the eventfd counter after a wakeup.
    pub(crate) fn clear_wake(&self) {
        // Nonblocking: EAGAIN (nothing pending) is harmless.
        let _ = self.wake.read();
    }

    /// Asks the queue thread to leave its loop.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn push_remote(&self, done: Done) {
        self.remote.push(done);
        let here = CURRENT_QUEUE.with(Cell::get);
        if !std::ptr::eq(here, self) {
            self.wake();
        }
    }

    pub(crate) fn pop_remote(&self) -> Option<Done> {
        self.remote.pop()
    }

    pub(crate) fn pop_notice(&self) -> Option<(NodeId, u64, i32)> {
        self.notices.pop()
    }
}

/// A handle another thread uses to tell a node that something it waits for is ready (a
/// compression worker's result, say): [`Notifier::notify`] wakes the queue thread, which
/// delivers a [`crate::Completion`] with the token and result to the node. Payloads travel
/// in the node's own channel; this only rings the bell. Get one with
/// [`crate::QueueCtx::notifier`].
#[derive(Debug, Clone)]
pub struct Notifier {
    shared: Arc<QueueShared>,
    node: NodeId,
}

impl Notifier {
    pub(crate) fn new(shared: Arc<QueueShared>, node: NodeId) -> Self {
        Notifier { shared, node }
    }

    /// Delivers `Completion { token, result, .. }` to the node on its queue thread.
    pub fn notify(&self, token: u64, result: i32) {
        self.shared.notices.push((self.node, token, result));
        let here = CURRENT_QUEUE.with(Cell::get);
        if !std::ptr::eq(here, Arc::as_ptr(&self.shared)) {
            self.shared.wake();
        }
    }
}

/// A bounce buffer lent to requests, and how many of them still view it.
#[derive(Debug)]
pub(crate) struct BounceSlot {
    pub(crate) mem: Bounce,
    pub(crate) refs: u32,
    /// The completion of the bounce's own request, held until no view is left.
    pub(crate) pending: Option<Done>,
}

/// The queue-thread side of request bookkeeping, shared by every `Io` of the queue: where
/// completions made on the queue thread wait for the engine, and the origins' view counts.
#[derive(Debug)]
pub(crate) struct LocalSink {
    done: RefCell<Vec<Done>>,
    /// Per tag: the requests viewing its buffer (the kernel's own included).
    tag_refs: Vec<Cell<u32>>,
    pub(crate) bounces: RefCell<Slab<BounceSlot>>,
    pub(crate) shared: Arc<QueueShared>,
}

impl LocalSink {
    pub(crate) fn new(shared: Arc<QueueShared>, depth: u16) -> Rc<Self> {
        Rc::new(LocalSink {
            done: RefCell::new(Vec::with_capacity(usize::from(depth))),
            tag_refs: (0..depth).map(|_| Cell::new(0)).collect(),
            bounces: RefCell::new(Slab::new()),
            shared,
        })
    }

    pub(crate) fn push(&self, done: Done) {
        self.done.borrow_mut().push(done);
    }

    /// Moves every pending completion into `out`.
    pub(crate) fn take_into(&self, out: &mut Vec<Done>) {
        out.append(&mut self.done.borrow_mut());
    }

    /// One more request views `origin`.
    pub(crate) fn retain(&self, origin: Origin) {
        match origin {
            Origin::Tag(tag) => {
                if let Some(c) = self.tag_refs.get(usize::from(tag)) {
                    c.set(c.get() + 1);
                }
            }
            Origin::Bounce(key) => {
                if let Some(slot) = self.bounces.borrow_mut().get_mut(key as usize) {
                    slot.refs += 1;
                }
            }
        }
    }

    /// One request fewer views `tag`; true when none is left.
    pub(crate) fn release_tag(&self, tag: u16) -> bool {
        match self.tag_refs.get(usize::from(tag)) {
            Some(c) => {
                let n = c.get().saturating_sub(1);
                c.set(n);
                n == 0
            }
            None => false,
        }
    }
}

/// Which way a copy moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// From the request to server memory (a write's data).
    FromRequest,
    /// From server memory into the request (a read's data).
    ToRequest,
}

/// The part of a request that does not depend on where it is completed.
#[derive(Debug)]
struct Inner {
    req: BlockIo,
    view: View,
    origin: Origin,
    dest: Dest,
    node: NodeId,
    root: bool,
    /// When `node` received it, on the engine's clock.
    started: u64,
    /// For a read that has been split: where its next sub-request may start. `None` while
    /// unsplit; once split, the request's own bytes are no longer reachable through it.
    read_cursor: Cell<Option<u32>>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Inner {
    fn done(&self, res: i32) -> Done {
        Done {
            req: self.req,
            view: self.view,
            origin: self.origin,
            dest: self.dest,
            node: self.node,
            root: self.root,
            started: self.started,
            res,
        }
    }

    /// The request's bytes in server memory, if this request may reach them in `dir`.
    fn server_bytes(&self, dir: Dir) -> io::Result<Option<*mut u8>> {
        let op = match dir {
            Dir::FromRequest => Op::Write,
            Dir::ToRequest => Op::Read,
        };
        if self.req.op != op {
            return Err(invalid(format!(
                "{dir:?} needs a {op:?} request, this is {:?}",
                self.req.op
            )));
        }
        if self.read_cursor.get().is_some() {
            return Err(invalid(
                "this read was split into sub-requests: its bytes belong to them".into(),
            ));
        }
        Ok((!self.view.buf.is_null()).then_some(self.view.buf))
    }

    /// The data as a slice, for a write (`FromRequest`) or a read (`ToRequest`).
    fn data_ptr(&self, dir: Dir) -> io::Result<*mut u8> {
        match self.server_bytes(dir)? {
            Some(p) => Ok(p),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the server holds no copy of this request's data in this buffer mode \
                 (zero-copy, or user copy for a target whose copies_data() is true): \
                 use fixed-buffer operations or the copy methods",
            )),
        }
    }

    fn check_span(&self, at: usize, len: usize) -> io::Result<()> {
        match at.checked_add(len) {
            Some(end) if end <= self.view.len as usize => Ok(()),
            _ => Err(invalid(format!(
                "bytes {at}..{at}+{len} lie outside the request's {} bytes",
                self.view.len
            ))),
        }
    }

    /// Moves `len` bytes between request offset `at` and `ptr` (`Some`), or writes `len`
    /// zeroes into the request (`None`, `ToRequest` only).
    ///
    /// # Safety
    /// The caller owns the request; `ptr`, if any, is valid for `len` bytes in the direction
    /// used and does not overlap the request's own bytes.
    unsafe fn copy(
        &self,
        shared: &QueueShared,
        dir: Dir,
        at: usize,
        ptr: Option<*mut u8>,
        len: usize,
    ) -> io::Result<()> {
        let here = self.server_bytes(dir)?;
        self.check_span(at, len)?;
        if let Some(buf) = here {
            // SAFETY: at + len <= view.len (checked above), and the view lies inside memory
            // its origin keeps alive; the caller owns the request and vouches for `ptr`.
            unsafe {
                let here = buf.add(at);
                match (dir, ptr) {
                    (Dir::FromRequest, Some(p)) => std::ptr::copy_nonoverlapping(here, p, len),
                    (Dir::ToRequest, Some(p)) => std::ptr::copy_nonoverlapping(p, here, len),
                    (_, None) => std::ptr::write_bytes(here, 0, len),
                }
            }
            return Ok(());
        }
        let (Some(base), Some(cdev)) = (self.view.user_copy(), shared.cdev.as_deref()) else {
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

/// The data-moving methods shared by [`Io`] and [`RemoteIo`].
macro_rules! data_access {
    ($shared:ident) => {
        /// Completes successfully: the full length for reads and writes, 0 otherwise.
        pub fn complete_ok(self) {
            let res = ok_result(&self.inner.req);
            self.complete(res);
        }

        /// Fails with the positive `errno` (`libc::EIO`, ...).
        pub fn fail(self, errno: i32) {
            self.complete(-errno.abs());
        }

        /// A write's bytes. An error — never an empty slice — when the server holds no copy
        /// of them (zero-copy modes; user copy for a target whose
        /// [`crate::Target::copies_data`] is true) or for another op.
        pub fn data(&self) -> io::Result<&[u8]> {
            let p = self.inner.data_ptr(Dir::FromRequest)?;
            // SAFETY: p views view.len bytes kept alive by the request's origin; a write's
            // bytes are only ever read, so shared borrows may coexist; the borrow is tied to
            // &self, which owns the request.
            Ok(unsafe { std::slice::from_raw_parts(p, self.inner.view.len as usize) })
        }

        /// A read's buffer, to fill. An error when the server holds no copy of the bytes
        /// (as for [`Self::data`]), for another op, or once this read was split into
        /// sub-requests.
        pub fn data_mut(&mut self) -> io::Result<&mut [u8]> {
            let p = self.inner.data_ptr(Dir::ToRequest)?;
            // SAFETY: p views view.len bytes kept alive by the origin; a read's bytes are
            // reachable through this request alone (sub-requests of a read never overlap,
            // and a split read loses access), and &mut self makes the borrow unique.
            Ok(unsafe { std::slice::from_raw_parts_mut(p, self.inner.view.len as usize) })
        }

        /// Copies bytes `at..at + dst.len()` of a write request's data into `dst`. In
        /// user-copy mode this is the kernel's only copy of the data.
        pub fn copy_data_to(&self, at: usize, dst: &mut [u8]) -> io::Result<()> {
            // SAFETY: dst is a unique borrow of len bytes, apart from the request's bytes
            // (never lent mutably for a write); self owns the request.
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
            let dst = map_range(map, map_off, len, true)?;
            // SAFETY: dst is `len` writable bytes inside the live mapping (bounds-checked),
            // which is not the request's memory; self owns the request.
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
            let src = map_range(map, map_off, len, false)?;
            // SAFETY: src is `len` bytes inside the live mapping (bounds-checked), only read;
            // self owns the request uniquely.
            unsafe {
                self.inner
                    .copy(self.$shared(), Dir::ToRequest, at, Some(src), len)
            }
        }

        /// The request: op, byte offset (on the device, or on the child for a
        /// sub-request), length and flags.
        pub fn block_io(&self) -> BlockIo {
            self.inner.req
        }

        /// The operation.
        pub fn op(&self) -> Op {
            self.inner.req.op
        }

        /// Byte offset on the device this request is addressed to.
        pub fn offset(&self) -> u64 {
            self.inner.req.offset
        }

        /// Length in bytes.
        pub fn len(&self) -> u32 {
            self.inner.req.len
        }

        /// True for a zero-length request (a flush).
        pub fn is_empty(&self) -> bool {
            self.inner.req.len == 0
        }

        /// The request's flags.
        pub fn flags(&self) -> crate::io::IoFlags {
            self.inner.req.flags
        }

        /// The request's bytes as an io_uring fixed buffer of the queue's ring, in the
        /// registered and zero-copy buffer modes. Most targets use the operations of
        /// [`crate::QueueCtx`] instead, which pick the right form themselves.
        pub fn fixed_buf(&self) -> Option<FixedBuf> {
            self.inner.view.fixed()
        }

        /// Whether the server can reach the bytes (with [`Self::data`], [`Self::data_mut`]
        /// or the copy methods) rather than only pass them on.
        pub fn has_server_bytes(&self) -> bool {
            !self.inner.view.buf.is_null() || self.inner.view.user_copy().is_some()
        }
    };
}

/// `len` bytes of `map` from `off`, or an error naming the range.
fn map_range(map: &Mapping, off: u64, len: usize, write: bool) -> io::Result<*mut u8> {
    let range = if write {
        map.range_mut(off, len)
    } else {
        map.range(off, len)
    };
    range.ok_or_else(|| {
        invalid(format!(
            "bytes {off}..{off}+{len} lie outside the mapping{}",
            if write { " or it is read-only" } else { "" }
        ))
    })
}

/// One request, owned by the node serving it until it is completed: a kernel request, or a
/// sub-request another node made of part of one.
///
/// For a write, [`Io::data`] holds the bytes to store; for a read, fill [`Io::data_mut`] and
/// complete. The buffer is borrowed from the `Io`, so it cannot outlive the completion.
/// Dropping an `Io` unanswered fails it with `-EIO`.
#[must_use = "a request must be completed; dropping it fails the I/O with -EIO"]
#[derive(Debug)]
pub struct Io {
    inner: Inner,
    sink: Rc<LocalSink>,
    done: bool,
}

impl Io {
    /// A kernel request on `tag`, counted as one view of the tag.
    ///
    /// # Safety
    /// `view` must describe `tag`'s buffer in `sink`'s arena (at least `req.len` bytes for
    /// reads and writes) or its fixed-buffer slot or user-copy range, and no other request
    /// may use them until this one and every sub-request of it completed (the engine commits
    /// the tag only then).
    pub(crate) unsafe fn kernel(req: BlockIo, tag: u16, view: View, sink: Rc<LocalSink>) -> Self {
        sink.retain(Origin::Tag(tag));
        Io {
            inner: Inner {
                req,
                view,
                origin: Origin::Tag(tag),
                dest: Dest::Kernel(tag),
                node: NodeId(0),
                root: true,
                started: 0,
                read_cursor: Cell::new(None),
            },
            sink,
            done: false,
        }
    }

    /// A request over bounce buffer `key` (already counted once for this request).
    pub(crate) fn bounce(req: BlockIo, key: u32, view: View, sink: Rc<LocalSink>) -> Self {
        Io {
            inner: Inner {
                req,
                view,
                origin: Origin::Bounce(key),
                dest: Dest::Detached,
                node: NodeId(0),
                root: true,
                started: 0,
                read_cursor: Cell::new(None),
            },
            sink,
            done: false,
        }
    }

    /// Rebuilds a failed sub-request from its completion, detached, for a retry.
    pub(crate) fn reissue(done: &Done, sink: Rc<LocalSink>) -> Self {
        sink.retain(done.origin);
        Io {
            inner: Inner {
                req: done.req,
                view: done.view,
                origin: done.origin,
                dest: Dest::Detached,
                node: done.node,
                root: false,
                started: 0,
                read_cursor: Cell::new(None),
            },
            sink,
            done: false,
        }
    }

    data_access!(shared);

    fn shared(&self) -> &QueueShared {
        &self.sink.shared
    }

    pub(crate) fn set_dest(&mut self, dest: Dest) {
        self.inner.dest = dest;
    }

    pub(crate) fn set_node(&mut self, node: NodeId) {
        self.inner.node = node;
    }

    /// Records when the request's node received it, on the engine's clock.
    pub(crate) fn set_started(&mut self, now: u64) {
        self.inner.started = now;
    }

    pub(crate) fn view(&self) -> View {
        self.inner.view
    }

    /// The request that serves bytes `[at, at + len)` of this one at byte `offset` of a
    /// child: a view of the same memory (tag buffer range, fixed buffer plus offset, or
    /// user-copy range; nothing is copied). Send it with [`crate::QueueCtx::send`], or let
    /// [`crate::QueueCtx::fan_out`] make and join them.
    ///
    /// Bounds are checked: `[at, at + len)` must lie inside this request (a flush's only
    /// sub-request is `(0, 0)`). Sub-requests of a read must not overlap: each starts at or
    /// after the end of the previous one, and the read itself can no longer reach its bytes.
    pub fn sub(&self, at: u32, len: u32, offset: u64) -> io::Result<SubIo> {
        let req = &self.inner.req;
        let end = at
            .checked_add(len)
            .ok_or_else(|| invalid("sub-request range overflows".into()))?;
        if end > req.len || (req.op == Op::Flush && (at, len) != (0, 0)) {
            return Err(invalid(format!(
                "sub-request {at}..{end} lies outside the {}-byte {:?} request",
                req.len, req.op
            )));
        }
        offset
            .checked_add(u64::from(len))
            .ok_or_else(|| invalid("sub-request offset overflows".into()))?;
        if req.op == Op::Read {
            let cursor = self.inner.read_cursor.get().unwrap_or(0);
            if at < cursor {
                return Err(invalid(format!(
                    "sub-requests of a read must not overlap: {at} is before {cursor}"
                )));
            }
            self.inner.read_cursor.set(Some(end));
        }
        let view = if matches!(req.op, Op::Read | Op::Write) {
            self.inner.view.slice(at, len)
        } else {
            View::NONE
        };
        self.sink.retain(self.inner.origin);
        Ok(SubIo(Io {
            inner: Inner {
                req: BlockIo {
                    op: req.op,
                    offset,
                    len,
                    flags: req.flags,
                },
                view,
                origin: self.inner.origin,
                dest: Dest::Detached,
                node: self.inner.node,
                root: false,
                started: 0,
                read_cursor: Cell::new(None),
            },
            sink: Rc::clone(&self.sink),
            done: false,
        }))
    }

    /// Readdresses this request to byte `offset` (a partition or a concatenation shifting it
    /// onto a child before [`crate::QueueCtx::forward`]).
    pub fn set_offset(&mut self, offset: u64) -> io::Result<()> {
        offset
            .checked_add(u64::from(self.inner.req.len))
            .ok_or_else(|| invalid("offset overflows".into()))?;
        self.inner.req.offset = offset;
        Ok(())
    }

    /// Completes with `res`: bytes done (reads and writes) or 0, or a negative errno.
    pub fn complete(mut self, res: i32) {
        self.done = true;
        self.sink.push(self.inner.done(res));
    }

    /// Turns this request into one that can be completed from any thread.
    pub fn into_remote(mut self) -> RemoteIo {
        self.done = true;
        let inner = Inner {
            req: self.inner.req,
            view: self.inner.view,
            origin: self.inner.origin,
            dest: self.inner.dest,
            node: self.inner.node,
            root: self.inner.root,
            started: self.inner.started,
            read_cursor: Cell::new(self.inner.read_cursor.get()),
        };
        RemoteIo {
            inner,
            shared: Arc::clone(&self.sink.shared),
            done: false,
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if !self.done {
            if self.inner.dest != Dest::Detached {
                tracing::warn!(
                    op = ?self.inner.req.op,
                    offset = self.inner.req.offset,
                    "request dropped without completion: -EIO"
                );
            }
            self.sink.push(self.inner.done(-libc::EIO));
        }
    }
}

/// A request a node made — a sub-request of one it holds ([`Io::sub`]) or one over its own
/// bounce buffer ([`crate::QueueCtx::bounce_io`]) — not yet sent to a child. Dropping it
/// unsent is harmless.
#[must_use = "send it to a child with QueueCtx::send"]
#[derive(Debug)]
pub struct SubIo(pub(crate) Io);

impl SubIo {
    /// The request it will make of the child.
    pub fn block_io(&self) -> BlockIo {
        self.0.block_io()
    }
}

/// A request that can be completed from any thread; the queue thread is woken to finish it.
#[must_use = "a request must be completed; dropping it fails the I/O with -EIO"]
#[derive(Debug)]
pub struct RemoteIo {
    inner: Inner,
    shared: Arc<QueueShared>,
    done: bool,
}

// SAFETY: the raw buffer pointer is the only non-Send field; the bytes belong to this request
// alone (or are shared read-only, for a write) until it is completed, whichever thread holds
// it, and their memory is kept alive by the origin's count, released on the queue thread
// only after this completion arrives there. `read_cursor` is a Cell owned by this value only.
unsafe impl Send for RemoteIo {}

impl RemoteIo {
    fn shared(&self) -> &QueueShared {
        &self.shared
    }

    data_access!(shared);

    /// Completes with `res`: bytes done or 0, or a negative errno.
    pub fn complete(mut self, res: i32) {
        self.done = true;
        self.shared.push_remote(self.inner.done(res));
    }
}

impl Drop for RemoteIo {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!("request dropped without completion: -EIO");
            self.shared.push_remote(self.inner.done(-libc::EIO));
        }
    }
}
