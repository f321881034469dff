//! The `nix` command lines the worker runs, and running them safely.
//!
//! Every call goes through `std::process::Command` (never a shell) with
//! arguments that are validated [`StorePath`]s or the daemon's own settings.
//! Each call runs in its own process group and is killed, with everything it
//! started (ssh, for instance), when it exceeds `command-timeout`.
//!
//! A call is judged by its exit status. Its output is read by threads of
//! its own into bounded buffers (the end of stderr, enough for the error;
//! stdout up to a limit far above what a query prints), and read for at
//! most [`OUTPUT_AFTER_EXIT`] once the call exited: a process it started may
//! keep the pipes open for minutes (an ssh `ControlPersist` master does).

use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
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
/// Bytes of the end of a call's stderr that are kept: nix prints what went
/// wrong last, and a chatty call (or one gone wrong) may print gigabytes.
pub const STDERR_KEPT: usize = 64 * 1024;
/// Most bytes of stdout read from a query: its paths, one per line, are at
/// most a few times the paths it was given ([`MAX_ARG_BYTES`]).
pub const STDOUT_MAX: usize = 4 * MAX_ARG_BYTES;
/// How long a call's output is still read after it exited (or was killed):
/// what it wrote is in the pipe already, so this is only ever used up when
/// a process it started holds the pipe open.
pub const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(2);
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
    /// It exited well, but what it printed cannot be used (too much, or not
    /// ended within [`OUTPUT_AFTER_EXIT`]).
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
        match &self.kind {
            FailureKind::Spawn(e) => write!(f, "{} could not be started: {e}", self.what)?,
            FailureKind::Exit(s) => write!(f, "{} failed ({s})", self.what)?,
            FailureKind::Output(s) => write!(f, "{} {s}", self.what)?,
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
    /// `--substitute-on-destination` for an ssh target.
    substitute_on_destination: bool,
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
            substitute_on_destination: false,
        }
    }

    /// The `nix` for calls to `upload_to` (or for signing and queries, with
    /// `None`), with every setting of `config` that concerns it.
    pub fn from_config(config: &crate::config::Config, upload_to: Option<&str>) -> Nix {
        let mut nix = Nix::new(&config.nix, config.command_timeout, upload_to)
            .with_copy_jobs(config.upload_jobs);
        nix.substitute_on_destination = config.substitute_on_destination
            && upload_to.is_some_and(|u| u.starts_with("ssh://") || u.starts_with("ssh-ng://"));
        nix
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
        self.run_together("nix store sign", vec![cmd], Stdout::Discard)
            .map(drop)
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
                if self.substitute_on_destination {
                    cmd.arg("--substitute-on-destination");
                }
                if !user_tunables {
                    cmd.env("GLIBC_TUNABLES", COPY_GLIBC_TUNABLES);
                }
                cmd.args(chunk);
                cmd
            })
            .collect();
        self.run_together("nix copy", cmds, Stdout::Discard)
            .map(drop)
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
        self.run_together("upload-command", vec![cmd], Stdout::Discard)
            .map(drop)
    }

    /// Checks that nix can open the store at `url` (`nix store ping`, which
    /// Nix 2.8 and 2.26 both have), within `timeout`.
    pub fn ping(&self, url: &str, timeout: Duration) -> Result<(), Failure> {
        let mut nix = self.clone();
        nix.timeout = timeout;
        let cmd = nix.nix_command(&["store", "ping", "--store", url]);
        nix.run_together("nix store ping", vec![cmd], Stdout::Discard)
            .map(drop)
    }

    /// The longest a call may run (`command-timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `cmd` in its own process group, killing the group on timeout;
    /// returns its stdout.
    fn run(&self, what: &'static str, cmd: Command) -> Result<Vec<u8>, Failure> {
        let mut outputs = self.run_together(what, vec![cmd], Stdout::Keep)?;
        Ok(outputs.pop().unwrap_or_default())
    }

    /// Runs the commands at once in one new process group, published in
    /// `running` and killed as a whole when they outlast the timeout.
    /// Returns each one's stdout (empty with [`Stdout::Discard`]), or the
    /// first failure in command order.
    fn run_together(
        &self,
        what: &'static str,
        cmds: Vec<Command>,
        stdout: Stdout,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let fail = |kind: FailureKind, stderr: &Capture| Failure {
            what,
            kind,
            stderr: tail(stderr.kept()),
        };
        let _running = ClearOnDrop(&self.running);
        let (exited_tx, exited) = mpsc::channel::<(usize, std::io::Result<ExitStatus>)>();
        let (ended_tx, ended) = mpsc::channel::<()>();
        let mut calls: Vec<Call> = Vec::with_capacity(cmds.len());
        let mut spawn_error = None;
        // All are started before any is waited for: the group lives as long
        // as its first process is not reaped, so the others can join it.
        let mut children = Vec::with_capacity(cmds.len());
        for mut cmd in cmds {
            let group = children.first().map_or(0, |c: &std::process::Child| c.id());
            cmd.stdin(Stdio::null())
                .stdout(match stdout {
                    Stdout::Keep => Stdio::piped(),
                    Stdout::Discard => Stdio::null(),
                })
                .stderr(Stdio::piped())
                .process_group(i32::try_from(group).unwrap_or(0));
            sys::unblock_signals_in_child(&mut cmd);
            match cmd.spawn() {
                Ok(mut child) => {
                    if group == 0 {
                        self.running.store(child.id(), Ordering::SeqCst);
                    }
                    let call = Call::default();
                    if let Some(out) = child.stdout.take() {
                        read_in_background(out, Keep::Head(STDOUT_MAX), &call.stdout, &ended_tx);
                    }
                    if let Some(err) = child.stderr.take() {
                        read_in_background(err, Keep::Tail(STDERR_KEPT), &call.stderr, &ended_tx);
                    }
                    calls.push(call);
                    children.push(child);
                }
                Err(e) => {
                    spawn_error = Some(e.to_string());
                    break;
                }
            }
        }
        drop(ended_tx);
        let pgid = children.first().map_or(0, |c| c.id());
        if spawn_error.is_some() && pgid != 0 {
            let _ = sys::kill_process_group(pgid, sys::SIGKILL);
        }
        let count = children.len();
        for (i, mut child) in children.into_iter().enumerate() {
            let tx = exited_tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send((i, child.wait()));
            });
        }
        drop(exited_tx);

        // Judged by the exits alone: a process a call started may keep its
        // pipes open long after.
        let deadline = Instant::now() + self.timeout;
        let mut statuses: Vec<Option<std::io::Result<ExitStatus>>> =
            (0..count).map(|_| None).collect();
        let mut timed_out = false;
        for _ in 0..count {
            match exited.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((i, status)) => statuses[i] = Some(status),
                Err(_) => {
                    let _ = sys::kill_process_group(pgid, sys::SIGKILL);
                    timed_out = true;
                    break;
                }
            }
        }
        // What they wrote before they exited is in the pipes: read it, but
        // leave streams that something else keeps open to their threads.
        let output_deadline = Instant::now() + OUTPUT_AFTER_EXIT;
        while ended
            .recv_timeout(output_deadline.saturating_duration_since(Instant::now()))
            .is_ok()
        {}
        let calls: Vec<(Capture, Capture)> = calls
            .iter()
            .map(|c| (take(&c.stdout), take(&c.stderr)))
            .collect();

        if timed_out {
            // The stderr of a call that was still running tells most.
            let running = statuses.iter().position(Option::is_none).unwrap_or(0);
            let empty = Capture::default();
            let stderr = calls.get(running).map_or(&empty, |(_, e)| e);
            return Err(fail(FailureKind::TimedOut(self.timeout), stderr));
        }
        if let Some(e) = spawn_error {
            return Err(fail(FailureKind::Spawn(e), &Capture::default()));
        }
        statuses
            .into_iter()
            .zip(calls)
            .map(|(status, (out, err))| match status {
                Some(Ok(status)) if !status.success() => {
                    Err(fail(FailureKind::Exit(describe(status)), &err))
                }
                Some(Ok(_)) => match stdout {
                    Stdout::Discard => Ok(Vec::new()),
                    Stdout::Keep if out.read > STDOUT_MAX as u64 => Err(fail(
                        FailureKind::Output(format!(
                            "printed more than {STDOUT_MAX} bytes on its standard output"
                        )),
                        &err,
                    )),
                    Stdout::Keep if !out.ended => Err(fail(
                        FailureKind::Output(format!(
                            "exited, but its standard output was still open {} s later \
                             (held by a process it started?)",
                            OUTPUT_AFTER_EXIT.as_secs()
                        )),
                        &err,
                    )),
                    Stdout::Keep => Ok(out.data),
                },
                Some(Err(e)) => Err(fail(FailureKind::Spawn(e.to_string()), &err)),
                None => Err(fail(FailureKind::Spawn("no result".into()), &err)),
            })
            .collect()
    }
}

/// Whether a call's stdout is read (queries) or not wanted at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stdout {
    Keep,
    Discard,
}

/// Which part of a stream is kept.
#[derive(Debug, Clone, Copy)]
enum Keep {
    /// The first bytes, up to this many.
    Head(usize),
    /// The last bytes, this many.
    Tail(usize),
}

/// The two output streams of one call, filled by their reading threads.
#[derive(Default)]
struct Call {
    stdout: Arc<Mutex<Capture>>,
    stderr: Arc<Mutex<Capture>>,
}

/// What was read of one stream.
#[derive(Debug, Default)]
struct Capture {
    /// The part kept (for [`Keep::Tail`], up to twice the kept size, so
    /// that the front is dropped once per that many bytes, not per read).
    data: Vec<u8>,
    /// Bytes read in all.
    read: u64,
    /// Every writer closed the stream.
    ended: bool,
    keep: Option<Keep>,
}

impl Capture {
    fn push(&mut self, bytes: &[u8]) {
        self.read += bytes.len() as u64;
        match self.keep {
            Some(Keep::Head(max)) => {
                let room = max.saturating_sub(self.data.len());
                self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
            Some(Keep::Tail(max)) => {
                self.data.extend_from_slice(bytes);
                if self.data.len() > 2 * max {
                    self.data.drain(..self.data.len() - max);
                }
            }
            None => {}
        }
    }

    /// The bytes kept, as promised: for a tail, its last bytes only.
    fn kept(&self) -> &[u8] {
        match self.keep {
            Some(Keep::Tail(max)) => &self.data[self.data.len().saturating_sub(max)..],
            _ => &self.data,
        }
    }
}

/// The capture so far, leaving an empty one to a reading thread that goes
/// on (a leftover process holds its stream).
fn take(capture: &Mutex<Capture>) -> Capture {
    let mut c = capture.lock().unwrap_or_else(|e| e.into_inner());
    let keep = c.keep;
    std::mem::replace(
        &mut *c,
        Capture {
            keep,
            ..Capture::default()
        },
    )
}

/// Reads `from` to its end on a thread of its own, keeping what `keep`
/// says in `into`, and says so on `ended` when the stream ends. The thread
/// outlives the call when a leftover process holds the stream open; it then
/// costs a blocked thread and a bounded buffer until that process ends.
fn read_in_background(
    from: impl Read + Send + 'static,
    keep: Keep,
    into: &Arc<Mutex<Capture>>,
    ended: &mpsc::Sender<()>,
) {
    into.lock().unwrap_or_else(|e| e.into_inner()).keep = Some(keep);
    let into = Arc::clone(into);
    let ended = ended.clone();
    std::thread::spawn(move || {
        read_into(from, &into);
        let _ = ended.send(());
    });
}

/// Reads `from` to its end (or first error) into `into`.
fn read_into(mut from: impl Read, into: &Mutex<Capture>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => into
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    into.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
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

/// `text` with terminal colour sequences (`ESC [ ... letter`) removed and
/// every other control character but the line end made a space: nix's
/// words end up in the log and in `status` replies, where they must not
/// move a terminal's cursor or hide what follows.
fn without_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, up to the final byte.
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        } else if c.is_control() && c != '\n' {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// The last part of a command's stderr, on one line.
fn tail(stderr: &[u8]) -> String {
    const MAX: usize = 2000;
    let text = without_control(&String::from_utf8_lossy(stderr));
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
        let out = n
            .run_together("sh", vec![sh(group), sh(group)], Stdout::Keep)
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], out[1], "one process group");
        let err = n
            .run_together(
                "sh",
                vec![sh("exit 0"), sh("echo bad >&2; exit 4")],
                Stdout::Keep,
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 4): bad");

        let n = Nix::new(Path::new("nix"), Duration::from_millis(300), None);
        let marker = format!("{}.{}", 30 + std::process::id() % 1000, 7);
        let hang = || sh(&format!("sleep {marker} & sleep {marker}"));
        let err = n
            .run_together("sh", vec![hang(), hang()], Stdout::Keep)
            .unwrap_err();
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

    /// Processes whose command line is `sleep <marker>`.
    fn count_sleeps(marker: &str) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| c == format!("sleep\0{marker}\0").as_bytes())
            })
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    #[test]
    fn a_call_is_judged_by_its_exit_while_a_helper_holds_its_pipes() {
        // Longer than the wait for output after the exit, far shorter than
        // the sleeping helper: without judging by the exit, the call would
        // run into this timeout and be reported as killed.
        let n = Nix::new(Path::new("nix"), Duration::from_secs(20), None);
        let marker = format!("{}.{}", 100 + std::process::id() % 1000, 3);
        // The helper leaves the group, as an ssh ControlPersist master does,
        // so only its open stderr and stdout tie it to the call.
        let helper = format!("setsid sleep {marker} &");
        let out = n.run("sh", sh(&format!("{helper} echo printed; exit 0")));
        let failed = n
            .run("sh", sh(&format!("{helper} echo the cause >&2; exit 3")))
            .unwrap_err();
        let signed = n.run_together("sh", vec![sh(&format!("{helper} exit 0"))], Stdout::Discard);
        for pid in count_sleeps(&marker) {
            let _ = sys::kill_process_group(pid, sys::SIGKILL);
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        assert_eq!(failed.to_string(), "sh failed (exit status 3): the cause");
        assert_eq!(signed, Ok(vec![Vec::new()]));
        // A query's stdout must be complete: held open, it is not used.
        let err = out.unwrap_err();
        assert!(matches!(err.kind, FailureKind::Output(_)), "{err}");
        assert!(!err.timed_out(), "{err}");
    }

    #[test]
    fn only_the_end_of_a_flood_of_stderr_is_kept() {
        let capture = Mutex::new(Capture {
            keep: Some(Keep::Tail(STDERR_KEPT)),
            ..Capture::default()
        });
        let flood = 200 * 1024 * 1024;
        read_into(
            std::io::repeat(b'x')
                .take(flood)
                .chain(&b"\nerror: the cause\n"[..]),
            &capture,
        );
        let c = capture.into_inner().unwrap();
        assert!(c.ended);
        assert_eq!(c.read, flood + 18);
        assert!(
            c.data.capacity() <= 4 * STDERR_KEPT,
            "{} bytes held for a tail of {STDERR_KEPT}",
            c.data.capacity()
        );
        assert_eq!(c.kept().len(), STDERR_KEPT);
        assert!(tail(c.kept()).ends_with("| error: the cause"));

        let capture = Mutex::new(Capture {
            keep: Some(Keep::Head(10)),
            ..Capture::default()
        });
        read_into(std::io::repeat(b'y').take(1 << 20), &capture);
        let c = capture.into_inner().unwrap();
        assert_eq!((c.data.len(), c.read), (10, 1 << 20));
    }

    #[test]
    fn a_flood_on_stderr_fails_with_its_end_and_a_flood_on_stdout_is_refused() {
        let n = Nix::new(Path::new("nix"), Duration::from_secs(60), None);
        let err = n
            .run(
                "sh",
                sh("head -c 30000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo the cause >&2; exit 1"),
            )
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
        let n = Nix::new(Path::new("nix"), Duration::from_secs(10), None);
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo one >&2; echo two >&2; exit 3"]);
        let err = n.run("sh", cmd).unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 3): one | two");
        let err = n.run("x", Command::new("/nonexistent/nix")).unwrap_err();
        assert!(matches!(err.kind, FailureKind::Spawn(_)));
    }
}
