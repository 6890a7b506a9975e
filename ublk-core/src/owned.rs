//! The owned-buffer API: one method per operation, FUSE style.
//!
//! Implement [`BlockDevice`] for the operations you serve (the rest answer `-EOPNOTSUPP`) and
//! run it with [`crate::DeviceBuilder::run`] wrapped in [`Owned`]. Each call gets a reply value
//! that is `Send`: answer on the spot, or move it to another thread and answer there. A reply
//! dropped unanswered fails the I/O with `-EIO`.

use std::io;
use std::sync::Arc;

use crate::ctx::QueueCtx;
use crate::io::Op;
use crate::request::{Io, RemoteIo};
use crate::target::{OpenCtx, QueueTarget, Target};

/// A block device with one method per request type. Offsets and lengths are in bytes and
/// already checked against the device size.
pub trait BlockDevice: Send + Sync + 'static {
    /// Read `len` bytes at `offset` and answer with [`ReadReply::data`].
    fn read(&self, offset: u64, len: u32, reply: ReadReply) {
        let _ = (offset, len);
        reply.error(libc::EOPNOTSUPP);
    }

    /// Store `data` at `offset`; with `fua`, it must be durable before answering. `data` is
    /// valid for this call only: copy what you keep.
    fn write(&self, offset: u64, data: &[u8], fua: bool, reply: Reply) {
        let _ = (offset, data, fua);
        reply.error(libc::EOPNOTSUPP);
    }

    /// Make every completed write durable.
    fn flush(&self, reply: Reply) {
        reply.error(libc::EOPNOTSUPP);
    }

    /// The range's contents are no longer needed.
    fn discard(&self, offset: u64, len: u32, reply: Reply) {
        let _ = (offset, len);
        reply.error(libc::EOPNOTSUPP);
    }

    /// The range must read back as zeroes; `unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, reply: Reply) {
        let _ = (offset, len, unmap);
        reply.error(libc::EOPNOTSUPP);
    }
}

/// The answer to a request without data to return.
#[must_use = "answer the request; dropping the reply fails it with -EIO"]
#[derive(Debug)]
pub struct Reply(RemoteIo);

impl Reply {
    /// Success.
    pub fn ok(self) {
        self.0.complete_ok();
    }

    /// Failure with a positive errno, e.g. `libc::EIO`.
    pub fn error(self, errno: i32) {
        self.0.fail(errno);
    }
}

/// The answer to a read.
#[must_use = "answer the request; dropping the reply fails it with -EIO"]
#[derive(Debug)]
pub struct ReadReply(RemoteIo);

impl ReadReply {
    /// Answers with `bytes`: the first `len` are returned; if fewer, the rest reads as zeroes.
    pub fn data(mut self, bytes: &[u8]) {
        let buf = self.buffer();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        buf[n..].fill(0);
        self.0.complete_ok();
    }

    /// The request's own buffer, to fill in place before [`ReadReply::ok`].
    pub fn buffer(&mut self) -> &mut [u8] {
        self.0
            .data_mut()
            .expect("an Owned target needs data, so every read has a server buffer")
    }

    /// Success, with the data already in [`ReadReply::buffer`].
    pub fn ok(self) {
        self.0.complete_ok();
    }

    /// Failure with a positive errno.
    pub fn error(self, errno: i32) {
        self.0.fail(errno);
    }
}

/// Adapts a [`BlockDevice`] into a [`Target`] for [`crate::DeviceBuilder::run`].
#[derive(Debug)]
pub struct Owned<D>(Arc<D>);

impl<D: BlockDevice> Owned<D> {
    /// Wraps `device`.
    pub fn new(device: D) -> Self {
        Owned(Arc::new(device))
    }
}

impl<D: BlockDevice> Target for Owned<D> {
    type Queue = OwnedQueue<D>;

    fn open_queue(&self, _ctx: &mut OpenCtx<'_>) -> io::Result<Self::Queue> {
        Ok(OwnedQueue(Arc::clone(&self.0)))
    }
}

/// The per-queue half of [`Owned`].
#[derive(Debug)]
pub struct OwnedQueue<D>(Arc<D>);

impl<D: BlockDevice> QueueTarget for OwnedQueue<D> {
    fn submit(&mut self, io: Io, _ctx: &mut QueueCtx<'_>) {
        let req = io.block_io();
        let io = io.into_remote();
        match req.op {
            Op::Read => self.0.read(req.offset, req.len, ReadReply(io)),
            Op::Write => {
                let (ptr, len) = match io.data() {
                    Ok(data) => (data.as_ptr(), data.len()),
                    Err(e) => {
                        tracing::error!("owned target without the write's bytes: {e}");
                        return io.fail(libc::EIO);
                    }
                };
                // The bytes are this request's buffer, valid and unchanged until the request
                // is committed. Commits are issued only by this queue thread after `submit`
                // returns, even when the reply is answered (on any thread) during the call.
                // SAFETY: so the slice outlives its use in `write` (above).
                let data = unsafe { std::slice::from_raw_parts(ptr, len) };
                self.0.write(req.offset, data, req.flags.fua(), Reply(io));
            }
            Op::Flush => self.0.flush(Reply(io)),
            Op::Discard => self.0.discard(req.offset, req.len, Reply(io)),
            Op::WriteZeroes => {
                self.0
                    .write_zeroes(req.offset, req.len, !req.flags.no_unmap(), Reply(io))
            }
        }
    }
}
