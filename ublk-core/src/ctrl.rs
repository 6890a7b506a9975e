//! The control device, `/dev/ublk-control`: adding, configuring, starting, stopping and
//! deleting devices, each command an `IORING_OP_URING_CMD` on a ring of 128-byte SQEs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::error::{CtrlOp, Error, Result};
use crate::pod::{self, Plain, PrefixedPayload};
use crate::sys;

/// Path of the control node.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// A device's identity and shape as the kernel reports it (`ublksrv_ctrl_dev_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevInfo {
    /// Device id: the `N` of `/dev/ublkbN` and `/dev/ublkcN`.
    pub dev_id: u32,
    /// Number of hardware queues.
    pub nr_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `UBLK_S_DEV_*`.
    pub state: u16,
    /// Largest I/O in bytes.
    pub max_io_buf_bytes: u32,
    /// Pid of the serving process (as given to START_DEV), or -1.
    pub server_pid: i32,
    /// `UBLK_F_*` flags of the device.
    pub flags: u64,
    /// The server's own flags, stored by the kernel and returned unchanged.
    pub server_flags: u64,
    /// The user who added the device (the kernel records it; it matters for unprivileged
    /// devices, whose nodes udev hands to this user).
    pub owner_uid: u32,
    /// That user's group.
    pub owner_gid: u32,
}

impl DevInfo {
    fn from_sys(info: &sys::ublksrv_ctrl_dev_info) -> Self {
        DevInfo {
            dev_id: info.dev_id,
            nr_queues: info.nr_hw_queues,
            queue_depth: info.queue_depth,
            state: info.state,
            max_io_buf_bytes: info.max_io_buf_bytes,
            server_pid: info.ublksrv_pid,
            flags: info.flags,
            server_flags: info.ublksrv_flags,
            owner_uid: info.owner_uid,
            owner_gid: info.owner_gid,
        }
    }

    /// Whether the device was added by an unprivileged user (`UBLK_F_UNPRIVILEGED_DEV`):
    /// only its owner may command it, and every command names `/dev/ublkcN`.
    pub fn is_unprivileged(&self) -> bool {
        self.flags & sys::UBLK_F_UNPRIVILEGED_DEV != 0
    }

    /// The state's name: `DEAD`, `LIVE`, `QUIESCED`, `FAIL_IO`, or `UNKNOWN(n)`.
    pub fn state_name(&self) -> String {
        match self.state {
            sys::UBLK_S_DEV_DEAD => "DEAD".into(),
            sys::UBLK_S_DEV_LIVE => "LIVE".into(),
            sys::UBLK_S_DEV_QUIESCED => "QUIESCED".into(),
            sys::UBLK_S_DEV_FAIL_IO => "FAIL_IO".into(),
            n => format!("UNKNOWN({n})"),
        }
    }

    /// `/dev/ublkbN`.
    pub fn block_path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }

    /// `/dev/ublkcN`.
    pub fn char_path(&self) -> String {
        format!("/dev/ublkc{}", self.dev_id)
    }
}

/// What ADD_DEV asks for.
#[derive(Debug, Clone, Copy)]
pub struct AddRequest {
    /// A specific id, or `None` to let the kernel choose.
    pub dev_id: Option<u32>,
    /// Queues wanted (the kernel caps this at the number of CPUs).
    pub nr_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// Largest I/O in bytes.
    pub max_io_buf_bytes: u32,
    /// `UBLK_F_*` flags.
    pub flags: u64,
    /// Server-private flags the kernel keeps for us (see [`DevInfo::server_flags`]).
    pub server_flags: u64,
}

/// An open `/dev/ublk-control` with its own small io_uring.
///
/// Commands to an unprivileged device (`UBLK_F_UNPRIVILEGED_DEV`) carry the path of its
/// `/dev/ublkcN` before their payload, and the kernel checks the caller's access to that
/// node; the handle learns which devices are unprivileged (from ADD_DEV, or from one
/// GET_DEV_INFO2 per device) and adds the path where it is needed.
pub struct ControlDevice {
    file: File,
    ring: Mutex<IoUring<squeue::Entry128, cqueue::Entry>>,
    /// Device id → whether it is unprivileged, as far as this handle has seen it.
    unprivileged: Mutex<HashMap<u32, bool>>,
}

impl ControlDevice {
    /// Opens `/dev/ublk-control`; [`Error::NoDriver`] when it does not exist.
    pub fn open() -> Result<Self> {
        if !Path::new(CONTROL_PATH).exists() {
            return Err(Error::NoDriver);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::PermissionDenied {
                    Error::ControlAccess
                } else {
                    Error::Open {
                        path: CONTROL_PATH.into(),
                        source,
                    }
                }
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(|e| Error::io("creating the control io_uring", e))?;
        Ok(ControlDevice {
            file,
            ring: Mutex::new(ring),
            unprivileged: Mutex::new(HashMap::new()),
        })
    }

    /// Sends one command and waits for its answer; returns the CQE's non-negative `res`.
    fn command(&self, op: CtrlOp, cmd_op: u32, cmd: sys::ublksrv_ctrl_cmd) -> Result<i32> {
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd_op)
            .cmd(pod::to_cmd_bytes(&cmd))
            .build();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the SQE's `addr` points at a buffer owned by our caller that outlives this
        // call, and we wait for the command's completion below before returning.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| Error::io("control ring full", std::io::ErrorKind::Other.into()))?;
        let res = loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(Error::io("submitting a control command", e)),
            }
            if let Some(cqe) = ring.completion().next() {
                break cqe.result();
            }
        };
        if res < 0 {
            let errno = -res;
            if op == CtrlOp::AddDev && errno == libc::EEXIST && cmd.dev_id != u32::MAX {
                return Err(Error::IdInUse(cmd.dev_id));
            }
            return Err(Error::Ctrl {
                op,
                dev: if cmd.dev_id == u32::MAX {
                    -1
                } else {
                    i64::from(cmd.dev_id)
                },
                errno,
            });
        }
        Ok(res)
    }

    fn cmd_for(dev_id: u32) -> sys::ublksrv_ctrl_cmd {
        sys::ublksrv_ctrl_cmd {
            dev_id,
            queue_id: u16::MAX,
            ..Default::default()
        }
    }

    /// Sends a command about device `dev_id` with an optional in/out payload, putting the
    /// device's char path before the payload when the device is unprivileged.
    fn dev_command<T: Plain>(
        &self,
        op: CtrlOp,
        cmd_op: u32,
        mut cmd: sys::ublksrv_ctrl_cmd,
        payload: Option<&mut T>,
    ) -> Result<i32> {
        if !self.needs_path(cmd.dev_id)? {
            if let Some(value) = payload {
                cmd.addr = value as *mut T as u64;
                cmd.len = std::mem::size_of::<T>() as u16;
            }
            return self.command(op, cmd_op, cmd);
        }
        let path = char_path_bytes(cmd.dev_id);
        let mut buf = PrefixedPayload::new(&path, payload.as_deref());
        cmd.addr = buf.addr();
        cmd.len = if payload.is_some() {
            buf.len()
        } else {
            path.len()
        } as u16;
        cmd.dev_path_len = path.len() as u16;
        let res = self.command(op, cmd_op, cmd)?;
        if let Some(value) = payload {
            *value = buf.value();
        }
        Ok(res)
    }

    /// Whether commands to `dev_id` must carry its char path (it is unprivileged).
    fn needs_path(&self, dev_id: u32) -> Result<bool> {
        if let Some(&known) = self.known().get(&dev_id) {
            return Ok(known);
        }
        Ok(self.dev_info(dev_id)?.is_unprivileged())
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<u32, bool>> {
        self.unprivileged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kernel's `UBLK_F_*` feature bits (GET_FEATURES).
    pub fn features(&self) -> Result<u64> {
        let mut features = 0u64;
        let mut cmd = Self::cmd_for(u32::MAX);
        cmd.addr = &mut features as *mut u64 as u64;
        cmd.len = 8;
        self.command(CtrlOp::GetFeatures, sys::UBLK_U_CMD_GET_FEATURES, cmd)?;
        Ok(features)
    }

    /// Adds a device (ADD_DEV) and returns what the kernel made of the request.
    pub fn add(&self, req: &AddRequest) -> Result<DevInfo> {
        let mut info = sys::ublksrv_ctrl_dev_info {
            nr_hw_queues: req.nr_queues,
            queue_depth: req.queue_depth,
            max_io_buf_bytes: req.max_io_buf_bytes,
            dev_id: req.dev_id.unwrap_or(u32::MAX),
            ublksrv_pid: std::process::id() as i32,
            flags: req.flags,
            ublksrv_flags: req.server_flags,
            ..Default::default()
        };
        let mut cmd = Self::cmd_for(info.dev_id);
        cmd.addr = &mut info as *mut _ as u64;
        cmd.len = std::mem::size_of::<sys::ublksrv_ctrl_dev_info>() as u16;
        self.command(CtrlOp::AddDev, sys::UBLK_U_CMD_ADD_DEV, cmd)?;
        let info = DevInfo::from_sys(&info);
        self.known().insert(info.dev_id, info.is_unprivileged());
        Ok(info)
    }

    /// Sets the device's parameters (SET_PARAMS).
    pub fn set_params(&self, dev_id: u32, params: &sys::ublk_params) -> Result<()> {
        let mut p = *params;
        p.len = std::mem::size_of::<sys::ublk_params>() as u32;
        self.dev_command(
            CtrlOp::SetParams,
            sys::UBLK_U_CMD_SET_PARAMS,
            Self::cmd_for(dev_id),
            Some(&mut p),
        )?;
        Ok(())
    }

    /// Reads the device's parameters (GET_PARAMS).
    pub fn params(&self, dev_id: u32) -> Result<sys::ublk_params> {
        let mut p = sys::ublk_params {
            len: std::mem::size_of::<sys::ublk_params>() as u32,
            ..Default::default()
        };
        self.dev_command(
            CtrlOp::GetParams,
            sys::UBLK_U_CMD_GET_PARAMS,
            Self::cmd_for(dev_id),
            Some(&mut p),
        )?;
        Ok(p)
    }

    /// Starts the device (START_DEV); the kernel waits until every tag of every queue has been
    /// fetched, then creates `/dev/ublkbN`.
    pub fn start(&self, dev_id: u32, server_pid: i32) -> Result<()> {
        let mut cmd = Self::cmd_for(dev_id);
        cmd.data[0] = server_pid as u64;
        self.dev_command::<u64>(CtrlOp::StartDev, sys::UBLK_U_CMD_START_DEV, cmd, None)?;
        Ok(())
    }

    /// Stops the device (STOP_DEV): removes `/dev/ublkbN` after in-flight I/O ends.
    pub fn stop(&self, dev_id: u32) -> Result<()> {
        self.dev_command::<u64>(
            CtrlOp::StopDev,
            sys::UBLK_U_CMD_STOP_DEV,
            Self::cmd_for(dev_id),
            None,
        )?;
        Ok(())
    }

    /// Stops the device only when no one has `/dev/ublkbN` open (TRY_STOP_DEV, kernels with
    /// `UBLK_F_SAFE_STOP_DEV`): [`Error::Ctrl`] with `EBUSY` while it is open.
    pub fn try_stop(&self, dev_id: u32) -> Result<()> {
        self.dev_command::<u64>(
            CtrlOp::TryStopDev,
            sys::UBLK_U_CMD_TRY_STOP_DEV,
            Self::cmd_for(dev_id),
            None,
        )?;
        Ok(())
    }

    /// Begins taking over a device whose server died (START_USER_RECOVERY). The device must
    /// be QUIESCED or FAIL_IO and its old `/dev/ublkcN` closed; the kernel answers `EBUSY`
    /// otherwise. The new server then opens `/dev/ublkcN`, fetches every tag, and calls
    /// [`ControlDevice::end_recovery`].
    pub fn start_recovery(&self, dev_id: u32) -> Result<()> {
        self.dev_command::<u64>(
            CtrlOp::StartUserRecovery,
            sys::UBLK_U_CMD_START_USER_RECOVERY,
            Self::cmd_for(dev_id),
            None,
        )?;
        Ok(())
    }

    /// Ends a recovery (END_USER_RECOVERY): once every tag of every queue has been fetched,
    /// the device is LIVE again with `server_pid` as its server, and waiting I/O resumes.
    pub fn end_recovery(&self, dev_id: u32, server_pid: i32) -> Result<()> {
        let mut cmd = Self::cmd_for(dev_id);
        cmd.data[0] = server_pid as u64;
        self.dev_command::<u64>(
            CtrlOp::EndUserRecovery,
            sys::UBLK_U_CMD_END_USER_RECOVERY,
            cmd,
            None,
        )?;
        Ok(())
    }

    /// Changes the size of a started device to `bytes` (UPDATE_SIZE, kernels with
    /// `UBLK_F_UPDATE_SIZE`); the block layer announces the new capacity at once.
    pub fn update_size(&self, dev_id: u32, bytes: u64) -> Result<()> {
        let mut cmd = Self::cmd_for(dev_id);
        cmd.data[0] = bytes >> 9;
        self.dev_command::<u64>(CtrlOp::UpdateSize, sys::UBLK_U_CMD_UPDATE_SIZE, cmd, None)?;
        Ok(())
    }

    /// Quiesces a device with user recovery (QUIESCE_DEV, kernels with `UBLK_F_QUIESCE`):
    /// waits up to `timeout` for its requests in flight to be answered, then holds new I/O
    /// and aborts the server's fetches, so the server can exit and a next one recover the
    /// device. `EBUSY` when the I/O did not drain in time.
    pub fn quiesce(&self, dev_id: u32, timeout: std::time::Duration) -> Result<()> {
        let mut cmd = Self::cmd_for(dev_id);
        // 0 would mean "wait forever".
        cmd.data[0] = (timeout.as_millis() as u64).max(1);
        self.dev_command::<u64>(CtrlOp::QuiesceDev, sys::UBLK_U_CMD_QUIESCE_DEV, cmd, None)?;
        Ok(())
    }

    /// Deletes the device (DEL_DEV). Blocks until `/dev/ublkcN` is closed by every process.
    pub fn delete(&self, dev_id: u32) -> Result<()> {
        self.dev_command::<u64>(
            CtrlOp::DelDev,
            sys::UBLK_U_CMD_DEL_DEV,
            Self::cmd_for(dev_id),
            None,
        )?;
        self.known().remove(&dev_id);
        Ok(())
    }

    /// Deletes the device without waiting for its last user: `/dev/ublkcN` goes at once,
    /// the id once nobody holds the block device any more (a mounted file system, say).
    /// Uses DEL_DEV_ASYNC, or DEL_DEV on kernels without it. Then waits up to `grace` for
    /// the id to be free; returns whether it is. A device that no longer exists (deleted
    /// meanwhile, by its own server say) counts as deleted.
    pub fn delete_within(&self, dev_id: u32, grace: std::time::Duration) -> Result<bool> {
        match self.dev_command::<u64>(
            CtrlOp::DelDevAsync,
            sys::UBLK_U_CMD_DEL_DEV_ASYNC,
            Self::cmd_for(dev_id),
            None,
        ) {
            Ok(_) => {
                self.known().remove(&dev_id);
            }
            Err(Error::Ctrl { errno, .. })
                if errno == libc::EOPNOTSUPP || errno == libc::EINVAL =>
            {
                self.delete(dev_id)?;
                return Ok(true);
            }
            // Gone already: its server, seeing it stopped, deleted it first.
            Err(Error::Ctrl { errno, .. }) if errno == libc::ENODEV => {
                self.known().remove(&dev_id);
                return Ok(true);
            }
            Err(e) => return Err(e),
        }
        let deadline = std::time::Instant::now() + grace;
        loop {
            match self.dev_info(dev_id) {
                Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(true),
                _ if std::time::Instant::now() >= deadline => return Ok(false),
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    /// The device's info (GET_DEV_INFO2, falling back to GET_DEV_INFO on older kernels).
    pub fn dev_info(&self, dev_id: u32) -> Result<DevInfo> {
        // GET_DEV_INFO2's payload is the char device path (with its NUL) followed by the
        // info, for privileged and unprivileged devices alike.
        let path = char_path_bytes(dev_id);
        let mut buf = PrefixedPayload::<sys::ublksrv_ctrl_dev_info>::new(&path, None);
        let mut cmd = Self::cmd_for(dev_id);
        cmd.addr = buf.addr();
        cmd.len = buf.len() as u16;
        cmd.dev_path_len = path.len() as u16;
        match self.command(CtrlOp::GetDevInfo2, sys::UBLK_U_CMD_GET_DEV_INFO2, cmd) {
            Ok(_) => {
                let info = DevInfo::from_sys(&buf.value());
                self.known().insert(dev_id, info.is_unprivileged());
                return Ok(info);
            }
            Err(Error::Ctrl { errno, .. })
                if errno == libc::EOPNOTSUPP || errno == libc::EINVAL => {}
            Err(e) => return Err(e),
        }
        let mut info = sys::ublksrv_ctrl_dev_info::default();
        let mut cmd = Self::cmd_for(dev_id);
        cmd.addr = &mut info as *mut _ as u64;
        cmd.len = std::mem::size_of::<sys::ublksrv_ctrl_dev_info>() as u16;
        self.command(CtrlOp::GetDevInfo, sys::UBLK_U_CMD_GET_DEV_INFO, cmd)?;
        Ok(DevInfo::from_sys(&info))
    }

    /// The CPUs the kernel maps queue `q_id` to (GET_QUEUE_AFFINITY), as CPU numbers.
    pub fn queue_affinity(&self, dev_id: u32, q_id: u16) -> Result<Vec<usize>> {
        let mut mask = [0u64; 16]; // 1024 CPUs
        let mut cmd = Self::cmd_for(dev_id);
        cmd.queue_id = q_id;
        self.dev_command(
            CtrlOp::GetQueueAffinity,
            sys::UBLK_U_CMD_GET_QUEUE_AFFINITY,
            cmd,
            Some(&mut mask),
        )?;
        Ok(mask_to_cpus(&mask))
    }

    /// Ids of every ublk device present, sorted (from `/dev/ublkc*`).
    pub fn list_ids() -> Vec<u32> {
        let mut ids: Vec<u32> = std::fs::read_dir("/dev")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("ublkc"))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// `/dev/ublkcN` with its NUL, as commands to unprivileged devices carry it.
fn char_path_bytes(dev_id: u32) -> Vec<u8> {
    format!("/dev/ublkc{dev_id}\0").into_bytes()
}

fn mask_to_cpus(mask: &[u64]) -> Vec<usize> {
    let mut cpus = Vec::new();
    for (word_idx, word) in mask.iter().enumerate() {
        for bit in 0..64 {
            if word & (1u64 << bit) != 0 {
                cpus.push(word_idx * 64 + bit);
            }
        }
    }
    cpus
}

/// Names of the `UBLK_F_*` bits set in `flags`; unknown bits appear as `BIT_n`.
pub fn feature_names(flags: u64) -> Vec<String> {
    (0..64)
        .filter(|bit| flags & (1u64 << bit) != 0)
        .map(|bit| {
            sys::UBLK_FEATURE_NAMES
                .iter()
                .find(|(f, _)| *f == 1u64 << bit)
                .map_or_else(|| format!("BIT_{bit}"), |(_, n)| (*n).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_decodes_cpu_numbers() {
        assert_eq!(mask_to_cpus(&[0b1010, 1]), vec![1, 3, 64]);
        assert!(mask_to_cpus(&[0, 0]).is_empty());
    }

    #[test]
    fn feature_names_cover_known_and_unknown_bits() {
        let names = feature_names(sys::UBLK_F_USER_COPY | (1 << 40));
        assert_eq!(names, vec!["USER_COPY".to_string(), "BIT_40".to_string()]);
    }
}
