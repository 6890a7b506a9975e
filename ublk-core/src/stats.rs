//! Per-node I/O counters and latency histograms.
//!
//! Each queue counts, for every node of its tree, the requests the node received, the ones it
//! failed, and how long it took to answer each one, in a [`Histogram`] of fixed log-linear
//! buckets. The counters of a queue are written only by its own thread (a relaxed load and
//! store, no read-modify-write, no allocation), and read from any thread: a
//! [`StatsRegistry`] sums them over the queues by node address, or gives them per queue.
//!
//! Times come from the queue's clock, read once when a loop turn's completions are reaped
//! and once before its commits are queued (not per request). The root node's time is the
//! server-side service time of a kernel request: from the turn that reaped its fetch to the
//! turn that commits it, which is what the kernel waits for, since the loop sends the turn's
//! commits together at its end. A node below the root is timed from the turn it received
//! the request to the turn its completion reached the engine; a node that answers within the
//! turn it was asked shows 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::io::{BlockIo, Op};

/// Sub-buckets per power of two, as a power of two: 8 buckets per octave, each at most
/// 12.5% wide.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;

/// Buckets of a [`Histogram`]: values from 0 to 2^37 ns (137 s) in 8 buckets per power of
/// two, longer times in the last one.
pub const LATENCY_BUCKETS: usize = 280;

/// The bucket of a time of `ns` nanoseconds.
pub fn bucket_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let e = 63 - ns.leading_zeros();
    let sub = (ns >> (e - SUB_BITS)) & (SUB - 1);
    let i = ((e - SUB_BITS + 1) as usize) * SUB as usize + sub as usize;
    i.min(LATENCY_BUCKETS - 1)
}

/// The smallest time (ns) bucket `i` holds.
pub fn bucket_low(i: usize) -> u64 {
    let i = i.min(LATENCY_BUCKETS - 1) as u64;
    if i < SUB {
        return i;
    }
    let e = i / SUB + u64::from(SUB_BITS) - 1;
    let sub = i % SUB;
    (SUB + sub) << (e - u64::from(SUB_BITS))
}

/// The time (ns) bucket `i`'s values stay below (`u64::MAX` for the last bucket).
pub fn bucket_high(i: usize) -> u64 {
    if i + 1 >= LATENCY_BUCKETS {
        u64::MAX
    } else {
        bucket_low(i + 1)
    }
}

/// A latency histogram: how many requests took a time in each bucket (see [`bucket_of`]),
/// and the sum of their times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    /// The sum of the times, in nanoseconds.
    pub sum_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; LATENCY_BUCKETS],
            sum_ns: 0,
        }
    }
}

impl Histogram {
    /// Counts one time of `ns` nanoseconds.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.sum_ns = self.sum_ns.wrapping_add(ns);
    }

    /// Adds `n` requests to bucket `i` (ignored beyond the last bucket).
    pub fn add_to_bucket(&mut self, i: usize, n: u64) {
        if let Some(c) = self.counts.get_mut(i) {
            *c = c.wrapping_add(n);
        }
    }

    /// How many requests bucket `i` holds.
    pub fn bucket(&self, i: usize) -> u64 {
        self.counts.get(i).copied().unwrap_or(0)
    }

    /// The non-empty buckets, as `(index, count)`.
    pub fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (i, c))
    }

    /// How many requests it counts.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0, |a, &c| a.wrapping_add(c))
    }

    /// Adds `other`'s requests to these.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    /// The requests counted here and not in `earlier` (an older sample of the same counters).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
        }
    }

    /// The time (ns) within which a fraction `q` (0 to 1) of the requests were answered: the
    /// upper bound of the bucket that holds the `ceil(q * count)`-th fastest one, so at most
    /// 12.5% above the true value (exact below 16 ns); `None` when nothing was counted.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // Buckets below 2 * SUB hold one value each: that value is exact.
                return Some(if i < 2 * SUB as usize || i + 1 == LATENCY_BUCKETS {
                    bucket_low(i)
                } else {
                    bucket_high(i)
                });
            }
        }
        None
    }

    /// The mean time in nanoseconds, `None` when nothing was counted.
    pub fn mean(&self) -> Option<u64> {
        let n = self.count();
        (n > 0).then(|| self.sum_ns / n)
    }
}

/// Counters of one node, as one queue saw it.
#[derive(Debug)]
pub(crate) struct NodeCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    latency_sum: AtomicU64,
}

impl Default for NodeCounters {
    fn default() -> Self {
        NodeCounters {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            write_zeroes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum: AtomicU64::new(0),
        }
    }
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

    /// A request answered after `ns` nanoseconds.
    pub(crate) fn answered(&self, ns: u64) {
        bump(&self.latency[bucket_of(ns)], 1);
        bump(&self.latency_sum, ns);
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
        for (i, c) in self.latency.iter().enumerate() {
            s.latency.add_to_bucket(i, get(c));
        }
        s.latency.sum_ns = s.latency.sum_ns.wrapping_add(get(&self.latency_sum));
    }
}

/// One queue's counters, a slot per node of its tree.
#[derive(Debug)]
pub(crate) struct QueueStats {
    pub(crate) q_id: u16,
    pub(crate) paths: Vec<String>,
    pub(crate) nodes: Vec<NodeCounters>,
}

impl QueueStats {
    pub(crate) fn new(q_id: u16, paths: Vec<String>) -> Self {
        let nodes = paths.iter().map(|_| NodeCounters::default()).collect();
        QueueStats { q_id, paths, nodes }
    }
}

/// What a node did, summed over the queues (or on one queue).
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
    /// How long the node took to answer each request it answered (for the root, the
    /// server-side service time from fetch to commit); its count is the requests answered.
    pub latency: Histogram,
}

impl NodeStats {
    /// Requests received, of every kind.
    pub fn requests(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.discards + self.write_zeroes
    }

    /// Requests received and not answered yet.
    pub fn in_flight(&self) -> u64 {
        self.requests().saturating_sub(self.latency.count())
    }

    /// Adds `other`'s counts (the same node on another queue) to these.
    pub fn merge(&mut self, other: &NodeStats) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.read_bytes += other.read_bytes;
        self.write_bytes += other.write_bytes;
        self.flushes += other.flushes;
        self.discards += other.discards;
        self.write_zeroes += other.write_zeroes;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
    }
}

/// One queue's view of every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// The queue's id.
    pub q_id: u16,
    /// Its counters, a [`NodeStats`] per node in node order.
    pub nodes: Vec<NodeStats>,
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

    /// Every queue's counters, by queue id, each node in node order (pre-order: the root,
    /// then each subtree in turn).
    pub fn queues(&self) -> Vec<QueueSnapshot> {
        let queues = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<QueueSnapshot> = queues
            .iter()
            .map(|q| QueueSnapshot {
                q_id: q.q_id,
                nodes: q
                    .paths
                    .iter()
                    .zip(&q.nodes)
                    .map(|(path, c)| {
                        let mut s = NodeStats {
                            path: path.clone(),
                            ..NodeStats::default()
                        };
                        c.add_to(&mut s);
                        s
                    })
                    .collect(),
            })
            .collect();
        out.sort_by_key(|q| q.q_id);
        out
    }

    /// Every node's counters summed over the queues, in node order.
    pub fn snapshot(&self) -> Vec<NodeStats> {
        total(&self.queues())
    }
}

/// The nodes' counters of `queues` summed by node address, in the order first seen.
pub fn total(queues: &[QueueSnapshot]) -> Vec<NodeStats> {
    let mut out: Vec<NodeStats> = Vec::new();
    for q in queues {
        for s in &q.nodes {
            match out.iter_mut().find(|t| t.path == s.path) {
                Some(t) => t.merge(s),
                None => out.push(s.clone()),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_time_in_order_and_within_an_eighth() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(15), 15);
        assert_eq!(bucket_of(16), 16);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        for i in 0..LATENCY_BUCKETS - 1 {
            let (lo, hi) = (bucket_low(i), bucket_high(i));
            assert!(lo < hi, "bucket {i}: {lo}..{hi}");
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi - 1), i);
            assert_eq!(bucket_of(hi), i + 1);
            if lo >= SUB {
                assert!(
                    (hi - lo) * SUB <= lo,
                    "bucket {i} is wider than 1/8: {lo}..{hi}"
                );
            }
        }
        assert_eq!(bucket_low(LATENCY_BUCKETS - 1), 15 << 33);
        assert_eq!(bucket_of((1 << 37) - 1), LATENCY_BUCKETS - 1);
        assert_eq!(bucket_of(1 << 40), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn percentiles_fall_in_the_right_bucket() {
        let mut h = Histogram::default();
        assert_eq!(h.percentile(0.5), None);
        for ns in 1..=1000u64 {
            h.record(ns * 1000);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.sum_ns, 1000 * 500_500);
        for (q, exact) in [(0.5, 500_000u64), (0.99, 990_000), (0.999, 999_000)] {
            let p = h.percentile(q).unwrap();
            assert!(p > exact && p <= exact + exact / 8, "p{q}: {p} for {exact}");
        }
        let mut zeros = Histogram::default();
        zeros.record(0);
        assert_eq!(zeros.percentile(0.999), Some(0));
        let mut early = Histogram::default();
        early.record(1000);
        let later = h.since(&early);
        assert_eq!(later.count(), 999);
        assert_eq!(later.bucket(bucket_of(1000)), 0);
    }

    #[test]
    fn registry_sums_queues_by_node() {
        let reg = StatsRegistry::new();
        for q_id in [1, 0] {
            let q = Arc::new(QueueStats::new(q_id, vec!["/".into(), "/0".into()]));
            let io = BlockIo {
                op: Op::Write,
                offset: 0,
                len: 4096,
                flags: crate::io::IoFlags::default(),
            };
            q.nodes[0].request(&io);
            q.nodes[0].request(&io);
            q.nodes[0].answered(2000);
            q.nodes[1].request(&io);
            reg.add(q);
        }
        let queues = reg.queues();
        assert_eq!(queues[0].q_id, 0);
        assert_eq!(queues[1].nodes[0].in_flight(), 1);
        let total = reg.snapshot();
        assert_eq!(total[0].writes, 4);
        assert_eq!(total[0].write_bytes, 4 * 4096);
        assert_eq!(total[0].latency.count(), 2);
        assert_eq!(total[0].in_flight(), 2);
        assert_eq!(total[1].writes, 2);
        assert_eq!(total[1].in_flight(), 2);
    }
}
