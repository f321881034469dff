//! The daemon's own guarantees: who may change the queue (peer
//! credentials), journal failures that end the daemon rather than leave a
//! wrong answer, `wait` after many drops, the state directory's fsync, and
//! the socket's private bind directory.
//!
//! Runs as root (CI does): it creates a user, mounts a tmpfs and runs
//! strace.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

/// An `upload-command` that holds every call while `hold` exists, then
/// succeeds; returns the script and the hold file (created).
fn held_uploader(env: &NixEnv) -> (PathBuf, PathBuf) {
    let dir = env.root().join("uploader");
    fs::create_dir_all(&dir).unwrap();
    let hold = dir.join("hold");
    fs::write(&hold, "").unwrap();
    let script = dir.join("upload");
    let text = format!(
        "#!/bin/sh\nwhile [ -e '{}' ]; do sleep 0.05; done\nexit 0\n",
        hold.display()
    );
    fs::write(&script, text).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    (script, hold)
}

/// `n` well-formed store paths that are not in the store (their hashes
/// are decimal numbers, all digits being nix-base32).
fn fake_paths(env: &NixEnv, tag: &str, n: usize) -> Vec<String> {
    let store = env.store_dir();
    (0..n)
        .map(|i| format!("{}/{i:032}-{tag}", store.display()))
        .collect()
}

/// With the socket open to everyone (0666), another user's `drop`,
/// `requeue` and `retry` are refused with the reason and change nothing;
/// their `enqueue` and `status` work.
#[test]
fn only_root_and_the_daemons_user_may_change_the_queue() {
    let env = NixEnv::new("daemon-peer");
    let (uploader, _hold) = held_uploader(&env);
    let up = uploader.display().to_string();
    let d = Daemon::start(&env, &[("socket-mode", "0666"), ("upload-command", &up)]);
    // The user reaches the socket (through `env`: see [`User::exe`]).
    fs::set_permissions(d.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let held = env.add_text_path("npbhq-peer-held", "held\n");
    let mine = env.add_text_path("npbhq-peer-user", "the user's\n");
    let (held, mine) = (held.display().to_string(), mine.display().to_string());
    assert_eq!(d.request(&format!("enqueue {held}")), "ok 1");
    let journal = d.state_dir().join("journal");
    let before = fs::read(&journal).unwrap();

    let user = User::new('p', "");
    let vars = [("NPBHQ_SOCKET".to_string(), d.socket().into_os_string())];
    let cli = |args: &str| user.cli(env.root(), args, &vars);
    let drop = format!("drop {held}");
    for args in [
        &drop,
        &format!("requeue {held}"),
        "retry",
        "drop --all-failed",
    ] {
        let o = cli(args);
        let err = String::from_utf8_lossy(&o.stderr);
        let why = err.contains("may not change the queue") && err.contains("root");
        assert!(!o.status.success() && why, "{args:?}: {}", show(&o));
    }
    let changed = fs::read(&journal).unwrap() != before;
    assert!(!changed, "a refused verb changed the journal");
    assert!(d.request("status").starts_with("ok"));

    let o = cli(&format!("enqueue {mine}"));
    assert!(o.status.success(), "enqueue as another user: {}", show(&o));
    let text = String::from_utf8_lossy(&fs::read(&journal).unwrap()).into_owned();
    assert!(text.contains(&format!(" {mine}\n")), "{text}");
    let o = cli("status");
    assert!(o.status.success(), "status as another user: {}", show(&o));
    // Root may: the held path is dropped.
    assert_eq!(d.request(&drop), "ok 1");
}

/// A `.post-build-hook-queue-*` directory a daemon killed while binding
/// left beside the socket is removed at the next start; a fresh one (a
/// daemon binding right now) is left alone.
#[test]
fn leftover_bind_directories_are_removed_at_start() {
    let env = NixEnv::new("daemon-leftover");
    let mut d = Daemon::new_stopped(&env, NO_ENV, NO_ENV);
    let parent = d.socket().parent().unwrap().to_path_buf();
    fs::create_dir_all(&parent).unwrap();
    let old = parent.join(".post-build-hook-queue-00112233445566aa");
    let fresh = parent.join(".post-build-hook-queue-00112233445566bb");
    for dir in [&old, &fresh] {
        fs::create_dir(dir).unwrap();
        fs::write(dir.join("s"), "").unwrap();
    }
    let o = run(Command::new("touch").args(["-d", "2 hours ago"]).arg(&old));
    assert!(o.status.success(), "{}", show(&o));
    d.try_spawn().unwrap();
    let gone = !old.exists();
    assert!(gone, "the leftover {old:?} is still there");
    let kept = fresh.join("s").exists();
    assert!(kept, "a fresh private directory was removed");
}

/// `wait` for a path that is dropped while it waits exits 1 naming it,
/// however many other paths are dropped afterwards (10,001 here).
#[test]
fn wait_names_a_dropped_path_after_ten_thousand_other_drops() {
    let env = NixEnv::new("daemon-drops");
    let (uploader, hold) = held_uploader(&env);
    let up = uploader.display().to_string();
    let d = Daemon::start(&env, &[("upload-command", &up)]);
    let held = env.add_text_path("npbhq-drops-held", "held\n");
    let dropped = env.add_text_path("npbhq-drops-dropped", "dropped\n");
    let (held, dropped) = (held.display().to_string(), dropped.display().to_string());
    assert_eq!(d.request(&format!("enqueue {held}")), "ok 1");
    assert_eq!(d.request(&format!("enqueue {dropped}")), "ok 1");
    let mut wait = d.cli_cmd();
    wait.arg("wait").stdout(Stdio::piped());
    let wait = wait.stderr(Stdio::piped()).spawn().unwrap();
    // Its request is in once its first progress line could be.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(d.request(&format!("drop {dropped}")), "ok 1");
    let others = fake_paths(&env, "npbhq-drops-other", 10_001);
    for chunk in others.chunks(5000) {
        let (n, chunk) = (chunk.len(), chunk.join(" "));
        assert_eq!(d.request(&format!("enqueue {chunk}")), format!("ok {n}"));
        // The worker may drop some first (they are not in the store).
        assert!(d.request(&format!("drop {chunk}")).starts_with("ok "));
    }
    let all = || d.status().num("dropped") >= 10_002;
    wait_until(Duration::from_secs(60), "10,002 paths dropped", all);
    fs::remove_file(&hold).unwrap();
    let o = wait.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "wait: {}", show(&o));
    let named = err.contains("1 path(s) were dropped") && err.contains(&dropped);
    assert!(named, "{err}");
}

/// A journal write that fails after an upload (the state directory's file
/// system is full) ends the daemon with status 1 instead of leaving the
/// path queued in memory and forgotten by the worker; after a restart with
/// space, the path is delivered and `wait` ends.
#[test]
fn a_failed_journal_write_after_an_upload_ends_the_daemon() {
    let env = NixEnv::new("daemon-fullwrite");
    let tmpfs = Mount::tmpfs(&env.root().join("statefs"), "64k");
    let mount = &tmpfs.0;
    let (uploader, hold) = held_uploader(&env);
    let up = uploader.display().to_string();
    let state = mount.join("state").display().to_string();
    let mut d = Daemon::start(&env, &[("state-dir", &state), ("upload-command", &up)]);
    let path = env.add_text_path("npbhq-fullwrite", "full\n");
    let path = path.display().to_string();
    assert_eq!(d.request(&format!("enqueue {path}")), "ok 1");
    // Queued behind it, paths that bring the journal within a few bytes of
    // its page's end, so that the next record needs a page of its own.
    let journal = mount.join("state/journal");
    let short = fake_paths(&env, "", 1)[0].len() + 14;
    for i in 0.. {
        let room = 4096 - fs::metadata(&journal).unwrap().len() as usize;
        let name = match room {
            r if r > short + 200 => 150,
            r if r >= short + 5 => r - 4 - short,
            _ => break,
        };
        let fake = fake_paths(&env, &"x".repeat(name), i + 1).pop().unwrap();
        assert_eq!(d.request(&format!("enqueue {fake}")), "ok 1");
    }
    // Fill the file system, then let the upload finish: its `-` cannot be written.
    let filler = mount.join("filler");
    fill(&filler);
    fs::remove_file(&hold).unwrap();
    let ended = || !d.is_running();
    wait_until(Duration::from_secs(30), "the daemon to end", ended);
    assert_eq!(d.stop().code(), Some(1));
    assert!(d.log().contains("journal: "));
    fs::remove_file(&filler).unwrap();
    d.try_spawn().unwrap();
    // The fake paths are dropped (not in the store); the real one arrives.
    let o = run(d.cli_cmd().args(["wait", "--timeout", "60"]));
    let err = String::from_utf8_lossy(&o.stderr);
    let delivered = o.status.code().is_some_and(|c| c < 2) && !err.contains(&path);
    assert!(delivered, "wait after the restart: {}", show(&o));
    d.stop();
    let text = fs::read_to_string(&journal).unwrap();
    let done = text.contains(&format!("- {path}\n"));
    assert!(done, "{path} not done: {text}");
}

/// Calls traced for the directory syncs.
const TRACED: &str = "openat,fsync,fdatasync,rename,renameat,renameat2,write,sendto";

fn first_ok(calls: &[Call], from: usize) -> usize {
    calls[from..]
        .iter()
        .position(|c| matches!(c.name.as_str(), "write" | "sendto") && c.args.contains("\"ok "))
        .map(|i| from + i)
        .expect("no ok written")
}

/// The journal's name is durable before the first acknowledgement: the
/// state directory, created by this start, is fsynced before the first
/// `ok` goes out.
#[test]
fn the_state_directory_is_synced_before_the_first_ok() {
    let env = NixEnv::new("daemon-dirsync");
    let s = env.root().join("fresh-state").display().to_string();
    let path = env.add_text_path("npbhq-dirsync", "x\n");
    let calls = under_strace(&env, &[("state-dir", &s)], TRACED, |d| {
        assert_eq!(d.request(&format!("enqueue {}", path.display())), "ok 1");
    });
    let ok = first_ok(&calls, 0);
    let synced = dir_synced(&calls, 0, ok, &s, &[]);
    assert!(synced, "no fsync of {s} before the first ok");
}

/// After compaction renames the new journal into place, the state
/// directory is fsynced before the next `ok`, whose record went to the
/// new file.
#[test]
fn compaction_syncs_the_directory_after_its_rename() {
    let env = NixEnv::new("daemon-compactsync");
    let state = env.root().join("state");
    let s = state.display().to_string();
    let fakes = fake_paths(&env, "npbhq-compact", 4200);
    let real = env.add_text_path("npbhq-compact-after", "x\n");
    let real = real.display().to_string();
    // A nix that never answers: the worker drops none of the fake paths
    // itself, so each `drop` reply follows its own journal write.
    let hang = FakeNix::hang(&env);
    let config = [("state-dir", s.as_str()), ("nix", &hang.nix())];
    let calls = under_strace(&env, &config, TRACED, |d| {
        for chunk in fakes.chunks(2100).map(|c| c.join(" ")) {
            assert!(d.request(&format!("enqueue {chunk}")).starts_with("ok"));
            assert!(d.request(&format!("drop {chunk}")).starts_with("ok"));
        }
        assert!(d.request(&format!("enqueue {real}")).starts_with("ok"));
    });
    let renamed = calls
        .iter()
        .rposition(|c| c.name.starts_with("rename") && c.args.contains("journal.tmp"))
        .expect("no compaction (rename of journal.tmp) in the trace");
    let ok = first_ok(&calls, renamed);
    let synced = dir_synced(&calls, renamed, ok, &s, &[]);
    assert!(synced, "no fsync of {s} between the rename and the next ok");
}

/// Socket activation with an fd 3 that is a unix stream socket but does
/// not listen: the daemon refuses it at start, naming what the socket unit
/// needs.
#[test]
fn an_inherited_socket_that_does_not_listen_is_refused() {
    let env = NixEnv::new("daemon-notlisten");
    let d = Daemon::new_stopped(&env, NO_ENV, NO_ENV);
    let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut c = env.cmd("/bin/sh");
    c.arg("-c")
        .arg("exec 3<&0 </dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve --config \"$1\"")
        .arg(daemon_bin())
        .arg(d.config_path())
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(ours)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    exit_of(&mut child, Duration::from_secs(30), "the daemon");
    let err = one_line(&child.wait_with_output().unwrap(), 1, "the daemon");
    assert!(err.contains("not a listening socket"), "{err}");
}

/// A write that fails half way (the file system fills up during it) and
/// whose undo fails too (strace makes every ftruncate fail) ends the
/// daemon with status 1, before any other record can follow the half one;
/// the restart cuts the torn record off and keeps every acknowledged path.
#[test]
fn a_half_written_record_that_cannot_be_cut_off_ends_the_daemon() {
    let env = NixEnv::new("daemon-halfrecord");
    let tmpfs = Mount::tmpfs(&env.root().join("statefs"), "64k");
    let state = tmpfs.0.join("state").display().to_string();
    let mut d = Daemon::new_stopped(&env, &[("state-dir", state.as_str())], NO_ENV);
    let mut inject = strace(Path::new("/dev/null"), "ftruncate");
    inject.args(["-e", "inject=ftruncate:error=EIO"]);
    let mut child = spawn_under(&env, &d, inject);
    let first = fake_paths(&env, "npbhq-half-first", 1).pop().unwrap();
    assert_eq!(d.request(&format!("enqueue {first}")), "ok 1");
    // Full but for the slack of the journal's page: the next big write
    // goes in part.
    let filler = tmpfs.0.join("filler");
    fill(&filler);
    let many = fake_paths(&env, "npbhq-half-many", 2000);
    let reply = std::os::unix::net::UnixStream::connect(d.socket()).map(|mut s| {
        let _ =
            std::io::Write::write_all(&mut s, format!("enqueue {}\n", many.join(" ")).as_bytes());
        let mut r = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut r);
        r
    });
    let status = exit_of(&mut child, Duration::from_secs(30), "the daemon");
    assert_eq!(status.code(), Some(1), "{reply:?}");
    assert!(!format!("{reply:?}").contains("ok"), "{reply:?}");
    fs::remove_file(&filler).unwrap();
    d.try_spawn()
        .unwrap_or_else(|e| panic!("the journal was refused after the half record: {e}"));
    let text = fs::read_to_string(tmpfs.0.join("state/journal")).unwrap();
    assert!(text.contains(&format!(" {first}\n")), "{text}");
}

/// Twenty spool files that cannot be queued are set aside with a few
/// warnings and a count, not a warning each.
#[test]
fn spool_warnings_are_summarised() {
    let env = NixEnv::new("daemon-spoolwarn");
    let mut d = Daemon::new_stopped(&env, NO_ENV, NO_ENV);
    let spool = d.spool_dir();
    fs::create_dir_all(&spool).unwrap();
    for i in 0..20 {
        fs::write(spool.join(format!("{i}-1.req")), "retry\n").unwrap();
    }
    d.try_spawn().unwrap();
    let counted = || d.log().contains("15 more spool files");
    wait_until(Duration::from_secs(30), "the spool files' count", counted);
    let bad = |e: fs::DirEntry| e.path().extension() == Some("bad".as_ref());
    assert!(fs::read_dir(&spool).unwrap().flatten().all(bad));
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("spool file")).collect();
    assert!(lines.len() <= 6, "{lines:#?}");
}
