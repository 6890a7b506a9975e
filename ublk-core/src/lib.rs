//! # ublk-core
//!
//! The foundation of ublk-rs: Linux block devices served from user space through the kernel's
//! ublk driver. This crate holds the kernel interface ([`sys`]), the control plane
//! ([`ControlDevice`]), the per-queue io_uring engine, the block-backend interface targets
//! implement ([`Target`], [`QueueTarget`], [`Io`]) — including how targets stack: child
//! nodes ([`OpenCtx::open_child`]), sub-requests and joins ([`Io::sub`],
//! [`QueueCtx::fan_out`], [`QueueCtx::send`]), safe file operations on the queue's ring —
//! and the convenient owned-buffer API ([`BlockDevice`]). Target authors read the same
//! interface through `ublk-zc`.
//!
//! ```no_run
//! use ublk_core::{BlockDevice, DeviceBuilder, ReadReply, Reply};
//!
//! /// A 1 GiB device that reads as zeroes and accepts (and forgets) writes.
//! struct Sink;
//!
//! impl BlockDevice for Sink {
//!     fn read(&self, _offset: u64, len: u32, reply: ReadReply) {
//!         reply.data(&vec![0; len as usize]);
//!     }
//!     fn write(&self, _offset: u64, _data: &[u8], _fua: bool, reply: Reply) {
//!         reply.ok();
//!     }
//! }
//!
//! DeviceBuilder::new().size(1 << 30).run(ublk_core::Owned::new(Sink))?;
//! # Ok::<(), ublk_core::Error>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod batch;
pub mod buf;
pub mod check;
pub mod ctrl;
pub mod ctx;
pub mod device;
mod engine;
pub mod error;
pub mod io;
pub mod mmap;
pub mod owned;
pub mod params;
mod pod;
mod queue;
pub mod request;
pub mod sim;
pub mod stats;
pub mod sys;
pub mod target;
mod user_data;

pub use buf::{Bounce, BufferMode, FixedBuf};
pub use ctrl::{feature_names, ControlDevice, DevInfo};
pub use ctx::{FanOut, QueueCtx, QueueFile};
pub use device::{DeviceBuilder, DeviceInfo, QuiesceHandle, SizeHandle};
pub use error::{Error, Result};
pub use io::{BlockIo, Geometry, IoFlags, Op};
pub use owned::{BlockDevice, Owned, ReadReply, Reply};
pub use params::{parse_size, DeviceParams};
pub use request::{Io, NodeId, Notifier, RemoteIo, SubIo};
pub use stats::{Histogram, NodeStats, QueueSnapshot, StatsRegistry};
pub use target::{BoxTarget, Child, Completion, DynTarget, OpenCtx, QueueTarget, Target};
