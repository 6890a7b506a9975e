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
         run CMD in the VM with the release binaries on PATH (and libublk-null,
         once `cargo xtask bench` has built it, and the host's perf)
  demo   [--mem SIZE] [--smp N] [--no-build] [--runtime SECS]
         RAM-backed ublk device: ext4 round trip + fio
  profile [--mem SIZE] [--smp N] [--no-build] [--runtime SECS (5)] [--write]
          [--compress] [-- TARGET ARGS]
         perf record -a -g while fio 4k randread (--write: randwrite) qd64
         runs on a ublk device (default: null --buffer-mode zero-copy) and on
         null_blk; prints CPU time by command and by symbol for both;
         --compress: against zram lz4 (default target: compress over a tmpfs
         file), both filled first with the bench's half-compressible data
  bench  [--mem SIZE (10G)] [--smp N] [--no-build] [--rounds N (3)]
         [--runtime SECS (2, after 1 s ramp)] [--quick] [--all] [--filter NAME,...]
         [--accel single|multi|both]
         fio on ublk null (copy, zero-copy, batch), libublk null (its sync
         closure path, copy and zero-copy, and its async path), null_blk, brd,
         loop, ublk ram and file, ublk stripes vs md raid0, ublk mirrors vs md
         raid1 over brd disks, the mirror's rebuild vs md's resync, and ublk
         compress vs zram: the headline plan, under 40 min per boot under TCG;
         --accel: one boot per qemu TCG regime (default both for the headline
         plan, single for --quick or --filter; natively there is one);
         --all: every buffer mode and SQPOLL variant too (about 60 min per
         boot); --quick: 7 devices, 4k randread, 1 job, about 4 min;
         --filter: devices and rebuilds whose name contains one of the NAMEs
         (NAME$: exactly NAME), e.g. md-raid0,ublk-stripe or
         md-raid1,ublk-mirror or ublk-null-zc$,null_blk; writes
         target/bench/report.md, raw.json and iops.png (with two regimes, one
         directory each under target/bench/ and a report.md side by side)
  bench --native | --sweep
         --native: on a host with /dev/ublk-control only (no VM), the plan
         plus a scaling sweep of ublk null (batch + zero-copy) over 1, 2, 4,
         ... queues up to the CPU count, as many fio jobs, iodepth 128: IOPS
         per queue and per busy CPU; --sweep: the sweep alone, natively or
         in the VM; writes target/bench/sweep.md. `cargo xtask test` runs a
         1- and 2-queue sweep after the kernel tests
  bench --instructions
         instructions per 4 KiB I/O of the userspace path (null, stripes,
         mirror, RAM) on the simulated queue, with perf stat where the host
         has the counter, else callgrind; no VM; compared with the previous
         run; writes target/bench/instructions.md and .json

environment:
  XTASK_VM_TIMEOUT=SECS    kill the VM after SECS (default 3000; bench: from its plan)
  XTASK_BOOT_TIMEOUT=SECS  give up if the guest's /init has not started after SECS (300)
  XTASK_FORCE_VM=1         use the VM even when /dev/ublk-control exists
  XTASK_NATIVE=1           run natively even without /dev/ublk-control
  XTASK_ACCEL=ACCEL        qemu -accel value (default: kvm if usable, else tcg,thread=single)
  XTASK_CPU=MODEL          qemu -cpu value (default: max, or host under kvm)
  XTASK_MITIGATIONS=on     boot the guest with the kernel's default mitigations
                           (default: mitigations=off)
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

/// Default VM timeout (65 minutes): the test suite's VM part took about 31 minutes on a
/// quiet 2-core host with Debian 12's qemu 7.2, ran past 35 on a busy one, and took 44 on a
/// host with qemu 10.0.2 from backports; CI allows 90 for the whole run.
const DEFAULT_TIMEOUT_SECS: u64 = 65 * 60;

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
    /// `--all`: every bench device, not only the headline plan.
    all: bool,
    /// `--instructions`: count instructions per I/O instead of running fio.
    instructions: bool,
    /// `--native`: require `/dev/ublk-control`; the plan plus the scaling sweep.
    native: bool,
    /// `--sweep`: the scaling sweep alone (natively or in the VM).
    sweep: bool,
    /// `--compress` (profile): zram as the peer, both devices filled first.
    compress: bool,
    /// `--write` (profile): random writes instead of reads.
    write: bool,
    /// `--accel`: the qemu accelerators to run the benchmark under, one boot each.
    accel: Vec<String>,
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
        all: false,
        instructions: false,
        native: false,
        sweep: false,
        compress: false,
        write: false,
        accel: Vec::new(),
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
            "--all" => a.all = true,
            "--instructions" => a.instructions = true,
            "--native" => a.native = true,
            "--sweep" => a.sweep = true,
            "--compress" => a.compress = true,
            "--write" => a.write = true,
            "--accel" => {
                a.accel = match value()?.as_str() {
                    "single" => vec![vm::TCG.to_string()],
                    "multi" => vec![vm::MTTCG.to_string()],
                    "both" => vec![vm::TCG.to_string(), vm::MTTCG.to_string()],
                    other => bail!("--accel {other:?}: single, multi or both"),
                }
            }
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
            accel: None,
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
            let a = parse_args(
                rest,
                &[
                    "--mem",
                    "--smp",
                    "--no-build",
                    "--runtime",
                    "--compress",
                    "--write",
                ],
            )?;
            let ws = prepare(&a)?;
            let peer = if a.compress {
                profile::Peer::Zram
            } else {
                profile::Peer::NullBlk
            };
            let rw = if a.write { "randwrite" } else { "randread" };
            let target = if a.rest.is_empty() {
                match peer {
                    profile::Peer::NullBlk => "null --buffer-mode zero-copy".to_string(),
                    profile::Peer::Zram => "compress --path /tmp/profile.img".to_string(),
                }
            } else {
                // Quoted for the guest's shell: a stack expression has parentheses.
                a.rest
                    .iter()
                    .map(|r| sh_quote(r))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            profile::profile(
                &ws,
                &a.vm_opts()?,
                &target,
                a.runtime.unwrap_or(5),
                peer,
                rw,
            )?;
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
                    "--all",
                    "--accel",
                    "--instructions",
                    "--native",
                    "--sweep",
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
    if a.instructions {
        let ws = Workspace::discover()?;
        let md = bench::instructions::instructions(&ws)?;
        println!("\n{md}");
        return Ok(0);
    }
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
        all: a.all,
    };
    if a.native && !host_has_ublk() {
        bail!(
            "--native needs the ublk driver on this host (/dev/ublk-control: modprobe ublk_drv); \
             without it, `cargo xtask bench --sweep` runs the scaling sweep in the VM"
        );
    }
    if a.sweep {
        let ws = prepare(a)?;
        let mut vm = a.vm_opts()?;
        vm.mem = a.mem.clone().unwrap_or_else(|| BENCH_MEM.to_string());
        vm.accel = a.accel.first().cloned();
        run_sweep(&ws, &vm, &[], opts.runtime, opts.ramp, opts.rounds)?;
        return Ok(0);
    }
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
    // Natively there is one regime; in the VM each accelerator is a boot of its own (both
    // by default for the headline plan, single-threaded TCG alone for a filtered one).
    let accels: Vec<Option<String>> = if host_has_ublk() {
        vec![None]
    } else if !a.accel.is_empty() {
        a.accel.iter().cloned().map(Some).collect()
    } else if opts.filter.is_empty() && !opts.quick && std::env::var_os("XTASK_ACCEL").is_none() {
        vec![Some(vm::TCG.to_string()), Some(vm::MTTCG.to_string())]
    } else {
        vec![None]
    };
    let top = ws.target.join("bench");
    let mut runs = Vec::new();
    for accel in &accels {
        vm.accel = accel.clone();
        let dir = if accels.len() > 1 {
            top.join(bench::regime_slug(accel.as_deref()))
        } else {
            top.clone()
        };
        eprintln!(
            "xtask: == bench in {}",
            bench::regime_name(accel.as_deref())
        );
        runs.push((
            dir.clone(),
            bench::bench(&ws, &vm, &plan, libublk.as_deref(), &dir)?,
        ));
    }
    if runs.len() > 1 {
        let md = bench::report::combined(&runs);
        let path = top.join("report.md");
        std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
        println!("\n{md}");
        println!("xtask: wrote {}", path.display());
    }
    if a.native {
        run_sweep(&ws, &vm, &[], opts.runtime, opts.ramp, opts.rounds)?;
    }
    let problems: Vec<String> = runs
        .iter()
        .filter_map(|(_, r)| r.incomplete.as_ref().map(|e| format!("{}: {e}", r.regime)))
        .collect();
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(0)
}

/// Runs the scaling sweep (queue counts `queues`, or 1, 2, 4, … up to the CPU count when
/// empty), writes `target/bench/sweep.md` and prints it; fails unless every queue count
/// gave a measurement.
fn run_sweep(
    ws: &Workspace,
    vm: &VmOpts,
    queues: &[u32],
    runtime: u32,
    ramp: u32,
    rounds: u32,
) -> Result<()> {
    let payload = Payload {
        script: bench::sweep::script(queues, runtime, ramp, rounds),
        extra_bins: Vec::new(),
    };
    let outcome = run_payload(ws, &payload, vm)?;
    let md = check_sweep(
        &outcome.output,
        &bench::regime_name(vm.accel.as_deref()),
        queues,
    )?;
    let dir = ws.target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("sweep.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("\n{md}");
    eprintln!("xtask: wrote {}", path.display());
    if outcome.code != 0 {
        bail!("the sweep script failed (exit status {})", outcome.code);
    }
    Ok(())
}

/// The sweep's table from a console, or why the sweep did not measure every queue count.
fn check_sweep(out: &str, regime: &str, expect: &[u32]) -> Result<String> {
    let samples = bench::sweep::parse(out);
    let failed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once("XTASK-SWEEP-FAIL ").map(|(_, x)| x.trim()))
        .collect();
    if !failed.is_empty() {
        bail!("scaling sweep runs failed: {}", failed.join(", "));
    }
    if samples.is_empty() || !samples.iter().all(|s| s.iops > 0.0) {
        bail!("the scaling sweep measured nothing: {samples:?}");
    }
    if let Some(q) = expect
        .iter()
        .find(|&&q| !samples.iter().any(|s| s.queues == q))
    {
        bail!("the scaling sweep has no measurement for {q} queue(s)");
    }
    Ok(bench::sweep::markdown(
        &samples,
        bench::sweep::cpus(out),
        regime,
    ))
}

/// Queue counts of the small scaling sweep `cargo xtask test` runs after the kernel tests,
/// so that `cargo xtask bench --native` cannot rot.
const TEST_SWEEP_QUEUES: &[u32] = &[1, 2];

/// `cargo xtask vm -- CMD ARGS...`
fn vm_cmd(a: &Args) -> Result<i32> {
    if a.rest.is_empty() {
        bail!("`cargo xtask vm` needs a command, e.g. `cargo xtask vm -- uname -a`");
    }
    let ws = prepare(a)?;
    let line: Vec<String> = a.rest.iter().map(|s| sh_quote(s)).collect();
    // The libublk peer server too, when a bench has built it, and the host's perf, for
    // comparisons and profiles by hand.
    let libublk = ws
        .root
        .join("benches/libublk-null/target/release/libublk-null");
    let mut extra_bins = Vec::new();
    if libublk.is_file() {
        extra_bins.push(("libublk-null".to_string(), libublk));
    }
    if let Some(perf) = util::which("perf") {
        extra_bins.push(("perf".to_string(), perf));
    }
    let payload = Payload {
        script: format!("{}\n", line.join(" ")),
        extra_bins,
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
    if !rbd && std::env::var_os("CI").is_some() {
        // Elsewhere a host without Ceph runs everything else; CI must test every target.
        bail!("CI is set but Ceph could not be installed: the RBD target would go untested");
    }
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

    // A filtered run (`cargo xtask test -- NAME`) runs the named kernel tests only.
    let sweep = a.rest.is_empty();
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
        let code = exit_code(status);
        if code == 0 && sweep {
            eprintln!("xtask: == the scaling sweep of `bench --native`, 1 and 2 queues");
            run_sweep(&ws, &opts, TEST_SWEEP_QUEUES, 1, 0, 1)?;
        }
        code
    } else {
        eprintln!("xtask: == kernel tests (in a qemu VM: the host has no /dev/ublk-control)");
        let line: Vec<String> = test_args.iter().map(|s| sh_quote(s)).collect();
        // The full run also exercises the scaling sweep of `bench --native` (1 and 2
        // queues, 1 s each) in the same boot, so that it cannot rot.
        let script = test_script(&line.join(" "), sweep);
        let payload = Payload {
            script,
            extra_bins: vec![("kernel-tests".to_string(), kernel_tests)],
        };
        let outcome = run_payload(&ws, &payload, &opts)?;
        if outcome.code == 0 && sweep {
            let md = check_sweep(
                &outcome.output,
                &bench::regime_name(opts.accel.as_deref()),
                TEST_SWEEP_QUEUES,
            )
            .context("the scaling sweep of `cargo xtask bench --native` after the kernel tests")?;
            eprintln!("xtask: the scaling sweep (1 and 2 queues) ran:\n{md}");
        }
        outcome.code
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

/// The VM payload of `cargo xtask test`: the kernel tests, then (for a full run, when they
/// passed) the small scaling sweep in a subshell; exits with the kernel tests' status.
fn test_script(args: &str, sweep: bool) -> String {
    if sweep {
        format!(
            "kernel-tests {args}\nkt=$?\n[ \"$kt\" -ne 0 ] || (\n{}\n)\nexit $kt\n",
            bench::sweep::script(TEST_SWEEP_QUEUES, 1, 0, 1)
        )
    } else {
        format!("kernel-tests {args}\n")
    }
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
    fn test_payload_parses_and_keeps_the_tests_status() {
        for sweep in [false, true] {
            let script = test_script("--ignored --test-threads=1", sweep);
            let ok = Command::new("sh")
                .args(["-n", "-c", &script])
                .status()
                .expect("sh");
            assert!(ok.success(), "{script}");
            assert!(script.starts_with("kernel-tests --ignored --test-threads=1\n"));
            assert_eq!(script.contains("XTASK-SWEEP"), sweep);
        }
        assert!(test_script("", true).trim_end().ends_with("exit $kt"));
    }

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
