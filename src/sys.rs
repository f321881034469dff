//! The few system calls the standard library does not wrap: the one module
//! allowed `unsafe`, each block one call, with why it is sound.

use std::ffi::c_ulong;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

extern "C" {
    fn getuid() -> u32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn nice(inc: i32) -> i32;
    fn __errno_location() -> *mut i32;
    fn pthread_sigmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    fn sigwait(set: *const SigSet, sig: *mut i32) -> i32;
    fn getsockopt(fd: i32, level: i32, name: i32, value: *mut u8, len: *mut u32) -> i32;
}

/// SIGKILL on every Linux architecture (as are SIGINT and SIGTERM).
pub const SIGKILL: i32 = 9;
const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

/// The real user id of this process.
pub fn uid() -> u32 {
    // SAFETY: getuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { getuid() }
}

/// Lowers the calling thread's priority by `inc` nice steps (Linux keeps nice per
/// thread), and so that of every process it starts from now on.
pub fn lower_thread_priority(inc: i32) -> io::Result<()> {
    // nice may return -1 legitimately: errno, cleared first, tells a failure (POSIX).
    // SAFETY: errno's location is valid for this thread; nice takes a plain integer.
    let rc = unsafe {
        *__errno_location() = 0;
        nice(inc)
    };
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(code) if rc == -1 && code != 0 => Err(err),
        _ => Ok(()),
    }
}

/// Sends `sig` to every process in process group `pgid`.
pub fn kill_process_group(pgid: u32, sig: i32) -> io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| io::Error::other("process id out of range"))?;
    if pgid <= 1 {
        return Err(io::Error::other("refusing to signal process group <= 1"));
    }
    // SAFETY: kill only reads its two integer arguments; a negative pid
    // addresses the process group, and we refused the groups 0 and 1 above.
    match unsafe { kill(-pgid, sig) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The result of a call that returns 0 or an error number.
fn errno(rc: i32) -> io::Result<()> {
    (rc == 0)
        .then_some(())
        .ok_or(io::Error::from_raw_os_error(rc))
}

/// The C library's `sigset_t` on Linux, glibc and musl alike: 1024 bits in
/// `unsigned long` words, signal `n` at bit `n - 1` (so 1 to 31 in word 0).
#[repr(C)]
struct SigSet([c_ulong; 1024 / c_ulong::BITS as usize]);

impl SigSet {
    fn of(signals: &[i32]) -> SigSet {
        let mut set = SigSet([0; 1024 / c_ulong::BITS as usize]);
        for &sig in signals {
            debug_assert!((1..32).contains(&sig));
            set.0[0] |= 1 << (sig - 1);
        }
        set
    }
}

const SIG_BLOCK: i32 = 0;
const SIG_SETMASK: i32 = 2;

/// Blocks SIGTERM and SIGINT in the calling thread and the threads it
/// starts afterwards, for [`wait_for_stop_signal`]. Children inherit the
/// mask: start them through [`unblock_signals_in_child`].
pub fn block_stop_signals() -> io::Result<()> {
    let set = SigSet::of(&[SIGTERM, SIGINT]);
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    errno(unsafe { pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut()) })
}

/// Waits until SIGTERM or SIGINT arrives; returns the signal number.
pub fn wait_for_stop_signal() -> io::Result<i32> {
    let set = SigSet::of(&[SIGTERM, SIGINT]);
    let mut sig = 0;
    // SAFETY: both pointers refer to live values owned by this frame.
    errno(unsafe { sigwait(&set, &mut sig) }).map(|()| sig)
}

/// Makes `cmd` start with no signal blocked, whatever the spawning thread's mask: a
/// `nix` (and its ssh) that inherited the daemon's blocked SIGTERM could not be stopped.
pub fn unblock_signals_in_child(cmd: &mut Command) {
    let empty = SigSet::of(&[]);
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe functions may be called: pthread_sigmask is
    // one, and it reads `empty`, a copy the closure owns; nothing allocates.
    unsafe {
        cmd.pre_exec(move || errno(pthread_sigmask(SIG_SETMASK, &empty, std::ptr::null_mut())))
    };
}

/// Takes `fd` from systemd's socket activation as a close-on-exec duplicate (the original
/// closed, so `nix` does not inherit it); once per descriptor, before other threads start.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // Whether it is open, without touching it.
    std::fs::symlink_metadata(format!("/proc/self/fd/{fd}"))
        .map_err(|e| io::Error::new(e.kind(), format!("descriptor {fd} is not open: {e}")))?;
    // SAFETY: the descriptor is open (checked above) and was handed to this
    // process; no other part of it owns it, and it is taken exactly once.
    let inherited = unsafe { OwnedFd::from_raw_fd(fd) };
    inherited.try_clone()
}

/// asm-generic values: x86-64, arm64, armv7, riscv64.
const SOL_SOCKET: i32 = 1;
const SO_PEERCRED: i32 = 17;

/// Who is at the other end of a unix socket, as the kernel saw it at `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its process id (0 when the peer is in another pid namespace).
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

/// The credentials of the peer of a connected unix stream (`SO_PEERCRED`).
pub fn peer(fd: BorrowedFd<'_>) -> io::Result<Peer> {
    // struct ucred { pid_t pid; uid_t uid; gid_t gid; }: three 32-bit integers.
    let mut cred = [0u32; 3];
    let mut len = std::mem::size_of_val(&cred) as u32;
    let (fd, ptr) = (fd.as_raw_fd(), cred.as_mut_ptr().cast());
    // SAFETY: `fd` is open for the borrow's lifetime; `cred` and `len` are
    // live locals, and the kernel writes at most `len` bytes into `cred`,
    // plain integers for which every bit pattern is valid.
    if unsafe { getsockopt(fd, SOL_SOCKET, SO_PEERCRED, ptr, &mut len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of_val(&cred) {
        return Err(io::Error::other("SO_PEERCRED of unexpected size"));
    }
    let [pid, uid, gid] = cred;
    Ok(Peer {
        pid: pid as i32,
        uid,
        gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn peer_credentials_name_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = peer(a.as_fd()).unwrap();
        assert_eq!(peer.uid, uid());
        assert_eq!(peer.pid, std::process::id() as i32);
    }
}
