//! The spool: where the hook leaves its request when the daemon is away.
//!
//! The hook renames each finished request file into place as
//! `<time>-<pid>.req` ([`crate::wire::spool_names`]). The daemon queues
//! every spooled request at start and when idle, and deletes a file only
//! after its paths are in the journal. A file with a line that cannot be
//! queued has its other paths queued and is set aside as `.bad`; one whose
//! last line has no line end is still being written (by something that is
//! not the hook) and is set aside once unchanged for an hour; one that
//! cannot be deleted is queued once, not again while it stays.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::journal::Journal;
use crate::protocol::{parse_request, Request, MAX_LINE};
use crate::store_path::StorePath;
use crate::warning;
use crate::wire::SPOOL_SUFFIX;

/// Largest spool file read: far more than any hook writes (one request of at
/// most `MAX_LINE` bytes per 10,000 paths).
const MAX_FILE: u64 = 64 * MAX_LINE as u64;
/// A temporary file or an unfinished spool file unchanged for this long was
/// left by a writer that died (no hook takes anywhere near this long).
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);
/// Problems (bad lines of a file, files of one pass) named one by one; the
/// rest are counted.
const NAMED: usize = 5;

/// What identifies one version of a file: a new file under the same name,
/// or the same file written again, is read again.
type FileId = (u64, u64, u64, i64, i64);

fn file_id(m: &fs::Metadata) -> FileId {
    (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec())
}

/// True for the name of a finished request file.
fn is_request(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str());
    name.is_some_and(|n| n.ends_with(SPOOL_SUFFIX) && !n.starts_with('.'))
}

/// Path counts of the request files [`backlog`] read, by name and inode: a
/// request file is renamed into place finished and never changes, so each
/// is read once, and a listing of the directory is all that a call costs.
static COUNTED: Mutex<BTreeMap<OsString, (u64, usize)>> = Mutex::new(BTreeMap::new());

/// The backlog, for `status`: request files not ingested yet, and the
/// paths they ask for (counted without checking them; a file that cannot
/// be read counts no paths).
pub fn backlog(dir: &Path) -> (usize, usize) {
    use std::os::unix::fs::DirEntryExt;
    let mut counted = COUNTED.lock().unwrap_or_else(|e| e.into_inner());
    let mut now = BTreeMap::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let (name, ino) = (entry.file_name(), entry.ino());
        if !is_request(Path::new(&name)) {
            continue;
        }
        let paths = match counted.get(&name) {
            Some(&(was, n)) if was == ino => n,
            _ => count_paths(&dir.join(&name)),
        };
        now.insert(name, (ino, paths));
    }
    let backlog = (now.len(), now.values().map(|(_, n)| n).sum());
    *counted = now;
    backlog
}

/// The paths a request file asks for: the words after `enqueue` and `drv`.
fn count_paths(file: &Path) -> usize {
    let meta = fs::symlink_metadata(file);
    if !meta.is_ok_and(|m| m.is_file() && m.len() <= MAX_FILE) {
        return 0;
    }
    let data = fs::read(file).unwrap_or_default();
    let requests = data.split(|&b| b == b'\n');
    let queueing = requests.filter(|l| l.starts_with(b"enqueue ") || l.starts_with(b"drv "));
    queueing
        .map(|l| l.iter().filter(|&&b| b == b' ').count())
        .sum()
}

/// The spool directory, and what the daemon knows about its files.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    store_dir: String,
    /// Files whose paths were journaled but which could not be deleted or
    /// set aside: not read again while they stay as they are.
    done: HashMap<PathBuf, FileId>,
    /// This pass's warnings, logged together at its end.
    notes: Vec<String>,
}

impl Spool {
    /// The spool in `dir`, for paths under `store_dir`.
    pub fn new(dir: &Path, store_dir: &str) -> Spool {
        Spool {
            dir: dir.to_path_buf(),
            store_dir: store_dir.to_string(),
            done: HashMap::new(),
            notes: Vec::new(),
        }
    }

    /// Journals every finished spooled request and deletes its file (or sets
    /// it aside as `.bad` if a line could not be queued); returns the paths
    /// that were newly queued. Files that cannot be journaled now stay.
    pub fn ingest(&mut self, journal: &Journal) -> Vec<StorePath> {
        let entries: Vec<PathBuf> = match fs::read_dir(&self.dir) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => return Vec::new(),
        };
        let mut names = Vec::new();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A hook killed between writing and renaming.
                let meta = fs::symlink_metadata(&path);
                if meta.is_ok_and(|m| older_than(&m, ABANDONED_AFTER)) {
                    let _ = fs::remove_file(&path);
                }
            } else if is_request(&path) {
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
        for note in notes.iter().take(NAMED) {
            warning!("{note}");
        }
        if notes.len() > NAMED {
            warning!(
                "{} more spool files as above; see the spool directory",
                notes.len() - NAMED
            );
        }
        queued
    }

    /// Ingests one file (see [`Spool::ingest`]); false when the journal
    /// cannot be written now.
    fn ingest_file(&mut self, journal: &Journal, file: &Path, queued: &mut Vec<StorePath>) -> bool {
        // Only regular files of a plausible size: a link could point the
        // daemon at any file, a huge file would only cost memory.
        let meta = match fs::symlink_metadata(file) {
            Ok(m) if m.is_file() && m.len() <= MAX_FILE => m,
            Ok(m) => {
                let why = format!(
                    "is not a regular file of at most {MAX_FILE} bytes ({} bytes); nothing in it is queued",
                    m.len()
                );
                self.set_aside(file, &m, &why);
                return true;
            }
            Err(_) => return true,
        };
        if self.done.get(file) == Some(&file_id(&meta)) {
            return true;
        }
        let data = match fs::read(file) {
            Ok(d) => d,
            Err(e) => {
                self.notes
                    .push(format!("cannot read spool file {}: {e}", file.display()));
                return true;
            }
        };
        // Requests end with a line end: without one, the writer is not
        // done (or died while writing).
        let finished = data.last() == Some(&b'\n');
        let abandoned = !finished && older_than(&meta, ABANDONED_AFTER);
        if !finished && !abandoned {
            return true;
        }
        let end = data.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let (paths, mut problems) = self.parse(&data[..end]);
        match journal.append(&paths) {
            Ok(added) => queued.extend(added),
            Err(e) => {
                warning!(
                    "cannot journal spool file {}: {e}; will try again",
                    file.display()
                );
                return false;
            }
        }
        if abandoned {
            problems.push(format!(
                "its last line has no line end and the file has not changed for {} s \
                 (its writer died?): that line is not queued",
                ABANDONED_AFTER.as_secs()
            ));
        }
        if !problems.is_empty() {
            let why = format!("{}; its other lines are queued", problems.join("; "));
            self.set_aside(file, &meta, &why);
        } else if let Err(e) = fs::remove_file(file) {
            let why = format!("its paths are queued, but it cannot be removed: {e}");
            self.keep_done(file, &meta, &why);
        }
        true
    }

    /// The paths of a spool file's complete lines, and what was wrong with
    /// the lines that cannot be queued.
    fn parse(&self, complete: &[u8]) -> (Vec<StorePath>, Vec<String>) {
        let mut paths = Vec::new();
        let mut bad = Vec::new();
        let mut bad_count = 0usize;
        for (n, line) in complete.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let problem = if line.len() > MAX_LINE {
                format!("is longer than {MAX_LINE} bytes ({} bytes)", line.len())
            } else {
                match parse_request(line, &self.store_dir) {
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
                }
            };
            bad_count += 1;
            if bad.len() < NAMED {
                bad.push(format!("line {} {problem}", n + 1));
            }
        }
        if bad_count > bad.len() {
            bad.push(format!("{} more bad lines", bad_count - bad.len()));
        }
        (paths, bad)
    }

    /// Renames a spool file that held something that could not be queued to
    /// `.bad`, where it is no longer read, and says so.
    fn set_aside(&mut self, file: &Path, meta: &fs::Metadata, why: &str) {
        let bad = file.with_extension("bad");
        match fs::rename(file, &bad) {
            Ok(()) => self.notes.push(format!(
                "spool file {}: {why}; set aside as {}",
                file.display(),
                bad.display()
            )),
            Err(e) => {
                let why = format!("{why}; cannot set it aside as {}: {e}", bad.display());
                self.keep_done(file, meta, &why);
            }
        }
    }

    /// Remembers a spool file that is queued but stays: it is not read again
    /// until it changes or the daemon restarts (then its paths are queued
    /// once more, which costs at most one more upload).
    fn keep_done(&mut self, file: &Path, meta: &fs::Metadata, why: &str) {
        let d = file.display();
        self.notes.push(format!(
            "spool file {d}: {why}; it is not read again while it stays"
        ));
        self.done.insert(file.to_path_buf(), file_id(meta));
    }
}

fn older_than(meta: &fs::Metadata, age: Duration) -> bool {
    let elapsed = meta.modified().ok().and_then(|t| t.elapsed().ok());
    elapsed.is_some_and(|a| a > age)
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
