//! A simulated kernel queue: the same engine and target code as production, with descriptors
//! and data delivered from memory instead of by the ublk driver.
//!
//! For unit tests, fuzzing and the userspace-path benchmark. It plays the kernel's part: it
//! copies a write's data into the tag buffer, writes the tag's descriptor, hands the tag to
//! the dispatcher, and on commit copies a read's data out of the tag buffer. In user-copy
//! mode a sparse memfd stands in for the ublk char device: each tag's data sits at the
//! offset the driver would serve it at. The tests that
//! show a target works against the real driver run in the VM (`cargo xtask test`).
//!
//! ```
//! use ublk_core::io::{IoDesc, Op};
//! use ublk_core::sim::SimQueue;
//! # use ublk_core::{Geometry, Io, OpenCtx, QueueCtx, QueueTarget, Target};
//! # struct Zeroes;
//! # impl Target for Zeroes {
//! #     type Queue = Zeroes;
//! #     fn open_queue(&self, _: &mut OpenCtx<'_>) -> std::io::Result<Zeroes> { Ok(Zeroes) }
//! # }
//! # impl QueueTarget for Zeroes {
//! #     fn submit(&mut self, mut io: Io, _: &mut QueueCtx<'_>) {
//! #         if let Ok(buf) = io.data_mut() { buf.fill(0) }
//! #         io.complete_ok();
//! #     }
//! # }
//! let geo = ublk_core::Geometry { size: 1 << 20, logical_block_size: 512, max_io: 64 << 10 };
//! let mut q = SimQueue::new(&Zeroes, geo, 4).unwrap();
//! assert_eq!(q.read(4096, 512).unwrap(), vec![0; 512]);
//! ```

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::IoUring;
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::buf::{BufferMode, TagArena};
use crate::engine::Engine;
use crate::io::{Geometry, IoDesc, SECTOR_SIZE};
use crate::request::{user_copy, user_copy_offset, QueueShared};
use crate::stats::StatsRegistry;
use crate::sys;
use crate::target::{open_tree, Target};
use crate::user_data::Owner;

/// One commit the simulated kernel received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The tag.
    pub tag: u16,
    /// Bytes done, 0, or a negative errno.
    pub result: i32,
    /// For a successful read: the bytes the kernel would copy to the reader.
    pub data: Vec<u8>,
}

/// Why the simulator refused a request (a misuse of the simulator, not a target error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The tag is beyond the depth or still in service.
    #[error("tag {0} is out of range or busy")]
    TagUnavailable(u16),
    /// Every tag is in service.
    #[error("every tag is in service")]
    QueueFull,
    /// The write data does not fit the tag buffer.
    #[error("write data of {0} bytes exceeds the tag buffer")]
    DataTooLarge(usize),
    /// A request did not complete in time (a target that never answers).
    #[error("request on tag {0} did not complete")]
    Timeout(u16),
}

/// A simulated queue serving one target's queue half.
pub struct SimQueue<T: Target> {
    engine: Engine,
    _target: std::marker::PhantomData<fn(&T)>,
    /// A real io_uring for the operations the target pushes itself (e.g. file I/O).
    ring: IoUring,
    shared: Arc<QueueShared>,
    descs: Vec<IoDesc>,
    busy: Vec<bool>,
    geo: Geometry,
}

impl<T: Target> SimQueue<T> {
    /// Opens queue 0 of `target` with `depth` tags, in copy mode.
    pub fn new(target: &T, geo: Geometry, depth: u16) -> io::Result<Self> {
        Self::with_mode(target, geo, depth, BufferMode::Copy)
    }

    /// Opens queue 0 of `target` in buffer mode `mode`. The zero-copy modes need the
    /// kernel's pages and cannot be simulated (`Unsupported`).
    pub fn with_mode(target: &T, geo: Geometry, depth: u16, mode: BufferMode) -> io::Result<Self> {
        if mode.is_zero_copy() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the simulated queue has no kernel pages to register",
            ));
        }
        let cdev = if mode == BufferMode::UserCopy {
            Some(Arc::new(sparse_memfd()?))
        } else {
            None
        };
        let shared = QueueShared::new(TagArena::new(depth.max(1), geo.max_io)?, cdev, geo.size)?;
        shared.enter();
        let tree = open_tree(target, 0, &geo)?;
        let ring = IoUring::new((u32::from(depth.max(1)) * 2).next_power_of_two())?;
        if mode == BufferMode::Registered {
            let iovecs = shared.arena.iovecs();
            // SAFETY: the iovecs describe the arena, which `shared` keeps alive longer than
            // the ring (a field dropped after it).
            unsafe { ring.submitter().register_buffers(&iovecs)? };
        }
        Ok(SimQueue {
            _target: std::marker::PhantomData,
            engine: Engine::new(
                tree,
                Arc::clone(&shared),
                geo,
                0,
                (mode, !target.copies_data(), false),
            ),
            ring,
            shared,
            descs: vec![IoDesc::default(); usize::from(depth.max(1))],
            busy: vec![false; usize::from(depth.max(1))],
            geo,
        })
    }

    /// The queue's per-node counters, as [`crate::DeviceBuilder::stats`] gives them.
    pub fn stats(&self) -> StatsRegistry {
        let registry = StatsRegistry::new();
        registry.add(self.engine.stats());
        registry
    }

    /// The geometry requests are checked against.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// A tag not in service.
    pub fn free_tag(&self) -> Option<u16> {
        self.busy.iter().position(|b| !b).map(|t| t as u16)
    }

    /// Delivers `desc` on `tag` as the kernel would; `write_data` is copied into the tag
    /// buffer first (the kernel's copy of a write's pages; at most the buffer size).
    pub fn deliver(&mut self, tag: u16, desc: IoDesc, write_data: &[u8]) -> Result<(), SimError> {
        match self.busy.get(usize::from(tag)) {
            Some(false) => {}
            _ => return Err(SimError::TagUnavailable(tag)),
        }
        let arena = &self.shared.arena;
        if write_data.len() > arena.buf_len() {
            return Err(SimError::DataTooLarge(write_data.len()));
        }
        if let Some(cdev) = self.shared.cdev.as_deref() {
            // SAFETY: write_data is a live slice, only read by the pwrite.
            let stored = unsafe {
                user_copy(
                    cdev,
                    user_copy_offset(0, tag),
                    write_data.as_ptr().cast_mut(),
                    write_data.len(),
                    true,
                )
            };
            stored.map_err(|_| SimError::DataTooLarge(write_data.len()))?;
        } else {
            let buf = arena.buf_ptr(tag).expect("tag < depth checked above");
            // SAFETY: the tag is not in service, so no request owns its buffer; the buffer
            // holds buf_len >= write_data.len() bytes (checked); write_data cannot overlap
            // our arena.
            unsafe { std::ptr::copy_nonoverlapping(write_data.as_ptr(), buf, write_data.len()) };
        }
        self.descs[usize::from(tag)] = desc;
        self.busy[usize::from(tag)] = true;
        self.engine.dispatch(tag, desc, &mut self.ring);
        Ok(())
    }

    /// Submits what the target pushed and routes finished operations back to it.
    fn run_ring(&mut self) {
        // Only enter the kernel when the target pushed something; completions are read from
        // the shared ring memory without a syscall.
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                tracing::warn!("simulated queue ring: {e}");
            }
        }
        let events: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, res) in events {
            match Owner::of(user_data) {
                Owner::NodeOp(key) => self.engine.op_done(key, res, &mut self.ring),
                other => tracing::error!(?other, "unexpected completion on the simulated ring"),
            }
        }
    }

    /// Appends `(tag, result)` for every commit made so far, without copying read data out
    /// (what a benchmark of the server side wants); the tags become free.
    pub fn results_into(&mut self, out: &mut Vec<(u16, i32)>) {
        self.run_ring();
        let busy = &mut self.busy;
        self.engine.drain(&mut self.ring, |_, tag, res, _| {
            busy[usize::from(tag)] = false;
            out.push((tag, res));
        });
    }

    /// Collects every commit made so far.
    pub fn commits(&mut self) -> Vec<Commit> {
        self.run_ring();
        let mut done = Vec::new();
        self.engine
            .drain(&mut self.ring, |_, tag, res, _| done.push((tag, res)));
        done.into_iter()
            .map(|(tag, result)| {
                self.busy[usize::from(tag)] = false;
                let desc = self.descs[usize::from(tag)];
                let mut data = Vec::new();
                if desc.op_code() == sys::UBLK_IO_OP_READ && result > 0 {
                    let asked = u64::from(desc.nr_sectors) * SECTOR_SIZE;
                    let n = (result as u64).min(asked) as usize;
                    let n = n.min(self.shared.arena.buf_len());
                    data = vec![0; n];
                    if let Some(cdev) = self.shared.cdev.as_deref() {
                        let at = user_copy_offset(0, tag);
                        // SAFETY: `data` is a fresh Vec of n bytes, written by the pread.
                        let read = unsafe { user_copy(cdev, at, data.as_mut_ptr(), n, false) };
                        if let Err(e) = read {
                            tracing::warn!(tag, "simulated user copy: {e}");
                        }
                    } else {
                        let buf = self.shared.arena.buf_ptr(tag).expect("tag < depth");
                        // SAFETY: the tag was just committed, so no request owns its buffer;
                        // n <= buf_len bytes are readable; `data` is a fresh Vec.
                        unsafe { std::ptr::copy_nonoverlapping(buf, data.as_mut_ptr(), n) };
                    }
                }
                Commit { tag, result, data }
            })
            .collect()
    }

    /// Waits until `tag` is committed (a target may complete from another thread), up to
    /// `timeout`; other commits that arrive meanwhile are returned too, in `others`.
    pub fn wait_for(
        &mut self,
        tag: u16,
        timeout: Duration,
        others: &mut Vec<Commit>,
    ) -> Result<Commit, SimError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut found = None;
            for c in self.commits() {
                if c.tag == tag && found.is_none() {
                    found = Some(c);
                } else {
                    others.push(c);
                }
            }
            if let Some(c) = found {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(SimError::Timeout(tag));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Number of requests in service.
    pub fn in_service(&self) -> usize {
        self.busy.iter().filter(|b| **b).count()
    }

    fn run_one(
        &mut self,
        op: u8,
        flags: u32,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Commit, i32> {
        let tag = self.free_tag().ok_or(-libc::EBUSY)?;
        let desc = IoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors: len / SECTOR_SIZE as u32,
            start_sector: offset / SECTOR_SIZE,
            addr: 0,
        };
        self.deliver(tag, desc, data).map_err(|_| -libc::EBUSY)?;
        let mut others = Vec::new();
        let commit = self
            .wait_for(tag, Duration::from_secs(10), &mut others)
            .map_err(|_| -libc::ETIMEDOUT)?;
        if commit.result < 0 {
            return Err(commit.result);
        }
        Ok(commit)
    }

    /// Reads `len` bytes at `offset` (both multiples of 512) through the target.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
        self.run_one(sys::UBLK_IO_OP_READ, 0, offset, len, &[])
            .map(|c| c.data)
    }

    /// Writes `data` (a multiple of 512 bytes) at `offset` through the target.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<i32, i32> {
        let len = u32::try_from(data.len()).map_err(|_| -libc::EINVAL)?;
        self.run_one(sys::UBLK_IO_OP_WRITE, 0, offset, len, data)
            .map(|c| c.result)
    }

    /// Sends any op with any flags; returns the committed result.
    pub fn op(&mut self, op: u8, flags: u32, offset: u64, len: u32) -> Result<i32, i32> {
        self.run_one(op, flags, offset, len, &[]).map(|c| c.result)
    }
}

impl<T: Target> Drop for SimQueue<T> {
    fn drop(&mut self) {
        // The ring goes after the engine (field order): first let the nodes' operations end.
        self.engine.quiesce(&mut self.ring, Duration::from_secs(10));
    }
}

/// The stand-in for the ublk char device in user-copy mode: an empty memfd that grows
/// sparsely to the user-copy offsets.
fn sparse_memfd() -> io::Result<std::fs::File> {
    let fd = memfd_create(c"ublk-sim-cdev", MFdFlags::MFD_CLOEXEC)?;
    Ok(std::fs::File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::QueueCtx;
    use crate::request::Io;
    use crate::target::{OpenCtx, QueueTarget};

    /// Keeps writes in a Vec; completes reads from another thread to exercise RemoteIo.
    struct Mem(std::sync::Mutex<Vec<u8>>);
    struct MemQ(Arc<Mem>);

    impl Target for Arc<Mem> {
        type Queue = MemQ;
        fn open_queue(&self, _: &mut OpenCtx<'_>) -> io::Result<MemQ> {
            Ok(MemQ(Arc::clone(self)))
        }
    }

    impl QueueTarget for MemQ {
        fn submit(&mut self, io: Io, _: &mut QueueCtx<'_>) {
            let off = io.offset() as usize;
            match io.op() {
                crate::Op::Write => {
                    let data = io.data().expect("copy mode holds the bytes").to_vec();
                    self.0 .0.lock().unwrap()[off..off + data.len()].copy_from_slice(&data);
                    io.complete_ok();
                }
                crate::Op::Read => {
                    let mem = Arc::clone(&self.0);
                    let mut remote = io.into_remote();
                    std::thread::spawn(move || {
                        let n = remote.len() as usize;
                        remote
                            .data_mut()
                            .expect("copy mode holds the bytes")
                            .copy_from_slice(&mem.0.lock().unwrap()[off..off + n]);
                        remote.complete_ok();
                    });
                }
                crate::Op::Flush => panic!("flush panics on purpose"),
                _ => drop(io),
            }
        }
    }

    fn queue() -> SimQueue<Arc<Mem>> {
        let geo = Geometry {
            size: 1 << 20,
            logical_block_size: 512,
            max_io: 64 << 10,
        };
        SimQueue::new(
            &Arc::new(Mem(std::sync::Mutex::new(vec![0; 1 << 20]))),
            geo,
            4,
        )
        .expect("sim queue")
    }

    #[test]
    fn data_round_trips_through_local_and_remote_completions() {
        let mut q = queue();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(q.write(4096, &data), Ok(8192));
        assert_eq!(q.read(4096, 8192), Ok(data));
        assert_eq!(q.in_service(), 0);
    }

    #[test]
    fn every_answered_request_is_timed_once_and_nothing_stays_in_flight() {
        let mut q = queue();
        let stats = q.stats();
        for i in 0..10u64 {
            assert_eq!(q.write(i * 512, &[1; 512]), Ok(512));
        }
        assert_eq!(q.read(0, 1024).map(|d| d.len()), Ok(1024));
        // Rejected before the target: neither counted nor timed.
        assert!(q.op(sys::UBLK_IO_OP_READ, 0, 1 << 20, 512).is_err());
        let root = &stats.snapshot()[0];
        assert_eq!((root.writes, root.reads, root.write_bytes), (10, 1, 5120));
        assert_eq!(root.latency.count(), 11);
        assert_eq!(root.in_flight(), 0);
        assert!(root.latency.percentile(0.999).is_some());
    }

    #[test]
    fn panics_and_dropped_requests_fail_with_eio_and_free_the_tag() {
        let mut q = queue();
        assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Err(-libc::EIO));
        assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, 0, 512), Err(-libc::EIO));
        assert_eq!(q.in_service(), 0);
        assert_eq!(q.write(0, &[7; 512]), Ok(512));
    }

    #[test]
    fn bad_requests_are_answered_without_reaching_the_target() {
        let mut q = queue();
        assert_eq!(
            q.op(sys::UBLK_IO_OP_READ, 0, 1 << 20, 512),
            Err(-libc::EINVAL)
        );
        assert_eq!(q.op(99, 0, 0, 512), Err(-libc::EOPNOTSUPP));
        assert_eq!(
            q.deliver(9, IoDesc::default(), &[]),
            Err(SimError::TagUnavailable(9))
        );
    }

    /// Holds every request until the turn's end, then answers each with the number of
    /// requests the turn held.
    struct Gather {
        held: Vec<Io>,
        turns: Arc<std::sync::Mutex<Vec<u32>>>,
    }

    struct Turns(Arc<std::sync::Mutex<Vec<u32>>>);

    impl Target for Turns {
        type Queue = Gather;
        fn open_queue(&self, _: &mut OpenCtx<'_>) -> io::Result<Gather> {
            Ok(Gather {
                held: Vec::new(),
                turns: Arc::clone(&self.0),
            })
        }
    }

    impl QueueTarget for Gather {
        fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
            if self.held.is_empty() {
                ctx.at_turn_end(7);
            }
            self.held.push(io);
        }
        fn complete(&mut self, done: crate::target::Completion, _: &mut QueueCtx<'_>) {
            assert_eq!((done.token, done.result), (7, 0));
            let n = self.held.len() as u32;
            self.turns.lock().unwrap().push(n);
            for io in self.held.drain(..) {
                io.complete(n as i32 * 512);
            }
        }
    }

    #[test]
    fn the_turn_end_comes_after_every_request_of_the_turn() {
        let turns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let geo = Geometry {
            size: 1 << 20,
            logical_block_size: 512,
            max_io: 64 << 10,
        };
        let mut q = SimQueue::new(&Turns(Arc::clone(&turns)), geo, 4).expect("sim queue");
        let write = |i: u64| IoDesc {
            op_flags: u32::from(sys::UBLK_IO_OP_WRITE),
            nr_sectors: 1,
            start_sector: i,
            addr: 0,
        };
        for tag in 0..3u16 {
            q.deliver(tag, write(u64::from(tag)), &[0; 512])
                .expect("deliver");
        }
        let answers: Vec<(u16, i32)> = q.commits().iter().map(|c| (c.tag, c.result)).collect();
        assert_eq!(answers.len(), 3);
        assert!(answers.iter().all(|&(_, r)| r == 3 * 512), "{answers:?}");
        assert_eq!(q.write(0, &[0; 512]), Ok(512), "a turn of one request");
        assert_eq!(*turns.lock().unwrap(), vec![3, 1]);
    }
}
