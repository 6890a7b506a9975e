//! The scaling sweep of `cargo xtask bench --native` (and `--sweep`): `ublk add null` with
//! batch + zero copy on 1, 2, 4, … queues up to the CPU count, fio with as many jobs as
//! queues at iodepth 128, 4 KiB random reads; IOPS per queue and per busy CPU, and the CPU
//! the server itself used. On real hardware this shows where 1M IOPS falls; the kernel's own
//! kublk null server reaches 2.5–3.35M IOPS per submitting CPU on server CPUs (the anchor).
//!
//! CPU is read from `/proc/stat` (all CPUs, busy = everything but idle and iowait) and the
//! server's `/proc/PID/stat` (user + system time of all its threads) around each fio run, so
//! "busy CPUs" counts fio, the server and the kernel's work for both.

use crate::fio;
use crate::fio::markdown_table;
use crate::scripts::prelude;
use std::fmt::Write as _;

/// The fio test of the sweep.
pub const TEST: &str = "randread-4k-qd128";

/// fio's iodepth per job.
const IODEPTH: u32 = 128;

/// One sweep point of one round.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub queues: u32,
    pub round: u32,
    pub iops: f64,
    /// CPUs busy on average during the run (fio, the server and the kernel).
    pub busy_cpus: f64,
    /// CPUs the server's threads used on average.
    pub server_cpus: f64,
}

/// The label of a sweep run: parses with the bench's own label format.
fn device(queues: u32) -> String {
    format!("sweep-q{queues}")
}

/// The guest script: `queues` is a space-separated list, or empty for 1, 2, 4, … up to the
/// CPU count (plus the CPU count itself when it is not a power of two).
pub fn script(queues: &[u32], runtime: u32, ramp: u32, rounds: u32) -> String {
    let list = queues
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let mut s = prelude();
    let _ = write!(
        s,
        r#"
NCPU=$(grep -c '^processor' /proc/cpuinfo)
SWEEP_QUEUES="{list}"
if [ -z "$SWEEP_QUEUES" ]; then
    _q=1
    while [ "$_q" -le "$NCPU" ]; do SWEEP_QUEUES="$SWEEP_QUEUES $_q"; _q=$((_q * 2)); done
    [ $((_q / 2)) -eq "$NCPU" ] || SWEEP_QUEUES="$SWEEP_QUEUES $NCPU"
fi
echo "XTASK-SWEEP-CPUS $NCPU"
# cpu_ticks: sets _busy and _total from the first line of /proc/stat.
cpu_ticks() {{
    read -r _cpu _u _n _s _idle _iow _irq _sirq _steal _rest </proc/stat
    _total=$((_u + _n + _s + _idle + _iow + _irq + _sirq + ${{_steal:-0}}))
    _busy=$((_total - _idle - _iow))
}}
# proc_ticks PID: sets _ptime to the process's user + system ticks.
proc_ticks() {{
    _ptime=0
    [ -r "/proc/$1/stat" ] || return 0
    set -- $(cat "/proc/$1/stat")
    _ptime=$((${{14}} + ${{15}}))
}}
for _round in $(seq 1 {rounds}); do
    for _q in $SWEEP_QUEUES; do
        _lbl="sweep-q$_q.{TEST}.j$_q.r$_round"
        echo "== sweep round $_round: $_q queue(s), $_q fio job(s), iodepth {IODEPTH}"
        if ! ublk_add SW --buffer-mode zero-copy --batch --queues "$_q" --depth 128 --size 1G null; then
            echo "XTASK-SWEEP-FAIL $_lbl"
            continue
        fi
        _pid=$(sed -n 's/.*"pid"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p' /tmp/ublk-add.out | tail -n 1)
        cpu_ticks; _b0=$_busy; _t0=$_total
        proc_ticks "${{_pid:-0}}"; _p0=$_ptime
        run_fio "$_lbl" --name=sweep --filename="$SW_dev" --ioengine=io_uring --direct=1 \
            --rw=randread --bs=4k --iodepth={IODEPTH} --numjobs="$_q" --group_reporting \
            --time_based --runtime={runtime} --ramp_time={ramp} --randrepeat=0 --norandommap \
            || echo "XTASK-SWEEP-FAIL $_lbl"
        cpu_ticks; proc_ticks "${{_pid:-0}}"
        # Busy and server CPUs in thousandths: ticks over the all-CPU tick rate.
        _dt=$((_total - _t0))
        [ "$_dt" -gt 0 ] || _dt=1
        echo "XTASK-SWEEP $_q $_round $(( (_busy - _b0) * NCPU * 1000 / _dt )) $(( (_ptime - _p0) * NCPU * 1000 / _dt ))"
        ublk del "$SW_id" || echo "sweep: ublk del $SW_id failed" >&2
    done
done
echo "== sweep: done"
"#
    );
    s
}

/// The samples in a console: fio sections labelled `sweep-qN.TEST.jN.rR` joined with their
/// `XTASK-SWEEP N R BUSY SERVER` CPU lines.
pub fn parse(out: &str) -> Vec<Sample> {
    let cpu: Vec<(u32, u32, f64, f64)> = out
        .lines()
        .filter_map(|l| {
            let at = l.find("XTASK-SWEEP ")?;
            let v: Vec<&str> = l[at + "XTASK-SWEEP ".len()..].split_whitespace().collect();
            let [q, r, busy, server] = v[..] else {
                return None;
            };
            Some((
                q.parse().ok()?,
                r.parse().ok()?,
                busy.parse::<f64>().ok()? / 1000.0,
                server.parse::<f64>().ok()? / 1000.0,
            ))
        })
        .collect();
    fio::sections(out)
        .into_iter()
        .filter_map(|(label, text)| {
            let (dev, test, jobs, round) = super::script::parse_label(&label)?;
            let queues: u32 = dev.strip_prefix("sweep-q")?.parse().ok()?;
            if test != TEST || jobs != queues || device(queues) != dev {
                return None;
            }
            let iops = fio::parse(&text).ok()?.iops;
            let (_, _, busy_cpus, server_cpus) = cpu
                .iter()
                .find(|c| c.0 == queues && c.1 == round)
                .copied()
                .unwrap_or((queues, round, f64::NAN, f64::NAN));
            Some(Sample {
                queues,
                round,
                iops,
                busy_cpus,
                server_cpus,
            })
        })
        .collect()
}

/// The number of CPUs the script saw.
pub fn cpus(out: &str) -> Option<u32> {
    out.lines()
        .find_map(|l| l.split_once("XTASK-SWEEP-CPUS "))
        .and_then(|(_, n)| n.trim().parse().ok())
}

/// The sweep's Markdown table: per queue count, the median over rounds (with min–max).
pub fn markdown(samples: &[Sample], cpus: Option<u32>, regime: &str) -> String {
    let mut queues: Vec<u32> = samples.iter().map(|s| s.queues).collect();
    queues.sort_unstable();
    queues.dedup();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Scaling sweep ({regime}, {} CPUs)\n",
        cpus.map(|c| c.to_string()).unwrap_or_else(|| "?".into())
    );
    let _ = writeln!(
        md,
        "`ublk add null --buffer-mode zero-copy --batch --queues Q --depth 128`, fio 4k \
         randread, Q jobs of iodepth {IODEPTH}, io_uring, direct. Busy CPUs: all CPUs' busy \
         time during the run (fio, the server, the kernel) in CPUs; server CPUs: the server's \
         own. The anchor on real server hardware: the kernel's kublk null server, 2.5–3.35M \
         IOPS per submitting CPU.\n"
    );
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|&q| {
            let mine: Vec<&Sample> = samples.iter().filter(|s| s.queues == q).collect();
            let iops: Vec<f64> = mine.iter().map(|s| s.iops).collect();
            let med = fio::median(&iops);
            let min = iops.iter().copied().fold(f64::INFINITY, f64::min);
            let max = iops.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let busy = fio::median(&mine.iter().map(|s| s.busy_cpus).collect::<Vec<_>>());
            let server = fio::median(&mine.iter().map(|s| s.server_cpus).collect::<Vec<_>>());
            let per_cpu = if busy > 0.0 { med / busy } else { f64::NAN };
            vec![
                q.to_string(),
                fio::num(med, 0),
                format!("{}–{}", fio::num(min, 0), fio::num(max, 0)),
                fio::num(med / f64::from(q), 0),
                fio::num(busy, 2),
                fio::num(server, 2),
                fio::num(per_cpu, 0),
                mine.len().to_string(),
            ]
        })
        .collect();
    md.push_str(&markdown_table(
        &[
            "queues = jobs",
            "IOPS",
            "IOPS min–max",
            "IOPS per queue",
            "busy CPUs",
            "server CPUs",
            "IOPS per busy CPU",
            "rounds",
        ],
        1,
        &rows,
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_runs_the_given_queue_counts() {
        let s = script(&[1, 2], 1, 1, 2);
        assert!(s.contains("SWEEP_QUEUES=\"1 2\""));
        assert!(s.contains("for _round in $(seq 1 2)"));
        assert!(s.contains("--numjobs=\"$_q\""));
        assert!(script(&[], 1, 1, 1).contains("SWEEP_QUEUES=\"\""));
    }

    #[test]
    fn parses_samples_and_tables_them() {
        let fio_json = |iops: f64| {
            format!(
                r#"{{"jobs":[{{"read":{{"iops":{iops},"lat_ns":{{"mean":1000.0}},"clat_ns":{{"percentile":{{"99.000000":2000}}}}}},"write":{{"iops":0}}}}]}}"#
            )
        };
        let out = format!(
            "XTASK-SWEEP-CPUS 2\nXTASK-FIO-BEGIN sweep-q1.{TEST}.j1.r1\n{}\nXTASK-FIO-END sweep-q1.{TEST}.j1.r1\n\
             XTASK-SWEEP 1 1 1500 700\n\
             XTASK-FIO-BEGIN sweep-q2.{TEST}.j2.r1\n{}\nXTASK-FIO-END sweep-q2.{TEST}.j2.r1\n\
             XTASK-SWEEP 2 1 2000 900\n",
            fio_json(30000.0),
            fio_json(50000.0)
        );
        let samples = parse(&out);
        assert_eq!(samples.len(), 2, "{samples:?}");
        assert_eq!(
            samples[0],
            Sample {
                queues: 1,
                round: 1,
                iops: 30000.0,
                busy_cpus: 1.5,
                server_cpus: 0.7
            }
        );
        assert_eq!(cpus(&out), Some(2));
        let md = markdown(&samples, Some(2), "test");
        let row: Vec<String> = md
            .lines()
            .find(|l| l.starts_with("| 2 "))
            .expect("a row for 2 queues")
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        // 50000 IOPS, 25000 per queue, 2 busy CPUs: 25000 per busy CPU.
        assert_eq!(row[2], "50000");
        assert_eq!(row[4], "25000");
        assert_eq!(row[7], "25000");
    }
}
