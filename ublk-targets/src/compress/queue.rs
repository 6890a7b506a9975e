//! One queue of a compressed device: reads decompress one extent per 4 KiB block; writes
//! compress each block into a new extent (copy-on-write: nothing the durable map references
//! is overwritten) and install it once it is on the child; FLUSH commits the changed map
//! entries to the journal, or checkpoints the whole map when the journal is full. The
//! extents of the writes compressed in one loop turn are placed together at its end
//! ([`QueueCtx::at_turn_end`]), packed in shared runs of sectors.

use std::ops::Range;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use slab::Slab;
use smallvec::SmallVec;
use ublk_core::sys::UBLK_IO_F_FUA;
use ublk_zc::{BlockIo, Bounce, Child, Completion, Io, IoFlags, Op, QueueCtx, QueueTarget};

use super::codec::{Codec, ROOMY};
use super::format::{
    block_part, blocks_of, encode_journal_block, encode_map_block, Extent, Record, BLOCK,
    BLOCK_BYTES, ENTRIES_PER_BLOCK, MAX_EXTENT, RECORDS_PER_BLOCK, SECTOR,
};
use super::pool::{Finished, Inbox, Outcome, Pool, Work, FINISHED};
use super::shared::{hold_of, lock, Shared, PACK_MAX_SECTORS, WAKE};

/// Tokens of the commit's child requests carry this bit (request tokens are `key << 16 | part`).
const COMMIT: u64 = 1 << 62;
/// Tokens of the discards that punch freed space carry this bit, and the key of the run.
const PUNCH: u64 = 1 << 61;
/// Tokens of the child writes that hold the extents of several writes carry this bit, and
/// their key in `shared_writes`.
const SHARED: u64 = 1 << 60;
/// The token of the loop turn's end, where gathered writes are placed.
const GATHERED: u64 = u64::MAX - 2;
const _: () = assert!(GATHERED != FINISHED && GATHERED != WAKE);
/// Times a read retries an extent that failed its check because the block was rewritten
/// meanwhile.
const READ_RETRIES: u8 = 4;
/// Map blocks per checkpoint write.
const MAP_CHUNK: u64 = 256;
/// Bytes of the buffers a queue reads an extent into or compresses a block into: room for
/// the longest extent in whole sectors, and for lz4's worst case (no copy after it).
const EXTENT_BUF: usize = 2 * BLOCK;
const _: () = assert!(EXTENT_BUF >= ROOMY && EXTENT_BUF >= MAX_EXTENT.div_ceil(512) * 512);
/// Extent buffers a queue keeps for reuse (a queue depth's worth covers 4 KiB I/O).
const SPARE_MAX: usize = 256;
/// Bytes of the largest buffer packed runs are written to the child from: the longest child
/// write [`CompressQueue::build_writes`] makes. Run buffers come in powers of two from twice
/// [`EXTENT_BUF`] up to it.
const RUN_BUF: usize = (PACK_MAX_SECTORS * SECTOR) as usize;
const _: () = assert!(RUN_BUF.is_power_of_two() && EXTENT_BUF.is_power_of_two());
/// Run buffers a queue keeps for reuse: a loop turn's runs are short where overwrites left
/// the free space in short holes, so a turn can send dozens.
const SPARE_RUNS: usize = 64;

#[derive(Debug)]
struct Req {
    io: Io,
    left: u32,
    error: Option<i32>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Read(SmallVec<[ReadPart; 1]>),
    Write(WriteReq),
}

/// One block of a read: where its bytes go in the request.
#[derive(Debug)]
struct ReadPart {
    lba: u64,
    entry: u64,
    /// Offset in the request.
    at: usize,
    /// The bytes of the block the request wants.
    range: Range<usize>,
    tries: u8,
}

#[derive(Debug)]
struct WriteReq {
    /// The blocks it covers; it holds their busy bits.
    blocks: SmallVec<[WriteBlock; 1]>,
    /// Extents allocated for it (freed again if the write fails).
    allocated: SmallVec<[Extent; 1]>,
    writing: bool,
    /// With compression workers: the jobs of its blocks not finished yet.
    jobs: u32,
    /// With compression workers: each block's compressed form once its job is done.
    packed: Vec<Option<Packed>>,
}

/// A block compressed by a worker.
#[derive(Debug)]
enum Packed {
    /// All zeroes: no extent.
    Zero,
    /// An extent buffer with the extent's kind and stored length.
    Extent(Bounce, super::format::Kind, usize),
}

/// Compressed blocks waiting for their extents: (block index, extent buffer, kind, stored
/// length).
/// Inline for one block: a 4 KiB write allocates no vector for them.
type Extents = SmallVec<[(usize, Bounce, super::format::Kind, usize); 1]>;

#[derive(Debug)]
struct WriteBlock {
    lba: u64,
    at: usize,
    range: Range<usize>,
    /// For a block the request covers in part: its current content, once read.
    old: Option<Vec<u8>>,
    entry: u64,
}

/// What [`CompressQueue::prepare_extents`] made of a write.
enum Prepared {
    Failed(i32),
    /// No room until a commit releases the extents overwrites freed; the compressed blocks
    /// come back.
    NoSpace(Extents),
    Writes(Vec<(BlockIo, Bounce)>),
    /// The one child write of a request of one block.
    One(BlockIo, Bounce),
}

/// The commit this queue runs.
#[derive(Debug)]
struct CommitRun {
    n: u64,
    records: Vec<Record>,
    covered: u64,
    stage: Stage,
    left: u32,
    ok: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Flushing the child: the extents the records name become durable.
    DataFlush,
    /// Writing the journal blocks (FUA).
    Journal,
    /// Writing the whole map to the inactive checkpoint area.
    Map,
    /// Flushing the child: the new checkpoint and the extents it names become durable.
    MapFlush,
    /// Writing the superblock that points to the new checkpoint (FUA).
    Superblock,
}

/// One queue of a [`super::Compress`].
#[derive(Debug)]
pub struct CompressQueue {
    s: Arc<Shared>,
    child: Child,
    codec: Codec,
    reqs: Slab<Req>,
    registered: bool,
    /// Writes waiting for a busy bit of a block another write holds.
    blocked: Vec<Io>,
    /// Answers waiting for commit `need`: `(io, need, result)`.
    waiting: Vec<(Io, u64, i32)>,
    /// Writes (by key) waiting for commit `need` to release space.
    no_space: Vec<(usize, u64)>,
    commit: Option<CommitRun>,
    /// Runs of data-area sectors being discarded in the child, by token key.
    punches: Slab<Range<u64>>,
    /// Extent buffers ([`EXTENT_BUF`] bytes) back from the child, reused so that the hot
    /// path allocates (and the kernel faults in) no memory per request.
    spare: Vec<Bounce>,
    /// A block being built (read-modify-write) or decompressed for part of a request.
    block: Box<[u8]>,
    /// The device's compression workers, if it has any.
    pool: Option<Pool>,
    /// Where the workers put this queue's finished jobs (made with the first request).
    inbox: Option<Arc<Inbox>>,
    /// Block-sized buffers the workers' jobs took and gave back, for reuse.
    spare_blocks: Vec<Bounce>,
    /// Buffers of packed runs back from the child (the power-of-two sizes of [`run_buf`]),
    /// for reuse: a new one would cost the kernel a page fault for each of its pages.
    spare_runs: Vec<Bounce>,
    /// Writes compressed this loop turn, placed together at its end.
    gathered: Vec<(usize, Extents)>,
    /// Child writes holding the extents of several writes: the writes' keys.
    shared_writes: Slab<Vec<usize>>,
}

/// An extent buffer: a spare one, or a new one.
fn extent_buf(spare: &mut Vec<Bounce>) -> Option<Bounce> {
    spare.pop().or_else(|| Bounce::new(EXTENT_BUF).ok())
}

/// Whether a buffer of `len` bytes is one of [`run_buf`]'s sizes.
fn is_run_buf(len: usize) -> bool {
    len.is_power_of_two() && len > EXTENT_BUF && len <= RUN_BUF
}

/// A buffer for a run of `len` bytes (more than [`EXTENT_BUF`]): a spare one of the
/// smallest size that holds it, or a new one (a power of two up to [`RUN_BUF`]; the
/// exact length beyond).
fn run_buf(spare: &mut Vec<Bounce>, len: usize) -> Option<Bounce> {
    let size = len.next_power_of_two();
    if size > RUN_BUF {
        return Bounce::new(len).ok();
    }
    match spare.iter().position(|b| b.len() == size) {
        Some(i) => Some(spare.swap_remove(i)),
        None => Bounce::new(size).ok(),
    }
}

/// A block buffer for a worker's job: a spare one, or a new one.
fn block_buf(spare: &mut Vec<Bounce>) -> Option<Bounce> {
    spare.pop().or_else(|| Bounce::new(BLOCK).ok())
}

/// Builds block `b`'s new content in `block`: its old content (zeroes if it had none) with
/// the request's bytes (a write's) or zeroes (a discard's or write-zeroes') over the range
/// the request covers. `Err` when the request's bytes cannot be read.
fn build_block(b: &WriteBlock, io: &Io, block: &mut [u8]) -> Result<(), ()> {
    match &b.old {
        Some(old) => block.copy_from_slice(old),
        None if b.range.len() < BLOCK => block.fill(0),
        None => {}
    }
    let dst = &mut block[b.range.clone()];
    if io.op() == Op::Write {
        io.copy_data_to(b.at, dst).map_err(drop)
    } else {
        dst.fill(0);
        Ok(())
    }
}

/// Read `key` and its part `i`, if that read is still in service.
fn read_part(reqs: &mut Slab<Req>, key: usize, i: usize) -> Option<(&mut Io, &mut ReadPart)> {
    match reqs.get_mut(key) {
        Some(Req {
            io,
            kind: Kind::Read(parts),
            ..
        }) => Some((io, parts.get_mut(i)?)),
        _ => None,
    }
}

fn token(key: usize, part: usize) -> u64 {
    (key as u64) << 16 | part as u64
}

impl CompressQueue {
    pub(crate) fn new(s: Arc<Shared>, child: Child) -> Self {
        let codec = Codec::new(s.algo);
        CompressQueue {
            s,
            child,
            codec,
            reqs: Slab::new(),
            registered: false,
            blocked: Vec::new(),
            waiting: Vec::new(),
            no_space: Vec::new(),
            commit: None,
            punches: Slab::new(),
            spare: Vec::new(),
            block: vec![0; BLOCK].into_boxed_slice(),
            pool: None,
            inbox: None,
            spare_blocks: Vec::new(),
            spare_runs: Vec::new(),
            gathered: Vec::new(),
            shared_writes: Slab::new(),
        }
    }

    /// The same, handing the compression of written blocks to `pool`'s workers.
    pub(crate) fn with_pool(s: Arc<Shared>, child: Child, pool: Option<Pool>) -> Self {
        CompressQueue {
            pool,
            ..CompressQueue::new(s, child)
        }
    }

    /// Gives a buffer back to the spare lists it came from.
    fn recycle(&mut self, buf: Bounce) {
        if buf.len() == EXTENT_BUF && self.spare.len() < SPARE_MAX {
            self.spare.push(buf);
        } else if buf.len() == BLOCK && self.spare_blocks.len() < SPARE_MAX {
            self.spare_blocks.push(buf);
        } else if is_run_buf(buf.len()) && self.spare_runs.len() < SPARE_RUNS {
            self.spare_runs.push(buf);
        }
    }

    /// Sends a request of this node's own to the child.
    fn child_io(&mut self, req: BlockIo, buf: Bounce, tok: u64, ctx: &mut QueueCtx<'_>) -> bool {
        match ctx.bounce_io(req, buf) {
            Ok(sub) => {
                ctx.send(self.child, sub, tok);
                true
            }
            Err(e) => {
                tracing::error!("compress: cannot build a child request: {e}");
                false
            }
        }
    }

    fn extent_read(&mut self, e: &Extent, tok: u64, ctx: &mut QueueCtx<'_>) -> bool {
        let len = e.sectors() * SECTOR;
        let Some(buf) = extent_buf(&mut self.spare) else {
            return false;
        };
        let req = BlockIo {
            op: Op::Read,
            offset: self.s.layout.sector_offset(e.sector),
            len: len as u32,
            flags: IoFlags::default(),
        };
        self.child_io(req, buf, tok, ctx)
    }

    // ---- reads ----

    fn read(&mut self, mut io: Io, ctx: &mut QueueCtx<'_>) {
        let (offset, len) = (io.offset(), u64::from(io.len()));
        let mut parts: SmallVec<[ReadPart; 1]> = SmallVec::new();
        for lba in blocks_of(offset, len) {
            let range = block_part(lba, offset, len);
            let at = (lba * BLOCK_BYTES + range.start as u64 - offset) as usize;
            let entry = match self.s.map.get(lba as usize) {
                Some(e) => e.load(SeqCst),
                None => return io.fail(libc::EINVAL),
            };
            if entry == 0 {
                if io.zero_data(at, range.len()).is_err() {
                    return io.fail(libc::EIO);
                }
            } else {
                parts.push(ReadPart {
                    lba,
                    entry,
                    at,
                    range,
                    tries: 0,
                });
            }
        }
        if parts.is_empty() {
            return io.complete_ok();
        }
        let n = parts.len();
        let key = self.reqs.insert(Req {
            io,
            left: n as u32,
            error: None,
            kind: Kind::Read(parts),
        });
        for i in 0..n {
            self.issue_read_part(key, i, ctx);
        }
    }

    fn issue_read_part(&mut self, key: usize, i: usize, ctx: &mut QueueCtx<'_>) {
        let entry = match &self.reqs[key].kind {
            Kind::Read(parts) => parts[i].entry,
            Kind::Write(_) => return,
        };
        let sent = match Extent::decode(entry) {
            Ok(Some(e)) if self.s.layout.holds(&e) => self.extent_read(&e, token(key, i), ctx),
            _ => false,
        };
        if !sent {
            self.part_done(key, Some(-libc::EIO), ctx);
        }
    }

    fn read_done(&mut self, key: usize, i: usize, done: &Completion, ctx: &mut QueueCtx<'_>) {
        let Some((io, part)) = read_part(&mut self.reqs, key, i) else {
            return;
        };
        // A whole block decompresses straight into the request's buffer when the server
        // holds it; anything else through the queue's block.
        let whole = part.range.len() == BLOCK;
        let direct = match io.data_mut() {
            Ok(data) if whole => data.get_mut(part.at..part.at + BLOCK),
            _ => None,
        };
        let into_request = direct.is_some();
        let out = direct.unwrap_or(&mut self.block);
        let checked = match (Extent::decode(part.entry), &done.bounce) {
            (Ok(Some(e)), Some(buf)) if done.result == (e.sectors() * SECTOR) as i32 => self
                .codec
                .decompress(part.lba, &e, buf.as_slice(), out)
                .map_err(|e| e.to_string()),
            _ => Err(format!("child read failed ({})", done.result)),
        };
        match checked {
            Ok(()) if into_request => self.part_done(key, None, ctx),
            Ok(()) => {
                let res = io.copy_data_from(part.at, &self.block[part.range.clone()]);
                self.part_done(key, res.err().map(|_| -libc::EIO), ctx);
            }
            Err(why) => self.read_failed(key, i, &why, ctx),
        }
    }

    /// Part `i` of read `key` did not check: reads it again if the map changed meanwhile,
    /// else fails it.
    fn read_failed(&mut self, key: usize, i: usize, why: &str, ctx: &mut QueueCtx<'_>) {
        let Some((io, part)) = read_part(&mut self.reqs, key, i) else {
            return;
        };
        // The block may have been rewritten and its old extent reused since the map was
        // read: read what the map says now.
        let now = self.s.map[part.lba as usize].load(SeqCst);
        if now != part.entry && part.tries < READ_RETRIES {
            part.tries += 1;
            part.entry = now;
            if now == 0 {
                let res = io.zero_data(part.at, part.range.len());
                self.part_done(key, res.err().map(|_| -libc::EIO), ctx);
            } else {
                self.issue_read_part(key, i, ctx);
            }
        } else {
            tracing::error!("compress: block {}: {why}", part.lba);
            self.part_done(key, Some(-libc::EIO), ctx);
        }
    }

    /// One child request of request `key` ended.
    fn part_done(&mut self, key: usize, error: Option<i32>, ctx: &mut QueueCtx<'_>) {
        let Some(req) = self.reqs.get_mut(key) else {
            return;
        };
        if let Some(e) = error {
            req.error.get_or_insert(e);
        }
        req.left -= 1;
        if req.left > 0 {
            return;
        }
        match &req.kind {
            Kind::Read(_) => {
                let req = self.reqs.remove(key);
                match req.error {
                    Some(e) => req.io.complete(e),
                    None => req.io.complete_ok(),
                }
            }
            Kind::Write(w) if !w.writing && req.error.is_none() => self.write_stage(key, ctx),
            Kind::Write(_) => self.finish_write(key, ctx),
        }
    }

    // ---- writes, discards, write-zeroes ----

    fn write(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        if self.s.broken.load(SeqCst) {
            return io.fail(libc::EIO);
        }
        let (offset, len) = (io.offset(), u64::from(io.len()));
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.s.size)
        {
            return io.fail(libc::EINVAL);
        }
        let mut blocks: SmallVec<[WriteBlock; 1]> = SmallVec::new();
        for lba in blocks_of(offset, len) {
            let range = block_part(lba, offset, len);
            let at = (lba * BLOCK_BYTES + range.start as u64 - offset) as usize;
            // Every block a write touches is held until its new extent is installed: a
            // read-modify-write of the block would otherwise put back stale bytes around
            // its own range over a concurrent write's.
            if !self.s.busy.set(lba) {
                for b in &blocks {
                    self.s.busy.clear(b.lba);
                }
                self.s.busy_waiting.store(true, SeqCst);
                return self.blocked.push(io);
            }
            blocks.push(WriteBlock {
                lba,
                at,
                range,
                old: None,
                entry: 0,
            });
        }
        let key = self.reqs.insert(Req {
            io,
            left: 1,
            error: None,
            kind: Kind::Write(WriteReq {
                blocks,
                allocated: SmallVec::new(),
                writing: false,
                jobs: 0,
                packed: Vec::new(),
            }),
        });
        // Read the current content of the blocks covered in part.
        let mut reads = Vec::new();
        if let Some(Req {
            kind: Kind::Write(w),
            left,
            ..
        }) = self.reqs.get_mut(key)
        {
            for (i, b) in w.blocks.iter_mut().enumerate() {
                if b.range.len() == BLOCK {
                    continue;
                }
                let entry = self.s.map[b.lba as usize].load(SeqCst);
                match Extent::decode(entry) {
                    Ok(Some(e)) => {
                        b.entry = entry;
                        *left += 1;
                        reads.push((i, e));
                    }
                    _ => b.old = Some(vec![0; BLOCK]),
                }
            }
        }
        for (i, e) in reads {
            let sent = self.s.layout.holds(&e) && self.extent_read(&e, token(key, i), ctx);
            if !sent {
                self.part_done(key, Some(-libc::EIO), ctx);
            }
        }
        self.part_done(key, None, ctx);
    }

    fn rmw_read_done(&mut self, key: usize, i: usize, done: &Completion, ctx: &mut QueueCtx<'_>) {
        let Some(Req {
            kind: Kind::Write(w),
            ..
        }) = self.reqs.get_mut(key)
        else {
            return;
        };
        let b = &mut w.blocks[i];
        let mut block = vec![0u8; BLOCK];
        let checked = match (Extent::decode(b.entry), &done.bounce) {
            (Ok(Some(e)), Some(buf)) if done.result == (e.sectors() * SECTOR) as i32 => self
                .codec
                .decompress(b.lba, &e, buf.as_slice(), &mut block)
                .is_ok(),
            _ => false,
        };
        if checked {
            b.old = Some(block);
            self.part_done(key, None, ctx);
        } else {
            tracing::error!("compress: block {}: cannot read it to merge a write", b.lba);
            self.part_done(key, Some(-libc::EIO), ctx);
        }
    }

    /// Every block's new content is known: compress, allocate, write the extents. With
    /// workers, the blocks go to them first (unless they came back already and only room
    /// was missing).
    fn write_stage(&mut self, key: usize, ctx: &mut QueueCtx<'_>) {
        let packed = match self.reqs.get_mut(key) {
            Some(Req {
                kind: Kind::Write(w),
                ..
            }) if !w.packed.is_empty() => Some(std::mem::take(&mut w.packed)),
            _ => None,
        };
        let extents = match packed {
            Some(packed) => self.unpack(key, packed),
            None if self.pool.is_some() => return self.send_to_workers(key, ctx),
            None => self.compress_blocks(key),
        };
        match extents {
            Ok(extents) => self.gather(key, extents, ctx),
            Err(e) => self.prepared(key, Prepared::Failed(e), ctx),
        }
    }

    fn prepared(&mut self, key: usize, prepared: Prepared, ctx: &mut QueueCtx<'_>) {
        match prepared {
            Prepared::Failed(e) => {
                if let Some(req) = self.reqs.get_mut(key) {
                    req.error.get_or_insert(e);
                }
                self.finish_write(key, ctx);
            }
            Prepared::NoSpace(extents) => {
                // Workers' output is kept for the retry; the queue's own is made again.
                match self.reqs.get_mut(key) {
                    Some(Req {
                        kind: Kind::Write(w),
                        ..
                    }) if self.pool.is_some() => {
                        let mut packed: Vec<Option<Packed>> =
                            (0..w.blocks.len()).map(|_| Some(Packed::Zero)).collect();
                        for (i, buf, kind, len) in extents {
                            packed[i] = Some(Packed::Extent(buf, kind, len));
                        }
                        w.packed = packed;
                    }
                    _ => {
                        for x in extents {
                            self.recycle(x.1);
                        }
                    }
                }
                self.s.short_of_space.store(true, SeqCst);
                let need = self.request_commit(ctx);
                self.no_space.push((key, need));
            }
            Prepared::Writes(writes) => self.send_writes(key, writes, ctx),
            Prepared::One(req, buf) => self.send_writes(key, [(req, buf)], ctx),
        }
    }

    /// Hands each block of write `key` to a worker, built in a block buffer first (the
    /// request's bytes over the block's old content). Whole blocks a discard or
    /// write-zeroes covers are zero without a job.
    fn send_to_workers(&mut self, key: usize, ctx: &mut QueueCtx<'_>) {
        let (Some(pool), Some(inbox)) = (&self.pool, &self.inbox) else {
            return self.prepared(key, Prepared::Failed(-libc::EIO), ctx);
        };
        let Some(Req {
            io,
            kind: Kind::Write(w),
            error,
            ..
        }) = self.reqs.get_mut(key)
        else {
            return;
        };
        let op = io.op();
        w.packed = (0..w.blocks.len()).map(|_| None).collect();
        let mut failed = None;
        for (i, b) in w.blocks.iter().enumerate() {
            if op != Op::Write && b.range.len() == BLOCK {
                w.packed[i] = Some(Packed::Zero);
                continue;
            }
            let (Some(mut src), Some(out)) = (
                block_buf(&mut self.spare_blocks),
                extent_buf(&mut self.spare),
            ) else {
                failed = Some(-libc::ENOMEM);
                break;
            };
            if build_block(b, io, src.as_mut_slice()).is_err() {
                failed = Some(-libc::EIO);
                break;
            }
            let work = Work {
                lba: b.lba,
                src,
                out,
            };
            if pool.submit(token(key, i), work, inbox).is_err() {
                tracing::error!("compress: the compression workers are gone");
                failed = Some(-libc::EIO);
                break;
            }
            w.jobs += 1;
        }
        if let Some(e) = failed {
            error.get_or_insert(e);
        }
        if w.jobs == 0 {
            self.compressed_all(key, ctx);
        }
    }

    /// A worker compressed (or failed to) block `i` of write `key` into `out`.
    fn compressed(
        &mut self,
        key: usize,
        i: usize,
        out: Bounce,
        result: Result<Option<(super::format::Kind, usize)>, String>,
        ctx: &mut QueueCtx<'_>,
    ) {
        let Some(Req {
            kind: Kind::Write(w),
            error,
            ..
        }) = self.reqs.get_mut(key)
        else {
            return self.recycle(out);
        };
        w.jobs = w.jobs.saturating_sub(1);
        let mut out = Some(out);
        match result {
            Ok(None) => w.packed[i] = Some(Packed::Zero),
            Ok(Some((kind, len))) => {
                if let Some(buf) = out.take() {
                    w.packed[i] = Some(Packed::Extent(buf, kind, len));
                }
            }
            Err(why) => {
                tracing::error!("compress: block {}: {why}", w.blocks[i].lba);
                error.get_or_insert(-libc::EIO);
            }
        }
        let left = w.jobs;
        if let Some(buf) = out {
            self.recycle(buf);
        }
        if left == 0 {
            self.compressed_all(key, ctx);
        }
    }

    /// Every job of write `key` is back: place its extents, or fail it.
    fn compressed_all(&mut self, key: usize, ctx: &mut QueueCtx<'_>) {
        let Some(Req {
            kind: Kind::Write(w),
            error,
            ..
        }) = self.reqs.get_mut(key)
        else {
            return;
        };
        let packed = std::mem::take(&mut w.packed);
        if let Some(e) = *error {
            for p in packed {
                if let Some(Packed::Extent(buf, ..)) = p {
                    self.recycle(buf);
                }
            }
            return self.prepared(key, Prepared::Failed(e), ctx);
        }
        match self.unpack(key, packed) {
            Ok(extents) => self.gather(key, extents, ctx),
            Err(e) => self.prepared(key, Prepared::Failed(e), ctx),
        }
    }

    /// The blocks workers compressed, as the extents to place (the zero blocks' entries
    /// set).
    fn unpack(&mut self, key: usize, packed: Vec<Option<Packed>>) -> Result<Extents, i32> {
        let Some(Req {
            kind: Kind::Write(w),
            ..
        }) = self.reqs.get_mut(key)
        else {
            return Err(-libc::EIO);
        };
        let mut extents = Extents::with_capacity(packed.len());
        for (i, p) in packed.into_iter().enumerate() {
            match p {
                Some(Packed::Extent(buf, kind, len)) => extents.push((i, buf, kind, len)),
                Some(Packed::Zero) => w.blocks[i].entry = 0,
                None => return Err(-libc::EIO),
            }
        }
        Ok(extents)
    }

    /// Sends the child writes of request `key`'s extents.
    fn send_writes<W>(&mut self, key: usize, writes: W, ctx: &mut QueueCtx<'_>)
    where
        W: IntoIterator<Item = (BlockIo, Bounce)>,
        W::IntoIter: ExactSizeIterator,
    {
        let writes = writes.into_iter();
        if let Some(req) = self.reqs.get_mut(key) {
            req.left = writes.len() as u32 + 1;
        }
        for (req, buf) in writes {
            if !self.child_io(req, buf, token(key, 0), ctx) {
                self.part_done(key, Some(-libc::EIO), ctx);
            }
        }
        self.part_done(key, None, ctx);
    }

    /// Builds the new content of request `key`'s blocks and compresses them: the extents to
    /// place (the zero blocks' entries set).
    fn compress_blocks(&mut self, key: usize) -> Result<Extents, i32> {
        let Some(Req {
            io,
            kind: Kind::Write(w),
            ..
        }) = self.reqs.get_mut(key)
        else {
            return Err(-libc::EIO);
        };
        let op = io.op();
        // (block index, extent buffer, kind, stored length) of the blocks with an extent.
        let mut extents = Extents::new();
        let data = if op == Op::Write {
            io.data().ok()
        } else {
            None
        };
        for (i, b) in w.blocks.iter_mut().enumerate() {
            // A whole block written is compressed where the request holds it when the
            // server has its bytes; anything else is built in the queue's block first.
            let whole = match data {
                Some(d) if b.range.len() == BLOCK => d.get(b.at..b.at + BLOCK),
                _ => None,
            };
            let src: &[u8] = match whole {
                Some(src) => src,
                None => {
                    if build_block(b, io, &mut self.block).is_err() {
                        return Err(-libc::EIO);
                    }
                    &self.block
                }
            };
            let Some(mut buf) = extent_buf(&mut self.spare) else {
                return Err(-libc::ENOMEM);
            };
            match self.codec.compress(b.lba, src, buf.as_mut_slice()) {
                Ok(None) => {
                    b.entry = 0;
                    self.spare.push(buf);
                }
                Ok(Some((kind, len))) => extents.push((i, buf, kind, len)),
                Err(_) => return Err(-libc::EIO),
            }
        }
        Ok(extents)
    }

    /// Allocates the extents of write `key`'s compressed blocks and builds the child writes
    /// that store them.
    fn place_extents(&mut self, key: usize, mut extents: Extents) -> Prepared {
        let lens: Vec<u32> = extents.iter().map(|x| x.3 as u32).collect();
        // Allocate every extent under one lock.
        let placed = {
            let mut alloc = lock(&self.s.alloc);
            match alloc.place(&lens) {
                Some(placed) => placed,
                None => {
                    // Space comes back when a commit releases what overwrites freed.
                    let can_wait = alloc.has_pending() || lock(&self.s.commit).running;
                    drop(alloc);
                    if can_wait {
                        return Prepared::NoSpace(extents);
                    }
                    for x in extents {
                        self.recycle(x.1);
                    }
                    return Prepared::Failed(-libc::ENOSPC);
                }
            }
        };
        let Some(allocated) = self.assign(key, &extents, &placed) else {
            return Prepared::Failed(-libc::EIO);
        };
        if let ([_], [e]) = (&extents[..], &allocated[..]) {
            let span = e.span();
            if let Some((_, mut buf, _, len)) = extents.pop() {
                // The rest of its last sector goes to the child too: no stale bytes.
                buf.as_mut_slice()[len..(span.end - span.start) as usize * SECTOR as usize].fill(0);
                return Prepared::One(self.child_write(span.start, span.end), buf);
            }
        }
        let items: Vec<(Extent, usize, &[u8])> = allocated
            .iter()
            .zip(&placed)
            .zip(&extents)
            .map(|((e, p), x)| (*e, p.2, &x.1.as_slice()[..x.3]))
            .collect();
        let writes = self.build_writes(&items);
        self.spare.extend(extents.into_iter().map(|x| x.1));
        self.spare.truncate(SPARE_MAX);
        match writes {
            Ok(writes) => Prepared::Writes(writes.into_iter().map(|(r, b, _)| (r, b)).collect()),
            Err(e) => Prepared::Failed(e),
        }
    }

    /// Write `key`'s compressed blocks got the places `placed` (see [`Alloc::place`](super::shared::Alloc::place)): their map
    /// entries and the extents the write holds. `None` if `key` is not a write.
    fn assign(
        &mut self,
        key: usize,
        extents: &Extents,
        placed: &[(u64, u16, usize)],
    ) -> Option<SmallVec<[Extent; 1]>> {
        let Some(Req {
            kind: Kind::Write(w),
            ..
        }) = self.reqs.get_mut(key)
        else {
            return None;
        };
        let mut allocated = SmallVec::with_capacity(placed.len());
        for ((i, _, kind, len), &(sector, at, _)) in extents.iter().zip(placed) {
            let e = Extent {
                sector,
                at,
                len: *len as u32,
                kind: *kind,
            };
            w.blocks[*i].entry = e.encode().unwrap_or(0);
            allocated.push(e);
        }
        w.allocated.clone_from(&allocated);
        w.writing = true;
        Some(allocated)
    }

    /// A child write of data-area sectors `start..end`.
    fn child_write(&self, start: u64, end: u64) -> BlockIo {
        BlockIo {
            op: Op::Write,
            offset: self.s.layout.sector_offset(start),
            len: ((end - start) * SECTOR) as u32,
            flags: IoFlags::default(),
        }
    }

    /// The child writes that store placed extents, given as (extent, run, stored bytes):
    /// one per packed run (its extents may share sectors, so one write holds them), adjacent
    /// runs joined up to 128 KiB. Each comes with the indexes of the extents it holds.
    fn build_writes(
        &mut self,
        items: &[(Extent, usize, &[u8])],
    ) -> Result<Vec<(BlockIo, Bounce, Vec<usize>)>, i32> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&j| items[j].0.bytes().start);
        // Where each run ends.
        let mut run_end = vec![0; items.iter().map(|x| x.1 + 1).max().unwrap_or(0)];
        for (e, run, _) in items {
            run_end[*run] = run_end[*run].max(e.span().end);
        }
        // (first sector, end sector, run of the last member, members)
        let mut spans: Vec<(u64, u64, usize, Vec<usize>)> = Vec::new();
        for j in order {
            let (e, run, _) = &items[j];
            let span = e.span();
            match spans.last_mut() {
                Some((_, end, last, members)) if last == run => {
                    *end = (*end).max(span.end);
                    members.push(j);
                }
                // The next run starts where this write ends and all of it fits.
                Some((start, end, last, members))
                    if *end == span.start && run_end[*run] - *start <= PACK_MAX_SECTORS =>
                {
                    *end = span.end;
                    *last = *run;
                    members.push(j);
                }
                _ => spans.push((span.start, span.end, *run, vec![j])),
            }
        }
        let mut writes = Vec::with_capacity(spans.len());
        for (start, end, _, members) in spans {
            let len = ((end - start) * SECTOR) as usize;
            let buf = if len <= EXTENT_BUF {
                extent_buf(&mut self.spare)
            } else {
                run_buf(&mut self.spare_runs, len)
            };
            let Some(mut buf) = buf else {
                return Err(-libc::ENOMEM);
            };
            // The members are in byte order; what lies between and after them is zeroed, so
            // that a reused buffer sends no stale bytes to the child.
            let out = &mut buf.as_mut_slice()[..len];
            let mut done = 0;
            for &j in &members {
                let (e, _, bytes) = &items[j];
                let at = (e.bytes().start - start * SECTOR) as usize;
                if done < at {
                    out[done..at].fill(0);
                }
                out[at..at + bytes.len()].copy_from_slice(bytes);
                done = at + bytes.len();
            }
            out[done..].fill(0);
            writes.push((self.child_write(start, end), buf, members));
        }
        Ok(writes)
    }

    /// Write `key`'s blocks are compressed: its extents are placed at the end of the loop
    /// turn, packed with those of the other writes compressed in the same turn.
    fn gather(&mut self, key: usize, extents: Extents, ctx: &mut QueueCtx<'_>) {
        if extents.is_empty() {
            let prepared = self.place_extents(key, extents);
            return self.prepared(key, prepared, ctx);
        }
        if self.gathered.is_empty() {
            ctx.at_turn_end(GATHERED);
        }
        self.gathered.push((key, extents));
    }

    /// The loop turn's end: places the extents of the writes gathered in it, packed
    /// together, and sends the child writes, each answering every write it holds extents
    /// of. Without room for them all at once, each write is placed on its own.
    fn place_gathered(&mut self, ctx: &mut QueueCtx<'_>) {
        let mut batch = std::mem::take(&mut self.gathered);
        if batch.len() == 1 {
            if let Some((key, extents)) = batch.pop() {
                let prepared = self.place_extents(key, extents);
                self.prepared(key, prepared, ctx);
            }
            return;
        }
        let lens: Vec<u32> = batch
            .iter()
            .flat_map(|(_, x)| x.iter().map(|x| x.3 as u32))
            .collect();
        let placed = lock(&self.s.alloc).place(&lens);
        let Some(placed) = placed else {
            for (key, extents) in batch {
                let prepared = self.place_extents(key, extents);
                self.prepared(key, prepared, ctx);
            }
            return;
        };
        // Each write's extents, and which write each extent belongs to.
        let mut allocated = Vec::with_capacity(lens.len());
        let mut owner = Vec::with_capacity(lens.len());
        let mut at = 0;
        for (key, extents) in &batch {
            let mine = &placed[at..at + extents.len()];
            at += extents.len();
            match self.assign(*key, extents, mine) {
                Some(es) => allocated.extend(es.into_iter().zip(mine).map(|(e, p)| (e, p.2))),
                None => allocated.extend(mine.iter().map(|p| (hold_of(p.0, p.1, 0), p.2))),
            }
            owner.extend(std::iter::repeat(*key).take(extents.len()));
        }
        let items: Vec<(Extent, usize, &[u8])> = allocated
            .iter()
            .zip(batch.iter().flat_map(|(_, x)| x.iter()))
            .map(|((e, run), x)| (*e, *run, &x.1.as_slice()[..x.3]))
            .collect();
        let writes = self.build_writes(&items);
        let keys: Vec<usize> = batch.iter().map(|(k, _)| *k).collect();
        for (_, extents) in batch {
            for x in extents {
                self.recycle(x.1);
            }
        }
        let writes = match writes {
            Ok(writes) => writes,
            Err(e) => {
                for key in keys {
                    self.prepared(key, Prepared::Failed(e), ctx);
                }
                return;
            }
        };
        // Each write is answered once every child write it has extents in is done (and the
        // sending below is over).
        for key in &keys {
            if let Some(req) = self.reqs.get_mut(*key) {
                req.left = 1;
            }
        }
        let mut holders: Vec<Vec<usize>> = Vec::with_capacity(writes.len());
        for (_, _, members) in &writes {
            let mut these: Vec<usize> = members.iter().map(|&j| owner[j]).collect();
            these.sort_unstable();
            these.dedup();
            for &key in &these {
                if let Some(req) = self.reqs.get_mut(key) {
                    req.left += 1;
                }
            }
            holders.push(these);
        }
        for ((req, buf, _), these) in writes.into_iter().zip(holders) {
            let id = self.shared_writes.insert(these);
            if !self.child_io(req, buf, SHARED | id as u64, ctx) {
                self.shared_write_done(id, -libc::EIO, ctx);
            }
        }
        for key in keys {
            self.part_done(key, None, ctx);
        }
    }

    /// A child write holding the extents of several writes ended.
    fn shared_write_done(&mut self, id: usize, result: i32, ctx: &mut QueueCtx<'_>) {
        let Some(keys) = self.shared_writes.try_remove(id) else {
            tracing::error!(id, "compress: answer for no shared write");
            return;
        };
        for key in keys {
            self.part_done(key, (result < 0).then_some(result), ctx);
        }
    }

    /// The extents are on the child (or the write failed): install them and answer.
    fn finish_write(&mut self, key: usize, ctx: &mut QueueCtx<'_>) {
        let req = self.reqs.remove(key);
        let Kind::Write(w) = req.kind else {
            return;
        };
        if let Some(e) = req.error {
            let mut alloc = lock(&self.s.alloc);
            for x in &w.allocated {
                alloc.free(x);
            }
            drop(alloc);
            self.release_busy(&w.blocks, ctx);
            return req.io.complete(e);
        }
        for b in &w.blocks {
            self.s.install(b.lba, b.entry);
        }
        self.release_busy(&w.blocks, ctx);
        if req.io.op() == Op::Write && req.io.flags().fua() {
            self.s.synced.store(true, SeqCst);
            let need = self.request_commit(ctx);
            let res = req.io.len() as i32;
            self.waiting.push((req.io, need, res));
            self.answer_waiting();
        } else {
            req.io.complete_ok();
        }
    }

    fn release_busy(&mut self, blocks: &[WriteBlock], ctx: &mut QueueCtx<'_>) {
        if blocks.is_empty() {
            return;
        }
        for b in blocks {
            self.s.busy.clear(b.lba);
        }
        if self.s.busy_waiting.swap(false, SeqCst) {
            self.s.wake_all();
        }
        self.retry_blocked(ctx);
    }

    fn retry_blocked(&mut self, ctx: &mut QueueCtx<'_>) {
        for io in std::mem::take(&mut self.blocked) {
            self.write(io, ctx);
        }
    }

    // ---- commits ----

    /// The number of a commit that starts after now; starts it here if none is running.
    fn request_commit(&mut self, ctx: &mut QueueCtx<'_>) -> u64 {
        let mut c = lock(&self.s.commit);
        let need = c.started + 1;
        if c.running {
            c.requested = c.requested.max(need);
            return need;
        }
        c.running = true;
        c.started = need;
        drop(c);
        self.start_commit(need, ctx);
        need
    }

    fn flush(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        if self.s.broken.load(SeqCst) {
            return io.fail(libc::EIO);
        }
        self.s.synced.store(true, SeqCst);
        let need = self.request_commit(ctx);
        self.waiting.push((io, need, 0));
        self.answer_waiting();
    }

    fn start_commit(&mut self, n: u64, ctx: &mut QueueCtx<'_>) {
        let (records, covered) = self.s.snapshot();
        let room = {
            let c = lock(&self.s.commit);
            let need = records.len().div_ceil(RECORDS_PER_BLOCK) as u64;
            c.journal_pos + need <= self.s.layout.journal_blocks
        };
        self.commit = Some(CommitRun {
            n,
            records,
            covered,
            stage: if room { Stage::DataFlush } else { Stage::Map },
            left: 0,
            ok: true,
        });
        if room {
            self.commit_flush(ctx);
        } else {
            self.commit_map(ctx);
        }
    }

    fn commit_send(&mut self, req: BlockIo, buf: Bounce, ctx: &mut QueueCtx<'_>) {
        let Some(run) = self.commit.as_mut() else {
            return;
        };
        run.left += 1;
        let tok = COMMIT | run.n;
        if !self.child_io(req, buf, tok, ctx) {
            self.commit_step(false, ctx);
        }
    }

    fn commit_flush(&mut self, ctx: &mut QueueCtx<'_>) {
        let req = BlockIo {
            op: Op::Flush,
            offset: 0,
            len: 0,
            flags: IoFlags::default(),
        };
        match extent_buf(&mut self.spare) {
            Some(buf) => self.commit_send(req, buf, ctx),
            None => self.commit_failed(ctx),
        }
    }

    fn commit_journal(&mut self, ctx: &mut QueueCtx<'_>) {
        let Some(run) = self.commit.as_ref() else {
            return;
        };
        if run.records.is_empty() {
            return self.commit_finished(ctx);
        }
        let (pos, seq) = {
            let c = lock(&self.s.commit);
            (c.journal_pos, c.sb.checkpoint_seq + c.journal_pos)
        };
        let chunks: Vec<&[Record]> = run.records.chunks(RECORDS_PER_BLOCK).collect();
        let Ok(mut buf) = Bounce::new(chunks.len() * BLOCK) else {
            return self.commit_failed(ctx);
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let out = &mut buf.as_mut_slice()[i * BLOCK..(i + 1) * BLOCK];
            if encode_journal_block(seq + i as u64, &self.s.uuid, chunk, out).is_err() {
                return self.commit_failed(ctx);
            }
        }
        let req = BlockIo {
            op: Op::Write,
            offset: self.s.layout.journal_offset(pos),
            len: (chunks.len() * BLOCK) as u32,
            flags: IoFlags(UBLK_IO_F_FUA),
        };
        self.commit_send(req, buf, ctx);
    }

    fn commit_map(&mut self, ctx: &mut QueueCtx<'_>) {
        let (generation, which) = {
            let c = lock(&self.s.commit);
            (c.sb.generation + 1, 1 - c.sb.active_map)
        };
        let blocks = self.s.map_blocks();
        let layout = self.s.layout;
        let mut first = 0;
        while first < blocks {
            let n = (blocks - first).min(MAP_CHUNK);
            let Ok(mut buf) = Bounce::new((n as usize) * BLOCK) else {
                return self.commit_failed(ctx);
            };
            for i in 0..n {
                let index = first + i;
                let entries = self
                    .s
                    .map_entries(index * ENTRIES_PER_BLOCK, ENTRIES_PER_BLOCK);
                let out = &mut buf.as_mut_slice()[(i as usize) * BLOCK..(i as usize + 1) * BLOCK];
                if encode_map_block(index, generation, &entries, out).is_err() {
                    return self.commit_failed(ctx);
                }
            }
            let req = BlockIo {
                op: Op::Write,
                offset: layout.map_block_offset(which, first),
                len: (n as usize * BLOCK) as u32,
                flags: IoFlags::default(),
            };
            self.commit_send(req, buf, ctx);
            first += n;
        }
    }

    fn commit_superblock(&mut self, ctx: &mut QueueCtx<'_>) {
        let sb = {
            let c = lock(&self.s.commit);
            let mut sb = c.sb.clone();
            sb.generation += 1;
            sb.active_map = 1 - sb.active_map;
            sb.checkpoint_seq += c.journal_pos;
            sb
        };
        let Ok(mut buf) = Bounce::new(BLOCK) else {
            return self.commit_failed(ctx);
        };
        if sb.encode(buf.as_mut_slice()).is_err() {
            return self.commit_failed(ctx);
        }
        let req = BlockIo {
            op: Op::Write,
            offset: super::superblock_offset(sb.generation),
            len: BLOCK as u32,
            flags: IoFlags(UBLK_IO_F_FUA),
        };
        self.commit_send(req, buf, ctx);
    }

    /// A child request of the commit ended.
    fn commit_step(&mut self, ok: bool, ctx: &mut QueueCtx<'_>) {
        let Some(run) = self.commit.as_mut() else {
            return;
        };
        run.ok &= ok;
        run.left -= 1;
        if run.left > 0 {
            return;
        }
        if !run.ok {
            return self.commit_failed(ctx);
        }
        match run.stage {
            Stage::DataFlush => {
                run.stage = Stage::Journal;
                self.commit_journal(ctx);
            }
            Stage::Journal => {
                let blocks = run.records.len().div_ceil(RECORDS_PER_BLOCK) as u64;
                lock(&self.s.commit).journal_pos += blocks;
                self.commit_finished(ctx);
            }
            Stage::Map => {
                run.stage = Stage::MapFlush;
                self.commit_flush(ctx);
            }
            Stage::MapFlush => {
                run.stage = Stage::Superblock;
                self.commit_superblock(ctx);
            }
            Stage::Superblock => {
                {
                    let mut c = lock(&self.s.commit);
                    c.sb.generation += 1;
                    c.sb.active_map = 1 - c.sb.active_map;
                    c.sb.checkpoint_seq += c.journal_pos;
                    c.journal_pos = 0;
                }
                self.commit_finished(ctx);
            }
        }
    }

    fn commit_failed(&mut self, ctx: &mut QueueCtx<'_>) {
        tracing::error!("compress: a metadata write failed; writes and flushes fail from now on");
        self.s.broken.store(true, SeqCst);
        self.commit_finished(ctx);
    }

    fn commit_finished(&mut self, ctx: &mut QueueCtx<'_>) {
        let Some(run) = self.commit.take() else {
            return;
        };
        if !self.s.broken.load(SeqCst) {
            let punch = !self.s.no_punch.load(SeqCst);
            // What overwrites freed is discarded in the child only while the commits are
            // the user's (FLUSH, FUA) and no write waits for space: commits that writes
            // short of space start hand it straight to them.
            let synced = self.s.synced.swap(false, SeqCst);
            let pressed = self.s.short_of_space.swap(false, SeqCst);
            let runs = lock(&self.s.alloc).release(run.covered, punch, synced && !pressed);
            for r in runs {
                self.punch(r, ctx);
            }
        }
        self.s.done.store(run.n, SeqCst);
        let next = {
            let mut c = lock(&self.s.commit);
            if c.requested > c.started {
                c.started += 1;
                Some(c.started)
            } else {
                c.running = false;
                None
            }
        };
        self.s.wake_all();
        self.answer_waiting();
        self.retry_no_space(ctx);
        if let Some(n) = next {
            self.start_commit(n, ctx);
        }
    }

    /// Discards a run of whole child pages that a commit left free. Only now, with the
    /// commit durable, does no map the child may be opened with reference them; the run
    /// stays allocated until the discard ends, so no new extent lands there first.
    fn punch(&mut self, run: Range<u64>, ctx: &mut QueueCtx<'_>) {
        let req = BlockIo {
            op: Op::Discard,
            offset: self.s.layout.sector_offset(run.start),
            len: ((run.end - run.start) * SECTOR) as u32,
            flags: IoFlags::default(),
        };
        let key = self.punches.insert(run);
        let sent = extent_buf(&mut self.spare)
            .is_some_and(|buf| self.child_io(req, buf, PUNCH | key as u64, ctx));
        if !sent {
            self.punch_done(key, 0);
        }
    }

    /// A discard [`CompressQueue::punch`] sent ended: its sectors are free again.
    fn punch_done(&mut self, key: usize, result: i32) {
        let Some(run) = self.punches.try_remove(key) else {
            return;
        };
        if result == -libc::EOPNOTSUPP {
            tracing::info!("compress: the child cannot discard; freed space is reused only");
            self.s.no_punch.store(true, SeqCst);
        } else if result < 0 {
            tracing::debug!("compress: discarding sectors {run:?} of the child: {result}");
        }
        lock(&self.s.alloc).punched(&run);
    }

    /// Answers what waited for a commit that is done.
    fn answer_waiting(&mut self) {
        let done = self.s.done.load(SeqCst);
        let broken = self.s.broken.load(SeqCst);
        let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.1 <= done);
        self.waiting = still;
        for (io, _, res) in ready {
            if broken {
                io.fail(libc::EIO);
            } else {
                io.complete(res);
            }
        }
    }

    fn retry_no_space(&mut self, ctx: &mut QueueCtx<'_>) {
        let done = self.s.done.load(SeqCst);
        let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.no_space)
            .into_iter()
            .partition(|w| w.1 <= done);
        self.no_space = still;
        for (key, _) in ready {
            self.write_stage(key, ctx);
        }
    }
}

impl QueueTarget for CompressQueue {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        if !self.registered {
            self.registered = true;
            self.s.register(ctx.notifier());
            if self.pool.is_some() {
                self.inbox = Some(Inbox::new(ctx.notifier()));
            }
        }
        match io.op() {
            Op::Read => self.read(io, ctx),
            Op::Write | Op::Discard | Op::WriteZeroes => self.write(io, ctx),
            Op::Flush => self.flush(io, ctx),
            _ => io.fail(libc::EOPNOTSUPP),
        }
    }

    fn complete(&mut self, mut done: Completion, ctx: &mut QueueCtx<'_>) {
        self.completed(&mut done, ctx);
        if let Some(buf) = done.bounce.take() {
            self.recycle(buf);
        }
    }
}

impl CompressQueue {
    /// What a child request's end (or a wake-up) means; its buffer is reused after.
    fn completed(&mut self, done: &mut Completion, ctx: &mut QueueCtx<'_>) {
        if done.token == FINISHED {
            return self.take_finished(ctx);
        }
        if done.token == GATHERED {
            return self.place_gathered(ctx);
        }
        if done.token == WAKE {
            self.answer_waiting();
            self.retry_no_space(ctx);
            self.retry_blocked(ctx);
            return;
        }
        if done.token & COMMIT != 0 {
            return self.commit_step(done.result >= 0, ctx);
        }
        if done.token & PUNCH != 0 {
            return self.punch_done((done.token & !PUNCH) as usize, done.result);
        }
        if done.token & SHARED != 0 {
            return self.shared_write_done((done.token & !SHARED) as usize, done.result, ctx);
        }
        let key = (done.token >> 16) as usize;
        let part = (done.token & 0xffff) as usize;
        let Some(req) = self.reqs.get(key) else {
            tracing::error!(token = done.token, "compress: answer for no request");
            return;
        };
        match &req.kind {
            Kind::Read(_) => self.read_done(key, part, done, ctx),
            Kind::Write(w) if !w.writing => self.rmw_read_done(key, part, done, ctx),
            Kind::Write(_) => {
                let err = (done.result < 0).then_some(done.result);
                self.part_done(key, err, ctx);
            }
        }
    }

    /// Takes the jobs the workers finished for this queue.
    fn take_finished(&mut self, ctx: &mut QueueCtx<'_>) {
        if let Some(inbox) = &self.inbox {
            inbox.answer();
        }
        while let Some(Finished { token, outcome }) = self.inbox.as_ref().and_then(|i| i.pop()) {
            let key = (token >> 16) as usize;
            let part = (token & 0xffff) as usize;
            let Outcome { src, out, result } = outcome;
            self.recycle(src);
            self.compressed(key, part, out, result.map_err(|e| e.to_string()), ctx);
        }
    }
}
