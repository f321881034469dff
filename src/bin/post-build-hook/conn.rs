//! The hook's side of the protocol: one connection, request lines out,
//! reply lines in, all within one deadline.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::sys::{self, Deadline, Errno, Fd};
use super::wire;

/// Why a request did not get an `ok`.
pub enum HookError {
    /// No daemon could be reached at the socket.
    Connect(String, Errno),
    /// The connection broke or timed out.
    Io(Errno),
    /// The daemon answered `err ...`.
    Refused(String),
    /// The daemon's answer was not understood.
    Protocol(&'static str),
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookError::Connect(p, e) => write!(
                f,
                "no daemon at {p} ({e}); is post-build-hook-queue running? (socket from ${})",
                wire::ENV_SOCKET
            ),
            HookError::Io(e) => write!(f, "connection to the daemon failed: {e}"),
            HookError::Refused(m) => write!(f, "the daemon refused: {m}"),
            HookError::Protocol(m) => write!(f, "unexpected reply from the daemon: {m}"),
        }
    }
}

/// A connection to the daemon.
pub struct Connection {
    fd: Fd,
    deadline: Deadline,
    buffered: Vec<u8>,
}

impl Connection {
    /// Connects to the daemon's socket. A daemon whose backlog is full (one
    /// that has stopped accepting) counts as away, at once: the spool is as
    /// safe, and the build need not wait.
    pub fn open(socket: &str, deadline: Deadline) -> Result<Connection, HookError> {
        let fd =
            sys::connect_unix(socket).map_err(|e| HookError::Connect(String::from(socket), e))?;
        Ok(Connection {
            fd,
            deadline,
            buffered: Vec::new(),
        })
    }

    /// Sends one request line and reads replies up to its `ok` (or `err`).
    pub fn request(&mut self, line: &str) -> Result<(), HookError> {
        self.fd
            .write_all(line.as_bytes(), Some(self.deadline))
            .map_err(HookError::Io)?;
        loop {
            let reply = self.read_line()?;
            let reply =
                core::str::from_utf8(&reply).map_err(|_| HookError::Protocol("not UTF-8"))?;
            if wire::final_word(reply, "ok").is_some() {
                return Ok(());
            }
            if let Some(reason) = wire::final_word(reply, "err") {
                return Err(HookError::Refused(String::from(reason)));
            }
        }
    }

    /// Reads one reply line, without its newline.
    fn read_line(&mut self) -> Result<Vec<u8>, HookError> {
        loop {
            if let Some(i) = self.buffered.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffered.drain(..=i).collect();
                line.pop();
                return Ok(line);
            }
            if self.buffered.len() > wire::MAX_LINE {
                return Err(HookError::Protocol("reply line too long"));
            }
            let mut chunk = [0u8; 4096];
            match self.fd.read(&mut chunk, self.deadline) {
                Ok(0) => return Err(HookError::Protocol("the daemon closed the connection")),
                Ok(n) => self
                    .buffered
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) => return Err(HookError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A one-connection daemon stand-in that answers each request line with
    /// `reply` (nothing at all when it is empty).
    fn answering(
        tag: &str,
        reply: &'static str,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
        let path =
            std::env::temp_dir().join(format!("npbhq-hook-conn-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if reply.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    return;
                }
                (&stream).write_all(reply.as_bytes()).unwrap();
                line.clear();
            }
        });
        (path, handle)
    }

    #[test]
    fn ok_after_information_lines_is_success() {
        let (path, t) = answering("ok", "info: something\nok 1\n");
        let mut c = Connection::open(path.to_str().unwrap(), Deadline::after_ms(5000))
            .ok()
            .unwrap();
        assert!(c.request("enqueue /s/a\n").is_ok());
        assert!(c.request("enqueue /s/b\n").is_ok());
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn err_is_a_refusal_with_its_reason() {
        let (path, t) = answering("err", "err busy: too many connections, try again\n");
        let mut c = Connection::open(path.to_str().unwrap(), Deadline::after_ms(5000))
            .ok()
            .unwrap();
        match c.request("enqueue /s/a\n") {
            Err(HookError::Refused(r)) => assert!(wire::is_transient(&r), "{r}"),
            _ => panic!("expected a refusal"),
        }
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn silence_ends_at_the_deadline_and_absence_at_once() {
        let (path, t) = answering("silent", "");
        let mut c = Connection::open(path.to_str().unwrap(), Deadline::after_ms(100))
            .ok()
            .unwrap();
        match c.request("enqueue /s/a\n") {
            Err(HookError::Io(e)) => assert_eq!(e, Errno::TIMED_OUT),
            _ => panic!("expected a timeout"),
        }
        t.join().unwrap();
        let _ = std::fs::remove_file(&path);
        match Connection::open(path.to_str().unwrap(), Deadline::after_ms(5000)) {
            Err(e @ HookError::Connect(..)) => {
                assert!(e.to_string().contains("No such file or directory"), "{e}")
            }
            _ => panic!("expected a connect error"),
        }
    }
}
