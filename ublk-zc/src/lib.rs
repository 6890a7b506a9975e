//! # ublk-zc
//!
//! The borrowed-buffer API of ublk-rs: a target receives each request as an [`Io`] that lends
//! its data (`&[u8]` for a write, `&mut [u8]` for a read) for exactly as long as the request
//! lives, and completes it by consuming it — at once, later on the same queue thread, or from
//! another thread through [`Io::into_remote`]. Nothing is copied between the kernel's buffer
//! and the target beyond what the target itself does.
//!
//! Targets are block backends ([`Target`] + [`QueueTarget`]) that other targets can own as
//! children, so they compose into stacks.
//!
//! ```no_run
//! use ublk_zc::{DeviceBuilder, Geometry, Io, QueueCtx, QueueTarget, Target};
//!
//! /// Every read returns 0xAB; writes are accepted and dropped.
//! struct Pattern;
//!
//! impl Target for Pattern {
//!     type Queue = Pattern;
//!     fn open_queue(&self, _q: u16, _geo: &Geometry) -> std::io::Result<Pattern> {
//!         Ok(Pattern)
//!     }
//! }
//!
//! impl QueueTarget for Pattern {
//!     fn submit(&mut self, mut io: Io, _ctx: &mut QueueCtx<'_>) {
//!         // Fills a read; for a write it overwrites the data, which this target drops anyway.
//!         io.data_mut().fill(0xAB);
//!         io.complete_ok();
//!     }
//! }
//!
//! DeviceBuilder::new().size(1 << 30).run(Pattern)?;
//! # Ok::<(), ublk_zc::Error>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub use ublk_core::io::{BlockIo, Geometry, IoFlags, Op};
pub use ublk_core::mmap::Mapping;
pub use ublk_core::{BufferMode, FixedBuf};
pub use ublk_core::{
    DeviceBuilder, DeviceInfo, Error, Io, QueueCtx, QueueTarget, RemoteIo, Target,
};
