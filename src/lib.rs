//! A Nix `post-build-hook` that hands the built paths to a daemon ([`client`], [`wire`];
//! the [`spool`] when it is away) and returns at once, and the daemon ([`server`]) that
//! journals them ([`journal`]), then signs and uploads them with `nix` ([`worker`]).

#![warn(missing_docs)]

pub mod cli;
pub mod client;
pub mod config;
pub mod drv;
pub mod journal;
pub mod log;
pub mod nix;
pub mod policy;
pub mod protocol;
pub mod redact;
pub mod server;
pub mod spool;
pub mod status;
pub mod store_path;
#[allow(unsafe_code)]
pub mod sys;
pub mod systemd;
pub mod target;
pub mod wire;
pub mod worker;

/// The version of both binaries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
