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
  post-build-hook-queue --help | --version

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
        "enqueue" | "status" | "wait" | "retry" => admin(command, rest),
        other => fail(&format!(
            "unknown command {other:?}; commands: serve, enqueue, status, wait, retry (see --help)"
        )),
    }
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
}

fn parse_admin(command: &str, args: &[String]) -> Result<AdminArgs, String> {
    let mut out = AdminArgs {
        socket: client::socket_path(),
        json: false,
        timeout: None,
        paths: Vec::new(),
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
            p if command == "enqueue" && !p.starts_with("--") => out.paths.push(p.to_string()),
            _ => return Err(format!("{command}: unknown argument {arg:?} (see --help)")),
        }
    }
    if command == "enqueue" && out.paths.is_empty() && !from_stdin {
        return Err("enqueue: give store paths, or - to read them from stdin".into());
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
        "enqueue" => enqueue(&mut conn, &a.paths),
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

fn status(conn: &mut Connection, json: bool) -> Result<(), ClientError> {
    let (lines, _) = conn.request(&request_line("status", &[]))?;
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut backoff: Vec<[String; 4]> = Vec::new();
    for line in &lines {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        if key == "backoff" {
            let mut parts = value.splitn(4, ' ').map(String::from);
            let mut next = || parts.next().unwrap_or_default();
            backoff.push([next(), next(), next(), next()]);
        } else {
            fields.push((key.to_string(), value.to_string()));
        }
    }
    let mut out = std::io::stdout().lock();
    let text = if json {
        status_json(&fields, &backoff)
    } else {
        status_text(&fields, &backoff)
    };
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

/// Fields whose value is a JSON number (or null when `-`).
const NUMERIC: &[&str] = &[
    "uptime-seconds",
    "queued",
    "in-flight",
    "uploaded",
    "dropped",
    "failed-calls",
    "backing-off",
    "oldest-queued-seconds",
    "upload-seconds-sum",
    "upload-batches",
];

/// `value` as a JSON number if it is one (by JSON's grammar, so never
/// `NaN`, `inf` or `+1`), else `null`.
fn json_number(value: &str) -> String {
    let b = value.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let int_start = i;
    let ok_int = match digits(&mut i) {
        0 => false,
        1 => true,
        _ => b[int_start] != b'0',
    };
    let mut ok = ok_int;
    if ok && b.get(i) == Some(&b'.') {
        i += 1;
        ok = digits(&mut i) > 0;
    }
    if ok && matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        ok = digits(&mut i) > 0;
    }
    if ok && i == b.len() {
        value.to_string()
    } else {
        "null".to_string()
    }
}

/// The `status --json` object: the daemon's `KEY VALUE` lines with `-` in
/// keys turned into `_` (numbers as numbers, `signing` a boolean, `-` as
/// null), plus `backoff`, the list of failing paths.
fn status_json(fields: &[(String, String)], backoff: &[[String; 4]]) -> String {
    let mut parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| {
            let value = if NUMERIC.contains(&k.as_str()) {
                json_number(v)
            } else if k == "signing" {
                (v == "true").to_string()
            } else if v == "-" {
                "null".to_string()
            } else {
                json_string(v)
            };
            format!("{}:{value}", json_string(&k.replace('-', "_")))
        })
        .collect();
    let items: Vec<String> = backoff
        .iter()
        .map(|[attempts, next, path, error]| {
            format!(
                "{{\"path\":{},\"attempts\":{},\"next_try_seconds\":{},\"last_error\":{}}}",
                json_string(path),
                json_number(attempts),
                json_number(next),
                json_string(error)
            )
        })
        .collect();
    parts.push(format!("\"backoff\":[{}]", items.join(",")));
    format!("{{{}}}\n", parts.join(","))
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

fn status_text(fields: &[(String, String)], backoff: &[[String; 4]]) -> String {
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map_or("-", |(_, v)| v.as_str())
    };
    let duration = |k: &str| match get(k).parse::<f64>() {
        Ok(secs) => human_duration(secs),
        Err(_) => get(k).to_string(),
    };
    let mut s = String::new();
    let oldest = match get("oldest-queued-seconds") {
        "-" => String::new(),
        _ => format!(" (oldest queued {} ago)", duration("oldest-queued-seconds")),
    };
    s.push_str(&format!("queued:       {}{oldest}\n", get("queued")));
    s.push_str(&format!("in flight:    {}\n", get("in-flight")));
    s.push_str(&format!("uploaded:     {} since start\n", get("uploaded")));
    s.push_str(&format!("dropped:      {} since start\n", get("dropped")));
    s.push_str(&format!("backing off:  {}\n", get("backing-off")));
    s.push_str(&format!(
        "failed calls: {} since start\n",
        get("failed-calls")
    ));
    let target = match get("target") {
        "-" => "none (upload-to is not set)",
        t => t,
    };
    s.push_str(&format!("target:       {target}\n"));
    s.push_str(&format!(
        "signing:      {}\n",
        if get("signing") == "true" {
            "on"
        } else {
            "off"
        }
    ));
    s.push_str(&format!("uptime:       {}\n", duration("uptime-seconds")));
    s.push_str(&format!("version:      {}\n", get("version")));
    for [attempts, next, path, error] in backoff {
        let when = match next.parse::<f64>() {
            Ok(secs) if secs > 0.0 => format!("next try in {}", human_duration(secs)),
            _ => "retrying now".to_string(),
        };
        s.push_str(&format!(
            "  {path}: attempt {attempts} failed, {when}: {error}\n"
        ));
    }
    let total: usize = get("backing-off").parse().unwrap_or(0);
    if total > backoff.len() {
        s.push_str(&format!(
            "  ... and {} more (status lists the {} soonest)\n",
            total - backoff.len(),
            backoff.len()
        ));
    }
    s
}

/// `remaining N failing M` from the daemon, as a phrase.
fn describe_remaining(line: &str) -> Option<String> {
    let mut words = line.split(' ');
    let (Some("remaining"), Some(n), Some("failing"), Some(m)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    Some(format!("{n} path(s) still queued, {m} of them failing"))
}

/// Blocks until the paths queued before the call are gone from the queue.
/// Exit 0 when all were uploaded; 1 when some were dropped or the timeout
/// passed first; 2 when the daemon cannot be talked to.
fn wait(conn: &mut Connection, timeout: Option<Duration>) -> i32 {
    let deadline = timeout.map(|t| Instant::now() + t);
    let tty = std::io::stderr().is_terminal();
    if let Err(e) = conn.send(&request_line("wait", &[])) {
        return fail(&e.to_string());
    }
    // Whether a progress line (without its newline) is on the terminal.
    let mut progress = false;
    let end_progress = |progress: &mut bool| {
        if std::mem::take(progress) {
            eprintln!();
        }
    };
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
                end_progress(&mut progress);
                let shown = timeout.map_or(String::new(), |t| human_duration(t.as_secs_f64()));
                let state = describe_remaining(&last)
                    .unwrap_or_else(|| "the daemon reported no progress".to_string());
                eprintln!("post-build-hook-queue: wait timed out after {shown}: {state}");
                return 1;
            }
            Err(e) => {
                end_progress(&mut progress);
                return fail(&e.to_string());
            }
        };
        if let Some(msg) = wire::final_word(&line, "ok") {
            end_progress(&mut progress);
            println!("{msg}");
            return 0;
        }
        if let Some(msg) = wire::final_word(&line, "err") {
            end_progress(&mut progress);
            if unavailable(msg) {
                return fail(&format!("the daemon cannot serve this now: {msg}"));
            }
            eprintln!("post-build-hook-queue: {msg}");
            return 1;
        }
        if tty {
            if let Some(text) = describe_remaining(&line) {
                eprint!("\r\x1b[Kwaiting: {text}");
                progress = true;
            }
        }
        last = line;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

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
    fn json_numbers_follow_the_json_grammar() {
        for ok in ["0", "12", "-1.5", "1e3", "2E-2", "0.000"] {
            assert_eq!(json_number(ok), ok);
        }
        for bad in ["NaN", "inf", "+1", "01", "1.", ".5", "", "-", "1e", "3 s"] {
            assert_eq!(json_number(bad), "null", "{bad:?}");
        }
    }

    #[test]
    fn status_json_is_one_object_with_escaped_strings() {
        let f = fields(&[
            ("version", "0.1.0"),
            ("queued", "2"),
            ("oldest-queued-seconds", "-"),
            ("upload-seconds-sum", "0.250"),
            ("signing", "true"),
            ("target", "-"),
        ]);
        let backoff = [[
            "3".to_string(),
            "1.5".to_string(),
            "/nix/store/x-y".to_string(),
            "a \"quoted\" \\ path\tand\u{1}".to_string(),
        ]];
        assert_eq!(
            status_json(&f, &backoff),
            "{\"version\":\"0.1.0\",\"queued\":2,\"oldest_queued_seconds\":null,\
             \"upload_seconds_sum\":0.250,\"signing\":true,\"target\":null,\
             \"backoff\":[{\"path\":\"/nix/store/x-y\",\"attempts\":3,\"next_try_seconds\":1.5,\
             \"last_error\":\"a \\\"quoted\\\" \\\\ path\\tand\\u0001\"}]}\n"
        );
    }

    #[test]
    fn status_text_shows_durations_and_backoff() {
        let f = fields(&[
            ("version", "0.1.0"),
            ("uptime-seconds", "3725"),
            ("queued", "3"),
            ("in-flight", "1"),
            ("uploaded", "7"),
            ("dropped", "0"),
            ("failed-calls", "2"),
            ("backing-off", "3"),
            ("oldest-queued-seconds", "75"),
            ("signing", "false"),
            ("target", "-"),
        ]);
        let b = |attempts: &str, next: &str, path: &str| {
            [attempts, next, path, "boom"].map(String::from)
        };
        let text = status_text(
            &f,
            &[
                b("1", "0.0", "/nix/store/a"),
                b("2", "125.3", "/nix/store/b"),
            ],
        );
        assert_eq!(
            text,
            "queued:       3 (oldest queued 1m 15s ago)\n\
             in flight:    1\n\
             uploaded:     7 since start\n\
             dropped:      0 since start\n\
             backing off:  3\n\
             failed calls: 2 since start\n\
             target:       none (upload-to is not set)\n\
             signing:      off\n\
             uptime:       1h 2m\n\
             version:      0.1.0\n\
             \x20 /nix/store/a: attempt 1 failed, retrying now: boom\n\
             \x20 /nix/store/b: attempt 2 failed, next try in 2m 5s: boom\n\
             \x20 ... and 1 more (status lists the 2 soonest)\n"
        );
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
            describe_remaining("remaining 3 failing 1").as_deref(),
            Some("3 path(s) still queued, 1 of them failing")
        );
        assert_eq!(describe_remaining("ok all uploaded"), None);
    }
}
