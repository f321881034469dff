//! The spool, where the hook leaves requests (`<time>-<pid>.req`) when the daemon is away: queued
//! at start and when idle, each file deleted once journaled or set aside as `.bad`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crate::journal::Journal;
use crate::protocol::{parse_request, Request, MAX_LINE};
use crate::store_path::StorePath;

/// Largest spool file read: far more than any hook writes.
const MAX_FILE: u64 = 64 * MAX_LINE as u64;
/// A temporary or unfinished file this old was left by a writer that died.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);
/// Problems named (bad lines of a file, files of one pass); others counted.
const NAMED: usize = 5;

/// Only regular files of a plausible size are read (a link could point anywhere).
fn regular(meta: &fs::Metadata) -> bool {
    meta.is_file() && meta.len() <= MAX_FILE
}

fn is_request(name: &OsStr) -> bool {
    let name = name.to_str().unwrap_or(".");
    name.ends_with(crate::wire::SPOOL_SUFFIX) && !name.starts_with('.')
}

type Counted = HashMap<OsString, (u64, usize, bool)>;
/// Path counts of request files by name and inode (each read once), marked while listed.
static COUNTED: LazyLock<Mutex<Counted>> = LazyLock::new(Mutex::default);

/// For `status`: request files not ingested yet, and the paths (words after a verb) they ask for.
pub fn backlog(dir: &Path) -> (usize, usize) {
    let mut counted = COUNTED.lock().unwrap_or_else(|e| e.into_inner());
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let (name, ino) = (entry.file_name(), entry.ino());
        if !is_request(&name) {
            continue;
        }
        let (was, paths, listed) = counted.entry(name).or_default();
        if *was != ino {
            let file = fs::symlink_metadata(entry.path()).is_ok_and(|m| regular(&m));
            let data = file.then(|| fs::read(entry.path()).unwrap_or_default());
            *paths = data.map_or(0, |d| d.iter().filter(|&&b| b == b' ').count());
        }
        (*was, *listed) = (ino, true);
    }
    counted.retain(|_, (_, _, listed)| std::mem::take(listed));
    (counted.len(), counted.values().map(|(_, n, _)| n).sum())
}

/// One version of a file: a new file, or one written again, is read again.
fn file_id(m: &fs::Metadata) -> (u64, u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec())
}

fn abandoned(meta: &fs::Metadata) -> bool {
    let age = meta.modified().ok().and_then(|t| t.elapsed().ok());
    age.is_some_and(|a| a > ABANDONED_AFTER)
}

/// The spool directory, and what the daemon knows about its files.
#[derive(Debug, Default)]
pub struct Spool {
    dir: PathBuf,
    store_dir: String,
    /// Files journaled that could not be deleted nor set aside: not read again while unchanged.
    done: HashMap<PathBuf, (u64, u64, u64, i64, i64)>,
    /// This pass's warnings, logged together at its end.
    notes: Vec<String>,
}

impl Spool {
    /// The spool in `dir`, for paths under `store_dir`.
    pub fn new(dir: &Path, store_dir: &str) -> Spool {
        let mut spool = Spool::default();
        (spool.dir, spool.store_dir) = (dir.into(), store_dir.into());
        spool
    }

    /// Journals every finished request file and deletes it (or sets it aside); returns new paths.
    pub fn ingest(&mut self, journal: &Journal) -> Vec<StorePath> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let (name, path) = (entry.file_name(), entry.path());
            // A temporary file of a hook killed between writing and renaming.
            let tmp = name.to_string_lossy();
            let tmp = tmp.starts_with('.') && tmp.ends_with(".tmp");
            if tmp && fs::symlink_metadata(&path).is_ok_and(|m| abandoned(&m)) {
                let _ = fs::remove_file(&path);
            } else if is_request(&name) {
                names.push(path);
            }
        }
        names.sort();
        self.done.retain(|p, _| names.binary_search(p).is_ok());
        let ingested = names.iter().map_while(|f| self.ingest_file(journal, f));
        let queued = ingested.flatten().collect();
        let notes = std::mem::take(&mut self.notes);
        for note in notes.iter().take(NAMED) {
            crate::warning!("{note}");
        }
        if let n @ 1.. = notes.len().saturating_sub(NAMED) {
            crate::warning!("{n} more spool files as above; see the spool directory");
        }
        queued
    }

    /// Ingests one file; returns the paths newly queued, `None` when the journal cannot be written.
    fn ingest_file(&mut self, journal: &Journal, file: &Path) -> Option<Vec<StorePath>> {
        let meta = match fs::symlink_metadata(file) {
            Ok(m) if self.done.get(file) != Some(&file_id(&m)) => m,
            _ => return Some(Vec::new()),
        };
        let data = match regular(&meta).then(|| fs::read(file)).transpose() {
            Ok(data) => data.unwrap_or_default(),
            Err(e) => {
                (self.notes).push(format!("cannot read spool file {}: {e}", file.display()));
                return Some(Vec::new());
            }
        };
        // Without a line end at the end, the writer is not done (or died).
        let unfinished = regular(&meta) && data.last() != Some(&b'\n');
        if unfinished && !abandoned(&meta) {
            return Some(Vec::new());
        }
        let end = data.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let (mut paths, mut problems) = (Vec::new(), Vec::new());
        for (n, line) in (1..).zip(data[..end].split(|&b| b == b'\n')) {
            match parse_request(line, &self.store_dir) {
                _ if line.is_empty() => {}
                Ok(Request::Enqueue(p)) => paths.extend(p),
                Ok(Request::Drv(d)) => paths.push(d),
                Ok(other) => problems.push(format!("line {n} {other:?} is not a queue request")),
                Err(e) => problems.push(format!("line {n} {e}")),
            }
        }
        if let more @ 1.. = problems.len().saturating_sub(NAMED) {
            problems.truncate(NAMED);
            problems.push(format!("{more} more bad lines"));
        }
        let f = file.display();
        let added = (journal.append(&paths))
            .inspect_err(|e| crate::warning!("cannot journal spool file {f}: {e}; will try again"))
            .ok()?;
        if !regular(&meta) {
            problems.push(format!("is not a regular file of at most {MAX_FILE} bytes"));
        } else if unfinished {
            problems.push("its last line has had no line end for an hour".into());
        }
        if !problems.is_empty() {
            let why = format!("{}; any other lines are queued", problems.join("; "));
            self.set_aside(file, &meta, why, true);
        } else if let Err(e) = fs::remove_file(file) {
            let why = format!("its paths are queued, but it cannot be removed: {e}");
            self.set_aside(file, &meta, why, false);
        }
        Some(added)
    }

    /// Sets a file aside as `.bad`, or else remembers it as done while unchanged; notes why.
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
        assert_eq!(journal.len(), 0);
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
