//! One queue served by the kernel: its descriptor array, its io_uring, and the loop that
//! fetches requests and commits results, per tag or (`UBLK_F_BATCH_IO`) in batches through
//! [`crate::batch`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use crate::batch::{BatchIo, ElemLayout};
use crate::buf::BufferMode;
use crate::ctx::push_sqe;
use crate::engine::Engine;
use crate::io::{Geometry, IoDesc};
use crate::mmap::{page_size, round_up, Mapping};
use crate::pod;
use crate::request::QueueShared;
use crate::stats::StatsRegistry;
use crate::sys;
use crate::target::{open_tree, Target};
use crate::user_data::Owner;

/// Size of one descriptor in the kernel's array.
const DESC_SIZE: usize = std::mem::size_of::<sys::ublksrv_io_desc>();
/// Per-queue stride of the descriptor area: sized for the largest depth.
const MAX_DEPTH: usize = 4096;

/// The kernel's read-only array of request descriptors for one queue.
pub(crate) struct DescArray {
    map: Mapping,
    q_id: u16,
    depth: u16,
}

impl DescArray {
    /// Maps queue `q_id`'s descriptors of `/dev/ublkcN`.
    pub(crate) fn map(cdev: &File, q_id: u16, depth: u16) -> io::Result<Self> {
        let page = page_size();
        let stride = round_up(MAX_DEPTH * DESC_SIZE, page).expect("constant fits");
        let len = round_up(usize::from(depth) * DESC_SIZE, page).expect("depth <= 4096");
        let offset = (usize::from(q_id) * stride) as u64;
        Ok(DescArray {
            map: Mapping::shared_read_only(cdev.as_fd(), len, offset)?,
            q_id,
            depth,
        })
    }

    /// The queue these descriptors belong to.
    pub(crate) fn q_id(&self) -> u16 {
        self.q_id
    }

    /// Reads `tag`'s descriptor. Call only after that tag's fetch completed.
    pub(crate) fn read(&self, tag: u16) -> IoDesc {
        assert!(tag < self.depth, "tag {tag} beyond depth {}", self.depth);
        // Pairs with the kernel's write of the descriptor before it completed the fetch CQE.
        fence(Ordering::Acquire);
        let ptr = self
            .map
            .range(u64::from(tag) * DESC_SIZE as u64, DESC_SIZE)
            .expect("tag < depth, so the descriptor lies inside the mapping")
            .cast::<sys::ublksrv_io_desc>();
        // The base is page aligned and descriptors are 24 bytes of 8-byte fields, so `ptr` is
        // aligned. The kernel writes this slot again only for the tag's next request, which
        // cannot exist before we commit; a volatile read forms no reference to shared memory.
        // SAFETY: ptr is inside the mapping (checked by `range`), aligned, and not being
        // written (above).
        IoDesc::from(unsafe { std::ptr::read_volatile(ptr) })
    }
}

/// Everything a queue thread needs.
pub(crate) struct QueueSetup {
    pub q_id: u16,
    pub depth: u16,
    /// The tags this thread serves: `(first, step)`, i.e. `first, first + step, ...` below
    /// `depth` (`(0, 1)`: all of them; more threads per queue use `UBLK_F_PER_IO_DAEMON`).
    pub tags: (u16, u16),
    pub geo: Geometry,
    pub cdev: Arc<File>,
    pub cpus: Vec<usize>,
    pub mode: BufferMode,
    /// SQPOLL with this idle time in milliseconds, or `None` for no polling thread.
    pub sqpoll: Option<u32>,
    /// `IORING_SETUP_DEFER_TASKRUN` (without SQPOLL).
    pub defer_taskrun: bool,
    /// `UBLK_F_BATCH_IO`: tags arrive through one multishot fetch, results leave in batches.
    pub batch: bool,
    /// User copy for a target that reads [`crate::Io::data`]: stage bytes in the tag buffer.
    pub stage: bool,
    /// `UBLK_F_NEED_GET_DATA`: request buffers come from a per-queue pool while in flight.
    pub need_get_data: bool,
    /// Where the queue's per-node counters are published.
    pub stats: Option<StatsRegistry>,
}

/// How long a queue waits at exit for its nodes' operations to complete.
const QUIESCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A queue's ring and engine, torn down in the one safe order on every exit path: first wait
/// for the operations the nodes started (their buffers live in the engine), then close the
/// ring, then drop the engine and its nodes.
struct Running {
    ring: IoUring,
    engine: Engine,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.engine.quiesce(&mut self.ring, QUIESCE_TIMEOUT);
    }
}

fn pin_to(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        // A CPU beyond what a CpuSet can hold (EINVAL) cannot be pinned to; skip it.
        let _ = set.set(cpu);
    }
    // Pid 0 is the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

fn new_ring(entries: u32, sqpoll: Option<u32>, defer_taskrun: bool) -> io::Result<IoUring> {
    let mut builder = IoUring::builder();
    match sqpoll {
        Some(idle_ms) => builder.setup_sqpoll(idle_ms),
        None if defer_taskrun => builder.setup_single_issuer().setup_defer_taskrun(),
        None => builder.setup_coop_taskrun().setup_single_issuer(),
    };
    builder.build(entries).or_else(|e| {
        if sqpoll.is_some() {
            return Err(e); // asked for explicitly: report rather than run without it
        }
        IoUring::new(entries)
    })
}

/// Registers what the buffer mode needs on the queue's ring.
fn register_buffers(ring: &IoUring, mode: BufferMode, shared: &QueueShared) -> io::Result<()> {
    match mode {
        BufferMode::Copy | BufferMode::UserCopy => Ok(()),
        BufferMode::Registered => {
            let iovecs = shared.arena.iovecs();
            // SAFETY: the iovecs describe the arena, which outlives the ring (held by
            // `QueueShared`, dropped after the ring).
            unsafe { ring.submitter().register_buffers(&iovecs) }
        }
        BufferMode::ZeroCopy | BufferMode::ManualZeroCopy => ring
            .submitter()
            .register_buffers_sparse(u32::from(shared.arena.depth())),
    }
}

/// Where a FETCH or COMMIT_AND_FETCH for `tag` says the data goes: `(cmd_addr, sqe_addr)`.
/// Copy modes give the tag buffer in the command's `addr`. In (auto) zero-copy mode the
/// command's `addr` must be 0 and the SQE's own `addr` carries `ublk_auto_buf_reg`: the
/// buffer-table slot the kernel registers the request's pages at. User copy and manual
/// zero-copy give no address at all (the kernel rejects one).
fn fetch_addrs(mode: BufferMode, shared: &QueueShared, tag: u16) -> (u64, u64) {
    match mode {
        BufferMode::Copy | BufferMode::Registered => (shared.arena.buf_addr(tag), 0),
        BufferMode::ZeroCopy => {
            let reg = sys::ublk_auto_buf_reg {
                index: tag,
                ..Default::default()
            };
            (0, reg.to_sqe_addr())
        }
        BufferMode::ManualZeroCopy | BufferMode::UserCopy => (0, 0),
    }
}

fn io_cmd_sqe(
    cdev: &File,
    cmd_op: u32,
    (q_id, tag): (u16, u16),
    result: i32,
    (addr, sqe_addr): (u64, u64),
) -> squeue::Entry {
    let cmd = sys::ublksrv_io_cmd {
        q_id,
        tag,
        result,
        addr,
    };
    let mut sqe =
        opcode::UringCmd16::new(types::Fd(cdev.as_raw_fd()), cmd_op).cmd(pod::to_cmd_bytes(&cmd));
    if sqe_addr != 0 {
        sqe = sqe.addr(Some(sqe_addr));
    }
    sqe.build().user_data(u64::from(tag))
}

/// Serves one queue until the kernel aborts every tag or a stop is requested. `ready` is
/// called once every tag has been fetched (or with the error that prevented it). Returns
/// why the queue died, if it did after starting.
pub(crate) fn run<T: Target>(
    target: &T,
    setup: QueueSetup,
    shared: Arc<QueueShared>,
    ready: impl FnOnce(io::Result<()>),
) -> io::Result<()> {
    let mut ready = Some(ready);
    let result = serve(target, &setup, shared, &mut ready);
    if let Some(ready) = ready.take() {
        let failed = result.is_err();
        ready(result);
        if failed {
            return Err(io::Error::other("queue setup failed"));
        }
        return Ok(());
    }
    if let Err(e) = &result {
        tracing::error!(q = setup.q_id, "queue stopped: {e}");
    }
    result
}

fn serve<T: Target>(
    target: &T,
    setup: &QueueSetup,
    shared: Arc<QueueShared>,
    ready: &mut Option<impl FnOnce(io::Result<()>)>,
) -> io::Result<()> {
    let QueueSetup {
        q_id, depth, cdev, ..
    } = setup;
    let (q_id, depth) = (*q_id, *depth);
    if let Err(e) = pin_to(&setup.cpus) {
        tracing::warn!(q = q_id, "cannot pin queue thread to {:?}: {e}", setup.cpus);
    }
    shared.enter();
    let descs = DescArray::map(cdev, q_id, depth)?;
    // Created before the ring so that the ring, whose commands refer to its buffers, is
    // dropped first.
    let mut batch = if setup.batch {
        let layout = ElemLayout {
            buf_addr: setup.mode.kernel_copies(),
            auto_buf_reg: setup.mode == BufferMode::ZeroCopy,
        };
        let addrs = (0..depth).map(|tag| shared.arena.buf_addr(tag)).collect();
        Some(BatchIo::new(cdev.as_raw_fd(), q_id, addrs, layout)?)
    } else {
        None
    };
    let entries = (u32::from(depth) + 2).next_power_of_two();
    let ring = new_ring(entries, setup.sqpoll, setup.defer_taskrun)?;
    register_buffers(&ring, setup.mode, &shared)?;
    let tree = open_tree(target, q_id, &setup.geo)?;
    let engine = Engine::new(
        tree,
        Arc::clone(&shared),
        setup.geo,
        q_id,
        (setup.mode, setup.stage, setup.need_get_data),
    );
    if let Some(stats) = &setup.stats {
        stats.add(engine.stats());
    }
    let mut running = Running { ring, engine };
    let Running { ring, engine } = &mut running;

    let wake = opcode::PollAdd::new(types::Fd(shared.wake_fd().as_raw_fd()), libc::POLLIN as u32)
        .multi(true)
        .build()
        .user_data(Owner::Wake.user_data());
    if let Some(batch) = batch.as_mut() {
        return serve_batch(batch, ring, engine, &descs, &shared, wake, ready);
    }
    push(ring, &wake)?;
    let (first, step) = setup.tags;
    let my_tags = (first..depth).step_by(usize::from(step.max(1)));
    let mut live = my_tags.len();
    for tag in my_tags {
        let sqe = io_cmd_sqe(
            cdev,
            sys::UBLK_U_IO_FETCH_REQ,
            (q_id, tag),
            -1,
            fetch_addrs(setup.mode, &shared, tag),
        );
        push(ring, &sqe)?;
    }
    ring.submit()?;
    // A fetch the kernel accepts stays pending until a request arrives; one it rejects
    // completes at once. START_DEV would wait forever for a rejected tag, so fail here.
    let rejected = ring
        .completion()
        .find(|c| matches!(Owner::of(c.user_data()), Owner::Tag(_)));
    if let Some(cqe) = rejected {
        return Err(io::Error::other(format!(
            "the kernel rejected FETCH_REQ for tag {}: {}",
            cqe.user_data(),
            io::Error::from_raw_os_error(-cqe.result())
        )));
    }
    if let Some(ready) = ready.take() {
        ready(Ok(()));
    }
    tracing::debug!(q = q_id, depth, "queue fetched every tag");

    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(entries as usize * 2);
    while live > 0 && !shared.stop_requested() {
        if engine.pool_has_excess() {
            // Nothing uses the pool's spare buffers: free them if nothing comes for a while.
            if !submit_and_reap_within(ring, &mut cqes, POOL_TRIM_AFTER)? {
                engine.trim_pool();
                continue;
            }
        } else {
            submit_and_reap(ring, &mut cqes)?;
        }
        release_if_submitted(ring, engine);
        engine.tick();
        for (user_data, res, flags) in cqes.drain(..) {
            let tag = match Owner::of(user_data) {
                Owner::NodeOp(key) => {
                    engine.op_done(key, res, ring);
                    continue;
                }
                Owner::BufCmd(tag) => {
                    engine.buf_cmd_done(tag, res);
                    continue;
                }
                Owner::Wake => {
                    shared.clear_wake();
                    if !cqueue::more(flags) {
                        push(ring, &wake)?;
                    }
                    continue;
                }
                Owner::Batch => {
                    tracing::error!(q = q_id, user_data, "batch completion on a plain queue");
                    continue;
                }
                Owner::Tag(tag) => tag,
            };
            match res {
                sys::UBLK_IO_RES_OK => engine.dispatch(tag, descs.read(tag), ring),
                sys::UBLK_IO_RES_NEED_GET_DATA => {
                    // The data comes with this command's completion (UBLK_IO_RES_OK).
                    if let Some(addr) = engine.need_data(tag, descs.read(tag)) {
                        let sqe = io_cmd_sqe(
                            cdev,
                            sys::UBLK_U_IO_NEED_GET_DATA,
                            (q_id, tag),
                            0,
                            (addr, 0),
                        );
                        push(ring, &sqe)?;
                    }
                }
                sys::UBLK_IO_RES_ABORT => live -= 1,
                other => {
                    tracing::error!(q = q_id, tag, res = other, "unexpected fetch result");
                    live -= 1;
                }
            }
        }
        let mut push_err = None;
        engine.drain(ring, |ring, tag, res, buf| {
            // A read's data is in `buf` when it came from the pool: the kernel copies it out
            // while taking the commit (submitted at the next turn, before `submitted`).
            let addrs = if buf != 0 {
                (buf, 0)
            } else {
                fetch_addrs(setup.mode, &shared, tag)
            };
            let sqe = io_cmd_sqe(
                cdev,
                sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ,
                (q_id, tag),
                res,
                addrs,
            );
            if let Err(e) = push(ring, &sqe) {
                push_err = Some(e);
            }
        });
        if let Some(e) = push_err {
            return Err(e);
        }
        // Reads' pool buffers: submit their commits now rather than with the next wait, so
        // an idle queue does not keep them.
        if engine.has_retired() {
            match ring.submit() {
                Ok(_) => release_if_submitted(ring, engine),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    tracing::debug!(
        q = q_id,
        live,
        in_service = engine.in_service(),
        ops = engine.ops_in_flight(),
        "queue loop ended"
    );
    Ok(())
}

/// The loop of a `UBLK_F_BATCH_IO` queue: as in [`serve`], with tags taken from the batch
/// fetch's buffers and each turn's results sent in one COMMIT_IO_CMDS. The caller drops the
/// ring before `batch`, whose buffers the ring's commands refer to.
fn serve_batch(
    batch: &mut BatchIo,
    ring: &mut IoUring,
    engine: &mut Engine,
    descs: &DescArray,
    shared: &QueueShared,
    wake: squeue::Entry,
    ready: &mut Option<impl FnOnce(io::Result<()>)>,
) -> io::Result<()> {
    batch.start(ring)?;
    push(ring, &wake)?;
    ring.submit()?;
    if let Some(ready) = ready.take() {
        ready(Ok(()));
    }
    tracing::debug!(q = descs.q_id(), "batch queue prepared every tag");

    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(ring.params().cq_entries() as usize);
    let mut tags = Vec::with_capacity(usize::from(descs.depth));
    // Leave once the kernel ended the fetch, or on request; either way only after every
    // commit was answered, so no command still reads our arrays.
    while !batch.commits_idle() || (batch.fetching() && !shared.stop_requested()) {
        submit_and_reap(ring, &mut cqes)?;
        engine.tick();
        for (user_data, res, flags) in cqes.drain(..) {
            match Owner::of(user_data) {
                Owner::NodeOp(key) => engine.op_done(key, res, ring),
                Owner::BufCmd(tag) => engine.buf_cmd_done(tag, res),
                Owner::Wake => {
                    shared.clear_wake();
                    if !cqueue::more(flags) {
                        push(ring, &wake)?;
                    }
                }
                Owner::Batch => {
                    batch.complete((user_data, res, flags), ring, &mut tags)?;
                    for tag in tags.drain(..) {
                        engine.dispatch(tag, descs.read(tag), ring);
                    }
                }
                Owner::Tag(_) => {
                    tracing::error!(q = descs.q_id(), user_data, res, "unexpected completion")
                }
            }
        }
        engine.drain(ring, |_, tag, res, _| batch.queue_result(tag, res));
        batch.submit_commits(ring)?;
    }
    tracing::debug!(
        q = descs.q_id(),
        fetching = batch.fetching(),
        in_service = engine.in_service(),
        "batch queue loop ended"
    );
    Ok(())
}

/// How long a queue with spare pool buffers waits for work before freeing them.
const POOL_TRIM_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// Submits what is queued and waits up to `timeout` for one completion; running out of
/// time, a signal and a full completion queue are not errors (the caller reaps what there
/// is either way).
pub(crate) fn submit_and_wait_within(
    ring: &mut IoUring,
    timeout: std::time::Duration,
) -> io::Result<()> {
    let ts = types::Timespec::from(timeout);
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// As [`submit_and_reap`], but waits at most `timeout`; returns whether anything completed.
fn submit_and_reap_within(
    ring: &mut IoUring,
    cqes: &mut Vec<(u64, i32, u32)>,
    timeout: std::time::Duration,
) -> io::Result<bool> {
    submit_and_wait_within(ring, timeout)?;
    let before = cqes.len();
    cqes.extend(
        ring.completion()
            .map(|c| (c.user_data(), c.result(), c.flags())),
    );
    Ok(cqes.len() > before)
}

/// Gives the engine's retired read buffers back once every queued SQE, their commits among
/// them, has been taken by the kernel.
fn release_if_submitted(ring: &mut IoUring, engine: &mut Engine) {
    if engine.has_retired() && ring.submission().is_empty() {
        engine.submitted();
    }
}

/// Submits the loop turn's SQEs, waits for at least one completion, and appends every
/// completion as `(user_data, res, flags)`.
fn submit_and_reap(ring: &mut IoUring, cqes: &mut Vec<(u64, i32, u32)>) -> io::Result<()> {
    match ring.submit_and_wait(1) {
        Ok(_) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
        Err(e) => return Err(e),
    }
    cqes.extend(
        ring.completion()
            .map(|c| (c.user_data(), c.result(), c.flags())),
    );
    Ok(())
}

fn push(ring: &mut IoUring, sqe: &squeue::Entry) -> io::Result<()> {
    // SAFETY: ublk commands carry only a buffer address in our arena, which outlives the ring
    // (the arena is held by `QueueShared`, dropped after the ring); the poll carries no buffer.
    unsafe { push_sqe(ring, sqe) }
}
