//! Rollbacks and the dead-man timer of an owner's current transaction. Every function here
//! that changes state expects the caller to hold the owner's `op` lock, except the spawned
//! tasks (timer, retries), which take it themselves.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::engine::Undo;
use super::state::{Owner, Phase, Shared};
use super::steps::{fault, now_wall, wall, worker_for_record, write_record};
use crate::journal;
use crate::netns::unpin;
use crate::txn::{self, Reason, State};

/// How often a journal record that could not be written is tried again.
const JOURNAL_RETRY: Duration = Duration::from_secs(5);

/// Rolls back the owner's current transaction `txid` for `reason` and journals the outcome.
/// Caller holds `owner.op`. On success the target is free again; when the rollback fails the
/// phase becomes [`Phase::RollbackOwed`] and retries are scheduled (never given up); when the
/// kernel is restored but the journal cannot say so, the phase becomes [`Phase::Wedged`] and
/// the write is retried. Idempotent per transaction (the engines undo by tag).
pub async fn roll_back(shared: &Arc<Shared>, owner: &Arc<Owner>, txid: &str, reason: Reason) -> Result<(), String> {
    let Some(head) = owner.head(txid) else { return Ok(()) };
    let mut rec = match owner.record(txid) {
        Some(r) => r,
        // The held copy is damaged (logged): the journal holds the last written record.
        None => shared
            .journal
            .load(&head.id)
            .map_err(|e| format!("the record of {txid} cannot be read, in memory or in the journal: {e}"))?,
    };
    drop(head);
    owner.update(txid, |c| {
        if let Some(t) = c.timer.take() {
            t.abort();
        }
        c.phase = Phase::RollingBack;
    });
    let worker = worker_for_record(shared, &rec);
    fault("rollback:before-engine");
    // Descriptors: the reserve is given back for the rollback's tools and sockets.
    shared.release_spare_fds();
    let undo = Undo::from_record(rec.kind, &rec.undo).map_err(|e| e.message);
    let result = match (worker, undo) {
        (Ok(w), Ok(undo)) => {
            let engine = shared.engines.of(rec.kind);
            let after = rec.after.clone();
            match w.call(move || engine.rollback_report(&undo, after.as_deref())).await {
                Ok(r) => r.map_err(|e| e.message),
                Err(e) => Err(e.to_string()),
            }
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    shared.refill_spare_fds();
    fault("rollback:after-engine");
    match result {
        Ok(report) => {
            // What the rollback found and overwrote (a ruleset transaction's drift) joins the
            // undo record, journaled with the outcome below.
            if let (false, Some(undo)) = (report.drift.is_empty(), rec.undo.as_object_mut()) {
                undo.insert("drift".into(), serde_json::to_value(&report.drift).unwrap_or_default());
            }
            let _ = rec.to_rolled_back(reason.clone(), now_wall());
            tracing::warn!(txid, "rolled back ({reason})");
            if rec.target.label == "host" && reason == Reason::Deadline {
                wall(&format!("ctguard: transaction {txid} not confirmed; automatic rollback complete"));
            }
            owner.set_record(&rec);
            finish(shared, owner, &rec);
            drop(rec);
            super::state::release_memory_after_answer();
            Ok(())
        }
        Err(e) => {
            let _ = rec.to_rollback_failed(e.clone(), now_wall());
            let attempts = match &rec.state {
                State::RollbackFailed { attempts, .. } => *attempts,
                _ => 1,
            };
            let _ = write_record(shared, Some(owner), &rec);
            tracing::error!(txid, "ROLLBACK FAILED (attempt {attempts}): {e} — retrying; operator needed");
            let error = e.clone();
            let r2 = reason.clone();
            owner.set_record(&rec);
            owner.update(txid, |c| c.phase = Phase::RollbackOwed { attempts, error, reason: r2 });
            spawn_retry(shared.clone(), owner.clone(), txid.to_string(), txn::retry_delay(attempts));
            Err(e)
        }
    }
}

/// Journals a terminal record and frees the target; when the journal cannot be written the
/// target stays blocked ([`Phase::Wedged`]) and the write is retried until it succeeds.
pub fn finish(shared: &Arc<Shared>, owner: &Arc<Owner>, rec: &txn::TxnRecord) {
    let txid = rec.id.as_str().to_string();
    match write_record(shared, Some(owner), rec) {
        Ok(()) => {
            if let Some(p) = &rec.target.pin {
                unpin(Path::new(p));
            }
            shared.journal.release_reserve(&rec.id);
            owner.release(&txid);
            prune(shared);
            schedule_idle_check(shared);
        }
        Err(e) => {
            tracing::error!(
                txid = %txid,
                "the kernel is in its final state ({}) but the journal cannot record it: {e}; this target refuses new work until it can",
                rec.state.outcome()
            );
            owner.update(&txid, |c| c.phase = Phase::Wedged { error: e });
            let (s, o) = (shared.clone(), owner.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(JOURNAL_RETRY).await;
                    let _op = o.op.lock().await;
                    let Some(rec) = o.record(&txid) else { return };
                    if !matches!(o.current(), Some((_, Phase::Wedged { .. }))) {
                        return;
                    }
                    if write_record(&s, Some(&o), &rec).is_ok() {
                        tracing::warn!(txid = %txid, "journal writable again: {} recorded", rec.state.outcome());
                        if let Some(p) = &rec.target.pin {
                            unpin(Path::new(p));
                        }
                        s.journal.release_reserve(&rec.id);
                        o.release(&txid);
                        prune(&s);
                        schedule_idle_check(&s);
                        return;
                    }
                }
            });
        }
    }
}

/// Bounded history, under the state-dir lock; best effort.
pub fn prune(shared: &Shared) {
    let _lock = shared.journal.try_lock();
    let _ = shared.journal.prune(journal::DEFAULT_KEEP);
}

/// Retries an owed rollback after `delay`, and again with backoff (capped at 30 s) for as
/// long as it fails. Each attempt is logged and journaled.
fn spawn_retry(shared: Arc<Shared>, owner: Arc<Owner>, txid: String, delay: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _op = owner.op.lock().await;
        let reason = match owner.current() {
            Some((id, Phase::RollbackOwed { reason, .. })) if id == txid => reason,
            _ => return,
        };
        tracing::warn!(txid = %txid, "retrying the rollback");
        // A failure schedules the next attempt itself.
        let _ = roll_back(&shared, &owner, &txid, reason).await;
    });
}

/// Arms the dead-man timer of the owner's current transaction `txid` for `deadline_bt`
/// (absolute CLOCK_BOOTTIME ns), replacing any earlier one.
pub fn arm_timer(shared: &Arc<Shared>, owner: &Arc<Owner>, txid: &str, deadline_bt: u64) {
    let (s, o, id) = (shared.clone(), owner.clone(), txid.to_string());
    let handle = tokio::spawn(async move {
        if let Err(e) = super::timer::sleep_until_boottime(deadline_bt).await {
            tracing::error!("timerfd failed ({e}); rolling back now");
        }
        deadline_fired(s, o, id).await;
    });
    let abort = handle.abort_handle();
    owner.update(txid, move |c| {
        if let Some(old) = c.timer.replace(abort) {
            old.abort();
        }
    });
}

/// The deadline: rolls back unless the transaction was confirmed, extended or ended while
/// this task waited for the owner.
async fn deadline_fired(shared: Arc<Shared>, owner: Arc<Owner>, txid: String) {
    let _op = owner.op.lock().await;
    let Some(rec) = owner.head(&txid) else { return };
    if !matches!(owner.current(), Some((_, Phase::Pending))) {
        return;
    }
    // Extended meanwhile: the newer timer owns the new deadline.
    if rec.deadline.as_ref().is_some_and(|d| d.boottime_ns > journal::boottime_ns()) {
        return;
    }
    // This task is the timer: forget it so the rollback does not abort it.
    owner.update(&txid, |c| c.timer = None);
    tracing::warn!(txid = %txid, "deadline reached without confirmation; rolling back");
    let _ = roll_back(&shared, &owner, &txid, Reason::Deadline).await;
}

/// Asks the main loop to check for idleness once `idle_exit` has passed.
pub fn schedule_idle_check(shared: &Arc<Shared>) {
    if !shared.opts.detached {
        return;
    }
    let s = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(s.opts.idle_exit).await;
        s.idle.notify_one();
    });
}
