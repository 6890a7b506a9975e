//! Host tool dependencies (qemu, busybox, fio, e2fsprogs, ...).

use crate::util::{is_root, run, which};
use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;

/// Debian packages providing the host tools xtask needs.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "fio",
    "e2fsprogs",
    "xz-utils",
    "util-linux",
    "dmsetup",
];

/// Executables that must be present (checked by name on PATH + sbin dirs).
const TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "cpio",
    "fio",
    "mke2fs",
    "mkfs.ext4",
    "e2fsck",
    "xz",
    "blkdiscard",
    "losetup",
    "dmsetup",
    "ldd",
];

/// Names of required tools that are missing on the host.
fn missing() -> Vec<&'static str> {
    let mut m: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if !Path::new("/bin/busybox").is_file() {
        m.push("/bin/busybox");
    }
    m
}

/// Makes sure the host tools exist, installing them with apt when running as
/// root; otherwise prints the apt-get command to run and fails.
pub fn ensure_host_deps() -> Result<()> {
    let m = missing();
    if m.is_empty() {
        return Ok(());
    }
    let install = format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
        PACKAGES.join(" ")
    );
    eprintln!("xtask: missing host tools: {}", m.join(", "));
    if !is_root() {
        bail!(
            "missing host tools ({}); install them with:\n  sudo apt-get update && sudo {install}",
            m.join(", ")
        );
    }
    if which("apt-get").is_none() {
        bail!(
            "missing host tools ({}) and no apt-get to install them; install the \
             equivalents of: {}",
            m.join(", "),
            PACKAGES.join(" ")
        );
    }
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(PACKAGES))?;
    let still = missing();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

/// Installs the Debian package `package`, which `what` needs, when running as
/// root with apt-get (running `apt-get update` first if a plain install
/// fails), without its recommended packages (mdadm's would bring a mail
/// server). Returns whether it got installed; otherwise prints how to install
/// it and returns false, so that the caller can go on without it.
pub fn ensure_optional_package(package: &str, what: &str) -> bool {
    if !is_root() || which("apt-get").is_none() {
        eprintln!(
            "xtask: note: {what} needs the package {package}: \
             sudo apt-get install --no-install-recommends {package}"
        );
        return false;
    }
    let install = || {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends", package]))
    };
    if install().is_ok() {
        return true;
    }
    let ok = run(Command::new("apt-get").arg("update")).is_ok() && install().is_ok();
    if !ok {
        eprintln!("xtask: warning: could not install {package} ({what})");
    }
    ok
}
