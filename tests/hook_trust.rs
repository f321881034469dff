//! The root hook and the admin commands against other users and hostile
//! daemons, with real users (`useradd`, so root only, as CI runs):
//!
//! - a listener of another user at a socket file that root owns: the hook
//!   and the CLI check the process they are connected to, not the file, and
//!   send it nothing;
//! - a spool directory the daemon's user replaced by a link: the root hook
//!   follows no link and writes nothing where it points;
//! - a trusted daemon that floods a reply: the hook and `status` end with a
//!   clear line, their memory bounded;
//! - under strace, the spool file's rename is followed by the directory's
//!   fsync.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A store path that is well formed (the listeners here never check it).
const PATH: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-trust";

/// A test directory every user may enter.
fn open_tmp(tag: &str) -> TempDir {
    let tmp = TempDir::new(tag);
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// Set in the copy of this test binary that runs as another user: the
/// socket to listen on; every line received is appended to
/// `$NPBHQ_TEST_LOG` and answered with `ok`, one connection at a time.
const LISTEN: &str = "NPBHQ_TEST_LISTEN";

/// A listener run by another user, at a socket file that root then owns:
/// the file's owner says nothing of who listens. The root hook refuses it
/// (one line that names the listener's uid), spools the paths and exits 0;
/// the root CLI refuses it (exit 2, one line). The listener receives no
/// request line from either.
#[test]
fn a_listener_of_another_user_gets_nothing_from_root() {
    if let Some(socket) = std::env::var_os(LISTEN) {
        let listener = UnixListener::bind(&socket).unwrap();
        let log = std::env::var_os("NPBHQ_TEST_LOG").unwrap();
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                let mut f = fs::OpenOptions::new();
                let mut f = f.append(true).create(true).open(&log).unwrap();
                f.write_all(line.as_bytes()).unwrap();
                let _ = (&stream).write_all(b"ok\n");
                line.clear();
            }
        }
        return;
    }
    let tmp = open_tmp("trust-peer");
    let user = User::new('p', "");
    let theirs = owned_dir(tmp.path(), "theirs", user.uid, 0o755);
    let (socket, log) = (theirs.join("sock"), theirs.join("received"));
    let mut listener = user.exe(tmp.path(), &std::env::current_exe().unwrap());
    let test = "a_listener_of_another_user_gets_nothing_from_root";
    listener.args(["--exact", test]).env(LISTEN, &socket);
    let listener = listener.env("NPBHQ_TEST_LOG", &log).stdout(Stdio::null());
    let _listener = Running(listener.stderr(Stdio::null()).spawn().unwrap());
    let bound = || socket.exists();
    wait_until(Duration::from_secs(30), "the listener to bind", bound);
    std::os::unix::fs::chown(&socket, Some(0), Some(0)).unwrap();
    // Root's own line: every connection before it has been read to its end.
    let sentinel = |word: &str| {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(format!("{word}\n").as_bytes()).unwrap();
        let mut ok = [0u8; 3];
        s.read_exact(&mut ok).unwrap();
        fs::read_to_string(&log).unwrap()
    };
    assert_eq!(sentinel("first"), "first\n", "the listener works");
    assert_root_refuses(&socket, user.uid, &tmp.join("root-spool"), [PATH, PATH]);
    assert_eq!(sentinel("last"), "first\nlast\n", "nothing else reached it");
}

/// The daemon's user made `spool` in its state directory a link to a
/// directory of root's: the root hook, with the daemon away, creates
/// nothing there (nor below a linked directory on the way), says why in one
/// line and exits 0. Once the link is a directory again, it spools there.
#[test]
fn the_root_hook_follows_no_link_to_its_spool() {
    let tmp = open_tmp("trust-spool");
    let user = User::new('s', "");
    let state = owned_dir(tmp.path(), "state", user.uid, 0o755);
    let victim = tmp.join("victim");
    fs::create_dir(&victim).unwrap();
    let as_user = |program: &str, args: &[&Path]| {
        let o = run(user.command(program).args(args));
        assert!(o.status.success(), "{program}: {}", show(&o));
    };
    as_user("/bin/ln", &[Path::new("-s"), &victim, &state.join("spool")]);
    as_user("/bin/ln", &[Path::new("-s"), &victim, &state.join("link")]);
    let socket = state.join("socket");
    for spool in [state.join("spool"), state.join("link/spool")] {
        let said = one_line(&run(&mut root_hook(&socket, &spool, PATH)), 0, "hook");
        let made: Vec<_> = fs::read_dir(&victim).unwrap().collect();
        assert!(made.is_empty(), "through the link: {made:?}; {said}");
        let why = format!("cannot write the spool {}", spool.display());
        let why = said.contains(&why) && said.contains("following no link");
        assert!(why && said.contains("NOT queued"), "{said:?}");
    }
    as_user("/bin/rm", &[&state.join("spool")]);
    as_user("/bin/mkdir", &[&state.join("spool")]);
    let o = run(&mut root_hook(&socket, &state.join("spool"), PATH));
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(spooled(&state.join("spool")), [format!("enqueue {PATH}\n")]);
}

/// A spool directory of a user the hook does not trust: for a hook run by
/// a user, anyone but root and that user (here `nobody`'s world-writable
/// sticky directory, which that user could write); for the root hook, a
/// second user below the daemon's. Nothing is written there, the hook says
/// why in one line and exits 0.
#[test]
fn a_spool_directory_of_an_untrusted_user_is_refused() {
    let tmp = open_tmp("trust-owner");
    let user = User::new('o', "");
    let nobody = 65534;
    let sticky = owned_dir(tmp.path(), "sticky", nobody, 0o1777);
    let theirs = owned_dir(tmp.path(), "theirs", user.uid, 0o755);
    let below = owned_dir(&theirs, "nobodys", nobody, 0o755);
    let socket = tmp.join("no.sock");
    let mut as_user = user.command(hook_bin());
    as_user.env("NPBHQ_SOCKET", &socket).env("OUT_PATHS", PATH);
    as_user.env("NPBHQ_SPOOL_DIR", &sticky);
    let root = root_hook(&socket, &below, PATH);
    for (dir, mut hook) in [(&sticky, as_user), (&below, root)] {
        let said = one_line(&run(&mut hook), 0, "hook");
        assert_eq!(spooled(dir), Vec::<String>::new(), "{said}");
        let owner = format!("{} belongs to uid {nobody}", dir.display());
        let refused = said.contains(&owner) && said.contains("NOT queued");
        assert!(refused, "{said:?}");
    }
}

/// The highest resident memory of process `pid` so far, in KiB (`None`
/// once it is gone).
fn peak_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `cmd` to its end (killed after a minute), polling its peak memory;
/// returns its output and that peak in KiB.
fn run_measured(cmd: &mut Command) -> (Output, u64) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    let (start, mut peak) = (Instant::now(), 0);
    loop {
        peak = peak.max(peak_kib(pid).unwrap_or(0));
        if let Ok(o) = rx.recv_timeout(Duration::from_millis(5)) {
            return (o, peak);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("still running after a minute, at {peak} KiB");
        }
    }
}

/// A daemon of root's own that answers every connection with `flood` for
/// ever: endless empty lines, or one endless line. The root hook still ends
/// within its deadline with its paths spooled and a small peak memory, and
/// `status` ends with one clear line instead of growing.
#[test]
fn a_flooding_daemon_bounds_the_hook_and_status() {
    let tmp = open_tmp("trust-flood");
    for (name, flood) in [("empty", b"\n".repeat(4096)), ("long", b"x".repeat(4096))] {
        let socket = tmp.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&socket).unwrap();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let flood = flood.clone();
                thread::spawn(move || while (&stream).write_all(&flood).is_ok() {});
            }
        });
        let spool = tmp.join(format!("{name}-spool"));
        let mut hook = root_hook(&socket, &spool, PATH);
        let (o, peak) = run_measured(hook.env("NPBHQ_TIMEOUT", "3"));
        let said = one_line(&o, 0, name);
        let why = said.contains("longer than") && said.contains("spooled the paths to");
        assert!(why, "{name}: {said:?}");
        assert_eq!(spooled(&spool), [format!("enqueue {PATH}\n")]);
        assert!(peak < 32 * 1024, "{name}: the hook peaked at {peak} KiB");

        let mut status = Command::new(daemon_bin());
        let (o, peak) = run_measured(status.args(["status", "--socket"]).arg(&socket));
        let err = one_line(&o, 2, name);
        assert!(err.contains("longer than"), "{name}: {err:?}");
        assert!(peak < 32 * 1024, "{name}: status peaked at {peak} KiB");
    }
}

/// Under strace, with the daemon away: the hook's spool file is renamed
/// into place and then the spool directory itself is fsynced, so the new
/// name survives a crash.
#[test]
fn the_spool_directory_is_synced_after_the_rename() {
    let tmp = open_tmp("trust-strace");
    let (spool, trace) = (tmp.join("spool"), tmp.join("strace.log"));
    let traced = "open,openat,rename,renameat,renameat2,fsync,fdatasync";
    let mut hook = strace(&trace, traced);
    hook.arg(hook_bin())
        .env("NPBHQ_SOCKET", tmp.join("no.sock"));
    let o = run(hook.env("NPBHQ_SPOOL_DIR", &spool).env("OUT_PATHS", PATH));
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(spooled(&spool).len(), 1, "{}", show(&o));
    let log = fs::read_to_string(&trace).unwrap();
    let calls = strace_calls(&log);
    let renamed = calls
        .iter()
        .position(|c| c.name.starts_with("rename") && c.args.contains(".req\"") && c.ok())
        .unwrap_or_else(|| panic!("no rename into the spool:\n{log}"));
    // A descriptor on the spool directory: a `/proc/self/fd/N/` the rename
    // goes through, or one opened by its path.
    let through = calls[renamed].args.split("/proc/self/fd/").skip(1);
    let through: Vec<&str> = through.filter_map(|p| p.split('/').next()).collect();
    let spool = spool.display().to_string();
    let synced = dir_synced(&calls, renamed, calls.len(), &spool, &through);
    assert!(synced, "no fsync of the spool after the rename:\n{log}");
}
