//! # ublk-zc
//!
//! The borrowed-buffer, zero-copy API of ublk-rs: targets that serve requests without
//! copying them, and that stack. A target receives each request as an [`Io`] that views the
//! request's memory in whatever form the buffer mode gives it — a range of the tag buffer, a
//! fixed buffer of the queue's io_uring (with kernel zero-copy, the kernel's own pages), or a
//! range of the ublk char device — and either reaches the bytes (`data()`, `data_mut()`, the
//! copy methods) or only passes them on:
//! - to a file, with the queue's safe operations ([`QueueCtx::read`], [`QueueCtx::write`],
//!   [`QueueCtx::fsync`], [`QueueCtx::fallocate`]), which keep the request alive until the
//!   kernel is done and hand it back as a [`Completion`];
//! - to child targets: [`QueueCtx::forward`] (as is, or readdressed with [`Io::set_offset`]),
//!   [`QueueCtx::fan_out`] (split over children and joined by the engine: all must succeed,
//!   first error wins), or [`Io::sub`] + [`QueueCtx::send`] with a rule of the node's own (the
//!   result comes back as a [`Completion`], with the failed request ready to retry);
//! - or over memory of its own: [`Bounce`] buffers lent to children with
//!   [`QueueCtx::bounce_io`].
//!
//! Work done on other threads comes back through the engine: an [`Io`] completed from anywhere
//! with [`Io::into_remote`], or a [`Notifier`] that wakes the queue thread and delivers a
//! [`Completion`] to the node (a compression worker handing back a block).
//!
//! No operation needs `unsafe`. A tree where no node touches the bytes runs in the zero-copy
//! buffer modes ([`zero_copy_allowed`]); the engine refuses a zero-copy mode for a tree that
//! cannot honour it.
//!
//! The request, node and operation types live in `ublk-core`, because its engine runs them
//! (commits, joins, completion routing); this crate is the API a target author reads — their
//! re-exports — plus what only nodes with children need and the engine does not: [`Joins`],
//! the bookkeeping of a node with its own join rule (a mirror), and the subtree answers
//! ([`needs_data_any`], [`copies_data_all`], [`smallest_size`]).
//!
//! ```no_run
//! use std::io;
//! use ublk_zc::{BoxTarget, Child, DeviceBuilder, DynTarget, Io, OpenCtx, QueueCtx,
//!               QueueTarget, Target};
//!
//! /// The second half of a child device, as a device of its own.
//! struct SecondHalf(BoxTarget);
//! struct SecondHalfQueue { child: Child, half: u64 }
//!
//! impl Target for SecondHalf {
//!     type Queue = SecondHalfQueue;
//!     fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<SecondHalfQueue> {
//!         let half = self.size().unwrap_or(0);
//!         Ok(SecondHalfQueue { child: ctx.open_child(&*self.0)?, half })
//!     }
//!     fn size(&self) -> Option<u64> { self.0.dyn_size().map(|s| s / 2) }
//!     fn needs_data(&self) -> bool { self.0.dyn_needs_data() }
//!     fn copies_data(&self) -> bool { self.0.dyn_copies_data() }
//! }
//!
//! impl QueueTarget for SecondHalfQueue {
//!     fn submit(&mut self, mut io: Io, ctx: &mut QueueCtx<'_>) {
//!         match io.set_offset(io.offset() + self.half) {
//!             Ok(()) => ctx.forward(self.child, io),
//!             Err(_) => io.fail(libc::EINVAL),
//!         }
//!     }
//! }
//! # struct Sink;
//! # impl Target for Sink {
//! #     type Queue = Sink;
//! #     fn open_queue(&self, _: &mut OpenCtx<'_>) -> io::Result<Sink> { Ok(Sink) }
//! #     fn size(&self) -> Option<u64> { Some(1 << 30) }
//! #     fn needs_data(&self) -> bool { false }
//! # }
//! # impl QueueTarget for Sink {
//! #     fn submit(&mut self, io: Io, _: &mut QueueCtx<'_>) { io.complete_ok() }
//! # }
//! # fn child() -> BoxTarget { std::sync::Arc::new(Sink) }
//! let dev = SecondHalf(child());
//! DeviceBuilder::new().size(dev.size().unwrap_or(0)).run(dev)?;
//! # Ok::<(), ublk_zc::Error>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub use ublk_core::io::{BlockIo, Geometry, IoFlags, Op};
pub use ublk_core::mmap::Mapping;
pub use ublk_core::stats;
pub use ublk_core::{Bounce, BufferMode, FixedBuf};
pub use ublk_core::{
    BoxTarget, Child, Completion, DeviceBuilder, DeviceInfo, DynTarget, Error, FanOut, Io, NodeId,
    NodeStats, Notifier, OpenCtx, QueueCtx, QueueFile, QueueTarget, RemoteIo, StatsRegistry, SubIo,
    Target,
};

mod joins;
pub use joins::{Joins, Verdict};

/// Whether a tree whose nodes need data as `children` say may run in a zero-copy mode: only
/// when none of them touches the bytes. What a node with children answers from
/// [`Target::needs_data`].
pub fn needs_data_any<'a>(children: impl IntoIterator<Item = &'a BoxTarget>) -> bool {
    children.into_iter().any(|c| c.dyn_needs_data())
}

/// Whether every child moves bytes only with the copy methods (so user-copy mode needs no
/// staging): what a node with children answers from [`Target::copies_data`].
pub fn copies_data_all<'a>(children: impl IntoIterator<Item = &'a BoxTarget>) -> bool {
    children.into_iter().all(|c| c.dyn_copies_data())
}

/// Whether `target` can be served in `mode`: the zero-copy modes need a tree in which no
/// node touches the bytes.
pub fn zero_copy_allowed(target: &dyn DynTarget, mode: BufferMode) -> bool {
    !mode.is_zero_copy() || !target.dyn_needs_data()
}

/// The smallest of the children's sizes, or `None` if one does not know its size.
pub fn smallest_size<'a>(children: impl IntoIterator<Item = &'a BoxTarget>) -> Option<u64> {
    children
        .into_iter()
        .map(|c| c.dyn_size())
        .try_fold(u64::MAX, |min, s| s.map(|s| min.min(s)))
}
