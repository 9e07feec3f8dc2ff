//! Directories and files that another user cannot plant (DESIGN §2 "Trust"): the state and run
//! dirs must be owned by root, writable by no one else and not symlinks — and so must each
//! parent up to the first root-owned one that others cannot write (a sticky world-writable
//! parent such as `/tmp` is fine: others cannot rename or delete what root made inside it).
//! Files inside are opened without following links and records are read only when root wrote
//! them. Pure checks over `lstat`; nothing is created or changed here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a directory or file is not trusted (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A symlink where a directory is expected.
    #[error("{path} is a symbolic link; ctguard's directories must not be")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Not a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Owned by another user.
    #[error("{path} is owned by uid {uid}; ctguard's directories must be owned by root")]
    NotRootOwned {
        /// The path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// Writable by group or others.
    #[error(
        "{path} is writable by group or others (mode {mode:o}); ctguard's directories must be writable by root alone"
    )]
    Writable {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// `lstat` failed.
    #[error("{path}: {source}{}", root_hint(source))]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

const STICKY: u32 = 0o1000;

fn root_hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::PermissionDenied && !nix::unistd::Uid::effective().is_root() {
        " (run ctguard as root)"
    } else {
        ""
    }
}

/// Checks `dir` (which may not exist yet: then its nearest existing ancestor is checked as the
/// place it will be created in) and its parents: see the module doc. Read-only.
pub fn check_private_dir(dir: &Path) -> Result<(), TrustError> {
    let dir = absolute(dir);
    for p in dir.ancestors() {
        let m = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(TrustError::Io { path: p.to_path_buf(), source }),
        };
        if m.file_type().is_symlink() {
            return Err(TrustError::Symlink { path: p.to_path_buf() });
        }
        if !m.is_dir() {
            return Err(TrustError::NotADirectory { path: p.to_path_buf() });
        }
        let mode = m.mode() & 0o7777;
        let others_write = mode & 0o022 != 0;
        if m.uid() != 0 {
            return Err(TrustError::NotRootOwned { path: p.to_path_buf(), uid: m.uid() });
        }
        // The directory itself: writable by root alone. A parent (or, for a directory still
        // to be created, the one it is created in): sticky world-writable (`/tmp`) is fine.
        if others_write && (p == dir || mode & STICKY == 0) {
            return Err(TrustError::Writable { path: p.to_path_buf(), mode });
        }
        // A root-owned parent that no one else can write ends the walk (or a sticky one).
        if p != dir && (!others_write || mode & STICKY != 0) {
            return Ok(());
        }
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Opens `path` for reading without following a symlink in its last component, and only when
/// it is a regular file owned by root and writable by no one else (a record another user
/// planted is never acted on).
pub fn open_root_file(path: &Path) -> io::Result<File> {
    let f =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK).open(path)?;
    check_root_file(&f.metadata()?)?;
    Ok(f)
}

/// The checks of [`open_root_file`] without opening: `path` itself (never a symlink's target)
/// is a regular file owned by root and writable by no one else. Returns its metadata (size,
/// mtime). One `lstat`; read-only. What is opened later must be checked again with
/// [`open_root_file`].
pub fn stat_root_file(path: &Path) -> io::Result<std::fs::Metadata> {
    let m = std::fs::symlink_metadata(path)?;
    if m.file_type().is_symlink() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a symlink; not followed"));
    }
    check_root_file(&m)?;
    Ok(m)
}

fn check_root_file(m: &std::fs::Metadata) -> io::Result<()> {
    if !m.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
    }
    if m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("owned by uid {} with mode {:o}: not written by root alone; ignored", m.uid(), m.mode() & 0o7777),
        ));
    }
    Ok(())
}

/// Opens (creating with mode 0600 when missing) `path` for appending, never through a
/// symlink.
pub fn open_append_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ctguard-trust-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[test]
    fn root_dirs_pass_and_planted_ones_fail() {
        if !nix::unistd::Uid::effective().is_root() {
            // Ownership checks need files owned by root and by someone else.
            panic!("this test needs root (run the suite as root)");
        }
        let base = tmp("dirs");
        let ok = base.join("state");
        std::fs::create_dir(&ok).expect("mkdir");
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        check_private_dir(&ok).expect("root 0700 under root 0755 under /tmp");
        check_private_dir(&base.join("missing/deeper")).expect("a dir to be created in a trusted place");

        let open = base.join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(check_private_dir(&open), Err(TrustError::Writable { .. })));
        assert!(matches!(check_private_dir(&open.join("state")), Err(TrustError::Writable { .. })));

        let theirs = base.join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        assert!(matches!(check_private_dir(&theirs), Err(TrustError::NotRootOwned { uid: 65534, .. })));
        assert!(matches!(check_private_dir(&theirs.join("x")), Err(TrustError::NotRootOwned { .. })));

        let link = base.join("link");
        std::os::unix::fs::symlink(&ok, &link).expect("symlink");
        assert!(matches!(check_private_dir(&link), Err(TrustError::Symlink { .. })));

        let file = base.join("file");
        std::fs::write(&file, "x").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        open_root_file(&file).expect("root 0600 file");
        assert_eq!(stat_root_file(&file).expect("root 0600 file").len(), 1);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(open_root_file(&file).is_err(), "a world-writable record is not trusted");
        assert!(stat_root_file(&file).is_err(), "a world-writable snapshot is not trusted");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        assert!(open_root_file(&file).is_err(), "a record owned by nobody is not trusted");
        assert!(stat_root_file(&file).is_err(), "a snapshot owned by nobody is not trusted");
        let flink = base.join("flink");
        std::os::unix::fs::symlink("/etc/hostname", &flink).expect("symlink");
        assert!(open_root_file(&flink).is_err(), "a symlinked record is not followed");
        assert!(stat_root_file(&flink).is_err(), "a symlinked snapshot is not followed");
        assert!(stat_root_file(&base).is_err(), "a directory is not a snapshot");
        assert!(open_append_nofollow(&flink).is_err(), "a symlinked log is not followed");
        let _ = std::fs::remove_dir_all(&base);
    }
}
