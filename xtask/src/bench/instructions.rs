//! `cargo xtask bench --instructions`: instructions per I/O of the userspace path on the
//! simulated kernel queue, a figure that does not move with the host's load.
//!
//! Each workload of `ublk_benches::simloop` (null, stripes, mirror, RAM) runs as
//! `sim-ios WORKLOAD read|write COUNT` twice, with [`SHORT`] and [`LONG`] I/Os, under
//! `perf stat -e instructions:u` when the host exposes the counter, else under valgrind's
//! callgrind (which counts every instruction executed: exact, but 50-100× slower). The setup
//! is the same in both runs, so `(long - short) / (LONG - SHORT)` is the cost of one I/O.
//! The results go to `target/bench/instructions.md` and `.json`; the previous `.json`, when
//! there is one, is shown beside them, so a change to the hot path reports before and after.

use crate::deps;
use crate::fio::markdown_table;
use crate::util::{run, which, Workspace};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

/// I/Os of the short run.
const SHORT: u64 = 20_000;
/// I/Os of the long run.
const LONG: u64 = 120_000;

/// How instructions are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counter {
    Perf,
    Callgrind,
}

impl Counter {
    fn name(self) -> &'static str {
        match self {
            Counter::Perf => "perf stat -e instructions:u",
            Counter::Callgrind => "valgrind --tool=callgrind",
        }
    }

    /// The instructions `sim-ios args...` executes in user space.
    fn count(self, bin: &Path, args: &[String]) -> Result<u64> {
        let out = match self {
            Counter::Perf => Command::new("perf")
                .args(["stat", "-x,", "-e", "instructions:u"])
                .arg(bin)
                .args(args)
                .output(),
            Counter::Callgrind => Command::new("valgrind")
                .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
                .arg(bin)
                .args(args)
                .output(),
        }
        .with_context(|| format!("running {} on sim-ios", self.name()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("sim-ios {} failed: {stderr}", args.join(" "));
        }
        let n = match self {
            Counter::Perf => parse_perf(&stderr),
            Counter::Callgrind => parse_callgrind(&stderr),
        };
        n.with_context(|| {
            format!(
                "no instruction count in the output of {}:\n{stderr}",
                self.name()
            )
        })
    }
}

/// The count of `perf stat -x,` output (`VALUE,UNIT,EVENT,...`).
fn parse_perf(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.contains("instructions"))
        .and_then(|l| l.split(',').next())
        .and_then(|v| v.trim().parse().ok())
}

/// The count of callgrind's `==PID== Collected : N` line.
fn parse_callgrind(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.split_once("Collected :"))
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// Whether `perf stat` can count user-space instructions here (not in most VMs).
fn perf_works() -> bool {
    which("perf").is_some()
        && Command::new("perf")
            .args(["stat", "-x,", "-e", "instructions:u", "true"])
            .output()
            .map(|o| parse_perf(&String::from_utf8_lossy(&o.stderr)).is_some())
            .unwrap_or(false)
}

/// Runs the count and writes the report; returns the Markdown.
pub fn instructions(ws: &Workspace) -> Result<String> {
    let counter = if perf_works() {
        Counter::Perf
    } else if which("valgrind").is_some()
        || (deps::ensure_optional_package("valgrind", "counting instructions without perf")
            && which("valgrind").is_some())
    {
        Counter::Callgrind
    } else {
        bail!("no way to count instructions: perf has no instructions:u counter here and valgrind is not installed");
    };
    run(ws.cargo().args([
        "build",
        "--release",
        "-p",
        "ublk-benches",
        "--bin",
        "sim-ios",
    ]))?;
    let bin = ws.release_dir().join("sim-ios");
    // The workloads are the bench crate's (`ublk_benches::simloop::WORKLOADS`).
    let listed = Command::new(&bin)
        .arg("list")
        .output()
        .with_context(|| format!("running {} list", bin.display()))?;
    let names = String::from_utf8_lossy(&listed.stdout).into_owned();
    let workloads: Vec<&str> = names.lines().filter(|l| !l.is_empty()).collect();
    if !listed.status.success() || workloads.is_empty() {
        bail!("{} list named no workload", bin.display());
    }
    let mut rows = Vec::new();
    for &w in &workloads {
        for dir in ["write", "read"] {
            let args = |n: u64| vec![w.to_string(), dir.to_string(), n.to_string()];
            let short = counter.count(&bin, &args(SHORT))?;
            let long = counter.count(&bin, &args(LONG))?;
            let per_io = long.saturating_sub(short) as f64 / (LONG - SHORT) as f64;
            eprintln!("xtask: {w} {dir}: {per_io:.0} instructions per I/O");
            rows.push((w, dir, per_io));
        }
    }
    let dir = ws.target.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join("instructions.json");
    let previous: Option<Value> = fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let md = markdown(counter, &rows, previous.as_ref());
    let now = json!({
        "counter": counter.name(),
        "short": SHORT,
        "long": LONG,
        "rows": rows.iter().map(|(w, d, n)| json!({
            "workload": w, "dir": d, "instructions_per_io": n,
        })).collect::<Vec<_>>(),
    });
    if let Some(prev) = &previous {
        fs::write(dir.join("instructions.previous.json"), prev.to_string())
            .context("keeping the previous instruction counts")?;
    }
    fs::write(&json_path, serde_json::to_string_pretty(&now)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = dir.join("instructions.md");
    fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    eprintln!(
        "xtask: wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok(md)
}

/// The report, with the previous run's figures beside this one's when there are any.
fn markdown(counter: Counter, rows: &[(&str, &str, f64)], previous: Option<&Value>) -> String {
    let before = |w: &str, d: &str| -> Option<f64> {
        previous?["rows"]
            .as_array()?
            .iter()
            .find(|r| r["workload"] == w && r["dir"] == d)?["instructions_per_io"]
            .as_f64()
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Instructions per I/O, userspace path (simulated queue)\n"
    );
    let _ = writeln!(
        md,
        "4 KiB I/Os in batches of 64 on the simulated kernel queue (`sim-ios`), counted with \
         `{}`: (instructions of {LONG} I/Os − instructions of {SHORT}) / {}. Includes the \
         simulated kernel's side (delivering descriptors, a write's 4 KiB copy into the tag \
         buffer, collecting commits).\n",
        counter.name(),
        LONG - SHORT
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|&(w, d, n)| {
            let (b, change) = match before(w, d) {
                Some(b) if b > 0.0 => {
                    (format!("{b:.0}"), format!("{:+.1}%", (n / b - 1.0) * 100.0))
                }
                _ => ("-".to_string(), "-".to_string()),
            };
            vec![w.to_string(), d.to_string(), format!("{n:.0}"), b, change]
        })
        .collect();
    md.push_str(&markdown_table(
        &[
            "workload",
            "I/O",
            "instructions per I/O",
            "previous run",
            "change",
        ],
        2,
        &table,
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts() {
        assert_eq!(
            parse_perf("123456,,instructions:u,1000,100.00,,\n"),
            Some(123456)
        );
        assert_eq!(
            parse_perf("<not supported>,,instructions:u,0,100.00,,\n"),
            None
        );
        assert_eq!(
            parse_callgrind("==12== Events    : Ir\n==12== Collected : 34090905\n"),
            Some(34090905)
        );
        assert_eq!(parse_callgrind("nothing"), None);
    }

    #[test]
    fn report_compares_with_the_previous_run() {
        let prev =
            json!({"rows": [{"workload": "null", "dir": "read", "instructions_per_io": 1000.0}]});
        let md = markdown(
            Counter::Callgrind,
            &[("null", "read", 900.0), ("ram", "read", 50.0)],
            Some(&prev),
        );
        let rows: Vec<String> = md
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert!(
            rows.iter()
                .any(|l| l == "| null | read | 900 | 1000 | -10.0% |"),
            "{md}"
        );
        assert!(
            rows.iter().any(|l| l == "| ram | read | 50 | - | - |"),
            "{md}"
        );
    }
}
