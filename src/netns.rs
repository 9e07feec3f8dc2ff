//! Target network namespaces (DESIGN §3): a request's work runs on an OS thread that entered
//! the target with `setns` once, so netlink sockets, `/proc/thread-self/net/*`, `/proc/sys/net`
//! and every child process (`nft`, `iptables-*`) see that namespace and nothing else.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
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
    /// The path names something else than a network namespace (a FIFO, a regular file, a
    /// directory, another kind of namespace). Nothing was entered, pinned or created.
    #[error("--netns {}: not a network namespace ({what})", path.display())]
    NotNetns {
        /// What was given.
        path: PathBuf,
        /// What it is instead, in words: `"a fifo"`, `"a directory"`, `"a mount namespace"`.
        what: String,
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
    /// Opens the namespace named by `spec` and checks that it is a network namespace (see
    /// [`open_netns_file`]): never blocks (a FIFO is refused at once), creates nothing, and
    /// refuses anything else with [`NetnsError::NotNetns`]. Nothing is entered yet.
    pub fn open(spec: &TargetSpec) -> Result<Target, NetnsError> {
        let path = spec.path();
        let file = open_netns_file(&path)?;
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
    /// created first, without following links). Idempotent for the same `dst`. On failure
    /// nothing is left behind: a file this call created is removed. Undo with [`unpin`].
    pub fn pin(&self, dst: &Path) -> Result<(), NetnsError> {
        let open_err = |source| NetnsError::Open { path: dst.to_path_buf(), source };
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        // lstat sees a mount on `dst` (it follows mounts, not links).
        if std::fs::symlink_metadata(dst).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            return Ok(());
        }
        let created = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dst)
        {
            Ok(_) => true,
            // A leftover empty file (a crash between create and mount) is reused; anything
            // else (a link, a directory, a file with content) is not ours to mount over.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let md = std::fs::symlink_metadata(dst).map_err(open_err)?;
                if !md.file_type().is_file() || md.len() != 0 {
                    return Err(open_err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("already exists and is {}", describe_file_type(md.file_type())),
                    )));
                }
                false
            }
            Err(e) => return Err(open_err(e)),
        };
        let src = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
        let mounted = nix::mount::mount(Some(&src), dst, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>);
        if let Err(e) = mounted {
            if created {
                let _ = std::fs::remove_file(dst);
            }
            return Err(open_err(std::io::Error::from(e)));
        }
        Ok(())
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

/// `NSFS_MAGIC` (linux/magic.h): the file system of namespace files.
pub const NSFS_MAGIC: i64 = 0x6e73_6673;

/// `NS_GET_NSTYPE` (linux/nsfs.h): `_IO(0xb7, 0x3)`, the `CLONE_NEW*` type of a namespace file.
const NS_GET_NSTYPE: u32 = 0xb703;

/// What kind of file a path names, in words for an error message (`"a fifo"`).
pub fn describe_file_type(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_fifo() {
        "a fifo"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "an unknown kind of file"
    }
}

fn namespace_kind(nstype: i32) -> &'static str {
    match nstype {
        libc::CLONE_NEWNET => "a network namespace",
        libc::CLONE_NEWNS => "a mount namespace",
        libc::CLONE_NEWPID => "a pid namespace",
        libc::CLONE_NEWUSER => "a user namespace",
        libc::CLONE_NEWUTS => "a uts namespace",
        libc::CLONE_NEWIPC => "an ipc namespace",
        libc::CLONE_NEWCGROUP => "a cgroup namespace",
        libc::CLONE_NEWTIME => "a time namespace",
        _ => "another kind of namespace",
    }
}

/// Opens `path` as a network namespace file, or says what it is instead. Never blocks and
/// never creates anything: anything that is not a regular file by `stat` (namespace files are)
/// is refused before it is opened (opening a device can have effects); the open is
/// `O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY` (a FIFO swapped in meanwhile opens at once);
/// then the opened file must be on nsfs (`fstatfs`) and of type `CLONE_NEWNET`
/// (`NS_GET_NSTYPE`).
pub fn open_netns_file(path: &Path) -> Result<File, NetnsError> {
    let not = |what: &str| NetnsError::NotNetns { path: path.to_path_buf(), what: what.to_string() };
    let open_err = |source| NetnsError::Open { path: path.to_path_buf(), source };
    let md = std::fs::metadata(path).map_err(open_err)?;
    if !md.file_type().is_file() {
        return Err(not(describe_file_type(md.file_type())));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => not("a socket"),
            _ => open_err(e),
        })?;
    check_netns_file(&file, path)?;
    Ok(file)
}

/// Checks that an opened file is a network namespace (see [`open_netns_file`]).
pub fn check_netns_file(file: &File, path: &Path) -> Result<(), NetnsError> {
    let not = |what: &str| NetnsError::NotNetns { path: path.to_path_buf(), what: what.to_string() };
    let open_err = |source| NetnsError::Open { path: path.to_path_buf(), source };
    let md = file.metadata().map_err(open_err)?;
    if !md.file_type().is_file() {
        return Err(not(describe_file_type(md.file_type())));
    }
    // SAFETY: statfs is plain old data; fstatfs fills it for a descriptor we hold.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a statfs of the right size.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut sfs) } < 0 {
        return Err(open_err(std::io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)]
    if sfs.f_type as i64 != NSFS_MAGIC {
        return Err(not("a regular file"));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor's namespace.
    let t = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if t < 0 {
        let e = std::io::Error::last_os_error();
        // Kernels before 4.11 lack the ioctl: nsfs is all that can be checked (setns with
        // CLONE_NEWNET refuses another type later).
        if e.raw_os_error() == Some(libc::ENOTTY) {
            return Ok(());
        }
        return Err(open_err(e));
    }
    if t != libc::CLONE_NEWNET {
        return Err(not(namespace_kind(t)));
    }
    Ok(())
}

/// The name under `/run/netns` whose namespace is `id` (device, inode), if any.
pub fn named_netns_of(id: (u64, u64)) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_RUN_DIR)
        .ok()?
        .flatten()
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| (m.dev(), m.ino()) == id))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Follows what depends on the resolving process in `path`: `/proc/self`, `/proc/thread-self`
/// and symbolic links in the directories (canonicalized), and a final symbolic link whose
/// target is an ordinary path (a namespace's own magic link, `net:[…]`, is kept).
fn resolver_independent_path(path: &Path) -> Option<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        let dir = std::fs::canonicalize(p.parent()?).ok()?;
        let here = dir.join(p.file_name()?);
        match std::fs::read_link(&here) {
            Ok(t) => {
                let next = dir.join(t);
                if std::fs::symlink_metadata(&next).is_err() {
                    return Some(here);
                }
                p = next;
            }
            Err(_) => return Some(here),
        }
    }
    None
}

/// Resolves a `--netns` value in the calling process, for a request that another process
/// (the agent) opens by path. The namespace is opened and checked here ([`Target::open`]), so
/// anything that is not a network namespace is refused before any request is made. A path
/// whose meaning depends on who resolves it (`/proc/self/ns/net`, `/proc/thread-self/…`, a
/// link leading there) is replaced by one that names the same namespace from any process:
/// its name under `/run/netns` when it has one, `/proc/1/ns/net` for the host's, else the path
/// through this process's pid (valid while this process waits for the answer). Names and
/// other paths are returned as given.
pub fn resolve_for_agent(arg: &str) -> Result<String, NetnsError> {
    let spec = TargetSpec::parse(arg)?;
    let target = Target::open(&spec)?;
    let TargetSpec::Path(given) = &spec else { return Ok(arg.to_string()) };
    let stable = resolver_independent_path(given).unwrap_or_else(|| given.clone());
    let in_proc = |p: &Path| p.starts_with("/proc/self") || p.starts_with("/proc/thread-self");
    if stable == *given && !in_proc(given) {
        return Ok(arg.to_string());
    }
    if let Some(name) = named_netns_of(target.id) {
        return Ok(name);
    }
    if std::fs::metadata("/proc/1/ns/net").is_ok_and(|m| (m.dev(), m.ino()) == target.id) {
        return Ok("/proc/1/ns/net".to_string());
    }
    // The same namespace through the rewritten path, or refuse (never hand over another one).
    let again = Target::open(&TargetSpec::Path(stable.clone()))?;
    if again.id != target.id || in_proc(&stable) {
        return Err(NetnsError::NotNetns {
            path: given.clone(),
            what: "a path this process cannot hand over to the agent".to_string(),
        });
    }
    stable.into_os_string().into_string().map_err(|p| NetnsError::BadName(p.to_string_lossy().into_owned()))
}

/// Inode the kernel gives the initial network namespace (`PROC_NET_INIT_INO`, fixed).
pub const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// The calling thread's network namespace as (device, inode) of `/proc/thread-self/ns/net`:
/// the same id as [`Target`]'s. `None` when it cannot be read. Read-only.
pub fn current_id() -> Option<(u64, u64)> {
    let m = std::fs::metadata("/proc/thread-self/ns/net").ok()?;
    Some((m.dev(), m.ino()))
}

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

    fn not_netns(path: &Path) -> String {
        match Target::open(&TargetSpec::Path(path.to_path_buf())) {
            Err(e @ NetnsError::NotNetns { .. }) => e.to_string(),
            Err(e) => panic!("{}: expected NotNetns, got {e}", path.display()),
            Ok(t) => panic!("{}: opened as a network namespace {:?}", path.display(), t.id),
        }
    }

    #[test]
    fn only_network_namespaces_open() {
        let dir = std::env::temp_dir().join(format!("ctguard-netns-types-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("file");
        std::fs::write(&file, b"").expect("file");
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let t0 = std::time::Instant::now();
        let cases: [(&Path, &str); 5] = [
            (&file, "not a network namespace (a regular file)"),
            (&dir, "not a network namespace (a directory)"),
            (&fifo, "not a network namespace (a fifo)"),
            (Path::new("/proc/self/ns/mnt"), "not a network namespace (a mount namespace)"),
            (Path::new("/dev/null"), "not a network namespace (a character device)"),
        ];
        for (p, want) in cases {
            let msg = not_netns(p);
            assert_eq!(msg, format!("--netns {}: {want}", p.display()));
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(1), "took {:?}", t0.elapsed());
        // Nothing was created next to them.
        let mut names: Vec<_> = std::fs::read_dir(&dir).expect("ls").flatten().map(|e| e.file_name()).collect();
        names.sort();
        assert_eq!(names, ["fifo", "file"]);
        let own = Target::open(&TargetSpec::Path("/proc/self/ns/net".into())).expect("own netns");
        let md = std::fs::metadata("/proc/thread-self/ns/net").expect("stat");
        assert_eq!(own.id, (md.dev(), md.ino()));
        assert!(Target::open(&TargetSpec::Current).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pin_leaves_nothing_when_the_mount_fails() {
        let dir = std::env::temp_dir().join(format!("ctguard-netns-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let own = Target::open(&TargetSpec::Current).expect("own netns");
        // A pin whose parent is a file cannot be made; one inside a directory where the bind
        // mount is refused (a symlink in place of the pin) is refused and left as it was.
        std::fs::create_dir_all(&dir).expect("dir");
        let link = dir.join("link");
        std::os::unix::fs::symlink("/etc/passwd", &link).expect("symlink");
        assert!(own.pin(&link).is_err());
        assert!(std::fs::symlink_metadata(&link).expect("link kept").file_type().is_symlink());
        let mut names: Vec<_> = std::fs::read_dir(&dir).expect("ls").flatten().map(|e| e.file_name()).collect();
        names.sort();
        assert_eq!(names, ["link"]);
        // A bind mount that fails after the pin file was created (a directory onto a file, as
        // a `--netns DIR` once did) removes the file it created.
        let not_ns = Target { file: File::open(&dir).expect("open dir"), path: dir.clone(), id: (0, 0) };
        let pin = dir.join("ns").join("TXID");
        assert!(not_ns.pin(&pin).is_err());
        assert!(std::fs::symlink_metadata(&pin).is_err(), "a stray pin file was left");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn proc_self_is_rewritten_for_the_agent() {
        let pid = std::process::id();
        let r = resolve_for_agent("/proc/self/ns/net").expect("resolve");
        // A name under /run/netns, the host's /proc/1 path, or this process's own path.
        let ok = !r.starts_with('/') || r == "/proc/1/ns/net" || r == format!("/proc/{pid}/ns/net");
        assert!(ok, "{r}");
        let own = std::fs::metadata("/proc/self/ns/net").expect("stat");
        let spec = TargetSpec::parse(&r).expect("parse");
        let t = Target::open(&spec).expect("open the rewritten one");
        assert_eq!(t.id, (own.dev(), own.ino()));
        // Paths that mean the same from anywhere are handed over as given.
        let by_pid = format!("/proc/{pid}/ns/net");
        assert_eq!(resolve_for_agent(&by_pid).expect("by pid"), by_pid);
        assert!(matches!(resolve_for_agent("/etc/passwd"), Err(NetnsError::NotNetns { .. })));
        assert!(matches!(resolve_for_agent("../x"), Err(NetnsError::BadName(_))));
    }
}
