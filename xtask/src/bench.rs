//! `cargo xtask bench`: fio on ublk devices vs. kernel reference devices
//! (null_blk, brd), in one VM boot, with alternating rounds and medians.
//!
//! Writes `target/bench/report.md` and `target/bench/raw.json`.

use crate::fio::{self, FioResult};
use crate::scripts::prelude;
use crate::util::Workspace;
use crate::vm::{host_has_ublk, run_payload, Payload, VmOpts};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;

/// How a device under test is created.
enum Kind {
    /// `ublk add <args>`.
    Ublk(&'static str),
    /// A kernel module creating `dev` when loaded with `params`.
    Kmod {
        module: &'static str,
        params: &'static str,
        dev: &'static str,
    },
}

/// A device under test (the name must not contain dots or spaces).
struct Device {
    name: &'static str,
    kind: Kind,
}

const DEVICES: &[Device] = &[
    Device {
        name: "ublk-null",
        kind: Kind::Ublk("null --size 1G --queues 1 --depth 128"),
    },
    Device {
        name: "ublk-ram",
        kind: Kind::Ublk("ram --size 1G"),
    },
    Device {
        name: "null_blk",
        kind: Kind::Kmod {
            module: "null_blk",
            params: "queue_mode=2 irqmode=0 nr_devices=1 gb=1",
            dev: "/dev/nullb0",
        },
    },
    Device {
        name: "brd",
        kind: Kind::Kmod {
            module: "brd",
            params: "rd_nr=1 rd_size=1048576",
            dev: "/dev/ram0",
        },
    },
];

/// The reference device for the ratio column.
const REFERENCE: &str = "null_blk";

/// fio tests: (name, iodepth).
const TESTS: &[(&str, u32)] = &[("randread-qd64", 64), ("randread-qd1", 1)];

fn script(rounds: u32, runtime: u32) -> String {
    let mut s = prelude();
    s.push_str(
        r#"
UBLK_IDS=""
TEARDOWN=""
cleanup() {
    for id in $UBLK_IDS; do ublk del "$id" || echo "bench: ublk del $id failed" >&2; done
    eval "$TEARDOWN"
}
trap cleanup EXIT
echo "XTASK-BENCH-KERNEL $(uname -r)"
echo "XTASK-BENCH-CPUS $(nproc)"
"#,
    );
    for (i, d) in DEVICES.iter().enumerate() {
        let (shown, setup, capture, teardown) = match &d.kind {
            Kind::Ublk(args) => (
                format!("ublk add {args}"),
                format!("ublk_add u {args}"),
                r#"DEV=$u_dev; UBLK_IDS="$UBLK_IDS $u_id""#.to_string(),
                ":".to_string(),
            ),
            Kind::Kmod {
                module,
                params,
                dev,
            } => (
                format!("insmod {module}.ko {params}"),
                format!("load_mod {module} {params} && DEV={dev} && wait_blk \"$DEV\""),
                ":".to_string(),
                format!("rmmod {module}"),
            ),
        };
        let _ = write!(
            s,
            r#"
DEV=""
echo "== bench: setting up {name}: {shown}"
if {setup}; then
    {capture}
    DEV_{i}=$DEV
    TEARDOWN="{teardown}; $TEARDOWN"
    echo "== bench: {name} is $DEV"
else
    echo "XTASK-BENCH-SKIP {name}"
    DEV_{i}=""
fi
"#,
            name = d.name,
        );
    }
    for round in 1..=rounds {
        for (i, d) in DEVICES.iter().enumerate() {
            for (test, qd) in TESTS {
                let _ = write!(
                    s,
                    r#"
if [ -n "$DEV_{i}" ]; then
    echo "== bench: round {round}/{rounds}: {name} {test}"
    run_fio {name}.{test}.{round} --name={test} --filename="$DEV_{i}" --ioengine=io_uring \
        --direct=1 --rw=randread --bs=4k --iodepth={qd} --numjobs=1 --time_based \
        --runtime={runtime} --randrepeat=0 --norandommap || echo "XTASK-BENCH-FAIL {name}.{test}.{round}"
fi
"#,
                    name = d.name,
                );
            }
        }
    }
    s.push_str("\necho \"== bench: done\"\n");
    s
}

/// One fio measurement.
struct Sample {
    device: String,
    test: String,
    round: u32,
    result: FioResult,
}

/// Runs the benchmark and writes the report.
pub fn bench(ws: &Workspace, opts: &VmOpts, rounds: u32, runtime: u32) -> Result<()> {
    let payload = Payload {
        script: script(rounds, runtime),
        extra_bins: Vec::new(),
    };
    let outcome = run_payload(ws, &payload, opts)?;
    let out = &outcome.output;

    let mut samples = Vec::new();
    for (label, json) in fio::sections(out) {
        let parts: Vec<&str> = label.split('.').collect();
        let [device, test, round] = parts[..] else {
            bail!("unexpected fio label {label:?}");
        };
        let result = fio::parse(&json).with_context(|| format!("fio results of {label}"))?;
        samples.push(Sample {
            device: device.to_string(),
            test: test.to_string(),
            round: round
                .parse()
                .with_context(|| format!("bad round in label {label:?}"))?,
            result,
        });
    }
    let marker_values = |marker: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix(marker).map(|v| v.trim().to_string()))
            .collect()
    };
    let skipped = marker_values("XTASK-BENCH-SKIP");
    let failed = marker_values("XTASK-BENCH-FAIL");
    let kernel = marker_values("XTASK-BENCH-KERNEL")
        .pop()
        .unwrap_or_default();
    let cpus = marker_values("XTASK-BENCH-CPUS").pop().unwrap_or_default();

    // Medians per (device, test), in declaration order.
    let mut medians: BTreeMap<(usize, usize), (FioResult, usize)> = BTreeMap::new();
    for (di, d) in DEVICES.iter().enumerate() {
        for (ti, (t, _)) in TESTS.iter().enumerate() {
            let sel: Vec<&FioResult> = samples
                .iter()
                .filter(|s| s.device == d.name && s.test == *t)
                .map(|s| &s.result)
                .collect();
            if sel.is_empty() {
                continue;
            }
            let med = |f: fn(&FioResult) -> f64| {
                fio::median(&sel.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            medians.insert(
                (di, ti),
                (
                    FioResult {
                        iops: med(|r| r.iops),
                        lat_avg_us: med(|r| r.lat_avg_us),
                        lat_p99_us: med(|r| r.lat_p99_us),
                    },
                    sel.len(),
                ),
            );
        }
    }
    let ref_idx = DEVICES.iter().position(|d| d.name == REFERENCE);
    let mut rows = Vec::new();
    for ((di, ti), (m, n)) in &medians {
        let ratio = ref_idx
            .and_then(|r| medians.get(&(r, *ti)))
            .map(|(r, _)| m.iops / r.iops)
            .unwrap_or(f64::NAN);
        rows.push(vec![
            DEVICES[*di].name.to_string(),
            TESTS[*ti].0.to_string(),
            fio::num(m.iops, 0),
            fio::num(m.lat_avg_us, 1),
            fio::num(m.lat_p99_us, 1),
            fio::num(ratio, 2),
            n.to_string(),
        ]);
    }
    let table = fio::markdown_table(
        &[
            "device",
            "test",
            "IOPS (median)",
            "avg lat (µs)",
            "p99 lat (µs)",
            "IOPS / null_blk",
            "rounds",
        ],
        2,
        &rows,
    );
    let mode = if host_has_ublk() {
        "native".to_string()
    } else {
        format!("qemu VM (mem {}, {} vCPUs)", opts.mem, opts.smp)
    };
    let mut report = String::new();
    let _ = writeln!(report, "# ublk-rs benchmark\n");
    let _ = writeln!(
        report,
        "fio {}: io_uring, O_DIRECT, 4 KiB random reads, numjobs=1, {runtime} s per run, \
         {rounds} alternating rounds, medians reported.\n",
        fio_version()
    );
    let _ = writeln!(
        report,
        "Environment: {mode}, guest kernel {kernel}, {cpus} CPUs. Absolute numbers under \
         software emulation (TCG) are far below real hardware; compare the ratios.\n"
    );
    report.push_str(&table);
    for s in &skipped {
        let _ = writeln!(report, "\n**{s}: setup failed, not measured.**");
    }
    for f in &failed {
        let _ = writeln!(report, "\n**fio run {f} failed.**");
    }

    let dir = ws.target.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let report_path = dir.join("report.md");
    fs::write(&report_path, &report)
        .with_context(|| format!("writing {}", report_path.display()))?;
    let raw = json!({
        "mode": mode,
        "kernel": kernel,
        "cpus": cpus,
        "rounds": rounds,
        "runtime_s": runtime,
        "skipped": skipped,
        "failed": failed,
        "samples": samples.iter().map(|s| json!({
            "device": s.device,
            "test": s.test,
            "round": s.round,
            "iops": s.result.iops,
            "lat_avg_us": s.result.lat_avg_us,
            "lat_p99_us": s.result.lat_p99_us,
        })).collect::<Vec<_>>(),
    });
    let raw_path = dir.join("raw.json");
    let raw_text = serde_json::to_string_pretty(&raw).context("serializing raw results")?;
    fs::write(&raw_path, raw_text).with_context(|| format!("writing {}", raw_path.display()))?;

    println!("\n{report}");
    println!(
        "xtask: wrote {} and {}",
        report_path.display(),
        raw_path.display()
    );
    if outcome.code != 0 {
        bail!("the benchmark script failed (exit status {})", outcome.code);
    }
    if !skipped.is_empty() || !failed.is_empty() || samples.is_empty() {
        bail!("some benchmark runs did not complete (see the report)");
    }
    Ok(())
}

fn fio_version() -> String {
    std::process::Command::new("fio")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "fio".to_string())
}
