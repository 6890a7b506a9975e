//! `mirror_*`: the RAID-1 stack node on the real driver.
//!
//! fio verification on new mirrors of files in every buffer mode, of three files, and of two
//! stripes; a leg failing while fio
//! verifies (`ublk fail`, a `faulty` node, a device-mapper `error` table under the leg); a
//! replaced leg rebuilt under fio; the resync after `kill -9` of the server copying only the
//! regions being written; reads during a rebuild never returning the replacement's stale
//! or blank bytes; flushes reaching every leg; and a leg of another mirror refused unless
//! `--force-new`. After each, the legs' data areas are compared byte for byte.

use super::*;

/// Size of each file leg. The legs' metadata takes their first MiB, so the device holds
/// 15 MiB.
const LEG: u64 = 16 * MIB;

/// Where the data area starts on legs of [`LEG`] bytes (status `mirror.data_offset`).
const DATA_OFFSET: u64 = MIB;

/// The fio runs on a new mirror: requests of any size 16 deep, then a mix of smaller reads
/// and writes 32 deep.
const MIRROR_FIO: [FioCase; 2] = [
    FioCase {
        rw: "randwrite",
        blocks: ANY_SIZE,
        iodepth: 16,
        size: 4 * MIB,
    },
    FioCase {
        rw: "randrw",
        blocks: &["--bsrange=512-64k", "--blockalign=512"],
        iodepth: 32,
        size: 4 * MIB,
    },
];

/// How long a mirror of [`LEG`]-sized legs may take to sync without a rate limit.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// fio on new mirrors
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_of_2_files_copy() {
    mirror_of_files(2, &["--buffer-mode", "copy"]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_of_2_files_user_copy() {
    mirror_of_files(2, &["--buffer-mode", "user-copy"]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_of_2_files_registered() {
    mirror_of_files(2, &["--buffer-mode", "registered"]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_of_2_files_zero_copy() {
    mirror_of_files(2, &["--buffer-mode", "zero-copy"]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_of_2_files_manual_zero_copy() {
    mirror_of_files(2, &["--buffer-mode", "manual-zero-copy"]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_of_3_files_default_mode_2_queues() {
    mirror_of_files(3, &["--queues", "2"]);
}

/// A new mirror of `legs` files, added with `options`: fio verifies its data; once leg 0 is
/// copied to the others, every leg's data area equals the device's contents.
fn mirror_of_files(legs: usize, options: &[&str]) {
    let session = Session::start(&format!("mirror{legs}{}", options.join("")));
    let files = child_files(&session.scratch, &vec![LEG; legs]);
    let expr = format!("mirror({})", file_leaves(&files));
    mirror_fio(&session, &expr, options, |i| read_file(&files[i]));
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_of_2_stripes() {
    let session = Session::start("mirror-of-stripes");
    let chunk = 64 * KIB as usize;
    let files = child_files(&session.scratch, &[LEG / 2; 4]);
    let expr = format!(
        "mirror(stripe(file:{},file:{},chunk=64K),stripe(file:{},file:{},chunk=64K))",
        files[0], files[1], files[2], files[3]
    );
    mirror_fio(&session, &expr, &[], |i| {
        destripe(
            &[read_file(&files[2 * i]), read_file(&files[2 * i + 1])],
            chunk,
        )
    });
}

/// Adds the new mirror `expr` (at the root, over legs of [`LEG`] bytes) with `options`,
/// runs [`MIRROR_FIO`] on it, waits for its legs to be in sync and compares each leg's
/// data area — `leg(i)` reads leg `i` whole — with the device's contents.
fn mirror_fio(session: &Session, expr: &str, options: &[&str], leg: impl Fn(usize) -> Vec<u8>) {
    let dev = add_stack(expr, options);
    assert_buffer_mode(&dev, asked_mode(options).unwrap_or("zero-copy"));
    let status = status_json(&dev);
    let legs = node_children(&status["tree"]).len();
    assert_eq!(field_str(&status["tree"], "kind"), "mirror", "{status}");
    assert_eq!(
        mirror_of(&status)["legs"].as_array().map(Vec::len),
        Some(legs),
        "{status}"
    );
    assert_eq!(
        field_u64(mirror_of(&status), "data_offset"),
        DATA_OFFSET,
        "{status}"
    );
    assert_eq!(
        field_u64(&dev, "size"),
        LEG - DATA_OFFSET,
        "add output: {dev}"
    );
    // A new mirror: leg 0 is the source, the others are copied from it.
    assert_eq!(leg_state(&status, 0), "in_sync", "{status}");
    for i in 1..legs {
        let state = leg_state(&status, i);
        assert!(
            state == "rebuilding" || state == "in_sync",
            "leg {i} of a new mirror is {state}: {status}"
        );
    }

    let path = dev_path(&dev);
    let what = format!("{expr} {} ({path})", options.join(" "));
    run_fio_cases(&MIRROR_FIO, path, true, &what, &session.scratch);
    let status = wait_for_sync(&dev);
    let device = read_direct(path, 0, (LEG - DATA_OFFSET) as usize);
    for i in 0..legs {
        assert_same(
            data_area(&leg(i), &status),
            &device,
            &format!("leg {i}'s data area vs the device {what} after fio and the sync"),
        );
    }
    del(&dev);
}

/// The contents of a stripe of `children` with chunks of `chunk` bytes: chunk k is chunk
/// k / n of child k % n.
fn destripe(children: &[Vec<u8>], chunk: usize) -> Vec<u8> {
    let per_child = children[0].len() / chunk;
    let mut data = Vec::with_capacity(per_child * chunk * children.len());
    for c in 0..per_child {
        for child in children {
            data.extend_from_slice(&child[c * chunk..(c + 1) * chunk]);
        }
    }
    data
}

// ---------------------------------------------------------------------------------------
// a leg failing under fio
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_leg_failed_by_command_during_fio() {
    let session = Session::start("mirror-fail-command");
    let files = child_files(&session.scratch, &[LEG; 2]);
    let expr = format!("mirror({},assume_clean=true)", file_leaves(&files));
    let dev = add_stack(&expr, &[]);
    let id = dev_id(&dev).to_string();
    let status = leg_fails_during_fio(&session, &dev, || {
        ublk(&["fail", &id, "/1"]);
    });
    assert_eq!(
        mirror_of(&status)["last_error"].as_str().map(str::is_empty),
        Some(false),
        "why leg 1 failed: {status}"
    );

    // The last in-sync leg, and nodes that are not legs, cannot be failed.
    for node in ["/0", "/"] {
        let args = ["fail", id.as_str(), node];
        let out = ublk_unchecked(&args);
        let mut problems = rejection_problems(&out, &[]);
        if out.status.code() != Some(1) {
            problems.push(format!("exit status {}, not 1", out.status));
        }
        assert!(
            problems.is_empty(),
            "{}\n{}",
            problems.join("; "),
            describe(&command_line("ublk", &args), &out)
        );
    }
    let status = status_json(&dev);
    assert_eq!(leg_state(&status, 0), "in_sync", "{status}");
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_leg_failed_by_a_faulty_node_during_fio() {
    let session = Session::start("mirror-fail-faulty");
    let files = child_files(&session.scratch, &[LEG; 2]);
    let expr = format!(
        "mirror(file:{},faulty(file:{}),assume_clean=true)",
        files[0], files[1]
    );
    let dev = add_stack(&expr, &[]);
    let id = dev_id(&dev).to_string();
    let status = leg_fails_during_fio(&session, &dev, || {
        ublk(&["fault", &id, "/1", "--fail", "all"]);
    });
    let leg = &node_children(&status["tree"])[1];
    assert_eq!(field_str(leg, "kind"), "faulty", "{status}");
    assert!(
        stat(leg, "errors") > 0,
        "errors of the faulty node: {status}"
    );
    assert_eq!(
        mirror_of(&status)["last_error"].as_str().map(str::is_empty),
        Some(false),
        "the error that failed leg 1: {status}"
    );
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_leg_failed_by_dm_error_during_fio() {
    let session = Session::start("mirror-fail-dm");
    let files = child_files(&session.scratch, &[LEG; 2]);
    let dm = DmOverLoop::create("ublk-test-mirror-leg", &files[1]);
    let expr = format!(
        "mirror(file:{},file:{},assume_clean=true)",
        files[0],
        dm.path()
    );
    let dev = add_stack(&expr, &[]);
    let status = leg_fails_during_fio(&session, &dev, || dm.switch_to_error());
    assert_eq!(
        mirror_of(&status)["last_error"].as_str().map(str::is_empty),
        Some(false),
        "the error that failed leg 1: {status}"
    );
    del(&dev);
}

/// Runs fio (verifying) on the two-leg mirror `dev` and calls `fail` once fio is busy
/// writing, to make leg 1 fail. fio must pass; afterwards leg 1 is faulty, the mirror
/// degraded, and new writes go to leg 0 only. Returns the last status.
fn leg_fails_during_fio(session: &Session, dev: &Value, fail: impl FnOnce()) -> Value {
    let path = dev_path(dev);
    let case = FioCase {
        rw: "randwrite",
        blocks: &["--bs=4k"],
        iodepth: 16,
        size: 8 * MIB,
    };
    let mut args = case.args(path, true);
    // A steady pace (about a second of writes, then of verifying reads), so that the leg
    // fails while fio writes however fast the machine is.
    args.push("--rate_iops=2000".into());
    let ios_before = completed_ios(path);
    let mut fio = FioRun::start(&args, &session.scratch);
    let going = wait_until(Duration::from_secs(60), || {
        completed_ios(path) > ios_before + 256 || !fio.is_running()
    });
    assert!(
        going && fio.is_running(),
        "fio did not get going on {path}, or finished before the leg could fail\n{}",
        fio.kill()
    );
    let at_failure = status_json(dev);
    fail();
    let context = format!("fio on {} while its leg 1 failed", field_str(dev, "tree"));
    let (report, _) = fio.finish(&context);
    let job = &report["jobs"][0];
    assert_eq!(field_u64(&job["write"], "io_bytes"), case.size, "{context}");
    assert_eq!(field_u64(&job["read"], "io_bytes"), case.size, "{context}");

    let status = status_json(dev);
    assert_eq!(leg_state(&status, 0), "in_sync", "{status}");
    assert_eq!(leg_state(&status, 1), "faulty", "{status}");
    let m = mirror_of(&status);
    assert_eq!(field_str(m, "state"), "degraded", "{status}");
    assert_eq!(field_u64(m, "in_sync"), 1, "{status}");
    let ios = |s: &Value| stat(&s["tree"], "writes") + stat(&s["tree"], "reads");
    assert!(
        ios(&status) > ios(&at_failure),
        "no I/O after the failure: {at_failure}\n{status}"
    );

    // A degraded mirror writes its in-sync leg only.
    let leg1_writes = stat(&node_children(&status["tree"])[1], "writes");
    let data = pattern(MIB as usize, 51);
    write_direct(path, 0, &data);
    assert_same(
        &read_direct(path, 0, data.len()),
        &data,
        "1 MiB written degraded",
    );
    let after = status_json(dev);
    assert_eq!(
        stat(&node_children(&after["tree"])[1], "writes"),
        leg1_writes,
        "writes that reached the faulty leg 1: {status}\n{after}"
    );
    assert_eq!(leg_state(&after, 1), "faulty", "{after}");
    after
}

/// A device-mapper device over a loop device over a file, to be switched to a table that
/// fails every I/O. Removed when dropped (deferred while a server still holds it).
struct DmOverLoop {
    name: String,
    loop_dev: String,
    sectors: u64,
    path: String,
}

impl DmOverLoop {
    #[track_caller]
    fn create(name: &str, file: &str) -> DmOverLoop {
        ensure_module("loop", "loop");
        ensure_module("dm-mod", "dm_mod");
        let out = run("losetup", &["--find", "--show", file]);
        let loop_dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let sectors = fs::metadata(file)
            .unwrap_or_else(|e| panic!("stat {file}: {e}"))
            .len()
            / 512;
        let mut dm = DmOverLoop {
            name: name.to_string(),
            loop_dev,
            sectors,
            path: String::new(),
        };
        let table = format!("0 {sectors} linear {} 0", dm.loop_dev);
        // No udev in the VM: dmsetup must not wait for it. The kernel's devtmpfs makes the
        // /dev/dm-N node.
        run(
            "dmsetup",
            &["--noudevsync", "create", name, "--table", &table],
        );
        let out = run(
            "dmsetup",
            &["info", "-c", "--noheadings", "-o", "blkdevname", name],
        );
        dm.path = format!("/dev/{}", String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            wait_until(Duration::from_secs(10), || Path::new(&dm.path).exists()),
            "{} of dm device {name} did not appear",
            dm.path
        );
        dm
    }

    fn path(&self) -> &str {
        &self.path
    }

    /// Replaces the table with `error`: every I/O fails from now on.
    #[track_caller]
    fn switch_to_error(&self) {
        let table = format!("0 {} error", self.sectors);
        run(
            "dmsetup",
            &["--noudevsync", "load", &self.name, "--table", &table],
        );
        run("dmsetup", &["--noudevsync", "resume", &self.name]);
    }
}

impl Drop for DmOverLoop {
    fn drop(&mut self) {
        // Don't panic here: this runs while unwinding from a failed test, maybe with the
        // server still holding the device (then both go away with its last user).
        let _ = Command::new("dmsetup")
            .args(["--noudevsync", "remove", "--deferred", &self.name])
            .output();
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .output();
    }
}

/// Loads module `name` unless `/sys/module/<sysfs_name>` shows it loaded (or built in).
#[track_caller]
fn ensure_module(name: &str, sysfs_name: &str) {
    if !Path::new("/sys/module").join(sysfs_name).exists() {
        load_module(name, &[]);
    }
}

// ---------------------------------------------------------------------------------------
// replace and rebuild
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_replaced_leg_rebuilds_under_fio() {
    let session = Session::start("mirror-replace");
    let files = child_files(&session.scratch, &[LEG; 3]);
    let (a, b, c) = (&files[0], &files[1], &files[2]);
    let expr = format!("mirror(file:{a},file:{b},assume_clean=true)");
    let dev = add_stack(&expr, &[]);
    let id = dev_id(&dev).to_string();
    let path = dev_path(&dev);
    let size = (LEG - DATA_OFFSET) as usize;
    // Data for the rebuild to copy.
    write_direct(path, 0, &pattern(size, 71));

    ublk(&["fail", &id, "/1"]);
    // Slow enough (15 s for the device) that fio runs while the rebuild is going on.
    ublk(&["rebuild", &id, "--rate", "1M"]);
    let replacement = format!("file:{c}");
    ublk(&["replace", &id, "/1", &replacement]);
    let status = status_json(&dev);
    let m = mirror_of(&status);
    assert_eq!(field_u64(m, "rebuild_rate"), MIB, "{status}");
    assert_eq!(field_str(m, "state"), "degraded", "{status}");
    let leg = &node_children(&status["tree"])[1];
    assert_eq!(field_str(leg, "state"), "rebuilding", "{status}");
    assert!(field_str(leg, "target").contains(c.as_str()), "{status}");
    assert_eq!(
        field_u64(&leg["rebuild"], "total_bytes"),
        size as u64,
        "{status}"
    );

    let watch_args = ["status", id.as_str(), "--watch"];
    let mut watch = Spawned::new(&ublk_bin(), &watch_args, None);
    let case = FioCase {
        rw: "randrw",
        blocks: &["--bsrange=512-64k", "--blockalign=512"],
        iodepth: 16,
        size: 4 * MIB,
    };
    let context = format!("fio on {expr} ({path}) while leg 1 is rebuilt from leg 0");
    run_fio(&case.args(path, true), &session.scratch, &context);
    let status = status_json(&dev);
    let leg = &node_children(&status["tree"])[1];
    assert_eq!(
        field_str(leg, "state"),
        "rebuilding",
        "the rebuild ended before fio did: fio did not run beside it all along: {status}"
    );

    // Unlimited: the rest is copied at once, and `--watch` returns.
    ublk(&["rebuild", &id, "--rate", "0"]);
    let Some(out) = watch.wait_timeout(SYNC_TIMEOUT) else {
        let out = watch.kill();
        panic!(
            "`ublk status --watch` still running {SYNC_TIMEOUT:?} after the rate limit was lifted\n{}",
            describe(&command_line("ublk", &watch_args), &out)
        );
    };
    let described = describe(&command_line("ublk", &watch_args), &out);
    assert!(out.status.success(), "{described}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a line that is not JSON ({e}): {l}\n{described}"))
        })
        .collect();
    let showed_progress = lines.iter().any(|line| {
        line["legs"].as_array().is_some_and(|legs| {
            legs.iter().any(|l| {
                let progress = (l["done_bytes"].as_u64(), l["total_bytes"].as_u64());
                l["leg"] == 1
                    && l["state"] == "rebuilding"
                    && matches!(progress, (Some(done), Some(total)) if done < total)
            })
        })
    });
    assert!(
        showed_progress,
        "no line shows leg 1 part-way through its rebuild\n{described}"
    );

    let status = wait_for_sync(&dev);
    assert!(
        field_str(&node_children(&status["tree"])[1], "target").contains(c.as_str()),
        "{status}"
    );
    assert!(
        field_u64(mirror_of(&status), "rebuild_copied_bytes") >= size as u64,
        "the rebuild copied less than the device: {status}"
    );
    let device = read_direct(path, 0, size);
    for (leg, file) in [(0, a), (1, c)] {
        assert_same(
            data_area(&read_file(file), &status),
            &device,
            &format!("leg {leg} ({file})'s data area vs the device after the rebuild"),
        );
    }
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_rebuild_never_reads_stale_or_blank_data() {
    let session = Session::start("mirror-stale-read");
    let files = child_files(&session.scratch, &[LEG; 2]);
    let expr = format!("mirror({},assume_clean=true)", file_leaves(&files));
    let dev = add_stack(&expr, &[]);
    let id = dev_id(&dev).to_string();
    let path = dev_path(&dev);
    let size = (LEG - DATA_OFFSET) as usize;

    let old = pattern(size, 61);
    write_direct(path, 0, &old);
    ublk(&["fail", &id, "/1"]);
    let new = pattern(size, 62);
    write_direct(path, 0, &new);
    let status = status_json(&dev);
    assert_same(
        data_area(&read_file(&files[1]), &status),
        &old,
        "the failed leg 1 (written before it failed, not after)",
    );

    // The replacement holds what leg 1 held on its first half (the old data) and zeroes
    // on the rest: a read served from it before the rebuild got there would show either.
    let replacement = session.scratch.join("replacement.img");
    let mut image = read_file(&files[1]);
    image.truncate((LEG / 2) as usize);
    image.resize(LEG as usize, 0);
    write_file(&replacement, &image);
    // 15 s for the device: time for several whole-device reads while it is rebuilt.
    ublk(&["rebuild", &id, "--rate", "1M"]);
    ublk(&[
        "replace",
        &id,
        "/1",
        &format!("file:{}", replacement.display()),
    ]);

    let mut during = Vec::new();
    while during.len() < 3 {
        let before = status_json(&dev);
        let Some(done) = rebuilt_bytes(&before, 1) else {
            break;
        };
        assert_reads_back(
            path,
            &new,
            &old,
            &format!("while leg 1 is rebuilt ({done} bytes done)"),
        );
        if let Some(done_after) = rebuilt_bytes(&status_json(&dev), 1) {
            during.push((done, done_after));
        }
    }
    assert!(
        during.len() >= 3
            && during
                .iter()
                .any(|&(done, _)| done > 0 && done < size as u64),
        "wanted 3 whole-device reads during the rebuild, some past its start; \
         got these (rebuilt bytes before, after): {during:?}"
    );
    ublk(&["rebuild", &id, "--rate", "0"]);
    let status = wait_for_sync(&dev);
    assert_reads_back(path, &new, &old, "after the rebuild");
    assert_same(
        data_area(
            &fs::read(&replacement).expect("read the replacement leg"),
            &status,
        ),
        &new,
        "the rebuilt leg 1's data area",
    );
    del(&dev);
}

/// Leg `leg`'s `rebuild.done_bytes` while it is rebuilding; `None` otherwise.
fn rebuilt_bytes(status: &Value, leg: usize) -> Option<u64> {
    let leg = &node_children(&status["tree"])[leg];
    (leg["state"] == "rebuilding").then(|| field_u64(&leg["rebuild"], "done_bytes"))
}

/// Reads the whole device at `path` from 4 threads at once (so that the mirror has reads
/// in flight to spread over its legs), each in 64 KiB O_DIRECT reads starting at a
/// different quarter, and checks that every sector is `expected`'s; a difference is
/// reported as old data (`stale`), zeroes, or other.
#[track_caller]
fn assert_reads_back(path: &str, expected: &[u8], stale: &[u8], when: &str) {
    const READ: usize = 64 * KIB as usize;
    const THREADS: usize = 4;
    let reads = expected.len() / READ;
    let bad: Vec<(usize, &str)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let file = open_direct(path, false);
                    let mut buf = AlignedBuf::new(READ);
                    let mut bad = Vec::new();
                    for i in 0..reads {
                        let at = (i + t * reads / THREADS) % reads * READ;
                        let buf = buf.as_mut_slice();
                        file.read_exact_at(buf, at as u64)
                            .unwrap_or_else(|e| panic!("read {READ} bytes at {at} of {path}: {e}"));
                        for (j, sector) in buf.chunks(512).enumerate() {
                            let off = at + j * 512;
                            if sector != &expected[off..off + 512] {
                                let kind = if sector == &stale[off..off + 512] {
                                    "stale"
                                } else if sector.iter().all(|&b| b == 0) {
                                    "zeroes"
                                } else {
                                    "other"
                                };
                                bad.push((off, kind));
                            }
                        }
                    }
                    bad
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("a reader thread panicked"))
            .collect()
    });
    if bad.is_empty() {
        return;
    }
    let summary: Vec<String> = ["stale", "zeroes", "other"]
        .iter()
        .filter_map(|kind| {
            let offsets: Vec<usize> = bad.iter().filter(|b| b.1 == *kind).map(|b| b.0).collect();
            let first = offsets.iter().min()?;
            Some(format!(
                "{} sectors read {kind}, the first at byte {first}",
                offsets.len()
            ))
        })
        .collect();
    panic!("reading {path} {when}: {}", summary.join("; "));
}

// ---------------------------------------------------------------------------------------
// unclean stop, flushes, reassembly
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_resyncs_only_the_dirty_regions_after_kill_9() {
    let session = Session::start("mirror-kill-9");
    let files = child_files(&session.scratch, &[2 * LEG; 2]);
    let expr = format!("mirror({},assume_clean=true)", file_leaves(&files));
    let dev = add_stack(&expr, &[]);
    let path = dev_path(&dev).to_string();
    let size = field_u64(&dev, "size");
    let before = status_json(&dev);
    let uuid = field_str(mirror_of(&before), "uuid").to_string();
    assert_eq!(field_u64(mirror_of(&before), "region"), MIB, "{before}");

    // Writes into [8M, 12M) only: 4 of the 31 regions.
    let written = 4 * MIB;
    let fio_args = [
        "--name=kill9",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--offset=8M",
        &format!("--size={written}"),
        "--time_based",
        "--runtime=60",
    ];
    kill_server_during_fio(&dev, &path, &fio_args, &session.scratch);

    let again = add_stack(&expr, &[]);
    let status = wait_for_sync(&again);
    let m = mirror_of(&status);
    assert_eq!(field_str(m, "uuid"), uuid, "reassembled: {status}");
    assert!(
        field_u64(m, "events") > field_u64(mirror_of(&before), "events"),
        "{before}\n{status}"
    );
    let copied = field_u64(&m["resync"], "copied_bytes");
    println!("resync after kill -9 during fio: {copied} bytes copied of a {size}-byte device");
    assert!(
        copied > 0 && copied <= written,
        "the resync copied {copied} bytes; fio was writing {written} bytes at 8M: {status}"
    );
    assert_eq!(field_u64(m, "rebuild_copied_bytes"), 0, "{status}");
    let device = read_direct(dev_path(&again), 0, size as usize);
    for (i, file) in files.iter().enumerate() {
        assert_same(
            data_area(&read_file(file), &status),
            &device,
            &format!("leg {i}'s data area vs the device after the resync"),
        );
    }

    // A clean stop (`ublk del`: SIGTERM) clears the bitmap: nothing to resync next time.
    del(&again);
    let clean = add_stack(&expr, &[]);
    let status = status_json(&clean);
    let m = mirror_of(&status);
    assert_eq!(
        field_u64(m, "dirty_regions"),
        0,
        "after a clean stop: {status}"
    );
    assert_eq!(field_u64(&m["resync"], "regions_left"), 0, "{status}");
    assert_eq!(field_u64(&m["resync"], "copied_bytes"), 0, "{status}");
    del(&clean);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_flush_reaches_every_leg() {
    let session = Session::start("mirror-flush");
    let files = child_files(&session.scratch, &[LEG; 3]);
    let expr = format!("mirror({},assume_clean=true)", file_leaves(&files));
    let dev = add_stack(&expr, &[]);
    let path = dev_path(&dev);
    let before = status_json(&dev);
    let case = FioCase {
        rw: "randwrite",
        blocks: &["--bs=4k"],
        iodepth: 1,
        size: MIB,
    };
    let mut args = case.args(path, true);
    args.push("--fsync=1".into());
    run_fio(&args, &session.scratch, &format!("fio --fsync=1 on {expr}"));
    let after = status_json(&dev);
    let flushes = |status: &Value, leg: Option<usize>| {
        let node = match leg {
            Some(i) => &node_children(&status["tree"])[i],
            None => &status["tree"],
        };
        stat(node, "flushes")
    };
    assert!(
        flushes(&after, None) > flushes(&before, None),
        "the mirror saw no flush: {before}\n{after}"
    );
    for i in 0..files.len() {
        assert!(
            flushes(&after, Some(i)) > flushes(&before, Some(i)),
            "no flush reached leg {i}: {before}\n{after}"
        );
    }
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn mirror_refuses_a_leg_of_another_mirror() {
    let session = Session::start("mirror-foreign-leg");
    let files = child_files(&session.scratch, &[LEG; 4]);
    let (a, b, c, d) = (&files[0], &files[1], &files[2], &files[3]);
    let mut uuids = Vec::new();
    for (x, y) in [(a, b), (c, d)] {
        let dev = add_stack(&format!("mirror(file:{x},file:{y},assume_clean=true)"), &[]);
        uuids.push(field_str(mirror_of(&status_json(&dev)), "uuid").to_string());
        del(&dev);
    }
    assert_ne!(uuids[0], uuids[1], "two new mirrors");

    let mixed = format!("mirror(file:{a},file:{d})");
    let sockets_before = control_sockets();
    let args = ["add", "stack", mixed.as_str()];
    let out = ublk_unchecked(&args);
    let mut problems = rejection_problems(&out, &[&["another mirror"], &["--force-new"]]);
    let listed = list();
    if !listed.is_empty() {
        problems.push(format!("devices listed afterwards: {}", json(&listed)));
    }
    let nodes = device_nodes();
    if !nodes.is_empty() {
        problems.push(format!("device nodes afterwards: {nodes:?}"));
    }
    if control_sockets() != sockets_before {
        problems.push(format!(
            "control sockets afterwards: {:?}",
            control_sockets()
        ));
    }
    assert!(
        problems.is_empty(),
        "{}\n{}",
        problems.join("; "),
        describe(&command_line("ublk", &args), &out)
    );

    let forced = add_stack(&mixed, &["--force-new"]);
    let status = wait_for_sync(&forced);
    let uuid = field_str(mirror_of(&status), "uuid").to_string();
    assert!(
        !uuids.contains(&uuid),
        "--force-new made mirror {uuid}; the old ones were {uuids:?}"
    );
    del(&forced);
    // The legs now carry the new mirror: it reassembles without --force-new.
    let again = add_stack(&mixed, &[]);
    let status = status_json(&again);
    assert_eq!(field_str(mirror_of(&status), "uuid"), uuid, "{status}");
    del(&again);
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// `file:A,file:B,...`
fn file_leaves(files: &[String]) -> String {
    files
        .iter()
        .map(|f| format!("file:{f}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `mirror` object of the root node of a `ublk status --json`.
#[track_caller]
fn mirror_of(status: &Value) -> &Value {
    let m = &status["tree"]["mirror"];
    assert!(m.is_object(), "the root is not a mirror: {status}");
    m
}

/// The state of leg `i` of the root mirror, as its child node shows it.
#[track_caller]
fn leg_state(status: &Value, i: usize) -> &str {
    let legs = node_children(&status["tree"]);
    assert!(i < legs.len(), "no leg {i}: {status}");
    assert_eq!(legs[i]["leg"], i, "leg {i}'s index: {status}");
    field_str(&legs[i], "state")
}

/// Waits until every leg of the root mirror of `dev` is in sync and nothing is left to
/// resync; returns that status.
#[track_caller]
fn wait_for_sync(dev: &Value) -> Value {
    let mut status = Value::Null;
    let synced = wait_until(SYNC_TIMEOUT, || {
        status = status_json(dev);
        let m = &status["tree"]["mirror"];
        m["state"] == "clean"
            && m["resync"]["regions_left"] == 0
            && node_children(&status["tree"])
                .iter()
                .all(|l| l["state"] == "in_sync")
    });
    assert!(synced, "not in sync after {SYNC_TIMEOUT:?}: {status}");
    status
}

/// The data area of a leg whose bytes are `leg`, per the mirror's status.
#[track_caller]
fn data_area<'a>(leg: &'a [u8], status: &Value) -> &'a [u8] {
    let offset = field_u64(mirror_of(status), "data_offset") as usize;
    let size = field_u64(&status["tree"], "size") as usize;
    assert!(
        offset + size <= leg.len(),
        "a leg of {} bytes has no data area [{offset}, +{size})",
        leg.len()
    );
    &leg[offset..offset + size]
}

#[track_caller]
fn read_file(path: &str) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}
