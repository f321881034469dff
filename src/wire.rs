//! What the hook, the admin commands and the daemon must agree on.

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
/// Ending of a complete spool file; a file being written has another.
pub const SPOOL_SUFFIX: &str = ".req";
const STATE_NAME: &str = "nix-post-build-hook-queue";
const TRANSIENT: [&str; 4] = [ERR_BUSY, ERR_STOPPING, ERR_JOURNAL, ERR_WORKER_GONE];

/// True for refusals that mean "not now" (the hook spools), not "no".
pub fn is_transient(reason: &str) -> bool {
    TRANSIENT.iter().any(|prefix| reason.starts_with(prefix))
}

/// A request line; U+FFFD (in no store path) replaces an argument's line break.
pub fn request_line(verb: &str, args: &[&str]) -> String {
    let line = [&[verb][..], args].concat().join(" ");
    line.replace(['\n', '\r'], "\u{fffd}") + "\n"
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
    Vec::from_iter(groups.iter().map(|g| request_line("enqueue", &g.0)))
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
    let seconds = value.parse::<f64>().unwrap_or(0.0);
    if seconds > 0.0 && seconds <= 1e9 {
        return Ok(Duration::from_secs_f64(seconds));
    }
    let expected = "expected a positive number of seconds such as 600 or 2.5";
    Err(format!("{expected}, got {value:?}"))
}

/// The real user (root gets the system's places) and the XDG, HOME, TMPDIR values.
#[allow(missing_docs)]
pub struct Places<'a> {
    pub uid: u32,
    pub runtime_dir: Option<&'a str>,
    pub state_home: Option<&'a str>,
    pub home: Option<&'a str>,
    pub tmp_dir: Option<&'a str>,
}

impl Places<'_> {
    /// The default socket: never where another user could bind it first.
    pub fn socket(&self) -> String {
        match (self.uid, set(self.runtime_dir)) {
            (0, _) => format!("/run/{STATE_NAME}.sock"),
            (_, Some(dir)) => join(dir, &format!("{STATE_NAME}.sock")),
            (_, None) => join(&self.state_dir(), "socket"),
        }
    }

    /// The default state directory (in `$TMPDIR` as `...-<uid>`).
    pub fn state_dir(&self) -> String {
        let tmp = set(self.tmp_dir).unwrap_or("/tmp");
        match (self.uid, set(self.state_home), set(self.home)) {
            (0, ..) => format!("/var/lib/{STATE_NAME}"),
            (_, Some(dir), _) => join(dir, STATE_NAME),
            (_, None, Some(home)) => join(&join(home, ".local/state"), STATE_NAME),
            (_, None, None) => join(tmp, &format!("{STATE_NAME}-{}", self.uid)),
        }
    }
}

fn set(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.is_empty())
}

fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.strip_suffix('/').unwrap_or(dir))
}

/// Calls `f` with the places of this process's user and environment.
pub fn with_places<T>(f: impl FnOnce(&Places) -> T) -> T {
    let [runtime, state, home, tmp] =
        ["XDG_RUNTIME_DIR", "XDG_STATE_HOME", "HOME", "TMPDIR"].map(|k| std::env::var(k).ok());
    f(&Places {
        uid: crate::sys::uid(),
        runtime_dir: runtime.as_deref(),
        state_home: state.as_deref(),
        home: home.as_deref(),
        tmp_dir: tmp.as_deref(),
    })
}

/// A new spool file's temporary and final names: by time, the daemon's order.
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
        let at = |p: &Places| (p.socket(), p.state_dir());
        assert_eq!(
            at(&user),
            (
                "/run/user/1000/nix-post-build-hook-queue.sock".into(),
                "/home/a/.local/state/nix-post-build-hook-queue".into()
            )
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
            at(&bare),
            (
                "/tmp/nix-post-build-hook-queue-1000/socket".into(),
                "/tmp/nix-post-build-hook-queue-1000".into()
            ),
            "beside the state, in a directory of the user's own"
        );
        let root = Places { uid: 0, ..bare };
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
