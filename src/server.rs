//! The daemon: recovery at start, the listener, and one thread per client.
//!
//! Startup is recovery: open and replay the journal, hand every live path to
//! the worker, ingest the spool, then accept. The main thread accepts; each
//! connection is served by a thread of its own (at most `max-connections`
//! at once; more get `err busy`), which reads request lines, journals paths
//! before acknowledging them, passes them to the worker through the channel,
//! and ends with the connection. A slow client therefore never delays
//! another one, and the worker's nix calls never delay an acknowledgement.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::journal::{Journal, TargetId};
use crate::protocol::{
    final_line, parse_request, ProtocolError, Request, Selection, ERR_BUSY, ERR_JOURNAL,
    ERR_STOPPING, ERR_WORKER_GONE, MAX_LINE,
};
use crate::status::{self, Shared, Snapshot};
use crate::store_path::StorePath;
use crate::worker::{Msg, Worker};
use crate::{error, info, redact, sys, systemd, warning};

/// Longest a client may take to send one request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `wait` looks at the queue.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// Why the daemon could not start.
#[derive(Debug)]
pub enum ServeError {
    /// The state directory or journal could not be opened.
    Journal(PathBuf, io::Error),
    /// Another daemon holds the state directory's lock (its pid, if known).
    StateDirInUse(PathBuf, Option<u32>),
    /// Another daemon already listens on the socket.
    AlreadyRunning(PathBuf),
    /// Something that is not a socket is at the socket path.
    NotASocket(PathBuf),
    /// The socket could not be created or set up.
    Socket(PathBuf, io::Error),
    /// systemd's socket could not be used.
    Activation(io::Error),
    /// A thread (worker, stop, metrics) could not be started.
    Thread(io::Error),
    /// SIGTERM and SIGINT could not be set up for an orderly stop.
    Signals(io::Error),
    /// A configuration error (such as an upload target nix cannot use, see
    /// [`crate::target`]): exit 78, a restart cannot mend it.
    Config(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Journal(p, e) => {
                write!(f, "cannot open the journal in {}: {e}", p.display())
            }
            ServeError::StateDirInUse(p, pid) => write!(
                f,
                "state-dir {} is in use by another daemon ({}); stop it or choose another state-dir",
                p.display(),
                pid.map_or("pid unknown".to_string(), |pid| format!("pid {pid}"))
            ),
            ServeError::AlreadyRunning(p) => write!(
                f,
                "another daemon is already listening on {}; stop it or choose another --socket",
                p.display()
            ),
            ServeError::NotASocket(p) => write!(
                f,
                "{} exists and is not a socket; refusing to replace it (check the socket setting)",
                p.display()
            ),
            ServeError::Socket(p, e) => write!(f, "cannot listen on {}: {e}", p.display()),
            ServeError::Activation(e) => write!(f, "cannot use the socket passed by systemd: {e}"),
            ServeError::Thread(e) => write!(f, "cannot start a thread: {e}"),
            ServeError::Signals(e) => write!(f, "cannot block SIGTERM and SIGINT: {e}"),
            ServeError::Config(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ServeError {}

/// What every connection thread shares.
struct Context {
    journal: Arc<Journal>,
    shared: Arc<Shared>,
    tx: Sender<Msg>,
    store_dir: String,
    /// The targets, shown (secrets masked), `, `-separated.
    target: Option<String>,
    /// The journal's names for the targets.
    target_ids: Vec<TargetId>,
    /// Where the hook leaves requests while the daemon is away.
    spool_dir: PathBuf,
    signing: bool,
    /// Connections being served.
    active: AtomicUsize,
    max_connections: usize,
}

/// Stack of a connection thread: it reads into the heap, and journals and
/// replies with little on the stack.
const CONNECTION_STACK: usize = 64 * 1024;

/// Runs the daemon: returns only if it cannot start; it ends when a signal
/// stops it (see `stop_on_signal`) or it is killed.
pub fn serve(config: Config) -> Result<(), ServeError> {
    // Before any thread starts, so that only the stop thread sees them.
    sys::block_stop_signals().map_err(ServeError::Signals)?;
    let activated = systemd::listener_from_env().map_err(ServeError::Activation)?;
    for url in &config.upload_to {
        // Before anything can fail and quote the target.
        redact::remember(url);
    }

    // Held until the process ends: one daemon per journal.
    let _lock = lock_state_dir(&config.state_dir)?;
    let (journal, replay) = Journal::open(&config.state_dir, &config.store_dir)
        .map_err(|e| ServeError::Journal(config.state_dir.clone(), e))?;
    // After the journal, whose refusal matters more; before the socket.
    crate::target::check_at_start(&config).map_err(ServeError::Config)?;
    if replay.torn_bytes > 0 {
        warning!(
            "journal: cut off a torn last record of {} bytes (a crash during a write)",
            replay.torn_bytes
        );
    }
    info!(
        "journal {} replayed: {} paths queued",
        config.state_dir.join(crate::journal::FILE_NAME).display(),
        replay.paths.len()
    );
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
    // Paths every target has already (a target was taken out of the
    // configuration, or a crash came before the journal said so).
    match journal.settle(&target_ids) {
        Ok(0) => {}
        Ok(n) => info!("journal: {n} paths every target has already are done"),
        Err(e) => warning!("journal: cannot settle the paths the targets have already: {e}"),
    }
    // Those some target still needs, and those given up on where not had.
    let (to_upload, given_up): (Vec<StorePath>, Vec<StorePath>) = replay
        .paths
        .into_iter()
        .filter(|p| journal.entry(p).is_some())
        .partition(|p| {
            target_ids
                .iter()
                .any(|t| !journal.is_delivered(p, *t) && !journal.is_given_up(p, *t))
        });
    if !given_up.is_empty() {
        warning!(
            "{} paths were given up on after repeated failures and are not tried again; \
             see `post-build-hook-queue status`, then requeue or drop them",
            given_up.len()
        );
    }
    if !to_upload.is_empty() {
        let _ = tx.send(Msg::Queued(to_upload));
    }

    let (listener, own_socket) = match activated {
        Some(l) => {
            info!("listening on the socket passed by systemd");
            (l, None)
        }
        None => (bind(&config)?, Some(config.socket.clone())),
    };

    let worker = Worker::new(&config, Arc::clone(&journal), Arc::clone(&shared), rx);
    let worker = std::thread::Builder::new()
        .name("worker".into())
        .spawn(move || worker.run())
        .map_err(ServeError::Thread)?;

    let ctx = Arc::new(Context {
        journal,
        shared,
        tx,
        store_dir: config.store_dir.clone(),
        target: match targets.as_slice() {
            [t] if matches!(t.kind, crate::target::Kind::SignOnly) => None,
            all => Some(
                all.iter()
                    .map(|t| t.label.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        },
        target_ids,
        spool_dir: config.spool_dir(),
        signing: config.signing_key_file.is_some(),
        active: AtomicUsize::new(0),
        max_connections: config.max_connections,
    });
    info!(
        "ready: store {}, signing {}, upload to {}",
        config.store_dir,
        if ctx.signing { "on" } else { "off" },
        ctx.target.as_deref().unwrap_or("(none)")
    );
    if let Some(file) = config.metrics_file.clone() {
        let ctx = Arc::clone(&ctx);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || write_metrics(&ctx, &file))
            .map_err(ServeError::Thread)?;
    }
    {
        let ctx = Arc::clone(&ctx);
        let metrics = config.metrics_file.clone();
        std::thread::Builder::new()
            .name("stop".into())
            .spawn(move || stop_on_signal(&ctx, worker, own_socket, metrics))
            .map_err(ServeError::Thread)?;
    }
    if let Err(e) = systemd::notify_ready() {
        warning!("cannot notify systemd of readiness: {e}");
    }

    accept_connections(&ctx, &listener)
}

/// The lock file in the state directory: locked by the daemon that uses the
/// directory, for as long as it runs, and holding its pid.
pub const LOCK_FILE: &str = "lock";

/// Locks the state directory, so that no second daemon appends to and
/// compacts the same journal. The lock (flock) goes with the process, also
/// on `kill -9`, so a stale lock file never blocks a start.
fn lock_state_dir(dir: &Path) -> Result<fs::File, ServeError> {
    let err = |e: io::Error| ServeError::Journal(dir.to_path_buf(), e);
    fs::create_dir_all(dir).map_err(err)?;
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(dir.join(LOCK_FILE))
        .map_err(err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let pid = holder.trim().parse().ok();
            return Err(ServeError::StateDirInUse(dir.to_path_buf(), pid));
        }
        Err(fs::TryLockError::Error(e)) => return Err(err(e)),
    }
    file.set_len(0).map_err(err)?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(err)?;
    Ok(file)
}

/// Binds the socket path: a stale socket file is replaced only when nothing
/// answers on it, and anything that is not a socket (a regular file named by
/// mistake, a symlink, a directory) is never replaced. The socket is created
/// in a [`PrivateDir`] beside it (so no one else can reach it there, whatever
/// the umask), given its mode and group, then renamed into place, so it is
/// never reachable with looser permissions than `socket-mode`.
fn bind(config: &Config) -> Result<UnixListener, ServeError> {
    let path = &config.socket;
    let err = |e: io::Error| ServeError::Socket(path.clone(), e);
    if UnixStream::connect(path).is_ok() {
        return Err(ServeError::AlreadyRunning(path.clone()));
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServeError::NotASocket(path.clone()))
        }
        _ => {}
    }
    let parent = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(err)?;
    let private = PrivateDir::create(parent).map_err(err)?;
    let tmp = private.entry("s");
    let setup = || -> io::Result<UnixListener> {
        let listener = UnixListener::bind(&tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(config.socket_mode))?;
        if let Some(group) = &config.socket_group {
            let gid = group_id(group)?;
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
        }
        fs::rename(&tmp, path)?;
        Ok(listener)
    };
    let result = setup();
    let _ = fs::remove_file(&tmp);
    private.remove();
    let listener = result.map_err(err)?;
    info!(
        "listening on {} (mode {:04o})",
        path.display(),
        config.socket_mode
    );
    Ok(listener)
}

/// A directory of our own (mode 0700, no one else's access) in a directory others may write to,
/// reached through its open descriptor.
///
/// Its name is unpredictable and it is created exclusively (`mkdir` never
/// follows or reuses what is there: a name taken by someone else is
/// skipped), so no one can plant a directory or a symlink to block the start
/// or redirect it; once opened, it is checked to be the directory we made,
/// and every path into it goes through `/proc/self/fd/N`, which names that
/// directory wherever it is moved. That path is also short, so a socket
/// path of up to 107 bytes (the kernel's limit) can be bound through it.
struct PrivateDir {
    path: PathBuf,
    dir: fs::File,
}

impl PrivateDir {
    /// Attempts at a free name before giving up (only a name someone else
    /// already took is retried).
    const ATTEMPTS: u32 = 16;

    fn create(parent: &Path) -> io::Result<PrivateDir> {
        use std::hash::{BuildHasher, RandomState};
        use std::os::unix::fs::MetadataExt;
        for attempt in 0..Self::ATTEMPTS {
            // Keyed from the operating system's random source: others cannot
            // guess it.
            let random = RandomState::new().hash_one((std::process::id(), attempt));
            let path = parent.join(format!(".post-build-hook-queue-{random:016x}"));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            let dir = fs::File::open(&path)?;
            let meta = dir.metadata()?;
            if !meta.is_dir() || meta.uid() != sys::uid() || meta.mode() & 0o077 != 0 {
                return Err(io::Error::other(format!(
                    "{} was replaced while the socket was being set up",
                    path.display()
                )));
            }
            return Ok(PrivateDir { path, dir });
        }
        Err(io::Error::other(format!(
            "no free name for a private directory in {} after {} attempts",
            parent.display(),
            Self::ATTEMPTS
        )))
    }

    /// The path of `name` inside the directory, through its descriptor.
    fn entry(&self, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.dir.as_raw_fd()))
    }

    /// Removes the directory, which must be empty by now: `rmdir` removes
    /// nothing else (not a file, not through a symlink).
    fn remove(self) {
        let _ = fs::remove_dir(&self.path);
    }
}

/// Resolves a group name (from /etc/group) or number.
fn group_id(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let text = fs::read_to_string("/etc/group")?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == group)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| {
            io::Error::other(format!(
                "socket-group {group:?}: no such group in /etc/group"
            ))
        })
}

/// How often the metrics file is rewritten.
const METRICS_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stop waits for the nix call in progress.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

fn snapshot(ctx: &Context) -> Snapshot {
    Snapshot::take(&ctx.journal, &ctx.shared, &ctx.spool_dir, ctx.signing)
}

fn write_metrics(ctx: &Context, file: &Path) {
    let mut failing = false;
    loop {
        match status::write_atomically(file, &snapshot(ctx).prometheus()) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                warning!("cannot write metrics file {}: {e}", file.display());
                failing = true;
            }
            Err(_) => {}
        }
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
        Err(e) => {
            error!("cannot wait for signals: {e}; stop the daemon with SIGKILL");
            return;
        }
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
        warning!(
            "the nix calls in progress outlasted the {} s grace period; killing them",
            STOP_GRACE.as_secs()
        );
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
    info!(
        "stopped; {} paths stay queued in the journal",
        ctx.journal.len()
    );
    std::process::exit(0);
}

/// Accepts connections for good, each served by a thread of its own; turns
/// them away while stopping or when `max-connections` are being served.
fn accept_connections(ctx: &Arc<Context>, listener: &UnixListener) -> ! {
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, say: wait for connections to end.
                error!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let refusal = if ctx.shared.stopping.load(Ordering::SeqCst) {
            Some(ERR_STOPPING)
        } else if ctx.active.load(Ordering::SeqCst) >= ctx.max_connections {
            Some(ERR_BUSY)
        } else {
            None
        };
        if let Some(why) = refusal {
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
            // The connection went with the closure: the client sees it
            // closed, as with any daemon that cannot serve it.
            ctx.active.fetch_sub(1, Ordering::SeqCst);
            warning!("cannot start a connection thread: {e}");
        }
    }
}

/// Reads one line of at most `MAX_LINE` bytes, all of it within `timeout`.
/// Returns `Ok(None)` at a clean end of stream.
fn read_line(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Option<()>, String> {
    buf.clear();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(i) = pending.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&pending[..i]);
            pending.drain(..=i);
            return Ok(Some(()));
        }
        if pending.len() >= MAX_LINE {
            return Err(format!("request line longer than {MAX_LINE} bytes"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete request line within {} s",
                timeout.as_secs()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        // Straight into `pending`, not through a buffer on this thread's
        // small stack: 4 to 64 KiB at a time, as its capacity allows.
        let had = pending.len();
        let room = (pending.capacity() - had).clamp(4096, 64 * 1024);
        pending.resize(had + room, 0);
        let read = stream.read(&mut pending[had..]);
        pending.truncate(had + read.as_ref().map_or(0, |n| *n));
        match read {
            Ok(0) if pending.is_empty() => return Ok(None),
            Ok(0) => return Err("request line not terminated by a newline".into()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no complete request line within {} s",
                    timeout.as_secs()
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn handle(ctx: &Context, mut stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut line = Vec::new();
    let mut pending = Vec::new();
    loop {
        match read_line(&mut stream, &mut line, &mut pending, REQUEST_TIMEOUT) {
            Ok(Some(())) => {}
            Ok(None) => return,
            Err(why) => {
                let _ = stream.write_all(final_line(Err(&why)).as_bytes());
                return;
            }
        }
        let reply = match parse_request(&line, &ctx.store_dir) {
            Ok(req) => respond(ctx, &mut stream, req),
            Err(e @ ProtocolError::TooLong) => {
                // Whether the newline arrived in time or not, an over-long
                // line ends the connection.
                let _ = stream.write_all(final_line(Err(&e.to_string())).as_bytes());
                return;
            }
            Err(e) => final_line(Err(&e.to_string())),
        };
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn respond(ctx: &Context, stream: &mut UnixStream, req: Request) -> String {
    match req {
        Request::Enqueue(paths) => enqueue(ctx, &paths),
        Request::Drv(drv) => enqueue(ctx, &[drv]),
        Request::Ping => final_line(Ok(&format!("nix-post-build-hook-queue {}", crate::VERSION))),
        Request::Status { json: false } => snapshot(ctx).text() + &final_line(Ok("")),
        Request::Status { json: true } => snapshot(ctx).json() + &final_line(Ok("")),
        Request::Retry => {
            let n = ctx.shared.lock().backing_off();
            let _ = ctx.tx.send(Msg::Retry);
            final_line(Ok(&n.to_string()))
        }
        Request::Wait => wait(ctx, stream),
        Request::Requeue(selection) => requeue(ctx, selection),
        Request::Drop(selection) => drop_paths(ctx, selection),
    }
}

/// Requeues paths given up on: journaled, logged, and handed to the worker
/// with fresh attempts. Replies with how many were given up on.
fn requeue(ctx: &Context, selection: Selection) -> String {
    let chosen = match &selection {
        Selection::Paths(paths) => Some(paths.as_slice()),
        Selection::AllFailed => None,
    };
    match ctx.journal.requeue(chosen) {
        Ok(requeued) => {
            for p in &requeued {
                info!("requeued {p} (an operator's request): it is tried again");
            }
            let n = requeued.len();
            if n > 0 && ctx.tx.send(Msg::Queued(requeued)).is_err() {
                return final_line(Err(ERR_WORKER_GONE));
            }
            final_line(Ok(&n.to_string()))
        }
        Err(e) => {
            error!("cannot journal a requeue: {e}");
            final_line(Err(&format!("{ERR_JOURNAL}: {e}; nothing was requeued")))
        }
    }
}

/// Drops queued paths (or every path given up on) from the journal: they
/// are not uploaded. Replies with how many were queued.
fn drop_paths(ctx: &Context, selection: Selection) -> String {
    let paths = match selection {
        Selection::Paths(paths) => paths,
        Selection::AllFailed => {
            let mut all: Vec<StorePath> = ctx
                .target_ids
                .iter()
                .flat_map(|t| ctx.journal.given_up_on(*t))
                .map(|(p, _)| p)
                .collect();
            let mut seen = std::collections::HashSet::new();
            all.retain(|p| seen.insert(p.clone()));
            all
        }
    };
    let n = crate::worker::drop_paths(
        &ctx.journal,
        &ctx.shared,
        &paths,
        "dropped by an operator's request; it is not uploaded",
    );
    final_line(Ok(&n.to_string()))
}

/// Journals the paths and only then acknowledges them.
fn enqueue(ctx: &Context, paths: &[StorePath]) -> String {
    match ctx.journal.append(paths) {
        Ok(added) => {
            let n = added.len();
            if n > 0 && ctx.tx.send(Msg::Queued(added)).is_err() {
                return final_line(Err(ERR_WORKER_GONE));
            }
            final_line(Ok(&n.to_string()))
        }
        Err(e) => {
            error!("cannot journal {} paths: {e}", paths.len());
            final_line(Err(&format!("{ERR_JOURNAL}: {e}; nothing was queued")))
        }
    }
}

/// Paths given up on, named with their last error, for `wait`'s reply.
fn describe_given_up(given_up: &[(StorePath, crate::journal::GivenUp)]) -> String {
    /// Paths named in full; the rest are counted.
    const NAMED: usize = 3;
    let named: Vec<String> = given_up
        .iter()
        .take(NAMED)
        .map(|(p, g)| format!("{p} ({})", shorten(&g.error, 300)))
        .collect();
    let more = match given_up.len().saturating_sub(NAMED) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    format!(
        "{} path(s) failed and were given up on: {}{more}; see status, then requeue or drop them",
        given_up.len(),
        named.join(", ")
    )
}

/// At most `max` characters of `text`, the rest marked as cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// `text` on one line, newline added.
fn protocol_line(text: &str) -> String {
    format!("{}\n", crate::protocol::one_line(text))
}

/// The `wait` reply: `remaining N failing M` lines while paths queued
/// before the request are still queued (with `error PATH TEXT`, the last
/// error of the first failing one, when M > 0), then `ok ...` or `err ...`
/// when none is left: when every target has each path, or is given up on
/// for it. Paths given up on are not waited for: those given up on while it
/// waits make it `err` (named); those given up on before it are only
/// mentioned.
fn wait(ctx: &Context, stream: &mut UnixStream) -> String {
    let target = ctx.journal.last_seq();
    let _ = ctx.tx.send(Msg::Flush);
    let drops_before = ctx.shared.lock().dropped;
    // Every target's paths given up on, with the target named in the error
    // when there are several.
    let given_up_on = || -> Vec<(StorePath, crate::journal::GivenUp)> {
        let labels: Vec<String> = ctx
            .shared
            .lock()
            .targets
            .iter()
            .map(|t| t.label.clone())
            .collect();
        let mut all = Vec::new();
        for (id, label) in ctx.target_ids.iter().zip(labels) {
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
    let earlier: std::collections::HashSet<(StorePath, TargetId, u64)> = given_up_on()
        .into_iter()
        .map(|(p, g)| (p, g.target, g.at))
        .collect();
    let mut last: Option<(usize, usize)> = None;
    let mut last_sent = Instant::now();
    loop {
        let given_up = given_up_on();
        let remaining = ctx.journal.count_waiting_up_to(target, &ctx.target_ids);
        let (failing, new_drops, last_error) = {
            let s = ctx.shared.lock();
            // The error of the first failing path waited for.
            let last_error = s
                .targets
                .iter()
                .flat_map(|t| t.backoff.iter())
                .filter(|(_, b)| b.attempts > 0)
                .filter_map(|(p, b)| Some((ctx.journal.entry(p)?.seq, p, &b.last_error)))
                .filter(|(seq, _, _)| *seq <= target)
                .min_by_key(|(seq, _, _)| *seq)
                .map(|(_, p, e)| format!(" error {p} {}", redact::text(&shorten(e, 500))));
            let recent_new = (s.dropped - drops_before) as usize;
            let failing: std::collections::HashSet<&StorePath> = s
                .targets
                .iter()
                .flat_map(|t| t.backoff.iter())
                .filter(|(_, b)| b.attempts > 0)
                .map(|(p, _)| p)
                .collect();
            (
                failing.len().min(remaining),
                recent_new,
                last_error.unwrap_or_default(),
            )
        };
        if remaining == 0 {
            let (old, new): (Vec<_>, Vec<_>) = given_up
                .into_iter()
                .partition(|(p, g)| earlier.contains(&(p.clone(), g.target, g.at)));
            let mut problems = Vec::new();
            if !new.is_empty() {
                problems.push(describe_given_up(&new));
            }
            if new_drops > 0 {
                problems.push(format!(
                    "{new_drops} path(s) were dropped; see the daemon's log"
                ));
            }
            return if problems.is_empty() && old.is_empty() {
                final_line(Ok("all uploaded"))
            } else if problems.is_empty() {
                final_line(Ok(&format!(
                    "all uploaded, but for {} path(s) given up on before this wait (see status)",
                    old.len()
                )))
            } else {
                final_line(Err(&redact::text(&problems.join("; "))))
            };
        }
        if last != Some((remaining, failing)) || last_sent.elapsed() >= Duration::from_secs(1) {
            let line = protocol_line(&format!(
                "remaining {remaining} failing {failing}{last_error}"
            ));
            if stream.write_all(line.as_bytes()).is_err() {
                return String::new();
            }
            last = Some((remaining, failing));
            last_sent = Instant::now();
        }
        std::thread::sleep(WAIT_POLL);
    }
}
