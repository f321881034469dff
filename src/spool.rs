//! The spool: where the hook leaves its request when the daemon is away.
//!
//! The hook writes the request lines it would have sent to a temporary file
//! and renames it to `<time>-<pid>.req` ([`crate::wire::spool_names`]), so
//! the daemon never sees half a request. The daemon queues every spooled
//! request when it starts and whenever it is idle, and deletes each file
//! only after its paths are in the journal.

use std::fs;
use std::path::{Path, PathBuf};

use crate::journal::Journal;
use crate::protocol::{parse_request, Request, MAX_LINE};
use crate::store_path::StorePath;
use crate::warning;
use crate::wire::SPOOL_SUFFIX;

/// Largest spool file read: far more than any hook writes (one request of at
/// most `MAX_LINE` bytes per 10,000 paths).
const MAX_FILE: u64 = 64 * MAX_LINE as u64;

/// The backlog, for `status`: request files not ingested yet, and the
/// paths they ask for (counted without checking them; a file that cannot
/// be read counts no paths).
pub fn backlog(dir: &Path) -> (usize, usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return (0, 0);
    };
    let (mut files, mut paths) = (0, 0);
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !name.ends_with(SPOOL_SUFFIX) || name.starts_with('.') {
            continue;
        }
        files += 1;
        let file = entry.path();
        match fs::symlink_metadata(&file) {
            Ok(m) if m.is_file() && m.len() <= MAX_FILE => {}
            _ => continue,
        }
        if let Ok(data) = fs::read(&file) {
            paths += data
                .split(|&b| b == b'\n')
                .filter(|l| l.starts_with(b"enqueue ") || l.starts_with(b"drv "))
                .map(|l| l.iter().filter(|&&b| b == b' ').count())
                .sum::<usize>();
        }
    }
    (files, paths)
}

/// Journals every spooled request and deletes its file; returns the paths
/// that were newly queued. Files that cannot be journaled now stay.
pub fn ingest(dir: &Path, store_dir: &str, journal: &Journal) -> Vec<StorePath> {
    let entries: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => return Vec::new(),
    };
    remove_abandoned(&entries);
    let mut names: Vec<PathBuf> = entries
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(SPOOL_SUFFIX) && !n.starts_with('.'))
        })
        .collect();
    names.sort();
    let mut queued = Vec::new();
    for file in names {
        // Only regular files of a plausible size: a link could point the
        // daemon at any file, a huge file would only cost memory.
        match fs::symlink_metadata(&file) {
            Ok(m) if m.is_file() && m.len() <= MAX_FILE => {}
            Ok(m) => {
                warning!(
                    "spool file {} is not a regular file of at most {MAX_FILE} bytes ({} bytes); set aside as .bad",
                    file.display(),
                    m.len()
                );
                let _ = fs::rename(&file, file.with_extension("bad"));
                continue;
            }
            Err(_) => continue,
        }
        let data = match fs::read(&file) {
            Ok(d) => d,
            Err(e) => {
                warning!("cannot read spool file {}: {e}", file.display());
                continue;
            }
        };
        let mut paths = Vec::new();
        for (n, line) in data.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() || line.len() > MAX_LINE {
                continue;
            }
            match parse_request(line, store_dir) {
                Ok(Request::Enqueue(p)) => paths.extend(p),
                Ok(Request::Drv(d)) => paths.push(d),
                Ok(other) => warning!(
                    "spool file {} line {}: {other:?} is not a queue request, ignored",
                    file.display(),
                    n + 1
                ),
                Err(e) => warning!("spool file {} line {}: {e}, ignored", file.display(), n + 1),
            }
        }
        match journal.append(&paths) {
            Ok(added) => {
                queued.extend(added);
                if let Err(e) = fs::remove_file(&file) {
                    warning!("cannot remove spool file {}: {e}", file.display());
                }
            }
            Err(e) => {
                warning!(
                    "cannot journal spool file {}: {e}; will try again",
                    file.display()
                );
                break;
            }
        }
    }
    queued
}

/// Removes temporary files of hooks that were killed between writing and
/// renaming (no hook takes anywhere near this long to write one).
fn remove_abandoned(entries: &[PathBuf]) {
    const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);
    for path in entries {
        let is_tmp = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"));
        let old = fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ABANDONED_AFTER);
        if is_tmp && old {
            let _ = fs::remove_file(path);
        }
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

    #[test]
    fn written_requests_are_ingested_once_and_links_are_set_aside() {
        let spool = dir("ingest");
        let state = dir("ingest-state");
        let good = format!("{S}/{}-a", "0".repeat(32));
        fs::create_dir_all(&spool).unwrap();
        let (_, name) = crate::wire::spool_names(1, 2);
        let request = format!("enqueue {good}\nretry\nenqueue /etc/passwd\n");
        fs::write(spool.join(name), request).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", spool.join("evil.req")).unwrap();
        let (journal, _) = Journal::open(&state, S).unwrap();
        let queued = ingest(&spool, S, &journal);
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].as_str(), good);
        assert!(
            ingest(&spool, S, &journal).is_empty(),
            "files are removed after ingest"
        );
        let left: Vec<_> = fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("evil.bad")]);
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
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        fs::File::options()
            .write(true)
            .open(&old)
            .and_then(|f| f.set_modified(two_hours_ago))
            .unwrap();
        let (journal, _) = Journal::open(&state, S).unwrap();
        assert!(ingest(&spool, S, &journal).is_empty());
        assert!(!old.exists(), "an hour-old temporary file is abandoned");
        assert!(fresh.exists(), "a hook may still be writing a fresh one");
        let _ = fs::remove_dir_all(&spool);
        let _ = fs::remove_dir_all(&state);
    }
}
