#!/bin/sh
# Run in the VM: cargo xtask vm -- sh -c "$(cat benches/scripts/peer-config.sh)"
# (after `cargo xtask bench` has built libublk-null). Settings go in front of the script:
# sh -c "ROUNDS=5 QUEUES=1 CROWD=0; $(cat ...)". XTASK_ACCEL, XTASK_CPU and
# XTASK_MITIGATIONS=on on the host pick the TCG regime, the CPU model and the mitigations.
# Which difference between the issue's runner and the bench moves libublk's ratio to null_blk:
# queues per device (1 vs 2), idle devices beside (none vs 12), libublk's affinity (single vs kernel).
# 4k randread qd64, 1 job, ROUNDS (3) rounds alternating.
iops() { fio --name=t --filename="$1" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
  --iodepth=64 --numjobs=1 --time_based --ramp_time=1 --runtime=2 --output-format=terse \
  --terse-version=3 2>/dev/null | awk -F';' '{print $8}'; }
start_libublk() {  # $1 out-file tag, rest: args; sets LDEV, LPID
  tag=$1; shift
  libublk-null "$@" >/tmp/$tag.out 2>/tmp/$tag.err & LPID=$!
  i=0; while ! grep -q '"dev_id"' /tmp/$tag.out 2>/dev/null; do sleep 0.1; i=$((i+1)); [ $i -gt 150 ] && { cat /tmp/$tag.err; return 1; }; done
  LDEV=$(sed -n 's/.*"path"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' /tmp/$tag.out | head -n1)
  i=0; while [ ! -b "$LDEV" ]; do sleep 0.1; i=$((i+1)); [ $i -gt 100 ] && return 1; done
}
measure() {  # $1 label, $2 queues
  q=$2
  insmod /lib/modules/null_blk.ko queue_mode=2 irqmode=0 nr_devices=1 gb=1 submit_queues=$q hw_queue_depth=128
  start_libublk s --queues $q --depth 128 --size 1073741824; SDEV=$LDEV; SPID=$LPID
  start_libublk k --queues $q --depth 128 --size 1073741824 --affinity kernel; KDEV=$LDEV; KPID=$LPID
  UDEV=$(ublk add null --zero-copy --batch --size 1G --queues $q --depth 128 | sed -n 's/.*"path":"\([^"]*\)".*/\1/p')
  sleep 1
  for r in $(seq 1 ${ROUNDS:-3}); do
    a=$(iops /dev/nullb0); b=$(iops "$SDEV"); c=$(iops "$KDEV"); d=$(iops "$UDEV")
    echo "RESULT $1 queues=$q round=$r null_blk=$a libublk_single=$b libublk_kernel=$c ublk_batch_zc=$d"
  done
  kill -TERM $SPID $KPID; wait $SPID; wait $KPID
  ublk del "$(echo $UDEV | sed 's/.*ublkb//')" >/dev/null
  rmmod null_blk
}
echo "nproc=$(nproc)"
for q in ${QUEUES:-1 2}; do measure alone "$q"; done
[ "${CROWD:-1}" = 1 ] || exit 0
for i in 1 2 3 4 5 6; do ublk add null --size 1G --queues 2 --depth 128 >/dev/null; ublk add ram --size 64M --queues 2 --depth 128 >/dev/null; done
for q in ${QUEUES:-1 2}; do measure crowded "$q"; done
ublk del --all >/dev/null
