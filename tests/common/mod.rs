//! Integration-test harness for nix-post-build-hook-queue (std only, no crates).
//!
//! Every integration test file pulls this in with `mod common;`. Fixtures:
//! [`TempDir`], [`NixEnv`] (a private Nix store), [`Sshd`] (a signing
//! `ssh-ng://` receiver), [`Daemon`] (the real daemon; its log is printed
//! when its test fails), [`FakeNix`] (a wrapper nix that records, holds,
//! fails or refuses copies) with [`daemon_with_a_held_copy`] and
//! [`two_targets`], [`Rendered`] (module.nix's units), bounded polling
//! ([`wait_until`], [`wait_ok`], [`poll`]: a bound for correctness, never a
//! speed assertion), [`kill_tree`], [`run_to_exit`], [`rerun_test`], [`Json`].
//!
//! Useful environment variables: `NPBHQ_KEEP_TMP=1` keeps every temp dir (its
//! path is printed) for post-mortems; `NPBHQ_TEST_TMP=DIR` moves them (keep
//! it short: unix socket paths are limited to 107 bytes).
//!
//! Facts about Nix this harness relies on, true of Debian 12's Nix 2.8 (the
//! host) and Debian 13's Nix 2.26 (`tests/system/run-suite-in-container.sh`);
//! where the two differ, tests compare meaning, not one version's wording:
//!
//! - `--option post-build-hook PATH` on the `nix-build` command line works for
//!   root in single-user mode (no nix-daemon); the hook inherits the whole
//!   environment of `nix-build` (so `NPBHQ_SOCKET`, `NIX_STORE_DIR`, ...), plus
//!   `DRV_PATH`, `OUT_PATHS` (always empty in 2.8, NixOS/nix#6446; the
//!   outputs in 2.26) and `NIX_CONFIG`. Its stderr appears in nix-build's
//!   stderr prefixed with `post-build-hook: `. A failing hook fails the
//!   build. Nix 2.8 also prints `running post-build-hook '...'`, 2.26 does
//!   not at the default verbosity: a test that needs to know the hook ran
//!   asks the hook.
//! - `nix path-info --json` prints an array in 2.8 and an object keyed by
//!   path in 2.26: [`parse_path_infos`] reads both.
//! - Paths made by [`NixEnv::add_text_path`] (`nix-store --add`) are
//!   content-addressed: `nix store verify` accepts them with *any* key and an
//!   `ssh-ng` receiver with `require-sigs = true` accepts them unsigned. Use
//!   built paths ([`NixEnv::build`]) when a test is about signatures;
//!   [`NixEnv::verify_in_cache`] also checks that every path carries a
//!   signature by the key's name, so it is meaningful for both kinds.
//! - Locally built paths are "ultimate" in the local store, so verification
//!   is done against the destination store (cache or receiver), never the
//!   sending store.
//! - The `ssh-ng` receiver refuses an unsigned input-addressed path
//!   (`cannot add path ... because it lacks a valid signature` in 2.8,
//!   `... lacks a signature by a trusted key` in 2.26: see
//!   [`refused_for_signature`]) unless the client passes `--no-check-sigs`
//!   (the root client is trusted, so that flag is honoured).

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long [`Daemon::start`] waits for the socket to accept connections.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);
/// A generous default bound for "eventually uploaded" style waits.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// An empty environment list, for calls like `env.build(1, "t", None, NO_ENV)`.
pub const NO_ENV: &[(&str, &str)] = &[];

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A string unique within this machine for this test run: pid, a process-wide
/// counter and the sub-second clock.
pub fn unique_id() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{}-{:x}", std::process::id(), n, nanos)
}

/// Turns `s` into something valid inside a Nix store path name
/// (`A-Za-z0-9+-._?=`, not starting with a dot); other characters become `-`.
pub fn sanitize_name(s: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
    let out: String = s.chars().map(|c| if ok(c) { c } else { '-' }).collect();
    match out.starts_with('.') || out.is_empty() {
        true => format!("x{out}"),
        false => out,
    }
}

/// A unique directory under `$NPBHQ_TEST_TMP` (or the system temp dir),
/// removed recursively on drop unless `NPBHQ_KEEP_TMP` is set.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<base>/npbhq-<prefix>-<unique>`. Panics if it cannot.
    pub fn new(prefix: &str) -> TempDir {
        let base = std::env::var_os("NPBHQ_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&base)
            .unwrap_or_else(|e| panic!("cannot create test tmp base {}: {e}", base.display()));
        let path = base.join(format!("npbhq-{}-{}", sanitize_name(prefix), unique_id()));
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        // Canonical, so that store paths and URLs built from it are stable.
        let path = fs::canonicalize(&path).unwrap_or(path);
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("NPBHQ_KEEP_TMP").is_some() {
            eprintln!("NPBHQ_KEEP_TMP: keeping {}", self.path.display());
            return;
        }
        remove_tree(&self.path);
    }
}

/// Gives the owner rwx on every directory below `p` (not following symlinks),
/// so that read-only Nix store trees can be removed.
pub fn make_dirs_writable(p: &Path) {
    let Ok(md) = fs::symlink_metadata(p) else {
        return;
    };
    if !md.is_dir() {
        return;
    }
    let mode = md.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o700));
    }
    for e in fs::read_dir(p).into_iter().flatten().flatten() {
        make_dirs_writable(&e.path());
    }
}

/// Removes `p` recursively, making directories writable first if needed.
/// Failures are reported on stderr, not panicked on (this runs in `Drop`).
/// Retries a few times: a process killed a moment ago may still finish a
/// last write.
pub fn remove_tree(p: &Path) {
    for attempt in 1..=5 {
        match fs::remove_dir_all(p) {
            Err(e) if p.exists() && attempt == 5 => {
                eprintln!("warning: could not remove {}: {e}", p.display())
            }
            Err(_) if p.exists() => {
                thread::sleep(Duration::from_millis(50));
                make_dirs_writable(p);
            }
            _ => return,
        }
    }
}

/// `(pid, ppid, state)` of every process, from `/proc/*/stat`.
fn proc_table() -> Vec<(u32, u32, char)> {
    let entries = fs::read_dir("/proc").into_iter().flatten().flatten();
    let row = |e: fs::DirEntry| {
        let pid = e.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(e.path().join("stat")).ok()?;
        // "pid (comm) state ppid ...": comm may contain spaces and parens.
        let mut f = stat[stat.rfind(')')? + 1..].split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        Some((pid, ppid, state))
    };
    entries.filter_map(row).collect()
}

/// All live descendants of `pid` (children, grandchildren, ...).
pub fn descendants(pid: u32) -> Vec<u32> {
    let table = proc_table();
    let mut found = vec![pid];
    let mut i = 0;
    while let Some(&parent) = found.get(i) {
        for &(p, pp, state) in &table {
            if pp == parent && state != 'Z' && !found.contains(&p) {
                found.push(p);
            }
        }
        i += 1;
    }
    found.split_off(1)
}

/// Sends `sig` (e.g. `"KILL"`) to `pids` with the `kill` command; errors
/// (already gone) are ignored.
pub fn signal_pids(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGKILLs `pid` and every descendant of it (the `nix` commands a daemon
/// runs in their own process groups, the sessions of an sshd). The tree is
/// frozen with SIGSTOP first so nothing new is spawned while it is
/// collected. Does not reap `pid` (call `Child::wait`).
pub fn kill_tree(pid: u32) {
    signal_pids("STOP", &[pid]);
    let mut all = vec![pid];
    for _ in 0..5 {
        let more: Vec<u32> = descendants(pid)
            .into_iter()
            .filter(|p| !all.contains(p))
            .collect();
        if more.is_empty() {
            break;
        }
        signal_pids("STOP", &more);
        all.extend(more);
    }
    signal_pids("KILL", &all);
    // Wait (bounded) until the descendants are gone or zombies.
    poll(Duration::from_secs(5), 10, || {
        let table = proc_table();
        let alive = |p: &u32| table.iter().any(|&(q, _, st)| q == *p && st != 'Z');
        (!all[1..].iter().any(alive)).then_some(())
    });
}

/// Panics (so the test fails, never skips) unless the Nix 2.x command line
/// tools are on PATH. Checked once per test binary.
pub fn require_nix() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        for tool in ["nix", "nix-build", "nix-store"] {
            let why = match Command::new(tool).arg("--version").output() {
                Ok(o) if o.status.success() => continue,
                Ok(o) => format!("`{tool} --version` failed: {}", show(&o)),
                Err(e) => format!("`{tool}` not runnable: {e}"),
            };
            panic!("Nix is required for these tests (apt-get install nix-bin): {why}");
        }
    });
}

/// Path of the sshd binary; panics (test fails) if it is not installed.
pub fn require_sshd() -> PathBuf {
    let sshd = PathBuf::from("/usr/sbin/sshd");
    assert!(
        sshd.exists(),
        "sshd is required for these tests (apt-get install openssh-server)"
    );
    for tool in ["ssh", "ssh-keygen"] {
        assert!(
            on_path(tool).is_some(),
            "{tool} is required for these tests (apt-get install openssh-client)"
        );
    }
    sshd
}

/// The `post-build-hook` client binary built by cargo for this test run.
pub fn hook_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_post-build-hook"))
}

/// The `post-build-hook-queue` daemon/CLI binary built by cargo for this test run.
pub fn daemon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_post-build-hook-queue"))
}

/// Runs `cmd`, capturing stdout and stderr; panics if it cannot be spawned.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd` with `input` on its stdin; returns its output.
pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Runs `cmd` and panics with its output unless it exits 0; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?} failed: {}", show(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Polls `cond` (every 50 ms, first call at once) until it returns true;
/// panics with `what` if `timeout` passes first. The timeout bounds
/// correctness ("this eventually happens"), it is not a speed assertion:
/// choose it generously.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    wait_until_diag(timeout, what, cond, String::new);
}

/// [`wait_until`], and on timeout also prints `diag()` (e.g. a daemon log).
pub fn wait_until_diag(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    diag: impl FnOnce() -> String,
) {
    let check = || cond().then_some(()).ok_or_else(String::new);
    wait_until_ok(timeout, what, check, diag);
}

/// [`wait_until_ok`] without a diagnostic (a [`Daemon`] prints its log
/// when its test fails).
pub fn wait_ok(timeout: Duration, what: &str, check: impl FnMut() -> Result<(), String>) {
    wait_until_ok(timeout, what, check, String::new);
}

/// Polls `check` until it returns Ok; on timeout panics with `what`, the
/// last Err and `diag()` (e.g. a daemon log). Same bound semantics as
/// [`wait_until`].
pub fn wait_until_ok(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(), String>,
    diag: impl FnOnce() -> String,
) {
    let mut last = String::new();
    let done = poll(timeout, 50, || check().map_err(|e| last = e).ok());
    if done.is_none() {
        panic!(
            "timed out after {timeout:?} waiting for {what}\nlast check: {last}\n{}",
            diag()
        );
    }
}

/// Calls `f` every `step_ms` (the first call at once) until it gives Some,
/// or `timeout` has passed (None).
pub fn poll<T>(timeout: Duration, step_ms: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(step_ms));
    }
}

/// One entry of [`NixEnv::path_infos`]: the path and, if it is valid in that
/// store, its signatures.
pub type PathInfo = (PathBuf, Option<Vec<String>>);

/// The outcome of [`NixEnv::build`].
#[derive(Debug)]
pub struct BuildResult {
    /// Output paths printed by `nix-build`, in the order of the derivations.
    pub out_paths: Vec<PathBuf>,
    /// Wall time of the `nix-build` command (for reports, not for assertions).
    pub elapsed: Duration,
    pub status: ExitStatus,
    /// Everything `nix-build` wrote to stderr (including hook output, each
    /// line prefixed `post-build-hook: `).
    pub stderr: String,
}

impl BuildResult {
    /// Panics with stderr unless the build exited 0.
    pub fn assert_success(&self) -> &Self {
        let (status, stderr) = (self.status, &self.stderr);
        assert!(status.success(), "nix-build failed ({status}):\n{stderr}");
        self
    }

    /// The lines the post-build-hook wrote (prefix `post-build-hook: ` removed).
    pub fn hook_lines(&self) -> Vec<String> {
        let lines = self
            .stderr
            .lines()
            .filter_map(|l| l.strip_prefix("post-build-hook: "));
        lines.map(str::to_string).collect()
    }
}

/// The `nix.conf` of every store here: single-user (no nixbld group),
/// no sandbox (builders need /bin/sh), no substituters (no network), and
/// no fsync of the store DB (not under test). `require-sigs` is Nix's
/// default spelled out: it matters only for paths imported *into* the
/// store (`nix copy --from`, a receiver), never for locally built or added
/// ones.
pub const BASE_NIX_CONF: &str = "build-users-group =\nsandbox = false\nsubstituters =\n\
    experimental-features = nix-command\nrequire-sigs = true\nfsync-metadata = false\n";

/// A private Nix store for one test: `store/`, `var/`, `log/`, `etc/nix.conf`
/// and a `home/` under a [`TempDir`]. Every command made by [`NixEnv::cmd`]
/// uses only these (no `NIX_REMOTE`, no user config, no substituters).
/// Its `nix.conf` is [`BASE_NIX_CONF`].
#[derive(Debug)]
pub struct NixEnv {
    tmp: TempDir,
}

impl NixEnv {
    /// A fresh private store. Panics (test fails) if Nix is not installed.
    pub fn new(tag: &str) -> NixEnv {
        NixEnv::with_conf(tag, "")
    }

    /// [`NixEnv::new`] with extra lines appended to `nix.conf`.
    pub fn with_conf(tag: &str, extra_conf: &str) -> NixEnv {
        require_nix();
        let tmp = TempDir::new(tag);
        for d in ["store", "var", "log", "etc", "home/.cache", "home/.config"] {
            fs::create_dir_all(tmp.join(d)).unwrap();
        }
        let conf = format!("{BASE_NIX_CONF}{extra_conf}\n");
        fs::write(tmp.join("etc/nix.conf"), conf).unwrap();
        NixEnv { tmp }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The (logical and physical) store directory, `$NIX_STORE_DIR`.
    pub fn store_dir(&self) -> PathBuf {
        self.tmp.join("store")
    }

    /// The environment variables that select this store, as name/value pairs.
    /// [`NixEnv::cmd`] applies them; pass them to any other process that runs
    /// nix for this store.
    pub fn env_vars(&self) -> Vec<(String, OsString)> {
        let vars = [
            ("NIX_STORE_DIR", "store"),
            ("NIX_STATE_DIR", "var"),
            ("NIX_LOG_DIR", "log"),
            ("NIX_CONF_DIR", "etc"),
            // A file that does not exist: no user-level nix.conf is read.
            ("NIX_USER_CONF_FILES", "etc/no-user.conf"),
            ("HOME", "home"),
            ("XDG_CACHE_HOME", "home/.cache"),
            ("XDG_CONFIG_HOME", "home/.config"),
        ];
        let var = |(k, rel): (&str, &str)| (k.to_string(), self.root().join(rel).into());
        vars.into_iter().map(var).collect()
    }

    /// Applies [`NixEnv::env_vars`] to `cmd` and removes `NIX_REMOTE` and
    /// `NIX_CONFIG` (so nothing talks to a system nix-daemon).
    pub fn apply_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env_remove("NIX_REMOTE").env_remove("NIX_CONFIG");
        cmd.envs(self.env_vars())
    }

    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        self.apply_env(&mut c);
        c
    }

    /// Builds `n` independent trivial derivations named `npbhq-<tag>-<i>`
    /// with `nix-build --no-out-link`, with `--option post-build-hook HOOK`
    /// when `hook` is given, and `env` added to nix-build's environment (the
    /// hook inherits it). Each call makes new, never-built paths.
    pub fn build<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        &self,
        n: usize,
        tag: &str,
        hook: Option<&Path>,
        env: &[(K, V)],
    ) -> BuildResult {
        let id = unique_id();
        let tag = sanitize_name(tag);
        let mut expr = String::from("[\n");
        for i in 0..n {
            writeln!(
                expr,
                "  (derivation {{ name = \"npbhq-{tag}-{i}\"; system = builtins.currentSystem; \
                 builder = \"/bin/sh\"; args = [ \"-c\" \"echo {tag}-{i}-{id} > $out\" ]; }})"
            )
            .unwrap();
        }
        expr.push_str("]\n");
        let nix_file = self.root().join(format!("build-{tag}-{id}.nix"));
        fs::write(&nix_file, expr).unwrap();

        let mut cmd = self.cmd("nix-build");
        cmd.arg("--no-out-link");
        if let Some(h) = hook {
            cmd.arg("--option").arg("post-build-hook").arg(h);
        }
        cmd.arg(&nix_file).envs(env.iter().map(|(k, v)| (k, v)));
        let start = Instant::now();
        let out = run(&mut cmd);
        let elapsed = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let out_paths = stdout.lines().map(str::trim).filter(|l| !l.is_empty());
        BuildResult {
            out_paths: out_paths.map(PathBuf::from).collect(),
            elapsed,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Builds `n` derivations without a hook and returns their (input-addressed,
    /// unsigned) output paths; panics if the build fails.
    pub fn build_paths(&self, n: usize, tag: &str) -> Vec<PathBuf> {
        let b = self.build(n, tag, None, NO_ENV);
        b.assert_success();
        assert_eq!(b.out_paths.len(), n, "nix-build printed: {:?}", b.out_paths);
        b.out_paths
    }

    /// Adds a file `name` with `contents` to the store (`nix-store --add`),
    /// without building. The result is a *content-addressed* path: signature
    /// checks never reject it (see the module doc).
    pub fn add_text_path(&self, name: &str, contents: &str) -> PathBuf {
        let dir = self.root().join(format!("add-{}", unique_id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join(sanitize_name(name));
        fs::write(&file, contents).unwrap();
        let out = run_ok(self.cmd("nix-store").arg("--add").arg(&file));
        PathBuf::from(out.trim())
    }

    /// The derivation that built `path` (`nix-store --query --deriver`).
    pub fn deriver(&self, path: &Path) -> PathBuf {
        let query = ["--query", "--deriver"];
        let drv = run_ok(self.cmd("nix-store").args(query).arg(path));
        PathBuf::from(drv.trim())
    }

    /// Makes a binary-cache signing key pair named `name` (e.g. `test-1`).
    /// Returns the secret key file and the public key string `name:base64`.
    pub fn gen_signing_key(&self, name: &str) -> (PathBuf, String) {
        let dir = self.root().join(format!("key-{}", unique_id()));
        fs::create_dir_all(&dir).unwrap();
        let sk = dir.join("secret");
        let pk = dir.join("public");
        let mut generate = self.cmd("nix-store");
        run_ok(
            generate
                .args(["--generate-binary-cache-key", name])
                .args([&sk, &pk]),
        );
        let public = fs::read_to_string(&pk).unwrap().trim().to_string();
        (sk, public)
    }

    /// Signs `paths` in the local store with `key_file` (`nix store sign`);
    /// panics on failure.
    pub fn sign(&self, key_file: &Path, paths: &[PathBuf]) {
        run_ok(
            self.cmd("nix")
                .args(["store", "sign", "--key-file"])
                .arg(key_file)
                .args(paths),
        );
    }

    /// `nix copy --to URL [extra] PATHS`, with `extra_env` (e.g. NIX_SSHOPTS).
    pub fn copy_to<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        &self,
        url: &str,
        paths: &[PathBuf],
        extra_args: &[&str],
        extra_env: &[(K, V)],
    ) -> Output {
        let mut c = self.cmd("nix");
        c.args(["copy", "--to", url]).args(extra_args).args(paths);
        run(c.envs(extra_env.iter().map(|(k, v)| (k, v))))
    }

    /// Ok if every path is present in the store at `store_url` (a binary
    /// cache such as `file:///...`, or `local?root=...`), verifies with
    /// `nix store verify --store URL --trusted-public-keys PK`, and carries a
    /// signature by `public_key`'s key name. The last check matters for
    /// content-addressed paths, which `nix store verify` accepts unsigned.
    /// Err carries the reason (for polling, treat Err as "not yet").
    pub fn verify_in_cache(
        &self,
        store_url: &str,
        public_key: &str,
        paths: &[PathBuf],
    ) -> Result<(), String> {
        if paths.is_empty() {
            return Ok(());
        }
        let o = run(self
            .cmd("nix")
            .args(["store", "verify", "--store", store_url])
            .args(["--trusted-public-keys", public_key])
            .args(paths));
        succeeded("nix store verify", &o)?;
        let key_name = public_key.split(':').next().unwrap_or(public_key);
        let infos = self.path_infos(store_url, paths)?;
        for p in paths {
            let sigs = infos
                .iter()
                .find(|(q, _)| q == p)
                .and_then(|(_, s)| s.as_ref());
            let sigs = sigs.ok_or_else(|| format!("{} is not in {store_url}", p.display()))?;
            if !sigs.iter().any(|s| s.starts_with(&format!("{key_name}:"))) {
                let p = p.display();
                return Err(format!(
                    "{p} in {store_url} has no signature by {key_name}: {sigs:?}"
                ));
            }
        }
        Ok(())
    }

    /// The signatures of `path` in the store at `store_url`
    /// (`nix path-info --json --sigs --store URL PATH`). Err if the path is
    /// not valid there or the command fails.
    pub fn path_sigs(&self, store_url: &str, path: &Path) -> Result<Vec<String>, String> {
        let infos = self.path_infos(store_url, &[path.to_path_buf()])?;
        infos
            .into_iter()
            .find(|(p, _)| p == path)
            .and_then(|(_, s)| s)
            .ok_or_else(|| format!("{} is not valid in {store_url}", path.display()))
    }

    /// True if `path` is valid in the store at `store_url`.
    pub fn is_valid_in(&self, store_url: &str, path: &Path) -> bool {
        self.path_sigs(store_url, path).is_ok()
    }

    /// For each path: `(path, Some(signatures))` if valid in `store_url`,
    /// `(path, None)` if not.
    pub fn path_infos(&self, store_url: &str, paths: &[PathBuf]) -> Result<Vec<PathInfo>, String> {
        let o = run(self
            .cmd("nix")
            .args(["path-info", "--json", "--sigs", "--store", store_url])
            .args(paths));
        succeeded("nix path-info", &o)?;
        parse_path_infos(&String::from_utf8_lossy(&o.stdout))
    }
}

/// Err with `what` and its stderr unless `o` is of a command that exited 0.
fn succeeded(what: &str, o: &Output) -> Result<(), String> {
    let stderr = String::from_utf8_lossy(&o.stderr);
    let failed = format!("{what} exited {}: {}", o.status, stderr.trim());
    o.status.success().then_some(()).ok_or(failed)
}

/// Reads `nix path-info --json [--sigs]` output of either shape into
/// `(path, Some(signatures))` for a valid path and `(path, None)` for an
/// invalid one, in the order Nix printed them:
///
/// - Nix 2.8 prints an array of objects, each with its `path`, and
///   `"valid": false` for an invalid path;
/// - Nix 2.26 prints an object keyed by store path, whose value is `null`
///   for an invalid path.
///
/// A path without a `signatures` member is valid and unsigned.
pub fn parse_path_infos(text: &str) -> Result<Vec<PathInfo>, String> {
    let json = Json::parse(text).map_err(|e| format!("bad path-info JSON ({e}): {text}"))?;
    let sigs_of = |info: &Json| -> Vec<String> {
        let sigs = info
            .get("signatures")
            .and_then(Json::as_array)
            .unwrap_or(&[]);
        sigs.iter()
            .filter_map(|s| Some(s.as_str()?.to_string()))
            .collect()
    };
    match json {
        Json::Arr(items) => items
            .iter()
            .map(|item| {
                let p = item
                    .get("path")
                    .and_then(Json::as_str)
                    .ok_or_else(|| format!("path-info entry without path: {text}"))?;
                let valid = item.get("valid").and_then(Json::as_bool).unwrap_or(true);
                Ok((PathBuf::from(p), valid.then(|| sigs_of(item))))
            })
            .collect(),
        Json::Obj(members) => members
            .iter()
            .map(|(p, info)| match info {
                Json::Null => Ok((PathBuf::from(p), None)),
                Json::Obj(_) => Ok((PathBuf::from(p), Some(sigs_of(info)))),
                _ => Err(format!(
                    "path-info value for {p} is neither an object nor null: {text}"
                )),
            })
            .collect(),
        _ => Err(format!(
            "path-info JSON is neither an array nor an object: {text}"
        )),
    }
}

/// True if `text` (a `nix copy` stderr, a daemon's error) says that a store
/// refused a path for want of a signature it trusts. The sense, not one
/// Nix's wording: Nix 2.8 says `lacks a valid signature`, Nix 2.26 says
/// `lacks a signature by a trusted key`.
pub fn refused_for_signature(text: &str) -> bool {
    text.lines().any(|l| {
        l.find("lacks a ")
            .is_some_and(|i| l[i..].contains("signature"))
    })
}

/// A real sshd on 127.0.0.1 serving a separate receiving Nix store over
/// `ssh-ng://`.
///
/// - sshd has a host key of its own and lets root in with a generated
///   client key only; it is killed on drop.
/// - The receiving store is the chroot-style store `local?root=<dir>/remote`:
///   its *logical* store dir is the sender's `NIX_STORE_DIR` (so the same
///   store paths are valid there), its files live under
///   `<dir>/remote/nix/store` and its database under `<dir>/remote/nix/var`,
///   so it shares nothing on disk with the sender.
/// - sshd's `SetEnv` gives the `nix-daemon --stdio` started by ssh-ng the
///   sender's `NIX_STORE_DIR` and the receiver's own `NIX_CONF_DIR`, whose
///   `nix.conf` has `require-sigs = true` and `trusted-public-keys = <key>`.
#[derive(Debug)]
pub struct Sshd {
    tmp: TempDir,
    child: Child,
    port: u16,
    client_key: PathBuf,
    receiver_root: PathBuf,
}

impl Sshd {
    /// Starts sshd for a receiver that shares `sender`'s store dir and trusts
    /// `trusted_public_keys` (space separated `name:base64` keys).
    pub fn start(sender: &NixEnv, trusted_public_keys: &str) -> Sshd {
        let sshd_bin = require_sshd();
        require_loopback();
        let tmp = TempDir::new("sshd");
        let dir = tmp.path().to_path_buf();
        fs::create_dir_all("/run/sshd").expect("mkdir -p /run/sshd");
        let host_key = dir.join("host_ed25519");
        let client_key = dir.join("client_ed25519");
        for k in [&host_key, &client_key] {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", "npbhq-test", "-f"])
                    .arg(k),
            );
        }
        let authorized = dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized).unwrap();

        let [receiver_root, recv_etc, recv_home] =
            ["remote", "remote-etc", "remote-home"].map(|d| dir.join(d));
        for d in [&receiver_root, &recv_etc, &recv_home.join(".cache")] {
            fs::create_dir_all(d).unwrap();
        }
        let conf = format!("{BASE_NIX_CONF}trusted-public-keys = {trusted_public_keys}\n");
        fs::write(recv_etc.join("nix.conf"), conf).unwrap();
        let set_env = format!(
            "NIX_STORE_DIR={} NIX_STATE_DIR={} NIX_LOG_DIR={} NIX_CONF_DIR={} \
             NIX_USER_CONF_FILES={} XDG_CACHE_HOME={}",
            sender.store_dir().display(),
            receiver_root.join("nix/var/nix").display(),
            receiver_root.join("nix/var/log/nix").display(),
            recv_etc.display(),
            recv_etc.join("no-user.conf").display(),
            recv_home.join(".cache").display(),
        );
        let config = dir.join("sshd_config");
        let log = dir.join("sshd.log");

        let (host, keys) = (host_key.display(), authorized.display());
        let mut last_err = String::new();
        for _attempt in 0..10 {
            let port = free_port();
            let text = format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {host}\nPidFile none\n\
                 UsePAM no\nStrictModes no\nUseDNS no\nPermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nAuthorizedKeysFile {keys}\n\
                 SetEnv {set_env}\nLogLevel ERROR\n",
            );
            fs::write(&config, text).unwrap();
            let logf = fs::File::create(&log).unwrap();
            let mut child = Command::new(&sshd_bin)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start sshd: {e}"));
            let up = poll(Duration::from_secs(10), 20, || match child.try_wait() {
                Ok(Some(st)) => Some(Err(format!("sshd exited {st}: "))),
                _ => TcpStream::connect(("127.0.0.1", port))
                    .is_ok()
                    .then_some(Ok(())),
            });
            let up = up.unwrap_or_else(|| Err(format!("sshd did not listen on port {port}: ")));
            if up.is_ok() && matches!(child.try_wait(), Ok(None)) {
                return Sshd {
                    tmp,
                    child,
                    port,
                    client_key,
                    receiver_root,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = fs::read_to_string(&log).unwrap_or_default();
            last_err = format!("{}{log}", up.err().unwrap_or("sshd exited: ".into()));
        }
        panic!("could not start sshd: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `ssh-ng://` store URL of the receiving store.
    pub fn url(&self) -> String {
        let root = self.receiver_root.display();
        format!("ssh-ng://root@127.0.0.1?remote-store={root}")
    }

    /// The `NIX_SSHOPTS` value to reach this sshd (port, key, no host key
    /// checks, batch mode, connect timeout).
    pub fn ssh_opts(&self) -> String {
        format!(
            "-p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o BatchMode=yes -o ConnectTimeout=5 -o LogLevel=ERROR",
            self.port,
            self.client_key.display()
        )
    }

    /// `[("NIX_SSHOPTS", ssh_opts())]`, to add to any process that copies to
    /// [`Sshd::url`].
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("NIX_SSHOPTS".to_string(), self.ssh_opts())]
    }

    /// A store URL (`local?root=...`) that opens the receiving store directly,
    /// without ssh, from the sender's [`NixEnv`] (same `NIX_STORE_DIR`): use it
    /// to inspect what arrived (`path_sigs`, `verify_in_cache`).
    pub fn local_store_url(&self) -> String {
        format!("local?root={}", self.receiver_root.display())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.tmp.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Also ends live sessions and their `nix-daemon --stdio`.
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }
}

/// Panics with one line unless a TCP connection to 127.0.0.1 goes through:
/// in a container without `CAP_NET_ADMIN` the loopback interface can stay
/// down, and every test that needs sshd would fail without saying why.
pub fn require_loopback() {
    // The listener lives until the connection is made.
    let probe = TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| TcpStream::connect_timeout(&l.local_addr()?, Duration::from_secs(5)));
    if let Err(e) = probe {
        panic!(
            "no TCP connection to 127.0.0.1 ({e}): the loopback interface is down (a container without CAP_NET_ADMIN?), and these tests run sshd on it"
        );
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("its address").port()
}

/// The real `post-build-hook-queue serve --config FILE` daemon for a
/// [`NixEnv`].
///
/// Its files live in `<nixenv>/daemon-<id>/`: `config`, `sock` (the socket),
/// `state/` (the state dir, journal and default spool) and `daemon.log`
/// (stdout and stderr of every run, appended across restarts). It runs with
/// the NixEnv's environment plus any extra variables given. It is killed
/// (SIGKILL) on drop.
#[derive(Debug)]
pub struct Daemon {
    dir: PathBuf,
    config_path: PathBuf,
    config: Vec<(String, String)>,
    env: Vec<(String, OsString)>,
    /// Variables removed from the daemon's environment.
    unset: Vec<String>,
    child: Option<Child>,
    launch: Launch,
}

/// How [`Daemon::try_spawn`] connects the daemon's standard descriptors.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Launch {
    /// stdin from /dev/null, stdout and stderr to [`Daemon::log_path`].
    Logged,
    /// 0, 1 and 2 closed.
    ClosedStd,
    /// stderr a pipe whose reading end is closed at once.
    StderrGone,
}

impl Daemon {
    /// Starts a daemon with `config` key/value pairs (the harness adds
    /// `socket` and `state-dir` unless given) and waits until its socket
    /// accepts; panics with the log if it does not within
    /// [`DAEMON_START_TIMEOUT`].
    pub fn start(env: &NixEnv, config: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_env(env, config, NO_ENV)
    }

    /// [`Daemon::start`] with extra environment variables (e.g. from
    /// [`Sshd::env`]).
    pub fn start_with_env<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        env: &NixEnv,
        config: &[(&str, &str)],
        extra_env: &[(K, V)],
    ) -> Daemon {
        let mut d = Daemon::new_stopped(env, config, extra_env);
        d.try_spawn().unwrap_or_else(|e| panic!("{e}"));
        d
    }

    /// Prepares the directory and config but does not start the daemon (see
    /// [`Daemon::try_spawn`], [`Daemon::restart`]).
    pub fn new_stopped<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        env: &NixEnv,
        config: &[(&str, &str)],
        extra_env: &[(K, V)],
    ) -> Daemon {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = env.root().join(format!("daemon-{n}"));
        fs::create_dir_all(&dir).unwrap();
        let cfg = config.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let mut cfg: Vec<(String, String)> = cfg.collect();
        if !cfg.iter().any(|(k, _)| k == "socket") {
            let sock = dir.join("sock");
            assert!(
                sock.as_os_str().len() < 108,
                "socket path {} is too long for a unix socket; use a shorter NPBHQ_TEST_TMP",
                sock.display()
            );
            cfg.push(("socket".into(), sock.display().to_string()));
        }
        if !cfg.iter().any(|(k, _)| k == "state-dir") {
            cfg.push(("state-dir".into(), dir.join("state").display().to_string()));
        }
        let mut vars = env.env_vars();
        let text = |k: &K| k.as_ref().to_string_lossy().into_owned();
        vars.extend(extra_env.iter().map(|(k, v)| (text(k), v.as_ref().into())));
        let d = Daemon {
            config_path: dir.join("config"),
            dir,
            config: cfg,
            env: vars,
            unset: Vec::new(),
            child: None,
            launch: Launch::Logged,
        };
        d.write_config();
        d
    }

    fn write_config(&self) {
        let mut s = String::from("# written by tests/common/mod.rs\n");
        for (k, v) in &self.config {
            writeln!(s, "{k} = {v}").unwrap();
        }
        fs::write(&self.config_path, s).unwrap();
    }

    /// Sets (or replaces) config key `key`; takes effect at the next
    /// (re)start.
    pub fn set_config(&mut self, key: &str, value: &str) {
        if let Some(e) = self.config.iter_mut().find(|(k, _)| k == key) {
            e.1 = value.to_string();
        } else {
            self.config.push((key.to_string(), value.to_string()));
        }
        self.write_config();
    }

    /// Sets `key` in the daemon's environment from the next (re)start on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.into()));
    }

    /// Removes `key` from the daemon's environment (the test runner's
    /// included) from the next (re)start on.
    pub fn unset_env(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
        self.unset.push(key.to_string());
    }

    pub fn config_value(&self, key: &str) -> Option<&str> {
        let entry = self.config.iter().find(|(k, _)| k == key);
        entry.map(|(_, v)| v.as_str())
    }

    /// Spawns the daemon and waits for its socket. On failure (it exits, or
    /// the socket does not accept within [`DAEMON_START_TIMEOUT`]) the child
    /// is killed and Err carries the log.
    pub fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "daemon already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = if self.launch == Launch::ClosedStd {
            let mut c = self.command("sh".into());
            c.args(["-c", "exec \"$0\" \"$@\" <&- >&- 2>&-"])
                .arg(daemon_bin());
            c
        } else {
            self.command(daemon_bin())
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if self.launch == Launch::StderrGone {
            cmd.stderr(Stdio::piped());
        }
        for k in &self.unset {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", daemon_bin().display()))?;
        drop(child.stderr.take());
        let up = poll(DAEMON_START_TIMEOUT, 20, || match child.try_wait() {
            Ok(Some(st)) => Some(Err(format!(
                "daemon exited ({st}) before its socket accepted"
            ))),
            _ => UnixStream::connect(self.socket()).is_ok().then_some(Ok(())),
        });
        let up = up.unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "daemon socket {} did not accept within {DAEMON_START_TIMEOUT:?}",
                self.socket().display()
            ))
        });
        self.child = Some(child).filter(|_| up.is_ok());
        up.map_err(|e| format!("{e}; log:\n{}", self.log()))
    }

    pub fn socket(&self) -> PathBuf {
        PathBuf::from(self.config_value("socket").expect("socket is always set"))
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(self.config_value("state-dir").expect("always set"))
    }

    /// The spool directory clients should use: the `spool-dir` config value,
    /// else `<state-dir>/spool` (the daemon's default).
    pub fn spool_dir(&self) -> PathBuf {
        self.config_value("spool-dir")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.state_dir().join("spool"))
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        let running = |c: &mut Child| matches!(c.try_wait(), Ok(None));
        self.child.as_mut().is_some_and(running)
    }

    /// SIGKILLs the daemon *and every process it started* (its running
    /// `nix store sign` / `nix copy`, which it puts in their own process
    /// groups), like a crash of the whole service (systemd kills the whole
    /// cgroup). Without this an orphaned `nix copy` could still finish an
    /// upload after the "crash" and hide a lost journal entry. No-op if not
    /// running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_tree(c.id());
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (`kill -TERM PID`) and waits (bounded, 30 s) for the
    /// exit; returns its status. Panics if it does not exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon is not running");
        if let Ok(Some(st)) = c.try_wait() {
            return st;
        }
        run_ok(Command::new("kill").args(["-TERM", &c.id().to_string()]));
        poll(Duration::from_secs(30), 20, || c.try_wait().ok().flatten()).unwrap_or_else(|| {
            let _ = c.kill();
            let _ = c.wait();
            panic!("daemon ignored SIGTERM for 30 s; log:\n{}", self.log());
        })
    }

    /// Stops the daemon if it runs (SIGTERM) and starts it again with the
    /// current config (same socket and state dir); panics with the log if it
    /// does not come up.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.stop();
        }
        self.child = None;
        if let Err(e) = self.try_spawn() {
            panic!("restart failed: {e}");
        }
    }

    /// Like [`Daemon::restart`], but the daemon starts with its standard
    /// descriptors 0, 1 and 2 closed (so it writes no log), as a careless
    /// supervisor might start it.
    pub fn restart_with_closed_standard_descriptors(&mut self) {
        self.restart_as(Launch::ClosedStd);
    }

    /// Like [`Daemon::restart`], but the daemon's stderr is a pipe nobody
    /// reads any more (a log reader that went away), so that every log line
    /// it writes fails with EPIPE.
    pub fn restart_with_stderr_gone(&mut self) {
        self.restart_as(Launch::StderrGone);
    }

    fn restart_as(&mut self, launch: Launch) {
        self.launch = launch;
        self.restart();
        self.launch = Launch::Logged;
    }

    /// Environment for the hook and CLI: `NPBHQ_SOCKET` and `NPBHQ_SPOOL_DIR`.
    pub fn hook_env(&self) -> Vec<(String, String)> {
        let text = |p: PathBuf| p.display().to_string();
        let socket = ("NPBHQ_SOCKET".into(), text(self.socket()));
        vec![socket, ("NPBHQ_SPOOL_DIR".into(), text(self.spool_dir()))]
    }

    /// A [`Command`] for the `post-build-hook` client with the NixEnv's
    /// environment and [`Daemon::hook_env`] (add `DRV_PATH`/`OUT_PATHS`).
    pub fn hook_cmd(&self) -> Command {
        let mut c = self.command(hook_bin());
        c.envs(self.hook_env());
        c
    }

    /// A [`Command`] for `program` with the daemon's environment.
    fn command(&self, program: PathBuf) -> Command {
        let mut c = Command::new(program);
        c.env_remove("NIX_REMOTE").env_remove("NIX_CONFIG");
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// A [`Command`] for `post-build-hook-queue` (the CLI, e.g. `enqueue`)
    /// with the same environment as the daemon and `NPBHQ_SOCKET` set. Pass
    /// `--socket` yourself where the CLI needs it.
    pub fn cli_cmd(&self) -> Command {
        let mut c = self.command(daemon_bin());
        c.env("NPBHQ_SOCKET", self.socket());
        c
    }

    /// Sends one protocol line (newline added) and returns the final reply
    /// line (the one starting with `ok` or `err`), without its newline.
    /// Panics on I/O errors or if the connection closes first (30 s timeouts).
    pub fn request(&self, line: &str) -> String {
        self.request_lines(line)
            .pop()
            .expect("request_lines returns at least the final line")
    }

    /// Sends one protocol line and returns every reply line up to and
    /// including the final `ok`/`err` line (informational lines of `status`
    /// and `wait` come first).
    pub fn request_lines(&self, line: &str) -> Vec<String> {
        let socket = self.socket();
        exchange(&socket, line).unwrap_or_else(|e| {
            panic!(
                "{line:?} to {}: {e}\nlog:\n{}",
                socket.display(),
                self.log()
            )
        })
    }
}

/// A parsed `status` reply: its `KEY VALUE` lines and its `backoff ...`
/// lines (attempts, next try, path, error).
#[derive(Debug, Default)]
pub struct Status {
    pub fields: std::collections::HashMap<String, String>,
    pub backoff: Vec<String>,
}

impl Status {
    /// The value of `key` (empty when there is none).
    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }

    /// The value of `key` as a number; panics when it is not one.
    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("status {key} is not a number: {self:?}"))
    }
}

impl Daemon {
    /// The daemon's `status json` reply, parsed (keys with `-` for `_`;
    /// each backoff entry as `backoff ATTEMPTS NEXT-TRY PATH ERROR`);
    /// panics unless it ends with `ok`.
    pub fn status(&self) -> Status {
        let lines = self.request_lines("status json");
        assert_eq!(lines.last().map(String::as_str), Some("ok"), "{lines:?}");
        let Ok(Json::Obj(members)) = Json::parse(&lines[0]) else {
            panic!("status json reply: {lines:?}");
        };
        let mut st = Status::default();
        for (k, v) in members {
            match v {
                Json::Num(n) => drop(st.fields.insert(k.replace('_', "-"), n.to_string())),
                Json::Str(s) => drop(st.fields.insert(k.replace('_', "-"), s)),
                Json::Arr(items) if k == "backoff" => {
                    for b in items {
                        let text =
                            |k: &str| b.get(k).and_then(Json::as_str).unwrap_or("").to_string();
                        let num = |k: &str| b.get(k).and_then(Json::as_f64).unwrap_or(-1.0);
                        let (path, error) = (text("path"), text("last_error"));
                        let (attempts, next) = (num("attempts"), num("next_try_seconds"));
                        st.backoff
                            .push(format!("backoff {attempts} {next:.1} {path} {error}"));
                    }
                }
                _ => {}
            }
        }
        st
    }

    pub fn journal_path(&self) -> PathBuf {
        self.state_dir().join("journal")
    }

    /// The journal, read as the daemon replays it (empty if it is missing).
    pub fn journal(&self) -> Journal {
        let text = fs::read(self.journal_path()).unwrap_or_default();
        Journal::parse(&String::from_utf8_lossy(&text))
    }
}

/// A journal read the way the daemon replays it: `+ SECS PATH` queues a
/// path, `- PATH` ends it; a last line without a newline is a torn record
/// and ignored. Any other line is counted in `malformed` (a daemon with one
/// target writes no other record).
#[derive(Debug, Default)]
pub struct Journal {
    /// The path of every `+` record, in order.
    pub added: Vec<String>,
    /// The path of every `-` record, in order.
    pub done: Vec<String>,
    /// Lines that are neither.
    pub malformed: Vec<String>,
    /// Paths queued and not ended, in the order of their `+` record.
    pub live: Vec<String>,
    /// `+` records of a path that was already live.
    pub duplicates: Vec<String>,
    /// Records that describe no live path.
    pub dead: usize,
    /// Bytes of a torn last line.
    pub torn: usize,
}

impl Journal {
    pub fn parse(text: &str) -> Journal {
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        let mut j = Journal {
            torn: text.len() - complete.len(),
            ..Journal::default()
        };
        for line in complete.lines().filter(|l| !l.is_empty()) {
            let add = line.strip_prefix("+ ").and_then(|r| r.split_once(' '));
            if let Some((_, p)) = add.filter(|(s, p)| s.parse::<u64>().is_ok() && !p.contains(' '))
            {
                if j.live.iter().any(|l| l == p) {
                    j.duplicates.push(p.to_string());
                } else {
                    j.live.push(p.to_string());
                }
                j.added.push(p.to_string());
            } else if let Some(p) = line.strip_prefix("- ").filter(|p| !p.contains(' ')) {
                j.live.retain(|l| l != p);
                j.done.push(p.to_string());
            } else {
                j.malformed.push(line.to_string());
            }
        }
        j.dead = j.added.len() + j.done.len() + j.malformed.len() - j.live.len();
        j
    }
}

impl Drop for Daemon {
    /// Kills the daemon; when a test fails (the thread is panicking), also
    /// prints the end of its log, so that every failed assertion of a
    /// daemon test shows what the daemon said.
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!(
                "---- log of the daemon in {} (its last 20 kB) ----\n{}",
                self.dir.display(),
                tail(&self.log(), 20_000)
            );
        }
    }
}

/// The last `n` bytes of `s` (from a character boundary).
pub fn tail(s: &str, n: usize) -> &str {
    let start = (s.len().saturating_sub(n)..).find(|&i| s.is_char_boundary(i));
    &s[start.unwrap_or(s.len())..]
}

/// The soft and hard limits on this process's open files
/// (`/proc/self/limits`; `unlimited` is `u64::MAX`).
pub fn open_file_limits() -> (u64, u64) {
    let limits = fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    let line = line_after(&limits, "Max open files").expect("an open-files line");
    let mut f = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(u64::MAX));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// Runs the test `name` of this test binary again, alone, in a child
/// process started through `sh -c SCRIPT` (SCRIPT ends with
/// `exec "$0" "$@"`), with `env` added; returns its output.
pub fn rerun_test(name: &str, script: &str, env: &[(&str, &str)]) -> Output {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).arg(exe);
    c.args(["--exact", name, "--nocapture", "--test-threads=1"]);
    c.envs(env.iter().copied());
    run(&mut c)
}

/// A parsed JSON value (numbers as f64, objects keep their key order).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses a complete JSON text (surrounding whitespace allowed).
    pub fn parse(s: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            b: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        match p.peek() {
            None => Ok(v),
            Some(_) => Err(format!("trailing data at byte {}", p.i)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        let Json::Obj(m) = self else { return None };
        m.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn as_str(&self) -> Option<&str> {
        let Json::Str(s) = self else { return None };
        Some(s)
    }

    pub fn as_f64(&self) -> Option<f64> {
        let Json::Num(n) = self else { return None };
        Some(*n)
    }

    pub fn as_bool(&self) -> Option<bool> {
        let Json::Bool(b) = self else { return None };
        Some(*b)
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        let Json::Arr(a) = self else { return None };
        Some(a)
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    /// The next byte after whitespace (not consumed).
    fn peek(&mut self) -> Option<u8> {
        while self.b.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.peek() != Some(c) {
            return Err(format!("expected {:?} at byte {}", c as char, self.i));
        }
        self.i += 1;
        Ok(())
    }

    /// The comma-separated items after an opening bracket, up to `close`.
    fn items<T>(
        &mut self,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        self.i += 1;
        let mut v = Vec::new();
        if self.peek() == Some(close) {
            self.i += 1;
            return Ok(v);
        }
        loop {
            v.push(item(self)?);
            if self.peek() != Some(b',') {
                self.eat(close)?;
                return Ok(v);
            }
            self.i += 1;
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        let member = |p: &mut Self| Ok((p.string()?, p.eat(b':').and_then(|()| p.value())?));
        match self.peek().ok_or("unexpected end")? {
            b'"' => self.string().map(Json::Str),
            b'[' => self.items(b']', Self::value).map(Json::Arr),
            b'{' => self.items(b'}', member).map(Json::Obj),
            _ => {
                let start = self.i;
                let rest = &self.b[start..];
                let len = rest
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || b"+-.".contains(c));
                self.i += len.count();
                match std::str::from_utf8(&self.b[start..self.i]).unwrap_or("") {
                    "null" => Ok(Json::Null),
                    "true" => Ok(Json::Bool(true)),
                    "false" => Ok(Json::Bool(false)),
                    n if n.bytes().all(|c| b"+-.0123456789eE".contains(&c)) => n
                        .parse()
                        .map(Json::Num)
                        .map_err(|_| format!("bad number at byte {start}")),
                    _ => Err(format!("bad value at byte {start}")),
                }
            }
        }
    }

    /// A string with the escapes `status json` and `nix path-info --json`
    /// write: `\"`, `\\`, `\/` and `\uXXXX` (a control character).
    fn string(&mut self) -> Result<String, String> {
        self.eat(b'"')?;
        let mut out = String::new();
        loop {
            let rest = &self.b[self.i..];
            let end = rest.iter().position(|c| b"\"\\".contains(c));
            let end = end.ok_or("unterminated string")?;
            out.push_str(std::str::from_utf8(&rest[..end]).map_err(|e| e.to_string())?);
            let escape = rest.get(end + 1).filter(|_| rest[end] == b'\\');
            self.i += end + 1 + escape.map_or(0, |&e| if e == b'u' { 5 } else { 1 });
            let hex = std::str::from_utf8(rest.get(end + 2..end + 6).unwrap_or_default());
            let code = hex.ok().and_then(|h| u32::from_str_radix(h, 16).ok());
            out.push(match escape {
                None if rest[end] == b'"' => return Ok(out),
                Some(&c @ (b'"' | b'\\' | b'/')) => char::from(c),
                Some(b'u') => code.and_then(char::from_u32).ok_or("bad \\u escape")?,
                _ => return Err(format!("bad escape before byte {}", self.i)),
            });
        }
    }
}

/// A `file://` cache named `name` under the env: (URL for uploads, without
/// compression to keep tests fast; URL for reading).
pub fn file_cache(env: &NixEnv, name: &str) -> (String, String) {
    let dir = env.root().join(name);
    let read = format!("file://{}", dir.display());
    (format!("{read}?compression=none"), read)
}

pub fn strs(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

/// Writes an executable (0755) script.
pub fn write_script(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The absolute path of `program` on `PATH` (panics when it is missing).
pub fn which(program: &str) -> PathBuf {
    on_path(program).unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// The path of `program` on `PATH`, if it is there.
pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// One configuration module.nix renders (tests/system/rendered/NAME.txt):
/// its parts, each `=== KIND NAME` and its text.
pub struct Rendered {
    /// (kind, name, text) of each part.
    pub parts: Vec<(String, String, String)>,
}

impl Rendered {
    /// `DIR/VARIANT.txt` (as tests/system/render.sh writes them).
    pub fn load(dir: &Path, variant: &str) -> Rendered {
        let file = dir.join(format!("{variant}.txt"));
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let mut parts: Vec<(String, String, String)> = Vec::new();
        for line in text.split_inclusive('\n') {
            if let Some(head) = line.strip_prefix("=== ") {
                let head = head.trim_end();
                let (kind, name) = head.split_once(' ').unwrap_or((head, ""));
                parts.push((kind.to_string(), name.to_string(), String::new()));
            } else if let Some(last) = parts.last_mut() {
                last.2.push_str(line);
            } else {
                panic!("{}: text before the first === line", file.display());
            }
        }
        Rendered { parts }
    }

    pub fn of_kind(&self, kind: &str) -> impl Iterator<Item = (&str, &str)> {
        let kind = kind.to_string();
        let parts = self.parts.iter().filter(move |(k, _, _)| *k == kind);
        parts.map(|(_, n, t)| (n.as_str(), t.as_str()))
    }

    pub fn part(&self, kind: &str) -> &str {
        self.of_kind(kind).next().map_or("", |(_, t)| t)
    }

    pub fn unit(&self, name: &str) -> &str {
        let unit = self.of_kind("unit").find(|(n, _)| *n == name);
        unit.unwrap_or_else(|| panic!("no unit {name} rendered")).1
    }

    /// The first `Key=` value of the service unit.
    pub fn service_value(&self, key: &str) -> Option<String> {
        let service = self.unit("nix-post-build-hook-queue.service");
        Some(line_after(service, &format!("{key}="))?.to_string())
    }

    /// The config file the service's ExecStart names.
    pub fn config_file(&self) -> (&str, &str) {
        let file = self.of_kind("file").find(|(n, _)| n.ends_with(".conf"));
        file.expect("a rendered config file")
    }

    /// The value of `key` in the rendered config file.
    pub fn setting(&self, key: &str) -> Option<&str> {
        line_after(self.config_file().1, &format!("{key} = "))
    }

    /// The user the service runs as.
    pub fn user(&self) -> String {
        self.service_value("User").expect("User= in the service")
    }
}

/// The fact `name` of tests/system/rendered/checks.txt (what render.nix
/// evaluated from module.nix), as written there.
pub fn rendered_check(name: &str) -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/system/rendered/checks.txt");
    let checks = fs::read_to_string(&file).expect("tests/system/rendered/checks.txt");
    let fact = line_after(&checks, &format!("{name} = "));
    fact.unwrap_or_else(|| panic!("checks.txt has no {name}"))
        .to_string()
}

/// The rest of the first line of `text` that starts with `prefix`.
pub fn line_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(prefix))
}

/// A wrapper nix: a directory with `nix` and `nix-store` scripts (the
/// daemon takes `nix-store` from beside its `nix` setting) that record
/// every call's argv, run a test's shell prelude, and then `exec` the real
/// program, except that `nix copy`, for the targets named by these files
/// in the directory (the file's text is a part of the `--to` URL; an empty
/// file names every target):
///
/// - `hold`: waits while the file exists (an upload in flight);
/// - `fail`: fails (`fake nix: injected failure`);
/// - `poison`: fails for paths named `*-npbhq-poison-*`
///   (`fake nix: refusing a poison path`).
///
/// Each `nix copy` also appends its pid to `copy.pids` and writes its
/// environment to `copy.env`. Before the prelude the scripts run shell
/// builtins only, so the prelude sees the process as it was started. On
/// drop, held copies are let go and killed.
#[derive(Debug)]
pub struct FakeNix {
    dir: PathBuf,
    /// Processes of this test carry this in their command line.
    marker: String,
    /// The store directory with a trailing `/`.
    store: String,
}

impl FakeNix {
    /// A wrapper that runs the real nix unless its files say otherwise.
    pub fn new(env: &NixEnv) -> FakeNix {
        FakeNix::with_preludes(env, "", "")
    }

    /// A wrapper that runs `nix_prelude` (shell, with the call's `"$@"`)
    /// before it goes on in `nix`, and `store_prelude` in `nix-store`.
    pub fn with_preludes(env: &NixEnv, nix_prelude: &str, store_prelude: &str) -> FakeNix {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = env.root().join(format!("fake-nix-{n}"));
        fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        for (prog, prelude) in [("nix", nix_prelude), ("nix-store", store_prelude)] {
            let script = format!(
                "#!/bin/sh\n\
                 # fake nix: the real {prog}, steered by the files in {d}\n\
                 # One call's record at a time: the targets' lanes call nix at once.\n\
                 {{ flock 9; for a in \"$0\" \"$@\"; do printf 'A%s\\0' \"$a\"; done; printf 'E\\0'; }} 9>> '{d}/argv.log' >&9\n\
                 {prelude}\n\
                 to=; prev=\n\
                 for a in \"$@\"; do [ \"$prev\" = --to ] && to=$a; prev=$a; done\n\
                 on() {{ [ -e '{d}'/$1 ] && case \"$to\" in *\"$(cat '{d}'/$1)\"*) return 0;; esac; return 1; }}\n\
                 case \" $* \" in *' copy '*)\n\
                 \x20   echo $$ >> '{d}/copy.pids'\n\
                 \x20   env > '{d}/copy.env'\n\
                 \x20   while on hold; do sleep 0.05; done\n\
                 \x20   if on fail; then echo 'fake nix: injected failure' >&2; exit 1; fi\n\
                 \x20   if on poison; then case \" $* \" in *-npbhq-poison-*)\n\
                 \x20       echo 'fake nix: refusing a poison path' >&2; exit 1;; esac; fi;;\n\
                 esac\n\
                 exec '{}' \"$@\"\n",
                which(prog).display()
            );
            write_script(&dir.join(prog), &script);
        }
        FakeNix {
            marker: env.root().display().to_string(),
            store: format!("{}/", env.store_dir().display()),
            dir,
        }
    }

    /// A wrapper whose `nix` never returns (a cache that accepts and never
    /// answers) and whose `nix-store` prints nothing (every path valid):
    /// a daemon's queue stays full.
    pub fn hang(env: &NixEnv) -> FakeNix {
        FakeNix::with_preludes(env, "exec sleep 900", "exit 0")
    }

    pub fn nix(&self) -> String {
        self.dir.join("nix").display().to_string()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `what` (`hold`, `fail`, `poison`) apply to the targets whose
    /// URL holds `target` (`Some("")`: every target), or to none.
    pub fn set(&self, what: &str, target: Option<&str>) {
        let f = self.dir.join(what);
        match target {
            Some(t) => fs::write(f, t).unwrap(),
            None => drop(fs::remove_file(f)),
        }
    }

    /// `set("fail" / "poison" / "hold", ...)` for every target.
    pub fn set_fail(&self, on: bool) {
        self.set("fail", on.then_some(""));
    }

    pub fn set_poison(&self, on: bool) {
        self.set("poison", on.then_some(""));
    }

    pub fn set_hold(&self, on: bool) {
        self.set("hold", on.then_some(""));
    }

    /// Every recorded call's argv (the program first).
    pub fn calls(&self) -> Vec<Vec<String>> {
        let data = fs::read(self.dir.join("argv.log")).unwrap_or_default();
        let mut calls = Vec::new();
        let mut cur = Vec::new();
        for tok in data.split(|&b| b == 0).filter(|t| !t.is_empty()) {
            match tok[0] {
                b'A' => cur.push(String::from_utf8_lossy(&tok[1..]).into_owned()),
                b'E' => calls.push(std::mem::take(&mut cur)),
                _ => panic!("bad argv.log token {:?}", String::from_utf8_lossy(tok)),
            }
        }
        calls
    }

    /// The recorded `nix copy` calls (`copy`) and `nix store sign` calls
    /// (`sign`), in order, as `(verb, the --to URL, the store paths)`.
    pub fn uploads(&self) -> Vec<(&'static str, String, Vec<String>)> {
        let upload = |c: Vec<String>| {
            let verb = ["copy", "sign"]
                .into_iter()
                .find(|v| c.iter().any(|a| a == v))?;
            let to = c.iter().skip_while(|a| *a != "--to").nth(1);
            let paths = c.iter().filter(|a| a.starts_with(&self.store));
            Some((
                verb,
                to.cloned().unwrap_or_default(),
                paths.cloned().collect(),
            ))
        };
        self.calls().into_iter().filter_map(upload).collect()
    }

    /// How many `nix copy` calls to targets whose URL holds `target` named
    /// `path`.
    pub fn copies_of(&self, target: &str, path: &Path) -> usize {
        let p = path.display().to_string();
        self.uploads()
            .iter()
            .filter(|(v, to, paths)| *v == "copy" && to.contains(target) && paths.contains(&p))
            .count()
    }

    pub fn copy_pids(&self) -> Vec<u32> {
        let pids = fs::read_to_string(self.dir.join("copy.pids")).unwrap_or_default();
        pids.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// True if `pid` is a live (not zombie) process of this test.
    pub fn is_alive(&self, pid: u32) -> bool {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        matches!(state, Some(Some(c)) if c != 'Z')
            && String::from_utf8_lossy(&cmdline).contains(&self.marker)
    }
}

impl Drop for FakeNix {
    fn drop(&mut self) {
        // A failed test must not leave a held `nix copy` behind.
        self.set_hold(false);
        for pid in self.copy_pids() {
            if self.is_alive(pid) {
                kill_tree(pid);
            }
        }
    }
}

/// A daemon uploading to a `file://` cache through a [`FakeNix`] that holds
/// every copy, with one built path enqueued and its copy running: the
/// daemon, the wrapper (`set_hold(false)` lets copies go), the cache's URL
/// for reading, and the path.
pub fn daemon_with_a_held_copy(env: &NixEnv, tag: &str) -> (Daemon, FakeNix, String, PathBuf) {
    let (upload, read) = file_cache(env, "cache");
    let w = FakeNix::new(env);
    w.set_hold(true);
    let d = Daemon::start(env, &[("upload-to", &upload), ("nix", &w.nix())]);
    let path = env.build_paths(1, tag).remove(0);
    assert_eq!(d.request(&format!("enqueue {}", path.display())), "ok 1");
    wait_until(Duration::from_secs(30), "copy held", || {
        !w.copy_pids().is_empty()
    });
    (d, w, read, path)
}

/// A daemon with two `upload-to` targets, the `file://` caches `cache-a`
/// and `cache-b`, and a [`FakeNix`] as its nix (`w.set("fail",
/// Some("cache-b"))` takes one down), with `extra` settings: the daemon,
/// the wrapper, and each cache's (upload URL, URL for reading).
pub fn two_targets(
    env: &NixEnv,
    extra: &[(&str, &str)],
) -> (Daemon, FakeNix, [(String, String); 2]) {
    let caches = [file_cache(env, "cache-a"), file_cache(env, "cache-b")];
    let w = FakeNix::new(env);
    let nix = w.nix();
    let mut config = vec![
        ("upload-to", caches[0].0.as_str()),
        ("upload-to", caches[1].0.as_str()),
        ("nix", nix.as_str()),
    ];
    config.extend_from_slice(extra);
    (Daemon::start(env, &config), w, caches)
}

pub fn show(o: &Output) -> String {
    format!(
        "{}; stdout: {:?}; stderr: {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd` (stdout and stderr read as they come) to its exit; panics
/// (after killing it and what it started) if it still runs after `within`.
pub fn run_to_exit(cmd: &mut Command, within: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    fn drain(mut r: impl std::io::Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    }
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let exited = poll(within, 20, || child.try_wait().expect("try_wait"));
    if exited.is_none() {
        kill_tree(child.id());
    }
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let status = child.wait().expect("wait");
    let out = Output {
        status,
        stdout,
        stderr,
    };
    if exited.is_none() {
        panic!("{cmd:?} still ran after {within:?}: {}", show(&out));
    }
    out
}

/// One request on a fresh connection to `socket`: the final reply line
/// (`ok ...`/`err ...`), or Err when the daemon is not there or the
/// connection breaks (30 s timeouts).
pub fn try_ask(socket: &Path, line: &str) -> Result<String, String> {
    Ok(exchange(socket, line)?.pop().unwrap_or_default())
}

/// Sends `line` on a fresh connection to `socket` and reads every reply
/// line up to and including the final `ok`/`err` line (30 s timeouts).
fn exchange(socket: &Path, line: &str) -> Result<Vec<String>, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    let t = Some(Duration::from_secs(30));
    s.set_read_timeout(t).map_err(|e| e.to_string())?;
    s.set_write_timeout(t).map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut r = BufReader::new(s);
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).map_err(|e| format!("read: {e}"))? == 0 {
            return Err(format!("connection closed without a final line: {lines:?}"));
        }
        let l = l.trim_end_matches(['\n', '\r']).to_string();
        let last = l == "ok" || l == "err" || l.starts_with("ok ") || l.starts_with("err ");
        lines.push(l);
        if last {
            return Ok(lines);
        }
    }
}

/// [`try_ask`] that panics on an error.
pub fn ask(socket: &Path, line: &str) -> String {
    try_ask(socket, line).unwrap_or_else(|e| panic!("{line:?} to {}: {e}", socket.display()))
}

// --- fixtures added by t-faults

/// One system call of an `strace -f` log: its thread, name, arguments (as
/// strace shows them), return value (None while unfinished), and `end`: the
/// index of the first call that started after it returned.
#[derive(Debug)]
pub struct Call {
    pub pid: String,
    pub name: String,
    pub args: String,
    pub ret: Option<String>,
    pub end: usize,
}

impl Call {
    /// The first argument (a descriptor, for the calls traced here).
    pub fn fd(&self) -> &str {
        self.args.split([',', ' ', ')']).next().unwrap_or("")
    }

    /// The text a write-like call starts writing (escaped as strace shows it).
    pub fn text(&self) -> &str {
        self.args.split_once('"').map_or("", |(_, t)| t)
    }

    /// True when the call returned 0.
    pub fn ok(&self) -> bool {
        self.ret.as_deref() == Some("0")
    }
}

/// The calls of an `strace -f` log, in the order they started; an
/// unfinished call gets its return value from its `<... NAME resumed>` line.
pub fn strace_calls(log: &str) -> Vec<Call> {
    let mut out: Vec<Call> = Vec::new();
    for line in log.lines() {
        let Some((pid, call)) = line.trim_start().split_once(char::is_whitespace) else {
            continue;
        };
        let call = call.trim_start();
        let ret = call
            .rsplit_once(" = ")
            .filter(|_| !call.ends_with("<unfinished ...>"))
            .and_then(|(_, r)| r.split_whitespace().next())
            .map(str::to_string);
        let end = out.len();
        if let Some(resumed) = call.strip_prefix("<... ") {
            let name = resumed.split(' ').next().unwrap_or("");
            let started = out
                .iter_mut()
                .rev()
                .find(|c| c.pid == pid && c.name == name && c.ret.is_none());
            if let Some(c) = started {
                (c.ret, c.end) = (ret, end);
            }
        } else if let Some((name, args)) = call.split_once('(') {
            let end = end + 1;
            let (pid, name, args) = (pid.to_string(), name.to_string(), args.to_string());
            out.push(Call {
                pid,
                name,
                args,
                ret,
                end,
            });
        }
    }
    out
}

/// True when a call in `calls[from..to]` is a successful fsync of a
/// descriptor on the directory `dir`: one of `fds`, or one opened on its
/// path before that call.
pub fn dir_synced(calls: &[Call], from: usize, to: usize, dir: &str, fds: &[&str]) -> bool {
    let quoted = format!("\"{dir}\"");
    let on_dir = |c: &Call| c.name.starts_with("open") && c.args.contains(&quoted);
    let opened = |i: usize, fd: &str| {
        let by_path = calls[..i]
            .iter()
            .any(|c| on_dir(c) && c.ret.as_deref() == Some(fd));
        by_path || fds.contains(&fd)
    };
    let synced = |(i, c): (usize, &Call)| c.name == "fsync" && c.ok() && opened(i, c.fd());
    calls.iter().enumerate().take(to).skip(from).any(synced)
}

/// `strace -f -qq -s 4096 -o trace -e trace=CALLS`; add the program.
pub fn strace(trace: &Path, calls: &str) -> Command {
    let mut c = Command::new(which("strace"));
    c.args(["-f", "-qq", "-s", "4096", "-o"])
        .arg(trace)
        .args(["-e", &format!("trace={calls}")]);
    c
}

/// Starts `d`'s daemon (stopped) with `strace` (see [`strace`]) before
/// it, its output in its log, and waits until it accepts.
pub fn spawn_under(env: &NixEnv, d: &Daemon, mut strace: Command) -> Child {
    let log = fs::File::create(d.log_path()).unwrap();
    strace
        .arg(daemon_bin())
        .args(["serve", "--config"])
        .arg(d.config_path())
        .env_remove("NIX_REMOTE")
        .env_remove("NIX_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    env.apply_env(&mut strace);
    let child = strace.spawn().unwrap();
    wait_until_diag(
        DAEMON_START_TIMEOUT * 3,
        "the daemon under strace to accept",
        || UnixStream::connect(d.socket()).is_ok(),
        || d.log(),
    );
    child
}

/// Runs a daemon with `config` under strace tracing `calls`, calls `during`
/// with it, stops it (SIGTERM to all, so that strace writes out its log)
/// and returns the calls.
pub fn under_strace(
    env: &NixEnv,
    config: &[(&str, &str)],
    calls: &str,
    during: impl FnOnce(&Daemon),
) -> Vec<Call> {
    let d = Daemon::new_stopped(env, config, NO_ENV);
    let trace = d.dir().join("strace.log");
    let mut child = spawn_under(env, &d, strace(&trace, calls));
    during(&d);
    signal_pids("TERM", &descendants(child.id()));
    exit_of(
        &mut child,
        Duration::from_secs(30),
        "the daemon under strace",
    );
    strace_calls(&fs::read_to_string(&trace).unwrap())
}

/// Waits for `child` (`what`) to exit; kills it (and what it started) and
/// panics when it runs longer than `within`.
pub fn exit_of(child: &mut Child, within: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > within {
            kill_tree(child.id());
            panic!("{what} still ran after {within:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A tmpfs or a bind mount for one test; unmounted (lazily) on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    /// A tmpfs of `size` at `dir`.
    pub fn tmpfs(dir: &Path, size: &str) -> Mount {
        fs::create_dir_all(dir).unwrap();
        let size = format!("size={size}");
        mount(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
                .arg(dir),
        );
        Mount(dir.to_path_buf())
    }

    /// A read-only view of `src` at `dst`.
    pub fn bind_read_only(src: &Path, dst: &Path) -> Mount {
        fs::create_dir_all(dst).unwrap();
        mount(Command::new("mount").arg("--bind").arg(src).arg(dst));
        let m = Mount(dst.to_path_buf());
        mount(
            Command::new("mount")
                .args(["-o", "remount,ro,bind"])
                .arg(dst),
        );
        m
    }
}

/// Runs a `mount` command, which must succeed (it needs root).
fn mount(cmd: &mut Command) {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?} (needs root): {}", show(&o));
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg("-l").arg(&self.0));
    }
}

/// Fills the file system holding `file` by writing to it until ENOSPC.
pub fn fill(file: &Path) {
    let mut f = fs::File::create(file).unwrap();
    let chunk = vec![0u8; 4096];
    for _ in 0..100_000 {
        match f.write(&chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => return,
            Err(e) => panic!("filling {}: {e}", file.display()),
        }
    }
    panic!("{} never filled up", file.display());
}

/// Serialises useradd/userdel within a test binary (they lock /etc/passwd).
static USERDB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Environment variables for a command run as a [`User`].
pub type Vars = [(String, OsString)];

/// A throwaway user without home or login shell, or (see [`User::group`])
/// a group, made with `useradd` or `groupadd` (so the test needs root, as
/// CI runs) and removed on drop; a group's gid is its `uid`.
pub struct User {
    pub name: String,
    pub uid: u32,
    del: &'static str,
}

impl User {
    /// A user in the supplementary `groups` (comma-separated, or "").
    pub fn new(letter: char, groups: &str) -> User {
        let add = format!("useradd -M -s /usr/sbin/nologin -G {groups}");
        User::add(letter, &add, "passwd", "userdel")
    }

    /// A group.
    pub fn group(letter: char) -> User {
        User::add(letter, "groupadd", "group", "groupdel")
    }

    fn add(letter: char, add: &str, db: &str, del: &'static str) -> User {
        let me = run_ok(Command::new("id").arg("-u"));
        assert_eq!(me.trim(), "0", "this test makes users: it needs root");
        let nanos = UNIX_EPOCH.elapsed().map_or(0, |d| d.subsec_nanos());
        let id = (std::process::id() % 0xfff, nanos % 0xfffff);
        let name = format!("npbhq-{letter}{:x}{:05x}", id.0, id.1);
        User::admin(&format!("{add} {name}"));
        let mut user = User { name, uid: 0, del };
        let entry = run_ok(Command::new("getent").args([db, &user.name]));
        user.uid = entry.split(':').nth(2).unwrap().parse().unwrap();
        user
    }

    /// Runs a user-database command line (words split at spaces), retried
    /// while another test binary holds the lock.
    fn admin(cmd: &str) {
        let _g = USERDB.lock().unwrap_or_else(|e| e.into_inner());
        let args: Vec<&str> = cmd.split(' ').collect();
        let mut last = String::new();
        for _ in 0..50 {
            let o = run(Command::new(args[0]).args(&args[1..]));
            if o.status.success() {
                return;
            }
            last = show(&o);
            thread::sleep(Duration::from_millis(200));
        }
        panic!("{cmd} failed: {last}");
    }

    /// `program` as this user (with its groups), with a clean environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("setpriv");
        let id = self.name.as_str();
        c.args(["--reuid", id, "--regid", id, "--init-groups", "--"])
            .arg(program)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    }

    /// [`User::command`] for a copy of `program` in `root/bin`, where every
    /// user may run it. Copied by `cp`: a file this process held open for
    /// writing could go into a child another test forks meanwhile (then
    /// `exec` fails: text file busy).
    pub fn exe(&self, root: &Path, program: &Path) -> Command {
        let bin = root.join("bin");
        fs::create_dir_all(&bin).unwrap();
        for d in [root, &bin] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let copy = bin.join(program.file_name().unwrap());
        if !copy.exists() {
            run_ok(Command::new("cp").arg(program).arg(&copy));
        }
        let mode = |d: &Path| fs::metadata(d).unwrap().permissions().mode();
        let closed = copy.ancestors().find(|d| mode(d) & 0o001 == 0);
        assert_eq!(closed, None, "closed to other users: use NPBHQ_TEST_TMP");
        self.command(copy)
    }

    /// `post-build-hook-queue ARGS` (split at spaces) as this user, to its
    /// exit (bounded: a daemon that starts after all must not hold the test).
    pub fn cli(&self, root: &Path, args: &str, vars: &Vars) -> Output {
        let mut c = self.exe(root, &daemon_bin());
        c.args(args.split(' ')).envs(vars.iter().cloned());
        run_to_exit(&mut c, Duration::from_secs(60))
    }

    /// `serve ARGS` as this user, its stderr to `root/NAME.log`; returns
    /// once the socket `socket` is there.
    pub fn serve(&self, root: &Path, args: &[&str], vars: &Vars, socket: &Path) -> Running {
        let mut c = self.exe(root, &daemon_bin());
        let log = root.join(format!("{}.log", self.name));
        c.arg("serve").args(args).envs(vars.iter().cloned());
        c.stdin(Stdio::null()).stdout(Stdio::null());
        let mut child = Running(c.stderr(fs::File::create(&log).unwrap()).spawn().unwrap());
        let what = format!("the daemon of {} to make {}", self.name, socket.display());
        let log = || fs::read_to_string(&log).unwrap_or_default();
        let up = || {
            let ended = child.0.try_wait().unwrap();
            assert!(ended.is_none(), "{what}: ended {ended:?}\n{}", log());
            socket.exists()
        };
        wait_until_diag(Duration::from_secs(30), &what, up, log);
        child
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _g = USERDB.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new(self.del).arg(&self.name).output();
    }
}

/// A directory `name` in `parent` (made if need be) of user and group
/// `uid`, with `mode`.
pub fn owned_dir(parent: &Path, name: &str, uid: u32, mode: u32) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
    dir
}

/// A process killed, with its children, on drop (before the user it may
/// run as is removed, when made after it). One already waited for is left
/// alone: its pid may be another process's by then.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            kill_tree(self.0.id());
            let _ = self.0.wait();
        }
    }
}

/// Asserts that `o` (what `ctx` ran) ended with `code` and wrote one line to
/// stderr; returns that line.
pub fn one_line(o: &Output, code: i32, ctx: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{ctx}: {}", show(o));
    assert_eq!(err.lines().count(), 1, "{ctx}: one line: {err:?}");
    err
}

/// Root's hook handing over `out_paths`, with `socket` and `spool`.
pub fn root_hook(socket: &Path, spool: &Path, out_paths: &str) -> Command {
    let mut c = Command::new(hook_bin());
    c.env("NPBHQ_SOCKET", socket)
        .env("NPBHQ_SPOOL_DIR", spool)
        .env("OUT_PATHS", out_paths)
        .env("DRV_PATH", "");
    c
}

/// A process of uid `uid` listens at `socket`: root's hook (handing over
/// `paths[0]`) refuses it in one line naming that uid, spools the paths to
/// `spool` and exits 0; root's `status` and `enqueue` (of `paths[1]`) exit
/// 2 with one line naming the socket and the uid.
pub fn assert_root_refuses(socket: &Path, uid: u32, spool: &Path, paths: [&str; 2]) {
    let said = one_line(&run(&mut root_hook(socket, spool, paths[0])), 0, "hook");
    let (sock, uid) = (socket.display().to_string(), format!("uid {uid}"));
    let refused = said.starts_with(&format!("refusing the socket {sock}"));
    let why = said.contains(&format!("runs as {uid}")) && said.contains("spooled the paths to");
    assert!(refused && why, "{said:?}");
    assert_eq!(spooled(spool), [format!("enqueue {}\n", paths[0])]);
    for args in [vec!["status"], vec!["enqueue", paths[1]]] {
        let mut cli = Command::new(daemon_bin());
        cli.arg(args[0]).args(["--socket", &sock]).args(&args[1..]);
        let err = one_line(&run(&mut cli), 2, &format!("{args:?}"));
        let why = err.contains("refusing the socket") && err.contains(&sock);
        assert!(why && err.contains(&uid), "{args:?}: {err:?}");
    }
}

/// The contents of the files in the spool directory `dir` (none when it
/// does not exist).
pub fn spooled(dir: &Path) -> Vec<String> {
    fs::read_dir(dir).map_or(Vec::new(), |r| {
        r.map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    })
}

/// Waits until every one of `paths` is in the store at `url`, signed by
/// the key `pk` (see [`NixEnv::verify_in_cache`]).
pub fn wait_verified(env: &NixEnv, url: &str, pk: &str, paths: &[PathBuf], what: &str) {
    wait_ok(UPLOAD_TIMEOUT, what, || env.verify_in_cache(url, pk, paths));
}
