//! The `nix` command lines the worker runs, and running them safely.
//!
//! Every call goes through `std::process::Command` (never a shell) with
//! arguments that are validated [`StorePath`]s or the daemon's own settings.
//! Each call runs in its own process group, which is killed when the call
//! ends: whatever it left behind (an uploader's helper) or, on timeout,
//! everything it started. A call is judged by its exit status; its output is
//! read into bounded buffers for at most [`OUTPUT_AFTER_EXIT`] after it
//! exited, since a process that left the group may hold the streams open.

use std::fmt;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::store_path::StorePath;
use crate::sys;

/// Most bytes of paths put on one command line, well below Linux's limit.
pub const MAX_ARG_BYTES: usize = 512 * 1024;
/// Longest a check that a target answers may take.
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);
/// Fewest paths worth a `nix copy` call of their own: starting one costs
/// more than copying a few small paths.
pub const MIN_PATHS_PER_COPY: usize = 32;
/// Bytes of the end of a call's stderr that are kept (nix says what went
/// wrong last); stdout of a query is kept up to [`STDOUT_MAX`].
const STDERR_KEPT: usize = 64 * 1024;
/// A query prints at most a few times the paths it was given.
const STDOUT_MAX: usize = 4 * MAX_ARG_BYTES;
/// How long a call's output is still read after it exited or was killed.
pub const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How often a reading thread looks whether its call has ended.
const READ_POLL: Duration = Duration::from_millis(250);
/// Nice steps every nix call runs below the daemon: builds come first.
const UPLOAD_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority by [`UPLOAD_NICE`] steps, and
/// with it that of every call it starts from now on; for each thread that
/// runs nix.
pub fn lower_priority() -> std::io::Result<()> {
    sys::lower_thread_priority(UPLOAD_NICE)
}

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
    /// It exited well, but what it printed cannot be used.
    Output(String),
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
        let what = self.what;
        match &self.kind {
            FailureKind::Spawn(e) => write!(f, "{what} could not be started: {e}")?,
            FailureKind::Exit(s) => write!(f, "{what} failed ({s})")?,
            FailureKind::Output(s) => write!(f, "{what} {s}")?,
            FailureKind::TimedOut(d) => {
                let secs = d.as_secs_f64();
                write!(f, "{what} ran longer than {secs} s and was killed")?
            }
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
    /// `--substitute-on-destination` for an ssh target.
    substitute_on_destination: bool,
}

fn is_ssh(url: Option<&str>) -> bool {
    url.is_some_and(|u| u.starts_with("ssh://") || u.starts_with("ssh-ng://"))
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
        let ssh_opts = (is_ssh(upload_to) && std::env::var_os("NIX_SSHOPTS").is_none())
            .then(|| "-o ConnectTimeout=10".to_string());
        Nix {
            nix: nix.to_path_buf(),
            nix_store,
            timeout,
            ssh_opts,
            running: Arc::new(AtomicU32::new(0)),
            copy_jobs: 1,
            substitute_on_destination: false,
        }
    }

    /// The `nix` for calls to `upload_to` (or for signing and queries, with
    /// `None`), with every setting of `config` that concerns it.
    pub fn from_config(config: &crate::config::Config, upload_to: Option<&str>) -> Nix {
        let mut nix = Nix::new(&config.nix, config.command_timeout, upload_to);
        nix.copy_jobs = config.upload_jobs.max(1);
        nix.substitute_on_destination = config.substitute_on_destination && is_ssh(upload_to);
        nix
    }

    /// Uses `running` to publish the process group of the call in progress,
    /// so that a stopping daemon can kill it.
    pub fn with_running(mut self, running: Arc<AtomicU32>) -> Nix {
        self.running = running;
        self
    }

    /// The longest a call may run (`command-timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
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
        self.run("nix-store --query --outputs", cmd)
    }

    /// Which of the paths are not valid in the local store (garbage-collected).
    pub fn invalid_paths(&self, paths: &[StorePath]) -> Result<Vec<String>, Failure> {
        let mut cmd = Command::new(&self.nix_store);
        cmd.args(["--check-validity", "--print-invalid"])
            .args(paths);
        self.run("nix-store --check-validity", cmd)
    }

    /// Signs the paths (and their closure when `recursive`) with the key file.
    pub fn sign(&self, key: &Path, recursive: bool, paths: &[StorePath]) -> Result<(), Failure> {
        let mut cmd = self.nix_command(&["store", "sign", "--key-file"]);
        cmd.arg(key)
            .args(recursive.then_some("--recursive"))
            .args(paths);
        self.run_together("nix store sign", vec![cmd], false)
            .map(drop)
    }

    /// Copies the paths and their closure to the store at `url`, in up to
    /// `upload-jobs` `nix copy` calls at once of at least
    /// [`MIN_PATHS_PER_COPY`] paths each. Fails when any call fails; what
    /// another call copied is skipped cheaply when the batch is tried again.
    pub fn copy(&self, url: &str, paths: &[StorePath]) -> Result<(), Failure> {
        let calls = (paths.len() / MIN_PATHS_PER_COPY).clamp(1, self.copy_jobs);
        let share = paths.len().div_ceil(calls).max(1);
        let on_destination = self.substitute_on_destination;
        let cmds = paths.chunks(share).map(|chunk| {
            let mut cmd = self.nix_command(&["copy", "--to", url]);
            cmd.args(on_destination.then_some("--substitute-on-destination"));
            cmd.args(chunk);
            cmd
        });
        self.run_together("nix copy", cmds.collect(), false)
            .map(drop)
    }

    /// Runs an uploader (`upload-command`) with the paths appended to its
    /// arguments.
    pub fn run_uploader(&self, argv: &[String], paths: &[StorePath]) -> Result<(), Failure> {
        let mut cmd = Command::new(argv.first().map_or("", String::as_str));
        cmd.args(argv.iter().skip(1)).args(paths);
        self.run_together("upload-command", vec![cmd], false)
            .map(drop)
    }

    /// Checks that nix can open the store at `url`, within `timeout`: with
    /// `nix store info`, or `nix store ping` on a Nix older than 2.19,
    /// which has no `info` (newer ones warn that `ping` is deprecated).
    pub fn ping(&self, url: &str, timeout: Duration) -> Result<(), Failure> {
        static HAS_INFO: OnceLock<bool> = OnceLock::new();
        let has_info = *HAS_INFO.get_or_init(|| {
            let mut cmd = Command::new(&self.nix);
            cmd.arg("--version");
            let version = self.run("nix --version", cmd);
            version.is_ok_and(|v| v.first().is_some_and(|v| at_least_2_19(v)))
        });
        let (what, sub) = match has_info {
            true => ("nix store info", "info"),
            false => ("nix store ping", "ping"),
        };
        let nix = Nix {
            timeout,
            ..self.clone()
        };
        let cmd = nix.nix_command(&["store", sub, "--store", url]);
        nix.run_together(what, vec![cmd], false).map(drop)
    }

    /// Runs `cmd` and returns the lines of its stdout.
    fn run(&self, what: &'static str, cmd: Command) -> Result<Vec<String>, Failure> {
        let out = self.run_together(what, vec![cmd], true)?.pop();
        let out = String::from_utf8_lossy(&out.unwrap_or_default()).into_owned();
        let lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
        Ok(lines.map(String::from).collect())
    }

    /// Runs the commands at once in one new process group, published in
    /// `running`, killed as a whole when they outlast the timeout, and
    /// swept of what they left once they exited. Returns each one's stdout
    /// (empty unless `keep_stdout`), or the first failure in command order.
    fn run_together(
        &self,
        what: &'static str,
        cmds: Vec<Command>,
        keep_stdout: bool,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let _running = ClearOnDrop(&self.running);
        let (exited_tx, exited) = mpsc::channel();
        let (ended_tx, ended) = mpsc::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let (mut calls, mut children, mut pgid, mut spawn_error) = (vec![], vec![], 0, None);
        for mut cmd in cmds {
            let (out, err) = (
                Capture::new(STDOUT_MAX, false),
                Capture::new(STDERR_KEPT, true),
            );
            let mut readers = Vec::new();
            let mut stream = |capture: &Arc<Mutex<Capture>>| -> std::io::Result<Stdio> {
                let (ours, theirs) = UnixStream::pair()?;
                ours.set_read_timeout(Some(READ_POLL))?;
                let (capture, stop, ended) = (capture.clone(), stop.clone(), ended_tx.clone());
                readers.push(move || read_into(ours, &capture, &stop, &ended));
                Ok(OwnedFd::from(theirs).into())
            };
            let spawned = stream(&err).and_then(|stderr| {
                let stdout = if keep_stdout {
                    stream(&out)?
                } else {
                    Stdio::null()
                };
                cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
                cmd.process_group(i32::try_from(pgid).unwrap_or(0));
                sys::unblock_signals_in_child(&mut cmd);
                cmd.spawn()
            });
            drop(cmd); // closes our copies of the child's ends of the streams
            match spawned {
                Ok(child) => {
                    if pgid == 0 {
                        pgid = child.id();
                        self.running.store(pgid, Ordering::SeqCst);
                    }
                    children.push(child);
                    readers
                        .into_iter()
                        .for_each(|r| drop(std::thread::spawn(r)));
                    calls.push((out, err));
                }
                Err(e) => {
                    spawn_error = Some(e.to_string());
                    break;
                }
            }
        }
        // Waited for only once all started: the group lives while its first
        // process is not reaped, so that the others can join it.
        for (i, mut child) in children.into_iter().enumerate() {
            let tx = exited_tx.clone();
            std::thread::spawn(move || tx.send((i, child.wait())));
        }
        drop((exited_tx, ended_tx));
        let deadline = Instant::now() + self.timeout;
        let mut statuses: Vec<Option<std::io::Result<ExitStatus>>> = Vec::new();
        statuses.resize_with(calls.len(), || None);
        let mut timed_out = false;
        while spawn_error.is_none() && !timed_out && statuses.iter().any(Option::is_none) {
            match exited.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((i, status)) => statuses[i] = Some(status),
                Err(_) => timed_out = true,
            }
        }
        if pgid != 0 {
            let _ = sys::kill_process_group(pgid, sys::SIGKILL);
        }
        // What they wrote before they exited is in the streams: read it, up
        // to a deadline, as a process that left the group may hold them.
        let output_deadline = Instant::now() + OUTPUT_AFTER_EXIT;
        let left = || output_deadline.saturating_duration_since(Instant::now());
        while ended.recv_timeout(left()).is_ok() {}
        stop.store(true, Ordering::SeqCst);
        let fail = |kind, err: Option<&Capture>| Failure {
            what,
            kind,
            stderr: err.map_or_else(String::new, |e| tail(e.kept())),
        };
        if let Some(e) = spawn_error {
            return Err(fail(FailureKind::Spawn(e), None));
        }
        let calls: Vec<(Capture, Capture)> =
            calls.iter().map(|(o, e)| (take(o), take(e))).collect();
        if timed_out {
            // The stderr of a call that was still running tells most.
            let running = statuses.iter().position(Option::is_none).unwrap_or(0);
            let err = calls.get(running).map(|(_, e)| e);
            return Err(fail(FailureKind::TimedOut(self.timeout), err));
        }
        let mut outputs = Vec::new();
        for (status, (out, err)) in statuses.into_iter().zip(calls) {
            let why = match status {
                Some(Ok(s)) if !s.success() => FailureKind::Exit(describe(s)),
                Some(Ok(_)) if !keep_stdout => {
                    outputs.push(Vec::new());
                    continue;
                }
                Some(Ok(_)) if out.read > STDOUT_MAX as u64 => FailureKind::Output(format!(
                    "printed more than {STDOUT_MAX} bytes on its standard output"
                )),
                Some(Ok(_)) if !out.ended => FailureKind::Output(format!(
                    "exited, but its standard output was still open {} s later \
                     (held by a process it started?)",
                    OUTPUT_AFTER_EXIT.as_secs()
                )),
                Some(Ok(_)) => {
                    outputs.push(out.data);
                    continue;
                }
                Some(Err(e)) => FailureKind::Spawn(e.to_string()),
                None => FailureKind::Spawn("no result".into()),
            };
            return Err(fail(why, Some(&err)));
        }
        Ok(outputs)
    }
}

/// True when `nix --version` (`nix (Nix) 2.8.0`) names 2.19 or newer.
fn at_least_2_19(version: &str) -> bool {
    let number = version.split_whitespace().last().unwrap_or("");
    let mut parts = number.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (2, 19)
}

/// What was read of one stream: its first bytes up to `max`, or (a `tail`)
/// its last ones, dropping the front once per `max` bytes read.
#[derive(Debug, Default)]
struct Capture {
    data: Vec<u8>,
    /// Bytes read in all.
    read: u64,
    /// Every writer closed the stream.
    ended: bool,
    max: usize,
    tail: bool,
}

impl Capture {
    fn new(max: usize, tail: bool) -> Arc<Mutex<Capture>> {
        Arc::new(Mutex::new(Capture {
            max,
            tail,
            ..Capture::default()
        }))
    }

    fn push(&mut self, bytes: &[u8]) {
        self.read += bytes.len() as u64;
        let room = if self.tail {
            bytes.len()
        } else {
            self.max.saturating_sub(self.data.len())
        };
        self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if self.data.len() > 2 * self.max {
            self.data.drain(..self.data.len() - self.max);
        }
    }

    /// The bytes kept: for a tail, the last `max` only.
    fn kept(&self) -> &[u8] {
        let start = if self.tail {
            self.data.len().saturating_sub(self.max)
        } else {
            0
        };
        &self.data[start..]
    }
}

/// What was read so far.
fn take(capture: &Mutex<Capture>) -> Capture {
    let mut c = capture.lock().unwrap_or_else(|e| e.into_inner());
    let (max, tail) = (c.max, c.tail);
    std::mem::replace(
        &mut *c,
        Capture {
            max,
            tail,
            ..Capture::default()
        },
    )
}

/// Reads `from` into `into` until it ends or fails, or until `stop` is set
/// (looked at whenever a read times out); then says so on `ended`.
fn read_into(
    mut from: impl Read,
    into: &Mutex<Capture>,
    stop: &AtomicBool,
    ended: &mpsc::Sender<()>,
) {
    let mut buf = [0u8; 16 * 1024];
    let lock = || into.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match from.read(&mut buf) {
            Ok(0) => break lock().ended = true,
            Ok(n) => lock().push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) && !stop.load(Ordering::SeqCst) => {}
            Err(_) => break,
        }
    }
    let _ = ended.send(());
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Resets the published process group when a call ends, however it ends.
struct ClearOnDrop<'a>(&'a AtomicU32);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The last part of a command's stderr on one line, with terminal colour
/// sequences (`ESC [ ... letter`) removed and every other control
/// character made a space: nix's words end up in the log and in `status`,
/// where they must not move a terminal's cursor or hide what follows.
fn tail(stderr: &[u8]) -> String {
    const MAX: usize = 2000;
    let text = String::from_utf8_lossy(stderr);
    let mut clean = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, up to the final byte.
            chars.find(|c| ('\u{40}'..='\u{7e}').contains(c));
        } else {
            clean.push(if c.is_control() && c != '\n' { ' ' } else { c });
        }
    }
    let lines: Vec<&str> = clean
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines.join(" | ");
    let mut start = joined.len().saturating_sub(MAX);
    while !joined.is_char_boundary(start) {
        start += 1;
    }
    match start {
        0 => joined,
        _ => format!("...{}", &joined[start..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        cmd
    }

    fn nix(timeout: Duration) -> Nix {
        Nix::new(Path::new("nix"), timeout, None)
    }

    /// Processes whose command line is `sleep <marker>`.
    fn sleeps(marker: &str) -> Vec<u32> {
        let want = format!("sleep\0{marker}\0");
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want.as_bytes()))
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// A `sleep` argument no other test uses.
    fn marker(n: u32) -> String {
        format!("{}.{n}", 3000 + std::process::id() % 1000)
    }

    #[test]
    fn nix_store_is_found_beside_nix() {
        let n = Nix::new(Path::new("/opt/nix/bin/nix"), Duration::from_secs(1), None);
        assert_eq!(n.nix_store, PathBuf::from("/opt/nix/bin/nix-store"));
        assert_eq!(
            nix(Duration::from_secs(1)).nix_store,
            PathBuf::from("nix-store")
        );
    }

    #[test]
    fn store_info_is_used_from_nix_2_19() {
        assert!(!at_least_2_19("nix (Nix) 2.8.0"));
        assert!(!at_least_2_19("nix (Nix) 2.18.9"));
        assert!(at_least_2_19("nix (Nix) 2.19.0"));
        assert!(at_least_2_19("nix (Nix) 2.26.3"));
        assert!(at_least_2_19("nix (Nix) 3.0"));
        assert!(!at_least_2_19(""));
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let m = marker(1);
        let n = nix(Duration::from_millis(300));
        // The background sleep holds stderr open; only a group kill ends it.
        let err = n
            .run("sh", sh(&format!("sleep {m} & sleep {m}")))
            .unwrap_err();
        assert!(err.timed_out(), "{err}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(sleeps(&m), Vec::<u32>::new(), "every process is killed");
    }

    #[test]
    fn what_a_call_leaves_in_its_group_is_ended_when_it_ends() {
        let m = marker(2);
        let n = nix(Duration::from_secs(20));
        let started = Instant::now();
        let ok = n.run_together("sh", vec![sh(&format!("sleep {m} & exit 0"))], false);
        let failed = n.run("sh", sh(&format!("sleep {m} & echo why >&2; exit 2")));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(sleeps(&m), Vec::<u32>::new(), "the leftovers are killed");
        assert_eq!(ok, Ok(vec![Vec::new()]));
        assert_eq!(
            failed.unwrap_err().to_string(),
            "sh failed (exit status 2): why"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not judged by the timeout"
        );
    }

    #[test]
    fn commands_run_together_share_one_group_and_one_timeout() {
        let n = nix(Duration::from_secs(10));
        let group = "cut -d' ' -f5 /proc/$$/stat";
        let out = n
            .run_together("sh", vec![sh(group), sh(group)], true)
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], out[1], "one process group");
        let err = n
            .run_together("sh", vec![sh("exit 0"), sh("echo bad >&2; exit 4")], true)
            .unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 4): bad");

        let m = marker(3);
        let n = nix(Duration::from_millis(300));
        let hang = || sh(&format!("sleep {m} & sleep {m}"));
        let err = n
            .run_together("sh", vec![hang(), hang()], true)
            .unwrap_err();
        assert!(err.timed_out(), "{err}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            sleeps(&m),
            Vec::<u32>::new(),
            "every process of both is killed"
        );
    }

    #[test]
    fn a_call_is_judged_by_its_exit_while_a_helper_outside_its_group_holds_its_streams() {
        // Far shorter than the helper's sleep: a call judged by its streams
        // would run into this timeout and be reported as killed.
        let n = nix(Duration::from_secs(20));
        let m = marker(4);
        // The helper leaves the group, as an ssh ControlPersist master does.
        let pgrp = |pid: &str| format!("$(cut -d' ' -f5 /proc/{pid}/stat)");
        let (child, me) = (pgrp("$!"), pgrp("$$"));
        let helper = format!("setsid sleep {m} & while [ {child} = {me} ]; do :; done;");
        let out = n.run("sh", sh(&format!("{helper} echo printed; exit 0")));
        let failed = n.run("sh", sh(&format!("{helper} echo the cause >&2; exit 3")));
        let signed = n.run_together("sh", vec![sh(&format!("{helper} exit 0"))], false);
        for pid in sleeps(&m) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        assert_eq!(
            failed.unwrap_err().to_string(),
            "sh failed (exit status 3): the cause"
        );
        assert_eq!(signed, Ok(vec![Vec::new()]));
        // A query's stdout must be complete: held open, it is not used.
        let err = out.unwrap_err();
        assert!(matches!(err.kind, FailureKind::Output(_)), "{err}");
    }

    #[test]
    fn a_reading_thread_ends_when_told_while_its_stream_is_held_open() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(READ_POLL)).unwrap();
        let (tx, rx) = mpsc::channel();
        let capture = Capture::new(10, true);
        let into = capture.clone();
        std::thread::spawn(move || read_into(ours, &into, &AtomicBool::new(true), &tx));
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(()));
        assert!(!take(&capture).ended);
        drop(theirs);
    }

    #[test]
    fn only_the_end_of_a_flood_of_stderr_is_kept() {
        let (tx, _rx) = mpsc::channel();
        let stop = AtomicBool::new(false);
        let capture = Capture::new(STDERR_KEPT, true);
        let flood = 200 * 1024 * 1024;
        let text = std::io::repeat(b'x')
            .take(flood)
            .chain(&b"\nerror: the cause\n"[..]);
        read_into(text, &capture, &stop, &tx);
        let c = take(&capture);
        assert!(c.ended);
        assert_eq!(c.read, flood + 18);
        assert!(
            c.data.capacity() <= 4 * STDERR_KEPT,
            "{} bytes held",
            c.data.capacity()
        );
        assert_eq!(c.kept().len(), STDERR_KEPT);
        assert!(tail(c.kept()).ends_with("| error: the cause"));

        let capture = Capture::new(10, false);
        read_into(std::io::repeat(b'y').take(1 << 20), &capture, &stop, &tx);
        let c = take(&capture);
        assert_eq!((c.data.len(), c.read), (10, 1 << 20));
    }

    #[test]
    fn a_flood_on_stderr_fails_with_its_end_and_a_flood_on_stdout_is_refused() {
        let n = nix(Duration::from_secs(60));
        let flood = "head -c 30000000 /dev/zero | tr '\\0' x >&2; echo >&2";
        let err = n
            .run("sh", sh(&format!("{flood}; echo the cause >&2; exit 1")))
            .unwrap_err();
        assert!(
            err.to_string().ends_with("| the cause"),
            "{}",
            &err.stderr[..80]
        );
        let err = n
            .run("sh", sh(&format!("head -c {} /dev/zero", STDOUT_MAX + 1)))
            .unwrap_err();
        assert!(matches!(err.kind, FailureKind::Output(_)), "{err}");
    }

    #[test]
    fn control_characters_of_nix_output_are_not_passed_on() {
        let shown = tail(b"\x1b[31;1merror:\x1b[0m bad\r\0path\x07\nnext\tline\x1b]0;x");
        assert_eq!(shown, "error: bad  path | next line ]0;x");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
    }

    #[test]
    fn failures_carry_status_and_stderr() {
        let n = nix(Duration::from_secs(10));
        let err = n
            .run("sh", sh("echo one >&2; echo two >&2; exit 3"))
            .unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 3): one | two");
        let err = n.run("x", Command::new("/nonexistent/nix")).unwrap_err();
        assert!(matches!(err.kind, FailureKind::Spawn(_)));
    }
}
