//! The daemon's settings (defaults, environment, a nix.conf-like file, then
//! `--key value` flags) and the checks `serve` and `check-config` share.

use std::io::ErrorKind::{NotFound, PermissionDenied};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sys;
use crate::wire::{parse_seconds, with_places};

/// Every setting, each field the key of its name in [`KEYS`]; [`Config::new`] has the defaults.
#[derive(Debug, Clone, PartialEq, Default)]
#[allow(missing_docs)]
pub struct Config {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub spool_dir: Option<PathBuf>,
    pub store_dir: String,
    pub signing_key_file: Option<PathBuf>,
    pub upload_to: Vec<String>,
    pub upload_command: Option<Vec<String>>,
    pub sign_closure: bool,
    pub substitute_on_destination: bool,
    pub batch_size: usize,
    pub upload_jobs: usize,
    pub command_timeout: Duration,
    pub nix: PathBuf,
    pub retry_initial_delay: Duration,
    pub retry_max_delay: Duration,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub metrics_file: Option<PathBuf>,
    pub max_connections: usize,
    pub max_attempts: Option<u32>,
    pub give_up_after: Option<Duration>,
}

/// Every key (`key | default | accepted form`), as `--help` shows it; empty: no default.
const KEYS: &str = "\
socket                    | (below)     | path of the unix socket
state-dir                 | (below)     | directory of the journal
spool-dir                 | STATE/spool | directory where the hook leaves requests while the daemon is away
store-dir                 | (below)     | absolute path of the Nix store
signing-key-file          |             | secret key file for nix store sign (empty: no signing)
upload-to                 |             | store URL for nix copy --to; once per target (empty: forget the ones before)
upload-command            |             | uploader program (absolute, or on PATH) and arguments, split at spaces (no shell, no quoting); the paths are appended; one more target
sign-closure              | true        | true or false: sign the whole closure, not only the queued paths
substitute-on-destination | false       | true or false: ssh targets fetch from their own substituters
batch-size                | 1000        | whole number of paths given to one nix call, 1 or more
upload-jobs               | 2           | whole number, 1 or more: nix copy calls one batch may run at once
command-timeout           | 600         | seconds, more than 0, e.g. 600 or 2.5: longest one nix call may run
nix                       | nix         | the nix program (nix-store is looked up beside it)
retry-initial-delay       | 1           | seconds, more than 0: first delay after a failed upload
retry-max-delay           | 300         | seconds, more than 0: longest delay between two attempts
socket-mode               | 0600        | octal permission bits of the socket, e.g. 0600 or 0660
socket-group              |             | group name or number of the socket (empty: the daemon's group)
metrics-file              |             | path of a Prometheus text file (empty: none)
max-connections           | 256         | whole number, 1 or more: clients served at once
max-attempts              | 10          | failed attempts (while the target answers) before a path is given up on (see requeue); 0: never
give-up-after             | 86400       | seconds after it was queued that a failing path is given up on; 0: never
";

pub(crate) fn keys() -> impl Iterator<Item = [&'static str; 3]> {
    KEYS.lines().map(|line| {
        let mut cells = line.splitn(3, '|').map(str::trim);
        [(); 3].map(|()| cells.next().unwrap_or(""))
    })
}

/// The settings as `--help` lists them, with their defaults here and now.
pub fn help_table() -> String {
    let here = Config::new();
    let line = |[key, default, form]: [&str; 3]| {
        let default = match key {
            "socket" => here.socket.display().to_string(),
            "state-dir" => here.state_dir.display().to_string(),
            "store-dir" => here.store_dir.clone(),
            _ if default.is_empty() => "none".into(),
            _ => default.into(),
        };
        format!("  {key:<26}{form} [default: {default}]\n")
    };
    keys().map(line).collect()
}

impl Config {
    /// The defaults: those of [`KEYS`], this user's places, Nix's store dir.
    pub fn new() -> Config {
        let mut config = Config::default();
        let (socket, state_dir) = with_places(|p| (p.socket(), p.state_dir()));
        (config.socket, config.state_dir) = (socket.into(), state_dir.into());
        let store_dir = Some(std::env::var("NIX_STORE_DIR").unwrap_or_default());
        let store_dir = store_dir.filter(|d| !d.is_empty());
        config.store_dir =
            store_dir.map_or("/nix/store".into(), |d| d.trim_end_matches('/').into());
        for [key, default, _] in keys() {
            // Not "(below)", "STATE/spool" or none: a value `set` takes.
            if default.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
                let _ = config.set(key, default);
            }
        }
        config
    }

    /// The spool directory: `spool-dir` if set, else `<state-dir>/spool`.
    pub fn spool_dir(&self) -> PathBuf {
        let default = || self.state_dir.join("spool");
        self.spool_dir.clone().unwrap_or_else(default)
    }

    /// Applies one `key = value` setting; the error says what is accepted.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        // No control characters: a line break would end a `status` line early.
        if let Some(c) = value.chars().find(|c| c.is_control()) {
            return Err(format!("no setting takes a control character ({c:?})"));
        }
        let path = |v| parse::<PathBuf>(v, |p| !p.as_os_str().is_empty(), "a path");
        let opt_path = |v: &str| (!v.is_empty()).then(|| PathBuf::from(v));
        let count = |v| parse::<usize>(v, |n| *n >= 1, "a whole number of 1 or more");
        let boolean = |v| parse::<bool>(v, |_| true, "true or false");
        match key {
            "socket" => self.socket = path(value)?,
            "state-dir" => self.state_dir = path(value)?,
            "spool-dir" => self.spool_dir = opt_path(value),
            "store-dir" => {
                let form = "an absolute path such as /nix/store";
                let dir = parse::<String>(value, |v| v.starts_with('/') && v.len() > 1, form)?;
                self.store_dir = dir.trim_end_matches('/').to_string();
            }
            "signing-key-file" => self.signing_key_file = opt_path(value),
            // Repeated: one more target. Empty: none (so far).
            "upload-to" if value.is_empty() => self.upload_to.clear(),
            "upload-to" => self.upload_to.push(parse(
                value,
                |v: &String| !v.contains(|c: char| c.is_whitespace() || "\"'".contains(c)),
                "a store URL such as file:///var/cache/nix or ssh-ng://host, without quotes or spaces",
            )?),
            "upload-command" => {
                let argv: Vec<String> = value.split_whitespace().map(String::from).collect();
                self.upload_command = (!argv.is_empty()).then_some(argv);
            }
            "sign-closure" => self.sign_closure = boolean(value)?,
            "substitute-on-destination" => self.substitute_on_destination = boolean(value)?,
            "batch-size" => self.batch_size = count(value)?,
            "upload-jobs" => self.upload_jobs = count(value)?,
            "command-timeout" => self.command_timeout = parse_seconds(value)?,
            "nix" => self.nix = path(value)?,
            "retry-initial-delay" => self.retry_initial_delay = parse_seconds(value)?,
            "retry-max-delay" => self.retry_max_delay = parse_seconds(value)?,
            "socket-mode" => {
                let mode = u32::from_str_radix(value, 8).ok().filter(|m| *m <= 0o777);
                let form = "expected octal permission bits such as 0600 or 0660";
                self.socket_mode = mode.ok_or_else(|| format!("{form}, got {value:?}"))?
            }
            "socket-group" => self.socket_group = (!value.is_empty()).then(|| value.to_string()),
            "metrics-file" => self.metrics_file = opt_path(value),
            "max-connections" => self.max_connections = count(value)?,
            "max-attempts" => {
                let form = "a whole number (0: never give up)";
                self.max_attempts = Some(parse::<u32>(value, |_| true, form)?).filter(|n| *n > 0)
            }
            "give-up-after" => {
                let after = parse_seconds(value).map_err(|e| format!("{e}, or 0 for never"));
                self.give_up_after = if value == "0" { None } else { Some(after?) }
            }
            _ => return Err(unknown_key(key)),
        }
        Ok(())
    }

    /// The configuration from the arguments, and every problem (`ORIGIN: WHAT`);
    /// unless `at_start` (check-config, in a sandbox?) an unreadable key is skipped.
    pub fn from_args(args: &[String], at_start: bool) -> (Config, Vec<String>) {
        let (mut problems, mut flags, mut iter) = (Vec::new(), Vec::new(), args.iter());
        while let Some(arg) = iter.next() {
            match arg.strip_prefix("--").map(|f| (f, f.split_once('='))) {
                None => problems.push(format!("{arg}: expected a flag such as --upload-to URL")),
                Some((_, Some((k, v)))) => flags.push((k.to_string(), v.to_string())),
                Some((flag, None)) => match iter.next() {
                    Some(value) => flags.push((flag.to_string(), value.clone())),
                    None => problems.push(format!("{arg}: --{flag} needs a value")),
                },
            }
        }
        let mut settings: Vec<(String, String, String)> = Vec::new();
        for (_, file) in flags.iter().filter(|(f, _)| f == "config") {
            let text = std::fs::read_to_string(file).unwrap_or_else(|e| {
                problems.push(format!("{file}: cannot read config file: {e}"));
                String::new()
            });
            for (index, raw) in text.lines().enumerate() {
                let origin = format!("{file}:{}", index + 1);
                let line = raw.split('#').next().unwrap_or("").trim();
                match line.split_once('=') {
                    _ if line.is_empty() => {}
                    Some((k, v)) => settings.push((origin, k.trim().into(), v.trim().into())),
                    None => {
                        problems.push(format!("{origin}: expected 'key = value', got {line:?}"))
                    }
                }
            }
        }
        let flags = flags.into_iter().filter(|(f, _)| f != "config");
        settings.extend(flags.map(|(key, value)| (format!("--{key}"), key, value)));
        // The first --upload-to flag replaces the file's targets.
        let (mut config, mut given, mut flag_targets) = (Config::new(), Vec::new(), false);
        for (origin, key, value) in &settings {
            let flag = origin.starts_with("--");
            if flag && key == "upload-to" && !std::mem::replace(&mut flag_targets, true) {
                config.upload_to.clear();
            }
            match config.set(key, value) {
                Ok(()) => given.push(key.as_str()),
                Err(m) if flag => problems.push(format!("{origin}: {m}")),
                Err(m) => problems.push(format!("{origin}: key {key:?}: {m}")),
            }
        }
        check_environment(&given, &mut problems);
        if let Some(key) = &config.signing_key_file {
            problems.extend(check_signing_key(key, at_start).err());
        }
        if let Some(program) = config.upload_command.as_ref().and_then(|a| a.first()) {
            problems.extend(check_program(program).err());
        }
        (config, problems)
    }
}

/// Checks the environment the defaults are made of. A state directory in
/// `$TMPDIR` must be this user's own: another's could expose the journal.
fn check_environment(given: &[&str], problems: &mut Vec<String>) {
    let store = (!given.contains(&"store-dir")).then_some("NIX_STORE_DIR");
    let places = sys::uid() != 0 && !(given.contains(&"socket") && given.contains(&"state-dir"));
    let place_vars = ["XDG_RUNTIME_DIR", "XDG_STATE_HOME", "HOME", "TMPDIR"].into_iter();
    for var in store.into_iter().chain(place_vars.filter(|_| places)) {
        let value = std::env::var_os(var).filter(|v| !v.is_empty());
        match value.map(std::ffi::OsString::into_string) {
            Some(Ok(v)) if !v.starts_with('/') || v.contains(char::is_control) => problems.push(
                format!("${var}: expected an absolute path without control characters, got {v:?}"),
            ),
            Some(Err(v)) => problems.push(format!("${var}: {v:?} is not UTF-8")),
            _ => {}
        }
    }
    let unset = |var| std::env::var_os(var).is_none_or(|v| v.is_empty());
    if !(places && unset("XDG_STATE_HOME") && unset("HOME")) {
        return;
    }
    let dir = Config::new().state_dir;
    let ours = |m: &std::fs::Metadata| m.is_dir() && m.uid() == sys::uid() && m.mode() & 0o022 == 0;
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == NotFound => {}
        Ok(m) if ours(&m) => {}
        _ => problems.push(format!(
            "$TMPDIR: the state directory {} (in $TMPDIR or /tmp, as neither HOME nor \
             XDG_STATE_HOME is set) is not a directory of this user that no one else may \
             write; set state-dir, HOME or XDG_STATE_HOME",
            dir.display()
        )),
    }
}

/// Checks the signing key file (never showing the key) holds a Nix secret key;
/// `at_start`, also that it is readable, and not by every user.
fn check_signing_key(key: &Path, at_start: bool) -> Result<(), String> {
    let shown = key.display();
    let mut text = Vec::new();
    // At most 4 KiB (a key is about 100 bytes); never a FIFO's read.
    let read = std::fs::metadata(key).and_then(|meta| {
        if meta.is_file() {
            let mut file = std::fs::File::open(key)?.take(4096);
            file.read_to_end(&mut text)?;
        }
        Ok(meta)
    });
    let meta = match read {
        Ok(meta) => meta,
        Err(e) if !at_start && matches!(e.kind(), NotFound | PermissionDenied) => return Ok(()),
        Err(e) => return Err(format!("signing-key-file {shown}: {e}")),
    };
    let problem = match meta.permissions().mode() {
        _ if meta.is_dir() => "is a directory",
        _ if !meta.is_file() => "is not a regular file",
        mode if at_start && mode & 0o004 != 0 => {
            "is readable by every user; restrict it (chmod 600) before the daemon uses it"
        }
        _ if !is_secret_key(&text) => {
            "does not hold a Nix secret key (NAME:BASE64 of a 64-byte key, not the public key)"
        }
        _ => return Ok(()),
    };
    Err(format!(
        "signing-key-file {shown} {problem}; expected the secret key file written by \
         nix-store --generate-binary-cache-key"
    ))
}

/// Checks that the `upload-command` program is an executable file, at its path or on `PATH`.
fn check_program(program: &str) -> Result<(), String> {
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = || std::env::split_paths(&path).any(|d| runnable(&d.join(program)));
    let (found, place) = match program {
        p if p.starts_with('/') => (runnable(Path::new(p)), ""),
        p if p.contains('/') => (false, " (a relative path)"),
        _ => (on_path(), " in any directory of PATH"),
    };
    found.then_some(()).ok_or_else(|| {
        format!("upload-command: {program} is not an executable file{place}; give its absolute path, or install it")
    })
}

/// The error for an unknown key: the nearest key if close, and all keys.
fn unknown_key(key: &str) -> String {
    let known: Vec<&str> = keys().map(|[k, _, _]| k).collect();
    let close = |d: usize, k: &str| d <= 2.max(k.len() / 4) || key.len() >= 3 && k.starts_with(key);
    let nearest = known.iter().map(|k| (edit_distance(key, k), *k)).min();
    let list = known.join(", ");
    match nearest.filter(|(d, k)| close(*d, k)) {
        Some((_, k)) => format!("unknown key {key:?}; did you mean {k:?}? Known keys: {list}"),
        None => format!("unknown key {key:?}; known keys: {list}"),
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

/// True for `NAME:BASE64` of a 64-byte ed25519 secret key, as Nix reads it.
fn is_secret_key(text: &[u8]) -> bool {
    // 64 bytes are 86 base64 characters and `==`.
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    let text = std::str::from_utf8(text).unwrap_or("");
    text.trim().split_once(':').is_some_and(|(name, key)| {
        let key = key.as_bytes();
        !name.is_empty() && key.len() == 88 && key[..86].iter().all(base64) && key.ends_with(b"==")
    })
}

/// `value` as a `T` that `ok` accepts, else an error naming the `form`.
fn parse<T: std::str::FromStr>(value: &str, ok: fn(&T) -> bool, form: &str) -> Result<T, String> {
    let parsed = value.parse().ok().filter(ok);
    parsed.ok_or_else(|| format!("expected {form}, got {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// `from_args` with `text` as the `--config` file, then `flags`.
    fn with_file(text: &str, flags: &[&str]) -> (Config, Vec<String>, String) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let file = std::env::temp_dir().join(format!(
            "npbhq-config-{}-{}.conf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, text).unwrap();
        let file = file.display().to_string();
        let mut all = args(&["--config", &file]);
        all.extend(args(flags));
        let (c, problems) = Config::from_args(&all, false);
        std::fs::remove_file(&file).unwrap();
        (c, problems, file)
    }

    fn good(list: &[&str]) -> Config {
        let (c, problems) = Config::from_args(&args(list), false);
        assert_eq!(problems, Vec::<String>::new());
        c
    }

    #[test]
    fn file_then_flags() {
        let (c, problems, _) = with_file(
            "# comment\n\nbatch-size = 50 # trailing\nupload-to = file:///tmp/c?compression=none\nsign-closure = false\ncommand-timeout = 2.5\nsocket-mode = 0660\n",
            &[],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.batch_size, 50);
        assert_eq!(c.upload_to, ["file:///tmp/c?compression=none"]);
        assert!(!c.sign_closure);
        assert_eq!(c.command_timeout, Duration::from_millis(2500));
        assert_eq!(c.socket_mode, 0o660);

        let c = good(&["--batch-size", "7", "--upload-to=ssh-ng://h"]);
        assert_eq!(c.batch_size, 7);
        assert_eq!(c.upload_to, ["ssh-ng://h"]);
    }

    #[test]
    fn empty_value_unsets_optional_keys() {
        let mut c = Config::new();
        c.set("upload-to", "file:///x").unwrap();
        c.set("upload-to", "").unwrap();
        assert!(c.upload_to.is_empty());
        assert!(c.set("socket", "").is_err());
    }

    #[test]
    fn every_problem_is_reported_one_line_each_naming_file_line_and_key() {
        let (_, problems, file) = with_file(
            "batch-size = 1\nbatch-size = lots\ncolour = blue\njust words\ncommand-timeout = -1.0\nretry-initial-delay = 0\nupload-to = \"\"\n",
            &["--max-atempts", "3", "--upload", "x", "--socket"],
        );
        let expect = [
            "--socket: --socket needs a value".to_string(),
            format!("{file}:4: expected 'key = value'"),
            format!("{file}:2: key \"batch-size\": expected a whole number"),
            format!("{file}:3: key \"colour\": unknown key \"colour\"; known keys: socket, "),
            format!("{file}:5: key \"command-timeout\": expected a positive number"),
            format!("{file}:6: key \"retry-initial-delay\": expected a positive number"),
            format!("{file}:7: key \"upload-to\": expected a store URL"),
            "--max-atempts: unknown key \"max-atempts\"; did you mean \"max-attempts\"?".into(),
            "--upload: unknown key \"upload\"; did you mean \"upload-to\"?".into(),
        ];
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        for (p, e) in problems.iter().zip(&expect) {
            assert!(p.starts_with(e.as_str()), "{p:?} should start with {e:?}");
            assert!(!p.contains(char::is_control), "{p:?}");
        }
        for bad in [
            &["--batch-size", "0"][..],
            &["--sign-closure", "yes"],
            &["--command-timeout", "-1"],
            &["--socket-mode", "999"],
            &["--store-dir", "relative"],
            &["--batch-size"],
            &["upload-to"],
        ] {
            let (_, problems) = Config::from_args(&args(bad), false);
            assert_eq!(problems.len(), 1, "{bad:?}: {problems:?}");
        }
    }

    #[test]
    fn unknown_key_suggests_the_nearest() {
        let mut c = Config::new();
        let e = c.set("uplaod-to", "x").unwrap_err();
        assert!(e.contains("did you mean \"upload-to\"?"), "{e}");
        let e = c.set("max-attempt", "3").unwrap_err();
        assert!(e.contains("did you mean \"max-attempts\"?"), "{e}");
        let e = c.set("upload", "x").unwrap_err();
        assert!(e.contains("did you mean \"upload-to\"?"), "{e}");
        for far in ["colour", "up"] {
            let e = c.set(far, "blue").unwrap_err();
            assert!(!e.contains("did you mean"), "{e}");
            assert!(e.contains("known keys: socket, "), "{e}");
        }
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn the_table_of_keys_agrees_with_the_defaults_and_set() {
        let keys: Vec<[&str; 3]> = keys().collect();
        assert_eq!(keys.len(), 21);
        for [key, default, form] in keys {
            assert!(!form.is_empty() && !key.contains(' '), "{key}");
            if ["socket", "state-dir", "store-dir", "spool-dir"].contains(&key) {
                continue;
            }
            let mut c = Config::new();
            c.set(key, default).unwrap();
            assert_eq!(c, Config::new(), "{key}: the table's default {default:?}");
        }
        let help = help_table();
        assert_eq!(help.lines().count(), 21);
        assert!(help.contains("[default: 10]") && help.contains("[default: none]"));
        assert!(help.contains(&format!("[default: {}]", Config::new().store_dir)));
    }

    #[test]
    fn give_up_settings_take_0_for_never() {
        let mut c = Config::new();
        assert_eq!(c.max_attempts, Some(10));
        assert_eq!(c.give_up_after, Some(Duration::from_secs(86400)));
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
        for [key, _, _] in keys() {
            for bad in ["a\nb", "a\rb", "a\tb", "a\u{0}b", "a\u{1b}b", "a\u{85}b"] {
                let mut c = Config::new();
                let e = c.set(key, bad).unwrap_err();
                assert!(e.contains("control character"), "{key} {bad:?}: {e}");
                assert!(!e.chars().any(char::is_control), "{key}: {e:?}");
                assert_eq!(c, Config::new(), "{key} {bad:?} was applied");
            }
        }
        let (_, problems) = Config::from_args(&args(&["--upload-to", "file:///c\nok 5"]), false);
        assert!(problems[0].starts_with("--upload-to: "), "{problems:?}");
        assert!(problems[0].contains("'\\n'"), "{problems:?}");
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
    fn the_key_file_and_the_uploader_are_checked_where_they_can_be() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("npbhq-config-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, format!("cache-1:{}==\n", "A".repeat(86))).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let key_s = key.display().to_string();
        let missing = dir.join("missing").display().to_string();
        // Only at start: the mode, and a file that must be there.
        let at_start = |list: &[&str]| Config::from_args(&args(list), true).1;
        good(&["--signing-key-file", &missing]);
        let problems = at_start(&["--signing-key-file", &missing]);
        assert!(problems[0].contains("No such file"), "{problems:?}");
        good(&["--signing-key-file", &key_s]);
        let problems = at_start(&["--signing-key-file", &key_s]);
        assert!(
            problems[0].contains("readable by every user"),
            "{problems:?}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            at_start(&["--signing-key-file", &key_s]),
            Vec::<String>::new()
        );
        std::fs::write(&key, "cache-1:not-a-key\n").unwrap();
        let (_, problems) = Config::from_args(&args(&["--signing-key-file", &key_s]), false);
        assert!(
            problems[0].contains("does not hold a Nix secret key"),
            "{problems:?}"
        );
        let (_, problems) = Config::from_args(
            &args(&["--signing-key-file", &dir.display().to_string()]),
            false,
        );
        assert!(problems[0].contains("is a directory"), "{problems:?}");
        std::fs::remove_dir_all(&dir).unwrap();

        for (program, ok) in [
            ("sh", true),
            ("/bin/sh", true),
            ("bin/sh", false),
            ("/nonexistent/x", false),
            ("no-such-uploader-here", false),
        ] {
            let (_, problems) = Config::from_args(
                &args(&["--upload-command", &format!("{program} push")]),
                false,
            );
            assert_eq!(problems.is_empty(), ok, "{program}: {problems:?}");
            if !ok {
                assert!(
                    problems[0].starts_with(&format!(
                        "upload-command: {program} is not an executable file"
                    )),
                    "{problems:?}"
                );
            }
        }
    }

    #[test]
    fn upload_command_is_split_on_spaces() {
        let c = good(&["--upload-command", " /bin/echo  push my-cache "]);
        assert_eq!(
            c.upload_command,
            Some(vec!["/bin/echo".into(), "push".into(), "my-cache".into()])
        );
        let c = good(&["--upload-command", " "]);
        assert_eq!(c.upload_command, None);
    }

    #[test]
    fn upload_to_is_repeated_one_target_each() {
        let (c, problems, _) = with_file(
            "upload-to = file:///a\nbatch-size = 3\nupload-to = ssh-ng://b\n",
            &[],
        );
        assert!(problems.is_empty());
        assert_eq!(c.upload_to, ["file:///a", "ssh-ng://b"]);
        // Flags win: the first --upload-to replaces the file's list.
        let text = "upload-to = file:///a\nupload-to = file:///b\n";
        let flags = ["--upload-to", "file:///c", "--upload-to=file:///d"];
        assert_eq!(
            with_file(text, &flags).0.upload_to,
            ["file:///c", "file:///d"]
        );
        // An empty value forgets the ones before.
        let text = "upload-to = file:///a\nupload-to =\nupload-to = file:///b\n";
        assert_eq!(with_file(text, &[]).0.upload_to, ["file:///b"]);
        // Quotes and spaces are no part of a store URL.
        for bad in ["\"file:///a\"", "file:///a b", "''"] {
            assert!(Config::new().set("upload-to", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_config_file_is_reported() {
        let (_, problems) = Config::from_args(&args(&["--config", "/nonexistent/q.conf"]), false);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("/nonexistent/q.conf: cannot read"),
            "{problems:?}"
        );
    }

    #[test]
    fn spool_follows_state_dir() {
        let c = good(&["--state-dir", "/s"]);
        assert_eq!(c.spool_dir(), PathBuf::from("/s/spool"));
    }

    #[test]
    fn upload_command_program_must_be_runnable() {
        assert_eq!(check_program("sh"), Ok(()));
        assert_eq!(check_program("/bin/sh"), Ok(()));
        let e = check_program("/nonexistent/cachix").unwrap_err();
        assert!(
            e.contains("/nonexistent/cachix is not an executable file;"),
            "{e}"
        );
        let e = check_program("npbhq-no-such-uploader").unwrap_err();
        assert!(e.contains("in any directory of PATH"), "{e}");
        assert!(check_program("/etc/passwd").is_err());
    }
}
