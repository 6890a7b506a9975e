//! Running a shell payload either natively (host has `/dev/ublk-control`) or
//! inside a throw-away qemu VM booted from a generated initramfs.
//!
//! Guest environment (what payloads and the kernel test binary can rely on):
//!
//! * PID 1 is busybox `sh` running `/init`; `/proc`, `/sys`, `/dev`
//!   (devtmpfs), `/tmp`, `/run`, `/dev/shm` (tmpfs), `/sys/kernel/config`
//!   (configfs) are mounted; `/mnt` exists; the working directory is `/tmp`.
//! * `configfs` and `ublk_drv` are loaded, so `/dev/ublk-control` exists.
//!   Other modules are at `/lib/modules/<name>.ko` for `insmod` on demand.
//! * `PATH=/bin`; `/bin` holds busybox applets, the workspace release
//!   binaries (`/bin/ublk`, ...), `fio`, `mkfs.ext4`, `mke2fs`, `e2fsck`,
//!   `blkdiscard`, `losetup`, `dmsetup` and a few optional tools, plus payload-specific binaries
//!   (e.g. `/bin/kernel-tests`).
//! * Env: `UBLK_BIN=/bin/ublk`, `HOME=/tmp`, `RUST_BACKTRACE=1`,
//!   `XTASK_VM=1`, plus `RUST_LOG` when set on the host.
//! * stdin is `/dev/null`; stdout/stderr go to the serial console, which
//!   xtask streams to its own stdout.

use crate::kernel;
use crate::util::{
    describe, env_flag, env_secs, is_executable, sh_quote, stream_child, which, Workspace,
};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The default software-emulation accelerator. Single-threaded TCG was both
/// faster for the kernel tests (81 s vs 112 s on a 2-core host) and immune to
/// the cross-vCPU code-patching races of multi-threaded TCG (one boot out of
/// ~40 died with "Oops: int3" in the guest under MTTCG).
pub const TCG: &str = "tcg,thread=single";

/// Multi-threaded TCG (one host thread per vCPU, qemu's default): the server and fio run in
/// parallel, and cross-CPU wakeups are expensive. `cargo xtask bench --accel multi`.
pub const MTTCG: &str = "tcg,thread=multi";

/// The prefix of the line `/init` prints before starting the payload.
const INIT_BANNER: &str = "xtask-init: kernel";

/// The marker `/init` prints after the payload finished.
pub const EXIT_MARKER: &str = "XTASK-EXIT-STATUS=";

/// Host tools copied into the guest's `/bin` (all required; the mirror's kernel tests put a
/// loop device and a device-mapper table under a leg).
const REQUIRED_TOOLS: &[&str] = &[
    "fio",
    "mke2fs",
    "mkfs.ext4",
    "e2fsck",
    "blkdiscard",
    "losetup",
    "dmsetup",
];

/// Host tools copied into the guest's `/bin` when the host has them.
const OPTIONAL_TOOLS: &[&str] = &[
    "fsck.ext4",
    "tune2fs",
    "dumpe2fs",
    "resize2fs",
    "debugfs",
    "blockdev",
    "lsblk",
    "findmnt",
    "mdadm",
    "mkfs.xfs",
    "xfs_repair",
    "nbd-client",
    "strace",
    // A Ceph cluster for the RBD target (ceph-test-cluster starts it), and rbd-nbd to
    // compare with.
    "ceph-mon",
    "ceph-osd",
    "monmaptool",
    "rbd",
    "rbd-nbd",
];

/// Directories of plugins copied whole into the guest when the host has them, each file
/// with the libraries it needs: Ceph's erasure-code, compression and crypto plugins, and the
/// object classes RBD calls (`libcls_rbd`).
const OPTIONAL_TREES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/ceph",
    "/usr/lib/x86_64-linux-gnu/rados-classes",
];

/// A POSIX `sh` script plus what it needs, runnable natively or in the VM.
pub struct Payload {
    /// Body of `/payload.sh` (run with busybox `sh` in the guest).
    pub script: String,
    /// Extra executables, as (name on PATH / in the guest's `/bin`, host path).
    pub extra_bins: Vec<(String, PathBuf)>,
}

/// VM resources.
pub struct VmOpts {
    /// qemu `-m` argument, e.g. `4G`.
    pub mem: String,
    /// Number of virtual CPUs.
    pub smp: u32,
    /// Kill qemu after this long.
    pub timeout: Duration,
    /// The qemu `-accel` value; `None`: `XTASK_ACCEL`, else KVM when usable, else [`TCG`].
    pub accel: Option<String>,
}

/// The result of running a payload.
pub struct Outcome {
    /// The payload's exit code (128+N for a signal natively).
    pub code: i32,
    /// Its captured stdout (in the VM: the whole console, `\r` removed).
    pub output: String,
}

/// Whether to run natively: the host kernel has the ublk driver loaded.
/// `XTASK_FORCE_VM=1` forces the VM anyway, `XTASK_NATIVE=1` forces native.
pub fn host_has_ublk() -> bool {
    if env_flag("XTASK_FORCE_VM") {
        return false;
    }
    env_flag("XTASK_NATIVE") || Path::new("/dev/ublk-control").exists()
}

/// Runs `payload` natively when the host has ublk, else in the VM.
pub fn run_payload(ws: &Workspace, payload: &Payload, opts: &VmOpts) -> Result<Outcome> {
    if host_has_ublk() {
        run_native(ws, payload, opts.timeout)
    } else {
        run_vm(ws, payload, opts)
    }
}

/// A scratch directory unique to this xtask process. Leftovers of xtask
/// processes that no longer exist (e.g. interrupted with Ctrl-C) are removed.
fn scratch(ws: &Workspace, kind: &str) -> Result<PathBuf> {
    let base = ws.target.join(kind);
    for entry in fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name
            .strip_prefix("run-")
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists());
        if stale && !keep_scratch() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let dir = base.join(format!("run-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn keep_scratch() -> bool {
    env_flag("XTASK_KEEP")
}

/// Runs the payload with `sh` on the host; `target/release` and the extra
/// binaries are put first on PATH, `UBLK_BIN` points at `target/release/ublk`.
pub fn run_native(ws: &Workspace, payload: &Payload, timeout: Duration) -> Result<Outcome> {
    if !crate::util::is_root() {
        eprintln!("xtask: warning: not root; ublk device creation will probably fail");
    }
    let dir = scratch(ws, "xtask")?;
    let bindir = dir.join("bin");
    fs::create_dir_all(&bindir).with_context(|| format!("creating {}", bindir.display()))?;
    for (name, path) in &payload.extra_bins {
        let abs = path
            .canonicalize()
            .with_context(|| format!("resolving {}", path.display()))?;
        symlink(&abs, bindir.join(name))
            .with_context(|| format!("linking {} into {}", abs.display(), bindir.display()))?;
    }
    let script = dir.join("payload.sh");
    fs::write(&script, &payload.script).with_context(|| format!("writing {}", script.display()))?;
    let mut path = vec![bindir.clone(), ws.release_dir()];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let path = std::env::join_paths(path).context("building PATH")?;
    let mut cmd = Command::new("sh");
    cmd.arg(&script)
        .env("PATH", path)
        .env("UBLK_BIN", ws.release_dir().join("ublk"))
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("xtask: running natively: {}", describe(&cmd));
    let child = cmd.spawn().context("starting sh")?;
    let res = stream_child(child, timeout, None)?;
    if !keep_scratch() {
        let _ = fs::remove_dir_all(&dir);
    }
    let status = res
        .status
        .with_context(|| format!("payload timed out after {} s", timeout.as_secs()))?;
    Ok(Outcome {
        code: exit_code(status),
        output: res.output,
    })
}

/// Maps an exit status to a shell-style code.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Boots the VM, runs the payload in it, and returns its exit code.
pub fn run_vm(ws: &Workspace, payload: &Payload, opts: &VmOpts) -> Result<Outcome> {
    let kernel = kernel::locate(ws)?;
    let dir = scratch(ws, "vm")?;
    let t0 = Instant::now();
    let initrd = build_initramfs(ws, &kernel, payload, &dir).context("building the initramfs")?;
    let size = fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "xtask: initramfs {} ({} MiB) built in {:.1} s; booting kernel {}",
        initrd.display(),
        size >> 20,
        t0.elapsed().as_secs_f64(),
        kernel.version
    );

    // A /dev/kvm that exists but fails is remembered so that later runs do
    // not print qemu's KVM errors again.
    let kvm_broken = ws.target.join("vm").join("kvm-broken");
    let mut accels: Vec<String> = match std::env::var("XTASK_ACCEL") {
        _ if opts.accel.is_some() => opts.accel.iter().cloned().collect(),
        Ok(a) if !a.is_empty() => vec![a],
        _ if kvm_usable() && !kvm_broken.exists() => vec!["kvm".to_string(), TCG.to_string()],
        _ => vec![TCG.to_string()],
    };
    // One more attempt with the last accelerator if the guest crashes before
    // reaching /init (nothing of the payload has run at that point).
    if let Some(last) = accels.last().cloned() {
        accels.push(last);
    }
    let boot_timeout = env_secs("XTASK_BOOT_TIMEOUT", 300)?;
    let t1 = Instant::now();
    let mut res = None;
    for (i, accel) in accels.iter().enumerate() {
        let mut cmd = qemu_command(accel, opts, &kernel.vmlinuz, &initrd);
        eprintln!("xtask: $ {}", describe(&cmd));
        let child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let r = stream_child(child, opts.timeout, Some((INIT_BANNER, boot_timeout)))?;
        let never_booted = r.not_ready || !r.output.contains(INIT_BANNER);
        if never_booted && i + 1 < accels.len() {
            eprintln!(
                "xtask: the guest did not reach /init with -accel {accel}; retrying with -accel {}",
                accels[i + 1]
            );
            if accel == "kvm" {
                eprintln!(
                    "xtask: KVM will not be tried again (delete {} or set XTASK_ACCEL=kvm)",
                    kvm_broken.display()
                );
                // Only an optimisation for later runs; failure to record it is harmless.
                let _ = fs::write(&kvm_broken, "qemu failed to boot with -accel kvm\n");
            }
            continue;
        }
        if r.not_ready {
            bail!(
                "the VM did not reach /init within {} s (XTASK_BOOT_TIMEOUT)",
                boot_timeout.as_secs()
            );
        }
        res = Some(r);
        break;
    }
    let res = res.context("no accelerator could boot the VM")?;
    let elapsed = t1.elapsed().as_secs_f64();
    if keep_scratch() {
        eprintln!("xtask: kept {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    let Some(status) = res.status else {
        bail!(
            "the VM did not finish within {} s (set XTASK_VM_TIMEOUT=<secs> to change)",
            opts.timeout.as_secs()
        );
    };
    let code = parse_exit_marker(&res.output).with_context(|| {
        format!(
            "the VM stopped ({status}) after {elapsed:.1} s without reporting the \
             payload's exit status (kernel panic or crash? see the console output above)"
        )
    })?;
    eprintln!("xtask: VM finished in {elapsed:.1} s, payload exit status {code}");
    Ok(Outcome {
        code,
        output: res.output,
    })
}

/// The qemu command line booting `vmlinuz` + `initrd` with accelerator `accel`.
fn qemu_command(accel: &str, opts: &VmOpts, vmlinuz: &Path, initrd: &Path) -> Command {
    // XTASK_CPU and XTASK_MITIGATIONS=on reproduce a runner with qemu's default CPU model
    // and the kernel's default mitigations (benchmark comparisons across setups).
    let cpu = std::env::var("XTASK_CPU")
        .unwrap_or_else(|_| if accel == "kvm" { "host" } else { "max" }.to_string());
    let mitigations = match std::env::var("XTASK_MITIGATIONS").as_deref() {
        Ok("on") => "",
        _ => " mitigations=off",
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "q35"])
        .args(["-accel", accel])
        .args(["-cpu", &cpu])
        .args(["-m", &opts.mem])
        .args(["-smp", &opts.smp.to_string()])
        .args(["-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 oops=panic loglevel=4{mitigations}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

/// Whether /dev/kvm can be opened (then qemu uses KVM instead of TCG).
fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Finds the last `XTASK-EXIT-STATUS=<n>` on the console.
pub fn parse_exit_marker(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|l| {
        let rest = &l[l.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

/// The guest's `/init`.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
export PATH=/bin HOME=/tmp UBLK_BIN=/bin/ublk RUST_BACKTRACE=1 XTASK_VM=1 TERM=dumb
mkdir -p /dev/pts /dev/shm /tmp /run /mnt
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
hostname ublk-vm
ip link set lo up 2>/dev/null
for m in configfs ublk_drv; do
    if [ -e /lib/modules/$m.ko ]; then
        insmod /lib/modules/$m.ko || echo "xtask-init: insmod $m failed"
    fi
done
mount -t configfs configfs /sys/kernel/config 2>/dev/null
[ -e /dev/ublk-control ] || echo "xtask-init: warning: /dev/ublk-control is missing"
. /xtask-env.sh
echo "xtask-init: kernel $(uname -r), $(nproc) cpus, booted in $(cut -d' ' -f1 /proc/uptime) s"
cd /tmp
sh /payload.sh </dev/null
rc=$?
sync
echo "{EXIT_MARKER}$rc"
sleep 0.2
poweroff -f
"#
    )
}

/// Environment variables forwarded from the host into the guest.
fn forwarded_env() -> String {
    ["RUST_LOG", "RUST_LIB_BACKTRACE", "RUST_TEST_THREADS"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k, v)))
        .map(|(k, v)| format!("export {k}={}\n", sh_quote(&v)))
        .collect()
}

/// Builds `dir/initrd.cpio` from a staging tree in `dir/root`.
fn build_initramfs(
    ws: &Workspace,
    kernel: &kernel::Kernel,
    payload: &Payload,
    dir: &Path,
) -> Result<PathBuf> {
    let root = dir.join("root");
    for d in [
        "bin",
        "lib/modules",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "mnt",
        "etc",
        "root",
        "usr",
    ] {
        let p = root.join(d);
        fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    for (link, target) in [
        ("sbin", "bin"),
        ("usr/bin", "../bin"),
        ("usr/sbin", "../bin"),
        ("etc/mtab", "/proc/self/mounts"),
    ] {
        symlink(target, root.join(link)).with_context(|| format!("creating /{link}"))?;
    }

    let mut stager = Stager {
        root: root.clone(),
        libs: BTreeSet::new(),
    };

    // Host tools.
    for tool in REQUIRED_TOOLS {
        let path = which(tool).with_context(|| format!("host tool `{tool}` not found"))?;
        stager.binary(tool, &path)?;
    }
    for tool in OPTIONAL_TOOLS {
        if let Some(path) = which(tool) {
            if let Err(e) = stager.binary(tool, &path) {
                eprintln!("xtask: warning: skipping optional tool {tool}: {e:#}");
                let _ = fs::remove_file(root.join("bin").join(tool));
            }
        }
    }

    for tree in OPTIONAL_TREES {
        let tree = Path::new(tree);
        if tree.is_dir() {
            stager.tree(tree)?;
        }
    }

    // Workspace release binaries.
    let bins = ws.release_bins();
    if !bins.iter().any(|(n, _)| n == "ublk") {
        eprintln!(
            "xtask: WARNING: {} does not exist; the guest will have no /bin/ublk",
            ws.release_dir().join("ublk").display()
        );
    }
    for (name, path) in &bins {
        stager.binary(name, path)?;
    }
    for (name, path) in &payload.extra_bins {
        stager.binary(name, path)?;
    }

    // busybox and its applets (real tools staged above take precedence).
    let busybox = Path::new("/bin/busybox");
    stager.binary("busybox", busybox)?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .context("running `busybox --list`")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        let link = root.join("bin").join(applet);
        if fs::symlink_metadata(&link).is_err() {
            symlink("busybox", &link).with_context(|| format!("linking applet {applet}"))?;
        }
    }

    // Kernel modules, decompressed.
    for (name, path) in &kernel.modules {
        let dest = root.join("lib/modules").join(format!("{name}.ko"));
        decompress_module(path, &dest)?;
    }

    // Small /etc.
    let etc = root.join("etc");
    let files = [
        ("passwd", "root:x:0:0:root:/tmp:/bin/sh\n"),
        ("group", "root:x:0:\n"),
        ("hostname", "ublk-vm\n"),
        ("hosts", "127.0.0.1 localhost ublk-vm\n"),
    ];
    for (name, content) in files {
        fs::write(etc.join(name), content).with_context(|| format!("writing /etc/{name}"))?;
    }
    if Path::new("/etc/mke2fs.conf").is_file() {
        fs::copy("/etc/mke2fs.conf", etc.join("mke2fs.conf")).context("copying mke2fs.conf")?;
    }

    write_exec(&root.join("init"), &init_script())?;
    write_exec(&root.join("payload.sh"), &payload.script)?;
    write_exec(&root.join("xtask-env.sh"), &forwarded_env())?;

    let initrd = dir.join("initrd.cpio");
    let out =
        fs::File::create(&initrd).with_context(|| format!("creating {}", initrd.display()))?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet")
        .current_dir(&root)
        .stdout(out)
        .status()
        .context("running find | cpio")?;
    if !status.success() {
        bail!("creating the cpio archive failed ({status})");
    }
    if !keep_scratch() {
        let _ = fs::remove_dir_all(&root);
    }
    Ok(initrd)
}

fn write_exec(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

fn decompress_module(src: &Path, dest: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => {
            fs::copy(src, dest).with_context(|| format!("copying {}", src.display()))?;
        }
        Some(tool) => {
            let out =
                fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
            let status = Command::new(tool)
                .arg("-dc")
                .arg(src)
                .stdout(out)
                .status()
                .with_context(|| format!("running {tool} -dc {}", src.display()))?;
            if !status.success() {
                bail!("{tool} -dc {} failed ({status})", src.display());
            }
        }
    }
    Ok(())
}

/// Copies executables and their shared libraries into the staging tree.
struct Stager {
    root: PathBuf,
    libs: BTreeSet<PathBuf>,
}

impl Stager {
    /// Copies `src` to `/bin/<name>` plus every library `ldd` lists for it.
    fn binary(&mut self, name: &str, src: &Path) -> Result<()> {
        if !is_executable(src) {
            bail!("{} is not an executable file", src.display());
        }
        let dest = self.root.join("bin").join(name);
        let _ = fs::remove_file(&dest);
        fs::copy(src, &dest)
            .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
        for lib in ldd(src)? {
            self.library(&lib)?;
        }
        Ok(())
    }
}

impl Stager {
    /// Copies every file under `dir` to the same place in the guest (symbolic links as
    /// copies), with the libraries `ldd` lists for each shared object.
    fn tree(&mut self, dir: &Path) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                self.tree(&path)?;
                continue;
            }
            let rel = path.strip_prefix("/").unwrap_or(&path);
            let dest = self.root.join(rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            fs::copy(&path, &dest).with_context(|| format!("copying {}", path.display()))?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !name.contains(".so") {
                continue;
            }
            match ldd(&path) {
                Ok(libs) => {
                    for lib in libs {
                        self.library(&lib)?;
                    }
                }
                Err(e) => eprintln!("xtask: warning: {}: {e:#}", path.display()),
            }
        }
        Ok(())
    }

    /// Copies the library `lib` to the same place in the guest, once.
    fn library(&mut self, lib: &Path) -> Result<()> {
        if self.libs.insert(lib.to_path_buf()) {
            let rel = lib.strip_prefix("/").unwrap_or(lib);
            let dest = self.root.join(rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            fs::copy(lib, &dest).with_context(|| format!("copying library {}", lib.display()))?;
        }
        Ok(())
    }
}

/// The absolute library paths (including the dynamic loader) `ldd` reports.
fn ldd(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("running ldd {}", bin.display()))?;
    // ldd exits non-zero for static binaries ("not a dynamic executable").
    let text = String::from_utf8_lossy(&out.stdout);
    let libs = parse_ldd(&text);
    if out.status.success() && text.contains("not found") {
        bail!("ldd {}: some libraries are missing:\n{text}", bin.display());
    }
    Ok(libs)
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_parsing() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn exit_marker() {
        let console = "boot\nXTASK-EXIT-STATUS=0\nnoise XTASK-EXIT-STATUS=3\n[ 1.0] reboot\n";
        assert_eq!(parse_exit_marker(console), Some(3));
        assert_eq!(parse_exit_marker("no marker\n"), None);
    }
}
