//! Locating (or downloading) the guest kernel used by the test VM.
//!
//! A kernel directory has this layout:
//!
//! ```text
//! <dir>/vmlinuz
//! <dir>/modules/<name>.ko.xz   (or .ko.zst / .ko)
//! <dir>/config                 (optional)
//! <dir>/modules.builtin        (optional)
//! ```
//!
//! Search order: `$XTASK_KERNEL_DIR`, the newest directory in
//! `<workspace>/../shared/vm-kernel/`, the newest cached download in
//! `target/vm-kernel/`, and finally a fresh download of the newest Debian sid
//! `cloud-amd64` kernel using a private apt state directory (forced with
//! `XTASK_KERNEL_DOWNLOAD=1`).

use crate::util::{env_flag, output, run, version_cmp, which, Workspace};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Modules copied into the initramfs (whichever exist), by file stem.
pub const MODULES: &[&str] = &[
    "ublk_drv",
    "configfs",
    "null_blk",
    "loop",
    "brd",
    "zram",
    "lz4hc_compress",
    "md-mod",
    "raid0",
    "raid1",
    "dm-mod",
    "dm-flakey",
    "dm-delay",
    "nbd",
    "virtio_blk",
    "xfs",
];

/// A usable guest kernel.
pub struct Kernel {
    /// Directory name, e.g. `7.2.13+deb14-cloud-amd64`.
    pub version: String,
    pub vmlinuz: PathBuf,
    /// Module files found, as (stem, path to the possibly compressed file).
    pub modules: Vec<(String, PathBuf)>,
}

impl Kernel {
    fn from_dir(dir: &Path) -> Result<Self> {
        let vmlinuz = dir.join("vmlinuz");
        if !vmlinuz.is_file() {
            bail!("{} has no vmlinuz", dir.display());
        }
        let version = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut modules = Vec::new();
        let moddir = dir.join("modules");
        for name in MODULES {
            let found = ["ko.xz", "ko.zst", "ko"]
                .iter()
                .map(|ext| moddir.join(format!("{name}.{ext}")))
                .find(|p| p.is_file());
            match found {
                Some(p) => modules.push((name.to_string(), p)),
                None => eprintln!("xtask: note: kernel {version} has no module {name}"),
            }
        }
        Ok(Kernel {
            version,
            vmlinuz,
            modules,
        })
    }
}

/// Subdirectories of `dir` containing a `vmlinuz`, newest version first.
fn kernel_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("vmlinuz").is_file())
        .collect();
    dirs.sort_by(|a, b| {
        version_cmp(
            &b.file_name().unwrap_or_default().to_string_lossy(),
            &a.file_name().unwrap_or_default().to_string_lossy(),
        )
    });
    dirs
}

/// Finds the guest kernel, downloading it when no local copy exists.
pub fn locate(ws: &Workspace) -> Result<Kernel> {
    if let Some(dir) = std::env::var_os("XTASK_KERNEL_DIR") {
        return Kernel::from_dir(Path::new(&dir))
            .context("using the kernel from $XTASK_KERNEL_DIR");
    }
    let shared = ws.root.join("..").join("shared").join("vm-kernel");
    let shared = shared.canonicalize().unwrap_or(shared);
    let cache = ws.target.join("vm-kernel");
    let force_download = env_flag("XTASK_KERNEL_DOWNLOAD");
    for base in [&shared, &cache] {
        if force_download {
            break;
        }
        if let Some(dir) = kernel_dirs(base).into_iter().next() {
            return Kernel::from_dir(&dir);
        }
    }
    if !force_download {
        eprintln!(
            "xtask: no guest kernel in {} or {}; downloading one from Debian sid",
            shared.display(),
            cache.display()
        );
    }
    let dir = download(&cache).context("downloading a guest kernel from Debian sid")?;
    Kernel::from_dir(&dir)
}

/// Downloads the newest Debian sid cloud kernel into `cache/<version>/`
/// using a private apt configuration (the host's apt state is untouched).
fn download(cache: &Path) -> Result<PathBuf> {
    for tool in ["apt-get", "apt-cache", "dpkg"] {
        if which(tool).is_none() {
            bail!("`{tool}` is required to download the guest kernel");
        }
    }
    let apt = cache.join("apt");
    let state = apt.join("state");
    let cachedir = apt.join("cache");
    let parts = apt.join("sources.list.d");
    for d in [
        state.join("lists/partial"),
        cachedir.join("archives/partial"),
        parts.clone(),
        apt.join("preferences.d"),
    ] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let status = state.join("status");
    if !status.exists() {
        fs::write(&status, "").with_context(|| format!("creating {}", status.display()))?;
    }
    let sources = apt.join("sources.list");
    let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
    let opts: Vec<String> = [
        format!("Dir::State={}", state.display()),
        format!("Dir::State::status={}", status.display()),
        format!("Dir::Etc::SourceList={}", sources.display()),
        format!("Dir::Etc::SourceParts={}", parts.display()),
        format!(
            "Dir::Etc::Preferences={}",
            apt.join("preferences").display()
        ),
        format!(
            "Dir::Etc::PreferencesParts={}",
            apt.join("preferences.d").display()
        ),
        format!("Dir::Cache={}", cachedir.display()),
        "APT::Architecture=amd64".to_string(),
        "Acquire::Languages=none".to_string(),
        "APT::Sandbox::User=root".to_string(),
        "Debug::NoLocking=1".to_string(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_string(), o])
    .collect();
    let apt_get = || {
        let mut c = Command::new("apt-get");
        c.args(&opts);
        c
    };

    let signed = if keyring.is_file() {
        format!("signed-by={}", keyring.display())
    } else {
        "trusted=yes".to_string()
    };
    let line =
        |opt: &str| format!("deb [arch=amd64 {opt}] http://deb.debian.org/debian sid main\n");
    fs::write(&sources, line(&signed)).with_context(|| format!("writing {}", sources.display()))?;
    if run(apt_get().arg("update")).is_err() {
        if signed == "trusted=yes" {
            bail!("apt-get update of Debian sid failed");
        }
        eprintln!(
            "xtask: WARNING: verifying Debian sid with {} failed (keyring too old?); \
             retrying WITHOUT signature verification. The kernel only runs inside the \
             emulated test VM.",
            keyring.display()
        );
        fs::write(&sources, line("trusted=yes"))
            .with_context(|| format!("writing {}", sources.display()))?;
        run(apt_get().arg("update"))?;
    }

    let listing = output(
        Command::new("apt-cache")
            .args(&opts)
            .args(["search", "--names-only"])
            .arg("^linux-(image|binary|modules|base)-[0-9].*-cloud-amd64$"),
    )?;
    let names: BTreeSet<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let version = names
        .iter()
        .filter_map(|n| {
            ["linux-image-", "linux-binary-", "linux-modules-"]
                .iter()
                .find_map(|p| n.strip_prefix(p))
        })
        .max_by(|a, b| version_cmp(a, b))
        .map(str::to_string)
        .context("no linux-image-*-cloud-amd64 package found in Debian sid")?;
    // Newer Debian kernels split linux-image-V into linux-binary-V (vmlinuz),
    // linux-modules-V and linux-base-V (config, modules.builtin, ...).
    let wanted: Vec<String> = [
        "linux-binary-",
        "linux-modules-",
        "linux-base-",
        "linux-image-",
    ]
    .iter()
    .map(|p| format!("{p}{version}"))
    .filter(|n| names.contains(n))
    .collect();
    eprintln!("xtask: downloading {}", wanted.join(", "));

    let dl = cache.join(format!("download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dl);
    fs::create_dir_all(&dl).with_context(|| format!("creating {}", dl.display()))?;
    run(apt_get().arg("download").args(&wanted).current_dir(&dl))?;
    let extract = dl.join("root");
    for deb in fs::read_dir(&dl)
        .with_context(|| format!("listing {}", dl.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
    {
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&extract))?;
    }

    let mut files = Vec::new();
    walk(&extract, &mut files)?;
    let find = |pred: &dyn Fn(&str) -> bool| {
        files
            .iter()
            .find(|p| p.file_name().is_some_and(|n| pred(&n.to_string_lossy())))
            .cloned()
    };
    let vmlinuz = find(&|n| n == format!("vmlinuz-{version}"))
        .or_else(|| find(&|n| n.starts_with("vmlinuz")))
        .context("the downloaded packages contain no vmlinuz")?;

    let staging = cache.join(format!("{version}.partial"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("modules"))
        .with_context(|| format!("creating {}", staging.display()))?;
    fs::copy(&vmlinuz, staging.join("vmlinuz")).context("copying vmlinuz")?;
    let config = files.iter().find(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = p
            .parent()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        name == Some(format!("config-{version}"))
            || (name.as_deref() == Some("config") && parent.as_deref() == Some(version.as_str()))
    });
    if let Some(cfg) = config {
        fs::copy(cfg, staging.join("config")).context("copying the kernel config")?;
    }
    if let Some(b) = find(&|n| n == "modules.builtin") {
        fs::copy(b, staging.join("modules.builtin")).context("copying modules.builtin")?;
    }
    for name in MODULES {
        for ext in ["ko.xz", "ko.zst", "ko"] {
            let file = format!("{name}.{ext}");
            if let Some(p) = find(&|n| n == file) {
                fs::copy(&p, staging.join("modules").join(&file))
                    .with_context(|| format!("copying {}", p.display()))?;
                break;
            }
        }
    }
    let final_dir = cache.join(&version);
    let _ = fs::remove_dir_all(&final_dir);
    fs::rename(&staging, &final_dir)
        .with_context(|| format!("moving the kernel into {}", final_dir.display()))?;
    let _ = fs::remove_dir_all(&dl);
    eprintln!("xtask: cached kernel {version} in {}", final_dir.display());
    Ok(final_dir)
}

/// Collects all regular files below `dir` (symlinks are not followed).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let ft = e.file_type().context("reading a file type")?;
        if ft.is_dir() {
            walk(&e.path(), out)?;
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}
