//! The durable queue: an append-only journal file in the state directory.
//!
//! The journal is the truth. A path is acknowledged only after its `+`
//! record is written and fsynced; it leaves the queue with a `-` record
//! (uploaded to every target, or dropped). Startup replays the file,
//! cutting off a torn last line from a crash. A complete record that cannot
//! be used (a path of another store directory, a form this version does not
//! know) refuses the open and changes nothing: it may be an acknowledged
//! path. Records, one per line:
//! - `+ <unix-seconds> <store-path>`: queued at that time;
//! - `- <store-path>`: done;
//! - `! <unix-seconds> <target> <attempts> <store-path> <error>`: given up on
//!   for one target (not tried there again until requeued), with the last
//!   error (the rest of the line);
//! - `= <unix-seconds> <target> <store-path>`: requeued for that target (`*`:
//!   every target) at that time, which counts as queued then;
//! - `> <target> <store-path>`: that target has the path, others not yet.
//!
//! A `<target>` is a [`TargetId`], never the URL (which may hold a password).
//! Writers share fsyncs (group commit): while one thread writes and syncs,
//! the others add their records to the next group. Once most records are
//! dead, the live ones are written to a new file without the lock; under
//! it, what came meanwhile is appended and the new file renamed over.
//!
//! A write that fails is undone (the file cut back) and refuses the
//! `enqueue` it carried. Every other failure ends the daemon with status 1:
//! one that cannot be undone (the cut fails, or fsync does, after which the
//! kernel may have dropped the data), and one of a record no client waits
//! for. So no reply depends on a record not on disk, memory is never left
//! ahead of the file, and the restart recovers from the journal.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store_path::StorePath;

/// File name of the journal inside the state directory.
pub const FILE_NAME: &str = "journal";
/// Dead records tolerated before a compaction is considered.
const COMPACT_MIN_DEAD: usize = 4096;
/// Dropped paths a `wait` names; the rest are counted.
const DROPS_NAMED: usize = 3;

/// What is known about one queued path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Order of arrival; outputs of a derivation inherit the derivation's.
    pub seq: u64,
    /// When it was first queued, in seconds since the Unix epoch.
    pub queued_at: u64,
}

/// Which target a per-target record is about: an FNV-1a hash of the
/// target's URL with its secrets masked, shown as 16 hex digits. Stable
/// across restarts and versions (unlike std's hashers), and without the
/// password a URL may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetId(u64);

impl TargetId {
    /// The id of the target at `url`, or of "sign only" when there is none.
    pub fn of(url: Option<&str>) -> TargetId {
        let shown = url.map_or_else(|| "-".to_string(), crate::redact::url);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in shown.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        TargetId(h)
    }

    fn parse(s: &str) -> Option<TargetId> {
        (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok().map(TargetId))?
    }
}

impl std::fmt::Display for TargetId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A path given up on for one target: it failed too often or too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenUp {
    /// The target it failed for.
    pub target: TargetId,
    /// When it was given up on, in seconds since the Unix epoch.
    pub at: u64,
    /// Failed attempts before it was given up on.
    pub attempts: u32,
    /// The last error, on one line.
    pub error: String,
}

/// What replaying the journal found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Live paths in the order they were queued.
    pub paths: Vec<StorePath>,
    /// Bytes of a torn last record that were cut off.
    pub torn_bytes: usize,
}

/// One journal record (see the module doc for the line of each).
#[derive(Debug, Clone)]
enum Record {
    Add(StorePath, u64),
    Done(StorePath),
    GiveUp(StorePath, GivenUp),
    /// `None`: for every target.
    Requeue(StorePath, Option<TargetId>, u64),
    Delivered(StorePath, TargetId),
}

impl Record {
    fn write(&self, buf: &mut Vec<u8>) {
        let line = match self {
            Record::Add(p, at) => format!("+ {at} {p}"),
            Record::Done(p) => format!("- {p}"),
            Record::GiveUp(p, g) => {
                // The journal is private, but a password has no business on disk.
                let error = crate::protocol::one_line(&crate::redact::text(&g.error));
                let (at, t, n) = (g.at, g.target, g.attempts);
                format!("! {at} {t} {n} {p} {}", error.trim())
            }
            Record::Requeue(p, t, at) => {
                let t = t.map_or_else(|| "*".to_string(), |t| t.to_string());
                format!("= {at} {t} {p}")
            }
            Record::Delivered(p, t) => format!("> {t} {p}"),
        };
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
    }

    /// A record's tag, its fields, and which of them is the store path.
    fn fields(line: &str) -> Option<(&str, Vec<&str>, usize)> {
        let (tag, rest) = line.split_once(' ')?;
        // At most one field more than the record has, to see one too many;
        // the error of `!` is the rest of the line.
        let (split, path) = match tag {
            "+" | ">" => (3, 1),
            "-" => (2, 0),
            "!" => (5, 3),
            "=" => (4, 2),
            _ => return None,
        };
        Some((tag, rest.splitn(split, ' ').collect(), path))
    }

    fn parse(line: &[u8], store_dir: &str) -> Option<Record> {
        let (tag, f, at) = Record::fields(std::str::from_utf8(line).ok()?)?;
        let path = StorePath::parse(f.get(at)?, store_dir).ok()?;
        let num = |i: usize| f.get(i)?.parse::<u64>().ok();
        let target = |i: usize| TargetId::parse(f.get(i)?);
        Some(match (tag, f.len()) {
            ("+", 2) => Record::Add(path, num(0)?),
            ("-", 1) => Record::Done(path),
            ("!", 4 | 5) => Record::GiveUp(
                path,
                GivenUp {
                    target: target(1)?,
                    at: num(0)?,
                    attempts: u32::try_from(num(2)?).ok()?,
                    error: f.get(4).unwrap_or(&"").to_string(),
                },
            ),
            ("=", 3) if f[1] == "*" => Record::Requeue(path, None, num(0)?),
            ("=", 3) => Record::Requeue(path, Some(target(1)?), num(0)?),
            (">", 2) => Record::Delivered(path, target(0)?),
            _ => return None,
        })
    }
}

/// The outcome of one group of records: set once written (`Err`: undone).
type Group = Arc<OnceLock<Result<(), String>>>;

/// What a `wait` learns of the drops of the paths it waits for: how many,
/// and the first few. See [`Journal::watch_drops`].
pub type Drops = Mutex<(usize, Vec<StorePath>)>;

/// The durable queue shared by the connection threads and the worker.
pub struct Journal {
    inner: Mutex<Inner>,
    /// Signalled when a group's write is done.
    written: Condvar,
}

struct Inner {
    dir: PathBuf,
    file: Arc<File>,
    len: u64,
    live: HashMap<StorePath, Entry>,
    /// Live paths given up on, per target.
    given_up: HashMap<StorePath, Vec<GivenUp>>,
    /// Live paths some targets have (not all of them yet).
    delivered: HashMap<StorePath, Vec<TargetId>>,
    next_seq: u64,
    /// Records in the file, and how many of them describe the live state.
    records: usize,
    live_records: usize,
    /// Records of the next group, the paths it queues, and its outcome.
    pending: Vec<u8>,
    pending_adds: Vec<StorePath>,
    group: Group,
    /// The group being (or last) written.
    writing: Group,
    syncing: bool,
    compacting: bool,
    /// Dead records at which a compaction is tried next (raised after a
    /// failed one, so a full disk is not hit with a rewrite per call).
    compact_at: usize,
    /// The `wait`s in progress: the newest path each waits for, and what
    /// it learns (forgotten once the `wait` lets go of it).
    watches: Vec<(u64, Weak<Drops>)>,
}

impl Inner {
    /// True when `target` neither has the queued `path` nor is given up on
    /// for it.
    fn is_pending(&self, path: &StorePath, target: TargetId) -> bool {
        !self
            .delivered
            .get(path)
            .is_some_and(|h| h.contains(&target))
            && !self.given_up_for(path, target)
    }

    fn given_up_for(&self, path: &StorePath, target: TargetId) -> bool {
        let list = self.given_up.get(path);
        list.is_some_and(|l| l.iter().any(|g| g.target == target))
    }

    /// Applies one record to the state in memory, as replay does; returns
    /// false when it changed nothing.
    fn apply(&mut self, record: &Record) -> bool {
        match record {
            Record::Add(path, queued_at) => {
                if self.live.contains_key(path) {
                    return false;
                }
                self.next_seq += 1;
                let entry = Entry {
                    seq: self.next_seq,
                    queued_at: *queued_at,
                };
                self.live.insert(path.clone(), entry);
                self.live_records += 1;
            }
            Record::Done(path) => {
                if self.live.remove(path).is_none() {
                    return false;
                }
                let failures = self.given_up.remove(path).map_or(0, |g| g.len());
                let deliveries = self.delivered.remove(path).map_or(0, |d| d.len());
                self.live_records -= 1 + failures + deliveries;
            }
            Record::GiveUp(path, g) => {
                if !self.live.contains_key(path) {
                    return false;
                }
                let list = self.given_up.entry(path.clone()).or_default();
                let before = list.len();
                list.retain(|old| old.target != g.target);
                if list.len() == before {
                    self.live_records += 1;
                }
                list.push(g.clone());
            }
            Record::Requeue(path, target, at) => {
                if let Some(list) = self.given_up.get_mut(path) {
                    let before = list.len();
                    list.retain(|g| target.is_some_and(|t| t != g.target));
                    self.live_records -= before - list.len();
                    if list.is_empty() {
                        self.given_up.remove(path);
                    }
                }
                if let Some(entry) = self.live.get_mut(path) {
                    entry.queued_at = *at;
                }
            }
            Record::Delivered(path, target) => {
                if !self.live.contains_key(path) {
                    return false;
                }
                let have = self.delivered.entry(path.clone()).or_default();
                if have.contains(target) {
                    return false;
                }
                have.push(*target);
                self.live_records += 1;
            }
        }
        true
    }

    /// The live records, each with its path's place in line: cloned under
    /// the lock, ordered and formatted by [`file_of`] without it.
    fn snapshot(&self) -> Vec<(u64, Record)> {
        let mut out = Vec::with_capacity(self.live_records);
        for (path, e) in &self.live {
            out.push((e.seq, Record::Add(path.clone(), e.queued_at)));
            for g in self.given_up.get(path).into_iter().flatten() {
                out.push((e.seq, Record::GiveUp(path.clone(), g.clone())));
            }
            for t in self.delivered.get(path).into_iter().flatten() {
                out.push((e.seq, Record::Delivered(path.clone(), *t)));
            }
        }
        out
    }
}

/// The compacted journal: the records in their paths' order (a stable
/// sort, so each path's `+` stays first).
fn file_of(mut records: Vec<(u64, Record)>) -> Vec<u8> {
    records.sort_by_key(|(seq, _)| *seq);
    let mut data = Vec::with_capacity(records.len() * 80);
    records.iter().for_each(|(_, r)| r.write(&mut data));
    data
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Ends the daemon after a journal failure that no reply can stand for;
/// the restart recovers from the file.
fn fatal(what: &str, e: &io::Error) -> ! {
    crate::error!("journal: {what}: {e}; stopping (a restart recovers from the journal)");
    std::process::exit(1)
}

fn count_lines(data: &[u8]) -> usize {
    data.iter().filter(|&&b| b == b'\n').count()
}

type Guard<'a> = MutexGuard<'a, Inner>;

impl Journal {
    /// Opens (creating if needed) the journal in `dir` and replays it.
    ///
    /// Fails with [`io::ErrorKind::InvalidData`], before anything in the
    /// file is changed, when a complete record cannot be used: a path that
    /// is not under `store_dir` (the message names the store directory the
    /// journal holds), or a line this version cannot read. Such a record may
    /// be an acknowledged path; compaction would erase it for good.
    pub fn open(dir: &Path, store_dir: &str) -> io::Result<(Journal, Replay)> {
        fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let mut file = open_append(&path)?;
        // The journal's name is durable before the first acknowledgement
        // (and the directory's, where it can be synced).
        sync_dir(dir)?;
        let _ = dir.parent().map(sync_dir);
        // Sized for the file (records are about 80 bytes), so that the map
        // is not rehashed again and again while it fills.
        let capacity = usize::try_from(file.metadata()?.len() / 80).unwrap_or(0);
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            file: Arc::new(file.try_clone()?),
            len: 0,
            live: HashMap::with_capacity(capacity.min(1 << 22)),
            given_up: HashMap::new(),
            delivered: HashMap::new(),
            next_seq: 0,
            records: 0,
            live_records: 0,
            pending: Vec::new(),
            pending_adds: Vec::new(),
            group: Arc::new(OnceLock::new()),
            writing: Arc::new(OnceLock::from(Ok(()))),
            syncing: false,
            compacting: false,
            compact_at: COMPACT_MIN_DEAD,
            watches: Vec::new(),
        };
        // Record by record, so replay needs no copy of the whole file.
        let mut replay = Replay::default();
        let mut reader = BufReader::with_capacity(64 * 1024, &mut file);
        let mut line = Vec::with_capacity(256);
        let mut line_no = 0usize;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                replay.torn_bytes = n;
                break;
            }
            inner.len += n as u64;
            line_no += 1;
            let record = &line[..n - 1];
            if record.is_empty() {
                continue;
            }
            inner.records += 1;
            match Record::parse(record, store_dir) {
                Some(r) => _ = inner.apply(&r),
                None => return Err(unusable_record(&path, line_no, record, store_dir)),
            }
        }
        drop(reader);
        if replay.torn_bytes > 0 {
            file.set_len(inner.len)?;
            file.sync_data()?;
        }
        let mut ordered: Vec<(&StorePath, &Entry)> = inner.live.iter().collect();
        ordered.sort_unstable_by_key(|(_, e)| e.seq);
        replay.paths = ordered.into_iter().map(|(p, _)| p.clone()).collect();
        let dead = inner.records.saturating_sub(inner.live_records);
        let at_start = dead > 0 && dead >= inner.live.len();
        let journal = Journal {
            inner: Mutex::new(inner),
            written: Condvar::new(),
        };
        if at_start {
            // Only an optimisation: a full disk must not keep the daemon
            // from starting (it can still answer, and drain the queue).
            journal.compact();
        }
        Ok((journal, replay))
    }

    fn lock(&self) -> Guard<'_> {
        // Every update is finished under one lock hold, so a poisoned
        // lock's data is consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the paths not queued yet and returns them once they are on
    /// disk. Returns only when every one of the paths is on disk, including
    /// those another caller is writing at the same moment. On error the
    /// paths of the failed write are not queued.
    pub fn append(&self, paths: &[StorePath]) -> io::Result<Vec<StorePath>> {
        self.append_at(paths, None)
    }

    fn append_at(&self, paths: &[StorePath], inherit: Option<Entry>) -> io::Result<Vec<StorePath>> {
        let mut inner = self.lock();
        let mut added = Vec::new();
        loop {
            let now = now_secs();
            let mut records = Vec::new();
            let mut new = Vec::new();
            for path in paths {
                let record = Record::Add(path.clone(), inherit.map_or(now, |e| e.queued_at));
                if inner.apply(&record) {
                    if let (Some(e), Some(mine)) = (inherit, inner.live.get_mut(path)) {
                        *mine = e;
                    }
                    record.write(&mut records);
                    new.push(path.clone());
                }
            }
            inner.pending_adds.extend(new.iter().cloned());
            // With nothing new, this waits for the writes in progress, which
            // may hold the paths another caller queued a moment ago.
            let (guard, result) = self.commit(inner, &records);
            inner = guard;
            match result {
                Err(e) if !new.is_empty() => return Err(e),
                _ => added.extend(new),
            }
            // A failed write of another caller took its paths back: queue
            // those again ourselves.
            if paths.iter().all(|p| inner.live.contains_key(p)) {
                return Ok(added);
            }
        }
    }

    /// Applies `records` and writes them; a failure ends the daemon.
    fn write(&self, mut inner: Guard<'_>, records: Vec<Record>) {
        let mut buf = Vec::new();
        for r in records {
            if inner.apply(&r) {
                r.write(&mut buf);
            }
        }
        if buf.is_empty() {
            return;
        }
        if let (_, Err(e)) = self.commit(inner, &buf) {
            fatal("cannot write a record", &e);
        }
        let inner = self.lock();
        let dead = inner.records.saturating_sub(inner.live_records);
        if dead >= inner.compact_at && dead > inner.live.len() && !inner.compacting {
            drop(inner);
            self.compact();
        }
    }

    /// Marks paths as done (uploaded), durably.
    pub fn complete(&self, paths: &[StorePath]) -> io::Result<()> {
        let inner = self.lock();
        self.write(inner, paths.iter().cloned().map(Record::Done).collect());
        Ok(())
    }

    /// Drops queued paths, durably: like [`Journal::complete`], and every
    /// `wait` that waits for one of them is told. Returns those dropped.
    pub fn drop_paths(&self, paths: &[StorePath]) -> Vec<StorePath> {
        let mut inner = self.lock();
        let seqs: Vec<(u64, &StorePath)> = (paths.iter())
            .filter_map(|p| Some((inner.live.get(p)?.seq, p)))
            .collect();
        inner.watches.retain(|(_, w)| w.strong_count() > 0);
        for (up_to, drops) in &inner.watches {
            let Some(drops) = drops.upgrade() else {
                continue;
            };
            let mut drops = drops.lock().unwrap_or_else(|e| e.into_inner());
            for (_, p) in seqs.iter().filter(|(seq, _)| seq <= up_to) {
                drops.0 += 1;
                if drops.1.len() < DROPS_NAMED {
                    drops.1.push((*p).clone());
                }
            }
        }
        let dropped: Vec<StorePath> = seqs.into_iter().map(|(_, p)| p.clone()).collect();
        self.write(inner, dropped.iter().cloned().map(Record::Done).collect());
        dropped
    }

    /// Counts, for a `wait`, the drops of paths queued at or before `seq`,
    /// for as long as it holds the result.
    pub fn watch_drops(&self, seq: u64) -> Arc<Drops> {
        let drops = Arc::new(Mutex::new((0, Vec::new())));
        let mut inner = self.lock();
        inner.watches.retain(|(_, w)| w.strong_count() > 0);
        inner.watches.push((seq, Arc::downgrade(&drops)));
        drops
    }

    /// Records, durably, that `target` has the paths. A path that every one
    /// of `targets` now has is done and leaves the journal (`-`); for the
    /// others a `>` record remembers which target has it. Returns the paths
    /// that left the journal.
    pub fn deliver(
        &self,
        paths: &[StorePath],
        target: TargetId,
        targets: &[TargetId],
    ) -> io::Result<Vec<StorePath>> {
        let inner = self.lock();
        let mut records = Vec::new();
        let mut done = Vec::new();
        for path in paths.iter().filter(|p| inner.live.contains_key(*p)) {
            let have = inner.delivered.get(path).map_or(&[][..], Vec::as_slice);
            if targets.iter().all(|t| *t == target || have.contains(t)) {
                records.push(Record::Done(path.clone()));
                done.push(path.clone());
            } else {
                records.push(Record::Delivered(path.clone(), target));
            }
        }
        self.write(inner, records);
        Ok(done)
    }

    /// True when `target` has `path` (and some other target not yet).
    pub fn is_delivered(&self, path: &StorePath, target: TargetId) -> bool {
        self.lock()
            .delivered
            .get(path)
            .is_some_and(|h| h.contains(&target))
    }

    /// Queued paths `target` does not have and is not given up on for.
    pub fn count_pending(&self, target: TargetId) -> usize {
        self.count_waiting_up_to(u64::MAX, &[target])
    }

    /// How many paths that arrived at or before sequence number `seq` some
    /// of `targets` still has to take (neither has them nor is given up on
    /// for them): what `wait` waits for.
    pub fn count_waiting_up_to(&self, seq: u64, targets: &[TargetId]) -> usize {
        let inner = self.lock();
        let waiting = inner
            .live
            .iter()
            .filter(|(p, e)| e.seq <= seq && targets.iter().any(|t| inner.is_pending(p, *t)));
        waiting.count()
    }

    /// Completes every path that each of `targets` has: after a target was
    /// taken out of the configuration, the others may have them all.
    /// Returns how many left the journal.
    pub fn settle(&self, targets: &[TargetId]) -> io::Result<usize> {
        let inner = self.lock();
        let done: Vec<Record> = (inner.delivered.iter())
            .filter(|(_, have)| targets.iter().all(|t| have.contains(t)))
            .map(|(p, _)| Record::Done(p.clone()))
            .collect();
        let n = done.len();
        self.write(inner, done);
        Ok(n)
    }

    /// Replaces a derivation by its outputs, which keep its place in line.
    /// Returns the outputs that were not queued already.
    pub fn replace(&self, drv: &StorePath, outputs: &[StorePath]) -> io::Result<Vec<StorePath>> {
        let entry = self.entry(drv);
        let added = self.append_at(outputs, entry)?;
        self.complete(std::slice::from_ref(drv))?;
        Ok(added)
    }

    /// Gives up on a queued path for `target`, durably: it is not tried for
    /// that target again until [`Journal::requeue`]. False when the path is
    /// no longer queued (uploaded or dropped meanwhile).
    pub fn give_up(&self, path: &StorePath, given_up: GivenUp) -> io::Result<bool> {
        let inner = self.lock();
        let live = inner.live.contains_key(path);
        self.write(inner, vec![Record::GiveUp(path.clone(), given_up)]);
        Ok(live)
    }

    /// Requeues paths given up on, for every target, durably: `None`
    /// requeues every one. They count as queued now. Returns the paths
    /// requeued, oldest first.
    pub fn requeue(&self, paths: Option<&[StorePath]>) -> io::Result<Vec<StorePath>> {
        let inner = self.lock();
        let mut chosen: Vec<(u64, StorePath)> = match paths {
            Some(paths) => paths
                .iter()
                .filter(|p| inner.given_up.contains_key(*p))
                .collect(),
            None => inner.given_up.keys().collect::<Vec<_>>(),
        }
        .into_iter()
        .map(|p| (inner.live.get(p).map_or(0, |e| e.seq), p.clone()))
        .collect();
        chosen.sort_unstable();
        chosen.dedup();
        let now = now_secs();
        let records = chosen
            .iter()
            .map(|(_, p)| Record::Requeue(p.clone(), None, now));
        self.write(inner, records.collect());
        Ok(chosen.into_iter().map(|(_, p)| p).collect())
    }

    /// True when `path` is given up on for `target`.
    pub fn is_given_up(&self, path: &StorePath, target: TargetId) -> bool {
        self.lock().given_up_for(path, target)
    }

    /// The paths given up on for `target`, oldest first, with why.
    pub fn given_up_on(&self, target: TargetId) -> Vec<(StorePath, GivenUp)> {
        self.given_up_up_to(u64::MAX, target)
    }

    /// Like [`Journal::given_up_on`], for the paths that arrived at or before
    /// sequence number `seq`.
    pub fn given_up_up_to(&self, seq: u64, target: TargetId) -> Vec<(StorePath, GivenUp)> {
        let inner = self.lock();
        let mut out: Vec<(u64, StorePath, GivenUp)> = (inner.given_up.iter())
            .filter_map(|(p, list)| {
                let seq_of = inner.live.get(p)?.seq;
                let g = list.iter().find(|g| g.target == target)?;
                (seq_of <= seq).then(|| (seq_of, p.clone(), g.clone()))
            })
            .collect();
        out.sort_unstable_by_key(|(s, _, _)| *s);
        out.into_iter().map(|(_, p, g)| (p, g)).collect()
    }

    /// The entry of a queued path, if it is queued.
    pub fn entry(&self, path: &StorePath) -> Option<Entry> {
        self.lock().live.get(path).copied()
    }

    /// Number of queued paths.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence number of the newest path queued so far.
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// The oldest queued path's entry, by sequence number.
    pub fn oldest(&self) -> Option<Entry> {
        self.lock().live.values().min_by_key(|e| e.seq).copied()
    }

    /// Adds `records` to the next group and waits until that group is
    /// written (with none, until the writes in progress are). Whoever finds
    /// no write in progress writes the group. `Err`: the group's write
    /// failed and was undone.
    fn commit<'a>(&'a self, mut inner: Guard<'a>, records: &[u8]) -> (Guard<'a>, io::Result<()>) {
        inner.pending.extend_from_slice(records);
        let mine = if !inner.pending.is_empty() {
            Arc::clone(&inner.group)
        } else if inner.syncing {
            Arc::clone(&inner.writing)
        } else {
            return (inner, Ok(()));
        };
        loop {
            if let Some(result) = mine.get() {
                return (inner, result.clone().map_err(io::Error::other));
            }
            if inner.syncing {
                inner = self.written.wait(inner).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            inner.syncing = true;
            let buf = std::mem::take(&mut inner.pending);
            let adds = std::mem::take(&mut inner.pending_adds);
            let group = std::mem::replace(&mut inner.group, Arc::new(OnceLock::new()));
            inner.writing = Arc::clone(&group);
            let (file, before) = (Arc::clone(&inner.file), inner.len);
            drop(inner);
            let result = write_undoably(&file, &buf, before);
            inner = self.lock();
            if result.is_ok() {
                inner.len = before + buf.len() as u64;
                inner.records += count_lines(&buf);
            } else {
                // Not on disk, so not queued (before anyone else looks).
                for path in adds {
                    inner.apply(&Record::Done(path));
                }
            }
            let _ = group.set(result.map_err(|e| e.to_string()));
            inner.syncing = false;
            self.written.notify_all();
        }
    }

    /// Waits until no write is in progress or pending: memory and file agree.
    fn wait_idle<'a>(&'a self, mut inner: Guard<'a>) -> Guard<'a> {
        while inner.syncing || !inner.pending.is_empty() {
            inner = self.commit(inner, &[]).0;
        }
        inner
    }

    /// Rewrites the journal with only the live records, writing the new
    /// file without the lock; a failure before the rename leaves the old
    /// journal in use, with a warning.
    fn compact(&self) {
        let mut inner = self.wait_idle(self.lock());
        if inner.compacting {
            return;
        }
        inner.compacting = true;
        let (records, from, dir) = (inner.snapshot(), inner.len, inner.dir.clone());
        drop(inner);
        let data = file_of(records);
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let result = self.replace_file(&tmp, &data, from);
        let mut inner = self.lock();
        inner.compacting = false;
        let dead = inner.records.saturating_sub(inner.live_records);
        match result {
            Ok(()) => inner.compact_at = COMPACT_MIN_DEAD,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                inner.compact_at = dead.saturating_mul(2).max(COMPACT_MIN_DEAD);
                crate::warning!(
                    "journal: cannot compact {}: {e}; going on with the uncompacted journal",
                    dir.join(FILE_NAME).display()
                );
            }
        }
    }

    /// Writes `data` to `tmp`, then, under the lock, appends what the
    /// journal gained after offset `from` and renames `tmp` over it.
    fn replace_file(&self, tmp: &Path, data: &[u8], from: u64) -> io::Result<()> {
        // Opened for appending before the rename, so that once the new file
        // is in place no later failure can leave us writing to the old one.
        let mut f = open_append(tmp)?;
        f.set_len(0)?;
        f.write_all(data)?;
        f.sync_data()?;
        let mut inner = self.wait_idle(self.lock());
        let mut meanwhile = vec![0; usize::try_from(inner.len - from).unwrap_or(0)];
        inner.file.read_exact_at(&mut meanwhile, from)?;
        f.write_all(&meanwhile)?;
        f.sync_data()?;
        fs::rename(tmp, inner.dir.join(FILE_NAME))?;
        inner.file = Arc::new(f);
        inner.len = (data.len() + meanwhile.len()) as u64;
        inner.records = count_lines(data) + count_lines(&meanwhile);
        // Records go to the new file from now on: its name must be durable.
        if let Err(e) = sync_dir(&inner.dir) {
            fatal("cannot sync the directory after compacting", &e);
        }
        Ok(())
    }
}

/// Appends `buf` to `file` (of `len` bytes) and syncs it. A failed write is
/// undone and returned; one that cannot be undone, or a failed sync, ends
/// the daemon.
fn write_undoably(file: &File, buf: &[u8], len: u64) -> io::Result<()> {
    if let Err(e) = (&*file).write_all(buf) {
        match file.set_len(len) {
            Ok(()) => return Err(e),
            Err(cut) => fatal(
                &format!("cannot write ({e}), nor cut the half record off"),
                &cut,
            ),
        }
    }
    if let Err(e) = file.sync_data() {
        fatal("cannot sync", &e);
    }
    Ok(())
}

/// The error for a complete record [`Record::parse`] rejected: names the
/// line, and when the record is a path of another store directory, that
/// directory and how to start the daemon for it.
fn unusable_record(journal: &Path, line_no: usize, record: &[u8], store_dir: &str) -> io::Error {
    let text = String::from_utf8_lossy(record);
    let path = Record::fields(&text).and_then(|(_, f, i)| f.get(i).copied());
    let other_store = path.and_then(|p| {
        let (dir, _) = p.rsplit_once('/')?;
        (dir != store_dir && StorePath::parse(p, dir).is_ok()).then_some(dir)
    });
    let what = match other_store {
        Some(other) => format!(
            "queues a path of the store directory {other}, but this daemon uses store-dir \
             {store_dir}: start the daemon with store-dir = {other} (or NIX_STORE_DIR={other}) \
             to deliver its paths"
        ),
        None => format!(
            "is not a record this version can read ({:?}); expected '+ <seconds> <store-path>', \
             '- <store-path>', '! <seconds> <target> <attempts> <store-path> <error>', '= \
             <seconds> <target> <store-path>' or '> <target> <store-path>' with paths under \
             {store_dir}: start the version that wrote it",
            crate::redact::text(&text.chars().take(200).collect::<String>())
        ),
    };
    let j = journal.display();
    let message =
        format!("{j} line {line_no} {what}, or move the journal aside; nothing in it was changed");
    io::Error::new(io::ErrorKind::InvalidData, message)
}
#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "/nix/store";

    fn path(i: usize) -> StorePath {
        StorePath::parse(&format!("{S}/{i:032}-p{i}"), S).unwrap()
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir().join(format!(
                "npbhq-journal-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&d);
            Dir(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn append_complete_replay() {
        let dir = Dir::new("basic");
        {
            let (j, r) = Journal::open(&dir.0, S).unwrap();
            assert!(r.paths.is_empty());
            assert_eq!(
                j.append(&[path(1), path(2), path(1)]).unwrap(),
                vec![path(1), path(2)]
            );
            assert_eq!(j.append(&[path(2), path(3)]).unwrap(), vec![path(3)]);
            j.complete(&[path(2)]).unwrap();
            assert_eq!(j.len(), 2);
        }
        let (j, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1), path(3)]);
        assert_eq!(j.len(), 2);
    }

    #[test]
    fn torn_tail_at_every_offset_keeps_earlier_records() {
        let dir = Dir::new("torn");
        {
            let (j, _) = Journal::open(&dir.0, S).unwrap();
            j.append(&[path(1), path(2)]).unwrap();
            j.append(&[path(3)]).unwrap();
        }
        let file = dir.0.join(FILE_NAME);
        let full = fs::read(&file).unwrap();
        let last_start = full[..full.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap()
            + 1;
        for cut in last_start..full.len() {
            fs::write(&file, &full[..cut]).unwrap();
            let (j, r) = Journal::open(&dir.0, S).unwrap();
            assert_eq!(r.paths, vec![path(1), path(2)], "cut at {cut}");
            assert_eq!(r.torn_bytes, cut - last_start);
            j.append(&[path(4)]).unwrap();
            drop(j);
            let (_, r) = Journal::open(&dir.0, S).unwrap();
            assert_eq!(r.paths, vec![path(1), path(2), path(4)], "cut at {cut}");
        }
    }

    #[test]
    fn compaction_keeps_live_paths_in_order() {
        let dir = Dir::new("compact");
        let n = COMPACT_MIN_DEAD + 10;
        {
            let (j, _) = Journal::open(&dir.0, S).unwrap();
            let all: Vec<StorePath> = (0..n).map(path).collect();
            j.append(&all).unwrap();
            j.complete(&all[..n - 3]).unwrap();
            assert_eq!(j.len(), 3);
        }
        let text = fs::read_to_string(dir.0.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 3, "compacted to the live records");
        let (_, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(n - 3), path(n - 2), path(n - 1)]);
    }

    #[test]
    fn failed_compaction_is_not_fatal() {
        let dir = Dir::new("nocompact");
        {
            let (j, _) = Journal::open(&dir.0, S).unwrap();
            j.append(&[path(1), path(2), path(3)]).unwrap();
            j.complete(&[path(1), path(2)]).unwrap();
        }
        // A directory where the compacted copy would be written.
        fs::create_dir(dir.0.join(format!("{FILE_NAME}.tmp"))).unwrap();
        let (j, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(3)]);
        j.append(&[path(4)]).unwrap();
        drop(j);
        let (_, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(3), path(4)]);
    }

    /// Puts path 1 in a group being written by "another caller" (the test),
    /// the way `commit` leaves things while it writes without the lock.
    fn writing_path_1(j: &Journal) -> Group {
        let mut inner = j.lock();
        inner.apply(&Record::Add(path(1), 0));
        inner.syncing = true;
        inner.writing = Arc::new(OnceLock::new());
        Arc::clone(&inner.writing)
    }

    /// Ends that write with `result` (a failure takes path 1 back, as the
    /// writer does).
    fn finish_write(j: &Journal, group: &Group, result: Result<(), String>) {
        let mut inner = j.lock();
        if result.is_err() {
            inner.apply(&Record::Done(path(1)));
        }
        let _ = group.set(result);
        inner.syncing = false;
        j.written.notify_all();
    }

    #[test]
    fn already_queued_path_is_acknowledged_only_once_on_disk() {
        let dir = Dir::new("inflight");
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        let group = writing_path_1(&j);
        let j = Arc::new(j);
        let (tx, rx) = std::sync::mpsc::channel();
        let j2 = Arc::clone(&j);
        std::thread::spawn(move || {
            let _ = tx.send(j2.append(&[path(1)]).map_err(|e| e.to_string()));
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "acknowledged a path whose record is not on disk yet"
        );
        // That write fails and takes path 1 back.
        finish_write(&j, &group, Err("disk full".into()));
        let added = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(added, vec![path(1)], "the waiting caller writes it itself");
        drop(j);
        let (_, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1)]);
    }

    /// A caller that wakes only after its group and 100 others failed still
    /// reads its own group's failure (a bounded map of failed writes once
    /// forgot it, and an `ok` went out for a record not on disk).
    #[test]
    fn a_late_waiter_reads_its_own_groups_failure() {
        let dir = Dir::new("latewaiter");
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        let j = Arc::new(j);
        {
            // A write in progress, so the caller's record waits in the next group.
            let mut inner = j.lock();
            inner.syncing = true;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let j2 = Arc::clone(&j);
        std::thread::spawn(move || {
            let _ = tx.send(j2.append(&[path(2)]).map_err(|e| e.to_string()));
        });
        while j.lock().pending.is_empty() {
            std::thread::yield_now();
        }
        {
            let mut inner = j.lock();
            let mine = std::mem::replace(&mut inner.group, Arc::new(OnceLock::new()));
            inner.pending.clear();
            for p in std::mem::take(&mut inner.pending_adds) {
                inner.apply(&Record::Done(p));
            }
            for _ in 0..100 {
                let other = std::mem::replace(&mut inner.group, Arc::new(OnceLock::new()));
                let _ = other.set(Err("disk full".into()));
            }
            let _ = mine.set(Err("disk full".into()));
            inner.syncing = false;
            j.written.notify_all();
        }
        let result = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(result.is_err(), "{result:?}");
        assert!(j.entry(&path(2)).is_none(), "not queued after the failure");
    }

    #[test]
    fn unreadable_records_refuse_the_open_and_change_nothing() {
        let dir = Dir::new("bad");
        fs::create_dir_all(&dir.0).unwrap();
        let good = path(1);
        let file = dir.0.join(FILE_NAME);
        for bad in [
            "garbage",
            "+ x {good}",
            "+ 7 /tmp/evil",
            "- --to",
            "* 7 {good}",
            "! 7 zz 3 {good} bad target",
            "! 7 0123456789abcdef x {good} bad attempts",
            "= 7 0123456789abcdef /tmp/evil",
            "= 0123456789abcdef {good}",
            "> everywhere {good}",
        ] {
            let bad = bad.replace("{good}", good.as_str());
            // Enough dead records that a successful open would compact.
            let text = format!("+ 5 {good}\n- {good}\n+ 6 {good}\n{bad}\n");
            fs::write(&file, &text).unwrap();
            let e = Journal::open(&dir.0, S).err().expect(&bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad}");
            let shown = e.to_string();
            assert!(shown.contains("line 4"), "{shown}");
            assert!(shown.contains("nothing in it was changed"), "{shown}");
            assert!(!shown.contains('\n'), "{shown}");
            assert_eq!(fs::read_to_string(&file).unwrap(), text, "{bad}");
        }
    }

    #[test]
    fn records_of_another_store_dir_name_it_and_are_kept() {
        let dir = Dir::new("otherstore");
        let other = "/tmp/other/store";
        let theirs = StorePath::parse(&format!("{other}/{:032}-x", 1), other).unwrap();
        {
            let (j, _) = Journal::open(&dir.0, other).unwrap();
            j.append(std::slice::from_ref(&theirs)).unwrap();
        }
        let file = dir.0.join(FILE_NAME);
        let before = fs::read(&file).unwrap();
        let e = Journal::open(&dir.0, S)
            .err()
            .expect("opened another store's journal");
        let shown = e.to_string();
        assert!(shown.contains(&format!("store-dir = {other}")), "{shown}");
        assert!(shown.contains(&format!("uses store-dir {S}")), "{shown}");
        assert_eq!(fs::read(&file).unwrap(), before, "the journal is unchanged");
        let (_, r) = Journal::open(&dir.0, other).unwrap();
        assert_eq!(r.paths, vec![theirs], "still there for the right store dir");
    }

    #[test]
    fn replace_inherits_place_in_line() {
        let dir = Dir::new("replace");
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        let drv = StorePath::parse(&format!("{S}/{:032}-x.drv", 9), S).unwrap();
        j.append(&[drv.clone(), path(1)]).unwrap();
        let e = j.entry(&drv).unwrap();
        assert_eq!(j.replace(&drv, &[path(2), path(1)]).unwrap(), vec![path(2)]);
        assert_eq!(j.entry(&path(2)).unwrap().seq, e.seq);
        assert!(j.entry(&drv).is_none());
    }

    fn given_up(target: TargetId, error: &str) -> GivenUp {
        GivenUp {
            target,
            at: 1_700_000_000,
            attempts: 10,
            error: error.into(),
        }
    }

    #[test]
    fn given_up_paths_survive_replay_and_compaction_until_requeued() {
        let dir = Dir::new("giveup");
        let a = TargetId::of(Some("file:///a"));
        let b = TargetId::of(Some("ssh-ng://u:pw@b"));
        assert_eq!(a.to_string().len(), 16);
        assert_eq!(
            b,
            TargetId::of(Some("ssh-ng://u:other@b")),
            "secrets masked"
        );
        {
            let (j, _) = Journal::open(&dir.0, S).unwrap();
            j.append(&[path(1), path(2), path(3)]).unwrap();
            assert!(j.give_up(&path(2), given_up(a, "first\nerror")).unwrap());
            assert!(j.give_up(&path(2), given_up(a, "nix copy failed")).unwrap());
            assert!(j.give_up(&path(3), given_up(b, "other target")).unwrap());
            assert!(!j.give_up(&path(9), given_up(a, "not queued")).unwrap());
        }
        let text = fs::read_to_string(dir.0.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 6, "{text}");
        let (j, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1), path(2), path(3)], "still queued");
        assert!(j.is_given_up(&path(2), a));
        assert!(!j.is_given_up(&path(2), b), "per target");
        assert!(!j.is_given_up(&path(3), a));
        let listed = j.given_up_on(a);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, path(2));
        assert_eq!(listed[0].1.error, "nix copy failed", "the newest error");
        assert_eq!(listed[0].1.attempts, 10);
        assert_eq!(j.given_up_up_to(1, a), vec![]);

        assert_eq!(
            j.requeue(Some(&[path(2), path(2), path(1)])).unwrap(),
            vec![path(2)]
        );
        assert!(!j.is_given_up(&path(2), a));
        assert_eq!(j.requeue(None).unwrap(), vec![path(3)]);
        assert!(j.given_up_on(b).is_empty());
        j.give_up(&path(1), given_up(a, "again")).unwrap();
        drop(j);
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        assert!(j.is_given_up(&path(1), a));
        assert!(!j.is_given_up(&path(2), a) && !j.is_given_up(&path(3), b));
        // Dropped: its failure goes with it, and compaction keeps the rest.
        j.complete(&[path(2)]).unwrap();
        j.compact();
        drop(j);
        let text = fs::read_to_string(dir.0.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.contains(&format!("! 1700000000 {a} 10 {} again\n", path(1))),
            "{text}"
        );
        let (j, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1), path(3)]);
        assert!(j.is_given_up(&path(1), a));
    }

    #[test]
    fn a_requeued_path_counts_as_queued_again() {
        let dir = Dir::new("requeue-time");
        fs::create_dir_all(&dir.0).unwrap();
        let a = TargetId::of(Some("file:///a"));
        fs::write(
            dir.0.join(FILE_NAME),
            format!("+ 5 {p}\n! 6 {a} 10 {p} nix copy failed\n", p = path(1)),
        )
        .unwrap();
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(j.entry(&path(1)).unwrap().queued_at, 5);
        assert_eq!(j.requeue(None).unwrap(), vec![path(1)]);
        let now = j.entry(&path(1)).unwrap().queued_at;
        assert!(now > 1_700_000_000, "{now}");
        drop(j);
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(j.entry(&path(1)).unwrap().queued_at, now, "on disk");
        assert!(!j.is_given_up(&path(1), a));
    }

    #[test]
    fn a_path_leaves_when_every_target_has_it() {
        let dir = Dir::new("deliver");
        let (a, b) = (
            TargetId::of(Some("file:///a")),
            TargetId::of(Some("ssh://b")),
        );
        {
            let (j, _) = Journal::open(&dir.0, S).unwrap();
            j.append(&[path(1), path(2), path(3)]).unwrap();
            // One target: done at once, no `>` record.
            assert_eq!(j.deliver(&[path(3)], a, &[a]).unwrap(), vec![path(3)]);
            assert_eq!(j.deliver(&[path(1), path(2)], a, &[a, b]).unwrap(), vec![]);
            assert_eq!(j.deliver(&[path(1)], a, &[a, b]).unwrap(), vec![], "again");
            assert!(j.is_delivered(&path(1), a) && !j.is_delivered(&path(1), b));
        }
        let text = fs::read_to_string(dir.0.join(FILE_NAME)).unwrap();
        assert_eq!(text.matches("\n> ").count(), 2, "{text}");
        let (j, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1), path(2)]);
        assert!(j.is_delivered(&path(2), a));
        assert_eq!(j.deliver(&[path(1)], b, &[a, b]).unwrap(), vec![path(1)]);
        j.compact();
        drop(j);
        let (j, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(2)]);
        assert!(j.is_delivered(&path(2), a), "kept by compaction");
        // Target b taken out of the configuration: a has it all.
        assert_eq!(j.settle(&[a]).unwrap(), 1);
        assert!(j.is_empty());
        assert_eq!(j.settle(&[a]).unwrap(), 0);
    }

    #[test]
    fn journal_of_older_versions_replays() {
        let dir = Dir::new("old");
        fs::create_dir_all(&dir.0).unwrap();
        // As written by the versions with `+` and `-` records only.
        fs::write(
            dir.0.join(FILE_NAME),
            format!(
                "+ 5 {}\n+ 6 {}\n- {}\n+ 7 {}\n",
                path(1),
                path(2),
                path(1),
                path(3)
            ),
        )
        .unwrap();
        let (j, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(2), path(3)]);
        assert!(j.given_up_on(TargetId::of(None)).is_empty());
        assert_eq!(j.entry(&path(2)).unwrap().queued_at, 6);
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_lose_nothing() {
        let dir = Dir::new("concurrent");
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        let j = Arc::new(j);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let j = Arc::clone(&j);
                std::thread::spawn(move || {
                    for i in 0..100 {
                        j.append(&[path(t * 1000 + i)]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(j);
        let (_, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths.len(), 800);
    }

    /// Records written while the compacted copy was being written without
    /// the lock are appended to it before it replaces the journal.
    #[test]
    fn compaction_keeps_what_came_while_it_wrote() {
        let dir = Dir::new("compactmeanwhile");
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        j.append(&[path(1), path(2), path(3)]).unwrap();
        j.complete(&[path(2)]).unwrap();
        // The copy as compaction takes it, then records arrive meanwhile.
        let (data, from) = {
            let inner = j.lock();
            (file_of(inner.snapshot()), inner.len)
        };
        j.append(&[path(4)]).unwrap();
        j.complete(&[path(1)]).unwrap();
        let tmp = dir.0.join(format!("{FILE_NAME}.tmp"));
        j.replace_file(&tmp, &data, from).unwrap();
        j.append(&[path(5)]).unwrap();
        drop(j);
        let (_, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(3), path(4), path(5)]);
        assert!(!tmp.exists());
    }
}
