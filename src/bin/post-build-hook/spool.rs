//! Writing a spool file: the request lines the daemon did not take, left
//! where it picks them up when it runs again (the library's `spool` module
//! reads them).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use npbhq::wire;

/// Writes `request` as a new spool file in `dir`, durably, and returns its
/// path. The file appears complete or not at all: it is written under a
/// temporary name, synced, renamed, and the directory synced.
pub fn write(dir: &Path, request: &str) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let (tmp, done) = wire::spool_names(nanos, std::process::id());
    let (tmp, done) = (dir.join(tmp), dir.join(done));
    // Readable by the daemon even when the hook runs as another user (root
    // under nix-daemon); the directory itself guards the contents.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    let written = file
        .write_all(request.as_bytes())
        .and_then(|()| file.sync_data())
        .and_then(|()| fs::rename(&tmp, &done));
    drop(file);
    if let Err(e) = written {
        // A full disk, say: leave no half-written file behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_request_is_one_complete_file() {
        let base = std::env::temp_dir().join(format!("npbhq-hook-spool-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let dir = base.join("missing/parents");
        let file = write(&dir, "enqueue /nix/store/a\nenqueue /nix/store/b\n").unwrap();
        assert_eq!(file.parent(), Some(dir.as_path()));
        assert!(
            file.to_string_lossy().ends_with(wire::SPOOL_SUFFIX),
            "{}",
            file.display()
        );
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
        assert_eq!(
            fs::read_to_string(&file).unwrap(),
            "enqueue /nix/store/a\nenqueue /nix/store/b\n"
        );
        let _ = fs::remove_dir_all(&base);
    }
}
