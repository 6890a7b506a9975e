//! The compressed image's on-disk format: where things are on the child, and the encoding of
//! every metadata block and data extent.
//!
//! | child bytes | holds |
//! |---|---|
//! | `0 .. 4096` | superblock copy A |
//! | `4096 .. 8192` | superblock copy B |
//! | `map_a ..` | map checkpoint A: `map_blocks` blocks of 4 KiB |
//! | `map_b ..` | map checkpoint B |
//! | `journal ..` | `journal_blocks` journal blocks of 4 KiB |
//! | `data ..` | the data area: `data_sectors` sectors of 512 bytes holding extents |
//!
//! All integers are little-endian; every metadata block carries a CRC32C of itself computed
//! with its checksum field zeroed, so a torn write is detected.
//!
//! **Superblock** (both copies; the valid one with the higher generation wins, and writes
//! alternate between them so that a torn write leaves the other intact):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `UBLKCMP1` |
//! | 8 | 4 | format version (2; version 1 images are read, and upgraded when opened) |
//! | 12 | 4 | CRC32C of bytes 0..4096 with this field zeroed |
//! | 16 | 16 | image UUID |
//! | 32 | 8 | logical size in bytes (a multiple of 4096) |
//! | 40 | 4 | algorithm: 1 lz4, 2 zstd |
//! | 44 | 4 | zstd level (i32; 0 for lz4) |
//! | 48 | 8 | generation (bumped by every superblock write; below 2^62) |
//! | 56 | 4 | active map: 0 = A, 1 = B |
//! | 60 | 4 | reserved |
//! | 64 | 8 | checkpoint sequence: the journal sequence number the next journal block after this checkpoint carries (below 2^62) |
//! | 72 | 8 × 7 | layout: map A, map B, map blocks, journal, journal blocks, data, data sectors |
//! | 128 | 3968 | reserved (zero) |
//!
//! **Map checkpoint block** `i`: a 16-byte header {magic `UCMB`, block index u32, the low 32
//! bits of the generation of the superblock that points to it, CRC32C u32} and 510 map
//! entries (u64) for logical blocks `510 i ..`.
//!
//! **Journal block**: a 24-byte header {magic `UCJB`, record count u32, sequence u64, the first
//! 4 bytes of the UUID, CRC32C u32} and up to 254 records {logical block u64, map entry u64}.
//! The journal block with sequence `s` lies at journal position `s - checkpoint_seq`; replay
//! reads positions from 0 and stops at the first block that does not check or does not
//! carry the sequence it should (a torn tail is normal after a crash).
//!
//! **Map entry** (one per 4 KiB logical block): 0 = the block reads as zeroes and takes no
//! space; otherwise bits 0..40 the extent's first sector in the data area, bits 40..53 its
//! stored length in bytes (header included, 17..=4112), bits 53..56 its kind (1 raw, 2 lz4,
//! 3 zstd), bits 56..61 where it starts in its first sector, in 16-byte units (version 2;
//! always 0 in version 1).
//!
//! **Extent**: a 16-byte header {magic `UCX1`, the low 32 bits of the logical block u32,
//! payload length u16, kind u8, reserved u8, CRC32C u32 of header and payload with this
//! field zeroed} followed by the payload. It starts on a 16-byte boundary: the extents a
//! queue writes together (one request's, and those of the other writes of the same loop
//! turn) are packed end to end (16-byte aligned), so neighbours share the sector between
//! them; a sector is free once no extent overlaps it.

use crate::ondisk::{block_crc, get_u32, get_u64, put_u32, put_u64};
use std::ops::Range;

/// The superblock's magic.
pub const MAGIC: [u8; 8] = *b"UBLKCMP1";
/// The format version this build writes. It also reads version 1 (whose extents all start on
/// a sector boundary), and an image it opens is upgraded to this version.
pub const VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const MIN_VERSION: u32 = 1;
/// Metadata block size, and the logical block size.
pub const BLOCK: usize = 4096;
/// Bytes per logical block.
pub const BLOCK_BYTES: u64 = BLOCK as u64;
/// Bytes per data-area sector.
pub const SECTOR: u64 = 512;
/// Extents start on a multiple of this many bytes (version 2).
pub const GRAIN: u64 = 16;
/// Header bytes of a map checkpoint block.
pub const MAP_HEADER: usize = 16;
/// Map entries per checkpoint block.
pub const ENTRIES_PER_BLOCK: u64 = ((BLOCK - MAP_HEADER) / 8) as u64;
/// Header bytes of a journal block.
pub const JOURNAL_HEADER: usize = 24;
/// Records per journal block.
pub const RECORDS_PER_BLOCK: usize = (BLOCK - JOURNAL_HEADER) / 16;
/// Header bytes of an extent.
pub const EXTENT_HEADER: usize = 16;
/// The largest stored extent: a raw block and its header.
pub const MAX_EXTENT: usize = BLOCK + EXTENT_HEADER;
/// The journal size of a new image unless the child is small (see [`Layout::new`]).
pub const DEFAULT_JOURNAL_BLOCKS: u64 = 1024;
/// The fewest journal blocks an image has.
pub const MIN_JOURNAL_BLOCKS: u64 = 4;
/// The generation and the checkpoint sequence stay below this (2^62), so the arithmetic on
/// them never overflows: a commit per microsecond would take 146,000 years to reach it.
pub const MAX_COUNTER: u64 = 1 << 62;

const SB_VERSION: usize = 8;
const SB_CRC: usize = 12;
const SB_UUID: usize = 16;
const SB_SIZE: usize = 32;
const SB_ALGO: usize = 40;
const SB_LEVEL: usize = 44;
const SB_GENERATION: usize = 48;
const SB_ACTIVE: usize = 56;
const SB_CHECKPOINT_SEQ: usize = 64;
const SB_LAYOUT: usize = 72;

const MAP_MAGIC: [u8; 4] = *b"UCMB";
const JOURNAL_MAGIC: [u8; 4] = *b"UCJB";
/// The first bytes of every extent's header.
pub const EXTENT_MAGIC: [u8; 4] = *b"UCX1";

const SECTOR_BITS: u32 = 40;
const LEN_BITS: u32 = 13;
const KIND_BITS: u32 = 3;
const AT_BITS: u32 = 5;
const _: () = assert!(SECTOR == GRAIN << AT_BITS);

/// Why metadata or an extent was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The block is all zero: nothing was ever written there.
    #[error("blank (all zero)")]
    Blank,
    /// The magic is not this format's.
    #[error("not a ublk compressed image (bad magic)")]
    Magic,
    /// A format version this build does not read.
    #[error("format version {0} is not supported (this build reads {MIN_VERSION} to {VERSION})")]
    Version(u32),
    /// The checksum does not match: torn or damaged.
    #[error("checksum mismatch (torn or damaged)")]
    Checksum,
    /// The fields are inconsistent.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The buffer is shorter than the structure.
    #[error("buffer too short")]
    TooShort,
}

fn invalid<T>(msg: String) -> Result<T, FormatError> {
    Err(FormatError::Invalid(msg))
}

/// The compression algorithm of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// LZ4 (block format, `lz4_flex`).
    Lz4,
    /// Zstandard at a level (1..=22).
    Zstd(i32),
}

/// The zstd level used when `algo=zstd` names none.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

impl Algo {
    /// Parses `lz4`, `zstd` or `zstd:LEVEL`.
    pub fn parse(text: &str) -> Result<Algo, String> {
        match text.split_once(':') {
            None if text == "lz4" => Ok(Algo::Lz4),
            None if text == "zstd" => Ok(Algo::Zstd(DEFAULT_ZSTD_LEVEL)),
            Some(("zstd", level)) => {
                let level: i32 = level
                    .parse()
                    .map_err(|_| format!("zstd level '{level}' is not a number"))?;
                Algo::from_code(2, level).ok_or_else(|| format!("zstd level {level} is not 1..=22"))
            }
            _ => Err(format!(
                "unknown algorithm '{text}' (lz4, zstd or zstd:LEVEL)"
            )),
        }
    }

    /// The algorithm stored as `code` and `level`, if valid.
    pub fn from_code(code: u32, level: i32) -> Option<Algo> {
        match (code, level) {
            (1, 0) => Some(Algo::Lz4),
            (2, 1..=22) => Some(Algo::Zstd(level)),
            _ => None,
        }
    }

    /// The stored code and level.
    pub fn code(self) -> (u32, i32) {
        match self {
            Algo::Lz4 => (1, 0),
            Algo::Zstd(level) => (2, level),
        }
    }

    /// The extent kind this algorithm's compressed extents have.
    pub fn kind(self) -> Kind {
        match self {
            Algo::Lz4 => Kind::Lz4,
            Algo::Zstd(_) => Kind::Zstd,
        }
    }
}

impl std::fmt::Display for Algo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Algo::Lz4 => f.write_str("lz4"),
            Algo::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

/// How an extent's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The 4096 bytes as they are.
    Raw,
    /// LZ4 block format.
    Lz4,
    /// A zstd frame.
    Zstd,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Raw => 1,
            Kind::Lz4 => 2,
            Kind::Zstd => 3,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        match code {
            1 => Some(Kind::Raw),
            2 => Some(Kind::Lz4),
            3 => Some(Kind::Zstd),
            _ => None,
        }
    }
}

/// Where an extent is and how it is stored: the non-zero value of a map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First sector in the data area.
    pub sector: u64,
    /// Where the extent starts in its first sector, in bytes: a multiple of [`GRAIN`] below
    /// [`SECTOR`] (0 in a version 1 image).
    pub at: u16,
    /// Stored bytes, header included.
    pub len: u32,
    /// How the payload is stored.
    pub kind: Kind,
}

impl Extent {
    /// Sectors the extent occupies (the first and the last may be shared with neighbours).
    pub fn sectors(&self) -> u64 {
        (u64::from(self.at) + u64::from(self.len)).div_ceil(SECTOR)
    }

    /// Its bytes in the data area.
    pub fn bytes(&self) -> Range<u64> {
        let start = self.sector * SECTOR + u64::from(self.at);
        start..start + u64::from(self.len)
    }

    /// The sectors it occupies, as a range.
    pub fn span(&self) -> Range<u64> {
        self.sector..self.sector + self.sectors()
    }

    /// The map entry for this extent; `None` if a field does not fit the entry's bits or the
    /// length is out of range.
    pub fn encode(&self) -> Option<u64> {
        let len_ok = (EXTENT_HEADER as u32 + 1..=MAX_EXTENT as u32).contains(&self.len);
        let at_ok = u64::from(self.at) < SECTOR && u64::from(self.at) % GRAIN == 0;
        if self.sector >> SECTOR_BITS != 0 || !len_ok || !at_ok {
            return None;
        }
        Some(
            self.sector
                | u64::from(self.len) << SECTOR_BITS
                | u64::from(self.kind.code()) << (SECTOR_BITS + LEN_BITS)
                | (u64::from(self.at) / GRAIN) << (SECTOR_BITS + LEN_BITS + KIND_BITS),
        )
    }

    /// The extent a map entry names: `Ok(None)` for 0 (a zero block), an error for an entry
    /// whose bits are not a valid extent (unknown kind, bad length, high bits set).
    pub fn decode(entry: u64) -> Result<Option<Extent>, FormatError> {
        if entry == 0 {
            return Ok(None);
        }
        let top = SECTOR_BITS + LEN_BITS + KIND_BITS + AT_BITS;
        if entry >> top != 0 {
            return invalid(format!("map entry {entry:#x} has reserved bits set"));
        }
        let sector = entry & ((1 << SECTOR_BITS) - 1);
        let len = (entry >> SECTOR_BITS) as u32 & ((1 << LEN_BITS) - 1);
        let code = (entry >> (SECTOR_BITS + LEN_BITS)) as u8 & ((1 << KIND_BITS) - 1);
        let kind = Kind::from_code(code)
            .ok_or_else(|| FormatError::Invalid(format!("map entry {entry:#x}: kind {code}")))?;
        let at = ((entry >> (SECTOR_BITS + LEN_BITS + KIND_BITS)) & ((1 << AT_BITS) - 1)) * GRAIN;
        let e = Extent {
            sector,
            at: at as u16,
            len,
            kind,
        };
        if e.encode() != Some(entry) {
            return invalid(format!("map entry {entry:#x}: length {len} out of range"));
        }
        Ok(Some(e))
    }
}

/// Where things are on the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Byte offset of map checkpoint A.
    pub map_a: u64,
    /// Byte offset of map checkpoint B.
    pub map_b: u64,
    /// Blocks in each map checkpoint.
    pub map_blocks: u64,
    /// Byte offset of the journal.
    pub journal: u64,
    /// Blocks in the journal.
    pub journal_blocks: u64,
    /// Byte offset of the data area.
    pub data: u64,
    /// Sectors in the data area.
    pub data_sectors: u64,
}

impl Layout {
    /// The layout of a new image of `size` logical bytes on a child of `child_size` bytes:
    /// the two superblocks, two map checkpoints, a journal of [`DEFAULT_JOURNAL_BLOCKS`] (or
    /// 1/64 of the child on a small child, at least [`MIN_JOURNAL_BLOCKS`]), and the rest as
    /// data. Fails when `size` is not a non-zero multiple of 4096 or the child cannot hold the
    /// metadata and a few raw blocks.
    pub fn new(size: u64, child_size: u64) -> Result<Layout, FormatError> {
        if size == 0 || size % BLOCK_BYTES != 0 {
            return invalid(format!(
                "logical size {size} is not a non-zero multiple of 4096"
            ));
        }
        let blocks = size / BLOCK_BYTES;
        let map_blocks = blocks.div_ceil(ENTRIES_PER_BLOCK);
        let journal_blocks =
            (child_size / BLOCK_BYTES / 64).clamp(MIN_JOURNAL_BLOCKS, DEFAULT_JOURNAL_BLOCKS);
        let map_a = 2 * BLOCK_BYTES;
        let map_bytes = map_blocks
            .checked_mul(BLOCK_BYTES)
            .ok_or_else(|| FormatError::Invalid("map too large".into()))?;
        let map_b = map_a + map_bytes;
        let journal = map_b + map_bytes;
        let data = journal + journal_blocks * BLOCK_BYTES;
        let room = child_size.saturating_sub(data) / SECTOR;
        let data_sectors = room.min((1 << SECTOR_BITS) - 1);
        let layout = Layout {
            map_a,
            map_b,
            map_blocks,
            journal,
            journal_blocks,
            data,
            data_sectors,
        };
        if data_sectors < 4 * (MAX_EXTENT as u64).div_ceil(SECTOR) {
            return invalid(format!(
                "a {child_size}-byte child is too small: the metadata for {size} logical bytes \
                 takes {data} bytes, and the data area needs room for a few blocks"
            ));
        }
        layout.validate(size)?;
        Ok(layout)
    }

    /// A child size for `size` logical bytes with room for every block stored raw, so the
    /// image can never run out of space: the metadata of [`Layout::new`] with the default
    /// journal, and 9 sectors per block. `None` if it does not fit a `u64`.
    pub fn child_size_for(size: u64) -> Option<u64> {
        let blocks = size / BLOCK_BYTES;
        let map_bytes = blocks
            .div_ceil(ENTRIES_PER_BLOCK)
            .checked_mul(BLOCK_BYTES)?;
        let raw = (MAX_EXTENT as u64).div_ceil(SECTOR) * SECTOR;
        (2 * BLOCK_BYTES + DEFAULT_JOURNAL_BLOCKS * BLOCK_BYTES)
            .checked_add(map_bytes.checked_mul(2)?)?
            .checked_add(blocks.checked_mul(raw)?)
    }

    /// Checks that the areas lie in order, aligned, without overlap, and that the map has an
    /// entry for every logical block of `size`.
    pub fn validate(&self, size: u64) -> Result<(), FormatError> {
        let blocks = size / BLOCK_BYTES;
        if self.map_blocks != blocks.div_ceil(ENTRIES_PER_BLOCK) {
            return invalid(format!(
                "{} map blocks for {blocks} logical blocks",
                self.map_blocks
            ));
        }
        let map_bytes = self.map_blocks.checked_mul(BLOCK_BYTES);
        let journal_bytes = self.journal_blocks.checked_mul(BLOCK_BYTES);
        let data_bytes = self.data_sectors.checked_mul(SECTOR);
        let (Some(map_bytes), Some(journal_bytes), Some(data_bytes)) =
            (map_bytes, journal_bytes, data_bytes)
        else {
            return invalid("area sizes overflow".into());
        };
        let in_order = self.map_a == 2 * BLOCK_BYTES
            && self.map_a.checked_add(map_bytes) == Some(self.map_b)
            && self.map_b.checked_add(map_bytes) == Some(self.journal)
            && self.journal.checked_add(journal_bytes) == Some(self.data);
        if !in_order {
            return invalid(format!("areas out of order or overlapping: {self:?}"));
        }
        if self.journal_blocks < MIN_JOURNAL_BLOCKS {
            return invalid(format!("{} journal blocks", self.journal_blocks));
        }
        if self.data.checked_add(data_bytes).is_none() || self.data_sectors >> SECTOR_BITS != 0 {
            return invalid(format!("data area of {} sectors", self.data_sectors));
        }
        Ok(())
    }

    /// The child bytes the image needs: the end of the data area.
    pub fn end(&self) -> u64 {
        self.data + self.data_sectors * SECTOR
    }

    /// Byte offset of map block `index` of checkpoint `which` (0 = A, 1 = B).
    pub fn map_block_offset(&self, which: u32, index: u64) -> u64 {
        let base = if which == 0 { self.map_a } else { self.map_b };
        base + index * BLOCK_BYTES
    }

    /// Byte offset of journal position `pos`.
    pub fn journal_offset(&self, pos: u64) -> u64 {
        self.journal + pos * BLOCK_BYTES
    }

    /// Byte offset on the child of data-area sector `sector`.
    pub fn sector_offset(&self, sector: u64) -> u64 {
        self.data + sector * SECTOR
    }

    /// Whether `e` lies wholly inside the data area.
    pub fn holds(&self, e: &Extent) -> bool {
        e.sector
            .checked_add(e.sectors())
            .is_some_and(|end| end <= self.data_sectors)
    }
}

/// The map checkpoint block holding logical block `lba`'s entry, and its index there.
pub fn map_position(lba: u64) -> (u64, usize) {
    (lba / ENTRIES_PER_BLOCK, (lba % ENTRIES_PER_BLOCK) as usize)
}

/// The logical blocks touched by bytes `[offset, offset + len)`: an empty range for `len == 0`.
pub fn blocks_of(offset: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return offset / BLOCK_BYTES..offset / BLOCK_BYTES;
    }
    offset / BLOCK_BYTES..offset.saturating_add(len - 1) / BLOCK_BYTES + 1
}

/// The part of logical block `lba` that bytes `[offset, offset + len)` cover, as a byte range
/// within the block (empty if none).
pub fn block_part(lba: u64, offset: u64, len: u64) -> Range<usize> {
    let start = lba.saturating_mul(BLOCK_BYTES);
    let end = start.saturating_add(BLOCK_BYTES);
    let a = offset.clamp(start, end);
    let b = offset.saturating_add(len).clamp(start, end);
    (a - start) as usize..(b - start) as usize
}

/// One superblock copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The format version: [`VERSION`] for an image this build created or opened, 1 for an
    /// older image not opened since.
    pub version: u32,
    /// The image's UUID.
    pub uuid: [u8; 16],
    /// Logical size in bytes.
    pub size: u64,
    /// The compression algorithm of new extents.
    pub algo: Algo,
    /// Bumped by every superblock write; the higher valid copy wins.
    pub generation: u64,
    /// The map checkpoint in use: 0 = A, 1 = B.
    pub active_map: u32,
    /// The sequence number of the first journal block after the checkpoint.
    pub checkpoint_seq: u64,
    /// Where things are.
    pub layout: Layout,
}

impl Superblock {
    /// Writes the superblock into `buf[..BLOCK]`, checksum included.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), FormatError> {
        let block = buf.get_mut(..BLOCK).ok_or(FormatError::TooShort)?;
        self.check()?;
        block.fill(0);
        block[..8].copy_from_slice(&MAGIC);
        put_u32(block, SB_VERSION, self.version);
        block[SB_UUID..SB_UUID + 16].copy_from_slice(&self.uuid);
        put_u64(block, SB_SIZE, self.size);
        let (code, level) = self.algo.code();
        put_u32(block, SB_ALGO, code);
        put_u32(block, SB_LEVEL, level as u32);
        put_u64(block, SB_GENERATION, self.generation);
        put_u32(block, SB_ACTIVE, self.active_map);
        put_u64(block, SB_CHECKPOINT_SEQ, self.checkpoint_seq);
        let l = &self.layout;
        let fields = [
            l.map_a,
            l.map_b,
            l.map_blocks,
            l.journal,
            l.journal_blocks,
            l.data,
            l.data_sectors,
        ];
        for (i, v) in fields.into_iter().enumerate() {
            put_u64(block, SB_LAYOUT + 8 * i, v);
        }
        let crc = block_crc(block, SB_CRC);
        put_u32(block, SB_CRC, crc);
        Ok(())
    }

    /// Reads a superblock copy from `buf[..BLOCK]`. Never panics, whatever the bytes.
    pub fn decode(buf: &[u8]) -> Result<Superblock, FormatError> {
        let block = buf.get(..BLOCK).ok_or(FormatError::TooShort)?;
        if block.iter().all(|&b| b == 0) {
            return Err(FormatError::Blank);
        }
        if block[..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        let version = get_u32(block, SB_VERSION);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(FormatError::Version(version));
        }
        if get_u32(block, SB_CRC) != block_crc(block, SB_CRC) {
            return Err(FormatError::Checksum);
        }
        let (code, level) = (get_u32(block, SB_ALGO), get_u32(block, SB_LEVEL) as i32);
        let algo = Algo::from_code(code, level).ok_or_else(|| {
            FormatError::Invalid(format!("unknown algorithm {code} (level {level})"))
        })?;
        let f = |i: usize| get_u64(block, SB_LAYOUT + 8 * i);
        let mut uuid = [0; 16];
        uuid.copy_from_slice(&block[SB_UUID..SB_UUID + 16]);
        let sb = Superblock {
            version,
            uuid,
            size: get_u64(block, SB_SIZE),
            algo,
            generation: get_u64(block, SB_GENERATION),
            active_map: get_u32(block, SB_ACTIVE),
            checkpoint_seq: get_u64(block, SB_CHECKPOINT_SEQ),
            layout: Layout {
                map_a: f(0),
                map_b: f(1),
                map_blocks: f(2),
                journal: f(3),
                journal_blocks: f(4),
                data: f(5),
                data_sectors: f(6),
            },
        };
        sb.check()?;
        Ok(sb)
    }

    fn check(&self) -> Result<(), FormatError> {
        if !(MIN_VERSION..=VERSION).contains(&self.version) {
            return Err(FormatError::Version(self.version));
        }
        if self.size == 0 || self.size % BLOCK_BYTES != 0 {
            return invalid(format!("logical size {}", self.size));
        }
        if self.active_map > 1 {
            return invalid(format!("active map {}", self.active_map));
        }
        if self.generation >= MAX_COUNTER || self.checkpoint_seq >= MAX_COUNTER {
            return invalid(format!(
                "generation {} or checkpoint sequence {} past 2^62",
                self.generation, self.checkpoint_seq
            ));
        }
        self.layout.validate(self.size)
    }

    /// The number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.size / BLOCK_BYTES
    }
}

/// Encodes map checkpoint block `index`, written under superblock generation `generation`,
/// from `entries` (at most [`ENTRIES_PER_BLOCK`]; the rest of the block is zero).
pub fn encode_map_block(
    index: u64,
    generation: u64,
    entries: &[u64],
    out: &mut [u8],
) -> Result<(), FormatError> {
    let block = out.get_mut(..BLOCK).ok_or(FormatError::TooShort)?;
    if entries.len() as u64 > ENTRIES_PER_BLOCK {
        return invalid(format!("{} entries in one map block", entries.len()));
    }
    block.fill(0);
    block[..4].copy_from_slice(&MAP_MAGIC);
    put_u32(block, 4, index as u32);
    put_u32(block, 8, generation as u32);
    for (i, e) in entries.iter().enumerate() {
        put_u64(block, MAP_HEADER + 8 * i, *e);
    }
    let crc = block_crc(block, 12);
    put_u32(block, 12, crc);
    Ok(())
}

/// Checks map checkpoint block `index` of generation `generation` and returns its
/// [`ENTRIES_PER_BLOCK`] entries (not validated: see [`Extent::decode`]).
pub fn decode_map_block(index: u64, generation: u64, buf: &[u8]) -> Result<Vec<u64>, FormatError> {
    let block = buf.get(..BLOCK).ok_or(FormatError::TooShort)?;
    if block[..4] != MAP_MAGIC {
        return Err(FormatError::Magic);
    }
    if get_u32(block, 12) != block_crc(block, 12) {
        return Err(FormatError::Checksum);
    }
    if get_u32(block, 4) != index as u32 || get_u32(block, 8) != generation as u32 {
        return invalid(format!(
            "map block {index} of generation {generation} holds block {} of generation {}",
            get_u32(block, 4),
            get_u32(block, 8)
        ));
    }
    Ok((0..ENTRIES_PER_BLOCK as usize)
        .map(|i| get_u64(block, MAP_HEADER + 8 * i))
        .collect())
}

/// One journal record: logical block `lba` now has map entry `entry`.
pub type Record = (u64, u64);

/// Encodes a journal block with sequence `seq` of image `uuid` holding `records` (at most
/// [`RECORDS_PER_BLOCK`]).
pub fn encode_journal_block(
    seq: u64,
    uuid: &[u8; 16],
    records: &[Record],
    out: &mut [u8],
) -> Result<(), FormatError> {
    let block = out.get_mut(..BLOCK).ok_or(FormatError::TooShort)?;
    if records.len() > RECORDS_PER_BLOCK {
        return invalid(format!("{} records in one journal block", records.len()));
    }
    block.fill(0);
    block[..4].copy_from_slice(&JOURNAL_MAGIC);
    put_u32(block, 4, records.len() as u32);
    put_u64(block, 8, seq);
    block[16..20].copy_from_slice(&uuid[..4]);
    for (i, (lba, entry)) in records.iter().enumerate() {
        put_u64(block, JOURNAL_HEADER + 16 * i, *lba);
        put_u64(block, JOURNAL_HEADER + 16 * i + 8, *entry);
    }
    let crc = block_crc(block, 20);
    put_u32(block, 20, crc);
    Ok(())
}

/// Checks a journal block expected to carry sequence `seq` of image `uuid` and returns its
/// records (not validated against the map's size).
pub fn decode_journal_block(
    seq: u64,
    uuid: &[u8; 16],
    buf: &[u8],
) -> Result<Vec<Record>, FormatError> {
    let block = buf.get(..BLOCK).ok_or(FormatError::TooShort)?;
    if block[..4] != JOURNAL_MAGIC {
        return Err(FormatError::Magic);
    }
    if get_u32(block, 20) != block_crc(block, 20) {
        return Err(FormatError::Checksum);
    }
    if get_u64(block, 8) != seq || block[16..20] != uuid[..4] {
        return invalid(format!(
            "journal block carries sequence {}, expected {seq}",
            get_u64(block, 8)
        ));
    }
    let count = get_u32(block, 4) as usize;
    if count > RECORDS_PER_BLOCK {
        return invalid(format!("{count} records in one journal block"));
    }
    Ok((0..count)
        .map(|i| {
            let at = JOURNAL_HEADER + 16 * i;
            (get_u64(block, at), get_u64(block, at + 8))
        })
        .collect())
}

/// The sequence number of a journal block of image `uuid` that checks, whatever sequence
/// it was expected to carry; `None` for anything else.
pub fn journal_block_seq(uuid: &[u8; 16], buf: &[u8]) -> Option<u64> {
    let block = buf.get(..BLOCK)?;
    let ours = block[..4] == JOURNAL_MAGIC && block[16..20] == uuid[..4];
    (ours && get_u32(block, 20) == block_crc(block, 20)).then(|| get_u64(block, 8))
}

/// Writes the header of an extent for logical block `lba` whose payload (of `kind`) already
/// lies in `buf[EXTENT_HEADER..EXTENT_HEADER + payload_len]`; returns the stored length.
pub fn seal_extent(
    lba: u64,
    kind: Kind,
    payload_len: usize,
    buf: &mut [u8],
) -> Result<usize, FormatError> {
    let len = EXTENT_HEADER + payload_len;
    if payload_len == 0 || len > MAX_EXTENT {
        return invalid(format!("extent payload of {payload_len} bytes"));
    }
    let ext = buf.get_mut(..len).ok_or(FormatError::TooShort)?;
    ext[..4].copy_from_slice(&EXTENT_MAGIC);
    put_u32(ext, 4, lba as u32);
    ext[8..10].copy_from_slice(&(payload_len as u16).to_le_bytes());
    ext[10] = kind.code();
    ext[11] = 0;
    let crc = block_crc(ext, 12);
    put_u32(ext, 12, crc);
    Ok(len)
}

/// Checks the extent `e` of logical block `lba`, whose sectors were read into `buf` (from
/// its first sector: the extent starts `e.at` bytes in), and returns its payload.
pub fn open_extent<'a>(lba: u64, e: &Extent, buf: &'a [u8]) -> Result<&'a [u8], FormatError> {
    let at = usize::from(e.at);
    let ext = buf
        .get(at..at + e.len as usize)
        .ok_or(FormatError::TooShort)?;
    if ext.len() < EXTENT_HEADER || ext[..4] != EXTENT_MAGIC {
        return Err(FormatError::Magic);
    }
    let payload_len = usize::from(u16::from_le_bytes([ext[8], ext[9]]));
    if EXTENT_HEADER + payload_len != ext.len() {
        return invalid(format!(
            "extent holds {payload_len} payload bytes, the map says {}",
            ext.len() - EXTENT_HEADER
        ));
    }
    if get_u32(ext, 12) != block_crc(ext, 12) {
        return Err(FormatError::Checksum);
    }
    if get_u32(ext, 4) != lba as u32 || Kind::from_code(ext[10]) != Some(e.kind) {
        return invalid(format!(
            "extent belongs to block {} not {lba}",
            get_u32(ext, 4)
        ));
    }
    Ok(&ext[EXTENT_HEADER..])
}

/// Recomputes a superblock's checksum whatever its fields hold (for the fuzzer).
pub fn reseal_superblock(buf: &mut [u8]) {
    if let Some(block) = buf.get_mut(..BLOCK) {
        let crc = block_crc(block, SB_CRC);
        put_u32(block, SB_CRC, crc);
    }
}

/// Recomputes the checksum of the metadata block or extent that starts at `buf[0]`, known by
/// its magic, whatever its fields hold (for the fuzzer, so that mutated structures get past
/// their checksum to the checks behind it). Returns whether there was one.
pub fn reseal(buf: &mut [u8]) -> bool {
    let at = match buf.get(..4) {
        Some(m) if m == &MAGIC[..4] && buf.get(..8) == Some(&MAGIC[..]) => SB_CRC,
        Some(m) if m == MAP_MAGIC => 12,
        Some(m) if m == JOURNAL_MAGIC => 20,
        Some(m) if m == EXTENT_MAGIC && buf.len() >= EXTENT_HEADER => {
            let payload = usize::from(u16::from_le_bytes([buf[8], buf[9]]));
            let Some(ext) = buf.get_mut(..(EXTENT_HEADER + payload).min(MAX_EXTENT)) else {
                return false;
            };
            let crc = block_crc(ext, 12);
            put_u32(ext, 12, crc);
            return true;
        }
        _ => return false,
    };
    let Some(block) = buf.get_mut(..BLOCK) else {
        return false;
    };
    let crc = block_crc(block, at);
    put_u32(block, at, crc);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Raw), Just(Kind::Lz4), Just(Kind::Zstd)]
    }

    fn sb(size: u64, child: u64) -> Superblock {
        Superblock {
            version: VERSION,
            uuid: [7; 16],
            size,
            algo: Algo::Zstd(5),
            generation: 9,
            active_map: 1,
            checkpoint_seq: 77,
            layout: Layout::new(size, child).expect("layout"),
        }
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let s = sb(1 << 30, 1 << 29);
        let mut buf = vec![0; BLOCK];
        s.encode(&mut buf).expect("encode");
        assert_eq!(Superblock::decode(&buf), Ok(s));
        buf[200] ^= 1;
        assert_eq!(Superblock::decode(&buf), Err(FormatError::Checksum));
        assert_eq!(Superblock::decode(&[0; BLOCK]), Err(FormatError::Blank));
        assert_eq!(Superblock::decode(&buf[..100]), Err(FormatError::TooShort));
    }

    #[test]
    fn algo_names_parse() {
        assert_eq!(Algo::parse("lz4"), Ok(Algo::Lz4));
        assert_eq!(Algo::parse("zstd"), Ok(Algo::Zstd(DEFAULT_ZSTD_LEVEL)));
        assert_eq!(Algo::parse("zstd:19"), Ok(Algo::Zstd(19)));
        assert!(Algo::parse("zstd:99").is_err());
        assert!(Algo::parse("gzip").is_err());
        assert_eq!(Algo::parse(&Algo::Zstd(7).to_string()), Ok(Algo::Zstd(7)));
    }

    #[test]
    fn journal_and_map_blocks_round_trip_and_refuse_strangers() {
        let uuid = [3; 16];
        let records: Vec<Record> = (0..RECORDS_PER_BLOCK as u64).map(|i| (i, i * 3)).collect();
        let mut buf = vec![0; BLOCK];
        encode_journal_block(12, &uuid, &records, &mut buf).expect("encode");
        assert_eq!(decode_journal_block(12, &uuid, &buf), Ok(records));
        assert!(decode_journal_block(13, &uuid, &buf).is_err());
        assert!(decode_journal_block(12, &[4; 16], &buf).is_err());
        let entries: Vec<u64> = (0..ENTRIES_PER_BLOCK).collect();
        encode_map_block(5, 8, &entries, &mut buf).expect("encode");
        assert_eq!(decode_map_block(5, 8, &buf), Ok(entries));
        assert!(decode_map_block(5, 9, &buf).is_err());
        buf[1000] ^= 4;
        assert_eq!(decode_map_block(5, 8, &buf), Err(FormatError::Checksum));
    }

    #[test]
    fn extents_seal_and_open() {
        let mut buf = vec![0; MAX_EXTENT];
        buf[EXTENT_HEADER..EXTENT_HEADER + 100].fill(5);
        let len = seal_extent(42, Kind::Lz4, 100, &mut buf).expect("seal");
        let e = Extent {
            sector: 0,
            at: 0,
            len: len as u32,
            kind: Kind::Lz4,
        };
        assert_eq!(open_extent(42, &e, &buf), Ok(&[5u8; 100][..]));
        // Packed 48 bytes into its first sector.
        let mut shifted = vec![0xee; 48];
        shifted.extend_from_slice(&buf[..len]);
        let packed = Extent { at: 48, ..e };
        assert_eq!(open_extent(42, &packed, &shifted), Ok(&[5u8; 100][..]));
        assert!(open_extent(42, &packed, &shifted[..48 + len - 1]).is_err());
        assert!(open_extent(43, &e, &buf).is_err(), "another block's extent");
        let longer = Extent { len: 117, ..e };
        assert!(open_extent(42, &longer, &buf).is_err());
        buf[60] ^= 1;
        assert_eq!(open_extent(42, &e, &buf), Err(FormatError::Checksum));
    }

    proptest! {
        #[test]
        fn map_entries_round_trip(sector in 0u64..1 << 40, at in 0u16..32, len in 17u32..=4112, kind in kind()) {
            let e = Extent { sector, at: at * GRAIN as u16, len, kind };
            let entry = e.encode().expect("fits");
            prop_assert_ne!(entry, 0);
            prop_assert_eq!(Extent::decode(entry), Ok(Some(e)));
            prop_assert!(e.sectors() >= 1 && e.sectors() <= 9);
            let bytes = e.bytes();
            prop_assert_eq!(bytes.end - bytes.start, u64::from(len));
            prop_assert!(bytes.start >= e.sector * SECTOR);
            prop_assert!(bytes.end <= (e.sector + e.sectors()) * SECTOR);
            prop_assert!(bytes.end > (e.sector + e.sectors() - 1) * SECTOR);
            // An offset off the grain, or a whole sector, does not encode.
            prop_assert_eq!(Extent { at: e.at + 1, ..e }.encode(), None);
            prop_assert_eq!(Extent { at: SECTOR as u16, ..e }.encode(), None);
        }

        #[test]
        fn any_entry_decodes_without_panic(entry in any::<u64>()) {
            if let Ok(Some(e)) = Extent::decode(entry) {
                prop_assert_eq!(e.encode(), Some(entry));
            }
        }

        #[test]
        fn blocks_of_covers_exactly_the_range(offset in 0u64..1 << 40, len in 0u64..1 << 22) {
            let blocks = blocks_of(offset, len);
            let mut covered = 0u64;
            for b in blocks.clone() {
                let part = block_part(b, offset, len);
                prop_assert!(!part.is_empty());
                covered += part.len() as u64;
            }
            prop_assert_eq!(covered, len);
            if len > 0 {
                prop_assert!(block_part(blocks.start.wrapping_sub(1), offset, len).is_empty()
                    || blocks.start == 0);
                prop_assert!(block_part(blocks.end, offset, len).is_empty());
            }
        }

        #[test]
        fn map_positions_are_a_bijection(lba in 0u64..1 << 40) {
            let (block, i) = map_position(lba);
            prop_assert!((i as u64) < ENTRIES_PER_BLOCK);
            prop_assert_eq!(block * ENTRIES_PER_BLOCK + i as u64, lba);
        }

        #[test]
        fn layouts_hold_their_invariants(blocks in 1u64..1 << 28, child in 0u64..1 << 45) {
            let size = blocks * BLOCK_BYTES;
            if let Ok(l) = Layout::new(size, child) {
                prop_assert_eq!(l.validate(size), Ok(()));
                prop_assert!(l.end() <= child);
                prop_assert!(l.map_blocks * ENTRIES_PER_BLOCK >= blocks);
                let (last, _) = map_position(blocks - 1);
                prop_assert!(l.map_block_offset(1, last) + BLOCK_BYTES <= l.journal);
                prop_assert!(l.journal_offset(l.journal_blocks) == l.data);
            }
        }

        #[test]
        fn the_suggested_child_holds_every_block_raw(blocks in 1u64..1 << 30) {
            let size = blocks * BLOCK_BYTES;
            let child = Layout::child_size_for(size).expect("fits");
            let l = Layout::new(size, child).expect("a valid layout");
            prop_assert!(l.data_sectors >= blocks * (MAX_EXTENT as u64).div_ceil(SECTOR));
        }

        #[test]
        fn superblocks_from_any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..BLOCK + 8), reseal in any::<bool>()) {
            let mut b = bytes;
            if reseal { reseal_superblock(&mut b) }
            if let Ok(s) = Superblock::decode(&b) {
                let mut again = vec![0; BLOCK];
                s.encode(&mut again).expect("a decoded superblock encodes");
                prop_assert_eq!(Superblock::decode(&again), Ok(s));
            }
            let _ = decode_journal_block(0, &[0; 16], &b);
            let _ = decode_map_block(0, 0, &b);
        }
    }
}
