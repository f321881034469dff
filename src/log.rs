//! One event per line on stderr, with journald priorities under systemd.
//!
//! When `JOURNAL_STREAM` names our stderr, it is connected to the journal and
//! each line is prefixed with its sd-daemon priority (`<3>` error, `<4>` warning,
//! `<6>` info) so journald keeps the levels. Otherwise the level is written
//! as a word. Messages are folded onto one line, and secrets in them are
//! masked ([`crate::redact::text`]): nix's own error messages repeat the
//! store URL, password included.

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

/// True when stderr is the journal stream systemd connected: `JOURNAL_STREAM`
/// (`DEVICE:INODE`) names stderr itself. A process that merely inherited the
/// variable (started from a service, its stderr sent to a file) writes plain
/// lines, as systemd.exec(5) recommends.
fn under_journald() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        std::env::var("JOURNAL_STREAM").is_ok_and(|stream| stderr_is_stream(&stream))
    })
}

fn stderr_is_stream(stream: &str) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = stream.trim().split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Writes one event line to stderr.
pub fn log(level: Level, args: fmt::Arguments<'_>) {
    let text = crate::redact::text(&crate::protocol::one_line(&args.to_string()));
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
