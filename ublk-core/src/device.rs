//! A device's whole life: add, configure, start the queue threads, start, serve until a
//! signal or an external stop, then stop, drain and delete, leaving nothing behind.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::buf::{BufferMode, TagArena};
use crate::ctrl::{AddRequest, ControlDevice, DevInfo};
use crate::error::{Error, Result};
use crate::params::DeviceParams;
use crate::queue::{self, QueueSetup};
use crate::request::QueueShared;
use crate::stats::StatsRegistry;
use crate::sys;
use crate::target::Target;

/// What a started device looks like; given to the `on_started` callback of
/// [`DeviceBuilder::run_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id.
    pub dev_id: u32,
    /// `/dev/ublkbN`.
    pub block_path: String,
    /// Size in bytes.
    pub size: u64,
    /// Queues (the kernel may have lowered the request to the CPU count).
    pub queues: u16,
    /// Tags per queue.
    pub depth: u16,
    /// Largest I/O in bytes.
    pub max_io: u32,
    /// `UBLK_F_*` flags the device runs with.
    pub flags: u64,
    /// This server's pid.
    pub pid: u32,
    /// How request data moves between kernel and server.
    pub buffer_mode: BufferMode,
    /// The SQPOLL idle time in milliseconds, when the queues poll.
    pub sqpoll: Option<u32>,
    /// Whether the queues use `UBLK_F_BATCH_IO` (batched fetch and commit).
    pub batch_io: bool,
    /// Server threads per queue (more than 1 uses `UBLK_F_PER_IO_DAEMON`).
    pub threads_per_queue: u16,
    /// Whether the queue rings run task work only when the queue thread waits
    /// (`IORING_SETUP_DEFER_TASKRUN`).
    pub defer_taskrun: bool,
}

/// Builds and runs a device.
///
/// ```no_run
/// # use ublk_core::{DeviceBuilder, Target, QueueTarget, Io, QueueCtx, OpenCtx};
/// struct Zeroes;
/// impl Target for Zeroes {
///     type Queue = Zeroes;
///     fn open_queue(&self, _: &mut OpenCtx<'_>) -> std::io::Result<Zeroes> { Ok(Zeroes) }
/// }
/// impl QueueTarget for Zeroes {
///     fn submit(&mut self, mut io: Io, _: &mut QueueCtx<'_>) {
///         if let Ok(buf) = io.data_mut() {
///             buf.fill(0);
///         }
///         io.complete_ok();
///     }
/// }
/// DeviceBuilder::new().size(1 << 30).queues(2).run(Zeroes)?;
/// # Ok::<(), ublk_core::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct DeviceBuilder {
    params: DeviceParams,
    id: Option<u32>,
    flags: u64,
    server_flags: u64,
    mode: BufferMode,
    sqpoll: Option<u32>,
    batch_io: bool,
    threads_per_queue: Option<u16>,
    defer_taskrun: bool,
    need_get_data: bool,
    stats: Option<StatsRegistry>,
    recover: Option<u32>,
    resize: Option<SizeHandle>,
    unprivileged: bool,
    handover_timeout: Option<Duration>,
    quiesce: Option<QuiesceHandle>,
}

impl DeviceBuilder {
    /// Defaults: 1 queue, depth 128, 512-byte logical blocks, 512 KiB max I/O; set the size.
    pub fn new() -> Self {
        Self::default()
    }

    /// Size in bytes.
    pub fn size(mut self, bytes: u64) -> Self {
        self.params.size = bytes;
        self
    }

    /// Logical block size (512..=4096, power of two).
    pub fn logical_block_size(mut self, bytes: u32) -> Self {
        self.params.logical_block_size = bytes;
        self.params.physical_block_size = self.params.physical_block_size.max(bytes);
        self
    }

    /// Number of queues.
    pub fn queues(mut self, n: u16) -> Self {
        self.params.queues = n;
        self
    }

    /// Tags per queue.
    pub fn depth(mut self, n: u16) -> Self {
        self.params.depth = n;
        self
    }

    /// Largest single I/O in bytes.
    pub fn max_io_size(mut self, bytes: u32) -> Self {
        self.params.max_io = bytes;
        self
    }

    /// A specific device id instead of one the kernel chooses.
    pub fn id(mut self, id: u32) -> Self {
        self.id = Some(id);
        self
    }

    /// Serve with `UBLK_F_NEED_GET_DATA`: a request's buffer is taken from a per-queue pool
    /// only while the request is in flight (a write's when the kernel is about to copy its
    /// data), instead of every tag holding one of the largest I/O's size. A busy queue reuses
    /// the buffers that come back; once none is out, it keeps at most 2 MiB of them. Copy
    /// mode only, without SQPOLL or batch I/O; each write costs one more command.
    pub fn need_get_data(mut self, on: bool) -> Self {
        self.need_get_data = on;
        self
    }

    /// Add the device as an unprivileged user (`UBLK_F_UNPRIVILEGED_DEV`): a user without
    /// `CAP_SYS_ADMIN` who can open `/dev/ublk-control` owns the device, and only that user
    /// (or root) may command it. The kernel records the owner; udev must hand
    /// `/dev/ublkcN` and `/dev/ublkbN` to it (the rule in `udev/99-ublk.rules`), which the
    /// server waits for (see [`DeviceBuilder::handover_timeout`]). Copy or registered buffer
    /// mode only, and no user recovery: the kernel refuses both to unprivileged servers.
    /// A caller that has `CAP_SYS_ADMIN` gets a privileged device (the kernel drops the flag).
    pub fn unprivileged(mut self, on: bool) -> Self {
        self.unprivileged = on;
        self
    }

    /// How long an unprivileged device's server waits for udev to make its nodes
    /// accessible (default 10 s) before it gives up and removes the device.
    pub fn handover_timeout(mut self, timeout: Duration) -> Self {
        self.handover_timeout = Some(timeout);
        self
    }

    /// Lets `handle` hand the running device to a next server ([`QuiesceHandle::quiesce`]):
    /// for a device with user recovery, on a kernel with `UBLK_F_QUIESCE` (asked for here).
    pub fn quiesce_handle(mut self, handle: QuiesceHandle) -> Self {
        self.quiesce = Some(handle);
        self
    }

    /// Extra `UBLK_F_*` flags.
    pub fn flags(mut self, flags: u64) -> Self {
        self.flags |= flags;
        self
    }

    /// Server-private flags the kernel stores with the device and reports back in
    /// [`crate::DevInfo::server_flags`] (the `ublk` tool records the target kind there).
    pub fn server_flags(mut self, flags: u64) -> Self {
        self.server_flags = flags;
        self
    }

    /// How request data moves between kernel and server (default: [`BufferMode::Copy`]).
    /// The zero-copy modes need a target whose [`Target::needs_data`] is false. A mode the
    /// kernel lacks falls back to the nearest it has ([`BufferMode::effective`]).
    pub fn buffer_mode(mut self, mode: BufferMode) -> Self {
        self.mode = mode;
        self
    }

    /// Give each queue's io_uring a kernel polling thread (SQPOLL) that sleeps after
    /// `idle_ms` milliseconds without work; `None` (the default) submits with syscalls.
    pub fn sqpoll(mut self, idle_ms: Option<u32>) -> Self {
        self.sqpoll = idle_ms;
        self
    }

    /// Serve with `UBLK_F_BATCH_IO` (kernel 7.2+): each queue receives requests in batches
    /// from one multishot fetch and commits each loop turn's results with one command,
    /// instead of one command per request. Works with every buffer mode.
    pub fn batch_io(mut self, on: bool) -> Self {
        self.batch_io = on;
        self
    }

    /// Serve each queue with `n` threads (default 1), each with its own io_uring and its own
    /// [`Target::open_queue`], thread `i` taking the tags `t` with `t % n == i`. More than one
    /// uses `UBLK_F_PER_IO_DAEMON` (kernel 6.17+), which lets each tag be served by its own
    /// thread: a queue's load spreads over several CPUs. Not combined with batch I/O.
    pub fn threads_per_queue(mut self, n: u16) -> Self {
        self.threads_per_queue = Some(n);
        self
    }

    /// Set up each queue's io_uring with `IORING_SETUP_DEFER_TASKRUN` (kernel 6.1+): the
    /// kernel runs the ring's completion work only when the queue thread waits for it, in
    /// one batch, instead of interrupting it. Ignored with SQPOLL.
    pub fn defer_taskrun(mut self, on: bool) -> Self {
        self.defer_taskrun = on;
        self
    }

    /// Publish every queue's per-node counters in `registry`, to read while the device runs.
    pub fn stats(mut self, registry: StatsRegistry) -> Self {
        self.stats = Some(registry);
        self
    }

    /// Instead of adding a new device, take over device `id`, whose server died, in
    /// [`DeviceBuilder::run`]: the device must have been added with `UBLK_F_USER_RECOVERY`
    /// (see [`DeviceBuilder::flags`]) and be QUIESCED or FAIL_IO. The run checks that,
    /// sends START_USER_RECOVERY, opens `/dev/ublkcN`, sets the queues up again, and sends
    /// END_USER_RECOVERY once every tag is fetched: the waiting (REISSUE) or failing
    /// (FAIL_IO) I/O then goes to `target`, which must serve the same data as the dead
    /// server's. A device in any other state is refused with [`Error::NotRecoverable`] and
    /// left as it was.
    ///
    /// Queues, depth, largest I/O, block sizes and the zero-copy, batch and per-I/O-daemon
    /// flags are the device's own (what was set here is replaced); a size set here must
    /// match the device's. A server killed a moment ago may still show LIVE until the
    /// kernel has released its queues: retry then.
    pub fn recover(mut self, id: u32) -> Self {
        self.recover = Some(id);
        self
    }

    /// Lets `handle` change the device's size while it runs ([`SizeHandle::resize`]); the
    /// device is then added with `UBLK_F_UPDATE_SIZE` when the kernel has it.
    pub fn size_handle(mut self, handle: SizeHandle) -> Self {
        self.resize = Some(handle);
        self
    }

    fn threads(&self) -> u16 {
        self.threads_per_queue.unwrap_or(1)
    }

    fn handover_wait(&self) -> Duration {
        self.handover_timeout.unwrap_or(Duration::from_secs(10))
    }

    /// Advertise discard support.
    pub fn discard(mut self, on: bool) -> Self {
        self.params.discard = on;
        self
    }

    /// Advertise write-zeroes support.
    pub fn write_zeroes(mut self, on: bool) -> Self {
        self.params.write_zeroes = on;
        self
    }

    /// Advertise a volatile write cache (the kernel then sends flushes).
    pub fn volatile_cache(mut self, on: bool) -> Self {
        self.params.volatile_cache = on;
        self
    }

    /// Advertise FUA support on writes.
    pub fn fua(mut self, on: bool) -> Self {
        self.params.fua = on;
        self
    }

    /// Replace all parameters at once.
    pub fn params(mut self, params: DeviceParams) -> Self {
        self.params = params;
        self
    }

    /// The parameters as they stand.
    pub fn device_params(&self) -> &DeviceParams {
        &self.params
    }

    /// Checks the parameters without touching the kernel.
    pub fn validate(&self) -> Result<()> {
        self.params.validate()?;
        let n = self.threads();
        if n == 0 || n > self.params.depth {
            return Err(Error::InvalidParam(format!(
                "threads per queue must be between 1 and the queue depth ({}), not {n}",
                self.params.depth
            )));
        }
        if n > 1 && self.batch_io {
            return Err(Error::InvalidParam(
                "batch I/O serves each queue from one thread: use 1 thread per queue".into(),
            ));
        }
        if self.unprivileged {
            if self.mode.kernel_flag() != 0 {
                return Err(Error::InvalidParam(format!(
                    "an unprivileged device serves in copy or registered buffer mode, not {}: \
                     the kernel refuses zero-copy and user copy to unprivileged servers",
                    self.mode.name()
                )));
            }
            if self.flags & (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) != 0
                || self.recover.is_some()
            {
                return Err(Error::InvalidParam(
                    "an unprivileged device cannot be recovered: the kernel offers user \
                     recovery to privileged servers only"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Serves `target` until SIGINT/SIGTERM or until the device is stopped from outside, then
    /// removes the device. See [`DeviceBuilder::run_with`].
    pub fn run<T: Target>(self, target: T) -> Result<()> {
        self.run_with(target, |_| {})
    }

    /// Like [`DeviceBuilder::run`], calling `on_started` once `/dev/ublkbN` exists.
    ///
    /// SIGINT and SIGTERM are blocked in the calling thread (and so in the queue threads it
    /// starts) while the device runs, and one arriving ends the run with `Ok(())`. Any error
    /// after the device was added deletes it before returning.
    pub fn run_with<T: Target>(
        mut self,
        target: T,
        on_started: impl FnOnce(&DeviceInfo),
    ) -> Result<()> {
        if let Some(dev_id) = self.recover {
            return self.run_recovery(dev_id, target, on_started);
        }
        self.validate()?;
        let ctrl = ControlDevice::open()?;
        let features = ctrl.features()?;
        let mut flags = self.flags;
        let wanted = self.mode;
        if features & sys::UBLK_F_CMD_IOCTL_ENCODE != 0 {
            flags |= sys::UBLK_F_CMD_IOCTL_ENCODE;
        }
        if self.mode.is_zero_copy() && target.needs_data() {
            return Err(Error::InvalidParam(format!(
                "{} mode needs a target that does not touch request data \
                 (this one reads or writes the bytes itself)",
                self.mode.name()
            )));
        }
        // Speed features the kernel lacks fall back to what it has, with a warning: the
        // device still serves the same data.
        self.mode = wanted.effective(features);
        if self.mode != wanted {
            tracing::warn!(
                "the kernel lacks {}: serving in {} mode instead of {}",
                crate::ctrl::feature_names(wanted.kernel_flag()).join(", "),
                self.mode.name(),
                wanted.name()
            );
        }
        if self.threads() > 1 && features & sys::UBLK_F_PER_IO_DAEMON == 0 {
            tracing::warn!("the kernel lacks PER_IO_DAEMON: serving each queue with one thread");
            self.threads_per_queue = Some(1);
        }
        if self.batch_io && features & sys::UBLK_F_BATCH_IO == 0 {
            tracing::warn!("the kernel lacks BATCH_IO: fetching and committing per request");
            self.batch_io = false;
        }
        flags |= self.mode.kernel_flag();
        if self.threads() > 1 {
            flags |= sys::UBLK_F_PER_IO_DAEMON;
        }
        if self.batch_io {
            flags |= sys::UBLK_F_BATCH_IO;
        }
        if self.need_get_data {
            let why = if self.mode != BufferMode::Copy {
                Some(format!("the {} buffer mode", self.mode.name()))
            } else if self.sqpoll.is_some() {
                Some("SQPOLL".to_string())
            } else if self.batch_io {
                Some("batch I/O".to_string())
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::InvalidParam(format!(
                    "NEED_GET_DATA works in copy mode only, not with {why}"
                )));
            }
            flags |= sys::UBLK_F_NEED_GET_DATA;
        }
        if self.resize.is_some() {
            flags |= features & sys::UBLK_F_UPDATE_SIZE;
        }
        if self.unprivileged {
            flags |= sys::UBLK_F_UNPRIVILEGED_DEV;
        }
        if self.quiesce.is_some() && flags & sys::UBLK_F_USER_RECOVERY != 0 {
            flags |= features & sys::UBLK_F_QUIESCE;
        }
        let unsupported = flags & !features;
        if unsupported != 0 {
            return Err(Error::InvalidParam(format!(
                "the kernel does not support {}",
                crate::ctrl::feature_names(unsupported).join(", ")
            )));
        }
        let info = ctrl
            .add(&AddRequest {
                dev_id: self.id,
                nr_queues: self.params.queues,
                queue_depth: self.params.depth,
                max_io_buf_bytes: self.params.max_io,
                flags,
                server_flags: self.server_flags,
            })
            .map_err(|e| match e.errno() {
                Some(libc::EPERM) if !self.unprivileged => Error::AddNotPermitted,
                _ => e,
            })?;
        let guard = DeviceGuard {
            ctrl: &ctrl,
            dev_id: info.dev_id,
            started: false,
            owned: true,
            recovering: false,
            quiesce: self.quiesce.clone(),
        };
        tracing::info!(dev_id = info.dev_id, "added device");
        if self.unprivileged && !info.is_unprivileged() {
            tracing::warn!(
                dev_id = info.dev_id,
                "the kernel counts this process as privileged (CAP_SYS_ADMIN): \
                 the device is a privileged one"
            );
        }
        if info.is_unprivileged() {
            // SET_PARAMS and the queues need /dev/ublkcN, which udev hands over.
            wait_handed_over(&info.char_path(), self.handover_wait()).map_err(|e| match e {
                Error::NotHandedOver {
                    path, uid, secs, ..
                } => Error::NotHandedOver {
                    path,
                    uid,
                    secs,
                    left_behind: Some(info.dev_id),
                },
                e => e,
            })?;
        }
        self.serve_guarded(&info, target, guard, on_started)
    }

    /// Serves the device `guard` stands for, with the builder's queue options, and tears it
    /// down as far as the guard owns it.
    fn serve_guarded<T: Target>(
        &self,
        info: &DevInfo,
        target: T,
        mut guard: DeviceGuard<'_>,
        on_started: impl FnOnce(&DeviceInfo),
    ) -> Result<()> {
        // Blocked before the queue threads start, so they inherit the mask and the signals
        // reach only `SignalBlock::wait`.
        let signals = SignalBlock::new()?;
        let options = QueueOptions {
            mode: self.mode,
            sqpoll: self.sqpoll,
            defer_taskrun: self.defer_taskrun && self.sqpoll.is_none(),
            batch: self.batch_io,
            stage: !target.copies_data(),
            need_get_data: self.need_get_data,
            threads: self.threads(),
            handover_timeout: self.handover_wait(),
        };
        let stats = self.stats.clone();
        let result = serve(
            &signals,
            guard.ctrl,
            info,
            &self.params,
            (options, stats, self.resize.clone()),
            target,
            &mut guard,
            on_started,
        );
        guard.teardown();
        result
    }

    /// The recovery half of [`DeviceBuilder::run_with`] (see [`DeviceBuilder::recover`]).
    fn run_recovery<T: Target>(
        mut self,
        dev_id: u32,
        target: T,
        on_started: impl FnOnce(&DeviceInfo),
    ) -> Result<()> {
        let ctrl = ControlDevice::open()?;
        let info = ctrl.dev_info(dev_id)?;
        check_recoverable(&info)?;
        let kernel = ctrl.params(dev_id)?.basic;
        let size = kernel.dev_sectors.saturating_mul(512);
        if self.params.size != 0 && self.params.size != size {
            return Err(Error::InvalidParam(format!(
                "device {dev_id} has {size} bytes, the target to recover it with {}",
                self.params.size
            )));
        }
        let shift = |s: u8, what: &str| {
            1u32.checked_shl(u32::from(s)).ok_or_else(|| {
                Error::InvalidParam(format!("device {dev_id}: {what} shift {s} is out of range"))
            })
        };
        self.params.size = size;
        self.params.logical_block_size = shift(kernel.logical_bs_shift, "logical block")?;
        self.params.physical_block_size = shift(kernel.physical_bs_shift, "physical block")?;
        self.params.queues = info.nr_queues;
        self.params.depth = info.queue_depth;
        self.params.max_io = info.max_io_buf_bytes;
        if self.mode.is_zero_copy() && target.needs_data() {
            return Err(Error::InvalidParam(format!(
                "{} mode needs a target that does not touch request data \
                 (this one reads or writes the bytes itself)",
                self.mode.name()
            )));
        }
        self.mode = mode_of_device(self.mode, info.flags).ok_or_else(|| {
            Error::InvalidParam(format!(
                "device {dev_id} has buffer flags {} that no buffer mode uses",
                crate::ctrl::feature_names(info.flags & MODE_FLAGS).join(", ")
            ))
        })?;
        if self.mode.is_zero_copy() && target.needs_data() {
            return Err(Error::InvalidParam(format!(
                "device {dev_id} serves in {} mode, which needs a target that does not \
                 touch request data",
                self.mode.name()
            )));
        }
        self.batch_io = info.flags & sys::UBLK_F_BATCH_IO != 0;
        // A device added with NEED_GET_DATA sends its writes' data only on request: the new
        // server must serve it the same way.
        self.need_get_data = info.flags & sys::UBLK_F_NEED_GET_DATA != 0;
        if info.flags & sys::UBLK_F_PER_IO_DAEMON == 0 {
            self.threads_per_queue = Some(1);
        }
        self.validate()?;
        ctrl.start_recovery(dev_id).map_err(|e| match e.errno() {
            Some(libc::EBUSY) => Error::NotRecoverable {
                dev_id,
                reason: "the kernel still holds the old server's queues (EBUSY): retry".into(),
            },
            _ => e,
        })?;
        tracing::info!(dev_id, "recovering device");
        // Until END_USER_RECOVERY succeeds the device is not ours to stop or delete: a
        // failure leaves it recoverable, as it was.
        let guard = DeviceGuard {
            ctrl: &ctrl,
            dev_id,
            started: false,
            owned: false,
            recovering: true,
            quiesce: self.quiesce.clone(),
        };
        self.serve_guarded(&info, target, guard, on_started)
    }
}

/// Hands a running device to its next server: give a clone to
/// [`DeviceBuilder::quiesce_handle`], then call [`QuiesceHandle::quiesce`] (from any
/// thread). For live upgrades: the old server finishes its in-flight I/O and returns from
/// its run, leaving the device and its waiting I/O to a server started with
/// [`DeviceBuilder::recover`].
#[derive(Clone, Default)]
pub struct QuiesceHandle(Arc<QuiesceState>);

#[derive(Default)]
struct QuiesceState {
    /// The running device's id and `UBLK_F_*` flags.
    device: std::sync::Mutex<Option<(u32, u64)>>,
    requested: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for QuiesceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dev = self.device().map(|(id, _)| id);
        f.debug_struct("QuiesceHandle")
            .field("dev_id", &dev)
            .finish()
    }
}

impl QuiesceHandle {
    /// A handle not yet given to a device.
    pub fn new() -> Self {
        Self::default()
    }

    fn device(&self) -> Option<(u32, u64)> {
        *self
            .0
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn attach(&self, dev_id: u32, flags: u64) {
        *self
            .0
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((dev_id, flags));
    }

    fn detach(&self) {
        *self
            .0
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn requested(&self) -> bool {
        self.0.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Quiesces the device (QUIESCE_DEV): waits up to `timeout` for the requests in flight
    /// to be answered, then holds new I/O and ends the queues; the server's run returns
    /// `Ok(())` without deleting the device, which stays QUIESCED (or FAIL_IO) until a next
    /// server recovers it. Errors when the device is not running, has no user recovery, or
    /// the kernel lacks `UBLK_F_QUIESCE`, or when the I/O did not drain in time (`EBUSY`).
    pub fn quiesce(&self, timeout: Duration) -> Result<()> {
        let (dev_id, flags) = self
            .device()
            .ok_or_else(|| Error::InvalidParam("the device is not running".into()))?;
        if flags & sys::UBLK_F_QUIESCE == 0 {
            return Err(Error::InvalidParam(format!(
                "device {dev_id} cannot be quiesced: it needs user recovery and a kernel \
                 with QUIESCE (it has {})",
                crate::ctrl::feature_names(flags).join(", ")
            )));
        }
        let ctrl = ControlDevice::open()?;
        // Set first: the queues end while the command runs.
        self.0
            .requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        ctrl.quiesce(dev_id, timeout).inspect_err(|_| {
            self.0
                .requested
                .store(false, std::sync::atomic::Ordering::SeqCst)
        })?;
        tracing::info!(dev_id, "quiesced device");
        Ok(())
    }
}

/// Changes the size of a running device: give a clone to [`DeviceBuilder::size_handle`],
/// then call [`SizeHandle::resize`] once the device has started (from any thread).
#[derive(Clone, Default)]
pub struct SizeHandle(Arc<std::sync::Mutex<Option<Resizable>>>);

/// What a resize reaches: the running device's queues.
struct Resizable {
    dev_id: u32,
    logical_block_size: u32,
    queues: Vec<Arc<QueueShared>>,
}

impl std::fmt::Debug for SizeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dev = self.lock().as_ref().map(|r| r.dev_id);
        f.debug_struct("SizeHandle").field("dev_id", &dev).finish()
    }
}

impl SizeHandle {
    /// A handle not yet given to a device.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Resizable>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn attach(&self, device: Resizable) {
        *self.lock() = Some(device);
    }

    fn detach(&self) {
        *self.lock() = None;
    }

    /// Makes the device `bytes` long (UPDATE_SIZE): the queues accept requests up to the new
    /// end, and the kernel announces the new capacity, so a file system on the device can
    /// grow into it (`resize2fs`). The target must already serve the new range when
    /// growing. Shrinking stops the kernel's requests past the end first.
    pub fn resize(&self, bytes: u64) -> Result<()> {
        let device = self.lock();
        let device = device
            .as_ref()
            .ok_or_else(|| Error::InvalidParam("the device is not running".into()))?;
        let lbs = u64::from(device.logical_block_size.max(1));
        if bytes == 0 || bytes % lbs != 0 {
            return Err(Error::InvalidParam(format!(
                "size {bytes} must be a non-zero multiple of the logical block size {lbs}"
            )));
        }
        let ctrl = ControlDevice::open()?;
        let set = |size: u64| {
            for q in &device.queues {
                q.size.store(size, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let old = device
            .queues
            .first()
            .map_or(0, |q| q.size.load(std::sync::atomic::Ordering::Relaxed));
        if bytes >= old {
            set(bytes);
            ctrl.update_size(device.dev_id, bytes)
                .inspect_err(|_| set(old))?;
        } else {
            ctrl.update_size(device.dev_id, bytes)?;
            set(bytes);
        }
        tracing::info!(dev_id = device.dev_id, bytes, "resized device");
        Ok(())
    }
}

/// The `UBLK_F_*` bits that choose how data moves ([`BufferMode::kernel_flag`]).
const MODE_FLAGS: u64 =
    sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_USER_COPY;

/// The buffer mode a device added with `flags` is served in: `wanted` when its flag is the
/// device's, else the mode with the device's flag (the copy modes for none).
fn mode_of_device(wanted: BufferMode, flags: u64) -> Option<BufferMode> {
    let has = flags & MODE_FLAGS;
    if wanted.kernel_flag() == has {
        return Some(wanted);
    }
    BufferMode::ALL.into_iter().find(|m| m.kernel_flag() == has)
}

/// Refuses, with the reason, a device that [`DeviceBuilder::recover`] cannot take over.
fn check_recoverable(info: &DevInfo) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::NotRecoverable {
            dev_id: info.dev_id,
            reason,
        })
    };
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
        return refuse("it was added without UBLK_F_USER_RECOVERY".into());
    }
    match info.state {
        sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => Ok(()),
        sys::UBLK_S_DEV_LIVE => refuse(format!(
            "it is LIVE, served by pid {}: nothing to recover",
            info.server_pid
        )),
        _ => refuse(format!(
            "it is {} (not started, or stopped), not QUIESCED or FAIL_IO",
            info.state_name()
        )),
    }
}

/// Deletes the device on every exit path (once it is ours: a recovery owns it only from
/// END_USER_RECOVERY on).
struct DeviceGuard<'a> {
    ctrl: &'a ControlDevice,
    dev_id: u32,
    started: bool,
    /// Stop and delete the device when dropped.
    owned: bool,
    /// Taking over a device: END_USER_RECOVERY instead of SET_PARAMS and START_DEV.
    recovering: bool,
    /// Set when the device may be handed to a next server.
    quiesce: Option<QuiesceHandle>,
}

impl DeviceGuard<'_> {
    fn teardown(&mut self) {
        if self.started {
            if let Err(e) = self.ctrl.stop(self.dev_id) {
                tracing::warn!(dev_id = self.dev_id, "stop: {e}");
            }
            self.started = false;
        }
    }
}

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        self.teardown();
        // Never waits for a user of the block device (a mounted file system would hold a
        // plain DEL_DEV, and this server, until it is unmounted).
        match self.ctrl.delete_within(self.dev_id, DELETE_GRACE) {
            Ok(true) => tracing::info!(dev_id = self.dev_id, "deleted device"),
            Ok(false) => tracing::warn!(
                dev_id = self.dev_id,
                "deleted device; it is still held open (mounted?): its id is freed once \
                 the last user lets go"
            ),
            Err(e) => tracing::error!(dev_id = self.dev_id, "delete: {e}"),
        }
    }
}

/// How long a stopping server waits for its device's id to be freed after deleting it.
const DELETE_GRACE: Duration = Duration::from_secs(5);

/// Blocks SIGINT and SIGTERM for the calling thread (and threads it spawns) while alive, and
/// takes them from a signalfd instead.
struct SignalBlock {
    old: SigSet,
    fd: SignalFd,
}

fn term_signals() -> SigSet {
    Signal::SIGINT | Signal::SIGTERM
}

impl SignalBlock {
    fn new() -> Result<Self> {
        let set = term_signals();
        // Opened before the mask changes, so a failure here leaves the mask as it was.
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| Error::io("opening a signalfd for SIGINT/SIGTERM", e.into()))?;
        let mut old = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
            .map_err(|e| Error::io("blocking SIGINT/SIGTERM", e.into()))?;
        Ok(SignalBlock { old, fd })
    }

    /// Waits up to `timeout` for SIGINT/SIGTERM; returns the signal number if one came.
    fn wait(&self, timeout: Duration) -> Option<i32> {
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, timeout).ok()? == 0 {
            return None;
        }
        let info = self.fd.read_signal().ok()??;
        i32::try_from(info.ssi_signo).ok()
    }
}

impl Drop for SignalBlock {
    fn drop(&mut self) {
        // Restores the mask saved in `new`; there is nothing to do if that fails.
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }
}

enum QueueEvent {
    Ready(u16, io::Result<()>),
    /// The queue thread ended: `Ok` when its loop ended as asked (the kernel aborted every
    /// tag, or a stop was requested), else why it died.
    Exited(u16, io::Result<()>),
}

/// Sends `Exited` when the queue thread ends, however it ends (a panic included).
struct ExitNotice {
    tx: mpsc::Sender<QueueEvent>,
    q_id: u16,
    result: Option<io::Result<()>>,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err(io::Error::other(if thread::panicking() {
                "the queue thread panicked"
            } else {
                "the queue thread ended without a result"
            }))
        });
        let _ = self.tx.send(QueueEvent::Exited(self.q_id, result));
    }
}

/// Waits until this process may read and write `path`, the node of an unprivileged device
/// that udev gives to the device's owner.
fn wait_handed_over(path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mode = nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK;
        match nix::unistd::access(path, mode) {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(_) => {
                return Err(Error::NotHandedOver {
                    path: path.into(),
                    uid: nix::unistd::geteuid().as_raw(),
                    secs: timeout.as_secs(),
                    left_behind: None,
                })
            }
        }
    }
}

fn open_char_device(path: &str) -> Result<File> {
    // devtmpfs creates the node during ADD_DEV; udev may still be adjusting it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok(f),
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                    ) =>
            {
                thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(Error::Open {
                    path: path.into(),
                    source,
                })
            }
        }
    }
}

/// Per-queue settings from the builder.
#[derive(Clone, Copy)]
struct QueueOptions {
    mode: BufferMode,
    sqpoll: Option<u32>,
    defer_taskrun: bool,
    batch: bool,
    /// User copy for a target that reads `Io::data`: the engine stages the bytes.
    stage: bool,
    /// `UBLK_F_NEED_GET_DATA`.
    need_get_data: bool,
    /// Server threads per queue.
    threads: u16,
    /// How long to wait for udev to hand an unprivileged device's block node over.
    handover_timeout: Duration,
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
fn serve<T: Target>(
    signals: &SignalBlock,
    ctrl: &ControlDevice,
    info: &DevInfo,
    params: &DeviceParams,
    (options, stats, resize): (QueueOptions, Option<StatsRegistry>, Option<SizeHandle>),
    target: T,
    guard: &mut DeviceGuard<'_>,
    on_started: impl FnOnce(&DeviceInfo),
) -> Result<()> {
    let dev_id = info.dev_id;
    if !guard.recovering {
        ctrl.set_params(dev_id, &params.to_sys())?;
    }
    let cdev = Arc::new(open_char_device(&info.char_path())?);
    let geo = params.geometry();
    let geo = crate::io::Geometry {
        max_io: geo.max_io.min(info.max_io_buf_bytes),
        ..geo
    };
    let target = Arc::new(target);
    let (tx, rx) = mpsc::channel();
    let mut shared_queues = Vec::new();
    let mut threads = Vec::new();
    let mut setup_error = None;
    'queues: for q_id in 0..info.nr_queues {
        let cpus = ctrl.queue_affinity(dev_id, q_id).unwrap_or_else(|e| {
            tracing::warn!(q = q_id, "no queue affinity: {e}");
            Vec::new()
        });
        for first_tag in 0..options.threads {
            let queue_cdev = options.mode.uses_char_device().then(|| Arc::clone(&cdev));
            let arena = TagArena::new(info.queue_depth, geo.max_io);
            let shared = match arena.and_then(|a| QueueShared::new(a, queue_cdev, geo.size)) {
                Ok(s) => s,
                Err(source) => {
                    setup_error = Some(Error::Queue { q_id, source });
                    break 'queues;
                }
            };
            shared_queues.push(Arc::clone(&shared));
            let setup = QueueSetup {
                q_id,
                depth: info.queue_depth,
                tags: (first_tag, options.threads),
                geo,
                cdev: Arc::clone(&cdev),
                cpus: cpus.clone(),
                mode: options.mode,
                sqpoll: options.sqpoll,
                defer_taskrun: options.defer_taskrun,
                batch: options.batch,
                stage: options.stage,
                need_get_data: options.need_get_data,
                stats: stats.clone(),
            };
            let (target, tx) = (Arc::clone(&target), tx.clone());
            let name = if options.threads > 1 {
                format!("ublk{dev_id}-q{q_id}.{first_tag}")
            } else {
                format!("ublk{dev_id}-q{q_id}")
            };
            let spawned = thread::Builder::new().name(name).spawn(move || {
                let mut exit = ExitNotice {
                    tx: tx.clone(),
                    q_id,
                    result: None,
                };
                exit.result = Some(queue::run(&*target, setup, shared, |r| {
                    let _ = tx.send(QueueEvent::Ready(q_id, r));
                }));
            });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    setup_error = Some(Error::Queue { q_id, source });
                    break 'queues;
                }
            }
        }
    }
    drop(tx);
    if let Some(handle) = &guard.quiesce {
        handle.attach(dev_id, info.flags);
    }
    if let Some(handle) = &resize {
        handle.attach(Resizable {
            dev_id,
            logical_block_size: params.logical_block_size,
            queues: shared_queues.clone(),
        });
    }

    let result = setup_error.map_or_else(
        || {
            start_and_wait(
                signals,
                ctrl,
                info,
                (params, options),
                &rx,
                guard,
                on_started,
            )
        },
        Err,
    );

    // Stop first (kernel drains in-flight I/O through our still-running queues), then let
    // the queue threads go, close the char device, and let the guard delete the device.
    // A dead queue thread drains nothing: its requests end only when the char device is
    // closed (the kernel fails them then), so STOP_DEV, which waits for them, comes after.
    let queue_died = guard.started && matches!(result, Err(Error::Queue { .. }));
    if !queue_died {
        guard.teardown();
    }
    if let Some(handle) = &resize {
        handle.detach();
    }
    if let Some(handle) = &guard.quiesce {
        handle.detach();
    }
    for shared in &shared_queues {
        shared.request_stop();
    }
    for handle in threads {
        if handle.join().is_err() {
            tracing::error!(dev_id, "a queue thread panicked");
        }
    }
    drop(cdev);
    if queue_died {
        if info.flags & sys::UBLK_F_USER_RECOVERY != 0 {
            // Like a server that died: the device waits for `recover`.
            guard.owned = false;
            guard.started = false;
            tracing::error!(
                dev_id,
                "a queue thread died: the device is left for a recovering server"
            );
        } else {
            guard.teardown();
        }
    }
    result
}

fn start_and_wait(
    signals: &SignalBlock,
    ctrl: &ControlDevice,
    info: &DevInfo,
    (params, options): (&DeviceParams, QueueOptions),
    rx: &mpsc::Receiver<QueueEvent>,
    guard: &mut DeviceGuard<'_>,
    on_started: impl FnOnce(&DeviceInfo),
) -> Result<()> {
    let mut ready = 0;
    while ready < u32::from(info.nr_queues) * u32::from(options.threads) {
        match rx.recv() {
            Ok(QueueEvent::Ready(_, Ok(()))) => ready += 1,
            Ok(QueueEvent::Ready(q_id, Err(source))) => return Err(Error::Queue { q_id, source }),
            Ok(QueueEvent::Exited(q_id, result)) => {
                return Err(Error::Queue {
                    q_id,
                    source: result
                        .err()
                        .unwrap_or_else(|| io::Error::other("queue thread exited during setup")),
                })
            }
            Err(mpsc::RecvError) => {
                return Err(Error::io(
                    "starting queues",
                    io::Error::other("every queue thread exited"),
                ))
            }
        }
    }
    let pid = std::process::id();
    if guard.recovering {
        ctrl.end_recovery(info.dev_id, pid as i32)?;
        guard.owned = true;
        guard.started = true;
        tracing::info!(dev_id = info.dev_id, "device recovered");
    } else {
        guard.started = true;
        ctrl.start(info.dev_id, pid as i32)?;
    }
    let started = DeviceInfo {
        dev_id: info.dev_id,
        block_path: info.block_path(),
        size: params.size,
        queues: info.nr_queues,
        depth: info.queue_depth,
        max_io: info.max_io_buf_bytes,
        flags: info.flags,
        pid,
        buffer_mode: options.mode,
        sqpoll: options.sqpoll,
        batch_io: options.batch,
        threads_per_queue: options.threads,
        defer_taskrun: options.defer_taskrun,
    };
    tracing::info!(dev_id = info.dev_id, path = %started.block_path, "device started");
    if info.is_unprivileged() {
        // The user gets /dev/ublkbN once udev has handed it over too.
        wait_handed_over(&started.block_path, options.handover_timeout)?;
    }
    on_started(&started);
    loop {
        if let Some(sig) = signals.wait(Duration::from_millis(100)) {
            tracing::info!(dev_id = info.dev_id, sig, "signal received: stopping");
            return Ok(());
        }
        match rx.try_recv() {
            Ok(QueueEvent::Exited(q_id, Ok(()))) => {
                if guard.quiesce.as_ref().is_some_and(QuiesceHandle::requested) {
                    // QUIESCE_DEV ended the queues: the device waits for its next server.
                    guard.owned = false;
                    guard.started = false;
                    tracing::info!(
                        dev_id = info.dev_id,
                        "device quiesced: left to its next server"
                    );
                    return Ok(());
                }
                tracing::info!(
                    dev_id = info.dev_id,
                    q = q_id,
                    "queue ended: device stopped"
                );
                return Ok(());
            }
            Ok(QueueEvent::Exited(q_id, Err(source))) => {
                tracing::error!(
                    dev_id = info.dev_id,
                    q = q_id,
                    "queue thread died: {source}"
                );
                return Err(Error::Queue { q_id, source });
            }
            Ok(QueueEvent::Ready(..)) | Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::raise;

    #[test]
    fn signal_block_times_out_then_takes_a_raised_signal() {
        // Its own thread: the mask change and the thread-directed signal stay inside it.
        thread::spawn(|| {
            let before = SigSet::thread_get_mask().expect("get mask");
            let signals = SignalBlock::new().expect("signalfd and sigmask");
            let t0 = Instant::now();
            assert_eq!(signals.wait(Duration::from_millis(20)), None);
            assert!(t0.elapsed() >= Duration::from_millis(15));
            // Blocked, so it stays pending for the wait instead of ending the process.
            raise(Signal::SIGTERM).expect("raise SIGTERM");
            assert_eq!(signals.wait(Duration::from_secs(5)), Some(libc::SIGTERM));
            assert_eq!(signals.wait(Duration::ZERO), None);
            let blocked = SigSet::thread_get_mask().expect("get mask");
            assert!(blocked.contains(Signal::SIGINT) && blocked.contains(Signal::SIGTERM));
            drop(signals);
            assert_eq!(SigSet::thread_get_mask().expect("get mask"), before);
        })
        .join()
        .expect("signal test thread");
    }
}
