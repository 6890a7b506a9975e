//! `cargo xtask bench`: fio on the project's ublk devices, the libublk null
//! server and the kernel's own block drivers, in one VM boot (or natively).
//!
//! Every device of the plan is set up once and stays up for the whole run
//! (idle devices cost nothing; the script's exit trap deletes the ublk
//! devices, stops libublk-null, detaches the loop device and unloads the
//! modules). Each round runs every test on every device, alternating devices
//! run by run (the device order is rotated every round so no device always
//! follows the same neighbour); the report gives the median of the rounds.
//! The default 2 s measured + 1 s ramp per run keeps the full plan (894 runs
//! and the rebuild rounds) near 60 minutes of TCG time. Writes
//! `target/bench/`: `report.md` (Markdown tables and the bar checks),
//! `raw.json` (every fio run, with fio's job report, and every rebuild) and
//! `iops.png`.
//!
//! Queues: every ublk device (ours and libublk's) gets 2 queues of depth 128
//! and null_blk 2 submit queues of depth 128, so the 1-job and 2-job runs use
//! the same device and each of the 2 vCPUs has its own queue.
//!
//! Stripes: md raid0 (`mdadm --build`, no superblock) and two ublk stacks
//! `stripe(file:/dev/ram1,file:/dev/ram2,chunk=64K)` (zero-copy and copy)
//! share one pair of brd disks with the same 64 KiB chunk, so the ublk rows
//! are compared with md over the very same memory. They run only the tests
//! of [`PAIR_TESTS`], over the first [`PAIR_SPAN_MIB`] MiB of the device (the
//! brd pages they write stay allocated until the end).
//!
//! Mirrors: md raid1 (`mdadm --create`, internal bitmap, `--assume-clean`)
//! and two ublk stacks `mirror(file:/dev/ram3,file:/dev/ram4,assume_clean=true)`
//! (zero-copy and copy) share a second pair, [`MIRROR_PAIR`], the same way,
//! and run the tests of [`MIRROR_TESTS`] over [`PAIR_SPAN_MIB`] MiB. Each keeps
//! its metadata in memory while it runs and only writes it, so their
//! superblocks and bitmaps overwriting each other's on the shared disks change
//! nothing that is measured; block 0 of both disks is zeroed before each
//! mirror is assembled, so that it starts a new mirror instead of taking up
//! the one set up before it.
//!
//! Compression: zram with lz4 (`/dev/zram0`, 1 GiB) and `ublk add compress`
//! with lz4 and with zstd over sparse files on tmpfs, of the same logical size,
//! run the tests of [`COMPRESS_TESTS`] over [`COMPRESS_SPAN_MIB`] MiB with
//! half-compressible data ([`COMPRESS_DATA`]). Each is first filled with the
//! same data (the same fio job and seed), after which the script prints its
//! compression as a note: zram's `mm_stat`, our `ublk status` fields. After the
//! runs, each is discarded and stores the same [`CORPUS_MIB`] MiB of real files
//! (the start of `tar /bin /lib /usr` in the guest), and its ratio is noted
//! again: half-random blocks cannot tell zstd from lz4.
//!
//! RBD (only with `--filter` naming them, e.g. `--filter rbd`): `rbd-nbd` and
//! `ublk add rbd` map the same image of one Ceph test cluster started in the
//! guest (`ceph-test-cluster`: one monitor, three memstore OSDs, a pool of size
//! 3), filled over [`RBD_SPAN_MIB`] MiB first; they run [`RBD_TESTS`] with 1
//! job over that span.
//!
//! Rebuilds: before any device is set up, each round times md raid1's initial
//! resync (`mdadm --create` without `--assume-clean`) and the initial sync of
//! `mirror(file:/dev/ram3,file:/dev/ram4)` (leg 1 copied from leg 0), each on
//! freshly discarded 1 GiB disks, alternating like the fio runs
//! ([`REBUILDS`]); the report gives MB/s and the ratio to md.

pub mod instructions;
pub mod report;
mod script;
pub mod sweep;

use crate::chart;
use crate::deps;
use crate::fio::{self, FioResult};
use crate::util::{run, Workspace};
use crate::vm::{host_has_ublk, run_payload, Payload, VmOpts};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Size of every device under test, in MiB (the setup strings say 1G).
const DEVICE_MIB: u32 = 1024;

/// Queue layout shared by the ublk devices (ours and libublk's).
const UBLK_QUEUES: &str = "--size 1G --queues 2 --depth 128";

/// The same for `libublk-null` (sizes in bytes).
const LIBUBLK_QUEUES: &str = "--queues 2 --depth 128 --size 1073741824";

/// The tmpfs file behind the kernel loop device and our file target.
const BENCH_FILE: &str = "/dev/shm/ublk-bench.img";

/// `brd` parameters, loaded once for the whole plan: `/dev/ram0` is the brd
/// row, `/dev/ram1` and `/dev/ram2` the pair under md raid0 and the ublk
/// stripes, `/dev/ram3` and `/dev/ram4` the legs of md raid1 and the ublk
/// mirrors (1 GiB each: brd has one size for all its disks; pages are only
/// allocated when written, and freed by a discard).
const BRD_PARAMS: &str = "rd_nr=5 rd_size=1048576";

/// The brd pair under the stripe rows.
const BRD_PAIR: [&str; 2] = ["/dev/ram1", "/dev/ram2"];

/// The brd pair under the mirror rows and the rebuilds.
const MIRROR_PAIR: [&str; 2] = ["/dev/ram3", "/dev/ram4"];

/// The stripe chunk of md raid0 and the ublk stripes, in KiB.
const PAIR_CHUNK_KIB: u32 = 64;

/// MiB of the 2 GiB stripe rows that fio addresses (half of it on each brd
/// disk), to bound the guest memory their random writes allocate.
const PAIR_SPAN_MIB: u32 = 512;

/// The tests the stripe rows run (the stripe comparison).
pub const PAIR_TESTS: &[&str] = &["randread-4k-qd64", "randwrite-4k-qd64", "seqread-128k-qd16"];

/// Queue layout of the ublk stacks (a stack takes its size from its tree).
const UBLK_STACK_QUEUES: &str = "--queues 2 --depth 128";

/// md raid0 over [`BRD_PAIR`].
pub const MD_RAID0: &str = "md-raid0";

/// The tests the mirror rows run (the mirror comparison).
pub const MIRROR_TESTS: &[&str] = &["randread-4k-qd64", "randwrite-4k-qd64"];

/// md raid1 over [`MIRROR_PAIR`].
pub const MD_RAID1: &str = "md-raid1";

/// The md device of [`MD_RAID1`] and of the md resync rounds.
const MD_RAID1_DEV: &str = "/dev/md1";

/// The tests the compression rows run (the zram comparison).
pub const COMPRESS_TESTS: &[&str] = &["randread-4k-qd64", "randwrite-4k-qd64"];

/// MiB of the compression rows that fio addresses (and the fill writes).
pub const COMPRESS_SPAN_MIB: u32 = 256;

/// Bytes of real files each compressing device stores after the runs, in MiB: the start
/// of `tar /bin /lib /usr` in the guest (its programs, libraries and kernel modules).
pub const CORPUS_MIB: u32 = 128;

/// Where the guest keeps those files meanwhile (tmpfs).
const CORPUS: &str = "/dev/shm/ublk-bench-files.tar";

/// The `WHEN` of the compression notes taken with the real files stored.
pub const ON_FILES: &str = "on real files";

/// fio's data for the compression rows: every 4 KiB half random, half zeroes,
/// refilled for every write, from a fixed seed.
pub const COMPRESS_DATA: &str = "--buffer_compress_percentage=50 --buffer_compress_chunk=4k \
                             --refill_buffers --randseed=11";

/// zram with lz4, the compression rows' reference.
pub const ZRAM_LZ4: &str = "zram-lz4";

/// The tests the RBD rows run (the rbd-nbd comparison).
pub const RBD_TESTS: &[&str] = &["randread-4k-qd64", "randwrite-4k-qd64", "seqread-128k-qd16"];

/// MiB of the RBD image that fio addresses (filled before the runs, so that reads reach
/// objects the OSDs hold). The whole cluster lives in guest memory, three copies of it.
const RBD_SPAN_MIB: u32 = 64;

/// The Ceph test cluster's directory in the guest (`ceph-test-cluster start`).
const RBD_CLUSTER_DIR: &str = "/tmp/ublk-bench-ceph";

/// The image both RBD rows map.
const RBD_IMAGE: &str = "bench";

/// rbd-nbd (librbd behind the kernel's nbd driver), the RBD rows' reference.
pub const RBD_NBD: &str = "rbd-nbd";

/// What a device is, for the ratio columns and the bar checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `ublk add null` in some buffer mode.
    UblkNull,
    /// The libublk null server.
    LibublkNull,
    /// A kernel driver (null_blk, brd, loop, md raid0).
    Kernel,
    /// `ublk add ram`, compared with brd.
    UblkRam,
    /// `ublk add file`, compared with loop.
    UblkFile,
    /// `ublk add stack 'stripe(...)'` over the brd pair, compared with md raid0.
    UblkStripe,
    /// `ublk add stack 'mirror(...)'` over the mirror pair, compared with md raid1.
    UblkMirror,
    /// `ublk add compress` over a tmpfs file, compared with zram.
    UblkCompress,
    /// `ublk add rbd` on the test cluster's image, compared with rbd-nbd.
    UblkRbd,
}

/// How a device under test is created.
enum Setup {
    /// `ublk add <args> --size 1G --queues 2 --depth 128`.
    Ublk(&'static str),
    /// `libublk-null <args> --queues 2 --depth 128 --size 1073741824`, in the background.
    Libublk(&'static str),
    /// A kernel module creating `dev` when loaded with `params`.
    Kmod {
        module: &'static str,
        params: &'static str,
        dev: &'static str,
    },
    /// A kernel loop device (direct I/O when losetup can) over [`BENCH_FILE`].
    Loop,
    /// A brd disk (brd is loaded once with [`BRD_PARAMS`]).
    Brd(&'static str),
    /// md raid0 over [`BRD_PAIR`] with [`PAIR_CHUNK_KIB`] chunks, built by mdadm.
    MdRaid0,
    /// `ublk add stack '<tree>' <args> --queues 2 --depth 128`, the tree a
    /// stripe over [`BRD_PAIR`] with [`PAIR_CHUNK_KIB`] chunks.
    UblkStripe(&'static str),
    /// md raid1 over [`MIRROR_PAIR`], created by mdadm with an internal bitmap
    /// and without a resync.
    MdRaid1,
    /// `ublk add stack '<tree>' <args> --queues 2 --depth 128`, the tree a new
    /// mirror over [`MIRROR_PAIR`] assumed clean.
    UblkMirror(&'static str),
    /// zram (one device of [`DEVICE_MIB`] MiB) compressing with `algo`.
    Zram(&'static str),
    /// `rbd-nbd map` of [`RBD_IMAGE`] on the Ceph test cluster.
    RbdNbd,
    /// `ublk add rbd <args> --queues 2 --depth 128` of [`RBD_IMAGE`] on the Ceph test
    /// cluster.
    UblkRbd(&'static str),
}

/// A device under test (the name must not contain dots or spaces).
pub struct Device {
    pub name: &'static str,
    pub role: Role,
    setup: Setup,
    /// Part of the `--quick` subset.
    quick: bool,
    /// Part of the default (headline) plan; the others run with `--all` or when a
    /// `--filter` names them.
    headline: bool,
}

impl Device {
    /// How the device is created, for the report.
    pub fn describe(&self) -> String {
        match &self.setup {
            Setup::Ublk(args) => format!("`ublk add {args} {UBLK_QUEUES}`"),
            Setup::Libublk(args) => {
                let args: Vec<&str> = [*args, LIBUBLK_QUEUES]
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .collect();
                format!("`libublk-null {}`", args.join(" "))
            }
            Setup::Kmod { module, params, .. } => format!("`insmod {module}.ko {params}`"),
            Setup::Loop => format!("`losetup --direct-io=on` over {BENCH_FILE} (tmpfs, 1 GiB)"),
            Setup::Brd(dev) => format!("`insmod brd.ko {BRD_PARAMS}`, {dev}"),
            Setup::MdRaid0 => format!("`{}` ({PAIR_SPAN_MIB} MiB used)", md_build_command()),
            Setup::UblkStripe(args) => format!(
                "`ublk add stack '{}' {args} {UBLK_STACK_QUEUES}` ({PAIR_SPAN_MIB} MiB used)",
                stripe_tree()
            ),
            Setup::MdRaid1 => format!(
                "`{}`, then idle ({PAIR_SPAN_MIB} MiB used)",
                md_raid1_command(true)
            ),
            Setup::UblkMirror(args) => format!(
                "`ublk add stack '{}' {args} {UBLK_STACK_QUEUES}` on legs whose block 0 was \
                 zeroed ({PAIR_SPAN_MIB} MiB used)",
                mirror_tree(true)
            ),
            Setup::Zram(algo) => format!(
                "`insmod lz4hc_compress.ko` (zram needs it), `insmod zram.ko num_devices=1`, `echo {algo} >comp_algorithm`, `echo \
                 {DEVICE_MIB}M >disksize` (as `zramctl --find --size {DEVICE_MIB}M --algorithm \
                 {algo}`), filled like the compress rows ({COMPRESS_SPAN_MIB} MiB used)"
            ),
            Setup::RbdNbd => format!(
                "`rbd-nbd map rbd/{RBD_IMAGE}` (nbd module) on the test cluster: \
                 `ceph-test-cluster` (1 monitor, 3 memstore OSDs, pool of size 3, on \
                 127.0.0.1 in the guest), image of 256 MiB with the layering feature only \
                 (no exclusive lock to pass between the two clients), filled \
                 ({RBD_SPAN_MIB} MiB used)"
            ),
            Setup::UblkRbd(args) => format!(
                "`ublk add rbd --pool rbd --image {RBD_IMAGE} {args} {UBLK_STACK_QUEUES}` on the \
                 same cluster and image ({RBD_SPAN_MIB} MiB used)"
            ),
        }
    }

    /// Whether the device is filled with [`COMPRESS_DATA`] and runs with it.
    fn compresses(&self) -> bool {
        matches!(self.setup, Setup::Zram(_)) || self.role == Role::UblkCompress
    }

    fn needs_file(&self) -> bool {
        matches!(self.setup, Setup::Loop) || self.role == Role::UblkFile
    }

    fn needs_brd(&self) -> bool {
        matches!(self.setup, Setup::Brd(_)) || self.pair_tests().is_some()
    }

    fn needs_mdadm(&self) -> bool {
        matches!(self.setup, Setup::MdRaid0 | Setup::MdRaid1)
    }

    /// For a device over a brd pair (stripes over [`BRD_PAIR`], mirrors over
    /// [`MIRROR_PAIR`]): the only tests it runs.
    fn pair_tests(&self) -> Option<&'static [&'static str]> {
        match self.setup {
            Setup::MdRaid0 | Setup::UblkStripe(_) => Some(PAIR_TESTS),
            Setup::MdRaid1 | Setup::UblkMirror(_) => Some(MIRROR_TESTS),
            _ => None,
        }
    }

    /// Whether the device is an RBD row (it needs the Ceph test cluster).
    fn uses_rbd(&self) -> bool {
        matches!(self.setup, Setup::RbdNbd | Setup::UblkRbd(_))
    }

    /// Whether the device runs `test`.
    pub fn runs(&self, test: &Test) -> bool {
        let only = if self.compresses() {
            Some(COMPRESS_TESTS)
        } else if self.uses_rbd() {
            Some(RBD_TESTS)
        } else {
            self.pair_tests()
        };
        match only {
            Some(tests) => tests.contains(&test.name),
            None => true,
        }
    }

    /// Whether the device runs with `jobs` fio jobs: the RBD rows run 1 job only (the
    /// emulated cluster is the bottleneck either way, and the full plan stays near an hour).
    pub fn runs_jobs(&self, jobs: u32) -> bool {
        jobs == 1 || !self.uses_rbd()
    }

    /// MiB of the device that fio addresses.
    fn span_mib(&self) -> u32 {
        if self.pair_tests().is_some() {
            PAIR_SPAN_MIB
        } else if self.compresses() {
            COMPRESS_SPAN_MIB
        } else if self.uses_rbd() {
            RBD_SPAN_MIB
        } else {
            DEVICE_MIB
        }
    }
}

/// The mdadm command line building [`MD_RAID0`] (`--build`: no superblock,
/// data from sector 0 like the ublk stripes).
fn md_build_command() -> String {
    format!(
        "mdadm --build /dev/md0 --level=0 --raid-devices=2 --chunk={PAIR_CHUNK_KIB} {} {}",
        BRD_PAIR[0], BRD_PAIR[1]
    )
}

/// The stack expression of the ublk stripe rows.
fn stripe_tree() -> String {
    format!(
        "stripe(file:{},file:{},chunk={PAIR_CHUNK_KIB}K)",
        BRD_PAIR[0], BRD_PAIR[1]
    )
}

/// The mdadm command line creating md raid1 over [`MIRROR_PAIR`] (version
/// 1.2 superblock and internal bitmap, as mdadm makes them by default); with
/// `assume_clean` it starts in sync, else it resyncs leg 1 from leg 0.
fn md_raid1_command(assume_clean: bool) -> String {
    format!(
        "mdadm --create {MD_RAID1_DEV} --level=1 --raid-devices=2 --bitmap=internal{} --run {} {}",
        if assume_clean { " --assume-clean" } else { "" },
        MIRROR_PAIR[0],
        MIRROR_PAIR[1]
    )
}

/// The stack expression of a new mirror over [`MIRROR_PAIR`]; without
/// `assume_clean` its leg 1 is rebuilt from leg 0.
fn mirror_tree(assume_clean: bool) -> String {
    format!(
        "mirror(file:{},file:{}{})",
        MIRROR_PAIR[0],
        MIRROR_PAIR[1],
        if assume_clean {
            ",assume_clean=true"
        } else {
            ""
        }
    )
}

/// The reference every row is compared with.
pub const NULL_BLK: &str = "null_blk";
/// The reference of the null-type rows.
pub const LIBUBLK: &str = "libublk-null-copy";

pub const DEVICES: &[Device] = &[
    Device {
        name: "ublk-null-copy",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode copy"),
        quick: true,
        headline: true,
    },
    Device {
        name: "ublk-null-copy-sqpoll",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode copy --sqpoll"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-reg",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode registered"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-reg-sqpoll",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode registered --sqpoll"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-zc",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode zero-copy"),
        quick: true,
        headline: true,
    },
    Device {
        name: "ublk-null-zc-sqpoll",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode zero-copy --sqpoll"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-zc-defer",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode zero-copy --defer-taskrun"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-mzc",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode manual-zero-copy"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-uc",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode user-copy"),
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-null-uc-sqpoll",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode user-copy --sqpoll"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-batch-sqpoll",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode copy --batch --sqpoll"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-batch",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode copy --batch"),
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-null-batch-uc",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode user-copy --batch"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-null-batch-zc",
        role: Role::UblkNull,
        setup: Setup::Ublk("null --buffer-mode zero-copy --batch"),
        quick: false,
        headline: true,
    },
    Device {
        name: LIBUBLK,
        role: Role::LibublkNull,
        setup: Setup::Libublk(""),
        quick: true,
        headline: true,
    },
    Device {
        name: "libublk-null-zc",
        role: Role::LibublkNull,
        setup: Setup::Libublk("--zero-copy"),
        quick: false,
        headline: true,
    },
    Device {
        name: "libublk-null-async",
        role: Role::LibublkNull,
        setup: Setup::Libublk("--async"),
        quick: false,
        headline: true,
    },
    Device {
        name: NULL_BLK,
        role: Role::Kernel,
        setup: Setup::Kmod {
            module: "null_blk",
            params: "queue_mode=2 irqmode=0 nr_devices=1 gb=1 submit_queues=2 hw_queue_depth=128",
            dev: "/dev/nullb0",
        },
        quick: true,
        headline: true,
    },
    Device {
        name: "ublk-ram",
        role: Role::UblkRam,
        setup: Setup::Ublk("ram"),
        quick: true,
        headline: true,
    },
    Device {
        name: "ublk-ram-defer",
        role: Role::UblkRam,
        setup: Setup::Ublk("ram --defer-taskrun"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-ram-uc",
        role: Role::UblkRam,
        setup: Setup::Ublk("ram --buffer-mode user-copy"),
        quick: true,
        headline: true,
    },
    Device {
        name: "brd",
        role: Role::Kernel,
        setup: Setup::Brd("/dev/ram0"),
        quick: true,
        headline: true,
    },
    Device {
        name: "ublk-file-copy",
        role: Role::UblkFile,
        setup: Setup::Ublk("file --path /dev/shm/ublk-bench.img --direct"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-file-zc",
        role: Role::UblkFile,
        setup: Setup::Ublk("file --path /dev/shm/ublk-bench.img --direct --zero-copy"),
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-file-mzc",
        role: Role::UblkFile,
        setup: Setup::Ublk(
            "file --path /dev/shm/ublk-bench.img --direct --buffer-mode manual-zero-copy",
        ),
        quick: false,
        headline: false,
    },
    Device {
        name: "loop",
        role: Role::Kernel,
        setup: Setup::Loop,
        quick: false,
        headline: true,
    },
    // md first: it claims the pair exclusively, the ublk stripes open it
    // O_DIRECT without O_EXCL beside it.
    Device {
        name: MD_RAID0,
        role: Role::Kernel,
        setup: Setup::MdRaid0,
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-stripe-zc",
        role: Role::UblkStripe,
        setup: Setup::UblkStripe("--buffer-mode zero-copy"),
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-stripe-copy",
        role: Role::UblkStripe,
        setup: Setup::UblkStripe("--buffer-mode copy"),
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-stripe-zc-batch",
        role: Role::UblkStripe,
        setup: Setup::UblkStripe("--buffer-mode zero-copy --batch"),
        quick: false,
        headline: false,
    },
    // md first, as for the stripes.
    Device {
        name: MD_RAID1,
        role: Role::Kernel,
        setup: Setup::MdRaid1,
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-mirror-zc",
        role: Role::UblkMirror,
        setup: Setup::UblkMirror("--buffer-mode zero-copy"),
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-mirror-copy",
        role: Role::UblkMirror,
        setup: Setup::UblkMirror("--buffer-mode copy"),
        quick: false,
        headline: false,
    },
    Device {
        name: ZRAM_LZ4,
        role: Role::Kernel,
        setup: Setup::Zram("lz4"),
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-compress-lz4",
        role: Role::UblkCompress,
        setup: Setup::Ublk("compress --path /dev/shm/ublk-compress-lz4.img --algo lz4"),
        quick: false,
        headline: true,
    },
    Device {
        name: "ublk-compress-zstd",
        role: Role::UblkCompress,
        setup: Setup::Ublk("compress --path /dev/shm/ublk-compress-zstd.img --algo zstd"),
        quick: false,
        headline: true,
    },
    Device {
        name: RBD_NBD,
        role: Role::Kernel,
        setup: Setup::RbdNbd,
        quick: false,
        headline: false,
    },
    Device {
        name: "ublk-rbd",
        role: Role::UblkRbd,
        setup: Setup::UblkRbd(""),
        quick: false,
        headline: false,
    },
];

/// A rebuild measurement: how fast leg 1 of a new two-leg mirror over
/// [`MIRROR_PAIR`] becomes a copy of leg 0 (the name must not contain dots or
/// spaces).
pub struct Rebuild {
    pub name: &'static str,
    kind: RebuildKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RebuildKind {
    /// md raid1's initial resync, unthrottled (`speed_limit_max`).
    Md,
    /// A new ublk mirror's initial sync (no rate limit by default).
    Mirror,
}

impl Rebuild {
    /// How the rebuild is started and timed, for the report.
    pub fn describe(&self) -> String {
        match self.kind {
            RebuildKind::Md => format!(
                "`{}` with `speed_limit_max` raised to {MD_SPEED_LIMIT_KIB} KiB/s, \
                 timed until `sync_action` is idle; bytes: the array size",
                md_raid1_command(false)
            ),
            RebuildKind::Mirror => format!(
                "`ublk add stack '{}' {UBLK_STACK_QUEUES}`, timed until `ublk status --json` \
                 shows both legs in sync; bytes: `rebuild_copied_bytes`",
                mirror_tree(false)
            ),
        }
    }
}

/// md resync's ceiling for the rebuild rounds, in KiB/s (the default, 200000,
/// would cap md below what it can do).
const MD_SPEED_LIMIT_KIB: u32 = 10_000_000;

/// The reference of the rebuild rows.
pub const MD_RESYNC: &str = "md-raid1-resync";

pub const REBUILDS: &[Rebuild] = &[
    Rebuild {
        name: MD_RESYNC,
        kind: RebuildKind::Md,
    },
    Rebuild {
        name: "ublk-mirror-rebuild",
        kind: RebuildKind::Mirror,
    },
];

impl Role {
    /// The kernel device a row of this role is compared with, if any.
    pub fn kernel_peer(self) -> Option<&'static str> {
        match self {
            Role::UblkRam => Some("brd"),
            Role::UblkFile => Some("loop"),
            Role::UblkStripe => Some(MD_RAID0),
            Role::UblkMirror => Some(MD_RAID1),
            Role::UblkCompress => Some(ZRAM_LZ4),
            Role::UblkRbd => Some(RBD_NBD),
            _ => None,
        }
    }

    /// Whether the row is a null server (compared with libublk).
    pub fn is_null_server(self) -> bool {
        matches!(self, Role::UblkNull | Role::LibublkNull)
    }
}

/// A fio workload (the name must not contain dots or spaces).
pub struct Test {
    pub name: &'static str,
    /// Human-readable, for the report.
    pub title: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    quick: bool,
}

pub const TESTS: &[Test] = &[
    Test {
        name: "randread-4k-qd1",
        title: "4k random read, iodepth 1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        quick: true,
    },
    Test {
        name: "randread-4k-qd64",
        title: "4k random read, iodepth 64",
        rw: "randread",
        bs: "4k",
        iodepth: 64,
        quick: true,
    },
    Test {
        name: "randwrite-4k-qd1",
        title: "4k random write, iodepth 1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        quick: false,
    },
    Test {
        name: "randwrite-4k-qd64",
        title: "4k random write, iodepth 64",
        rw: "randwrite",
        bs: "4k",
        iodepth: 64,
        quick: false,
    },
    Test {
        name: "seqread-128k-qd16",
        title: "128k sequential read, iodepth 16",
        rw: "read",
        bs: "128k",
        iodepth: 16,
        quick: false,
    },
];

/// `cargo xtask bench` options.
pub struct Options {
    pub rounds: u32,
    /// Measured seconds per fio run.
    pub runtime: u32,
    /// Unmeasured warm-up seconds before each run (also lets the SQPOLL
    /// thread of the previous device go idle: `ublk add --sqpoll` idles
    /// after 1 s).
    pub ramp: u32,
    /// Only the `quick` devices and tests, 1 job.
    pub quick: bool,
    /// Keep only devices (and rebuilds) whose name contains one of these.
    pub filter: Vec<String>,
    /// Every device, not only the headline plan's (a filter also picks from all).
    pub all: bool,
}

/// What one benchmark invocation runs.
pub struct Plan {
    pub devices: Vec<&'static Device>,
    /// Timed before the devices are set up, `rounds` times each.
    pub rebuilds: Vec<&'static Rebuild>,
    pub tests: Vec<&'static Test>,
    pub jobs: Vec<u32>,
    pub rounds: u32,
    pub runtime: u32,
    pub ramp: u32,
    /// Why devices were left out (e.g. libublk-null could not be built).
    pub notes: Vec<String>,
}

/// Whether a device or rebuild `name` is picked by the `--filter` item `f`: it contains `f`,
/// or with a trailing `$`, it is exactly what comes before it (`ublk-null-zc$` picks
/// `ublk-null-zc` but neither `ublk-null-zc-sqpoll` nor `libublk-null-zc`).
fn matches(name: &str, f: &str) -> bool {
    match f.strip_suffix('$') {
        Some(exact) => name == exact,
        None => name.contains(f),
    }
}

/// Guest seconds per fio run beyond runtime + ramp (measured under TCG:
/// fio start-up and job setup).
const RUN_OVERHEAD_SECS: f64 = 0.7;

/// Boot, device setup (1 GiB tmpfs file) and teardown.
const SETUP_SECS: u64 = 90;

/// Guest seconds per rebuild round of one row (1 GiB under TCG: md's resync
/// took 9 s, the mirror's 19 s; plus setup, teardown and the discards).
const REBUILD_ROUND_SECS: u64 = 30;

impl Plan {
    /// The plan of `opts`, less the libublk rows when libublk-null could not
    /// be built and the md rows when there is no mdadm.
    pub fn new(opts: &Options, libublk_available: bool, mdadm_available: bool) -> Result<Plan> {
        let mut notes = Vec::new();
        let wanted =
            |name: &str| opts.filter.is_empty() || opts.filter.iter().any(|f| matches(name, f));
        let mut devices: Vec<&Device> = DEVICES
            .iter()
            .filter(|d| !opts.quick || d.quick)
            .filter(|d| d.headline || opts.all || !opts.filter.is_empty())
            .filter(|d| wanted(d.name))
            // The RBD rows start a Ceph cluster in the guest: only when asked for by name.
            .filter(|d| !d.uses_rbd() || !opts.filter.is_empty())
            .collect();
        // The rebuilds are not part of --quick.
        let mut rebuilds: Vec<&Rebuild> = REBUILDS
            .iter()
            .filter(|r| !opts.quick && wanted(r.name))
            .collect();
        if devices.is_empty() && rebuilds.is_empty() {
            let names: Vec<&str> = DEVICES
                .iter()
                .map(|d| d.name)
                .chain(REBUILDS.iter().map(|r| r.name))
                .collect();
            bail!(
                "--filter {} matches no device; devices: {}",
                opts.filter.join(","),
                names.join(", ")
            );
        }
        if !libublk_available && devices.iter().any(|d| d.role == Role::LibublkNull) {
            devices.retain(|d| d.role != Role::LibublkNull);
            notes.push(
                "libublk-null could not be built (see the xtask output; it needs libclang), \
                 so the libublk rows and ratios are missing."
                    .to_string(),
            );
        }
        let md_rebuild = rebuilds.iter().any(|r| r.kind == RebuildKind::Md);
        if !mdadm_available && (md_rebuild || devices.iter().any(|d| d.needs_mdadm())) {
            devices.retain(|d| !d.needs_mdadm());
            rebuilds.retain(|r| r.kind != RebuildKind::Md);
            notes.push(
                "mdadm is not installed (apt-get install --no-install-recommends mdadm), \
                 so the md rows and the stripes' and mirrors' ratios to them are missing."
                    .to_string(),
            );
        }
        let tests = TESTS.iter().filter(|t| !opts.quick || t.quick).collect();
        let jobs = if opts.quick { vec![1] } else { vec![1, 2] };
        Ok(Plan {
            devices,
            rebuilds,
            tests,
            jobs,
            rounds: opts.rounds,
            runtime: opts.runtime,
            ramp: opts.ramp,
            notes,
        })
    }

    /// Number of fio runs.
    pub fn runs(&self) -> usize {
        let runs: usize = self
            .devices
            .iter()
            .map(|d| {
                let jobs = self.jobs.iter().filter(|&&j| d.runs_jobs(j)).count();
                self.tests.iter().filter(|t| d.runs(t)).count() * jobs
            })
            .sum();
        runs * self.rounds as usize
    }

    /// Expected guest time.
    pub fn estimate(&self) -> Duration {
        let per_run = f64::from(self.runtime + self.ramp) + RUN_OVERHEAD_SECS;
        let rebuilds = self.rebuilds.len() as u64 * u64::from(self.rounds) * REBUILD_ROUND_SECS;
        Duration::from_secs_f64(self.runs() as f64 * per_run)
            + Duration::from_secs(SETUP_SECS + rebuilds)
    }

    fn uses_file(&self) -> bool {
        self.devices.iter().any(|d| d.needs_file())
    }

    fn uses_brd(&self) -> bool {
        !self.rebuilds.is_empty() || self.devices.iter().any(|d| d.needs_brd())
    }

    pub fn uses_libublk(&self) -> bool {
        self.devices.iter().any(|d| d.role == Role::LibublkNull)
    }

    /// Whether the plan has RBD rows (they share one Ceph test cluster).
    fn uses_rbd(&self) -> bool {
        self.devices.iter().any(|d| d.uses_rbd())
    }

    pub fn uses_mdadm(&self) -> bool {
        self.devices.iter().any(|d| d.needs_mdadm())
            || self.rebuilds.iter().any(|r| r.kind == RebuildKind::Md)
    }
}

/// One fio measurement.
pub struct Sample {
    pub device: String,
    pub test: String,
    pub jobs: u32,
    pub round: u32,
    pub result: FioResult,
    /// fio's report of the (group-reported) job.
    pub fio_job: Value,
}

/// The median of the rounds of one (device, test, jobs), with the IOPS spread.
#[derive(Clone, Debug)]
pub struct Median {
    pub iops: f64,
    /// The lowest and highest IOPS of the rounds.
    pub iops_min: f64,
    pub iops_max: f64,
    pub lat_avg_us: f64,
    pub lat_p99_us: f64,
    pub rounds: usize,
}

/// Medians by (device, test, jobs).
pub struct Results {
    pub medians: HashMap<(String, String, u32), Median>,
}

impl Results {
    pub fn from_samples(samples: &[Sample]) -> Results {
        let mut groups: HashMap<(String, String, u32), Vec<&FioResult>> = HashMap::new();
        for s in samples {
            groups
                .entry((s.device.clone(), s.test.clone(), s.jobs))
                .or_default()
                .push(&s.result);
        }
        let medians = groups
            .into_iter()
            .map(|(k, rs)| {
                let med = |f: fn(&FioResult) -> f64| {
                    fio::median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
                };
                let iops: Vec<f64> = rs.iter().map(|r| r.iops).collect();
                let m = Median {
                    iops: med(|r| r.iops),
                    iops_min: iops.iter().copied().fold(f64::INFINITY, f64::min),
                    iops_max: iops.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    lat_avg_us: med(|r| r.lat_avg_us),
                    lat_p99_us: med(|r| r.lat_p99_us),
                    rounds: rs.len(),
                };
                (k, m)
            })
            .collect();
        Results { medians }
    }

    pub fn get(&self, device: &str, test: &str, jobs: u32) -> Option<&Median> {
        self.medians
            .get(&(device.to_string(), test.to_string(), jobs))
    }

    /// IOPS of `device` divided by IOPS of `reference` (same test and jobs).
    pub fn ratio(&self, device: &str, reference: &str, test: &str, jobs: u32) -> Option<f64> {
        let a = self.get(device, test, jobs)?.iops;
        let b = self.get(reference, test, jobs)?.iops;
        (b > 0.0).then(|| a / b)
    }

    /// Whether the rounds of `device` and `reference` overlap (the lowest of either is at
    /// most the highest of the other): their ratio is then within the noise between rounds.
    pub fn within_noise(
        &self,
        device: &str,
        reference: &str,
        test: &str,
        jobs: u32,
    ) -> Option<bool> {
        let a = self.get(device, test, jobs)?;
        let b = self.get(reference, test, jobs)?;
        Some(ranges_overlap(
            [a.iops_min, a.iops_max],
            [b.iops_min, b.iops_max],
        ))
    }
}

/// Whether two closed ranges `[min, max]` share a point.
pub fn ranges_overlap(a: [f64; 2], b: [f64; 2]) -> bool {
    a[0] <= b[1] && b[0] <= a[1]
}

/// One timed rebuild round.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildSample {
    pub name: String,
    pub round: u32,
    /// Bytes the rebuild copied.
    pub bytes: u64,
    /// Seconds from the start of the setup until the legs were in sync.
    pub secs: f64,
}

impl RebuildSample {
    /// Parses the text after `XTASK-BENCH-REBUILD`: `NAME ROUND BYTES T0 T1`,
    /// the times in seconds of uptime.
    fn parse(text: &str) -> Option<RebuildSample> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [name, round, bytes, t0, t1] = parts[..] else {
            return None;
        };
        let (t0, t1): (f64, f64) = (t0.parse().ok()?, t1.parse().ok()?);
        Some(RebuildSample {
            name: name.to_string(),
            round: round.parse().ok()?,
            bytes: bytes.parse().ok()?,
            secs: t1 - t0,
        })
    }

    /// Throughput in MB/s (10^6 bytes per second).
    pub fn mb_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            f64::NAN
        }
    }
}

/// The rounds of one rebuild row.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildStats {
    pub rounds: usize,
    /// Bytes copied (the median of the rounds; every round copies the same).
    pub bytes: f64,
    pub secs: f64,
    /// MB/s: min, median, max.
    pub mb_per_s: [f64; 3],
}

impl RebuildStats {
    /// The statistics of `name`'s samples, `None` when none completed.
    pub fn of(samples: &[RebuildSample], name: &str) -> Option<RebuildStats> {
        let mine: Vec<&RebuildSample> = samples.iter().filter(|s| s.name == name).collect();
        if mine.is_empty() {
            return None;
        }
        let of = |f: fn(&RebuildSample) -> f64| mine.iter().map(|s| f(s)).collect::<Vec<f64>>();
        let rates = of(RebuildSample::mb_per_s);
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(RebuildStats {
            rounds: mine.len(),
            bytes: fio::median(&of(|s| s.bytes as f64)),
            secs: fio::median(&of(|s| s.secs)),
            mb_per_s: [min, fio::median(&rates), max],
        })
    }
}

/// Builds the libublk null server (standalone crate `benches/libublk-null`,
/// needs libclang for bindgen); installs libclang when root and the first
/// build fails. Returns the binary, or `None` (with a warning) when it
/// cannot be built.
pub fn build_libublk(ws: &Workspace, no_build: bool) -> Option<PathBuf> {
    let dir = ws.root.join("benches/libublk-null");
    // An explicit target dir, so that CARGO_TARGET_DIR cannot move the binary.
    let target_dir = dir.join("target");
    let bin = target_dir.join("release/libublk-null");
    if no_build {
        if bin.is_file() {
            return Some(bin);
        }
        eprintln!(
            "xtask: warning: --no-build and no {}: the libublk rows are left out",
            bin.display()
        );
        return None;
    }
    let build = || {
        run(ws
            .cargo()
            .args(["build", "--release", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir))
    };
    let mut result = build();
    if result.is_err() && deps::ensure_optional_package("libclang-dev", "libclang (for bindgen)") {
        result = build();
    }
    match result {
        Ok(()) if bin.is_file() => Some(bin),
        Ok(()) => {
            eprintln!(
                "xtask: warning: cargo built libublk-null but {} is missing; the libublk rows are left out",
                bin.display()
            );
            None
        }
        Err(e) => {
            eprintln!(
                "xtask: warning: cannot build libublk-null ({e:#}); the libublk rows are left out \
                 (it needs libclang: apt-get install libclang-dev)"
            );
            None
        }
    }
}

/// Guest facts the script prints.
struct Markers {
    kernel: String,
    cpus: String,
    skipped: Vec<String>,
    failed: Vec<String>,
    notes: Vec<String>,
    /// `XTASK-BENCH-REBUILD` lines that do not parse.
    bad_rebuilds: Vec<String>,
    rebuilds: Vec<RebuildSample>,
}

impl Markers {
    fn parse(out: &str) -> Markers {
        let values = |marker: &str| -> Vec<String> {
            out.lines()
                .filter_map(|l| {
                    let at = l.find(marker)?;
                    Some(l[at + marker.len()..].trim().to_string())
                })
                .collect()
        };
        Markers {
            kernel: values("XTASK-BENCH-KERNEL").pop().unwrap_or_default(),
            cpus: values("XTASK-BENCH-CPUS").pop().unwrap_or_default(),
            skipped: values("XTASK-BENCH-SKIP"),
            failed: values("XTASK-BENCH-FAIL"),
            notes: values("XTASK-BENCH-NOTE"),
            bad_rebuilds: values("XTASK-BENCH-REBUILD")
                .into_iter()
                .filter(|l| RebuildSample::parse(l).is_none())
                .collect(),
            rebuilds: values("XTASK-BENCH-REBUILD")
                .iter()
                .filter_map(|l| RebuildSample::parse(l))
                .collect(),
        }
    }
}

/// What one boot of the benchmark gave, for the report across regimes.
pub struct Run {
    /// Where it ran: "single-threaded TCG", "multi-threaded TCG", "KVM" or "native".
    pub regime: String,
    pub bars: Vec<report::Bar>,
    /// Its `report.md`.
    pub markdown: String,
    /// Why the run is incomplete, if it is.
    pub incomplete: Option<String>,
}

/// The name of the regime a VM with `accel` (see [`VmOpts::accel`]) runs in.
pub fn regime_name(accel: Option<&str>) -> String {
    if host_has_ublk() {
        return "native".to_string();
    }
    match accel {
        Some(a) if a == crate::vm::TCG => "single-threaded TCG".to_string(),
        Some(a) if a == crate::vm::MTTCG => "multi-threaded TCG".to_string(),
        Some(a) => a.to_string(),
        None => match std::env::var("XTASK_ACCEL") {
            Ok(a) if !a.is_empty() => regime_name(Some(&a)),
            _ => "default accelerator (KVM if usable, else single-threaded TCG)".to_string(),
        },
    }
}

/// A directory name for the regime of `accel`.
pub fn regime_slug(accel: Option<&str>) -> String {
    match accel {
        Some(a) if a == crate::vm::TCG => "single".to_string(),
        Some(a) if a == crate::vm::MTTCG => "multi".to_string(),
        Some(a) => a.replace([',', '=', '/'], "-"),
        None => "default".to_string(),
    }
}

/// Runs the benchmark in one boot and writes its report, raw JSON and chart into `dir`.
pub fn bench(
    ws: &Workspace,
    vm: &VmOpts,
    plan: &Plan,
    libublk: Option<&Path>,
    dir: &Path,
) -> Result<Run> {
    let regime = regime_name(vm.accel.as_deref());
    let est = plan.estimate();
    eprintln!(
        "xtask: bench plan: {} devices × {} tests × {} job counts × {} rounds = {} fio runs \
         of {}+{} s, {} rebuild rows × {} rounds, about {} min",
        plan.devices.len(),
        plan.tests.len(),
        plan.jobs.len(),
        plan.rounds,
        plan.runs(),
        plan.ramp,
        plan.runtime,
        plan.rebuilds.len(),
        plan.rounds,
        est.as_secs().div_ceil(60)
    );
    let mut extra_bins = Vec::new();
    if plan.uses_libublk() {
        let bin = libublk.context("the plan has libublk rows but no libublk-null binary")?;
        extra_bins.push(("libublk-null".to_string(), bin.to_path_buf()));
    }
    let payload = Payload {
        script: script::script(plan),
        extra_bins,
    };
    let t0 = Instant::now();
    let outcome = run_payload(ws, &payload, vm)?;
    let wall = t0.elapsed();
    let out = &outcome.output;

    let mut samples = Vec::new();
    for (lbl, text) in fio::sections(out) {
        let (device, test, jobs, round) =
            script::parse_label(&lbl).with_context(|| format!("unexpected fio label {lbl:?}"))?;
        let result = fio::parse(&text).with_context(|| format!("fio results of {lbl}"))?;
        let fio_job = text
            .find('{')
            .and_then(|at| serde_json::from_str::<Value>(&text[at..]).ok())
            .map(|v| v["jobs"][0].clone())
            .unwrap_or(Value::Null);
        samples.push(Sample {
            device,
            test,
            jobs,
            round,
            result,
            fio_job,
        });
    }
    let markers = Markers::parse(out);
    let results = Results::from_samples(&samples);
    let env = report::Environment {
        mode: if host_has_ublk() {
            "native".to_string()
        } else {
            format!("qemu VM ({regime}, mem {}, {} vCPUs)", vm.mem, vm.smp)
        },
        kernel: markers.kernel.clone(),
        cpus: markers.cpus.clone(),
        fio: fio_version(),
        wall,
    };
    let mut notes = plan.notes.clone();
    notes.extend(markers.notes.iter().cloned());
    notes.extend(
        markers
            .skipped
            .iter()
            .map(|s| format!("**{s}: setup failed, not measured.**")),
    );
    notes.extend(
        markers
            .failed
            .iter()
            .map(|f| format!("**run {f} failed.**")),
    );
    notes.extend(
        markers
            .bad_rebuilds
            .iter()
            .map(|l| format!("**unreadable rebuild result: {l}**")),
    );
    let rebuilds: Vec<(&Rebuild, Option<RebuildStats>)> = plan
        .rebuilds
        .iter()
        .map(|r| (*r, RebuildStats::of(&markers.rebuilds, r.name)))
        .collect();

    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let png = dir.join("iops.png");
    let _ = fs::remove_file(&png);
    // A plan of rebuilds alone has no IOPS to draw.
    if !plan.devices.is_empty() {
        if let Err(e) = draw_chart(plan, &results, &env, &png) {
            eprintln!("xtask: warning: no chart: {e:#}");
            notes.push(format!("No chart was drawn: {e:#}."));
        }
    }
    let bars = report::bars(&results);
    let md = report::markdown(
        plan,
        &results,
        &rebuilds,
        &bars,
        &env,
        &notes,
        png.is_file(),
    );
    let report_path = dir.join("report.md");
    fs::write(&report_path, &md).with_context(|| format!("writing {}", report_path.display()))?;

    let raw = json!({
        "environment": {
            "mode": env.mode,
            "kernel": env.kernel,
            "cpus": env.cpus,
            "fio": env.fio,
            "wall_s": wall.as_secs_f64(),
        },
        "plan": {
            "devices": plan.devices.iter().map(|d| json!({
                "name": d.name,
                "setup": d.describe(),
            })).collect::<Vec<_>>(),
            "tests": plan.tests.iter().map(|t| json!({
                "name": t.name,
                "rw": t.rw,
                "bs": t.bs,
                "iodepth": t.iodepth,
            })).collect::<Vec<_>>(),
            "rebuilds": plan.rebuilds.iter().map(|r| json!({
                "name": r.name,
                "setup": r.describe(),
            })).collect::<Vec<_>>(),
            "jobs": plan.jobs,
            "rounds": plan.rounds,
            "runtime_s": plan.runtime,
            "ramp_s": plan.ramp,
        },
        "notes": notes,
        "bars": bars.iter().map(report::Bar::to_json).collect::<Vec<_>>(),
        "medians": report::medians_json(plan, &results),
        "samples": samples.iter().map(|s| json!({
            "device": s.device,
            "test": s.test,
            "jobs": s.jobs,
            "round": s.round,
            "iops": s.result.iops,
            "lat_avg_us": s.result.lat_avg_us,
            "lat_p99_us": s.result.lat_p99_us,
            "fio": s.fio_job,
        })).collect::<Vec<_>>(),
        "rebuilds": report::rebuilds_json(&rebuilds),
        "rebuild_samples": markers.rebuilds.iter().map(|s| json!({
            "name": s.name,
            "round": s.round,
            "bytes": s.bytes,
            "secs": s.secs,
            "mb_per_s": s.mb_per_s(),
        })).collect::<Vec<_>>(),
    });
    let raw_path = dir.join("raw.json");
    let raw_text = serde_json::to_string_pretty(&raw).context("serializing raw results")?;
    fs::write(&raw_path, raw_text).with_context(|| format!("writing {}", raw_path.display()))?;

    println!("\n{md}");
    println!(
        "xtask: wrote {}, {}{} ({} fio runs and {} rebuilds in {:.0} s)",
        report_path.display(),
        raw_path.display(),
        if png.is_file() {
            format!(" and {}", png.display())
        } else {
            String::new()
        },
        samples.len(),
        markers.rebuilds.len(),
        wall.as_secs_f64()
    );
    let expected_rebuilds = plan.rebuilds.len() * plan.rounds as usize;
    let incomplete = if outcome.code != 0 {
        Some(format!(
            "the benchmark script failed (exit status {})",
            outcome.code
        ))
    } else if !markers.skipped.is_empty()
        || !markers.failed.is_empty()
        || !markers.bad_rebuilds.is_empty()
        || samples.len() < plan.runs()
        || markers.rebuilds.len() < expected_rebuilds
    {
        Some(format!(
            "some benchmark runs did not complete (see {})",
            report_path.display()
        ))
    } else {
        None
    };
    Ok(Run {
        regime,
        bars,
        markdown: md,
        incomplete,
    })
}

/// The chart: one panel per test, bars per device for 1 and 2 jobs.
fn draw_chart(plan: &Plan, results: &Results, env: &report::Environment, png: &Path) -> Result<()> {
    let font = Path::new(chart::FONT);
    let panels = plan
        .tests
        .iter()
        .map(|t| chart::Panel {
            title: t.title.to_string(),
            rows: plan.devices.iter().map(|d| d.name.to_string()).collect(),
            values: plan
                .devices
                .iter()
                .map(|d| {
                    plan.jobs
                        .iter()
                        .map(|&j| results.get(d.name, t.name, j).map(|m| m.iops))
                        .collect()
                })
                .collect(),
        })
        .collect();
    let c = chart::Chart {
        title: "ublk-rs: fio IOPS per device (median of rounds)".to_string(),
        subtitle: format!(
            "io_uring, O_DIRECT, median of {} round{} of {} s; {}, kernel {}; absolute \
             numbers under emulation are meaningless, compare bars within a panel",
            plan.rounds,
            if plan.rounds == 1 { "" } else { "s" },
            plan.runtime,
            env.mode,
            env.kernel
        ),
        series: plan
            .jobs
            .iter()
            .map(|j| format!("{j} job{}", if *j == 1 { "" } else { "s" }))
            .collect(),
        panels,
        columns: 2,
        value_label: "IOPS".to_string(),
    };
    chart::draw(&c, font, png)
}

fn fio_version() -> String {
    Command::new("fio")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "fio".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(quick: bool, filter: &[&str]) -> Options {
        Options {
            all: false,
            rounds: 3,
            runtime: 2,
            ramp: 1,
            quick,
            filter: filter.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn names_are_label_safe_and_unique() {
        let mut names: Vec<&str> = DEVICES.iter().map(|d| d.name).collect();
        names.extend(TESTS.iter().map(|t| t.name));
        for n in &names {
            assert!(!n.contains('.') && !n.contains(' '), "{n}");
        }
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count);
    }

    #[test]
    fn setups_agree_with_the_constants() {
        for d in DEVICES {
            if let Setup::Ublk(args) = d.setup {
                assert_eq!(
                    d.role == Role::UblkFile,
                    args.contains(BENCH_FILE),
                    "{}",
                    d.name
                );
            }
        }
        assert!(UBLK_QUEUES.contains(&format!("--size {}G", DEVICE_MIB / 1024)));
        assert!(LIBUBLK_QUEUES.contains(&format!("--size {}", u64::from(DEVICE_MIB) << 20)));
    }

    #[test]
    fn references_exist() {
        for name in [NULL_BLK, LIBUBLK] {
            assert!(DEVICES.iter().any(|d| d.name == name), "{name}");
        }
        for d in DEVICES {
            if let Some(peer) = d.role.kernel_peer() {
                assert!(DEVICES.iter().any(|k| k.name == peer), "{peer}");
            }
        }
        for name in report::BAR_DEVICES {
            assert!(DEVICES.iter().any(|d| d.name == *name), "{name}");
        }
        for name in report::BAR_TESTS
            .iter()
            .chain(PAIR_TESTS)
            .chain(MIRROR_TESTS)
            .chain(RBD_TESTS)
        {
            assert!(TESTS.iter().any(|t| t.name == *name), "{name}");
        }
    }

    #[test]
    fn plans() {
        let full = Plan::new(&opts(false, &[]), true, true).expect("full plan");
        let all = Plan::new(
            &Options {
                all: true,
                ..opts(false, &[])
            },
            true,
            true,
        )
        .expect("every device");
        let stripe_rows = DEVICES
            .iter()
            .filter(|d| d.pair_tests() == Some(PAIR_TESTS))
            .count();
        let mirror_rows = DEVICES
            .iter()
            .filter(|d| d.pair_tests() == Some(MIRROR_TESTS))
            .count();
        let compress_rows = DEVICES.iter().filter(|d| d.compresses()).count();
        let rbd_rows = DEVICES.iter().filter(|d| d.uses_rbd()).count();
        assert!(
            full.devices.iter().all(|d| !d.uses_rbd()),
            "RBD rows are opt-in"
        );
        assert_eq!(
            (stripe_rows, mirror_rows, compress_rows, rbd_rows),
            (4, 3, 3, 2)
        );
        let other_rows = DEVICES.len() - stripe_rows - mirror_rows - compress_rows - rbd_rows;
        assert_eq!(
            all.runs(),
            (other_rows * TESTS.len()
                + stripe_rows * PAIR_TESTS.len()
                + mirror_rows * MIRROR_TESTS.len()
                + compress_rows * COMPRESS_TESTS.len())
                * 2
                * 3
        );
        let rbd = Plan::new(&opts(false, &["rbd"]), true, true).expect("rbd plan");
        assert_eq!(rbd.devices.len(), rbd_rows);
        assert_eq!(rbd.runs(), rbd_rows * RBD_TESTS.len() * 3);
        assert_eq!(full.rebuilds.len(), REBUILDS.len());
        // The headline plan runs once per regime: each boot must stay near 40 minutes of
        // guest time, and `--all` near 65.
        assert!(
            full.estimate() < Duration::from_secs(40 * 60),
            "{:?}",
            full.estimate()
        );
        // Every device but the RBD rows, which run only when a filter names them.
        assert_eq!(
            all.devices.len(),
            DEVICES.iter().filter(|d| !d.uses_rbd()).count()
        );
        assert!(all.devices.len() > full.devices.len());
        assert!(
            all.estimate() < Duration::from_secs(65 * 60),
            "{:?}",
            all.estimate()
        );
        let quick = Plan::new(&opts(true, &[]), true, true).expect("quick plan");
        assert_eq!(quick.jobs, vec![1]);
        assert!(quick.runs() < 60);
        assert!(quick.rebuilds.is_empty());
        assert!(!quick.uses_mdadm());
        let no_lib = Plan::new(&opts(false, &["null"]), false, true).expect("filtered plan");
        assert!(no_lib.devices.iter().all(|d| d.name.contains("null")));
        assert!(no_lib.devices.iter().all(|d| d.role != Role::LibublkNull));
        assert!(no_lib.rebuilds.is_empty());
        assert_eq!(no_lib.notes.len(), 1);
        assert!(Plan::new(&opts(false, &["nothing-matches"]), true, true).is_err());
        let exact =
            Plan::new(&opts(false, &["ublk-null-zc$", "null_blk"]), true, true).expect("exact");
        let names: Vec<&str> = exact.devices.iter().map(|d| d.name).collect();
        assert_eq!(names, ["ublk-null-zc", NULL_BLK]);
        let stripes =
            Plan::new(&opts(false, &[MD_RAID0, "ublk-stripe"]), true, true).expect("stripes");
        let names: Vec<&str> = stripes.devices.iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            [
                MD_RAID0,
                "ublk-stripe-zc",
                "ublk-stripe-copy",
                "ublk-stripe-zc-batch"
            ]
        );
        assert!(stripes.uses_brd() && stripes.uses_mdadm());
        assert_eq!(stripes.runs(), 4 * PAIR_TESTS.len() * 2 * 3);
        let no_md = Plan::new(&opts(false, &["stripe", "md"]), true, false).expect("no mdadm");
        assert!(no_md.devices.iter().all(|d| d.role == Role::UblkStripe));
        assert!(no_md.rebuilds.is_empty());
        assert_eq!(no_md.notes.len(), 1);
    }

    #[test]
    fn mirror_plan() {
        let mirrors =
            Plan::new(&opts(false, &[MD_RAID1, "ublk-mirror"]), true, true).expect("mirrors");
        let names: Vec<&str> = mirrors.devices.iter().map(|d| d.name).collect();
        assert_eq!(names, [MD_RAID1, "ublk-mirror-zc", "ublk-mirror-copy"]);
        let rebuilds: Vec<&str> = mirrors.rebuilds.iter().map(|r| r.name).collect();
        assert_eq!(rebuilds, [MD_RESYNC, "ublk-mirror-rebuild"]);
        assert!(mirrors.uses_brd() && mirrors.uses_mdadm());
        assert_eq!(mirrors.runs(), 3 * MIRROR_TESTS.len() * 2 * 3);
        // The rebuilds alone: no fio run, but brd and mdadm.
        let only = Plan::new(&opts(false, &["resync", "rebuild"]), true, true).expect("rebuilds");
        assert!(only.devices.is_empty());
        assert_eq!(only.rebuilds.len(), 2);
        assert_eq!(only.runs(), 0);
        assert!(only.uses_brd() && only.uses_mdadm());
        let no_md = Plan::new(&opts(false, &["mirror", "md-raid1"]), true, false).expect("no md");
        assert!(no_md.devices.iter().all(|d| d.role == Role::UblkMirror));
        let rebuilds: Vec<&str> = no_md.rebuilds.iter().map(|r| r.name).collect();
        assert_eq!(rebuilds, ["ublk-mirror-rebuild"]);
        assert_eq!(no_md.notes.len(), 1);
    }

    #[test]
    fn rebuild_samples() {
        let s = RebuildSample::parse("ublk-mirror-rebuild 2 1072693248 54.50 73.70")
            .expect("a marker line");
        assert_eq!(
            (s.name.as_str(), s.round, s.bytes),
            ("ublk-mirror-rebuild", 2, 1072693248)
        );
        assert!((s.secs - 19.2).abs() < 1e-9);
        assert!((s.mb_per_s() - 1072693248.0 / 19.2 / 1e6).abs() < 1e-9);
        assert_eq!(RebuildSample::parse("x 1 2 3"), None);
        assert_eq!(RebuildSample::parse("x one 2 3 4"), None);
        let sample = |round, secs| RebuildSample {
            name: "m".into(),
            round,
            bytes: 100_000_000,
            secs,
        };
        let samples = [sample(1, 2.0), sample(2, 1.0), sample(3, 4.0)];
        let st = RebuildStats::of(&samples, "m").expect("three rounds");
        assert_eq!(st.rounds, 3);
        assert_eq!(st.secs, 2.0);
        assert_eq!(st.mb_per_s, [25.0, 50.0, 100.0]);
        assert_eq!(RebuildStats::of(&samples, "other"), None);
    }

    #[test]
    fn medians_and_ratios() {
        let sample = |device: &str, iops: f64| Sample {
            device: device.into(),
            test: "t".into(),
            jobs: 1,
            round: 1,
            result: FioResult {
                iops,
                lat_avg_us: 1.0,
                lat_p99_us: 2.0,
            },
            fio_job: Value::Null,
        };
        let samples = vec![
            sample("a", 10.0),
            sample("a", 30.0),
            sample("a", 20.0),
            sample("b", 40.0),
        ];
        let r = Results::from_samples(&samples);
        let a = r.get("a", "t", 1).expect("a measured");
        assert_eq!((a.iops, a.rounds), (20.0, 3));
        assert_eq!((a.iops_min, a.iops_max), (10.0, 30.0));
        // a's rounds span 10..30, b's single round 40: outside the noise.
        assert_eq!(r.within_noise("a", "b", "t", 1), Some(false));
        assert_eq!(r.within_noise("a", "a", "t", 1), Some(true));
        assert_eq!(r.within_noise("a", "c", "t", 1), None);
        assert!(ranges_overlap([1.0, 2.0], [2.0, 3.0]));
        assert!(!ranges_overlap([1.0, 2.0], [2.5, 3.0]));
        assert_eq!(r.ratio("a", "b", "t", 1), Some(0.5));
        assert_eq!(r.ratio("a", "c", "t", 1), None);
        assert_eq!(r.ratio("a", "b", "t", 2), None);
    }
}
