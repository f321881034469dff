//! Talking to the daemon: the admin commands (`enqueue`, `status`, `wait`,
//! `retry`) and the hook (`src/bin/post-build-hook/`) both connect here, so
//! both trust the same sockets and build their lines with [`crate::wire`].

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config;
use crate::protocol::MAX_LINE;
use crate::sys;

use crate::wire::{final_word, ENV_SOCKET};

/// The socket to use: `$NPBHQ_SOCKET`, else the same default as the daemon.
pub fn socket_path() -> PathBuf {
    match std::env::var_os(ENV_SOCKET).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => config::default_socket(),
    }
}

/// Why a request did not get an `ok`.
#[derive(Debug)]
pub enum ClientError {
    /// No daemon could be reached at the socket.
    Connect(PathBuf, io::Error),
    /// The socket belongs to a user other than root and this one, who may
    /// have put it there to receive what is sent to it.
    Untrusted {
        /// The socket file.
        socket: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's user.
        me: u32,
    },
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
            ClientError::Connect(p, e) if e.kind() == io::ErrorKind::TimedOut => write!(
                f,
                "the daemon at {} did not accept the connection in time; is it stopped or overloaded?",
                p.display()
            ),
            ClientError::Connect(p, e) => write!(
                f,
                "no daemon at {} ({e}); is post-build-hook-queue running? (socket from --socket or ${ENV_SOCKET})",
                p.display()
            ),
            ClientError::Untrusted { socket, owner, me } => write!(
                f,
                "refusing the socket {}: it belongs to uid {owner}, not to root or to this user \
                 (uid {me}), so another user may have put it there; remove it, or name the \
                 daemon's socket (--socket or ${ENV_SOCKET})",
                socket.display()
            ),
            ClientError::Io(e) => write!(f, "connection to the daemon failed: {e}"),
            ClientError::Refused(m) => write!(f, "the daemon refused: {m}"),
            ClientError::Protocol(m) => write!(f, "unexpected reply from the daemon: {m:?}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Whether `socket` may be handed paths: it must belong to root or to this
/// process's user `me`. Anyone can create a socket in a directory they may
/// write, and whoever listens on it receives what is sent and answers `ok`,
/// so a socket of another user is refused. A socket that is not there is
/// reported as no daemon, as connecting would.
pub fn check_trusted(socket: &Path, me: u32) -> Result<(), ClientError> {
    let owner = std::fs::metadata(socket)
        .map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?
        .uid();
    if owner == 0 || owner == me {
        Ok(())
    } else {
        Err(ClientError::Untrusted {
            socket: socket.to_path_buf(),
            owner,
            me,
        })
    }
}

/// A connection to the daemon.
pub struct Connection {
    stream: UnixStream,
    buffered: Vec<u8>,
    /// When set, every read and write ends by then (see [`Connection::until`]).
    deadline: Option<Instant>,
}

impl Connection {
    /// Connects within `timeout`, and lets each later read and write wait
    /// up to `timeout` too.
    pub fn open(socket: &Path, timeout: Duration) -> Result<Connection, ClientError> {
        let stream = connect(socket, Instant::now() + timeout)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        Ok(Connection {
            stream,
            buffered: Vec::new(),
            deadline: None,
        })
    }

    /// Connects, and ends every read and write on the connection by
    /// `deadline`: the hook's one bound on how long a build waits for it.
    /// The connect itself is not bounded here (it blocks while the daemon's
    /// backlog is full): the hook bounds it with a watchdog thread that
    /// spools and exits at the deadline, off the path of a connect that
    /// succeeds at once.
    pub fn until(socket: &Path, deadline: Instant) -> Result<Connection, ClientError> {
        check_trusted(socket, sys::uid())?;
        let stream = UnixStream::connect(socket)
            .map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?;
        Ok(Connection {
            stream,
            buffered: Vec::new(),
            deadline: Some(deadline),
        })
    }

    /// Before a read or write: what is left of the deadline becomes the
    /// socket's timeout, and a deadline already past is a timeout at once.
    fn arm(&self, read: bool) -> Result<(), ClientError> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Io(timed_out()));
        }
        let set = if read {
            self.stream.set_read_timeout(Some(left))
        } else {
            self.stream.set_write_timeout(Some(left))
        };
        set.map_err(ClientError::Io)
    }

    /// Sets how long one read may wait (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(ClientError::Io)
    }

    /// Sends one request line (with its newline).
    pub fn send(&mut self, line: &str) -> Result<(), ClientError> {
        self.arm(false)?;
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| ClientError::Io(name_timeout(e)))
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
            self.arm(true)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the daemon closed the connection",
                    )))
                }
                Ok(n) => self.buffered.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Io(name_timeout(e))),
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

/// Connects to `socket` if it is trusted ([`check_trusted`]), giving up at
/// `deadline`. The standard library cannot bound a connect, and one to a
/// daemon whose backlog is full (stopped, or not accepting) blocks until it
/// accepts; so the connect runs on a thread of its own, abandoned (blocked,
/// then ended with the process) when the deadline comes first.
fn connect(socket: &Path, deadline: Instant) -> Result<UnixStream, ClientError> {
    check_trusted(socket, sys::uid())?;
    let failed = |e| ClientError::Connect(socket.to_path_buf(), e);
    let (tx, rx) = mpsc::channel();
    let path = socket.to_path_buf();
    std::thread::Builder::new()
        .stack_size(32 * 1024)
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(&path));
        })
        .map_err(failed)?;
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(result) => result.map_err(failed),
        Err(_) => Err(failed(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timed out",
        ))),
    }
}

/// The error of a read or write that waited out its timeout, in words
/// (the system's own are "Resource temporarily unavailable").
fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the daemon did not answer in time")
}

/// `e`, or [`timed_out`] when it is a socket timeout.
fn name_timeout(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_socket_of_root_or_of_this_user_is_trusted() {
        let path = std::env::temp_dir().join(format!("npbhq-trust-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let me = sys::uid();
        assert!(check_trusted(&path, me).is_ok(), "our own socket");
        let someone_else = me.wrapping_add(4242);
        match check_trusted(&path, someone_else) {
            // A socket of root is trusted by everyone.
            Ok(()) => assert_eq!(me, 0),
            Err(e @ ClientError::Untrusted { owner, .. }) => {
                assert_eq!(owner, me);
                let said = e.to_string();
                assert!(
                    said.contains(&format!("uid {me}")) && !said.contains('\n'),
                    "{said}"
                );
            }
            Err(e) => panic!("{e}"),
        }
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            check_trusted(&path, me),
            Err(ClientError::Connect(..))
        ));
    }
}
