//! What `ublk add --recovery` saves so that `ublk recover` can start a new server for a
//! device whose server died.
//!
//! One JSON file per device, `/run/ublk/ublk<ID>.json` (beside the control socket, in
//! [`crate::control::run_dir`]):
//!
//! ```json
//! {"dev_id":3,"recovery":"reissue","cwd":"/root",
//!  "args":["ram","--size","32M","--recovery","reissue","--backing","/dev/shm/ublk-ram-3"],
//!  "owned_files":["/dev/shm/ublk-ram-3"],"expr_at":null}
//! ```
//!
//! `args` are the arguments of `ublk add` that started the device (everything after `add`),
//! `cwd` the directory they were given in (relative paths in them are relative to it), and
//! `owned_files` the files the tool created for the device (a RAM device's memory under
//! `/dev/shm`), which go when the device is deleted. For a stack, `expr_at` is the index of
//! its expression in `args`, replaced by the new expression when `ublk replace` changes
//! the tree, so that the next server builds the tree as it stands.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::control::run_dir;

/// A device's saved start-up state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevice {
    /// The device id.
    pub dev_id: u32,
    /// How the kernel treats I/O while no server runs: `reissue` or `fail-io`.
    pub recovery: String,
    /// The directory `args` were given in.
    pub cwd: PathBuf,
    /// The arguments of `ublk add` after `add`.
    pub args: Vec<String>,
    /// Files created for the device, removed with it.
    #[serde(default)]
    pub owned_files: Vec<PathBuf>,
    /// For a stack: which of `args` is its expression, kept up to date when `ublk replace`
    /// changes the tree.
    #[serde(default)]
    pub expr_at: Option<usize>,
}

/// Where device `dev_id`'s state is saved.
pub fn state_path(dev_id: u32) -> PathBuf {
    path_in(&run_dir(), dev_id)
}

fn path_in(dir: &Path, dev_id: u32) -> PathBuf {
    dir.join(format!("ublk{dev_id}.json"))
}

impl SavedDevice {
    /// Writes the state to [`state_path`], atomically (a new file renamed over the old one).
    pub fn save(&self) -> io::Result<()> {
        self.save_in(&run_dir())
    }

    fn save_in(&self, dir: &Path) -> io::Result<()> {
        let path = path_in(dir, self.dev_id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        let text = serde_json::to_string(self).map_err(io::Error::other)?;
        std::fs::write(&tmp, text + "\n")?;
        std::fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Reads device `dev_id`'s state; `Ok(None)` when none is saved.
    pub fn load(dev_id: u32) -> io::Result<Option<SavedDevice>> {
        Self::load_from(&run_dir(), dev_id)
    }

    fn load_from(dir: &Path, dev_id: u32) -> io::Result<Option<SavedDevice>> {
        let path = path_in(dir, dev_id);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let saved: SavedDevice = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        if saved.dev_id != dev_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} names device {}, not {dev_id}",
                    path.display(),
                    saved.dev_id
                ),
            ));
        }
        Ok(Some(saved))
    }
}

/// Puts `expr` in the place of the stack expression in device `dev_id`'s saved state, if
/// it has one.
pub fn update_expr(dev_id: u32, expr: &str) -> io::Result<()> {
    let Some(mut saved) = SavedDevice::load(dev_id)? else {
        return Ok(());
    };
    let Some(slot) = saved.expr_at.and_then(|i| saved.args.get_mut(i)) else {
        return Ok(());
    };
    *slot = expr.to_string();
    saved.save()
}

/// Removes device `dev_id`'s saved state and the files it owned, once the device is gone.
/// Returns what could not be removed (missing files are not an error).
pub fn forget(dev_id: u32) -> Vec<String> {
    forget_in(&run_dir(), dev_id)
}

fn forget_in(dir: &Path, dev_id: u32) -> Vec<String> {
    let mut problems = Vec::new();
    let path = path_in(dir, dev_id);
    match SavedDevice::load_from(dir, dev_id) {
        Ok(Some(saved)) => {
            for file in &saved.owned_files {
                remove_quietly(file, &mut problems);
            }
        }
        Ok(None) => {}
        Err(e) => problems.push(e.to_string()),
    }
    remove_quietly(&path, &mut problems);
    problems
}

/// Removes `path`, noting any failure but a missing file.
pub fn remove_quietly(path: &Path, problems: &mut Vec<String>) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => problems.push(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_round_trips_and_forget_removes_owned_files() {
        let dir = std::env::temp_dir().join(format!("ublk-saved-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let owned = dir.join("memory");
        std::fs::write(&owned, b"data").expect("write the owned file");
        let saved = SavedDevice {
            dev_id: 7,
            recovery: "reissue".into(),
            cwd: "/".into(),
            args: vec!["ram".into(), "--size".into(), "1M".into()],
            owned_files: vec![owned.clone()],
            expr_at: None,
        };
        saved.save_in(&dir).expect("save");
        assert_eq!(SavedDevice::load_from(&dir, 7).expect("load"), Some(saved));
        assert_eq!(
            SavedDevice::load_from(&dir, 8).expect("load a missing one"),
            None
        );
        assert!(SavedDevice::load_from(&dir, 7).is_ok());
        std::fs::copy(path_in(&dir, 7), path_in(&dir, 9)).expect("copy the state");
        assert!(
            SavedDevice::load_from(&dir, 9).is_err(),
            "a state naming another device was accepted"
        );
        assert!(forget_in(&dir, 7).is_empty());
        assert!(!owned.exists(), "the owned file outlived forget");
        assert!(!path_in(&dir, 7).exists(), "the state outlived forget");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
