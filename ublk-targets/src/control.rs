//! The per-device control socket: how the `ublk` tool talks to a running server.
//!
//! Each server listens on `/run/ublk/ublk<ID>.sock` (the directory can be moved with
//! `UBLK_RUN_DIR`). The protocol is JSON lines: one request object per line, one answer per
//! line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Requests:
//! - `{"cmd":"status"}`: `{"ok":true,"dev_id":N,"expr":"...","tree":NODE}` with `NODE` as in
//!   [`crate::stack::NodeDesc::status`];
//! - `{"cmd":"fault","node":"/1","rule":RULE}` sets the rule of the faulty node at that
//!   address, `RULE` being `null` (clear) or `{"fail":"read"|"write"|"flush"|"all"|null,
//!   "range":[OFFSET,LEN]|null,"every":N|null,"delay_ms":N|null}`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use ublk_zc::StatsRegistry;

use crate::faulty::FaultOps;
use crate::stack::{fault_rule, NodeDesc};

/// The directory of the control sockets.
pub fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ublk"))
}

/// Device `dev_id`'s control socket.
pub fn socket_path(dev_id: u32) -> PathBuf {
    run_dir().join(format!("ublk{dev_id}.sock"))
}

/// What a server answers about.
#[derive(Debug)]
pub struct ServerState {
    /// The device id.
    pub dev_id: u32,
    /// The canonical expression of the tree.
    pub expr: String,
    /// The tree.
    pub desc: NodeDesc,
    /// The queues' counters.
    pub stats: StatsRegistry,
}

impl ServerState {
    /// Answers one request.
    pub fn handle(&self, req: &Value) -> Value {
        match self.try_handle(req) {
            Ok(v) => v,
            Err(e) => json!({ "ok": false, "error": e }),
        }
    }

    fn try_handle(&self, req: &Value) -> Result<Value, String> {
        match req.get("cmd").and_then(Value::as_str) {
            Some("status") => Ok(json!({
                "ok": true,
                "dev_id": self.dev_id,
                "expr": self.expr,
                "tree": self.desc.status(&self.stats.snapshot()),
            })),
            Some("fault") => {
                let path = req
                    .get("node")
                    .and_then(Value::as_str)
                    .ok_or("fault: no node given")?;
                let node = self
                    .desc
                    .find(path)
                    .ok_or_else(|| format!("no node {path} in {}", self.expr))?;
                let switch = node.fault.as_ref().ok_or_else(|| {
                    format!("node {path} is a {} node, not a faulty one", node.kind)
                })?;
                let rule = parse_rule(req.get("rule").unwrap_or(&Value::Null))?;
                switch.set(rule);
                Ok(json!({ "ok": true }))
            }
            Some(other) => Err(format!("unknown command {other:?}")),
            None => Err("no command".into()),
        }
    }
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
        let dir = run_dir();
        std::fs::create_dir_all(&dir)?;
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
        let state = Arc::new(ServerState {
            dev_id: 77,
            expr: stack.expr.clone(),
            desc: stack.desc,
            stats: StatsRegistry::new(),
        });
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
}
