#!/bin/sh
# Run in the VM: cargo xtask vm -- sh -c "$(cat benches/scripts/ram-config.sh)", once per CPU model
# (XTASK_CPU on the host). brd vs the RAM target (user copy) vs null_blk, as the bench sets them
# up (2 queues of depth 128), 4k randread and randwrite qd64, 1 job, ROUNDS (3) rounds alternating.
iops() { fio --name=t --filename="$1" --ioengine=io_uring --direct=1 --rw=$2 --bs=4k \
  --iodepth=64 --numjobs=1 --time_based --ramp_time=1 --runtime=2 --size=256M \
  --output-format=terse --terse-version=3 2>/dev/null \
  | awk -F';' -v rw=$2 '{ if (rw == "randread") print $8; else print $49 }'; }
insmod /lib/modules/brd.ko rd_nr=1 rd_size=1048576
insmod /lib/modules/null_blk.ko queue_mode=2 irqmode=0 nr_devices=1 gb=1 submit_queues=2 hw_queue_depth=128
RAM=$(ublk add ram --buffer-mode user-copy --size 1G --queues 2 --depth 128 | sed -n 's/.*"path":"\([^"]*\)".*/\1/p')
for d in /dev/ram0 "$RAM"; do dd if=/dev/zero of=$d bs=1M count=256 oflag=direct 2>/dev/null; done
for rw in randread randwrite; do for r in $(seq 1 ${ROUNDS:-3}); do
  a=$(iops /dev/nullb0 $rw); b=$(iops /dev/ram0 $rw); c=$(iops "$RAM" $rw)
  echo "RESULT $rw round=$r null_blk=$a brd=$b ublk_ram_uc=$c"
done; done
ublk del --all >/dev/null
