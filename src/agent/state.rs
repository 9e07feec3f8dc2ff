//! The agent's shared state: one [`Owner`] per target namespace, through which every state
//! change of that target's transactions goes (DESIGN §2 "One owner per target"), the worker
//! threads, and what the idle check and the descriptor reserve need.
//!
//! An owner has two locks with two jobs:
//! - `slot` (a plain mutex, never held across an `.await`): what is going on now — the
//!   in-memory copy of the unfinished transaction and its phase. Claiming a target is a
//!   check-and-set on it, so two applies can never both win.
//! - `op` (an async mutex, held for a whole operation): serializes apply, confirm, extend,
//!   rollback, the deadline, probe rounds, recovery and signals of that target. A confirm that
//!   meets a running rollback waits for it, then sees its outcome.
//!
//! While the agent lives, the in-memory record is authoritative: a damaged journal file never
//! disarms a timer or hides a pending transaction.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::engine::Engines;
use super::worker::Worker;
use crate::journal::{self, Journal};
use crate::netns::Target;
use crate::txn::{Reason, TxnRecord};
use serde_json::Value;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Socket, lock, pins and log live here.
    pub run_dir: PathBuf,
    /// The journal.
    pub state_dir: PathBuf,
    /// Started by the CLI: exits once nothing is unfinished, no request is in flight and no
    /// client came for `idle_exit`.
    pub detached: bool,
    /// See `detached`.
    pub idle_exit: Duration,
}

/// A target namespace: device and inode of its nsfs file.
pub type TargetId = (u64, u64);

/// What the owner is doing with its unfinished transaction (the journaled states say where it
/// stands after a crash; the phases say what is happening now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Claimed: being prepared, applied, checked (the journal says PREPARED, or nothing yet).
    Applying,
    /// Applied and armed: waiting for a confirm or the deadline.
    Pending,
    /// A rollback is running.
    RollingBack,
    /// A rollback failed; it is retried with backoff until it succeeds.
    RollbackOwed {
        /// Failed attempts so far.
        attempts: u32,
        /// The last failure.
        error: String,
        /// Why it is rolled back.
        reason: Reason,
    },
    /// The kernel is back to the prior state but the journal could not record that (disk
    /// full): the target refuses new work until the record is written (retried).
    Wedged {
        /// The journal error.
        error: String,
    },
    /// The guard puts a committed policy's missing objects back.
    Repairing,
}

impl Phase {
    /// Short name for `status` and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Applying => "applying",
            Phase::Pending => "pending",
            Phase::RollingBack => "rolling back",
            Phase::RollbackOwed { .. } => "rollback owed",
            Phase::Wedged { .. } => "journal unwritable",
            Phase::Repairing => "repairing",
        }
    }
}

/// A transaction record as the agent holds it between operations (issue 16): the small fields
/// as they are, the large payloads — the listings before and after, the ruleset file, a large
/// undo record or policy (a ruleset transaction's snapshot) — zstd-compressed. Nothing of the
/// live state, the plan or the prepared transaction is held: only what the record says.
/// [`HeldRecord::record`] gives the whole record back, byte for byte what was packed.
#[derive(Debug, Clone)]
pub struct HeldRecord {
    /// The record with its large payloads taken out (`None` / `Null` there).
    head: TxnRecord,
    /// The payloads taken out, compressed.
    packed: Vec<Packed>,
}

/// A payload field of a record that may be held compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Before,
    After,
    Ruleset,
    Undo,
    Policy,
}

#[derive(Debug, Clone)]
struct Packed {
    field: Field,
    raw_len: usize,
    zst: Vec<u8>,
}

/// Payloads smaller than this stay as they are (compressing them saves nothing worth the time).
pub const PACK_MIN_BYTES: usize = 4096;

/// Held payloads use the journal's compression ([`crate::compress`]: zstd level 3).
fn zstd_pack(raw: &[u8]) -> Option<Vec<u8>> {
    crate::compress::compress(raw).ok()
}

fn zstd_unpack(zst: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let out = crate::compress::decompress(zst).map_err(|e| e.to_string())?;
    if out.len() != raw_len {
        return Err(format!("held payload is {} bytes, {raw_len} were packed", out.len()));
    }
    Ok(out)
}

impl HeldRecord {
    /// Holds `rec`, its large payloads compressed (a payload that cannot be compressed stays
    /// as it is).
    pub fn pack(mut rec: TxnRecord) -> HeldRecord {
        let mut packed = Vec::new();
        let mut text = |field: Field, slot: &mut Option<String>| {
            if slot.as_ref().is_some_and(|t| t.len() >= PACK_MIN_BYTES) {
                if let Some(t) = slot.take() {
                    match zstd_pack(t.as_bytes()) {
                        Some(zst) => packed.push(Packed { field, raw_len: t.len(), zst }),
                        None => *slot = Some(t),
                    }
                }
            }
        };
        text(Field::Before, &mut rec.before);
        text(Field::After, &mut rec.after);
        text(Field::Ruleset, &mut rec.ruleset);
        let mut value = |field: Field, slot: &mut Value| {
            if slot.is_null() {
                return;
            }
            let Ok(raw) = serde_json::to_vec(slot) else { return };
            if raw.len() >= PACK_MIN_BYTES {
                if let Some(zst) = zstd_pack(&raw) {
                    packed.push(Packed { field, raw_len: raw.len(), zst });
                    *slot = Value::Null;
                }
            }
        };
        value(Field::Undo, &mut rec.undo);
        if let Some(p) = rec.policy.as_mut() {
            value(Field::Policy, p);
        }
        HeldRecord { head: rec, packed }
    }

    /// The record without its large payloads: id, kind, state, target, deadline, requester,
    /// events… (what `status`, the timer and the target need).
    pub fn head(&self) -> &TxnRecord {
        &self.head
    }

    /// The whole record, payloads decompressed. An error means the held copy is damaged
    /// (memory corruption): the journal holds the last written record.
    pub fn record(&self) -> Result<TxnRecord, String> {
        let mut rec = self.head.clone();
        for p in &self.packed {
            let raw = zstd_unpack(&p.zst, p.raw_len)?;
            let slot = match p.field {
                Field::Before => &mut rec.before,
                Field::After => &mut rec.after,
                Field::Ruleset => &mut rec.ruleset,
                Field::Undo => {
                    rec.undo = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
                    continue;
                }
                Field::Policy => {
                    rec.policy = Some(serde_json::from_slice(&raw).map_err(|e| e.to_string())?);
                    continue;
                }
            };
            *slot = Some(String::from_utf8(raw).map_err(|e| e.to_string())?);
        }
        Ok(rec)
    }

    /// Bytes held for the payloads (compressed), and what they are uncompressed.
    pub fn payload_bytes(&self) -> (usize, usize) {
        self.packed.iter().fold((0, 0), |(z, r), p| (z + p.zst.len(), r + p.raw_len))
    }
}

/// Gives the memory the allocator keeps free back to the operating system (glibc's
/// `malloc_trim`): after an apply or a rollback, whose reads and plans are freed but would
/// otherwise stay in the process's resident set. Best effort; a no-op elsewhere.
pub fn release_memory() {
    let _lap = crate::timing::Lap::start("agent: release memory (malloc_trim)");
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A [`release_memory`] asked for by a verb whose answer is not written yet.
static RELEASE_AFTER_ANSWER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long a [`release_memory_after_answer`] waits for an answer to be written before it
/// releases anyway (a deadline's rollback or a probe's commit answers nobody).
const RELEASE_FALLBACK: std::time::Duration = std::time::Duration::from_millis(200);

/// [`release_memory`] once the verb's answer is written ([`take_release_after_answer`], the
/// server's part), not before: `malloc_trim` holds the allocator's lock while it walks the
/// free memory (2 ms after a 10k-rule apply, 11 ms after a 100k-rule one), and the answer
/// would wait for it. Without an answer to write, on a thread of its own after
/// [`RELEASE_FALLBACK`]. Best effort.
pub fn release_memory_after_answer() {
    use std::sync::atomic::Ordering;
    RELEASE_AFTER_ANSWER.store(true, Ordering::SeqCst);
    let _ = std::thread::Builder::new().name("release-memory".into()).spawn(|| {
        std::thread::sleep(RELEASE_FALLBACK);
        if take_release_after_answer() {
            release_memory();
        }
    });
}

/// True (once) when a verb asked for [`release_memory_after_answer`]: the server releases
/// after writing its answer.
pub fn take_release_after_answer() -> bool {
    RELEASE_AFTER_ANSWER.swap(false, std::sync::atomic::Ordering::SeqCst)
}

/// Allocator settings of the agent, before its threads start: one malloc arena for every
/// thread. The worker threads' reads and plans then come from the main heap, whose free top
/// [`release_memory`] gives back (glibc never trims the top of a thread's own arena), so a
/// target's worker does not keep its prepare's peak after the transaction. The agent's threads
/// rarely allocate at the same time. Best effort; a no-op elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The unfinished transaction of a target, in memory.
#[derive(Debug)]
pub struct Current {
    /// The record as last decided (also when the journal could not store it), its large
    /// payloads compressed.
    pub rec: HeldRecord,
    /// What is happening now.
    pub phase: Phase,
    /// The armed dead-man timer (PENDING only).
    pub timer: Option<tokio::task::AbortHandle>,
    /// The last journal write or read that failed for this record, if any.
    pub journal_error: Option<String>,
}

/// What the guard of a committed policy has seen (DESIGN §2 "Guard of committed policies").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardState {
    /// Every object in place.
    Intact,
    /// Objects went missing and were put back.
    Repaired {
        /// How many times (since the agent started).
        count: u32,
        /// When last (wall-clock seconds).
        last_wall: u64,
        /// From the notification to the objects back, last time (ms).
        last_gap_ms: u64,
    },
    /// Putting them back would have widened access (or been refused): ctguard's NOTRACK
    /// objects were removed instead so the service runs tracked; an operator must act.
    Degraded {
        /// Why.
        reason: String,
        /// When (wall-clock seconds).
        wall: u64,
    },
}

/// The guard of a target's committed policy.
#[derive(Debug)]
pub struct Guard {
    /// The committed transaction guarded.
    pub txid: String,
    /// Its target's label.
    pub target: String,
    /// What it has seen.
    pub state: GuardState,
    /// The last check that failed (a target unreachable, a repair refused by the kernel).
    pub last_error: Option<String>,
    /// Wakes the guard for a check (after a transaction on the target ended).
    pub wake: Arc<tokio::sync::Notify>,
    /// Its task.
    pub task: Option<tokio::task::AbortHandle>,
}

/// The single owner of one target's transactions.
#[derive(Debug)]
pub struct Owner {
    /// The target.
    pub id: TargetId,
    /// Held for a whole operation on this target (see the module doc).
    pub op: tokio::sync::Mutex<()>,
    slot: Mutex<Option<Current>>,
    guard: Mutex<Option<Guard>>,
}

impl Owner {
    fn new(id: TargetId) -> Owner {
        Owner { id, op: tokio::sync::Mutex::new(()), slot: Mutex::new(None), guard: Mutex::new(None) }
    }

    /// The guard (never hold the guard across an `.await`).
    pub fn guard(&self) -> MutexGuard<'_, Option<Guard>> {
        self.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops and forgets the guard, if any.
    pub fn stop_guard(&self) {
        if let Some(g) = self.guard().take() {
            if let Some(t) = g.task {
                t.abort();
            }
        }
    }

    /// The slot (never hold the guard across an `.await`).
    pub fn slot(&self) -> MutexGuard<'_, Option<Current>> {
        self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current transaction's id and phase, if any.
    pub fn current(&self) -> Option<(String, Phase)> {
        self.slot().as_ref().map(|c| (c.rec.head().id.as_str().to_string(), c.phase.clone()))
    }

    /// True when `txid` is this owner's current transaction.
    pub fn holds(&self, txid: &str) -> bool {
        self.slot().as_ref().is_some_and(|c| c.rec.head().id.as_str() == txid)
    }

    /// A copy of the whole current record (payloads decompressed) when it is `txid`. `None`
    /// also when the held copy cannot be decompressed (logged; the journal holds the last
    /// written record).
    pub fn record(&self, txid: &str) -> Option<TxnRecord> {
        let held = self.slot().as_ref().filter(|c| c.rec.head().id.as_str() == txid).map(|c| c.rec.clone())?;
        match held.record() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(txid, "the in-memory record cannot be decompressed: {e}");
                None
            }
        }
    }

    /// The current record without its large payloads (see [`HeldRecord::head`]) when it is
    /// `txid`.
    pub fn head(&self, txid: &str) -> Option<TxnRecord> {
        self.slot().as_ref().filter(|c| c.rec.head().id.as_str() == txid).map(|c| c.rec.head().clone())
    }

    /// Replaces the current record when it is `txid` (compressed outside the lock).
    pub fn set_record(&self, rec: &TxnRecord) -> bool {
        let held = HeldRecord::pack(rec.clone());
        self.update(rec.id.as_str(), |c| c.rec = held)
    }

    /// Updates the current transaction when it is `txid`; returns whether it was.
    pub fn update(&self, txid: &str, f: impl FnOnce(&mut Current)) -> bool {
        match self.slot().as_mut() {
            Some(c) if c.rec.head().id.as_str() == txid => {
                f(c);
                true
            }
            _ => false,
        }
    }

    /// Ends the current transaction when it is `txid` (its timer cancelled).
    pub fn release(&self, txid: &str) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|c| c.rec.head().id.as_str() == txid) {
            if let Some(t) = slot.as_mut().and_then(|c| c.timer.take()) {
                t.abort();
            }
            *slot = None;
        }
        drop(slot);
        // The guard checks again now that nothing holds the target.
        if let Some(g) = self.guard().as_ref() {
            g.wake.notify_one();
        }
    }
}

/// Why a claim lost: the transaction that holds the target.
#[derive(Debug, Clone)]
pub struct Busy {
    /// Its id.
    pub txid: String,
    /// Its phase.
    pub phase: Phase,
    /// Seconds to its deadline, when it has one.
    pub seconds_left: Option<u64>,
}

/// Everything the agent's tasks share.
pub struct Shared {
    /// How the agent runs.
    pub opts: AgentOptions,
    /// The transaction kinds.
    pub engines: Engines,
    /// The journal.
    pub journal: Journal,
    /// This boot.
    pub boot_id: String,
    owners: Mutex<HashMap<TargetId, Arc<Owner>>>,
    workers: Mutex<HashMap<TargetId, Worker>>,
    /// Requests being served now (the agent never exits while one is).
    pub in_flight: AtomicUsize,
    last_activity: Mutex<Instant>,
    /// Woken (after `idle_exit`) when a request or a transaction ended: a detached agent then
    /// checks whether it may exit. No periodic wake-ups.
    pub idle: tokio::sync::Notify,
    /// Descriptors held in reserve and given back while a rollback runs, so a flood of clients
    /// can never leave the rollback without descriptors.
    spare_fds: Mutex<Vec<OwnedFd>>,
}

/// Descriptors kept in reserve for rollbacks (pipes of the restore tools, a netlink socket).
pub const SPARE_FDS: usize = 16;

impl Shared {
    /// The shared state of a starting agent.
    pub fn new(opts: AgentOptions, engines: Engines, journal: Journal, boot_id: String) -> Shared {
        tune_allocator();
        let s = Shared {
            opts,
            engines,
            journal,
            boot_id,
            owners: Mutex::new(HashMap::new()),
            workers: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            last_activity: Mutex::new(Instant::now()),
            idle: tokio::sync::Notify::new(),
            spare_fds: Mutex::new(Vec::new()),
        };
        s.refill_spare_fds();
        s
    }

    fn owners(&self) -> MutexGuard<'_, HashMap<TargetId, Arc<Owner>>> {
        self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The owner of `id`, created on first use.
    pub fn owner(&self, id: TargetId) -> Arc<Owner> {
        self.owners().entry(id).or_insert_with(|| Arc::new(Owner::new(id))).clone()
    }

    /// Claims `id` for `rec` atomically: at most one unfinished transaction per target. The
    /// loser learns which transaction holds the target. Nothing is read before this.
    pub fn claim(&self, id: TargetId, rec: TxnRecord) -> Result<Arc<Owner>, Busy> {
        let owner = self.owner(id);
        let held = HeldRecord::pack(rec);
        let mut slot = owner.slot();
        if let Some(c) = slot.as_ref() {
            return Err(Busy {
                txid: c.rec.head().id.as_str().to_string(),
                phase: c.phase.clone(),
                seconds_left: c.rec.head().seconds_left(journal::boottime_ns()),
            });
        }
        *slot = Some(Current { rec: held, phase: Phase::Applying, timer: None, journal_error: None });
        drop(slot);
        Ok(owner)
    }

    /// The owner whose current transaction is `txid`.
    pub fn owner_of(&self, txid: &str) -> Option<Arc<Owner>> {
        self.owners().values().find(|o| o.holds(txid)).cloned()
    }

    /// Every owner that has an unfinished transaction.
    pub fn busy_owners(&self) -> Vec<Arc<Owner>> {
        let mut v: Vec<Arc<Owner>> = self.owners().values().filter(|o| o.current().is_some()).cloned().collect();
        v.sort_by_key(|o| o.record_created());
        v
    }

    /// True when no target has unfinished work and no request is being served.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.owners().values().all(|o| o.current().is_none() && o.guard().is_none())
    }

    /// Every owner that guards a committed policy.
    pub fn guarding_owners(&self) -> Vec<Arc<Owner>> {
        self.owners().values().filter(|o| o.guard().is_some()).cloned().collect()
    }

    /// Notes activity (a request started or ended).
    pub fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    /// Time since the last activity.
    pub fn quiet_for(&self) -> std::time::Duration {
        self.last_activity.lock().unwrap_or_else(std::sync::PoisonError::into_inner).elapsed()
    }

    /// The worker of `target`, started on first use.
    pub fn worker(&self, target: Target) -> Result<Worker, String> {
        let id = target.id;
        let mut workers = self.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(w) = workers.get(&id) {
            return Ok(w.clone());
        }
        let w = Worker::spawn(target, format!("ctguard-ns-{}", id.1)).map_err(|e| e.to_string())?;
        workers.insert(id, w.clone());
        Ok(w)
    }

    /// Gives the reserved descriptors back to the process (before a rollback).
    pub fn release_spare_fds(&self) {
        self.spare_fds.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    /// Takes the reserve again (best effort; after a rollback and at start).
    pub fn refill_spare_fds(&self) {
        let mut spare = self.spare_fds.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while spare.len() < SPARE_FDS {
            match std::fs::File::open("/dev/null") {
                Ok(f) => spare.push(OwnedFd::from(f)),
                Err(_) => break,
            }
        }
    }
}

impl Owner {
    fn record_created(&self) -> (u64, String) {
        self.slot()
            .as_ref()
            .map(|c| (c.rec.head().created_wall, c.rec.head().id.as_str().to_string()))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txn::{Kind, Requester, TargetRecord, TxnId};

    fn listing(tag: &str, lines: usize) -> String {
        (0..lines)
            .map(|i| format!("\t\tip saddr @trusted4 tcp dport {} ct state new accept # {tag}\n", 1024 + i))
            .collect()
    }

    fn rec(lines: usize) -> TxnRecord {
        let target = TargetRecord { label: "t".into(), path: "/proc/self/ns/net".into(), pin: None, dev: 1, ino: 2 };
        let requester = Requester { uid: 0, pid: 1, ssh: None, origin: None, person: None };
        let id = TxnId::parse("20261204-053704-76a7").expect("id");
        let mut r = TxnRecord::new(id, Kind::Ruleset, target, requester, "boot".into(), 1_700_000_000);
        r.before = Some(listing("before", lines));
        r.after = Some(listing("after", lines));
        r.ruleset = Some(listing("file", lines));
        r.undo = serde_json::json!({"snapshot": {"nft": listing("snapshot", lines)}, "genid_before": 7});
        r.policy = Some(serde_json::json!({"backend": "nft"}));
        r
    }

    #[test]
    fn a_held_record_keeps_its_large_payloads_compressed_and_gives_them_back_exactly() {
        let full = rec(20_000);
        let raw_total = full.before.as_ref().map_or(0, String::len) * 3;
        let held = HeldRecord::pack(full.clone());
        // What stays in memory as it is: no listing, no ruleset file, no snapshot.
        let head = held.head();
        assert_eq!((head.before.as_deref(), head.after.as_deref(), head.ruleset.as_deref()), (None, None, None));
        assert!(head.undo.is_null(), "{:?}", head.undo);
        // A small payload stays as it is.
        assert_eq!(head.policy, Some(serde_json::json!({"backend": "nft"})));
        let (zst, raw) = held.payload_bytes();
        assert!(raw > raw_total, "{raw} vs {raw_total}");
        assert!(zst * 10 < raw, "compressed {zst} of {raw}");
        assert_eq!(held.record().expect("unpack"), full);
    }

    /// The answer's writer takes the release once; without one, the fallback thread takes it.
    #[test]
    fn a_release_after_the_answer_is_taken_once_by_the_writer_or_else_by_the_fallback() {
        release_memory_after_answer();
        assert!(take_release_after_answer(), "the server's writer takes it");
        assert!(!take_release_after_answer(), "once");
        release_memory_after_answer();
        std::thread::sleep(RELEASE_FALLBACK * 3);
        assert!(!take_release_after_answer(), "nobody wrote an answer: the fallback released");
    }

    #[test]
    fn a_small_record_is_held_as_it_is() {
        let full = rec(3);
        let held = HeldRecord::pack(full.clone());
        assert_eq!(held.payload_bytes(), (0, 0));
        assert_eq!(held.head(), &full);
        assert_eq!(held.record().expect("unpack"), full);
    }

    #[test]
    fn the_owner_holds_the_compressed_record_and_replaces_it_by_id() {
        let shared_owner = Owner::new((1, 2));
        let full = rec(5_000);
        *shared_owner.slot() = Some(Current {
            rec: HeldRecord::pack(full.clone()),
            phase: Phase::Pending,
            timer: None,
            journal_error: None,
        });
        let id = full.id.as_str().to_string();
        assert!(shared_owner.head(&id).is_some_and(|h| h.before.is_none() && h.undo.is_null()));
        assert_eq!(shared_owner.record(&id), Some(full.clone()));
        let mut next = full.clone();
        next.note(1_700_000_001, "extended");
        assert!(shared_owner.set_record(&next));
        assert_eq!(shared_owner.record(&id), Some(next));
        assert_eq!(shared_owner.record("20261204-000000-0000"), None);
        assert!(shared_owner.slot().as_ref().is_some_and(|c| c.rec.head().before.is_none()));
    }
}
