//! Per-node I/O counters.
//!
//! Each queue counts, for every node of its tree, the requests the node received and the
//! ones it failed. The counters of a queue are written only by its own thread (a relaxed
//! load and store, no read-modify-write), and read from any thread: a [`StatsRegistry`]
//! sums them over the queues by node address.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::io::{BlockIo, Op};

/// Counters of one node, as one queue saw it.
#[derive(Debug, Default)]
pub(crate) struct NodeCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
}

/// Adds `n` to a counter only this thread writes.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl NodeCounters {
    pub(crate) fn request(&self, req: &BlockIo) {
        let len = u64::from(req.len);
        match req.op {
            Op::Read => {
                bump(&self.reads, 1);
                bump(&self.read_bytes, len);
            }
            Op::Write => {
                bump(&self.writes, 1);
                bump(&self.write_bytes, len);
            }
            Op::Flush => bump(&self.flushes, 1),
            Op::Discard => bump(&self.discards, 1),
            Op::WriteZeroes => bump(&self.write_zeroes, 1),
        }
    }

    pub(crate) fn error(&self) {
        bump(&self.errors, 1);
    }

    fn add_to(&self, s: &mut NodeStats) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        s.reads += get(&self.reads);
        s.writes += get(&self.writes);
        s.read_bytes += get(&self.read_bytes);
        s.write_bytes += get(&self.write_bytes);
        s.flushes += get(&self.flushes);
        s.discards += get(&self.discards);
        s.write_zeroes += get(&self.write_zeroes);
        s.errors += get(&self.errors);
    }
}

/// One queue's counters, a slot per node of its tree.
#[derive(Debug)]
pub(crate) struct QueueStats {
    pub(crate) paths: Vec<String>,
    pub(crate) nodes: Vec<NodeCounters>,
}

impl QueueStats {
    pub(crate) fn new(paths: Vec<String>) -> Self {
        let nodes = paths.iter().map(|_| NodeCounters::default()).collect();
        QueueStats { paths, nodes }
    }
}

/// What a node did, summed over the queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// The node's address: `/`, `/0`, `/0/1`, ...
    pub path: String,
    /// Read requests received.
    pub reads: u64,
    /// Write requests received.
    pub writes: u64,
    /// Bytes asked for by reads.
    pub read_bytes: u64,
    /// Bytes carried by writes.
    pub write_bytes: u64,
    /// Flushes received.
    pub flushes: u64,
    /// Discards received.
    pub discards: u64,
    /// Write-zeroes received.
    pub write_zeroes: u64,
    /// Requests this node completed with an error.
    pub errors: u64,
}

/// The counters of a device's queues, to read from any thread (give one to
/// [`crate::DeviceBuilder::stats`]).
#[derive(Debug, Clone, Default)]
pub struct StatsRegistry(Arc<Mutex<Vec<Arc<QueueStats>>>>);

impl StatsRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn add(&self, q: Arc<QueueStats>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(q);
    }

    /// Every node's counters summed over the queues, in node order (pre-order: the root,
    /// then each subtree in turn).
    pub fn snapshot(&self) -> Vec<NodeStats> {
        let queues = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<NodeStats> = Vec::new();
        for q in queues.iter() {
            for (path, c) in q.paths.iter().zip(&q.nodes) {
                let i = match out.iter().position(|s| &s.path == path) {
                    Some(i) => i,
                    None => {
                        out.push(NodeStats {
                            path: path.clone(),
                            ..NodeStats::default()
                        });
                        out.len() - 1
                    }
                };
                c.add_to(&mut out[i]);
            }
        }
        out
    }
}
