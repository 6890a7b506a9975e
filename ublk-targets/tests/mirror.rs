//! The mirror on the simulated queue, with RAM legs whose bytes the test reads directly:
//! writes reach every leg, a failed leg is left out, a replaced leg is rebuilt, and assembly
//! resyncs exactly the regions whose bits were set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ublk_core::sim::SimQueue;
use ublk_core::Geometry;
use ublk_targets::mirror::meta::LegState;
use ublk_targets::mirror::{Assembly, Mirror, MirrorHandle, MirrorOptions};
use ublk_targets::ram::Ram;
use ublk_zc::{BoxTarget, Target};

const LEG: u64 = 8 << 20;
const REGION: u64 = 64 << 10;

fn ram() -> Ram {
    Ram::new(LEG).expect("memfd")
}

fn legs(rams: &[Ram]) -> Vec<(BoxTarget, String)> {
    rams.iter()
        .enumerate()
        .map(|(i, r)| (Arc::new(r.clone()) as BoxTarget, format!("ram{i}")))
        .collect()
}

fn opts() -> MirrorOptions {
    MirrorOptions {
        region: Some(REGION),
        ..MirrorOptions::default()
    }
}

/// A new mirror over `legs` whose legs are taken as equal (no initial sync).
fn clean_mirror(legs: Vec<(BoxTarget, String)>) -> Mirror {
    let opts = MirrorOptions {
        assume_clean: true,
        ..opts()
    };
    Mirror::assemble(legs, &opts).expect("new mirror")
}

fn geo(m: &Mirror) -> Geometry {
    Geometry {
        size: m.size().expect("a mirror knows its size"),
        logical_block_size: 512,
        max_io: 128 << 10,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

/// A leg's data area.
fn data_area(r: &Ram, h: &MirrorHandle) -> Vec<u8> {
    let l = h.layout();
    let mut buf = vec![0; l.dev_size as usize];
    r.read_at(l.data_offset, &mut buf).expect("read leg");
    buf
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn new_mirror_syncs_then_writes_reach_every_leg() {
    let rams = [ram(), ram()];
    rams[0].write_at(1 << 20, &[7u8; 4096]).expect("seed leg 0");
    let m = Mirror::assemble(legs(&rams), &opts()).expect("new mirror");
    assert_eq!(m.assembly(), &Assembly::New);
    let h = m.handle();
    // The initial sync copies leg 0 to leg 1.
    wait_until("the initial sync", || {
        h.leg_state(1) == Some(LegState::InSync)
    });
    assert_eq!(data_area(&rams[0], &h), data_area(&rams[1], &h));
    let mut q = SimQueue::new(&m, geo(&m), 8).expect("sim queue");
    for (i, off) in [0u64, 4096, 3 * REGION - 4096, 5 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u8, 8192);
        assert_eq!(q.write(off, &data), Ok(8192));
        assert_eq!(q.read(off, 8192).expect("read back"), data);
    }
    assert_eq!(data_area(&rams[0], &h), data_area(&rams[1], &h));
    let status = h.status();
    assert_eq!(status["state"], "clean");
    assert!(status["dirty_regions"].as_u64().unwrap() >= 4, "{status}");
    // Idle and in sync on both legs: the bits are cleared, on the legs too.
    wait_until("the bits to clear", || h.status()["dirty_regions"] == 0);
    drop(q);
    drop(m);
    let again = Mirror::assemble(legs(&rams), &opts()).expect("reassemble");
    assert_eq!(
        again.assembly(),
        &Assembly::Existing {
            resync_regions: 0,
            rebuilding: 0
        }
    );
}

#[test]
fn failed_leg_is_left_out_and_a_replacement_is_rebuilt() {
    let rams = [ram(), ram()];
    let m = clean_mirror(legs(&rams));
    let h = m.handle();
    let mut q = SimQueue::new(&m, geo(&m), 8).expect("sim queue");
    assert_eq!(q.write(0, &pattern(1, 4096)), Ok(4096));
    h.fail(1).expect("fail leg 1");
    assert!(h.fail(0).is_err(), "the last in-sync leg cannot be failed");
    assert_eq!(h.status()["state"], "degraded");
    let data = pattern(2, 65536);
    assert_eq!(q.write(REGION, &data), Ok(65536));
    assert_eq!(q.read(REGION, 65536).expect("degraded read"), data);
    assert_ne!(data_area(&rams[0], &h), data_area(&rams[1], &h));
    let fresh = ram();
    h.replace(1, Arc::new(fresh.clone()), "fresh".into())
        .expect("replace leg 1");
    assert!(
        h.replace(0, Arc::new(ram()), "x".into()).is_err(),
        "an in-sync leg cannot be replaced"
    );
    // Writes during the rebuild, before and after it passes them.
    for i in 0..20u64 {
        let off = (i * 397 * 4096) % (h.layout().dev_size - 8192);
        let off = off - off % 4096;
        assert_eq!(q.write(off, &pattern(i as u8, 8192)), Ok(8192));
    }
    wait_until("the rebuild", || h.leg_state(1) == Some(LegState::InSync));
    assert_eq!(data_area(&rams[0], &h), data_area(&fresh, &h));
    assert_eq!(h.status()["state"], "clean");
}

#[test]
fn reassembly_resyncs_dirty_regions_only_and_refuses_foreign_legs() {
    let rams = [ram(), ram()];
    let m = clean_mirror(legs(&rams));
    let h = m.handle();
    {
        let mut q = SimQueue::new(&m, geo(&m), 8).expect("sim queue");
        for r in [1u64, 5, 9] {
            assert_eq!(q.write(r * REGION, &pattern(r as u8, 4096)), Ok(4096));
        }
    }
    // A crash: the legs as they are now, with bits set, on copies; one differs in region 5.
    let copies = [ram(), ram()];
    let mut buf = vec![0; LEG as usize];
    for (r, c) in rams.iter().zip(&copies) {
        r.read_at(0, &mut buf).expect("read leg");
        c.write_at(0, &buf).expect("copy leg");
    }
    let off = h.layout().data_offset + 5 * REGION;
    copies[1]
        .write_at(off, &[0xee; 4096])
        .expect("make legs differ");
    drop(m);
    let m2 = Mirror::assemble(legs(&copies), &opts()).expect("reassemble");
    assert_eq!(
        m2.assembly(),
        &Assembly::Existing {
            resync_regions: 3,
            rebuilding: 0
        }
    );
    let h2 = m2.handle();
    wait_until("the resync", || h2.status()["resync"]["regions_left"] == 0);
    assert_eq!(h2.copied().0, 3 * REGION);
    assert_eq!(data_area(&copies[0], &h2), data_area(&copies[1], &h2));
    drop(m2);
    // A clean stop cleared every bit: nothing to resync.
    let m3 = Mirror::assemble(legs(&copies), &opts()).expect("reassemble clean");
    assert_eq!(
        m3.assembly(),
        &Assembly::Existing {
            resync_regions: 0,
            rebuilding: 0
        }
    );
    drop(m3);
    // A leg of another mirror is refused, unless a new mirror is asked for.
    let other = [ram(), ram()];
    drop(Mirror::assemble(legs(&other), &opts()).expect("another mirror"));
    let mixed = [copies[0].clone(), other[1].clone()];
    let e = Mirror::assemble(legs(&mixed), &opts()).expect_err("foreign leg");
    assert!(e.0.contains("another mirror"), "{e}");
    let forced = MirrorOptions {
        force_new: true,
        ..opts()
    };
    Mirror::assemble(legs(&mixed), &forced).expect("force_new");
}

#[test]
fn damaged_superblock_is_refused_with_the_leg_named() {
    let rams = [ram(), ram()];
    drop(Mirror::assemble(legs(&rams), &opts()).expect("new mirror"));
    rams[1].write_at(100, &[0xff; 8]).expect("damage");
    let e = Mirror::assemble(legs(&rams), &opts()).expect_err("damaged");
    assert!(e.0.starts_with("leg 1 (ram1)"), "{e}");
    assert!(e.0.contains("--force-new"), "{e}");
}

#[test]
fn read_errors_are_served_by_another_leg_and_repaired() {
    use std::time::Duration as D;
    use ublk_targets::faulty::{FaultOps, FaultRule, Faulty};
    let rams = [ram(), ram()];
    let faulty = Faulty::new(Arc::new(rams[1].clone()), None);
    let switch = faulty.switch();
    let legs: Vec<(BoxTarget, String)> = vec![
        (Arc::new(rams[0].clone()), "ram0".into()),
        (Arc::new(faulty), "faulty".into()),
    ];
    let m = clean_mirror(legs);
    let h = m.handle();
    let mut q = SimQueue::new(&m, geo(&m), 8).expect("sim queue");
    let data = pattern(9, 65536);
    assert_eq!(q.write(0, &data), Ok(65536));
    // Leg 1 now fails reads of its first data region (leg offsets).
    let off = h.layout().data_offset;
    switch.set(Some(FaultRule {
        ops: FaultOps::Read,
        range: Some((off, REGION)),
        every: 1,
        fail: true,
        delay: D::ZERO,
    }));
    // Reads alternate between legs; every one returns the data.
    for _ in 0..8 {
        assert_eq!(q.read(0, 4096).expect("read"), data[..4096]);
    }
    wait_until("a repair", || {
        h.status()["repaired_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(h.leg_state(1), Some(LegState::InSync));
    // A leg that keeps failing reads is failed after 20 repairs; reads still succeed.
    for _ in 0..200 {
        assert_eq!(q.read(0, 4096).expect("read"), data[..4096]);
        if h.leg_state(1) == Some(LegState::Faulty) {
            break;
        }
    }
    assert_eq!(h.leg_state(1), Some(LegState::Faulty));
}

#[test]
fn a_rebuild_resumes_where_it_stopped() {
    let rams = [ram(), ram()];
    let m = clean_mirror(legs(&rams));
    let h = m.handle();
    h.fail(1).expect("fail leg 1");
    h.set_rate(2 << 20);
    h.replace(1, Arc::new(rams[1].clone()), "ram1".into())
        .expect("replace leg 1 with itself");
    wait_until("some progress", || {
        h.leg_json(1)["rebuild"]["done_bytes"].as_u64().unwrap_or(0) >= 2 * REGION
    });
    drop(m);
    // The clean stop saved the progress in the superblocks.
    let mut block = vec![0; ublk_targets::mirror::meta::BLOCK];
    rams[0].read_at(0, &mut block).expect("read superblock");
    let sb = ublk_targets::mirror::meta::Superblock::decode(&block).expect("superblock");
    assert_eq!(sb.legs[1].state, LegState::Rebuilding);
    let resumed_at = sb.legs[1].rebuild_offset;
    assert!(resumed_at >= 2 * REGION, "{resumed_at}");
    let m2 = Mirror::assemble(legs(&rams), &opts()).expect("reassemble");
    assert_eq!(
        m2.assembly(),
        &Assembly::Existing {
            resync_regions: 0,
            rebuilding: 1
        }
    );
    let h2 = m2.handle();
    wait_until("the rebuild", || h2.leg_state(1) == Some(LegState::InSync));
    let copied = h2.copied().1;
    let total = h2.layout().dev_size;
    assert_eq!(copied, total - resumed_at, "only the rest is copied");
}

#[test]
fn writes_fail_instead_of_hanging_when_no_leg_takes_the_bitmap() {
    use ublk_targets::faulty::{FaultOps, FaultRule, Faulty};
    let rams = [ram(), ram()];
    let f0 = Faulty::new(Arc::new(rams[0].clone()), None);
    let f1 = Faulty::new(Arc::new(rams[1].clone()), None);
    let (s0, s1) = (f0.switch(), f1.switch());
    let legs: Vec<(BoxTarget, String)> =
        vec![(Arc::new(f0), "leg0".into()), (Arc::new(f1), "leg1".into())];
    let m = clean_mirror(legs);
    let h = m.handle();
    let mut q = SimQueue::new(&m, geo(&m), 8).expect("sim queue");
    let fail_writes = Some(FaultRule {
        ops: FaultOps::Write,
        range: None,
        every: 1,
        fail: true,
        delay: Duration::ZERO,
    });
    s0.set(fail_writes);
    s1.set(fail_writes);
    assert_eq!(q.write(0, &pattern(1, 4096)), Err(-libc::EIO));
    // One leg was failed; the other, the last in sync, stays.
    let kept = (0..2)
        .find(|&i| h.leg_state(i) == Some(LegState::InSync))
        .expect("the last leg stays in sync");
    assert_eq!(h.leg_state(1 - kept), Some(LegState::Faulty));
    [&s0, &s1][kept].set(None);
    wait_until("the bitmap to be written", || {
        q.write(0, &pattern(2, 4096)) == Ok(4096)
    });
    assert_eq!(q.read(0, 4096).expect("read"), pattern(2, 4096));
}

#[test]
fn direct_access_writes_every_leg_with_its_bits_set() {
    let rams = [ram(), ram()];
    let m = clean_mirror(legs(&rams));
    let h = m.handle();
    let data = pattern(5, 8192);
    m.write_at(3 * REGION - 4096, &data).expect("direct write");
    let mut back = vec![0; 8192];
    m.read_at(3 * REGION - 4096, &mut back)
        .expect("direct read");
    assert_eq!(back, data);
    assert_eq!(data_area(&rams[0], &h), data_area(&rams[1], &h));
    assert_eq!(h.status()["dirty_regions"], 2);
    assert!(
        m.write_at(h.layout().dev_size - 4096, &data).is_err(),
        "past the end"
    );
}

#[test]
fn initial_sync_copies_large_regions_piece_by_piece() {
    let rams = [ram(), ram(), ram()];
    // Past the metadata area (1 MiB for these legs), so leg 0 is still blank.
    for (i, chunk) in (1 << 20..LEG).step_by(1 << 20).enumerate() {
        rams[0]
            .write_at(chunk, &pattern(i as u8, 1 << 20))
            .expect("seed leg 0");
    }
    let m = Mirror::assemble(
        legs(&rams),
        &MirrorOptions {
            region: Some(4 << 20),
            ..MirrorOptions::default()
        },
    )
    .expect("new mirror");
    let h = m.handle();
    wait_until("the initial sync", || {
        (1..3).all(|i| h.leg_state(i) == Some(LegState::InSync))
    });
    let first = data_area(&rams[0], &h);
    for (leg, r) in rams.iter().enumerate().skip(1) {
        let other = data_area(r, &h);
        let differs = first.iter().zip(&other).position(|(a, b)| a != b);
        assert_eq!(differs, None, "leg {leg} differs from leg 0 at this byte");
    }
    assert_eq!(h.copied().1, h.layout().dev_size);
}
