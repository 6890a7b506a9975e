//! RAID-1 over N children ("legs"), with a persistent write-intent bitmap.
//!
//! Every leg starts with a metadata area ([`meta`]): a superblock and a bitmap of regions.
//! The device is the legs' common data area.
//!
//! - **Writes** (and discards, write-zeroes) go to every leg that holds the range, in
//!   parallel, from the request's own buffer: zero-copy when the mode allows. Before the
//!   first write into a clean region its bit is made durable on the legs; bits of regions
//!   idle and in sync on every leg are cleared later. A write succeeds when an in-sync leg
//!   wrote it; a leg that fails is marked faulty, durably, before the write is answered. The
//!   last in-sync leg is never failed.
//! - **Reads** go to one leg that holds the range — in sync, or rebuilt past it — the one
//!   with the fewest reads in flight, or the one a sequential stream is on. A failed read is
//!   retried on another leg that holds the range; the range is then rewritten on the failing
//!   leg from that one (md's read-error correction), and a leg whose rewrite fails, or that
//!   needed more than 20 of them, is failed.
//! - **Flushes** reach every leg; flushes that arrive while one is in flight are served by
//!   one more.
//! - **A rebuild** (a new or replaced leg, a stale one at assembly, a new mirror's initial
//!   sync) and **a resync** (regions dirty after an unclean stop) copy regions from an
//!   in-sync leg, one region at a time, beside foreground I/O: writes into the region being
//!   copied wait for it, and the copy waits for writes already in flight there.
//!
//! Assembly ([`Mirror::assemble`]) reads every leg's superblock: blank legs make a new
//! mirror; otherwise the freshest superblock (highest event count) wins, a lagging leg is
//! rebuilt, a rebuild resumes where it stopped, and the regions whose bits are set are
//! resynced. A leg of another mirror, or with a damaged superblock, is refused unless the
//! caller asks for a new mirror.

pub mod meta;
mod queue;
mod shared;

use std::io;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use ublk_zc::{copies_data_all, needs_data_any, BoxTarget, OpenCtx, Target};

use meta::{
    decode_bitmap_block, encode_bitmap_block, new_uuid, uuid_string, Layout, LegRecord, LegState,
    MetaError, Superblock, BITMAP_HEADER, BITS_PER_BLOCK, BLOCK, DEFAULT_REGION, MAX_LEGS,
};
pub use queue::MirrorQueue;
use shared::{lock, Shared, DIRTY};

/// How a mirror is assembled.
#[derive(Debug, Clone, Default)]
pub struct MirrorOptions {
    /// The region size of a new mirror (default [`DEFAULT_REGION`]); an existing one must
    /// match it when given.
    pub region: Option<u64>,
    /// A new mirror starts with its legs in sync instead of copying the first leg to the
    /// others (for legs known to be equal, such as zeroed ones).
    pub assume_clean: bool,
    /// Make a new mirror even on legs that carry one (or damaged metadata): their data is
    /// lost.
    pub force_new: bool,
}

/// Why a mirror could not be assembled or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MirrorError(pub String);

fn err(msg: impl Into<String>) -> MirrorError {
    MirrorError(msg.into())
}

/// How assembly went, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembly {
    /// Blank legs (or `force_new`): a new mirror.
    New,
    /// An existing mirror, with this many regions to resync and legs to rebuild.
    Existing {
        /// Regions whose bits were set (an unclean stop): copied from the source leg.
        resync_regions: u64,
        /// Legs being rebuilt (new, stale, or resuming).
        rebuilding: usize,
    },
}

/// A RAID-1 mirror over N ≥ 2 legs.
#[derive(Debug)]
pub struct Mirror {
    shared: Arc<Shared>,
    daemon: Mutex<Option<std::thread::JoinHandle<()>>>,
    needs_data: bool,
    copies_data: bool,
    assembly: Assembly,
}

/// A running mirror's controls, for the control socket: status, fail, replace, rate.
#[derive(Debug, Clone)]
pub struct MirrorHandle {
    shared: Arc<Shared>,
    needs_data: bool,
}

impl Mirror {
    /// Assembles a mirror over `legs` (each a target and its name for messages, such as
    /// `file:/dev/sdb`): a new one on blank legs, else the one they carry.
    pub fn assemble(
        legs: Vec<(BoxTarget, String)>,
        opts: &MirrorOptions,
    ) -> Result<Mirror, MirrorError> {
        let n = legs.len();
        if !(2..=MAX_LEGS).contains(&n) {
            return Err(err(format!("a mirror has 2 to {MAX_LEGS} legs, got {n}")));
        }
        let mut sizes = Vec::with_capacity(n);
        for (i, (t, name)) in legs.iter().enumerate() {
            sizes.push(
                t.dyn_size()
                    .ok_or_else(|| err(format!("leg {i} ({name}) has no known size")))?,
            );
        }
        let mut found = Vec::with_capacity(n);
        let mut buf = vec![0u8; BLOCK];
        for (i, (t, name)) in legs.iter().enumerate() {
            t.dyn_read_at(0, &mut buf)
                .map_err(|e| err(format!("leg {i} ({name}): cannot read its superblock: {e}")))?;
            found.push(Superblock::decode(&buf));
        }
        let all_blank = found.iter().all(|f| *f == Err(MetaError::Blank));
        let (shared, assembly) = if opts.force_new || all_blank {
            (Self::create(legs, &sizes, opts)?, Assembly::New)
        } else {
            Self::reassemble(legs, &sizes, found, opts)?
        };
        let needs_data = needs_data_any(&targets(&shared));
        let copies_data = copies_data_all(&targets(&shared));
        let shared = Arc::new(shared);
        let daemon = shared::spawn(Arc::clone(&shared))
            .map_err(|e| err(format!("cannot start the mirror's thread: {e}")))?;
        Ok(Mirror {
            shared,
            daemon: Mutex::new(Some(daemon)),
            needs_data,
            copies_data,
            assembly,
        })
    }

    fn create(
        legs: Vec<(BoxTarget, String)>,
        sizes: &[u64],
        opts: &MirrorOptions,
    ) -> Result<Shared, MirrorError> {
        let smallest = sizes.iter().copied().min().unwrap_or(0);
        let region = opts.region.unwrap_or(DEFAULT_REGION);
        let layout = Layout::for_leg(smallest, region).map_err(|e| err(e.to_string()))?;
        let uuid = new_uuid().map_err(|e| err(format!("cannot make a UUID: {e}")))?;
        let events = 1;
        let legs: Vec<_> = legs
            .into_iter()
            .enumerate()
            .map(|(i, (t, name))| {
                let state = if i == 0 || opts.assume_clean {
                    LegState::InSync
                } else {
                    LegState::Rebuilding
                };
                let rec = LegRecord {
                    state,
                    rebuild_offset: 0,
                };
                (t, name, rec)
            })
            .collect();
        let shared = Shared::new(layout, uuid, events, legs);
        for i in 0..shared.legs.len() {
            write_fresh_leg(&shared, i, &shared.legs[i].target(), events)?;
        }
        Ok(shared)
    }

    fn reassemble(
        legs: Vec<(BoxTarget, String)>,
        sizes: &[u64],
        found: Vec<Result<Superblock, MetaError>>,
        opts: &MirrorOptions,
    ) -> Result<(Shared, Assembly), MirrorError> {
        const FORCE: &str = "--force-new (force_new=true) makes a new mirror on these legs, \
                             losing their data";
        for (i, f) in found.iter().enumerate() {
            if let Err(e) = f {
                if *e != MetaError::Blank {
                    return Err(err(format!("leg {i} ({}): {e}; {FORCE}", legs[i].1)));
                }
            }
        }
        let freshest = found
            .iter()
            .filter_map(|f| f.as_ref().ok())
            .max_by_key(|sb| sb.events)
            .cloned()
            .ok_or_else(|| err("no leg carries a superblock"))?;
        for (i, f) in found.iter().enumerate() {
            let Ok(sb) = f else { continue };
            if sb.uuid != freshest.uuid {
                return Err(err(format!(
                    "leg {i} ({}) belongs to another mirror ({}, not {}); {FORCE}",
                    legs[i].1,
                    uuid_string(&sb.uuid),
                    uuid_string(&freshest.uuid)
                )));
            }
            if sb.leg_index as usize != i {
                return Err(err(format!(
                    "leg {i} ({}) is leg {} of mirror {}: give the legs in their order",
                    legs[i].1,
                    sb.leg_index,
                    uuid_string(&sb.uuid)
                )));
            }
        }
        if freshest.legs.len() != legs.len() {
            return Err(err(format!(
                "mirror {} has {} legs; {} given",
                uuid_string(&freshest.uuid),
                freshest.legs.len(),
                legs.len()
            )));
        }
        let layout = freshest.layout;
        if let Some(region) = opts.region {
            if region != layout.region_size {
                return Err(err(format!(
                    "mirror {} has {}-byte regions, not {region}",
                    uuid_string(&freshest.uuid),
                    layout.region_size
                )));
            }
        }
        let need = layout.data_offset + layout.dev_size;
        for (i, size) in sizes.iter().enumerate() {
            if *size < need {
                return Err(err(format!(
                    "leg {i} ({}) holds {size} bytes; this mirror needs {need}",
                    legs[i].1
                )));
            }
        }
        let records: Vec<LegRecord> = found
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let full = LegRecord {
                    state: LegState::Rebuilding,
                    rebuild_offset: 0,
                };
                match f {
                    Ok(sb) if sb.events == freshest.events => match freshest.legs[i].state {
                        LegState::InSync | LegState::Rebuilding => freshest.legs[i],
                        _ => full,
                    },
                    // Blank (a new leg) or stale (it missed state changes): copied whole.
                    _ => full,
                }
            })
            .collect();
        if !records.iter().any(|r| r.state == LegState::InSync) {
            return Err(err(format!(
                "no leg of mirror {} is in sync: none can be trusted as the source",
                uuid_string(&freshest.uuid)
            )));
        }
        let fresh_legs: Vec<bool> = found
            .iter()
            .map(|f| matches!(f, Ok(sb) if sb.events == freshest.events))
            .collect();
        let events = freshest.events + 1;
        let rebuilding = records
            .iter()
            .filter(|r| r.state == LegState::Rebuilding)
            .count();
        let shared = Shared::new(
            layout,
            freshest.uuid,
            events,
            legs.into_iter()
                .zip(records)
                .map(|((t, name), rec)| (t, name, rec))
                .collect(),
        );
        // The dirty regions: the union of the in-sync legs' bitmaps (a block that does not
        // check counts as all dirty).
        let mut buf = vec![0u8; BLOCK];
        let mut dirty = vec![false; layout.regions() as usize];
        for (i, leg) in shared.legs.iter().enumerate() {
            if leg.state() != LegState::InSync || !fresh_legs[i] {
                continue;
            }
            let t = leg.target();
            for block in 0..layout.bitmap_blocks {
                let first = u64::from(block) * BITS_PER_BLOCK;
                let end = (first + BITS_PER_BLOCK).min(layout.regions());
                let read = t.dyn_read_at(layout.bitmap_block_offset(block), &mut buf);
                let bits = match read {
                    Ok(()) => decode_bitmap_block(block, &freshest.uuid, &buf).ok(),
                    Err(_) => None,
                };
                for r in first..end {
                    let bit = r - first;
                    let set = bits.map_or(true, |b| b[(bit / 8) as usize] >> (bit % 8) & 1 == 1);
                    dirty[r as usize] |= set;
                }
            }
        }
        let resync = shared.in_sync() >= 2;
        let mut resync_regions = 0;
        for (r, d) in dirty.iter().enumerate() {
            if *d {
                let region = &shared.regions[r];
                region.state.store(DIRTY, SeqCst);
                if resync {
                    region.resync.store(true, SeqCst);
                    resync_regions += 1;
                }
            }
        }
        shared.resync_left.store(resync_regions, SeqCst);
        for (i, (leg, fresh)) in shared.legs.iter().zip(&fresh_legs).enumerate() {
            let result = if *fresh {
                write_superblock(&shared, i, &leg.target(), events)
            } else {
                write_fresh_leg(&shared, i, &leg.target(), events)
            };
            result?;
        }
        Ok((
            shared,
            Assembly::Existing {
                resync_regions,
                rebuilding,
            },
        ))
    }

    /// How assembly went.
    pub fn assembly(&self) -> &Assembly {
        &self.assembly
    }

    /// The controls of the running mirror.
    pub fn handle(&self) -> MirrorHandle {
        MirrorHandle {
            shared: Arc::clone(&self.shared),
            needs_data: self.needs_data,
        }
    }
}

fn targets(shared: &Shared) -> Vec<BoxTarget> {
    shared.legs.iter().map(|l| l.target()).collect()
}

/// Writes leg `i`'s superblock at generation `events` to `target`.
fn write_superblock(
    shared: &Shared,
    i: usize,
    target: &BoxTarget,
    events: u64,
) -> Result<(), MirrorError> {
    let mut buf = vec![0u8; BLOCK];
    shared
        .superblock(i, events)
        .encode(&mut buf)
        .map_err(|e| err(e.to_string()))?;
    target
        .dyn_write_at(0, &buf)
        .map_err(|e| err(format!("leg {i}: cannot write its superblock: {e}")))
}

/// Writes the whole bitmap as it stands, then the superblock, to leg `i`'s `target` (a new
/// leg, or one about to be rebuilt).
fn write_fresh_leg(
    shared: &Shared,
    i: usize,
    target: &BoxTarget,
    events: u64,
) -> Result<(), MirrorError> {
    let layout = shared.layout;
    let mut buf = vec![0u8; BLOCK];
    for block in 0..layout.bitmap_blocks {
        let first = u64::from(block) * BITS_PER_BLOCK;
        let end = (first + BITS_PER_BLOCK).min(layout.regions());
        let mut bits = vec![0u8; BLOCK - BITMAP_HEADER];
        for r in first..end {
            if shared.regions[r as usize].state.load(SeqCst) != shared::CLEAN {
                let bit = r - first;
                bits[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        encode_bitmap_block(block, &shared.uuid, &bits, &mut buf)
            .map_err(|e| err(e.to_string()))?;
        target
            .dyn_write_at(layout.bitmap_block_offset(block), &buf)
            .map_err(|e| err(format!("leg {i}: cannot write its bitmap: {e}")))?;
    }
    write_superblock(shared, i, target, events)
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.shared.request_stop();
        if let Some(daemon) = lock(&self.daemon).take() {
            if daemon.join().is_err() {
                tracing::error!("mirror: its thread panicked");
            }
        }
    }
}

impl Target for Mirror {
    type Queue = MirrorQueue;

    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<MirrorQueue> {
        let legs = self
            .shared
            .legs
            .iter()
            .map(|l| ctx.open_child(&*l.target()))
            .collect::<io::Result<_>>()?;
        Ok(MirrorQueue::new(Arc::clone(&self.shared), legs))
    }

    fn size(&self) -> Option<u64> {
        Some(self.shared.layout.dev_size)
    }

    fn needs_data(&self) -> bool {
        self.needs_data
    }

    fn copies_data(&self) -> bool {
        self.copies_data
    }

    /// Reads from the first in-sync leg.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = &self.shared;
        let end = offset.checked_add(buf.len() as u64);
        if end.map_or(true, |e| e > s.layout.dev_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end of the mirror",
            ));
        }
        let leg = s
            .source()
            .ok_or_else(|| io::Error::other("no in-sync leg"))?;
        s.legs[leg]
            .target()
            .dyn_read_at(s.layout.data_offset + offset, buf)
    }

    /// Writes to every leg that holds the range, by the rules of a queue's write (bits
    /// durable first, never into a region being copied). Not from the mirror's own thread.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.shared.direct_write(offset, buf)
    }
}

impl MirrorHandle {
    /// The number of legs.
    pub fn legs(&self) -> usize {
        self.shared.legs.len()
    }

    /// Leg `i`'s state.
    pub fn leg_state(&self, i: usize) -> Option<LegState> {
        self.shared.legs.get(i).map(|l| l.state())
    }

    /// The layout of the legs.
    pub fn layout(&self) -> Layout {
        self.shared.layout
    }

    /// Bytes copied by resyncs of dirty regions, and by rebuilds, since assembly.
    pub fn copied(&self) -> (u64, u64) {
        (
            self.shared.resync_bytes.load(SeqCst),
            self.shared.rebuild_bytes.load(SeqCst),
        )
    }

    /// Leg `i` as `ublk status` shows it: its state and, while rebuilding, its progress.
    pub fn leg_json(&self, i: usize) -> Value {
        let s = &self.shared;
        let Some(leg) = s.legs.get(i) else {
            return Value::Null;
        };
        let state = leg.state();
        let mut o = json!({
            "leg": i,
            "state": state.name(),
            "target": leg.name(),
            "read_errors": leg.read_errors.load(SeqCst),
        });
        if state == LegState::Rebuilding {
            o["rebuild"] = json!({
                "done_bytes": leg.cursor.load(SeqCst),
                "total_bytes": s.layout.dev_size,
            });
        }
        o
    }

    /// The mirror's own fields for `ublk status`.
    pub fn status(&self) -> Value {
        let s = &self.shared;
        let meta = lock(&s.meta);
        let dirty = s
            .regions
            .iter()
            .filter(|r| r.state.load(SeqCst) != shared::CLEAN)
            .count();
        let in_sync = s.in_sync();
        json!({
            "uuid": uuid_string(&s.uuid),
            "events": meta.events,
            "region": s.layout.region_size,
            "data_offset": s.layout.data_offset,
            "state": if in_sync == s.legs.len() { "clean" } else { "degraded" },
            "in_sync": in_sync,
            "dirty_regions": dirty,
            "resync": {
                "regions_left": s.resync_left.load(SeqCst),
                "copied_bytes": s.resync_bytes.load(SeqCst),
            },
            "rebuild_copied_bytes": s.rebuild_bytes.load(SeqCst),
            "repaired_bytes": s.repaired_bytes.load(SeqCst),
            "rebuild_rate": meta.rate,
            "last_error": meta.last_error,
            "legs": (0..s.legs.len()).map(|i| self.leg_json(i)).collect::<Vec<_>>(),
        })
    }

    /// Marks leg `i` faulty (`ublk fail`). The last in-sync leg cannot be failed.
    pub fn fail(&self, i: usize) -> Result<(), MirrorError> {
        let s = &self.shared;
        if i >= s.legs.len() {
            return Err(err(format!("the mirror has no leg {i}")));
        }
        match s.fail_leg(i, "failed by the operator") {
            Some(_) => Ok(()),
            None => Err(err(format!(
                "leg {i} is the last in-sync leg: failing it would lose the data"
            ))),
        }
    }

    /// Puts `target` (named `name`) in the place of leg `i`, which must be faulty or
    /// missing, and starts its rebuild (`ublk replace`).
    pub fn replace(&self, i: usize, target: BoxTarget, name: String) -> Result<(), MirrorError> {
        let s = &self.shared;
        let Some(leg) = s.legs.get(i) else {
            return Err(err(format!("the mirror has no leg {i}")));
        };
        let state = leg.state();
        if !matches!(state, LegState::Faulty | LegState::Missing) {
            return Err(err(format!(
                "leg {i} is {}: fail it first (ublk fail)",
                state.name()
            )));
        }
        let need = s.layout.data_offset + s.layout.dev_size;
        let size = target.dyn_size().unwrap_or(0);
        if size < need {
            return Err(err(format!(
                "{name} holds {size} bytes; a leg of this mirror needs {need}"
            )));
        }
        if target.dyn_needs_data() && !self.needs_data {
            return Err(err(format!(
                "{name} touches request bytes, which this device's zero-copy mode rules out"
            )));
        }
        let events = lock(&s.meta).events;
        write_fresh_leg(s, i, &target, events)?;
        s.replace(i, target, name);
        Ok(())
    }

    /// Limits rebuild and resync copies to `bytes_per_sec` (0: no limit).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        lock(&self.shared.meta).rate = bytes_per_sec;
        self.shared.kick();
    }
}
