//! What the hook, the admin commands and the daemon must agree on: request
//! lines and limits, transient refusals, default places, spool file names.

use std::path::PathBuf;
use std::time::Duration;

/// Longest request line accepted, newline included.
pub const MAX_LINE: usize = 1 << 20;
/// Most paths in one `enqueue` request.
pub const MAX_PATHS: usize = 10_000;

/// `err` reason: too many clients at once.
pub const ERR_BUSY: &str = "busy: too many connections, try again";
/// `err` reason: the daemon is stopping.
pub const ERR_STOPPING: &str = "stopping: the daemon is shutting down";
/// Start of the `err` reason when the journal cannot be written.
pub const ERR_JOURNAL: &str = "cannot write the journal";
/// `err` reason: the worker thread is gone (the paths are journaled).
pub const ERR_WORKER_GONE: &str =
    "the worker has stopped; the paths are journaled and will be uploaded after a restart";

/// Environment variable naming the daemon's socket.
pub const ENV_SOCKET: &str = "NPBHQ_SOCKET";
/// Environment variable naming the spool directory.
pub const ENV_SPOOL: &str = "NPBHQ_SPOOL_DIR";
/// Environment variable with the hook's timeout in seconds.
pub const ENV_TIMEOUT: &str = "NPBHQ_TIMEOUT";
/// How long the hook waits for the daemon, in all, by default.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(3);
/// Ending of a complete spool file; a file being written has another.
pub const SPOOL_SUFFIX: &str = ".req";
const STATE_NAME: &str = "nix-post-build-hook-queue";
const SOCKET_NAME: &str = "nix-post-build-hook-queue.sock";

/// True for refusals that mean "not now" (so the hook spools the request),
/// not "no" (a malformed request).
pub fn is_transient(reason: &str) -> bool {
    [ERR_BUSY, ERR_STOPPING, ERR_JOURNAL, ERR_WORKER_GONE]
        .iter()
        .any(|prefix| reason.starts_with(prefix))
}

/// A request line, newline included. A line break in an argument becomes
/// U+FFFD, which no store path contains, so it never splits the request.
pub fn request_line(verb: &str, args: &[&str]) -> String {
    let mut line = String::from(verb);
    for a in args {
        line.push(' ');
        line.push_str(&a.replace(['\n', '\r'], "\u{fffd}"));
    }
    line + "\n"
}

/// `Some(rest)` when `line` is `word` or starts with `word `.
pub fn final_word<'a>(line: &'a str, word: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(word)?;
    rest.strip_prefix(' ').or((rest.is_empty()).then_some(""))
}

/// Splits paths into `enqueue` request lines within the protocol's limits.
pub fn enqueue_lines<S: AsRef<str>>(paths: &[S]) -> Vec<String> {
    let mut groups: Vec<(Vec<&str>, usize)> = Vec::new();
    for p in paths.iter().map(AsRef::as_ref) {
        match groups.last_mut() {
            Some((g, n)) if g.len() < MAX_PATHS && *n + p.len() < MAX_LINE - 17 => {
                g.push(p);
                *n += p.len() + 1;
            }
            _ => groups.push((vec![p], p.len() + 1)),
        }
    }
    groups
        .iter()
        .map(|g| request_line("enqueue", &g.0))
        .collect()
}

/// The request lines the hook sends for Nix's `OUT_PATHS` and `DRV_PATH`.
pub fn hook_lines(out_paths: &str, drv_path: &str) -> Vec<String> {
    let outs: Vec<&str> = out_paths.split_whitespace().collect();
    match drv_path.trim() {
        _ if !outs.is_empty() => enqueue_lines(&outs),
        drv if drv.is_empty() || drv.contains(char::is_whitespace) => Vec::new(),
        drv => vec![request_line("drv", &[drv])],
    }
}

/// Parses a number of seconds such as `600` or `2.5`.
pub fn parse_seconds(value: &str) -> Result<Duration, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!(
            "expected a positive number of seconds such as 600 or 2.5, got {value:?}"
        )),
    }
}

/// A user's default places.
#[derive(Debug, PartialEq, Eq)]
pub struct Places {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The daemon's state directory, with the spool in `spool` below it.
    pub state_dir: PathBuf,
}

/// The default places of user `uid` (`var` reads the environment): for
/// root in `/run` and `/var/lib`; else the state in `$XDG_STATE_HOME`,
/// `~/.local/state` or `$TMPDIR/...-<uid>`, the socket in `$XDG_RUNTIME_DIR`
/// or in the state directory, never where another user could bind it first.
pub fn places(uid: u32, var: impl Fn(&str) -> Option<String>) -> Places {
    let var = |key| Some(PathBuf::from(var(key)?)).filter(|p| !p.as_os_str().is_empty());
    let state_dir = match (uid, var("XDG_STATE_HOME"), var("HOME")) {
        (0, ..) => PathBuf::from("/var/lib").join(STATE_NAME),
        (_, Some(dir), _) => dir.join(STATE_NAME),
        (_, None, Some(home)) => home.join(".local/state").join(STATE_NAME),
        (_, None, None) => var("TMPDIR")
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(format!("{STATE_NAME}-{uid}")),
    };
    let socket = match (uid, var("XDG_RUNTIME_DIR")) {
        (0, _) => PathBuf::from("/run").join(SOCKET_NAME),
        (_, Some(dir)) => dir.join(SOCKET_NAME),
        (_, None) => state_dir.join("socket"),
    };
    Places { socket, state_dir }
}

/// This process's default places.
pub fn default_places() -> Places {
    places(crate::sys::uid(), |key| std::env::var(key).ok())
}

/// A new spool file's temporary name and the name it is renamed to when
/// complete: by time, which the daemon reads them in, and by process.
pub fn spool_names(unix_nanos: u128, pid: u32) -> (String, String) {
    let name = format!("{unix_nanos:020}-{pid}");
    (format!(".{name}.tmp"), format!("{name}{SPOOL_SUFFIX}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_prefers_out_paths() {
        assert_eq!(
            hook_lines(" /s/a  /s/b ", "/s/x.drv"),
            vec!["enqueue /s/a /s/b\n"]
        );
        assert_eq!(hook_lines("", "/s/x.drv"), vec!["drv /s/x.drv\n"]);
        assert!(hook_lines("", "").is_empty());
        assert!(hook_lines("", "/s/x.drv\nping").is_empty());
    }

    #[test]
    fn enqueue_lines_respect_limits() {
        let paths: Vec<String> = (0..MAX_PATHS + 5).map(|i| format!("/s/{i}")).collect();
        let lines = enqueue_lines(&paths);
        assert_eq!(lines.len(), 2);
        assert!(lines
            .iter()
            .all(|l| l.len() < MAX_LINE && l.ends_with('\n')));
        let total: usize = lines.iter().map(|l| l.split(' ').count() - 1).sum();
        assert_eq!(total, paths.len());
    }

    #[test]
    fn line_breaks_cannot_split_a_request() {
        assert_eq!(
            request_line("drv", &["/s/a\nping"]),
            "drv /s/a\u{fffd}ping\n"
        );
        assert_eq!(request_line("ping", &[]), "ping\n");
    }

    #[test]
    fn final_words() {
        assert_eq!(final_word("ok", "ok"), Some(""));
        assert_eq!(final_word("ok 3", "ok"), Some("3"));
        assert_eq!(final_word("okay", "ok"), None);
        assert_eq!(final_word("err busy", "err"), Some("busy"));
    }

    #[test]
    fn default_places() {
        let env = |pairs: &'static [(&str, &str)]| {
            move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
        };
        let at = |p: &Places| {
            (
                p.socket.display().to_string(),
                p.state_dir.display().to_string(),
            )
        };
        let user = places(
            1000,
            env(&[("XDG_RUNTIME_DIR", "/run/user/1000/"), ("HOME", "/home/a")]),
        );
        assert_eq!(
            at(&user),
            (
                "/run/user/1000/nix-post-build-hook-queue.sock".into(),
                "/home/a/.local/state/nix-post-build-hook-queue".into()
            )
        );
        let no_runtime = places(1000, env(&[("XDG_RUNTIME_DIR", ""), ("HOME", "/home/a")]));
        assert_eq!(
            no_runtime.socket.display().to_string(),
            "/home/a/.local/state/nix-post-build-hook-queue/socket",
            "in the user's own state directory, not in /tmp"
        );
        let xdg_state = places(
            1000,
            env(&[("XDG_STATE_HOME", "/home/a/st"), ("HOME", "/h")]),
        );
        assert_eq!(
            xdg_state.socket.display().to_string(),
            "/home/a/st/nix-post-build-hook-queue/socket"
        );
        let bare = places(1000, env(&[("TMPDIR", "")]));
        assert_eq!(
            at(&bare),
            (
                "/tmp/nix-post-build-hook-queue-1000/socket".into(),
                "/tmp/nix-post-build-hook-queue-1000".into()
            ),
            "beside the state, in a directory of the user's own"
        );
        let root = places(0, env(&[("XDG_RUNTIME_DIR", "/r"), ("HOME", "/root")]));
        assert_eq!(
            at(&root),
            (
                "/run/nix-post-build-hook-queue.sock".into(),
                "/var/lib/nix-post-build-hook-queue".into()
            )
        );
    }

    #[test]
    fn spool_names_sort_by_time() {
        let (tmp, done) = spool_names(12, 34);
        assert_eq!(tmp, ".00000000000000000012-34.tmp");
        assert_eq!(done, "00000000000000000012-34.req");
        assert!(spool_names(9, 99).1 < spool_names(10, 1).1);
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("inf").is_err());
    }
}
