//! `ceph-test-cluster`: a throwaway single-node Ceph cluster on 127.0.0.1 for the RBD
//! target's kernel tests and benchmarks (test-only; built with the cargo feature `rbd`).
//!
//! ```text
//! ceph-test-cluster start DIR            one monitor, three memstore OSDs, pool `rbd` of size 3
//! ceph-test-cluster create DIR IMAGE SIZE [FEATURES]
//!                                         an image in pool rbd (SIZE in bytes, K/M/G suffix;
//!                                         FEATURES as rbd_default_features, e.g. layering)
//! ceph-test-cluster kill-osd DIR N        SIGKILL osd.N
//! ceph-test-cluster restart-osd DIR N     a fresh osd.N (memstore loses its data), up again
//! ceph-test-cluster stop DIR              SIGKILL every daemon
//! ```
//!
//! The daemons (`ceph-mon`, `ceph-osd` from PATH) run in the foreground of their own
//! sessions, logging under DIR/log, their pids in DIR/pids; `start` prints the path of the
//! configuration file (DIR/ceph.conf) once the pool serves I/O. Monitor commands go through
//! librados: no `ceph` (Python) tool is needed. Steps follow Ceph's "Manual Deployment".

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use ublk_targets::rbd::{Cluster, ConnectOptions, Image, IoCtx};

const FSID: &str = "6c4c7b0e-2f5e-4a53-9d55-0b1c3d2e7a01";
const OSDS: u32 = 3;
const POOL: &str = "rbd";
/// How long a daemon or the pool may take to come up under emulation.
const READY: Duration = Duration::from_secs(100);

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["start", dir] => start(Path::new(dir)),
        ["create", dir, image, size] => create(Path::new(dir), image, size, None),
        ["create", dir, image, size, features] => {
            create(Path::new(dir), image, size, Some(features))
        }
        ["kill-osd", dir, n] => parse_osd(n).and_then(|n| kill(Path::new(dir), &osd_name(n))),
        ["restart-osd", dir, n] => parse_osd(n).and_then(|n| restart_osd(Path::new(dir), n)),
        ["stop", dir] => stop(Path::new(dir)),
        _ => Err("usage: ceph-test-cluster start|create|kill-osd|restart-osd|stop DIR ...".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceph-test-cluster: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_osd(n: &str) -> Result<u32> {
    match n.parse() {
        Ok(n) if n < OSDS => Ok(n),
        _ => Err(format!("{n:?}: expected an OSD number below {OSDS}")),
    }
}

fn osd_name(n: u32) -> String {
    format!("osd.{n}")
}

fn osd_uuid(n: u32) -> String {
    format!("6c4c7b0e-0000-4000-8000-00000000000{n}")
}

fn conf_path(dir: &Path) -> PathBuf {
    dir.join("ceph.conf")
}

fn lib_dir() -> &'static str {
    "/usr/lib/x86_64-linux-gnu"
}

fn conf_text(dir: &Path) -> String {
    let d = dir.display();
    let lib = lib_dir();
    format!(
        "[global]
fsid = {FSID}
mon_host = v2:127.0.0.1:3300
public_addr = 127.0.0.1
ms_bind_msgr1 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
keyring = /dev/null
osd_pool_default_size = 3
osd_pool_default_min_size = 2
osd_crush_chooseleaf_type = 0
crush_location = root=default host=ublk-test
osd_objectstore = memstore
memstore_device_bytes = 536870912
plugin_dir = {lib}/ceph
erasure_code_dir = {lib}/ceph/erasure-code
osd_class_dir = {lib}/rados-classes
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
mon_data = {d}/mon/$name
osd_data = {d}/osd/$id
mon_allow_pool_delete = true
mon_osd_min_down_reporters = 1
osd_fast_fail_on_connection_refused = true
"
    )
}

fn run(cmd: &mut Command) -> Result {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Starts `program args` in its own session, output to DIR/log/NAME.out, its pid in
/// DIR/pids/NAME.
fn spawn(dir: &Path, name: &str, program: &str, args: &[&str]) -> Result {
    let log = fs::File::create(dir.join("log").join(format!("{name}.out")))
        .map_err(|e| format!("log of {name}: {e}"))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    fs::write(dir.join("pids").join(name), child.id().to_string())
        .map_err(|e| format!("pid file of {name}: {e}"))
}

fn connect(dir: &Path) -> Result<Arc<Cluster>> {
    connect_with(dir, &[])
}

fn connect_with(dir: &Path, extra: &[(&str, &str)]) -> Result<Arc<Cluster>> {
    let conf = conf_path(dir);
    // This client only sets the cluster up: an operation stuck on a PG that never becomes
    // active fails instead of hanging the tests.
    let mut options = vec![("rados_osd_op_timeout", "120")];
    options.extend_from_slice(extra);
    Cluster::connect(&ConnectOptions {
        conf: Some(&conf),
        id: "admin",
        timeout: Duration::from_secs(60),
        options: &options,
    })
    .map_err(|e| e.to_string())
}

fn mon_json(cluster: &Cluster, cmd: &str) -> Result<Value> {
    let (out, status) = cluster.mon_command(cmd).map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Ok(Value::String(status));
    }
    serde_json::from_slice(&out).map_err(|e| format!("{cmd}: {e}"))
}

fn start(dir: &Path) -> Result {
    let t0 = Instant::now();
    let _ = stop(dir);
    let _ = fs::remove_dir_all(dir);
    for sub in ["run", "log", "mon", "osd", "pids"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let conf = conf_path(dir);
    fs::write(&conf, conf_text(dir)).map_err(|e| format!("{}: {e}", conf.display()))?;
    let conf_s = conf.to_str().ok_or("the directory must be UTF-8")?;
    let monmap = dir.join("monmap");
    let monmap_s = monmap.to_str().ok_or("the directory must be UTF-8")?;
    run(Command::new("monmaptool").args([
        "--create",
        "--fsid",
        FSID,
        "--addv",
        "a",
        "[v2:127.0.0.1:3300]",
        monmap_s,
    ]))?;
    run(Command::new("ceph-mon").args(["-c", conf_s, "--mkfs", "-i", "a", "--monmap", monmap_s]))?;
    spawn(dir, "mon.a", "ceph-mon", &["-c", conf_s, "-i", "a", "-f"])?;
    let cluster = connect(dir)?;
    eprintln!(
        "ceph-test-cluster: monitor up at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    for n in 0..OSDS {
        let out = mon_json(
            &cluster,
            &format!(
                r#"{{"prefix":"osd new","uuid":"{}","format":"json"}}"#,
                osd_uuid(n)
            ),
        )?;
        if out["osdid"].as_u64() != Some(u64::from(n)) {
            return Err(format!("osd new gave {out}, expected osd {n}"));
        }
        start_osd(dir, n)?;
    }
    wait_osds_up(&cluster, OSDS)?;
    eprintln!(
        "ceph-test-cluster: {OSDS} OSDs up at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    cluster
        .mon_command(&format!(
            r#"{{"prefix":"osd pool create","pool":"{POOL}","pg_num":8,"pgp_num":8}}"#
        ))
        .map_err(|e| e.to_string())?;
    cluster
        .mon_command(&format!(
            r#"{{"prefix":"osd pool application enable","pool":"{POOL}","app":"rbd"}}"#
        ))
        .map_err(|e| e.to_string())?;
    // The pool serves I/O once its PGs are active: write and read back a probe image.
    let ioctx = IoCtx::new(&cluster, POOL).map_err(|e| e.to_string())?;
    ioctx
        .create_image("ready-probe", 4 << 20)
        .map_err(|e| e.to_string())?;
    let image = Image::open(&ioctx, "ready-probe", None).map_err(|e| e.to_string())?;
    let data = vec![0x5a; 4096];
    image.write(0, &data).map_err(|e| e.to_string())?;
    let mut back = vec![0; 4096];
    image.read(0, &mut back).map_err(|e| e.to_string())?;
    if back != data {
        return Err("the probe image read back different bytes".into());
    }
    eprintln!(
        "ceph-test-cluster: pool {POOL} serving at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!("{}", conf.display());
    Ok(())
}

fn start_osd(dir: &Path, n: u32) -> Result {
    let conf = conf_path(dir);
    let conf_s = conf.to_str().ok_or("the directory must be UTF-8")?;
    let data = dir.join("osd").join(n.to_string());
    let _ = fs::remove_dir_all(&data);
    fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let id = n.to_string();
    let uuid = osd_uuid(n);
    run(Command::new("ceph-osd").args(["-c", conf_s, "-i", &id, "--mkfs", "--osd-uuid", &uuid]))?;
    spawn(
        dir,
        &osd_name(n),
        "ceph-osd",
        &["-c", conf_s, "-i", &id, "-f"],
    )
}

fn wait_osds_up(cluster: &Cluster, want: u32) -> Result {
    let deadline = Instant::now() + READY;
    loop {
        let stat = mon_json(cluster, r#"{"prefix":"osd stat","format":"json"}"#)?;
        let up = stat["num_up_osds"].as_u64().unwrap_or(0);
        if up >= u64::from(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {up} of {want} OSDs up after {READY:?}: {stat}"
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn create(dir: &Path, image: &str, size: &str, features: Option<&str>) -> Result {
    let bytes = ublk_core::parse_size(size).map_err(|e| e.to_string())?;
    let cluster = match features {
        Some(f) => connect_with(dir, &[("rbd_default_features", f)])?,
        None => connect(dir)?,
    };
    let ioctx = IoCtx::new(&cluster, POOL).map_err(|e| e.to_string())?;
    ioctx.create_image(image, bytes).map_err(|e| e.to_string())
}

fn kill(dir: &Path, name: &str) -> Result {
    let pid_file = dir.join("pids").join(name);
    let pid: i32 = fs::read_to_string(&pid_file)
        .map_err(|e| format!("{}: {e}", pid_file.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", pid_file.display()))?;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("kill {name} ({pid}): {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Reap it if it is our child; otherwise wait until it is gone.
    while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = fs::remove_file(pid_file);
    Ok(())
}

fn restart_osd(dir: &Path, n: u32) -> Result {
    let _ = kill(dir, &osd_name(n));
    start_osd(dir, n)?;
    let cluster = connect(dir)?;
    wait_osds_up(&cluster, OSDS)
}

fn stop(dir: &Path) -> Result {
    let pids = dir.join("pids");
    let names: Vec<String> = fs::read_dir(&pids)
        .map_err(|e| format!("{}: {e}", pids.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    for name in names {
        kill(dir, &name)?;
    }
    Ok(())
}
