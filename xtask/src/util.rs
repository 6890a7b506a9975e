//! Small helpers shared by the xtask commands: running processes, quoting
//! for `sh`, version ordering, and workspace discovery.

use anyhow::{bail, Context, Result};
use std::cmp::Ordering;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Paths and metadata of the cargo workspace xtask belongs to.
pub struct Workspace {
    /// The workspace root (the directory holding the top-level Cargo.toml).
    pub root: PathBuf,
    /// cargo's target directory (honours `CARGO_TARGET_DIR`).
    pub target: PathBuf,
    /// Names of all `bin` targets of workspace members except xtask itself.
    pub bins: Vec<String>,
}

impl Workspace {
    /// Discovers the workspace with `cargo metadata --no-deps`.
    pub fn discover() -> Result<Self> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let guess_root = manifest_dir
            .parent()
            .context("xtask's manifest directory has no parent")?;
        let out = Command::new(cargo())
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(guess_root)
            .stderr(Stdio::inherit())
            .output()
            .context("running `cargo metadata`")?;
        if !out.status.success() {
            bail!("`cargo metadata` failed ({})", out.status);
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
        let root = meta["workspace_root"]
            .as_str()
            .map(PathBuf::from)
            .context("`cargo metadata` has no workspace_root")?;
        let target = meta["target_directory"]
            .as_str()
            .map(PathBuf::from)
            .context("`cargo metadata` has no target_directory")?;
        let mut bins = Vec::new();
        for pkg in meta["packages"].as_array().into_iter().flatten() {
            if pkg["name"] == "xtask" {
                continue;
            }
            for t in pkg["targets"].as_array().into_iter().flatten() {
                let is_bin = t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"));
                if let (true, Some(name)) = (is_bin, t["name"].as_str()) {
                    bins.push(name.to_string());
                }
            }
        }
        bins.sort();
        bins.dedup();
        Ok(Workspace { root, target, bins })
    }

    /// `target/release`.
    pub fn release_dir(&self) -> PathBuf {
        self.target.join("release")
    }

    /// The release binaries of the workspace that currently exist on disk.
    pub fn release_bins(&self) -> Vec<(String, PathBuf)> {
        self.bins
            .iter()
            .map(|b| (b.clone(), self.release_dir().join(b)))
            .filter(|(_, p)| p.is_file())
            .collect()
    }

    /// A cargo command running in the workspace root.
    pub fn cargo(&self) -> Command {
        let mut c = Command::new(cargo());
        c.current_dir(&self.root);
        c
    }
}

/// The cargo executable that started us (or plain `cargo`).
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Runs `cmd` with inherited stdio and fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let desc = describe(cmd);
    eprintln!("xtask: $ {desc}");
    let status = cmd.status().with_context(|| format!("starting `{desc}`"))?;
    if !status.success() {
        bail!("`{desc}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd`, capturing stdout (stderr is inherited); fails on non-zero exit.
pub fn output(cmd: &mut Command) -> Result<String> {
    let desc = describe(cmd);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{desc}`"))?;
    if !out.status.success() {
        bail!("`{desc}` failed ({})", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{desc}` printed non-UTF-8 output"))
}

/// A human-readable rendering of a command line.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(sh_quote_os)
        .collect::<Vec<_>>()
        .join(" ")
}

fn sh_quote_os(s: &OsStr) -> String {
    sh_quote(&s.to_string_lossy())
}

/// Quotes `s` for a POSIX shell (only when needed, to keep logs readable).
pub fn sh_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Finds an executable on `PATH` (plus the sbin directories, which are not
/// always on a non-root user's PATH).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Whether `p` is a regular file with an execute bit set.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether we run with effective uid 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Compares version-like strings ("6.12.3+deb13" vs "6.9.1") chunk by chunk,
/// numerically for digit runs and bytewise otherwise.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let bytes = s.as_bytes();
        let mut start = 0;
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// Result of [`stream_child`].
pub struct Streamed {
    /// Exit status, or `None` if the child was killed because of a timeout.
    pub status: Option<ExitStatus>,
    /// Whether the child was killed because `ready` was not seen in time.
    pub not_ready: bool,
    /// Everything the child printed on stdout, with `\r` removed.
    pub output: String,
}

/// A marker of the lines to show when the console is quiet (see [`quiet_console`]).
static STORY_MARKER: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// From now on, [`stream_child`] shows only the lines containing `marker` (the text after
/// it), instead of everything the child prints; the whole output is still captured.
pub fn quiet_console(marker: &'static str) {
    let _ = STORY_MARKER.set(marker);
}

/// The part of `line` to show on a quiet console, if any.
fn story_line<'a>(line: &'a [u8], marker: &str) -> Option<&'a [u8]> {
    let m = marker.as_bytes();
    let at = line.windows(m.len()).position(|w| w == m)?;
    Some(&line[at + m.len()..])
}

/// Copies the child's stdout live to our stdout while also capturing it, and
/// kills the child if it runs longer than `timeout`, or if `ready` =
/// `(text, limit)` is given and `text` has not appeared within `limit`.
pub fn stream_child(
    mut child: Child,
    timeout: Duration,
    ready: Option<(&str, Duration)>,
) -> Result<Streamed> {
    let mut stdout = child
        .stdout
        .take()
        .context("child process has no piped stdout")?;
    let ready_text: Vec<u8> = ready
        .map(|(t, _)| t.as_bytes().to_vec())
        .unwrap_or_default();
    let seen = Arc::new(AtomicBool::new(ready.is_none()));
    let seen_writer = Arc::clone(&seen);
    let reader = std::thread::spawn(move || -> Vec<u8> {
        let mut captured = Vec::new();
        let mut buf = [0u8; 8192];
        let out = std::io::stdout();
        let marker = STORY_MARKER.get().copied();
        // With a quiet console: where the line being received starts in `captured`.
        let mut line_start = 0;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let from = captured.len().saturating_sub(ready_text.len());
                    captured.extend_from_slice(&buf[..n]);
                    if !seen_writer.load(AtomicOrdering::Relaxed)
                        && captured[from..]
                            .windows(ready_text.len().max(1))
                            .any(|w| w == ready_text.as_slice())
                    {
                        seen_writer.store(true, AtomicOrdering::Relaxed);
                    }
                    let mut lock = out.lock();
                    // Best effort: a closed stdout must not abort the run.
                    match marker {
                        None => {
                            let _ = lock.write_all(&buf[..n]);
                        }
                        Some(marker) => {
                            while let Some(nl) =
                                captured[line_start..].iter().position(|&b| b == b'\n')
                            {
                                let line = &captured[line_start..line_start + nl];
                                if let Some(text) = story_line(line, marker) {
                                    let text: Vec<u8> =
                                        text.iter().copied().filter(|&b| b != b'\r').collect();
                                    let _ = lock.write_all(&text);
                                    let _ = lock.write_all(b"\n");
                                }
                                line_start += nl + 1;
                            }
                        }
                    }
                    let _ = lock.flush();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        captured
    });
    let start = Instant::now();
    let mut not_ready = false;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for child process")? {
            break Some(st);
        }
        let elapsed = start.elapsed();
        let ready_late =
            ready.is_some_and(|(_, limit)| elapsed > limit && !seen.load(AtomicOrdering::Relaxed));
        if elapsed > timeout || ready_late {
            not_ready = ready_late;
            eprintln!(
                "\nxtask: {} after {} s, killing pid {}",
                if ready_late {
                    "no sign of life"
                } else {
                    "timeout"
                },
                elapsed.as_secs(),
                child.id()
            );
            // The process may have exited in the meantime; ignore that race.
            let _ = child.kill();
            child.wait().context("reaping killed child")?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let captured = reader
        .join()
        .map_err(|_| anyhow::anyhow!("output reader thread panicked"))?;
    let output = String::from_utf8_lossy(&captured).replace('\r', "");
    Ok(Streamed {
        status,
        not_ready,
        output,
    })
}

/// Whether the environment variable `var` is set to something other than
/// empty or `0`.
pub fn env_flag(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Parses a duration in seconds from the environment variable `var`.
pub fn env_secs(var: &str, default: u64) -> Result<Duration> {
    match std::env::var(var) {
        Ok(v) => {
            let secs: u64 = v
                .trim()
                .parse()
                .with_context(|| format!("{var}={v:?} is not a number of seconds"))?;
            Ok(Duration::from_secs(secs))
        }
        Err(_) => Ok(Duration::from_secs(default)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("abc"), "abc");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn versions() {
        assert_eq!(version_cmp("6.12.3", "6.9.1"), Ordering::Greater);
        assert_eq!(
            version_cmp("7.2.13+deb14-cloud-amd64", "7.2.9+deb14-cloud-amd64"),
            Ordering::Greater
        );
        assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
        assert_eq!(version_cmp("6.1", "6.1"), Ordering::Equal);
    }
}
