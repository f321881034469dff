//! nix-post-build-hook-queue: a Nix `post-build-hook` that returns at once,
//! and a daemon that journals the built paths and signs and uploads them in
//! batches, outside the build loop.
//!
//! The path of a store path: the hook (`src/bin/post-build-hook/`) sends it
//! over the socket ([`client`]) in lines built by [`wire`] ([`protocol`]
//! parses them); the daemon
//! ([`server`]) validates it ([`store_path`]), journals it durably
//! ([`journal`]) and acknowledges; the [`worker`] signs and uploads it with
//! `nix` ([`nix`]) and only then removes it from the journal. When the
//! daemon is away, the hook leaves it in the [`spool`].

#![warn(missing_docs)]

pub mod log;

pub mod cli;
pub mod client;
pub mod config;
pub mod drv;
pub mod journal;
pub mod nix;
pub mod policy;
pub mod protocol;
pub mod redact;
pub mod server;
pub mod spool;
pub mod status;
pub mod store_path;
// The one module allowed `unsafe` (Cargo.toml denies it elsewhere).
#[allow(unsafe_code)]
pub mod sys;
pub mod systemd;
pub mod target;
pub mod wire;
pub mod worker;

/// The version of both binaries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
