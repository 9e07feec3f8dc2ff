//! Crash-safe storage of [`TxnRecord`]s (DESIGN §2 "Journal"), plus the clocks and boot id the
//! state machine in [`crate::txn`] takes as arguments.
//!
//! Layout of `$STATE_DIR` (default `/var/lib/ctguard`):
//!
//! ```text
//! lock                     flock(2) target of Journal::lock / try_lock (holder pid inside)
//! txn/ID.json              one record per transaction, replaced atomically
//! txn/.ID.json.tmp         a write in progress (or interrupted by a crash: ignored, removed
//!                          by `scan` once older than STALE_TMP_AGE)
//! txn/.ID.reserve          disk set aside for the later records of an unfinished transaction
//!                          (given back when a write meets a full disk)
//! ```
//!
//! Side effects: files only (and reading `/proc` and the clocks in the free functions).
//! Writers of one record must be serialized by the caller (the agent owns the records; take
//! [`Journal::lock`] around read-modify-write sequences shared with other processes).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::time::{clock_gettime, ClockId};

use crate::txn::{TxnError, TxnId, TxnRecord};

/// Finished records kept by [`Journal::prune`] by default.
pub const DEFAULT_KEEP: usize = 200;

/// Free space [`Journal::open`] requires in the state dir.
pub const MIN_FREE_BYTES: u64 = 1024 * 1024;

/// Where the boot id comes from.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// **Test-only**: names a file read instead of [`BOOT_ID_PATH`] by [`boot_id`]. Changing its
/// content between agent runs is how the tests simulate a reboot. Never set it in production.
pub const BOOT_ID_FILE_ENV: &str = "CTGUARD_BOOT_ID_FILE";

/// A `.ID.json.tmp` file older than this is a crash leftover, not a write in progress.
pub const STALE_TMP_AGE: Duration = Duration::from_secs(600);

/// Errors of the journal. Those from [`Journal::open`] mean "failed precondition, nothing
/// changed" (exit 2); [`JournalError::Busy`] means "lock held" (exit 4); [`JournalError::NotFound`]
/// means "unknown id" (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The state dir (or `txn/`) could not be examined.
    #[error("state dir {path}: cannot access it: {source}")]
    Access {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state dir (or `txn/`) did not exist and could not be created.
    #[error("state dir {path}: cannot create it: {source}")]
    CreateDir {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path exists but is not a directory.
    #[error("state dir {path} is not a directory")]
    NotADirectory {
        /// Path.
        path: PathBuf,
    },
    /// A probe file could not be created, written or removed.
    #[error("state dir {path} is not writable: {source}")]
    NotWritable {
        /// Directory probed.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// statvfs failed.
    #[error("state dir {path}: cannot read free space: {source}")]
    Statvfs {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: Errno,
    },
    /// Too little room for the journal.
    #[error("state dir {path} has {free} bytes free; ctguard needs at least {need}")]
    NoSpace {
        /// Path.
        path: PathBuf,
        /// Bytes available to unprivileged users.
        free: u64,
        /// Bytes required.
        need: u64,
    },
    /// The record could not be serialized.
    #[error("cannot encode transaction {id}: {source}")]
    Encode {
        /// Transaction.
        id: String,
        /// Why.
        #[source]
        source: TxnError,
    },
    /// A step of the crash-safe write failed; the previous version of the record is intact
    /// (unless the failed step is the final directory fsync: then either version may survive
    /// a crash).
    #[error("cannot write {path} ({step}): {source}")]
    Write {
        /// File or directory.
        path: PathBuf,
        /// `"create"`, `"write"`, `"fsync"`, `"rename"` or `"fsync directory"`.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No record with this id.
    #[error("no transaction {id} in {dir}")]
    NotFound {
        /// Requested id.
        id: String,
        /// Directory searched.
        dir: PathBuf,
    },
    /// A record file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A record file is not a valid record (or not of this version, or a badly named file).
    #[error("{path} is not a usable transaction record: {source}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: TxnError,
    },
    /// A record file holds another id than its name says.
    #[error("{path} holds transaction {found}, not {expected}")]
    WrongId {
        /// File.
        path: PathBuf,
        /// Id from the file name.
        expected: String,
        /// Id inside.
        found: String,
    },
    /// The record directory could not be listed.
    #[error("cannot list {path}: {source}")]
    ReadDir {
        /// Directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A record could not be deleted.
    #[error("cannot remove {path}: {source}")]
    Remove {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// Lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// [`Journal::try_lock`]: another process (or another open of the lock file) holds it.
    #[error("{path} is locked by another ctguard process{}", holder_text(*.holder))]
    Busy {
        /// Lock file.
        path: PathBuf,
        /// Pid written by the holder, when readable.
        holder: Option<i32>,
    },
    /// The state dir (or a parent) could be planted by another user (DESIGN §2 "Trust").
    #[error(transparent)]
    Untrusted(#[from] crate::trust::TrustError),
    /// No random bytes for a fresh id.
    #[error("cannot get random bytes for a transaction id: {source}")]
    Random {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Every candidate id already existed (practically impossible).
    #[error("no unused transaction id found in {dir}")]
    IdsExhausted {
        /// Record directory.
        dir: PathBuf,
    },
}

fn holder_text(holder: Option<i32>) -> String {
    holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

/// Records read by [`Journal::scan`], and the files that could not be used.
#[derive(Debug, Default)]
pub struct Scan {
    /// Readable records, in order of creation (`created_wall`, `created_ns`), then id.
    pub records: Vec<TxnRecord>,
    /// Files skipped, each with why (unreadable, corrupt, other version, badly named).
    pub skipped: Vec<JournalError>,
}

/// An opened journal. Cheap to clone; holds no file descriptors.
#[derive(Debug, Clone)]
pub struct Journal {
    state_dir: PathBuf,
    txn_dir: PathBuf,
}

/// An exclusive `flock` on `$STATE_DIR/lock`, released when dropped (or when the process dies:
/// a crash never leaves it held). Per open file description: a second lock attempt through
/// another open of the file, even in this process, is refused. The descriptor is close-on-exec,
/// so children started with exec do not inherit it.
#[derive(Debug)]
pub struct JournalLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl JournalLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Journal {
    /// Opens (creating with mode 0700 where missing) `state_dir` and `state_dir/txn`, then
    /// checks the preconditions of DESIGN §1 with [`Journal::check_room`]. Existing
    /// directories keep their mode. Errors name the path and the reason; apart from creating
    /// the directories, nothing is changed. Idempotent.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let txn_dir = state_dir.join("txn");
        trusted(state_dir)?;
        ensure_dir(state_dir)?;
        ensure_dir(&txn_dir)?;
        trusted(&txn_dir)?;
        let journal = Journal { state_dir: state_dir.to_path_buf(), txn_dir };
        journal.check_room()?;
        Ok(journal)
    }

    /// A handle on `state_dir` without creating anything or checking room: for read-only verbs
    /// (`history`, `show`, `status`) and for recovery, which must still roll back when the disk
    /// is full or read-only (its journal writes may then fail; the rollback should not wait for
    /// them). A missing `txn/` reads as an empty journal. Refuses only a `state_dir` that
    /// exists and is not a directory. No side effects.
    pub fn attach(state_dir: &Path) -> Result<Journal, JournalError> {
        trusted(state_dir)?;
        trusted(&state_dir.join("txn"))?;
        match fs::metadata(state_dir) {
            Ok(m) if !m.is_dir() => return Err(JournalError::NotADirectory { path: state_dir.to_path_buf() }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(JournalError::Access { path: state_dir.to_path_buf(), source }),
        }
        Ok(Journal { state_dir: state_dir.to_path_buf(), txn_dir: state_dir.join("txn") })
    }

    /// The apply precondition of DESIGN §1, re-checkable at any time (a long-running agent
    /// checks it per apply, not only at start): `state_dir` and `txn/` writable (a probe file
    /// is created, written and removed) and at least [`MIN_FREE_BYTES`] available. Errors name
    /// the path and the reason. No lasting side effects.
    pub fn check_room(&self) -> Result<(), JournalError> {
        probe_writable(&self.state_dir)?;
        probe_writable(&self.txn_dir)?;
        check_space(&self.txn_dir)
    }

    /// The state dir.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The directory of the record files (`state_dir/txn`).
    pub fn txn_dir(&self) -> &Path {
        &self.txn_dir
    }

    /// Path of the record file of `id` (whether or not it exists).
    pub fn record_path(&self, id: &TxnId) -> PathBuf {
        self.txn_dir.join(format!("{id}.json"))
    }

    fn tmp_path(&self, id: &TxnId) -> PathBuf {
        self.txn_dir.join(format!(".{id}.json.tmp"))
    }

    /// Stores `rec` crash-safely: serialize, write `txn/.ID.json.tmp`, fsync it, rename it over
    /// `txn/ID.json`, fsync the directory. After `Ok`, the new version survives a crash or
    /// power loss; until then, the previous version (or none) does — never a torn file. On
    /// `Err` the caller must not perform the effect this step journals. Idempotent (writing
    /// the same record twice leaves the same file). Concurrent writers of the same id must be
    /// serialized by the caller.
    pub fn write(&self, rec: &TxnRecord) -> Result<(), JournalError> {
        let bytes = rec.to_json().map_err(|source| JournalError::Encode { id: rec.id.to_string(), source })?;
        match self.write_bytes(rec, &bytes) {
            // A full disk and a final record (committed, rolled back): give the record's
            // reserve back and try once more (DESIGN §2: a failed apply must still reach a
            // terminal state in the journal). Intermediate records do not use the reserve.
            Err(JournalError::Write { source, .. })
                if is_no_space(&source) && rec.state.is_finished() && self.release_reserve(&rec.id) =>
            {
                tracing::warn!(txid = rec.id.as_str(), "state dir full: writing the record into its reserve");
                self.write_bytes(rec, &bytes)
            }
            other => other,
        }
    }

    fn write_bytes(&self, rec: &TxnRecord, bytes: &[u8]) -> Result<(), JournalError> {
        let tmp = self.tmp_path(&rec.id);
        let dest = self.record_path(&rec.id);
        let step = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Write { path, step, source }
        };
        let replaced = (|| {
            // A leftover (or planted) temp file is removed, never written through.
            let _ = fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)
                .map_err(step("create", &tmp))?;
            f.write_all(bytes).map_err(step("write", &tmp))?;
            f.sync_all().map_err(step("fsync", &tmp))?;
            drop(f);
            fs::rename(&tmp, &dest).map_err(step("rename", &dest))
        })();
        if replaced.is_err() {
            // Best effort: a leftover would be ignored anyway and removed once stale.
            let _ = fs::remove_file(&tmp);
        }
        replaced?;
        fsync_dir(&self.txn_dir).map_err(step("fsync directory", &self.txn_dir))
    }

    fn reserve_path(&self, id: &TxnId) -> PathBuf {
        self.txn_dir.join(format!(".{id}.reserve"))
    }

    /// Sets `bytes` of disk aside for the final record of `id` (fallocate'd, so a full disk
    /// cannot take them): [`Journal::write`] of a finished record gives them back and retries
    /// when it meets ENOSPC.
    /// Crash-safe (a leftover reserve is only space; [`Journal::prune_reserves`] removes it).
    pub fn reserve(&self, id: &TxnId, bytes: u64) -> Result<(), JournalError> {
        let path = self.reserve_path(id);
        let err = |source| JournalError::Write { path: path.clone(), step: "reserve", source };
        let _ = fs::remove_file(&path);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(err)?;
        let len = libc::off_t::try_from(bytes.max(1)).unwrap_or(libc::off_t::MAX);
        // SAFETY: fallocate on a descriptor we own.
        let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, len) };
        if r != 0 {
            let e = io::Error::last_os_error();
            drop(f);
            let _ = fs::remove_file(&path);
            return Err(err(e));
        }
        f.sync_all().map_err(err)?;
        fsync_dir(&self.txn_dir).map_err(err)
    }

    /// Removes the reserve of `id`; true when there was one. Idempotent.
    pub fn release_reserve(&self, id: &TxnId) -> bool {
        let removed = fs::remove_file(self.reserve_path(id)).is_ok();
        if removed {
            let _ = fsync_dir(&self.txn_dir);
        }
        removed
    }

    /// Removes every reserve whose transaction is not in `keep` (crash leftovers). Returns how
    /// many were removed. Idempotent.
    pub fn prune_reserves(&self, keep: &[TxnId]) -> usize {
        let Ok(entries) = fs::read_dir(&self.txn_dir) else { return 0 };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_prefix('.').and_then(|s| s.strip_suffix(".reserve")) else { continue };
            if !keep.iter().any(|k| k.as_str() == id) && fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Reads the record of `id`. Unknown id → [`JournalError::NotFound`]; a file that does not
    /// parse, is of another version, or holds another id → an error naming the file.
    /// Read-only.
    pub fn load(&self, id: &TxnId) -> Result<TxnRecord, JournalError> {
        let path = self.record_path(id);
        match read_trusted(&path) {
            Ok(bytes) => parse_record(&path, &bytes, id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(JournalError::NotFound { id: id.to_string(), dir: self.txn_dir.clone() })
            }
            Err(source) => Err(JournalError::Read { path, source }),
        }
    }

    /// Reads every record, in order of creation then id, and reports the files it skipped
    /// (never fails because of one bad file). Write-in-progress files are ignored; those older
    /// than [`STALE_TMP_AGE`] are crash leftovers and are removed (best effort).
    pub fn scan(&self) -> Result<Scan, JournalError> {
        let mut scan = Scan::default();
        let entries = match fs::read_dir(&self.txn_dir) {
            Ok(entries) => entries,
            // Only possible through `attach`: nothing journaled yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scan),
            Err(source) => return Err(JournalError::ReadDir { path: self.txn_dir.clone(), source }),
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(source) => {
                    scan.skipped.push(JournalError::ReadDir { path: self.txn_dir.clone(), source });
                    continue;
                }
            };
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            if name.starts_with('.') {
                if name.ends_with(".json.tmp") {
                    remove_if_stale(&path);
                }
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else { continue };
            let id = match TxnId::parse(stem) {
                Ok(id) if id.as_str() == stem => id,
                Ok(_) => {
                    let source =
                        TxnError::BadId { id: stem.to_string(), reason: "record file names use lower-case hex" };
                    scan.skipped.push(JournalError::Corrupt { path, source });
                    continue;
                }
                Err(source) => {
                    scan.skipped.push(JournalError::Corrupt { path, source });
                    continue;
                }
            };
            match read_trusted(&path) {
                Ok(bytes) => match parse_record(&path, &bytes, &id) {
                    Ok(rec) => scan.records.push(rec),
                    Err(e) => scan.skipped.push(e),
                },
                // Removed meanwhile (prune in another process): not an error.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => scan.skipped.push(JournalError::Read { path, source }),
            }
        }
        scan.records.sort_by(|a, b| {
            (a.created_wall, a.created_ns).cmp(&(b.created_wall, b.created_ns)).then_with(|| a.id.cmp(&b.id))
        });
        Ok(scan)
    }

    /// [`Journal::scan`], logging each skipped file with `tracing::warn!`. Read-only apart from
    /// removing stale temp files.
    pub fn list(&self) -> Result<Vec<TxnRecord>, JournalError> {
        let scan = self.scan()?;
        for e in &scan.skipped {
            tracing::warn!(error = %e, "skipping a journal file");
        }
        Ok(scan.records)
    }

    /// Records not finished (PREPARED, PENDING, ROLLBACK_FAILED) — the work recovery must do —
    /// in [`Journal::list`] order.
    pub fn unfinished(&self) -> Result<Vec<TxnRecord>, JournalError> {
        Ok(self.list()?.into_iter().filter(|r| !r.state.is_finished()).collect())
    }

    /// The unfinished transaction on the target namespace `(dev, ino)`, if any. Any unfinished
    /// state counts — PREPARED (an apply in progress) and ROLLBACK_FAILED (state unknown) block
    /// a new apply as PENDING does (DESIGN §1: one pending transaction per target). Should
    /// several exist (a bug), the oldest is returned and the rest are logged.
    pub fn pending_for(&self, dev: u64, ino: u64) -> Result<Option<TxnRecord>, JournalError> {
        let mut found = self.unfinished()?.into_iter().filter(|r| r.target.dev == dev && r.target.ino == ino);
        let first = found.next();
        for extra in found {
            tracing::warn!(id = %extra.id, "more than one unfinished transaction on one target");
        }
        Ok(first)
    }

    /// Bounded history: deletes the oldest finished records beyond the newest `keep` finished
    /// ones (see [`DEFAULT_KEEP`]); never an unfinished record, never a file it cannot read.
    /// Returns how many were deleted. Idempotent. Run it under [`Journal::lock`] when other
    /// processes may write.
    pub fn prune(&self, keep: usize) -> Result<usize, JournalError> {
        let finished: Vec<TxnRecord> = self.list()?.into_iter().filter(|r| r.state.is_finished()).collect();
        let excess = finished.len().saturating_sub(keep);
        let mut removed = 0;
        for rec in finished.iter().take(excess) {
            let path = self.record_path(&rec.id);
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(JournalError::Remove { path, source }),
            }
        }
        if removed > 0 {
            fsync_dir(&self.txn_dir).map_err(|source| JournalError::Write {
                path: self.txn_dir.clone(),
                step: "fsync directory",
                source,
            })?;
        }
        Ok(removed)
    }

    /// A transaction id for a transaction created at `wall_unix`, with a random suffix from
    /// getrandom(2), not used by any record in this journal. Unique only while the caller holds
    /// [`Journal::lock`] until the record is written.
    pub fn fresh_id(&self, wall_unix: u64) -> Result<TxnId, JournalError> {
        for _ in 0..64 {
            let id = TxnId::generate(wall_unix, random_u32().map_err(|source| JournalError::Random { source })?);
            if !self.record_path(&id).exists() && !self.tmp_path(&id).exists() {
                return Ok(id);
            }
        }
        Err(JournalError::IdsExhausted { dir: self.txn_dir.clone() })
    }

    fn lock_path(&self) -> PathBuf {
        self.state_dir.join("lock")
    }

    /// Takes the exclusive state-dir lock, waiting for it. Released on drop or process death.
    pub fn lock(&self) -> Result<JournalLock, JournalError> {
        self.lock_with(FlockArg::LockExclusive)
    }

    /// Takes the exclusive state-dir lock or fails at once with [`JournalError::Busy`] (naming
    /// the holder's pid when it wrote one). Callers map `Busy` to exit 4.
    pub fn try_lock(&self) -> Result<JournalLock, JournalError> {
        self.lock_with(FlockArg::LockExclusiveNonblock)
    }

    fn lock_with(&self, arg: FlockArg) -> Result<JournalLock, JournalError> {
        let path = self.lock_path();
        let lock_err = |source: io::Error| JournalError::Lock { path: path.clone(), source };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(lock_err)?;
        let lock = loop {
            match Flock::lock(file, arg) {
                Ok(lock) => break lock,
                Err((f, Errno::EINTR)) => file = f,
                Err((mut f, Errno::EAGAIN)) => {
                    let mut s = String::new();
                    let holder = f.read_to_string(&mut s).ok().and_then(|_| s.trim().parse().ok());
                    return Err(JournalError::Busy { path, holder });
                }
                Err((_, errno)) => return Err(lock_err(io::Error::from(errno))),
            }
        };
        // Diagnostics only: who holds it. Failure to record it changes nothing.
        let pid = format!("{}\n", std::process::id());
        if lock.set_len(0).is_ok() {
            let _ = lock.write_all_at(pid.as_bytes(), 0);
        }
        Ok(JournalLock { _lock: lock, path })
    }
}

/// A record's bytes, read only when root alone wrote it and never through a symlink.
fn read_trusted(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = crate::trust::open_root_file(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

fn parse_record(path: &Path, bytes: &[u8], id: &TxnId) -> Result<TxnRecord, JournalError> {
    let rec =
        TxnRecord::from_json(bytes).map_err(|source| JournalError::Corrupt { path: path.to_path_buf(), source })?;
    if rec.id != *id {
        return Err(JournalError::WrongId {
            path: path.to_path_buf(),
            expected: id.to_string(),
            found: rec.id.to_string(),
        });
    }
    Ok(rec)
}

/// [`crate::trust::check_private_dir`], with "not a directory" reported as such.
fn trusted(dir: &Path) -> Result<(), JournalError> {
    crate::trust::check_private_dir(dir).map_err(|e| match e {
        crate::trust::TrustError::NotADirectory { path } => JournalError::NotADirectory { path },
        e => JournalError::Untrusted(e),
    })
}

fn ensure_dir(path: &Path) -> Result<(), JournalError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(JournalError::NotADirectory { path: path.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|source| JournalError::CreateDir { path: path.to_path_buf(), source }),
        Err(source) => Err(JournalError::Access { path: path.to_path_buf(), source }),
    }
}

fn probe_writable(dir: &Path) -> Result<(), JournalError> {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let err = |source| JournalError::NotWritable { path: dir.to_path_buf(), source };
    let _ = fs::remove_file(&probe);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"x"));
    let removed = fs::remove_file(&probe);
    written.map_err(err)?;
    removed.map_err(err)
}

fn check_space(dir: &Path) -> Result<(), JournalError> {
    let st =
        nix::sys::statvfs::statvfs(dir).map_err(|source| JournalError::Statvfs { path: dir.to_path_buf(), source })?;
    #[allow(clippy::useless_conversion)] // the widths differ between targets
    let free = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
    if free < MIN_FREE_BYTES {
        return Err(JournalError::NoSpace { path: dir.to_path_buf(), free, need: MIN_FREE_BYTES });
    }
    Ok(())
}

/// ENOSPC or EDQUOT: the disk (or the quota) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_if_stale(path: &Path) {
    let age = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|mtime| SystemTime::now().duration_since(mtime).ok());
    if age.is_some_and(|a| a > STALE_TMP_AGE) {
        match fs::remove_file(path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed a stale journal temp file"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale journal temp file"),
        }
    }
}

/// The path [`boot_id`] reads: `$CTGUARD_BOOT_ID_FILE` when set (test-only, see
/// [`BOOT_ID_FILE_ENV`]), else [`BOOT_ID_PATH`].
pub fn boot_id_path() -> PathBuf {
    std::env::var_os(BOOT_ID_FILE_ENV).map_or_else(|| PathBuf::from(BOOT_ID_PATH), PathBuf::from)
}

/// The current boot id (trimmed), from [`boot_id_path`]. The error names the file. Read-only.
pub fn boot_id() -> Result<String, io::Error> {
    read_boot_id(&boot_id_path())
}

/// Reads a boot id from `path` (trimmed; empty is an error naming the file). Read-only.
pub fn read_boot_id(path: &Path) -> Result<String, io::Error> {
    let text = fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let id = text.trim();
    if id.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: empty boot id", path.display())));
    }
    Ok(id.to_string())
}

/// `CLOCK_BOOTTIME` in nanoseconds (counts suspend; the deadline clock, DESIGN §2). Never
/// fails in practice (Linux ≥ 2.6.39); should the call fail, falls back to `CLOCK_MONOTONIC`,
/// then 0.
pub fn boottime_ns() -> u64 {
    let to_ns = |ts: nix::sys::time::TimeSpec| {
        u64::try_from(ts.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(ts.tv_nsec()).unwrap_or(0))
    };
    clock_gettime(ClockId::CLOCK_BOOTTIME).or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC)).map(to_ns).unwrap_or(0)
}

/// Wall-clock seconds since the Unix epoch (0 if the clock is before 1970). For display and
/// events only; never for deadlines.
pub fn wall_unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Four random bytes from getrandom(2) (blocks only before the kernel's pool is initialised).
pub fn random_u32() -> Result<u32, io::Error> {
    let mut buf = [0u8; 4];
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the whole call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += usize::try_from(n).unwrap_or(0);
    }
    Ok(u32::from_ne_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txn::{Deadline, Kind, Reason, Requester, State, TargetRecord};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const BOOT: &str = "3f1c2a9e-0000-4000-8000-000000000001";

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "ctguard-journal-{name}-{}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed),
                wall_unix_now()
            ));
            fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn rec(wall: u64, rand: u32, ino: u64) -> TxnRecord {
        TxnRecord::new(
            TxnId::generate(wall, rand),
            Kind::Policy,
            TargetRecord { label: "host".into(), path: "/proc/1/ns/net".into(), pin: None, dev: 4, ino },
            Requester { uid: 0, pid: 1, ssh: None, origin: None, person: None },
            BOOT.into(),
            wall,
        )
    }

    fn pending(mut r: TxnRecord) -> TxnRecord {
        let d = Deadline { boottime_ns: 60_000_000_000, boot_id: BOOT.into(), wall_unix: r.created_wall + 60 };
        r.to_pending(d, r.created_wall + 1).expect("pending");
        r
    }

    fn committed(r: TxnRecord) -> TxnRecord {
        let mut r = pending(r);
        r.to_committed(r.created_wall + 2).expect("committed");
        r
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn open_creates_dirs_0700() {
        use std::os::unix::fs::PermissionsExt;
        let t = TempDir::new("open");
        let sd = t.0.join("a/b/state");
        let j = Journal::open(&sd).expect("open");
        for d in [&sd, &sd.join("txn")] {
            let mode = fs::metadata(d).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        assert_eq!(j.txn_dir(), sd.join("txn"));
        assert!(names(&sd.join("txn")).is_empty(), "the probe file is gone");
        Journal::open(&sd).expect("open is idempotent");
    }

    #[test]
    fn attach_changes_nothing() {
        let t = TempDir::new("attach");
        let sd = t.0.join("state");
        let j = Journal::attach(&sd).expect("attach to a missing dir");
        assert!(j.list().expect("list").is_empty());
        assert!(!sd.exists(), "attach creates nothing");
        assert!(matches!(j.load(&TxnId::generate(0, 0)), Err(JournalError::NotFound { .. })));
        let r = rec(1_700_000_000, 1, 10);
        Journal::open(&sd).expect("open").write(&r).expect("write");
        assert_eq!(j.list().expect("list"), vec![r]);
        j.check_room().expect("room");
        fs::write(t.0.join("file"), b"").expect("write");
        assert!(matches!(Journal::attach(&t.0.join("file")), Err(JournalError::NotADirectory { .. })));
    }

    #[test]
    fn write_load_roundtrip_and_overwrite() {
        let t = TempDir::new("rt");
        let j = Journal::open(&t.0).expect("open");
        let mut r = rec(1_700_000_000, 1, 10);
        r.undo = serde_json::json!({"objects": ["table inet ctguard"]});
        j.write(&r).expect("write");
        assert_eq!(j.load(&r.id).expect("load"), r);
        let r = pending(r);
        j.write(&r).expect("overwrite");
        j.write(&r).expect("same again");
        assert_eq!(j.load(&r.id).expect("load"), r);
        assert_eq!(names(j.txn_dir()), [format!("{}.json", r.id)], "one file, no temp left");
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(j.record_path(&r.id)).expect("meta").permissions().mode() & 0o777
        };
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn load_errors() {
        let t = TempDir::new("load");
        let j = Journal::open(&t.0).expect("open");
        let id = TxnId::generate(1_700_000_000, 7);
        match j.load(&id) {
            Err(e @ JournalError::NotFound { .. }) => assert!(e.to_string().contains(id.as_str())),
            other => panic!("expected NotFound, got {other:?}"),
        }
        fs::write(j.record_path(&id), b"{not json").expect("write");
        assert!(matches!(j.load(&id), Err(JournalError::Corrupt { .. })));
        // A record stored under another id's name.
        let other = rec(1_700_000_000, 8, 1);
        fs::write(j.record_path(&id), other.to_json().expect("json")).expect("write");
        assert!(matches!(j.load(&id), Err(JournalError::WrongId { .. })));
    }

    #[test]
    fn stale_tmp_ignored_and_removed() {
        let t = TempDir::new("tmp");
        let j = Journal::open(&t.0).expect("open");
        let r = rec(1_700_000_000, 1, 10);
        j.write(&r).expect("write");
        // A crash between create and rename leaves a torn temp file.
        let fresh = j.txn_dir().join(".20231114-221320-0002.json.tmp");
        let stale = j.txn_dir().join(".20231114-221320-0003.json.tmp");
        fs::write(&fresh, b"{\"version\": 1, \"id\": ").expect("write");
        fs::write(&stale, b"{\"ver").expect("write");
        let old = SystemTime::now() - STALE_TMP_AGE - Duration::from_secs(5);
        File::options().write(true).open(&stale).expect("open").set_modified(old).expect("mtime");
        let scan = j.scan().expect("scan");
        assert_eq!(scan.records, vec![r.clone()]);
        assert!(scan.skipped.is_empty(), "{:?}", scan.skipped);
        assert!(fresh.exists(), "a temp file that may be a write in progress is kept");
        assert!(!stale.exists(), "a stale temp file is removed");
        // A temp file of the same id is simply replaced by the next write.
        fs::write(j.tmp_path(&r.id), b"junk").expect("write");
        j.write(&r).expect("write over leftover");
        assert!(!j.tmp_path(&r.id).exists());
    }

    #[test]
    fn list_order_and_skipped_files() {
        let t = TempDir::new("list");
        let j = Journal::open(&t.0).expect("open");
        let a = rec(1_700_000_100, 0xb, 1);
        let b = rec(1_700_000_000, 0xf, 2);
        let c = rec(1_700_000_100, 0xa, 3);
        let mut d = rec(1_700_000_050, 0x1, 4);
        d.created_wall = 1_700_000_200; // created_wall wins over the id's time
        for r in [&a, &b, &c, &d] {
            j.write(r).expect("write");
        }
        fs::write(j.txn_dir().join("garbage.json"), b"{}").expect("write");
        fs::write(j.txn_dir().join("20231114-221320-00ff.json"), b"{\"version\": 99}").expect("write");
        fs::write(j.txn_dir().join("20231114-221320-00FE.json"), b"{}").expect("write");
        fs::write(j.txn_dir().join("README"), b"not a record").expect("write");
        let scan = j.scan().expect("scan");
        let ids: Vec<&TxnId> = scan.records.iter().map(|r| &r.id).collect();
        // Creation order: `a` was created before `c` in the same second (`created_ns`), whatever
        // their random ids say.
        assert_eq!(ids, [&b.id, &a.id, &c.id, &d.id]);
        assert_eq!(scan.skipped.len(), 3, "{:?}", scan.skipped);
        assert!(scan.skipped.iter().all(|e| matches!(e, JournalError::Corrupt { .. })));
        assert!(scan.skipped.iter().any(|e| matches!(
            e,
            JournalError::Corrupt { source: TxnError::UnsupportedVersion { found: Some(99) }, .. }
        )));
        assert_eq!(j.list().expect("list").len(), 4);
    }

    #[test]
    fn unfinished_and_pending_for() {
        let t = TempDir::new("pending");
        let j = Journal::open(&t.0).expect("open");
        let done = committed(rec(1_700_000_000, 1, 10));
        let p = pending(rec(1_700_000_001, 2, 20));
        let prep = rec(1_700_000_002, 3, 30);
        let mut failed = pending(rec(1_700_000_003, 4, 40));
        failed.to_rollback_failed("x".into(), 1_700_000_010).expect("failed");
        let mut rb = pending(rec(1_700_000_004, 5, 20));
        rb.to_rolled_back(Reason::Deadline, 1_700_000_010).expect("rb");
        for r in [&done, &p, &prep, &failed, &rb] {
            j.write(r).expect("write");
        }
        let ids: Vec<TxnId> = j.unfinished().expect("unfinished").into_iter().map(|r| r.id).collect();
        assert_eq!(ids, [p.id.clone(), prep.id.clone(), failed.id.clone()]);
        assert_eq!(j.pending_for(4, 20).expect("pf").map(|r| r.id), Some(p.id));
        assert_eq!(j.pending_for(4, 30).expect("pf").map(|r| r.id), Some(prep.id));
        assert_eq!(j.pending_for(4, 40).expect("pf").map(|r| r.id), Some(failed.id));
        assert_eq!(j.pending_for(4, 10).expect("pf"), None, "committed does not block");
        assert_eq!(j.pending_for(5, 20).expect("pf"), None, "dev is part of the identity");
    }

    #[test]
    fn prune_keeps_unfinished_and_newest() {
        let t = TempDir::new("prune");
        let j = Journal::open(&t.0).expect("open");
        let mut finished = Vec::new();
        for i in 0..6u64 {
            let r = committed(rec(1_700_000_000 + i * 10, i as u32, 1));
            j.write(&r).expect("write");
            finished.push(r);
        }
        // Unfinished ones, older than every finished one.
        let old_pending = pending(rec(1_600_000_000, 0xaa, 2));
        let old_prepared = rec(1_600_000_001, 0xab, 3);
        j.write(&old_pending).expect("write");
        j.write(&old_prepared).expect("write");
        assert_eq!(j.prune(2).expect("prune"), 4);
        let left: Vec<TxnId> = j.list().expect("list").into_iter().map(|r| r.id).collect();
        assert_eq!(
            left,
            [old_pending.id.clone(), old_prepared.id.clone(), finished[4].id.clone(), finished[5].id.clone()]
        );
        assert_eq!(j.prune(2).expect("prune again"), 0, "idempotent");
        assert_eq!(j.prune(0).expect("prune all finished"), 2);
        let left: Vec<State> = j.list().expect("list").into_iter().map(|r| r.state).collect();
        assert_eq!(left.len(), 2);
        assert!(left.iter().all(|s| !s.is_finished()));
        assert_eq!(j.prune(DEFAULT_KEEP).expect("prune default"), 0);
    }

    #[test]
    fn open_refuses_a_file_in_place_of_the_dir() {
        let t = TempDir::new("notdir");
        let f = t.0.join("state");
        fs::write(&f, b"").expect("write");
        match Journal::open(&f) {
            Err(e @ JournalError::NotADirectory { .. }) => assert!(e.to_string().contains(&*f.to_string_lossy())),
            other => panic!("expected NotADirectory, got {other:?}"),
        }
        let sd = t.0.join("state2");
        fs::create_dir(&sd).expect("mkdir");
        fs::write(sd.join("txn"), b"").expect("write");
        assert!(matches!(Journal::open(&sd), Err(JournalError::NotADirectory { .. })));
        // Below a regular file: cannot be created.
        assert!(matches!(
            Journal::open(&f.join("sub")),
            Err(JournalError::Access { .. }
                | JournalError::CreateDir { .. }
                | JournalError::NotADirectory { .. }
                | JournalError::Untrusted(_))
        ));
    }

    /// Read-only and nearly full file systems, on tmpfs mounts in a private mount namespace: the
    /// test binary re-executes itself under `unshare --mount` to run `fs_checks_child`.
    #[test]
    fn open_refuses_read_only_and_full_fs() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for mounts in a private mount namespace");
            return;
        }
        let t = TempDir::new("fs");
        let exe = std::env::current_exe().expect("current exe");
        let script = r#"set -e
d="$CTGUARD_TEST_FS_DIR"
mkdir "$d/ro" "$d/full"
mount -t tmpfs -o size=4m,mode=0700 tmpfs "$d/ro"
mkdir "$d/ro/txn"
mount -o remount,ro "$d/ro"
mount -t tmpfs -o size=1m,mode=0700 tmpfs "$d/full"
dd if=/dev/zero of="$d/full/filler" bs=4096 count=192 2>/dev/null
exec "$0" journal::tests::fs_checks_child --exact --ignored --nocapture --test-threads=1"#;
        let out = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(&exe)
            .env("CTGUARD_TEST_FS_DIR", &t.0)
            .output()
            .expect("run unshare");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("1 passed"), "child did not run:\n{text}");
    }

    #[test]
    #[ignore = "run by open_refuses_read_only_and_full_fs inside a private mount namespace"]
    fn fs_checks_child() {
        let Some(d) = std::env::var_os("CTGUARD_TEST_FS_DIR").map(PathBuf::from) else {
            return;
        };
        let ro = d.join("ro");
        match Journal::open(&ro) {
            Err(e @ JournalError::NotWritable { .. }) => assert!(e.to_string().contains("not writable"), "{e}"),
            other => panic!("read-only: expected NotWritable, got {other:?}"),
        }
        match Journal::open(&ro.join("state")) {
            Err(e @ JournalError::CreateDir { .. }) => assert!(e.to_string().contains("ro/state"), "{e}"),
            other => panic!("read-only: expected CreateDir, got {other:?}"),
        }
        let full = d.join("full");
        match Journal::open(&full) {
            Err(e @ JournalError::NoSpace { .. }) => assert!(e.to_string().contains("full/txn"), "{e}"),
            other => panic!("nearly full: expected NoSpace, got {other:?}"),
        }
        // Reading (and recovery) still works there.
        let j = Journal::attach(&full).expect("attach");
        assert!(j.list().expect("list").is_empty());
        assert!(matches!(j.check_room(), Err(JournalError::NoSpace { .. })));
        // Completely full: the probe write fails first.
        fill(&full.join("filler"));
        assert!(matches!(Journal::open(&full), Err(JournalError::NotWritable { .. })));
    }

    fn fill(path: &Path) {
        let mut f = File::options().append(true).open(path).expect("open filler");
        loop {
            match f.write_all(&[0u8; 4096]) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
                Err(e) => panic!("fill: {e}"),
            }
        }
    }

    #[test]
    fn lock_is_exclusive() {
        let t = TempDir::new("lock");
        let j = Journal::open(&t.0).expect("open");
        let held = j.try_lock().expect("first lock");
        match j.try_lock() {
            Err(e @ JournalError::Busy { .. }) => {
                assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        let j2 = Journal::open(&t.0).expect("open again");
        assert!(matches!(j2.try_lock(), Err(JournalError::Busy { .. })), "another handle is refused too");
        assert_eq!(held.path(), t.0.join("lock"));
        drop(held);
        let again = j2.try_lock().expect("free after drop");
        // A blocking lock waits for the holder.
        let (tx, rx) = std::sync::mpsc::channel();
        let j3 = j.clone();
        let waiter = std::thread::spawn(move || {
            let l = j3.lock().expect("blocking lock");
            tx.send(()).expect("send");
            drop(l);
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "must wait while held");
        drop(again);
        rx.recv_timeout(Duration::from_secs(10)).expect("acquired after release");
        waiter.join().expect("join");
    }

    #[test]
    fn fresh_ids_differ() {
        let t = TempDir::new("ids");
        let j = Journal::open(&t.0).expect("open");
        let a = j.fresh_id(1_700_000_000).expect("id");
        assert!(a.as_str().starts_with("20231114-221320-"));
        let mut r = rec(1_700_000_000, 0, 1);
        r.id = a.clone();
        j.write(&r).expect("write");
        for _ in 0..50 {
            assert_ne!(j.fresh_id(1_700_000_000).expect("id"), a);
        }
    }

    #[test]
    fn boot_id_and_clock() {
        let real = boot_id().expect("boot id");
        assert_eq!(real.len(), 36, "{real}");
        let t = TempDir::new("boot");
        let f = t.0.join("boot_id");
        fs::write(&f, "simulated-boot-2\n").expect("write");
        assert_eq!(read_boot_id(&f).expect("read"), "simulated-boot-2");
        fs::write(&f, "\n").expect("write");
        assert_eq!(read_boot_id(&f).expect_err("empty").kind(), io::ErrorKind::InvalidData);
        let e = read_boot_id(&t.0.join("missing")).expect_err("missing");
        assert!(e.to_string().contains("missing"), "{e}");
        let a = boottime_ns();
        let b = boottime_ns();
        assert!(a > 0 && b >= a);
        assert!(wall_unix_now() > 1_600_000_000);
        assert_ne!((random_u32().expect("r"), random_u32().expect("r")), (0, 0));
    }
}
