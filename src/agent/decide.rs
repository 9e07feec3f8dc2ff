//! The verbs that end or move a pending transaction: confirm (with the new-connection proof),
//! extend, rollback now, and SIGUSR1.
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::apply::*;
use super::lifecycle::*;
use super::proof;
use super::protocol::Response;
use super::server::*;
use crate::exit::Exit;
use crate::journal;
use crate::netns::unpin;
use crate::txn::{self, Deadline, Reason, State, TxnId, TxnRecord};

/// Finds the transaction a confirm/extend/rollback names, or the single unfinished one.
pub(super) fn pick(shared: &Shared, txid: Option<&str>) -> Result<TxnRecord, Response> {
    match txid {
        Some(t) => {
            let id = TxnId::parse(t).map_err(|e| Response::fail(Exit::BadInput, e.to_string()))?;
            shared.journal.load(&id).map_err(|e| Response::fail(Exit::BadInput, e.to_string()))
        }
        None => {
            let mut pending: Vec<TxnRecord> = unfinished(shared);
            match pending.len() {
                0 => Err(Response::fail(Exit::BadInput, "no transaction is pending")),
                1 => Ok(pending.remove(0)),
                n => Err(Response::fail(Exit::BadInput, format!("{n} transactions are pending; name one"))),
            }
        }
    }
}

pub(super) async fn confirm(shared: &Arc<Shared>, txid: Option<&str>, peer_pid: Option<i32>) -> Response {
    let rec = match pick(shared, txid) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match &rec.state {
        State::Committed => {
            return Response::ok(json!({"txid": rec.id.as_str(), "state": "COMMITTED", "note": "already committed"}))
        }
        State::RolledBack { reason } => {
            return Response::fail(
                Exit::RolledBack,
                format!("transaction {} was already rolled back ({reason})", rec.id),
            )
        }
        State::RollbackFailed { .. } => {
            return Response::fail(
                Exit::RollbackFailed,
                format!("transaction {}: rollback failed; state unknown", rec.id),
            )
        }
        State::Prepared => {
            return Response::fail(Exit::BadInput, format!("transaction {} is still being applied", rec.id))
        }
        State::Pending => {}
    }
    // The proof of a new connection (DESIGN §4).
    let mut note = "confirmed".to_string();
    if !rec.options.allow_same_connection {
        let confirming = match peer_pid.map(proof::origin_of) {
            Some(Ok(o)) => o,
            Some(Err(e)) => {
                return Response::fail(
                    Exit::ConfirmRefused,
                    format!("confirm refused: cannot identify its SSH connection ({e})"),
                )
            }
            None => return Response::fail(Exit::ConfirmRefused, "confirm refused: the sender is gone"),
        };
        if let Some(applied) = &rec.requester.origin {
            if let Err(refusal) = proof::check_confirm(applied, &confirming) {
                return Response::fail(
                    Exit::ConfirmRefused,
                    format!(
                        "confirm refused: it came over the same SSH connection as the apply ({}); confirm from a NEW connection: {}",
                        refusal.conn,
                        confirm_command(shared, Some(&refusal.conn), rec.id.as_str())
                    ),
                );
            }
        }
        note = format!("confirmed from {confirming}");
    }
    commit(shared, rec, &note).await
}

/// PENDING → COMMITTED: cancel the timer, journal, persist when asked, unpin.
pub(super) async fn commit(shared: &Arc<Shared>, mut rec: TxnRecord, note: &str) -> Response {
    cancel_timer(shared, rec.id.as_str()).await;
    fault("confirm:before-journal");
    rec.note(now_wall(), note);
    if let Err(e) = rec.to_committed(now_wall()) {
        return Response::fail(Exit::Internal, e.to_string());
    }
    if let Err(e) = shared.journal.write(&rec) {
        // Not journaled: keep the dead-man timer (safety first).
        if let Some(d) = &rec.deadline {
            arm_timer(shared, rec.id.as_str().to_string(), d.boottime_ns).await;
        }
        return Response::fail(Exit::Internal, format!("journal: {e}"));
    }
    fault("confirm:after-journal");
    let mut persist_note = Value::Null;
    if crate::persist::wants_persist(&rec) {
        let paths = crate::persist::PersistPaths::detect(Path::new("/"), shared.journal.state_dir());
        match crate::persist::on_committed(&rec, &paths) {
            Ok(Some(written)) => {
                persist_note = serde_json::to_value(&written).unwrap_or(Value::Null);
                if let Some(u) = rec.undo.as_object_mut() {
                    u.insert("persisted".into(), persist_note.clone());
                }
                if let Err(e) = shared.journal.write(&rec) {
                    tracing::error!("journal: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(txid = rec.id.as_str(), "committed, but persisting failed: {e}");
                persist_note = json!({"error": e.to_string()});
            }
        }
    }
    if let Some(p) = &rec.target.pin {
        unpin(Path::new(p));
    }
    let _ = shared.journal.prune(journal::DEFAULT_KEEP);
    schedule_idle_check(shared);
    tracing::info!(txid = rec.id.as_str(), "{note}");
    Response::ok(json!({"txid": rec.id.as_str(), "state": "COMMITTED", "persisted": persist_note}))
}

pub(super) async fn extend(shared: &Arc<Shared>, txid: Option<&str>, by_secs: u64) -> Response {
    let mut rec = match pick(shared, txid) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match &rec.state {
        State::Pending => {}
        State::RolledBack { reason } => {
            return Response::fail(
                Exit::RolledBack,
                format!("transaction {} was already rolled back ({reason})", rec.id),
            )
        }
        s => return Response::fail(Exit::BadInput, format!("transaction {} is {}, not pending", rec.id, s.name())),
    }
    let Some(old) = rec.deadline.clone() else { return Response::fail(Exit::Internal, "pending without a deadline") };
    let by_ns = by_secs.saturating_mul(1_000_000_000);
    let new = Deadline {
        boottime_ns: old.boottime_ns + by_ns,
        boot_id: old.boot_id.clone(),
        wall_unix: old.wall_unix + by_secs,
    };
    if let Err(e) = rec.extend(new.clone(), now_wall()) {
        return Response::fail(Exit::BadInput, e.to_string());
    }
    if let Err(e) = shared.journal.write(&rec) {
        return Response::fail(Exit::Internal, format!("journal: {e}"));
    }
    arm_timer(shared, rec.id.as_str().to_string(), new.boottime_ns).await;
    let left = rec.seconds_left(journal::boottime_ns()).unwrap_or(0);
    Response::ok(json!({"txid": rec.id.as_str(), "deadline": txn::format_rfc3339(new.wall_unix), "seconds_left": left}))
}

pub(super) async fn rollback_request(shared: &Arc<Shared>, txid: Option<&str>) -> Response {
    let mut rec = match pick(shared, txid) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match &rec.state {
        State::Pending | State::Prepared | State::RollbackFailed { .. } => {}
        State::RolledBack { reason } => {
            return Response::ok(
                json!({"txid": rec.id.as_str(), "state": "ROLLED_BACK", "note": format!("already rolled back ({reason})")}),
            )
        }
        State::Committed => {
            return Response::fail(
                Exit::BadInput,
                format!("transaction {} is committed; apply a new policy to change it", rec.id),
            )
        }
    }
    cancel_timer(shared, rec.id.as_str()).await;
    let worker = match worker_for_record(shared, &rec).await {
        Ok(w) => w,
        Err(e) => return Response::fail(Exit::RollbackFailed, e),
    };
    match do_rollback(shared, &worker, &mut rec, Reason::Cancelled).await {
        Ok(()) => Response::ok(json!({"txid": rec.id.as_str(), "state": "ROLLED_BACK"})),
        Err(e) => Response::fail(Exit::RollbackFailed, format!("rollback of {} failed: {e}", rec.id)),
    }
}

pub(super) async fn confirm_by_signal(shared: &Arc<Shared>, pid: Option<i32>) {
    let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    if !alive {
        tracing::warn!("SIGUSR1 from a sender that is gone ({pid:?}): refused");
        return;
    }
    let r = confirm(shared, None, pid).await;
    match r.error {
        None => tracing::info!("SIGUSR1 from pid {pid:?} confirmed the pending transaction"),
        Some(e) => tracing::warn!("SIGUSR1 from pid {pid:?} refused: {e}"),
    }
}
