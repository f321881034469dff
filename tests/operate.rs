//! Operating the daemon: the admin commands, a missing daemon, systemd
//! (socket activation, readiness, journald), the metrics file, SIGTERM,
//! paths given up on, the journal's records, the target checked at start,
//! several targets and `upload-command`. Real daemon, real Nix in a private
//! store; a failing or slow cache is a [`FakeNix`].

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

// --- Helpers

/// A well-formed store path that does not exist: the daemon acknowledges it
/// and then drops it ("no longer valid in the store").
fn missing_path(env: &NixEnv, name: &str) -> String {
    let store = env.store_dir().display().to_string();
    format!("{store}/0123456789abcdfghijklmnpqrsvwxyz-{name}")
}

/// What a CLI call did.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Ran {
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        let (code, stdout, stderr) = (o.status.code(), text(o.stdout), text(o.stderr));
        Ran {
            code,
            stdout,
            stderr,
        }
    }
}

/// Longest any command may run: a `wait` that never returns fails the test.
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// What `drop` says when it drops one path.
const DROPPED_ONE: &str = "dropped 1 queued path(s); they will not be uploaded\n";

/// A bound for what happens soon.
const HALF_MINUTE: Duration = Duration::from_secs(30);

/// Retry settings that retry at once.
const FAST_RETRY: [(&str, &str); 2] = [("retry-initial-delay", "0.05"), ("retry-max-delay", "0.2")];

/// The output of `child` once it ends within `within` (see [`exit_of`]).
fn finish_within(mut child: Child, what: &str, within: Duration) -> Output {
    exit_of(&mut child, within, what);
    child.wait_with_output().expect(what)
}

/// Starts `post-build-hook-queue ARGS... --socket SOCKET`, stdio piped.
fn spawn_cli(d: &Daemon, args: &[&str]) -> Child {
    let mut c = d.cli_cmd();
    c.args(args).arg("--socket").arg(d.socket());
    let piped = Stdio::piped;
    c.stdin(piped()).stdout(piped()).stderr(piped());
    c.spawn().unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

/// Runs `post-build-hook-queue ARGS... --socket SOCKET` (stdin empty).
fn cli(d: &Daemon, args: &[&str]) -> Ran {
    let mut c = d.cli_cmd();
    c.args(args).arg("--socket").arg(d.socket());
    run_to_exit(&mut c, COMMAND_DEADLINE).into()
}

/// [`cli`], and panics unless it exits 0.
fn cli_ok(d: &Daemon, args: &[&str]) -> Ran {
    let r = cli(d, args);
    assert_eq!(r.code, Some(0), "{args:?}: {r:?}");
    r
}

/// `enqueue PATHS...` through the CLI; panics unless it exits 0.
fn enqueue_cli(d: &Daemon, paths: &[PathBuf]) -> Ran {
    let (paths, mut args) = (strs(paths), vec!["enqueue"]);
    args.extend(paths.iter().map(String::as_str));
    cli_ok(d, &args)
}

/// `status --json`, checked to be one JSON object on one line.
fn status_json(d: &Daemon) -> Json {
    let r = cli_ok(d, &["status", "--json"]);
    assert_eq!(r.stdout.lines().count(), 1, "one line: {r:?}");
    match Json::parse(&r.stdout) {
        Ok(j @ Json::Obj(_)) => j,
        other => panic!("not a JSON object ({other:?}): {r:?}"),
    }
}

/// A number field of a JSON object.
fn num(j: &Json, key: &str) -> f64 {
    let n = j.get(key).and_then(Json::as_f64);
    n.unwrap_or_else(|| panic!("{key} is not a number in {j:?}"))
}

/// The number fields `keys` of a JSON object.
fn nums(j: &Json, keys: &[&str]) -> Vec<f64> {
    keys.iter().map(|k| num(j, k)).collect()
}

/// A string field of a JSON object.
fn jstr<'a>(j: &'a Json, key: &str) -> Option<&'a str> {
    j.get(key).and_then(Json::as_str)
}

/// An array field of a JSON object; panics when there is none.
fn list<'a>(j: &'a Json, key: &str) -> &'a [Json] {
    let a = j.get(key).and_then(Json::as_array);
    a.unwrap_or_else(|| panic!("{key} is not an array in {j:?}"))
}

/// Waits (`within`) until the number `key` of `status --json` passes `ok`.
fn wait_num(d: &Daemon, within: Duration, key: &str, ok: impl Fn(f64) -> bool) {
    wait_until(within, key, || ok(num(&status_json(d), key)));
}

/// Waits until each of `paths` is in the cache `read`.
fn wait_in(env: &NixEnv, read: &str, paths: &[PathBuf]) {
    let there = || paths.iter().all(|p| env.is_valid_in(read, p));
    wait_until(UPLOAD_TIMEOUT, &format!("{paths:?} in {read}"), there);
}

/// Human `status`; panics unless it exits 0.
fn status_text(d: &Daemon) -> String {
    cli_ok(d, &["status"]).stdout
}

/// The value after `label:` in the human status.
fn field<'a>(text: &'a str, label: &str) -> &'a str {
    let value = line_after(text, &format!("{label}:")).map(str::trim);
    value.unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
}

/// True when `text` contains every one of `parts`.
fn contains_all(text: &str, parts: &[&str]) -> bool {
    parts.iter().all(|p| text.contains(p))
}

/// True when a line of `text` starts with `start` and contains `parts`.
fn has_line(text: &str, start: &str, parts: &[&str]) -> bool {
    text.lines()
        .any(|l| l.starts_with(start) && contains_all(l, parts))
}

/// Panics unless each of `paths` is in the cache `read` (`there`), or
/// none is.
fn assert_in(env: &NixEnv, read: &str, paths: &[PathBuf], there: bool) {
    for p in paths {
        let (p, is) = (p.display(), env.is_valid_in(read, p));
        assert_eq!(is, there, "{p} in {read}: {is}");
    }
}

/// A daemon with `extra` settings uploading to the `file://` cache `cache`
/// through a new [`FakeNix`]; the cache's upload and read URLs.
fn faked(env: &NixEnv, extra: &[(&str, &str)]) -> (Daemon, FakeNix, String, String) {
    let (upload, read) = file_cache(env, "cache");
    let w = FakeNix::new(env);
    let nix = w.nix();
    let mut config = vec![("upload-to", upload.as_str()), ("nix", nix.as_str())];
    config.extend_from_slice(extra);
    (Daemon::start(env, &config), w, upload, read)
}

/// A child killed on drop with what it started (as a [`Running`]), unless
/// [`Guard::finish`] reaped it (its pid may then be another process's).
struct Guard(Option<Child>);

impl Guard {
    /// Its exit status once it ends within `within` (see [`exit_of`]).
    fn finish(&mut self, what: &str, within: Duration) -> ExitStatus {
        let mut child = self.0.take().expect("running");
        exit_of(&mut child, within, what)
    }

    /// SIGTERM, then its exit status.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.0.as_ref().expect("running").id().to_string();
        run_ok(Command::new("kill").args(["-TERM", &pid]));
        self.finish("exit after SIGTERM", HALF_MINUTE)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        drop(self.0.take().map(Running));
    }
}

/// Parses Prometheus text exposition (version 0.0.4) strictly enough to
/// catch what node-exporter's textfile collector rejects: every sample is
/// `name[{labels}] value [timestamp]` with a float value, belongs to a
/// family declared with one `# HELP` and one `# TYPE` before its samples
/// (summary samples end in `_sum`/`_count`), no sample twice, no TYPE
/// without samples, the file ends with a newline.
fn parse_prometheus(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let valid = |n: &str| {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        !n.starts_with(|c: char| c.is_ascii_digit()) && !n.is_empty() && n.chars().all(ok)
    };
    let labels_ok = |l: &str| {
        l.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') && l.ends_with("\"}")
    };
    let kinds = ["counter", "gauge", "summary", "histogram", "untyped"];
    let (mut help, mut types, mut seen) = (HashSet::new(), HashMap::new(), HashSet::new());
    let mut samples = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        let meta = ["# HELP ", "# TYPE "].map(|p| line.strip_prefix(p));
        if let Some(rest) = meta[0].or(meta[1]) {
            let (name, said) = rest.split_once(' ').unwrap_or_default();
            let fine = match meta[0] {
                Some(_) => !said.trim().is_empty() && help.insert(name),
                None => kinds.contains(&said) && types.insert(name, said).is_none(),
            };
            if !valid(name) || !fine {
                return Err(at("bad or repeated HELP or TYPE"));
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            // The key is the name and the labels (quoted, maybe with spaces).
            let key_end = line.rfind('}').map(|close| close + 1).or(line.find(' '));
            let (key, rest) = line.split_at(key_end.unwrap_or(line.len()));
            let (name, labels) = key
                .split_once('{')
                .map_or((key, None), |(n, l)| (n, Some(l)));
            let value = match rest.split_whitespace().collect::<Vec<_>>()[..] {
                [v] => v.parse::<f64>().ok(),
                [v, ts] if ts.parse::<i64>().is_ok() => v.parse().ok(),
                _ => None,
            };
            let base = name.strip_suffix("_sum").or(name.strip_suffix("_count"));
            let summary = |b: &&str| matches!(types.get(b), Some(&("summary" | "histogram")));
            let family = Some(name).filter(|n| types.contains_key(n));
            let family = family.or(base.filter(summary)).filter(|f| help.contains(f));
            let well_formed = valid(name) && labels.is_none_or(labels_ok);
            let (Some(family), Some(value), true) = (family, value, well_formed) else {
                return Err(at("malformed, or no HELP and TYPE before it"));
            };
            seen.insert(family);
            if samples.insert(key.to_string(), value).is_some() {
                return Err(at("sample repeated"));
            }
        }
    }
    if !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    match types.keys().find(|f| !seen.contains(*f)) {
        Some(f) => Err(format!("family {f} has a TYPE but no samples")),
        None => Ok(samples),
    }
}

const M: &str = "nix_post_build_hook_queue_";

/// The metrics file, checked by [`parse_prometheus`].
fn read_metrics(file: &Path) -> Result<BTreeMap<String, f64>, String> {
    let text = fs::read_to_string(file).map_err(|e| e.to_string())?;
    parse_prometheus(&text).map_err(|e| format!("{e}\n{text}"))
}

/// Waits until the metrics file has these samples (names without [`M`]).
fn wait_for_metrics(d: &Daemon, file: &Path, want: &[(&str, f64)]) {
    let what = format!("metrics {want:?} of the daemon in {}", d.dir().display());
    wait_ok(HALF_MINUTE, &what, || {
        let m = read_metrics(file)?;
        let has = |(name, v): &(&str, f64)| m.get(&format!("{M}{name}")) == Some(v);
        want.iter().all(has).then_some(()).ok_or(format!("{m:?}"))
    });
}

// --- status, retry, wait

/// Every field `status --json` documents, in order.
const JSON_FIELDS: &str = "version uptime_seconds queued in_flight uploaded dropped failed_calls \
    backing_off failed oldest_queued_seconds upload_seconds_sum upload_batches \
    upload_rate_per_minute spool_files spool_paths signing target backoff failed_paths \
    in_flight_paths targets";

/// The status fields move: fresh; paths from `enqueue -` back off; `wait
/// --timeout` exits 1; healed, `retry` makes them due at once despite an
/// hour's delay, and a `wait` returns when they are uploaded; drops. The
/// call in progress, the spool's backlog (files the hook left, not yet
/// queued) and the upload rate, in text, JSON and the metrics.
#[test]
fn status_fields_move_and_retry_makes_backing_off_paths_due() {
    let env = NixEnv::new("op-status");
    let (sk, pk) = env.gen_signing_key("op-status-1");
    let (sk, metrics) = (sk.display().to_string(), env.root().join("m.prom"));
    let file = metrics.display().to_string();
    let config = [("signing-key-file", sk.as_str()), ("metrics-file", &file)];
    let delays = [("retry-initial-delay", "3600"), ("retry-max-delay", "7200")];
    let (d, w, upload, read) = faked(&env, &[&config[..], &delays].concat());
    w.set_fail(true);

    let j = status_json(&d);
    let Json::Obj(members) = &j else {
        unreachable!()
    };
    let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.join(" "), JSON_FIELDS, "documented fields: {j:?}");
    let counts = ["queued", "in_flight", "uploaded", "dropped", "backing_off"];
    assert_eq!(nums(&j, &counts), [0.0; 5], "at start: {j:?}");
    assert_eq!(j.get("oldest_queued_seconds"), Some(&Json::Null));
    assert_eq!(j.get("signing"), Some(&Json::Bool(true)));
    assert_eq!(jstr(&j, "target"), Some(upload.as_str()));
    assert_eq!(jstr(&j, "version"), Some(env!("CARGO_PKG_VERSION")));
    assert!(list(&j, "backoff").is_empty(), "{j:?}");
    let uptime0 = num(&j, "uptime_seconds");
    let text = status_text(&d);
    let shown = ["queued", "signing", "target"].map(|l| field(&text, l));
    assert_eq!(shown, ["0", "on", upload.as_str()], "{text}");

    // Queue two paths through stdin; the cache fails; they back off.
    let paths = env.build_paths(2, "status");
    let p = strs(&paths);
    let mut c = spawn_cli(&d, &["enqueue", "-"]);
    let input = p.join("\n") + "\n";
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let r: Ran = finish_within(c, "enqueue -", COMMAND_DEADLINE).into();
    let queued = "queued 2 new path(s); 0 were already queued\n";
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), queued), "{r:?}");
    wait_num(&d, UPLOAD_TIMEOUT, "backing_off", |n| n == 2.0);
    wait_num(&d, HALF_MINUTE, "oldest_queued_seconds", |n| n >= 1.0);
    let j = status_json(&d);
    assert_eq!(nums(&j, &["queued", "uploaded"]), [2.0, 0.0], "{j:?}");
    let failed_calls = num(&j, "failed_calls");
    assert!(failed_calls >= 1.0, "{j:?}");
    assert_eq!(list(&j, "backoff").len(), 2, "{j:?}");
    for b in list(&j, "backoff") {
        assert!(p.iter().any(|q| jstr(b, "path") == Some(q)), "{j:?}");
        assert_eq!(num(b, "attempts"), 1.0, "{j:?}");
        // Jitter puts the first retry between half and all of an hour.
        let next = num(b, "next_try_seconds");
        assert!((1000.0..=3600.0).contains(&next), "next try {next}: {j:?}");
        let err = jstr(b, "last_error").unwrap();
        let said = contains_all(err, &["nix copy failed", "fake nix: injected failure"]);
        assert!(said, "{err}");
    }
    let text = status_text(&d);
    let shown = ["queued", "backing off"].map(|l| field(&text, l));
    assert_eq!(shown, ["2", "2"], "{text}");
    assert_ne!(field(&text, "oldest queued"), "none", "{text}");
    for p in &p {
        let at = format!("{p}:");
        let line = text.lines().find(|l| l.trim_start().starts_with(&at));
        let line = line.unwrap_or_else(|| panic!("no line for {p} in:\n{text}"));
        let retry = contains_all(line, &[": attempt 1 failed, next try in ", "m "]);
        let shown = retry && line.ends_with("fake nix: injected failure");
        assert!(shown, "{line}");
    }

    // wait gives up at its timeout with exit 1; no progress without a terminal.
    let r = cli(&d, &["wait", "--timeout", "1.5"]);
    assert_eq!((r.code, r.stdout.as_str()), (Some(1), ""), "{r:?}");
    let quoted = |p: &&String| r.stderr.contains(&format!("last error ({p}): "));
    let first = p.iter().find(quoted);
    let first = first.unwrap_or_else(|| panic!("no last error of a waited-for path: {r:?}"));
    assert_eq!(
        r.stderr,
        format!(
            "post-build-hook-queue: wait timed out after 1.5s: 2 path(s) still queued, 2 of them failing; \
             last error ({first}): nix copy failed (exit status 1): fake nix: injected failure\n"
        )
    );

    // Heal the cache but hold the copy; retry; the paths are in flight.
    w.set_fail(false);
    w.set_hold(true);
    let r = cli_ok(&d, &["retry"]);
    assert_eq!(r.stdout, "2 backing-off path(s) will be tried again now\n");
    wait_num(&d, HALF_MINUTE, "in_flight", |n| n == 2.0);
    // What the hook leaves while the daemon is busy or away; the busy
    // worker does not take it in until the call ends.
    let (later, spool) = (env.build_paths(3, "spooled"), d.spool_dir());
    fs::create_dir_all(&spool).unwrap();
    let q = strs(&later);
    for (n, paths) in [(1, &q[..2]), (2, &q[2..])] {
        let file = spool.join(format!("0000000000000000000{n}-1.req"));
        fs::write(file, format!("enqueue {}\n", paths.join(" "))).unwrap();
    }
    let j = status_json(&d);
    let in_flight = list(&j, "in_flight_paths").iter().filter_map(Json::as_str);
    let mut in_flight: Vec<&str> = in_flight.collect();
    in_flight.sort_unstable();
    let mut want = p.clone();
    want.sort();
    assert_eq!(in_flight, want, "{j:?}");
    let counts = nums(&j, &["in_flight", "spool_files", "spool_paths"]);
    assert_eq!(counts, [2.0, 2.0, 3.0], "{j:?}");
    assert_eq!(num(&j, "upload_rate_per_minute"), 0.0, "{j:?}");
    let text = status_text(&d);
    let shown = ["in flight", "spool files", "spool paths"].map(|l| field(&text, l));
    assert_eq!(shown, ["2", "2", "3"], "{text}");
    let retrying = text.matches(": attempt 1 failed, retrying now: ").count();
    assert_eq!(retrying, 2, "{text}");
    for p in &want {
        assert!(text.contains(&format!("  uploading {p}\n")), "{text}");
    }
    wait_for_metrics(&d, &metrics, &[("spool_files", 2.0), ("spool_paths", 3.0)]);
    let mut waiter = spawn_cli(&d, &["wait", "--timeout", "60"]);
    // The upload is held, so wait cannot have returned; first make sure its
    // request reached the daemon (it answers status in the meantime).
    assert_eq!(num(&status_json(&d), "queued"), 2.0);
    assert!(waiter.try_wait().unwrap().is_none(), "wait returned early");
    w.set_hold(false);
    let r: Ran = finish_within(waiter, "wait --timeout 60", COMMAND_DEADLINE).into();
    let said = (r.code, r.stdout.as_str(), r.stderr.as_str());
    assert_eq!(said, (Some(0), "all uploaded\n", ""), "{r:?}");
    // wait returned, so they are in the cache now: no polling.
    let uploaded = env.verify_in_cache(&read, &pk, &paths);
    uploaded.unwrap_or_else(|e| panic!("wait returned before the upload: {e}"));
    cli_ok(&d, &["wait", "--timeout", "120"]);
    wait_in(&env, &read, &later);

    let j = status_json(&d);
    let counts = nums(&j, &["queued", "in_flight", "uploaded", "backing_off"]);
    assert_eq!(counts, [0.0, 0.0, 5.0, 0.0], "{j:?}");
    assert_eq!(
        nums(&j, &["spool_files", "spool_paths"]),
        [0.0, 0.0],
        "{j:?}"
    );
    assert!(list(&j, "in_flight_paths").is_empty(), "{j:?}");
    assert!(num(&j, "upload_rate_per_minute") > 0.0, "{j:?}");
    assert_eq!(num(&j, "failed_calls"), failed_calls, "{j:?}");
    let spent = (num(&j, "upload_batches"), num(&j, "upload_seconds_sum"));
    assert!(spent.0 >= 1.0 && spent.1 > 0.0, "{j:?}");
    assert_eq!(j.get("oldest_queued_seconds"), Some(&Json::Null));
    wait_num(&d, HALF_MINUTE, "uptime_seconds", |n| n > uptime0);
    let r = cli(&d, &["wait"]);
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), "all uploaded\n"));
    let r = cli(&d, &["retry"]);
    assert_eq!(r.stdout, "0 backing-off path(s) will be tried again now\n");
    // `enqueue -` with nothing on stdin queues nothing and succeeds.
    let r = cli(&d, &["enqueue", "-"]);
    let queued = "queued 0 new path(s); 0 were already queued\n";
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), queued), "{r:?}");

    // Many paths gone from the store: dropped with one warning for the
    // batch (a count and a few names), not one line each; `wait` exits 1.
    let store = env.store_dir().display().to_string();
    let name = |i| format!("{store}/{i:0>32}-npbhq-gone-{i}");
    let gone: Vec<String> = (0..50).map(name).collect();
    assert_eq!(d.request(&format!("enqueue {}", gone.join(" "))), "ok 50");
    let r = cli(&d, &["wait", "--timeout", "60"]);
    assert_eq!(r.code, Some(1), "{r:?}\n{}", d.log());
    let log = d.log();
    let drops: Vec<&str> = log.lines().filter(|l| l.contains("dropping")).collect();
    assert_eq!(drops.len(), 1, "{log}");
    let first = format!("warning: dropping {}, ", gone[0]);
    let summary = drops[0].starts_with(&first) && drops[0].contains(", ... (50 paths): ");
    assert!(summary, "{}", drops[0]);
    assert_eq!(num(&status_json(&d), "dropped"), 50.0);
    let text = status_text(&d);
    let shown = ["dropped", "uploaded", "spool files"].map(|l| field(&text, l));
    assert_eq!(shown, ["50 since start", "5 since start", "0"], "{text}");
    let rate = field(&text, "upload rate");
    assert!(rate.ends_with(" paths/min lately"), "{text}");
}

/// Runs `wait` on a terminal (`script` gives it one): the `script` process
/// and what the terminal has shown so far.
fn wait_on_a_terminal(d: &Daemon) -> (Guard, impl Fn() -> String) {
    let (bin, socket) = (daemon_bin(), d.socket());
    let cmd = format!("'{}' wait --socket '{}'", bin.display(), socket.display());
    let shown = d.dir().join("terminal");
    let mut script = Command::new("script");
    script.args(["-q", "-e", "-f", "-c", &cmd, "/dev/null"]);
    let terminal = fs::File::create(&shown).unwrap();
    script.stdin(Stdio::null()).stdout(terminal);
    let child = script.stderr(Stdio::piped()).spawn();
    let child = child.expect("script (util-linux) runs a command on a terminal");
    let text = move || String::from_utf8_lossy(&fs::read(&shown).unwrap_or_default()).into_owned();
    (Guard(Some(child)), text)
}

/// `wait` on a terminal shows its progress on stderr, rewritten in place
/// and ended with a newline (Ctrl-C leaves the terminal on a fresh line);
/// it exits 1 when a path queued before it is dropped while it waits.
#[test]
fn wait_on_a_terminal_shows_progress_leaves_a_fresh_line_and_exits_1_on_a_drop() {
    let env = NixEnv::new("op-wait");
    let (d, w, read, good) = daemon_with_a_held_copy(&env, "wait");
    let (mut child, shown) = wait_on_a_terminal(&d);
    let rewritten = || shown().matches("waiting: 1 path(s) still queued").count() >= 2;
    wait_until_diag(HALF_MINUTE, "progress twice", rewritten, &shown);
    let script = child.0.as_ref().unwrap().id();
    let is_wait = |p: &u32| {
        let cmdline = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains("\0wait\0")
    };
    let wait_pids: Vec<u32> = descendants(script).into_iter().filter(is_wait).collect();
    assert_eq!(wait_pids.len(), 1, "the wait process under script");
    signal_pids("INT", &wait_pids);
    child.finish("script after SIGINT", HALF_MINUTE);
    let text = shown();
    let fresh = text.ends_with("waiting: 1 path(s) still queued, 0 of them failing\r\n");
    assert!(fresh, "the terminal is not left on a fresh line: {text:?}");
    let in_place = text.contains("\x1b[1A\r\x1b[Kwaiting: ");
    assert!(in_place, "rewritten in place: {text:?}");

    // The good path's copy is held, so the missing path waits behind it.
    let gone = missing_path(&env, "op-wait-gone");
    assert_eq!(d.request(&format!("enqueue {gone}")), "ok 1");
    let (mut child, shown) = wait_on_a_terminal(&d);
    let progress = "waiting: 2 path(s) still queued, 0 of them failing";
    let shows_progress = || shown().contains(progress);
    wait_until_diag(HALF_MINUTE, "progress", shows_progress, &shown);
    w.set_hold(false);
    let status = child.finish("wait on a terminal", COMMAND_DEADLINE);
    let text = shown();
    assert_eq!(status.code(), Some(1), "terminal showed:\n{text}");
    let dropped = format!("{gone}); see the daemon's log\r\n");
    let dropped = format!("post-build-hook-queue: 1 path(s) were dropped ({dropped}");
    let ended = text.contains(&format!("{progress}\r\n")) && text.ends_with(&dropped);
    assert!(ended, "{text:?}");
    wait_in(&env, &read, &[good]);
}

/// Against a cache that keeps failing: `status` (text and JSON) and `wait
/// --timeout` (exit 1) show the target and nix's error with the URL's
/// password and `secret-key` masked; nor does the log leak them.
#[test]
fn failing_target_is_shown_with_credentials_masked_and_wait_times_out() {
    // One download attempt: nix gives up on the dead cache at once.
    let env = NixEnv::with_conf("op-mask", "download-attempts = 1");
    let (sk, _pk) = env.gen_signing_key("op-mask-1");
    let (port, secret_key) = (free_port(), sk.display().to_string());
    let cache = format!("127.0.0.1:{port}/cache?compression=none&secret-key=");
    let target = format!("http://npbhq:hunter2@{cache}{secret_key}");
    let masked = format!("http://npbhq:***@{cache}***");
    let config = [&[("upload-to", target.as_str())], &FAST_RETRY[..]].concat();
    let d = Daemon::start(&env, &config);
    let paths = env.build_paths(1, "mask");
    let r = enqueue_cli(&d, &paths);
    assert_eq!(r.stdout, "queued 1 new path(s); 0 were already queued\n");
    let several = || {
        let j = status_json(&d);
        let first = list(&j, "backoff").first().map(|b| num(b, "attempts"));
        first.is_some_and(|a| a >= 3.0)
    };
    wait_until(UPLOAD_TIMEOUT, "several failed attempts", several);
    let text = status_text(&d);
    let json = cli_ok(&d, &["status", "--json"]).stdout;
    let j = Json::parse(&json).unwrap();
    let shown = ["target", "signing"].map(|l| field(&text, l));
    assert_eq!(shown, [masked.as_str(), "off"], "{text}");
    assert_eq!(jstr(&j, "target"), Some(masked.as_str()));
    let nix_said = ["nix copy failed", "npbhq:***@127.0.0.1"];
    let err = jstr(&list(&j, "backoff")[0], "last_error").unwrap();
    assert!(contains_all(err, &nix_said), "nix's message, masked: {err}");

    let r = cli(&d, &["wait", "--timeout", "1"]);
    assert_eq!((r.code, r.stderr.lines().count()), (Some(1), 1), "{r:?}");
    // With the last error of what it still waits for.
    let said = r.stderr.strip_prefix(&format!(
        "post-build-hook-queue: wait timed out after 1s: 1 path(s) still queued, 1 of them failing; \
         last error ({}): ",
        paths[0].display()
    ));
    assert!(said.is_some_and(|s| contains_all(s, &nix_said)), "{r:?}");
    let leaks = |shown: &str| shown.contains("hunter2") || shown.contains(&secret_key);
    assert!(
        !leaks(&text) && !leaks(&json),
        "status leaks a credential:\n{text}\n{json}"
    );
    assert!(!leaks(&r.stderr), "wait leaks a credential: {r:?}");
    assert!(!leaks(&d.log()), "the log leaks a credential:\n{}", d.log());
    let r = cli_ok(&d, &["retry"]);
    assert_eq!(r.stdout, "1 backing-off path(s) will be tried again now\n");
}

/// A CLI error is one line and exit 2: every admin command without a daemon
/// (the socket file missing or stale, from `--socket` or `$NPBHQ_SOCKET`),
/// usage errors, and an argument that is not UTF-8 (for every command and
/// the daemon's own settings: no abort, no connection, no daemon started).
#[test]
fn cli_errors_are_one_line_and_exit_2() {
    use std::os::unix::ffi::OsStrExt;
    let env = NixEnv::new("op-cli-errors");
    let d = Daemon::new_stopped(&env, NO_ENV, NO_ENV);
    let stale = env.root().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let enqueue = format!("enqueue {}", missing_path(&env, "op-x"));
    let commands = "enqueue -|status|status --json|wait|wait --timeout 5|retry";
    for socket in [d.socket(), stale] {
        let no_daemon = format!("post-build-hook-queue: no daemon at {} (", socket.display());
        for args in commands.split('|').chain([enqueue.as_str()]) {
            let mut c = d.cli_cmd();
            let r: Ran = run(c.args(args.split(' ')).arg("--socket").arg(&socket)).into();
            let said = (r.code, r.stdout.as_str(), r.stderr.lines().count());
            assert_eq!(said, (Some(2), "", 1), "{args}: {r:?}");
            let running = r.stderr.contains("is post-build-hook-queue running?");
            assert!(r.stderr.starts_with(&no_daemon) && running, "{args}: {r:?}");
        }
    }
    let r: Ran = run(d.cli_cmd().arg("status")).into();
    assert_eq!(r.code, Some(2), "{r:?}");
    let no_daemon = format!("no daemon at {}", d.socket().display());
    assert!(r.stderr.contains(&no_daemon), "{r:?}");
    let usage = "wait --timeout soon|wait --timeout|status --verbose|retry now|enqueue|frobnicate";
    for args in usage.split('|') {
        let r: Ran = run(d.cli_cmd().args(args.split(' '))).into();
        let said = (r.code, r.stderr.lines().count());
        assert_eq!(said, (Some(2), 1), "{args}: {r:?}");
    }

    let bad = std::ffi::OsStr::from_bytes(b"/tmp/\xff");
    let refused = "post-build-hook-queue: argument \"/tmp/\u{fffd}\" is not valid UTF-8";
    for command in ["status", "enqueue", "wait", "retry", "serve", ""] {
        let args = [command, "--socket"].into_iter().filter(|a| !a.is_empty());
        let r: Ran = run(d.cli_cmd().args(args).arg(bad)).into();
        let said = (r.code, r.stdout.as_str(), r.stderr.lines().count());
        assert_eq!(said, (Some(2), "", 1), "{command}: {r:?}");
        assert!(r.stderr.starts_with(refused), "{command}: {r:?}");
    }
}

// --- systemd: socket activation, readiness, journald

/// Starts `post-build-hook-queue serve --config CONFIG` as systemd does,
/// with `listener` as fd 3, `LISTEN_FDS=1` and `LISTEN_PID=<its pid>` (or
/// `listen_pid` unless empty): the shell moves stdin to fd 3 and execs it.
fn spawn_activated(env: &NixEnv, listener: UnixListener, d: &Daemon, listen_pid: &str) -> Guard {
    let log = fs::File::create(d.log_path()).unwrap();
    let mut c = env.cmd("/bin/sh");
    let script =
        "exec 3<&0 </dev/null; LISTEN_PID=${2:-$$} LISTEN_FDS=1 exec \"$0\" serve --config \"$1\"";
    c.args(["-c", script]).arg(daemon_bin());
    c.arg(d.config_path()).arg(listen_pid);
    c.stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    Guard(Some(c.spawn().unwrap()))
}

/// Socket activation: the daemon serves the socket it gets as fd 3 (no
/// socket file of its own, no LISTEN_* for nix) and leaves it in place when
/// it stops; with another process's LISTEN_PID it binds its own socket.
#[test]
fn socket_activation_serves_the_passed_socket() {
    let env = NixEnv::new("op-activate");
    let (upload, read) = file_cache(&env, "cache");
    let w = FakeNix::new(&env);
    let d = Daemon::new_stopped(&env, &[("upload-to", &upload), ("nix", &w.nix())], NO_ENV);
    let (own, passed) = (d.socket(), env.root().join("passed.sock"));
    let mut daemon = spawn_activated(&env, UnixListener::bind(&passed).unwrap(), &d, "");
    let cli_at = |socket: &Path, args: &[&str]| -> Ran {
        let mut c = env.cmd(daemon_bin());
        c.args(args).arg("--socket").arg(socket);
        run_to_exit(&mut c, COMMAND_DEADLINE).into()
    };

    // The listener was bound before the daemon started: this connects even
    // before the daemon accepts, and is answered once it does.
    let r = cli_at(&passed, &["status"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let log = d.log();
    let listening = log.contains("listening on the socket passed by systemd");
    assert!(listening, "{log}");
    assert!(!own.exists(), "the daemon created {}", own.display());

    let paths = env.build_paths(2, "activate");
    let p = strs(&paths);
    let r = cli_at(&passed, &["enqueue", &p[0], &p[1]]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = cli_at(&passed, &["wait", "--timeout", "60"]);
    let said = (r.code, r.stdout.as_str());
    assert_eq!(said, (Some(0), "all uploaded\n"), "{r:?}");
    assert_in(&env, &read, &paths, true);
    // nix ran without the LISTEN_* variables (they were for the daemon).
    let copy_env = fs::read_to_string(w.dir().join("copy.env")).unwrap();
    assert!(copy_env.contains("NIX_STORE_DIR="), "{copy_env}");
    let listen = copy_env.contains("LISTEN_FDS=") || copy_env.contains("LISTEN_PID=");
    assert!(!listen, "nix copy inherited LISTEN_*:\n{copy_env}");

    let st = daemon.terminate();
    assert!(st.success(), "exit on SIGTERM: {st}");
    assert!(passed.exists(), "the daemon removed systemd's socket");
    assert!(!own.exists());

    // LISTEN_PID names another process: fd 3 is not for us.
    let other = UnixListener::bind(env.root().join("other.sock")).unwrap();
    let mut daemon = spawn_activated(&env, other, &d, "1");
    let bound = || std::os::unix::net::UnixStream::connect(&own).is_ok();
    wait_until(Duration::from_secs(10), "its own socket bound", bound);
    cli_ok(&d, &["status"]);
    assert!(daemon.terminate().success());
    assert!(!own.exists(), "own socket removed on stop");
}

/// systemd's variables: with `NOTIFY_SOCKET` the daemon sends `READY=1` once
/// it accepts, and `STOPPING=1` on SIGTERM, then exits 0; when
/// `JOURNAL_STREAM` names its stderr, every log line starts with its
/// priority (`<6>`, `<4>`, `<3>`); when it was merely inherited, lines carry
/// the level as a word.
#[test]
fn journal_stream_gives_priority_prefixes_only_on_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let env = NixEnv::new("op-journal");
    let paths = env.build_paths(1, "journal");
    let notify_path = env.root().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(HALF_MINUTE)).unwrap();
    let notified = |want: &str| {
        let mut buf = [0u8; 256];
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{want} within 30 s: {e}"));
        assert_eq!(String::from_utf8_lossy(&buf[..n]), want);
    };
    let config = [("upload-to", "file:///dev/null/x")];
    let config = [&config[..], &[("retry-initial-delay", "0.05")]].concat();
    for journal in [true, false] {
        let mut d = Daemon::new_stopped(&env, &config, NO_ENV);
        let meta = fs::File::create(d.log_path()).unwrap().metadata().unwrap();
        // The stream systemd would name: the log file, or some other file.
        let stream = format!("{}:{}", meta.dev(), meta.ino() + u64::from(!journal));
        d.set_env("JOURNAL_STREAM", &stream);
        d.set_env("NOTIFY_SOCKET", &notify_path.display().to_string());
        d.try_spawn().unwrap();
        notified("READY=1");
        enqueue_cli(&d, &paths);
        // A failing upload: something to warn about.
        let warned = || d.log().contains("failed attempt");
        wait_until(UPLOAD_TIMEOUT, "a warning", warned);
        assert!(d.stop().success());
        notified("STOPPING=1");
        let text = d.log();
        let prefixes = match journal {
            true => ["<3>", "<4>", "<6>"],
            false => ["error: ", "warning: ", "info: "],
        };
        assert!(text.lines().count() >= 4, "{text}");
        for line in text.lines() {
            let prefixed = prefixes.iter().any(|p| line.starts_with(p));
            let why = format!("JOURNAL_STREAM on stderr: {journal}; line {line:?} in\n{text}");
            assert!(prefixed && !line.contains("info: <"), "{why}");
        }
        let warning = has_line(&text, prefixes[1], &["failed attempt 1"]);
        assert!(warning, "{text}");
    }
}

// --- metrics

/// The metrics file is valid Prometheus text from the start, its values move
/// as paths are uploaded and dropped, and the stop writes it one last time.
#[test]
fn metrics_file_is_prometheus_text_and_moves() {
    let env = NixEnv::new("op-metrics");
    let (upload, read) = file_cache(&env, "cache");
    let metrics = env.root().join("metrics/npbhq.prom");
    fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    let file = metrics.display().to_string();
    let mut d = Daemon::start(&env, &[("upload-to", &upload), ("metrics-file", &file)]);
    wait_until(Duration::from_secs(10), "metrics file", || metrics.exists());
    let m = read_metrics(&metrics).unwrap();
    let names = "queued in_flight backing_off spool_files spool_paths failed given_up_total \
        uploaded_total dropped_total failed_calls_total oldest_queued_age_seconds \
        upload_duration_seconds_sum upload_duration_seconds_count";
    let mut names: Vec<String> = names.split(' ').map(|n| format!("{M}{n}")).collect();
    // And per target, labelled with its URL: up (1) and zeros.
    let per_target = "queued delivered_total backing_off failed given_up_total \
        failed_calls_total up";
    let labelled = |n| format!("{M}target_{n}{{target=\"{upload}\"}}");
    names.extend(per_target.split(' ').map(labelled));
    names.sort();
    assert!(m.keys().eq(names.iter()), "{names:?} in {m:?}");
    let up_or_zero = |(k, v): (&String, &f64)| *v == f64::from(k.contains("target_up{"));
    assert!(m.iter().all(up_or_zero), "{m:?}");

    let paths = env.build_paths(2, "metrics");
    let gone = missing_path(&env, "op-metrics-gone");
    enqueue_cli(&d, &paths);
    // The CLI refuses a missing path; through the socket it is acknowledged
    // and then dropped.
    assert_eq!(d.request(&format!("enqueue {gone}")), "ok 1");
    let moved = || {
        let m = read_metrics(&metrics)?;
        let v = |n: &str| m[&format!("{M}{n}")];
        let done = [v("uploaded_total"), v("dropped_total"), v("queued")] == [2.0, 1.0, 0.0];
        let count = v("upload_duration_seconds_count");
        let timed = count >= 1.0 && v("upload_duration_seconds_sum") > 0.0;
        (done && timed).then_some(()).ok_or(format!("{m:?}"))
    };
    wait_ok(UPLOAD_TIMEOUT, "metrics: 2 uploaded, 1 dropped", moved);
    assert_in(&env, &read, &paths, true);
    let dir = fs::read_dir(metrics.parent().unwrap()).unwrap();
    let leftovers: Vec<_> = dir.map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec!["npbhq.prom"], "temporary files left");

    // The final write on stop: remove the file, stop, it is back.
    fs::remove_file(&metrics).unwrap();
    assert!(d.stop().success());
    let m = read_metrics(&metrics).expect("metrics written on stop");
    assert_eq!(m[&format!("{M}uploaded_total")], 2.0);
}

// --- Poison paths: failure has an end

/// Paths the cache refuses are given up on after `max-attempts`: `wait`
/// exits 1 naming them, `status` and the metrics show them, a restart keeps
/// them so; `requeue PATH` and `drop --all-failed` end them, logged, for good.
#[test]
fn poison_paths_are_given_up_on_and_can_be_requeued_or_dropped() {
    let env = NixEnv::new("op-given-up");
    let metrics = env.root().join("metrics.prom");
    let file = metrics.display().to_string();
    let config = [("max-attempts", "3"), ("metrics-file", file.as_str())];
    let (mut d, w, _, read) = faked(&env, &[&config[..], &FAST_RETRY].concat());
    w.set_poison(true);
    let (good, poison) = (env.build_paths(2, "fine"), env.build_paths(2, "poison"));
    let p = strs(&poison);
    let mixed = [&good[..1], &poison[..1], &good[1..], &poison[1..]].concat();
    enqueue_cli(&d, &mixed);

    // `wait` ends (its timeout is only a bound for a broken daemon) and
    // names both poison paths with the error.
    let r = cli(&d, &["wait", "--timeout", "120"]);
    assert_eq!((r.code, r.stderr.lines().count()), (Some(1), 1), "{r:?}");
    let given_up = "2 path(s) failed and were given up on";
    let named = [p[0].as_str(), &p[1], given_up, "refusing a poison path"];
    assert!(contains_all(&r.stderr, &named), "{r:?}");
    assert_in(&env, &read, &good, true);

    let j = status_json(&d);
    let counts = nums(&j, &["queued", "failed", "backing_off"]);
    assert_eq!(counts, [2.0, 2.0, 0.0], "no longer retried: {j:?}");
    let failed = list(&j, "failed_paths");
    let mut listed: Vec<&str> = failed.iter().filter_map(|f| jstr(f, "path")).collect();
    listed.sort_unstable();
    let mut want = p.clone();
    want.sort();
    assert_eq!(listed, want, "{j:?}");
    for f in failed {
        let times = (num(f, "attempts"), num(f, "given_up_seconds_ago"));
        assert!(times.0 >= 3.0 && times.1 >= 0.0, "{f:?}");
        let e = jstr(f, "last_error").unwrap();
        let said = contains_all(e, &["nix copy failed", "refusing a poison path"]);
        assert!(said, "{e}");
    }
    let text = status_text(&d);
    assert_eq!(field(&text, "failed"), "2", "{text}");
    wait_for_metrics(&d, &metrics, &[("failed", 2.0), ("given_up_total", 2.0)]);
    let log = d.log();
    for p in &p {
        let shown = has_line(&text, "", &[p, "FAILED", "refusing a poison path"]);
        assert!(shown, "{text}");
        assert!(has_line(&log, "warning:", &["giving up on", p]), "{log}");
    }

    // Journaled: after a restart they are still given up on, not tried.
    let copies = w.copy_pids().len();
    d.restart();
    let j = status_json(&d);
    assert_eq!(num(&j, "failed"), 2.0, "{j:?}\n{:?}", d.journal());
    // A later wait (another CI job's, say) neither waits nor fails for them.
    let r = cli_ok(&d, &["wait", "--timeout", "120"]);
    let before = "all uploaded, but for 2 path(s) given up on before this wait (see status)\n";
    assert_eq!(r.stdout, before);
    assert_eq!(w.copy_pids().len(), copies, "a path given up on was tried");

    // Mended: requeue one; drop the rest.
    w.set_poison(false);
    let r = cli_ok(&d, &["requeue", &p[0]]);
    let requeued = "requeued 1 of 1 path(s) given up on; they are tried again\n";
    assert_eq!(r.stdout, requeued);
    wait_in(&env, &read, &poison[..1]);
    let r = cli_ok(&d, &["drop", "--all-failed"]);
    assert_eq!(r.stdout, DROPPED_ONE);
    cli_ok(&d, &["wait", "--timeout", "120"]);
    let log = d.log();
    assert!(log.contains(&format!("requeued {}", p[0])), "{log}");
    let dropping = format!("dropping {}", p[1]);
    let warned = has_line(&log, "warning:", &[&dropping, "operator"]);
    assert!(warned, "{log}");
    assert_in(&env, &read, &poison[1..], false);
    d.restart();
    let j = status_json(&d);
    let counts = nums(&j, &["queued", "failed"]);
    assert_eq!(counts, [0.0, 0.0], "{j:?}\n{:?}", d.journal());
    let r = cli(&d, &["requeue", "--all-failed"]);
    let requeued = "requeued 0 path(s) given up on; they are tried again\n";
    assert_eq!(r.stdout, requeued, "{r:?}");

    // Two refused paths alone in a batch (its canary fails, the target
    // answers): each given up on after exactly `max-attempts`, not one more.
    w.set_poison(true);
    let pair = env.build_paths(2, "poison-pair");
    enqueue_cli(&d, &pair);
    let r = cli(&d, &["wait", "--timeout", "120"]);
    assert_eq!(r.code, Some(1), "{r:?}\nlog:\n{}", d.log());
    assert!(r.stderr.contains(given_up), "{r:?}");
    let j = status_json(&d);
    let failed = list(&j, "failed_paths");
    assert_eq!(failed.len(), 2, "{j:?}");
    for f in failed {
        assert_eq!(num(f, "attempts"), 3.0, "{f:?}\nlog:\n{}", d.log());
    }
    let log = d.log();
    for p in strs(&pair) {
        let line = format!("giving up on {p} after 3 failed attempts");
        assert!(log.contains(&line), "{log}");
    }
}

/// Failures while the target is down (the one-path canary fails too, or the
/// target does not answer `nix store ping`) count towards neither
/// `max-attempts` nor `give-up-after`: paths queued long ago keep backing
/// off through an outage, even after a restart.
#[test]
fn outage_counts_towards_neither_max_attempts_nor_give_up_after() {
    let env = NixEnv::with_conf("op-outage", "download-attempts = 1");
    let target = format!("http://127.0.0.1:{}/cache", free_port());
    let config = [("upload-to", target.as_str()), ("max-attempts", "2")];
    let config = [&config[..], &FAST_RETRY, &[("give-up-after", "0")]].concat();
    let mut d = Daemon::start(&env, &config);
    let paths = env.build_paths(3, "outage");
    let attempts = |d: &Daemon| -> Vec<f64> {
        let j = status_json(d);
        let backoff = list(&j, "backoff");
        backoff.iter().map(|e| num(e, "attempts")).collect()
    };
    let all_failing = |d: &Daemon, n: f64| {
        let a = attempts(d);
        a.len() == 3 && a.iter().all(|a| *a >= n)
    };
    let none_given_up = |d: &Daemon| {
        let j = status_json(d);
        assert_eq!(num(&j, "failed"), 0.0, "an outage made paths fail: {j:?}");
        assert!(!d.log().contains("giving up"), "{}", d.log());
    };
    // One alone first (the ping decides), then two together (the canary).
    enqueue_cli(&d, &paths[..1]);
    let lone = || attempts(&d).first().is_some_and(|a| *a >= 4.0);
    wait_until(UPLOAD_TIMEOUT, "a lone path failing 4 times", lone);
    enqueue_cli(&d, &paths[1..]);
    let three = || all_failing(&d, 4.0);
    wait_until(UPLOAD_TIMEOUT, "three paths failing 4 times", three);
    none_given_up(&d);

    // A day is long; a second will do here. Queued more than a second ago
    // and failing for more than a second after the restart (16 attempts of
    // at least 0.025 + 0.05 + 14 * 0.1 s): still not given up on.
    std::thread::sleep(Duration::from_millis(1100));
    d.set_config("give-up-after", "1");
    d.restart();
    let three = || all_failing(&d, 16.0);
    wait_until(UPLOAD_TIMEOUT, "three paths failing 16 times", three);
    none_given_up(&d);
}

// --- The journal

/// The journal's name for a target: FNV-1a (64 bits) of its URL, in 16
/// hex digits (the URL here holds no secret to mask).
fn target_id(url: &str) -> String {
    let step = |h: u64, b: u8| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    format!("{:016x}", url.bytes().fold(0xcbf2_9ce4_8422_2325, step))
}

/// Journals replay: one of `+` and `-` records only (an older daemon's), and
/// one with the records of several targets (`>` has it, `!` given up on,
/// `=` requeued): a path done or this target has is not uploaded; one only
/// another target has, or given up on for another, is.
#[test]
fn journal_records_replay() {
    let env = NixEnv::new("op-journals");
    let paths = env.build_paths(4, "journal");
    let [p0, p1, p2, p3] = [0, 1, 2, 3].map(|i| paths[i].display().to_string());
    for (cache, uploaded) in [("old", 3), ("targets", 4)] {
        let (upload, read) = file_cache(&env, cache);
        let (ours, other) = (target_id(&upload), target_id("ssh-ng://mirror"));
        let journal = match cache {
            "old" => format!("+ 1700000000 {p0}\n+ 1700000001 {p1}\n- {p0}\n+ 1700000002 {p2}\n"),
            _ => format!(
                "+ 1700000000 {p0}\n+ 1700000001 {p1}\n+ 1700000002 {p2}\n+ 1700000003 {p3}\n\
                 > {ours} {p0}\n> {other} {p1}\n! 1700000009 {other} 10 {p2} nix copy failed: x\n\
                 ! 1700000009 {ours} 10 {p3} nix copy failed: y\n= 1700000010 * {p3}\n"
            ),
        };
        let mut d = Daemon::new_stopped(&env, &[("upload-to", upload.as_str())], NO_ENV);
        fs::create_dir_all(d.state_dir()).unwrap();
        fs::write(d.journal_path(), journal).unwrap();
        d.try_spawn().unwrap();
        let r = cli_ok(&d, &["wait", "--timeout", "120"]);
        assert_eq!(r.stdout, "all uploaded\n", "{cache}: {r:?}");
        assert_in(&env, &read, &paths[..1], false);
        assert_in(&env, &read, &paths[1..uploaded], true);
        let j = status_json(&d);
        assert_eq!(nums(&j, &["queued", "failed"]), [0.0, 0.0], "{j:?}");
        assert!(!d.log().contains("unreadable"), "{cache}: {}", d.log());
    }
}

// --- Rough edges a first-time user hit; the target, checked at start

/// The one line a daemon with `config` logs as it refuses to start: exit
/// 78, before it listens.
fn refused_start(env: &NixEnv, config: &[(&str, &str)]) -> String {
    let mut d = Daemon::new_stopped(env, config, NO_ENV);
    let e = d.try_spawn().expect_err("a daemon that should not start");
    let log = d.log();
    assert!(e.contains("exit status: 78"), "{e}");
    assert_eq!(log.lines().count(), 1, "one line: {log}");
    assert!(!d.socket().exists(), "the daemon listened: {log}");
    log
}

/// Every subcommand answers `--help` without a daemon; `enqueue ./result`
/// follows the link; a missing path is refused in one line, nothing queued;
/// a mistyped setting names the nearest key.
#[test]
fn rough_edges_help_result_links_missing_paths_and_mistyped_keys() {
    let env = NixEnv::new("op-edges");
    let (upload, read) = file_cache(&env, "cache");
    let d = Daemon::start(&env, &[("upload-to", &upload)]);
    for command in ["enqueue", "status", "wait", "retry", "requeue", "drop"] {
        let usage = format!("Usage: post-build-hook-queue {command} ");
        for help in ["--help", "-h"] {
            let args = [command, help, "--socket", "/nonexistent/s"];
            let r: Ran = run(d.cli_cmd().args(args)).into();
            let usage_shown = r.stdout.starts_with(&usage);
            assert!(r.code == Some(0) && usage_shown, "{command} {help}: {r:?}");
        }
    }
    let r: Ran = run(d.cli_cmd().args(["serve", "--help"])).into();
    assert_eq!(r.code, Some(0), "{r:?}");
    let helps = contains_all(&r.stdout, &["max-attempts", "requeue"]);
    assert!(helps, "{r:?}");

    // ./result, relative to the working directory, and a link to a link.
    let built = env.build_paths(2, "edges");
    let work = env.root().join("work");
    fs::create_dir_all(&work).unwrap();
    symlink(&built[0], work.join("result")).unwrap();
    symlink(&built[1], work.join("result-2")).unwrap();
    symlink("result-2", work.join("again")).unwrap();
    let mut c = d.cli_cmd();
    c.current_dir(&work).args(["enqueue", "./result", "again"]);
    let r: Ran = run(c.arg("--socket").arg(d.socket())).into();
    let queued = "queued 2 new path(s); 0 were already queued\n";
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), queued), "{r:?}");
    wait_in(&env, &read, &built);

    // Missing: refused, one line, nothing queued.
    let gone = missing_path(&env, "op-edges-gone");
    symlink(&gone, work.join("dangling")).unwrap();
    let dangling = work.join("dangling").display().to_string();
    for arg in [&gone, &dangling] {
        let r = cli(&d, &["enqueue", &built[0].display().to_string(), arg]);
        let said = (r.code, r.stdout.as_str(), r.stderr.lines().count());
        assert_eq!(said, (Some(2), "", 1), "{arg}: {r:?}");
        let refused = ["does not exist", &gone, "nothing was queued"];
        assert!(contains_all(&r.stderr, &refused), "{arg}: {r:?}");
    }
    assert_eq!(num(&status_json(&d), "queued"), 0.0);
    let logged = d.log().contains("op-edges-gone");
    assert!(!logged, "the daemon logged the missing path");

    // Mistyped keys, in the file and as a flag.
    let log = refused_start(&env, &[("uplaod-to", upload.as_str())]);
    assert!(log.contains("did you mean \"upload-to\"?"), "{log}");
    let r: Ran = run(d.cli_cmd().args(["serve", "--max-atempts", "3"])).into();
    assert_eq!(r.code, Some(78), "{r:?}");
    assert!(r.stderr.contains("did you mean \"max-attempts\"?"), "{r:?}");
    // The same target twice (a password aside) is refused, not taken as
    // two (private socket and state, should it start all the same).
    let own = env.root().join("second-target");
    let mut c = d.cli_cmd();
    c.args(["serve", "--upload-to", "ssh://u:one@mirror"]);
    c.args(["--upload-to", "ssh://u:two@mirror", "--socket"]);
    c.arg(own.join("s.sock")).arg("--state-dir").arg(&own);
    let r: Ran = run(&mut c).into();
    assert_eq!((r.code, r.stderr.lines().count()), (Some(78), 1), "{r:?}");
    let twice = r.stderr.contains("is given twice") && !r.stderr.contains("one@");
    assert!(twice, "{r:?}");
}

/// A mistyped target (an unknown kind of store, or no store URL at all)
/// stops the daemon with exit 78 and nix's reason, before it listens; a
/// target that does not answer is a warning, and the daemon starts.
#[test]
fn mistyped_target_stops_the_daemon_and_an_unreachable_one_is_a_warning() {
    let env = NixEnv::with_conf("op-target", "download-attempts = 1");
    let cache = env.root().join("cache").display().to_string();
    let urls = format!("fiel://{cache}|cache.example.org|fiel:///x");
    for url in urls.split('|') {
        let log = refused_start(&env, &[("upload-to", url)]);
        let start = format!("post-build-hook-queue: upload-to {url}: ");
        // `store info` from Nix 2.19 on, `store ping` before.
        let nix_said = (log.split_once("nix store ping failed"))
            .or_else(|| log.split_once("nix store info failed"))
            .map(|(_, said)| said);
        let refused = log.starts_with(&start) && nix_said.is_some();
        assert!(refused, "{url}: {log}");
        // Nix's own reason, whatever its version's words: an error that
        // names the scheme (Nix 2.8 quotes the URL, 2.26 the scheme).
        let reason = nix_said.is_some_and(|s| contains_all(s, &["error:", "fiel"]));
        assert!(reason || url != "fiel:///x", "{log}");
    }

    let target = format!("http://127.0.0.1:{}/cache", free_port());
    let d = Daemon::start(&env, &[("upload-to", &target)]);
    let upload_to = format!("upload-to {target}");
    let warned = || has_line(&d.log(), "warning:", &[&upload_to, "starting anyway"]);
    wait_until(HALF_MINUTE, "a warning of no answer", warned);
    assert_eq!(field(&status_text(&d), "target"), target);
}

/// `upload-command` (here `nix copy` through a [`FakeNix`]) gets the paths
/// as its last arguments, with retries; no shell runs its words; a missing
/// program stops the daemon; beside `upload-to` it is one more target, and
/// a hung one does not hold back the other.
#[test]
fn upload_command_delivers_with_retries_and_without_a_shell() {
    let env = NixEnv::new("op-uploader");
    let (upload, read) = file_cache(&env, "cache");
    let w = FakeNix::new(&env);
    w.set_fail(true);
    let copy_to = |to: &str| {
        let nix = w.nix();
        format!("{nix} --extra-experimental-features nix-command copy --to {to}")
    };
    let command = copy_to(&upload);
    let config = [("upload-command", command.as_str())];
    let d = Daemon::start(&env, &[&config[..], &FAST_RETRY].concat());
    let paths = env.build_paths(3, "uploader");
    enqueue_cli(&d, &paths);
    wait_until(UPLOAD_TIMEOUT, "the uploader failing", || {
        let j = status_json(&d);
        num(&j, "backing_off") == 3.0 && num(&j, "failed_calls") >= 2.0
    });
    let j = status_json(&d);
    let label = format!("upload-command: {command}");
    assert_eq!(jstr(&j, "target"), Some(label.as_str()), "{j:?}");
    let err = jstr(&list(&j, "backoff")[0], "last_error").unwrap();
    let failed = "upload-command failed (exit status 1): fake nix: injected failure";
    assert!(err.starts_with(failed), "{err}");
    assert_in(&env, &read, &paths, false);
    w.set_fail(false);
    cli_ok(&d, &["wait", "--timeout", "120"]);
    assert_in(&env, &read, &paths, true);
    assert!(!w.copy_pids().is_empty(), "the uploader ran");

    // Words that a shell would act on are arguments like any other.
    let marker = env.root().join("shell-ran");
    let m = marker.display();
    let words = format!("/bin/echo $(touch {m}) ;touch {m} |touch {m}");
    let d2 = Daemon::start(&env, &[("upload-command", words.as_str())]);
    enqueue_cli(&d2, &paths[..1]);
    cli_ok(&d2, &["wait", "--timeout", "120"]);
    assert!(!marker.exists(), "upload-command went through a shell");

    let log = refused_start(&env, &[("upload-command", "/nonexistent/cachix push c")]);
    let said = "upload-command: /nonexistent/cachix is not an executable file";
    assert!(log.contains(said), "{log}");

    // Beside `upload-to`, one that hangs (a long `command-timeout`): a path
    // queued while the hung call is in progress reaches the other target.
    let (upload2, read2) = file_cache(&env, "cache-beside");
    let beside = copy_to(&upload2);
    let config = [("upload-command", beside.as_str()), ("upload-to", &upload)];
    let d4 = Daemon::start(&env, &[&config[..], &[("command-timeout", "300")]].concat());
    w.set("hold", Some("/cache-beside?"));
    let (fresh, copies) = (env.build_paths(2, "uploader-beside"), w.copy_pids().len());
    enqueue_cli(&d4, &fresh[..1]);
    let hanging = || w.copy_pids().len() > copies;
    wait_until(UPLOAD_TIMEOUT, "the uploader hanging", hanging);
    enqueue_cli(&d4, &fresh[1..]);
    let delivered = || env.is_valid_in(&read, &fresh[1]);
    wait_until(UPLOAD_TIMEOUT, "the later path delivered", delivered);
    let (j, first) = (status_json(&d4), fresh[0].display().to_string());
    let listed = list(&j, "in_flight_paths");
    let in_flight = listed.iter().any(|p| p.as_str() == Some(&first));
    assert!(in_flight, "the hung call is in progress: {j:?}");
    w.set("hold", None);
    cli_ok(&d4, &["wait", "--timeout", "120"]);
    assert_in(&env, &read, &fresh, true);
    assert_in(&env, &read2, &fresh, true);
}

// --- SIGTERM

/// The nix calls run with no signal blocked, although the daemon blocks
/// SIGTERM and SIGINT in its threads: every call of a [`FakeNix`] (`nix`
/// and `nix-store`) writes down the `SigBlk` it was started with before it
/// runs any other program, and a held `nix copy` ends on `kill -TERM`.
#[test]
fn nix_calls_start_with_no_signal_blocked_and_end_on_sigterm() {
    let env = NixEnv::new("op-sigmask");
    let (sk, _pk) = env.gen_signing_key("op-sigmask-1");
    let (upload, read) = file_cache(&env, "cache");
    // FakeNix runs only shell builtins before its prelude: a program the
    // shell ran first could change the shell's own mask.
    let sigblk = env.root().join("sigblk");
    let record = |prog: &str| {
        format!(
            "while read -r key value; do\n\
             \x20   [ \"$key\" = SigBlk: ] && echo \"$value {prog} $1 $2 $3 $4\" >> '{}'\n\
             done < /proc/self/status",
            sigblk.display()
        )
    };
    let w = FakeNix::with_preludes(&env, &record("nix"), &record("nix-store"));
    let (nix, key) = (w.nix(), sk.display().to_string());
    let config = [("signing-key-file", key.as_str()), ("upload-to", &upload)];
    let mut d = Daemon::start(&env, &[&config[..], &[("nix", &nix)]].concat());
    let paths = env.build_paths(2, "sigmask");
    for p in &paths {
        assert_eq!(d.request(&format!("enqueue {}", p.display())), "ok 1");
    }
    assert_eq!(d.request("wait"), "ok all uploaded");
    assert_in(&env, &read, &paths, true);
    let calls = fs::read_to_string(&sigblk).unwrap_or_default();
    for what in "nix-store --check-validity|nix-command store sign|nix-command copy".split('|') {
        assert!(calls.contains(what), "a {what} call was recorded:\n{calls}");
    }
    // Each line: SigBlk, the call.
    let unblocked = calls.lines().all(|l| l.starts_with("0000000000000000 "));
    assert!(unblocked, "started with signals blocked:\n{calls}");

    let copies_before = w.copy_pids().len();
    w.set_hold(true);
    let hung = env.build_paths(1, "sigmask-hung");
    assert_eq!(d.request(&format!("enqueue {}", hung[0].display())), "ok 1");
    let started = || w.copy_pids().len() > copies_before;
    wait_until(Duration::from_secs(60), "the hung copy started", started);
    let pid = *w.copy_pids().last().unwrap();
    assert!(w.is_alive(pid), "the hung copy {pid} runs");
    run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]));
    let ended = || !w.is_alive(pid);
    wait_until(Duration::from_secs(20), "the copy ends on SIGTERM", ended);
    let said = || d.log().contains("killed by signal 15");
    wait_until(Duration::from_secs(20), "the call reported killed", said);
    assert!(d.is_running());
}

/// SIGTERM during an upload: the nix call in progress may finish within
/// the grace period, and the daemon exits 0 with nothing left queued; one
/// that hangs is killed after it with all it started, the daemon exits 0,
/// and the path, still in the journal, is uploaded on the next start.
#[test]
fn sigterm_lets_the_upload_in_progress_finish_and_kills_a_hung_one() {
    let env = NixEnv::new("op-term");
    let (mut d, w, read, path) = daemon_with_a_held_copy(&env, "term-finish");
    run_ok(Command::new("kill").args(["-TERM", &d.pid().unwrap().to_string()]));
    let seen = || d.log().contains("stopping");
    wait_until(HALF_MINUTE, "daemon saw the signal", seen);
    w.set_hold(false);
    let st = d.stop();
    assert!(st.success(), "{st}");
    assert!(env.is_valid_in(&read, &path));
    assert!(d.log().contains("stopped; 0 paths stay queued"));

    let (mut d, w, read, path) = daemon_with_a_held_copy(&env, "term-kill");
    let copy = w.copy_pids()[0];
    let st = d.stop();
    assert!(st.success(), "{st}");
    assert!(d.log().contains("outlasted the 10 s grace period"));
    let killed = || !w.is_alive(copy);
    wait_until(Duration::from_secs(10), "the held copy killed", killed);
    assert!(d.log().contains("stopped; 1 paths stay queued"));
    w.set_hold(false);
    d.restart();
    wait_in(&env, &read, &[path]);
    assert!(d.log().contains("replayed: 1 paths queued"));
}

// --- Several targets

/// The entry of `status --json`'s `targets` whose label holds `part`: its
/// label, state, and its counts `keys`.
fn target(d: &Daemon, part: &str, keys: &[&str]) -> (String, String, Vec<f64>, Json) {
    let j = status_json(d);
    let has = |t: &&Json| jstr(t, "target").is_some_and(|l| l.contains(part));
    let t = list(&j, "targets").iter().find(has);
    let t = t.unwrap_or_else(|| panic!("no target {part} in status: {j:?}"));
    let text = |k| jstr(t, k).unwrap_or_default().to_string();
    (text("target"), text("state"), nums(t, keys), t.clone())
}

/// Two `upload-to` lines (as the module renders a list): every path goes
/// to both caches, signed once per batch before any copy, and leaves the
/// journal; `status` and the metrics file show each target.
#[test]
fn two_targets_both_receive_every_path_signed_once() {
    let env = NixEnv::new("op-two-targets");
    let (key, public) = env.gen_signing_key("two-targets");
    let (key, metrics) = (key.display().to_string(), env.root().join("metrics.prom"));
    let file = metrics.display().to_string();
    let config = [("signing-key-file", key.as_str()), ("metrics-file", &file)];
    let (d, w, [(up_a, read_a), (up_b, read_b)]) = two_targets(&env, &config);
    let paths = env.build_paths(3, "two");
    enqueue_cli(&d, &paths);
    cli_ok(&d, &["wait", "--timeout", "120"]);
    for read in [&read_a, &read_b] {
        let signed = env.verify_in_cache(read, &public, &paths);
        signed.unwrap_or_else(|e| panic!("{e}"));
    }
    // One request, one batch: one signing, then one copy per target.
    let calls = w.uploads();
    let at = |verb| -> Vec<usize> { (0..calls.len()).filter(|&i| calls[i].0 == verb).collect() };
    let (signs, copies) = (at("sign"), at("copy"));
    assert_eq!((signs.len(), copies.len()), (1, 2), "{calls:#?}");
    assert!(signs[0] < copies[0], "signed after a copy: {calls:#?}");
    let j = status_json(&d);
    assert_eq!(nums(&j, &["queued", "uploaded"]), [0.0, 3.0], "{j:?}");
    for (part, label) in [("cache-a", &up_a), ("cache-b", &up_b)] {
        let (shown, state, counts, t) = target(&d, part, &["delivered", "queued"]);
        let seen = (&shown, state.as_str(), counts);
        assert_eq!(seen, (label, "ok", vec![3.0, 0.0]), "{t:?}");
        let delivered = format!("target_delivered_total{{target=\"{label}\"}}");
        let up = format!("target_up{{target=\"{label}\"}}");
        wait_for_metrics(&d, &metrics, &[(&delivered, 3.0), (&up, 1.0)]);
    }
}

/// One target down: the other keeps delivering, `status` shows which one
/// fails and why, `wait` waits for it; once back, it gets every path. A
/// kill -9 between the two targets' copies loses nothing either.
#[test]
fn one_target_down_does_not_hold_back_the_other() {
    let env = NixEnv::new("op-target-down");
    let config = [("retry-initial-delay", "0.2"), ("retry-max-delay", "1")];
    let (mut d, w, [(up_a, read_a), (up_b, read_b)]) = two_targets(&env, &config);
    w.set("fail", Some("cache-b"));
    // Paths at first, and more while b is down: a takes them all.
    let first = env.build_paths(2, "down-first");
    let more = env.build_paths(2, "down-more");
    for paths in [&first, &more] {
        enqueue_cli(&d, paths);
        wait_in(&env, &read_a, paths);
    }
    let all = [first, more].concat();
    assert_in(&env, &read_b, &all, false);
    let b_failing = || {
        let (_, state, counts, _) = target(&d, "cache-b", &["queued", "backing_off"]);
        (state.as_str(), counts) == ("failing", vec![4.0, 4.0])
    };
    let status = || format!("{:?}", status_json(&d));
    wait_until_diag(UPLOAD_TIMEOUT, "cache-b failing", b_failing, status);
    let (_, state, counts, a) = target(&d, "cache-a", &["delivered", "queued"]);
    assert_eq!((state.as_str(), counts), ("ok", vec![4.0, 0.0]), "{a:?}");
    let (_, _, _, b) = target(&d, "cache-b", &[]);
    let e = jstr(&b, "last_error").unwrap_or("");
    assert!(e.contains("fake nix: injected failure"), "{b:?}");
    let j = status_json(&d);
    assert_eq!(num(&j, "queued"), 4.0, "{j:?}");
    let text = status_text(&d);
    assert!(has_line(&text, "", &[&up_b, "failing"]), "{text}");
    let error = has_line(&text, "", &["last error", "injected failure"]);
    assert!(error, "{text}");
    let r = cli(&d, &["wait", "--timeout", "2"]);
    assert_eq!(r.code, Some(1), "wait did not wait for cache-b: {r:?}");
    assert!(r.stderr.contains("4 path(s) still queued"), "{r:?}");

    w.set("fail", None);
    cli_ok(&d, &["retry"]);
    cli_ok(&d, &["wait", "--timeout", "120"]);
    assert_in(&env, &read_b, &all, true);
    for p in &all {
        assert_eq!(w.copies_of("cache-a", p), 1, "copied to cache-a again");
    }
    let (_, state, _, b) = target(&d, "cache-b", &[]);
    assert_eq!(state, "ok", "{b:?}");

    // Killed (-9) after cache-a has paths and while cache-b's copy is under
    // way: the journal says which has them, and the restart delivers to
    // cache-b only; nothing is lost.
    w.set("hold", Some("cache-b"));
    let paths = env.build_paths(2, "kill");
    enqueue_cli(&d, &paths);
    wait_until(UPLOAD_TIMEOUT, "cache-a has them, cache-b held", || {
        let held = paths.iter().all(|p| w.copies_of("cache-b", p) == 1);
        held && paths.iter().all(|p| env.is_valid_in(&read_a, p))
    });
    d.kill9();
    let journal = fs::read_to_string(d.journal_path()).unwrap_or_default();
    for p in &paths {
        let record = format!("> {} {}\n", target_id(&up_a), p.display());
        assert!(journal.contains(&record), "{journal}");
    }
    w.set("hold", None);
    d.restart();
    cli_ok(&d, &["wait", "--timeout", "120"]);
    assert_in(&env, &read_b, &paths, true);
    for p in &paths {
        let copies = [w.copies_of("cache-a", p), w.copies_of("cache-b", p)];
        assert_eq!(copies, [1, 2], "cache-a once, b again: {:#?}", w.uploads());
    }
    assert_eq!(num(&status_json(&d), "queued"), 0.0);
}

/// A path that one target refuses is given up on for that target only: the
/// other has it; `wait` and `status` name the target; `requeue` tries that
/// target alone again.
#[test]
fn a_path_given_up_on_one_target_only() {
    let env = NixEnv::new("op-target-poison");
    let config = [&[("max-attempts", "2")], &FAST_RETRY[..]].concat();
    let (mut d, w, [(_, read_a), (up_b, read_b)]) = two_targets(&env, &config);
    w.set("poison", Some("cache-b"));
    let (good, poison) = (env.build_paths(1, "fine"), env.build_paths(2, "poison"));
    let p = poison[0].display().to_string();
    enqueue_cli(&d, &[&good[..], &poison[..]].concat());
    let r = cli(&d, &["wait", "--timeout", "120"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    let given_up = "2 path(s) failed and were given up on";
    let named = [given_up, &p, &up_b, "refusing a poison path"];
    assert!(contains_all(&r.stderr, &named), "{r:?}");
    assert_in(&env, &read_a, &poison, true);
    assert_in(&env, &read_b, &poison, false);
    assert_in(&env, &read_b, &good, true);
    for (part, failed) in [("cache-a", 0.0), ("cache-b", 2.0)] {
        let (_, _, counts, t) = target(&d, part, &["failed", "queued"]);
        assert_eq!(counts, [failed, 0.0], "{t:?}");
    }
    let j = status_json(&d);
    assert_eq!(nums(&j, &["queued", "failed"]), [2.0, 2.0], "{j:?}");
    let e = jstr(&list(&j, "failed_paths")[0], "last_error").unwrap();
    assert!(e.starts_with(&format!("{up_b}: ")), "{e}");

    // Still given up on (for b only) after a restart; then requeued, b
    // alone is tried again.
    d.restart();
    cli_ok(&d, &["wait", "--timeout", "120"]);
    w.set("poison", None);
    let copies_a = w.copies_of("cache-a", &poison[0]);
    cli_ok(&d, &["requeue", &p]);
    cli_ok(&d, &["wait", "--timeout", "120"]);
    assert_in(&env, &read_b, &poison[..1], true);
    // The other one, dropped: for every target, and b never gets it.
    let r = cli_ok(&d, &["drop", "--all-failed"]);
    assert_eq!(r.stdout, DROPPED_ONE);
    assert_in(&env, &read_b, &poison[1..], false);
    let (again, uploads) = (w.copies_of("cache-a", &poison[0]), w.uploads());
    assert_eq!(again, copies_a, "copied to cache-a again: {uploads:#?}");
    let j = status_json(&d);
    assert_eq!(nums(&j, &["queued", "failed"]), [0.0, 0.0], "{j:?}");
}

/// A cache that refuses every path while it answers `nix store ping` (a
/// full disk): once a few paths failed alone with nothing taken, it is the
/// target's fault, and no path is given up on, `max-attempts 2` or not.
#[test]
fn a_target_refusing_every_path_while_it_answers_ends_no_path() {
    let env = NixEnv::new("op-refuses-all");
    let delays = [("retry-initial-delay", "20"), ("retry-max-delay", "20")];
    let (d, w, _, _) = faked(&env, &[&[("max-attempts", "2")], &delays[..]].concat());
    w.set_fail(true);
    let paths = env.build_paths(4, "refused");
    // One at a time, so that each fails alone.
    for i in 0..paths.len() {
        enqueue_cli(&d, &paths[i..=i]);
        let failed_alone = || num(&status_json(&d), "backing_off") == (i + 1) as f64;
        wait_until(UPLOAD_TIMEOUT, "the path failing alone", failed_alone);
    }
    let twice = || {
        let j = status_json(&d);
        let b = list(&j, "backoff");
        b.len() == 4 && b.iter().all(|e| num(e, "attempts") >= 2.0)
    };
    let diag = || format!("{:?}", status_json(&d));
    wait_until_diag(Duration::from_secs(120), "each failing twice", twice, diag);
    let j = status_json(&d);
    assert_eq!(num(&j, "failed"), 0.0, "{j:?}\n{}", d.log());
    assert!(!d.log().contains("giving up"), "{}", d.log());
}
