//! Talking to the daemon: the admin commands and the hook trust the same peers.

use std::fmt;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys;
use crate::wire::{final_word, ENV_SOCKET, MAX_LINE};

/// Most memory a reply's lines may take in [`Connection::request`].
pub const MAX_KEPT: usize = 4 << 20;

/// The socket to use: `$NPBHQ_SOCKET`, else the same default as the daemon.
pub fn socket_path() -> PathBuf {
    let set = std::env::var_os(ENV_SOCKET).filter(|v| !v.is_empty());
    let default = || PathBuf::from(crate::wire::with_places(|p| p.socket()));
    set.map_or_else(default, PathBuf::from)
}

/// Why a request got no `ok`: no daemon, another user's, I/O, `err`, a bad reply.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum ClientError {
    Connect(PathBuf, io::Error),
    Untrusted(PathBuf, sys::Peer),
    Io(io::Error),
    Refused(String),
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(p, e) if e.kind() == ErrorKind::TimedOut => write!(
                f,
                "the daemon at {} did not accept the connection in time; is it stopped or overloaded?",
                p.display()
            ),
            ClientError::Connect(p, e) => write!(
                f,
                "no daemon at {} ({e}); is post-build-hook-queue running? (socket from --socket or ${ENV_SOCKET})",
                p.display()
            ),
            ClientError::Untrusted(socket, peer) => write!(
                f,
                "refusing the socket {}: its listener (pid {}) runs as uid {}, not as root or as \
                 this user (uid {}), so another user may have put it there; name the daemon's \
                 socket (--socket or ${ENV_SOCKET})",
                socket.display(),
                peer.pid,
                peer.uid,
                sys::uid()
            ),
            ClientError::Io(e) => write!(f, "connection to the daemon failed: {e}"),
            ClientError::Refused(m) => write!(f, "the daemon refused: {m}"),
            ClientError::Protocol(m) => write!(f, "unexpected reply from the daemon: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// A connection to a daemon that runs as root or as this process's user.
pub struct Connection {
    reader: BufReader<UnixStream>,
    partial: Vec<u8>,
}

impl Connection {
    /// Connects within `timeout` (on a thread: std bounds no connect); I/O waits as long.
    pub fn open(socket: &Path, timeout: Duration) -> Result<Connection, ClientError> {
        let failed = |e| ClientError::Connect(socket.to_path_buf(), e);
        let (path, (tx, rx)) = (socket.to_path_buf(), std::sync::mpsc::channel());
        let connect = move || drop(tx.send(UnixStream::connect(path)));
        std::thread::Builder::new().spawn(connect).map_err(failed)?;
        match rx.recv_timeout(timeout) {
            Ok(stream) => Connection::trusted(socket, stream.map_err(failed)?, timeout),
            Err(_) => Err(failed(ErrorKind::TimedOut.into())),
        }
    }

    /// Connects on this thread (the hook's watchdog bounds it: no second
    /// thread on the build loop's path); each read and write may wait until `deadline`.
    pub fn until(socket: &Path, deadline: Instant) -> Result<Connection, ClientError> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?;
        let left = deadline.saturating_duration_since(Instant::now());
        Connection::trusted(socket, stream, left.max(Duration::from_millis(1)))
    }

    /// The connection, if its peer (as the kernel saw it connect) is root or us.
    fn trusted(socket: &Path, stream: UnixStream, wait: Duration) -> Result<Self, ClientError> {
        let peer = sys::peer(stream.as_fd()).map_err(ClientError::Io)?;
        if peer.uid != 0 && peer.uid != sys::uid() {
            return Err(ClientError::Untrusted(socket.to_path_buf(), peer));
        }
        (stream.set_read_timeout(Some(wait)))
            .and_then(|()| stream.set_write_timeout(Some(wait)))
            .map_err(ClientError::Io)?;
        let (reader, partial) = (BufReader::new(stream), Vec::new());
        Ok(Connection { reader, partial })
    }

    /// Sets how long one read may wait (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        (self.reader.get_ref().set_read_timeout(timeout)).map_err(ClientError::Io)
    }

    /// Sends one request line (with its newline).
    pub fn send(&mut self, line: &str) -> Result<(), ClientError> {
        (self.reader.get_mut().write_all(line.as_bytes())).map_err(io_error)
    }

    /// Reads one reply line, without its newline, of at most [`MAX_LINE`] bytes.
    pub fn read_line(&mut self) -> Result<String, ClientError> {
        let room = (MAX_LINE + 1).saturating_sub(self.partial.len()) as u64;
        let (mut reader, buf) = ((&mut self.reader).take(room), &mut self.partial);
        reader.read_until(b'\n', buf).map_err(io_error)?;
        if buf.pop_if(|b| *b == b'\n').is_some() {
            return Ok(String::from_utf8_lossy(&std::mem::take(buf)).into_owned());
        }
        Err(match buf.len() > MAX_LINE {
            true => ClientError::Protocol(format!("a line longer than {MAX_LINE} bytes")),
            false => io_error(ErrorKind::UnexpectedEof.into()),
        })
    }

    /// Sends a request; returns the lines before `ok` (within [`MAX_KEPT`]) and its text.
    pub fn request(&mut self, line: &str) -> Result<(Vec<String>, String), ClientError> {
        self.send(line)?;
        let (mut info, mut kept) = (Vec::new(), 0);
        while kept <= MAX_KEPT {
            let reply = self.read_line()?;
            if let Some(rest) = final_word(&reply, "ok") {
                return Ok((info, rest.to_string()));
            }
            if let Some(rest) = final_word(&reply, "err") {
                return Err(ClientError::Refused(rest.to_string()));
            }
            kept += reply.len() + 32;
            info.push(reply);
        }
        let most = format!("a reply longer than {MAX_KEPT} bytes");
        Err(ClientError::Protocol(most))
    }
}

/// A failed read or write; a timeout or an end of the stream in words.
fn io_error(e: io::Error) -> ClientError {
    let words = match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "the daemon did not answer in time",
        ErrorKind::UnexpectedEof => "the daemon closed the connection",
        _ => return ClientError::Io(e),
    };
    ClientError::Io(io::Error::new(e.kind(), words))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_peer_of_this_user_is_trusted() {
        let path = std::env::temp_dir().join(format!("npbhq-trust-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let _listener = UnixListener::bind(&path).unwrap();
        assert!(Connection::open(&path, Duration::from_secs(5)).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            Connection::open(&path, Duration::from_secs(5)),
            Err(ClientError::Connect(..))
        ));
    }

    #[test]
    fn untrusted_names_the_peer_in_one_line() {
        let peer = sys::Peer {
            pid: 42,
            uid: 1234,
            gid: 1234,
        };
        let said = ClientError::Untrusted(PathBuf::from("/s"), peer).to_string();
        assert!(
            said.starts_with("refusing the socket /s: ")
                && said.contains("(pid 42) runs as uid 1234")
                && !said.contains('\n'),
            "{said}"
        );
    }

    /// A trusted connection to a peer that answers with `reply` for ever.
    fn flooding(reply: &'static [u8]) -> Connection {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || while (&b).write_all(reply).is_ok() {});
        Connection::trusted(Path::new("/s"), a, Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn a_reply_is_read_within_bounds() {
        let e = flooding(b"\n\n\n\n").request("status\n").unwrap_err();
        assert!(e.to_string().contains("a reply longer than"), "{e}");
        let e = flooding(b"xxxx").request("status\n").unwrap_err();
        assert!(e.to_string().contains("a line longer than"), "{e}");
    }

    #[test]
    fn a_line_that_comes_in_pieces_is_one_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut conn = Connection::trusted(Path::new("/s"), a, Duration::from_millis(50)).unwrap();
        (&b).write_all(b"half").unwrap();
        assert!(
            matches!(conn.read_line(), Err(ClientError::Io(e)) if e.kind() == ErrorKind::WouldBlock)
        );
        (&b).write_all(b" and half\nok\n").unwrap();
        assert_eq!(conn.read_line().unwrap(), "half and half");
        assert_eq!(conn.read_line().unwrap(), "ok");
        drop(b);
        let e = conn.read_line().unwrap_err().to_string();
        assert!(e.contains("the daemon closed the connection"), "{e}");
    }
}
