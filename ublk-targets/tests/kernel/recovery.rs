//! `recovery_*`: user recovery (`ublk add --recovery`, `ublk recover`) on the real driver.
//!
//! `kill -9` of the server while fio writes with `--verify=crc32c` to file, ram, stripe and
//! mirror devices: with `reissue` the I/O waits, `ublk recover` starts a new server from
//! the saved state, fio finishes and its verify passes (a compressing device keeps what was
//! flushed before the kill);
//! with `fail-io` the I/O fails at once while no server runs, and after the recovery new
//! I/O works and the data written before is intact. `ublk recover` is refused, changing
//! nothing, on a live device, on a device added without `--recovery`, and without saved
//! state; `ublk del` removes a dead server's device with its saved state and RAM file.
//! `ublk upgrade` (QUIESCE_DEV, then a new server) replaces a running server twice while fio
//! writes with `--verify`, and is refused for a device without `--recovery`.

use super::*;

/// Size of the recovered devices (and of fio's region).
const SIZE: &str = "32M";

/// Where `ublk add --recovery` saves device `id`'s state.
fn state_file(id: u64) -> PathBuf {
    Path::new("/run/ublk").join(format!("ublk{id}.json"))
}

/// The saved state of `dev`, which must exist.
#[track_caller]
fn saved_state(dev: &Value) -> Value {
    let path = state_file(dev_id(dev));
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("no saved state at {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

/// The files the tool created for a device (and `ublk del` removes), from its saved state.
fn owned_files(saved: &Value) -> Vec<PathBuf> {
    saved["owned_files"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The device's `state` in `ublk list --json`.
#[track_caller]
fn listed_state(id: u64) -> String {
    let listed = list();
    let entry = listed_entry(&listed, id)
        .unwrap_or_else(|| panic!("device {id} not listed: {}", json(&listed)));
    field_str(entry, "state").to_string()
}

/// Kills `dev`'s server with SIGKILL and waits for the kernel to take the device out of
/// service: the state becomes `want` (QUIESCED or FAIL_IO) and the block device stays.
#[track_caller]
fn kill_server(dev: &Value, want: &str) {
    let pid = server_pid(dev);
    run("kill", &["-KILL", &pid.to_string()]);
    assert!(
        wait_until(Duration::from_secs(30), || process_gone(pid)),
        "server {pid} still running 30 s after SIGKILL: {}",
        process_status(pid)
    );
    let id = dev_id(dev);
    assert!(
        wait_until(Duration::from_secs(30), || listed_state(id) == want),
        "device {id} is {} 30 s after its server was killed, not {want}",
        listed_state(id)
    );
    assert!(
        Path::new(dev_path(dev)).exists(),
        "{} went away with its server",
        dev_path(dev)
    );
}

/// `ublk recover ID`, which must succeed: returns the new server's device JSON.
#[track_caller]
fn recover(dev: &Value) -> Value {
    let id = dev_id(dev).to_string();
    let args = ["recover", id.as_str()];
    let new = parse_json(&ublk(&args), &command_line("ublk", &args));
    assert_eq!(dev_id(&new), dev_id(dev), "recovered another device: {new}");
    assert_eq!(dev_path(&new), dev_path(dev), "recovered: {new}");
    assert_ne!(
        server_pid(&new),
        server_pid(dev),
        "the recovered device reports the dead server: {new}"
    );
    assert!(
        !process_gone(server_pid(&new)),
        "the new server exited: {new}"
    );
    assert_eq!(listed_state(dev_id(dev)), "LIVE", "after `ublk recover`");
    new
}

/// fio writing the whole device once with 4 KiB random writes and crc32c headers, then
/// reading it all back and verifying every block.
fn verify_fio(path: &str, size: u64) -> Vec<String> {
    [
        "--name=recovery",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        &format!("--size={size}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]
    .map(String::from)
    .to_vec()
}

/// [`reissue_under_fio_sized`] over 32 MiB, killed once 512 writes completed.
fn reissue_under_fio(name: &str, args: &[&str]) {
    reissue_under_fio_sized(name, args, 32 * MIB, 512);
}

/// Adds a device with `args` and `--recovery reissue`, kills its server once `going` of
/// fio's writes over the first `size` bytes completed, checks the I/O waits, recovers it,
/// and lets fio finish: its verify must pass. Then `ublk del` removes the device, its saved
/// state and `owned` files.
pub(super) fn reissue_under_fio_sized(name: &str, args: &[&str], size: u64, going: u64) {
    let session = Session::start(name);
    let dev = add(&[args, &["--recovery"]].concat());
    let flags = dev["flags"].to_string();
    assert!(
        flags.contains("\"USER_RECOVERY\"") && flags.contains("USER_RECOVERY_REISSUE"),
        "add --recovery: {dev}"
    );
    let saved = saved_state(&dev);
    assert_eq!(saved["recovery"], "reissue", "saved state: {saved}");
    let owned = owned_files(&saved);
    let path = dev_path(&dev).to_string();

    let ios_before = completed_ios(&path);
    let mut fio = FioRun::start(&verify_fio(&path, size), &session.scratch);
    let going = wait_until(Duration::from_secs(60), || {
        completed_ios(&path) > ios_before + going || !fio.is_running()
    });
    assert!(
        going && fio.is_running(),
        "fio did not get going on {path}\n{}",
        fio.kill()
    );
    kill_server(&dev, "QUIESCED");
    // No server: the I/O waits instead of failing, so fio neither ends nor progresses.
    let stalled = completed_ios(&path);
    sleep(Duration::from_secs(2));
    assert!(fio.is_running(), "fio ended while the device had no server");
    assert_eq!(
        completed_ios(&path),
        stalled,
        "I/O completed while the device had no server"
    );

    let new = recover(&dev);
    let (report, _) = fio.finish("fio across kill -9 and `ublk recover`");
    let written = report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0);
    assert_eq!(
        written, size,
        "fio wrote {written} bytes, not the {size} it was given"
    );

    del(&new);
    assert!(
        !state_file(dev_id(&dev)).exists(),
        "`ublk del` left the saved state"
    );
    for file in owned {
        assert!(
            !file.exists(),
            "`ublk del` left the device's file {}",
            file.display()
        );
    }
}

/// A scratch directory of child image files for a stack, removed when dropped.
struct Children {
    dir: PathBuf,
    files: Vec<String>,
}

impl Children {
    /// Files of `sizes` bytes in a fresh `ublk-NAME` directory under the temp dir.
    fn new(name: &str, sizes: &[u64]) -> Children {
        let dir = std::env::temp_dir().join(format!("ublk-{name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let files = child_files(&dir, sizes);
        Children { dir, files }
    }

    /// A 64 KiB-chunk stripe of two 16 MiB files.
    fn stripe(name: &str) -> (Children, String) {
        let c = Children::new(name, &[16 * MIB, 16 * MIB]);
        let expr = format!("stripe(file:{},file:{},chunk=64K)", c.files[0], c.files[1]);
        (c, expr)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_reissue_ram_under_fio_verify() {
    reissue_under_fio("recovery-ram", &["ram", "--size", SIZE]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_reissue_file_under_fio_verify() {
    let file = std::env::temp_dir().join("ublk-recovery-file.img");
    let _ = fs::remove_file(&file);
    let path = file.display().to_string();
    reissue_under_fio(
        "recovery-file",
        &["file", "--path", &path, "--size", SIZE, "--direct"],
    );
    let _ = fs::remove_file(&file);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_reissue_stripe_under_fio_verify() {
    let (_children, expr) = Children::stripe("recovery-stripe");
    reissue_under_fio("recovery-stripe", &["stack", &expr]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_reissue_mirror_under_fio_verify() {
    // Legs a little larger than the 32 MiB fio writes: the mirror keeps its metadata there.
    let legs = Children::new("recovery-mirror", &[40 * MIB, 40 * MIB]);
    let expr = format!("mirror(file:{},file:{})", legs.files[0], legs.files[1]);
    reissue_under_fio("recovery-mirror", &["stack", &expr]);
}

/// The compressing target keeps its newest map entries in the server's memory until a
/// flush (it advertises a volatile write cache), so what a killed server had acknowledged
/// but not flushed may be lost, as on a disk that loses power. What was flushed survives
/// the kill and the recovery, and I/O in flight at the kill waits and then completes.
#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_reissue_compress_keeps_flushed_data() {
    let session = Session::start("recovery-compress");
    let file = std::env::temp_dir().join("ublk-recovery-compress.img");
    let _ = fs::remove_file(&file);
    let image = file.display().to_string();
    let dev = add(&["compress", "--path", &image, "--size", SIZE, "--recovery"]);
    let path = dev_path(&dev).to_string();
    let flushed = |verify_only: bool| -> Vec<String> {
        let mut args = [
            "--name=flushed",
            &format!("--filename={path}"),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=json",
        ]
        .map(String::from)
        .to_vec();
        if verify_only {
            args.extend(["--verify_only", "--do_verify=1"].map(String::from));
        } else {
            args.extend(["--end_fsync=1", "--do_verify=0"].map(String::from));
        }
        args
    };
    run_fio(
        &flushed(false),
        &session.scratch,
        "fio writing and flushing [0, 8M)",
    );

    let in_flight = [
        "--name=inflight",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--offset=16M",
        "--size=8M",
        "--output-format=json",
    ]
    .map(String::from)
    .to_vec();
    let ios_before = completed_ios(&path);
    let mut fio = FioRun::start(&in_flight, &session.scratch);
    let going = wait_until(Duration::from_secs(60), || {
        completed_ios(&path) > ios_before + 256 || !fio.is_running()
    });
    assert!(
        going && fio.is_running(),
        "fio did not get going on {path}\n{}",
        fio.kill()
    );
    kill_server(&dev, "QUIESCED");
    sleep(Duration::from_secs(1));
    assert!(fio.is_running(), "fio ended while the device had no server");
    let new = recover(&dev);
    fio.finish("fio writing across kill -9 and `ublk recover`");
    run_fio(
        &flushed(true),
        &session.scratch,
        "fio verifying [0, 8M) after the recovery",
    );
    del(&new);
    let _ = fs::remove_file(&file);
}

/// `fail-io`: the data written before the kill survives, I/O fails at once (EIO) while no
/// server runs, and works again after `ublk recover`.
fn fail_io_round_trip(name: &str, args: &[&str]) {
    let session = Session::start(name);
    let dev = add(&[args, &["--recovery", "fail-io"]].concat());
    assert!(
        dev["flags"].to_string().contains("USER_RECOVERY_FAIL_IO"),
        "add --recovery fail-io: {dev}"
    );
    let path = dev_path(&dev).to_string();
    let before = pattern(4 * MIB as usize, 21);
    write_direct(&path, 0, &before);

    // fio writing elsewhere when the server dies must fail, not hang.
    let fio_args = [
        "--name=failio",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--offset=8M",
        "--size=16M",
        "--time_based",
        "--runtime=120",
    ];
    let ios_before = completed_ios(&path);
    let mut fio = Spawned::new("fio", &fio_args, Some(&session.scratch));
    let going = wait_until(Duration::from_secs(60), || {
        completed_ios(&path) > ios_before + 256 || !fio.is_running()
    });
    assert!(
        going && fio.is_running(),
        "fio did not get going on {path}\n{}",
        describe(&command_line("fio", &fio_args), &fio.kill())
    );
    kill_server(&dev, "FAIL_IO");
    let Some(out) = fio.wait_timeout(Duration::from_secs(30)) else {
        panic!(
            "fio still running 30 s after the server of a fail-io device died\n{}",
            describe(&command_line("fio", &fio_args), &fio.kill())
        )
    };
    assert!(
        !out.status.success(),
        "fio succeeded although the device failed its I/O\n{}",
        describe(&command_line("fio", &fio_args), &out)
    );
    let started = Instant::now();
    let mut buf = AlignedBuf::new(4096);
    let read = open_direct(&path, false).read_exact_at(buf.as_mut_slice(), 0);
    assert!(
        read.is_err(),
        "a read succeeded on a fail-io device without a server"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a read took {:?} to fail on a fail-io device without a server",
        started.elapsed()
    );

    let new = recover(&dev);
    assert_same(
        &read_direct(&path, 0, before.len()),
        &before,
        "data written before the kill, after `ublk recover`",
    );
    let after = pattern(2 * MIB as usize, 22);
    write_direct(&path, 24 * MIB, &after);
    assert_same(
        &read_direct(&path, 24 * MIB, after.len()),
        &after,
        "data written after `ublk recover`",
    );
    del(&new);
    assert!(
        !state_file(dev_id(&dev)).exists(),
        "`ublk del` left the saved state"
    );
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_fail_io_ram() {
    fail_io_round_trip("recovery-failio-ram", &["ram", "--size", SIZE]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_fail_io_file() {
    let file = std::env::temp_dir().join("ublk-recovery-failio.img");
    let _ = fs::remove_file(&file);
    let path = file.display().to_string();
    fail_io_round_trip(
        "recovery-failio-file",
        &["file", "--path", &path, "--size", SIZE],
    );
    let _ = fs::remove_file(&file);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_fail_io_stripe() {
    let (_children, expr) = Children::stripe("recovery-failio-stripe");
    fail_io_round_trip("recovery-failio-stripe", &["stack", &expr]);
}

/// `ublk recover` refuses, and changes nothing, where there is nothing to recover or nothing
/// to recover it from.
#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_refused_on_live_devices_and_without_saved_state() {
    let _session = Session::start("recovery-refused");
    let refused = |dev: &Value, mentions: &str| {
        let id = dev_id(dev).to_string();
        let out = ublk_unchecked(&["recover", &id]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(mentions) && out.stdout.is_empty(),
            "`ublk recover {id}` should be refused with {mentions:?}\n{}",
            describe(&format!("ublk recover {id}"), &out)
        );
    };

    // Live: the server keeps serving the same data.
    let live = add(&["ram", "--size", "8M", "--recovery"]);
    let data = pattern(MIB as usize, 31);
    write_direct(dev_path(&live), 0, &data);
    refused(&live, "is live");
    assert_eq!(listed_state(dev_id(&live)), "LIVE");
    assert!(!process_gone(server_pid(&live)), "the live server exited");
    assert_same(
        &read_direct(dev_path(&live), 0, data.len()),
        &data,
        "the live device after a refused recover",
    );

    // Added without --recovery.
    let plain = add(&["ram", "--size", "8M"]);
    refused(&plain, "without --recovery");
    assert!(
        !state_file(dev_id(&plain)).exists(),
        "a device without --recovery has saved state"
    );
    del(&plain);

    // Without saved state: refused, still QUIESCED; with the state back, recovered.
    kill_server(&live, "QUIESCED");
    let state = state_file(dev_id(&live));
    let aside = state.with_extension("aside");
    fs::rename(&state, &aside).expect("move the saved state aside");
    refused(&live, "no saved state");
    assert_eq!(listed_state(dev_id(&live)), "QUIESCED");
    fs::rename(&aside, &state).expect("put the saved state back");
    let new = recover(&live);
    assert_same(
        &read_direct(dev_path(&new), 0, data.len()),
        &data,
        "the device recovered after a refusal",
    );
    del(&new);
}

/// A server killed without `--recovery` takes its device's I/O with it, and `ublk del` then
/// removes the device; with `--recovery`, `ublk del` removes the waiting device, its saved
/// state and its memory file.
#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_del_cleans_up_after_kill_9() {
    let _session = Session::start("recovery-del");
    for extra in [&[][..], &["--recovery"][..]] {
        let dev = add(&[&["ram", "--size", "8M"][..], extra].concat());
        let owned: Vec<PathBuf> = if extra.is_empty() {
            Vec::new()
        } else {
            let saved = saved_state(&dev);
            let files = owned_files(&saved);
            assert!(
                files
                    .iter()
                    .all(|f| f.starts_with("/dev/shm") && f.exists()),
                "a recoverable RAM device's memory is not a file under /dev/shm: {saved}"
            );
            assert_eq!(files.len(), 1, "saved state: {saved}");
            files
        };
        let pid = server_pid(&dev);
        run("kill", &["-KILL", &pid.to_string()]);
        assert!(
            wait_until(Duration::from_secs(30), || process_gone(pid)),
            "server {pid} still running 30 s after SIGKILL"
        );
        for file in &owned {
            assert!(
                file.exists(),
                "{} did not outlive the server",
                file.display()
            );
        }
        del(&dev);
        assert_device_gone(&dev, "after kill -9 and `ublk del`");
        assert!(
            !state_file(dev_id(&dev)).exists(),
            "`ublk del` left the saved state"
        );
        for file in &owned {
            assert!(!file.exists(), "`ublk del` left {}", file.display());
        }
    }
}

/// After `ublk replace` the saved state names the new leg, so the server `ublk recover`
/// starts serves the tree as it stood: the new leg, in sync, with the data.
#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_of_a_mirror_after_replace_keeps_the_new_leg() {
    let _session = Session::start("recovery-replace");
    let dir = std::env::temp_dir().join("ublk-recovery-replace");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the mirror's directory");
    let files = child_files(&dir, &[24 * MIB, 24 * MIB, 24 * MIB]);
    let expr = format!("mirror(file:{},file:{})", files[0], files[1]);
    let dev = add(&["stack", &expr, "--recovery"]);
    let id = dev_id(&dev).to_string();
    let data = pattern(8 * MIB as usize, 41);
    write_direct(dev_path(&dev), 0, &data);

    ublk(&["fail", &id, "/1"]);
    ublk(&["replace", &id, "/1", &format!("file:{}", files[2])]);
    ublk(&["status", &id, "--watch", "--json"]);
    let saved = saved_state(&dev);
    let args = saved["args"].to_string();
    assert!(
        args.contains(files[2].as_str()) && !args.contains(files[1].as_str()),
        "the saved state does not follow the replacement: {saved}"
    );

    kill_server(&dev, "QUIESCED");
    let new = recover(&dev);
    let status = status_json(&new);
    let legs = node_children(&status["tree"]);
    assert!(
        field_str(&legs[1], "target").contains(files[2].as_str()),
        "the recovered mirror's leg 1 is not the replacement: {status}"
    );
    for leg in legs {
        assert_eq!(field_str(leg, "state"), "in_sync", "{status}");
    }
    assert_same(
        &read_direct(dev_path(&new), 0, data.len()),
        &data,
        "the recovered mirror after a replace",
    );
    del(&new);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn recovery_upgrade_replaces_the_server_under_fio_verify() {
    let session = Session::start("recovery-upgrade");
    let dev = add(&["ram", "--size", "8M"]);
    // Refused without --recovery, nothing changed.
    let id = dev_id(&dev).to_string();
    let out = ublk_unchecked(&["upgrade", &id]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--recovery"),
        "`ublk upgrade` of a device without --recovery: {}",
        describe("ublk upgrade", &out)
    );
    assert!(
        !process_gone(server_pid(&dev)),
        "the server exited after a refusal"
    );
    del(&dev);

    let backing = session.scratch.join("upgrade.img");
    fs::write(&backing, vec![0u8; 32 * MIB as usize]).expect("create the backing file");
    let backing = backing.to_str().expect("utf-8 path").to_string();
    let dev = add(&["file", "--path", &backing, "--recovery"]);
    let flags = dev["flags"].to_string();
    assert!(flags.contains("\"QUIESCE\""), "add --recovery: {dev}");
    let path = dev_path(&dev).to_string();
    let ios_before = completed_ios(&path);
    let mut fio = FioRun::start(&verify_fio(&path, 32 * MIB), &session.scratch);
    let going = wait_until(Duration::from_secs(60), || {
        completed_ios(&path) > ios_before + 512 || !fio.is_running()
    });
    assert!(
        going && fio.is_running(),
        "fio did not get going on {path}\n{}",
        fio.kill()
    );
    let id = dev_id(&dev).to_string();
    let args = ["upgrade", id.as_str()];
    let new = parse_json(&ublk(&args), &command_line("ublk", &args));
    assert_eq!(dev_id(&new), dev_id(&dev), "upgraded another device: {new}");
    assert_ne!(
        server_pid(&new),
        server_pid(&dev),
        "the upgraded device reports the old server: {new}"
    );
    assert!(process_gone(server_pid(&dev)), "the old server still runs");
    assert_eq!(listed_state(dev_id(&dev)), "LIVE", "after `ublk upgrade`");
    let (report, _) = fio.finish("fio across `ublk upgrade`");
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio: {job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    assert_eq!(written, 32 * MIB, "fio wrote {written} bytes");
    // The new server can be upgraded again.
    let newer = parse_json(&ublk(&args), &command_line("ublk", &args));
    assert_ne!(
        server_pid(&newer),
        server_pid(&new),
        "second upgrade: {newer}"
    );
    del(&newer);
}
