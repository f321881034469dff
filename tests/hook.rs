//! The unit tests of `post-build-hook`'s modules, built with std's test
//! harness. The hook binary itself links no C runtime on x86_64 Linux (see
//! build.rs), so its tests cannot be built as the binary's own test target;
//! this crate compiles the same source files as a module instead.

// The hook's modules name `alloc` as the crate root of a `no_std` program
// does.
extern crate alloc;

#[path = "../src/bin/post-build-hook/main.rs"]
mod hook;
