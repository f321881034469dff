//! The durable queue: an append-only journal, a path acknowledged once its `+` record is fsynced;
//! startup replays it, cutting off a torn last line. Records: `+ <secs> <path>` queued, `- <path>`
//! done, `! <secs> <target> <attempts> <path> <error>` given up on, `= <secs> * <path>` requeued,
//! `> <target> <path>` delivered (`<target>`: a [`TargetId`]). A failed `+` write is undone and
//! refused; any other failed write ends the daemon (status 1): no reply rests on a lost record.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::mem::take;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
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
    /// When it was (re)queued, in Unix seconds.
    pub queued_at: u64,
}

/// A target in records: FNV-1a of its URL, secrets masked (stable across versions), in hex.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TargetId(u64);

impl TargetId {
    /// The id of the target at `url`, or of "sign only" when there is none.
    pub fn of(url: Option<&str>) -> TargetId {
        let shown = url.map_or_else(|| "-".to_string(), crate::redact::url);
        let fnv = |h: u64, b: u8| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        TargetId(shown.bytes().fold(0xcbf2_9ce4_8422_2325, fnv))
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
    /// When it was given up on, in Unix seconds.
    pub at: u64,
    /// Failed attempts before it was given up on.
    pub attempts: u32,
    /// The last error, on one line.
    pub error: String,
}

/// One journal record (see the module doc for the line of each).
#[derive(Debug, Clone)]
enum Record {
    Add(StorePath, u64),
    Done(StorePath),
    GiveUp(StorePath, GivenUp),
    Requeue(StorePath, u64),
    Delivered(StorePath, TargetId),
}

impl Record {
    fn path(&self) -> &StorePath {
        match self {
            Record::Add(p, _) | Record::GiveUp(p, _) | Record::Requeue(p, _) => p,
            Record::Done(p) | Record::Delivered(p, _) => p,
        }
    }

    fn write(&self, buf: &mut Vec<u8>) {
        let _ = match self {
            Record::Add(p, at) => writeln!(buf, "+ {at} {p}"),
            Record::Done(p) => writeln!(buf, "- {p}"),
            Record::GiveUp(p, g) => {
                // The journal is private, but a password has no business on disk.
                let error = crate::protocol::one_line(&crate::redact::text(&g.error));
                let (at, t, n) = (g.at, g.target, g.attempts);
                writeln!(buf, "! {at} {t} {n} {p} {}", error.trim())
            }
            Record::Requeue(p, at) => writeln!(buf, "= {at} * {p}"),
            Record::Delivered(p, t) => writeln!(buf, "> {t} {p}"),
        };
    }

    fn parse(line: &[u8], store_dir: &str) -> Option<Record> {
        let (tag, rest) = std::str::from_utf8(line).ok()?.split_once(' ')?;
        // One field more than any record but `!` has, whose error is the rest.
        let f: Vec<&str> = rest.splitn(5, ' ').collect();
        let path = |i: usize| StorePath::parse(f[i], store_dir).ok();
        let num = |i: usize| f[i].parse::<u64>().ok();
        let target = |i: usize| {
            let hex = (f[i].len() == 16).then_some(f[i])?;
            u64::from_str_radix(hex, 16).ok().map(TargetId)
        };
        Some(match (tag, f.len()) {
            ("+", 2) => Record::Add(path(1)?, num(0)?),
            ("-", 1) => Record::Done(path(0)?),
            ("!", 4 | 5) => Record::GiveUp(
                path(3)?,
                GivenUp {
                    target: target(1)?,
                    at: num(0)?,
                    attempts: u32::try_from(num(2)?).ok()?,
                    error: f.get(4).unwrap_or(&"").to_string(),
                },
            ),
            ("=", 3) if f[1] == "*" => Record::Requeue(path(2)?, num(0)?),
            (">", 2) => Record::Delivered(path(1)?, target(0)?),
            _ => return None,
        })
    }
}

/// Per target of a queued path: it has the path (`None`), or gave up on it; most paths have none.
type Mark = (TargetId, Option<GivenUp>);

/// The durable queue shared by the connection threads and the worker.
pub struct Journal {
    dir: PathBuf,
    /// The state in memory, never held while the file is written; `cv` signals a write's end.
    inner: Mutex<Inner>,
    cv: Condvar,
    /// The file and its length, held by the writer; locked before `inner`.
    fd: Mutex<(File, u64)>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<StorePath, Entry>,
    marks: HashMap<StorePath, Vec<Mark>>,
    next_seq: u64,
    /// Records in the file, and how many of them describe the live state.
    records: usize,
    live_records: usize,
    /// Records not written yet, and the paths their `+` records queue.
    pending: Vec<u8>,
    pending_adds: Vec<StorePath>,
    /// Bytes taken from `pending` by writes, and by the writes ended (one write at a time).
    flushed: u64,
    written: u64,
    /// Writes that failed (and were undone), and the last one's error.
    failed: (u64, String),
    /// Dead records to compact at: raised after a failure (a full disk).
    compact_at: usize,
    /// The `wait`s in progress: the newest path each waits for, its drops.
    watches: Vec<(u64, Weak<Mutex<Vec<StorePath>>>)>,
}

impl Inner {
    fn mark(&self, path: &StorePath, target: TargetId) -> Option<&Option<GivenUp>> {
        let marks = self.marks.get(path)?;
        marks.iter().find(|(t, _)| *t == target).map(|(_, m)| m)
    }

    /// What `f` makes of the queued paths, oldest first.
    fn in_order<T>(&self, f: impl Fn(&StorePath, &Entry) -> Option<T>) -> Vec<T> {
        let mut out: Vec<(u64, T)> = (self.live.iter())
            .filter_map(|(p, e)| Some((e.seq, f(p, e)?)))
            .collect();
        out.sort_unstable_by_key(|(seq, _)| *seq);
        out.into_iter().map(|(_, t)| t).collect()
    }

    /// Applies one record to memory, as replay does; false if it changed nothing.
    fn apply(&mut self, record: &Record) -> bool {
        let path = record.path();
        if let Record::Add(_, queued_at) = record {
            if self.live.contains_key(path) {
                return false;
            }
            self.next_seq += 1;
            let (seq, queued_at) = (self.next_seq, *queued_at);
            self.live.insert(path.clone(), Entry { seq, queued_at });
            self.live_records += 1;
            return true;
        }
        if matches!(record, Record::Done(_)) && self.live.remove(path).is_some() {
            self.live_records -= 1 + self.marks.remove(path).map_or(0, |m| m.len());
            return true;
        }
        let Some(entry) = self.live.get_mut(path) else {
            return false;
        };
        let marks = self.marks.entry(path.clone()).or_default();
        let before = marks.len();
        let set = |marks: &mut Vec<Mark>, target: TargetId, mark| {
            marks.retain(|(t, _)| *t != target);
            marks.push((target, mark));
        };
        match record {
            Record::GiveUp(_, g) => set(marks, g.target, Some(g.clone())),
            Record::Requeue(_, at) => {
                entry.queued_at = *at;
                marks.retain(|(_, g)| g.is_none());
            }
            Record::Delivered(_, t) if !marks.contains(&(*t, None)) => set(marks, *t, None),
            _ => return false,
        }
        self.live_records = self.live_records + marks.len() - before;
        true
    }

    /// The live records, each with its path's place in line.
    fn snapshot(&self) -> Vec<(u64, Record)> {
        let mut out = Vec::with_capacity(self.live_records);
        for (p, e) in &self.live {
            out.push((e.seq, Record::Add(p.clone(), e.queued_at)));
            for (t, g) in self.marks.get(p).into_iter().flatten() {
                let r = g.clone().map_or(Record::Delivered(p.clone(), *t), |g| {
                    Record::GiveUp(p.clone(), g)
                });
                out.push((e.seq, r));
            }
        }
        out
    }
}

pub(crate) fn now_secs() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    now.map_or(0, |d| d.as_secs())
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true).read(true).open(path)
}

/// Locks `m`: each update is finished under one hold, so a poisoned lock's data is whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Ends the daemon after a failure no reply can stand for; a restart recovers.
fn fatal(what: &str, e: &io::Error) -> ! {
    crate::error!("journal: {what}: {e}; stopping (a restart recovers from the journal)");
    std::process::exit(1)
}

fn count_lines(data: &[u8]) -> usize {
    data.iter().filter(|&&b| b == b'\n').count()
}

impl Journal {
    /// Opens (creating) the journal in `dir` and replays it; returns it and the bytes of a torn
    /// last record cut off. An unusable record (maybe an acknowledged path) is `InvalidData`.
    pub fn open(dir: &Path, store_dir: &str) -> io::Result<(Journal, usize)> {
        fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let file = open_append(&path)?;
        // Its name (and the directory's) durable before the first `ok`.
        sync_dir(dir)?;
        let _ = dir.parent().map(sync_dir);
        // Sized for the file (records are about 80 bytes): no rehashing.
        let capacity = usize::try_from(file.metadata()?.len() / 80).unwrap_or(0);
        let mut inner = Inner::default();
        inner.live.reserve(capacity.min(1 << 22));
        let (mut len, mut torn) = (0, 0);
        let mut reader = BufReader::with_capacity(64 * 1024, &file);
        let mut line = Vec::with_capacity(256);
        for line_no in 1.. {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if line.pop() != Some(b'\n') {
                torn = n;
                break;
            }
            len += n as u64;
            if !line.is_empty() {
                inner.records += 1;
                let r = Record::parse(&line, store_dir);
                inner.apply(&r.ok_or_else(|| unusable(&path, line_no, &line, store_dir))?);
            }
        }
        if torn > 0 {
            file.set_len(len)?;
            file.sync_data()?;
        }
        let (dir, inner, fd, cv) = (dir.into(), inner.into(), (file, len).into(), Condvar::new());
        let journal = Journal { dir, inner, fd, cv };
        // Failure only warns: a full disk must not keep the daemon from starting.
        journal.compact(1);
        Ok((journal, torn))
    }

    /// Queues the paths not queued yet, returning them once all are on disk (on error: not queued).
    pub fn append(&self, paths: &[StorePath]) -> io::Result<Vec<StorePath>> {
        self.append_at(paths, None)
    }

    fn append_at(&self, paths: &[StorePath], inherit: Option<Entry>) -> io::Result<Vec<StorePath>> {
        let mut added = Vec::new();
        loop {
            let mut inner = lock(&self.inner);
            for path in paths {
                let at = inherit.map_or_else(now_secs, |e| e.queued_at);
                let record = Record::Add(path.clone(), at);
                if inner.apply(&record) {
                    inner.live.extend(inherit.map(|e| (path.clone(), e)));
                    record.write(&mut inner.pending);
                    inner.pending_adds.push(path.clone());
                    added.push(path.clone());
                }
            }
            let failed = inner.failed.0;
            let inner = self.flush(inner);
            if inner.failed.0 == failed {
                return Ok(added);
            }
            // A write failed: ours, or another's that took back paths we queue next.
            if added.iter().any(|p| !inner.live.contains_key(p)) {
                return Err(io::Error::other(inner.failed.1.clone()));
            }
        }
    }

    /// Writes the pending records, or waits for the write in progress (which may hold them) to end;
    /// returns the lock. A failed write of `+` records only is undone; any other ends the daemon.
    fn flush<'a>(&'a self, mut inner: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        let upto = inner.flushed + inner.pending.len() as u64;
        while inner.written < inner.flushed.min(upto) {
            inner = self.cv.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        if inner.pending.is_empty() || inner.flushed >= upto {
            return inner;
        }
        let (buf, adds) = (take(&mut inner.pending), take(&mut inner.pending_adds));
        inner.flushed += buf.len() as u64;
        drop(inner);
        let mut disk = lock(&self.fd);
        let result = (&disk.0).write_all(&buf);
        if let Some(Err(e)) = result.is_ok().then(|| disk.0.sync_data()) {
            fatal("cannot sync", &e);
        }
        let mut inner = lock(&self.inner);
        inner.written = inner.flushed;
        self.cv.notify_all();
        let Err(e) = result else {
            disk.1 += buf.len() as u64;
            inner.records += count_lines(&buf);
            return inner;
        };
        if let Err(cut) = disk.0.set_len(disk.1) {
            fatal(&format!("cannot write ({e}), nor cut it off"), &cut);
        }
        if adds.len() < count_lines(&buf) {
            fatal("cannot write a record", &e);
        }
        for path in adds {
            inner.apply(&Record::Done(path));
        }
        inner.failed = (inner.failed.0 + 1, e.to_string());
        inner
    }

    /// Applies and writes `records`, returning the paths they changed; a failure ends the daemon.
    fn write(&self, mut inner: MutexGuard<'_, Inner>, records: Vec<Record>) -> Vec<StorePath> {
        let (mut buf, mut changed) = (Vec::new(), Vec::new());
        for r in records.into_iter().filter(|r| inner.apply(r)) {
            r.write(&mut buf);
            changed.push(r.path().clone());
        }
        inner.pending.extend(buf);
        drop(self.flush(inner));
        self.compact(COMPACT_MIN_DEAD);
        changed
    }

    /// Drops queued paths (`-`), telling the `wait`s for them; returns them.
    pub fn drop_paths(&self, paths: &[StorePath]) -> Vec<StorePath> {
        let inner = lock(&self.inner);
        for (up_to, drops) in (inner.watches.iter()).filter_map(|(s, w)| Some((s, w.upgrade()?))) {
            let theirs = |p: &&StorePath| inner.live.get(*p).is_some_and(|e| e.seq <= *up_to);
            lock(&drops).extend(paths.iter().filter(theirs).cloned());
        }
        self.write(inner, paths.iter().cloned().map(Record::Done).collect())
    }

    /// The newest path's sequence number, and the paths up to it dropped while the result is held.
    pub fn watch_drops(&self) -> (u64, Arc<Mutex<Vec<StorePath>>>) {
        let (drops, mut inner) = (Arc::default(), lock(&self.inner));
        inner.watches.retain(|(_, w)| w.strong_count() > 0);
        let seq = inner.next_seq;
        inner.watches.push((seq, Arc::downgrade(&drops)));
        (seq, drops)
    }

    /// Records that `target` has the paths: `-` (returned) where all `targets` have them, else `>`.
    pub fn deliver(
        &self,
        paths: &[StorePath],
        target: TargetId,
        targets: &[TargetId],
    ) -> io::Result<Vec<StorePath>> {
        let inner = lock(&self.inner);
        let (mut records, mut done) = (Vec::new(), Vec::new());
        for path in paths.iter().filter(|p| inner.live.contains_key(*p)) {
            let has = |t: &TargetId| *t == target || inner.mark(path, *t) == Some(&None);
            if targets.iter().all(has) {
                records.push(Record::Done(path.clone()));
                done.push(path.clone());
            } else {
                records.push(Record::Delivered(path.clone(), target));
            }
        }
        self.write(inner, records);
        Ok(done)
    }

    /// True when `target` has `path` or gave up on it.
    pub fn is_settled(&self, path: &StorePath, target: TargetId) -> bool {
        lock(&self.inner).mark(path, target).is_some()
    }

    /// Paths up to sequence number `seq` some of `targets` has not settled.
    pub fn count_waiting_up_to(&self, seq: u64, targets: &[TargetId]) -> usize {
        let inner = lock(&self.inner);
        let waiting = |p| targets.iter().any(|t| inner.mark(p, *t).is_none());
        let up_to = inner.live.iter().filter(|(_, e)| e.seq <= seq);
        up_to.filter(|(p, _)| waiting(p)).count()
    }

    /// At start: completes paths all `targets` have; returns their count, paths to upload, others.
    pub fn recover(&self, targets: &[TargetId]) -> (usize, Vec<StorePath>, usize) {
        let inner = lock(&self.inner);
        let done = inner.in_order(|p, _| {
            let has = targets.iter().all(|t| inner.mark(p, *t) == Some(&None));
            has.then(|| Record::Done(p.clone()))
        });
        let n = self.write(inner, done).len();
        let inner = lock(&self.inner);
        let needed = |p: &StorePath| targets.iter().any(|t| inner.mark(p, *t).is_none());
        let to_upload = inner.in_order(|p, _| needed(p).then(|| p.clone()));
        let given_up = inner.live.len() - to_upload.len();
        (n, to_upload, given_up)
    }

    /// Replaces a derivation by its outputs, in its place; returns those new.
    pub fn replace(&self, drv: &StorePath, outputs: &[StorePath]) -> io::Result<Vec<StorePath>> {
        let added = self.append_at(outputs, self.entry(drv))?;
        self.write(lock(&self.inner), vec![Record::Done(drv.clone())]);
        Ok(added)
    }

    /// Gives up on a path for a target until requeued; false if not queued.
    pub fn give_up(&self, path: &StorePath, given_up: GivenUp) -> io::Result<bool> {
        let record = Record::GiveUp(path.clone(), given_up);
        Ok(!self.write(lock(&self.inner), vec![record]).is_empty())
    }

    /// Requeues paths given up on (`None`: all), as queued now; returns them.
    pub fn requeue(&self, paths: Option<&[StorePath]>) -> Vec<StorePath> {
        let inner = lock(&self.inner);
        let wanted: Option<HashSet<&StorePath>> = paths.map(|p| p.iter().collect());
        let chosen = inner.in_order(|p, _| {
            let given_up = inner.marks.get(p)?.iter().any(|(_, g)| g.is_some());
            let wanted = wanted.as_ref().is_none_or(|w| w.contains(p));
            (wanted && given_up).then(|| p.clone())
        });
        let now = now_secs();
        let requeue = |p| Record::Requeue(p, now);
        self.write(inner, chosen.into_iter().map(requeue).collect())
    }

    /// The paths up to `seq` given up on for `target`, oldest first.
    pub fn given_up_up_to(&self, seq: u64, target: TargetId) -> Vec<(StorePath, GivenUp)> {
        let inner = lock(&self.inner);
        inner.in_order(|p, e| {
            let g = inner.mark(p, target)?.as_ref()?;
            (e.seq <= seq).then(|| (p.clone(), g.clone()))
        })
    }

    /// The entry of a queued path, if it is queued.
    pub fn entry(&self, path: &StorePath) -> Option<Entry> {
        lock(&self.inner).live.get(path).copied()
    }

    /// Number of queued paths.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        lock(&self.inner).live.len()
    }

    /// The oldest queued path's entry, by sequence number.
    pub fn oldest(&self) -> Option<Entry> {
        let inner = lock(&self.inner);
        inner.live.values().copied().min_by_key(|e| e.seq)
    }

    /// Rewrites the journal with only the live records, in order, once at least `min_dead`
    /// records, and most, are dead. Written without the locks; a failure before the rename warns.
    fn compact(&self, min_dead: usize) {
        let (mut records, from) = loop {
            let disk = lock(&self.fd);
            let mut inner = lock(&self.inner);
            let dead = inner.records.saturating_sub(inner.live_records);
            // `compact_at` is `MAX` while another compaction runs.
            if dead < min_dead.max(inner.compact_at) || dead < inner.live.len() {
                return;
            }
            // With nothing pending nor being written, memory and file agree.
            if inner.pending.is_empty() && inner.written == inner.flushed {
                inner.compact_at = usize::MAX;
                break (inner.snapshot(), disk.1);
            }
            drop(disk);
            drop(self.flush(inner));
        };
        // A stable sort: each path's `+` stays first.
        records.sort_by_key(|(seq, _)| *seq);
        let mut data = Vec::with_capacity(records.len() * 80);
        records.iter().for_each(|(_, r)| r.write(&mut data));
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let result = self.replace_file(&tmp, &data, from);
        let mut inner = lock(&self.inner);
        inner.compact_at = 0;
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            inner.compact_at = 2 * inner.records.saturating_sub(inner.live_records);
            let j = self.dir.join(FILE_NAME);
            let j = j.display();
            crate::warning!("journal: cannot compact {j}: {e}; going on with the uncompacted one");
        }
    }

    /// Writes `data` and (holding the file) the records after `from` to `tmp`, renamed into place.
    fn replace_file(&self, tmp: &Path, data: &[u8], from: u64) -> io::Result<()> {
        // Opened for appending before the rename: no later failure leaves us writing the old file.
        let mut f = open_append(tmp)?;
        f.set_len(0)?;
        f.write_all(data)?;
        f.sync_data()?;
        let mut disk = lock(&self.fd);
        let mut meanwhile = vec![0; usize::try_from(disk.1 - from).unwrap_or(0)];
        disk.0.read_exact_at(&mut meanwhile, from)?;
        f.write_all(&meanwhile)?;
        f.sync_data()?;
        fs::rename(tmp, self.dir.join(FILE_NAME))?;
        *disk = (f, (data.len() + meanwhile.len()) as u64);
        lock(&self.inner).records = count_lines(data) + count_lines(&meanwhile);
        // Records go to the new file from now on: its name must be durable.
        if let Err(e) = sync_dir(&self.dir) {
            fatal("cannot sync the directory after compacting", &e);
        }
        Ok(())
    }
}

/// The error for a record [`Record::parse`] rejected, naming another store.
fn unusable(journal: &Path, line_no: usize, record: &[u8], store_dir: &str) -> io::Error {
    let text = String::from_utf8_lossy(record);
    let mut words = text
        .split(' ')
        .filter_map(|w| Some((w.rsplit_once('/')?.0, w)));
    let shown = crate::redact::text(&text.chars().take(200).collect::<String>());
    let what = match words.find(|(o, w)| *o != store_dir && StorePath::parse(w, o).is_ok()) {
        Some((o, _)) => format!(
            "queues a path of the store directory {o}, but this daemon uses \
             store-dir {store_dir}: start the daemon with store-dir = {o} (or NIX_STORE_DIR={o})"
        ),
        None => format!(
            "is not a record this version can read ({shown:?}; see the README's \
             Journal section, paths under {store_dir}): start the version that wrote it"
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

    impl Journal {
        fn lock(&self) -> MutexGuard<'_, Inner> {
            lock(&self.inner)
        }

        fn disk(&self) -> MutexGuard<'_, (File, u64)> {
            lock(&self.fd)
        }

        fn is_delivered(&self, path: &StorePath, target: TargetId) -> bool {
            self.lock().mark(path, target) == Some(&None)
        }

        fn is_given_up(&self, path: &StorePath, target: TargetId) -> bool {
            self.lock().mark(path, target).is_some_and(Option::is_some)
        }

        fn given_up_on(&self, target: TargetId) -> Vec<(StorePath, GivenUp)> {
            self.given_up_up_to(u64::MAX, target)
        }
    }

    struct Replay {
        paths: Vec<StorePath>,
        torn_bytes: usize,
    }

    /// Opens the journal, with the paths it queues, oldest first.
    fn open(dir: &Path, store_dir: &str) -> io::Result<(Journal, Replay)> {
        let (j, torn_bytes) = Journal::open(dir, store_dir)?;
        let paths = j.lock().in_order(|p, _| Some(p.clone()));
        Ok((j, Replay { paths, torn_bytes }))
    }

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
            let (j, r) = open(&dir.0, S).unwrap();
            assert!(r.paths.is_empty());
            assert_eq!(
                j.append(&[path(1), path(2), path(1)]).unwrap(),
                vec![path(1), path(2)]
            );
            assert_eq!(j.append(&[path(2), path(3)]).unwrap(), vec![path(3)]);
            j.drop_paths(&[path(2)]);
            assert_eq!(j.len(), 2);
        }
        let (j, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1), path(3)]);
        assert_eq!(j.len(), 2);
    }

    #[test]
    fn torn_tail_at_every_offset_keeps_earlier_records() {
        let dir = Dir::new("torn");
        {
            let (j, _) = open(&dir.0, S).unwrap();
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
            let (j, r) = open(&dir.0, S).unwrap();
            assert_eq!(r.paths, vec![path(1), path(2)], "cut at {cut}");
            assert_eq!(r.torn_bytes, cut - last_start);
            j.append(&[path(4)]).unwrap();
            drop(j);
            let (_, r) = open(&dir.0, S).unwrap();
            assert_eq!(r.paths, vec![path(1), path(2), path(4)], "cut at {cut}");
        }
    }

    #[test]
    fn compaction_keeps_live_paths_in_order() {
        let dir = Dir::new("compact");
        let n = COMPACT_MIN_DEAD + 10;
        {
            let (j, _) = open(&dir.0, S).unwrap();
            let all: Vec<StorePath> = (0..n).map(path).collect();
            j.append(&all).unwrap();
            j.drop_paths(&all[..n - 3]);
            assert_eq!(j.len(), 3);
        }
        let text = fs::read_to_string(dir.0.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 3, "compacted to the live records");
        let (_, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(n - 3), path(n - 2), path(n - 1)]);
    }

    #[test]
    fn failed_compaction_is_not_fatal() {
        let dir = Dir::new("nocompact");
        {
            let (j, _) = open(&dir.0, S).unwrap();
            j.append(&[path(1), path(2), path(3)]).unwrap();
            j.drop_paths(&[path(1), path(2)]);
        }
        // A directory where the compacted copy would be written.
        fs::create_dir(dir.0.join(format!("{FILE_NAME}.tmp"))).unwrap();
        let (j, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(3)]);
        j.append(&[path(4)]).unwrap();
        drop(j);
        let (_, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(3), path(4)]);
    }

    /// Puts path 1 in a write in progress by "another caller" (the test,
    /// holding the file, `flushed` past `written`), the way `flush` leaves
    /// things while it writes; its record stays in `pending` for the failure
    /// to take back.
    fn writing_path_1(j: &Journal) -> MutexGuard<'_, (File, u64)> {
        let disk = j.disk();
        let mut inner = j.lock();
        inner.apply(&Record::Add(path(1), 0));
        let mut buf = Vec::new();
        Record::Add(path(1), 0).write(&mut buf);
        inner.pending.extend(buf);
        inner.pending_adds.push(path(1));
        inner.flushed += 1;
        disk
    }

    /// Ends that write as a failed one does: path 1 taken back, waiters woken.
    fn fail_write(j: &Journal, disk: MutexGuard<'_, (File, u64)>, failures: u64) {
        let mut inner = j.lock();
        inner.pending.clear();
        for p in std::mem::take(&mut inner.pending_adds) {
            inner.apply(&Record::Done(p));
        }
        inner.failed = (inner.failed.0 + failures, "disk full".into());
        inner.written = inner.flushed;
        j.cv.notify_all();
        drop((inner, disk));
    }

    #[test]
    fn already_queued_path_is_acknowledged_only_once_on_disk() {
        let dir = Dir::new("inflight");
        let (j, _) = open(&dir.0, S).unwrap();
        let j = Arc::new(j);
        let disk = writing_path_1(&j);
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
        fail_write(&j, disk, 1);
        let added = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(added, vec![path(1)], "the waiting caller writes it itself");
        drop(j);
        let (_, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1)]);
    }

    /// A caller that wakes only after its write and 100 others failed
    /// still learns its own write failed (a bounded map of failed writes
    /// once forgot it, and an `ok` went out for a record not on disk).
    #[test]
    fn a_late_waiter_reads_its_own_groups_failure() {
        let dir = Dir::new("latewaiter");
        let (j, _) = open(&dir.0, S).unwrap();
        let j = Arc::new(j);
        // A write in progress (`flushed` past `written`), so the caller's
        // record waits for the next.
        let disk = j.disk();
        j.lock().flushed += 1;
        let (tx, rx) = std::sync::mpsc::channel();
        let j2 = Arc::clone(&j);
        std::thread::spawn(move || {
            let _ = tx.send(j2.append(&[path(2)]).map_err(|e| e.to_string()));
        });
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while j.lock().pending.is_empty() {
            let waiting = std::time::Instant::now() < until;
            assert!(waiting, "the record never waited for the write in progress");
            std::thread::yield_now();
        }
        fail_write(&j, disk, 101);
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
            let e = open(&dir.0, S).err().expect(&bad);
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
            let (j, _) = open(&dir.0, other).unwrap();
            j.append(std::slice::from_ref(&theirs)).unwrap();
        }
        let file = dir.0.join(FILE_NAME);
        let before = fs::read(&file).unwrap();
        let e = open(&dir.0, S)
            .err()
            .expect("opened another store's journal");
        let shown = e.to_string();
        assert!(shown.contains(&format!("store-dir = {other}")), "{shown}");
        assert!(shown.contains(&format!("uses store-dir {S}")), "{shown}");
        assert_eq!(fs::read(&file).unwrap(), before, "the journal is unchanged");
        let (_, r) = open(&dir.0, other).unwrap();
        assert_eq!(r.paths, vec![theirs], "still there for the right store dir");
    }

    #[test]
    fn replace_inherits_place_in_line() {
        let dir = Dir::new("replace");
        let (j, _) = open(&dir.0, S).unwrap();
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
            let (j, _) = open(&dir.0, S).unwrap();
            j.append(&[path(1), path(2), path(3)]).unwrap();
            assert!(j.give_up(&path(2), given_up(a, "first\nerror")).unwrap());
            assert!(j.give_up(&path(2), given_up(a, "nix copy failed")).unwrap());
            assert!(j.give_up(&path(3), given_up(b, "other target")).unwrap());
            assert!(!j.give_up(&path(9), given_up(a, "not queued")).unwrap());
        }
        let text = fs::read_to_string(dir.0.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 6, "{text}");
        let (j, r) = open(&dir.0, S).unwrap();
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

        assert_eq!(j.requeue(Some(&[path(2), path(2), path(1)])), vec![path(2)]);
        assert!(!j.is_given_up(&path(2), a));
        assert_eq!(j.requeue(None), vec![path(3)]);
        assert!(j.given_up_on(b).is_empty());
        j.give_up(&path(1), given_up(a, "again")).unwrap();
        drop(j);
        let (j, _) = open(&dir.0, S).unwrap();
        assert!(j.is_given_up(&path(1), a));
        assert!(!j.is_given_up(&path(2), a) && !j.is_given_up(&path(3), b));
        // Dropped: its failure goes with it, and compaction keeps the rest.
        j.drop_paths(&[path(2)]);
        j.compact(0);
        drop(j);
        let text = fs::read_to_string(dir.0.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.contains(&format!("! 1700000000 {a} 10 {} again\n", path(1))),
            "{text}"
        );
        let (j, r) = open(&dir.0, S).unwrap();
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
        let (j, _) = open(&dir.0, S).unwrap();
        assert_eq!(j.entry(&path(1)).unwrap().queued_at, 5);
        assert_eq!(j.requeue(None), vec![path(1)]);
        let now = j.entry(&path(1)).unwrap().queued_at;
        assert!(now > 1_700_000_000, "{now}");
        drop(j);
        let (j, _) = open(&dir.0, S).unwrap();
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
            let (j, _) = open(&dir.0, S).unwrap();
            j.append(&[path(1), path(2), path(3)]).unwrap();
            // One target: done at once, no `>` record.
            assert_eq!(j.deliver(&[path(3)], a, &[a]).unwrap(), vec![path(3)]);
            assert_eq!(j.deliver(&[path(1), path(2)], a, &[a, b]).unwrap(), vec![]);
            assert_eq!(j.deliver(&[path(1)], a, &[a, b]).unwrap(), vec![], "again");
            assert!(j.is_delivered(&path(1), a) && !j.is_delivered(&path(1), b));
        }
        let text = fs::read_to_string(dir.0.join(FILE_NAME)).unwrap();
        assert_eq!(text.matches("\n> ").count(), 2, "{text}");
        let (j, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(1), path(2)]);
        assert!(j.is_delivered(&path(2), a));
        assert_eq!(j.deliver(&[path(1)], b, &[a, b]).unwrap(), vec![path(1)]);
        j.compact(0);
        drop(j);
        let (j, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(2)]);
        assert!(j.is_delivered(&path(2), a), "kept by compaction");
        // Target b taken out of the configuration: a has it all.
        assert_eq!(j.recover(&[a]), (1, vec![], 0));
        assert_eq!(j.len(), 0);
        assert_eq!(j.recover(&[a]), (0, vec![], 0));
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
        let (j, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(2), path(3)]);
        assert!(j.given_up_on(TargetId::of(None)).is_empty());
        assert_eq!(j.entry(&path(2)).unwrap().queued_at, 6);
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_lose_nothing() {
        let dir = Dir::new("concurrent");
        let (j, _) = open(&dir.0, S).unwrap();
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
        let (_, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths.len(), 800);
    }

    /// Records written while the compacted copy was being written without
    /// the lock are appended to it before it replaces the journal.
    #[test]
    fn compaction_keeps_what_came_while_it_wrote() {
        let dir = Dir::new("compactmeanwhile");
        let (j, _) = open(&dir.0, S).unwrap();
        j.append(&[path(1), path(2), path(3)]).unwrap();
        j.drop_paths(&[path(2)]);
        // The copy as compaction takes it, then records arrive meanwhile.
        let (data, from) = {
            let disk = j.disk();
            let mut records = j.lock().snapshot();
            records.sort_by_key(|(seq, _)| *seq);
            let mut data = Vec::new();
            records.iter().for_each(|(_, r)| r.write(&mut data));
            (data, disk.1)
        };
        j.append(&[path(4)]).unwrap();
        j.drop_paths(&[path(1)]);
        let tmp = dir.0.join(format!("{FILE_NAME}.tmp"));
        j.replace_file(&tmp, &data, from).unwrap();
        j.append(&[path(5)]).unwrap();
        drop(j);
        let (_, r) = open(&dir.0, S).unwrap();
        assert_eq!(r.paths, vec![path(3), path(4), path(5)]);
        assert!(!tmp.exists());
    }
}
