//! Writing a spool file: the request lines the daemon did not take, left
//! where it picks them up when it runs again (the daemon's `spool` module
//! reads them).

use alloc::string::String;

use super::sys::{self, Errno};
use super::wire;

/// Writes `request` as a new spool file in `dir`, durably, and returns its
/// path. The file appears complete or not at all: it is written under a
/// temporary name, synced, renamed, and the directory synced.
pub fn write(dir: &str, request: &str) -> Result<String, Errno> {
    sys::create_dir_all(dir)?;
    let (tmp, done) = wire::spool_names(sys::unix_nanos(), sys::pid());
    let (tmp, done) = (wire::join(dir, &tmp), wire::join(dir, &done));
    // Readable by the daemon even when the hook runs as another user (root
    // under nix-daemon); the directory itself guards the contents.
    let file = sys::create_new(&tmp, 0o644)?;
    let written = file
        .write_all(request.as_bytes(), None)
        .and_then(|()| file.sync_data())
        .and_then(|()| sys::rename_file(&tmp, &done));
    drop(file);
    if let Err(e) = written {
        // A full disk, say: leave no half-written file behind.
        let _ = sys::remove_file(&tmp);
        return Err(e);
    }
    sys::open_dir(dir)?.sync_all()?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_request_is_one_complete_file() {
        let base = std::env::temp_dir().join(format!("npbhq-hook-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("missing/parents");
        let dir_s = dir.to_str().unwrap();
        let file = write(dir_s, "enqueue /nix/store/a\nenqueue /nix/store/b\n").unwrap();
        assert!(
            file.starts_with(dir_s) && file.ends_with(wire::SPOOL_SUFFIX),
            "{file}"
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "enqueue /nix/store/a\nenqueue /nix/store/b\n"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
