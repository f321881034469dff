//! The daemon: recovery at start, the listener, and one thread per client.
//!
//! Startup is recovery: replay the journal, hand every live path to the
//! worker, then accept. Each connection has a thread of its own (at most
//! `max-connections`; more get `err busy`), which journals paths before
//! acknowledging them: a slow client never delays another, nor nix an
//! acknowledgement. `retry`, `requeue` and `drop` are taken only from root
//! and the daemon's own user (the peer's credentials, as the kernel saw
//! them); anyone the socket's mode lets in may `enqueue`, `status` and `wait`.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::journal::{GivenUp, Journal, TargetId};
use crate::protocol::{final_line, one_line, parse_request, ProtocolError, Request, Selection};
use crate::protocol::{ERR_BUSY, ERR_JOURNAL, ERR_STOPPING, ERR_WORKER_GONE, MAX_LINE};
use crate::status::{self, Shared, Snapshot};
use crate::store_path::StorePath;
use crate::worker::{Msg, Worker};
use crate::{error, info, redact, sys, systemd, warning};

/// Longest a client may take to send one request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `wait` looks at the queue.
const WAIT_POLL: Duration = Duration::from_millis(50);
/// How often the metrics file is rewritten.
const METRICS_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stop waits for the nix call in progress.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Stack of a connection thread: it reads into the heap.
const CONNECTION_STACK: usize = 64 * 1024;
/// Names the private directories the socket is bound in.
const PRIVATE_PREFIX: &str = ".post-build-hook-queue-";

/// Why the daemon could not start.
#[derive(Debug)]
pub enum ServeError {
    /// The configuration can never work (exit 78): a target nix refuses
    /// for good, an upload program that does not exist.
    Config(String),
    /// Something a restart may get past (exit 1): the journal's I/O, the
    /// state directory locked by another daemon, the socket in use.
    Transient(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ServeError::Config(why) | ServeError::Transient(why)) = self;
        f.write_str(why)
    }
}

impl std::error::Error for ServeError {}

fn transient(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ServeError {
    move |e| ServeError::Transient(format!("{what}: {e}"))
}

/// What every connection thread shares.
struct Context {
    journal: Arc<Journal>,
    shared: Arc<Shared>,
    tx: Sender<Msg>,
    store_dir: String,
    /// The journal's names for the targets, and the targets as shown.
    target_ids: Vec<TargetId>,
    labels: Vec<String>,
    spool_dir: PathBuf,
    signing: bool,
    /// Connections being served.
    active: AtomicUsize,
    max_connections: usize,
}

/// Runs the daemon: returns only if it cannot start; it ends when a signal
/// stops it (see `stop_on_signal`) or it is killed.
pub fn serve(config: Config) -> Result<(), ServeError> {
    // Before any thread starts, so that only the stop thread sees them.
    sys::block_stop_signals().map_err(transient("cannot block SIGTERM and SIGINT"))?;
    let activated = systemd::listener_from_env()
        .map_err(transient("cannot use the socket passed by systemd"))?;
    // Before anything can fail and quote the target.
    config
        .upload_to
        .iter()
        .for_each(|url| redact::remember(url));
    // Held until the process ends: one daemon per journal.
    let _lock = lock_state_dir(&config.state_dir)?;
    let journal_error = format!("cannot open the journal in {}", config.state_dir.display());
    let (journal, replay) =
        Journal::open(&config.state_dir, &config.store_dir).map_err(transient(journal_error))?;
    // After the journal, whose refusal matters more; before the socket.
    crate::target::check_at_start(&config).map_err(ServeError::Config)?;
    if replay.torn_bytes > 0 {
        let n = replay.torn_bytes;
        warning!("journal: cut off a torn last record of {n} bytes (a crash during a write)");
    }
    let (file, n) = (
        config.state_dir.join(crate::journal::FILE_NAME),
        replay.paths.len(),
    );
    info!("journal {} replayed: {n} paths queued", file.display());
    // Created by us, so that we own it: a hook running as root (under the
    // Nix daemon) can write into it, and we can delete what we ingested.
    let spool = config.spool_dir();
    if let Err(e) = fs::create_dir_all(&spool) {
        warning!("cannot create the spool directory {}: {e}", spool.display());
    }
    let journal = Arc::new(journal);
    let targets = crate::target::configured(&config);
    let shared = Arc::new(Shared::new(&targets));
    let (tx, rx) = mpsc::channel();
    let target_ids: Vec<TargetId> = targets.iter().map(|t| t.id).collect();
    // Paths every target has already (a target left the configuration).
    if let Ok(n @ 1..) = journal.settle(&target_ids) {
        info!("journal: {n} paths every target has already are done");
    }
    // Those some target still needs, and those given up on where not had.
    let needed = |p: &StorePath, t: &TargetId| !journal.is_settled(p, *t);
    let (to_upload, given_up): (Vec<StorePath>, Vec<StorePath>) = (replay.paths.into_iter())
        .filter(|p| journal.entry(p).is_some())
        .partition(|p| target_ids.iter().any(|t| needed(p, t)));
    if let n @ 1.. = given_up.len() {
        warning!(
            "{n} paths were given up on after repeated failures and are not tried again; \
             see `post-build-hook-queue status`, then requeue or drop them"
        );
    }
    if !to_upload.is_empty() {
        let _ = tx.send(Msg::Queued(to_upload));
    }
    let (listener, waiting, own_socket) = match activated {
        Some((l, waiting)) => {
            info!("listening on the socket passed by systemd");
            (l, waiting, None)
        }
        None => (bind(&config)?, None, Some(config.socket.clone())),
    };
    let worker = Worker::new(&config, Arc::clone(&journal), Arc::clone(&shared), rx);
    let worker = spawn("worker", move || worker.run())?;
    let ctx = Arc::new(Context {
        journal,
        shared,
        tx,
        store_dir: config.store_dir.clone(),
        target_ids,
        labels: match targets.as_slice() {
            [t] if matches!(t.kind, crate::target::Kind::SignOnly) => vec!["(none)".into()],
            all => all.iter().map(|t| t.label.clone()).collect(),
        },
        spool_dir: config.spool_dir(),
        signing: config.signing_key_file.is_some(),
        active: AtomicUsize::new(0),
        max_connections: config.max_connections,
    });
    let (store, targets) = (&config.store_dir, ctx.labels.join(", "));
    let signing = if ctx.signing { "on" } else { "off" };
    info!("ready: store {store}, signing {signing}, upload to {targets}");
    if let Some(file) = config.metrics_file.clone() {
        let ctx = Arc::clone(&ctx);
        spawn("metrics", move || write_metrics(&ctx, &file))?;
    }
    let stopper = Arc::clone(&ctx);
    let metrics = config.metrics_file.clone();
    spawn("stop", move || {
        stop_on_signal(&stopper, worker, own_socket, metrics)
    })?;
    if let Err(e) = systemd::notify_ready() {
        warning!("cannot notify systemd of readiness: {e}");
    }
    accept_connections(&ctx, &listener, waiting)
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, ServeError> {
    let builder = std::thread::Builder::new().name(name.into());
    builder.spawn(f).map_err(transient("cannot start a thread"))
}

/// Locks the state directory (its file `lock`, which holds the pid), so
/// that no second daemon appends to and compacts the same journal. The
/// flock goes with the process, also on `kill -9`: a stale one never
/// blocks a start.
fn lock_state_dir(dir: &Path) -> Result<fs::File, ServeError> {
    let err = || transient(format!("cannot lock the state-dir {}", dir.display()));
    fs::create_dir_all(dir).map_err(err())?;
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(dir.join("lock"))
        .map_err(err())?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(ServeError::Transient(format!(
                "state-dir {} is in use by another daemon (pid {}); stop it or choose another state-dir",
                dir.display(),
                holder.trim()
            )));
        }
        Err(fs::TryLockError::Error(e)) => return Err(err()(e)),
    }
    // Padded over whatever pid was there, so that no truncate is needed
    // (the journal's undo of a failed write is the daemon's only one).
    let pid = format!("{:<10}\n", std::process::id());
    std::os::unix::fs::FileExt::write_all_at(&file, pid.as_bytes(), 0).map_err(err())?;
    Ok(file)
}

/// Binds the socket path, replacing only a stale socket (nothing answers)
/// and never anything else. The socket is made in a private directory
/// beside it (mode 0700, an unpredictable name, checked on its descriptor,
/// reached as `/proc/self/fd/N/s`, short enough for any socket path), given
/// its mode and group, then renamed into place: never reachable with looser
/// permissions than `socket-mode`. Leftovers of a killed bind go first.
fn bind(config: &Config) -> Result<UnixListener, ServeError> {
    let path = &config.socket;
    let fail = |why: &str| Err(ServeError::Transient(format!("{} {why}", path.display())));
    if UnixStream::connect(path).is_ok() {
        return fail("has another daemon listening; stop it or choose another --socket");
    }
    if fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_socket()) {
        return fail(
            "exists and is not a socket; refusing to replace it (check the socket setting)",
        );
    }
    let parent = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let err = || transient(format!("cannot listen on {}", path.display()));
    fs::create_dir_all(parent).map_err(err())?;
    remove_leftovers(parent);
    let (private, dir) = private_dir(parent).map_err(err())?;
    let tmp = PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()));
    let setup = || -> io::Result<UnixListener> {
        let listener = UnixListener::bind(&tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(config.socket_mode))?;
        if let Some(group) = &config.socket_group {
            std::os::unix::fs::chown(&tmp, None, Some(group_id(group)?))?;
        }
        fs::rename(&tmp, path)?;
        Ok(listener)
    };
    let result = setup();
    let _ = fs::remove_file(&tmp);
    // `rmdir` removes nothing else (not a file, not through a symlink).
    let _ = fs::remove_dir(&private);
    let listener = result.map_err(err())?;
    info!(
        "listening on {} (mode {:04o})",
        path.display(),
        config.socket_mode
    );
    Ok(listener)
}

/// Creates a private directory in `parent`, opened and checked on its
/// descriptor (a name taken by someone else is skipped).
fn private_dir(parent: &Path) -> io::Result<(PathBuf, fs::File)> {
    use std::hash::{BuildHasher, RandomState};
    for attempt in 0..16 {
        // Keyed from the operating system's random source: others cannot guess it.
        let random = RandomState::new().hash_one((std::process::id(), attempt));
        let path = parent.join(format!("{PRIVATE_PREFIX}{random:016x}"));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let dir = fs::File::open(&path)?;
        let meta = dir.metadata()?;
        if !meta.is_dir() || meta.uid() != sys::uid() || meta.mode() & 0o077 != 0 {
            let why = format!(
                "{} was replaced while the socket was being set up",
                path.display()
            );
            return Err(io::Error::other(why));
        }
        return Ok((path, dir));
    }
    Err(io::Error::other(format!(
        "no free name for a private directory in {}",
        parent.display()
    )))
}

/// Removes our own private directories in `parent` that a daemon killed
/// while binding left behind (a minute old: none is in use that long).
fn remove_leftovers(parent: &Path) {
    for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PRIVATE_PREFIX));
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta.modified().ok().and_then(|t| t.elapsed().ok());
        if ours && meta.is_dir() && meta.uid() == sys::uid() && old > Some(Duration::from_secs(60))
        {
            // Never follows a link inside; removes what a killed bind left.
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Resolves a group name (from /etc/group) or number.
fn group_id(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let text = fs::read_to_string("/etc/group")?;
    let mut entries = text.lines().map(|l| l.split(':').collect::<Vec<_>>());
    let entry = entries.find(|f| f.first() == Some(&group) && f.len() > 2);
    entry.and_then(|f| f[2].parse().ok()).ok_or_else(|| {
        io::Error::other(format!(
            "socket-group {group:?}: no such group in /etc/group"
        ))
    })
}

fn snapshot(ctx: &Context) -> Snapshot {
    Snapshot::take(&ctx.journal, &ctx.shared, &ctx.spool_dir, ctx.signing)
}

fn write_metrics(ctx: &Context, file: &Path) {
    let mut failing = false;
    loop {
        let result = status::write_atomically(file, &snapshot(ctx).prometheus());
        if let (Err(e), false) = (&result, failing) {
            warning!("cannot write metrics file {}: {e}", file.display());
        }
        failing = result.is_err();
        std::thread::sleep(METRICS_INTERVAL);
    }
}

/// The one way to stop: on SIGTERM or SIGINT, refuse new work, let the nix
/// call in progress finish within the grace period (then kill it), and exit.
/// Whatever was not uploaded is still in the journal.
fn stop_on_signal(
    ctx: &Context,
    worker: std::thread::JoinHandle<()>,
    own_socket: Option<PathBuf>,
    metrics: Option<PathBuf>,
) {
    let sig = match sys::wait_for_stop_signal() {
        Ok(sig) => sig,
        Err(e) => return error!("cannot wait for signals: {e}; stop the daemon with SIGKILL"),
    };
    info!("received signal {sig}, stopping");
    ctx.shared.stopping.store(true, Ordering::SeqCst);
    let _ = systemd::notify_stopping();
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
    if let Some(file) = metrics {
        let _ = status::write_atomically(&file, &snapshot(ctx).prometheus());
    }
    if let Some(socket) = own_socket {
        let _ = fs::remove_file(socket);
    }
    let n = ctx.journal.len();
    info!("stopped; {n} paths stay queued in the journal");
    std::process::exit(0);
}

/// Accepts connections for good (`waiting` first), each served by a thread
/// of its own; turns them away while stopping or when `max-connections`
/// are being served.
fn accept_connections(
    ctx: &Arc<Context>,
    listener: &UnixListener,
    mut waiting: Option<UnixStream>,
) -> ! {
    loop {
        let accepted = waiting
            .take()
            .map_or_else(|| listener.accept().map(|(s, _)| s), Ok);
        let mut stream = match accepted {
            Ok(stream) => stream,
            Err(e) if e.kind() == Interrupted => continue,
            Err(e) => {
                // Out of descriptors, say: wait for connections to end.
                error!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let stopping = ctx.shared.stopping.load(Ordering::SeqCst);
        if stopping || ctx.active.load(Ordering::SeqCst) >= ctx.max_connections {
            let why = if stopping { ERR_STOPPING } else { ERR_BUSY };
            // A fresh connection's buffer takes one line without waiting.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(final_line(Err(why)).as_bytes());
            continue;
        }
        ctx.active.fetch_add(1, Ordering::SeqCst);
        let ctx2 = Arc::clone(ctx);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                handle(&ctx2, stream);
                ctx2.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            // The connection went with the closure: the client sees it closed.
            ctx.active.fetch_sub(1, Ordering::SeqCst);
            warning!("cannot start a connection thread: {e}");
        }
    }
}

/// Reads one line of at most `MAX_LINE` bytes, all of it within
/// `REQUEST_TIMEOUT`, into `line`. `Ok(false)` at a clean end of stream.
fn read_line(
    stream: &mut UnixStream,
    line: &mut Vec<u8>,
    pending: &mut Vec<u8>,
) -> Result<bool, String> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let late = format!(
        "no complete request line within {} s",
        REQUEST_TIMEOUT.as_secs()
    );
    loop {
        if let Some(i) = pending.iter().position(|&b| b == b'\n') {
            line.clear();
            line.extend(pending.drain(..=i).take(i));
            return Ok(true);
        }
        if pending.len() >= MAX_LINE {
            return Err(ProtocolError::TooLong.to_string());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        // Straight into `pending`, 4 to 64 KiB at a time, not through a
        // buffer on this thread's small stack.
        let had = pending.len();
        let room = (pending.capacity() - had).clamp(4096, 64 * 1024);
        pending.resize(had + room, 0);
        let read = stream.read(&mut pending[had..]);
        pending.truncate(had + read.as_ref().map_or(0, |n| *n));
        match read {
            Ok(0) if pending.is_empty() => return Ok(false),
            Ok(0) => return Err("request line not terminated by a newline".into()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => return Err(late),
            Err(e) if e.kind() == Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn handle(ctx: &Context, mut stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    // Root and the daemon's own user may change the queue; others may add
    // to it and look (a peer that cannot be told is not trusted).
    let uid = sys::peer(stream.as_fd()).ok().map(|p| p.uid);
    let admin = uid.is_some_and(|uid| uid == 0 || uid == sys::uid());
    let (mut line, mut pending) = (Vec::new(), Vec::new());
    loop {
        let reply = match read_line(&mut stream, &mut line, &mut pending) {
            Ok(false) => return,
            Ok(true) => match parse_request(&line, &ctx.store_dir) {
                Ok(Request::Retry | Request::Requeue(_) | Request::Drop(_)) if !admin => {
                    let who = uid.map_or("an unknown user".into(), |u| format!("uid {u}"));
                    final_line(Err(&format!(
                        "{who} may not change the queue: retry, requeue and drop are taken \
                         only from root and the daemon's user (uid {})",
                        sys::uid()
                    )))
                }
                Ok(req) => respond(ctx, &mut stream, req),
                Err(e @ ProtocolError::TooLong) => {
                    // Whether the newline came in time or not, an over-long
                    // line ends the connection.
                    let _ = stream.write_all(final_line(Err(&e.to_string())).as_bytes());
                    return;
                }
                Err(e) => final_line(Err(&e.to_string())),
            },
            Err(why) => {
                let _ = stream.write_all(final_line(Err(&why)).as_bytes());
                return;
            }
        };
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn respond(ctx: &Context, stream: &mut UnixStream, req: Request) -> String {
    let queued = |paths: Vec<StorePath>| {
        let n = paths.len();
        if n > 0 && ctx.tx.send(Msg::Queued(paths)).is_err() {
            return final_line(Err(ERR_WORKER_GONE));
        }
        final_line(Ok(&n.to_string()))
    };
    match req {
        Request::Enqueue(paths) => match ctx.journal.append(&paths) {
            Ok(added) => queued(added),
            Err(e) => {
                error!("cannot journal {} paths: {e}", paths.len());
                final_line(Err(&format!("{ERR_JOURNAL}: {e}; nothing was queued")))
            }
        },
        Request::Drv(drv) => respond(ctx, stream, Request::Enqueue(vec![drv])),
        Request::Ping => final_line(Ok(&format!("nix-post-build-hook-queue {}", crate::VERSION))),
        // Backoff errors quote nix, which may repeat the target with its
        // password in forms no URL parser recognises.
        Request::Status { json: false } => snapshot(ctx).text() + &final_line(Ok("")),
        Request::Status { json: true } => snapshot(ctx).json() + &final_line(Ok("")),
        Request::Retry => {
            let n = ctx.shared.lock().backing_off();
            let _ = ctx.tx.send(Msg::Retry);
            final_line(Ok(&n.to_string()))
        }
        Request::Wait => wait(ctx, stream),
        Request::Requeue(selection) => {
            let chosen = match &selection {
                Selection::Paths(paths) => Some(paths.as_slice()),
                Selection::AllFailed => None,
            };
            let requeued = ctx.journal.requeue(chosen).unwrap_or_default();
            if !requeued.is_empty() {
                let list = named(&requeued, requeued.len());
                info!("requeued {list} (an operator's request): tried again");
            }
            queued(requeued)
        }
        Request::Drop(selection) => {
            let paths = match selection {
                Selection::Paths(paths) => paths,
                Selection::AllFailed => {
                    let mut seen = HashSet::new();
                    let all = ctx
                        .target_ids
                        .iter()
                        .flat_map(|t| ctx.journal.given_up_up_to(u64::MAX, *t));
                    all.map(|(p, _)| p)
                        .filter(|p| seen.insert(p.clone()))
                        .collect()
                }
            };
            let why = "dropped by an operator's request; it is not uploaded";
            let n = crate::worker::drop_paths(&ctx.journal, &ctx.shared, &paths, why);
            final_line(Ok(&n.to_string()))
        }
    }
}

/// The first three of `total` items, and how many more there are.
fn named<T: std::fmt::Display>(first: &[T], total: usize) -> String {
    let list: Vec<String> = first.iter().take(3).map(T::to_string).collect();
    match total.saturating_sub(list.len()) {
        0 => list.join(", "),
        more => format!("{} and {more} more", list.join(", ")),
    }
}

/// At most `max` characters of `text`, the rest marked as cut.
fn shorten(text: &str, max: usize) -> String {
    let cut = text.char_indices().nth(max);
    cut.map_or_else(|| text.to_string(), |(i, _)| format!("{}...", &text[..i]))
}

/// The `wait` reply: `remaining N failing M` lines while paths queued
/// before the request are still queued (with `error PATH TEXT`, the last
/// error of the first failing one, when M > 0), then `ok ...` or `err ...`
/// when none is left: when every target has each path, or is given up on
/// for it. Paths given up on are not waited for: those given up on while it
/// waits make it `err` (named), as do those dropped; those given up on
/// before it are only mentioned.
fn wait(ctx: &Context, stream: &mut UnixStream) -> String {
    let target = ctx.journal.last_seq();
    let drops = ctx.journal.watch_drops(target);
    // The batch being gathered need not wait for its quiet period.
    let _ = ctx.tx.send(Msg::Flush);
    // Every target's paths given up on, the target named when there are several.
    let given_up_on = || -> Vec<(StorePath, GivenUp)> {
        let mut all = Vec::new();
        for (id, label) in ctx.target_ids.iter().zip(&ctx.labels) {
            for (p, mut g) in ctx.journal.given_up_up_to(target, *id) {
                if ctx.target_ids.len() > 1 {
                    g.error = format!("{label}: {}", g.error);
                }
                all.push((p, g));
            }
        }
        all
    };
    // Given up on before this wait: not waited for, and not this wait's
    // failure (another job's, maybe); `status` lists them.
    let earlier: HashSet<(StorePath, TargetId, u64)> = given_up_on()
        .into_iter()
        .map(|(p, g)| (p, g.target, g.at))
        .collect();
    let mut last: Option<(usize, usize)> = None;
    let mut last_sent = Instant::now();
    loop {
        let remaining = ctx.journal.count_waiting_up_to(target, &ctx.target_ids);
        if remaining == 0 {
            let (old, new): (Vec<_>, Vec<_>) = (given_up_on().into_iter())
                .partition(|(p, g)| earlier.contains(&(p.clone(), g.target, g.at)));
            let mut problems = Vec::new();
            if !new.is_empty() {
                let listed: Vec<String> = new
                    .iter()
                    .map(|(p, g)| format!("{p} ({})", shorten(&g.error, 300)))
                    .collect();
                problems.push(format!(
                    "{} path(s) failed and were given up on: {}; see status, then requeue or drop them",
                    new.len(),
                    named(&listed, listed.len())
                ));
            }
            let (dropped, some) = drops.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if dropped > 0 {
                let listed = named(&some, dropped);
                problems.push(format!(
                    "{dropped} path(s) were dropped ({listed}); see the daemon's log"
                ));
            }
            return if !problems.is_empty() {
                final_line(Err(&redact::text(&problems.join("; "))))
            } else if old.is_empty() {
                final_line(Ok("all uploaded"))
            } else {
                let n = old.len();
                final_line(Ok(&format!(
                    "all uploaded, but for {n} path(s) given up on before this wait (see status)"
                )))
            };
        }
        let (failing, last_error) = {
            let s = ctx.shared.lock();
            let failing: Vec<(&StorePath, &String)> = (s.targets.iter())
                .flat_map(|t| t.backoff.iter())
                .filter(|(_, b)| b.attempts > 0)
                .map(|(p, b)| (p, &b.last_error))
                .collect();
            // The error of the first failing path waited for.
            let first = (failing.iter())
                .filter_map(|(p, e)| Some((ctx.journal.entry(p)?.seq, p, e)))
                .filter(|(seq, _, _)| *seq <= target)
                .min_by_key(|(seq, _, _)| *seq)
                .map(|(_, p, e)| format!(" error {p} {}", redact::text(&shorten(e, 500))));
            let distinct: HashSet<&StorePath> = failing.iter().map(|(p, _)| *p).collect();
            (distinct.len().min(remaining), first.unwrap_or_default())
        };
        if last != Some((remaining, failing)) || last_sent.elapsed() >= Duration::from_secs(1) {
            let line = one_line(&format!(
                "remaining {remaining} failing {failing}{last_error}"
            )) + "\n";
            if stream.write_all(line.as_bytes()).is_err() {
                return String::new();
            }
            last = Some((remaining, failing));
            last_sent = Instant::now();
        }
        std::thread::sleep(WAIT_POLL);
    }
}
