//! The crate's error type.

use std::io;

/// A control command, named for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CtrlOp {
    /// `UBLK_U_CMD_GET_FEATURES`
    GetFeatures,
    /// `UBLK_U_CMD_ADD_DEV`
    AddDev,
    /// `UBLK_U_CMD_DEL_DEV`
    DelDev,
    /// `UBLK_U_CMD_START_DEV`
    StartDev,
    /// `UBLK_U_CMD_STOP_DEV`
    StopDev,
    /// `UBLK_U_CMD_SET_PARAMS`
    SetParams,
    /// `UBLK_U_CMD_GET_PARAMS`
    GetParams,
    /// `UBLK_U_CMD_GET_DEV_INFO`
    GetDevInfo,
    /// `UBLK_U_CMD_GET_DEV_INFO2`
    GetDevInfo2,
    /// `UBLK_U_CMD_GET_QUEUE_AFFINITY`
    GetQueueAffinity,
    /// `UBLK_U_CMD_START_USER_RECOVERY`
    StartUserRecovery,
    /// `UBLK_U_CMD_END_USER_RECOVERY`
    EndUserRecovery,
    /// `UBLK_U_CMD_UPDATE_SIZE`
    UpdateSize,
    /// `UBLK_U_CMD_TRY_STOP_DEV`
    TryStopDev,
    /// `UBLK_U_CMD_QUIESCE_DEV`
    QuiesceDev,
    /// `UBLK_U_CMD_DEL_DEV_ASYNC`
    DelDevAsync,
}

impl std::fmt::Display for CtrlOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            CtrlOp::GetFeatures => "GET_FEATURES",
            CtrlOp::AddDev => "ADD_DEV",
            CtrlOp::DelDev => "DEL_DEV",
            CtrlOp::StartDev => "START_DEV",
            CtrlOp::StopDev => "STOP_DEV",
            CtrlOp::SetParams => "SET_PARAMS",
            CtrlOp::GetParams => "GET_PARAMS",
            CtrlOp::GetDevInfo => "GET_DEV_INFO",
            CtrlOp::GetDevInfo2 => "GET_DEV_INFO2",
            CtrlOp::GetQueueAffinity => "GET_QUEUE_AFFINITY",
            CtrlOp::StartUserRecovery => "START_USER_RECOVERY",
            CtrlOp::EndUserRecovery => "END_USER_RECOVERY",
            CtrlOp::UpdateSize => "UPDATE_SIZE",
            CtrlOp::TryStopDev => "TRY_STOP_DEV",
            CtrlOp::QuiesceDev => "QUIESCE_DEV",
            CtrlOp::DelDevAsync => "DEL_DEV_ASYNC",
        };
        f.write_str(name)
    }
}

/// Everything that can go wrong while setting up or serving a ublk device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/ublk-control` does not exist: the driver is not loaded.
    #[error("no /dev/ublk-control: load the driver with `modprobe ublk_drv` (or run inside `cargo xtask vm`)")]
    NoDriver,
    /// `/dev/ublk-control` exists but this user may not open it.
    #[error(
        "permission denied on /dev/ublk-control: run as root, or install the udev rule that \
         opens it to every user (udev/99-ublk.rules; README, \"Unprivileged devices\") and \
         add devices with --unprivileged"
    )]
    ControlAccess,
    /// ADD_DEV refused with EPERM: the caller lacks `CAP_SYS_ADMIN` and did not ask for an
    /// unprivileged device.
    #[error(
        "ADD_DEV failed: operation not permitted: a privileged device needs root \
         (CAP_SYS_ADMIN); another user adds an unprivileged one (ublk add --unprivileged, \
         DeviceBuilder::unprivileged)"
    )]
    AddNotPermitted,
    /// An unprivileged device's node did not become this user's in time: no udev rule
    /// hands `/dev/ublkcN` and `/dev/ublkbN` to their owner.
    #[error(
        "{path} did not become accessible to uid {uid} within {secs} s: udev gives an \
         unprivileged device's nodes to its owner only with the rule installed \
         (udev/99-ublk.rules; README, \"Unprivileged devices\"){}",
        left_behind_text(*.left_behind)
    )]
    NotHandedOver {
        /// The node.
        path: String,
        /// This process's user.
        uid: u32,
        /// How long we waited.
        secs: u64,
        /// The device, when this user cannot delete it either (its `/dev/ublkcN` is not
        /// ours): it stays until root deletes it.
        left_behind: Option<u32>,
    },
    /// Opening a device node failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The node that could not be opened.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The kernel answered a control command with an error.
    #[error("{op} failed for device {dev}: {}", errno_text(*errno))]
    Ctrl {
        /// Which control command.
        op: CtrlOp,
        /// The device id the command was for (`u32::MAX`: let the kernel choose).
        dev: i64,
        /// The positive errno.
        errno: i32,
    },
    /// A device with this id already exists.
    #[error("device id {0} is already in use")]
    IdInUse(u32),
    /// A parameter the user gave is out of range or inconsistent.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// A setup step that needed the OS failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// [`crate::DeviceBuilder::recover`] was asked to take over a device that cannot be
    /// recovered now; nothing was changed.
    #[error("device {dev_id} cannot be recovered: {reason}")]
    NotRecoverable {
        /// The device.
        dev_id: u32,
        /// Why: no `USER_RECOVERY` flag, a live server, a state other than QUIESCED/FAIL_IO.
        reason: String,
    },
    /// A queue thread failed, while starting or serving.
    #[error("queue {q_id} failed: {source}")]
    Queue {
        /// The queue.
        q_id: u16,
        /// Why.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str, source: io::Error) -> Self {
        Error::Io { what, source }
    }

    /// The positive errno behind this error, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Ctrl { errno, .. } => Some(*errno),
            Error::IdInUse(_) => Some(libc::EEXIST),
            Error::Open { source, .. } | Error::Io { source, .. } | Error::Queue { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

fn left_behind_text(left_behind: Option<u32>) -> String {
    match left_behind {
        Some(id) => format!(
            "; device {id} stays, since only its nodes' owner may delete it: \
             root removes it with `ublk del {id}`"
        ),
        None => String::new(),
    }
}

fn errno_text(errno: i32) -> String {
    format!("{} (errno {errno})", io::Error::from_raw_os_error(errno))
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
