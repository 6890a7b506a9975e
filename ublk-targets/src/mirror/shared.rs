//! What every queue of a mirror shares, and the mirror's own thread.
//!
//! The queues serve requests; the thread ("the daemon", as md calls its own) does everything
//! else, with direct (synchronous) access to the legs: it makes bitmap bits and superblocks
//! durable, copies regions for a rebuild or a resync, and clears bits of regions that have
//! been idle and in sync on every leg.
//!
//! Queues and the daemon meet in atomics, one set per region:
//! - `state`: clean, pending (its bit is set in memory, the bitmap block is being written) or
//!   dirty (the bit is durable on the legs). A write goes ahead only into dirty regions.
//! - `inflight`: writes in flight. A write adds itself *before* it looks at `syncing`; the
//!   daemon sets `syncing` *before* it looks at `inflight` (all `SeqCst`), so either the write
//!   sees the region being copied and waits, or the daemon sees the write and waits for it:
//!   a copy never overwrites a newer write.
//! - `touched`: written since the last cleaning pass.
//! - `resync`: the legs may differ here (dirty at assembly after an unclean stop); reads go to
//!   the source leg only until the region is copied.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
use ublk_zc::{Bounce, BoxTarget, Notifier};

use super::meta::{
    encode_bitmap_block, Layout, LegRecord, LegState, Superblock, BITMAP_HEADER, BITS_PER_BLOCK,
    BLOCK,
};

/// A region's bit is clear on disk.
pub(crate) const CLEAN: u8 = 0;
/// Its bit is set in memory; the bitmap block is being made durable.
pub(crate) const PENDING: u8 = 1;
/// Its bit is durable: writes may go ahead.
pub(crate) const DIRTY: u8 = 2;

/// `syncing` when no region is being copied.
pub(crate) const NONE: u64 = u64::MAX;

/// The token of a wake-up from the daemon to a queue.
pub(crate) const WAKE: u64 = u64::MAX;

/// Bytes copied per step of a rebuild or resync (at most; a step ends with its region).
const STEP: u64 = 4 << 20;
/// Bytes per read or write of a copy: the reads of a step run ahead of its writes, one piece
/// apart.
const PIECE: usize = 256 << 10;
/// How often idle dirty regions are looked for.
const CLEAN_EVERY: Duration = Duration::from_secs(2);
/// How often a rebuild's progress is saved in the superblocks.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// One region's state (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Region {
    pub(crate) state: AtomicU8,
    pub(crate) inflight: AtomicU32,
    pub(crate) touched: AtomicBool,
    pub(crate) resync: AtomicBool,
}

/// One leg.
pub(crate) struct Leg {
    pub(crate) state: AtomicU8,
    /// For a rebuilding leg: bytes of the data area copied so far (a region boundary).
    pub(crate) cursor: AtomicU64,
    /// Bumped when the leg's target is replaced; queues open the new one when they see it.
    pub(crate) generation: AtomicU64,
    pub(crate) target: Mutex<BoxTarget>,
    /// What the leg is (`file:/dev/sdb`), for messages.
    pub(crate) name: Mutex<String>,
    /// Read errors repaired since the leg joined; past [`MAX_READ_ERRORS`] it is failed.
    pub(crate) read_errors: AtomicU32,
}

/// Read errors a leg may have repaired before it is failed (md's default for
/// `max_corrected_read_errors`).
pub(crate) const MAX_READ_ERRORS: u32 = 20;

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leg")
            .field("name", &self.name())
            .field("state", &self.state())
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl Leg {
    pub(crate) fn state(&self) -> LegState {
        LegState::from_u32(u32::from(self.state.load(Acquire))).unwrap_or(LegState::Missing)
    }

    fn set_state(&self, state: LegState) {
        self.state.store(state.to_u32() as u8, Release);
    }

    /// Whether the leg holds device bytes up to `end`: in sync, or rebuilt past `end`.
    pub(crate) fn holds(&self, end: u64) -> bool {
        match self.state() {
            LegState::InSync => true,
            LegState::Rebuilding => end <= self.cursor.load(SeqCst),
            _ => false,
        }
    }

    pub(crate) fn target(&self) -> BoxTarget {
        lock(&self.target).clone()
    }

    pub(crate) fn name(&self) -> String {
        lock(&self.name).clone()
    }
}

/// Metadata bookkeeping, under the mutex.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) events: u64,
    /// Per bitmap block: the generation wanted and the one durable.
    want: Vec<u64>,
    durable: Vec<u64>,
    /// Regions marked pending, promoted to dirty once their block is durable.
    pending: Vec<u64>,
    /// Superblock generations (event counts) wanted and durable.
    sb_want: u64,
    /// The last error the daemon met, for `status`.
    pub(crate) last_error: Option<String>,
    /// The rebuild rate limit in bytes per second (0: none).
    pub(crate) rate: u64,
}

/// The state shared by the queues, the daemon and the control socket.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) layout: Layout,
    pub(crate) uuid: [u8; 16],
    pub(crate) legs: Vec<Leg>,
    pub(crate) regions: Vec<Region>,
    pub(crate) syncing: AtomicU64,
    pub(crate) sb_durable: AtomicU64,
    /// Bumped when any leg's target is replaced.
    pub(crate) generation: AtomicU64,
    pub(crate) meta: Mutex<Meta>,
    wake: Condvar,
    notifiers: Mutex<Vec<Notifier>>,
    stop: AtomicBool,
    /// Regions flagged `resync`.
    pub(crate) resync_left: AtomicU64,
    /// Bytes copied by resyncs and by rebuilds since the mirror was assembled.
    pub(crate) resync_bytes: AtomicU64,
    pub(crate) rebuild_bytes: AtomicU64,
    /// Ranges a leg failed to read, to rewrite there from another leg: `(leg, start, end)`.
    repairs: Mutex<Vec<(usize, u64, u64)>>,
    /// Bytes rewritten by repairs.
    pub(crate) repaired_bytes: AtomicU64,
    /// The bitmap could not be written to any in-sync leg.
    pub(crate) broken: AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A leg's error as `why` for messages.
fn leg_err(op: &str, leg: usize, name: &str, e: &std::io::Error) -> String {
    format!("{op} on leg {leg} ({name}): {e}")
}

impl Shared {
    pub(crate) fn new(
        layout: Layout,
        uuid: [u8; 16],
        events: u64,
        legs: Vec<(BoxTarget, String, LegRecord)>,
    ) -> Self {
        let regions = (0..layout.regions()).map(|_| Region::default()).collect();
        let blocks = layout.bitmap_blocks as usize;
        Shared {
            layout,
            uuid,
            legs: legs
                .into_iter()
                .map(|(target, name, rec)| Leg {
                    state: AtomicU8::new(rec.state.to_u32() as u8),
                    cursor: AtomicU64::new(rec.rebuild_offset),
                    generation: AtomicU64::new(0),
                    target: Mutex::new(target),
                    name: Mutex::new(name),
                    read_errors: AtomicU32::new(0),
                })
                .collect(),
            regions,
            syncing: AtomicU64::new(NONE),
            sb_durable: AtomicU64::new(events),
            generation: AtomicU64::new(0),
            meta: Mutex::new(Meta {
                events,
                want: vec![0; blocks],
                durable: vec![0; blocks],
                pending: Vec::new(),
                sb_want: events,
                last_error: None,
                rate: 0,
            }),
            wake: Condvar::new(),
            notifiers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            resync_left: AtomicU64::new(0),
            resync_bytes: AtomicU64::new(0),
            rebuild_bytes: AtomicU64::new(0),
            repairs: Mutex::new(Vec::new()),
            repaired_bytes: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        }
    }

    /// A queue's notifier, so the daemon can wake its parked writes.
    pub(crate) fn register(&self, n: Notifier) {
        lock(&self.notifiers).push(n);
    }

    fn notify_queues(&self) {
        for n in lock(&self.notifiers).iter() {
            n.notify(WAKE, 0);
        }
    }

    /// Wakes the daemon.
    pub(crate) fn kick(&self) {
        self.wake.notify_all();
    }

    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Release);
        let _guard = lock(&self.meta);
        self.wake.notify_all();
    }

    pub(crate) fn in_sync(&self) -> usize {
        self.legs
            .iter()
            .filter(|l| l.state() == LegState::InSync)
            .count()
    }

    /// The leg reads of regions being resynced go to, and copies come from.
    pub(crate) fn source(&self) -> Option<usize> {
        self.legs.iter().position(|l| l.state() == LegState::InSync)
    }

    /// Marks leg `i` faulty, unless it is the last in-sync leg. Returns the superblock
    /// generation that records the failure (a write waits for it to be durable before it is
    /// acknowledged), or `None` when the leg was kept.
    pub(crate) fn fail_leg(&self, i: usize, why: &str) -> Option<u64> {
        let mut meta = lock(&self.meta);
        let leg = &self.legs[i];
        match leg.state() {
            LegState::Faulty | LegState::Missing => return Some(meta.sb_want),
            LegState::InSync if self.in_sync() <= 1 => {
                tracing::error!("mirror: {why}; leg {i} is the last in-sync leg and stays");
                meta.last_error = Some(format!("{why} (last in-sync leg, kept)"));
                return None;
            }
            _ => {}
        }
        tracing::error!("mirror: leg {i} ({}) failed: {why}", leg.name());
        leg.set_state(LegState::Faulty);
        meta.last_error = Some(why.to_string());
        Some(self.bump_events(&mut meta))
    }

    /// Records a state change: a new superblock generation for the daemon to write.
    fn bump_events(&self, meta: &mut Meta) -> u64 {
        meta.events += 1;
        meta.sb_want = meta.events;
        self.wake.notify_all();
        meta.events
    }

    /// Leg `i` failed to read `[a, b)` (another leg served it): rewrite the range there from
    /// a leg that holds it, or fail the leg when that cannot be done.
    pub(crate) fn repair(&self, i: usize, a: u64, b: u64, why: &str) {
        let differs = self
            .layout
            .regions_of(a, b - a)
            .any(|r| self.regions[r as usize].resync.load(SeqCst));
        // The source of a pending resync is the copy every other leg gets: it cannot be
        // repaired from one of them.
        if self.legs[i].state() != LegState::InSync || differs && self.source() == Some(i) {
            self.fail_leg(i, why);
            return;
        }
        if self.legs[i].read_errors.fetch_add(1, SeqCst) >= MAX_READ_ERRORS {
            self.fail_leg(
                i,
                &format!("{why} ({MAX_READ_ERRORS} read errors repaired)"),
            );
            return;
        }
        tracing::warn!("mirror: {why}; rewriting it from another leg");
        let mut repairs = lock(&self.repairs);
        if repairs.len() >= 64 {
            drop(repairs);
            self.fail_leg(i, &format!("{why} (too many repairs pending)"));
            return;
        }
        repairs.push((i, a, b));
        drop(repairs);
        self.kick();
    }

    /// Asks for the bits of `regions` to be made durable. True when all already are.
    pub(crate) fn mark_dirty(&self, regions: Range<u64>) -> bool {
        let mut meta = lock(&self.meta);
        let mut all = true;
        for r in regions {
            let region = &self.regions[r as usize];
            match region.state.load(SeqCst) {
                DIRTY => {}
                CLEAN => {
                    region.state.store(PENDING, SeqCst);
                    let (block, _) = self.layout.bit_of(r);
                    meta.want[block as usize] += 1;
                    meta.pending.push(r);
                    all = false;
                }
                _ => all = false,
            }
        }
        if !all {
            self.wake.notify_all();
        }
        all
    }

    /// A direct (synchronous, durable) write of `buf` at device byte `offset`, from any
    /// thread but the mirror's own: the same rules as a queue's write — bits durable first,
    /// never into a region being copied, every leg that holds the range, a failed leg failed
    /// durably before the answer.
    pub(crate) fn direct_write(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.layout.dev_size)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "write past the end of the mirror",
                )
            })?;
        let regions = self.layout.regions_of(offset, len);
        let pause = || std::thread::sleep(Duration::from_micros(500));
        loop {
            for r in regions.clone() {
                self.regions[r as usize].inflight.fetch_add(1, SeqCst);
            }
            if self.must_wait(&regions, offset, end) {
                self.release(regions.clone());
                pause();
                continue;
            }
            if self.mark_dirty(regions.clone()) {
                break;
            }
            // Wait for the daemon to make the bits durable, keeping the counts.
            while !regions
                .clone()
                .all(|r| self.regions[r as usize].state.load(SeqCst) == DIRTY)
            {
                if self.broken.load(SeqCst) || self.stop.load(SeqCst) {
                    self.release(regions.clone());
                    return Err(std::io::Error::from_raw_os_error(libc::EIO));
                }
                pause();
            }
            // Re-check the copy window with the counts held.
            self.release(regions.clone());
        }
        let mut ok = false;
        let mut wait_for = 0;
        for (i, leg) in self.legs.iter().enumerate() {
            if !leg.holds(end) {
                continue;
            }
            match leg
                .target()
                .dyn_write_at(self.layout.data_offset + offset, buf)
            {
                Ok(()) => ok |= leg.state() == LegState::InSync,
                Err(e) => {
                    let why = leg_err("write", i, &leg.name(), &e);
                    if let Some(g) = self.fail_leg(i, &why) {
                        wait_for = wait_for.max(g);
                    }
                }
            }
        }
        for r in regions.clone() {
            self.regions[r as usize].touched.store(true, Relaxed);
        }
        self.release(regions);
        while self.sb_durable.load(SeqCst) < wait_for && !self.stop.load(SeqCst) {
            pause();
        }
        if ok {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        }
    }

    /// Whether a write of `[a, b)`, its regions' counts taken, must wait: its region is being
    /// copied, or a rebuild cursor lies inside it (the leg holds part of it and not the rest).
    pub(crate) fn must_wait(&self, regions: &Range<u64>, a: u64, b: u64) -> bool {
        let syncing = self.syncing.load(SeqCst);
        if syncing != NONE && regions.contains(&syncing) {
            return true;
        }
        self.legs.iter().any(|leg| {
            leg.state() == LegState::Rebuilding && {
                let c = leg.cursor.load(SeqCst);
                a < c && c < b
            }
        })
    }

    /// Gives back the in-flight counts of `regions`.
    pub(crate) fn release(&self, regions: Range<u64>) {
        for r in regions {
            self.regions[r as usize].inflight.fetch_sub(1, SeqCst);
        }
    }

    /// Puts `target` in leg `i`'s place, to be rebuilt from the start.
    pub(crate) fn replace(&self, i: usize, target: BoxTarget, name: String) {
        let mut meta = lock(&self.meta);
        let leg = &self.legs[i];
        *lock(&leg.target) = target;
        *lock(&leg.name) = name;
        leg.cursor.store(0, SeqCst);
        leg.read_errors.store(0, SeqCst);
        leg.set_state(LegState::Rebuilding);
        leg.generation.fetch_add(1, SeqCst);
        self.generation.fetch_add(1, SeqCst);
        meta.last_error = None;
        self.bump_events(&mut meta);
    }

    /// The superblock of leg `leg` as the mirror stands.
    pub(crate) fn superblock(&self, leg: usize, events: u64) -> Superblock {
        Superblock {
            uuid: self.uuid,
            leg_index: leg as u32,
            events,
            layout: self.layout,
            legs: self
                .legs
                .iter()
                .map(|l| {
                    let state = l.state();
                    LegRecord {
                        state,
                        rebuild_offset: if state == LegState::Rebuilding {
                            l.cursor.load(SeqCst)
                        } else {
                            0
                        },
                    }
                })
                .collect(),
        }
    }

    /// Legs that receive metadata: in sync or rebuilding.
    fn active_legs(&self) -> Vec<usize> {
        (0..self.legs.len())
            .filter(|&i| {
                matches!(
                    self.legs[i].state(),
                    LegState::InSync | LegState::Rebuilding
                )
            })
            .collect()
    }

    /// The bytes of bitmap block `block` as the regions stand.
    fn bitmap_block(&self, block: u32) -> Vec<u8> {
        let mut bits = vec![0u8; BLOCK - BITMAP_HEADER];
        let first = u64::from(block) * BITS_PER_BLOCK;
        let end = (first + BITS_PER_BLOCK).min(self.layout.regions());
        for r in first..end {
            if self.regions[r as usize].state.load(SeqCst) != CLEAN {
                let bit = r - first;
                bits[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        bits
    }

    /// Writes the bitmap blocks and superblock generations wanted; true when anything became
    /// durable (queues may have writes to let go).
    /// Also says whether a bitmap block reached no in-sync leg.
    fn write_meta(&self) -> (bool, bool) {
        let mut progressed = false;
        let mut failed = false;
        // A leg failing a metadata write asks for another superblock: loop until settled.
        for _ in 0..=self.legs.len() {
            let (blocks, pending, sb) = {
                let mut meta = lock(&self.meta);
                let blocks: Vec<(u32, u64, Vec<u8>)> = (0..meta.want.len())
                    .filter(|&b| meta.want[b] > meta.durable[b])
                    .map(|b| (b as u32, meta.want[b], self.bitmap_block(b as u32)))
                    .collect();
                let pending = std::mem::take(&mut meta.pending);
                let sb = (meta.sb_want > self.sb_durable.load(SeqCst)).then_some(meta.sb_want);
                (blocks, pending, sb)
            };
            if blocks.is_empty() && sb.is_none() {
                lock(&self.meta).pending.extend(pending);
                break;
            }
            let mut ok = true;
            let mut buf = vec![0u8; BLOCK];
            for (block, _, bits) in &blocks {
                let written = encode_bitmap_block(*block, &self.uuid, bits, &mut buf).is_ok()
                    && self.write_all_legs(self.layout.bitmap_block_offset(*block), &buf);
                ok &= written;
            }
            if let Some(events) = sb {
                for i in self.active_legs() {
                    let sb = self.superblock(i, events);
                    if sb.encode(&mut buf).is_err() {
                        ok = false;
                        continue;
                    }
                    self.write_leg(i, 0, &buf);
                }
            }
            let mut meta = lock(&self.meta);
            if ok {
                for (block, generation, _) in &blocks {
                    let b = *block as usize;
                    meta.durable[b] = meta.durable[b].max(*generation);
                }
                for r in pending {
                    let region = &self.regions[r as usize];
                    let (block, _) = self.layout.bit_of(r);
                    if meta.durable[block as usize] >= meta.want[block as usize] {
                        let _ = region
                            .state
                            .compare_exchange(PENDING, DIRTY, SeqCst, SeqCst);
                    } else {
                        meta.pending.push(r);
                    }
                }
                progressed |= !blocks.is_empty();
            } else {
                meta.pending.extend(pending);
            }
            if let Some(events) = sb {
                // Legs that failed their superblock write were failed, which asked for a newer
                // generation; this one is durable on every leg still active.
                self.sb_durable.fetch_max(events, SeqCst);
                progressed = true;
            }
            if !ok {
                failed = true;
                break;
            }
        }
        (progressed, failed)
    }

    /// [`Shared::write_meta`], tracking whether the bitmap can be written at all: when no
    /// in-sync leg takes it, writes into clean regions fail with `EIO` instead of waiting
    /// (the array is broken) until a later attempt succeeds.
    fn write_meta_checked(&self) -> bool {
        // Only a failed write says so: a block asked for after this pass is not stuck.
        let (progressed, stuck) = self.write_meta();
        let was = self.broken.swap(stuck, SeqCst);
        if stuck && !was {
            tracing::error!(
                "mirror: no in-sync leg takes the bitmap: writes to clean regions fail"
            );
        }
        progressed || stuck != was
    }

    /// Writes `buf` at `offset` of every active leg; a leg that fails is failed. True when at
    /// least one in-sync leg has it.
    fn write_all_legs(&self, offset: u64, buf: &[u8]) -> bool {
        let mut any = false;
        for i in self.active_legs() {
            if self.write_leg(i, offset, buf) && self.legs[i].state() == LegState::InSync {
                any = true;
            }
        }
        any
    }

    fn write_leg(&self, i: usize, offset: u64, buf: &[u8]) -> bool {
        let leg = &self.legs[i];
        match leg.target().dyn_write_at(offset, buf) {
            Ok(()) => true,
            Err(e) => {
                let why = leg_err("metadata write", i, &leg.name(), &e);
                self.fail_leg(i, &why);
                false
            }
        }
    }

    /// Clears the bits of regions idle since the last pass, when every leg is in sync.
    fn clean(&self) {
        let all_in_sync = self.legs.iter().all(|l| l.state() == LegState::InSync);
        if !all_in_sync || self.resync_left.load(SeqCst) > 0 || self.syncing.load(SeqCst) != NONE {
            return;
        }
        let mut meta = lock(&self.meta);
        let mut changed = false;
        for (r, region) in self.regions.iter().enumerate() {
            if region.state.load(SeqCst) != DIRTY || region.touched.swap(false, SeqCst) {
                continue;
            }
            region.state.store(CLEAN, SeqCst);
            if region.inflight.load(SeqCst) > 0 {
                region.state.store(DIRTY, SeqCst);
                continue;
            }
            let (block, _) = self.layout.bit_of(r as u64);
            meta.want[block as usize] += 1;
            changed = true;
        }
        if changed {
            self.wake.notify_all();
        }
    }
}

/// How a copy went.
struct Copied {
    read_error: Option<std::io::Error>,
    /// Targets (by position) that failed a write, and how; they got no more writes.
    write_errors: Vec<(usize, std::io::Error)>,
}

/// Copies `len` bytes at leg byte `at` from `source` to every target, reading the next piece
/// on a second thread while the current one is written (a leg's direct access is
/// synchronous: without the overlap a copy would run at half the legs' speed).
fn pipelined_copy(source: &BoxTarget, targets: &[BoxTarget], at: u64, len: u64) -> Copied {
    use std::sync::mpsc::sync_channel;
    let mut out = Copied {
        read_error: None,
        write_errors: Vec::new(),
    };
    let mut failed = vec![false; targets.len()];
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = sync_channel::<(Bounce, usize, std::io::Result<()>)>(2);
        let (empty_tx, empty_rx) = sync_channel::<Bounce>(2);
        for _ in 0..2 {
            match Bounce::new(PIECE) {
                Ok(b) => {
                    let _ = empty_tx.send(b);
                }
                Err(e) => {
                    out.read_error = Some(e);
                    return;
                }
            }
        }
        scope.spawn(move || {
            let mut pos = 0u64;
            while pos < len {
                let Ok(mut buf) = empty_rx.recv() else { return };
                let n = (len - pos).min(PIECE as u64) as usize;
                let read = source.dyn_read_at(at + pos, &mut buf.as_mut_slice()[..n]);
                let stop = read.is_err();
                if full_tx.send((buf, n, read)).is_err() || stop {
                    return;
                }
                pos += n as u64;
            }
        });
        let mut pos = 0u64;
        while pos < len {
            let Ok((buf, n, read)) = full_rx.recv() else {
                break;
            };
            if let Err(e) = read {
                out.read_error = Some(e);
                break;
            }
            for (i, t) in targets.iter().enumerate() {
                if failed[i] {
                    continue;
                }
                if let Err(e) = t.dyn_write_at(at + pos, &buf.as_slice()[..n]) {
                    failed[i] = true;
                    out.write_errors.push((i, e));
                }
            }
            pos += n as u64;
            // Refused once the reader has read its last piece: nothing more to read into.
            let _ = empty_tx.send(buf);
        }
        // Dropping the channels ends the reader if it is still waiting.
        drop(empty_tx);
        drop(full_rx);
    });
    out
}

/// A region being copied from the source leg to others.
#[derive(Debug)]
struct Job {
    region: u64,
    source: usize,
    targets: Vec<usize>,
    pos: u64,
    end: u64,
    kind: JobKind,
}

/// What a copy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    /// The targets' rebuild cursors move past the region.
    Rebuild,
    /// The region's resync flag clears.
    Resync,
    /// A range a leg failed to read is rewritten there.
    Repair,
}

/// The daemon's loop state.
#[derive(Debug)]
struct Daemon {
    shared: Arc<Shared>,
    job: Option<Job>,
    next_copy: Instant,
    last_clean: Instant,
    last_save: Instant,
    resync_from: u64,
}

/// Starts the mirror's thread.
///
/// It blocks every signal: a mirror is assembled before the device blocks SIGINT and SIGTERM
/// to take them from a signalfd, so this thread would otherwise be the one the kernel
/// delivers them to, and their default action would kill the server without a clean stop.
pub(crate) fn spawn(shared: Arc<Shared>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ublk-mirror".into())
        .spawn(move || {
            if let Err(e) = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), None) {
                tracing::error!("mirror: cannot block signals in its thread: {e}");
            }
            let now = Instant::now();
            let mut d = Daemon {
                shared,
                job: None,
                next_copy: now,
                last_clean: now,
                last_save: now,
                resync_from: 0,
            };
            d.run();
        })
}

/// What one step of the copy did.
enum Step {
    /// Nothing to copy.
    Idle,
    /// Waiting (for writes to drain, or for the rate limit) until about then.
    Wait(Duration),
    /// Copied something; go on.
    Copied,
}

impl Daemon {
    fn run(&mut self) {
        let s = Arc::clone(&self.shared);
        while !s.stop.load(Acquire) {
            if s.write_meta_checked() {
                s.notify_queues();
            }
            let step = self.copy_step();
            if self.last_clean.elapsed() >= CLEAN_EVERY {
                self.last_clean = Instant::now();
                s.clean();
            }
            let wait = match step {
                Step::Copied => continue,
                Step::Wait(d) => d,
                Step::Idle => Duration::from_millis(250),
            };
            let meta = lock(&s.meta);
            let busy = meta.sb_want > s.sb_durable.load(SeqCst)
                || meta.want.iter().zip(&meta.durable).any(|(w, d)| w > d);
            if s.broken.load(SeqCst) {
                // Retry the metadata once a second, not in a tight loop.
                let _ = s.wake.wait_timeout(meta, Duration::from_secs(1));
            } else if !busy && !s.stop.load(Acquire) {
                let _ = s.wake.wait_timeout(meta, wait);
            }
        }
        self.shutdown();
    }

    /// A clean stop: abandon a copy in progress, save rebuild progress, and — when every leg
    /// is in sync and nothing is left to resync — clear every bit, so the next assembly
    /// resyncs nothing.
    fn shutdown(&mut self) {
        let s = &self.shared;
        s.syncing.store(NONE, SeqCst);
        let all_in_sync = s.legs.iter().all(|l| l.state() == LegState::InSync);
        {
            let mut meta = lock(&s.meta);
            if all_in_sync && s.resync_left.load(SeqCst) == 0 {
                for (r, region) in s.regions.iter().enumerate() {
                    if region.inflight.load(SeqCst) == 0 && region.state.load(SeqCst) == DIRTY {
                        region.state.store(CLEAN, SeqCst);
                        let (block, _) = s.layout.bit_of(r as u64);
                        meta.want[block as usize] += 1;
                    }
                }
            }
            s.bump_events(&mut meta);
        }
        let _ = s.write_meta();
    }

    /// Picks the next region to copy: the lowest rebuild cursor first, then regions to
    /// resync.
    fn pick(&mut self) -> Option<Job> {
        if let Some(job) = self.pick_repair() {
            return Some(job);
        }
        let s = &self.shared;
        let source = s.source()?;
        let layout = s.layout;
        let rebuilding: Vec<(usize, u64)> = (0..s.legs.len())
            .filter(|&i| s.legs[i].state() == LegState::Rebuilding)
            .map(|i| (i, s.legs[i].cursor.load(SeqCst)))
            .filter(|&(_, c)| c < layout.dev_size)
            .collect();
        if let Some(&(_, low)) = rebuilding.iter().min_by_key(|(_, c)| *c) {
            let region = low / layout.region_size;
            let mut targets: Vec<usize> = rebuilding
                .iter()
                .filter(|(_, c)| *c / layout.region_size == region)
                .map(|(i, _)| *i)
                .collect();
            if s.regions[region as usize].resync.load(SeqCst) {
                targets.extend(
                    (0..s.legs.len())
                        .filter(|&i| i != source && s.legs[i].state() == LegState::InSync),
                );
            }
            let bytes = layout.region_bytes(region);
            return Some(Job {
                region,
                source,
                targets,
                pos: low.max(bytes.start),
                end: bytes.end,
                kind: JobKind::Rebuild,
            });
        }
        // Rebuilding legs whose cursor reached the end are in sync now.
        self.finish_rebuilds();
        if s.resync_left.load(SeqCst) == 0 {
            return None;
        }
        let targets: Vec<usize> = (0..s.legs.len())
            .filter(|&i| i != source && s.legs[i].state() == LegState::InSync)
            .collect();
        let regions = layout.regions();
        let found = (self.resync_from..regions)
            .chain(0..self.resync_from)
            .find(|&r| s.regions[r as usize].resync.load(SeqCst))?;
        self.resync_from = found;
        if targets.is_empty() {
            // Nothing to copy to: the one in-sync leg is right by definition.
            for region in &s.regions {
                if region.resync.swap(false, SeqCst) {
                    s.resync_left.fetch_sub(1, SeqCst);
                }
            }
            return None;
        }
        let bytes = layout.region_bytes(found);
        Some(Job {
            region: found,
            source,
            targets,
            pos: bytes.start,
            end: bytes.end,
            kind: JobKind::Resync,
        })
    }

    /// The next repair: the first region of the first range, from another in-sync leg (the
    /// rest of the range stays queued).
    fn pick_repair(&mut self) -> Option<Job> {
        let s = &self.shared;
        let mut repairs = lock(&s.repairs);
        while let Some(&(leg, a, b)) = repairs.first() {
            let source =
                (0..s.legs.len()).find(|&j| j != leg && s.legs[j].state() == LegState::InSync);
            let (Some(source), LegState::InSync) = (source, s.legs[leg].state()) else {
                repairs.remove(0);
                continue;
            };
            let region = a / s.layout.region_size;
            let end = b.min(s.layout.region_bytes(region).end);
            if end < b {
                repairs[0].1 = end;
            } else {
                repairs.remove(0);
            }
            return Some(Job {
                region,
                source,
                targets: vec![leg],
                pos: a,
                end,
                kind: JobKind::Repair,
            });
        }
        None
    }

    /// Rebuilding legs whose cursor reached the end become in sync.
    fn finish_rebuilds(&self) {
        let s = &self.shared;
        let mut meta = lock(&s.meta);
        let mut changed = false;
        for (i, leg) in s.legs.iter().enumerate() {
            if leg.state() == LegState::Rebuilding && leg.cursor.load(SeqCst) >= s.layout.dev_size {
                tracing::info!("mirror: leg {i} ({}) is in sync", leg.name());
                leg.set_state(LegState::InSync);
                changed = true;
            }
        }
        if changed {
            s.bump_events(&mut meta);
        }
    }

    fn copy_step(&mut self) -> Step {
        let s = Arc::clone(&self.shared);
        if self.job.is_none() {
            let Some(job) = self.pick() else {
                return Step::Idle;
            };
            s.syncing.store(job.region, SeqCst);
            self.job = Some(job);
        }
        let Some(job) = self.job.as_mut() else {
            return Step::Idle;
        };
        // Writes into the region finish before it is read; new ones wait for the copy.
        if s.regions[job.region as usize].inflight.load(SeqCst) > 0 {
            return Step::Wait(Duration::from_micros(200));
        }
        let now = Instant::now();
        if now < self.next_copy {
            return Step::Wait(self.next_copy - now);
        }
        if s.legs[job.source].state() != LegState::InSync {
            return self.abort();
        }
        job.targets
            .retain(|&t| matches!(s.legs[t].state(), LegState::InSync | LegState::Rebuilding));
        if job.targets.is_empty() {
            return self.abort();
        }
        let n = (job.end - job.pos).min(STEP);
        let at = s.layout.data_offset + job.pos;
        let source = &s.legs[job.source];
        let targets: Vec<BoxTarget> = job.targets.iter().map(|&t| s.legs[t].target()).collect();
        let copy = pipelined_copy(&source.target(), &targets, at, n);
        if let Some(e) = copy.read_error {
            let why = leg_err("copy read", job.source, &source.name(), &e);
            if s.fail_leg(job.source, &why).is_none() {
                // The last in-sync leg cannot be read here: try again later.
                self.next_copy = Instant::now() + Duration::from_secs(1);
            }
            return self.abort();
        }
        for (i, e) in copy.write_errors {
            let t = job.targets[i];
            let why = leg_err("copy write", t, &s.legs[t].name(), &e);
            s.fail_leg(t, &why);
        }
        let n = n as usize;
        job.pos += n as u64;
        let counter = match job.kind {
            JobKind::Rebuild => &s.rebuild_bytes,
            JobKind::Resync => &s.resync_bytes,
            JobKind::Repair => &s.repaired_bytes,
        };
        counter.fetch_add(n as u64, SeqCst);
        let rate = lock(&s.meta).rate;
        if rate > 0 {
            self.next_copy = Instant::now() + Duration::from_secs_f64(n as f64 / rate as f64);
        }
        if job.pos >= job.end {
            self.finish();
        }
        Step::Copied
    }

    fn abort(&mut self) -> Step {
        self.job = None;
        self.shared.syncing.store(NONE, SeqCst);
        self.shared.notify_queues();
        Step::Copied
    }

    /// The region is copied: move the cursors, clear its resync flag, let writes in.
    fn finish(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        let s = &self.shared;
        let rebuild = job.kind == JobKind::Rebuild;
        for &t in &job.targets {
            let leg = &s.legs[t];
            if rebuild && leg.state() == LegState::Rebuilding {
                leg.cursor.store(job.end, SeqCst);
            }
        }
        if job.kind != JobKind::Repair && s.regions[job.region as usize].resync.swap(false, SeqCst)
        {
            s.resync_left.fetch_sub(1, SeqCst);
        }
        s.syncing.store(NONE, SeqCst);
        s.notify_queues();
        if rebuild && job.end >= s.layout.dev_size {
            self.finish_rebuilds();
        } else if rebuild && self.last_save.elapsed() >= SAVE_EVERY {
            self.last_save = Instant::now();
            s.bump_events(&mut lock(&s.meta));
        }
    }
}
