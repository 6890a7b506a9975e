//! The mirror's on-disk metadata: the superblock and the write-intent bitmap.
//!
//! Every leg of a mirror starts with a reserved area:
//!
//! | leg bytes                          | holds                                          |
//! |------------------------------------|------------------------------------------------|
//! | `0 .. 4096`                        | the [`Superblock`]                             |
//! | `4096 .. 4096 + bitmap_blocks * 4096` | the write-intent bitmap, one 4 KiB block each |
//! | `data_offset ..` (1 MiB aligned)   | the data area: device byte `x` is leg byte `data_offset + x` |
//!
//! All integers are little-endian; every block carries a CRC32C of itself, computed with its
//! checksum field zeroed. The superblock records the array's UUID, which leg this is, an event
//! counter (bumped on every state change: the freshest superblock wins), the [`Layout`] and
//! one [`LegRecord`] per leg. It is laid out as follows (reserved bytes are written as zero
//! and ignored on read; the checksum covers them):
//!
//! | offset | size | field           |
//! |--------|------|-----------------|
//! | 0      | 8    | magic `UBLKMIR1` |
//! | 8      | 4    | format version (1) |
//! | 12     | 4    | CRC32C of bytes 0..4096 with this field zeroed |
//! | 16     | 16   | array UUID      |
//! | 32     | 4    | this leg's index |
//! | 36     | 4    | number of legs (2..=16) |
//! | 40     | 8    | events          |
//! | 48     | 8    | region size     |
//! | 56     | 8    | device size     |
//! | 64     | 8    | data offset     |
//! | 72     | 4    | bitmap blocks   |
//! | 76     | 52   | reserved        |
//! | 128    | 16 × 16 | leg records: state u32, reserved u32, rebuild offset u64 (unused slots zero) |
//! | 384    | 3712 | reserved        |
//!
//! The device is cut into regions of `region_size` bytes (a power of two, 4 KiB to 1 GiB); a set
//! bit says its region may differ between legs. Region `r`'s bit is bit `r % 32640` of bitmap
//! block `r / 32640`. A bitmap block is a 16-byte header (magic `UBMB`, block index u32, the
//! first 4 bytes of the array UUID, CRC32C u32) followed by 4080 bytes of bits, bit `i` being
//! `bits[i / 8] >> (i % 8) & 1`.

use crate::ondisk::{block_crc, get_u32, get_u64, put_u32, put_u64};
use std::ops::Range;

/// The superblock's magic, at byte 0 of every leg.
pub const MAGIC: [u8; 8] = *b"UBLKMIR1";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// The superblock's size and a bitmap block's size.
pub const BLOCK: usize = 4096;
/// The most legs a mirror has.
pub const MAX_LEGS: usize = 16;
/// The size of a bitmap block's header; the bits follow it.
pub const BITMAP_HEADER: usize = 16;
/// The bytes of bits in one bitmap block.
pub const BITMAP_BYTES: usize = BLOCK - BITMAP_HEADER;
/// The regions one bitmap block covers.
pub const BITS_PER_BLOCK: u64 = (BITMAP_BYTES * 8) as u64;
/// The region size used when none is asked for.
pub const DEFAULT_REGION: u64 = 1 << 20;
/// The smallest region size.
pub const MIN_REGION: u64 = 4096;
/// The largest region size.
pub const MAX_REGION: u64 = 1 << 30;
/// The alignment of the data area on a leg.
pub const DATA_ALIGN: u64 = 1 << 20;
/// The granularity of the device size.
const SECTOR_ALIGN: u64 = 4096;

/// The magic at the start of a bitmap block.
const BITMAP_MAGIC: [u8; 4] = *b"UBMB";

// Superblock field offsets (see the table in the module doc).
const SB_VERSION: usize = 8;
const SB_CRC: usize = 12;
const SB_UUID: usize = 16;
const SB_LEG_INDEX: usize = 32;
const SB_LEG_COUNT: usize = 36;
const SB_EVENTS: usize = 40;
const SB_REGION_SIZE: usize = 48;
const SB_DEV_SIZE: usize = 56;
const SB_DATA_OFFSET: usize = 64;
const SB_BITMAP_BLOCKS: usize = 72;
const SB_LEGS: usize = 128;
const LEG_RECORD: usize = 16;

// Bitmap block header offsets.
const BM_INDEX: usize = 4;
const BM_UUID: usize = 8;
const BM_CRC: usize = 12;

/// Why metadata was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// The superblock is all zero: the leg was never part of a mirror.
    #[error("no superblock (blank leg)")]
    Blank,
    /// The superblock's magic is not [`MAGIC`].
    #[error("not a ublk mirror leg (magic is not \"UBLKMIR1\")")]
    NotMirror,
    /// The superblock is of a format version this build does not read.
    #[error("mirror format version {0} is not supported (this build reads {VERSION})")]
    Version(u32),
    /// The superblock does not match its checksum.
    #[error("superblock checksum mismatch (torn or damaged)")]
    Checksum,
    /// The metadata is inconsistent, or a bitmap block is not the one expected.
    #[error("invalid mirror metadata: {0}")]
    Invalid(String),
    /// The buffer is shorter than one metadata block.
    #[error("metadata buffer shorter than one {BLOCK}-byte block")]
    TooShort,
}

/// A leg's state as the superblock records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegState {
    /// Holds the same data as every other in-sync leg (bar regions set in the bitmap).
    InSync,
    /// Failed; neither read nor written until replaced.
    Faulty,
    /// Being copied onto from an in-sync leg; see [`LegRecord::rebuild_offset`].
    Rebuilding,
    /// Absent when the array was last assembled.
    Missing,
}

impl LegState {
    /// The state's name, as status output shows it.
    pub fn name(self) -> &'static str {
        match self {
            LegState::InSync => "in_sync",
            LegState::Faulty => "faulty",
            LegState::Rebuilding => "rebuilding",
            LegState::Missing => "missing",
        }
    }

    /// The state stored on disk as `v`, if any.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(LegState::InSync),
            2 => Some(LegState::Faulty),
            3 => Some(LegState::Rebuilding),
            4 => Some(LegState::Missing),
            _ => None,
        }
    }

    /// The state's on-disk value.
    pub fn to_u32(self) -> u32 {
        match self {
            LegState::InSync => 1,
            LegState::Faulty => 2,
            LegState::Rebuilding => 3,
            LegState::Missing => 4,
        }
    }
}

impl std::fmt::Display for LegState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One leg's entry in the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegRecord {
    /// The leg's state.
    pub state: LegState,
    /// For [`LegState::Rebuilding`], the bytes of the data area already copied; 0 otherwise.
    /// Never more than the device size.
    pub rebuild_offset: u64,
}

/// Where things are on a leg, and the device it gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The bytes of device one bitmap bit covers: a power of two in
    /// [`MIN_REGION`]`..=`[`MAX_REGION`].
    pub region_size: u64,
    /// The device's size in bytes: a multiple of 4096.
    pub dev_size: u64,
    /// Where the data area starts on each leg: a multiple of [`DATA_ALIGN`].
    pub data_offset: u64,
    /// The bitmap blocks after the superblock.
    pub bitmap_blocks: u32,
}

impl Layout {
    /// The layout for legs of `leg_size` bytes (the smallest leg) with `region_size` regions.
    ///
    /// The bitmap has room for a region per `region_size` bytes of the whole leg (an upper
    /// bound on the device), the data area starts at the next [`DATA_ALIGN`] boundary after
    /// it, and the device is the rest of the leg rounded down to 4096 bytes. Fails when
    /// `region_size` is not a power of two in range or when the leg cannot hold the metadata
    /// and one region.
    pub fn for_leg(leg_size: u64, region_size: u64) -> Result<Layout, MetaError> {
        check_region_size(region_size)?;
        let bitmap_blocks = leg_size
            .div_ceil(region_size)
            .div_ceil(BITS_PER_BLOCK)
            .try_into()
            .map_err(|_| {
                MetaError::Invalid(format!(
                    "a {leg_size}-byte leg needs more than {} bitmap blocks at region size \
                     {region_size}; use larger regions",
                    u32::MAX
                ))
            })?;
        let data_offset = data_offset_for(bitmap_blocks);
        let room = leg_size.saturating_sub(data_offset);
        if room < region_size {
            return Err(MetaError::Invalid(format!(
                "a {leg_size}-byte leg is too small: it needs {data_offset} bytes of metadata \
                 and at least one {region_size}-byte region"
            )));
        }
        Ok(Layout {
            region_size,
            dev_size: room - room % SECTOR_ALIGN,
            data_offset,
            bitmap_blocks,
        })
    }

    /// Number of regions: `ceil(dev_size / region_size)`.
    ///
    /// Like the other region arithmetic, this is for a layout that
    /// [validates](Layout::validate), as every one from [`Layout::for_leg`] or
    /// [`Superblock::decode`] does (a zero region size would divide by zero).
    pub fn regions(&self) -> u64 {
        self.dev_size.div_ceil(self.region_size)
    }

    /// The regions touched by bytes `[offset, offset + len)` of the device: an empty range
    /// when `len == 0`. The range is clipped to the device's regions, so every region in it
    /// has a bit.
    pub fn regions_of(&self, offset: u64, len: u64) -> Range<u64> {
        let regions = self.regions();
        let start = (offset / self.region_size).min(regions);
        if len == 0 {
            return start..start;
        }
        let last = offset.saturating_add(len - 1) / self.region_size;
        start..last.saturating_add(1).min(regions)
    }

    /// Bytes `[start, end)` of the device region `r` covers (the last region is clipped to
    /// `dev_size`; a region past the end covers nothing).
    pub fn region_bytes(&self, r: u64) -> Range<u64> {
        let start = r.saturating_mul(self.region_size).min(self.dev_size);
        let end = start.saturating_add(self.region_size).min(self.dev_size);
        start..end
    }

    /// The bitmap block holding region `r`'s bit, and the bit's index within that block's
    /// bits. The inverse of [`Layout::region_at`] for `r < regions()`.
    pub fn bit_of(&self, r: u64) -> (u32, u64) {
        let block = u32::try_from(r / BITS_PER_BLOCK).unwrap_or(u32::MAX);
        (block, r % BITS_PER_BLOCK)
    }

    /// The region whose bit is bit `bit` (below [`BITS_PER_BLOCK`]) of bitmap block `block`.
    /// Bits past the last region exist in the last block and map past `regions()`.
    pub fn region_at(&self, block: u32, bit: u64) -> u64 {
        u64::from(block) * BITS_PER_BLOCK + bit
    }

    /// Byte offset on the leg of bitmap block `block`: `BLOCK + block * BLOCK`.
    pub fn bitmap_block_offset(&self, block: u32) -> u64 {
        (u64::from(block) + 1) * BLOCK as u64
    }

    /// Checks the invariants a decoded layout must hold: the region size is a power of two in
    /// range, `data_offset` is aligned and past the bitmap, the bitmap has a bit for every
    /// region, and the device is a non-empty multiple of 4096 bytes that ends within `u64`.
    pub fn validate(&self) -> Result<(), MetaError> {
        check_region_size(self.region_size)?;
        let invalid = |what: String| Err(MetaError::Invalid(what));
        if self.data_offset % DATA_ALIGN != 0 {
            return invalid(format!(
                "data offset {} is not a multiple of {DATA_ALIGN}",
                self.data_offset
            ));
        }
        let metadata_end = (u64::from(self.bitmap_blocks) + 1) * BLOCK as u64;
        if self.data_offset < metadata_end {
            return invalid(format!(
                "data offset {} overlaps the {} bitmap blocks",
                self.data_offset, self.bitmap_blocks
            ));
        }
        if self.dev_size == 0 || self.dev_size % SECTOR_ALIGN != 0 {
            return invalid(format!(
                "device size {} is not a non-zero multiple of {SECTOR_ALIGN}",
                self.dev_size
            ));
        }
        if self.data_offset.checked_add(self.dev_size).is_none() {
            return invalid(format!(
                "data offset {} plus device size {} overflows",
                self.data_offset, self.dev_size
            ));
        }
        if self.regions() > u64::from(self.bitmap_blocks) * BITS_PER_BLOCK {
            return invalid(format!(
                "{} bitmap blocks cannot hold {} regions",
                self.bitmap_blocks,
                self.regions()
            ));
        }
        Ok(())
    }
}

/// Refuses a region size that is not a power of two in [`MIN_REGION`]`..=`[`MAX_REGION`].
fn check_region_size(region_size: u64) -> Result<(), MetaError> {
    if region_size.is_power_of_two() && (MIN_REGION..=MAX_REGION).contains(&region_size) {
        Ok(())
    } else {
        Err(MetaError::Invalid(format!(
            "region size {region_size} is not a power of two from {MIN_REGION} to {MAX_REGION}"
        )))
    }
}

/// The first [`DATA_ALIGN`] boundary past the superblock and `bitmap_blocks` bitmap blocks.
fn data_offset_for(bitmap_blocks: u32) -> u64 {
    // At most 2^32 blocks of 2^12 bytes: no overflow.
    ((u64::from(bitmap_blocks) + 1) * BLOCK as u64).next_multiple_of(DATA_ALIGN)
}

/// A leg's superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// The array's UUID, the same on every leg.
    pub uuid: [u8; 16],
    /// This leg's index in `legs`.
    pub leg_index: u32,
    /// Bumped on every state change; the freshest superblock wins.
    pub events: u64,
    /// Where things are on the leg.
    pub layout: Layout,
    /// One record per leg, 2 to [`MAX_LEGS`] of them.
    pub legs: Vec<LegRecord>,
}

impl Superblock {
    /// Writes the superblock into `buf[..BLOCK]`, checksum included.
    ///
    /// Fails with [`MetaError::TooShort`] when `buf` is shorter than [`BLOCK`], and with
    /// [`MetaError::Invalid`] when the superblock would not decode (a leg count out of range,
    /// a leg index past it, an invalid layout, a rebuild offset past the device).
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), MetaError> {
        let block = buf.get_mut(..BLOCK).ok_or(MetaError::TooShort)?;
        self.check()?;
        block.fill(0);
        block[..MAGIC.len()].copy_from_slice(&MAGIC);
        put_u32(block, SB_VERSION, VERSION);
        block[SB_UUID..SB_UUID + 16].copy_from_slice(&self.uuid);
        put_u32(block, SB_LEG_INDEX, self.leg_index);
        // `check` bounds the count by MAX_LEGS.
        put_u32(block, SB_LEG_COUNT, self.legs.len() as u32);
        put_u64(block, SB_EVENTS, self.events);
        put_u64(block, SB_REGION_SIZE, self.layout.region_size);
        put_u64(block, SB_DEV_SIZE, self.layout.dev_size);
        put_u64(block, SB_DATA_OFFSET, self.layout.data_offset);
        put_u32(block, SB_BITMAP_BLOCKS, self.layout.bitmap_blocks);
        for (i, leg) in self.legs.iter().enumerate() {
            let at = SB_LEGS + i * LEG_RECORD;
            put_u32(block, at, leg.state.to_u32());
            put_u64(block, at + 8, leg.rebuild_offset);
        }
        let crc = block_crc(block, SB_CRC);
        put_u32(block, SB_CRC, crc);
        Ok(())
    }

    /// Reads the superblock in `buf[..BLOCK]`: checks its magic (an all-zero block is
    /// [`MetaError::Blank`]), version, checksum, leg count and index, every leg state and the
    /// layout. Never panics, whatever the bytes.
    pub fn decode(buf: &[u8]) -> Result<Superblock, MetaError> {
        let block = buf.get(..BLOCK).ok_or(MetaError::TooShort)?;
        if block.iter().all(|&b| b == 0) {
            return Err(MetaError::Blank);
        }
        if block[..MAGIC.len()] != MAGIC {
            return Err(MetaError::NotMirror);
        }
        let version = get_u32(block, SB_VERSION);
        if version != VERSION {
            return Err(MetaError::Version(version));
        }
        if get_u32(block, SB_CRC) != block_crc(block, SB_CRC) {
            return Err(MetaError::Checksum);
        }
        let count = get_u32(block, SB_LEG_COUNT) as usize;
        if !(2..=MAX_LEGS).contains(&count) {
            return Err(MetaError::Invalid(format!(
                "{count} legs recorded (a mirror has 2 to {MAX_LEGS})"
            )));
        }
        let mut legs = Vec::with_capacity(count);
        for i in 0..count {
            let at = SB_LEGS + i * LEG_RECORD;
            let raw = get_u32(block, at);
            let state = LegState::from_u32(raw)
                .ok_or_else(|| MetaError::Invalid(format!("leg {i} has unknown state {raw}")))?;
            legs.push(LegRecord {
                state,
                rebuild_offset: get_u64(block, at + 8),
            });
        }
        let mut uuid = [0; 16];
        uuid.copy_from_slice(&block[SB_UUID..SB_UUID + 16]);
        let sb = Superblock {
            uuid,
            leg_index: get_u32(block, SB_LEG_INDEX),
            events: get_u64(block, SB_EVENTS),
            layout: Layout {
                region_size: get_u64(block, SB_REGION_SIZE),
                dev_size: get_u64(block, SB_DEV_SIZE),
                data_offset: get_u64(block, SB_DATA_OFFSET),
                bitmap_blocks: get_u32(block, SB_BITMAP_BLOCKS),
            },
            legs,
        };
        sb.check()?;
        Ok(sb)
    }

    /// The invariants both `encode` and `decode` hold a superblock to.
    fn check(&self) -> Result<(), MetaError> {
        let count = self.legs.len();
        if !(2..=MAX_LEGS).contains(&count) {
            return Err(MetaError::Invalid(format!(
                "{count} legs (a mirror has 2 to {MAX_LEGS})"
            )));
        }
        if self.leg_index as usize >= count {
            return Err(MetaError::Invalid(format!(
                "leg index {} is not below the leg count {count}",
                self.leg_index
            )));
        }
        self.layout.validate()?;
        if let Some((i, leg)) = self
            .legs
            .iter()
            .enumerate()
            .find(|(_, leg)| leg.rebuild_offset > self.layout.dev_size)
        {
            return Err(MetaError::Invalid(format!(
                "leg {i}'s rebuild offset {} is past the device's {} bytes",
                leg.rebuild_offset, self.layout.dev_size
            )));
        }
        Ok(())
    }
}

/// Encodes bitmap block `index` of array `uuid` from `bits` (exactly [`BITMAP_BYTES`] bytes;
/// bit `i` of the block is `bits[i / 8] >> (i % 8) & 1`) into `out[..BLOCK]`, with its
/// header: magic `UBMB`, the block index, the first 4 bytes of the array UUID (so a foreign
/// leg's blocks are not taken) and the CRC32C of the block computed with that field zeroed.
pub fn encode_bitmap_block(
    index: u32,
    uuid: &[u8; 16],
    bits: &[u8],
    out: &mut [u8],
) -> Result<(), MetaError> {
    if bits.len() != BITMAP_BYTES {
        return Err(MetaError::Invalid(format!(
            "bitmap block {index}: {} bytes of bits given, a block holds {BITMAP_BYTES}",
            bits.len()
        )));
    }
    let block = out.get_mut(..BLOCK).ok_or(MetaError::TooShort)?;
    block[..BM_INDEX].copy_from_slice(&BITMAP_MAGIC);
    put_u32(block, BM_INDEX, index);
    block[BM_UUID..BM_CRC].copy_from_slice(&uuid[..4]);
    block[BITMAP_HEADER..].copy_from_slice(bits);
    let crc = block_crc(block, BM_CRC);
    put_u32(block, BM_CRC, crc);
    Ok(())
}

/// Checks bitmap block `index` of array `uuid` in `buf[..BLOCK]` and returns its bits
/// ([`BITMAP_BYTES`] bytes of `buf`). A short buffer is [`MetaError::TooShort`]; a bad magic,
/// another block's index, another array's UUID or a checksum mismatch is
/// [`MetaError::Invalid`] saying which. Never panics, whatever the bytes.
pub fn decode_bitmap_block<'a>(
    index: u32,
    uuid: &[u8; 16],
    buf: &'a [u8],
) -> Result<&'a [u8], MetaError> {
    let block = buf.get(..BLOCK).ok_or(MetaError::TooShort)?;
    let invalid = |what: &str| Err(MetaError::Invalid(format!("bitmap block {index}: {what}")));
    if block[..BM_INDEX] != BITMAP_MAGIC {
        if block.iter().all(|&b| b == 0) {
            return invalid("blank (never written)");
        }
        return invalid("bad magic (not a ublk mirror bitmap block)");
    }
    let found = get_u32(block, BM_INDEX);
    if found != index {
        return invalid(&format!("holds block {found}'s bits"));
    }
    if block[BM_UUID..BM_CRC] != uuid[..4] {
        return invalid("belongs to another array");
    }
    if get_u32(block, BM_CRC) != block_crc(block, BM_CRC) {
        return invalid("checksum mismatch (torn or damaged)");
    }
    Ok(&block[BITMAP_HEADER..])
}

/// A fresh random array UUID (version 4, from `/dev/urandom`).
pub fn new_uuid() -> std::io::Result<[u8; 16]> {
    use std::io::Read;
    let mut uuid = [0; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut uuid)?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(uuid)
}

/// The UUID as 8-4-4-4-12 lowercase hex.
pub fn uuid_string(uuid: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in uuid.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Recomputes the checksum of the superblock in `buf[..BLOCK]`, whatever its fields hold, so
/// the fuzzer can reach the field checks behind it.
pub(crate) fn reseal_superblock(buf: &mut [u8]) {
    if let Some(block) = buf.get_mut(..BLOCK) {
        let crc = block_crc(block, SB_CRC);
        put_u32(block, SB_CRC, crc);
    }
}

/// Recomputes the checksum of the bitmap block in `buf[..BLOCK]` (see [`reseal_superblock`]).
pub(crate) fn reseal_bitmap_block(buf: &mut [u8]) {
    if let Some(block) = buf.get_mut(..BLOCK) {
        let crc = block_crc(block, BM_CRC);
        put_u32(block, BM_CRC, crc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID: [u8; 16] = [
        0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x41, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30,
        0xc8,
    ];

    fn sample() -> Superblock {
        Superblock {
            uuid: UUID,
            leg_index: 1,
            events: 42,
            layout: Layout::for_leg(1 << 30, DEFAULT_REGION).expect("1 GiB legs"),
            legs: vec![
                LegRecord {
                    state: LegState::InSync,
                    rebuild_offset: 0,
                },
                LegRecord {
                    state: LegState::Rebuilding,
                    rebuild_offset: 3 << 20,
                },
                LegRecord {
                    state: LegState::Faulty,
                    rebuild_offset: 0,
                },
            ],
        }
    }

    fn encoded(sb: &Superblock) -> Vec<u8> {
        let mut buf = vec![0xaa; BLOCK];
        sb.encode(&mut buf).expect("valid superblock");
        buf
    }

    #[test]
    fn layout_of_a_1_gib_leg() {
        let l = Layout::for_leg(1 << 30, DEFAULT_REGION).unwrap();
        assert_eq!(l.bitmap_blocks, 1);
        assert_eq!(l.data_offset, DATA_ALIGN);
        assert_eq!(l.dev_size, (1 << 30) - DATA_ALIGN);
        assert_eq!(l.regions(), 1023);
        assert_eq!(l.bitmap_block_offset(0), 4096);
        assert_eq!(l.bitmap_block_offset(2), 3 * 4096);
    }

    #[test]
    fn layout_refuses_bad_regions_and_tiny_legs() {
        for region in [0, 1, 2048, 3 << 20, 2 << 30, u64::MAX] {
            let e = Layout::for_leg(1 << 30, region).unwrap_err();
            assert!(matches!(e, MetaError::Invalid(_)), "{region}: {e}");
        }
        assert!(Layout::for_leg(DATA_ALIGN + 4096, 4096).is_ok());
        assert!(Layout::for_leg(DATA_ALIGN + 4095, 4096).is_err());
        assert!(Layout::for_leg(2 << 20, 2 << 20).is_err());
        assert!(Layout::for_leg(0, 4096).is_err());
        assert!(Layout::for_leg(u64::MAX, 4096).is_err());
        assert!(Layout::for_leg(u64::MAX, MAX_REGION).is_ok());
    }

    #[test]
    fn the_last_region_is_clipped() {
        let l = Layout::for_leg(DATA_ALIGN + (5 << 12), 8192).unwrap();
        assert_eq!(l.dev_size, 5 << 12);
        assert_eq!(l.regions(), 3);
        assert_eq!(l.region_bytes(2), 16384..20480);
        assert_eq!(l.region_bytes(3), 20480..20480);
        assert_eq!(l.regions_of(0, 0), 0..0);
        assert_eq!(l.regions_of(8191, 2), 0..2);
        assert_eq!(l.regions_of(0, u64::MAX), 0..3);
        assert_eq!(l.regions_of(u64::MAX, 1), 3..3);
    }

    #[test]
    fn bits_of_a_multi_block_bitmap() {
        let l = Layout::for_leg(DATA_ALIGN * 300, 4096).unwrap();
        assert_eq!(l.bitmap_blocks, 3);
        assert_eq!(l.bit_of(0), (0, 0));
        assert_eq!(l.bit_of(BITS_PER_BLOCK - 1), (0, BITS_PER_BLOCK - 1));
        assert_eq!(l.bit_of(BITS_PER_BLOCK), (1, 0));
        assert_eq!(l.region_at(2, 5), 2 * BITS_PER_BLOCK + 5);
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sample();
        let buf = encoded(&sb);
        assert_eq!(&buf[..8], b"UBLKMIR1");
        assert_eq!(Superblock::decode(&buf), Ok(sb.clone()));
        // A longer buffer decodes the same; only its first block counts.
        let mut long = buf.clone();
        long.extend_from_slice(&[0x55; 100]);
        assert_eq!(Superblock::decode(&long), Ok(sb));
    }

    #[test]
    fn every_bit_flip_in_a_superblock_is_caught() {
        let buf = encoded(&sample());
        for bit in 0..BLOCK * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Superblock::decode(&bad).is_err(),
                "flip of bit {bit} passed"
            );
        }
    }

    #[test]
    fn blank_foreign_and_short_blocks() {
        assert_eq!(Superblock::decode(&[0; BLOCK]), Err(MetaError::Blank));
        let mut foreign = encoded(&sample());
        foreign[0] = b'X';
        assert_eq!(Superblock::decode(&foreign), Err(MetaError::NotMirror));
        assert_eq!(Superblock::decode(&[]), Err(MetaError::TooShort));
        assert_eq!(
            Superblock::decode(&[0; BLOCK - 1]),
            Err(MetaError::TooShort)
        );
        assert_eq!(
            sample().encode(&mut [0; BLOCK - 1]),
            Err(MetaError::TooShort)
        );
    }

    #[test]
    fn a_newer_version_is_refused_by_name() {
        let mut buf = encoded(&sample());
        put_u32(&mut buf, SB_VERSION, 2);
        reseal_superblock(&mut buf);
        let e = Superblock::decode(&buf).unwrap_err();
        assert_eq!(e, MetaError::Version(2));
        assert_eq!(
            e.to_string(),
            "mirror format version 2 is not supported (this build reads 1)"
        );
    }

    #[test]
    fn checksum_mismatch_is_its_own_error() {
        let mut buf = encoded(&sample());
        buf[BLOCK - 1] ^= 0x80;
        assert_eq!(Superblock::decode(&buf), Err(MetaError::Checksum));
    }

    #[test]
    fn leg_counts_indexes_and_states_are_checked() {
        let mut sb = sample();
        sb.legs = vec![sb.legs[0]; MAX_LEGS + 1];
        assert!(matches!(
            sb.encode(&mut [0; BLOCK]),
            Err(MetaError::Invalid(_))
        ));
        sb.legs.truncate(1);
        sb.leg_index = 0;
        assert!(matches!(
            sb.encode(&mut [0; BLOCK]),
            Err(MetaError::Invalid(_))
        ));
        sb.legs = vec![sb.legs[0]; MAX_LEGS];
        sb.leg_index = MAX_LEGS as u32 - 1;
        assert!(Superblock::decode(&encoded(&sb)).is_ok());

        // Written past the checks, sealed so only the field checks can refuse them.
        let refused = |edit: &dyn Fn(&mut [u8])| {
            let mut buf = encoded(&sample());
            edit(&mut buf);
            reseal_superblock(&mut buf);
            match Superblock::decode(&buf) {
                Err(MetaError::Invalid(why)) => why,
                other => panic!("accepted or wrong error: {other:?}"),
            }
        };
        let why = refused(&|b| put_u32(b, SB_LEG_COUNT, MAX_LEGS as u32 + 1));
        assert!(why.contains("17 legs"), "{why}");
        let why = refused(&|b| put_u32(b, SB_LEG_COUNT, 1));
        assert!(why.contains("1 legs"), "{why}");
        let why = refused(&|b| put_u32(b, SB_LEG_INDEX, 3));
        assert!(why.contains("leg index 3"), "{why}");
        let why = refused(&|b| put_u32(b, SB_LEGS + LEG_RECORD, 5));
        assert!(why.contains("unknown state 5"), "{why}");
        let why = refused(&|b| put_u32(b, SB_LEGS, 0));
        assert!(why.contains("unknown state 0"), "{why}");
        let why = refused(&|b| put_u64(b, SB_LEGS + LEG_RECORD + 8, u64::MAX));
        assert!(why.contains("rebuild offset"), "{why}");
        let why = refused(&|b| put_u64(b, SB_REGION_SIZE, 3 << 20));
        assert!(why.contains("region size"), "{why}");
        let why = refused(&|b| put_u64(b, SB_DATA_OFFSET, 4096));
        assert!(why.contains("data offset"), "{why}");
        let why = refused(&|b| put_u64(b, SB_DEV_SIZE, 1 << 50));
        assert!(why.contains("cannot hold"), "{why}");
        let why = refused(&|b| put_u64(b, SB_DEV_SIZE, u64::MAX - 4095));
        assert!(why.contains("overflows"), "{why}");
        let why = refused(&|b| put_u64(b, SB_DEV_SIZE, 0));
        assert!(why.contains("device size"), "{why}");
    }

    #[test]
    fn leg_states_round_trip() {
        for s in [
            LegState::InSync,
            LegState::Faulty,
            LegState::Rebuilding,
            LegState::Missing,
        ] {
            assert_eq!(LegState::from_u32(s.to_u32()), Some(s));
            assert_eq!(s.to_string(), s.name());
        }
        assert_eq!(LegState::from_u32(0), None);
        assert_eq!(LegState::from_u32(5), None);
        assert_eq!(LegState::Rebuilding.name(), "rebuilding");
    }

    fn bitmap_sample() -> (Vec<u8>, Vec<u8>) {
        let bits: Vec<u8> = (0..BITMAP_BYTES).map(|i| (i * 7 + 3) as u8).collect();
        let mut block = vec![0; BLOCK];
        encode_bitmap_block(7, &UUID, &bits, &mut block).expect("a full block of bits");
        (bits, block)
    }

    #[test]
    fn bitmap_block_round_trips() {
        let (bits, block) = bitmap_sample();
        assert_eq!(&block[..4], b"UBMB");
        assert_eq!(decode_bitmap_block(7, &UUID, &block), Ok(&bits[..]));
    }

    #[test]
    fn bitmap_block_of_another_index_or_array_is_refused() {
        let (_, block) = bitmap_sample();
        let e = decode_bitmap_block(6, &UUID, &block).unwrap_err();
        assert!(e.to_string().contains("holds block 7"), "{e}");
        let mut other = UUID;
        other[3] ^= 1;
        let e = decode_bitmap_block(7, &other, &block).unwrap_err();
        assert!(e.to_string().contains("another array"), "{e}");
        // A sealed block that names another index (a misdirected write) is refused too.
        let mut moved = block.clone();
        put_u32(&mut moved, BM_INDEX, 8);
        reseal_bitmap_block(&mut moved);
        let e = decode_bitmap_block(7, &UUID, &moved).unwrap_err();
        assert!(e.to_string().contains("holds block 8"), "{e}");
        assert!(decode_bitmap_block(8, &UUID, &moved).is_ok());
        // Only the first 4 bytes of the UUID are recorded.
        other = UUID;
        other[4] ^= 1;
        assert!(decode_bitmap_block(7, &other, &block).is_ok());
    }

    #[test]
    fn every_bit_flip_in_a_bitmap_block_is_caught() {
        let (_, block) = bitmap_sample();
        for bit in 0..BLOCK * 8 {
            let mut bad = block.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_bitmap_block(7, &UUID, &bad).is_err(),
                "flip of bit {bit} passed"
            );
        }
    }

    #[test]
    fn bitmap_block_errors() {
        let e = decode_bitmap_block(0, &UUID, &[0; BLOCK]).unwrap_err();
        assert!(e.to_string().contains("blank"), "{e}");
        assert_eq!(
            decode_bitmap_block(0, &UUID, &[0; BLOCK - 1]),
            Err(MetaError::TooShort)
        );
        let mut out = [0; BLOCK];
        assert!(matches!(
            encode_bitmap_block(0, &UUID, &[0; BITMAP_BYTES - 1], &mut out),
            Err(MetaError::Invalid(_))
        ));
        assert_eq!(
            encode_bitmap_block(0, &UUID, &[0; BITMAP_BYTES], &mut out[..BLOCK - 1]),
            Err(MetaError::TooShort)
        );
        let (_, mut block) = bitmap_sample();
        block[BLOCK - 1] ^= 1;
        let e = decode_bitmap_block(7, &UUID, &block).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn uuids() {
        assert_eq!(uuid_string(&UUID), "6ba7b810-9dad-41d1-80b4-00c04fd430c8");
        let a = new_uuid().unwrap();
        let b = new_uuid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 4, "version 4");
        assert_eq!(a[8] >> 6, 2, "RFC 4122 variant");
        let s = uuid_string(&a);
        assert_eq!(s.len(), 36);
        assert_eq!(s.as_bytes()[14], b'4');
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(MetaError::Blank.to_string(), "no superblock (blank leg)");
        assert_eq!(
            MetaError::Checksum.to_string(),
            "superblock checksum mismatch (torn or damaged)"
        );
        assert!(MetaError::NotMirror
            .to_string()
            .starts_with("not a ublk mirror leg"));
    }

    /// Leg sizes from 4 MiB to 2^50 bytes, with a bias toward the small end and toward exact
    /// multiples of the alignments, where rounding mistakes hide.
    fn leg_size() -> impl Strategy<Value = u64> {
        prop_oneof![
            (4u64 << 20)..(1 << 50),
            (4u64 << 20)..(64 << 20),
            (4u64..(1 << 30)).prop_map(|mib| mib << 20),
        ]
    }

    fn region_size() -> impl Strategy<Value = u64> {
        (12u32..=30).prop_map(|shift| 1u64 << shift)
    }

    fn layout() -> impl Strategy<Value = Layout> {
        (leg_size(), region_size()).prop_filter_map("leg too small", |(leg, region)| {
            Layout::for_leg(leg, region).ok()
        })
    }

    fn leg_record(dev_size: u64) -> impl Strategy<Value = LegRecord> {
        (1u32..=4, 0..=dev_size).prop_map(|(state, rebuild_offset)| LegRecord {
            state: LegState::from_u32(state).expect("1..=4 are states"),
            rebuild_offset,
        })
    }

    proptest! {
        #[test]
        fn layout_invariants(leg in leg_size(), region in region_size()) {
            match Layout::for_leg(leg, region) {
                Ok(l) => {
                    prop_assert_eq!(l.validate(), Ok(()));
                    prop_assert_eq!(l.region_size, region);
                    prop_assert_eq!(l.data_offset % DATA_ALIGN, 0);
                    prop_assert!((l.bitmap_blocks as u64 + 1) * BLOCK as u64 <= l.data_offset);
                    prop_assert!(l.data_offset + l.dev_size <= leg);
                    prop_assert!(leg - l.data_offset - l.dev_size < 4096);
                    prop_assert_eq!(l.dev_size % 4096, 0);
                    prop_assert!(l.dev_size >= region);
                    prop_assert!(l.regions() <= l.bitmap_blocks as u64 * BITS_PER_BLOCK);
                    // No bitmap block is wasted beyond what the leg-size bound needs.
                    prop_assert!(
                        (l.bitmap_blocks as u64 - 1) * BITS_PER_BLOCK < leg.div_ceil(region)
                    );
                }
                Err(e) => {
                    prop_assert!(matches!(e, MetaError::Invalid(_)));
                    let blocks = leg.div_ceil(region).div_ceil(BITS_PER_BLOCK);
                    let data_offset = ((blocks + 1) * BLOCK as u64).next_multiple_of(DATA_ALIGN);
                    prop_assert!(leg < data_offset + region);
                }
            }
        }

        #[test]
        fn regions_of_is_exactly_the_regions_touched(
            (l, offset, len) in layout().prop_flat_map(|l| {
                (Just(l), 0..l.dev_size).prop_flat_map(|(l, offset)| {
                    let max = l.dev_size - offset;
                    (Just(l), Just(offset), prop_oneof![0..=max, 0..=max.min(3 * l.region_size)])
                })
            })
        ) {
            let range = l.regions_of(offset, len);
            let touches = |r: u64| {
                let b = l.region_bytes(r);
                len > 0 && b.start < offset + len && offset < b.end
            };
            prop_assert!(range.end <= l.regions());
            if len == 0 {
                prop_assert!(range.is_empty());
            } else {
                prop_assert!(!range.is_empty());
                prop_assert!(touches(range.start));
                prop_assert!(touches(range.end - 1));
                // Regions are contiguous and in order: the neighbours outside must not touch.
                prop_assert!(range.start == 0 || !touches(range.start - 1));
                prop_assert!(!touches(range.end));
                // And together the regions cover the bytes exactly.
                prop_assert!(l.region_bytes(range.start).start <= offset);
                prop_assert!(l.region_bytes(range.end - 1).end >= offset + len);
            }
        }

        #[test]
        fn regions_tile_the_device(l in layout(), pick in any::<u64>()) {
            let r = pick % l.regions();
            let b = l.region_bytes(r);
            prop_assert_eq!(b.start, r * l.region_size);
            prop_assert!(!b.is_empty());
            prop_assert!(b.end - b.start <= l.region_size);
            if r + 1 < l.regions() {
                prop_assert_eq!(l.region_bytes(r + 1).start, b.end);
            } else {
                prop_assert_eq!(b.end, l.dev_size);
            }
        }

        #[test]
        fn bit_of_is_a_bijection(l in layout(), pick in any::<u64>(), block in any::<u32>(), bit in 0..BITS_PER_BLOCK) {
            // Every region maps into the bitmap, and back.
            let r = pick % l.regions();
            let (b, i) = l.bit_of(r);
            prop_assert!(b < l.bitmap_blocks);
            prop_assert!(i < BITS_PER_BLOCK);
            prop_assert_eq!(l.region_at(b, i), r);
            // Every bit of the bitmap that belongs to a region is that region's.
            let block = block % l.bitmap_blocks;
            let r = l.region_at(block, bit);
            if r < l.regions() {
                prop_assert_eq!(l.bit_of(r), (block, bit));
            } else {
                // Spare bits (the bitmap is sized for the whole leg) all follow the last region's.
                prop_assert!((block, bit) > l.bit_of(l.regions() - 1));
            }
        }

        #[test]
        fn superblock_round_trips_any(
            (layout, legs) in layout().prop_flat_map(|l| {
                (Just(l), prop::collection::vec(leg_record(l.dev_size), 2..=MAX_LEGS))
            }),
            uuid in any::<[u8; 16]>(),
            events in any::<u64>(),
            index in any::<u32>(),
        ) {
            let sb = Superblock {
                uuid,
                leg_index: index % legs.len() as u32,
                events,
                layout,
                legs,
            };
            let mut buf = vec![0; BLOCK];
            sb.encode(&mut buf).expect("valid superblock");
            prop_assert_eq!(Superblock::decode(&buf), Ok(sb));
        }

        #[test]
        fn bitmap_block_round_trips_any(
            bits in prop::collection::vec(any::<u8>(), BITMAP_BYTES),
            index in any::<u32>(),
            uuid in any::<[u8; 16]>(),
        ) {
            let mut block = vec![0; BLOCK];
            encode_bitmap_block(index, &uuid, &bits, &mut block).expect("a full block of bits");
            prop_assert_eq!(decode_bitmap_block(index, &uuid, &block), Ok(&bits[..]));
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..=BLOCK + 8)) {
            let _ = Superblock::decode(&bytes);
            let _ = decode_bitmap_block(0, &UUID, &bytes);
        }
    }
}
