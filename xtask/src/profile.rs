//! `cargo xtask profile`: where the time of one I/O goes, for the benchmark's
//! missed bars. In one boot, fio (io_uring, direct, 4k randread or, with
//! `--write`, randwrite, iodepth 64, 1 job) runs on a ublk device and then on
//! null_blk (with `--compress`: zram lz4, both filled first, as the bench's
//! compression rows do), each while
//! `perf record -a -g -e cpu-clock` samples every CPU; the guest then prints
//! `perf report` by command and by symbol for both, and the fio results.
//!
//! Under emulation there is no PMU, so this is timer sampling (cpu-clock):
//! shares of CPU time, not cycles. Kernel symbols come from the guest's
//! `/proc/kallsyms`; the `ublk` binary keeps its debug symbols in release.

use crate::bench;
use crate::deps;
use crate::fio;
use crate::scripts::prelude;
use crate::util::{which, Workspace};
use crate::vm::{run_payload, Payload, VmOpts};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// What `cargo xtask profile` compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// null_blk, over the whole device, fio's default data.
    NullBlk,
    /// zram with lz4 (`--compress`): both devices first filled over the
    /// benchmark's span with its half-compressible data, which fio then uses.
    Zram,
}

/// The in-guest script: `target` is the `ublk add` target and options.
fn script(target: &str, runtime: u32, peer: Peer, rw: &str) -> String {
    let (peer_setup, peer_name, peer_dev, data, fill) = match peer {
        Peer::NullBlk => (
            "load_mod null_blk queue_mode=2 irqmode=0 nr_devices=1 gb=1 submit_queues=2 \
             hw_queue_depth=128 || die null_blk",
            "null_blk",
            "/dev/nullb0",
            String::new(),
            String::new(),
        ),
        Peer::Zram => {
            let data = format!(
                "--size={}M {}",
                bench::COMPRESS_SPAN_MIB,
                bench::COMPRESS_DATA
            );
            (
                "{ [ -d /sys/module/lz4hc_compress ] || load_mod lz4hc_compress; } && \
                 load_mod zram num_devices=1 && echo lz4 >/sys/block/zram0/comp_algorithm && \
                 echo 1G >/sys/block/zram0/disksize && wait_blk /dev/zram0 || die zram",
                "zram",
                "/dev/zram0",
                data.clone(),
                format!(
                    r#"for path in "$dev_dev" /dev/zram0; do
    fio --name=fill --filename="$path" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
        --iodepth=16 {data} --end_fsync=1 >/dev/null || die "fill of $path"
done"#
                ),
            )
        }
    };
    format!(
        r#"{prelude}
die() {{ echo "profile: FAILED: $*" >&2; exit 1; }}
DEV_ID=""
trap '[ -n "$DEV_ID" ] && ublk del "$DEV_ID"' EXIT
{peer_setup}
ublk_add dev {target} --size 1G --queues 2 --depth 128 || die "ublk add failed"
DEV_ID=$dev_id
{fill}
echo 0 > /proc/sys/kernel/kptr_restrict
for pair in "ublk:$dev_dev" "{peer_name}:{peer_dev}"; do
    name=${{pair%%:*}}; path=${{pair#*:}}
    perf record -a -g -e cpu-clock -F 2000 -o "/tmp/$name.data" -q 2>/dev/null &
    PERF=$!
    sleep 1
    run_fio "$name" --name="$name" --filename="$path" --ioengine=io_uring --direct=1 \
        --rw={rw} --bs=4k --iodepth=64 --numjobs=1 --time_based --runtime={runtime} {data} \
        || die "fio on $name"
    kill -INT "$PERF"; wait "$PERF"
    echo "XTASK-PROFILE-BEGIN $name"
    echo "== $name: CPU time by command"
    perf report -i "/tmp/$name.data" --stdio --no-children -g none --sort comm --percent-limit 1 \
        2>/dev/null | grep -v '^#' | grep -v '^$'
    echo "== $name: CPU time by command and kernel/user"
    perf report -i "/tmp/$name.data" --stdio --no-children -g none --sort comm,dso \
        --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^$'
    echo "== $name: CPU time by symbol (self, above 0.4%, idle left out)"
    perf report -i "/tmp/$name.data" --stdio --no-children -g none --sort comm,sym \
        --percent-limit 0.4 2>/dev/null | grep -v '^#' | grep -v '^$' | grep -v swapper \
        | head -60
    echo "XTASK-PROFILE-END $name"
done
"#,
        prelude = prelude()
    )
}

/// The host's `perf` binary (Debian's `linux-perf`), installing it as root if missing.
fn perf_binary() -> Result<PathBuf> {
    if let Some(p) = which("perf") {
        return Ok(p);
    }
    if !deps::ensure_optional_package("linux-perf", "cargo xtask profile") {
        bail!("cargo xtask profile needs perf (Debian package linux-perf)");
    }
    which("perf").context("linux-perf installed, but no `perf` on PATH")
}

/// Runs the profile and prints both reports.
pub fn profile(
    ws: &Workspace,
    opts: &VmOpts,
    target: &str,
    runtime: u32,
    peer: Peer,
    rw: &str,
) -> Result<()> {
    let payload = Payload {
        script: script(target, runtime, peer, rw),
        extra_bins: vec![("perf".to_string(), perf_binary()?)],
    };
    let outcome = run_payload(ws, &payload, opts)?;
    if outcome.code != 0 {
        bail!("the profile run failed (exit status {})", outcome.code);
    }
    let mut iops = Vec::new();
    for (label, json) in fio::sections(&outcome.output) {
        let r = fio::parse(&json).with_context(|| format!("fio results of {label}"))?;
        iops.push((label, r.iops));
    }
    let mut inside = false;
    for line in outcome.output.lines() {
        if line.starts_with("XTASK-PROFILE-BEGIN") {
            inside = true;
        } else if line.starts_with("XTASK-PROFILE-END") {
            inside = false;
            println!();
        } else if inside {
            println!("{line}");
        }
    }
    for (label, v) in &iops {
        println!("fio 4k {rw} qd64, 1 job, {runtime} s: {label}: {v:.0} IOPS");
    }
    if let [(_, ublk), (peer, theirs)] = &iops[..] {
        println!("ratio ublk / {peer}: {:.2}", ublk / theirs);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse_and_fill_only_for_zram() {
        for (peer, rw) in [(Peer::NullBlk, "randread"), (Peer::Zram, "randwrite")] {
            let text = script("compress --path /tmp/p.img", 5, peer, rw);
            let ok = std::process::Command::new("sh")
                .args(["-n", "-c", &text])
                .status()
                .expect("sh");
            assert!(ok.success(), "{peer:?}: {text}");
            assert!(text.contains(&format!("--rw={rw}")));
            assert_eq!(text.contains("--name=fill"), peer == Peer::Zram, "{text}");
            assert_eq!(text.contains("/dev/zram0"), peer == Peer::Zram, "{text}");
        }
    }
}
