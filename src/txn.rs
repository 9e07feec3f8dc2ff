//! The transaction record and its state machine (DESIGN §1, §2, §5).
//!
//! Pure: nothing here reads a file or a clock. Every time is an argument — wall-clock seconds
//! since the Unix epoch for display and events, `CLOCK_BOOTTIME` nanoseconds for deadlines — so
//! the whole state machine, the recovery table and the CLI's JSON views are unit-testable.
//!
//! ```text
//!  PREPARED ─► PENDING ─► COMMITTED
//!     │           │  └─(extend)─┐
//!     │           ◄─────────────┘
//!     ├───────────┴─► ROLLED_BACK(reason)
//!     └───────────┴─► ROLLBACK_FAILED ─► (retry) ─► ROLLED_BACK | ROLLBACK_FAILED
//! ```
//!
//! Storage (temp, fsync, rename, fsync dir) lives in [`crate::journal`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Version of the on-disk record whose large parts are stored apart as snapshots
/// ([`TxnRecord::snapshots`]); this build reads it and [`INLINE_RECORD_VERSION`].
pub const RECORD_VERSION: u32 = 2;

/// Version of a record holding everything inline: what ctguard wrote before snapshots were
/// stored apart, and what the journal still writes for a record with nothing large (so an older
/// ctguard can read it). Read by this build.
pub const INLINE_RECORD_VERSION: u32 = 1;

/// Largest wall time the formatting in this module handles: 9999-12-31T23:59:59Z. Later times
/// are clamped to it (ids and RFC 3339 strings keep a four-digit year).
pub const MAX_WALL_UNIX: u64 = 253_402_300_799;

/// Cap of [`retry_delay`].
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Errors of the state machine and of record (de)serialization.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// A string that is not a transaction id.
    #[error("{id:?} is not a transaction id (expected YYYYMMDD-HHMMSS-xxxx, e.g. 20250101-120000-0a1b): {reason}")]
    BadId {
        /// The rejected input.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A transition the state machine does not allow.
    #[error("transaction {id} is {from}; it cannot become {to}")]
    IllegalTransition {
        /// Transaction.
        id: String,
        /// Current state name.
        from: &'static str,
        /// Requested state name.
        to: &'static str,
    },
    /// A deadline taken in another boot than the record's.
    #[error("transaction {id} belongs to boot {record}, but the deadline was taken in boot {deadline}")]
    BootMismatch {
        /// Transaction.
        id: String,
        /// Boot id of the record.
        record: String,
        /// Boot id of the deadline.
        deadline: String,
    },
    /// `extend` with a deadline that does not move later.
    #[error("transaction {id}: the new deadline ({requested}) is not later than the current one ({current})")]
    DeadlineNotLater {
        /// Transaction.
        id: String,
        /// Current deadline, RFC 3339.
        current: String,
        /// Requested deadline, RFC 3339.
        requested: String,
    },
    /// A record of another format version (a newer ctguard wrote it, or it is not a record).
    #[error("unsupported transaction record version {}; this ctguard reads versions {INLINE_RECORD_VERSION} and {RECORD_VERSION}", found_text(*.found))]
    UnsupportedVersion {
        /// The version found, if any.
        found: Option<u64>,
    },
    /// The record is not valid JSON or does not match the schema. serde's message may quote the
    /// record's text (an unknown variant): its control characters are escaped.
    #[error("invalid transaction record: {}", crate::exit::escape_for_terminal(&.source.to_string()))]
    Json {
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// A snapshot reference that cannot be used (not a part of the record, or not a SHA-256).
    #[error("invalid snapshot reference {pointer:?}: {reason}")]
    BadSnapshotRef {
        /// The JSON pointer it is filed under (escaped for a terminal).
        pointer: String,
        /// What is wrong.
        reason: &'static str,
    },
}

fn found_text(found: Option<u64>) -> String {
    match found {
        Some(v) => v.to_string(),
        None => "(missing)".to_string(),
    }
}

/// A transaction id, `YYYYMMDD-HHMMSS-xxxx` (UTC creation time, four lower-case hex digits).
///
/// Guarantees: every value is valid for [`crate::model::names::Tag::new`] (`[A-Za-z0-9-]`, 20
/// bytes) and safe as a file name (no `/`, no leading `.`). Ids sort chronologically by second.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TxnId(String);

impl TxnId {
    /// Builds the id of a transaction created at `wall_unix_secs` (UTC; clamped to
    /// [`MAX_WALL_UNIX`]) with the low 16 bits of `random` as the suffix. Pure and deterministic.
    pub fn generate(wall_unix_secs: u64, random: u32) -> TxnId {
        let c = Civil::from_unix(wall_unix_secs);
        TxnId(format!(
            "{:04}{:02}{:02}-{:02}{:02}{:02}-{:04x}",
            c.year,
            c.month,
            c.day,
            c.hour,
            c.minute,
            c.second,
            random & 0xffff
        ))
    }

    /// Validates user input (CLI, journal file names). Accepts exactly the generated shape with a
    /// real calendar date and time; upper-case hex is accepted and normalised to lower case.
    /// The error names the input.
    pub fn parse(s: &str) -> Result<TxnId, TxnError> {
        let bad = |reason| TxnError::BadId { id: s.to_string(), reason };
        let b = s.as_bytes();
        if b.len() != 20 {
            return Err(bad("it must be 20 characters long"));
        }
        if b[8] != b'-' || b[15] != b'-' {
            return Err(bad("dashes expected after the date and after the time"));
        }
        if !b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit) {
            return Err(bad("the date and time must be digits"));
        }
        if !b[16..].iter().all(u8::is_ascii_hexdigit) {
            return Err(bad("the suffix must be four hex digits"));
        }
        let num = |r: std::ops::Range<usize>| b[r].iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
        let (year, month, day) = (num(0..4), num(4..6), num(6..8));
        let (hour, minute, second) = (num(9..11), num(11..13), num(13..15));
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return Err(bad("the date is not a calendar date"));
        }
        if hour > 23 || minute > 59 || second > 59 {
            return Err(bad("the time is not a time of day"));
        }
        Ok(TxnId(s.to_ascii_lowercase()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TxnId {
    type Error = TxnError;
    fn try_from(s: String) -> Result<TxnId, TxnError> {
        TxnId::parse(&s)
    }
}

impl From<TxnId> for String {
    fn from(id: TxnId) -> String {
        id.0
    }
}

/// Kind of transaction (DESIGN §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `apply [POLICY]`: only ctguard's own objects change.
    Policy,
    /// `apply --ruleset FILE`: the whole prior state is restored on rollback.
    Ruleset,
}

impl Kind {
    /// `"policy"` or `"ruleset"`, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Policy => "policy",
            Kind::Ruleset => "ruleset",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a transaction was rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The dead-man timer fired.
    Deadline,
    /// `ctguard rollback` (or Ctrl-C under `apply --wait`).
    Cancelled,
    /// A probe failed; the text says which and how.
    ProbeFailed(String),
    /// Applying (or verifying) failed part-way; the text says what.
    ApplyFailed(String),
    /// SIGTERM/SIGINT to the agent with the transaction pending.
    AgentStopping,
    /// Found PREPARED, or PENDING past its deadline, when an agent started (same boot).
    Recovered,
    /// Found unfinished after a reboot: nothing was restored (the host booted its persisted
    /// configuration, and nothing is persisted before COMMITTED).
    Reboot,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Deadline => f.write_str("deadline"),
            Reason::Cancelled => f.write_str("cancelled"),
            Reason::ProbeFailed(s) => write!(f, "probe failed: {s}"),
            Reason::ApplyFailed(s) => write!(f, "apply failed: {s}"),
            Reason::AgentStopping => f.write_str("agent stopping"),
            Reason::Recovered => f.write_str("recovered at agent start"),
            Reason::Reboot => f.write_str("reboot (nothing restored)"),
        }
    }
}

/// State of a transaction (DESIGN §1). Serialized as `{"name": "ROLLED_BACK", "reason": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Journaled before the first change; the change may be partly applied.
    Prepared,
    /// Applied, rollback checked, dead-man timer armed.
    Pending,
    /// Confirmed; final.
    Committed,
    /// Rolled back (or closed by reboot); final.
    RolledBack {
        /// Why.
        reason: Reason,
    },
    /// The rollback failed: state unknown, retried with backoff, operator needed.
    RollbackFailed {
        /// The last failure.
        error: String,
        /// Failed attempts so far (≥ 1).
        attempts: u32,
    },
}

impl State {
    /// True for COMMITTED and ROLLED_BACK: nothing will change this record again.
    pub fn is_finished(&self) -> bool {
        matches!(self, State::Committed | State::RolledBack { .. })
    }

    /// `"PREPARED"`, `"PENDING"`, `"COMMITTED"`, `"ROLLED_BACK"` or `"ROLLBACK_FAILED"`.
    pub fn name(&self) -> &'static str {
        match self {
            State::Prepared => "PREPARED",
            State::Pending => "PENDING",
            State::Committed => "COMMITTED",
            State::RolledBack { .. } => "ROLLED_BACK",
            State::RollbackFailed { .. } => "ROLLBACK_FAILED",
        }
    }

    /// Human outcome for `history`: `"committed"`, `"rolled back: deadline"`, …
    pub fn outcome(&self) -> String {
        match self {
            State::Prepared => "in progress (prepared)".to_string(),
            State::Pending => "pending".to_string(),
            State::Committed => "committed".to_string(),
            State::RolledBack { reason } => format!("rolled back: {reason}"),
            State::RollbackFailed { error, attempts } => {
                format!("rollback failed ({attempts} attempt{}): {error}", if *attempts == 1 { "" } else { "s" })
            }
        }
    }
}

/// The network namespace a transaction changes (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// `"host"` or the `--netns` argument.
    pub label: String,
    /// The path opened to enter it.
    pub path: String,
    /// Bind mount keeping it alive, under `$RUN_DIR/ns/TXID`.
    #[serde(default)]
    pub pin: Option<String>,
    /// Device of the namespace inode (identity with `ino`).
    pub dev: u64,
    /// Namespace inode.
    pub ino: u64,
}

/// Who asked (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    /// Peer uid (SO_PEERCRED).
    pub uid: u32,
    /// Peer pid (SO_PEERCRED).
    pub pid: i32,
    /// SSH connection, `"client_ip client_port server_ip server_port"`, when there is one.
    #[serde(default)]
    pub ssh: Option<String>,
    /// Where the apply came from, as the new-connection proof derived it (DESIGN §4); `None`
    /// when the proof was not asked (`--allow-same-connection`) or in older records.
    #[serde(default)]
    pub origin: Option<crate::origin::Origin>,
    /// The person behind the uid: the login user (`/proc/PID/loginuid`, set by pam_loginuid),
    /// else `SUDO_USER` from the requester's environment.
    #[serde(default)]
    pub person: Option<String>,
}

/// What an apply asked for beyond the change itself; journaled so a restarted agent and later
/// confirms honour it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOptions {
    /// Confirming over the connection that applied is allowed.
    #[serde(default)]
    pub allow_same_connection: bool,
    /// Probe specs (`tcp:HOST:PORT`, …).
    #[serde(default)]
    pub probes: Vec<String>,
    /// Repeat the probes every this many seconds until the deadline.
    #[serde(default)]
    pub probe_interval_secs: Option<u64>,
    /// Commit when every probe of the first round passes.
    #[serde(default)]
    pub auto_confirm: bool,
    /// Make the change survive reboot once COMMITTED.
    #[serde(default)]
    pub persist: bool,
    /// `apply --remove`: ctguard's objects and insertions removed from the target and the
    /// sysctls it changed restored (nothing of it is guarded once committed).
    #[serde(default)]
    pub remove: bool,
}

/// When a pending transaction rolls back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    /// Absolute `CLOCK_BOOTTIME` nanoseconds; meaningful only in boot `boot_id`.
    pub boottime_ns: u64,
    /// Boot in which `boottime_ns` was taken.
    pub boot_id: String,
    /// The same instant in wall-clock seconds, for display only.
    pub wall_unix: u64,
}

/// One line of a transaction's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock seconds.
    pub wall_unix: u64,
    /// State name after the event.
    pub state: String,
    /// What happened.
    pub note: String,
}

/// One large part of a record stored apart (DESIGN §2 "Journal"): the file
/// `$STATE_DIR/snapshots/SHA256.zst`, the part's bytes compressed with zstd. Shared by every
/// record holding the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// SHA-256 of the part's bytes (64 lower-case hex digits): its name and its check.
    pub sha256: String,
    /// Length of the part's bytes.
    pub bytes: u64,
    /// Size of the compressed file.
    pub stored: u64,
    /// The part is JSON (e.g. a drift list) rather than one string.
    #[serde(default)]
    pub json: bool,
}

/// Everything the journal knows about one transaction. Serialized as JSON; unknown fields are
/// ignored (forward compatible), the `version` is checked by [`TxnRecord::from_json`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxnRecord {
    /// Record format, [`RECORD_VERSION`].
    pub version: u32,
    /// Id (also the file name and the rule tag).
    pub id: TxnId,
    /// Policy or ruleset.
    pub kind: Kind,
    /// Target namespace.
    pub target: TargetRecord,
    /// Who asked.
    pub requester: Requester,
    /// Creation time, wall-clock seconds.
    pub created_wall: u64,
    /// The order of creation within this journal: nanoseconds of CLOCK_REALTIME at creation
    /// (0 in older records). Transactions of the same second are ordered by it, never by
    /// their random id.
    #[serde(default)]
    pub created_ns: u64,
    /// The policy applied (policy transactions).
    #[serde(default)]
    pub policy: Option<Value>,
    /// The ruleset file's content (ruleset transactions).
    #[serde(default)]
    pub ruleset: Option<String>,
    /// Tools used: name → absolute path.
    #[serde(default)]
    pub tools: BTreeMap<String, String>,
    /// nftables generation id read before the apply.
    #[serde(default)]
    pub genid_before: Option<u32>,
    /// nftables generation id read after the apply.
    #[serde(default)]
    pub genid_after: Option<u32>,
    /// Listing before the apply, for `show` and the diff.
    #[serde(default)]
    pub before: Option<String>,
    /// Listing after the apply.
    #[serde(default)]
    pub after: Option<String>,
    /// Backend-specific record of owned objects and old values; opaque here. Must be
    /// self-contained: old records can be pruned.
    #[serde(default)]
    pub undo: Value,
    /// Current state.
    pub state: State,
    /// Deadline, set when PENDING (kept afterwards for display).
    #[serde(default)]
    pub deadline: Option<Deadline>,
    /// Boot in which the transaction was created.
    pub boot_id: String,
    /// History, oldest first.
    #[serde(default)]
    pub events: Vec<Event>,
    /// Options of the apply.
    #[serde(default)]
    pub options: TxnOptions,
    /// `--comment`: why.
    #[serde(default)]
    pub comment: Option<String>,
    /// The large parts stored apart as snapshots: JSON pointer of the part in this record
    /// (`/before`, `/undo/snapshot/state/nft/0/text`, …) → its snapshot. Non-empty only in a
    /// record read as an index entry ([`crate::journal::Journal::list`]): those parts are then
    /// absent (`None`, `null`) and [`crate::journal::Journal::resolve`] fills them in. Empty in
    /// a whole record (what [`crate::journal::Journal::load`] returns and apply builds).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshots: BTreeMap<String, SnapshotRef>,
}

impl TxnRecord {
    /// A new record in PREPARED with one event. Payload fields (`policy`, `ruleset`, `tools`,
    /// genids, listings, `undo`) start empty; set them before the first journal write.
    pub fn new(
        id: TxnId,
        kind: Kind,
        target: TargetRecord,
        requester: Requester,
        boot_id: String,
        now_wall: u64,
    ) -> TxnRecord {
        let mut rec = TxnRecord {
            version: RECORD_VERSION,
            id,
            kind,
            target,
            requester,
            created_wall: now_wall,
            created_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            policy: None,
            ruleset: None,
            tools: BTreeMap::new(),
            genid_before: None,
            genid_after: None,
            before: None,
            after: None,
            undo: Value::Null,
            state: State::Prepared,
            deadline: None,
            boot_id,
            events: Vec::new(),
            options: TxnOptions::default(),
            comment: None,
            snapshots: BTreeMap::new(),
        };
        let note = format!("created ({} transaction on {})", rec.kind, rec.target.label);
        rec.push_event(now_wall, note);
        rec
    }

    fn push_event(&mut self, now_wall: u64, note: String) {
        self.events.push(Event { wall_unix: now_wall, state: self.state.name().to_string(), note });
    }

    fn illegal(&self, to: &'static str) -> TxnError {
        TxnError::IllegalTransition { id: self.id.to_string(), from: self.state.name(), to }
    }

    fn check_boot(&self, deadline: &Deadline) -> Result<(), TxnError> {
        if deadline.boot_id != self.boot_id {
            return Err(TxnError::BootMismatch {
                id: self.id.to_string(),
                record: self.boot_id.clone(),
                deadline: deadline.boot_id.clone(),
            });
        }
        Ok(())
    }

    /// Appends an informational event without changing state (probe rounds, drift, who
    /// confirmed). Always succeeds.
    pub fn note(&mut self, now_wall: u64, note: impl Into<String>) {
        self.push_event(now_wall, note.into());
    }

    /// PREPARED → PENDING with `deadline`. Refused from any other state and for a deadline
    /// taken in another boot; on error the record is unchanged.
    pub fn to_pending(&mut self, deadline: Deadline, now_wall: u64) -> Result<(), TxnError> {
        if self.state != State::Prepared {
            return Err(self.illegal("PENDING"));
        }
        self.check_boot(&deadline)?;
        let note = format!("applied; rolls back at {} unless confirmed", format_rfc3339(deadline.wall_unix));
        self.deadline = Some(deadline);
        self.state = State::Pending;
        self.push_event(now_wall, note);
        Ok(())
    }

    /// Moves the deadline of a PENDING transaction later. Refused in any other state, for a
    /// deadline not strictly later than the current one, or from another boot; on error the
    /// record is unchanged.
    pub fn extend(&mut self, new_deadline: Deadline, now_wall: u64) -> Result<(), TxnError> {
        if self.state != State::Pending {
            return Err(self.illegal("PENDING (extended)"));
        }
        self.check_boot(&new_deadline)?;
        let old_wall = match &self.deadline {
            Some(cur) if new_deadline.boottime_ns <= cur.boottime_ns => {
                return Err(TxnError::DeadlineNotLater {
                    id: self.id.to_string(),
                    current: format_rfc3339(cur.wall_unix),
                    requested: format_rfc3339(new_deadline.wall_unix),
                });
            }
            Some(cur) => format_rfc3339(cur.wall_unix),
            None => "none".to_string(),
        };
        let note = format!("deadline extended to {} (was {old_wall})", format_rfc3339(new_deadline.wall_unix));
        self.deadline = Some(new_deadline);
        self.push_event(now_wall, note);
        Ok(())
    }

    /// PENDING → COMMITTED. Idempotent: confirming an already COMMITTED transaction is `Ok` and
    /// changes nothing (no event; DESIGN §5 exit 0). Refused from any other state.
    pub fn to_committed(&mut self, now_wall: u64) -> Result<(), TxnError> {
        match self.state {
            State::Committed => Ok(()),
            State::Pending => {
                self.state = State::Committed;
                self.push_event(now_wall, "confirmed".to_string());
                Ok(())
            }
            _ => Err(self.illegal("COMMITTED")),
        }
    }

    /// PREPARED, PENDING or ROLLBACK_FAILED → ROLLED_BACK(`reason`). Refused once finished
    /// (COMMITTED or already ROLLED_BACK); on error the record is unchanged.
    pub fn to_rolled_back(&mut self, reason: Reason, now_wall: u64) -> Result<(), TxnError> {
        match self.state {
            State::Prepared | State::Pending | State::RollbackFailed { .. } => {
                let note = format!("rolled back: {reason}");
                self.state = State::RolledBack { reason };
                self.push_event(now_wall, note);
                Ok(())
            }
            _ => Err(self.illegal("ROLLED_BACK")),
        }
    }

    /// PREPARED, PENDING or ROLLBACK_FAILED → ROLLBACK_FAILED with `attempts` counting failed
    /// rollbacks (1 on the first, incremented on each retry, saturating). Refused once
    /// finished; on error the record is unchanged.
    pub fn to_rollback_failed(&mut self, error: String, now_wall: u64) -> Result<(), TxnError> {
        let attempts = match &self.state {
            State::Prepared | State::Pending => 1,
            State::RollbackFailed { attempts, .. } => attempts.saturating_add(1),
            _ => return Err(self.illegal("ROLLBACK_FAILED")),
        };
        let note = format!("rollback attempt {attempts} failed: {error}");
        self.state = State::RollbackFailed { error, attempts };
        self.push_event(now_wall, note);
        Ok(())
    }

    /// Whole seconds until the deadline, rounded up; 0 once overdue; `None` without a deadline.
    pub fn seconds_left(&self, now_boottime_ns: u64) -> Option<u64> {
        self.deadline.as_ref().map(|d| d.boottime_ns.saturating_sub(now_boottime_ns).div_ceil(1_000_000_000))
    }

    /// Serializes as pretty JSON with a trailing newline. Deterministic for equal records.
    pub fn to_json(&self) -> Result<Vec<u8>, TxnError> {
        let mut out = serde_json::to_vec_pretty(self).map_err(|source| TxnError::Json { source })?;
        out.push(b'\n');
        Ok(out)
    }

    /// True when every part is here: no snapshot is left to read ([`TxnRecord::snapshots`]
    /// is empty). Only a whole record may be rolled back, shown or re-applied.
    pub fn is_whole(&self) -> bool {
        self.snapshots.is_empty()
    }

    /// Parses a record, checking `version` first (anything but [`INLINE_RECORD_VERSION`] or
    /// [`RECORD_VERSION`] → [`TxnError::UnsupportedVersion`], whatever the rest holds), then
    /// the snapshot references (each a JSON pointer to a part that is `null` here and a
    /// SHA-256). Unknown fields are ignored.
    pub fn from_json(bytes: &[u8]) -> Result<TxnRecord, TxnError> {
        /// The version alone (everything else skipped): checked before the record is parsed.
        #[derive(Deserialize)]
        struct Head {
            #[serde(default)]
            version: Option<Value>,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(|source| TxnError::Json { source })?;
        check_version(head.version.as_ref().and_then(Value::as_u64))?;
        let rec: TxnRecord = serde_json::from_slice(bytes).map_err(|source| TxnError::Json { source })?;
        rec.check_refs()?;
        Ok(rec)
    }

    /// [`TxnRecord::from_json`] of a parsed value; also refuses a reference to a part the
    /// record holds inline.
    pub fn from_value(value: Value) -> Result<TxnRecord, TxnError> {
        check_version(value.get("version").and_then(Value::as_u64))?;
        if let Some(refs) = value.get("snapshots").and_then(Value::as_object) {
            for pointer in refs.keys() {
                if value.pointer(pointer).is_some_and(|v| !v.is_null()) {
                    return Err(TxnError::BadSnapshotRef {
                        pointer: crate::exit::escape_for_terminal(pointer).into_owned(),
                        reason: "the record holds that part inline too",
                    });
                }
            }
        }
        let rec: TxnRecord = serde_json::from_value(value).map_err(|source| TxnError::Json { source })?;
        rec.check_refs()?;
        Ok(rec)
    }

    /// Each snapshot reference is filed under a JSON pointer and names a SHA-256 (safe as a
    /// file name).
    fn check_refs(&self) -> Result<(), TxnError> {
        for (pointer, r) in &self.snapshots {
            let bad = |reason| TxnError::BadSnapshotRef {
                pointer: crate::exit::escape_for_terminal(pointer).into_owned(),
                reason,
            };
            if !pointer.starts_with('/') {
                return Err(bad("not a JSON pointer"));
            }
            if !crate::compress::is_sha256_hex(&r.sha256) {
                return Err(bad("not a SHA-256 in lower-case hex"));
            }
        }
        Ok(())
    }
}

fn check_version(found: Option<u64>) -> Result<(), TxnError> {
    if found != Some(u64::from(RECORD_VERSION)) && found != Some(u64::from(INLINE_RECORD_VERSION)) {
        return Err(TxnError::UnsupportedVersion { found });
    }
    Ok(())
}

/// What an agent does with a journaled transaction when it starts (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Finished: leave it.
    Nothing,
    /// Same boot, PREPARED or PENDING past its deadline: roll back now (by tag).
    RollBackNow,
    /// Same boot, PENDING with time left: arm the timer for `remaining_ns`.
    Rearm {
        /// Nanoseconds until the deadline (> 0).
        remaining_ns: u64,
    },
    /// Unfinished in another boot: restore nothing; close as ROLLED_BACK(Reboot).
    CloseRebooted,
    /// Same boot, ROLLBACK_FAILED: try the rollback again (with [`retry_delay`]).
    RetryRollback,
}

/// The recovery table of DESIGN §2. Pure. A boot id differing from `current_boot_id` — the
/// record's, or its deadline's — makes any unfinished record [`Recovery::CloseRebooted`]. A
/// PENDING record without a deadline (should not exist) is rolled back now: safety first.
pub fn recovery_action(rec: &TxnRecord, current_boot_id: &str, now_boottime_ns: u64) -> Recovery {
    if rec.state.is_finished() {
        return Recovery::Nothing;
    }
    let other_boot =
        rec.boot_id != current_boot_id || rec.deadline.as_ref().is_some_and(|d| d.boot_id != current_boot_id);
    if other_boot {
        return Recovery::CloseRebooted;
    }
    match &rec.state {
        State::Prepared => Recovery::RollBackNow,
        State::Pending => match &rec.deadline {
            Some(d) if d.boottime_ns > now_boottime_ns => {
                Recovery::Rearm { remaining_ns: d.boottime_ns - now_boottime_ns }
            }
            _ => Recovery::RollBackNow,
        },
        State::RollbackFailed { .. } => Recovery::RetryRollback,
        State::Committed | State::RolledBack { .. } => Recovery::Nothing,
    }
}

/// Delay before retrying a rollback that has failed `attempts` times: 1 s, 2 s, 4 s, … capped
/// at [`MAX_RETRY_DELAY`] (30 s). `attempts` 0 and 1 both give 1 s. Never overflows.
pub fn retry_delay(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1);
    let secs = if exp >= 6 { MAX_RETRY_DELAY.as_secs() } else { (1u64 << exp).min(MAX_RETRY_DELAY.as_secs()) };
    Duration::from_secs(secs)
}

fn requester_json(r: &Requester) -> Value {
    json!({ "uid": r.uid, "pid": r.pid, "ssh": r.ssh, "person": r.person })
}

/// One element of `status --json`'s `pending` array (DESIGN §5): `id`, `target` (the label),
/// `kind`, `deadline` (RFC 3339 UTC, or null), `seconds_left` (rounded up, 0 when overdue, or
/// null), `requester` (`{uid, pid, ssh}`), `state`.
pub fn status_entry(rec: &TxnRecord, now_boottime_ns: u64) -> Value {
    json!({
        "id": rec.id.as_str(),
        "target": rec.target.label,
        "kind": rec.kind.as_str(),
        "deadline": rec.deadline.as_ref().map(|d| format_rfc3339(d.wall_unix)),
        "seconds_left": rec.seconds_left(now_boottime_ns),
        "requester": requester_json(&rec.requester),
        "state": rec.state.name(),
        "comment": rec.comment,
    })
}

/// One element of `history --json`'s `transactions` array (DESIGN §5): `id`, `target`, `kind`,
/// `state`, `outcome` (e.g. `"committed"`, `"rolled back: deadline"`), `started` (RFC 3339),
/// `requester`, `events` (`[{time, state, note}]`).
pub fn history_entry(rec: &TxnRecord) -> Value {
    let events: Vec<Value> = rec
        .events
        .iter()
        .map(|e| json!({ "time": format_rfc3339(e.wall_unix), "state": e.state, "note": e.note }))
        .collect();
    json!({
        "id": rec.id.as_str(),
        "target": rec.target.label,
        "kind": rec.kind.as_str(),
        "state": rec.state.name(),
        "outcome": rec.state.outcome(),
        "started": format_rfc3339(rec.created_wall),
        "requester": requester_json(&rec.requester),
        "events": events,
        "comment": rec.comment,
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` for wall-clock seconds (UTC; clamped to [`MAX_WALL_UNIX`]).
pub fn format_rfc3339(wall_unix: u64) -> String {
    let c = Civil::from_unix(wall_unix);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", c.year, c.month, c.day, c.hour, c.minute, c.second)
}

struct Civil {
    year: u64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
}

impl Civil {
    /// Howard Hinnant's `civil_from_days`, for non-negative day counts.
    fn from_unix(wall_unix: u64) -> Civil {
        let t = wall_unix.min(MAX_WALL_UNIX);
        let days = t / 86_400;
        let secs = t % 86_400;
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        Civil {
            year,
            month: month as u32,
            day: day as u32,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
        }
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::names::Tag;

    const BOOT: &str = "3f1c2a9e-0000-4000-8000-000000000001";
    const OTHER_BOOT: &str = "3f1c2a9e-0000-4000-8000-000000000002";
    const T0: u64 = 1_700_000_000; // 2023-11-14T22:13:20Z
    const SEC: u64 = 1_000_000_000;

    fn id() -> TxnId {
        TxnId::generate(T0, 0xbeef)
    }

    fn rec() -> TxnRecord {
        TxnRecord::new(
            id(),
            Kind::Policy,
            TargetRecord {
                label: "host".into(),
                path: "/proc/1/ns/net".into(),
                pin: Some("/run/ctguard/ns/x".into()),
                dev: 4,
                ino: 4026531840,
            },
            Requester {
                uid: 0,
                pid: 4242,
                ssh: Some("198.18.0.1 50000 198.18.0.2 22".into()),
                origin: None,
                person: None,
            },
            BOOT.into(),
            T0,
        )
    }

    fn deadline(boottime_s: u64) -> Deadline {
        Deadline { boottime_ns: boottime_s * SEC, boot_id: BOOT.into(), wall_unix: T0 + boottime_s }
    }

    fn prepared() -> TxnRecord {
        rec()
    }
    fn pending() -> TxnRecord {
        let mut r = rec();
        r.to_pending(deadline(100), T0 + 1).expect("pending");
        r
    }
    fn committed() -> TxnRecord {
        let mut r = pending();
        r.to_committed(T0 + 2).expect("committed");
        r
    }
    fn rolled_back() -> TxnRecord {
        let mut r = pending();
        r.to_rolled_back(Reason::Deadline, T0 + 2).expect("rolled back");
        r
    }
    fn rollback_failed() -> TxnRecord {
        let mut r = pending();
        r.to_rollback_failed("nft: EBUSY".into(), T0 + 2).expect("rollback failed");
        r
    }

    /// All five states, by name.
    fn all() -> Vec<(&'static str, TxnRecord)> {
        vec![
            ("PREPARED", prepared()),
            ("PENDING", pending()),
            ("COMMITTED", committed()),
            ("ROLLED_BACK", rolled_back()),
            ("ROLLBACK_FAILED", rollback_failed()),
        ]
    }

    fn assert_illegal(before: &TxnRecord, after: &TxnRecord, res: Result<(), TxnError>) {
        match res {
            Err(TxnError::IllegalTransition { from, .. }) => assert_eq!(from, before.state.name()),
            other => panic!("expected IllegalTransition from {}, got {other:?}", before.state.name()),
        }
        assert_eq!(before, after, "a refused transition must not change the record");
    }

    #[test]
    fn id_generate_format() {
        let id = TxnId::generate(T0, 0x1234_beef);
        assert_eq!(id.as_str(), "20231114-221320-beef");
        assert_eq!(TxnId::generate(0, 0).as_str(), "19700101-000000-0000");
        assert_eq!(TxnId::generate(951_782_400, 0xa).as_str(), "20000229-000000-000a");
        assert_eq!(TxnId::generate(u64::MAX, 0xffff).as_str(), "99991231-235959-ffff");
        assert!(Tag::new(id.as_str()).is_ok());
        assert!(Tag::new(TxnId::generate(u64::MAX, u32::MAX).as_str()).is_ok());
    }

    #[test]
    fn id_parse() {
        let id = TxnId::parse("20231114-221320-beef").expect("valid");
        assert_eq!(id, TxnId::generate(T0, 0xbeef));
        assert_eq!(TxnId::parse("20231114-221320-BEEF").expect("upper hex").as_str(), "20231114-221320-beef");
        assert!(TxnId::parse("20240229-235959-0000").is_ok());
        for bad in [
            "",
            "20231114-221320-bee",
            "20231114-221320-beeff",
            "20231114_221320-beef",
            "2023111-4221320-beef",
            "20231114-221320-beeg",
            "2023111a-221320-beef",
            "20231314-221320-beef",
            "20230229-221320-beef",
            "20231100-221320-beef",
            "20231114-241320-beef",
            "20231114-226020-beef",
            "../../../etc/passwd!",
            "20231114-221320-be/f",
            "２0231114-221320-beef",
        ] {
            match TxnId::parse(bad) {
                Err(e @ TxnError::BadId { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("{bad:?}")), "error must name the input: {msg}");
                }
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn id_roundtrip_all_seconds_of_a_leap_day_sample() {
        for t in (951_782_400u64..951_782_400 + 86_400).step_by(997) {
            let id = TxnId::generate(t, t as u32);
            assert_eq!(TxnId::parse(id.as_str()).expect("parses"), id);
        }
    }

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(T0), "2023-11-14T22:13:20Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(format_rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn new_is_prepared_with_event() {
        let r = rec();
        assert_eq!(r.state, State::Prepared);
        assert_eq!(r.version, RECORD_VERSION);
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].state, "PREPARED");
        assert_eq!(r.events[0].wall_unix, T0);
        assert!(!r.state.is_finished());
    }

    #[test]
    fn legal_transitions() {
        let mut r = rec();
        r.to_pending(deadline(100), T0 + 1).expect("prepared -> pending");
        assert_eq!(r.state, State::Pending);
        assert_eq!(r.deadline, Some(deadline(100)));
        r.extend(deadline(200), T0 + 2).expect("extend");
        assert_eq!(r.deadline, Some(deadline(200)));
        assert_eq!(r.state, State::Pending);
        r.to_committed(T0 + 3).expect("pending -> committed");
        assert_eq!(r.state, State::Committed);
        assert!(r.state.is_finished());
        let n = r.events.len();
        r.to_committed(T0 + 4).expect("committed -> committed is ok");
        assert_eq!(r.events.len(), n, "re-confirm is a no-op");
        let names: Vec<&str> = r.events.iter().map(|e| e.state.as_str()).collect();
        assert_eq!(names, ["PREPARED", "PENDING", "PENDING", "COMMITTED"]);

        for (name, mut r) in [("PREPARED", prepared()), ("PENDING", pending()), ("ROLLBACK_FAILED", rollback_failed())]
        {
            let n = r.events.len();
            r.to_rolled_back(Reason::Cancelled, T0 + 9).unwrap_or_else(|e| panic!("{name} -> rolled back: {e}"));
            assert_eq!(r.state, State::RolledBack { reason: Reason::Cancelled });
            assert_eq!(r.events.len(), n + 1);
            assert_eq!(r.events[n].state, "ROLLED_BACK");
            assert!(r.state.is_finished());
        }

        for (name, mut r) in [("PREPARED", prepared()), ("PENDING", pending())] {
            r.to_rollback_failed("boom".into(), T0 + 9).unwrap_or_else(|e| panic!("{name} -> failed: {e}"));
            assert_eq!(r.state, State::RollbackFailed { error: "boom".into(), attempts: 1 });
            assert!(!r.state.is_finished());
        }
        let mut r = rollback_failed();
        r.to_rollback_failed("again".into(), T0 + 9).expect("failed -> failed");
        assert_eq!(r.state, State::RollbackFailed { error: "again".into(), attempts: 2 });
        r.state = State::RollbackFailed { error: "x".into(), attempts: u32::MAX };
        r.to_rollback_failed("sat".into(), T0 + 9).expect("failed -> failed");
        assert_eq!(r.state, State::RollbackFailed { error: "sat".into(), attempts: u32::MAX });
    }

    #[test]
    fn illegal_transitions() {
        for (name, before) in all() {
            if name != "PREPARED" {
                let mut r = before.clone();
                let res = r.to_pending(deadline(100), T0 + 5);
                assert_illegal(&before, &r, res);
            }
            if name != "PENDING" {
                let mut r = before.clone();
                let res = r.extend(deadline(500), T0 + 5);
                assert_illegal(&before, &r, res);
            }
            if !matches!(name, "PENDING" | "COMMITTED") {
                let mut r = before.clone();
                let res = r.to_committed(T0 + 5);
                assert_illegal(&before, &r, res);
            }
            if matches!(name, "COMMITTED" | "ROLLED_BACK") {
                let mut r = before.clone();
                let res = r.to_rolled_back(Reason::Deadline, T0 + 5);
                assert_illegal(&before, &r, res);
                let mut r = before.clone();
                let res = r.to_rollback_failed("x".into(), T0 + 5);
                assert_illegal(&before, &r, res);
            }
        }
    }

    #[test]
    fn deadline_rules() {
        let before = pending();
        for d in [deadline(100), deadline(50)] {
            let mut r = before.clone();
            match r.extend(d, T0 + 5) {
                Err(TxnError::DeadlineNotLater { .. }) => {}
                other => panic!("expected DeadlineNotLater, got {other:?}"),
            }
            assert_eq!(r, before);
        }
        let mut r = before.clone();
        let other = Deadline { boot_id: OTHER_BOOT.into(), ..deadline(500) };
        assert!(matches!(r.extend(other.clone(), T0 + 5), Err(TxnError::BootMismatch { .. })));
        assert_eq!(r, before);
        let p = prepared();
        let mut r = p.clone();
        assert!(matches!(r.to_pending(other, T0 + 5), Err(TxnError::BootMismatch { .. })));
        assert_eq!(r, p);
    }

    #[test]
    fn recovery_table() {
        let now = 100 * SEC;
        let with_deadline = |mut r: TxnRecord, at_s: u64| {
            r.deadline = Some(deadline(at_s));
            r
        };
        // Same boot.
        assert_eq!(recovery_action(&prepared(), BOOT, now), Recovery::RollBackNow);
        assert_eq!(
            recovery_action(&with_deadline(pending(), 150), BOOT, now),
            Recovery::Rearm { remaining_ns: 50 * SEC }
        );
        assert_eq!(
            recovery_action(&with_deadline(pending(), 100), BOOT, now),
            Recovery::RollBackNow,
            "exactly at the deadline is overdue"
        );
        assert_eq!(recovery_action(&with_deadline(pending(), 99), BOOT, now), Recovery::RollBackNow);
        let mut no_deadline = pending();
        no_deadline.deadline = None;
        assert_eq!(recovery_action(&no_deadline, BOOT, now), Recovery::RollBackNow);
        assert_eq!(recovery_action(&committed(), BOOT, now), Recovery::Nothing);
        assert_eq!(recovery_action(&rolled_back(), BOOT, now), Recovery::Nothing);
        assert_eq!(recovery_action(&rollback_failed(), BOOT, now), Recovery::RetryRollback);
        // Another boot: every unfinished state closes, finished ones stay.
        for (name, r) in all() {
            let expect = if r.state.is_finished() { Recovery::Nothing } else { Recovery::CloseRebooted };
            assert_eq!(recovery_action(&r, OTHER_BOOT, now), expect, "{name} after reboot");
            // Overdue or not makes no difference after a reboot (boottime restarted).
            assert_eq!(recovery_action(&r, OTHER_BOOT, 0), expect, "{name} after reboot, t=0");
        }
        // A deadline from another boot than the record's (corrupt mix) also counts as reboot.
        let mut mixed = pending();
        if let Some(d) = mixed.deadline.as_mut() {
            d.boot_id = OTHER_BOOT.into();
        }
        assert_eq!(recovery_action(&mixed, BOOT, 0), Recovery::CloseRebooted);
    }

    #[test]
    fn backoff() {
        let secs: Vec<u64> = (0..=10).map(|a| retry_delay(a).as_secs()).collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 16, 30, 30, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);
    }

    #[test]
    fn json_roundtrip_every_state() {
        for (name, mut r) in all() {
            r.policy = Some(json!({"backend": "nft", "notrack": [{"ports": [53]}]}));
            r.tools.insert("nft".into(), "/usr/sbin/nft".into());
            r.genid_before = Some(7);
            r.genid_after = Some(8);
            r.before = Some("table inet x {}\n".into());
            r.undo = json!({"tables": ["ctguard"]});
            let bytes = r.to_json().expect("serialize");
            let back = TxnRecord::from_json(&bytes).expect("parse");
            assert_eq!(back, r, "{name}");
        }
        for reason in [
            Reason::Deadline,
            Reason::Cancelled,
            Reason::ProbeFailed("tcp:198.18.0.1:22 refused".into()),
            Reason::ApplyFailed("EPERM".into()),
            Reason::AgentStopping,
            Reason::Recovered,
            Reason::Reboot,
        ] {
            let mut r = pending();
            r.to_rolled_back(reason.clone(), T0 + 3).expect("rollback");
            let back = TxnRecord::from_json(&r.to_json().expect("serialize")).expect("parse");
            assert_eq!(back.state, State::RolledBack { reason });
        }
    }

    #[test]
    fn json_shape_and_compat() {
        let r = rollback_failed();
        let v: Value = serde_json::from_slice(&r.to_json().expect("serialize")).expect("json");
        assert_eq!(v["version"], 2);
        assert_eq!(v["id"], "20231114-221320-beef");
        assert_eq!(v["kind"], "policy");
        assert_eq!(v["state"], json!({"name": "ROLLBACK_FAILED", "error": "nft: EBUSY", "attempts": 1}));
        let mut rb = pending();
        rb.to_rolled_back(Reason::ProbeFailed("p".into()), T0).expect("rb");
        let v = serde_json::to_value(&rb).expect("json");
        assert_eq!(v["state"], json!({"name": "ROLLED_BACK", "reason": {"probe_failed": "p"}}));

        // Unknown fields are ignored (forward compatible); optional fields may be absent.
        let r0 = rec();
        let mut v = serde_json::to_value(&r0).expect("json");
        v["added_by_a_later_minor"] = json!(true);
        for k in ["policy", "ruleset", "tools", "genid_before", "genid_after", "before", "after", "undo", "deadline"] {
            v.as_object_mut().map(|o| o.remove(k));
        }
        let back = TxnRecord::from_json(&serde_json::to_vec(&v).expect("bytes")).expect("parse");
        assert_eq!(back, r0);
        // Records from before `created_ns` read as 0.
        v.as_object_mut().map(|o| o.remove("created_ns"));
        let old = TxnRecord::from_json(&serde_json::to_vec(&v).expect("bytes")).expect("parse");
        assert_eq!(old.created_ns, 0);

        // Version is checked first.
        let mut v2 = serde_json::to_value(rec()).expect("json");
        v2["version"] = json!(3);
        v2["state"] = json!("SOMETHING_NEW");
        assert!(matches!(
            TxnRecord::from_json(&serde_json::to_vec(&v2).expect("bytes")),
            Err(TxnError::UnsupportedVersion { found: Some(3) })
        ));
        // Version 1 (everything inline, before snapshots were stored apart) still reads.
        let mut v1 = serde_json::to_value(rec()).expect("json");
        v1["version"] = json!(1);
        assert_eq!(TxnRecord::from_json(&serde_json::to_vec(&v1).expect("bytes")).expect("v1").id, rec().id);
        // Snapshot references: a pointer to a part held as null, and a SHA-256.
        let sha = "ab".repeat(32);
        let mut v4 = serde_json::to_value(rec()).expect("json");
        v4["snapshots"] = json!({"/before": {"sha256": sha, "bytes": 10, "stored": 5}});
        let light = TxnRecord::from_json(&serde_json::to_vec(&v4).expect("bytes")).expect("index record");
        assert!(!light.is_whole());
        assert_eq!(light.snapshots["/before"].bytes, 10);
        assert!(!light.snapshots["/before"].json);
        for (refs, what) in [
            (json!({"before": {"sha256": sha, "bytes": 1, "stored": 1}}), "not a JSON pointer"),
            (json!({"/before": {"sha256": "../../etc/passwd", "bytes": 1, "stored": 1}}), "SHA-256"),
        ] {
            let mut v5 = serde_json::to_value(rec()).expect("json");
            v5["snapshots"] = refs;
            let e = TxnRecord::from_json(&serde_json::to_vec(&v5).expect("bytes")).expect_err(what);
            assert!(e.to_string().contains(what), "{e}");
        }
        let mut v6 = serde_json::to_value(rec()).expect("json");
        v6["snapshots"] = json!({"/kind": {"sha256": sha, "bytes": 1, "stored": 1}});
        let e = TxnRecord::from_value(v6).expect_err("inline too");
        assert!(e.to_string().contains("inline too"), "{e}");
        assert!(matches!(TxnRecord::from_json(b"{}"), Err(TxnError::UnsupportedVersion { found: None })));
        assert!(matches!(TxnRecord::from_json(b"{\"version\": 1"), Err(TxnError::Json { .. })));
        // A bad id inside a record is refused.
        let mut v3 = serde_json::to_value(rec()).expect("json");
        v3["id"] = json!("../evil");
        assert!(matches!(TxnRecord::from_json(&serde_json::to_vec(&v3).expect("bytes")), Err(TxnError::Json { .. })));
    }

    /// Fuzzing (issue 14) found serde's "unknown variant" message quoting a record's string with
    /// its newlines raw: a planted record could print lines of its choosing.
    #[test]
    fn fuzz_record_error_quoting_newlines_is_one_line() {
        let mut v = serde_json::to_value(rec()).expect("json");
        v["kind"] = json!("x\nctguard: error: forged\u{1b}[2J");
        let msg = TxnRecord::from_json(&serde_json::to_vec(&v).expect("bytes")).expect_err("bad kind").to_string();
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
        assert!(msg.contains("unknown variant `x\\nctguard: error: forged\\u{1b}[2J`"), "{msg:?}");
    }

    #[test]
    fn status_shape() {
        let r = pending(); // deadline at boottime 100 s, wall T0 + 100
        let v = status_entry(&r, 40 * SEC + 1);
        assert_eq!(
            v,
            json!({
                "id": "20231114-221320-beef",
                "target": "host",
                "kind": "policy",
                "deadline": "2023-11-14T22:15:00Z",
                "seconds_left": 60,
                "requester": {"uid": 0, "pid": 4242, "ssh": "198.18.0.1 50000 198.18.0.2 22", "person": null},
                "state": "PENDING",
                "comment": null,
            })
        );
        assert_eq!(status_entry(&r, 200 * SEC)["seconds_left"], 0);
        assert_eq!(status_entry(&prepared(), 0)["seconds_left"], Value::Null);
        assert_eq!(status_entry(&prepared(), 0)["deadline"], Value::Null);
    }

    #[test]
    fn history_shape() {
        let v = history_entry(&rolled_back());
        assert_eq!(v["id"], "20231114-221320-beef");
        assert_eq!(v["target"], "host");
        assert_eq!(v["kind"], "policy");
        assert_eq!(v["state"], "ROLLED_BACK");
        assert_eq!(v["outcome"], "rolled back: deadline");
        assert_eq!(v["started"], "2023-11-14T22:13:20Z");
        assert_eq!(v["requester"]["pid"], 4242);
        let events = v["events"].as_array().expect("events");
        assert_eq!(events.len(), 3);
        assert_eq!(events[0]["time"], "2023-11-14T22:13:20Z");
        assert_eq!(events[0]["state"], "PREPARED");
        assert_eq!(events[2]["state"], "ROLLED_BACK");
        assert_eq!(events[2]["note"], "rolled back: deadline");
        assert_eq!(history_entry(&committed())["outcome"], "committed");
        assert_eq!(history_entry(&pending())["outcome"], "pending");
        assert_eq!(history_entry(&rollback_failed())["outcome"], "rollback failed (1 attempt): nft: EBUSY");
        let mut r = pending();
        r.to_rolled_back(Reason::Reboot, T0).expect("rb");
        assert_eq!(history_entry(&r)["outcome"], "rolled back: reboot (nothing restored)");
        let mut r = rec();
        r.kind = Kind::Ruleset;
        assert_eq!(history_entry(&r)["kind"], "ruleset");
    }

    #[test]
    fn notes_keep_state() {
        let mut r = pending();
        r.note(T0 + 7, "probe round 1 ok");
        assert_eq!(r.state, State::Pending);
        let last = r.events.last().expect("event");
        assert_eq!((last.wall_unix, last.state.as_str(), last.note.as_str()), (T0 + 7, "PENDING", "probe round 1 ok"));
    }
}
