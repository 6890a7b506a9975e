//! What a node can do while it serves a request: send requests to its children (one at a
//! time with a rule of its own, or fanned out and joined by the engine), and run operations
//! on files through the queue's io_uring — all safe, with every buffer kept alive by the
//! engine until the kernel is done with it.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use crate::buf::Bounce;
use crate::io::{BlockIo, Geometry, Op};
use crate::request::{Dest, Io, LocalSink, NodeId, Notifier, SubIo, View};
use crate::stats::QueueStats;
use crate::target::{Child, Completion, DynTarget, NodeMeta, QueueTarget};
use crate::user_data::Owner;

/// Queues `sqe` on `ring`, submitting first if the submission queue is full.
///
/// # Safety
/// Every buffer and file the SQE refers to must stay valid until its completion arrives.
pub(crate) unsafe fn push_sqe(ring: &mut IoUring, sqe: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: the caller guarantees the SQE's buffers outlive its completion.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
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

/// A request parked while its sub-requests run, and how they went.
#[derive(Debug)]
pub(crate) struct Join {
    io: Option<Io>,
    left: u32,
    sealed: bool,
    err: Option<i32>,
}

/// An operation in flight on the queue ring: who started it, and what it must keep alive.
#[derive(Debug)]
pub(crate) struct OpEntry {
    pub(crate) node: NodeId,
    pub(crate) token: u64,
    pub(crate) io: Option<Io>,
    pub(crate) _file: Option<Arc<File>>,
    /// A timeout's duration, read by the kernel when it starts the timeout.
    pub(crate) _timespec: Option<Box<types::Timespec>>,
}

/// The engine state nodes reach through [`QueueCtx`].
pub(crate) struct Core {
    pub(crate) q_id: u16,
    pub(crate) geo: Geometry,
    pub(crate) sink: Rc<LocalSink>,
    pub(crate) files: FileSlots,
    pub(crate) joins: Slab<Join>,
    pub(crate) ops: Slab<OpEntry>,
    /// Requests sent to nodes, served in order once the sender returns.
    pub(crate) submits: VecDeque<(NodeId, Io)>,
    /// Completions for nodes, delivered in order.
    pub(crate) events: VecDeque<(NodeId, Completion)>,
    /// Completions asked for at the end of the loop turn ([`QueueCtx::at_turn_end`]).
    pub(crate) turn_end: Vec<(NodeId, u64)>,
    pub(crate) meta: Vec<NodeMeta>,
    /// Nodes opened while the queue runs ([`QueueCtx::open_child`]), for the engine to add
    /// to its table after the node that opened them returns.
    pub(crate) opened: Vec<Box<dyn QueueTarget>>,
    pub(crate) stats: Arc<QueueStats>,
}

impl Core {
    /// A sub-request of join `key` finished with `res` out of `ok`.
    pub(crate) fn join_child_done(&mut self, key: u32, res: i32, ok: i32) {
        let Some(join) = self.joins.get_mut(key as usize) else {
            tracing::error!(q = self.q_id, key, "completion for no join");
            return;
        };
        if res < 0 {
            join.err.get_or_insert(res);
        } else if res != ok {
            // A child must serve its whole range; the kernel cannot resume a split request.
            join.err.get_or_insert(-libc::EIO);
        }
        join.left = join.left.saturating_sub(1);
        if join.left == 0 && join.sealed {
            self.finish_join(key as usize);
        }
    }

    fn finish_join(&mut self, key: usize) {
        let join = self.joins.remove(key);
        if let Some(io) = join.io {
            match join.err {
                Some(err) => io.complete(err),
                None => io.complete_ok(),
            }
        }
    }
}

/// What a node can see and do while it handles a request or a completion: its queue and
/// node, the device geometry, its children, and the queue's io_uring.
///
/// Nothing here runs at once: requests sent to children are served, and operations reach the
/// kernel, when the node returns — all of one loop turn with one `io_uring_enter`.
pub struct QueueCtx<'a> {
    pub(crate) core: &'a mut Core,
    pub(crate) ring: &'a mut IoUring,
    pub(crate) node: NodeId,
}

impl std::fmt::Debug for QueueCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueCtx")
            .field("q_id", &self.core.q_id)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A file as a queue's operations name it: by its index in the queue ring's file table when
/// it could be registered, else by descriptor. Get one with [`QueueCtx::file`].
#[derive(Debug, Clone)]
pub struct QueueFile {
    file: Arc<File>,
    fixed: Option<u32>,
}

impl QueueFile {
    fn fd(&self) -> types::Fd {
        match self.fixed {
            Some(index) => types::Fd(index as i32),
            None => types::Fd(self.file.as_raw_fd()),
        }
    }

    fn flags(&self) -> squeue::Flags {
        if self.fixed.is_some() {
            squeue::Flags::FIXED_FILE
        } else {
            squeue::Flags::empty()
        }
    }

    /// The ring holds a registered file itself; a plain descriptor must be kept open by the
    /// operation.
    fn keep(&self) -> Option<Arc<File>> {
        self.fixed.is_none().then(|| Arc::clone(&self.file))
    }
}

impl<'a> QueueCtx<'a> {
    /// The queue's id.
    pub fn q_id(&self) -> u16 {
        self.core.q_id
    }

    /// The device's size and limits.
    pub fn geometry(&self) -> &Geometry {
        &self.core.geo
    }

    /// The node being served.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Asks for a completion with `token` (and result 0) once everything this loop turn of
    /// the queue brought is handed out: the new requests, the completions, the notices, and
    /// what they set in motion. Nothing is submitted to the kernel before it. A node that
    /// gathers the work of several requests to serve them together (one child request for
    /// the writes of many) does it there. Each call gives one completion.
    pub fn at_turn_end(&mut self, token: u64) {
        self.core.turn_end.push((self.node, token));
    }

    /// A handle for other threads to notify this node (see [`Notifier`]).
    pub fn notifier(&self) -> Notifier {
        Notifier::new(Arc::clone(&self.core.sink.shared), self.node)
    }

    /// Opens `target` as a new child of this node while the queue runs (a mirror taking a
    /// replacement leg), with its whole subtree; it is numbered after every node opened so
    /// far. Each queue opens its own. Nodes opened this way are not counted in the per-node
    /// statistics.
    pub fn open_child(&mut self, target: &dyn DynTarget) -> io::Result<Child> {
        let base = self.core.meta.len();
        let mut slots: Vec<Option<Box<dyn QueueTarget>>> = (0..base).map(|_| None).collect();
        let mut meta = self.core.meta.clone();
        let geo = self.core.geo;
        let child = crate::target::open_child_at(
            self.core.q_id,
            &geo,
            &mut slots,
            &mut meta,
            self.node,
            target,
        )?;
        let nodes = slots
            .drain(base..)
            .map(|s| s.ok_or_else(|| io::Error::other("a node of the subtree was not opened")))
            .collect::<io::Result<Vec<_>>>()?;
        // Numbered from `meta`'s length; the engine appends `opened` to its table in order
        // after this node returns, so ids and table positions agree.
        self.core.meta = meta;
        self.core.opened.extend(nodes);
        Ok(child)
    }

    /// The size of `child`, when it declared one.
    pub fn child_size(&self, child: Child) -> Option<u64> {
        self.core.meta.get(child.0.index()).and_then(|m| m.size)
    }

    /// `file` as this queue's operations name it: registered in the ring's file table the
    /// first time a queue asks (no per-operation file lookup), or by descriptor if the table
    /// is full or missing. Call once per file and keep the result.
    pub fn file(&mut self, file: &Arc<File>) -> QueueFile {
        let fixed = match self.register_file(file) {
            Ok(index) => Some(index),
            Err(e) => {
                tracing::debug!(q = self.core.q_id, "file named by descriptor: {e}");
                None
            }
        };
        QueueFile {
            file: Arc::clone(file),
            fixed,
        }
    }

    fn register_file(&mut self, file: &File) -> io::Result<u32> {
        let ring = &mut *self.ring;
        let q_id = self.core.q_id;
        let slots = &mut self.core.files;
        let capacity = *slots.capacity.get_or_insert_with(|| {
            match ring.submitter().register_files_sparse(FILE_SLOTS) {
                Ok(()) => FILE_SLOTS,
                Err(e) => {
                    tracing::debug!(q = q_id, "no file table on the queue ring: {e}");
                    0
                }
            }
        });
        let index = slots.next;
        if index >= capacity {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "the queue ring's file table is full or missing",
            ));
        }
        ring.submitter()
            .register_files_update(index, &[file.as_raw_fd()])?;
        slots.next += 1;
        Ok(index)
    }

    /// Reads `io.len()` bytes of `file` at `pos` into `io`'s buffer — its fixed buffer in the
    /// registered and zero-copy modes (the bytes go straight into the kernel's pages), else
    /// its server memory. The completion returns `io` in [`Completion::io`].
    pub fn read(&mut self, file: &QueueFile, io: Io, pos: u64, token: u64) {
        self.rw(file, io, pos, token, false)
    }

    /// Writes `io`'s bytes to `file` at `pos` (with `RWF_DSYNC` when the request has FUA),
    /// from its fixed buffer or server memory as for [`QueueCtx::read`].
    pub fn write(&mut self, file: &QueueFile, io: Io, pos: u64, token: u64) {
        self.rw(file, io, pos, token, true)
    }

    fn rw(&mut self, file: &QueueFile, io: Io, pos: u64, token: u64, write: bool) {
        let want = if write { Op::Write } else { Op::Read };
        if io.op() != want {
            return self.fail_op(io, token, libc::EINVAL, "read/write of the wrong op");
        }
        let view = io.view();
        let (buf, fixed, len) = (view.buf, view.fixed(), view.len);
        let fd = file.fd();
        let sqe = match (fixed, write) {
            (Some(fb), false) => opcode::ReadFixed::new(fd, fb.addr as *mut u8, len, fb.index)
                .offset(pos)
                .build(),
            (Some(fb), true) => opcode::WriteFixed::new(fd, fb.addr as *const u8, len, fb.index)
                .offset(pos)
                .rw_flags(fua_flags(&io.block_io()))
                .build(),
            (None, false) if !buf.is_null() => opcode::Read::new(fd, buf, len).offset(pos).build(),
            (None, true) if !buf.is_null() => opcode::Write::new(fd, buf, len)
                .offset(pos)
                .rw_flags(fua_flags(&io.block_io()))
                .build(),
            _ => {
                return self.fail_op(
                    io,
                    token,
                    libc::EOPNOTSUPP,
                    "the request has neither a fixed buffer nor server memory",
                )
            }
        };
        let sqe = sqe.flags(file.flags());
        let keep = file.keep();
        // The SQE uses the request's view: a fixed buffer of this ring (kernel pages pinned by
        // their registration, or the tag arena) or server memory kept by the origin count.
        // SAFETY: `io` is kept in the op slab until the completion, so the view stays valid;
        // the file is registered on the ring or kept by `keep`.
        unsafe { self.start(sqe, token, Some(io), keep) }
    }

    /// `fdatasync` (`datasync`) or `fsync` of `file`. `io`, if given, is the request this
    /// serves: it comes back in [`Completion::io`].
    pub fn fsync(&mut self, file: &QueueFile, datasync: bool, io: Option<Io>, token: u64) {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let sqe = opcode::Fsync::new(file.fd())
            .flags(flags)
            .build()
            .flags(file.flags());
        let keep = file.keep();
        // SAFETY: fsync touches no memory; the file is registered or kept by `keep`.
        unsafe { self.start(sqe, token, io, keep) }
    }

    /// `fallocate(mode, offset, len)` on `file` (punch a hole, zero a range, ...). `io`, if
    /// given, comes back in [`Completion::io`].
    pub fn fallocate(
        &mut self,
        file: &QueueFile,
        (mode, offset, len): (i32, u64, u64),
        io: Option<Io>,
        token: u64,
    ) {
        let sqe = opcode::Fallocate::new(file.fd(), len)
            .offset(offset)
            .mode(mode)
            .build()
            .flags(file.flags());
        let keep = file.keep();
        // SAFETY: fallocate touches no memory; the file is registered or kept by `keep`.
        unsafe { self.start(sqe, token, io, keep) }
    }

    /// Queues `sqe` on the ring; its completion comes back to this node as a
    /// [`Completion`] with `token` (and `io`, if given).
    ///
    /// # Safety
    /// Every buffer and file the SQE refers to must stay valid until its completion arrives;
    /// `io` and `file` are kept until then.
    unsafe fn start(
        &mut self,
        sqe: squeue::Entry,
        token: u64,
        io: Option<Io>,
        file: Option<Arc<File>>,
    ) {
        // SAFETY: the caller's guarantee is passed on.
        unsafe { self.start_with(sqe, token, io, file, None) }
    }

    /// As [`QueueCtx::start`], keeping `timespec` alive too.
    ///
    /// # Safety
    /// As for [`QueueCtx::start`].
    unsafe fn start_with(
        &mut self,
        sqe: squeue::Entry,
        token: u64,
        io: Option<Io>,
        file: Option<Arc<File>>,
        timespec: Option<Box<types::Timespec>>,
    ) {
        let key = self.core.ops.insert(OpEntry {
            node: self.node,
            token,
            io,
            _file: file,
            _timespec: timespec,
        });
        let sqe = sqe.user_data(Owner::NodeOp(key as u32).user_data());
        // SAFETY: the caller vouches for the SQE; what it needs is kept in the op slab.
        if let Err(e) = unsafe { push_sqe(self.ring, &sqe) } {
            tracing::error!(q = self.core.q_id, "cannot queue an operation: {e}");
            let entry = self.core.ops.remove(key);
            let mut c = Completion::new(token, -e.raw_os_error().unwrap_or(libc::EIO));
            c.io = entry.io;
            self.core.events.push_back((self.node, c));
        }
    }

    /// Completes once `file` is readable: a one-shot `POLL_ADD` for `POLLIN`, whose result
    /// is the ready event mask (or a negative errno). For a node that waits on an eventfd a
    /// library signals from its own threads (the RBD target's completions): the wait costs
    /// no thread of ours, and the wakeup arrives with the queue's other completions. Arm it
    /// again after each completion to keep waiting; an armed poll keeps the queue from
    /// settling at exit, so arm it only while something is expected.
    pub fn poll_readable(&mut self, file: &QueueFile, token: u64) {
        let sqe = opcode::PollAdd::new(file.fd(), libc::POLLIN as u32)
            .build()
            .flags(file.flags());
        let keep = file.keep();
        // SAFETY: a poll touches no memory; the file is registered or kept by `keep`.
        unsafe { self.start(sqe, token, None, keep) }
    }

    /// Completes after `delay` (with `-ETIME`, the timer's normal end): a node delaying a
    /// request. `io`, if given, comes back in [`Completion::io`].
    pub fn timeout(&mut self, delay: std::time::Duration, io: Option<Io>, token: u64) {
        let ts = Box::new(
            types::Timespec::new()
                .sec(delay.as_secs())
                .nsec(delay.subsec_nanos()),
        );
        let sqe = opcode::Timeout::new(&*ts).build();
        // SAFETY: the timeout reads only `ts`, kept in the op slab (boxed, so it does not
        // move) until the completion.
        unsafe { self.start_with(sqe, token, io, None, Some(ts)) }
    }

    fn fail_op(&mut self, io: Io, token: u64, errno: i32, why: &str) {
        tracing::error!(q = self.core.q_id, node = ?self.node, "{why}");
        let mut c = Completion::new(token, -errno);
        c.io = Some(io);
        self.core.events.push_back((self.node, c));
    }

    /// Sends `sub` to `child`; its result comes back to this node as a [`Completion`] with
    /// `token` (and, when it failed, the request again in [`Completion::retry`]).
    pub fn send(&mut self, child: Child, sub: SubIo, token: u64) {
        let mut io = sub.0;
        io.set_dest(Dest::Node {
            node: self.node,
            token,
        });
        self.dispatch_to(child, io);
    }

    /// Passes `io` on to `child` as it is (after [`Io::set_offset`], if the child addresses
    /// it differently): the child's answer goes wherever this request's would have gone, and
    /// this node hears nothing more of it.
    pub fn forward(&mut self, child: Child, io: Io) {
        self.dispatch_to(child, io);
    }

    /// Parks `io` and returns a [`FanOut`] to split it over children; the engine joins
    /// them with the default rule — the request succeeds when every sub-request served its
    /// whole range, else it fails with the first error (a short count is `-EIO`) — and
    /// completes `io` once the `FanOut` is dropped and every sub-request has completed.
    pub fn fan_out<'c>(&'c mut self, io: Io) -> FanOut<'c, 'a> {
        let req = io.block_io();
        let key = self.core.joins.insert(Join {
            io: Some(io),
            left: 0,
            sealed: false,
            err: None,
        });
        FanOut {
            ctx: self,
            key,
            req,
        }
    }

    /// A request of this node's own over `buf`, to send to a child: a read fills `buf`, a
    /// write stores it. `req.len` must fit in `buf` (for reads and writes). The buffer
    /// comes back in [`Completion::bounce`] once the request and every sub-request a child
    /// made of it completed.
    pub fn bounce_io(&mut self, req: BlockIo, buf: Bounce) -> io::Result<SubIo> {
        let has_data = matches!(req.op, Op::Read | Op::Write);
        if has_data && req.len as usize > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte request does not fit a {}-byte buffer",
                    req.len,
                    buf.len()
                ),
            ));
        }
        let view = if has_data {
            View::new(buf.as_ptr(), None, None, req.len)
        } else {
            View::NONE
        };
        let key = self
            .core
            .sink
            .bounces
            .borrow_mut()
            .insert(crate::request::BounceSlot {
                mem: buf,
                refs: 1,
                pending: None,
            });
        let mut io = Io::bounce(req, key as u32, view, Rc::clone(&self.core.sink));
        io.set_node(self.node);
        Ok(SubIo(io))
    }

    fn dispatch_to(&mut self, child: Child, io: Io) {
        if let Err(why) = self.check_child(child, &io) {
            tracing::error!(q = self.core.q_id, node = ?self.node, "{why}");
            return io.fail(libc::EINVAL);
        }
        self.core.submits.push_back((child.0, io));
    }

    fn check_child(&self, child: Child, io: &Io) -> Result<(), String> {
        let meta = self
            .core
            .meta
            .get(child.0.index())
            .ok_or_else(|| format!("no node {:?}", child.0))?;
        if meta.parent != Some(self.node) {
            return Err(format!("{} is not a child of this node", meta.path));
        }
        let end = io.offset().saturating_add(u64::from(io.len()));
        match meta.size {
            Some(size) if io.op() != Op::Flush && end > size => Err(format!(
                "request {}..{end} lies past the end of {} ({size} bytes)",
                io.offset(),
                meta.path
            )),
            _ => Ok(()),
        }
    }
}

fn fua_flags(req: &BlockIo) -> i32 {
    if req.flags.fua() {
        libc::RWF_DSYNC
    } else {
        0
    }
}

/// A request being split over children, joined by the engine with the default rule (see
/// [`QueueCtx::fan_out`]). The split ends when this value is dropped.
pub struct FanOut<'c, 'a> {
    ctx: &'c mut QueueCtx<'a>,
    key: usize,
    req: BlockIo,
}

impl std::fmt::Debug for FanOut<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanOut").field("req", &self.req).finish()
    }
}

impl FanOut<'_, '_> {
    /// The request being split.
    pub fn request(&self) -> BlockIo {
        self.req
    }

    /// Sends bytes `[at, at + len)` of the request to `child` at byte `offset` there (see
    /// [`Io::sub`]). On a bounds error nothing is sent and the request will fail with
    /// `-EINVAL`.
    pub fn send(&mut self, child: Child, at: u32, len: u32, offset: u64) -> io::Result<()> {
        let join = &mut self.ctx.core.joins[self.key];
        let parent = join
            .io
            .as_ref()
            .expect("a join keeps its request until sealed and done");
        match parent.sub(at, len, offset) {
            Ok(SubIo(mut io)) => {
                join.left += 1;
                io.set_dest(Dest::Join(self.key as u32));
                self.ctx.dispatch_to(child, io);
                Ok(())
            }
            Err(e) => {
                join.err.get_or_insert(-libc::EINVAL);
                Err(e)
            }
        }
    }
}

impl Drop for FanOut<'_, '_> {
    fn drop(&mut self) {
        let join = &mut self.ctx.core.joins[self.key];
        join.sealed = true;
        if join.left == 0 {
            self.ctx.core.finish_join(self.key);
        }
    }
}
