//! Runs a given number of 4 KiB I/Os of one workload on the simulated kernel queue, for
//! counting instructions per I/O under callgrind or `perf stat`:
//!
//! ```text
//! sim-ios WORKLOAD read|write COUNT
//! sim-ios list        # the workloads, one per line
//! ```
//!
//! The setup (building the target, one pass of writes over the span) is the same whatever
//! COUNT is, so the difference between two counts' totals divided by the difference of the
//! counts is the cost of one I/O. Workloads: see `ublk_benches::simloop::WORKLOADS`; the
//! codec baselines (`ublk_benches::simloop::CODECS`, the codec alone on the same block, no
//! queue) are named the same way.

use std::process::ExitCode;

use ublk_benches::simloop::{self, Dir, Loop, Visit};
use ublk_core::{BufferMode, Target};

struct Run {
    dir: Dir,
    count: u64,
}

impl Visit for Run {
    fn visit<T: Target>(self, target: &T, mode: BufferMode, shift: u64) {
        let mut l = Loop::new(target, mode, shift);
        l.run(self.dir, self.count);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() == 1 && args[0] == "list" {
        for w in simloop::WORKLOADS.iter().chain(simloop::CODECS) {
            println!("{w}");
        }
        return ExitCode::SUCCESS;
    }
    let usage = || {
        eprintln!(
            "usage: sim-ios WORKLOAD read|write COUNT | sim-ios list\nworkloads: {}, {}",
            simloop::WORKLOADS.join(", "),
            simloop::CODECS.join(", ")
        );
        ExitCode::from(2)
    };
    let [workload, dir, count] = &args[..] else {
        return usage();
    };
    let dir = match dir.as_str() {
        "read" => Dir::Read,
        "write" => Dir::Write,
        _ => return usage(),
    };
    let Ok(count) = count.parse() else {
        return usage();
    };
    if simloop::CODECS.contains(&workload.as_str()) {
        simloop::run_codec(workload, dir, count);
    } else if !simloop::with_workload(workload, Run { dir, count }) {
        return usage();
    }
    ExitCode::SUCCESS
}
