//! Writing a spool file: the request lines the daemon did not take, left
//! where it picks them up when it runs again (the daemon's `spool` module
//! reads them).

use alloc::string::String;

use crate::sys::{self, Errno};
use crate::wire;

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
