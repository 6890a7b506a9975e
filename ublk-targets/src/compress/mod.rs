//! A compressing node: a logical device of `size` bytes stored compressed in its child, crash
//! consistent across a `kill -9` at any moment.
//!
//! The child holds two superblock copies, two map checkpoints, a journal and a data area
//! ([`format`](mod@format) has the layout and every encoding). Each 4 KiB logical block maps to one
//! extent of the data area (or to nothing, for a block of zeroes), compressed with lz4 or
//! zstd, or raw when compression does not pay.
//!
//! - **Reads** decompress one extent per block. An extent whose checksum does not match is
//!   `EIO`, never garbage.
//! - **Writes** are copy-on-write: each block is compressed into a newly allocated extent;
//!   once the child has it, the block's map entry (an atomic, shared by every queue) points
//!   to it. The old extent stays allocated until a commit makes the new mapping durable. A
//!   request that covers part of a block merges it with the block's current content.
//! - **FLUSH** commits: it flushes the child (every extent installed so far is durable), then
//!   writes the map entries changed since the last commit to the journal with FUA; then the
//!   extents they replaced are free. Flushes arriving while a commit runs share the next one.
//!   A **FUA** write is a write followed by a commit.
//! - **Discard and write-zeroes** set the map entries to zero, freeing the extents at the
//!   next commit.
//! - **Hole punching**: once a commit has made frees durable (overwrites' old extents,
//!   discarded blocks), every whole 4 KiB child page left entirely free is discarded in the
//!   child with a Discard request of the node's own, sent through the queue like its other
//!   child I/O — so it reaches whatever the child is (a file punches a hole, RAM frees the
//!   page, a mirror discards on every leg) without blocking the queue thread, as a direct
//!   `fallocate` would. The pages stay allocated until the discard ends, so no new extent
//!   lands there first. A child that answers `EOPNOTSUPP` is not asked again.
//! - When the journal has no room for a commit's records, the commit **checkpoints** instead:
//!   the whole map goes to the inactive checkpoint area, the child is flushed, and the other
//!   superblock copy is written with FUA, pointing to it; the journal starts over.
//!
//! Opening ([`Compress::open`]) makes a new image on a blank child (both superblock copies
//! zero), or loads the newer valid superblock, its map checkpoint (every block must check),
//! and replays the journal up to its first torn or stale block. It then writes a checkpoint
//! whose journal sequence starts past anything the journal area may hold, so a tail left by a
//! crash can never be replayed later.
//!
//! A metadata write that fails leaves the image as the last commit made it, but the device
//! fails every later write and flush (reads go on): the in-memory state can no longer be
//! trusted to match the child.

mod codec;
pub mod format;
mod pool;
mod queue;
mod shared;

use std::io;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use serde_json::{json, Value};
use ublk_zc::{BoxTarget, OpenCtx, Target};

use format::{
    decode_journal_block, decode_map_block, encode_map_block, Algo, Extent, FormatError, Layout,
    Superblock, BLOCK, BLOCK_BYTES, ENTRIES_PER_BLOCK,
};
pub use pool::MAX_WORKERS;
pub use queue::CompressQueue;
use shared::{lock, Alloc, Shared};

/// How an image is opened.
#[derive(Debug, Clone, Default)]
pub struct CompressOptions {
    /// The logical size: required for a new image; for an existing one it must match.
    pub size: Option<u64>,
    /// The algorithm for new extents (default lz4 for a new image; an existing image keeps
    /// its own unless one is given, and its old extents stay readable either way).
    pub algo: Option<Algo>,
    /// Threads that compress the blocks written to every queue of the device (at most
    /// [`MAX_WORKERS`]); 0: each queue thread runs the codec itself.
    pub workers: usize,
}

/// Why an image could not be opened or checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CompressError(pub String);

fn err(msg: impl Into<String>) -> CompressError {
    CompressError(msg.into())
}

/// How opening went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A blank child: a new image.
    New,
    /// An existing image, with this many journal records replayed over its checkpoint.
    Existing {
        /// Records replayed from the journal.
        replayed: u64,
    },
}

/// A compressing node over one child.
#[derive(Debug)]
pub struct Compress {
    shared: Arc<Shared>,
    opened: Opened,
    pool: Option<pool::Pool>,
    workers: usize,
}

/// A running compressed image's status, for the control socket.
#[derive(Debug, Clone)]
pub struct CompressHandle {
    shared: Arc<Shared>,
    workers: usize,
}

/// Byte offset on the child of the superblock copy generation `generation` is written to:
/// the copies alternate, so a torn write leaves the previous generation intact.
pub(crate) fn superblock_offset(generation: u64) -> u64 {
    (generation % 2) * BLOCK_BYTES
}

/// An image as read from its child: the superblock in force, the map after journal replay,
/// and how many records the journal held.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) sb: Superblock,
    pub(crate) map: Vec<u64>,
    pub(crate) replayed: u64,
    /// Journal blocks replayed.
    pub(crate) journal_blocks: u64,
    /// Why replay stopped before the end of the journal area, if it did.
    pub(crate) journal_end: Option<FormatError>,
}

impl Compress {
    /// Opens the image on `child`: a new one on a blank child (`opts.size` required), else
    /// the one it holds.
    pub fn open(child: BoxTarget, opts: &CompressOptions) -> Result<Compress, CompressError> {
        let child_size = child
            .dyn_size()
            .ok_or_else(|| err("the child has no known size"))?;
        let copies = read_superblocks(&child)?;
        let blank = copies.iter().all(|c| *c == Err(FormatError::Blank));
        let (mut sb, map, opened) = if blank {
            let size = opts
                .size
                .ok_or_else(|| err("a new compressed image needs size="))?;
            let layout = Layout::new(size, child_size).map_err(|e| err(e.to_string()))?;
            let uuid = crate::mirror::meta::new_uuid()
                .map_err(|e| err(format!("cannot make a UUID: {e}")))?;
            let sb = Superblock {
                version: format::VERSION,
                uuid,
                size,
                algo: opts.algo.unwrap_or(Algo::Lz4),
                generation: 0,
                active_map: 1,
                checkpoint_seq: 0,
                layout,
            };
            let map = vec![0; (size / BLOCK_BYTES) as usize];
            (sb, map, Opened::New)
        } else {
            let loaded = load(&child, copies)?;
            let mut sb = loaded.sb;
            if let Some(size) = opts.size {
                if size != sb.size {
                    return Err(err(format!(
                        "the image holds {} logical bytes, not {size}",
                        sb.size
                    )));
                }
            }
            if let Some(algo) = opts.algo {
                sb.algo = algo;
            }
            let opened = Opened::Existing {
                replayed: loaded.replayed,
            };
            (sb, loaded.map, opened)
        };
        let mut alloc = Alloc::new(sb.layout.data_sectors);
        if let Some(lba) = alloc.claim_map(&map).first() {
            return Err(err(format!(
                "block {lba}'s extent overlaps another or lies outside the data area"
            )));
        }
        // Opening writes a checkpoint and a superblock: an older image is upgraded here.
        sb.version = format::VERSION;
        if opts.workers > MAX_WORKERS {
            return Err(err(format!(
                "workers={}: at most {MAX_WORKERS}",
                opts.workers
            )));
        }
        let sb = checkpoint_direct(&child, &sb, &map)?;
        let pool = match opts.workers {
            0 => None,
            n => Some(
                pool::Pool::start(n, sb.algo)
                    .map_err(|e| err(format!("cannot start the compression workers: {e}")))?,
            ),
        };
        let shared = Shared::new(child, &sb, map, alloc);
        Ok(Compress {
            shared: Arc::new(shared),
            opened,
            pool,
            workers: opts.workers,
        })
    }

    /// How opening went.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// The status of the running image.
    pub fn handle(&self) -> CompressHandle {
        CompressHandle {
            shared: Arc::clone(&self.shared),
            workers: self.workers,
        }
    }
}

/// Reads and decodes both superblock copies. A copy whose generation belongs in the other
/// copy's place was not written by this format (writes alternate: even generations in A,
/// odd in B), and is refused: honouring it would let the next write replace the copy in
/// force.
fn read_superblocks(
    child: &BoxTarget,
) -> Result<Vec<Result<Superblock, FormatError>>, CompressError> {
    let mut buf = vec![0u8; 2 * BLOCK];
    child
        .dyn_read_at(0, &mut buf)
        .map_err(|e| err(format!("cannot read the superblocks: {e}")))?;
    Ok(buf
        .chunks(BLOCK)
        .enumerate()
        .map(|(copy, block)| {
            let sb = Superblock::decode(block)?;
            if superblock_offset(sb.generation) != copy as u64 * BLOCK_BYTES {
                return Err(FormatError::Invalid(format!(
                    "generation {} does not belong in this copy",
                    sb.generation
                )));
            }
            Ok(sb)
        })
        .collect())
}

/// The superblock in force: the valid copy with the higher generation.
fn newest(copies: &[Result<Superblock, FormatError>]) -> Result<Superblock, CompressError> {
    copies
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .max_by_key(|sb| sb.generation)
        .cloned()
        .ok_or_else(|| {
            let why: Vec<String> = copies
                .iter()
                .map(|c| match c {
                    Ok(_) => "valid".into(),
                    Err(e) => e.to_string(),
                })
                .collect();
            err(format!(
                "no valid superblock (copy A: {}; copy B: {})",
                why.first().map_or("missing", String::as_str),
                why.get(1).map_or("missing", String::as_str)
            ))
        })
}

/// Loads an existing image: the newer valid superblock, its map checkpoint, the journal.
/// Nothing is allocated for the map before the superblock's layout is known to fit the
/// child, so a forged superblock cannot make it huge.
pub(crate) fn load(
    child: &BoxTarget,
    copies: Vec<Result<Superblock, FormatError>>,
) -> Result<Loaded, CompressError> {
    let sb = newest(&copies)?;
    let child_size = child
        .dyn_size()
        .ok_or_else(|| err("the child has no known size"))?;
    if sb.layout.end() > child_size {
        return Err(err(format!(
            "the image needs {} bytes of child, the child holds {child_size} (truncated?)",
            sb.layout.end()
        )));
    }
    let blocks = sb.blocks();
    let layout = sb.layout;
    let valid = |lba: u64, entry: u64| -> Result<(), CompressError> {
        match Extent::decode(entry) {
            Ok(None) => Ok(()),
            Ok(Some(e)) if layout.holds(&e) => Ok(()),
            Ok(Some(e)) => Err(err(format!(
                "block {lba}'s extent {e:?} lies outside the data area"
            ))),
            Err(e) => Err(err(format!("block {lba}: {e}"))),
        }
    };
    let mut map = Vec::with_capacity(blocks as usize);
    let mut buf = vec![0u8; BLOCK];
    for index in 0..layout.map_blocks {
        child
            .dyn_read_at(layout.map_block_offset(sb.active_map, index), &mut buf)
            .map_err(|e| err(format!("cannot read map block {index}: {e}")))?;
        let entries = decode_map_block(index, sb.generation, &buf)
            .map_err(|e| err(format!("map checkpoint block {index} is damaged: {e}")))?;
        for (i, entry) in entries.into_iter().enumerate() {
            let lba = index * ENTRIES_PER_BLOCK + i as u64;
            if lba < blocks {
                valid(lba, entry)?;
                map.push(entry);
            } else if entry != 0 {
                return Err(err(format!("map entry past the last block ({lba})")));
            }
        }
    }
    let mut replayed = 0;
    let mut journal_blocks = 0;
    let mut journal_end = None;
    for pos in 0..layout.journal_blocks {
        child
            .dyn_read_at(layout.journal_offset(pos), &mut buf)
            .map_err(|e| err(format!("cannot read journal block {pos}: {e}")))?;
        let records = match decode_journal_block(sb.checkpoint_seq + pos, &sb.uuid, &buf) {
            Ok(records) => records,
            Err(why) => {
                journal_end = Some(why);
                newer_journal(child, &sb, pos, &mut buf)?;
                break;
            }
        };
        journal_blocks += 1;
        for (lba, entry) in records {
            if lba >= blocks {
                return Err(err(format!("journal block {pos} names block {lba}")));
            }
            valid(lba, entry)?;
            map[lba as usize] = entry;
            replayed += 1;
        }
    }
    Ok(Loaded {
        sb,
        map,
        replayed,
        journal_blocks,
        journal_end,
    })
}

/// Refuses an image whose journal, from position `from` on, holds a block written under a
/// newer superblock than `sb`: one whose sequence number is past what `sb` expects there.
///
/// Sequence numbers only grow, so a block left from an earlier pass always carries less than
/// the in-force superblock expects at its position, and a superblock torn by a crash was
/// never followed by journal writes (commits wait for it). A higher one means the newer
/// superblock copy became durable and was damaged later: falling back to the older copy
/// would silently lose every commit since, and the extents those commits freed may hold
/// other blocks' data now.
fn newer_journal(
    child: &BoxTarget,
    sb: &Superblock,
    from: u64,
    buf: &mut [u8],
) -> Result<(), CompressError> {
    for pos in from..sb.layout.journal_blocks {
        child
            .dyn_read_at(sb.layout.journal_offset(pos), buf)
            .map_err(|e| err(format!("cannot read journal block {pos}: {e}")))?;
        let expected = sb.checkpoint_seq + pos;
        match format::journal_block_seq(&sb.uuid, buf) {
            Some(seq) if seq > expected => {
                return Err(err(format!(
                    "journal block {pos} carries sequence {seq}, past the {expected} the \
                     superblock in force (generation {}) expects: a newer superblock copy \
                     was damaged, and the commits since this one would be lost",
                    sb.generation
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Writes `map` as a new checkpoint and the superblock pointing to it, with direct access
/// (each write durable before the next). The new journal's sequence numbers start past
/// every block the journal area may hold. Returns the superblock now in force.
fn checkpoint_direct(
    child: &BoxTarget,
    sb: &Superblock,
    map: &[u64],
) -> Result<Superblock, CompressError> {
    let mut next = sb.clone();
    next.generation += 1;
    next.active_map = 1 - sb.active_map;
    next.checkpoint_seq = sb.checkpoint_seq + sb.layout.journal_blocks;
    let layout = sb.layout;
    const CHUNK: u64 = 256;
    let mut first = 0;
    while first < layout.map_blocks {
        let n = (layout.map_blocks - first).min(CHUNK);
        let mut buf = vec![0u8; n as usize * BLOCK];
        for i in 0..n {
            let index = first + i;
            let a = (index * ENTRIES_PER_BLOCK) as usize;
            let b = (a + ENTRIES_PER_BLOCK as usize).min(map.len());
            let out = &mut buf[i as usize * BLOCK..(i as usize + 1) * BLOCK];
            encode_map_block(index, next.generation, &map[a.min(b)..b], out)
                .map_err(|e| err(e.to_string()))?;
        }
        child
            .dyn_write_at(layout.map_block_offset(next.active_map, first), &buf)
            .map_err(|e| err(format!("cannot write the map checkpoint: {e}")))?;
        first += n;
    }
    let mut buf = vec![0u8; BLOCK];
    next.encode(&mut buf).map_err(|e| err(e.to_string()))?;
    child
        .dyn_write_at(superblock_offset(next.generation), &buf)
        .map_err(|e| err(format!("cannot write the superblock: {e}")))?;
    Ok(next)
}

impl Drop for Compress {
    /// A clean stop (`ublk del`, SIGTERM): the kernel sends no FLUSH when it removes the
    /// device, so the writes completed since the last commit are made durable here, with a
    /// checkpoint of the live map written directly. The queues are gone by now; every extent
    /// the live map references is on the child and none of them has been reused (an extent
    /// an overwrite frees waits for a commit). `kill -9` skips this: then only what was
    /// flushed survives, as promised.
    fn drop(&mut self) {
        let s = &self.shared;
        if s.broken.load(SeqCst) {
            return;
        }
        let mut commit = lock(&s.commit);
        if !commit.running && !s.dirty.any() {
            return;
        }
        let map = s.map_entries(0, s.blocks());
        match checkpoint_direct(&s.child, &commit.sb, &map) {
            Ok(sb) => {
                commit.sb = sb;
                commit.journal_pos = 0;
            }
            Err(e) => tracing::error!("compress: the writes since the last flush are lost: {e}"),
        }
    }
}

impl Target for Compress {
    type Queue = CompressQueue;

    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<CompressQueue> {
        let child = ctx.open_child(&*self.shared.child)?;
        Ok(CompressQueue::with_pool(
            Arc::clone(&self.shared),
            child,
            self.pool.clone(),
        ))
    }

    fn size(&self) -> Option<u64> {
        Some(self.shared.size)
    }

    /// It compresses the request bytes itself, with the copy methods only.
    fn copies_data(&self) -> bool {
        true
    }
}

impl CompressHandle {
    /// The logical size.
    pub fn logical_bytes(&self) -> u64 {
        self.shared.size
    }

    /// Bytes the live map's extents store, headers included.
    pub fn stored_bytes(&self) -> u64 {
        self.shared.stored_bytes.load(SeqCst)
    }

    /// Bytes of the data area allocated, extents waiting for a commit included.
    pub fn allocated_bytes(&self) -> u64 {
        self.shared.allocated_bytes()
    }

    /// The node's fields for `ublk status`.
    pub fn status(&self) -> Value {
        let s = &self.shared;
        let stored = self.stored_bytes();
        let data = s.nonzero_blocks.load(SeqCst) * BLOCK_BYTES;
        let ratio = if stored == 0 {
            0.0
        } else {
            data as f64 / stored as f64
        };
        let sb = lock(&s.commit).sb.clone();
        json!({
            "uuid": crate::mirror::meta::uuid_string(&s.uuid),
            "algo": sb.algo.to_string(),
            "format_version": sb.version,
            "workers": self.workers,
            "logical_bytes": s.size,
            "data_bytes": data,
            "stored_bytes": stored,
            "allocated_bytes": self.allocated_bytes(),
            "ratio": ratio,
            "metadata_bytes": s.layout.data,
            "data_area_bytes": s.layout.data_sectors * format::SECTOR,
            "generation": sb.generation,
            "broken": s.broken.load(SeqCst),
        })
    }
}

/// What [`check`] found in an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The child's size in bytes.
    pub child_bytes: u64,
    /// What each superblock copy (A, B) holds: `valid, generation N` or why it was refused.
    pub copies: [String; 2],
    /// The superblock in force (the valid copy with the higher generation), if any.
    pub superblock: Option<Superblock>,
    /// The logical size.
    pub logical_bytes: u64,
    /// Map checkpoint blocks that checked.
    pub map_blocks: u64,
    /// Journal blocks replayed over the checkpoint.
    pub journal_blocks: u64,
    /// Journal records replayed over the checkpoint.
    pub replayed: u64,
    /// Why the replay stopped before the end of the journal area (normal: the end of what
    /// was committed, or a write torn by a crash).
    pub journal_end: Option<String>,
    /// Blocks with an extent.
    pub extents: u64,
    /// Extents that failed their check.
    pub damaged_extents: u64,
    /// Bytes those extents store, headers included.
    pub stored_bytes: u64,
    /// Bytes of the data area the extents occupy (whole sectors).
    pub allocated_bytes: u64,
    /// Bytes in the data area.
    pub data_area_bytes: u64,
    /// What is wrong; empty for a clean image.
    pub damage: Vec<String>,
}

impl Report {
    /// Whether the image checked clean.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// At most this many damage lines are printed; the count says how many more there are.
const DAMAGE_LINES: usize = 50;

impl std::fmt::Display for Report {
    /// The report `ublk check` prints: a verdict, then one line per part of the image.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_clean() {
            writeln!(f, "clean")?;
        } else {
            writeln!(f, "DAMAGED: {} problem(s)", self.damage.len())?;
        }
        for (name, copy) in ["A", "B"].iter().zip(&self.copies) {
            writeln!(f, "superblock {name}: {copy}")?;
        }
        let Some(sb) = &self.superblock else {
            return self.damage_lines(f);
        };
        let l = &sb.layout;
        writeln!(
            f,
            "in force: copy {} (generation {}), format version {}, uuid {}, algo {}, \
             logical size {} bytes ({} blocks), child {} bytes",
            ["A", "B"][(sb.generation % 2) as usize],
            sb.generation,
            sb.version,
            crate::mirror::meta::uuid_string(&sb.uuid),
            sb.algo,
            sb.size,
            sb.blocks(),
            self.child_bytes
        )?;
        writeln!(
            f,
            "layout: map A at {}, map B at {} ({} blocks each), journal at {} ({} blocks), \
             data at {} ({} bytes)",
            l.map_a,
            l.map_b,
            l.map_blocks,
            l.journal,
            l.journal_blocks,
            l.data,
            self.data_area_bytes
        )?;
        writeln!(
            f,
            "map: checkpoint {}, {} of {} blocks check",
            ["A", "B"][sb.active_map.min(1) as usize],
            self.map_blocks,
            l.map_blocks
        )?;
        write!(
            f,
            "journal: {} records replayed from {} blocks (sequence {}..)",
            self.replayed, self.journal_blocks, sb.checkpoint_seq
        )?;
        match &self.journal_end {
            Some(why) => writeln!(f, "; replay stopped at the next block: {why}")?,
            None => writeln!(f)?,
        }
        writeln!(
            f,
            "extents: {} checked, {} damaged",
            self.extents, self.damaged_extents
        )?;
        let ratio = if self.stored_bytes == 0 {
            0.0
        } else {
            (self.extents * BLOCK_BYTES) as f64 / self.stored_bytes as f64
        };
        writeln!(
            f,
            "space: {} bytes stored ({} allocated) of a {}-byte data area, {} free; \
             ratio {ratio:.2}",
            self.stored_bytes,
            self.allocated_bytes,
            self.data_area_bytes,
            self.data_area_bytes.saturating_sub(self.allocated_bytes)
        )?;
        self.damage_lines(f)
    }
}

impl Report {
    fn damage_lines(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for d in self.damage.iter().take(DAMAGE_LINES) {
            writeln!(f, "damage: {d}")?;
        }
        if self.damage.len() > DAMAGE_LINES {
            writeln!(
                f,
                "damage: ... and {} more",
                self.damage.len() - DAMAGE_LINES
            )?;
        }
        Ok(())
    }
}

/// Verifies the image on `child` without a device and without writing to it: the
/// superblocks, every map checkpoint block, the journal replay, every extent's header,
/// checksum and decompression, that no two extents overlap and that each lies in the data
/// area, and that the child holds the whole layout. Damage is listed in the report; an
/// image that cannot be loaded (no valid superblock, a damaged checkpoint) is a report with
/// that damage and what could be read. `Err` only when the child cannot be read at all.
pub fn check(child: &BoxTarget) -> Result<Report, CompressError> {
    let child_bytes = child
        .dyn_size()
        .ok_or_else(|| err("the child has no known size"))?;
    let copies = read_superblocks(child)?;
    let mut report = Report {
        child_bytes,
        ..Report::default()
    };
    for (out, copy) in report.copies.iter_mut().zip(&copies) {
        *out = match copy {
            Ok(sb) => format!("valid, generation {}", sb.generation),
            Err(e) => e.to_string(),
        };
    }
    if let Ok(sb) = newest(&copies) {
        report.logical_bytes = sb.size;
        report.data_area_bytes = sb.layout.data_sectors * format::SECTOR;
        report.superblock = Some(sb);
    }
    let loaded = match load(child, copies) {
        Ok(loaded) => loaded,
        Err(e) => {
            report.damage.push(e.0);
            return Ok(report);
        }
    };
    let sb = &loaded.sb;
    report.map_blocks = sb.layout.map_blocks;
    report.journal_blocks = loaded.journal_blocks;
    report.replayed = loaded.replayed;
    report.journal_end = loaded.journal_end.map(|e| {
        match e {
            FormatError::Blank | FormatError::Magic => "no journal block there",
            FormatError::Invalid(_) => "a block of an earlier pass through the journal",
            FormatError::Checksum => "checksum mismatch (a write torn by a crash)",
            _ => "not a journal block",
        }
        .to_string()
    });
    let mut alloc = Alloc::new(sb.layout.data_sectors);
    let overlapping = alloc.claim_map(&loaded.map);
    let mut codec = codec::Codec::new(sb.algo);
    let mut buf = vec![0u8; format::MAX_EXTENT.next_multiple_of(format::SECTOR as usize)];
    let mut out = vec![0u8; BLOCK];
    for (lba, entry) in loaded.map.iter().enumerate() {
        let Ok(Some(e)) = Extent::decode(*entry) else {
            continue;
        };
        report.extents += 1;
        report.stored_bytes += u64::from(e.len);
        if overlapping.binary_search(&(lba as u64)).is_ok() {
            report.damaged_extents += 1;
            report
                .damage
                .push(format!("block {lba}: its extent overlaps another"));
            continue;
        }
        let bytes = &mut buf[..(e.sectors() * format::SECTOR) as usize];
        let read = child.dyn_read_at(sb.layout.sector_offset(e.sector), bytes);
        let why = match read {
            Err(why) => Some(format!("cannot read: {why}")),
            Ok(()) => codec
                .decompress(lba as u64, &e, bytes, &mut out)
                .err()
                .map(|why| why.to_string()),
        };
        if let Some(why) = why {
            report.damaged_extents += 1;
            report.damage.push(format!(
                "block {lba}: extent at data sector {} + {} ({} bytes): {why}",
                e.sector, e.at, e.len
            ));
        }
    }
    report.allocated_bytes = alloc.allocated * format::SECTOR;
    Ok(report)
}
