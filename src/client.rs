//! Talking to the daemon from the command line (`enqueue`, `status`, `wait`,
//! `retry`). The hook has its own client without `std`
//! (`src/bin/post-build-hook/`); both build their lines with [`crate::wire`].

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::config;
use crate::protocol::MAX_LINE;

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
