//! Target network namespaces (DESIGN §3): a request's work runs on an OS thread that entered
//! the target with `setns` once, so netlink sockets, `/proc/thread-self/net/*`, `/proc/sys/net`
//! and every child process (`nft`, `iptables-*`) see that namespace and nothing else.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// Where named namespaces live (`ip netns add NAME`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Errors opening or entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The `--netns` argument is not a valid name.
    #[error("--netns: {0:?} is not a namespace name (no '/', not '.' or '..', at most 255 bytes) or an absolute path")]
    BadName(String),
    /// The namespace file could not be opened.
    #[error("--netns: cannot open {path}: {source}")]
    Open {
        /// What was opened.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// `setns` failed (not a network namespace, or no CAP_SYS_ADMIN).
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        /// The namespace.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: nix::Error,
    },
    /// The worker thread panicked.
    #[error("worker thread in namespace {0} panicked")]
    Panicked(PathBuf),
}

/// Which namespace a command acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// The caller's own network namespace.
    Current,
    /// A name under `/run/netns`.
    Named(String),
    /// An absolute path to a namespace file (e.g. `/proc/PID/ns/net` or a bind mount).
    Path(PathBuf),
}

impl TargetSpec {
    /// Parses a `--netns` value: an absolute path, or a name under `/run/netns`.
    pub fn parse(s: &str) -> Result<TargetSpec, NetnsError> {
        if s.starts_with('/') {
            return Ok(TargetSpec::Path(PathBuf::from(s)));
        }
        if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') || s.len() > 255 {
            return Err(NetnsError::BadName(s.to_string()));
        }
        Ok(TargetSpec::Named(s.to_string()))
    }

    /// The file that holds the namespace.
    pub fn path(&self) -> PathBuf {
        match self {
            TargetSpec::Current => PathBuf::from("/proc/thread-self/ns/net"),
            TargetSpec::Named(n) => Path::new(NETNS_RUN_DIR).join(n),
            TargetSpec::Path(p) => p.clone(),
        }
    }
}

/// An opened network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct Target {
    file: File,
    path: PathBuf,
    /// Device and inode of the namespace: its identity.
    pub id: (u64, u64),
}

impl Target {
    /// Opens the namespace named by `spec`. Nothing is entered yet.
    pub fn open(spec: &TargetSpec) -> Result<Target, NetnsError> {
        let path = spec.path();
        let file = File::open(&path).map_err(|source| NetnsError::Open { path: path.clone(), source })?;
        let md = file.metadata().map_err(|source| NetnsError::Open { path: path.clone(), source })?;
        Ok(Target { file, path, id: (md.dev(), md.ino()) })
    }

    /// Where the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when this is the initial network namespace (that of PID 1): the host.
    pub fn is_initial(&self) -> bool {
        is_initial_id(self.id)
    }

    /// Moves the calling thread into this namespace for good (a target's dedicated worker
    /// thread calls this once, DESIGN §3). Never call it on a thread that serves anything else.
    pub fn enter_current_thread(&self) -> Result<(), NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { path: self.path.clone(), source })
    }

    /// Keeps the namespace reachable after a crash: bind-mounts it onto `dst` (an empty file is
    /// created first). Idempotent for the same `dst`. Undo with [`unpin`].
    pub fn pin(&self, dst: &Path) -> Result<(), NetnsError> {
        let open_err = |source| NetnsError::Open { path: dst.to_path_buf(), source };
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        if std::fs::metadata(dst).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            return Ok(());
        }
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dst).map_err(open_err)?;
        let src = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&self.file)));
        nix::mount::mount(Some(&src), dst, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| open_err(std::io::Error::from(e)))
    }

    /// Runs `f` on a fresh OS thread that entered this namespace first. Everything `f` does —
    /// sockets, `/proc/thread-self/net`, `/proc/sys/net`, spawned processes — happens in the
    /// target. The calling thread's namespace never changes.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter { path: self.path.clone(), source })?;
                Ok(f())
            });
            handle.join().map_err(|_| NetnsError::Panicked(self.path.clone()))?
        })
    }
}

/// Inode the kernel gives the initial network namespace (`PROC_NET_INIT_INO`, fixed).
pub const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// True when the namespace with this (device, inode) is the initial one: compared with PID 1's
/// when `/proc/1/ns/net` can be read, else with the kernel's fixed inode of `init_net` (in some
/// containers PID 1's namespace links are unreadable even to root).
pub fn is_initial_id(id: (u64, u64)) -> bool {
    match std::fs::metadata("/proc/1/ns/net") {
        Ok(m) => (m.dev(), m.ino()) == id,
        Err(_) => id.1 == INIT_NET_INO,
    }
}

/// Removes a pin made by [`Target::pin`]; a missing pin is fine (idempotent).
pub fn unpin(dst: &Path) {
    let _ = nix::mount::umount2(dst, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(TargetSpec::parse("srv-1").is_ok());
        assert!(matches!(TargetSpec::parse("/proc/1/ns/net"), Ok(TargetSpec::Path(_))));
        assert!(TargetSpec::parse("../etc").is_err());
        assert!(TargetSpec::parse("..").is_err());
        assert!(TargetSpec::parse("").is_err());
    }
}
