//! Talking to the daemon: the hook's hand-over and the admin requests.
//!
//! The hook must never fail or stall a build. It connects, writes one line
//! and reads one line, each step bounded by a short timeout; when any of it
//! fails it leaves the request in the spool instead, and it always exits 0.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::config;
use crate::protocol::{self, request_line, MAX_LINE, MAX_PATHS};
use crate::spool;

/// Environment variable naming the daemon's socket.
pub const ENV_SOCKET: &str = "NPBHQ_SOCKET";
/// Environment variable naming the spool directory.
pub const ENV_SPOOL: &str = "NPBHQ_SPOOL_DIR";
/// Environment variable with the hook's timeout in seconds.
pub const ENV_TIMEOUT: &str = "NPBHQ_TIMEOUT";
/// How long the hook waits for the daemon by default.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(3);

/// The socket to use: `$NPBHQ_SOCKET`, else the same default as the daemon.
pub fn socket_path() -> PathBuf {
    match std::env::var_os(ENV_SOCKET).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => config::default_socket(),
    }
}

/// The spool directory: `$NPBHQ_SPOOL_DIR`, else `<default state dir>/spool`.
pub fn spool_dir() -> PathBuf {
    match std::env::var_os(ENV_SPOOL).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => config::default_state_dir().join("spool"),
    }
}

/// Why a request did not get an `ok`.
#[derive(Debug)]
pub enum ClientError {
    /// No daemon could be reached at the socket.
    Connect(PathBuf, io::Error),
    /// The connection broke or timed out.
    Io(io::Error),
    /// The daemon answered `err ...`.
    Refused(String),
    /// The daemon's answer was not understood.
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(p, e) => write!(
                f,
                "no daemon at {} ({e}); is post-build-hook-queue running? (socket from --socket or ${ENV_SOCKET})",
                p.display()
            ),
            ClientError::Io(e) => write!(f, "connection to the daemon failed: {e}"),
            ClientError::Refused(m) => write!(f, "the daemon refused: {m}"),
            ClientError::Protocol(m) => write!(f, "unexpected reply from the daemon: {m:?}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// A connection to the daemon.
pub struct Connection {
    stream: UnixStream,
    buffered: Vec<u8>,
}

impl Connection {
    /// Connects within `timeout` (a daemon that is stopped but whose socket
    /// exists can make a plain connect block once its backlog is full).
    pub fn open(socket: &Path, timeout: Duration) -> Result<Connection, ClientError> {
        let (tx, rx) = mpsc::channel();
        let path = socket.to_path_buf();
        std::thread::Builder::new()
            .stack_size(32 * 1024)
            .spawn(move || {
                let _ = tx.send(UnixStream::connect(&path));
            })
            .map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?;
        let stream = match rx.recv_timeout(timeout) {
            Ok(result) => result.map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?,
            Err(_) => {
                return Err(ClientError::Connect(
                    socket.to_path_buf(),
                    io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                ))
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        Ok(Connection {
            stream,
            buffered: Vec::new(),
        })
    }

    /// Sets how long one read may wait (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(ClientError::Io)
    }

    /// Sends one request line (with its newline).
    pub fn send(&mut self, line: &str) -> Result<(), ClientError> {
        self.stream
            .write_all(line.as_bytes())
            .map_err(ClientError::Io)
    }

    /// Reads one reply line, without its newline.
    pub fn read_line(&mut self) -> Result<String, ClientError> {
        loop {
            if let Some(i) = self.buffered.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffered.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if self.buffered.len() > MAX_LINE {
                return Err(ClientError::Protocol("reply line too long".into()));
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the daemon closed the connection",
                    )))
                }
                Ok(n) => self.buffered.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }

    /// Sends a request and collects its informational lines up to the final
    /// `ok`; returns those lines and the text after `ok`.
    pub fn request(&mut self, line: &str) -> Result<(Vec<String>, String), ClientError> {
        self.send(line)?;
        let mut info = Vec::new();
        loop {
            let reply = self.read_line()?;
            if let Some(rest) = final_word(&reply, "ok") {
                return Ok((info, rest.to_string()));
            }
            if let Some(rest) = final_word(&reply, "err") {
                return Err(ClientError::Refused(rest.to_string()));
            }
            info.push(reply);
        }
    }
}

/// `Some(rest)` when `line` is `word` or starts with `word `.
pub fn final_word<'a>(line: &'a str, word: &str) -> Option<&'a str> {
    if line == word {
        Some("")
    } else {
        line.strip_prefix(word)?.strip_prefix(' ')
    }
}

/// Splits paths into `enqueue` request lines within the protocol's limits.
pub fn enqueue_lines<S: AsRef<str>>(paths: &[S]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut bytes = 0;
    for p in paths {
        let p = p.as_ref();
        if !current.is_empty()
            && (current.len() == MAX_PATHS || bytes + p.len() + 1 >= MAX_LINE - 16)
        {
            lines.push(request_line("enqueue", &current));
            current.clear();
            bytes = 0;
        }
        bytes += p.len() + 1;
        current.push(p);
    }
    if !current.is_empty() {
        lines.push(request_line("enqueue", &current));
    }
    lines
}

/// The request lines the hook sends for Nix's `OUT_PATHS` and `DRV_PATH`.
pub fn hook_lines(out_paths: &str, drv_path: &str) -> Vec<String> {
    let outs: Vec<&str> = out_paths.split_whitespace().collect();
    if !outs.is_empty() {
        return enqueue_lines(&outs);
    }
    let drv = drv_path.trim();
    if drv.is_empty() || drv.contains(char::is_whitespace) {
        return Vec::new();
    }
    vec![request_line("drv", &[drv])]
}

/// What the hook did, for its one line on stderr.
#[derive(Debug)]
pub enum HookOutcome {
    /// The daemon acknowledged everything.
    Queued,
    /// Nix gave no paths.
    NothingToQueue,
    /// The daemon was not reachable or did not acknowledge; the rest was
    /// spooled to the file.
    Spooled(ClientError, PathBuf),
    /// Neither the daemon nor the spool took the request.
    Lost(ClientError, PathBuf, io::Error),
    /// The daemon refused the request as malformed (a path that is not a
    /// valid store path, say); it is not spooled, as it would be refused
    /// again.
    Refused(String),
}

impl fmt::Display for HookOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookOutcome::Queued => write!(f, "queued"),
            HookOutcome::NothingToQueue => {
                write!(f, "nothing to queue: OUT_PATHS and DRV_PATH are both empty")
            }
            HookOutcome::Spooled(e, file) => write!(
                f,
                "{e}; spooled the paths to {} for the daemon to pick up",
                file.display()
            ),
            HookOutcome::Refused(reason) => write!(
                f,
                "the daemon refused the paths: {reason}; they are NOT queued"
            ),
            HookOutcome::Lost(e, dir, se) => write!(
                f,
                "{e}; and cannot write the spool {}: {se}; these paths are NOT queued",
                dir.display()
            ),
        }
    }
}

/// Hands the paths to the daemon, or to the spool when that fails.
pub fn hook(
    out_paths: &str,
    drv_path: &str,
    socket: &Path,
    spool: &Path,
    timeout: Duration,
) -> HookOutcome {
    let lines = hook_lines(out_paths, drv_path);
    if lines.is_empty() {
        return HookOutcome::NothingToQueue;
    }
    let mut sent = 0;
    let result = Connection::open(socket, timeout).and_then(|mut conn| {
        for line in &lines {
            conn.request(line)?;
            sent += 1;
        }
        Ok(())
    });
    let err = match result {
        Ok(()) => return HookOutcome::Queued,
        // A malformed request would be refused again from the spool.
        Err(ClientError::Refused(reason)) if !protocol::is_transient(&reason) => {
            return HookOutcome::Refused(reason)
        }
        Err(e) => e,
    };
    let rest: String = lines[sent..].concat();
    match spool::write(spool, &rest) {
        Ok(file) => HookOutcome::Spooled(err, file),
        Err(se) => HookOutcome::Lost(err, spool.to_path_buf(), se),
    }
}

/// The hook's timeout: `$NPBHQ_TIMEOUT` seconds, else the default.
pub fn hook_timeout() -> Duration {
    std::env::var(ENV_TIMEOUT)
        .ok()
        .and_then(|v| config::parse_seconds(&v).ok())
        .unwrap_or(DEFAULT_HOOK_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_prefers_out_paths() {
        assert_eq!(
            hook_lines(" /s/a  /s/b ", "/s/x.drv"),
            vec!["enqueue /s/a /s/b\n"]
        );
        assert_eq!(hook_lines("", "/s/x.drv"), vec!["drv /s/x.drv\n"]);
        assert!(hook_lines("", "").is_empty());
        assert!(hook_lines("", "/s/x.drv\nping").is_empty());
    }

    #[test]
    fn enqueue_lines_respect_limits() {
        let paths: Vec<String> = (0..MAX_PATHS + 5).map(|i| format!("/s/{i}")).collect();
        let lines = enqueue_lines(&paths);
        assert_eq!(lines.len(), 2);
        assert!(lines
            .iter()
            .all(|l| l.len() < MAX_LINE && l.ends_with('\n')));
        let total: usize = lines.iter().map(|l| l.split(' ').count() - 1).sum();
        assert_eq!(total, paths.len());
    }

    #[test]
    fn final_words() {
        assert_eq!(final_word("ok", "ok"), Some(""));
        assert_eq!(final_word("ok 3", "ok"), Some("3"));
        assert_eq!(final_word("okay", "ok"), None);
        assert_eq!(final_word("err busy", "err"), Some("busy"));
    }
}
