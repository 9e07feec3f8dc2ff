//! What the agent does on its own: the dead-man timers, rollbacks (with retries when they
//! fail), stopping on SIGTERM, and recovery from the journal at start.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::server::*;
use super::worker::Worker;
use crate::journal;
use crate::netns::{unpin, Target, TargetSpec};
use crate::txn::{self, Reason, Recovery, State, TxnId, TxnRecord};

/// Rolls back `rec` on `worker` and journals the outcome; on failure schedules a retry.
pub(super) async fn do_rollback(
    shared: &Arc<Shared>,
    worker: &Worker,
    rec: &mut TxnRecord,
    reason: Reason,
) -> Result<(), String> {
    let engine = shared.engines.of(rec.kind);
    let undo = rec.undo.clone();
    let after = rec.after.clone();
    fault("rollback:before-engine");
    let result = match worker.call(move || engine.rollback_report(&undo, after.as_deref())).await {
        Ok(r) => r.map_err(|e| e.message),
        Err(e) => Err(e.to_string()),
    };
    fault("rollback:after-engine");
    match result {
        Ok(report) => {
            // What the rollback found and overwrote (a ruleset transaction's drift) joins the
            // undo record, journaled with the outcome below.
            if let (serde_json::Value::Object(extra), Some(undo)) = (report, rec.undo.as_object_mut()) {
                undo.extend(extra);
            }
            let is_host = rec.target.label == "host";
            let _ = rec.to_rolled_back(reason.clone(), now_wall());
            if let Err(e) = shared.journal.write(rec) {
                tracing::error!("journal: {e}");
            }
            if let Some(p) = &rec.target.pin {
                unpin(Path::new(p));
            }
            let _ = shared.journal.prune(journal::DEFAULT_KEEP);
            schedule_idle_check(shared);
            tracing::warn!(txid = rec.id.as_str(), "rolled back ({reason})");
            if is_host && reason == Reason::Deadline {
                wall(&format!("ctguard: transaction {} not confirmed; automatic rollback complete", rec.id));
            }
            Ok(())
        }
        Err(e) => {
            let _ = rec.to_rollback_failed(e.clone(), now_wall());
            if let Err(je) = shared.journal.write(rec) {
                tracing::error!("journal: {je}");
            }
            let attempts = match &rec.state {
                State::RollbackFailed { attempts, .. } => *attempts,
                _ => 1,
            };
            tracing::error!(txid = rec.id.as_str(), "ROLLBACK FAILED (attempt {attempts}): {e} — operator needed");
            let delay = txn::retry_delay(attempts);
            let s = shared.clone();
            let id = rec.id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                retry_rollback(s, id).await;
            });
            Err(e)
        }
    }
}

pub(super) fn retry_rollback(
    shared: Arc<Shared>,
    id: TxnId,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let Ok(mut rec) = shared.journal.load(&id) else { return };
        if !matches!(rec.state, State::RollbackFailed { .. }) {
            return;
        }
        if let Ok(w) = worker_for_record(&shared, &rec).await {
            let _ = do_rollback(&shared, &w, &mut rec, Reason::Recovered).await;
        }
    })
}

/// Notifies logged-in users, Junos-style; best effort.
pub(super) fn wall(message: &str) {
    if let Ok(tool) = crate::backend::exec::Tool::find("wall") {
        let _ = tool.run(&[message], None);
    }
}

pub(super) async fn arm_timer(shared: &Arc<Shared>, txid: String, deadline_bt: u64) {
    let s = shared.clone();
    let id = txid.clone();
    let handle = tokio::spawn(async move {
        if let Err(e) = super::timer::sleep_until_boottime(deadline_bt).await {
            tracing::error!("timerfd failed ({e}); rolling back now");
        }
        deadline_fired(s, id).await;
    });
    let mut inner = shared.inner.lock().await;
    if let Some(old) = inner.timers.insert(txid, handle.abort_handle()) {
        old.abort();
    }
}

pub(super) async fn deadline_fired(shared: Arc<Shared>, txid: String) {
    let Ok(id) = TxnId::parse(&txid) else { return };
    let Ok(mut rec) = shared.journal.load(&id) else { return };
    shared.inner.lock().await.timers.remove(&txid);
    if rec.state != State::Pending {
        return;
    }
    tracing::warn!(txid = %txid, "deadline reached without confirmation; rolling back");
    match worker_for_record(&shared, &rec).await {
        Ok(w) => {
            let _ = do_rollback(&shared, &w, &mut rec, Reason::Deadline).await;
        }
        Err(e) => {
            let _ = rec.to_rollback_failed(e.clone(), now_wall());
            let _ = shared.journal.write(&rec);
            tracing::error!(txid = %txid, "ROLLBACK FAILED: {e}");
        }
    }
}

/// The worker of a journaled transaction's target: through its pin (survives agent crashes),
/// else through the recorded path — each checked against the recorded device and inode.
pub(super) async fn worker_for_record(shared: &Shared, rec: &TxnRecord) -> Result<Worker, String> {
    let mut tried = Vec::new();
    for path in rec.target.pin.iter().chain(std::iter::once(&rec.target.path)) {
        match Target::open(&TargetSpec::Path(PathBuf::from(path))) {
            Ok(t) if t.id == (rec.target.dev, rec.target.ino) => {
                return worker_for(shared, t).await.map_err(|r| r.error.unwrap_or_default());
            }
            Ok(_) => tried.push(format!("{path} is another namespace now")),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(format!("the transaction's namespace is gone or unreachable: {}", tried.join("; ")))
}

pub(super) async fn cancel_timer(shared: &Shared, txid: &str) {
    if let Some(h) = shared.inner.lock().await.timers.remove(txid) {
        h.abort();
    }
}

/// SIGTERM/SIGINT: roll back everything unfinished before exit.
pub(super) async fn stop_all(shared: &Arc<Shared>) {
    for mut rec in unfinished(shared) {
        cancel_timer(shared, rec.id.as_str()).await;
        match worker_for_record(shared, &rec).await {
            Ok(w) => {
                let _ = do_rollback(shared, &w, &mut rec, Reason::AgentStopping).await;
            }
            Err(e) => tracing::error!(txid = rec.id.as_str(), "cannot reach the target to roll back: {e}"),
        }
    }
}

/// Journal recovery on start (DESIGN §2).
pub(super) async fn recover(shared: &Arc<Shared>) {
    let now = journal::boottime_ns();
    for mut rec in unfinished(shared) {
        match txn::recovery_action(&rec, &shared.boot_id, now) {
            Recovery::Nothing => {}
            Recovery::CloseRebooted => {
                let _ = rec.to_rolled_back(Reason::Reboot, now_wall());
                let _ = shared.journal.write(&rec);
                if let Some(p) = &rec.target.pin {
                    unpin(Path::new(p));
                }
                tracing::warn!(txid = rec.id.as_str(), "closed: the host rebooted (nothing restored)");
            }
            Recovery::Rearm { remaining_ns } => {
                tracing::warn!(txid = rec.id.as_str(), "re-armed: {} s left", remaining_ns / 1_000_000_000);
                if let Some(d) = &rec.deadline {
                    arm_timer(shared, rec.id.as_str().to_string(), d.boottime_ns).await;
                }
            }
            Recovery::RollBackNow | Recovery::RetryRollback => {
                tracing::warn!(txid = rec.id.as_str(), "found {} at start: rolling back", rec.state.name());
                match worker_for_record(shared, &rec).await {
                    Ok(w) => {
                        let _ = do_rollback(shared, &w, &mut rec, Reason::Recovered).await;
                    }
                    Err(e) => {
                        let _ = rec.to_rollback_failed(e.clone(), now_wall());
                        let _ = shared.journal.write(&rec);
                        tracing::error!(txid = rec.id.as_str(), "ROLLBACK FAILED: {e}");
                    }
                }
            }
        }
    }
}
