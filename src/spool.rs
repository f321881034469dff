//! The spool: where the hook leaves its request, renamed into place
//! finished as `<time>-<pid>.req`, when the daemon is away. The daemon
//! queues every spooled request at start and when idle, and deletes a file
//! only once its paths are journaled. A file with a line that cannot be
//! queued has its other paths queued and is set aside as `.bad`, as is one
//! whose unfinished last line (not the hook's) is an hour old; one that
//! cannot be deleted is not read again while it stays.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::journal::Journal;
use crate::protocol::{parse_request, Request, MAX_LINE};
use crate::store_path::StorePath;

/// Largest spool file read: far more than any hook writes.
const MAX_FILE: u64 = 64 * MAX_LINE as u64;
/// A temporary or unfinished file unchanged for this long was left by a
/// writer that died (no hook takes anywhere near this long).
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);
/// Problems named (bad lines of a file, files of one pass); the rest are
/// counted.
const NAMED: usize = 5;

fn is_request(name: &OsStr) -> bool {
    let name = name.to_str().unwrap_or(".");
    name.ends_with(crate::wire::SPOOL_SUFFIX) && !name.starts_with('.')
}

/// Path counts of the request files [`backlog`] read, by name and inode: a
/// request file never changes once in place, so each is read once.
static COUNTED: Mutex<BTreeMap<OsString, (u64, usize)>> = Mutex::new(BTreeMap::new());

/// The backlog, for `status`: request files not ingested yet, and the
/// paths they ask for (the words after `enqueue` and `drv`, unchecked).
pub fn backlog(dir: &Path) -> (usize, usize) {
    let mut counted = COUNTED.lock().unwrap_or_else(|e| e.into_inner());
    let mut now = BTreeMap::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let (name, ino, file) = (entry.file_name(), entry.ino(), entry.path());
        let paths = match counted.get(&name) {
            _ if !is_request(&name) => continue,
            Some(&(was, n)) if was == ino => n,
            _ if !fs::symlink_metadata(&file).is_ok_and(|m| m.is_file() && m.len() <= MAX_FILE) => {
                0
            }
            _ => (fs::read(&file).unwrap_or_default().split(|&b| b == b'\n'))
                .filter(|l| l.starts_with(b"enqueue ") || l.starts_with(b"drv "))
                .map(|l| l.iter().filter(|&&b| b == b' ').count())
                .sum(),
        };
        now.insert(name, (ino, paths));
    }
    let backlog = (now.len(), now.values().map(|(_, n)| n).sum());
    *counted = now;
    backlog
}

/// What identifies one version of a file: a new file under the same name,
/// or the same file written again, is read again.
fn file_id(m: &fs::Metadata) -> (u64, u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec())
}

fn abandoned(meta: &fs::Metadata) -> bool {
    let age = meta.modified().ok().and_then(|t| t.elapsed().ok());
    age.is_some_and(|a| a > ABANDONED_AFTER)
}

/// The spool directory, and what the daemon knows about its files.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    store_dir: String,
    /// Files whose paths were journaled but which could not be deleted or
    /// set aside: not read again while they stay as they are.
    done: HashMap<PathBuf, (u64, u64, u64, i64, i64)>,
    /// This pass's warnings, logged together at its end.
    notes: Vec<String>,
}

impl Spool {
    /// The spool in `dir`, for paths under `store_dir`.
    pub fn new(dir: &Path, store_dir: &str) -> Spool {
        let (dir, store_dir) = (dir.to_path_buf(), store_dir.to_string());
        let (done, notes) = (HashMap::new(), Vec::new());
        Spool {
            dir,
            store_dir,
            done,
            notes,
        }
    }

    /// Journals every finished spooled request and deletes its file (or sets
    /// it aside); returns the paths newly queued. Files that cannot be
    /// journaled now stay.
    pub fn ingest(&mut self, journal: &Journal) -> Vec<StorePath> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let (name, path) = (entry.file_name(), entry.path());
            let tmp = name
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"));
            // A temporary file of a hook killed between writing and renaming.
            if tmp && fs::symlink_metadata(&path).is_ok_and(|m| abandoned(&m)) {
                let _ = fs::remove_file(&path);
            } else if is_request(&name) {
                names.push(path);
            }
        }
        names.sort();
        self.done.retain(|p, _| names.binary_search(p).is_ok());
        let mut queued = Vec::new();
        for file in names {
            if !self.ingest_file(journal, &file, &mut queued) {
                break;
            }
        }
        let notes = std::mem::take(&mut self.notes);
        notes
            .iter()
            .take(NAMED)
            .for_each(|n| crate::warning!("{n}"));
        if let n @ 1.. = notes.len().saturating_sub(NAMED) {
            crate::warning!("{n} more spool files as above; see the spool directory");
        }
        queued
    }

    /// Ingests one file (see [`Spool::ingest`]); false when the journal
    /// cannot be written now.
    fn ingest_file(&mut self, journal: &Journal, file: &Path, queued: &mut Vec<StorePath>) -> bool {
        let Ok(meta) = fs::symlink_metadata(file) else {
            return true;
        };
        // Only regular files of a plausible size: a link could point the
        // daemon at any file, a huge file would only cost memory.
        let data = match (meta.is_file() && meta.len() <= MAX_FILE).then(|| fs::read(file)) {
            _ if self.done.get(file) == Some(&file_id(&meta)) => return true,
            Some(Ok(data)) => data,
            Some(Err(e)) => {
                (self.notes).push(format!("cannot read spool file {}: {e}", file.display()));
                return true;
            }
            None => {
                let (max, n) = (MAX_FILE, meta.len());
                let why = format!("is not a regular file of at most {max} bytes ({n} bytes)");
                self.set_aside(file, &meta, why + "; nothing in it is queued", true);
                return true;
            }
        };
        // Requests end with a line end: without one, the writer is not done
        // (or died while writing).
        let unfinished = data.last() != Some(&b'\n');
        if unfinished && !abandoned(&meta) {
            return true;
        }
        let end = data.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let (paths, mut problems) = self.parse(&data[..end]);
        if let Err(e) = journal.append(&paths).map(|added| queued.extend(added)) {
            let f = file.display();
            crate::warning!("cannot journal spool file {f}: {e}; will try again");
            return false;
        }
        if unfinished {
            problems.push(format!(
                "its last line has no line end and the file has not changed for {} s \
                 (its writer died?): that line is not queued",
                ABANDONED_AFTER.as_secs()
            ));
        }
        if !problems.is_empty() {
            let why = format!("{}; its other lines are queued", problems.join("; "));
            self.set_aside(file, &meta, why, true);
        } else if let Err(e) = fs::remove_file(file) {
            let why = format!("its paths are queued, but it cannot be removed: {e}");
            self.set_aside(file, &meta, why, false);
        }
        true
    }

    /// The paths of a spool file's complete lines, and what was wrong with
    /// the lines that cannot be queued.
    fn parse(&self, complete: &[u8]) -> (Vec<StorePath>, Vec<String>) {
        let (mut paths, mut bad, mut more) = (Vec::new(), Vec::new(), 0);
        for (n, line) in complete.split(|&b| b == b'\n').enumerate() {
            let problem = match line.len() {
                0 => continue,
                len @ (MAX_LINE..) if len > MAX_LINE => {
                    format!("is longer than {MAX_LINE} bytes ({len} bytes)")
                }
                _ => match parse_request(line, &self.store_dir) {
                    Ok(Request::Enqueue(p)) => {
                        paths.extend(p);
                        continue;
                    }
                    Ok(Request::Drv(d)) => {
                        paths.push(d);
                        continue;
                    }
                    Ok(other) => format!("{other:?} is not a queue request"),
                    Err(e) => e.to_string(),
                },
            };
            match bad.len() {
                NAMED => more += 1,
                _ => bad.push(format!("line {} {problem}", n + 1)),
            }
        }
        if more > 0 {
            bad.push(format!("{more} more bad lines"));
        }
        (paths, bad)
    }

    /// Sets a spool file aside as `.bad` (with `rename`), where it is no
    /// longer read, or else remembers it as done: not read again until it
    /// changes or the daemon restarts (then its paths are queued once more,
    /// which costs at most one more upload). Says why.
    fn set_aside(&mut self, file: &Path, meta: &fs::Metadata, why: String, rename: bool) {
        let bad = file.with_extension("bad");
        let mut note = format!("spool file {}: {why}", file.display());
        match rename.then(|| fs::rename(file, &bad)) {
            Some(Ok(())) => note += &format!("; set aside as {}", bad.display()),
            failed => {
                if let Some(Err(e)) = failed {
                    note += &format!("; cannot set it aside as {}: {e}", bad.display());
                }
                note += "; it is not read again while it stays";
                self.done.insert(file.to_path_buf(), file_id(meta));
            }
        }
        self.notes.push(note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "/nix/store";

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("npbhq-spool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn names(spool: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(spool)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn path(c: char) -> String {
        format!("{S}/{}-{c}", "0".repeat(32))
    }

    fn age(file: &Path, secs: u64) {
        let then = std::time::SystemTime::now() - Duration::from_secs(secs);
        fs::File::options()
            .write(true)
            .open(file)
            .and_then(|f| f.set_modified(then))
            .unwrap();
    }

    #[test]
    fn written_requests_are_ingested_once_and_bad_ones_set_aside() {
        let spool = dir("ingest");
        let state = dir("ingest-state");
        fs::create_dir_all(&spool).unwrap();
        let (_, name) = crate::wire::spool_names(1, 2);
        fs::write(spool.join(&name), format!("enqueue {}\n", path('a'))).unwrap();
        let (_, mixed) = crate::wire::spool_names(3, 4);
        let request = format!("enqueue {}\nretry\nenqueue /etc/passwd\n", path('b'));
        fs::write(spool.join(&mixed), &request).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", spool.join("evil.req")).unwrap();
        let (journal, _) = Journal::open(&state, S).unwrap();
        let mut s = Spool::new(&spool, S);
        let queued: Vec<String> = s.ingest(&journal).iter().map(|p| p.to_string()).collect();
        assert_eq!(queued, vec![path('a'), path('b')]);
        assert!(s.ingest(&journal).is_empty(), "each file is read once");
        let mixed_bad = mixed.replace(".req", ".bad");
        assert_eq!(
            names(&spool),
            vec![mixed_bad.clone(), "evil.bad".to_string()]
        );
        assert_eq!(
            fs::read_to_string(spool.join(mixed_bad)).unwrap(),
            request,
            "set aside as it was"
        );
        let _ = fs::remove_dir_all(&spool);
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn a_line_over_the_limit_sets_the_file_aside_and_the_rest_is_queued() {
        let spool = dir("long");
        let state = dir("long-state");
        fs::create_dir_all(&spool).unwrap();
        let long = format!("enqueue {}\n", path('x').repeat(MAX_LINE / 40));
        assert!(long.len() > MAX_LINE);
        let request = format!("enqueue {}\n{long}enqueue {}\n", path('a'), path('b'));
        fs::write(spool.join("1-1.req"), &request).unwrap();
        let (journal, _) = Journal::open(&state, S).unwrap();
        let queued = Spool::new(&spool, S).ingest(&journal);
        assert_eq!(queued.len(), 2);
        assert_eq!(names(&spool), vec!["1-1.bad".to_string()]);
        assert_eq!(fs::read(spool.join("1-1.bad")).unwrap(), request.as_bytes());
        let _ = fs::remove_dir_all(&spool);
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn an_unfinished_last_line_waits_for_its_writer() {
        let spool = dir("partial");
        let state = dir("partial-state");
        fs::create_dir_all(&spool).unwrap();
        let file = spool.join("1-1.req");
        // Cut in the middle of the second path.
        let cut = format!("enqueue {}\nenqueue {}", path('a'), &path('b')[..20]);
        fs::write(&file, &cut).unwrap();
        let (journal, _) = Journal::open(&state, S).unwrap();
        let mut s = Spool::new(&spool, S);
        assert!(
            s.ingest(&journal).is_empty(),
            "nothing of it before it is done"
        );
        assert!(journal.is_empty());
        assert_eq!(names(&spool), vec!["1-1.req".to_string()]);
        // The writer finishes.
        fs::write(
            &file,
            format!("enqueue {}\nenqueue {}\n", path('a'), path('b')),
        )
        .unwrap();
        assert_eq!(s.ingest(&journal).len(), 2);
        assert!(names(&spool).is_empty());

        // A writer that died an hour ago: its complete lines are queued, the
        // file (with the cut line) set aside.
        fs::write(
            &file,
            format!("enqueue {}\nenqueue {}", path('c'), &path('d')[..20]),
        )
        .unwrap();
        age(&file, 7200);
        let queued: Vec<String> = s.ingest(&journal).iter().map(|p| p.to_string()).collect();
        assert_eq!(queued, vec![path('c')]);
        assert_eq!(names(&spool), vec!["1-1.bad".to_string()]);
        let _ = fs::remove_dir_all(&spool);
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn abandoned_temporary_files_are_removed_fresh_ones_kept() {
        let spool = dir("abandoned");
        let state = dir("abandoned-state");
        fs::create_dir_all(&spool).unwrap();
        let old = spool.join(".1-2.tmp");
        let fresh = spool.join(".3-4.tmp");
        fs::write(&old, "enqueue").unwrap();
        fs::write(&fresh, "enqueue").unwrap();
        age(&old, 7200);
        let (journal, _) = Journal::open(&state, S).unwrap();
        assert!(Spool::new(&spool, S).ingest(&journal).is_empty());
        assert!(!old.exists(), "an hour-old temporary file is abandoned");
        assert!(fresh.exists(), "a hook may still be writing a fresh one");
        let _ = fs::remove_dir_all(&spool);
        let _ = fs::remove_dir_all(&state);
    }

    /// `backlog` reads a request file once: content changed in place is not
    /// read again; a new file renamed over it is.
    #[test]
    fn backlog_reads_each_request_file_once() {
        let spool = dir("backlog");
        fs::create_dir_all(&spool).unwrap();
        let (_, name) = crate::wire::spool_names(7, 8);
        let file = spool.join(&name);
        let two = format!("enqueue {} {}\n", path('a'), path('b'));
        fs::write(&file, &two).unwrap();
        fs::write(spool.join("ignored.tmp"), "enqueue x\n").unwrap();
        assert_eq!(backlog(&spool), (1, 2));
        fs::write(&file, format!("{two}{two}")).unwrap();
        assert_eq!(backlog(&spool), (1, 2), "the same file is not read again");
        let tmp = spool.join(".new.tmp");
        fs::write(&tmp, format!("{two}{two}")).unwrap();
        fs::rename(&tmp, &file).unwrap();
        assert_eq!(backlog(&spool), (1, 4), "a new file under the name is read");
        fs::remove_file(&file).unwrap();
        assert_eq!(backlog(&spool), (0, 0));
        let _ = fs::remove_dir_all(&spool);
    }
}
