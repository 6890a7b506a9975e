//! The null target: completes every request at once without touching data, like the kernel's
//! null_blk. Reads return whatever the tag buffer held. The benchmark baseline.

use std::io;

use ublk_zc::{Geometry, Io, QueueCtx, QueueTarget, Target};

/// A device that stores nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Null;

impl Target for Null {
    type Queue = Null;

    fn open_queue(&self, _q_id: u16, _geo: &Geometry) -> io::Result<Null> {
        Ok(Null)
    }

    fn needs_data(&self) -> bool {
        false
    }

    /// Never touches the bytes, so user-copy mode needs no staging.
    fn copies_data(&self) -> bool {
        true
    }
}

impl QueueTarget for Null {
    fn submit(&mut self, io: Io, _ctx: &mut QueueCtx<'_>) {
        io.complete_ok();
    }
}
