//! One event per line on stderr: prefixed with its sd-daemon priority
//! (`<3>`, `<4>`, `<6>`) when stderr is the journal, else with its level as
//! a word. Messages are folded onto one line, their secrets masked (nix's
//! errors repeat the store URL, password included).

use std::fmt;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
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

/// True when `JOURNAL_STREAM` (`DEVICE:INODE`) names stderr itself, not a
/// stream a parent had (systemd.exec(5)).
fn under_journald() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let stream = std::env::var("JOURNAL_STREAM").unwrap_or_default();
        let Some((dev, ino)) = stream.trim().split_once(':') else {
            return false;
        };
        let stderr = std::io::stderr().as_fd().try_clone_to_owned();
        let meta = stderr.and_then(|fd| std::fs::File::from(fd).metadata());
        meta.is_ok_and(|m| dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()))
    })
}

/// Writes one event line to stderr.
pub fn log(level: Level, args: fmt::Arguments<'_>) {
    let text = crate::redact::text(&crate::protocol::one_line(&args.to_string()));
    let (priority, word) = match level {
        Level::Error => (3, "error"),
        Level::Warning => (4, "warning"),
        Level::Info => (6, "info"),
    };
    let line = if under_journald() {
        format!("<{priority}>{text}\n")
    } else {
        format!("{word}: {text}\n")
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
