//! Core integration tests: the real `post-build-hook` client and
//! `post-build-hook-queue` daemon against real Nix (private stores), a
//! `file://` binary cache and an `ssh-ng://` receiver behind a real sshd.
//!
//! Timeouts in `wait_until` are correctness bounds ("this eventually
//! happens"), never speed assertions.

mod common;

use common::*;
use std::fs;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A daemon that signs with a fresh key named `key_name` and uploads to a
/// `file://` cache: (daemon, the cache's URL for reading, the public key).
fn signing_daemon(env: &NixEnv, key_name: &str) -> (Daemon, String, String) {
    let (sk, pk) = env.gen_signing_key(key_name);
    let (upload, read) = file_cache(env, "cache");
    let sk = sk.display().to_string();
    let d = Daemon::start(env, &[("signing-key-file", &sk), ("upload-to", &upload)]);
    (d, read, pk)
}

/// 1. A nix-build with our hook and a daemon that signs and uploads to a
///    file:// cache: the build succeeds and every output arrives, signed.
///    (Nix 2.8 passes an empty OUT_PATHS, so the daemon resolves DRV_PATH;
///    Nix 2.26 passes the outputs. The hook is run by hand each way below,
///    on both versions: `hook_with_closed_standard_descriptors_spools_and_queues`.)
#[test]
fn hook_build_is_signed_and_uploaded_to_file_cache() {
    let env = NixEnv::new("core-file");
    let (d, read, pk) = signing_daemon(&env, "core-file-1");
    let b = env.build(3, "file", Some(&hook_bin()), &d.hook_env());
    assert!(b.status.success(), "build failed: {}", b.stderr);
    assert_eq!(b.out_paths.len(), 3, "{b:?}");
    wait_verified(&env, &read, &pk, &b.out_paths, "all 3 outputs");
}

/// 2. The same to an ssh-ng receiver that requires signatures: the outputs
///    arrive and the receiver holds our signature.
#[test]
fn hook_build_is_signed_and_uploaded_over_ssh_ng() {
    let env = NixEnv::new("core-ssh");
    let (sk, pk) = env.gen_signing_key("core-ssh-1");
    let sshd = Sshd::start(&env, &pk);
    let (sk, url) = (sk.display().to_string(), sshd.url());
    let config = [("signing-key-file", sk.as_str()), ("upload-to", &url)];
    let config = [&config[..], &[("command-timeout", "60")]].concat();
    let d = Daemon::start_with_env(&env, &config, &sshd.env());
    let b = env.build(3, "ssh", Some(&hook_bin()), &d.hook_env());
    assert!(b.status.success(), "build failed: {}", b.stderr);
    assert_eq!(b.out_paths.len(), 3, "{b:?}");
    let recv = sshd.local_store_url();
    let arrived = || {
        b.out_paths
            .iter()
            .try_for_each(|p| env.path_sigs(&recv, p).map(drop))
    };
    let sshd_log = || format!("sshd log:\n{}", sshd.log());
    wait_until_ok(UPLOAD_TIMEOUT, "all 3 outputs received", arrived, sshd_log);
    for p in &b.out_paths {
        let sigs = env.path_sigs(&recv, p).unwrap();
        let ours = sigs.iter().any(|s| s.starts_with("core-ssh-1:"));
        assert!(ours, "{} without our signature: {sigs:?}", p.display());
    }
    env.verify_in_cache(&recv, &pk, &b.out_paths).unwrap();
}

/// 3. With the hook set and no daemon running, the build still succeeds and
///    the hook says so in one line per derivation, which Nix prefixes
///    `post-build-hook: ` once: the hook does not repeat it. The daemon,
///    started, uploads what the hook spooled.
#[test]
fn spooled_paths_are_uploaded_when_daemon_starts() {
    let env = NixEnv::new("core-spool");
    let (sk, pk) = env.gen_signing_key("core-spool-1");
    let (upload, read) = file_cache(&env, "cache");
    let spool = env.root().join("spool");
    let (sk, spool_s) = (sk.display().to_string(), spool.display().to_string());
    let config = [("signing-key-file", sk.as_str()), ("upload-to", &upload)];
    let config = [&config[..], &[("spool-dir", &spool_s)]].concat();
    let mut d = Daemon::new_stopped(&env, &config, NO_ENV);
    let b = env.build(2, "spool", Some(&hook_bin()), &d.hook_env());
    b.assert_success();
    assert_eq!(b.out_paths.len(), 2);
    // One line for each derivation the hook ran after.
    let lines = b.hook_lines();
    assert_eq!(lines.len(), 2, "{lines:?}\nstderr:\n{}", b.stderr);
    let no_daemon = format!("no daemon at {}", d.socket().display());
    let said = |l: &String| l.starts_with(&no_daemon) && l.contains("spooled the paths to");
    assert!(lines.iter().all(said), "{lines:?}");
    let spooled = fs::read_dir(&spool).map(|r| r.count()).unwrap_or(0);
    assert!(spooled > 0, "nothing in {spool_s}; stderr:\n{}", b.stderr);
    d.try_spawn().unwrap_or_else(|e| panic!("{e}"));
    wait_verified(&env, &read, &pk, &b.out_paths, "spooled outputs");
}

/// 4. `post-build-hook-queue enqueue` of existing paths, as arguments or
///    on stdin (`-`), uploads them; bad arguments give a non-zero exit and
///    a one-line error.
#[test]
fn enqueue_cli_uploads_and_rejects_bad_arguments() {
    let env = NixEnv::new("core-enq");
    let (d, read, pk) = signing_daemon(&env, "core-enq-1");
    let (paths, piped) = (env.build_paths(2, "enq"), env.build_paths(2, "stdin"));
    let sock = d.socket().display().to_string();
    let mut c = d.cli_cmd();
    let o = run(c.args(["enqueue", "--socket", &sock]).args(&paths));
    assert!(o.status.success(), "{}", show(&o));
    let mut c = d.cli_cmd();
    c.args(["enqueue", "--socket", &sock, "-"]);
    let o = run_with_stdin(&mut c, &(strs(&piped).join("\n") + "\n"));
    assert!(o.status.success(), "{}", show(&o));
    let all = [paths, piped].concat();
    wait_verified(&env, &read, &pk, &all, "enqueued paths uploaded");

    for bad in [vec!["/tmp/x"], vec!["--to"], vec!["/tmp/x", "--to"]] {
        let o = run(d.cli_cmd().args(["enqueue", "--socket", &sock]).args(&bad));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "enqueue {bad:?}: {err}");
        let lines = err.trim_end().lines().count();
        assert_eq!(lines, 1, "enqueue {bad:?}: not one line: {err:?}");
    }
}

/// 4d. Protocol replies for `ping`, `enqueue`, `drv` and bad requests, of a
///     daemon without key or target, which logs that it has nothing to do.
#[test]
fn protocol_replies() {
    let env = NixEnv::new("core-proto");
    let d = Daemon::start(&env, &[]);
    let ping = d.request("ping");
    assert!(ping.starts_with("ok"), "ping: {ping}");
    let paths = env.build_paths(2, "proto");
    let line = format!("enqueue {}", strs(&paths).join(" "));
    assert_eq!(d.request(&line), "ok 2");
    for bad in ["enqueue /tmp/x", "frobnicate", "enqueue"] {
        let r = d.request(bad);
        assert!(r.starts_with("err "), "{bad:?} -> {r:?}");
    }
    let drv = env.deriver(&paths[0]);
    let r = d.request(&format!("drv {}", drv.display()));
    assert!(r.starts_with("ok"), "drv -> {r:?}");
    let idle = || d.log().to_lowercase().contains("nothing to do");
    wait_until(Duration::from_secs(10), "nothing to do in the log", idle);
}

/// A daemon that signs, with a failing target, `stop`ped with 3 paths
/// queued: none reached the cache, and after a restart with a working
/// target every one arrives, signed.
fn resumes_after(tag: &str, stop: impl FnOnce(&mut Daemon)) {
    let env = NixEnv::new(&format!("core-{tag}"));
    let (sk, pk) = env.gen_signing_key(&format!("core-{tag}-1"));
    let (upload, read) = file_cache(&env, "cache");
    let sk = sk.display().to_string();
    let bad = ("upload-to", "file:///dev/null/x");
    let mut d = Daemon::start(&env, &[("signing-key-file", sk.as_str()), bad]);
    let paths = env.build_paths(3, tag);
    let line = format!("enqueue {}", strs(&paths).join(" "));
    assert_eq!(d.request(&line), "ok 3");
    stop(&mut d);
    let early = env.verify_in_cache(&read, &pk, &paths).is_ok();
    assert!(!early, "uploaded before the cache was configured");
    d.set_config("upload-to", &upload);
    d.restart();
    let what = format!("queued paths uploaded after {tag} and a restart");
    wait_verified(&env, &read, &pk, &paths, &what);
}

#[test]
fn journal_survives_kill9_and_uploads_after_restart() {
    resumes_after("crash", Daemon::kill9);
}

#[test]
fn sigterm_stops_cleanly_and_restart_resumes_queue() {
    resumes_after("term", |d| {
        let status = d.stop();
        assert!(status.success(), "not exit 0 on SIGTERM: {status}");
    });
}

/// The hook run by hand (the harness's `hook_cmd`): with the daemon up, a
/// DRV_PATH handed over is uploaded and the client exits 0. Started with its
/// standard descriptors closed (as a careless caller might) it still works:
/// it exits 0, the spool file holds exactly the request, and with the daemon
/// up the path is queued.
#[test]
fn hook_with_closed_standard_descriptors_spools_and_queues() {
    let env = NixEnv::new("core-closed-fds");
    let (mut d, read, pk) = signing_daemon(&env, "core-closed-fds-1");
    let paths = env.build_paths(3, "closedfds");
    let drv = env.deriver(&paths[2]);
    let o = run(d.hook_cmd().env("DRV_PATH", &drv).env("OUT_PATHS", ""));
    assert!(o.status.success(), "{}", show(&o));
    wait_verified(&env, &read, &pk, &paths[2..], "the DRV_PATH's output");
    let closed = |d: &Daemon, out: &PathBuf| {
        let mut c = Command::new("sh");
        c.args(["-c", "exec \"$0\" <&- >&- 2>&-"]).arg(hook_bin());
        c.envs(d.hook_env()).env("OUT_PATHS", out);
        let o = run(c.env("DRV_PATH", ""));
        assert!(o.status.success(), "hook exited {}", o.status);
    };

    d.kill9();
    closed(&d, &paths[0]);
    // One complete spool file with the request.
    assert_eq!(spooled(&d.spool_dir()), request(&paths[0]));

    d.restart();
    closed(&d, &paths[1]);
    wait_verified(&env, &read, &pk, &paths, "the paths uploaded");
}

/// Nix's log reader gone (the hook's stderr a pipe nobody reads): the hook's
/// one line fails with EPIPE, which it ignores. A SIGPIPE must not end it, as
/// a hook killed by a signal fails the build (std ignores the signal at
/// start). The daemon here is a socket that accepts and never answers, so
/// the hook writes its line after its timeout, well after the reader
/// closed, and spools the request.
#[test]
fn hook_whose_log_reader_went_away_spools_and_exits_0() {
    let env = NixEnv::new("core-hook-epipe");
    let (socket, spool) = (env.root().join("silent.sock"), env.root().join("spool"));
    let _silent = UnixListener::bind(&socket).unwrap();
    let path = env
        .store_dir()
        .join("0000000000000000000000000000000e-npbhq-epipe");
    let mut hook = hook(&socket, &spool, "0.3", &path)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(hook.stderr.take());
    let status = hook.wait().unwrap();
    assert!(status.success(), "the hook ended with {status}");
    assert_eq!(spooled(&spool), request(&path));
}

/// A daemon whose backlog is full (it has stopped accepting, and as many
/// clients as the kernel queues wait): a plain connect would block until it
/// accepts. The hook gives up at its timeout, spools the request, says so in
/// one line and exits 0. That the backlog stayed full while the hook ran is
/// checked, not assumed: the connect that found it full is still blocked
/// after the hook has ended.
#[test]
fn hook_spools_when_the_daemon_backlog_is_full() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    // Each queued connection holds a descriptor of this process: below
    // the backlog plus a margin, the test runs again in a child whose soft
    // limit is raised (up to the hard one).
    let backlog: u64 = fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("read /proc/sys/net/core/somaxconn");
    let need = backlog + 512;
    let (soft, hard) = open_file_limits();
    if soft < need {
        assert!(
            hard >= need,
            "a listen backlog of {backlog} (net.core.somaxconn) needs {need} open files, \
             more than the hard limit {hard}: raise it (ulimit -Hn) or lower somaxconn"
        );
        assert!(
            std::env::var_os("NPBHQ_NOFILE_RAISED").is_none(),
            "ulimit -n did not raise the open-file limit ({soft} of {need})"
        );
        let want = hard.min(2 * need);
        let o = rerun_test(
            "hook_spools_when_the_daemon_backlog_is_full",
            &format!("ulimit -n {want} && exec \"$0\" \"$@\""),
            &[("NPBHQ_NOFILE_RAISED", "1")],
        );
        let said = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
        let passed = o.status.success() && said.contains("1 passed");
        assert!(passed, "the re-run with `ulimit -n {want}` failed:\n{said}");
        return;
    }

    let env = NixEnv::new("core-hook-backlog");
    let (socket, spool) = (env.root().join("full.sock"), env.root().join("spool"));
    let listener = UnixListener::bind(&socket).unwrap();
    let connected = Arc::new(AtomicUsize::new(0));
    let in_connect = Arc::new(AtomicBool::new(false));
    let filler = {
        let (socket, connected, in_connect) =
            (socket.clone(), connected.clone(), in_connect.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            loop {
                in_connect.store(true, Ordering::SeqCst);
                let c = std::os::unix::net::UnixStream::connect(&socket);
                in_connect.store(false, Ordering::SeqCst);
                match c {
                    Ok(c) => held.push(c),
                    Err(e) if e.raw_os_error() == Some(24) => {
                        let n = held.len();
                        panic!("out of descriptors after {n} connections: raise `ulimit -n`")
                    }
                    // The listener closed at the end of the test.
                    Err(_) => return held.len(),
                }
                connected.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Full: a connect has been waiting, with no progress, for a second.
    let mut last = (usize::MAX, std::time::Instant::now());
    loop {
        assert!(!filler.is_finished(), "the connecting thread ended early");
        let n = connected.load(Ordering::SeqCst);
        if n != last.0 || !in_connect.load(Ordering::SeqCst) {
            last = (n, std::time::Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let queued = connected.load(Ordering::SeqCst);

    let path = env
        .store_dir()
        .join("0000000000000000000000000000000f-npbhq-backlog");
    // A correctness bound, far above the hook's 0.5 s: a hook blocked in
    // its connect never ends.
    let o = run_to_exit(
        &mut hook(&socket, &spool, "0.5", &path),
        Duration::from_secs(60),
    );
    let full = in_connect.load(Ordering::SeqCst) && connected.load(Ordering::SeqCst) == queued;
    assert!(full, "the backlog did not stay full ({queued} queued)");
    let said = one_line(&o, 0, "the hook");
    let socket_s = socket.display();
    let late = format!("the daemon at {socket_s} did not accept the connection in time");
    let spooled_it = said.starts_with(&late) && said.contains("spooled the paths to");
    assert!(spooled_it, "{said:?}");
    assert_eq!(spooled(&spool), request(&path));
    drop(listener);
    let _ = fs::remove_file(&socket);
    filler.join().expect("the connecting thread");
}

/// What the spool holds after the hook handed over `path` alone.
fn request(path: &Path) -> Vec<String> {
    vec![format!("enqueue {}\n", path.display())]
}

/// The hook for the one output `path`, with the daemon at `socket`, the
/// spool `spool` and the timeout `timeout` (seconds).
fn hook(socket: &Path, spool: &Path, timeout: &str, path: &Path) -> Command {
    let mut c = root_hook(socket, spool, &path.display().to_string());
    c.env("NPBHQ_TIMEOUT", timeout);
    c
}

/// The daemon started with its standard descriptors closed puts `/dev/null`
/// on them before it opens anything (its `main` skips std's start-up, which
/// would do that), so neither its journal nor a client's connection becomes
/// its stderr or a nix call's stdin: the journal holds only records, and the
/// paths arrive.
#[test]
fn daemon_with_closed_standard_descriptors_opens_dev_null_on_them() {
    let env = NixEnv::new("core-daemon-closed-fds");
    let (mut d, read, pk) = signing_daemon(&env, "core-daemon-closed-fds-1");
    let paths = env.build_paths(2, "dclosedfds");
    d.restart_with_closed_standard_descriptors();
    // sh exec'd the daemon, so the pid is the daemon's.
    let pid = d.pid().expect("running");
    for fd in 0..3 {
        let on = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok();
        assert_eq!(on, Some(PathBuf::from("/dev/null")), "descriptor {fd}");
    }
    for p in &paths {
        assert_eq!(d.request(&format!("enqueue {}", p.display())), "ok 1");
    }
    wait_verified(&env, &read, &pk, &paths, "both paths uploaded");
    let journal = fs::read_to_string(d.state_dir().join("journal")).unwrap();
    let records = journal
        .lines()
        .all(|l| l.starts_with("+ ") || l.starts_with("- "));
    assert!(records, "only records in the journal:\n{journal}");
    d.restart();
    let log = d.log();
    let info = log.lines().all(|l| l.starts_with("info: "));
    assert!(log.contains("replayed: 0 paths queued") && info, "{log}");
}

/// A path garbage-collected after the daemon checked it is valid, just
/// before `nix copy` (a wrapper around the real nix deletes it then), must
/// not block the valid paths queued with it: the invalid path fails the
/// whole `nix copy` call, the valid ones still arrive, and at the next try
/// the invalid one is dropped, with one warning, and counted as dropped.
#[test]
fn invalid_path_does_not_block_valid_ones() {
    let env = NixEnv::new("core-invalid");
    let (sk, pk) = env.gen_signing_key("core-invalid-1");
    let (upload, read) = file_cache(&env, "cache");
    let paths = env.build_paths(3, "invalid");
    let (good, victim) = ([paths[0].clone(), paths[2].clone()], paths[1].clone());
    // The garbage collector strikes between the validity check and the copy.
    let gc = format!(
        "[ \"$3\" = copy ] && {} --delete {} >/dev/null 2>&1",
        which("nix-store").display(),
        victim.display()
    );
    let w = FakeNix::with_preludes(&env, &gc, "");
    let (sk, nix) = (sk.display().to_string(), w.nix());
    let config = [("signing-key-file", sk.as_str()), ("upload-to", &upload)];
    let more = [("nix", nix.as_str()), ("retry-initial-delay", "0.05")];
    let d = Daemon::start(&env, &[&config[..], &more].concat());
    let line = format!("enqueue {}", strs(&paths).join(" "));
    assert_eq!(d.request(&line), "ok 3");
    wait_verified(&env, &read, &pk, &good, "the valid paths");
    let victim_s = victim.display().to_string();
    let dropped = || {
        let status = d.request_lines("status");
        status.iter().any(|l| l == "dropped:      1 since start")
            && status.iter().any(|l| l == "queued:       0")
    };
    wait_until(
        Duration::from_secs(30),
        "the collected path dropped, none queued",
        dropped,
    );
    let log = d.log();
    let copies = w.uploads();
    let first = copies.iter().find(|c| c.0 == "copy");
    let copied = first.is_some_and(|c| c.2.contains(&victim_s));
    assert!(copied, "the path never reached nix copy: {copies:?}");
    let drops: Vec<&str> = log.lines().filter(|l| l.contains("dropping")).collect();
    let one = drops.len() == 1 && drops[0].starts_with("warning:");
    assert!(one && drops[0].contains(&victim_s), "{drops:?}");
    assert!(!env.is_valid_in(&read, &victim));
}
