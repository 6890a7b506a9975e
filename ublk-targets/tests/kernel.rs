//! Kernel integration tests for the `ublk` command-line tool.
//!
//! These tests drive the real `ublk` binary against the kernel's ublk driver and then
//! use the resulting `/dev/ublkbN` block devices the way an ordinary user would:
//!
//! * `fio_*`: an fio matrix (randwrite / randrw × block sizes × iodepth 1 / 128) on RAM
//!   devices with data verification, and on null devices checking only the byte counts;
//!   one test per (target, queue count).
//! * `ext4_*`: mkfs, write files, fsck, remount, and compare checksums.
//! * `discard_*`: discard and write-zeroes (whole device and a partial range) read back
//!   as zeroes while the data around them stays intact.
//! * `lifecycle_*`, `duplicate_id_*`, `ram_backing_*`, `features_*`: add / list / del,
//!   id reuse, a RAM device's backing file, and `ublk features`.
//! * `sig*_*`: the server stops cleanly and removes its device on SIGTERM and SIGINT,
//!   including while fio is hammering it.
//! * `bad_arguments_*`: invalid arguments fail with a useful error and leave nothing behind.
//! * `stack_*`: stacked targets. fio verification on stripes of files in every buffer mode,
//!   chunk size and queue count; the stripe's layout; ext4 on a stripe of two brd disks; a
//!   three-level stack; `faulty` nodes failing and delaying exactly the ops their rule
//!   matches, at the root and deeper; `ublk status` and `ublk list` showing the tree; and
//!   bad expressions refused with one error line.
//! * `mirror_*` (in `kernel/mirror.rs`): the RAID-1 node. fio verification on new mirrors
//!   in every buffer mode and over stripes, the legs compared after; a leg failing under fio
//!   (`ublk fail`, a `faulty` node, a device-mapper `error` table); `ublk replace` and the
//!   rebuild under fio; the resync after `kill -9` of the server; no stale reads during a
//!   rebuild; flushes reaching every leg; a leg of another mirror refused unless
//!   `--force-new`.
//! * `unprivileged_*` (in `kernel/unprivileged.rs`): a user without root adds, uses
//!   (fio `--verify`) and deletes its own device, whose nodes the test's stand-in for udev
//!   gives it by running `ublk udev-owner`; another user cannot delete or recover it;
//!   zero-copy, `--recovery` and a privileged add are refused; without udev the add gives
//!   up, naming the rule, and root removes what it left.
//! * `rbd_*` (in `kernel/rbd.rs`, with the cargo feature `rbd`): the Ceph RBD target on a
//!   real one-monitor, three-OSD cluster: fio verification, ext4, discard, an OSD killed
//!   under fio, a snapshot mapped read-only, refusals naming what failed, and a mirror of an
//!   image and a file.
//! * `compress_*` (in `kernel/compress.rs`): the compressing node. fio verification with
//!   compressible and random data, lz4 and zstd, and the ratio in `ublk status`; ext4 with
//!   fsck and a remount; discard punching the image file; `kill -9` during fio with fsyncs,
//!   then `ublk check` and the fsync'ed data read back; compression over a mirror, reopened
//!   and degraded.
//! * `stats_*` (in `kernel/stats.rs`): `ublk stats` counting what fio did, per node and per
//!   queue, every request timed once, and its Prometheus text well-formed.
//! * `need_get_data_*` (in `kernel/memory.rs`): `--need-get-data` under fio verification,
//!   and the server's memory with and without it, idle and under fio.
//! * `recovery_*` (in `kernel/recovery.rs`): `ublk add --recovery` and `ublk recover`.
//!   `kill -9` of the server under fio `--verify` on ram, file, stripe and mirror devices,
//!   recovered with nothing lost (reissue), failing fast and intact after (fail-io); a
//!   compressing device keeps what was flushed; a mirror recovered after `ublk replace`;
//!   `recover` refused where it does not apply; `del` cleaning up after `kill -9`; `ublk
//!   upgrade` replacing a running server twice under fio `--verify` (QUIESCE_DEV).
//! * `lifecycle::*` (in `kernel/lifecycle.rs`): 50 add/fio/del cycles beside a CPU hog and
//!   50 cycles of a server inside the test process (descriptors, threads, RSS), `ublk add`
//!   killed at every point of its start, exits with ext4 mounted or the device held open,
//!   `del --safe`, and `ublk resize` under a mounted ext4 with `resize2fs`.
//!
//! They need root and the ublk driver, so every test is `#[ignore]`d: a plain host
//! `cargo test` lists them as ignored. Run them inside the test VM with
//!
//! ```text
//! cargo xtask test              # the whole suite
//! cargo xtask test -- ext4      # only tests whose name contains "ext4"
//! ```
//!
//! which runs this binary as `kernel-tests --ignored --test-threads=1` with `UBLK_BIN`
//! pointing at the `ublk` binary and fio, e2fsprogs, util-linux, dmsetup and busybox on
//! `PATH`, and kernel modules such as brd, loop and dm-mod at `/lib/modules/NAME.ko`.
//! The VM emulates its CPU in software, so data sizes are kept small.
//!
//! Each test starts from and ends with a clean slate (`ublk del --all`), so one failing
//! test does not poison the next one.

use serde_json::Value;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The driver's control device; its absence means we are not inside the test VM.
const CONTROL_DEVICE: &str = "/dev/ublk-control";

/// Time limit for a single command. Generous, because the VM emulates the CPU in software.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Time limit for a single fio run of the matrix.
const FIO_TIMEOUT: Duration = Duration::from_secs(300);

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------
// fio
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_1_queue() {
    fio_matrix("ram", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_2_queues() {
    fio_matrix("ram", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_null_1_queue() {
    fio_matrix("null", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_buffered_1_queue() {
    fio_matrix("file", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_direct_2_queues() {
    fio_matrix("file --direct", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_registered_buffers() {
    fio_matrix("file --buffer-mode registered", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_kernel_zero_copy_2_queues() {
    fio_matrix("file --zero-copy --direct", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_with_sqpoll() {
    fio_matrix("file --sqpoll --buffer-mode registered", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_null_kernel_zero_copy() {
    fio_matrix("null --zero-copy", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_with_sqpoll() {
    fio_matrix("ram --sqpoll", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_null_2_queues() {
    fio_matrix("null", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_null_batch() {
    fio_matrix("null --batch", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_batch_2_queues() {
    fio_matrix("ram --batch", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_user_copy_with_sqpoll() {
    fio_matrix("ram --buffer-mode user-copy --sqpoll", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_manual_zero_copy_with_sqpoll() {
    fio_matrix("file --buffer-mode manual-zero-copy --direct --sqpoll", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_null_batch_zero_copy() {
    fio_matrix("null --batch --zero-copy", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_batch_zero_copy_2_queues() {
    fio_matrix("file --batch --zero-copy --direct", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_batch_manual_zero_copy() {
    fio_matrix("file --batch --buffer-mode manual-zero-copy --direct", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_batch_user_copy() {
    fio_matrix("ram --batch --buffer-mode user-copy", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_user_copy_2_queues() {
    fio_matrix("ram --buffer-mode user-copy", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_user_copy_staged() {
    fio_matrix("file --buffer-mode user-copy --direct", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_null_user_copy() {
    fio_matrix("null --buffer-mode user-copy", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_manual_zero_copy_2_queues() {
    fio_matrix("file --buffer-mode manual-zero-copy --direct", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_null_manual_zero_copy() {
    fio_matrix("null --buffer-mode manual-zero-copy", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_defer_taskrun() {
    fio_matrix("ram --defer-taskrun", 2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_ram_two_threads_per_queue() {
    fio_matrix("ram --threads-per-queue 2", 1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn fio_verify_file_zero_copy_three_threads_per_queue() {
    fio_matrix("file --zero-copy --direct --threads-per-queue 3", 2);
}

/// The kernel flag each buffer mode needs, as `ublk list` names it.
const MODE_FLAGS: [(&str, &str); 3] = [
    ("zero-copy", "AUTO_BUF_REG"),
    ("manual-zero-copy", "SUPPORT_ZERO_COPY"),
    ("user-copy", "USER_COPY"),
];

/// Checks that the device `add` reported runs in the buffer mode its options asked for,
/// with the kernel flag that mode needs.
fn assert_mode_in_effect<S: AsRef<str>>(args: &[S], dev: &Value) {
    assert_buffer_mode(dev, asked_mode(args).unwrap_or("copy"));
}

/// The buffer mode `add` options ask for, if any.
fn asked_mode<S: AsRef<str>>(args: &[S]) -> Option<&str> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    args.iter()
        .position(|a| *a == "--buffer-mode")
        .map(|i| args[i + 1])
        .or_else(|| args.contains(&"--zero-copy").then_some("zero-copy"))
}

/// Checks that the device `add` reported runs in buffer mode `asked`, with the kernel flag
/// that mode needs.
#[track_caller]
fn assert_buffer_mode(dev: &Value, asked: &str) {
    assert_eq!(field_str(dev, "buffer_mode"), asked, "add output: {dev}");
    if let Some((_, flag)) = MODE_FLAGS.iter().find(|(m, _)| *m == asked) {
        let flags = dev["flags"].as_array().expect("flags array");
        assert!(
            flags.iter().any(|f| f.as_str() == Some(flag)),
            "a {asked} device without the kernel flag {flag}: {dev}"
        );
    }
}

/// One fio configuration of the matrix.
struct FioCase {
    rw: &'static str,
    /// Block-size options, e.g. `["--bs=4k"]`.
    blocks: &'static [&'static str],
    iodepth: u32,
    /// Bytes to transfer.
    size: u64,
}

/// The block sizes of the matrix: fixed 4k, 64k and 1M, and a mix of 512 bytes to 1 MiB.
const BLOCK_SIZES: [&[&str]; 4] = [
    &["--bs=4k"],
    &["--bs=64k"],
    &["--bs=1M"],
    &["--bsrange=512-1M", "--blockalign=512"],
];

impl FioCase {
    fn all() -> Vec<FioCase> {
        let mut cases = Vec::new();
        for rw in ["randwrite", "randrw"] {
            for blocks in BLOCK_SIZES {
                for iodepth in [1, 128] {
                    // Small 4k synchronous runs are the slowest, so they get less.
                    let size = if blocks == ["--bs=4k"] && iodepth == 1 {
                        8 * MIB
                    } else {
                        32 * MIB
                    };
                    cases.push(FioCase {
                        rw,
                        blocks,
                        iodepth,
                        size,
                    });
                }
            }
        }
        cases
    }

    fn label(&self) -> String {
        format!(
            "rw={} {} iodepth={} size={}M",
            self.rw,
            self.blocks.join(" "),
            self.iodepth,
            self.size / MIB
        )
    }

    fn args(&self, device: &str, verify: bool) -> Vec<String> {
        let mut args = vec![
            format!("--name=ublk-{}", self.rw),
            format!("--filename={device}"),
            "--ioengine=io_uring".to_string(),
            "--direct=1".to_string(),
            format!("--rw={}", self.rw),
            format!("--iodepth={}", self.iodepth),
            format!("--size={}", self.size),
            "--output-format=json".to_string(),
        ];
        if self.rw == "randrw" {
            args.push("--rwmixread=50".to_string());
        }
        args.extend(self.blocks.iter().map(|s| s.to_string()));
        if verify {
            // fio remembers every block it writes and, after the workload, reads them all
            // back and checks their checksums (for randrw too: only written blocks count).
            args.extend(["--verify=crc32c", "--verify_fatal=1", "--do_verify=1"].map(String::from));
        }
        args
    }
}

/// Runs the whole fio matrix against one device of `target` with `queues` queues.
///
/// RAM devices keep data, so fio verifies it. Null devices discard writes and return
/// arbitrary data, so there fio only has to finish cleanly and move the expected bytes.
///
/// `target` may carry options (`"file --direct"`); a file target gets a backing file in the
/// test's scratch directory.
fn fio_matrix(target_args: &str, queues: u32) {
    let mut words: Vec<String> = target_args.split_whitespace().map(String::from).collect();
    let target = words[0].clone();
    let session = Session::start(&format!("fio-{}-{queues}", words.join("-")));
    if target == "file" {
        words.push("--path".into());
        words.push(session.scratch.join("backing.img").display().to_string());
    }
    words.extend(["--size", "64M", "--queues"].map(String::from));
    words.push(queues.to_string());
    let dev = add(&words.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        field_u64(&dev, "queues"),
        u64::from(queues),
        "add output: {dev}"
    );
    assert_mode_in_effect(&words, &dev);
    assert_eq!(
        dev["defer_taskrun"].as_bool(),
        Some(words.iter().any(|w| w == "--defer-taskrun")),
        "add output: {dev}"
    );
    if let Some(i) = words.iter().position(|w| w == "--threads-per-queue") {
        let n: u64 = words[i + 1].parse().expect("a thread count");
        assert_eq!(field_u64(&dev, "threads_per_queue"), n, "add output: {dev}");
        let flags = dev["flags"].as_array().expect("flags array");
        assert_eq!(
            flags.iter().any(|f| f.as_str() == Some("PER_IO_DAEMON")),
            n > 1,
            "PER_IO_DAEMON should be set exactly when threads per queue > 1: {dev}"
        );
        let prefix = format!("ublk{}-q", dev_id(&dev));
        let serving = fs::read_dir(format!("/proc/{}/task", server_pid(&dev)))
            .expect("the server's threads")
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.starts_with(&prefix))
            .count() as u64;
        assert_eq!(
            serving,
            n * u64::from(queues),
            "queue threads of the server ({prefix}*)"
        );
    }
    let path = dev_path(&dev);
    let verify = target != "null";
    let what = format!("{target} device {path} with {queues} queue(s)");
    run_fio_cases(&FioCase::all(), path, verify, &what, &session.scratch);

    del(&dev);
}

/// Runs each fio case on the device at `path` (described by `what`), with data
/// verification when `verify`; checks the bytes fio moved.
fn run_fio_cases(cases: &[FioCase], path: &str, verify: bool, what: &str, scratch: &Path) {
    let mut passed = Vec::new();
    for case in cases {
        let context = format!(
            "fio {} on {what} (combinations that passed before: {passed:?})",
            case.label()
        );
        let started = Instant::now();
        let args = case.args(path, verify);
        let (report, output) = run_fio(&args, scratch, &context);
        let job = &report["jobs"][0];
        let written = field_u64(&job["write"], "io_bytes");
        let read = field_u64(&job["read"], "io_bytes");
        if !fio_moved_expected_bytes(case, verify, written, read) {
            panic!(
                "{context}: unexpected byte counts for --size={}: wrote {written}, read {read}\n{}",
                case.size,
                describe(&command_line("fio", &args), &output)
            );
        }
        println!(
            "ok: {} ({:.1} s)",
            case.label(),
            started.elapsed().as_secs_f64()
        );
        passed.push(case.label());
    }
}

/// Whether fio wrote and read what `case` should have made it move.
fn fio_moved_expected_bytes(case: &FioCase, verify: bool, written: u64, read: u64) -> bool {
    let size = case.size;
    match (verify, case.rw) {
        // Every block is written once, then the verify phase reads them all back.
        (true, "randwrite") => written == size && read == size,
        // The mixed workload's own reads, plus the verify phase's reads of what was written.
        (true, _) => written > 0 && read >= written,
        (false, "randwrite") => written == size && read == 0,
        (false, _) => written > 0 && read > 0 && written + read == size,
    }
}

/// Runs fio with `args` in `dir` and returns its JSON report; panics with fio's output
/// if it fails, times out, reports a job error or prints no JSON.
fn run_fio(args: &[String], dir: &Path, context: &str) -> (Value, Output) {
    FioRun::start(args, dir).finish(context)
}

/// fio running in the background, for tests that act on the device meanwhile.
struct FioRun {
    cmdline: String,
    fio: Spawned,
}

impl FioRun {
    /// Starts fio with `args` in `dir`.
    fn start(args: &[String], dir: &Path) -> FioRun {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        FioRun {
            cmdline: command_line("fio", &args),
            fio: Spawned::new("fio", &args, Some(dir)),
        }
    }

    fn is_running(&mut self) -> bool {
        self.fio.is_running()
    }

    /// Kills fio and describes what it printed, for a panic message.
    fn kill(&mut self) -> String {
        describe(&self.cmdline, &self.fio.kill())
    }

    /// Waits for fio and returns its JSON report; panics with fio's output if it fails,
    /// times out, reports a job error or prints no JSON.
    fn finish(mut self, context: &str) -> (Value, Output) {
        let cmdline = self.cmdline.clone();
        let Some(output) = self.fio.wait_timeout(FIO_TIMEOUT) else {
            panic!(
                "{context}: still running after {FIO_TIMEOUT:?}, killed\n{}",
                self.kill()
            );
        };
        let fail = |why: &str| -> ! { panic!("{context}: {why}\n{}", describe(&cmdline, &output)) };
        if !output.status.success() {
            fail("fio failed");
        }
        // fio may print notes before the report; the report is the outermost JSON object.
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report: Value = match stdout
            .find('{')
            .map(|start| serde_json::from_str(&stdout[start..]))
        {
            Some(Ok(report)) => report,
            Some(Err(e)) => fail(&format!("fio's JSON report does not parse: {e}")),
            None => fail("fio printed no JSON report"),
        };
        match report["jobs"][0]["error"].as_i64() {
            Some(0) => {}
            Some(error) => fail(&format!("fio job reports error {error}")),
            None => fail("fio's report has no jobs[0].error"),
        }
        (report, output)
    }
}

// ---------------------------------------------------------------------------------------
// ext4
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn ext4_survives_fsck_and_remount() {
    ext4_round_trip("ram");
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn ext4_on_a_file_target_survives_fsck_and_remount() {
    ext4_round_trip("file");
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn ext4_on_ram_with_user_copy_survives_fsck_and_remount() {
    ext4_round_trip("ram --buffer-mode user-copy");
}

/// mkfs, files, umount, fsck, remount, same checksums, on a fresh device of `target` (the
/// target's name, then any options).
fn ext4_round_trip(target: &str) {
    let session = Session::start(&format!("ext4-{}", target.replace([' ', '-'], "")));
    let backing = session.scratch.join("backing.img").display().to_string();
    let mut args: Vec<&str> = target.split_whitespace().collect();
    args.extend(["--size", "256M"]);
    if args[0] == "file" {
        args.extend(["--path", &backing]);
    }
    let dev = add(&args);
    ext4_files_survive(dev_path(&dev), &session.scratch);
    del(&dev);
}

/// mkfs on the device at `path`, files, umount, fsck, remount, same checksums; mounts
/// under `scratch`.
fn ext4_files_survive(path: &str, scratch: &Path) {
    run("mkfs.ext4", &["-q", "-F", path]);

    let mountpoint = scratch.join("mnt");
    fs::create_dir(&mountpoint).expect("create the mount point");
    let mnt = Mounted::new(path, &mountpoint);

    write_file(
        &mountpoint.join("random-1m.bin"),
        &random_bytes(MIB as usize),
    );
    write_file(
        &mountpoint.join("random-8m.bin"),
        &random_bytes(8 * MIB as usize),
    );
    write_file(
        &mountpoint.join("notes.txt"),
        b"ublk-rs ext4 test\nthis line should survive fsck and a remount\n",
    );
    let small = mountpoint.join("small");
    fs::create_dir(&small).expect("create the directory of small files");
    for i in 0..300 {
        // Sizes from 0 bytes to a few KiB, so some files share blocks and some don't.
        let line = format!("small file {i}\n");
        write_file(
            &small.join(format!("file-{i:03}")),
            line.repeat(i % 97).as_bytes(),
        );
    }
    run("sync", &[]);

    let files = files_under(&mountpoint);
    assert_eq!(files.len(), 303, "files on the new filesystem: {files:?}");
    let sums_before = sha256sums(&mountpoint, &files);

    mnt.unmount();
    drop_caches();
    run("e2fsck", &["-fn", path]);

    let mnt = Mounted::new(path, &mountpoint);
    assert_eq!(
        files_under(&mountpoint),
        files,
        "the remounted filesystem holds different files"
    );
    let sums_after = sha256sums(&mountpoint, &files);
    assert!(
        sums_before == sums_after,
        "checksums changed across umount + fsck + mount:\nbefore:\n{sums_before}\nafter:\n{sums_after}"
    );
    mnt.unmount();
}

/// Relative paths of all regular files under `root` (except `lost+found`), sorted.
fn files_under(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, files: &mut Vec<PathBuf>) {
        let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("read a directory entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "lost+found") {
                    walk(root, &path, files);
                }
            } else {
                let relative = path.strip_prefix(root).expect("walked path is under root");
                files.push(relative.to_path_buf());
            }
        }
    }
    let mut files = Vec::new();
    walk(root, root, &mut files);
    files.sort();
    files
}

/// `sha256sum` output for `files`, relative to `dir`.
fn sha256sums(dir: &Path, files: &[PathBuf]) -> String {
    let args: Vec<&str> = files
        .iter()
        .map(|f| f.to_str().expect("test file names are UTF-8"))
        .collect();
    let mut sha = Spawned::new("sha256sum", &args, Some(dir));
    let output = sha
        .wait_timeout(COMMAND_TIMEOUT)
        .unwrap_or_else(|| panic!("sha256sum still running after {COMMAND_TIMEOUT:?}"));
    assert!(
        output.status.success(),
        "{}",
        describe("sha256sum <files>", &output)
    );
    let sums = String::from_utf8(output.stdout).expect("sha256sum prints UTF-8");
    assert_eq!(
        sums.lines().count(),
        files.len(),
        "sha256sum output:\n{sums}"
    );
    sums
}

/// A mounted ext4 filesystem, unmounted when dropped (e.g. when the test panics).
struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn new(device: &str, dir: &Path) -> Mounted {
        let dir_str = dir.to_str().expect("scratch paths are UTF-8");
        run("mount", &["-t", "ext4", device, dir_str]);
        Mounted {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    fn unmount(mut self) {
        let dir = self.dir.to_str().expect("scratch paths are UTF-8");
        run("umount", &[dir]);
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Still mounted only if the test failed: don't panic while unwinding.
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
    }
}

// ---------------------------------------------------------------------------------------
// discard and write-zeroes
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn discard_and_write_zeroes_read_back_as_zeroes() {
    let _session = Session::start("discard");
    let size = 64 * MIB as usize;
    let dev = add(&["ram", "--size", "64M"]);
    let path = dev_path(&dev);
    let zeroes = vec![0u8; size];

    // Every read below uses O_DIRECT, so the page cache cannot hide the device's answer.
    let data = pattern(size, 1);
    write_direct(path, 0, &data);
    assert_same(
        &read_direct(path, 0, size),
        &data,
        "data written to the device",
    );

    run("blkdiscard", &[path]);
    assert_same(
        &read_direct(path, 0, size),
        &zeroes,
        "after discarding the device",
    );

    write_direct(path, 0, &pattern(size, 2));
    run("blkdiscard", &["-z", path]);
    assert_same(
        &read_direct(path, 0, size),
        &zeroes,
        "after zeroing the device",
    );

    // Partial ranges: only the range is cleared, the data around it stays.
    let mut expected = pattern(size, 3);
    write_direct(path, 0, &expected);
    clear_range(
        path,
        &mut expected,
        4096,
        65536,
        Clear::Discard,
        "64 KiB at offset 4 KiB",
    );
    // Zeroing is exact to the sector: try a range that is sector- but not page-aligned.
    clear_range(
        path,
        &mut expected,
        MIB as usize + 3 * 512,
        5 * 512,
        Clear::Zero,
        "2.5 KiB at offset 1 MiB + 1.5 KiB",
    );

    del(&dev);
}

/// How [`clear_range`] clears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clear {
    /// `blkdiscard -o OFFSET -l LEN`.
    Discard,
    /// `blkdiscard -z -o OFFSET -l LEN` (write-zeroes).
    Zero,
}

/// Clears `len` bytes at `offset` of the device at `path` with `blkdiscard`, clears the same
/// range of `expected` (the device's whole content as it should be), and asserts the device
/// reads back as `expected`: only the range is cleared, the data around it stays.
#[track_caller]
fn clear_range(path: &str, expected: &mut [u8], offset: usize, len: usize, how: Clear, what: &str) {
    let (offset_s, len_s) = (offset.to_string(), len.to_string());
    let mut args = vec!["-o", &offset_s, "-l", &len_s, path];
    if how == Clear::Zero {
        args.insert(0, "-z");
    }
    run("blkdiscard", &args);
    expected[offset..offset + len].fill(0);
    assert_same(
        &read_direct(path, 0, expected.len()),
        expected,
        &format!("after {how:?} of {what}"),
    );
}

/// `len` bytes of test data, different for each `seed` and in every 512-byte sector:
/// a random 1 MiB block, repeated, with each sector stamped with the seed and its offset.
/// No sector is all zeroes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let block = random_bytes(len.min(MIB as usize));
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let n = block.len().min(len - data.len());
        data.extend_from_slice(&block[..n]);
    }
    for (i, sector) in data.chunks_mut(512).enumerate() {
        let stamp = u64::from(seed) << 56 | (i as u64 * 512);
        sector[..8].copy_from_slice(&stamp.to_le_bytes());
    }
    data
}

/// Asserts that the bytes read from a device equal `expected`; on a mismatch, reports
/// where it starts and how many sectors differ rather than dumping megabytes.
#[track_caller]
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if actual == expected {
        return;
    }
    let bad: Vec<usize> = actual
        .chunks(512)
        .zip(expected.chunks(512))
        .enumerate()
        .filter(|(_, (a, e))| a != e)
        .map(|(i, _)| i)
        .collect();
    let first = bad[0] * 512;
    let offset = first
        + (first..)
            .zip(&actual[first..])
            .position(|(i, a)| *a != expected[i])
            .expect("a differing sector has a differing byte");
    let end = (offset + 16).min(actual.len());
    panic!(
        "{what}: {} of {} sectors differ, the first at byte offset {offset}\n\
         expected {:02x?}\nactual   {:02x?}",
        bad.len(),
        actual.len() / 512,
        &expected[offset..end],
        &actual[offset..end],
    );
}

// ---------------------------------------------------------------------------------------
// lifecycle
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn file_target_discard_frees_space_in_the_backing_file() {
    use std::os::unix::fs::MetadataExt;
    let session = Session::start("file-discard");
    let backing = session.scratch.join("backing.img");
    let backing_str = backing.display().to_string();
    let dev = add(&["file", "--path", &backing_str, "--size", "64M"]);
    let path = dev_path(&dev);
    let allocated = || fs::metadata(&backing).expect("backing file").blocks() * 512;
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={path}"),
            "bs=1M",
            "count=32",
            "oflag=direct",
        ],
    );
    run("sync", &[]);
    let before = allocated();
    assert!(
        before >= 32 * MIB,
        "after writing 32 MiB only {before} bytes are allocated"
    );
    run("blkdiscard", &[path]);
    let after = allocated();
    assert!(
        after < MIB,
        "blkdiscard left {after} of {before} bytes allocated in {backing_str}"
    );
    let zeroes = read_direct(path, 0, 32 * MIB as usize);
    assert!(
        zeroes.iter().all(|b| *b == 0),
        "discarded range does not read as zeroes"
    );
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_add_list_del_and_reuse_ids() {
    let _session = Session::start("lifecycle");

    // (add arguments, target, size, queues, depth)
    let specs: [(&[&str], &str, u64, u64, u64); 4] = [
        (&["null"], "null", GIB, 1, 128), // all defaults
        (&["ram", "--size", "16M"], "ram", 16 * MIB, 1, 128),
        (
            &["null", "--size", "1536K", "--depth", "64"],
            "null",
            1536 * KIB,
            1,
            64,
        ),
        (
            &["ram", "--size", "32M", "--queues", "2"],
            "ram",
            32 * MIB,
            2,
            128,
        ),
    ];
    let mut devices = Vec::new();
    for (args, target, size, queues, depth) in specs {
        let dev = add(args);
        assert_eq!(field_str(&dev, "target"), target, "add {args:?}: {dev}");
        assert_eq!(field_u64(&dev, "size"), size, "add {args:?}: {dev}");
        assert_eq!(field_u64(&dev, "queues"), queues, "add {args:?}: {dev}");
        assert_eq!(field_u64(&dev, "depth"), depth, "add {args:?}: {dev}");
        assert!(
            dev["flags"].is_array(),
            "add {args:?}: `flags` is not an array: {dev}"
        );
        devices.push(dev);
    }
    let ids: BTreeSet<u64> = devices.iter().map(dev_id).collect();
    assert_eq!(ids.len(), 4, "dev ids are not distinct: {}", json(&devices));

    let listed = list();
    assert_eq!(listed.len(), 4, "ublk list --json: {}", json(&listed));
    for dev in &devices {
        let entry = listed_entry(&listed, dev_id(dev)).unwrap_or_else(|| {
            panic!(
                "device {dev} missing from ublk list --json: {}",
                json(&listed)
            )
        });
        for key in ["path", "target", "size", "queues", "depth", "pid"] {
            assert_eq!(
                entry[key], dev[key],
                "`{key}` of {entry} vs add output {dev}"
            );
        }
        assert_eq!(field_str(entry, "state"), "LIVE", "list entry {entry}");
    }
    let table = String::from_utf8_lossy(&ublk(&["list"]).stdout).into_owned();
    for dev in &devices {
        assert!(
            table.contains(dev_path(dev)),
            "`ublk list` does not show {}:\n{table}",
            dev_path(dev)
        );
    }

    for (i, dev) in devices.iter().enumerate() {
        del(dev);
        let remaining: Vec<u64> = list().iter().map(dev_id).collect();
        let expected: Vec<u64> = devices[i + 1..].iter().map(dev_id).collect();
        assert_eq!(
            remaining.iter().collect::<BTreeSet<_>>(),
            expected.iter().collect::<BTreeSet<_>>(),
            "devices listed after deleting {}",
            dev_id(dev)
        );
    }
    assert_no_devices("after deleting every device by id");

    // Ids are reusable once their device is gone.
    let freed = dev_id(&devices[1]).to_string();
    let again = add(&["ram", "--size", "16M", "--id", &freed]);
    assert_eq!(
        dev_id(&again).to_string(),
        freed,
        "add --id {freed}: {again}"
    );

    let other = add(&["null", "--size", "16M"]);
    ublk(&["del", "--all"]);
    assert_no_devices("after `ublk del --all`");
    for dev in [&again, &other] {
        assert!(
            !Path::new(dev_path(dev)).exists(),
            "{} still exists after `ublk del --all`",
            dev_path(dev)
        );
    }
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn duplicate_id_is_rejected_and_leaves_the_first_device_intact() {
    let _session = Session::start("duplicate-id");
    let first = add(&["ram", "--size", "16M", "--id", "7"]);
    assert_eq!(dev_id(&first), 7, "add --id 7: {first}");

    let out = ublk_unchecked(&["add", "null", "--size", "16M", "--id", "7"]);
    let problems = rejection_problems(&out, &[&["7"], &["in use", "exists", "busy"]]);
    assert!(
        problems.is_empty(),
        "second `add --id 7`: {}\n{}",
        problems.join("; "),
        describe("ublk add null --size 16M --id 7", &out)
    );

    // The first device is still listed, served by the same process, and does I/O.
    let listed = list();
    assert_eq!(listed.len(), 1, "ublk list --json: {}", json(&listed));
    let entry = &listed[0];
    assert_eq!(dev_id(entry), 7, "list entry {entry}");
    assert_eq!(entry["pid"], first["pid"], "list entry {entry} vs {first}");
    assert_eq!(field_str(entry, "state"), "LIVE", "list entry {entry}");
    let data = pattern(64 * KIB as usize, 7);
    write_direct(dev_path(&first), 0, &data);
    assert_same(
        &read_direct(dev_path(&first), 0, data.len()),
        &data,
        "I/O on the first device after the rejected duplicate",
    );

    del(&first);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn ram_backing_file_outlives_the_server() {
    let _session = Session::start("backing");
    let backing = Path::new("/dev/shm").join("ublk-kernel-tests-backing");
    let backing_str = backing.to_str().expect("UTF-8 path");
    let _ = fs::remove_file(&backing);
    let size = 16 * MIB as usize;

    let dev = add(&["ram", "--size", "16M", "--backing", backing_str]);
    let data = pattern(size, 9);
    write_direct(dev_path(&dev), 0, &data);
    del(&dev);
    let file = fs::read(&backing).unwrap_or_else(|e| panic!("read {backing_str}: {e}"));
    assert_same(&file, &data, "the backing file after `ublk del`");

    // A new server on the same file serves the same data.
    let dev = add(&["ram", "--size", "16M", "--backing", backing_str]);
    assert_same(
        &read_direct(dev_path(&dev), 0, size),
        &data,
        "a new device on the old backing file",
    );
    del(&dev);
    let _ = fs::remove_file(&backing);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn features_lists_kernel_flags() {
    let _session = Session::start("features");
    let reply = parse_json(&ublk(&["features", "--json"]), "ublk features --json");
    let names: Vec<&str> = reply
        .as_array()
        .unwrap_or_else(|| panic!("`ublk features --json` is not an array: {reply}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("feature {v} is not a string"))
        })
        .collect();
    assert!(!names.is_empty(), "the kernel reports no ublk features");

    let text = ublk(&["features"]);
    let text = String::from_utf8_lossy(&text.stdout);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines.iter().collect::<BTreeSet<_>>(),
        names.iter().collect::<BTreeSet<_>>(),
        "`ublk features` and `ublk features --json` disagree"
    );
}

// ---------------------------------------------------------------------------------------
// signals
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn sigterm_during_fio_removes_the_device() {
    sigterm_during_fio(&[]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn sigterm_during_fio_removes_the_batch_device() {
    sigterm_during_fio(&["--batch"]);
}

/// SIGTERM to a RAM device's server (started with `extra` options) while fio runs on it:
/// the server exits, the device is gone, fio stops.
fn sigterm_during_fio(extra: &[&str]) {
    let session = Session::start(&format!("sigterm{}", extra.join("")));
    let dev = add(&[&["ram", "--size", "64M"], extra].concat());
    let batch = extra.contains(&"--batch");
    assert_eq!(dev["batch"], Value::Bool(batch), "add output: {dev}");
    let path = dev_path(&dev);
    let pid = server_pid(&dev);

    let fio_args = [
        "--name=sigterm",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randrw",
        "--rwmixread=50",
        "--bs=4k",
        "--iodepth=32",
        "--size=64M",
        "--time_based",
        "--runtime=30",
    ];
    let fio_cmdline = command_line("fio", &fio_args);
    // The kernel's partition scan has already done some I/O: count from here.
    let ios_before = completed_ios(path);
    let mut fio = Spawned::new("fio", &fio_args, Some(&session.scratch));

    // Wait until fio is clearly doing I/O (it starts slowly under emulation), then a bit more.
    let io_started = wait_until(Duration::from_secs(60), || {
        completed_ios(path) > ios_before + 256 || !fio.is_running()
    });
    assert!(
        io_started && fio.is_running(),
        "fio did not get going on {path}\n{}",
        describe(&fio_cmdline, &fio.kill())
    );
    sleep(Duration::from_secs(2));

    run("kill", &["-TERM", &pid.to_string()]);
    assert!(
        wait_until(Duration::from_secs(30), || process_gone(pid)),
        "server {pid} still running 30 s after SIGTERM: {}",
        process_status(pid)
    );
    assert_device_gone(&dev, "after SIGTERM to its server");

    // fio sees I/O errors now; it just has to stop.
    match fio.wait_timeout(Duration::from_secs(60)) {
        Some(output) => println!("fio after SIGTERM:\n{}", describe(&fio_cmdline, &output)),
        None => panic!(
            "fio still running 60 s after its device went away\n{}",
            describe(&fio_cmdline, &fio.kill())
        ),
    }
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn sigint_stops_an_idle_server() {
    let _session = Session::start("sigint");
    let dev = add(&["null", "--size", "16M"]);
    let pid = server_pid(&dev);

    run("kill", &["-INT", &pid.to_string()]);
    assert!(
        wait_until(Duration::from_secs(30), || process_gone(pid)),
        "server {pid} still running 30 s after SIGINT: {}",
        process_status(pid)
    );
    assert_device_gone(&dev, "after SIGINT to its server");
}

/// Whether process `pid` has exited. The server is not our child, so it may linger as a
/// zombie until its parent reaps it; that counts as exited.
fn process_gone(pid: u64) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => true,
    }
}

fn process_status(pid: u64) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| format!("(no /proc/{pid}/status: {e})"))
}

/// Reads plus writes completed by the block device at `path`, from sysfs.
fn completed_ios(path: &str) -> u64 {
    let name = Path::new(path)
        .file_name()
        .expect("device path has a file name");
    let stat_path = Path::new("/sys/class/block").join(name).join("stat");
    let Ok(stat) = fs::read_to_string(&stat_path) else {
        return 0;
    };
    let fields: Vec<u64> = stat
        .split_whitespace()
        .map(|f| f.parse().expect("sysfs stat fields are numbers"))
        .collect();
    // Field 0 counts completed reads, field 4 completed writes.
    fields[0] + fields[4]
}

#[track_caller]
/// Runs fio with `args` from `scratch` until it has done some I/O on `path`, kills `dev`'s
/// server with SIGKILL in the middle, waits for fio to end, and cleans the device up.
fn kill_server_during_fio(dev: &Value, path: &str, args: &[&str], scratch: &std::path::Path) {
    kill_during_fio(dev, path, args, scratch);
    del_killed(dev);
}

/// Runs fio with `args` from `scratch` until it has done some I/O on `path`, kills `dev`'s
/// server with SIGKILL in the middle and waits for fio to end; the device is left to
/// [`del_killed`] (after an unmount, say).
#[track_caller]
fn kill_during_fio(dev: &Value, path: &str, args: &[&str], scratch: &std::path::Path) {
    let ios_before = completed_ios(path);
    let mut fio = Spawned::new("fio", args, Some(scratch));
    let going = wait_until(Duration::from_secs(60), || {
        completed_ios(path) > ios_before + 512 || !fio.is_running()
    });
    assert!(
        going && fio.is_running(),
        "fio did not get going on {path}\n{}",
        describe(&command_line("fio", args), &fio.kill())
    );
    let pid = server_pid(dev);
    run("kill", &["-KILL", &pid.to_string()]);
    assert!(
        wait_until(Duration::from_secs(30), || process_gone(pid)),
        "server {pid} still running 30 s after SIGKILL: {}",
        process_status(pid)
    );
    if fio.wait_timeout(Duration::from_secs(60)).is_none() {
        panic!(
            "fio still running 60 s after its server was killed\n{}",
            describe(&command_line("fio", args), &fio.kill())
        );
    }
}

/// Deletes `dev`, whose server was killed, if it is still listed, and checks it is gone.
#[track_caller]
fn del_killed(dev: &Value) {
    if listed_entry(&list(), dev_id(dev)).is_some() {
        del(dev);
    }
    assert_device_gone(dev, "after kill -9 of its server and `ublk del`");
}

fn assert_device_gone(dev: &Value, when: &str) {
    let path = dev_path(dev);
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(path).exists()),
        "{path} still exists {when}"
    );
    let listed = list();
    assert!(
        listed_entry(&listed, dev_id(dev)).is_none(),
        "device {} still listed {when}: {}",
        dev_id(dev),
        json(&listed)
    );
}

// ---------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn bad_arguments_are_rejected_without_leaving_a_device() {
    let _session = Session::start("bad-arguments");
    let existing = add(&["ram", "--size", "16M"]);
    let in_use = dev_id(&existing).to_string();
    let cpus = std::thread::available_parallelism()
        .expect("count the CPUs")
        .get();
    let too_many_queues = (cpus * 4 + 1).to_string();
    let mentions_in_use: &[&[&str]] = &[&[&in_use], &["in use", "exists", "busy"]];
    // `--backing` is for the ram target only.
    let backing = Path::new("/dev/shm").join("ublk-kernel-tests-null-backing");
    let backing_str = backing.to_str().expect("UTF-8 path");

    // (arguments, words the error must mention: one of each group, case-insensitive)
    let cases: Vec<(Vec<&str>, &[&[&str]])> = vec![
        (vec!["add", "ram", "--size", "0"], &[&["size"]]),
        (vec!["add", "ram", "--size", "1000"], &[&["size"]]),
        (vec!["add", "null", "--size", "4097"], &[&["size"]]),
        (vec!["add", "ram", "--size", "12Q"], &[&["size"]]),
        (vec!["add", "null", "--queues", "0"], &[&["queues"]]),
        (
            vec!["add", "null", "--queues", &too_many_queues],
            &[&["queues"]],
        ),
        (vec!["add", "null", "--depth", "0"], &[&["depth"]]),
        (vec!["add", "null", "--depth", "4097"], &[&["depth"]]),
        (
            vec!["add", "null", "--size", "16M", "--id", &in_use],
            mentions_in_use,
        ),
        (vec!["add", "bogus"], &[&["target", "bogus"]]),
        (
            vec!["add", "null", "--backing", backing_str],
            &[&["backing"]],
        ),
        (vec!["del", "4000"], &[&["4000"]]),
        // The RAM target copies bytes itself: kernel zero-copy cannot serve it.
        (vec!["add", "ram", "--zero-copy"], &[&["zero-copy"]]),
        (
            vec!["add", "ram", "--buffer-mode", "manual-zero-copy"],
            &[&["manual-zero-copy"]],
        ),
        (
            vec!["add", "null", "--depth", "4", "--threads-per-queue", "5"],
            &[&["threads"]],
        ),
        (
            vec!["add", "null", "--threads-per-queue", "2", "--batch"],
            &[&["batch"]],
        ),
        (
            vec!["add", "null", "--buffer-mode", "bogus"],
            &[&["buffer mode"]],
        ),
        (vec!["add", "file", "--size", "16M"], &[&["--path"]]),
        (vec!["add", "ram", "--path", "/tmp/x"], &[&["--path"]]),
    ];

    let listed_before = list();
    let nodes_before = device_nodes();
    let mut failures = Vec::new();
    for (args, mentions) in cases {
        let out = ublk_unchecked(&args);
        let mut problems = rejection_problems(&out, mentions);

        let listed = list();
        if listed.len() != listed_before.len() {
            problems.push(format!("devices listed afterwards: {}", json(&listed)));
            // Remove the stray device so it doesn't spoil the remaining cases.
            for entry in &listed {
                if listed_entry(&listed_before, dev_id(entry)).is_none() {
                    ublk_unchecked(&["del", &dev_id(entry).to_string()]);
                }
            }
        }
        let nodes = device_nodes();
        if nodes != nodes_before {
            problems.push(format!("device nodes afterwards: {nodes:?}"));
        }

        if !problems.is_empty() {
            failures.push(format!(
                "{}\n{}",
                problems.join("\n"),
                describe(&command_line("ublk", &args), &out)
            ));
        }
    }
    let _ = fs::remove_file(&backing);
    assert!(
        failures.is_empty(),
        "{} bad command line(s) not handled properly:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );

    del(&existing);
}

/// What is wrong with how a command that should have failed did: it must exit non-zero
/// and print an error (`ublk: error: ...`, or clap's `error: ...`) mentioning one word
/// of each group in `mentions`.
fn rejection_problems(out: &Output, mentions: &[&[&str]]) -> Vec<String> {
    let mut problems = Vec::new();
    if out.status.success() {
        problems.push("succeeded but should have failed".to_string());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    if !stderr
        .lines()
        .any(|l| l.starts_with("ublk: error:") || l.starts_with("error:"))
    {
        problems.push("no `ublk: error:` (or clap `error:`) line on stderr".to_string());
    }
    for group in mentions {
        if !group
            .iter()
            .any(|word| stderr.contains(&word.to_lowercase()))
        {
            problems.push(format!("the error mentions none of {group:?}"));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------
// stacks
// ---------------------------------------------------------------------------------------

/// Size of each file child of the stripe tests: a multiple of every chunk they use.
const CHILD_SIZE: u64 = 16 * MIB;

/// `--bsrange=512-1M`: requests start and end anywhere on a sector, so on every stripe
/// they begin and end inside chunks, and the larger ones span several chunks and children.
const ANY_SIZE: &[&str] = &["--bsrange=512-1M", "--blockalign=512"];

/// The fio runs on each stripe: requests of any size synchronously and 128 deep, then a
/// mix of smaller ones, many of which straddle a single chunk border.
const STRIPE_FIO: [FioCase; 3] = [
    FioCase {
        rw: "randwrite",
        blocks: ANY_SIZE,
        iodepth: 1,
        size: 16 * MIB,
    },
    FioCase {
        rw: "randwrite",
        blocks: ANY_SIZE,
        iodepth: 128,
        size: 32 * MIB,
    },
    FioCase {
        rw: "randrw",
        blocks: &["--bsrange=512-64k", "--blockalign=512"],
        iodepth: 128,
        size: 16 * MIB,
    },
];

/// A stripe of files with fio verifying its data.
struct StripeFio {
    children: usize,
    /// The `chunk=` value; [`CHILD_SIZE`] is a multiple of it.
    chunk: &'static str,
    /// Bytes the last child has beyond [`CHILD_SIZE`], less than a chunk: the stripe
    /// rounds them away.
    extra: u64,
    /// Files in the long form with `direct=true` (`file:` opens a regular file buffered).
    direct: bool,
    /// `ublk add` options after the expression.
    options: &'static [&'static str],
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_stripe_of_2_files_copy_4k_chunks() {
    stripe_fio(&StripeFio {
        children: 2,
        chunk: "4K",
        extra: 0,
        direct: false,
        options: &["--buffer-mode", "copy"],
    });
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_stripe_of_3_files_registered_64k_chunks_2_queues() {
    stripe_fio(&StripeFio {
        children: 3,
        chunk: "64K",
        extra: 4 * KIB,
        direct: false,
        options: &["--buffer-mode", "registered", "--queues", "2"],
    });
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_stripe_of_4_direct_files_zero_copy_1m_chunks_2_queues() {
    stripe_fio(&StripeFio {
        children: 4,
        chunk: "1M",
        extra: 0,
        direct: true,
        options: &["--buffer-mode", "zero-copy", "--queues", "2"],
    });
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_stripe_of_2_direct_files_manual_zero_copy_64k_chunks() {
    stripe_fio(&StripeFio {
        children: 2,
        chunk: "64K",
        extra: 0,
        direct: true,
        options: &["--buffer-mode", "manual-zero-copy"],
    });
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_stripe_of_3_files_user_copy_4k_chunks_2_queues() {
    stripe_fio(&StripeFio {
        children: 3,
        chunk: "4K",
        extra: 0,
        direct: false,
        options: &["--buffer-mode", "user-copy", "--queues", "2"],
    });
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_stripe_of_4_files_batch_default_mode_1m_chunks() {
    stripe_fio(&StripeFio {
        children: 4,
        chunk: "1M",
        extra: 512 * KIB,
        direct: false,
        options: &["--batch"],
    });
}

/// Adds the stripe `case` describes, checks what `add` reports, and runs [`STRIPE_FIO`].
fn stripe_fio(case: &StripeFio) {
    let session = Session::start(&format!(
        "stripe{}-{}-{}",
        case.children,
        case.chunk,
        case.options.join("")
    ));
    let mut sizes = vec![CHILD_SIZE; case.children];
    sizes[case.children - 1] += case.extra;
    let files = child_files(&session.scratch, &sizes);
    let leaves: Vec<String> = files
        .iter()
        .map(|f| {
            if case.direct {
                format!("file(path={f},direct=true)")
            } else {
                format!("file:{f}")
            }
        })
        .collect();
    let expr = format!("stripe({},chunk={})", leaves.join(","), case.chunk);
    let dev = add_stack(&expr, case.options);

    let tree = field_str(&dev, "tree");
    assert!(
        tree.starts_with("stripe(") && files.iter().all(|f| tree.contains(f.as_str())),
        "`tree` of a stripe of {files:?}: {dev}"
    );
    assert_eq!(
        field_u64(&dev, "size"),
        case.children as u64 * CHILD_SIZE,
        "{} children of {CHILD_SIZE} bytes, the last {} more: {dev}",
        case.children,
        case.extra
    );
    // With no node touching the bytes, a stripe of files runs zero-copy by default.
    assert_buffer_mode(&dev, asked_mode(case.options).unwrap_or("zero-copy"));
    let queues = case
        .options
        .iter()
        .position(|o| *o == "--queues")
        .map_or(1, |i| case.options[i + 1].parse().expect("a queue count"));
    assert_eq!(field_u64(&dev, "queues"), queues, "add output: {dev}");
    assert_eq!(
        dev["batch"],
        Value::Bool(case.options.contains(&"--batch")),
        "add output: {dev}"
    );

    let path = dev_path(&dev);
    let what = format!("{expr} {} ({path})", case.options.join(" "));
    run_fio_cases(&STRIPE_FIO, path, true, &what, &session.scratch);
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_stripe_places_chunks_round_robin() {
    let session = Session::start("stripe-layout");
    let chunk = 64 * KIB as usize;
    let files = child_files(&session.scratch, &[MIB; 3]);
    let expr = format!(
        "stripe(file:{},file:{},file:{},chunk=64K)",
        files[0], files[1], files[2]
    );
    let dev = add_stack(&expr, &[]);
    let size = 3 * MIB as usize;
    assert_eq!(field_u64(&dev, "size"), size as u64, "add output: {dev}");
    let data = pattern(size, 5);
    write_direct(dev_path(&dev), 0, &data);
    assert_same(
        &read_direct(dev_path(&dev), 0, size),
        &data,
        "data written to the stripe",
    );
    del(&dev);

    // Chunk k of the device is chunk k / 3 of child k % 3.
    for (c, file) in files.iter().enumerate() {
        let expected: Vec<u8> = data
            .chunks(chunk)
            .skip(c)
            .step_by(files.len())
            .flatten()
            .copied()
            .collect();
        let child = fs::read(file).unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert_same(
            &child,
            &expected,
            &format!(
                "child {c} ({file}) of {expr}: its chunks {c}, {}, ...",
                c + 3
            ),
        );
    }
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_ext4_on_a_stripe_of_two_brd_disks() {
    let session = Session::start("stripe-brd-ext4");
    let ram = RamDisks::load(2, 64 * MIB);
    let expr = format!(
        "stripe(file:{},file:{},chunk=64K)",
        ram.path(0),
        ram.path(1)
    );
    let dev = add_stack(&expr, &[]);
    assert_eq!(field_u64(&dev, "size"), 128 * MIB, "add output: {dev}");

    // `file:` opens a block device O_DIRECT.
    let status = status_json(&dev);
    let children = node_children(&status["tree"]);
    for (i, child) in children.iter().enumerate() {
        assert_eq!(field_str(child, "kind"), "file", "child {i}: {status}");
        assert_eq!(field_str(child, "path"), ram.path(i), "child {i}: {status}");
        assert_eq!(child["direct"], Value::Bool(true), "child {i}: {status}");
    }

    ext4_files_survive(dev_path(&dev), &session.scratch);
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_three_levels_with_faulty_in_the_middle() {
    let session = Session::start("stack-three-levels");
    let files = child_files(&session.scratch, &[8 * MIB; 4]);
    let expr = format!(
        "stripe(stripe(file:{},file:{},chunk=4K),faulty(stripe(file:{},file:{},chunk=1M)),chunk=64K)",
        files[0], files[1], files[2], files[3]
    );
    let dev = add_stack(&expr, &["--queues", "2"]);
    assert_eq!(field_u64(&dev, "size"), 32 * MIB, "add output: {dev}");
    // Neither stripe nor faulty touches the bytes.
    assert_buffer_mode(&dev, "zero-copy");

    let status = status_json(&dev);
    let root = &status["tree"];
    assert_node_addresses(root, "/");
    let kinds = |node: &Value| -> Vec<String> {
        node_children(node)
            .iter()
            .map(|c| field_str(c, "kind").to_string())
            .collect()
    };
    assert_eq!(field_str(root, "kind"), "stripe", "{status}");
    assert_eq!(kinds(root), ["stripe", "faulty"], "{status}");
    let left = &node_children(root)[0];
    let faulty = &node_children(root)[1];
    assert_eq!(kinds(left), ["file", "file"], "{status}");
    assert_eq!(kinds(faulty), ["stripe"], "{status}");
    assert_eq!(
        kinds(&node_children(faulty)[0]),
        ["file", "file"],
        "{status}"
    );
    for (node, size) in [(root, 32 * MIB), (left, 16 * MIB), (faulty, 16 * MIB)] {
        assert_eq!(field_u64(node, "size"), size, "node {node}");
    }

    let path = dev_path(&dev);
    run_fio_cases(
        &STRIPE_FIO,
        path,
        true,
        &format!("{expr} ({path})"),
        &session.scratch,
    );
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_faulty_fails_only_matching_ops_in_its_range() {
    let session = Session::start("faulty");
    let size = 4 * MIB as usize;
    let files = child_files(&session.scratch, &[size as u64]);
    let dev = add_stack(&format!("faulty(file:{})", files[0]), &[]);
    let id = dev_id(&dev).to_string();
    let path = dev_path(&dev);
    assert_eq!(field_u64(&dev, "size"), size as u64, "add output: {dev}");
    let mut data = pattern(size, 11);
    write_direct(path, 0, &data);

    // Reads overlapping [1M, 1M + 64K) fail; everything else reads back.
    ublk(&["fault", &id, "/", "--fail", "read", "--range", "1M:64K"]);
    assert_eq!(
        read_blocks(path, 0..size, &data),
        blocks(MIB as usize..(MIB + 64 * KIB) as usize),
        "4 KiB O_DIRECT reads that failed with EIO under `--fail read --range 1M:64K`"
    );
    let status = status_json(&dev);
    let root = &status["tree"];
    assert_eq!(field_u64(&status, "dev_id"), dev_id(&dev), "{status}");
    assert_node_addresses(root, "/");
    assert_eq!(field_str(root, "kind"), "faulty", "{status}");
    assert!(
        root.get("faults").is_some_and(|f| !f.is_null()),
        "the faulty node does not show its rule: {status}"
    );
    let [child] = node_children(root) else {
        panic!("a faulty node has one child: {status}");
    };
    assert_eq!(field_str(child, "kind"), "file", "{status}");
    assert_eq!(field_str(child, "path"), files[0], "{status}");
    let errors = stat(root, "errors");
    assert!(
        errors >= 16,
        "16 reads failed, the faulty node counts {errors} errors: {status}"
    );
    assert_eq!(
        stat(child, "errors"),
        0,
        "the file child failed nothing: {status}"
    );
    assert!(stat(root, "reads") > 0, "{status}");

    // Writes into the range still work.
    let block = pattern(BLOCK, 12);
    write_direct(path, MIB, &block);
    data[MIB as usize..MIB as usize + BLOCK].copy_from_slice(&block);

    // A new rule replaces the old: now only writes overlapping [2M, 2M + 4K) fail.
    ublk(&["fault", &id, "/", "--fail", "write", "--range", "2M:4K"]);
    assert_eq!(
        read_blocks(path, 0..size, &data),
        Vec::<usize>::new(),
        "reads that failed under `--fail write --range 2M:4K`"
    );
    let file = open_direct(path, true);
    let mut buf = AlignedBuf::new(BLOCK);
    buf.as_mut_slice().copy_from_slice(&pattern(BLOCK, 13));
    let err = file
        .write_all_at(buf.as_mut_slice(), 2 * MIB)
        .expect_err("a write at 2M under `--fail write --range 2M:4K` succeeded");
    assert_eq!(err.raw_os_error(), Some(EIO), "write at 2M: {err}");
    for at in [2 * MIB - BLOCK as u64, 2 * MIB + BLOCK as u64] {
        file.write_all_at(buf.as_mut_slice(), at)
            .unwrap_or_else(|e| panic!("write at {at} beside the failing range: {e}"));
        let at = at as usize;
        data[at..at + BLOCK].copy_from_slice(buf.as_mut_slice());
    }
    drop(file);

    // --every 2: every other matching op fails.
    ublk(&[
        "fault", &id, "/", "--fail", "read", "--range", "0:64K", "--every", "2",
    ]);
    let failed = read_blocks(path, 0..64 * KIB as usize, &data);
    assert_eq!(
        failed.len(),
        8,
        "of 16 reads in the range of `--fail read --range 0:64K --every 2`, these failed: {failed:?}"
    );

    // --delay alone slows matching ops down and fails none.
    ublk(&["fault", &id, "/", "--delay", "300", "--range", "3M:4K"]);
    let started = Instant::now();
    assert_eq!(
        read_blocks(path, 3 * MIB as usize..3 * MIB as usize + BLOCK, &data),
        Vec::<usize>::new(),
        "a read under `--delay 300` failed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "a read under `--delay 300 --range 3M:4K` took {took:?}"
    );

    // Only faulty nodes take rules; other addresses and devices are refused.
    let cases: [(&[&str], &[&[&str]]); 3] = [
        (&["fault", &id, "/0", "--fail", "read"], &[]),
        (&["fault", &id, "/1", "--fail", "read"], &[]),
        (&["fault", "4000", "/", "--fail", "read"], &[&["4000"]]),
    ];
    for (args, mentions) in cases {
        let out = ublk_unchecked(args);
        let problems = rejection_problems(&out, mentions);
        assert!(
            problems.is_empty(),
            "{}\n{}",
            problems.join("; "),
            describe(&command_line("ublk", args), &out)
        );
    }

    ublk(&["fault", &id, "/", "--clear"]);
    assert_eq!(
        read_blocks(path, 0..size, &data),
        Vec::<usize>::new(),
        "reads that failed after `ublk fault {id} / --clear`"
    );
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_faulty_inner_node_is_addressed_by_its_path() {
    let session = Session::start("faulty-inner");
    let size = 8 * MIB as usize;
    let files = child_files(&session.scratch, &[4 * MIB; 2]);
    let expr = format!(
        "stripe(file:{},faulty(file:{}),chunk=64K)",
        files[0], files[1]
    );
    let dev = add_stack(&expr, &[]);
    let id = dev_id(&dev).to_string();
    let path = dev_path(&dev);
    let data = pattern(size, 21);
    write_direct(path, 0, &data);

    // The root is a stripe: it takes no rule.
    let args = ["fault", &id, "/", "--fail", "read"];
    let out = ublk_unchecked(&args);
    let problems = rejection_problems(&out, &[]);
    assert!(
        problems.is_empty(),
        "{}\n{}",
        problems.join("; "),
        describe(&command_line("ublk", &args), &out)
    );

    // The range is in the faulty node's own offsets: its bytes [64K, 128K) are its second
    // chunk, which is chunk 3 of the device, [192K, 256K).
    ublk(&["fault", &id, "/1", "--fail", "read", "--range", "64K:64K"]);
    assert_eq!(
        read_blocks(path, 0..size, &data),
        blocks((192 * KIB) as usize..(256 * KIB) as usize),
        "4 KiB reads of {expr} that failed under `ublk fault {id} /1 --fail read --range 64K:64K`"
    );
    let status = status_json(&dev);
    let root = &status["tree"];
    assert_node_addresses(root, "/");
    let [plain, faulty] = node_children(root) else {
        panic!("a stripe of two children shows other children: {status}");
    };
    assert_eq!(field_str(plain, "kind"), "file", "{status}");
    assert_eq!(field_str(faulty, "kind"), "faulty", "{status}");
    assert!(stat(faulty, "errors") >= 16, "errors of /1: {status}");
    assert_eq!(stat(plain, "errors"), 0, "errors of /0: {status}");

    ublk(&["fault", &id, "/1", "--clear"]);
    assert_eq!(
        read_blocks(path, 0..size, &data),
        Vec::<usize>::new(),
        "reads that failed after `ublk fault {id} /1 --clear`"
    );
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_status_shows_the_stripe_and_counts_its_io() {
    let session = Session::start("stack-status");
    let files = child_files(&session.scratch, &[CHILD_SIZE; 2]);
    let expr = format!("stripe(file:{},file:{},chunk=64K)", files[0], files[1]);
    let dev = add_stack(&expr, &[]);
    let other = add(&["null", "--size", "16M"]);

    let before = status_json(&dev);
    assert_eq!(field_u64(&before, "dev_id"), dev_id(&dev), "{before}");
    let root = &before["tree"];
    assert_node_addresses(root, "/");
    assert_eq!(field_str(root, "kind"), "stripe", "{before}");
    assert_eq!(field_u64(root, "size"), 2 * CHILD_SIZE, "{before}");
    assert_eq!(
        size_value(&root["chunk"]),
        Some(64 * KIB),
        "chunk: {before}"
    );
    let children = node_children(root);
    assert_eq!(children.len(), 2, "{before}");
    for (i, child) in children.iter().enumerate() {
        assert_eq!(field_str(child, "kind"), "file", "child {i}: {before}");
        assert_eq!(field_str(child, "path"), files[i], "child {i}: {before}");
        assert_eq!(field_u64(child, "size"), CHILD_SIZE, "child {i}: {before}");
        assert_eq!(child["direct"], Value::Bool(false), "child {i}: {before}");
    }

    // 1 MiB at 0 is 16 chunks: 512 KiB for each child.
    write_direct(dev_path(&dev), 0, &pattern(MIB as usize, 31));
    let _ = read_direct(dev_path(&dev), 0, MIB as usize);
    let after = status_json(&dev);
    let delta = |path: &[usize], key: &str| {
        let node = |status: &Value| {
            path.iter()
                .fold(status["tree"].clone(), |n, &i| node_children(&n)[i].clone())
        };
        let (was, is) = (stat(&node(&before), key), stat(&node(&after), key));
        is.checked_sub(was)
            .unwrap_or_else(|| panic!("{key} of node {path:?} went down: {before}\n{after}"))
    };
    assert_eq!(delta(&[], "write_bytes"), MIB, "root: {before}\n{after}");
    assert!(delta(&[], "writes") >= 1, "root: {before}\n{after}");
    assert!(delta(&[], "read_bytes") >= MIB, "root: {before}\n{after}");
    assert!(delta(&[], "reads") >= 1, "root: {before}\n{after}");
    for i in 0..2 {
        assert_eq!(
            delta(&[i], "write_bytes"),
            MIB / 2,
            "child {i}: {before}\n{after}"
        );
        assert!(delta(&[i], "writes") >= 1, "child {i}: {before}\n{after}");
        assert!(
            delta(&[i], "read_bytes") >= MIB / 2,
            "child {i}: {before}\n{after}"
        );
    }
    assert_eq!(stat(&after["tree"], "errors"), 0, "{after}");

    // Without --json: one line per node.
    let text =
        String::from_utf8_lossy(&ublk(&["status", &dev_id(&dev).to_string()]).stdout).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() >= 3
            && lines.iter().any(|l| l.contains("stripe"))
            && files
                .iter()
                .all(|f| lines.iter().any(|l| l.contains(f.as_str()))),
        "`ublk status {}`:\n{text}",
        dev_id(&dev)
    );

    let listed = list();
    let entry = listed_entry(&listed, dev_id(&dev))
        .unwrap_or_else(|| panic!("the stack is not listed: {}", json(&listed)));
    assert_eq!(field_str(entry, "target"), "stack", "{entry}");
    assert_eq!(
        entry["tree"], dev["tree"],
        "list entry {entry} vs add output {dev}"
    );
    let entry = listed_entry(&listed, dev_id(&other))
        .unwrap_or_else(|| panic!("the null device is not listed: {}", json(&listed)));
    assert_eq!(field_str(entry, "tree"), "null", "{entry}");

    del(&other);
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn stack_bad_expressions_are_rejected_without_leaving_a_device() {
    let session = Session::start("stack-bad");
    let files = child_files(&session.scratch, &[CHILD_SIZE, CHILD_SIZE, 2 * CHILD_SIZE]);
    let (a, b, big) = (&files[0], &files[1], &files[2]);
    let missing = session.scratch.join("missing.img").display().to_string();
    let empty = session.scratch.join("empty.img").display().to_string();
    write_file(Path::new(&empty), b"");
    let names_missing: Mentions = &[&[&missing]];

    // (expression, options, words the error must mention: one of each group)
    let cases: Vec<(String, &[&str], Mentions)> = vec![
        (format!("foo(file:{a})"), &[], &[&["foo"]]),
        (format!("stripe(file:{a})"), &[], &[&["stripe"]]),
        (format!("faulty(file:{a},file:{b})"), &[], &[&["faulty"]]),
        (
            format!("stripe(file:{a},file:{b},chunk=48K)"),
            &[],
            &[&["chunk"]],
        ),
        (
            format!("stripe(file:{a},file:{b},chunk=2K)"),
            &[],
            &[&["chunk"]],
        ),
        (format!("stripe(file:{a},file:{big})"), &[], &[&["differ"]]),
        (
            format!("stripe(file:{a},file:{missing})"),
            &[],
            names_missing,
        ),
        (format!("stripe(file:{a},file:{empty})"), &[], &[]),
        (
            "stripe(ram:16M,ram:16M)".to_string(),
            &["--buffer-mode", "zero-copy"],
            &[&["zero-copy"]],
        ),
        (format!("stripe(file:{a},file:{b}"), &[], &[&["column"]]),
        (format!("stripe(file:{a},,file:{b})"), &[], &[&["column"]]),
    ];

    let sockets_before = control_sockets();
    let mut failures = Vec::new();
    for (expr, options, mentions) in &cases {
        let args = [&["add", "stack", expr.as_str()], *options].concat();
        let out = ublk_unchecked(&args);
        let mut problems = rejection_problems(&out, mentions);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != 1 || !lines[0].starts_with("ublk: error:") {
            problems.push("stderr is not one `ublk: error: ...` line".to_string());
        }
        let listed = list();
        if !listed.is_empty() {
            problems.push(format!("devices listed afterwards: {}", json(&listed)));
            ublk_unchecked(&["del", "--all"]);
        }
        let nodes = device_nodes();
        if !nodes.is_empty() {
            problems.push(format!("device nodes afterwards: {nodes:?}"));
        }
        let sockets = control_sockets();
        if sockets != sockets_before {
            problems.push(format!("control sockets afterwards: {sockets:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}\n{}",
                problems.join("\n"),
                describe(&command_line("ublk", &args), &out)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} bad stack(s) not handled properly:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Words an error must mention: one of each group (case-insensitive).
type Mentions<'a> = &'a [&'a [&'a str]];

/// `ublk add stack EXPR options...`: the device, which must report target `stack`.
#[track_caller]
fn add_stack(expr: &str, options: &[&str]) -> Value {
    let dev = add(&[&["stack", expr], options].concat());
    assert_eq!(field_str(&dev, "target"), "stack", "add {expr}: {dev}");
    field_str(&dev, "tree");
    dev
}

/// Creates sparse files of `sizes` bytes in `dir` for a stack's `file:` leaves; returns
/// their paths.
fn child_files(dir: &Path, sizes: &[u64]) -> Vec<String> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let path = dir.join(format!("child-{i}.img"));
            File::create(&path)
                .and_then(|f| f.set_len(size))
                .unwrap_or_else(|e| panic!("create {} of {size} bytes: {e}", path.display()));
            path.display().to_string()
        })
        .collect()
}

/// `ublk status ID --json` of the device `add` reported.
#[track_caller]
fn status_json(dev: &Value) -> Value {
    let id = dev_id(dev).to_string();
    let args = ["status", id.as_str(), "--json"];
    let status = parse_json(&ublk(&args), &command_line("ublk", &args));
    assert!(
        status["tree"].is_object(),
        "`ublk status {id} --json`: {status}"
    );
    status
}

/// The `children` of a status node (none for a leaf).
#[track_caller]
fn node_children(node: &Value) -> &[Value] {
    match &node["children"] {
        Value::Array(children) => children,
        Value::Null => &[],
        other => panic!("`children` is not an array: {other}"),
    }
}

/// Checks that `node` is at `address` and its descendants at theirs (`/0`, `/1/0`, ...).
#[track_caller]
fn assert_node_addresses(node: &Value, address: &str) {
    assert_eq!(field_str(node, "node"), address, "node {node}");
    for (i, child) in node_children(node).iter().enumerate() {
        let child_address = if address == "/" {
            format!("/{i}")
        } else {
            format!("{address}/{i}")
        };
        assert_node_addresses(child, &child_address);
    }
}

/// One counter of a status node's `stats`.
#[track_caller]
fn stat(node: &Value, key: &str) -> u64 {
    field_u64(&node["stats"], key)
}

/// A size in bytes given as a number, or as a string like `64K`.
fn size_value(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let s = v.as_str()?;
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let shift = match unit {
        "" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "m" | "MiB" => 20,
        "G" | "g" | "GiB" => 30,
        _ => return None,
    };
    Some(digits.parse::<u64>().ok()? << shift)
}

/// Files in `/run/ublk`, where servers put their control sockets.
fn control_sockets() -> BTreeSet<String> {
    fs::read_dir("/run/ublk")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect()
}

/// `EIO`, hardcoded because there is no libc crate here.
const EIO: i32 = 5;

/// Size of the reads of [`read_blocks`].
const BLOCK: usize = 4096;

/// Offsets of the [`BLOCK`]s in `range`.
fn blocks(range: std::ops::Range<usize>) -> Vec<usize> {
    range.step_by(BLOCK).collect()
}

/// Reads `range` of the device in [`BLOCK`]-sized O_DIRECT reads, each checked against
/// `expected` (the whole device's data); returns the offsets of the reads that failed
/// with EIO. Any other error, or data that differs, fails the test.
#[track_caller]
fn read_blocks(path: &str, range: std::ops::Range<usize>, expected: &[u8]) -> Vec<usize> {
    let file = open_direct(path, false);
    let mut buf = AlignedBuf::new(BLOCK);
    let mut failed = Vec::new();
    for at in blocks(range) {
        let buf = buf.as_mut_slice();
        match file.read_exact_at(buf, at as u64) {
            Ok(()) => assert_same(
                buf,
                &expected[at..at + BLOCK],
                &format!("the {BLOCK} bytes at {at} of {path}"),
            ),
            Err(e) if e.raw_os_error() == Some(EIO) => failed.push(at),
            Err(e) => panic!("read {BLOCK} bytes at {at} of {path}: {e}"),
        }
    }
    failed
}

/// The brd module with `count` RAM disks (`/dev/ram0`, ...) of `size` bytes; unloaded
/// when dropped if nothing uses it any more.
struct RamDisks {
    count: usize,
}

impl RamDisks {
    #[track_caller]
    fn load(count: usize, size: u64) -> RamDisks {
        // A previous test's disks, whose servers may still be closing them.
        let gone = wait_until(Duration::from_secs(10), || {
            !Path::new("/sys/module/brd").exists() || unload_module("brd")
        });
        assert!(gone, "brd is loaded and cannot be unloaded");
        load_module(
            "brd",
            &[
                &format!("rd_nr={count}"),
                &format!("rd_size={}", size / KIB),
            ],
        );
        let disks = RamDisks { count };
        for i in 0..count {
            let path = disks.path(i);
            assert!(
                wait_until(Duration::from_secs(10), || Path::new(&path).exists()),
                "{path} did not appear after loading brd"
            );
        }
        disks
    }

    fn path(&self, i: usize) -> String {
        assert!(i < self.count, "there are only {} RAM disks", self.count);
        format!("/dev/ram{i}")
    }
}

impl Drop for RamDisks {
    fn drop(&mut self) {
        // May fail while a server still holds a disk; the next `load` retries.
        unload_module("brd");
    }
}

/// Loads a kernel module: from `/lib/modules/NAME.ko` in the test VM, else with modprobe.
#[track_caller]
fn load_module(name: &str, params: &[&str]) {
    let file = format!("/lib/modules/{name}.ko");
    if Path::new(&file).exists() {
        run("insmod", &[&[file.as_str()], params].concat());
    } else {
        run("modprobe", &[&[name], params].concat());
    }
}

/// Unloads a kernel module; whether that worked.
fn unload_module(name: &str) -> bool {
    Command::new("rmmod")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------
// mirrors
// ---------------------------------------------------------------------------------------

#[path = "kernel/mirror.rs"]
mod mirror;

// ---------------------------------------------------------------------------------------
// compressed devices
// ---------------------------------------------------------------------------------------

#[path = "kernel/compress.rs"]
mod compress;

// ---------------------------------------------------------------------------------------
// live statistics
// ---------------------------------------------------------------------------------------

#[path = "kernel/stats.rs"]
mod stats;

// ---------------------------------------------------------------------------------------
// request buffers only for I/O in flight
// ---------------------------------------------------------------------------------------

#[path = "kernel/memory.rs"]
mod memory;

// ---------------------------------------------------------------------------------------
// user recovery
// ---------------------------------------------------------------------------------------

#[path = "kernel/recovery.rs"]
mod recovery;

// ---------------------------------------------------------------------------------------
// lifecycle: churn, exits with the device in use, del --safe
// ---------------------------------------------------------------------------------------

#[path = "kernel/lifecycle.rs"]
mod lifecycle;

// ---------------------------------------------------------------------------------------
// unprivileged devices: a second uid, udev played by the test
// ---------------------------------------------------------------------------------------

#[path = "kernel/unprivileged.rs"]
mod unprivileged;

// ---------------------------------------------------------------------------------------
// Ceph RBD devices (built with the cargo feature `rbd`, as `cargo xtask test` does when the
// host has or can install Ceph)
// ---------------------------------------------------------------------------------------

#[cfg(feature = "rbd")]
#[path = "kernel/rbd.rs"]
mod rbd;

// ---------------------------------------------------------------------------------------
// test session
// ---------------------------------------------------------------------------------------

/// Per-test setup and teardown: checks for the driver, starts without devices, gives the
/// test a scratch directory, and deletes every device at the end even if the test failed.
struct Session {
    name: String,
    scratch: PathBuf,
    started: Instant,
}

impl Session {
    #[track_caller]
    fn start(name: &str) -> Session {
        assert!(
            Path::new(CONTROL_DEVICE).exists(),
            "no {CONTROL_DEVICE}: run `cargo xtask test`"
        );
        ublk(&["del", "--all"]);
        assert_no_devices("before the test, after `ublk del --all`");

        let scratch = std::env::temp_dir().join("ublk-kernel-tests").join(name);
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch)
            .unwrap_or_else(|e| panic!("create {}: {e}", scratch.display()));
        Session {
            name: name.to_string(),
            scratch,
            started: Instant::now(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Don't panic here: this runs while unwinding from a failed test.
        match Command::new(ublk_bin()).args(["del", "--all"]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cleanup: {}",
                describe(&format!("{} del --all", ublk_bin()), &out)
            ),
            Err(e) => eprintln!("cleanup: cannot run {} del --all: {e}", ublk_bin()),
        }
        let _ = fs::remove_dir_all(&self.scratch);
        // Shown with --nocapture or on failure: keeps an eye on the suite's time budget.
        eprintln!(
            "{}: {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------
// the ublk command
// ---------------------------------------------------------------------------------------

fn ublk_bin() -> String {
    std::env::var("UBLK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ublk").to_string())
}

/// Runs `ublk args...`, which must succeed.
#[track_caller]
fn ublk(args: &[&str]) -> Output {
    run(&ublk_bin(), args)
}

/// Runs `ublk args...`, whatever its exit status.
#[track_caller]
fn ublk_unchecked(args: &[&str]) -> Output {
    run_unchecked(&ublk_bin(), args)
}

/// `ublk add args...`: returns its JSON description of the new device, which must exist.
#[track_caller]
fn add(args: &[&str]) -> Value {
    let args = [&["add"], args].concat();
    let out = ublk(&args);
    let dev = parse_json(&out, &command_line("ublk", &args));
    let path = dev_path(&dev);
    assert_eq!(
        path,
        format!("/dev/ublkb{}", dev_id(&dev)),
        "ublk {args:?}: {dev}"
    );
    assert!(
        Path::new(path).exists(),
        "ublk {args:?} returned but {path} does not exist"
    );
    server_pid(&dev);
    dev
}

/// `ublk del ID`: the device must be gone (its node and its list entry) when it returns.
#[track_caller]
fn del(dev: &Value) {
    let out = ublk(&["del", &dev_id(dev).to_string()]);
    // A server that had to be killed skipped its clean stop (a thread of its own took the
    // SIGTERM, say): what a clean stop promises was not tested.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("did not stop"),
        "the server of device {} had to be killed: {stderr}",
        dev_id(dev)
    );
    let path = dev_path(dev);
    assert!(
        !Path::new(path).exists(),
        "`ublk del {}` returned but {path} still exists",
        dev_id(dev)
    );
    let listed = list();
    assert!(
        listed_entry(&listed, dev_id(dev)).is_none(),
        "device {} still listed after `ublk del`: {}",
        dev_id(dev),
        json(&listed)
    );
}

/// `ublk list --json`.
#[track_caller]
fn list() -> Vec<Value> {
    match parse_json(&ublk(&["list", "--json"]), "ublk list --json") {
        Value::Array(devices) => devices,
        other => panic!("`ublk list --json` is not an array: {other}"),
    }
}

/// Devices as JSON, for messages.
fn json(devices: &[Value]) -> String {
    Value::from(devices).to_string()
}

fn listed_entry(listed: &[Value], id: u64) -> Option<&Value> {
    listed.iter().find(|entry| dev_id(entry) == id)
}

#[track_caller]
fn assert_no_devices(when: &str) {
    let listed = list();
    assert!(
        listed.is_empty(),
        "devices listed {when}: {}",
        json(&listed)
    );
    let nodes = device_nodes();
    assert!(nodes.is_empty(), "device nodes left {when}: {nodes:?}");
}

/// Names of the ublk block and character devices in /dev.
fn device_nodes() -> BTreeSet<String> {
    fs::read_dir("/dev")
        .expect("read /dev")
        .map(|entry| entry.expect("read a /dev entry").file_name())
        .filter_map(|name| name.into_string().ok())
        .filter(|name| name.starts_with("ublkb") || name.starts_with("ublkc"))
        .collect()
}

#[track_caller]
fn parse_json(out: &Output, cmdline: &str) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "output of `{cmdline}` is not JSON: {e}\n{}",
            describe(cmdline, out)
        )
    })
}

#[track_caller]
fn field_u64(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` missing or not an unsigned integer in {v}"))
}

#[track_caller]
fn field_str<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` missing or not a string in {v}"))
}

#[track_caller]
fn dev_id(dev: &Value) -> u64 {
    field_u64(dev, "dev_id")
}

#[track_caller]
fn dev_path(dev: &Value) -> &str {
    field_str(dev, "path")
}

#[track_caller]
fn server_pid(dev: &Value) -> u64 {
    field_u64(dev, "pid")
}

// ---------------------------------------------------------------------------------------
// running commands
// ---------------------------------------------------------------------------------------

/// Runs `program args...` (with a time limit), which must succeed.
#[track_caller]
fn run(program: &str, args: &[&str]) -> Output {
    let out = run_unchecked(program, args);
    assert!(
        out.status.success(),
        "{}",
        describe(&command_line(program, args), &out)
    );
    out
}

/// Runs `program args...` (with a time limit) and returns its output, whatever its status.
#[track_caller]
fn run_unchecked(program: &str, args: &[&str]) -> Output {
    let mut child = Spawned::new(program, args, None);
    match child.wait_timeout(COMMAND_TIMEOUT) {
        Some(out) => out,
        None => {
            let out = child.kill();
            panic!(
                "still running after {COMMAND_TIMEOUT:?}, killed\n{}",
                describe(&command_line(program, args), &out)
            )
        }
    }
}

fn command_line<S: AsRef<str>>(program: &str, args: &[S]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(AsRef::as_ref))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command line with its exit status and output, for panic messages.
fn describe(cmdline: &str, out: &Output) -> String {
    format!(
        "$ {cmdline}\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end(),
    )
}

/// A running child process whose stdout and stderr go to unlinked temporary files.
///
/// Files rather than pipes, because `ublk add` leaves a daemon behind that may keep the
/// inherited descriptors open: waiting for EOF on a pipe would then never finish.
/// The child is killed if still running when this is dropped.
struct Spawned {
    child: Child,
    stdout: File,
    stderr: File,
}

impl Spawned {
    #[track_caller]
    fn new(program: &str, args: &[&str], dir: Option<&Path>) -> Spawned {
        let stdout = capture_file();
        let stderr = capture_file();
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout.try_clone().expect("duplicate a capture file"))
            .stderr(stderr.try_clone().expect("duplicate a capture file"));
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(program, args)));
        Spawned {
            child,
            stdout,
            stderr,
        }
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the child to exit; `None` if it is still running.
    fn wait_timeout(&mut self, limit: Duration) -> Option<Output> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll a child process") {
                return Some(Output {
                    status,
                    stdout: read_capture(&mut self.stdout),
                    stderr: read_capture(&mut self.stderr),
                });
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Kills the child (if still running) and returns what it printed.
    fn kill(&mut self) -> Output {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for a killed child");
        Output {
            status,
            stdout: read_capture(&mut self.stdout),
            stderr: read_capture(&mut self.stderr),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An anonymous temporary file (created, then unlinked) to capture a child's output.
fn capture_file() -> File {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "ublk-kernel-tests-{}-{}.out",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    file
}

fn read_capture(file: &mut File) -> Vec<u8> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .expect("read captured output");
    bytes
}

/// Polls `condition` every 100 ms until it holds (true) or `limit` has passed (false).
fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// data and direct I/O
// ---------------------------------------------------------------------------------------

/// `O_DIRECT`, hardcoded because there is no libc crate here: 0o40000 on x86 (the test
/// VM) and most other architectures, 0o200000 on ARM.
#[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
const O_DIRECT: i32 = 0o200000;
#[cfg(not(any(target_arch = "aarch64", target_arch = "arm")))]
const O_DIRECT: i32 = 0o40000;

/// O_DIRECT wants buffers, offsets and lengths aligned; 4 KiB satisfies any block size.
const DIRECT_ALIGN: usize = 4096;
/// Size of each direct read or write.
const DIRECT_CHUNK: usize = MIB as usize;

/// A zeroed buffer of `len` bytes starting on a `DIRECT_ALIGN` boundary. The `Vec` is
/// never resized, so the aligned window stays put.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn open_direct(path: &str, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path} with O_DIRECT: {e}"))
}

/// Writes `data` at `offset` of the device, bypassing the page cache.
fn write_direct(path: &str, offset: u64, data: &[u8]) {
    assert!(
        offset % 512 == 0 && data.len() % 512 == 0,
        "unaligned direct write"
    );
    let file = open_direct(path, true);
    let mut buf = AlignedBuf::new(DIRECT_CHUNK);
    for (i, chunk) in data.chunks(DIRECT_CHUNK).enumerate() {
        let at = offset + (i * DIRECT_CHUNK) as u64;
        let buf = &mut buf.as_mut_slice()[..chunk.len()];
        buf.copy_from_slice(chunk);
        file.write_all_at(buf, at)
            .unwrap_or_else(|e| panic!("write {} bytes at {at} of {path}: {e}", chunk.len()));
    }
}

/// Reads `len` bytes at `offset` of the device, bypassing the page cache.
fn read_direct(path: &str, offset: u64, len: usize) -> Vec<u8> {
    assert!(offset % 512 == 0 && len % 512 == 0, "unaligned direct read");
    let file = open_direct(path, false);
    let mut buf = AlignedBuf::new(DIRECT_CHUNK);
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let at = offset + data.len() as u64;
        let buf = &mut buf.as_mut_slice()[..DIRECT_CHUNK.min(len - data.len())];
        file.read_exact_at(buf, at)
            .unwrap_or_else(|e| panic!("read {} bytes at {at} of {path}: {e}", buf.len()));
        data.extend_from_slice(buf);
    }
    data
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

fn write_file(path: &Path, contents: &[u8]) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Drops clean page-cache pages, so the next reads come from the device.
fn drop_caches() {
    run("sync", &[]);
    fs::write("/proc/sys/vm/drop_caches", "3").expect("write /proc/sys/vm/drop_caches");
}
