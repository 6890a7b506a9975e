#!/bin/sh
# Run in the VM: cargo xtask vm -- sh -c "$(cat benches/scripts/peer-perf.sh)" (the host needs perf).
# Where libublk's time goes (1 queue, 4k randread qd64), beside ublk null batch-zc.
echo 0 > /proc/sys/kernel/kptr_restrict
libublk-null --queues 1 --depth 128 --size 1073741824 >/tmp/s.out 2>/tmp/s.err & SPID=$!
i=0; while ! grep -q '"dev_id"' /tmp/s.out 2>/dev/null; do sleep 0.1; i=$((i+1)); [ $i -gt 150 ] && break; done
LDEV=$(sed -n 's/.*"path"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' /tmp/s.out | head -n1)
UDEV=$(ublk add null --zero-copy --batch --size 1G --queues 1 --depth 128 | sed -n 's/.*"path":"\([^"]*\)".*/\1/p')
sleep 1
for pair in "libublk:$LDEV" "ublk:$UDEV"; do
  name=${pair%%:*}; path=${pair#*:}
  perf record -a -g -e cpu-clock -F 2000 -o /tmp/$name.data -q 2>/dev/null & PERF=$!
  sleep 1
  fio --name=t --filename="$path" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=64 --numjobs=1 --time_based --runtime=4 --output-format=terse --terse-version=3 2>/dev/null | awk -F';' -v n=$name '{print "IOPS", n, $8}'
  kill -INT $PERF; wait $PERF
  echo "== $name by comm,dso"
  perf report -i /tmp/$name.data --stdio --no-children -g none --sort comm,dso --percent-limit 1 2>/dev/null | grep -v '^#' | grep -v '^$'
  echo "== $name by sym"
  perf report -i /tmp/$name.data --stdio --no-children -g none --sort comm,sym --percent-limit 0.7 2>/dev/null | grep -v '^#' | grep -v '^$' | grep -v swapper | head -45
done
kill -TERM $SPID; wait $SPID
ublk del --all
