//! Live statistics as the control socket carries them and `ublk stats` shows them.
//!
//! A server answers `{"cmd":"stats"}` with its queues' raw counters ([`queues_json`]): per
//! queue, per node, the requests and bytes by operation, the errors, and the latency
//! histogram as its non-empty buckets. The tool reads two such samples ([`parse_queues`]) and
//! derives what a person or a scraper wants: rates over the interval, requests in flight and
//! latency percentiles ([`report_json`], [`report_lines`]), or the Prometheus text format
//! ([`prometheus`]).

use std::fmt::Write as _;

use serde_json::{json, Value};
use ublk_zc::stats::{bucket_low, total, Histogram, QueueSnapshot, LATENCY_BUCKETS};
use ublk_zc::NodeStats;

/// The raw counters of `queues`, as the control socket's `stats` answer carries them:
/// `[{"q":0,"nodes":[{"path":"/","reads":N,...,"latency":{"sum_ns":N,"buckets":[[I,N],...]}}]}]`
/// where bucket `I` holds times from [`bucket_low`]`(I)` ns to `bucket_low(I + 1)` ns.
pub fn queues_json(queues: &[QueueSnapshot]) -> Value {
    Value::Array(
        queues
            .iter()
            .map(|q| {
                let nodes: Vec<Value> = q.nodes.iter().map(node_json).collect();
                json!({ "q": q.q_id, "nodes": nodes })
            })
            .collect(),
    )
}

fn node_json(s: &NodeStats) -> Value {
    let buckets: Vec<Value> = s.latency.nonzero().map(|(i, c)| json!([i, c])).collect();
    json!({
        "path": s.path,
        "reads": s.reads,
        "writes": s.writes,
        "read_bytes": s.read_bytes,
        "write_bytes": s.write_bytes,
        "flushes": s.flushes,
        "discards": s.discards,
        "write_zeroes": s.write_zeroes,
        "errors": s.errors,
        "latency": { "sum_ns": s.latency.sum_ns, "buckets": buckets },
    })
}

/// The queues of a `stats` answer's `queues` array (see [`queues_json`]).
pub fn parse_queues(v: &Value) -> Result<Vec<QueueSnapshot>, String> {
    let bad = |what: &str| format!("bad stats answer: {what}");
    let queues = v.as_array().ok_or_else(|| bad("no queue array"))?;
    queues
        .iter()
        .map(|q| {
            let q_id = q["q"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| bad("a queue without an id"))?;
            let nodes = q["nodes"]
                .as_array()
                .ok_or_else(|| bad("a queue without nodes"))?
                .iter()
                .map(|n| parse_node(n).ok_or_else(|| bad("a malformed node")))
                .collect::<Result<_, _>>()?;
            Ok(QueueSnapshot { q_id, nodes })
        })
        .collect()
}

fn parse_node(n: &Value) -> Option<NodeStats> {
    let num = |k: &str| n[k].as_u64();
    let mut latency = Histogram::default();
    latency.sum_ns = n["latency"]["sum_ns"].as_u64()?;
    for b in n["latency"]["buckets"].as_array()? {
        let i = usize::try_from(b[0].as_u64()?).ok()?;
        if i >= LATENCY_BUCKETS {
            return None;
        }
        latency.add_to_bucket(i, b[1].as_u64()?);
    }
    Some(NodeStats {
        path: n["path"].as_str()?.to_string(),
        reads: num("reads")?,
        writes: num("writes")?,
        read_bytes: num("read_bytes")?,
        write_bytes: num("write_bytes")?,
        flushes: num("flushes")?,
        discards: num("discards")?,
        write_zeroes: num("write_zeroes")?,
        errors: num("errors")?,
        latency,
    })
}

/// One node's figures over an interval: its counters now, and what changed since the
/// previous sample.
struct NodeView<'a> {
    now: &'a NodeStats,
    /// The latency of the requests answered in the interval (or since the start, without a
    /// previous sample).
    window: Histogram,
    /// Per second: reads, writes, flushes, discards, write-zeroes, read bytes, write bytes.
    rates: [f64; 7],
}

impl<'a> NodeView<'a> {
    fn new(now: &'a NodeStats, before: Option<&NodeStats>, secs: f64) -> Self {
        let Some(b) = before.filter(|_| secs > 0.0) else {
            return NodeView {
                now,
                window: now.latency.clone(),
                rates: [0.0; 7],
            };
        };
        let per_sec = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        NodeView {
            now,
            window: now.latency.since(&b.latency),
            rates: [
                per_sec(now.reads, b.reads),
                per_sec(now.writes, b.writes),
                per_sec(now.flushes, b.flushes),
                per_sec(now.discards, b.discards),
                per_sec(now.write_zeroes, b.write_zeroes),
                per_sec(now.read_bytes, b.read_bytes),
                per_sec(now.write_bytes, b.write_bytes),
            ],
        }
    }

    fn json(&self) -> Value {
        let s = self.now;
        let r = &self.rates;
        let pct = |h: &Histogram| {
            json!({
                "count": h.count(),
                "mean_ns": h.mean(),
                "p50_ns": h.percentile(0.5),
                "p99_ns": h.percentile(0.99),
                "p99.9_ns": h.percentile(0.999),
            })
        };
        json!({
            "path": s.path,
            "reads": s.reads,
            "writes": s.writes,
            "read_bytes": s.read_bytes,
            "write_bytes": s.write_bytes,
            "flushes": s.flushes,
            "discards": s.discards,
            "write_zeroes": s.write_zeroes,
            "errors": s.errors,
            "in_flight": s.in_flight(),
            "iops": {
                "read": r[0], "write": r[1], "flush": r[2], "discard": r[3], "write_zeroes": r[4],
            },
            "bytes_per_sec": { "read": r[5], "write": r[6] },
            "latency": with_sum(pct(&s.latency), s.latency.sum_ns),
            "interval_latency": pct(&self.window),
        })
    }
}

/// `latency` (an object) with its `sum_ns`.
fn with_sum(mut latency: Value, sum_ns: u64) -> Value {
    if let Value::Object(m) = &mut latency {
        m.insert("sum_ns".into(), sum_ns.into());
    }
    latency
}

/// Pairs each node of `now` with the same node of `before` (by address).
fn views<'a>(now: &'a [NodeStats], before: Option<&[NodeStats]>, secs: f64) -> Vec<NodeView<'a>> {
    now.iter()
        .map(|n| {
            let b = before.and_then(|b| b.iter().find(|x| x.path == n.path));
            NodeView::new(n, b, secs)
        })
        .collect()
}

fn queue_before(before: Option<&[QueueSnapshot]>, q_id: u16) -> Option<&[NodeStats]> {
    before.and_then(|b| {
        b.iter()
            .find(|q| q.q_id == q_id)
            .map(|q| q.nodes.as_slice())
    })
}

/// `ublk stats --json`: for the device (`total`, summed over the queues) and each queue, a
/// node object per node with its counters since the start, `in_flight`, `iops` and
/// `bytes_per_sec` by operation over the `secs` since `before` (zero without it), `latency`
/// (count, sum, mean and percentiles since the start, in ns) and `interval_latency` (the
/// same for the requests answered in the interval).
pub fn report_json(
    dev_id: u32,
    now: &[QueueSnapshot],
    before: Option<&[QueueSnapshot]>,
    secs: f64,
) -> Value {
    let total_now = total(now);
    let total_before = before.map(total);
    let total: Vec<Value> = views(&total_now, total_before.as_deref(), secs)
        .iter()
        .map(NodeView::json)
        .collect();
    let queues: Vec<Value> = now
        .iter()
        .map(|q| {
            let nodes: Vec<Value> = views(&q.nodes, queue_before(before, q.q_id), secs)
                .iter()
                .map(NodeView::json)
                .collect();
            json!({ "q": q.q_id, "nodes": nodes })
        })
        .collect();
    json!({
        "dev_id": dev_id,
        "interval_sec": secs,
        "total": total,
        "queues": queues,
    })
}

/// A time in nanoseconds for people: `850ns`, `12.3us`, `4.10ms`, `1.20s`.
pub fn human_ns(ns: Option<u64>) -> String {
    let Some(ns) = ns else {
        return "-".into();
    };
    match ns {
        0..=999 => format!("{ns}ns"),
        1_000..=999_999 => format!("{:.1}us", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

/// `ublk stats` as a table: the device's total, then each queue, a row per node; rates over
/// the interval, latency percentiles of the interval's requests (since the start without a
/// previous sample).
pub fn report_lines(
    dev_id: u32,
    now: &[QueueSnapshot],
    before: Option<&[QueueSnapshot]>,
    secs: f64,
) -> Vec<String> {
    let window = if before.is_some() {
        format!("last {secs:.1}s")
    } else {
        "since start".into()
    };
    let mut lines = vec![
        format!(
            "device {dev_id}: {} queue(s); rates and latency over the {window}",
            now.len()
        ),
        format!(
            "{:<6} {:<8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8}",
            "queue",
            "node",
            "read/s",
            "rMiB/s",
            "write/s",
            "wMiB/s",
            "other/s",
            "inflight",
            "errors",
            "p50",
            "p99",
            "p99.9"
        ),
    ];
    let mut rows = |scope: &str, views: Vec<NodeView<'_>>| {
        for v in views {
            let r = &v.rates;
            lines.push(format!(
                "{:<6} {:<8} {:>9.0} {:>9.1} {:>9.0} {:>9.1} {:>8.0} {:>8} {:>7} {:>8} {:>8} {:>8}",
                scope,
                v.now.path,
                r[0],
                r[5] / f64::from(1 << 20),
                r[1],
                r[6] / f64::from(1 << 20),
                r[2] + r[3] + r[4],
                v.now.in_flight(),
                v.now.errors,
                human_ns(v.window.percentile(0.5)),
                human_ns(v.window.percentile(0.99)),
                human_ns(v.window.percentile(0.999)),
            ));
        }
    };
    let total_now = total(now);
    let total_before = before.map(total);
    rows("total", views(&total_now, total_before.as_deref(), secs));
    for q in now {
        rows(
            &q.q_id.to_string(),
            views(&q.nodes, queue_before(before, q.q_id), secs),
        );
    }
    lines
}

/// The `le` bounds (ns) of the Prometheus histogram: powers of two from 256 ns to 2^36 ns,
/// each a bucket boundary of [`Histogram`], so the cumulative counts are exact.
fn prometheus_bounds() -> impl Iterator<Item = (u64, usize)> {
    // Bucket 8 * (k - 2) starts at 2^k ns.
    (8..=36u32).map(|k| (1u64 << k, 8 * (k as usize - 2)))
}

/// Escapes a label value for the Prometheus text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `ublk stats --prometheus`: the Prometheus text exposition format, one series per queue
/// and node (sum over `queue` for the device): `ublk_requests_total` and `ublk_bytes_total`
/// by `op`, `ublk_errors_total`, the gauge `ublk_in_flight`, and the histogram
/// `ublk_latency_seconds` (`_bucket{le=...}`, `_sum`, `_count`).
pub fn prometheus(dev_id: u32, now: &[QueueSnapshot]) -> String {
    let mut out = String::new();
    let each = |f: &mut dyn FnMut(String, &NodeStats)| {
        for q in now {
            for n in &q.nodes {
                let labels = format!(
                    "dev=\"{dev_id}\",queue=\"{}\",node=\"{}\"",
                    q.q_id,
                    label(&n.path)
                );
                f(labels, n);
            }
        }
    };
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    head(
        &mut out,
        "ublk_requests_total",
        "counter",
        "Requests a node received, by operation.",
    );
    each(&mut |l, n| {
        for (op, v) in [
            ("read", n.reads),
            ("write", n.writes),
            ("flush", n.flushes),
            ("discard", n.discards),
            ("write_zeroes", n.write_zeroes),
        ] {
            let _ = writeln!(out, "ublk_requests_total{{{l},op=\"{op}\"}} {v}");
        }
    });
    head(
        &mut out,
        "ublk_bytes_total",
        "counter",
        "Bytes read or written through a node.",
    );
    each(&mut |l, n| {
        for (op, v) in [("read", n.read_bytes), ("write", n.write_bytes)] {
            let _ = writeln!(out, "ublk_bytes_total{{{l},op=\"{op}\"}} {v}");
        }
    });
    head(
        &mut out,
        "ublk_errors_total",
        "counter",
        "Requests a node completed with an error.",
    );
    each(&mut |l, n| {
        let _ = writeln!(out, "ublk_errors_total{{{l}}} {}", n.errors);
    });
    head(
        &mut out,
        "ublk_in_flight",
        "gauge",
        "Requests a node received and has not answered yet.",
    );
    each(&mut |l, n| {
        let _ = writeln!(out, "ublk_in_flight{{{l}}} {}", n.in_flight());
    });
    head(
        &mut out,
        "ublk_latency_seconds",
        "histogram",
        "Time a node took to answer a request; at the root, the server-side service time from fetch to commit.",
    );
    each(&mut |l, n| {
        let h = &n.latency;
        let mut cumulative = 0u64;
        let mut next = 0usize;
        for (le_ns, first_above) in prometheus_bounds() {
            while next < first_above.min(LATENCY_BUCKETS) {
                cumulative += h.bucket(next);
                next += 1;
            }
            debug_assert_eq!(bucket_low(first_above), le_ns);
            let le = le_ns as f64 / 1e9;
            let _ = writeln!(
                out,
                "ublk_latency_seconds_bucket{{{l},le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "ublk_latency_seconds_bucket{{{l},le=\"+Inf\"}} {}",
            h.count()
        );
        let _ = writeln!(
            out,
            "ublk_latency_seconds_sum{{{l}}} {}",
            h.sum_ns as f64 / 1e9
        );
        let _ = writeln!(out, "ublk_latency_seconds_count{{{l}}} {}", h.count());
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(writes: u64, times_ns: &[u64]) -> Vec<QueueSnapshot> {
        let mut latency = Histogram::default();
        for &t in times_ns {
            latency.record(t);
        }
        let node = NodeStats {
            path: "/".into(),
            writes,
            write_bytes: writes * 4096,
            latency,
            ..NodeStats::default()
        };
        vec![
            QueueSnapshot {
                q_id: 0,
                nodes: vec![node.clone()],
            },
            QueueSnapshot {
                q_id: 1,
                nodes: vec![node],
            },
        ]
    }

    #[test]
    fn raw_counters_round_trip_through_json() {
        let s = sample(3, &[100, 5_000, 70_000]);
        let text = queues_json(&s).to_string();
        let back = parse_queues(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(parse_queues(&json!([{"q": 0, "nodes": [{"path": "/"}]}])).is_err());
    }

    #[test]
    fn rates_and_percentiles_come_from_two_samples() {
        let before = sample(10, &[1000; 10]);
        let now = sample(
            110,
            &[&[1000u64; 10][..], &[50_000; 99][..], &[2_000_000]].concat(),
        );
        let r = report_json(7, &now, Some(&before), 2.0);
        let t = &r["total"][0];
        assert_eq!(t["writes"], 220);
        assert_eq!(t["iops"]["write"], 100.0);
        assert_eq!(t["bytes_per_sec"]["write"], 100.0 * 4096.0);
        assert_eq!(t["in_flight"], 0);
        assert_eq!(t["latency"]["count"], 220);
        assert_eq!(t["interval_latency"]["count"], 200);
        let p50 = t["interval_latency"]["p50_ns"].as_u64().unwrap();
        assert!((50_000..=50_000 * 9 / 8).contains(&p50), "{p50}");
        let p999 = t["interval_latency"]["p99.9_ns"].as_u64().unwrap();
        assert!(p999 > 2_000_000, "{p999}");
        assert_eq!(r["queues"][1]["nodes"][0]["iops"]["write"], 50.0);
        let lines = report_lines(7, &now, Some(&before), 2.0);
        assert_eq!(lines.len(), 5);
        assert!(lines[2].starts_with("total  /"), "{}", lines[2]);
    }

    #[test]
    fn prometheus_text_is_well_formed() {
        let text = prometheus(3, &sample(2, &[300, 3_000_000]));
        let mut last_le = -1.0f64;
        let mut bucket_lines = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                assert!(rest.starts_with("HELP ublk_") || rest.starts_with("TYPE ublk_"));
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(
                series.starts_with("ublk_") && series.ends_with('}'),
                "{line}"
            );
            if series.contains("queue=\"0\"") && series.contains("_bucket{") {
                let le = series
                    .split("le=\"")
                    .nth(1)
                    .unwrap()
                    .trim_end_matches("\"}");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                assert!(le > last_le);
                last_le = le;
                bucket_lines += 1;
                let n: u64 = value.parse().unwrap();
                assert_eq!(n, u64::from(le > 500e-9) + u64::from(le > 4.1e-3));
            }
        }
        assert_eq!(bucket_lines, 30);
        assert!(text.contains("ublk_latency_seconds_count{dev=\"3\",queue=\"1\",node=\"/\"} 2"));
        assert!(
            text.contains("ublk_requests_total{dev=\"3\",queue=\"0\",node=\"/\",op=\"write\"} 2")
        );
    }
}
