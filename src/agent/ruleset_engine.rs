//! The engine for ruleset transactions (`apply --ruleset FILE`): full snapshot and restore
//! (DESIGN §1), on top of [`crate::backend::ruleset_txn`] and [`crate::snapshot`].
//!
//! The undo record is a serialised [`UndoRecord`]: the snapshot (already complete in the
//! PREPARED record, so a crash mid-apply rolls back from it) and how the file was applied. What
//! others changed during the window is measured at rollback against the listing the agent
//! journals right after the apply ([`Engine::rollback_report`]'s `after`).

use super::engine::{ApplyInput, Engine, EngineError, Prepared, RollbackReport, Undo};
use crate::backend::ruleset_txn::{self, chain_text, Candidate, PrepareOptions, RulesetTxnError};
use crate::exit::Exit;
use crate::snapshot::{self, Snapshot, UndoRecord};

/// Ruleset transactions (DESIGN §1). Every method runs on the target's worker thread.
pub struct RulesetEngine;

fn engine_err(e: RulesetTxnError) -> EngineError {
    EngineError::new(e.exit(), chain_text(&e))
}

fn parse_undo(undo: &Undo) -> Result<&UndoRecord, EngineError> {
    match undo {
        Undo::Ruleset(r) => Ok(r),
        Undo::Policy(_) => Err(EngineError::new(Exit::Internal, "a policy undo record given to the ruleset engine")),
    }
}

impl RulesetEngine {
    /// [`Engine::rollback`], returning what others changed during the window: the drift the
    /// rollback overwrote, measured against `after` (the [`Engine::listing`] taken right after
    /// the apply, as the agent journals it); empty without `after`, or when the apply never
    /// completed. Idempotent: a second call restores the same state.
    pub fn rollback_with_drift(
        &self,
        undo: &Undo,
        after: Option<&str>,
    ) -> Result<Vec<snapshot::DriftSection>, EngineError> {
        let rec = parse_undo(undo)?;
        let applied = match (&rec.apply, after) {
            (Some(_), Some(text)) => match snapshot::state_from_listing(text) {
                Ok(st) => Some(st),
                Err(e) => {
                    tracing::warn!("the listing after the apply is unreadable, no drift report: {e}");
                    None
                }
            },
            _ => None,
        };
        let genid_after = rec.apply.as_ref().and_then(|a| a.genid_after);
        let report = ruleset_txn::restore(&rec.snapshot, applied.as_ref(), genid_after)
            .map_err(|e| EngineError::new(Exit::RollbackFailed, chain_text(&e)))?;
        tracing::info!(steps = ?report.steps, drift = report.drift.len(), raced = report.raced, "ruleset restored from the snapshot");
        Ok(report.drift)
    }
}

impl Engine for RulesetEngine {
    fn prepare(&self, input: &ApplyInput) -> Result<Box<dyn Prepared>, EngineError> {
        let Some(file) = &input.ruleset else {
            return Err(EngineError::new(Exit::BadInput, "a ruleset transaction needs a ruleset file"));
        };
        // The one preparation `plan --ruleset` runs too (DESIGN §5): same checks, same verdict.
        let opts = PrepareOptions { ssh: input.ssh, force: input.force, diff: false };
        let plan = ruleset_txn::prepare(&file.text, &file.format, opts).map_err(engine_err)?;
        let warnings = plan.verdict().map_err(engine_err)?;
        let mut undo = UndoRecord::planned(plan.snapshot, plan.tools);
        // `prepare` kernel-checked the whole restore script against the state before the apply.
        undo.restore_checked = true;
        Ok(Box::new(PreparedRuleset { undo, candidate: plan.candidate, warnings }))
    }

    fn check_rollback(&self, undo: &Undo) -> Result<(), EngineError> {
        let rec = parse_undo(undo)?;
        if let Some(g) = rec.deletes_checked_at {
            // Checked beside the listing right after the apply ([`Prepared::apply_listed`]):
            // while the generation id is the one checked, so is the ruleset.
            if crate::backend::netlink::get_genid().ok() == Some(g) {
                return Ok(());
            }
        }
        ruleset_txn::check_restore_after_apply(&rec.snapshot, rec.restore_checked).map_err(engine_err)
    }

    fn rollback(&self, undo: &Undo) -> Result<(), EngineError> {
        self.rollback_with_drift(undo, None).map(|_| ())
    }

    fn rollback_report(&self, undo: &Undo, after: Option<&str>) -> Result<RollbackReport, EngineError> {
        Ok(RollbackReport { drift: self.rollback_with_drift(undo, after)? })
    }

    fn listing(&self, _undo: &Undo) -> Result<String, EngineError> {
        ruleset_txn::listing().map_err(engine_err)
    }
}

/// A checked ruleset transaction: snapshot taken and proven restorable, file kernel-checked.
struct PreparedRuleset {
    undo: UndoRecord,
    candidate: Candidate,
    warnings: Vec<String>,
}

impl PreparedRuleset {
    /// A snapshot still valid for the apply: retaken (and its restore re-checked) when the
    /// generation id moved since it was taken.
    fn fresh_snapshot(&self) -> Result<(Snapshot, bool), RulesetTxnError> {
        let now = crate::backend::netlink::get_genid().map_err(RulesetTxnError::Genid)?;
        if self.undo.snapshot.state.genid == Some(now) {
            return Ok((self.undo.snapshot.clone(), false));
        }
        tracing::warn!("the ruleset changed between the snapshot and the apply; taking it again");
        let snap = ruleset_txn::take_snapshot()?;
        ruleset_txn::check_restore(&snap)?;
        Ok((snap, true))
    }
}

impl Prepared for PreparedRuleset {
    fn planned_undo(&self) -> Undo {
        Undo::Ruleset(Box::new(self.undo.clone()))
    }

    fn before(&self) -> String {
        snapshot::listing(&self.undo.snapshot.state)
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn apply(self: Box<Self>) -> Result<Undo, EngineError> {
        self.apply_record().map(|rec| Undo::Ruleset(Box::new(rec)))
    }

    /// [`Prepared::apply`], then the listing after it ([`Engine::listing`]) read on a thread
    /// of its own while this one kernel-checks the rollback's deletes
    /// ([`ruleset_txn::check_restore_after_apply_at`]); a check that passed at an unchanged
    /// generation id is recorded ([`UndoRecord::deletes_checked_at`]) so the agent's
    /// [`Engine::check_rollback`] does not repeat it while that id holds. A failed check is
    /// not an error here: the agent's check runs it again and undoes the change. A failed
    /// listing gives `None` (the agent reads it again).
    fn apply_listed(self: Box<Self>) -> Result<(Undo, Option<String>), EngineError> {
        let mut rec = self.apply_record()?;
        let (listing, checked) = std::thread::scope(|s| {
            let h = s.spawn(ruleset_txn::listing);
            let checked = ruleset_txn::check_restore_after_apply_at(&rec.snapshot, rec.restore_checked);
            (h.join(), checked)
        });
        match checked {
            Ok(at) => rec.deletes_checked_at = at,
            Err(e) => tracing::debug!(
                "the rollback check beside the listing failed; the agent's check decides: {}",
                chain_text(&e)
            ),
        }
        let listing = match listing {
            Ok(Ok(l)) => Some(l),
            Ok(Err(e)) => {
                tracing::debug!("the listing after the apply failed; read again: {}", chain_text(&e));
                None
            }
            Err(_) => None,
        };
        Ok((Undo::Ruleset(Box::new(rec)), listing))
    }
}

impl PreparedRuleset {
    /// The apply itself: the snapshot made fresh, the file applied, the record completed.
    fn apply_record(self: Box<Self>) -> Result<UndoRecord, EngineError> {
        let (snap, resnapshot) = self.fresh_snapshot().map_err(engine_err)?;
        let mut info = ruleset_txn::apply(&self.candidate).map_err(engine_err)?;
        info.resnapshot = resnapshot;
        let mut rec = self.undo;
        rec.genid_before = snap.state.genid;
        rec.genid_after = info.genid_after;
        rec.snapshot = snap;
        rec.apply = Some(info);
        Ok(rec)
    }
}
