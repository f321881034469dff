//! The `post-build-hook-queue` command: `serve` and the admin commands.
//!
//! Exit codes: 0 success; 1 the daemon reported a failure (`wait` saw paths
//! dropped or still failing); 2 usage errors, bad configuration, or no daemon.

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::client::{self, ClientError, Connection};
use crate::config::{self, Config, KEYS};
use crate::protocol;
use crate::server;
use crate::wire::{self, request_line};

/// Exit code for usage and connection errors.
pub const EXIT_USAGE: i32 = 2;
/// How long admin commands wait to connect and for a plain reply.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

fn usage() -> String {
    let mut s = String::from(
        "Usage:
  post-build-hook-queue [serve] [--config FILE] [--KEY VALUE]...   run the daemon
  post-build-hook-queue enqueue [--socket PATH] PATH... | -        queue store paths (- reads them from stdin)
  post-build-hook-queue status [--socket PATH] [--json]            show the queue
  post-build-hook-queue wait [--socket PATH] [--timeout SECONDS]   wait until everything queued so far is uploaded
  post-build-hook-queue retry [--socket PATH]                      retry backing-off paths now
  post-build-hook-queue requeue [--socket PATH] --all-failed | PATH...  try paths given up on again
  post-build-hook-queue drop [--socket PATH] --all-failed | PATH...     drop paths from the queue (not uploaded)
  post-build-hook-queue COMMAND --help | --help | --version

Exit codes: 0 success; 1 the daemon reported a failure (enqueue refused; wait saw
paths dropped, or its --timeout passed with paths left); 2 usage error, bad
configuration, or no daemon at the socket.

Daemon settings (config file `key = value`, or flags `--key value`; flags win):
",
    );
    for (key, form) in KEYS {
        s.push_str(&format!("  {key:<22}{form}\n"));
    }
    s.push_str(&format!(
        "\nDefault socket: {} (clients: ${}); default state-dir: {}\n",
        config::default_socket().display(),
        wire::ENV_SOCKET,
        config::default_state_dir().display()
    ));
    s
}

fn fail(message: &str) -> i32 {
    eprintln!("post-build-hook-queue: {message}");
    EXIT_USAGE
}

/// Runs the command with `args` (without the program name); returns the
/// exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args = match utf8_args(args) {
        Ok(args) => args,
        Err(message) => return fail(&message),
    };
    let args = &args[..];
    let (command, rest) = match args.first().map(String::as_str) {
        None => ("serve", args),
        Some(a) if a.starts_with("--") && a != "--help" && a != "--version" => ("serve", args),
        Some(a) => (a, &args[1..]),
    };
    match command {
        "--help" | "-h" | "help" => {
            print!("{}", usage());
            0
        }
        "--version" | "-V" => {
            println!("post-build-hook-queue {}", crate::VERSION);
            0
        }
        "serve" => serve(rest),
        "enqueue" | "status" | "wait" | "retry" | "requeue" | "drop" => {
            if rest.iter().any(|a| a == "--help" || a == "-h") {
                print!("{}", command_help(command));
                return 0;
            }
            admin(command, rest)
        }
        other => fail(&format!(
            "unknown command {other:?}; commands: serve, enqueue, status, wait, retry, requeue, drop (see --help)"
        )),
    }
}

/// `COMMAND --help`: what an admin command does, its arguments and exit codes.
fn command_help(command: &str) -> String {
    let (synopsis, text) = match command {
        "enqueue" => (
            "enqueue [--socket PATH] PATH... | -",
            "Queues store paths for signing and upload. A PATH may be a link into the
store, such as ./result; - reads paths from stdin, separated by white space.
A path that does not exist is refused. Exit 0 when queued, 1 when the daemon
refused, 2 on usage errors or when no daemon answers.",
        ),
        "status" => (
            "status [--socket PATH] [--json]",
            "Shows the queue: paths queued, in flight, uploaded, dropped, backing off and
given up on (failed, with their last error), each target (its queue, what it
took, its failures and last error), the upload rate.
--json prints one JSON object on one line.",
        ),
        "wait" => (
            "wait [--socket PATH] [--timeout SECONDS]",
            "Waits until every path queued before it is uploaded to every target (or
given up on). Exit 0 when all were;
1 when some were dropped or given up on (named, with their last error), or
the timeout passed first (the last error of what it still waits for is
shown); 2 when no daemon answers.",
        ),
        "retry" => (
            "retry [--socket PATH]",
            "Makes every backing-off path due now (after the target was mended, say).
Paths given up on are not affected: see requeue.",
        ),
        "requeue" => (
            "requeue [--socket PATH] --all-failed | PATH...",
            "Tries paths given up on (see status) again, with fresh attempts (and
give-up-after counted from now), on the targets that gave up on them only;
the journal records it, so it holds across restarts. Prints how many were given
up on; a PATH that was not is left as it is.",
        ),
        "drop" => (
            "drop [--socket PATH] --all-failed | PATH...",
            "Removes paths from the queue for good: they are not uploaded. --all-failed
drops every path given up on. The journal records it and the daemon logs
each path. Prints how many were queued.",
        ),
        _ => return usage(),
    };
    format!(
        "Usage: post-build-hook-queue {synopsis}\n\n{text}\n\nThe socket is {} unless --socket or ${} says otherwise.\n",
        config::default_socket().display(),
        wire::ENV_SOCKET
    )
}

/// The arguments as text: every setting, command and path this program
/// takes is UTF-8 (store paths are ASCII), so anything else is a mistake to
/// name, not a reason to abort.
fn utf8_args(args: impl IntoIterator<Item = OsString>) -> Result<Vec<String>, String> {
    args.into_iter()
        .map(|arg| {
            arg.into_string().map_err(|arg| {
                format!(
                    "argument {:?} is not valid UTF-8; arguments (paths included) must be UTF-8 text",
                    arg.to_string_lossy()
                )
            })
        })
        .collect()
}

fn serve(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", usage());
        return 0;
    }
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    if let Err(e) = config.check_signing_key() {
        return fail(&e);
    }
    match server::serve(config) {
        Ok(()) => 0,
        Err(e) => fail(&e.to_string()),
    }
}

struct AdminArgs {
    socket: PathBuf,
    json: bool,
    timeout: Option<Duration>,
    paths: Vec<String>,
    /// `--all-failed` of `requeue` and `drop`.
    all_failed: bool,
}

/// Commands that take store paths as arguments.
fn takes_paths(command: &str) -> bool {
    matches!(command, "enqueue" | "requeue" | "drop")
}

fn parse_admin(command: &str, args: &[String]) -> Result<AdminArgs, String> {
    let mut out = AdminArgs {
        socket: client::socket_path(),
        json: false,
        timeout: None,
        paths: Vec::new(),
        all_failed: false,
    };
    let mut from_stdin = false;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| iter.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag {
            "--socket" => out.socket = PathBuf::from(value("--socket")?),
            "--json" if command == "status" => out.json = true,
            "--timeout" if command == "wait" => {
                out.timeout = Some(
                    wire::parse_seconds(&value("--timeout")?)
                        .map_err(|e| format!("--timeout: {e}"))?,
                )
            }
            "-" if command == "enqueue" => {
                from_stdin = true;
                for line in std::io::stdin().lock().lines() {
                    let line = line.map_err(|e| format!("reading paths from stdin: {e}"))?;
                    out.paths.extend(line.split_whitespace().map(String::from));
                }
            }
            "--all-failed" if command == "requeue" || command == "drop" => out.all_failed = true,
            p if takes_paths(command) && !p.starts_with("--") => out.paths.push(p.to_string()),
            _ => return Err(format!("{command}: unknown argument {arg:?} (see --help)")),
        }
    }
    if command == "enqueue" && out.paths.is_empty() && !from_stdin {
        return Err("enqueue: give store paths, or - to read them from stdin".into());
    }
    if (command == "requeue" || command == "drop") && out.paths.is_empty() != out.all_failed {
        return Err(format!(
            "{command}: give store paths, or --all-failed for every path given up on (not both)"
        ));
    }
    Ok(out)
}

fn admin(command: &str, args: &[String]) -> i32 {
    let a = match parse_admin(command, args) {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let mut conn = match Connection::open(&a.socket, ADMIN_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return fail(&connect_error(&e)),
    };
    let result = match command {
        "enqueue" | "requeue" | "drop" => {
            // Only a path to queue must exist: one to requeue or drop may
            // be gone from the store.
            let enqueuing = command == "enqueue";
            let store_dir = config::default_store_dir();
            let resolved: Result<Vec<String>, String> = a
                .paths
                .iter()
                .map(|p| resolve_path(p, &store_dir, enqueuing))
                .collect();
            match resolved {
                Ok(paths) if enqueuing => enqueue(&mut conn, &paths),
                Ok(paths) => requeue_or_drop(&mut conn, command, &paths),
                Err(e) if enqueuing => return fail(&format!("enqueue: {e}; nothing was queued")),
                Err(e) => return fail(&format!("{command}: {e}")),
            }
        }
        "status" => status(&mut conn, a.json),
        "wait" => return wait(&mut conn, a.timeout),
        _ => conn
            .request(&request_line("retry", &[]))
            .map(|(_, n)| println!("{n} backing-off path(s) will be tried again now")),
    };
    match result {
        Ok(()) => 0,
        Err(ClientError::Refused(m)) if unavailable(&m) => {
            fail(&format!("the daemon cannot serve this now: {m}"))
        }
        Err(e @ ClientError::Refused(_)) => {
            eprintln!("post-build-hook-queue: {e}");
            1
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// Why the daemon could not be reached, in words that point the right way:
/// a socket we may not open is not a missing daemon.
fn connect_error(e: &ClientError) -> String {
    match e {
        ClientError::Connect(socket, io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            format!(
                "cannot connect to the daemon at {}: permission denied; the socket's mode and group \
                 (socket-mode, socket-group) decide who may use it",
                socket.display()
            )
        }
        e => e.to_string(),
    }
}

/// True for the refusals that mean "not now" rather than "no": the daemon is
/// stopping or has too many clients. Those are connection errors (exit 2).
fn unavailable(message: &str) -> bool {
    message.starts_with(protocol::ERR_BUSY) || message.starts_with(protocol::ERR_STOPPING)
}

/// Most links followed from an argument to its store path.
const MAX_LINKS: usize = 40;

/// The store path an argument names: itself when it is directly in the
/// store, else the store path a chain of links leads to (`./result`).
/// When `must_exist`, a path that does not exist is an error; otherwise
/// (requeue, drop: the path may be gone from the store) it is passed on
/// as given, and the daemon checks its form.
fn resolve_path(arg: &str, store_dir: &str, must_exist: bool) -> Result<String, String> {
    let store = std::path::Path::new(store_dir);
    let mut path = PathBuf::from(arg);
    if path.is_relative() {
        let cwd = std::env::current_dir()
            .map_err(|e| format!("{arg}: cannot read the current directory: {e}"))?;
        path = cwd.join(path);
    }
    for _ in 0..MAX_LINKS {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(arg.to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if path.as_os_str() == arg {
                    format!("{arg} does not exist; enqueue takes paths in the Nix store ({store_dir}) that were built, or links to them such as ./result")
                } else {
                    format!("{arg} leads to {}, which does not exist; enqueue takes paths in the Nix store ({store_dir}) that were built", path.display())
                });
            }
            // Not ours to look at: the daemon may see it, and decides.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Ok(arg.to_string())
            }
            Err(e) => return Err(format!("{arg}: {e}")),
        };
        if path.parent() == Some(store) {
            return path
                .into_os_string()
                .into_string()
                .map_err(|p| format!("{arg}: {p:?} is not UTF-8"));
        }
        if !meta.file_type().is_symlink() {
            // Not in the store: sent as given, and the daemon says why not.
            return Ok(arg.to_string());
        }
        let target =
            std::fs::read_link(&path).map_err(|e| format!("{arg}: cannot read the link: {e}"))?;
        path = match path.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    Err(format!("{arg}: more than {MAX_LINKS} links in a row"))
}

/// `requeue` or `drop`, of the given paths or (none given) of every path
/// given up on.
fn requeue_or_drop(
    conn: &mut Connection,
    command: &str,
    paths: &[String],
) -> Result<(), ClientError> {
    let lines: Vec<String> = if paths.is_empty() {
        vec![request_line(&format!("{command}-failed"), &[])]
    } else {
        // Lines as long as enqueue's at most (`drop` is shorter).
        wire::enqueue_lines(paths)
            .into_iter()
            .map(|l| format!("{command}{}", &l["enqueue".len()..]))
            .collect()
    };
    let mut done = 0usize;
    for line in &lines {
        let (_, n) = conn.request(line)?;
        done += n.parse::<usize>().unwrap_or(0);
    }
    let asked = if paths.is_empty() {
        String::new()
    } else {
        format!(" of {}", paths.len())
    };
    if command == "requeue" {
        println!("requeued {done}{asked} path(s) given up on; they are tried again");
    } else {
        println!("dropped {done}{asked} queued path(s); they will not be uploaded");
    }
    Ok(())
}

fn enqueue(conn: &mut Connection, paths: &[String]) -> Result<(), ClientError> {
    let mut added = 0usize;
    for line in wire::enqueue_lines(paths) {
        let (_, n) = conn.request(&line)?;
        added += n.parse::<usize>().unwrap_or(0);
    }
    println!(
        "queued {added} new path(s); {} were already queued",
        paths.len().saturating_sub(added)
    );
    Ok(())
}

/// Prints what the daemon renders: `status` for people, or one JSON line.
fn status(conn: &mut Connection, json: bool) -> Result<(), ClientError> {
    let args: &[&str] = if json { &["json"] } else { &[] };
    let (lines, _) = conn.request(&request_line("status", args))?;
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A duration for people: `0.4s`, `42s`, `5m 3s`, `1h 3m`, `2d 5h`.
/// Fractions are shown only under 10 seconds.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds <= 0.0 {
        return "0s".to_string();
    }
    if seconds < 10.0 && seconds.fract() != 0.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `remaining N failing M [error PATH TEXT]` from the daemon, as a phrase,
/// and the error part when there is one.
fn describe_remaining(line: &str) -> Option<(String, Option<String>)> {
    let mut words = line.splitn(6, ' ');
    let (Some("remaining"), Some(n), Some("failing"), Some(m)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    let error = match (words.next(), words.next()) {
        (Some("error"), Some(rest)) => rest
            .split_once(' ')
            .map(|(path, text)| format!("last error ({path}): {text}")),
        _ => None,
    };
    Some((
        format!("{n} path(s) still queued, {m} of them failing"),
        error,
    ))
}

/// Blocks until the paths queued before the call are gone from the queue.
/// Exit 0 when all were uploaded; 1 when some were dropped or given up on,
/// or the timeout passed first; 2 when the daemon cannot be talked to.
///
/// On a terminal, the progress is one line that is rewritten in place; it
/// always ends with a newline (the next one moves the cursor up to replace
/// it), so that whenever `wait` ends, Ctrl-C included (the standard library
/// has no signal handler to tidy up with), the terminal is left on a fresh
/// line.
fn wait(conn: &mut Connection, timeout: Option<Duration>) -> i32 {
    let deadline = timeout.map(|t| Instant::now() + t);
    let tty = std::io::stderr().is_terminal();
    if let Err(e) = conn.send(&request_line("wait", &[])) {
        return fail(&e.to_string());
    }
    // Whether a progress line is on the terminal, just above the cursor.
    let mut progress = false;
    let mut last = String::new();
    loop {
        let read_timeout = deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        if let Err(e) = conn.set_read_timeout(read_timeout) {
            return fail(&e.to_string());
        }
        let line = match conn.read_line() {
            Ok(l) => l,
            Err(ClientError::Io(e))
                if deadline.is_some()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                let shown = timeout.map_or(String::new(), |t| human_duration(t.as_secs_f64()));
                let state = match describe_remaining(&last) {
                    Some((state, Some(error))) => format!("{state}; {error}"),
                    Some((state, None)) => state,
                    None => "the daemon reported no progress".to_string(),
                };
                eprintln!("post-build-hook-queue: wait timed out after {shown}: {state}");
                return 1;
            }
            Err(e) => return fail(&e.to_string()),
        };
        if let Some(msg) = wire::final_word(&line, "ok") {
            println!("{msg}");
            return 0;
        }
        if let Some(msg) = wire::final_word(&line, "err") {
            if unavailable(msg) {
                return fail(&format!("the daemon cannot serve this now: {msg}"));
            }
            eprintln!("post-build-hook-queue: {msg}");
            return 1;
        }
        if tty {
            if let Some((text, _)) = describe_remaining(&line) {
                // Up to the previous progress line, cleared, replaced.
                let up = if progress { "\x1b[1A\r\x1b[K" } else { "" };
                eprintln!("{up}waiting: {text}");
                progress = true;
            }
        }
        last = line;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn durations_for_people() {
        let cases = [
            (0.0, "0s"),
            (-1.0, "0s"),
            (f64::NAN, "0s"),
            (0.4, "0.4s"),
            (3.2, "3.2s"),
            (9.0, "9s"),
            (42.4, "42s"),
            (63.0, "1m 3s"),
            (3599.0, "59m 59s"),
            (3605.0, "1h 0m"),
            (3780.0, "1h 3m"),
            (90_000.0, "1d 1h"),
        ];
        for (secs, text) in cases {
            assert_eq!(human_duration(secs), text, "{secs}");
        }
    }

    #[test]
    fn admin_arguments() {
        let a = parse_admin("wait", &args(&["--timeout=2.5", "--socket", "/s"])).unwrap();
        assert_eq!(a.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(a.socket, PathBuf::from("/s"));
        assert!(parse_admin("status", &args(&["--json"])).unwrap().json);
        assert!(parse_admin("wait", &args(&["--json"])).is_err());
        assert!(parse_admin("wait", &args(&["--timeout", "0"])).is_err());
        assert!(parse_admin("retry", &args(&["x"])).is_err());
        assert!(parse_admin("enqueue", &args(&[])).is_err());
        let a = parse_admin("enqueue", &args(&["/nix/store/a", "/nix/store/b"])).unwrap();
        assert_eq!(a.paths.len(), 2);
        assert!(
            parse_admin("requeue", &args(&["--all-failed"]))
                .unwrap()
                .all_failed
        );
        assert_eq!(
            parse_admin("drop", &args(&["/nix/store/a"]))
                .unwrap()
                .paths
                .len(),
            1
        );
        for bad in [&[][..], &["--all-failed", "/nix/store/a"], &["--json"]] {
            assert!(parse_admin("drop", &args(bad)).is_err(), "{bad:?}");
            assert!(parse_admin("requeue", &args(bad)).is_err(), "{bad:?}");
        }
        assert!(parse_admin("enqueue", &args(&["--all-failed"])).is_err());
    }

    #[test]
    fn every_command_has_its_own_help() {
        for command in ["enqueue", "status", "wait", "retry", "requeue", "drop"] {
            let help = command_help(command);
            assert!(
                help.starts_with(&format!("Usage: post-build-hook-queue {command} ")),
                "{help}"
            );
        }
    }

    #[test]
    fn links_into_the_store_are_followed_and_missing_paths_refused() {
        let dir = std::env::temp_dir().join(format!("npbhq-cli-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = dir.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let store_s = store.to_str().unwrap();
        let real = store.join("0123456789abcdfghijklmnpqrsvwxyz-x");
        std::fs::create_dir(&real).unwrap();
        let real_s = real.to_str().unwrap().to_string();
        std::os::unix::fs::symlink(&real, dir.join("result")).unwrap();
        std::os::unix::fs::symlink("result", dir.join("result2")).unwrap();
        let link = |name: &str| dir.join(name).to_str().unwrap().to_string();
        assert_eq!(resolve_path(&real_s, store_s, true), Ok(real_s.clone()));
        assert_eq!(
            resolve_path(&link("result"), store_s, true),
            Ok(real_s.clone())
        );
        assert_eq!(
            resolve_path(&link("result2"), store_s, true),
            Ok(real_s.clone())
        );
        // A store path that is itself a link is not followed out of the store.
        let in_store_link = store.join("0123456789abcdfghijklmnpqrsvwxyz-l");
        std::os::unix::fs::symlink("/etc", &in_store_link).unwrap();
        let l = in_store_link.to_str().unwrap().to_string();
        assert_eq!(resolve_path(&l, store_s, true), Ok(l.clone()));
        let missing = format!("{store_s}/0123456789abcdfghijklmnpqrsvwxyz-gone");
        let e = resolve_path(&missing, store_s, true).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        assert_eq!(resolve_path(&missing, store_s, false), Ok(missing.clone()));
        std::os::unix::fs::symlink(&missing, dir.join("dangling")).unwrap();
        let e = resolve_path(&link("dangling"), store_s, true).unwrap_err();
        assert!(
            e.contains("leads to") && e.contains("does not exist"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn permission_denied_is_not_a_missing_daemon() {
        let denied = ClientError::Connect(
            PathBuf::from("/run/s.sock"),
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        let text = connect_error(&denied);
        assert!(
            text.starts_with("cannot connect to the daemon at /run/s.sock: permission denied;"),
            "{text}"
        );
        let missing = ClientError::Connect(
            PathBuf::from("/run/s.sock"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(connect_error(&missing).starts_with("no daemon at /run/s.sock"));
    }

    #[test]
    fn remaining_lines_read_as_phrases() {
        assert_eq!(
            describe_remaining("remaining 3 failing 1"),
            Some((
                "3 path(s) still queued, 1 of them failing".to_string(),
                None
            ))
        );
        assert_eq!(
            describe_remaining("remaining 3 failing 1 error /nix/store/x-y nix copy failed: boom"),
            Some((
                "3 path(s) still queued, 1 of them failing".to_string(),
                Some("last error (/nix/store/x-y): nix copy failed: boom".to_string())
            ))
        );
        assert_eq!(describe_remaining("ok all uploaded"), None);
    }
}
