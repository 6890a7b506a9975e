//! Shell helpers shared by the generated payload scripts (busybox `sh`
//! compatible, also fine for dash/bash when run natively).

use crate::fio::SH_RUN_FIO;

/// Helper functions:
///
/// * `ublk_add PREFIX ARGS...` runs `ublk add ARGS...`, prints its JSON line
///   and sets `${PREFIX}_id` / `${PREFIX}_dev` from the `dev_id` / `path`
///   fields, then waits for the block device node.
/// * `wait_blk DEV` waits up to 10 s for a block device node.
/// * `load_mod NAME PARAMS...` insmods `/lib/modules/NAME.ko` (VM) or
///   falls back to `modprobe` (native).
/// * `run_fio LABEL FIO-ARGS...` (see [`crate::fio`]).
pub fn prelude() -> String {
    let helpers = r#"
wait_blk() {
    _i=0
    while [ ! -b "$1" ] && [ "$_i" -lt 100 ]; do sleep 0.1; _i=$((_i + 1)); done
    [ -b "$1" ] || { echo "block device $1 did not appear" >&2; return 1; }
}

ublk_add() {
    _prefix=$1; shift
    # Redirect to a file, not a pipe: a daemonized server keeping the pipe
    # open must not block us.
    ublk add "$@" >/tmp/ublk-add.out || {
        echo "ublk add $* failed" >&2; cat /tmp/ublk-add.out >&2; return 1;
    }
    cat /tmp/ublk-add.out
    _json=$(grep '^[[:space:]]*{' /tmp/ublk-add.out | tail -n 1)
    _id=$(printf '%s\n' "$_json" | sed -n 's/.*"dev_id"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p')
    _dev=$(printf '%s\n' "$_json" | sed -n 's/.*"path"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
    [ -n "$_id" ] || { echo "cannot find dev_id in the output of ublk add" >&2; return 1; }
    [ -n "$_dev" ] || _dev=/dev/ublkb$_id
    eval "${_prefix}_id=\$_id; ${_prefix}_dev=\$_dev"
    wait_blk "$_dev"
}

load_mod() {
    _m=$1; shift
    if [ -e "/lib/modules/$_m.ko" ]; then
        insmod "/lib/modules/$_m.ko" "$@"
    else
        modprobe "$_m" "$@"
    fi
}
"#;
    format!("set -u\n{helpers}{SH_RUN_FIO}\n")
}
