//! The null target: completes every request at once without touching data, like the kernel's
//! null_blk. Reads return whatever the tag buffer held. The benchmark baseline.

use std::io;

use ublk_zc::{Io, OpenCtx, QueueCtx, QueueTarget, Target};

/// A device that stores nothing; `size` is what it reports as a child in a stack.
#[derive(Debug, Default, Clone, Copy)]
pub struct Null {
    size: Option<u64>,
}

impl Null {
    /// A null device of `size` bytes (the size matters only as a child in a stack).
    pub fn with_size(size: u64) -> Self {
        Null { size: Some(size) }
    }
}

impl Target for Null {
    type Queue = Null;

    fn open_queue(&self, _ctx: &mut OpenCtx<'_>) -> io::Result<Null> {
        Ok(*self)
    }

    fn size(&self) -> Option<u64> {
        self.size
    }

    fn needs_data(&self) -> bool {
        false
    }

    /// Never touches the bytes, so user-copy mode needs no staging.
    fn copies_data(&self) -> bool {
        true
    }

    /// Reads zeroes.
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }

    /// Stores nothing.
    fn write_at(&self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

impl QueueTarget for Null {
    fn submit(&mut self, io: Io, _ctx: &mut QueueCtx<'_>) {
        io.complete_ok();
    }
}
