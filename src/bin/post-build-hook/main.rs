//! The hook Nix runs after each build: hands the built paths to the daemon
//! (or to the spool) and always exits 0, so a queue problem never fails a
//! build.
//!
//! Nix waits for this program after every build, so it is built without
//! `std`, on `core`, `alloc` and the few system calls in [`sys`]. A `std`
//! program spends about 0.3 ms more than `/bin/true` before its `main` runs
//! (the benchmark's figure 1f), which alone is most of the hook's budget;
//! on x86_64 Linux this one does not even load libc, and runs its
//! `--version` in about a third of the time `/bin/true` takes to do nothing.
//! What it sends and where it spools follow the daemon's own rules:
//! [`wire`] is the library's file, compiled here too.

#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
// The unit tests run with std's test harness: the entry point, the panic
// handler and the allocator below are for the real program only.
#![cfg_attr(test, allow(dead_code))]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;

mod conn;
mod spool;
mod sys;
#[allow(dead_code)] // the daemon uses the rest
#[path = "../../wire.rs"]
mod wire;

use alloc::format;
use alloc::string::String;
use core::fmt::{self, Write};

use conn::{Connection, HookError};

#[cfg(not(test))]
#[global_allocator]
static ALLOCATOR: sys::Arena = sys::Arena;

/// A bug, not a condition the hook expects: say so and still exit 0, as a
/// failing hook would stop Nix's build loop. Writes without allocating, in
/// case the allocator is what failed.
#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(
        Stderr,
        "post-build-hook: internal error ({}); the paths of this build may not be queued",
        info.message()
    );
    sys::exit(0)
}

/// Rust ships `alloc` compiled for unwinding, so its cleanup code names the
/// unwinder's two entry points. This program aborts on panic instead (every
/// profile in Cargo.toml has `panic = "abort"`, and the panic handler never returns),
/// so nothing ever unwinds and neither is called; these only satisfy the
/// linker, without pulling in an unwinder.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// See [`rust_eh_personality`]: never called, as nothing unwinds.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    sys::exit(0)
}

struct Stderr;

impl Write for Stderr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        sys::write_stderr(s.as_bytes());
        Ok(())
    }
}

/// What the hook does once started: [`sys`]'s entry point calls it, and
/// exits 0 when it returns.
fn start() {
    sys::start_up();
    match sys::arg(1) {
        None => run(),
        Some(b"--version") => {
            let line = format!("post-build-hook {}\n", env!("CARGO_PKG_VERSION"));
            sys::write_stdout(line.as_bytes());
        }
        Some(_) => usage(),
    }
}

/// Where the hook looks, after its environment.
struct Settings {
    socket: String,
    spool: String,
    timeout_ms: u64,
}

/// The default places for this user, as the daemon computes them.
fn places() -> wire::Places<'static> {
    wire::Places {
        uid: sys::uid(),
        runtime_dir: sys::env("XDG_RUNTIME_DIR"),
        state_home: sys::env("XDG_STATE_HOME"),
        home: sys::env("HOME"),
        tmp_dir: sys::env("TMPDIR"),
    }
}

impl Settings {
    fn from_env() -> Settings {
        let places = places();
        let set = |key| sys::env(key).filter(|v| !v.is_empty()).map(String::from);
        let timeout = sys::env(wire::ENV_TIMEOUT)
            .and_then(|v| wire::parse_seconds(v).ok())
            .unwrap_or(wire::DEFAULT_HOOK_TIMEOUT);
        Settings {
            socket: set(wire::ENV_SOCKET).unwrap_or_else(|| places.socket()),
            spool: set(wire::ENV_SPOOL).unwrap_or_else(|| places.spool_dir()),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

fn usage() {
    let defaults = places();
    let text = format!(
        "Usage: post-build-hook   (run by Nix as its post-build-hook; takes no arguments)\n\
         Reads OUT_PATHS, or DRV_PATH when OUT_PATHS is empty, and hands them to\n\
         post-build-hook-queue at ${} (default {}), or to the spool ${} (default {}).\n\
         Waits at most ${} seconds (default {}). Always exits 0.\n",
        wire::ENV_SOCKET,
        defaults.socket(),
        wire::ENV_SPOOL,
        defaults.spool_dir(),
        wire::ENV_TIMEOUT,
        wire::DEFAULT_HOOK_TIMEOUT.as_secs()
    );
    sys::write_stdout(text.as_bytes());
}

fn run() {
    let out_paths = sys::env("OUT_PATHS").unwrap_or_default();
    let drv_path = sys::env("DRV_PATH").unwrap_or_default();
    let outcome = hook(out_paths, drv_path, &Settings::from_env());
    if !matches!(outcome, Outcome::Queued) {
        // One write for the whole line, as Nix's log takes it.
        sys::write_stderr(format!("post-build-hook: {outcome}\n").as_bytes());
    }
}

/// What the hook did, for its one line on stderr.
enum Outcome {
    /// The daemon acknowledged everything.
    Queued,
    /// Nix gave no paths.
    NothingToQueue,
    /// The daemon was not reachable or did not acknowledge; the rest was
    /// spooled to the file.
    Spooled(HookError, String),
    /// Neither the daemon nor the spool took the request.
    Lost(HookError, String, sys::Errno),
    /// The daemon refused the request as malformed (a path that is not a
    /// valid store path, say); it is not spooled, as it would be refused
    /// again.
    Refused(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Queued => write!(f, "queued"),
            Outcome::NothingToQueue => {
                write!(f, "nothing to queue: OUT_PATHS and DRV_PATH are both empty")
            }
            Outcome::Spooled(e, file) => write!(
                f,
                "{e}; spooled the paths to {file} for the daemon to pick up"
            ),
            Outcome::Refused(reason) => write!(
                f,
                "the daemon refused the paths: {reason}; they are NOT queued"
            ),
            Outcome::Lost(e, dir, se) => write!(
                f,
                "{e}; and cannot write the spool {dir}: {se}; these paths are NOT queued"
            ),
        }
    }
}

/// Hands the paths to the daemon, or to the spool when that fails.
fn hook(out_paths: &str, drv_path: &str, settings: &Settings) -> Outcome {
    let lines = wire::hook_lines(out_paths, drv_path);
    if lines.is_empty() {
        return Outcome::NothingToQueue;
    }
    let deadline = sys::Deadline::after_ms(settings.timeout_ms);
    let mut sent = 0;
    let result = Connection::open(&settings.socket, deadline).and_then(|mut conn| {
        for line in &lines {
            conn.request(line)?;
            sent += 1;
        }
        Ok(())
    });
    let err = match result {
        Ok(()) => return Outcome::Queued,
        // A malformed request would be refused again from the spool.
        Err(HookError::Refused(reason)) if !wire::is_transient(&reason) => {
            return Outcome::Refused(reason)
        }
        Err(e) => e,
    };
    let rest: String = lines.get(sent..).unwrap_or_default().concat();
    match spool::write(&settings.spool, &rest) {
        Ok(file) => Outcome::Spooled(err, file),
        Err(se) => Outcome::Lost(err, settings.spool.clone(), se),
    }
}
