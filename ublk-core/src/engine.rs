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

use crate::buf::{BufferMode, FixedBuf};
use crate::io::{Geometry, IoDesc, Op};
use crate::pod;
use crate::sys;
use crate::target::{
    push_sqe, user_copy, user_copy_offset, FileSlots, Io, LocalSink, QueueCtx, QueueShared,
    QueueTarget, TARGET_OP,
};

/// The bit in `user_data` of the engine's own buffer commands (REGISTER/UNREGISTER_IO_BUF).
pub(crate) const BUF_CMD: u64 = 1 << 62;

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
}

/// One queue's dispatcher.
pub(crate) struct Engine<Q: QueueTarget> {
    target: Q,
    mode: BufferMode,
    /// User copy for a target that uses [`Io::data`]: the engine copies through the tag buffer.
    stage: bool,
    sink: Rc<LocalSink>,
    shared: Arc<QueueShared>,
    geo: Geometry,
    q_id: u16,
    slots: Vec<Slot>,
    scratch: Vec<(u16, i32)>,
    files: FileSlots,
}

impl<Q: QueueTarget> Engine<Q> {
    /// `stage` (user-copy mode only): the target reads [`Io::data`], so the engine moves each
    /// request's bytes through the tag buffer.
    pub(crate) fn new(
        target: Q,
        shared: Arc<QueueShared>,
        geo: Geometry,
        q_id: u16,
        mode: BufferMode,
        stage: bool,
    ) -> Self {
        let depth = shared.arena.depth();
        Engine {
            target,
            mode,
            stage: stage && mode == BufferMode::UserCopy,
            sink: LocalSink::new(Arc::clone(&shared), depth),
            shared,
            geo,
            q_id,
            slots: vec![Slot::default(); usize::from(depth)],
            scratch: Vec::with_capacity(usize::from(depth)),
            files: FileSlots::default(),
        }
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
            .user_data(BUF_CMD | u64::from(tag));
        // SAFETY: the command carries only a buffer-table index, no memory; the char device
        // outlives the ring (held by `shared`).
        if let Err(e) = unsafe { push_sqe(ring, &sqe) } {
            tracing::error!(q = self.q_id, tag, "cannot queue a buffer command: {e}");
        }
    }

    /// The completion of a buffer command: only failures matter (the request's own fixed-buffer
    /// operations fail with them, and the target reports that).
    pub(crate) fn buf_cmd_done(&self, user_data: u64, res: i32) {
        if res < 0 {
            tracing::warn!(
                q = self.q_id,
                tag = user_data as u16,
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
        let io = match desc.decode(&self.geo) {
            Ok(io) => io,
            Err(errno) => {
                tracing::debug!(q = self.q_id, tag, ?desc, errno, "rejected request");
                self.sink.push(tag, errno);
                return;
            }
        };
        if io.len == 0 && io.op != Op::Flush {
            // Nothing to read, write or free: no target needs to see it.
            self.sink.push(tag, 0);
            return;
        }
        let buf = self
            .shared
            .arena
            .buf_ptr(tag)
            .expect("tag < depth was checked above");
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
                            self.sink.push(tag, -errno);
                            return;
                        }
                    } else if io.op == Op::Read {
                        self.slots[usize::from(tag)].stage_out = io.len;
                    }
                    (buf, None, Some(at))
                }
            }
        };
        // The tag was just marked busy: this request alone uses its buffer, fixed-buffer slot
        // and user-copy range until its completion is drained below.
        // SAFETY: buf is null or tag's arena buffer of max_io >= io.len bytes (see decode);
        // the request is its only user (above).
        let io = unsafe { Io::new(io, tag, buf, fixed, user_copy_at, Rc::clone(&self.sink)) };
        let mut ctx = QueueCtx {
            q_id: self.q_id,
            geo: &self.geo,
            ring,
            files: &mut self.files,
        };
        let target = &mut self.target;
        // A panicking target drops the Io while unwinding, which fails it with -EIO.
        if catch_unwind(AssertUnwindSafe(|| target.submit(io, &mut ctx))).is_err() {
            tracing::error!(
                q = self.q_id,
                tag,
                "target panicked: request failed with -EIO"
            );
        }
    }

    /// Routes the completion of an operation the target pushed (its `user_data` carries
    /// [`TARGET_OP`]) back to the target.
    pub(crate) fn target_event(&mut self, user_data: u64, res: i32, ring: &mut IoUring) {
        let mut ctx = QueueCtx {
            q_id: self.q_id,
            geo: &self.geo,
            ring,
            files: &mut self.files,
        };
        let target = &mut self.target;
        let user_data = user_data & !TARGET_OP;
        if catch_unwind(AssertUnwindSafe(|| {
            target.complete(user_data, res, &mut ctx)
        }))
        .is_err()
        {
            tracing::error!(q = self.q_id, user_data, "target panicked in a completion");
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
        // request was completed, so nothing else touches the buffer until its commit.
        unsafe { user_copy(cdev, at, buf, len, true) }.map_err(|e| {
            tracing::warn!(q = self.q_id, tag, "user copy of a read's data failed: {e}");
            e.raw_os_error().unwrap_or(libc::EIO)
        })
    }

    /// Passes every completed request to `commit(ring, tag, result)` and marks its tag free,
    /// first finishing what the buffer mode needs (a staged read's copy to the kernel, the
    /// unregistration of manually registered pages) so the commit follows it on the ring.
    pub(crate) fn drain(
        &mut self,
        ring: &mut IoUring,
        mut commit: impl FnMut(&mut IoUring, u16, i32),
    ) {
        let mut done = std::mem::take(&mut self.scratch);
        self.sink.take_into(&mut done);
        while let Some(d) = self.shared.pop_remote() {
            done.push(d);
        }
        for (tag, mut res) in done.drain(..) {
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
            commit(ring, tag, res);
        }
        self.scratch = done;
    }

    /// Number of requests the server holds.
    pub(crate) fn in_service(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }
}
