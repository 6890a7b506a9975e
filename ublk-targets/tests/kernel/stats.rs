//! `stats_*`: `ublk stats` on the real driver.
//!
//! fio runs a known number of 4 KiB direct I/Os on a stripe of two RAM devices with two
//! queues; what `ublk stats --json` counted in between (the difference of two calls, so the
//! kernel's own reads at device creation do not count) must match fio's request and byte
//! counts within 2%, per node too (each 4 KiB I/O inside a 4 KiB chunk goes to one leg); every
//! answered request must be in the latency histogram once, nothing left in flight; and
//! `ublk stats --prometheus` must be well-formed text whose counts agree; `--watch` piped
//! prints one JSON report per interval, with the write rate of a fio running meanwhile.

use super::*;

/// `ublk stats ID --json --interval 0.05`: the report.
fn stats_json(id: u64) -> Value {
    let args = ["stats", &id.to_string(), "--json", "--interval", "0.05"].map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    parse_json(&ublk(&args), &command_line("ublk", &args))
}

/// The node at `path` in a report's `total`.
fn node<'a>(report: &'a Value, path: &str) -> &'a Value {
    report["total"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["path"] == path))
        .unwrap_or_else(|| panic!("no node {path} in {report}"))
}

/// `key` of the node at `path`, grown from `before` to `after`.
fn grew(before: &Value, after: &Value, path: &str, key: &str) -> u64 {
    field_u64(node(after, path), key) - field_u64(node(before, path), key)
}

/// Whether `got` is within 2% of `want`.
fn close(got: u64, want: u64) -> bool {
    got.abs_diff(want) * 50 <= want
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stats_count_what_fio_did() {
    let session = Session::start("stats-count");
    let dev = add_stack("stripe(ram:16M,ram:16M,chunk=4K)", &["--queues", "2"]);
    let id = dev_id(&dev);
    let path = dev_path(&dev);
    let before = stats_json(id);
    let mut fio_writes = 0;
    let mut fio_reads = 0;
    let mut fio_bytes = (0, 0);
    for (rw, size) in [("randwrite", 8 * MIB), ("randread", 4 * MIB)] {
        let args: Vec<String> = [
            "--name=stats",
            &format!("--filename={path}"),
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--rw={rw}"),
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={size}"),
            "--output-format=json",
        ]
        .map(String::from)
        .to_vec();
        let (report, _) = run_fio(&args, &session.scratch, &format!("fio {rw} on {path}"));
        let job = &report["jobs"][0];
        fio_writes += field_u64(&job["write"], "total_ios");
        fio_reads += field_u64(&job["read"], "total_ios");
        fio_bytes.0 += field_u64(&job["read"], "io_bytes");
        fio_bytes.1 += field_u64(&job["write"], "io_bytes");
    }
    assert_eq!((fio_writes, fio_reads), (2048, 1024), "fio's own counts");
    let after = stats_json(id);
    let ctx =
        format!("fio: {fio_writes} writes, {fio_reads} reads\nbefore: {before}\nafter: {after}");

    let writes = grew(&before, &after, "/", "writes");
    let reads = grew(&before, &after, "/", "reads");
    assert!(close(writes, fio_writes), "writes {writes}: {ctx}");
    assert!(close(reads, fio_reads), "reads {reads}: {ctx}");
    let read_bytes = grew(&before, &after, "/", "read_bytes");
    let write_bytes = grew(&before, &after, "/", "write_bytes");
    assert!(
        close(read_bytes, fio_bytes.0),
        "read bytes {read_bytes}: {ctx}"
    );
    assert!(
        close(write_bytes, fio_bytes.1),
        "write bytes {write_bytes}: {ctx}"
    );

    // Each 4 KiB I/O lies in one 4 KiB chunk: one leg or the other serves it.
    for key in ["writes", "reads", "write_bytes", "read_bytes"] {
        let root = grew(&before, &after, "/", key);
        let legs = grew(&before, &after, "/0", key) + grew(&before, &after, "/1", key);
        assert_eq!(legs, root, "{key}: the legs' sum against the root's: {ctx}");
    }

    // Every request answered is timed once; none is left in flight once fio is done.
    for path in ["/", "/0", "/1"] {
        let n = node(&after, path);
        let requests: u64 = ["reads", "writes", "flushes", "discards", "write_zeroes"]
            .iter()
            .map(|k| field_u64(n, k))
            .sum();
        assert_eq!(field_u64(n, "in_flight"), 0, "{path}: {ctx}");
        assert_eq!(field_u64(&n["latency"], "count"), requests, "{path}: {ctx}");
    }
    let lat = &node(&after, "/")["latency"];
    let (p50, p99, p999) = (
        field_u64(lat, "p50_ns"),
        field_u64(lat, "p99_ns"),
        field_u64(lat, "p99.9_ns"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= p999, "percentiles: {lat}");
    assert!(
        p999 < 10_000_000_000,
        "a RAM device's p99.9 over 10 s: {lat}"
    );

    // The queues add up to the total, and both served I/O.
    let queues = after["queues"].as_array().expect("queues");
    assert_eq!(queues.len(), 2, "{after}");
    let per_queue: Vec<u64> = queues
        .iter()
        .map(|q| field_u64(&q["nodes"][0], "writes"))
        .collect();
    assert_eq!(
        per_queue.iter().sum::<u64>(),
        field_u64(node(&after, "/"), "writes")
    );

    // The Prometheus text: HELP and TYPE for each metric, then `name{labels} value` lines.
    let out = ublk(&["stats", "--prometheus", &id.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut typed = BTreeSet::new();
    let mut root_count = 0;
    let mut root_inf = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap_or("").to_string());
            continue;
        }
        if line.starts_with("# HELP ublk_") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}\n{text}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        let (name, labels) = series
            .split_once('{')
            .unwrap_or_else(|| panic!("no labels in {line:?}"));
        assert!(labels.ends_with('}'), "{line:?}");
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            typed.contains(family),
            "{name} before its TYPE line:\n{text}"
        );
        if labels.contains("node=\"/\"") {
            if name == "ublk_latency_seconds_count" {
                root_count += value as u64;
            } else if name == "ublk_latency_seconds_bucket" && labels.contains("le=\"+Inf\"") {
                root_inf += value as u64;
            }
        }
    }
    for family in [
        "ublk_requests_total",
        "ublk_bytes_total",
        "ublk_errors_total",
        "ublk_in_flight",
        "ublk_latency_seconds",
    ] {
        assert!(typed.contains(family), "no {family}:\n{text}");
    }
    assert_eq!(
        root_count,
        field_u64(&node(&after, "/")["latency"], "count"),
        "{text}"
    );
    assert_eq!(root_inf, root_count, "{text}");

    // --watch, piped: one JSON report per interval, with the rates of what fio does meanwhile.
    let id_text = id.to_string();
    let mut watch = Spawned::new(
        &ublk_bin(),
        &["stats", &id_text, "--watch", "--interval", "0.5"],
        None,
    );
    let args: Vec<String> = [
        "--name=watched",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--time_based",
        "--runtime=3",
        "--output-format=json",
    ]
    .map(String::from)
    .to_vec();
    run_fio(
        &args,
        &session.scratch,
        &format!("fio under ublk stats --watch on {path}"),
    );
    let out = watch.kill();
    let text = String::from_utf8_lossy(&out.stdout);
    let reports: Vec<Value> = text
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("--watch printed a line that is not JSON ({e}): {l}"))
        })
        .collect();
    assert!(
        reports.len() >= 4,
        "--watch printed {} reports:\n{text}",
        reports.len()
    );
    let busiest = reports
        .iter()
        .map(|r| node(r, "/")["iops"]["write"].as_f64().expect("iops.write"))
        .fold(0.0, f64::max);
    assert!(busiest > 0.0, "no write rate seen while fio wrote:\n{text}");
    for r in &reports {
        assert!(
            (0.3..5.0).contains(&r["interval_sec"].as_f64().expect("interval_sec")),
            "{r}"
        );
    }

    // A device without a server answering is an error that names it.
    let out = ublk_unchecked(&["stats", "999"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("device 999"),
        "{}",
        describe("ublk stats 999", &out)
    );
    del(&dev);
}
