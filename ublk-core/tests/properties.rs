//! Property tests of the pure logic: sector/byte conversion and request checks, tag buffer
//! slicing, size parsing, and parameter conversion.

use proptest::prelude::*;
use ublk_core::buf::TagArena;
use ublk_core::io::{Geometry, IoDesc, Op, SECTOR_SIZE};
use ublk_core::mmap::round_up;
use ublk_core::{parse_size, DeviceParams};

fn geometry() -> impl Strategy<Value = Geometry> {
    (1u64..1 << 40, 0u32..4, 1u32..=64).prop_map(|(blocks, lbs_shift, max_pages)| {
        let lbs = 512u32 << lbs_shift;
        Geometry {
            size: blocks * u64::from(lbs),
            logical_block_size: lbs,
            max_io: max_pages * 4096,
        }
    })
}

proptest! {
    #[test]
    fn accepted_requests_lie_inside_the_device(
        geo in geometry(),
        op in 0u8..6,
        flags in any::<u32>(),
        start in any::<u64>(),
        n in any::<u32>(),
    ) {
        let desc = IoDesc {
            op_flags: u32::from(op) | (flags & !0xff),
            nr_sectors: n,
            start_sector: start,
            addr: 0,
        };
        match desc.decode(&geo) {
            Ok(io) if io.op == Op::Flush => prop_assert_eq!(io.len, 0),
            Ok(io) => {
                prop_assert_eq!(io.offset, start * SECTOR_SIZE);
                prop_assert_eq!(u64::from(io.len), u64::from(n) * SECTOR_SIZE);
                prop_assert!(io.offset + u64::from(io.len) <= geo.size);
                if matches!(io.op, Op::Read | Op::Write) {
                    prop_assert!(io.len <= geo.max_io);
                    prop_assert_eq!(io.offset % u64::from(geo.logical_block_size), 0);
                    prop_assert_eq!(io.len % geo.logical_block_size, 0);
                }
                prop_assert_eq!(io.flags.0, flags & !0xff);
            }
            Err(e) => prop_assert!(e == -libc::EINVAL || e == -libc::EOPNOTSUPP),
        }
    }

    #[test]
    fn every_in_range_block_aligned_request_is_accepted(
        geo in geometry(),
        write in any::<bool>(),
        block in any::<u64>(),
        blocks in 1u32..64,
    ) {
        let lbs = u64::from(geo.logical_block_size);
        let len = (u64::from(blocks) * lbs)
            .min(u64::from(geo.max_io) / lbs * lbs)
            .min(geo.size);
        prop_assume!(len > 0);
        let offset = block % (geo.size / lbs) * lbs;
        let offset = offset.min(geo.size - len) / lbs * lbs;
        let desc = IoDesc {
            op_flags: u32::from(write),
            nr_sectors: (len / SECTOR_SIZE) as u32,
            start_sector: offset / SECTOR_SIZE,
            addr: 0,
        };
        let io = desc.decode(&geo).expect("in-range aligned request");
        prop_assert_eq!((io.offset, u64::from(io.len)), (offset, len));
    }

    #[test]
    fn tag_buffers_are_disjoint_aligned_and_big_enough(
        depth in 1u16..64,
        max_io in 1u32..(1 << 20),
    ) {
        let arena = TagArena::new(depth, max_io).expect("arena");
        prop_assert!(arena.buf_len() >= max_io as usize);
        prop_assert_eq!(arena.buf_len() % 4096, 0);
        for tag in 0..depth {
            let p = arena.buf_ptr(tag).expect("tag < depth") as usize;
            prop_assert_eq!(p % 4096, 0);
            if tag > 0 {
                let prev = arena.buf_ptr(tag - 1).expect("tag < depth") as usize;
                prop_assert_eq!(p - prev, arena.buf_len());
            }
        }
        prop_assert!(arena.buf_ptr(depth).is_none());
    }

    #[test]
    fn round_up_is_the_least_multiple(n in 0usize..(1 << 40), shift in 0u32..20) {
        let align = 1usize << shift;
        let r = round_up(n, align).expect("no overflow");
        prop_assert!(r >= n && r % align == 0 && r - n < align);
    }

    #[test]
    fn sizes_parse_to_number_times_unit(n in 0u64..(1 << 20), unit in 0usize..5) {
        let (suffix, mult) =
            [("", 1u64), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)][unit];
        prop_assert_eq!(parse_size(&format!("{n}{suffix}")).ok(), Some(n * mult));
    }

    #[test]
    fn valid_params_convert_faithfully(
        blocks in 1u64..(1 << 30),
        lbs_shift in 0u32..4,
        pages in 1u32..=8192,
    ) {
        let lbs = 512u32 << lbs_shift;
        let p = DeviceParams {
            size: blocks * u64::from(lbs),
            logical_block_size: lbs,
            physical_block_size: lbs.max(4096),
            max_io: pages * 4096,
            ..Default::default()
        };
        prop_assert!(p.validate().is_ok());
        let s = p.to_sys();
        prop_assert_eq!(s.basic.dev_sectors * 512, p.size);
        prop_assert_eq!(1u32 << s.basic.logical_bs_shift, lbs);
        prop_assert_eq!(s.basic.max_sectors * 512, p.max_io);
    }
}
