//! The daemon: recovery, the listener, a thread per client (journaling paths before acknowledging
//! them); `retry`, `requeue` and `drop` only from root and the daemon's user (peer credentials).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::ErrorKind::{TimedOut, WouldBlock};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::journal::{GivenUp, Journal, TargetId, FILE_NAME};
use crate::protocol::{final_line, one_line, parse_request, shorten, too_long, Request};
use crate::protocol::{ERR_BUSY, ERR_JOURNAL, ERR_STOPPING, ERR_WORKER_GONE, MAX_LINE};
use crate::status::{self, Shared, Snapshot};
use crate::store_path::StorePath;
use crate::target::{self, Target};
use crate::worker::{self, Msg};
use crate::{error, info, redact, sys, systemd, warning};

/// Longest a client may take to send one request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop waits for the nix calls in progress.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Names the private directories the socket is bound in.
const PRIVATE_PREFIX: &str = ".post-build-hook-queue-";

/// Why the daemon could not start.
#[derive(Debug)]
pub enum ServeError {
    /// The configuration can never work (exit 78).
    Config(String),
    /// Something a restart may get past (exit 1): journal I/O, a locked state-dir, a socket in use.
    Transient(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ServeError::Config(why) | ServeError::Transient(why)) = self;
        f.write_str(why)
    }
}

fn transient(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ServeError {
    move |e| ServeError::Transient(format!("{what}: {e}"))
}

/// What every connection thread shares.
struct Context {
    config: Config,
    journal: Arc<Journal>,
    shared: Arc<Shared>,
    tx: Sender<Msg>,
    targets: Vec<Target>,
}

/// Runs the daemon: returns only if it cannot start; a signal stops it.
pub fn serve(config: Config) -> Result<(), ServeError> {
    // Before any thread starts, so that only the stop thread sees them.
    sys::block_stop_signals().map_err(transient("cannot block SIGTERM and SIGINT"))?;
    let activated = systemd::listener_from_env()
        .map_err(transient("cannot use the socket passed by systemd"))?;
    // Before anything can fail and quote the target.
    config.upload_to.iter().for_each(|u| redact::remember(u));
    // One daemon per journal: a flock on the state-dir's `lock` (our pid), gone when we are.
    let dir = &config.state_dir;
    let err = || transient(format!("cannot lock the state-dir {}", dir.display()));
    fs::create_dir_all(dir).map_err(err())?;
    let mut open = fs::OpenOptions::new();
    open.read(true).write(true).create(true).truncate(false);
    let lock = open.mode(0o644).open(dir.join("lock")).map_err(err())?;
    match lock.try_lock() {
        Err(fs::TryLockError::WouldBlock) => {
            let pid = fs::read_to_string(dir.join("lock")).unwrap_or_default();
            let (dir, pid) = (dir.display(), pid.trim());
            let why = format!("state-dir {dir} is in use by another daemon (pid {pid}); stop it");
            return Err(ServeError::Transient(why + " or choose another state-dir"));
        }
        result => result.map_err(io::Error::from).map_err(err())?,
    }
    // Padded over whatever pid was there, so that no truncate is needed.
    let pid = format!("{:<10}\n", std::process::id());
    std::os::unix::fs::FileExt::write_all_at(&lock, pid.as_bytes(), 0).map_err(err())?;
    let journal_error = format!("cannot open the journal in {}", config.state_dir.display());
    let (journal, torn) =
        Journal::open(&config.state_dir, &config.store_dir).map_err(transient(journal_error))?;
    // After the journal, whose refusal matters more; before the socket.
    target::check_at_start(&config).map_err(ServeError::Config)?;
    if torn > 0 {
        warning!("journal: cut off a torn last record of {torn} bytes (a crash during a write)");
    }
    let (file, n) = (config.state_dir.join(FILE_NAME), journal.len());
    info!("journal {} replayed: {n} paths queued", file.display());
    // Ours: a hook running as root writes into it, we delete what we ingested.
    let spool = config.spool_dir();
    if let Err(e) = fs::create_dir_all(&spool) {
        warning!("cannot create the spool directory {}: {e}", spool.display());
    }
    let targets = target::configured(&config);
    let (settled, to_upload, given_up) =
        journal.recover(&targets.iter().map(|t| t.id).collect::<Vec<_>>());
    if settled > 0 {
        info!("journal: {settled} paths every target has already are done");
    }
    if given_up > 0 {
        warning!(
            "{given_up} paths were given up on after repeated failures and are not tried again; \
             see `post-build-hook-queue status`, then requeue or drop them"
        );
    }
    let (tx, rx) = mpsc::channel();
    if !to_upload.is_empty() {
        let _ = tx.send(Msg::Queued(to_upload));
    }
    let own_socket = activated.is_none();
    let (listener, waiting) = match activated {
        Some(passed) => passed,
        None => (bind(&config)?, None),
    };
    let (journal, shared) = (Arc::new(journal), Arc::new(Shared::new(&targets)));
    let (c, j, s) = (config.clone(), Arc::clone(&journal), Arc::clone(&shared));
    let worker = spawn("worker", move || worker::run(&c, j, s, rx))?;
    let labels: Vec<&str> = targets.iter().map(|t| t.label.as_str()).collect();
    let to = match targets.as_slice() {
        [t] if matches!(t.kind, target::Kind::SignOnly) => "(none)".into(),
        _ => labels.join(", "),
    };
    let signing = config.signing_key_file.as_ref().map_or("off", |_| "on");
    let store = &config.store_dir;
    info!("ready: store {store}, signing {signing}, upload to {to}");
    let ctx = Arc::new(Context {
        config,
        journal,
        shared,
        tx,
        targets,
    });
    if let Some(file) = ctx.config.metrics_file.clone() {
        let ctx = Arc::clone(&ctx);
        let mut failing = false;
        spawn("metrics", move || loop {
            let result = status::write_atomically(&file, &snapshot(&ctx).prometheus());
            if let (Err(e), false) = (&result, failing) {
                warning!("cannot write metrics file {}: {e}", file.display());
            }
            failing = result.is_err();
            std::thread::sleep(Duration::from_secs(5));
        })?;
    }
    let stopper = Arc::clone(&ctx);
    spawn("stop", move || stop_on_signal(&stopper, worker, own_socket))?;
    if let Err(e) = systemd::notify("READY=1") {
        warning!("cannot notify systemd of readiness: {e}");
    }
    // A thread per connection, refused while stopping or past `max-connections` (counted by `ctx`).
    let others = Arc::strong_count(&ctx);
    for accepted in waiting.into_iter().map(Ok).chain(listener.incoming()) {
        let Ok(mut stream) = accepted.inspect_err(|e| error!("accept failed: {e}")) else {
            // Out of descriptors, say: wait for connections to end.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let stopping = ctx.shared.stopping.load(SeqCst);
        if stopping || Arc::strong_count(&ctx) - others >= ctx.config.max_connections {
            let why = if stopping { ERR_STOPPING } else { ERR_BUSY };
            // A fresh connection's buffer takes one line without waiting.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(final_line(Err(why)).as_bytes());
            continue;
        }
        let ctx = Arc::clone(&ctx);
        let serve = move || handle(&ctx, &stream);
        let thread = std::thread::Builder::new().name("conn".into());
        // A small stack (reads go to the heap); if it fails, the client sees the connection close.
        if let Err(e) = thread.stack_size(64 * 1024).spawn(serve) {
            warning!("cannot start a connection thread: {e}");
        }
    }
    unreachable!("a listener's incoming() never ends")
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ServeError> {
    let builder = std::thread::Builder::new().name(name.into());
    builder.spawn(f).map_err(transient("cannot start a thread"))
}

/// Binds the socket path (replacing only a stale socket) in a private 0700 directory beside it,
/// reached as `/proc/self/fd/N/s` (short for any path), then renames it into place, never looser.
fn bind(config: &Config) -> Result<UnixListener, ServeError> {
    let path = &config.socket;
    let fail = |why: &str| Err(ServeError::Transient(format!("{} {why}", path.display())));
    if UnixStream::connect(path).is_ok() {
        return fail("has another daemon listening; stop it or choose another --socket");
    }
    if fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_socket()) {
        return fail("exists and is not a socket; refusing to replace it");
    }
    let parent = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let err = || transient(format!("cannot listen on {}", path.display()));
    fs::create_dir_all(parent).map_err(err())?;
    // Private directories of ours a daemon killed while binding left (a minute old).
    let old = |t: std::time::SystemTime| t.elapsed().is_ok_and(|age| age.as_secs() > 60);
    // Not through a symlink: an entry's `metadata` does not follow it.
    let ours = |m: fs::Metadata| m.is_dir() && m.uid() == sys::uid() && m.modified().is_ok_and(old);
    for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(PRIVATE_PREFIX) && entry.metadata().is_ok_and(ours) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    // Keyed from the operating system's random source: others cannot guess it.
    let random = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0);
    let private = parent.join(format!("{PRIVATE_PREFIX}{random:016x}"));
    let setup = || -> io::Result<UnixListener> {
        fs::DirBuilder::new().mode(0o700).create(&private)?;
        let dir = fs::File::open(&private)?;
        let meta = dir.metadata()?;
        if !meta.is_dir() || meta.uid() != sys::uid() || meta.mode() & 0o077 != 0 {
            let why = format!("{} was replaced during the bind", private.display());
            return Err(io::Error::other(why));
        }
        let tmp = PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()));
        let result = UnixListener::bind(&tmp).and_then(|l| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(config.socket_mode))?;
            if let Some(group) = &config.socket_group {
                std::os::unix::fs::chown(&tmp, None, Some(group_id(group)?))?;
            }
            fs::rename(&tmp, path).map(|()| l)
        });
        let _ = fs::remove_file(&tmp);
        result
    };
    let result = setup();
    // `rmdir` removes nothing else (not a file, not through a symlink).
    let _ = fs::remove_dir(&private);
    let listener = result.map_err(err())?;
    let (shown, mode) = (path.display(), config.socket_mode);
    info!("listening on {shown} (mode {mode:04o})");
    Ok(listener)
}

/// Resolves a group name (from /etc/group) or number.
fn group_id(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let text = fs::read_to_string("/etc/group")?;
    let mut entries = text.lines().map(|l| l.split(':').collect::<Vec<_>>());
    let entry = entries.find(|f| f.first() == Some(&group) && f.len() > 2);
    let gid = entry.and_then(|f| f[2].parse().ok());
    gid.ok_or_else(|| io::Error::other(format!("socket-group {group:?}: not in /etc/group")))
}

fn snapshot(ctx: &Context) -> Snapshot {
    let signing = ctx.config.signing_key_file.is_some();
    Snapshot::take(&ctx.journal, &ctx.shared, &ctx.config.spool_dir(), signing)
}

/// The one way to stop (SIGTERM, SIGINT): refuse new work, give nix calls a grace period, exit.
fn stop_on_signal(ctx: &Context, worker: JoinHandle<()>, own_socket: bool) {
    let sig = match sys::wait_for_stop_signal() {
        Ok(sig) => sig,
        Err(e) => return error!("cannot wait for signals: {e}; stop the daemon with SIGKILL"),
    };
    info!("received signal {sig}, stopping");
    ctx.shared.stopping.store(true, SeqCst);
    let _ = systemd::notify("STOPPING=1");
    let _ = ctx.tx.send(Msg::Shutdown);
    let deadline = Instant::now() + STOP_GRACE;
    while !worker.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !worker.is_finished() {
        let grace = STOP_GRACE.as_secs();
        warning!("the nix calls in progress outlasted the {grace} s grace period; killing them");
        for pgid in ctx.shared.running_pgids() {
            let _ = sys::kill_process_group(pgid, sys::SIGKILL);
        }
    }
    if let Some(file) = &ctx.config.metrics_file {
        let _ = status::write_atomically(file, &snapshot(ctx).prometheus());
    }
    if own_socket {
        let _ = fs::remove_file(&ctx.config.socket);
    }
    let n = ctx.journal.len();
    info!("stopped; {n} paths stay queued in the journal");
    std::process::exit(0);
}

/// A connection read with one deadline for the whole of each request line.
struct Timed<'a>(&'a UnixStream, Instant);

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // At least a nanosecond: no timeout at all is `None`.
        let left = self.1.saturating_duration_since(Instant::now());
        let left = left.max(Duration::from_nanos(1));
        self.0.set_read_timeout(Some(left))?;
        self.0.read(buf)
    }
}

fn handle(ctx: &Context, mut stream: &UnixStream) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let uid = sys::peer(stream.as_fd()).ok().map(|p| p.uid);
    let mut reader = BufReader::new(Timed(stream, Instant::now()));
    let mut line = Vec::new();
    loop {
        reader.get_mut().1 = Instant::now() + REQUEST_TIMEOUT;
        line.clear();
        // Under `MAX_LINE` bytes within `REQUEST_TIMEOUT`, or the connection ends (no next line).
        let failed = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(_) if line.pop_if(|b| *b == b'\n').is_some() => None,
            Ok(n) if n >= MAX_LINE => Some(too_long()),
            Ok(_) => Some("request line not terminated by a newline".into()),
            Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => Some(format!(
                "no complete request line within {} s",
                REQUEST_TIMEOUT.as_secs()
            )),
            Err(e) => Some(e.to_string()),
        };
        let reply = match &failed {
            Some(why) => final_line(Err(why)),
            None => match parse_request(&line, &ctx.config.store_dir) {
                Ok(req) => respond(ctx, stream, req, uid),
                Err(e) => final_line(Err(&e)),
            },
        };
        if stream.write_all(reply.as_bytes()).is_err() || failed.is_some() {
            return;
        }
    }
}

/// The reply to `req` from user `uid`: only root and the daemon's user may change the queue.
fn respond(ctx: &Context, stream: &UnixStream, req: Request, uid: Option<u32>) -> String {
    let admin = uid.is_some_and(|uid| uid == 0 || uid == sys::uid());
    if !admin && matches!(req, Request::Retry | Request::Requeue(_) | Request::Drop(_)) {
        let who = uid.map_or("an unknown user".into(), |u| format!("uid {u}"));
        return final_line(Err(&format!(
            "{who} may not change the queue: retry, requeue and drop are taken \
             only from root and the daemon's user (uid {})",
            sys::uid()
        )));
    }
    let queued = |paths: Vec<StorePath>| match paths.len() {
        n if n > 0 && ctx.tx.send(Msg::Queued(paths)).is_err() => final_line(Err(ERR_WORKER_GONE)),
        n => final_line(Ok(&n.to_string())),
    };
    match req {
        Request::Enqueue(paths) => match ctx.journal.append(&paths) {
            Ok(added) => queued(added),
            Err(e) => {
                error!("cannot journal {} paths: {e}", paths.len());
                final_line(Err(&format!("{ERR_JOURNAL}: {e}; nothing was queued")))
            }
        },
        Request::Drv(drv) => respond(ctx, stream, Request::Enqueue(vec![drv]), uid),
        Request::Ping => final_line(Ok(&format!("nix-post-build-hook-queue {}", crate::VERSION))),
        Request::Status(false) => snapshot(ctx).text() + &final_line(Ok("")),
        Request::Status(true) => snapshot(ctx).json() + &final_line(Ok("")),
        Request::Retry => {
            let n = ctx.shared.lock().backing_off();
            let _ = ctx.tx.send(Msg::Retry);
            final_line(Ok(&n.to_string()))
        }
        Request::Wait => wait(ctx, stream),
        Request::Requeue(chosen) => {
            let requeued = ctx.journal.requeue(chosen.as_deref());
            if !requeued.is_empty() {
                let list = named(&requeued);
                info!("requeued {list} (an operator's request): tried again");
            }
            queued(requeued)
        }
        Request::Drop(chosen) => {
            let paths: Vec<StorePath> = chosen.unwrap_or_else(|| {
                let mut seen = HashSet::new();
                let all = given_up(ctx, u64::MAX).into_iter().map(|(p, _)| p);
                all.filter(|p| seen.insert(p.clone())).collect()
            });
            let why = "dropped by an operator's request; it is not uploaded";
            let n = crate::worker::drop_paths(&ctx.journal, &ctx.shared, &paths, why);
            final_line(Ok(&n.to_string()))
        }
    }
}

/// The first three items, and how many more there are.
fn named<T: std::fmt::Display>(all: &[T]) -> String {
    let list: Vec<String> = all.iter().take(3).map(T::to_string).collect();
    match all.len() - list.len() {
        0 => list.join(", "),
        more => format!("{} and {more} more", list.join(", ")),
    }
}

/// Every target's paths given up on up to `seq`, the target named in the error when several.
fn given_up(ctx: &Context, seq: u64) -> Vec<(StorePath, GivenUp)> {
    let mut all = Vec::new();
    for t in &ctx.targets {
        for (p, mut g) in ctx.journal.given_up_up_to(seq, t.id) {
            if ctx.targets.len() > 1 {
                g.error = format!("{}: {}", t.label, g.error);
            }
            all.push((p, g));
        }
    }
    all
}

/// The `wait` reply: `remaining N failing M [error PATH TEXT]` lines until every path queued before
/// it is settled, then `err` naming paths given up on or dropped meanwhile, else `ok`.
fn wait(ctx: &Context, mut stream: &UnixStream) -> String {
    let (upto, drops) = ctx.journal.watch_drops();
    let (waiting, woken) = mpsc::channel();
    let _ = ctx.tx.send(Msg::Flush(waiting));
    // Not this wait's failure (another job's, maybe); `status` lists them.
    let earlier = given_up(ctx, upto);
    let ids: Vec<TargetId> = ctx.targets.iter().map(|t| t.id).collect();
    let (mut last, mut last_sent) = (None, Instant::now());
    loop {
        let remaining = ctx.journal.count_waiting_up_to(upto, &ids);
        if remaining == 0 {
            let (old, new): (Vec<_>, Vec<_>) = given_up(ctx, upto)
                .into_iter()
                .partition(|g| earlier.contains(g));
            let mut problems = Vec::new();
            if let n @ 1.. = new.len() {
                let listed: Vec<String> = (new.iter())
                    .map(|(p, g)| format!("{p} ({})", shorten(&g.error, 300)))
                    .collect();
                let (listed, next) = (named(&listed), "see status, then requeue or drop them");
                problems.push(format!(
                    "{n} path(s) failed and were given up on: {listed}; {next}"
                ));
            }
            let dropped = drops.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let (n @ 1.., listed) = (dropped.len(), named(&dropped)) {
                problems.push(format!(
                    "{n} path(s) were dropped ({listed}); see the daemon's log"
                ));
            }
            return match (problems.is_empty(), old.len()) {
                (false, _) => final_line(Err(&redact::text(&problems.join("; ")))),
                (true, 0) => final_line(Ok("all uploaded")),
                (true, n) => final_line(Ok(&format!(
                    "all uploaded, but for {n} path(s) given up on before this wait (see status)"
                ))),
            };
        }
        let s = ctx.shared.lock();
        // Each path once, with the error of the first target it fails on.
        let backoff = s.targets.iter().rev().flat_map(|t| &t.backoff);
        let failing: HashMap<&StorePath, &String> = (backoff.filter(|(_, b)| b.attempts > 0))
            .map(|(p, b)| (p, &b.last_error))
            .collect();
        let first = (failing.iter())
            .filter_map(|(p, e)| Some((ctx.journal.entry(p)?.seq, p, e)))
            .filter(|(seq, _, _)| *seq <= upto)
            .min_by_key(|(seq, _, _)| *seq)
            .map(|(_, p, e)| format!(" error {p} {}", redact::text(&shorten(e, 500))));
        let first_error = one_line(&first.unwrap_or_default());
        let failing = failing.len().min(remaining);
        drop(s);
        if last != Some((remaining, failing)) || last_sent.elapsed() >= Duration::from_secs(1) {
            let line = format!("remaining {remaining} failing {failing}{first_error}\n");
            if stream.write_all(line.as_bytes()).is_err() {
                return String::new();
            }
            (last, last_sent) = (Some((remaining, failing)), Instant::now());
        }
        let _ = woken.recv_timeout(Duration::from_millis(50));
    }
}
