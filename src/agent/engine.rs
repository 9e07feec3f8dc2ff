//! What the agent asks of a transaction kind, run on the target's worker thread. The agent
//! owns the state machine, the journal and the timer; an engine owns the netfilter work. A fake
//! engine drives the agent's unit tests; [`PolicyEngine`](crate::agent::policy_engine::PolicyEngine) is the real one.

use serde_json::Value;

use crate::backend::policy_txn::PolicyUndo;
use crate::exit::Exit;
use crate::lint::SshConn;
use crate::model::auto::MachineFacts;
use crate::model::names::Tag;
use crate::model::Policy;
use crate::snapshot::{DriftSection, UndoRecord};
use crate::txn::Kind;

/// An engine failure with the exit code it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError {
    /// DESIGN §5 exit code.
    pub exit: Exit,
    /// One line.
    pub message: String,
    /// True when another writer changed the ruleset between the engine's read and its commit
    /// (a generation-id conflict: `ERESTART` from the batch, or the generation id moved by more
    /// than ctguard's own commits). Nothing of the attempt is left applied: the caller may
    /// re-read and re-plan (a bounded number of times) and finally report the change (exit 3).
    pub retry: bool,
    /// True when the lint refused (exit 3 without `--force`): the change would block a flow,
    /// lock out the requester or widen access. The guard then degrades instead of repairing.
    pub lint: bool,
}

impl EngineError {
    /// A final (not retryable) error.
    pub fn new(exit: Exit, message: impl Into<String>) -> EngineError {
        EngineError { exit, message: message.into(), retry: false, lint: false }
    }

    /// A generation-id conflict: the attempt was undone; re-read, re-plan and retry.
    pub fn retryable(exit: Exit, message: impl Into<String>) -> EngineError {
        EngineError { exit, message: message.into(), retry: true, lint: false }
    }
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A ruleset file for a ruleset transaction (`apply --ruleset FILE`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RulesetInput {
    /// The file's content.
    pub text: String,
    /// `"nft"` or `"iptables"` (an iptables-restore dump); detected by the CLI when not given.
    pub format: String,
}

/// Everything an apply needs, resolved by the agent.
#[derive(Debug, Clone)]
pub struct ApplyInput {
    /// The validated policy (policy transactions; the built-in one otherwise, unused).
    pub policy: Policy,
    /// The ruleset (ruleset transactions).
    pub ruleset: Option<RulesetInput>,
    /// `ctguard:TXID`.
    pub tag: Tag,
    /// Apply despite lint errors.
    pub force: bool,
    /// The requester's SSH connection.
    pub ssh: Option<SshConn>,
    /// Undo record of the COMMITTED policy transaction this one replaces, if any.
    pub previous_undo: Option<Undo>,
    /// Machine facts for `"auto"`.
    pub facts: MachineFacts,
}

/// What a transaction must undo, typed per kind: what crosses between the agent and an engine.
/// The journal stores it as JSON in the record's `undo` ([`Undo::to_value`],
/// [`Undo::from_record`]); the agent adds `persisted` there at commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// A policy transaction: ctguard's objects, insertions and sysctl values.
    Policy(Box<PolicyUndo>),
    /// A ruleset transaction: the snapshot to restore.
    Ruleset(Box<UndoRecord>),
}

impl Undo {
    /// The typed undo of a journaled record of `kind`. An error means the record cannot be
    /// rolled back by this version (exit 1, shown and retried by the agent).
    pub fn from_record(kind: Kind, v: &Value) -> Result<Undo, EngineError> {
        let bad = |e: serde_json::Error| {
            EngineError::new(Exit::Internal, format!("the journal's undo record is not understood: {e}"))
        };
        Ok(match kind {
            Kind::Policy => Undo::Policy(Box::new(serde_json::from_value(v.clone()).map_err(bad)?)),
            Kind::Ruleset => Undo::Ruleset(Box::new(serde_json::from_value(v.clone()).map_err(bad)?)),
        })
    }

    /// The JSON the journal stores.
    pub fn to_value(&self) -> Value {
        let v = match self {
            Undo::Policy(u) => serde_json::to_value(u),
            Undo::Ruleset(u) => serde_json::to_value(u),
        };
        // Both hold only strings, numbers, maps and lists: encoding cannot fail.
        v.unwrap_or(Value::Null)
    }

    /// Generation id the change was planned against.
    pub fn genid_before(&self) -> Option<u32> {
        match self {
            Undo::Policy(u) => Some(u.genid_before),
            Undo::Ruleset(u) => u.genid_before,
        }
    }

    /// Generation id right after the change, once applied.
    pub fn genid_after(&self) -> Option<u32> {
        match self {
            Undo::Policy(u) => u.genid_after,
            Undo::Ruleset(u) => u.genid_after,
        }
    }
}

/// What a rollback found and overwrote, for the journal and `show`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RollbackReport {
    /// A ruleset transaction's drift: what others changed during the window.
    pub drift: Vec<DriftSection>,
}

/// A transaction that passed every check and has not changed anything yet.
pub trait Prepared: Send {
    /// What the rollback must undo if the agent dies during apply (journaled in PREPARED):
    /// enough to roll back by tag.
    fn planned_undo(&self) -> Undo;
    /// The listing before the change (for `show` and the diff).
    fn before(&self) -> String;
    /// Warnings (lint, skipped sysctls) to report to the requester.
    fn warnings(&self) -> Vec<String>;
    /// Applies the change; returns the undo record with what was actually created.
    fn apply(self: Box<Self>) -> Result<Undo, EngineError>;
    /// [`Prepared::apply`], with the listing after the change when the engine knows it from
    /// the commit itself (`None`: the caller reads it with [`Engine::listing`]).
    fn apply_listed(self: Box<Self>) -> Result<(Undo, Option<String>), EngineError> {
        self.apply().map(|u| (u, None))
    }
}

/// The engines of both transaction kinds.
#[derive(Clone)]
pub struct Engines {
    /// Policy transactions.
    pub policy: std::sync::Arc<dyn Engine>,
    /// Ruleset transactions.
    pub ruleset: std::sync::Arc<dyn Engine>,
}

impl Engines {
    /// The engine of `kind`.
    pub fn of(&self, kind: crate::txn::Kind) -> std::sync::Arc<dyn Engine> {
        match kind {
            crate::txn::Kind::Policy => self.policy.clone(),
            crate::txn::Kind::Ruleset => self.ruleset.clone(),
        }
    }
}

/// A kind of transaction. All methods run on the target's worker thread.
pub trait Engine: Send + Sync + 'static {
    /// Preconditions, lint and kernel checks: changes nothing.
    fn prepare(&self, input: &ApplyInput) -> Result<Box<dyn Prepared>, EngineError>;
    /// Kernel-checks the rollback of `undo` without changing anything.
    fn check_rollback(&self, undo: &Undo) -> Result<(), EngineError>;
    /// Undoes the change recorded in `undo`, by tag; idempotent.
    fn rollback(&self, undo: &Undo) -> Result<(), EngineError>;
    /// [`Engine::rollback`], returning what the rollback found and overwrote (a ruleset
    /// transaction's drift: what others changed during the window, measured against `after`,
    /// the journaled listing taken right after the apply). Same guarantees as `rollback`.
    fn rollback_report(&self, undo: &Undo, after: Option<&str>) -> Result<RollbackReport, EngineError> {
        let _ = after;
        self.rollback(undo).map(|()| RollbackReport::default())
    }
    /// The current listing (for `show` and the diff).
    fn listing(&self, undo: &Undo) -> Result<String, EngineError>;
    /// The guard of a committed transaction: its objects that are missing now, one line each
    /// (empty: intact); `None` when this kind is not guarded (the default). Read-only.
    fn missing(&self, undo: &Undo) -> Result<Option<Vec<String>>, EngineError> {
        let _ = undo;
        Ok(None)
    }
    /// The guard's fail-safe: removes the transaction's NOTRACK objects so the service runs
    /// tracked; keeps sysctls. Idempotent.
    fn degrade(&self, undo: &Undo) -> Result<(), EngineError> {
        let _ = undo;
        Ok(())
    }
}
