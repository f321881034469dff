//! systemd without a library: socket activation (sd_listen_fds(3)) and sd_notify(3) datagrams.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};

use crate::sys;

/// The listening socket systemd passed us, if any, with a connection waiting on it; removes the
/// variables (as `sd_listen_fds(1)` does) so nix never sees them: call it before other threads.
pub fn listener_from_env() -> io::Result<Option<(UnixListener, Option<UnixStream>)>> {
    let (Ok(pid), Ok(fds)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.trim().parse() != Ok(std::process::id()) {
        return Ok(None);
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    match fds.trim().parse::<i32>() {
        Ok(..=0) => return Ok(None),
        Ok(1) => {}
        _ => {
            return Err(io::Error::other(format!(
                "LISTEN_FDS={fds:?}: exactly one socket (a ListenStream= unix socket) is expected"
            )))
        }
    }
    let listener = UnixListener::from(sys::take_inherited_fd(3)?);
    // Fails if fd 3 is not a unix socket (a TCP socket, say).
    listener.local_addr()?;
    // accept tells a socket that does not listen (EINVAL) from one that does (EAGAIN or a stream).
    listener.set_nonblocking(true)?;
    let waiting = match listener.accept() {
        Ok((stream, _)) => Some(stream),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return Err(io::Error::other(
            "fd 3 is not a listening socket; the socket unit needs ListenStream= (and Accept=no)",
        )),
        Err(e) => return Err(e),
    };
    listener.set_nonblocking(false)?;
    crate::info!("listening on the socket passed by systemd");
    Ok(Some((listener, waiting)))
}

/// Tells the service manager, when it asked to be told, our `state` (`READY=1`, `STOPPING=1`).
pub fn notify(state: &str) -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&path)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
