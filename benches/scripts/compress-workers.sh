#!/bin/sh
# Run in the VM: cargo xtask vm -- sh -c "$(cat benches/scripts/compress-workers.sh)"
# zram lz4 vs ublk compress (lz4 and zstd, inline and with 2 compression workers) over tmpfs
# files, as the bench sets them up: 1 GiB, 2 queues of depth 128, filled over 256 MiB with
# half-compressible data; then 4k randwrite and randread qd64, 1 job, ROUNDS (3) alternating.
DATA="--size=256M --buffer_compress_percentage=50 --buffer_compress_chunk=4k --refill_buffers --randseed=11"
iops() { fio --name=t --filename="$1" --ioengine=io_uring --direct=1 --rw=$2 --bs=4k \
  --iodepth=64 --numjobs=1 --time_based --ramp_time=1 --runtime=2 $DATA --output-format=terse \
  --terse-version=3 2>/dev/null | awk -F';' -v rw=$2 '{ if (rw == "randread") print $8; else print $49 }'; }
dev() { ublk add compress --size 1G --queues 2 --depth 128 "$@" | sed -n 's/.*"path":"\([^"]*\)".*/\1/p'; }
insmod /lib/modules/lz4hc_compress.ko 2>/dev/null; insmod /lib/modules/zram.ko num_devices=1
echo lz4 >/sys/block/zram0/comp_algorithm; echo 1G >/sys/block/zram0/disksize
A=$(dev --path /tmp/a.img); B=$(dev --path /tmp/b.img --workers 2)
C=$(dev --path /tmp/c.img --algo zstd); D=$(dev --path /tmp/d.img --algo zstd --workers 2)
for p in /dev/zram0 $A $B $C $D; do
  fio --name=fill --filename=$p --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=16 $DATA --end_fsync=1 >/dev/null || echo "fill $p failed"
done
for rw in randwrite randread; do for r in $(seq 1 ${ROUNDS:-3}); do
  z=$(iops /dev/zram0 $rw); a=$(iops $A $rw); b=$(iops $B $rw); c=$(iops $C $rw); d=$(iops $D $rw)
  echo "RESULT $rw round=$r zram=$z lz4=$a lz4_workers2=$b zstd=$c zstd_workers2=$d"
done; done
ublk del --all
