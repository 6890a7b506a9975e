//! The compressing target's block path against raw `lz4_flex` on the same 4 KiB blocks.
//!
//! The blocks are fio's `buffer_compress_percentage=50`: each 4 KiB half random bytes, half
//! zeroes ([`BLOCKS`] different ones, cycled through). Each criterion iteration is one block,
//! so the throughput line is bytes of logical data per second. Rows, per direction:
//!
//! - `lz4_flex`: `lz4_flex::block::compress_into` / `decompress_into` of the block into a
//!   reused buffer, nothing else: what the codec alone can do;
//! - `ublk-compress-lz4`: a 4 KiB write / read of `compress(ram, algo=lz4)` on the simulated
//!   kernel queue, in batches of 64 as in the `userspace` bench: the simulated kernel's copy of
//!   the data, the engine, the target's block path (compression into a newly allocated extent
//!   with its header and CRC32C, the write to the RAM child, the map update; for a read the
//!   map lookup, the RAM child's read, the checksum and decompression) and the completion.
//!   Writes overwrite the same blocks, so space comes back only through the commits the
//!   target starts itself when it runs short (no FLUSH is sent).
//! - writes only: `ublk-compress-lz4-workers1`, `-workers2`: the same with 1 and 2
//!   compression workers (`workers=N`): the queue thread hands each block to a worker and
//!   finishes the request when the worker's notice comes back; always timed by the wall
//!   clock (the codec runs on other threads, so these rows measure throughput, not the CPU
//!   time an I/O costs); `ublk-compress-zstd` and `ublk-compress-zstd-workers2`: zstd level
//!   3, inline and with 2 workers, where the codec is slow enough for workers to pay. Reads
//!   decompress on the queue thread whatever the workers.
//!
//! ```text
//! cargo bench -p ublk-benches --bench compress -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! With `UBLK_BENCH_CPU=1` every other row is timed by the bench thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`) instead of wall time: steadier on a host shared with other
//! work, and the same measure for every row, since the simulated queue, the target and its
//! RAM child all run on that thread.

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ublk_core::io::IoDesc;
use ublk_core::sim::SimQueue;
use ublk_core::{sys, Geometry, Target};
use ublk_targets::compress::format::{Algo, Layout};
use ublk_targets::compress::{Compress, CompressOptions};
use ublk_targets::ram::Ram;
use ublk_zc::BoxTarget;

/// Different blocks cycled through (4 MiB: the logical size of the target's image).
const BLOCKS: usize = 1024;

const BLOCK: usize = 4096;

/// The write rows besides `ublk-compress-lz4`: algorithm and compression workers.
const WORKERS: [(Algo, usize); 4] = [
    (Algo::Lz4, 1),
    (Algo::Lz4, 2),
    (Algo::Zstd(3), 0),
    (Algo::Zstd(3), 2),
];

/// Requests in flight per batch: one per tag.
const BATCH: u16 = 64;

const SIZE: u64 = (BLOCKS * BLOCK) as u64;

const GEO: Geometry = Geometry {
    size: SIZE,
    logical_block_size: 512,
    max_io: 512 << 10,
};

/// What the rows are timed with: wall time, or the thread's CPU time (`UBLK_BENCH_CPU`).
#[derive(Clone, Copy)]
struct Clock {
    cpu: bool,
}

impl Clock {
    fn from_env() -> Clock {
        Clock {
            cpu: std::env::var_os("UBLK_BENCH_CPU").is_some_and(|v| v != "0"),
        }
    }

    /// A reading of the clock; only differences of two readings mean something.
    fn now(self) -> Duration {
        static BASE: OnceLock<Instant> = OnceLock::new();
        if self.cpu {
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
                .map(Duration::from)
                .expect("the thread CPU clock exists on Linux")
        } else {
            BASE.get_or_init(Instant::now).elapsed()
        }
    }
}

fn desc(op: u8, block: usize) -> IoDesc {
    IoDesc {
        op_flags: u32::from(op),
        nr_sectors: (BLOCK / 512) as u32,
        start_sector: (block * BLOCK / 512) as u64,
        addr: 0,
    }
}

/// Runs `n` I/Os of `op` through the blocks from `*next` on, in batches of [`BATCH`];
/// returns the time they took by `clock`.
fn run_ios<T: Target>(
    clock: Clock,
    q: &mut SimQueue<T>,
    op: u8,
    data: &[Vec<u8>],
    next: &mut usize,
    mut n: u64,
) -> Duration {
    let mut results = Vec::with_capacity(usize::from(BATCH));
    let start = clock.now();
    while n > 0 {
        let batch = n.min(u64::from(BATCH)) as u16;
        for tag in 0..batch {
            let block = *next % BLOCKS;
            *next += 1;
            let write_data = if op == sys::UBLK_IO_OP_WRITE {
                &data[block][..]
            } else {
                &[]
            };
            q.deliver(tag, desc(op, block), write_data)
                .expect("every tag is free: the previous batch was fully collected");
        }
        collect(q, usize::from(batch), &mut results);
        black_box(&results);
        n -= u64::from(batch);
    }
    clock.now() - start
}

/// Collects the results of the `n` requests in service into `out`, waiting for any that
/// did not complete inline (a write short of space waits for the commit it started).
fn collect<T: Target>(q: &mut SimQueue<T>, n: usize, out: &mut Vec<(u16, i32)>) {
    out.clear();
    q.results_into(out);
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "requests did not complete in 10 s"
        );
        std::thread::yield_now();
        q.results_into(out);
    }
    for &(tag, result) in out.iter() {
        assert_eq!(result, BLOCK as i32, "tag {tag}");
    }
}

/// A new image over RAM compressing with `algo` and `workers` compression threads on a
/// simulated queue, every block written once (the reads decompress, the writes overwrite).
fn image(algo: Algo, workers: usize, data: &[Vec<u8>]) -> SimQueue<Compress> {
    let child_size = Layout::child_size_for(SIZE).expect("a child size");
    let ram = Ram::new(child_size).expect("RAM child");
    let opts = CompressOptions {
        size: Some(SIZE),
        algo: Some(algo),
        workers,
    };
    let target = Compress::open(std::sync::Arc::new(ram) as BoxTarget, &opts).expect("image");
    let mut q = SimQueue::new(&target, GEO, BATCH).expect("simulated queue");
    let mut next = 0;
    run_ios(
        Clock { cpu: false },
        &mut q,
        sys::UBLK_IO_OP_WRITE,
        data,
        &mut next,
        BLOCKS as u64,
    );
    q
}

fn compress(c: &mut Criterion) {
    let data = ublk_benches::simloop::half_random_blocks(BLOCKS);
    let clock = Clock::from_env();
    let mut q = image(Algo::Lz4, 0, &data);
    // The rows with workers are timed by the wall clock whatever UBLK_BENCH_CPU says: the
    // codec runs on the workers' threads.
    let wall = Clock { cpu: false };
    let mut pooled: Vec<(String, Clock, SimQueue<Compress>)> = WORKERS
        .iter()
        .map(|&(algo, n)| {
            let codec = match algo {
                Algo::Lz4 => "lz4",
                _ => "zstd",
            };
            let name = match n {
                0 => format!("ublk-compress-{codec}"),
                n => format!("ublk-compress-{codec}-workers{n}"),
            };
            let clock = if n == 0 { clock } else { wall };
            (name, clock, image(algo, n, &data))
        })
        .collect();
    let mut next = 0;
    let packed: Vec<Vec<u8>> = data.iter().map(|b| lz4_flex::block::compress(b)).collect();

    let mut group = c.benchmark_group("compress-4k");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(BLOCK)];
    group.bench_function("lz4_flex", |b| {
        let mut i = 0;
        b.iter_custom(|iters| {
            let start = clock.now();
            for _ in 0..iters {
                i = (i + 1) % BLOCKS;
                let n = lz4_flex::block::compress_into(black_box(&data[i]), &mut out)
                    .expect("room for any block");
                black_box(n);
            }
            clock.now() - start
        })
    });
    group.bench_function("ublk-compress-lz4", |b| {
        b.iter_custom(|iters| {
            run_ios(
                clock,
                &mut q,
                sys::UBLK_IO_OP_WRITE,
                &data,
                &mut next,
                iters,
            )
        })
    });
    for (name, clock, q) in &mut pooled {
        group.bench_function(name.as_str(), |b| {
            b.iter_custom(|iters| {
                run_ios(*clock, q, sys::UBLK_IO_OP_WRITE, &data, &mut next, iters)
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decompress-4k");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    let mut block = vec![0u8; BLOCK];
    group.bench_function("lz4_flex", |b| {
        let mut i = 0;
        b.iter_custom(|iters| {
            let start = clock.now();
            for _ in 0..iters {
                i = (i + 1) % BLOCKS;
                let n = lz4_flex::block::decompress_into(black_box(&packed[i]), &mut block)
                    .expect("a block we compressed");
                black_box(n);
            }
            clock.now() - start
        })
    });
    group.bench_function("ublk-compress-lz4", |b| {
        b.iter_custom(|iters| run_ios(clock, &mut q, sys::UBLK_IO_OP_READ, &data, &mut next, iters))
    });
    group.finish();
}

criterion_group!(benches, compress);
criterion_main!(benches);
