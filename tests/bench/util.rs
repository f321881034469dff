//! Helpers shared by the figures: run sizes, well-formed fake store paths, a
//! raw protocol client, timed process runs, and a daemon process whose start
//! is timed to the sub-millisecond (the harness's `Daemon` polls every 20 ms).

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{kill_tree, write_script, Daemon, NixEnv};

/// How much work each figure does: the full benchmark (`cargo bench`) or the
/// quick mode `cargo test` runs so that the benchmark cannot rot. Each size
/// is explained where [`Mode::new`] sets it.
#[derive(Debug, Clone)]
pub struct Mode {
    pub quick: bool,
    pub hook_runs: usize,
    pub burst_runs: usize,
    pub burst_paths: usize,
    pub build_rounds: usize,
    pub build_drvs: usize,
    pub inline_rounds: usize,
    pub drain_rounds: usize,
    pub drain_paths: usize,
    pub drain_bs1_paths: usize,
    pub clients: usize,
    pub per_client: usize,
    pub enqueue_rounds: usize,
    pub idle_rounds: usize,
    pub big_queue: usize,
    pub restart_rounds: usize,
    pub hang_paths: usize,
    pub hang_timeout: Duration,
    pub compact_records: usize,
    pub hook_samples: usize,
    pub spool_files: usize,
    pub status_samples: usize,
    pub wait_rounds: usize,
}

impl Mode {
    /// The sizes for the full benchmark or the quick mode.
    pub fn new(quick: bool) -> Mode {
        // Each size as (quick, full).
        let n = |q: usize, f: usize| if quick { q } else { f };
        Mode {
            quick,
            // Timed runs per hook variant (after warm-up runs).
            hook_runs: n(20, 1000),
            // Timed runs of the burst, and the paths in it.
            burst_runs: n(3, 30),
            burst_paths: 1000,
            // Rounds of the build-loop comparison: on a busy 2-core VM single
            // ratios spread by up to +-30%; the table shows the median's 95%
            // confidence interval (with 41 rounds the 14th to the 28th ratio).
            build_rounds: n(1, 41),
            // Derivations per `nix-build` call.
            build_drvs: n(5, 50),
            // Rounds that also build with the (slow) inline hook.
            inline_rounds: n(1, 3),
            drain_rounds: n(1, 5),
            // Paths drained with the default batch size (and by bare nix),
            // and with `batch-size = 1` (its rate is per call, so fewer paths
            // give the same figure in less time).
            drain_paths: n(30, 1000),
            drain_bs1_paths: n(5, 100),
            // Concurrent clients of the enqueue figure; connections (one path
            // each) per client and round.
            clients: 16,
            per_client: n(10, 500),
            enqueue_rounds: n(1, 5),
            idle_rounds: n(1, 15),
            // Paths in the big queue (memory and restart figures).
            big_queue: n(5_000, 100_000),
            restart_rounds: n(2, 7),
            // Paths timed to a healthy target beside a hung one (and alone),
            // and the hung target's `command-timeout`.
            hang_paths: n(2, 7),
            hang_timeout: Duration::from_secs(n(2, 10) as u64),
            // Records of the journal that is compacted, and hook runs timed on
            // the idle daemon.
            compact_records: n(5_000, 100_000),
            hook_samples: n(5, 100),
            // Spool files `status` counts, and timed `status` requests per
            // spool size.
            spool_files: n(200, 10_000),
            status_samples: n(3, 15),
            // Rounds of `build && wait`.
            wait_rounds: n(1, 9),
        }
    }
}

const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
static FAKE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn base32(mut x: u64, len: usize) -> String {
    let mut s = vec![b'0'; len];
    for c in s.iter_mut().rev() {
        *c = NIX_BASE32[(x % 32) as usize];
        x /= 32;
    }
    String::from_utf8(s).expect("ASCII")
}

/// `n` distinct paths that pass the daemon's validation (`<store>/<32
/// nix-base32>-<name>`) but do not exist in the store. Never repeated within
/// a run, so every enqueue is new and costs a journal sync.
pub fn fake_paths(store: &Path, n: usize) -> Vec<String> {
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 40);
    let first = FAKE_COUNTER.fetch_add(n as u64, Ordering::SeqCst);
    (first..first + n as u64)
        .map(|i| {
            format!(
                "{}/{}{}-npbhq-bench-{i}",
                store.display(),
                base32(run, 12),
                base32(i, 20)
            )
        })
        .collect()
}

/// Adds `n` small files to the store in one `nix-store --add` call and
/// returns their (real, valid) store paths.
pub fn add_store_paths(env: &NixEnv, n: usize) -> Vec<String> {
    let dir = env.root().join("files");
    fs::create_dir_all(&dir).expect("create files dir");
    let file = |i| {
        let f = dir.join(format!("bench-file-{i}"));
        let text = format!("benchmark file {i} {}\n", crate::common::unique_id());
        fs::write(&f, text).expect("write bench file");
        f
    };
    let files: Vec<PathBuf> = (0..n).map(file).collect();
    let out = crate::common::run_ok(env.cmd("nix-store").arg("--add").args(&files));
    let paths: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(paths.len(), n, "nix-store --add printed {paths:?}");
    paths
}

/// A raw protocol connection (the bench's own client, not the hook's).
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    /// Connects to the daemon's socket.
    pub fn open(socket: &Path) -> io::Result<Conn> {
        let writer = UnixStream::connect(socket)?;
        writer.set_read_timeout(Some(Duration::from_secs(120)))?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Conn { reader, writer })
    }

    /// Sends one request line and returns every reply line up to and
    /// including the final `ok`/`err` line.
    pub fn request(&mut self, line: &str) -> io::Result<Vec<String>> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if self.reader.read_line(&mut l)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {lines:?}"),
                ));
            }
            let l = l.trim_end().to_string();
            let last = l == "ok" || l.starts_with("ok ") || l.starts_with("err");
            lines.push(l);
            if last {
                return Ok(lines);
            }
        }
    }

    /// `enqueue` of `paths` in one line; returns N of `ok N`, panics on `err`.
    pub fn enqueue(&mut self, paths: &[String]) -> usize {
        let line = format!("enqueue {}", paths.join(" "));
        let reply = self.request(&line).expect("enqueue request");
        let last = reply.last().cloned().unwrap_or_default();
        last.strip_prefix("ok ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("enqueue refused: {last}"))
    }

    /// The numbers of the daemon's `status json`, as key/value pairs
    /// (`_` in a key read as `-`).
    pub fn status(&mut self) -> Vec<(String, String)> {
        let lines = self.request("status json").expect("status request");
        let json = lines.first().map(String::as_str).unwrap_or("");
        json.split('"')
            .collect::<Vec<_>>()
            .windows(2)
            .filter_map(|w| {
                let value = w[1].strip_prefix(':')?;
                let end = value
                    .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
                    .unwrap_or(value.len());
                (end > 0).then(|| (w[0].replace('_', "-"), value[..end].to_string()))
            })
            .collect()
    }

    /// One numeric field of `status`.
    pub fn status_number(&mut self, key: &str) -> u64 {
        self.status()
            .into_iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("status has no number {key}"))
    }
}

/// Polls the daemon until nothing is queued or in flight; returns how long
/// that took from `since`. Panics after `bound` (a correctness bound).
/// Every 10 ms: each `status` takes CPU from the nix calls being measured,
/// and 10 ms is a small part of a 1,000-path drain.
pub fn wait_drained(conn: &mut Conn, since: Instant, bound: Duration) -> Duration {
    loop {
        let st = conn.status();
        let get = |k: &str| {
            st.iter()
                .find(|(key, _)| key == k)
                .and_then(|(_, v)| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        if get("queued") == 0 && get("in-flight") == 0 {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < bound,
            "queue not drained within {bound:?}: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wall time of one run of `cmd` (spawn to exit); panics unless it exits 0.
pub fn time_run(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let took = start.elapsed();
    assert!(status.success(), "{cmd:?} failed: {status}");
    took.as_secs_f64() * 1000.0
}

/// A daemon process started by the bench itself, so that the time from
/// `exec` until the socket accepts is measured precisely. Killed with its
/// whole process tree on drop.
pub struct DaemonProc {
    pub child: Child,
}

impl DaemonProc {
    /// Starts the daemon with `d`'s config file (prepared with
    /// [`Daemon::new_stopped`]) and the environment of `env`; returns it
    /// and the milliseconds until its socket accepted.
    pub fn start(env: &NixEnv, d: &Daemon) -> (DaemonProc, f64) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.log_path())
            .expect("open daemon log");
        let mut cmd = env.cmd(crate::common::daemon_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(d.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let socket = d.socket();
        let start = Instant::now();
        let mut child = cmd.spawn().expect("spawn daemon");
        loop {
            if UnixStream::connect(&socket).is_ok() {
                let took = start.elapsed().as_secs_f64() * 1000.0;
                return (DaemonProc { child }, took);
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("daemon exited ({st}); log:\n{}", d.log());
            }
            if start.elapsed() > Duration::from_secs(30) {
                kill_tree(child.id());
                let _ = child.wait();
                panic!("daemon did not accept within 30 s; log:\n{}", d.log());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Peak resident memory (`VmHWM`) of process `pid` in MiB.
pub fn vm_hwm_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024.0
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }
}

/// A directory with `nix` and `nix-store` wrappers that sleep for an hour
/// before running the real program ("nix-delay-wrapper"): a daemon using it
/// keeps its queue, which the memory and restart figures need. The check
/// of the target at start (`nix --version`, then `nix store ping` or `info`)
/// runs at once, as it would with a local cache, so that the daemon starts
/// as it does in production.
pub fn nix_delay_wrapper(env: &NixEnv) -> PathBuf {
    let dir = env.root().join("nix-delay-wrapper");
    fs::create_dir_all(&dir).expect("create wrapper dir");
    for prog in ["nix", "nix-store"] {
        write_script(
            &dir.join(prog),
            &format!(
                "#!/bin/sh\n# nix-delay-wrapper: hold the daemon's nix calls so its queue stays full.\n\
                 case \" $* \" in *\" store ping \"* | *\" store info \"* | \" --version \") exec {prog} \"$@\" ;; esac\n\
                 sleep 3600\nexec {prog} \"$@\"\n"
            ),
        );
    }
    dir.join("nix")
}

/// A daemon as in production (signing with `sk`, uploading to the
/// `file://` cache `cache` under `env`) whose nix calls a
/// [`nix_delay_wrapper`] holds, so that its queue stays as made.
pub fn held_daemon(env: &NixEnv, sk: &Path) -> Daemon {
    let cache = format!("file://{}", env.root().join("cache").display());
    let wrapper = nix_delay_wrapper(env).display().to_string();
    let sk = sk.display().to_string();
    let config = [
        ("signing-key-file", sk.as_str()),
        ("upload-to", &cache),
        ("nix", &wrapper),
    ];
    Daemon::start(env, &config)
}

/// What finished figures leave on disk, deleted only when the benchmark
/// ends. On ext4 without a journal (as here), creating files soon after
/// many were deleted is slower: the allocator skips recently freed inodes.
/// Deleting each figure's files as it ends would charge its clean-up to the
/// figures after it.
static KEPT: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>> =
    std::sync::Mutex::new(Vec::new());

/// Keeps `files` (a store, a temporary directory) until [`delete_kept`].
pub fn keep_until_the_end<T: Send + 'static>(files: T) {
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Box::new(files));
}

/// Deletes what [`keep_until_the_end`] kept.
pub fn delete_kept() {
    KEPT.lock().unwrap_or_else(|e| e.into_inner()).clear();
}
