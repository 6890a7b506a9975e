//! `need_get_data_*`: request buffers held only while requests are in flight
//! (`ublk add --need-get-data`, `UBLK_F_NEED_GET_DATA`).
//!
//! fio verification on a RAM device with two queues, from 512-byte to 1 MiB requests; and
//! the server's anonymous memory (`RssAnon` in `/proc/PID/status`) next to a device without
//! the flag: idle, under 512 KiB reads and writes at queue depth 128, and idle again after
//! them. Without the flag every tag keeps the buffer the kernel copied a write into (128 ×
//! 512 KiB); with it, what stays is the pool's idle budget (2 MiB a queue).

use super::*;

/// `RssAnon` and `VmRSS` of process `pid`, in bytes.
fn rss(pid: u64) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * KIB)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
    };
    (field("RssAnon:"), field("VmRSS:"))
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn need_get_data_fio_verify_ram_2_queues() {
    let session = Session::start("need-get-data-verify");
    let dev = add(&["ram", "--size", "64M", "--queues", "2", "--need-get-data"]);
    assert_eq!(dev["need_get_data"], true, "add output: {dev}");
    assert_eq!(field_str(&dev, "buffer_mode"), "copy", "add output: {dev}");
    let flags = dev["flags"].as_array().expect("flags array");
    assert!(
        flags.iter().any(|f| f.as_str() == Some("NEED_GET_DATA")),
        "NEED_GET_DATA not among the device's flags: {dev}"
    );
    let cases = [
        FioCase {
            rw: "randwrite",
            blocks: &["--bs=4k"],
            iodepth: 128,
            size: 8 * MIB,
        },
        FioCase {
            rw: "randrw",
            blocks: &["--bsrange=512-1M", "--blockalign=512"],
            iodepth: 32,
            size: 32 * MIB,
        },
        FioCase {
            rw: "randwrite",
            blocks: &["--bs=1M"],
            iodepth: 4,
            size: 16 * MIB,
        },
    ];
    run_fio_cases(
        &cases,
        dev_path(&dev),
        true,
        "ram device with --need-get-data",
        &session.scratch,
    );
    // Refused where it cannot work, with the reason.
    let out = ublk_unchecked(&[
        "add",
        "null",
        "--need-get-data",
        "--buffer-mode",
        "user-copy",
    ]);
    assert!(!out.status.success(), "{}", describe("ublk add", &out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("copy mode only"),
        "{}",
        describe(
            "ublk add null --need-get-data --buffer-mode user-copy",
            &out
        )
    );
    del(&dev);
}

#[test]
#[ignore = "needs the ublk kernel driver: run `cargo xtask test`"]
fn need_get_data_holds_buffers_only_for_io_in_flight() {
    let session = Session::start("need-get-data-rss");
    let plain = add(&["null", "--size", "1G"]);
    let pooled = add(&["null", "--size", "1G", "--need-get-data"]);
    let mut lines = Vec::new();
    let mut after = Vec::new();
    for (name, dev) in [("plain", &plain), ("need-get-data", &pooled)] {
        let pid = server_pid(dev);
        let idle = rss(pid);
        let args: Vec<String> = [
            "--name=rss",
            &format!("--filename={}", dev_path(dev)),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randrw",
            "--bs=512k",
            "--iodepth=128",
            "--size=512M",
            "--output-format=json",
        ]
        .map(String::from)
        .to_vec();
        let mut fio = FioRun::start(&args, &session.scratch);
        let mut peak = idle;
        while fio.is_running() {
            let now = rss(pid);
            peak = (peak.0.max(now.0), peak.1.max(now.1));
            sleep(Duration::from_millis(100));
        }
        let (report, _) = fio.finish(&format!("fio on the {name} null device"));
        let job = &report["jobs"][0];
        let bw = field_u64(&job["write"], "bw_bytes") + field_u64(&job["read"], "bw_bytes");
        sleep(Duration::from_millis(500));
        let settled = rss(pid);
        lines.push(format!(
            "{name}: RssAnon idle {} KiB, peak under fio {} KiB, idle after {} KiB \
             (VmRSS {} / {} / {} KiB); fio {} MiB/s",
            idle.0 / KIB,
            peak.0 / KIB,
            settled.0 / KIB,
            idle.1 / KIB,
            peak.1 / KIB,
            settled.1 / KIB,
            bw / MIB
        ));
        after.push((idle.0, settled.0));
    }
    let report = lines.join("\n");
    println!("{report}");
    let (plain_idle, plain_after) = after[0];
    let (pooled_idle, pooled_after) = after[1];
    // Without the flag, the 128 tags keep the 512 KiB the kernel copied into each (half the
    // requests are writes: with 128 in flight, each tag sees some).
    assert!(
        plain_after >= plain_idle + 48 * MIB,
        "the plain server should hold its tag buffers after the writes:\n{report}"
    );
    // With it, at most the pool's idle budget (2 MiB) stays, plus allocator noise.
    assert!(
        pooled_after <= pooled_idle + 6 * MIB,
        "the need-get-data server kept more than its pool's idle budget:\n{report}"
    );
    del(&pooled);
    del(&plain);
}
