//! The benchmark's guest script: device setup, the alternating fio runs and
//! teardown, as one POSIX `sh` payload (busybox in the VM).

use super::{
    md_build_command, md_raid1_command, mirror_tree, stripe_tree, Device, Plan, RebuildKind, Role,
    Setup, BENCH_FILE, BRD_PAIR, BRD_PARAMS, COMPRESS_DATA, COMPRESS_SPAN_MIB, CORPUS, CORPUS_MIB,
    DEVICE_MIB, LIBUBLK_QUEUES, MD_RAID1_DEV, MD_SPEED_LIMIT_KIB, MIRROR_PAIR, ON_FILES,
    RBD_CLUSTER_DIR, RBD_IMAGE, RBD_SPAN_MIB, UBLK_QUEUES, UBLK_STACK_QUEUES,
};
use crate::scripts::prelude;
use std::fmt::Write as _;

/// The fio run label: `device.test.jJOBS.rROUND`.
pub fn label(device: &str, test: &str, jobs: u32, round: u32) -> String {
    format!("{device}.{test}.j{jobs}.r{round}")
}

/// Parses a [`label`].
pub fn parse_label(label: &str) -> Option<(String, String, u32, u32)> {
    let parts: Vec<&str> = label.split('.').collect();
    let [device, test, jobs, round] = parts[..] else {
        return None;
    };
    Some((
        device.to_string(),
        test.to_string(),
        jobs.strip_prefix('j')?.parse().ok()?,
        round.strip_prefix('r')?.parse().ok()?,
    ))
}

/// Shell helpers of the benchmark script (on top of [`prelude`]).
const SH_HELPERS: &str = r#"
UBLK_IDS=""
TEARDOWN=""
cleanup() {
    echo "== bench: removing the devices"
    for id in $UBLK_IDS; do ublk del "$id" || echo "bench: ublk del $id failed" >&2; done
    eval "$TEARDOWN"
}
trap cleanup EXIT

# libublk_add PREFIX ARGS...: starts libublk-null in the background and sets
# ${PREFIX}_pid and ${PREFIX}_dev once it printed its JSON line.
libublk_add() {
    _prefix=$1; shift
    _out=/tmp/libublk-$_prefix.out
    libublk-null "$@" >"$_out" 2>"/tmp/libublk-$_prefix.err" &
    _pid=$!
    _i=0
    while ! grep -q '"dev_id"' "$_out" 2>/dev/null; do
        if ! kill -0 "$_pid" 2>/dev/null || [ "$_i" -ge 150 ]; then
            echo "libublk-null $* did not start" >&2
            cat "/tmp/libublk-$_prefix.err" >&2
            kill "$_pid" 2>/dev/null
            return 1
        fi
        sleep 0.1
        _i=$((_i + 1))
    done
    cat "$_out"
    _dev=$(sed -n 's/.*"path"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$_out" | head -n 1)
    eval "${_prefix}_pid=\$_pid; ${_prefix}_dev=\$_dev"
    wait_blk "$_dev"
}

# loop_add FILE: sets LOOP_DEV; direct I/O with util-linux losetup (called by
# path: busybox sh prefers its own losetup applet, which has no --direct-io).
loop_add() {
    LOOP_DEV=""
    for _l in /bin/losetup /sbin/losetup /usr/sbin/losetup; do
        [ -x "$_l" ] || continue
        LOOP_DEV=$("$_l" -f --show --direct-io=on "$1" 2>/dev/null) && break
        LOOP_DEV=""
    done
    if [ -z "$LOOP_DEV" ]; then
        LOOP_DEV=$(losetup -f) && losetup "$LOOP_DEV" "$1" || return 1
    fi
    wait_blk "$LOOP_DEV" || return 1
    echo "XTASK-BENCH-NOTE loop: $LOOP_DEV over $1, direct I/O (sysfs loop/dio): $(cat "/sys/block/${LOOP_DEV#/dev/}/loop/dio" 2>/dev/null || echo unknown)"
}

# md_modules: loads md-mod and raid1 unless loaded.
md_modules() {
    { [ -d /sys/module/md_mod ] || load_mod md-mod; } &&
    { [ -d /sys/module/raid1 ] || load_mod raid1; }
}

# md_idle MD: waits (up to 600 s) until /dev/MD runs no resync or recovery;
# polls with the shell's own `read`, so the wait costs no process.
md_idle() {
    _i=0
    while :; do
        _action=""
        read -r _action <"/sys/block/$1/md/sync_action" || return 1
        [ "$_action" = idle ] && return 0
        [ "$_i" -ge 2400 ] && { echo "md $1 still runs $_action after 600 s" >&2; return 1; }
        sleep 0.25
        _i=$((_i + 1))
    done
}

# mirror_in_sync ID: waits (up to 600 s) until every leg of the two-leg mirror
# at the root of ublk device ID is in sync; sets MIRROR_COPIED to its
# rebuild_copied_bytes.
mirror_in_sync() {
    _i=0
    while :; do
        _status=$(ublk status "$1" --json) || return 1
        case $_status in
        *'"in_sync":2,'*)
            MIRROR_COPIED=$(printf '%s\n' "$_status" | sed -n 's/.*"rebuild_copied_bytes":\([0-9][0-9]*\).*/\1/p')
            return 0
            ;;
        esac
        [ "$_i" -ge 2400 ] && { echo "mirror $1 not in sync after 600 s: $_status" >&2; return 1; }
        sleep 0.25
        _i=$((_i + 1))
    done
}

# zero_block0 DEV...: zeroes the first 4 KiB (where a mirror's superblock is)
# so that the next assembly makes a new mirror.
zero_block0() {
    for _d in "$@"; do
        dd if=/dev/zero of="$_d" bs=4096 count=1 conv=fsync 2>/dev/null || return 1
    done
}

# discard DEV...: frees every brd page of the disks (they read zeroes after).
discard() {
    for _d in "$@"; do
        blkdiscard "$_d" || dd if=/dev/zero of="$_d" bs=1M count=4 conv=fsync 2>/dev/null || return 1
    done
}

uptime_s() { read -r _up _ </proc/uptime; echo "$_up"; }

# compress_fill NAME DEV: writes the compression rows' data over their span,
# fsync'ed, so that every row holds the same bytes before its reads.
compress_fill() {
    fio --name=fill --filename="$2" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
        --iodepth=16 --size="$COMPRESS_SPAN_MIB"M --end_fsync=1 $COMPRESS_DATA >/dev/null || return 1
}

# compress_files DEV: discards DEV, then writes the real files of the corpus over its start,
# fsync'ed, so that its ratio is theirs alone.
compress_files() {
    blkdiscard "$1" || return 1
    dd if="$CORPUS" of="$1" bs=1M conv=fsync 2>/dev/null || return 1
}

# zram_ratio NAME [WHEN]: prints zram0's mm_stat (orig_data_size compr_data_size
# mem_used_total ...) as a note, "after the fill" unless WHEN says when.
zram_ratio() {
    read -r _orig _compr _used _ </sys/block/zram0/mm_stat || return 1
    echo "XTASK-BENCH-NOTE compression of $1 ${2:-after the fill}: orig_data_size $_orig, compr_data_size $_compr, mem_used_total $_used (mm_stat); ratio $(awk "BEGIN {printf \"%.3f\", $_orig / $_compr}"), by memory used $(awk "BEGIN {printf \"%.3f\", $_orig / $_used}")"
}

# ublk_ratio NAME ID [WHEN DEV]: prints the compress node's status fields as a note,
# "after the fill" unless WHEN says when; with DEV, after a flush of it (sync DEV
# fsyncs the device: the commit frees what overwrites left).
ublk_ratio() {
    if [ -n "${4:-}" ]; then sync "$4" || return 1; fi
    _st=$(ublk status "$2" --json) || return 1
    _field() { printf '%s\n' "$_st" | sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
    _data=$(_field data_bytes); _stored=$(_field stored_bytes); _alloc=$(_field allocated_bytes)
    echo "XTASK-BENCH-NOTE compression of $1 ${3:-after the fill}: data_bytes $_data, stored_bytes $_stored, allocated_bytes $_alloc (ublk status); ratio $(awk "BEGIN {printf \"%.3f\", $_data / $_stored}"), by space allocated $(awk "BEGIN {printf \"%.3f\", $_data / $_alloc}")"
}
"#;

/// The benchmark script.
pub fn script(plan: &Plan) -> String {
    let mut s = prelude();
    s.push_str(SH_HELPERS);
    let _ = writeln!(
        s,
        "COMPRESS_SPAN_MIB={COMPRESS_SPAN_MIB}\nCOMPRESS_DATA=\"{COMPRESS_DATA}\"\nCORPUS={CORPUS}"
    );
    s.push_str(
        r#"
echo "XTASK-BENCH-KERNEL $(uname -r)"
echo "XTASK-BENCH-CPUS $(nproc)"
"#,
    );
    if plan.uses_file() {
        let _ = write!(
            s,
            r#"
echo "== bench: filling {BENCH_FILE} ({DEVICE_MIB} MiB, tmpfs)"
dd if=/dev/zero of={BENCH_FILE} bs=1M count={DEVICE_MIB} 2>/dev/null || echo "bench: dd {BENCH_FILE} failed" >&2
TEARDOWN="rm -f {BENCH_FILE}; $TEARDOWN"
"#
        );
    }
    if plan.uses_brd() {
        // One brd for all rows: loading it per device would clash.
        let _ = write!(
            s,
            r#"
echo "== bench: loading brd ({BRD_PARAMS})"
if load_mod brd {BRD_PARAMS}; then
    TEARDOWN="rmmod brd; $TEARDOWN"
else
    echo "bench: loading brd failed" >&2
fi
"#
        );
    }
    if plan.uses_rbd() {
        // One cluster and one image for both RBD rows, filled once through a ublk device
        // (deleted before the rows are set up) so that reads reach real objects. The image
        // has no exclusive-lock feature: both rows keep it open, and its writes would
        // otherwise move the lock from one client to the other at each run.
        let _ = write!(
            s,
            r#"
echo "== bench: starting the Ceph test cluster in {RBD_CLUSTER_DIR}"
RBD_READY=""
if CEPH_CONF=$(ceph-test-cluster start {RBD_CLUSTER_DIR}); then
    export CEPH_CONF
    TEARDOWN="ceph-test-cluster stop {RBD_CLUSTER_DIR}; $TEARDOWN"
    if ceph-test-cluster create {RBD_CLUSTER_DIR} {RBD_IMAGE} 256M layering &&
        ublk_add rbfill rbd --pool rbd --image {RBD_IMAGE} &&
        fio --name=fill --filename="$rbfill_dev" --ioengine=io_uring --direct=1 --rw=write \
            --bs=1M --iodepth=16 --size={RBD_SPAN_MIB}M --end_fsync=1 >/dev/null; then
        RBD_READY=1
    else
        echo "bench: creating or filling rbd/{RBD_IMAGE} failed" >&2
    fi
    [ -n "$rbfill_id" ] && ublk del "$rbfill_id"
else
    echo "bench: the Ceph test cluster did not start" >&2
fi
"#
        );
    }
    rebuild_rounds(&mut s, plan);
    for (i, d) in plan.devices.iter().enumerate() {
        let (setup, teardown) = match &d.setup {
            Setup::Ublk(args) => (
                format!(
                    r#"ublk_add u{i} {args} {UBLK_QUEUES} && DEV=$u{i}_dev && UBLK_IDS="$UBLK_IDS $u{i}_id""#
                ),
                ":".to_string(),
            ),
            Setup::Libublk(args) => (
                format!("libublk_add l{i} {args} {LIBUBLK_QUEUES} && DEV=$l{i}_dev"),
                format!(
                    r#"kill -TERM $l{i}_pid; wait $l{i}_pid || echo "bench: libublk-null exited with $?" >&2"#
                ),
            ),
            Setup::Kmod {
                module,
                params,
                dev,
            } => (
                format!(r#"load_mod {module} {params} && DEV={dev} && wait_blk "$DEV""#),
                format!("rmmod {module}"),
            ),
            Setup::Loop => (
                format!("load_mod loop && loop_add {BENCH_FILE} && DEV=$LOOP_DEV"),
                format!("losetup -d $DEV_{i}; rmmod loop 2>/dev/null"),
            ),
            Setup::Brd(dev) => (format!(r#"DEV={dev} && wait_blk "$DEV""#), ":".to_string()),
            Setup::Zram(algo) => (
                format!(
                    r#"{{ [ -d /sys/module/lz4hc_compress ] || load_mod lz4hc_compress; }} && load_mod zram num_devices=1 && echo {algo} >/sys/block/zram0/comp_algorithm && echo {DEVICE_MIB}M >/sys/block/zram0/disksize && DEV=/dev/zram0 && wait_blk "$DEV""#
                ),
                "echo 1 >/sys/block/zram0/reset; rmmod zram".to_string(),
            ),
            Setup::RbdNbd => (
                format!(
                    r#"[ -n "$RBD_READY" ] && {{ [ -d /sys/module/nbd ] || load_mod nbd; }} && DEV=$(rbd-nbd map rbd/{RBD_IMAGE}) && wait_blk "$DEV""#
                ),
                format!("rbd-nbd unmap $DEV_{i}"),
            ),
            Setup::UblkRbd(args) => (
                format!(
                    r#"[ -n "$RBD_READY" ] && ublk_add u{i} rbd --pool rbd --image {RBD_IMAGE} {args} {UBLK_STACK_QUEUES} && DEV=$u{i}_dev && UBLK_IDS="$UBLK_IDS $u{i}_id""#
                ),
                ":".to_string(),
            ),
            Setup::MdRaid0 => (
                format!(
                    "wait_blk {} && wait_blk {} && \
                     {{ [ -d /sys/module/md_mod ] || load_mod md-mod; }} && \
                     {{ [ -d /sys/module/raid0 ] || load_mod raid0; }} && \
                     {} && DEV=/dev/md0 && wait_blk \"$DEV\"",
                    BRD_PAIR[0],
                    BRD_PAIR[1],
                    md_build_command()
                ),
                "mdadm --stop /dev/md0; rmmod raid0 md_mod 2>/dev/null".to_string(),
            ),
            Setup::UblkStripe(args) => (
                format!(
                    r#"wait_blk {} && wait_blk {} && ublk_add u{i} stack '{}' {args} {UBLK_STACK_QUEUES} && DEV=$u{i}_dev && UBLK_IDS="$UBLK_IDS $u{i}_id""#,
                    BRD_PAIR[0],
                    BRD_PAIR[1],
                    stripe_tree()
                ),
                ":".to_string(),
            ),
            Setup::MdRaid1 => (
                format!(
                    "wait_blk {a} && wait_blk {b} && md_modules && {} && DEV={MD_RAID1_DEV} && \
                     wait_blk \"$DEV\" && md_idle {md}",
                    md_raid1_command(true),
                    a = MIRROR_PAIR[0],
                    b = MIRROR_PAIR[1],
                    md = md_name(),
                ),
                format!("mdadm --stop {MD_RAID1_DEV}; rmmod raid1 md_mod 2>/dev/null"),
            ),
            Setup::UblkMirror(args) => (
                format!(
                    r#"wait_blk {a} && wait_blk {b} && zero_block0 {a} {b} && ublk_add u{i} stack '{}' {args} {UBLK_STACK_QUEUES} && DEV=$u{i}_dev && UBLK_IDS="$UBLK_IDS $u{i}_id""#,
                    mirror_tree(true),
                    a = MIRROR_PAIR[0],
                    b = MIRROR_PAIR[1],
                ),
                ":".to_string(),
            ),
        };
        let setup = if d.compresses() {
            let ratio = match (&d.setup, d.role) {
                (Setup::Zram(_), _) => format!("zram_ratio {}", d.name),
                (Setup::Ublk(_), Role::UblkCompress) => format!("ublk_ratio {} $u{i}_id", d.name),
                _ => unreachable!("a compression row is zram or ublk compress"),
            };
            format!(r#"{setup} && compress_fill {} "$DEV" && {ratio}"#, d.name)
        } else {
            setup
        };
        let _ = write!(
            s,
            r#"
DEV=""
echo "== bench: setting up {name}"
if {setup}; then
    DEV_{i}=$DEV
    TEARDOWN="{teardown}; $TEARDOWN"
    echo "== bench: {name} is $DEV"
else
    echo "XTASK-BENCH-SKIP {name}"
    DEV_{i}=""
fi
"#,
            name = d.name,
            teardown = teardown.replace('"', r#"\""#).replace('$', r"\$"),
        );
    }
    let total = plan.runs();
    let mut k = 0;
    let n = plan.devices.len();
    for round in 1..=plan.rounds {
        for t in &plan.tests {
            for &jobs in &plan.jobs {
                for step in 0..n {
                    // Rotate the device order every round.
                    let i = (step + round as usize - 1) % n;
                    let d = plan.devices[i];
                    if !d.runs(t) || !d.runs_jobs(jobs) {
                        continue;
                    }
                    k += 1;
                    let lbl = label(d.name, t.name, jobs, round);
                    let mut args = format!(
                        "--name={test} --filename=\"$DEV_{i}\" --ioengine=io_uring --direct=1 \
                         --rw={rw} --bs={bs} --iodepth={qd} --numjobs={jobs} --group_reporting \
                         --time_based --runtime={rt} --ramp_time={ramp}",
                        test = t.name,
                        rw = t.rw,
                        bs = t.bs,
                        qd = t.iodepth,
                        rt = plan.runtime,
                        ramp = plan.ramp,
                    );
                    let span = d.span_mib();
                    if t.rw.starts_with("rand") {
                        args.push_str(" --randrepeat=0 --norandommap");
                    }
                    if d.compresses() {
                        let _ = write!(args, " {COMPRESS_DATA}");
                    }
                    if t.rw.starts_with("rand") || jobs == 1 {
                        let _ = write!(args, " --size={span}M");
                    } else {
                        // Each sequential reader streams its own part of the device.
                        let part = span / jobs;
                        let _ = write!(args, " --size={part}M --offset_increment={part}M");
                    }
                    let _ = write!(
                        s,
                        r#"
if [ -n "$DEV_{i}" ]; then
    echo "== bench [{k}/{total}] round {round}/{rounds}: {name} {test} jobs={jobs}"
    run_fio {lbl} {args} || echo "XTASK-BENCH-FAIL {lbl}"
fi
"#,
                        rounds = plan.rounds,
                        name = d.name,
                        test = t.name,
                    );
                }
            }
        }
    }
    // The note of compressing device `i`'s ratio `when` (the ublk rows after a flush).
    let ratio_note = |i: usize, d: &Device, when: &str| match (&d.setup, d.role) {
        _ if !d.compresses() => None,
        (Setup::Zram(_), _) => Some(format!("zram_ratio {} '{when}'", d.name)),
        (_, Role::UblkCompress) => Some(format!(
            r#"ublk_ratio {} $u{i}_id '{when}' "$DEV_{i}""#,
            d.name
        )),
        _ => None,
    };
    // Where the compression ratios stand after the runs' random writes.
    for (i, d) in plan.devices.iter().enumerate() {
        let Some(ratio) = ratio_note(i, d, "after the runs") else {
            continue;
        };
        let _ = write!(s, "\nif [ -n \"$DEV_{i}\" ]; then {ratio}; fi\n");
    }
    // Then the same real files on each of them: half-random blocks leave a codec nothing
    // to find but the zeroes, so this is where zstd's ratio shows.
    let mut corpus = false;
    for (i, d) in plan.devices.iter().enumerate() {
        let Some(ratio) = ratio_note(i, d, ON_FILES) else {
            continue;
        };
        if !corpus {
            corpus = true;
            // busybox's head takes no unit suffix.
            let corpus_bytes = u64::from(CORPUS_MIB) << 20;
            let _ = write!(
                s,
                r#"
echo "== bench: the real files: the first {CORPUS_MIB} MiB of tar /bin /lib /usr"
tar -cf - /bin /lib /usr 2>/dev/null | head -c {corpus_bytes} >{CORPUS}
echo "XTASK-BENCH-NOTE real files: $(wc -c <{CORPUS}) bytes of tar /bin /lib /usr (the guest's programs, libraries and kernel modules)"
"#
            );
        }
        let _ = write!(
            s,
            "\nif [ -n \"$DEV_{i}\" ]; then compress_files \"$DEV_{i}\" && {ratio}; fi\n"
        );
    }
    if corpus {
        let _ = writeln!(s, "rm -f {CORPUS}");
    }
    s.push_str("\necho \"== bench: done\"\n");
    s
}

/// The name of [`MD_RAID1_DEV`] under `/sys/block`.
fn md_name() -> &'static str {
    MD_RAID1_DEV.trim_start_matches("/dev/")
}

/// The rebuild rounds: each times one new mirror over [`MIRROR_PAIR`] until
/// its leg 1 is in sync, on freshly discarded disks (blank, and no memory
/// left allocated by the previous round), and prints
/// `XTASK-BENCH-REBUILD NAME ROUND BYTES T0 T1`. The rows alternate, their
/// order rotated every round; the disks are discarded again at the end, for
/// the devices set up after.
fn rebuild_rounds(s: &mut String, plan: &Plan) {
    if plan.rebuilds.is_empty() {
        return;
    }
    let (a, b) = (MIRROR_PAIR[0], MIRROR_PAIR[1]);
    let _ = write!(
        s,
        r#"
echo "== bench: rebuilds"
wait_blk {a} && wait_blk {b} || echo "bench: no brd disks for the rebuilds" >&2
"#
    );
    if plan.uses_mdadm() {
        let _ = write!(
            s,
            r#"if md_modules; then
    echo {MD_SPEED_LIMIT_KIB} >/proc/sys/dev/raid/speed_limit_max
    TEARDOWN="rmmod raid1 md_mod 2>/dev/null; $TEARDOWN"
else
    echo "bench: loading md failed" >&2
fi
"#
        );
    }
    let n = plan.rebuilds.len();
    for round in 1..=plan.rounds {
        for step in 0..n {
            let rb = plan.rebuilds[(step + round as usize - 1) % n];
            let lbl = format!("{}.r{round}", rb.name);
            let run = match rb.kind {
                RebuildKind::Md => format!(
                    r#"T0=$(uptime_s) && {} >/dev/null && md_idle {md} && T1=$(uptime_s) &&
        read -r KIB </sys/block/{md}/md/component_size &&
        echo "XTASK-BENCH-REBUILD {name} {round} $((KIB * 1024)) $T0 $T1"
    OK=$?
    mdadm --stop {MD_RAID1_DEV} >/dev/null 2>&1"#,
                    md_raid1_command(false),
                    md = md_name(),
                    name = rb.name,
                ),
                RebuildKind::Mirror => format!(
                    r#"T0=$(uptime_s) && ublk_add rb stack '{}' {UBLK_STACK_QUEUES} >/dev/null &&
        mirror_in_sync "$rb_id" && T1=$(uptime_s) &&
        echo "XTASK-BENCH-REBUILD {name} {round} $MIRROR_COPIED $T0 $T1"
    OK=$?
    [ -n "$rb_id" ] && ublk del "$rb_id""#,
                    mirror_tree(false),
                    name = rb.name,
                ),
            };
            let _ = write!(
                s,
                r#"
echo "== bench rebuild round {round}/{rounds}: {name}"
rb_id=""
if discard {a} {b}; then
    {run}
    [ "$OK" -eq 0 ] || echo "XTASK-BENCH-FAIL {lbl}"
else
    echo "XTASK-BENCH-FAIL {lbl}"
fi
"#,
                rounds = plan.rounds,
                name = rb.name,
            );
        }
    }
    let _ = writeln!(
        s,
        r#"discard {a} {b} || echo "bench: discarding {a} {b} failed" >&2"#
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Options;

    fn make_plan(quick: bool) -> Plan {
        let opts = Options {
            all: !quick,
            rounds: 3,
            runtime: 2,
            ramp: 1,
            quick,
            filter: Vec::new(),
        };
        Plan::new(&opts, true, true).expect("plan")
    }

    #[test]
    fn labels_round_trip() {
        assert_eq!(
            parse_label(&label("ublk-null-zc", "randread-4k-qd1", 2, 3)),
            Some(("ublk-null-zc".into(), "randread-4k-qd1".into(), 2, 3))
        );
        assert_eq!(parse_label("a.b.c"), None);
        assert_eq!(parse_label("a.b.x2.r1"), None);
    }

    #[test]
    fn script_runs_every_combination_once() {
        let plan = make_plan(false);
        let s = script(&plan);
        assert_eq!(s.matches("run_fio ").count(), plan.runs());
        assert!(s.contains(&format!("[{0}/{0}]", plan.runs())));
        assert!(s.contains("libublk_add"));
        assert!(s.contains("--size=512M --offset_increment=512M"));
        assert!(s.contains(&format!("--size={DEVICE_MIB}M")));
        let quick = make_plan(true);
        assert!(!script(&quick).contains(BENCH_FILE));
        assert!(!script(&quick).contains("mdadm"));
    }

    #[test]
    fn stripe_rows_share_one_brd_pair() {
        let plan = make_plan(false);
        let s = script(&plan);
        assert_eq!(s.matches("load_mod brd ").count(), 1);
        assert!(s.contains(
            "mdadm --build /dev/md0 --level=0 --raid-devices=2 --chunk=64 /dev/ram1 /dev/ram2"
        ));
        assert!(s.contains("stack 'stripe(file:/dev/ram1,file:/dev/ram2,chunk=64K)'"));
        // The stripe rows run three tests, over 512 MiB.
        for name in ["md-raid0", "ublk-stripe-zc", "ublk-stripe-copy"] {
            let runs = s.matches(&format!("run_fio {name}.")).count();
            assert_eq!(runs, 3 * 2 * 3, "{name}");
        }
        assert!(s.contains("--size=256M --offset_increment=256M"));
        assert!(!s.contains("run_fio md-raid0.randread-4k-qd1."));
        // md raid0 is set up before the stripes, the pair after brd is loaded.
        let at = |what: &str| s.find(what).unwrap_or_else(|| panic!("{what}"));
        assert!(at("load_mod brd") < at("setting up md-raid0"));
        assert!(at("setting up md-raid0") < at("setting up ublk-stripe-zc"));
    }

    #[test]
    fn compression_rows_are_filled_alike_and_report_their_ratio() {
        let opts = Options {
            all: false,
            rounds: 3,
            runtime: 2,
            ramp: 1,
            quick: false,
            filter: vec!["zram".into(), "ublk-compress".into()],
        };
        let plan = Plan::new(&opts, true, true).expect("plan");
        let s = script(&plan);
        assert!(s.contains(
            "load_mod zram num_devices=1 && echo lz4 >/sys/block/zram0/comp_algorithm && \
             echo 1024M >/sys/block/zram0/disksize"
        ));
        assert!(s.contains("compress_fill zram-lz4 \"$DEV\" && zram_ratio zram-lz4"));
        assert!(s.contains(
            "ublk_add u1 compress --path /dev/shm/ublk-compress-lz4.img --algo lz4 --size 1G"
        ));
        assert!(s.contains(
            "compress_fill ublk-compress-zstd \"$DEV\" && ublk_ratio ublk-compress-zstd $u2_id"
        ));
        // And again after the runs, the ublk rows after a flush.
        assert!(s.contains("then zram_ratio zram-lz4 'after the runs'; fi"));
        assert!(
            s.contains("then ublk_ratio ublk-compress-lz4 $u1_id 'after the runs' \"$DEV_1\"; fi")
        );
        let end = s.rfind("after the runs").expect("ratios after the runs");
        assert!(s.rfind("run_fio").expect("runs") < end);
        for name in ["zram-lz4", "ublk-compress-lz4", "ublk-compress-zstd"] {
            let runs = s.matches(&format!("run_fio {name}.")).count();
            assert_eq!(runs, 2 * 2 * 3, "{name}");
        }
        assert_eq!(
            s.matches(
                "--buffer_compress_percentage=50 --buffer_compress_chunk=4k --refill_buffers \
                 --randseed=11 --size=256M"
            )
            .count(),
            3 * 2 * 2 * 3
        );
        assert!(!s.contains("run_fio zram-lz4.seqread"));
        // Then the real files, once for all, on each after a discard.
        assert_eq!(s.matches("tar -cf - /bin /lib /usr").count(), 1);
        assert!(
            s.contains("then compress_files \"$DEV_0\" && zram_ratio zram-lz4 'on real files'; fi")
        );
        assert!(s.contains(
            "then compress_files \"$DEV_2\" && ublk_ratio ublk-compress-zstd $u2_id 'on real files' \"$DEV_2\"; fi"
        ));
        assert!(s.rfind("'on real files'").expect("files") > end);
    }

    #[test]
    fn mirror_rows_and_rebuilds_share_one_pair() {
        let opts = Options {
            all: false,
            rounds: 3,
            runtime: 2,
            ramp: 1,
            quick: false,
            filter: vec!["md-raid1".into(), "ublk-mirror".into()],
        };
        let plan = Plan::new(&opts, true, true).expect("plan");
        let s = script(&plan);
        assert!(s.contains("load_mod brd rd_nr=5 rd_size=1048576"));
        assert!(s.contains(
            "mdadm --create /dev/md1 --level=1 --raid-devices=2 --bitmap=internal \
             --assume-clean --run /dev/ram3 /dev/ram4"
        ));
        assert!(s.contains(
            "zero_block0 /dev/ram3 /dev/ram4 && ublk_add u1 stack \
             'mirror(file:/dev/ram3,file:/dev/ram4,assume_clean=true)' --buffer-mode zero-copy"
        ));
        // Two tests, two job counts, three rounds, over 512 MiB.
        for name in ["md-raid1", "ublk-mirror-zc", "ublk-mirror-copy"] {
            let runs = s.matches(&format!("run_fio {name}.")).count();
            assert_eq!(runs, 2 * 2 * 3, "{name}");
        }
        assert!(!s.contains("run_fio md-raid1.seqread"));
        assert!(s.contains("--size=512M"));
        // Three rounds of each rebuild, without --assume-clean / assume_clean.
        for round in 1..=3 {
            for name in ["md-raid1-resync", "ublk-mirror-rebuild"] {
                let marker = format!("XTASK-BENCH-REBUILD {name} {round} ");
                assert_eq!(s.matches(&marker).count(), 1, "{marker}");
            }
        }
        assert!(s.contains(
            "mdadm --create /dev/md1 --level=1 --raid-devices=2 --bitmap=internal --run \
             /dev/ram3 /dev/ram4 >/dev/null && md_idle md1"
        ));
        assert!(s.contains("ublk_add rb stack 'mirror(file:/dev/ram3,file:/dev/ram4)'"));
        // The rounds alternate, rotated: md first in round 1, the mirror first in round 2.
        let at = |what: &str| s.find(what).unwrap_or_else(|| panic!("{what}"));
        assert!(at("round 1/3: md-raid1-resync") < at("round 1/3: ublk-mirror-rebuild"));
        assert!(at("round 2/3: ublk-mirror-rebuild") < at("round 2/3: md-raid1-resync"));
        // The rebuilds run on discarded disks before any device is set up.
        assert!(at("load_mod brd") < at("== bench: rebuilds"));
        assert!(at("round 3/3: md-raid1-resync") < at("setting up md-raid1"));
        assert!(at("setting up md-raid1") < at("setting up ublk-mirror-zc"));
        assert!(s.contains("speed_limit_max"));
    }
}
