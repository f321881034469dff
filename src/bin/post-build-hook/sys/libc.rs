//! The same calls as `linux_x86_64.rs`, through the C library, for the
//! architectures whose system calls the hook does not make itself. The
//! hook is then an ordinary dynamically linked program whose C `main` is
//! [`main`] below.
//!
//! Every function returns what the kernel would, a result or a negated
//! error number, but for `rt_sigaction`, which returns the previous handler
//! as `signal` does.

use core::ffi::{c_char, c_int, c_long, c_ulong, c_void};

use super::{KernelSigaction, PollFd, SockaddrUn, Timespec};

#[link(name = "c")]
extern "C" {
    fn __errno_location() -> *mut c_int;
    #[link_name = "openat"]
    fn c_openat(dirfd: c_int, path: *const c_char, flags: c_int, ...) -> c_int;
    #[link_name = "close"]
    fn c_close(fd: c_int) -> c_int;
    #[link_name = "read"]
    fn c_read(fd: c_int, buf: *mut c_void, len: usize) -> isize;
    #[link_name = "write"]
    fn c_write(fd: c_int, buf: *const c_void, len: usize) -> isize;
    #[link_name = "fdatasync"]
    fn c_fdatasync(fd: c_int) -> c_int;
    #[link_name = "fsync"]
    fn c_fsync(fd: c_int) -> c_int;
    #[link_name = "mkdirat"]
    fn c_mkdirat(dirfd: c_int, path: *const c_char, mode: u32) -> c_int;
    #[link_name = "renameat"]
    fn c_renameat(fromfd: c_int, from: *const c_char, tofd: c_int, to: *const c_char) -> c_int;
    #[link_name = "unlinkat"]
    fn c_unlinkat(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int;
    #[link_name = "socket"]
    fn c_socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    #[link_name = "connect"]
    fn c_connect(fd: c_int, addr: *const SockaddrUn, len: u32) -> c_int;
    #[link_name = "poll"]
    fn c_poll(fds: *mut PollFd, n: c_ulong, timeout_ms: c_int) -> c_int;
    #[link_name = "clock_gettime"]
    fn c_clock_gettime(clock: c_int, ts: *mut Timespec) -> c_int;
    #[link_name = "getpid"]
    fn c_getpid() -> c_int;
    #[link_name = "getuid"]
    fn c_getuid() -> u32;
    #[link_name = "signal"]
    fn c_signal(sig: c_int, handler: usize) -> usize;
    #[link_name = "mmap"]
    fn c_mmap(
        addr: *mut c_void,
        len: usize,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        offset: c_long,
    ) -> *mut c_void;
    fn _exit(code: c_int) -> !;
}

/// Relative paths in the `*at` calls are to the working directory.
const AT_FDCWD: c_int = -100;

/// A C result as the kernel's: -1 becomes the negated errno.
fn kernel(rc: isize) -> isize {
    if rc == -1 {
        // SAFETY: glibc's errno location is valid for the calling thread.
        -(unsafe { *__errno_location() } as isize)
    } else {
        rc
    }
}

pub unsafe fn openat(path: *const u8, flags: i32, mode: u32) -> isize {
    // SAFETY: the caller passes a NUL-terminated path; the mode is the
    // argument openat reads with O_CREAT.
    kernel(unsafe { c_openat(AT_FDCWD, path.cast(), flags, mode) } as isize)
}

pub unsafe fn close(fd: i32) -> isize {
    // SAFETY: close takes only a number.
    kernel(unsafe { c_close(fd) } as isize)
}

pub unsafe fn read(fd: i32, buf: *mut u8, len: usize) -> isize {
    // SAFETY: the caller passes a buffer writable for len bytes.
    kernel(unsafe { c_read(fd, buf.cast(), len) })
}

pub unsafe fn write(fd: i32, buf: *const u8, len: usize) -> isize {
    // SAFETY: the caller passes a buffer readable for len bytes.
    kernel(unsafe { c_write(fd, buf.cast(), len) })
}

pub unsafe fn fdatasync(fd: i32) -> isize {
    // SAFETY: fdatasync takes only a number.
    kernel(unsafe { c_fdatasync(fd) } as isize)
}

pub unsafe fn fsync(fd: i32) -> isize {
    // SAFETY: fsync takes only a number.
    kernel(unsafe { c_fsync(fd) } as isize)
}

pub unsafe fn mkdirat(path: *const u8, mode: u32) -> isize {
    // SAFETY: the caller passes a NUL-terminated path.
    kernel(unsafe { c_mkdirat(AT_FDCWD, path.cast(), mode) } as isize)
}

pub unsafe fn renameat(from: *const u8, to: *const u8) -> isize {
    // SAFETY: the caller passes two NUL-terminated paths.
    kernel(unsafe { c_renameat(AT_FDCWD, from.cast(), AT_FDCWD, to.cast()) } as isize)
}

pub unsafe fn unlinkat(path: *const u8) -> isize {
    // SAFETY: the caller passes a NUL-terminated path.
    kernel(unsafe { c_unlinkat(AT_FDCWD, path.cast(), 0) } as isize)
}

pub unsafe fn socket(domain: i32, kind: i32, protocol: i32) -> isize {
    // SAFETY: socket takes only numbers.
    kernel(unsafe { c_socket(domain, kind, protocol) } as isize)
}

pub unsafe fn connect(fd: i32, addr: *const SockaddrUn, len: u32) -> isize {
    // SAFETY: the caller passes an address valid for len bytes.
    kernel(unsafe { c_connect(fd, addr, len) } as isize)
}

pub unsafe fn poll(fds: *mut PollFd, n: usize, timeout_ms: i32) -> isize {
    // SAFETY: the caller passes n valid pollfds.
    kernel(unsafe { c_poll(fds, n as c_ulong, timeout_ms) } as isize)
}

pub unsafe fn clock_gettime(clock: i32, ts: *mut Timespec) -> isize {
    // SAFETY: the caller passes a writable timespec.
    kernel(unsafe { c_clock_gettime(clock, ts) } as isize)
}

pub unsafe fn getpid() -> isize {
    // SAFETY: getpid cannot fail and touches no memory.
    unsafe { c_getpid() as isize }
}

pub unsafe fn getuid() -> isize {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { c_getuid() as isize }
}

pub unsafe fn rt_sigaction(sig: i32, action: *const KernelSigaction) -> isize {
    // SAFETY: the caller passes a valid action, of which only the handler
    // is used: the hook only ever ignores a signal, which installs no code.
    let handler = unsafe { (*action).handler };
    // SIG_ERR is -1, as a kernel result would be.
    kernel(unsafe { c_signal(sig, handler) } as isize)
}

pub unsafe fn mmap_anonymous(len: usize) -> isize {
    const PROT_READ_WRITE: c_int = 0x1 | 0x2;
    const MAP_PRIVATE_ANONYMOUS: c_int = 0x02 | 0x20;
    // SAFETY: a new private mapping touches no existing memory.
    let p = unsafe {
        c_mmap(
            core::ptr::null_mut(),
            len,
            PROT_READ_WRITE,
            MAP_PRIVATE_ANONYMOUS,
            -1,
            0,
        )
    };
    // MAP_FAILED is -1, as a kernel result would be.
    kernel(p as isize)
}

pub fn exit_group(code: i32) -> ! {
    // SAFETY: _exit never returns and needs nothing of ours.
    unsafe { _exit(code) }
}

/// The C entry point: the C runtime has loaded libc and passes the
/// arguments and the environment.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(argc: c_int, argv: *const *const u8, envp: *const *const u8) -> c_int {
    super::set_process(usize::try_from(argc).unwrap_or(0), argv, envp);
    crate::start();
    0
}
