//! Chooses how `post-build-hook` reaches the kernel. On x86_64 Linux with
//! glibc it makes its system calls itself
//! (`src/bin/post-build-hook/sys/linux_x86_64.rs`) and is linked static,
//! without the C runtime, so that no dynamic loader runs before it: that is
//! most of an exec's cost, and Nix waits for the hook after every build.
//! Elsewhere it is an ordinary program on libc.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(hook_raw_syscalls)");
    let target = |key: &str| env::var(key).unwrap_or_default();
    // glibc only: a musl build links its own C runtime objects explicitly,
    // and is static and quick to start already. 64-bit only: x32 is x86_64
    // with other system call numbers. A build instrumented for coverage or
    // a sanitizer needs that runtime's libraries, which cannot be linked
    // into a program without libc: such builds take the libc side too.
    if target("CARGO_CFG_TARGET_OS") == "linux"
        && target("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && target("CARGO_CFG_TARGET_ENV") == "gnu"
        && target("CARGO_CFG_TARGET_POINTER_WIDTH") == "64"
        && !instrumented()
    {
        println!("cargo:rustc-cfg=hook_raw_syscalls");
        // Its own entry point, no libc, no interpreter and no relocations
        // left for start-up to apply.
        for arg in ["-nostartfiles", "-static", "-no-pie"] {
            println!("cargo:rustc-link-arg-bin=post-build-hook={arg}");
        }
    }
}

/// Whether this build is instrumented: `-C instrument-coverage` or
/// `-Z sanitizer=...` among the flags cargo passes to rustc.
fn instrumented() -> bool {
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    env::var("CARGO_ENCODED_RUSTFLAGS")
        .unwrap_or_default()
        .split('\x1f')
        .any(|flag| flag.contains("instrument-coverage") || flag.contains("sanitizer"))
}
