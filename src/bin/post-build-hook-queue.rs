//! The daemon and its admin commands; see `post-build-hook-queue --help`.
//!
//! Two things here keep the idle daemon small (benchmark figure 6a); both
//! were measured, not guessed:
//!
//! - `main` is entered from the C runtime directly, not through the standard
//!   library's start-up. That start-up installs a stack-overflow handler, and
//!   finding the main thread's stack makes glibc read `/proc/self/maps` with
//!   its stdio and scanf, whose pages then stay resident: about a quarter of
//!   a MiB. The two things of that start-up the daemon needs,
//!   [`npbhq::sys::start_up`] does; `std::env::args` works either way (glibc
//!   hands the arguments to the standard library before `main`).
//! - The unwinder is linked in statically from GCC's `libgcc_eh.a`, as the
//!   standard library does for static builds, instead of loading
//!   `libgcc_s.so.1`, whose loading alone makes 100 KiB resident. With
//!   `panic = "abort"` the unwinder only walks the stack for a backtrace.

#![cfg_attr(not(test), no_main)]

/// The C entry point; the arguments come from `std::env::args`.
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    npbhq::sys::start_up();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // exit, unlike returning, flushes stdout as std's start-up would.
    std::process::exit(npbhq::cli::main(&args));
}

// Listed here, before the standard library's own `-lgcc_s`, so the linker
// takes the unwinder from this archive and then drops libgcc_s as unneeded.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[link(name = "gcc_eh", kind = "static", modifiers = "-bundle")]
extern "C" {}
