//! Linux's system calls on x86_64, made directly: no C library, no dynamic
//! loader.
//!
//! Loading and relocating libc costs more than the rest of the hook's run,
//! and Nix pays it after every build: a static program without libc that
//! only exits takes about 0.4 ms less than `/bin/true` (the benchmark's
//! floor 1i). Here the hook is such a static executable (build.rs links it
//! with `-nostartfiles -static -no-pie`), whose entry point is `_start`
//! below and whose few calls are the `syscall` instruction. Besides the
//! calls, a program without libc needs the memory functions the compiler
//! emits calls to; they are here too.
//!
//! Every function returns what the kernel does: a result, or a negated error
//! number.

use core::arch::asm;

use super::{KernelSigaction, PollFd, SockaddrUn, Timespec};

const SYS_READ: usize = 0;
const SYS_WRITE: usize = 1;
const SYS_CLOSE: usize = 3;
const SYS_POLL: usize = 7;
const SYS_MMAP: usize = 9;
const SYS_RT_SIGACTION: usize = 13;
const SYS_GETPID: usize = 39;
const SYS_SOCKET: usize = 41;
const SYS_CONNECT: usize = 42;
const SYS_FSYNC: usize = 74;
const SYS_FDATASYNC: usize = 75;
const SYS_GETUID: usize = 102;
const SYS_CLOCK_GETTIME: usize = 228;
const SYS_EXIT_GROUP: usize = 231;
const SYS_OPENAT: usize = 257;
const SYS_MKDIRAT: usize = 258;
const SYS_UNLINKAT: usize = 263;
const SYS_RENAMEAT: usize = 264;

/// Relative paths in the `*at` calls are to the working directory.
const AT_FDCWD: isize = -100;

/// Makes system call `nr` with up to six arguments.
///
/// # Safety
/// The arguments must be valid for the call: pointers to memory of the size
/// and kind the kernel reads or writes through them.
unsafe fn syscall(nr: usize, args: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the `syscall` instruction takes its number in rax and its
    // arguments in rdi, rsi, rdx, r10, r8 and r9, returns in rax and
    // clobbers rcx and r11; the caller vouches for the arguments.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") args[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

pub unsafe fn openat(path: *const u8, flags: i32, mode: u32) -> isize {
    // SAFETY: the caller passes a NUL-terminated path.
    unsafe {
        syscall(
            SYS_OPENAT,
            [
                AT_FDCWD as usize,
                path as usize,
                flags as usize,
                mode as usize,
                0,
                0,
            ],
        )
    }
}

pub unsafe fn close(fd: i32) -> isize {
    // SAFETY: close takes only a number.
    unsafe { syscall(SYS_CLOSE, [fd as usize, 0, 0, 0, 0, 0]) }
}

pub unsafe fn read(fd: i32, buf: *mut u8, len: usize) -> isize {
    // SAFETY: the caller passes a buffer writable for len bytes.
    unsafe { syscall(SYS_READ, [fd as usize, buf as usize, len, 0, 0, 0]) }
}

pub unsafe fn write(fd: i32, buf: *const u8, len: usize) -> isize {
    // SAFETY: the caller passes a buffer readable for len bytes.
    unsafe { syscall(SYS_WRITE, [fd as usize, buf as usize, len, 0, 0, 0]) }
}

pub unsafe fn fdatasync(fd: i32) -> isize {
    // SAFETY: fdatasync takes only a number.
    unsafe { syscall(SYS_FDATASYNC, [fd as usize, 0, 0, 0, 0, 0]) }
}

pub unsafe fn fsync(fd: i32) -> isize {
    // SAFETY: fsync takes only a number.
    unsafe { syscall(SYS_FSYNC, [fd as usize, 0, 0, 0, 0, 0]) }
}

pub unsafe fn mkdirat(path: *const u8, mode: u32) -> isize {
    // SAFETY: the caller passes a NUL-terminated path.
    unsafe {
        syscall(
            SYS_MKDIRAT,
            [AT_FDCWD as usize, path as usize, mode as usize, 0, 0, 0],
        )
    }
}

pub unsafe fn renameat(from: *const u8, to: *const u8) -> isize {
    // SAFETY: the caller passes two NUL-terminated paths.
    unsafe {
        syscall(
            SYS_RENAMEAT,
            [
                AT_FDCWD as usize,
                from as usize,
                AT_FDCWD as usize,
                to as usize,
                0,
                0,
            ],
        )
    }
}

pub unsafe fn unlinkat(path: *const u8) -> isize {
    // SAFETY: the caller passes a NUL-terminated path.
    unsafe { syscall(SYS_UNLINKAT, [AT_FDCWD as usize, path as usize, 0, 0, 0, 0]) }
}

pub unsafe fn socket(domain: i32, kind: i32, protocol: i32) -> isize {
    // SAFETY: socket takes only numbers.
    unsafe {
        syscall(
            SYS_SOCKET,
            [domain as usize, kind as usize, protocol as usize, 0, 0, 0],
        )
    }
}

pub unsafe fn connect(fd: i32, addr: *const SockaddrUn, len: u32) -> isize {
    // SAFETY: the caller passes an address valid for len bytes.
    unsafe {
        syscall(
            SYS_CONNECT,
            [fd as usize, addr as usize, len as usize, 0, 0, 0],
        )
    }
}

pub unsafe fn poll(fds: *mut PollFd, n: usize, timeout_ms: i32) -> isize {
    // SAFETY: the caller passes n valid pollfds.
    unsafe { syscall(SYS_POLL, [fds as usize, n, timeout_ms as usize, 0, 0, 0]) }
}

pub unsafe fn clock_gettime(clock: i32, ts: *mut Timespec) -> isize {
    // SAFETY: the caller passes a writable timespec.
    unsafe { syscall(SYS_CLOCK_GETTIME, [clock as usize, ts as usize, 0, 0, 0, 0]) }
}

pub unsafe fn getpid() -> isize {
    // SAFETY: getpid takes nothing.
    unsafe { syscall(SYS_GETPID, [0; 6]) }
}

pub unsafe fn getuid() -> isize {
    // SAFETY: getuid takes nothing.
    unsafe { syscall(SYS_GETUID, [0; 6]) }
}

pub unsafe fn rt_sigaction(sig: i32, action: *const KernelSigaction) -> isize {
    // SAFETY: the caller passes a valid action; the old one is not asked
    // for; the signal set is the kernel's 8 bytes.
    unsafe {
        syscall(
            SYS_RT_SIGACTION,
            [sig as usize, action as usize, 0, 8, 0, 0],
        )
    }
}

pub unsafe fn mmap_anonymous(len: usize) -> isize {
    const PROT_READ_WRITE: usize = 0x1 | 0x2;
    const MAP_PRIVATE_ANONYMOUS: usize = 0x02 | 0x20;
    // SAFETY: a new private mapping touches no existing memory.
    unsafe {
        syscall(
            SYS_MMAP,
            [
                0,
                len,
                PROT_READ_WRITE,
                MAP_PRIVATE_ANONYMOUS,
                usize::MAX,
                0,
            ],
        )
    }
}

pub fn exit_group(code: i32) -> ! {
    // SAFETY: exit_group ends the process and never returns.
    unsafe {
        asm!(
            "syscall",
            in("rax") SYS_EXIT_GROUP,
            in("rdi") code as isize,
            options(noreturn, nostack),
        )
    }
}

// The process's first instructions. The kernel starts it with the stack
// pointer at argc, followed by argv's pointers, a null, envp's pointers and
// a null; `start` gets that address. The frame pointer is zeroed so that
// debuggers see where the stack ends, and the stack is aligned as a call
// expects, which the kernel already does.
#[cfg(not(test))]
core::arch::global_asm!(
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {start}",
    "ud2",
    start = sym start,
);

/// Takes the arguments and the environment off the initial stack and runs
/// the hook.
///
/// # Safety
/// `stack` must be the stack pointer the kernel started the process with.
#[cfg(not(test))]
unsafe extern "C" fn start(stack: *const usize) -> ! {
    // SAFETY: the kernel's initial stack is argc, then argc argument
    // pointers and a null, then the environment's pointers and a null.
    let (argc, argv) = unsafe { (*stack, stack.add(1).cast::<*const u8>()) };
    // SAFETY: as above; the environment starts past argv's null.
    let envp = unsafe { argv.add(argc + 1) };
    super::set_process(argc, argv, envp);
    crate::start();
    exit_group(0)
}

// The memory and string functions the compiler calls for copies, fills,
// comparisons and its own idea of a string's length. The hook moves a few
// kilobytes in all, so these are the simplest correct ones: `rep movsb`
// and `rep stosb`, and byte loops.

/// Copies `n` bytes; the two may not overlap.
///
/// # Safety
/// As C's `memcpy`.
#[cfg(not(test))]
#[no_mangle]
unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes n valid bytes at both; the direction flag
    // is clear, as the ABI keeps it.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// Copies `n` bytes; the two may overlap.
///
/// # Safety
/// As C's `memmove`.
#[cfg(not(test))]
#[no_mangle]
unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // The destination does not start inside the source: copying
        // forwards reads every byte before it is written.
        // SAFETY: as for memcpy.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copying backwards from the last byte (direction flag set,
    // and cleared again, as the ABI expects) reads every byte before it is
    // written; n > 0 here, as dest - src < n.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dest
}

/// Fills `n` bytes with `c`.
///
/// # Safety
/// As C's `memset`.
#[cfg(not(test))]
#[no_mangle]
unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes n writable bytes.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// Compares `n` bytes as unsigned numbers.
///
/// # Safety
/// As C's `memcmp`.
#[cfg(not(test))]
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller passes n readable bytes at both. Volatile
        // reads keep the compiler from turning this loop into a call to
        // memcmp itself.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// Whether `n` bytes differ (any non-zero result).
///
/// # Safety
/// As C's `bcmp`.
#[cfg(not(test))]
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract.
    unsafe { memcmp(a, b, n) }
}

/// The length of a C string, without its NUL.
///
/// # Safety
/// As C's `strlen`.
#[cfg(not(test))]
#[no_mangle]
unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the string is NUL-terminated, so every byte up to the NUL is
    // readable. Volatile, as in memcmp.
    while unsafe { s.add(n).read_volatile() } != 0 {
        n += 1;
    }
    n
}
