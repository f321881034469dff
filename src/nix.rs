//! The `nix` command lines the worker runs, and running them safely.
//!
//! Every call goes through `std::process::Command` (never a shell) with
//! arguments that are validated [`StorePath`]s or the daemon's own settings.
//! Each call runs in its own process group and is killed, with everything it
//! started (ssh, for instance), when it exceeds `command-timeout`.

use std::fmt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::store_path::StorePath;
use crate::sys;

/// Most bytes of paths put on one command line, well below Linux's limit.
pub const MAX_ARG_BYTES: usize = 512 * 1024;
/// Default ssh connect timeout when the user did not set `NIX_SSHOPTS`.
pub const SSH_CONNECT_TIMEOUT_SECS: u32 = 10;
/// glibc setting for `nix copy` when the user set no `GLIBC_TUNABLES`.
///
/// Nix (2.8 at least) makes a new xz encoder for every NAR it compresses,
/// whose 16 MiB hash table glibc's heap hands back used and `calloc` must
/// zero: about 1 ms per path, most of a small path's upload. Above 1 MiB,
/// this makes malloc take fresh pages from the kernel instead, which are
/// zero already and cost only where touched. The cache files are the same
/// byte for byte; `nix copy` spends about a third less CPU per small path.
pub const COPY_GLIBC_TUNABLES: &str = "glibc.malloc.mmap_threshold=1048576";

/// How a nix call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The command, e.g. `nix copy`.
    pub what: &'static str,
    /// How it failed.
    pub kind: FailureKind,
    /// The end of its stderr, folded onto one line.
    pub stderr: String,
}

/// The ways a nix call can fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// The program could not be started.
    Spawn(String),
    /// It exited unsuccessfully.
    Exit(String),
    /// It ran longer than the timeout and was killed.
    TimedOut(Duration),
}

impl Failure {
    /// True when the call was killed for running too long: a problem of the
    /// target or the network, not of particular paths.
    pub fn timed_out(&self) -> bool {
        matches!(self.kind, FailureKind::TimedOut(_))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FailureKind::Spawn(e) => write!(f, "{} could not be started: {e}", self.what)?,
            FailureKind::Exit(s) => write!(f, "{} failed ({s})", self.what)?,
            FailureKind::TimedOut(d) => write!(
                f,
                "{} ran longer than {} s and was killed",
                self.what,
                d.as_secs_f64()
            )?,
        }
        if !self.stderr.is_empty() {
            write!(f, ": {}", self.stderr)?;
        }
        Ok(())
    }
}

/// The nix programs and how to run them.
#[derive(Debug, Clone)]
pub struct Nix {
    nix: PathBuf,
    nix_store: PathBuf,
    timeout: Duration,
    ssh_opts: Option<String>,
    running: Arc<AtomicU32>,
}

impl Nix {
    /// `nix` is the configured program; `nix-store` is taken from the same
    /// directory when `nix` is a path, else from `PATH`. For ssh targets a
    /// connect timeout is added unless the user set `NIX_SSHOPTS`.
    pub fn new(nix: &Path, timeout: Duration, upload_to: Option<&str>) -> Nix {
        let nix_store = match nix.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("nix-store"),
            _ => PathBuf::from("nix-store"),
        };
        let is_ssh =
            upload_to.is_some_and(|u| u.starts_with("ssh://") || u.starts_with("ssh-ng://"));
        let ssh_opts = (is_ssh && std::env::var_os("NIX_SSHOPTS").is_none())
            .then(|| format!("-o ConnectTimeout={SSH_CONNECT_TIMEOUT_SECS}"));
        Nix {
            nix: nix.to_path_buf(),
            nix_store,
            timeout,
            ssh_opts,
            running: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Uses `running` to publish the process group of the call in progress,
    /// so that a stopping daemon can kill it.
    pub fn with_running(mut self, running: Arc<AtomicU32>) -> Nix {
        self.running = running;
        self
    }

    fn nix_command(&self, subcommand: &[&str]) -> Command {
        let mut cmd = Command::new(&self.nix);
        cmd.args(["--extra-experimental-features", "nix-command"]);
        cmd.args(subcommand);
        if let Some(opts) = &self.ssh_opts {
            cmd.env("NIX_SSHOPTS", opts);
        }
        cmd
    }

    /// The output paths of derivations (`nix-store --query --outputs`).
    pub fn query_outputs(&self, drvs: &[StorePath]) -> Result<Vec<String>, Failure> {
        let mut cmd = Command::new(&self.nix_store);
        cmd.args(["--query", "--outputs"]).args(drvs);
        let out = self.run("nix-store --query --outputs", cmd)?;
        Ok(lines(&out))
    }

    /// Which of the paths are not valid in the local store (garbage-collected).
    pub fn invalid_paths(&self, paths: &[StorePath]) -> Result<Vec<String>, Failure> {
        let mut cmd = Command::new(&self.nix_store);
        cmd.args(["--check-validity", "--print-invalid"])
            .args(paths);
        let out = self.run("nix-store --check-validity", cmd)?;
        Ok(lines(&out))
    }

    /// Signs the paths (and their closure when `recursive`) with the key file.
    pub fn sign(
        &self,
        key_file: &Path,
        recursive: bool,
        paths: &[StorePath],
    ) -> Result<(), Failure> {
        let mut cmd = self.nix_command(&["store", "sign", "--key-file"]);
        cmd.arg(key_file);
        if recursive {
            cmd.arg("--recursive");
        }
        cmd.args(paths);
        self.run("nix store sign", cmd).map(drop)
    }

    /// Copies the paths and their closure to the store at `url`.
    pub fn copy(&self, url: &str, paths: &[StorePath]) -> Result<(), Failure> {
        let mut cmd = self.nix_command(&["copy", "--to", url]);
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            cmd.env("GLIBC_TUNABLES", COPY_GLIBC_TUNABLES);
        }
        cmd.args(paths);
        self.run("nix copy", cmd).map(drop)
    }

    /// Runs `cmd` in its own process group, killing the group on timeout.
    fn run(&self, what: &'static str, mut cmd: Command) -> Result<Vec<u8>, Failure> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let fail = |kind: FailureKind, stderr: &[u8]| Failure {
            what,
            kind,
            stderr: tail(stderr),
        };
        let child = cmd
            .spawn()
            .map_err(|e| fail(FailureKind::Spawn(e.to_string()), b""))?;
        let pid = child.id();
        self.running.store(pid, Ordering::SeqCst);
        let _running = ClearOnDrop(&self.running);
        let (tx, rx) = mpsc::channel::<std::io::Result<Output>>();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let output = match rx.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(_) => {
                let _ = sys::kill_process_group(pid, sys::SIGKILL);
                // The group is dead; the waiting thread returns as soon as the
                // pipes close. Give up on it if something escaped the group.
                let stderr = match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(Ok(out)) => out.stderr,
                    _ => Vec::new(),
                };
                return Err(fail(FailureKind::TimedOut(self.timeout), &stderr));
            }
        };
        let output = output.map_err(|e| fail(FailureKind::Spawn(e.to_string()), b""))?;
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(fail(
                FailureKind::Exit(describe(output.status)),
                &output.stderr,
            ))
        }
    }
}

/// Resets the published process group when a call ends, however it ends.
struct ClearOnDrop<'a>(&'a AtomicU32);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

fn lines(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The last part of a command's stderr, on one line.
fn tail(stderr: &[u8]) -> String {
    const MAX: usize = 2000;
    let text = String::from_utf8_lossy(stderr);
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if joined.len() <= MAX {
        return joined;
    }
    let mut start = joined.len() - MAX;
    while !joined.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &joined[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_store_is_found_beside_nix() {
        let n = Nix::new(Path::new("/opt/nix/bin/nix"), Duration::from_secs(1), None);
        assert_eq!(n.nix_store, PathBuf::from("/opt/nix/bin/nix-store"));
        let n = Nix::new(Path::new("nix"), Duration::from_secs(1), None);
        assert_eq!(n.nix_store, PathBuf::from("nix-store"));
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let n = Nix::new(Path::new("nix"), Duration::from_millis(200), None);
        let mut cmd = Command::new("/bin/sh");
        // The grandchild holds stdout open; only a group kill ends it.
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let err = n.run("sh", cmd).unwrap_err();
        assert!(err.timed_out(), "{err}");
    }

    #[test]
    fn failures_carry_status_and_stderr() {
        let n = Nix::new(Path::new("nix"), Duration::from_secs(10), None);
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo one >&2; echo two >&2; exit 3"]);
        let err = n.run("sh", cmd).unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 3): one | two");
        let err = n.run("x", Command::new("/nonexistent/nix")).unwrap_err();
        assert!(matches!(err.kind, FailureKind::Spawn(_)));
    }
}
