//! `ublk`: start, list and remove user-space block devices.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use ublk_core::{
    feature_names, parse_size, BoxTarget, BufferMode, ControlDevice, DeviceBuilder, DeviceInfo,
    QueueSnapshot, QuiesceHandle, SizeHandle, StatsRegistry,
};
use ublk_targets::compress;
use ublk_targets::compress::format::{Algo, Layout};
use ublk_targets::control::{self, ControlServer, ServerState};
use ublk_targets::faulty::FaultOps;
use ublk_targets::file::FileTarget;
use ublk_targets::null::Null;
use ublk_targets::ram::Ram;
use ublk_targets::saved::{self, SavedDevice};
use ublk_targets::stack::{self, BuildOptions, NodeDesc};
use ublk_targets::stats;
use ublk_targets::TargetKind;

#[derive(Parser)]
#[command(
    name = "ublk",
    version,
    about = "User-space block devices on the kernel's ublk driver"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a device served by a target; prints one JSON object once /dev/ublkbN exists.
    Add(Box<AddArgs>),
    /// Stop and delete devices.
    Del {
        /// Device id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u32>,
        /// Delete every ublk device.
        #[arg(long)]
        all: bool,
        /// Refuse (and change nothing) while the block device is open: mounted, or held
        /// by a process (kernel TRY_STOP_DEV).
        #[arg(long)]
        safe: bool,
    },
    /// Start a new server for a device added with --recovery whose server died, from the
    /// state `ublk add` saved under /run/ublk/; waiting I/O resumes. Prints the device's
    /// JSON like `add`.
    Recover {
        /// Device id.
        id: u32,
        /// Serve in this process instead of a background one.
        #[arg(long)]
        foreground: bool,
        /// Background server: write its log here [default: the log of `ublk add`, if any].
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// For udev: print the owner (`UID GID`) of an unprivileged device's node NAME
    /// (ublkcN, ublkbN or a partition of it), for the rule to give the node to; exits 1,
    /// printing nothing, for a privileged device.
    UdevOwner {
        /// The kernel's name of the node (udev's %k).
        name: String,
    },
    /// Replace a running device's server with a new one started from the `ublk` binary on
    /// disk now, keeping the device and its I/O (live upgrade): the old server finishes the
    /// requests in flight and exits (QUIESCE_DEV), new I/O waits, and a new server takes
    /// over as `ublk recover` does. For devices added with --recovery. Prints the device's
    /// JSON like `add`.
    Upgrade {
        /// Device id.
        id: u32,
        /// Seconds the requests in flight get to finish before the upgrade is abandoned
        /// (nothing changed).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The new server's log [default: the log of `ublk add`, if any].
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// List devices.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Print the kernel's ublk features by name.
    Features {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show a running device's tree: each node's kind, fields and I/O counters; a mirror's
    /// state and each leg's.
    Status {
        /// Device id.
        id: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Follow the mirrors' rebuilds and resyncs until none is left, then exit 0: a
        /// progress bar each, redrawn every second, on a terminal; otherwise (or with
        /// --json) one JSON line per mirror every second.
        #[arg(long)]
        watch: bool,
    },
    /// Show a running device's live statistics: per queue and in total, for every node,
    /// IOPS and bandwidth by operation over an interval, requests in flight, errors, and
    /// latency percentiles (p50, p99, p99.9) of the server-side service time.
    Stats {
        /// Device id.
        id: u32,
        /// Print JSON.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Redraw every interval on a terminal; otherwise (or with --json) print one JSON
        /// line per interval. Stops on Ctrl-C.
        #[arg(long, conflicts_with = "prometheus")]
        watch: bool,
        /// Print the counters once in the Prometheus text exposition format.
        #[arg(long)]
        prometheus: bool,
        /// Seconds between the two samples that rates are computed from.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
    /// Make a faulty node fail or delay operations, or clear its rule.
    Fault(FaultArgs),
    /// Mark a mirror's leg faulty: it gets no more I/O until replaced. The last in-sync
    /// leg is refused.
    Fail {
        /// Device id.
        id: u32,
        /// The leg's address: /1 for the second leg of a mirror at the root, /0/1 ...
        node: String,
    },
    /// Put a new target in the place of a faulty leg (fail it first) and rebuild it.
    Replace {
        /// Device id.
        id: u32,
        /// The leg's address, as for `ublk fail`.
        node: String,
        /// The new leg: a leaf or any stack expression, e.g. file:/dev/sdd.
        expr: String,
    },
    /// Verify a compressed image offline, without a device and without writing to it:
    /// superblocks, map checkpoint, journal replay, every extent, space accounting. Exits 0
    /// when the image is clean, 1 when it is damaged, 2 when it cannot be read.
    #[command(visible_alias = "fsck")]
    Check {
        /// The image: compress:PATH (a file or block device).
        image: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a running file device's size (kernel UPDATE_SIZE), growing its file first; a
    /// file system on it can then grow too (resize2fs).
    Resize {
        /// Device id.
        id: u32,
        /// The new size in bytes, with an optional K, M, G or T suffix (binary).
        #[arg(value_parser = parse_size_arg)]
        size: u64,
    },
    /// Limit the copying of rebuilds and resyncs, for every mirror of the device.
    Rebuild {
        /// Device id.
        id: u32,
        /// Bytes per second, with an optional K, M, G or T suffix (binary), e.g. 50M; 0 for
        /// no limit.
        #[arg(long, value_parser = parse_size_arg)]
        rate: u64,
    },
}

#[derive(Args)]
struct FaultArgs {
    /// Device id.
    id: u32,
    /// The faulty node's address: / for the root, /0 for its first child, /1/0 ...
    node: String,
    /// Fail these operations with EIO: read, write, flush or all.
    #[arg(long, value_parser = parse_fault_ops)]
    fail: Option<FaultOps>,
    /// Only operations overlapping OFFSET:LEN (sizes with K/M/G suffixes, e.g. 1M:64K).
    #[arg(long, value_parser = parse_range)]
    range: Option<(u64, u64)>,
    /// Only every Nth matching operation.
    #[arg(long)]
    every: Option<u64>,
    /// Delay matching operations by this many milliseconds (without --fail: every
    /// operation, then passed on).
    #[arg(long)]
    delay: Option<u64>,
    /// Remove the node's rule: everything passes through again.
    #[arg(long, conflicts_with_all = ["fail", "range", "every", "delay"])]
    clear: bool,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.01..=3600.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0.01 to 3600"
        )),
    }
}

fn parse_fault_ops(text: &str) -> Result<FaultOps, String> {
    FaultOps::from_name(text).ok_or_else(|| format!("{text:?}: use read, write, flush or all"))
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (off, len) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected OFFSET:LEN, e.g. 1M:64K"))?;
    let off = parse_size(off).map_err(|e| e.to_string())?;
    let len = parse_size(len).map_err(|e| e.to_string())?;
    off.checked_add(len).ok_or("offset + length is too large")?;
    Ok((off, len))
}

#[derive(Args, Clone)]
struct AddArgs {
    /// Target: null, ram, file, compress (over --path), rbd (--pool, --image), or stack
    /// followed by a stack expression.
    target: String,
    /// stack: the tree, e.g. 'stripe(file:/dev/sdb,file:/dev/sdc,chunk=128K)'.
    expr: Option<String>,
    /// Size in bytes, with an optional K, M, G or T suffix [default: 1G; file: the file's size;
    /// compress: the logical size, needed only for a new image].
    #[arg(long, value_parser = parse_size_arg)]
    size: Option<u64>,
    /// Number of queues (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 128)]
    depth: u16,
    /// Device id (default: the kernel picks one).
    #[arg(long)]
    id: Option<u32>,
    /// Largest single I/O, with an optional suffix.
    #[arg(long, default_value = "512K", value_parser = parse_size_arg)]
    max_io: u64,
    /// Logical block size.
    #[arg(long, default_value_t = 512)]
    logical_block_size: u32,
    /// ram: keep the data in this file (e.g. under /dev/shm) instead of an anonymous memfd.
    #[arg(long)]
    backing: Option<PathBuf>,
    /// file: the backing file (created with --size if missing, grown if smaller). compress:
    /// the image (created sparse if missing, with room for every block stored raw).
    #[arg(long)]
    path: Option<PathBuf>,
    /// file, compress: open the backing file with O_DIRECT (bypass the page cache).
    #[arg(long)]
    direct: bool,
    /// compress: the algorithm of new extents, lz4, zstd or zstd:LEVEL [default: lz4 for a
    /// new image; an existing one keeps its own].
    #[arg(long, value_parser = parse_algo)]
    algo: Option<Algo>,
    /// compress: threads that run the codec for every queue, so a queue keeps serving while
    /// blocks compress [default: 0, each queue thread compresses its own].
    #[arg(long)]
    workers: Option<usize>,
    /// How data moves between kernel and server: copy, registered (tag buffers registered
    /// with io_uring), zero-copy (kernel AUTO_BUF_REG; null and file targets),
    /// manual-zero-copy (REGISTER_IO_BUF per request; null and file) or user-copy (the
    /// server copies with pread/pwrite on the char device; RAM copies once) [default: copy;
    /// stack: zero-copy when no node touches the bytes, else copy].
    #[arg(long, value_parser = parse_buffer_mode)]
    buffer_mode: Option<BufferMode>,
    /// Shorthand for --buffer-mode zero-copy.
    #[arg(long, conflicts_with = "buffer_mode")]
    zero_copy: bool,
    /// Give each queue's io_uring a kernel polling thread (SQPOLL).
    #[arg(long)]
    sqpoll: bool,
    /// With --sqpoll: milliseconds without work before the polling thread sleeps.
    #[arg(long, default_value_t = 1000, requires = "sqpoll")]
    sq_thread_idle: u32,
    /// Run each queue ring's completion work only when the queue thread waits
    /// (IORING_SETUP_DEFER_TASKRUN) instead of interrupting it.
    #[arg(long, conflicts_with = "sqpoll")]
    defer_taskrun: bool,
    /// Batched queues (kernel UBLK_F_BATCH_IO): requests arrive in batches from one
    /// multishot fetch per queue and each loop turn commits all results with one command.
    #[arg(long)]
    batch: bool,
    /// Hold request buffers only while requests are in flight (kernel UBLK_F_NEED_GET_DATA),
    /// taken from a per-queue pool, instead of a buffer of --max-io bytes per tag: less
    /// memory for idle devices, one more command per write. Copy mode only.
    #[arg(long, conflicts_with_all = ["sqpoll", "batch", "zero_copy"])]
    need_get_data: bool,
    /// Server threads per queue, each serving every N-th tag with its own io_uring (kernel
    /// UBLK_F_PER_IO_DAEMON when above 1).
    #[arg(long, default_value_t = 1)]
    threads_per_queue: u16,
    /// Serve in this process instead of a background one.
    #[arg(long)]
    foreground: bool,
    /// Background server: write its log here (default: discarded).
    #[arg(long)]
    log: Option<PathBuf>,
    /// rbd: the Ceph pool of the image.
    #[arg(long)]
    pool: Option<String>,
    /// rbd: the image to map.
    #[arg(long)]
    image: Option<String>,
    /// rbd: map this snapshot of the image, read-only.
    #[arg(long)]
    snap: Option<String>,
    /// rbd: the Ceph configuration file [default: Ceph's own search, /etc/ceph/ceph.conf].
    #[arg(long)]
    conf: Option<PathBuf>,
    /// rbd: the Ceph client id (as rbd's --id; --id here is the device id).
    #[arg(long, default_value = "admin")]
    user: String,
    /// rbd: seconds to wait for the monitors before failing.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// stack: make every mirror in the tree new, even on legs that carry one (or whose
    /// metadata is damaged); the legs' data is lost. Refused for the other targets.
    #[arg(long)]
    force_new: bool,
    /// Keep the device when its server dies (kernel USER_RECOVERY): its I/O waits
    /// (reissue, the default: in-flight requests are sent again to the next server) or
    /// fails at once (fail-io) until `ublk recover ID` starts a new server from what this
    /// command saves in /run/ublk/ublkID.json. A ram device then keeps its memory in a
    /// file under /dev/shm (unless --backing), removed by `ublk del`.
    #[arg(long, num_args = 0..=1, default_missing_value = "reissue", value_parser = parse_recovery)]
    recovery: Option<Recovery>,
    /// Add the device as this (non-root) user, who then owns it: only this user or root may
    /// delete it (kernel UNPRIVILEGED_DEV). Needs /dev/ublk-control open to the user and
    /// udev handing the new nodes to their owner (udev/99-ublk.rules); the server waits
    /// --udev-timeout seconds for that. Copy or registered buffer mode; no --recovery.
    #[arg(long, conflicts_with = "recovery")]
    unprivileged: bool,
    /// --unprivileged: seconds to wait for udev to hand over /dev/ublkcN and /dev/ublkbN.
    #[arg(long, default_value_t = 10, requires = "unprivileged")]
    udev_timeout: u64,
    /// Internal: run as the background server started by `ublk add`.
    #[arg(long, hide = true)]
    daemon_child: bool,
    /// Internal: take over device ID instead of adding one (`ublk recover`).
    #[arg(long, hide = true)]
    recover_id: Option<u32>,
}

/// What happens to a recoverable device's I/O while it has no server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// I/O waits; requests the dead server held are reissued to the next one.
    Reissue,
    /// I/O fails with EIO until the next server is up.
    FailIo,
}

impl Recovery {
    fn name(self) -> &'static str {
        match self {
            Recovery::Reissue => "reissue",
            Recovery::FailIo => "fail-io",
        }
    }

    fn flags(self) -> u64 {
        ublk_core::sys::UBLK_F_USER_RECOVERY
            | match self {
                Recovery::Reissue => ublk_core::sys::UBLK_F_USER_RECOVERY_REISSUE,
                Recovery::FailIo => ublk_core::sys::UBLK_F_USER_RECOVERY_FAIL_IO,
            }
    }
}

fn parse_recovery(text: &str) -> Result<Recovery, String> {
    match text {
        "reissue" => Ok(Recovery::Reissue),
        "fail-io" => Ok(Recovery::FailIo),
        _ => Err(format!("{text:?}: use reissue or fail-io")),
    }
}

fn parse_buffer_mode(text: &str) -> Result<BufferMode, String> {
    BufferMode::from_name(text).ok_or_else(|| {
        let names: Vec<_> = BufferMode::ALL.iter().map(|m| m.name()).collect();
        format!("unknown buffer mode {text:?}: use {}", names.join(", "))
    })
}

fn parse_algo(text: &str) -> Result<Algo, String> {
    Algo::parse(text)
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

type CliResult<T = ()> = Result<T, String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Check { image, json } => return check(&image, json),
        Cmd::Add(args) => add(*args),
        Cmd::Del { id, all, safe } => del(id, all, safe),
        Cmd::Recover {
            id,
            foreground,
            log,
        } => recover(id, foreground, log),
        Cmd::UdevOwner { name } => return udev_owner(&name),
        Cmd::Upgrade { id, timeout, log } => upgrade(id, timeout, log),
        Cmd::List { json } => list(json),
        Cmd::Features { json } => features(json),
        Cmd::Status { id, json, watch } if watch => watch_status(id, json),
        Cmd::Status { id, json, .. } => status(id, json),
        Cmd::Stats {
            id,
            json,
            watch,
            prometheus,
            interval,
        } => stats(id, json, watch, prometheus, interval),
        Cmd::Fault(args) => fault(args),
        Cmd::Fail { id, node } => fail(id, &node),
        Cmd::Replace { id, node, expr } => replace(id, &node, &expr),
        Cmd::Rebuild { id, rate } => rebuild(id, rate),
        Cmd::Resize { id, size } => resize(id, size),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ublk: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `ublk check compress:PATH`: the image opened read-only, checked, and its report printed;
/// the exit code says clean (0), damaged (1) or unreadable (2).
fn check(image: &str, as_json: bool) -> ExitCode {
    let unreadable = |msg: String| {
        eprintln!("ublk: error: {msg}");
        ExitCode::from(2)
    };
    let path = match image.split_once(':') {
        Some(("compress", path)) if !path.is_empty() => path,
        _ => return unreadable(format!("{image:?}: expected compress:PATH")),
    };
    let file = match FileTarget::open_read_only(std::path::Path::new(path)) {
        Ok(file) => file,
        Err(e) => return unreadable(format!("{path}: {e}")),
    };
    let child: BoxTarget = Arc::new(file);
    let report = match compress::check(&child) {
        Ok(report) => report,
        Err(e) => return unreadable(format!("{path}: {e}")),
    };
    if as_json {
        println!("{}", report_json(path, &report));
    } else {
        print!("{path}: {report}");
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn report_json(path: &str, r: &compress::Report) -> Value {
    let sb = r.superblock.as_ref().map(|sb| {
        json!({
            "generation": sb.generation,
            "algo": sb.algo.to_string(),
            "active_map": if sb.active_map == 0 { "A" } else { "B" },
            "checkpoint_seq": sb.checkpoint_seq,
            "map_blocks": sb.layout.map_blocks,
            "journal_blocks": sb.layout.journal_blocks,
            "data_offset": sb.layout.data,
        })
    });
    json!({
        "path": path,
        "clean": r.is_clean(),
        "child_bytes": r.child_bytes,
        "superblock_a": r.copies[0],
        "superblock_b": r.copies[1],
        "superblock": sb,
        "logical_bytes": r.logical_bytes,
        "map_blocks_checked": r.map_blocks,
        "journal_blocks_replayed": r.journal_blocks,
        "journal_records_replayed": r.replayed,
        "journal_end": r.journal_end,
        "extents": r.extents,
        "damaged_extents": r.damaged_extents,
        "stored_bytes": r.stored_bytes,
        "allocated_bytes": r.allocated_bytes,
        "data_area_bytes": r.data_area_bytes,
        "damage": r.damage,
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UBLK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The device size: `--size`, else the backing file's size for `file`, else 1 GiB (a stack's
/// and a compressed image's come from the tree when it is built).
fn device_size(args: &AddArgs, kind: TargetKind) -> CliResult<u64> {
    match (args.size, kind, &args.path) {
        (Some(size), _, _) if !kind.sized_by_tree() => Ok(size),
        (None, TargetKind::File, Some(path)) => std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e} (give --size to create it)", path.display())),
        _ => Ok(1 << 30),
    }
}

fn builder(args: &AddArgs, kind: TargetKind) -> CliResult<DeviceBuilder> {
    let max_io = u32::try_from(args.max_io).map_err(|_| "--max-io is too large".to_string())?;
    // A recovered device keeps the size it has now (`ublk resize` may have changed it).
    let size = match args.recover_id {
        Some(id) => ControlDevice::open()
            .and_then(|c| c.params(id))
            .map(|p| p.basic.dev_sectors.saturating_mul(512))
            .map_err(|e| format!("device {id}: {e}"))?,
        None => device_size(args, kind)?,
    };
    let mut b = DeviceBuilder::new()
        .size(size)
        .logical_block_size(args.logical_block_size)
        .queues(args.queues)
        .depth(args.depth)
        .max_io_size(max_io)
        .server_flags(kind.code())
        .buffer_mode(explicit_mode(args).unwrap_or_default())
        .sqpoll(args.sqpoll.then_some(args.sq_thread_idle))
        .defer_taskrun(args.defer_taskrun)
        .batch_io(args.batch)
        .need_get_data(args.need_get_data)
        .threads_per_queue(args.threads_per_queue)
        .unprivileged(args.unprivileged)
        .handover_timeout(Duration::from_secs(args.udev_timeout));
    if let Some(id) = args.id {
        b = b.id(id);
    }
    if let Some(recovery) = args.recovery {
        b = b.flags(recovery.flags());
    }
    if let Some(id) = args.recover_id {
        b = b.recover(id);
    }
    match kind {
        TargetKind::Ram => b = b.discard(true).write_zeroes(true),
        TargetKind::File | TargetKind::Stack | TargetKind::Compress | TargetKind::Rbd => {
            b = b
                .discard(true)
                .write_zeroes(true)
                .volatile_cache(true)
                .fua(true)
        }
        _ => {}
    }
    b.validate().map_err(|e| e.to_string())?;
    Ok(b)
}

fn add(args: AddArgs) -> CliResult {
    let kind = target_kind(&args)?;
    let builder = builder(&args, kind)?;
    if args.daemon_child {
        return serve_as_child(&args, kind, builder);
    }
    if !args.foreground {
        let mut child_args: Vec<String> = std::env::args().skip(1).collect();
        child_args.push("--daemon-child".into());
        return spawn_background(child_args, args.log.as_deref(), None);
    }
    init_logging();
    serve(&args, kind, builder, |info, expr| {
        println!("{}", info_json(info, kind, expr));
        let _ = std::io::stdout().flush();
    })
}

/// The target asked for, once its options are known to fit it.
fn target_kind(args: &AddArgs) -> CliResult<TargetKind> {
    let kind = TargetKind::from_name(&args.target).ok_or_else(|| {
        let names: Vec<_> = TargetKind::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown target {:?}: choose one of {}",
            args.target,
            names.join(", ")
        )
    })?;
    if args.force_new && kind != TargetKind::Stack {
        return Err("--force-new applies to stacks only (it makes their mirrors new)".into());
    }
    if args.backing.is_some() && kind != TargetKind::Ram {
        return Err("--backing applies to the ram target only".into());
    }
    let on_file = matches!(kind, TargetKind::File | TargetKind::Compress);
    if (args.path.is_some() || args.direct) && !on_file {
        return Err("--path and --direct apply to the file and compress targets only".into());
    }
    if on_file && args.path.is_none() {
        return Err(format!("the {} target needs --path FILE", kind.name()));
    }
    if args.algo.is_some() && kind != TargetKind::Compress {
        return Err("--algo applies to the compress target only".into());
    }
    if args.workers.is_some() && kind != TargetKind::Compress {
        return Err(
            "--workers applies to the compress target only (in a stack: compress(...,workers=N))"
                .into(),
        );
    }
    if args.recovery.is_some() && kind == TargetKind::Null {
        return Err("--recovery: a null device keeps no data, there is nothing to recover".into());
    }
    let rbd_args = args.pool.is_some() || args.image.is_some() || args.snap.is_some();
    if (rbd_args || args.conf.is_some()) && kind != TargetKind::Rbd {
        return Err("--pool, --image, --snap and --conf apply to the rbd target only".into());
    }
    if kind == TargetKind::Rbd && (args.pool.is_none() || args.image.is_none()) {
        return Err("the rbd target needs --pool POOL --image IMAGE".into());
    }
    match (kind, &args.expr) {
        (TargetKind::Stack, None) => {
            return Err("stack needs an expression: ublk add stack 'stripe(file:A,file:B)'".into())
        }
        (TargetKind::Stack, Some(text)) => {
            ublk_targets::expr::parse(text).map_err(|e| format!("stack expression: {e}"))?;
        }
        (_, Some(extra)) => return Err(format!("unexpected argument {extra:?}")),
        _ => {}
    }
    Ok(kind)
}

/// The mode asked for on the command line, if any.
fn explicit_mode(args: &AddArgs) -> Option<BufferMode> {
    if args.zero_copy {
        Some(BufferMode::ZeroCopy)
    } else {
        args.buffer_mode
    }
}

/// A single-node tree's description (the plain `null`, `ram` and `file` forms).
fn leaf_desc(kind: &'static str, target: &BoxTarget) -> NodeDesc {
    NodeDesc {
        path: "/".into(),
        kind,
        size: target.dyn_size().unwrap_or(0),
        fields: serde_json::Map::new(),
        needs_data: target.dyn_needs_data(),
        pos: 0,
        fault: None,
        mirror: None,
        compress: None,
        children: Vec::new(),
    }
}

/// The tree to serve: the target, its description and its expression (a plain target's is
/// its name).
fn tree(args: &AddArgs, kind: TargetKind, size: u64) -> CliResult<(BoxTarget, NodeDesc, String)> {
    Ok(match kind {
        TargetKind::Null => {
            let t: BoxTarget = Arc::new(Null::with_size(size));
            let d = leaf_desc("null", &t);
            (t, d, "null".into())
        }
        TargetKind::Ram => {
            let ram = match &args.backing {
                Some(path) => Ram::with_backing(path, size),
                None => Ram::new(size),
            }
            .map_err(|e| format!("ram target memory: {e}"))?;
            let t: BoxTarget = Arc::new(ram);
            let mut d = leaf_desc("ram", &t);
            if let Some(b) = &args.backing {
                d.fields.insert("backing".into(), json!(b));
            }
            (t, d, "ram".into())
        }
        TargetKind::File => {
            let path = args.path.as_deref().expect("checked in add");
            let file = FileTarget::open(path, Some(size), args.direct)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let t: BoxTarget = Arc::new(file);
            let mut d = leaf_desc("file", &t);
            d.fields.insert("path".into(), json!(path));
            d.fields.insert("direct".into(), json!(args.direct));
            (t, d, "file".into())
        }
        TargetKind::Compress => {
            let text = compress_expr(args)?;
            let s = stack::build(&text).map_err(|e| format!("compress: {}", e.msg))?;
            (s.target, s.desc, s.expr)
        }
        TargetKind::Rbd => {
            let text = rbd_expr(args)?;
            let s = stack::build(&text).map_err(|e| e.msg)?;
            (s.target, s.desc, s.expr)
        }
        TargetKind::Stack => {
            let text = args.expr.as_deref().expect("checked in add");
            let options = BuildOptions {
                force_new: args.force_new,
            };
            let s =
                stack::build_with(text, &options).map_err(|e| format!("stack expression: {e}"))?;
            (s.target, s.desc, s.expr)
        }
        _ => return Err(format!("target {} cannot be served", kind.name())),
    })
}

/// The stack expression `ublk add compress` stands for: `compress(file:FILE,size=SIZE,
/// algo=ALGO,workers=N)`. A missing FILE is created sparse, with room for every block stored raw (it
/// takes space only as extents are written); an empty one is grown to that size.
fn compress_expr(args: &AddArgs) -> CliResult<String> {
    let path = args.path.as_deref().expect("checked in add");
    let text = path.to_str().unwrap_or_default();
    if text.is_empty() || text.contains([',', '(', ')']) || text.trim() != text {
        return Err(format!(
            "{}: the path must be UTF-8 without ',', '(' or ')' or spaces at its ends",
            path.display()
        ));
    }
    let len = match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => None,
        Ok(m) => Some(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if len == Some(0) {
        let size = args.size.ok_or_else(|| {
            format!(
                "{}: no image there: give --size to make a new one",
                path.display()
            )
        })?;
        let child =
            Layout::child_size_for(size).ok_or_else(|| format!("--size {size} is too large"))?;
        Layout::new(size, child).map_err(|e| format!("--size {size}: {e}"))?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .and_then(|f| f.set_len(child).map(|()| f))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        drop(file);
    }
    let mut expr = if args.direct {
        format!("compress(file(path={text},direct=true)")
    } else {
        format!("compress(file:{text}")
    };
    if let Some(size) = args.size {
        expr.push_str(&format!(",size={}", exact_size(size)));
    }
    if let Some(algo) = args.algo {
        expr.push_str(&format!(",algo={algo}"));
    }
    if let Some(workers) = args.workers {
        expr.push_str(&format!(",workers={workers}"));
    }
    expr.push(')');
    Ok(expr)
}

/// The stack expression `ublk add rbd` stands for: `rbd(pool=P,image=I,snap=S,conf=PATH,
/// id=ID,timeout=T)`.
fn rbd_expr(args: &AddArgs) -> CliResult<String> {
    let bare = |what: &str, text: &str| {
        if text.is_empty()
            || text.contains([',', '(', ')', '='])
            || text.contains(char::is_whitespace)
        {
            Err(format!(
                "{what} {text:?}: must be non-empty, without ',', '(', ')', '=' or spaces"
            ))
        } else {
            Ok(())
        }
    };
    let pool = args.pool.as_deref().expect("checked in add");
    let image = args.image.as_deref().expect("checked in add");
    bare("--pool", pool)?;
    bare("--image", image)?;
    bare("--user", &args.user)?;
    let mut expr = format!("rbd(pool={pool},image={image}");
    if let Some(snap) = &args.snap {
        bare("--snap", snap)?;
        expr.push_str(&format!(",snap={snap}"));
    }
    if let Some(conf) = &args.conf {
        let text = conf.to_str().unwrap_or_default();
        bare("--conf", text)?;
        expr.push_str(&format!(",conf={text}"));
    }
    if args.user != "admin" {
        expr.push_str(&format!(",id={}", args.user));
    }
    if args.timeout != 30 {
        expr.push_str(&format!(",timeout={}", args.timeout));
    }
    expr.push(')');
    Ok(expr)
}

/// `n` bytes in the largest binary unit that divides it: `10G`, `1536K`, `1000`.
fn exact_size(n: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if n != 0 && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Chooses the buffer mode for `desc`: what was asked for, if the tree can serve it (a
/// zero-copy mode needs a tree in which no node touches the bytes); without a choice, a
/// stack runs zero-copy when it can and everything else copies.
fn choose_mode(args: &AddArgs, kind: TargetKind, desc: &NodeDesc) -> CliResult<BufferMode> {
    let needs = desc.first_needing_data();
    match (explicit_mode(args), needs) {
        (Some(mode), Some(node)) if mode.is_zero_copy() => Err(if kind == TargetKind::Stack {
            format!(
                "--buffer-mode {}: node {} ({}, at column {} of the expression) touches the \
                 bytes; zero-copy modes need a tree whose nodes only pass them on \
                 (use copy, registered or user-copy)",
                mode.name(),
                node.path,
                node.kind,
                node.pos + 1
            )
        } else {
            format!(
                "--buffer-mode {}: the {} target touches the bytes; zero-copy modes serve \
                 targets that only pass them on (null, file)",
                mode.name(),
                node.kind
            )
        }),
        (Some(mode), _) if args.need_get_data && mode != BufferMode::Copy => Err(format!(
            "--need-get-data works in copy mode only, not with --buffer-mode {}",
            mode.name()
        )),
        (Some(mode), _) => Ok(mode),
        (None, None) if kind == TargetKind::Stack && !args.need_get_data && !args.unprivileged => {
            Ok(BufferMode::ZeroCopy)
        }
        (None, _) => Ok(BufferMode::Copy),
    }
}

/// Serves the device and keeps its saved state (see `ublk_targets::saved`) in step with it:
/// written once a device added with --recovery is up, removed with any file made for it
/// once the device is gone.
fn serve(
    args: &AddArgs,
    kind: TargetKind,
    builder: DeviceBuilder,
    on_started: impl FnOnce(&DeviceInfo, &str),
) -> CliResult {
    let mut args = args.clone();
    let mut owned = Vec::new();
    let fresh = args.recover_id.is_none();
    if fresh && args.recovery.is_some() && kind == TargetKind::Ram && args.backing.is_none() {
        // The memory must outlive this server for the next one to serve it.
        let path = shm_path();
        args.backing = Some(path.clone());
        owned.push(path);
    }
    let mut started = None;
    let result = serve_tree(&args, kind, builder, |info, expr| {
        started = Some(info.dev_id);
        if fresh {
            // Whatever a dead device with this id left is stale now.
            for problem in saved::forget(info.dev_id) {
                tracing::warn!("stale state of device {}: {problem}", info.dev_id);
            }
            if let Some(recovery) = args.recovery {
                if let Err(e) = save_state(info.dev_id, recovery, &args, &owned) {
                    tracing::error!(
                        "device {}: cannot save its state ({e}): `ublk recover` will not work",
                        info.dev_id
                    );
                }
            }
        }
        on_started(info, expr);
    });
    match started.or(args.recover_id) {
        Some(id) if device_exists(id) => {}
        Some(id) => {
            for problem in saved::forget(id) {
                tracing::warn!("device {id}: {problem}");
            }
        }
        None => {
            let mut problems = Vec::new();
            for path in &owned {
                saved::remove_quietly(path, &mut problems);
            }
            for problem in problems {
                tracing::warn!("{problem}");
            }
        }
    }
    result
}

/// A new file under /dev/shm for a recoverable RAM device's memory.
fn shm_path() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    PathBuf::from(format!(
        "/dev/shm/ublk-ram-{}-{nanos:09}",
        std::process::id()
    ))
}

/// Saves what `ublk recover` needs: this command's arguments after `add`, without the
/// internal ones and without --force-new (the next server must find the mirrors this one
/// made), with the RAM device's memory file made explicit.
fn save_state(
    dev_id: u32,
    recovery: Recovery,
    args: &AddArgs,
    owned: &[PathBuf],
) -> std::io::Result<()> {
    let mut saved_args: Vec<String> = std::env::args()
        .skip(2)
        .filter(|a| {
            !matches!(
                a.as_str(),
                "--daemon-child" | "--foreground" | "--force-new"
            )
        })
        .collect();
    if let (false, Some(backing)) = (owned.is_empty(), &args.backing) {
        saved_args.push("--backing".into());
        saved_args.push(backing.to_string_lossy().into_owned());
    }
    // The stack expression is the positional after the target name.
    let expr_at = args.expr.as_ref().and_then(|expr| {
        let target = saved_args.iter().position(|a| *a == args.target)?;
        saved_args
            .iter()
            .skip(target + 1)
            .position(|a| a == expr)
            .map(|i| i + target + 1)
    });
    SavedDevice {
        dev_id,
        recovery: recovery.name().into(),
        cwd: std::env::current_dir()?,
        args: saved_args,
        owned_files: owned.to_vec(),
        expr_at,
    }
    .save()
}

fn device_exists(id: u32) -> bool {
    ControlDevice::open().and_then(|c| c.dev_info(id)).is_ok()
}

fn serve_tree(
    args: &AddArgs,
    kind: TargetKind,
    builder: DeviceBuilder,
    on_started: impl FnOnce(&DeviceInfo, &str),
) -> CliResult {
    let size = builder.device_params().size;
    let (target, desc, expr) = tree(args, kind, size)?;
    let mode = choose_mode(args, kind, &desc)?;
    let mut builder = builder.buffer_mode(mode);
    if kind.sized_by_tree() {
        // A stack's size is its tree's; --size may only confirm it (a compressed image
        // checked it against the image's own when it opened).
        if let Some(size) = args.size.filter(|&s| s != desc.size) {
            return Err(format!(
                "--size {size} differs from the size of the tree, {} bytes: drop --size",
                desc.size
            ));
        }
        builder = builder.size(desc.size);
        if desc.fields.get("read_only") == Some(&json!(true)) {
            // A snapshot: the kernel refuses writes before they reach the target.
            let mut params = *builder.device_params();
            params.read_only = true;
            builder = builder.params(params);
        }
        builder.validate().map_err(|e| e.to_string())?;
    }
    let stats = StatsRegistry::new();
    let sizer = SizeHandle::new();
    let quiescer = QuiesceHandle::new();
    let builder = builder
        .stats(stats.clone())
        .size_handle(sizer.clone())
        .quiesce_handle(quiescer.clone());
    let file = (kind == TargetKind::File)
        .then(|| args.path.clone())
        .flatten();
    let mut control = None;
    let result = builder.run_with(target, |info| {
        let dev_id = info.dev_id;
        let state =
            ServerState::new(dev_id, expr.clone(), desc, stats).on_tree_change(move |expr| {
                if let Err(e) = saved::update_expr(dev_id, expr) {
                    tracing::error!("device {dev_id}: cannot save the new tree: {e}");
                }
            });
        let state = match file.clone() {
            Some(path) => state.on_resize(move |bytes| resize_file(&path, bytes, &sizer)),
            None => state,
        };
        let state = state.on_quiesce(move |ms| {
            quiescer
                .quiesce(Duration::from_millis(ms))
                .map_err(|e| e.to_string())
        });
        let state = Arc::new(state);
        match ControlServer::start(state) {
            Ok(server) => control = Some(server),
            Err(e) => tracing::warn!("no control socket for device {}: {e}", info.dev_id),
        }
        on_started(info, &expr);
    });
    drop(control);
    result.map_err(|e| e.to_string())
}

/// A file device's `resize`: the file grows first (a block device must be large enough
/// already), then the device.
fn resize_file(path: &std::path::Path, bytes: u64, sizer: &SizeHandle) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.file_type().is_block_device() {
        let mut dev = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = std::io::Seek::seek(&mut dev, std::io::SeekFrom::End(0))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if len < bytes {
            return Err(format!("{} has only {len} bytes", path.display()));
        }
    } else if meta.len() < bytes {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(bytes))
            .map_err(|e| format!("growing {}: {e}", path.display()))?;
    }
    sizer.resize(bytes).map_err(|e| e.to_string())
}

/// `ublk resize ID SIZE`: asks the device's server to change the size.
fn resize(id: u32, size: u64) -> CliResult {
    control::request(id, &json!({"cmd": "resize", "size": size}))?;
    Ok(())
}

fn info_json(info: &DeviceInfo, kind: TargetKind, expr: &str) -> Value {
    json!({
        "dev_id": info.dev_id,
        "path": info.block_path,
        "target": kind.name(),
        "tree": expr,
        "size": info.size,
        "queues": info.queues,
        "depth": info.depth,
        "max_io": info.max_io,
        "pid": info.pid,
        "flags": feature_names(info.flags),
        "buffer_mode": info.buffer_mode.name(),
        "sqpoll": info.sqpoll.is_some(),
        "defer_taskrun": info.defer_taskrun,
        "batch": info.batch_io,
        "need_get_data": info.flags & ublk_core::sys::UBLK_F_NEED_GET_DATA != 0,
        "threads_per_queue": info.threads_per_queue,
    })
}

/// The background server: reports one line on stdout (the device JSON, or an error), then
/// lets go of stdout so the parent's reader sees EOF. A new device is kept only once the
/// parent has confirmed, with a line on our stdin, that it passed the report on: a parent
/// that died or gave up first (killed by a timeout on a loaded host, say) would otherwise
/// leave a device and a server nobody knows about, so they are removed instead. A
/// recovered device is served either way.
fn serve_as_child(args: &AddArgs, kind: TargetKind, builder: DeviceBuilder) -> CliResult {
    init_logging();
    let mut reported = false;
    let mut orphaned = false;
    let result = serve(args, kind, builder, |info, expr| {
        reported = true;
        let mut out = std::io::stdout();
        let sent = writeln!(out, "{}", info_json(info, kind, expr)).and_then(|()| out.flush());
        let mut ack = String::new();
        let acked =
            sent.is_ok() && std::io::stdin().read_line(&mut ack).is_ok() && ack.trim() == ADD_ACK;
        release_stdio();
        if !acked && args.recover_id.is_some() {
            // The device was the user's before this server came; serving it beats removing
            // it with the data its users are waiting for.
            tracing::warn!(
                "device {}: `ublk recover` went away before reporting it; serving anyway",
                info.dev_id
            );
        } else if !acked {
            orphaned = true;
            tracing::error!(
                "device {}: `ublk add` went away before reporting it: removing it",
                info.dev_id
            );
            // Taken by the device's signalfd: the run stops and deletes the device.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
        }
    });
    if let Err(msg) = &result {
        if !reported {
            println!("{}", json!({ "error": msg }));
            let _ = std::io::stdout().flush();
        }
    }
    if orphaned && result.is_ok() {
        return Err("`ublk add` went away before reporting the device: removed it".into());
    }
    result
}

/// The line `ublk add` sends its background server once it has printed the device.
const ADD_ACK: &str = "reported";

fn release_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        // dup2 onto fds 0 and 1 replaces our stdin and stdout with /dev/null; Rust's
        // handles keep working on the new file.
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
    }
}

/// Starts `ublk CHILD_ARGS` as a background server (its own process group, stderr to
/// `log`, in directory `cwd`), prints the device JSON it reports and confirms it (see
/// `serve_as_child`), or returns its error.
fn spawn_background(
    child_args: Vec<String>,
    log: Option<&std::path::Path>,
    cwd: Option<&std::path::Path>,
) -> CliResult {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log {}: {e}", path.display()))?,
        ),
        None => Stdio::null(),
    };
    let mut command = Command::new(exe);
    command
        .args(&child_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0);
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    let reply: Option<Value> = serde_json::from_str(line.trim()).ok();
    match (read, reply) {
        (Ok(n), Some(v)) if n > 0 => {
            if let Some(msg) = v.get("error").and_then(Value::as_str) {
                drop(stdin);
                let _ = child.wait();
                return Err(msg.to_string());
            }
            let mut out = std::io::stdout();
            let printed = writeln!(out, "{v}").and_then(|()| out.flush());
            // Without the confirmation the server removes the device and exits.
            let confirmed = printed.is_ok() && writeln!(stdin, "{ADD_ACK}").is_ok();
            drop(stdin);
            if !confirmed {
                let status = child.wait().map_err(|e| e.to_string())?;
                return Err(format!(
                    "could not report the device, so it was removed ({status})"
                ));
            }
            Ok(())
        }
        _ => {
            let status = child.wait().map_err(|e| e.to_string())?;
            Err(format!(
                "the server exited before the device started ({status})"
            ))
        }
    }
}

/// `ublk udev-owner NAME`: see [`Cmd::UdevOwner`].
fn udev_owner(name: &str) -> ExitCode {
    let id = ["ublkc", "ublkb"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .map(|rest| {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            &rest[..digits]
        })
        .and_then(|digits| digits.parse::<u32>().ok());
    let Some(id) = id else {
        eprintln!("ublk: error: {name} is not the name of a ublk node (ublkcN, ublkbN...)");
        return ExitCode::from(2);
    };
    match ControlDevice::open().and_then(|c| c.dev_info(id)) {
        Ok(info) if info.is_unprivileged() => {
            println!("{} {}", info.owner_uid, info.owner_gid);
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ublk: error: device {id}: {e}");
            ExitCode::from(2)
        }
    }
}

/// Why a command about device `id` failed, in words: gone, or someone else's.
fn device_error(id: u32, e: &ublk_core::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    match e.errno() {
        Some(libc::EACCES | libc::EPERM) => {
            let owner = std::fs::metadata(format!("/dev/ublkc{id}"))
                .map(|m| format!(" (its /dev/ublkc{id} belongs to uid {})", m.uid()))
                .unwrap_or_default();
            format!(
                "device {id}: permission denied: only its owner{owner} or root may command it \
                 (nothing changed)"
            )
        }
        _ => format!("no device {id}: {e}"),
    }
}

fn open_ctrl() -> CliResult<ControlDevice> {
    ControlDevice::open().map_err(|e| e.to_string())
}

fn char_node_exists(id: u32) -> bool {
    std::path::Path::new(&format!("/dev/ublkc{id}")).exists()
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // A zombie (exited, not yet reaped) no longer serves anything.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_gone(id: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !char_node_exists(id) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    !char_node_exists(id)
}

/// Asks the device's server to shut down; removes the device directly when no server is
/// left; then removes what `ublk add --recovery` saved for it. With `safe`, first stops the
/// device only if nobody has it open, and otherwise changes nothing.
fn del_one(ctrl: &ControlDevice, id: u32, safe: bool) -> CliResult {
    let info = ctrl.dev_info(id).map_err(|e| device_error(id, &e))?;
    if safe {
        ctrl.try_stop(id).map_err(|e| match e.errno() {
            Some(libc::EBUSY) => format!(
                "device {id} is open (mounted, or held by a process): not deleted \
                 (without --safe it is deleted anyway)"
            ),
            Some(libc::EOPNOTSUPP | libc::EINVAL) => format!(
                "device {id}: the kernel lacks TRY_STOP_DEV (SAFE_STOP_DEV), so --safe \
                 cannot check for users: {e}"
            ),
            _ => format!("device {id}: {e}"),
        })?;
    }
    stop_and_delete(ctrl, &info)?;
    let problems = saved::forget(id);
    if !problems.is_empty() {
        tracing_free_warn(&format!(
            "device {id} is gone, but not all it left: {}",
            problems.join("; ")
        ));
    }
    Ok(())
}

fn stop_and_delete(ctrl: &ControlDevice, info: &ublk_core::DevInfo) -> CliResult {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let id = info.dev_id;
    let pid = info.server_pid;
    if process_alive(pid) && pid as u32 != std::process::id() {
        // A failure (the server exited meanwhile) shows in wait_gone.
        if kill(Pid::from_raw(pid), Signal::SIGTERM) == Err(nix::errno::Errno::EPERM) {
            return Err(format!(
                "device {id}: permission denied: its server (pid {pid}) is another user's \
                 (nothing changed)"
            ));
        }
        if wait_gone(id, Duration::from_secs(30)) {
            return Ok(());
        }
        tracing_free_warn(&format!(
            "server {pid} of device {id} did not stop in 30 s: killing it"
        ));
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        if wait_gone(id, Duration::from_secs(5)) {
            return Ok(());
        }
    }
    // No live server: stop and delete it ourselves, without waiting for its users.
    let _ = ctrl.stop(id);
    if !ctrl
        .delete_within(id, Duration::from_secs(5))
        .map_err(|e| e.to_string())?
    {
        tracing_free_warn(&format!(
            "device {id} is deleted but still held open (mounted?): its id is freed once \
             the last user lets go"
        ));
    }
    Ok(())
}

fn tracing_free_warn(msg: &str) {
    eprintln!("ublk: warning: {msg}");
}

fn del(id: Option<u32>, all: bool, safe: bool) -> CliResult {
    let ctrl = open_ctrl()?;
    if all {
        let mut errors = Vec::new();
        for id in ControlDevice::list_ids() {
            if let Err(e) = del_one(&ctrl, id, safe) {
                errors.push(format!("device {id}: {e}"));
            }
        }
        return if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        };
    }
    del_one(&ctrl, id.expect("clap requires an id without --all"), safe)
}

/// `ublk recover ID`: checks that the device needs a server and that its state was saved,
/// then starts a server from that state the way `ublk add` does. Refusals change nothing.
fn recover(id: u32, foreground: bool, log: Option<PathBuf>) -> CliResult {
    use ublk_core::sys;
    let ctrl = open_ctrl()?;
    let mut info = ctrl.dev_info(id).map_err(|e| device_error(id, &e))?;
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
        return Err(format!(
            "device {id} was added without --recovery: it cannot be recovered (nothing changed)"
        ));
    }
    if info.state == sys::UBLK_S_DEV_LIVE {
        if process_alive(info.server_pid) {
            return Err(format!(
                "device {id} is live, served by pid {}: nothing to recover (nothing changed)",
                info.server_pid
            ));
        }
        // The server is gone, but the kernel quiesces the device only once the dead
        // process's rings have let go of /dev/ublkcN.
        let deadline = Instant::now() + Duration::from_secs(10);
        while info.state == sys::UBLK_S_DEV_LIVE && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            info = ctrl.dev_info(id).map_err(|e| device_error(id, &e))?;
        }
    }
    if !matches!(
        info.state,
        sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO
    ) {
        return Err(format!(
            "device {id} is {}, not QUIESCED or FAIL_IO: nothing to recover (nothing changed)",
            info.state_name()
        ));
    }
    let saved = SavedDevice::load(id)
        .map_err(|e| format!("device {id}: cannot read its saved state: {e} (nothing changed)"))?
        .ok_or_else(|| {
            format!(
                "device {id} is {} but has no saved state ({}): only a device started by \
                 `ublk add ... --recovery` can be recovered (nothing changed)",
                info.state_name(),
                saved::state_path(id).display()
            )
        })?;
    let mut add_args = vec!["add".to_string()];
    add_args.extend(saved.args.iter().cloned());
    add_args.extend(["--recover-id".to_string(), id.to_string()]);
    let parsed = Cli::try_parse_from(std::iter::once("ublk".to_string()).chain(add_args.clone()))
        .map_err(|e| format!("device {id}: the saved arguments no longer parse: {e}"))?;
    let Cmd::Add(mut args) = parsed.command else {
        return Err(format!(
            "device {id}: the saved state is not an `add` command"
        ));
    };
    if foreground {
        std::env::set_current_dir(&saved.cwd)
            .map_err(|e| format!("{}: {e}", saved.cwd.display()))?;
        args.foreground = true;
        args.log = None;
        return add(*args);
    }
    add_args.push("--daemon-child".into());
    let log = log.or(args.log);
    spawn_background(add_args, log.as_deref(), Some(&saved.cwd))
}

/// `ublk upgrade ID`: quiesces the device through its server (which then exits and
/// leaves it), then recovers it with a new server from the binary on disk now.
fn upgrade(id: u32, timeout: u64, log: Option<PathBuf>) -> CliResult {
    use ublk_core::sys;
    let ctrl = open_ctrl()?;
    let info = ctrl.dev_info(id).map_err(|e| device_error(id, &e))?;
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
        return Err(format!(
            "device {id} was added without --recovery: its server cannot be replaced while \
             it runs (nothing changed)"
        ));
    }
    if info.flags & sys::UBLK_F_QUIESCE == 0 {
        return Err(format!(
            "device {id} cannot be quiesced: the kernel lacks QUIESCE (nothing changed)"
        ));
    }
    let pid = info.server_pid;
    if info.state != sys::UBLK_S_DEV_LIVE || !process_alive(pid) {
        return Err(format!(
            "device {id} is {} without a running server: `ublk recover {id}` starts one \
             (nothing changed)",
            info.state_name()
        ));
    }
    if SavedDevice::load(id)
        .map_err(|e| format!("device {id}: cannot read its saved state: {e} (nothing changed)"))?
        .is_none()
    {
        return Err(format!(
            "device {id} has no saved state ({}): a new server would not know what to serve \
             (nothing changed)",
            saved::state_path(id).display()
        ));
    }
    control::request(
        id,
        &json!({"cmd": "quiesce", "timeout_ms": timeout.saturating_mul(1000)}),
    )
    .map_err(|e| match e.contains("EBUSY") || e.contains("busy") {
        true => format!(
            "device {id}: its requests did not drain within {timeout} s ({e}); the device now \
             holds new I/O: stop server {pid} (kill -9 {pid}) and run `ublk recover {id}`"
        ),
        false => format!("device {id}: the server did not quiesce the device: {e}"),
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while process_alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    if process_alive(pid) {
        return Err(format!(
            "device {id} is quiesced, but its old server (pid {pid}) has not exited in 30 s: \
             `ublk recover {id}` once it has"
        ));
    }
    recover(id, false, log)
}

fn list(as_json: bool) -> CliResult {
    let ctrl = open_ctrl()?;
    let mut rows = Vec::new();
    for id in ControlDevice::list_ids() {
        let Ok(info) = ctrl.dev_info(id) else {
            continue; // deleted while we looked
        };
        let size = ctrl
            .params(id)
            .map(|p| p.basic.dev_sectors * 512)
            .unwrap_or(0);
        let target = TargetKind::from_server_flags(info.server_flags).map_or("?", |k| k.name());
        let tree = control::request(id, &json!({"cmd": "status"}))
            .ok()
            .and_then(|r| r["expr"].as_str().map(String::from));
        rows.push(json!({
            "dev_id": id,
            "path": info.block_path(),
            "state": info.state_name(),
            "target": target,
            "tree": tree,
            "size": size,
            "queues": info.nr_queues,
            "depth": info.queue_depth,
            "max_io": info.max_io_buf_bytes,
            "pid": info.server_pid,
            "owner_uid": info.owner_uid,
            "flags": feature_names(info.flags),
        }));
    }
    if as_json {
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<4} {:<14} {:<8} {:<6} {:>14} {:>6} {:>6} {:>8}  TREE",
        "ID", "PATH", "STATE", "TARGET", "SIZE", "QUEUES", "DEPTH", "PID"
    );
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for r in &rows {
        println!(
            "{:<4} {:<14} {:<8} {:<6} {:>14} {:>6} {:>6} {:>8}  {}",
            text(&r["dev_id"]),
            text(&r["path"]),
            text(&r["state"]),
            text(&r["target"]),
            text(&r["size"]),
            text(&r["queues"]),
            text(&r["depth"]),
            text(&r["pid"]),
            r["tree"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

fn status(id: u32, as_json: bool) -> CliResult {
    let reply = control::request(id, &json!({"cmd": "status"}))?;
    if as_json {
        println!(
            "{}",
            json!({"dev_id": id, "expr": reply["expr"], "tree": reply["tree"]})
        );
        return Ok(());
    }
    println!("device {id}: {}", reply["expr"].as_str().unwrap_or("?"));
    print_node(&reply["tree"], 0);
    Ok(())
}

/// One line per node, children indented under their parent.
fn print_node(node: &Value, depth: usize) {
    println!("{}", node_line(node, depth));
    for c in node["children"].as_array().into_iter().flatten() {
        print_node(c, depth + 1);
    }
}

/// A node's line in `ublk status`: what it is, a mirror's or a leg's state, its counters.
fn node_line(node: &Value, depth: usize) -> String {
    let mut line = format!(
        "{:indent$}{} {} {}",
        "",
        node["node"].as_str().unwrap_or("?"),
        node["kind"].as_str().unwrap_or("?"),
        human_size(node["size"].as_u64().unwrap_or(0)),
        indent = depth * 2
    );
    for key in ["path", "chunk", "region", "direct", "backing"] {
        if let Some(v) = node.get(key) {
            line.push_str(&format!(
                " {key}={}",
                v.as_str().map_or(v.to_string(), String::from)
            ));
        }
    }
    if let Some(f) = node.get("faults") {
        if !f.is_null() {
            line.push_str(&format!(" faults={f}"));
        }
    }
    if let Some(m) = node.get("mirror") {
        line.push_str(&format!(
            " state={} in_sync={}/{} dirty_regions={} resync_left={}",
            m["state"].as_str().unwrap_or("?"),
            m["in_sync"],
            m["legs"].as_array().map_or(0, Vec::len),
            m["dirty_regions"],
            m["resync"]["regions_left"],
        ));
        if let Some(rate) = m["rebuild_rate"].as_u64().filter(|&r| r > 0) {
            line.push_str(&format!(" rate={}/s", approx_size(rate)));
        }
        if let Some(e) = m["last_error"].as_str() {
            line.push_str(&format!(" last_error={e:?}"));
        }
    }
    if let (Some(leg), Some(state)) = (node["leg"].as_u64(), node["state"].as_str()) {
        line.push_str(&format!(" leg={leg} state={state}"));
        let r = &node["rebuild"];
        if let (Some(done), Some(total)) = (r["done_bytes"].as_u64(), r["total_bytes"].as_u64()) {
            line.push_str(&format!(" rebuilt={:.1}%", percent(done, total)));
        }
    }
    let st = &node["stats"];
    line.push_str(&format!(
        "  reads={} writes={} flushes={} discards={} errors={}",
        st["reads"], st["writes"], st["flushes"], st["discards"], st["errors"]
    ));
    line
}

/// `done` of `total` in percent; an empty whole counts as done.
fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        return 100.0;
    }
    done.min(total) as f64 * 100.0 / total as f64
}

/// Binary size units, largest first.
const UNITS: [(&str, u64); 4] = [
    ("T", 1 << 40),
    ("G", 1 << 30),
    ("M", 1 << 20),
    ("K", 1 << 10),
];

/// `n` bytes to a tenth of a unit: `1.4G`, `512K`, `100`.
fn approx_size(n: u64) -> String {
    for (unit, size) in UNITS {
        if n >= size {
            return if n % size == 0 {
                format!("{}{unit}", n / size)
            } else {
                format!("{:.1}{unit}", n as f64 / size as f64)
            };
        }
    }
    n.to_string()
}

fn human_size(n: u64) -> String {
    for (unit, size) in UNITS {
        if n >= size && n % size == 0 {
            return format!("{}{unit}", n / size);
        }
    }
    n.to_string()
}

fn fault(args: FaultArgs) -> CliResult {
    let rule = if args.clear {
        Value::Null
    } else {
        if args.fail.is_none() && args.delay.is_none() {
            return Err("say what to do: --fail OPS, --delay MS, or --clear".into());
        }
        json!({
            "fail": args.fail.map(FaultOps::name),
            "range": args.range.map(|(o, l)| json!([o, l])),
            "every": args.every,
            "delay_ms": args.delay,
        })
    };
    control::request(
        args.id,
        &json!({"cmd": "fault", "node": args.node, "rule": rule}),
    )?;
    Ok(())
}

fn features(as_json: bool) -> CliResult {
    let flags = open_ctrl()?.features().map_err(|e| e.to_string())?;
    let names = feature_names(flags);
    if as_json {
        println!("{}", json!(names));
    } else {
        for name in names {
            println!("{name}");
        }
    }
    Ok(())
}

fn fail(id: u32, node: &str) -> CliResult {
    let reply = control::request(id, &json!({"cmd": "fail", "node": node}))?;
    eprintln!(
        "ublk: marked {node} faulty in mirror {}",
        reply["mirror"].as_str().unwrap_or("?")
    );
    Ok(())
}

fn replace(id: u32, node: &str, expr: &str) -> CliResult {
    let reply = control::request(id, &json!({"cmd": "replace", "node": node, "expr": expr}))?;
    eprintln!(
        "ublk: replaced {node} with {} in mirror {}; its rebuild has started",
        reply["target"].as_str().unwrap_or(expr),
        reply["mirror"].as_str().unwrap_or("?")
    );
    Ok(())
}

fn rebuild(id: u32, rate: u64) -> CliResult {
    let reply = control::request(id, &json!({"cmd": "rebuild", "rate": rate}))?;
    let mirrors: Vec<&str> = reply["mirrors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let limit = match rate {
        0 => "unlimited".to_string(),
        r => format!("{}/s", approx_size(r)),
    };
    let which = if mirrors.len() == 1 {
        "mirror"
    } else {
        "mirrors"
    };
    eprintln!(
        "ublk: rebuild rate {limit} for {which} {}",
        mirrors.join(", ")
    );
    Ok(())
}

/// What `ublk status --watch` follows of one mirror.
#[derive(Debug, Clone, PartialEq)]
struct MirrorProgress {
    /// The mirror's address.
    node: String,
    /// `clean` or `degraded`.
    state: String,
    in_sync: u64,
    legs: usize,
    /// Its legs being rebuilt.
    rebuilding: Vec<LegProgress>,
    /// Dirty regions still to resync.
    resync_left: u64,
}

/// A leg being rebuilt.
#[derive(Debug, Clone, PartialEq)]
struct LegProgress {
    leg: u64,
    /// The leg's address.
    node: String,
    done: u64,
    total: u64,
}

impl MirrorProgress {
    /// Nothing left to copy.
    fn finished(&self) -> bool {
        self.rebuilding.is_empty() && self.resync_left == 0
    }

    /// The line `status --watch` prints when stdout is not a terminal.
    fn json(&self) -> Value {
        let legs: Vec<Value> = self
            .rebuilding
            .iter()
            .map(|l| {
                json!({"leg": l.leg, "state": "rebuilding",
                       "done_bytes": l.done, "total_bytes": l.total})
            })
            .collect();
        json!({"node": self.node, "legs": legs, "resync_regions_left": self.resync_left})
    }
}

/// Every mirror of a status tree, in pre-order.
fn mirror_progress(node: &Value, out: &mut Vec<MirrorProgress>) {
    let children = node["children"].as_array().map_or(&[][..], Vec::as_slice);
    if let Some(m) = node.get("mirror") {
        let rebuilding = children
            .iter()
            .filter(|c| c["state"] == "rebuilding")
            .map(|c| LegProgress {
                leg: c["leg"].as_u64().unwrap_or(0),
                node: c["node"].as_str().unwrap_or("?").to_string(),
                done: c["rebuild"]["done_bytes"].as_u64().unwrap_or(0),
                total: c["rebuild"]["total_bytes"].as_u64().unwrap_or(0),
            })
            .collect();
        out.push(MirrorProgress {
            node: node["node"].as_str().unwrap_or("?").to_string(),
            state: m["state"].as_str().unwrap_or("?").to_string(),
            in_sync: m["in_sync"].as_u64().unwrap_or(0),
            legs: m["legs"].as_array().map_or(0, Vec::len),
            rebuilding,
            resync_left: m["resync"]["regions_left"].as_u64().unwrap_or(0),
        });
    }
    for c in children {
        mirror_progress(c, out);
    }
}

/// The terminal view of `status --watch`. It remembers each rebuild's previous sample, for
/// its speed, and the most regions each resync had left, for its bar (the status tells how
/// many are left, not how many there were).
#[derive(Debug, Default)]
struct Meter {
    rebuilds: HashMap<String, (u64, Instant)>,
    resyncs: HashMap<String, u64>,
}

/// Characters inside a progress bar's brackets.
const BAR: usize = 20;

impl Meter {
    /// One line per rebuilding leg and per pending resync, sampled at `now`.
    fn lines(&mut self, mirrors: &[MirrorProgress], now: Instant) -> Vec<String> {
        let mut rows = Vec::new();
        for m in mirrors {
            if m.resync_left > 0 {
                let most = self.resyncs.entry(m.node.clone()).or_default();
                *most = (*most).max(m.resync_left);
                let done = *most - m.resync_left;
                rows.push((
                    m.node.clone(),
                    "resync",
                    done,
                    *most,
                    format!("{} of {} regions left", m.resync_left, most),
                ));
            } else {
                self.resyncs.remove(&m.node);
            }
            for l in &m.rebuilding {
                let mut text = format!("{} of {}", approx_size(l.done), approx_size(l.total));
                let before = self.rebuilds.insert(l.node.clone(), (l.done, now));
                if let Some((done, then)) = before {
                    let secs = now.saturating_duration_since(then).as_secs_f64();
                    if l.done > done && secs > 0.0 {
                        let speed = (l.done - done) as f64 / secs;
                        let left = l.total.saturating_sub(l.done) as f64 / speed;
                        text.push_str(&format!(
                            "  {}/s  {} left",
                            approx_size(speed as u64),
                            duration_text(left as u64)
                        ));
                    }
                }
                rows.push((l.node.clone(), "rebuild", l.done, l.total, text));
            }
        }
        // A rebuild that ended is forgotten: a later one on the same leg starts afresh.
        self.rebuilds.retain(|node, _| {
            mirrors
                .iter()
                .any(|m| m.rebuilding.iter().any(|l| &l.node == node))
        });
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        rows.into_iter()
            .map(|(node, what, done, total, text)| {
                format!(
                    "{node:<width$}  {what:<7} {} {:5.1}%  {text}",
                    bar(done, total),
                    percent(done, total)
                )
            })
            .collect()
    }
}

/// A progress bar in /proc/mdstat's style: `[=====>..............]`.
fn bar(done: u64, total: u64) -> String {
    let filled = if total == 0 {
        BAR
    } else {
        (u128::from(done.min(total)) * BAR as u128 / u128::from(total)) as usize
    };
    let filled = filled.min(BAR - 1);
    format!("[{}>{}]", "=".repeat(filled), ".".repeat(BAR - 1 - filled))
}

/// `secs` as `45s`, `3m05s` or `2h07m`.
fn duration_text(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Draws `lines` over the `drawn` lines drawn before: the cursor goes back up, each line is
/// rewritten, and what is left below is cleared.
fn redraw(out: &mut impl Write, lines: &[String], drawn: usize) -> std::io::Result<()> {
    if drawn > 0 {
        write!(out, "\x1b[{drawn}A")?;
    }
    for l in lines {
        write!(out, "\r\x1b[2K{l}\n")?;
    }
    write!(out, "\r\x1b[J")?;
    out.flush()
}

/// One sample of device `id`'s counters, and when it was taken.
fn stats_sample(id: u32) -> Result<(Vec<QueueSnapshot>, Instant), String> {
    let reply = control::request(id, &json!({"cmd": "stats"}))?;
    Ok((stats::parse_queues(&reply["queues"])?, Instant::now()))
}

/// `ublk stats ID`: two samples `interval` seconds apart, shown as a table or JSON; with
/// `--watch`, a new sample every interval until interrupted; with `--prometheus`, one sample
/// in the Prometheus text format.
fn stats(id: u32, as_json: bool, watch: bool, prometheus: bool, interval: f64) -> CliResult {
    if prometheus {
        let (now, _) = stats_sample(id)?;
        print!("{}", stats::prometheus(id, &now));
        return Ok(());
    }
    let tty = watch && !as_json && std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    let io_err = |e: std::io::Error| format!("stdout: {e}");
    let mut before = stats_sample(id)?;
    let mut drawn = 0;
    loop {
        thread::sleep(Duration::from_secs_f64(interval));
        let now = stats_sample(id)?;
        let secs = now.1.duration_since(before.1).as_secs_f64();
        if as_json || (watch && !tty) {
            let report = stats::report_json(id, &now.0, Some(&before.0), secs);
            writeln!(out, "{report}").map_err(io_err)?;
            out.flush().map_err(io_err)?;
        } else {
            let lines = stats::report_lines(id, &now.0, Some(&before.0), secs);
            if tty {
                redraw(&mut out, &lines, drawn).map_err(io_err)?;
                drawn = lines.len();
            } else {
                for l in &lines {
                    writeln!(out, "{l}").map_err(io_err)?;
                }
            }
        }
        if !watch {
            return Ok(());
        }
        before = now;
    }
}

/// `ublk status ID --watch`: polls the device every second until no mirror has a leg to
/// rebuild or regions to resync.
fn watch_status(id: u32, as_json: bool) -> CliResult {
    let tty = !as_json && std::io::stdout().is_terminal();
    watch(id, tty, &mut std::io::stdout().lock())
}

/// [`watch_status`] writing to `out`: progress bars when `tty`, else JSON lines.
fn watch(id: u32, tty: bool, out: &mut impl Write) -> CliResult {
    let io_err = |e: std::io::Error| format!("stdout: {e}");
    let mut meter = Meter::default();
    let mut drawn = 0;
    loop {
        let reply = control::request(id, &json!({"cmd": "status"}))?;
        let mut mirrors = Vec::new();
        mirror_progress(&reply["tree"], &mut mirrors);
        if tty {
            let lines = meter.lines(&mirrors, Instant::now());
            redraw(out, &lines, drawn).map_err(io_err)?;
            drawn = lines.len();
        } else {
            for m in &mirrors {
                writeln!(out, "{}", m.json()).map_err(io_err)?;
            }
            out.flush().map_err(io_err)?;
        }
        if mirrors.iter().all(MirrorProgress::finished) {
            if tty {
                if mirrors.is_empty() {
                    writeln!(out, "device {id} has no mirror").map_err(io_err)?;
                }
                for m in &mirrors {
                    writeln!(
                        out,
                        "mirror {}: {}, {} of {} legs in sync",
                        m.node, m.state, m.in_sync, m.legs
                    )
                    .map_err(io_err)?;
                }
            }
            return Ok(());
        }
        thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("ublk").chain(args.iter().copied())).map(|c| c.command)
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn mirror_commands_parse() {
        match parse(&["rebuild", "3", "--rate", "50M"]) {
            Ok(Cmd::Rebuild { id: 3, rate }) => assert_eq!(rate, 50 << 20),
            _ => panic!("rebuild --rate 50M"),
        }
        assert!(matches!(
            parse(&["rebuild", "3", "--rate", "0"]),
            Ok(Cmd::Rebuild { rate: 0, .. })
        ));
        assert!(parse(&["rebuild", "3", "--rate", "fast"]).is_err());
        assert!(parse(&["rebuild", "3"]).is_err(), "--rate is required");
        assert!(matches!(
            parse(&["fail", "0", "/1"]),
            Ok(Cmd::Fail { id: 0, node }) if node == "/1"
        ));
        assert!(matches!(
            parse(&["replace", "0", "/0/1", "file:/dev/sdd"]),
            Ok(Cmd::Replace { id: 0, node, expr }) if node == "/0/1" && expr == "file:/dev/sdd"
        ));
        assert!(parse(&["replace", "0", "/1"]).is_err(), "EXPR is required");
        assert!(matches!(
            parse(&["status", "2", "--watch"]),
            Ok(Cmd::Status {
                id: 2,
                json: false,
                watch: true
            })
        ));
    }

    #[test]
    fn add_rbd_is_the_short_form_of_an_rbd_node() {
        let args = |list: &[&str]| match parse(list) {
            Ok(Cmd::Add(a)) => *a,
            _ => panic!("{list:?} parses"),
        };
        let plain = args(&["add", "rbd", "--pool", "rbd", "--image", "disk"]);
        assert_eq!(target_kind(&plain), Ok(TargetKind::Rbd));
        assert_eq!(rbd_expr(&plain), Ok("rbd(pool=rbd,image=disk)".to_string()));
        let full = args(&[
            "add",
            "rbd",
            "--pool",
            "p",
            "--image",
            "i",
            "--snap",
            "s",
            "--conf",
            "/etc/ceph/c.conf",
            "--user",
            "backup",
            "--timeout",
            "5",
        ]);
        assert_eq!(
            rbd_expr(&full),
            Ok("rbd(pool=p,image=i,snap=s,conf=/etc/ceph/c.conf,id=backup,timeout=5)".into())
        );
        let err = target_kind(&args(&["add", "rbd", "--pool", "rbd"])).expect_err("no image");
        assert!(err.contains("--image"), "{err}");
        let err = target_kind(&args(&["add", "ram", "--pool", "rbd"])).expect_err("not rbd");
        assert!(err.contains("apply to the rbd target only"), "{err}");
        let odd = args(&["add", "rbd", "--pool", "rbd", "--image", "a,b"]);
        let err = rbd_expr(&odd).expect_err("a comma");
        assert!(err.contains("--image"), "{err}");
    }

    #[test]
    fn force_new_is_for_stacks_only() {
        let add = |args: &[&str]| match parse(args) {
            Ok(Cmd::Add(a)) => target_kind(&a),
            _ => panic!("{args:?} parses"),
        };
        let stack = add(&["add", "stack", "mirror(file:/a,file:/b)", "--force-new"]);
        assert_eq!(stack, Ok(TargetKind::Stack));
        let err = add(&["add", "ram", "--force-new"]).expect_err("ram");
        assert!(err.contains("--force-new applies to stacks only"), "{err}");
        assert_eq!(add(&["add", "ram"]), Ok(TargetKind::Ram));
    }

    #[test]
    fn add_compress_is_the_short_form_of_a_compress_stack_over_a_file() {
        let args = |list: &[&str]| match parse(list) {
            Ok(Cmd::Add(a)) => *a,
            _ => panic!("{list:?} parses"),
        };
        let dir = std::env::temp_dir().join(format!("ublk-cli-compress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let image = dir.join("image");
        let path = image.to_str().expect("UTF-8 path");

        let err = target_kind(&args(&["add", "ram", "--algo", "lz4"])).expect_err("ram");
        assert!(
            err.contains("--algo applies to the compress target only"),
            "{err}"
        );
        let err = target_kind(&args(&["add", "compress"])).expect_err("no path");
        assert!(
            err.contains("the compress target needs --path FILE"),
            "{err}"
        );
        assert!(parse(&["add", "compress", "--path", path, "--algo", "gzip"]).is_err());
        let err = target_kind(&args(&["add", "null", "--workers", "2"])).expect_err("null");
        assert!(err.contains("--workers applies to the compress"), "{err}");

        let fresh = args(&["add", "compress", "--path", path]);
        assert_eq!(target_kind(&fresh), Ok(TargetKind::Compress));
        let err = compress_expr(&fresh).expect_err("no --size for a new image");
        assert!(err.contains("give --size to make a new one"), "{err}");
        assert!(!image.exists(), "nothing created without a size");

        let new = args(&[
            "add", "compress", "--path", path, "--size", "1M", "--algo", "zstd:5",
        ]);
        assert_eq!(
            compress_expr(&new),
            Ok(format!("compress(file:{path},size=1M,algo=zstd:5)"))
        );
        let child = Layout::child_size_for(1 << 20).expect("fits");
        assert_eq!(std::fs::metadata(&image).expect("created").len(), child);
        let (target, desc, expr) = tree(&new, TargetKind::Compress, 0).expect("a new image");
        assert_eq!((desc.kind, desc.size), ("compress", 1 << 20));
        assert_eq!(expr, format!("compress(file:{path},size=1M,algo=zstd:5)"));
        assert_eq!(
            choose_mode(&new, TargetKind::Compress, &desc),
            Ok(BufferMode::Copy)
        );
        drop((target, desc));

        // Reopened without --size: the image knows its size and algorithm.
        let again = args(&["add", "compress", "--path", path]);
        let (_, desc, expr) = tree(&again, TargetKind::Compress, 0).expect("reopened");
        assert_eq!(desc.size, 1 << 20);
        assert_eq!(expr, format!("compress(file:{path})"));
        let status = desc.compress.as_ref().expect("a compress node").status();
        assert_eq!(status["algo"], "zstd:5");
        drop(desc);
        let pooled = args(&["add", "compress", "--path", path, "--workers", "2"]);
        let (_, desc, expr) = tree(&pooled, TargetKind::Compress, 0).expect("with workers");
        assert_eq!(expr, format!("compress(file:{path},workers=2)"));
        assert_eq!(desc.compress.as_ref().expect("node").status()["workers"], 2);
        drop(desc);
        let many = args(&["add", "compress", "--path", path, "--workers", "65"]);
        let err = match tree(&many, TargetKind::Compress, 0) {
            Ok(_) => panic!("65 workers"),
            Err(e) => e,
        };
        assert!(
            err.contains("workers: a number of threads from 0 to 64"),
            "{err}"
        );
        let wrong = args(&["add", "compress", "--path", path, "--size", "2M"]);
        let err = match tree(&wrong, TargetKind::Compress, 0) {
            Ok(_) => panic!("the image is 1M"),
            Err(e) => e,
        };
        assert!(
            err.starts_with("compress: ") && err.contains("holds 1048576 logical bytes"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The status of `mirror(file:/a,file:/b)` with leg 1 half rebuilt.
    fn sample() -> Value {
        let leg = |i: u64, state: &str| {
            json!({"node": format!("/{i}"), "kind": "file", "size": 2u64 << 30,
                   "path": format!("/l{i}"), "stats": {}, "children": [],
                   "leg": i, "state": state, "target": format!("file:/l{i}")})
        };
        let mut rebuilding = leg(1, "rebuilding");
        rebuilding["rebuild"] = json!({"done_bytes": 1u64 << 29, "total_bytes": 1u64 << 30});
        json!({"node": "/", "kind": "mirror", "size": 1u64 << 30, "region": 1 << 20,
               "stats": {"reads": 1, "writes": 2, "flushes": 0, "discards": 0, "errors": 0},
               "mirror": {"state": "degraded", "in_sync": 1, "dirty_regions": 4,
                          "resync": {"regions_left": 0, "copied_bytes": 0},
                          "rebuild_rate": 50u64 << 20, "last_error": null,
                          "legs": [{}, {}]},
               "children": [leg(0, "in_sync"), rebuilding]})
    }

    #[test]
    fn status_lines_show_mirror_and_leg_states() {
        let tree = sample();
        let root = node_line(&tree, 0);
        assert!(
            root.starts_with(
                "/ mirror 1G region=1048576 state=degraded in_sync=1/2 dirty_regions=4 \
                 resync_left=0 rate=50M/s  reads=1"
            ),
            "{root}"
        );
        let leg = node_line(&tree["children"][1], 1);
        assert!(
            leg.starts_with("  /1 file 2G path=/l1 leg=1 state=rebuilding rebuilt=50.0%  "),
            "{leg}"
        );
        let leg = node_line(&tree["children"][0], 1);
        assert!(leg.contains(" leg=0 state=in_sync  reads="), "{leg}");
    }

    #[test]
    fn watch_json_lines_follow_the_contract() {
        let mut mirrors = Vec::new();
        mirror_progress(&json!({"node": "/", "children": [sample()]}), &mut mirrors);
        assert_eq!(mirrors.len(), 1);
        assert!(!mirrors[0].finished());
        assert_eq!(
            mirrors[0].json(),
            json!({"node": "/", "legs": [{"leg": 1, "state": "rebuilding",
                   "done_bytes": 1u64 << 29, "total_bytes": 1u64 << 30}],
                   "resync_regions_left": 0})
        );
        let mut clean = sample();
        clean["children"][1]["state"] = json!("in_sync");
        let mut mirrors = Vec::new();
        mirror_progress(&clean, &mut mirrors);
        assert!(mirrors[0].finished());
    }

    #[test]
    fn progress_bars_with_speed_and_resync() {
        let leg = |done| LegProgress {
            leg: 1,
            node: "/0/1".into(),
            done,
            total: 1 << 30,
        };
        let mut m = MirrorProgress {
            node: "/0".into(),
            state: "degraded".into(),
            in_sync: 1,
            legs: 2,
            rebuilding: vec![leg(1 << 28)],
            resync_left: 0,
        };
        let mut meter = Meter::default();
        let t0 = Instant::now();
        assert_eq!(
            meter.lines(&[m.clone()], t0),
            ["/0/1  rebuild [=====>..............]  25.0%  256M of 1G"]
        );
        m.rebuilding = vec![leg(1 << 29)];
        assert_eq!(
            meter.lines(&[m.clone()], t0 + Duration::from_secs(2)),
            ["/0/1  rebuild [==========>.........]  50.0%  512M of 1G  128M/s  4s left"]
        );
        m.rebuilding.clear();
        m.resync_left = 8;
        assert_eq!(
            meter.lines(&[m.clone()], t0),
            ["/0  resync  [>...................]   0.0%  8 of 8 regions left"]
        );
        m.resync_left = 2;
        assert_eq!(
            meter.lines(&[m.clone()], t0),
            ["/0  resync  [===============>....]  75.0%  2 of 8 regions left"]
        );
        m.resync_left = 0;
        assert!(meter.lines(&[m], t0).is_empty());
    }

    #[test]
    fn bars_sizes_and_durations() {
        assert_eq!(bar(0, 10), "[>...................]");
        assert_eq!(bar(10, 10), "[===================>]");
        assert_eq!(bar(u64::MAX, u64::MAX), "[===================>]");
        assert_eq!(bar(0, 0), "[===================>]");
        assert_eq!(percent(1, 3), 100.0 / 3.0);
        assert_eq!(percent(5, 0), 100.0);
        assert_eq!(approx_size(1536 << 20), "1.5G");
        assert_eq!(approx_size(50 << 20), "50M");
        assert_eq!(approx_size(1000), "1000");
        assert_eq!(exact_size(10 << 30), "10G");
        assert_eq!(exact_size(1536 << 10), "1536K");
        assert_eq!(exact_size(1000), "1000");
        assert_eq!(duration_text(59), "59s");
        assert_eq!(duration_text(185), "3m05s");
        assert_eq!(duration_text(7620), "2h07m");
    }

    #[test]
    fn redraw_goes_back_over_the_previous_frame() {
        let mut out = Vec::new();
        redraw(&mut out, &["a".into(), "b".into()], 0).expect("write");
        redraw(&mut out, &["c".into()], 2).expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "\r\x1b[2Ka\n\r\x1b[2Kb\n\r\x1b[J\x1b[2A\r\x1b[2Kc\n\r\x1b[J"
        );
    }

    #[test]
    fn mirror_commands_over_a_control_socket() {
        let dir = std::env::temp_dir().join(format!("ublk-cli-test-{}", std::process::id()));
        std::env::set_var("UBLK_RUN_DIR", &dir);
        let stack = stack::build("mirror(ram:4M,ram:4M)").expect("stack");
        let state = ServerState::new(5, stack.expr, stack.desc, StatsRegistry::new());
        let server = ControlServer::start(Arc::new(state)).expect("listen");

        rebuild(5, 0).expect("no rate limit");
        let mut out = Vec::new();
        watch(5, false, &mut out).expect("the initial sync ends");
        let text = String::from_utf8(out).expect("utf-8");
        let last: Value = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .expect("JSON lines");
        assert_eq!(
            last,
            json!({"node": "/", "legs": [], "resync_regions_left": 0})
        );

        fail(5, "/1").expect("fail /1");
        let err = fail(5, "/0").expect_err("the last in-sync leg");
        assert!(err.contains("last in-sync leg"), "{err}");
        let err = fail(5, "/7").expect_err("no such node");
        assert!(err.starts_with("no node /7 in mirror("), "{err}");
        let err = replace(5, "/0", "ram:4M").expect_err("in sync");
        assert!(err.contains("fail it first"), "{err}");
        replace(5, "/1", "ram:4M").expect("replace /1");
        let mut out = Vec::new();
        watch(5, true, &mut out).expect("the rebuild ends");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.ends_with("mirror /: clean, 2 of 2 legs in sync\n"),
            "{text}"
        );
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
