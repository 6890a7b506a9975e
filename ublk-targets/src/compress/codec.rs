//! One 4 KiB block in and out of an extent: compression with the image's algorithm (raw when
//! it does not pay), and decompression of any kind.

use super::format::{
    open_extent, seal_extent, Algo, Extent, FormatError, Kind, BLOCK, EXTENT_HEADER, MAX_EXTENT,
};

/// A compressor and decompressor, one per queue (zstd contexts are reused, not shared).
pub(crate) struct Codec {
    algo: Algo,
    zstd_c: Option<zstd::bulk::Compressor<'static>>,
    zstd_d: Option<zstd::bulk::Decompressor<'static>>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("algo", &self.algo).finish()
    }
}

/// The largest zstd window decompression accepts (128 KiB): far above the 4 KiB a block's
/// frame needs, far below what a hostile image could otherwise make it allocate.
const ZSTD_WINDOW_LOG_MAX: u32 = 17;

/// Bytes of an extent buffer that [`Codec::compress`] fills with no intermediate copy:
/// the header and lz4's worst case for a block.
pub(crate) const ROOMY: usize = EXTENT_HEADER + lz4_flex::block::get_maximum_output_size(BLOCK);

/// A compressed payload is kept only below this size; otherwise the block is stored raw.
const KEEP_BELOW: usize = BLOCK - EXTENT_HEADER;

impl Codec {
    pub(crate) fn new(algo: Algo) -> Codec {
        Codec {
            algo,
            zstd_c: None,
            zstd_d: None,
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(BLOCK)],
        }
    }

    /// Stores `block` (4096 bytes) as the extent of logical block `lba` in `out` (at least
    /// [`MAX_EXTENT`] bytes; with [`ROOMY`] bytes lz4 writes into it with no copy): `None`
    /// for an all-zero block (no extent), else the kind and the stored length. Bytes of
    /// `out` past that length may be changed.
    pub(crate) fn compress(
        &mut self,
        lba: u64,
        block: &[u8],
        out: &mut [u8],
    ) -> Result<Option<(Kind, usize)>, FormatError> {
        if block.len() != BLOCK || out.len() < MAX_EXTENT {
            return Err(FormatError::TooShort);
        }
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let payload = &mut out[EXTENT_HEADER..];
        let packed = match self.algo {
            // lz4_flex wants room for its worst case: straight into `out` when it has
            // that room (a queue's extent buffers do), else through the scratch buffer.
            Algo::Lz4 if payload.len() >= self.scratch.len() => {
                match lz4_flex::block::compress_into(block, payload) {
                    Ok(n) if n < KEEP_BELOW => Some(n),
                    _ => None,
                }
            }
            Algo::Lz4 => match lz4_flex::block::compress_into(block, &mut self.scratch) {
                Ok(n) if n < KEEP_BELOW => {
                    payload[..n].copy_from_slice(&self.scratch[..n]);
                    Some(n)
                }
                _ => None,
            },
            Algo::Zstd(level) => {
                if self.zstd_c.is_none() {
                    self.zstd_c = zstd::bulk::Compressor::new(level).ok();
                }
                let c = self.zstd_c.as_mut();
                // Too large for the room below KEEP_BELOW is an error: stored raw.
                match c.map(|c| c.compress_to_buffer(block, &mut payload[..KEEP_BELOW - 1])) {
                    Some(Ok(n)) if n < KEEP_BELOW => Some(n),
                    _ => None,
                }
            }
        };
        let (kind, n) = match packed {
            Some(n) => (self.algo.kind(), n),
            None => {
                payload[..BLOCK].copy_from_slice(block);
                (Kind::Raw, BLOCK)
            }
        };
        let len = seal_extent(lba, kind, n, out)?;
        Ok(Some((kind, len)))
    }

    /// Checks the extent `e` of block `lba` read into `buf` and decompresses it into `out`
    /// (4096 bytes).
    pub(crate) fn decompress(
        &mut self,
        lba: u64,
        e: &Extent,
        buf: &[u8],
        out: &mut [u8],
    ) -> Result<(), FormatError> {
        if out.len() != BLOCK {
            return Err(FormatError::TooShort);
        }
        let payload = open_extent(lba, e, buf)?;
        let n = match e.kind {
            Kind::Raw if payload.len() == BLOCK => {
                out.copy_from_slice(payload);
                BLOCK
            }
            Kind::Raw => 0,
            Kind::Lz4 => lz4_flex::block::decompress_into(payload, out).unwrap_or(0),
            Kind::Zstd => {
                if self.zstd_d.is_none() {
                    self.zstd_d = zstd::bulk::Decompressor::new().ok().and_then(|mut d| {
                        // A frame of one block never needs a larger window; a forged frame
                        // asking for one (zstd's default limit is 128 MiB) is refused.
                        d.window_log_max(ZSTD_WINDOW_LOG_MAX).ok()?;
                        Some(d)
                    });
                }
                let d = self.zstd_d.as_mut();
                match d.map(|d| d.decompress_to_buffer(payload, out)) {
                    Some(Ok(n)) => n,
                    _ => 0,
                }
            }
        };
        if n != BLOCK {
            return Err(FormatError::Invalid(format!(
                "block {lba}: the {:?} payload does not decompress to {BLOCK} bytes",
                e.kind
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(algo: Algo, block: &[u8]) -> Option<(Kind, usize)> {
        let mut c = Codec::new(algo);
        let mut ext = vec![0; MAX_EXTENT];
        let got = c.compress(9, block, &mut ext).expect("compress");
        if let Some((kind, len)) = got {
            let e = Extent {
                sector: 0,
                at: 0,
                len: len as u32,
                kind,
            };
            let mut out = vec![0; BLOCK];
            c.decompress(9, &e, &ext, &mut out).expect("decompress");
            assert_eq!(out, block);
        }
        got
    }

    #[test]
    fn zero_compressible_and_random_blocks() {
        let text: Vec<u8> = b"the quick brown fox "
            .iter()
            .copied()
            .cycle()
            .take(BLOCK)
            .collect();
        let mut x = 0x9e3779b97f4a7c15u64;
        let random: Vec<u8> = (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for algo in [Algo::Lz4, Algo::Zstd(3)] {
            assert_eq!(round_trip(algo, &[0; BLOCK]), None);
            let (kind, len) = round_trip(algo, &text).expect("stored");
            assert_eq!(kind, algo.kind());
            assert!(len < 200, "{algo}: {len}");
            assert_eq!(round_trip(algo, &random), Some((Kind::Raw, MAX_EXTENT)));
        }
        // Into a buffer with room for lz4's worst case (no copy), with stale bytes in it.
        let mut c = Codec::new(Algo::Lz4);
        for block in [&text, &random] {
            let mut roomy = vec![0xa5; ROOMY];
            let mut exact = vec![0; MAX_EXTENT];
            let a = c.compress(3, block, &mut roomy).expect("compress");
            let b = c.compress(3, block, &mut exact).expect("compress");
            assert_eq!(a, b);
            let len = a.expect("stored").1;
            assert_eq!(roomy[..len], exact[..len]);
        }
    }
}
