//! One event per line on stderr, with journald priorities under systemd.
//!
//! When `JOURNAL_STREAM` names our stderr, it is connected to the journal and
//! each line is prefixed with its sd-daemon priority (`<3>` error, `<4>` warning,
//! `<6>` info) so journald keeps the levels. Otherwise the level is written
//! as a word. Messages are folded onto one line, and credentials in any URL
//! they quote are masked ([`scrub`], and the target's own password wherever
//! it appears, [`crate::redact::mask_remembered`]): nix's own error messages
//! repeat the store URL, password included.

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
    let text =
        crate::redact::mask_remembered(&scrub(&crate::protocol::one_line(&args.to_string())));
    let line = if under_journald() {
        format!("<{}>{text}\n", level.priority())
    } else {
        format!("{}: {text}\n", level.word())
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Masks the password and secret query values ([`crate::redact::url`]) of
/// every URL (a word containing `://`) in free text such as a nix error
/// message, where the configured target appears verbatim, e.g.
/// `unable to download 'http://user:pw@host/nix-cache-info'`; and the
/// password of a bare `user:password@host` (nix's ssh stores print the
/// authority alone: `cannot connect to 'user:pw@host'`).
pub fn scrub(text: &str) -> String {
    if !text.contains('@') && !text.contains("://") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.contains("://") {
            out.push_str(&crate::redact::url(word));
        } else {
            out.push_str(&mask_userinfo(word));
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace() || matches!(c, '\'' | '"' | '`' | '<' | '>' | '(' | ')') {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// `user:***@host` for a word `user:password@host`; other words unchanged.
fn mask_userinfo(word: &str) -> String {
    let Some((userinfo, host)) = word.rsplit_once('@') else {
        return word.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) if !host.is_empty() => format!("{user}:***@{host}"),
        _ => word.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::scrub;

    #[test]
    fn scrub_masks_urls_in_nix_messages() {
        assert_eq!(
            scrub("error: unable to download 'http://npbhq:hunter2@127.0.0.1:1/cache/nix-cache-info': Couldn't connect"),
            "error: unable to download 'http://npbhq:***@127.0.0.1:1/cache/nix-cache-info': Couldn't connect"
        );
        assert_eq!(
            scrub("cannot open connection to remote store \"ssh-ng://u:pw@h?secret-key=/k/sk&x=1\" (exit 1)"),
            "cannot open connection to remote store \"ssh-ng://u:***@h?secret-key=***&x=1\" (exit 1)"
        );
        assert_eq!(
            scrub("to 'https://u:p@[::1]:8443/c' failed"),
            "to 'https://u:***@[::1]:8443/c' failed"
        );
        assert_eq!(
            scrub("error: cannot connect to 'npbhq:hunter2@127.0.0.1'"),
            "error: cannot connect to 'npbhq:***@127.0.0.1'"
        );
        assert_eq!(scrub("user nix@host, at 10:30"), "user nix@host, at 10:30");
        assert_eq!(scrub("file:///c, done"), "file:///c, done");
    }
}
