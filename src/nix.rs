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
use std::time::{Duration, Instant};

use crate::store_path::StorePath;
use crate::sys;

/// Most bytes of paths put on one command line, well below Linux's limit.
pub const MAX_ARG_BYTES: usize = 512 * 1024;
/// Default ssh connect timeout when the user did not set `NIX_SSHOPTS`.
pub const SSH_CONNECT_TIMEOUT_SECS: u32 = 10;
/// Fewest paths worth a `nix copy` call of their own: below this, the
/// ~25 ms of CPU a call costs to start outweighs what it saves.
pub const MIN_PATHS_PER_COPY: usize = 32;
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
    copy_jobs: usize,
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
            copy_jobs: 1,
        }
    }

    /// Lets one batch's upload run as up to `jobs` `nix copy` calls at once.
    pub fn with_copy_jobs(mut self, jobs: usize) -> Nix {
        self.copy_jobs = jobs.max(1);
        self
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

    /// Copies the paths and their closure to the store at `url`: in up to
    /// `upload-jobs` `nix copy` calls at once, each with a share of at least
    /// [`MIN_PATHS_PER_COPY`] paths (compression keeps one core busy per
    /// call). Fails when any call fails; the paths another call copied are
    /// skipped cheaply when the batch is tried again.
    pub fn copy(&self, url: &str, paths: &[StorePath]) -> Result<(), Failure> {
        let calls = (paths.len() / MIN_PATHS_PER_COPY).clamp(1, self.copy_jobs);
        let share = paths.len().div_ceil(calls).max(1);
        let user_tunables = std::env::var_os("GLIBC_TUNABLES").is_some();
        let cmds = paths
            .chunks(share)
            .map(|chunk| {
                let mut cmd = self.nix_command(&["copy", "--to", url]);
                if !user_tunables {
                    cmd.env("GLIBC_TUNABLES", COPY_GLIBC_TUNABLES);
                }
                cmd.args(chunk);
                cmd
            })
            .collect();
        self.run_together("nix copy", cmds).map(drop)
    }

    /// Runs an uploader (`upload-command`) with the paths appended to its
    /// arguments: no shell, in its own process group, within the timeout.
    pub fn run_uploader(&self, argv: &[String], paths: &[StorePath]) -> Result<(), Failure> {
        let Some((program, args)) = argv.split_first() else {
            return Err(Failure {
                what: "upload-command",
                kind: FailureKind::Spawn("empty upload-command".into()),
                stderr: String::new(),
            });
        };
        let mut cmd = Command::new(program);
        cmd.args(args).args(paths);
        self.run("upload-command", cmd).map(drop)
    }

    /// Checks that nix can open the store at `url` (`nix store ping`, which
    /// Nix 2.8 and 2.26 both have), within `timeout`.
    pub fn ping(&self, url: &str, timeout: Duration) -> Result<(), Failure> {
        let mut nix = self.clone();
        nix.timeout = timeout;
        let cmd = nix.nix_command(&["store", "ping", "--store", url]);
        nix.run("nix store ping", cmd).map(drop)
    }

    /// The longest a call may run (`command-timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `cmd` in its own process group, killing the group on timeout.
    fn run(&self, what: &'static str, cmd: Command) -> Result<Vec<u8>, Failure> {
        let mut outputs = self.run_together(what, vec![cmd])?;
        Ok(outputs.pop().unwrap_or_default())
    }

    /// Runs the commands at once in one new process group, published in
    /// `running` and killed as a whole when they outlast the timeout.
    /// Returns each one's stdout, or the first failure in command order.
    fn run_together(
        &self,
        what: &'static str,
        cmds: Vec<Command>,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let fail = |kind: FailureKind, stderr: &[u8]| Failure {
            what,
            kind,
            stderr: tail(stderr),
        };
        let _running = ClearOnDrop(&self.running);
        // All are started before any is waited for: the group lives as long
        // as its first process is not reaped, so the others can join it.
        let mut children = Vec::with_capacity(cmds.len());
        let mut spawn_error = None;
        for mut cmd in cmds {
            let group = children.first().map_or(0, |c: &std::process::Child| c.id());
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(i32::try_from(group).unwrap_or(0));
            match cmd.spawn() {
                Ok(child) => {
                    if group == 0 {
                        self.running.store(child.id(), Ordering::SeqCst);
                    }
                    children.push(child);
                }
                Err(e) => {
                    spawn_error = Some(e.to_string());
                    break;
                }
            }
        }
        let pgid = children.first().map_or(0, |c| c.id());
        if spawn_error.is_some() && pgid != 0 {
            let _ = sys::kill_process_group(pgid, sys::SIGKILL);
        }
        let count = children.len();
        let (tx, rx) = mpsc::channel::<(usize, std::io::Result<Output>)>();
        for (i, child) in children.into_iter().enumerate() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send((i, child.wait_with_output()));
            });
        }
        drop(tx);
        let deadline = Instant::now() + self.timeout;
        let mut outputs: Vec<Option<std::io::Result<Output>>> = (0..count).map(|_| None).collect();
        for _ in 0..count {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((i, output)) => outputs[i] = Some(output),
                Err(_) => {
                    let _ = sys::kill_process_group(pgid, sys::SIGKILL);
                    // The group is dead; the waiting threads return as soon as
                    // the pipes close. Give up on them if something escaped
                    // the group.
                    let stderr = match rx.recv_timeout(Duration::from_secs(5)) {
                        Ok((_, Ok(out))) => out.stderr,
                        _ => Vec::new(),
                    };
                    return Err(fail(FailureKind::TimedOut(self.timeout), &stderr));
                }
            }
        }
        if let Some(e) = spawn_error {
            return Err(fail(FailureKind::Spawn(e), b""));
        }
        outputs
            .into_iter()
            .map(|output| match output {
                Some(Ok(out)) if out.status.success() => Ok(out.stdout),
                Some(Ok(out)) => Err(fail(FailureKind::Exit(describe(out.status)), &out.stderr)),
                Some(Err(e)) => Err(fail(FailureKind::Spawn(e.to_string()), b"")),
                None => Err(fail(FailureKind::Spawn("no result".into()), b"")),
            })
            .collect()
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

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn commands_run_together_share_one_group_and_one_timeout() {
        let n = Nix::new(Path::new("nix"), Duration::from_secs(10), None);
        let group = "cut -d' ' -f5 /proc/$$/stat";
        let out = n.run_together("sh", vec![sh(group), sh(group)]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], out[1], "one process group");
        let err = n
            .run_together("sh", vec![sh("exit 0"), sh("echo bad >&2; exit 4")])
            .unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 4): bad");

        let n = Nix::new(Path::new("nix"), Duration::from_millis(300), None);
        let marker = format!("{}.{}", 30 + std::process::id() % 1000, 7);
        let hang = || sh(&format!("sleep {marker} & sleep {marker}"));
        let err = n.run_together("sh", vec![hang(), hang()]).unwrap_err();
        assert!(err.timed_out(), "{err}");
        std::thread::sleep(Duration::from_millis(200));
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| c == format!("sleep\0{marker}\0").as_bytes())
            .count();
        assert_eq!(left, 0, "every process of both commands is killed");
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
