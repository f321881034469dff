//! The spool: where the hook leaves its request when the daemon is away.
//!
//! The hook writes the request line it would have sent to a temporary file
//! and renames it to `<time>-<pid>.req`, so the daemon never sees half a
//! request. The daemon queues every spooled request when it starts and
//! whenever it is idle, and deletes each file only after its paths are in
//! the journal.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::journal::Journal;
use crate::protocol::{parse_request, Request, MAX_LINE};
use crate::store_path::StorePath;
use crate::warning;

/// Ending of a complete spool file.
const SUFFIX: &str = ".req";

/// Writes `request` (one or more protocol lines) as a new spool file.
pub fn write(dir: &Path, request: &str) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("{nanos:020}-{}", std::process::id());
    let tmp = dir.join(format!(".{name}.tmp"));
    let done = dir.join(format!("{name}{SUFFIX}"));
    // Readable by the daemon even when the hook runs as another user
    // (root under nix-daemon); the directory itself guards the contents.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    let written = f
        .write_all(request.as_bytes())
        .and_then(|()| f.sync_data())
        .and_then(|()| fs::rename(&tmp, &done));
    drop(f);
    if let Err(e) = written {
        // A full disk, say: leave no half-written file behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(dir)?.sync_all()?;
    Ok(done)
}

/// Journals every spooled request and deletes its file; returns the paths
/// that were newly queued. Files that cannot be journaled now stay.
pub fn ingest(dir: &Path, store_dir: &str, journal: &Journal) -> Vec<StorePath> {
    let mut names: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "req"))
            .collect(),
        Err(_) => return Vec::new(),
    };
    names.sort();
    let mut queued = Vec::new();
    for file in names {
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
