//! `unprivileged_*`: devices added by users without root (`ublk add --unprivileged`,
//! `UBLK_F_UNPRIVILEGED_DEV`).
//!
//! Two test users (uids 4242 and 4343, no root, no capabilities) and `/dev/ublk-control`
//! opened to every user, as the shipped udev rule does. The VM has no udevd, so a thread
//! of this test plays udev's part the way `udev/99-ublk.rules` does: for every new ublk
//! node it runs `ublk udev-owner NAME` and gives the node to the uid and gid printed. The
//! first user adds a RAM device, owns its nodes and its server, runs fio `--verify` on it,
//! sees its status, and deletes it; the second user can neither delete nor recover it;
//! zero-copy, `--recovery` and a privileged add are refused; and without the "udev" the
//! add gives up after `--udev-timeout` with an error naming the rule, and root removes the
//! device it could not delete.

use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const OWNER: u32 = 4242;
const OTHER: u32 = 4343;

/// Runs `program args...` as `uid` (group `uid`, no supplementary groups) with its own
/// `XDG_RUNTIME_DIR`, whatever its exit status.
fn as_user(uid: u32, program: &str, args: &[&str]) -> Output {
    let runtime = runtime_dir(uid);
    let mut command = Command::new(program);
    command
        .args(args)
        .uid(uid)
        .gid(uid)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("HOME", &runtime)
        .current_dir(&runtime)
        .stdin(Stdio::null());
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(program, args)));
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for `{}`: {e}", command_line(program, args)))
}

/// `ublk args...` as `uid`, which must succeed.
#[track_caller]
fn ublk_as(uid: u32, args: &[&str]) -> Output {
    let out = as_user(uid, &ublk_bin(), args);
    assert!(
        out.status.success(),
        "as uid {uid}: {}",
        describe(&command_line("ublk", args), &out)
    );
    out
}

/// `ublk args...` as `uid`, which must fail; returns its stderr.
#[track_caller]
fn ublk_fails_as(uid: u32, args: &[&str]) -> String {
    let out = as_user(uid, &ublk_bin(), args);
    assert!(
        !out.status.success(),
        "as uid {uid}, expected a failure: {}",
        describe(&command_line("ublk", args), &out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The user's private runtime directory (made on first use).
fn runtime_dir(uid: u32) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ublk-unprivileged-run-{uid}"));
    if !dir.exists() {
        fs::create_dir_all(&dir).expect("create a runtime directory");
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).expect("chown the runtime dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod it");
    }
    dir
}

/// `/dev/ublk-control` opened to every user while the test runs, as the udev rule does.
struct OpenControl {
    mode: u32,
}

impl OpenControl {
    fn new() -> OpenControl {
        let mode = fs::metadata(CONTROL_DEVICE)
            .expect("stat the control node")
            .mode()
            & 0o7777;
        fs::set_permissions(CONTROL_DEVICE, fs::Permissions::from_mode(0o666))
            .expect("chmod /dev/ublk-control");
        OpenControl { mode }
    }
}

impl Drop for OpenControl {
    fn drop(&mut self) {
        let _ = fs::set_permissions(CONTROL_DEVICE, fs::Permissions::from_mode(self.mode));
    }
}

/// This test's stand-in for udevd running the rule of `udev/99-ublk.rules`.
struct FakeUdev {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl FakeUdev {
    fn start() -> FakeUdev {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut handled = BTreeSet::new();
                let mut problems = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let nodes = device_nodes();
                    handled.retain(|n| nodes.contains(n));
                    for name in nodes.difference(&handled.clone()) {
                        if let Err(e) = apply_rule(name) {
                            problems.push(format!("{name}: {e}"));
                        }
                        handled.insert(name.clone());
                    }
                    sleep(Duration::from_millis(20));
                }
                problems
            }
        });
        FakeUdev {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it; returns what went wrong applying the rule.
    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("the fake udev panicked"))
            .unwrap_or_default()
    }
}

impl Drop for FakeUdev {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the rule does for node `name`: `PROGRAM="ublk udev-owner %k"`, then OWNER, GROUP
/// and MODE="0600" when the program succeeds.
fn apply_rule(name: &str) -> Result<(), String> {
    let out = Command::new(ublk_bin())
        .args(["udev-owner", name])
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.code() {
        Some(0) => {}
        Some(1) => return Ok(()), // a privileged device: the defaults stay
        _ => return Err(describe(&format!("ublk udev-owner {name}"), &out)),
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<u32> = text
        .split_whitespace()
        .map(|w| w.parse().map_err(|e| format!("{text:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let [uid, gid] = ids[..] else {
        return Err(format!(
            "`ublk udev-owner {name}` printed {text:?}, not `UID GID`"
        ));
    };
    let path = Path::new("/dev").join(name);
    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())
}

fn owner_of(path: &str) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .uid()
}

fn process_uid(pid: u64) -> u32 {
    let status = process_status(pid);
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1)) // the effective uid
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Uid in /proc/{pid}/status:\n{status}"))
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn unprivileged_user_owns_uses_and_deletes_its_device() {
    let _session = Session::start("unprivileged-owner");
    let _control = OpenControl::new();
    let udev = FakeUdev::start();

    let out = ublk_as(OWNER, &["add", "ram", "--size", "16M", "--unprivileged"]);
    let dev = parse_json(&out, "ublk add ram --size 16M --unprivileged");
    let id = dev_id(&dev);
    let path = dev_path(&dev).to_string();
    let char_path = format!("/dev/ublkc{id}");
    let flags = dev["flags"].as_array().expect("flags array");
    assert!(
        flags.iter().any(|f| f.as_str() == Some("UNPRIVILEGED_DEV")),
        "UNPRIVILEGED_DEV not among the device's flags: {dev}"
    );
    assert_eq!(field_str(&dev, "buffer_mode"), "copy", "add output: {dev}");
    assert_eq!(owner_of(&path), OWNER, "owner of {path}");
    assert_eq!(owner_of(&char_path), OWNER, "owner of {char_path}");
    let pid = server_pid(&dev);
    assert_eq!(process_uid(pid), OWNER, "the server's uid");
    let udev_owner = ublk(&["udev-owner", &format!("ublkb{id}")]);
    assert_eq!(
        String::from_utf8_lossy(&udev_owner.stdout).trim(),
        format!("{OWNER} {OWNER}"),
        "`ublk udev-owner ublkb{id}`"
    );

    // The owner writes and verifies its device.
    let fio = as_user(
        OWNER,
        "fio",
        &[
            "--name=unprivileged",
            &format!("--filename={path}"),
            "--ioengine=io_uring",
            "--direct=1",
            "--invalidate=0",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--size=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--output-format=json",
        ],
    );
    assert!(
        fio.status.success(),
        "fio as uid {OWNER}: {}",
        describe("fio", &fio)
    );
    // fio prints notes (a user may not flush a block device's cache) before its report.
    let stdout = String::from_utf8_lossy(&fio.stdout);
    let report: Value = stdout
        .find('{')
        .and_then(|start| serde_json::from_str(&stdout[start..]).ok())
        .unwrap_or_else(|| panic!("fio printed no JSON report: {}", describe("fio", &fio)));
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error: {job}");
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(8 * MIB),
        "fio wrote: {job}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 8 * MIB,
        "fio verified (read back): {job}"
    );

    // Its status, over the control socket in the owner's XDG_RUNTIME_DIR.
    let status = ublk_as(OWNER, &["status", &id.to_string(), "--json"]);
    let status = parse_json(&status, "ublk status --json");
    assert_eq!(status["tree"]["kind"], "ram", "status: {status}");
    assert!(
        runtime_dir(OWNER)
            .join("ublk")
            .join(format!("ublk{id}.sock"))
            .exists(),
        "no control socket under the owner's XDG_RUNTIME_DIR"
    );

    // Another user may not delete or recover it.
    let err = ublk_fails_as(OTHER, &["del", &id.to_string()]);
    assert!(
        err.contains("permission denied"),
        "`ublk del {id}` by uid {OTHER}: {err}"
    );
    let err = ublk_fails_as(OTHER, &["recover", &id.to_string()]);
    assert!(
        err.contains("permission denied"),
        "`ublk recover {id}` by uid {OTHER}: {err}"
    );
    assert!(
        Path::new(&path).exists(),
        "{path} gone after uid {OTHER} tried"
    );
    assert!(
        !process_gone(pid),
        "server {pid} gone after uid {OTHER} tried"
    );

    // The owner deletes it: nodes and server go.
    ublk_as(OWNER, &["del", &id.to_string()]);
    assert!(!Path::new(&path).exists(), "{path} left after `ublk del`");
    assert!(
        !Path::new(&char_path).exists(),
        "{char_path} left after `ublk del`"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_gone(pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    assert!(
        process_gone(pid),
        "server {pid} still running after `ublk del`"
    );
    let problems = udev.stop();
    assert!(problems.is_empty(), "applying the udev rule: {problems:?}");
    assert_no_devices("after the owner deleted its device");
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn unprivileged_refusals_leave_nothing_behind() {
    let _session = Session::start("unprivileged-refusals");
    let _control = OpenControl::new();
    let udev = FakeUdev::start();

    let err = ublk_fails_as(
        OWNER,
        &[
            "add",
            "null",
            "--unprivileged",
            "--buffer-mode",
            "zero-copy",
        ],
    );
    assert!(
        err.contains("copy or registered"),
        "zero-copy unprivileged add: {err}"
    );
    let err = ublk_fails_as(
        OWNER,
        &[
            "add",
            "ram",
            "--size",
            "16M",
            "--unprivileged",
            "--recovery",
        ],
    );
    assert!(
        err.contains("--recovery"),
        "--recovery with --unprivileged: {err}"
    );
    // Without --unprivileged a user may not add a device at all.
    let err = ublk_fails_as(OWNER, &["add", "ram", "--size", "16M"]);
    assert!(
        err.contains("ADD_DEV") && err.contains("--unprivileged"),
        "privileged add by uid {OWNER}: {err}"
    );
    assert_no_devices("after the refused adds");
    let problems = udev.stop();
    assert!(problems.is_empty(), "applying the udev rule: {problems:?}");

    // No udev rule: the server gives up on /dev/ublkcN, says why, and root cleans up.
    let err = ublk_fails_as(
        OWNER,
        &[
            "add",
            "ram",
            "--size",
            "16M",
            "--unprivileged",
            "--udev-timeout",
            "1",
        ],
    );
    assert!(
        err.contains("99-ublk.rules") && err.contains("ublk del"),
        "add without the udev rule: {err}"
    );
    assert!(
        !device_nodes().is_empty(),
        "the device the owner could not delete is gone already"
    );
    ublk(&["del", "--all"]);
    assert_no_devices("after root's `ublk del --all`");
}
