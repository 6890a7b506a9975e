//! `cargo xtask demo`: a RAM-backed ublk device, an ext4 round trip and a
//! short fio run, with a summary table.

use crate::fio;
use crate::scripts::prelude;
use crate::util::Workspace;
use crate::vm::{run_payload, Payload, VmOpts};
use anyhow::{bail, Context, Result};
use std::fs;

/// The in-guest (or native) demo script.
fn script(runtime: u32) -> String {
    let fio_common = format!(
        "--filename=\"$DEV\" --ioengine=io_uring --direct=1 --bs=4k --iodepth=64 \
         --time_based --runtime={runtime}"
    );
    format!(
        r#"{prelude}
MNT=/mnt/ublk
DEV_ID=""
cleanup() {{
    if grep -q " $MNT " /proc/mounts; then umount "$MNT"; fi
    if [ -n "$DEV_ID" ]; then ublk del "$DEV_ID"; fi
}}
trap cleanup EXIT
step() {{ echo "{MARKER}$*"; }}
die() {{ echo "{MARKER}FAILED: $*"; exit 1; }}

step "creating a 256 MiB RAM-backed device: ublk add ram --size 256M"
ublk_add demo ram --size 256M || die "ublk add"
DEV_ID=$demo_id
DEV=$demo_dev
step "device $DEV_ID is up as $DEV, served by a user-space process"

step "making an ext4 file system on $DEV and mounting it on $MNT"
mkfs.ext4 -q -F "$DEV" || die "mkfs.ext4"
mkdir -p "$MNT"
mount -t ext4 "$DEV" "$MNT" || die "mount"

step "writing 8 MiB of random data and two text files, with their checksums"
dd if=/dev/urandom of="$MNT/random.bin" bs=1M count=8 2>/dev/null || die "dd"
echo "Hello from a user-space block device!" > "$MNT/hello.txt" || die "write hello.txt"
seq 1 100000 > "$MNT/numbers.txt" || die "write numbers.txt"
(cd "$MNT" && sha256sum random.bin hello.txt numbers.txt) > /tmp/demo.sha256 || die "sha256sum"
cat /tmp/demo.sha256
sync || die "sync"

step "dropping the page cache and reading the files back from the device"
echo 3 > /proc/sys/vm/drop_caches || die "drop_caches"
(cd "$MNT" && sha256sum -c /tmp/demo.sha256) || die "checksum mismatch after re-reading"
step "the 3 files read back with the checksums they were written with"
ls -l "$MNT"
df -h "$MNT"
umount "$MNT" || die "umount"
e2fsck -fn "$DEV" || die "e2fsck found problems"
step "unmounted; e2fsck finds the file system clean"

step "fio: 4 KiB random reads, queue depth 64, for {runtime} s"
run_fio randread --name=randread --rw=randread {fio_common} || die "fio randread"
step "fio: 4 KiB random writes, queue depth 64, for {runtime} s"
run_fio randwrite --name=randwrite --rw=randwrite {fio_common} || die "fio randwrite"

step "removing the device: ublk del $DEV_ID"
ublk del "$DEV_ID" || die "ublk del"
DEV_ID=""
step "done: the device is gone"
"#,
        prelude = prelude()
    )
}

/// What the demo script's story lines start with; only they reach the terminal.
const MARKER: &str = "== demo: ";

/// Runs the demo and prints the result table.
pub fn demo(ws: &Workspace, opts: &VmOpts, runtime: u32) -> Result<()> {
    let payload = Payload {
        script: script(runtime),
        extra_bins: Vec::new(),
    };
    let dir = ws.target.join("xtask");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let console = dir.join("demo-console.log");
    let fio_json = dir.join("demo-fio.json");
    println!("demo: booting a VM (or running natively when this kernel has ublk) ...");
    crate::util::quiet_console(MARKER);
    let outcome = run_payload(ws, &payload, opts)?;
    fs::write(&console, &outcome.output)
        .with_context(|| format!("writing {}", console.display()))?;
    let sections = fio::sections(&outcome.output);
    let reports: serde_json::Map<String, serde_json::Value> = sections
        .iter()
        .filter_map(|(label, json)| {
            let start = json.find('{')?;
            Some((label.clone(), serde_json::from_str(&json[start..]).ok()?))
        })
        .collect();
    fs::write(
        &fio_json,
        serde_json::to_string_pretty(&reports).context("encoding fio's reports")?,
    )
    .with_context(|| format!("writing {}", fio_json.display()))?;
    if outcome.code != 0 {
        let tail: Vec<&str> = outcome.output.lines().rev().take(20).collect();
        eprintln!("demo: the last lines of the console:");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
        bail!(
            "the demo failed (exit status {}); the whole console is in {}",
            outcome.code,
            console.display()
        );
    }
    let mut rows = Vec::new();
    for (label, json) in sections {
        let r = fio::parse(&json).with_context(|| format!("fio results of job {label}"))?;
        rows.push(vec![
            label,
            fio::num(r.iops, 0),
            fio::num(r.lat_avg_us, 1),
            fio::num(r.lat_p99_us, 1),
        ]);
    }
    if rows.is_empty() {
        bail!("the demo printed no fio results");
    }
    println!("\nublk RAM device (256 MiB), fio io_uring direct 4k, iodepth 64, {runtime} s:\n");
    print!(
        "{}",
        fio::markdown_table(&["job", "IOPS", "avg lat (µs)", "p99 lat (µs)"], 1, &rows)
    );
    println!(
        "\nfio's full reports: {}\nthe whole console: {}",
        fio_json.display(),
        console.display()
    );
    Ok(())
}
