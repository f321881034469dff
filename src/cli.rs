//! The `post-build-hook-queue` command: the daemon (`serve`), the check of
//! its settings (`check-config`) and the admin commands, and their help.

use std::ffi::OsString;
use std::io::ErrorKind::{self, TimedOut, WouldBlock};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::client::{self, ClientError, Connection};
use crate::config::{self, Config};
use crate::server::{self, ServeError};
use crate::wire::{self, request_line};
use crate::{protocol, target};

/// Exit status of a configuration error (`EX_CONFIG`), and of nothing else.
pub const EXIT_CONFIG: i32 = 78;
/// Exit status of usage errors of the admin commands, and of no daemon.
pub const EXIT_USAGE: i32 = 2;
/// How long admin commands wait to connect and for a plain reply.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What each exit status means, as `--help` shows it.
const EXIT_STATUSES: &str = "\
Exit statuses:
  serve, check-config: 0 a clean stop (check-config: no problem); 78 a configuration
    error (each problem on a line of its own; a restart cannot mend it); 1 a start
    error that may pass (journal I/O, state-dir locked by another daemon, socket in use)
  admin commands: 0 done; 1 the daemon reported a failure (enqueue refused; wait saw
    paths dropped or given up on, or its --timeout passed); 2 a usage error, or no
    daemon at the socket
";

/// Each command: its synopsis on the first line, then its help; a blank line between.
const COMMANDS: &str = "\
serve [--config FILE] [--KEY VALUE]...
Runs the daemon (also without a COMMAND) until SIGTERM or SIGINT. Settings: the
defaults, then the --config file, then the --KEY VALUE (or --KEY=VALUE) flags.

check-config [--config FILE] [--KEY VALUE]...
Runs the checks serve runs before it opens anything and prints each problem on
a line of its own. Left to serve: the key file's owner and mode, the targets.

enqueue [--socket PATH] PATH... | -
Queues store paths, or links to them such as ./result (-: read them from
stdin). A path that does not exist is refused, and nothing is queued.

status [--socket PATH] [--json]
Shows the queue, each target, and the paths backing off or given up on with
their last error; --json: as one JSON object on one line.

wait [--socket PATH] [--timeout SECONDS]
Waits until every path queued before it is uploaded to every target or given
up on (those are named, with their last error), or the --timeout passes.

retry [--socket PATH]
Makes every backing-off path due now (not those given up on: see requeue).

requeue [--socket PATH] --all-failed | PATH...
Tries paths given up on again, with fresh attempts (and give-up-after counted
from now), on the targets that gave up on them; the journal records it.

drop [--socket PATH] --all-failed | PATH...
Removes paths from the queue for good (they are not uploaded); --all-failed:
every path given up on. The journal records it.";

/// Each command's name, synopsis and help.
fn commands() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    COMMANDS.split("\n\n").map(|block| {
        let (synopsis, text) = block.split_once('\n').unwrap_or((block, ""));
        (synopsis.split(' ').next().unwrap_or(""), synopsis, text)
    })
}

/// The daemon's settings with their defaults, as `--help` shows them.
fn settings_help() -> String {
    let table = config::help_table();
    format!(
        "Daemon settings (config file `key = value`, or flags `--key value`; flags win):\n\
         {table}\nSTATE is the state-dir. NIX_STORE_DIR, XDG_RUNTIME_DIR, XDG_STATE_HOME,\n\
         HOME and TMPDIR in the environment make the defaults.\n"
    )
}

fn usage() -> String {
    let line = |c: (_, &str, _)| format!("  post-build-hook-queue {}\n", c.1);
    let (synopses, settings) = (commands().map(line).collect::<String>(), settings_help());
    let help = "  post-build-hook-queue COMMAND --help | --help | --version\n";
    format!("Usage:\n{synopses}{help}\n{EXIT_STATUSES}\n{settings}")
}

/// `COMMAND --help`: what a command does, its arguments and exit statuses.
fn command_help(command: &str) -> String {
    let (name, synopsis, text) = commands().find(|c| c.0 == command).unwrap_or_default();
    let (socket, env) = (Config::new().socket.display().to_string(), wire::ENV_SOCKET);
    let more = match name {
        "serve" | "check-config" => settings_help(),
        _ => format!("The socket is {socket} unless --socket or ${env} says otherwise.\n"),
    };
    format!("Usage: post-build-hook-queue {synopsis}\n\n{text}\n\n{EXIT_STATUSES}\n{more}")
}

fn fail(message: &str, status: i32) -> i32 {
    eprintln!("post-build-hook-queue: {message}");
    status
}

/// Runs the command with `args` (without the program name); returns the exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args: Vec<String> = match args.into_iter().map(OsString::into_string).collect() {
        Ok(args) => args,
        Err(arg) => {
            let arg = arg.to_string_lossy();
            let message = format!("argument {arg:?} is not valid UTF-8; arguments (paths included) must be UTF-8 text");
            return fail(&message, EXIT_USAGE);
        }
    };
    let (command, rest) = match args.first().map(String::as_str) {
        None => ("serve", &args[..]),
        Some(a) if a.starts_with("--") && a != "--help" && a != "--version" => ("serve", &args[..]),
        Some(a) => (a, &args[1..]),
    };
    let known = commands().any(|c| c.0 == command);
    let help = known && rest.iter().any(|a| a == "--help" || a == "-h");
    let print = |text: String| {
        print!("{text}");
        0
    };
    match command {
        _ if help => print(command_help(command)),
        "--help" | "-h" | "help" => print(usage()),
        "--version" | "-V" => print(format!("post-build-hook-queue {}\n", crate::VERSION)),
        "serve" => match configure(rest, true).map(server::serve) {
            Ok(Ok(())) => 0,
            Ok(Err(e @ ServeError::Config(_))) => fail(&e.to_string(), EXIT_CONFIG),
            Ok(Err(e)) => fail(&e.to_string(), 1),
            Err(status) => status,
        },
        "check-config" => configure(rest, false).map_or_else(|status| status, |_| 0),
        _ if known => admin(command, rest),
        other => fail(
            &format!("unknown command {other:?}; commands: serve, check-config, enqueue, status, wait, retry, requeue, drop (see --help)"),
            EXIT_USAGE,
        ),
    }
}

/// The configuration from `args`; else every problem, one line each, and [`EXIT_CONFIG`].
fn configure(args: &[String], at_start: bool) -> Result<Config, i32> {
    let (config, mut problems) = Config::from_args(args, at_start);
    // The journal names targets by their URL without secrets.
    let targets = target::configured(&config);
    for (i, t) in targets.iter().enumerate() {
        if targets[..i].iter().any(|u| u.id == t.id) {
            let twice = format!("upload-to: the target {} is given twice", t.label);
            problems.push(format!("{twice}; give each target once"));
        }
    }
    for problem in &problems {
        eprintln!("post-build-hook-queue: {problem}");
    }
    problems.is_empty().then_some(config).ok_or(EXIT_CONFIG)
}

#[derive(Default)]
struct AdminArgs {
    socket: Option<PathBuf>,
    json: bool,
    timeout: Option<Duration>,
    paths: Vec<String>,
    all_failed: bool,
}

fn parse_admin(command: &str, args: &[String]) -> Result<AdminArgs, String> {
    let mut out = AdminArgs::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut next = || inline.clone().or_else(|| iter.next().cloned());
        let mut value = || next().ok_or_else(|| format!("{flag} needs a value"));
        match flag {
            "--socket" => out.socket = Some(PathBuf::from(value()?)),
            "--json" if command == "status" => out.json = true,
            "--timeout" if command == "wait" => {
                let seconds = wire::parse_seconds(&value()?);
                out.timeout = Some(seconds.map_err(|e| format!("--timeout: {e}"))?)
            }
            "-" if command == "enqueue" => {
                let text = std::io::read_to_string(std::io::stdin());
                let text = text.map_err(|e| format!("reading paths from stdin: {e}"))?;
                out.paths.extend(text.split_whitespace().map(String::from));
            }
            "--all-failed" if command == "requeue" || command == "drop" => out.all_failed = true,
            p if matches!(command, "enqueue" | "requeue" | "drop") && !p.starts_with("--") => {
                out.paths.push(p.to_string())
            }
            _ => return Err(format!("{command}: unknown argument {arg:?} (see --help)")),
        }
    }
    let given = !out.paths.is_empty() || args.iter().any(|a| a == "-");
    match command {
        "enqueue" if !given => {
            Err("enqueue: give store paths, or - to read them from stdin".into())
        }
        "requeue" | "drop" if given == out.all_failed => Err(format!(
            "{command}: give store paths, or --all-failed for every path given up on (not both)"
        )),
        _ => Ok(out),
    }
}

fn admin(command: &str, args: &[String]) -> i32 {
    let a = match parse_admin(command, args) {
        Ok(a) => a,
        Err(e) => return fail(&e, EXIT_USAGE),
    };
    let socket = a.socket.unwrap_or_else(client::socket_path);
    let mut conn = match Connection::open(&socket, ADMIN_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return fail(&connect_error(&e), EXIT_USAGE),
    };
    let (store_dir, enqueuing) = (Config::new().store_dir, command == "enqueue");
    let resolve = |p: &String| resolve_path(p, &store_dir, enqueuing);
    let paths = match a.paths.iter().map(resolve).collect::<Result<Vec<_>, _>>() {
        Ok(paths) => paths,
        Err(e) if enqueuing => {
            return fail(&format!("enqueue: {e}; nothing was queued"), EXIT_USAGE)
        }
        Err(e) => return fail(&format!("{command}: {e}"), EXIT_USAGE),
    };
    let result = match command {
        "enqueue" | "requeue" | "drop" => send_paths(&mut conn, command, &paths),
        "status" => {
            let line = request_line("status", if a.json { &["json"] } else { &[] });
            // A bounded reply (`request` keeps at most MAX_KEPT), then printed.
            let print = |l: &String| drop(writeln!(std::io::stdout(), "{l}"));
            conn.request(&line)
                .map(|(lines, _)| lines.iter().for_each(print))
        }
        "wait" => wait(&mut conn, a.timeout),
        _ => conn
            .request(&request_line("retry", &[]))
            .map(|(_, n)| println!("{n} backing-off path(s) will be tried again now")),
    };
    // A "not now" (stopping, too many clients) counts as no daemon.
    let (busy, stopping) = (protocol::ERR_BUSY, protocol::ERR_STOPPING);
    match result {
        Ok(()) => 0,
        Err(ClientError::Refused(m)) if m.starts_with(busy) || m.starts_with(stopping) => fail(
            &format!("the daemon cannot serve this now: {m}"),
            EXIT_USAGE,
        ),
        Err(ClientError::Refused(m)) if command == "wait" => fail(&m, 1),
        Err(ClientError::Refused(m)) => fail(&format!("the daemon refused: {m}"), 1),
        Err(e) => fail(&e.to_string(), EXIT_USAGE),
    }
}

/// Why the daemon could not be reached (a socket we may not open is not a missing one).
fn connect_error(e: &ClientError) -> String {
    match e {
        ClientError::Connect(socket, io) if io.kind() == ErrorKind::PermissionDenied => format!(
            "cannot connect to the daemon at {}: permission denied; the socket's mode and group \
             (socket-mode, socket-group) decide who may use it",
            socket.display()
        ),
        e => e.to_string(),
    }
}

/// The store path an argument names: itself, or where its links lead (`./result`).
/// Unless `must_exist` (requeue, drop), a missing path is sent as given.
fn resolve_path(arg: &str, store_dir: &str, must_exist: bool) -> Result<String, String> {
    let mut path = std::path::absolute(arg)
        .map_err(|e| format!("{arg}: cannot read the current directory: {e}"))?;
    for _ in 0..40 {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Not ours to look at: the daemon may see it, and decides.
            Err(e) if e.kind() == ErrorKind::PermissionDenied => return Ok(arg.to_string()),
            Err(e) if e.kind() == ErrorKind::NotFound && !must_exist => return Ok(arg.to_string()),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let leads = format!(" leads to {}, which", path.display());
                let leads = if path.as_os_str() == arg { "" } else { &leads };
                return Err(format!("{arg}{leads} does not exist; enqueue takes paths in the Nix store ({store_dir}) that were built, or links to them such as ./result"));
            }
            Err(e) => return Err(format!("{arg}: {e}")),
        };
        if path.parent() == Some(std::path::Path::new(store_dir)) {
            let utf8 = path.to_str().map(String::from);
            return utf8.ok_or_else(|| format!("{arg}: {path:?} is not UTF-8"));
        }
        if !meta.file_type().is_symlink() {
            // Not in the store: sent as given, and the daemon says why not.
            return Ok(arg.to_string());
        }
        let target =
            std::fs::read_link(&path).map_err(|e| format!("{arg}: cannot read the link: {e}"))?;
        // Relative to the link's directory (`join` keeps an absolute target as it is).
        path = path.parent().unwrap_or(&path).join(target);
    }
    Err(format!("{arg}: more than 40 links in a row"))
}

/// `enqueue`, `requeue` or `drop` of `paths` (none: every path given up on).
fn send_paths(conn: &mut Connection, command: &str, paths: &[String]) -> Result<(), ClientError> {
    let lines = match paths.is_empty() && command != "enqueue" {
        true => vec![request_line(&format!("{command}-failed"), &[])],
        // enqueue's lines with this command (`drop` is shorter).
        false => wire::enqueue_lines(paths),
    };
    let mut done = 0usize;
    for line in &lines {
        let (_, n) = conn.request(&line.replacen("enqueue", command, 1))?;
        done += n.parse::<usize>().unwrap_or(0);
    }
    let of = match paths.len() {
        0 => String::new(),
        n => format!(" of {n}"),
    };
    let already = paths.len().saturating_sub(done);
    match command {
        "enqueue" => println!("queued {done} new path(s); {already} were already queued"),
        "requeue" => println!("requeued {done}{of} path(s) given up on; they are tried again"),
        _ => println!("dropped {done}{of} queued path(s); they will not be uploaded"),
    }
    Ok(())
}

/// `remaining N failing M [error PATH TEXT]` as a phrase (the error part when `error`).
fn describe_remaining(line: &str, error: bool) -> Option<String> {
    let mut words = line.splitn(7, ' ');
    let words: [_; 7] = std::array::from_fn(|_| words.next());
    let [Some("remaining"), Some(n), Some("failing"), Some(m), tag, path, why] = words else {
        return None;
    };
    let mut text = format!("{n} path(s) still queued, {m} of them failing");
    if let (true, Some("error"), Some(path), Some(why)) = (error, tag, path, why) {
        text.push_str(&format!("; last error ({path}): {why}"));
    }
    Some(text)
}

/// Blocks until the paths queued before the call are gone; a timeout is a refusal
/// saying what is left. On a terminal, one progress line is replaced in place.
fn wait(conn: &mut Connection, timeout: Option<Duration>) -> Result<(), ClientError> {
    let tty = std::io::stderr().is_terminal();
    let (mut progress, mut last) = (false, String::new());
    conn.send(&request_line("wait", &[]))?;
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        if let Some(left) = deadline.map(|d| d.saturating_duration_since(Instant::now())) {
            conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        }
        let line = match (conn.read_line(), timeout) {
            (Err(ClientError::Io(e)), Some(t)) if matches!(e.kind(), WouldBlock | TimedOut) => {
                let state = describe_remaining(&last, true);
                let state = state.unwrap_or_else(|| "the daemon reported no progress".into());
                let message = format!("wait timed out after {}s: {state}", t.as_secs_f64());
                return Err(ClientError::Refused(message));
            }
            (line, _) => line?,
        };
        if let Some(message) = wire::final_word(&line, "ok") {
            println!("{message}");
            return Ok(());
        }
        if let Some(reason) = wire::final_word(&line, "err") {
            return Err(ClientError::Refused(reason.to_string()));
        }
        if let Some(text) = describe_remaining(&line, false).filter(|_| tty) {
            // Up to the previous progress line, cleared, replaced.
            let up = if progress { "\x1b[1A\r\x1b[K" } else { "" };
            eprintln!("{up}waiting: {text}");
            progress = true;
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
    fn check_config_refuses_the_same_target_twice() {
        let twice = args(&["--upload-to", "ssh://u:a@h", "--upload-to=ssh://u:b@h"]);
        assert_eq!(configure(&twice, false).err(), Some(EXIT_CONFIG));
        let two = args(&["--upload-to", "ssh://h", "--upload-to=ssh://g"]);
        assert_eq!(configure(&two, false).unwrap().upload_to.len(), 2);
    }

    #[test]
    fn admin_arguments() {
        let a = parse_admin("wait", &args(&["--timeout=2.5", "--socket", "/s"])).unwrap();
        assert_eq!(a.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(a.socket, Some(PathBuf::from("/s")));
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
    fn every_command_has_its_own_help_with_every_exit_status() {
        for (command, ..) in commands() {
            let help = command_help(command);
            assert!(
                help.starts_with(&format!("Usage: post-build-hook-queue {command} ")),
                "{help}"
            );
            for status in ["0 ", "1 ", "2 ", "78 "] {
                assert!(help.contains(status), "{command}: {status}");
            }
        }
        for command in ["serve", "check-config"] {
            let help = command_help(command);
            assert!(
                help.contains("max-attempts") && help.contains("[default: 10]"),
                "{help}"
            );
        }
        let help = usage();
        assert!(help.contains("check-config [--config FILE]") && help.contains("[default: 1000]"));
        // One line per key after the header (packaging.rs reads them so).
        let table = help.split("Daemon settings").nth(1).unwrap();
        let keys = table
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .count();
        assert_eq!(keys, config::keys().count());
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
        let line = "remaining 3 failing 1 error /nix/store/x-y nix copy failed: boom";
        assert_eq!(
            describe_remaining("remaining 3 failing 1", true).as_deref(),
            Some("3 path(s) still queued, 1 of them failing")
        );
        assert_eq!(
            describe_remaining(line, false).as_deref(),
            Some("3 path(s) still queued, 1 of them failing")
        );
        assert_eq!(
            describe_remaining(line, true).as_deref(),
            Some("3 path(s) still queued, 1 of them failing; last error (/nix/store/x-y): nix copy failed: boom")
        );
        assert_eq!(describe_remaining("ok all uploaded", true), None);
    }
}
