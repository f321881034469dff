//! Self-checks of the test harness in `tests/common` against real Nix and a
//! real sshd, without the daemon. If these fail, the other integration tests
//! cannot be trusted. They fail (never skip) when nix or sshd is missing.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

#[test]
fn tempdir_is_unique_and_removes_read_only_trees() {
    let a = TempDir::new("selfcheck");
    let b = TempDir::new("selfcheck");
    assert_ne!(a.path(), b.path());
    let ro = a.join("ro/inner");
    fs::create_dir_all(&ro).unwrap();
    fs::write(ro.join("f"), "x").unwrap();
    fs::set_permissions(ro.join("f"), fs::Permissions::from_mode(0o444)).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(a.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    let path = a.path().to_path_buf();
    drop(a);
    if std::env::var_os("NPBHQ_KEEP_TMP").is_none() {
        assert!(!path.exists(), "{} was not removed", path.display());
    }
}

/// `nix path-info --json` of Nix 2.8 (an array) and of Nix 2.26 (an object
/// keyed by path, `null` for an invalid path) read the same, through a JSON
/// reader that refuses malformed text.
#[test]
fn path_info_json_of_both_shapes_reads_the_same() {
    let expected = vec![
        (
            PathBuf::from("/s/abc-x"),
            Some(vec!["k-1:AAA=".to_string(), "other:BB==".to_string()]),
        ),
        (PathBuf::from("/s/ghi-z"), Some(vec![])),
        (PathBuf::from("/s/def-y"), None),
    ];
    let array = r#"[{"path":"/s/abc-x","narSize":120,"valid":true,"references":[],
        "signatures":["k-1:AAA=","other:B\u0042=="]},{"path":"/s/ghi-z","narSize":8},
        {"path":"/s/def-y","valid":false}]"#;
    let object = r#"{"/s/abc-x":{"narSize":120,"references":[],"ultimate":false,
        "signatures":["k-1:AAA=","other:BB=="]},"/s/ghi-z":{"narSize":8,"signatures":[]},
        "/s/def-y":null}"#;
    let j = Json::parse(array).unwrap();
    let a = j.as_array().unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(a[0].get("narSize").and_then(Json::as_f64), Some(120.0));
    let sigs = a[0].get("signatures").and_then(Json::as_array).unwrap();
    let sigs: Vec<&str> = sigs.iter().filter_map(Json::as_str).collect();
    assert_eq!(sigs, ["k-1:AAA=", "other:BB=="]);
    assert_eq!(a[2].get("valid").and_then(Json::as_bool), Some(false));
    for bad in ["[1,", r#"["a"#, r#"["\x"]"#, r#"["\u12"]"#, "[1] 2"] {
        assert!(Json::parse(bad).is_err(), "accepted {bad:?}");
    }
    assert_eq!(parse_path_infos(array).unwrap(), expected);
    assert_eq!(parse_path_infos(object).unwrap(), expected);
    for bad in ["", "3", r#"[{"valid":true}]"#, r#"{"/s/abc-x":3}"#] {
        assert!(parse_path_infos(bad).is_err(), "accepted {bad:?}");
    }
}

/// A refusal for want of a trusted signature is recognised in the wording
/// of both Nix versions, and nothing else is taken for one.
#[test]
fn signature_refusal_is_recognised_by_its_sense() {
    let p = "/s/abc-x";
    assert!(refused_for_signature(&format!(
        "error: cannot add path '{p}' because it lacks a valid signature"
    )));
    assert!(refused_for_signature(&format!(
        "copying 1 paths...\nerror: cannot add path '{p}' because it lacks a signature \
         by a trusted key"
    )));
    for other in [
        format!("error: path '{p}' is not valid"),
        "error: cannot connect to 'root@127.0.0.1'".to_string(),
        "signature lacks a trusted key".to_string(),
        String::new(),
    ] {
        assert!(!refused_for_signature(&other), "{other}");
    }
}

#[test]
#[should_panic(expected = "timed out")]
fn wait_until_panics_on_timeout() {
    wait_until(Duration::from_millis(100), "the impossible", || false);
}

/// A build with a hook set succeeds and makes new paths in the private
/// store; the hook runs once per derivation (counted by the hook itself:
/// Nix 2.26 no longer says `running post-build-hook` at the default
/// verbosity) with nix-build's environment, its stderr in nix-build's.
#[test]
fn build_with_hook_runs_it_per_derivation_in_nix_builds_environment() {
    let env = NixEnv::new("sc-hookenv");
    let record = env.root().join("hook-record");
    let hook = env.root().join("hook.sh");
    let script = format!(
        "#!/bin/sh\necho \"$NPBHQ_PROBE|$NIX_STORE_DIR|$DRV_PATH|$OUT_PATHS\" >> {}\n\
         echo one line from the hook >&2\n",
        record.display()
    );
    write_script(&hook, &script);
    let b = env.build(2, "hookenv", Some(&hook), &[("NPBHQ_PROBE", "probe-42")]);
    b.assert_success();
    assert_eq!(b.out_paths.len(), 2, "{b:?}");
    for p in &b.out_paths {
        let shown = p.display();
        assert!(
            p.starts_with(env.store_dir()),
            "{shown} not in private store"
        );
        assert!(p.exists());
    }
    let hook_lines = ["one line from the hook", "one line from the hook"];
    assert_eq!(b.hook_lines(), hook_lines, "{}", b.stderr);
    // The same tag again gives different paths (every build is new work).
    let again = env.build(2, "hookenv", None, NO_ENV);
    again.assert_success();
    assert!(again.out_paths.iter().all(|p| !b.out_paths.contains(p)));
    let rec = fs::read_to_string(&record).unwrap();
    let lines: Vec<&str> = rec.lines().collect();
    assert_eq!(lines.len(), 2, "{rec}");
    let (mut outs, mut drvs) = (Vec::new(), Vec::new());
    for l in lines {
        let f: Vec<&str> = l.split('|').collect();
        drvs.push(f[2]);
        assert_eq!(f[0], "probe-42", "hook did not inherit env: {l}");
        assert_eq!(PathBuf::from(f[1]), env.store_dir());
        assert!(f[2].ends_with(".drv"), "DRV_PATH: {l}");
        let query = run_ok(env.cmd("nix-store").args(["--query", "--outputs", f[2]]));
        let mut drv_outs: Vec<PathBuf> = query.lines().map(PathBuf::from).collect();
        drv_outs.sort();
        // Nix 2.8 passes an empty OUT_PATHS (NixOS/nix#6446); Nix 2.26 the
        // outputs. Either way they are the derivation's.
        let mut given: Vec<PathBuf> = f[3].split_whitespace().map(PathBuf::from).collect();
        given.sort();
        let ok = given.is_empty() || given == drv_outs;
        assert!(ok, "OUT_PATHS of {l}: want {drv_outs:?}");
        outs.extend(drv_outs);
    }
    drvs.sort();
    drvs.dedup();
    assert_eq!(drvs.len(), 2, "the hook's runs: {rec:?}\n{}", b.stderr);
    outs.sort();
    let mut expected = b.out_paths.clone();
    expected.sort();
    assert_eq!(outs, expected);
}

#[test]
fn signed_file_cache_verifies_with_right_key_only() {
    let env = NixEnv::new("sc-cache");
    let (sk, pk) = env.gen_signing_key("sc-test-1");
    let (_wrong_sk, wrong_pk) = env.gen_signing_key("sc-wrong-1");
    assert!(pk.starts_with("sc-test-1:"), "{pk}");
    let paths = env.build_paths(2, "cache");
    let unsigned = env.build_paths(1, "cache-unsigned");
    let ca = env.add_text_path("ca-text", "content addressed\n");
    assert!(ca.starts_with(env.store_dir()));

    env.sign(&sk, &paths);
    let (write_url, url) = file_cache(&env, "cache");
    let all = [paths.clone(), unsigned.clone(), vec![ca.clone()]].concat();
    let o = env.copy_to(&write_url, &all, &[], NO_ENV);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    env.verify_in_cache(&url, &pk, &paths).unwrap();
    let sigs = env.path_sigs(&url, &paths[0]).unwrap();
    assert!(sigs.iter().any(|s| s.starts_with("sc-test-1:")), "{sigs:?}");

    let e = env.verify_in_cache(&url, &wrong_pk, &paths).unwrap_err();
    assert!(e.contains("untrusted") || e.contains("exited"), "{e}");
    assert!(env.verify_in_cache(&url, &pk, &unsigned).is_err());
    // `nix store verify` alone accepts an unsigned content-addressed path;
    // the harness's signature check does not.
    let e = env.verify_in_cache(&url, &pk, &[ca]).unwrap_err();
    assert!(e.contains("no signature"), "{e}");
    // A path that is not in the cache.
    let missing = env.build_paths(1, "cache-missing");
    assert!(env.verify_in_cache(&url, &pk, &missing).is_err());
    assert!(env.path_sigs(&url, &missing[0]).is_err());
    assert!(!env.is_valid_in(&url, &missing[0]));
}

#[test]
fn ssh_ng_receiver_accepts_signed_and_refuses_unsigned() {
    let env = NixEnv::new("sc-ssh");
    let (sk, pk) = env.gen_signing_key("sc-ssh-1");
    let sshd = Sshd::start(&env, &pk);
    let paths = env.build_paths(3, "ssh");
    env.sign(&sk, &paths[..1]);
    let url = sshd.url();
    let recv = sshd.local_store_url();

    // Signed: arrives, with our signature.
    let o = env.copy_to(&url, &paths[..1], &[], &sshd.env());
    let (shown, log) = (show(&o), sshd.log());
    assert!(o.status.success(), "signed copy: {shown}\nsshd log: {log}");
    let sigs = env.path_sigs(&recv, &paths[0]).unwrap();
    assert!(sigs.iter().any(|s| s.starts_with("sc-ssh-1:")), "{sigs:?}");
    env.verify_in_cache(&recv, &pk, &paths[..1]).unwrap();
    // Also visible through ssh-ng itself.
    let o = run(env
        .cmd("nix")
        .args(["path-info", "--store", &url])
        .arg(&paths[0])
        .env("NIX_SSHOPTS", sshd.ssh_opts()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Unsigned, without --no-check-sigs: the receiver refuses it.
    let o = env.copy_to(&url, &paths[1..2], &[], &sshd.env());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "unsigned path was accepted: {err}");
    assert!(refused_for_signature(&err), "{err}");
    assert!(!env.is_valid_in(&recv, &paths[1]));

    // With --no-check-sigs the trusted root client gets it in, unsigned: so
    // "copy succeeded" alone proves nothing about signing.
    let o = env.copy_to(&url, &paths[2..3], &["--no-check-sigs"], &sshd.env());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(env.is_valid_in(&recv, &paths[2]));
    assert!(env.verify_in_cache(&recv, &pk, &paths[2..3]).is_err());
}

#[test]
fn kill_tree_ends_grandchildren() {
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 60 & sh -c 'sleep 60 & wait' & wait"])
        .spawn()
        .unwrap();
    let started = || descendants(child.id()).len() >= 3;
    wait_until(Duration::from_secs(10), "the shell's children", started);
    let tree = descendants(child.id());
    kill_tree(child.id());
    let status = child.wait().unwrap();
    let killed = std::os::unix::process::ExitStatusExt::signal(&status) == Some(9);
    assert!(killed, "the shell was not killed: {status}");
    for pid in tree {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rfind(')').map(|i| stat[i + 1..].trim_start());
        let alive = state.is_some_and(|s| !s.starts_with('Z'));
        assert!(!alive, "pid {pid} still alive: {stat}");
    }
}

/// A daemon test whose assertion fails shows the daemon's log: this test
/// runs itself again with `NPBHQ_SELFCHECK_FAIL` set, where it starts a
/// daemon and fails an assertion; the child's output must hold the
/// daemon's start-up line that names its socket.
#[test]
fn a_failed_assertion_of_a_daemon_test_prints_the_daemon_log() {
    let name = "a_failed_assertion_of_a_daemon_test_prints_the_daemon_log";
    if std::env::var_os("NPBHQ_SELFCHECK_FAIL").is_some() {
        let env = NixEnv::new("selfcheck-droplog");
        let d = Daemon::start(&env, &[]);
        let socket = d.socket();
        assert_eq!(
            d.request("ping"),
            "deliberately wrong",
            "{}",
            socket.display()
        );
    }
    let o = rerun_test(name, "exec \"$0\" \"$@\"", &[("NPBHQ_SELFCHECK_FAIL", "1")]);
    let said = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the child test passed: {said}");
    let socket = said
        .lines()
        .find_map(|l| l.strip_suffix("/sock")?.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no failed assertion naming the socket: {said}"));
    let log_at = said.find("---- log of the daemon in ").expect(&said);
    assert!(
        said[log_at..].contains(&format!("listening on {socket}/sock")),
        "{said}"
    );
}

/// Where the loopback interface is down (as in a container without
/// `CAP_NET_ADMIN`), a test that needs sshd fails with one line that says
/// so: this test runs itself again in a new network namespace, whose
/// loopback is down.
#[test]
fn sshd_on_a_loopback_that_is_down_says_why_in_one_line() {
    let name = "sshd_on_a_loopback_that_is_down_says_why_in_one_line";
    if std::env::var_os("NPBHQ_SELFCHECK_NO_LOOPBACK").is_some() {
        let env = NixEnv::new("selfcheck-nolo");
        let (_, pk) = env.gen_signing_key("nolo-1");
        let _sshd = Sshd::start(&env, &pk);
        return;
    }
    let script = "exec unshare -n \"$0\" \"$@\"";
    let o = rerun_test(name, script, &[("NPBHQ_SELFCHECK_NO_LOOPBACK", "1")]);
    let said = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "sshd ran without a loopback: {said}");
    let why = said
        .lines()
        .find(|l| l.contains("the loopback interface is down"))
        .unwrap_or_else(|| panic!("no line that says why: {said}"));
    assert!(
        why.contains("127.0.0.1") && why.contains("CAP_NET_ADMIN"),
        "{why}"
    );
}
