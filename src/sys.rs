//! The few libc calls the standard library does not wrap.
//!
//! Kept in one place so that every `unsafe` block of the project is here,
//! each with the reason it is sound.

use std::io;

extern "C" {
    fn getuid() -> u32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn nice(inc: i32) -> i32;
    fn __errno_location() -> *mut i32;
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

/// Lowers the calling thread's CPU priority by `inc` nice steps (Linux keeps
/// the nice value per thread), and with it that of every process the thread
/// starts from now on.
pub fn lower_thread_priority(inc: i32) -> io::Result<()> {
    // nice returns the new value, which may legitimately be -1, so errno,
    // cleared first, is what tells a failure (as POSIX prescribes).
    // SAFETY: errno's location is valid for the calling thread; nice takes a
    // plain integer and touches no memory of ours.
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

extern "C" {
    fn signal(sig: i32, handler: usize) -> usize;
}

/// SIGPIPE on every Linux architecture.
const SIGPIPE: i32 = 13;
/// The C library's `SIG_IGN` handler value.
const SIG_IGN: usize = 1;

/// What the standard library's runtime does before `main`, for a program
/// whose `main` the C runtime calls directly: ignore SIGPIPE, so that writing
/// to a client that went away is an error and not the end of the daemon, and
/// open `/dev/null` on any of the descriptors 0, 1 and 2 that was closed, so
/// that no journal or socket can become a process's stderr.
pub fn start_up() {
    // SAFETY: ignoring a signal installs no handler code of ours.
    unsafe { signal(SIGPIPE, SIG_IGN) };
    for fd in 0..3 {
        // SAFETY: F_GETFD only reads the descriptor's flags; a closed
        // descriptor yields -1 (EBADF) and nothing else happens.
        if unsafe { fcntl(fd, F_GETFD) } < 0 {
            // The lowest free descriptor is the closed one, so the file lands
            // on it; it stays open for the life of the process.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                std::mem::forget(null);
            }
        }
    }
}

/// SIGINT on every Linux architecture.
pub const SIGINT: i32 = 2;

/// Storage for the C library's `sigset_t` (1024 bits in glibc and musl).
#[repr(C)]
struct SigSet([u64; 16]);

extern "C" {
    fn sigemptyset(set: *mut SigSet) -> i32;
    fn sigaddset(set: *mut SigSet, sig: i32) -> i32;
    fn pthread_sigmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    fn sigwait(set: *const SigSet, sig: *mut i32) -> i32;
}

const SIG_BLOCK: i32 = 0;

fn stop_signals() -> SigSet {
    let mut set = SigSet([0; 16]);
    // SAFETY: `set` is a valid, writable sigset_t-sized buffer we own.
    unsafe {
        sigemptyset(&mut set);
        sigaddset(&mut set, SIGTERM);
        sigaddset(&mut set, SIGINT);
    }
    set
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it
/// starts afterwards, so that [`wait_for_stop_signal`] receives them.
/// (Child processes start with an empty mask: the standard library resets it.)
pub fn block_stop_signals() -> io::Result<()> {
    let set = stop_signals();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits until SIGTERM or SIGINT arrives; returns the signal number.
pub fn wait_for_stop_signal() -> io::Result<i32> {
    let set = stop_signals();
    let mut sig = 0;
    // SAFETY: both pointers refer to live values owned by this frame.
    let rc = unsafe { sigwait(&set, &mut sig) };
    if rc == 0 {
        Ok(sig)
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

extern "C" {
    fn getsockopt(fd: i32, level: i32, name: i32, value: *mut i32, len: *mut u32) -> i32;
}

/// `SOL_SOCKET` and `SO_ACCEPTCONN` (asm-generic values: x86-64, arm64, riscv).
const SOL_SOCKET: i32 = 1;
const SO_ACCEPTCONN: i32 = 30;

/// True when `fd` is a socket in the listening state.
pub fn is_listening(fd: i32) -> io::Result<bool> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as u32;
    // SAFETY: `value` and `len` are live, correctly sized locals; the kernel
    // writes at most `len` bytes into `value`.
    let rc = unsafe { getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &mut value, &mut len) };
    if rc == 0 {
        Ok(value != 0)
    } else {
        Err(io::Error::last_os_error())
    }
}
