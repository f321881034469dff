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
//! - `- <store-path>`: done (uploaded or dropped).
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
                dead: records - live.len(),
                live,
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
                inner.dead += 2;
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

    /// Replaces a derivation by its outputs, which keep its place in line.
    /// Returns the outputs that were not queued already.
    pub fn replace(&self, drv: &StorePath, outputs: &[StorePath]) -> io::Result<Vec<StorePath>> {
        let entry = self.entry(drv);
        let added = self.append_at(outputs, entry)?;
        self.complete(std::slice::from_ref(drv))?;
        Ok(added)
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
    let path = text
        .strip_prefix("+ ")
        .and_then(|rest| rest.split_once(' ').map(|(_, p)| p))
        .or_else(|| text.strip_prefix("- "));
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
                 expected '+ <seconds> <store-path>' or '- <store-path>' with paths under \
                 {store_dir}: start the version that wrote it, or move the journal aside; \
                 nothing in it was changed",
                journal.display()
            )
        }
    };
    io::Error::new(io::ErrorKind::InvalidData, message)
}

enum Record {
    Add(StorePath, u64),
    Done(StorePath),
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
