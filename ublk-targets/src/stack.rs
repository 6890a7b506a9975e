//! Device trees from stack expressions: `stripe(file:/a,file:/b,chunk=128K)`,
//! `faulty(stripe(ram:64M,ram:64M))`, ... (grammar in [`crate::expr`]).
//!
//! [`build`] turns an expression into the target to serve and a [`NodeDesc`] tree that names
//! every node by its address (`/` the root, `/0` its first child, `/0/1` ...) — the same
//! addresses the engine gives the nodes it opens, so the per-node counters of
//! [`ublk_zc::StatsRegistry`] and run-time controls (the faulty node's switch) line up with
//! it. Every error names its position in the expression.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use ublk_zc::{BoxTarget, NodeStats};

use crate::compress::format::Algo;
use crate::compress::{Compress, CompressHandle, CompressOptions, Opened, MAX_WORKERS};
use crate::expr::{self, Expr, ExprError, Leaf, LeafKind, Node, Param};
use crate::faulty::{FaultOps, FaultRule, FaultSwitch, Faulty};
use crate::file::FileTarget;
use crate::mirror::{Assembly, Mirror, MirrorHandle, MirrorOptions};
use crate::null::Null;
use crate::ram::Ram;
use crate::stripe::{Stripe, DEFAULT_CHUNK};

/// What the tool knows of one node of a served tree.
#[derive(Debug, Clone)]
pub struct NodeDesc {
    /// The node's address: `/`, `/0`, `/0/1`, ...
    pub path: String,
    /// `file`, `ram`, `null`, `stripe`, `faulty`.
    pub kind: &'static str,
    /// Bytes it serves.
    pub size: u64,
    /// Its own fields for `ublk status` (`path`, `direct`, `chunk`, ...).
    pub fields: Map<String, Value>,
    /// Whether it touches request bytes (rules out the zero-copy modes).
    pub needs_data: bool,
    /// Where it is written in the expression (for error messages).
    pub pos: usize,
    /// For a faulty node: the switch that changes its rule.
    pub fault: Option<Arc<FaultSwitch>>,
    /// For a mirror: its controls (status, fail, replace, rebuild rate).
    pub mirror: Option<MirrorHandle>,
    /// For a compress node: its space accounting.
    pub compress: Option<CompressHandle>,
    /// Its children, in order.
    pub children: Vec<NodeDesc>,
}

/// A tree ready to serve.
pub struct Stack {
    /// The root target.
    pub target: BoxTarget,
    /// The tree's description.
    pub desc: NodeDesc,
    /// The canonical expression.
    pub expr: String,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("expr", &self.expr)
            .field("desc", &self.desc)
            .finish_non_exhaustive()
    }
}

/// Node kinds the grammar knows, for error messages.
const KINDS: &str = "stripe, mirror, compress, faulty, file, ram, null, rbd";

/// Choices that apply to the whole tree being built.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Mirrors are made new even on legs that carry one (`ublk add --force-new`).
    pub force_new: bool,
}

/// Parses and builds `text`: opens files, allocates memory, checks every node.
pub fn build(text: &str) -> Result<Stack, ExprError> {
    build_with(text, &BuildOptions::default())
}

/// [`build`] with options.
pub fn build_with(text: &str, o: &BuildOptions) -> Result<Stack, ExprError> {
    let expr = expr::parse(text)?;
    let (target, desc) = node(&expr, "/".into(), o)?;
    Ok(Stack {
        target,
        desc,
        expr: expr.to_string(),
    })
}

fn child_path(parent: &str, i: usize) -> String {
    if parent == "/" {
        format!("/{i}")
    } else {
        format!("{parent}/{i}")
    }
}

fn node(e: &Expr, path: String, o: &BuildOptions) -> Result<(BoxTarget, NodeDesc), ExprError> {
    match e {
        Expr::Leaf(leaf) => leaf_node(leaf, path),
        Expr::Node(n) => match n.name.as_str() {
            "stripe" => stripe(n, path, o),
            "faulty" => faulty(n, path, o),
            "mirror" => mirror(n, path, o),
            "compress" => compress(n, path, o),
            "file" | "ram" | "null" => long_leaf(n, path),
            "rbd" => rbd_node(n, path),
            other => Err(ExprError::new(
                n.pos,
                format!("unknown node '{other}' ({KINDS})"),
            )),
        },
    }
}

fn desc(kind: &'static str, target: &BoxTarget, pos: usize, path: String) -> NodeDesc {
    NodeDesc {
        path,
        kind,
        size: target.dyn_size().unwrap_or(0),
        fields: Map::new(),
        needs_data: target.dyn_needs_data(),
        pos,
        fault: None,
        mirror: None,
        compress: None,
        children: Vec::new(),
    }
}

fn leaf_node(leaf: &Leaf, path: String) -> Result<(BoxTarget, NodeDesc), ExprError> {
    match leaf.kind {
        LeafKind::File => file(&leaf.arg, leaf.arg_pos, None, None, path),
        LeafKind::Ram => ram(leaf.size()?, None, leaf.pos, path),
        LeafKind::Null => null(leaf.size()?, leaf.pos, path),
        LeafKind::Rbd => {
            let spec = rbd_spec_of_leaf(&leaf.arg, leaf.arg_pos)?;
            rbd(spec, leaf.pos, path)
        }
    }
}

/// The image a leaf `rbd:POOL/IMAGE[@SNAP]` names.
#[cfg(feature = "rbd")]
fn rbd_spec_of_leaf(arg: &str, pos: usize) -> Result<crate::rbd::RbdSpec, ExprError> {
    crate::rbd::RbdSpec::parse(arg).map_err(|e| ExprError::new(pos, e))
}

#[cfg(not(feature = "rbd"))]
fn rbd_spec_of_leaf(_arg: &str, pos: usize) -> Result<NoRbd, ExprError> {
    Err(no_rbd(pos))
}

/// Stands for the RBD image spec in a build without the `rbd` feature (never made).
#[cfg(not(feature = "rbd"))]
enum NoRbd {}

#[cfg(not(feature = "rbd"))]
fn no_rbd(pos: usize) -> ExprError {
    ExprError::new(
        pos,
        "rbd: this ublk was built without Ceph support (rebuild with the cargo feature rbd)",
    )
}

/// `rbd(pool=P, image=I, snap=S, conf=PATH, id=ID, timeout=SECONDS)`.
#[cfg(feature = "rbd")]
fn rbd_node(n: &Node, path: String) -> Result<(BoxTarget, NodeDesc), ExprError> {
    if let Some(c) = n.children.first() {
        return Err(ExprError::new(
            c.pos(),
            "rbd takes parameters only, no children",
        ));
    }
    n.check_keys(&["pool", "image", "snap", "conf", "id", "timeout"])?;
    let need = |key: &str| {
        n.param(key)
            .map(|p| p.value.as_str())
            .ok_or_else(|| ExprError::new(n.pos, format!("rbd needs {key}=")))
    };
    let mut spec = crate::rbd::RbdSpec::new(
        need("pool")?,
        need("image")?,
        n.param("snap").map(|p| p.value.as_str()),
    );
    spec.conf = n.param("conf").map(|p| p.value.clone().into());
    if let Some(id) = n.param("id") {
        spec.id = id.value.clone();
    }
    if let Some(t) = n.param("timeout") {
        let secs: u64 = t
            .value
            .parse()
            .map_err(|_| ExprError::new(t.value_pos, "timeout: expected a number of seconds"))?;
        spec.timeout = Duration::from_secs(secs.max(1));
    }
    rbd(spec, n.pos, path)
}

#[cfg(not(feature = "rbd"))]
fn rbd_node(n: &Node, _path: String) -> Result<(BoxTarget, NodeDesc), ExprError> {
    Err(no_rbd(n.pos))
}

#[cfg(feature = "rbd")]
fn rbd(
    spec: crate::rbd::RbdSpec,
    pos: usize,
    path: String,
) -> Result<(BoxTarget, NodeDesc), ExprError> {
    let image =
        crate::rbd::Rbd::open(&spec).map_err(|e| ExprError::new(pos, format!("rbd: {e}")))?;
    let read_only = image.read_only();
    let target: BoxTarget = Arc::new(image);
    let mut d = desc("rbd", &target, pos, path);
    d.fields.insert("pool".into(), json!(spec.pool));
    d.fields.insert("image".into(), json!(spec.image));
    if let Some(snap) = &spec.snap {
        d.fields.insert("snap".into(), json!(snap));
    }
    d.fields.insert("read_only".into(), json!(read_only));
    Ok((target, d))
}

#[cfg(not(feature = "rbd"))]
fn rbd(spec: NoRbd, _pos: usize, _path: String) -> Result<(BoxTarget, NodeDesc), ExprError> {
    match spec {}
}

/// `file(path=..., direct=..., size=...)`, `ram(size=..., backing=...)`, `null(size=...)`.
fn long_leaf(n: &Node, path: String) -> Result<(BoxTarget, NodeDesc), ExprError> {
    if let Some(c) = n.children.first() {
        return Err(ExprError::new(
            c.pos(),
            format!("{} takes parameters only, no children", n.name),
        ));
    }
    let need = |key: &str| {
        n.param(key)
            .ok_or_else(|| ExprError::new(n.pos, format!("{} needs {key}=", n.name)))
    };
    match n.name.as_str() {
        "file" => {
            n.check_keys(&["path", "direct", "size"])?;
            let p = need("path")?;
            let direct = n.param("direct").map(Param::bool).transpose()?;
            let size = n.param("size").map(Param::size).transpose()?;
            file(&p.value, p.value_pos, direct, size, path)
        }
        "ram" => {
            n.check_keys(&["size", "backing"])?;
            let size = need("size")?.size()?;
            let backing = n.param("backing").map(|p| p.value.as_str());
            ram(size, backing.map(Path::new), n.pos, path)
        }
        _ => {
            n.check_keys(&["size"])?;
            null(need("size")?.size()?, n.pos, path)
        }
    }
}

fn file(
    text: &str,
    pos: usize,
    direct: Option<bool>,
    size: Option<u64>,
    path: String,
) -> Result<(BoxTarget, NodeDesc), ExprError> {
    let at = |msg: String| ExprError::new(pos, msg);
    let p = Path::new(text);
    let meta = std::fs::metadata(p);
    let is_block = meta.as_ref().is_ok_and(|m| m.file_type().is_block_device());
    if meta.is_err() && size.is_none() {
        return Err(at(format!(
            "{text}: no such file (give file(path={text},size=SIZE) to create it)"
        )));
    }
    let direct = direct.unwrap_or(is_block);
    let target = FileTarget::open(p, size, direct).map_err(|e| at(format!("{text}: {e}")))?;
    let target: BoxTarget = Arc::new(target);
    let mut d = desc("file", &target, pos, path);
    d.fields.insert("path".into(), json!(text));
    d.fields.insert("direct".into(), json!(direct));
    Ok((target, d))
}

fn ram(
    size: u64,
    backing: Option<&Path>,
    pos: usize,
    path: String,
) -> Result<(BoxTarget, NodeDesc), ExprError> {
    let ram = match backing {
        Some(b) => Ram::with_backing(b, size),
        None => Ram::new(size),
    }
    .map_err(|e| ExprError::new(pos, format!("ram memory: {e}")))?;
    let target: BoxTarget = Arc::new(ram);
    let mut d = desc("ram", &target, pos, path);
    if let Some(b) = backing {
        d.fields.insert("backing".into(), json!(b));
    }
    Ok((target, d))
}

fn null(size: u64, pos: usize, path: String) -> Result<(BoxTarget, NodeDesc), ExprError> {
    let target: BoxTarget = Arc::new(Null::with_size(size));
    Ok((Arc::clone(&target), desc("null", &target, pos, path)))
}

fn children(
    n: &Node,
    path: &str,
    o: &BuildOptions,
) -> Result<(Vec<BoxTarget>, Vec<NodeDesc>), ExprError> {
    let mut targets = Vec::new();
    let mut descs = Vec::new();
    for (i, c) in n.children.iter().enumerate() {
        let (t, d) = node(c, child_path(path, i), o)?;
        targets.push(t);
        descs.push(d);
    }
    Ok((targets, descs))
}

fn stripe(n: &Node, path: String, o: &BuildOptions) -> Result<(BoxTarget, NodeDesc), ExprError> {
    n.check_keys(&["chunk"])?;
    if n.children.len() < 2 {
        return Err(ExprError::new(
            n.pos,
            format!("stripe needs at least 2 children, got {}", n.children.len()),
        ));
    }
    let chunk = match n.param("chunk") {
        Some(p) => {
            let c = p.size()?;
            crate::stripe::Layout::new(c, 2)
                .map_err(|e| ExprError::new(p.value_pos, format!("chunk: {e}")))?;
            c
        }
        None => DEFAULT_CHUNK,
    };
    let (targets, descs) = children(n, &path, o)?;
    let stripe = Stripe::new(targets, chunk).map_err(|e| ExprError::new(n.pos, e.to_string()))?;
    let target: BoxTarget = Arc::new(stripe);
    let mut d = desc("stripe", &target, n.pos, path);
    d.fields.insert("chunk".into(), json!(chunk));
    d.children = descs;
    Ok((target, d))
}

fn mirror(n: &Node, path: String, o: &BuildOptions) -> Result<(BoxTarget, NodeDesc), ExprError> {
    n.check_keys(&["region", "assume_clean"])?;
    if n.children.len() < 2 {
        return Err(ExprError::new(
            n.pos,
            format!("mirror needs at least 2 legs, got {}", n.children.len()),
        ));
    }
    let region = n.param("region").map(Param::size).transpose()?;
    let assume_clean = n.param("assume_clean").map(Param::bool).transpose()?;
    let (targets, descs) = children(n, &path, o)?;
    let legs = targets
        .into_iter()
        .zip(&n.children)
        .map(|(t, e)| (t, e.to_string()))
        .collect();
    let opts = MirrorOptions {
        region,
        assume_clean: assume_clean.unwrap_or(false),
        force_new: o.force_new,
    };
    let mirror = Mirror::assemble(legs, &opts).map_err(|e| ExprError::new(n.pos, e.0))?;
    match mirror.assembly() {
        Assembly::New => tracing::info!("mirror at {path}: new"),
        Assembly::Existing {
            resync_regions,
            rebuilding,
        } => tracing::info!(
            "mirror at {path}: reassembled; {resync_regions} dirty regions to resync, \
             {rebuilding} legs to rebuild"
        ),
    }
    let handle = mirror.handle();
    let target: BoxTarget = Arc::new(mirror);
    let mut d = desc("mirror", &target, n.pos, path);
    d.fields
        .insert("region".into(), json!(handle.layout().region_size));
    d.mirror = Some(handle);
    d.children = descs;
    Ok((target, d))
}

/// `compress(CHILD, size=SIZE, algo=lz4|zstd[:LEVEL], workers=N)`: a new image on a blank
/// child (size required), or the one the child holds (size, if given, must match); `workers`
/// threads run the codec for the queues (0, the default: the queue threads do).
fn compress(n: &Node, path: String, o: &BuildOptions) -> Result<(BoxTarget, NodeDesc), ExprError> {
    n.check_keys(&["size", "algo", "workers"])?;
    if n.children.len() != 1 {
        return Err(ExprError::new(
            n.pos,
            format!("compress takes exactly 1 child, got {}", n.children.len()),
        ));
    }
    let size = n.param("size").map(Param::size).transpose()?;
    let algo = match n.param("algo") {
        Some(p) => Some(
            Algo::parse(&p.value).map_err(|e| ExprError::new(p.value_pos, format!("algo: {e}")))?,
        ),
        None => None,
    };
    let (mut targets, descs) = children(n, &path, o)?;
    let workers = n
        .param("workers")
        .map(|p| {
            p.value
                .parse::<usize>()
                .ok()
                .filter(|&w| w <= MAX_WORKERS)
                .ok_or_else(|| {
                    ExprError::new(
                        p.value_pos,
                        format!("workers: a number of threads from 0 to {MAX_WORKERS}"),
                    )
                })
        })
        .transpose()?
        .unwrap_or(0);
    let opts = CompressOptions {
        size,
        algo,
        workers,
    };
    let c = Compress::open(targets.remove(0), &opts).map_err(|e| ExprError::new(n.pos, e.0))?;
    match c.opened() {
        Opened::New => tracing::info!("compress at {path}: new image"),
        Opened::Existing { replayed } => {
            tracing::info!("compress at {path}: reopened; {replayed} journal records replayed")
        }
    }
    let handle = c.handle();
    let target: BoxTarget = Arc::new(c);
    let mut d = desc("compress", &target, n.pos, path);
    d.compress = Some(handle);
    d.children = descs;
    Ok((target, d))
}

fn faulty(n: &Node, path: String, o: &BuildOptions) -> Result<(BoxTarget, NodeDesc), ExprError> {
    n.check_keys(&["fail", "range", "every", "delay"])?;
    if n.children.len() != 1 {
        return Err(ExprError::new(
            n.pos,
            format!("faulty takes exactly 1 child, got {}", n.children.len()),
        ));
    }
    let fail = match n.param("fail") {
        Some(p) => Some(FaultOps::from_name(&p.value).ok_or_else(|| {
            ExprError::new(p.value_pos, "fail: expected read, write, flush or all")
        })?),
        None => None,
    };
    let range = n.param("range").map(Param::range).transpose()?;
    let every = n.param("every").map(Param::u64).transpose()?;
    let delay = n.param("delay").map(Param::u64).transpose()?;
    let rule = fault_rule(fail, range, every, delay).map_err(|e| ExprError::new(n.pos, e))?;
    let (mut targets, descs) = children(n, &path, o)?;
    let faulty = Faulty::new(targets.remove(0), rule);
    let switch = faulty.switch();
    let target: BoxTarget = Arc::new(faulty);
    let mut d = desc("faulty", &target, n.pos, path);
    d.fault = Some(switch);
    d.children = descs;
    Ok((target, d))
}

/// The rule `--fail OPS --range OFF:LEN --every N --delay MS` describe: `None` when neither
/// a failure nor a delay is asked for. A delay without `--fail` delays every operation.
pub fn fault_rule(
    fail: Option<FaultOps>,
    range: Option<(u64, u64)>,
    every: Option<u64>,
    delay_ms: Option<u64>,
) -> Result<Option<FaultRule>, String> {
    if every == Some(0) {
        return Err("every must be at least 1".into());
    }
    let delay = Duration::from_millis(delay_ms.unwrap_or(0));
    if fail.is_none() && delay.is_zero() {
        if range.is_some() || every.is_some() {
            return Err("range and every need fail= or delay=".into());
        }
        return Ok(None);
    }
    Ok(Some(FaultRule {
        ops: fail.unwrap_or(FaultOps::All),
        range,
        every: every.unwrap_or(1),
        fail: fail.is_some(),
        delay,
    }))
}

/// A rule as `ublk status` shows it.
pub fn fault_json(rule: Option<FaultRule>) -> Value {
    match rule {
        None => Value::Null,
        Some(r) => json!({
            "ops": r.ops.name(),
            "fail": r.fail,
            "range": r.range.map(|(o, l)| json!({"offset": o, "len": l})),
            "every": r.every,
            "delay_ms": r.delay.as_millis() as u64,
        }),
    }
}

impl NodeDesc {
    /// The node at `path`, if any.
    pub fn find(&self, path: &str) -> Option<&NodeDesc> {
        if self.path == path {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(path))
    }

    /// The first node (in pre-order) that touches request bytes, if any: why a zero-copy
    /// mode cannot serve this tree.
    pub fn first_needing_data(&self) -> Option<&NodeDesc> {
        if !self.needs_data {
            return None;
        }
        self.children
            .iter()
            .find_map(|c| c.first_needing_data())
            .or(Some(self))
    }

    /// This subtree as `ublk status --json` shows it, with the counters in `stats`.
    pub fn status(&self, stats: &[NodeStats]) -> Value {
        let mut o = Map::new();
        o.insert("node".into(), json!(self.path));
        o.insert("kind".into(), json!(self.kind));
        o.insert("size".into(), json!(self.size));
        for (k, v) in &self.fields {
            o.insert(k.clone(), v.clone());
        }
        if let Some(switch) = &self.fault {
            o.insert("faults".into(), fault_json(switch.get()));
        }
        if let Some(m) = &self.mirror {
            o.insert("mirror".into(), m.status());
        }
        if let Some(c) = &self.compress {
            o.insert("compress".into(), c.status());
        }
        let s = stats
            .iter()
            .find(|s| s.path == self.path)
            .cloned()
            .unwrap_or_default();
        o.insert(
            "stats".into(),
            json!({
                "reads": s.reads, "writes": s.writes,
                "read_bytes": s.read_bytes, "write_bytes": s.write_bytes,
                "flushes": s.flushes, "discards": s.discards,
                "write_zeroes": s.write_zeroes, "errors": s.errors,
            }),
        );
        let mut children: Vec<Value> = self.children.iter().map(|c| c.status(stats)).collect();
        if let Some(m) = &self.mirror {
            // Each leg shows its state (and rebuild progress) beside its own fields.
            for (i, c) in children.iter_mut().enumerate() {
                if let (Value::Object(leg), Value::Object(c)) = (m.leg_json(i), c) {
                    for (k, v) in leg {
                        c.insert(k, v);
                    }
                }
            }
        }
        o.insert("children".into(), Value::Array(children));
        Value::Object(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_nested_trees_with_addresses_and_sizes() {
        let s = build("stripe(stripe(ram:1M,ram:1M,chunk=4K), faulty(ram:2M), chunk=8K)")
            .expect("valid stack");
        assert_eq!(s.desc.kind, "stripe");
        assert_eq!(s.desc.size, 4 << 20);
        assert_eq!(s.desc.children[0].path, "/0");
        assert_eq!(s.desc.children[0].children[1].path, "/0/1");
        assert_eq!(s.desc.children[1].kind, "faulty");
        assert!(s.desc.find("/1").and_then(|d| d.fault.as_ref()).is_some());
        assert_eq!(
            s.expr,
            "stripe(stripe(ram:1M,ram:1M,chunk=4K),faulty(ram:2M),chunk=8K)"
        );
        assert_eq!(
            s.desc.first_needing_data().map(|d| d.path.as_str()),
            Some("/0/0")
        );
    }

    #[test]
    fn errors_name_the_position() {
        let err = |t: &str| build(t).expect_err(t).to_string();
        assert!(err("foo(ram:1M)").starts_with("at column 1: unknown node 'foo'"));
        assert!(err("stripe(ram:1M)").contains("at least 2 children"));
        assert!(err("stripe(ram:1M,ram:1M,chunk=48K)").starts_with("at column 28: chunk:"));
        assert!(err("stripe(ram:1M,ram:2M,chunk=4K)").contains("differ in size"));
        assert!(err("faulty(ram:1M,ram:1M)").contains("exactly 1 child"));
        assert!(err("stripe(file:/nonexistent/x,ram:1M)").starts_with("at column 13:"));
        assert!(err("faulty(ram:1M,fail=sideways)").contains("fail:"));
    }

    #[test]
    fn compress_nodes_build_and_report_their_space() {
        let s = build("compress(ram:1M,size=256K,algo=zstd:5)").expect("compress over RAM");
        assert_eq!(s.desc.kind, "compress");
        assert_eq!(s.desc.size, 256 << 10);
        let st = s.desc.status(&[]);
        assert_eq!(st["compress"]["algo"], "zstd:5");
        assert_eq!(st["compress"]["logical_bytes"], 256 << 10);
        assert_eq!(st["compress"]["stored_bytes"], 0);
        assert!(st["compress"]["metadata_bytes"].as_u64().unwrap() > 0);
        let err = |t: &str| build(t).expect_err(t).to_string();
        assert!(err("compress(ram:1M)").contains("needs size="));
        assert!(err("compress(ram:1M,ram:1M,size=64K)").contains("exactly 1 child"));
        assert!(err("compress(ram:1M,size=64K,algo=gzip)").contains("algo:"));
    }

    #[test]
    fn rounding_to_the_chunk_accepts_slightly_unequal_children() {
        // 1 MiB + 1 KiB and 1 MiB hold the same 256 whole 4 KiB chunks.
        let s = build("stripe(ram:1049600,ram:1M,chunk=4K)").expect("same whole chunks");
        assert_eq!(s.desc.size, 2 << 20);
    }
}
