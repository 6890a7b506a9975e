//! `cargo xtask`: the developer/CI task runner of the ublk-rs workspace.
//!
//! ublk needs the kernel's `ublk_drv`, which most build hosts (and CI
//! runners) do not have. xtask therefore runs everything that needs a real
//! ublk driver either natively (when `/dev/ublk-control` exists) or inside a
//! small qemu VM booted from a generated initramfs (see [`vm`]).
//!
//! Commands:
//!
//! * `cargo xtask test [--mem 4G] [--smp N] [-- TEST-ARGS...]` — the project's
//!   single test entry point: host tests, release build, then the ignored
//!   kernel tests (`ublk-targets/tests/kernel.rs`) natively or in the VM.
//! * `cargo xtask vm [--mem 4G] [--smp N] [--no-build] -- CMD ARGS...` — run a
//!   command in the VM with the workspace's release binaries on PATH.
//! * `cargo xtask demo [--mem 4G] [--no-build]` — RAM device + ext4 + fio demo.
//! * `cargo xtask bench [--rounds 3] [--runtime 2] [--quick] [--filter A,B]
//!   [--mem 10G] [--no-build]` — fio on ublk null (every buffer mode, SQPOLL
//!   on/off), the libublk null server, null_blk, brd, loop, the RAM and
//!   file targets, ublk stripes vs md raid0 and ublk mirrors vs md raid1
//!   over brd disks (I/O and rebuild throughput), in one boot; writes
//!   `target/bench/{report.md,raw.json,iops.png}`.
//!
//! Environment variables are listed in the usage text (`cargo xtask help`).

mod bench;
mod chart;
mod demo;
mod deps;
mod fio;
mod kernel;
mod profile;
mod scripts;
mod util;
mod vm;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use util::{env_secs, output, run, sh_quote, stream_child, Workspace};
use vm::{exit_code, host_has_ublk, run_payload, Payload, VmOpts};

const USAGE: &str = "\
usage: cargo xtask <command> [options] [-- args]

commands:
  test   [--mem SIZE] [--smp N] [-- TEST-ARGS...]
         host tests, release build, kernel tests (natively or in a qemu VM)
  vm     [--mem SIZE] [--smp N] [--no-build] -- CMD ARGS...
         run CMD in the VM with the release binaries on PATH
  demo   [--mem SIZE] [--smp N] [--no-build] [--runtime SECS]
         RAM-backed ublk device: ext4 round trip + fio
  profile [--mem SIZE] [--smp N] [--no-build] [--runtime SECS (5)] [-- TARGET ARGS]
         perf record -a -g while fio 4k randread qd64 runs on a ublk device
         (default: null --buffer-mode zero-copy) and on null_blk; prints CPU
         time by command and by symbol for both
  bench  [--mem SIZE (10G)] [--smp N] [--no-build] [--rounds N (3)]
         [--runtime SECS (2, after 1 s ramp)] [--quick] [--filter NAME,...]
         fio on ublk null (every buffer mode, SQPOLL on/off, batch), libublk
         null, null_blk, brd, loop, ublk ram and file, ublk stripes vs md
         raid0 and ublk mirrors vs md raid1 over brd disks, plus the
         mirror's rebuild vs md's resync of a 1 GiB leg, in one boot (about
         57 min under TCG; --quick: 7 devices, 4k randread, 1 job, about
         4 min; --filter: devices and rebuilds whose name contains one of
         the NAMEs, e.g. md-raid0,ublk-stripe or md-raid1,ublk-mirror);
         writes target/bench/report.md, raw.json and iops.png

environment:
  XTASK_VM_TIMEOUT=SECS    kill the VM after SECS (default 2100; bench: from its plan)
  XTASK_BOOT_TIMEOUT=SECS  give up if the guest's /init has not started after SECS (300)
  XTASK_FORCE_VM=1         use the VM even when /dev/ublk-control exists
  XTASK_NATIVE=1           run natively even without /dev/ublk-control
  XTASK_ACCEL=ACCEL        qemu -accel value (default: kvm if usable, else tcg,thread=single)
  XTASK_KERNEL_DIR=DIR     guest kernel (DIR/vmlinuz, DIR/modules/*.ko.xz)
  XTASK_KERNEL_DOWNLOAD=1  download the newest Debian sid cloud kernel into target/vm-kernel
  XTASK_KEEP=1             keep the generated initramfs and scripts
";

/// Default guest memory.
const DEFAULT_MEM: &str = "4G";

/// Default guest memory of `bench`: brd, the three RAM target rows and the
/// loop/file target's tmpfs file each hold up to 1 GiB at the same time, the
/// brd pair under the stripe rows up to 512 MiB, the pair under the mirror
/// rows up to 1 GiB (512 MiB on each leg; the rebuilds before them fill one
/// 1 GiB leg and discard it), and fio's output goes to the guest's
/// RAM-backed root (6G ran out of memory).
const BENCH_MEM: &str = "10G";

/// Default VM timeout (35 minutes).
const DEFAULT_TIMEOUT_SECS: u64 = 35 * 60;

/// Options shared by the commands, plus the positional rest.
struct Args {
    /// `--mem`, when given.
    mem: Option<String>,
    smp: u32,
    no_build: bool,
    rounds: u32,
    runtime: Option<u32>,
    quick: bool,
    filter: Vec<String>,
    rest: Vec<String>,
}

fn parse_args(args: &[String], allowed: &[&str]) -> Result<Args> {
    let mut a = Args {
        mem: None,
        smp: 2,
        no_build: false,
        rounds: 3,
        runtime: None,
        quick: false,
        filter: Vec::new(),
        rest: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        if name == "--" {
            a.rest.extend(it.by_ref().cloned());
            break;
        }
        if !name.starts_with('-') {
            // First positional argument: it and everything after is `rest`.
            a.rest.push(arg.clone());
            a.rest.extend(it.by_ref().cloned());
            break;
        }
        if !allowed.contains(&name) {
            bail!("unknown option {arg:?}\n\n{USAGE}");
        }
        let mut value = || -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value")),
            }
        };
        match name {
            "--mem" => a.mem = Some(value()?),
            "--smp" => a.smp = value()?.parse().context("--smp needs a number")?,
            "--rounds" => a.rounds = value()?.parse().context("--rounds needs a number")?,
            "--runtime" => a.runtime = Some(value()?.parse().context("--runtime needs seconds")?),
            "--no-build" => a.no_build = true,
            "--quick" => a.quick = true,
            "--filter" => a.filter.extend(
                value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            _ => bail!("unhandled option {name}"),
        }
    }
    Ok(a)
}

impl Args {
    fn vm_opts(&self) -> Result<VmOpts> {
        Ok(VmOpts {
            mem: self.mem.clone().unwrap_or_else(|| DEFAULT_MEM.to_string()),
            smp: self.smp,
            timeout: env_secs("XTASK_VM_TIMEOUT", DEFAULT_TIMEOUT_SECS)?,
        })
    }
}

fn main() {
    match try_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn try_main() -> Result<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return Ok(2);
    };
    let vm_flags = ["--mem", "--smp"];
    match cmd.as_str() {
        "test" => {
            let a = parse_args(rest, &vm_flags)?;
            test(&a)
        }
        "vm" => {
            let a = parse_args(rest, &["--mem", "--smp", "--no-build"])?;
            vm_cmd(&a)
        }
        "profile" => {
            let a = parse_args(rest, &["--mem", "--smp", "--no-build", "--runtime"])?;
            let ws = prepare(&a)?;
            let target = if a.rest.is_empty() {
                "null --buffer-mode zero-copy".to_string()
            } else {
                // Quoted for the guest's shell: a stack expression has parentheses.
                a.rest
                    .iter()
                    .map(|r| sh_quote(r))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            profile::profile(&ws, &a.vm_opts()?, &target, a.runtime.unwrap_or(5))?;
            Ok(0)
        }
        "demo" => {
            let a = parse_args(rest, &["--mem", "--smp", "--no-build", "--runtime"])?;
            let ws = prepare(&a)?;
            demo::demo(&ws, &a.vm_opts()?, a.runtime.unwrap_or(10))?;
            Ok(0)
        }
        "bench" => {
            let a = parse_args(
                rest,
                &[
                    "--mem",
                    "--smp",
                    "--no-build",
                    "--runtime",
                    "--rounds",
                    "--quick",
                    "--filter",
                ],
            )?;
            bench_cmd(&a)
        }
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(0)
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

/// Host dependencies + (unless `--no-build`) a release build of all
/// workspace binaries.
fn prepare(a: &Args) -> Result<Workspace> {
    deps::ensure_host_deps()?;
    let rbd = deps::ensure_ceph();
    let ws = Workspace::discover()?;
    if !a.no_build {
        run(ws
            .cargo()
            .args([
                "build",
                "--release",
                "--workspace",
                "--exclude",
                "xtask",
                "--bins",
            ])
            .args(deps::rbd_features(rbd)))?;
    }
    Ok(ws)
}

/// `cargo xtask bench`
fn bench_cmd(a: &Args) -> Result<i32> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let opts = bench::Options {
        rounds: a.rounds,
        // 2 s measured + 1 s ramp keeps the full plan (894 runs and the
        // rebuilds) near 60 minutes of TCG time.
        runtime: a.runtime.unwrap_or(2),
        ramp: 1,
        quick: a.quick,
        filter: a.filter.clone(),
    };
    // Check the options before building anything.
    let wanted = bench::Plan::new(&opts, true, true)?;
    let ws = prepare(a)?;
    if !Path::new(chart::FONT).is_file() {
        deps::ensure_optional_package("fonts-dejavu-core", "the chart's font");
    }
    let libublk = if wanted.uses_libublk() {
        bench::build_libublk(&ws, a.no_build)
    } else {
        None
    };
    // The guest gets the host's mdadm (vm.rs stages it when it is on PATH).
    let mdadm = !wanted.uses_mdadm()
        || util::which("mdadm").is_some()
        || (deps::ensure_optional_package("mdadm", "the md-raid0 bench row")
            && util::which("mdadm").is_some());
    let plan = bench::Plan::new(&opts, libublk.is_some(), mdadm)?;
    let mut vm = a.vm_opts()?;
    vm.mem = a.mem.clone().unwrap_or_else(|| BENCH_MEM.to_string());
    let margin = plan.estimate().as_secs() / 2 + 600;
    vm.timeout = env_secs("XTASK_VM_TIMEOUT", plan.estimate().as_secs() + margin)?;
    bench::bench(&ws, &vm, &plan, libublk)?;
    Ok(0)
}

/// `cargo xtask vm -- CMD ARGS...`
fn vm_cmd(a: &Args) -> Result<i32> {
    if a.rest.is_empty() {
        bail!("`cargo xtask vm` needs a command, e.g. `cargo xtask vm -- uname -a`");
    }
    let ws = prepare(a)?;
    let line: Vec<String> = a.rest.iter().map(|s| sh_quote(s)).collect();
    let payload = Payload {
        script: format!("{}\n", line.join(" ")),
        extra_bins: Vec::new(),
    };
    let outcome = run_payload(&ws, &payload, &a.vm_opts()?)?;
    Ok(outcome.code)
}

/// `cargo xtask test [-- TEST-ARGS...]`
fn test(a: &Args) -> Result<i32> {
    let t0 = Instant::now();
    deps::ensure_host_deps()?;
    // The RBD target is built and tested when the host has (or can install) Ceph.
    let rbd = deps::ensure_ceph();
    let features = deps::rbd_features(rbd);
    let ws = Workspace::discover()?;

    eprintln!("xtask: == host tests");
    run(ws.cargo().args(["test", "--workspace"]).args(features))?;

    eprintln!("xtask: == release build");
    run(ws
        .cargo()
        .args(["build", "--release", "-p", "ublk-targets", "--bins"])
        .args(features))?;
    let kernel_tests = build_kernel_tests(&ws, features)?;
    let ublk = ws.release_dir().join("ublk");
    if !ublk.is_file() {
        bail!("{} was not built", ublk.display());
    }

    let mut test_args = vec!["--ignored".to_string(), "--test-threads=1".to_string()];
    test_args.extend(a.rest.iter().cloned());
    let opts = a.vm_opts()?;
    let code = if host_has_ublk() {
        eprintln!("xtask: == kernel tests (native, /dev/ublk-control exists)");
        let mut cmd = Command::new(&kernel_tests);
        cmd.args(&test_args)
            .env("UBLK_BIN", &ublk)
            .env("RUST_BACKTRACE", "1")
            .current_dir(&ws.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        eprintln!("xtask: $ {}", util::describe(&cmd));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", kernel_tests.display()))?;
        let res = stream_child(child, opts.timeout, None)?;
        let status = res.status.with_context(|| {
            format!("kernel tests timed out after {} s", opts.timeout.as_secs())
        })?;
        exit_code(status)
    } else {
        eprintln!("xtask: == kernel tests (in a qemu VM: the host has no /dev/ublk-control)");
        let line: Vec<String> = test_args.iter().map(|s| sh_quote(s)).collect();
        let payload = Payload {
            script: format!("kernel-tests {}\n", line.join(" ")),
            extra_bins: vec![("kernel-tests".to_string(), kernel_tests)],
        };
        run_payload(&ws, &payload, &opts)?.code
    };
    if code != 0 {
        bail!("kernel tests failed (exit status {code})");
    }
    eprintln!(
        "xtask: all tests passed in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// Builds `ublk-targets/tests/kernel.rs` in release mode and returns the path
/// of the test executable.
fn build_kernel_tests(ws: &Workspace, features: &[&str]) -> Result<PathBuf> {
    let out = output(
        ws.cargo()
            .args([
                "test",
                "--release",
                "-p",
                "ublk-targets",
                "--test",
                "kernel",
                "--no-run",
                "--message-format=json",
            ])
            .args(features),
    )?;
    find_test_executable(&out, "kernel")
        .context("cargo did not report the `kernel` test executable")
}

/// Finds the executable of test target `name` in cargo's JSON messages.
fn find_test_executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == name
                && m["profile"]["test"] == true
        })
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_test_executable() {
        let msgs = r#"{"reason":"compiler-artifact","target":{"name":"ublk"},"profile":{"test":false},"executable":"/t/ublk"}
not json
{"reason":"compiler-artifact","target":{"name":"kernel"},"profile":{"test":true},"executable":"/t/deps/kernel-123"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            find_test_executable(msgs, "kernel"),
            Some(PathBuf::from("/t/deps/kernel-123"))
        );
        assert_eq!(find_test_executable(msgs, "other"), None);
    }

    #[test]
    fn args() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = parse_args(&v(&["--mem", "2G", "--", "ls", "-l"]), &["--mem"]).expect("parses");
        assert_eq!(a.mem.as_deref(), Some("2G"));
        assert_eq!(a.rest, v(&["ls", "-l"]));
        let a = parse_args(&v(&["--mem=8G", "uname", "-a"]), &["--mem"]).expect("parses");
        assert_eq!(a.mem.as_deref(), Some("8G"));
        assert_eq!(a.rest, v(&["uname", "-a"]));
        assert!(parse_args(&v(&["--rounds", "3"]), &["--mem"]).is_err());
    }
}
