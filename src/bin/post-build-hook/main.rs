//! The hook Nix runs after each build: hands the built paths to the daemon
//! (or to the spool) and always exits 0, so a queue problem never fails a
//! build.
//!
//! It connects as the admin commands do ([`npbhq::client`]: only to a socket
//! of root or of its own user, the connect bounded), sends the request lines
//! of [`npbhq::wire`], and spools what the daemon did not acknowledge where
//! the daemon reads it ([`spool`]). Nix puts `post-build-hook: ` before each
//! line the hook writes, so its lines do not name the program again.

mod spool;

use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use npbhq::client::{self, ClientError, Connection};
use npbhq::config::Config;
use npbhq::wire;

fn main() {
    exit_0_on_panic();
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next()) {
        (None, _) => run(),
        (Some(a), None) if a == "--version" => {
            say_out(&format!("post-build-hook {}\n", npbhq::VERSION));
        }
        _ => say_out(&usage()),
    }
}

/// A panic is a bug, not a condition the hook expects: it says so in one
/// line and still exits 0, as a failing hook would stop Nix's build loop.
/// This runs before the panic would abort or unwind.
fn exit_0_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = (payload.downcast_ref::<&str>().copied())
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic");
        let at = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        say_err(&format!(
            "internal error{at}: {}; the paths of this build may not be queued\n",
            message.replace('\n', " ")
        ));
        std::process::exit(0)
    }));
}

/// Writes to stdout, ignoring a closed or broken one, which must not fail
/// the hook (`println!` would panic).
fn say_out(text: &str) {
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// Writes to stderr in one write, as Nix's log takes it, ignoring errors
/// (a log reader that went away, say).
fn say_err(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Where the hook looks, after its environment.
struct Settings {
    socket: PathBuf,
    spool: PathBuf,
    timeout: Duration,
}

impl Settings {
    /// The socket as the admin commands find it, the spool as a daemon
    /// started with defaults reads it, unless the environment says
    /// otherwise.
    fn from_env() -> Settings {
        let timeout = std::env::var(wire::ENV_TIMEOUT)
            .ok()
            .and_then(|v| wire::parse_seconds(&v).ok())
            .unwrap_or(wire::DEFAULT_HOOK_TIMEOUT);
        Settings {
            socket: client::socket_path(),
            spool: set(wire::ENV_SPOOL)
                .map(PathBuf::from)
                .unwrap_or_else(|| Config::default().spool_dir()),
            timeout,
        }
    }
}

/// An environment variable that is set and not empty.
fn set(key: &str) -> Option<OsString> {
    std::env::var_os(key).filter(|v| !v.is_empty())
}

fn usage() -> String {
    let settings = Settings::from_env();
    format!(
        "Usage: post-build-hook   (run by Nix as its post-build-hook; takes no arguments)\n\
         Reads OUT_PATHS, or DRV_PATH when OUT_PATHS is empty, and hands the paths to\n\
         post-build-hook-queue, or to its spool when the daemon does not take them:\n  \
         socket  ${:<16} now {}\n  \
         spool   ${:<16} now {}\n  \
         wait    ${:<16} seconds in all, default {}\n\
         Talks only to a socket owned by root or by its own user. Always exits 0.\n",
        wire::ENV_SOCKET,
        settings.socket.display(),
        wire::ENV_SPOOL,
        settings.spool.display(),
        wire::ENV_TIMEOUT,
        wire::DEFAULT_HOOK_TIMEOUT.as_secs()
    )
}

fn run() {
    // Nix's paths are text; a value that is not UTF-8 holds no store path.
    let var = |key| std::env::var(key).unwrap_or_default();
    let outcome = hook(&var("OUT_PATHS"), &var("DRV_PATH"), &Settings::from_env());
    if !matches!(outcome, Outcome::Queued) {
        say_err(&format!("{outcome}\n"));
    }
}

/// What the hook did, for its one line on stderr.
enum Outcome {
    /// The daemon acknowledged everything.
    Queued,
    /// Nix gave no paths.
    NothingToQueue,
    /// The daemon was not reachable, not trusted or did not acknowledge;
    /// the rest was spooled to the file.
    Spooled(ClientError, PathBuf),
    /// Neither the daemon nor the spool took the request.
    Lost(ClientError, PathBuf, std::io::Error),
    /// The daemon refused the request as malformed (a path that is not a
    /// valid store path, say); it is not spooled, as it would be refused
    /// again.
    Refused(String),
}

/// Why the daemon did not take the request, as the hook's user can act on
/// it: the socket comes from the environment, not from a `--socket`.
struct Why<'a>(&'a ClientError);

impl fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ClientError::Connect(socket, e) if e.kind() != std::io::ErrorKind::TimedOut => write!(
                f,
                "no daemon at {} ({e}); is post-build-hook-queue running? (socket from ${})",
                socket.display(),
                wire::ENV_SOCKET
            ),
            e => e.fmt(f),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Queued => write!(f, "queued"),
            Outcome::NothingToQueue => {
                write!(f, "nothing to queue: OUT_PATHS and DRV_PATH are both empty")
            }
            Outcome::Spooled(e, file) => write!(
                f,
                "{}; spooled the paths to {} for the daemon to pick up",
                Why(e),
                file.display()
            ),
            Outcome::Refused(reason) => write!(
                f,
                "the daemon refused the paths: {reason}; they are NOT queued"
            ),
            Outcome::Lost(e, dir, se) => write!(
                f,
                "{}; and cannot write the spool {}: {se}; these paths are NOT queued",
                Why(e),
                dir.display()
            ),
        }
    }
}

/// Bounds the connect, which blocks while the daemon's backlog is full (a
/// daemon that stopped accepting): a thread that waits for the deadline and,
/// if the connect is still going on (the flag it returns still set), spools
/// every line, says so and ends the process with 0. A thread that only waits
/// keeps the connect itself on the main thread, so the usual hook run does
/// not wait for a second thread to be scheduled.
fn watch_the_connect(lines: &[String], settings: &Settings) -> Arc<Mutex<bool>> {
    let connecting = Arc::new(Mutex::new(true));
    let (flag, request, socket, spool, timeout) = (
        connecting.clone(),
        lines.concat(),
        settings.socket.clone(),
        settings.spool.clone(),
        settings.timeout,
    );
    let watchdog = std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || {
            std::thread::sleep(timeout);
            let still = flag.lock().unwrap_or_else(|e| e.into_inner());
            if *still {
                let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect");
                let err = ClientError::Connect(socket, timed_out);
                let outcome = match spool::write(&spool, &request) {
                    Ok(file) => Outcome::Spooled(err, file),
                    Err(se) => Outcome::Lost(err, spool, se),
                };
                say_err(&format!("{outcome}\n"));
                std::process::exit(0);
            }
        });
    if watchdog.is_err() {
        // No thread: the connect goes unbounded rather than the paths lost
        // (it blocks only on a daemon that has stopped accepting).
        *connecting.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }
    connecting
}

/// Hands the paths to the daemon, or to the spool when that fails.
fn hook(out_paths: &str, drv_path: &str, settings: &Settings) -> Outcome {
    let lines = wire::hook_lines(out_paths, drv_path);
    if lines.is_empty() {
        return Outcome::NothingToQueue;
    }
    let deadline = Instant::now() + settings.timeout;
    let connecting = watch_the_connect(&lines, settings);
    let mut sent = 0;
    let connected = Connection::until(&settings.socket, deadline);
    // The watchdog stands down, or, when it holds the lock, is spooling and
    // ends the process.
    *connecting.lock().unwrap_or_else(|e| e.into_inner()) = false;
    let result = connected.and_then(|mut conn| {
        for line in &lines {
            conn.request(line)?;
            sent += 1;
        }
        Ok(())
    });
    let err = match result {
        Ok(()) => return Outcome::Queued,
        // A malformed request would be refused again from the spool.
        Err(ClientError::Refused(reason)) if !wire::is_transient(&reason) => {
            return Outcome::Refused(reason)
        }
        Err(e) => e,
    };
    let rest: String = lines.get(sent..).unwrap_or_default().concat();
    match spool::write(&settings.spool, &rest) {
        Ok(file) => Outcome::Spooled(err, file),
        Err(se) => Outcome::Lost(err, settings.spool.clone(), se),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::process::Command;

    /// A one-connection daemon stand-in that answers each request line with
    /// `reply` (nothing at all when it is empty).
    fn answering(tag: &str, reply: &'static str) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path = std::env::temp_dir().join(format!("npbhq-hook-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if reply.is_empty() {
                    std::thread::sleep(Duration::from_millis(500));
                    return;
                }
                (&stream).write_all(reply.as_bytes()).unwrap();
                line.clear();
            }
        });
        (path, handle)
    }

    fn settings(socket: &std::path::Path, tag: &str, timeout_ms: u64) -> Settings {
        Settings {
            socket: socket.to_path_buf(),
            spool: std::env::temp_dir()
                .join(format!("npbhq-hook-spool-{tag}-{}", std::process::id())),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn ok_after_information_lines_is_queued() {
        let (path, t) = answering("ok", "info: something\nok 1\n");
        let s = settings(&path, "ok", 5000);
        let outcome = hook("/s/a", "", &s);
        assert!(matches!(outcome, Outcome::Queued), "{outcome}");
        t.join().unwrap();
        assert!(!s.spool.exists(), "nothing spooled");
    }

    #[test]
    fn malformed_is_refused_and_busy_is_spooled() {
        let (path, t) = answering("bad", "err not a store path: x\n");
        let outcome = hook("x", "", &settings(&path, "bad", 5000));
        assert!(
            matches!(&outcome, Outcome::Refused(r) if r.starts_with("not a store path")),
            "{outcome}"
        );
        t.join().unwrap();
        let (path, t) = answering("busy", "err busy: too many connections, try again\n");
        let s = settings(&path, "busy", 5000);
        let outcome = hook("/s/a", "", &s);
        t.join().unwrap();
        assert!(
            matches!(&outcome, Outcome::Spooled(ClientError::Refused(_), _)),
            "{outcome}"
        );
        std::fs::remove_dir_all(&s.spool).unwrap();
    }

    #[test]
    fn silence_ends_at_the_deadline_with_the_request_spooled() {
        let (path, t) = answering("silent", "");
        let s = settings(&path, "silent", 100);
        let outcome = hook("/s/a /s/b", "", &s);
        let said = outcome.to_string();
        assert!(
            said.contains("did not answer in time") && said.contains("spooled the paths to"),
            "{said}"
        );
        assert!(
            !said.starts_with("post-build-hook:"),
            "Nix adds that: {said}"
        );
        t.join().unwrap();
        let Outcome::Spooled(_, file) = outcome else {
            unreachable!()
        };
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "enqueue /s/a /s/b\n"
        );
        std::fs::remove_dir_all(&s.spool).unwrap();
    }

    #[test]
    fn no_daemon_names_the_socket_and_its_variable() {
        let missing = std::env::temp_dir().join("npbhq-hook-no-such-socket");
        let s = settings(&missing, "missing", 5000);
        let said = hook("", "/s/x.drv", &s).to_string();
        assert!(
            said.starts_with(&format!("no daemon at {} (", missing.display()))
                && said.contains("(socket from $NPBHQ_SOCKET)"),
            "{said}"
        );
        std::fs::remove_dir_all(&s.spool).unwrap();
    }

    /// Run in a child process of the test binary (set `NPBHQ_TEST_PANIC`):
    /// the real panic hook, then a panic.
    #[test]
    fn a_panic_exits_0_with_one_line() {
        if std::env::var_os("NPBHQ_TEST_PANIC").is_some() {
            exit_0_on_panic();
            panic!("on purpose");
        }
        let me = std::env::current_exe().unwrap();
        let o = Command::new(me)
            .args(["--exact", "tests::a_panic_exits_0_with_one_line"])
            .env("NPBHQ_TEST_PANIC", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{err}");
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("internal error"))
            .collect();
        assert_eq!(ours.len(), 1, "{err}");
        assert!(ours[0].contains("on purpose"), "{err}");
    }
}
