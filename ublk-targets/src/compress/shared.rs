//! What every queue of a compressed device shares: the map, the space allocator, the dirty
//! set the next commit journals, and the commit's coordination.
//!
//! Locking, chosen to keep the common path short:
//! - the map is one `AtomicU64` per logical block: a read loads its entry with no lock, a
//!   write's completion swaps the new entry in (the swap hands back the old extent exactly
//!   once, whatever races);
//! - the set of blocks changed since the last commit is a bitmap of `AtomicU64` words
//!   (`fetch_or` on a write, `swap(0)` by the commit that journals them);
//! - a write holds a busy bit (another atomic bitmap) for each block it touches until its
//!   extents are installed, so a read-modify-write of a block (a request covering part of
//!   it) never puts stale bytes back over a concurrent write's; a write that finds a bit
//!   taken waits, holding none;
//! - the allocator is a `Mutex`, taken once per request for all its blocks, and once per
//!   overwrite completion to queue the old extents for release;
//! - the commit's bookkeeping is a `Mutex` taken only by flushes and FUA writes.

use std::ops::Range;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, MutexGuard};

use ublk_zc::{BoxTarget, Notifier};

use super::format::{
    Algo, Extent, Layout, Record, Superblock, BLOCK_BYTES, ENTRIES_PER_BLOCK, SECTOR,
};

/// Sectors in a child page: the unit of hole punching. The data area starts on a 4 KiB
/// boundary of the child (every area before it is whole 4 KiB blocks), so a run of sectors
/// starting at a multiple of this is a run of whole child pages.
pub(crate) const PAGE_SECTORS: u64 = BLOCK_BYTES / SECTOR;
/// The longest run one discard to the child covers: 1 MiB.
pub(crate) const PUNCH_MAX_SECTORS: u64 = (1 << 20) / SECTOR;

/// Takes a lock even if a holder panicked (the data stays consistent: every critical section
/// is a few field updates).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bitmap of atomic words.
#[derive(Debug)]
pub(crate) struct Bits(Vec<AtomicU64>);

impl Bits {
    pub(crate) fn new(n: u64) -> Bits {
        Bits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Sets bit `i`; true if it was clear.
    pub(crate) fn set(&self, i: u64) -> bool {
        let bit = 1 << (i % 64);
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w.fetch_or(bit, SeqCst) & bit == 0)
    }

    pub(crate) fn clear(&self, i: u64) {
        if let Some(w) = self.0.get((i / 64) as usize) {
            w.fetch_and(!(1 << (i % 64)), SeqCst);
        }
    }

    /// Whether any bit is set.
    pub(crate) fn any(&self) -> bool {
        self.0.iter().any(|w| w.load(SeqCst) != 0)
    }

    /// Clears every bit and returns the indexes that were set.
    pub(crate) fn take_all(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.0.iter().enumerate() {
            let mut v = w.swap(0, SeqCst);
            while v != 0 {
                let b = u64::from(v.trailing_zeros());
                out.push(i as u64 * 64 + b);
                v &= v - 1;
            }
        }
        out
    }
}

/// The data area's sectors: a bitmap of the allocated ones, first fit from a rotating cursor,
/// and the extents waiting for a commit before they may be reused.
#[derive(Debug)]
pub(crate) struct Alloc {
    used: Vec<u64>,
    sectors: u64,
    cursor: u64,
    pub(crate) allocated: u64,
    /// `(epoch, extent)`: freed by an overwrite; reusable once the commit that covers the
    /// epoch is durable (the durable map no longer references it then).
    pending: Vec<(u64, Extent)>,
    /// Sectors kept allocated while the child discards them.
    punching: u64,
}

impl Alloc {
    pub(crate) fn new(sectors: u64) -> Alloc {
        Alloc {
            used: vec![0; sectors.div_ceil(64) as usize],
            sectors,
            cursor: 0,
            allocated: 0,
            pending: Vec::new(),
            punching: 0,
        }
    }

    fn is_used(&self, s: u64) -> bool {
        self.used[(s / 64) as usize] >> (s % 64) & 1 == 1
    }

    fn mark(&mut self, start: u64, n: u64, used: bool) {
        for s in start..start + n {
            let w = &mut self.used[(s / 64) as usize];
            if used {
                *w |= 1 << (s % 64);
            } else {
                *w &= !(1 << (s % 64));
            }
        }
        if used {
            self.allocated += n;
        } else {
            self.allocated -= n;
        }
    }

    /// Marks an extent found in the map at open; false if it overlaps one already marked or
    /// lies outside the data area.
    pub(crate) fn claim(&mut self, e: &Extent) -> bool {
        let span = e.span();
        if span.end > self.sectors || span.clone().any(|s| self.is_used(s)) {
            return false;
        }
        self.mark(span.start, span.end - span.start, true);
        true
    }

    /// `n` free consecutive sectors, first fit from the cursor.
    pub(crate) fn alloc(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.sectors {
            return None;
        }
        let mut start = self.cursor;
        let mut scanned = 0u64;
        while scanned < self.sectors + n {
            if start + n > self.sectors {
                scanned += self.sectors - start;
                start = 0;
                continue;
            }
            match (start..start + n).rev().find(|&s| self.is_used(s)) {
                None => {
                    self.mark(start, n, true);
                    self.cursor = start + n;
                    return Some(start);
                }
                Some(s) => {
                    scanned += s + 1 - start;
                    start = s + 1;
                }
            }
        }
        None
    }

    /// Returns an extent that was never referenced by the durable map (a failed write).
    pub(crate) fn free(&mut self, e: &Extent) {
        let span = e.span();
        self.mark(span.start, span.end - span.start, false);
    }

    pub(crate) fn defer(&mut self, epoch: u64, e: Extent) {
        self.pending.push((epoch, e));
    }

    /// Frees the pending extents of epochs up to `epoch`. Returns the runs of whole child
    /// pages (4 KiB, [`PAGE_SECTORS`] sectors) this left entirely free, as sector ranges of
    /// at most [`PUNCH_MAX_SECTORS`]: they stay allocated, so that no write lands there
    /// before the child has discarded them, until [`Alloc::punched`] gives them back.
    /// Without `punch`, nothing is kept back and no run is returned.
    pub(crate) fn release(&mut self, epoch: u64, punch: bool) -> Vec<Range<u64>> {
        let pending = std::mem::take(&mut self.pending);
        let mut pages = Vec::new();
        for (ep, e) in pending {
            if ep <= epoch {
                self.free(&e);
                let span = e.span();
                if punch {
                    pages.extend(span.start / PAGE_SECTORS..span.end.div_ceil(PAGE_SECTORS));
                }
            } else {
                self.pending.push((ep, e));
            }
        }
        pages.sort_unstable();
        pages.dedup();
        let mut runs: Vec<Range<u64>> = Vec::new();
        for page in pages {
            let start = page * PAGE_SECTORS;
            let end = start + PAGE_SECTORS;
            if end > self.sectors || (start..end).any(|s| self.is_used(s)) {
                continue;
            }
            self.mark(start, PAGE_SECTORS, true);
            self.punching += PAGE_SECTORS;
            match runs.last_mut() {
                Some(run) if run.end == start && end - run.start <= PUNCH_MAX_SECTORS => {
                    run.end = end;
                }
                _ => runs.push(start..end),
            }
        }
        runs
    }

    /// The child has discarded (or failed to discard) a run [`Alloc::release`] returned:
    /// its sectors are free.
    pub(crate) fn punched(&mut self, run: &Range<u64>) {
        if run.start < run.end && run.end <= self.sectors {
            let n = run.end - run.start;
            self.mark(run.start, n, false);
            self.punching = self.punching.saturating_sub(n);
        }
    }

    /// Whether space will come back without more frees: extents wait for a commit, or
    /// runs for their discard.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.punching > 0
    }
}

/// The commit's coordination: commits are numbered from 1 and run one at a time, on the
/// queue that started them.
#[derive(Debug)]
pub(crate) struct CommitState {
    /// The last commit started.
    pub(crate) started: u64,
    pub(crate) running: bool,
    /// The highest commit number a waiter needs.
    pub(crate) requested: u64,
    /// The superblock in force (generation, active map, checkpoint sequence).
    pub(crate) sb: Superblock,
    /// The next journal position (blocks since the checkpoint).
    pub(crate) journal_pos: u64,
}

/// The device-wide state of a compressed image.
pub(crate) struct Shared {
    pub(crate) child: BoxTarget,
    pub(crate) layout: Layout,
    pub(crate) uuid: [u8; 16],
    pub(crate) size: u64,
    pub(crate) algo: Algo,
    pub(crate) map: Vec<AtomicU64>,
    pub(crate) dirty: Bits,
    pub(crate) busy: Bits,
    /// Bumped by each commit's snapshot; tags the extents overwrites free.
    pub(crate) epoch: AtomicU64,
    pub(crate) alloc: Mutex<Alloc>,
    pub(crate) commit: Mutex<CommitState>,
    /// The last commit finished (durable, or failed and `broken` set).
    pub(crate) done: AtomicU64,
    /// A metadata write failed: writes and flushes fail from then on (reads go on).
    pub(crate) broken: AtomicBool,
    pub(crate) notifiers: Mutex<Vec<Notifier>>,
    /// Some queue has writes parked on a busy bit.
    pub(crate) busy_waiting: AtomicBool,
    /// The child refused a discard (`EOPNOTSUPP`): free space is no longer punched.
    pub(crate) no_punch: AtomicBool,
    /// Logical blocks with an extent, and the bytes their extents store.
    pub(crate) nonzero_blocks: AtomicU64,
    pub(crate) stored_bytes: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("size", &self.size)
            .field("algo", &self.algo)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// The token a queue gets when another queue's commit ended or a busy bit was released.
pub(crate) const WAKE: u64 = u64::MAX;

impl Shared {
    pub(crate) fn new(child: BoxTarget, sb: &Superblock, map: Vec<u64>, alloc: Alloc) -> Shared {
        let blocks = sb.blocks();
        let mut nonzero = 0;
        let mut stored = 0;
        for e in &map {
            if let Ok(Some(x)) = Extent::decode(*e) {
                nonzero += 1;
                stored += u64::from(x.len);
            }
        }
        Shared {
            child,
            layout: sb.layout,
            uuid: sb.uuid,
            size: sb.size,
            algo: sb.algo,
            map: map.into_iter().map(AtomicU64::new).collect(),
            dirty: Bits::new(blocks),
            busy: Bits::new(blocks),
            epoch: AtomicU64::new(0),
            alloc: Mutex::new(alloc),
            commit: Mutex::new(CommitState {
                started: 0,
                running: false,
                requested: 0,
                sb: sb.clone(),
                journal_pos: 0,
            }),
            done: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            notifiers: Mutex::new(Vec::new()),
            busy_waiting: AtomicBool::new(false),
            no_punch: AtomicBool::new(false),
            nonzero_blocks: AtomicU64::new(nonzero),
            stored_bytes: AtomicU64::new(stored),
        }
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.size / BLOCK_BYTES
    }

    /// Block `lba` now holds `new`: swaps it into the map, marks the block for the next
    /// commit, keeps the statistics, and queues the old extent for release after that commit.
    /// Called once the new extent is on the child.
    pub(crate) fn install(&self, lba: u64, new: u64) {
        let Some(slot) = self.map.get(lba as usize) else {
            return;
        };
        let old = slot.swap(new, SeqCst);
        self.dirty.set(lba);
        // Read after the dirty bit is set: a commit whose snapshot bumped the epoch past this
        // value saw the bit (see `Alloc::pending`).
        let epoch = self.epoch.load(SeqCst);
        let new_e = Extent::decode(new).ok().flatten();
        let old_e = Extent::decode(old).ok().flatten();
        if let Some(n) = &new_e {
            self.stored_bytes.fetch_add(u64::from(n.len), SeqCst);
        }
        match (&old_e, &new_e) {
            (None, Some(_)) => {
                self.nonzero_blocks.fetch_add(1, SeqCst);
            }
            (Some(_), None) => {
                self.nonzero_blocks.fetch_sub(1, SeqCst);
            }
            _ => {}
        }
        if let Some(o) = old_e {
            self.stored_bytes.fetch_sub(u64::from(o.len), SeqCst);
            lock(&self.alloc).defer(epoch, o);
        }
    }

    /// Takes the blocks changed since the last snapshot with their current entries, and the
    /// epoch whose pending extents the commit of this snapshot releases.
    pub(crate) fn snapshot(&self) -> (Vec<Record>, u64) {
        let covered = self.epoch.fetch_add(1, SeqCst);
        let records = self
            .dirty
            .take_all()
            .into_iter()
            .filter_map(|lba| Some((lba, self.map.get(lba as usize)?.load(SeqCst))))
            .collect();
        (records, covered)
    }

    /// The whole map as it stands.
    pub(crate) fn map_entries(&self, first: u64, n: u64) -> Vec<u64> {
        (first..(first + n).min(self.blocks()))
            .map(|lba| self.map[lba as usize].load(SeqCst))
            .collect()
    }

    /// Registers a queue to wake when a commit ends or a busy bit is released.
    pub(crate) fn register(&self, n: Notifier) {
        lock(&self.notifiers).push(n);
    }

    pub(crate) fn wake_all(&self) {
        for n in lock(&self.notifiers).iter() {
            n.notify(WAKE, 0);
        }
    }

    /// Map blocks in a checkpoint.
    pub(crate) fn map_blocks(&self) -> u64 {
        self.blocks().div_ceil(ENTRIES_PER_BLOCK)
    }

    /// Bytes of the child the data area has allocated (pending releases included).
    pub(crate) fn allocated_bytes(&self) -> u64 {
        lock(&self.alloc).allocated * SECTOR
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::format::Kind;

    fn extent(sector: u64, sectors: u64) -> Extent {
        Extent {
            sector,
            len: (sectors * SECTOR) as u32,
            kind: Kind::Lz4,
        }
    }

    #[test]
    fn release_punches_only_whole_pages_left_free_and_keeps_them_until_punched() {
        let mut a = Alloc::new(64);
        // Sectors 0..6 and 6..15 share page 0 (sectors 0..8); 15..24 ends page 2 whole.
        let (x, y, z) = (extent(0, 6), extent(6, 9), extent(15, 9));
        for e in [&x, &y, &z] {
            assert!(a.claim(e));
        }
        a.defer(1, x);
        assert_eq!(
            a.release(1, true),
            Vec::<Range<u64>>::new(),
            "page 0 is shared"
        );
        assert_eq!(a.allocated, 18);
        a.defer(2, y);
        a.defer(2, z);
        assert_eq!(a.release(2, true), vec![0..24]);
        assert!(a.has_pending(), "space comes back when the discard ends");
        // Kept until the discard ends: nothing can be allocated over it.
        assert_eq!(a.alloc(40), Some(24));
        assert_eq!(a.alloc(1), None);
        a.punched(&(0..24));
        assert_eq!(a.alloc(24), Some(0));
        // Without punching, the space is free at once.
        let mut b = Alloc::new(64);
        assert!(b.claim(&extent(8, 8)));
        b.defer(1, extent(8, 8));
        assert!(b.release(1, false).is_empty());
        assert_eq!(b.allocated, 0);
        assert!(!b.has_pending());
    }
}
