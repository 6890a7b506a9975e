//! A request-stream checker: turns arbitrary bytes into requests (every op code, every flag
//! bit, ranges in bounds, at the edge and wildly out, batches in flight together), serves
//! them through a [`SimQueue`], and compares each answer with a plain in-memory model.
//!
//! Fuzz targets and corpus replays call [`check_request_stream`]; any mismatch panics with a
//! description, which is what a fuzzer reports. Adding a target takes one call:
//!
//! ```
//! # use ublk_core::check::{check_request_stream, Semantics};
//! # use ublk_core::{Geometry, Io, OpenCtx, QueueCtx, QueueTarget, Target};
//! # #[derive(Clone)] struct Null;
//! # impl Target for Null {
//! #     type Queue = Null;
//! #     fn open_queue(&self, _: &mut OpenCtx<'_>) -> std::io::Result<Null> { Ok(Null) }
//! # }
//! # impl QueueTarget for Null {
//! #     fn submit(&mut self, io: Io, _: &mut QueueCtx<'_>) { io.complete_ok() }
//! # }
//! let geo = Geometry { size: 1 << 20, logical_block_size: 512, max_io: 128 << 10 };
//! check_request_stream(|| Null, geo, Semantics::DISCARDS_DATA, &[1, 0, 0, 2, 3, 4]);
//! ```

use crate::buf::BufferMode;
use crate::io::{Geometry, IoDesc, SECTOR_SIZE};
use crate::sim::SimQueue;
use crate::sys;
use crate::target::Target;

/// What the model expects of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Semantics {
    /// Reads return what was written (false: reads may return anything, like null).
    pub stores_data: bool,
    /// Discard succeeds and the range then reads as zeroes (when storing data).
    pub discard_zeroes: bool,
    /// Write-zeroes succeeds and the range then reads as zeroes.
    pub write_zeroes: bool,
    /// Flush succeeds.
    pub flush: bool,
}

impl Semantics {
    /// A target that keeps data and supports every op (like the RAM target).
    pub const STORES_DATA: Semantics = Semantics {
        stores_data: true,
        discard_zeroes: true,
        write_zeroes: true,
        flush: true,
    };
    /// A target that accepts everything and keeps nothing (like the null target).
    pub const DISCARDS_DATA: Semantics = Semantics {
        stores_data: false,
        discard_zeroes: true,
        write_zeroes: true,
        flush: true,
    };
}

/// Reads untrusted fuzz bytes; past the end every read yields zero.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.0 = rest;
        first
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The model's expected answer to a request, by the documented rules (see [`crate::io`]).
fn expected_result(geo: &Geometry, sem: &Semantics, desc: &IoDesc) -> i32 {
    let op = desc.op_code();
    let supported = match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => true,
        sys::UBLK_IO_OP_FLUSH => sem.flush,
        sys::UBLK_IO_OP_DISCARD => sem.discard_zeroes,
        sys::UBLK_IO_OP_WRITE_ZEROES => sem.write_zeroes,
        _ => return -libc::EOPNOTSUPP,
    };
    if op == sys::UBLK_IO_OP_FLUSH {
        return if supported { 0 } else { -libc::EOPNOTSUPP };
    }
    let start = u128::from(desc.start_sector) * u128::from(SECTOR_SIZE);
    let len = u128::from(desc.nr_sectors) * u128::from(SECTOR_SIZE);
    if start + len > u128::from(geo.size) {
        return -libc::EINVAL;
    }
    let is_rw = matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE);
    if is_rw {
        let lbs = u128::from(geo.logical_block_size);
        if len > u128::from(geo.max_io) || start % lbs != 0 || len % lbs != 0 {
            return -libc::EINVAL;
        }
        return len as i32;
    }
    if supported {
        0
    } else {
        -libc::EOPNOTSUPP
    }
}

struct Pending {
    tag: u16,
    desc: IoDesc,
    expect: i32,
    /// For reads: expected bytes (None = any value, e.g. overlapped by a write in flight).
    expect_data: Vec<Option<u8>>,
}

/// Serves the requests `input` describes on a fresh queue of `make_target()` and checks every
/// answer against the model. Panics on the first mismatch.
pub fn check_request_stream<T: Target>(
    make_target: impl FnOnce() -> T,
    geo: Geometry,
    sem: Semantics,
    input: &[u8],
) {
    check_request_stream_in(BufferMode::Copy, make_target, geo, sem, input);
}

/// [`check_request_stream`] with the queue in buffer mode `mode` (`Copy`, `Registered` or
/// `UserCopy`: the zero-copy modes need the kernel).
pub fn check_request_stream_in<T: Target>(
    mode: BufferMode,
    make_target: impl FnOnce() -> T,
    geo: Geometry,
    sem: Semantics,
    input: &[u8],
) {
    check_request_stream_with(mode, make_target, geo, sem, input, None);
}

/// [`check_request_stream_in`] with something happening between batches: after each batch
/// (every request answered) one more input byte is handed to `between` — a test breaking and
/// returning a mirror's legs, say. Whatever it does, the target must keep answering as the
/// model says.
pub fn check_request_stream_with<T: Target>(
    mode: BufferMode,
    make_target: impl FnOnce() -> T,
    geo: Geometry,
    sem: Semantics,
    input: &[u8],
    mut between: Option<&mut dyn FnMut(u8)>,
) {
    let depth = 8u16;
    let target = make_target();
    let mut q = SimQueue::with_mode(&target, geo, depth, mode).expect("simulated queue");
    let size = usize::try_from(geo.size).expect("model size fits memory");
    // None: unknown (a target that does not store data, or racing writes).
    let mut model: Vec<Option<u8>> = vec![if sem.stores_data { Some(0) } else { None }; size];
    let mut bytes = Bytes(input);
    let mut seq: u8 = 1;
    while !bytes.is_empty() {
        let batch = usize::from(bytes.u8() % depth as u8) + 1;
        let mut pending: Vec<Pending> = Vec::with_capacity(batch);
        let mut writes: Vec<(usize, Vec<u8>, bool)> = Vec::new(); // (offset, data, zeroes)
        for _ in 0..batch {
            let desc = next_desc(&mut bytes, &geo);
            let tag = q.free_tag().expect("batch <= depth");
            let expect = expected_result(&geo, &sem, &desc);
            let op = desc.op_code();
            let mut data = Vec::new();
            if op == sys::UBLK_IO_OP_WRITE && expect > 0 {
                data = (0..expect as usize)
                    .map(|i| seq.wrapping_add(i as u8))
                    .collect();
                seq = seq.wrapping_add(97);
            }
            let mut expect_data = Vec::new();
            // Flush carries no range; every other success was range-checked by the model.
            if expect >= 0 && op != sys::UBLK_IO_OP_FLUSH {
                let off = (desc.start_sector * SECTOR_SIZE) as usize;
                let len = desc.nr_sectors as usize * SECTOR_SIZE as usize;
                match op {
                    sys::UBLK_IO_OP_READ => expect_data = model[off..off + len].to_vec(),
                    sys::UBLK_IO_OP_WRITE => writes.push((off, data.clone(), false)),
                    sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
                        writes.push((off, vec![0; len], true))
                    }
                    _ => {}
                }
            }
            q.deliver(tag, desc, &data).expect("free tag");
            pending.push(Pending {
                tag,
                desc,
                expect,
                expect_data,
            });
        }
        // Bytes written by any request of the batch are unspecified for the batch's reads
        // (they were in flight together); afterwards they hold the write, unless two writes
        // of the batch overlapped, when they are unspecified.
        let mut touched = vec![0u8; 0];
        if !writes.is_empty() {
            touched = vec![0u8; size];
            for (off, data, _) in &writes {
                for t in &mut touched[*off..off + data.len()] {
                    *t = t.saturating_add(1);
                }
            }
        }
        let mut others = Vec::new();
        for p in &pending {
            let c = match others
                .iter()
                .position(|c: &crate::sim::Commit| c.tag == p.tag)
            {
                Some(i) => others.swap_remove(i),
                None => q
                    .wait_for(p.tag, std::time::Duration::from_secs(10), &mut others)
                    .unwrap_or_else(|e| panic!("{e}: {:?}", p.desc)),
            };
            assert_eq!(
                c.result,
                p.expect,
                "result of {:?} (op {}): got {}, model says {}",
                p.desc,
                p.desc.op_code(),
                c.result,
                p.expect
            );
            if p.desc.op_code() == sys::UBLK_IO_OP_READ && p.expect > 0 {
                let off = (p.desc.start_sector * SECTOR_SIZE) as usize;
                assert_eq!(c.data.len(), p.expect as usize, "read length");
                for (i, (got, want)) in c.data.iter().zip(&p.expect_data).enumerate() {
                    let racing = !touched.is_empty() && touched[off + i] > 0;
                    if let (Some(want), false) = (want, racing) {
                        assert_eq!(
                            got,
                            want,
                            "byte {} of read {:?} differs from the model",
                            off + i,
                            p.desc
                        );
                    }
                }
            }
        }
        for (off, data, zeroes) in writes {
            for (i, b) in data.iter().enumerate() {
                let idx = off + i;
                let unknown = !sem.stores_data || touched[idx] > 1 || zeroes && !sem.discard_zeroes;
                model[idx] = if unknown { None } else { Some(*b) };
            }
        }
        assert_eq!(q.in_service(), 0, "every request was answered");
        if let Some(between) = between.as_mut() {
            between(bytes.u8());
        }
    }
}

/// One descriptor from the fuzz bytes: any op and flags, ranges in, at the edge of, and past
/// the device.
fn next_desc(b: &mut Bytes<'_>, geo: &Geometry) -> IoDesc {
    let sectors = geo.size / SECTOR_SIZE;
    let op_byte = b.u8();
    let op = match op_byte % 8 {
        0..=5 => op_byte % 6, // the served ops, mostly
        _ => b.u8(),          // anything at all
    };
    let flags = match b.u8() % 4 {
        0 => 0,
        1 => sys::UBLK_IO_F_FUA,
        2 => sys::UBLK_IO_F_NOUNMAP | sys::UBLK_IO_F_FAILFAST_DEV,
        _ => b.u32() & !0xff,
    };
    let mode = b.u8();
    let start_sector = match mode % 5 {
        0 => u64::from(b.u16()) % sectors.max(1),
        1 => sectors.saturating_sub(u64::from(b.u8() % 8)),
        2 => b.u64(),
        3 => 0,
        _ => (u64::from(b.u16()) % sectors.max(1)) & !7,
    };
    let nr_sectors = match (mode / 5) % 5 {
        0 => u32::from(b.u8() % 64) + 1,
        1 => 0,
        2 => b.u32(),
        3 => u32::from(b.u16()),
        _ => 8 * (u32::from(b.u8() % 16) + 1),
    };
    IoDesc {
        op_flags: u32::from(op) | flags,
        nr_sectors,
        start_sector,
        addr: b.u64() & 0xffff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_follows_the_documented_errno_rules() {
        let geo = Geometry {
            size: 1 << 20,
            logical_block_size: 512,
            max_io: 64 << 10,
        };
        let d = |op: u8, start, n| IoDesc {
            op_flags: u32::from(op),
            nr_sectors: n,
            start_sector: start,
            addr: 0,
        };
        let s = Semantics::STORES_DATA;
        assert_eq!(expected_result(&geo, &s, &d(0, 0, 8)), 4096);
        assert_eq!(expected_result(&geo, &s, &d(0, 2047, 2)), -libc::EINVAL);
        assert_eq!(expected_result(&geo, &s, &d(1, 0, 129)), -libc::EINVAL);
        assert_eq!(expected_result(&geo, &s, &d(3, 0, 2048)), 0);
        assert_eq!(expected_result(&geo, &s, &d(4, 0, 1)), -libc::EOPNOTSUPP);
        assert_eq!(expected_result(&geo, &s, &d(200, 0, 1)), -libc::EOPNOTSUPP);
        assert_eq!(expected_result(&geo, &s, &d(2, u64::MAX, u32::MAX)), 0);
    }
}
