//! The `nix` calls the worker makes (no shell), each in a process group killed
//! on timeout and swept at its end; bounded output read until [`OUTPUT_AFTER_EXIT`].

use std::fmt;
use std::io::ErrorKind::{Interrupted, WouldBlock};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::store_path::StorePath;
use crate::sys;

/// Most bytes of paths put on one command line, well below Linux's limit.
pub const MAX_ARG_BYTES: usize = 512 * 1024;
/// Longest a check that a target answers may take.
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);
/// Fewest paths worth a `nix copy` call of their own.
const MIN_PATHS_PER_COPY: usize = 32;
/// How long a call's output is still read after it exited or was killed.
pub const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(2);
/// Bytes kept of the end of a call's stderr, where nix says what went wrong.
const STDERR_KEPT: usize = 64 * 1024;
/// Most bytes of a query's stdout: a few times the paths it was given.
const STDOUT_MAX: usize = 4 * MAX_ARG_BYTES;
/// How often a thread reading a call's output looks at its deadline.
const READ_POLL: Duration = Duration::from_millis(250);
const STDOUT: usize = 0;
const STDERR: usize = 1;

/// Lowers the calling thread's priority, and its calls': builds come first.
pub fn lower_priority() -> std::io::Result<()> {
    sys::lower_thread_priority(10)
}

/// How a nix call failed: the command (`nix copy`), how, and its stderr's end.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Failure {
    pub what: &'static str,
    pub kind: FailureKind,
    pub stderr: String,
}

/// Not started, exited unsuccessfully (or unusably), or killed on timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum FailureKind {
    Spawn(String),
    Exit(String),
    TimedOut(Duration),
}

impl Failure {
    /// True when the call was killed for running too long (not a path's fault).
    pub fn timed_out(&self) -> bool {
        matches!(self.kind, FailureKind::TimedOut(_))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match &self.kind {
            FailureKind::Spawn(e) => format!("could not be started: {e}"),
            FailureKind::Exit(how) => how.clone(),
            FailureKind::TimedOut(d) => {
                format!("ran longer than {} s and was killed", d.as_secs_f64())
            }
        };
        let sep = if self.stderr.is_empty() { "" } else { ": " };
        write!(f, "{} {how}{sep}{}", self.what, self.stderr)
    }
}

/// The nix programs and how to run them.
#[derive(Debug, Clone)]
pub struct Nix {
    nix: PathBuf,
    nix_store: PathBuf,
    timeout: Duration,
    ssh_opts: Option<&'static str>,
    running: Arc<AtomicU32>,
    copy_jobs: usize,
    substitute_on_destination: Option<&'static str>,
}

impl Nix {
    /// The `nix` for calls to `upload_to` (`None`: signing, queries); ssh gets a connect timeout.
    /// The running call's process group is published in `running`, for `stop`.
    pub fn from_config(config: &Config, upload_to: Option<&str>, running: Arc<AtomicU32>) -> Nix {
        let ssh = upload_to.is_some_and(|u| u.starts_with("ssh://") || u.starts_with("ssh-ng://"));
        let no_opts = std::env::var_os("NIX_SSHOPTS").is_none();
        let on_destination = config.substitute_on_destination && ssh;
        Nix {
            nix: config.nix.clone(),
            nix_store: config.nix.with_file_name("nix-store"),
            timeout: config.command_timeout,
            ssh_opts: (ssh && no_opts).then_some("-o ConnectTimeout=10"),
            running,
            copy_jobs: config.upload_jobs.max(1),
            substitute_on_destination: on_destination.then_some("--substitute-on-destination"),
        }
    }

    fn nix_command(&self, subcommand: &[&str]) -> Command {
        let mut cmd = Command::new(&self.nix);
        cmd.args(["--extra-experimental-features", "nix-command"])
            .args(subcommand);
        cmd.envs(self.ssh_opts.map(|opts| ("NIX_SSHOPTS", opts)));
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
        cmd.arg(key).args(recursive.then_some("--recursive"));
        cmd.args(paths);
        self.run_all("nix store sign", vec![cmd]).map(drop)
    }

    /// Copies the closure to `url`: `upload-jobs` calls of [`MIN_PATHS_PER_COPY`]+ paths.
    pub fn copy(&self, url: &str, paths: &[StorePath]) -> Result<(), Failure> {
        let calls = (paths.len() / MIN_PATHS_PER_COPY).clamp(1, self.copy_jobs);
        let size = paths.len().div_ceil(calls).max(1);
        let cmds = paths.chunks(size).map(|chunk| {
            let mut cmd = self.nix_command(&["copy", "--to", url]);
            cmd.args(self.substitute_on_destination).args(chunk);
            cmd
        });
        self.run_all("nix copy", cmds.collect()).map(drop)
    }

    /// Runs the `upload-command` with the paths appended to its arguments.
    pub fn run_uploader(&self, argv: &[String], paths: &[StorePath]) -> Result<(), Failure> {
        let mut cmd = Command::new(argv.first().map_or("", String::as_str));
        cmd.args(argv.iter().skip(1)).args(paths);
        self.run_all("upload-command", vec![cmd]).map(drop)
    }

    /// Checks that nix opens `url` within `timeout`: `nix store info` (`ping` before 2.19).
    pub fn ping(&self, url: &str, timeout: Duration) -> Result<(), Failure> {
        static HAS_INFO: OnceLock<bool> = OnceLock::new();
        let has_info = *HAS_INFO.get_or_init(|| {
            let mut cmd = Command::new(&self.nix);
            cmd.arg("--version");
            let version = self.run("nix --version", cmd);
            version.is_ok_and(|v| v.last().is_some_and(|v| at_least_2_19(v)))
        });
        let (what, sub) =
            [("nix store ping", "ping"), ("nix store info", "info")][has_info as usize];
        let mut nix = self.clone();
        nix.timeout = timeout;
        let cmd = nix.nix_command(&["store", sub, "--store", url]);
        nix.run_all(what, vec![cmd]).map(drop)
    }

    /// Runs `cmd` and returns the words of its stdout, which must be whole.
    fn run(&self, what: &'static str, cmd: Command) -> Result<Vec<String>, Failure> {
        let out = self.run_all(what, vec![cmd])?.pop().unwrap_or_default();
        let why = if !out.ended {
            let secs = OUTPUT_AFTER_EXIT.as_secs();
            format!("exited, but its standard output stayed open {secs} s more (held by a child?)")
        } else if out.read > STDOUT_MAX as u64 {
            format!("printed more than {STDOUT_MAX} bytes on its standard output")
        } else {
            let text = String::from_utf8_lossy(&out.data);
            return Ok(text.split_whitespace().map(String::from).collect());
        };
        let (kind, stderr) = (FailureKind::Exit(why), String::new());
        Err(Failure { what, kind, stderr })
    }

    /// Runs the commands in one new process group: each one's stdout, or the first failure.
    fn run_all(&self, what: &'static str, cmds: Vec<Command>) -> Result<Vec<Capture>, Failure> {
        let (exited_tx, exited) = mpsc::channel();
        let (ended_tx, ended) = mpsc::channel();
        let until = Arc::new(OnceLock::new());
        let (mut children, mut spawn_error) = (Vec::new(), None);
        for mut cmd in cmds {
            let i = children.len();
            let stream = |which: usize| -> std::io::Result<Stdio> {
                let (ours, theirs) = UnixStream::pair()?;
                ours.set_read_timeout(Some(READ_POLL))?;
                let (until, ended) = (until.clone(), ended_tx.clone());
                let read = move || ended.send((i, which, read_stream(ours, which, &until)));
                std::thread::spawn(read);
                Ok(OwnedFd::from(theirs).into())
            };
            let pgid = children.first().map_or(0, |c: &Child| c.id());
            let spawned = stream(STDERR).and_then(|stderr| {
                let stdout = stream(STDOUT)?;
                cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
                sys::unblock_signals_in_child(cmd.process_group(pgid as i32));
                cmd.spawn()
            });
            drop(cmd); // closes our copies of the child's ends of its streams
            spawn_error = spawned.map(|child| children.push(child)).err();
            if spawn_error.is_some() {
                break;
            }
        }
        let (pgid, count) = (children.first().map_or(0, Child::id), children.len());
        self.running.store(pgid, Ordering::SeqCst);
        // Waited for once all started: the group lives while its leader does.
        for (i, mut child) in children.into_iter().enumerate() {
            let tx = exited_tx.clone();
            std::thread::spawn(move || tx.send((i, child.wait())));
        }
        drop((exited_tx, ended_tx));
        let deadline = Instant::now() + self.timeout;
        let mut statuses: Vec<_> = (0..count).map(|_| None).collect();
        let exit = || exited.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let mut record = || exit().map(|(i, status)| statuses[i] = Some(status));
        let timed_out = spawn_error.is_none() && (0..count).any(|_| record().is_err());
        if pgid != 0 {
            let _ = sys::kill_process_group(pgid, sys::SIGKILL);
        }
        self.running.store(0, Ordering::SeqCst);
        // The streams (one more: an unstarted command's) until a deadline: a leaver may hold them.
        let _ = until.set(Instant::now() + OUTPUT_AFTER_EXIT);
        let mut captures: Vec<[Capture; 2]> = (0..=count).map(|_| Default::default()).collect();
        for (i, which, capture) in ended {
            captures[i][which] = capture;
        }
        let fail = |kind, err: &Capture| {
            let stderr = tail(&err.data);
            Err(Failure { what, kind, stderr })
        };
        if let Some(e) = spawn_error {
            return fail(FailureKind::Spawn(e.to_string()), &Capture::default());
        }
        if timed_out {
            // The stderr of a call that was still running tells most.
            let running = statuses.iter().position(Option::is_none).unwrap_or(0);
            let err = &captures[running][STDERR];
            return fail(FailureKind::TimedOut(self.timeout), err);
        }
        let mut outputs = Vec::new();
        for (status, [out, err]) in statuses.into_iter().zip(captures) {
            match status.unwrap_or_else(|| Err(std::io::Error::other("no result"))) {
                Ok(s) if s.success() => outputs.push(out),
                Ok(s) => {
                    let sig = format!("killed by signal {}", s.signal().unwrap_or(0));
                    let how = s.code().map_or(sig, |code| format!("exit status {code}"));
                    return fail(FailureKind::Exit(format!("failed ({how})")), &err);
                }
                Err(e) => return fail(FailureKind::Spawn(e.to_string()), &err),
            }
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

/// What was read of a stream: its tail, its length, and whether it ended.
#[derive(Debug, Default)]
struct Capture {
    data: Vec<u8>,
    read: u64,
    ended: bool,
}

/// Reads `from` until it ends or fails, or `until` passed, keeping the tail.
fn read_stream(mut from: impl Read, which: usize, until: &OnceLock<Instant>) -> Capture {
    let (mut c, mut buf) = (Capture::default(), [0u8; 16 * 1024]);
    let max = [STDOUT_MAX, STDERR_KEPT][which];
    let waiting = || until.get().is_none_or(|t| *t > Instant::now());
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break c.ended = true,
            Ok(n) => n,
            Err(e) if e.kind() == Interrupted => continue,
            Err(e) if e.kind() == WouldBlock && waiting() => continue,
            Err(_) => break,
        };
        c.read += n as u64;
        c.data.extend_from_slice(&buf[..n]);
        // The tail is kept (a longer stdout is refused), cut per `max` bytes.
        if c.data.len() > 2 * max {
            c.data.drain(..c.data.len() - max);
        }
    }
    c.data.drain(..c.data.len().saturating_sub(max));
    c
}

/// The end of a stderr on one line, without control characters or colour sequences (cursor moves).
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let (mut clean, mut chars) = (String::new(), text.chars().peekable());
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.next_if_eq(&'[').is_some() {
            // Parameters and intermediates, up to the final byte.
            chars.find(|c| ('\u{40}'..='\u{7e}').contains(c));
        } else {
            clean.push(if c.is_control() && c != '\n' { ' ' } else { c });
        }
    }
    let lines = clean.lines().map(str::trim).filter(|l| !l.is_empty());
    let joined = lines.collect::<Vec<_>>().join(" | ");
    match joined.char_indices().rev().nth(1999) {
        Some((start, _)) if start > 0 => format!("...{}", &joined[start..]),
        _ => joined,
    }
}

#[cfg(test)]
impl Nix {
    /// A `nix` with the defaults but these settings, for unit tests.
    pub fn new(nix: &Path, timeout: Duration, upload_to: Option<&str>) -> Nix {
        let mut config = Config::new();
        (config.nix, config.command_timeout, config.upload_jobs) = (nix.into(), timeout, 1);
        Nix::from_config(&config, upload_to, Arc::default())
    }
    fn call(&self, what: &'static str, cmds: Vec<Command>) -> Result<(), Failure> {
        self.run_all(what, cmds).map(drop)
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
        let ok = n.call("sh", vec![sh(&format!("sleep {m} & exit 0"))]);
        let failed = n.run("sh", sh(&format!("sleep {m} & echo why >&2; exit 2")));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(sleeps(&m), Vec::<u32>::new(), "the leftovers are killed");
        assert_eq!(ok, Ok(()));
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
    fn commands_run_all_share_one_group_and_one_timeout() {
        let n = nix(Duration::from_secs(10));
        let group = "cut -d' ' -f5 /proc/$$/stat";
        let out = n.run_all("sh", vec![sh(group), sh(group)]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].data, out[1].data, "one process group");
        let err = n
            .call("sh", vec![sh("exit 0"), sh("echo bad >&2; exit 4")])
            .unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 4): bad");

        let m = marker(3);
        let n = nix(Duration::from_millis(300));
        let hang = || sh(&format!("sleep {m} & sleep {m}"));
        let err = n.call("sh", vec![hang(), hang()]).unwrap_err();
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
        let signed = n.call("sh", vec![sh(&format!("{helper} exit 0"))]);
        for pid in sleeps(&m) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        assert_eq!(
            failed.unwrap_err().to_string(),
            "sh failed (exit status 3): the cause"
        );
        assert_eq!(signed, Ok(()));
        // A query's stdout must be complete: held open, it is not used.
        let err = out.unwrap_err();
        assert!(err.to_string().contains("standard output"), "{err}");
    }

    #[test]
    fn a_reading_thread_ends_when_told_while_its_stream_is_held_open() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(READ_POLL)).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            tx.send(read_stream(ours, STDERR, &OnceLock::from(Instant::now())))
        });
        assert!(!rx.recv_timeout(Duration::from_secs(60)).unwrap().ended);
        drop(theirs);
    }

    #[test]
    fn only_the_end_of_a_flood_of_stderr_is_kept() {
        let stop = OnceLock::new();
        let flood = 200 * 1024 * 1024;
        let text = std::io::repeat(b'x')
            .take(flood)
            .chain(&b"\nerror: the cause\n"[..]);
        let c = read_stream(text, STDERR, &stop);
        assert!(c.ended);
        assert_eq!(c.read, flood + 18);
        assert!(
            c.data.capacity() <= 4 * STDERR_KEPT,
            "{} bytes held",
            c.data.capacity()
        );
        assert_eq!(c.data.len(), STDERR_KEPT);
        assert!(tail(&c.data).ends_with("| error: the cause"));
        let c = read_stream(std::io::repeat(b'y').take(64 << 20), STDOUT, &stop);
        assert_eq!((c.data.len(), c.read), (STDOUT_MAX, 64 << 20));
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
        assert!(err.to_string().contains("standard output"), "{err}");
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
