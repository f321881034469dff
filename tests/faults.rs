//! Fault tests: break things on purpose and check that nothing acknowledged
//! is lost and no build is failed or stalled by the queue.
//!
//! Everything is real: Nix in private stores, the real daemon and hook
//! binaries, `kill -9` of the whole daemon tree, an sshd, a TCP listener that
//! never answers, a tmpfs that fills up. The injected faults are
//! [`FakeNix`] preludes, e.g. one that sleeps before the real `nix copy`,
//! so that kills land while an upload runs.
//!
//! Timeouts in `wait_until*` are correctness bounds ("this eventually
//! happens"), never speed assertions.

mod common;

use common::*;
use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// --- Helpers

/// A target that fails every upload.
const UNREACHABLE: &str = "file:///dev/null/unreachable";

/// Retry settings that retry at once.
const FAST_RETRY: [(&str, &str); 2] = [("retry-initial-delay", "0.05"), ("retry-max-delay", "0.2")];

fn enqueue_line(paths: &[PathBuf]) -> String {
    format!("enqueue {}", strs(paths).join(" "))
}

/// `n` new content-addressed text paths from one `nix-store --add` call
/// (cheap: ~0.3 s for 600).
fn add_text_paths(env: &NixEnv, n: usize, tag: &str) -> Vec<PathBuf> {
    let dir = env.root().join(format!("texts-{}", unique_id()));
    fs::create_dir_all(&dir).unwrap();
    let id = unique_id();
    let files: Vec<PathBuf> = (0..n)
        .map(|i| {
            let f = dir.join(format!("npbhq-{tag}-{i:05}"));
            fs::write(&f, format!("{tag} {i} {id}\n")).unwrap();
            f
        })
        .collect();
    let out = run_ok(env.cmd("nix-store").arg("--add").args(&files));
    let paths: Vec<PathBuf> = out.lines().map(PathBuf::from).collect();
    assert_eq!(paths.len(), n, "nix-store --add printed {out}");
    paths
}

/// Ok when every path is valid in the cache at `url` (no signature check).
fn all_in_cache(env: &NixEnv, url: &str, paths: &[PathBuf]) -> Result<(), String> {
    let infos = match paths {
        [] => Vec::new(),
        _ => env.path_infos(url, paths)?,
    };
    let valid = infos.iter().filter_map(|(p, s)| s.as_ref().and(Some(p)));
    let valid: HashSet<&PathBuf> = valid.collect();
    let missing: Vec<&PathBuf> = paths.iter().filter(|p| !valid.contains(p)).collect();
    let (n, all) = (missing.len(), paths.len());
    match missing.first() {
        None => Ok(()),
        Some(p) => Err(format!("{n} of {all} not in {url}, e.g. {p:?}")),
    }
}

/// Waits until `paths` are in the cache at `url` (see [`all_in_cache`]).
fn wait_in_cache(env: &NixEnv, url: &str, paths: &[PathBuf]) {
    let there = || all_in_cache(env, url, paths);
    wait_ok(UPLOAD_TIMEOUT, "the paths in the cache", there);
}

/// Waits until `d`'s queue is empty.
fn wait_drained(d: &Daemon) {
    let empty = || d.status().num("queued") == 0;
    wait_until(secs(30), "an empty queue", empty);
}

/// A daemon that signs with the key file `sk` and uploads to `upload`, with
/// `extra` settings and environment `vars`.
fn signing(
    env: &NixEnv,
    (sk, upload): (&Path, &str),
    extra: &[(&str, &str)],
    vars: &[(&str, &str)],
) -> Daemon {
    let sk = sk.display().to_string();
    let mut config = vec![("signing-key-file", sk.as_str()), ("upload-to", upload)];
    config.extend_from_slice(extra);
    Daemon::start_with_env(env, &config, vars)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A small xorshift generator; the seed is printed so a failing run can be
/// repeated with `NPBHQ_FAULTS_SEED`.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let now = SystemTime::now().duration_since(UNIX_EPOCH);
        let now = now.map_or(1, |d| d.as_nanos() as u64) | 1;
        let seed = std::env::var("NPBHQ_FAULTS_SEED").ok();
        let seed = seed.and_then(|s| s.parse().ok()).unwrap_or(now);
        eprintln!("{test}: random seed {seed} (set NPBHQ_FAULTS_SEED to repeat)");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Command lines (arguments joined by spaces) of the processes `pids`.
fn cmdlines(pids: impl IntoIterator<Item = u32>) -> Vec<String> {
    pids.into_iter()
        .filter_map(|p| fs::read(format!("/proc/{p}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

/// Command lines of the processes below the daemon.
fn below(d: &Daemon) -> Vec<String> {
    d.pid().map_or(vec![], |pid| cmdlines(descendants(pid)))
}

fn copy_running(d: &Daemon) -> bool {
    below(d).iter().any(|c| c.contains(" copy --to "))
}

/// The final line of a `wait` request; panics when it has not come within
/// `deadline` (its progress lines would keep a read timeout from firing).
fn wait_request(d: &Daemon, deadline: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = d.socket();
    thread::spawn(move || {
        let _ = tx.send(try_ask(&socket, "wait"));
    });
    match rx.recv_timeout(deadline) {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => panic!("wait request failed: {e}"),
        Err(_) => panic!("wait did not end within {deadline:?}"),
    }
}

/// Lines of the daemon log that contain `needle`.
fn log_lines(d: &Daemon, needle: &str) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

// --- Crash

/// `kill -9` of the whole daemon tree at random moments (while requests are
/// being journaled, and while `nix copy` runs), many times, under continuous
/// enqueueing: after every crash each acknowledged path is either still in
/// the journal or already in the cache; in the end every acknowledged path is
/// in the cache, signed, and the journal holds no duplicate live record.
#[test]
fn crash_kill9_under_continuous_enqueueing_loses_nothing() {
    const CYCLES: usize = 20;
    let env = NixEnv::new("faults-crash");
    let (upload, read) = file_cache(&env, "cache");
    let paths = add_text_paths(&env, 1000, "crash");
    let slow = "case \" $* \" in *\" copy \"*) sleep 0.15 ;; esac";
    let slow_nix = FakeNix::with_preludes(&env, slow, "");
    let nix = slow_nix.nix();
    let retry = [("retry-initial-delay", "0.05"), ("retry-max-delay", "0.5")];
    let config = [&[("nix", nix.as_str()), ("batch-size", "50")][..], &retry].concat();
    let (sk, pk) = env.gen_signing_key("faults-crash-1");
    let mut d = signing(&env, (&sk, &upload), &config, NO_ENV);

    // The enqueuer: a few paths per request, paced, retrying a request until
    // it gets a reply; only an `ok` reply makes its paths "acked".
    #[derive(Default)]
    struct Enqueuer {
        acked: Mutex<Vec<PathBuf>>,
        refusals: Mutex<Vec<String>>,
        stop: AtomicBool,
    }
    let q = Arc::new(Enqueuer::default());
    let enqueuer = {
        let (q, socket, paths) = (Arc::clone(&q), d.socket(), paths.clone());
        thread::spawn(move || {
            let (mut i, mut k) = (0, 1);
            while i < paths.len() && !q.stop.load(SeqCst) {
                let chunk = &paths[i..(i + k).min(paths.len())];
                match try_ask(&socket, &enqueue_line(chunk)) {
                    Ok(r) if r.starts_with("ok") => {
                        q.acked.lock().unwrap().extend_from_slice(chunk);
                        i += chunk.len();
                        k = k % 3 + 1;
                        thread::sleep(Duration::from_millis(15));
                    }
                    Ok(r) => {
                        q.refusals.lock().unwrap().push(r);
                        thread::sleep(Duration::from_millis(5));
                    }
                    // Daemon down or killed mid-request: try again.
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };

    let mut rng = Rng::new("crash");
    let mut kills_during_copy = 0;
    for cycle in 0..CYCLES {
        if cycle % 2 == 1 {
            // Wait for an upload to start, then kill inside it (the wrapper
            // holds `nix copy` for 150 ms before the real copy runs).
            let start = Instant::now();
            while !copy_running(&d) && start.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(5));
            }
            thread::sleep(Duration::from_millis(rng.below(200)));
        } else {
            thread::sleep(Duration::from_millis(30 + rng.below(400)));
        }
        kills_during_copy += usize::from(copy_running(&d));
        d.kill9();
        let acked_now = q.acked.lock().unwrap().clone();
        let j = d.journal();
        let dups = &j.duplicates[..j.duplicates.len().min(3)];
        assert!(dups.is_empty(), "cycle {cycle}: duplicates: {dups:?}");
        let live: HashSet<&str> = j.live.iter().map(String::as_str).collect();
        let live = |p: &&PathBuf| live.contains(p.to_str().unwrap());
        let not_live: Vec<PathBuf> = acked_now.iter().filter(|p| !live(p)).cloned().collect();
        let lost = all_in_cache(&env, &read, &not_live);
        lost.unwrap_or_else(|e| panic!("cycle {cycle}: acked, not in journal nor cache: {e}"));
        let started = d.try_spawn();
        started.unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
    }
    q.stop.store(true, SeqCst);
    enqueuer.join().unwrap();
    let acked = q.acked.lock().unwrap().clone();
    let refusals = q.refusals.lock().unwrap();
    assert!(refusals.is_empty(), "the daemon refused: {refusals:?}");
    assert!(acked.len() > 100, "only {} paths acked", acked.len());
    let landed = kills_during_copy >= CYCLES / 4;
    assert!(landed, "{kills_during_copy} of {CYCLES} during nix copy");

    // One more crash, then look at what is left in the journal.
    d.kill9();
    let before = d.journal();
    let dups = &before.duplicates[..before.duplicates.len().min(3)];
    assert!(dups.is_empty(), "{dups:?}");

    // Let the queue drain about half way (plain nix, no delay), then crash
    // again: the journal now holds at least as many dead records as live
    // ones, so the next start compacts it.
    d.set_config("nix", &which("nix").display().to_string());
    d.try_spawn().unwrap();
    let half = before.live.len() / 2;
    let halfway = || d.status().num("queued") as usize <= half;
    wait_until(UPLOAD_TIMEOUT, "half of the queue uploaded", halfway);
    d.kill9();
    let mid = d.journal();
    assert!(mid.duplicates.is_empty(), "{mid:?}");
    let (dead, live) = (mid.dead, mid.live.len());
    assert!(dead >= live, "to compact: {dead} dead, {live} live");

    // Restart against a broken target, so nothing completes while we read:
    // replay compacted the journal to exactly the live records.
    d.set_config("upload-to", UNREACHABLE);
    d.set_config("batch-size", "1000");
    d.try_spawn().unwrap();
    let after = d.journal();
    assert!(after.duplicates.is_empty(), "{after:?}");
    assert_eq!(after.live, mid.live, "replay changed the live set");
    let left = (after.dead, after.done.len(), after.torn);
    assert_eq!(left, (0, 0, 0), "the journal was not compacted at start");
    assert_eq!(d.status().num("queued"), mid.live.len() as u64);

    // Now with the real target: every acknowledged path arrives, signed.
    d.kill9();
    d.set_config("upload-to", &upload);
    d.try_spawn().unwrap();
    wait_verified(&env, &read, &pk, &acked, "every acked path");
    wait_drained(&d);
    // A clean restart compacts the (now all dead) journal to nothing.
    d.restart();
    let last = d.journal();
    let empty = last.live.is_empty() && last.dead == 0;
    assert!(empty, "journal after compaction: {last:?}");
    assert_eq!(d.status().num("queued"), 0);
}

// --- Outage

/// (attempt, delay) of each backoff line of the daemon log.
fn backoff_delays(d: &Daemon) -> Vec<(u32, f64)> {
    log_lines(d, "next try in")
        .iter()
        .filter_map(|l| {
            let (_, rest) = l.split_once("failed attempt ")?;
            let (attempt, rest) = rest.split_once(", next try in ")?;
            let (delay, _) = rest.split_once(" s")?;
            Some((attempt.parse().ok()?, delay.parse().ok()?))
        })
        .collect()
}

/// The target fails (its `file://` directory's parent is a regular file, so
/// every `nix copy` fails) until the daemon has failed 4 attempts, however
/// long that takes on a loaded machine, then recovers: every path arrives,
/// the retry delays grew, and each attempt cost at most two calls (the
/// batch and one path alone), not a hot loop.
#[test]
fn outage_backs_off_then_delivers_everything() {
    let env = NixEnv::new("faults-outage");
    let blocker = env.root().join("outage");
    fs::write(&blocker, "a regular file where the cache's parent is\n").unwrap();
    let read = format!("file://{}/cache", blocker.display());
    let upload = format!("{read}?compression=none");
    let delays = [("retry-initial-delay", "0.1"), ("retry-max-delay", "2")];
    let (sk, pk) = env.gen_signing_key("faults-outage-1");
    let d = signing(&env, (&sk, &upload), &delays, NO_ENV);
    let paths = env.build_paths(8, "outage");
    assert_eq!(d.request(&enqueue_line(&paths)), "ok 8");
    let four = || backoff_delays(&d).iter().any(|(a, _)| *a >= 4);
    wait_until(Duration::from_secs(120), "4 failed attempts", four);
    fs::remove_file(&blocker).unwrap();
    wait_verified(&env, &read, &pk, &paths, "after the outage");
    wait_drained(&d);
    let failed_calls = d.status().num("failed-calls");
    let delays = backoff_delays(&d);
    // Jitter makes a delay between half and all of `initial * 2^(n-1)`:
    // the first is at most 0.1 s, the fourth at least 0.4 s.
    let first = delays.iter().find(|(a, _)| *a == 1).map(|(_, d)| *d);
    let fourth = delays.iter().find(|(a, _)| *a >= 4).map(|(_, d)| *d);
    let grew = matches!((first, fourth), (Some(f), Some(l)) if l > 2.0 * f);
    assert!(grew, "retry delays did not grow: {delays:?}");
    // At most the batch and one path alone per attempt; one more when the
    // target came back between a batch's failure and its canary (then the
    // batch is split, and its parts go through).
    let attempts = delays.len() as u64;
    let bounded = failed_calls <= 2 * attempts + 1;
    assert!(bounded, "{failed_calls} failed calls, {attempts} attempts");
}

// --- Hang

/// A TCP listener that accepts and never answers. Counts connections
/// accepted and connections the other side closed.
struct BlackHole {
    port: u16,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl BlackHole {
    fn bind(addr: (&str, u16)) -> std::io::Result<BlackHole> {
        let listener = TcpListener::bind(addr)?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (Arc::clone(&accepted), Arc::clone(&closed));
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                a.fetch_add(1, SeqCst);
                let c = Arc::clone(&c);
                thread::spawn(move || {
                    // Read (ssh sends its banner) and never answer.
                    let mut buf = [0u8; 4096];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                    c.fetch_add(1, SeqCst);
                });
            }
        });
        Ok(BlackHole {
            port,
            accepted,
            closed,
        })
    }
}

/// An `ssh-ng://` target at `addr` (with a remote store that is never used).
fn hung_ssh(env: &NixEnv, addr: &str) -> String {
    let remote = env.root().join("remote");
    format!("ssh-ng://root@{addr}?remote-store={}", remote.display())
}

/// An `ssh-ng://` target that accepts the connection and never answers, with
/// a user `NIX_SSHOPTS` that has no `ConnectTimeout`: only `command-timeout`
/// saves the worker. The call is killed with everything it started (the ssh
/// connection closes), retried, and after switching to a working target the
/// paths arrive.
#[test]
fn hung_target_is_killed_by_command_timeout_and_retried() {
    let env = NixEnv::new("faults-hang");
    let hole = BlackHole::bind(("127.0.0.1", 0)).unwrap();
    let opts = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes";
    let ssh_opts = format!("-p {} {opts} -o LogLevel=ERROR", hole.port);
    let config = [&[("command-timeout", "2")][..], &FAST_RETRY].concat();
    let (vars, target) = ([("NIX_SSHOPTS", &*ssh_opts)], hung_ssh(&env, "127.0.0.1"));
    let (sk, pk) = env.gen_signing_key("faults-hang-1");
    let mut d = signing(&env, (&sk, &target), &config, &vars);
    let paths = env.build_paths(3, "hang");
    assert_eq!(d.request(&enqueue_line(&paths)), "ok 3");
    let killed = || log_lines(&d, "ran longer than 2 s and was killed").len() >= 2;
    wait_until(secs(30), "two calls killed by the timeout", killed);
    // The kill reached ssh (nix's child): its connection was closed.
    let closed = || hole.closed.load(SeqCst) >= 1;
    wait_until(secs(10), "a killed ssh's connection closed", closed);
    assert!(hole.accepted.load(SeqCst) >= 2);
    let ssh_below = below(&d).iter().filter(|c| c.starts_with("ssh ")).count();
    assert!(ssh_below <= 1, "{ssh_below} ssh processes left behind");
    // A timeout is systemic and must not bisect the batch.
    let split = log_lines(&d, "splitting");
    assert!(split.is_empty(), "{split:?}");
    let st = d.status();
    assert_eq!(st.num("queued"), 3);
    let said = st.backoff.iter().any(|l| l.contains("was killed"));
    assert!(said, "{st:?}");

    let (upload, read) = file_cache(&env, "cache");
    d.set_config("upload-to", &upload);
    d.restart();
    wait_verified(&env, &read, &pk, &paths, "in the working cache");
}

/// Uploads over ssh with a `ControlPersist` master: the first `nix copy`
/// starts the master, which outlives the call holding its stderr open
/// (OpenSSH keeps the master's stderr when `-v` logs to it). The
/// call is judged by its exit: the paths are done at once, with no call
/// killed by `command-timeout` and none failed.
#[test]
fn upload_through_an_ssh_control_master_is_judged_by_its_exit() {
    let env = NixEnv::new("faults-persist");
    let (sk, pk) = env.gen_signing_key("faults-persist-1");
    let sshd = Sshd::start(&env, &pk);
    // Short: a control socket path must fit a unix socket address.
    let control = TempDir::new("cm");
    let control_path = format!("{}/%C", control.path().display());
    let master = format!("-o ControlPath={control_path} -o ControlPersist=300");
    let ssh_opts = format!("{} -v -o ControlMaster=auto {master}", sshd.ssh_opts());
    let config = [("command-timeout", "60"), ("retry-initial-delay", "0.05")];
    let vars = [("NIX_SSHOPTS", ssh_opts.as_str())];
    let d = signing(&env, (&sk, &sshd.url()), &config, &vars);
    let paths = add_text_paths(&env, 2, "persist");
    assert_eq!(d.request(&enqueue_line(&paths)), "ok 2");
    // (Counted once the batch is done, a moment after it left the queue.)
    let done = || {
        let st = d.status();
        st.num("queued") == 0 && st.num("uploaded") >= 2
    };
    wait_until(secs(300), "the paths done (or failed and retried)", done);
    let control_dir = control.path().display().to_string();
    let procs = fs::read_dir("/proc").unwrap().flatten();
    let all = cmdlines(procs.filter_map(|e| e.file_name().to_str()?.parse().ok()));
    let master = |c: &&String| c.starts_with("ssh") && c.contains(&control_dir);
    let masters: Vec<&String> = all.iter().filter(master).collect();
    let mut exit = Command::new("ssh");
    exit.args(["-o", &format!("ControlPath={control_path}"), "-O", "exit"]);
    let _ = run(exit.arg("root@127.0.0.1"));
    let st = d.status();
    let judged = log_lines(&d, "was killed").is_empty() && st.num("failed-calls") == 0;
    assert!(judged, "a nix copy that exited 0, not judged by it: {st:?}");
    assert_eq!(st.num("uploaded"), 2, "{st:?}");
    let recv = sshd.local_store_url();
    env.verify_in_cache(&recv, &pk, &paths).unwrap();
    // Else the test did not test it.
    assert!(!masters.is_empty(), "no ssh control master left running");
}

/// The nice value in `/proc/PID/stat` (field 19; the name in field 2 may
/// hold spaces, so fields are counted after its closing parenthesis).
fn nice_of(stat: &str) -> i32 {
    let after_name = &stat[stat.rfind(')').expect("stat has a name") + 1..];
    after_name
        .split_whitespace()
        .nth(16)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no nice value in {stat:?}"))
}

/// Builds come first: every nix call runs 10 nice steps below the daemon.
/// The environment's `GLIBC_TUNABLES` is passed on unchanged, and none is
/// set when the user set none. A batch of 64 paths is uploaded by two
/// `nix copy` calls of 32 (the default `upload-jobs = 2`), a batch of 2 by
/// one. A [`FakeNix`] prelude writes down what each call got.
#[test]
fn nix_calls_run_below_the_daemon_and_copy_is_split_with_its_malloc_setting() {
    let env = NixEnv::new("faults-nice");
    let (sk, _pk) = env.gen_signing_key("faults-nice-1");
    let (upload, _read) = file_cache(&env, "cache");
    let record = env.root().join("calls.txt");
    let line = "\"$3 $4|$#|$(cat /proc/self/stat)|${GLIBC_TUNABLES-unset}\"";
    let prelude = format!("echo {line} >> {}", record.display());
    let recorder = FakeNix::with_preludes(&env, &prelude, "");
    let nix = recorder.nix();
    let inherited = std::env::var("GLIBC_TUNABLES").ok();
    let users = "glibc.malloc.perturb=0";
    for (round, vars, n) in [
        ("default", NO_ENV, 64),
        ("user-set", &[("GLIBC_TUNABLES", users)][..], 2),
    ] {
        let _ = fs::remove_file(&record);
        let d = signing(&env, (&sk, &upload), &[("nix", &nix)], vars);
        let paths = add_text_paths(&env, n, round);
        assert_eq!(d.request(&enqueue_line(&paths)), format!("ok {n}"));
        let waited = wait_request(&d, secs(120));
        assert_eq!(waited, "ok all uploaded", "{round}");
        let stat = fs::read_to_string(format!("/proc/{}/stat", d.pid().unwrap()));
        let base = nice_of(&stat.unwrap());
        let calls = fs::read_to_string(&record).unwrap();
        let calls: Vec<(&str, usize, &str, &str)> = calls
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, '|');
                Some((f.next()?, f.next()?.parse().ok()?, f.next()?, f.next()?))
            })
            .collect();
        // nix copy's arguments: the experimental-features flag (2), copy,
        // --to and the URL, then the paths.
        let copies = calls.iter().filter(|c| c.0.starts_with("copy --to"));
        let copies: Vec<usize> = copies.map(|c| c.1 - 5).collect();
        let expected_copies = if n == 64 { vec![32, 32] } else { vec![2] };
        assert_eq!(copies, expected_copies, "{round}: paths per nix copy call");
        let signed = calls.iter().any(|c| c.0 == "store sign");
        assert!(signed, "{round}: a sign call: {calls:?}");
        for (what, _, stat, tunables) in &calls {
            let nice = (base + 10).min(19);
            assert_eq!(nice_of(stat), nice, "{round}: {what}, 10 below {base}");
            let expected = match (round, what.starts_with("copy"), &inherited) {
                ("user-set", _, _) => users,
                (_, _, Some(v)) => v.as_str(),
                (_, _, None) => "unset",
            };
            assert_eq!(*tunables, expected, "{round}: GLIBC_TUNABLES of {what}");
        }
    }
}

/// A batch too big to finish within `command-timeout` is not retried at the
/// same size forever: after a timeout the next batches are halved, until
/// they go through. A [`FakeNix`] makes `nix copy` of more than two
/// paths hang (a stand-in for a batch whose upload takes too long).
#[test]
fn batch_too_big_for_the_timeout_is_retried_smaller() {
    let env = NixEnv::new("faults-size");
    let slow_nix = FakeNix::with_preludes(
        &env,
        r#"if [ "$3" = copy ]; then
  n=0
  for a in "$@"; do case "$a" in "$NIX_STORE_DIR"/*) n=$((n+1));; esac; done
  if [ "$n" -gt 2 ]; then sleep 60; fi
fi"#,
        "",
    );
    let (upload, read) = file_cache(&env, "cache");
    let nix = slow_nix.nix();
    let config = [("nix", nix.as_str()), ("upload-to", &upload)];
    let config = [&config[..], &FAST_RETRY, &[("command-timeout", "1")]].concat();
    let d = Daemon::start(&env, &config);
    let paths = add_text_paths(&env, 8, "size");
    assert_eq!(d.request(&enqueue_line(&paths)), "ok 8");
    wait_in_cache(&env, &read, &paths);
    let halved = log_lines(&d, "timed out; the next batches take at most 4");
    assert!(!halved.is_empty(), "the first timeout halves the batch");
    let split = log_lines(&d, "splitting");
    assert!(split.is_empty(), "timeouts do not bisect: {split:?}");
}

/// The same hung target without any `NIX_SSHOPTS` (removed from the
/// daemon's environment, whatever the runner's holds): the daemon's default
/// `ConnectTimeout` ends the call (ssh's own error, not our kill), well
/// before a long `command-timeout`. The listener sits on port 22 of a
/// loopback address because without `NIX_SSHOPTS` there is no way to give
/// ssh a port.
#[test]
fn hung_ssh_target_is_ended_by_default_connect_timeout() {
    let env = NixEnv::new("faults-connect");
    let (addr, hole) = (2..20)
        .map(|last| format!("127.0.0.{last}"))
        .find_map(|addr| Some((addr.clone(), BlackHole::bind((addr.as_str(), 22)).ok()?)))
        .expect("a loopback address with a free port 22");
    let target = hung_ssh(&env, &addr);
    let config = [("upload-to", target.as_str()), ("command-timeout", "120")];
    let config = [&config[..], &[("retry-initial-delay", "0.05")]].concat();
    let mut d = Daemon::new_stopped(&env, &config, NO_ENV);
    // Whatever the test runner's environment holds.
    d.unset_env("NIX_SSHOPTS");
    d.try_spawn().unwrap_or_else(|e| panic!("{e}"));
    let paths = add_text_paths(&env, 1, "connect");
    assert_eq!(d.request(&enqueue_line(&paths)), "ok 1");
    let failed = || !log_lines(&d, "next try in").is_empty();
    wait_until(secs(60), "nix copy failing by ssh's ConnectTimeout", failed);
    let failed = log_lines(&d, "next try in");
    let ssh_said = failed[0].contains("banner exchange");
    let timed_out = ssh_said && failed[0].contains("nix copy failed");
    assert!(timed_out, "not ssh's connect timeout: {failed:?}");
    assert!(log_lines(&d, "was killed").is_empty());
    assert!(hole.accepted.load(SeqCst) >= 1);
}

// --- Poison

/// One batch of good paths plus a garbage-collected path and a path the
/// target rejects (unsigned, to an ssh-ng receiver that requires
/// signatures): the good ones arrive, the collected one is dropped with a
/// warning, the rejected one backs off on its own and shows in `status`;
/// once signed, `retry` sends it.
#[test]
fn poison_paths_do_not_hold_back_good_ones() {
    let env = NixEnv::new("faults-poison");
    let (sk, pk) = env.gen_signing_key("faults-poison-1");
    let sshd = Sshd::start(&env, &pk);
    let paths = env.build_paths(7, "poison");
    let (good, rest) = paths.split_at(5);
    let (rejected, gone) = (rest[0].clone(), rest[1].clone());
    // The daemon has no key: the good paths are signed beforehand, the
    // rejected one is not.
    env.sign(&sk, good);
    let mut batch = good.to_vec();
    batch.insert(2, rejected.clone());
    batch.insert(4, gone.clone());
    let retry = [("retry-initial-delay", "0.05"), ("retry-max-delay", "0.5")];
    // Retried until the test mends it, however many attempts fail.
    let config = [("command-timeout", "60"), ("max-attempts", "0")];
    let config = [&[("upload-to", UNREACHABLE)][..], &retry, &config].concat();
    let mut d = Daemon::start_with_env(&env, &config, &sshd.env());
    assert_eq!(d.request(&enqueue_line(&batch)), "ok 7");
    d.kill9();
    run_ok(env.cmd("nix-store").arg("--delete").arg(&gone));
    d.set_config("upload-to", &sshd.url());
    d.try_spawn().unwrap();

    let recv = sshd.local_store_url();
    wait_until_ok(
        UPLOAD_TIMEOUT,
        "the good paths in the receiver",
        || env.verify_in_cache(&recv, &pk, good),
        || format!("sshd:\n{}", sshd.log()),
    );
    let rejected_s = rejected.display().to_string();
    // A failed `nix copy` may have copied good paths before it failed: wait
    // until the daemon itself has finished them.
    let left = || {
        let st = d.status();
        st.backoff.len() == 1 && st.backoff[0].contains(&rejected_s) && st.num("queued") == 1
    };
    wait_until(secs(30), "only the rejected path left, backing off", left);
    let st = d.status();
    assert!(refused_for_signature(&st.backoff[0]), "{:?}", st.backoff);
    assert_eq!(st.num("dropped"), 1, "{st:?}");
    assert_eq!(st.num("queued"), 1, "{st:?}");
    assert!(!env.is_valid_in(&recv, &rejected));
    // Bisection: once a path tried alone went through, one split of the
    // batch delivers every good path in that same round; from then on only
    // the rejected path backs off, alone. (Without the split, the rest of
    // the batch would back off together and trickle out one path a round.)
    let log = d.log();
    let split = |l: &&str| l.contains("splitting it to find the paths at fault");
    let splits = log.lines().filter(split).count();
    assert_eq!(splits, 1, "one split finds the rejected path:\n{log}");
    let failed = |l: &&str| l.contains("failed attempt");
    let after_split = log.lines().skip_while(|l| !split(l));
    let later: Vec<&str> = after_split.filter(failed).collect();
    // The canary, chosen at random, may be the rejected path itself: then
    // its lone failure comes before the split.
    let alone = |l: &&str| l.contains("1 path(s)") && l.contains(&rejected_s);
    let only = later.iter().all(alone);
    assert!(only, "after the split, only it, alone: {later:?}");
    let lone = log.lines().filter(failed).any(|l| alone(&l));
    assert!(lone, "the rejected path failed alone:\n{log}");
    let drops = log_lines(&d, "dropping");
    let one = drops.len() == 1 && drops[0].starts_with("warning:");
    let warned = one && drops[0].contains(&gone.display().to_string());
    assert!(warned, "one warning about the collected path: {drops:?}");

    // Fix the path, ask for a retry: it goes through.
    let fixed = std::slice::from_ref(&rejected);
    env.sign(&sk, fixed);
    assert_eq!(d.request("retry"), "ok 1");
    wait_verified(&env, &recv, &pk, fixed, "after retry");
}

// --- Daemon down

/// Builds succeed while the daemon is away — never started, killed (stale
/// socket file), or stopped with SIGSTOP (no acknowledgement in time) — and
/// the hook says it spooled the paths; they all arrive once the daemon runs.
/// With a spool directory that cannot exist, the build still succeeds and
/// the hook says the paths are NOT queued.
#[test]
fn builds_succeed_while_daemon_is_away_and_spool_is_delivered() {
    let env = NixEnv::new("faults-away");
    let (sk, pk) = env.gen_signing_key("faults-away-1");
    let (upload, read) = file_cache(&env, "cache");
    let sk = sk.display().to_string();
    let config = [("signing-key-file", sk.as_str()), ("upload-to", &upload)];
    let mut d = Daemon::new_stopped(&env, &config, NO_ENV);
    // Two builds with the hook (its environment and `extra`), each hook
    // saying `said` in its one line: their outputs.
    let build = |d: &Daemon, tag: &str, extra: &[(&str, &str)], said: &str| {
        let mut envs = d.hook_env();
        envs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let b = env.build(2, tag, Some(&hook_bin()), &envs);
        assert!(b.status.success(), "build failed: {}", b.stderr);
        let lines = b.hook_lines();
        assert_eq!(lines.len(), 2, "one hook line per build: {lines:?}");
        assert!(lines.iter().all(|l| l.contains(said)), "{lines:?}");
        b.out_paths
    };
    let spooled = "spooled the paths to";

    // Never started: no socket file.
    let mut built = build(&d, "never", &[], spooled);
    d.try_spawn().unwrap();
    // Killed: the socket file is left behind, nobody accepts.
    d.kill9();
    assert!(d.socket().exists(), "kill -9 should leave the socket file");
    built.extend(build(&d, "killed", &[], spooled));
    // Frozen: the connection is accepted by the kernel, no reply comes.
    d.try_spawn().unwrap();
    let pid = d.pid().unwrap().to_string();
    run_ok(Command::new("kill").args(["-STOP", &pid]));
    built.extend(build(&d, "frozen", &[("NPBHQ_TIMEOUT", "1")], spooled));
    run_ok(Command::new("kill").args(["-CONT", &pid]));
    wait_verified(&env, &read, &pk, &built, "built while away");
    let empty = || fs::read_dir(d.spool_dir()).map_or(0, |r| r.count()) == 0;
    wait_until(secs(10), "an empty spool", empty);

    // No daemon and no spool: the build still succeeds, the hook says so.
    d.kill9();
    let not_a_dir = env.root().join("regular-file");
    fs::write(&not_a_dir, "").unwrap();
    let spool = not_a_dir.join("spool").display().to_string();
    build(&d, "nospool", &[("NPBHQ_SPOOL_DIR", &spool)], "NOT queued");
}

/// Spool files the hook did not write: each is queued once and nothing in
/// one is lost without a word. A file with a line over the 1 MiB limit has
/// its other paths delivered and is set aside as `.bad`, unchanged, with a
/// warning. A file whose last line has no line end yet is left alone until
/// its writer finishes it. A file the daemon cannot delete (a read-only
/// spool directory) is delivered once, not again at every idle look.
#[test]
fn spool_files_set_aside_unfinished_or_undeletable_are_never_lost_or_repeated() {
    let env = NixEnv::new("faults-spool");
    let (upload, read) = file_cache(&env, "cache");
    let p = add_text_paths(&env, 7, "spool");
    let s = strs(&p);
    let rw = env.root().join("spool-rw");
    fs::create_dir_all(&rw).unwrap();
    let rw_s = rw.display().to_string();
    let mut d = Daemon::start(&env, &[("upload-to", &upload), ("spool-dir", &rw_s)]);
    let put = |file: &str, text: &str| fs::write(rw.join(file), text).unwrap();
    let line = |i: usize| format!("enqueue {}\n", s[i]);
    // Waits until `paths` are in the cache and the daemon counted at least
    // `total` uploads since it started (it counts a batch once the batch is
    // done, a moment after the copy); returns its count then.
    let uploaded = |d: &Daemon, paths: &[PathBuf], total: u64| {
        wait_in_cache(&env, &read, paths);
        let counted = || {
            let st = d.status();
            st.num("uploaded") >= total && st.num("queued") == 0
        };
        wait_until(secs(30), "the uploads counted, the queue empty", counted);
        d.status().num("uploaded")
    };

    // A line over the limit between two good ones.
    let long = format!("enqueue {}\n", s[0].repeat(1024 * 1024 / s[0].len() + 1));
    let with_long = format!("{}{long}{}", line(0), line(1));
    put("1-1.req", &with_long);
    uploaded(&d, &p[..2], 2);
    let bad = fs::read(rw.join("1-1.bad")).ok();
    let unchanged = bad.as_deref() == Some(with_long.as_bytes());
    assert!(unchanged, "the file with the long line set aside unchanged");
    let said = log_lines(&d, "1-1.req");
    let one = said.len() == 1 && said[0].starts_with("warning:");
    let named = one && said[0].contains("line 2");
    assert!(named, "one warning naming the long line: {said:?}");

    // A file being written, cut in the middle of its second path, and a
    // finished one after it: once the finished one is delivered, the daemon
    // has looked at the cut one, and queued nothing of it.
    let cut = format!("{}enqueue {}", line(2), &s[3][..s[3].len() - 5]);
    put("2-1.req", &cut);
    put("3-1.req", &line(4));
    // Spooled in that order, a path of the cut file would have been done
    // with or before this one.
    assert_eq!(uploaded(&d, &p[4..5], 3), 3);
    let left = rw.join("2-1.req").exists();
    assert!(left, "a file being written was taken");
    assert!(all_in_cache(&env, &read, &p[2..3]).is_err());
    // Its writer finishes it.
    put("2-1.req", &(line(2) + &line(3)));
    uploaded(&d, &p[2..4], 5);
    assert!(!rw.join("2-1.req").exists());

    // A read-only view of the spool: nothing in it can be deleted.
    let ro = env.root().join("spool-ro");
    let _view = Mount::bind_read_only(&rw, &ro);
    d.set_config("spool-dir", &ro.display().to_string());
    d.restart();
    put("4-1.req", &line(5));
    uploaded(&d, &p[5..6], 1);
    // A later file: delivered only after the daemon looked again at the
    // one it could not delete.
    put("5-1.req", &line(6));
    // Read again in that pass before the later file, the undeletable one
    // would have been done with or before it.
    let count = uploaded(&d, &p[6..7], 2);
    let st = d.status();
    assert_eq!(count, 2, "an undeletable file delivered again: {st:?}");
    let warned = log_lines(&d, "4-1.req");
    let once = warned.len() == 1 && warned[0].contains("cannot be removed");
    assert!(once, "one warning for the file that stays: {warned:?}");
    d.kill9();
}

// --- Torn journal

/// A journal cut at every byte offset of its last record: the real daemon
/// starts, cuts the torn bytes off the file, and keeps every earlier record
/// (`status` shows them queued).
#[test]
fn torn_journal_at_every_offset_of_last_record_replays() {
    let env = NixEnv::new("faults-torn");
    let p = env.build_paths(5, "torn");
    let s = strs(&p);
    // Fewer dead records (2) than live ones, so replay does not compact and
    // the file itself shows what replay kept.
    let live = |i: usize| format!("+ 170000000{i} {}\n", s[i]);
    let dead = format!("- {}\n", s[0]);
    let full = [live(0), live(1), dead, live(2), live(3), live(4)].concat();
    let last_start = full[..full.len() - 1].rfind('\n').unwrap() + 1;
    // A failing target: nothing leaves the queue while we look.
    let mut d = Daemon::new_stopped(&env, &[("upload-to", UNREACHABLE)], NO_ENV);
    fs::create_dir_all(d.state_dir()).unwrap();
    let journal = d.journal_path();
    for cut in last_start..=full.len() {
        fs::write(&journal, &full[..cut]).unwrap();
        let log_before = d.log().len();
        let started = d.try_spawn();
        started.unwrap_or_else(|e| panic!("cut at {cut}: daemon did not start: {e}"));
        let expected = if cut == full.len() { 4 } else { 3 };
        let (st, log) = (d.status(), &d.log()[log_before..]);
        assert_eq!(st.num("queued"), expected, "cut at {cut}: {st:?}\n{log}");
        d.kill9();
        let kept = fs::read_to_string(&journal).unwrap();
        let torn = cut != full.len() && cut != last_start;
        if torn {
            assert_eq!(kept, full[..last_start], "cut at {cut}: torn bytes left");
            let warning = format!("torn last record of {} bytes", cut - last_start);
            assert!(log.contains(&warning), "cut at {cut}: no warning\n{log}");
        } else {
            assert_eq!(kept, full[..cut], "cut at {cut}: intact journal changed");
        }
    }
}

/// A start with another store directory (here `/nix/store`, as a daemon
/// started without `NIX_STORE_DIR` would use) must not erase the journal of
/// the private store: the daemon exits 1 with one line naming the store
/// directory the journal holds, the file is unchanged byte for byte, and a
/// start with the right store directory delivers every path.
#[test]
fn start_with_another_store_dir_refuses_and_keeps_the_journal() {
    let env = NixEnv::new("faults-storedir");
    let paths = add_text_paths(&env, 3, "storedir");
    // A failing target: the paths stay queued, and the journal gets dead
    // records too (so a start would want to compact it).
    let mut d = Daemon::start(&env, &[("upload-to", UNREACHABLE)]);
    assert_eq!(d.request(&enqueue_line(&paths)), "ok 3");
    // Three paths done as well: more dead records than live ones, so a
    // start that could not read them would compact them away.
    let done = add_text_paths(&env, 3, "storedir-done");
    assert_eq!(d.request(&enqueue_line(&done)), "ok 3");
    d.kill9();
    let journal = d.journal_path();
    let mut text = fs::read_to_string(&journal).unwrap();
    for p in &done {
        text.push_str(&format!("- {}\n", p.display()));
    }
    fs::write(&journal, text).unwrap();
    let before = fs::read(&journal).unwrap();
    let store = env.store_dir().display().to_string();

    d.set_config("store-dir", "/nix/store");
    let log_before = d.log().len();
    let err = d.try_spawn().expect_err("started with another store dir");
    assert!(err.contains("exit status: 1"), "{err}");
    let log = d.log();
    let said = log[log_before..].lines().filter(|l| !l.trim().is_empty());
    let said: Vec<&str> = said.collect();
    assert_eq!(said.len(), 1, "one line: {said:?}");
    let ours = said[0].contains(&format!("store-dir = {store}"));
    assert!(ours && said[0].contains("/nix/store"), "{said:?}");
    assert_eq!(fs::read(&journal).unwrap(), before, "the journal changed");

    let (upload, read) = file_cache(&env, "cache");
    d.set_config("store-dir", &store);
    d.set_config("upload-to", &upload);
    d.try_spawn().unwrap();
    wait_in_cache(&env, &read, &paths);
}

/// The acknowledgement is durable: under strace, every `ok` the daemon
/// writes to a client follows the completed fdatasync of the journal file
/// the path's record was written to. (A `kill -9` keeps the page cache, so
/// no crash test notices a missing sync; the order of the system calls
/// does.)
#[test]
fn ok_is_written_only_after_the_journal_record_is_synced() {
    let env = NixEnv::new("faults-strace");
    let paths = add_text_paths(&env, 3, "strace");
    let traced = "fdatasync,fsync,write,writev,sendto,sendmsg";
    let calls = under_strace(&env, NO_ENV, traced, |d| {
        for p in &paths {
            let one = enqueue_line(std::slice::from_ref(p));
            assert_eq!(try_ask(&d.socket(), &one), Ok("ok 1".to_string()));
        }
    });
    let write = |c: &Call| matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg");
    for p in strs(&paths) {
        let record = |c: &Call| write(c) && c.text().starts_with("+ ") && c.text().contains(&p);
        let wrote = calls.iter().position(record);
        let wrote = wrote.unwrap_or_else(|| panic!("no journal write of {p}: {calls:?}"));
        let journal_fd = calls[wrote].fd();
        let ok = |c: &Call| write(c) && c.text().starts_with("ok 1\\n") && c.fd() != journal_fd;
        let acked = (wrote..calls.len()).find(|&i| ok(&calls[i]));
        let acked = acked.unwrap_or_else(|| panic!("no ok after the record of {p}: {calls:?}"));
        // A sync of the journal's descriptor that started after the record
        // was written and returned before the ok was written.
        let sync = |c: &Call| matches!(c.name.as_str(), "fdatasync" | "fsync");
        let synced_before = |c: &Call| sync(c) && c.fd() == journal_fd && c.ok() && c.end <= acked;
        let synced = calls[wrote..acked].iter().any(synced_before);
        let between = &calls[wrote..=acked];
        assert!(synced, "the ok for {p} before a sync: {between:?}");
    }
}

// --- Full disk

/// With the state directory on a full file system the daemon answers `err`
/// with the reason instead of acknowledging, keeps running (and restarts)
/// and works again once there is space; every path it did acknowledge
/// arrives.
#[test]
fn full_disk_refuses_with_reason_and_recovers() {
    let env = NixEnv::new("faults-full");
    let mount = Mount::tmpfs(&env.root().join("statefs"), "64k");
    let (sk, pk) = env.gen_signing_key("faults-full-1");
    let (upload, read) = file_cache(&env, "cache");
    let state = mount.0.join("state");
    let state = ("state-dir", state.to_str().unwrap());
    let config = [state, ("retry-initial-delay", "0.05")];
    let mut d = signing(&env, (&sk, &upload), &config, NO_ENV);
    // Some history first: 40 paths uploaded and journaled as done, so the
    // journal holds dead records that a restart wants to compact away.
    let first = add_text_paths(&env, 40, "full-first");
    assert_eq!(d.request(&enqueue_line(&first)), "ok 40");
    let mut acked = first.clone();
    wait_verified(&env, &read, &pk, &first, "the first paths uploaded");
    wait_drained(&d);

    let filler = mount.0.join("filler");
    fill(&filler);
    let more = add_text_paths(&env, 200, "full");
    let (next, refusal) = (0..more.len())
        .map(|i| (i, d.request(&enqueue_line(&more[i..i + 1]))))
        .find(|(_, r)| !r.starts_with("ok"))
        .expect("every enqueue was acknowledged on a full disk");
    acked.extend_from_slice(&more[..next]);
    let said = refusal.starts_with("err ") && refusal.contains("No space left on device");
    assert!(said, "{refusal}");
    assert!(d.is_running());
    assert!(d.request("ping").starts_with("ok"));
    let st = d.status();
    assert!(!st.fields.is_empty(), "status on a full disk: {st:?}");

    // The hook in a build on the full disk: refused, cannot spool, says so;
    // the build succeeds.
    let b = env.build(1, "full-hook", Some(&hook_bin()), &d.hook_env());
    assert!(b.status.success(), "{}", b.stderr);
    let lines = b.hook_lines();
    let not_queued = lines.len() == 1 && lines[0].contains("NOT queued");
    assert!(not_queued, "{lines:?}");
    let leftovers = spooled(&d.spool_dir());
    assert!(leftovers.is_empty(), "left in the spool: {leftovers:?}");

    // A crash while the disk is full: the daemon comes back (replay wants to
    // compact the journal and cannot, which must not stop it).
    d.kill9();
    let log_before = d.log().len();
    let back = d.try_spawn();
    back.unwrap_or_else(|e| panic!("the daemon does not start on a full disk: {e}"));
    let log = &d.log()[log_before..];
    assert!(log.contains("journal: cannot compact"), "{log}");
    let refused = d.request(&enqueue_line(&more[next..next + 1]));
    assert!(refused.starts_with("err "), "{refused}");

    // Space returns: everything is accepted and arrives.
    fs::remove_file(&filler).unwrap();
    let rest = &more[next..];
    for chunk in rest.chunks(50) {
        let ok = format!("ok {}", chunk.len());
        assert_eq!(d.request(&enqueue_line(chunk)), ok);
    }
    acked.extend_from_slice(rest);
    wait_verified(&env, &read, &pk, &acked, "every acked path");
    d.kill9();
}
