//! systemd integration: socket activation and readiness notification.
//!
//! Both follow sd_listen_fds(3) and sd_notify(3) and need no library: the
//! listening socket arrives as fd 3 when `LISTEN_PID` is our pid, and
//! readiness is one datagram, `READY=1`, to the socket in `NOTIFY_SOCKET`.

use std::io;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};

use crate::sys;

/// First descriptor passed by systemd.
const SD_LISTEN_FDS_START: i32 = 3;

/// The listening socket systemd passed us, if any.
///
/// When the variables are meant for this process (`LISTEN_PID` is our pid)
/// they are removed from the environment, as `sd_listen_fds(1)` does, so the
/// nix commands the daemon runs never see them. Call it before starting any
/// other thread (changing the environment is not thread-safe).
pub fn listener_from_env() -> io::Result<Option<UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let count: i32 = fds
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("LISTEN_FDS={fds:?} is not a number")))?;
    if count < 1 {
        return Ok(None);
    }
    if count > 1 {
        return Err(io::Error::other(format!(
            "systemd passed {count} sockets; exactly one (a ListenStream= unix socket) is expected"
        )));
    }
    // systemd passed fd 3 to this process (LISTEN_PID matched), and this
    // runs once, before other threads start.
    let fd = sys::take_inherited_fd(SD_LISTEN_FDS_START)?;
    if !sys::is_listening(fd.as_fd())? {
        return Err(io::Error::other(
            "fd 3 is not a listening socket; the socket unit needs ListenStream= (and Accept=no)",
        ));
    }
    let listener = UnixListener::from(fd);
    // Fails if fd 3 is not a unix socket (a TCP socket, say).
    listener.local_addr()?;
    Ok(Some(listener))
}

/// Tells the service manager we are ready, when it asked to be told.
pub fn notify_ready() -> io::Result<()> {
    notify("READY=1")
}

/// Tells the service manager we are stopping.
pub fn notify_stopping() -> io::Result<()> {
    notify("STOPPING=1")
}

fn notify(state: &str) -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
