//! Operating the daemon (issue 4): the admin commands `status` (human and
//! `--json`), `wait`, `retry` and `enqueue -`, a missing daemon, systemd
//! socket activation and readiness, journald priorities, the metrics file,
//! and stopping with SIGTERM.
//!
//! Every test runs the real daemon against real Nix in a private store. A
//! failing or slow cache is simulated with `nix-fail-wrapper`: a shell script
//! that runs the real `nix`, except that `nix copy` waits while a `hold` file
//! exists and then fails while a `fail` file exists. Timeouts in
//! `wait_until` are correctness bounds, never speed assertions.

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------
/// A well-formed store path that does not exist: the daemon acknowledges it
/// and then drops it ("no longer valid in the store").
fn missing_path(env: &NixEnv, name: &str) -> String {
    format!(
        "{}/0123456789abcdfghijklmnpqrsvwxyz-{name}",
        env.store_dir().display()
    )
}

/// `nix-fail-wrapper`: a directory with a `nix` script that runs the real
/// nix, except that `nix copy` records its pid, waits while `hold` exists,
/// then fails while `fail` exists; and a `nix-store` link to the real one
/// (the daemon takes `nix-store` from beside `nix`).
struct NixFailWrapper {
    dir: PathBuf,
    /// Processes of this test carry this in their command line.
    marker: String,
}

impl NixFailWrapper {
    fn new(env: &NixEnv) -> NixFailWrapper {
        let dir = env.root().join("nix-fail-wrapper");
        fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let script = format!(
            "#!/bin/sh\n\
             # nix-fail-wrapper: the real nix, except that `nix copy` waits while\n\
             # {d}/hold exists, then fails while {d}/fail exists.\n\
             case \" $* \" in\n\
             *' copy '*)\n\
             \x20   echo $$ >> '{d}/copy.pids'\n\
             \x20   env > '{d}/copy.env'\n\
             \x20   while [ -e '{d}/hold' ]; do sleep 0.05; done\n\
             \x20   if [ -e '{d}/fail' ]; then\n\
             \x20       echo 'nix-fail-wrapper: injected failure' >&2\n\
             \x20       exit 1\n\
             \x20   fi;;\n\
             esac\n\
             exec '{}' \"$@\"\n",
            which("nix").display()
        );
        fs::write(dir.join("nix"), script).unwrap();
        fs::set_permissions(dir.join("nix"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(which("nix-store"), dir.join("nix-store")).unwrap();
        NixFailWrapper {
            marker: env.root().display().to_string(),
            dir,
        }
    }

    /// The value for the daemon's `nix` setting.
    fn nix(&self) -> String {
        self.dir.join("nix").display().to_string()
    }

    fn flag(&self, name: &str, on: bool) {
        let f = self.dir.join(name);
        if on {
            fs::write(f, "").unwrap();
        } else {
            let _ = fs::remove_file(f);
        }
    }

    /// While set, `nix copy` fails.
    fn set_fail(&self, on: bool) {
        self.flag("fail", on);
    }

    /// While set, `nix copy` waits (the upload is "in flight").
    fn set_hold(&self, on: bool) {
        self.flag("hold", on);
    }

    /// Pids of the `nix copy` calls so far.
    fn copy_pids(&self) -> Vec<u32> {
        fs::read_to_string(self.dir.join("copy.pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// True if `pid` is a live (not zombie) process of this test.
    fn is_alive(&self, pid: u32) -> bool {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        matches!(state, Some(Some(c)) if c != 'Z')
            && String::from_utf8_lossy(&cmdline).contains(&self.marker)
    }
}

impl Drop for NixFailWrapper {
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

/// What a CLI call did.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout:\n{}--- stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl From<Output> for Ran {
    fn from(o: Output) -> Ran {
        Ran {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Longest any command of these tests may run: a `wait` that never
/// returns (dropping broke, say) fails its test instead of hanging it.
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// The output of `child` once it ends; kills it (and what it started) and
/// panics when it outlasts [`COMMAND_DEADLINE`].
fn finish_within_deadline(child: Child, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_DEADLINE) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            kill_tree(pid);
            panic!("{what} did not end within {COMMAND_DEADLINE:?}")
        }
    }
}

/// Runs `cmd` with `input` (if any) on stdin, within [`COMMAND_DEADLINE`].
fn run_bounded(cmd: &mut Command, input: Option<&str>) -> Output {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        use std::io::Write;
        stdin.write_all(input.as_bytes()).unwrap();
    }
    finish_within_deadline(child, &format!("{cmd:?}"))
}

/// Runs `post-build-hook-queue ARGS... --socket SOCKET`.
fn cli(d: &Daemon, args: &[&str]) -> Ran {
    let mut c = d.cli_cmd();
    c.args(args).arg("--socket").arg(d.socket());
    run_bounded(&mut c, None).into()
}

/// Runs the CLI with `input` on stdin.
fn cli_stdin(d: &Daemon, args: &[&str], input: &str) -> Ran {
    let mut c = d.cli_cmd();
    c.args(args).arg("--socket").arg(d.socket());
    run_bounded(&mut c, Some(input)).into()
}

/// `status --json`, checked to be one JSON object on one line.
fn status_json(d: &Daemon) -> Json {
    let r = cli(d, &["status", "--json"]);
    assert_eq!(r.code, Some(0), "status --json: {r:?}\nlog:\n{}", d.log());
    assert_eq!(
        r.stdout.lines().count(),
        1,
        "status --json prints one line: {r:?}"
    );
    let j = Json::parse(&r.stdout).unwrap_or_else(|e| panic!("invalid JSON ({e}): {r:?}"));
    assert!(matches!(j, Json::Obj(_)), "not an object: {r:?}");
    j
}

/// A number field of the status object.
fn num(j: &Json, key: &str) -> f64 {
    j.get(key)
        .and_then(Json::as_f64)
        .unwrap_or_else(|| panic!("{key} is not a number in {j:?}"))
}

/// Human `status`; panics unless it exits 0.
fn status_text(d: &Daemon) -> String {
    let r = cli(d, &["status"]);
    assert_eq!(r.code, Some(0), "status: {r:?}\nlog:\n{}", d.log());
    r.stdout
}

/// The value after `label:` in the human status.
fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(label)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
}

/// Every field `status --json` documents, in order.
const JSON_FIELDS: &[&str] = &[
    "version",
    "uptime_seconds",
    "queued",
    "in_flight",
    "uploaded",
    "dropped",
    "failed_calls",
    "backing_off",
    "oldest_queued_seconds",
    "upload_seconds_sum",
    "upload_batches",
    "signing",
    "target",
    "backoff",
];

/// Kills a process tree on drop (for daemons the test spawns itself).
struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// SIGTERM, then the exit status (bounded wait).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.0.take().expect("running");
        run_ok(Command::new("kill").args(["-TERM", &c.id().to_string()]));
        let mut status = None;
        wait_until(Duration::from_secs(30), "daemon exit after SIGTERM", || {
            status = c.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            kill_tree(c.id());
            let _ = c.wait();
        }
    }
}

/// Reads a child's stdout into a shared buffer on a thread.
fn collect_stdout(child: &mut Child) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut out = child.stdout.take().unwrap();
    let b = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = out.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// Parses Prometheus text exposition (version 0.0.4) strictly enough to
/// catch what node-exporter's textfile collector rejects: every sample is
/// `name value` with a float value, belongs to a family declared with one
/// `# HELP` and one `# TYPE` before its samples (summary samples end in
/// `_sum`/`_count`), no sample twice, the file ends with a newline.
fn parse_prometheus(text: &str) -> Result<BTreeMap<String, f64>, String> {
    fn valid_name(n: &str) -> bool {
        let mut cs = n.chars();
        matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    if !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    let mut help = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut seen_families = HashSet::new();
    let mut samples = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest
                .split_once(' ')
                .ok_or_else(|| at("HELP without text"))?;
            if !valid_name(name) || doc.trim().is_empty() || !help.insert(name.to_string()) {
                return Err(at("bad or repeated HELP"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without type"))?;
            if !valid_name(name)
                || !["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind)
                || seen_families.contains(name)
                || types.insert(name.to_string(), kind.to_string()).is_some()
            {
                return Err(at("bad, late or repeated TYPE"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (name, value) = match parts.as_slice() {
            [n, v] => (*n, *v),
            [n, v, ts] if ts.parse::<i64>().is_ok() => (*n, *v),
            _ => return Err(at("expected `name value`")),
        };
        if !valid_name(name) {
            return Err(at("bad metric name"));
        }
        let value: f64 = value.parse().map_err(|_| at("value is not a float"))?;
        let family = if types.contains_key(name) {
            name.to_string()
        } else {
            let base = name
                .strip_suffix("_sum")
                .or_else(|| name.strip_suffix("_count"))
                .ok_or_else(|| at("sample before its TYPE"))?;
            match types.get(base).map(String::as_str) {
                Some("summary" | "histogram") => base.to_string(),
                _ => return Err(at("_sum/_count of a family that is not a summary")),
            }
        };
        if !help.contains(&family) {
            return Err(at("no HELP for this family"));
        }
        seen_families.insert(family);
        if samples.insert(name.to_string(), value).is_some() {
            return Err(at("sample repeated"));
        }
    }
    if let Some(f) = types.keys().find(|f| !seen_families.contains(*f)) {
        return Err(format!("family {f} has a TYPE but no samples"));
    }
    Ok(samples)
}

const M: &str = "nix_post_build_hook_queue_";

// ---------------------------------------------------------------------------
// status, retry, wait
// ---------------------------------------------------------------------------

/// The status fields move as paths flow: fresh daemon; paths queued through
/// `enqueue -` fail and back off (attempts, next try, last error, oldest
/// age); `wait --timeout` gives up with exit 1; with the cache healed,
/// `retry` makes them due at once although the retry delay is an hour
/// (in flight while the copy is held; a `wait` started then returns exactly
/// when they are uploaded); then uploaded, and a dropped path makes `wait`
/// exit 1.
#[test]
fn status_fields_move_and_retry_makes_backing_off_paths_due() {
    let env = NixEnv::new("op-status");
    let (sk, pk) = env.gen_signing_key("op-status-1");
    let (upload, read) = file_cache(&env, "cache");
    let w = NixFailWrapper::new(&env);
    w.set_fail(true);
    let d = Daemon::start(
        &env,
        &[
            ("signing-key-file", &sk.display().to_string()),
            ("upload-to", &upload),
            ("nix", &w.nix()),
            ("retry-initial-delay", "3600"),
            ("retry-max-delay", "7200"),
        ],
    );

    // Fresh.
    let j = status_json(&d);
    let keys: Vec<&str> = match &j {
        Json::Obj(m) => m.iter().map(|(k, _)| k.as_str()).collect(),
        _ => unreachable!(),
    };
    assert_eq!(keys, JSON_FIELDS, "documented fields: {j:?}");
    for k in ["queued", "in_flight", "uploaded", "dropped", "backing_off"] {
        assert_eq!(num(&j, k), 0.0, "{k} at start: {j:?}");
    }
    assert_eq!(j.get("oldest_queued_seconds"), Some(&Json::Null));
    assert_eq!(j.get("signing"), Some(&Json::Bool(true)));
    assert_eq!(
        j.get("target").and_then(Json::as_str),
        Some(upload.as_str())
    );
    assert_eq!(
        j.get("version").and_then(Json::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(j.get("backoff").and_then(Json::as_array), Some(&[][..]));
    let uptime0 = num(&j, "uptime_seconds");
    let text = status_text(&d);
    assert_eq!(field(&text, "queued"), "0", "{text}");
    assert_eq!(field(&text, "signing"), "on", "{text}");
    assert_eq!(field(&text, "target"), upload, "{text}");

    // Queue two paths through stdin; the cache fails; they back off.
    let paths = env.build_paths(2, "status");
    let r = cli_stdin(&d, &["enqueue", "-"], &(strs(&paths).join("\n") + "\n"));
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.stdout, "queued 2 new path(s); 0 were already queued\n");
    wait_until_diag(
        UPLOAD_TIMEOUT,
        "both paths backing off",
        || num(&status_json(&d), "backing_off") == 2.0,
        || d.log(),
    );
    wait_until(Duration::from_secs(30), "oldest queued age >= 1", || {
        num(&status_json(&d), "oldest_queued_seconds") >= 1.0
    });
    let j = status_json(&d);
    assert_eq!(num(&j, "queued"), 2.0, "{j:?}");
    assert_eq!(num(&j, "uploaded"), 0.0, "{j:?}");
    assert!(num(&j, "failed_calls") >= 1.0, "{j:?}");
    let failed_calls = num(&j, "failed_calls");
    let backoff = j.get("backoff").and_then(Json::as_array).unwrap();
    assert_eq!(backoff.len(), 2, "{j:?}");
    for b in backoff {
        let p = b.get("path").and_then(Json::as_str).unwrap();
        assert!(strs(&paths).iter().any(|q| q == p), "{p} in {j:?}");
        assert_eq!(num(b, "attempts"), 1.0, "{j:?}");
        // Jitter puts the first retry between half and all of an hour.
        let next = num(b, "next_try_seconds");
        assert!((1000.0..=3600.0).contains(&next), "next try {next}: {j:?}");
        let err = b.get("last_error").and_then(Json::as_str).unwrap();
        assert!(
            err.contains("nix copy failed") && err.contains("nix-fail-wrapper: injected failure"),
            "{err}"
        );
    }
    let text = status_text(&d);
    assert!(
        field(&text, "queued").starts_with("2 (oldest queued "),
        "{text}"
    );
    assert_eq!(field(&text, "backing off"), "2", "{text}");
    for p in strs(&paths) {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{p}:")))
            .unwrap_or_else(|| panic!("no line for {p} in:\n{text}"));
        assert!(
            line.contains(": attempt 1 failed, next try in ")
                && line.contains("m ")
                && line.ends_with("nix-fail-wrapper: injected failure"),
            "{line}"
        );
    }
    println!(
        "status while failing:\n{text}\n{}",
        cli(&d, &["status", "--json"]).stdout
    );

    // wait gives up at its timeout with exit 1; no progress without a terminal.
    let r = cli(&d, &["wait", "--timeout", "1.5"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.stdout, "", "{r:?}");
    assert_eq!(
        r.stderr,
        "post-build-hook-queue: wait timed out after 1.5s: 2 path(s) still queued, 2 of them failing\n"
    );

    // Heal the cache but hold the copy; retry; the paths are in flight.
    w.set_fail(false);
    w.set_hold(true);
    let r = cli(&d, &["retry"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.stdout, "2 backing-off path(s) will be tried again now\n");
    wait_until_diag(
        Duration::from_secs(30),
        "both paths in flight",
        || num(&status_json(&d), "in_flight") == 2.0,
        || d.log(),
    );
    let text = status_text(&d);
    println!("status while in flight:\n{text}");
    assert_eq!(field(&text, "in flight"), "2", "{text}");
    assert_eq!(
        text.matches(": attempt 1 failed, retrying now: ").count(),
        2,
        "{text}"
    );
    let mut waiter = d
        .cli_cmd()
        .args(["wait", "--timeout", "60", "--socket"])
        .arg(d.socket())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The upload is held, so wait cannot have returned; first make sure its
    // request reached the daemon (it answers status in the meantime).
    assert_eq!(num(&status_json(&d), "queued"), 2.0);
    assert!(waiter.try_wait().unwrap().is_none(), "wait returned early");
    w.set_hold(false);
    let r: Ran = finish_within_deadline(waiter, "wait --timeout 60").into();
    assert_eq!(r.code, Some(0), "{r:?}\nlog:\n{}", d.log());
    assert_eq!(r.stdout, "all uploaded\n", "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    // wait returned, so they are in the cache now: no polling.
    env.verify_in_cache(&read, &pk, &paths)
        .unwrap_or_else(|e| panic!("wait returned before the upload: {e}"));

    let j = status_json(&d);
    assert_eq!(num(&j, "queued"), 0.0, "{j:?}");
    assert_eq!(num(&j, "in_flight"), 0.0, "{j:?}");
    assert_eq!(num(&j, "uploaded"), 2.0, "{j:?}");
    assert_eq!(num(&j, "backing_off"), 0.0, "{j:?}");
    assert_eq!(num(&j, "failed_calls"), failed_calls, "{j:?}");
    assert!(num(&j, "upload_batches") >= 1.0, "{j:?}");
    assert!(num(&j, "upload_seconds_sum") > 0.0, "{j:?}");
    assert_eq!(j.get("oldest_queued_seconds"), Some(&Json::Null));
    wait_until(Duration::from_secs(30), "uptime moves", || {
        num(&status_json(&d), "uptime_seconds") > uptime0
    });
    let r = cli(&d, &["wait"]);
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), "all uploaded\n"));
    let r = cli(&d, &["retry"]);
    assert_eq!(r.stdout, "0 backing-off path(s) will be tried again now\n");
    // `enqueue -` with nothing on stdin queues nothing and succeeds.
    let r = cli_stdin(&d, &["enqueue", "-"], "");
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.stdout, "queued 0 new path(s); 0 were already queued\n");

    // A path that is not in the store is dropped.
    let gone = missing_path(&env, "op-gone");
    assert_eq!(d.request(&format!("enqueue {gone}")), "ok 1");
    wait_until_diag(
        UPLOAD_TIMEOUT,
        "path dropped",
        || num(&status_json(&d), "dropped") == 1.0,
        || d.log(),
    );
    let text = status_text(&d);
    assert_eq!(field(&text, "dropped"), "1 since start", "{text}");
    assert_eq!(field(&text, "uploaded"), "2 since start", "{text}");
    println!("status after:\n{text}");
}

/// `wait` on a terminal shows its progress on stderr, and exits 1 when a
/// path queued before it is dropped while it waits.
#[test]
fn wait_shows_progress_on_a_terminal_and_exits_1_when_paths_are_dropped() {
    let env = NixEnv::new("op-wait");
    let (upload, read) = file_cache(&env, "cache");
    let w = NixFailWrapper::new(&env);
    w.set_hold(true);
    let d = Daemon::start(&env, &[("upload-to", &upload), ("nix", &w.nix())]);
    let good = env.build_paths(1, "wait");
    let gone = missing_path(&env, "op-wait-gone");
    // The good path's copy is held, so the missing path waits behind it.
    assert_eq!(d.request(&format!("enqueue {}", good[0].display())), "ok 1");
    wait_until(Duration::from_secs(30), "copy held", || {
        !w.copy_pids().is_empty()
    });
    assert_eq!(d.request(&format!("enqueue {gone}")), "ok 1");

    // `script` gives the command a terminal; its output comes back on our pipe.
    let cmd = format!(
        "'{}' wait --socket '{}'",
        daemon_bin().display(),
        d.socket().display()
    );
    let c = d.cli_cmd();
    let mut script = Command::new("script");
    script.args(["-q", "-e", "-f", "-c", &cmd, "/dev/null"]);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let mut child = script
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs a command on a terminal");
    let out = collect_stdout(&mut child);
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    wait_until_diag(
        Duration::from_secs(30),
        "progress on the terminal",
        || text().contains("waiting: 2 path(s) still queued, 0 of them failing"),
        text,
    );
    w.set_hold(false);
    let status = finish_within_deadline(child, "wait on a terminal").status;
    let shown = text();
    assert_eq!(status.code(), Some(1), "terminal showed:\n{shown}");
    assert!(
        shown.contains("\r\x1b[Kwaiting: 2 path(s) still queued")
            && shown.ends_with(
                "post-build-hook-queue: 1 path(s) were dropped; see the daemon's log\r\n"
            ),
        "terminal showed: {shown:?}"
    );
    println!("wait on a terminal showed: {shown:?}");
    wait_until_ok(
        UPLOAD_TIMEOUT,
        "good path uploaded",
        || {
            env.is_valid_in(&read, &good[0])
                .then_some(())
                .ok_or_else(|| "not in cache".to_string())
        },
        || d.log(),
    );
}

/// Against a cache that keeps failing: `status` (human and JSON) shows the
/// target and the errors with the URL's password and `secret-key` masked
/// (nix's own error repeats the URL), the log does not leak them either,
/// and `wait --timeout` exits 1.
#[test]
fn failing_target_is_shown_with_credentials_masked_and_wait_times_out() {
    // One download attempt: nix gives up on the dead cache at once.
    let env = NixEnv::with_conf("op-mask", "download-attempts = 1");
    let (sk, _pk) = env.gen_signing_key("op-mask-1");
    let port = free_port();
    let secret_key = sk.display().to_string();
    let target = format!(
        "http://npbhq:hunter2@127.0.0.1:{port}/cache?compression=none&secret-key={secret_key}"
    );
    let masked = format!("http://npbhq:***@127.0.0.1:{port}/cache?compression=none&secret-key=***");
    let d = Daemon::start(
        &env,
        &[
            ("upload-to", &target),
            ("retry-initial-delay", "0.05"),
            ("retry-max-delay", "0.2"),
        ],
    );
    let paths = env.build_paths(1, "mask");
    let r = cli(&d, &["enqueue", &paths[0].display().to_string()]);
    assert_eq!(r.stdout, "queued 1 new path(s); 0 were already queued\n");
    wait_until_diag(
        UPLOAD_TIMEOUT,
        "several failed attempts",
        || {
            status_json(&d)
                .get("backoff")
                .and_then(Json::as_array)
                .and_then(|b| b.first().map(|b| num(b, "attempts") >= 3.0))
                .unwrap_or(false)
        },
        || d.log(),
    );
    let text = status_text(&d);
    let json = cli(&d, &["status", "--json"]).stdout;
    let j = Json::parse(&json).unwrap();
    assert_eq!(field(&text, "target"), masked, "{text}");
    assert_eq!(field(&text, "signing"), "off", "{text}");
    assert_eq!(
        j.get("target").and_then(Json::as_str),
        Some(masked.as_str())
    );
    let err = j.get("backoff").and_then(Json::as_array).unwrap()[0]
        .get("last_error")
        .and_then(Json::as_str)
        .unwrap()
        .to_string();
    assert!(
        err.contains("nix copy failed") && err.contains("npbhq:***@127.0.0.1"),
        "the error should show nix's message, masked: {err}"
    );
    let log = d.log();
    for (what, shown) in [("status", &text), ("status --json", &json), ("log", &log)] {
        assert!(
            !shown.contains("hunter2") && !shown.contains(&secret_key),
            "{what} leaks a credential:\n{shown}"
        );
    }
    println!("status against a dead cache:\n{text}\n{json}");

    let r = cli(&d, &["wait", "--timeout", "1"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(
        r.stderr,
        "post-build-hook-queue: wait timed out after 1s: 1 path(s) still queued, 1 of them failing\n"
    );
    let r = cli(&d, &["retry"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.stdout, "1 backing-off path(s) will be tried again now\n");
}

/// Every admin command explains a missing daemon in one line and exits 2,
/// whether the socket file is missing or stale (nothing listens); usage
/// errors exit 2 too.
#[test]
fn missing_daemon_is_explained_in_one_line_with_exit_2() {
    let env = NixEnv::new("op-nodaemon");
    let d = Daemon::new_stopped(&env, NO_ENV, NO_ENV);
    let stale = env.root().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let path = missing_path(&env, "op-x");
    let commands: &[&[&str]] = &[
        &["enqueue", &path],
        &["enqueue", "-"],
        &["status"],
        &["status", "--json"],
        &["wait"],
        &["wait", "--timeout", "5"],
        &["retry"],
    ];
    for socket in [d.socket(), stale] {
        for args in commands {
            let mut c = d.cli_cmd();
            c.args(*args).arg("--socket").arg(&socket);
            let r: Ran = run(&mut c).into();
            assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
            assert_eq!(r.stdout, "", "{args:?}: {r:?}");
            assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
            assert!(
                r.stderr.starts_with(&format!(
                    "post-build-hook-queue: no daemon at {} (",
                    socket.display()
                )) && r.stderr.contains("is post-build-hook-queue running?"),
                "{args:?}: {r:?}"
            );
        }
    }
    // The socket also comes from $NPBHQ_SOCKET.
    let r: Ran = run(d.cli_cmd().arg("status")).into();
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("no daemon at {}", d.socket().display())),
        "{r:?}"
    );
    for args in [
        &["wait", "--timeout", "soon"][..],
        &["wait", "--timeout"],
        &["status", "--verbose"],
        &["retry", "now"],
        &["enqueue"],
        &["frobnicate"],
    ] {
        let r: Ran = run(d.cli_cmd().args(args)).into();
        assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
    }
}

/// An argument that is not UTF-8 (here a socket path, for every command and
/// for the daemon's own settings) is refused in one line with exit 2: no
/// abort, no connection attempt, no daemon started.
#[test]
fn a_non_utf8_argument_is_one_line_and_exit_2() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let env = NixEnv::new("op-nonutf8");
    let d = Daemon::new_stopped(&env, NO_ENV, NO_ENV);
    let bad = OsStr::from_bytes(b"/tmp/\xff");
    for args in [
        &["status", "--socket"][..],
        &["enqueue", "--socket"],
        &["wait", "--socket"],
        &["retry", "--socket"],
        &["serve", "--socket"],
        &["--socket"],
    ] {
        let r: Ran = run(d.cli_cmd().args(args).arg(bad)).into();
        assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
        assert_eq!(r.stdout, "", "{args:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.starts_with(
                "post-build-hook-queue: argument \"/tmp/\u{fffd}\" is not valid UTF-8"
            ),
            "{args:?}: {r:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// systemd: socket activation, readiness, journald
// ---------------------------------------------------------------------------

/// Starts `post-build-hook-queue serve --config CONFIG` with `listener` as
/// fd 3 and `LISTEN_FDS=1`, `LISTEN_PID=<its pid>` (and `extra` variables),
/// the way systemd does: the socket goes in as stdin, the shell moves it to
/// fd 3 and execs the daemon in its own process, so `$$` is the daemon's pid.
fn spawn_activated(
    env: &NixEnv,
    listener: UnixListener,
    config: &Path,
    log: &Path,
    listen_pid: Option<&str>,
) -> ChildGuard {
    let log = fs::File::create(log).unwrap();
    let mut c = env.cmd("/bin/sh");
    c.arg("-c")
        .arg(format!(
            "exec 3<&0 </dev/null; LISTEN_PID={} LISTEN_FDS=1 exec \"$0\" serve --config \"$1\"",
            listen_pid.unwrap_or("$$")
        ))
        .arg(daemon_bin())
        .arg(config)
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    ChildGuard(Some(c.spawn().unwrap()))
}

/// Socket activation: the daemon serves the listening socket it gets as
/// fd 3, creates no socket file of its own, uploads what comes through it,
/// keeps the LISTEN_* variables from its nix commands, and leaves the socket
/// (systemd's) in place when it stops. With a LISTEN_PID that is not its
/// own it ignores fd 3 and binds its configured socket.
#[test]
fn socket_activation_serves_the_passed_socket() {
    let env = NixEnv::new("op-activate");
    let (upload, read) = file_cache(&env, "cache");
    let w = NixFailWrapper::new(&env);
    let dir = env.root().join("activation");
    fs::create_dir_all(&dir).unwrap();
    let passed = dir.join("passed.sock");
    let own = dir.join("own.sock");
    let config = dir.join("config");
    fs::write(
        &config,
        format!(
            "socket = {}\nstate-dir = {}\nupload-to = {upload}\nnix = {}\n",
            own.display(),
            dir.join("state").display(),
            w.nix()
        ),
    )
    .unwrap();
    let log = dir.join("daemon.log");
    let listener = UnixListener::bind(&passed).unwrap();
    let mut daemon = spawn_activated(&env, listener, &config, &log, None);
    let log_text = || fs::read_to_string(&log).unwrap_or_default();

    // The listener was bound before the daemon started: this connects even
    // before the daemon accepts, and is answered once it does.
    let socket = passed.display().to_string();
    let cli_at = |args: &[&str]| -> Ran {
        let mut c = env.cmd(daemon_bin());
        c.args(args).args(["--socket", &socket]);
        run_bounded(&mut c, None).into()
    };
    let r = cli_at(&["status"]);
    assert_eq!(r.code, Some(0), "{r:?}\nlog:\n{}", log_text());
    assert!(
        log_text().contains("listening on the socket passed by systemd"),
        "{}",
        log_text()
    );
    assert!(!own.exists(), "the daemon created {}", own.display());

    let paths = env.build_paths(2, "activate");
    let mut c = env.cmd(daemon_bin());
    c.arg("enqueue")
        .args(strs(&paths))
        .args(["--socket", &socket]);
    let r: Ran = run(&mut c).into();
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = cli_at(&["wait", "--timeout", "60"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "all uploaded\n"),
        "{r:?}\nlog:\n{}",
        log_text()
    );
    for p in &paths {
        assert!(
            env.is_valid_in(&read, p),
            "{} not in the cache",
            p.display()
        );
    }
    // nix ran without the LISTEN_* variables (they were for the daemon).
    let copy_env = fs::read_to_string(w.dir.join("copy.env")).unwrap();
    assert!(copy_env.contains("NIX_STORE_DIR="), "{copy_env}");
    assert!(
        !copy_env.contains("LISTEN_FDS=") && !copy_env.contains("LISTEN_PID="),
        "nix copy inherited LISTEN_*:\n{copy_env}"
    );

    let st = daemon.terminate();
    assert!(st.success(), "exit on SIGTERM: {st}\nlog:\n{}", log_text());
    assert!(
        passed.exists(),
        "the daemon removed the socket systemd owns"
    );
    assert!(!own.exists());

    // LISTEN_PID names another process: fd 3 is not for us.
    let listener = UnixListener::bind(dir.join("other.sock")).unwrap();
    let mut daemon = spawn_activated(&env, listener, &config, &log, Some("1"));
    wait_until_diag(
        Duration::from_secs(10),
        "the daemon binds its own socket",
        || std::os::unix::net::UnixStream::connect(&own).is_ok(),
        log_text,
    );
    let mut c = env.cmd(daemon_bin());
    c.arg("status").arg("--socket").arg(&own);
    let r: Ran = run(&mut c).into();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(daemon.terminate().success());
    assert!(!own.exists(), "own socket removed on stop");
}

/// Readiness: with `NOTIFY_SOCKET` the daemon sends `READY=1` once it
/// accepts, and `STOPPING=1` on SIGTERM, then exits 0.
#[test]
fn notify_socket_gets_ready_and_stopping() {
    let env = NixEnv::new("op-notify");
    let notify_path = env.root().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let notify_env = notify_path.display().to_string();
    let mut d = Daemon::start_with_env(&env, NO_ENV, &[("NOTIFY_SOCKET", notify_env.as_str())]);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(cli(&d, &["status"]).code, Some(0));
    let st = d.stop();
    assert!(st.success(), "exit on SIGTERM: {st}\nlog:\n{}", d.log());
    let n = notify.recv(&mut buf).expect("STOPPING=1 within 30 s");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// journald: when `JOURNAL_STREAM` names the daemon's stderr, every log line
/// starts with its priority (`<6>` info, `<4>` warning, `<3>` error); when
/// it was merely inherited (stderr goes elsewhere), lines carry the level
/// as a word.
#[test]
fn journal_stream_gives_priority_prefixes_only_on_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let env = NixEnv::new("op-journal");
    let paths = env.build_paths(1, "journal");
    for journal in [true, false] {
        let dir = env.root().join(format!("journal-{journal}"));
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("sock");
        let config = dir.join("config");
        fs::write(
            &config,
            format!(
                "socket = {}\nstate-dir = {}\nupload-to = file:///dev/null/x\nretry-initial-delay = 0.05\n",
                socket.display(),
                dir.join("state").display()
            ),
        )
        .unwrap();
        let log = dir.join("daemon.log");
        let file = fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        // The stream systemd would name: this file, or some other file.
        let stream = format!("{}:{}", meta.dev(), meta.ino() + u64::from(!journal));
        let mut c = env.cmd(daemon_bin());
        c.args(["serve", "--config"])
            .arg(&config)
            .env("JOURNAL_STREAM", &stream)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let mut daemon = ChildGuard(Some(c.spawn().unwrap()));
        let log_text = || fs::read_to_string(&log).unwrap_or_default();
        wait_until_diag(
            Duration::from_secs(10),
            "socket",
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
            log_text,
        );
        let mut c = env.cmd(daemon_bin());
        c.arg("enqueue").arg(&paths[0]).arg("--socket").arg(&socket);
        assert_eq!(run(&mut c).status.code(), Some(0));
        // A failing upload: something to warn about.
        wait_until_diag(
            UPLOAD_TIMEOUT,
            "a warning",
            || log_text().contains("failed attempt"),
            log_text,
        );
        assert!(daemon.terminate().success(), "{}", log_text());
        let text = log_text();
        let prefixes: &[&str] = if journal {
            &["<3>", "<4>", "<6>"]
        } else {
            &["error: ", "warning: ", "info: "]
        };
        assert!(text.lines().count() >= 4, "{text}");
        for line in text.lines() {
            assert!(
                prefixes.iter().any(|p| line.starts_with(p)) && !line.contains("info: <"),
                "JOURNAL_STREAM on stderr: {journal}; line {line:?} in\n{text}"
            );
        }
        let warning = if journal { "<4>" } else { "warning: " };
        assert!(
            text.lines()
                .any(|l| l.starts_with(warning) && l.contains("failed attempt 1")),
            "{text}"
        );
        println!("log with JOURNAL_STREAM on stderr {journal}:\n{text}");
    }
}

// ---------------------------------------------------------------------------
// metrics
// ---------------------------------------------------------------------------

/// The metrics file is valid Prometheus text from the start, its values move
/// as paths are uploaded and dropped, and the stop writes it one last time.
#[test]
fn metrics_file_is_prometheus_text_and_moves() {
    let env = NixEnv::new("op-metrics");
    let (upload, read) = file_cache(&env, "cache");
    let metrics = env.root().join("metrics/npbhq.prom");
    fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    let mut d = Daemon::start(
        &env,
        &[
            ("upload-to", &upload),
            ("metrics-file", &metrics.display().to_string()),
        ],
    );
    let read_metrics = || -> Result<BTreeMap<String, f64>, String> {
        let text = fs::read_to_string(&metrics).map_err(|e| e.to_string())?;
        parse_prometheus(&text).map_err(|e| format!("{e}\n{text}"))
    };
    wait_until(Duration::from_secs(10), "metrics file", || metrics.exists());
    let m = read_metrics().unwrap();
    let expected = [
        "queued",
        "in_flight",
        "backing_off",
        "uploaded_total",
        "dropped_total",
        "failed_calls_total",
        "oldest_queued_age_seconds",
        "upload_duration_seconds_sum",
        "upload_duration_seconds_count",
    ];
    let names: Vec<String> = expected.iter().map(|n| format!("{M}{n}")).collect();
    assert_eq!(
        m.keys().cloned().collect::<HashSet<_>>(),
        names.iter().cloned().collect::<HashSet<_>>()
    );
    assert!(m.values().all(|v| *v == 0.0), "{m:?}");

    let paths = env.build_paths(2, "metrics");
    let gone = missing_path(&env, "op-metrics-gone");
    let r = cli(
        &d,
        &[
            "enqueue",
            &paths[0].display().to_string(),
            &paths[1].display().to_string(),
            &gone,
        ],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    wait_until_ok(
        UPLOAD_TIMEOUT,
        "metrics show 2 uploaded and 1 dropped",
        || {
            let m = read_metrics()?;
            let v = |n: &str| m[&format!("{M}{n}")];
            if v("uploaded_total") == 2.0
                && v("dropped_total") == 1.0
                && v("upload_duration_seconds_count") >= 1.0
                && v("upload_duration_seconds_sum") > 0.0
                && v("queued") == 0.0
            {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        },
        || d.log(),
    );
    for p in &paths {
        assert!(env.is_valid_in(&read, p));
    }
    let text = fs::read_to_string(&metrics).unwrap();
    println!("metrics file:\n{text}");
    let leftovers: Vec<_> = fs::read_dir(metrics.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec!["npbhq.prom"], "temporary files left");

    // The final write on stop: remove the file, stop, it is back.
    fs::remove_file(&metrics).unwrap();
    assert!(d.stop().success());
    let m = read_metrics().expect("metrics written on stop");
    assert_eq!(m[&format!("{M}uploaded_total")], 2.0);
}

// ---------------------------------------------------------------------------
// SIGTERM
// ---------------------------------------------------------------------------

/// The nix calls run with no signal blocked, although the daemon blocks
/// SIGTERM and SIGINT in its own threads to receive them in order: every
/// call of `nix-sigmask-wrapper` (for `nix` and `nix-store`) writes down the
/// `SigBlk` it was started with, before it runs any other program, and a
/// hung `nix copy` ends on `kill -TERM`, as it would on systemd's stop.
#[test]
fn nix_calls_start_with_no_signal_blocked_and_end_on_sigterm() {
    let env = NixEnv::new("op-sigmask");
    let (sk, _pk) = env.gen_signing_key("op-sigmask-1");
    let (upload, read) = file_cache(&env, "cache");
    let dir = env.root().join("nix-sigmask-wrapper");
    fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    for prog in ["nix", "nix-store"] {
        // Builtins only before the exec: a program the shell ran first
        // could change the shell's own mask.
        let script = format!(
            "#!/bin/sh\n\
             # nix-sigmask-wrapper: records the signal mask it started with\n\
             while read -r key value; do\n\
             \x20   [ \"$key\" = SigBlk: ] && echo \"$value {prog} $1 $2 $3 $4\" >> '{d}/sigblk'\n\
             done < /proc/self/status\n\
             case \" $* \" in\n\
             *' copy '*)\n\
             \x20   echo $$ >> '{d}/copy.pids'\n\
             \x20   [ -e '{d}/hang' ] && exec sleep 600;;\n\
             esac\n\
             exec '{}' \"$@\"\n",
            which(prog).display()
        );
        fs::write(dir.join(prog), script).unwrap();
        fs::set_permissions(dir.join(prog), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let nix = dir.join("nix").display().to_string();
    let key = sk.display().to_string();
    let mut d = Daemon::start(
        &env,
        &[
            ("signing-key-file", &key),
            ("upload-to", &upload),
            ("nix", &nix),
        ],
    );
    let paths = env.build_paths(2, "sigmask");
    for p in &paths {
        assert_eq!(d.request(&format!("enqueue {}", p.display())), "ok 1");
    }
    assert_eq!(d.request("wait"), "ok all uploaded", "{}", d.log());
    assert!(paths.iter().all(|p| env.is_valid_in(&read, p)));
    let calls = fs::read_to_string(dir.join("sigblk")).unwrap_or_default();
    for what in [
        "nix-store --check-validity",
        "nix-command store sign",
        "nix-command copy",
    ] {
        assert!(calls.contains(what), "a {what} call was recorded:\n{calls}");
    }
    for line in calls.lines() {
        assert!(
            line.starts_with("0000000000000000 "),
            "a nix call started with signals blocked (SigBlk, then the call):\n{calls}"
        );
    }

    let pids = || -> Vec<u32> {
        fs::read_to_string(dir.join("copy.pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    };
    let copies_before = pids().len();
    fs::write(dir.join("hang"), "").unwrap();
    let hung = env.build_paths(1, "sigmask-hung");
    assert_eq!(d.request(&format!("enqueue {}", hung[0].display())), "ok 1");
    wait_until(Duration::from_secs(60), "the hung nix copy started", || {
        pids().len() > copies_before
    });
    let pid = *pids().last().unwrap();
    let alive = || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
            .is_some_and(|state| state != 'Z')
    };
    assert!(alive(), "the hung copy {pid} runs");
    run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]));
    wait_until_diag(
        Duration::from_secs(20),
        "the hung nix copy ends on SIGTERM",
        || !alive(),
        || format!("{}\n{calls}", d.log()),
    );
    wait_until_diag(
        Duration::from_secs(20),
        "the daemon reports the call killed by SIGTERM",
        || d.log().contains("killed by signal 15"),
        || d.log(),
    );
    assert!(d.is_running(), "{}", d.log());
}

/// SIGTERM during an upload: the nix call in progress may finish (within
/// the grace period) and the daemon exits 0 with nothing left queued.
#[test]
fn sigterm_lets_the_upload_in_progress_finish() {
    let env = NixEnv::new("op-term-finish");
    let (upload, read) = file_cache(&env, "cache");
    let w = NixFailWrapper::new(&env);
    w.set_hold(true);
    let mut d = Daemon::start(&env, &[("upload-to", &upload), ("nix", &w.nix())]);
    let paths = env.build_paths(1, "term-finish");
    assert_eq!(
        d.request(&format!("enqueue {}", paths[0].display())),
        "ok 1"
    );
    wait_until(Duration::from_secs(30), "copy held", || {
        !w.copy_pids().is_empty()
    });
    run_ok(Command::new("kill").args(["-TERM", &d.pid().unwrap().to_string()]));
    wait_until_diag(
        Duration::from_secs(30),
        "daemon saw the signal",
        || d.log().contains("stopping"),
        || d.log(),
    );
    w.set_hold(false);
    let st = d.stop();
    assert!(st.success(), "{st}\nlog:\n{}", d.log());
    assert!(env.is_valid_in(&read, &paths[0]), "log:\n{}", d.log());
    assert!(
        d.log().contains("stopped; 0 paths stay queued"),
        "log:\n{}",
        d.log()
    );
}

/// SIGTERM while an upload hangs: after the grace period the daemon kills
/// the nix call and everything it started, exits 0, and the path is still
/// in the journal: the next start uploads it.
#[test]
fn sigterm_kills_a_hung_upload_after_the_grace_period_and_keeps_the_path() {
    let env = NixEnv::new("op-term-kill");
    let (upload, read) = file_cache(&env, "cache");
    let w = NixFailWrapper::new(&env);
    w.set_hold(true);
    let mut d = Daemon::start(&env, &[("upload-to", &upload), ("nix", &w.nix())]);
    let paths = env.build_paths(1, "term-kill");
    assert_eq!(
        d.request(&format!("enqueue {}", paths[0].display())),
        "ok 1"
    );
    wait_until(Duration::from_secs(30), "copy held", || {
        !w.copy_pids().is_empty()
    });
    let copy = w.copy_pids()[0];
    let st = d.stop();
    assert!(st.success(), "{st}\nlog:\n{}", d.log());
    assert!(
        d.log().contains("outlasted the 10 s grace period"),
        "log:\n{}",
        d.log()
    );
    wait_until_diag(
        Duration::from_secs(10),
        "the held nix copy killed with the daemon's stop",
        || !w.is_alive(copy),
        || d.log(),
    );
    assert!(
        d.log().contains("stopped; 1 paths stay queued"),
        "{}",
        d.log()
    );
    w.set_hold(false);
    d.restart();
    wait_until_diag(
        UPLOAD_TIMEOUT,
        "path uploaded after restart",
        || env.is_valid_in(&read, &paths[0]),
        || d.log(),
    );
    assert!(d.log().contains("replayed: 1 paths queued"), "{}", d.log());
}
