//! The nix calls and targets, end to end: every `upload-to` is checked at
//! start, an uploader's leftovers are ended with its call, and secrets in an
//! uploader's arguments are shown nowhere.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// An executable `sh` script at `dir/name`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs the CLI (`args`, then `--socket`) and returns its stdout.
fn cli(d: &Daemon, args: &[&str]) -> String {
    let mut c = d.cli_cmd();
    run_ok(c.args(args).arg("--socket").arg(d.socket()))
}

/// Processes whose command line is `sleep <marker>`.
fn sleeps(marker: &str) -> Vec<u32> {
    let want = format!("sleep\0{marker}\0");
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want.as_bytes()))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

#[test]
fn every_upload_to_is_checked_at_start() {
    let env = NixEnv::new("nixcall-check");
    let (good, _) = file_cache(&env, "cache");
    let bad = "fiel:///x";
    let d = Daemon::new_stopped(&env, &[("upload-to", &good), ("upload-to", bad)], NO_ENV);
    // A daemon that goes on serving is killed, and the test fails.
    let mut serve = d.cli_cmd();
    serve.arg("serve").arg("--config").arg(d.config_path());
    let o = run_to_exit(&mut serve, Duration::from_secs(60));
    let (status, said) = (o.status, String::from_utf8_lossy(&o.stderr));
    assert!(!status.success(), "serve started with {bad}: {said}");
    // A configuration error, not a transient one.
    assert_ne!(status.code(), Some(1), "{said}");
    let named = said.contains(&format!("upload-to {bad}: "));
    assert!(named, "names the second target: {said}");
}

#[test]
fn what_an_uploader_leaves_in_its_process_group_is_ended_and_the_path_counts() {
    let env = NixEnv::new("nixcall-leftover");
    let marker = format!("{}.{}", 3000 + std::process::id() % 1000, unique_id().len());
    let uploader = script(env.root(), "uploader", &format!("sleep {marker} &\nexit 0"));
    let d = Daemon::start(&env, &[("upload-command", &uploader.display().to_string())]);
    let path = env.add_text_path("leftover", "x");
    let enqueue = format!("enqueue {}", path.display());
    assert_eq!(d.request(&enqueue), "ok 1");
    let waited = d.request("wait");
    let left = sleeps(&marker);
    for pid in &left {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert_eq!(waited, "ok all uploaded");
    assert_eq!(left, Vec::<u32>::new(), "the helper outlived its call");
}

#[test]
fn tokens_in_uploader_arguments_are_shown_nowhere() {
    let env = NixEnv::new("nixcall-token");
    let metrics = env.root().join("npbhq.prom");
    // The uploader repeats its arguments in its error, as some do.
    let uploader = script(env.root(), "uploader", "echo \"refused: $*\" >&2; exit 1");
    let command = format!(
        "{} push --token npbhq-secret-1 --auth-token=npbhq-secret-2 CACHIX_AUTH_TOKEN=npbhq-secret-3 c",
        uploader.display()
    );
    let metrics_s = metrics.display().to_string();
    let config = [("upload-command", &command), ("metrics-file", &metrics_s)];
    let d = Daemon::start(&env, &config.map(|(k, v)| (k, v.as_str())));
    let path = env.add_text_path("token", "x");
    assert_eq!(d.request(&format!("enqueue {}", path.display())), "ok 1");
    let failed = || {
        let metrics = fs::read_to_string(&metrics).unwrap_or_default();
        let counted = metrics.contains("upload-command") && metrics.contains("failed");
        d.log().contains("refused:") && counted
    };
    wait_until(Duration::from_secs(60), "a failure logged, counted", failed);
    let shown = [
        ("status", cli(&d, &["status"])),
        ("status --json", cli(&d, &["status", "--json"])),
        ("log", d.log()),
        ("metrics", fs::read_to_string(&metrics).unwrap()),
    ];
    for (what, text) in shown {
        assert!(!text.contains("npbhq-secret"), "{what}: a token:\n{text}");
        let masked = text.contains("--token ***");
        assert!(masked, "{what} shows the masked command:\n{text}");
    }
}

/// `substitute-on-destination` puts `--substitute-on-destination` on the
/// `nix copy` of an ssh-ng target, which this Nix accepts: the paths arrive.
#[test]
fn substitute_on_destination_copies_over_ssh_ng() {
    let env = NixEnv::new("nixcall-sod");
    let (sk, pk) = env.gen_signing_key("nixcall-sod-1");
    let sshd = Sshd::start(&env, &pk);
    let w = FakeNix::new(&env);
    let (sk_s, nix_s, url) = (sk.display().to_string(), w.nix(), sshd.url());
    let config = [("signing-key-file", sk_s.as_str()), ("upload-to", &url)];
    let more = [("substitute-on-destination", "true"), ("nix", &nix_s)];
    let d = Daemon::start_with_env(&env, &[&config[..], &more].concat(), &sshd.env());
    let path = env.add_text_path("sod", "x");
    assert_eq!(d.request(&format!("enqueue {}", path.display())), "ok 1");
    let waited = d.request("wait");
    assert_eq!(waited, "ok all uploaded", "sshd:\n{}", sshd.log());
    let calls = w.calls();
    let copy = calls.iter().find(|c| c.contains(&"copy".to_string()));
    let sod = "--substitute-on-destination".to_string();
    assert!(copy.is_some_and(|c| c.contains(&sod)), "{calls:?}");
    assert!(env.is_valid_in(&sshd.local_store_url(), &path));
}

/// A Nix of 2.19 or newer is asked with `nix store info` (`ping` is a
/// deprecated alias there, whose warning would end up in errors); an older
/// one with `nix store ping`. The wrapper says it is 2.26 and runs this
/// machine's nix with `ping` in place of `info`.
#[test]
fn a_newer_nix_is_asked_with_store_info() {
    let env = NixEnv::new("nixcall-info");
    let (upload, _) = file_cache(&env, "cache");
    let w = FakeNix::with_preludes(
        &env,
        "[ \"$1\" = --version ] && { echo 'nix (Nix) 2.26.3'; exit 0; }\n\
         for a; do shift; [ \"$a\" = info ] && a=ping; set -- \"$@\" \"$a\"; done",
        "",
    );
    let d = Daemon::start(&env, &[("upload-to", &upload), ("nix", &w.nix())]);
    let checked = |d: &Daemon| {
        let opened = || d.log().contains("nix can open it");
        wait_until(Duration::from_secs(30), "the target check", opened);
    };
    checked(&d);
    let calls: Vec<String> = w.calls().iter().map(|c| c.join(" ")).collect();
    let info = calls.iter().any(|l| l.contains("store info --store"));
    assert!(info, "{calls:?}");
    assert!(!calls.iter().any(|l| l.contains("store ping")), "{calls:?}");
    // With this machine's own nix, whichever it is, the check passes.
    checked(&Daemon::start(&env, &[("upload-to", &upload)]));
}
