//! `cargo xtask demo`: a RAM-backed ublk device, an ext4 round trip and a
//! short fio run, with a summary table.

use crate::fio;
use crate::scripts::prelude;
use crate::util::Workspace;
use crate::vm::{run_payload, Payload, VmOpts};
use anyhow::{bail, Context, Result};

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
step() {{ echo "== demo: $*"; }}
die() {{ echo "demo: FAILED: $*" >&2; exit 1; }}

step "ublk add ram --size 256M"
ublk_add demo ram --size 256M || die "ublk add"
DEV_ID=$demo_id
DEV=$demo_dev
step "device $DEV_ID is $DEV"

step "mkfs.ext4 $DEV and mount it on $MNT"
mkfs.ext4 -q -F "$DEV" || die "mkfs.ext4"
mkdir -p "$MNT"
mount -t ext4 "$DEV" "$MNT" || die "mount"

step "write files"
dd if=/dev/urandom of="$MNT/random.bin" bs=1M count=8 2>/dev/null || die "dd"
echo "Hello from a user-space block device!" > "$MNT/hello.txt" || die "write hello.txt"
seq 1 100000 > "$MNT/numbers.txt" || die "write numbers.txt"
(cd "$MNT" && sha256sum random.bin hello.txt numbers.txt) > /tmp/demo.sha256 || die "sha256sum"
cat /tmp/demo.sha256
sync || die "sync"

step "drop caches and verify"
echo 3 > /proc/sys/vm/drop_caches || die "drop_caches"
(cd "$MNT" && sha256sum -c /tmp/demo.sha256) || die "checksum mismatch after re-reading"
ls -l "$MNT"
df -h "$MNT"
umount "$MNT" || die "umount"
e2fsck -fn "$DEV" || die "e2fsck found problems"

step "fio 4k random read, queue depth 64, {runtime} s"
run_fio randread --name=randread --rw=randread {fio_common} || die "fio randread"
step "fio 4k random write, queue depth 64, {runtime} s"
run_fio randwrite --name=randwrite --rw=randwrite {fio_common} || die "fio randwrite"

step "ublk del $DEV_ID"
ublk del "$DEV_ID" || die "ublk del"
DEV_ID=""
step "OK"
"#,
        prelude = prelude()
    )
}

/// Runs the demo and prints the result table.
pub fn demo(ws: &Workspace, opts: &VmOpts, runtime: u32) -> Result<()> {
    let payload = Payload {
        script: script(runtime),
        extra_bins: Vec::new(),
    };
    let outcome = run_payload(ws, &payload, opts)?;
    let mut rows = Vec::new();
    for (label, json) in fio::sections(&outcome.output) {
        let r = fio::parse(&json).with_context(|| format!("fio results of job {label}"))?;
        rows.push(vec![
            label,
            fio::num(r.iops, 0),
            fio::num(r.lat_avg_us, 1),
            fio::num(r.lat_p99_us, 1),
        ]);
    }
    if outcome.code != 0 {
        bail!("the demo failed (exit status {})", outcome.code);
    }
    if rows.is_empty() {
        bail!("the demo printed no fio results");
    }
    println!("\nublk RAM device (256 MiB), fio io_uring direct 4k, iodepth 64, {runtime} s:\n");
    print!(
        "{}",
        fio::markdown_table(&["job", "IOPS", "avg lat (µs)", "p99 lat (µs)"], 1, &rows)
    );
    Ok(())
}
