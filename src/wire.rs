//! What the hook and the daemon must agree on: the request lines, their
//! limits, which refusals are only "not now", where the socket and the spool
//! are by default, and how spool files are named. The hook, the admin
//! commands and the daemon all take these from here, so they cannot drift
//! apart.

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

/// File name of the socket in a runtime directory (`/run`, `$XDG_RUNTIME_DIR`).
pub const SOCKET_NAME: &str = "nix-post-build-hook-queue.sock";
/// File name of the socket in a user's state directory, short because the
/// whole path must fit the kernel's 107 bytes.
pub const STATE_SOCKET_NAME: &str = "socket";
/// Name of the state directory (and of the service).
pub const STATE_NAME: &str = "nix-post-build-hook-queue";
/// Ending of a complete spool file; a file being written has another.
pub const SPOOL_SUFFIX: &str = ".req";

/// True for refusals that mean "not now" rather than "no": the request may
/// succeed later unchanged (so the hook spools it), unlike a malformed one.
pub fn is_transient(reason: &str) -> bool {
    [ERR_BUSY, ERR_STOPPING, ERR_JOURNAL, ERR_WORKER_GONE]
        .iter()
        .any(|prefix| reason.starts_with(prefix))
}

/// Formats a request line for the client side, newline included.
///
/// A line break inside an argument can never split the request into two
/// (which would send whatever follows it as a request of its own): `\n` and
/// `\r` are replaced by U+FFFD, which no store path contains, so the daemon
/// refuses that argument and with it the whole request.
pub fn request_line(verb: &str, args: &[&str]) -> String {
    let mut line = String::from(verb);
    for a in args {
        line.push(' ');
        line.extend(a.chars().map(|c| match c {
            '\n' | '\r' => '\u{fffd}',
            c => c,
        }));
    }
    line.push('\n');
    line
}

/// `Some(rest)` when `line` is `word` or starts with `word `.
pub fn final_word<'a>(line: &'a str, word: &str) -> Option<&'a str> {
    if line == word {
        Some("")
    } else {
        line.strip_prefix(word)?.strip_prefix(' ')
    }
}

/// Splits paths into `enqueue` request lines within the protocol's limits.
pub fn enqueue_lines<S: AsRef<str>>(paths: &[S]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut bytes = 0;
    for p in paths {
        let p = p.as_ref();
        if !current.is_empty()
            && (current.len() == MAX_PATHS || bytes + p.len() + 1 >= MAX_LINE - 16)
        {
            lines.push(request_line("enqueue", &current));
            current.clear();
            bytes = 0;
        }
        bytes += p.len() + 1;
        current.push(p);
    }
    if !current.is_empty() {
        lines.push(request_line("enqueue", &current));
    }
    lines
}

/// The request lines the hook sends for Nix's `OUT_PATHS` and `DRV_PATH`.
pub fn hook_lines(out_paths: &str, drv_path: &str) -> Vec<String> {
    let outs: Vec<&str> = out_paths.split_whitespace().collect();
    if !outs.is_empty() {
        return enqueue_lines(&outs);
    }
    let drv = drv_path.trim();
    if drv.is_empty() || drv.contains(char::is_whitespace) {
        return Vec::new();
    }
    Vec::from([request_line("drv", &[drv])])
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

/// What the default places depend on: the user and a few environment
/// variables (empty ones count as unset).
pub struct Places<'a> {
    /// The real user id; root gets the system-wide places.
    pub uid: u32,
    /// `$XDG_RUNTIME_DIR`.
    pub runtime_dir: Option<&'a str>,
    /// `$XDG_STATE_HOME`.
    pub state_home: Option<&'a str>,
    /// `$HOME`.
    pub home: Option<&'a str>,
    /// `$TMPDIR` (`/tmp` when unset).
    pub tmp_dir: Option<&'a str>,
}

impl Places<'_> {
    /// The default socket: `/run/...` for root, else the per-user runtime
    /// directory, else `socket` in the user's own state directory. Never a
    /// name in a directory others may write (such as `/tmp`), where another
    /// user could bind it first and receive this user's paths. A unix
    /// socket's path holds at most 107 bytes, so a state directory deeper
    /// than about 100 bytes needs the socket named explicitly.
    pub fn socket(&self) -> String {
        if self.uid == 0 {
            return join("/run", SOCKET_NAME);
        }
        match set(self.runtime_dir) {
            Some(dir) => join(dir, SOCKET_NAME),
            None => join(&self.state_dir(), STATE_SOCKET_NAME),
        }
    }

    /// The default state directory: `/var/lib/...` for root, else
    /// `$XDG_STATE_HOME/...` (or `~/.local/state/...`).
    pub fn state_dir(&self) -> String {
        if self.uid == 0 {
            return join("/var/lib", STATE_NAME);
        }
        if let Some(dir) = set(self.state_home) {
            return join(dir, STATE_NAME);
        }
        match set(self.home) {
            Some(home) => join(&join(home, ".local/state"), STATE_NAME),
            None => join(self.tmp(), &format!("{STATE_NAME}-{}", self.uid)),
        }
    }

    /// The default spool directory: `spool` in the default state directory.
    pub fn spool_dir(&self) -> String {
        join(&self.state_dir(), "spool")
    }

    fn tmp(&self) -> &str {
        set(self.tmp_dir).unwrap_or("/tmp")
    }
}

fn set(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.is_empty())
}

/// `dir/name`, without doubling a slash `dir` already ends with.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The names of a new spool file: the temporary one it is written as and
/// the one it is renamed to when complete. Named by time, so that the
/// daemon takes spooled requests in order, and by process, so that two
/// hooks never share one.
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
        let user = Places {
            uid: 1000,
            runtime_dir: Some("/run/user/1000/"),
            state_home: None,
            home: Some("/home/a"),
            tmp_dir: Some(""),
        };
        assert_eq!(
            user.socket(),
            "/run/user/1000/nix-post-build-hook-queue.sock"
        );
        assert_eq!(
            user.spool_dir(),
            "/home/a/.local/state/nix-post-build-hook-queue/spool"
        );
        let no_runtime = Places {
            runtime_dir: Some(""),
            ..user
        };
        assert_eq!(
            no_runtime.socket(),
            "/home/a/.local/state/nix-post-build-hook-queue/socket",
            "in the user's own state directory, not in /tmp"
        );
        let xdg_state = Places {
            state_home: Some("/home/a/st"),
            ..no_runtime
        };
        assert_eq!(
            xdg_state.socket(),
            "/home/a/st/nix-post-build-hook-queue/socket"
        );
        let bare = Places {
            home: None,
            ..no_runtime
        };
        assert_eq!(
            bare.socket(),
            "/tmp/nix-post-build-hook-queue-1000/socket",
            "beside the state, in a directory of the user's own"
        );
        assert_eq!(bare.state_dir(), "/tmp/nix-post-build-hook-queue-1000");
        let root = Places { uid: 0, ..bare };
        assert_eq!(root.socket(), "/run/nix-post-build-hook-queue.sock");
        assert_eq!(root.spool_dir(), "/var/lib/nix-post-build-hook-queue/spool");
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
