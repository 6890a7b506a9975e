//! The dispatch half of a queue, independent of how descriptors arrive: decode a tag's
//! descriptor, hand the request to the target, and collect completions into commits.
//!
//! The real queue ([`crate::queue`]) feeds it from the kernel; a simulated queue can feed it
//! from memory. Both run the same code against the same target.

use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use std::collections::VecDeque;

use slab::Slab;

use crate::buf::{Bounce, BufPool, BufferMode, FixedBuf, PoolBuf, POOL_IDLE_BYTES};
use crate::ctx::{push_sqe, Core, FileSlots, QueueCtx};
use crate::io::{Geometry, IoDesc, Op};
use crate::pod;
use crate::request::{
    user_copy, user_copy_offset, Dest, Done, Io, LocalSink, NodeId, Origin, QueueShared, SubIo,
    View,
};
use crate::stats::QueueStats;
use crate::sys;
use crate::target::{Completion, QueueTarget, Tree};
use crate::user_data::Owner;

/// What the engine knows of one tag.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The server holds the tag (fetched, not yet committed).
    busy: bool,
    /// User copy, staged: a read of this many bytes whose data goes from the tag buffer to
    /// the kernel before the commit.
    stage_out: u32,
    /// Manual zero-copy: the request's pages are registered at index = tag.
    registered: bool,
    /// The kernel request's result, once it completed (its commit waits for every
    /// sub-request viewing its buffer).
    result: Option<i32>,
    /// The request reached the target, and was fetched at `fetched` on the engine's clock:
    /// its commit counts in the root's latency histogram.
    timed: bool,
    fetched: u64,
    /// A read: with a pool, its buffer is needed until the commit is submitted.
    reads: bool,
}

/// One queue's dispatcher: the node tree, the requests and operations in flight, and the
/// tags waiting to be committed.
pub(crate) struct Engine {
    nodes: Vec<Box<dyn QueueTarget>>,
    core: Core,
    mode: BufferMode,
    /// User copy for a target that uses [`Io::data`]: the engine copies through the tag buffer.
    stage: bool,
    shared: Arc<QueueShared>,
    q_id: u16,
    slots: Vec<Slot>,
    scratch: Vec<Done>,
    /// Tags whose request and every sub-request completed: `(tag, result)`, to commit.
    ready: Vec<(u16, i32)>,
    /// The engine's clock: nanoseconds since `epoch` when [`Engine::tick`] last read it.
    epoch: std::time::Instant,
    now: u64,
    /// `UBLK_F_NEED_GET_DATA`: request buffers come from this pool, not the tag arena.
    pool: Option<BufPool>,
    /// The pool buffer each tag holds while its request is in flight.
    held: Vec<Option<PoolBuf>>,
    /// Buffers of requests whose commits are queued but not yet submitted: the kernel copies
    /// a read's data out of its buffer when it takes the commit.
    retired: Vec<PoolBuf>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // A request still held may be in another thread's hands (a `RemoteIo`) or the
        // kernel's (a NEED_GET_DATA copy): its buffer is leaked rather than unmapped under it.
        for buf in self.held.iter_mut().filter_map(Option::take) {
            std::mem::forget(buf);
        }
    }
}

impl Engine {
    /// `stage` (user-copy mode only): the target reads [`Io::data`], so the engine moves each
    /// request's bytes through the tag buffer.
    pub(crate) fn new(
        tree: Tree,
        shared: Arc<QueueShared>,
        geo: Geometry,
        q_id: u16,
        (mode, stage, need_get_data): (BufferMode, bool, bool),
    ) -> Self {
        let depth = shared.arena.depth();
        let paths = tree.meta.iter().map(|m| m.path.clone()).collect();
        Engine {
            nodes: tree.nodes,
            core: Core {
                q_id,
                geo,
                sink: LocalSink::new(Arc::clone(&shared), depth),
                files: FileSlots::default(),
                joins: Slab::new(),
                ops: Slab::new(),
                submits: VecDeque::new(),
                events: VecDeque::new(),
                turn_end: Vec::new(),
                meta: tree.meta,
                opened: Vec::new(),
                stats: Arc::new(QueueStats::new(q_id, paths)),
            },
            mode,
            stage: stage && mode == BufferMode::UserCopy,
            shared,
            q_id,
            slots: vec![Slot::default(); usize::from(depth)],
            scratch: Vec::with_capacity(usize::from(depth)),
            ready: Vec::with_capacity(usize::from(depth)),
            epoch: std::time::Instant::now(),
            now: 0,
            pool: need_get_data.then(|| BufPool::new(POOL_IDLE_BYTES)),
            held: (0..depth).map(|_| None).collect(),
            retired: Vec::new(),
        }
    }

    /// `UBLK_F_NEED_GET_DATA`: the kernel has a write for `tag` and asks where to put its
    /// data. Returns the address of a pool buffer now held for the tag, for the
    /// NEED_GET_DATA command; `None` when the request was answered with an error instead
    /// (queued for commit).
    pub(crate) fn need_data(&mut self, tag: u16, desc: IoDesc) -> Option<u64> {
        let Some(slot) = self.slots.get_mut(usize::from(tag)) else {
            tracing::error!(
                q = self.q_id,
                tag,
                "NEED_GET_DATA for a tag beyond the depth"
            );
            return None;
        };
        let fail = |slot: &mut Slot, ready: &mut Vec<(u16, i32)>, errno: i32| {
            *slot = Slot {
                busy: true,
                ..Slot::default()
            };
            ready.push((tag, errno));
            None
        };
        let len = match desc.decode(&self.core.geo) {
            Ok(io) => io.len as usize,
            Err(errno) => return fail(slot, &mut self.ready, errno),
        };
        let Some(pool) = self.pool.as_mut() else {
            tracing::error!(q = self.q_id, tag, "NEED_GET_DATA without the flag");
            return fail(slot, &mut self.ready, -libc::EIO);
        };
        match pool.take(len) {
            Ok(buf) => {
                let addr = buf.as_ptr() as u64;
                self.held[usize::from(tag)] = Some(buf);
                Some(addr)
            }
            Err(e) => {
                tracing::warn!(q = self.q_id, tag, "no buffer for a write's data: {e}");
                fail(slot, &mut self.ready, -libc::ENOMEM)
            }
        }
    }

    /// Whether the buffer pool holds idle memory beyond its budget with no request using it:
    /// the queue should call [`Engine::trim_pool`] once it has been idle for a moment.
    pub(crate) fn pool_has_excess(&self) -> bool {
        self.pool.as_ref().is_some_and(BufPool::has_excess)
    }

    /// Gives the buffer pool's idle memory beyond its budget back to the system.
    pub(crate) fn trim_pool(&mut self) {
        if let Some(pool) = self.pool.as_mut() {
            pool.trim();
        }
    }

    /// Whether reads' buffers wait for their commits to be submitted (see
    /// [`Engine::submitted`]).
    pub(crate) fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// The loop turn's commits were submitted (the kernel copied the reads' data out of their
    /// buffers while taking them): their buffers go back to the pool.
    pub(crate) fn submitted(&mut self) {
        if let Some(pool) = self.pool.as_mut() {
            for buf in self.retired.drain(..) {
                pool.give(buf);
            }
        }
    }

    /// The buffer `tag`'s request of `len` bytes uses: the tag's arena buffer, or with a pool
    /// the buffer its write's data came in, or a new one for a read. `Err(errno)` when a pool
    /// has none to give.
    fn request_buf(&mut self, tag: u16, op: Op, len: u32) -> Result<*mut u8, i32> {
        let Some(pool) = self.pool.as_mut() else {
            return Ok(self
                .shared
                .arena
                .buf_ptr(tag)
                .expect("tag < depth was checked by the caller"));
        };
        let held = &mut self.held[usize::from(tag)];
        match (op, held.as_ref()) {
            (Op::Write, Some(buf)) if buf.len() >= len as usize => Ok(buf.as_ptr()),
            (Op::Write, _) => {
                tracing::error!(
                    q = self.q_id,
                    tag,
                    "a write without its NEED_GET_DATA buffer"
                );
                Err(libc::EIO)
            }
            (Op::Read, _) => {
                let buf = pool.take(len as usize).map_err(|e| {
                    tracing::warn!(q = self.q_id, tag, "no buffer for a read: {e}");
                    libc::ENOMEM
                })?;
                let ptr = buf.as_ptr();
                if let Some(old) = held.replace(buf) {
                    pool.give(old);
                }
                Ok(ptr)
            }
            _ => Ok(std::ptr::null_mut()),
        }
    }

    /// Reads the clock the latency histograms use: once per loop turn when its completions
    /// have been reaped, and again in [`Engine::drain`] before the commits.
    pub(crate) fn tick(&mut self) {
        self.now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    }

    /// This queue's per-node counters.
    pub(crate) fn stats(&self) -> Arc<QueueStats> {
        Arc::clone(&self.core.stats)
    }

    /// A REGISTER/UNREGISTER_IO_BUF command for `tag`'s pages at buffer index = tag.
    fn buf_cmd(&self, cmd_op: u32, tag: u16, ring: &mut IoUring) {
        let Some(cdev) = self.shared.cdev.as_deref() else {
            tracing::error!(
                q = self.q_id,
                tag,
                "manual zero-copy without the char device"
            );
            return;
        };
        let cmd = sys::ublksrv_io_cmd {
            q_id: self.q_id,
            tag,
            result: 0,
            addr: u64::from(tag),
        };
        let sqe = opcode::UringCmd16::new(types::Fd(cdev.as_raw_fd()), cmd_op)
            .cmd(pod::to_cmd_bytes(&cmd))
            .build()
            .user_data(Owner::BufCmd(tag).user_data());
        // SAFETY: the command carries only a buffer-table index, no memory; the char device
        // outlives the ring (held by `shared`).
        if let Err(e) = unsafe { push_sqe(ring, &sqe) } {
            tracing::error!(q = self.q_id, tag, "cannot queue a buffer command: {e}");
        }
    }

    /// The completion of a buffer command: only failures matter (the request's own fixed-buffer
    /// operations fail with them, and the target reports that).
    pub(crate) fn buf_cmd_done(&self, tag: u16, res: i32) {
        if res < 0 {
            tracing::warn!(
                q = self.q_id,
                tag,
                "buffer registration command failed: {}",
                std::io::Error::from_raw_os_error(-res)
            );
        }
    }

    /// Serves the request the kernel delivered for `tag`.
    pub(crate) fn dispatch(&mut self, tag: u16, desc: IoDesc, ring: &mut IoUring) {
        let Some(slot) = self.slots.get_mut(usize::from(tag)) else {
            tracing::error!(
                q = self.q_id,
                tag,
                "request for a tag beyond the queue depth"
            );
            return;
        };
        if slot.busy {
            tracing::error!(q = self.q_id, tag, "request for a tag already in service");
            return;
        }
        *slot = Slot {
            busy: true,
            ..Slot::default()
        };
        // The size may change while the device runs (`SizeHandle::resize`).
        let geo = Geometry {
            size: self.shared.size.load(std::sync::atomic::Ordering::Relaxed),
            ..self.core.geo
        };
        let io = match desc.decode(&geo) {
            Ok(io) => io,
            Err(errno) => {
                tracing::debug!(q = self.q_id, tag, ?desc, errno, "rejected request");
                self.ready.push((tag, errno));
                return;
            }
        };
        if io.len == 0 && io.op != Op::Flush {
            // Nothing to read, write or free: no target needs to see it.
            self.ready.push((tag, 0));
            return;
        }
        slot.timed = true;
        slot.fetched = self.now;
        slot.reads = io.op == Op::Read;
        let buf = match self.request_buf(tag, io.op, io.len) {
            Ok(buf) => buf,
            Err(errno) => {
                self.ready.push((tag, -errno));
                return;
            }
        };
        let has_data = matches!(io.op, Op::Read | Op::Write);
        let kernel_pages = Some(FixedBuf {
            index: tag,
            addr: 0,
        });
        let none = std::ptr::null_mut();
        let (buf, fixed, user_copy_at) = match self.mode {
            BufferMode::Copy => (buf, None, None),
            BufferMode::Registered => (
                buf,
                Some(FixedBuf {
                    index: tag,
                    addr: buf as u64,
                }),
                None,
            ),
            BufferMode::ZeroCopy => (none, kernel_pages, None),
            BufferMode::ManualZeroCopy => {
                if has_data {
                    self.slots[usize::from(tag)].registered = true;
                    self.buf_cmd(sys::UBLK_U_IO_REGISTER_IO_BUF, tag, ring);
                }
                (none, kernel_pages, None)
            }
            BufferMode::UserCopy => {
                let at = user_copy_offset(self.q_id, tag);
                if !self.stage {
                    (none, None, Some(at))
                } else {
                    if io.op == Op::Write {
                        if let Err(errno) = self.stage_in(at, buf, io.len) {
                            self.ready.push((tag, -errno));
                            return;
                        }
                    } else if io.op == Op::Read {
                        self.slots[usize::from(tag)].stage_out = io.len;
                    }
                    (buf, None, Some(at))
                }
            }
        };
        let view = View::new(buf, fixed, user_copy_at, if has_data { io.len } else { 0 });
        // The tag was just marked busy: this request and its sub-requests alone use its
        // buffer, fixed-buffer slot and user-copy range until the engine commits it, which it
        // does only once none of them is left.
        // SAFETY: buf is null, or tag's arena buffer of max_io >= io.len bytes (see decode),
        // or the pool buffer of >= io.len bytes held for the tag in `held` until its commit
        // is submitted; the request is its only user (above).
        let io = unsafe { Io::kernel(io, tag, view, Rc::clone(&self.core.sink)) };
        // What the root set in motion (requests to children, completions) runs in `drain`,
        // once per loop turn for all the turn's requests, before anything is submitted.
        self.call_submit(NodeId(0), io, ring);
    }

    /// Hands `io` to `node`.
    fn call_submit(&mut self, node: NodeId, mut io: Io, ring: &mut IoUring) {
        io.set_node(node);
        io.set_started(self.now);
        if let Some(c) = self.core.stats.nodes.get(node.index()) {
            c.request(&io.block_io());
        }
        let Some(target) = self.nodes.get_mut(node.index()) else {
            tracing::error!(q = self.q_id, ?node, "request for no node");
            return io.fail(libc::EIO);
        };
        let mut ctx = QueueCtx {
            core: &mut self.core,
            ring,
            node,
        };
        // A panicking target drops the Io while unwinding, which fails it with -EIO.
        if catch_unwind(AssertUnwindSafe(|| target.submit(io, &mut ctx))).is_err() {
            tracing::error!(
                q = self.q_id,
                ?node,
                "target panicked: request failed with -EIO"
            );
        }
        self.adopt_opened();
    }

    /// Adds the nodes a node opened while it ran ([`QueueCtx::open_child`]) to the table.
    fn adopt_opened(&mut self) {
        if !self.core.opened.is_empty() {
            self.nodes.append(&mut self.core.opened);
        }
    }

    /// Hands a completion to the node that started the work.
    fn call_complete(&mut self, node: NodeId, done: Completion, ring: &mut IoUring) {
        let Some(target) = self.nodes.get_mut(node.index()) else {
            tracing::error!(q = self.q_id, ?node, "completion for no node");
            return;
        };
        let mut ctx = QueueCtx {
            core: &mut self.core,
            ring,
            node,
        };
        if catch_unwind(AssertUnwindSafe(|| target.complete(done, &mut ctx))).is_err() {
            tracing::error!(q = self.q_id, ?node, "target panicked in a completion");
        }
        self.adopt_opened();
    }

    /// The completion of an operation a node started on the ring, by op-slab key.
    pub(crate) fn op_done(&mut self, key: u32, res: i32, ring: &mut IoUring) {
        let Some(entry) = self.core.ops.try_remove(key as usize) else {
            tracing::error!(q = self.q_id, key, "completion for no operation");
            return;
        };
        let mut done = Completion::new(entry.token, res);
        done.io = entry.io;
        self.call_complete(entry.node, done, ring);
    }

    /// Runs everything the nodes set in motion until nothing is left to do this turn:
    /// requests sent to children, completions for nodes, finished requests.
    fn settle(&mut self, ring: &mut IoUring) {
        loop {
            let mut progressed = false;
            while let Some((node, io)) = self.core.submits.pop_front() {
                self.call_submit(node, io, ring);
                progressed = true;
            }
            while let Some((node, done)) = self.core.events.pop_front() {
                self.call_complete(node, done, ring);
                progressed = true;
            }
            let mut done = std::mem::take(&mut self.scratch);
            self.core.sink.take_into(&mut done);
            if done.is_empty() && !progressed {
                self.scratch = done;
                if self.core.turn_end.is_empty() {
                    return;
                }
                // Everything else is settled: the turn's end, for the nodes that asked.
                for (node, token) in std::mem::take(&mut self.core.turn_end) {
                    self.core
                        .events
                        .push_back((node, Completion::new(token, 0)));
                }
                continue;
            }
            for d in done.drain(..) {
                self.finish(d);
            }
            self.scratch = done;
        }
    }

    /// Accounts for one finished request.
    fn finish(&mut self, d: Done) {
        let origin = d.origin;
        if let Some(c) = self.core.stats.nodes.get(d.node.index()) {
            if d.res < 0 {
                c.error();
            }
            // The root's own kernel request is timed at its commit, in `drain`.
            if !(d.root && d.node == NodeId(0) && matches!(origin, Origin::Tag(_))) {
                c.answered(self.now.saturating_sub(d.started));
            }
        }
        if d.root {
            match origin {
                Origin::Tag(tag) => match self.slots.get_mut(usize::from(tag)) {
                    Some(slot) if slot.busy => slot.result = Some(d.res),
                    _ => tracing::error!(q = self.q_id, tag, "completion for a tag not in service"),
                },
                Origin::Bounce(key) => {
                    if let Some(slot) = self.core.sink.bounces.borrow_mut().get_mut(key as usize) {
                        slot.pending = Some(d);
                    }
                }
            }
        } else {
            self.route(d, None);
        }
        self.release(origin);
    }

    /// Delivers a finished request's result to whoever waits for it.
    fn route(&mut self, d: Done, bounce: Option<Bounce>) {
        match d.dest {
            Dest::Join(key) => self.core.join_child_done(key, d.res, d.ok_len()),
            Dest::Node { node, token } => {
                let mut done = Completion::new(token, d.res);
                done.bounce = bounce;
                if !d.root && d.res != d.ok_len() {
                    done.retry = Some(SubIo(Io::reissue(&d, Rc::clone(&self.core.sink))));
                }
                self.core.events.push_back((node, done));
            }
            Dest::Detached => {}
            Dest::Kernel(tag) => {
                tracing::error!(q = self.q_id, tag, "a sub-request addressed to the kernel");
            }
        }
    }

    /// One request fewer views `origin`; the last one out commits the tag or returns the
    /// bounce buffer.
    fn release(&mut self, origin: Origin) {
        match origin {
            Origin::Tag(tag) => {
                if self.core.sink.release_tag(tag) {
                    if let Some(res) = self
                        .slots
                        .get_mut(usize::from(tag))
                        .and_then(|s| s.result.take())
                    {
                        self.ready.push((tag, res));
                    }
                }
            }
            Origin::Bounce(key) => {
                let freed = {
                    let mut bounces = self.core.sink.bounces.borrow_mut();
                    match bounces.get_mut(key as usize) {
                        Some(slot) => {
                            slot.refs = slot.refs.saturating_sub(1);
                            (slot.refs == 0).then(|| bounces.remove(key as usize))
                        }
                        None => None,
                    }
                };
                if let Some(slot) = freed {
                    match slot.pending {
                        Some(d) => self.route(d, Some(slot.mem)),
                        None => tracing::error!(q = self.q_id, "a bounce freed before its request"),
                    }
                }
            }
        }
    }

    /// User copy, staged: reads a write's `len` bytes from the kernel into the tag buffer.
    /// Returns the positive errno on failure.
    fn stage_in(&self, at: u64, buf: *mut u8, len: u32) -> Result<(), i32> {
        let cdev = self.shared.cdev.as_deref().ok_or(libc::EIO)?;
        // SAFETY: buf is the tag's arena buffer of max_io >= len bytes, owned by this request
        // (its tag was just marked busy).
        unsafe { user_copy(cdev, at, buf, len as usize, false) }.map_err(|e| {
            tracing::warn!(q = self.q_id, "user copy of a write's data failed: {e}");
            e.raw_os_error().unwrap_or(libc::EIO)
        })
    }

    /// User copy, staged: sends a read's first `len` bytes from `tag`'s buffer to the kernel.
    fn stage_out(&self, tag: u16, len: usize) -> Result<(), i32> {
        let cdev = self.shared.cdev.as_deref().ok_or(libc::EIO)?;
        let buf = self.shared.arena.buf_ptr(tag).ok_or(libc::EIO)?;
        let at = user_copy_offset(self.q_id, tag);
        // SAFETY: buf is the tag's arena buffer, len <= the read's length <= max_io bytes; the
        // request and its sub-requests completed, so nothing else touches the buffer until
        // its commit.
        unsafe { user_copy(cdev, at, buf, len, true) }.map_err(|e| {
            tracing::warn!(q = self.q_id, tag, "user copy of a read's data failed: {e}");
            e.raw_os_error().unwrap_or(libc::EIO)
        })
    }

    /// Passes every finished request to `commit(ring, tag, result, addr)` and marks its tag
    /// free (`addr`: the pool buffer a read's data is in, else 0; the pool gets it back once
    /// [`Engine::submitted`] says the commit reached the kernel),
    /// first finishing what the buffer mode needs (a staged read's copy to the kernel, the
    /// unregistration of manually registered pages) so the commit follows it on the ring.
    pub(crate) fn drain(
        &mut self,
        ring: &mut IoUring,
        mut commit: impl FnMut(&mut IoUring, u16, i32, u64),
    ) {
        self.tick();
        // Completions made on other threads wait here until the loop turn ends.
        while let Some(d) = self.shared.pop_remote() {
            self.finish(d);
        }
        while let Some((node, token, res)) = self.shared.pop_notice() {
            self.core
                .events
                .push_back((node, Completion::new(token, res)));
        }
        self.settle(ring);
        let mut ready = std::mem::take(&mut self.ready);
        for (tag, mut res) in ready.drain(..) {
            let slot = match self.slots.get_mut(usize::from(tag)) {
                Some(slot) if slot.busy => std::mem::take(slot),
                _ => {
                    tracing::error!(q = self.q_id, tag, "completion for a tag not in service");
                    continue;
                }
            };
            if slot.stage_out > 0 && res > 0 {
                let len = (res as u32).min(slot.stage_out) as usize;
                if let Err(errno) = self.stage_out(tag, len) {
                    res = -errno;
                }
            }
            if slot.registered {
                self.buf_cmd(sys::UBLK_U_IO_UNREGISTER_IO_BUF, tag, ring);
            }
            if slot.timed {
                if let Some(c) = self.core.stats.nodes.first() {
                    c.answered(self.now.saturating_sub(slot.fetched));
                }
            }
            let held = self.held.get_mut(usize::from(tag)).and_then(Option::take);
            let addr = held.as_ref().map_or(0, |b| b.as_ptr() as u64);
            commit(ring, tag, res, addr);
            // Only a read's buffer is still needed, by the kernel taking the commit; the
            // request's own views of the tag are gone (it is committed only then).
            match (held, slot.reads) {
                (Some(buf), true) => self.retired.push(buf),
                (Some(buf), false) => {
                    if let Some(pool) = self.pool.as_mut() {
                        pool.give(buf);
                    }
                }
                (None, _) => {}
            }
        }
        self.ready = ready;
    }

    /// Number of requests the server holds.
    pub(crate) fn in_service(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// Operations of the nodes still in flight on the ring.
    pub(crate) fn ops_in_flight(&self) -> usize {
        self.core.ops.len()
    }

    /// Waits (up to `timeout`) for every operation the nodes started to complete, so no
    /// buffer they use is freed while the kernel may still write into it. Whatever is still
    /// in flight after that is leaked, never freed.
    pub(crate) fn quiesce(&mut self, ring: &mut IoUring, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.core.ops.is_empty() && std::time::Instant::now() < deadline {
            let wait = std::time::Duration::from_millis(50);
            if let Err(e) = crate::queue::submit_and_wait_within(ring, wait) {
                tracing::warn!(q = self.q_id, "waiting for operations: {e}");
                break;
            }
            let cqes: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (user_data, res) in cqes {
                if let Owner::NodeOp(key) = Owner::of(user_data) {
                    self.op_done(key, res, ring);
                }
            }
            self.settle(ring);
        }
        if !self.core.ops.is_empty() {
            tracing::warn!(
                q = self.q_id,
                ops = self.core.ops.len(),
                "operations still in flight at exit: their buffers are leaked, not freed"
            );
            std::mem::forget(std::mem::take(&mut self.core.ops));
        }
    }
}
