//! The few system calls the hook makes, each behind a safe wrapper, and the
//! process's start: its arguments, environment and memory.
//!
//! On x86_64 Linux with glibc the hook makes its system calls itself and
//! links no C library (`sys/linux_x86_64.rs`); elsewhere it makes the same
//! calls through libc (`sys/libc.rs`). Every `unsafe` block of the hook is
//! in this file and those two. Errors are [`Errno`]s, which print the way
//! `std::io::Error` does (`sys/errno.rs`), so the hook's messages read like
//! the rest of the project's. The constants are Linux's generic ABI values,
//! shared by the architectures listed below.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_long;
use core::fmt;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

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
    "post-build-hook's constants are Linux's generic ones (x86, arm, riscv64, loongarch64)"
);

#[cfg(hook_raw_syscalls)]
#[path = "sys/linux_x86_64.rs"]
mod os;

#[cfg(not(hook_raw_syscalls))]
#[path = "sys/libc.rs"]
mod os;

#[path = "sys/errno.rs"]
mod errno;

// The C library's calls are also built, and tested against the direct
// ones, where the tests run.
#[cfg(all(test, hook_raw_syscalls))]
#[path = "sys/libc.rs"]
mod libc_os;

const ENOENT: i32 = 2;
const EINTR: i32 = 4;
const EAGAIN: i32 = 11;
const EINVAL: i32 = 22;
const EEXIST: i32 = 17;
const ETIMEDOUT: i32 = 110;

const O_RDONLY: i32 = 0;
const O_WRONLY: i32 = 1;
const O_RDWR: i32 = 2;
const O_CREAT: i32 = 0o100;
const O_EXCL: i32 = 0o200;
const O_CLOEXEC: i32 = 0o2000000;

const AF_UNIX: i32 = 1;
const SOCK_STREAM: i32 = 1;
const SOCK_NONBLOCK: i32 = 0o4000;
const SOCK_CLOEXEC: i32 = O_CLOEXEC;

const POLLIN: i16 = 0x1;
const POLLOUT: i16 = 0x4;
const POLLNVAL: i16 = 0x20;

const CLOCK_REALTIME: i32 = 0;
const CLOCK_MONOTONIC: i32 = 1;
const SIGPIPE: i32 = 13;
const SIG_IGN: usize = 1;

/// `struct sockaddr_un`.
#[repr(C)]
struct SockaddrUn {
    family: u16,
    path: [u8; 108],
}

/// `struct pollfd`.
#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

/// `struct timespec`: the kernel's on x86_64, libc's elsewhere.
#[repr(C)]
struct Timespec {
    sec: c_long,
    nsec: c_long,
}

/// The kernel's `struct sigaction` on x86_64 (not libc's, which is larger).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// An error number from a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// Nothing happened in time.
    pub const TIMED_OUT: Errno = Errno(ETIMEDOUT);
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match errno::text(self.0) {
            Some(text) => write!(f, "{text} (os error {})", self.0),
            None => write!(f, "Unknown error {0} (os error {0})", self.0),
        }
    }
}

/// The result of a system call.
pub type Result<T> = core::result::Result<T, Errno>;

/// A kernel result: a negated error number (-4095 to -1), or a value, which
/// on a 32-bit system may be an address past 2 GiB, so negative as well.
fn check(rc: isize) -> Result<isize> {
    match rc {
        -4095..=-1 => Err(Errno(-rc as i32)),
        _ => Ok(rc),
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

/// A new descriptor from a kernel result.
fn new_fd(rc: isize) -> Result<Fd> {
    check(rc).map(|fd| Fd(fd as i32))
}

/// An open file descriptor, closed when dropped.
pub struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and is closed only here.
        unsafe { os::close(self.0) };
    }
}

impl Fd {
    /// Writes all of `buf`, waiting for the descriptor until `deadline`.
    pub fn write_all(&self, mut buf: &[u8], deadline: Option<Deadline>) -> Result<()> {
        while !buf.is_empty() {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe { os::write(self.0, buf.as_ptr(), buf.len()) };
            match (check(n), deadline) {
                (Ok(n), _) => buf = buf.get(n as usize..).unwrap_or_default(),
                (Err(Errno(EINTR)), _) => {}
                (Err(Errno(EAGAIN)), Some(d)) => self.wait(POLLOUT, d)?,
                (Err(e), _) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what is there into `buf` (0 at end of stream), waiting until
    /// `deadline` for something to arrive.
    pub fn read(&self, buf: &mut [u8], deadline: Deadline) -> Result<usize> {
        loop {
            // SAFETY: buf is valid and writable for buf.len() bytes.
            let n = unsafe { os::read(self.0, buf.as_mut_ptr(), buf.len()) };
            match check(n) {
                Ok(n) => return Ok(n as usize),
                Err(Errno(EINTR)) => {}
                Err(Errno(EAGAIN)) => self.wait(POLLIN, deadline)?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Flushes the file's data to disk.
    pub fn sync_data(&self) -> Result<()> {
        // SAFETY: fdatasync only reads the descriptor number.
        check(unsafe { os::fdatasync(self.0) }).map(drop)
    }

    /// Flushes the file (or directory) and its metadata to disk.
    pub fn sync_all(&self) -> Result<()> {
        // SAFETY: fsync only reads the descriptor number.
        check(unsafe { os::fsync(self.0) }).map(drop)
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
            match check(unsafe { os::poll(&mut fds, 1, left) }) {
                Ok(0) => return Err(Errno::TIMED_OUT),
                Ok(_) => return Ok(()),
                Err(Errno(EINTR)) => {}
                Err(e) => return Err(e),
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
    fn left_ms(self) -> Option<i32> {
        let left = self.0.checked_sub(now_ns(CLOCK_MONOTONIC))?;
        let ms = left.div_ceil(1_000_000).max(1);
        Some(i32::try_from(ms).unwrap_or(i32::MAX))
    }
}

fn now_ns(clock: i32) -> u128 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: ts is a valid timespec for the call to fill in; both clocks
    // exist on every Linux, so it cannot fail.
    unsafe { os::clock_gettime(clock, &mut ts) };
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
    let fd = new_fd(unsafe { os::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0) })?;
    let len = (2 + path.len() + 1) as u32;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed it.
    check(unsafe { os::connect(fd.0, &addr, len) })?;
    Ok(fd)
}

/// Creates `path`'s file new (never replacing one), for writing.
pub fn create_new(path: &str, mode: u32) -> Result<Fd> {
    let p = c_string(path)?;
    // SAFETY: p is NUL-terminated.
    new_fd(unsafe { os::openat(p.as_ptr(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode) })
}

/// Opens a directory, to sync it.
pub fn open_dir(path: &str) -> Result<Fd> {
    let p = c_string(path)?;
    // SAFETY: p is NUL-terminated.
    new_fd(unsafe { os::openat(p.as_ptr(), O_RDONLY | O_CLOEXEC, 0) })
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
    match check(unsafe { os::mkdirat(p.as_ptr(), 0o777) }) {
        Err(Errno(EEXIST)) => Ok(()),
        other => other.map(drop),
    }
}

/// Renames `from` to `to`, replacing it.
pub fn rename_file(from: &str, to: &str) -> Result<()> {
    let (f, t) = (c_string(from)?, c_string(to)?);
    // SAFETY: both are NUL-terminated.
    check(unsafe { os::renameat(f.as_ptr(), t.as_ptr()) }).map(drop)
}

/// Removes the file `path`.
pub fn remove_file(path: &str) -> Result<()> {
    let p = c_string(path)?;
    // SAFETY: p is NUL-terminated.
    check(unsafe { os::unlinkat(p.as_ptr()) }).map(drop)
}

/// The process's arguments and environment, as its entry point found them:
/// `argc`, and the two null-terminated arrays of C strings.
static ARGC: AtomicUsize = AtomicUsize::new(0);
static ARGV: AtomicPtr<*const u8> = AtomicPtr::new(core::ptr::null_mut());
static ENVP: AtomicPtr<*const u8> = AtomicPtr::new(core::ptr::null_mut());

/// Keeps the arguments and the environment the process started with, for
/// [`arg`] and [`env`](fn@env). The entry point calls it first; the arrays are
/// never changed and live as long as the process, which makes the other
/// two safe.
fn set_process(argc: usize, argv: *const *const u8, envp: *const *const u8) {
    ARGC.store(argc, Ordering::Relaxed);
    ARGV.store(argv.cast_mut(), Ordering::Relaxed);
    ENVP.store(envp.cast_mut(), Ordering::Relaxed);
}

/// The bytes of the C string at `p`, which lives as long as the process.
///
/// # Safety
/// `p` must point to a NUL-terminated string that is never freed or changed.
unsafe fn c_bytes(p: *const u8) -> &'static [u8] {
    let mut len = 0;
    // SAFETY: the string is NUL-terminated (the caller's contract), so
    // every byte up to the NUL is readable.
    while unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: the len bytes just read, which live as long as the process.
    unsafe { core::slice::from_raw_parts(p, len) }
}

/// The `index`th command-line argument, if there is one.
pub fn arg(index: usize) -> Option<&'static [u8]> {
    let argv = ARGV.load(Ordering::Relaxed);
    if index >= ARGC.load(Ordering::Relaxed) || argv.is_null() {
        return None;
    }
    // SAFETY: argv holds argc pointers (set_process), the arguments.
    let p = unsafe { *argv.add(index) };
    // SAFETY: a non-null argument is a C string for the process's life.
    (!p.is_null()).then(|| unsafe { c_bytes(p) })
}

/// The environment variable `name`, if it is set and UTF-8 (the first, if
/// it is there more than once, as `getenv` has it).
pub fn env(name: &str) -> Option<&'static str> {
    let mut entry = ENVP.load(Ordering::Relaxed).cast_const();
    if entry.is_null() {
        return None;
    }
    loop {
        // SAFETY: envp is a null-terminated array of pointers (set_process),
        // and entry has not passed its null.
        let p = unsafe { *entry };
        if p.is_null() {
            return None;
        }
        // SAFETY: each entry is a C string for the process's life.
        let var = unsafe { c_bytes(p) };
        if let Some(value) = var
            .strip_prefix(name.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
        {
            return core::str::from_utf8(value).ok();
        }
        // SAFETY: p was not the terminating null, so the array goes on.
        entry = unsafe { entry.add(1) };
    }
}

/// The process id.
pub fn pid() -> u32 {
    // SAFETY: getpid cannot fail and touches no memory.
    unsafe { os::getpid() as u32 }
}

/// The real user id.
pub fn uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { os::getuid() as u32 }
}

/// What `std` does before `main`: a write to a closed pipe (Nix's log, the
/// daemon's socket) is an error, not a killing SIGPIPE; and descriptors 0-2
/// are open, so that no socket or file of the hook's becomes "stderr".
pub fn start_up() {
    let ignore = KernelSigaction {
        handler: SIG_IGN,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: ignoring a signal installs no handler code.
    unsafe { os::rt_sigaction(SIGPIPE, &ignore) };
    let mut fds = [0, 1, 2].map(|fd| PollFd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: fds holds three valid pollfds, as the count says.
    if unsafe { os::poll(fds.as_mut_ptr(), 3, 0) } < 0 {
        return;
    }
    for p in fds {
        if p.revents & POLLNVAL != 0 {
            // SAFETY: the path is a NUL-terminated literal; the lowest free
            // descriptor, the closed one, is what open returns, and it stays
            // open for the life of the process.
            unsafe { os::openat(c"/dev/null".as_ptr().cast(), O_RDWR, 0) };
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
pub fn exit(code: i32) -> ! {
    os::exit_group(code)
}

/// The hook's allocator: it hands out memory from large anonymous mappings
/// and takes back only the latest block. A run allocates a few kilobytes
/// (its paths, lines and messages) and then exits, so there is nothing
/// worth a free list; a block that grows at the end, as the one `Vec` or
/// `String` being built does, grows in place.
pub struct Arena;

/// The next free byte of the current mapping, and its end.
static NEXT: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);

/// Mappings are this large (or as large as the block asked for); pages the
/// hook never touches cost nothing.
const CHUNK: usize = 1 << 20;

impl Arena {
    /// A block of `layout` from the current mapping, or from a new one.
    fn take(layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        let fits = |next: usize| {
            let start = next.checked_next_multiple_of(align)?;
            Some((start, start.checked_add(size)?))
        };
        let mut next = NEXT.load(Ordering::Relaxed);
        let mut end = END.load(Ordering::Relaxed);
        if !matches!(fits(next), Some((_, e)) if next != 0 && e <= end) {
            let Some(len) = size
                .checked_add(align)
                .and_then(|n| n.max(CHUNK).checked_next_multiple_of(4096))
            else {
                return core::ptr::null_mut();
            };
            // SAFETY: a new anonymous mapping; the result is checked.
            let Ok(base) = check(unsafe { os::mmap_anonymous(len) }) else {
                return core::ptr::null_mut();
            };
            (next, end) = (base as usize, base as usize + len);
            END.store(end, Ordering::Relaxed);
        }
        match fits(next) {
            Some((start, stop)) if stop <= end => {
                NEXT.store(stop, Ordering::Relaxed);
                start as *mut u8
            }
            _ => core::ptr::null_mut(),
        }
    }
}

// SAFETY: every block is fresh memory of the layout's size and alignment,
// inside a mapping that is never unmapped, and no two live blocks overlap:
// memory is reused only by the latest block itself. The hook has one
// thread; the atomics only make the statics shareable.
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Arena::take(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let start = ptr as usize;
        // The latest block is given back; any other stays until exit.
        let _ = NEXT.compare_exchange(
            start + layout.size(),
            start,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let start = ptr as usize;
        let latest = NEXT.load(Ordering::Relaxed) == start + layout.size();
        if latest
            && start
                .checked_add(new_size)
                .is_some_and(|e| e <= END.load(Ordering::Relaxed))
        {
            NEXT.store(start + new_size, Ordering::Relaxed);
            return ptr;
        }
        // SAFETY: new_size is non-zero and does not overflow with the
        // alignment (GlobalAlloc::realloc's contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = Arena::take(new_layout);
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size, and the
            // new one is fresh, so they do not overlap.
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// The table holds glibc's texts, which std prints where the C library
    /// is glibc.
    #[test]
    #[cfg(target_env = "gnu")]
    fn errors_read_like_std() {
        for n in 1..200 {
            assert_eq!(
                Errno(n).to_string(),
                std::io::Error::from_raw_os_error(n).to_string()
            );
        }
    }

    #[test]
    fn every_kernel_error_is_an_error_and_every_other_result_a_value() {
        assert_eq!(check(-2), Err(Errno(ENOENT)));
        assert_eq!(check(-4095), Err(Errno(4095)));
        assert_eq!(check(0), Ok(0));
        // An address past 2 GiB on a 32-bit system.
        assert_eq!(check(-4096), Ok(-4096));
        assert_eq!(check(isize::MIN), Ok(isize::MIN));
    }

    #[test]
    fn arguments_and_environment_come_from_the_entry_points_arrays() {
        let c = |s: &'static core::ffi::CStr| s.as_ptr().cast::<u8>();
        let argv = [c(c"post-build-hook"), c(c"--version"), core::ptr::null()];
        let envp = [
            c(c"OUT_PATHS_X=no"),
            c(c"OUT_PATHS=/nix/store/a /nix/store/b"),
            c(c"EMPTY="),
            c(c"OUT_PATHS=second"),
            c(c"NOT_UTF8=\xff"),
            core::ptr::null(),
        ];
        set_process(2, argv.as_ptr(), envp.as_ptr());
        assert_eq!(arg(1), Some(&b"--version"[..]));
        assert_eq!(arg(2), None);
        assert_eq!(env("OUT_PATHS"), Some("/nix/store/a /nix/store/b"));
        assert_eq!(env("EMPTY"), Some(""));
        assert_eq!(env("OUT"), None);
        assert_eq!(env("NOT_UTF8"), None);
        assert_eq!(env("MISSING"), None);
        // The arrays are this test's own: forget them again.
        set_process(0, core::ptr::null(), core::ptr::null());
        assert_eq!(env("OUT_PATHS"), None);
    }

    #[test]
    fn the_arena_aligns_keeps_blocks_apart_and_grows_the_latest_in_place() {
        let layout = |size, align| Layout::from_size_align(size, align).unwrap();
        // SAFETY: each block is used within its layout and given back with
        // it, as GlobalAlloc asks.
        unsafe {
            let a = Arena.alloc(layout(3, 1));
            let b = Arena.alloc(layout(16, 16));
            assert!(!a.is_null() && !b.is_null());
            assert_eq!(b as usize % 16, 0);
            assert!(b as usize >= a as usize + 3);
            // b is the latest block: it grows where it is.
            assert_eq!(Arena.realloc(b, layout(16, 16), 4096), b);
            // a is not: it moves, and keeps its bytes.
            a.write_bytes(7, 3);
            let a2 = Arena.realloc(a, layout(3, 1), 64);
            assert!(a2 as usize >= b as usize + 4096);
            assert_eq!(core::slice::from_raw_parts(a2, 3), [7, 7, 7]);
            // Given back, the latest block's place is handed out again.
            Arena.dealloc(a2, layout(64, 1));
            assert_eq!(Arena.alloc(layout(64, 1)), a2);
            // A block larger than a mapping gets its own.
            let big = Arena.alloc(layout(3 * CHUNK, 8));
            assert!(!big.is_null());
            big.add(3 * CHUNK - 1).write(1);
        }
    }

    #[test]
    #[cfg(hook_raw_syscalls)]
    fn the_direct_calls_agree_with_the_c_librarys() {
        let missing = c"/nonexistent/npbhq".as_ptr().cast();
        let root = c"/".as_ptr().cast();
        // SAFETY: the paths are NUL-terminated; the descriptors the socket
        // calls return are closed again.
        unsafe {
            assert_eq!(os::openat(missing, O_RDONLY, 0), -(ENOENT as isize));
            assert_eq!(libc_os::openat(missing, O_RDONLY, 0), -(ENOENT as isize));
            assert_eq!(os::mkdirat(root, 0o777), -(EEXIST as isize));
            assert_eq!(libc_os::mkdirat(root, 0o777), -(EEXIST as isize));
            assert_eq!(os::getpid(), libc_os::getpid());
            assert_eq!(os::getuid(), libc_os::getuid());
            assert_eq!(os::close(-1), -9);
            assert_eq!(libc_os::close(-1), -9);
            for fd in [
                os::socket(AF_UNIX, SOCK_STREAM, 0),
                libc_os::socket(AF_UNIX, SOCK_STREAM, 0),
            ] {
                assert!(fd >= 0, "{fd}");
                os::close(fd as i32);
            }
            let ignore = KernelSigaction {
                handler: SIG_IGN,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            assert_eq!(os::rt_sigaction(SIGPIPE, &ignore), 0);
            assert_eq!(libc_os::rt_sigaction(SIGPIPE, &ignore) as usize, SIG_IGN);
            for p in [os::mmap_anonymous(4096), libc_os::mmap_anonymous(4096)] {
                assert!(p > 0 && p % 4096 == 0, "{p}");
            }
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
