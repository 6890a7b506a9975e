//! The userspace I/O path without a kernel: the real engine and target code on the simulated
//! kernel queue ([`SimQueue`]), 4 KiB reads and writes in batches of [`BATCH`], as a busy
//! queue sees them: deliver one descriptor on each of 64 tags, then collect the 64 commits.
//!
//! What an I/O costs here, besides the engine and the target:
//! - a write: the simulated kernel copies the 4 KiB of data into the tag buffer (`deliver`);
//! - a read: nothing more: results are collected with `results_into`, which does not copy the
//!   data out (the real driver does that copy in the kernel, after the commit);
//! - per batch: draining the results into a reused `Vec` (null and RAM push no io_uring work,
//!   so the simulator makes no syscall).
//!
//! The workloads ([`WORKLOADS`]):
//! - `null`, `ram`: the leaf targets;
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
//!   sequential stream stays on its leg). The regions' write-intent bits are set by the
//!   prefill pass and stay set while the I/Os keep coming back to them, so the measured
//!   writes do not wait for the mirror's thread.
//! - `compress-lz4`: the compressing target over RAM with lz4 (`compress(ram, algo=lz4)`):
//!   each write compresses its block into a new extent with its checksum and writes it to
//!   the RAM child, each read reads the extent back, checks and decompresses it;
//!
//! and, for [`run_codec`] only (no target: the codec alone on the same block, what the
//! compressing target's figures compare with), `lz4_flex` ([`CODECS`]).
//!
//! Every write carries the same block: half random bytes, half zeroes, like fio's
//! `buffer_compress_percentage=50`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use std::sync::Arc;
use ublk_core::io::IoDesc;
use ublk_core::sim::SimQueue;
use ublk_core::BufferMode;
use ublk_core::{sys, Geometry, Target};

use ublk_targets::compress::format::{Algo, Layout};
use ublk_targets::compress::{Compress, CompressOptions};
use ublk_targets::null::Null;
use ublk_targets::ram::Ram;
use ublk_zc::BoxTarget;

/// Requests in flight per batch: one per tag.
pub const BATCH: u16 = 64;

/// The I/O size.
pub const IO_SIZE: u32 = 4096;

/// Bytes the I/Os cycle through: bigger than the caches, so that RAM reads and writes touch
/// memory, and small enough to fault in once before measuring.
pub const SPAN: u64 = 64 << 20;

/// The same limits as `ublk add`'s defaults, except the size.
pub const GEO: Geometry = Geometry {
    size: SPAN,
    logical_block_size: 512,
    max_io: 512 << 10,
};

/// The workloads, by name (see the module documentation).
pub const WORKLOADS: &[&str] = &[
    "null",
    "stripe2-null",
    "stripe2-null-split",
    "mirror2-null",
    "ram",
    "ram-user-copy",
    "compress-lz4",
];

/// The codec baselines [`run_codec`] runs.
pub const CODECS: &[&str] = &["lz4_flex"];

/// `n` different 4 KiB blocks, each half random bytes and half zeroes (fio's
/// `buffer_compress_percentage=50`), the same ones on every call.
pub fn half_random_blocks(n: usize) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            let mut b = vec![0u8; IO_SIZE as usize];
            for byte in &mut b[..IO_SIZE as usize / 2] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            b
        })
        .collect()
}

/// The block every write carries: the first of [`half_random_blocks`].
pub fn block() -> Vec<u8> {
    half_random_blocks(1).remove(0)
}

/// Runs codec `name` (one of [`CODECS`]) `n` times on [`block`]: a compression per write,
/// a decompression per read. `false` when there is no such codec.
pub fn run_codec(name: &str, dir: Dir, n: u64) -> bool {
    if name != "lz4_flex" {
        return false;
    }
    let data = block();
    let packed = lz4_flex::block::compress(&data);
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(data.len())];
    for _ in 0..n {
        let got = match dir {
            Dir::Write => lz4_flex::block::compress_into(black_box(&data), &mut out).ok(),
            Dir::Read => lz4_flex::block::decompress_into(black_box(&packed), &mut out).ok(),
        };
        black_box(got.expect("the block round-trips"));
    }
    true
}

/// The direction of the I/Os.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

impl Dir {
    /// The criterion function name.
    pub fn name(self) -> &'static str {
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

/// A simulated queue with its place in the span, ready to run I/Os.
pub struct Loop<T: Target> {
    q: SimQueue<T>,
    next: u64,
    shift: u64,
    data: Vec<u8>,
    results: Vec<(u16, i32)>,
}

impl<T: Target> Loop<T> {
    /// A queue of [`BATCH`] tags on `target` in `mode`, every I/O starting `shift` bytes
    /// into a 4 KiB block, after one pass of writes over the whole span (it faults in the
    /// RAM target's pages — a read of a never-written page would otherwise take the hole
    /// path — and checks every result).
    pub fn new(target: &T, mode: BufferMode, shift: u64) -> Loop<T> {
        let q = SimQueue::with_mode(target, GEO, BATCH, mode).expect("simulated queue");
        let mut l = Loop {
            q,
            next: shift,
            shift,
            data: block(),
            results: Vec::with_capacity(usize::from(BATCH)),
        };
        for _ in 0..SPAN / u64::from(IO_SIZE) / u64::from(BATCH) {
            for tag in 0..BATCH {
                l.q.deliver(tag, Dir::Write.desc(l.next), &l.data)
                    .expect("tag is free");
                l.next = advance(l.next, l.shift);
            }
            l.collect(usize::from(BATCH));
            for &(tag, result) in &l.results {
                assert_eq!(result, IO_SIZE as i32, "tag {tag}");
            }
        }
        l
    }

    /// Runs `n` I/Os in batches of up to [`BATCH`], sequentially through [`SPAN`], and
    /// returns the time it took.
    pub fn run(&mut self, dir: Dir, mut n: u64) -> Duration {
        let start = Instant::now();
        while n > 0 {
            let batch = n.min(u64::from(BATCH)) as u16;
            // Only a write has data for the simulated kernel to copy in.
            let data: &[u8] = match dir {
                Dir::Write => &self.data,
                Dir::Read => &[],
            };
            for tag in 0..batch {
                let desc = dir.desc(self.next);
                self.next = advance(self.next, self.shift);
                self.q
                    .deliver(tag, desc, data)
                    .expect("every tag is free: the previous batch was fully collected");
            }
            self.collect(usize::from(batch));
            black_box(&self.results);
            n -= u64::from(batch);
        }
        start.elapsed()
    }

    /// Collects the results of the `n` requests in service. Null, RAM and stripe targets
    /// complete inline, in the first call; a mirror's first write into a clean region waits
    /// for the mirror's thread to make the region's bit durable.
    fn collect(&mut self, n: usize) {
        self.results.clear();
        self.q.results_into(&mut self.results);
        if self.results.len() < n {
            self.wait_for_rest(n);
        }
    }

    #[cold]
    fn wait_for_rest(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.results.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} requests did not complete in 10 s",
                n - self.results.len()
            );
            std::thread::sleep(Duration::from_micros(50));
            self.q.results_into(&mut self.results);
        }
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

/// What [`with_workload`] hands its callback: one workload's target, mode and shift.
pub trait Visit {
    /// Called once with the workload's target.
    fn visit<T: Target>(self, target: &T, mode: BufferMode, shift: u64);
}

/// Builds the workload `name` (one of [`WORKLOADS`]) and hands it to `v`; `false` when
/// there is no such workload.
pub fn with_workload(name: &str, v: impl Visit) -> bool {
    let half = SPAN / 2;
    let stack = |expr: String| {
        ublk_targets::stack::build(&expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .target
    };
    match name {
        "null" => v.visit(&Null::default(), BufferMode::Copy, 0),
        "stripe2-null" => v.visit(
            &stack(format!("stripe(null:{half},null:{half})")),
            BufferMode::Copy,
            0,
        ),
        "stripe2-null-split" => v.visit(
            &stack(format!("stripe(null:{half},null:{half},chunk=4K)")),
            BufferMode::Copy,
            2048,
        ),
        "mirror2-null" => {
            // Each leg one MiB longer than the span for the mirror's superblock and bitmap.
            // Null legs read zeroes and store nothing: every assembly finds blank legs and
            // makes a new mirror, assumed clean so that no initial sync runs beside the I/Os.
            let leg = SPAN + (1 << 20);
            v.visit(
                &stack(format!(
                    "mirror(null:{leg},null:{leg},region=1M,assume_clean=true)"
                )),
                BufferMode::Copy,
                0,
            )
        }
        "ram" => v.visit(
            &Ram::new(SPAN).expect("RAM target memory"),
            BufferMode::Copy,
            0,
        ),
        "ram-user-copy" => v.visit(
            &Ram::new(SPAN).expect("RAM target memory"),
            BufferMode::UserCopy,
            0,
        ),
        "compress-lz4" => {
            let child = Layout::child_size_for(SPAN).expect("a child size for the span");
            let ram = Ram::new(child).expect("RAM child memory");
            let opts = CompressOptions {
                size: Some(SPAN),
                algo: Some(Algo::Lz4),
                workers: 0,
            };
            let target = Compress::open(Arc::new(ram) as BoxTarget, &opts).expect("image");
            v.visit(&target, BufferMode::Copy, 0)
        }
        _ => return false,
    }
    true
}
