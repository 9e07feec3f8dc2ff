//! What the agent asks of a transaction kind, run on the target's worker thread. The agent
//! owns the state machine, the journal and the timer; an engine owns the netfilter work. A fake
//! engine drives the agent's unit tests; [`PolicyEngine`] is the real one.

use serde_json::Value;

use crate::exit::Exit;
use crate::lint::SshConn;
use crate::model::auto::MachineFacts;
use crate::model::names::Tag;
use crate::model::Policy;

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
}

impl EngineError {
    /// A final (not retryable) error.
    pub fn new(exit: Exit, message: impl Into<String>) -> EngineError {
        EngineError { exit, message: message.into(), retry: false }
    }

    /// A generation-id conflict: the attempt was undone; re-read, re-plan and retry.
    pub fn retryable(exit: Exit, message: impl Into<String>) -> EngineError {
        EngineError { exit, message: message.into(), retry: true }
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
    pub previous_undo: Option<Value>,
    /// Machine facts for `"auto"`.
    pub facts: MachineFacts,
}

/// A transaction that passed every check and has not changed anything yet.
pub trait Prepared: Send {
    /// What the rollback must undo if the agent dies during apply (journaled in PREPARED):
    /// enough to roll back by tag.
    fn planned_undo(&self) -> Value;
    /// The listing before the change (for `show` and the diff).
    fn before(&self) -> String;
    /// Warnings (lint, skipped sysctls) to report to the requester.
    fn warnings(&self) -> Vec<String>;
    /// Applies the change; returns the undo record with what was actually created.
    fn apply(self: Box<Self>) -> Result<Value, EngineError>;
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
    fn check_rollback(&self, undo: &Value) -> Result<(), EngineError>;
    /// Undoes the change recorded in `undo`, by tag; idempotent.
    fn rollback(&self, undo: &Value) -> Result<(), EngineError>;
    /// [`Engine::rollback`], returning what the rollback found and overwrote, for the agent to
    /// merge into the undo record and report (a ruleset transaction's `{"drift": [...]}`: what
    /// others changed during the window, measured against `after`, the journaled listing taken
    /// right after the apply); `Value::Null` when there is nothing to report. Same guarantees
    /// as `rollback`.
    fn rollback_report(&self, undo: &Value, after: Option<&str>) -> Result<Value, EngineError> {
        let _ = after;
        self.rollback(undo).map(|()| Value::Null)
    }
    /// The current listing (for `show` and the diff).
    fn listing(&self, undo: &Value) -> Result<String, EngineError>;
}
