//! The userspace I/O path without a kernel: the real engine and target code on the simulated
//! kernel queue ([`SimQueue`]), for the null and RAM targets, 4 KiB reads and writes.
//!
//! Each criterion iteration is ONE I/O, so the reported time is nanoseconds per I/O and the
//! throughput line is I/Os per second. The I/Os run in batches of [`BATCH`], as a busy queue
//! sees them: deliver one descriptor on each of 64 tags, then collect the 64 commits.
//!
//! What an I/O costs here, besides the engine and the target:
//! - a write: the simulated kernel copies the 4 KiB of data into the tag buffer (`deliver`);
//! - a read: nothing more: results are collected with `results_into`, which does not copy the
//!   data out (the real driver does that copy in the kernel, after the commit);
//! - per batch: draining the results into a reused `Vec` (null and RAM push no io_uring work,
//!   so the simulator makes no syscall);
//! - `stripe2-null`: a stripe of two null children, each I/O one sub-request joined by the
//!   engine: the cost of stacking, against `null` (a 4 KiB I/O inside a 64 KiB chunk is only
//!   readdressed to its child);
//! - `stripe2-null-split`: the same with 4 KiB chunks and I/Os 2 KiB off the chunk
//!   boundaries, so each is split into two sub-requests and joined;
//! - `ram-user-copy`: the RAM target in user-copy mode, where each request's one copy is a
//!   `pread`/`pwrite` on a memfd standing in for `/dev/ublkcN` (and the simulated kernel's
//!   delivery of a write's data is a `pwrite` too);
//! - `mirror2-null`: a RAID-1 mirror of two null legs (1 MiB regions, assumed clean): a write
//!   becomes two sub-requests, one per leg, joined; a read one sub-request to one leg (a
//!   sequential stream stays on its leg). The regions' write-intent bits are set by the pass
//!   before timing and stay set while the I/Os keep coming back to them, so the timed writes
//!   do not wait for the mirror's thread.
//!
//! ```text
//! cargo bench -p ublk-benches --bench userspace -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ublk_core::io::IoDesc;
use ublk_core::sim::SimQueue;
use ublk_core::BufferMode;
use ublk_core::{sys, Geometry, Target};
use ublk_targets::null::Null;
use ublk_targets::ram::Ram;

/// Requests in flight per batch: one per tag.
const BATCH: u16 = 64;

/// The I/O size.
const IO_SIZE: u32 = 4096;

/// Bytes the I/Os cycle through: bigger than the caches, so that RAM reads and writes touch
/// memory, and small enough to fault in once before timing.
const SPAN: u64 = 64 << 20;

/// The same limits as `ublk add`'s defaults, except the size.
const GEO: Geometry = Geometry {
    size: SPAN,
    logical_block_size: 512,
    max_io: 512 << 10,
};

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Read => "read-4k",
            Dir::Write => "write-4k",
        }
    }

    fn desc(self, offset: u64) -> IoDesc {
        let op = match self {
            Dir::Read => sys::UBLK_IO_OP_READ,
            Dir::Write => sys::UBLK_IO_OP_WRITE,
        };
        IoDesc {
            op_flags: u32::from(op),
            nr_sectors: IO_SIZE / 512,
            start_sector: offset / 512,
            addr: 0,
        }
    }
}

/// Runs `n` I/Os in batches of up to [`BATCH`], sequentially through [`SPAN`] starting at
/// `*next` (advanced past them), and returns the time it took.
fn run_ios<T: Target>(
    q: &mut SimQueue<T>,
    dir: Dir,
    data: &[u8],
    next: &mut u64,
    mut n: u64,
) -> Duration {
    // I/Os start at `*next % IO_SIZE` within each 4 KiB block, all the way through the span.
    let shift = *next % u64::from(IO_SIZE);
    let mut results = Vec::with_capacity(usize::from(BATCH));
    let start = Instant::now();
    while n > 0 {
        let batch = n.min(u64::from(BATCH)) as u16;
        for tag in 0..batch {
            let desc = dir.desc(*next);
            *next = advance(*next, shift);
            q.deliver(tag, desc, data)
                .expect("every tag is free: the previous batch was fully collected");
        }
        collect(q, usize::from(batch), &mut results);
        black_box(&results);
        n -= u64::from(batch);
    }
    start.elapsed()
}

/// Collects the results of the `n` requests in service into `out` (cleared first). Null, RAM
/// and stripe targets complete inline, in the first call; a mirror's first write into a clean
/// region waits for the mirror's thread to make the region's bit durable.
fn collect<T: Target>(q: &mut SimQueue<T>, n: usize, out: &mut Vec<(u16, i32)>) {
    out.clear();
    q.results_into(out);
    if out.len() < n {
        wait_for_rest(q, n, out);
    }
}

#[cold]
fn wait_for_rest<T: Target>(q: &mut SimQueue<T>, n: usize, out: &mut Vec<(u16, i32)>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} requests did not complete in 10 s",
            n - out.len()
        );
        std::thread::sleep(Duration::from_micros(50));
        q.results_into(out);
    }
}

/// The offset after an I/O at `at`, wrapping to `shift` before running past the span.
fn advance(at: u64, shift: u64) -> u64 {
    let next = at + u64::from(IO_SIZE);
    if next + u64::from(IO_SIZE) > SPAN {
        shift
    } else {
        next
    }
}

fn bench_target<T: Target>(c: &mut Criterion, name: &str, target: &T, mode: BufferMode) {
    bench_target_at(c, name, target, mode, 0)
}

/// As [`bench_target`], every I/O starting `shift` bytes into a 4 KiB block.
fn bench_target_at<T: Target>(
    c: &mut Criterion,
    name: &str,
    target: &T,
    mode: BufferMode,
    shift: u64,
) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    let data = vec![0x5a; IO_SIZE as usize];
    for dir in [Dir::Write, Dir::Read] {
        let mut q = SimQueue::with_mode(target, GEO, BATCH, mode).expect("simulated queue");
        // One pass over the span before timing: faults in the RAM target's pages (a read of a
        // never-written page would otherwise take the hole path), and checks the results.
        let mut next = shift;
        let mut results = Vec::with_capacity(usize::from(BATCH));
        for _ in 0..SPAN / u64::from(IO_SIZE) / u64::from(BATCH) {
            for tag in 0..BATCH {
                q.deliver(tag, Dir::Write.desc(next), &data)
                    .expect("tag is free");
                next = advance(next, shift);
            }
            collect(&mut q, usize::from(BATCH), &mut results);
            for &(tag, result) in &results {
                assert_eq!(result, IO_SIZE as i32, "tag {tag}");
            }
        }
        group.bench_function(dir.name(), |b| {
            b.iter_custom(|iters| run_ios(&mut q, dir, &data, &mut next, iters))
        });
    }
    group.finish();
}

fn userspace(c: &mut Criterion) {
    bench_target(c, "null", &Null::default(), BufferMode::Copy);
    // The stacking overhead: each 4 KiB I/O becomes one sub-request of a stripe (64 KiB
    // chunks) to one of two null children, joined by the engine.
    let half = SPAN / 2;
    let stripe = ublk_targets::stack::build(&format!("stripe(null:{half},null:{half})"))
        .expect("stripe of two null children")
        .target;
    bench_target(c, "stripe2-null", &stripe, BufferMode::Copy);
    // The same with 4 KiB chunks and every I/O 2 KiB into a chunk: each one is split over
    // both children (two sub-requests, joined by the engine).
    let split = ublk_targets::stack::build(&format!("stripe(null:{half},null:{half},chunk=4K)"))
        .expect("stripe of two null children")
        .target;
    bench_target_at(c, "stripe2-null-split", &split, BufferMode::Copy, 2048);
    // RAID-1 over two null legs, each one MiB longer than the span for the mirror's superblock
    // and bitmap. Null legs read zeroes and store nothing: every assembly finds blank legs and
    // makes a new mirror, assumed clean so that no initial sync runs beside the I/Os.
    let leg = SPAN + (1 << 20);
    let mirror = ublk_targets::stack::build(&format!(
        "mirror(null:{leg},null:{leg},region=1M,assume_clean=true)"
    ))
    .expect("mirror of two null legs")
    .target;
    bench_target(c, "mirror2-null", &mirror, BufferMode::Copy);
    let ram = Ram::new(SPAN).expect("RAM target memory");
    bench_target(c, "ram", &ram, BufferMode::Copy);
    // One pread/pwrite per request on a memfd standing in for /dev/ublkcN: the RAM target's
    // single copy, plus the syscall the kernel's own copy saves in the other modes.
    bench_target(c, "ram-user-copy", &ram, BufferMode::UserCopy);
}

criterion_group!(benches, userspace);
criterion_main!(benches);
