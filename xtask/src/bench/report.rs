//! The benchmark's Markdown report and the bar checks, computed from
//! the medians.

use super::{
    Plan, Rebuild, RebuildStats, Results, Role, DEVICES, LIBUBLK, MD_RAID0, MD_RAID1, MD_RESYNC,
    MIRROR_TESTS, NULL_BLK, ON_FILES, PAIR_TESTS, RBD_NBD, ZRAM_LZ4,
};
use crate::fio::{markdown_table, num};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::time::Duration;

/// Where and with what the benchmark ran.
pub struct Environment {
    pub mode: String,
    pub kernel: String,
    pub cpus: String,
    pub fio: String,
    /// Time the payload took (boot included in the VM).
    pub wall: Duration,
}

/// Tests the bar checks read.
pub const BAR_TESTS: &[&str] = &[
    "randread-4k-qd64",
    "randread-4k-qd1",
    "seqread-128k-qd16",
    "randwrite-4k-qd64",
];
/// Devices the bar checks name.
pub const BAR_DEVICES: &[&str] = &[
    "ublk-null-zc",
    "ublk-null-copy",
    "ublk-ram",
    "brd",
    MD_RAID1,
    "ublk-compress-lz4",
    ZRAM_LZ4,
    "ublk-rbd",
];

/// One bar from the issue: `lhs` IOPS / `rhs` IOPS must be at least `need`.
pub struct Bar {
    pub what: &'static str,
    /// (device, median IOPS), `None` when not measured.
    pub lhs: Option<(String, f64)>,
    pub rhs: Option<(String, f64)>,
    pub need: f64,
    /// Whether the two devices' rounds overlap (the ratio is within noise), when both
    /// were measured.
    pub noise: Option<bool>,
}

impl Bar {
    pub fn ratio(&self) -> Option<f64> {
        let (_, a) = self.lhs.as_ref()?;
        let (_, b) = self.rhs.as_ref()?;
        (*b > 0.0).then(|| a / b)
    }

    /// `Some(true)` for PASS, `Some(false)` for MISS, `None` when not measured.
    pub fn pass(&self) -> Option<bool> {
        self.ratio().map(|r| r >= self.need)
    }

    /// One Markdown list item.
    pub fn line(&self) -> String {
        let side = |s: &Option<(String, f64)>| match s {
            Some((d, v)) => format!("{d} {} IOPS", num(*v, 0)),
            None => "not measured".to_string(),
        };
        let verdict = match self.pass() {
            Some(true) => "**PASS**",
            Some(false) => "**MISS**",
            None => "**n/a**",
        };
        let ratio = self
            .ratio()
            .map(|r| format!(" = {r:.2}×"))
            .unwrap_or_default();
        let noise = if self.noise == Some(true) {
            ", **within noise**: the rounds of the two overlap"
        } else {
            ""
        };
        format!(
            "- {verdict} {}: {} / {}{ratio} (bar: ≥ {:.2}×{noise})",
            self.what,
            side(&self.lhs),
            side(&self.rhs),
            self.need
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "what": self.what,
            "lhs": self.lhs.as_ref().map(|(d, v)| json!({"device": d, "iops": v})),
            "rhs": self.rhs.as_ref().map(|(d, v)| json!({"device": d, "iops": v})),
            "ratio": self.ratio(),
            "need": self.need,
            "pass": self.pass(),
            "within_noise": self.noise,
        })
    }
}

/// The device of `role` with the highest median IOPS in `test`/`jobs`.
fn best(results: &Results, role: Role, test: &str, jobs: u32) -> Option<(String, f64)> {
    DEVICES
        .iter()
        .filter(|d| d.role == role)
        .filter_map(|d| Some((d.name.to_string(), results.get(d.name, test, jobs)?.iops)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

fn one(results: &Results, device: &str, test: &str, jobs: u32) -> Option<(String, f64)> {
    Some((device.to_string(), results.get(device, test, jobs)?.iops))
}

/// A bar on 1-job medians of `test`, with its noise flag.
fn bar(
    r: &Results,
    what: &'static str,
    test: &str,
    lhs: Option<(String, f64)>,
    rhs: Option<(String, f64)>,
    need: f64,
) -> Bar {
    let noise = match (&lhs, &rhs) {
        (Some((a, _)), Some((b, _))) => r.within_noise(a, b, test, 1),
        _ => None,
    };
    Bar {
        what,
        lhs,
        rhs,
        need,
        noise,
    }
}

/// The issues' bars (all on 1-job medians).
pub fn bars(r: &Results) -> Vec<Bar> {
    let [qd64, qd1, seq, write64] = [BAR_TESTS[0], BAR_TESTS[1], BAR_TESTS[2], BAR_TESTS[3]];
    vec![
        bar(
            r,
            "ublk null (best mode) vs libublk (best mode), 4k randread qd64, 1 job",
            qd64,
            best(r, Role::UblkNull, qd64, 1),
            best(r, Role::LibublkNull, qd64, 1),
            1.10,
        ),
        bar(
            r,
            "ublk null (best mode) vs null_blk, 4k randread qd64, 1 job",
            qd64,
            best(r, Role::UblkNull, qd64, 1),
            one(r, NULL_BLK, qd64, 1),
            0.90,
        ),
        bar(
            r,
            "ublk null (best mode) vs libublk (best mode), 4k randread qd1, 1 job",
            qd1,
            best(r, Role::UblkNull, qd1, 1),
            best(r, Role::LibublkNull, qd1, 1),
            1.10,
        ),
        bar(
            r,
            "ublk null zero-copy vs copy (no SQPOLL), 128k seq read, 1 job",
            seq,
            one(r, BAR_DEVICES[0], seq, 1),
            one(r, BAR_DEVICES[1], seq, 1),
            2.5,
        ),
        bar(
            r,
            "ublk RAM (best mode) vs brd, 4k randread qd64, 1 job",
            qd64,
            best(r, Role::UblkRam, qd64, 1),
            one(r, BAR_DEVICES[3], qd64, 1),
            0.9,
        ),
        bar(
            r,
            "ublk mirror (best mode) vs md raid1, 4k randread qd64, 1 job",
            qd64,
            best(r, Role::UblkMirror, qd64, 1),
            one(r, BAR_DEVICES[4], qd64, 1),
            1.0,
        ),
        bar(
            r,
            "ublk mirror (best mode) vs md raid1, 4k randwrite qd64, 1 job",
            write64,
            best(r, Role::UblkMirror, write64, 1),
            one(r, BAR_DEVICES[4], write64, 1),
            0.8,
        ),
        bar(
            r,
            "ublk compress lz4 vs zram lz4, 4k randread qd64, 1 job",
            qd64,
            one(r, BAR_DEVICES[5], qd64, 1),
            one(r, BAR_DEVICES[6], qd64, 1),
            0.8,
        ),
        bar(
            r,
            "ublk compress lz4 vs zram lz4, 4k randwrite qd64, 1 job",
            write64,
            one(r, BAR_DEVICES[5], write64, 1),
            one(r, BAR_DEVICES[6], write64, 1),
            0.8,
        ),
        bar(
            r,
            "ublk rbd vs rbd-nbd, 4k randread qd64, 1 job",
            qd64,
            one(r, BAR_DEVICES[7], qd64, 1),
            one(r, RBD_NBD, qd64, 1),
            1.3,
        ),
        bar(
            r,
            "ublk rbd vs rbd-nbd, 4k randwrite qd64, 1 job",
            write64,
            one(r, BAR_DEVICES[7], write64, 1),
            one(r, RBD_NBD, write64, 1),
            1.3,
        ),
        bar(
            r,
            "ublk rbd vs rbd-nbd, 128k seq read, 1 job",
            seq,
            one(r, BAR_DEVICES[7], seq, 1),
            one(r, RBD_NBD, seq, 1),
            1.0,
        ),
    ]
}

/// Every median with its ratios, for `raw.json`.
pub fn medians_json(plan: &Plan, r: &Results) -> Vec<Value> {
    let mut out = Vec::new();
    for t in &plan.tests {
        for &jobs in &plan.jobs {
            for d in &plan.devices {
                let Some(m) = r.get(d.name, t.name, jobs) else {
                    continue;
                };
                let (x_null_blk, x_libublk, x_peer) = ratios(r, d.name, d.role, t.name, jobs);
                out.push(json!({
                    "device": d.name,
                    "test": t.name,
                    "jobs": jobs,
                    "iops": m.iops,
                    "iops_min": m.iops_min,
                    "iops_max": m.iops_max,
                    "lat_avg_us": m.lat_avg_us,
                    "lat_p99_us": m.lat_p99_us,
                    "rounds": m.rounds,
                    "x_null_blk": x_null_blk.map(|x| x.value),
                    "x_libublk": x_libublk.map(|x| x.value),
                    "x_kernel_peer": x_peer.map(|x| x.value),
                    "within_noise": {
                        "null_blk": x_null_blk.map(|x| x.noise),
                        "libublk": x_libublk.map(|x| x.noise),
                        "kernel_peer": x_peer.map(|x| x.noise),
                    },
                }));
            }
        }
    }
    out
}

/// The rebuild rows for `raw.json`, with their ratio to md's resync.
pub fn rebuilds_json(rows: &[(&Rebuild, Option<RebuildStats>)]) -> Vec<Value> {
    let md = md_rate(rows);
    rows.iter()
        .map(|(r, st)| {
            json!({
                "name": r.name,
                "rounds": st.as_ref().map(|s| s.rounds),
                "bytes": st.as_ref().map(|s| s.bytes),
                "secs": st.as_ref().map(|s| s.secs),
                "mb_per_s": st.as_ref().map(|s| s.mb_per_s),
                "x_md": rebuild_ratio(st.as_ref(), md),
            })
        })
        .collect()
}

/// md resync's median MB/s, when measured.
fn md_rate(rows: &[(&Rebuild, Option<RebuildStats>)]) -> Option<f64> {
    rows.iter()
        .find(|(r, _)| r.name == MD_RESYNC)
        .and_then(|(_, st)| st.as_ref())
        .map(|s| s.mb_per_s[1])
}

fn rebuild_ratio(st: Option<&RebuildStats>, md: Option<f64>) -> Option<f64> {
    let md = md.filter(|m| *m > 0.0)?;
    Some(st?.mb_per_s[1] / md)
}

/// A ratio of median IOPS, and whether the two rows' rounds overlap.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ratio {
    value: f64,
    noise: bool,
}

fn ratio_of(r: &Results, device: &str, reference: &str, test: &str, jobs: u32) -> Option<Ratio> {
    Some(Ratio {
        value: r.ratio(device, reference, test, jobs)?,
        noise: r.within_noise(device, reference, test, jobs)?,
    })
}

/// IOPS ratios of a row: to null_blk, to libublk (null servers only), to
/// its kernel peer (RAM → brd, file → loop, stripe → md raid0, mirror → md
/// raid1).
fn ratios(
    r: &Results,
    device: &str,
    role: Role,
    test: &str,
    jobs: u32,
) -> (Option<Ratio>, Option<Ratio>, Option<Ratio>) {
    let x_null_blk = ratio_of(r, device, NULL_BLK, test, jobs);
    let x_libublk = role
        .is_null_server()
        .then(|| ratio_of(r, device, LIBUBLK, test, jobs))
        .flatten();
    let x_peer = role
        .kernel_peer()
        .and_then(|p| ratio_of(r, device, p, test, jobs));
    (x_null_blk, x_libublk, x_peer)
}

/// A ratio, `≈`-prefixed when it is within noise.
fn ratio_cell(v: Option<Ratio>) -> String {
    match v {
        Some(Ratio { value, noise: true }) => format!("≈{value:.2}"),
        Some(Ratio { value, .. }) => format!("{value:.2}"),
        None => "-".to_string(),
    }
}

fn plain_ratio_cell(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}"))
        .unwrap_or_else(|| "-".to_string())
}

/// IOPS as `min–max`.
fn spread(m: &super::Median) -> String {
    format!("{}–{}", num(m.iops_min, 0), num(m.iops_max, 0))
}

fn jobs_text(jobs: u32) -> String {
    format!("{jobs} job{}", if jobs == 1 { "" } else { "s" })
}

/// The number after `label ` in `note`.
fn note_value(note: &str, label: &str) -> Option<f64> {
    let label = format!("{label} ");
    let rest = &note[note.find(&label)? + label.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The compression ratio bars, from the notes the compression rows leave, both ways
/// `mm_stat` gives zram's: by the compressed bytes (zram's `compr_data_size` against our
/// `stored_bytes`, extent headers included) and by the space taken (`mem_used_total` against
/// our `allocated_bytes`). After the fill, ublk compress with lz4 must reach zram's ratio
/// with lz4; on the real files too, and there zstd's ratio against zram's is given (the
/// issue asks for it well above, and names no figure).
pub fn ratio_bars(notes: &[String]) -> Vec<String> {
    let find = |device: &str, when: &str| {
        notes
            .iter()
            .find(|n| n.starts_with(&format!("compression of {device} {when}")))
    };
    let ways = [
        ("by the compressed bytes", "ratio", "ratio"),
        ("by the space taken", "by memory used", "by space allocated"),
    ];
    let mut lines = Vec::new();
    for (device, algo, when) in [
        ("ublk-compress-lz4", "lz4", "after the fill"),
        ("ublk-compress-lz4", "lz4", ON_FILES),
        ("ublk-compress-zstd", "zstd", ON_FILES),
    ] {
        let (Some(zram), Some(ours)) = (find(ZRAM_LZ4, when), find(device, when)) else {
            continue;
        };
        for &(how, theirs, mine) in &ways {
            let (Some(a), Some(b)) = (note_value(ours, mine), note_value(zram, theirs)) else {
                continue;
            };
            let (verdict, bar) = match algo {
                "lz4" if a >= b => ("**PASS** ", "bar: ≥ 1.00×"),
                "lz4" => ("**MISS** ", "bar: ≥ 1.00×"),
                _ => ("", "the issue asks for well above 1×"),
            };
            lines.push(format!(
                "- {verdict}ublk compress {algo} vs zram lz4, compression ratio {when}, \
                 {how}: {a:.3} / {b:.3} = {:.3}× ({bar})",
                a / b
            ));
        }
    }
    lines
}

/// The whole `report.md`./// The whole `report.md`.
pub fn markdown(
    plan: &Plan,
    r: &Results,
    rebuilds: &[(&Rebuild, Option<RebuildStats>)],
    bars: &[Bar],
    env: &Environment,
    notes: &[String],
    chart: bool,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# ublk-rs benchmark\n");
    let _ = writeln!(
        md,
        "{fio}, `--ioengine=io_uring --direct=1`, {ramp} s ramp + {rt} s measured per run; \
         {rounds} rounds, each running every test on every device with the devices \
         alternating run by run (order rotated each round); the tables give the median of \
         the rounds. 2-job runs use `--numjobs=2 --group_reporting` on the same device \
         (every ublk device has 2 queues of depth 128, null_blk 2 submit queues of depth \
         128). Latencies are fio's total latency (`lat_ns`, submission to completion), \
         mean and 99th percentile.\n",
        fio = env.fio,
        ramp = plan.ramp,
        rt = plan.runtime,
        rounds = plan.rounds,
    );
    let _ = writeln!(
        md,
        "Environment: {}, guest kernel {}, {} CPUs; {} fio runs in {:.0} s. Absolute numbers \
         under software emulation (TCG) are far below real hardware and CPU-bound: compare \
         ratios, and only those outside the noise (not marked ≈).\n",
        env.mode,
        env.kernel,
        env.cpus,
        plan.runs(),
        env.wall.as_secs_f64()
    );
    if chart {
        let _ = writeln!(md, "![IOPS per device and test](iops.png)\n");
    }

    let _ = writeln!(md, "## Bars from the issue (1-job medians)\n");
    for b in bars {
        let _ = writeln!(md, "{}", b.line());
    }
    for line in ratio_bars(notes) {
        let _ = writeln!(md, "{line}");
    }

    let _ = writeln!(md, "\n## Best ublk null mode vs best libublk mode\n");
    let mut rows = Vec::new();
    for t in &plan.tests {
        for &jobs in &plan.jobs {
            let ours = best(r, Role::UblkNull, t.name, jobs);
            let theirs = best(r, Role::LibublkNull, t.name, jobs);
            let name = |s: &Option<(String, f64)>| s.as_ref().map(|(d, _)| d.clone());
            let cell = |d: &Option<String>| match d.as_deref().and_then(|d| r.get(d, t.name, jobs))
            {
                Some(m) => format!("{} ({})", num(m.iops, 0), spread(m)),
                None => "-".to_string(),
            };
            let (od, td) = (name(&ours), name(&theirs));
            let x = |reference: Option<&str>| match (od.as_deref(), reference) {
                (Some(a), Some(b)) => ratio_cell(ratio_of(r, a, b, t.name, jobs)),
                _ => "-".to_string(),
            };
            let kernel = r.get(NULL_BLK, t.name, jobs).map(|_| NULL_BLK.to_string());
            rows.push(vec![
                t.name.to_string(),
                jobs.to_string(),
                od.clone().unwrap_or_else(|| "-".into()),
                td.clone().unwrap_or_else(|| "-".into()),
                cell(&od),
                cell(&td),
                x(td.as_deref()),
                cell(&kernel),
                x(kernel.as_deref()),
            ]);
        }
    }
    md.push_str(&markdown_table(
        &[
            "test",
            "jobs",
            "best ublk null",
            "best libublk",
            "ublk IOPS (min–max)",
            "libublk IOPS (min–max)",
            "× libublk",
            "null_blk IOPS (min–max)",
            "× null_blk",
        ],
        4,
        &rows,
    ));

    let _ = writeln!(md, "\n## Results (medians)\n");
    let _ = writeln!(
        md,
        "× null_blk: IOPS / null_blk's; × libublk: IOPS / {LIBUBLK}'s (null servers only); \
         × kernel peer: ublk-ram / brd, ublk-file-* / loop, ublk-stripe-* / {MD_RAID0} \
         (the stripe rows run {} only), ublk-mirror-* / {MD_RAID1} (the mirror rows run {} \
         only), ublk-compress-* / {ZRAM_LZ4} (the compression rows run {} only, with \
         half-compressible data; their compression ratios are in the notes), ublk-rbd / \
         {RBD_NBD} (the RBD rows run {} only, on one image of a Ceph test cluster in the \
         guest). IOPS is the median of the rounds, min–max their spread; a ratio marked ≈ \
         is within noise: the two rows' min–max ranges overlap.\n",
        PAIR_TESTS.join(", "),
        MIRROR_TESTS.join(", "),
        super::COMPRESS_TESTS.join(", "),
        super::RBD_TESTS.join(", ")
    );
    for t in &plan.tests {
        for &jobs in &plan.jobs {
            let mut rows = Vec::new();
            for d in &plan.devices {
                let Some(m) = r.get(d.name, t.name, jobs) else {
                    continue;
                };
                let (a, b, c) = ratios(r, d.name, d.role, t.name, jobs);
                rows.push(vec![
                    d.name.to_string(),
                    num(m.iops, 0),
                    spread(m),
                    num(m.lat_avg_us, 1),
                    num(m.lat_p99_us, 1),
                    ratio_cell(a),
                    ratio_cell(b),
                    ratio_cell(c),
                    m.rounds.to_string(),
                ]);
            }
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(md, "### {}, {}\n", t.title, jobs_text(jobs));
            md.push_str(&markdown_table(
                &[
                    "device",
                    "IOPS",
                    "IOPS min–max",
                    "avg lat (µs)",
                    "p99 lat (µs)",
                    "× null_blk",
                    "× libublk",
                    "× kernel peer",
                    "rounds",
                ],
                1,
                &rows,
            ));
            md.push('\n');
        }
    }

    if !rebuilds.is_empty() {
        let _ = writeln!(md, "## Rebuild throughput\n");
        let _ = writeln!(
            md,
            "Time until leg 1 of a new two-leg mirror over two freshly discarded 1 GiB brd \
             disks is a copy of leg 0, from the start of the setup command, polled every \
             0.25 s; one round of each row per round, alternating. MB/s = 10^6 bytes/s; \
             × md: median MB/s / {MD_RESYNC}'s.\n"
        );
        let md_rate = md_rate(rebuilds);
        let rows: Vec<Vec<String>> = rebuilds
            .iter()
            .map(|(rb, st)| match st {
                Some(s) => vec![
                    rb.name.to_string(),
                    num(s.bytes / f64::from(1u32 << 20), 0),
                    num(s.secs, 2),
                    num(s.mb_per_s[1], 1),
                    format!("{}–{}", num(s.mb_per_s[0], 1), num(s.mb_per_s[2], 1)),
                    plain_ratio_cell(rebuild_ratio(Some(s), md_rate)),
                    s.rounds.to_string(),
                ],
                None => vec![
                    rb.name.to_string(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "0".into(),
                ],
            })
            .collect();
        md.push_str(&markdown_table(
            &[
                "rebuild",
                "MiB copied",
                "seconds",
                "MB/s",
                "MB/s min–max",
                "× md",
                "rounds",
            ],
            1,
            &rows,
        ));
        md.push('\n');
        let rows: Vec<Vec<String>> = rebuilds
            .iter()
            .map(|(rb, _)| vec![rb.name.to_string(), rb.describe()])
            .collect();
        md.push_str(&markdown_table(&["rebuild", "set up with"], 2, &rows));
        md.push('\n');
    }

    let _ = writeln!(md, "## Devices\n");
    let rows: Vec<Vec<String>> = plan
        .devices
        .iter()
        .map(|d| vec![d.name.to_string(), d.describe()])
        .collect();
    md.push_str(&markdown_table(&["device", "set up with"], 2, &rows));
    if !notes.is_empty() {
        let _ = writeln!(md, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    md
}

/// The report of several boots (one per emulation regime): the bars side by side, then
/// each regime's own report.
pub fn combined(runs: &[(std::path::PathBuf, super::Run)]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# ublk-rs benchmark, {} regimes\n", runs.len());
    let _ = writeln!(
        md,
        "The same plan in one VM boot per regime. Single-threaded TCG has no real \
         parallelism (the server and fio take turns on one host thread, so work per I/O is \
         all that counts); multi-threaded TCG runs the vCPUs in parallel but makes cross-CPU \
         wakeups very expensive. The two rank designs differently: a claim holds only where \
         it holds in both. A ratio marked ≈ is within noise (the two rows' min–max ranges \
         over the rounds overlap).\n"
    );
    let _ = writeln!(md, "## Bars, side by side (1-job medians)\n");
    let mut headers = vec!["bar".to_string(), "need".to_string()];
    headers.extend(runs.iter().map(|(_, r)| r.regime.clone()));
    let first = runs.first().map(|(_, r)| r.bars.len()).unwrap_or(0);
    let rows: Vec<Vec<String>> = (0..first)
        .map(|i| {
            let b0 = &runs[0].1.bars[i];
            let mut row = vec![b0.what.to_string(), format!("≥ {:.2}×", b0.need)];
            row.extend(runs.iter().map(|(_, r)| match r.bars.get(i) {
                Some(b) => bar_cell(b),
                None => "-".to_string(),
            }));
            row
        })
        .collect();
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    md.push_str(&markdown_table(&headers, 2, &rows));
    for (dir, run) in runs {
        let _ = writeln!(
            md,
            "\n# Regime: {} (`{}`)\n",
            run.regime,
            dir.join("report.md").display()
        );
        if let Some(e) = &run.incomplete {
            let _ = writeln!(md, "**Incomplete: {e}.**\n");
        }
        // The regime's own report, one heading level down.
        for line in run.markdown.lines().skip_while(|l| l.starts_with("# ")) {
            if line.starts_with('#') {
                let _ = writeln!(md, "#{line}");
            } else {
                let _ = writeln!(md, "{line}");
            }
        }
    }
    md
}

/// A bar's ratio and verdict in one cell: `0.93× MISS`, `≈1.02× PASS`.
fn bar_cell(b: &Bar) -> String {
    let Some(x) = b.ratio() else {
        return "n/a".to_string();
    };
    let verdict = if x >= b.need { "PASS" } else { "MISS" };
    let noise = if b.noise == Some(true) { "≈" } else { "" };
    format!("{noise}{x:.2}× {verdict}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Median, Options};
    use std::collections::HashMap;

    fn results(rows: &[(&str, &str, f64)]) -> Results {
        let medians: HashMap<_, _> = rows
            .iter()
            .map(|(d, t, iops)| {
                let m = Median {
                    iops: *iops,
                    iops_min: *iops * 0.95,
                    iops_max: *iops * 1.05,
                    lat_avg_us: 10.0,
                    lat_p99_us: 20.0,
                    rounds: 3,
                };
                ((d.to_string(), t.to_string(), 1), m)
            })
            .collect();
        Results { medians }
    }

    #[test]
    fn bar_checks() {
        let r = results(&[
            ("ublk-null-copy", "randread-4k-qd64", 100.0),
            ("ublk-null-zc-sqpoll", "randread-4k-qd64", 130.0),
            ("libublk-null-copy", "randread-4k-qd64", 110.0),
            ("libublk-null-zc", "randread-4k-qd64", 120.0),
            ("null_blk", "randread-4k-qd64", 150.0),
            ("ublk-ram", "randread-4k-qd64", 70.0),
            ("brd", "randread-4k-qd64", 100.0),
        ]);
        let b = bars(&r);
        // Best ublk null (130, zc-sqpoll) over best libublk (120, zc).
        assert_eq!(b[0].lhs, Some(("ublk-null-zc-sqpoll".to_string(), 130.0)));
        assert_eq!(b[0].rhs, Some(("libublk-null-zc".to_string(), 120.0)));
        assert_eq!(b[0].pass(), Some(false));
        assert_eq!(b[1].pass(), Some(false)); // 130 / 150 < 0.9
        assert_eq!(b[2].pass(), None); // qd1 not measured
        assert_eq!(b[3].pass(), None);
        assert_eq!(b[4].pass(), Some(false)); // 0.7 < 0.8
        assert!(b[0].line().starts_with("- **MISS**"));
        assert!(b[2].line().starts_with("- **n/a**"));
        let r = results(&[
            ("ublk-null-zc", "seqread-128k-qd16", 300.0),
            ("ublk-null-copy", "seqread-128k-qd16", 100.0),
        ]);
        assert_eq!(bars(&r)[3].pass(), Some(true));
        assert!(bars(&r)[3].line().contains("= 3.00×"));
    }

    #[test]
    fn report_has_tables_and_bars() {
        let opts = Options {
            all: false,
            rounds: 3,
            runtime: 3,
            ramp: 1,
            quick: true,
            filter: Vec::new(),
        };
        let plan = Plan::new(&opts, true, true).expect("plan");
        let r = results(&[
            ("ublk-null-copy", "randread-4k-qd64", 100.0),
            ("libublk-null-copy", "randread-4k-qd64", 50.0),
            ("null_blk", "randread-4k-qd64", 200.0),
            ("ublk-ram", "randread-4k-qd64", 90.0),
            ("brd", "randread-4k-qd64", 100.0),
        ]);
        let env = Environment {
            mode: "test".into(),
            kernel: "k".into(),
            cpus: "2".into(),
            fio: "fio-3".into(),
            wall: Duration::from_secs(1),
        };
        let md = markdown(&plan, &r, &[], &bars(&r), &env, &["a note".into()], true);
        assert!(md.contains("### 4k random read, iodepth 64, 1 job"));
        assert!(md.contains("| ublk-null-copy |"));
        let row = |device: &str| -> Vec<String> {
            let line = md
                .lines()
                .find(|l| l.starts_with(&format!("| {device} ")))
                .unwrap_or_else(|| panic!("no row for {device} in\n{md}"));
            line.split('|').map(|c| c.trim().to_string()).collect()
        };
        // ublk-null-copy: 0.50 of null_blk, 2.00 of libublk, no kernel peer.
        assert_eq!(row("ublk-null-copy")[6..9], ["0.50", "2.00", "-"]);
        assert_eq!(row("ublk-ram")[6..9], ["0.45", "-", "0.90"]);
        // ublk-ram: 0.90 of brd, a PASS against the 0.8 bar.
        assert!(md.contains("**PASS** ublk RAM (best mode) vs brd"));
        assert!(md.contains("- a note"));
        assert!(md.contains("iops.png"));
        let json = medians_json(&plan, &r);
        assert_eq!(json.len(), 5);
    }

    #[test]
    fn regimes_side_by_side() {
        let run = |regime: &str, libublk: f64| {
            let r = results(&[
                ("ublk-null-zc", "randread-4k-qd64", 100.0),
                ("libublk-null-copy", "randread-4k-qd64", libublk),
            ]);
            super::super::Run {
                regime: regime.into(),
                bars: bars(&r),
                markdown: "# ublk-rs benchmark\n\n## Bars\n\ntext\n".into(),
                incomplete: None,
            }
        };
        // 100 ±5% vs 80 ±5%: 1.25×, outside the noise; vs 98 ±5%: within it.
        let runs = vec![
            ("/t/single".into(), run("single-threaded TCG", 80.0)),
            ("/t/multi".into(), run("multi-threaded TCG", 98.0)),
        ];
        let md = combined(&runs);
        let row = md
            .lines()
            .find(|l| l.contains("vs libublk (best mode), 4k randread qd64"))
            .unwrap_or_else(|| panic!("no libublk bar in\n{md}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2..5], ["≥ 1.10×", "1.25× PASS", "≈1.02× MISS"]);
        assert!(md.contains("# Regime: multi-threaded TCG (`/t/multi/report.md`)"));
        // Each regime's own report sits one heading level down.
        assert!(md.contains("\n### Bars\n"));
        assert!(!md.contains("\n# ublk-rs benchmark\n"));
    }

    #[test]
    fn stripes_are_compared_with_md_raid0() {
        let opts = Options {
            all: false,
            rounds: 3,
            runtime: 2,
            ramp: 1,
            quick: false,
            filter: vec![MD_RAID0.into(), "ublk-stripe".into()],
        };
        let plan = Plan::new(&opts, true, true).expect("plan");
        let r = results(&[
            (MD_RAID0, "randread-4k-qd64", 100.0),
            ("ublk-stripe-zc", "randread-4k-qd64", 80.0),
            ("ublk-stripe-copy", "randread-4k-qd64", 40.0),
        ]);
        let json = medians_json(&plan, &r);
        let peer = |device: &str| {
            json.iter()
                .find(|m| m["device"] == device)
                .map(|m| m["x_kernel_peer"].clone())
        };
        assert_eq!(peer("ublk-stripe-zc"), Some(json!(0.8)));
        assert_eq!(peer("ublk-stripe-copy"), Some(json!(0.4)));
        assert_eq!(peer(MD_RAID0), Some(Value::Null));
        let env = Environment {
            mode: "test".into(),
            kernel: "k".into(),
            cpus: "2".into(),
            fio: "fio-3".into(),
            wall: Duration::from_secs(1),
        };
        let md = markdown(&plan, &r, &[], &bars(&r), &env, &[], false);
        assert!(md.contains("ublk-stripe-* / md-raid0"), "{md}");
        assert!(md.contains("mdadm --build /dev/md0"), "{md}");
    }

    #[test]
    fn mirrors_are_compared_with_md_raid1() {
        let opts = Options {
            all: false,
            rounds: 3,
            runtime: 2,
            ramp: 1,
            quick: false,
            filter: vec![MD_RAID1.into(), "ublk-mirror".into()],
        };
        let plan = Plan::new(&opts, true, true).expect("plan");
        let r = results(&[
            (MD_RAID1, "randread-4k-qd64", 100.0),
            ("ublk-mirror-zc", "randread-4k-qd64", 110.0),
            ("ublk-mirror-copy", "randread-4k-qd64", 60.0),
            (MD_RAID1, "randwrite-4k-qd64", 100.0),
            ("ublk-mirror-zc", "randwrite-4k-qd64", 70.0),
        ]);
        let b = bars(&r);
        assert_eq!(b[5].lhs, Some(("ublk-mirror-zc".to_string(), 110.0)));
        assert_eq!(b[5].pass(), Some(true)); // 1.10 ≥ 1.0
        assert_eq!(b[6].pass(), Some(false)); // 0.70 < 0.8
        let stats = |mb: [f64; 3]| RebuildStats {
            rounds: 3,
            bytes: f64::from(1022u32 << 20),
            secs: 10.0,
            mb_per_s: mb,
        };
        let rebuilds: Vec<(&Rebuild, Option<RebuildStats>)> = vec![
            (plan.rebuilds[0], Some(stats([100.0, 120.0, 130.0]))),
            (plan.rebuilds[1], Some(stats([50.0, 60.0, 61.0]))),
        ];
        let env = Environment {
            mode: "test".into(),
            kernel: "k".into(),
            cpus: "2".into(),
            fio: "fio-3".into(),
            wall: Duration::from_secs(1),
        };
        let md = markdown(&plan, &r, &rebuilds, &b, &env, &[], false);
        assert!(md.contains("ublk-mirror-* / md-raid1"), "{md}");
        assert!(md.contains("## Rebuild throughput"), "{md}");
        let row = md
            .lines()
            .find(|l| l.starts_with("| ublk-mirror-rebuild "))
            .unwrap_or_else(|| panic!("no rebuild row in\n{md}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(
            cells[2..8],
            ["1022", "10.00", "60.0", "50.0–61.0", "0.50", "3"]
        );
        let json = rebuilds_json(&rebuilds);
        assert_eq!(json[1]["x_md"], json!(0.5));
        assert_eq!(json[0]["x_md"], json!(1.0));
    }

    #[test]
    fn ratio_bars_read_the_compression_notes() {
        let notes = vec![
            "compression of zram-lz4 after the fill: orig_data_size 268435456, \
             compr_data_size 136445701, mem_used_total 143196160 (mm_stat); ratio 1.967, \
             by memory used 1.875"
                .to_string(),
            "compression of ublk-compress-lz4 after the fill: data_bytes 268435456, \
             stored_bytes 137756421, allocated_bytes 138674176 (ublk status); ratio 1.949, \
             by space allocated 1.936"
                .to_string(),
        ];
        let lines = ratio_bars(&notes);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("- **MISS**"), "{}", lines[0]);
        assert!(lines[0].contains("1.949 / 1.967 = 0.991×"), "{}", lines[0]);
        assert!(lines[1].starts_with("- **PASS**"), "{}", lines[1]);
        assert!(
            lines[1].contains("by the space taken: 1.936 / 1.875"),
            "{}",
            lines[1]
        );
        assert!(ratio_bars(&notes[..1]).is_empty());

        // On the real files: lz4 against the same bar, zstd's ratio given without a verdict.
        let mut notes = notes;
        notes.extend([
            "compression of zram-lz4 on real files: orig_data_size 134217728, \
             compr_data_size 67108864, mem_used_total 70000000 (mm_stat); ratio 2.000, \
             by memory used 1.917"
                .to_string(),
            "compression of ublk-compress-lz4 on real files: data_bytes 134217728, \
             stored_bytes 68000000, allocated_bytes 69000000 (ublk status); ratio 1.974, \
             by space allocated 1.945"
                .to_string(),
            "compression of ublk-compress-zstd on real files: data_bytes 134217728, \
             stored_bytes 50000000, allocated_bytes 51000000 (ublk status); ratio 2.684, \
             by space allocated 2.632"
                .to_string(),
        ]);
        let lines = ratio_bars(&notes);
        assert_eq!(lines.len(), 6, "{lines:?}");
        assert!(lines[2].starts_with("- **MISS** ublk compress lz4 vs zram lz4, compression ratio on real files, by the compressed bytes: 1.974 / 2.000"), "{}", lines[2]);
        assert!(lines[3].starts_with("- **PASS**"), "{}", lines[3]);
        assert!(
            lines[4].starts_with("- ublk compress zstd vs zram lz4, compression ratio on real files, by the compressed bytes: 2.684 / 2.000 = 1.342×"),
            "{}",
            lines[4]
        );
        assert!(lines[5].contains("2.632 / 1.917"), "{}", lines[5]);
    }
}
