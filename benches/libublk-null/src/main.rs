//! A null ublk server built on the `libublk` crate, to benchmark side by side with this
//! project's `ublk add null`.
//!
//! ```text
//! libublk-null [--queues N] [--depth D] [--size BYTES] [--zero-copy] [--async]
//!              [--affinity single|kernel]
//! ```
//!
//! It adds a device with the same defaults as `ublk add null` (1 queue, depth 128, 1 GiB,
//! 512 KiB largest I/O, 512-byte logical and 4 KiB physical blocks, the kernel's queue
//! affinity), prints `{"dev_id":N,"path":"/dev/ublkbN"}` on stdout once the block device
//! exists, completes every request at once with its full byte count, and on SIGTERM or
//! SIGINT stops and deletes the device and exits 0.
//!
//! The queues are served the way libublk's own `null` example serves them by default, its
//! fastest configuration: the synchronous closure path (`UblkQueue::wait_and_handle_io`,
//! one closure call per completed command, no executor) with each queue thread pinned to one
//! CPU of its hardware queue (`UBLK_DEV_F_SINGLE_CPU_AFFINITY`). `--async` serves them the
//! example's other way instead: one smol task per tag on a per-queue `LocalExecutor`, driven
//! by `wait_and_handle_io_events`. `--affinity kernel` leaves each queue thread on all the
//! CPUs the kernel maps to its queue. `--zero-copy` adds `UBLK_F_AUTO_BUF_REG`: the driver
//! registers each request's pages in the queue ring's buffer table and no per-tag buffer is
//! allocated.

#![deny(unsafe_op_in_unsafe_fn)]

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkIORes};

const USAGE: &str = "usage: libublk-null [--queues N] [--depth D] [--size BYTES] [--zero-copy] \
                     [--async] [--affinity single|kernel]";

/// Largest single I/O, as in `ublk add`.
const MAX_IO: u32 = 512 << 10;

/// How long to wait for udev/devtmpfs to create `/dev/ublkbN` after START_DEV.
const BDEV_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the main thread checks whether every queue thread has ended on its own
/// (the device was deleted from outside) while it waits for a signal.
const SIGNAL_POLL: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Args {
    queues: u16,
    depth: u16,
    size: u64,
    zero_copy: bool,
    /// The smol task-per-tag path instead of the synchronous closure path.
    async_path: bool,
    /// Pin each queue thread to one CPU (`UBLK_DEV_F_SINGLE_CPU_AFFINITY`).
    single_cpu: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        queues: 1,
        depth: 128,
        size: 1 << 30,
        zero_copy: false,
        async_path: false,
        single_cpu: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--queues" => args.queues = parse_num(&name, &value()?)?,
            "--depth" => args.depth = parse_num(&name, &value()?)?,
            "--size" => args.size = parse_size(&value()?)?,
            "--zero-copy" if inline.is_none() => args.zero_copy = true,
            "--async" if inline.is_none() => args.async_path = true,
            "--affinity" => {
                args.single_cpu = match value()?.as_str() {
                    "single" => true,
                    "kernel" => false,
                    other => return Err(format!("--affinity {other:?}: single or kernel")),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    if args.queues == 0 || args.depth == 0 {
        return Err("--queues and --depth must be at least 1".into());
    }
    if args.size == 0 || args.size % 4096 != 0 {
        return Err(format!(
            "--size {} must be a positive multiple of 4096",
            args.size
        ));
    }
    Ok(args)
}

fn parse_num<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{name}: {text:?} is not a valid number"))
}

/// Bytes, with an optional binary K, M, G or T suffix (`1G` = 2^30).
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&text[..text.len() - 1], 10),
        Some(b'M') => (&text[..text.len() - 1], 20),
        Some(b'G') => (&text[..text.len() - 1], 30),
        Some(b'T') => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    let n: u64 = parse_num("--size", digits)?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("--size {text} is too large"))
}

/// The device's limits, mirroring `ublk add null`'s (no volatile cache, no discard).
fn set_params(dev: &mut UblkDev, size: u64) {
    dev.tgt.dev_size = size;
    dev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs: 0,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 9,
            max_sectors: dev.dev_info.max_io_buf_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// Serves one tag until the queue goes down: fetch, then commit the full byte count of
/// each request and fetch the next one in the same command.
async fn serve_tag(q: &UblkQueue<'_>, tag: u16, zero_copy: bool) -> Result<(), UblkError> {
    let buf = (!zero_copy).then(|| IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize));
    let desc = match &buf {
        Some(b) => BufDesc::Slice(b.as_slice()),
        None => BufDesc::AutoReg(sys::ublk_auto_buf_reg {
            index: tag,
            ..Default::default()
        }),
    };
    q.submit_io_prep_cmd(tag, desc.clone(), 0, buf.as_ref())
        .await?;
    loop {
        let bytes = q.get_iod(tag).nr_sectors << 9;
        // A null device "does" every request at once. The byte count fits in i32: it is at
        // most max_io_buf_bytes (512 KiB).
        q.submit_io_commit_cmd(tag, desc.clone(), bytes as i32)
            .await?;
    }
}

/// One queue thread on the synchronous closure path: every completed FETCH/COMMIT command
/// calls the closure, which commits the request's full byte count and fetches the next
/// one in the same command.
fn serve_queue_sync(q_id: u16, dev: &UblkDev, zero_copy: bool) {
    let queue = match UblkQueue::new(q_id, dev) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("libublk-null: queue {q_id}: {e}");
            return;
        }
    };
    if zero_copy {
        let regs: Vec<sys::ublk_auto_buf_reg> = (0..dev.dev_info.queue_depth)
            .map(|tag| sys::ublk_auto_buf_reg {
                index: tag,
                ..Default::default()
            })
            .collect();
        serve_sync(q_id, queue, BufDescList::AutoRegs(&regs), |tag| {
            BufDesc::AutoReg(regs[usize::from(tag)])
        });
    } else {
        let bufs = dev.alloc_queue_io_bufs();
        serve_sync(q_id, queue, BufDescList::Slices(Some(&bufs)), |tag| {
            BufDesc::Slice(bufs[usize::from(tag)].as_slice())
        });
    }
}

/// Fetches on every tag with `list`, then completes each request at once with its full
/// byte count and the tag's buffer `desc(tag)`, until the queue goes down.
fn serve_sync<'a>(
    q_id: u16,
    queue: UblkQueue<'_>,
    list: BufDescList<'a>,
    desc: impl Fn(u16) -> BufDesc<'a>,
) {
    let queue = match queue.submit_fetch_commands_unified(list) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("libublk-null: queue {q_id}: fetch: {e}");
            return;
        }
    };
    queue.wait_and_handle_io(|q: &UblkQueue, tag: u16, _: &UblkIOCtx| {
        let bytes = (q.get_iod(tag).nr_sectors << 9) as i32;
        if let Err(e) = q.complete_io_cmd_unified(tag, desc(tag), Ok(UblkIORes::Result(bytes))) {
            eprintln!("libublk-null: queue {q_id} tag {tag}: {e}");
        }
    });
}

/// One queue thread on the async path: a task per tag on a local executor, driven by the
/// queue's ring.
fn serve_queue_async(q_id: u16, dev: &UblkDev, zero_copy: bool) {
    let q = match UblkQueue::new(q_id, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            eprintln!("libublk-null: queue {q_id}: {e}");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let tasks: Vec<_> = (0..dev.dev_info.queue_depth)
        .map(|tag| {
            let q = Rc::clone(&q);
            exe.spawn(async move {
                match serve_tag(&q, tag, zero_copy).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => eprintln!("libublk-null: queue {q_id} tag {tag}: {e}"),
                }
            })
        })
        .collect();
    let run_ops = || while exe.try_tick() {};
    let is_done = || tasks.iter().all(|t| t.is_finished());
    let events = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, is_done);
    if let Err(e) = smol::block_on(exe.run(events)) {
        eprintln!("libublk-null: queue {q_id} event loop: {e}");
    }
}

/// The signals that end the server, blocked in every thread so that only `wait_for_stop`
/// receives them.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset only adds to it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

fn block_stop_signals() -> Result<(), String> {
    let set = stop_signals();
    // SAFETY: `set` is an initialised sigset_t; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!(
            "blocking SIGTERM/SIGINT: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    Ok(())
}

/// Waits until SIGTERM or SIGINT arrives, or `queues_done` reaches `nr_queues` (every
/// queue thread ended: the device was stopped or deleted from outside).
fn wait_for_stop(queues_done: &AtomicUsize, nr_queues: usize) {
    let set = stop_signals();
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: SIGNAL_POLL.as_nanos() as libc::c_long,
    };
    while queues_done.load(Ordering::Acquire) < nr_queues {
        // SAFETY: `set` and `timeout` are initialised and outlive the call; no siginfo is
        // asked for.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            return;
        }
    }
}

fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

fn run(args: Args) -> Result<(), String> {
    block_stop_signals()?;
    let ctrl_flags = if args.zero_copy {
        u64::from(sys::UBLK_F_AUTO_BUF_REG)
    } else {
        0
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("libublk-null")
        .nr_queues(args.queues)
        .depth(args.depth)
        .io_buf_bytes(MAX_IO)
        .ctrl_flags(ctrl_flags)
        .dev_flags(if args.single_cpu {
            UblkFlags::UBLK_DEV_F_ADD_DEV | UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY
        } else {
            UblkFlags::UBLK_DEV_F_ADD_DEV
        })
        .build()
        .map_err(|e| format!("adding the device: {e}"))?;

    let size = args.size;
    let zero_copy = args.zero_copy;
    let async_path = args.async_path;
    let queues_done = Arc::new(AtomicUsize::new(0));
    let done = Arc::clone(&queues_done);
    let serve = move |q_id: u16, dev: &UblkDev| {
        if async_path {
            serve_queue_async(q_id, dev, zero_copy);
        } else {
            serve_queue_sync(q_id, dev, zero_copy);
        }
        done.fetch_add(1, Ordering::Release);
    };
    let nr_queues = usize::from(args.queues);
    let announced = Arc::new(AtomicBool::new(false));
    let announce = Arc::clone(&announced);
    let on_started = move |ctrl: &UblkCtrl| {
        let dev_id = ctrl.dev_info().dev_id;
        let path = ctrl.get_bdev_path();
        if wait_for_path(Path::new(&path), BDEV_TIMEOUT) {
            let mut out = std::io::stdout().lock();
            // If stdout is gone there is nobody to tell; serve anyway until told to stop.
            let _ = writeln!(out, "{{\"dev_id\":{dev_id},\"path\":\"{path}\"}}");
            let _ = out.flush();
            announce.store(true, Ordering::Release);
            wait_for_stop(&queues_done, nr_queues);
        } else {
            eprintln!(
                "libublk-null: {path} did not appear within {} s",
                BDEV_TIMEOUT.as_secs()
            );
        }
        // Ends every queue's FETCH/COMMIT commands with an abort, so the queue threads
        // return; run_target joins them. ENODEV etc. here means it is already stopped.
        let _ = ctrl.kill_dev();
    };
    let init = |dev: &mut UblkDev| {
        set_params(dev, size);
        Ok(())
    };
    ctrl.run_target(init, serve, on_started)
        .map_err(|e| format!("serving the device: {e}"))?;
    ctrl.del_dev()
        .map_err(|e| format!("deleting the device: {e}"))?;
    if !announced.load(Ordering::Acquire) {
        return Err("the block device never appeared".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("libublk-null: {msg}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("libublk-null: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
