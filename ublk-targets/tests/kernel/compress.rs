//! `compress_*`: the compressing stack node on the real driver.
//!
//! fio verification with compressible and random data, lz4 and zstd, 4 KiB to 1 MiB
//! requests at iodepth 1 and 128, and the ratio `ublk status` shows for it; the extents of
//! 1 MiB writes packed, the data area holding little more than their bytes; ext4 with fsck
//! and a remount; discard punching the child file; `kill -9` of the server during fio with
//! periodic fsyncs, then `ublk check` and everything fsync'ed before the kill read back, on
//! the raw device and under ext4 (then `e2fsck -fn`); and compression over a mirror, read
//! back after a reopen and from either leg alone.

use super::*;

/// Logical size of the fio devices.
const SIZE: u64 = 64 * MIB;

/// What fio writes.
#[derive(Clone, Copy, Debug)]
enum Data {
    /// Half of every buffer random, half zeroes (`buffer_compress_percentage=50`), refilled
    /// for every write. With `--verify` fio fills each request this way as a whole, so a
    /// 1 MiB write makes 128 random blocks and 128 zero blocks.
    Compressible,
    /// Random bytes, refilled for every write: nothing to compress.
    Random,
}

impl Data {
    fn args(self) -> &'static [&'static str] {
        match self {
            Data::Compressible => &["--buffer_compress_percentage=50", "--refill_buffers"],
            Data::Random => &["--refill_buffers"],
        }
    }
}

/// A fio run of [`FioCase`] with the data it writes.
struct CompressFio {
    case: FioCase,
    data: Data,
}

impl CompressFio {
    fn args(&self, path: &str) -> Vec<String> {
        let mut args = self.case.args(path, true);
        args.extend(self.data.args().iter().map(|s| s.to_string()));
        args
    }
}

// ---------------------------------------------------------------------------------------
// fio with verification
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn compress_lz4_fio_verify() {
    compress_fio(
        ("lz4", "lz4"),
        0,
        &[
            CompressFio {
                case: FioCase {
                    rw: "randwrite",
                    blocks: &["--bs=4k"],
                    iodepth: 128,
                    size: 8 * MIB,
                },
                data: Data::Compressible,
            },
            CompressFio {
                case: FioCase {
                    rw: "randwrite",
                    blocks: &["--bs=1M"],
                    iodepth: 1,
                    size: 16 * MIB,
                },
                data: Data::Random,
            },
            CompressFio {
                case: FioCase {
                    rw: "randrw",
                    blocks: ANY_SIZE,
                    iodepth: 128,
                    size: 8 * MIB,
                },
                data: Data::Compressible,
            },
        ],
    );
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn compress_zstd_fio_verify() {
    // With 2 compression workers: zstd is where handing blocks to other threads pays.
    compress_fio(
        ("zstd", "zstd:3"),
        2,
        &[
            CompressFio {
                case: FioCase {
                    rw: "randwrite",
                    blocks: &["--bs=4k"],
                    iodepth: 1,
                    size: 2 * MIB,
                },
                data: Data::Compressible,
            },
            CompressFio {
                case: FioCase {
                    rw: "randwrite",
                    blocks: &["--bs=1M"],
                    iodepth: 128,
                    size: 16 * MIB,
                },
                data: Data::Compressible,
            },
            CompressFio {
                case: FioCase {
                    rw: "randrw",
                    blocks: ANY_SIZE,
                    iodepth: 1,
                    size: 4 * MIB,
                },
                data: Data::Random,
            },
        ],
    );
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn compress_packs_the_extents_of_large_writes() {
    // 8 MiB written 1 MiB at a time on a new image, verified by fio: the extents of each
    // request are packed, so the data area holds little more than the extents' bytes. With
    // whole-sector extents (format version 1) each of the 1,024 raw blocks would take 496
    // bytes more (508 KiB in all).
    let session = Session::start("compress-pack");
    let image = session.scratch.join("image.img").display().to_string();
    let dev = add(&["compress", "--path", &image, "--size", "16M"]);
    let run = CompressFio {
        case: FioCase {
            rw: "write",
            blocks: &["--bs=1M"],
            iodepth: 4,
            size: 8 * MIB,
        },
        data: Data::Compressible,
    };
    let path = dev_path(&dev);
    let args = run.args(path);
    let context = format!("fio {} on compress {path}", run.case.label());
    let (report, output) = run_fio(&args, &session.scratch, &context);
    let written = field_u64(&report["jobs"][0]["write"], "io_bytes");
    assert_eq!(
        written,
        8 * MIB,
        "{context}\n{}",
        describe(&command_line("fio", &args), &output)
    );
    let status = status_json(&dev);
    let c = compress_of(&status);
    let (data, stored, allocated) = (
        field_u64(c, "data_bytes"),
        field_u64(c, "stored_bytes"),
        field_u64(c, "allocated_bytes"),
    );
    println!("compress after {}: {c}", run.case.label());
    // fio's verify fills each 1 MiB request as a whole, half random and half zeroes: 128
    // random blocks (stored raw, 4,112 bytes each) and 128 blocks of zeroes (no extent).
    assert!(data >= 4 * MIB && stored >= data, "{status}");
    assert!(
        allocated >= stored && allocated - stored < 64 << 10,
        "allocated_bytes {allocated} against stored_bytes {stored}: {status}"
    );
    assert_eq!(field_u64(c, "format_version"), 2, "{status}");
    del(&dev);
    assert_check_clean(&image, "after packed writes and `ublk del`");
}

/// `ublk add compress` of [`SIZE`] with `--algo algo` and `--workers workers` over a new
/// file (the status names the algorithm `shown`), then each of `runs`: fio writes and
/// verifies. After the first run (4 KiB compressible writes), the status shows the data
/// compressed better than 1.5:1; after the last, the image checks clean.
fn compress_fio((algo, shown): (&str, &str), workers: u64, runs: &[CompressFio]) {
    let session = Session::start(&format!("compress-fio-{algo}"));
    let image = session.scratch.join("image.img").display().to_string();
    let dev = add(&[
        "compress",
        "--path",
        &image,
        "--size",
        &SIZE.to_string(),
        "--algo",
        algo,
        "--workers",
        &workers.to_string(),
    ]);
    assert_eq!(field_str(&dev, "target"), "compress", "add output: {dev}");
    assert_eq!(field_u64(&dev, "size"), SIZE, "add output: {dev}");
    let status = status_json(&dev);
    let c = compress_of(&status);
    assert_eq!(field_str(c, "algo"), shown, "{status}");
    assert_eq!(field_u64(c, "workers"), workers, "{status}");
    assert_eq!(field_u64(c, "logical_bytes"), SIZE, "{status}");
    assert_eq!(field_u64(c, "stored_bytes"), 0, "a new image: {status}");

    let path = dev_path(&dev);
    let mut passed = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let label = format!("{} {:?}", run.case.label(), run.data);
        let context = format!("fio {label} on compress {algo} {path} (passed before: {passed:?})");
        let started = Instant::now();
        let args = run.args(path);
        let (report, output) = run_fio(&args, &session.scratch, &context);
        let job = &report["jobs"][0];
        let written = field_u64(&job["write"], "io_bytes");
        let read = field_u64(&job["read"], "io_bytes");
        assert!(
            fio_moved_expected_bytes(&run.case, true, written, read),
            "{context}: wrote {written}, read {read}\n{}",
            describe(&command_line("fio", &args), &output)
        );
        println!("ok: {label} ({:.1} s)", started.elapsed().as_secs_f64());
        if i == 0 {
            let status = status_json(&dev);
            let c = compress_of(&status);
            let (data, stored) = (field_u64(c, "data_bytes"), field_u64(c, "stored_bytes"));
            let ratio = c["ratio"].as_f64().expect("a ratio");
            println!("compress {algo} after {label}: {c}");
            assert!(
                data >= run.case.size / 2 && stored > 0 && stored < data,
                "data_bytes {data}, stored_bytes {stored} after {label}: {status}"
            );
            assert!(
                ratio > 1.5 && (ratio - data as f64 / stored as f64).abs() < 0.01,
                "ratio {ratio} of half-compressible data: {status}"
            );
        }
        passed.push(label);
    }
    del(&dev);
    assert_check_clean(&image, "after fio and `ublk del`");
}

// ---------------------------------------------------------------------------------------
// ext4
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn compress_ext4_survives_fsck_and_remount() {
    let session = Session::start("compress-ext4");
    let image = session.scratch.join("image.img").display().to_string();
    let dev = add(&["compress", "--path", &image, "--size", "256M"]);
    ext4_files_survive(dev_path(&dev), &session.scratch);
    let status = status_json(&dev);
    let c = compress_of(&status);
    assert!(
        field_u64(c, "data_bytes") >= 9 * MIB,
        "the files' 9 MiB of random data: {status}"
    );
    del(&dev);
    assert_check_clean(&image, "after ext4 and `ublk del`");
}

// ---------------------------------------------------------------------------------------
// discard
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn compress_discard_frees_child_space() {
    use std::os::unix::fs::MetadataExt;
    let session = Session::start("compress-discard");
    let image = session.scratch.join("image.img");
    let image_str = image.display().to_string();
    let dev = add(&["compress", "--path", &image_str, "--size", "64M"]);
    let path = dev_path(&dev);
    let allocated = || fs::metadata(&image).expect("the image file").blocks() * 512;
    let empty = allocated();

    let data = random_bytes(16 * MIB as usize);
    write_direct(path, 0, &data);
    flush(path);
    let written = allocated();
    assert!(
        written >= empty + 16 * MIB,
        "{image_str}: {empty} bytes allocated when new, {written} after 16 MiB were written"
    );

    run("blkdiscard", &[path]);
    flush(path);
    // The freed pages are punched after the commit, by discards the queue sends.
    let mut now = written;
    let shrunk = wait_until(Duration::from_secs(10), || {
        now = allocated();
        now < empty + MIB
    });
    let status = status_json(&dev);
    assert!(
        shrunk,
        "{image_str}: {empty} bytes allocated when new, {written} with 16 MiB of data, \
         {now} after blkdiscard and a flush: {status}"
    );
    let c = compress_of(&status);
    assert_eq!(field_u64(c, "stored_bytes"), 0, "{status}");
    assert_eq!(field_u64(c, "data_bytes"), 0, "{status}");
    assert!(
        read_direct(path, 0, data.len()).iter().all(|&b| b == 0),
        "the discarded device does not read as zeroes"
    );
    del(&dev);
    assert_check_clean(&image_str, "after blkdiscard and `ublk del`");
}

/// fsync of the block device: the kernel sends the device a FLUSH.
#[track_caller]
fn flush(path: &str) {
    File::open(path)
        .and_then(|f| f.sync_all())
        .unwrap_or_else(|e| panic!("fsync {path}: {e}"));
}

// ---------------------------------------------------------------------------------------
// kill -9
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn compress_kill_9_during_fio_keeps_what_was_fsynced() {
    let session = Session::start("compress-kill-9");
    let image = session.scratch.join("image.img").display().to_string();
    let dev = add(&["compress", "--path", &image, "--size", "64M"]);
    let path = dev_path(&dev).to_string();

    // Pass 1: [0, 8M) written with verify headers and fsync'ed (every 16 writes and at
    // the end), not verified yet.
    run_fio(
        &fsynced_fio(&path, false),
        &session.scratch,
        "fio pass 1 (fsync'ed)",
    );

    // Pass 2: 4k writes into [16M, 24M) with an fsync every 64 writes, until the kill.
    let second = [
        "--name=killed",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--offset=16M",
        "--size=8M",
        "--fsync=64",
        "--buffer_compress_percentage=50",
        "--refill_buffers",
        "--time_based",
        "--runtime=60",
    ];
    kill_server_during_fio(&dev, &path, &second, &session.scratch);

    assert_check_clean(&image, "after kill -9 of the server during fio");
    let again = add(&["compress", "--path", &image]);
    assert_eq!(field_u64(&again, "size"), SIZE, "reopened: {again}");
    let again_path = dev_path(&again);
    run_fio(
        &fsynced_fio(again_path, true),
        &session.scratch,
        "fio --verify_only of pass 1 (fsync'ed before the kill)",
    );
    // Every block reads: none of pass 2's, fsync'ed or not, is damaged.
    read_direct(again_path, 0, SIZE as usize);
    del(&again);
    assert_check_clean(&image, "after the reopened image was stopped cleanly");
}

/// ext4 on a compressed device, the server killed while fio writes a file with periodic
/// fsyncs: the image checks clean, the file system mounts again (replaying its journal),
/// the files fsync'ed before the kill read back, and `e2fsck -fn` finds nothing to fix.
#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn compress_ext4_kill_9_fscks_clean_and_keeps_fsynced_files() {
    let session = Session::start("compress-ext4-kill-9");
    let image = session.scratch.join("image.img").display().to_string();
    let dev = add(&["compress", "--path", &image, "--size", "128M"]);
    let path = dev_path(&dev).to_string();
    run("mkfs.ext4", &["-q", "-F", &path]);
    let mountpoint = session.scratch.join("mnt");
    fs::create_dir(&mountpoint).expect("create the mount point");
    let mnt = Mounted::new(&path, &mountpoint);

    // Before the kill: small files, each fsync'ed, and a file fio writes with verify
    // headers, fsync'ed every 16 writes and at the end.
    let kept = mountpoint.join("kept");
    fs::create_dir(&kept).expect("create the directory of fsync'ed files");
    for i in 0..64 {
        let mut bytes = format!("fsync'ed file {i}\n").repeat(i * 13).into_bytes();
        bytes.extend(random_bytes(i * 100));
        let file = kept.join(format!("file-{i:02}"));
        File::create(&file)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &bytes)?;
                f.sync_all()
            })
            .unwrap_or_else(|e| panic!("write and fsync {}: {e}", file.display()));
    }
    File::open(&kept)
        .and_then(|d| d.sync_all())
        .expect("fsync the directory of kept files");
    let files = files_under(&kept);
    let sums = sha256sums(&kept, &files);
    let fio_file = |dir: &Path, name: &str| dir.join(name).display().to_string();
    let fsynced = fio_file(&mountpoint, "fsynced.dat");
    run_fio(
        &fsynced_fio(&fsynced, false),
        &session.scratch,
        "fio on ext4 (fsync'ed)",
    );

    // Until the kill: 4 KiB random writes into another file, an fsync every 64 writes.
    let churn = format!("--filename={}", fio_file(&mountpoint, "churn.dat"));
    let killed = [
        "--name=killed",
        churn.as_str(),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--fsync=64",
        "--buffer_compress_percentage=50",
        "--refill_buffers",
        "--time_based",
        "--runtime=60",
    ];
    kill_during_fio(&dev, &path, &killed, &session.scratch);
    // The dead device's file system (its writes fail from here on) goes first: the kernel
    // keeps a device until its last user lets go.
    mnt.unmount();
    del_killed(&dev);

    assert_check_clean(&image, "after kill -9 of the server under ext4");
    let again = add(&["compress", "--path", &image]);
    let again_path = dev_path(&again).to_string();
    // Mounting replays the journal; what it committed is what the fsyncs made durable.
    let mnt = Mounted::new(&again_path, &mountpoint);
    assert_eq!(
        files_under(&kept),
        files,
        "the fsync'ed files after the kill and a remount"
    );
    let sums_after = sha256sums(&kept, &files);
    assert!(
        sums == sums_after,
        "fsync'ed files changed across the kill:\nbefore:\n{sums}\nafter:\n{sums_after}"
    );
    run_fio(
        &fsynced_fio(&fsynced, true),
        &session.scratch,
        "fio --verify_only of the file fsync'ed before the kill",
    );
    mnt.unmount();
    run("e2fsck", &["-fn", &again_path]);
    del(&again);
    assert_check_clean(&image, "after the reopened image was stopped cleanly");
}

/// fio writing the first 8 MiB of `file` with verify headers, fsync'ed every 16 writes and
/// at the end (not verified then); with `verify_only`, the run that verifies them.
fn fsynced_fio(file: &str, verify_only: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--name=fsynced",
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=16",
        "--offset=0",
        "--size=8M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--buffer_compress_percentage=50",
        "--refill_buffers",
        "--output-format=json",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--filename={file}"));
    if verify_only {
        args.extend(["--verify_only", "--do_verify=1"].map(String::from));
    } else {
        args.extend(["--fsync=16", "--end_fsync=1", "--do_verify=0"].map(String::from));
    }
    args
}

// ---------------------------------------------------------------------------------------
// over a mirror
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn compress_of_a_mirror_fio_verify() {
    let session = Session::start("compress-mirror");
    let legs = child_files(&session.scratch, &[48 * MIB; 2]);
    let expr = format!(
        "compress(mirror(file:{},file:{},assume_clean=true),size=32M,algo=zstd)",
        legs[0], legs[1]
    );
    let dev = add_stack(&expr, &[]);
    let status = status_json(&dev);
    assert_eq!(field_str(&status["tree"], "kind"), "compress", "{status}");
    assert_eq!(
        field_str(&node_children(&status["tree"])[0], "kind"),
        "mirror",
        "{status}"
    );
    assert_eq!(field_u64(compress_of(&status), "logical_bytes"), 32 * MIB);

    let run = CompressFio {
        case: FioCase {
            rw: "randwrite",
            blocks: ANY_SIZE,
            iodepth: 32,
            size: 8 * MIB,
        },
        data: Data::Compressible,
    };
    let path = dev_path(&dev);
    run_fio(&run.args(path), &session.scratch, &format!("fio on {expr}"));
    del(&dev);

    // Reopened (the mirror reassembled, the image found on it), then with leg 0 failed:
    // leg 1 alone holds the image.
    let again = add_stack(&expr, &[]);
    let path = dev_path(&again);
    let mut verify = run.args(path);
    verify.push("--verify_only".into());
    run_fio(
        &verify,
        &session.scratch,
        &format!("fio --verify_only on {expr} reopened"),
    );
    ublk(&["fail", &dev_id(&again).to_string(), "/0/0"]);
    let status = status_json(&again);
    let legs_status = node_children(&node_children(&status["tree"])[0]);
    assert_eq!(field_str(&legs_status[0], "state"), "faulty", "{status}");
    run_fio(
        &verify,
        &session.scratch,
        &format!("fio --verify_only on {expr} with leg 0 failed"),
    );
    del(&again);
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// The `compress` object of the root node of a `ublk status --json`.
#[track_caller]
fn compress_of(status: &Value) -> &Value {
    let c = &status["tree"]["compress"];
    assert!(c.is_object(), "the root is not a compress node: {status}");
    c
}

/// `ublk check compress:IMAGE` exits 0 and says `clean`.
#[track_caller]
fn assert_check_clean(image: &str, when: &str) {
    let target = format!("compress:{image}");
    let args = ["check", target.as_str()];
    let out = ublk_unchecked(&args);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains(": clean"),
        "{when}: {}",
        describe(&command_line("ublk", &args), &out)
    );
    println!("{when}:\n{report}");
}
