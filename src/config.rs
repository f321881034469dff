//! The daemon's settings: defaults, the config file and command-line flags.
//!
//! The file uses nix.conf syntax (`key = value`, `#` comments). Every key is
//! also a `--key value` flag; flags are applied after the file, so they win.
//! Anything unknown or malformed stops the daemon before it binds a socket,
//! with a message naming the file and line (or the flag), the key and the
//! accepted form.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sys;
use crate::wire::{parse_seconds, Places};

/// Every setting of the daemon, after defaults, the file and the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Unix socket the daemon listens on.
    pub socket: PathBuf,
    /// Directory of the journal.
    pub state_dir: PathBuf,
    /// Directory where clients leave requests while the daemon is away.
    pub spool_dir: Option<PathBuf>,
    /// The Nix store directory every path must be directly under.
    pub store_dir: String,
    /// Secret key for `nix store sign`; `None` means no signing.
    pub signing_key_file: Option<PathBuf>,
    /// Store URLs for `nix copy --to`, one target each (`upload-to` given
    /// more than once); empty means no upload.
    pub upload_to: Vec<String>,
    /// An uploader (program and arguments; the paths are appended as
    /// arguments), e.g. `cachix push mycache`: one more target, beside the
    /// `upload-to` ones.
    pub upload_command: Option<Vec<String>>,
    /// Sign the whole closure (`--recursive`), not only the queued paths.
    pub sign_closure: bool,
    /// Most paths given to one nix invocation.
    pub batch_size: usize,
    /// Most `nix copy` calls one batch is split across, run at once.
    pub upload_jobs: usize,
    /// Longest a single nix invocation may run before it is killed.
    pub command_timeout: Duration,
    /// The `nix` program; `nix-store` is looked up beside it.
    pub nix: PathBuf,
    /// First delay after a failed upload.
    pub retry_initial_delay: Duration,
    /// Longest delay between two attempts for one path.
    pub retry_max_delay: Duration,
    /// Permission bits of the socket file (who may enqueue).
    pub socket_mode: u32,
    /// Group that owns the socket file, if not the daemon's own.
    pub socket_group: Option<String>,
    /// Prometheus text file rewritten every few seconds, if set.
    pub metrics_file: Option<PathBuf>,
    /// Most client connections served at once; more get `err busy`.
    pub max_connections: usize,
    /// Failed attempts of a path, each while the target answered, after
    /// which it is given up on; `None`: never.
    pub max_attempts: Option<u32>,
    /// How long after it was queued a path that still fails is given up on
    /// (whatever the failures); `None`: never.
    pub give_up_after: Option<Duration>,
    /// Pass `--substitute-on-destination` to `nix copy` for `ssh://` and
    /// `ssh-ng://` targets, so the receiver fetches what its own
    /// substituters have instead of receiving it over ssh.
    pub substitute_on_destination: bool,
}

/// A setting that could not be read, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `FILE:LINE`, `--flag` or the file name alone.
    pub origin: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every key, with the form it takes, as shown by `--help` and in errors.
pub const KEYS: &[(&str, &str)] = &[
    ("socket", "path of the unix socket"),
    ("state-dir", "directory of the journal"),
    (
        "spool-dir",
        "directory of requests left while the daemon was away",
    ),
    ("store-dir", "absolute path of the Nix store"),
    (
        "signing-key-file",
        "secret key file for nix store sign (empty: no signing)",
    ),
    (
        "upload-to",
        "store URL for nix copy --to; give it once per target (an empty value forgets the ones before)",
    ),
    (
        "upload-command",
        "program and arguments of an uploader, one more target beside upload-to, separated by spaces (no shell, no quoting); the paths are appended (empty: none)",
    ),
    ("sign-closure", "true or false"),
    (
        "substitute-on-destination",
        "true or false: ssh targets fetch from their own substituters",
    ),
    ("batch-size", "whole number of paths, 1 or more"),
    (
        "upload-jobs",
        "whole number, 1 or more: nix copy calls one batch may run at once",
    ),
    ("command-timeout", "seconds, e.g. 600 or 2.5"),
    ("nix", "the nix program"),
    ("retry-initial-delay", "seconds"),
    ("retry-max-delay", "seconds"),
    ("socket-mode", "octal permission bits, e.g. 0600 or 0660"),
    (
        "socket-group",
        "group name or number (empty: the daemon's group)",
    ),
    (
        "metrics-file",
        "path of a Prometheus text file (empty: none)",
    ),
    ("max-connections", "whole number, 1 or more"),
    (
        "max-attempts",
        "failed attempts (while the target answers) before a path is given up on; 0: never",
    ),
    (
        "give-up-after",
        "seconds after it was queued that a failing path is given up on; 0: never",
    ),
];

/// Default `max-attempts`: with the default retry delays, a path that fails
/// on its own while the target takes others is given up on after about
/// 5 to 10 minutes, so a CI job waiting for it hears of it soon.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Default `give-up-after`: a day, long enough to outlast an outage of the
/// target over a night or a weekend day, short enough that a path that never
/// goes is not waited for for ever.
pub const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The default socket path for this user: `/run/...` for root, else the
/// per-user runtime directory. The hook uses the same rule.
pub fn default_socket() -> PathBuf {
    PathBuf::from(with_places(|p| p.socket()))
}

/// The default state directory: `/var/lib/...` for root, else
/// `$XDG_STATE_HOME/...` (or `~/.local/state/...`).
pub fn default_state_dir() -> PathBuf {
    PathBuf::from(with_places(|p| p.state_dir()))
}

/// Calls `f` with this process's user and environment.
fn with_places<T>(f: impl FnOnce(&Places) -> T) -> T {
    let var = |key| std::env::var(key).ok();
    let (runtime, state, home, tmp) = (
        var("XDG_RUNTIME_DIR"),
        var("XDG_STATE_HOME"),
        var("HOME"),
        var("TMPDIR"),
    );
    f(&Places {
        uid: sys::uid(),
        runtime_dir: runtime.as_deref(),
        state_home: state.as_deref(),
        home: home.as_deref(),
        tmp_dir: tmp.as_deref(),
    })
}

/// The store directory Nix itself uses here: `$NIX_STORE_DIR` or `/nix/store`.
pub fn default_store_dir() -> String {
    match std::env::var("NIX_STORE_DIR") {
        Ok(dir) if !dir.is_empty() => dir.trim_end_matches('/').to_string(),
        _ => "/nix/store".to_string(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: default_socket(),
            state_dir: default_state_dir(),
            spool_dir: None,
            store_dir: default_store_dir(),
            signing_key_file: None,
            upload_to: Vec::new(),
            upload_command: None,
            sign_closure: true,
            substitute_on_destination: false,
            batch_size: 1000,
            upload_jobs: 2,
            command_timeout: Duration::from_secs(600),
            nix: PathBuf::from("nix"),
            retry_initial_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(300),
            socket_mode: 0o600,
            socket_group: None,
            metrics_file: None,
            max_connections: 256,
            max_attempts: Some(DEFAULT_MAX_ATTEMPTS),
            give_up_after: Some(DEFAULT_GIVE_UP_AFTER),
        }
    }
}

impl Config {
    /// The spool directory: `spool-dir` if set, else `<state-dir>/spool`.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("spool"))
    }

    /// The targets every path is delivered to: each `upload-to` URL, then
    /// the `upload-command`, in that order.
    pub fn targets(&self) -> Vec<crate::target::Target> {
        let mut targets: Vec<crate::target::Target> = self
            .upload_to
            .iter()
            .map(|url| crate::target::Target::url(url))
            .collect();
        targets.extend(
            self.upload_command
                .as_deref()
                .map(crate::target::Target::command),
        );
        targets
    }

    /// Refuses settings that are each fine but not together: the same
    /// target twice (two URLs that differ only in a password count as one,
    /// as the journal names targets by their URL without secrets).
    pub fn check(&self) -> Result<(), ConfigError> {
        let targets = self.targets();
        for (i, t) in targets.iter().enumerate() {
            if targets[..i].iter().any(|u| u.id == t.id) {
                return Err(ConfigError {
                    origin: "upload-to".into(),
                    message: format!(
                        "the target {} is given twice; give each target once",
                        t.label
                    ),
                });
            }
        }
        Ok(())
    }

    /// Applies one `key = value` setting; the error says what is accepted.
    /// No setting may hold a control character: a line break in, say,
    /// `upload-to` would end a line of a `status` reply or of the log early.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        if let Some(c) = value.chars().find(|c| c.is_control()) {
            return Err(format!(
                "the value holds the control character {c:?}; line breaks, tabs and other \
                 control characters are accepted in no setting"
            ));
        }
        let opt_path = |v: &str| (!v.is_empty()).then(|| PathBuf::from(v));
        match key {
            "socket" => self.socket = non_empty_path(value)?,
            "state-dir" => self.state_dir = non_empty_path(value)?,
            "spool-dir" => self.spool_dir = opt_path(value),
            "store-dir" => {
                if !value.starts_with('/') || value.len() < 2 {
                    return Err(format!(
                        "expected an absolute path such as /nix/store, got {value:?}"
                    ));
                }
                self.store_dir = value.trim_end_matches('/').to_string();
            }
            "signing-key-file" => self.signing_key_file = opt_path(value),
            "upload-to" => {
                // Repeated: one more target. Empty: none (so far).
                if value.is_empty() {
                    self.upload_to.clear();
                } else {
                    self.upload_to.push(value.to_string());
                }
            }
            "upload-command" => {
                let argv: Vec<String> = value.split_whitespace().map(String::from).collect();
                self.upload_command = (!argv.is_empty()).then_some(argv);
            }
            "sign-closure" => self.sign_closure = parse_bool(value)?,
            "substitute-on-destination" => self.substitute_on_destination = parse_bool(value)?,
            "batch-size" => self.batch_size = parse_count(value)?,
            "upload-jobs" => self.upload_jobs = parse_count(value)?,
            "command-timeout" => self.command_timeout = parse_seconds(value)?,
            "nix" => self.nix = non_empty_path(value)?,
            "retry-initial-delay" => self.retry_initial_delay = parse_seconds(value)?,
            "retry-max-delay" => self.retry_max_delay = parse_seconds(value)?,
            "socket-mode" => self.socket_mode = parse_mode(value)?,
            "socket-group" => self.socket_group = (!value.is_empty()).then(|| value.to_string()),
            "metrics-file" => self.metrics_file = opt_path(value),
            "max-connections" => self.max_connections = parse_count(value)?,
            "max-attempts" => {
                self.max_attempts = match value.parse::<u32>() {
                    Ok(0) => None,
                    Ok(n) => Some(n),
                    Err(_) => {
                        return Err(format!(
                            "expected a whole number (0: never give up), got {value:?}"
                        ))
                    }
                }
            }
            "give-up-after" => {
                self.give_up_after = match value {
                    "0" => None,
                    v => Some(parse_seconds(v).map_err(|e| format!("{e}, or 0 for never"))?),
                }
            }
            _ => return Err(unknown_key(key)),
        }
        Ok(())
    }

    /// Applies every line of a config file's text; `origin` names the file.
    pub fn apply_file_text(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        for (index, raw) in text.lines().enumerate() {
            let at = |message: String| ConfigError {
                origin: format!("{origin}:{}", index + 1),
                message,
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| at(format!("expected 'key = value', got {line:?}")))?;
            let key = key.trim();
            self.set(key, value.trim())
                .map_err(|m| at(format!("key {key:?}: {m}")))?;
        }
        Ok(())
    }

    /// Reads and applies a config file.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            message: format!("cannot read config file: {e}"),
        })?;
        self.apply_file_text(&text, &origin)
    }

    /// Checks `signing-key-file`, if set, before the daemon starts: it must
    /// be a regular file that not every user can read, holding a Nix secret
    /// key (`NAME:BASE64` of 64 bytes, as `nix-store
    /// --generate-binary-cache-key` writes it). A wrong key would otherwise
    /// show only as uploads that fail one by one. The key is never shown.
    pub fn check_signing_key(&self) -> Result<(), String> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let Some(key) = &self.signing_key_file else {
            return Ok(());
        };
        let shown = key.display();
        let meta = std::fs::metadata(key).map_err(|e| format!("signing-key-file {shown}: {e}"))?;
        if !meta.is_file() {
            let kind = if meta.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            return Err(format!(
                "signing-key-file {shown} is {kind}; expected the secret key file written by \
                 nix-store --generate-binary-cache-key"
            ));
        }
        if meta.permissions().mode() & 0o004 != 0 {
            return Err(format!(
                "signing-key-file {shown} is readable by every user; restrict it (chmod 600) before the daemon uses it"
            ));
        }
        let mut text = Vec::new();
        std::fs::File::open(key)
            .and_then(|f| f.take(MAX_KEY_FILE).read_to_end(&mut text))
            .map_err(|e| format!("signing-key-file {shown} cannot be read: {e}"))?;
        if !is_secret_key(&text) {
            return Err(format!(
                "signing-key-file {shown} does not hold a Nix secret key; expected NAME:BASE64 \
                 of a 64-byte key, as nix-store --generate-binary-cache-key writes it (not the \
                 public key)"
            ));
        }
        Ok(())
    }

    /// Builds the configuration from `serve`'s arguments: defaults, then the
    /// `--config` file, then every `--key value` (or `--key=value`) flag.
    pub fn from_args(args: &[String]) -> Result<Config, ConfigError> {
        let flags = split_flags(args)?;
        let mut config = Config::default();
        for (flag, value) in &flags {
            if flag == "config" {
                config.apply_file(Path::new(value))?;
            }
        }
        // The first --upload-to flag replaces the file's targets (flags
        // win); the next ones add to it.
        let mut file_targets = true;
        for (flag, value) in flags.iter().filter(|(f, _)| f != "config") {
            if flag == "upload-to" && std::mem::replace(&mut file_targets, false) {
                config.upload_to.clear();
            }
            config.set(flag, value).map_err(|message| ConfigError {
                origin: format!("--{flag}"),
                message,
            })?;
        }
        config.check()?;
        Ok(config)
    }
}

/// The error for an unknown key: the nearest known key when one is close
/// (a typo), and the list of all of them.
fn unknown_key(key: &str) -> String {
    let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
    let nearest = known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .min()
        .filter(|(d, k)| *d <= 2.max(k.len() / 4));
    match nearest {
        Some((_, k)) => format!(
            "unknown key {key:?}; did you mean {k:?}? Known keys: {}",
            known.join(", ")
        ),
        None => format!("unknown key {key:?}; known keys: {}", known.join(", ")),
    }
}

/// Levenshtein distance between two short strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Splits `--key value` and `--key=value` arguments into pairs.
fn split_flags(args: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let err = |message: String| ConfigError {
            origin: arg.clone(),
            message,
        };
        let flag = arg
            .strip_prefix("--")
            .ok_or_else(|| err("expected a flag such as --upload-to URL (see --help)".into()))?;
        match flag.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => {
                let value = iter
                    .next()
                    .ok_or_else(|| err(format!("--{flag} needs a value")))?;
                out.push((flag.to_string(), value.clone()));
            }
        }
    }
    Ok(out)
}

/// Most bytes of `signing-key-file` read at start (a key is about 100).
const MAX_KEY_FILE: u64 = 4096;

/// True for `NAME:BASE64` where the base64 decodes to the 64 bytes of an
/// ed25519 secret key (what Nix's `SecretKey` accepts); surrounding white
/// space is allowed.
fn is_secret_key(text: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(text) else {
        return false;
    };
    let Some((name, key)) = text.trim().split_once(':') else {
        return false;
    };
    let body = key.trim_end_matches('=');
    let padding = key.len() - body.len();
    !name.is_empty()
        && key.len() % 4 == 0
        && padding <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        && key.len() / 4 * 3 - padding == 64
}

fn non_empty_path(value: &str) -> Result<PathBuf, String> {
    if value.is_empty() {
        Err("expected a path, got an empty value".into())
    } else {
        Ok(PathBuf::from(value))
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("expected true or false, got {value:?}")),
    }
}

fn parse_count(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "expected a whole number of 1 or more, got {value:?}"
        )),
    }
}

fn parse_mode(value: &str) -> Result<u32, String> {
    match u32::from_str_radix(value, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "expected octal permission bits such as 0600 or 0660, got {value:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn file_then_flags() {
        let mut c = Config::default();
        c.apply_file_text(
            "# comment\n\nbatch-size = 50 # trailing\nupload-to = file:///tmp/c?compression=none\nsign-closure = false\ncommand-timeout = 2.5\nsocket-mode = 0660\n",
            "f.conf",
        )
        .unwrap();
        assert_eq!(c.batch_size, 50);
        assert_eq!(c.upload_to, ["file:///tmp/c?compression=none"]);
        assert!(!c.sign_closure);
        assert_eq!(c.command_timeout, Duration::from_millis(2500));
        assert_eq!(c.socket_mode, 0o660);

        let c = Config::from_args(&args(&["--batch-size", "7", "--upload-to=ssh-ng://h"])).unwrap();
        assert_eq!(c.batch_size, 7);
        assert_eq!(c.upload_to, ["ssh-ng://h"]);
    }

    #[test]
    fn empty_value_unsets_optional_keys() {
        let mut c = Config::default();
        c.set("upload-to", "file:///x").unwrap();
        c.set("upload-to", "").unwrap();
        assert!(c.upload_to.is_empty());
        assert!(c.set("socket", "").is_err());
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let mut c = Config::default();
        let e = c
            .apply_file_text("batch-size = 1\nbatch-size = lots\n", "/etc/q.conf")
            .unwrap_err();
        assert_eq!(e.origin, "/etc/q.conf:2");
        assert!(e.message.contains("batch-size"), "{e}");
        assert!(e.message.contains("whole number"), "{e}");

        let e = c.apply_file_text("colour = blue\n", "q.conf").unwrap_err();
        assert!(e.to_string().contains("unknown key \"colour\""), "{e}");
        let e = c.apply_file_text("just words\n", "q.conf").unwrap_err();
        assert!(e.to_string().contains("key = value"), "{e}");

        for bad in [
            &["--batch-size", "0"][..],
            &["--sign-closure", "yes"],
            &["--command-timeout", "-1"],
            &["--socket-mode", "999"],
            &["--store-dir", "relative"],
            &["--batch-size"],
            &["upload-to"],
        ] {
            let e = Config::from_args(&args(bad)).unwrap_err();
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn unknown_key_suggests_the_nearest() {
        let mut c = Config::default();
        let e = c.set("uplaod-to", "x").unwrap_err();
        assert!(e.contains("did you mean \"upload-to\"?"), "{e}");
        let e = c.set("max-attempt", "3").unwrap_err();
        assert!(e.contains("did you mean \"max-attempts\"?"), "{e}");
        let e = c.set("colour", "blue").unwrap_err();
        assert!(!e.contains("did you mean"), "{e}");
        assert!(e.contains("known keys: socket, "), "{e}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn give_up_settings_take_0_for_never() {
        let mut c = Config::default();
        assert_eq!(c.max_attempts, Some(DEFAULT_MAX_ATTEMPTS));
        assert_eq!(c.give_up_after, Some(DEFAULT_GIVE_UP_AFTER));
        c.set("max-attempts", "0").unwrap();
        c.set("give-up-after", "0").unwrap();
        assert_eq!((c.max_attempts, c.give_up_after), (None, None));
        c.set("max-attempts", "3").unwrap();
        c.set("give-up-after", "90.5").unwrap();
        assert_eq!(c.max_attempts, Some(3));
        assert_eq!(c.give_up_after, Some(Duration::from_millis(90_500)));
        for (k, v) in [
            ("max-attempts", "-1"),
            ("max-attempts", "x"),
            ("give-up-after", "-2"),
        ] {
            let e = c.set(k, v).unwrap_err();
            assert!(e.contains("0"), "{k} {v}: {e}");
        }
    }

    #[test]
    fn control_characters_are_refused_in_every_setting() {
        for (key, _) in KEYS {
            for bad in ["a\nb", "a\rb", "a\tb", "a\u{0}b", "a\u{1b}b", "a\u{85}b"] {
                let mut c = Config::default();
                let e = c.set(key, bad).unwrap_err();
                assert!(e.contains("control character"), "{key} {bad:?}: {e}");
                assert!(!e.chars().any(char::is_control), "{key}: {e:?}");
                assert_eq!(c, Config::default(), "{key} {bad:?} was applied");
            }
        }
        let e = Config::from_args(&args(&["--upload-to", "file:///c\nok 5"])).unwrap_err();
        assert_eq!(e.origin, "--upload-to");
        assert!(e.message.contains("'\\n'"), "{e}");
    }

    #[test]
    fn secret_key_form_is_checked() {
        // 64 and 32 bytes of key, base64: a secret and a public key.
        let secret = format!("cache-1:{}==", "A".repeat(86));
        let public = format!("cache-1:{}=", "A".repeat(43));
        assert!(is_secret_key(secret.as_bytes()));
        assert!(is_secret_key(format!("{secret}\n").as_bytes()));
        for bad in [
            public.as_str(),
            &secret[8..],
            &format!(":{}", &secret[8..]),
            &secret.replace('A', "*"),
            "",
            "cache-1:",
        ] {
            assert!(!is_secret_key(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn upload_command_is_split_on_spaces_and_is_one_more_target() {
        let c = Config::from_args(&args(&["--upload-command", " cachix  push my-cache "])).unwrap();
        assert_eq!(
            c.upload_command,
            Some(vec!["cachix".into(), "push".into(), "my-cache".into()])
        );
        let labels: Vec<String> = c.targets().into_iter().map(|t| t.label).collect();
        assert_eq!(labels, ["upload-command: cachix push my-cache"]);
        let c = Config::from_args(&args(&[
            "--upload-command",
            "x",
            "--upload-to",
            "file:///c",
        ]))
        .unwrap();
        let labels: Vec<String> = c.targets().into_iter().map(|t| t.label).collect();
        assert_eq!(labels, ["file:///c", "upload-command: x"]);
        let c = Config::from_args(&args(&["--upload-command", " "])).unwrap();
        assert_eq!(c.upload_command, None);
    }

    #[test]
    fn upload_to_is_repeated_one_target_each() {
        let mut c = Config::default();
        c.apply_file_text(
            "upload-to = file:///a\nbatch-size = 3\nupload-to = ssh-ng://b\n",
            "q.conf",
        )
        .unwrap();
        assert_eq!(c.upload_to, ["file:///a", "ssh-ng://b"]);
        // Flags win: the first --upload-to replaces the file's list.
        let dir = std::env::temp_dir().join(format!("npbhq-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("q.conf");
        std::fs::write(&file, "upload-to = file:///a\nupload-to = file:///b\n").unwrap();
        let file = file.display().to_string();
        let c = Config::from_args(&args(&["--config", &file])).unwrap();
        assert_eq!(c.upload_to, ["file:///a", "file:///b"]);
        let c = Config::from_args(&args(&[
            "--config",
            &file,
            "--upload-to",
            "file:///c",
            "--upload-to=file:///d",
        ]))
        .unwrap();
        assert_eq!(c.upload_to, ["file:///c", "file:///d"]);
        std::fs::remove_dir_all(dir).unwrap();
        // An empty value forgets the ones before.
        let mut c = Config::default();
        c.apply_file_text(
            "upload-to = file:///a\nupload-to =\nupload-to = file:///b\n",
            "q",
        )
        .unwrap();
        assert_eq!(c.upload_to, ["file:///b"]);
        // The same target twice (secrets aside) is refused.
        let e = Config::from_args(&args(&[
            "--upload-to",
            "ssh://u:a@h",
            "--upload-to=ssh://u:b@h",
        ]))
        .unwrap_err();
        assert!(e.message.contains("given twice"), "{e}");
        assert!(
            !e.message.contains(":a@") && !e.message.contains(":b@"),
            "{e}"
        );
    }

    #[test]
    fn missing_config_file_is_reported() {
        let e = Config::from_args(&args(&["--config", "/nonexistent/q.conf"])).unwrap_err();
        assert_eq!(e.origin, "/nonexistent/q.conf");
        assert!(e.message.contains("cannot read"));
    }

    #[test]
    fn spool_follows_state_dir() {
        let c = Config::from_args(&args(&["--state-dir", "/s"])).unwrap();
        assert_eq!(c.spool_dir(), PathBuf::from("/s/spool"));
    }
}
