//! Raw `linux/ublk_cmd.h` UAPI of kernel 7.2: the command numbers, flags and
//! `#[repr(C)]` structures shared with the ublk driver, and nothing else.
//!
//! Names are kept close to the C ones so that the header and the kernel
//! sources can be read side by side with this file: constants keep their C
//! name exactly, structures keep their C (snake_case) name and field names,
//! and the header's small `static inline` helpers become `const fn`s. Every
//! structure's size, alignment and field offsets are checked at compile time
//! against values printed by a C program compiled with gcc against the 7.2.13
//! header.
//!
//! The ioctl-style opcodes use the generic Linux `_IOC` encoding (x86, Arm,
//! RISC-V, LoongArch, s390), which is what the header expands to on those
//! architectures.

// The structures mirror the C header and keep its snake_case names, so that
// `ublksrv_ctrl_cmd` here is `struct ublksrv_ctrl_cmd` there.
#![allow(non_camel_case_types)]

use core::mem::size_of;

// ---------------------------------------------------------------------------
// ioctl encoding (include/uapi/asm-generic/ioctl.h)
// ---------------------------------------------------------------------------

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC_WRITE`: user space writes the argument, the kernel reads it.
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ`: the kernel writes the argument, user space reads it.
pub const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`: direction in bits 30-31, size in bits 16-29,
/// type in bits 8-15, number in bits 0-7.
///
/// Panics (at compile time when used in a constant) if `dir` or `size` does
/// not fit its bit field.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(dir < 4, "ioctl direction does not fit in 2 bits");
    assert!(
        size < 1 << IOC_SIZEBITS,
        "ioctl size does not fit in 14 bits"
    );
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `_IOR(type, nr, size)`: the kernel writes the argument.
pub const fn ior(ty: u8, nr: u8, size: usize) -> u32 {
    ioc(IOC_READ, ty, nr, size)
}

/// `_IOWR(type, nr, size)`: the argument goes both ways.
pub const fn iowr(ty: u8, nr: u8, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}

/// The ioctl type byte of every ublk command, `'u'`.
const UBLK_IOC_TYPE: u8 = b'u';

// ---------------------------------------------------------------------------
// Control commands
// ---------------------------------------------------------------------------

/// Legacy number of `UBLK_U_CMD_GET_QUEUE_AFFINITY`.
pub const UBLK_CMD_GET_QUEUE_AFFINITY: u32 = 0x01;
/// Legacy number of `UBLK_U_CMD_GET_DEV_INFO`.
pub const UBLK_CMD_GET_DEV_INFO: u32 = 0x02;
/// Legacy number of `UBLK_U_CMD_ADD_DEV`.
pub const UBLK_CMD_ADD_DEV: u32 = 0x04;
/// Legacy number of `UBLK_U_CMD_DEL_DEV`.
pub const UBLK_CMD_DEL_DEV: u32 = 0x05;
/// Legacy number of `UBLK_U_CMD_START_DEV`.
pub const UBLK_CMD_START_DEV: u32 = 0x06;
/// Legacy number of `UBLK_U_CMD_STOP_DEV`.
pub const UBLK_CMD_STOP_DEV: u32 = 0x07;
/// Legacy number of `UBLK_U_CMD_SET_PARAMS`.
pub const UBLK_CMD_SET_PARAMS: u32 = 0x08;
/// Legacy number of `UBLK_U_CMD_GET_PARAMS`.
pub const UBLK_CMD_GET_PARAMS: u32 = 0x09;
/// Legacy number of `UBLK_U_CMD_START_USER_RECOVERY`.
pub const UBLK_CMD_START_USER_RECOVERY: u32 = 0x10;
/// Legacy number of `UBLK_U_CMD_END_USER_RECOVERY`.
pub const UBLK_CMD_END_USER_RECOVERY: u32 = 0x11;
/// Legacy number of `UBLK_U_CMD_GET_DEV_INFO2`.
pub const UBLK_CMD_GET_DEV_INFO2: u32 = 0x12;

/// Read the CPU affinity bitmap of queue `queue_id` into `addr`/`len`.
pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ior(
    UBLK_IOC_TYPE,
    UBLK_CMD_GET_QUEUE_AFFINITY as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Read the device's `ublksrv_ctrl_dev_info` into `addr`.
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior(
    UBLK_IOC_TYPE,
    UBLK_CMD_GET_DEV_INFO as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Add a device described by the `ublksrv_ctrl_dev_info` at `addr`.
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_CMD_ADD_DEV as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Delete a device, waiting until it is released.
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_CMD_DEL_DEV as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Start a device; `data[0]` is the server's pid.
pub const UBLK_U_CMD_START_DEV: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_CMD_START_DEV as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Stop a device.
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_CMD_STOP_DEV as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Set the device's `ublk_params` from `addr`.
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_CMD_SET_PARAMS as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Read the device's `ublk_params` into `addr`.
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior(
    UBLK_IOC_TYPE,
    UBLK_CMD_GET_PARAMS as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Begin recovering a device whose server died.
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_CMD_START_USER_RECOVERY as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Finish recovering a device; `data[0]` is the new server's pid.
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_CMD_END_USER_RECOVERY as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Like `UBLK_U_CMD_GET_DEV_INFO`, with the device path prepended to the
/// buffer (`dev_path_len`) for permission checks.
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior(
    UBLK_IOC_TYPE,
    UBLK_CMD_GET_DEV_INFO2 as u8,
    size_of::<ublksrv_ctrl_cmd>(),
);
/// Read the driver's supported `UBLK_F_*` bits (a `u64`) into `addr`.
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior(UBLK_IOC_TYPE, 0x13, size_of::<ublksrv_ctrl_cmd>());
/// Delete a device without waiting for it to be released.
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior(UBLK_IOC_TYPE, 0x14, size_of::<ublksrv_ctrl_cmd>());
/// Resize a device (`UBLK_F_UPDATE_SIZE`); `data[0]` is the new size in
/// sectors.
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = iowr(UBLK_IOC_TYPE, 0x15, size_of::<ublksrv_ctrl_cmd>());
/// Quiesce a device (`UBLK_F_QUIESCE`); `data[0]` is the timeout.
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = iowr(UBLK_IOC_TYPE, 0x16, size_of::<ublksrv_ctrl_cmd>());
/// Stop a device only if nobody has it open (`UBLK_F_SAFE_STOP_DEV`).
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = iowr(UBLK_IOC_TYPE, 0x17, size_of::<ublksrv_ctrl_cmd>());
/// Register a shared memory buffer for zero copy (`UBLK_F_SHMEM_ZC`): `addr`
/// points to a `ublk_shmem_buf_reg`, `len` is its size; the result is the
/// assigned buffer index or a negative errno.
pub const UBLK_U_CMD_REG_BUF: u32 = iowr(UBLK_IOC_TYPE, 0x18, size_of::<ublksrv_ctrl_cmd>());
/// Unregister a shared memory buffer; `data[0]` is the buffer index.
pub const UBLK_U_CMD_UNREG_BUF: u32 = iowr(UBLK_IOC_TYPE, 0x19, size_of::<ublksrv_ctrl_cmd>());

/// Parameter buffer of `UBLK_U_CMD_REG_BUF`, pointed to by
/// `ublksrv_ctrl_cmd.addr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_shmem_buf_reg {
    /// User space virtual address of the shared memory.
    pub addr: u64,
    /// Buffer size in bytes, page-aligned, default maximum 4 GiB.
    pub len: u64,
    /// `UBLK_SHMEM_BUF_*` flags.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Pin pages without `FOLL_WRITE`; usable with a write-sealed memfd.
pub const UBLK_SHMEM_BUF_READ_ONLY: u32 = 1 << 0;

/// Size in bytes of the `UBLK_U_CMD_GET_FEATURES` answer (one `u64`).
pub const UBLK_FEATURES_LEN: u16 = 8;

// ---------------------------------------------------------------------------
// I/O commands
// ---------------------------------------------------------------------------

/// Legacy number of `UBLK_U_IO_FETCH_REQ`.
pub const UBLK_IO_FETCH_REQ: u32 = 0x20;
/// Legacy number of `UBLK_U_IO_COMMIT_AND_FETCH_REQ`.
pub const UBLK_IO_COMMIT_AND_FETCH_REQ: u32 = 0x21;
/// Legacy number of `UBLK_U_IO_NEED_GET_DATA`.
pub const UBLK_IO_NEED_GET_DATA: u32 = 0x22;

/// Fetch the next request for a tag; issued once per tag when starting.
pub const UBLK_U_IO_FETCH_REQ: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_IO_FETCH_REQ as u8,
    size_of::<ublksrv_io_cmd>(),
);
/// Commit a tag's result and fetch its next request.
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_IO_COMMIT_AND_FETCH_REQ as u8,
    size_of::<ublksrv_io_cmd>(),
);
/// Give the buffer for a write's data after `UBLK_IO_RES_NEED_GET_DATA`
/// (`UBLK_F_NEED_GET_DATA`).
pub const UBLK_U_IO_NEED_GET_DATA: u32 = iowr(
    UBLK_IOC_TYPE,
    UBLK_IO_NEED_GET_DATA as u8,
    size_of::<ublksrv_io_cmd>(),
);
/// Install a request's pages at index `addr` of the ring's sparse buffer
/// table (`UBLK_F_SUPPORT_ZERO_COPY`).
pub const UBLK_U_IO_REGISTER_IO_BUF: u32 = iowr(UBLK_IOC_TYPE, 0x23, size_of::<ublksrv_io_cmd>());
/// Remove the request buffer at index `addr` from the ring's buffer table.
pub const UBLK_U_IO_UNREGISTER_IO_BUF: u32 = iowr(UBLK_IOC_TYPE, 0x24, size_of::<ublksrv_io_cmd>());
/// Prepare a batch of tags (`UBLK_F_BATCH_IO`); returns 0 or a negative
/// errno.
pub const UBLK_U_IO_PREP_IO_CMDS: u32 = iowr(UBLK_IOC_TYPE, 0x25, size_of::<ublk_batch_io>());
/// Commit a batch of results (`UBLK_F_BATCH_IO`); returns the number of
/// bytes of the command buffer handled, or a negative errno (then nothing
/// was handled).
pub const UBLK_U_IO_COMMIT_IO_CMDS: u32 = iowr(UBLK_IOC_TYPE, 0x26, size_of::<ublk_batch_io>());
/// Fetch requests into a provided buffer, multishot
/// (`IORING_URING_CMD_MULTISHOT` required; `UBLK_F_BATCH_IO`).
pub const UBLK_U_IO_FETCH_IO_CMDS: u32 = iowr(UBLK_IOC_TYPE, 0x27, size_of::<ublk_batch_io>());

/// Fetch result: a request is ready.
pub const UBLK_IO_RES_OK: i32 = 0;
/// Fetch result: a write is ready, send `UBLK_U_IO_NEED_GET_DATA` with its
/// buffer.
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
/// Fetch result: the device is going away; do not fetch again.
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

/// mmap offset of the descriptor arrays on `/dev/ublkcN`.
pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;
/// Base of the user-copy `pread`/`pwrite` offsets on `/dev/ublkcN`.
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;

/// Maximum tags per queue.
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;

/// Bit offset of the byte offset in a user-copy offset.
pub const UBLK_IO_BUF_OFF: u32 = 0;
/// Bits of the byte offset in a user-copy offset (one I/O is at most
/// 32 MiB).
pub const UBLK_IO_BUF_BITS: u32 = 25;
/// Mask of the byte offset in a user-copy offset.
pub const UBLK_IO_BUF_BITS_MASK: u64 = (1 << UBLK_IO_BUF_BITS) - 1;

/// Bit offset of the tag in a user-copy offset.
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
/// Bits of the tag in a user-copy offset.
pub const UBLK_TAG_BITS: u32 = 16;
/// Mask of the tag in a user-copy offset.
pub const UBLK_TAG_BITS_MASK: u64 = (1 << UBLK_TAG_BITS) - 1;

/// Bit offset of the queue id in a user-copy offset.
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;
/// Bits of the queue id in a user-copy offset.
pub const UBLK_QID_BITS: u32 = 12;
/// Mask of the queue id in a user-copy offset.
pub const UBLK_QID_BITS_MASK: u64 = (1 << UBLK_QID_BITS) - 1;

/// Maximum queues per device.
pub const UBLK_MAX_NR_QUEUES: u16 = 1 << UBLK_QID_BITS;

/// Bits of a user-copy offset above `UBLKSRV_IO_BUF_OFFSET`.
pub const UBLKSRV_IO_BUF_TOTAL_BITS: u32 = UBLK_QID_OFF + UBLK_QID_BITS;
/// Size of the user-copy offset space.
pub const UBLKSRV_IO_BUF_TOTAL_SIZE: u64 = 1 << UBLKSRV_IO_BUF_TOTAL_BITS;

/// Bit of a user-copy offset that selects the integrity buffer.
pub const UBLK_INTEGRITY_FLAG_OFF: u32 = 62;
/// User-copy offset flag: copy to/from the request's integrity buffer
/// instead of its data buffer.
pub const UBLKSRV_IO_INTEGRITY_FLAG: u64 = 1 << UBLK_INTEGRITY_FLAG_OFF;

// ---------------------------------------------------------------------------
// Feature flags (ublksrv_ctrl_dev_info.flags, UBLK_U_CMD_GET_FEATURES)
// ---------------------------------------------------------------------------

/// Zero copy through `UBLK_U_IO_REGISTER_IO_BUF`/`UNREGISTER_IO_BUF` and a
/// sparse io_uring buffer table; the server never sees the bytes.
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
/// Complete io commands via `io_uring_cmd_complete_in_task`.
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// Writes are delivered first without data; the server answers with
/// `UBLK_U_IO_NEED_GET_DATA` and a buffer.
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
/// Recoverable after the server exits; outstanding I/O fails, new I/O
/// queues.
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
/// Recoverable after the server exits; outstanding I/O is reissued, new
/// I/O queues.
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// Unprivileged users can create and manage their own devices.
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// Commands use the ioctl encoding (`UBLK_U_*`).
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// Data is copied with `pread`/`pwrite` on `/dev/ublkcN`.
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
/// Zoned storage.
pub const UBLK_F_ZONED: u64 = 1 << 8;
/// Recoverable after the server exits; outstanding and new I/O fail until
/// recovery.
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
/// `UBLK_U_CMD_UPDATE_SIZE` is supported.
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
/// The request buffer is registered automatically at the index carried in
/// the fetch/commit SQE's `addr` (`ublk_auto_buf_reg`).
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
/// `UBLK_U_CMD_QUIESCE_DEV` is supported (needs `UBLK_F_USER_RECOVERY`).
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
/// Each (queue, tag) pair may be served by its own daemon task.
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
/// `UBLK_U_IO_(UN)REGISTER_IO_BUF` may be issued from any task.
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;
/// Batched I/O commands (`UBLK_U_IO_PREP_IO_CMDS`, `COMMIT_IO_CMDS`,
/// `FETCH_IO_CMDS`) replace the per-tag fetch/commit commands.
pub const UBLK_F_BATCH_IO: u64 = 1 << 15;
/// Requests may carry an integrity/metadata buffer (needs
/// `UBLK_F_USER_COPY`).
pub const UBLK_F_INTEGRITY: u64 = 1 << 16;
/// `UBLK_U_CMD_TRY_STOP_DEV` is supported.
pub const UBLK_F_SAFE_STOP_DEV: u64 = 1 << 17;
/// No automatic partition scan when the device starts.
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
/// Shared memory zero copy via `UBLK_U_CMD_REG_BUF` and
/// `UBLK_IO_F_SHMEM_ZC`.
pub const UBLK_F_SHMEM_ZC: u64 = 1 << 19;

/// Every `UBLK_F_*` flag with its name without the prefix, in bit order,
/// for printing flags by name.
pub const UBLK_FEATURE_NAMES: &[(u64, &str)] = &[
    (UBLK_F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "USER_COPY"),
    (UBLK_F_ZONED, "ZONED"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"),
    (UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"),
    (UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"),
    (UBLK_F_QUIESCE, "QUIESCE"),
    (UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"),
    (UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"),
    (UBLK_F_BATCH_IO, "BATCH_IO"),
    (UBLK_F_INTEGRITY, "INTEGRITY"),
    (UBLK_F_SAFE_STOP_DEV, "SAFE_STOP_DEV"),
    (UBLK_F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN"),
    (UBLK_F_SHMEM_ZC, "SHMEM_ZC"),
];

// ---------------------------------------------------------------------------
// Device states (ublksrv_ctrl_dev_info.state)
// ---------------------------------------------------------------------------

/// Not started, or stopped.
pub const UBLK_S_DEV_DEAD: u16 = 0;
/// Started and served.
pub const UBLK_S_DEV_LIVE: u16 = 1;
/// Server gone (or quiesced), I/O queued until recovery.
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
/// Server gone, I/O failed until recovery.
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// ---------------------------------------------------------------------------
// Control structures
// ---------------------------------------------------------------------------

/// A control command, copied into the `cmd` area of an `IORING_OP_URING_CMD`
/// SQE sent to `/dev/ublk-control`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublksrv_ctrl_cmd {
    /// Target device; must be valid.
    pub dev_id: u32,
    /// Target queue, or `u16::MAX` (-1) if the command is not for a queue.
    pub queue_id: u16,
    /// Length of the command-specific buffer at `addr`.
    pub len: u16,
    /// Command-specific buffer, in or out.
    pub addr: u64,
    /// Inline data.
    pub data: [u64; 1],
    /// Length of the device path prepended to the buffer, including the NUL;
    /// for `UBLK_F_UNPRIVILEGED_DEV` and `UBLK_CMD_GET_DEV_INFO2` only.
    pub dev_path_len: u16,
    /// Padding.
    pub pad: u16,
    /// Reserved.
    pub reserved: u32,
}

/// A device's description, given to `ADD_DEV` and returned by
/// `GET_DEV_INFO`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublksrv_ctrl_dev_info {
    /// Number of queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `UBLK_S_DEV_*`.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest I/O in bytes.
    pub max_io_buf_bytes: u32,
    /// Device id; `u32::MAX` in `ADD_DEV` lets the kernel choose.
    pub dev_id: u32,
    /// Pid of the server.
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `UBLK_F_*` flags.
    pub flags: u64,
    /// For the server's own use, invisible to the driver.
    pub ublksrv_flags: u64,
    /// Owner's uid, stored by the kernel.
    pub owner_uid: u32,
    /// Owner's gid, stored by the kernel.
    pub owner_gid: u32,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

// ---------------------------------------------------------------------------
// I/O descriptors
// ---------------------------------------------------------------------------

/// Read.
pub const UBLK_IO_OP_READ: u8 = 0;
/// Write.
pub const UBLK_IO_OP_WRITE: u8 = 1;
/// Flush.
pub const UBLK_IO_OP_FLUSH: u8 = 2;
/// Discard.
pub const UBLK_IO_OP_DISCARD: u8 = 3;
/// Write same.
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
/// Write zeroes.
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
/// Open a zone.
pub const UBLK_IO_OP_ZONE_OPEN: u8 = 10;
/// Close a zone.
pub const UBLK_IO_OP_ZONE_CLOSE: u8 = 11;
/// Finish a zone.
pub const UBLK_IO_OP_ZONE_FINISH: u8 = 12;
/// Append to a zone; the written LBA goes back in `zone_append_lba`.
pub const UBLK_IO_OP_ZONE_APPEND: u8 = 13;
/// Reset all zones.
pub const UBLK_IO_OP_ZONE_RESET_ALL: u8 = 14;
/// Reset a zone.
pub const UBLK_IO_OP_ZONE_RESET: u8 = 15;
/// Report up to `nr_zones` zones from `start_sector` as a `struct blk_zone`
/// array; a zeroed entry ends a shorter report.
pub const UBLK_IO_OP_REPORT_ZONES: u8 = 18;

/// Fail fast on device errors.
pub const UBLK_IO_F_FAILFAST_DEV: u32 = 1 << 8;
/// Fail fast on transport errors.
pub const UBLK_IO_F_FAILFAST_TRANSPORT: u32 = 1 << 9;
/// Fail fast on driver errors.
pub const UBLK_IO_F_FAILFAST_DRIVER: u32 = 1 << 10;
/// Metadata I/O.
pub const UBLK_IO_F_META: u32 = 1 << 11;
/// Forced unit access.
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
/// Write zeroes without unmapping.
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
/// Swap I/O.
pub const UBLK_IO_F_SWAP: u32 = 1 << 16;
/// Automatic buffer registration failed with `UBLK_AUTO_BUF_REG_FALLBACK`:
/// the server must register the buffer itself.
pub const UBLK_IO_F_NEED_REG_BUF: u32 = 1 << 17;
/// The request has an integrity data buffer.
pub const UBLK_IO_F_INTEGRITY: u32 = 1 << 18;
/// The buffer is in a registered shared memory buffer; `addr` encodes its
/// index and offset (see `ublk_shmem_zc_addr`).
pub const UBLK_IO_F_SHMEM_ZC: u32 = 1 << 19;

/// One request, written by the driver into the shared descriptor array
/// (indexed by tag) before the fetch completes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublksrv_io_desc {
    /// Op in bits 0-7 (`UBLK_IO_OP_*`), flags in bits 8-31
    /// (`UBLK_IO_F_*`).
    pub op_flags: u32,
    /// Sectors (512 bytes) to transfer; C union with `nr_zones`, the zone
    /// count for `UBLK_IO_OP_REPORT_ZONES`.
    pub nr_sectors: u32,
    /// First sector.
    pub start_sector: u64,
    /// Buffer address in the server, from the driver.
    pub addr: u64,
}

impl ublksrv_io_desc {
    /// `ublksrv_get_op()`: the `UBLK_IO_OP_*` in bits 0-7.
    pub const fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }

    /// `ublksrv_get_flags()`: bits 8-31, shifted down by 8.
    ///
    /// Note the shift: compare with `UBLK_IO_F_* >> 8`, or test
    /// `op_flags & UBLK_IO_F_*` directly.
    pub const fn flags(&self) -> u32 {
        self.op_flags >> 8
    }
}

/// Auto-registration flag: if registering the buffer fails, complete the
/// fetch with `UBLK_IO_F_NEED_REG_BUF` instead of failing the request.
pub const UBLK_AUTO_BUF_REG_FALLBACK: u8 = 1 << 0;
/// Every valid `ublk_auto_buf_reg.flags` bit.
pub const UBLK_AUTO_BUF_REG_F_MASK: u8 = UBLK_AUTO_BUF_REG_FALLBACK;

/// Automatic buffer registration (`UBLK_F_AUTO_BUF_REG`), carried in the
/// fetch/commit SQE's `addr`: index in bits 0-15, flags 16-23, reserved0
/// 24-31, reserved1 32-63.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_auto_buf_reg {
    /// Buffer table index at which the request buffer is registered.
    pub index: u16,
    /// `UBLK_AUTO_BUF_REG_*` flags.
    pub flags: u8,
    /// Reserved, zero.
    pub reserved0: u8,
    /// Reserved, zero (may carry an io_uring fd in the future).
    pub reserved1: u32,
}

impl ublk_auto_buf_reg {
    /// `ublk_auto_buf_reg_to_sqe_addr()`: the SQE `addr` carrying `self`.
    pub const fn to_sqe_addr(&self) -> u64 {
        self.index as u64
            | (self.flags as u64) << 16
            | (self.reserved0 as u64) << 24
            | (self.reserved1 as u64) << 32
    }

    /// `ublk_sqe_addr_to_auto_buf_reg()`: the registration carried by an
    /// SQE `addr`.
    pub const fn from_sqe_addr(sqe_addr: u64) -> Self {
        Self {
            index: sqe_addr as u16,
            flags: (sqe_addr >> 16) as u8,
            reserved0: (sqe_addr >> 24) as u8,
            reserved1: (sqe_addr >> 32) as u32,
        }
    }
}

/// An I/O command, copied into the `cmd` area of an `IORING_OP_URING_CMD`
/// SQE sent to `/dev/ublkcN`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublksrv_io_cmd {
    /// Queue id.
    pub q_id: u16,
    /// Tag of the request fetched or committed.
    pub tag: u16,
    /// I/O result (bytes or negative errno), for commit commands only.
    pub result: i32,
    /// Server buffer address for fetch commands (unused with
    /// `UBLK_F_USER_COPY`), or buffer table index for buffer registration;
    /// C union with `zone_append_lba`, the LBA written by
    /// `UBLK_IO_OP_ZONE_APPEND`.
    pub addr: u64,
}

/// Fixed header of each element of a batch command buffer
/// (`UBLK_F_BATCH_IO`); optional `u64` fields follow it according to
/// `UBLK_BATCH_F_HAS_BUF_ADDR` then `UBLK_BATCH_F_HAS_ZONE_LBA`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_elem_header {
    /// I/O tag.
    pub tag: u16,
    /// Buffer index for the incoming request, only with
    /// `UBLK_F_AUTO_BUF_REG`.
    pub buf_index: u16,
    /// I/O completion result (commit only).
    pub result: i32,
}

/// Elements carry a `u64` zone append LBA.
pub const UBLK_BATCH_F_HAS_ZONE_LBA: u16 = 1 << 0;
/// Elements carry a `u64` buffer address.
pub const UBLK_BATCH_F_HAS_BUF_ADDR: u16 = 1 << 1;
/// `UBLK_AUTO_BUF_REG_FALLBACK` for every element.
pub const UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: u16 = 1 << 2;

/// Command of `UBLK_U_IO_PREP_IO_CMDS`, `UBLK_U_IO_COMMIT_IO_CMDS` and
/// `UBLK_U_IO_FETCH_IO_CMDS`; the SQE's `addr`/`len` point to the element
/// buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_batch_io {
    /// Queue id.
    pub q_id: u16,
    /// `UBLK_BATCH_F_*` flags.
    pub flags: u16,
    /// Number of elements in the buffer.
    pub nr_elem: u16,
    /// Size of each element in bytes.
    pub elem_bytes: u8,
    /// Reserved.
    pub reserved: u8,
    /// Reserved.
    pub reserved2: u64,
}

// ---------------------------------------------------------------------------
// Parameters (UBLK_U_CMD_SET_PARAMS / GET_PARAMS)
// ---------------------------------------------------------------------------

/// Read-only device.
pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
/// Rotational device.
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
/// Volatile write cache (flushes are sent).
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// Forced unit access supported.
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

/// Basic queue limits.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_param_basic {
    /// `UBLK_ATTR_*` bits.
    pub attrs: u32,
    /// log2 of the logical block size.
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimum I/O size.
    pub io_min_shift: u8,
    /// Largest request in sectors.
    pub max_sectors: u32,
    /// Chunk size in sectors (requests do not cross chunks).
    pub chunk_sectors: u32,
    /// Device size in sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask of segments.
    pub virt_boundary_mask: u64,
}

/// Discard limits.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_param_discard {
    /// Discard alignment in bytes.
    pub discard_alignment: u32,
    /// Discard granularity in bytes.
    pub discard_granularity: u32,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one discard.
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// Device numbers; read-only (not settable with `SET_PARAMS`), the disk's
/// are available after the device starts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_param_devt {
    /// Major of `/dev/ublkcN`.
    pub char_major: u32,
    /// Minor of `/dev/ublkcN`.
    pub char_minor: u32,
    /// Major of `/dev/ublkbN`.
    pub disk_major: u32,
    /// Minor of `/dev/ublkbN`.
    pub disk_minor: u32,
}

/// Zoned device limits (`UBLK_F_ZONED`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_param_zoned {
    /// Most open zones.
    pub max_open_zones: u32,
    /// Most active zones.
    pub max_active_zones: u32,
    /// Largest zone append in sectors.
    pub max_zone_append_sectors: u32,
    /// Reserved.
    pub reserved: [u8; 20],
}

/// DMA alignment.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_param_dma_align {
    /// Buffer alignment mask.
    pub alignment: u32,
    /// Padding.
    pub pad: [u8; 4],
}

/// Smallest allowed segment size (and boundary mask + 1).
pub const UBLK_MIN_SEGMENT_SIZE: u32 = 4096;

/// Segment limits; if any of the three is 0 the behaviour is undefined.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_param_segment {
    /// Segment boundary mask; plus one must be a power of two
    /// `>= UBLK_MIN_SEGMENT_SIZE`.
    pub seg_boundary_mask: u64,
    /// Largest segment in bytes, `>= UBLK_MIN_SEGMENT_SIZE`; may be
    /// overridden by `virt_boundary_mask`.
    pub max_segment_size: u32,
    /// Most segments per request.
    pub max_segments: u16,
    /// Padding.
    pub pad: [u8; 2],
}

/// Integrity (metadata) limits (`UBLK_F_INTEGRITY`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_param_integrity {
    /// `LBMD_PI_CAP_*` from `linux/fs.h`.
    pub flags: u32,
    /// Most integrity segments; 0 means no limit.
    pub max_integrity_segments: u16,
    /// log2 of the protection interval.
    pub interval_exp: u8,
    /// Metadata bytes per interval; nonzero with `UBLK_PARAM_TYPE_INTEGRITY`.
    pub metadata_size: u8,
    /// Offset of the protection information in the metadata.
    pub pi_offset: u8,
    /// `LBMD_PI_CSUM_*` from `linux/fs.h`.
    pub csum_type: u8,
    /// Size of the application tag.
    pub tag_size: u8,
    /// Padding.
    pub pad: [u8; 5],
}

/// `ublk_params.basic` is set.
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
/// `ublk_params.discard` is set.
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
/// `ublk_params.devt` is set (read-only).
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
/// `ublk_params.zoned` is set.
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;
/// `ublk_params.dma` is set.
pub const UBLK_PARAM_TYPE_DMA_ALIGN: u32 = 1 << 4;
/// `ublk_params.seg` is set.
pub const UBLK_PARAM_TYPE_SEGMENT: u32 = 1 << 5;
/// `ublk_params.integrity` is set (needs `UBLK_F_INTEGRITY`).
pub const UBLK_PARAM_TYPE_INTEGRITY: u32 = 1 << 6;

/// All device parameters, selected by `types`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_params {
    /// Total length of the parameters; set by user space for both
    /// `SET_PARAMS` and `GET_PARAMS`, and may be updated by the driver.
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*` bits of the parameters included.
    pub types: u32,
    /// Basic limits.
    pub basic: ublk_param_basic,
    /// Discard limits.
    pub discard: ublk_param_discard,
    /// Device numbers.
    pub devt: ublk_param_devt,
    /// Zoned limits.
    pub zoned: ublk_param_zoned,
    /// DMA alignment.
    pub dma: ublk_param_dma_align,
    /// Segment limits.
    pub seg: ublk_param_segment,
    /// Integrity limits.
    pub integrity: ublk_param_integrity,
}

// ---------------------------------------------------------------------------
// Shared memory zero copy addresses (UBLK_IO_F_SHMEM_ZC)
// ---------------------------------------------------------------------------

/// Mask of the byte offset (bits 0-31) in a `UBLK_IO_F_SHMEM_ZC` address.
pub const UBLK_SHMEM_ZC_OFF_MASK: u64 = 0xffff_ffff;
/// Bit offset of the buffer index (bits 32-47) in a `UBLK_IO_F_SHMEM_ZC`
/// address; bits 48-63 are reserved, zero.
pub const UBLK_SHMEM_ZC_IDX_OFF: u32 = 32;
/// Mask of the buffer index, after shifting by `UBLK_SHMEM_ZC_IDX_OFF`.
pub const UBLK_SHMEM_ZC_IDX_MASK: u64 = 0xffff;

/// The `UBLK_IO_F_SHMEM_ZC` address of byte `offset` of buffer `index`.
pub const fn ublk_shmem_zc_addr(index: u16, offset: u32) -> u64 {
    (index as u64) << UBLK_SHMEM_ZC_IDX_OFF | offset as u64
}

/// The buffer index of a `UBLK_IO_F_SHMEM_ZC` address.
pub const fn ublk_shmem_zc_index(addr: u64) -> u16 {
    ((addr >> UBLK_SHMEM_ZC_IDX_OFF) & UBLK_SHMEM_ZC_IDX_MASK) as u16
}

/// The byte offset of a `UBLK_IO_F_SHMEM_ZC` address.
pub const fn ublk_shmem_zc_offset(addr: u64) -> u32 {
    (addr & UBLK_SHMEM_ZC_OFF_MASK) as u32
}

// ---------------------------------------------------------------------------
// Layout checks: sizes, alignments and offsets printed by gcc for the 7.2.13
// header (x86_64).
// ---------------------------------------------------------------------------

macro_rules! check_layout {
    ($ty:ident, size $size:literal, align $align:literal, { $($field:ident: $off:literal),* $(,)? }) => {
        const _: () = {
            assert!(core::mem::size_of::<$ty>() == $size);
            assert!(core::mem::align_of::<$ty>() == $align);
            $(assert!(core::mem::offset_of!($ty, $field) == $off);)*
        };
    };
}

check_layout!(ublksrv_ctrl_cmd, size 32, align 8, {
    dev_id: 0, queue_id: 4, len: 6, addr: 8, data: 16, dev_path_len: 24, pad: 26, reserved: 28,
});
check_layout!(ublksrv_ctrl_dev_info, size 64, align 8, {
    nr_hw_queues: 0, queue_depth: 2, state: 4, pad0: 6, max_io_buf_bytes: 8, dev_id: 12,
    ublksrv_pid: 16, pad1: 20, flags: 24, ublksrv_flags: 32, owner_uid: 40, owner_gid: 44,
    reserved1: 48, reserved2: 56,
});
check_layout!(ublksrv_io_desc, size 24, align 8, {
    op_flags: 0, nr_sectors: 4, start_sector: 8, addr: 16,
});
check_layout!(ublksrv_io_cmd, size 16, align 8, {
    q_id: 0, tag: 2, result: 4, addr: 8,
});
check_layout!(ublk_auto_buf_reg, size 8, align 4, {
    index: 0, flags: 2, reserved0: 3, reserved1: 4,
});
check_layout!(ublk_elem_header, size 8, align 4, {
    tag: 0, buf_index: 2, result: 4,
});
check_layout!(ublk_batch_io, size 16, align 8, {
    q_id: 0, flags: 2, nr_elem: 4, elem_bytes: 6, reserved: 7, reserved2: 8,
});
check_layout!(ublk_shmem_buf_reg, size 24, align 8, {
    addr: 0, len: 8, flags: 16, reserved: 20,
});
check_layout!(ublk_param_basic, size 32, align 8, {
    attrs: 0, logical_bs_shift: 4, physical_bs_shift: 5, io_opt_shift: 6, io_min_shift: 7,
    max_sectors: 8, chunk_sectors: 12, dev_sectors: 16, virt_boundary_mask: 24,
});
check_layout!(ublk_param_discard, size 20, align 4, {
    discard_alignment: 0, discard_granularity: 4, max_discard_sectors: 8,
    max_write_zeroes_sectors: 12, max_discard_segments: 16, reserved0: 18,
});
check_layout!(ublk_param_devt, size 16, align 4, {
    char_major: 0, char_minor: 4, disk_major: 8, disk_minor: 12,
});
check_layout!(ublk_param_zoned, size 32, align 4, {
    max_open_zones: 0, max_active_zones: 4, max_zone_append_sectors: 8, reserved: 12,
});
check_layout!(ublk_param_dma_align, size 8, align 4, {
    alignment: 0, pad: 4,
});
check_layout!(ublk_param_segment, size 16, align 8, {
    seg_boundary_mask: 0, max_segment_size: 8, max_segments: 12, pad: 14,
});
check_layout!(ublk_param_integrity, size 16, align 4, {
    flags: 0, max_integrity_segments: 4, interval_exp: 6, metadata_size: 7, pi_offset: 8,
    csum_type: 9, tag_size: 10, pad: 11,
});
check_layout!(ublk_params, size 152, align 8, {
    len: 0, types: 4, basic: 8, discard: 40, devt: 60, zoned: 76, dma: 108, seg: 120,
    integrity: 136,
});

#[cfg(test)]
mod tests {
    use super::*;

    /// Every opcode against the value gcc printed for the C macro.
    #[test]
    fn opcodes_match_c() {
        let expected: &[(u32, u32)] = &[
            (UBLK_U_CMD_GET_QUEUE_AFFINITY, 0x8020_7501),
            (UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502),
            (UBLK_U_CMD_ADD_DEV, 0xc020_7504),
            (UBLK_U_CMD_DEL_DEV, 0xc020_7505),
            (UBLK_U_CMD_START_DEV, 0xc020_7506),
            (UBLK_U_CMD_STOP_DEV, 0xc020_7507),
            (UBLK_U_CMD_SET_PARAMS, 0xc020_7508),
            (UBLK_U_CMD_GET_PARAMS, 0x8020_7509),
            (UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510),
            (UBLK_U_CMD_END_USER_RECOVERY, 0xc020_7511),
            (UBLK_U_CMD_GET_DEV_INFO2, 0x8020_7512),
            (UBLK_U_CMD_GET_FEATURES, 0x8020_7513),
            (UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514),
            (UBLK_U_CMD_UPDATE_SIZE, 0xc020_7515),
            (UBLK_U_CMD_QUIESCE_DEV, 0xc020_7516),
            (UBLK_U_CMD_TRY_STOP_DEV, 0xc020_7517),
            (UBLK_U_CMD_REG_BUF, 0xc020_7518),
            (UBLK_U_CMD_UNREG_BUF, 0xc020_7519),
            (UBLK_U_IO_FETCH_REQ, 0xc010_7520),
            (UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521),
            (UBLK_U_IO_NEED_GET_DATA, 0xc010_7522),
            (UBLK_U_IO_REGISTER_IO_BUF, 0xc010_7523),
            (UBLK_U_IO_UNREGISTER_IO_BUF, 0xc010_7524),
            (UBLK_U_IO_PREP_IO_CMDS, 0xc010_7525),
            (UBLK_U_IO_COMMIT_IO_CMDS, 0xc010_7526),
            (UBLK_U_IO_FETCH_IO_CMDS, 0xc010_7527),
        ];
        for (i, &(got, want)) in expected.iter().enumerate() {
            assert_eq!(got, want, "opcode #{i}: {got:#010x} != {want:#010x}");
        }
    }

    #[test]
    fn ioc_encoding() {
        assert_eq!(ioc(0, 0, 0, 0), 0);
        assert_eq!(ior(b'u', 0x13, 32), 0x8020_7513);
        assert_eq!(iowr(b'u', 0x04, 32), 0xc020_7504);
        assert_eq!(ioc(IOC_WRITE, 0xff, 0xff, (1 << 14) - 1), 0x7fff_ffff);
    }

    /// Derived constants against the values gcc printed.
    #[test]
    fn derived_constants_match_c() {
        assert_eq!(UBLK_IO_RES_ABORT, -19);
        assert_eq!(UBLKSRV_IO_BUF_OFFSET, 0x8000_0000);
        assert_eq!(UBLK_IO_BUF_BITS_MASK, 0x1ff_ffff);
        assert_eq!(UBLK_TAG_BITS_MASK, 0xffff);
        assert_eq!(UBLK_QID_OFF, 41);
        assert_eq!(UBLK_QID_BITS_MASK, 0xfff);
        assert_eq!(UBLK_MAX_NR_QUEUES, 0x1000);
        assert_eq!(UBLKSRV_IO_BUF_TOTAL_BITS, 53);
        assert_eq!(UBLKSRV_IO_BUF_TOTAL_SIZE, 0x20_0000_0000_0000);
        assert_eq!(UBLKSRV_IO_INTEGRITY_FLAG, 0x4000_0000_0000_0000);
    }

    #[test]
    fn feature_names_cover_bits_0_to_19_in_order() {
        assert_eq!(UBLK_FEATURE_NAMES.len(), 20);
        for (bit, &(flag, name)) in UBLK_FEATURE_NAMES.iter().enumerate() {
            assert_eq!(flag, 1 << bit, "{name}");
            assert!(!name.starts_with("UBLK_F_"), "{name}");
        }
        let all = UBLK_FEATURE_NAMES.iter().fold(0, |acc, &(f, _)| acc | f);
        assert_eq!(all, 0xfffff);
    }

    #[test]
    fn auto_buf_reg_round_trip() {
        let reg = ublk_auto_buf_reg {
            index: 0x1234,
            flags: UBLK_AUTO_BUF_REG_FALLBACK,
            reserved0: 0x56,
            reserved1: 0x789a_bcde,
        };
        let addr = reg.to_sqe_addr();
        assert_eq!(addr, 0x789a_bcde_5601_1234);
        let back = ublk_auto_buf_reg::from_sqe_addr(addr);
        assert_eq!(
            (back.index, back.flags, back.reserved0, back.reserved1),
            (reg.index, reg.flags, reg.reserved0, reg.reserved1)
        );
    }

    #[test]
    fn io_desc_op_and_flags() {
        let desc = ublksrv_io_desc {
            op_flags: u32::from(UBLK_IO_OP_WRITE) | UBLK_IO_F_FUA,
            ..Default::default()
        };
        assert_eq!(desc.op(), UBLK_IO_OP_WRITE);
        assert_eq!(desc.flags(), UBLK_IO_F_FUA >> 8);
    }

    #[test]
    fn shmem_zc_addr_round_trip() {
        let addr = ublk_shmem_zc_addr(0xbeef, 0x1234_5678);
        assert_eq!(addr, 0xbeef_1234_5678);
        assert_eq!(ublk_shmem_zc_index(addr), 0xbeef);
        assert_eq!(ublk_shmem_zc_offset(addr), 0x1234_5678);
    }
}
