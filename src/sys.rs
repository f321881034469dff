//! The few libc calls the standard library does not wrap.
//!
//! Kept in one place so that every `unsafe` block of the project is here,
//! each with the reason it is sound.

use std::io;

extern "C" {
    fn getuid() -> u32;
    fn kill(pid: i32, sig: i32) -> i32;
}

/// SIGKILL on every Linux architecture.
pub const SIGKILL: i32 = 9;
/// SIGTERM on every Linux architecture.
pub const SIGTERM: i32 = 15;

/// The real user id of this process.
pub fn uid() -> u32 {
    // SAFETY: getuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { getuid() }
}

/// True when running as root, which selects the system-wide default paths.
pub fn is_root() -> bool {
    uid() == 0
}

/// Sends `sig` to every process in process group `pgid`.
pub fn kill_process_group(pgid: u32, sig: i32) -> io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| io::Error::other("process id out of range"))?;
    if pgid <= 1 {
        return Err(io::Error::other("refusing to signal process group <= 1"));
    }
    // SAFETY: kill only reads its two integer arguments; a negative pid
    // addresses the process group, and we refused the groups 0 and 1 above.
    let rc = unsafe { kill(-pgid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

extern "C" {
    fn fcntl(fd: i32, cmd: i32, ...) -> i32;
}

const F_GETFD: i32 = 1;
const F_SETFD: i32 = 2;
const FD_CLOEXEC: i32 = 1;

/// Marks a descriptor close-on-exec, so that `nix` and its children do not
/// inherit a socket handed over by systemd.
pub fn set_cloexec(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFD/F_SETFD reads and sets descriptor flags only;
    // an invalid fd yields -1 and errno, which we report.
    let flags = unsafe { fcntl(fd, F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { fcntl(fd, F_SETFD, flags | FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
