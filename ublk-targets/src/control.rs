//! The per-device control socket: how the `ublk` tool talks to a running server.
//!
//! Each server listens on `/run/ublk/ublk<ID>.sock` (the directory can be moved with
//! `UBLK_RUN_DIR`). The protocol is JSON lines: one request object per line, one answer per
//! line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Requests:
//! - `{"cmd":"status"}`: `{"ok":true,"dev_id":N,"expr":"...","tree":NODE}` with `NODE` as in
//!   [`crate::stack::NodeDesc::status`];
//! - `{"cmd":"stats"}`: `{"ok":true,"dev_id":N,"queues":QUEUES}`, every queue's raw counters
//!   and latency histograms per node, as [`crate::stats::queues_json`] writes them;
//! - `{"cmd":"fault","node":"/1","rule":RULE}` sets the rule of the faulty node at that
//!   address, `RULE` being `null` (clear) or `{"fail":"read"|"write"|"flush"|"all"|null,
//!   "range":[OFFSET,LEN]|null,"every":N|null,"delay_ms":N|null}`;
//! - `{"cmd":"fail","node":"/1"}` marks that leg of a mirror faulty (refused for the last
//!   in-sync leg): `{"ok":true,"mirror":"/","leg":1}`;
//! - `{"cmd":"replace","node":"/1","expr":"file:/dev/sdd"}` builds the expression (any
//!   stack expression) and puts it in the place of that leg, which must be faulty or
//!   missing; its rebuild starts at once. The tree and its expression show the new leg,
//!   whose nodes then answer `fault` at their addresses under `/1`:
//!   `{"ok":true,"mirror":"/","leg":1,"target":"file:/dev/sdd"}`;
//! - `{"cmd":"rebuild","rate":N}` limits every mirror's rebuilds and resyncs to `N` bytes
//!   per second (0: no limit): `{"ok":true,"mirrors":["/",...]}`;
//! - `{"cmd":"resize","size":N}` makes the device `N` bytes long (UPDATE_SIZE), growing a
//!   file target's file first: `{"ok":true,"size":N}`; refused by the other targets.
//! - `{"cmd":"quiesce","timeout_ms":N}` quiesces the device (QUIESCE_DEV) for a next
//!   server: once its in-flight I/O is answered (within `N` ms) the server exits and leaves
//!   the device waiting (`ublk upgrade`): `{"ok":true}`; refused for a device without user
//!   recovery.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use ublk_zc::StatsRegistry;

use crate::expr::{self, Expr};
use crate::faulty::FaultOps;
use crate::mirror::meta::LegState;
use crate::mirror::MirrorHandle;
use crate::stack::{self, fault_rule, NodeDesc};

/// The directory of the control sockets (and of the state `ublk add --recovery` saves):
/// `UBLK_RUN_DIR` when set; otherwise `/run/ublk` for root and, for any other user, where
/// that user can write and nobody else can look: `$XDG_RUNTIME_DIR/ublk`, or
/// `/tmp/ublk-UID` without it.
pub fn run_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("UBLK_RUN_DIR") {
        return PathBuf::from(dir);
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/ublk");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("ublk"),
        _ => std::env::temp_dir().join(format!("ublk-{uid}")),
    }
}

/// Creates [`run_dir`] if missing, readable by its owner only.
pub fn create_run_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = run_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    Ok(dir)
}

/// Device `dev_id`'s control socket.
pub fn socket_path(dev_id: u32) -> PathBuf {
    run_dir().join(format!("ublk{dev_id}.sock"))
}

/// What a server answers about.
#[derive(Debug)]
pub struct ServerState {
    dev_id: u32,
    /// The tree as it stands: `replace` changes a leg's subtree and its text.
    tree: Mutex<Served>,
    stats: StatsRegistry,
    on_tree_change: TreeHook,
    on_resize: ResizeHook,
    on_quiesce: QuiesceHook,
}

/// An optional callback of the server's, shown by `Debug` only as set or not.
struct Hook<F: ?Sized>(Option<Box<F>>);

impl<F: ?Sized> Default for Hook<F> {
    fn default() -> Self {
        Hook(None)
    }
}

impl<F: ?Sized> std::fmt::Debug for Hook<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hook(set)"
        } else {
            "Hook(none)"
        })
    }
}

/// Quiesces the device for a next server, waiting up to a number of milliseconds.
type QuiesceHook = Hook<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

/// Grows or shrinks the served target and the device to a size in bytes.
type ResizeHook = Hook<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

/// Told the whole new expression each time `replace` changed the tree.
type TreeHook = Hook<dyn Fn(&str) + Send + Sync>;

/// A served tree: its canonical expression and its description, changed together.
#[derive(Debug)]
struct Served {
    expr: String,
    desc: NodeDesc,
}

impl ServerState {
    /// The state of device `dev_id`, serving the tree `desc` built from `expr` (its
    /// canonical form), with the queues' counters in `stats`.
    pub fn new(dev_id: u32, expr: String, desc: NodeDesc, stats: StatsRegistry) -> Self {
        ServerState {
            dev_id,
            tree: Mutex::new(Served { expr, desc }),
            stats,
            on_tree_change: TreeHook::default(),
            on_resize: ResizeHook::default(),
            on_quiesce: QuiesceHook::default(),
        }
    }

    /// Answers `quiesce` by calling `hook` with the timeout in milliseconds (a device
    /// without one refuses).
    pub fn on_quiesce(
        mut self,
        hook: impl Fn(u64) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.on_quiesce = Hook(Some(Box::new(hook)));
        self
    }

    /// Answers `resize` by calling `hook` with the new size in bytes (a device without one
    /// refuses to change size).
    pub fn on_resize(
        mut self,
        hook: impl Fn(u64) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.on_resize = Hook(Some(Box::new(hook)));
        self
    }

    /// Calls `hook` with the tree's whole new expression each time `replace` changed it
    /// (the `ublk` tool keeps a recoverable device's saved state in step with it).
    pub fn on_tree_change(mut self, hook: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_tree_change = Hook(Some(Box::new(hook)));
        self
    }

    /// The device id.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The tree, even if a thread panicked while holding it: a replacement swaps the leg's
    /// description and the expression only after it succeeded, so what is there is whole.
    fn tree(&self) -> MutexGuard<'_, Served> {
        self.tree.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers one request.
    pub fn handle(&self, req: &Value) -> Value {
        match self.try_handle(req) {
            Ok(v) => v,
            Err(e) => json!({ "ok": false, "error": e }),
        }
    }

    fn try_handle(&self, req: &Value) -> Result<Value, String> {
        let node = |cmd: &str| {
            req.get("node")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{cmd}: no node given"))
        };
        match req.get("cmd").and_then(Value::as_str) {
            Some("status") => {
                let tree = self.tree();
                Ok(json!({
                    "ok": true,
                    "dev_id": self.dev_id,
                    "expr": tree.expr,
                    "tree": tree.desc.status(&self.stats.snapshot()),
                }))
            }
            Some("stats") => Ok(json!({
                "ok": true,
                "dev_id": self.dev_id,
                "queues": crate::stats::queues_json(&self.stats.queues()),
            })),
            Some("fault") => {
                let path = node("fault")?;
                let tree = self.tree();
                let node = tree
                    .desc
                    .find(path)
                    .ok_or_else(|| format!("no node {path} in {}", tree.expr))?;
                let switch = node.fault.as_ref().ok_or_else(|| {
                    format!("node {path} is a {} node, not a faulty one", node.kind)
                })?;
                let rule = parse_rule(req.get("rule").unwrap_or(&Value::Null))?;
                switch.set(rule);
                Ok(json!({ "ok": true }))
            }
            Some("fail") => {
                let path = node("fail")?;
                let tree = self.tree();
                let leg = mirror_leg(&tree.desc, path, &tree.expr)?;
                leg.mirror
                    .fail(leg.index)
                    .map_err(|e| format!("cannot fail {path}: {e}"))?;
                Ok(json!({ "ok": true, "mirror": leg.mirror_path, "leg": leg.index }))
            }
            Some("replace") => {
                let path = node("replace")?;
                let text = req
                    .get("expr")
                    .and_then(Value::as_str)
                    .ok_or("replace: no expression given")?;
                self.replace(path, text)
            }
            Some("rebuild") => {
                let rate = req.get("rate").and_then(Value::as_u64).ok_or(
                    "rebuild: the rate must be a number of bytes per second (0: no limit)",
                )?;
                let tree = self.tree();
                let mut mirrors = Vec::new();
                mirrors_in(&tree.desc, &mut mirrors);
                if mirrors.is_empty() {
                    return Err(format!("no mirror in {}", tree.expr));
                }
                for (_, m) in &mirrors {
                    m.set_rate(rate);
                }
                let paths: Vec<&str> = mirrors.iter().map(|(p, _)| *p).collect();
                Ok(json!({ "ok": true, "mirrors": paths }))
            }
            Some("resize") => {
                let size = req
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or("resize: the size must be a number of bytes")?;
                let hook = self.on_resize.0.as_ref().ok_or_else(|| {
                    format!(
                        "{} cannot change size (only a file target can)",
                        self.tree().expr
                    )
                })?;
                hook(size)?;
                Ok(json!({ "ok": true, "size": size }))
            }
            Some("quiesce") => {
                let ms = req
                    .get("timeout_ms")
                    .and_then(Value::as_u64)
                    .ok_or("quiesce: timeout_ms must be a number of milliseconds")?;
                let hook = self.on_quiesce.0.as_ref().ok_or_else(|| {
                    format!(
                        "device {} cannot be quiesced: it was added without --recovery",
                        self.dev_id
                    )
                })?;
                hook(ms)?;
                Ok(json!({ "ok": true }))
            }
            Some(other) => Err(format!("unknown command {other:?}")),
            None => Err("no command".into()),
        }
    }

    /// Builds `text` and puts it in the place of the leg at `path`. The tree stays locked
    /// throughout, so the leg found is the leg replaced.
    fn replace(&self, path: &str, text: &str) -> Result<Value, String> {
        let mut tree = self.tree();
        let leg = mirror_leg(&tree.desc, path, &tree.expr)?;
        // Checked before building: a build may create files or take memory.
        if let Some(state @ (LegState::InSync | LegState::Rebuilding)) =
            leg.mirror.leg_state(leg.index)
        {
            return Err(format!(
                "{path} is {}: only a faulty or missing leg is replaced (fail it first)",
                state.name()
            ));
        }
        let built = stack::build(text).map_err(|e| format!("replacement expression: {e}"))?;
        let new_expr = replace_in_expr(&tree.expr, path, &built.expr)?;
        let mut desc = built.desc;
        rebase(&mut desc, path);
        leg.mirror
            .replace(leg.index, built.target, built.expr.clone())
            .map_err(|e| format!("cannot replace {path}: {e}"))?;
        let reply = json!({
            "ok": true, "mirror": leg.mirror_path, "leg": leg.index, "target": built.expr,
        });
        if let Some(slot) = find_mut(&mut tree.desc, path) {
            *slot = desc;
        }
        tree.expr = new_expr;
        if let Some(hook) = &self.on_tree_change.0 {
            hook(&tree.expr);
        }
        Ok(reply)
    }
}

/// A mirror's leg, found by the leg's address.
#[derive(Debug)]
struct LegRef {
    mirror: MirrorHandle,
    mirror_path: String,
    index: usize,
}

/// The node whose child is at `path`, and that child's position among its children.
fn parent_of<'a>(root: &'a NodeDesc, path: &str) -> Option<(&'a NodeDesc, usize)> {
    if let Some(i) = root.children.iter().position(|c| c.path == path) {
        return Some((root, i));
    }
    root.children.iter().find_map(|c| parent_of(c, path))
}

/// The leg at `path`: a child of a mirror node of the tree `root` (written `expr`).
fn mirror_leg(root: &NodeDesc, path: &str, expr: &str) -> Result<LegRef, String> {
    if root.find(path).is_none() {
        return Err(format!("no node {path} in {expr}"));
    }
    let (parent, index) = parent_of(root, path)
        .ok_or_else(|| format!("{path} is the root of the tree, not a leg of a mirror"))?;
    let mirror = parent.mirror.clone().ok_or_else(|| {
        format!(
            "{path} is a child of the {} node {}, not a leg of a mirror",
            parent.kind, parent.path
        )
    })?;
    Ok(LegRef {
        mirror,
        mirror_path: parent.path.clone(),
        index,
    })
}

/// Every mirror in the tree, in pre-order, with its address.
fn mirrors_in<'a>(node: &'a NodeDesc, out: &mut Vec<(&'a str, &'a MirrorHandle)>) {
    if let Some(m) = &node.mirror {
        out.push((&node.path, m));
    }
    for c in &node.children {
        mirrors_in(c, out);
    }
}

fn find_mut<'a>(node: &'a mut NodeDesc, path: &str) -> Option<&'a mut NodeDesc> {
    if node.path == path {
        return Some(node);
    }
    node.children.iter_mut().find_map(|c| find_mut(c, path))
}

/// Readdresses a tree built on its own (root `/`) to sit at `at`.
fn rebase(node: &mut NodeDesc, at: &str) {
    node.path = if node.path == "/" {
        at.to_string()
    } else {
        format!("{at}{}", node.path)
    };
    for c in &mut node.children {
        rebase(c, at);
    }
}

/// `expr` with the subtree at `path` replaced by `with` (both canonical expressions), in
/// canonical form. A node's children are numbered as the tree's addresses number them.
fn replace_in_expr(expr: &str, path: &str, with: &str) -> Result<String, String> {
    let bad = |e: expr::ExprError| format!("internal: expression {expr:?}: {e}");
    let mut tree = expr::parse(expr).map_err(bad)?;
    let with = expr::parse(with).map_err(bad)?;
    let mut at = &mut tree;
    for step in path.split('/').filter(|s| !s.is_empty()) {
        let child = step
            .parse::<usize>()
            .ok()
            .and_then(|i| match at {
                Expr::Node(n) => n.children.get_mut(i),
                Expr::Leaf(_) => None,
            })
            .ok_or_else(|| format!("no node {path} in {expr}"))?;
        at = child;
    }
    *at = with;
    Ok(tree.to_string())
}

fn parse_rule(v: &Value) -> Result<Option<crate::faulty::FaultRule>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let fail = match v.get("fail").and_then(Value::as_str) {
        Some(name) => Some(
            FaultOps::from_name(name)
                .ok_or_else(|| format!("fail: {name:?} is not read, write, flush or all"))?,
        ),
        None => None,
    };
    let range = match v.get("range") {
        Some(Value::Array(a)) if a.len() == 2 => Some((
            a[0].as_u64().ok_or("range: offset must be a number")?,
            a[1].as_u64().ok_or("range: length must be a number")?,
        )),
        None | Some(Value::Null) => None,
        Some(_) => return Err("range must be [OFFSET, LEN]".into()),
    };
    let every = v.get("every").and_then(Value::as_u64);
    let delay = v.get("delay_ms").and_then(Value::as_u64);
    fault_rule(fail, range, every, delay)
}

/// A listening control socket, served by its own thread until dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `state.dev_id`'s socket.
    pub fn start(state: Arc<ServerState>) -> io::Result<Self> {
        create_run_dir()?;
        let path = socket_path(state.dev_id);
        // A socket left by a server that died with the same id.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("ublk{}-ctl", state.dev_id))
            .spawn({
                let stop = Arc::clone(&stop);
                move || serve(listener, &state, &stop)
            })?;
        Ok(ControlServer {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

fn serve(listener: UnixListener, state: &ServerState, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(stream, state) {
                    tracing::debug!("control connection: {e}");
                }
            }
            Err(e) => tracing::warn!("control socket: {e}"),
        }
    }
}

fn answer(stream: UnixStream, state: &ServerState) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => state.handle(&req),
            Err(e) => json!({ "ok": false, "error": format!("bad request: {e}") }),
        };
        writeln!(out, "{reply}")?;
    }
    Ok(())
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accepting thread.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `req` to device `dev_id`'s server and returns its answer (an error for
/// `"ok":false`).
pub fn request(dev_id: u32, req: &Value) -> Result<Value, String> {
    let path = socket_path(dev_id);
    let stream = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the server of device {dev_id} at {}: {e}",
            path.display()
        )
    })?;
    let timeout = Some(Duration::from_secs(10));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| e.to_string())?;
    let mut out = stream.try_clone().map_err(|e| e.to_string())?;
    writeln!(out, "{req}").map_err(|e| format!("device {dev_id}: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("device {dev_id}: {e}"))?;
    let reply: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("device {dev_id}: bad answer: {e}"))?;
    if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(reply)
    } else {
        Err(reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the server refused")
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::build;

    #[test]
    fn status_and_fault_over_the_socket() {
        let dir = std::env::temp_dir().join(format!("ublk-ctl-test-{}", std::process::id()));
        std::env::set_var("UBLK_RUN_DIR", &dir);
        let stack = build("stripe(faulty(ram:1M),ram:1M,chunk=4K)").expect("stack");
        let state = Arc::new(ServerState::new(
            77,
            stack.expr.clone(),
            stack.desc,
            StatsRegistry::new(),
        ));
        let server = ControlServer::start(state).expect("listen");
        let status = request(77, &json!({"cmd": "status"})).expect("status");
        assert_eq!(status["tree"]["kind"], "stripe");
        assert_eq!(status["tree"]["children"][0]["kind"], "faulty");
        assert_eq!(status["tree"]["children"][0]["faults"], Value::Null);
        let rule = json!({"cmd": "fault", "node": "/0",
                          "rule": {"fail": "read", "range": [4096, 512]}});
        request(77, &rule).expect("fault");
        let status = request(77, &json!({"cmd": "status"})).expect("status");
        assert_eq!(status["tree"]["children"][0]["faults"]["ops"], "read");
        let err = request(77, &json!({"cmd": "fault", "node": "/1", "rule": null}))
            .expect_err("not faulty");
        assert!(err.contains("not a faulty one"), "{err}");
        drop(server);
        assert!(!socket_path(77).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stats_count_every_node_of_a_stack_on_a_queue() {
        let stack = build("stripe(ram:1M,ram:1M,chunk=4K)").expect("stack");
        let geo = ublk_zc::Geometry {
            size: 2 << 20,
            logical_block_size: 512,
            max_io: 64 << 10,
        };
        let mut q = ublk_core::sim::SimQueue::new(&stack.target, geo, 8).expect("sim queue");
        let state = ServerState::new(4, stack.expr, stack.desc, q.stats());
        // 8 KiB at 2 KiB: split over both legs, the first leg twice.
        assert_eq!(q.write(2048, &[5; 8192]), Ok(8192));
        assert_eq!(q.write(0, &[6; 512]), Ok(512));
        let reply = ask(&state, json!({"cmd": "stats"})).expect("stats");
        let queues = crate::stats::parse_queues(&reply["queues"]).expect("parse");
        let nodes = ublk_zc::stats::total(&queues);
        let paths: Vec<&str> = nodes.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(paths, ["/", "/0", "/1"]);
        assert_eq!((nodes[0].writes, nodes[0].write_bytes), (2, 8704));
        assert_eq!((nodes[1].writes, nodes[1].write_bytes), (3, 4608));
        assert_eq!((nodes[2].writes, nodes[2].write_bytes), (1, 4096));
        for n in &nodes {
            assert_eq!(n.latency.count(), n.writes, "{}", n.path);
            assert_eq!(n.in_flight(), 0);
        }
    }

    fn state(text: &str) -> ServerState {
        let stack = build(text).expect("stack");
        ServerState::new(1, stack.expr, stack.desc, StatsRegistry::new())
    }

    fn ask(state: &ServerState, req: Value) -> Result<Value, String> {
        let reply = state.handle(&req);
        match reply["ok"].as_bool() {
            Some(true) => Ok(reply),
            _ => Err(reply["error"].as_str().unwrap_or("?").to_string()),
        }
    }

    #[test]
    fn a_leg_is_found_by_its_address_under_its_mirror() {
        let s =
            build("stripe(mirror(ram:4M,ram:4M,assume_clean=true),faulty(ram:3M))").expect("stack");
        let leg = mirror_leg(&s.desc, "/0/1", &s.expr).expect("a leg");
        assert_eq!((leg.mirror_path.as_str(), leg.index), ("/0", 1));
        let err = |path| mirror_leg(&s.desc, path, &s.expr).expect_err(path);
        assert!(err("/").contains("is the root of the tree"));
        assert!(err("/0").contains("child of the stripe node /, not a leg"));
        assert!(err("/1/0").contains("child of the faulty node /1"));
        assert!(err("/0/2").starts_with("no node /0/2 in stripe("));
        assert!(err("0/1").starts_with("no node 0/1"));
    }

    #[test]
    fn a_subtree_is_replaced_in_the_expression_and_readdressed() {
        let e = "stripe(mirror(ram:4M,faulty(ram:4M)),ram:3M)";
        assert_eq!(
            replace_in_expr(e, "/0/1", "faulty(file:/x,delay=5)").expect("replaced"),
            "stripe(mirror(ram:4M,faulty(file:/x,delay=5)),ram:3M)"
        );
        assert!(replace_in_expr(e, "/0/1/0/0", "ram:1M").is_err());
        assert!(replace_in_expr(e, "/9", "ram:1M").is_err());
        let mut d = build("faulty(stripe(ram:1M,ram:1M))").expect("stack").desc;
        rebase(&mut d, "/0/1");
        assert_eq!(d.path, "/0/1");
        assert_eq!(d.children[0].path, "/0/1/0");
        assert_eq!(d.children[0].children[1].path, "/0/1/0/1");
    }

    #[test]
    fn fail_replace_and_rebuild_rate() {
        let s = state("mirror(ram:4M,ram:4M,assume_clean=true)");
        let reply = ask(&s, json!({"cmd": "fail", "node": "/1"})).expect("fail /1");
        assert_eq!(
            (reply["mirror"].as_str(), reply["leg"].as_u64()),
            (Some("/"), Some(1))
        );
        let err = ask(&s, json!({"cmd": "fail", "node": "/0"})).expect_err("last leg");
        assert!(err.contains("last in-sync leg"), "{err}");
        let err = ask(&s, json!({"cmd": "fail", "node": "/"})).expect_err("the root");
        assert!(err.contains("not a leg of a mirror"), "{err}");
        let err = ask(
            &s,
            json!({"cmd": "replace", "node": "/0", "expr": "ram:4M"}),
        )
        .expect_err("in sync");
        assert!(err.contains("/0 is in_sync"), "{err}");
        let err = ask(&s, json!({"cmd": "replace", "node": "/1", "expr": "ram:"}))
            .expect_err("bad expression");
        assert!(
            err.starts_with("replacement expression: at column"),
            "{err}"
        );
        let err = ask(
            &s,
            json!({"cmd": "replace", "node": "/1", "expr": "ram:1M"}),
        )
        .expect_err("too small");
        assert!(err.starts_with("cannot replace /1: ram:1M holds"), "{err}");

        let reply = ask(
            &s,
            json!({"cmd": "replace", "node": "/1", "expr": "faulty( ram:4M )"}),
        )
        .expect("replace /1");
        assert_eq!(reply["target"], "faulty(ram:4M)");
        let status = ask(&s, json!({"cmd": "status"})).expect("status");
        assert_eq!(
            status["expr"],
            "mirror(ram:4M,faulty(ram:4M),assume_clean=true)"
        );
        let leg = &status["tree"]["children"][1];
        assert_eq!(leg["kind"], "faulty");
        assert_eq!(leg["target"], "faulty(ram:4M)");
        assert_eq!(leg["children"][0]["node"], "/1/0");
        assert!(matches!(
            leg["state"].as_str(),
            Some("rebuilding" | "in_sync")
        ));
        // The new leg's faulty node answers at its address in the tree.
        ask(
            &s,
            json!({"cmd": "fault", "node": "/1", "rule": {"delay_ms": 1}}),
        )
        .expect("fault on the new leg");

        let reply = ask(&s, json!({"cmd": "rebuild", "rate": 50 << 20})).expect("rate");
        assert_eq!(reply["mirrors"], json!(["/"]));
        let status = ask(&s, json!({"cmd": "status"})).expect("status");
        assert_eq!(status["tree"]["mirror"]["rebuild_rate"], 50 << 20);
        let err = ask(&s, json!({"cmd": "rebuild", "rate": "fast"})).expect_err("a number");
        assert!(err.contains("bytes per second"), "{err}");
        let err = ask(
            &state("stripe(ram:1M,ram:1M)"),
            json!({"cmd": "rebuild", "rate": 0}),
        )
        .expect_err("no mirror");
        assert!(err.starts_with("no mirror in stripe("), "{err}");
    }
}
