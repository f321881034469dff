//! The durable queue: an append-only journal file in the state directory.
//!
//! The journal is the truth. A path is acknowledged only after its `+` record
//! is written and fsynced; it leaves the queue only when a `-` record follows
//! (after upload, or when it is dropped). Startup replays the file, ignoring a
//! torn last line from a crash, so recovery and a normal start are the same.
//! A complete record that cannot be used (a path of another store directory,
//! or a form this version does not know) is never dropped: the journal is
//! not opened, and nothing in it is changed, until the daemon runs with the
//! store directory the journal was written for.
//!
//! Records, one per line:
//! - `+ <unix-seconds> <store-path>`: queued at that time;
//! - `- <store-path>`: done (uploaded to every target, or dropped);
//! - `! <unix-seconds> <target> <attempts> <store-path> <error>`: given up
//!   on for one target at that time, after that many failed attempts, with
//!   the last error (the rest of the line). The path stays in the journal,
//!   and is no longer tried for that target until it is requeued;
//! - `= <unix-seconds> <target> <store-path>`: requeued at that time for
//!   that target (`*`: for every target), its failure forgotten; it counts
//!   as queued then (for `give-up-after`);
//! - `> <target> <store-path>`: that target has the path, others not yet.
//!
//! A `<target>` is a [`TargetId`]: a hash of the target's URL, never the URL
//! (which may hold a password). The per-target records let one path be
//! delivered to several targets, each with its own failures; a path given up
//! on for a target that is no longer configured is simply queued for the
//! configured ones; one that every configured target has is done at start.
//! (With one target, the daemon writes `-` when the target has the path,
//! and no `>`.) A journal of older versions, with `+` and `-` records only,
//! replays as it always did.
//!
//! Writers share fsyncs (group commit): while one thread writes and syncs,
//! the others add their records to the next group, and each caller returns
//! once the group holding its records is on disk. The file is compacted
//! (rewritten with only the live records, then renamed over) once most of
//! its records are dead.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store_path::StorePath;

/// File name of the journal inside the state directory.
pub const FILE_NAME: &str = "journal";
/// Dead records tolerated before a compaction is considered.
const COMPACT_MIN_DEAD: usize = 4096;

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
        if s.len() != 16 {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(TargetId)
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

/// The durable queue shared by the connection threads and the worker.
pub struct Journal {
    inner: Mutex<Inner>,
    /// Signalled when a write is done. Callers waiting for generation `g`
    /// wait on `synced[g % 2]`, so that a finished write wakes its own
    /// callers and one caller of the next group (to write it), not everyone.
    synced: [Condvar; 2],
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
    /// Records in the file that describe no live path.
    dead: usize,
    pending: Vec<u8>,
    /// Generation the pending records will be written in.
    pending_gen: u64,
    /// Newest generation whose write has finished, well or not.
    done_gen: u64,
    /// Generations whose write failed, with the error.
    failed: BTreeMap<u64, String>,
    syncing: bool,
    /// Dead records at which a compaction is tried next (raised after a
    /// failed one, so a full disk is not hit with a rewrite per call).
    compact_at: usize,
}

impl Inner {
    /// True when `target` neither has the queued `path` nor is given up on
    /// for it.
    fn is_pending(&self, path: &StorePath, target: TargetId) -> bool {
        !self
            .delivered
            .get(path)
            .is_some_and(|have| have.contains(&target))
            && !self
                .given_up
                .get(path)
                .is_some_and(|l| l.iter().any(|g| g.target == target))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

        // Read record by record, so replay needs no copy of the whole file.
        let mut replay = Replay::default();
        // Sized for the file (records are about 80 bytes), so that the map
        // is not rehashed again and again while it fills.
        let capacity = file.metadata()?.len() / 80;
        let mut live: HashMap<StorePath, Entry> =
            HashMap::with_capacity(usize::try_from(capacity).unwrap_or(0).min(1 << 22));
        let mut given_up: HashMap<StorePath, Vec<GivenUp>> = HashMap::new();
        let mut delivered: HashMap<StorePath, Vec<TargetId>> = HashMap::new();
        let mut next_seq = 0u64;
        let mut records = 0usize;
        let mut line_no = 0usize;
        let mut complete_len = 0u64;
        let mut reader = BufReader::with_capacity(64 * 1024, &mut file);
        let mut line = Vec::with_capacity(256);
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
            complete_len += n as u64;
            line_no += 1;
            let record = &line[..n - 1];
            if record.is_empty() {
                continue;
            }
            records += 1;
            match parse_record(record, store_dir) {
                Some(Record::Add(path, queued_at)) => {
                    live.entry(path).or_insert_with(|| {
                        next_seq += 1;
                        Entry {
                            seq: next_seq,
                            queued_at,
                        }
                    });
                }
                Some(Record::Done(path)) => {
                    live.remove(&path);
                    given_up.remove(&path);
                    delivered.remove(&path);
                }
                Some(Record::GiveUp(path, g)) => {
                    if live.contains_key(&path) {
                        set_given_up(given_up.entry(path).or_default(), g);
                    }
                }
                Some(Record::Requeue(path, target, at)) => {
                    forget_given_up(&mut given_up, &path, target);
                    if let Some(entry) = live.get_mut(&path) {
                        entry.queued_at = at;
                    }
                }
                Some(Record::Delivered(path, target)) => {
                    if live.contains_key(&path) {
                        let have = delivered.entry(path).or_default();
                        if !have.contains(&target) {
                            have.push(target);
                        }
                    }
                }
                None => {
                    return Err(unusable_record(&path, line_no, record, store_dir));
                }
            }
        }
        drop(reader);
        if replay.torn_bytes > 0 {
            file.set_len(complete_len)?;
            file.sync_data()?;
        }
        let mut ordered: Vec<(&StorePath, &Entry)> = live.iter().collect();
        ordered.sort_unstable_by_key(|(_, e)| e.seq);
        replay.paths = ordered.into_iter().map(|(p, _)| p.clone()).collect();

        let journal = Journal {
            inner: Mutex::new(Inner {
                dir: dir.to_path_buf(),
                file: Arc::new(file),
                len: complete_len,
                dead: records.saturating_sub(
                    live.len()
                        + given_up.values().map(Vec::len).sum::<usize>()
                        + delivered.values().map(Vec::len).sum::<usize>(),
                ),
                live,
                given_up,
                delivered,
                next_seq,
                pending: Vec::new(),
                pending_gen: 1,
                done_gen: 0,
                failed: BTreeMap::new(),
                syncing: false,
                compact_at: COMPACT_MIN_DEAD,
            }),
            synced: [Condvar::new(), Condvar::new()],
        };
        {
            let mut inner = journal.lock();
            if inner.dead > 0 && inner.dead >= inner.live.len() {
                // Only an optimisation: a full disk must not keep the daemon
                // from starting (it can still answer, and drain the queue).
                inner.try_compact();
            }
        }
        Ok((journal, replay))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data behind (every
        // update is a single insert or remove), so a poisoned lock is usable.
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
            let mut new = Vec::new();
            let mut records = Vec::new();
            for path in paths {
                if inner.live.contains_key(path) {
                    continue;
                }
                let entry = match inherit {
                    Some(e) => e,
                    None => {
                        inner.next_seq += 1;
                        Entry {
                            seq: inner.next_seq,
                            queued_at: now,
                        }
                    }
                };
                inner.live.insert(path.clone(), entry);
                write_add(&mut records, path, entry.queued_at);
                new.push(path.clone());
            }
            if new.is_empty() {
                // The paths are queued already, but maybe by a caller whose
                // write is still on its way to disk: acknowledge them only
                // once every write in progress is done.
                let in_progress = if !inner.pending.is_empty() {
                    inner.pending_gen
                } else if inner.syncing {
                    inner.pending_gen - 1
                } else {
                    return Ok(added);
                };
                while inner.done_gen < in_progress {
                    if inner.syncing {
                        inner = self.wait_for(inner, in_progress);
                    } else {
                        // Woken to write the waiting group: write it.
                        inner = self.commit(inner, &[]).0;
                    }
                }
            } else {
                let (guard, result) = self.commit(inner, &records);
                inner = guard;
                if let Err(e) = result {
                    for path in &new {
                        inner.live.remove(path);
                    }
                    return Err(e);
                }
                added.extend(new);
            }
            // A failed write of another caller took its paths back: queue
            // those again ourselves.
            if paths.iter().all(|p| inner.live.contains_key(p)) {
                return Ok(added);
            }
        }
    }

    /// Marks paths as done (uploaded or dropped), durably.
    pub fn complete(&self, paths: &[StorePath]) -> io::Result<()> {
        let mut inner = self.lock();
        let mut records = Vec::new();
        for path in paths {
            if inner.live.remove(path).is_some() {
                write_done(&mut records, path);
                let failures = inner.given_up.remove(path).map_or(0, |g| g.len());
                let deliveries = inner.delivered.remove(path).map_or(0, |d| d.len());
                inner.dead += 2 + failures + deliveries;
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        let (mut inner, result) = self.commit(inner, &records);
        result?;
        if inner.dead >= inner.compact_at && inner.dead > inner.live.len() {
            inner = self.wait_idle(inner);
            // The `-` records are on disk already: a failed compaction is
            // not a failure of this call.
            inner.try_compact();
        }
        Ok(())
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
        let mut inner = self.lock();
        let mut records = Vec::new();
        let mut done = Vec::new();
        let mut marked = Vec::new();
        for path in paths {
            if !inner.live.contains_key(path) {
                continue;
            }
            let have = inner.delivered.get(path).map_or(&[][..], Vec::as_slice);
            if targets.iter().all(|t| *t == target || have.contains(t)) {
                done.push(path.clone());
            } else if !have.contains(&target) {
                write_delivered(&mut records, path, target);
                inner
                    .delivered
                    .entry(path.clone())
                    .or_default()
                    .push(target);
                marked.push(path.clone());
            }
        }
        if !records.is_empty() {
            let (mut guard, result) = self.commit(inner, &records);
            if let Err(e) = result {
                for path in &marked {
                    if let Some(have) = guard.delivered.get_mut(path) {
                        have.retain(|t| *t != target);
                        if have.is_empty() {
                            guard.delivered.remove(path);
                        }
                    }
                }
                return Err(e);
            }
            inner = guard;
        }
        drop(inner);
        self.complete(&done)?;
        Ok(done)
    }

    /// True when `target` has `path` (and some other target not yet).
    pub fn is_delivered(&self, path: &StorePath, target: TargetId) -> bool {
        self.lock()
            .delivered
            .get(path)
            .is_some_and(|have| have.contains(&target))
    }

    /// Queued paths `target` does not have and is not given up on for.
    pub fn count_pending(&self, target: TargetId) -> usize {
        let inner = self.lock();
        inner
            .live
            .keys()
            .filter(|p| inner.is_pending(p, target))
            .count()
    }

    /// How many paths that arrived at or before sequence number `seq` some
    /// of `targets` still has to take (neither has them nor is given up on
    /// for them): what `wait` waits for.
    pub fn count_waiting_up_to(&self, seq: u64, targets: &[TargetId]) -> usize {
        let inner = self.lock();
        inner
            .live
            .iter()
            .filter(|(p, e)| e.seq <= seq && targets.iter().any(|t| inner.is_pending(p, *t)))
            .count()
    }

    /// Completes every path that each of `targets` has: after a target was
    /// taken out of the configuration, the others may have them all.
    /// Returns how many left the journal.
    pub fn settle(&self, targets: &[TargetId]) -> io::Result<usize> {
        let done: Vec<StorePath> = {
            let inner = self.lock();
            inner
                .delivered
                .iter()
                .filter(|(_, have)| targets.iter().all(|t| have.contains(t)))
                .map(|(p, _)| p.clone())
                .collect()
        };
        self.complete(&done)?;
        Ok(done.len())
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
        let mut inner = self.lock();
        if !inner.live.contains_key(path) {
            return Ok(false);
        }
        let mut records = Vec::new();
        write_give_up(&mut records, path, &given_up);
        let list = inner.given_up.entry(path.clone()).or_default();
        let old = list.iter().position(|g| g.target == given_up.target);
        let previous = old.map(|i| list.remove(i));
        list.push(given_up.clone());
        if previous.is_some() {
            inner.dead += 1;
        }
        let (mut inner, result) = self.commit(inner, &records);
        if let Err(e) = result {
            // Not on disk: not given up on either.
            if let Some(list) = inner.given_up.get_mut(path) {
                list.retain(|g| g.target != given_up.target);
                list.extend(previous);
                if list.is_empty() {
                    inner.given_up.remove(path);
                }
            }
            return Err(e);
        }
        Ok(true)
    }

    /// Requeues paths given up on, for every target, durably: `None`
    /// requeues every one. They count as queued now. Returns the paths
    /// requeued, oldest first.
    pub fn requeue(&self, paths: Option<&[StorePath]>) -> io::Result<Vec<StorePath>> {
        let mut inner = self.lock();
        let mut chosen: Vec<(StorePath, u64)> = match paths {
            Some(paths) => {
                let unique: std::collections::HashSet<&StorePath> = paths
                    .iter()
                    .filter(|p| inner.given_up.contains_key(*p))
                    .collect();
                unique
                    .into_iter()
                    .map(|p| (p.clone(), inner.live.get(p).map_or(0, |e| e.seq)))
                    .collect()
            }
            None => inner
                .given_up
                .keys()
                .map(|p| (p.clone(), inner.live.get(p).map_or(0, |e| e.seq)))
                .collect(),
        };
        chosen.sort_unstable_by_key(|(_, seq)| *seq);
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_secs();
        let mut records = Vec::new();
        let mut taken = Vec::new();
        for (path, _) in &chosen {
            write_requeue(&mut records, path, None, now);
            let queued_at = inner.live.get_mut(path).map(|e| {
                let before = e.queued_at;
                e.queued_at = now;
                before
            });
            if let Some(g) = inner.given_up.remove(path) {
                inner.dead += 1 + g.len();
                taken.push((path.clone(), g, queued_at));
            }
        }
        let (mut inner, result) = self.commit(inner, &records);
        if let Err(e) = result {
            for (path, g, queued_at) in taken {
                if let (Some(entry), Some(at)) = (inner.live.get_mut(&path), queued_at) {
                    entry.queued_at = at;
                    inner.given_up.insert(path, g);
                }
            }
            return Err(e);
        }
        Ok(chosen.into_iter().map(|(p, _)| p).collect())
    }

    /// True when `path` is given up on for `target`.
    pub fn is_given_up(&self, path: &StorePath, target: TargetId) -> bool {
        self.lock()
            .given_up
            .get(path)
            .is_some_and(|l| l.iter().any(|g| g.target == target))
    }

    /// The paths given up on for `target`, oldest first, with why.
    pub fn given_up_on(&self, target: TargetId) -> Vec<(StorePath, GivenUp)> {
        self.given_up_up_to(u64::MAX, target)
    }

    /// Like [`Journal::given_up_on`], for the paths that arrived at or before
    /// sequence number `seq`.
    pub fn given_up_up_to(&self, seq: u64, target: TargetId) -> Vec<(StorePath, GivenUp)> {
        let inner = self.lock();
        let mut out: Vec<(u64, StorePath, GivenUp)> = inner
            .given_up
            .iter()
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

    /// How many queued paths arrived at or before sequence number `seq`.
    pub fn count_up_to(&self, seq: u64) -> usize {
        self.lock().live.values().filter(|e| e.seq <= seq).count()
    }

    /// Writes `records` in the next group and waits until that group is on
    /// disk. Whoever finds no write in progress does the writing.
    fn commit<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        records: &[u8],
    ) -> (MutexGuard<'a, Inner>, io::Result<()>) {
        inner.pending.extend_from_slice(records);
        let my_gen = inner.pending_gen;
        loop {
            if inner.done_gen >= my_gen {
                let result = match inner.failed.get(&my_gen) {
                    Some(e) => Err(io::Error::other(e.clone())),
                    None => Ok(()),
                };
                return (inner, result);
            }
            if inner.syncing {
                inner = self.wait_for(inner, my_gen);
                continue;
            }
            inner.syncing = true;
            let buf = std::mem::take(&mut inner.pending);
            let gen = inner.pending_gen;
            inner.pending_gen += 1;
            let file = Arc::clone(&inner.file);
            let len_before = inner.len;
            drop(inner);

            let result = (&*file).write_all(&buf).and_then(|()| file.sync_data());
            if result.is_err() {
                // Cut off whatever part was written so no half record stays.
                let _ = file.set_len(len_before);
            }

            inner = self.lock();
            inner.syncing = false;
            inner.done_gen = gen;
            match result {
                Ok(()) => inner.len = len_before + buf.len() as u64,
                Err(e) => {
                    inner.failed.insert(gen, e.to_string());
                    while inner.failed.len() > 64 {
                        inner.failed.pop_first();
                    }
                }
            }
            self.synced[(gen % 2) as usize].notify_all();
            if !inner.pending.is_empty() {
                // Records of the next group wait: wake one of their callers
                // to write them.
                self.synced[((gen + 1) % 2) as usize].notify_one();
            }
        }
    }

    /// Waits on the condition variable of generation `gen`: until its write
    /// is done, or until this caller is to write it.
    fn wait_for<'a>(&'a self, inner: MutexGuard<'a, Inner>, gen: u64) -> MutexGuard<'a, Inner> {
        self.synced[(gen % 2) as usize]
            .wait(inner)
            .unwrap_or_else(|e| e.into_inner())
    }

    fn wait_idle<'a>(&'a self, mut inner: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        while inner.syncing || !inner.pending.is_empty() {
            if !inner.syncing {
                let (guard, _) = self.commit(inner, &[]);
                inner = guard;
                continue;
            }
            let writing = inner.pending_gen - 1;
            inner = self.wait_for(inner, writing);
        }
        inner
    }
}

impl Inner {
    /// [`Inner::compact`], with a warning instead of an error: the journal
    /// stays valid, only longer than needed.
    fn try_compact(&mut self) {
        match self.compact() {
            Ok(()) => self.compact_at = COMPACT_MIN_DEAD,
            Err(e) => {
                let _ = fs::remove_file(self.dir.join(format!("{FILE_NAME}.tmp")));
                self.compact_at = self.dead.saturating_mul(2).max(COMPACT_MIN_DEAD);
                crate::warning!(
                    "journal: cannot compact {}: {e}; going on with the uncompacted journal",
                    self.dir.join(FILE_NAME).display()
                );
            }
        }
    }

    /// Rewrites the journal with only the live records, atomically.
    fn compact(&mut self) -> io::Result<()> {
        let mut ordered: Vec<(&StorePath, &Entry)> = self.live.iter().collect();
        ordered.sort_unstable_by_key(|(_, e)| e.seq);
        let mut data = Vec::with_capacity(ordered.len() * 80);
        for (path, entry) in ordered {
            write_add(&mut data, path, entry.queued_at);
            for g in self.given_up.get(path).into_iter().flatten() {
                write_give_up(&mut data, path, g);
            }
            for t in self.delivered.get(path).into_iter().flatten() {
                write_delivered(&mut data, path, *t);
            }
        }
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        // Opened for appending before the rename, so that once the new file
        // is in place no later failure can leave us writing to the old one.
        let mut f = open_append(&tmp)?;
        f.set_len(0)?;
        f.write_all(&data)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join(FILE_NAME))?;
        self.file = Arc::new(f);
        self.len = data.len() as u64;
        self.dead = 0;
        sync_dir(&self.dir)
    }
}

/// The error for a complete record [`parse_record`] rejected: names the
/// line, and when the record is a path of another store directory, that
/// directory and how to start the daemon for it.
fn unusable_record(journal: &Path, line_no: usize, record: &[u8], store_dir: &str) -> io::Error {
    const SHOWN: usize = 200;
    let text = String::from_utf8_lossy(record);
    // The path's place in each kind of record (see the module doc).
    let word = |prefix: &str, skip: usize| {
        text.strip_prefix(prefix)
            .and_then(|rest| rest.split(' ').nth(skip))
    };
    let path = word("+ ", 1)
        .or_else(|| word("- ", 0))
        .or_else(|| word("! ", 3))
        .or_else(|| word("= ", 2))
        .or_else(|| word("> ", 1));
    let other_store = path.and_then(|p| {
        let (dir, _) = p.rsplit_once('/')?;
        (dir != store_dir && StorePath::parse(p, dir).is_ok()).then_some(dir)
    });
    let message = match other_store {
        Some(other) => format!(
            "{} line {line_no} queues a path of the store directory {other}, but this daemon \
             uses store-dir {store_dir}; the journal was written for {other}: start the daemon \
             with store-dir = {other} (or NIX_STORE_DIR={other}) to deliver its paths, or move \
             the journal aside; nothing in it was changed",
            journal.display()
        ),
        None => {
            let mut shown: String = text.chars().take(SHOWN).collect();
            if shown.len() < text.len() {
                shown.push_str("...");
            }
            format!(
                "{} line {line_no} is not a record this version can read ({shown:?}); \
                 expected '+ <seconds> <store-path>', '- <store-path>', '! <seconds> <target> \
                 <attempts> <store-path> <error>', '= <seconds> <target> <store-path>' or '> <target> \
                 <store-path>' with paths under {store_dir}: start the version that wrote it, \
                 or move the journal aside; nothing in it was changed",
                journal.display()
            )
        }
    };
    io::Error::new(io::ErrorKind::InvalidData, message)
}

enum Record {
    Add(StorePath, u64),
    Done(StorePath),
    GiveUp(StorePath, GivenUp),
    /// `None`: for every target.
    Requeue(StorePath, Option<TargetId>, u64),
    Delivered(StorePath, TargetId),
}

/// Records `g` in a path's list, replacing an older one for its target.
fn set_given_up(list: &mut Vec<GivenUp>, g: GivenUp) {
    list.retain(|old| old.target != g.target);
    list.push(g);
}

/// Forgets a path's failures for `target` (`None`: every target).
fn forget_given_up(
    map: &mut HashMap<StorePath, Vec<GivenUp>>,
    path: &StorePath,
    target: Option<TargetId>,
) {
    if let Some(list) = map.get_mut(path) {
        list.retain(|g| target.is_some_and(|t| t != g.target));
        if list.is_empty() {
            map.remove(path);
        }
    }
}

fn parse_record(line: &[u8], store_dir: &str) -> Option<Record> {
    let line = std::str::from_utf8(line).ok()?;
    if let Some(rest) = line.strip_prefix("+ ") {
        let (time, path) = rest.split_once(' ')?;
        let time = time.parse().ok()?;
        StorePath::parse(path, store_dir)
            .ok()
            .map(|p| Record::Add(p, time))
    } else if let Some(path) = line.strip_prefix("- ") {
        StorePath::parse(path, store_dir).ok().map(Record::Done)
    } else if let Some(rest) = line.strip_prefix("! ") {
        let mut f = rest.splitn(5, ' ');
        let at = f.next()?.parse().ok()?;
        let target = TargetId::parse(f.next()?)?;
        let attempts = f.next()?.parse().ok()?;
        let path = StorePath::parse(f.next()?, store_dir).ok()?;
        let error = f.next().unwrap_or("").to_string();
        Some(Record::GiveUp(
            path,
            GivenUp {
                target,
                at,
                attempts,
                error,
            },
        ))
    } else if let Some(rest) = line.strip_prefix("= ") {
        let (at, rest) = rest.split_once(' ')?;
        let at = at.parse().ok()?;
        let (target, path) = rest.split_once(' ')?;
        let target = match target {
            "*" => None,
            t => Some(TargetId::parse(t)?),
        };
        let path = StorePath::parse(path, store_dir).ok()?;
        Some(Record::Requeue(path, target, at))
    } else if let Some(rest) = line.strip_prefix("> ") {
        let (target, path) = rest.split_once(' ')?;
        let target = TargetId::parse(target)?;
        let path = StorePath::parse(path, store_dir).ok()?;
        Some(Record::Delivered(path, target))
    } else {
        None
    }
}

fn write_add(buf: &mut Vec<u8>, path: &StorePath, queued_at: u64) {
    buf.extend_from_slice(format!("+ {queued_at} {path}\n").as_bytes());
}

fn write_done(buf: &mut Vec<u8>, path: &StorePath) {
    buf.extend_from_slice(format!("- {path}\n").as_bytes());
}

fn write_give_up(buf: &mut Vec<u8>, path: &StorePath, g: &GivenUp) {
    // The journal is private, but a password has no business on disk.
    let error = crate::protocol::one_line(&crate::redact::text(&g.error));
    buf.extend_from_slice(
        format!(
            "! {} {} {} {path} {}\n",
            g.at,
            g.target,
            g.attempts,
            error.trim()
        )
        .as_bytes(),
    );
}

fn write_delivered(buf: &mut Vec<u8>, path: &StorePath, target: TargetId) {
    buf.extend_from_slice(format!("> {target} {path}\n").as_bytes());
}

fn write_requeue(buf: &mut Vec<u8>, path: &StorePath, target: Option<TargetId>, at: u64) {
    let target = target.map_or_else(|| "*".to_string(), |t| t.to_string());
    buf.extend_from_slice(format!("= {at} {target} {path}\n").as_bytes());
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

    #[test]
    fn already_queued_path_is_acknowledged_only_once_on_disk() {
        let dir = Dir::new("inflight");
        let (j, _) = Journal::open(&dir.0, S).unwrap();
        // Another caller is writing path 1 (generation 1), as `commit` leaves
        // things while it writes without the lock.
        {
            let mut inner = j.lock();
            inner.live.insert(
                path(1),
                Entry {
                    seq: 1,
                    queued_at: 0,
                },
            );
            inner.next_seq = 1;
            inner.syncing = true;
            inner.pending_gen = 2;
        }
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
        {
            let mut inner = j.lock();
            inner.live.remove(&path(1));
            inner.syncing = false;
            inner.done_gen = 1;
            inner.failed.insert(1, "disk full".into());
            j.synced.iter().for_each(Condvar::notify_all);
        }
        let added = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(added, vec![path(1)], "the waiting caller writes it itself");
        drop(j);
        let (_, r) = Journal::open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1)]);
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
        assert_eq!(j.count_up_to(e.seq), 1);
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
        j.lock().try_compact();
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
        j.lock().try_compact();
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
}
