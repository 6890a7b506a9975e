//! # ublk-targets
//!
//! Ready-made block targets for ublk-rs and the `ublk` command-line tool that serves them:
//! - [`null::Null`]: completes everything at once (the benchmark baseline);
//! - [`ram::Ram`]: memory-backed, from a memfd or a tmpfs file;
//! - [`file::FileTarget`]: a loop device in user space, its I/O on the queue's io_uring;
//! - [`stripe::Stripe`]: RAID-0 over N children;
//! - [`mirror::Mirror`]: RAID-1 over N children, with a persistent write-intent bitmap,
//!   rebuild, resync and reassembly;
//! - [`compress::Compress`]: stores a device compressed (lz4 or zstd) in its child, crash
//!   consistent through a journal and map checkpoints;
//! - `rbd::Rbd` (cargo feature `rbd`): a Ceph RBD image, through librbd's asynchronous API;
//! - [`faulty::Faulty`]: a pass-through node that fails or delays chosen operations on demand.
//!
//! Each target is a block backend ([`ublk_zc::Target`]), so targets own others as children:
//! [`stack::build`] assembles a tree from an expression such as
//! `stripe(file:/dev/sdb,file:/dev/sdc,chunk=128K)`, and [`control`] is the per-device socket
//! through which the `ublk` tool reads a running tree's status and switches faults.
//!
//! ```no_run
//! use ublk_targets::ram::Ram;
//! use ublk_zc::DeviceBuilder;
//!
//! let size = 256 << 20;
//! DeviceBuilder::new()
//!     .size(size)
//!     .discard(true)
//!     .write_zeroes(true)
//!     .run(Ram::new(size)?)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
// The one exception, the Ceph bindings (`rbd::ffi`), opts in with `allow(unsafe_code)`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod compress;
pub mod control;
pub mod expr;
pub mod faulty;
pub mod file;
pub mod fuzzing;
pub mod mirror;
pub mod null;
mod ondisk;
pub mod ram;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod saved;
pub mod stack;
pub mod stats;
pub mod stripe;

/// The targets the `ublk` tool can serve, with the code it stores in the device's server
/// flags so that `ublk list` can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetKind {
    /// [`null::Null`].
    Null,
    /// [`ram::Ram`].
    Ram,
    /// [`file::FileTarget`].
    File,
    /// A tree from a stack expression ([`stack::build`]).
    Stack,
    /// [`compress::Compress`] over a file: the short form of the stack
    /// `compress(file:FILE,size=SIZE)`.
    Compress,
    /// A Ceph RBD image (`ublk add rbd --pool P --image I`): the short form of the stack
    /// `rbd(pool=P,image=I)`; needs a build with the cargo feature `rbd`.
    Rbd,
}

impl TargetKind {
    /// Every kind, in the order the help text lists them.
    pub const ALL: [TargetKind; 6] = [
        TargetKind::Null,
        TargetKind::Ram,
        TargetKind::File,
        TargetKind::Stack,
        TargetKind::Compress,
        TargetKind::Rbd,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Null => "null",
            TargetKind::Ram => "ram",
            TargetKind::File => "file",
            TargetKind::Stack => "stack",
            TargetKind::Compress => "compress",
            TargetKind::Rbd => "rbd",
        }
    }

    /// The code kept in the low byte of the device's server flags.
    pub fn code(self) -> u64 {
        match self {
            TargetKind::Null => 1,
            TargetKind::Ram => 2,
            TargetKind::File => 3,
            TargetKind::Stack => 4,
            TargetKind::Compress => 5,
            TargetKind::Rbd => 6,
        }
    }

    /// Whether the device's size comes from the tree built (a stack's, or the image's of a
    /// compressed device, an RBD image's) rather than from `--size`.
    pub fn sized_by_tree(self) -> bool {
        matches!(
            self,
            TargetKind::Stack | TargetKind::Compress | TargetKind::Rbd
        )
    }

    /// The kind a command-line name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind recorded in `server_flags`, if it is one of ours.
    pub fn from_server_flags(flags: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == flags & 0xff)
    }
}

/// Checks that a direct access of `len` bytes at `offset` lies inside a target of `size`
/// bytes.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> std::io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{len} bytes at {offset} lie past the end ({size} bytes)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_names_and_codes() {
        for kind in TargetKind::ALL {
            assert_eq!(TargetKind::from_name(kind.name()), Some(kind));
            assert_eq!(TargetKind::from_server_flags(kind.code()), Some(kind));
        }
        assert_eq!(TargetKind::from_name("bogus"), None);
        assert_eq!(TargetKind::from_server_flags(0), None);
    }
}
