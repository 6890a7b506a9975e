//! The userspace I/O path without a kernel: the real engine and target code on the simulated
//! kernel queue, for the workloads of [`ublk_benches::simloop`] (null, stripes, mirror, RAM),
//! 4 KiB reads and writes.
//!
//! Each criterion iteration is ONE I/O, so the reported time is nanoseconds per I/O and the
//! throughput line is I/Os per second. What an I/O costs besides the engine and the target is
//! described in [`ublk_benches::simloop`]; `cargo xtask bench --instructions` counts the
//! instructions per I/O of the same loop.
//!
//! ```text
//! cargo bench -p ublk-benches --bench userspace -- --warm-up-time 1 --measurement-time 3
//! ```

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ublk_benches::simloop::{self, Dir, Loop, Visit};
use ublk_core::{BufferMode, Target};

/// Benchmarks one workload's writes, then its reads.
struct Bench<'c> {
    c: &'c mut Criterion,
    name: &'static str,
}

impl Visit for Bench<'_> {
    fn visit<T: Target>(self, target: &T, mode: BufferMode, shift: u64) {
        let mut group = self.c.benchmark_group(self.name);
        group.throughput(Throughput::Elements(1));
        for dir in [Dir::Write, Dir::Read] {
            let mut l = Loop::new(target, mode, shift);
            group.bench_function(dir.name(), |b| b.iter_custom(|iters| l.run(dir, iters)));
        }
        group.finish();
    }
}

fn userspace(c: &mut Criterion) {
    for &name in simloop::WORKLOADS {
        assert!(simloop::with_workload(name, Bench { c, name }), "{name}");
    }
}

criterion_group!(benches, userspace);
criterion_main!(benches);
