//! The hook's side of the protocol: one connection, request lines out,
//! reply lines in, all within one deadline.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::sys::{self, Deadline, Errno, Fd};
use crate::wire;

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
        let fd = sys::connect_unix(socket, deadline)
            .map_err(|e| HookError::Connect(String::from(socket), e))?;
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
