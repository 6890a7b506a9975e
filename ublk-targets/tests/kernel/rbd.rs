//! `rbd_*`: the Ceph RBD target against a real cluster in the VM — one monitor and three
//! memstore OSDs on 127.0.0.1, a pool `rbd` of size 3, started once (by
//! `ceph-test-cluster`) for all these tests.
//!
//! fio verification through `ublk add rbd` with 1 and 2 queues (4k to 1M, iodepth 1 and
//! 128); ext4 with fsck and a remount; discard and write-zeroes reading back as zeroes; an
//! OSD killed while fio verifies, fio seeing no error; a snapshot mapped read-only with its
//! own data; monitors that do not answer, a missing pool and a missing image refused at
//! `add` with an error naming them and no device left behind; a mirror of an RBD image
//! and a file under fio, its legs compared after; and `ublk add rbd --recovery` killed with
//! `kill -9` under fio `--verify`, recovered by `ublk recover` with nothing lost.

use super::*;
use std::io::Write;
use std::sync::OnceLock;
use ublk_targets::rbd::{Rbd, RbdSpec};
use ublk_zc::Target;

/// Where the shared cluster lives in the guest.
const CLUSTER_DIR: &str = "/tmp/ublk-ceph";

/// The fio runs on an RBD device: every block size, iodepth 1 and 128, kept small because
/// the emulated cluster serves a few hundred 4k requests a second.
const RBD_FIO: [FioCase; 5] = [
    FioCase {
        rw: "randwrite",
        blocks: &["--bs=4k"],
        iodepth: 1,
        size: MIB,
    },
    FioCase {
        rw: "randwrite",
        blocks: &["--bs=4k"],
        iodepth: 128,
        size: 4 * MIB,
    },
    FioCase {
        rw: "randrw",
        blocks: &["--bs=64k"],
        iodepth: 1,
        size: 4 * MIB,
    },
    FioCase {
        rw: "randwrite",
        blocks: &["--bs=1M"],
        iodepth: 128,
        size: 16 * MIB,
    },
    FioCase {
        rw: "randrw",
        blocks: ANY_SIZE,
        iodepth: 128,
        size: 8 * MIB,
    },
];

/// `ceph-test-cluster`, next to the `ublk` binary under test.
fn cluster_tool() -> String {
    Path::new(&ublk_bin())
        .with_file_name("ceph-test-cluster")
        .display()
        .to_string()
}

/// The configuration file of the shared cluster, started on first use.
/// A cluster that failed to start fails every later test at once, with the same message.
#[track_caller]
fn ceph_conf() -> &'static str {
    static CONF: OnceLock<Result<String, String>> = OnceLock::new();
    let conf = CONF.get_or_init(|| {
        let started = Instant::now();
        let tool = cluster_tool();
        let out = run_unchecked(&tool, &["start", CLUSTER_DIR]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            let logs = ["mon.a.out", "osd.0.out", "mon.a.log", "osd.0.log"]
                .iter()
                .map(|name| {
                    let path = Path::new(CLUSTER_DIR).join("log").join(name);
                    let text = fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("--- {}:\n{}", path.display(), tail.join("\n"))
                })
                .collect::<Vec<_>>()
                .join("\n");
            return Err(format!("{tool} start failed: {stderr}\n{logs}"));
        }
        let conf = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // For `rbd:` leaves without conf=: servers started by `ublk add` inherit it.
        std::env::set_var("CEPH_CONF", &conf);
        eprintln!(
            "ceph cluster up in {:.1} s: {conf}\n{stderr}",
            started.elapsed().as_secs_f64(),
        );
        Ok(conf)
    });
    match conf {
        Ok(conf) => conf,
        Err(e) => panic!("no Ceph cluster: {e}"),
    }
}

/// Creates a new image of `size` bytes in pool `rbd` and returns its name.
fn new_image(label: &str, size: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = format!("{label}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    ceph_conf();
    run(&cluster_tool(), &["create", CLUSTER_DIR, &name, size]);
    name
}

/// `ublk add rbd` of `image` with `extra` options.
fn add_rbd(image: &str, extra: &[&str]) -> Value {
    let conf = ceph_conf();
    let args = [
        &["rbd", "--pool", "rbd", "--image", image, "--conf", conf][..],
        extra,
    ]
    .concat();
    let dev = add(&args);
    assert_eq!(field_str(&dev, "target"), "rbd", "{dev}");
    dev
}

/// The image opened through the bindings, for reading it behind the device's back.
fn open_image(image: &str) -> Rbd {
    let mut spec = RbdSpec::new("rbd", image, None);
    spec.conf = Some(ceph_conf().into());
    Rbd::open(&spec).unwrap_or_else(|e| panic!("open rbd/{image}: {e}"))
}

/// `ublk del` of an RBD device: as [`del`], and its server must stop on the signal by
/// itself (librados' threads must not swallow SIGTERM), not be killed after the grace time.
#[track_caller]
fn del_rbd(dev: &Value) {
    let id = dev_id(dev).to_string();
    let out = ublk(&["del", &id]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("did not stop"),
        "the server of rbd device {id} had to be killed: {stderr}"
    );
    assert_device_gone(dev, "after `ublk del`");
}

fn rbd_fio(queues: u32) {
    let session = Session::start(&format!("rbd-fio-{queues}"));
    let image = new_image("fio", "64M");
    let dev = add_rbd(&image, &["--queues", &queues.to_string()]);
    assert_eq!(field_u64(&dev, "queues"), u64::from(queues), "{dev}");
    assert_eq!(field_u64(&dev, "size"), 64 * MIB, "the image's size: {dev}");
    let path = dev_path(&dev);
    let what = format!("rbd device {path} with {queues} queue(s)");
    run_fio_cases(&RBD_FIO, path, true, &what, &session.scratch);
    del_rbd(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_fio_verify_1_queue() {
    rbd_fio(1);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_fio_verify_2_queues() {
    rbd_fio(2);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_ext4_survives_fsck_and_remount() {
    let session = Session::start("rbd-ext4");
    let image = new_image("ext4", "64M");
    let dev = add_rbd(&image, &[]);
    ext4_files_survive(dev_path(&dev), &session.scratch);
    del_rbd(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_discard_and_write_zeroes_read_back_as_zeroes() {
    let _session = Session::start("rbd-discard");
    let size = 16 * MIB as usize;
    let image = new_image("discard", "16M");
    let dev = add_rbd(&image, &[]);
    let path = dev_path(&dev);

    let mut expected = pattern(size, 1);
    write_direct(path, 0, &expected);
    // Whole objects (4 MiB) and parts of them: only the range reads back as zeroes.
    clear_range(
        path,
        &mut expected,
        3 * MIB as usize,
        2 * MIB as usize,
        Clear::Discard,
        "2 MiB at 3 MiB",
    );
    clear_range(
        path,
        &mut expected,
        9 * MIB as usize + 3 * 512,
        5 * 512,
        Clear::Zero,
        "2.5 KiB at 9 MiB + 1.5 KiB",
    );
    run("blkdiscard", &[path]);
    assert_same(
        &read_direct(path, 0, size),
        &vec![0u8; size],
        "after discarding the whole device",
    );
    del_rbd(&dev);
    // What the device said is what the cluster holds.
    let mut back = vec![0xffu8; size];
    open_image(&image)
        .read_at(0, &mut back)
        .expect("read the image");
    assert_same(&back, &vec![0u8; size], "the image after discarding");
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_osd_killed_during_fio_is_not_noticed() {
    let session = Session::start("rbd-osd-kill");
    let image = new_image("osdkill", "32M");
    let dev = add_rbd(&image, &[]);
    let path = dev_path(&dev);
    let args: Vec<String> = [
        "--name=osd-kill",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=32",
        "--size=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let before = completed_ios(path);
    let mut fio = FioRun::start(&args, &session.scratch);
    let going = wait_until(Duration::from_secs(120), || {
        completed_ios(path) > before + 64 || !fio.is_running()
    });
    assert!(
        going && fio.is_running(),
        "fio did not get going on {path}\n{}",
        fio.kill()
    );
    run(&cluster_tool(), &["kill-osd", CLUSTER_DIR, "1"]);
    let (report, _) = fio.finish("fio on an rbd device while osd.1 is killed");
    let job = &report["jobs"][0];
    assert_eq!(field_u64(&job["write"], "io_bytes"), 16 * MIB, "{job}");
    assert_eq!(field_u64(&job["read"], "io_bytes"), 16 * MIB, "{job}");
    del_rbd(&dev);
    // The next tests want all three OSDs again.
    run(&cluster_tool(), &["restart-osd", CLUSTER_DIR, "1"]);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_snapshot_maps_read_only_with_its_own_data() {
    let _session = Session::start("rbd-snap");
    let size = 4 * MIB as usize;
    let image = new_image("snap", "4M");
    let dev = add_rbd(&image, &[]);
    let path = dev_path(&dev).to_string();
    let first = pattern(size, 7);
    write_direct(&path, 0, &first);
    run(
        "rbd",
        &[
            "-c",
            ceph_conf(),
            "snap",
            "create",
            &format!("rbd/{image}@s1"),
        ],
    );
    let second = pattern(size, 8);
    write_direct(&path, 0, &second);
    del_rbd(&dev);

    let conf = ceph_conf();
    let snap = add_rbd(&image, &["--snap", "s1"]);
    let snap_path = dev_path(&snap);
    let name = Path::new(snap_path).file_name().expect("a device name");
    let ro = fs::read_to_string(Path::new("/sys/block").join(name).join("ro"))
        .expect("read the device's ro attribute");
    assert_eq!(ro.trim(), "1", "a snapshot must map read-only");
    assert_same(
        &read_direct(snap_path, 0, size),
        &first,
        "the snapshot's data",
    );
    let write = OpenOptions::new()
        .write(true)
        .open(snap_path)
        .and_then(|mut f| f.write_all(&first[..4096]).and_then(|()| f.sync_all()));
    assert!(write.is_err(), "a write to the read-only device succeeded");
    del_rbd(&snap);

    // The stack form names the snapshot the same way.
    let expr = format!("rbd(pool=rbd,image={image},snap=s1,conf={conf})");
    let stacked = add_stack(&expr, &[]);
    assert_same(
        &read_direct(dev_path(&stacked), 0, size),
        &first,
        "the snapshot through the stack form",
    );
    del_rbd(&stacked);
    let head = add_stack(&format!("rbd:rbd/{image}"), &[]);
    assert!(
        field_str(&head, "tree").starts_with("rbd:"),
        "the short form: {head}"
    );
    // Without conf= the leaf reads $CEPH_CONF; the server inherits our environment.
    assert_same(
        &read_direct(dev_path(&head), 0, size),
        &second,
        "the image's head",
    );
    del_rbd(&head);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_unreachable_monitors_missing_pool_and_image_are_refused() {
    let session = Session::start("rbd-refused");
    // Nothing listens on port 9 of loopback.
    let dead = session.scratch.join("dead.conf");
    write_file(
        &dead,
        b"[global]\nmon_host = v2:127.0.0.1:9\nauth_client_required = none\n\
          ms_bind_msgr1 = false\nkeyring = /dev/null\n",
    );
    let dead = dead.display().to_string();
    let conf = ceph_conf().to_string();
    let image = new_image("refused", "4M");
    let listed_before = list();
    let nodes_before = device_nodes();
    // (arguments, words the error must mention: one of each group, time allowed)
    type Case<'a> = (Vec<&'a str>, &'a [&'a [&'a str]], Duration);
    let cases: Vec<Case> = vec![
        (
            vec![
                "add",
                "rbd",
                "--pool",
                "rbd",
                "--image",
                &image,
                "--conf",
                &dead,
                "--timeout",
                "5",
            ],
            &[&["no ceph monitor answered within 5 s"], &["127.0.0.1:9"]],
            Duration::from_secs(60),
        ),
        (
            vec![
                "add", "rbd", "--pool", "nopool", "--image", &image, "--conf", &conf,
            ],
            &[&["pool nopool does not exist"]],
            COMMAND_TIMEOUT,
        ),
        (
            vec![
                "add", "rbd", "--pool", "rbd", "--image", "noimage", "--conf", &conf,
            ],
            &[&["image rbd/noimage does not exist"]],
            COMMAND_TIMEOUT,
        ),
        (
            vec![
                "add", "rbd", "--pool", "rbd", "--image", &image, "--snap", "nosnap", "--conf",
                &conf,
            ],
            &[&["snapshot nosnap"]],
            COMMAND_TIMEOUT,
        ),
        (
            vec!["add", "rbd", "--pool", "rbd", "--conf", &conf],
            &[&["--image"]],
            COMMAND_TIMEOUT,
        ),
    ];
    let mut failures = Vec::new();
    for (args, mentions, limit) in cases {
        let started = Instant::now();
        let out = ublk_unchecked(&args);
        let took = started.elapsed();
        let mut problems = rejection_problems(&out, mentions);
        if took > limit {
            problems.push(format!("took {took:?}, more than {limit:?}"));
        }
        if list().len() != listed_before.len() || device_nodes() != nodes_before {
            problems.push(format!("a device was left behind: {}", json(&list())));
            ublk_unchecked(&["del", "--all"]);
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
        "{} rbd add(s) not refused properly:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_mirror_of_an_image_and_a_file() {
    let session = Session::start("rbd-mirror");
    let leg = 16 * MIB;
    let image = new_image("mirror", "16M");
    let file = child_files(&session.scratch, &[leg]).remove(0);
    let conf = ceph_conf();
    let expr = format!("mirror(rbd(pool=rbd,image={image},conf={conf}),file:{file})");
    let dev = add_stack(&expr, &[]);
    let path = dev_path(&dev).to_string();
    let size = field_u64(&dev, "size");
    assert!(size > 0 && size < leg, "the mirror's size: {dev}");
    let cases = [
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
    run_fio_cases(
        &cases,
        &path,
        true,
        "a mirror of rbd and a file",
        &session.scratch,
    );
    let device = read_direct(&path, 0, size as usize);
    del_rbd(&dev);
    // Both legs hold the device's data after their metadata.
    let data_offset = leg - size;
    let mut on_image = vec![0u8; size as usize];
    open_image(&image)
        .read_at(data_offset, &mut on_image)
        .expect("read the image leg");
    assert_same(&on_image, &device, "the rbd leg's data area");
    let on_file = fs::read(&file).expect("read the file leg");
    assert_same(
        &on_file[data_offset as usize..],
        &device,
        "the file leg's data area",
    );
}

/// A killed server's replacement reopens the image, and the I/O the kernel reissues
/// completes against the cluster: fio's verify passes across `kill -9` and `ublk recover`
/// (2 MiB of 4k writes: the emulated cluster writes a few dozen a second).
#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn rbd_recovery_reissue_under_fio_verify() {
    let image = new_image("recover", "16M");
    let conf = ceph_conf();
    super::recovery::reissue_under_fio_sized(
        "rbd-recovery",
        &["rbd", "--pool", "rbd", "--image", &image, "--conf", conf],
        2 * MIB,
        32,
    );
}
