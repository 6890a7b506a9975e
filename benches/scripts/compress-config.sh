#!/bin/sh
# Run in the VM: cargo xtask vm -- sh -c "$(cat benches/scripts/compress-config.sh)"
# Compress vs zram: which ublk-side choice moves the 4k qd64 ratio (one boot, alternating):
# copy mode, --batch, a brd child with --direct, user copy; 3 rounds.
DATA="--size=256M --buffer_compress_percentage=50 --buffer_compress_chunk=4k --refill_buffers --randseed=11"
iops() { fio --name=t --filename="$1" --ioengine=io_uring --direct=1 --rw=$2 --bs=4k \
  --iodepth=64 --numjobs=1 --time_based --ramp_time=1 --runtime=2 $DATA --output-format=terse \
  --terse-version=3 2>/dev/null | awk -F';' -v rw=$2 '{ if (rw=="randread") print $8; else print $49 }'; }
dev() { ublk add "$@" --size 1G --queues 2 --depth 128 | sed -n 's/.*"path":"\([^"]*\)".*/\1/p'; }
insmod /lib/modules/lz4hc_compress.ko 2>/dev/null; insmod /lib/modules/zram.ko num_devices=1
echo lz4 >/sys/block/zram0/comp_algorithm; echo 1G >/sys/block/zram0/disksize
insmod /lib/modules/brd.ko rd_nr=1 rd_size=1048576
A=$(dev compress --path /tmp/a.img)
B=$(dev compress --path /tmp/b.img --batch)
C=$(dev compress --path /dev/ram0 --direct)
D=$(dev compress --path /tmp/d.img --buffer-mode user-copy)
echo "devs $A $B $C $D"
for p in /dev/zram0 $A $B $C $D; do
  fio --name=fill --filename=$p --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=16 $DATA --end_fsync=1 >/dev/null || echo "fill $p failed"
done
sleep 1
for rw in randread randwrite; do for r in 1 2 3; do
  z=$(iops /dev/zram0 $rw); a=$(iops $A $rw); b=$(iops $B $rw); c=$(iops $C $rw); d=$(iops $D $rw)
  echo "RESULT $rw round=$r zram=$z tmpfs_copy=$a tmpfs_batch=$b brd_direct=$c tmpfs_usercopy=$d"
done; done
ublk del --all
