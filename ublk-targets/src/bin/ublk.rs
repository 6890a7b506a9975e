//! `ublk`: start, list and remove user-space block devices.

use std::io::{BufRead, BufReader, Write};
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
    StatsRegistry,
};
use ublk_targets::control::{self, ControlServer, ServerState};
use ublk_targets::faulty::FaultOps;
use ublk_targets::file::FileTarget;
use ublk_targets::null::Null;
use ublk_targets::ram::Ram;
use ublk_targets::stack::{self, NodeDesc};
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
    Add(AddArgs),
    /// Stop and delete devices.
    Del {
        /// Device id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u32>,
        /// Delete every ublk device.
        #[arg(long)]
        all: bool,
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
    /// Show a running device's tree: each node's kind, fields and I/O counters.
    Status {
        /// Device id.
        id: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a faulty node fail or delay operations, or clear its rule.
    Fault(FaultArgs),
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
    /// Target: null, ram, file, or stack followed by a stack expression.
    target: String,
    /// stack: the tree, e.g. 'stripe(file:/dev/sdb,file:/dev/sdc,chunk=128K)'.
    expr: Option<String>,
    /// Size in bytes, with an optional K, M, G or T suffix [default: 1G; file: the file's size].
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
    /// file: the backing file (created with --size if missing, grown if smaller).
    #[arg(long)]
    path: Option<PathBuf>,
    /// file: open the backing file with O_DIRECT (bypass the page cache).
    #[arg(long)]
    direct: bool,
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
    /// Internal: run as the background server started by `ublk add`.
    #[arg(long, hide = true)]
    daemon_child: bool,
}

fn parse_buffer_mode(text: &str) -> Result<BufferMode, String> {
    BufferMode::from_name(text).ok_or_else(|| {
        let names: Vec<_> = BufferMode::ALL.iter().map(|m| m.name()).collect();
        format!("unknown buffer mode {text:?}: use {}", names.join(", "))
    })
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

type CliResult<T = ()> = Result<T, String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Add(args) => add(args),
        Cmd::Del { id, all } => del(id, all),
        Cmd::List { json } => list(json),
        Cmd::Features { json } => features(json),
        Cmd::Status { id, json } => status(id, json),
        Cmd::Fault(args) => fault(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ublk: error: {msg}");
            ExitCode::FAILURE
        }
    }
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
/// comes from its tree when it is built).
fn device_size(args: &AddArgs, kind: TargetKind) -> CliResult<u64> {
    match (args.size, kind, &args.path) {
        (Some(size), _, _) if kind != TargetKind::Stack => Ok(size),
        (None, TargetKind::File, Some(path)) => std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e} (give --size to create it)", path.display())),
        _ => Ok(1 << 30),
    }
}

fn builder(args: &AddArgs, kind: TargetKind) -> CliResult<DeviceBuilder> {
    let max_io = u32::try_from(args.max_io).map_err(|_| "--max-io is too large".to_string())?;
    let mut b = DeviceBuilder::new()
        .size(device_size(args, kind)?)
        .logical_block_size(args.logical_block_size)
        .queues(args.queues)
        .depth(args.depth)
        .max_io_size(max_io)
        .server_flags(kind.code())
        .buffer_mode(explicit_mode(args).unwrap_or_default())
        .sqpoll(args.sqpoll.then_some(args.sq_thread_idle))
        .defer_taskrun(args.defer_taskrun)
        .batch_io(args.batch)
        .threads_per_queue(args.threads_per_queue);
    if let Some(id) = args.id {
        b = b.id(id);
    }
    match kind {
        TargetKind::Ram => b = b.discard(true).write_zeroes(true),
        TargetKind::File | TargetKind::Stack => {
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
    let kind = TargetKind::from_name(&args.target).ok_or_else(|| {
        let names: Vec<_> = TargetKind::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown target {:?}: choose one of {}",
            args.target,
            names.join(", ")
        )
    })?;
    if args.backing.is_some() && kind != TargetKind::Ram {
        return Err("--backing applies to the ram target only".into());
    }
    if (args.path.is_some() || args.direct) && kind != TargetKind::File {
        return Err("--path and --direct apply to the file target only".into());
    }
    if kind == TargetKind::File && args.path.is_none() {
        return Err("the file target needs --path FILE".into());
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
    let builder = builder(&args, kind)?;
    if args.daemon_child {
        return serve_as_child(&args, kind, builder);
    }
    if !args.foreground {
        return spawn_background(&args);
    }
    init_logging();
    serve(&args, kind, builder, |info, expr| {
        println!("{}", info_json(info, kind, expr));
        let _ = std::io::stdout().flush();
    })
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
        TargetKind::Stack => {
            let text = args.expr.as_deref().expect("checked in add");
            let s = stack::build(text).map_err(|e| format!("stack expression: {e}"))?;
            (s.target, s.desc, s.expr)
        }
        _ => return Err(format!("target {} cannot be served", kind.name())),
    })
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
        (Some(mode), _) => Ok(mode),
        (None, None) if kind == TargetKind::Stack => Ok(BufferMode::ZeroCopy),
        (None, _) => Ok(BufferMode::Copy),
    }
}

fn serve(
    args: &AddArgs,
    kind: TargetKind,
    builder: DeviceBuilder,
    on_started: impl FnOnce(&DeviceInfo, &str),
) -> CliResult {
    let size = builder.device_params().size;
    let (target, desc, expr) = tree(args, kind, size)?;
    let mode = choose_mode(args, kind, &desc)?;
    let mut builder = builder.buffer_mode(mode);
    if kind == TargetKind::Stack {
        // A stack's size is its tree's; --size may only confirm it.
        if let Some(size) = args.size.filter(|&s| s != desc.size) {
            return Err(format!(
                "--size {size} differs from the size of the tree, {} bytes: drop --size",
                desc.size
            ));
        }
        builder = builder.size(desc.size);
        builder.validate().map_err(|e| e.to_string())?;
    }
    let stats = StatsRegistry::new();
    let builder = builder.stats(stats.clone());
    let mut control = None;
    let result = builder.run_with(target, |info| {
        let state = Arc::new(ServerState::new(info.dev_id, expr.clone(), desc, stats));
        match ControlServer::start(state) {
            Ok(server) => control = Some(server),
            Err(e) => tracing::warn!("no control socket for device {}: {e}", info.dev_id),
        }
        on_started(info, &expr);
    });
    drop(control);
    result.map_err(|e| e.to_string())
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
        "threads_per_queue": info.threads_per_queue,
    })
}

/// The background server: reports one line on stdout (the device JSON, or an error), then
/// lets go of stdout so the parent's reader sees EOF.
fn serve_as_child(args: &AddArgs, kind: TargetKind, builder: DeviceBuilder) -> CliResult {
    init_logging();
    let mut reported = false;
    let result = serve(args, kind, builder, |info, expr| {
        println!("{}", info_json(info, kind, expr));
        let _ = std::io::stdout().flush();
        reported = true;
        release_stdout();
    });
    if let Err(msg) = &result {
        if !reported {
            println!("{}", json!({ "error": msg }));
            let _ = std::io::stdout().flush();
        }
    }
    result
}

fn release_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // dup2 onto fd 1 replaces our stdout with /dev/null; Rust's stdout handle keeps
        // working on the new file.
        let _ = nix::unistd::dup2_stdout(&null);
    }
}

fn spawn_background(args: &AddArgs) -> CliResult {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut child_args: Vec<String> = std::env::args().skip(1).collect();
    child_args.push("--daemon-child".into());
    let stderr = match &args.log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log {}: {e}", path.display()))?,
        ),
        None => Stdio::null(),
    };
    let mut child = Command::new(exe)
        .args(&child_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    let reply: Option<Value> = serde_json::from_str(line.trim()).ok();
    match (read, reply) {
        (Ok(n), Some(v)) if n > 0 => {
            if let Some(msg) = v.get("error").and_then(Value::as_str) {
                let _ = child.wait();
                return Err(msg.to_string());
            }
            println!("{v}");
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

/// Asks the device's server to shut down; removes the device directly when no server is left.
fn del_one(ctrl: &ControlDevice, id: u32) -> CliResult {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let info = ctrl
        .dev_info(id)
        .map_err(|e| format!("no device {id}: {e}"))?;
    let pid = info.server_pid;
    if process_alive(pid) && pid as u32 != std::process::id() {
        // A failure (the server exited meanwhile) shows in wait_gone.
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
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
    // No live server: stop and delete it ourselves.
    let _ = ctrl.stop(id);
    ctrl.delete(id).map_err(|e| e.to_string())?;
    Ok(())
}

fn tracing_free_warn(msg: &str) {
    eprintln!("ublk: warning: {msg}");
}

fn del(id: Option<u32>, all: bool) -> CliResult {
    let ctrl = open_ctrl()?;
    if all {
        let mut errors = Vec::new();
        for id in ControlDevice::list_ids() {
            if let Err(e) = del_one(&ctrl, id) {
                errors.push(format!("device {id}: {e}"));
            }
        }
        return if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        };
    }
    del_one(&ctrl, id.expect("clap requires an id without --all"))
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
    let mut line = format!(
        "{:indent$}{} {} {}",
        "",
        node["node"].as_str().unwrap_or("?"),
        node["kind"].as_str().unwrap_or("?"),
        human_size(node["size"].as_u64().unwrap_or(0)),
        indent = depth * 2
    );
    for key in ["path", "chunk", "direct", "backing"] {
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
    let st = &node["stats"];
    line.push_str(&format!(
        "  reads={} writes={} flushes={} discards={} errors={}",
        st["reads"], st["writes"], st["flushes"], st["discards"], st["errors"]
    ));
    println!("{line}");
    for c in node["children"].as_array().into_iter().flatten() {
        print_node(c, depth + 1);
    }
}

fn human_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
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
