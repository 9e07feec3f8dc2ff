//! The real engine for policy transactions: [`crate::backend::policy_txn`] behind the agent's
//! [`Engine`] trait. Undo records cross as [`Undo::Policy`].

use super::engine::{ApplyInput, Engine, EngineError, Prepared, Undo};
use crate::backend::policy_txn::{self, PolicyRequest, PolicyTxnError, PolicyUndo};
use crate::exit::Exit;

/// Policy transactions (DESIGN §1): ctguard's own table, its accept insertions, its sysctls.
pub struct PolicyEngine;

fn engine_error(e: PolicyTxnError) -> EngineError {
    EngineError {
        exit: e.exit(),
        message: policy_txn::chain_text(&e),
        retry: e.retryable(),
        lint: matches!(e, PolicyTxnError::Lint(_)),
    }
}

fn undo_of(u: &Undo) -> Result<&PolicyUndo, EngineError> {
    match u {
        Undo::Policy(p) => Ok(p),
        Undo::Ruleset(_) => Err(EngineError::new(Exit::Internal, "a ruleset undo record given to the policy engine")),
    }
}

struct PreparedPolicy(policy_txn::Prepared);

impl Prepared for PreparedPolicy {
    fn planned_undo(&self) -> Undo {
        Undo::Policy(Box::new(self.0.undo_record()))
    }
    fn before(&self) -> String {
        self.0.before.clone()
    }
    fn warnings(&self) -> Vec<String> {
        self.0.warnings.clone()
    }
    fn apply(self: Box<Self>) -> Result<Undo, EngineError> {
        policy_txn::apply(&self.0).map(|u| Undo::Policy(Box::new(u))).map_err(engine_error)
    }
    fn apply_listed(self: Box<Self>) -> Result<(Undo, Option<String>), EngineError> {
        let u = policy_txn::apply(&self.0).map_err(engine_error)?;
        // The change is made: a failure to list it only leaves the listing to the caller.
        let after = match policy_txn::after_listing(&self.0, &u) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!("the listing after apply: {}", policy_txn::chain_text(&e));
                None
            }
        };
        Ok((Undo::Policy(Box::new(u)), after))
    }
}

impl Engine for PolicyEngine {
    fn prepare(&self, input: &ApplyInput) -> Result<Box<dyn Prepared>, EngineError> {
        let previous = match &input.previous_undo {
            Some(v) => Some(undo_of(v)?.clone()),
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

    fn check_rollback(&self, undo: &Undo) -> Result<(), EngineError> {
        policy_txn::check_rollback(undo_of(undo)?).map_err(engine_error)
    }

    fn rollback(&self, undo: &Undo) -> Result<(), EngineError> {
        let report = policy_txn::rollback(undo_of(undo)?).map_err(engine_error)?;
        for w in report.warnings {
            tracing::warn!("rollback: {w}");
        }
        Ok(())
    }

    fn missing(&self, undo: &Undo) -> Result<Option<Vec<String>>, EngineError> {
        policy_txn::guard::missing(undo_of(undo)?).map(Some).map_err(engine_error)
    }

    fn degrade(&self, undo: &Undo) -> Result<(), EngineError> {
        let report = policy_txn::guard::degrade(undo_of(undo)?).map_err(engine_error)?;
        for w in report.warnings {
            tracing::warn!("degrade: {w}");
        }
        Ok(())
    }

    fn listing(&self, undo: &Undo) -> Result<String, EngineError> {
        let u = undo_of(undo)?;
        policy_txn::scope_listing(u, &u.sysctl_keys()).map_err(engine_error)
    }
}
