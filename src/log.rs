//! Event lines on stderr, prefixed `<priority>` under journald, else `level:`; secrets masked.

use std::fmt;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// True when `JOURNAL_STREAM` (`DEVICE:INODE`) names stderr itself, not a parent's stream.
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

/// Writes one event line to stderr: `priority` is sd-daemon(3)'s (3, 4, 6), `word` its name.
pub fn log(priority: u8, word: &str, args: fmt::Arguments<'_>) {
    let text = crate::redact::text(&crate::protocol::one_line(&args.to_string()));
    let prefix = under_journald().then(|| format!("<{priority}>"));
    let line = format!("{}{text}\n", prefix.unwrap_or_else(|| format!("{word}: ")));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs an error event.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::log(3, "error", format_args!($($arg)*)) };
}

/// Logs a warning event.
#[macro_export]
macro_rules! warning {
    ($($arg:tt)*) => { $crate::log::log(4, "warning", format_args!($($arg)*)) };
}

/// Logs an informational event.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log(6, "info", format_args!($($arg)*)) };
}
