//! The `post-build-hook-queue` command: `serve` and the admin commands.
//!
//! Exit codes: 0 success; 1 the daemon reported a failure (`wait` saw paths
//! dropped or still failing); 2 usage errors, bad configuration, or no daemon.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::client::{self, ClientError, Connection};
use crate::config::{self, Config, KEYS};
use crate::protocol::request_line;
use crate::server;

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

Daemon settings (config file `key = value`, or flags `--key value`; flags win):
",
    );
    for (key, form) in KEYS {
        s.push_str(&format!("  {key:<22}{form}\n"));
    }
    s.push_str(&format!(
        "\nDefault socket: {} (clients: ${}); default state-dir: {}\n",
        config::default_socket().display(),
        client::ENV_SOCKET,
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
pub fn main(args: &[String]) -> i32 {
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

fn serve(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", usage());
        return 0;
    }
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    if let Err(e) = check_signing_key(&config) {
        return fail(&e);
    }
    match server::serve(config) {
        Ok(()) => 0,
        Err(e) => fail(&e.to_string()),
    }
}

/// Refuses a signing key that cannot be read or that others can read.
fn check_signing_key(config: &Config) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let Some(key) = &config.signing_key_file else {
        return Ok(());
    };
    let shown = key.display();
    let meta = std::fs::metadata(key).map_err(|e| format!("signing-key-file {shown}: {e}"))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(format!(
            "signing-key-file {shown} is readable by every user; restrict it (chmod 600) before the daemon uses it"
        ));
    }
    std::fs::File::open(key)
        .map_err(|e| format!("signing-key-file {shown} cannot be read: {e}"))?;
    Ok(())
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
                    config::parse_seconds(&value("--timeout")?)
                        .map_err(|e| format!("--timeout: {e}"))?,
                )
            }
            "-" if command == "enqueue" => {
                for line in std::io::stdin().lock().lines() {
                    let line = line.map_err(|e| format!("reading paths from stdin: {e}"))?;
                    out.paths.extend(line.split_whitespace().map(String::from));
                }
            }
            p if command == "enqueue" && !p.starts_with("--") => out.paths.push(p.to_string()),
            _ => return Err(format!("{command}: unknown argument {arg:?} (see --help)")),
        }
    }
    if command == "enqueue" && out.paths.is_empty() {
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
        Err(e) => return fail(&e.to_string()),
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
        Err(e @ ClientError::Refused(_)) => {
            eprintln!("post-build-hook-queue: {e}");
            1
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn enqueue(conn: &mut Connection, paths: &[String]) -> Result<(), ClientError> {
    let mut added = 0usize;
    for line in client::enqueue_lines(paths) {
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

fn status_json(fields: &[(String, String)], backoff: &[[String; 4]]) -> String {
    let mut parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| {
            let value = if NUMERIC.contains(&k.as_str()) {
                if v == "-" || v.parse::<f64>().is_err() {
                    "null".to_string()
                } else {
                    v.clone()
                }
            } else if k == "signing" {
                (v == "true").to_string()
            } else if k == "target" && v == "-" {
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
                attempts.parse::<u64>().unwrap_or(0),
                next.parse::<f64>().unwrap_or(0.0),
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
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn status_text(fields: &[(String, String)], backoff: &[[String; 4]]) -> String {
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map_or("-", |(_, v)| v.as_str())
    };
    let mut s = String::new();
    let oldest = match get("oldest-queued-seconds") {
        "-" => String::new(),
        secs => format!(" (oldest queued {secs} s ago)"),
    };
    s.push_str(&format!("queued:       {}{oldest}\n", get("queued")));
    s.push_str(&format!("in flight:    {}\n", get("in-flight")));
    s.push_str(&format!("uploaded:     {} since start\n", get("uploaded")));
    s.push_str(&format!("dropped:      {} since start\n", get("dropped")));
    s.push_str(&format!("backing off:  {}\n", get("backing-off")));
    s.push_str(&format!("failed calls: {}\n", get("failed-calls")));
    s.push_str(&format!("target:       {}\n", get("target")));
    s.push_str(&format!(
        "signing:      {}\n",
        if get("signing") == "true" {
            "on"
        } else {
            "off"
        }
    ));
    s.push_str(&format!("uptime:       {} s\n", get("uptime-seconds")));
    s.push_str(&format!("version:      {}\n", get("version")));
    for [attempts, next, path, error] in backoff {
        s.push_str(&format!(
            "  {path}: attempt {attempts} failed, next try in {next} s: {error}\n"
        ));
    }
    s
}

fn wait(conn: &mut Connection, timeout: Option<Duration>) -> i32 {
    let deadline = timeout.map(|t| Instant::now() + t);
    let tty = std::io::stderr().is_terminal();
    if let Err(e) = conn.send(&request_line("wait", &[])) {
        return fail(&e.to_string());
    }
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
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if tty {
                    eprintln!();
                }
                let state = last.strip_prefix("remaining ").unwrap_or("unknown");
                eprintln!("post-build-hook-queue: wait timed out; still queued: {state}");
                return 1;
            }
            Err(e) => return fail(&e.to_string()),
        };
        if let Some(msg) = client::final_word(&line, "ok") {
            if tty {
                eprintln!();
            }
            println!("{msg}");
            return 0;
        }
        if let Some(msg) = client::final_word(&line, "err") {
            if tty {
                eprintln!();
            }
            eprintln!("post-build-hook-queue: {msg}");
            return 1;
        }
        if tty {
            eprint!("\r{line}   ");
        }
        last = line;
    }
}
