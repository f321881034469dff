//! The few libc calls the hook makes, each behind a safe wrapper.
//!
//! Every `unsafe` block of the hook is in this file, but for the call in
//! `main` that reads the arguments the C runtime passed. Errors are
//! [`Errno`]s, which print the way `std::io::Error` does, so the hook's
//! messages read like the rest of the project's. The constants are Linux's generic ABI
//! values, shared by the architectures listed below.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::{c_char, c_int, c_long, c_ulong, c_void, CStr};
use core::fmt;

use alloc::vec::Vec;

#[cfg(not(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "loongarch64"
    )
)))]
compile_error!(
    "post-build-hook's libc constants are Linux's generic ones (x86, arm, riscv64, loongarch64)"
);

const ENOENT: c_int = 2;
const EINTR: c_int = 4;
const EAGAIN: c_int = 11;
const EINVAL: c_int = 22;
const EEXIST: c_int = 17;
const ETIMEDOUT: c_int = 110;

const O_RDONLY: c_int = 0;
const O_WRONLY: c_int = 1;
const O_RDWR: c_int = 2;
const O_CREAT: c_int = 0o100;
const O_EXCL: c_int = 0o200;
const O_CLOEXEC: c_int = 0o2000000;

const AF_UNIX: c_int = 1;
const SOCK_STREAM: c_int = 1;
const SOCK_NONBLOCK: c_int = 0o4000;
const SOCK_CLOEXEC: c_int = O_CLOEXEC;

const POLLIN: i16 = 0x1;
const POLLOUT: i16 = 0x4;
const POLLNVAL: i16 = 0x20;

const CLOCK_REALTIME: c_int = 0;
const CLOCK_MONOTONIC: c_int = 1;
const SIGPIPE: c_int = 13;
const SIG_IGN: usize = 1;

#[repr(C)]
struct SockaddrUn {
    family: u16,
    path: [u8; 108],
}

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: i16,
    revents: i16,
}

#[repr(C)]
struct Timespec {
    sec: c_long,
    nsec: c_long,
}

#[link(name = "c")]
extern "C" {
    fn __errno_location() -> *mut c_int;
    fn strerror(errnum: c_int) -> *const c_char;
    fn getenv(name: *const c_char) -> *const c_char;
    fn getpid() -> c_int;
    fn getuid() -> u32;
    fn signal(sig: c_int, handler: usize) -> usize;
    fn clock_gettime(clock: c_int, ts: *mut Timespec) -> c_int;
    fn open(path: *const c_char, flags: c_int, ...) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn read(fd: c_int, buf: *mut c_void, len: usize) -> isize;
    fn write(fd: c_int, buf: *const c_void, len: usize) -> isize;
    fn fdatasync(fd: c_int) -> c_int;
    fn fsync(fd: c_int) -> c_int;
    fn mkdir(path: *const c_char, mode: u32) -> c_int;
    fn rename(from: *const c_char, to: *const c_char) -> c_int;
    fn unlink(path: *const c_char) -> c_int;
    fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const SockaddrUn, len: u32) -> c_int;
    fn poll(fds: *mut PollFd, n: c_ulong, timeout_ms: c_int) -> c_int;
    fn malloc(size: usize) -> *mut c_void;
    fn realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn free(p: *mut c_void);
    fn posix_memalign(p: *mut *mut c_void, align: usize, size: usize) -> c_int;
    fn _exit(code: c_int) -> !;
}

/// An error number from a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub c_int);

impl Errno {
    /// Nothing happened in time.
    pub const TIMED_OUT: Errno = Errno(ETIMEDOUT);

    fn last() -> Errno {
        // SAFETY: glibc's errno location is valid for the calling thread.
        Errno(unsafe { *__errno_location() })
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: strerror returns a valid C string that stays valid until
        // the next strerror call; the hook has one thread and copies it out
        // at once.
        let text = unsafe { CStr::from_ptr(strerror(self.0)) };
        let text = text.to_str().unwrap_or("unknown error");
        write!(f, "{text} (os error {})", self.0)
    }
}

/// The result of a call that sets errno.
pub type Result<T> = core::result::Result<T, Errno>;

fn check(rc: c_int) -> Result<c_int> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

/// `s` as a C string, or `EINVAL` if it holds a NUL byte.
fn c_string(s: &str) -> Result<Vec<u8>> {
    if s.as_bytes().contains(&0) {
        return Err(Errno(EINVAL));
    }
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    Ok(v)
}

/// An open file descriptor, closed when dropped.
pub struct Fd(c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and is closed only here.
        unsafe { close(self.0) };
    }
}

impl Fd {
    /// Writes all of `buf`, waiting for the descriptor until `deadline`.
    pub fn write_all(&self, mut buf: &[u8], deadline: Option<Deadline>) -> Result<()> {
        while !buf.is_empty() {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe { write(self.0, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                buf = buf.get(n as usize..).unwrap_or_default();
                continue;
            }
            match (Errno::last(), deadline) {
                (Errno(EINTR), _) => {}
                (Errno(EAGAIN), Some(d)) => self.wait(POLLOUT, d)?,
                (e, _) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what is there into `buf` (0 at end of stream), waiting until
    /// `deadline` for something to arrive.
    pub fn read(&self, buf: &mut [u8], deadline: Deadline) -> Result<usize> {
        loop {
            // SAFETY: buf is valid and writable for buf.len() bytes.
            let n = unsafe { read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            match Errno::last() {
                Errno(EINTR) => {}
                Errno(EAGAIN) => self.wait(POLLIN, deadline)?,
                e => return Err(e),
            }
        }
    }

    /// Flushes the file's data to disk.
    pub fn sync_data(&self) -> Result<()> {
        // SAFETY: fdatasync only reads the descriptor number.
        check(unsafe { fdatasync(self.0) }).map(drop)
    }

    /// Flushes the file (or directory) and its metadata to disk.
    pub fn sync_all(&self) -> Result<()> {
        // SAFETY: fsync only reads the descriptor number.
        check(unsafe { fsync(self.0) }).map(drop)
    }

    fn wait(&self, events: i16, deadline: Deadline) -> Result<()> {
        let mut fds = PollFd {
            fd: self.0,
            events,
            revents: 0,
        };
        loop {
            let left = deadline.left_ms().ok_or(Errno::TIMED_OUT)?;
            // SAFETY: fds is one valid pollfd, as the count says.
            match unsafe { poll(&mut fds, 1, left) } {
                0 => return Err(Errno::TIMED_OUT),
                n if n > 0 => return Ok(()),
                _ if Errno::last() == Errno(EINTR) => {}
                _ => return Err(Errno::last()),
            }
        }
    }
}

/// A point in time on the monotonic clock, after which the hook gives up.
#[derive(Clone, Copy)]
pub struct Deadline(u128);

impl Deadline {
    /// `millis` milliseconds from now.
    pub fn after_ms(millis: u64) -> Deadline {
        Deadline(now_ns(CLOCK_MONOTONIC) + u128::from(millis) * 1_000_000)
    }

    /// Milliseconds left, rounded up; `None` once past.
    fn left_ms(self) -> Option<c_int> {
        let left = self.0.checked_sub(now_ns(CLOCK_MONOTONIC))?;
        let ms = left.div_ceil(1_000_000).max(1);
        Some(c_int::try_from(ms).unwrap_or(c_int::MAX))
    }
}

fn now_ns(clock: c_int) -> u128 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: ts is a valid timespec for the call to fill in; both clocks
    // exist on every Linux, so it cannot fail.
    unsafe { clock_gettime(clock, &mut ts) };
    (ts.sec.max(0) as u128) * 1_000_000_000 + ts.nsec.max(0) as u128
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos() -> u128 {
    now_ns(CLOCK_REALTIME)
}

/// Connects a stream socket to the unix socket at `path`. A unix socket
/// connects at once or not at all: a listener whose backlog is full gives
/// `EAGAIN` rather than a wait.
pub fn connect_unix(path: &str) -> Result<Fd> {
    let mut addr = SockaddrUn {
        family: AF_UNIX as u16,
        path: [0; 108],
    };
    // The path and its NUL must fit.
    let dest = addr
        .path
        .get_mut(..path.len())
        .filter(|_| path.len() < 108 && !path.as_bytes().contains(&0))
        .ok_or(Errno(EINVAL))?;
    dest.copy_from_slice(path.as_bytes());
    // SAFETY: plain socket creation; the result is checked.
    let fd = Fd(check(unsafe {
        socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    })?);
    let len = (2 + path.len() + 1) as u32;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed it.
    check(unsafe { connect(fd.0, &addr, len) })?;
    Ok(fd)
}

/// Creates `path`'s file new (never replacing one), for writing.
pub fn create_new(path: &str, mode: u32) -> Result<Fd> {
    let p = c_string(path)?;
    // SAFETY: p is NUL-terminated; the mode argument is the one open reads
    // with O_CREAT.
    check(unsafe {
        open(
            p.as_ptr().cast(),
            O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
            mode,
        )
    })
    .map(Fd)
}

/// Opens a directory, to sync it.
pub fn open_dir(path: &str) -> Result<Fd> {
    let p = c_string(path)?;
    // SAFETY: p is NUL-terminated.
    check(unsafe { open(p.as_ptr().cast(), O_RDONLY | O_CLOEXEC) }).map(Fd)
}

/// Creates the directory `path` and any missing parents: usually it is
/// there already, which one `mkdir` tells.
pub fn create_dir_all(path: &str) -> Result<()> {
    match make_dir(path) {
        Err(Errno(ENOENT)) => {}
        done => return done,
    }
    let ends = path
        .char_indices()
        .filter(|&(i, c)| c == '/' && i > 0)
        .map(|(i, _)| i)
        .chain(core::iter::once(path.len()));
    for end in ends {
        make_dir(path.get(..end).unwrap_or(path))?;
    }
    Ok(())
}

/// Creates the directory `path`; one that exists already is fine.
fn make_dir(path: &str) -> Result<()> {
    let p = c_string(path)?;
    // SAFETY: p is NUL-terminated.
    match check(unsafe { mkdir(p.as_ptr().cast(), 0o777) }) {
        Err(Errno(EEXIST)) => Ok(()),
        other => other.map(drop),
    }
}

/// Renames `from` to `to`, replacing it.
pub fn rename_file(from: &str, to: &str) -> Result<()> {
    let (f, t) = (c_string(from)?, c_string(to)?);
    // SAFETY: both are NUL-terminated.
    check(unsafe { rename(f.as_ptr().cast(), t.as_ptr().cast()) }).map(drop)
}

/// Removes the file `path`.
pub fn remove_file(path: &str) -> Result<()> {
    let p = c_string(path)?;
    // SAFETY: p is NUL-terminated.
    check(unsafe { unlink(p.as_ptr().cast()) }).map(drop)
}

/// The environment variable `name`, if it is set and UTF-8.
pub fn env(name: &str) -> Option<&'static str> {
    let name = c_string(name).ok()?;
    // SAFETY: name is NUL-terminated; getenv's result, when not null, points
    // into the environment, which the hook never changes, so it lives as
    // long as the process.
    let value = unsafe { getenv(name.as_ptr().cast()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: getenv returned a valid C string (see above).
    unsafe { CStr::from_ptr(value) }.to_str().ok()
}

/// The `index`th command-line argument, if there is one.
///
/// # Safety
/// `argc` and `argv` must be the ones the C runtime passed to `main`.
pub unsafe fn arg(argc: c_int, argv: *const *const c_char, index: c_int) -> Option<&'static [u8]> {
    if index >= argc || argv.is_null() {
        return None;
    }
    // SAFETY: argv holds argc valid pointers (the caller's contract), and
    // the arguments live as long as the process.
    let p = unsafe { *argv.add(index as usize) };
    if p.is_null() {
        return None;
    }
    // SAFETY: p is one of the C runtime's NUL-terminated arguments.
    Some(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// The process id.
pub fn pid() -> u32 {
    // SAFETY: getpid cannot fail and touches no memory.
    unsafe { getpid() as u32 }
}

/// The real user id.
pub fn uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { getuid() }
}

/// What `std` does before `main`: a write to a closed pipe (Nix's log, the
/// daemon's socket) is an error, not a killing SIGPIPE; and descriptors 0-2
/// are open, so that no socket or file of the hook's becomes "stderr".
pub fn start_up() {
    // SAFETY: ignoring a signal installs no handler code.
    unsafe { signal(SIGPIPE, SIG_IGN) };
    let mut fds = [0, 1, 2].map(|fd| PollFd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: fds holds three valid pollfds, as the count says.
    if unsafe { poll(fds.as_mut_ptr(), 3, 0) } < 0 {
        return;
    }
    for p in fds {
        if p.revents & POLLNVAL != 0 {
            // SAFETY: the path is a NUL-terminated literal; the lowest free
            // descriptor, the closed one, is what open returns, and it stays
            // open for the life of the process.
            unsafe { open(c"/dev/null".as_ptr(), O_RDWR) };
        }
    }
}

/// Writes `buf` to stderr in one call, ignoring failure (there is nowhere
/// else to report it).
pub fn write_stderr(buf: &[u8]) {
    let stderr = core::mem::ManuallyDrop::new(Fd(2));
    let _ = stderr.write_all(buf, None);
}

/// Writes `buf` to stdout.
pub fn write_stdout(buf: &[u8]) {
    let stdout = core::mem::ManuallyDrop::new(Fd(1));
    let _ = stdout.write_all(buf, None);
}

/// Ends the process at once with `code`.
pub fn exit(code: c_int) -> ! {
    // SAFETY: _exit never returns and needs nothing of ours.
    unsafe { _exit(code) }
}

/// The C library's allocator, for `alloc`'s types.
pub struct Malloc;

/// The alignment malloc guarantees on every supported architecture.
const MALLOC_ALIGN: usize = 8;

// SAFETY: malloc, realloc, posix_memalign and free follow GlobalAlloc's
// contract when allocations of a larger alignment than malloc's go through
// posix_memalign, as below.
unsafe impl GlobalAlloc for Malloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: any size may be asked of malloc.
            return unsafe { malloc(layout.size()) }.cast();
        }
        let mut p = core::ptr::null_mut();
        // SAFETY: p is valid to write; the alignment is a power of two and
        // a multiple of the pointer size, as Layout guarantees past 8.
        match unsafe { posix_memalign(&mut p, layout.align(), layout.size()) } {
            0 => p.cast(),
            _ => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: ptr came from malloc or posix_memalign (alloc above).
        unsafe { free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: ptr came from malloc (alloc above), and realloc keeps
            // malloc's alignment.
            return unsafe { realloc(ptr.cast(), new_size) }.cast();
        }
        // SAFETY: the caller upholds GlobalAlloc::realloc's contract, which
        // is what alloc, copy and dealloc need.
        unsafe {
            let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
            if !new.is_null() {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn errors_read_like_std() {
        for n in [2, 11, 13, 110] {
            assert_eq!(
                Errno(n).to_string(),
                std::io::Error::from_raw_os_error(n).to_string()
            );
        }
    }

    #[test]
    fn deadlines_count_down() {
        assert!(Deadline::after_ms(60_000)
            .left_ms()
            .is_some_and(|ms| ms > 59_000));
        let past = Deadline(now_ns(CLOCK_MONOTONIC) - 1);
        assert_eq!(past.left_ms(), None);
    }

    #[test]
    fn too_long_socket_paths_are_refused() {
        let long = "/tmp/".to_string() + &"x".repeat(120);
        assert_eq!(connect_unix(&long).err(), Some(Errno(EINVAL)));
    }
}
