//! The engine for ruleset transactions (`apply --ruleset FILE`): full snapshot and restore.

use serde_json::Value;

use super::engine::{ApplyInput, Engine, EngineError, Prepared};
use crate::exit::Exit;

/// Ruleset transactions (DESIGN §1).
pub struct RulesetEngine;

impl Engine for RulesetEngine {
    fn prepare(&self, _input: &ApplyInput) -> Result<Box<dyn Prepared>, EngineError> {
        Err(EngineError { exit: Exit::BadInput, message: "ruleset transactions are not available yet".into() })
    }
    fn check_rollback(&self, _undo: &Value) -> Result<(), EngineError> {
        Err(EngineError { exit: Exit::Internal, message: "ruleset transactions are not available yet".into() })
    }
    fn rollback(&self, _undo: &Value) -> Result<(), EngineError> {
        Err(EngineError { exit: Exit::Internal, message: "ruleset transactions are not available yet".into() })
    }
    fn listing(&self, _undo: &Value) -> Result<String, EngineError> {
        Ok(String::new())
    }
}
