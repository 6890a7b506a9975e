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
        "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-remove {}",
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
    if let Err(e) = install_without_removing(PACKAGES, &[]) {
        // Some images ship qemu-utils from backports, which breaks the release's own
        // qemu-system: the one of the same backports fits it, and nothing is removed.
        let Some(suite) = backports_suite(&would_remove(PACKAGES, &[])) else {
            return Err(e);
        };
        eprintln!("xtask: the packages apt would remove come from {suite}: installing from it");
        enable_suite(&suite)?;
        install_without_removing(PACKAGES, &["-t", &suite])?;
    }
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
    let install = || install_without_removing(&[package], &["--no-install-recommends"]);
    if install().is_ok() {
        return true;
    }
    let ok = run(Command::new("apt-get").arg("update")).is_ok() && install().is_ok();
    if !ok {
        eprintln!("xtask: warning: could not install {package} ({what})");
    }
    ok
}

/// `apt-get install -y --no-remove OPTIONS PACKAGES`: never removes a package the user has.
/// When apt would have to remove some, fails naming them (from a dry run) and how to
/// resolve it.
fn install_without_removing(packages: &[&str], options: &[&str]) -> Result<()> {
    let installed = run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-remove"])
        .args(options)
        .args(packages));
    let Err(e) = installed else {
        return Ok(());
    };
    let removals = would_remove(packages, options);
    if removals.is_empty() {
        return Err(e);
    }
    bail!(
        "apt-get would remove {} to install {}; xtask never removes a package.\n\
         This usually means an installed package is at another version than the new ones \
         need. Resolve it by upgrading them together:\n  \
         sudo apt-get install {} {}\n\
         and check that apt removes nothing, or install the tools another way.",
        removals.join(", "),
        packages.join(" "),
        packages.join(" "),
        removals.join(" ")
    )
}

/// The packages a dry run of `apt-get install OPTIONS PACKAGES` would remove.
fn would_remove(packages: &[&str], options: &[&str]) -> Vec<String> {
    let out = Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-s", "-y"])
        .args(options)
        .args(packages)
        .output();
    match out {
        Ok(out) => removed_in(&String::from_utf8_lossy(&out.stdout)),
        Err(_) => Vec::new(),
    }
}

/// The backports suite (`CODENAME-backports`) the installed packages `removals` come from,
/// when every one of them does (its version has Debian's `~bpo` mark).
fn backports_suite(removals: &[String]) -> Option<String> {
    let from_backports = |package: &String| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", package])
            .output()
            .is_ok_and(|out| {
                out.status.success() && is_backport(&String::from_utf8_lossy(&out.stdout))
            })
    };
    if removals.is_empty() || !removals.iter().all(from_backports) {
        return None;
    }
    let release = std::fs::read_to_string("/etc/os-release").ok()?;
    let codename = os_codename(&release)?;
    Some(format!("{codename}-backports"))
}

/// Whether a Debian version string is a backport's (`1:10.0.2+ds-2+deb13u1~bpo12+1`).
fn is_backport(version: &str) -> bool {
    version.contains("~bpo")
}

/// `VERSION_CODENAME` of an `/etc/os-release`.
fn os_codename(release: &str) -> Option<&str> {
    release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim().trim_matches('"'))
        .filter(|c| !c.is_empty())
}

/// Adds Debian's `suite` to apt's sources (a file of xtask's own, unless a source names the
/// suite already) and updates the package lists.
fn enable_suite(suite: &str) -> Result<()> {
    let listed = |dir: &str| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| {
                std::fs::read_to_string(entry.path()).is_ok_and(|text| text.contains(suite))
            })
    };
    let main = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if !main.contains(suite) && !listed("/etc/apt/sources.list.d") {
        let line = format!("deb http://deb.debian.org/debian {suite} main\n");
        std::fs::write("/etc/apt/sources.list.d/ublk-rs-backports.list", line)?;
    }
    run(Command::new("apt-get").arg("update"))
}

/// The packages an `apt-get -s` transcript removes (its `Remv NAME [VERSION]` lines).
fn removed_in(transcript: &str) -> Vec<String> {
    transcript
        .lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Debian packages of the Ceph RBD target's build (headers), its run time, and the test
/// cluster started in the VM (`ceph-test-cluster`), plus rbd-nbd for the benchmark.
const CEPH_PACKAGES: &[&str] = &[
    "librbd-dev",
    "librados-dev",
    "librbd1",
    "librados2",
    "ceph-mon",
    "ceph-osd",
    "ceph-common",
    "rbd-nbd",
];

/// Whether the host can build the `rbd` feature and give the VM a Ceph cluster.
fn ceph_present() -> bool {
    let headers = ["/usr/include/rbd/librbd.h", "/usr/include/rados/librados.h"];
    headers.iter().all(|h| Path::new(h).is_file())
        && ["ceph-mon", "ceph-osd", "monmaptool", "rbd"]
            .iter()
            .all(|t| which(t).is_some())
}

/// Makes sure the Ceph packages are installed (as root with apt-get: without recommended
/// packages, and never removing one), so that the workspace builds with the feature `rbd`
/// and the VM gets a cluster. Returns whether Ceph is usable; otherwise says how to get it
/// and the RBD tests are left out of the build.
pub fn ensure_ceph() -> bool {
    if ceph_present() {
        return true;
    }
    if !is_root() || which("apt-get").is_none() {
        eprintln!(
            "xtask: warning: no Ceph on this host: the RBD target is built and tested only \
             with: sudo apt-get install --no-install-recommends {}",
            CEPH_PACKAGES.join(" ")
        );
        return false;
    }
    let install = || install_without_removing(CEPH_PACKAGES, &["--no-install-recommends"]);
    if install().is_err() {
        let _ = run(Command::new("apt-get").arg("update")).and_then(|()| install());
    }
    let ok = ceph_present();
    if !ok {
        eprintln!("xtask: warning: could not install Ceph: the RBD target is not tested");
    }
    ok
}

/// The cargo arguments that build the `rbd` feature when `rbd` (from [`ensure_ceph`]).
pub fn rbd_features(rbd: bool) -> &'static [&'static str] {
    if rbd {
        &["--features", "ublk-targets/rbd"]
    } else {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_are_read_from_a_dry_run() {
        let transcript = "Reading package lists...\n\
            Remv qemu-utils [1:8.2.2+ds-0ubuntu1]\n\
            Inst qemu-system-x86 (1:9.2+ds-1 Debian:stable [amd64])\n\
            Conf qemu-system-x86 (1:9.2+ds-1 Debian:stable [amd64])\n";
        assert_eq!(removed_in(transcript), ["qemu-utils"]);
        assert!(removed_in("Inst fio (3.33-3)\n").is_empty());
    }

    #[test]
    fn backports_are_told_by_their_version_and_the_suite_by_the_release() {
        assert!(is_backport("1:10.0.2+ds-2+deb13u1~bpo12+1"));
        assert!(!is_backport("1:7.2+dfsg-7+deb12u18+b3"));
        let release = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(os_codename(release), Some("bookworm"));
        assert_eq!(os_codename("ID=debian\nVERSION_CODENAME=\n"), None);
    }
}
