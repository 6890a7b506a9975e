//! `lifecycle_*`: devices come and go without hanging or leaking.
//!
//! 50 `ublk add`/fio/`ublk del` cycles beside a CPU hog, counting the devices, servers and
//! files left and the tasks stuck in D state; 50 cycles of a server inside this process
//! (the library), its descriptors, threads and memory measured across them; `ublk add`
//! killed at every point of its start leaves either a reported device or nothing; the
//! server exits, never hangs, on `ublk del`, SIGTERM and SIGINT with a file system mounted
//! or the device held open; `ublk del --safe` refuses while the device is open.

use super::*;
use std::sync::mpsc;
use ublk_core::{ControlDevice, DeviceBuilder};
use ublk_targets::ram::Ram;

/// Pids of running `ublk` servers (started by `ublk add` or `ublk recover`).
fn servers() -> BTreeSet<u64> {
    let mut pids = BTreeSet::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if !process_gone(pid) && args.contains(&&b"--daemon-child"[..]) {
            pids.insert(pid);
        }
    }
    pids
}

/// Tasks in uninterruptible sleep (D state), with their names.
fn d_state_tasks() -> Vec<String> {
    let mut stuck = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        if entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
            .is_none()
        {
            continue;
        }
        let Ok(tasks) = fs::read_dir(entry.path().join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            if let Some((name, rest)) = stat.rsplit_once(')') {
                if rest.trim_start().starts_with('D') {
                    stuck.push(format!("{}{name})", task.path().display()));
                }
            }
        }
    }
    stuck
}

/// D-state tasks that stay in D state for a second (a task passing through one is fine).
fn stuck_tasks() -> Vec<String> {
    let first = d_state_tasks();
    if first.is_empty() {
        return first;
    }
    sleep(Duration::from_secs(1));
    let second = d_state_tasks();
    first.into_iter().filter(|t| second.contains(t)).collect()
}

/// Files the RAM target of a recoverable device would leave under /dev/shm.
fn shm_files() -> BTreeSet<String> {
    fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("ublk-ram-"))
                .collect()
        })
        .unwrap_or_default()
}

/// `n` busy shell loops, killed when dropped.
struct CpuHog {
    _loops: Vec<Spawned>,
}

impl CpuHog {
    fn start(n: usize) -> CpuHog {
        CpuHog {
            _loops: (0..n)
                .map(|_| Spawned::new("sh", &["-c", "while :; do :; done"], None))
                .collect(),
        }
    }
}

/// A short fio run with I/O in flight: random 4 KiB reads and writes at depth 16.
fn short_fio(path: &str, name: &str) -> Vec<String> {
    [
        &format!("--name={name}"),
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=16",
        "--size=8M",
        "--time_based",
        "--runtime=30",
    ]
    .map(String::from)
    .to_vec()
}

/// Starts fio on `path` and waits until its I/O is flowing.
#[track_caller]
fn fio_in_flight(path: &str, scratch: &Path) -> FioRun {
    let ios_before = completed_ios(path);
    let mut fio = FioRun::start(&short_fio(path, "churn"), scratch);
    let going = wait_until(Duration::from_secs(60), || {
        completed_ios(path) > ios_before + 64 || !fio.is_running()
    });
    assert!(
        going && fio.is_running(),
        "fio did not get going on {path}\n{}",
        fio.kill()
    );
    fio
}

/// fio must end soon after its device went away.
#[track_caller]
fn fio_ends(mut fio: FioRun, when: &str) {
    assert!(
        wait_until(Duration::from_secs(60), || !fio.is_running()),
        "fio still running 60 s {when}\n{}",
        fio.kill()
    );
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_churn_50_add_fio_del_cycles_under_load() {
    let session = Session::start("churn");
    let shm_before = shm_files();
    // One of the VM's two CPUs kept busy.
    let _hog = CpuHog::start(1);
    let started = Instant::now();
    for cycle in 0..50 {
        // Every other device recoverable: its /dev/shm memory must go too.
        let args: &[&str] = if cycle % 2 == 0 {
            &["ram", "--size", "32M"]
        } else {
            &["ram", "--size", "32M", "--recovery"]
        };
        let dev = add(args);
        let fio = fio_in_flight(dev_path(&dev), &session.scratch);
        del(&dev);
        assert!(
            wait_until(Duration::from_secs(30), || process_gone(server_pid(&dev))),
            "cycle {cycle}: server {} still running after `ublk del`",
            server_pid(&dev)
        );
        fio_ends(fio, &format!("after `ublk del` in cycle {cycle}"));
    }
    eprintln!("50 cycles in {:.1} s", started.elapsed().as_secs_f64());
    assert_no_devices("after 50 add/fio/del cycles");
    let left = servers();
    assert!(left.is_empty(), "servers left after 50 cycles: {left:?}");
    let shm: Vec<_> = shm_files().difference(&shm_before).cloned().collect();
    assert!(shm.is_empty(), "RAM files left in /dev/shm: {shm:?}");
    let stuck = stuck_tasks();
    assert!(stuck.is_empty(), "tasks stuck in D state: {stuck:?}");
}

/// This process's open descriptors, threads (not counting the kernel's io_uring workers,
/// which come and go on their own) and resident memory in bytes.
fn own_resources() -> (usize, usize, u64) {
    let fds = fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count();
    let threads = fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .flatten()
        .filter(|t| {
            fs::read_to_string(t.path().join("comm"))
                .map(|comm| !comm.starts_with("iou-"))
                .unwrap_or(false)
        })
        .count();
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/self/status"))
    };
    (fds, threads, field("VmRSS:") * 1024)
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_library_server_50_cycles_leaks_nothing() {
    let session = Session::start("library-churn");
    let ctrl = ControlDevice::open().expect("open /dev/ublk-control");
    let mut samples = Vec::new();
    for cycle in 0..50 {
        let (tx, rx) = mpsc::channel();
        let server = std::thread::spawn(move || {
            let size = 32 * MIB;
            DeviceBuilder::new().size(size).queues(2).run_with(
                Ram::new(size).expect("RAM target"),
                |info| {
                    let _ = tx.send(info.clone());
                },
            )
        });
        let info = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("cycle {cycle}: the device did not start"));
        let fio = fio_in_flight(&info.block_path, &session.scratch);
        // What `ublk del` does to a library server in another process: stop the device;
        // the run then ends and deletes it.
        ctrl.stop(info.dev_id).expect("STOP_DEV");
        server
            .join()
            .expect("the server thread panicked")
            .unwrap_or_else(|e| panic!("cycle {cycle}: the run failed: {e}"));
        fio_ends(
            fio,
            &format!("after the library server stopped in cycle {cycle}"),
        );
        assert!(
            !Path::new(&info.block_path).exists(),
            "cycle {cycle}: {} outlived its server",
            info.block_path
        );
        samples.push(own_resources());
    }
    assert_no_devices("after 50 library server cycles");
    // The first cycles warm up allocators and thread-local caches; after that nothing may
    // grow with the cycles. A sample can catch a thread of the cycle still exiting, so the
    // last five cycles' least is held against cycles 6 to 10's most: a leak of anything per
    // cycle would put the end 40 above.
    let fold = |range: std::ops::Range<usize>, max: bool| {
        let pick = |a: u64, b: u64| if max { a.max(b) } else { a.min(b) };
        samples[range]
            .iter()
            .map(|&(f, t, r)| (f as u64, t as u64, r))
            .reduce(|a, b| (pick(a.0, b.0), pick(a.1, b.1), pick(a.2, b.2)))
            .expect("samples")
    };
    let (fds10, threads10, rss10) = fold(5..10, true);
    let (fds50, threads50, rss50) = fold(45..50, false);
    eprintln!(
        "library server: cycles 6-10 at most {fds10} fds, {threads10} threads, {} KiB RSS; \
         cycles 46-50 at least {fds50} fds, {threads50} threads, {} KiB RSS",
        rss10 / 1024,
        rss50 / 1024
    );
    assert!(
        fds50 <= fds10,
        "descriptors leaked over 40 cycles: {samples:?}"
    );
    assert!(
        threads50 <= threads10,
        "threads leaked over 40 cycles: {samples:?}"
    );
    assert!(
        rss50 <= rss10 + 8 * MIB,
        "RSS grew by {} KiB over 40 cycles: {samples:?}",
        (rss50 - rss10) / 1024
    );
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_add_killed_midway_leaves_a_reported_device_or_nothing() {
    let _session = Session::start("add-killed");
    // Both of the VM's CPUs kept busy: the start is slow, the kills land all over it.
    let _hog = CpuHog::start(2);
    let shm_before = shm_files();
    for step in 0..12u64 {
        let args = ["add", "ram", "--size", "32M", "--recovery"];
        let mut adding = Spawned::new(&ublk_bin(), &args, None);
        sleep(Duration::from_millis(step * 60));
        let out = adding.kill();
        let reported: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        // The background server either was confirmed (the device is the user's now) or
        // removes its device and exits: once settled, as many servers as devices, and none
        // of either unless `ublk add` printed the device before it died.
        let settled_now = || {
            let (servers, devices) = (servers().len(), list().len());
            servers == devices && (reported.is_some() || servers == 0)
        };
        let settled = wait_until(Duration::from_secs(60), settled_now) && {
            sleep(Duration::from_secs(1));
            settled_now()
        };
        assert!(
            settled,
            "step {step}: `ublk add` killed after {} ms (reported: {reported:?}); servers \
             left: {:?}; devices: {}",
            step * 60,
            servers(),
            json(&list())
        );
        if let Some(dev) = &reported {
            // Killed after printing: kept if the server got the confirmation, else removed.
            if listed_entry(&list(), dev_id(dev)).is_some() {
                del(dev);
            }
        }
        assert_no_devices(&format!("after step {step}"));
        let shm: Vec<_> = shm_files().difference(&shm_before).cloned().collect();
        assert!(
            shm.is_empty(),
            "step {step}: RAM files left in /dev/shm: {shm:?}"
        );
        let states: Vec<_> = fs::read_dir("/run/ublk")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.ends_with(".json"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            states.is_empty(),
            "step {step}: saved states left: {states:?}"
        );
    }
}

/// How a test ends a server whose device is in use.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Del,
    Term,
    Int,
}

/// Ends the server of a device with ext4 mounted on it (and, with `held`, also held open
/// by this process) while fio writes a file there: the server must exit within 30 s and the
/// block device go; after the unmount the id is free again, and nothing is in D state.
fn exit_while_in_use(ending: Ending, held: bool) {
    let session = Session::start(&format!("in-use-{ending:?}-{held}"));
    let dev = add(&["ram", "--size", "64M"]);
    let path = dev_path(&dev).to_string();
    run("mkfs.ext4", &["-q", "-F", &path]);
    let dir = session.scratch.join("mnt");
    fs::create_dir_all(&dir).expect("create the mount point");
    let mounted = Mounted::new(&path, &dir);
    let holder = held.then(|| File::open(&path).expect("hold the block device open"));
    let file = dir.join("data").display().to_string();
    let fio = FioRun::start(
        &short_fio(&file, "mounted")
            .into_iter()
            .map(|a| {
                if a == "--direct=1" {
                    "--direct=0".into()
                } else {
                    a
                }
            })
            .collect::<Vec<_>>(),
        &session.scratch,
    );
    sleep(Duration::from_secs(2));
    let pid = server_pid(&dev);
    let t0 = Instant::now();
    match ending {
        Ending::Del => {
            ublk(&["del", &dev_id(&dev).to_string()]);
        }
        Ending::Term => {
            run("kill", &["-TERM", &pid.to_string()]);
        }
        Ending::Int => {
            run("kill", &["-INT", &pid.to_string()]);
        }
    }
    assert!(
        wait_until(Duration::from_secs(30), || process_gone(pid)),
        "{ending:?} with the device in use: server {pid} still running after 30 s: {}",
        process_status(pid)
    );
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(&path).exists()),
        "{path} still exists after the server exited"
    );
    eprintln!(
        "{ending:?} with the device in use: server gone in {:?}",
        t0.elapsed()
    );
    fio_ends(fio, "after its device went away under the file system");
    drop(holder);
    mounted.unmount();
    // The id comes free once the last user let go.
    let id = dev_id(&dev).to_string();
    assert!(
        wait_until(Duration::from_secs(10), || {
            ControlDevice::open()
                .and_then(|c| c.dev_info(dev_id(&dev) as u32))
                .is_err()
        }),
        "device {id} still known to the kernel after the unmount"
    );
    let again = add(&["ram", "--size", "8M", "--id", &id]);
    del(&again);
    let stuck = stuck_tasks();
    assert!(stuck.is_empty(), "tasks stuck in D state: {stuck:?}");
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_del_with_a_mounted_fs_does_not_hang() {
    exit_while_in_use(Ending::Del, false);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_sigterm_with_a_mounted_fs_and_an_opener_does_not_hang() {
    exit_while_in_use(Ending::Term, true);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_sigint_with_a_mounted_fs_does_not_hang() {
    exit_while_in_use(Ending::Int, false);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_del_safe_refuses_while_the_device_is_open() {
    let session = Session::start("del-safe");
    let dev = add(&["ram", "--size", "64M"]);
    let path = dev_path(&dev).to_string();
    let id = dev_id(&dev).to_string();
    run("mkfs.ext4", &["-q", "-F", &path]);
    let dir = session.scratch.join("mnt");
    fs::create_dir_all(&dir).expect("create the mount point");
    let mounted = Mounted::new(&path, &dir);
    write_file(&dir.join("kept"), b"still here");

    let out = ublk_unchecked(&["del", "--safe", &id]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is open"),
        "`ublk del --safe` with ext4 mounted\n{}",
        describe(&format!("ublk del --safe {id}"), &out)
    );
    assert!(
        Path::new(&path).exists(),
        "{path} went away after a refused del --safe"
    );
    assert!(
        !process_gone(server_pid(&dev)),
        "the server exited after a refused del --safe"
    );
    write_file(&dir.join("after"), b"writes still work");
    mounted.unmount();

    // Held open by a process, the same.
    let holder = File::open(&path).expect("open the block device");
    let out = ublk_unchecked(&["del", "--safe", &id]);
    assert!(
        !out.status.success(),
        "`ublk del --safe` with the device held open\n{}",
        describe(&format!("ublk del --safe {id}"), &out)
    );
    drop(holder);

    // Nobody has it open: deleted.
    ublk(&["del", "--safe", &id]);
    assert_device_gone(&dev, "after `ublk del --safe` of an unused device");
    assert!(
        wait_until(Duration::from_secs(30), || process_gone(server_pid(&dev))),
        "the server outlived `ublk del --safe`"
    );
}

/// `ublk resize` grows a file device under a mounted ext4: the kernel sees the new size,
/// `resize2fs` grows the file system online, a file larger than the old device fits, and
/// fsck finds it clean. A RAM device refuses to change size and stays as it was.
#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_resize_grows_a_file_device_under_a_mounted_ext4() {
    let session = Session::start("resize");
    let image = session.scratch.join("resize.img").display().to_string();
    let dev = add(&["file", "--path", &image, "--size", "32M"]);
    let path = dev_path(&dev).to_string();
    let id = dev_id(&dev).to_string();
    let sectors = || -> u64 {
        let name = Path::new(&path).file_name().expect("a device name");
        let file = Path::new("/sys/class/block").join(name).join("size");
        fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
            .trim()
            .parse()
            .expect("sysfs size is a number")
    };
    assert_eq!(sectors() * 512, 32 * MIB);
    run("mkfs.ext4", &["-q", "-F", &path]);
    let dir = session.scratch.join("mnt");
    fs::create_dir_all(&dir).expect("create the mount point");
    let mounted = Mounted::new(&path, &dir);
    let small = random_bytes(4 * MIB as usize);
    write_file(&dir.join("small"), &small);

    ublk(&["resize", &id, "96M"]);
    assert_eq!(
        sectors() * 512,
        96 * MIB,
        "the kernel's size after `ublk resize`"
    );
    assert!(
        fs::metadata(&image).expect("stat the image").len() >= 96 * MIB,
        "the backing file did not grow"
    );
    run("resize2fs", &[&path]);
    // 48 MiB: more than the whole device had before.
    let big = random_bytes(48 * MIB as usize);
    write_file(&dir.join("big"), &big);
    drop_caches();
    assert_same(
        &fs::read(dir.join("big")).expect("read big"),
        &big,
        "the file beyond the old size",
    );
    assert_same(
        &fs::read(dir.join("small")).expect("read small"),
        &small,
        "the file from before",
    );
    mounted.unmount();
    run("fsck.ext4", &["-f", "-n", &path]);
    del(&dev);

    let ram = add(&["ram", "--size", "16M"]);
    let ram_id = dev_id(&ram).to_string();
    let out = ublk_unchecked(&["resize", &ram_id, "32M"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("cannot change size"),
        "{}",
        describe(&format!("ublk resize {ram_id} 32M"), &out)
    );
    let name = Path::new(dev_path(&ram))
        .file_name()
        .expect("a device name");
    let size = fs::read_to_string(Path::new("/sys/class/block").join(name).join("size"))
        .expect("read the RAM device's size");
    assert_eq!(
        size.trim(),
        (16 * MIB / 512).to_string(),
        "the refused resize changed the size"
    );
    del(&ram);
}

/// This process's io_uring descriptors.
fn io_uring_fds() -> BTreeSet<i32> {
    fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .flatten()
        .filter(|e| {
            fs::read_link(e.path())
                .map(|t| t.to_string_lossy().contains("io_uring"))
                .unwrap_or(false)
        })
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn lifecycle_queue_thread_death_ends_the_run_with_an_error() {
    let session = Session::start("queue-death");
    let before = io_uring_fds();
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let size = 32 * MIB;
        let result = DeviceBuilder::new().size(size).queues(1).run_with(
            Ram::new(size).expect("RAM target"),
            |info| {
                let _ = tx.send(info.clone());
            },
        );
        let _ = done_tx.send(result);
    });
    let info = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the device did not start");
    let fio = fio_in_flight(&info.block_path, &session.scratch);
    // The server's rings: its control ring first, then the queue's. Replacing the queue's
    // ring with /dev/null makes the queue thread's next io_uring_enter fail, as a broken
    // ring would: the thread dies with requests of fio's in flight.
    let queue_ring = *io_uring_fds()
        .difference(&before)
        .max()
        .expect("the server has no io_uring");
    let null = File::open("/dev/null").expect("open /dev/null");
    // SAFETY: both descriptors are open; dup2 only swaps what queue_ring refers to.
    let swapped = unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), queue_ring) };
    assert_eq!(swapped, queue_ring, "dup2 over the queue's ring");
    let result = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the run did not end within 60 s of its queue thread dying");
    let err = result.expect_err("the run ended Ok though its queue thread died");
    let text = err.to_string();
    assert!(
        text.contains("queue 0"),
        "the run's error does not name the queue: {text}"
    );
    fio_ends(fio, "after the queue thread died");
    assert!(
        wait_until(Duration::from_secs(30), || !Path::new(&info.block_path)
            .exists()),
        "{} outlived its server",
        info.block_path
    );
    let stuck = stuck_tasks();
    assert!(stuck.is_empty(), "tasks stuck in D state: {stuck:?}");
    assert_no_devices("after the queue thread died");
}
