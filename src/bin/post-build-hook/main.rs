//! The hook Nix runs after each build: hands the paths to a daemon of root or
//! of its own user, spools what was not acknowledged, and always exits 0 in
//! time. Nix prefixes its lines with `post-build-hook: `, so they do not.

mod spool;

use std::io::{self, ErrorKind, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use npbhq::client::{self, ClientError, Connection};
use npbhq::wire;

fn main() {
    exit_0_on_panic();
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next()) {
        (None, _) => run(),
        (Some(a), None) if a == "--version" => {
            say(
                io::stdout(),
                &format!("post-build-hook {}\n", npbhq::VERSION),
            );
        }
        _ => say(io::stdout(), &usage()),
    }
}

/// A panic (a bug) says so in one line and exits 0: a failing hook stops Nix.
fn exit_0_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let what = info.to_string().replace('\n', " ");
        let line = format!("internal error: {what}; the paths of this build may not be queued\n");
        say(io::stderr(), &line);
        std::process::exit(0)
    }));
}

/// One write (as Nix's log takes it); a closed output must not fail the hook.
fn say(mut to: impl Write, text: &str) {
    let _ = to.write_all(text.as_bytes());
}

/// How long the hook waits in all, unless `$NPBHQ_TIMEOUT` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct Settings {
    socket: PathBuf,
    spool: PathBuf,
    timeout: Duration,
}

impl Settings {
    /// The environment's, else the admin commands' socket and the default spool.
    fn from_env() -> Settings {
        let spool = std::env::var_os("NPBHQ_SPOOL_DIR").filter(|v| !v.is_empty());
        let state = || PathBuf::from(wire::with_places(|p| p.state_dir())).join("spool");
        let timeout = std::env::var("NPBHQ_TIMEOUT").map(|v| wire::parse_seconds(&v));
        Settings {
            socket: client::socket_path(),
            spool: spool.map_or_else(state, PathBuf::from),
            timeout: timeout.map_or(DEFAULT_TIMEOUT, |t| t.unwrap_or(DEFAULT_TIMEOUT)),
        }
    }
}

fn usage() -> String {
    let settings = Settings::from_env();
    format!(
        "Usage: post-build-hook   (run by Nix as its post-build-hook; takes no arguments)\n\
         Reads OUT_PATHS, or DRV_PATH when OUT_PATHS is empty, and hands the paths to\n\
         post-build-hook-queue, or to its spool when the daemon does not take them:\n  \
         socket  $NPBHQ_SOCKET     now {}\n  \
         spool   $NPBHQ_SPOOL_DIR  now {}\n  \
         wait    $NPBHQ_TIMEOUT    seconds in all, default {}\n\
         Talks only to a daemon running as root or as its own user; reaches the spool\n\
         through no symbolic link. Always exits 0.\n",
        settings.socket.display(),
        settings.spool.display(),
        DEFAULT_TIMEOUT.as_secs()
    )
}

fn run() {
    // Nix's paths are text; a value that is not UTF-8 holds no store path.
    let var = |key| std::env::var(key).unwrap_or_default();
    let lines = wire::hook_lines(&var("OUT_PATHS"), &var("DRV_PATH"));
    let settings = Settings::from_env();
    let progress = Arc::new(Mutex::new(Progress::Connecting));
    if !lines.is_empty() {
        watch(&progress, &lines, &settings);
    }
    if let Some(said) = hook(&lines, &settings, &progress) {
        say(io::stderr(), &format!("{said}\n"));
    }
}

/// How far the exchange got (request lines acknowledged), for the watchdog.
enum Progress {
    Connecting,
    Acked(usize),
    Done,
}

fn lock(progress: &Mutex<Progress>) -> MutexGuard<'_, Progress> {
    progress.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spools the lines the daemon did not acknowledge; says why and where.
fn spool_rest(err: ClientError, rest: &[String], settings: &Settings) -> String {
    let why = match err {
        // The socket comes from the environment here, not from `--socket`.
        ClientError::Connect(socket, e) if e.kind() != ErrorKind::TimedOut => format!(
            "no daemon at {} ({e}); is post-build-hook-queue running? (socket from ${})",
            socket.display(),
            wire::ENV_SOCKET
        ),
        e => e.to_string(),
    };
    match spool::write(&settings.spool, &rest.concat()) {
        Ok(file) => format!(
            "{why}; spooled the paths to {} for the daemon to pick up",
            file.display()
        ),
        Err(se) => format!(
            "{why}; and cannot write the spool {}: {se}; these paths are NOT queued",
            settings.spool.display()
        ),
    }
}

/// Bounds the whole run: at the deadline, unless over, spools the rest and exits 0.
fn watch(progress: &Arc<Mutex<Progress>>, lines: &[String], settings: &Settings) {
    let (shared, lines, settings) = (progress.clone(), lines.to_vec(), settings.clone());
    let watchdog = move || {
        std::thread::sleep(settings.timeout);
        let state = lock(&shared);
        let timed_out = || io::Error::new(ErrorKind::TimedOut, "the daemon did not answer in time");
        let (err, acked) = match *state {
            Progress::Done => return,
            Progress::Connecting => (
                ClientError::Connect(settings.socket.clone(), timed_out()),
                0,
            ),
            Progress::Acked(n) => (ClientError::Io(timed_out()), n),
        };
        let said = spool_rest(err, &lines[acked..], &settings);
        say(io::stderr(), &format!("{said}\n"));
        std::process::exit(0)
    };
    let _ = std::thread::Builder::new().spawn(watchdog);
}

/// Hands the lines to the daemon, else to the spool; returns the line to say.
fn hook(lines: &[String], settings: &Settings, progress: &Mutex<Progress>) -> Option<String> {
    if lines.is_empty() {
        return Some("nothing to queue: OUT_PATHS and DRV_PATH are both empty".into());
    }
    let mut sent = 0;
    let deadline = std::time::Instant::now() + settings.timeout;
    let result = Connection::until(&settings.socket, deadline).and_then(|mut conn| {
        for line in lines {
            *lock(progress) = Progress::Acked(sent);
            conn.request(line)?;
            sent += 1;
        }
        Ok(())
    });
    // The watchdog stands down, or, holding the lock, spools and exits.
    *lock(progress) = Progress::Done;
    match result {
        Ok(()) => None,
        // A malformed request would be refused again from the spool.
        Err(ClientError::Refused(reason)) if !wire::is_transient(&reason) => Some(format!(
            "the daemon refused the paths: {reason}; they are NOT queued"
        )),
        Err(e) => Some(spool_rest(e, &lines[sent..], settings)),
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

    /// `hook` as `run` calls it, without the watchdog (which would end the
    /// test binary): OUT_PATHS and DRV_PATH as given.
    fn run_hook(out: &str, drv: &str, s: &Settings) -> Option<String> {
        let progress = Mutex::new(Progress::Connecting);
        hook(&wire::hook_lines(out, drv), s, &progress)
    }

    /// The one spool file in `s`'s spool directory, read, and the directory removed.
    fn spooled(s: &Settings) -> String {
        let files: Vec<_> = std::fs::read_dir(&s.spool).unwrap().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let text = std::fs::read_to_string(files[0].as_ref().unwrap().path()).unwrap();
        std::fs::remove_dir_all(&s.spool).unwrap();
        text
    }

    #[test]
    fn ok_after_information_lines_is_queued() {
        let (path, t) = answering("ok", "info: something\nok 1\n");
        let s = settings(&path, "ok", 5000);
        assert_eq!(run_hook("/s/a", "", &s), None);
        t.join().unwrap();
        assert!(!s.spool.exists(), "nothing spooled");
    }

    #[test]
    fn malformed_is_refused_and_busy_is_spooled() {
        let (path, t) = answering("bad", "err not a store path: x\n");
        let said = run_hook("x", "", &settings(&path, "bad", 5000)).unwrap();
        assert!(
            said.starts_with("the daemon refused the paths: not a store path")
                && said.contains("NOT queued"),
            "{said}"
        );
        t.join().unwrap();
        let (path, t) = answering("busy", "err busy: too many connections, try again\n");
        let s = settings(&path, "busy", 5000);
        let said = run_hook("/s/a", "", &s).unwrap();
        t.join().unwrap();
        assert!(
            said.starts_with("the daemon refused: busy") && said.contains("spooled the paths to"),
            "{said}"
        );
        assert_eq!(spooled(&s), "enqueue /s/a\n");
    }

    #[test]
    fn silence_ends_at_the_deadline_with_the_request_spooled() {
        let (path, t) = answering("silent", "");
        let s = settings(&path, "silent", 100);
        let said = run_hook("/s/a /s/b", "", &s).unwrap();
        assert!(
            said.contains("did not answer in time") && said.contains("spooled the paths to"),
            "{said}"
        );
        assert!(
            !said.starts_with("post-build-hook:"),
            "Nix adds that: {said}"
        );
        t.join().unwrap();
        assert_eq!(spooled(&s), "enqueue /s/a /s/b\n");
    }

    #[test]
    fn no_daemon_names_the_socket_and_its_variable() {
        let missing = std::env::temp_dir().join("npbhq-hook-no-such-socket");
        let s = settings(&missing, "missing", 5000);
        let said = run_hook("", "/s/x.drv", &s).unwrap();
        assert!(
            said.starts_with(&format!("no daemon at {} (", missing.display()))
                && said.contains("(socket from $NPBHQ_SOCKET)"),
            "{said}"
        );
        assert_eq!(spooled(&s), "drv /s/x.drv\n");
        assert_eq!(
            run_hook("", "", &s).unwrap(),
            "nothing to queue: OUT_PATHS and DRV_PATH are both empty"
        );
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
