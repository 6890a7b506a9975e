//! The RBD target: a Ceph RBD image served as a block device, through librbd's asynchronous
//! API (built with the cargo feature `rbd`; needs `librbd-dev` and `librados-dev` to build
//! and `librbd1`/`librados2` to run).
//!
//! All queues share one image handle; each queue has its own completion list and eventfd
//! ([`ffi::AioQueue`]), polls that eventfd on its own io_uring ([`QueueCtx::poll_readable`])
//! and collects every finished request in one batch when it fires — no thread of ours per
//! request. Read → `rbd_aio_readv`, write → `rbd_aio_writev` (FUA: then `rbd_aio_flush`),
//! flush → `rbd_aio_flush`, discard → `rbd_aio_discard`, write-zeroes →
//! `rbd_aio_write_zeroes`. Request bytes are copied once between the request and a buffer the
//! queue lends librbd for the request's lifetime.
//!
//! A snapshot (`snap=`) maps read-only: writes fail with `EROFS`.

pub mod ffi;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use slab::Slab;
use ublk_zc::{Completion, Io, Op, OpenCtx, QueueCtx, QueueFile, QueueTarget, Target};

pub use ffi::{AioDone, AioOp, AioQueue, Cluster, ConnectOptions, Image, IoCtx};

/// Where an image is and how to reach its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// A snapshot to map (read-only) instead of the image's head.
    pub snap: Option<String>,
    /// The Ceph configuration file; `None` for Ceph's default places.
    pub conf: Option<PathBuf>,
    /// The client id (`admin`).
    pub id: String,
    /// How long connecting may take before failing.
    pub timeout: Duration,
}

/// The default connection timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl RbdSpec {
    /// `POOL/IMAGE` or `POOL/IMAGE@SNAP` with the default client, configuration and timeout.
    pub fn parse(text: &str) -> Result<RbdSpec, String> {
        let (pool, rest) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: expected POOL/IMAGE"))?;
        let (image, snap) = match rest.split_once('@') {
            Some((image, snap)) => (image, Some(snap)),
            None => (rest, None),
        };
        if pool.is_empty() || image.is_empty() || snap.is_some_and(str::is_empty) {
            return Err(format!("{text:?}: expected POOL/IMAGE or POOL/IMAGE@SNAP"));
        }
        Ok(RbdSpec::new(pool, image, snap))
    }

    /// An image (at a snapshot if given) with the default client, configuration and timeout.
    pub fn new(pool: &str, image: &str, snap: Option<&str>) -> RbdSpec {
        RbdSpec {
            pool: pool.into(),
            image: image.into(),
            snap: snap.map(Into::into),
            conf: None,
            id: "admin".into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A device backed by an RBD image.
#[derive(Debug, Clone)]
pub struct Rbd {
    image: Arc<Image>,
    size: u64,
    read_only: bool,
}

impl Rbd {
    /// Connects to the cluster and opens the image. Errors name what failed: the monitors
    /// unreachable within the timeout, the pool or image missing, permission denied.
    ///
    /// SIGINT and SIGTERM are blocked in the calling thread while the threads of librados
    /// and librbd are started, so those threads never take the signals that a server waits
    /// for (on a signalfd, with them blocked in its own threads).
    pub fn open(spec: &RbdSpec) -> io::Result<Rbd> {
        let _blocked = TermSignalsBlocked::new()?;
        let cluster = Cluster::connect(&ConnectOptions {
            conf: spec.conf.as_deref(),
            id: &spec.id,
            timeout: spec.timeout,
            // Discard exactly: a discarded range reads back as zeroes, even in part of an
            // object (by default librbd skips partial-object discards).
            options: &[("rbd_skip_partial_discard", "false")],
        })?;
        let ioctx = IoCtx::new(&cluster, &spec.pool)?;
        let image = Image::open(&ioctx, &spec.image, spec.snap.as_deref())?;
        let size = image.size()?;
        Ok(Rbd {
            image,
            size,
            read_only: spec.snap.is_some(),
        })
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the device must be read-only (a snapshot).
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

impl Target for Rbd {
    type Queue = RbdQueue;

    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<RbdQueue> {
        if ctx.node().index() == 0 && ctx.geometry().size > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the device is larger than its image",
            ));
        }
        Ok(RbdQueue {
            aio: AioQueue::new(&self.image)?,
            eventfd: None,
            polling: false,
            ios: Slab::new(),
            spare: Vec::new(),
        })
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    /// Bytes move only with [`Io::copy_data_to`] and [`Io::copy_data_from`].
    fn copies_data(&self) -> bool {
        true
    }

    /// `rbd_read`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        crate::check_range(offset, buf.len(), self.size)?;
        self.image.read(offset, buf)
    }

    /// `rbd_write` then `rbd_flush`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        crate::check_range(offset, buf.len(), self.size)?;
        self.image.write(offset, buf)?;
        self.image.flush()
    }
}

/// SIGINT and SIGTERM blocked in the calling thread (and the threads it starts) while alive.
struct TermSignalsBlocked {
    old: SigSet,
}

impl TermSignalsBlocked {
    fn new() -> io::Result<TermSignalsBlocked> {
        let mut old = SigSet::empty();
        let set = Signal::SIGINT | Signal::SIGTERM;
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))?;
        Ok(TermSignalsBlocked { old })
    }
}

impl Drop for TermSignalsBlocked {
    fn drop(&mut self) {
        // Restoring the mask saved by `new` cannot fail.
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }
}

/// A request in librbd's hands, and what its completion must still do.
#[derive(Debug)]
struct InFlight {
    io: Io,
    /// A FUA write whose data is written: its flush is running.
    flushing: bool,
}

/// The token of the eventfd poll (request tokens are slab keys, far below it).
const POLL: u64 = u64::MAX;

/// Spare buffers a queue keeps for reuse.
const SPARE_BUFFERS: usize = 64;

/// One queue of an [`Rbd`].
#[derive(Debug)]
pub struct RbdQueue {
    aio: AioQueue,
    /// The eventfd as this queue's ring names it, settled on first use.
    eventfd: Option<QueueFile>,
    /// Whether a poll on the eventfd is armed.
    polling: bool,
    ios: Slab<InFlight>,
    spare: Vec<Vec<u8>>,
}

impl RbdQueue {
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        buf
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() > 0 && self.spare.len() < SPARE_BUFFERS {
            self.spare.push(buf);
        }
    }

    /// Starts `op` for the request at `key`; fails it if librbd refuses.
    fn start(&mut self, key: usize, op: AioOp, offset: u64, buf: Vec<u8>) {
        if let Err((errno, buf)) = self.aio.submit(op, offset, buf, key as u64) {
            self.recycle(buf);
            let entry = self.ios.remove(key);
            tracing::warn!("rbd: librbd refused a request: errno {errno}");
            entry.io.complete(errno);
        }
    }

    /// Keeps a poll armed on the eventfd while requests are in flight.
    fn arm(&mut self, ctx: &mut QueueCtx<'_>) {
        if self.polling || self.aio.in_flight() == 0 {
            return;
        }
        let aio = &self.aio;
        let file = self
            .eventfd
            .get_or_insert_with(|| ctx.file(aio.eventfd()))
            .clone();
        ctx.poll_readable(&file, POLL);
        self.polling = true;
    }

    fn finish(&mut self, done: AioDone) {
        let key = done.token as usize;
        if !self.ios.contains(key) {
            tracing::error!(token = done.token, "rbd: a completion for no request");
            return self.recycle(done.buf);
        }
        let result = i32::try_from(done.result).unwrap_or(-libc::EIO);
        if result < 0 {
            self.recycle(done.buf);
            return self.ios.remove(key).io.complete(result);
        }
        let entry = &mut self.ios[key];
        match entry.io.op() {
            Op::Read => {
                let mut entry = self.ios.remove(key);
                match entry.io.copy_data_from(0, &done.buf) {
                    Ok(()) => entry.io.complete_ok(),
                    Err(e) => {
                        tracing::error!("rbd: cannot copy a read into its request: {e}");
                        entry.io.fail(libc::EIO)
                    }
                }
                self.recycle(done.buf);
            }
            Op::Write if entry.io.flags().fua() && !entry.flushing => {
                entry.flushing = true;
                self.recycle(done.buf);
                self.start(key, AioOp::Flush, 0, Vec::new());
            }
            _ => {
                self.recycle(done.buf);
                self.ios.remove(key).io.complete_ok();
            }
        }
    }
}

impl QueueTarget for RbdQueue {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let (offset, len) = (io.offset(), io.len());
        let op = match io.op() {
            Op::Read => AioOp::Read,
            Op::Write => AioOp::Write,
            Op::Flush => AioOp::Flush,
            Op::Discard => AioOp::Discard(u64::from(len)),
            Op::WriteZeroes => AioOp::WriteZeroes {
                len: u64::from(len),
                thick: io.flags().no_unmap(),
            },
            _ => return io.fail(libc::EOPNOTSUPP),
        };
        let buf = match op {
            AioOp::Read => self.buffer(len as usize),
            AioOp::Write => {
                let mut buf = self.buffer(len as usize);
                if let Err(e) = io.copy_data_to(0, &mut buf) {
                    tracing::error!("rbd: cannot copy a write's data: {e}");
                    self.recycle(buf);
                    return io.fail(libc::EIO);
                }
                buf
            }
            _ => Vec::new(),
        };
        let key = self.ios.insert(InFlight {
            io,
            flushing: false,
        });
        self.start(key, op, offset, buf);
        self.arm(ctx);
    }

    fn complete(&mut self, done: Completion, ctx: &mut QueueCtx<'_>) {
        if done.token != POLL {
            tracing::error!(token = done.token, "rbd: an unexpected completion");
            return;
        }
        self.polling = false;
        if done.result < 0 {
            tracing::warn!(
                "rbd: polling the completion eventfd: errno {}",
                -done.result
            );
        }
        for finished in self.aio.reap() {
            self.finish(finished);
        }
        self.arm(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_pool_image_and_snapshot() {
        let s = RbdSpec::parse("rbd/disk").unwrap();
        assert_eq!(
            (s.pool.as_str(), s.image.as_str(), s.snap),
            ("rbd", "disk", None)
        );
        let s = RbdSpec::parse("p/i@snap1").unwrap();
        assert_eq!(s.snap.as_deref(), Some("snap1"));
        assert_eq!(s.id, "admin");
        for bad in ["disk", "/disk", "rbd/", "rbd/disk@"] {
            assert!(RbdSpec::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn unreachable_monitors_fail_within_the_timeout() {
        let dir = std::env::temp_dir().join(format!("ublk-rbd-unreach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("ceph.conf");
        // Nothing listens on port 9 of loopback; auth none so no keyring is looked for.
        std::fs::write(
            &conf,
            "[global]\nmon_host = v2:127.0.0.1:9\nauth_client_required = none\n\
             ms_bind_msgr1 = false\n",
        )
        .unwrap();
        let mut spec = RbdSpec::parse("rbd/disk").unwrap();
        spec.conf = Some(conf);
        spec.timeout = Duration::from_secs(2);
        let start = std::time::Instant::now();
        let err = Rbd::open(&spec).expect_err("no monitor there");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        let msg = err.to_string();
        assert!(msg.contains("no Ceph monitor answered within 2 s"), "{msg}");
        assert!(msg.contains("127.0.0.1:9"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
