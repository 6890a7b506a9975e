//! The bodies of the fuzz targets under `fuzz/`, kept here so that `cargo test` can replay
//! their corpora on stable Rust (see `tests/fuzz_corpus.rs`).

use ublk_core::check::{
    check_request_stream, check_request_stream_in, check_request_stream_with, Semantics,
};
use ublk_core::params::{max_queues, DeviceParams, MAX_DEPTH, MAX_IO_BYTES};
use ublk_core::sim::SimQueue;
use ublk_core::sys;
use ublk_core::BufferMode;
use ublk_core::{parse_size, Geometry};

use std::sync::{Arc, OnceLock};

use ublk_zc::{BoxTarget, Target};

use crate::compress::format::{self as cformat, Algo};
use crate::compress::{Compress, CompressOptions};
use crate::faulty::{FaultOps, FaultRule, FaultSwitch, Faulty};
use crate::file::FileTarget;
use crate::mirror::meta::LegState;
use crate::mirror::meta::{self, Layout, Superblock, BITMAP_BYTES, BITS_PER_BLOCK, BLOCK};
use crate::mirror::{Mirror, MirrorOptions};
use crate::null::Null;
use crate::ram::Ram;
use crate::stripe::Stripe;

/// The geometry the request-stream fuzzer uses: small, so the model stays cheap.
pub const GEOMETRY: Geometry = Geometry {
    size: 256 << 10,
    logical_block_size: 512,
    max_io: 128 << 10,
};

/// `request_stream`: the same request bytes against each target. The first byte picks the
/// logical block size (512 or 4096) so both rule sets are covered.
pub fn request_stream(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let geo = Geometry {
        logical_block_size: if first & 1 == 0 { 512 } else { 4096 },
        ..GEOMETRY
    };
    check_request_stream(Null::default, geo, Semantics::DISCARDS_DATA, rest);
    let ram = || Ram::new(geo.size).expect("memfd");
    check_request_stream(ram, geo, Semantics::STORES_DATA, rest);
    // The RAM target copies in place through the simulated char device; the file target
    // reads `Io::data`, so the engine stages its bytes.
    check_request_stream_in(BufferMode::UserCopy, ram, geo, Semantics::STORES_DATA, rest);
    let file = || FileTarget::from_file(memfd(), geo.size).expect("file target on a memfd");
    check_request_stream(file, geo, Semantics::STORES_DATA, rest);
    for mode in [BufferMode::Registered, BufferMode::UserCopy] {
        check_request_stream_in(mode, file, geo, Semantics::STORES_DATA, rest);
    }
    // Stacks: a stripe over RAM children, and a nested tree with a stripe of stripes, a
    // pass-through faulty node and file children (which the engine stages in user copy).
    let half = geo.size / 2;
    let stripe = || stack(&format!("stripe(ram:{half},ram:{half},chunk=4K)"));
    for mode in [
        BufferMode::Copy,
        BufferMode::Registered,
        BufferMode::UserCopy,
    ] {
        check_request_stream_in(mode, stripe, geo, Semantics::STORES_DATA, rest);
        check_request_stream_in(mode, nested_stack(geo), geo, Semantics::STORES_DATA, rest);
    }
    mirror_stream(geo, rest);
    for mode in [
        BufferMode::Copy,
        BufferMode::Registered,
        BufferMode::UserCopy,
    ] {
        check_request_stream_in(
            mode,
            compress_over_ram(geo),
            geo,
            Semantics::STORES_DATA,
            rest,
        );
    }
}

/// A new compressed image over RAM with room for the logical size stored raw and a little
/// more, so overwrites without flushes exercise the wait for space to come back.
fn compress_over_ram(geo: Geometry) -> impl FnOnce() -> Compress {
    move || {
        let child: BoxTarget = Arc::new(Ram::new(geo.size * 2).expect("memfd"));
        let opts = CompressOptions {
            size: Some(geo.size),
            algo: None,
            workers: 0,
        };
        Compress::open(child, &opts).expect("a new image on a blank child")
    }
}

/// A 3-leg mirror whose legs fail and return between batches: the input byte after each
/// batch picks a leg and what happens to it — its I/O starts failing (a faulty rule), the
/// operator fails it, or a failed leg is replaced by a fresh one and rebuilt while the
/// requests go on. At least one in-sync leg without a fault always remains, so every request
/// must still answer as the model says.
fn mirror_stream(geo: Geometry, input: &[u8]) {
    const LEGS: usize = 3;
    let leg_size = geo.size + (1 << 20);
    let fresh_leg = || {
        let ram: BoxTarget = Arc::new(Ram::new(leg_size).expect("memfd"));
        let faulty = Faulty::new(ram, None);
        let switch = faulty.switch();
        (Arc::new(faulty) as BoxTarget, switch)
    };
    let (targets, mut switches): (Vec<BoxTarget>, Vec<Arc<FaultSwitch>>) =
        (0..LEGS).map(|_| fresh_leg()).unzip();
    let legs = targets
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, format!("leg{i}")))
        .collect();
    let opts = MirrorOptions {
        region: Some(16 << 10),
        assume_clean: true,
        force_new: false,
    };
    let mirror = Mirror::assemble(legs, &opts).expect("mirror on fresh legs");
    let h = mirror.handle();
    let mut faulted = [false; LEGS];
    let mut between = |byte: u8| {
        let leg = usize::from(byte >> 2) % LEGS;
        // Some other leg stays in sync and healthy, so the mirror can always answer.
        let spare =
            (0..LEGS).any(|j| j != leg && h.leg_state(j) == Some(LegState::InSync) && !faulted[j]);
        match byte & 3 {
            1 if spare => {
                switches[leg].set(Some(FaultRule {
                    ops: FaultOps::All,
                    range: None,
                    every: 1,
                    fail: true,
                    delay: std::time::Duration::ZERO,
                }));
                faulted[leg] = true;
            }
            2 if spare => {
                let _ = h.fail(leg);
            }
            3 if h.leg_state(leg) == Some(LegState::Faulty) => {
                let (target, switch) = fresh_leg();
                h.replace(leg, target, format!("leg{leg}'"))
                    .expect("a faulty leg can be replaced");
                switches[leg] = switch;
                faulted[leg] = false;
            }
            _ => {}
        }
    };
    check_request_stream_with(
        BufferMode::Copy,
        move || mirror,
        geo,
        Semantics::STORES_DATA,
        input,
        Some(&mut between),
    );
}

/// Builds a stack expression for the fuzzer (a bad one is a bug in this file).
fn stack(expr: &str) -> BoxTarget {
    crate::stack::build(expr)
        .unwrap_or_else(|e| panic!("fuzz stack {expr}: {e}"))
        .target
}

/// A three-deep tree of `geo.size` bytes: a stripe of a stripe (RAM and a pass-through
/// faulty node) and a stripe of a file (on a memfd) and RAM.
fn nested_stack(geo: Geometry) -> impl Fn() -> BoxTarget {
    move || {
        let quarter = geo.size / 4;
        let left: BoxTarget = stack(&format!(
            "stripe(ram:{quarter},faulty(ram:{quarter}),chunk=4K)"
        ));
        let file: BoxTarget =
            Arc::new(FileTarget::from_file(memfd(), quarter).expect("file target on a memfd"));
        let ram: BoxTarget = Arc::new(Ram::new(quarter).expect("memfd"));
        let right: BoxTarget =
            Arc::new(Stripe::new(vec![file, ram], 8 << 10).expect("valid stripe"));
        Arc::new(Stripe::new(vec![left, right], 16 << 10).expect("valid stripe"))
    }
}

/// An anonymous in-memory file for the file target.
fn memfd() -> std::fs::File {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    match memfd_create(c"ublk-fuzz", MFdFlags::MFD_CLOEXEC) {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => panic!("memfd_create: {}", std::io::Error::from(e)),
    }
}

/// `params`: arbitrary parameters and size strings must be accepted or rejected by the rules
/// the kernel applies, never panic, and, when accepted, convert faithfully.
pub fn params(data: &[u8]) {
    let mut b = data.iter().copied();
    let mut next = |n: usize| -> u64 {
        (0..n).fold(0u64, |acc, i| {
            acc | u64::from(b.next().unwrap_or(0)) << (8 * i)
        })
    };
    let p = DeviceParams {
        size: next(8),
        logical_block_size: next(4) as u32,
        physical_block_size: next(4) as u32,
        queues: next(2) as u16,
        depth: next(2) as u16,
        max_io: next(4) as u32,
        discard: next(1) & 1 == 1,
        write_zeroes: next(1) & 1 == 1,
        volatile_cache: next(1) & 1 == 1,
        fua: next(1) & 1 == 1,
        read_only: next(1) & 1 == 1,
    };
    let lbs = p.logical_block_size;
    let rules_hold = lbs.is_power_of_two()
        && (512..=4096).contains(&lbs)
        && p.physical_block_size.is_power_of_two()
        && p.physical_block_size >= lbs
        && p.physical_block_size <= 65536
        && p.size > 0
        && p.size % u64::from(lbs) == 0
        && (1..=max_queues()).contains(&p.queues)
        && (1..=MAX_DEPTH).contains(&p.depth)
        && (4096..=MAX_IO_BYTES).contains(&p.max_io)
        && p.max_io % 4096 == 0;
    assert_eq!(p.validate().is_ok(), rules_hold, "{p:?}");
    if rules_hold {
        let s = p.to_sys();
        assert_eq!(s.basic.dev_sectors * 512, p.size);
        assert_eq!(1u32 << s.basic.logical_bs_shift, lbs);
        assert_eq!(s.basic.max_sectors * 512, p.max_io);
    }

    let text = String::from_utf8_lossy(&data[data.len().min(40)..]);
    if let Ok(n) = parse_size(&text) {
        let t = text.trim();
        let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
        let base: u64 = digits.parse().expect("accepted sizes start with a number");
        assert!(n >= base, "{text:?} parsed to {n} < {base}");
        assert!(n == 0 || n % base.max(1) == 0);
    }
}

/// `mirror_meta`: arbitrary bytes read as a mirror superblock and as a bitmap block are refused
/// or accepted without a panic, and what is accepted encodes back to what was read; layouts
/// for arbitrary leg and region sizes hold their invariants.
///
/// The first byte steers: bit 0 reseals the superblock's checksum and bit 1 the bitmap
/// block's (so the checks behind the checksum are reached), bit 2 takes the region size as a
/// shift, bits 3 and 4 expect another block index and another array UUID than the block
/// names. The rest is the block; its last 16 bytes also give a leg size and region size.
pub fn mirror_meta(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let le = |at: usize, n: usize| -> u64 {
        let bytes = rest.get(at..).unwrap_or_default().iter().take(n);
        bytes.rev().fold(0, |acc, &b| acc << 8 | u64::from(b))
    };

    let mut block = rest.to_vec();
    if mode & 1 != 0 {
        meta::reseal_superblock(&mut block);
    }
    if let Ok(sb) = Superblock::decode(&block) {
        let mut again = vec![0; BLOCK];
        sb.encode(&mut again).expect("a decoded superblock encodes");
        assert_eq!(Superblock::decode(&again), Ok(sb.clone()));
        check_layout(&sb.layout, le(16, 8), le(24, 8));
    }

    let mut block = rest.to_vec();
    if mode & 2 != 0 {
        meta::reseal_bitmap_block(&mut block);
    }
    let index = le(4, 4) as u32 ^ u32::from(mode >> 3 & 1);
    let mut uuid = [0; 16];
    uuid[..4].copy_from_slice(&(le(8, 4) as u32 ^ u32::from(mode >> 4 & 1)).to_le_bytes());
    if let Ok(bits) = meta::decode_bitmap_block(index, &uuid, &block) {
        assert_eq!(bits.len(), BITMAP_BYTES);
        let mut again = vec![0; BLOCK];
        meta::encode_bitmap_block(index, &uuid, bits, &mut again)
            .expect("a decoded bitmap block encodes");
        assert_eq!(
            again,
            block[..BLOCK],
            "bitmap block {index} re-encodes differently"
        );
    }

    let tail = rest.len().saturating_sub(16);
    let leg_size = le(tail, 8);
    let region_size = if mode & 4 != 0 {
        1u64.checked_shl(u32::from(rest.get(tail + 8).copied().unwrap_or(0)) % 64)
            .unwrap_or(0)
    } else {
        le(tail + 8, 8)
    };
    if let Ok(layout) = Layout::for_leg(leg_size, region_size) {
        assert!(
            layout.data_offset + layout.dev_size <= leg_size,
            "{layout:?}"
        );
        check_layout(&layout, le(0, 8), le(8, 8));
    }
}

/// The invariants of a valid layout, and `regions_of` for a byte range picked by `x` and `y`.
fn check_layout(l: &Layout, x: u64, y: u64) {
    assert_eq!(l.validate(), Ok(()), "{l:?}");
    assert_eq!(l.data_offset % meta::DATA_ALIGN, 0);
    assert!((u64::from(l.bitmap_blocks) + 1) * BLOCK as u64 <= l.data_offset);
    let regions = l.regions();
    assert!(regions >= 1 && regions <= u64::from(l.bitmap_blocks) * BITS_PER_BLOCK);
    let (block, bit) = l.bit_of(regions - 1);
    assert!(block < l.bitmap_blocks && bit < BITS_PER_BLOCK);
    assert_eq!(l.region_at(block, bit), regions - 1);
    assert_eq!(l.region_bytes(regions - 1).end, l.dev_size);

    let offset = x % l.dev_size;
    let len = y % (l.dev_size - offset + 1);
    let range = l.regions_of(offset, len);
    let touches = |r: u64| {
        let b = l.region_bytes(r);
        len > 0 && b.start < offset + len && offset < b.end
    };
    if len == 0 {
        assert!(range.is_empty());
    } else {
        assert!(!range.is_empty() && touches(range.start) && touches(range.end - 1));
        assert!(range.start == 0 || !touches(range.start - 1));
        assert!(!touches(range.end));
    }
}

/// The child of the `compress_image` fuzzer: small, so every input is cheap.
pub const COMPRESS_CHILD: u64 = 128 << 10;
/// The logical size of its base image.
const COMPRESS_SIZE: u64 = 64 << 10;

/// `compress_image`: arbitrary bytes as a compressed image's child. Checking it
/// ([`crate::compress::check`]) and opening it never panic; an image that checks clean
/// opens and reads back without error; an image that opens serves requests — what it
/// writes and flushes reads back, also after it is opened again.
///
/// The first byte steers. Bit 0 set: the rest of the input is the child's first bytes (the
/// rest of the child zero). Clear: the rest is patches over a base image that has zstd,
/// lz4, raw and zero blocks, a checkpoint, a journal and an uncommitted write — each patch
/// a 2-byte offset in units of 2 bytes, a length byte, and that many bytes to write there.
/// Bit 1 reseals every checksum afterwards, so changed structures reach the checks behind
/// their checksums. Bits 2..8 pick the block the requests write.
pub fn compress_image(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut image = vec![0u8; COMPRESS_CHILD as usize];
    if mode & 1 != 0 {
        let n = rest.len().min(image.len());
        image[..n].copy_from_slice(&rest[..n]);
    } else {
        image.copy_from_slice(base_image());
        let mut patches = rest;
        while let [lo, hi, len, tail @ ..] = patches {
            let at = usize::from(u16::from_le_bytes([*lo, *hi])) * 2;
            let n = usize::from(*len).min(tail.len()).min(image.len() - at);
            image[at..at + n].copy_from_slice(&tail[..n]);
            patches = &tail[n.min(tail.len())..];
            if n < usize::from(*len) {
                break;
            }
        }
    }
    if mode & 2 != 0 {
        for at in (0..image.len()).step_by(cformat::GRAIN as usize) {
            cformat::reseal(&mut image[at..]);
        }
    }
    let ram = Ram::new(COMPRESS_CHILD).expect("memfd");
    ram.write_at(0, &image).expect("the image fits the child");
    let child: BoxTarget = Arc::new(ram.clone());
    let report = crate::compress::check(&child).expect("a RAM child reads");
    let opened = Compress::open(Arc::clone(&child), &CompressOptions::default());
    let c = match opened {
        Ok(c) => c,
        Err(e) => {
            assert!(
                !report.is_clean(),
                "checks clean but does not open: {e}\n{report}"
            );
            return;
        }
    };
    let size = c.handle().logical_bytes();
    let geo = Geometry {
        size,
        logical_block_size: 512,
        max_io: 128 << 10,
    };
    let blocks = size / 4096;
    let mut q = SimQueue::new(&c, geo, 8).expect("simulated queue");
    for lba in (0..blocks.min(32)).chain(blocks.saturating_sub(4)..blocks) {
        let read = q.read(lba * 4096, 4096);
        assert!(
            read.is_ok() || !report.is_clean(),
            "block {lba} of a clean image fails to read: {read:?}"
        );
    }
    let lba = u64::from(mode >> 2) % blocks;
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 ^ mode).collect();
    let flushed =
        q.write(lba * 4096, &block) == Ok(4096) && q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0) == Ok(0);
    if flushed {
        assert_eq!(q.read(lba * 4096, 4096).as_deref(), Ok(&block[..]));
    }
    let _ = q.op(
        sys::UBLK_IO_OP_DISCARD,
        0,
        ((lba + 1) % blocks) * 4096,
        4096,
    );
    let _ = q.write(512, &block[..1024]);
    let _ = q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0);
    drop(q);
    drop(c);
    let again = Compress::open(child, &CompressOptions::default());
    let c = match again {
        Ok(c) => c,
        Err(e) => panic!("an image this build opened and flushed does not reopen: {e}"),
    };
    if flushed && lba != 0 && lba != (lba + 1) % blocks {
        let mut q = SimQueue::new(&c, geo, 8).expect("simulated queue");
        assert_eq!(q.read(lba * 4096, 4096).as_deref(), Ok(&block[..]));
    }
}

/// The base image of `compress_image`, made once: see there.
fn base_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let ram = Ram::new(COMPRESS_CHILD).expect("memfd");
        let geo = Geometry {
            size: COMPRESS_SIZE,
            logical_block_size: 512,
            max_io: 128 << 10,
        };
        let text: Vec<u8> = (0..8 * 4096u32)
            .map(|i| b"compressed image "[(i % 17) as usize] ^ (i / 4096) as u8)
            .collect();
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let open = |size, algo| {
            let child: BoxTarget = Arc::new(ram.clone());
            let opts = CompressOptions {
                size,
                algo,
                workers: 0,
            };
            Compress::open(child, &opts).expect("the base image opens")
        };
        {
            let c = open(Some(COMPRESS_SIZE), Some(Algo::Zstd(3)));
            let mut q = SimQueue::new(&c, geo, 8).expect("simulated queue");
            assert_eq!(q.write(0, &text[..4 * 4096]), Ok(4 * 4096));
            assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
        }
        {
            let c = open(None, Some(Algo::Lz4));
            let mut q = SimQueue::new(&c, geo, 8).expect("simulated queue");
            assert_eq!(q.write(4 * 4096, &text[4 * 4096..]), Ok(4 * 4096));
            assert_eq!(q.write(8 * 4096, &noise), Ok(4096));
            assert_eq!(q.write(2 * 4096, &noise), Ok(4096));
            assert_eq!(q.op(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
            assert_eq!(q.write(12 * 4096, &text[..4096]), Ok(4096));
        }
        let mut image = vec![0u8; COMPRESS_CHILD as usize];
        ram.read_at(0, &mut image).expect("read the base image");
        image
    })
}
