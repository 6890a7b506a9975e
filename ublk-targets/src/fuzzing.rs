//! The bodies of the fuzz targets under `fuzz/`, kept here so that `cargo test` can replay
//! their corpora on stable Rust (see `tests/fuzz_corpus.rs`).

use ublk_core::check::{
    check_request_stream, check_request_stream_in, check_request_stream_with, Semantics,
};
use ublk_core::params::{max_queues, DeviceParams, MAX_DEPTH, MAX_IO_BYTES};
use ublk_core::BufferMode;
use ublk_core::{parse_size, Geometry};

use std::sync::Arc;

use ublk_zc::BoxTarget;

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
    check_request_stream(compress_over_ram(geo), geo, Semantics::STORES_DATA, rest);
}

/// A new compressed image over RAM with room for the logical size stored raw and a little
/// more, so overwrites without flushes exercise the wait for space to come back.
fn compress_over_ram(geo: Geometry) -> impl FnOnce() -> Compress {
    move || {
        let child: BoxTarget = Arc::new(Ram::new(geo.size * 2).expect("memfd"));
        let opts = CompressOptions {
            size: Some(geo.size),
            algo: None,
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
