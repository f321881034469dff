//! Writes the request lines the daemon did not take as a spool file. The hook
//! runs as root in the daemon's user's directory: no step follows their links.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use npbhq::wire;

/// Linux's `asm/fcntl.h` values differ on these architectures.
const ARM_LIKE: bool = cfg!(any(
    target_arch = "arm",
    target_arch = "aarch64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "m68k"
));
const O_DIRECTORY: i32 = if ARM_LIKE { 0o40000 } else { 0o200000 };
const O_NOFOLLOW: i32 = if ARM_LIKE { 0o100000 } else { 0o400000 };

/// Writes `request` as a new spool file in `dir`, durably and complete or not
/// at all, through the checked directory's handle; returns its path.
pub fn write(dir: &Path, request: &str) -> io::Result<PathBuf> {
    let handle = open_dir(dir)?;
    let at = |name: &str| PathBuf::from(format!("/proc/self/fd/{}/{name}", handle.as_raw_fd()));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let (tmp, done) = wire::spool_names(nanos, std::process::id());
    // Readable by the daemon when the hook runs as root; the directory guards it.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(O_NOFOLLOW)
        .mode(0o644)
        .open(at(&tmp))?;
    let written = file
        .write_all(request.as_bytes())
        .and_then(|()| file.sync_data())
        .and_then(|()| fs::rename(at(&tmp), at(&done)));
    if let Err(e) = written {
        // A full disk, say: leave no half-written file behind.
        let _ = fs::remove_file(at(&tmp));
        return Err(e);
    }
    handle.sync_all()?;
    Ok(dir.join(done))
}

/// Opens `dir`, making what is missing, each component relative to the one
/// before, following a link only out of a directory root alone may write. Each
/// must be root's, ours or (for root) the daemon's, and no one else's to write.
fn open_dir(dir: &Path) -> io::Result<File> {
    let refuse = |why: String| io::Error::new(ErrorKind::PermissionDenied, why);
    let open = |path: &Path, follow: bool| {
        let flags = O_DIRECTORY | if follow { 0 } else { O_NOFOLLOW };
        OpenOptions::new().read(true).custom_flags(flags).open(path)
    };
    let parts = (dir.strip_prefix("/"))
        .map_err(|_| refuse(format!("{} is not an absolute path", dir.display())))?;
    let (mut handle, mut path, mut other) = (open(Path::new("/"), true)?, PathBuf::from("/"), None);
    let (mut roots, me) = (true, npbhq::sys::uid());
    for part in parts.components() {
        let Component::Normal(name) = part else {
            return Err(refuse(format!("{} has a '..'", dir.display())));
        };
        let next = Path::new(&format!("/proc/self/fd/{}", handle.as_raw_fd())).join(name);
        path.push(name);
        let at = path.display();
        match fs::create_dir(&next) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let why = "as a directory, following no link where others may write";
        handle = open(&next, roots).map_err(|e| refuse(format!("cannot open {at} {why}: {e}")))?;
        let meta = handle.metadata()?;
        let (owner, mode) = (meta.uid(), meta.mode());
        if owner != 0 && owner != me && (me != 0 || *other.get_or_insert(owner) != owner) {
            return Err(refuse(format!(
                "{at} belongs to uid {owner}, whom the hook does not trust"
            )));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(refuse(format!("{at} is writable by group or others")));
        }
        roots = owner == 0 && mode & 0o022 == 0;
    }
    Ok(handle)
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

    #[test]
    fn no_link_is_followed_out_of_a_directory_of_another_user() {
        let base = std::env::temp_dir().join(format!("npbhq-hook-link-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (victim, theirs) = (base.join("victim"), base.join("theirs"));
        fs::create_dir_all(&victim).unwrap();
        fs::create_dir_all(&theirs).unwrap();
        std::os::unix::fs::symlink(&victim, theirs.join("spool")).unwrap();
        std::os::unix::fs::symlink(&victim, base.join("roots")).unwrap();
        // A directory of another user (nobody's) holding the link, when the
        // test runs as root; a link of root's (`roots`) is followed.
        if npbhq::sys::uid() == 0 {
            std::os::unix::fs::lchown(&theirs, Some(65534), Some(65534)).unwrap();
            for dir in [theirs.join("spool"), theirs.join("spool/below")] {
                let e = write(&dir, "enqueue /nix/store/a\n").unwrap_err();
                assert!(e.to_string().contains("following no link"), "{e}");
            }
            assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
            assert!(write(&base.join("roots"), "enqueue /nix/store/a\n").is_ok());
            assert_eq!(fs::read_dir(&victim).unwrap().count(), 1);
        }
        fs::create_dir(base.join("open")).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o777);
        fs::set_permissions(base.join("open"), mode).unwrap();
        let e = write(&base.join("open"), "enqueue /nix/store/a\n").unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        assert!(write(&PathBuf::from("relative"), "x\n").is_err());
        assert_eq!(fs::read_dir(base.join("open")).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&base);
    }
}
