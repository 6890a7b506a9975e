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

/// A `#[repr(C)]` UAPI struct (or integer array) made only of integers, so every byte pattern
/// read back from the kernel is a valid value; unlike [`Pod`] it may have implicit padding,
/// so its bytes are never read as `u8`s on our side.
///
/// # Safety
/// Implement only for types whose fields are all integers (or arrays or structs of them).
pub(crate) unsafe trait Plain: Copy {}

// SAFETY: integer fields only (see Pod).
unsafe impl Plain for sys::ublksrv_ctrl_dev_info {}
// SAFETY: nested structs of integers and integer arrays only; it has implicit padding (4
// bytes before `seg`), which is why it is Plain and not Pod.
unsafe impl Plain for sys::ublk_params {}
// SAFETY: an integer.
unsafe impl Plain for u64 {}
// SAFETY: an array of integers.
unsafe impl<const N: usize> Plain for [u64; N] {}

/// A payload for the kernel placed after a prefix (the char device path of an unprivileged
/// device's control command): `prefix`, then `value`'s bytes, in one buffer.
pub(crate) struct PrefixedPayload<T: Plain> {
    buf: Vec<u8>,
    prefix_len: usize,
    _value: std::marker::PhantomData<T>,
}

impl<T: Plain> PrefixedPayload<T> {
    /// `prefix` followed by room for a `T`, holding `value` when given (else zeroes).
    pub(crate) fn new(prefix: &[u8], value: Option<&T>) -> Self {
        let mut buf = vec![0u8; prefix.len() + std::mem::size_of::<T>()];
        buf[..prefix.len()].copy_from_slice(prefix);
        if let Some(value) = value {
            // SAFETY: the destination has size_of::<T>() writable bytes after the prefix
            // (allocated above); write_unaligned has no alignment requirement.
            unsafe {
                std::ptr::write_unaligned(buf[prefix.len()..].as_mut_ptr().cast::<T>(), *value)
            };
        }
        PrefixedPayload {
            buf,
            prefix_len: prefix.len(),
            _value: std::marker::PhantomData,
        }
    }

    /// The whole buffer's address, for the command's `addr`.
    pub(crate) fn addr(&mut self) -> u64 {
        self.buf.as_mut_ptr() as u64
    }

    /// The whole buffer's length.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// The `T` after the prefix, as the kernel left it.
    pub(crate) fn value(&self) -> T {
        // SAFETY: size_of::<T>() bytes follow the prefix (zeroed at allocation, then
        // written from a T by `new` or by the kernel), read back as a T, never as bytes;
        // read_unaligned has no alignment requirement; every bit pattern of the fields is a
        // valid T because T is Plain.
        unsafe { std::ptr::read_unaligned(self.buf[self.prefix_len..].as_ptr().cast::<T>()) }
    }
}

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
