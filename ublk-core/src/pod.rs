//! Byte views of the plain-old-data UAPI structs, the one place that reinterprets them.

use crate::sys;

/// A `#[repr(C)]` UAPI struct made only of integers with no implicit padding, so every byte
/// pattern is a valid value and every byte of a value is initialized.
///
/// # Safety
/// Implement only for types that meet the above; the compile-time layout checks in `sys`
/// (size equal to the sum of the fields) are what make it true for the types below.
pub(crate) unsafe trait Pod: Copy + Default {}

// SAFETY: each is repr(C), integer fields only, explicit pad fields; sys.rs asserts sizes.
unsafe impl Pod for sys::ublksrv_ctrl_cmd {}
// SAFETY: as above.
unsafe impl Pod for sys::ublksrv_ctrl_dev_info {}
// SAFETY: as above.
unsafe impl Pod for sys::ublksrv_io_cmd {}
// SAFETY: as above.
unsafe impl Pod for sys::ublksrv_io_desc {}
// SAFETY: as above.
unsafe impl Pod for sys::ublk_elem_header {}
// SAFETY: as above.
unsafe impl Pod for sys::ublk_batch_io {}

/// Copies `value` into the front of a zeroed `N`-byte array (an SQE command area).
pub(crate) fn to_cmd_bytes<T: Pod, const N: usize>(value: &T) -> [u8; N] {
    const { assert!(std::mem::size_of::<T>() <= N) };
    let mut out = [0u8; N];
    // SAFETY: T is Pod (all bytes initialized), the source is a valid &T of size_of::<T>()
    // bytes, the destination has at least that many bytes (checked above), and the two do not
    // overlap (out is a fresh local).
    unsafe {
        std::ptr::copy_nonoverlapping(
            (value as *const T).cast::<u8>(),
            out.as_mut_ptr(),
            std::mem::size_of::<T>(),
        );
    }
    out
}

/// Reads a `T` from the front of `bytes`, or `None` when `bytes` is too short.
pub(crate) fn from_bytes<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: at least size_of::<T>() readable bytes (checked); read_unaligned has no alignment
    // requirement; every bit pattern is a valid T because T is Pod.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}
