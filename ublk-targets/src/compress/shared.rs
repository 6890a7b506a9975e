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
    Algo, Extent, Layout, Record, Superblock, BLOCK_BYTES, ENTRIES_PER_BLOCK, GRAIN, SECTOR,
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

/// The data area's sectors: a bitmap of the allocated ones, first fit from a cursor that
/// moves back to the lowest sector freed (so the data keeps to the front of the area and
/// freed space is reused before new child pages are touched), and the extents waiting for a
/// commit before they may be reused.
///
/// Extents packed together share the sector between them, so a sector may be held by
/// several: `shared` counts the holders beyond the first of each such sector. Only an
/// extent's first and last sectors can be shared (its other sectors hold its bytes alone), so
/// the count stays small: at most one entry per packed neighbour.
#[derive(Debug)]
pub(crate) struct Alloc {
    used: Vec<u64>,
    /// Seeded at random (foldhash), so no image can be forged to make its keys collide.
    shared: foldhash::HashMap<u64, u32>,
    sectors: u64,
    cursor: u64,
    pub(crate) allocated: u64,
    /// `(epoch, extent, emptied)`: freed by an overwrite, or by a discard or write-zeroes
    /// when `emptied` (the block has no extent any more); reusable once the commit that
    /// covers the epoch is durable (the durable map no longer references it then).
    pending: Vec<(u64, Extent, bool)>,
    /// Child pages that overwrites left free at the last release: discarded at the next
    /// release if no write has reused them meanwhile.
    loose: Vec<u64>,
    /// Sectors kept allocated while the child discards them.
    punching: u64,
}

/// The bitmap words over sectors `start..end`: each word's index and the mask of those
/// sectors' bits in it.
fn word_masks(start: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut s = start;
    std::iter::from_fn(move || {
        (s < end).then(|| {
            let bit = s % 64;
            let k = (64 - bit).min(end - s);
            let mask = if k == 64 {
                u64::MAX
            } else {
                ((1 << k) - 1) << bit
            };
            let word = (s / 64) as usize;
            s += k;
            (word, mask)
        })
    })
}

impl Alloc {
    pub(crate) fn new(sectors: u64) -> Alloc {
        Alloc {
            used: vec![0; sectors.div_ceil(64) as usize],
            shared: foldhash::HashMap::default(),
            sectors,
            cursor: 0,
            allocated: 0,
            pending: Vec::new(),
            loose: Vec::new(),
            punching: 0,
        }
    }

    fn is_used(&self, s: u64) -> bool {
        self.used[(s / 64) as usize] >> (s % 64) & 1 == 1
    }

    fn mark(&mut self, start: u64, n: u64, used: bool) {
        for (i, mask) in word_masks(start, start + n) {
            if used {
                self.used[i] |= mask;
            } else {
                self.used[i] &= !mask;
            }
        }
        if used {
            self.allocated += n;
        } else {
            self.allocated -= n;
            self.cursor = self.cursor.min(start);
        }
    }

    /// The first sector in `from..to` that is used (`used`) or free (`!used`), else `to`;
    /// a word of the bitmap at a time.
    fn first(&self, used: bool, from: u64, to: u64) -> u64 {
        let mut s = from;
        while s < to {
            let word = self.used[(s / 64) as usize];
            let w = if used { word } else { !word } >> (s % 64);
            if w != 0 {
                return (s + u64::from(w.trailing_zeros())).min(to);
            }
            s = (s / 64 + 1) * 64;
        }
        to
    }

    /// The first `n` free consecutive sectors in `from..to`.
    fn fit(&self, from: u64, to: u64, n: u64) -> Option<u64> {
        let mut s = from;
        loop {
            s = self.first(false, s, to);
            if s + n > to {
                return None;
            }
            match self.first(true, s, s + n) {
                u if u == s + n => return Some(s),
                u => s = u,
            }
        }
    }

    /// Holds sectors `span` for one more extent.
    fn hold(&mut self, span: Range<u64>) {
        for s in span {
            if self.is_used(s) {
                *self.shared.entry(s).or_insert(0) += 1;
            } else {
                self.used[(s / 64) as usize] |= 1 << (s % 64);
                self.allocated += 1;
            }
        }
    }

    /// Marks the extents of `map` (the map of an image being opened). Returns the logical
    /// blocks whose extent overlaps the bytes of another (the later one of each pair, by
    /// position) or lies outside the data area; those are not marked.
    pub(crate) fn claim_map(&mut self, map: &[u64]) -> Vec<u64> {
        let mut extents: Vec<(u64, Extent)> = map
            .iter()
            .enumerate()
            .filter_map(|(lba, entry)| Some((lba as u64, Extent::decode(*entry).ok()??)))
            .collect();
        extents.sort_unstable_by_key(|(_, e)| e.bytes().start);
        let mut bad = Vec::new();
        let mut end = 0;
        for (lba, e) in extents {
            let span = e.span();
            if span.end > self.sectors || e.bytes().start < end {
                bad.push(lba);
                continue;
            }
            end = e.bytes().end;
            self.hold(span);
        }
        bad.sort_unstable();
        bad
    }

    /// `n` free consecutive sectors, first fit from the cursor.
    #[cfg(test)]
    pub(crate) fn alloc(&mut self, n: u64) -> Option<u64> {
        let start = self.find(n)?;
        self.mark(start, n, true);
        self.cursor = start + n;
        Some(start)
    }

    /// Where [`Alloc::alloc`] would put `n` sectors: the first fit from the cursor, then from
    /// the start of the data area. Marks nothing.
    fn find(&self, n: u64) -> Option<u64> {
        if n == 0 || n > self.sectors {
            return None;
        }
        self.fit(self.cursor, self.sectors, n)
            .or_else(|| self.fit(0, self.sectors.min(self.cursor + n), n))
    }

    /// Room for extents of `lens` bytes packed end to end in one run of free sectors, each
    /// starting on a [`GRAIN`] boundary: the `(sector, at)` of each, or `None` when no run is
    /// long enough. Each extent holds its own sectors (see [`Alloc::free`]).
    pub(crate) fn alloc_packed(&mut self, lens: &[u32]) -> Option<Vec<(u64, u16)>> {
        let mut places = Vec::with_capacity(lens.len());
        let mut pos = 0u64;
        let mut end = 0u64;
        for &len in lens {
            places.push(pos);
            end = pos + u64::from(len);
            pos = end.next_multiple_of(GRAIN);
        }
        let n = end.div_ceil(SECTOR);
        // Each sector of the run is held by the extents over it, not by the run.
        let start = self.find(n)?;
        self.cursor = start + n;
        let places: Vec<(u64, u16)> = places
            .into_iter()
            .map(|p| (start + p / SECTOR, (p % SECTOR) as u16))
            .collect();
        for (&(sector, at), &len) in places.iter().zip(lens) {
            let last = (u64::from(at) + u64::from(len)).div_ceil(SECTOR);
            self.hold(sector..sector + last);
        }
        Some(places)
    }

    /// Places extents of `lens` stored bytes: packed end to end (16-byte aligned, see
    /// [`Alloc::alloc_packed`]) in runs of at most [`PACK_MAX_SECTORS`], a run no free space is
    /// long enough for split in shorter ones (see [`Alloc::pack_split`]). Returns the
    /// `(sector, at, run)` of each: extents of one run share sectors, extents of different runs
    /// never do. All or nothing: `None` (and nothing held) when the data area has no room.
    pub(crate) fn place(&mut self, lens: &[u32]) -> Option<Vec<(u64, u16, usize)>> {
        let mut placed: Vec<(u64, u16, usize)> = Vec::with_capacity(lens.len());
        let mut held: Vec<Extent> = Vec::with_capacity(lens.len());
        let mut first = 0;
        let mut runs = 0;
        while first < lens.len() {
            // The longest run from `first` that fits in PACK_MAX_SECTORS.
            let mut end_byte = 0u64;
            let mut last = first;
            while last < lens.len() {
                let end = end_byte.next_multiple_of(GRAIN) + u64::from(lens[last]);
                if last > first && end > PACK_MAX_SECTORS * SECTOR {
                    break;
                }
                end_byte = end;
                last += 1;
            }
            let run = &lens[first..last];
            let Some(places) = self.pack_split(run) else {
                for e in &held {
                    self.free(e);
                }
                return None;
            };
            for (&(sector, at, sub), &len) in places.iter().zip(run) {
                held.push(hold_of(sector, at, len));
                placed.push((sector, at, runs + sub));
            }
            runs += places.last().map_or(0, |p| p.2);
            runs += 1;
            first = last;
        }
        Some(placed)
    }

    /// Extents of `lens` bytes packed in one run of free sectors, or, when no free run is that
    /// long, the two halves each packed the same way (down to an extent alone in whole sectors,
    /// for a data area cut into short holes). Returns the `(sector, at, sub-run)` of each, the
    /// sub-runs numbered from 0; all or nothing.
    fn pack_split(&mut self, lens: &[u32]) -> Option<Vec<(u64, u16, usize)>> {
        if let Some(places) = self.alloc_packed(lens) {
            return Some(places.into_iter().map(|(s, a)| (s, a, 0)).collect());
        }
        if lens.len() < 2 {
            return None;
        }
        let (a, b) = lens.split_at(lens.len() / 2);
        let mut first = self.pack_split(a)?;
        let Some(second) = self.pack_split(b) else {
            for (&(sector, at, _), &len) in first.iter().zip(a) {
                self.free(&hold_of(sector, at, len));
            }
            return None;
        };
        let next = first.last().map_or(0, |p| p.2 + 1);
        first.extend(second.into_iter().map(|(s, at, r)| (s, at, r + next)));
        Some(first)
    }

    /// Lets go of an extent's sectors: those no other extent holds are free. Also how an
    /// extent never referenced by the durable map (a failed write) is returned.
    pub(crate) fn free(&mut self, e: &Extent) {
        let span = e.span();
        if span.is_empty() {
            return;
        }
        // Only the first and last sectors can be shared: one another extent still holds.
        let (mut start, mut end) = (span.start, span.end);
        if self.let_go_shared(start) {
            start += 1;
        }
        if end > start && self.let_go_shared(end - 1) {
            end -= 1;
        }
        let mut freed = 0;
        for (i, mask) in word_masks(start, end) {
            freed += u64::from((self.used[i] & mask).count_ones());
            self.used[i] &= !mask;
        }
        if freed > 0 {
            self.allocated -= freed;
            self.cursor = self.cursor.min(start);
        }
    }

    /// One holder fewer for sector `s` if others share it: true when one is left.
    fn let_go_shared(&mut self, s: u64) -> bool {
        match self.shared.get_mut(&s) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.shared.remove(&s);
                }
                true
            }
            None => false,
        }
    }

    /// Queues `e` for release by the commit that covers `epoch`; `emptied` when its block
    /// has no extent any more (its pages are discarded at that commit, where an overwrite's
    /// are discarded only if still free one commit later).
    pub(crate) fn defer(&mut self, epoch: u64, e: Extent, emptied: bool) {
        self.pending.push((epoch, e, emptied));
    }

    /// Frees the pending extents of epochs up to `epoch`. Returns the runs of whole child
    /// pages (4 KiB, [`PAGE_SECTORS`] sectors) to discard, as sector ranges of at most
    /// [`PUNCH_MAX_SECTORS`]: the pages that discards and write-zeroes left entirely free
    /// now, and, with `punch_loose`, those that overwrites left free at the previous release and
    /// that are still entirely free (an overwrite's space is most often reused by the next
    /// writes; punching it at once would only make the child allocate it again; without
    /// `punch_loose`, when writes are waiting for space, it is left to them). The runs stay allocated,
    /// so that no write lands there before the child has discarded them, until
    /// [`Alloc::punched`] gives them back. Without `punch`, nothing is kept back and no run
    /// is returned.
    pub(crate) fn release(
        &mut self,
        epoch: u64,
        punch: bool,
        punch_loose: bool,
    ) -> Vec<Range<u64>> {
        let pending = std::mem::take(&mut self.pending);
        let old_loose = std::mem::take(&mut self.loose);
        let mut pages = if punch && punch_loose {
            old_loose
        } else {
            Vec::new()
        };
        let mut loose = Vec::new();
        for (ep, e, emptied) in pending {
            if ep <= epoch {
                self.free(&e);
                let span = e.span();
                if punch {
                    let these = span.start / PAGE_SECTORS..span.end.div_ceil(PAGE_SECTORS);
                    if emptied {
                        pages.extend(these);
                    } else {
                        loose.extend(these);
                    }
                }
            } else {
                self.pending.push((ep, e, emptied));
            }
        }
        loose.sort_unstable();
        loose.dedup();
        self.loose = loose;
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

/// The most one packed run, and one child write of a request's extents, holds: 128 KiB.
pub(crate) const PACK_MAX_SECTORS: u64 = 256;

/// An extent of `len` bytes at `(sector, at)`, as far as the allocator cares.
pub(crate) fn hold_of(sector: u64, at: u16, len: u32) -> Extent {
    Extent {
        sector,
        at,
        len,
        kind: super::format::Kind::Raw,
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
    /// A write waited for space since the last commit ended (see [`Alloc::release`]).
    pub(crate) short_of_space: AtomicBool,
    /// A FLUSH or FUA write asked for a commit since the last commit ended.
    pub(crate) synced: AtomicBool,
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
            short_of_space: AtomicBool::new(false),
            synced: AtomicBool::new(false),
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
            lock(&self.alloc).defer(epoch, o, new_e.is_none());
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
            at: 0,
            len: ((sectors * SECTOR) as u32 - 16).min(4112),
            kind: Kind::Lz4,
        }
    }

    proptest::proptest! {
        /// The word-at-a-time search finds what a search sector by sector finds.
        #[test]
        fn the_first_fit_is_the_one_a_sector_by_sector_search_finds(
            words in proptest::collection::vec(proptest::prelude::any::<u64>(), 1..5),
            dense in 0u32..4,
            sectors_cut in 0u64..64,
            cursor in 0u64..320,
            n in 1u64..80,
        ) {
            let sectors = (words.len() as u64 * 64).saturating_sub(sectors_cut).max(1);
            let mut a = Alloc::new(sectors);
            // More bits set with each `dense` (the AND of fewer random words).
            for (i, w) in words.iter().enumerate() {
                let mut w = *w;
                for k in 0..dense {
                    w &= w.rotate_left(7 + k + i as u32);
                }
                a.used[i] = w;
            }
            a.cursor = cursor.min(sectors);
            let free_run = |s: u64| s + n <= sectors && (s..s + n).all(|x| !a.is_used(x));
            let want = (a.cursor..sectors)
                .find(|&s| free_run(s))
                .or_else(|| (0..sectors).find(|&s| free_run(s)));
            proptest::prop_assert_eq!(a.find(n), want);
        }
    }

    #[test]
    fn release_punches_only_whole_pages_left_free_and_keeps_them_until_punched() {
        let mut a = Alloc::new(64);
        // Sectors 0..6 and 6..15 share page 0 (sectors 0..8); 15..24 ends page 2 whole.
        let (x, y, z) = (extent(0, 6), extent(6, 9), extent(15, 9));
        let map: Vec<u64> = [x, y, z].iter().map(|e| e.encode().unwrap()).collect();
        assert!(a.claim_map(&map).is_empty());
        a.defer(1, x, true);
        assert_eq!(
            a.release(1, true, true),
            Vec::<Range<u64>>::new(),
            "page 0 is shared"
        );
        assert_eq!(a.allocated, 18);
        a.defer(2, y, true);
        a.defer(2, z, true);
        assert_eq!(a.release(2, true, true), vec![0..24]);
        assert!(a.has_pending(), "space comes back when the discard ends");
        // Kept until the discard ends: nothing can be allocated over it.
        assert_eq!(a.alloc(40), Some(24));
        assert_eq!(a.alloc(1), None);
        a.punched(&(0..24));
        assert_eq!(a.alloc(24), Some(0));
        // Without punching, the space is free at once.
        let mut b = Alloc::new(64);
        assert!(b.claim_map(&[extent(8, 8).encode().unwrap()]).is_empty());
        b.defer(1, extent(8, 8), true);
        assert!(b.release(1, false, true).is_empty());
        assert_eq!(b.allocated, 0);
        assert!(!b.has_pending());
    }

    #[test]
    fn overwritten_space_is_reused_first_and_punched_one_release_later() {
        let mut a = Alloc::new(64);
        assert_eq!(a.alloc(16), Some(0));
        assert_eq!(a.alloc(16), Some(16));
        // Sectors 0..16 (pages 0 and 1) freed by overwrites: free now, not punched yet.
        a.defer(1, extent(0, 8), false);
        a.defer(1, extent(8, 8), false);
        assert!(a.release(1, true, true).is_empty());
        assert_eq!(a.allocated, 16);
        // The lowest free sectors are reused first.
        assert_eq!(a.alloc(8), Some(0));
        // At the next release, the page still free is punched, the reused one is not.
        assert_eq!(a.release(2, true, true), vec![8..16]);
        a.punched(&(8..16));
        assert!(a.release(3, true, true).is_empty(), "punched once");
        assert_eq!(a.alloc(8), Some(8));
        // With writes short of space, what overwrites freed is left to them.
        a.defer(4, extent(8, 8), false);
        assert!(a.release(4, true, true).is_empty());
        assert!(a.release(5, true, false).is_empty());
    }

    #[test]
    fn packed_extents_share_sectors_and_free_them_with_the_last_holder() {
        let mut a = Alloc::new(64);
        // 3 extents of 300, 17 and 700 bytes: at bytes 0, 304 and 336, ending at 1036.
        let places = a.alloc_packed(&[300, 17, 700]).expect("room");
        assert_eq!(places, vec![(0, 0), (0, 304), (0, 336)]);
        assert_eq!(a.allocated, 3);
        let e = |(sector, at): (u64, u16), len| Extent {
            sector,
            at,
            len,
            kind: Kind::Lz4,
        };
        let (x, y, z) = (e(places[0], 300), e(places[1], 17), e(places[2], 700));
        assert_eq!(z.span(), 0..3);
        assert_eq!(a.alloc(1), Some(3), "the run ends after the last extent");
        a.free(&x);
        a.free(&z);
        assert_eq!(a.allocated, 2, "sector 0 is still held by y");
        assert_eq!(a.alloc(2), Some(1));
        a.free(&y);
        assert_eq!(a.allocated, 3);
        assert_eq!(a.alloc(1), Some(0));
        assert!(a.shared.is_empty());

        // Opening: packed neighbours are fine, overlapping bytes are not.
        let mut b = Alloc::new(64);
        let map = [
            x.encode().unwrap(),
            y.encode().unwrap(),
            z.encode().unwrap(),
            Extent { at: 320, ..y }.encode().unwrap(),
            Extent { sector: 63, ..z }.encode().unwrap(),
        ];
        assert_eq!(b.claim_map(&map), vec![3, 4]);
        assert_eq!(b.allocated, 3);
        b.free(&x);
        b.free(&y);
        assert_eq!(b.allocated, 3, "z holds sectors 0..3");
        b.free(&z);
        assert_eq!(b.allocated, 0);
    }

    #[test]
    fn runs_too_long_for_the_holes_are_split_in_halves() {
        let mut a = Alloc::new(40);
        assert_eq!(a.alloc(40), Some(0));
        // Two holes of 10 sectors: 0..10 and 20..30.
        a.free(&hold_of(0, 0, 10 * 512 - 16));
        a.free(&hold_of(20, 0, 10 * 512 - 16));
        assert_eq!(a.allocated, 20);
        // 4 × 2,100 bytes packed need 17 sectors; 2 of them need 9, so each half takes a
        // hole, as a run of its own.
        let places = a.pack_split(&[2100; 4]).expect("room in halves");
        assert_eq!(places, vec![(0, 0, 0), (4, 64, 0), (20, 0, 1), (24, 64, 1)]);
        assert_eq!(a.allocated, 38);
        // Sectors 9 and 29 are left: no room for two more, and nothing stays held.
        assert_eq!(a.pack_split(&[2100; 2]), None);
        assert_eq!(a.allocated, 38);
        // place() numbers the runs of its chunks on from there.
        let mut b = Alloc::new(1 << 12);
        let placed = b.place(&[4112; 40]).expect("room");
        let runs: Vec<usize> = placed.iter().map(|p| p.2).collect();
        assert_eq!(runs[..31], [0; 31], "31 raw extents fit in 128 KiB");
        assert_eq!(runs[31..], [1; 9]);
    }
}
