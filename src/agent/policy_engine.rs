//! The real engine for policy transactions: [`crate::backend::policy_txn`] behind the agent's
//! [`Engine`] trait.

use serde_json::Value;

use super::engine::{ApplyInput, Engine, EngineError, Prepared};
use crate::exit::Exit;

/// Policy transactions (DESIGN §1): ctguard's own table, its accept insertions, its sysctls.
pub struct PolicyEngine;

impl Engine for PolicyEngine {
    fn prepare(&self, _input: &ApplyInput) -> Result<Box<dyn Prepared>, EngineError> {
        Err(EngineError { exit: Exit::Internal, message: "policy transactions are being wired in".into() })
    }
    fn check_rollback(&self, _undo: &Value) -> Result<(), EngineError> {
        Ok(())
    }
    fn rollback(&self, _undo: &Value) -> Result<(), EngineError> {
        Ok(())
    }
    fn listing(&self, _undo: &Value) -> Result<String, EngineError> {
        Ok(String::new())
    }
}
