//! Checks of the Nix packaging that need no nixpkgs: every `.nix` file
//! parses with the real `nix-instantiate`, the daemon starts with the config
//! file and command line `module.nix` renders (tests/system/rendered/, kept
//! in step with module.nix by tests/system.rs) and their values take effect,
//! the module's build-time check of its config file refuses what the daemon
//! refuses, and the module's settings are exactly the daemon's.

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_nix_file_parses() {
    let env = NixEnv::new("parse");
    let mut files: Vec<_> = [repo().to_path_buf(), repo().join("tests/system")]
        .iter()
        .flat_map(|dir| fs::read_dir(dir).unwrap())
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "nix"))
        .collect();
    files.sort();
    for expected in ["default.nix", "flake.nix", "module.nix", "render.nix"] {
        let found = files.iter().any(|p| p.ends_with(expected));
        assert!(found, "{expected} missing: {files:?}");
    }
    for file in &files {
        run_ok(env.cmd("nix-instantiate").arg("--parse").arg(file));
    }
}

/// The config file and the daemon's arguments as module.nix renders them
/// for the `file` configuration of the system tier: (config text, the
/// ExecStart words after the program).
fn rendered_service() -> (String, Vec<String>) {
    let r = Rendered::load(&repo().join("tests/system/rendered"), "file");
    let exec = r
        .service_value("ExecStart")
        .expect("ExecStart= in the service");
    let words = exec.split_whitespace().skip(1).map(String::from).collect();
    (r.config_file().1.to_string(), words)
}

#[test]
fn daemon_reads_the_config_file_module_nix_renders() {
    let (rendered, exec_args) = rendered_service();
    // What the module's settings put there (tests/system/render.nix).
    for line in [
        "retry-initial-delay = 0.5\n",
        "retry-max-delay = 2.5\n",
        "batch-size = 50\n",
    ] {
        assert!(rendered.contains(line), "{line:?} not in {rendered}");
    }
    let env = NixEnv::new("rendered");
    let dir = env.root().join("svc");
    fs::create_dir_all(&dir).unwrap();
    let config = dir.join("nix-post-build-hook-queue.conf");
    fs::write(&config, &rendered).unwrap();
    let (key, _public) = env.gen_signing_key("rendered");
    let socket = dir.join("sock");
    let metrics = dir.join("metrics.prom");
    let state = dir.join("state");
    // The module's command line, word for word, with the places that exist
    // only under systemd moved into the test's directory: the config file's
    // store path, the state dir and the credential (%d). The socket, metrics
    // file and target are flags after them (flags win over the file, which
    // is part of what is checked); the target fails at once, so that the
    // retry settings show.
    let mut args: Vec<String> = Vec::new();
    let mut words = exec_args.iter();
    while let Some(w) = words.next() {
        args.push(w.clone());
        let value = match w.as_str() {
            "--config" => config.display().to_string(),
            "--state-dir" => state.display().to_string(),
            "--signing-key-file" => key.display().to_string(),
            _ => continue,
        };
        words.next();
        args.push(value);
    }
    assert_eq!(
        args.iter().filter(|a| a.starts_with("--")).count(),
        3,
        "the module's ExecStart changed: {exec_args:?}"
    );
    let mut child = env
        .cmd(daemon_bin())
        .args(&args)
        .arg("--socket")
        .arg(&socket)
        .arg("--metrics-file")
        .arg(&metrics)
        .args(["--upload-to", "file:///dev/null/npbhq"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let log = || fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    let accepts = || std::os::unix::net::UnixStream::connect(&socket).is_ok();
    let ten = Duration::from_secs(10);
    wait_until_diag(ten, "the daemon accepts", accepts, log);
    let cli = |a: &[&OsStr]| run_ok(env.cmd(daemon_bin()).args(a).arg("--socket").arg(&socket));
    let path = env.add_text_path("rendered", "rendered\n");
    cli(&["enqueue".as_ref(), path.as_ref()]);
    // retry-initial-delay 0.5 and retry-max-delay 2.5 from the file: from
    // the fourth failed attempt on, the next try is at most 2.5 s away (with
    // the defaults, 1 and 300 s, at least 4 s). Read from the daemon's log:
    // "... failed attempt N, next try in X s: ...".
    let attempts = |log: &str| -> Vec<(u32, f64)> {
        log.lines()
            .filter_map(|l| {
                let rest = &l[l.find("failed attempt ")? + "failed attempt ".len()..];
                let (n, rest) = rest.split_once(", next try in ")?;
                let (x, _) = rest.split_once(" s")?;
                Some((n.parse().ok()?, x.parse().ok()?))
            })
            .collect()
    };
    wait_until_diag(
        Duration::from_secs(60),
        "four failed attempts",
        || attempts(&log()).iter().any(|(n, _)| *n >= 4),
        log,
    );
    for (n, next) in attempts(&log()) {
        assert!(
            n < 4 || next <= 2.5,
            "attempt {n}: next try in {next} s; retry-max-delay 2.5 not in effect\n{}",
            log()
        );
    }
    let status = cli(&["status".as_ref(), "--json".as_ref()]);
    assert!(status.contains("\"signing\":true"), "{status}");
    assert!(
        status.contains("file:///dev/null/npbhq"),
        "the --upload-to flag wins over the file's upload-to: {status}"
    );
    wait_until(ten, "the metrics file is written", || metrics.exists());
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "SIGTERM should stop the daemon cleanly: {exit:?}\n{}",
        log()
    );
}

#[test]
fn module_knows_every_daemon_setting_and_no_other() {
    // module.nix's settings options, as evaluated (tests/system/render.nix).
    let keys = rendered_check("settings-keys");
    let mut in_module: Vec<&str> = keys.trim_matches('"').split_whitespace().collect();
    in_module.sort();

    let help = run_ok(Command::new(daemon_bin()).arg("--help"));
    let section = help
        .split("Daemon settings")
        .nth(1)
        .expect("--help lists the settings");
    let lines = section.lines().skip(1);
    let lines: Vec<&str> = lines.take_while(|l| l.starts_with("  ")).collect();
    // A line's key: its first word, or, where a key as wide as the key
    // column runs into its description, the longest module key that fills
    // the column and starts the word.
    let column = lines
        .iter()
        .filter_map(|l| {
            let key_end = 2 + l[2..].find(' ')?;
            Some(key_end + l[key_end..].find(|c| c != ' ')?)
        })
        .min()
        .expect("a settings line with a description");
    let mut in_daemon: Vec<&str> = lines
        .iter()
        .filter_map(|l| {
            let word = l.split_whitespace().next()?;
            let glued = in_module
                .iter()
                .filter(|k| word.len() > k.len() && word.starts_with(*k))
                .filter(|k| 2 + k.len() >= column - 1)
                .max_by_key(|k| k.len());
            Some(glued.copied().unwrap_or(word))
        })
        .collect();
    in_daemon.sort();
    assert_eq!(in_module, in_daemon, "module.nix settings vs --help");
}

/// module.nix builds the config file through a derivation that runs the
/// daemon's own `check-config` on it, so that a bad setting fails
/// `nixos-rebuild build`. Its build script (kept in
/// tests/system/rendered/checks.txt) run as the build would run it, with
/// the real daemon: a good file becomes `$out`; a value the daemon refuses
/// fails the build with EX_CONFIG (78), says which setting, and leaves no
/// `$out`.
#[test]
fn module_config_check_fails_the_build_on_a_bad_setting() {
    let quoted = rendered_check("config-check-script");
    let script = quoted
        .trim_matches('"')
        .replace("\\n", "\n")
        .replace("\\\"", "\"")
        .replace(
            "/opt/npbhq/bin/post-build-hook-queue",
            &daemon_bin().display().to_string(),
        );
    assert!(script.contains(" check-config --config "), "{script}");
    let dir = TempDir::new("config-check");
    let build = |config: &str, out: &str| {
        let unchecked = dir.join(format!("{out}.in"));
        fs::write(&unchecked, config).unwrap();
        // As a builder runs it: bash with stdenv's `set -euo pipefail`, an
        // environment of its own, no home.
        let ran = run(Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", "/homeless-shelter")
            .env("TMPDIR", dir.path())
            .env("unchecked", &unchecked)
            .env("out", dir.join(out)));
        let text = String::from_utf8_lossy(&ran.stdout) + String::from_utf8_lossy(&ran.stderr);
        (ran.status.code(), text.into_owned())
    };
    let (good, _) = rendered_service();
    let (status, text) = build(&good, "good");
    assert_eq!(status, Some(0), "the rendered config was refused: {text}");
    assert_eq!(fs::read_to_string(dir.join("good")).unwrap(), good);
    for (bad, key) in [
        ("command-timeout = -1\n", "command-timeout"),
        ("batch-size = 0\n", "batch-size"),
    ] {
        let (status, text) = build(&format!("{good}{bad}"), "bad");
        assert_eq!(status, Some(78), "{bad:?} passed the check: {text}");
        assert!(
            text.contains(key),
            "{bad:?}: the check does not say {key}: {text}"
        );
        assert!(!dir.join("bad").exists(), "{bad:?}: $out was written");
    }
}
