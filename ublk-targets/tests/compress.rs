//! The compressing target on the simulated queue over a RAM child: data round trips, space
//! accounting, reopening, and crash consistency — the child's bytes copied at many points
//! while writes and flushes run must each open as an image where every flushed block reads
//! back and no block reads anything but one of its old or new contents.

use std::io;
use std::sync::{Arc, Mutex};

use ublk_core::sim::SimQueue;
use ublk_core::{sys, Geometry};
use ublk_targets::compress::format::{Algo, EXTENT_HEADER, EXTENT_MAGIC};
use ublk_targets::compress::{Compress, CompressOptions, Opened};
use ublk_targets::ram::Ram;
use ublk_zc::{BoxTarget, Io, OpenCtx, QueueCtx, QueueTarget, Target};

const SIZE: u64 = 256 << 10;
const CHILD: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn geo() -> Geometry {
    Geometry {
        size: SIZE,
        logical_block_size: 512,
        max_io: 128 << 10,
    }
}

fn opts(algo: Algo) -> CompressOptions {
    CompressOptions {
        size: Some(SIZE),
        algo: Some(algo),
        workers: 0,
    }
}

fn open(child: &Ram, o: &CompressOptions) -> Compress {
    Compress::open(Arc::new(child.clone()) as BoxTarget, o).expect("open the image")
}

/// Text-like bytes that compress well.
fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let words = [&b"block "[..], b"device ", b"compress ", b"ublk ", b"zstd "];
    let mut out = Vec::with_capacity(len);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(words[(i % 5) as usize]);
        out.extend_from_slice(format!("{} ", i % 97).as_bytes());
        i = i.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    out.truncate(len);
    out
}

/// Bytes that do not compress.
fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn data_round_trips_for_every_kind_of_block_and_both_algorithms() {
    for algo in [Algo::Lz4, Algo::Zstd(3)] {
        let child = Ram::new(CHILD).expect("memfd");
        let c = open(&child, &opts(algo));
        assert_eq!(c.opened(), &Opened::New);
        let h = c.handle();
        let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
        let text = compressible(1, 64 << 10);
        let noise = random(2, 32 << 10);
        assert_eq!(q.write(0, &text), Ok(64 << 10));
        assert_eq!(q.write(64 << 10, &noise), Ok(32 << 10));
        assert_eq!(q.write(96 << 10, &[0; 16 << 10]), Ok(16 << 10));
        assert_eq!(q.read(0, 64 << 10).expect("read"), text);
        assert_eq!(q.read(64 << 10, 32 << 10).expect("read"), noise);
        assert_eq!(q.read(96 << 10, 32 << 10).expect("read"), vec![0; 32 << 10]);
        let st = h.status();
        assert_eq!(st["algo"], algo.to_string());
        // 16 compressible blocks and 8 raw ones (4096 + 16 bytes each); zero blocks are free.
        let stored = st["stored_bytes"].as_u64().expect("stored");
        assert!(stored < 8 * 4112 + 16 * 2048, "{st}");
        assert!(stored >= 8 * 4112, "{st}");
        assert!(st["ratio"].as_f64().expect("ratio") > 1.4, "{st}");
        assert_eq!(st["data_bytes"], 24 * 4096);
    }
}

#[test]
fn unaligned_requests_merge_with_the_blocks_they_cover_in_part() {
    let child = Ram::new(CHILD).expect("memfd");
    let c = open(&child, &opts(Algo::Lz4));
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    let mut model = vec![0u8; SIZE as usize];
    let base = compressible(3, 32 << 10);
    assert_eq!(q.write(0, &base), Ok(32 << 10));
    model[..base.len()].copy_from_slice(&base);
    for (i, (off, len)) in [
        (512u64, 1024usize),
        (3584, 1024),
        (7680, 9216),
        (20480, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let data = random(10 + i as u64, len);
        assert_eq!(q.write(off, &data), Ok(len as i32));
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    assert_eq!(q.read(0, 64 << 10).expect("read"), model[..64 << 10]);
    assert_eq!(q.read(1536, 3072).expect("read"), model[1536..4608]);
    // A partial discard and write-zeroes zero exactly their range.
    assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, 1024, 2048), Ok(0));
    assert_eq!(
        q.op(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 8192 + 512, 4096),
        Ok(0)
    );
    model[1024..3072].fill(0);
    model[8704..12800].fill(0);
    assert_eq!(q.read(0, 64 << 10).expect("read"), model[..64 << 10]);
    // Two partial writes of one block in flight together keep both.
    let (a, b) = (random(40, 512), random(41, 512));
    let desc = |sector: u64| ublk_core::io::IoDesc {
        op_flags: u32::from(sys::UBLK_IO_OP_WRITE),
        nr_sectors: 1,
        start_sector: sector,
        addr: 0,
    };
    q.deliver(0, desc(80), &a).expect("tag 0");
    q.deliver(1, desc(83), &b).expect("tag 1");
    let mut others = Vec::new();
    for tag in [0, 1] {
        let done = match others
            .iter()
            .position(|c: &ublk_core::sim::Commit| c.tag == tag)
        {
            Some(i) => others.swap_remove(i),
            None => q
                .wait_for(tag, std::time::Duration::from_secs(5), &mut others)
                .expect("answered"),
        };
        assert_eq!(done.result, 512);
    }
    model[80 * 512..81 * 512].copy_from_slice(&a);
    model[83 * 512..84 * 512].copy_from_slice(&b);
    assert_eq!(q.read(40960, 4096).expect("read"), model[40960..45056]);
    // A whole-block write and a partial write of the same block in flight together: the
    // bytes only the whole-block write covers hold it (found by the request-stream fuzzer:
    // the partial write's merge put the block's older bytes back).
    let (whole, part) = (random(50, 8192), random(51, 512));
    let write = |sector: u64, n: u32| ublk_core::io::IoDesc {
        op_flags: u32::from(sys::UBLK_IO_OP_WRITE),
        nr_sectors: n,
        start_sector: sector,
        addr: 0,
    };
    q.deliver(0, write(96, 16), &whole).expect("tag 0");
    q.deliver(1, write(96, 1), &part).expect("tag 1");
    let mut others = Vec::new();
    for tag in [0, 1] {
        if !others.iter().any(|c: &ublk_core::sim::Commit| c.tag == tag) {
            q.wait_for(tag, std::time::Duration::from_secs(5), &mut others)
                .expect("answered");
        }
    }
    let back = q.read(96 * 512, 8192).expect("read");
    assert!(back[512..] == whole[512..], "the whole-block write's bytes");
}

#[test]
fn overwrites_reuse_space_and_discard_frees_it() {
    // A child with room for the logical size stored raw plus a little: overwriting it many
    // times without a flush works only if the space the overwrites free comes back.
    let child = Ram::new(512 << 10).expect("memfd");
    let c = open(&child, &opts(Algo::Lz4));
    let h = c.handle();
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    for round in 0..12u64 {
        for chunk in 0..2u64 {
            let data = random(round * 2 + chunk, 128 << 10);
            assert_eq!(
                q.write(chunk * (128 << 10), &data),
                Ok(128 << 10),
                "round {round}"
            );
        }
        if round % 4 == 3 {
            assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
        }
    }
    assert_eq!(q.read(0, 128 << 10).expect("read"), random(22, 128 << 10));
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    // Each 128 KiB write stores 32 raw extents of 4112 bytes, packed: 31 in one run of at
    // most 128 KiB (127,472 bytes, 249 sectors), the last alone (9 sectors).
    let raw = 2 * (249 + 9) * 512;
    assert_eq!(
        h.allocated_bytes(),
        raw,
        "after a flush only live extents stay"
    );
    assert_eq!(h.stored_bytes(), 64 * 4112);
    assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, 0, 128 << 10), Ok(0));
    assert_eq!(
        q.op(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 128 << 10, 64 << 10),
        Ok(0)
    );
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    // Blocks 48..64 are left: bytes 16 × 4112 = 65,792 to 127,472 of the second write's
    // first run (sectors 128..249), and its last block alone (9 sectors).
    assert_eq!(h.allocated_bytes(), (249 - 128 + 9) * 512);
    assert_eq!(h.stored_bytes(), 16 * 4112);
    assert_eq!(q.read(0, 4096).expect("read"), vec![0; 4096]);
}

#[test]
fn reopening_finds_what_was_flushed_and_refuses_a_wrong_size() {
    let child = Ram::new(CHILD).expect("memfd");
    let data = compressible(7, 128 << 10);
    {
        let c = open(&child, &opts(Algo::Zstd(5)));
        let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
        assert_eq!(q.write(128 << 10, &data), Ok(128 << 10));
        assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
        // Enough commits to go round the journal and checkpoint.
        for i in 0..20u64 {
            let block = random(i, 4096);
            let flags = sys::UBLK_IO_F_FUA;
            let tag = q.free_tag().expect("free tag");
            let desc = ublk_core::io::IoDesc {
                op_flags: u32::from(sys::UBLK_IO_OP_WRITE) | flags,
                nr_sectors: 8,
                start_sector: 8 * i,
                addr: 0,
            };
            q.deliver(tag, desc, &block).expect("deliver");
            let done = q
                .wait_for(tag, std::time::Duration::from_secs(5), &mut Vec::new())
                .expect("FUA write answered");
            assert_eq!(done.result, 4096);
        }
    }
    let wrong = CompressOptions {
        size: Some(SIZE * 2),
        algo: None,
        workers: 0,
    };
    let e = Compress::open(Arc::new(child.clone()) as BoxTarget, &wrong).expect_err("size");
    assert!(e.0.contains("logical bytes"), "{e}");
    let c = open(&child, &CompressOptions::default());
    assert!(matches!(c.opened(), Opened::Existing { .. }));
    assert_eq!(c.handle().status()["algo"], "zstd:5");
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    assert!(q.read(128 << 10, 128 << 10).expect("read") == data);
    for i in 0..16u64 {
        assert_eq!(q.read(i * 4096, 4096).expect("read"), random(i, 4096));
    }
}

/// A clean stop (the target dropped once its queues are gone) keeps the writes completed
/// since the last flush: the kernel sends none when `ublk del` removes the device.
#[test]
fn a_clean_stop_keeps_writes_that_were_never_flushed() {
    let child = Ram::new(CHILD).expect("memfd");
    let data = compressible(11, 64 << 10);
    {
        let c = open(&child, &opts(Algo::Lz4));
        let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
        assert_eq!(q.write(0, &data), Ok(64 << 10));
        assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
        assert_eq!(q.write(64 << 10, &data), Ok(64 << 10));
        assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, 0, 4096), Ok(0));
    }
    let c = open(&child, &CompressOptions::default());
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    let mut first = data.clone();
    first[..4096].fill(0);
    assert!(
        q.read(0, 64 << 10).expect("read") == first,
        "flushed, then discarded"
    );
    assert!(
        q.read(64 << 10, 64 << 10).expect("read") == data,
        "never flushed"
    );
}

#[test]
fn a_damaged_image_is_refused_with_a_clear_error() {
    let child = Ram::new(CHILD).expect("memfd");
    drop(open(&child, &opts(Algo::Lz4)));
    // Reopened: both superblock copies are valid now (generations 1 and 2).
    drop(open(&child, &CompressOptions::default()));
    let mut sb = vec![0u8; 2 * BLOCK];
    child.read_at(0, &mut sb).expect("read");
    let garbage = random(5, 2 * BLOCK);
    child.write_at(0, &garbage).expect("damage");
    let e = Compress::open(
        Arc::new(child.clone()) as BoxTarget,
        &CompressOptions::default(),
    )
    .expect_err("no superblock");
    assert!(e.0.contains("no valid superblock"), "{e}");
    // One copy torn: the other is used.
    child.write_at(0, &sb).expect("restore");
    child
        .write_at(BLOCK as u64 + 100, &[1, 2, 3])
        .expect("tear copy B");
    drop(open(&child, &CompressOptions::default()));
}

/// What a crash at some point may leave: for each block, the contents it may read back.
type Allowed = Vec<Vec<Vec<u8>>>;

/// A RAM child that lets `watch` look at every request before serving it.
#[derive(Clone)]
struct Watched<W> {
    ram: Ram,
    watch: W,
}

/// What a [`Watched`] child does before serving a request.
trait Watch: Clone + Send + Sync + 'static {
    fn before(&self, ram: &Ram, io: &Io);
}

struct WatchedQueue<W> {
    watch: W,
    ram: Ram,
}

impl<W: Watch> Target for Watched<W> {
    type Queue = WatchedQueue<W>;
    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<WatchedQueue<W>> {
        Ok(WatchedQueue {
            watch: self.watch.clone(),
            ram: self.ram.open_queue(ctx)?,
        })
    }
    fn size(&self) -> Option<u64> {
        self.ram.size()
    }
    fn copies_data(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.ram.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.ram.write_at(offset, buf)
    }
}

impl<W: Watch> QueueTarget for WatchedQueue<W> {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        self.watch.before(&self.ram, &io);
        self.ram.submit(io, ctx);
    }
}

/// A RAM child that copies its bytes (and the model's allowed contents at that moment)
/// before every `every`-th request it serves.
type Tap = Watched<Snapshots>;

#[derive(Clone)]
struct Snapshots {
    every: u64,
    state: Arc<Mutex<TapState>>,
}

struct TapState {
    ops: u64,
    allowed: Allowed,
    snapshots: Vec<(Vec<u8>, Allowed)>,
}

impl Watch for Snapshots {
    fn before(&self, ram: &Ram, _io: &Io) {
        let mut st = self.state.lock().expect("tap state");
        st.ops += 1;
        if st.ops % self.every == 0 {
            let mut bytes = vec![0u8; ram.size().unwrap_or(0) as usize];
            ram.read_at(0, &mut bytes).expect("copy the child");
            let allowed = st.allowed.clone();
            st.snapshots.push((bytes, allowed));
        }
    }
}

/// Blocks of the crash tests' devices.
const BLOCKS: usize = (SIZE / 4096) as usize;
/// The crash tests' child: its data area is little more than the logical size stored raw,
/// so extents are reused soon after they are freed, and writes wait for commits to release
/// space.
const TIGHT: u64 = 512 << 10;

/// A [`Tap`] over a new [`TIGHT`] child copying it before every `every`-th request, with
/// every block allowed to read zeroes.
fn tight_tap(every: u64) -> Tap {
    Watched {
        ram: Ram::new(TIGHT).expect("memfd"),
        watch: Snapshots {
            every,
            state: Arc::new(Mutex::new(TapState {
                ops: 0,
                allowed: vec![vec![vec![0; BLOCK]]; BLOCKS],
                snapshots: Vec::new(),
            })),
        },
    }
}

/// A xorshift generator from `seed`: `next(n)` is below `n`.
fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

/// A flush succeeded: each block may read only its `current` content from now on.
fn flushed(state: &Mutex<TapState>, current: &[u8]) {
    let mut st = state.lock().expect("tap state");
    for (b, allowed) in st.allowed.iter_mut().enumerate() {
        *allowed = vec![current[b * BLOCK..(b + 1) * BLOCK].to_vec()];
    }
}

#[test]
fn every_crash_point_opens_clean_with_flushed_blocks_intact() {
    let tap = tight_tap(2);
    let c = Compress::open(Arc::new(tap.clone()) as BoxTarget, &opts(Algo::Lz4)).expect("open");
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    let mut current = vec![0u8; SIZE as usize];
    let mut next = xorshift(12345);
    let state = Arc::clone(&tap.watch.state);
    for step in 0..400u64 {
        let kind = next(20);
        if kind == 0 {
            assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0), "step {step}");
            flushed(&state, &current);
            continue;
        }
        // A write (some FUA), a discard or write-zeroes, aligned or not.
        let sector = next(SIZE / 512 - 1);
        let sectors = (1 + next(24)).min(SIZE / 512 - sector);
        let (off, len) = (sector * 512, (sectors * 512) as usize);
        let data = match kind {
            1..=4 => compressible(step, len),
            5..=15 => random(step, len),
            16 => vec![0; len],
            _ => Vec::new(),
        };
        let mut after = current.clone();
        if data.is_empty() {
            after[off as usize..off as usize + len].fill(0);
        } else {
            after[off as usize..off as usize + len].copy_from_slice(&data);
        }
        let blocks = off as usize / BLOCK..(off as usize + len).div_ceil(BLOCK);
        {
            let mut st = state.lock().expect("tap state");
            for b in blocks.clone() {
                st.allowed[b].push(after[b * BLOCK..(b + 1) * BLOCK].to_vec());
            }
        }
        let fua = kind == 4;
        let result = if data.is_empty() {
            let op = if kind % 2 == 0 {
                sys::UBLK_IO_OP_DISCARD
            } else {
                sys::UBLK_IO_OP_WRITE_ZEROES
            };
            q.op(op, 0, off, len as u32)
        } else if fua {
            let desc = ublk_core::io::IoDesc {
                op_flags: u32::from(sys::UBLK_IO_OP_WRITE) | sys::UBLK_IO_F_FUA,
                nr_sectors: sectors as u32,
                start_sector: sector,
                addr: 0,
            };
            let tag = q.free_tag().expect("free tag");
            q.deliver(tag, desc, &data).expect("deliver");
            q.wait_for(tag, std::time::Duration::from_secs(5), &mut Vec::new())
                .map(|c| c.result)
                .map_err(|_| -libc::ETIMEDOUT)
        } else {
            q.write(off, &data)
        };
        assert!(result.is_ok(), "step {step}: {result:?}");
        current = after;
        if fua {
            let mut st = state.lock().expect("tap state");
            for b in blocks {
                st.allowed[b] = vec![current[b * BLOCK..(b + 1) * BLOCK].to_vec()];
            }
        }
    }
    drop(q);
    drop(c);
    let snapshots = std::mem::take(&mut state.lock().expect("tap state").snapshots);
    assert!(snapshots.len() > 100, "{} snapshots", snapshots.len());
    open_every_snapshot(&snapshots, TIGHT);
}

/// Opens every copy of the child a [`Tap`] took: each must open, and each block read one of
/// the contents allowed for it at that moment.
fn open_every_snapshot(snapshots: &[(Vec<u8>, Allowed)], child: u64) {
    for (i, (bytes, allowed)) in snapshots.iter().enumerate() {
        let copy = Ram::new(child).expect("memfd");
        copy.write_at(0, bytes).expect("copy");
        let c = Compress::open(Arc::new(copy) as BoxTarget, &CompressOptions::default())
            .unwrap_or_else(|e| panic!("snapshot {i} does not open: {e}"));
        let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
        for (b, ok) in allowed.iter().enumerate() {
            let got = q
                .read((b * BLOCK) as u64, BLOCK as u32)
                .unwrap_or_else(|e| panic!("snapshot {i}: block {b} fails to read: {e}"));
            assert!(
                ok.contains(&got),
                "snapshot {i}: block {b} reads none of its {} allowed contents",
                ok.len()
            );
        }
    }
}

#[test]
fn every_crash_point_opens_clean_with_writes_packed_across_requests() {
    // As above, with up to 6 writes handed over in one loop turn, so that the extents of
    // different requests share child writes and sectors.
    let tap = tight_tap(1);
    let c = Compress::open(Arc::new(tap.clone()) as BoxTarget, &opts(Algo::Lz4)).expect("open");
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    let mut current = vec![0u8; SIZE as usize];
    let mut next = xorshift(777);
    let state = Arc::clone(&tap.watch.state);
    for step in 0..150u64 {
        if next(8) == 0 {
            assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0), "step {step}");
            flushed(&state, &current);
            continue;
        }
        // 1 to 6 writes of 1 to 3 whole blocks, on blocks no other write of the turn has.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for k in 0..1 + next(6) {
            let blocks = 1 + next(3) as usize;
            let lba = next((BLOCKS - blocks) as u64) as usize;
            let range = lba * BLOCK..(lba + blocks) * BLOCK;
            let taken = writes
                .iter()
                .any(|(o, d)| (*o as usize) < range.end && range.start < *o as usize + d.len());
            if taken {
                continue;
            }
            let data = if next(2) == 0 {
                half_random(step * 10 + k, range.len())
            } else {
                compressible(step * 10 + k, range.len())
            };
            writes.push((range.start as u64, data));
        }
        let mut after = current.clone();
        {
            let mut st = state.lock().expect("tap state");
            for (offset, data) in &writes {
                let at = *offset as usize;
                after[at..at + data.len()].copy_from_slice(data);
                for b in at / BLOCK..(at + data.len()) / BLOCK {
                    st.allowed[b].push(after[b * BLOCK..(b + 1) * BLOCK].to_vec());
                }
            }
        }
        write_in_one_turn(&mut q, &writes);
        current = after;
    }
    drop(q);
    drop(c);
    let snapshots = std::mem::take(&mut state.lock().expect("tap state").snapshots);
    assert!(snapshots.len() > 100, "{} snapshots", snapshots.len());
    open_every_snapshot(&snapshots, TIGHT);
}

#[test]
fn check_reports_a_clean_image_and_a_damaged_extent() {
    let child = Ram::new(CHILD).expect("memfd");
    {
        let c = open(&child, &opts(Algo::Lz4));
        let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
        assert_eq!(q.write(0, &compressible(9, 64 << 10)), Ok(64 << 10));
        assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    }
    let target: BoxTarget = Arc::new(child.clone());
    let report = ublk_targets::compress::check(&target).expect("loads");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.extents, 16);
    // Flip a byte in the data area: the extent there no longer checks.
    let data = 32 << 10;
    let mut b = [0u8; 1];
    child.read_at(data + 40, &mut b).expect("read");
    child.write_at(data + 40, &[b[0] ^ 0xff]).expect("damage");
    let report = ublk_targets::compress::check(&target).expect("loads");
    assert_eq!(report.damage.len(), 1, "{report:?}");
}

/// Runs the `ublk` binary with `args`: its exit code and its stdout and stderr.
fn ublk(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ublk"))
        .args(args)
        .output()
        .expect("run ublk");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().expect("exited"), text)
}

/// Flips the bits of the byte at `at` of the file.
fn flip(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[!b[0]], at).expect("write");
}

#[test]
fn ublk_check_reports_damage_with_its_exit_code() {
    use ublk_targets::compress::format::Superblock;
    use ublk_targets::file::FileTarget;
    let dir = std::env::temp_dir().join(format!("ublk-check-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("image");
    let file = FileTarget::open(&path, Some(CHILD), false).expect("image file");
    drop(Compress::open(Arc::new(file.clone()) as BoxTarget, &opts(Algo::Lz4)).expect("new"));
    {
        // Reopened, so that both superblock copies are valid.
        let c = Compress::open(Arc::new(file) as BoxTarget, &CompressOptions::default())
            .expect("reopen");
        let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
        assert_eq!(q.write(0, &compressible(9, 64 << 10)), Ok(64 << 10));
        assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    }
    let spec = format!("compress:{}", path.display());
    let (code, out) = ublk(&["check", &spec]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": clean\n"), "{out}");
    assert!(out.contains("extents: 16 checked, 0 damaged"), "{out}");
    assert!(
        out.contains("journal: 16 records replayed from 1 blocks"),
        "{out}"
    );
    let (code, out) = ublk(&["fsck", &spec, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["clean"], true);
    assert_eq!(v["extents"], 16);

    // Where things are, from the superblock in force.
    let image = std::fs::read(&path).expect("read image");
    let copies = [
        Superblock::decode(&image[..BLOCK]),
        Superblock::decode(&image[BLOCK..2 * BLOCK]),
    ];
    let sb = copies
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .max_by_key(|sb| sb.generation)
        .expect("a valid superblock")
        .clone();
    let map = sb.layout.map_block_offset(sb.active_map, 0);

    // A byte of block 0's extent (the first in the data area).
    flip(&path, sb.layout.data + 40);
    let (code, out) = ublk(&["check", &spec]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DAMAGED: 1 problem(s)"), "{out}");
    assert!(out.contains("extents: 16 checked, 1 damaged"), "{out}");
    assert!(
        out.contains("damage: block 0: extent at data sector 0")
            && out.contains("checksum mismatch"),
        "{out}"
    );
    flip(&path, sb.layout.data + 40);

    // A byte of the map checkpoint in force.
    flip(&path, map + 100);
    let (code, out) = ublk(&["check", &spec]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("damage: map checkpoint block 0 is damaged: checksum mismatch"),
        "{out}"
    );
    flip(&path, map + 100);

    // The copy in force (A, generation 2) damaged after commits were journaled under it:
    // not what a crash leaves, and falling back to B would lose those commits.
    flip(&path, 200);
    let (code, out) = ublk(&["check", &spec]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("superblock A: checksum mismatch"), "{out}");
    assert!(out.contains("a newer superblock copy was damaged"), "{out}");
    flip(&path, 200);
    // The older copy torn: the newer one serves, and the image is clean.
    flip(&path, BLOCK as u64 + 200);
    let (code, out) = ublk(&["check", &spec]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("superblock B: checksum mismatch"), "{out}");
    assert!(out.contains("in force: copy A (generation 2)"), "{out}");
    // Both: nothing to go by.
    flip(&path, 200);
    let (code, out) = ublk(&["check", &spec]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("superblock A: checksum mismatch"), "{out}");
    assert!(out.contains("damage: no valid superblock"), "{out}");

    let (code, out) = ublk(&["check", &format!("compress:{}/none", dir.display())]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = ublk(&["check", "stripe:/x"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("expected compress:PATH"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn freed_space_is_punched_in_the_child_after_the_commit() {
    let child = Ram::new(CHILD).expect("memfd");
    let c = open(&child, &opts(Algo::Lz4));
    let h = c.handle();
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    let empty = child.written_pages();
    // 32 raw extents, packed: 249 + 9 sectors, 33 child pages.
    let noise = random(7, 128 << 10);
    assert_eq!(q.write(0, &noise), Ok(128 << 10));
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    let full = child.written_pages();
    assert!(full >= empty + 33, "{empty} -> {full}");
    // Discarded, but not yet committed: the durable map still names the extents.
    assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, 0, 128 << 10), Ok(0));
    assert_eq!(child.written_pages(), full);
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    // The commit's journal block is one more page; the 33 data pages are gone.
    let after = child.written_pages();
    assert!(after <= full + 1 - 33, "{full} -> {after}");
    assert_eq!(h.allocated_bytes(), 0);
    // Overwrites free their old extents' pages too, one commit later (when no write has
    // reused them meanwhile), and the data stays right.
    let text = compressible(8, 64 << 10);
    assert_eq!(q.write(0, &noise[..64 << 10]), Ok(64 << 10));
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    let raw = child.written_pages();
    assert_eq!(q.write(0, &text), Ok(64 << 10));
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    let kept = child.written_pages();
    assert!(kept + 1 >= raw, "punched at once: {raw} -> {kept}");
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    let compressed = child.written_pages();
    assert!(compressed + 8 <= raw, "{raw} -> {compressed}");
    assert_eq!(q.read(0, 64 << 10).expect("read"), text);
    drop(q);
    let target: BoxTarget = Arc::new(child.clone());
    let report = ublk_targets::compress::check(&target).expect("readable");
    assert!(report.is_clean(), "{report}");
}

#[test]
fn discard_shrinks_a_file_child() {
    use std::os::unix::fs::MetadataExt;
    use ublk_targets::file::FileTarget;
    let dir = std::env::temp_dir().join(format!("ublk-punch-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("image");
    let file = FileTarget::open(&path, Some(CHILD), false).expect("image file");
    let c = Compress::open(Arc::new(file) as BoxTarget, &opts(Algo::Lz4)).expect("new image");
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    let allocated = || std::fs::metadata(&path).expect("stat").blocks() * 512;
    assert_eq!(q.write(0, &random(3, 128 << 10)), Ok(128 << 10));
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    let full = allocated();
    assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, 0, 128 << 10), Ok(0));
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    // The discards to the file are asynchronous: wait for them to land.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while allocated() + (128 << 10) > full && std::time::Instant::now() < deadline {
        assert_eq!(q.read(0, 4096).expect("read"), vec![0; 4096]);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let after = allocated();
    assert!(
        after + (128 << 10) <= full,
        "the file's allocated bytes went from {full} to {after}"
    );
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With compression workers: every written block is compressed on another thread and comes
/// back through the queue's notices. Mixed whole and partial writes, discards, write-zeroes and
/// flushes on a child too small for every overwrite (writes wait for commits to release
/// space, keeping their compressed blocks), read back against a model, then the image
/// reopened without workers.
#[test]
fn workers_compress_for_the_queue() {
    let child = Ram::new(2 * SIZE).expect("memfd");
    let o = CompressOptions {
        workers: 2,
        ..opts(Algo::Lz4)
    };
    let c = open(&child, &o);
    let mut q = SimQueue::new(&c, geo(), 16).expect("sim queue");
    let mut model = vec![0u8; SIZE as usize];
    let mut x: u64 = 7;
    let mut next = |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    for round in 0..600u64 {
        let sector = next(SIZE / 512 - 1);
        let n = (1 + next(64)).min(SIZE / 512 - sector);
        let (off, len) = (sector * 512, (n * 512) as usize);
        match next(10) {
            0 => {
                assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, off, len as u32), Ok(0));
                model[off as usize..off as usize + len].fill(0);
            }
            1 => {
                assert_eq!(
                    q.op(sys::UBLK_IO_OP_WRITE_ZEROES, 0, off, len as u32),
                    Ok(0)
                );
                model[off as usize..off as usize + len].fill(0);
            }
            2 => assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0)),
            3..=5 => {
                let got = q.read(off, len as u32).expect("read");
                assert!(
                    got == model[off as usize..off as usize + len],
                    "round {round}: read of {len} bytes at {off}"
                );
            }
            k => {
                let data = if k % 2 == 0 {
                    compressible(round, len)
                } else {
                    random(round, len)
                };
                assert_eq!(q.write(off, &data), Ok(len as i32), "round {round}");
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
        }
    }
    let whole = |q: &mut SimQueue<Compress>| -> Vec<u8> {
        (0..SIZE)
            .step_by(64 << 10)
            .flat_map(|off| q.read(off, 64 << 10).expect("read"))
            .collect()
    };
    assert!(whole(&mut q) == model);
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    drop(q);
    drop(c);
    let c = open(&child, &opts(Algo::Lz4));
    let mut q = SimQueue::new(&c, geo(), 16).expect("sim queue");
    assert!(whole(&mut q) == model, "reopened without workers");
}

#[test]
fn workers_are_bounded() {
    let child = Ram::new(CHILD).expect("memfd");
    let o = CompressOptions {
        workers: ublk_targets::compress::MAX_WORKERS + 1,
        ..opts(Algo::Lz4)
    };
    let e = Compress::open(Arc::new(child) as BoxTarget, &o).expect_err("too many workers");
    assert!(e.0.contains("workers="), "{e}");
}

/// The workers block every signal: the image is opened before the server blocks SIGTERM to
/// take it from a signalfd, and a worker the kernel handed SIGTERM to would end the process
/// without its clean stop (found in the VM: `ublk del` had to kill such a server).
#[test]
fn workers_block_sigterm() {
    let child = Ram::new(CHILD).expect("memfd");
    let o = CompressOptions {
        workers: 2,
        ..opts(Algo::Lz4)
    };
    let c = open(&child, &o);
    // A thread names itself once it runs: look until both have.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let workers = loop {
        let found: Vec<(String, u64)> = std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .filter_map(|task| {
                let dir = task.ok()?.path();
                let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                let status = std::fs::read_to_string(dir.join("status")).ok()?;
                let mask = status.lines().find_map(|l| l.strip_prefix("SigBlk:"))?;
                let mask = u64::from_str_radix(mask.trim(), 16).expect("a hex mask");
                comm.starts_with("ublk-compress-").then_some((comm, mask))
            })
            .collect();
        if found.len() >= 2 || std::time::Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(
        workers.len() >= 2,
        "the 2 workers of this image run: {workers:?}"
    );
    for (comm, blocked) in &workers {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            assert!(blocked & 1 << (sig - 1) != 0, "{comm}: SigBlk {blocked:x}");
        }
    }
    // This thread's own mask is as it was.
    let own = std::fs::read_to_string("/proc/thread-self/status").expect("status");
    assert!(own.contains("SigBlk:\t0000000000000000"), "{own}");
    drop(c);
}

/// Blocks like fio's `buffer_compress_percentage=50`: half random bytes, half zeroes.
fn half_random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = random(seed, len);
    for block in out.chunks_mut(BLOCK) {
        let half = block.len() / 2;
        block[half..].fill(0);
    }
    out
}

#[test]
fn extents_written_together_are_packed_and_share_sectors_safely() {
    let child = Ram::new(CHILD).expect("memfd");
    let c = open(&child, &opts(Algo::Lz4));
    let h = c.handle();
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    let mut model = half_random(5, SIZE as usize);
    for chunk in model.chunks(128 << 10).enumerate() {
        let (i, data) = chunk;
        assert_eq!(q.write(i as u64 * (128 << 10), data), Ok(128 << 10));
    }
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    let (stored, allocated) = (h.stored_bytes(), h.allocated_bytes());
    // 64 extents of about 2.1 KiB: whole sectors would take 5 each (163,840 bytes); packed,
    // they take their bytes, at most 15 bytes of alignment each and the tail of each
    // write's last sector.
    assert!(stored > 64 * 2048 && stored < 64 * 2200, "{stored}");
    assert!(allocated >= stored, "{allocated} < {stored}");
    assert!(
        allocated < stored + 64 * 15 + 2 * 512,
        "{allocated} vs {stored}"
    );

    // Overwrite every other block on its own: the sectors the old extents shared with
    // their neighbours stay with the neighbours.
    for lba in (0..64).step_by(2) {
        let block = random(100 + lba, BLOCK);
        assert_eq!(q.write(lba * BLOCK as u64, &block), Ok(BLOCK as i32));
        model[lba as usize * BLOCK..][..BLOCK].copy_from_slice(&block);
    }
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    // Write more so that the freed sectors are reused, then read everything.
    let more = half_random(6, 64 << 10);
    assert_eq!(q.write(0, &more), Ok(64 << 10));
    model[..64 << 10].copy_from_slice(&more);
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    assert_eq!(read_all(&mut q), model);
    drop(q);
    drop(c);
    let target: BoxTarget = Arc::new(child.clone());
    let report = ublk_targets::compress::check(&target).expect("readable");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.allocated_bytes, allocated_after(&child));

    // Reopened: the same bytes, and discarding everything frees every sector.
    let c = open(&child, &CompressOptions::default());
    let h = c.handle();
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    assert_eq!(read_all(&mut q), model);
    for at in [0, 128 << 10] {
        assert_eq!(q.op(sys::UBLK_IO_OP_DISCARD, 0, at, 128 << 10), Ok(0));
    }
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    assert_eq!(h.allocated_bytes(), 0);
}

/// The whole device, read 128 KiB at a time.
fn read_all<T: Target>(q: &mut SimQueue<T>) -> Vec<u8> {
    (0..SIZE)
        .step_by(128 << 10)
        .flat_map(|at| q.read(at, 128 << 10).expect("read"))
        .collect()
}

/// The allocated bytes an image on `child` reports when opened.
fn allocated_after(child: &Ram) -> u64 {
    open(child, &CompressOptions::default())
        .handle()
        .allocated_bytes()
}

#[test]
fn a_version_1_image_opens_and_is_upgraded() {
    use ublk_targets::compress::format::{reseal_superblock, Superblock, VERSION};
    let child = Ram::new(CHILD).expect("memfd");
    let data = compressible(3, 64 << 10);
    {
        let c = open(&child, &opts(Algo::Lz4));
        let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
        // One block per write: extents on sector boundaries, as version 1 wrote them.
        for (i, block) in data.chunks(BLOCK).enumerate() {
            assert_eq!(q.write(i as u64 * BLOCK as u64, block), Ok(BLOCK as i32));
        }
        assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    }
    // Mark the superblock in force as version 1.
    let target: BoxTarget = Arc::new(child.clone());
    let mut sbs = vec![0u8; 2 * BLOCK];
    target.dyn_read_at(0, &mut sbs).expect("read");
    let at = (0..2)
        .filter(|&i| Superblock::decode(&sbs[i * BLOCK..][..BLOCK]).is_ok())
        .max_by_key(|&i| {
            Superblock::decode(&sbs[i * BLOCK..][..BLOCK])
                .map(|s| s.generation)
                .ok()
        })
        .expect("a valid copy")
        * BLOCK;
    sbs[at + 8..at + 12].copy_from_slice(&1u32.to_le_bytes());
    reseal_superblock(&mut sbs[at..at + BLOCK]);
    target
        .dyn_write_at(at as u64, &sbs[at..at + BLOCK])
        .expect("write");
    let report = ublk_targets::compress::check(&target).expect("readable");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.superblock.as_ref().map(|s| s.version), Some(1));
    // Opened: the data reads back, and the image is now the current version.
    let c = open(&child, &CompressOptions::default());
    assert_eq!(c.handle().status()["format_version"], VERSION);
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    assert_eq!(q.read(0, 64 << 10).expect("read"), data);
    drop(q);
    drop(c);
    let report = ublk_targets::compress::check(&target).expect("readable");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.superblock.map(|s| s.version), Some(VERSION));
}

/// Delivers `writes` (offset, bytes) in one loop turn and waits for all of their answers.
fn write_in_one_turn<T: Target>(q: &mut SimQueue<T>, writes: &[(u64, Vec<u8>)]) {
    let mut tags = Vec::new();
    for (offset, data) in writes {
        let desc = ublk_core::io::IoDesc {
            op_flags: u32::from(sys::UBLK_IO_OP_WRITE),
            nr_sectors: (data.len() / 512) as u32,
            start_sector: offset / 512,
            addr: 0,
        };
        let tag = q.free_tag().expect("a free tag");
        q.deliver(tag, desc, data).expect("deliver");
        tags.push((tag, data.len() as i32));
    }
    let mut done = Vec::new();
    for &(tag, len) in &tags {
        let result = match done
            .iter()
            .position(|c: &ublk_core::sim::Commit| c.tag == tag)
        {
            Some(i) => done.remove(i).result,
            None => {
                let c = q.wait_for(tag, std::time::Duration::from_secs(5), &mut done);
                c.expect("answered").result
            }
        };
        assert_eq!(result, len, "tag {tag}");
    }
}

#[test]
fn writes_of_one_turn_are_packed_together() {
    let child = Ram::new(CHILD).expect("memfd");
    let c = open(&child, &opts(Algo::Lz4));
    let h = c.handle();
    let mut q = SimQueue::new(&c, geo(), 32).expect("sim queue");
    let mut model = vec![0u8; SIZE as usize];
    // 16 writes of one block each, delivered together as a queue depth of 16 would: their
    // extents share sectors, where each alone would take whole sectors (458 bytes more for
    // a block of 2,102 stored bytes).
    let mut writes = Vec::new();
    for k in 0..16u64 {
        let data = half_random(200 + k, BLOCK);
        let offset = (k * 3 % 64) * BLOCK as u64;
        model[offset as usize..][..BLOCK].copy_from_slice(&data);
        writes.push((offset, data));
    }
    write_in_one_turn(&mut q, &writes);
    let (stored, allocated) = (h.stored_bytes(), h.allocated_bytes());
    assert!(stored > 16 * 2048, "{stored}");
    assert!(
        allocated < stored + 16 * 15 + 512,
        "{allocated} allocated for {stored} stored"
    );
    assert_eq!(read_all(&mut q), model);
    // Rounds of overwrites and new blocks, one turn each, some of several blocks and some
    // of compressible or random data; flushes between them.
    for round in 0..6u64 {
        let mut writes = Vec::new();
        for k in 0..12u64 {
            let blocks = 1 + (k % 3) as usize;
            let lba = (round * 11 + k * 5) % (64 - blocks as u64);
            let data = match k % 4 {
                0 => compressible(round * 50 + k, blocks * BLOCK),
                1 => random(round * 50 + k, blocks * BLOCK),
                _ => half_random(round * 50 + k, blocks * BLOCK),
            };
            // One turn's writes go to different blocks (their order is not defined).
            let offset = lba * BLOCK as u64;
            let range = offset as usize..offset as usize + data.len();
            if writes.iter().any(|(o, d): &(u64, Vec<u8>)| {
                (*o as usize) < range.end && range.start < *o as usize + d.len()
            }) {
                continue;
            }
            model[range].copy_from_slice(&data);
            writes.push((offset, data));
        }
        write_in_one_turn(&mut q, &writes);
        if round % 2 == 1 {
            assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
        }
        assert_eq!(read_all(&mut q), model, "round {round}");
    }
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    drop(q);
    drop(c);
    let target: BoxTarget = Arc::new(child.clone());
    let report = ublk_targets::compress::check(&target).expect("readable");
    assert!(report.is_clean(), "{report}");
    let c = open(&child, &CompressOptions::default());
    let mut q = SimQueue::new(&c, geo(), 8).expect("sim queue");
    assert_eq!(read_all(&mut q), model);
}

#[test]
fn space_stays_packed_under_random_rewrites() {
    // 8 MiB filled 128 KiB at a time, then rewritten 4 KiB at a time at random, 16 writes
    // a loop turn (a queue depth of 16), with flushes: the extents of each turn are packed
    // together, so the space taken stays well under whole sectors' (2,560 bytes for a block
    // lz4 stores in about 2,100: 1.22 × the stored bytes).
    const BIG: u64 = 8 << 20;
    let child = Ram::new(BIG / 4096 * 4608 + (4 << 20)).expect("memfd");
    let o = CompressOptions {
        size: Some(BIG),
        algo: Some(Algo::Lz4),
        workers: 0,
    };
    let c = open(&child, &o);
    let h = c.handle();
    let g = Geometry {
        size: BIG,
        logical_block_size: 512,
        max_io: 128 << 10,
    };
    let mut q = SimQueue::new(&c, g, 64).expect("sim queue");
    for chunk in 0..BIG / (128 << 10) {
        let data = half_random(chunk, 128 << 10);
        assert_eq!(q.write(chunk * (128 << 10), &data), Ok(128 << 10));
    }
    assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    let (stored, allocated) = (h.stored_bytes(), h.allocated_bytes());
    println!("after the fill: stored {stored}, allocated {allocated}");
    assert!(allocated * 100 < stored * 101, "{allocated} for {stored}");
    let mut x = 99u64;
    for turn in 0..1000u64 {
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for k in 0..16u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = x % (BIG / 4096) * 4096;
            if writes.iter().all(|(o, _)| *o != offset) {
                writes.push((offset, half_random(turn * 100 + k + 1_000_000, BLOCK)));
            }
        }
        write_in_one_turn(&mut q, &writes);
        if turn % 100 == 99 {
            assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
        }
    }
    let (stored, allocated) = (h.stored_bytes(), h.allocated_bytes());
    println!("after the rewrites: stored {stored}, allocated {allocated}");
    assert!(allocated * 100 < stored * 115, "{allocated} for {stored}");
}

/// Checks every write of packed extents a [`Watched`] child serves (a write whose first
/// bytes are an extent header): each extent is followed by the next one at the next
/// 16-byte boundary, or by zeroes to the end of its sector; after the last, zeroes.
#[derive(Clone, Default)]
struct Scribe {
    seen: Arc<Mutex<Seen>>,
}

#[derive(Default)]
struct Seen {
    /// Writes of packed extents longer than a queue's extent buffer (8 KiB): run buffers.
    runs: u64,
    extents: u64,
    stale: Vec<String>,
}

impl Watch for Scribe {
    fn before(&self, _ram: &Ram, io: &Io) {
        let Ok(data) = io.data() else {
            return;
        };
        if !data.starts_with(&EXTENT_MAGIC) {
            return;
        }
        let mut seen = self.seen.lock().expect("seen");
        match packed_extents(data) {
            Ok(n) => {
                seen.extents += n;
                seen.runs += u64::from(data.len() > 8192);
            }
            Err(e) => seen.stale.push(format!("write at {}: {e}", io.offset())),
        }
    }
}

/// The extents in a write of packed extents, or where a byte that is neither an extent's
/// nor a zero lies.
fn packed_extents(buf: &[u8]) -> Result<u64, String> {
    let (mut pos, mut n) = (0, 0);
    while pos < buf.len() {
        if !buf[pos..].starts_with(&EXTENT_MAGIC) {
            return match buf[pos..].iter().position(|&b| b != 0) {
                Some(i) => Err(format!("byte {} is neither an extent's nor zero", pos + i)),
                None => Ok(n),
            };
        }
        let payload = usize::from(u16::from_le_bytes([buf[pos + 8], buf[pos + 9]]));
        let end = pos + EXTENT_HEADER + payload;
        if end > buf.len() {
            return Err(format!("the extent at {pos} runs past the write"));
        }
        n += 1;
        let grain = end.next_multiple_of(16);
        let next = if buf.get(grain..grain + 4) == Some(&EXTENT_MAGIC[..]) {
            grain
        } else {
            end.next_multiple_of(512).min(buf.len())
        };
        if let Some(i) = buf[end..next].iter().position(|&b| b != 0) {
            return Err(format!("stale byte {} after the extent at {pos}", end + i));
        }
        pos = next;
    }
    Ok(n)
}

#[test]
fn reused_write_buffers_send_no_stale_bytes_to_the_child() {
    let scribe = Watched {
        ram: Ram::new(CHILD).expect("memfd"),
        watch: Scribe::default(),
    };
    let c = Compress::open(Arc::new(scribe.clone()) as BoxTarget, &opts(Algo::Lz4)).expect("open");
    let mut q = SimQueue::new(&c, geo(), 32).expect("sim queue");
    let mut model = vec![0u8; SIZE as usize];
    let mut next = xorshift(777);
    // Turns of 16 single-block writes of every kind of data to distinct blocks: their runs
    // go out in buffers the child gave back, still holding the bytes of earlier runs laid
    // out differently.
    for round in 0..40u64 {
        let mut lbas: Vec<u64> = Vec::new();
        while lbas.len() < 16 {
            let lba = next(SIZE / BLOCK as u64);
            if !lbas.contains(&lba) {
                lbas.push(lba);
            }
        }
        let writes: Vec<(u64, Vec<u8>)> = lbas
            .iter()
            .enumerate()
            .map(|(k, &lba)| {
                let seed = round * 100 + k as u64;
                let data = match next(4) {
                    0 => compressible(seed, BLOCK),
                    1 => random(seed, BLOCK),
                    _ => half_random(seed, BLOCK),
                };
                model[lba as usize * BLOCK..][..BLOCK].copy_from_slice(&data);
                (lba * BLOCK as u64, data)
            })
            .collect();
        write_in_one_turn(&mut q, &writes);
        if round % 4 == 3 {
            assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
        }
    }
    assert_eq!(read_all(&mut q), model);
    let seen = scribe.watch.seen.lock().expect("seen");
    assert!(seen.stale.is_empty(), "{:?}", seen.stale);
    assert!(seen.extents >= 40 * 16, "{} extents checked", seen.extents);
    assert!(seen.runs >= 20, "{} run buffers checked", seen.runs);
}
