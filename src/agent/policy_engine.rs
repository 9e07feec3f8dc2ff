//! The real engine for policy transactions: [`crate::backend::policy_txn`] behind the agent's
//! [`Engine`] trait. Undo records travel through the journal as JSON.

use serde_json::Value;

use super::engine::{ApplyInput, Engine, EngineError, Prepared};
use crate::backend::policy_txn::{self, PolicyRequest, PolicyTxnError, PolicyUndo};
use crate::exit::Exit;

/// Policy transactions (DESIGN §1): ctguard's own table, its accept insertions, its sysctls.
pub struct PolicyEngine;

fn engine_error(e: PolicyTxnError) -> EngineError {
    EngineError { exit: e.exit(), message: policy_txn::chain_text(&e), retry: e.retryable() }
}

fn undo_of(v: &Value) -> Result<PolicyUndo, EngineError> {
    serde_json::from_value(v.clone())
        .map_err(|e| EngineError::new(Exit::Internal, format!("journal undo record not understood: {e}")))
}

fn to_value(u: &PolicyUndo) -> Value {
    match serde_json::to_value(u) {
        Ok(v) => v,
        // PolicyUndo holds only strings, numbers and lists: encoding cannot fail.
        Err(e) => unreachable!("PolicyUndo is always encodable: {e}"),
    }
}

struct PreparedPolicy(policy_txn::Prepared);

impl Prepared for PreparedPolicy {
    fn planned_undo(&self) -> Value {
        to_value(&self.0.undo_record())
    }
    fn before(&self) -> String {
        self.0.before.clone()
    }
    fn warnings(&self) -> Vec<String> {
        self.0.warnings.clone()
    }
    fn apply(self: Box<Self>) -> Result<Value, EngineError> {
        policy_txn::apply(&self.0).map(|u| to_value(&u)).map_err(engine_error)
    }
}

impl Engine for PolicyEngine {
    fn prepare(&self, input: &ApplyInput) -> Result<Box<dyn Prepared>, EngineError> {
        let previous = match &input.previous_undo {
            Some(v) => Some(undo_of(v)?),
            None => None,
        };
        let req = PolicyRequest {
            policy: input.policy.clone(),
            tag: input.tag.clone(),
            force: input.force,
            ssh: input.ssh,
            previous,
        };
        let prepared = policy_txn::prepare(&req, input.facts).map_err(engine_error)?;
        Ok(Box::new(PreparedPolicy(prepared)))
    }

    fn check_rollback(&self, undo: &Value) -> Result<(), EngineError> {
        policy_txn::check_rollback(&undo_of(undo)?).map_err(engine_error)
    }

    fn rollback(&self, undo: &Value) -> Result<(), EngineError> {
        let report = policy_txn::rollback(&undo_of(undo)?).map_err(engine_error)?;
        for w in report.warnings {
            tracing::warn!("rollback: {w}");
        }
        Ok(())
    }

    fn listing(&self, undo: &Value) -> Result<String, EngineError> {
        let keys = undo_of(undo)?.sysctl_keys();
        policy_txn::listing(&keys).map_err(engine_error)
    }
}
