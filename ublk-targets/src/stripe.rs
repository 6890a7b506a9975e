//! The stripe target (RAID-0): the device is cut into chunks of a fixed power-of-two size,
//! dealt round-robin over N children. Chunk `k` of the device (`k = offset / chunk`) lives on
//! child `k % N`, at child offset `(k / N) * chunk + offset % chunk`; so a child holds every
//! Nth chunk, packed, and the device is N times the smallest child (rounded down to the chunk).
//!
//! [`Layout`] is the address arithmetic alone: it splits a device request into per-child
//! [`Extent`]s and maps a child byte back to the device. [`Stripe`] is the target: each
//! request is fanned out over the children with [`QueueCtx::fan_out`], every piece a view of
//! the request's own memory (zero-copy where the children pass bytes on), all of them in the
//! same loop turn, and joined by the engine (all must succeed, first error wins). Flush goes
//! to every child; discard and write-zeroes go to each child as one range per run of chunks
//! contiguous there.

use std::io;

use ublk_zc::{
    copies_data_all, needs_data_any, BoxTarget, Child, Io, Op, OpenCtx, QueueCtx, QueueTarget,
    Target,
};

/// The default chunk: 64 KiB, as md's.
pub const DEFAULT_CHUNK: u64 = 64 << 10;

/// The smallest chunk a stripe accepts: one page, so that no chunk splits a page.
pub const MIN_CHUNK: u64 = 4096;

/// Why a stripe layout was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The chunk size is not a power of two.
    #[error("stripe chunk {0} is not a power of two")]
    ChunkNotPowerOfTwo(u64),
    /// The chunk size is below [`MIN_CHUNK`].
    #[error("stripe chunk {0} is smaller than 4K (4096 bytes)")]
    ChunkTooSmall(u64),
    /// Fewer than two children.
    #[error("a stripe needs at least 2 children, got {0}")]
    TooFewChildren(u32),
}

/// The RAID-0 geometry: a chunk size and a number of children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    chunk: u64,
    children: u32,
}

/// One piece of a device request that lies on a single child, within a single chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The child, `0..children`.
    pub child: u32,
    /// Where the piece starts on the child.
    pub child_offset: u64,
    /// Where the piece starts within the request (0 for the first extent).
    pub at: u64,
    /// The piece's length in bytes, never 0.
    pub len: u64,
}

impl Layout {
    /// A layout of `children` children with `chunk`-byte chunks: `chunk` must be a power of
    /// two of at least [`MIN_CHUNK`], and there must be at least two children.
    pub fn new(chunk: u64, children: u32) -> Result<Layout, LayoutError> {
        if !chunk.is_power_of_two() {
            return Err(LayoutError::ChunkNotPowerOfTwo(chunk));
        }
        if chunk < MIN_CHUNK {
            return Err(LayoutError::ChunkTooSmall(chunk));
        }
        if children < 2 {
            return Err(LayoutError::TooFewChildren(children));
        }
        Ok(Layout { chunk, children })
    }

    /// The chunk size in bytes.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// The number of children.
    pub fn children(&self) -> u32 {
        self.children
    }

    /// The device size for children of these sizes: the number of children times the
    /// smallest size rounded down to the chunk (bytes past that on larger children go unused).
    /// 0 when `child_sizes` is empty; saturates at `u64::MAX`.
    pub fn device_size(&self, child_sizes: &[u64]) -> u64 {
        let smallest = child_sizes.iter().copied().min().unwrap_or(0);
        let per_child = smallest & !(self.chunk - 1);
        per_child.saturating_mul(u64::from(self.children))
    }

    /// Splits the device request `offset..offset + len` at chunk boundaries, in request
    /// order. Empty when `len` is 0. A request running past `u64::MAX` is cut there (callers
    /// keep requests within [`device_size`](Self::device_size)).
    pub fn map(&self, offset: u64, len: u64) -> Extents {
        Extents {
            layout: *self,
            offset,
            at: 0,
            remaining: len,
        }
    }

    /// The device offset of byte `child_offset` of child `child`: the inverse of
    /// [`map`](Self::map). `child` must be below [`children`](Self::children); the result
    /// saturates at `u64::MAX` for child offsets beyond any device.
    pub fn to_device(&self, child: u32, child_offset: u64) -> u64 {
        let row = child_offset >> self.shift();
        let within = child_offset & (self.chunk - 1);
        let k = row
            .saturating_mul(u64::from(self.children))
            .saturating_add(u64::from(child));
        k.checked_shl(self.shift())
            .filter(|start| start >> self.shift() == k)
            .map_or(u64::MAX, |start| start.saturating_add(within))
    }

    /// log2 of the chunk size.
    fn shift(&self) -> u32 {
        self.chunk.trailing_zeros()
    }
}

/// The extents of one request, from [`Layout::map`].
#[derive(Debug, Clone)]
pub struct Extents {
    layout: Layout,
    /// The device offset of the next extent.
    offset: u64,
    /// The request offset of the next extent.
    at: u64,
    /// Bytes of the request not yet mapped.
    remaining: u64,
}

impl Iterator for Extents {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        if self.remaining == 0 {
            return None;
        }
        let chunk = self.layout.chunk;
        let k = self.offset >> self.layout.shift();
        let within = self.offset & (chunk - 1);
        let n = u64::from(self.layout.children);
        let len = (chunk - within).min(self.remaining);
        // (k / n) * chunk <= k * chunk = offset - within: neither step can overflow.
        let extent = Extent {
            child: (k % n) as u32, // k % n < n, which came from a u32
            child_offset: ((k / n) << self.layout.shift()) + within,
            at: self.at,
            len,
        };
        self.remaining -= len;
        self.at += len; // at + len <= the request's len
        match self.offset.checked_add(len) {
            Some(next) => self.offset = next,
            None => self.remaining = 0,
        }
        Some(extent)
    }
}

impl std::iter::FusedIterator for Extents {}

/// Why a stripe could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StripeError {
    /// The layout is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A child does not report its size.
    #[error("child {0} has no known size")]
    UnknownSize(usize),
    /// Children differ in size by more than the chunk rounding.
    #[error("children differ in size: {sizes} bytes (with chunk {chunk}, each must hold the same number of whole chunks)")]
    UnequalChildren {
        /// The children's sizes, comma-separated.
        sizes: String,
        /// The chunk size.
        chunk: u64,
    },
    /// The children are smaller than one chunk.
    #[error("the children are smaller than one {0}-byte chunk")]
    TooSmall(u64),
}

/// A RAID-0 stripe over N ≥ 2 children.
pub struct Stripe {
    layout: Layout,
    children: Vec<BoxTarget>,
    size: u64,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stripe")
            .field("layout", &self.layout)
            .field("children", &self.children.len())
            .field("size", &self.size)
            .finish()
    }
}

impl Stripe {
    /// Stripes `children` with `chunk`-byte chunks. Every child must know its size, and all
    /// must hold the same number of whole chunks; the device is N times that.
    pub fn new(children: Vec<BoxTarget>, chunk: u64) -> Result<Self, StripeError> {
        let n = u32::try_from(children.len()).unwrap_or(u32::MAX);
        let layout = Layout::new(chunk, n)?;
        let sizes = children
            .iter()
            .enumerate()
            .map(|(i, c)| c.dyn_size().ok_or(StripeError::UnknownSize(i)))
            .collect::<Result<Vec<u64>, _>>()?;
        let chunks: Vec<u64> = sizes.iter().map(|s| s / chunk).collect();
        if chunks.iter().any(|&c| c != chunks[0]) {
            let sizes = sizes.iter().map(u64::to_string).collect::<Vec<_>>();
            return Err(StripeError::UnequalChildren {
                sizes: sizes.join(", "),
                chunk,
            });
        }
        let size = layout.device_size(&sizes);
        if size == 0 {
            return Err(StripeError::TooSmall(chunk));
        }
        Ok(Stripe {
            layout,
            children,
            size,
        })
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
}

impl Target for Stripe {
    type Queue = StripeQueue;

    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<StripeQueue> {
        let children = self
            .children
            .iter()
            .map(|c| ctx.open_child(&**c))
            .collect::<io::Result<_>>()?;
        Ok(StripeQueue {
            layout: self.layout,
            children,
            runs: Vec::new(),
        })
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn needs_data(&self) -> bool {
        needs_data_any(&self.children)
    }

    fn copies_data(&self) -> bool {
        copies_data_all(&self.children)
    }

    /// Reads each chunk's piece from its child.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        crate::check_range(offset, buf.len(), self.size)?;
        for e in self.layout.map(offset, buf.len() as u64) {
            let piece = &mut buf[e.at as usize..(e.at + e.len) as usize];
            self.children[e.child as usize].dyn_read_at(e.child_offset, piece)?;
        }
        Ok(())
    }

    /// Writes each chunk's piece to its child.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        crate::check_range(offset, buf.len(), self.size)?;
        for e in self.layout.map(offset, buf.len() as u64) {
            let piece = &buf[e.at as usize..(e.at + e.len) as usize];
            self.children[e.child as usize].dyn_write_at(e.child_offset, piece)?;
        }
        Ok(())
    }
}

/// One queue of a [`Stripe`].
#[derive(Debug)]
pub struct StripeQueue {
    layout: Layout,
    children: Vec<Child>,
    /// Discard/write-zeroes: per child, the run being gathered `(start, end)` on the child
    /// and where it starts in the request.
    runs: Vec<Option<(u64, u64, u64)>>,
}

impl QueueTarget for StripeQueue {
    fn submit(&mut self, mut io: Io, ctx: &mut QueueCtx<'_>) {
        let req = io.block_io();
        if req.op != Op::Flush {
            // A request inside one chunk is only readdressed, as md does: no split, no join.
            let mut pieces = self.layout.map(req.offset, u64::from(req.len));
            if let (Some(e), None) = (pieces.next(), pieces.next()) {
                let child = self.children[e.child as usize];
                return match io.set_offset(e.child_offset) {
                    Ok(()) => ctx.forward(child, io),
                    Err(_) => io.fail(libc::EINVAL),
                };
            }
        }
        let mut fan = ctx.fan_out(io);
        let sent = match req.op {
            Op::Flush => self.children.iter().try_for_each(|&c| fan.send(c, 0, 0, 0)),
            Op::Read | Op::Write => {
                self.layout
                    .map(req.offset, u64::from(req.len))
                    .try_for_each(|e| {
                        // Extents lie inside the request, whose length fits a u32.
                        let child = self.children[e.child as usize];
                        fan.send(child, e.at as u32, e.len as u32, e.child_offset)
                    })
            }
            _ => self.send_runs(req.offset, u64::from(req.len), &mut fan),
        };
        if let Err(e) = sent {
            tracing::error!("stripe: {e}");
        }
    }
}

impl StripeQueue {
    /// Discard and write-zeroes carry no data, so the chunks of one child that are contiguous
    /// there go as one request, whatever lies between them in the device.
    fn send_runs(
        &mut self,
        offset: u64,
        len: u64,
        fan: &mut ublk_zc::FanOut<'_, '_>,
    ) -> io::Result<()> {
        self.runs.clear();
        self.runs.resize(self.children.len(), None);
        for e in self.layout.map(offset, len) {
            let run = &mut self.runs[e.child as usize];
            match run {
                Some((_, end, _)) if *end == e.child_offset => *end += e.len,
                _ => {
                    if let Some(done) = run.replace((e.child_offset, e.child_offset + e.len, e.at))
                    {
                        send_run(fan, self.children[e.child as usize], done)?;
                    }
                }
            }
        }
        for (i, run) in self.runs.iter().enumerate() {
            if let Some(run) = *run {
                send_run(fan, self.children[i], run)?;
            }
        }
        Ok(())
    }
}

fn send_run(
    fan: &mut ublk_zc::FanOut<'_, '_>,
    child: Child,
    (start, end, at): (u64, u64, u64),
) -> io::Result<()> {
    let len = u32::try_from(end - start).map_err(|_| io::Error::other("run too long"))?;
    // A run's chunks are not contiguous in the request, but discard and write-zeroes carry no
    // bytes: only the length matters. It fits: the run starts at `at` and every chunk of it
    // lies further on in the request.
    fan.send(child, at as u32, len, start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout(chunk: u64, children: u32) -> Layout {
        Layout::new(chunk, children).unwrap()
    }

    #[test]
    fn new_checks_chunk_and_children() {
        assert_eq!(
            Layout::new(3 << 12, 2),
            Err(LayoutError::ChunkNotPowerOfTwo(3 << 12))
        );
        assert_eq!(Layout::new(0, 2), Err(LayoutError::ChunkNotPowerOfTwo(0)));
        assert_eq!(Layout::new(2048, 2), Err(LayoutError::ChunkTooSmall(2048)));
        assert_eq!(Layout::new(4096, 1), Err(LayoutError::TooFewChildren(1)));
        assert_eq!(Layout::new(4096, 0), Err(LayoutError::TooFewChildren(0)));
        let l = layout(64 << 10, 3);
        assert_eq!((l.chunk(), l.children()), (64 << 10, 3));
        assert_eq!(
            LayoutError::ChunkTooSmall(2048).to_string(),
            "stripe chunk 2048 is smaller than 4K (4096 bytes)"
        );
        assert_eq!(
            LayoutError::TooFewChildren(1).to_string(),
            "a stripe needs at least 2 children, got 1"
        );
    }

    #[test]
    fn device_size_uses_the_smallest_child_rounded_to_the_chunk() {
        let l = layout(64 << 10, 2);
        assert_eq!(l.device_size(&[10 << 20, (10 << 20) + 100]), 20 << 20);
        assert_eq!(l.device_size(&[100 << 10, 1 << 20]), 2 * (64 << 10));
        assert_eq!(l.device_size(&[(64 << 10) - 1, 1 << 20]), 0);
        assert_eq!(l.device_size(&[]), 0);
        assert_eq!(layout(1 << 62, 8).device_size(&[u64::MAX; 8]), u64::MAX);
    }

    #[test]
    fn map_splits_at_chunk_boundaries() {
        let l = layout(4096, 3);
        let got: Vec<Extent> = l.map(4096 * 4 + 100, 4096 * 2).collect();
        let e = |child, child_offset, at, len| Extent {
            child,
            child_offset,
            at,
            len,
        };
        assert_eq!(
            got,
            [
                // chunk 4: child 1, row 1
                e(1, 4096 + 100, 0, 4096 - 100),
                // chunk 5: child 2, row 1
                e(2, 4096, 4096 - 100, 4096),
                // chunk 6: child 0, row 2
                e(0, 8192, 8192 - 100, 100),
            ]
        );
        assert_eq!(l.map(12345, 0).count(), 0);
        assert_eq!(l.map(0, 4096).collect::<Vec<_>>(), [e(0, 0, 0, 4096)]);
    }

    #[test]
    fn map_and_to_device_do_not_overflow_at_the_end_of_the_address_space() {
        let l = layout(1 << 21, 7);
        let got: Vec<Extent> = l.map(u64::MAX - 10, 100).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len, 11);
        let got: Vec<Extent> = l.map(u64::MAX, 1).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(l.to_device(got[0].child, got[0].child_offset), u64::MAX);
        assert_eq!(l.to_device(6, u64::MAX), u64::MAX);
        let big = layout(1 << 63, u32::MAX);
        assert_eq!(big.map(u64::MAX - 1, u64::MAX).count(), 1);
        assert_eq!(big.to_device(u32::MAX - 1, 5), u64::MAX);
        assert_eq!(big.to_device(1, 5), (1 << 63) + 5);
    }

    #[test]
    fn every_byte_of_a_small_device_has_exactly_one_home() {
        let l = layout(4096, 3);
        let rows = 4;
        let size = l.device_size(&[4096 * rows; 3]);
        let mut owner = vec![vec![None; (4096 * rows) as usize]; 3];
        for extent in l.map(0, size) {
            for i in 0..extent.len {
                let slot = &mut owner[extent.child as usize][(extent.child_offset + i) as usize];
                assert_eq!(*slot, None);
                *slot = Some(extent.at + i);
            }
        }
        for (child, bytes) in owner.iter().enumerate() {
            for (child_offset, device) in bytes.iter().enumerate() {
                let device = device.expect("every child byte is used");
                assert_eq!(l.to_device(child as u32, child_offset as u64), device);
            }
        }
    }

    /// A layout and a request within a device of whole rows.
    fn layout_and_request() -> impl Strategy<Value = (Layout, u64, u64)> {
        (12u32..=21, 2u32..=8, 1u64..=64)
            .prop_flat_map(|(shift, n, rows)| {
                let size = (rows * u64::from(n)) << shift;
                (Just(layout(1 << shift, n)), 0..=size, Just(size))
            })
            .prop_flat_map(|(l, offset, size)| (Just(l), Just(offset), 0..=size - offset))
    }

    proptest! {
        #[test]
        fn extents_tile_the_request((l, offset, len) in layout_and_request()) {
            let mut next_at = 0;
            for e in l.map(offset, len) {
                prop_assert_eq!(e.at, next_at);
                prop_assert!(e.len > 0);
                prop_assert!(e.child < l.children());
                let start = offset + e.at;
                prop_assert_eq!(start / l.chunk(), (start + e.len - 1) / l.chunk());
                prop_assert_eq!(
                    e.child_offset / l.chunk(),
                    (e.child_offset + e.len - 1) / l.chunk()
                );
                next_at += e.len;
            }
            prop_assert_eq!(next_at, len);
        }

        #[test]
        fn bytes_map_by_the_formula_and_back(
            (l, offset, len) in layout_and_request(),
            pick in any::<u64>(),
        ) {
            let extents: Vec<Extent> = l.map(offset, len).collect();
            // Each extent is one run of a chunk on one child, so checking its ends checks
            // every byte in it.
            for e in &extents {
                for i in [0, e.len - 1] {
                    prop_assert_eq!(l.to_device(e.child, e.child_offset + i), offset + e.at + i);
                }
            }
            if len > 0 {
                let byte = offset + pick % len;
                let holders: Vec<&Extent> = extents
                    .iter()
                    .filter(|e| (offset + e.at..offset + e.at + e.len).contains(&byte))
                    .collect();
                prop_assert_eq!(holders.len(), 1);
                let e = holders[0];
                let k = byte / l.chunk();
                let n = u64::from(l.children());
                prop_assert_eq!(u64::from(e.child), k % n);
                prop_assert_eq!(
                    e.child_offset + (byte - offset - e.at),
                    (k / n) * l.chunk() + byte % l.chunk()
                );
            }
        }

        #[test]
        fn no_two_device_bytes_share_a_child_byte((l, offset, len) in layout_and_request()) {
            let mut pieces: Vec<(u32, u64, u64)> = l
                .map(offset, len)
                .map(|e| (e.child, e.child_offset, e.child_offset + e.len))
                .collect();
            pieces.sort_unstable();
            for pair in pieces.windows(2) {
                if pair[0].0 == pair[1].0 {
                    prop_assert!(pair[0].2 <= pair[1].1, "{:?} overlaps {:?}", pair[0], pair[1]);
                }
            }
        }
    }
}
