//! The dispatch half of a queue, independent of how descriptors arrive: decode a tag's
//! descriptor, hand the request to the target, and collect completions into commits.
//!
//! The real queue ([`crate::queue`]) feeds it from the kernel; a simulated queue can feed it
//! from memory. Both run the same code against the same target.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;

use crate::buf::{BufferMode, FixedBuf};
use crate::io::{Geometry, IoDesc, Op};
use io_uring::IoUring;

use crate::target::{Io, LocalSink, QueueCtx, QueueShared, QueueTarget, TARGET_OP};

/// One queue's dispatcher.
pub(crate) struct Engine<Q: QueueTarget> {
    target: Q,
    mode: BufferMode,
    sink: Rc<LocalSink>,
    shared: Arc<QueueShared>,
    geo: Geometry,
    q_id: u16,
    /// Tags the server holds (fetched, not yet committed).
    busy: Vec<bool>,
    scratch: Vec<(u16, i32)>,
}

impl<Q: QueueTarget> Engine<Q> {
    pub(crate) fn new(
        target: Q,
        shared: Arc<QueueShared>,
        geo: Geometry,
        q_id: u16,
        mode: BufferMode,
    ) -> Self {
        let depth = shared.arena.depth();
        Engine {
            target,
            mode,
            sink: LocalSink::new(Arc::clone(&shared), depth),
            shared,
            geo,
            q_id,
            busy: vec![false; usize::from(depth)],
            scratch: Vec::with_capacity(usize::from(depth)),
        }
    }

    /// Serves the request the kernel delivered for `tag`.
    pub(crate) fn dispatch(&mut self, tag: u16, desc: IoDesc, ring: &mut IoUring) {
        let Some(busy) = self.busy.get_mut(usize::from(tag)) else {
            tracing::error!(
                q = self.q_id,
                tag,
                "request for a tag beyond the queue depth"
            );
            return;
        };
        if *busy {
            tracing::error!(q = self.q_id, tag, "request for a tag already in service");
            return;
        }
        *busy = true;
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
        let (buf, fixed) = match self.mode {
            BufferMode::Copy => (buf, None),
            BufferMode::Registered => (
                buf,
                Some(FixedBuf {
                    index: tag,
                    addr: buf as u64,
                }),
            ),
            _ => (
                std::ptr::null_mut(),
                Some(FixedBuf {
                    index: tag,
                    addr: 0,
                }),
            ),
        };
        // SAFETY: buf is null or tag's arena buffer of max_io bytes, >= io.len (checked by
        // decode); the tag was just marked busy, so this request is the only user of its
        // buffer and its fixed-buffer slot until its completion is drained below.
        let io = unsafe { Io::new(io, tag, buf, fixed, Rc::clone(&self.sink)) };
        let mut ctx = QueueCtx {
            q_id: self.q_id,
            geo: &self.geo,
            ring,
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

    /// Passes every completed request to `commit(tag, result)` and marks its tag free.
    pub(crate) fn drain(&mut self, mut commit: impl FnMut(u16, i32)) {
        self.sink.take_into(&mut self.scratch);
        while let Some(done) = self.shared.pop_remote() {
            self.scratch.push(done);
        }
        for (tag, res) in self.scratch.drain(..) {
            match self.busy.get_mut(usize::from(tag)) {
                Some(busy) if *busy => {
                    *busy = false;
                    commit(tag, res);
                }
                _ => tracing::error!(q = self.q_id, tag, "completion for a tag not in service"),
            }
        }
    }

    /// Number of requests the server holds.
    pub(crate) fn in_service(&self) -> usize {
        self.busy.iter().filter(|b| **b).count()
    }
}
