//! One event per line on stderr, with journald priorities under systemd.
//!
//! When `JOURNAL_STREAM` is set, stderr is connected to the journal and each
//! line is prefixed with its sd-daemon priority (`<3>` error, `<4>` warning,
//! `<6>` info) so journald keeps the levels. Otherwise the level is written
//! as a word. Messages are folded onto one line.

use std::fmt;
use std::io::Write;
use std::sync::OnceLock;

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed and needs attention.
    Error,
    /// Something went wrong but was handled (a retry, a dropped path).
    Warning,
    /// Normal progress.
    Info,
}

impl Level {
    fn priority(self) -> u8 {
        match self {
            Level::Error => 3,
            Level::Warning => 4,
            Level::Info => 6,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Info => "info",
        }
    }
}

fn under_journald() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty()))
}

/// Writes one event line to stderr.
pub fn log(level: Level, args: fmt::Arguments<'_>) {
    let text = crate::protocol::one_line(&args.to_string());
    let line = if under_journald() {
        format!("<{}>{text}\n", level.priority())
    } else {
        format!("{}: {text}\n", level.word())
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs an error event.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Error, format_args!($($arg)*)) };
}

/// Logs a warning event.
#[macro_export]
macro_rules! warning {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Warning, format_args!($($arg)*)) };
}

/// Logs an informational event.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Info, format_args!($($arg)*)) };
}
