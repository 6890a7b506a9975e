//! Device parameters: what the user asks for, checked against the kernel's rules before any
//! device exists, and turned into `ublk_params`.

use crate::error::{Error, Result};
use crate::io::Geometry;
use crate::sys;

/// Most tags a queue may have.
pub const MAX_DEPTH: u16 = 4096;
/// Largest I/O buffer the kernel accepts per tag.
pub const MAX_IO_BYTES: u32 = 32 << 20;

/// The shape and abilities of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceParams {
    /// Size in bytes: a non-zero multiple of the logical block size.
    pub size: u64,
    /// Logical block size: a power of two from 512 to 4096.
    pub logical_block_size: u32,
    /// Physical block size: a power of two, at least the logical one, at most 4096... 64 KiB.
    pub physical_block_size: u32,
    /// Number of queues, each served by its own thread.
    pub queues: u16,
    /// Tags (requests in flight) per queue, 1..=4096.
    pub depth: u16,
    /// Largest single I/O in bytes (multiple of 4096, at most 32 MiB).
    pub max_io: u32,
    /// The device accepts discard requests.
    pub discard: bool,
    /// The device accepts write-zeroes requests.
    pub write_zeroes: bool,
    /// The device has a volatile write cache: the kernel sends flushes.
    pub volatile_cache: bool,
    /// The device honours FUA on writes.
    pub fua: bool,
    /// Reject writes.
    pub read_only: bool,
}

impl Default for DeviceParams {
    fn default() -> Self {
        DeviceParams {
            size: 0,
            logical_block_size: 512,
            physical_block_size: 4096,
            queues: 1,
            depth: 128,
            max_io: 512 << 10,
            discard: false,
            write_zeroes: false,
            volatile_cache: false,
            fua: false,
            read_only: false,
        }
    }
}

/// Largest queue count accepted: four per CPU (the kernel caps the count at the CPU count).
pub fn max_queues() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u16::try_from(cpus.saturating_mul(4))
        .unwrap_or(u16::MAX)
        .min(4096)
}

impl DeviceParams {
    /// Checks every field; the error names the field and the rule.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidParam(msg));
        let lbs = self.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=4096).contains(&lbs) {
            return bad(format!(
                "logical block size {lbs} must be a power of two from 512 to 4096"
            ));
        }
        let pbs = self.physical_block_size;
        if !pbs.is_power_of_two() || pbs < lbs || pbs > 64 << 10 {
            return bad(format!(
                "physical block size {pbs} must be a power of two from the logical block size ({lbs}) to 65536"
            ));
        }
        if self.size == 0 {
            return bad("size must be greater than 0".into());
        }
        if self.size % u64::from(lbs) != 0 {
            return bad(format!(
                "size {} is not a multiple of the logical block size {lbs}",
                self.size
            ));
        }
        let max_q = max_queues();
        if self.queues == 0 || self.queues > max_q {
            return bad(format!(
                "queues {} must be from 1 to {max_q} (4 per CPU)",
                self.queues
            ));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return bad(format!(
                "depth {} must be from 1 to {MAX_DEPTH}",
                self.depth
            ));
        }
        if self.max_io < 4096 || self.max_io > MAX_IO_BYTES || self.max_io % 4096 != 0 {
            return bad(format!(
                "max I/O size {} must be a multiple of 4096 from 4096 to {MAX_IO_BYTES}",
                self.max_io
            ));
        }
        if self.max_io < lbs {
            return bad("max I/O size is smaller than a logical block".into());
        }
        Ok(())
    }

    /// The limits requests are checked against.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size,
            logical_block_size: self.logical_block_size,
            max_io: self.max_io,
        }
    }

    /// The kernel's form. Call [`DeviceParams::validate`] first.
    pub fn to_sys(&self) -> sys::ublk_params {
        let shift = |n: u32| n.trailing_zeros() as u8;
        let mut attrs = 0;
        if self.volatile_cache {
            attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
        }
        if self.fua {
            attrs |= sys::UBLK_ATTR_FUA;
        }
        if self.read_only {
            attrs |= sys::UBLK_ATTR_READ_ONLY;
        }
        let mut p = sys::ublk_params {
            len: std::mem::size_of::<sys::ublk_params>() as u32,
            types: sys::UBLK_PARAM_TYPE_BASIC,
            basic: sys::ublk_param_basic {
                attrs,
                logical_bs_shift: shift(self.logical_block_size),
                physical_bs_shift: shift(self.physical_block_size),
                io_opt_shift: shift(self.physical_block_size),
                io_min_shift: shift(self.logical_block_size),
                max_sectors: self.max_io >> 9,
                chunk_sectors: 0,
                dev_sectors: self.size >> 9,
                virt_boundary_mask: 0,
            },
            ..Default::default()
        };
        if self.discard || self.write_zeroes {
            p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            let max = u32::MAX >> 9;
            p.discard = sys::ublk_param_discard {
                discard_alignment: 0,
                discard_granularity: self.physical_block_size,
                max_discard_sectors: if self.discard { max } else { 0 },
                max_write_zeroes_sectors: if self.write_zeroes { max } else { 0 },
                max_discard_segments: 1,
                reserved0: 0,
            };
        }
        p
    }
}

/// Parses a size such as `4096`, `512K`, `64M`, `1G`, `2T` (binary units; `KiB`/`k` also
/// accepted). Errors name the bad input.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let bad = || {
        Error::InvalidParam(format!(
            "bad size {text:?}: use a number with an optional K, M, G or T suffix"
        ))
    };
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(bad());
    }
    let number: u64 = t[..digits_end].parse().map_err(|_| bad())?;
    let shift = match t[digits_end..].to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| Error::InvalidParam(format!("size {text:?} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(size: u64) -> DeviceParams {
        DeviceParams {
            size,
            ..Default::default()
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("512K").ok(), Some(512 << 10));
        assert_eq!(parse_size("64m").ok(), Some(64 << 20));
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("2TiB").ok(), Some(2 << 40));
        for bad in [
            "",
            "G",
            "12Q",
            "-1",
            "1.5G",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn validation_names_the_broken_rule() {
        let msg = |p: DeviceParams| p.validate().expect_err("invalid").to_string();
        assert!(msg(params(0)).contains("size"));
        assert!(msg(params(1000)).contains("multiple of the logical block size"));
        assert!(msg(DeviceParams {
            queues: 0,
            ..params(1 << 20)
        })
        .contains("queues"));
        assert!(msg(DeviceParams {
            queues: max_queues() + 1,
            ..params(1 << 20)
        })
        .contains("queues"));
        assert!(msg(DeviceParams {
            depth: 0,
            ..params(1 << 20)
        })
        .contains("depth"));
        assert!(msg(DeviceParams {
            depth: 4097,
            ..params(1 << 20)
        })
        .contains("depth"));
        assert!(msg(DeviceParams {
            logical_block_size: 1024 * 3,
            ..params(1 << 20)
        })
        .contains("logical block size"));
        assert!(params(1 << 20).validate().is_ok());
        assert!(DeviceParams {
            queues: max_queues(),
            depth: 4096,
            ..params(4096)
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn sys_params_carry_sizes_as_shifts_and_sectors() {
        let p = DeviceParams {
            size: 1 << 30,
            logical_block_size: 4096,
            discard: true,
            ..Default::default()
        }
        .to_sys();
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (1 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.discard.max_write_zeroes_sectors, 0);
    }
}
