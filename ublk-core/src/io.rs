//! Requests as the kernel describes them, and their checked decoding.
//!
//! Every number in a descriptor is untrusted: decoding uses checked arithmetic and answers a
//! negative errno for anything out of range, never a panic. The errno rules:
//! - an op this crate does not serve (zoned ops, WRITE_SAME, unknown codes): `-EOPNOTSUPP`;
//! - a range that overflows, ends past the device, or is larger than the tag buffer: `-EINVAL`;
//! - a read or write that is not a whole number of logical blocks: `-EINVAL`;
//! - a zero-length read, write, discard or write-zeroes: 0, answered by the engine without
//!   reaching the target.

use crate::sys;

/// Bytes per sector in descriptors, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;

/// One descriptor, copied out of the kernel's array (`ublksrv_io_desc`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// Op in bits 0–7, flags in bits 8–31.
    pub op_flags: u32,
    /// Length in 512-byte sectors.
    pub nr_sectors: u32,
    /// First sector.
    pub start_sector: u64,
    /// Buffer address the kernel recorded (unused in copy mode).
    pub addr: u64,
}

impl From<sys::ublksrv_io_desc> for IoDesc {
    fn from(d: sys::ublksrv_io_desc) -> Self {
        IoDesc {
            op_flags: d.op_flags,
            nr_sectors: d.nr_sectors,
            start_sector: d.start_sector,
            addr: d.addr,
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// Fill the buffer from the device.
    Read,
    /// Store the buffer on the device.
    Write,
    /// Make earlier completed writes durable.
    Flush,
    /// The range's contents may be dropped; later reads return zeroes or old data.
    Discard,
    /// The range must read back as zeroes.
    WriteZeroes,
}

/// Request flags (`UBLK_IO_F_*`, bits 8–31 of `op_flags`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IoFlags(pub u32);

impl IoFlags {
    /// Forced unit access: the write must be durable when it completes.
    pub fn fua(self) -> bool {
        self.0 & sys::UBLK_IO_F_FUA != 0
    }

    /// For write-zeroes: do not deallocate the range.
    pub fn no_unmap(self) -> bool {
        self.0 & sys::UBLK_IO_F_NOUNMAP != 0
    }

    /// Any of the FAILFAST bits: the submitter prefers a quick error to retries.
    pub fn failfast(self) -> bool {
        self.0
            & (sys::UBLK_IO_F_FAILFAST_DEV
                | sys::UBLK_IO_F_FAILFAST_TRANSPORT
                | sys::UBLK_IO_F_FAILFAST_DRIVER)
            != 0
    }
}

/// A decoded, bounds-checked request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockIo {
    /// The operation.
    pub op: Op,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes (0 for flush).
    pub len: u32,
    /// Flags.
    pub flags: IoFlags,
}

/// The limits a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size in bytes (a power of two, 512..=4096).
    pub logical_block_size: u32,
    /// The tag buffer size: the largest read or write.
    pub max_io: u32,
}

impl IoDesc {
    /// The op byte (bits 0–7).
    pub fn op_code(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }

    /// Decodes and checks this descriptor against `geo`; `Err` holds the negative errno to
    /// complete the request with.
    pub fn decode(&self, geo: &Geometry) -> Result<BlockIo, i32> {
        let op = match self.op_code() {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write,
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => return Err(-libc::EOPNOTSUPP),
        };
        let flags = IoFlags(self.op_flags & !0xff);
        if op == Op::Flush {
            return Ok(BlockIo {
                op,
                offset: 0,
                len: 0,
                flags,
            });
        }
        let offset = self
            .start_sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(-libc::EINVAL)?;
        let len64 = u64::from(self.nr_sectors) * SECTOR_SIZE;
        let end = offset.checked_add(len64).ok_or(-libc::EINVAL)?;
        if end > geo.size {
            return Err(-libc::EINVAL);
        }
        let len = u32::try_from(len64).map_err(|_| -libc::EINVAL)?;
        if matches!(op, Op::Read | Op::Write) {
            if len > geo.max_io {
                return Err(-libc::EINVAL);
            }
            let lbs = u64::from(geo.logical_block_size.max(1));
            if offset % lbs != 0 || len64 % lbs != 0 {
                return Err(-libc::EINVAL);
            }
        }
        Ok(BlockIo {
            op,
            offset,
            len,
            flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry {
        size: 1 << 20,
        logical_block_size: 512,
        max_io: 64 << 10,
    };

    fn desc(op: u8, flags: u32, start: u64, n: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors: n,
            start_sector: start,
            addr: 0,
        }
    }

    #[test]
    fn decodes_reads_and_writes_in_bytes() {
        let io = desc(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 8, 16)
            .decode(&GEO)
            .expect("valid write");
        assert_eq!((io.op, io.offset, io.len), (Op::Write, 4096, 8192));
        assert!(io.flags.fua());
        assert!(!io.flags.no_unmap());
    }

    #[test]
    fn rejects_ranges_past_the_end_or_overflowing() {
        let last = (GEO.size / SECTOR_SIZE) as u32;
        assert!(desc(0, 0, u64::from(last) - 1, 1).decode(&GEO).is_ok());
        assert_eq!(
            desc(0, 0, u64::from(last), 1).decode(&GEO),
            Err(-libc::EINVAL)
        );
        assert_eq!(desc(0, 0, u64::MAX, 1).decode(&GEO), Err(-libc::EINVAL));
        assert_eq!(
            desc(sys::UBLK_IO_OP_DISCARD, 0, 0, u32::MAX).decode(&GEO),
            Err(-libc::EINVAL)
        );
    }

    #[test]
    fn rejects_io_larger_than_the_tag_buffer() {
        assert_eq!(desc(0, 0, 0, 129).decode(&GEO), Err(-libc::EINVAL));
        // Discards are not bounded by the buffer.
        assert!(desc(sys::UBLK_IO_OP_DISCARD, 0, 0, 1024)
            .decode(&GEO)
            .is_ok());
    }

    #[test]
    fn rejects_partial_logical_blocks() {
        let geo = Geometry {
            logical_block_size: 4096,
            ..GEO
        };
        assert_eq!(desc(0, 0, 1, 8).decode(&geo), Err(-libc::EINVAL));
        assert_eq!(desc(0, 0, 0, 7).decode(&geo), Err(-libc::EINVAL));
        assert!(desc(0, 0, 8, 8).decode(&geo).is_ok());
    }

    #[test]
    fn unknown_and_unserved_ops_are_not_supported() {
        for op in [4u8, 6, 10, 13, 18, 255] {
            assert_eq!(
                desc(op, 0, 0, 1).decode(&GEO),
                Err(-libc::EOPNOTSUPP),
                "op {op}"
            );
        }
    }

    #[test]
    fn flush_ignores_range() {
        let io = desc(sys::UBLK_IO_OP_FLUSH, 0, u64::MAX, u32::MAX)
            .decode(&GEO)
            .expect("flush");
        assert_eq!((io.op, io.offset, io.len), (Op::Flush, 0, 0));
    }
}
