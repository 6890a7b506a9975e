//! fio JSON results: extraction from console output and parsing.
//!
//! Payload scripts print each fio JSON report between the lines
//! `XTASK-FIO-BEGIN <label>` and `XTASK-FIO-END <label>`.

use anyhow::{Context, Result};

pub const BEGIN: &str = "XTASK-FIO-BEGIN";
pub const END: &str = "XTASK-FIO-END";

/// The `sh` function payloads use to run fio and emit its report with markers:
/// `run_fio LABEL FIO-ARGS...` (the report goes to `/tmp/fio-LABEL.json`).
pub const SH_RUN_FIO: &str = r#"
run_fio() {
    _label=$1; shift
    fio "$@" --eta=never --lat_percentiles=1 --output-format=json --output="/tmp/fio-$_label.json" || {
        echo "fio $_label failed" >&2
        cat "/tmp/fio-$_label.json" >&2 2>/dev/null
        return 1
    }
    echo ""
    echo "XTASK-FIO-BEGIN $_label"
    cat "/tmp/fio-$_label.json"
    echo ""
    echo "XTASK-FIO-END $_label"
}
"#;

/// Headline numbers of one fio job.
#[derive(Clone, Debug, PartialEq)]
pub struct FioResult {
    pub iops: f64,
    /// Mean total latency in µs.
    pub lat_avg_us: f64,
    /// 99th percentile total latency in µs (completion latency for reports
    /// made without `--lat_percentiles=1`).
    pub lat_p99_us: f64,
}

/// All (label, JSON text) sections between fio markers, in order.
pub fn sections(console: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in console.lines() {
        // Markers may follow other text on the same console line (e.g. a
        // progress line without a newline), so look for them anywhere.
        if let Some(pos) = line.find(BEGIN) {
            let label = line[pos + BEGIN.len()..].trim();
            current = Some((label.to_string(), String::new()));
        } else if line.contains(END) {
            if let Some(sec) = current.take() {
                out.push(sec);
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// Parses a fio JSON report; uses the read or write side, whichever did I/O.
pub fn parse(json: &str) -> Result<FioResult> {
    // fio may print warnings before the JSON document.
    let start = json.find('{').context("no JSON object in fio output")?;
    let v: serde_json::Value =
        serde_json::from_str(&json[start..]).context("parsing fio JSON output")?;
    let job = &v["jobs"][0];
    if job.is_null() {
        anyhow::bail!("fio JSON has no jobs");
    }
    let side = ["read", "write"]
        .into_iter()
        .map(|s| &job[s])
        .max_by(|a, b| {
            let (a, b) = (a["iops"].as_f64(), b["iops"].as_f64());
            a.unwrap_or(0.0).total_cmp(&b.unwrap_or(0.0))
        })
        .context("fio job has neither read nor write results")?;
    let iops = side["iops"].as_f64().context("fio JSON: missing iops")?;
    let lat_avg_us = side["lat_ns"]["mean"]
        .as_f64()
        .context("fio JSON: missing lat_ns.mean")?
        / 1000.0;
    // Total (submission + completion) latency percentiles exist when fio ran
    // with --lat_percentiles=1; fall back to completion latency otherwise.
    let lat_p99_us = side["lat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .or_else(|| side["clat_ns"]["percentile"]["99.000000"].as_f64())
        .unwrap_or(f64::NAN)
        / 1000.0;
    Ok(FioResult {
        iops,
        lat_avg_us,
        lat_p99_us,
    })
}

/// Median of `v` (NaN for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Renders a Markdown table; the first `left` columns are left-aligned, the
/// rest (numbers) right-aligned.
pub fn markdown_table(header: &[&str], left: usize, rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .chain(std::iter::once(header[i].chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let cells: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < left {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    let seps: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i < left {
                "-".repeat(w + 2)
            } else {
                format!("{}:", "-".repeat(w + 1))
            }
        })
        .collect();
    out.push_str(&format!("|{}|\n", seps.join("|")));
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// Formats a number with a fixed number of decimals ("-" for NaN).
pub fn num(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "-".to_string()
    } else {
        format!("{v:.decimals$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"jobs":[{"jobname":"x",
        "read":{"iops":1000.5,"lat_ns":{"mean":64000.0},
                "clat_ns":{"mean":1.0,"percentile":{"99.000000":128000}}},
        "write":{"iops":0.0,"lat_ns":{"mean":0.0},"clat_ns":{"mean":0.0}}}]}"#;

    #[test]
    fn parse_sample() {
        let r = parse(SAMPLE).expect("sample parses");
        assert_eq!(r.iops, 1000.5);
        assert_eq!(r.lat_avg_us, 64.0);
        assert_eq!(r.lat_p99_us, 128.0);
    }

    #[test]
    fn extract_sections() {
        let console = format!("noise\nprogress {BEGIN} a 1\n{SAMPLE}\n{END} a 1\nmore\n");
        let s = sections(&console);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, "a 1");
        assert!(parse(&s[0].1).is_ok());
    }

    #[test]
    fn table() {
        let t = markdown_table(&["a", "bb"], 1, &[vec!["x".into(), "1".into()]]);
        assert_eq!(t, "| a | bb |\n|---|---:|\n| x |  1 |\n");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
