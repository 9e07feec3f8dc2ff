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
//! snapshots/SHA256.zst     a large part of a record (a listing, a ruleset, a saved table,
//!                          …), zstd-compressed, named by the SHA-256 of its bytes: stored
//!                          once however many records refer to it
//! snapshots/.SHA256.zst.tmp  a snapshot write in progress (or a crash leftover)
//! ```
//!
//! A record is the index entry of its transaction: its parts of [`SNAPSHOT_MIN_BYTES`] or more
//! (the `ruleset`, the `before`/`after` listings, every text of a ruleset transaction's
//! snapshot in `undo.snapshot`, the previous contents in `undo.persisted`, the `undo.drift`
//! list) are stored apart and referred to by [`TxnRecord::snapshots`]. Reading the records
//! ([`Journal::list`], [`Journal::scan_index`]) never reads a snapshot; [`Journal::load`] and
//! [`Journal::resolve`] read those of one record, when it is rolled back, shown or re-applied.
//! A snapshot is written (temp, fsync, rename, fsync dir) before the record that refers to
//! it; one that is missing, not root's alone, or whose bytes do not match its hash makes the
//! record damaged: listed, never acted on. Records written before snapshots were stored apart
//! (everything inline, version 1) are read as they are.
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

use serde_json::Value;

use crate::txn::{SnapshotRef, TxnError, TxnId, TxnRecord};

/// Finished records kept by [`Journal::prune`] by default.
pub const DEFAULT_KEEP: usize = 200;

/// Bytes of journal on disk — record files plus the snapshots they refer to, each snapshot
/// counted once — kept by [`Journal::prune`] by default: older finished records go until the
/// journal fits (records that are unfinished or the newest committed one of their target are
/// never removed, and may exceed it alone).
pub const DEFAULT_KEEP_BYTES: u64 = 64 << 20;

/// Parts of a record at least this long are stored apart as snapshots; shorter ones stay
/// inline.
pub const SNAPSHOT_MIN_BYTES: usize = 4096;

/// A snapshot no record refers to is removed by [`Journal::prune`] once it is older than this
/// (younger, it may belong to a record being written), or at once when the records just
/// pruned were the last to refer to it.
pub const SNAPSHOT_GRACE: Duration = Duration::from_secs(60);

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
    /// A snapshot a record refers to cannot be used: missing, not root's alone, a symlink,
    /// unreadable, not zstd, or its bytes do not match its hash. The record is damaged:
    /// listed, never acted on.
    #[error("{record}: snapshot {pointer} ({path}) {why}")]
    Snapshot {
        /// The record file.
        record: PathBuf,
        /// The part of the record (a JSON pointer).
        pointer: String,
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A snapshot could not be written; the record that would refer to it was not written.
    #[error("cannot write snapshot {path} ({step}): {source}")]
    WriteSnapshot {
        /// File or directory.
        path: PathBuf,
        /// `"compress"`, `"create"`, `"write"`, `"fsync"`, `"rename"` or `"fsync directory"`.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
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
    snap_dir: PathBuf,
    /// Snapshots this process wrote or checked byte for byte (shared by clones): a write that
    /// refers to one again only checks that its file is still there.
    known: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Snapshot files looked at during one scan: SHA-256 → size, or why it cannot be used (records
/// share snapshots: each file is looked at once).
type SeenSnapshots = std::collections::HashMap<String, Result<u64, String>>;

/// How far [`Journal`]'s reads go into the snapshots of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Not at all.
    Raw,
    /// Each snapshot file is there, root's alone and of the recorded size (one `lstat`).
    Index,
    /// [`Depth::Index`], and an unfinished record's snapshots decompressed and hashed
    /// (streamed: constant memory).
    Verified,
    /// [`Depth::Index`], and an unfinished record resolved (made whole).
    Resolved,
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
        let snap_dir = state_dir.join("snapshots");
        trusted(state_dir)?;
        ensure_dir(state_dir)?;
        ensure_dir(&txn_dir)?;
        trusted(&txn_dir)?;
        let journal = Journal::handle(state_dir);
        journal.check_room()?;
        ensure_dir(&snap_dir)?;
        trusted(&snap_dir)?;
        Ok(journal)
    }

    fn handle(state_dir: &Path) -> Journal {
        Journal {
            state_dir: state_dir.to_path_buf(),
            txn_dir: state_dir.join("txn"),
            snap_dir: state_dir.join("snapshots"),
            known: Default::default(),
        }
    }

    /// A handle on `state_dir` without creating anything or checking room: for read-only verbs
    /// (`history`, `show`, `status`) and for recovery, which must still roll back when the disk
    /// is full or read-only (its journal writes may then fail; the rollback should not wait for
    /// them). A missing `txn/` reads as an empty journal. Refuses only a `state_dir` that
    /// exists and is not a directory. No side effects.
    pub fn attach(state_dir: &Path) -> Result<Journal, JournalError> {
        trusted(state_dir)?;
        trusted(&state_dir.join("txn"))?;
        trusted(&state_dir.join("snapshots"))?;
        match fs::metadata(state_dir) {
            Ok(m) if !m.is_dir() => return Err(JournalError::NotADirectory { path: state_dir.to_path_buf() }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(JournalError::Access { path: state_dir.to_path_buf(), source }),
        }
        Ok(Journal::handle(state_dir))
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

    /// The directory of the snapshot files (`state_dir/snapshots`).
    pub fn snapshot_dir(&self) -> &Path {
        &self.snap_dir
    }

    /// Path of the snapshot file of SHA-256 `sha256` (whether or not it exists).
    pub fn snapshot_path(&self, sha256: &str) -> PathBuf {
        self.snap_dir.join(format!("{sha256}.zst"))
    }

    /// Path of the record file of `id` (whether or not it exists).
    pub fn record_path(&self, id: &TxnId) -> PathBuf {
        self.txn_dir.join(format!("{id}.json"))
    }

    fn tmp_path(&self, id: &TxnId) -> PathBuf {
        self.txn_dir.join(format!(".{id}.json.tmp"))
    }

    /// Stores `rec` crash-safely. First its large parts ([`SNAPSHOT_MIN_BYTES`] or more) as
    /// snapshots: each not stored yet is compressed, written to `snapshots/.SHA256.zst.tmp`,
    /// fsynced and renamed to `snapshots/SHA256.zst`, then the directory is fsynced. Then the
    /// record, referring to them: serialize, write `txn/.ID.json.tmp`, fsync it, rename it over
    /// `txn/ID.json`, fsync the directory. After `Ok`, the new version and every snapshot it
    /// refers to survive a crash or power loss; until then, the previous version (or none)
    /// does — never a torn file, never a record without its snapshots (a crash in between
    /// leaves at worst a snapshot no record refers to, removed by [`Journal::prune`]). On
    /// `Err` the caller must not perform the effect this step journals. Idempotent (writing
    /// the same record twice leaves the same files). An index entry (see
    /// [`TxnRecord::snapshots`]) keeps referring to the snapshots of its absent parts; a part
    /// set in memory replaces its reference. Concurrent writers of the same id must be
    /// serialized by the caller.
    pub fn write(&self, rec: &TxnRecord) -> Result<(), JournalError> {
        let encode = |source| JournalError::Encode { id: rec.id.to_string(), source };
        let (mut value, parts) = split_record(rec).map_err(encode)?;
        let attempt = |value: &mut Value| -> Result<(), JournalError> {
            let refs = self.store_snapshots(&parts)?;
            set_refs(value, refs);
            let mut bytes = serde_json::to_vec_pretty(&*value).map_err(|source| encode(TxnError::Json { source }))?;
            bytes.push(b'\n');
            self.write_bytes(rec, &bytes)?;
            // A prune that ran without the lock may have removed a snapshot this record reuses.
            self.restore_missing(&parts)
        };
        match attempt(&mut value) {
            // A full disk and a final record (committed, rolled back): give the record's
            // reserve back and try once more (DESIGN §2: a failed apply must still reach a
            // terminal state in the journal). Intermediate records do not use the reserve.
            Err(JournalError::Write { source, .. } | JournalError::WriteSnapshot { source, .. })
                if is_no_space(&source) && rec.state.is_finished() && self.release_reserve(&rec.id) =>
            {
                tracing::warn!(txid = rec.id.as_str(), "state dir full: writing the record into its reserve");
                attempt(&mut value)
            }
            other => other,
        }
    }

    /// Makes sure every part is stored (see [`Journal::write`]); returns the references.
    fn store_snapshots(&self, parts: &[Part]) -> Result<Vec<(String, SnapshotRef)>, JournalError> {
        if !parts.is_empty() {
            // A state dir from before snapshots (attached, not opened) gets its directory now.
            ensure_dir(&self.snap_dir)?;
            trusted(&self.snap_dir)?;
        }
        let mut refs = Vec::with_capacity(parts.len());
        let mut wrote = false;
        for part in parts {
            let stored = match self.stored_size(part) {
                Some(n) => n,
                None => {
                    wrote = true;
                    self.write_snapshot(part)?
                }
            };
            let r =
                SnapshotRef { sha256: part.sha256.clone(), bytes: part.bytes.len() as u64, stored, json: part.json };
            refs.push((part.pointer.clone(), r));
        }
        if wrote {
            fsync_dir(&self.snap_dir).map_err(|source| JournalError::WriteSnapshot {
                path: self.snap_dir.clone(),
                step: "fsync directory",
                source,
            })?;
        }
        Ok(refs)
    }

    /// The size of `part`'s snapshot file when it is stored already and intact (checked byte
    /// for byte once per process), its mtime renewed so a concurrent prune keeps it.
    fn stored_size(&self, part: &Part) -> Option<u64> {
        let path = self.snapshot_path(&part.sha256);
        let meta = crate::trust::stat_root_file(&path).ok()?;
        let known = self.known.lock().map(|k| k.contains(&part.sha256)).unwrap_or(false);
        if !known {
            let r = SnapshotRef {
                sha256: part.sha256.clone(),
                bytes: part.bytes.len() as u64,
                stored: meta.len(),
                json: part.json,
            };
            if self.verify_snapshot(&path, &r).is_err() {
                return None;
            }
            self.remember(&part.sha256);
        }
        touch(&path);
        Some(meta.len())
    }

    fn remember(&self, sha256: &str) {
        if let Ok(mut k) = self.known.lock() {
            k.insert(sha256.to_string());
        }
    }

    /// Compresses and writes one snapshot (temp, fsync, rename; the caller fsyncs the
    /// directory). Returns the file's size.
    fn write_snapshot(&self, part: &Part) -> Result<u64, JournalError> {
        let dest = self.snapshot_path(&part.sha256);
        let tmp = self.snap_dir.join(format!(".{}.zst.tmp", part.sha256));
        let step = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::WriteSnapshot { path, step, source }
        };
        let frame = crate::compress::compress(&part.bytes).map_err(|e| JournalError::WriteSnapshot {
            path: dest.clone(),
            step: "compress",
            source: io::Error::other(e),
        })?;
        replace_file(&tmp, &dest, &frame).map_err(|(s, path, source)| step(s, &path)(source))?;
        self.remember(&part.sha256);
        Ok(frame.len() as u64)
    }

    /// Writes again (from memory) the snapshots of `parts` whose files are gone.
    fn restore_missing(&self, parts: &[Part]) -> Result<(), JournalError> {
        let mut wrote = false;
        for part in parts {
            if fs::symlink_metadata(self.snapshot_path(&part.sha256)).is_err() {
                tracing::warn!(
                    sha256 = part.sha256.as_str(),
                    "a snapshot vanished while its record was written; writing it again"
                );
                self.write_snapshot(part)?;
                wrote = true;
            }
        }
        if wrote {
            fsync_dir(&self.snap_dir).map_err(|source| JournalError::WriteSnapshot {
                path: self.snap_dir.clone(),
                step: "fsync directory",
                source,
            })?;
        }
        Ok(())
    }

    /// Reads one snapshot whole: the file must be root's alone, of the recorded size, a zstd
    /// frame decoding to exactly the recorded bytes. Returns the part as JSON.
    fn read_snapshot(&self, r: &SnapshotRef) -> Result<Value, String> {
        let path = self.snapshot_path(&r.sha256);
        let mut f = crate::trust::open_root_file(&path).map_err(|e| describe_open(&e))?;
        let mut frame = Vec::new();
        f.read_to_end(&mut frame).map_err(|e| format!("cannot be read: {e}"))?;
        if frame.len() as u64 != r.stored {
            return Err(format!("is {} bytes, the record says {}", frame.len(), r.stored));
        }
        let bytes = crate::compress::decompress(&frame).map_err(|e| e.to_string())?;
        drop(frame);
        if bytes.len() as u64 != r.bytes || crate::compress::sha256_hex(&bytes) != r.sha256 {
            return Err("does not hold the bytes its name and the record say (damaged or replaced)".into());
        }
        if r.json {
            serde_json::from_slice(&bytes).map_err(|e| format!("is not JSON: {e}"))
        } else {
            String::from_utf8(bytes).map(Value::String).map_err(|_| "is not UTF-8 text".into())
        }
    }

    /// Checks one snapshot byte for byte without keeping it (streamed: constant memory).
    fn verify_snapshot(&self, path: &Path, r: &SnapshotRef) -> Result<(), String> {
        use sha2::Digest;
        let f = crate::trust::open_root_file(path).map_err(|e| describe_open(&e))?;
        let size = f.metadata().map(|m| m.len()).map_err(|e| format!("cannot be read: {e}"))?;
        if size != r.stored {
            return Err(format!("is {size} bytes, the record says {}", r.stored));
        }
        let mut dec = zstd::stream::read::Decoder::new(f).map_err(|e| format!("is not zstd: {e}"))?.single_frame();
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 128 << 10];
        let mut total = 0u64;
        loop {
            let n = dec.read(&mut buf).map_err(|e| format!("is not a valid zstd snapshot: {e}"))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > r.bytes {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        if total != r.bytes || hex != r.sha256 {
            return Err("does not hold the bytes its name and the record say (damaged or replaced)".into());
        }
        Ok(())
    }

    /// Checks that each snapshot of `rec` is there, root's alone and of its recorded size
    /// (one `lstat` each; the bytes are not read).
    fn check_present(&self, path: &Path, rec: &TxnRecord, seen: &mut SeenSnapshots) -> Result<(), JournalError> {
        for (pointer, r) in &rec.snapshots {
            let snap = self.snapshot_path(&r.sha256);
            let size = seen
                .entry(r.sha256.clone())
                .or_insert_with(|| crate::trust::stat_root_file(&snap).map(|m| m.len()).map_err(|e| describe_open(&e)));
            let why = match size {
                Ok(n) if *n == r.stored => continue,
                Ok(n) => format!("is {n} bytes, the record says {}", r.stored),
                Err(e) => e.clone(),
            };
            return Err(snapshot_error(path, pointer, snap, why));
        }
        Ok(())
    }

    fn verify_all(&self, path: &Path, rec: &TxnRecord) -> Result<(), JournalError> {
        for (pointer, r) in &rec.snapshots {
            let snap = self.snapshot_path(&r.sha256);
            self.verify_snapshot(&snap, r).map_err(|why| snapshot_error(path, pointer, snap, why))?;
        }
        Ok(())
    }

    /// Makes an index entry whole: reads, checks and decompresses each snapshot it refers to
    /// and puts the parts back in place ([`TxnRecord::snapshots`] empty afterwards). A whole
    /// record is left as it is. A snapshot that is missing, not root's alone, or whose bytes
    /// do not match → [`JournalError::Snapshot`], and `rec` is unchanged: never a record with
    /// wrong parts. Read-only on disk.
    pub fn resolve(&self, rec: &mut TxnRecord) -> Result<(), JournalError> {
        if rec.is_whole() {
            return Ok(());
        }
        let path = self.record_path(&rec.id);
        let mut value = serde_json::to_value(&*rec)
            .map_err(|source| JournalError::Encode { id: rec.id.to_string(), source: TxnError::Json { source } })?;
        self.resolve_value(&path, &mut value)?;
        *rec = TxnRecord::from_value(value).map_err(|source| JournalError::Corrupt { path, source })?;
        Ok(())
    }

    /// Puts the snapshots of a record's JSON back in place and drops its `snapshots`.
    fn resolve_value(&self, path: &Path, value: &mut Value) -> Result<(), JournalError> {
        let Some(Value::Object(refs)) = value.as_object_mut().and_then(|o| o.remove("snapshots")) else {
            return Ok(());
        };
        for (pointer, r) in refs {
            let r: SnapshotRef = serde_json::from_value(r).map_err(|source| JournalError::Corrupt {
                path: path.to_path_buf(),
                source: TxnError::Json { source },
            })?;
            let snap = self.snapshot_path(&r.sha256);
            let part = self.read_snapshot(&r).map_err(|why| snapshot_error(path, &pointer, snap.clone(), why))?;
            match value.pointer_mut(&pointer) {
                Some(slot) if slot.is_null() => *slot = part,
                _ => {
                    return Err(snapshot_error(
                        path,
                        &pointer,
                        snap,
                        "refers to a part the record does not have".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    fn write_bytes(&self, rec: &TxnRecord, bytes: &[u8]) -> Result<(), JournalError> {
        let tmp = self.tmp_path(&rec.id);
        let dest = self.record_path(&rec.id);
        let step = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Write { path, step, source }
        };
        replace_file(&tmp, &dest, bytes).map_err(|(s, path, source)| step(s, &path)(source))?;
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
            Ok(bytes) => {
                let mut value: Value = serde_json::from_slice(&bytes).map_err(|source| JournalError::Corrupt {
                    path: path.clone(),
                    source: TxnError::Json { source },
                })?;
                drop(bytes);
                if value.get("snapshots").and_then(Value::as_object).is_none_or(serde_json::Map::is_empty) {
                    return parse_value(&path, value, id);
                }
                // Version, references and id are checked before any snapshot is read (the
                // value is an index entry: small).
                parse_value(&path, value.clone(), id)?;
                self.resolve_value(&path, &mut value)?;
                parse_value(&path, value, id)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(JournalError::NotFound { id: id.to_string(), dir: self.txn_dir.clone() })
            }
            Err(source) => Err(JournalError::Read { path, source }),
        }
    }

    /// The record of `id` as an index entry: state, events, target, requester, options — its
    /// snapshots neither read nor checked ([`TxnRecord::snapshots`] lists them). For a record's
    /// state (e.g. waiting for its outcome), never for acting on its parts. Errors as
    /// [`Journal::load`]. Read-only.
    pub fn load_entry(&self, id: &TxnId) -> Result<TxnRecord, JournalError> {
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
    /// (never fails because of one bad file) — what an agent recovers from. Finished records
    /// are index entries (their snapshots checked as in [`Journal::list`], not read); each
    /// unfinished record is made whole ([`Journal::resolve`]), and one whose snapshots are
    /// missing or damaged is skipped as damaged. Write-in-progress files are ignored; those
    /// older than [`STALE_TMP_AGE`] are crash leftovers and are removed (best effort).
    pub fn scan(&self) -> Result<Scan, JournalError> {
        self.scan_depth(Depth::Resolved).map(|(scan, _)| scan)
    }

    /// [`Journal::scan`] for `status`: every record an index entry, each snapshot checked to
    /// be there, root's alone and of its size (one `lstat`), and those of unfinished records
    /// decompressed and hashed in a stream (constant memory) — a record whose snapshots fail
    /// is skipped as damaged. Reads no snapshot of a finished record.
    pub fn scan_index(&self) -> Result<Scan, JournalError> {
        self.scan_depth(Depth::Verified).map(|(scan, _)| scan)
    }

    /// The records at `depth`, with the size of each record file.
    fn scan_depth(&self, depth: Depth) -> Result<(Scan, Vec<u64>), JournalError> {
        let mut scan = Scan::default();
        let mut sized: Vec<(TxnRecord, u64)> = Vec::new();
        let mut seen = SeenSnapshots::new();
        let entries = match fs::read_dir(&self.txn_dir) {
            Ok(entries) => entries,
            // Only possible through `attach`: nothing journaled yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((scan, Vec::new())),
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
                Ok(bytes) => {
                    match parse_record(&path, &bytes, &id).and_then(|rec| self.deepen(&path, rec, depth, &mut seen)) {
                        Ok(rec) => sized.push((rec, bytes.len() as u64)),
                        Err(e) => scan.skipped.push(e),
                    }
                }
                // Removed meanwhile (prune in another process): not an error.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => scan.skipped.push(JournalError::Read { path, source }),
            }
        }
        sized.sort_by(|(a, _), (b, _)| {
            (a.created_wall, a.created_ns).cmp(&(b.created_wall, b.created_ns)).then_with(|| a.id.cmp(&b.id))
        });
        let sizes = sized.iter().map(|(_, n)| *n).collect();
        scan.records = sized.into_iter().map(|(r, _)| r).collect();
        Ok((scan, sizes))
    }

    fn deepen(
        &self,
        path: &Path,
        mut rec: TxnRecord,
        depth: Depth,
        seen: &mut SeenSnapshots,
    ) -> Result<TxnRecord, JournalError> {
        if depth == Depth::Raw || rec.is_whole() {
            return Ok(rec);
        }
        self.check_present(path, &rec, seen)?;
        if !rec.state.is_finished() {
            match depth {
                Depth::Verified => self.verify_all(path, &rec)?,
                Depth::Resolved => self.resolve(&mut rec)?,
                Depth::Raw | Depth::Index => {}
            }
        }
        Ok(rec)
    }

    /// Every record as an index entry (see [`TxnRecord::snapshots`]), in [`Journal::scan`]'s
    /// order, logging each skipped file with `tracing::warn!`: a record whose snapshot is
    /// missing or not root's alone (one `lstat` each) is skipped; no snapshot is read. For
    /// `history`, the checks of an apply and anything else that needs no large part. Read-only
    /// apart from removing stale temp files.
    pub fn list(&self) -> Result<Vec<TxnRecord>, JournalError> {
        let (scan, _) = self.scan_depth(Depth::Index)?;
        for e in &scan.skipped {
            tracing::warn!(error = %e, "skipping a journal file");
        }
        Ok(scan.records)
    }

    /// Every record as an index entry, its snapshots not even looked at (a record whose
    /// snapshots are missing is listed too), in [`Journal::scan`]'s order; files that cannot
    /// be read are skipped and logged. The cheapest read: for deciding whether there is work
    /// for an agent, never for acting on a record. Read-only apart from removing stale temp
    /// files.
    pub fn list_entries(&self) -> Result<Vec<TxnRecord>, JournalError> {
        let (scan, _) = self.scan_depth(Depth::Raw)?;
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

    /// Bounded history: [`Journal::prune_to`] with `keep` records and [`DEFAULT_KEEP_BYTES`].
    pub fn prune(&self, keep: usize) -> Result<usize, JournalError> {
        self.prune_to(keep, DEFAULT_KEEP_BYTES)
    }

    /// Bounded history, in records and in bytes: deletes the oldest finished records until at
    /// most `keep` finished ones are left and the journal on disk (record files plus the
    /// snapshots they refer to, each counted once) is at most `keep_bytes`. Never an
    /// unfinished record, never the newest committed record of a target (the one a guard
    /// keeps in place and the next apply replaces), never a file it cannot read. Then removes
    /// the snapshots no record refers to any more: at once those only the deleted records
    /// referred to, others (a crash between a snapshot and its record) once older than
    /// [`SNAPSHOT_GRACE`]; and stale snapshot temp files. Crash-safe: records go first, so a
    /// crash leaves at worst snapshots no record refers to, removed next time. Returns how
    /// many records were deleted. Idempotent. Run it under [`Journal::lock`] when other
    /// processes may write.
    pub fn prune_to(&self, keep: usize, keep_bytes: u64) -> Result<usize, JournalError> {
        let started = SystemTime::now();
        let (scan, sizes) = self.scan_depth(Depth::Raw)?;
        let snaps = self.snapshot_files();
        let plan = prune_plan(&scan.records, &sizes, &snaps, keep, keep_bytes);
        let mut removed = 0;
        let mut freed: std::collections::HashSet<String> = std::collections::HashSet::new();
        for &i in &plan {
            let rec = &scan.records[i];
            let path = self.record_path(&rec.id);
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(JournalError::Remove { path, source }),
            }
            freed.extend(rec.snapshots.values().map(|r| r.sha256.clone()));
        }
        if removed > 0 {
            fsync_dir(&self.txn_dir).map_err(|source| JournalError::Write {
                path: self.txn_dir.clone(),
                step: "fsync directory",
                source,
            })?;
        }
        self.remove_unreferenced(started, &freed)?;
        Ok(removed)
    }

    /// The snapshot files: SHA-256 → (size, mtime). Other names are not snapshots.
    fn snapshot_files(&self) -> std::collections::HashMap<String, (u64, SystemTime)> {
        let mut out = std::collections::HashMap::new();
        let Ok(entries) = fs::read_dir(&self.snap_dir) else { return out };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".zst.tmp") {
                remove_if_stale(&e.path());
                continue;
            }
            let Some(sha) = name.strip_suffix(".zst").filter(|h| crate::compress::is_sha256_hex(h)) else { continue };
            if let Ok(m) = e.metadata() {
                out.insert(sha.to_string(), (m.len(), m.modified().unwrap_or(UNIX_EPOCH)));
            }
        }
        out
    }

    /// Removes the snapshots no record refers to (records read again now, so one written
    /// meanwhile counts): those in `freed` modified before `started`, and any older than
    /// [`SNAPSHOT_GRACE`].
    fn remove_unreferenced(
        &self,
        started: SystemTime,
        freed: &std::collections::HashSet<String>,
    ) -> Result<(), JournalError> {
        let (scan, _) = self.scan_depth(Depth::Raw)?;
        let referenced: std::collections::HashSet<&str> =
            scan.records.iter().flat_map(|r| r.snapshots.values().map(|s| s.sha256.as_str())).collect();
        let grace_end = started.checked_sub(SNAPSHOT_GRACE).unwrap_or(UNIX_EPOCH);
        let mut removed = 0;
        for (sha, (_, mtime)) in self.snapshot_files() {
            if referenced.contains(sha.as_str()) {
                continue;
            }
            let unused = (freed.contains(&sha) && mtime < started) || mtime < grace_end;
            if !unused {
                continue;
            }
            let path = self.snapshot_path(&sha);
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(JournalError::Remove { path, source }),
            }
            if let Ok(mut k) = self.known.lock() {
                k.remove(&sha);
            }
        }
        if removed > 0 {
            fsync_dir(&self.snap_dir).map_err(|source| JournalError::Write {
                path: self.snap_dir.clone(),
                step: "fsync directory",
                source,
            })?;
        }
        Ok(())
    }

    /// Bytes the journal takes on disk: record files plus snapshot files (what
    /// [`Journal::prune_to`] bounds, counting only the snapshots records refer to).
    pub fn disk_bytes(&self) -> u64 {
        let dir_bytes = |d: &Path| -> u64 {
            fs::read_dir(d)
                .map(|es| es.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
                .unwrap_or(0)
        };
        dir_bytes(&self.txn_dir) + dir_bytes(&self.snap_dir)
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
    check_id(path, rec, id)
}

fn parse_value(path: &Path, value: Value, id: &TxnId) -> Result<TxnRecord, JournalError> {
    let rec =
        TxnRecord::from_value(value).map_err(|source| JournalError::Corrupt { path: path.to_path_buf(), source })?;
    check_id(path, rec, id)
}

/// Checks the id inside against the file's name. In memory a record is of this build's
/// version, whichever version its file has ([`set_refs`] chooses that at each write).
fn check_id(path: &Path, mut rec: TxnRecord, id: &TxnId) -> Result<TxnRecord, JournalError> {
    if rec.id != *id {
        return Err(JournalError::WrongId {
            path: path.to_path_buf(),
            expected: id.to_string(),
            found: rec.id.to_string(),
        });
    }
    rec.version = crate::txn::RECORD_VERSION;
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

/// Writes `bytes` to a new `tmp` (0600, never through a link or a leftover: a leftover or
/// planted temp file is removed first), fsyncs it and renames it over `dest`; on failure the
/// temp file is removed (best effort). The caller fsyncs the directory. Errors say which step
/// failed on which path.
fn replace_file(tmp: &Path, dest: &Path, bytes: &[u8]) -> Result<(), (&'static str, PathBuf, io::Error)> {
    let at = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: io::Error| (step, path, e)
    };
    let written = (|| {
        let _ = fs::remove_file(tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(tmp)
            .map_err(at("create", tmp))?;
        f.write_all(bytes).map_err(at("write", tmp))?;
        f.sync_all().map_err(at("fsync", tmp))?;
        drop(f);
        fs::rename(tmp, dest).map_err(at("rename", dest))
    })();
    if written.is_err() {
        let _ = fs::remove_file(tmp);
    }
    written
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

/// One large part of a record, to be stored as a snapshot.
#[derive(Debug)]
struct Part {
    /// JSON pointer of the part in the record.
    pointer: String,
    /// The part's bytes: the string itself, or the JSON text of a JSON part.
    bytes: Vec<u8>,
    /// SHA-256 of `bytes`.
    sha256: String,
    /// A JSON part.
    json: bool,
}

/// Escapes one JSON pointer token (RFC 6901).
fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// The string leaves under `v`, as JSON pointers starting with `prefix`.
fn string_leaves(v: &Value, prefix: &str, out: &mut Vec<(String, bool)>) {
    match v {
        Value::String(_) => out.push((prefix.to_string(), false)),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| string_leaves(x, &format!("{prefix}/{i}"), out)),
        Value::Object(o) => {
            o.iter().for_each(|(k, x)| string_leaves(x, &format!("{prefix}/{}", pointer_token(k)), out));
        }
        _ => {}
    }
}

/// The parts of a record (as JSON) that are stored apart when large: `(pointer, json)`.
/// The ruleset and the listings; every string of a ruleset transaction's snapshot and of the
/// persisted files' previous contents; the drift list as one JSON part. A policy
/// transaction's undo record and policy stay inline (the guard and the next apply read them
/// from the index, and they grow with the policy, not with the host's ruleset).
fn snapshot_slots(v: &Value) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> =
        ["/ruleset", "/before", "/after"].iter().map(|p| (p.to_string(), false)).collect();
    for sub in ["/undo/snapshot", "/undo/persisted"] {
        if let Some(x) = v.pointer(sub) {
            string_leaves(x, sub, &mut out);
        }
    }
    if v.pointer("/undo/drift").is_some_and(Value::is_array) {
        out.push(("/undo/drift".to_string(), true));
    }
    out
}

/// Splits a record into what its file holds (large parts `null`, the references of an index
/// entry's absent parts kept) and the large parts to store. Pure.
fn split_record(rec: &TxnRecord) -> Result<(Value, Vec<Part>), TxnError> {
    let mut value = serde_json::to_value(rec).map_err(|source| TxnError::Json { source })?;
    let mut parts = Vec::new();
    let mut keep: Vec<(String, SnapshotRef)> = Vec::new();
    for (pointer, json) in snapshot_slots(&value) {
        let Some(slot) = value.pointer_mut(&pointer) else { continue };
        let bytes = match (&*slot, json) {
            (Value::Null, _) => continue,
            (Value::String(s), false) if s.len() >= SNAPSHOT_MIN_BYTES => None,
            (Value::String(_), false) => continue,
            (other, true) => {
                let text = serde_json::to_vec(other).map_err(|source| TxnError::Json { source })?;
                if text.len() < SNAPSHOT_MIN_BYTES {
                    continue;
                }
                Some(text)
            }
            _ => continue,
        };
        let bytes = match (bytes, slot.take()) {
            (Some(b), _) => b,
            (None, Value::String(s)) => s.into_bytes(),
            (None, _) => continue,
        };
        let sha256 = crate::compress::sha256_hex(&bytes);
        parts.push(Part { pointer, bytes, sha256, json });
    }
    // An index entry's absent parts keep their snapshots; a part set in memory replaces its.
    for (pointer, r) in &rec.snapshots {
        if value.pointer(pointer).is_none_or(Value::is_null) && !parts.iter().any(|p| &p.pointer == pointer) {
            keep.push((pointer.clone(), r.clone()));
        }
    }
    if let Some(o) = value.as_object_mut() {
        o.remove("snapshots");
    }
    set_refs(&mut value, keep);
    Ok((value, parts))
}

/// Adds `refs` to a record's JSON (`snapshots`, merged with those there) and sets its version:
/// [`crate::txn::RECORD_VERSION`] when it refers to snapshots, else
/// [`crate::txn::INLINE_RECORD_VERSION`] (readable by an older ctguard). Pure.
fn set_refs(value: &mut Value, refs: Vec<(String, SnapshotRef)>) {
    let Some(o) = value.as_object_mut() else { return };
    let mut map = match o.remove("snapshots") {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    for (pointer, r) in refs {
        map.insert(pointer, serde_json::to_value(r).unwrap_or(Value::Null));
    }
    let version = if map.is_empty() { crate::txn::INLINE_RECORD_VERSION } else { crate::txn::RECORD_VERSION };
    o.insert("version".into(), Value::from(version));
    if !map.is_empty() {
        o.insert("snapshots".into(), Value::Object(map));
    }
}

/// Which records [`Journal::prune_to`] deletes (indexes into `records`, which are in creation
/// order): the oldest finished ones that are not protected, until at most `keep` finished
/// remain and the bytes (record `sizes` plus the snapshots still referred to, each once, by
/// `snaps` sizes) are at most `keep_bytes`. Protected: unfinished records and the newest
/// committed record of each target. Pure.
fn prune_plan(
    records: &[TxnRecord],
    sizes: &[u64],
    snaps: &std::collections::HashMap<String, (u64, SystemTime)>,
    keep: usize,
    keep_bytes: u64,
) -> Vec<usize> {
    use std::collections::{HashMap, HashSet};
    let mut newest_committed: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if r.state == crate::txn::State::Committed {
            newest_committed.insert((r.target.dev, r.target.ino), i);
        }
    }
    let protected: HashSet<usize> = newest_committed.into_values().collect();
    let mut refcount: HashMap<&str, usize> = HashMap::new();
    for r in records {
        let unique: HashSet<&str> = r.snapshots.values().map(|s| s.sha256.as_str()).collect();
        for sha in unique {
            *refcount.entry(sha).or_default() += 1;
        }
    }
    let snap_size = |sha: &str| snaps.get(sha).map_or(0, |(n, _)| *n);
    let mut bytes: u64 = sizes.iter().sum::<u64>() + refcount.keys().map(|s| snap_size(s)).sum::<u64>();
    let mut finished = records.iter().filter(|r| r.state.is_finished()).count();
    let mut plan = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if finished <= keep && bytes <= keep_bytes {
            break;
        }
        if !r.state.is_finished() || protected.contains(&i) {
            continue;
        }
        plan.push(i);
        finished -= 1;
        bytes = bytes.saturating_sub(sizes.get(i).copied().unwrap_or(0));
        let unique: HashSet<&str> = r.snapshots.values().map(|s| s.sha256.as_str()).collect();
        for sha in unique {
            if let Some(n) = refcount.get_mut(sha) {
                *n -= 1;
                if *n == 0 {
                    bytes = bytes.saturating_sub(snap_size(sha));
                }
            }
        }
    }
    plan
}

fn snapshot_error(record: &Path, pointer: &str, path: PathBuf, why: String) -> JournalError {
    JournalError::Snapshot {
        record: record.to_path_buf(),
        pointer: crate::exit::escape_for_terminal(pointer).into_owned(),
        path,
        why,
    }
}

/// Why a snapshot file could not be used, for [`JournalError::Snapshot`].
fn describe_open(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "is missing".to_string(),
        _ if e.raw_os_error() == Some(libc::ELOOP) => "is a symlink; not followed".to_string(),
        _ => format!("cannot be used: {e}"),
    }
}

/// Sets the mtime of `path` (never a symlink's target) to now; best effort.
fn touch(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return };
    // SAFETY: a valid NUL-terminated path; a null `times` means "now" for both.
    unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), libc::AT_SYMLINK_NOFOLLOW);
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
        // The newest committed record of a target stays (the guard's and the next apply's).
        assert_eq!(j.prune(0).expect("prune all finished"), 1);
        let left: Vec<TxnRecord> = j.list().expect("list");
        assert_eq!(left.len(), 3);
        assert_eq!(left.iter().filter(|r| r.state.is_finished()).map(|r| &r.id).collect::<Vec<_>>(), [&finished[5].id]);
        assert_eq!(j.prune(DEFAULT_KEEP).expect("prune default"), 0);
    }

    /// `lines` lines of an iptables dump, different for each `seed` (hashes make it compress
    /// like a real blocklist, not like a repeated line).
    fn big_text(seed: u64, lines: usize) -> String {
        let mut out = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
        for i in 0..lines {
            let h = crate::compress::sha256_hex(format!("{seed}-{i}").as_bytes());
            out.push_str(&format!(
                "-A INPUT -s 10.{}.{}.0/24 -m comment --comment \"{}\" -j DROP\n",
                (i >> 8) & 255,
                i & 255,
                &h[..16]
            ));
        }
        out.push_str("COMMIT\n");
        out
    }

    /// A finished ruleset transaction: `before` → `after`, with an undo record holding the
    /// snapshot of `before` (as the agent journals it).
    fn ruleset_rec(wall: u64, rand: u32, before: &str, after: &str) -> TxnRecord {
        use crate::agent::engine::Undo;
        use crate::snapshot::{FwState, NftTable, SaveText, Snapshot, UndoRecord, SNAPSHOT_VERSION};
        let mut r = committed(rec(wall, rand, 77));
        r.kind = Kind::Ruleset;
        r.ruleset = Some(after.to_string());
        r.before = Some(before.to_string());
        r.after = Some(after.to_string());
        let state = FwState {
            genid: Some(7),
            nft: vec![NftTable {
                family: "ip".into(),
                name: "filter".into(),
                text: format!("table ip filter {{\n{before}}}\n"),
                xt: false,
            }],
            saves: vec![SaveText { variant: crate::live::fw::IptVariant::Nft, v6: false, text: before.to_string() }],
            ipsets: Some("create small hash:ip\n".into()),
        };
        let snapshot = Snapshot { version: SNAPSHOT_VERSION, state, iptables_nft: vec![] };
        r.undo = Undo::Ruleset(Box::new(UndoRecord::planned(snapshot, BTreeMap::new()))).to_value();
        r
    }

    fn snapshot_names(j: &Journal) -> Vec<String> {
        names(j.snapshot_dir()).into_iter().filter(|n| n.ends_with(".zst")).collect()
    }

    fn age(path: &Path, by: Duration) {
        File::options().write(true).open(path).expect("open").set_modified(SystemTime::now() - by).expect("mtime");
    }

    use std::collections::BTreeMap;

    #[test]
    fn large_parts_are_stored_apart_once_compressed() {
        use crate::agent::engine::Undo;
        use std::os::unix::fs::PermissionsExt;
        let t = TempDir::new("apart");
        let j = Journal::open(&t.0).expect("open");
        let (a, b, c) = (big_text(1, 2000), big_text(2, 2000), big_text(3, 2000));
        let r1 = ruleset_rec(1_700_000_000, 1, &a, &b);
        let r2 = ruleset_rec(1_700_000_010, 2, &b, &c);
        j.write(&r1).expect("write");
        j.write(&r2).expect("write");
        // The record file is the index entry: small, version 2, referring to its parts.
        let file = fs::read(j.record_path(&r1.id)).expect("record");
        assert!(file.len() < 8 << 10, "record file is {} bytes", file.len());
        let v: Value = serde_json::from_slice(&file).expect("json");
        assert_eq!(v["version"], 2);
        assert!(v["before"].is_null() && v["after"].is_null() && v["ruleset"].is_null(), "{v}");
        assert!(v["undo"]["snapshot"]["state"]["saves"][0]["text"].is_null(), "{v}");
        assert_eq!(v["undo"]["snapshot"]["state"]["ipsets"], "create small hash:ip\n", "short parts stay inline");
        let refs = v["snapshots"].as_object().expect("snapshots");
        assert!(refs.contains_key("/undo/snapshot/state/nft/0/text"), "{refs:?}");
        // Stored once: r1's after, r1's ruleset and r2's before are one file; r2's undo holds
        // `b` too (its save text). Texts: a, b, c, and the two nft table texts.
        let files = snapshot_names(&j);
        assert_eq!(files.len(), 5, "{files:?}");
        let raw = a.len() + b.len() + c.len();
        let on_disk: u64 = files.iter().map(|f| fs::metadata(j.snapshot_dir().join(f)).expect("meta").len()).sum();
        assert!(on_disk * 2 < raw as u64, "compressed: {on_disk} of {raw}");
        for f in &files {
            let m = fs::metadata(j.snapshot_dir().join(f)).expect("meta");
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
        }
        // Whole again when loaded; an index entry when listed.
        assert_eq!(j.load(&r1.id).expect("load"), r1);
        assert_eq!(j.load(&r2.id).expect("load"), r2);
        let entries = j.list().expect("list");
        assert_eq!(entries.len(), 2);
        let mut e = entries[0].clone();
        assert!(!e.is_whole() && e.before.is_none() && e.ruleset.is_none());
        assert!(Undo::from_record(Kind::Ruleset, &e.undo).is_err(), "an index entry cannot be rolled back");
        assert!(Undo::from_record(Kind::Ruleset, &r1.undo).is_ok());
        j.resolve(&mut e).expect("resolve");
        assert_eq!(e, r1);
        // Writing the same records again changes nothing.
        j.write(&r1).expect("again");
        assert_eq!(snapshot_names(&j), files);
        assert_eq!(fs::read(j.record_path(&r1.id)).expect("record"), file);
        // A record with nothing large stays version 1 (readable by an older ctguard).
        let small = rec(1_700_000_020, 3, 5);
        j.write(&small).expect("write");
        let v: Value = serde_json::from_slice(&fs::read(j.record_path(&small.id)).expect("r")).expect("json");
        assert_eq!(v["version"], 1);
        assert!(v.get("snapshots").is_none());
        assert_eq!(j.load(&small.id).expect("load"), small);
    }

    #[test]
    fn an_index_entry_written_back_keeps_its_snapshots() {
        let t = TempDir::new("entry");
        let j = Journal::open(&t.0).expect("open");
        let mut r = ruleset_rec(1_700_000_000, 1, &big_text(1, 500), &big_text(2, 500));
        r.state = State::Pending;
        j.write(&r).expect("write");
        // As `ctguard recover` does: an index entry, closed and written back.
        let mut e = j.load_entry(&r.id).expect("entry");
        assert!(!e.is_whole());
        e.to_rolled_back(Reason::Reboot, 1_700_000_100).expect("close");
        j.write(&e).expect("write entry");
        let back = j.load(&r.id).expect("load");
        assert_eq!(back.before, r.before);
        assert_eq!(back.undo, r.undo);
        assert_eq!(back.state, State::RolledBack { reason: Reason::Reboot });
        // A part set in memory replaces its snapshot.
        let mut e = j.load_entry(&r.id).expect("entry");
        let new_after = big_text(9, 500);
        e.after = Some(new_after.clone());
        j.write(&e).expect("write");
        let back = j.load(&r.id).expect("load");
        assert_eq!(back.after.as_deref(), Some(new_after.as_str()));
        assert_eq!(back.ruleset, r.ruleset);
    }

    #[test]
    fn records_of_the_previous_format_load_and_are_stored_apart_when_written() {
        let t = TempDir::new("old");
        let j = Journal::open(&t.0).expect("open");
        let mut r = ruleset_rec(1_700_000_000, 1, &big_text(1, 1000), &big_text(2, 1000));
        r.state = State::Pending;
        // The previous format: everything inline, version 1, written by an older ctguard.
        let mut v = serde_json::to_value(&r).expect("json");
        v["version"] = 1.into();
        fs::write(j.record_path(&r.id), serde_json::to_vec_pretty(&v).expect("bytes")).expect("write");
        assert_eq!(j.load(&r.id).expect("load"), r);
        assert_eq!(j.list().expect("list"), vec![r.clone()], "an old record is whole in the index");
        assert_eq!(j.scan().expect("scan").records, vec![r.clone()]);
        assert!(snapshot_names(&j).is_empty());
        j.write(&r).expect("write");
        assert!(!snapshot_names(&j).is_empty());
        assert_eq!(j.load(&r.id).expect("load"), r);
        // A state dir from before snapshots, attached (as `ctguard recover` does): its
        // directory is made at the first write that needs it.
        let t2 = TempDir::new("old2");
        fs::create_dir(t2.0.join("txn")).expect("mkdir");
        let j2 = Journal::attach(&t2.0).expect("attach");
        j2.write(&r).expect("write");
        assert_eq!(j2.load(&r.id).expect("load"), r);
    }

    #[test]
    fn damaged_snapshots_make_the_record_damaged() {
        use std::os::unix::fs::PermissionsExt;
        for damage in ["missing", "nobody", "world-writable", "symlink", "garbage", "other bytes"] {
            let t = TempDir::new("damage");
            let j = Journal::open(&t.0).expect("open");
            let mut r = ruleset_rec(1_700_000_000, 1, &big_text(1, 800), &big_text(2, 800));
            r.state = State::Pending;
            j.write(&r).expect("write");
            let done = ruleset_rec(1_700_000_010, 2, &big_text(3, 800), &big_text(4, 800));
            j.write(&done).expect("write");
            let entry = j.load_entry(&r.id).expect("entry");
            let sha = entry.snapshots["/before"].sha256.clone();
            let path = j.snapshot_path(&sha);
            let other = t.0.join("elsewhere.zst");
            fs::copy(&path, &other).expect("copy");
            match damage {
                "missing" => fs::remove_file(&path).expect("rm"),
                "nobody" => nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown"),
                "world-writable" => fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod"),
                "symlink" => {
                    fs::remove_file(&path).expect("rm");
                    std::os::unix::fs::symlink(&other, &path).expect("symlink");
                }
                "garbage" => {
                    let len = fs::metadata(&path).expect("meta").len() as usize;
                    fs::write(&path, vec![b'x'; len]).expect("write");
                }
                _ => {
                    // A valid frame of other bytes, its size written into the record: only
                    // the hash can tell.
                    let z = crate::compress::compress(big_text(5, 800).as_bytes()).expect("z");
                    fs::write(&path, &z).expect("write");
                    let rp = j.record_path(&r.id);
                    let mut v: Value = serde_json::from_slice(&fs::read(&rp).expect("r")).expect("json");
                    for (_, r) in v["snapshots"].as_object_mut().expect("refs").iter_mut() {
                        if r["sha256"] == sha.as_str() {
                            r["stored"] = (z.len() as u64).into();
                        }
                    }
                    fs::write(&rp, serde_json::to_vec(&v).expect("bytes")).expect("write");
                }
            }
            let is_snapshot_error = |e: &JournalError| matches!(e, JournalError::Snapshot { .. });
            // Acting on it: refused, naming the record and the part.
            let e = j.load(&r.id).expect_err(damage);
            assert!(is_snapshot_error(&e), "{damage}: {e:?}");
            assert!(e.to_string().contains(r.id.as_str()) && e.to_string().contains("/before"), "{e}");
            let mut en = j.load_entry(&r.id).expect("entry");
            let before = en.clone();
            assert!(j.resolve(&mut en).is_err(), "{damage}");
            assert_eq!(en, before, "{damage}: a failed resolve leaves the entry as it was");
            // Recovery and status list it as damaged, never as a record to act on.
            for (what, scan) in [("scan", j.scan().expect("scan")), ("scan_index", j.scan_index().expect("scan"))] {
                assert_eq!(scan.records.iter().map(|x| &x.id).collect::<Vec<_>>(), [&done.id], "{damage}: {what}");
                assert!(scan.skipped.iter().any(is_snapshot_error), "{damage}: {what}: {:?}", scan.skipped);
            }
            // The cheap index check (one lstat) sees all but a file of the right size.
            let listed = j.list().expect("list");
            let same_size = matches!(damage, "garbage" | "other bytes");
            assert_eq!(listed.len(), if same_size { 2 } else { 1 }, "{damage}");
            // The other record is untouched.
            assert_eq!(j.load(&done.id).expect("load"), done);
            // Writing the record again from memory (the agent's copy) repairs it.
            let _ = fs::remove_file(&path);
            j.write(&r).expect("rewrite");
            assert_eq!(j.load(&r.id).expect("load"), r, "{damage}");
        }
    }

    #[test]
    fn prune_bounds_bytes_and_removes_unreferenced_snapshots() {
        let t = TempDir::new("bytes");
        let j = Journal::open(&t.0).expect("open");
        // A pending transaction older than all, with a large part: never pruned.
        let mut p = ruleset_rec(1_600_000_000, 0xaa, &big_text(100, 3000), &big_text(101, 3000));
        p.state = State::Pending;
        j.write(&p).expect("write");
        let mut all = Vec::new();
        for i in 0..8u64 {
            let r = ruleset_rec(1_700_000_000 + i * 10, i as u32, &big_text(i, 3000), &big_text(i + 1, 3000));
            j.write(&r).expect("write");
            all.push(r);
        }
        let total = j.disk_bytes();
        // Each finished record's own snapshots: about an eighth of the total.
        let bound = total / 3;
        let removed = j.prune_to(DEFAULT_KEEP, bound).expect("prune");
        assert!((4..8).contains(&removed), "removed {removed} of 8 (total {total}, bound {bound})");
        let left = j.list().expect("list");
        assert_eq!(left[0].id, p.id, "the pending record stays");
        assert_eq!(left.last().map(|r| &r.id), Some(&all[7].id), "the newest stay");
        assert!(j.disk_bytes() <= bound, "{} > {bound}", j.disk_bytes());
        // Exactly the snapshots the records left refer to remain.
        let mut referenced: Vec<String> =
            left.iter().flat_map(|r| r.snapshots.values().map(|s| format!("{}.zst", s.sha256))).collect();
        referenced.sort();
        referenced.dedup();
        assert_eq!(snapshot_names(&j), referenced);
        for r in &left {
            j.load(&r.id).expect("every record left is whole");
        }
        assert_eq!(j.prune_to(DEFAULT_KEEP, bound).expect("again"), 0, "idempotent");
        // A crash between a snapshot and its record leaves one no record refers to: kept
        // while it may be a write in progress, removed once older than the grace.
        let orphan = j.snapshot_path(&crate::compress::sha256_hex(b"orphan"));
        fs::write(&orphan, crate::compress::compress(b"orphan").expect("z")).expect("write");
        let tmp = j.snapshot_dir().join(format!(".{}.zst.tmp", crate::compress::sha256_hex(b"torn")));
        fs::write(&tmp, b"torn").expect("write");
        j.prune_to(DEFAULT_KEEP, bound).expect("prune");
        assert!(orphan.exists() && tmp.exists(), "fresh files may belong to a write in progress");
        age(&orphan, SNAPSHOT_GRACE + Duration::from_secs(5));
        age(&tmp, STALE_TMP_AGE + Duration::from_secs(5));
        j.prune_to(DEFAULT_KEEP, bound).expect("prune");
        assert!(!orphan.exists(), "an orphan snapshot is removed");
        assert!(!tmp.exists(), "a stale snapshot temp file is removed");
        // A bound nothing can meet: only unfinished and newest committed records are left.
        j.prune_to(DEFAULT_KEEP, 0).expect("prune");
        let ids: Vec<TxnId> = j.list().expect("list").into_iter().map(|r| r.id).collect();
        assert_eq!(ids, [p.id.clone(), all[7].id.clone()]);
        assert_eq!(j.load(&p.id).expect("pending whole"), p);
    }

    #[test]
    fn prune_plan_is_pure_and_counts_shared_snapshots_once() {
        let snap = |sha: &str| SnapshotRef { sha256: sha.into(), bytes: 1, stored: 100, json: false };
        let mut recs = Vec::new();
        for i in 0..4u64 {
            let mut r = committed(rec(1_700_000_000 + i, i as u32, 1));
            r.snapshots.insert("/before".into(), snap(&"a".repeat(64)));
            r.snapshots.insert("/after".into(), snap(&format!("{i}").repeat(64)));
            recs.push(r);
        }
        let mut snaps = std::collections::HashMap::new();
        snaps.insert("a".repeat(64), (1000u64, UNIX_EPOCH));
        for i in 0..4 {
            snaps.insert(format!("{i}").repeat(64), (100u64, UNIX_EPOCH));
        }
        let sizes = [10u64; 4];
        // 40 + 1000 + 400 bytes.
        assert!(prune_plan(&recs, &sizes, &snaps, 10, 1440).is_empty());
        assert_eq!(prune_plan(&recs, &sizes, &snaps, 10, 1400), [0]);
        assert_eq!(prune_plan(&recs, &sizes, &snaps, 2, 10_000), [0, 1]);
        // The shared snapshot goes with the last record referring to it — never the newest
        // committed one's.
        assert_eq!(prune_plan(&recs, &sizes, &snaps, 10, 0), [0, 1, 2]);
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
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root for mounts in a private mount namespace; run the suite as README.md says"
        );
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
