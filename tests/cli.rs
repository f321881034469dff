//! The command line of `post-build-hook-queue`: `check-config`, the exit
//! statuses of `serve` (78 for a configuration error, 1 for a start error
//! that may pass), each command's `--help`, a misspelt flag, settings from
//! the environment, and `status` printing what the daemon renders. None of
//! these needs Nix: the daemon is never asked to upload anything.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_post-build-hook-queue"));
    c.env_remove("NPBHQ_SOCKET").stdin(Stdio::null());
    c
}

/// A fresh directory of this test's own.
fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `c` to its end (a daemon that should have refused to start is
/// killed after a minute, and the test fails): its exit status and output.
fn run(c: &mut Command) -> (Option<i32>, String, String) {
    let o = common::run_to_exit(c, Duration::from_secs(60));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (o.status.code(), text(&o.stdout), text(&o.stderr))
}

/// `check-config` reports every problem, each on a line of its own that
/// names where it is (file and line, or flag), and exits 78; a good
/// configuration exits 0 quietly. A signing key file it cannot read (as in
/// a build sandbox) is left to `serve`. It opens nothing: no state
/// directory, no socket.
#[test]
fn check_config_lists_every_problem_one_line_each_and_exits_78_or_0() {
    let d = dir("check");
    let public = d.join("public.key");
    std::fs::write(&public, format!("cache-1:{}=\n", "A".repeat(43))).unwrap();
    let conf = d.join("bad.conf");
    std::fs::write(
        &conf,
        format!(
            "command-timeout = -1.0\nretry-initial-delay = 0\nupload-to = \"\"\nbatch-size = many\n\
             uplaod-to = file:///c\nupload-command = /nonexistent/cachix push c\n\
             signing-key-file = {}\nno equals sign\nstate-dir = {}\nsocket = {}\n",
            public.display(),
            d.join("state").display(),
            d.join("s.sock").display()
        ),
    )
    .unwrap();
    let conf_s = conf.display().to_string();
    let mut c = bin();
    c.args(["check-config", "--config", &conf_s]);
    let (code, out, err) = run(c.args(["--max-connections", "0", "--socket-mode"]));
    assert_eq!(code, Some(78), "{err}");
    assert_eq!(out, "");
    let lines: Vec<&str> = err.lines().collect();
    let mean = "did you mean \"upload-to\"?";
    let expected = [
        "--socket-mode: --socket-mode needs a value".to_string(),
        format!("{conf_s}:8: expected 'key = value'"),
        format!("{conf_s}:1: key \"command-timeout\": "),
        format!("{conf_s}:2: key \"retry-initial-delay\": "),
        format!("{conf_s}:3: key \"upload-to\": "),
        format!("{conf_s}:4: key \"batch-size\": "),
        format!("{conf_s}:5: key \"uplaod-to\": unknown key \"uplaod-to\"; {mean}"),
        "--max-connections: ".to_string(),
        format!(
            "signing-key-file {} does not hold a Nix secret key",
            public.display()
        ),
        "upload-command: /nonexistent/cachix is not an executable file".to_string(),
    ];
    assert_eq!(lines.len(), expected.len(), "one line per problem:\n{err}");
    for e in &expected {
        let line = format!("post-build-hook-queue: {e}");
        let found = lines.iter().any(|l| l.starts_with(&line));
        assert!(found, "no line starts with {line:?}:\n{err}");
    }
    assert!(!d.join("state").exists() && !d.join("s.sock").exists());

    let good = d.join("good.conf");
    std::fs::write(
        &good,
        format!(
            "upload-to = file://{}\nupload-to = ssh-ng://mirror\nupload-command = sh -c true\n\
             signing-key-file = /nonexistent/in-the-sandbox.key\ncommand-timeout = 2.5\n\
             state-dir = {}\n",
            d.join("cache").display(),
            d.join("state").display()
        ),
    )
    .unwrap();
    let (code, out, err) = run(bin().args(["check-config", "--config"]).arg(&good));
    assert_eq!((code, out.as_str(), err.as_str()), (Some(0), "", ""));
    assert!(!d.join("state").exists() && !d.join("cache").exists());
    // The same target twice (a password aside) is a problem too.
    let (code, _, err) = run(bin()
        .args(["check-config", "--upload-to", "ssh://u:a@h"])
        .args(["--upload-to", "ssh://u:b@h", "--batch-size", "0"]));
    assert_eq!(code, Some(78));
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(err.contains("given twice") && !err.contains(":a@"), "{err}");
}

/// `serve` exits 78 on a configuration error, before it makes its state
/// directory or socket, so that systemd does not restart it in vain; and 1
/// when its state directory is held by another daemon, which may pass.
#[test]
fn serve_exits_78_on_a_bad_setting_and_1_when_the_state_dir_is_locked() {
    let d = dir("serve");
    let state = d.join("state").display().to_string();
    let sock = d.join("s.sock").display().to_string();
    let serve = |socket: &str| {
        let mut c = bin();
        c.args(["serve", "--state-dir", &state, "--socket", socket]);
        c
    };
    for bad in [
        &["--command-timeout", "-1.0"][..],
        &["--retry-initial-delay", "0"],
        &["--upload-command", "/nonexistent/uploader"],
        &["--upload", "file:///c"],
    ] {
        let (code, _, err) = run(serve(&sock).args(bad));
        assert_eq!(code, Some(78), "{bad:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{bad:?}: {err}");
        assert!(err.contains(bad[0]) || err.contains(&bad[1][..5]), "{err}");
        assert!(!d.join("state").exists() && !d.join("s.sock").exists());
    }

    let log = std::fs::File::create(d.join("first.log")).unwrap();
    let mut first = serve(&sock).stderr(log).spawn().unwrap();
    common::wait_until(Duration::from_secs(60), "the first daemon's socket", || {
        assert!(first.try_wait().unwrap().is_none(), "the first one ended");
        d.join("s.sock").exists()
    });
    let other = d.join("s2.sock").display().to_string();
    let second = run(&mut serve(&other));
    first.kill().unwrap();
    first.wait().unwrap();
    let (code, _, err) = second;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("in use by another daemon"), "{err}");
}

/// `serve --help` is serve's own help: its synopsis, each setting with its
/// default, every exit status. Each command has its own.
#[test]
fn serve_help_is_its_own_with_the_defaults_and_every_exit_status() {
    let (code, out, _) = run(bin().args(["serve", "--help"]));
    assert_eq!(code, Some(0));
    let usage = "Usage: post-build-hook-queue ";
    assert!(out.starts_with(&format!("{usage}serve ")), "{out}");
    let shown = "batch-size|[default: 1000]|max-attempts|[default: 10]|upload-to| 78 | 1 ";
    for line in shown.split('|') {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    let batch = out
        .lines()
        .find(|l| l.trim_start().starts_with("batch-size"));
    let batch = batch.unwrap();
    assert!(batch.ends_with("[default: 1000]"), "{batch}");
    let (code, out, _) = run(bin().args(["check-config", "--help"]));
    assert_eq!(code, Some(0));
    assert!(out.starts_with(&format!("{usage}check-config ")), "{out}");
    let documented = out.contains("78") && out.contains("[default: 600]");
    assert!(documented, "{out}");
    let (_, out, _) = run(bin().arg("--help"));
    let statuses = out.contains(" 78 ") && out.contains(" 2 ");
    assert!(out.contains("check-config") && statuses, "{out}");
}

/// A misspelt or shortened flag names the nearest key, as a misspelt key
/// in the file does.
#[test]
fn a_misspelt_flag_suggests_the_nearest_key() {
    let d = dir("misspelt");
    for (flag, key) in [("--upload", "upload-to"), ("--batchsize", "batch-size")] {
        let (code, _, err) = run(bin().args([flag, "x", "--state-dir"]).arg(d.join("state")));
        assert_eq!(code, Some(78), "{err}");
        let mean = format!("did you mean \"{key}\"?");
        assert!(err.contains(&mean), "{flag}: {err}");
    }
}

/// A setting taken from the environment is checked as the file's are, and
/// the error names the variable.
#[test]
fn settings_from_the_environment_are_checked_like_the_files() {
    let d = dir("environment");
    let var = "NIX_STORE_DIR";
    let (state, sock) = (d.join("state"), d.join("s.sock"));
    let (state, sock) = (state.to_str().unwrap(), sock.to_str().unwrap());
    for value in ["nix/store", "/nix/store\nok"] {
        for command in ["serve", "check-config"] {
            let (code, _, err) = run(bin()
                .args([command, "--state-dir", state, "--socket", sock])
                .env(var, value));
            assert_eq!(code, Some(78), "{command} {var}={value:?}: {err}");
            let named = err.contains(&format!("${var}: expected an absolute path"));
            assert!(named, "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(!d.join("state").exists());
        }
    }
    // Given as a setting, the variable is not used, and not checked.
    let (code, _, err) = run(bin()
        .args(["check-config", "--store-dir", "/nix/store"])
        .env("NIX_STORE_DIR", "nix/store"));
    assert_eq!(code, Some(0), "{err}");
}

/// `status` and `status --json` print the lines the daemon renders, as
/// they come, and nothing else: the CLI does not render them again.
#[test]
fn status_prints_what_the_daemon_renders() {
    let d = dir("status");
    let sock = d.join("s.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let replies = [
        ("status", "queued:       3\nin flight:    0\n"),
        ("status json", "{\"queued\":3,\"in_flight\":0}\n"),
    ];
    let server = std::thread::spawn(move || {
        let mut asked = Vec::new();
        for (_, reply) in replies {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            asked.push(line);
            let mut stream = stream;
            stream.write_all(format!("{reply}ok\n").as_bytes()).unwrap();
        }
        asked
    });
    let (code, out, err) = run(bin().args(["status", "--socket"]).arg(&sock));
    assert_eq!((code, out.as_str()), (Some(0), replies[0].1), "{err}");
    let (code, out, err) = run(bin().args(["status", "--json", "--socket"]).arg(&sock));
    assert_eq!((code, out.as_str()), (Some(0), replies[1].1), "{err}");
    assert_eq!(server.join().unwrap(), ["status\n", "status json\n"]);
}
