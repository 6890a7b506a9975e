//! Little-endian fields and block checksums, shared by the on-disk formats of the mirror and
//! the compressing target. Callers check bounds first: these index directly.

/// The CRC32C of `block` with its 4-byte checksum field at `crc_at` taken as zero.
pub(crate) fn block_crc(block: &[u8], crc_at: usize) -> u32 {
    let crc = crc32c::crc32c(&block[..crc_at]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[crc_at + 4..])
}

pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
