//! The guard of committed policies (DESIGN §2): while a committed policy exists on a target,
//! the agent watches it — nf_tables notifications (native nft and iptables-nft), a short poll
//! for iptables-legacy — and when ctguard's objects or its inserted accepts are gone (a host
//! firewall reload), it re-plans with the same planning core and puts them back in one
//! transaction carrying the generation id (`REPAIRED` event: what was missing, the gap). If
//! that would now need `--force` (the lint refuses: the host firewall changed so that the
//! insertion would widen access or block a flow), it removes ctguard's NOTRACK objects instead
//! so the service runs tracked (`DEGRADED`, shown by `status` until an operator acts).
//!
//! Every check and repair runs under the target's owner (`op` lock), never beside an apply,
//! confirm or rollback of the same target.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

use super::engine::{ApplyInput, Undo};
use super::state::{Guard, GuardState, Owner, Phase, Shared};
use super::steps::{now_wall, ram_facts, worker_for_record, write_record};
use super::worker::Worker;
use crate::backend::nft_monitor::NftMonitor;
use crate::model::names::Tag;
use crate::model::{Backend, Policy};
use crate::txn::{Kind, State, TxnRecord};

/// Environment variable: the iptables-legacy poll interval in milliseconds (default 1000).
pub const POLL_ENV: &str = "CTGUARD_GUARD_POLL_MS";
/// Default iptables-legacy poll interval.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// Notifications arriving within this window are one change (a reload is many messages).
const DEBOUNCE: Duration = Duration::from_millis(10);
/// A namespace target is checked for existence this often (the guard must not keep a deleted
/// namespace alive through its notification socket).
const LIVENESS: Duration = Duration::from_secs(60);
/// After a failed check or repair, the next try.
const RETRY: Duration = Duration::from_secs(5);

fn poll_interval() -> Duration {
    std::env::var(POLL_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(DEFAULT_POLL, Duration::from_millis)
}

/// The committed policy transaction a target's guard watches: the latest COMMITTED policy
/// transaction not followed by a committed ruleset transaction (which replaced the whole
/// firewall on purpose). Pure over the journal's records (sorted oldest first).
/// Only transactions committed in this boot (`boot_id`) are guarded: after a reboot the host
/// runs its persisted configuration, and ctguard's restore unit re-applies a persisted policy
/// as a new transaction.
pub fn guarded_record<'a>(records: &'a [TxnRecord], target: (u64, u64), boot_id: &str) -> Option<&'a TxnRecord> {
    let on: Vec<&TxnRecord> = records
        .iter()
        .filter(|r| (r.target.dev, r.target.ino) == target && r.state == State::Committed && r.boot_id == boot_id)
        .collect();
    match on.last() {
        Some(r) if r.kind == Kind::Policy && !r.options.remove => Some(r),
        _ => None,
    }
}

/// The state a guard starts in for `rec` (a `DEGRADED` event stays until an operator acts).
fn initial_state(rec: &TxnRecord) -> GuardState {
    match rec.events.iter().rev().find(|e| e.state == "DEGRADED" || e.state == "REPAIRED") {
        Some(e) if e.state == "DEGRADED" => GuardState::Degraded { reason: e.note.clone(), wall: e.wall_unix },
        _ => GuardState::Intact,
    }
}

/// Starts (or restarts) the guard of `rec` on `owner`, replacing any earlier one.
pub fn start(shared: &Arc<Shared>, owner: &Arc<Owner>, rec: TxnRecord) {
    owner.stop_guard();
    if rec.kind != Kind::Policy || rec.options.remove {
        return;
    }
    let wake = Arc::new(tokio::sync::Notify::new());
    let txid = rec.id.as_str().to_string();
    *owner.guard() = Some(Guard {
        txid: txid.clone(),
        target: rec.target.label.clone(),
        state: initial_state(&rec),
        last_error: None,
        wake: wake.clone(),
        task: None,
    });
    let (s, o) = (shared.clone(), owner.clone());
    let task = tokio::spawn(async move {
        watch(s, o, rec, wake).await;
    });
    if let Some(g) = owner.guard().as_mut().filter(|g| g.txid == txid) {
        g.task = Some(task.abort_handle());
    }
    tracing::info!(txid = %txid, "guarding the committed policy");
}

fn set_error(owner: &Owner, txid: &str, e: Option<String>) {
    if let Some(g) = owner.guard().as_mut().filter(|g| g.txid == txid) {
        g.last_error = e;
    }
}

/// Why a watch ended on its own.
enum Stop {
    /// This kind is not guarded, or the guard was replaced.
    NotGuarded,
    /// The target namespace is gone.
    TargetGone(String),
}

async fn watch(shared: Arc<Shared>, owner: Arc<Owner>, mut rec: TxnRecord, wake: Arc<tokio::sync::Notify>) {
    let txid = rec.id.as_str().to_string();
    let stop = loop {
        let worker = match worker_for_record(&shared, &rec) {
            Ok(w) => w,
            Err(e) => break Stop::TargetGone(e),
        };
        let monitor = match worker.call(NftMonitor::open).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                set_error(&owner, &txid, Some(format!("cannot subscribe to nf_tables notifications: {e}")));
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(e) => break Stop::TargetGone(e.to_string()),
        };
        // SAFETY: the descriptor is owned by the NftMonitor moved into the AsyncFd: it stays
        // open and refers to the same socket for as long as the registration exists.
        let registered = unsafe { AsyncFd::register_with_interest(monitor, tokio::io::Interest::READABLE) };
        let monitor = match registered.map_err(|e| e.into_parts().1) {
            Ok(m) => m,
            Err(e) => {
                set_error(&owner, &txid, Some(format!("notifications: {e}")));
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        match run(&shared, &owner, &mut rec, &worker, &monitor, &wake).await {
            Ok(s) => break s,
            Err(e) => {
                set_error(&owner, &txid, Some(e));
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    if let Stop::TargetGone(why) = &stop {
        tracing::warn!(txid = %txid, "guard stops: the target is gone ({why})");
    }
    let mut g = owner.guard();
    if g.as_ref().is_some_and(|g| g.txid == txid) {
        *g = None;
    }
    drop(g);
    super::rollback::schedule_idle_check(&shared);
}

/// The watch loop proper: a first check, then one per change. `Err` restarts the watch.
async fn run(
    shared: &Arc<Shared>,
    owner: &Arc<Owner>,
    rec: &mut TxnRecord,
    worker: &Worker,
    monitor: &AsyncFd<NftMonitor>,
    wake: &tokio::sync::Notify,
) -> Result<Stop, String> {
    let txid = rec.id.as_str().to_string();
    let undo = Undo::from_record(Kind::Policy, &rec.undo).map_err(|e| e.message)?;
    let legacy = match &undo {
        Undo::Policy(u) => u.backend == Backend::IptablesLegacy,
        Undo::Ruleset(_) => false,
    };
    let poll = poll_interval();
    let host = crate::netns::is_initial_id((rec.target.dev, rec.target.ino));
    let mut since = Instant::now();
    loop {
        match check(shared, owner, rec, worker, since).await {
            Ok(true) => {}
            Ok(false) => return Ok(Stop::NotGuarded),
            Err(e) => {
                set_error(owner, &txid, Some(e));
                tokio::time::sleep(RETRY).await;
                continue;
            }
        }
        // Wait for a change.
        loop {
            tokio::select! {
                ready = monitor.readable() => {
                    let mut ready = ready.map_err(|e| e.to_string())?;
                    let relevant = ready.get_inner().drain().map_err(|e| e.to_string())?;
                    ready.clear_ready();
                    tracing::debug!(txid = %txid, relevant, "guard: nf_tables notification");
                    if relevant {
                        since = Instant::now();
                        break;
                    }
                }
                _ = tokio::time::sleep(poll), if legacy => { since = Instant::now(); break; }
                _ = wake.notified() => { since = Instant::now(); break; }
                _ = tokio::time::sleep(LIVENESS), if !host => {
                    if let Err(e) = worker_for_record(shared, rec) {
                        return Ok(Stop::TargetGone(e));
                    }
                }
            }
        }
        // A reload is a burst of messages: let it finish.
        tokio::time::sleep(DEBOUNCE).await;
        // Non-blocking: whatever arrived meanwhile belongs to the same change.
        let _ = monitor.get_ref().drain();
        if owner.guard().as_ref().is_none_or(|g| g.txid != txid) {
            return Ok(Stop::NotGuarded);
        }
    }
}

/// One check under the owner; repairs or degrades when objects are missing. `Ok(false)`: the
/// engine does not guard this kind.
async fn check(
    shared: &Arc<Shared>,
    owner: &Arc<Owner>,
    rec: &mut TxnRecord,
    worker: &Worker,
    since: Instant,
) -> Result<bool, String> {
    let txid = rec.id.as_str().to_string();
    let _op = owner.op.lock().await;
    // A transaction holds the target: its end wakes the guard again.
    if owner.current().is_some() {
        return Ok(true);
    }
    let state = match owner.guard().as_ref().filter(|g| g.txid == txid) {
        Some(g) => g.state.clone(),
        None => return Ok(false),
    };
    let engine = shared.engines.of(Kind::Policy);
    let undo = Undo::from_record(Kind::Policy, &rec.undo).map_err(|e| e.message)?;
    let u2 = undo.clone();
    let missing = match worker.call(move || engine.missing(&u2)).await.map_err(|e| e.to_string())? {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(false),
        Err(e) => return Err(e.message),
    };
    tracing::debug!(txid = %txid, ?missing, "guard: checked");
    if missing.is_empty() {
        set_error(owner, &txid, None);
        return Ok(true);
    }
    if matches!(state, GuardState::Degraded { .. }) {
        // Already fail-safe: ctguard's NOTRACK objects were removed on purpose.
        return Ok(true);
    }
    tracing::warn!(txid = %txid, "committed policy damaged (a firewall reload?): missing {}", missing.join("; "));
    repair(shared, owner, rec, worker, undo, missing, since).await.map(|()| true)
}

/// Puts the missing objects back: the committed policy prepared again with its own tag over its
/// own undo (same planning core as `apply`), applied in one transaction carrying the
/// generation id, then journaled as a `REPAIRED` event of the committed record. A lint refusal
/// degrades instead. Caller holds `owner.op`.
async fn repair(
    shared: &Arc<Shared>,
    owner: &Arc<Owner>,
    rec: &mut TxnRecord,
    worker: &Worker,
    undo: Undo,
    missing: Vec<String>,
    since: Instant,
) -> Result<(), String> {
    let txid = rec.id.as_str().to_string();
    let policy: Policy = match rec.policy.as_ref().map(crate::persist::policy_from_record) {
        Some(Ok(p)) => p,
        Some(Err(e)) => return Err(format!("the committed policy in the journal is not understood: {e}")),
        None => return Err("the committed record holds no policy".into()),
    };
    let tag = Tag::new(rec.id.as_str()).map_err(|e| e.to_string())?;
    // Claim the target for the repair, as any transaction does.
    let claim = shared.claim(owner.id, rec.clone()).map_err(|b| format!("busy with {}", b.txid))?;
    claim.update(&txid, |c| c.phase = Phase::Repairing);
    let input = ApplyInput {
        policy,
        ruleset: None,
        tag,
        force: false,
        ssh: None,
        previous_undo: Some(undo.clone()),
        facts: ram_facts(),
    };
    // A foreign change racing the repair: re-read and re-plan, a bounded number of times.
    let mut result;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let engine = shared.engines.of(Kind::Policy);
        let inp = input.clone();
        result = worker
            .call(move || {
                // Test-only: a repair that fails for a reason other than the lint.
                if crate::fault::fires("guard:repair-fails") {
                    return Err(super::engine::EngineError::new(crate::exit::Exit::Refused, "injected repair failure"));
                }
                engine.prepare(&inp).and_then(|p| p.apply())
            })
            .await;
        match &result {
            Ok(Err(e)) if e.retry && attempt < super::owner::CONFLICT_RETRIES => continue,
            _ => break,
        }
    }
    let gap = since.elapsed();
    let outcome = match result {
        Ok(Ok(new_undo)) => {
            let merged = merge_history(&undo, new_undo);
            rec.undo = merged.to_value();
            rec.genid_after = merged.genid_after();
            let note = format!(
                "missing: {}; put back in {} ms after the change was seen",
                missing.join("; "),
                gap.as_millis()
            );
            journal_event(shared, rec, "REPAIRED", &note);
            tracing::warn!(txid = %txid, "REPAIRED: {note}");
            if let Some(g) = owner.guard().as_mut().filter(|g| g.txid == txid) {
                let count = match g.state {
                    GuardState::Repaired { count, .. } => count + 1,
                    _ => 1,
                };
                g.state = GuardState::Repaired { count, last_wall: now_wall(), last_gap_ms: gap.as_millis() as u64 };
                g.last_error = None;
            }
            Ok(())
        }
        Ok(Err(e)) if e.lint => {
            let reason = format!("putting the accepts back would need --force: {}", e.message);
            degrade(shared, owner, rec, worker, undo, reason).await
        }
        // NOTRACK without its accepts is a blackhole: whatever kept the repair from working,
        // fail safe now rather than retry while the service is down.
        Ok(Err(e)) => {
            let reason = format!("putting the accepts back failed: {}", e.message);
            degrade(shared, owner, rec, worker, undo, reason).await
        }
        Err(e) => Err(e.to_string()),
    };
    owner.release(&txid);
    outcome
}

/// The fail-safe: ctguard's NOTRACK objects removed so the service runs tracked again.
async fn degrade(
    shared: &Arc<Shared>,
    owner: &Arc<Owner>,
    rec: &mut TxnRecord,
    worker: &Worker,
    undo: Undo,
    reason: String,
) -> Result<(), String> {
    let txid = rec.id.as_str().to_string();
    let engine = shared.engines.of(Kind::Policy);
    match worker.call(move || engine.degrade(&undo)).await.map_err(|e| e.to_string())? {
        Ok(()) => {
            let note =
                format!("{reason}; ctguard's NOTRACK rules removed, the service runs tracked until an operator acts");
            journal_event(shared, rec, "DEGRADED", &note);
            tracing::error!(txid = %txid, "DEGRADED: {note}");
            if let Some(g) = owner.guard().as_mut().filter(|g| g.txid == txid) {
                g.state = GuardState::Degraded { reason: note, wall: now_wall() };
            }
            Ok(())
        }
        Err(e) => Err(format!("{reason}; removing ctguard's NOTRACK rules failed too: {}", e.message)),
    }
}

/// Adds a guard event (`REPAIRED`, `DEGRADED`) to the committed record and journals it (a
/// failed write is logged by `write_record`; the in-memory guard state still says it).
fn journal_event(shared: &Shared, rec: &mut TxnRecord, state: &str, note: &str) {
    rec.events.push(crate::txn::Event { wall_unix: now_wall(), state: state.into(), note: note.into() });
    let _ = write_record(shared, None, rec);
}

/// The repaired undo: what the repair created, with the committed transaction's history (the
/// sysctl values and the table and rules it replaced) kept.
fn merge_history(old: &Undo, new: Undo) -> Undo {
    match (old, new) {
        (Undo::Policy(o), Undo::Policy(mut n)) => {
            n.sysctls = o.sysctls.clone();
            n.table = o.table.clone();
            n.removed_previous = o.removed_previous.clone();
            n.genid_before = o.genid_before;
            Undo::Policy(n)
        }
        (_, n) => n,
    }
}

/// `status`'s view of the guards: one entry per guarded target.
pub fn status(shared: &Shared) -> Vec<serde_json::Value> {
    shared
        .guarding_owners()
        .iter()
        .filter_map(|o| {
            let g = o.guard();
            let g = g.as_ref()?;
            let (state, detail) = match &g.state {
                GuardState::Intact => ("intact", serde_json::json!({})),
                GuardState::Repaired { count, last_wall, last_gap_ms } => (
                    "repaired",
                    serde_json::json!({"repairs": count, "last_repair": crate::txn::format_rfc3339(*last_wall), "last_gap_ms": last_gap_ms}),
                ),
                GuardState::Degraded { reason, wall } => (
                    "degraded",
                    serde_json::json!({"reason": reason, "since": crate::txn::format_rfc3339(*wall)}),
                ),
            };
            let mut v = serde_json::json!({"id": g.txid, "target": g.target, "state": state, "error": g.last_error});
            if let (Some(m), serde_json::Value::Object(d)) = (v.as_object_mut(), detail) {
                m.extend(d);
            }
            Some(v)
        })
        .collect()
}
